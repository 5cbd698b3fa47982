/*
 * test_forward.c — the forwarder (pep/forward.c, SPEC 4.7).
 *
 * Two halves.  The header filters are tables: the agent's credentials, Pep-* and every
 * hop-by-hop header (also those named by its Connection header) never go upstream, and
 * framing/hop-by-hop/Pep-* headers of the answer are never relayed.  The forwarder itself
 * runs against a tiny libmicrohttpd server started inside the test on 127.0.0.1, port 0:
 * a real answer (status, body, relayed headers), a refused connection, a refused
 * protocol, a timeout, cancellation of a job in flight, stop with jobs queued (every done
 * called exactly once), and forward_job_clear (ASan proves it frees everything).
 *
 * No timed assertions: the slow handler waits for the test to release it (with a cap),
 * and every wait for a done callback has a generous guard only against hanging forever.
 *
 * Threads: the test thread, the forwarder thread (done callbacks) and MHD's polling
 * thread (the handler); they share `struct server` and `struct sync` under their locks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pep/forward.h"

/* Guard against a hang only (never reached when the code under test works). */
#define WAIT_GUARD_S 30

/* ---- header filters ------------------------------------------------------------------- */

struct header_case {
    const char *name;
    const char *connection; /* the agent's Connection value, or NULL */
    bool allowed;
};

static const struct header_case header_cases[] = {
    /* credentials and pep's own headers */
    {"Authorization", NULL, false},
    {"authorization", NULL, false},
    {"AUTHORIZATION", NULL, false},
    {"Cookie", NULL, false},
    {"COOKIE", NULL, false},
    {"Pep-Approval", NULL, false},
    {"pep-anything", NULL, false},
    {"PEP-Request-Id", NULL, false},
    {"pep-", NULL, false},
    /* hop-by-hop */
    {"Connection", NULL, false},
    {"Keep-Alive", NULL, false},
    {"keep-alive", NULL, false},
    {"TE", NULL, false},
    {"te", NULL, false},
    {"Trailer", NULL, false},
    {"Transfer-Encoding", NULL, false},
    {"transfer-ENCODING", NULL, false},
    {"Upgrade", NULL, false},
    {"Proxy-Authorization", NULL, false},
    {"Proxy-Connection", NULL, false},
    {"Proxy-Authenticate", NULL, false},
    /* framing and what pep sets itself */
    {"Content-Length", NULL, false},
    {"content-length", NULL, false},
    {"Host", NULL, false},
    {"Expect", NULL, false},
    {"X-Request-Id", NULL, false},
    {"x-request-id", NULL, false},
    /* allowed */
    {"Content-Type", NULL, true},
    {"content-type", NULL, true},
    {"Accept", NULL, true},
    {"X-Custom", NULL, true},
    {"OpenAI-Organization", NULL, true},
    {"Idempotency-Key", NULL, true},
    {"Pep", NULL, true}, /* not the Pep- prefix */
    {"Pepper", NULL, true},
    {"X-Pep-Thing", NULL, true},
    {"X-Authorization", NULL, true},
    {"Authorization2", NULL, true},
    {"Hosts", NULL, true},
    /* named by the Connection header */
    {"X-Hop", "close, X-Hop", false},
    {"x-hop", "close, X-Hop", false},
    {"X-HOP", "close, x-hop", false},
    {"X-Hop", "close,X-Hop", false},
    {"X-Hop", "X-Hop,close", false},
    {"X-Hop", "X-Hop", false},
    {"X-Hop", " ,, X-Hop ,", false},
    {"X-Hop", ",X-Hop,", false},
    {"X-Hop", "\tX-Hop\t", false},
    {"X-Hop", "close  ,   X-Hop   ", false},
    {"X-Hop", "keep-alive X-Hop", false},
    {"Accept", "keep-alive, Accept", false},
    {"X-Hop", "X-Hopper", true},
    {"X-Hopper", "X-Hop", true},
    {"X-Hop", "XX-Hop", true},
    {"X-Hop", "close", true},
    {"X-Hop", "", true},
    {"X-Hop", " , ,, ", true},
    {"X-Hop", NULL, true},
    {"Content-Type", "close, X-Hop", true},
    /* the Connection header cannot re-allow anything */
    {"Authorization", "", false},
    /* SPEC 4.7: headers that would make the upstream act on another method, URL or client */
    {"X-HTTP-Method-Override", NULL, false},
    {"x-http-method", NULL, false},
    {"X-Method-Override", NULL, false},
    {"X-Original-URL", NULL, false},
    {"X-Rewrite-Url", NULL, false},
    {"Forwarded", NULL, false},
    {"X-Forwarded-For", NULL, false},
    {"x-forwarded-host", NULL, false},
    {"X-Forwarded-Proto", NULL, false},
    {"X-Forwarded", NULL, true}, /* not the X-Forwarded- prefix */
    {"X-Forwarder", NULL, true},
    /* two Connection headers, joined by the caller: both name hop-by-hop headers */
    {"X-Hop-A", "keep-alive, X-Hop-A,X-Hop-B,", false},
    {"X-Hop-B", "keep-alive, X-Hop-A,X-Hop-B,", false},
};

static void test_forward_header_allowed_table(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(header_cases); i++) {
        const struct header_case *c = &header_cases[i];
        print_message("forward_header_allowed(\"%s\", %s%s%s)\n", c->name,
                      c->connection ? "\"" : "", c->connection ? c->connection : "NULL",
                      c->connection ? "\"" : "");
        assert_int_equal(forward_header_allowed(c->name, c->connection), c->allowed);
    }
}

struct relay_case {
    const char *name;
    bool relayable;
};

static const struct relay_case relay_cases[] = {
    {"content-length", false},
    {"Content-Length", false},
    {"date", false},
    {"Date", false},
    {"server", false},
    {"SERVER", false},
    {"transfer-encoding", false},
    {"Transfer-Encoding", false},
    {"connection", false},
    {"Connection", false},
    {"keep-alive", false},
    {"proxy-authenticate", false},
    {"proxy-connection", false},
    {"te", false},
    {"trailer", false},
    {"upgrade", false},
    {"pep-anything", false},
    {"Pep-Request-Id", false},
    {"PEP-Upstream", false},
    {"content-type", true},
    {"Content-Type", true},
    {"x-custom", true},
    {"X-RateLimit-Remaining", true},
    {"retry-after", true},
    {"Retry-After", true},
    {"set-cookie", true},
    {"cache-control", true},
    {"location", true},
    {"www-authenticate", true},
    {"content-encoding", true}, /* bytes are relayed as sent, so their encoding is too */
    {"x-pep-thing", true},
    {"servers", true},
};

static void test_forward_response_header_relayable_table(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(relay_cases); i++) {
        print_message("forward_response_header_relayable(\"%s\")\n", relay_cases[i].name);
        assert_int_equal(forward_response_header_relayable(relay_cases[i].name),
                         relay_cases[i].relayable);
    }
}

static void test_forward_error_name(void **state) {
    (void)state;
    assert_string_equal(forward_error_name(FORWARD_OK), "ok");
    assert_string_equal(forward_error_name(FORWARD_TIMEOUT), "timeout");
    assert_string_equal(forward_error_name(FORWARD_IDLE_TIMEOUT), "idle_timeout");
    assert_string_equal(forward_error_name(FORWARD_CONNECT_ERROR), "connect_error");
    assert_string_equal(forward_error_name(FORWARD_TOO_LARGE), "response_too_large");
    assert_string_equal(forward_error_name(FORWARD_CANCELLED), "cancelled");
    assert_string_equal(forward_error_name((enum forward_error)99), "error");
}

/* ---- forward_job_clear ------------------------------------------------------------------ */

static void test_forward_job_clear(void **state) {
    (void)state;
    struct forward_job job = {0};
    job.url = strdup("http://127.0.0.1:1/x");
    job.headers = curl_slist_append(NULL, "X-A: 1");
    job.headers = curl_slist_append(job.headers, "X-B: 2");
    job.body_out = strdup("answer");
    job.body_out_len = 6;
    job.resp_headers_cap = 4;
    job.resp_headers = calloc(job.resp_headers_cap, sizeof *job.resp_headers);
    assert_non_null(job.resp_headers);
    job.resp_headers[0] = (struct forward_header){strdup("X-One"), strdup("1")};
    job.resp_headers[1] = (struct forward_header){strdup("X-Two"), strdup("2")};
    job.resp_headers_len = 2;
    job.status = 200;
    job.method = "POST";
    forward_job_clear(&job); /* LeakSanitizer fails the ASan run if anything is left */

    static const struct forward_job zero;
    assert_memory_equal(&job, &zero, sizeof job);
    forward_job_clear(&job); /* clearing a cleared job is harmless */
    assert_memory_equal(&job, &zero, sizeof job);
}

/* ---- the test upstream ------------------------------------------------------------------ */

struct server {
    struct MHD_Daemon *daemon;
    uint16_t port;
    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t cond;
    int slow_arrived;    /* /slow requests that reached the handler */
    bool release;        /* /slow handlers may answer now */
    int64_t slow_cap_ms; /* a /slow handler answers after this long anyway */
    struct seen {
        int requests;    /* requests answered or being answered */
        char method[16]; /* of the last request */
        char url[64];
        char body[256];
        char x_custom[64];
        bool saw_authorization; /* in any request */
    } seen;
};

/* Per-request state in MHD's *con_cls. */
struct upload {
    char data[4096];
    size_t len;
};

static ssize_t chunked_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)cls;
    static const char all[] = "alpha-beta-gamma";
    size_t n = sizeof all - 1;
    if (pos >= n) return MHD_CONTENT_READER_END_OF_STREAM;
    size_t k = n - (size_t)pos < 5 ? n - (size_t)pos : 5; /* several chunks */
    if (k > max) k = max;
    memcpy(buf, all + pos, k);
    return (ssize_t)k;
}

static void slow_wait(struct server *s) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    pthread_mutex_lock(&s->lock);
    deadline.tv_sec += s->slow_cap_ms / 1000;
    deadline.tv_nsec += (s->slow_cap_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    s->slow_arrived++;
    pthread_cond_broadcast(&s->cond);
    while (!s->release) {
        if (pthread_cond_timedwait(&s->cond, &s->lock, &deadline) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&s->lock);
}

static enum MHD_Result queue(struct MHD_Connection *c, unsigned int status,
                             struct MHD_Response *r) {
    if (!r) return MHD_NO;
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static struct MHD_Response *text_response(const char *text) {
    return MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload_data,
                               size_t *upload_data_size, void **con_cls) {
    (void)version;
    struct server *s = cls;
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

    const char *custom = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Custom");
    pthread_mutex_lock(&s->lock);
    struct seen *w = &s->seen;
    w->requests++;
    snprintf(w->method, sizeof w->method, "%s", method);
    snprintf(w->url, sizeof w->url, "%s", url);
    snprintf(w->body, sizeof w->body, "%.*s", (int)up->len, up->data);
    snprintf(w->x_custom, sizeof w->x_custom, "%s", custom ? custom : "");
    w->saw_authorization |=
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization") != NULL;
    pthread_mutex_unlock(&s->lock);

    if (strcmp(url, "/ok") == 0) {
        char text[4200];
        snprintf(text, sizeof text, "created:%.*s", (int)up->len, up->data);
        struct MHD_Response *r = text_response(text);
        if (!r) return MHD_NO;
        /* relayable */
        MHD_add_response_header(r, "Content-Type", "application/json");
        MHD_add_response_header(r, "X-Upstream", "yes");
        MHD_add_response_header(r, "Retry-After", "7");
        MHD_add_response_header(r, "Set-Cookie", "s=1; Path=/");
        /* never relayed (Date and Content-Length are added by MHD itself) */
        MHD_add_response_header(r, "Server", "test-upstream");
        MHD_add_response_header(r, "Pep-Internal", "leak");
        MHD_add_response_header(r, "Keep-Alive", "timeout=5");
        MHD_add_response_header(r, "Proxy-Authenticate", "Basic");
        return queue(c, 201, r);
    }
    if (strcmp(url, "/slow") == 0) {
        slow_wait(s);
        return queue(c, 200, text_response("slow"));
    }
    if (strcmp(url, "/redirect") == 0) {
        struct MHD_Response *r = text_response("moved");
        if (r) MHD_add_response_header(r, "Location", "/ok");
        return queue(c, 302, r);
    }
    if (strcmp(url, "/chunked") == 0) {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 64, chunked_reader, NULL, NULL);
        if (r) {
            MHD_add_response_header(r, "Connection", "close");
            MHD_add_response_header(r, "X-Chunked", "1");
        }
        return queue(c, 200, r);
    }
    return queue(c, 404, text_response("not found"));
}

static void request_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    (void)toe;
    free(*con_cls);
    *con_cls = NULL;
}

static void server_start(struct server *s) {
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->slow_cap_ms = 1500;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    s->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG,
                                 0, NULL, NULL, handler, s, MHD_OPTION_SOCK_ADDR, &addr,
                                 MHD_OPTION_NOTIFY_COMPLETED, request_completed, s, MHD_OPTION_END);
    assert_non_null(s->daemon);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    assert_non_null(info);
    s->port = info->port;
    assert_true(s->port != 0);
}

/* A copy of what the server saw, taken under its lock. */
static struct seen server_seen(struct server *s) {
    pthread_mutex_lock(&s->lock);
    struct seen copy = s->seen;
    pthread_mutex_unlock(&s->lock);
    return copy;
}

static void server_set_slow_cap(struct server *s, int64_t ms) {
    pthread_mutex_lock(&s->lock);
    s->slow_cap_ms = ms;
    pthread_mutex_unlock(&s->lock);
}

static void server_release_slow(struct server *s) {
    pthread_mutex_lock(&s->lock);
    s->release = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static void server_stop(struct server *s) {
    server_release_slow(s);
    MHD_stop_daemon(s->daemon);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
}

/* Waits (bounded by WAIT_GUARD_S) until *count, guarded by lock, reaches n; fails the test
 * with `what` otherwise. */
static void wait_count(pthread_mutex_t *lock, pthread_cond_t *cond, const int *count, int n,
                       const char *what) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += WAIT_GUARD_S;
    pthread_mutex_lock(lock);
    while (*count < n) {
        if (pthread_cond_timedwait(cond, lock, &deadline) == ETIMEDOUT) {
            int got = *count;
            pthread_mutex_unlock(lock);
            fail_msg("%s: %d of %d", what, got, n);
        }
    }
    pthread_mutex_unlock(lock);
}

/* Waits until n /slow requests reached the handler. */
static void server_wait_slow(struct server *s, int n) {
    wait_count(&s->lock, &s->cond, &s->slow_arrived, n, "/slow requests arrived");
}

/* ---- jobs and their done callbacks --------------------------------------------------------- */

struct sync {
    pthread_mutex_t lock; /* guards done and every tjob.calls */
    pthread_cond_t cond;
    int done;
};

struct tjob {
    struct forward_job job;
    struct sync *sync;
    int calls;      /* done callbacks received: must end at exactly 1 */
    bool wrong_job; /* done was handed another job than its own */
    pthread_t done_thread;
};

static void on_done(struct forward_job *job, void *arg) {
    struct tjob *t = arg;
    /* no cmocka assert here: this is the forwarder thread */
    pthread_mutex_lock(&t->sync->lock);
    t->wrong_job |= job != &t->job;
    t->calls++;
    t->done_thread = pthread_self();
    t->sync->done++;
    pthread_cond_broadcast(&t->sync->cond);
    pthread_mutex_unlock(&t->sync->lock);
}

static void sync_init(struct sync *s) {
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
}

static void sync_destroy(struct sync *s) {
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
}

static void sync_wait(struct sync *s, int n) {
    wait_count(&s->lock, &s->cond, &s->done, n, "jobs done");
}

static void tjob_init(struct tjob *t, struct sync *s, uint16_t port, const char *path,
                      const char *method, const char *body, int64_t timeout_ms) {
    memset(t, 0, sizeof *t);
    t->sync = s;
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", (unsigned)port, path);
    t->job.url = strdup(url);
    assert_non_null(t->job.url);
    t->job.method = method;
    t->job.body = body;
    t->job.body_len = body ? strlen(body) : 0;
    t->job.timeout_ms = timeout_ms;
    t->job.done = on_done;
    t->job.done_arg = t;
}

/* The value of relayed header `name` (exact case-insensitive), or NULL; fails on a repeat. */
static const char *resp_header(const struct forward_job *job, const char *name) {
    const char *found = NULL;
    for (size_t i = 0; i < job->resp_headers_len; i++) {
        if (strcasecmp(job->resp_headers[i].name, name) == 0) {
            if (found) fail_msg("header %s relayed twice", name);
            found = job->resp_headers[i].value;
        }
    }
    return found;
}

struct fixture {
    struct server server;
    struct forwarder *fwd;
    struct sync sync;
};

static int setup(void **state) {
    struct fixture *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    server_start(&fx->server);
    sync_init(&fx->sync);
    struct pep_err err = {0};
    assert_int_equal(forwarder_start(&fx->fwd, &err), 0);
    assert_non_null(fx->fwd);
    *state = fx;
    return 0;
}

static int teardown(void **state) {
    struct fixture *fx = *state;
    forwarder_stop(fx->fwd);
    server_stop(&fx->server);
    sync_destroy(&fx->sync);
    free(fx);
    return 0;
}

/* ---- the forwarder against the test upstream ------------------------------------------------ */

static void test_forward_post_ok(void **state) {
    struct fixture *fx = *state;
    struct tjob t;
    tjob_init(&t, &fx->sync, fx->server.port, "/ok", "POST", "{\"q\":1}", 10000);
    t.job.headers = curl_slist_append(NULL, "Content-Type: application/json");
    t.job.headers = curl_slist_append(t.job.headers, "X-Custom: abc");
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);

    assert_int_equal(t.calls, 1);
    assert_false(t.wrong_job);
    assert_false(pthread_equal(t.done_thread, pthread_self())); /* the forwarder thread */
    assert_int_equal(t.job.error, FORWARD_OK);
    assert_int_equal(t.job.status, 201);
    assert_non_null(t.job.body_out);
    assert_int_equal(t.job.body_out_len, strlen("created:{\"q\":1}"));
    assert_string_equal(t.job.body_out, "created:{\"q\":1}");
    assert_true(t.job.elapsed_us > 0);

    /* relayed: exactly these */
    assert_string_equal(resp_header(&t.job, "Content-Type"), "application/json");
    assert_string_equal(resp_header(&t.job, "X-Upstream"), "yes");
    assert_string_equal(resp_header(&t.job, "Retry-After"), "7");
    assert_string_equal(resp_header(&t.job, "Set-Cookie"), "s=1; Path=/");
    if (t.job.resp_headers_len != 4)
        for (size_t i = 0; i < t.job.resp_headers_len; i++)
            print_error("relayed: %s: %s\n", t.job.resp_headers[i].name,
                        t.job.resp_headers[i].value);
    assert_int_equal(t.job.resp_headers_len, 4);
    /* not relayed */
    const char *never[] = {
        "Content-Length",     "Date",       "Server",           "Pep-Internal", "Keep-Alive",
        "Proxy-Authenticate", "Connection", "Transfer-Encoding"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(never); i++)
        assert_null(resp_header(&t.job, never[i]));

    /* what the upstream received */
    struct seen seen = server_seen(&fx->server);
    assert_int_equal(seen.requests, 1);
    assert_string_equal(seen.method, "POST");
    assert_string_equal(seen.url, "/ok");
    assert_string_equal(seen.body, "{\"q\":1}");
    assert_string_equal(seen.x_custom, "abc");
    assert_false(seen.saw_authorization);
    forward_job_clear(&t.job);
}

static void test_forward_get_and_redirect_not_followed(void **state) {
    struct fixture *fx = *state;
    struct tjob t;
    tjob_init(&t, &fx->sync, fx->server.port, "/redirect", "GET", NULL, 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);
    assert_int_equal(t.calls, 1);
    assert_false(t.wrong_job);
    assert_int_equal(t.job.error, FORWARD_OK);
    assert_int_equal(t.job.status, 302);
    assert_string_equal(t.job.body_out, "moved");
    assert_string_equal(resp_header(&t.job, "Location"), "/ok");
    struct seen seen = server_seen(&fx->server);
    assert_int_equal(seen.requests, 1); /* /ok was never fetched */
    assert_string_equal(seen.method, "GET");
    assert_string_equal(seen.url, "/redirect");
    assert_string_equal(seen.body, "");
    forward_job_clear(&t.job);
}

static void test_forward_chunked_answer(void **state) {
    struct fixture *fx = *state;
    struct tjob t;
    tjob_init(&t, &fx->sync, fx->server.port, "/chunked", "GET", NULL, 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);
    assert_int_equal(t.job.error, FORWARD_OK);
    assert_int_equal(t.job.status, 200);
    assert_string_equal(t.job.body_out, "alpha-beta-gamma");
    assert_int_equal(t.job.body_out_len, 16);
    assert_string_equal(resp_header(&t.job, "X-Chunked"), "1");
    assert_null(resp_header(&t.job, "Transfer-Encoding"));
    assert_null(resp_header(&t.job, "Connection"));
    assert_null(resp_header(&t.job, "Date"));
    assert_int_equal(t.job.resp_headers_len, 1);
    forward_job_clear(&t.job);
}

/* Many jobs at once: each answer lands in its own job. */
static void test_forward_many_concurrent(void **state) {
    struct fixture *fx = *state;
    enum { N = 40 };
    static struct tjob jobs[N];
    static char bodies[N][16];
    for (int i = 0; i < N; i++) {
        snprintf(bodies[i], sizeof bodies[i], "job-%d", i);
        tjob_init(&jobs[i], &fx->sync, fx->server.port, "/ok", "PUT", bodies[i], 10000);
        assert_int_equal(forwarder_submit(fx->fwd, &jobs[i].job), 0);
    }
    sync_wait(&fx->sync, N);
    for (int i = 0; i < N; i++) {
        char want[32];
        snprintf(want, sizeof want, "created:job-%d", i);
        assert_int_equal(jobs[i].calls, 1);
        assert_false(jobs[i].wrong_job);
        assert_int_equal(jobs[i].job.error, FORWARD_OK);
        assert_int_equal(jobs[i].job.status, 201);
        assert_string_equal(jobs[i].job.body_out, want);
        assert_int_equal(jobs[i].job.resp_headers_len, 4);
        forward_job_clear(&jobs[i].job);
    }
    assert_int_equal(server_seen(&fx->server).requests, N);
}

static void test_forward_connect_error(void **state) {
    struct fixture *fx = *state;
    /* A socket bound but not listening: connecting to its port is refused, and no other
     * process can take the port while we hold it. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof addr), 0);
    socklen_t len = sizeof addr;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&addr, &len), 0);

    struct tjob t;
    tjob_init(&t, &fx->sync, ntohs(addr.sin_port), "/x", "POST", "b", 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);
    close(fd);
    assert_int_equal(t.calls, 1);
    assert_false(t.wrong_job);
    assert_int_equal(t.job.error, FORWARD_CONNECT_ERROR);
    assert_int_equal(t.job.status, 0);
    assert_null(t.job.body_out);
    assert_int_equal(t.job.resp_headers_len, 0);
    forward_job_clear(&t.job);
}

/* SECURITY: only http and https: a URL for another protocol never reaches curl's handler. */
/* A connection that is never established within the timeout is a connection error
 * (SPEC 8), not a timeout of an answer.  A listener whose accept queue is full drops new
 * SYNs, so the connect hangs. */
static void test_forward_connect_timeout_is_connect_error(void **state) {
    struct fixture *fx = *state;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(lfd >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(lfd, (struct sockaddr *)&addr, sizeof addr), 0);
    assert_int_equal(listen(lfd, 0), 0);
    socklen_t len = sizeof addr;
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&addr, &len), 0);
    int fill[4];
    for (int i = 0; i < 4; i++) { /* fill the accept queue (never accepted) */
        fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        assert_true(fill[i] >= 0);
        connect(fill[i], (struct sockaddr *)&addr, sizeof addr);
    }
    usleep(100000);

    struct tjob t;
    tjob_init(&t, &fx->sync, ntohs(addr.sin_port), "/x", "POST", "b", 1000);
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);
    for (int i = 0; i < 4; i++)
        close(fill[i]);
    close(lfd);
    assert_int_equal(t.calls, 1);
    /* it did wait for the connect timeout (a lower bound: not a flaky timing) */
    assert_true(t.job.elapsed_us >= 900000);
    assert_int_equal(t.job.error, FORWARD_CONNECT_ERROR);
    assert_int_equal(t.job.status, 0);
    forward_job_clear(&t.job);
}

static void test_forward_other_protocols_refused(void **state) {
    struct fixture *fx = *state;
    const char *urls[] = {"file:///etc/hostname", "gopher://127.0.0.1:70/", "dict://127.0.0.1/"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(urls); i++) {
        struct tjob t;
        tjob_init(&t, &fx->sync, 0, "", "GET", NULL, 10000);
        free(t.job.url);
        t.job.url = strdup(urls[i]);
        assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
        sync_wait(&fx->sync, (int)i + 1);
        assert_int_equal(t.calls, 1);
        assert_false(t.wrong_job);
        assert_int_equal(t.job.error, FORWARD_CONNECT_ERROR);
        assert_null(t.job.body_out);
        forward_job_clear(&t.job);
    }
}

static void test_forward_timeout(void **state) {
    struct fixture *fx = *state;
    struct tjob t;
    tjob_init(&t, &fx->sync, fx->server.port, "/slow", "POST", "x", 300);
    assert_int_equal(forwarder_submit(fx->fwd, &t.job), 0);
    sync_wait(&fx->sync, 1);
    server_release_slow(&fx->server);
    assert_int_equal(t.calls, 1);
    assert_false(t.wrong_job);
    assert_int_equal(t.job.error, FORWARD_TIMEOUT);
    assert_int_equal(t.job.status, 0);
    assert_true(t.job.elapsed_us > 0);
    forward_job_clear(&t.job);
}

static void test_forward_cancel_all_in_flight(void **state) {
    struct fixture *fx = *state;
    server_set_slow_cap(&fx->server, WAIT_GUARD_S * 1000); /* answers only when released */
    struct tjob slow;
    tjob_init(&slow, &fx->sync, fx->server.port, "/slow", "POST", "x", 60000);
    assert_int_equal(forwarder_submit(fx->fwd, &slow.job), 0);
    server_wait_slow(&fx->server, 1); /* the transfer is in flight */
    forwarder_cancel_all(fx->fwd);
    sync_wait(&fx->sync, 1);
    assert_int_equal(slow.calls, 1);
    assert_int_equal(slow.job.error, FORWARD_CANCELLED);
    assert_int_equal(slow.job.status, 0);
    forward_job_clear(&slow.job);

    /* a cancel is for good (shutdown): a later job is refused, and its done never runs */
    server_release_slow(&fx->server);
    struct tjob late;
    tjob_init(&late, &fx->sync, fx->server.port, "/ok", "POST", "again", 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &late.job), PEP_ECLOSED);
    assert_int_equal(late.calls, 0);
    assert_int_equal(slow.calls, 1); /* never called again */
    forward_job_clear(&late.job);
}

static void test_forwarder_stop_calls_every_done_once(void **state) {
    struct fixture *fx = *state;
    server_set_slow_cap(&fx->server, WAIT_GUARD_S * 1000);
    enum { SLOW = 3, FAST = 20 };
    static struct tjob jobs[SLOW + FAST];
    for (int i = 0; i < SLOW + FAST; i++) {
        tjob_init(&jobs[i], &fx->sync, fx->server.port, i < SLOW ? "/slow" : "/ok", "POST", "q",
                  60000);
        assert_int_equal(forwarder_submit(fx->fwd, &jobs[i].job), 0);
    }
    server_wait_slow(&fx->server, 1); /* at least one in flight, the rest in flight or queued */
    forwarder_stop(fx->fwd);
    fx->fwd = NULL; /* teardown must not stop it again */
    /* forwarder_stop returns after every done ran: no waiting needed */
    assert_int_equal(fx->sync.done, SLOW + FAST);
    for (int i = 0; i < SLOW + FAST; i++) {
        assert_int_equal(jobs[i].calls, 1);
        assert_false(jobs[i].wrong_job);
        if (i < SLOW) {
            assert_int_equal(jobs[i].job.error, FORWARD_CANCELLED);
        } else if (jobs[i].job.error == FORWARD_OK) {
            assert_int_equal(jobs[i].job.status, 201); /* finished before the stop */
        } else {
            assert_int_equal(jobs[i].job.error, FORWARD_CANCELLED);
        }
        forward_job_clear(&jobs[i].job);
    }
}

/* A first job whose done callback (on the forwarder thread, which therefore cannot take
 * them yet) queues more jobs and then cancels or waits for a stop: the only way to have
 * jobs deterministically still queued, not yet handed to libcurl. */
struct chain_ctx {
    struct tjob first;
    struct forwarder *fwd;
    struct tjob *queued;
    int queued_len;
    int submit_failures; /* queued jobs forwarder_submit refused */
    bool stop_mode;      /* false: cancel_all; true: wait until a stop began */
    bool submitted;      /* guarded by first.sync->lock: queued jobs are in */
    struct tjob *probes; /* stop_mode: submitted until one is refused */
    int probes_len;
    int closed_at; /* index of the probe refused with PEP_ECLOSED, or -1 */
};

static void chain_done(struct forward_job *job, void *arg) {
    struct chain_ctx *c = arg;
    for (int i = 0; i < c->queued_len; i++)
        c->submit_failures += forwarder_submit(c->fwd, &c->queued[i].job) != 0;
    if (!c->stop_mode) {
        forwarder_cancel_all(c->fwd);
    } else {
        struct sync *s = c->first.sync;
        pthread_mutex_lock(&s->lock);
        c->submitted = true;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
        /* Probe until forwarder_stop has begun; a probe accepted before that is one more
         * queued job. */
        for (int p = 0; p < c->probes_len; p++) {
            if (forwarder_submit(c->fwd, &c->probes[p].job) == PEP_ECLOSED) {
                c->closed_at = p;
                break;
            }
            nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
        }
    }
    on_done(job, &c->first);
}

static void test_forward_cancel_all_cancels_queued(void **state) {
    struct fixture *fx = *state;
    enum { QUEUED = 10 };
    static struct tjob queued[QUEUED];
    static struct chain_ctx c;
    memset(&c, 0, sizeof c);
    tjob_init(&c.first, &fx->sync, fx->server.port, "/ok", "POST", "first", 10000);
    c.first.job.done = chain_done;
    c.first.job.done_arg = &c;
    c.fwd = fx->fwd;
    c.queued = queued;
    c.queued_len = QUEUED;
    c.closed_at = -1;
    for (int i = 0; i < QUEUED; i++)
        tjob_init(&queued[i], &fx->sync, fx->server.port, "/ok", "POST", "queued", 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &c.first.job), 0);
    sync_wait(&fx->sync, 1 + QUEUED);

    assert_int_equal(c.first.calls, 1);
    assert_int_equal(c.first.job.error, FORWARD_OK);
    assert_int_equal(c.first.job.status, 201);
    assert_int_equal(c.submit_failures, 0);
    for (int i = 0; i < QUEUED; i++) {
        assert_int_equal(queued[i].calls, 1);
        assert_false(queued[i].wrong_job);
        assert_int_equal(queued[i].job.error, FORWARD_CANCELLED);
        assert_int_equal(queued[i].job.status, 0);
        assert_null(queued[i].job.body_out);
        assert_true(queued[i].job.elapsed_us >= 0);
        forward_job_clear(&queued[i].job);
    }
    assert_int_equal(server_seen(&fx->server).requests, 1); /* none of them was sent */
    forward_job_clear(&c.first.job);

    /* and nothing submitted after the cancel starts */
    struct tjob next;
    tjob_init(&next, &fx->sync, fx->server.port, "/ok", "POST", "next", 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &next.job), PEP_ECLOSED);
    assert_int_equal(next.calls, 0);
    assert_int_equal(server_seen(&fx->server).requests, 1);
    forward_job_clear(&next.job);
}

static void test_forwarder_stop_cancels_queued(void **state) {
    struct fixture *fx = *state;
    enum { QUEUED = 10, PROBES = 5000 };
    static struct tjob queued[QUEUED], probes[PROBES];
    static struct chain_ctx c;
    memset(&c, 0, sizeof c);
    tjob_init(&c.first, &fx->sync, fx->server.port, "/ok", "POST", "first", 10000);
    c.first.job.done = chain_done;
    c.first.job.done_arg = &c;
    c.fwd = fx->fwd;
    c.queued = queued;
    c.queued_len = QUEUED;
    c.stop_mode = true;
    c.probes = probes;
    c.probes_len = PROBES;
    c.closed_at = -1;
    for (int i = 0; i < QUEUED; i++)
        tjob_init(&queued[i], &fx->sync, fx->server.port, "/ok", "POST", "queued", 10000);
    for (int i = 0; i < PROBES; i++)
        tjob_init(&probes[i], &fx->sync, fx->server.port, "/ok", "POST", "probe", 10000);
    assert_int_equal(forwarder_submit(fx->fwd, &c.first.job), 0);

    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += WAIT_GUARD_S;
    pthread_mutex_lock(&fx->sync.lock);
    while (!c.submitted) {
        if (pthread_cond_timedwait(&fx->sync.cond, &fx->sync.lock, &deadline) == ETIMEDOUT) {
            pthread_mutex_unlock(&fx->sync.lock);
            fail_msg("the first job never finished");
        }
    }
    pthread_mutex_unlock(&fx->sync.lock);
    forwarder_stop(fx->fwd); /* returns once every done ran */
    fx->fwd = NULL;

    assert_int_equal(c.first.calls, 1);
    assert_int_equal(c.first.job.error, FORWARD_OK);
    assert_int_equal(c.submit_failures, 0);
    assert_true(c.closed_at >= 0); /* a submit after stop began is refused */
    assert_int_equal(fx->sync.done, 1 + QUEUED + c.closed_at);
    for (int i = 0; i < QUEUED; i++) {
        assert_int_equal(queued[i].calls, 1);
        assert_int_equal(queued[i].job.error, FORWARD_CANCELLED);
        forward_job_clear(&queued[i].job);
    }
    for (int i = 0; i < PROBES; i++) {
        if (i < c.closed_at) {
            assert_int_equal(probes[i].calls, 1);
            assert_int_equal(probes[i].job.error, FORWARD_CANCELLED);
        } else {
            assert_int_equal(probes[i].calls, 0); /* refused: done is not called */
        }
        forward_job_clear(&probes[i].job);
    }
    assert_int_equal(server_seen(&fx->server).requests, 1);
    forward_job_clear(&c.first.job);
}

int main(void) {
    /* pep ignores SIGPIPE process-wide (PITFALLS: libcurl); the test does the same */
    signal(SIGPIPE, SIG_IGN);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_header_allowed_table),
        cmocka_unit_test(test_forward_response_header_relayable_table),
        cmocka_unit_test(test_forward_error_name),
        cmocka_unit_test(test_forward_job_clear),
        cmocka_unit_test_setup_teardown(test_forward_post_ok, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_get_and_redirect_not_followed, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_forward_chunked_answer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_many_concurrent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_connect_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_connect_timeout_is_connect_error, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_forward_other_protocols_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_cancel_all_in_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forwarder_stop_calls_every_done_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forward_cancel_all_cancels_queued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forwarder_stop_cancels_queued, setup, teardown),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return failed;
}
