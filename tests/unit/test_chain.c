/*
 * test_chain.c — the retry / fallback planner (pep/chain.c).
 *
 * The planner is a function of its input, so most of this file is one table: a chain
 * from the YAML below, a script of upstream outcomes, and the moves the planner must make.
 * A small simulated forwarder (run_chain) plays the script: it attempts what the planner
 * says, advances a fake clock by each attempt's duration and each wait, records skips, and
 * writes every move as a token:
 *
 *   A0 A1 AO   attempt step 0, 1, the context_overflow step     S0 SO   skip (breaker open)
 *   W1000      wait 1000 ms                                     P0 PO   pass (relay) from …
 *   AUTH       502 upstream_auth_failed                         D       504 deadline
 *   X          503 exhausted; X* = every step skipped; r3000 = its Retry-After in ms
 *   !          suffix: escalate_now on this move
 *
 * Outcome tokens: 200 (a status), 429/3000 (with Retry-After 3000 ms), 400co (a context
 * overflow), T I C F (timeout, idle_timeout, connect_error, failed); @2500 = the attempt
 * lasts 2500 ms (default 100).  Every plan is also asked twice, to check that asking again
 * with the same input gives the same move.
 *
 * Then the pieces: backoff bounds per jitter mode over 100k draws, Retry-After parsing,
 * the context-overflow match, retryability, a wait's stability across re-asks, and the
 * one-step chain of a `forward: {upstream: X}` route.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pep/chain.h"
#include "pep/policy.h"

static const char policy_yaml[] =
    "version: 1\n"
    "upstreams:\n"
    "  a: { base_url: 'http://127.0.0.1:9001' }\n"
    "  b: { base_url: 'http://127.0.0.1:9002' }\n"
    "chains:\n"
    "  basic:\n"
    "    retry: { max_attempts: 3, base: 1s, max: 10s, jitter: none }\n"
    "    steps: [ { upstream: a, model: m0 }, { upstream: b, model: m1 } ]\n"
    "    context_overflow:\n"
    "      match: { status: 400, body_contains: [context_length_exceeded, prompt is too long] }\n"
    "      step: { upstream: a, model: big }\n"
    "    deadline: 30s\n"
    "    escalate: { webhook: 'http://127.0.0.1:9000/e', after_attempts: 2 }\n"
    "  tight:\n"
    "    retry: { max_attempts: 3, base: 1s, max: 10s, jitter: none }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "    deadline: 2500ms\n"
    "  ra_deadline:\n"
    "    retry: { max_attempts: 3, base: 1s, max: 60s, jitter: none }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "    deadline: 10s\n"
    "  narrow:\n"
    "    retry: { on: [503], max_attempts: 2, base: 1s, jitter: none }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "  timeouts:\n"
    "    retry: { on: [timeout], max_attempts: 2, base: 1s, jitter: none }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "  no_retry_after:\n"
    "    retry: { max_attempts: 2, base: 1s, jitter: none, respect_retry_after: false }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "  once:\n"
    "    retry: { max_attempts: 3, base: 1s, max: 10s, jitter: none }\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "    escalate: { webhook: 'http://127.0.0.1:9000/e', after_attempts: 1 }\n"
    "  on_exhaustion:\n"
    "    steps: [ { upstream: a }, { upstream: b } ]\n"
    "    escalate: { webhook: 'http://127.0.0.1:9000/e' }\n"
    "  jittery:\n"
    "    retry: { max_attempts: 5, base: 1s, max: 10s, jitter: full }\n"
    "    steps: [ { upstream: a } ]\n"
    "  status_only:\n"
    "    steps: [ { upstream: a } ]\n"
    "    context_overflow: { match: { status: 413 }, step: { upstream: b } }\n"
    "routes:\n"
    "  - match: { path: /one }\n"
    "    action: x\n"
    "    forward: { upstream: a }\n"
    "  - match: { path: /two }\n"
    "    action: x\n"
    "    forward: { upstream: b, retry: { max_attempts: 2, base: 1s, jitter: none } }\n"
    "actions: { x: { scope: s } }\n";

static struct policy *policy;

static int setup(void **state) {
    (void)state;
    struct policy_errors errs;
    int rc = policy_load_buffer("t.yaml", policy_yaml, strlen(policy_yaml), &policy, &errs);
    for (size_t i = 0; i < errs.len; i++)
        print_error("policy: %s\n", errs.items[i]);
    policy_errors_free(&errs);
    return rc;
}

static int teardown(void **state) {
    (void)state;
    policy_release(policy);
    return 0;
}

static const struct chain *chain_named(const char *name) {
    const struct chain *c = policy_find_chain(policy, name);
    assert_non_null(c);
    return c;
}

/* ---- the simulated forwarder -------------------------------------------------------- */

#define MAX_MOVES 64

/* Breakers: open_ms[k] > 0 = step k's breaker is open and may half-open in that many ms. */
struct breakers {
    int64_t open_ms[4];
    int64_t overflow_open_ms;
};

static const char *step_name(int step) {
    static const char *const names[] = {"0", "1", "2", "3"};
    return step == CHAIN_STEP_OVERFLOW ? "O" : step >= 0 && step < 4 ? names[step] : "?";
}

/* Parses one outcome token (see the top of the file) into *a; returns the attempt's
 * duration. */
static int64_t parse_outcome(const char *tok, struct chain_attempt *a) {
    char *end = (char *)tok;
    int64_t ms = 100;
    a->retry_after_ms = -1;
    switch (*tok) {
    case 'T':
        a->outcome = CHAIN_OUTCOME_TIMEOUT, end++;
        break;
    case 'I':
        a->outcome = CHAIN_OUTCOME_IDLE_TIMEOUT, end++;
        break;
    case 'C':
        a->outcome = CHAIN_OUTCOME_CONNECT_ERROR, end++;
        break;
    case 'F':
        a->outcome = CHAIN_OUTCOME_FAILED, end++;
        break;
    default:
        a->outcome = CHAIN_OUTCOME_STATUS;
        a->status = (int)strtol(tok, &end, 10);
        if (*end == '/') a->retry_after_ms = strtoll(end + 1, &end, 10);
        if (strncmp(end, "co", 2) == 0) a->context_overflow = true, end += 2;
    }
    if (*end == '@') ms = strtoll(end + 1, &end, 10);
    assert_true(*end == '\0' || *end == ' ');
    return ms;
}

static void append_move(char *trace, size_t cap, const struct chain_move *m) {
    char tok[48];
    switch (m->kind) {
    case CHAIN_ATTEMPT:
        snprintf(tok, sizeof tok, "A%s", step_name(m->step));
        break;
    case CHAIN_WAIT:
        snprintf(tok, sizeof tok, "W%lld", (long long)m->wait_ms);
        break;
    case CHAIN_SKIP:
        snprintf(tok, sizeof tok, "S%s", step_name(m->step));
        break;
    case CHAIN_PASS:
        snprintf(tok, sizeof tok, "P%s", step_name(m->step));
        break;
    case CHAIN_AUTH_FAILED:
        snprintf(tok, sizeof tok, "AUTH");
        break;
    case CHAIN_DEADLINE:
        snprintf(tok, sizeof tok, "D");
        break;
    case CHAIN_EXHAUSTED:
        snprintf(tok, sizeof tok, "X%s", m->all_skipped ? "*" : "");
        if (m->retry_after_ms >= 0)
            snprintf(tok + strlen(tok), sizeof tok - strlen(tok), "r%lld",
                     (long long)m->retry_after_ms);
        break;
    }
    snprintf(trace + strlen(trace), cap - strlen(trace), "%s%s%s", *trace ? " " : "", tok,
             m->escalate_now ? "!" : "");
}

static bool moves_equal(const struct chain_move *a, const struct chain_move *b) {
    return a->kind == b->kind && a->step == b->step && a->upstream == b->upstream &&
           a->model == b->model && a->wait_ms == b->wait_ms && a->remaining_ms == b->remaining_ms &&
           a->escalate_now == b->escalate_now && a->all_skipped == b->all_skipped &&
           a->retry_after_ms == b->retry_after_ms;
}

/* Plays `outcomes` through the planner for chain c; writes the moves into trace. */
static void run_chain(const struct chain *c, bool repeatable, const struct breakers *b,
                      const char *outcomes, char *trace, size_t cap) {
    struct chain_attempt history[MAX_MOVES];
    struct chain_breaker_view views[4] = {{0}}, overflow = {.admits = true};
    assert_true(c->steps_len <= 4);
    for (size_t k = 0; k < c->steps_len; k++)
        views[k] = (struct chain_breaker_view){.admits = !b || b->open_ms[k] <= 0,
                                               .half_open_in_ms = b ? b->open_ms[k] : 0};
    if (b && b->overflow_open_ms > 0)
        overflow = (struct chain_breaker_view){.half_open_in_ms = b->overflow_open_ms};
    struct chain_input in = {.chain = c,
                             .repeatable = repeatable,
                             .history = history,
                             .breakers = views,
                             .overflow_breaker = &overflow,
                             .seed = 12345};
    const char *next = outcomes;
    int escalations = 0;
    *trace = '\0';
    for (int moves = 0; moves < MAX_MOVES; moves++) {
        struct chain_move m, again;
        chain_plan(&in, &m);
        chain_plan(&in, &again);
        assert_true(moves_equal(&m, &again)); /* a function of its input */
        append_move(trace, cap, &m);
        if (m.escalate_now) {
            in.escalated = true;
            escalations++;
        }
        struct chain_attempt *a = &history[in.history_len];
        *a = (struct chain_attempt){.step = m.step, .start_ms = in.now_ms};
        switch (m.kind) {
        case CHAIN_ATTEMPT:
            assert_int_equal(m.remaining_ms, c->deadline_ms > 0 ? c->deadline_ms - in.now_ms : -1);
            assert_ptr_equal(m.upstream, chain_step_at(c, m.step)->upstream);
            while (*next == ' ')
                next++;
            if (!*next) fail_msg("script ran out at: %s", trace);
            in.now_ms += parse_outcome(next, a);
            next += strcspn(next, " ");
            a->end_ms = in.now_ms;
            in.history_len++;
            break;
        case CHAIN_SKIP:
            a->outcome = CHAIN_OUTCOME_SKIPPED;
            a->retry_after_ms = -1;
            a->end_ms = in.now_ms;
            in.history_len++;
            break;
        case CHAIN_WAIT:
            assert_true(m.wait_ms > 0);
            in.now_ms += m.wait_ms;
            break;
        default:
            if (*next) fail_msg("outcomes left over (%s) after: %s", next, trace);
            assert_true(escalations <= 1);
            return;
        }
    }
    fail_msg("no end after %d moves: %s", MAX_MOVES, trace);
}

struct plan_case {
    const char *name;
    const char *chain;
    bool not_repeatable;
    struct breakers breakers;
    const char *outcomes;
    const char *want;
};

static const struct plan_case plan_cases[] = {
    /* basic: 3 attempts per step, waits 1 s then 2 s, deadline 30 s, escalation after 2 */
    {"retry then succeed", "basic", false, {{0}, 0}, "503 200", "A0 W1000 A0 P0"},
    {"retries then fallback",
     "basic",
     false,
     {{0}, 0},
     "503 503 503 200",
     "A0 W1000 A0 W2000! A0 A1 P1"},
    {"every attempt fails",
     "basic",
     false,
     {{0}, 0},
     "503 503 503 C T I",
     "A0 W1000 A0 W2000! A0 A1 W1000 A1 W2000 A1 X"},
    {"exhausted keeps the last Retry-After",
     "basic",
     false,
     {{0}, 0},
     "503 503 503 503 503 503/4000",
     "A0 W1000 A0 W2000! A0 A1 W1000 A1 W2000 A1 Xr4000"},
    {"short Retry-After is waited", "basic", false, {{0}, 0}, "429/3000 200", "A0 W3000 A0 P0"},
    {"Retry-After over max: next step now", "basic", false, {{0}, 0}, "429/20000 200", "A0 A1 P1"},
    {"Retry-After equal to max is waited",
     "basic",
     false,
     {{0}, 0},
     "429/10000 200",
     "A0 W10000 A0 P0"},
    {"Retry-After 0: again at once", "basic", false, {{0}, 0}, "503/0 200", "A0 A0 P0"},
    {"context overflow jumps", "basic", false, {{0}, 0}, "400co 200", "A0 AO PO"},
    {"overflow on the overflow step is relayed",
     "basic",
     false,
     {{0}, 0},
     "400co 400co",
     "A0 AO PO"},
    {"overflow step retried, then the end",
     "basic",
     false,
     {{0}, 0},
     "400co 503 503 503",
     "A0 AO W1000! AO W2000 AO X"},
    {"overflow from a later step",
     "basic",
     false,
     {{0}, 0},
     "503 503 503 400co 200",
     "A0 W1000 A0 W2000! A0 A1 AO PO"},
    {"401: auth failed", "basic", false, {{0}, 0}, "401", "A0 AUTH"},
    {"403 after fallback",
     "basic",
     false,
     {{0}, 0},
     "503 503 503 403",
     "A0 W1000 A0 W2000! A0 A1 AUTH"},
    {"400 relayed", "basic", false, {{0}, 0}, "400", "A0 P0"},
    {"timeout retried", "basic", false, {{0}, 0}, "T@5000 200", "A0 W1000 A0 P0"},
    {"idle timeout retried", "basic", false, {{0}, 0}, "I 200", "A0 W1000 A0 P0"},
    {"connect error retried", "basic", false, {{0}, 0}, "C 200", "A0 W1000 A0 P0"},
    {"unlistable failure ends", "basic", false, {{0}, 0}, "F", "A0 X!"},
    {"not retry-safe: 503", "basic", true, {{0}, 0}, "503", "A0 X!"},
    {"not retry-safe: timeout", "basic", true, {{0}, 0}, "T", "A0 X!"},
    {"not retry-safe: 200", "basic", true, {{0}, 0}, "200", "A0 P0"},
    {"not retry-safe: 401", "basic", true, {{0}, 0}, "401", "A0 AUTH"},
    {"not retry-safe: overflow relayed", "basic", true, {{0}, 0}, "400co", "A0 P0"},
    {"not retry-safe: skip first", "basic", true, {{5000}, 0}, "503", "S0 A1 X!"},
    {"every breaker open", "basic", false, {{5000, 3000}, 0}, "", "S0 S1 X*r3000!"},
    {"every breaker open, not retry-safe", "basic", true, {{5000, 3000}, 0}, "", "S0 S1 X*r3000!"},
    {"second breaker open",
     "basic",
     false,
     {{0, 4000}, 0},
     "503 503 503",
     "A0 W1000 A0 W2000! A0 S1 X"},
    {"overflow breaker open", "basic", false, {{0}, 7000}, "400co", "A0 SO X!"},
    /* tight: deadline 2.5 s */
    {"deadline: the wait would pass it", "tight", false, {{0}, 0}, "503 503", "A0 W1000 A0 D"},
    {"deadline: passed before the next attempt", "tight", false, {{0}, 0}, "T@2500", "A0 D"},
    {"deadline: passed, nothing left to try", "tight", true, {{0}, 0}, "T@2500", "A0 D"},
    {"deadline: an answer is relayed even late", "tight", false, {{0}, 0}, "200@3000", "A0 P0"},
    /* ra_deadline: max 60 s, deadline 10 s */
    {"Retry-After beyond the deadline: next step now",
     "ra_deadline",
     false,
     {{0}, 0},
     "429/15000 200",
     "A0 A1 P1"},
    {"Retry-After within the deadline",
     "ra_deadline",
     false,
     {{0}, 0},
     "429/5000 200",
     "A0 W5000 A0 P0"},
    /* narrow: retry.on [503] */
    {"timeout not listed", "narrow", false, {{0}, 0}, "T", "A0 X"},
    {"idle timeout not listed", "narrow", false, {{0}, 0}, "I", "A0 X"},
    {"connect error not listed", "narrow", false, {{0}, 0}, "C", "A0 X"},
    {"429 not listed: relayed", "narrow", false, {{0}, 0}, "429/1000", "A0 P0"},
    {"503 listed", "narrow", false, {{0}, 0}, "503 503 200", "A0 W1000 A0 A1 P1"},
    /* timeouts: retry.on [timeout] */
    {"idle timeout counts as timeout", "timeouts", false, {{0}, 0}, "I 200", "A0 W1000 A0 P0"},
    {"connect error not listed (timeouts)", "timeouts", false, {{0}, 0}, "C", "A0 X"},
    {"503 not listed: relayed", "timeouts", false, {{0}, 0}, "503", "A0 P0"},
    /* respect_retry_after: false */
    {"Retry-After ignored", "no_retry_after", false, {{0}, 0}, "429/3000 200", "A0 W1000 A0 P0"},
    {"long Retry-After ignored",
     "no_retry_after",
     false,
     {{0}, 0},
     "429/20000 200",
     "A0 W1000 A0 P0"},
    /* escalation */
    {"escalates once",
     "once",
     false,
     {{0}, 0},
     "503 503 503 503 503 503",
     "A0 W1000! A0 W2000 A0 A1 W1000 A1 W2000 A1 X"},
    {"no failure, no escalation", "once", false, {{0}, 0}, "200", "A0 P0"},
    {"a relayed 4xx is no failure", "once", false, {{0}, 0}, "404", "A0 P0"},
    {"auth failure counts", "once", false, {{0}, 0}, "401", "A0 AUTH!"},
    {"exhaustion escalates", "on_exhaustion", false, {{0}, 0}, "503 503", "A0 A1 X!"},
    {"fallback success does not", "on_exhaustion", false, {{0}, 0}, "503 200", "A0 A1 P1"},
    {"deadline does not escalate", "tight", false, {{0}, 0}, "T@2500", "A0 D"},
};

static void test_plan_table(void **state) {
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < PEP_ARRAY_LEN(plan_cases); i++) {
        const struct plan_case *t = &plan_cases[i];
        char trace[512];
        run_chain(chain_named(t->chain), !t->not_repeatable, &t->breakers, t->outcomes, trace,
                  sizeof trace);
        if (strcmp(trace, t->want) != 0) {
            print_error("%s [%s: %s]\n   got:  %s\n   want: %s\n", t->name, t->chain, t->outcomes,
                        trace, t->want);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

/* ---- single moves ------------------------------------------------------------------- */

static struct chain_move plan(const struct chain *c, const struct chain_attempt *h, size_t n,
                              int64_t now) {
    struct chain_move m;
    chain_plan(&(struct chain_input){.chain = c,
                                     .repeatable = true,
                                     .history = h,
                                     .history_len = n,
                                     .now_ms = now,
                                     .seed = 7},
               &m);
    return m;
}

/* What the forwarder sends: the step's upstream and model, and the deadline left. */
static void test_attempt_details(void **state) {
    (void)state;
    const struct chain *c = chain_named("basic");
    struct chain_move m = plan(c, NULL, 0, 0);
    assert_int_equal(m.kind, CHAIN_ATTEMPT);
    assert_int_equal(m.step, 0);
    assert_string_equal(m.upstream->name, "a");
    assert_string_equal(m.model, "m0");
    assert_int_equal(m.remaining_ms, 30000);

    struct chain_attempt h[] = {{.step = 0,
                                 .outcome = CHAIN_OUTCOME_STATUS,
                                 .status = 400,
                                 .retry_after_ms = -1,
                                 .context_overflow = true,
                                 .end_ms = 1200}};
    m = plan(c, h, 1, 1200);
    assert_int_equal(m.kind, CHAIN_ATTEMPT);
    assert_int_equal(m.step, CHAIN_STEP_OVERFLOW);
    assert_string_equal(m.upstream->name, "a");
    assert_string_equal(m.model, "big"); /* the body's model is rewritten */
    assert_int_equal(m.remaining_ms, 28800);

    /* the overflow step's answer served: fallback_step "context_overflow" */
    struct chain_attempt h2[] = {h[0],
                                 {.step = CHAIN_STEP_OVERFLOW,
                                  .outcome = CHAIN_OUTCOME_STATUS,
                                  .status = 200,
                                  .retry_after_ms = -1,
                                  .end_ms = 2000}};
    m = plan(c, h2, 2, 2000);
    assert_int_equal(m.kind, CHAIN_PASS);
    assert_int_equal(m.step, CHAIN_STEP_OVERFLOW);
    assert_string_equal(m.model, "big");

    /* a step without a model leaves the body's alone */
    m = plan(chain_named("tight"), NULL, 0, 0);
    assert_null(m.model);
    assert_int_equal(m.remaining_ms, 2500);
    m = plan(chain_named("narrow"), NULL, 0, 0);
    assert_int_equal(m.remaining_ms, -1); /* no deadline */

    /* nothing attempted yet and already past the deadline */
    m = plan(chain_named("tight"), NULL, 0, 2500);
    assert_int_equal(m.kind, CHAIN_DEADLINE);
    assert_int_equal(m.step, CHAIN_STEP_NONE);
    assert_null(m.upstream);
}

/* With full jitter, a wait is drawn from the seed and the retry's place, not from the
 * call: asking again mid-wait gives the rest of the same wait, and at its end: attempt. */
static void test_wait_is_stable(void **state) {
    (void)state;
    const struct chain *c = chain_named("jittery");
    int64_t waits[4] = {0};
    for (uint32_t seed = 0; seed < 200; seed++) {
        struct chain_attempt h[4];
        size_t n = 0;
        int64_t now = 0;
        for (int retry = 1; retry <= 4; retry++) {
            h[n++] = (struct chain_attempt){.step = 0,
                                            .outcome = CHAIN_OUTCOME_STATUS,
                                            .status = 503,
                                            .retry_after_ms = -1,
                                            .start_ms = now,
                                            .end_ms = now + 10};
            now += 10;
            struct chain_input in = {.chain = c,
                                     .repeatable = true,
                                     .history = h,
                                     .history_len = n,
                                     .now_ms = now,
                                     .seed = seed};
            struct chain_move m;
            chain_plan(&in, &m);
            int64_t cap = 1000LL << (retry - 1);
            if (m.kind == CHAIN_ATTEMPT) continue; /* a draw of 0 */
            assert_int_equal(m.kind, CHAIN_WAIT);
            assert_in_range(m.wait_ms, 1, cap);
            waits[retry - 1] += m.wait_ms;
            int64_t w = m.wait_ms;
            in.now_ms = now + w / 2;
            chain_plan(&in, &m);
            assert_int_equal(m.kind, w / 2 ? CHAIN_WAIT : CHAIN_ATTEMPT);
            if (w / 2) assert_int_equal(m.wait_ms, w - w / 2);
            in.now_ms = now + w;
            chain_plan(&in, &m);
            assert_int_equal(m.kind, CHAIN_ATTEMPT);
            now += w;
        }
    }
    /* each retry's draws are spread over its range (means near cap/2, loosely) */
    for (int i = 0; i < 4; i++)
        assert_in_range(waits[i] / 200, (500LL << i) * 8 / 10, (500LL << i) * 12 / 10);
}

/* A breaker that opens between two attempts of a step: the retry is skipped, not sent. */
static void test_breaker_opens_before_retry(void **state) {
    (void)state;
    const struct chain *c = chain_named("basic");
    struct chain_attempt h[] = {{.step = 0,
                                 .outcome = CHAIN_OUTCOME_STATUS,
                                 .status = 503,
                                 .retry_after_ms = -1,
                                 .end_ms = 100}};
    struct chain_breaker_view views[2] = {{.admits = false, .half_open_in_ms = 50000},
                                          {.admits = true}};
    struct chain_input in = {.chain = c,
                             .repeatable = true,
                             .history = h,
                             .history_len = 1,
                             .breakers = views,
                             .now_ms = 100};
    struct chain_move m;
    chain_plan(&in, &m);
    assert_int_equal(m.kind, CHAIN_WAIT);
    in.now_ms = 1100;
    chain_plan(&in, &m);
    assert_int_equal(m.kind, CHAIN_SKIP);
    assert_int_equal(m.step, 0);
}

/* A history the planner cannot have produced fails closed. */
static void test_bad_history(void **state) {
    (void)state;
    struct chain_attempt h = {.step = 7, .outcome = CHAIN_OUTCOME_STATUS, .status = 503};
    assert_int_equal(plan(chain_named("basic"), &h, 1, 0).kind, CHAIN_EXHAUSTED);
    h.step = CHAIN_STEP_OVERFLOW; /* a chain without context_overflow */
    assert_int_equal(plan(chain_named("tight"), &h, 1, 0).kind, CHAIN_EXHAUSTED);
    h.step = -5;
    assert_int_equal(plan(chain_named("basic"), &h, 1, 0).kind, CHAIN_EXHAUSTED);
}

/* `forward: {upstream: X}`: a one-step chain with the route's retry. */
static void test_single(void **state) {
    (void)state;
    struct chain c;
    struct chain_step step;
    char trace[256];
    const struct route *one = &policy->routes[0], *two = &policy->routes[1];

    chain_single(&c, &step, one->upstream, &one->retry);
    assert_int_equal(c.steps_len, 1);
    assert_null(c.name);
    assert_null(c.steps[0].model);
    assert_int_equal(c.retry.max_attempts, 1); /* the default */
    run_chain(&c, true, NULL, "503", trace, sizeof trace);
    assert_string_equal(trace, "A0 X");
    run_chain(&c, true, NULL, "502/2000", trace, sizeof trace);
    assert_string_equal(trace, "A0 Xr2000");
    run_chain(&c, true, NULL, "418", trace, sizeof trace);
    assert_string_equal(trace, "A0 P0");

    chain_single(&c, &step, two->upstream, &two->retry);
    run_chain(&c, true, NULL, "503 200", trace, sizeof trace);
    assert_string_equal(trace, "A0 W1000 A0 P0");
    run_chain(&c, false, NULL, "503", trace, sizeof trace);
    assert_string_equal(trace, "A0 X");
    run_chain(&c, true, &(struct breakers){{9000}, 0}, "", trace, sizeof trace);
    assert_string_equal(trace, "S0 X*r9000"); /* no escalation configured */
}

/* ---- backoff ------------------------------------------------------------------------- */

static void test_backoff_caps(void **state) {
    (void)state;
    struct retry_config r = {.base_ms = 1000, .max_ms = 10000, .jitter = RETRY_JITTER_NONE};
    const int64_t want[] = {1000, 1000, 2000, 4000, 8000, 10000, 10000};
    for (int n = 0; n <= 6; n++)
        assert_int_equal(chain_backoff_ms(&r, n, 0), want[n]);
    assert_int_equal(chain_backoff_ms(&r, 100, 0), 10000);
    assert_int_equal(chain_backoff_ms(&r, 1000000, 0), 10000);

    /* a max so large that base·2^(n−1) overflows first */
    r.max_ms = INT64_MAX;
    assert_int_equal(chain_backoff_ms(&r, 30, 0), 1000LL << 29);
    assert_int_equal(chain_backoff_ms(&r, 100, 0), INT64_MAX);
    r.jitter = RETRY_JITTER_FULL;
    assert_int_equal(chain_backoff_ms(&r, 100, 0), 0);
    assert_true(chain_backoff_ms(&r, 100, UINT32_MAX) > INT64_MAX / 2);
    r.jitter = RETRY_JITTER_EQUAL;
    assert_true(chain_backoff_ms(&r, 100, 0) >= INT64_MAX / 2);
    assert_true(chain_backoff_ms(&r, 100, UINT32_MAX) <= INT64_MAX);

    /* base 0: no wait */
    r = (struct retry_config){.base_ms = 0, .max_ms = 5000, .jitter = RETRY_JITTER_EQUAL};
    assert_int_equal(chain_backoff_ms(&r, 3, UINT32_MAX), 0);
}

static uint64_t xorshift64(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* 100k draws per mode and retry: within bounds, the right mean (±2%), both ends reached. */
static void test_backoff_jitter_stats(void **state) {
    (void)state;
    const int draws = 100000;
    const struct {
        enum retry_jitter jitter;
        double lo, hi, mean; /* as fractions of the cap */
    } modes[] = {
        {RETRY_JITTER_NONE, 1.0, 1.0, 1.0},
        {RETRY_JITTER_FULL, 0.0, 1.0, 0.5},
        {RETRY_JITTER_EQUAL, 0.5, 1.0, 0.75},
    };
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < PEP_ARRAY_LEN(modes); i++) {
        for (int n = 1; n <= 7; n += 3) { /* caps 1 s, 8 s, 30 s (max) */
            struct retry_config r = {.base_ms = 1000, .max_ms = 30000, .jitter = modes[i].jitter};
            int64_t cap = n == 7 ? 30000 : 1000LL << (n - 1);
            int64_t lo = INT64_MAX, hi = -1;
            double sum = 0;
            for (int d = 0; d < draws; d++) {
                int64_t w = chain_backoff_ms(&r, n, (uint32_t)(xorshift64(&seed) >> 32));
                lo = w < lo ? w : lo;
                hi = w > hi ? w : hi;
                sum += (double)w;
            }
            double mean = sum / draws / (double)cap;
            if (lo < (int64_t)(modes[i].lo * (double)cap) || hi > cap ||
                mean < modes[i].mean * 0.98 || mean > modes[i].mean * 1.02 ||
                (double)lo > (modes[i].lo + 0.01) * (double)cap || (double)hi < 0.99 * (double)cap)
                fail_msg("jitter %d, retry %d (cap %lld): min %lld max %lld mean %.4f·cap",
                         (int)modes[i].jitter, n, (long long)cap, (long long)lo, (long long)hi,
                         mean);
        }
    }
}

/* ---- Retry-After ---------------------------------------------------------------------- */

static void test_parse_retry_after(void **state) {
    (void)state;
    /* 784111777 = Sun, 06 Nov 1994 08:49:37 GMT */
    const int64_t date_ms = 784111777000LL, ten_before = date_ms - 10000;
    const struct {
        const char *value;
        int64_t now;
        int64_t want;
    } cases[] = {
        {"5", 0, 5000},
        {"0", 0, 0},
        {" 5", 0, 5000},
        {"5 \t", 0, 5000},
        {"120", 0, 120000},
        {"-1", 0, -1},
        {"+5", 0, -1},
        {"abc", 0, -1},
        {"", 0, -1},
        {"  ", 0, -1},
        {"5.5", 0, -1},
        {"5s", 0, -1},
        {"1 2", 0, -1},
        {"0x10", 0, -1},
        {"2147483647", 0, 2147483647000LL},
        {"2147483648", 0, CHAIN_RETRY_AFTER_MAX_MS},
        {"99999999999999999999999999999", 0, CHAIN_RETRY_AFTER_MAX_MS},
        {"Sun, 06 Nov 1994 08:49:37 GMT", ten_before, 10000},      /* IMF-fixdate */
        {"Sunday, 06-Nov-94 08:49:37 GMT", ten_before, 10000},     /* rfc850 */
        {"Sun Nov  6 08:49:37 1994", ten_before, 10000},           /* asctime */
        {"Sun, 06 Nov 1994 08:49:37 GMT", ten_before + 500, 9500}, /* now is in ms */
        {" Sun, 06 Nov 1994 08:49:37 GMT ", ten_before, 10000},
        {"Sun, 06 Nov 1994 08:49:37 GMT", date_ms + 5000, 0}, /* past */
        {"Sun, 06 Nov 1994 08:49:37 GMT", date_ms, 0},
        {"Fri, 31 Dec 9999 23:59:59 GMT", 0, CHAIN_RETRY_AFTER_MAX_MS},
        {"Sun, 99 Nov 1994 08:49:37 GMT", 0, -1},
        {"Sunday", 0, -1},
        {"Sun, 06 Nov 1994 08:49:37 GMT and a great deal more text after it, far too long", 0, -1},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        int64_t got = chain_parse_retry_after(cases[i].value, cases[i].now);
        if (got != cases[i].want)
            fail_msg("'%s': got %lld, want %lld", cases[i].value, (long long)got,
                     (long long)cases[i].want);
    }
    assert_int_equal(chain_parse_retry_after(NULL, 0), -1);
}

/* ---- context overflow, retryability --------------------------------------------------- */

static void test_context_overflow_match(void **state) {
    (void)state;
    const struct chain *c = chain_named("basic");
    static const char err[] = "{\"error\":{\"code\":\"context_length_exceeded\"}}";
    assert_true(chain_is_context_overflow(c, 400, err, strlen(err)));
    assert_false(chain_is_context_overflow(c, 413, err, strlen(err)));
    assert_false(chain_is_context_overflow(c, 400, "{}", 2));
    assert_false(chain_is_context_overflow(c, 400, NULL, 0));
    /* the match ends at the last byte of a body that is not NUL-terminated */
    char body[18];
    memcpy(body, "prompt is too long", sizeof body);
    assert_true(chain_is_context_overflow(c, 400, body, sizeof body));
    assert_false(chain_is_context_overflow(c, 400, body, sizeof body - 1));
    /* no context_overflow in the chain */
    assert_false(chain_is_context_overflow(chain_named("tight"), 400, err, strlen(err)));
    /* match on status alone */
    assert_true(chain_is_context_overflow(chain_named("status_only"), 413, "x", 1));
    assert_true(chain_is_context_overflow(chain_named("status_only"), 413, NULL, 0));
    assert_false(chain_is_context_overflow(chain_named("status_only"), 400, "x", 1));
}

static void test_is_retryable(void **state) {
    (void)state;
    const struct retry_config *dflt = &chain_named("basic")->retry;
    const struct retry_config *narrow = &chain_named("narrow")->retry;
    const struct retry_config *timeouts = &chain_named("timeouts")->retry;
    const struct {
        enum chain_outcome outcome;
        int status;
        bool dflt, narrow, timeouts;
    } cases[] = {
        {CHAIN_OUTCOME_STATUS, 200, false, false, false},
        {CHAIN_OUTCOME_STATUS, 429, true, false, false},
        {CHAIN_OUTCOME_STATUS, 500, true, false, false},
        {CHAIN_OUTCOME_STATUS, 501, false, false, false},
        {CHAIN_OUTCOME_STATUS, 503, true, true, false},
        {CHAIN_OUTCOME_STATUS, 401, false, false, false},
        {CHAIN_OUTCOME_TIMEOUT, 0, true, false, true},
        {CHAIN_OUTCOME_IDLE_TIMEOUT, 0, true, false, true},
        {CHAIN_OUTCOME_CONNECT_ERROR, 0, true, false, false},
        {CHAIN_OUTCOME_FAILED, 0, false, false, false},
        {CHAIN_OUTCOME_SKIPPED, 0, false, false, false},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        struct chain_attempt a = {.outcome = cases[i].outcome, .status = cases[i].status};
        assert_int_equal(chain_is_retryable(dflt, &a), cases[i].dflt);
        assert_int_equal(chain_is_retryable(narrow, &a), cases[i].narrow);
        assert_int_equal(chain_is_retryable(timeouts, &a), cases[i].timeouts);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_table),        cmocka_unit_test(test_attempt_details),
        cmocka_unit_test(test_wait_is_stable),    cmocka_unit_test(test_breaker_opens_before_retry),
        cmocka_unit_test(test_bad_history),       cmocka_unit_test(test_single),
        cmocka_unit_test(test_backoff_caps),      cmocka_unit_test(test_backoff_jitter_stats),
        cmocka_unit_test(test_parse_retry_after), cmocka_unit_test(test_context_overflow_match),
        cmocka_unit_test(test_is_retryable),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
