/*
 * metrics.h — pep's Prometheus metrics (SPEC 7), rendered on the admin listener's /metrics.
 *
 * Families (text format 0.0.4; `other` and `none` are label values explained below):
 *   pep_requests_total{action,decision,code}        counter  audited data-plane decisions
 *   pep_decision_duration_seconds                    histogram receive → decision audited
 *   pep_upstream_attempts_total{upstream,outcome}    counter  outcome: enum metrics_outcome
 *   pep_retries_total{upstream}                      counter  re-attempts (2 attempts = 1)
 *   pep_fallbacks_total{chain,step}                  counter  step: "0".."15",
 *                                                             context_overflow, other
 *   pep_breaker_state{upstream}                      gauge    0 closed, 1 open, 2 half-open
 *   pep_breaker_transitions_total{upstream,to}       counter  to: closed | open | half_open
 *   pep_escalations_total{chain}                     counter
 *   pep_approvals_total{state}                       counter  pending (created) | approved |
 *                                                             denied | used | expired
 *   pep_audit_records_total                          counter  records committed
 *   pep_audit_fsync_duration_seconds                 histogram COMMIT time of a batch (the
 *                                                             fsync with durability full)
 *   pep_audit_batch_records                          histogram records per committed batch
 *
 * Cardinality is bounded by construction: a label value is a policy name registered by
 * metrics_sync, or a value of a fixed set.  The counting functions take names but never
 * create a series: a name sync did not register is counted under `other`, a code outside
 * the fixed table (SPEC 3.3's codes, `ok`, `stream_aborted`) under code `other`.  A
 * request without a route is counted under action `none`.  A policy name that is itself
 * `other` (or, for an action, `none`) is not registered and counts under `other`: the
 * exposition never holds two series with one label set.  Series of names a reload removed
 * stay (counters are cumulative).
 *
 * Which series appear: pep_requests_total, pep_upstream_attempts_total and
 * pep_fallbacks_total (label products) once non-zero; pep_retries_total,
 * pep_breaker_transitions_total and pep_escalations_total for every registered name from
 * 0 (so that rate() sees the first increment), their `other` once non-zero;
 * pep_approvals_total for all five states.  Samples are in a fixed order: families as
 * above, label values sorted bytewise, fixed-set values in the order listed here.
 *
 * Threads: every function is safe from any thread.  The counting functions take no lock:
 * one hash probe in a read-mostly table (insert-only, published by pointer) and one
 * relaxed atomic add.  metrics_sync and metrics_render serialise on one mutex.  Every
 * counting function accepts m == NULL and then does nothing.
 */
#ifndef PEP_METRICS_H
#define PEP_METRICS_H

#include "pep/common.h"
#include "pep/policy.h"

struct metrics;

/* How one upstream attempt ended (label `outcome`, in this order). */
enum metrics_outcome {
    METRICS_OUTCOME_2XX,
    METRICS_OUTCOME_3XX,
    METRICS_OUTCOME_4XX,
    METRICS_OUTCOME_5XX,
    METRICS_OUTCOME_TIMEOUT,
    METRICS_OUTCOME_IDLE_TIMEOUT,
    METRICS_OUTCOME_CONNECT_ERROR,
    METRICS_OUTCOME_STREAM_ABORTED,
    METRICS_OUTCOME_COUNT
};

/* Breaker states, valued as pep_breaker_state reports them. */
enum metrics_breaker {
    METRICS_BREAKER_CLOSED = 0,
    METRICS_BREAKER_OPEN = 1,
    METRICS_BREAKER_HALF_OPEN = 2,
    METRICS_BREAKER_COUNT
};

/* Approval events (label `state`); PENDING counts approvals created. */
enum metrics_approval {
    METRICS_APPROVAL_PENDING,
    METRICS_APPROVAL_APPROVED,
    METRICS_APPROVAL_DENIED,
    METRICS_APPROVAL_USED,
    METRICS_APPROVAL_EXPIRED,
    METRICS_APPROVAL_COUNT
};

/* pep_fallbacks_total steps counted under their index; a step index at or above this is
 * counted under step `other`. */
#define METRICS_MAX_STEPS 16
/* The step passed to metrics_fallback for a chain's context_overflow step. */
#define METRICS_STEP_CONTEXT_OVERFLOW (-1)

/* A new, empty set of metrics (no names registered), or NULL when memory ran out.
 * Free with metrics_free. */
struct metrics *metrics_new(void);
void metrics_free(struct metrics *m);

/* Registers every action, upstream and chain name of p (at start and on each reload,
 * before p serves requests).  Names already registered keep their counts; names p no
 * longer has keep their series.  Returns 0, or PEP_ENOMEM (the names registered before
 * memory ran out stay; the others count as `other`). */
int metrics_sync(struct metrics *m, const struct policy *p);

/* The outcome of an answer with this HTTP status: its class for 200-599, connect_error
 * for any other (SPEC 8: pep cannot relay it faithfully). */
enum metrics_outcome metrics_outcome_of_status(int status);

/* One audited data-plane decision: action NULL or "" (no route) counts as `none`; code is
 * "ok" for an allow, else the SPEC 3.3 code.  duration_us (receive → decision audited)
 * feeds pep_decision_duration_seconds; a negative one is not observed. */
void metrics_decision(struct metrics *m, const char *action, bool allow, const char *code,
                      int64_t duration_us);

/* One attempt sent to upstream (skipped steps are not attempts). */
void metrics_upstream_attempt(struct metrics *m, const char *upstream,
                              enum metrics_outcome outcome);

/* One re-attempt to upstream within a step (the second attempt is the first retry). */
void metrics_retry(struct metrics *m, const char *upstream);

/* The chain moved on to `step` (0-based index, or METRICS_STEP_CONTEXT_OVERFLOW). */
void metrics_fallback(struct metrics *m, const char *chain, int step);

/* upstream's breaker changed to state `to`. */
void metrics_breaker_transition(struct metrics *m, const char *upstream, enum metrics_breaker to);

/* One escalation of a request on chain. */
void metrics_escalation(struct metrics *m, const char *chain);

void metrics_approval(struct metrics *m, enum metrics_approval state);

/* The audit writer's batch observer (struct audit_options.batch_observe, arg = the
 * struct metrics): records committed in one batch and the COMMIT's duration. */
void metrics_audit_batch(void *m, size_t records, int64_t commit_us);

/* pep_breaker_state's source: at each render, foreach(arg, emit, ctx) must call
 * emit(ctx, upstream, state) once per upstream, state 0-2 (enum metrics_breaker), from
 * the calling thread before it returns.  Upstreams metrics_sync did not register, and
 * states outside 0-2, are left out.  NULL foreach: no pep_breaker_state samples. */
typedef void (*metrics_breaker_emit_fn)(void *ctx, const char *upstream, int state);
typedef void (*metrics_breaker_foreach_fn)(void *arg, metrics_breaker_emit_fn emit, void *ctx);
void metrics_set_breaker_source(struct metrics *m, metrics_breaker_foreach_fn foreach, void *arg);

/* The exposition (text format 0.0.4, NUL-terminated); *len (if not NULL) gets its length.
 * Returns a malloc'd string the caller frees, or NULL when memory ran out. */
char *metrics_render(struct metrics *m, size_t *len);

#endif
