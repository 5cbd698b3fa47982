/*
 * chain.c — the retry / fallback planner (see chain.h for the walk and its moves).
 *
 * chain_plan is a function of its input: it first works out what the chain wants to do
 * next from the history alone — end (PASS, AUTH_FAILED, EXHAUSTED), go to a step, or retry
 * the last step once a wait has run — and only then applies time: the deadline, whether
 * the wait is over, and the target step's breaker.  Keeping the two apart is what makes
 * each SPEC rule one line below.
 *
 * Invariants the history keeps (the caller appends what each move asked for): steps are
 * entered in order; an entry is either an attempt or a skip of the step the planner named;
 * the overflow step is entered at most once, and nothing follows it but its own retries.
 * So the attempts on a step are simply the non-skipped entries naming it.
 *
 * Pure: no clock, no I/O, no globals (DESIGN rule 1).  curl_getdate, used to read an
 * HTTP date, is pure too (a string in, a time_t out).
 */
#include "pep/chain.h"

#include <assert.h>
#include <curl/curl.h>
#include <string.h>
#include <time.h>

/* What an attempt means for the walk. */
enum chain_verdict {
    CHAIN_VERDICT_SERVED,   /* a final answer: relayed */
    CHAIN_VERDICT_AUTH,     /* 401/403 */
    CHAIN_VERDICT_OVERFLOW, /* context overflow on a regular step: jump */
    CHAIN_VERDICT_RETRY,    /* listed in retry.on */
    CHAIN_VERDICT_END,      /* a failure not listed (or unlistable): no answer, no retry */
};

/* What the chain wants before time is taken into account. */
enum chain_intent {
    CHAIN_INTENT_END,   /* move.kind already holds the terminal move */
    CHAIN_INTENT_GOTO,  /* attempt (or skip) `step` now */
    CHAIN_INTENT_RETRY, /* attempt `step` again once `wait` ms have passed since the last end */
};

bool chain_is_retryable(const struct retry_config *r, const struct chain_attempt *a) {
    switch (a->outcome) {
    case CHAIN_OUTCOME_STATUS:
        for (size_t i = 0; i < r->on_status_len; i++)
            if (r->on_status[i] == a->status) return true;
        return false;
    case CHAIN_OUTCOME_TIMEOUT:
    case CHAIN_OUTCOME_IDLE_TIMEOUT:
        return r->on_timeout;
    case CHAIN_OUTCOME_CONNECT_ERROR:
        return r->on_connect_error;
    case CHAIN_OUTCOME_FAILED:
    case CHAIN_OUTCOME_SKIPPED:
        break;
    }
    return false;
}

/* 401/403 comes first (SPEC 4.3: even if a policy lists it in retry.on), then the context
 * overflow (deterministic: "never retried", even if its status is listed). */
static enum chain_verdict chain_verdict_of(const struct chain *c, const struct chain_attempt *a) {
    if (a->outcome == CHAIN_OUTCOME_STATUS) {
        if (a->status == 401 || a->status == 403) return CHAIN_VERDICT_AUTH;
        if (c->has_context_overflow && a->context_overflow)
            /* On the overflow step itself there is nowhere left to jump: relay it. */
            return a->step == CHAIN_STEP_OVERFLOW ? CHAIN_VERDICT_SERVED : CHAIN_VERDICT_OVERFLOW;
        return chain_is_retryable(&c->retry, a) ? CHAIN_VERDICT_RETRY : CHAIN_VERDICT_SERVED;
    }
    return chain_is_retryable(&c->retry, a) ? CHAIN_VERDICT_RETRY : CHAIN_VERDICT_END;
}

const struct chain_step *chain_step_at(const struct chain *c, int step) {
    if (step == CHAIN_STEP_OVERFLOW)
        return c->has_context_overflow ? &c->context_overflow_step : NULL;
    if (step < 0 || (size_t)step >= c->steps_len) return NULL;
    return &c->steps[step];
}

static const struct chain_breaker_view *chain_breaker_of(const struct chain_input *in, int step) {
    static const struct chain_breaker_view admits = {.admits = true, .half_open_in_ms = 0};
    const struct chain_breaker_view *v = step == CHAIN_STEP_OVERFLOW ? in->overflow_breaker
                                         : in->breakers              ? &in->breakers[step]
                                                                     : NULL;
    return v ? v : &admits;
}

/* The step after `step` in the walk, or CHAIN_STEP_NONE at the end (after the last step,
 * and after the overflow step, which ends the chain). */
static int chain_next_step(const struct chain *c, int step) {
    if (step == CHAIN_STEP_OVERFLOW || (size_t)step + 1 >= c->steps_len) return CHAIN_STEP_NONE;
    return step + 1;
}

/* murmur3's 32-bit finalizer over (seed, step, retry_n): independent-looking jitter for
 * each retry, the same on every call for the same request. */
static uint32_t chain_jitter_random(uint32_t seed, int step, int retry_n) {
    uint32_t h = seed ^ ((uint32_t)(step + 2) * 0x9e3779b9u) ^ ((uint32_t)retry_n * 0x85ebca6bu);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* uniform in [0, n] from 32 random bits; 128-bit product so any n ≤ INT64_MAX fits. */
static int64_t chain_uniform(int64_t n, uint32_t random) {
    return (int64_t)(((unsigned __int128)random * ((uint64_t)n + 1)) >> 32);
}

int64_t chain_backoff_ms(const struct retry_config *r, int retry_n, uint32_t random) {
    int64_t max = r->max_ms > 0 ? r->max_ms : 0, base = r->base_ms > 0 ? r->base_ms : 0;
    int shift = retry_n > 1 ? retry_n - 1 : 0;
    /* base·2^shift ≥ max whenever the shift would overflow or base > max >> shift. */
    int64_t cap = shift >= 62 || base > (max >> shift) ? max : base << shift;
    if (cap > max) cap = max;
    switch (r->jitter) {
    case RETRY_JITTER_NONE:
        return cap;
    case RETRY_JITTER_FULL:
        return chain_uniform(cap, random);
    case RETRY_JITTER_EQUAL:
        return cap - cap / 2 + chain_uniform(cap / 2, random);
    }
    return cap;
}

static bool chain_is_ows(char ch) {
    return ch == ' ' || ch == '\t';
}

int64_t chain_parse_retry_after(const char *value, int64_t now_unix_ms) {
    if (!value) return -1;
    while (chain_is_ows(*value))
        value++;
    size_t len = strlen(value);
    while (len > 0 && chain_is_ows(value[len - 1]))
        len--;
    if (len == 0) return -1;
    if (value[0] >= '0' && value[0] <= '9') { /* delta-seconds = 1*DIGIT */
        int64_t s = 0;
        for (size_t i = 0; i < len; i++) {
            if (value[i] < '0' || value[i] > '9') return -1;
            if (s < CHAIN_RETRY_AFTER_MAX_MS / 1000) s = s * 10 + (value[i] - '0');
        }
        return s < CHAIN_RETRY_AFTER_MAX_MS / 1000 ? s * 1000 : CHAIN_RETRY_AFTER_MAX_MS;
    }
    /* Every HTTP-date form (IMF-fixdate, rfc850, asctime) opens with a day name: anything
     * else ("-1", "+5") is refused here rather than left to curl's lenient parser. */
    if (!((value[0] >= 'A' && value[0] <= 'Z') || (value[0] >= 'a' && value[0] <= 'z'))) return -1;
    char date[64];
    if (len >= sizeof date) return -1;
    memcpy(date, value, len);
    date[len] = '\0';
    time_t t = curl_getdate(date, NULL);
    if (t == -1) return -1;
    /* time_t from a 4-digit year stays far below INT64_MAX / 1000. */
    int64_t delta = (int64_t)t * 1000 - now_unix_ms;
    if (delta < 0) return 0;
    return delta < CHAIN_RETRY_AFTER_MAX_MS ? delta : CHAIN_RETRY_AFTER_MAX_MS;
}

bool chain_is_context_overflow(const struct chain *c, int status, const char *body, size_t len) {
    if (!c->has_context_overflow || status != c->context_overflow_status) return false;
    if (c->context_overflow_body_contains_len == 0) return true;
    for (size_t i = 0; body && i < c->context_overflow_body_contains_len; i++) {
        const char *needle = c->context_overflow_body_contains[i];
        if (memmem(body, len, needle, strlen(needle))) return true;
    }
    return false;
}

void chain_single(struct chain *out, struct chain_step *step_storage, struct upstream *u,
                  const struct retry_config *retry) {
    *step_storage = (struct chain_step){.upstream = u};
    *out = (struct chain){.retry = *retry, .steps = step_storage, .steps_len = 1};
}

/* Fills step, upstream and model of the move from a step index. */
static void chain_move_at(const struct chain *c, int step, struct chain_move *out) {
    const struct chain_step *s = step == CHAIN_STEP_NONE ? NULL : chain_step_at(c, step);
    out->step = step;
    out->upstream = s ? s->upstream : NULL;
    out->model = s ? s->model : NULL;
}

/* The 503's extras: whether nothing was attempted, and its Retry-After (see chain.h). */
static void chain_exhausted(const struct chain_input *in, size_t attempts, struct chain_move *out) {
    out->kind = CHAIN_EXHAUSTED;
    out->all_skipped = attempts == 0 && in->history_len > 0;
    out->retry_after_ms = -1;
    for (size_t i = in->history_len; i-- > 0;) {
        const struct chain_attempt *a = &in->history[i];
        if (out->all_skipped) {
            int64_t t = chain_breaker_of(in, a->step)->half_open_in_ms;
            if (t < 0) t = 0;
            if (out->retry_after_ms < 0 || t < out->retry_after_ms) out->retry_after_ms = t;
        } else if (a->outcome != CHAIN_OUTCOME_SKIPPED) {
            if (a->outcome == CHAIN_OUTCOME_STATUS) out->retry_after_ms = a->retry_after_ms;
            break;
        }
    }
}

void chain_plan(const struct chain_input *in, struct chain_move *out) {
    const struct chain *c = in->chain;
    const struct retry_config *r = &c->retry;
    const struct chain_attempt *last = in->history_len ? &in->history[in->history_len - 1] : NULL;
    *out = (struct chain_move){.kind = CHAIN_EXHAUSTED, .remaining_ms = -1, .retry_after_ms = -1};
    assert(c && (in->history || in->history_len == 0));

    /* The counts the rules need: attempts made (skips excluded), failed ones, and those on
     * the last entry's step; and the last attempt's step for EXHAUSTED / DEADLINE. */
    size_t attempts = 0, failed = 0;
    int64_t on_step = 0;
    int last_attempted = CHAIN_STEP_NONE;
    for (size_t i = 0; i < in->history_len; i++) {
        const struct chain_attempt *a = &in->history[i];
        if (PEP_NEVER(!chain_step_at(c, a->step))) { /* not a history we produced */
            chain_move_at(c, CHAIN_STEP_NONE, out);
            return;
        }
        if (a->outcome == CHAIN_OUTCOME_SKIPPED) continue;
        attempts++;
        failed += chain_verdict_of(c, a) != CHAIN_VERDICT_SERVED;
        on_step += a->step == last->step;
        last_attempted = a->step;
    }

    /* 1. What the history asks for. */
    enum chain_intent intent = CHAIN_INTENT_GOTO;
    enum chain_move_kind end = CHAIN_EXHAUSTED; /* CHAIN_INTENT_END: how */
    int step = 0;
    int64_t wait = 0;
    if (!last) {
        step = c->steps_len > 0 ? 0 : CHAIN_STEP_NONE;
    } else if (last->outcome == CHAIN_OUTCOME_SKIPPED) {
        step = chain_next_step(c, last->step);
    } else {
        switch (chain_verdict_of(c, last)) {
        case CHAIN_VERDICT_SERVED:
            intent = CHAIN_INTENT_END;
            end = CHAIN_PASS;
            break;
        case CHAIN_VERDICT_AUTH:
            intent = CHAIN_INTENT_END;
            end = CHAIN_AUTH_FAILED;
            break;
        case CHAIN_VERDICT_END:
            step = CHAIN_STEP_NONE;
            break;
        case CHAIN_VERDICT_OVERFLOW:
            if (in->repeatable) {
                step = CHAIN_STEP_OVERFLOW;
            } else { /* one attempt only: its answer, a 4xx, is the answer */
                intent = CHAIN_INTENT_END;
                end = CHAIN_PASS;
            }
            break;
        case CHAIN_VERDICT_RETRY:
            if (!in->repeatable || on_step >= (r->max_attempts > 1 ? r->max_attempts : 1)) {
                step = in->repeatable ? chain_next_step(c, last->step) : CHAIN_STEP_NONE;
            } else if (r->respect_retry_after && last->outcome == CHAIN_OUTCOME_STATUS &&
                       last->retry_after_ms >= 0) {
                /* The upstream said when to come back.  Its own delay, not max(it, backoff):
                 * it knows best, and a longer wait only adds latency.  Too long for retry.max
                 * or the deadline: another step may serve at once (SPEC 2). */
                bool too_long =
                    last->retry_after_ms > r->max_ms ||
                    (c->deadline_ms > 0 && last->retry_after_ms >= c->deadline_ms - last->end_ms);
                if (too_long) {
                    step = chain_next_step(c, last->step);
                } else {
                    intent = CHAIN_INTENT_RETRY;
                    step = last->step;
                    wait = last->retry_after_ms;
                }
            } else {
                intent = CHAIN_INTENT_RETRY;
                step = last->step;
                /* on_step attempts made: this is retry number on_step (≤ 100, the policy cap) */
                int n = (int)on_step;
                wait = chain_backoff_ms(r, n, chain_jitter_random(in->seed, step, n));
            }
            break;
        }
    }
    if (intent == CHAIN_INTENT_GOTO && step == CHAIN_STEP_NONE) intent = CHAIN_INTENT_END;

    /* 2. Time: the deadline, the wait, the breaker. */
    bool expired = c->deadline_ms > 0 && in->now_ms >= c->deadline_ms;
    if (intent == CHAIN_INTENT_END && end != CHAIN_EXHAUSTED) {
        /* An answer in hand is given, even late. */
        out->kind = end;
        chain_move_at(c, last->step, out);
    } else if (expired || (intent == CHAIN_INTENT_RETRY && c->deadline_ms > 0 &&
                           wait >= c->deadline_ms - last->end_ms)) {
        /* Past the deadline nothing else starts; a wait that would reach it is pointless. */
        out->kind = CHAIN_DEADLINE;
        chain_move_at(c, last_attempted, out);
    } else if (intent == CHAIN_INTENT_END) {
        chain_exhausted(in, attempts, out);
        chain_move_at(c, last_attempted, out);
    } else if (intent == CHAIN_INTENT_RETRY && in->now_ms - last->end_ms < wait) {
        out->kind = CHAIN_WAIT; /* (written so that no sum can overflow, whatever retry.max) */
        out->wait_ms = wait - (in->now_ms - last->end_ms);
        chain_move_at(c, step, out);
    } else {
        /* Every attempt, a retry included, asks the step's breaker first (SPEC 4.4). */
        out->kind = chain_breaker_of(in, step)->admits ? CHAIN_ATTEMPT : CHAIN_SKIP;
        if (out->kind == CHAIN_ATTEMPT && c->deadline_ms > 0)
            out->remaining_ms = c->deadline_ms - in->now_ms;
        chain_move_at(c, step, out);
    }

    /* 3. Escalation, once per request (SPEC 2 `escalate`, 4.4). */
    bool reached = c->escalate_after_attempts > 0 && (int64_t)failed >= c->escalate_after_attempts;
    out->escalate_now =
        c->escalate_webhook && !in->escalated && (reached || out->kind == CHAIN_EXHAUSTED);
    assert(out->kind != CHAIN_WAIT || out->wait_ms > 0);
}
