/*
 * chain.h — the retry / fallback planner (SPEC 4.1-4.4, 3.3, 8), pure.
 *
 * The forwarder runs a request's chain one move at a time.  It asks chain_plan() "given
 * everything that happened so far, what now?", does the move (an attempt, a timer wait, a
 * skip, or the final answer), appends what happened to the history, and asks again.  The
 * planner keeps no state between calls: the history is the whole truth, and the same
 * input always gives the same move.  It reads no clock and does no I/O; `now` and the
 * randomness for jitter are arguments.
 *
 * The walk: steps 0, 1, … in order, never shuffled.  On each step, an attempt whose
 * outcome is listed in retry.on is retried after a backoff (or the upstream's
 * Retry-After) up to retry.max_attempts attempts, then the next step is tried (fallback).
 * A context overflow jumps once to the context_overflow step (CHAIN_STEP_OVERFLOW), which
 * retries like any step and after which the chain ends.  A step whose breaker does not
 * admit is skipped (the caller records a CHAIN_OUTCOME_SKIPPED entry; a skip is not an
 * attempt).  The chain ends with:
 *
 *   PASS         an upstream answer that is final (status not in retry.on, not 401/403, not
 *                a context overflow to act on): relay it as sent (SPEC 3.3)
 *   AUTH_FAILED  the upstream answered 401/403: 502 upstream_auth_failed, no fallback (4.3)
 *   EXHAUSTED    nothing left to try and no answer to relay: 503 upstream_unavailable
 *   DEADLINE     chain.deadline_ms passed, or the next wait would reach it: 504
 *
 * A request that is not safe to repeat (SPEC 4.2) gets one attempt on one step: skips of
 * open breakers still come first, and whatever the attempt's outcome ends the chain.
 *
 * Times are milliseconds since the request was received.  Thread: any (pure).
 */
#ifndef PEP_CHAIN_H
#define PEP_CHAIN_H

#include "pep/common.h"
#include "pep/policy.h"

#define CHAIN_STEP_OVERFLOW (-1) /* the chain's context_overflow step */
#define CHAIN_STEP_NONE (-2)     /* no step (a move that names none) */

/* RFC 9111 1.2.2: a delta-seconds too large to represent counts as 2^31 seconds.
 * chain_parse_retry_after saturates there, so callers may add it to a time safely. */
#define CHAIN_RETRY_AFTER_MAX_MS (2147483648LL * 1000)

enum chain_outcome {
    CHAIN_OUTCOME_STATUS,        /* an HTTP answer arrived: status (and maybe Retry-After) */
    CHAIN_OUTCOME_TIMEOUT,       /* no complete answer within the upstream's timeout */
    CHAIN_OUTCOME_IDLE_TIMEOUT,  /* silence longer than idle_timeout (retry.on `timeout`) */
    CHAIN_OUTCOME_CONNECT_ERROR, /* SPEC 8: refused, reset, closed early, unrelayable head */
    CHAIN_OUTCOME_FAILED,        /* failed in a way retry.on cannot name (answer too large,
                                    cancelled at shutdown): never retried, ends the chain
                                    as EXHAUSTED */
    CHAIN_OUTCOME_SKIPPED,       /* not attempted: the step's breaker was open (SKIP) */
};

/* One entry of a request's history, appended by the caller after each ATTEMPT or SKIP. */
struct chain_attempt {
    int step; /* index into chain.steps, or CHAIN_STEP_OVERFLOW */
    enum chain_outcome outcome;
    int status;             /* CHAIN_OUTCOME_STATUS: the HTTP status; else unused */
    int64_t retry_after_ms; /* STATUS: the answer's Retry-After, parsed with
                               chain_parse_retry_after; -1 when absent or invalid */
    bool context_overflow;  /* STATUS: chain_is_context_overflow() held for the answer */
    int64_t start_ms;       /* when the attempt was sent (a skip: when it was skipped) */
    int64_t end_ms;         /* when its outcome was known; backoff waits count from here */
};

/* What a step's breaker says right now (the caller asks breaker.c for each step). */
struct chain_breaker_view {
    bool admits;             /* a request may be sent now (closed, or a half-open probe) */
    int64_t half_open_in_ms; /* !admits: time until it may half-open (≥ 0) */
};

struct chain_input {
    const struct chain *chain;
    bool repeatable; /* SPEC 4.2: safe to send more than once (upstream.c safe_to_repeat) */
    bool escalated;  /* this request already escalated (once per request) */
    const struct chain_attempt *history; /* in the order things happened; may be NULL if 0 */
    size_t history_len;
    const struct chain_breaker_view *breakers;         /* chain->steps_len views, one per step;
                                                          NULL: every breaker admits */
    const struct chain_breaker_view *overflow_breaker; /* the context_overflow step's;
                                                          NULL: admits */
    int64_t now_ms;
    /* Drawn once per request and passed unchanged on every call: each retry's jitter is
     * derived from (seed, step, retry number), so asking again after a WAIT gives the same
     * wait, and the planner needs no memory of the waits it ordered. */
    uint32_t seed;
};

enum chain_move_kind {
    CHAIN_ATTEMPT,     /* send `step` now, its timeout clamped to remaining_ms */
    CHAIN_WAIT,        /* arm a timer for wait_ms, then ask again (history unchanged) */
    CHAIN_SKIP,        /* `step`'s breaker is open: append a SKIPPED entry, ask again */
    CHAIN_PASS,        /* relay the last answer as sent; `step` served the request */
    CHAIN_AUTH_FAILED, /* 502 upstream_auth_failed; `step` refused pep's credentials */
    CHAIN_EXHAUSTED,   /* 503 upstream_unavailable */
    CHAIN_DEADLINE,    /* 504 deadline_exceeded */
};

struct chain_move {
    enum chain_move_kind kind;
    /* ATTEMPT, SKIP: the step to act on.  WAIT: the step that will be retried.
     * PASS, AUTH_FAILED: the step of the last attempt (PASS: SPEC 8's fallback_step, or
     * "context_overflow" for CHAIN_STEP_OVERFLOW).  EXHAUSTED, DEADLINE: the step of the
     * last attempt made, CHAIN_STEP_NONE if none was. */
    int step;
    const struct upstream *upstream; /* of `step`; NULL with CHAIN_STEP_NONE */
    const char *model;               /* of `step` (Pep-Model, the body's rewrite); NULL:
                                        leave the body's model alone */
    int64_t wait_ms;                 /* WAIT: > 0 */
    int64_t remaining_ms;   /* ATTEMPT: time left before the deadline (> 0), -1: no deadline */
    bool escalate_now;      /* escalate now (the caller then sets chain_input.escalated):
                               the chain has `escalate`, the request has not escalated yet,
                               and either escalate_after_attempts failed attempts were
                               reached (an attempt fails unless its answer is relayed) or
                               the move is EXHAUSTED */
    bool all_skipped;       /* EXHAUSTED: no attempt was made, every step was skipped */
    int64_t retry_after_ms; /* EXHAUSTED: for the 503's Retry-After.  all_skipped: the
                               shortest time until a skipped step's breaker may half-open
                               (SPEC 8); otherwise the last answer's Retry-After; -1 none */
};

/* Plans the next move.  A history the planner cannot have produced (a step out of range,
 * an overflow entry in a chain without context_overflow) gives EXHAUSTED: fail closed. */
void chain_plan(const struct chain_input *in, struct chain_move *out);

/* Whether retry.on lists the entry's outcome (`timeout` covers idle_timeout).  Says
 * nothing of 401/403 or context overflow, which chain_plan checks first. */
bool chain_is_retryable(const struct retry_config *r, const struct chain_attempt *a);

/* Whether an answer is the chain's context overflow: the chain has `context_overflow`,
 * status equals match.status, and one of match.body_contains occurs in body[0..len) (any
 * body when none is listed).  body need not be NUL-terminated; NULL with len 0 is fine. */
bool chain_is_context_overflow(const struct chain *c, int status, const char *body, size_t len);

/* The backoff before retry `retry_n` of a step (1 = the first retry):
 * cap = min(max, base·2^(retry_n−1)), then jitter with `random` (uniform over 32 bits):
 * none → cap; full → uniform in [0, cap]; equal → cap − ⌊cap/2⌋ + uniform in [0, ⌊cap/2⌋]
 * (so within [cap/2, cap]).  Never overflows, whatever retry_n (< 1 counts as 1). */
int64_t chain_backoff_ms(const struct retry_config *r, int retry_n, uint32_t random);

/* Parses a Retry-After value (RFC 9110 10.2.3): delta-seconds, or an HTTP date read
 * with curl_getdate and taken relative to now_unix_ms (a past date gives 0).  Surrounding
 * spaces and tabs are ignored.  Returns milliseconds ≥ 0, at most
 * CHAIN_RETRY_AFTER_MAX_MS, or -1 when value is NULL or not a valid Retry-After. */
int64_t chain_parse_retry_after(const char *value, int64_t now_unix_ms);

/* The definition of `step` (an index or CHAIN_STEP_OVERFLOW), or NULL if out of range. */
const struct chain_step *chain_step_at(const struct chain *c, int step);

/* Fills *out as the one-step chain of a `forward: {upstream: u}` route (SPEC 4.1) with the
 * route's retry, using *step_storage for its step: no allocation, nothing to free; both
 * must outlive *out.  No name, deadline, context overflow or escalation; retry is copied
 * (its on_status still points into the policy). */
void chain_single(struct chain *out, struct chain_step *step_storage, struct upstream *u,
                  const struct retry_config *retry);

#endif
