/*
 * test_audit_query.c — the reviewer's reads of the audit log through a real pep (issue 16;
 * SPEC 5, 6.3, 8): GET /admin/v1/audit, /admin/v1/audit/export, /admin/v1/audit/trace/{id}
 * and `pepctl audit query | export | trace`.
 *
 * pep appends records of its own meanwhile (a periodic idempotency.expire), so every
 * comparison with the file brackets the call: the answer holds everything the file held
 * before it and nothing the file did not hold after it.
 *
 * One pep in front of mockllm serves a mixed workload first: allowed calls of two agents
 * and two tenants, one request for every deny code a policy can give here (no_route,
 * invalid_token, tenant_mismatch, insufficient_scope, denied_by_rule, rate_limited,
 * approval_required), the approval round trip (created, approved by an operator, used by
 * the identical re-send), an escalation (a chain whose only upstream is down) resolved by
 * an operator, and admin changes (an agent created, then disabled).  Then:
 *  - a query by each filter returns exactly the records the test finds itself in the
 *    SQLite file, by the record's own JSON (json_extract), not by pep's copy columns;
 *  - pages of 7 cover every record once, in seq order;
 *  - each malformed filter is a 400 bad_request naming it; the routes need the auditor
 *    role;
 *  - an NDJSON export is re-verified by the test's own SHA-256 chain (OpenSSL), from 32
 *    zero bytes to the head's hash in the file, one line per row; a CSV export parses
 *    back (RFC 4180) to the rows of the file, record text byte for byte; clients that go
 *    away in the middle of exports (more of them than may run at once) leave pep able to
 *    export again;
 *  - the trace of the approval's request and of the escalated one tell their stories;
 *  - pepctl audit query, export and trace, run as subprocesses, agree with the file.
 *
 * Thread: cmocka's main thread only; the tests share the pep and run in table order.
 */
#include "tests/integration/fixture.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <setjmp.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "pep/util.h"

static const char *POLICY =
    "version: 1\n"
    "audit: { durability: normal }\n"
    "agents:\n"
    "  - { id: bot, owner: o@example.test, tenants: [acme, globex], scopes: [t.*] }\n"
    "  - { id: bot2, owner: p@example.test, tenants: [initech], scopes: [t.chat] }\n"
    "upstreams:\n"
    "  mock: { base_url: \"@MOCK@\", timeout: 20s }\n"
    "  dead: { base_url: \"http://127.0.0.1:1\", timeout: 2s }\n"
    "chains:\n"
    "  doomed:\n"
    "    steps: [ { upstream: dead } ]\n"
    "    escalate: { webhook: \"@MOCK@/hooks/escalations\" }\n"
    "routes:\n"
    "  - { match: { method: POST, path: /v1/chat/completions }, action: t.chat,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: \"/v1/tenants/{tenant}/notes\" }, action: t.note,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/refunds }, action: t.refund,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/secret }, action: t.secret,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/limited }, action: t.limited,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/doomed }, action: t.doomed,"
    " forward: { chain: doomed } }\n"
    "actions:\n"
    "  t.chat: { scope: t.chat }\n"
    "  t.note: { scope: t.note }\n"
    "  t.refund:\n"
    "    scope: t.refund\n"
    "    controls:\n"
    "      - when: { body.currency: { not_in: [USD] } }\n"
    "        deny: currency not supported\n"
    "      - when: { body.amount: { gt: 1000 } }\n"
    "        require_approval: { approvers: [approver] }\n"
    "  t.secret: { scope: secret.read }\n"
    "  t.limited:\n"
    "    scope: t.limited\n"
    "    rate_limits: [ { key: agent, limit: 1, window: 1h } ]\n"
    "  t.doomed: { scope: t.doomed }\n";

#define CHAT "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
#define REFUND "{\"amount\":5000,\"currency\":\"USD\"}"
#define CTL_TIMEOUT_MS 60000

static struct fx F;
static char *BOT, *BOT2, *AUDITOR, *APPROVER;
static char APPROVAL_ID[32], APPROVAL_REQ[32], USED_REQ[32], ESCALATED_REQ[32];
static char ESCALATION_ID[32];

/* ---- helpers --------------------------------------------------------------------------------- */

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

/* A data-plane call as token (NULL: none) with an optional extra header; the status. */
static long call(struct h_resp *r, const char *path, const char *token, const char *body,
                 const char *header) {
    char url[512], auth[2100];
    const char *headers[3] = {NULL, NULL, NULL};
    size_t n = 0;
    snprintf(url, sizeof url, "%s%s", F.pep.url, path);
    if (token) headers[n++] = fx_bearer(auth, sizeof auth, token);
    if (header) headers[n++] = header;
    struct h_req req = {.method = "POST", .url = url, .body = body, .headers = headers};
    h_request(r, &req);
    return r->status;
}

/* An admin API GET as the operator holding token (NULL: the bootstrap admin). */
static long admin_get(struct h_resp *r, const char *token, const char *path) {
    if (!token) {
        fx_admin(&F, r, "GET", path, NULL);
        return r->status;
    }
    char url[1024], auth[2100];
    snprintf(url, sizeof url, "%s%s", F.pep.admin_url, path);
    h_http(r, "GET", url, NULL, fx_bearer(auth, sizeof auth, token), NULL);
    return r->status;
}

/* Creates operator id with roles (a JSON array) and returns a token of it. */
static char *operator_token(const char *id, const char *roles) {
    char body[256], path[256];
    struct h_resp r = {0};
    snprintf(body, sizeof body, "{\"id\":\"%s\",\"roles\":%s}", id, roles);
    if (fx_admin(&F, &r, "POST", "/admin/v1/operators", body) != 0 || r.status != 201) {
        h_resp_free(&r);
        return NULL;
    }
    snprintf(path, sizeof path, "/admin/v1/operators/%s/tokens", id);
    char *token = NULL;
    if (fx_admin(&F, &r, "POST", path, "{}") == 0 && r.status == 201) {
        json_t *j = h_json(&r);
        if (jstr(j, "token")) token = strdup(jstr(j, "token"));
        json_decref(j);
    }
    h_resp_free(&r);
    return token;
}

static sqlite3 *db_open(void) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(F.db, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

/* The seqs of the rows matching an SQL condition on the record (NULL: all), in order. */
static size_t db_seqs(const char *where, const char *arg, int64_t *out, size_t cap) {
    sqlite3 *db = db_open();
    char sql[600];
    snprintf(sql, sizeof sql, "SELECT seq FROM audit%s%s ORDER BY seq", where ? " WHERE " : "",
             where ? where : "");
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    if (arg) sqlite3_bind_text(st, 1, arg, -1, SQLITE_STATIC);
    size_t n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        assert_true(n < cap);
        out[n++] = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

/* Every record the API answers for query (a query string without limit), following
 * next_after_seq with pages of limit; their seqs in out.  Asserts the answer's shape and
 * that seqs only grow. */
static size_t api_seqs(const char *query, int limit, int64_t *out, size_t cap, size_t *pages) {
    size_t n = 0;
    int64_t after = 0;
    *pages = 0;
    for (;;) {
        char path[1024];
        snprintf(path, sizeof path, "/admin/v1/audit?%s%slimit=%d&after_seq=%lld", query,
                 *query ? "&" : "", limit, (long long)after);
        struct h_resp r = {0};
        if (admin_get(&r, AUDITOR, path) != 200) fail_msg("%s: %ld %s", path, r.status, r.body);
        json_t *ans = h_json(&r);
        assert_non_null(ans);
        assert_int_equal(json_object_size(ans), 2);
        json_t *recs = json_object_get(ans, "records"), *rec;
        assert_true(json_is_array(recs));
        assert_true(json_array_size(recs) <= (size_t)limit);
        size_t i;
        json_array_foreach(recs, i, rec) {
            assert_true(json_is_object(rec)); /* the record object itself */
            int64_t seq = json_integer_value(json_object_get(rec, "seq"));
            assert_true(n == 0 || seq > out[n - 1]);
            assert_true(n < cap);
            out[n++] = seq;
        }
        json_t *next = json_object_get(ans, "next_after_seq");
        bool done = json_is_null(next);
        if (!done) {
            assert_true(json_is_integer(next));
            /* a full page: the cursor is its last record */
            assert_int_equal(json_integer_value(next), out[n - 1]);
            after = json_integer_value(next);
        }
        json_decref(ans);
        h_resp_free(&r);
        (*pages)++;
        if (done) break;
    }
    return n;
}

/* pep appends records of its own while the tests run (a periodic idempotency.expire):
 * what the API answered must hold every matching record the file held before the call,
 * and only records the file held after it.  All three lists are in seq order. */
static void assert_between(const char *what, const int64_t *before, size_t nb, const int64_t *api,
                           size_t na, const int64_t *after, size_t nf) {
    size_t i = 0, j = 0;
    for (size_t k = 0; k < na; k++) {
        while (j < nf && after[j] < api[k])
            j++;
        if (j == nf || after[j] != api[k])
            fail_msg("%s: the API answered seq %lld, which the file does not match", what,
                     (long long)api[k]);
        if (i < nb && before[i] < api[k])
            fail_msg("%s: the API missed seq %lld", what, (long long)before[i]);
        if (i < nb && before[i] == api[k]) i++;
    }
    if (i < nb) fail_msg("%s: the API missed seq %lld", what, (long long)before[i]);
}

/* Waits until the record count stops moving (outcome records are written after the
 * answer) and returns it. */
static long settled_count(void) {
    long last = -1;
    for (int i = 0; i < 200; i++) {
        long n = fx_count_records(&F);
        if (n == last) return n;
        last = n;
        usleep(150000);
    }
    return last;
}

/* ---- the workload ---------------------------------------------------------------------------- */

static int workload(void) {
    struct h_resp r = {0};
    char hdr[128];
    int bad = 0;
#define EXPECT(status, expr)                                                                       \
    do {                                                                                           \
        long got_ = (expr);                                                                        \
        if (got_ != (status)) {                                                                    \
            fprintf(stderr, "workload line %d: %ld, not %d: %s\n", __LINE__, got_, status,         \
                    r.body ? r.body : "");                                                         \
            bad++;                                                                                 \
        }                                                                                          \
    } while (0)
    for (int i = 0; i < 10; i++)
        EXPECT(200, call(&r, "/v1/chat/completions", BOT, CHAT, NULL));
    /* Enough records that an export is several times the connection pipe's 64 KiB. */
    for (int i = 0; i < 200; i++)
        EXPECT(200, call(&r, "/v1/chat/completions", BOT2, CHAT, NULL));
    EXPECT(200, call(&r, "/v1/tenants/globex/notes", BOT, "{}", NULL));
    EXPECT(403, call(&r, "/v1/tenants/initech/notes", BOT, "{}", NULL)); /* tenant_mismatch */
    EXPECT(403, call(&r, "/v1/secret", BOT, "{}", NULL));                /* insufficient_scope */
    EXPECT(403, call(&r, "/v1/refunds", BOT2, REFUND, NULL));            /* insufficient_scope */
    EXPECT(403, call(&r, "/v1/refunds", BOT, "{\"amount\":1,\"currency\":\"EUR\"}", NULL));
    EXPECT(404, call(&r, "/v1/nowhere", BOT, "{}", NULL)); /* no_route */
    EXPECT(401, call(&r, "/v1/chat/completions", "not-a-token", CHAT, NULL));
    EXPECT(200, call(&r, "/v1/limited", BOT, "{}", NULL));
    EXPECT(429, call(&r, "/v1/limited", BOT, "{}", NULL)); /* rate_limited */

    /* The approval round trip. */
    EXPECT(403, call(&r, "/v1/refunds", BOT, REFUND, NULL));
    json_t *j = h_json(&r);
    snprintf(APPROVAL_ID, sizeof APPROVAL_ID, "%s",
             jstr(json_object_get(j, "error"), "approval_id") ?: "");
    snprintf(APPROVAL_REQ, sizeof APPROVAL_REQ, "%s", h_header(&r, "Pep-Request-Id") ?: "");
    json_decref(j);
    char path[160], url[512], auth[2100];
    snprintf(url, sizeof url, "%s/admin/v1/approvals/%s/approve", F.pep.admin_url, APPROVAL_ID);
    h_http(&r, "POST", url, "{\"reason\":\"checked\"}", fx_bearer(auth, sizeof auth, APPROVER),
           NULL);
    EXPECT(200, r.status);
    snprintf(hdr, sizeof hdr, "Pep-Approval: %s", APPROVAL_ID);
    EXPECT(200, call(&r, "/v1/refunds", BOT, REFUND, hdr));
    snprintf(USED_REQ, sizeof USED_REQ, "%s", h_header(&r, "Pep-Request-Id") ?: "");

    /* An escalation, resolved by an operator. */
    EXPECT(503, call(&r, "/v1/doomed", BOT, "{}", NULL));
    j = h_json(&r);
    snprintf(ESCALATION_ID, sizeof ESCALATION_ID, "%s",
             jstr(json_object_get(j, "error"), "escalation_id") ?: "");
    snprintf(ESCALATED_REQ, sizeof ESCALATED_REQ, "%s", h_header(&r, "Pep-Request-Id") ?: "");
    json_decref(j);
    snprintf(path, sizeof path, "/admin/v1/escalations/%s/resolve", ESCALATION_ID);
    fx_admin(&F, &r, "POST", path, "{\"note\":\"upstream back\"}");
    EXPECT(200, r.status);

    /* Admin changes. */
    fx_admin(&F, &r, "POST", "/admin/v1/agents",
             "{\"id\":\"temp\",\"owner\":\"t@example.test\",\"tenants\":[\"acme\"],"
             "\"scopes\":[\"t.chat\"]}");
    EXPECT(201, r.status);
    fx_admin(&F, &r, "POST", "/admin/v1/agents/temp/disable", NULL);
    EXPECT(200, r.status);
    h_resp_free(&r);
#undef EXPECT
    return bad || !APPROVAL_ID[0] || !ESCALATION_ID[0] ? -1 : 0;
}

static int group_setup(void **state) {
    (void)state;
    unsetenv("PEP_TOKEN");
    unsetenv("PEP_ADMIN_URL");
    unsetenv("PEP_DATA_DIR");
    if (fx_start(&F, POLICY, NULL, NULL) != 0) return -1;
    BOT = fx_issue(&F, "bot", NULL, NULL);
    BOT2 = fx_issue(&F, "bot2", NULL, NULL);
    AUDITOR = operator_token("aud@example.test", "[\"auditor\"]");
    APPROVER = operator_token("ap@example.test", "[\"approver\"]");
    if (!BOT || !BOT2 || !AUDITOR || !APPROVER) return -1;
    if (workload() != 0) {
        h_print_tail(F.pep.err_path, 4000);
        return -1;
    }
    settled_count();
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    free(BOT);
    free(BOT2);
    free(AUDITOR);
    free(APPROVER);
    fx_stop(&F);
    return 0;
}

/* ---- 1. a query by each filter -----------------------------------------------------------------
 */

#define CAP 4096

static void check_filter(const char *query, const char *where, const char *arg) {
    static int64_t before[CAP], api[CAP], after[CAP];
    size_t pages;
    size_t nb = db_seqs(where, arg, before, CAP);
    size_t na = api_seqs(query, 1000, api, CAP, &pages);
    size_t nf = db_seqs(where, arg, after, CAP);
    assert_between(query, before, nb, api, na, after, nf);
}

static void test_each_filter(void **state) {
    (void)state;
    check_filter("agent=bot", "json_extract(record, '$.agent') = 'bot'", NULL);
    check_filter("agent=bot2", "json_extract(record, '$.agent') = 'bot2'", NULL);
    check_filter("tenant=globex", "json_extract(record, '$.tenant') = 'globex'", NULL);
    check_filter("tenant=initech", "json_extract(record, '$.tenant') = 'initech'", NULL);
    check_filter("action=t.refund", "json_extract(record, '$.action') = 't.refund'", NULL);
    check_filter("action=agents.put", "json_extract(record, '$.action') = 'agents.put'", NULL);
    check_filter("decision=allow", "json_extract(record, '$.decision') = 'allow'", NULL);
    check_filter("decision=deny", "json_extract(record, '$.decision') = 'deny'", NULL);
    static const char *const kinds[] = {"decision", "outcome", "admin", "system"};
    for (size_t i = 0; i < 4; i++) {
        char q[64];
        snprintf(q, sizeof q, "kind=%s", kinds[i]);
        char where[128];
        snprintf(where, sizeof where, "json_extract(record, '$.kind') = '%s'", kinds[i]);
        if (fx_count_records_where(&F, where) < 1) fail_msg("the workload made no %s", kinds[i]);
        check_filter(q, "json_extract(record, '$.kind') = ?1", kinds[i]);
    }
    /* Every code the workload produced, each present. */
    static const char *const codes[] = {"ok",
                                        "no_route",
                                        "invalid_token",
                                        "tenant_mismatch",
                                        "insufficient_scope",
                                        "denied_by_rule",
                                        "rate_limited",
                                        "approval_required",
                                        "upstream_unavailable"};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        char q[64], where[128];
        snprintf(q, sizeof q, "code=%s", codes[i]);
        snprintf(where, sizeof where, "json_extract(record, '$.code') = '%s'", codes[i]);
        if (fx_count_records_where(&F, where) < 1) fail_msg("the workload made no %s", codes[i]);
        check_filter(q, "json_extract(record, '$.code') = ?1", codes[i]);
    }
    char q[128];
    snprintf(q, sizeof q, "request_id=%s", USED_REQ);
    check_filter(q, "json_extract(record, '$.request_id') = ?1", USED_REQ);

    /* since and until: [ts of a third of the way, ts of two thirds). */
    static int64_t all[CAP];
    size_t n = db_seqs(NULL, NULL, all, CAP);
    assert_true(n > 30);
    sqlite3 *db = db_open();
    char ts[2][40];
    for (int k = 0; k < 2; k++) {
        sqlite3_stmt *st = NULL;
        assert_int_equal(sqlite3_prepare_v2(db,
                                            "SELECT json_extract(record, '$.ts') FROM audit"
                                            " WHERE seq = ?1",
                                            -1, &st, NULL),
                         SQLITE_OK);
        sqlite3_bind_int64(st, 1, all[n * (size_t)(k + 1) / 3]);
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        snprintf(ts[k], sizeof ts[k], "%s", (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
    }
    sqlite3_close(db);
    char where[256];
    snprintf(q, sizeof q, "since=%s", ts[0]);
    snprintf(where, sizeof where, "json_extract(record, '$.ts') >= '%s'", ts[0]);
    check_filter(q, where, NULL);
    snprintf(q, sizeof q, "until=%s", ts[1]);
    snprintf(where, sizeof where, "json_extract(record, '$.ts') < '%s'", ts[1]);
    check_filter(q, where, NULL);
    snprintf(q, sizeof q, "since=%s&until=%s&agent=bot", ts[0], ts[1]);
    snprintf(where, sizeof where,
             "json_extract(record, '$.ts') >= '%s' AND json_extract(record, '$.ts') < '%s'"
             " AND json_extract(record, '$.agent') = 'bot'",
             ts[0], ts[1]);
    check_filter(q, where, NULL);
    /* An offset time is the same instant. */
    check_filter("since=2000-01-01T01:00:00%2B01:00", NULL, NULL);
    /* Combined filters. */
    check_filter("agent=bot&kind=decision&decision=deny",
                 "json_extract(record, '$.agent') = 'bot' AND json_extract(record, '$.kind') ="
                 " 'decision' AND json_extract(record, '$.decision') = 'deny'",
                 NULL);
    check_filter("agent=nobody", "0", NULL);
}

/* ---- 2. pagination -----------------------------------------------------------------------------
 */

static void test_pagination(void **state) {
    (void)state;
    static int64_t before[CAP], api[CAP], after[CAP];
    size_t pages;
    size_t nb = db_seqs(NULL, NULL, before, CAP);
    size_t na = api_seqs("", 7, api, CAP, &pages);
    size_t nf = db_seqs(NULL, NULL, after, CAP);
    assert_between("pages of 7", before, nb, api, na, after, nf);
    for (size_t i = 0; i < na; i++)
        assert_int_equal(api[i], (int64_t)i + 1); /* every seq from 1, once */
    assert_true(pages == (na + 6) / 7 || pages == (na + 6) / 7 + 1);
    /* The default limit is 100. */
    struct h_resp r = {0};
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit"), 200);
    json_t *ans = h_json(&r);
    assert_int_equal(json_array_size(json_object_get(ans, "records")), na < 100 ? na : (size_t)100);
    json_decref(ans);
    h_resp_free(&r);
}

/* ---- 3. refusals -------------------------------------------------------------------------------
 */

static void expect_400(const char *path, const char *names) {
    struct h_resp r = {0};
    admin_get(&r, AUDITOR, path);
    if (r.status != 400 || !strstr(r.body, "\"bad_request\"") || !strstr(r.body, names))
        fail_msg("%s: %ld %s (wanted 400 naming %s)", path, r.status, r.body, names);
    assert_non_null(h_header(&r, "Pep-Request-Id"));
    h_resp_free(&r);
}

static void test_refusals(void **state) {
    (void)state;
    expect_400("/admin/v1/audit?limit=0", "'limit'");
    expect_400("/admin/v1/audit?limit=1001", "'limit'");
    expect_400("/admin/v1/audit?limit=abc", "'limit'");
    expect_400("/admin/v1/audit?since=yesterday", "'since'");
    expect_400("/admin/v1/audit?until=2026-01-01", "'until'");
    expect_400("/admin/v1/audit?decision=maybe", "'decision'");
    expect_400("/admin/v1/audit?kind=other", "'kind'");
    expect_400("/admin/v1/audit?after_seq=-1", "'after_seq'");
    expect_400("/admin/v1/audit?agnet=bot", "unknown parameter 'agnet'");
    expect_400("/admin/v1/audit?agent=a&agent=b", "'agent' is given twice");
    expect_400("/admin/v1/audit?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "'since'");
    expect_400("/admin/v1/audit/export", "'format' is required");
    expect_400("/admin/v1/audit/export?format=xml", "'format'");
    expect_400("/admin/v1/audit/export?format=csv&limit=5", "unknown parameter 'limit'");

    /* The reads need the auditor role (admin holds it); an approver has not. */
    struct h_resp r = {0};
    assert_int_equal(admin_get(&r, APPROVER, "/admin/v1/audit"), 403);
    assert_non_null(strstr(r.body, "insufficient_scope"));
    assert_int_equal(admin_get(&r, APPROVER, "/admin/v1/audit/export?format=csv"), 403);
    assert_int_equal(admin_get(&r, BOT, "/admin/v1/audit"), 401);
    assert_int_equal(admin_get(&r, NULL, "/admin/v1/audit?limit=1"), 200);
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit/trace/no-such-request"), 404);
    assert_non_null(strstr(r.body, "not_found"));
    h_resp_free(&r);
}

/* ---- 4. exports --------------------------------------------------------------------------------
 */

static void sha256_link(const uint8_t prev[32], const char *rec, size_t len, uint8_t out[32]) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int n = 0;
    assert_non_null(c);
    assert_int_equal(EVP_DigestInit_ex(c, EVP_sha256(), NULL), 1);
    assert_int_equal(EVP_DigestUpdate(c, prev, 32), 1);
    assert_int_equal(EVP_DigestUpdate(c, rec, len), 1);
    assert_int_equal(EVP_DigestFinal_ex(c, out, &n), 1);
    assert_int_equal(n, 32);
    EVP_MD_CTX_free(c);
}

/* The hash column of seq (hex). */
static void db_hash_hex(int64_t seq, char hex[65]) {
    sqlite3 *db = db_open();
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT hash FROM audit WHERE seq = ?1", -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_int64(st, 1, seq);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_bytes(st, 0), 32);
    pep_hex(sqlite3_column_blob(st, 0), 32, hex);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* Re-verifies an NDJSON export of the whole log; returns its line count. */
static long verify_ndjson(const char *text, size_t len) {
    uint8_t prev[32] = {0}, h[32];
    char hex[65];
    long lines = 0;
    for (const char *p = text, *end = text + len; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        assert_non_null(nl); /* every line ends in \n */
        json_error_t e;
        json_t *line = json_loadb(p, (size_t)(nl - p), 0, &e);
        if (!line) fail_msg("line %ld is not JSON: %s", lines + 1, e.text);
        assert_int_equal(json_object_size(line), 4);
        assert_int_equal(json_integer_value(json_object_get(line, "seq")), lines + 1);
        json_t *rec = json_object_get(line, "record");
        pep_hex(prev, 32, hex);
        assert_string_equal(jstr(line, "prev_hash"), hex);
        sha256_link(prev, json_string_value(rec), json_string_length(rec), h);
        pep_hex(h, 32, hex);
        if (strcmp(jstr(line, "hash"), hex) != 0) fail_msg("seq %ld: the chain breaks", lines + 1);
        /* The record text is the canonical JSON of a record with this seq. */
        json_t *obj = json_loads(json_string_value(rec), 0, NULL);
        assert_int_equal(json_integer_value(json_object_get(obj, "seq")), lines + 1);
        json_decref(obj);
        memcpy(prev, h, 32);
        json_decref(line);
        lines++;
        p = nl + 1;
    }
    /* The head's hash is the file's own. */
    char db_hex[65];
    db_hash_hex(lines, db_hex);
    pep_hex(prev, 32, hex);
    assert_string_equal(hex, db_hex);
    return lines;
}

static void test_export_ndjson(void **state) {
    (void)state;
    struct h_resp r = {0};
    long before = fx_count_records(&F);
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit/export?format=ndjson"), 200);
    assert_string_equal(h_header(&r, "Content-Type"), "application/x-ndjson");
    long lines = verify_ndjson(r.body, r.body_len);
    assert_in_range(lines, before, fx_count_records(&F));
    /* Filtered: the lines of one agent, each one of the file's rows. */
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit/export?format=ndjson&agent=bot2"),
                     200);
    static int64_t file[CAP];
    size_t nf = db_seqs("json_extract(record, '$.agent') = 'bot2'", NULL, file, CAP);
    size_t n = 0;
    for (const char *p = r.body; *p; p = strchr(p, '\n') + 1) {
        json_t *line = json_loadb(p, strcspn(p, "\n"), 0, NULL);
        assert_non_null(line);
        assert_true(n < nf);
        assert_int_equal(json_integer_value(json_object_get(line, "seq")), file[n++]);
        json_decref(line);
    }
    assert_int_equal(n, nf);
    /* A filter matching nothing: an empty body, not an error. */
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit/export?format=ndjson&agent=nobody"),
                     200);
    assert_int_equal(r.body_len, 0);
    h_resp_free(&r);
}

/* A client that goes away after the first bytes of an export. */
static size_t first_bytes_only(char *ptr, size_t size, size_t nmemb, void *arg) {
    (void)ptr;
    *(size_t *)arg += size * nmemb;
    return 0; /* curl aborts the transfer and closes the connection */
}

static void test_export_abandoned(void **state) {
    (void)state;
    /* More exports abandoned than may run at once: each one's reading thread must stop and
     * give its place back, or the next export would be refused. */
    char url[512], auth[2100];
    snprintf(url, sizeof url, "%s/admin/v1/audit/export?format=ndjson", F.pep.admin_url);
    fx_bearer(auth, sizeof auth, AUDITOR);
    for (int i = 0; i < 12; i++) {
        CURL *c = curl_easy_init();
        assert_non_null(c);
        struct curl_slist *h = curl_slist_append(NULL, auth);
        size_t got = 0;
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
        curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
        curl_easy_setopt(c, CURLOPT_BUFFERSIZE, 1024L);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, first_bytes_only);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 20000L);
        assert_int_equal(curl_easy_perform(c), CURLE_WRITE_ERROR);
        assert_true(got > 0);
        curl_slist_free_all(h);
        curl_easy_cleanup(c);
    }
    /* Whole exports still work (the slots came back), and pep answers the rest. */
    for (int i = 0; i < 5; i++) {
        struct h_resp r = {0};
        bool ok = false;
        long before = fx_count_records(&F);
        for (int tries = 0; tries < 100 && !ok; tries++) {
            admin_get(&r, AUDITOR, "/admin/v1/audit/export?format=ndjson");
            ok = r.status == 200;
            if (!ok) usleep(50000); /* a reading thread may still be finishing its batch */
        }
        assert_int_equal(r.status, 200);
        assert_in_range(verify_ndjson(r.body, r.body_len), before, fx_count_records(&F));
        h_resp_free(&r);
    }
}

/* Reads one RFC 4180 field list (a record) at *p; fields malloc'd into out. */
static size_t csv_record(const char **p, char **out, size_t cap) {
    size_t n = 0;
    const char *s = *p;
    for (;;) {
        size_t flen = 0, fcap = 64;
        char *f = malloc(fcap);
        assert_non_null(f);
        bool quoted = *s == '"';
        if (quoted) s++;
        for (;;) {
            char c = *s;
            if (quoted && c == '"' && s[1] == '"') {
                s += 2;
            } else if (quoted && c == '"') {
                s++;
                break;
            } else if (!quoted && (c == ',' || c == '\r' || c == '\n' || c == '\0')) {
                break;
            } else {
                assert_true(c != '\0');
                s++;
            }
            if (flen + 2 > fcap) f = realloc(f, fcap *= 2);
            assert_non_null(f);
            f[flen++] = c;
        }
        f[flen] = '\0';
        assert_true(n < cap);
        out[n++] = f;
        if (*s == ',') {
            s++;
            continue;
        }
        assert_true(s[0] == '\r' && s[1] == '\n');
        s += 2;
        break;
    }
    *p = s;
    return n;
}

static void test_export_csv(void **state) {
    (void)state;
    struct h_resp r = {0};
    long before = fx_count_records(&F);
    assert_int_equal(admin_get(&r, AUDITOR, "/admin/v1/audit/export?format=csv"), 200);
    assert_string_equal(h_header(&r, "Content-Type"), "text/csv");
    const char *p = r.body;
    char *f[16];
    size_t n = csv_record(&p, f, 16);
    static const char *const header[] = {"seq",        "ts",     "kind",      "agent",
                                         "tenant",     "action", "decision",  "code",
                                         "request_id", "record", "prev_hash", "hash"};
    assert_int_equal(n, 12);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(f[i], header[i]);
        free(f[i]);
    }
    sqlite3 *db = db_open();
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT seq, record, hex(hash) FROM audit ORDER BY seq",
                                        -1, &st, NULL),
                     SQLITE_OK);
    long rows = 0;
    while (*p) {
        n = csv_record(&p, f, 16);
        assert_int_equal(n, 12);
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        assert_int_equal(atoll(f[0]), sqlite3_column_int64(st, 0));
        assert_string_equal(f[9], (const char *)sqlite3_column_text(st, 1)); /* byte for byte */
        char lower[65];
        snprintf(lower, sizeof lower, "%s", (const char *)sqlite3_column_text(st, 2));
        for (char *c = lower; *c; c++)
            *c = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
        assert_string_equal(f[11], lower);
        json_t *rec = json_loads(f[9], 0, NULL);
        assert_string_equal(f[2], jstr(rec, "kind")); /* the copy columns are the record's */
        assert_string_equal(f[1], jstr(rec, "ts"));
        json_decref(rec);
        for (size_t i = 0; i < n; i++)
            free(f[i]);
        rows++;
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    assert_in_range(rows, before, fx_count_records(&F)); /* the file's rows, in order */
    h_resp_free(&r);
}

/* ---- 5. the trace ------------------------------------------------------------------------------
 */

/* The trace of request_id: its records (caller decrefs). */
static json_t *trace_of(const char *request_id) {
    char path[160];
    snprintf(path, sizeof path, "/admin/v1/audit/trace/%s", request_id);
    struct h_resp r = {0};
    if (admin_get(&r, AUDITOR, path) != 200) fail_msg("%s: %ld %s", path, r.status, r.body);
    json_t *t = h_json(&r);
    h_resp_free(&r);
    assert_string_equal(jstr(t, "request_id"), request_id);
    assert_true(json_is_true(json_object_get(t, "complete")));
    json_t *recs = json_incref(json_object_get(t, "records"));
    json_decref(t);
    int64_t last = 0;
    size_t i;
    json_t *rec;
    json_array_foreach(recs, i, rec) {
        assert_true(json_integer_value(json_object_get(rec, "seq")) > last);
        last = json_integer_value(json_object_get(rec, "seq"));
    }
    return recs;
}

/* The first record of recs with kind and key = value (NULL: any), or NULL. */
static json_t *find(json_t *recs, const char *kind, const char *key, const char *value) {
    size_t i;
    json_t *rec;
    json_array_foreach(recs, i, rec) {
        if (strcmp(jstr(rec, "kind"), kind) == 0 &&
            (!key || (jstr(rec, key) && strcmp(jstr(rec, key), value) == 0)))
            return rec;
    }
    return NULL;
}

static void test_trace(void **state) {
    (void)state;
    /* From the request that met the control, and from the one that used the approval. */
    const char *from[] = {APPROVAL_REQ, USED_REQ};
    for (size_t k = 0; k < 2; k++) {
        json_t *recs = trace_of(from[k]);
        json_t *created = find(recs, "decision", "code", "approval_required");
        assert_non_null(created);
        assert_string_equal(jstr(created, "request_id"), APPROVAL_REQ);
        assert_string_equal(jstr(created, "approval_id"), APPROVAL_ID);
        json_t *decided = find(recs, "admin", "action", "approvals.approve");
        assert_non_null(decided);
        assert_string_equal(jstr(decided, "operator"), "ap@example.test");
        assert_string_equal(jstr(decided, "approval_id"), APPROVAL_ID);
        json_t *used = find(recs, "decision", "code", "ok");
        assert_non_null(used);
        assert_string_equal(jstr(used, "request_id"), USED_REQ);
        assert_string_equal(jstr(used, "approval_id"), APPROVAL_ID);
        json_t *outcome = find(recs, "outcome", "request_id", USED_REQ);
        assert_non_null(outcome);
        assert_int_equal(json_array_size(json_object_get(outcome, "attempts")), 1);
        /* Nothing of other requests. */
        size_t i;
        json_t *rec;
        json_array_foreach(recs, i, rec) {
            const char *rid = jstr(rec, "request_id");
            assert_true(strcmp(rid, APPROVAL_REQ) == 0 || strcmp(rid, USED_REQ) == 0 ||
                        rec == decided);
        }
        assert_int_equal(json_array_size(recs), 4);
        json_decref(recs);
    }
    /* The escalated request: decision, the escalation opened, the outcome with its attempt,
     * and the operator's resolution. */
    json_t *recs = trace_of(ESCALATED_REQ);
    assert_non_null(find(recs, "decision", "code", "ok"));
    json_t *opened = find(recs, "system", "action", "escalation.open");
    assert_non_null(opened);
    assert_string_equal(jstr(opened, "escalation_id"), ESCALATION_ID);
    json_t *outcome = find(recs, "outcome", "code", "upstream_unavailable");
    assert_non_null(outcome);
    assert_true(json_array_size(json_object_get(outcome, "attempts")) >= 1);
    json_t *resolved = find(recs, "admin", "action", "escalations.resolve");
    assert_non_null(resolved);
    assert_string_equal(jstr(resolved, "escalation_id"), ESCALATION_ID);
    assert_int_equal(json_array_size(recs), 4);
    json_decref(recs);
}

/* ---- 6. pepctl ---------------------------------------------------------------------------------
 */

struct ctl_result {
    int code;
    char *out, *err;
};

/* Runs $PEP_BUILD_DIR/pepctl --url ADMIN --data-dir DATA args… (NULL-terminated). */
static void ctl(struct ctl_result *r, const char *const args[]) {
    const char *build = getenv("PEP_BUILD_DIR");
    char bin[512], out_path[400], err_path[400];
    snprintf(bin, sizeof bin, "%s/pepctl", build && *build ? build : "build");
    snprintf(out_path, sizeof out_path, "%s/ctl.stdout", F.dir);
    snprintf(err_path, sizeof err_path, "%s/ctl.stderr", F.dir);
    const char *argv[48] = {bin, "--url", F.pep.admin_url, "--data-dir", F.data};
    size_t n = 5;
    for (size_t i = 0; args[i] && n < 47; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int o = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int e = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    int64_t deadline = pep_mono_us() + (int64_t)CTL_TIMEOUT_MS * 1000;
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (pep_mono_us() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("pepctl %s did not finish", args[0]);
        }
        usleep(5000);
    }
    r->code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r->out = h_read_file(out_path);
    r->err = h_read_file(err_path);
    assert_non_null(r->out);
    assert_non_null(r->err);
    if (r->err[0]) fprintf(stderr, "  [pepctl %s %s] %s", args[0], args[1], r->err);
}

#define CTL(r, ...) ctl((r), (const char *const[]){__VA_ARGS__, NULL})

static void ctl_free(struct ctl_result *r) {
    free(r->out);
    free(r->err);
}

static void test_pepctl(void **state) {
    (void)state;
    struct ctl_result r = {0};
    static int64_t file[CAP];

    /* query --json: the API's shape, the records of the file. */
    CTL(&r, "audit", "query", "--agent", "bot2", "--limit", "1000", "--json");
    assert_int_equal(r.code, 0);
    json_t *ans = json_loads(r.out, 0, NULL);
    assert_non_null(ans);
    assert_true(json_is_null(json_object_get(ans, "next_after_seq")));
    size_t nf = db_seqs("json_extract(record, '$.agent') = 'bot2'", NULL, file, CAP);
    assert_int_equal(json_array_size(json_object_get(ans, "records")), nf);
    json_decref(ans);
    ctl_free(&r);

    /* The table: a header and one line per record; --since as a duration. */
    CTL(&r, "audit", "query", "--since", "1h", "--kind", "decision", "--decision", "deny",
        "--limit", "1000");
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "SEQ", 3), 0);
    assert_non_null(strstr(r.out, "REQUEST_ID"));
    long lines = 0;
    for (const char *p = r.out; (p = strchr(p, '\n')); p++)
        lines++;
    assert_int_equal(lines - 1, fx_count_records_where(&F, "json_extract(record, '$.kind') ="
                                                           " 'decision' AND json_extract(record,"
                                                           " '$.decision') = 'deny'"));
    ctl_free(&r);

    /* A short --limit says how to go on; --all goes to the end. */
    CTL(&r, "audit", "query", "--limit", "3");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.err, "--after-seq 3"));
    ctl_free(&r);
    long before = fx_count_records(&F);
    CTL(&r, "audit", "query", "--all", "--limit", "5", "--json");
    assert_int_equal(r.code, 0);
    ans = json_loads(r.out, 0, NULL);
    assert_non_null(ans);
    assert_in_range(json_array_size(json_object_get(ans, "records")), before, fx_count_records(&F));
    json_decref(ans);
    ctl_free(&r);

    /* Usage errors exit 2 before any call; the server's refusals too. */
    CTL(&r, "audit", "query", "--since", "last tuesday");
    assert_int_equal(r.code, 2);
    ctl_free(&r);
    CTL(&r, "audit", "query", "--kind", "everything");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "'kind'"));
    ctl_free(&r);

    /* export -o FILE: the whole log, the chain re-verified. */
    char path[400];
    snprintf(path, sizeof path, "%s/export.ndjson", F.dir);
    before = fx_count_records(&F);
    CTL(&r, "audit", "export", "--format", "ndjson", "-o", path);
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    char *text = h_read_file(path);
    assert_non_null(text);
    assert_in_range(verify_ndjson(text, strlen(text)), before, fx_count_records(&F));
    free(text);
    /* csv to stdout, filtered */
    CTL(&r, "audit", "export", "--format", "csv", "--kind", "admin");
    assert_int_equal(r.code, 0);
    lines = 0;
    for (const char *p = r.out; (p = strstr(p, "\r\n")); p += 2)
        lines++;
    assert_int_equal(lines - 1, fx_count_records_where(&F, "json_extract(record, '$.kind') ="
                                                           " 'admin'"));
    ctl_free(&r);
    /* A refused export leaves no file behind. */
    snprintf(path, sizeof path, "%s/refused.csv", F.dir);
    CTL(&r, "audit", "export", "--format", "csv", "--since", "2026-01-02T00:00:00Z", "--until",
        "2026-01-01T00:00:00Z", "-o", path);
    assert_int_equal(r.code, 2);
    assert_int_equal(access(path, F_OK), -1);
    ctl_free(&r);

    /* trace: the approval's story, with the operator and the outcome's attempt. */
    CTL(&r, "audit", "trace", APPROVAL_REQ);
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "approval_required"));
    assert_non_null(strstr(r.out, "approvals.approve"));
    assert_non_null(strstr(r.out, "operator=ap@example.test"));
    assert_non_null(strstr(r.out, USED_REQ));
    assert_non_null(strstr(r.out, "attempt 1:"));
    ctl_free(&r);
    CTL(&r, "audit", "trace", "no-such-request");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "not_found"));
    ctl_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_filter), cmocka_unit_test(test_pagination),
        cmocka_unit_test(test_refusals),    cmocka_unit_test(test_export_ndjson),
        cmocka_unit_test(test_export_csv),  cmocka_unit_test(test_export_abandoned),
        cmocka_unit_test(test_trace),       cmocka_unit_test(test_pepctl),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
