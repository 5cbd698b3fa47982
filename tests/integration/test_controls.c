/*
 * test_controls.c — conditional controls end to end (issue 14; SPEC 2 `controls` and
 * `rate_limits`, 3.2 steps 5-6, 3.3-3.5, 4.5, 5 approvals, 8): every code a control can
 * answer is produced by a real request through a real `pep serve` in front of mockllm,
 * and checked with its headers and its audit record.
 *
 *  - deny (403 denied_by_rule, the rule's message); a body that must be read and is not
 *    JSON, or holds a duplicate key (400 bad_request); a body no condition reads is never
 *    parsed;
 *  - step-up (401 insufficient_user_authentication with the RFC 9470 challenge);
 *  - approvals, the whole round trip: created once per request, polled by its agent only,
 *    listed and shown to operators, decided under `approvers` and `distinct_from_owner`,
 *    used once by the identical re-send of the same agent, denied; a re-send refused by a
 *    rate limit leaves the approval usable; `notify` posts the approval without a token;
 *  - rate limits: exactly `limit` of 50 concurrent requests admitted, RateLimit-* on every
 *    answer of a limited action, no quota taken by a refused request, `tenant` and
 *    `global` keys, the tightest of two rules answers;
 *  - Idempotency-Key: replay, mismatch, key length, per agent, in flight;
 *  - a pending approval and a stored idempotent answer survive kill -9.
 *
 * One pep serves the whole group.  Each test has its own routes and actions, so quotas and
 * approvals of one test never meet another's; the restart test runs last.  No assertion
 * depends on how long something took: waits are bounded polls of a condition.
 */
#include "tests/integration/fixture.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#define OWNER "o@example.test"

static const char *POLICY =
    "version: 1\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: bot, owner: " OWNER ", tenants: [acme, globex], scopes: [t.*] }\n"
    "  - { id: bot2, owner: " OWNER ", tenants: [acme], scopes: [t.*] }\n"
    "  - { id: other, owner: p@example.test, tenants: [acme, initech], scopes: [t.*] }\n"
    "upstreams:\n"
    "  mock: { base_url: \"@MOCK@\", timeout: 20s }\n"
    "routes:\n"
    "  - { match: { method: POST, path: /v1/refunds }, action: t.refund,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/notes }, action: t.note,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: GET, path: /v1/export }, action: t.export,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/transfers }, action: t.transfer,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/wires }, action: t.wire,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/burst }, action: t.burst,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: \"/v1/tenants/{tenant}/quota\" }, action: t.tenant,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/global }, action: t.global,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/two }, action: t.two,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/quick }, action: t.quick,"
    " forward: { upstream: mock } }\n"
    "  - { match: { method: POST, path: /v1/payments }, action: t.pay,"
    " forward: { upstream: mock } }\n"
    "actions:\n"
    "  t.refund:\n"
    "    scope: t.refund\n"
    "    controls:\n"
    "      - when: { body.currency: { not_in: [USD, EUR] } }\n"
    "        deny: currency not supported\n"
    "      - when: { body.amount: { gt: 1000 } }\n"
    "        require_approval: { approvers: [approver], ttl: 1h, distinct_from_owner: true }\n"
    "  t.quick:\n" /* approvals that expire after a second */
    "    scope: t.quick\n"
    "    controls:\n"
    "      - when: { body.amount: { gt: 1000 } }\n"
    "        require_approval: { approvers: [approver], ttl: 1s }\n"
    "  t.note:\n" /* a condition on a header only: the body is never parsed */
    "    scope: t.note\n"
    "    controls:\n"
    "      - { when: { header.x-block: { eq: \"yes\" } }, deny: blocked by header }\n"
    "  t.export:\n"
    "    scope: t.export\n"
    "    controls:\n"
    "      - step_up: { acr: mfa, max_age: 5m }\n"
    "  t.transfer:\n" /* approval and a quota of one per 2 s; X-Probe reads the quota */
    "    scope: t.transfer\n"
    "    rate_limits: [ { key: agent, limit: 1, window: 2s } ]\n"
    "    controls:\n"
    "      - { when: { header.x-probe: { exists: true } }, deny: probe }\n"
    "      - when: { body.amount: { gt: 1000 } }\n"
    "        require_approval: { approvers: [approver], distinct_from_owner: true }\n"
    "  t.wire:\n"
    "    scope: t.wire\n"
    "    controls:\n"
    "      - when: { body.amount: { gt: 100 } }\n"
    "        require_approval: { approvers: [approver], notify: \"@MOCK@/hooks/approvals\" }\n"
    "  t.burst:\n"
    "    scope: t.burst\n"
    "    rate_limits: [ { key: agent, limit: 10, window: 1h } ]\n"
    "    controls:\n"
    "      - { when: { header.x-deny: { exists: true } }, deny: refused by header }\n"
    "  t.tenant:\n"
    "    scope: t.tenant\n"
    "    rate_limits: [ { key: tenant, limit: 2, window: 1h } ]\n"
    "  t.global:\n"
    "    scope: t.global\n"
    "    rate_limits: [ { key: global, limit: 3, window: 1h } ]\n"
    "  t.two:\n"
    "    scope: t.two\n"
    "    rate_limits:\n"
    "      - { key: agent, limit: 100, window: 1h }\n"
    "      - { key: agent, limit: 3, window: 1h }\n"
    "  t.pay:\n"
    "    scope: t.pay\n";

static struct fx F;
static char *BOT, *BOT2, *OTHER;     /* agent tokens */
static char *OP_OWNER, *OP_APPROVER; /* operators o@example.test and ap@example.test */
static char *OP_AUDITOR;             /* aud@example.test: auditor only */
static const char *APPROVER_ID = "ap@example.test";

/* ---- helpers --------------------------------------------------------------------------------- */

/* Sends method path to pep's data plane with token (NULL: no Authorization), body (NULL:
 * none) and extra "Name: value" header lines, NULL-terminated (at most 8).  Any thread.
 * Returns the status (0: no answer). */
static long call(struct h_resp *r, const char *method, const char *path, const char *token,
                 const char *body, ...) {
    char url[512], auth[2100];
    const char *headers[10];
    size_t n = 0;
    snprintf(url, sizeof url, "%s%s", F.pep.url, path);
    if (token) headers[n++] = fx_bearer(auth, sizeof auth, token);
    va_list ap;
    va_start(ap, body);
    for (const char *h; n < 9 && (h = va_arg(ap, const char *));)
        headers[n++] = h;
    va_end(ap);
    headers[n] = NULL;
    struct h_req req = {.method = method, .url = url, .body = body, .headers = headers};
    h_request(r, &req);
    return r->status;
}

/* An admin API call with an operator's token. */
static long admin_as(struct h_resp *r, const char *token, const char *method, const char *path,
                     const char *body) {
    char url[512], auth[2100];
    snprintf(url, sizeof url, "%s%s", F.pep.admin_url, path);
    h_http(r, method, url, body, fx_bearer(auth, sizeof auth, token), NULL);
    return r->status;
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

/* Asserts the SPEC 3.3 error shape of r with status and code; returns its "error" object
 * (caller decrefs). */
static json_t *error_of(const struct h_resp *r, long status, const char *code) {
    if (r->status != status || !strstr(r->body, code))
        fprintf(stderr, "expected %ld %s, got %ld: %s\n", status, code, r->status, r->body);
    assert_int_equal(r->status, status);
    json_t *j = h_json(r);
    assert_non_null(j);
    json_t *err = json_incref(json_object_get(j, "error"));
    json_decref(j);
    assert_non_null(err);
    assert_string_equal(jstr(err, "type"), "pep_error");
    assert_string_equal(jstr(err, "code"), code);
    assert_non_null(jstr(err, "message"));
    assert_non_null(h_header(r, "Pep-Request-Id"));
    assert_string_equal(jstr(err, "request_id"), h_header(r, "Pep-Request-Id"));
    return err;
}

/* The decision record of the answer r (caller decrefs): asserted to say `code`, allow for
 * "ok" and deny otherwise, with the seq of the answer's Pep-Audit-Seq, the action and the
 * agent. */
static json_t *decision_of(const struct h_resp *r, const char *code, const char *action,
                           const char *agent) {
    json_t *rec = fx_record(&F, h_header(r, "Pep-Request-Id"), "decision");
    assert_non_null(rec);
    assert_string_equal(jstr(rec, "code"), code);
    assert_string_equal(jstr(rec, "decision"), strcmp(code, "ok") == 0 ? "allow" : "deny");
    assert_string_equal(jstr(rec, "action"), action);
    assert_string_equal(jstr(rec, "agent"), agent);
    assert_non_null(h_header(r, "Pep-Audit-Seq"));
    assert_int_equal(json_integer_value(json_object_get(rec, "seq")),
                     atoll(h_header(r, "Pep-Audit-Seq")));
    return rec;
}

/* How many requests for path mockllm has received. */
static long mock_hits(const char *path) {
    json_t *stats = h_mock_stats(F.mock.url);
    assert_non_null(stats);
    long n = (long)json_integer_value(json_object_get(json_object_get(stats, "by_path"), path));
    json_decref(stats);
    return n;
}

/* Polls holds(arg) every 20 ms for at most timeout_ms; true as soon as it holds. */
static bool wait_for(bool (*holds)(void *), void *arg, int timeout_ms) {
    for (int waited = 0;; waited += 20) {
        if (holds(arg)) return true;
        if (waited >= timeout_ms) return false;
        usleep(20000);
    }
}

/* The state the agent holding token sees when it polls approval id. */
static void poll_state(const char *id, const char *token, char state[16]) {
    char path[128];
    snprintf(path, sizeof path, "/v1/approvals/%s", id);
    struct h_resp r = {0};
    assert_int_equal(call(&r, "GET", path, token, NULL, NULL), 200);
    json_t *j = h_json(&r);
    assert_non_null(j);
    assert_int_equal(json_object_size(j), 3); /* {id, state, expires_at} */
    assert_string_equal(jstr(j, "id"), id);
    assert_non_null(jstr(j, "expires_at"));
    snprintf(state, 16, "%s", jstr(j, "state"));
    json_decref(j);
    h_resp_free(&r);
}

static void assert_poll_state(const char *id, const char *token, const char *want) {
    char state[16];
    poll_state(id, token, state);
    assert_string_equal(state, want);
}

/* Sends body to path as bot and expects 403 approval_required; the approval's id in id. */
static void require_approval(const char *path, const char *body, char id[32]) {
    struct h_resp r = {0};
    call(&r, "POST", path, BOT, body, NULL);
    json_t *err = error_of(&r, 403, "approval_required");
    assert_non_null(jstr(err, "approval_id"));
    snprintf(id, 32, "%s", jstr(err, "approval_id"));
    json_decref(err);
    h_resp_free(&r);
}

/* Decides approval id as the operator holding token; returns the status. */
static long decide(struct h_resp *r, const char *token, const char *id, const char *verb,
                   const char *reason) {
    char path[160], body[256];
    snprintf(path, sizeof path, "/admin/v1/approvals/%s/%s", id, verb);
    snprintf(body, sizeof body, "{\"reason\":\"%s\"}", reason);
    return admin_as(r, token, "POST", path, body);
}

/* A "Pep-Approval: id" header line in buf. */
static const char *approval_header(char *buf, size_t cap, const char *id) {
    snprintf(buf, cap, "Pep-Approval: %s", id);
    return buf;
}

/* Creates operator id with roles (a JSON array) and returns a token of it (caller frees). */
static char *operator_token(const char *id, const char *roles) {
    char body[256], path[256];
    struct h_resp r = {0};
    snprintf(body, sizeof body, "{\"id\":\"%s\",\"roles\":%s}", id, roles);
    if (fx_admin(&F, &r, "POST", "/admin/v1/operators", body) != 0 || r.status != 201) {
        fprintf(stderr, "operator %s: %ld %s\n", id, r.status, r.body);
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

static int group_setup(void **state) {
    (void)state;
    if (fx_start(&F, POLICY, NULL, NULL) != 0) return -1;
    BOT = fx_issue(&F, "bot", NULL, NULL);
    BOT2 = fx_issue(&F, "bot2", NULL, NULL);
    OTHER = fx_issue(&F, "other", NULL, NULL);
    OP_OWNER = operator_token(OWNER, "[\"approver\"]");
    OP_APPROVER = operator_token(APPROVER_ID, "[\"approver\"]");
    OP_AUDITOR = operator_token("aud@example.test", "[\"auditor\"]");
    return BOT && BOT2 && OTHER && OP_OWNER && OP_APPROVER && OP_AUDITOR ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    free(BOT);
    free(BOT2);
    free(OTHER);
    free(OP_OWNER);
    free(OP_APPROVER);
    free(OP_AUDITOR);
    fx_stop(&F);
    return 0;
}

/* ---- 1. deny --------------------------------------------------------------------------------- */

static void test_deny_rule(void **state) {
    (void)state;
    long hits = mock_hits("/v1/refunds");
    struct h_resp r = {0};
    call(&r, "POST", "/v1/refunds", BOT, "{\"amount\":10,\"currency\":\"GBP\"}", NULL);
    json_t *err = error_of(&r, 403, "denied_by_rule");
    assert_string_equal(jstr(err, "message"), "currency not supported");
    json_decref(err);
    json_t *rec = decision_of(&r, "denied_by_rule", "t.refund", "bot");
    assert_string_equal(jstr(rec, "reason"), "currency not supported");
    assert_string_equal(jstr(rec, "tenant"), "acme");
    json_decref(rec);
    /* A missing currency is absent: not_in is false, the rule does not apply. */
    assert_int_equal(call(&r, "POST", "/v1/refunds", BOT, "{\"amount\":10}", NULL), 200);
    json_decref(decision_of(&r, "ok", "t.refund", "bot"));
    assert_int_equal(
        call(&r, "POST", "/v1/refunds", BOT, "{\"amount\":10,\"currency\":\"EUR\"}", NULL), 200);
    assert_int_equal(mock_hits("/v1/refunds"), hits + 2); /* the denied one never went */
    h_resp_free(&r);
}

/* ---- 2. bodies that must be JSON ------------------------------------------------------------- */

static void test_body_read_by_conditions_must_be_json(void **state) {
    (void)state;
    long hits = mock_hits("/v1/refunds");
    static const char *const bodies[] = {
        "amount=5000&currency=USD",
        "{\"amount\":1,\"amount\":5000,\"currency\":\"USD\"}", /* which amount? neither */
        "",
    };
    struct h_resp r = {0};
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        call(&r, "POST", "/v1/refunds", BOT, bodies[i], NULL);
        json_decref(error_of(&r, 400, "bad_request"));
        json_decref(decision_of(&r, "bad_request", "t.refund", "bot"));
    }
    assert_int_equal(mock_hits("/v1/refunds"), hits);
    /* On a rate-limited action the refusal says what is left, and takes nothing. */
    call(&r, "POST", "/v1/transfers", BOT, "{\"amount\":", NULL);
    json_decref(error_of(&r, 400, "bad_request"));
    assert_non_null(h_header(&r, "RateLimit-Limit"));
    assert_string_equal(h_header(&r, "RateLimit-Limit"), "1");
    assert_string_equal(h_header(&r, "RateLimit-Remaining"), "1");

    /* t.note's only condition reads a header: its body is forwarded as is, never parsed. */
    hits = mock_hits("/v1/notes");
    assert_int_equal(call(&r, "POST", "/v1/notes", BOT, "not json {", NULL), 200);
    json_decref(decision_of(&r, "ok", "t.note", "bot"));
    assert_int_equal(call(&r, "POST", "/v1/notes", BOT, "{\"a\":1,\"a\":2}", NULL), 200);
    assert_int_equal(mock_hits("/v1/notes"), hits + 2);
    call(&r, "POST", "/v1/notes", BOT, "not json {", "X-Block: yes", NULL);
    json_t *err = error_of(&r, 403, "denied_by_rule");
    assert_string_equal(jstr(err, "message"), "blocked by header");
    json_decref(err);
    h_resp_free(&r);
}

/* ---- 3. step-up (RFC 9470) ------------------------------------------------------------------- */

static void test_step_up(void **state) {
    (void)state;
    char *mfa = fx_issue(&F, "bot", "{\"acr\":\"mfa\"}", NULL);
    char *pwd = fx_issue(&F, "bot", "{\"acr\":\"pwd\"}", NULL);
    assert_non_null(mfa);
    assert_non_null(pwd);
    struct h_resp r = {0};
    const char *const tokens[] = {BOT, pwd};
    for (size_t i = 0; i < 2; i++) {
        call(&r, "GET", "/v1/export", tokens[i], NULL, NULL);
        json_decref(error_of(&r, 401, "insufficient_user_authentication"));
        assert_non_null(h_header(&r, "WWW-Authenticate"));
        assert_string_equal(h_header(&r, "WWW-Authenticate"),
                            "Bearer error=\"insufficient_user_authentication\", "
                            "acr_values=\"mfa\", max_age=300");
        json_decref(decision_of(&r, "insufficient_user_authentication", "t.export", "bot"));
    }
    assert_int_equal(call(&r, "GET", "/v1/export", mfa, NULL, NULL), 200);
    assert_null(h_header(&r, "WWW-Authenticate"));
    json_decref(decision_of(&r, "ok", "t.export", "bot"));
    h_resp_free(&r);
    free(mfa);
    free(pwd);
}

/* ---- 4. approvals ---------------------------------------------------------------------------- */

/* The pending approvals in the admin list (new reference). */
static json_t *pending_list(void) {
    struct h_resp r = {0};
    assert_int_equal(admin_as(&r, OP_APPROVER, "GET", "/admin/v1/approvals?state=pending", NULL),
                     200);
    json_t *j = h_json(&r);
    h_resp_free(&r);
    json_t *list = json_incref(json_object_get(j, "approvals"));
    json_decref(j);
    assert_true(json_is_array(list));
    return list;
}

/* The item of list whose id is id, or NULL (borrowed). */
static json_t *item_with_id(json_t *list, const char *id) {
    size_t i;
    json_t *item;
    json_array_foreach(list, i, item) {
        if (strcmp(jstr(item, "id"), id) == 0) return item;
    }
    return NULL;
}

static void test_approval_round_trip(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":5000,\"currency\":\"USD\",\"ref\":\"round-trip\"}";
    long hits = mock_hits("/v1/refunds");
    struct h_resp r = {0};
    char id[32], hdr[64], path[128], want_url[256];

    /* Created: 403 approval_required with the approval's id and URL, and recorded. */
    call(&r, "POST", "/v1/refunds", BOT, BODY, NULL);
    json_t *err = error_of(&r, 403, "approval_required");
    snprintf(id, sizeof id, "%s", jstr(err, "approval_id"));
    assert_int_equal(strlen(id), 26);
    snprintf(want_url, sizeof want_url, "%s/v1/approvals/%s", F.pep.url, id);
    assert_string_equal(jstr(err, "approval_url"), want_url);
    json_decref(err);
    json_t *rec = decision_of(&r, "approval_required", "t.refund", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);

    /* The same request again while pending: the same approval, not a second one. */
    json_t *before = pending_list();
    call(&r, "POST", "/v1/refunds", BOT, BODY, NULL);
    err = error_of(&r, 403, "approval_required");
    assert_string_equal(jstr(err, "approval_id"), id);
    json_decref(err);
    json_t *after = pending_list();
    assert_int_equal(json_array_size(after), json_array_size(before));
    json_decref(before);

    /* The agent polls it; nobody else learns it exists. */
    assert_poll_state(id, BOT, "pending");
    snprintf(path, sizeof path, "/v1/approvals/%s", id);
    assert_int_equal(call(&r, "GET", path, BOT2, NULL, NULL), 404);
    call(&r, "GET", path, NULL, NULL, NULL);
    json_decref(error_of(&r, 401, "invalid_token"));
    assert_string_equal(h_header(&r, "WWW-Authenticate"), "Bearer error=\"invalid_token\"");

    /* Operators see it listed (SPEC 8 keys) and in detail, with the fields its conditions
     * name and nothing else of the body. */
    json_t *item = item_with_id(after, id);
    assert_non_null(item);
    assert_int_equal(json_object_size(item), 9);
    assert_string_equal(jstr(item, "state"), "pending");
    assert_string_equal(jstr(item, "agent"), "bot");
    assert_string_equal(jstr(item, "tenant"), "acme");
    assert_string_equal(jstr(item, "action"), "t.refund");
    assert_string_equal(jstr(item, "method"), "POST");
    assert_string_equal(jstr(item, "path"), "/v1/refunds");
    assert_non_null(jstr(item, "created_at"));
    assert_non_null(jstr(item, "expires_at"));
    json_decref(after);
    snprintf(path, sizeof path, "/admin/v1/approvals/%s", id);
    assert_int_equal(admin_as(&r, OP_APPROVER, "GET", path, NULL), 200);
    json_t *detail = h_json(&r);
    assert_string_equal(jstr(detail, "owner"), OWNER);
    assert_string_equal(jstr(detail, "state"), "pending");
    json_t *fields = json_object_get(detail, "fields");
    assert_int_equal(json_object_size(fields), 2);
    assert_int_equal(json_integer_value(json_object_get(fields, "amount")), 5000);
    assert_string_equal(jstr(fields, "currency"), "USD");
    json_decref(detail);

    /* distinct_from_owner: the agent's owner may not decide; an auditor may not either. */
    decide(&r, OP_OWNER, id, "approve", "mine");
    json_decref(error_of(&r, 403, "insufficient_scope"));
    decide(&r, OP_OWNER, id, "deny", "mine");
    json_decref(error_of(&r, 403, "insufficient_scope"));
    decide(&r, OP_AUDITOR, id, "approve", "looks fine");
    json_decref(error_of(&r, 403, "insufficient_scope"));
    assert_poll_state(id, BOT, "pending");

    /* An approver who is not the owner approves, with a reason: recorded as theirs. */
    assert_int_equal(decide(&r, OP_APPROVER, id, "approve", "refund checked with the customer"),
                     200);
    detail = h_json(&r);
    assert_string_equal(jstr(detail, "state"), "approved");
    assert_string_equal(jstr(detail, "decided_by"), APPROVER_ID);
    json_decref(detail);
    rec = fx_record(&F, h_header(&r, "Pep-Request-Id"), "admin");
    assert_non_null(rec);
    assert_string_equal(jstr(rec, "action"), "approvals.approve");
    assert_string_equal(jstr(rec, "operator"), APPROVER_ID);
    assert_string_equal(jstr(rec, "reason"), "refund checked with the customer");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_poll_state(id, BOT, "approved");

    /* Only the identical request of the same agent may use it. */
    call(&r, "POST", "/v1/refunds", BOT,
         "{\"amount\":9000,\"currency\":\"USD\",\"ref\":\"round-trip\"}",
         approval_header(hdr, sizeof hdr, id), NULL);
    json_decref(error_of(&r, 403, "approval_invalid"));
    json_decref(decision_of(&r, "approval_invalid", "t.refund", "bot"));
    call(&r, "POST", "/v1/refunds", BOT2, BODY, approval_header(hdr, sizeof hdr, id), NULL);
    json_decref(error_of(&r, 403, "approval_invalid"));
    json_decref(decision_of(&r, "approval_invalid", "t.refund", "bot2"));
    assert_poll_state(id, BOT, "approved");
    assert_int_equal(mock_hits("/v1/refunds"), hits);

    /* The identical re-send goes through, once. */
    assert_int_equal(
        call(&r, "POST", "/v1/refunds", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL),
        200);
    rec = decision_of(&r, "ok", "t.refund", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_int_equal(mock_hits("/v1/refunds"), hits + 1);
    assert_poll_state(id, BOT, "used");
    call(&r, "POST", "/v1/refunds", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL);
    json_decref(error_of(&r, 403, "approval_invalid"));
    assert_int_equal(mock_hits("/v1/refunds"), hits + 1);

    /* The approval's story in the audit log: created, decided, used. */
    char where[256];
    snprintf(where, sizeof where,
             "json_extract(record, '$.approval_id') = '%s' AND json_extract(record, '$.code') = "
             "'approval_required' AND json_extract(record, '$.kind') = 'decision'",
             id);
    assert_int_equal(fx_count_records_where(&F, where), 2); /* the first send and the repeat */
    snprintf(where, sizeof where,
             "json_extract(record, '$.approval_id') = '%s' AND json_extract(record, '$.decision') "
             "= 'allow' AND json_extract(record, '$.kind') = 'decision'",
             id);
    assert_int_equal(fx_count_records_where(&F, where), 1);
    h_resp_free(&r);
}

static void test_denied_approval(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":2000,\"currency\":\"EUR\",\"ref\":\"denied\"}";
    char id[32], hdr[64];
    require_approval("/v1/refunds", BODY, id);
    struct h_resp r = {0};
    assert_int_equal(decide(&r, OP_APPROVER, id, "deny", "no such order"), 200);
    json_t *rec = fx_record(&F, h_header(&r, "Pep-Request-Id"), "admin");
    assert_non_null(rec);
    assert_string_equal(jstr(rec, "action"), "approvals.deny");
    assert_string_equal(jstr(rec, "operator"), APPROVER_ID);
    assert_string_equal(jstr(rec, "reason"), "no such order");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_poll_state(id, BOT, "denied");
    /* A decided approval cannot be decided again. */
    assert_int_equal(decide(&r, OP_APPROVER, id, "approve", "changed my mind"), 409);

    long hits = mock_hits("/v1/refunds");
    call(&r, "POST", "/v1/refunds", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL);
    json_t *err = error_of(&r, 403, "approval_denied");
    assert_string_equal(jstr(err, "approval_id"), id);
    json_decref(err);
    rec = decision_of(&r, "approval_denied", "t.refund", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_int_equal(mock_hits("/v1/refunds"), hits);
    h_resp_free(&r);
}

/* Re-sends of one approved request at once: exactly one goes through. */
#define RESENDS 10

struct resend_call {
    pthread_barrier_t *start;
    const char *body, *approval_id;
    long status;
    char code[32];
};

static void *resend_thread(void *arg) {
    struct resend_call *c = arg;
    char hdr[64];
    struct h_resp r = {0};
    pthread_barrier_wait(c->start);
    c->status = call(&r, "POST", "/v1/refunds", BOT, c->body,
                     approval_header(hdr, sizeof hdr, c->approval_id), NULL);
    json_t *j = h_json(&r);
    snprintf(c->code, sizeof c->code, "%s",
             c->status == 200 ? "ok" : jstr(json_object_get(j, "error"), "code"));
    json_decref(j);
    h_resp_free(&r);
    return NULL;
}

static void test_approval_used_once_under_concurrency(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":3000,\"currency\":\"USD\",\"ref\":\"concurrent\"}";
    char id[32];
    require_approval("/v1/refunds", BODY, id);
    struct h_resp r = {0};
    assert_int_equal(decide(&r, OP_APPROVER, id, "approve", "ok"), 200);
    h_resp_free(&r);
    long hits = mock_hits("/v1/refunds");
    struct resend_call calls[RESENDS];
    pthread_t threads[RESENDS];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, RESENDS);
    for (int i = 0; i < RESENDS; i++) {
        calls[i] = (struct resend_call){.start = &start, .body = BODY, .approval_id = id};
        assert_int_equal(pthread_create(&threads[i], NULL, resend_thread, &calls[i]), 0);
    }
    for (int i = 0; i < RESENDS; i++)
        pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&start);
    int passed = 0;
    for (int i = 0; i < RESENDS; i++) {
        if (calls[i].status == 200) {
            passed++;
        } else {
            if (calls[i].status != 403) fprintf(stderr, "re-send: %ld\n", calls[i].status);
            assert_int_equal(calls[i].status, 403);
            assert_string_equal(calls[i].code, "approval_invalid");
        }
    }
    assert_int_equal(passed, 1);
    assert_int_equal(mock_hits("/v1/refunds"), hits + 1);
    assert_poll_state(id, BOT, "used");
}

struct poll_target {
    const char *id;
    const char *state;
};

static bool poll_says(void *arg) {
    const struct poll_target *t = arg;
    char state[16];
    poll_state(t->id, BOT, state);
    return strcmp(state, t->state) == 0;
}

/* An approval left pending past its ttl: expired for everyone, and a new one is created. */
static void test_expired_approval(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":5000}";
    char id[32], hdr[64], path[128];
    require_approval("/v1/quick", BODY, id);
    struct poll_target expired = {id, "expired"};
    assert_true(wait_for(poll_says, &expired, 10000));
    struct h_resp r = {0};
    decide(&r, OP_APPROVER, id, "approve", "too late");
    json_decref(error_of(&r, 409, "conflict"));
    snprintf(path, sizeof path, "/admin/v1/approvals/%s", id);
    assert_int_equal(admin_as(&r, OP_APPROVER, "GET", path, NULL), 200);
    json_t *detail = h_json(&r);
    assert_string_equal(jstr(detail, "state"), "expired");
    json_decref(detail);
    json_t *list = pending_list();
    assert_null(item_with_id(list, id));
    json_decref(list);

    call(&r, "POST", "/v1/quick", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL);
    json_decref(error_of(&r, 403, "approval_invalid"));
    json_decref(decision_of(&r, "approval_invalid", "t.quick", "bot"));
    char again[32];
    require_approval("/v1/quick", BODY, again);
    assert_string_not_equal(again, id);
    h_resp_free(&r);
}

/* The quota of t.transfer is back: a probe (refused by a deny control, so it takes
 * nothing) sees RateLimit-Remaining 1. */
static bool transfer_quota_back(void *arg) {
    (void)arg;
    struct h_resp r = {0};
    call(&r, "POST", "/v1/transfers", BOT, "{}", "X-Probe: 1", NULL);
    const char *left = h_header(&r, "RateLimit-Remaining");
    bool back = r.status == 403 && left && strcmp(left, "1") == 0;
    h_resp_free(&r);
    return back;
}

/* A re-send refused at step 6 consumes nothing: the approval stays approved and the
 * re-send passes once the quota is back. */
static void test_rate_limited_resend_keeps_the_approval(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":5000,\"ref\":\"limited\"}";
    char id[32], hdr[64];
    struct h_resp r = {0};
    assert_true(wait_for(transfer_quota_back, NULL, 10000));
    require_approval("/v1/transfers", BODY, id);
    assert_int_equal(decide(&r, OP_APPROVER, id, "approve", "ok"), 200);

    /* A transfer that needs no approval takes the quota (one per 2 s). */
    assert_int_equal(call(&r, "POST", "/v1/transfers", BOT, "{\"amount\":1}", NULL), 200);
    assert_string_equal(h_header(&r, "RateLimit-Remaining"), "0");

    call(&r, "POST", "/v1/transfers", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL);
    json_t *err = error_of(&r, 429, "rate_limited");
    assert_true(json_integer_value(json_object_get(err, "retry_after_s")) >= 1);
    json_decref(err);
    assert_true(atoi(h_header(&r, "Retry-After")) >= 1);
    json_t *rec = decision_of(&r, "rate_limited", "t.transfer", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_poll_state(id, BOT, "approved");

    long hits = mock_hits("/v1/transfers");
    assert_true(wait_for(transfer_quota_back, NULL, 10000));
    assert_int_equal(
        call(&r, "POST", "/v1/transfers", BOT, BODY, approval_header(hdr, sizeof hdr, id), NULL),
        200);
    rec = decision_of(&r, "ok", "t.transfer", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_poll_state(id, BOT, "used");
    assert_int_equal(mock_hits("/v1/transfers"), hits + 1);
    h_resp_free(&r);
}

/* ---- 5. notify ------------------------------------------------------------------------------- */

/* wait_for's condition: mockllm has received a POST to /hooks/approvals naming approval_id;
 * its record (method, path, headers, body) is then in found (caller decrefs). */
struct hook_search {
    const char *approval_id;
    json_t *found;
};

static bool hook_arrived(void *arg) {
    struct hook_search *s = arg;
    char url[256];
    snprintf(url, sizeof url, "%s/_mock/requests", F.mock.url);
    struct h_resp r = {0};
    h_http(&r, "GET", url, NULL, NULL);
    json_t *j = r.status == 200 ? h_json(&r) : NULL;
    h_resp_free(&r);
    size_t i;
    json_t *req;
    json_array_foreach(json_object_get(j, "requests"), i, req) {
        const char *body = jstr(req, "body");
        if (strcmp(jstr(req, "path"), "/hooks/approvals") == 0 && body &&
            strstr(body, s->approval_id)) {
            s->found = json_incref(req);
            break;
        }
    }
    json_decref(j);
    return s->found != NULL;
}

static void test_notify_posts_the_pending_approval(void **state) {
    (void)state;
    char id[32];
    require_approval("/v1/wires", "{\"amount\":500,\"memo\":\"do-not-leak\"}", id);
    struct hook_search s = {.approval_id = id};
    assert_true(wait_for(hook_arrived, &s, 10000));
    assert_string_equal(jstr(s.found, "method"), "POST");
    const char *text = jstr(s.found, "body");
    assert_null(strstr(text, BOT));           /* never the agent's token */
    assert_null(strstr(text, "do-not-leak")); /* never the request's body */
    const char *key;
    json_t *value;
    json_object_foreach(json_object_get(s.found, "headers"), key, value) {
        assert_null(strstr(json_string_value(value), BOT));
    }
    json_t *hook = json_loads(text, 0, NULL);
    assert_non_null(hook);
    assert_string_equal(jstr(hook, "id"), id);
    assert_string_equal(jstr(hook, "action"), "t.wire");
    assert_string_equal(jstr(hook, "agent"), "bot");
    assert_string_equal(jstr(hook, "owner"), OWNER);
    assert_string_equal(jstr(hook, "tenant"), "acme");
    assert_string_equal(jstr(hook, "method"), "POST");
    assert_string_equal(jstr(hook, "path"), "/v1/wires");
    json_t *fields = json_object_get(hook, "fields");
    assert_int_equal(json_object_size(fields), 1);
    assert_int_equal(json_integer_value(json_object_get(fields, "amount")), 500);
    assert_non_null(jstr(hook, "created_at"));
    assert_non_null(jstr(hook, "expires_at"));
    json_decref(hook);
    json_decref(s.found);
}

/* ---- 6. rate limits -------------------------------------------------------------------------- */

#define BURST 50

/* One request of the burst, as its thread saw it (no assertion off the main thread). */
struct burst_call {
    pthread_barrier_t *start;
    long status;
    char limit[16], remaining[16], reset[16], retry_after[16];
    char code[32];
    long retry_after_s;
};

static void copy_header(const struct h_resp *r, const char *name, char out[16]) {
    const char *v = h_header(r, name);
    snprintf(out, 16, "%s", v ? v : "");
}

static void *burst_thread(void *arg) {
    struct burst_call *c = arg;
    struct h_resp r = {0};
    pthread_barrier_wait(c->start);
    c->status = call(&r, "POST", "/v1/burst", BOT, "{}", NULL);
    copy_header(&r, "RateLimit-Limit", c->limit);
    copy_header(&r, "RateLimit-Remaining", c->remaining);
    copy_header(&r, "RateLimit-Reset", c->reset);
    copy_header(&r, "Retry-After", c->retry_after);
    json_t *j = h_json(&r);
    json_t *err = json_object_get(j, "error");
    snprintf(c->code, sizeof c->code, "%s", err ? jstr(err, "code") : "");
    c->retry_after_s = (long)json_integer_value(json_object_get(err, "retry_after_s"));
    json_decref(j);
    h_resp_free(&r);
    return NULL;
}

/* A request of t.burst refused by its deny control: RateLimit-* still there, nothing taken. */
static void assert_denied_burst(const char *want_remaining) {
    struct h_resp r = {0};
    call(&r, "POST", "/v1/burst", BOT, "{}", "X-Deny: 1", NULL);
    json_decref(error_of(&r, 403, "denied_by_rule"));
    assert_string_equal(h_header(&r, "RateLimit-Limit"), "10");
    assert_string_equal(h_header(&r, "RateLimit-Remaining"), want_remaining);
    assert_true(atoi(h_header(&r, "RateLimit-Reset")) >= 1);
    assert_null(h_header(&r, "Retry-After"));
    h_resp_free(&r);
}

static void test_rate_limit_burst(void **state) {
    (void)state;
    for (int i = 0; i < 5; i++)
        assert_denied_burst("10");
    long hits = mock_hits("/v1/burst");

    static struct burst_call calls[BURST];
    pthread_t threads[BURST];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, BURST);
    for (int i = 0; i < BURST; i++) {
        calls[i] = (struct burst_call){.start = &start};
        assert_int_equal(pthread_create(&threads[i], NULL, burst_thread, &calls[i]), 0);
    }
    for (int i = 0; i < BURST; i++)
        pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&start);

    int admitted = 0, limited = 0;
    unsigned remaining_seen = 0; /* bit n: an admitted request was told n are left */
    for (int i = 0; i < BURST; i++) {
        const struct burst_call *c = &calls[i];
        assert_string_equal(c->limit, "10");
        assert_true(c->remaining[0] && atoi(c->reset) >= 1);
        if (c->status == 200) {
            admitted++;
            remaining_seen |= 1u << atoi(c->remaining);
            assert_string_equal(c->retry_after, "");
        } else {
            if (c->status != 429) fprintf(stderr, "burst: %ld %s\n", c->status, c->code);
            assert_int_equal(c->status, 429);
            limited++;
            assert_string_equal(c->code, "rate_limited");
            assert_string_equal(c->remaining, "0");
            assert_true(atoi(c->retry_after) >= 1);
            assert_int_equal(c->retry_after_s, atoi(c->retry_after));
        }
    }
    assert_int_equal(admitted, 10);
    assert_int_equal(limited, BURST - 10);
    assert_int_equal(remaining_seen, 0x3ff); /* 9, 8, ... 0: each admission took one */
    assert_int_equal(mock_hits("/v1/burst"), hits + 10);
    assert_int_equal(fx_count_records_where(&F, "json_extract(record, '$.kind') = 'decision' AND "
                                                "json_extract(record, '$.action') = 't.burst' AND "
                                                "json_extract(record, '$.code') = 'rate_limited'"),
                     BURST - 10);
    assert_int_equal(fx_count_records_where(&F, "json_extract(record, '$.kind') = 'decision' AND "
                                                "json_extract(record, '$.action') = 't.burst' AND "
                                                "json_extract(record, '$.code') = 'ok'"),
                     10);
    assert_denied_burst("0");
    /* Another agent has a quota of its own. */
    struct h_resp r = {0};
    assert_int_equal(call(&r, "POST", "/v1/burst", OTHER, "{}", NULL), 200);
    assert_string_equal(h_header(&r, "RateLimit-Remaining"), "9");
    h_resp_free(&r);
}

/* POST path as token: asserts the status (429: rate_limited with Retry-After) and the
 * RateLimit-Limit and RateLimit-Remaining it answers with. */
static void expect_limited(const char *path, const char *token, long status, const char *limit,
                           const char *remaining) {
    struct h_resp r = {0};
    call(&r, "POST", path, token, "{}", NULL);
    if (status == 429)
        json_decref(error_of(&r, 429, "rate_limited"));
    else
        assert_int_equal(r.status, status);
    assert_non_null(h_header(&r, "RateLimit-Limit"));
    assert_string_equal(h_header(&r, "RateLimit-Limit"), limit);
    assert_string_equal(h_header(&r, "RateLimit-Remaining"), remaining);
    if (status == 429) assert_true(atoi(h_header(&r, "Retry-After")) >= 1);
    h_resp_free(&r);
}

static void test_rate_limit_keys(void **state) {
    (void)state;
    /* key: tenant — acme's quota is shared by its agents, globex and initech have their own. */
    expect_limited("/v1/tenants/acme/quota", BOT, 200, "2", "1");
    expect_limited("/v1/tenants/acme/quota", BOT2, 200, "2", "0");
    expect_limited("/v1/tenants/acme/quota", OTHER, 429, "2", "0");
    expect_limited("/v1/tenants/globex/quota", BOT, 200, "2", "1");
    expect_limited("/v1/tenants/initech/quota", OTHER, 200, "2", "1");
    expect_limited("/v1/tenants/acme/quota", BOT, 429, "2", "0");

    /* key: global — one quota for everyone. */
    expect_limited("/v1/global", BOT, 200, "3", "2");
    expect_limited("/v1/global", BOT2, 200, "3", "1");
    expect_limited("/v1/global", OTHER, 200, "3", "0");
    expect_limited("/v1/global", OTHER, 429, "3", "0");
    expect_limited("/v1/global", BOT, 429, "3", "0");

    /* Two rules: the tighter answers. */
    expect_limited("/v1/two", BOT, 200, "3", "2");
    expect_limited("/v1/two", BOT, 200, "3", "1");
    expect_limited("/v1/two", BOT, 200, "3", "0");
    expect_limited("/v1/two", BOT, 429, "3", "0");
    expect_limited("/v1/two", BOT2, 200, "3", "2");
}

/* ---- 7. idempotency -------------------------------------------------------------------------- */

static void test_idempotency(void **state) {
    (void)state;
    static const char *BODY = "{\"amount\":10,\"to\":\"acct-1\"}";
    long hits = mock_hits("/v1/payments");
    struct h_resp first = {0}, r = {0};
    assert_int_equal(call(&first, "POST", "/v1/payments", BOT, BODY, "Idempotency-Key: k1", NULL),
                     200);
    assert_null(h_header(&first, "Pep-Idempotent-Replay"));
    json_decref(decision_of(&first, "ok", "t.pay", "bot"));

    /* The repeat: the stored answer, not a second payment. */
    assert_int_equal(call(&r, "POST", "/v1/payments", BOT, BODY, "Idempotency-Key: k1", NULL), 200);
    assert_non_null(h_header(&r, "Pep-Idempotent-Replay"));
    assert_string_equal(h_header(&r, "Pep-Idempotent-Replay"), "true");
    assert_int_equal(r.body_len, first.body_len);
    assert_memory_equal(r.body, first.body, first.body_len);
    assert_string_equal(h_header(&r, "Pep-Upstream"), "mock");
    assert_string_not_equal(h_header(&r, "Pep-Request-Id"), h_header(&first, "Pep-Request-Id"));
    assert_int_equal(mock_hits("/v1/payments"), hits + 1);
    json_t *rec = decision_of(&r, "ok", "t.pay", "bot");
    assert_true(json_is_true(json_object_get(rec, "idempotent_replay")));
    assert_string_equal(jstr(rec, "replay_of"), h_header(&first, "Pep-Request-Id"));
    json_decref(rec);

    /* Same key, another request. */
    call(&r, "POST", "/v1/payments", BOT, "{\"amount\":11,\"to\":\"acct-1\"}",
         "Idempotency-Key: k1", NULL);
    json_decref(error_of(&r, 422, "idempotency_mismatch"));
    json_decref(decision_of(&r, "idempotency_mismatch", "t.pay", "bot"));

    /* Keys: at most 255 characters. */
    char ks[257], key[300];
    memset(ks, 'k', sizeof ks - 1);
    ks[256] = '\0';
    snprintf(key, sizeof key, "Idempotency-Key: %s", ks); /* 256 */
    call(&r, "POST", "/v1/payments", BOT, BODY, key, NULL);
    json_decref(error_of(&r, 400, "bad_request"));
    snprintf(key, sizeof key, "Idempotency-Key: %s", ks + 1); /* 255 */
    assert_int_equal(call(&r, "POST", "/v1/payments", BOT, BODY, key, NULL), 200);
    assert_int_equal(mock_hits("/v1/payments"), hits + 2);

    /* A key is the agent's own: another agent's k1 is another request. */
    assert_int_equal(call(&r, "POST", "/v1/payments", OTHER, BODY, "Idempotency-Key: k1", NULL),
                     200);
    assert_null(h_header(&r, "Pep-Idempotent-Replay"));
    assert_int_equal(mock_hits("/v1/payments"), hits + 3);
    h_resp_free(&first);
    h_resp_free(&r);
}

struct payment_call {
    const char *key;
    long status;
};

static void *payment_thread(void *arg) {
    struct payment_call *c = arg;
    char key[80];
    snprintf(key, sizeof key, "Idempotency-Key: %s", c->key);
    struct h_resp r = {0};
    c->status = call(&r, "POST", "/v1/payments", BOT, "{\"amount\":20}", key, NULL);
    h_resp_free(&r);
    return NULL;
}

struct hits_at_least {
    const char *path;
    long n;
};

static bool mock_has_hits(void *arg) {
    const struct hits_at_least *h = arg;
    return mock_hits(h->path) >= h->n;
}

static void test_idempotency_in_flight(void **state) {
    (void)state;
    struct hits_at_least seen = {"/v1/payments", mock_hits("/v1/payments") + 1};
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"delay\",\"delay_ms\":2000,"
                                              "\"path\":\"/v1/payments\",\"count\":1}"),
                     0);
    struct payment_call first = {.key = "k-flight"};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, payment_thread, &first), 0);
    /* mockllm holds the first one: it is in flight. */
    bool arrived = wait_for(mock_has_hits, &seen, 10000);
    struct h_resp r = {0};
    call(&r, "POST", "/v1/payments", BOT, "{\"amount\":20}", "Idempotency-Key: k-flight", NULL);
    pthread_join(t, NULL);
    assert_true(arrived);
    json_decref(error_of(&r, 409, "idempotency_in_progress"));
    json_decref(decision_of(&r, "idempotency_in_progress", "t.pay", "bot"));
    assert_int_equal(first.status, 200);
    assert_int_equal(
        call(&r, "POST", "/v1/payments", BOT, "{\"amount\":20}", "Idempotency-Key: k-flight", NULL),
        200);
    assert_string_equal(h_header(&r, "Pep-Idempotent-Replay"), "true");
    assert_int_equal(mock_hits("/v1/payments"), seen.n);
    h_resp_free(&r);
}

/* ---- 8. restart ------------------------------------------------------------------------------ */

static bool outcome_recorded(void *request_id) {
    json_t *rec = fx_record(&F, request_id, "outcome");
    json_decref(rec);
    return rec != NULL;
}

/* kill -9, then a new pep on the same data dir: the pending approval is still pending and
 * works, the stored answer is still replayed. */
static void test_state_survives_kill_9(void **state) {
    (void)state;
    static const char *REFUND = "{\"amount\":7777,\"currency\":\"EUR\",\"ref\":\"restart\"}";
    static const char *PAYMENT = "{\"amount\":30}";
    char id[32], hdr[64], rid[40];
    require_approval("/v1/refunds", REFUND, id);
    struct h_resp r = {0};
    assert_int_equal(
        call(&r, "POST", "/v1/payments", BOT, PAYMENT, "Idempotency-Key: k-restart", NULL), 200);
    snprintf(rid, sizeof rid, "%s", h_header(&r, "Pep-Request-Id"));
    /* The answer is stored with its outcome record: wait until that one is written. */
    assert_true(wait_for(outcome_recorded, rid, 10000));
    long pay_hits = mock_hits("/v1/payments"), refund_hits = mock_hits("/v1/refunds");

    h_stop(&F.pep, SIGKILL);
    assert_int_equal(fx_restart_pep(&F, NULL), 0);

    assert_poll_state(id, BOT, "pending");
    char again[32];
    require_approval("/v1/refunds", REFUND, again);
    assert_string_equal(again, id);
    assert_int_equal(decide(&r, OP_APPROVER, id, "approve", "after the restart"), 200);
    assert_int_equal(
        call(&r, "POST", "/v1/refunds", BOT, REFUND, approval_header(hdr, sizeof hdr, id), NULL),
        200);
    json_t *rec = decision_of(&r, "ok", "t.refund", "bot");
    assert_string_equal(jstr(rec, "approval_id"), id);
    json_decref(rec);
    assert_poll_state(id, BOT, "used");
    assert_int_equal(mock_hits("/v1/refunds"), refund_hits + 1);

    assert_int_equal(
        call(&r, "POST", "/v1/payments", BOT, PAYMENT, "Idempotency-Key: k-restart", NULL), 200);
    assert_string_equal(h_header(&r, "Pep-Idempotent-Replay"), "true");
    assert_int_equal(mock_hits("/v1/payments"), pay_hits);
    h_resp_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deny_rule),
        cmocka_unit_test(test_body_read_by_conditions_must_be_json),
        cmocka_unit_test(test_step_up),
        cmocka_unit_test(test_approval_round_trip),
        cmocka_unit_test(test_denied_approval),
        cmocka_unit_test(test_approval_used_once_under_concurrency),
        cmocka_unit_test(test_expired_approval),
        cmocka_unit_test(test_rate_limited_resend_keeps_the_approval),
        cmocka_unit_test(test_notify_posts_the_pending_approval),
        cmocka_unit_test(test_rate_limit_burst),
        cmocka_unit_test(test_rate_limit_keys),
        cmocka_unit_test(test_idempotency),
        cmocka_unit_test(test_idempotency_in_flight),
        cmocka_unit_test(test_state_survives_kill_9), /* last: restarts pep */
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
