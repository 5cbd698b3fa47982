/*
 * webhook.h — the webhook sender: JSON POSTs delivered in the background, retried with
 * backoff (SPEC 3.4 approval `notify`, SPEC 4.4 escalation webhook).
 *
 * A dead or slow receiver never delays the caller: webhook_post serializes the body,
 * appends it to a bounded queue and wakes the sender thread ("pep-webhook"), which owns a
 * libcurl multi handle and does all network I/O.  A delivery is one POST with
 * `Content-Type: application/json` and, when an event kind is given, `X-Pep-Event: <kind>`.
 * A 2xx answer delivers it; anything else (other status, connection error, timeout) is a
 * failed attempt, retried after webhook_backoff_ms (or the receiver's Retry-After when
 * longer, clamped to max_backoff_ms) until max_attempts, then given up.
 *
 * Logging (stderr): the first failed attempt of a delivery, its giving up, bursts of
 * dropped posts and what webhook_stop abandons.  A logged URL has no userinfo, query or
 * fragment (they may hold credentials); the body is never logged.
 *
 * SECURITY: only http and https, no redirects followed, no proxy from the environment, a
 * total and a connect timeout per attempt; the event kind is a restricted word and the URL
 * has no control character or space, so neither can add a header line.
 *
 * Threads: webhook_post and webhook_get_stats from any thread; webhook_start and
 * webhook_stop from one owning thread.  libcurl must be initialised (curl_global_init) and
 * SIGPIPE ignored process-wide before webhook_start (main does both).
 */
#ifndef PEP_WEBHOOK_H
#define PEP_WEBHOOK_H

#include "pep/common.h"

#include <jansson.h>

/* Longest URL and event kind webhook_post accepts. */
#define WEBHOOK_MAX_URL 2048
#define WEBHOOK_MAX_EVENT 64
/* Backoff never exceeds this, whatever max_backoff_ms says (keeps the jitter arithmetic in
 * 64 bits). */
#define WEBHOOK_BACKOFF_CEILING_MS (24LL * 3600 * 1000)

/* Zero fields take the default shown. */
struct webhook_options {
    size_t max_queue;       /* deliveries waiting or in flight; 0 → 1024 */
    int max_attempts;       /* attempts per delivery before giving up; 0 → 8 */
    int64_t base_ms;        /* backoff after the first failed attempt (nominal); 0 → 500 */
    int64_t max_backoff_ms; /* cap on one backoff wait; 0 → 60000 */
    int64_t timeout_ms;     /* total time of one attempt, connect included; 0 → 10000 */
    size_t max_parallel;    /* transfers in flight at once; 0 → 16 */
};

struct webhook_stats {
    uint64_t queued_total; /* posts accepted */
    uint64_t delivered;    /* deliveries answered 2xx */
    uint64_t failed;       /* deliveries given up after max_attempts */
    uint64_t dropped;      /* posts refused: queue full or sender stopping */
    uint64_t attempts;     /* POSTs started, retries included */
    uint64_t timeouts;     /* attempts that ran out of timeout_ms (also failed attempts) */
    size_t pending;        /* accepted deliveries waiting or in flight */
};

struct webhook_sender;

/* Starts the sender thread.  opt may be NULL (all defaults).  Returns 0 and *out, or
 * PEP_EINVAL (a negative option, max_backoff_ms < base_ms), PEP_ENOMEM or PEP_EIO. */
int webhook_start(const struct webhook_options *opt, struct webhook_sender **out,
                  struct pep_err *err);

/* Queues one POST of body to url, with `X-Pep-Event: event` unless event is NULL.  body is
 * stolen in every case (serialized before the call returns, then released).  Returns 0;
 * PEP_EUNAVAILABLE when the queue is full or webhook_stop has begun (counted in dropped);
 * PEP_EINVAL when url is not an http(s) URL of at most WEBHOOK_MAX_URL bytes without
 * space or control characters, when event is not 1-WEBHOOK_MAX_EVENT characters of
 * [A-Za-z0-9._-], or when body is NULL; PEP_ENOMEM.  Any thread; never does network I/O
 * nor waits on a lock held during it.  Not after webhook_stop has returned. */
int webhook_post(struct webhook_sender *s, const char *url, const char *event, json_t *body);

/* A consistent snapshot of the counters.  Any thread. */
void webhook_get_stats(struct webhook_sender *s, struct webhook_stats *out);

/* Refuses new posts, gives deliveries in flight and waiting at most grace_ms (negative
 * counts as 0) to finish — a retry that would start after the grace is not made — then
 * logs how many were abandoned, joins the thread and frees everything.  NULL is a no-op. */
void webhook_stop(struct webhook_sender *s, int64_t grace_ms);

/*
 * The wait after `attempt` (≥ 1) failed attempts, "equal jitter": with
 * cap = min(max_ms, base_ms · 2^(attempt−1), WEBHOOK_BACKOFF_CEILING_MS), the wait is
 * cap − ⌊cap/2⌋ plus a share of ⌊cap/2⌋ set by random_u32 (0 → none, UINT32_MAX → all).
 * Pure; base_ms and max_ms must be positive.
 *
 * Why equal rather than full jitter: full jitter (uniform in [0, cap]) spreads load best
 * when many clients compete for a live server, but it can retry almost at once; with a
 * fixed attempt budget a run of short draws could spend every attempt within a fraction
 * of the nominal schedule and give up on a receiver that is merely restarting.  Equal
 * jitter keeps at least half of each step — max_attempts still buys a known minimum
 * outage tolerance — while still spreading the retries of many deliveries that failed
 * together.
 */
int64_t webhook_backoff_ms(int attempt, int64_t base_ms, int64_t max_ms, uint32_t random_u32);

#endif
