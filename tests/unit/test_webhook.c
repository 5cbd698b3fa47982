/*
 * test_webhook.c — the webhook sender (pep/webhook.c, SPEC 3.4 notify, 4.4 escalation).
 *
 * The backoff is a table.  The sender runs against a small libmicrohttpd receiver started
 * inside the test on 127.0.0.1, port 0, which records what it gets and answers a scripted
 * list of statuses (0 = hang until the test releases it); a "dead" receiver is a socket
 * bound but not listening, so connecting is refused and no other process can take the port.
 *
 * No timed assertions except lower bounds that causality guarantees (a Retry-After wait)
 * and one generous upper bound (webhook_stop within its grace, against a 30 s alternative):
 * every wait for a condition polls with a WAIT_GUARD_S deadline that only guards a hang.
 *
 * Threads: the test thread, the sender thread, MHD's threads (one per connection, so a
 * hanging answer does not hold the others) and the poster threads of the concurrency case.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "pep/util.h"
#include "pep/webhook.h"

/* Guard against a hang only (never reached when the code under test works). */
#define WAIT_GUARD_S 10
#define MAX_SEEN 128

/* ---- backoff table ---------------------------------------------------------------------- */

struct backoff_case {
    int attempt;
    int64_t base_ms, max_ms;
    uint32_t random;
    int64_t want_ms;
};

static const struct backoff_case backoff_cases[] = {
    /* cap 500: at least 250, at most 500 */
    {1, 500, 60000, 0, 250},
    {1, 500, 60000, UINT32_MAX, 500},
    {1, 500, 60000, 1u << 31, 375}, /* 250 + ⌊251 / 2⌋ */
    /* doubling */
    {2, 500, 60000, 0, 500},
    {2, 500, 60000, UINT32_MAX, 1000},
    {7, 500, 60000, UINT32_MAX, 32000},
    /* 500 · 2^7 = 64000 is capped at 60000 */
    {8, 500, 60000, 0, 30000},
    {8, 500, 60000, UINT32_MAX, 60000},
    {1000000, 500, 60000, UINT32_MAX, 60000}, /* no overflow however many attempts */
    /* odd caps keep the larger half fixed */
    {1, 3, 100, 0, 2},
    {1, 3, 100, UINT32_MAX, 3},
    {2, 10, 15, 0, 8},
    {2, 10, 15, UINT32_MAX, 15},
    /* the smallest step never waits 0 */
    {1, 1, 1, 0, 1},
    {1, 1, 1, UINT32_MAX, 1},
    /* max above the ceiling */
    {100, 1, INT64_MAX, UINT32_MAX, WEBHOOK_BACKOFF_CEILING_MS},
    {100, 1, INT64_MAX, 0, WEBHOOK_BACKOFF_CEILING_MS / 2},
};

static void test_backoff_table(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof backoff_cases / sizeof backoff_cases[0]; i++) {
        const struct backoff_case *c = &backoff_cases[i];
        int64_t got = webhook_backoff_ms(c->attempt, c->base_ms, c->max_ms, c->random);
        if (got != c->want_ms)
            fail_msg("case %zu: attempt %d base %lld max %lld random %u: got %lld, want %lld", i,
                     c->attempt, (long long)c->base_ms, (long long)c->max_ms, c->random,
                     (long long)got, (long long)c->want_ms);
    }
}

/* ---- the receiver ----------------------------------------------------------------------- */

struct seen {
    char method[16];
    char path[64];
    char body[512];
    char content_type[64];
    char event[80]; /* "(none)" when absent */
    int64_t arrived_us;
};

struct receiver {
    struct MHD_Daemon *daemon;
    uint16_t port;
    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t cond;
    int script[8]; /* statuses answered in order, the last one repeating; 0 = hang */
    size_t script_len;
    bool retry_after; /* non-2xx answers carry Retry-After: 1 */
    bool release;     /* hanging answers end */
    int requests;
    struct seen seen[MAX_SEEN];
};

struct upload {
    char data[512];
    size_t len;
};

static enum MHD_Result answer(struct receiver *r, struct MHD_Connection *c, int status) {
    if (status == 0) {
        /* hang until released (the cap only guards the test against itself) */
        struct timespec cap;
        clock_gettime(CLOCK_REALTIME, &cap);
        cap.tv_sec += 30;
        pthread_mutex_lock(&r->lock);
        while (!r->release)
            if (pthread_cond_timedwait(&r->cond, &r->lock, &cap) == ETIMEDOUT) break;
        pthread_mutex_unlock(&r->lock);
        status = 200;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(2, (void *)"ok", MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    pthread_mutex_lock(&r->lock);
    bool retry_after = r->retry_after;
    pthread_mutex_unlock(&r->lock);
    if (retry_after && (status < 200 || status > 299))
        MHD_add_response_header(resp, "Retry-After", "1");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload_data,
                               size_t *upload_data_size, void **con_cls) {
    (void)version;
    struct receiver *r = cls;
    struct upload *up = *con_cls;
    if (!up) {
        up = calloc(1, sizeof *up);
        if (!up) return MHD_NO;
        *con_cls = up;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        if (n > sizeof up->data - 1 - up->len) n = sizeof up->data - 1 - up->len;
        memcpy(up->data + up->len, upload_data, n);
        up->len += n;
        *upload_data_size = 0;
        return MHD_YES;
    }
    const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    const char *ev = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Pep-Event");
    pthread_mutex_lock(&r->lock);
    int i = r->requests++;
    if (i < MAX_SEEN) {
        struct seen *w = &r->seen[i];
        snprintf(w->method, sizeof w->method, "%s", method);
        snprintf(w->path, sizeof w->path, "%s", url);
        snprintf(w->body, sizeof w->body, "%.*s", (int)up->len, up->data);
        snprintf(w->content_type, sizeof w->content_type, "%s", ct ? ct : "(none)");
        snprintf(w->event, sizeof w->event, "%s", ev ? ev : "(none)");
        w->arrived_us = pep_mono_us();
    }
    size_t k = (size_t)i < r->script_len ? (size_t)i : r->script_len - 1;
    int status = r->script[k];
    pthread_mutex_unlock(&r->lock);
    return answer(r, c, status);
}

static void request_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    (void)toe;
    free(*con_cls);
    *con_cls = NULL;
}

static void receiver_start(struct receiver *r) {
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cond, NULL);
    r->script[0] = 200;
    r->script_len = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    r->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                                     MHD_USE_ERROR_LOG,
                                 0, NULL, NULL, handler, r, MHD_OPTION_SOCK_ADDR, &addr,
                                 MHD_OPTION_NOTIFY_COMPLETED, request_completed, r, MHD_OPTION_END);
    assert_non_null(r->daemon);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(r->daemon, MHD_DAEMON_INFO_BIND_PORT);
    assert_non_null(info);
    r->port = info->port;
    assert_true(r->port != 0);
}

static void receiver_script(struct receiver *r, const int *statuses, size_t n, bool retry_after) {
    assert_true(n >= 1 && n <= sizeof r->script / sizeof r->script[0]);
    pthread_mutex_lock(&r->lock);
    memcpy(r->script, statuses, n * sizeof *statuses);
    r->script_len = n;
    r->retry_after = retry_after;
    pthread_mutex_unlock(&r->lock);
}

static int receiver_requests(struct receiver *r) {
    pthread_mutex_lock(&r->lock);
    int n = r->requests;
    pthread_mutex_unlock(&r->lock);
    return n;
}

static struct seen receiver_seen(struct receiver *r, int i) {
    assert_true(i >= 0 && i < MAX_SEEN);
    pthread_mutex_lock(&r->lock);
    struct seen copy = r->seen[i];
    pthread_mutex_unlock(&r->lock);
    return copy;
}

static void receiver_stop(struct receiver *r) {
    pthread_mutex_lock(&r->lock);
    r->release = true;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
    MHD_stop_daemon(r->daemon); /* joins the connection threads, released above */
    pthread_cond_destroy(&r->cond);
    pthread_mutex_destroy(&r->lock);
}

/* ---- fixture ------------------------------------------------------------------------------ */

struct fixture {
    struct receiver receiver;
    struct webhook_sender *sender;
    int dead_fd; /* bound, not listening: connections to dead_port are refused */
    uint16_t dead_port;
    char url[128]; /* the receiver's /hook */
};

static int setup(void **state) {
    struct fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    receiver_start(&fx->receiver);
    snprintf(fx->url, sizeof fx->url, "http://127.0.0.1:%u/hook", (unsigned)fx->receiver.port);
    fx->dead_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (fx->dead_fd < 0 || bind(fx->dead_fd, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        getsockname(fx->dead_fd, (struct sockaddr *)&addr, &len) != 0)
        return -1;
    fx->dead_port = ntohs(addr.sin_port);
    *state = fx;
    return 0;
}

static int teardown(void **state) {
    struct fixture *fx = *state;
    webhook_stop(fx->sender, 0);
    receiver_stop(&fx->receiver);
    close(fx->dead_fd);
    free(fx);
    return 0;
}

static void start(struct fixture *fx, struct webhook_options opt) {
    struct pep_err err = {0};
    int rc = webhook_start(&opt, &fx->sender, &err);
    if (rc != 0) fail_msg("webhook_start: %d %s", rc, err.msg);
}

static struct webhook_stats stats(struct fixture *fx) {
    struct webhook_stats st;
    webhook_get_stats(fx->sender, &st);
    return st;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Polls until expr (which may use `st`, a fresh stats snapshot) holds; fails on the guard. */
#define WAIT_FOR(fx, expr)                                                                         \
    do {                                                                                           \
        int64_t guard_ = pep_mono_us() + WAIT_GUARD_S * 1000000LL;                                 \
        for (;;) {                                                                                 \
            struct webhook_stats st = stats(fx);                                                   \
            (void)st;                                                                              \
            if (expr) break;                                                                       \
            if (pep_mono_us() > guard_) fail_msg("waited %ds for %s", WAIT_GUARD_S, #expr);        \
            nap_ms(5);                                                                             \
        }                                                                                          \
    } while (0)

static json_t *body_of(const char *id) {
    return json_pack("{s:s, s:i, s:s}", "id", id, "n", 1, "note", "caf\xc3\xa9");
}

/* ---- cases ------------------------------------------------------------------------------------
 */

static void test_delivered_first_try(void **state) {
    struct fixture *fx = *state;
    start(fx, (struct webhook_options){.base_ms = 10});
    assert_int_equal(webhook_post(fx->sender, fx->url, "approval.pending", body_of("ap_1")), 0);
    WAIT_FOR(fx, st.delivered == 1);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.queued_total, 1);
    assert_int_equal(st.attempts, 1);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(receiver_requests(&fx->receiver), 1);
    struct seen w = receiver_seen(&fx->receiver, 0);
    assert_string_equal(w.method, "POST");
    assert_string_equal(w.path, "/hook");
    assert_string_equal(w.body, "{\"id\":\"ap_1\",\"n\":1,\"note\":\"caf\xc3\xa9\"}");
    assert_string_equal(w.content_type, "application/json");
    assert_string_equal(w.event, "approval.pending");
}

static void test_retried_after_503_then_delivered(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){503, 503, 200}, 3, false);
    start(fx, (struct webhook_options){.base_ms = 10, .max_attempts = 5});
    assert_int_equal(webhook_post(fx->sender, fx->url, NULL, body_of("esc_1")), 0);
    WAIT_FOR(fx, st.delivered == 1);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.attempts, 3);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(receiver_requests(&fx->receiver), 3);
    for (int i = 0; i < 3; i++) {
        struct seen w = receiver_seen(&fx->receiver, i);
        assert_string_equal(w.body, "{\"id\":\"esc_1\",\"n\":1,\"note\":\"caf\xc3\xa9\"}");
        assert_string_equal(w.event, "(none)"); /* no event kind, no header */
    }
}

static void test_gives_up_after_max_attempts(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){500}, 1, false);
    start(fx, (struct webhook_options){.base_ms = 10, .max_attempts = 3});
    assert_int_equal(webhook_post(fx->sender, fx->url, "escalation.open", body_of("esc_2")), 0);
    WAIT_FOR(fx, st.failed == 1);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.attempts, 3);
    assert_int_equal(st.delivered, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(receiver_requests(&fx->receiver), 3);
}

/* Reads what fd holds from its start. */
static void read_all(int fd, char *out, size_t cap) {
    size_t len = 0;
    ssize_t n;
    lseek(fd, 0, SEEK_SET);
    while (len + 1 < cap && (n = read(fd, out + len, cap - 1 - len)) > 0)
        len += (size_t)n;
    out[len] = '\0';
}

static void test_dead_receiver_never_delays_and_logs_no_secret(void **state) {
    struct fixture *fx = *state;
    /* base 500: the retry waits at least 250 ms, so `pending == 1` right after the post
     * cannot race the give-up */
    start(fx, (struct webhook_options){.base_ms = 500, .max_attempts = 2});
    char url[256];
    snprintf(url, sizeof url, "http://user:hunter2@127.0.0.1:%u/dead?token=abc123#frag",
             (unsigned)fx->dead_port);

    char path[] = "/tmp/test_webhook_stderr_XXXXXX";
    int log_fd = mkstemp(path);
    assert_true(log_fd >= 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0);
    assert_true(dup2(log_fd, STDERR_FILENO) >= 0);

    /* no cmocka assert while stderr is redirected: its message would land in the file */
    json_t *body = json_pack("{s:s}", "secret", "topsecretbody");
    int rc = webhook_post(fx->sender, url, "approval.pending", body);
    struct webhook_stats st = stats(fx);
    struct webhook_stats right_after = st;
    /* the give-up line is written before `failed` moves */
    for (int64_t guard = pep_mono_us() + WAIT_GUARD_S * 1000000LL;
         st.failed == 0 && pep_mono_us() < guard; st = stats(fx))
        nap_ms(5);

    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    char log[4096];
    read_all(log_fd, log, sizeof log);
    close(log_fd);
    fprintf(stderr, "(captured) %s", log);

    assert_int_equal(rc, 0);
    assert_int_equal(right_after.pending, 1);
    assert_int_equal(right_after.queued_total, 1);
    assert_int_equal(st.failed, 1);
    st = stats(fx);
    assert_int_equal(st.attempts, 2);
    assert_int_equal(st.delivered, 0);
    assert_int_equal(st.pending, 0);
    char shown[128];
    snprintf(shown, sizeof shown, "http://127.0.0.1:%u/dead", (unsigned)fx->dead_port);
    assert_non_null(strstr(log, shown));
    assert_non_null(strstr(log, "attempt 1 of 2 failed"));
    assert_non_null(strstr(log, "gave up after 2 attempts"));
    assert_non_null(strstr(log, "approval.pending"));
    assert_null(strstr(log, "hunter2"));
    assert_null(strstr(log, "user"));
    assert_null(strstr(log, "abc123"));
    assert_null(strstr(log, "token"));
    assert_null(strstr(log, "frag"));
    assert_null(strstr(log, "topsecretbody"));
}

static void test_queue_bound(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){0}, 1, false); /* hangs */
    start(fx, (struct webhook_options){.max_queue = 4, .timeout_ms = 20000});
    for (int i = 0; i < 4; i++)
        assert_int_equal(webhook_post(fx->sender, fx->url, "approval.pending", body_of("q")), 0);
    assert_int_equal(webhook_post(fx->sender, fx->url, "approval.pending", body_of("q")),
                     PEP_EUNAVAILABLE);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.dropped, 1);
    assert_int_equal(st.queued_total, 4);
    assert_int_equal(st.pending, 4);
    /* still full while the receiver hangs */
    WAIT_FOR(fx, receiver_requests(&fx->receiver) == 4);
    assert_int_equal(webhook_post(fx->sender, fx->url, NULL, body_of("q")), PEP_EUNAVAILABLE);
    st = stats(fx);
    assert_int_equal(st.dropped, 2);
    assert_int_equal(st.pending, 4);
}

static void test_timeout_is_a_failed_attempt(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){0}, 1, false); /* hangs */
    start(fx, (struct webhook_options){.base_ms = 10, .max_attempts = 2, .timeout_ms = 200});
    assert_int_equal(webhook_post(fx->sender, fx->url, "escalation.open", body_of("t")), 0);
    WAIT_FOR(fx, st.failed == 1);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.attempts, 2);
    assert_int_equal(st.timeouts, 2);
    assert_int_equal(st.delivered, 0);
    assert_int_equal(st.pending, 0);
}

static void test_retry_after_is_honoured(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){503, 200}, 2, true); /* Retry-After: 1 */
    start(fx, (struct webhook_options){.base_ms = 10});
    assert_int_equal(webhook_post(fx->sender, fx->url, NULL, body_of("ra")), 0);
    WAIT_FOR(fx, st.delivered == 1);
    assert_int_equal(stats(fx).attempts, 2);
    /* the second request cannot start before the answer to the first plus 1 s */
    int64_t gap_us =
        receiver_seen(&fx->receiver, 1).arrived_us - receiver_seen(&fx->receiver, 0).arrived_us;
    assert_true(gap_us >= 1000000);
}

static void test_stop_with_pending_returns_within_grace(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){0}, 1, false); /* hangs */
    /* in flight: the hanging receiver, 30 s attempts; waiting: a dead receiver's retry
     * 60 s away */
    start(fx, (struct webhook_options){.base_ms = 60000, .timeout_ms = 30000});
    char dead[128];
    snprintf(dead, sizeof dead, "http://127.0.0.1:%u/dead", (unsigned)fx->dead_port);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(webhook_post(fx->sender, fx->url, "approval.pending", body_of("s")), 0);
        assert_int_equal(webhook_post(fx->sender, dead, "approval.pending", body_of("s")), 0);
    }
    WAIT_FOR(fx, receiver_requests(&fx->receiver) == 3 && st.attempts == 6);
    assert_int_equal(stats(fx).pending, 6);
    int64_t t0 = pep_mono_us();
    webhook_stop(fx->sender, 100);
    fx->sender = NULL;
    /* without the grace it would take 30 s; the bound is loose on purpose */
    assert_true(pep_mono_us() - t0 < 5 * 1000000LL);
}

static void test_stop_grace_lets_retries_finish(void **state) {
    struct fixture *fx = *state;
    receiver_script(&fx->receiver, (const int[]){503, 503, 200}, 3, false);
    start(fx, (struct webhook_options){.base_ms = 10});
    assert_int_equal(webhook_post(fx->sender, fx->url, NULL, body_of("g")), 0);
    webhook_stop(fx->sender, WAIT_GUARD_S * 1000); /* returns as soon as it is delivered */
    fx->sender = NULL;
    assert_int_equal(receiver_requests(&fx->receiver), 3);
}

static void test_rejects_bad_input(void **state) {
    struct fixture *fx = *state;
    start(fx, (struct webhook_options){0});
    static const char *const bad_urls[] = {
        "file:///etc/passwd", "gopher://127.0.0.1/",    "127.0.0.1/hook", "",
        "http://a b/",        "http://h/\r\nX-Evil: 1", "http://h/\x7f",
    };
    for (size_t i = 0; i < sizeof bad_urls / sizeof bad_urls[0]; i++)
        assert_int_equal(webhook_post(fx->sender, bad_urls[i], NULL, body_of("x")), PEP_EINVAL);
    static const char *const bad_events[] = {
        "",
        "a b",
        "approval.pending\r\nX-Evil: 1",
        "é",
        "01234567890123456789012345678901234567890123456789012345678901234", /* 65 */
    };
    for (size_t i = 0; i < sizeof bad_events / sizeof bad_events[0]; i++)
        assert_int_equal(webhook_post(fx->sender, fx->url, bad_events[i], body_of("x")),
                         PEP_EINVAL);
    assert_int_equal(webhook_post(fx->sender, NULL, NULL, body_of("x")), PEP_EINVAL);
    assert_int_equal(webhook_post(fx->sender, fx->url, NULL, NULL), PEP_EINVAL);
    char *long_url = malloc(WEBHOOK_MAX_URL + 2);
    assert_non_null(long_url);
    memset(long_url, 'a', WEBHOOK_MAX_URL + 1);
    memcpy(long_url, "http://", 7);
    long_url[WEBHOOK_MAX_URL + 1] = '\0';
    assert_int_equal(webhook_post(fx->sender, long_url, NULL, body_of("x")), PEP_EINVAL);
    free(long_url);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.queued_total, 0);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(receiver_requests(&fx->receiver), 0);

    struct pep_err err = {0};
    struct webhook_sender *s = NULL;
    assert_int_equal(
        webhook_start(&(struct webhook_options){.base_ms = 1000, .max_backoff_ms = 10}, &s, &err),
        PEP_EINVAL);
    assert_int_equal(webhook_start(&(struct webhook_options){.timeout_ms = -1}, &s, &err),
                     PEP_EINVAL);
    assert_null(s);
    webhook_stop(NULL, 0);
}

#define POSTERS 4
#define POSTS_EACH 25

struct poster {
    struct fixture *fx;
    int failures;
};

static void *poster_main(void *arg) {
    struct poster *p = arg;
    for (int i = 0; i < POSTS_EACH; i++)
        if (webhook_post(p->fx->sender, p->fx->url, "approval.pending", body_of("c")) != 0)
            p->failures++;
    return NULL;
}

static void test_concurrent_posters(void **state) {
    struct fixture *fx = *state;
    start(fx, (struct webhook_options){.base_ms = 10, .max_parallel = 4});
    pthread_t threads[POSTERS];
    struct poster posters[POSTERS];
    for (int i = 0; i < POSTERS; i++) {
        posters[i] = (struct poster){fx, 0};
        assert_int_equal(pthread_create(&threads[i], NULL, poster_main, &posters[i]), 0);
    }
    for (int i = 0; i < POSTERS; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(posters[i].failures, 0);
    }
    WAIT_FOR(fx, st.delivered == POSTERS * POSTS_EACH);
    struct webhook_stats st = stats(fx);
    assert_int_equal(st.queued_total, POSTERS * POSTS_EACH);
    assert_int_equal(st.attempts, POSTERS * POSTS_EACH);
    assert_int_equal(st.pending, 0);
    assert_int_equal(receiver_requests(&fx->receiver), POSTERS * POSTS_EACH);
}

int main(void) {
    /* pep ignores SIGPIPE process-wide (PITFALLS: libcurl); the test does the same */
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backoff_table),
        cmocka_unit_test_setup_teardown(test_delivered_first_try, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retried_after_503_then_delivered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gives_up_after_max_attempts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dead_receiver_never_delays_and_logs_no_secret, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_queue_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout_is_a_failed_attempt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_after_is_honoured, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_with_pending_returns_within_grace, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_stop_grace_lets_retries_finish, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rejects_bad_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_posters, setup, teardown),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return failed;
}
