/*
 * ratelimit.h — the actions' `rate_limits` (SPEC 2, 3.2 step 6, 8 "Rate limits"): GCRA per
 * key, state in memory, sharded and bounded.
 *
 * GCRA.  A rule allows L = `limit` requests per W = `window` (µs), refilled continuously,
 * with a full burst of L.  A key's whole state is its theoretical arrival time TAT: the
 * moment its quota is full again.  TAT ≤ now means full: exactly what a key never seen has,
 * so such a key can be forgotten at no cost.  With the emission interval T = W / L (what
 * one request costs) and debt = max(TAT − now, 0), a call with cost n:
 *
 *     n ≥ 1 (take)      allowed ⇔ debt + n·T ≤ W       (the classic TAT − now ≤ τ = W − n·T)
 *                       if allowed: TAT = now + debt + n·T; if refused nothing changes
 *     n = 0 (peek)      changes nothing; `allowed` says whether one request would pass now
 *     n ≤ −1 (give back) TAT = now + max(debt − |n|·T, 0): undoes a take whose request a
 *                       later check refused; never below a full quota.  Always allowed.
 *
 *     remaining      = ⌊(W − debt) / T⌋ with debt after the call  (≥ 0; RateLimit-Remaining)
 *     reset_s        = max(1, ⌈debt / 1 s⌉), debt after the call    (RateLimit-Reset)
 *     retry_after_s  = refused: ⌈(debt + n·T − W) / 1 s⌉ (≥ 1; n = 1 for a peek); else 0
 *
 * So from a full quota exactly L requests pass at one instant, then one more every T.
 * T need not be a whole µs (3 per second, 10^9 per second), so nothing is rounded: time is
 * counted in ticks of 1/L µs, in which T is exactly W ticks and the burst L·W ticks, with
 * 128-bit intermediates (L and W up to INT64_MAX).  The TAT is kept as whole µs plus a
 * fraction in ticks.  Only the answer's seconds round, and they round up, so a client that
 * waits retry_after_s is never refused for having waited too little.
 *
 * The store.  ratelimit_take keeps one TAT per key: an opaque byte string the caller
 * builds (action, limit definition, key value), so a reload that keeps a limit keeps its
 * state, and a changed limit starts afresh.  Keys spread over up to 64 shards, one mutex
 * each, by SipHash-2-4 under a per-process random key: agent ids and tenants reach the
 * keys, and an unkeyed hash would let them be chosen to pile into one chain.
 *
 * Bound.  At most max_keys keys (each shard holds its share).  A shard that is full when a
 * key arrives sweeps a clock hand over about RATELIMIT_EVICT_SAMPLE of its keys and drops
 * every idle one it meets (TAT ≤ now: nothing is lost).  When none of them is idle it
 * drops the one among them closest to idle (smallest TAT): that key gets its quota back
 * early, by at most its remaining debt.  This is the price of the bound; the sample
 * (rather than the shard's true minimum) keeps the work under the lock bounded.  It takes
 * a shard whose whole share is busy: max_keys busy keys, far beyond the agents an operator
 * issues.
 * Only an allowed take of a new key stores anything; peeks, give-backs and refusals of
 * unknown keys do not.
 *
 * Memory per key (64-bit): one allocation of 30 + key_len bytes, which glibc's malloc
 * makes 80 for a 40-byte key, plus 8 to 16 bytes of bucket array (load between 0.5 and
 * 1): about 90 bytes a key, 90 MiB at the default bound.  ratelimiter_stats reports the
 * bytes asked of malloc, without its overhead.
 *
 * Threads: ratelimit_gcra is pure (the caller owns the state and passes `now`).  The
 * ratelimiter may be called from any thread; each shard's mutex guards that shard's table.
 */
#ifndef PEP_RATELIMIT_H
#define PEP_RATELIMIT_H

#include "pep/common.h"

#define RATELIMIT_DEFAULT_MAX_KEYS ((size_t)1 << 20)
#define RATELIMIT_MAX_KEY_LEN 512 /* longer keys are PEP_EINVAL */
#define RATELIMIT_EVICT_SAMPLE 32 /* keys a full shard's clock hand looks at per insert */

/* The answer for one call. */
struct ratelimit_verdict {
    bool allowed;
    int64_t limit;         /* the rule's limit (RateLimit-Limit) */
    int64_t remaining;     /* requests that could still pass now, after this call, ≥ 0 */
    int64_t reset_s;       /* whole seconds until the quota is full again, ≥ 1 */
    int64_t retry_after_s; /* refused: whole seconds until the request would pass, ≥ 1; else 0 */
};

/* One key's state: TAT = us + frac / limit µs.  {0, 0} is a full quota (never seen). */
struct ratelimit_tat {
    int64_t us;   /* whole µs, ≥ 0 */
    int64_t frac; /* the rest, in 1/limit µs, in [0, limit) */
};

/* The pure core: applies a call of `cost` (in [−limit, limit]; 1 take, 0 peek, −1 give
 * back) at now_us (≥ 0) under limit ≥ 1 per window_us ≥ 1 (window_us ≤ INT64_MAX − now_us)
 * to *tat, which changes only on an allowed take or a give-back, and fills *out.  A state
 * left by another (limit, window) is still handled safely, only not meaningfully. */
void ratelimit_gcra(struct ratelimit_tat *tat, int64_t limit, int64_t window_us, int64_t cost,
                    int64_t now_us, struct ratelimit_verdict *out);

struct ratelimiter;

/* A store for at most max_keys keys (0: RATELIMIT_DEFAULT_MAX_KEYS).  Returns NULL when
 * memory or randomness (for the hash key) is missing.  Free with ratelimiter_free. */
struct ratelimiter *ratelimiter_new(size_t max_keys);
void ratelimiter_free(struct ratelimiter *rl);

/* ratelimit_gcra on the state stored under key[0..key_len) (at most RATELIMIT_MAX_KEY_LEN
 * bytes; key may be NULL when key_len is 0).  Returns 0, PEP_EINVAL (arguments outside
 * ratelimit_gcra's ranges) or PEP_ENOMEM; on an error *out is a refusal with
 * retry_after_s 1, so a caller that only reads *out fails closed. */
int ratelimit_take(struct ratelimiter *rl, const void *key, size_t key_len, int64_t limit,
                   int64_t window_us, int64_t cost, int64_t now_us, struct ratelimit_verdict *out);

struct ratelimit_stats {
    size_t keys;           /* stored now */
    size_t bytes;          /* asked of malloc: entries, bucket arrays, the ratelimiter itself */
    uint64_t evicted;      /* keys dropped to make room since ratelimiter_new ... */
    uint64_t evicted_busy; /* ... of which not idle: quota handed back early (the bound's price) */
};

void ratelimiter_stats(struct ratelimiter *rl, struct ratelimit_stats *out);

#endif
