/*
 * test_hardening.c — what an attacker's bytes cannot make pep do (SPEC 3.2 step 2, 3.3,
 * 4.7 and 8): split a line toward the upstream, hold the listeners without a credential,
 * fill the audit store without one, or have an answer relayed that the upstream never
 * sent whole.
 *
 * The upstream here is rawup (rawup.h): it parses as leniently as Python's http.server
 * (a bare CR ends a line), records every request it parsed, and answers with scripted
 * bytes.  So "the upstream saw exactly the request pep meant to send" is checked on what
 * such an upstream would actually act on.
 */
#include "tests/integration/fixture.h"
#include "tests/integration/rawup.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY =
    "version: 1\n"
    "server: { max_body: 2MiB @SERVER@ }\n"
    "audit: { durability: normal }\n"
    "agents:\n"
    "  - { id: bot, owner: alice@example.test, tenants: [acme], scopes: [llm.chat] }\n"
    "upstreams:\n"
    "  raw: { base_url: \"@RAW@\", api_key_env: IT_RAW_KEY, timeout: 5s }\n"
    "  mock: { base_url: \"@MOCK@\", timeout: 5s }\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: raw }\n"
    "  - match: { method: POST, path: /v1/mock }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: mock, path: /v1/chat/completions }\n"
    "actions:\n"
    "  llm.chat: { scope: llm.chat }\n";

#ifdef __SANITIZE_ADDRESS__
#define RSS_BOUND_MIB 768
#else
#define RSS_BOUND_MIB 256
#endif

static const char *OK_ANSWER = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               "Content-Length: 11\r\n\r\n{\"ok\":true}";

/* F: default limits.  L: a short receive_timeout and an unauthenticated_limit. */
static struct fx F, L;
static struct rawup *RAW;
static char RAW_URL[64];
static char *TOKEN, *L_TOKEN;

/* POLICY with @RAW@ and @SERVER@ filled in (caller frees). */
static char *policy_text(const char *server_extra) {
    char *with_raw = fx_replace_all(POLICY, "@RAW@", RAW_URL);
    char *out = with_raw ? fx_replace_all(with_raw, "@SERVER@", server_extra) : NULL;
    free(with_raw);
    return out;
}

static int group_setup(void **state) {
    (void)state;
    /* 4,000 client sockets below: lift this process's soft limit to the hard one. */
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    RAW = rawup_start(RAW_URL, sizeof RAW_URL);
    if (!RAW) return -1;
    rawup_script(RAW, OK_ANSWER, strlen(OK_ANSWER), false);
    char *env[] = {"IT_RAW_KEY=sk-raw-upstream-key", NULL};
    char *text = policy_text("");
    int rc = fx_start(&F, text, env, NULL);
    free(text);
    text = policy_text(", receive_timeout: 1s, unauthenticated_limit: { limit: 3, window: 2s }");
    if (rc == 0) rc = fx_start(&L, text, env, NULL);
    free(text);
    if (rc != 0) return -1;
    TOKEN = fx_issue(&F, "bot", NULL, NULL);
    L_TOKEN = fx_issue(&L, "bot", NULL, NULL);
    return TOKEN && L_TOKEN ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    free(TOKEN);
    free(L_TOKEN);
    fx_stop(&F);
    fx_stop(&L);
    rawup_stop(RAW);
    return 0;
}

/* ---- raw sockets ---------------------------------------------------------------------- */

static int connect_to(const char *base_url) {
    unsigned port = 0;
    if (sscanf(base_url, "http://127.0.0.1:%u", &port) != 1) return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool send_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        c += k;
        n -= (size_t)k;
    }
    return true;
}

/* Reads until the peer closes or timeout_ms pass; *closed says which.  Returns what was
 * read (caller frees). */
static char *read_until_close(int fd, int timeout_ms, bool *closed) {
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    *closed = false;
    for (;;) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        long left =
            timeout_ms - ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, (int)left) <= 0) break;
        if (cap - len < 4096) buf = realloc(buf, cap *= 2);
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            *closed = true;
            break;
        }
        len += (size_t)n;
    }
    buf[len] = '\0';
    return buf;
}

static int status_of(const char *reply) {
    int status = 0;
    sscanf(reply, "HTTP/1.1 %d", &status);
    return status;
}

/* Sends raw to base_url, reads the answer until close (5 s at most); returns its status. */
static int raw_status(const char *base_url, const char *raw, size_t len, char **reply_out) {
    int fd = connect_to(base_url);
    if (fd < 0) return -1;
    send_all(fd, raw, len ? len : strlen(raw));
    bool closed;
    char *reply = read_until_close(fd, 5000, &closed);
    close(fd);
    int status = status_of(reply);
    if (reply_out)
        *reply_out = reply;
    else
        free(reply);
    return status;
}

static long rss_kib(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    char *text = h_read_file(path);
    const char *line = text ? strstr(text, "VmRSS:") : NULL;
    long kib = line ? atol(line + 6) : -1;
    free(text);
    return kib;
}

/* One allowed call through pep to the raw upstream; returns its status. */
static long agent_call(struct fx *f, const char *token, const char *path) {
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s%s", f->pep.url, path);
    struct h_resp r = {0};
    h_http(&r, "POST", url, "{\"model\":\"m\"}", fx_bearer(auth, sizeof auth, token), NULL);
    long status = r.status;
    h_resp_free(&r);
    return status;
}

/* ---- 1. nothing an agent sends can split a line toward the upstream ------------------- */

static void test_control_bytes_in_the_head_are_refused(void **state) {
    (void)state;
    /* Each would let an upstream that takes a bare CR for a line break read what the
     * agent wrote: its own Authorization ahead of pep's key, a forged X-Request-Id, or a
     * second request (left incomplete, to swallow the next agent's) that pep never
     * routed, authorized or audited. */
    static const char *const values[] = {
        "a\rAuthorization: Bearer agent-chosen",
        "a\rX-Request-Id: forged",
        "a\rContent-Length: 0\r\rPOST /smuggled HTTP/1.1\rHost: x\rContent-Length: 400\r",
        "a\x01"
        "b",
        "a\x7f"
        "b",
        "a\x0b"
        "b",
    };
    rawup_reset(RAW);
    for (size_t i = 0; i < sizeof values / sizeof *values; i++) {
        char raw[8192], *reply = NULL;
        int n = snprintf(raw, sizeof raw,
                         "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         "Authorization: Bearer %s\r\nX-Note: %s\r\nContent-Length: 2\r\n\r\n{}",
                         TOKEN, values[i]);
        int status = raw_status(F.pep.url, raw, (size_t)n, &reply);
        if (status != 400) fail_msg("value %zu answered %d: %s", i, status, reply);
        assert_non_null(strstr(reply, "control byte"));
        assert_non_null(strstr(reply, "Connection: close"));
        free(reply);
        /* the admin listener too */
        n = snprintf(raw, sizeof raw,
                     "GET /admin/v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "X-Note: %s\r\n\r\n",
                     F.admin_token, values[i]);
        assert_int_equal(raw_status(F.pep.admin_url, raw, (size_t)n, NULL), 400);
    }
    /* a tab is field content */
    char raw[8192];
    int n = snprintf(raw, sizeof raw,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "X-Note: a\tb\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                     TOKEN);
    assert_int_equal(raw_status(F.pep.url, raw, (size_t)n, NULL), 200);
    /* The upstream saw that one request and nothing else: no smuggled request, and the
     * next agent's request was not swallowed by one left incomplete. */
    assert_int_equal(agent_call(&F, TOKEN, "/v1/chat/completions"), 200);
    assert_int_equal(rawup_count(RAW), 2);
    for (size_t i = 0; i < 2; i++) {
        struct rawup_request req;
        assert_true(rawup_get(RAW, i, &req));
        assert_string_equal(req.lines[0], "POST /v1/chat/completions HTTP/1.1");
        size_t auths;
        assert_string_equal(rawup_header(&req, "Authorization", &auths),
                            "Bearer sk-raw-upstream-key");
        assert_int_equal(auths, 1);
        rawup_request_free(&req);
    }
}

static void test_methods_must_be_tokens(void **state) {
    (void)state;
    static const char *const lines[] = {"GET\t/secret HTTP/1.1",
                                        "G(T /v1/chat/completions HTTP/1.1",
                                        "POST\x01 /v1/chat/completions HTTP/1.1"};
    rawup_reset(RAW);
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++) {
        char raw[4096];
        int n = snprintf(raw, sizeof raw, "%s\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n",
                         lines[i], TOKEN);
        int status = raw_status(F.pep.url, raw, (size_t)n, NULL);
        if (status != 400) fail_msg("request line %zu answered %d", i, status);
    }
    assert_int_equal(rawup_count(RAW), 0);
}

/* SPEC 4.7: what reaches the upstream is what pep decided on, with pep's own credential,
 * request id and client address — and nothing that re-routes, re-methods or re-attributes
 * the call. */
static void test_upstream_sees_exactly_the_decided_request(void **state) {
    (void)state;
    rawup_reset(RAW);
    char raw[8192], *reply = NULL;
    int n = snprintf(raw, sizeof raw,
                     "POST /v1/chat/completions?q=1 HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\n"
                     "X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\n"
                     "X-Method-Override: DELETE\r\nX-Original-URL: /admin\r\n"
                     "X-Rewrite-URL: /admin\r\nForwarded: for=203.0.113.9\r\n"
                     "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Host: evil.example\r\n"
                     "Connection: keep-alive, X-Hop-A\r\nConnection: X-Hop-B\r\n"
                     "X-Hop-A: 1\r\nX-Hop-B: 1\r\nCookie: s=1\r\nPep-Approval: x\r\n"
                     "X-Request-Id: forged\r\nX-Keep: yes\r\nContent-Type: application/json\r\n"
                     "Content-Length: 2\r\n\r\n{}",
                     TOKEN);
    int fd = connect_to(F.pep.url);
    assert_true(fd >= 0);
    assert_true(send_all(fd, raw, (size_t)n));
    bool closed;
    reply = read_until_close(fd, 2000, &closed); /* kept alive: read what came */
    close(fd);
    assert_int_equal(status_of(reply), 200);
    const char *rid = strstr(reply, "Pep-Request-Id: ");
    assert_non_null(rid);
    char request_id[32] = {0};
    sscanf(rid + 16, "%26s", request_id);
    free(reply);

    assert_int_equal(rawup_count(RAW), 1);
    struct rawup_request req;
    assert_true(rawup_get(RAW, 0, &req));
    assert_string_equal(req.lines[0], "POST /v1/chat/completions?q=1 HTTP/1.1");
    static const char *const gone[] = {"X-HTTP-Method-Override",
                                       "X-HTTP-Method",
                                       "X-Method-Override",
                                       "X-Original-URL",
                                       "X-Rewrite-URL",
                                       "Forwarded",
                                       "X-Forwarded-Host",
                                       "X-Hop-A",
                                       "X-Hop-B",
                                       "Cookie",
                                       "Pep-Approval",
                                       "Connection"};
    for (size_t i = 0; i < sizeof gone / sizeof *gone; i++)
        if (rawup_header(&req, gone[i], NULL)) fail_msg("%s reached the upstream", gone[i]);
    size_t count;
    assert_string_equal(rawup_header(&req, "X-Forwarded-For", &count), "127.0.0.1");
    assert_int_equal(count, 1);
    assert_string_equal(rawup_header(&req, "X-Request-Id", &count), request_id);
    assert_int_equal(count, 1);
    assert_string_equal(rawup_header(&req, "Authorization", &count), "Bearer sk-raw-upstream-key");
    assert_int_equal(count, 1);
    assert_string_equal(rawup_header(&req, "X-Keep", NULL), "yes");
    assert_int_equal(req.body_len, 2);
    rawup_request_free(&req);
}

/* ---- 2. tokenless clients cannot hold pep --------------------------------------------- */

/* Answered from the head: the client has sent none of its declared megabyte. */
static void test_tokenless_request_answered_before_its_body(void **state) {
    (void)state;
    int fd = connect_to(F.pep.url);
    assert_true(fd >= 0);
    const char *head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n";
    assert_true(send_all(fd, head, strlen(head)));
    bool closed;
    char *reply = read_until_close(fd, 10000, &closed);
    close(fd);
    assert_int_equal(status_of(reply), 401);
    assert_non_null(strstr(reply, "\"invalid_token\""));
    assert_non_null(strstr(reply, "Connection: close"));
    assert_true(closed); /* and the connection is closed (after lingering) */
    free(reply);
    /* the admin listener too: no operator token, no body read */
    fd = connect_to(F.pep.admin_url);
    assert_true(fd >= 0);
    const char *admin_head = "POST /admin/v1/agents HTTP/1.1\r\nHost: x\r\n"
                             "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n";
    assert_true(send_all(fd, admin_head, strlen(admin_head)));
    reply = read_until_close(fd, 10000, &closed);
    close(fd);
    assert_int_equal(status_of(reply), 401);
    assert_true(closed);
    free(reply);
    /* an HTTP client library sending a large body without a token sees the 401 */
    char *body = malloc(1500001);
    memset(body, ' ', 1500000);
    body[0] = '{';
    body[1499999] = '}';
    body[1500000] = '\0';
    char url[256];
    snprintf(url, sizeof url, "%s/v1/chat/completions", F.pep.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url, body, NULL), 0);
    assert_int_equal(r.status, 401);
    h_resp_free(&r);
    free(body);
}

struct upload {
    const char *url;
    const char *auth; /* "Authorization: …\r\n" or "" */
    int status;
};

/* Sends a whole 1 MB body the way an SDK does — all of it, then reads the answer. */
static void *upload_thread(void *arg) {
    struct upload *u = arg;
    enum { BODY = 1000000 };
    char *buf = malloc(BODY + 4096);
    int n = snprintf(buf, 4096,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n",
                     u->auth, BODY);
    memset(buf + n, ' ', BODY);
    buf[n] = '{';
    buf[n + BODY - 1] = '}';
    int fd = connect_to(u->url);
    struct timeval tv = {.tv_sec = 20};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* A small send buffer, as over a real network path: on loopback the whole megabyte
     * would otherwise sit in kernel buffers before pep answers, hiding a reset. */
    int sndbuf = 32 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    u->status = -1;
    if (fd >= 0 && send_all(fd, buf, (size_t)n + BODY)) {
        bool closed;
        char *reply = read_until_close(fd, 20000, &closed);
        u->status = status_of(reply);
        free(reply);
    } else {
        u->status = -2; /* the upload itself failed: reset before the answer */
    }
    if (fd >= 0) close(fd);
    free(buf);
    return NULL;
}

static void test_tokenless_uploads_read_their_401(void **state) {
    (void)state;
    long rss_before = rss_kib(F.pep.pid);
    enum { N = 100 };
    pthread_t threads[N];
    struct upload ups[N];
    for (int i = 0; i < N; i++) {
        ups[i] = (struct upload){.url = F.pep.url, .auth = ""};
        pthread_create(&threads[i], NULL, upload_thread, &ups[i]);
    }
    /* an agent with a token is served meanwhile */
    for (int i = 0; i < 10; i++)
        assert_int_equal(agent_call(&F, TOKEN, "/v1/chat/completions"), 200);
    long rss_peak = rss_kib(F.pep.pid);
    for (int i = 0; i < N; i++) {
        pthread_join(threads[i], NULL);
        if (ups[i].status != 401) fail_msg("upload %d: %d", i, ups[i].status);
    }
    long rss_after = rss_kib(F.pep.pid);
    if (rss_after > rss_peak) rss_peak = rss_after;
    fprintf(stderr, "pep RSS: %ld KiB before, %ld KiB with 100 tokenless 1 MB uploads\n",
            rss_before, rss_peak);
    /* Bodies without a token are never buffered: far below 100 × 1 MB. */
    assert_true(rss_peak - rss_before < 64 * 1024);
}

/* 4,000 slow tokenless connections (half trickling a body, half their head) while an agent
 * with a token and /healthz keep being answered, in bounded memory. */
static void test_slow_tokenless_connections_do_not_hold_pep(void **state) {
    (void)state;
    enum { N = 4000 };
    long rss_before = rss_kib(F.pep.pid);
    int *fds = malloc(N * sizeof *fds);
    int opened = 0;
    for (int i = 0; i < N; i++) {
        fds[i] = connect_to(F.pep.url);
        if (fds[i] < 0) break;
        opened++;
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        const char *start = i % 2 ? "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                    "Content-Length: 1000\r\n\r\n{"
                                  : "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        send(fds[i], start, strlen(start), MSG_NOSIGNAL);
    }
    fprintf(stderr, "%d slow connections opened\n", opened);
    assert_true(opened >= N - 100);
    char url[256];
    snprintf(url, sizeof url, "%s/healthz", F.pep.url);
    long rss_peak = 0;
    for (int round = 0; round < 7; round++) {
        for (int i = 0; i < opened; i++) /* one more byte each */
            if (fds[i] >= 0) send(fds[i], "a", 1, MSG_NOSIGNAL);
        struct h_resp r = {0};
        assert_int_equal(h_http(&r, "GET", url, NULL, NULL), 0);
        assert_int_equal(r.status, 200);
        h_resp_free(&r);
        assert_int_equal(agent_call(&F, TOKEN, "/v1/chat/completions"), 200);
        long rss = rss_kib(F.pep.pid);
        if (rss > rss_peak) rss_peak = rss;
        sleep(1);
    }
    /* The tokenless ones trickling a body were answered from their head and let go after
     * lingering (at most CONN_LINGER_TOTAL_MS): pep holds none of them any more. */
    int let_go = 0, trickling = 0;
    for (int i = 1; i < opened; i += 2) {
        trickling++;
        char sink[4096];
        ssize_t n;
        while ((n = recv(fds[i], sink, sizeof sink, MSG_DONTWAIT)) > 0)
            ;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) let_go++;
    }
    for (int i = 0; i < opened; i++)
        close(fds[i]);
    free(fds);
    fprintf(stderr,
            "pep RSS: %ld KiB before, %ld KiB peak with %d slow connections; "
            "%d of %d trickling bodies let go\n",
            rss_before, rss_peak, opened, let_go, trickling);
    assert_int_equal(let_go, trickling);
    /* The bound docs/behaviour.md states: 4,000 held connections cost pep < 256 MiB, in the
     * ordinary build; ASan's shadow memory and quarantine take several times more. */
    assert_true(rss_peak - rss_before < RSS_BOUND_MIB * 1024);
}

/* A head or body that trickles in is cut at receive_timeout (1 s in L), whatever the
 * client's pace between bytes. */
static void test_receive_deadline(void **state) {
    (void)state;
    static const char *const starts[] = {
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        NULL, /* with a token, a body that trickles */
    };
    for (size_t i = 0; i < 2; i++) {
        char start[4096];
        if (starts[i])
            snprintf(start, sizeof start, "%s", starts[i]);
        else
            snprintf(start, sizeof start,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{",
                     L_TOKEN);
        int fd = connect_to(L.pep.url);
        assert_true(fd >= 0);
        assert_true(send_all(fd, start, strlen(start)));
        bool closed = false;
        for (int k = 0; k < 50 && !closed; k++) { /* a byte every 200 ms, 10 s at most */
            if (send(fd, "a", 1, MSG_NOSIGNAL) < 0) {
                closed = true;
                break;
            }
            char *r = read_until_close(fd, 200, &closed);
            free(r);
        }
        close(fd);
        if (!closed) fail_msg("connection %zu was not cut at receive_timeout", i);
    }
    /* a request that arrives in time is served as usual */
    assert_int_equal(agent_call(&L, L_TOKEN, "/v1/chat/completions"), 200);
}

/* ---- 6. unauthenticated floods cannot fill the audit store ----------------------------- */

static void test_unauthenticated_limit(void **state) {
    (void)state;
    long denied_before =
        fx_count_records_where(&L, "json_extract(record, '$.code') = 'invalid_token'");
    char url[256];
    snprintf(url, sizeof url, "%s/v1/chat/completions", L.pep.url);
    struct h_resp r = {0};
    int limited = 0;
    for (int i = 0; i < 6; i++) {
        assert_int_equal(h_http(&r, "POST", url, "{}", "Authorization: Bearer nope", NULL), 0);
        if (i < 3) {
            assert_int_equal(r.status, 401);
            continue;
        }
        assert_int_equal(r.status, 429);
        limited++;
        json_t *j = h_json(&r);
        json_t *err = json_object_get(j, "error");
        assert_string_equal(json_string_value(json_object_get(err, "code")), "rate_limited");
        assert_true(json_integer_value(json_object_get(err, "retry_after_s")) >= 1);
        json_decref(j);
        assert_non_null(h_header(&r, "Retry-After"));
        assert_true(atoi(h_header(&r, "Retry-After")) >= 1);
        assert_null(h_header(&r, "Pep-Audit-Seq")); /* counted, not audited one by one */
    }
    h_resp_free(&r);
    /* a valid token is never limited by it */
    assert_int_equal(agent_call(&L, L_TOKEN, "/v1/chat/completions"), 200);
    assert_int_equal(fx_count_records_where(&L, "json_extract(record, '$.code') = 'invalid_token'"),
                     denied_before + 3);
    /* one system record for the window, at the latest one window after it ends */
    long found = 0;
    for (int i = 0; i < 100 && found == 0; i++) {
        found = fx_count_records_where(
            &L, "json_extract(record, '$.action') = 'unauthenticated_limit' AND "
                "json_extract(record, '$.kind') = 'system' AND "
                "json_extract(record, '$.source') = '127.0.0.1' AND "
                "json_extract(record, '$.count') = 3");
        if (found == 0) usleep(100000);
    }
    assert_int_equal(found, 1);
    assert_int_equal(limited, 3);
}

/* ---- 4. answers pep cannot relay faithfully are failed attempts ------------------------ */

static json_t *outcome_of(struct fx *f, const char *request_id) {
    json_t *rec = NULL;
    for (int i = 0; i < 50 && !rec; i++) {
        rec = fx_record(f, request_id, "outcome");
        if (!rec) usleep(100000);
    }
    return rec;
}

static void assert_unrelayable(const char *answer, size_t len) {
    rawup_script(RAW, answer, len, true);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/chat/completions", F.pep.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url, "{}", fx_bearer(auth, sizeof auth, TOKEN), NULL), 0);
    if (r.status != 503) fail_msg("answered %ld: %.200s", r.status, r.body);
    json_t *j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "upstream_unavailable");
    json_decref(j);
    json_t *out = outcome_of(&F, h_header(&r, "Pep-Request-Id"));
    assert_non_null(out);
    assert_string_equal(json_string_value(json_object_get(out, "code")), "upstream_unavailable");
    assert_int_equal(json_integer_value(json_object_get(out, "status")), 503);
    json_t *attempt = json_array_get(json_object_get(out, "attempts"), 0);
    assert_string_equal(json_string_value(json_object_get(attempt, "error")), "connect_error");
    json_decref(out);
    h_resp_free(&r);
}

static void test_unrelayable_answers_are_failed_attempts(void **state) {
    (void)state;
    size_t big = 33 * 1024;
    char *answer = malloc(big + 256);
    /* a head over 32 KiB */
    int n = sprintf(answer, "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(answer + n, 'a', big);
    n += (int)big;
    n += sprintf(answer + n, "\r\nContent-Length: 2\r\n\r\n{}");
    assert_unrelayable(answer, (size_t)n);
    /* under the forwarder's 32 KiB cap, but not beside the agent's request head in its
     * connection: relayed, it would reach the agent as an empty reply */
    n = sprintf(answer, "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(answer + n, 'c', 31 * 1024);
    n += 31 * 1024;
    n += sprintf(answer + n, "\r\nContent-Length: 2\r\n\r\n{}");
    assert_unrelayable(answer, (size_t)n);
    /* a head cut off by the upstream closing */
    const char *cut = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n";
    assert_unrelayable(cut, strlen(cut));
    /* a status outside 200-599 */
    const char *weird = "HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\n{}";
    assert_unrelayable(weird, strlen(weird));
    /* a head that fits the agent's connection beside its request is relayed whole */
    n = sprintf(answer, "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(answer + n, 'b', 24 * 1024);
    n += 24 * 1024;
    n += sprintf(answer + n, "\r\nContent-Length: 2\r\n\r\n{}");
    rawup_script(RAW, answer, (size_t)n, false);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/chat/completions", F.pep.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url, "{}", fx_bearer(auth, sizeof auth, TOKEN), NULL), 0);
    assert_int_equal(r.status, 200);
    assert_non_null(h_header(&r, "X-Big"));
    assert_int_equal(strlen(h_header(&r, "X-Big")), 24 * 1024);
    h_resp_free(&r);
    free(answer);
    rawup_script(RAW, OK_ANSWER, strlen(OK_ANSWER), false);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_control_bytes_in_the_head_are_refused),
        cmocka_unit_test(test_methods_must_be_tokens),
        cmocka_unit_test(test_upstream_sees_exactly_the_decided_request),
        cmocka_unit_test(test_tokenless_request_answered_before_its_body),
        cmocka_unit_test(test_tokenless_uploads_read_their_401),
        cmocka_unit_test(test_slow_tokenless_connections_do_not_hold_pep),
        cmocka_unit_test(test_receive_deadline),
        cmocka_unit_test(test_unauthenticated_limit),
        cmocka_unit_test(test_unrelayable_answers_are_failed_attempts),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
