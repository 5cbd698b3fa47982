/*
 * unauth.h — server.unauthenticated_limit (SPEC 3.2 step 2): refusals of requests without
 * a valid credential, counted per client address.
 *
 * Every refusal is audited, so a client holding no credential could otherwise grow the
 * audit store at the deny rate.  Per address, windows are fixed: the first refusal opens a
 * window of `window_ms`; its first `limit` refusals are answered and audited as usual; the
 * ones after are *limited*: answered 429 at once and only counted.  When the window has
 * ended, its count is handed out once (unauth_flush) for one `kind: system` record.
 *
 * The table is bounded (UNAUTH_MAX_SOURCES addresses with an open window); when it is
 * full, further addresses share one window under the source "other", so an attacker with
 * many addresses is still limited, never given more memory.
 *
 * Pure (DESIGN rule 1): time is a parameter.  Threads: any; one lock (the table's).
 */
#ifndef PEP_UNAUTH_H
#define PEP_UNAUTH_H

#include "pep/common.h"

#define UNAUTH_MAX_SOURCES 4096
#define UNAUTH_SOURCE_LEN 48 /* an IPv6 address as text, with its NUL */

struct unauth_limiter;

struct unauth_limiter *unauth_new(void);
void unauth_free(struct unauth_limiter *l);

/* What unauth_refused says of one refusal. */
struct unauth_verdict {
    bool limited;          /* answer 429 and count it, instead of answering and auditing */
    bool first_limited;    /* the window's first limited refusal: worth a log line */
    int64_t retry_after_s; /* when limited: whole seconds until the window ends, ≥ 1 */
};

/* Counts one refusal from `source` (an address as text) at now_us under limit per
 * window_ms (both > 0). */
struct unauth_verdict unauth_refused(struct unauth_limiter *l, const char *source, int64_t limit,
                                     int64_t window_ms, int64_t now_us);

/* One ended window with limited refusals. */
struct unauth_window {
    char source[UNAUTH_SOURCE_LEN];
    int64_t count; /* limited refusals in the window (≥ 1) */
    int64_t started_us, ended_us;
};

/* Removes every window that ended by now_us (all of them when `all`: shutdown) and calls
 * emit for each that limited anything, outside the lock.  Returns how many were emitted. */
size_t unauth_flush(struct unauth_limiter *l, int64_t now_us, bool all,
                    void (*emit)(void *arg, const struct unauth_window *w), void *arg);

#endif
