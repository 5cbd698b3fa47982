/*
 * breaker.h — circuit breakers, one per upstream (SPEC 2 `breaker`, 4.4, 5, 7, 8).
 *
 * States closed → open → half_open → closed.
 *   closed     every request is admitted (ALLOW).  Each SUCCESS and FAILURE is counted in
 *              a rolling window; after each, it opens when failures ≥ failure_threshold, or
 *              when requests ≥ min_requests and failures / requests ≥ failure_rate.
 *   open       every request is refused (DENY, with the ms until it may half-open) for
 *              open_for.  The move to half_open is made lazily, by the first admit (or
 *              snapshot) that finds open_for passed; its `since` is then the moment open_for
 *              ran out, not the moment it was noticed.
 *   half_open  at most half_open_probes requests are in flight at once (PROBE); the rest
 *              are refused.  success_threshold probe successes in a row close it (and clear
 *              the window: it starts afresh); one probe failure re-opens it for a fresh
 *              open_for.
 *
 * Results.  The caller classifies each attempt (breaker_classify): SUCCESS (an answer
 * below 400), FAILURE (timeout, idle timeout, connect error, 5xx, and 429 with
 * count_429), NEUTRAL (any other 4xx, and 429 without count_429: the upstream answered
 * and judged the request, which says nothing of its health), ABANDONED (the request was
 * cancelled before its outcome).  NEUTRAL and ABANDONED are not counted at all, not even
 * as requests: an agent chooses how many 4xx it provokes, and counting them in the
 * denominator would let it dilute the failure rate and hold a failing upstream's breaker
 * closed.  A NEUTRAL or ABANDONED probe only gives its slot back; it neither extends nor
 * breaks the run of successes.  Refused (DENY) requests are never counted.
 *
 * Tickets.  admit hands out a ticket that the caller gives back to record, exactly once.
 * A PROBE ticket belongs to one half-open period: if the breaker moved on meanwhile (a
 * sibling probe failed, a reload reset it), the probe's result is counted in the window
 * like any other result but decides nothing and frees no slot of the new period.  Results
 * of ALLOW tickets that arrive while it is open or half-open are counted, decide nothing.
 *
 * The rolling window is a ring of BREAKER_BUCKETS buckets of w = ⌈window / BUCKETS⌉ ms,
 * each stamped with its start (now − now mod w); a bucket counts while now < start +
 * window.  So a result counts for more than window − w and at most window after it
 * happened (window 30s: between 27 and 30 s).  Memory is constant, and empty intervals
 * cost nothing.  After a reload changes the window, buckets are judged against the new
 * window; one that lengthens it may drop counts older than the old window early (the ring
 * holds BREAKER_BUCKETS buckets, not more).
 *
 * The registry (struct breakers) holds one breaker per upstream name, outside the policy
 * snapshot (DESIGN rule 4): breakers_sync after a (re)load gives each the upstream's
 * current config and keeps its state and counts.  Decisions made:
 *   - An upstream without `breaker:` has an inert breaker: admits everything, records
 *     nothing, listed with "breaker": false, state closed.  Removing `breaker:` from an
 *     upstream resets its state (reported as a transition to closed if it was not closed);
 *     adding it back starts closed with empty counts.
 *   - An upstream removed from the policy keeps its breaker, state and config (requests
 *     still running on the old snapshot keep using it) but leaves the listings; re-added
 *     under the same name, it takes the new config and carries on from the state it had.
 *     Breakers are freed only by breakers_free, so handles never dangle, and memory grows
 *     only with the number of distinct upstream names ever configured.
 *
 * Clocks.  Nothing here reads a clock (DESIGN rule 1): now_ms is a monotonic ms clock
 * (pep_mono_us() / 1000) passed by the caller; breakers_json also takes the wall time, to
 * turn `since` into RFC 3339.  Threads may pass slightly stale now_ms values (read before
 * the lock); the state tolerates time running backwards by a little.
 *
 * Threads.  The core functions (breaker_core_*) are pure and not synchronised: the caller
 * owns the state.  Every registry function may be called from any thread: a read-write
 * lock guards the name map and the listing, and each breaker has its own mutex, so
 * different upstreams do not contend.  on_transition is called on the thread that caused
 * the transition, after every lock of this module is released: it may call back into this
 * module, take its own locks, log, count and audit.  Two transitions of one breaker made by
 * different threads at nearly the same moment may be reported in either order; each call
 * names both ends (from, to).
 */
#ifndef PEP_BREAKER_H
#define PEP_BREAKER_H

#include "pep/common.h"
#include "pep/policy.h"

#include <jansson.h>

#define BREAKER_BUCKETS 10

enum breaker_state_kind { BREAKER_CLOSED = 0, BREAKER_OPEN = 1, BREAKER_HALF_OPEN = 2 };
/* The values are pep_breaker_state's gauge values (SPEC 7). */

/* "closed", "open", "half_open" (SPEC 8; also the `to` label of transitions). */
const char *breaker_state_name(enum breaker_state_kind kind);

enum breaker_admission {
    BREAKER_ALLOW, /* closed (or no breaker): send it */
    BREAKER_PROBE, /* half-open: send it; a probe slot is held until it is recorded */
    BREAKER_DENY,  /* skip the step without an attempt (audited as skipped) */
};

enum breaker_result { BREAKER_SUCCESS, BREAKER_FAILURE, BREAKER_NEUTRAL, BREAKER_ABANDONED };

enum breaker_transition {
    BREAKER_UNCHANGED,
    BREAKER_TO_OPEN, /* from closed, or from half_open (a probe failed) */
    BREAKER_TO_HALF_OPEN,
    BREAKER_TO_CLOSED,
};

/* What admit gave one request; hand it back to record once. */
struct breaker_ticket {
    enum breaker_admission admission;
    uint32_t period;         /* the state's period when admitted (see struct breaker_state) */
    int64_t half_open_in_ms; /* DENY: ms until it may half-open (≥ 1), or 0 when it is
                                half-open already and every probe slot is taken */
};

/* One bucket of the rolling window. */
struct breaker_bucket {
    int64_t start_ms; /* aligned to the bucket width in force when it was started */
    int64_t requests; /* SUCCESS + FAILURE results */
    int64_t failures;
};

/* A breaker's whole state.  breaker_core_init makes a closed breaker with no counts. */
struct breaker_state {
    enum breaker_state_kind kind;
    int64_t since_ms;         /* when kind was entered */
    uint32_t period;          /* +1 at every transition and reset: a PROBE ticket counts
                                 only within its own period (wraps harmlessly) */
    int64_t probes_in_flight; /* HALF_OPEN: PROBE tickets not yet recorded, ≤ probes cap */
    int64_t probe_successes;  /* HALF_OPEN: consecutive probe successes this period */
    unsigned head;            /* ring index of the newest bucket */
    struct breaker_bucket ring[BREAKER_BUCKETS];
};

/* ---- pure core: the caller owns the state and passes the config and now ------------- */

/* A closed breaker with empty counts, since now_ms; period continues from *st's when
 * keep_period (a reset: older tickets must not match), else starts at 0. */
void breaker_core_init(struct breaker_state *st, int64_t now_ms, bool keep_period);

/* Decides one request at now_ms and fills *ticket; makes the lazy open → half_open move
 * when open_for has passed.  Returns BREAKER_TO_HALF_OPEN or BREAKER_UNCHANGED. */
enum breaker_transition breaker_core_admit(struct breaker_state *st,
                                           const struct breaker_config *cfg, int64_t now_ms,
                                           struct breaker_ticket *ticket);

/* Records the outcome of a request admitted with *ticket (not DENY).  Returns the
 * transition it caused: TO_OPEN, TO_CLOSED or UNCHANGED. */
enum breaker_transition breaker_core_record(struct breaker_state *st,
                                            const struct breaker_config *cfg,
                                            const struct breaker_ticket *ticket,
                                            enum breaker_result result, int64_t now_ms);

/* The lazy open → half_open move alone, for a look at the state (snapshots). */
enum breaker_transition breaker_core_observe(struct breaker_state *st,
                                             const struct breaker_config *cfg, int64_t now_ms);

/* Requests and failures in the window at now_ms. */
void breaker_core_counts(const struct breaker_state *st, const struct breaker_config *cfg,
                         int64_t now_ms, int64_t *requests, int64_t *failures);

/* Classifies an attempt: transport_error is a timeout, idle timeout or connect error
 * (status is then ignored); otherwise status is the upstream's HTTP status.  cfg may be
 * NULL (429 is then neutral). */
enum breaker_result breaker_classify(const struct breaker_config *cfg, bool transport_error,
                                     int status);

/* ---- registry: one breaker per upstream name, thread-safe --------------------------- */

struct breakers;
struct breaker; /* a handle: valid until breakers_free, never freed by a reload */

typedef void (*breaker_transition_fn)(void *arg, const char *upstream, enum breaker_state_kind from,
                                      enum breaker_state_kind to, int64_t now_ms);

/* An empty registry.  on_transition (may be NULL) is called once per transition, with no
 * lock of this module held; arg is passed to it.  NULL when memory is missing.  Free with
 * breakers_free once no thread uses it or any handle from it. */
struct breakers *breakers_new(breaker_transition_fn on_transition, void *arg);
void breakers_free(struct breakers *bs);

/* Makes the registry match policy p, loaded at now_ms: creates breakers for new upstream
 * names (closed, since now_ms), gives every upstream its current config (state and counts
 * kept), takes removed upstreams out of the listings (state kept).  Returns 0 or
 * PEP_ENOMEM; on PEP_ENOMEM configs and listings are as before.  Call it before the
 * snapshot p is published, so every request on p finds its upstreams. */
int breakers_sync(struct breakers *bs, const struct policy *p, int64_t now_ms);

/* The handle of upstream `name`, or NULL for a name never synced.  Take it once per
 * request (or step) and use it for admit and record. */
struct breaker *breakers_get(struct breakers *bs, const char *name);

/* breaker_core_admit under the breaker's lock.  Without a `breaker:` (or with b NULL),
 * always ALLOW.  Returns ticket->admission. */
enum breaker_admission breaker_admit(struct breaker *b, int64_t now_ms,
                                     struct breaker_ticket *ticket);

/* breaker_core_record under the breaker's lock; every ticket that admit did not DENY must
 * be recorded once, as BREAKER_ABANDONED when the request was cancelled (or pep stopped)
 * before its outcome was known, else a probe slot leaks.  DENY tickets may be recorded
 * too: they are ignored.  No-op without a `breaker:` (or with b NULL). */
void breaker_record(struct breaker *b, const struct breaker_ticket *ticket,
                    enum breaker_result result, int64_t now_ms);

/* A copy of the breaker's state and whether it has a `breaker:` (tests, diagnostics). */
void breaker_peek(struct breaker *b, struct breaker_state *out, bool *configured);

/* GET /admin/v1/upstreams: {"upstreams":[{"name","state","since","requests","failures",
 * "breaker"}]} for the upstreams of the last synced policy, in its order.  since is RFC
 * 3339 UTC (µs), derived from now_ms and the wall clock now_wall_us; requests and failures
 * are those in the window now; breaker is false for an upstream without `breaker:`
 * (state closed, counts 0, since: when its `breaker:` went, or it was first synced).  Makes due
 * open → half_open moves (and reports them). Returns a new reference the caller owns, or NULL when
 * memory is missing. */
json_t *breakers_json(struct breakers *bs, int64_t now_ms, int64_t now_wall_us);

/* Calls fn for each listed upstream, in policy order, with no lock held (for the
 * pep_breaker_state gauge); configured is false without `breaker:` (state closed).
 * Makes due open → half_open moves (and reports them).  Returns 0 or PEP_ENOMEM (fn not
 * called). */
int breakers_foreach(struct breakers *bs, int64_t now_ms,
                     void (*fn)(void *arg, const char *name, enum breaker_state_kind state,
                                bool configured),
                     void *arg);

#endif
