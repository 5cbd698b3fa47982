/*
 * indicators.h — each chain's reliability indicators and objectives (SPEC 2 `objectives`,
 * SPEC 5 and 8 `GET /admin/v1/chains`).
 *
 * Per chain, one sample per request forwarded through it (recorded when its answer's head
 * is sent, pep's own error answers included).  Over two horizons, `since_start` (since
 * the chain's name appeared in the policy, across reloads) and `last_hour`:
 *   requests                  samples recorded
 *   first_attempt_failed      samples with first_attempt_failed
 *   retry_success_rate        (first_attempt_failed ∧ served) / first_attempt_failed
 *   fallback_activation_rate  fallback / requests
 *   escalation_rate           escalated / requests
 *   mean_ms, p95_ms           of latency_ms
 * A rate or latency with a zero denominator is JSON null.
 *
 * last_hour is 60 one-minute buckets (minute = floor(now_ms / 60000)): at now it holds the
 * current minute and the 59 before it, so a sample recorded at t counts until
 * now_ms >= (floor(t / 60000) + 60) * 60000 and not from then on.
 *
 * p95_ms is the nearest-rank 95th percentile (the ceil(0.95 n)-th smallest latency) read
 * from a fixed log-scale histogram: exact below 32 ms; above, 16 buckets per power of two,
 * each reported as lo + width/2, so the answer is within 1/32 (3.125%) of the true value.
 * Latencies of 2^22 ms (~70 min) and more fall in the last bucket (reported as
 * 4128768 ms).  mean_ms is exact (sum / requests), p95_ms an integer.
 *
 * Objectives (struct chain_objectives), judged on last_hour, listed in this order when
 * written: retry_success_rate (met when value >= target), fallback_activation_rate (<=),
 * escalation_rate (<=), mean_latency (mean_ms <= target; target and value in ms).  value
 * and met are null when the indicator is.
 *
 * Threads: all functions are safe from any thread.  A rwlock guards the set of chains
 * (sync writes, record and json read); each chain's counts have their own mutex, held for
 * a few additions per record.  The clock is injected (now_ms, epoch milliseconds).
 */
#ifndef PEP_INDICATORS_H
#define PEP_INDICATORS_H

#include "pep/common.h"
#include "pep/policy.h"

#include <jansson.h>

struct indicators;

/* What one request did on its chain; filled by the forwarder when the chain ends. */
struct indicator_sample {
    /* The first step was skipped (breaker open), or its first attempt ended in an outcome
     * the chain acts on: a retryable one (retry.on: status, timeout, idle_timeout,
     * connect_error) or a context overflow.  An answer the chain ends on at once (one not
     * in retry.on, or 401/403) is not a failure here: nothing could have recovered it. */
    bool first_attempt_failed;
    /* The chain ended with an upstream answer pep relayed (not pep's own 502, 503, 504). */
    bool served;
    /* Served by a step after the first, context_overflow included (implies served). */
    bool fallback;
    /* The request escalated (after_attempts or exhaustion). */
    bool escalated;
    /* Receipt of the request → the answer's head sent to the agent. */
    int64_t latency_ms;
};

/* A new, empty set (no chains), or NULL when memory ran out.  Free with indicators_free. */
struct indicators *indicators_new(void);
void indicators_free(struct indicators *ind);

/* Makes the set of chains p's: a chain whose name p still has keeps its counts, a new
 * name starts empty, one p no longer has is dropped.  Call at start and on each reload.
 * p's chain names are unique (policy_load guarantees it).  Returns 0, or PEP_ENOMEM
 * (PEP_EINVAL for a chain without a name) and then the set is unchanged. */
int indicators_sync(struct indicators *ind, const struct policy *p);

/* Records one request forwarded through chain at now_ms.  A sample with fallback but not
 * served counts as not fallback.  A sample older than the last hour (now_ms going
 * backwards) counts in since_start only.  Returns 0, or PEP_ENOTFOUND when sync never
 * registered chain (nothing is recorded). */
int indicators_record(struct indicators *ind, const char *chain, const struct indicator_sample *s,
                      int64_t now_ms);

/*
 * {"chains":[{"name", "since_start": I, "last_hour": I, "objectives": [{"indicator",
 * "target", "value", "met"}]}]} with I = {"requests", "first_attempt_failed",
 * "retry_success_rate", "fallback_activation_rate", "escalation_rate", "mean_ms",
 * "p95_ms"}: p's chains in p's order (a chain sync has not seen shows zeros).  Returns a
 * new reference the caller owns, or NULL when memory ran out.
 *
 * Rates and mean_ms are JSON reals; jansson dumps them with 17 significant digits
 * (0.95 → 0.94999999999999996) unless the dump passes JSON_REAL_PRECISION(15).
 */
json_t *indicators_json(struct indicators *ind, const struct policy *p, int64_t now_ms);

#endif
