/*
 * webhook.c — the webhook sender thread (see webhook.h).
 *
 * Invariant: an accepted delivery is in exactly one place — the submit queue (under
 * lock), the thread's waiting list or its in-flight list — until the thread delivers,
 * gives up or abandons it and frees it.  stats.pending counts all three places, so
 * max_queue bounds the memory held whatever the receivers do.
 *
 * The lock is held only to move pointers and counters, never across a libcurl call that
 * can touch the network, so webhook_post never waits behind I/O.
 *
 * Why curl_multi_poll rather than forward.c's epoll + curl_multi_socket_action: a sender
 * has at most max_parallel transfers, so polling all of them each turn is cheap, and
 * curl_multi_poll's timeout plus curl_multi_wakeup give the backoff timers and the
 * wake-ups with no eventfd or socket bookkeeping of our own.
 *
 * Only the first failed attempt and the giving up of a delivery are logged: a dead
 * receiver with a full queue would otherwise write max_queue × max_attempts lines.
 */
#include "pep/webhook.h"
#include "pep/util.h"

#include <assert.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Longest poll when no timer is due: wake-ups are reliable, this only bounds the cost of
 * one that failed (curl_multi_wakeup can return an error we cannot report from post). */
#define WEBHOOK_IDLE_WAIT_MS 1000
/* A connection that takes longer than this to open is not going to answer in time. */
#define WEBHOOK_CONNECT_TIMEOUT_MS 5000
/* webhook_stop's grace is clamped to this (keeps the deadline arithmetic in range). */
#define WEBHOOK_MAX_GRACE_MS (24LL * 3600 * 1000)

struct webhook_delivery {
    struct webhook_delivery *next; /* in the submit queue, waiting or in-flight list */
    char *body;                    /* compact JSON; never logged */
    size_t body_len;
    const char *event;          /* X-Pep-Event value inside url's allocation, or NULL */
    struct curl_slist *headers; /* built at the first attempt; libcurl does not copy it */
    CURL *easy;                 /* while in flight */
    int attempts;               /* started so far */
    int64_t due_us;             /* monotonic time the next attempt may start */
    char url[];                 /* then the event kind, after url's NUL */
};

struct webhook_sender {
    struct webhook_options opt; /* defaults filled in; immutable */
    pthread_t thread;
    CURLM *multi; /* sender thread only, except curl_multi_wakeup (thread-safe) */

    pthread_mutex_t lock; /* guards the fields up to the next comment */
    struct webhook_delivery *queue_head, *queue_tail;
    struct webhook_stats stats;
    bool stopping;
    int64_t stop_deadline_us; /* monotonic; set with stopping */
    bool dropping;            /* the last post was refused: a burst of drops is on */
    bool drop_unlogged;       /* a burst began and the thread has not logged it */

    /* sender thread only */
    struct webhook_delivery *waiting;      /* accepted, not in flight; oldest first */
    struct webhook_delivery **waiting_end; /* &last->next, or &waiting when empty */
    struct webhook_delivery *in_flight;
    size_t in_flight_len;
    bool draining;             /* the thread has seen stopping */
    int64_t drain_deadline_us; /* stop_deadline_us, copied when draining began */
    size_t abandoned;          /* dropped during the drain because a retry came too late */
};

int64_t webhook_backoff_ms(int attempt, int64_t base_ms, int64_t max_ms, uint32_t random_u32) {
    assert(attempt >= 1 && base_ms > 0 && max_ms > 0);
    if (max_ms > WEBHOOK_BACKOFF_CEILING_MS) max_ms = WEBHOOK_BACKOFF_CEILING_MS;
    int64_t cap = base_ms;
    /* stops once cap ≥ max_ms, so cap · 2 stays below 2 · ceiling: no overflow */
    for (int i = 1; i < attempt && cap < max_ms; i++)
        cap *= 2;
    if (cap > max_ms) cap = max_ms;
    int64_t half = cap / 2;
    /* multiply-shift maps random_u32 onto [0, half] without modulo bias; half + 1 ≤ 2^32 */
    uint64_t jitter = ((uint64_t)random_u32 * (uint64_t)(half + 1)) >> 32;
    return cap - half + (int64_t)jitter;
}

/* ---- webhook_post's checks (caller's thread: no I/O) --------------------------------- */

static bool url_acceptable(const char *url) {
    if (strncasecmp(url, "http://", 7) != 0 && strncasecmp(url, "https://", 8) != 0) return false;
    size_t n = 0;
    /* SECURITY: a CR/LF or space would let the URL end the request line early and start a
     * header line of its own. */
    for (const unsigned char *p = (const unsigned char *)url; *p; p++, n++)
        if (*p <= 0x20 || *p == 0x7f || n >= WEBHOOK_MAX_URL) return false;
    return true;
}

static bool event_acceptable(const char *event) {
    size_t n = strlen(event);
    if (n == 0 || n > WEBHOOK_MAX_EVENT) return false;
    /* SECURITY: the kind becomes a header value; nothing in it may end the line. */
    return strspn(event, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

/* ---- the thread's bookkeeping ---------------------------------------------------------- */

static void delivery_free(struct webhook_delivery *d) {
    free(d->body);
    curl_slist_free_all(d->headers);
    free(d);
}

static void waiting_append(struct webhook_sender *s, struct webhook_delivery *d) {
    d->next = NULL;
    *s->waiting_end = d;
    s->waiting_end = &d->next;
}

/* Unlinks *pp (a link of the waiting list) and returns the delivery it pointed to. */
static struct webhook_delivery *waiting_take(struct webhook_sender *s,
                                             struct webhook_delivery **pp) {
    struct webhook_delivery *d = *pp;
    *pp = d->next;
    if (s->waiting_end == &d->next) s->waiting_end = pp;
    d->next = NULL;
    return d;
}

/* Ends a delivery for good: counts it (counter may be NULL) and frees it. */
static void delivery_retire(struct webhook_sender *s, struct webhook_delivery *d,
                            uint64_t *counter) {
    pthread_mutex_lock(&s->lock);
    if (counter) (*counter)++;
    s->stats.pending--;
    pthread_mutex_unlock(&s->lock);
    delivery_free(d);
}

/* One stderr line about d, its URL stripped of userinfo, query and fragment. */
static void delivery_log(const struct webhook_delivery *d, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void delivery_log(const struct webhook_delivery *d, const char *fmt, ...) {
    char *shown = NULL;
    CURLU *u = curl_url();
    if (u && curl_url_set(u, CURLUPART_URL, d->url, 0) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_USER, NULL, 0) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_OPTIONS, NULL, 0) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_QUERY, NULL, 0) == CURLUE_OK &&
        curl_url_set(u, CURLUPART_FRAGMENT, NULL, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_URL, &shown, 0) != CURLUE_OK)
        shown = NULL;
    curl_url_cleanup(u);
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "pep: webhook: POST %s (%s): %s\n", shown ? shown : "(unparseable URL)",
            d->event ? d->event : "no event", msg);
    curl_free(shown);
}

static uint32_t jitter_random(void) {
    uint32_t r;
    /* jitter only spreads load: the clock's low bits do if the CSPRNG ever fails */
    if (pep_random_bytes(&r, sizeof r) != 0) r = (uint32_t)pep_mono_us();
    return r;
}

/*
 * A failed attempt: gives up after max_attempts (or at once when retrying cannot help),
 * else schedules the next one.  During the drain, a retry that would start after the
 * deadline is abandoned now, so that webhook_stop returns as soon as nothing can finish.
 */
static void attempt_failed(struct webhook_sender *s, struct webhook_delivery *d, const char *why,
                           bool permanent, int64_t retry_after_ms) {
    if (permanent || d->attempts >= s->opt.max_attempts) {
        /* logged before it is counted: whoever sees `failed` move can read the line */
        delivery_log(d, "gave up after %d attempt%s: %s", d->attempts, d->attempts == 1 ? "" : "s",
                     why);
        delivery_retire(s, d, &s->stats.failed);
        return;
    }
    int64_t wait_ms =
        webhook_backoff_ms(d->attempts, s->opt.base_ms, s->opt.max_backoff_ms, jitter_random());
    if (retry_after_ms > wait_ms)
        wait_ms = retry_after_ms < s->opt.max_backoff_ms ? retry_after_ms : s->opt.max_backoff_ms;
    d->due_us = pep_mono_us() + wait_ms * 1000;
    if (s->draining && d->due_us >= s->drain_deadline_us) {
        s->abandoned++;
        delivery_retire(s, d, NULL);
        return;
    }
    if (d->attempts == 1)
        delivery_log(d,
                     "attempt 1 of %d failed: %s; retrying in %lld ms (later failures are logged "
                     "only on giving up)",
                     s->opt.max_attempts, why, (long long)wait_ms);
    waiting_append(s, d);
}

static size_t discard_body(char *data, size_t size, size_t nmemb, void *arg) {
    (void)data;
    (void)arg;
    return size * nmemb;
}

static void attempt_start(struct webhook_sender *s, struct webhook_delivery *d) {
    d->attempts++;
    pthread_mutex_lock(&s->lock);
    s->stats.attempts++;
    pthread_mutex_unlock(&s->lock);
    if (!d->headers) {
        struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
        /* no 100-continue round trip (libcurl asks for one above 1 KiB of body) */
        struct curl_slist *h2 = h ? curl_slist_append(h, "Expect:") : NULL;
        char line[sizeof "X-Pep-Event: " + WEBHOOK_MAX_EVENT];
        if (h2 && d->event) {
            snprintf(line, sizeof line, "X-Pep-Event: %s", d->event);
            h2 = curl_slist_append(h2, line);
        }
        if (h2)
            d->headers = h2;
        else
            curl_slist_free_all(h);
    }
    CURL *e = d->headers ? curl_easy_init() : NULL;
    CURLcode rc = e ? CURLE_OK : CURLE_OUT_OF_MEMORY;
#define SET(opt, val)                                                                              \
    if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val)
    SET(CURLOPT_URL, (const char *)d->url); /* curl's type check cannot size a char[] */
    SET(CURLOPT_PRIVATE, d);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 0L);
    SET(CURLOPT_PROXY, ""); /* as in forward.c: never a proxy from the environment */
    SET(CURLOPT_TIMEOUT_MS, (long)s->opt.timeout_ms);
    SET(CURLOPT_CONNECTTIMEOUT_MS,
        (long)(s->opt.timeout_ms < WEBHOOK_CONNECT_TIMEOUT_MS ? s->opt.timeout_ms
                                                              : WEBHOOK_CONNECT_TIMEOUT_MS));
    SET(CURLOPT_HTTPHEADER, d->headers);
    SET(CURLOPT_POSTFIELDS, d->body);
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)d->body_len);
    SET(CURLOPT_WRITEFUNCTION, discard_body); /* the default would write it to stdout */
#undef SET
    if (rc == CURLE_OK && curl_multi_add_handle(s->multi, e) != CURLM_OK) rc = CURLE_FAILED_INIT;
    if (rc != CURLE_OK) {
        curl_easy_cleanup(e);
        attempt_failed(s, d, curl_easy_strerror(rc), false, 0);
        return;
    }
    d->easy = e;
    d->next = s->in_flight;
    s->in_flight = d;
    s->in_flight_len++;
}

/* Takes d out of the multi handle and the in-flight list. */
static void attempt_detach(struct webhook_sender *s, struct webhook_delivery *d) {
    for (struct webhook_delivery **pp = &s->in_flight; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    }
    s->in_flight_len--;
    curl_multi_remove_handle(s->multi, d->easy);
    curl_easy_cleanup(d->easy);
    d->easy = NULL;
    d->next = NULL;
}

/* Settles every attempt libcurl reports finished. */
static void reap(struct webhook_sender *s) {
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(s->multi, &left))) {
        if (msg->msg != CURLMSG_DONE) continue;
        /* msg dies with curl_multi_remove_handle: read it all first */
        CURL *e = msg->easy_handle;
        CURLcode result = msg->data.result;
        struct webhook_delivery *d = NULL;
        long status = 0;
        curl_off_t retry_after_s = 0;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&d);
        if (result == CURLE_OK) {
            curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
            curl_easy_getinfo(e, CURLINFO_RETRY_AFTER, &retry_after_s);
        }
        attempt_detach(s, d);
        if (result == CURLE_OK && status >= 200 && status <= 299) {
            delivery_retire(s, d, &s->stats.delivered);
            continue;
        }
        if (result == CURLE_OPERATION_TIMEDOUT) {
            pthread_mutex_lock(&s->lock);
            s->stats.timeouts++;
            pthread_mutex_unlock(&s->lock);
        }
        char why[64];
        if (result == CURLE_OK)
            snprintf(why, sizeof why, "HTTP %ld", status);
        else
            snprintf(why, sizeof why, "%s", curl_easy_strerror(result));
        /* PITFALLS: Retry-After may be an HTTP date decades away; attempt_failed clamps it */
        int64_t retry_after_ms = retry_after_s > WEBHOOK_BACKOFF_CEILING_MS / 1000
                                     ? WEBHOOK_BACKOFF_CEILING_MS
                                     : (int64_t)retry_after_s * 1000;
        /* a URL libcurl cannot use will not become usable by asking again */
        bool permanent = result == CURLE_URL_MALFORMAT || result == CURLE_UNSUPPORTED_PROTOCOL;
        attempt_failed(s, d, why, permanent, retry_after_ms);
    }
}

/* Starts waiting deliveries that are due, oldest first, while slots are free. */
static void start_due(struct webhook_sender *s) {
    int64_t now = pep_mono_us();
    for (struct webhook_delivery **pp = &s->waiting;
         *pp && s->in_flight_len < s->opt.max_parallel;) {
        if ((*pp)->due_us > now)
            pp = &(*pp)->next;
        else
            attempt_start(s, waiting_take(s, pp)); /* a failure re-appends it at the end */
    }
}

/* How long the thread may sleep: until the next due delivery that has a slot, the drain
 * deadline, or WEBHOOK_IDLE_WAIT_MS (libcurl shortens it for its own timers). */
static int wait_ms(const struct webhook_sender *s) {
    int64_t now = pep_mono_us(), wait_us = WEBHOOK_IDLE_WAIT_MS * 1000LL;
    if (s->in_flight_len < s->opt.max_parallel)
        for (const struct webhook_delivery *d = s->waiting; d; d = d->next)
            if (d->due_us - now < wait_us) wait_us = d->due_us - now;
    if (s->draining && s->drain_deadline_us - now < wait_us) wait_us = s->drain_deadline_us - now;
    return wait_us <= 0 ? 0 : (int)((wait_us + 999) / 1000);
}

/* The drain began: abandon what is scheduled after the deadline. */
static void drain_begin(struct webhook_sender *s) {
    for (struct webhook_delivery **pp = &s->waiting; *pp;) {
        if ((*pp)->due_us >= s->drain_deadline_us) {
            s->abandoned++;
            delivery_retire(s, waiting_take(s, pp), NULL);
        } else {
            pp = &(*pp)->next;
        }
    }
}

/* The drain ended: whatever is left is abandoned. */
static void abandon_rest(struct webhook_sender *s) {
    size_t in_flight = s->in_flight_len, n = s->abandoned + in_flight;
    while (s->in_flight) {
        struct webhook_delivery *d = s->in_flight;
        attempt_detach(s, d);
        delivery_retire(s, d, NULL);
    }
    while (s->waiting) {
        n++;
        delivery_retire(s, waiting_take(s, &s->waiting), NULL);
    }
    if (n > 0)
        fprintf(stderr, "pep: webhook: stopped: %zu deliver%s abandoned (%zu in flight)\n", n,
                n == 1 ? "y" : "ies", in_flight);
}

static void *webhook_main(void *arg) {
    struct webhook_sender *s = arg;
    pthread_setname_np(pthread_self(), "pep-webhook");
    for (;;) {
        pthread_mutex_lock(&s->lock);
        struct webhook_delivery *batch = s->queue_head;
        s->queue_head = s->queue_tail = NULL;
        bool log_drop = s->drop_unlogged;
        s->drop_unlogged = false;
        size_t pending = s->stats.pending;
        bool drain_now = s->stopping && !s->draining;
        int64_t deadline_us = s->stop_deadline_us;
        pthread_mutex_unlock(&s->lock);

        if (log_drop)
            fprintf(stderr,
                    "pep: webhook: queue full (%zu deliveries pending): dropping new ones until "
                    "it drains\n",
                    pending);
        while (batch) {
            struct webhook_delivery *next = batch->next;
            batch->due_us = 0; /* due now */
            waiting_append(s, batch);
            batch = next;
        }
        if (drain_now) {
            /* stopping is set once and posts are refused from then on, so the batch just
             * taken was the last one: nothing is left in the queue when the thread ends */
            s->draining = true;
            s->drain_deadline_us = deadline_us;
            drain_begin(s);
        }
        if (s->draining &&
            (pep_mono_us() >= s->drain_deadline_us || (!s->waiting && !s->in_flight)))
            break;

        start_due(s);
        int running;
        curl_multi_perform(s->multi, &running);
        reap(s);
        if (s->draining && !s->waiting && !s->in_flight) break;
        curl_multi_poll(s->multi, NULL, 0, wait_ms(s), NULL);
    }
    abandon_rest(s);
    return NULL;
}

/* ---- the interface ---------------------------------------------------------------------- */

int webhook_start(const struct webhook_options *opt, struct webhook_sender **out,
                  struct pep_err *err) {
    struct webhook_options o = opt ? *opt : (struct webhook_options){0};
    if (o.max_attempts < 0 || o.base_ms < 0 || o.max_backoff_ms < 0 || o.timeout_ms < 0)
        return pep_err_set(err, PEP_EINVAL, "webhook: negative option");
    if (!o.max_queue) o.max_queue = 1024;
    if (!o.max_attempts) o.max_attempts = 8;
    if (!o.base_ms) o.base_ms = 500;
    if (!o.max_backoff_ms) o.max_backoff_ms = 60000;
    if (!o.timeout_ms) o.timeout_ms = 10000;
    if (!o.max_parallel) o.max_parallel = 16;
    if (o.max_backoff_ms < o.base_ms)
        return pep_err_set(err, PEP_EINVAL, "webhook: max_backoff_ms %lld < base_ms %lld",
                           (long long)o.max_backoff_ms, (long long)o.base_ms);
    struct webhook_sender *s = calloc(1, sizeof *s);
    if (!s) return pep_err_set(err, PEP_ENOMEM, "webhook: out of memory");
    s->opt = o;
    s->waiting_end = &s->waiting;
    pthread_mutex_init(&s->lock, NULL);
    s->multi = curl_multi_init();
    if (!s->multi) {
        pthread_mutex_destroy(&s->lock);
        free(s);
        return pep_err_set(err, PEP_EIO, "webhook: cannot create a curl multi handle");
    }
    /* keep one idle connection per parallel transfer for the next delivery to reuse */
    curl_multi_setopt(s->multi, CURLMOPT_MAXCONNECTS, (long)o.max_parallel);
    if (pthread_create(&s->thread, NULL, webhook_main, s) != 0) {
        curl_multi_cleanup(s->multi);
        pthread_mutex_destroy(&s->lock);
        free(s);
        return pep_err_set(err, PEP_EIO, "webhook: cannot start thread");
    }
    *out = s;
    return 0;
}

int webhook_post(struct webhook_sender *s, const char *url, const char *event, json_t *body) {
    int rc = 0;
    char *text = NULL;
    struct webhook_delivery *d = NULL;
    if (!url || !body || !url_acceptable(url) || (event && !event_acceptable(event))) {
        rc = PEP_EINVAL;
        goto out;
    }
    /* Serialized here, not on the sender thread: the caller may still share parts of the
     * body with other objects it keeps changing; the cost is CPU only, no I/O. */
    text = json_dumps(body, JSON_COMPACT);
    size_t url_size = strlen(url) + 1, event_size = event ? strlen(event) + 1 : 0;
    d = text ? calloc(1, sizeof *d + url_size + event_size) : NULL;
    if (!d) {
        rc = PEP_ENOMEM;
        goto out;
    }
    d->body = text;
    d->body_len = strlen(text);
    memcpy(d->url, url, url_size);
    if (event) d->event = memcpy(d->url + url_size, event, event_size);

    pthread_mutex_lock(&s->lock);
    if (s->stopping || s->stats.pending >= s->opt.max_queue) {
        s->stats.dropped++;
        if (!s->stopping && !s->dropping) {
            s->dropping = s->drop_unlogged = true; /* the thread logs it: no I/O here */
            curl_multi_wakeup(s->multi);
        }
        pthread_mutex_unlock(&s->lock);
        rc = PEP_EUNAVAILABLE;
        goto out;
    }
    s->dropping = false;
    s->stats.queued_total++;
    s->stats.pending++;
    bool was_empty = s->queue_head == NULL;
    if (s->queue_tail)
        s->queue_tail->next = d;
    else
        s->queue_head = d;
    s->queue_tail = d;
    /* Only the first delivery of a queue wakes the thread: it takes the whole queue.  The
     * wake-up (a non-blocking write to libcurl's socketpair) happens under the lock so
     * that webhook_stop, once it has set stopping, knows no post still uses the multi. */
    if (was_empty) curl_multi_wakeup(s->multi);
    pthread_mutex_unlock(&s->lock);
    text = NULL;
    d = NULL;
out:
    json_decref(body);
    free(text);
    free(d);
    return rc;
}

void webhook_get_stats(struct webhook_sender *s, struct webhook_stats *out) {
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    pthread_mutex_unlock(&s->lock);
}

void webhook_stop(struct webhook_sender *s, int64_t grace_ms) {
    if (!s) return;
    if (grace_ms < 0) grace_ms = 0;
    if (grace_ms > WEBHOOK_MAX_GRACE_MS) grace_ms = WEBHOOK_MAX_GRACE_MS;
    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    s->stop_deadline_us = pep_mono_us() + grace_ms * 1000;
    curl_multi_wakeup(s->multi);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    if (PEP_NEVER(s->queue_head)) /* the thread takes the last batch before it ends */
        for (struct webhook_delivery *d = s->queue_head, *next; d; d = next) {
            next = d->next;
            delivery_free(d);
        }
    curl_multi_cleanup(s->multi);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
