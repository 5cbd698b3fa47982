/*
 * test_admin.c — the admin API's input checks and answer shapes (SPEC 5, 8) against a
 * real pep: bounds that arithmetic must not bypass, lists newest last, identifiers that
 * tokens and canonical records must be able to carry, and error answers that stay JSON
 * whatever bytes a client put in a path.
 *
 * One pep serves the whole group; each test uses its own agents.
 */
#include "tests/integration/fixture.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ttl_cannot_overflow_the_limit),
        cmocka_unit_test(test_lists_are_newest_last),
        cmocka_unit_test(test_identifiers_tokens_can_carry),
        cmocka_unit_test(test_errors_stay_json_for_any_bytes),
        cmocka_unit_test(test_reload_is_audited_as_the_operators),
        cmocka_unit_test(test_reload_keeps_operator_changes), /* last: restarts pep */
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
