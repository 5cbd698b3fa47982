/*
 * test_admin.c — the admin API's input checks and answer shapes (SPEC 5, 8) against a
 * real pep: bounds that arithmetic must not bypass, lists newest last, identifiers that
 * tokens and canonical records must be able to carry, and error answers that stay JSON
 * whatever bytes a client put in a path.
 *
 * One pep serves the whole group; each test uses its own agents.
 *
 * A second group runs GET /admin/v1/audit/verify on a store of VERIFY_RECORDS records
 * (a valid chain appended while pep is stopped, see append_records): the walk takes
 * seconds, and other admin calls must not wait for it, nor the WAL grow while it reads.
 * Those tests assert orderings (which call completed first), never durations: a shared
 * 2-core CI machine makes any threshold flaky.
 */
#include "tests/integration/fixture.h"

#include "audit/audit.h"
#include "pep/keys.h"
#include "pep/util.h"

#include <dirent.h>
#include <pthread.h>
#include <setjmp.h>
#include <sqlite3.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY = "version: 1\n"
                            "identity: { max_token_ttl: 1d }\n"
                            "agents:\n"
                            "  - { id: bot, owner: ops, tenants: [acme], scopes: [llm.chat] }\n"
                            "upstreams:\n"
                            "  mock: { base_url: \"@MOCK@\" }\n"
                            "routes:\n"
                            "  - match: { method: GET, path: \"/v1/tenants/{tenant}/search\" }\n"
                            "    action: tool.search\n"
                            "    forward: { upstream: mock, path: /search }\n"
                            "actions:\n"
                            "  tool.search: { scope: tool.search }\n";

static struct fx F;

static int group_setup(void **state) {
    (void)state;
    return fx_start(&F, POLICY, NULL, NULL);
}

static int group_teardown(void **state) {
    (void)state;
    fx_stop(&F);
    return 0;
}

/* Calls the admin API and checks the SPEC 3.3 error shape when status is an error. */
static json_t *admin_expect(const char *method, const char *path, const char *body, long status,
                            const char *code) {
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&F, &r, method, path, body), 0);
    if (r.status != status)
        fail_msg("%s %s %s: HTTP %ld, want %ld: %s", method, path, body ? body : "", r.status,
                 status, r.body);
    json_t *j = h_json(&r);
    if (!j) fail_msg("%s %s: the answer is not JSON: '%s'", method, path, r.body);
    if (code) {
        json_t *err = json_object_get(j, "error");
        assert_string_equal(json_string_value(json_object_get(err, "type")), "pep_error");
        assert_string_equal(json_string_value(json_object_get(err, "code")), code);
        assert_non_null(json_string_value(json_object_get(err, "message")));
        assert_non_null(json_string_value(json_object_get(err, "request_id")));
    }
    h_resp_free(&r);
    return j;
}

static void test_ttl_cannot_overflow_the_limit(void **state) {
    (void)state;
    /* ttl * 1000 would overflow int64 and compare as small (or negative). */
    static const char *const bodies[] = {
        "{\"ttl\":10000000000000000}",
        "{\"ttl\":9223372036854775807}",
        "{\"ttl\":86401}",
        "{\"ttl\":\"25h\"}",
    };
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        json_decref(
            admin_expect("POST", "/admin/v1/agents/bot/tokens", bodies[i], 400, "bad_request"));
    }
    json_decref(admin_expect("POST", "/admin/v1/agents/bot/tokens", "{\"ttl\":86400}", 201, NULL));

    json_decref(admin_expect("POST", "/admin/v1/operators",
                             "{\"id\":\"ttl-op\",\"roles\":[\"auditor\"]}", 201, NULL));
    json_decref(admin_expect("POST", "/admin/v1/operators/ttl-op/tokens",
                             "{\"ttl\":10000000000000000}", 400, "bad_request"));
}

/* The ids (member `field`, or the items themselves when field is NULL) of array `key` of
 * j, in order, comma-separated. */
static void ids_of(json_t *j, const char *key, const char *field, char *out, size_t cap) {
    json_t *arr = json_object_get(j, key), *item;
    size_t i, used = 0;
    out[0] = '\0';
    assert_true(json_is_array(arr));
    json_array_foreach(arr, i, item) {
        int n = snprintf(out + used, cap - used, "%s%s", i ? "," : "",
                         json_string_value(field ? json_object_get(item, field) : item));
        assert_true(n > 0 && (size_t)n < cap - used);
        used += (size_t)n;
    }
}

static void test_lists_are_newest_last(void **state) {
    (void)state;
    /* Names that sort the other way round from their creation order. */
    static const char *const agents[] = {"order-z", "order-m", "order-a"};
    for (size_t i = 0; i < 3; i++) {
        char body[160];
        snprintf(body, sizeof body,
                 "{\"id\":\"%s\",\"owner\":\"o\",\"tenants\":[\"acme\"],\"scopes\":[\"x\"]}",
                 agents[i]);
        json_decref(admin_expect("POST", "/admin/v1/agents", body, 201, NULL));
    }
    json_t *j = admin_expect("GET", "/admin/v1/agents", NULL, 200, NULL);
    char got[512];
    ids_of(j, "agents", "id", got, sizeof got);
    json_decref(j);
    assert_non_null(strstr(got, "order-z,order-m,order-a"));
    assert_int_equal(strcmp(got + strlen(got) - strlen("order-a"), "order-a"), 0);

    /* Tokens issued within the same second keep their issue order. */
    char want[512] = "";
    for (int i = 0; i < 6; i++) {
        json_t *t = admin_expect("POST", "/admin/v1/agents/order-z/tokens", "{}", 201, NULL);
        size_t used = strlen(want);
        snprintf(want + used, sizeof want - used, "%s%s", i ? "," : "",
                 json_string_value(json_object_get(t, "jti")));
        json_decref(t);
    }
    j = admin_expect("GET", "/admin/v1/tokens?agent=order-z", NULL, 200, NULL);
    ids_of(j, "tokens", "jti", got, sizeof got);
    json_decref(j);
    assert_string_equal(got, want);
}

static void test_identifiers_tokens_can_carry(void **state) {
    (void)state;
    static const char *const refused[] = {
        /* a scope outside RFC 6749 scope-token: no token could ever carry it */
        "{\"id\":\"v1\",\"tenants\":[\"acme\"],\"scopes\":[\"a\\\"b\"]}",
        "{\"id\":\"v2\",\"tenants\":[\"acme\"],\"scopes\":[\"caf\\u00e9\"]}",
        "{\"id\":\"v3\",\"tenants\":[\"acme\"],\"scopes\":[\"a b\"]}",
        /* control characters in a tenant or the owner */
        "{\"id\":\"v4\",\"tenants\":[\"t\\u001fx\"],\"scopes\":[\"x\"]}",
        "{\"id\":\"v5\",\"tenants\":[\"\"],\"scopes\":[\"x\"]}",
        "{\"id\":\"v6\",\"owner\":\"a\\nb\",\"tenants\":[\"acme\"],\"scopes\":[\"x\"]}",
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        json_decref(admin_expect("POST", "/admin/v1/agents", refused[i], 400, "bad_request"));
    json_t *j = admin_expect("GET", "/admin/v1/agents/v1", NULL, 404, "not_found");
    json_decref(j);
    /* A requested token scope is checked the same way (400, not a failed issue). */
    json_decref(admin_expect("POST", "/admin/v1/agents/bot/tokens", "{\"scopes\":[\"a\\\\b\"]}",
                             400, "bad_request"));
}

static void test_errors_stay_json_for_any_bytes(void **state) {
    (void)state;
    /* %C3%28 decodes to bytes that are not UTF-8; the answer quotes them %-encoded. */
    json_t *j = admin_expect("GET", "/admin/v1/agents/%C3%28", NULL, 404, "not_found");
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    assert_non_null(strstr(msg, "%C3("));
    json_decref(j);
    json_decref(admin_expect("DELETE", "/admin/v1/tokens/%FF", NULL, 404, "not_found"));

    /* On the data plane the refusal is JSON and its record keeps path and tenant. */
    char *token = fx_issue(&F, "bot", NULL, NULL);
    assert_non_null(token);
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/tenants/%%C3%%28/search", F.pep.url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url, NULL, fx_bearer(auth, sizeof auth, token), NULL), 0);
    assert_int_equal(r.status, 403);
    json_t *body = h_json(&r);
    assert_non_null(body);
    json_t *err = json_object_get(body, "error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "tenant_mismatch");
    json_t *rec = fx_record(&F, json_string_value(json_object_get(err, "request_id")), "decision");
    assert_non_null(rec);
    assert_string_equal(json_string_value(json_object_get(rec, "path")), "/v1/tenants/%C3(/search");
    assert_string_equal(json_string_value(json_object_get(rec, "tenant")), "%C3(");
    json_decref(rec);
    json_decref(body);
    h_resp_free(&r);
    free(token);
}

/* Rewrites the group's policy with extra_agents (YAML list items) after bot, and reloads. */
static void reload_with_agents(const char *extra_agents) {
    char *text = h_read_file(F.policy);
    assert_non_null(text);
    const char *bot_line = strstr(text, "  - { id: bot,");
    assert_non_null(bot_line);
    const char *after_bot = strchr(bot_line, '\n') + 1;
    char *edited = NULL;
    assert_true(asprintf(&edited, "%.*s%s%s", (int)(after_bot - text), text, extra_agents,
                         strstr(after_bot, "upstreams:")) > 0);
    assert_int_equal(h_write_file(F.policy, edited), 0);
    json_decref(admin_expect("POST", "/admin/v1/policy/reload", NULL, 200, NULL));
    free(edited);
    free(text);
}

/* Asserts agent id's enabled flag, managed_by and scopes (comma-separated). */
static void expect_agent(const char *id, bool enabled, const char *managed_by, const char *scopes) {
    char path[128], got[256];
    snprintf(path, sizeof path, "/admin/v1/agents/%s", id);
    json_t *a = admin_expect("GET", path, NULL, 200, NULL);
    if (json_is_true(json_object_get(a, "enabled")) != enabled)
        fail_msg("agent %s: enabled is %s", id, enabled ? "false" : "true");
    assert_string_equal(json_string_value(json_object_get(a, "managed_by")), managed_by);
    ids_of(a, "scopes", NULL, got, sizeof got);
    assert_string_equal(got, scopes);
    json_decref(a);
}

/* An operator's change to a policy agent survives reloads and restarts; the file keeps
 * managing the agents nobody touched, including disabling one it no longer lists. */
static void test_reload_keeps_operator_changes(void **state) {
    (void)state;
    reload_with_agents("  - { id: pol-a, tenants: [acme], scopes: [x] }\n"
                       "  - { id: pol-b, tenants: [acme], scopes: [x] }\n"
                       "  - { id: pol-c, tenants: [acme], scopes: [x] }\n");
    expect_agent("pol-a", true, "policy", "x");
    json_decref(admin_expect("POST", "/admin/v1/agents/pol-a/disable", NULL, 200, NULL));
    /* Replacing without "enabled" keeps the agent disabled. */
    json_decref(admin_expect("POST", "/admin/v1/agents",
                             "{\"id\":\"pol-a\",\"owner\":\"o\",\"tenants\":[\"acme\"],"
                             "\"scopes\":[\"y\"]}",
                             200, NULL));
    expect_agent("pol-a", false, "admin", "y");

    reload_with_agents("  - { id: pol-a, tenants: [acme], scopes: [x, z] }\n"
                       "  - { id: pol-b, tenants: [acme], scopes: [x, z] }\n");
    expect_agent("pol-a", false, "admin", "y");
    expect_agent("pol-b", true, "policy", "x,z");
    expect_agent("pol-c", false, "policy", "x");

    h_stop(&F.pep, SIGTERM);
    assert_int_equal(fx_restart_pep(&F, NULL), 0);
    expect_agent("pol-a", false, "admin", "y");
    expect_agent("pol-c", false, "policy", "x");

    /* Back in the file, a policy-managed agent is enabled again. */
    reload_with_agents("  - { id: pol-c, tenants: [acme], scopes: [x] }\n");
    expect_agent("pol-c", true, "policy", "x");
    expect_agent("pol-b", false, "policy", "x,z");
}

/* A reload through the admin API is an operator's state change: audited (kind admin, the
 * operator, the request id) before it answers, with Pep-Audit-Seq.  Records no request
 * caused (start, seeding, SIGHUP) still carry a request id (SPEC 6.2). */
static void test_reload_is_audited_as_the_operators(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 200);
    const char *seq = h_header(&r, "Pep-Audit-Seq");
    assert_non_null(seq);
    json_t *rec = fx_record(&F, h_header(&r, "Pep-Request-Id"), "admin");
    assert_non_null(rec);
    assert_string_equal(json_string_value(json_object_get(rec, "action")), "policy.reload");
    assert_string_equal(json_string_value(json_object_get(rec, "operator")), "admin");
    assert_int_equal(json_integer_value(json_object_get(rec, "seq")), atol(seq));
    json_decref(rec);
    h_resp_free(&r);

    static const char *const sighup_reload = "json_extract(record, '$.kind') = 'system' AND"
                                             " json_extract(record, '$.action') = 'policy.reload'";
    assert_int_equal(kill(F.pep.pid, SIGHUP), 0);
    for (int i = 0; i < 250 && fx_count_records_where(&F, sighup_reload) < 1; i++)
        usleep(20000);
    assert_int_equal(fx_count_records_where(&F, sighup_reload), 1);
    assert_int_equal(fx_count_records_where(&F, "json_extract(record, '$.request_id') IS NULL"), 0);
}

/* ---- audit verification on a large store ------------------------------------------------ */

#ifdef __SANITIZE_ADDRESS__
#define VERIFY_RECORDS 100000L /* walks ~4x slower under ASan: still seconds long */
#else
#define VERIFY_RECORDS 300000L
#endif

static const char *VERIFY_POLICY =
    "version: 1\n"
    "server: { drain_timeout: 200ms }\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: bot, owner: ops, tenants: [acme], scopes: [tool.check] }\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/check }\n"
    "    action: tool.check\n"
    "actions:\n"
    "  tool.check: { scope: tool.check }\n";

static struct fx V;

/* Appends n decision records to the stopped pep's store, as its writer would: canonical
 * record text (keys sorted, "seq" included), each linked to the previous hash, copy columns
 * filled, a checkpoint signed with pep's key every 1000 records (pep's default).
 * About two seconds for 300k, where the audit API (jansson rendering, a savepoint per
 * record, every page written to the WAL and again to the database) took five, and 26 s
 * under ASan.  A record
 * that were not canonical would fail the walk: the verify tests would say so. */
static void append_records(struct fx *f, long n) {
    struct keyring *k = NULL;
    struct pep_err err = {0};
    sqlite3 *db = NULL;
    sqlite3_stmt *head = NULL, *ins = NULL, *cp = NULL;
    if (keys_load_or_create(f->data, &k, &err) != 0) fail_msg("keys: %s", err.msg);
    assert_int_equal(sqlite3_open(f->db, &db), SQLITE_OK);
    /* A bulk load into a stopped pep's store: straight into the database file (no WAL, whose
     * frames would all be copied a second time), WAL mode restored at the end. */
    assert_int_equal(sqlite3_exec(db,
                                  "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                                  " PRAGMA cache_size=-65536; BEGIN",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                                        -1, &head, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(head), SQLITE_ROW);
    int64_t seq = sqlite3_column_int64(head, 0);
    uint8_t prev[32], hash[32];
    assert_int_equal(sqlite3_column_bytes(head, 1), 32);
    memcpy(prev, sqlite3_column_blob(head, 1), 32);
    sqlite3_finalize(head);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "INSERT INTO audit (seq, record, prev_hash, hash, ts, kind,"
                                        " agent, tenant, action, decision, code, request_id)"
                                        " VALUES (?1, ?2, ?3, ?4, ?5, 'decision', 'bot', 'acme',"
                                        " 'tool.check', 'allow', 'ok', ?6)",
                                        -1, &ins, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "INSERT INTO checkpoints (seq, hash, jwt, created_at)"
                                        " VALUES (?1, ?2, ?3, ?4)",
                                        -1, &cp, NULL),
                     SQLITE_OK);
    for (long i = 0; i < n; i++) {
        char rid[27], ts[32], text[512];
        seq++;
        pep_request_id(rid);
        pep_format_rfc3339_us(pep_now_us(), ts);
        int len = snprintf(text, sizeof text,
                           "{\"action\":\"tool.check\",\"agent\":\"bot\",\"code\":\"ok\","
                           "\"decision\":\"allow\",\"kind\":\"decision\",\"method\":\"POST\","
                           "\"path\":\"/v1/check\",\"request_id\":\"%s\",\"seq\":%lld,"
                           "\"tenant\":\"acme\",\"ts\":\"%s\"}",
                           rid, (long long)seq, ts);
        assert_true(len > 0 && (size_t)len < sizeof text);
        assert_int_equal(audit_chain_hash(prev, text, (size_t)len, hash), 0);
        sqlite3_bind_int64(ins, 1, seq);
        sqlite3_bind_text(ins, 2, text, len, SQLITE_STATIC);
        sqlite3_bind_blob(ins, 3, prev, 32, SQLITE_STATIC);
        sqlite3_bind_blob(ins, 4, hash, 32, SQLITE_STATIC);
        sqlite3_bind_text(ins, 5, ts, -1, SQLITE_STATIC);
        sqlite3_bind_text(ins, 6, rid, -1, SQLITE_STATIC);
        if (sqlite3_step(ins) != SQLITE_DONE) fail_msg("append: %s", sqlite3_errmsg(db));
        sqlite3_reset(ins);
        if (seq % 1000 == 0) {
            char *jwt = keys_sign_checkpoint(k, seq, hash, pep_now_us() / 1000000);
            assert_non_null(jwt);
            sqlite3_bind_int64(cp, 1, seq);
            sqlite3_bind_blob(cp, 2, hash, 32, SQLITE_STATIC);
            sqlite3_bind_text(cp, 3, jwt, -1, SQLITE_STATIC);
            sqlite3_bind_text(cp, 4, ts, -1, SQLITE_STATIC);
            if (sqlite3_step(cp) != SQLITE_DONE) fail_msg("checkpoint: %s", sqlite3_errmsg(db));
            sqlite3_reset(cp);
            free(jwt);
        }
        memcpy(prev, hash, 32);
    }
    sqlite3_finalize(ins);
    sqlite3_finalize(cp);
    assert_int_equal(sqlite3_exec(db, "COMMIT; PRAGMA journal_mode=WAL", NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
    keys_free(k);
}

static int verify_group_setup(void **state) {
    (void)state;
    if (fx_start(&V, VERIFY_POLICY, NULL, NULL) != 0) return -1;
    h_stop(&V.pep, SIGTERM);
    int64_t t0 = pep_mono_us();
    append_records(&V, VERIFY_RECORDS);
    fprintf(stderr, "verify group: %ld records appended in %.1f s\n", VERIFY_RECORDS,
            (double)(pep_mono_us() - t0) / 1e6);
    return fx_restart_pep(&V, NULL); /* pep verifies the whole chain as it opens it */
}

static int verify_group_teardown(void **state) {
    (void)state;
    fx_stop(&V);
    return 0;
}

/* CPU clock ticks used so far by pep's verifier thread (named "pep-verify"), or -1. */
static long verifier_cpu_ticks(pid_t pid) {
    char path[128];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    long ticks = -1;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        char file[512], buf[1024];
        snprintf(file, sizeof file, "%s/%s/stat", path, e->d_name);
        FILE *fp = fopen(file, "r");
        if (!fp) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, fp);
        fclose(fp);
        buf[n] = '\0';
        /* pid (comm) state ppid … field 14 utime, 15 stime */
        const char *close_paren = strrchr(buf, ')');
        if (!strstr(buf, "(pep-verify)") || !close_paren) continue;
        unsigned long utime = 0, stime = 0;
        if (sscanf(close_paren + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime,
                   &stime) == 2)
            ticks = (long)(utime + stime);
    }
    if (d) closedir(d);
    return ticks;
}

/* Waits (at most 20 s) until the verifier thread has been walking for a while: its CPU
 * time moved past where it was.  So the calls that follow run during a walk. */
static void wait_walk_running(long ticks_before) {
    for (int i = 0; i < 2000 && verifier_cpu_ticks(V.pep.pid) < ticks_before + 2; i++)
        usleep(10000);
    assert_true(verifier_cpu_ticks(V.pep.pid) >= ticks_before + 2);
}

/* One GET /admin/v1/audit/verify on its own thread. */
struct verify_call {
    pthread_t thread;
    long status;
    json_t *answer;
    int64_t done_us; /* monotonic time the answer arrived */
};

static void *verify_call_main(void *arg) {
    struct verify_call *c = arg;
    struct h_resp r = {0};
    char url[512], auth[2100];
    snprintf(url, sizeof url, "%s/admin/v1/audit/verify", V.pep.admin_url);
    fx_bearer(auth, sizeof auth, V.admin_token);
    struct h_req req = {
        .url = url, .headers = (const char *const[]){auth, NULL}, .timeout_ms = 180000};
    if (h_request(&r, &req) == 0) {
        c->status = r.status;
        c->answer = h_json(&r);
    }
    __atomic_store_n(&c->done_us, pep_mono_us(), __ATOMIC_RELEASE);
    h_resp_free(&r);
    return NULL;
}

static void verify_call_start(struct verify_call *c) {
    memset(c, 0, sizeof *c);
    assert_int_equal(pthread_create(&c->thread, NULL, verify_call_main, c), 0);
}

/* Joins c and checks a SPEC 5 success answer: ok, `records` the head it walked, at least
 * min_records and at most max_records. */
static void verify_call_expect_ok(struct verify_call *c, long min_records, long max_records) {
    assert_int_equal(pthread_join(c->thread, NULL), 0);
    if (c->status != 200 || !json_is_true(json_object_get(c->answer, "ok"))) {
        char *text = c->answer ? json_dumps(c->answer, 0) : NULL;
        fail_msg("verify: HTTP %ld %s", c->status, text ? text : "(no JSON)");
    }
    json_int_t records = json_integer_value(json_object_get(c->answer, "records"));
    assert_int_equal(json_integer_value(json_object_get(c->answer, "head_seq")), records);
    if (records < min_records || records > max_records)
        fail_msg("verify: %lld records, want %ld to %ld", (long long)records, min_records,
                 max_records);
    const char *hash = json_string_value(json_object_get(c->answer, "head_hash"));
    assert_non_null(hash);
    assert_int_equal(strlen(hash), 64);
    assert_true(json_is_true(json_object_get(c->answer, "checkpoints_signed")));
    assert_null(json_object_get(c->answer, "first_bad_seq"));
    json_decref(c->answer);
    c->answer = NULL;
}

static json_t *verify_admin(const char *method, const char *path, const char *body, long status,
                            int64_t *done_us, long *audit_seq) {
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&V, &r, method, path, body), 0);
    if (done_us) *done_us = pep_mono_us();
    if (r.status != status)
        fail_msg("%s %s: HTTP %ld, want %ld: %s", method, path, r.status, status, r.body);
    if (audit_seq) {
        const char *seq = h_header(&r, "Pep-Audit-Seq");
        assert_non_null(seq);
        *audit_seq = atol(seq);
    }
    json_t *j = h_json(&r);
    assert_non_null(j);
    h_resp_free(&r);
    return j;
}

/* Verifies run on pep's verifier thread: with three of them walking (the listener has two
 * threads), a revoke and a token list still complete before any verify answers.  Every
 * verify answers ok with the count it walked, and one asked for after the revoke covers
 * the revoke's record (concurrent verifies share the next walk, never one already
 * running). */
static void test_verify_leaves_listeners_free(void **state) {
    (void)state;
    char jti[64];
    char *token = fx_issue(&V, "bot", NULL, jti);
    assert_non_null(token);
    free(token);
    long before = fx_count_records(&V);
    assert_true(before > VERIFY_RECORDS);

    long ticks = verifier_cpu_ticks(V.pep.pid);
    assert_true(ticks >= 0);
    struct verify_call calls[4];
    for (int i = 0; i < 3; i++)
        verify_call_start(&calls[i]);
    wait_walk_running(ticks);

    char path[128];
    snprintf(path, sizeof path, "/admin/v1/tokens/%s", jti);
    int64_t revoked_us = 0, listed_us = 0;
    long revoke_seq = 0;
    json_decref(verify_admin("DELETE", path, NULL, 200, &revoked_us, &revoke_seq));
    json_t *list = verify_admin("GET", "/admin/v1/tokens?agent=bot", NULL, 200, &listed_us, NULL);
    json_t *t;
    size_t i;
    bool seen = false;
    json_array_foreach(json_object_get(list, "tokens"), i, t) {
        if (strcmp(json_string_value(json_object_get(t, "jti")), jti) == 0) {
            seen = true;
            assert_false(json_is_null(json_object_get(t, "revoked_at")));
        }
    }
    assert_true(seen);
    json_decref(list);
    verify_call_start(&calls[3]);

    long after = fx_count_records(&V);
    for (int k = 0; k < 3; k++)
        verify_call_expect_ok(&calls[k], before, after + 10);
    verify_call_expect_ok(&calls[3], revoke_seq, after + 10);
    for (int k = 0; k < 4; k++) {
        if (calls[k].done_us <= revoked_us || calls[k].done_us <= listed_us)
            fail_msg("verify %d answered before the revoke or the list completed", k);
    }
}

/* Four agents calling a decision-only route as fast as they can: every call is a decision
 * record committed with an fsync. */
struct write_load {
    pthread_t threads[4];
    char auth[2100];
    int stop;   /* atomic */
    long calls; /* atomic */
};

static void *write_load_main(void *arg) {
    struct write_load *w = arg;
    char url[256];
    snprintf(url, sizeof url, "%s/v1/check", V.pep.url);
    while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
        struct h_resp r = {0};
        if (h_http(&r, "POST", url, "{}", w->auth, NULL) == 0 && r.status == 200)
            __atomic_add_fetch(&w->calls, 1, __ATOMIC_RELAXED);
        h_resp_free(&r);
    }
    return NULL;
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : 0;
}

/* A walk reads in short read transactions and pauses between them for the writer's
 * checkpoints, so under write load the WAL stays near its checkpoint size (1000 pages,
 * ~4 MB) instead of growing for as long as the walk lasts (a one-transaction walk let
 * it reach 55-220 MB here). */
static void test_verify_keeps_the_wal_small(void **state) {
    (void)state;
    static struct write_load w;
    memset(&w, 0, sizeof w);
    char *token = fx_issue(&V, "bot", NULL, NULL);
    assert_non_null(token);
    fx_bearer(w.auth, sizeof w.auth, token);
    free(token);
    char wal[400];
    snprintf(wal, sizeof wal, "%s-wal", V.db);
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&w.threads[i], NULL, write_load_main, &w), 0);
    while (__atomic_load_n(&w.calls, __ATOMIC_RELAXED) < 200)
        usleep(10000);

    long before = fx_count_records(&V), wal_before = file_size(wal), wal_max = wal_before;
    long calls_before = __atomic_load_n(&w.calls, __ATOMIC_RELAXED);
    struct verify_call c;
    verify_call_start(&c);
    /* The WAL's size until the verify answered. */
    while (__atomic_load_n(&c.done_us, __ATOMIC_ACQUIRE) == 0) {
        long size = file_size(wal);
        if (size > wal_max) wal_max = size;
        usleep(20000);
    }
    long calls = __atomic_load_n(&w.calls, __ATOMIC_RELAXED) - calls_before;
    __atomic_store_n(&w.stop, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_join(w.threads[i], NULL), 0);
    verify_call_expect_ok(&c, before, fx_count_records(&V));
    fprintf(
        stderr,
        "verify under load: %ld decisions committed during the walk, WAL %ld -> max %ld bytes\n",
        calls, wal_before, wal_max);
    /* Each commit appends the pages it touched (table and index leaves): ~11 KB of WAL per
     * decision here, so ~1100 decisions without a WAL restart pass the bound (a walk in one
     * read transaction let 4124 decisions grow it to 48 MB). */
    if (wal_max > 12L * 1024 * 1024)
        fail_msg("the WAL grew to %ld bytes during a verify (%ld decisions written)", wal_max,
                 calls);
}

/* SIGTERM during a walk: past drain_timeout (200 ms here) the walk is cancelled at its
 * next chunk, the request answered 503, and pep exits 0 — a walk must not hold the
 * listeners open (server_stop_listeners waits for every suspended request). */
static void test_verify_cancelled_at_shutdown(void **state) {
    (void)state;
    long ticks = verifier_cpu_ticks(V.pep.pid);
    struct verify_call c;
    verify_call_start(&c);
    wait_walk_running(ticks);
    assert_int_equal(kill(V.pep.pid, SIGTERM), 0);
    assert_int_equal(pthread_join(c.thread, NULL), 0);
    if (c.status != 503) fail_msg("verify during shutdown: HTTP %ld, want 503", c.status);
    json_t *err = json_object_get(c.answer, "error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), "audit_unavailable");
    assert_non_null(strstr(json_string_value(json_object_get(err, "message")), "shutting down"));
    json_decref(c.answer);
    int status = 0;
    assert_int_equal(h_wait_exit(&V.pep, 15000, &status), 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ttl_cannot_overflow_the_limit),
        cmocka_unit_test(test_lists_are_newest_last),
        cmocka_unit_test(test_identifiers_tokens_can_carry),
        cmocka_unit_test(test_errors_stay_json_for_any_bytes),
        cmocka_unit_test(test_reload_is_audited_as_the_operators),
        cmocka_unit_test(test_reload_keeps_operator_changes), /* last: restarts pep */
    };
    const struct CMUnitTest verify_tests[] = {
        cmocka_unit_test(test_verify_leaves_listeners_free),
        cmocka_unit_test(test_verify_keeps_the_wal_small),
        cmocka_unit_test(test_verify_cancelled_at_shutdown), /* last: stops pep */
    };
    int failed = cmocka_run_group_tests(tests, group_setup, group_teardown);
    return failed + cmocka_run_group_tests(verify_tests, verify_group_setup, verify_group_teardown);
}
