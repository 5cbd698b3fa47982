/*
 * test_truth.c — an audit that never lies (SPEC 4.2, 6.2, 6.5), checked over every record
 * under concurrency and faults: the chain's order is the order of what happened under
 * revocation and reload; an outcome is never dropped while pep runs; a request not safe
 * to repeat reaches the upstream at most once, and every send is an attempt.
 */
#include "tests/integration/fixture.h"
#include "tests/integration/rawup.h"
#include "pep/util.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cmocka.h>

/* @SCOPE@ is the scope policy A or B gives agent `rl` (reload test). */
static const char *POLICY =
    "version: 1\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: rv1, owner: o@example.test, tenants: [acme], scopes: [tool.read] }\n"
    "  - { id: rv2, owner: o@example.test, tenants: [acme], scopes: [tool.read] }\n"
    "  - { id: rv3, owner: o@example.test, tenants: [acme], scopes: [tool.read] }\n"
    "  - { id: rl, owner: o@example.test, tenants: [acme], scopes: [@SCOPE@] }\n"
    "  - { id: bot, owner: o@example.test, tenants: [acme], scopes: [llm.chat, tool.read] }\n"
    "upstreams:\n"
    "  mock: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  raw: { base_url: \"@RAW@\", timeout: 5s }\n"
    "routes:\n"
    "  - match: { method: GET, path: /v1/check }\n"
    "    action: tool.read\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: mock }\n"
    "  - match: { method: POST, path: /v1/refunds }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: raw }\n"
    "  - match: { method: PUT, path: /v1/items }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: raw }\n"
    "actions:\n"
    "  llm.chat: { scope: llm.chat }\n"
    "  tool.read: { scope: tool.read }\n";

static const char *OK_ANSWER = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";

static struct fx F;
static struct rawup *RAW;
static char RAW_URL[64];
static char *BOT_TOKEN;

/* POLICY with @RAW@ and @SCOPE@ filled in, and @MOCK@ once the fixture has started
 * (caller frees). */
static char *policy_text(const char *scope) {
    char *a = fx_replace_all(POLICY, "@RAW@", RAW_URL);
    char *b = a ? fx_replace_all(a, "@SCOPE@", scope) : NULL;
    char *c = b && F.mock.url[0] ? fx_replace_all(b, "@MOCK@", F.mock.url) : NULL;
    free(a);
    if (!c) return b;
    free(b);
    return c;
}

static int group_setup(void **state) {
    (void)state;
    RAW = rawup_start(RAW_URL, sizeof RAW_URL);
    if (!RAW) return -1;
    rawup_script(RAW, OK_ANSWER, strlen(OK_ANSWER), false);
    char *text = policy_text("tool.read");
    int rc = fx_start(&F, text, NULL, NULL);
    free(text);
    if (rc != 0) return -1;
    BOT_TOKEN = fx_issue(&F, "bot", NULL, NULL);
    return BOT_TOKEN ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    free(BOT_TOKEN);
    fx_stop(&F);
    rawup_stop(RAW);
    return 0;
}

static long call(const char *method, const char *path, const char *token, struct h_resp *out) {
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s%s", F.pep.url, path);
    struct h_resp r = {0};
    h_http(&r, method, url, strcmp(method, "GET") ? "{\"model\":\"m\"}" : NULL,
           fx_bearer(auth, sizeof auth, token), NULL);
    long status = r.status;
    if (out)
        *out = r;
    else
        h_resp_free(&r);
    return status;
}

static json_t *outcome_of(const char *request_id) {
    json_t *rec = NULL;
    for (int i = 0; i < 100 && !rec; i++) {
        rec = fx_record(&F, request_id, "outcome");
        if (!rec) usleep(100000);
    }
    return rec;
}

/* ---- ordering under revocation ---------------------------------------------------------- */

/* Clients calling GET /v1/check with one token until told to stop. */
#define HAMMERS_MAX 32
struct hammer {
    const char *token;
    volatile bool *stop;
    int allowed, refused;
};

struct hammers {
    pthread_t threads[HAMMERS_MAX];
    struct hammer h[HAMMERS_MAX];
    int n;
    volatile bool stop;
};

static void *hammer_thread(void *arg) {
    struct hammer *h = arg;
    while (!*h->stop) {
        long st = call("GET", "/v1/check", h->token, NULL);
        if (st == 200)
            h->allowed++;
        else
            h->refused++;
    }
    return NULL;
}

static void hammers_start(struct hammers *hs, int n, const char *token) {
    hs->n = n;
    hs->stop = false;
    for (int i = 0; i < n; i++) {
        hs->h[i] = (struct hammer){.token = token, .stop = &hs->stop};
        pthread_create(&hs->threads[i], NULL, hammer_thread, &hs->h[i]);
    }
}

/* Stops them; the calls they saw allowed and refused. */
static void hammers_stop(struct hammers *hs, int *allowed, int *refused) {
    hs->stop = true;
    *allowed = *refused = 0;
    for (int i = 0; i < hs->n; i++) {
        pthread_join(hs->threads[i], NULL);
        *allowed += hs->h[i].allowed;
        *refused += hs->h[i].refused;
    }
}

/* 32 clients with one token while it is revoked, twice, and while its agent is disabled:
 * no allow decision made with the token follows that record in the chain. */
static void test_no_allow_after_revocation_record(void **state) {
    (void)state;
    static const char *const agents[] = {"rv1", "rv2", "rv3"};
    for (size_t round = 0; round < 3; round++) {
        char jti[64];
        char *token = fx_issue(&F, agents[round], NULL, jti);
        assert_non_null(token);
        struct hammers hs;
        hammers_start(&hs, 32, token);
        usleep(300000);
        char path[128];
        if (round < 2)
            snprintf(path, sizeof path, "/admin/v1/tokens/%s", jti);
        else
            snprintf(path, sizeof path, "/admin/v1/agents/%s/disable", agents[round]);
        struct h_resp r = {0};
        assert_int_equal(fx_admin(&F, &r, round < 2 ? "DELETE" : "POST", path, NULL), 0);
        assert_int_equal(r.status, 200);
        long revoke_seq = atol(h_header(&r, "Pep-Audit-Seq"));
        h_resp_free(&r);
        usleep(300000);
        int allowed, refused;
        hammers_stop(&hs, &allowed, &refused);
        fprintf(stderr, "round %zu: %d allowed, %d refused around the %s at seq %ld\n", round,
                allowed, refused, round < 2 ? "revocation" : "disable", revoke_seq);
        assert_true(allowed > 0 && refused > 0);
        char where[256];
        snprintf(where, sizeof where,
                 "json_extract(record, '$.agent') = '%s' AND json_extract(record, '$.kind') = "
                 "'decision' AND json_extract(record, '$.decision') = 'allow' AND seq > %ld",
                 agents[round], revoke_seq);
        assert_int_equal(fx_count_records_where(&F, where), 0);
        snprintf(where, sizeof where,
                 "json_extract(record, '$.agent') = '%s' AND json_extract(record, '$.kind') = "
                 "'decision' AND json_extract(record, '$.decision') = 'allow' AND seq < %ld",
                 agents[round], revoke_seq);
        assert_true(fx_count_records_where(&F, where) > 0);
        free(token);
    }
}

/* ---- ordering under reload ---------------------------------------------------------------- */

static void hash_hex(const char *text, char out[65]) {
    uint8_t d[32];
    pep_sha256(text, strlen(text), d);
    pep_hex(d, 32, out);
}

/* 16 clients while policies A (rl holds tool.read) and B (it does not) are reloaded
 * alternately 12 times: every decision agrees with the policy whose hash it carries. */
static void test_decisions_agree_with_their_policy(void **state) {
    (void)state;
    char *a = policy_text("tool.read"), *b = policy_text("tool.other");
    char hash_a[65], hash_b[65];
    hash_hex(a, hash_a);
    hash_hex(b, hash_b);
    assert_int_equal(h_write_file(F.policy, a), 0);
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    assert_int_equal(r.status, 200);
    char *token = fx_issue(&F, "rl", NULL, NULL); /* scope tool.read, issued under A */
    assert_non_null(token);
    struct hammers hs;
    hammers_start(&hs, 16, token);
    for (int k = 0; k < 12; k++) {
        usleep(100000);
        assert_int_equal(h_write_file(F.policy, k % 2 ? a : b), 0);
        assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
        assert_int_equal(r.status, 200);
    }
    usleep(100000);
    int allowed, refused;
    hammers_stop(&hs, &allowed, &refused);
    fprintf(stderr, "%d allowed, %d refused across 12 reloads\n", allowed, refused);
    assert_true(allowed > 0 && refused > 0);
    char where[512];
    snprintf(where, sizeof where,
             "json_extract(record, '$.agent') = 'rl' AND json_extract(record, '$.kind') = "
             "'decision' AND ((json_extract(record, '$.policy_hash') = '%s' AND "
             "json_extract(record, '$.code') != 'ok') OR (json_extract(record, '$.policy_hash') = "
             "'%s' AND json_extract(record, '$.code') != 'insufficient_scope'))",
             hash_a, hash_b);
    assert_int_equal(fx_count_records_where(&F, where), 0);
    snprintf(where, sizeof where,
             "json_extract(record, '$.agent') = 'rl' AND json_extract(record, '$.kind') = "
             "'decision' AND json_extract(record, '$.policy_hash') = '%s'",
             hash_b);
    assert_true(fx_count_records_where(&F, where) > 0);
    /* leave policy A in force */
    assert_int_equal(h_write_file(F.policy, a), 0);
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/policy/reload", NULL), 0);
    h_resp_free(&r);
    free(token);
    free(a);
    free(b);
}

/* ---- no outcome dropped --------------------------------------------------------------------- */

struct slow_call {
    long status;
    char request_id[32];
};

static void *slow_call_thread(void *arg) {
    struct slow_call *c = arg;
    struct h_resp r = {0};
    c->status = call("POST", "/v1/chat/completions", BOT_TOKEN, &r);
    const char *rid = h_header(&r, "Pep-Request-Id");
    snprintf(c->request_id, sizeof c->request_id, "%s", rid ? rid : "");
    h_resp_free(&r);
    return NULL;
}

static void set_fsize(pid_t pid, rlim_t soft) {
    struct rlimit rl;
    assert_int_equal(prlimit(pid, RLIMIT_FSIZE, NULL, &rl), 0);
    rl.rlim_cur = soft;
    assert_int_equal(prlimit(pid, RLIMIT_FSIZE, &rl, NULL), 0);
}

/* The store fails (EFBIG) while an upstream call is in flight: the agent gets its answer,
 * requests decided meanwhile are refused (fail closed), and the outcome record appears
 * once the store writes again. */
static void test_outcome_kept_through_a_write_failure(void **state) {
    (void)state;
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"delay\",\"delay_ms\":1500,\"count\":1}"),
                     0);
    struct slow_call c = {0};
    pthread_t t;
    pthread_create(&t, NULL, slow_call_thread, &c);
    usleep(500000); /* its decision is durable; the upstream call is under way */
    set_fsize(F.pep.pid, 1);
    struct h_resp r = {0};
    assert_int_equal(call("GET", "/v1/check", BOT_TOKEN, &r), 503);
    assert_non_null(strstr(r.body, "audit_unavailable"));
    h_resp_free(&r);
    pthread_join(t, NULL);
    assert_int_equal(c.status, 200);
    usleep(300000);
    assert_null(fx_record(&F, c.request_id, "outcome")); /* held, not written, not lost */
    set_fsize(F.pep.pid, RLIM_INFINITY);
    json_t *out = outcome_of(c.request_id);
    assert_non_null(out);
    assert_int_equal(json_integer_value(json_object_get(out, "status")), 200);
    json_decref(out);
    assert_int_equal(call("GET", "/v1/check", BOT_TOKEN, NULL), 200);
}

/* ---- at most once ---------------------------------------------------------------------------- */

/* An upstream that closes a reused connection without answering: a POST (not safe to
 * repeat) reached it once and fails; a PUT is sent again, and both sends are attempts. */
static void test_at_most_once_when_not_safe_to_repeat(void **state) {
    (void)state;
    rawup_reset(RAW);
    assert_int_equal(call("POST", "/v1/refunds", BOT_TOKEN, NULL), 200); /* warms a connection */
    rawup_drop_next(RAW, 1);
    struct h_resp r = {0};
    assert_int_equal(call("POST", "/v1/refunds", BOT_TOKEN, &r), 503);
    assert_string_equal(h_header(&r, "Pep-Attempts"), "1");
    assert_int_equal(rawup_count(RAW), 2); /* the warm-up, and the refund once */
    json_t *out = outcome_of(h_header(&r, "Pep-Request-Id"));
    assert_non_null(out);
    assert_int_equal(json_array_size(json_object_get(out, "attempts")), 1);
    assert_string_equal(json_string_value(json_object_get(
                            json_array_get(json_object_get(out, "attempts"), 0), "error")),
                        "connect_error");
    json_decref(out);
    h_resp_free(&r);

    rawup_reset(RAW);
    assert_int_equal(call("PUT", "/v1/items", BOT_TOKEN, NULL), 200);
    rawup_drop_next(RAW, 1);
    assert_int_equal(call("PUT", "/v1/items", BOT_TOKEN, &r), 200);
    assert_string_equal(h_header(&r, "Pep-Attempts"), "2");
    assert_int_equal(rawup_count(RAW), 3);
    out = outcome_of(h_header(&r, "Pep-Request-Id"));
    assert_non_null(out);
    json_t *attempts = json_object_get(out, "attempts");
    assert_int_equal(json_array_size(attempts), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(attempts, 0), "error")),
                        "connect_error");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(attempts, 1), "status")),
                     200);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- records that say exactly what happened --------------------------------------------- */

static void test_query_recorded_as_its_hash(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(call("GET", "/v1/check?token=s3cret&x=1", BOT_TOKEN, &r), 200);
    json_t *rec = fx_record(&F, h_header(&r, "Pep-Request-Id"), "decision");
    assert_non_null(rec);
    char hex[65];
    hash_hex("token=s3cret&x=1", hex);
    assert_string_equal(json_string_value(json_object_get(rec, "query_sha256")), hex);
    char *text = json_dumps(rec, 0);
    assert_null(strstr(text, "s3cret")); /* the query itself is never recorded */
    free(text);
    json_decref(rec);
    h_resp_free(&r);
}

/* The admin record of an answer (by its request id). */
static json_t *admin_record_of(const struct h_resp *r) {
    return fx_record(&F, h_header(r, "Pep-Request-Id"), "admin");
}

static void test_admin_records_say_what_was_set(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/agents",
                              "{\"id\":\"set-check\",\"owner\":\"o@example.test\","
                              "\"tenants\":[\"acme\"],\"scopes\":[\"tool.read\",\"llm.chat\"]}"),
                     0);
    assert_int_equal(r.status, 201);
    json_t *rec = admin_record_of(&r);
    assert_non_null(rec);
    json_t *set = json_object_get(rec, "set");
    assert_string_equal(json_string_value(json_array_get(json_object_get(set, "tenants"), 0)),
                        "acme");
    assert_int_equal(json_array_size(json_object_get(set, "scopes")), 2);
    assert_true(json_is_true(json_object_get(set, "enabled")));
    assert_string_equal(json_string_value(json_object_get(set, "owner")), "o@example.test");
    json_decref(rec);
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/agents/set-check/tokens",
                              "{\"scopes\":[\"tool.read\"],\"acr\":\"mfa\",\"ttl\":\"1h\"}"),
                     0);
    assert_int_equal(r.status, 201);
    rec = admin_record_of(&r);
    set = json_object_get(rec, "set");
    assert_string_equal(json_string_value(json_array_get(json_object_get(set, "scopes"), 0)),
                        "tool.read");
    assert_string_equal(json_string_value(json_object_get(set, "acr")), "mfa");
    assert_non_null(json_string_value(json_object_get(set, "expires_at")));
    char *text = json_dumps(rec, 0);
    assert_null(strstr(text, "eyJ")); /* never the token */
    free(text);
    json_decref(rec);
    assert_int_equal(fx_admin(&F, &r, "POST", "/admin/v1/agents/set-check/disable", NULL), 0);
    rec = admin_record_of(&r);
    assert_true(json_is_false(json_object_get(json_object_get(rec, "set"), "enabled")));
    json_decref(rec);
    assert_int_equal(
        fx_admin(&F, &r, "POST", "/admin/v1/operators", "{\"id\":\"rev\",\"roles\":[\"auditor\"]}"),
        0);
    rec = admin_record_of(&r);
    assert_string_equal(
        json_string_value(json_array_get(json_object_get(json_object_get(rec, "set"), "roles"), 0)),
        "auditor");
    json_decref(rec);
    h_resp_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_allow_after_revocation_record),
        cmocka_unit_test(test_decisions_agree_with_their_policy),
        cmocka_unit_test(test_outcome_kept_through_a_write_failure),
        cmocka_unit_test(test_at_most_once_when_not_safe_to_repeat),
        cmocka_unit_test(test_query_recorded_as_its_hash),
        cmocka_unit_test(test_admin_records_say_what_was_set),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
