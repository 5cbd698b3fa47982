/*
 * test_lifecycle.c — pep as a process: `pep check`, first start, restart, kill -9 in the
 * middle of a burst, SIGTERM drain, SIGHUP and admin reloads, and failing closed when the
 * audit store cannot be written (SPEC 1, 2, 6.5).
 */
#include "tests/integration/fixture.h"

#include "audit/audit.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY =
    "version: 1\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: bot, owner: alice@example.test, tenants: [acme], scopes: [llm.chat] }\n"
    "upstreams:\n"
    "  mock: { base_url: \"@MOCK@\" }\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: mock }\n"
    "actions:\n"
    "  llm.chat: { scope: llm.chat }\n";

static mode_t file_mode(const char *dir, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat st;
    return stat(path, &st) == 0 ? (st.st_mode & 0777) : (mode_t)-1;
}

/* Runs $PEP_BUILD_DIR/pep with argv (argv[0] included, NULL-terminated), its stdout and
 * stderr both in out_path, for at most 10 s.  Returns its exit status, or -1. */
static int run_pep(const char *const argv[], const char *out_path) {
    const char *build = getenv("PEP_BUILD_DIR");
    char bin[512];
    snprintf(bin, sizeof bin, "%s/pep", build && *build ? build : "build");
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(126);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    for (int waited_ms = 0; waitpid(pid, &status, WNOHANG) == 0; waited_ms += 10) {
        if (waited_ms >= 10000) { /* `check` must never start serving */
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        usleep(10000);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* SPEC 1: `pep check -c FILE` and nothing else.  A serve option given to check used to be
 * ignored (exit 0 for `--data-dir /nonexistent`), vouching for a command line it never
 * looked at. */
static void test_check_refuses_serve_options(void **state) {
    (void)state;
    char dir[256], policy[300], bad[300], out[300];
    assert_int_equal(h_tmpdir(dir), 0);
    snprintf(policy, sizeof policy, "%s/policy.yaml", dir);
    snprintf(bad, sizeof bad, "%s/bad.yaml", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    assert_int_equal(h_write_file(policy, "version: 1\n"), 0);
    assert_int_equal(h_write_file(bad, "version: 1\n"
                                       "server: { listen: '127.0.0.1:8080', "
                                       "admin_listen: '127.0.0.1:8080' }\n"),
                     0);

    const char *ok[] = {"pep", "check", "-c", policy, NULL};
    assert_int_equal(run_pep(ok, out), 0);
    char *text = h_read_file(out);
    assert_non_null(strstr(text, ": ok (policy_hash "));
    free(text);
    const char *ok_long[] = {"pep", "check", "--config", policy, NULL};
    assert_int_equal(run_pep(ok_long, out), 0);

    static const char *const serve_only[][2] = {
        {"--data-dir", "/nonexistent"},
        {"--listen", "127.0.0.1:1"},
        {"--admin-listen", "127.0.0.1:2"},
    };
    for (size_t i = 0; i < sizeof serve_only / sizeof *serve_only; i++) {
        char want[128];
        snprintf(want, sizeof want, "pep: check takes only -c FILE; %s is an option of serve\n",
                 serve_only[i][0]);
        const char *after[] = {"pep", "check", "-c", policy, serve_only[i][0], serve_only[i][1],
                               NULL};
        const char *before[] = {"pep",  "check", serve_only[i][0], serve_only[i][1], "-c",
                                policy, NULL};
        const char *const *cases[] = {after, before};
        for (size_t k = 0; k < 2; k++) {
            assert_int_equal(run_pep(cases[k], out), 2);
            text = h_read_file(out);
            assert_non_null(text);
            assert_non_null(strstr(text, want));
            assert_non_null(strstr(text, "usage:"));
            assert_null(strstr(text, ": ok (policy_hash "));
            free(text);
        }
    }

    /* serve still takes them (it fails here on the invalid policy, not on the flags). */
    const char *serve[] = {"pep", "serve",    "-c",          bad, "--data-dir",
                           dir,   "--listen", "127.0.0.1:0", NULL};
    assert_int_equal(run_pep(serve, out), 2);
    text = h_read_file(out);
    assert_null(strstr(text, "is an option of serve"));
    free(text);

    /* An invalid file: exit 2, each error as FILE:LINE:COL: message. */
    const char *invalid[] = {"pep", "check", "-c", bad, NULL};
    assert_int_equal(run_pep(invalid, out), 2);
    text = h_read_file(out);
    char want[512];
    snprintf(want, sizeof want,
             "%s:2:51: admin_listen must differ from listen (both are '127.0.0.1:8080')\n", bad);
    assert_string_equal(text, want);
    free(text);
    h_rmrf(dir);
}

static void test_first_start_creates_data_dir(void **state) {
    (void)state;
    struct fx f;
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    assert_int_equal(file_mode(f.data, "pep.db"), 0600);
    assert_int_equal(file_mode(f.data, "admin.token"), 0600);
    assert_int_equal(file_mode(f.data, "keys"), 0700);
    char keys[400];
    snprintf(keys, sizeof keys, "%s/keys", f.data);
    /* exactly one key file, 0600 */
    FILE *ls = NULL;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "stat -c %%a %s/*.pem", keys);
    ls = popen(cmd, "r");
    char line[64] = "";
    assert_non_null(fgets(line, sizeof line, ls));
    assert_string_equal(line, "600\n");
    assert_null(fgets(line, sizeof line, ls));
    pclose(ls);

    /* a token issued before a restart still works after it; admin.token is not rewritten */
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    assert_non_null(tok);
    char admin_before[2048];
    snprintf(admin_before, sizeof admin_before, "%s", f.admin_token);
    assert_int_equal(WEXITSTATUS(h_stop(&f.pep, SIGTERM)), 0);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    char path[400];
    snprintf(path, sizeof path, "%s/admin.token", f.data);
    char *admin_after = h_read_file(path);
    assert_non_null(admin_after);
    assert_int_equal(strncmp(admin_after, admin_before, strlen(admin_before)), 0);
    free(admin_after);
    char auth[2100], url[256];
    snprintf(url, sizeof url, "%s/v1/chat/completions", f.pep.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url, "{}", fx_bearer(auth, sizeof auth, tok), NULL), 0);
    assert_int_equal(r.status, 200);
    h_resp_free(&r);
    free(tok);
    fx_stop(&f);
}

struct burst {
    const char *url;
    char auth[2100];
    int sent;
    int answered;       /* requests that got an HTTP answer */
    long seqs[4096];    /* their Pep-Audit-Seq */
    char ids[4096][27]; /* their request ids */
    volatile int stop;
};

static void *burst_main(void *arg) {
    struct burst *b = arg;
    struct h_resp r = {0};
    while (!b->stop && b->answered < 4096) {
        b->sent++;
        struct h_req req = {.url = b->url,
                            .method = "POST",
                            .body = "{}",
                            .headers = (const char *const[]){b->auth, NULL},
                            .timeout_ms = 5000};
        if (h_request(&r, &req) != 0 || r.status == 0) break; /* pep is gone */
        const char *seq = h_header(&r, "Pep-Audit-Seq");
        const char *id = h_header(&r, "Pep-Request-Id");
        if (seq && id && r.status == 200) {
            b->seqs[b->answered] = atol(seq);
            snprintf(b->ids[b->answered], 27, "%s", id);
            b->answered++;
        }
    }
    h_resp_free(&r);
    return NULL;
}

static void test_kill_9_during_burst_keeps_every_answered_record(void **state) {
    (void)state;
    struct fx f;
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    char url[256];
    snprintf(url, sizeof url, "%s/v1/chat/completions", f.pep.url);
    enum { CLIENTS = 4 };
    static struct burst b[CLIENTS];
    pthread_t th[CLIENTS];
    for (int i = 0; i < CLIENTS; i++) {
        memset(&b[i], 0, sizeof b[i]);
        b[i].url = url;
        fx_bearer(b[i].auth, sizeof b[i].auth, tok);
        pthread_create(&th[i], NULL, burst_main, &b[i]);
    }
    /* let the burst run until some requests were answered, then kill -9 */
    for (int i = 0; i < 500 && b[0].answered < 50; i++)
        usleep(10000);
    h_stop(&f.pep, SIGKILL);
    for (int i = 0; i < CLIENTS; i++) {
        b[i].stop = 1;
        pthread_join(th[i], NULL);
    }
    int answered = 0;
    for (int i = 0; i < CLIENTS; i++)
        answered += b[i].answered;
    fprintf(stderr, "burst: %d requests answered before kill -9\n", answered);
    assert_true(answered > 0);

    /* offline: the chain verifies and every answered request has its decision record */
    struct audit_verify_result res;
    assert_int_equal(audit_verify_file(f.db, &res, NULL), 0);
    assert_true(res.ok);
    for (int i = 0; i < CLIENTS; i++) {
        for (int k = 0; k < b[i].answered; k++) {
            json_t *rec = fx_record(&f, b[i].ids[k], "decision");
            assert_non_null(rec);
            assert_int_equal(json_integer_value(json_object_get(rec, "seq")), b[i].seqs[k]);
            json_decref(rec);
        }
    }
    /* restart: the chain continues from the old head */
    int64_t head = res.head_seq;
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    struct h_resp r = {0};
    /* the data port changed with the restart */
    char url2[256], auth[2100];
    snprintf(url2, sizeof url2, "%s/v1/chat/completions", f.pep.url);
    assert_int_equal(h_http(&r, "POST", url2, "{}", fx_bearer(auth, sizeof auth, tok), NULL), 0);
    assert_int_equal(r.status, 200);
    assert_true(atol(h_header(&r, "Pep-Audit-Seq")) > head);
    h_resp_free(&r);
    assert_int_equal(WEXITSTATUS(h_stop(&f.pep, SIGTERM)), 0);
    assert_int_equal(audit_verify_file(f.db, &res, NULL), 0);
    assert_true(res.ok);
    assert_true(res.head_seq > head);
    free(tok);
    fx_stop(&f);
}

static void test_sigterm_drains_and_exits_zero(void **state) {
    (void)state;
    struct fx f;
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    /* a request in flight (upstream delays 500 ms) finishes during the drain */
    assert_int_equal(h_mock_fault(f.mock.url, "{\"kind\":\"delay\",\"delay_ms\":500}"), 0);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/chat/completions", f.pep.url);
    fx_bearer(auth, sizeof auth, tok);
    struct h_resp r = {0};
    pid_t pid = f.pep.pid;
    /* SIGTERM arrives 200 ms into the request, while pep waits for the upstream */
    pid_t child = fork();
    if (child == 0) {
        usleep(200000);
        kill(pid, SIGTERM);
        _exit(0);
    }
    assert_int_equal(h_http(&r, "POST", url, "{}", auth, NULL), 0);
    assert_int_equal(r.status, 200);
    /* answered while draining: a keep-alive client is told to go elsewhere */
    assert_non_null(h_header(&r, "Connection"));
    assert_string_equal(h_header(&r, "Connection"), "close");
    waitpid(child, NULL, 0);
    int status = 0;
    assert_int_equal(h_wait_exit(&f.pep, 10000, &status), 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    /* the last record is the stop record and the chain verifies */
    struct audit_verify_result res;
    assert_int_equal(audit_verify_file(f.db, &res, NULL), 0);
    assert_true(res.ok);
    h_resp_free(&r);
    free(tok);
    fx_stop(&f);
}

struct hung_call {
    char url[256], auth[2100];
    long status;
    char attempts[8];
};

static void *hung_call_main(void *arg) {
    struct hung_call *c = arg;
    struct h_resp r = {0};
    h_http(&r, "POST", c->url, "{}", c->auth, NULL);
    c->status = r.status;
    const char *a = h_header(&r, "Pep-Attempts");
    snprintf(c->attempts, sizeof c->attempts, "%s", a ? a : "");
    h_resp_free(&r);
    return NULL;
}

/* A TCP connection to the "http://127.0.0.1:PORT" of url, or -1. */
static int connect_to(const char *url) {
    const char *colon = strrchr(url, ':');
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* Past drain_timeout, calls in flight are cancelled and later ones are refused before
 * they reach the upstream (Pep-Attempts: 0, an outcome with no attempt); pep then stops
 * cleanly — a request still waiting must not be left suspended when the listeners stop. */
static void test_drain_timeout_cancels_then_refuses(void **state) {
    (void)state;
    char policy[2048];
    snprintf(policy, sizeof policy, "server: { drain_timeout: 1s }\n%s", POLICY);
    struct fx f;
    assert_int_equal(fx_start(&f, policy, NULL, NULL), 0);
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    assert_non_null(tok);
    assert_int_equal(h_mock_fault(f.mock.url, "{\"kind\":\"hang\",\"count\":1}"), 0);

    struct hung_call hung = {0};
    snprintf(hung.url, sizeof hung.url, "%s/v1/chat/completions", f.pep.url);
    fx_bearer(hung.auth, sizeof hung.auth, tok);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, hung_call_main, &hung), 0);
    /* a second request whose body is not complete yet */
    int fd = connect_to(f.pep.url);
    assert_true(fd >= 0);
    char head[4096];
    int n = snprintf(head, sizeof head,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/json\r\nContent-Length: 2\r\n"
                     "Connection: close\r\n\r\n{",
                     tok);
    assert_int_equal(write(fd, head, (size_t)n), n);
    usleep(300000);
    assert_int_equal(kill(f.pep.pid, SIGTERM), 0);
    /* the drain times out at 1 s and cancels the hung call */
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(hung.status, 503);
    assert_string_equal(hung.attempts, "1");
    /* now the second request completes: refused before the upstream */
    assert_int_equal(write(fd, "}", 1), 1);
    char reply[8192];
    size_t got = 0;
    ssize_t k;
    while (got < sizeof reply - 1 && (k = read(fd, reply + got, sizeof reply - 1 - got)) > 0)
        got += (size_t)k;
    reply[got] = '\0';
    close(fd);
    assert_int_equal(strncmp(reply, "HTTP/1.1 503", 12), 0);
    assert_non_null(strcasestr(reply, "Pep-Attempts: 0"));
    const char *id = strcasestr(reply, "Pep-Request-Id: ");
    assert_non_null(id);
    char rid[32];
    snprintf(rid, sizeof rid, "%.26s", id + 16);

    int status = 0;
    assert_int_equal(h_wait_exit(&f.pep, 15000, &status), 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    json_t *out = fx_record(&f, rid, "outcome");
    assert_non_null(out);
    assert_string_equal(json_string_value(json_object_get(out, "code")), "upstream_unavailable");
    assert_int_equal(json_array_size(json_object_get(out, "attempts")), 0);
    json_decref(out);
    struct audit_verify_result res;
    assert_int_equal(audit_verify_file(f.db, &res, NULL), 0);
    assert_true(res.ok);
    free(tok);
    fx_stop(&f);
}

static void test_reload_keeps_policy_on_errors(void **state) {
    (void)state;
    struct fx f;
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&f, &r, "GET", "/admin/v1/policy", NULL), 0);
    assert_int_equal(r.status, 200);
    json_t *j = h_json(&r);
    char hash_before[65];
    snprintf(hash_before, sizeof hash_before, "%s",
             json_string_value(json_object_get(j, "policy_hash")));
    json_decref(j);

    /* an invalid file: 422 with every error, the old policy stays */
    assert_int_equal(h_write_file(f.policy, "version: 1\nroutes: 3\nbogus: 1\n"), 0);
    assert_int_equal(fx_admin(&f, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 422);
    j = h_json(&r);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "invalid_policy");
    json_t *errors = json_object_get(err, "errors");
    if (!errors) errors = json_object_get(j, "errors");
    assert_true(json_array_size(errors) >= 2);
    assert_non_null(strstr(json_string_value(json_array_get(errors, 0)), "policy.yaml:2:"));
    json_decref(j);
    /* SIGHUP with the same invalid file: pep keeps running on the old policy */
    kill(f.pep.pid, SIGHUP);
    usleep(200000);
    assert_int_equal(kill(f.pep.pid, 0), 0);
    assert_int_equal(fx_admin(&f, &r, "GET", "/admin/v1/policy", NULL), 0);
    j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(j, "policy_hash")), hash_before);
    json_decref(j);

    /* a valid file with a new route: SIGHUP switches to it */
    char *text = NULL;
    assert_true(asprintf(&text,
                         "version: 1\nagents:\n  - { id: bot, owner: a, tenants: [acme], scopes: "
                         "[llm.chat] }\nupstreams:\n  mock: { base_url: \"%s\" }\nroutes:\n"
                         "  - match: { method: POST, path: /v2/chat }\n    action: llm.chat\n"
                         "    forward: { upstream: mock }\nactions:\n  llm.chat: { scope: "
                         "llm.chat }\n",
                         f.mock.url) > 0);
    assert_int_equal(h_write_file(f.policy, text), 0);
    free(text);
    kill(f.pep.pid, SIGHUP);
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v2/chat", f.pep.url);
    long status = 0;
    for (int i = 0; i < 100 && status != 200; i++) { /* the reload is asynchronous */
        assert_int_equal(h_http(&r, "POST", url, "{}", fx_bearer(auth, sizeof auth, tok), NULL), 0);
        status = r.status;
        if (status != 200) usleep(20000);
    }
    assert_int_equal(status, 200);
    h_resp_free(&r);
    free(tok);
    fx_stop(&f);
}

static void test_audit_write_failure_fails_closed(void **state) {
    (void)state;
    struct fx f;
    /* A file-size limit the audit store will hit after a few hundred records: every write
     * past it fails with EFBIG, a real I/O failure. */
    struct h_spawn_opts opts = {.fsize_limit = 512 * 1024};
    assert_int_equal(fx_start(&f, POLICY, NULL, &opts), 0);
    char *tok = fx_issue(&f, "bot", NULL, NULL);
    assert_non_null(tok);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/chat/completions", f.pep.url);
    fx_bearer(auth, sizeof auth, tok);
    struct h_resp r = {0};
    long status = 0;
    int i;
    for (i = 0; i < 20000 && status != 503; i++) {
        assert_int_equal(h_http(&r, "POST", url, "{}", auth, NULL), 0);
        status = r.status;
    }
    fprintf(stderr, "audit store full after %d requests\n", i);
    assert_int_equal(status, 503);
    json_t *j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "audit_unavailable");
    json_decref(j);
    assert_null(h_header(&r, "Pep-Audit-Seq"));
    /* nothing is forwarded while the log cannot be written */
    json_t *before = h_mock_stats(f.mock.url);
    json_int_t hits = json_integer_value(json_object_get(before, "hits"));
    json_decref(before);
    for (int k = 0; k < 5; k++) {
        assert_int_equal(h_http(&r, "POST", url, "{}", auth, NULL), 0);
        assert_int_equal(r.status, 503);
    }
    json_t *after = h_mock_stats(f.mock.url);
    assert_int_equal(json_integer_value(json_object_get(after, "hits")), hits);
    json_decref(after);
    /* readiness reports it; liveness does not */
    char probe[256];
    snprintf(probe, sizeof probe, "%s/readyz", f.pep.url);
    assert_int_equal(h_http(&r, "GET", probe, NULL, NULL), 0);
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body, "audit_unavailable"));
    snprintf(probe, sizeof probe, "%s/healthz", f.pep.url);
    assert_int_equal(h_http(&r, "GET", probe, NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    /* a reload that cannot be audited is not made: the active policy stays */
    assert_int_equal(fx_admin(&f, &r, "GET", "/admin/v1/policy", NULL), 0);
    j = h_json(&r);
    char *hash_before = strdup(json_string_value(json_object_get(j, "policy_hash")));
    json_decref(j);
    char *text = h_read_file(f.policy), *edited = NULL;
    assert_non_null(text);
    assert_true(asprintf(&edited, "%s# edited\n", text) > 0);
    free(text);
    assert_int_equal(h_write_file(f.policy, edited), 0);
    assert_int_equal(fx_admin(&f, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 503);
    j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "audit_unavailable");
    json_decref(j);
    assert_int_equal(fx_admin(&f, &r, "GET", "/admin/v1/policy", NULL), 0);
    j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(j, "policy_hash")), hash_before);
    json_decref(j);
    free(edited);
    free(hash_before);
    h_resp_free(&r);
    h_stop(&f.pep, SIGKILL);
    struct audit_verify_result res;
    assert_int_equal(audit_verify_file(f.db, &res, NULL), 0);
    assert_true(res.ok);
    free(tok);
    fx_stop(&f);
}

/* Reloads with a file whose start-only settings changed are refused where they are
 * written; durability and checkpoint_every apply from the next batch on. */
static void test_reload_start_only_and_live_settings(void **state) {
    (void)state;
    static const char *const base = "version: 1\n"
                                    "server:\n"
                                    "  listen: 127.0.0.1:0\n"
                                    "  admin_listen: 127.0.0.1:0\n"
                                    "%s"
                                    "agents:\n"
                                    "  - { id: bot, owner: a, tenants: [acme], scopes: [x] }\n";
    char *text = NULL;
    assert_true(asprintf(&text, base, "") > 0);
    struct fx f;
    struct h_spawn_opts opts = {.listen_from_policy = true};
    assert_int_equal(fx_start(&f, text, NULL, &opts), 0);
    free(text);

    struct h_resp r = {0};
    char *moved = NULL;
    assert_true(asprintf(&moved, base, "") > 0);
    char *at = strstr(moved, "  listen: 127.0.0.1:0");
    at[strlen("  listen: 127.0.0.")] = '2'; /* 127.0.0.2:0 */
    assert_int_equal(h_write_file(f.policy, moved), 0);
    free(moved);
    assert_int_equal(fx_admin(&f, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 422);
    json_t *j = h_json(&r);
    const char *e0 = json_string_value(
        json_array_get(json_object_get(json_object_get(j, "error"), "errors"), 0));
    assert_non_null(e0);
    assert_non_null(strstr(e0, "policy.yaml:3:11: server.listen changed from '127.0.0.1:0' to "
                               "'127.0.0.2:0'"));
    json_decref(j);

    assert_true(asprintf(&text, base, "audit: { durability: normal, checkpoint_every: 2 }\n") > 0);
    assert_int_equal(h_write_file(f.policy, text), 0);
    free(text);
    assert_int_equal(fx_admin(&f, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 200);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(fx_admin(&f, &r, "POST", "/admin/v1/agents/bot/disable", NULL), 0);
        assert_int_equal(r.status, 200);
    }
    h_resp_free(&r);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(f.db, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*) FROM checkpoints", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_true(sqlite3_column_int(st, 0) >= 2); /* default 1000 would have made none yet */
    sqlite3_finalize(st);
    sqlite3_close(db);
    fx_stop(&f);
}

/* An upstream credential read from an unset variable is announced at start: the request
 * path reads it per call, so pep runs, but an operator must learn why the upstream says 401. */
static void test_unset_credential_variables_are_warned(void **state) {
    (void)state;
    struct fx f;
    assert_int_equal(fx_start(&f,
                              "version: 1\n"
                              "upstreams:\n"
                              "  m:\n"
                              "    base_url: \"@MOCK@\"\n"
                              "    api_key_env: PEP_IT_SURELY_UNSET_KEY\n"
                              "    headers: { x-api-key: { env: PEP_IT_SURELY_UNSET_HDR } }\n",
                              NULL, NULL),
                     0);
    char *err = h_read_file(f.pep.err_path);
    assert_non_null(err);
    assert_non_null(strstr(err, "upstream m: api_key_env PEP_IT_SURELY_UNSET_KEY is not set"));
    assert_non_null(
        strstr(err, "upstream m: header x-api-key: PEP_IT_SURELY_UNSET_HDR is not set"));
    free(err);
    fx_stop(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_refuses_serve_options),
        cmocka_unit_test(test_first_start_creates_data_dir),
        cmocka_unit_test(test_kill_9_during_burst_keeps_every_answered_record),
        cmocka_unit_test(test_sigterm_drains_and_exits_zero),
        cmocka_unit_test(test_drain_timeout_cancels_then_refuses),
        cmocka_unit_test(test_reload_keeps_policy_on_errors),
        cmocka_unit_test(test_reload_start_only_and_live_settings),
        cmocka_unit_test(test_unset_credential_variables_are_warned),
        cmocka_unit_test(test_audit_write_failure_fails_closed),
    };
    return cmocka_run_group_tests_name("lifecycle", tests, NULL, NULL);
}
