/*
 * test_dataplane.c — SPEC 3 end to end: a real pep in front of a real mockllm.
 *
 * One pep serves the whole group (started in the group setup); tests that change an
 * agent use their own agent so that they do not disturb each other.
 */
#include "tests/integration/fixture.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY =
    "version: 1\n"
    "server: { max_body: 4KiB }\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: bot, owner: alice@example.test, tenants: [acme, globex], scopes: [llm.chat, tool.*] "
    "}\n"
    "  - { id: narrow, owner: bob@example.test, tenants: [initech], scopes: [llm.chat] }\n"
    "  - { id: to-disable, owner: carol@example.test, tenants: [acme], scopes: [llm.chat] }\n"
    "  - { id: to-shrink, owner: dan@example.test, tenants: [acme], scopes: [llm.chat, "
    "tool.search] }\n"
    "upstreams:\n"
    "  mock:\n"
    "    base_url: \"@MOCK@\"\n"
    "    api_key_env: IT_UPSTREAM_KEY\n"
    "    headers: { x-extra: { env: IT_EXTRA } }\n"
    "    timeout: 5s\n"
    "  dead: { base_url: \"http://127.0.0.1:1\", timeout: 2s }\n"
    "  slow: { base_url: \"@MOCK@\", timeout: 10s, idle_timeout: 1s }\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: mock }\n"
    "  - match: { method: GET, path: \"/v1/tenants/{tenant}/search\" }\n"
    "    action: tool.search\n"
    "    forward: { upstream: mock, path: /search }\n"
    "  - match: { method: GET, path: \"/v1/tenants/{tenant}/items/{item}\" }\n"
    "    action: tool.search\n"
    "    forward: { upstream: mock, path: \"/store/{tenant}/item/{item}\" }\n"
    "  - match: { method: POST, path: /v1/dead }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: dead }\n"
    "  - match: { method: POST, path: /v1/slow }\n"
    "    action: llm.chat\n"
    "    forward: { upstream: slow, path: /v1/chat/completions }\n"
    "  - match: { method: GET, path: /v1/decide-only }\n"
    "    action: tool.read\n"
    "actions:\n"
    "  llm.chat: { scope: llm.chat }\n"
    "  tool.search: { scope: tool.search }\n"
    "  tool.read: { scope: tool.read }\n";

static struct fx F;
static char *BOT_TOKEN;
static char BOT_JTI[64];
static const char *UPSTREAM_KEY = "sk-upstream-secret-123";

static int group_setup(void **state) {
    (void)state;
    char *env[] = {"IT_UPSTREAM_KEY=sk-upstream-secret-123", "IT_EXTRA=extra-value", NULL};
    if (fx_start(&F, POLICY, env, NULL) != 0) return -1;
    BOT_TOKEN = fx_issue(&F, "bot", NULL, BOT_JTI);
    return BOT_TOKEN ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    free(BOT_TOKEN);
    fx_stop(&F);
    return 0;
}

/* pep's URL for path, in one static buffer: call from the test's own thread only. */
static char *url(const char *path) {
    static char buf[512];
    snprintf(buf, sizeof buf, "%s%s", F.pep.url, path);
    return buf;
}

/* Asserts the SPEC 3.3 error shape and code, and that the answer carries its ids. */
static void assert_error(const struct h_resp *r, long status, const char *code) {
    if (r->status != status) fprintf(stderr, "unexpected answer %ld: %s\n", r->status, r->body);
    assert_int_equal(r->status, status);
    json_t *j = h_json(r);
    assert_non_null(j);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(json_string_value(json_object_get(err, "type")), "pep_error");
    assert_string_equal(json_string_value(json_object_get(err, "code")), code);
    assert_non_null(json_string_value(json_object_get(err, "message")));
    const char *rid = json_string_value(json_object_get(err, "request_id"));
    assert_non_null(rid);
    assert_non_null(h_header(r, "Pep-Request-Id"));
    assert_string_equal(rid, h_header(r, "Pep-Request-Id"));
    json_decref(j);
}

/* The decision record of the answer r, asserted to exist with the given code. */
static json_t *decision_of(const struct h_resp *r, const char *code) {
    json_t *rec = fx_record(&F, h_header(r, "Pep-Request-Id"), "decision");
    assert_non_null(rec);
    assert_string_equal(json_string_value(json_object_get(rec, "code")), code);
    assert_string_equal(json_string_value(json_object_get(rec, "decision")),
                        strcmp(code, "ok") == 0 ? "allow" : "deny");
    const char *seq = h_header(r, "Pep-Audit-Seq");
    assert_non_null(seq);
    assert_int_equal(json_integer_value(json_object_get(rec, "seq")), atoll(seq));
    return rec;
}

static void test_health_ready_jwks(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url("/healthz"), NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    assert_null(h_header(&r, "Pep-Audit-Seq")); /* not audited */
    assert_non_null(h_header(&r, "Pep-Request-Id"));
    assert_int_equal(h_http(&r, "GET", url("/readyz"), NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(h_http(&r, "GET", url("/.well-known/jwks.json"), NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    json_t *j = h_json(&r);
    json_t *key = json_array_get(json_object_get(j, "keys"), 0);
    assert_string_equal(json_string_value(json_object_get(key, "kty")), "EC");
    assert_string_equal(json_string_value(json_object_get(key, "crv")), "P-256");
    assert_string_equal(json_string_value(json_object_get(key, "alg")), "ES256");
    assert_string_equal(json_string_value(json_object_get(key, "use")), "sig");
    assert_non_null(json_string_value(json_object_get(key, "kid")));
    assert_non_null(json_string_value(json_object_get(key, "x")));
    assert_null(json_object_get(key, "d")); /* never the private part */
    json_decref(j);
    h_resp_free(&r);
}

static void test_no_route_is_audited(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url("/no/such/route?x=1"), NULL, NULL), 0);
    assert_error(&r, 404, "no_route");
    json_t *rec = decision_of(&r, "no_route");
    assert_string_equal(json_string_value(json_object_get(rec, "path")), "/no/such/route");
    assert_string_equal(json_string_value(json_object_get(rec, "method")), "GET");
    assert_non_null(json_string_value(json_object_get(rec, "policy_hash")));
    json_decref(rec);
    /* wrong method on a known path is no route either */
    assert_int_equal(h_http(&r, "DELETE", url("/v1/chat/completions"), NULL, NULL), 0);
    assert_error(&r, 404, "no_route");
    h_resp_free(&r);
}

/* Sends raw bytes and returns the status of the answer (0 if none). */
static int raw_status(const char *raw, char **reply_out) {
    char *reply = NULL;
    if (h_raw_request(F.pep.url, raw, &reply) != 0) return -1;
    int status = 0;
    sscanf(reply, "HTTP/1.1 %d", &status);
    if (reply_out)
        *reply_out = reply;
    else
        free(reply);
    return status;
}

static void test_non_normalized_paths_refused(void **state) {
    (void)state;
    static const char *const paths[] = {
        "/v1/../v1/chat/completions",  "/v1/./chat/completions", "/v1//chat/completions",
        "/v1/%2e%2e/chat/completions", "/v1/chat%2fcompletions", "/v1/chat/completions%00",
        "/v1/%2E/chat/completions",    "/v1/chat/completions/.",
    };
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        char raw[4096], *reply = NULL;
        int n = snprintf(raw, sizeof raw,
                         "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         "Content-Length: 2\r\nConnection: close\r\n\r\n{}",
                         paths[i], BOT_TOKEN);
        assert_true(n > 0 && (size_t)n < sizeof raw);
        int status = raw_status(raw, &reply);
        if (status != 400) fprintf(stderr, "path %s answered %d\n", paths[i], status);
        assert_int_equal(status, 400);
        assert_non_null(strstr(reply, "\"bad_request\""));
        assert_non_null(strcasestr(reply, "Pep-Audit-Seq:"));
        free(reply);
    }
}

static void test_ambiguous_framing_refused(void **state) {
    (void)state;
    static const char *const raws[] = {
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        "Content-Length: 3\r\nConnection: close\r\n\r\n{}",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
        "Connection: close\r\n\r\n",
        /* which credential would be checked, which one honoured? */
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n"
        "Authorization: Bearer d.e.f\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    };
    json_t *before = h_mock_stats(F.mock.url);
    json_int_t hits = json_integer_value(json_object_get(before, "hits"));
    json_decref(before);
    for (size_t i = 0; i < sizeof raws / sizeof *raws; i++) {
        char *reply = NULL;
        assert_int_equal(raw_status(raws[i], &reply), 400);
        assert_non_null(strstr(reply, "ambiguous ") ? reply : strstr(reply, "Transfer-Encoding"));
        free(reply);
    }
    json_t *after = h_mock_stats(F.mock.url);
    assert_int_equal(json_integer_value(json_object_get(after, "hits")), hits);
    json_decref(after);
}

/* RFC 9112 5.1: whitespace before the colon is refused, never trimmed: "Authorization :"
 * would otherwise pass every exact-name filter and reach the upstream. */
static void test_malformed_header_names_refused(void **state) {
    (void)state;
    static const char *const names[] = {"Authorization ", "Cookie\t", "Content-Length ",
                                        "X-Re(quest)"};
    json_t *before = h_mock_stats(F.mock.url);
    json_int_t hits = json_integer_value(json_object_get(before, "hits"));
    json_decref(before);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char raw[4096], *reply = NULL;
        int n = snprintf(raw, sizeof raw,
                         "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         "Authorization: Bearer %s\r\n%s: 2\r\nContent-Length: 2\r\n"
                         "Connection: close\r\n\r\n{}",
                         BOT_TOKEN, names[i]);
        assert_true(n > 0 && (size_t)n < sizeof raw);
        int status = raw_status(raw, &reply);
        if (status != 400) fail_msg("header name '%s' answered %d", names[i], status);
        assert_non_null(strstr(reply, "field name must be a token"));
        free(reply);
    }
    /* a built-in endpoint is no exception: the connection is what is at stake */
    char *reply = NULL;
    assert_int_equal(raw_status("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                "0\r\n\r\n",
                                &reply),
                     400);
    free(reply);
    json_t *after = h_mock_stats(F.mock.url);
    assert_int_equal(json_integer_value(json_object_get(after, "hits")), hits);
    json_decref(after);
}

/* A raw '#' would cut the query libcurl sends; control bytes cannot be relayed. */
static void test_query_characters_refused(void **state) {
    (void)state;
    static const char *const queries[] = {"q=a#b", "q=a\x01", "q=\x7f"};
    for (size_t i = 0; i < sizeof queries / sizeof *queries; i++) {
        char raw[4096], *reply = NULL;
        int n = snprintf(raw, sizeof raw,
                         "GET /v1/tenants/acme/search?%s HTTP/1.1\r\nHost: x\r\n"
                         "Authorization: Bearer %s\r\nConnection: close\r\n\r\n",
                         queries[i], BOT_TOKEN);
        assert_true(n > 0 && (size_t)n < sizeof raw);
        assert_int_equal(raw_status(raw, &reply), 400);
        assert_non_null(strstr(reply, "percent-encoded"));
        free(reply);
    }
}

static void test_body_too_large(void **state) {
    (void)state;
    char *big = malloc(8192);
    memset(big, 'a', 8191);
    big[8191] = '\0';
    char auth[2100];
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), big,
                            fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL),
                     0);
    assert_error(&r, 413, "body_too_large");
    json_decref(decision_of(&r, "body_too_large"));
    /* the same without a Content-Length: a chunked upload counted as it arrives */
    char raw[16384];
    int n =
        snprintf(raw, sizeof raw,
                 "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n1fff\r\n%s\r\n0\r\n\r\n",
                 BOT_TOKEN, big);
    assert_true(n > 0 && n < (int)sizeof raw);
    char *reply = NULL;
    assert_int_equal(raw_status(raw, &reply), 413);
    free(reply);
    free(big);
    h_resp_free(&r);
}

static void test_allowed_call_is_forwarded_and_audited(void **state) {
    (void)state;
    char auth[2100];
    struct h_resp r = {0};
    const char *body =
        "{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions?trace=1"), body,
                            fx_bearer(auth, sizeof auth, BOT_TOKEN), "Cookie: session=agent-cookie",
                            "Pep-Debug: 1", "X-Agent-Header: kept",
                            "X-EXTRA: agent-chosen" /* pep sets x-extra: not the agent */, NULL),
                     0);
    assert_int_equal(r.status, 200);
    assert_string_equal(h_header(&r, "Pep-Upstream"), "mock");
    assert_string_equal(h_header(&r, "Pep-Model"), "gpt-test");
    assert_string_equal(h_header(&r, "Pep-Attempts"), "1");
    json_t *answer = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(answer, "model")), "gpt-test");
    json_decref(answer);

    /* what the upstream saw: pep's upstream key, none of the agent's credentials */
    json_t *stats = h_mock_stats(F.mock.url);
    json_t *last = json_object_get(stats, "last");
    json_t *hdrs = json_object_get(last, "headers");
    char want[128];
    snprintf(want, sizeof want, "Bearer %s", UPSTREAM_KEY);
    assert_string_equal(json_string_value(json_object_get(hdrs, "authorization")), want);
    assert_null(json_object_get(hdrs, "cookie"));
    assert_null(json_object_get(hdrs, "pep-debug"));
    assert_string_equal(json_string_value(json_object_get(hdrs, "x-agent-header")), "kept");
    assert_string_equal(json_string_value(json_object_get(hdrs, "x-extra")), "extra-value");
    assert_string_equal(json_string_value(json_object_get(hdrs, "x-request-id")),
                        h_header(&r, "Pep-Request-Id"));
    assert_string_equal(json_string_value(json_object_get(last, "path")),
                        "/v1/chat/completions?trace=1");
    assert_string_equal(json_string_value(json_object_get(last, "body")), body);
    json_decref(stats);

    json_t *rec = decision_of(&r, "ok");
    assert_string_equal(json_string_value(json_object_get(rec, "agent")), "bot");
    assert_string_equal(json_string_value(json_object_get(rec, "tenant")), "acme");
    assert_string_equal(json_string_value(json_object_get(rec, "action")), "llm.chat");
    json_decref(rec);
    /* the outcome record is written after the answer: wait for it, bounded */
    json_t *out = NULL;
    for (int i = 0; i < 200 && !out; i++) {
        out = fx_record(&F, h_header(&r, "Pep-Request-Id"), "outcome");
        if (!out) usleep(10000);
    }
    assert_non_null(out);
    assert_string_equal(json_string_value(json_object_get(out, "code")), "ok");
    assert_int_equal(json_integer_value(json_object_get(out, "status")), 200);
    assert_string_equal(json_string_value(json_object_get(out, "upstream")), "mock");
    json_t *attempt = json_array_get(json_object_get(out, "attempts"), 0);
    assert_int_equal(json_integer_value(json_object_get(attempt, "status")), 200);
    assert_string_equal(json_string_value(json_object_get(attempt, "model")), "gpt-test");
    json_decref(out);

    /* neither the agent token nor the upstream key is anywhere in the store */
    char path[400];
    const char *files[] = {"pep.db", "pep.db-wal"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", F.data, files[i]);
        int has_token = h_file_contains(path, BOT_TOKEN, strlen(BOT_TOKEN));
        int has_sig =
            h_file_contains(path, strrchr(BOT_TOKEN, '.') + 1, strlen(strrchr(BOT_TOKEN, '.') + 1));
        assert_true(has_token == 0 || (has_token == -1 && i == 1));
        assert_true(has_sig == 0 || (has_sig == -1 && i == 1));
        assert_true(h_file_contains(path, UPSTREAM_KEY, strlen(UPSTREAM_KEY)) != 1);
    }
    h_resp_free(&r);
}

static void test_tenant_from_path(void **state) {
    (void)state;
    char auth[2100];
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url("/v1/tenants/globex/search?q=x"), NULL,
                            fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL),
                     0);
    assert_int_equal(r.status, 200);
    json_t *echo = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(echo, "path")), "/search?q=x");
    json_decref(echo);
    json_t *rec = decision_of(&r, "ok");
    assert_string_equal(json_string_value(json_object_get(rec, "tenant")), "globex");
    json_decref(rec);

    /* forward.path parameters take the matched values, encoded again: a decoded '?' or
     * '/' cannot change the upstream URL */
    assert_int_equal(
        h_http(&r, "GET", url("/v1/tenants/acme/items/a%3Fb%20c?v=1"), NULL, auth, NULL), 0);
    assert_int_equal(r.status, 200);
    echo = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(echo, "path")),
                        "/store/acme/item/a%3Fb%20c?v=1");
    json_decref(echo);

    assert_int_equal(h_http(&r, "GET", url("/v1/tenants/initech/search"), NULL, auth, NULL), 0);
    assert_error(&r, 403, "tenant_mismatch");
    json_decref(decision_of(&r, "tenant_mismatch"));
    h_resp_free(&r);
}

static void test_insufficient_scope(void **state) {
    (void)state;
    /* a token narrowed at issue time */
    char *tok = fx_issue(&F, "bot", "{\"scopes\":[\"tool.search\"]}", NULL);
    assert_non_null(tok);
    char auth[2100];
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}",
                            fx_bearer(auth, sizeof auth, tok), NULL),
                     0);
    assert_error(&r, 403, "insufficient_scope");
    json_decref(decision_of(&r, "insufficient_scope"));
    /* the agent's own scopes: tool.* grants tool.search but not tool.read */
    assert_int_equal(h_http(&r, "GET", url("/v1/decide-only"), NULL,
                            fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL),
                     0);
    assert_int_equal(r.status, 200); /* tool.* grants tool.read: route without forward */
    json_t *j = h_json(&r);
    assert_string_equal(json_string_value(json_object_get(j, "decision")), "allow");
    json_decref(j);
    /* a scope the agent does not hold cannot be put in a token */
    struct h_resp a = {0};
    assert_int_equal(fx_admin(&F, &a, "POST", "/admin/v1/agents/narrow/tokens",
                              "{\"scopes\":[\"tool.search\"]}"),
                     0);
    assert_int_equal(a.status, 400);
    h_resp_free(&a);
    free(tok);
    h_resp_free(&r);
}

static void test_missing_and_garbage_tokens(void **state) {
    (void)state;
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", NULL), 0);
    assert_error(&r, 401, "invalid_token");
    assert_non_null(h_header(&r, "WWW-Authenticate"));
    assert_non_null(strstr(h_header(&r, "WWW-Authenticate"), "error=\"invalid_token\""));
    json_decref(decision_of(&r, "invalid_token"));
    assert_int_equal(
        h_http(&r, "POST", url("/v1/chat/completions"), "{}", "Authorization: Bearer a.b.c", NULL),
        0);
    assert_error(&r, 401, "invalid_token");
    /* the operator's token is not an agent token */
    char auth[2100];
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}",
                            fx_bearer(auth, sizeof auth, F.admin_token), NULL),
                     0);
    assert_error(&r, 401, "invalid_token");
    /* and an agent token is not an operator token */
    char admin_url[512];
    snprintf(admin_url, sizeof admin_url, "%s/admin/v1/agents", F.pep.admin_url);
    assert_int_equal(
        h_http(&r, "GET", admin_url, NULL, fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL), 0);
    assert_error(&r, 401, "invalid_token");
    h_resp_free(&r);
}

static void test_revocation_takes_effect_before_the_call_returns(void **state) {
    (void)state;
    char jti[64], auth[2100], path[128];
    char *tok = fx_issue(&F, "bot", "{\"ttl\":\"1h\"}", jti);
    assert_non_null(tok);
    fx_bearer(auth, sizeof auth, tok);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_int_equal(r.status, 200);
    snprintf(path, sizeof path, "/admin/v1/tokens/%s", jti);
    struct h_resp a = {0};
    assert_int_equal(fx_admin(&F, &a, "DELETE", path, NULL), 0);
    assert_int_equal(a.status, 200);
    assert_non_null(h_header(&a, "Pep-Audit-Seq"));
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 401, "invalid_token");
    assert_non_null(strstr(r.body, "revoked"));
    /* the listing shows it revoked, and never the token itself */
    assert_int_equal(fx_admin(&F, &a, "GET", "/admin/v1/tokens?agent=bot", NULL), 0);
    assert_int_equal(a.status, 200);
    assert_null(strstr(a.body, tok));
    assert_non_null(strstr(a.body, jti));
    h_resp_free(&a);
    h_resp_free(&r);
    free(tok);
}

static void test_disable_and_shrink_agent(void **state) {
    (void)state;
    char auth[2100];
    char *tok = fx_issue(&F, "to-disable", NULL, NULL);
    fx_bearer(auth, sizeof auth, tok);
    struct h_resp r = {0}, a = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(fx_admin(&F, &a, "POST", "/admin/v1/agents/to-disable/disable", NULL), 0);
    assert_int_equal(a.status, 200);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 401, "invalid_token");
    assert_int_equal(fx_admin(&F, &a, "POST", "/admin/v1/agents/to-disable/enable", NULL), 0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_int_equal(r.status, 200);
    free(tok);

    /* a scope removed from the agent is gone from its existing tokens at once */
    tok = fx_issue(&F, "to-shrink", NULL, NULL);
    fx_bearer(auth, sizeof auth, tok);
    assert_int_equal(h_http(&r, "GET", url("/v1/tenants/acme/search"), NULL, auth, NULL), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(fx_admin(&F, &a, "POST", "/admin/v1/agents",
                              "{\"id\":\"to-shrink\",\"owner\":\"dan@example.test\","
                              "\"tenants\":[\"acme\"],\"scopes\":[\"llm.chat\"]}"),
                     0);
    assert_int_equal(a.status, 200);
    assert_int_equal(h_http(&r, "GET", url("/v1/tenants/acme/search"), NULL, auth, NULL), 0);
    assert_error(&r, 403, "insufficient_scope");
    free(tok);
    h_resp_free(&a);
    h_resp_free(&r);
}

static void test_upstream_failures(void **state) {
    (void)state;
    char auth[2100];
    fx_bearer(auth, sizeof auth, BOT_TOKEN);
    struct h_resp r = {0};
    /* a retryable status ends the one-step chain: 503 with the upstream's status */
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1}"),
                     0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 503, "upstream_unavailable");
    json_t *j = h_json(&r);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(j, "error"), "upstream_status")), 503);
    assert_null(h_header(&r, "Retry-After"));
    json_decref(j);
    /* the upstream's Retry-After (seconds) is passed on: SPEC 3.5 "on 503 when known" */
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"status\",\"status\":429,"
                                              "\"count\":1,\"retry_after\":\"7\"}"),
                     0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 503, "upstream_unavailable");
    assert_string_equal(h_header(&r, "Retry-After"), "7");
    /* the upstream refusing pep's credentials is an operator problem: 502 */
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"status\",\"status\":401,\"count\":1}"),
                     0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 502, "upstream_auth_failed");
    /* a non-retryable status is relayed as the upstream sent it */
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"context_overflow\",\"count\":1}"), 0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "context_length_exceeded"));
    assert_string_equal(h_header(&r, "Pep-Attempts"), "1");
    /* a dropped connection and a refused one are connect errors.  The dropped one was on a
     * reused connection: libcurl would send the request again on a fresh one, but a POST
     * is not safe to repeat (SPEC 4.2): it reached the upstream once, and one attempt. */
    json_t *stats = h_mock_stats(F.mock.url);
    json_int_t hits = json_integer_value(json_object_get(stats, "hits"));
    json_decref(stats);
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"drop\",\"count\":1}"), 0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 503, "upstream_unavailable");
    assert_string_equal(h_header(&r, "Pep-Attempts"), "1");
    stats = h_mock_stats(F.mock.url);
    assert_int_equal(json_integer_value(json_object_get(stats, "hits")), hits + 1);
    json_decref(stats);
    assert_int_equal(h_http(&r, "POST", url("/v1/dead"), "{}", auth, NULL), 0);
    assert_error(&r, 503, "upstream_unavailable");
    json_t *out = NULL;
    for (int i = 0; i < 200 && !out; i++) {
        out = fx_record(&F, h_header(&r, "Pep-Request-Id"), "outcome");
        if (!out) usleep(10000);
    }
    assert_non_null(out);
    json_t *attempt = json_array_get(json_object_get(out, "attempts"), 0);
    assert_string_equal(json_string_value(json_object_get(attempt, "error")), "connect_error");
    assert_true(json_is_null(json_object_get(attempt, "model")));
    assert_string_equal(json_string_value(json_object_get(out, "code")), "upstream_unavailable");
    assert_null(json_object_get(out, "fallback_step")); /* no step served it */
    json_decref(out);
    h_resp_free(&r);
}

/* Only what the agent sent reaches the upstream: no Accept or form Content-Type that
 * libcurl would add by default. */
static void test_no_headers_added_upstream(void **state) {
    (void)state;
    char raw[4096], *reply = NULL;
    int n = snprintf(raw, sizeof raw,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     "Authorization: Bearer %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                     BOT_TOKEN);
    assert_true(n > 0 && (size_t)n < sizeof raw);
    assert_int_equal(raw_status(raw, &reply), 200);
    free(reply);
    json_t *stats = h_mock_stats(F.mock.url);
    json_t *hdrs = json_object_get(json_object_get(stats, "last"), "headers");
    assert_non_null(hdrs);
    assert_null(json_object_get(hdrs, "accept"));
    assert_null(json_object_get(hdrs, "content-type"));
    json_decref(stats);
}

/* The outcome of a call that was made is audited even when its client is gone before the
 * answer: the forwarder writes it, not the (closed) connection. */
static void test_outcome_audited_when_client_leaves(void **state) {
    (void)state;
    char auth[2100];
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"delay\",\"delay_ms\":600,\"count\":1}"),
                     0);
    const char *headers[] = {fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL};
    struct h_resp r = {0};
    struct h_req req = {.url = url("/v1/chat/completions"),
                        .body = "{\"model\":\"m-left\"}",
                        .headers = headers,
                        .timeout_ms = 150};
    assert_int_not_equal(h_request(&r, &req), 0); /* the client gave up */
    h_resp_free(&r);
    /* the upstream got the call: its X-Request-Id is the request's id */
    char id[64] = "";
    for (int i = 0; i < 300 && !id[0]; i++) {
        json_t *stats = h_mock_stats(F.mock.url);
        json_t *last = json_object_get(stats, "last");
        const char *body = json_string_value(json_object_get(last, "body"));
        if (body && strstr(body, "m-left"))
            snprintf(id, sizeof id, "%s",
                     json_string_value(
                         json_object_get(json_object_get(last, "headers"), "x-request-id")));
        json_decref(stats);
        if (!id[0]) usleep(10000);
    }
    assert_true(id[0] != '\0');
    json_t *out = NULL;
    for (int i = 0; i < 500 && !out; i++) {
        out = fx_record(&F, id, "outcome");
        if (!out) usleep(10000);
    }
    assert_non_null(out);
    assert_string_equal(json_string_value(json_object_get(out, "code")), "ok");
    json_decref(out);
}

/* idle_timeout is silence from the upstream, also while a request body was sent (libcurl's
 * low-speed limit counted the upload and missed it). */
static void test_idle_timeout_with_a_body(void **state) {
    (void)state;
    char auth[2100];
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"delay\",\"delay_ms\":4000,\"count\":1}"),
                     0);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url("/v1/slow"), "{\"model\":\"m\"}",
                            fx_bearer(auth, sizeof auth, BOT_TOKEN), NULL),
                     0);
    assert_error(&r, 503, "upstream_unavailable");
    assert_non_null(strstr(r.body, "idle_timeout"));
    json_t *out = NULL;
    for (int i = 0; i < 500 && !out; i++) {
        out = fx_record(&F, h_header(&r, "Pep-Request-Id"), "outcome");
        if (!out) usleep(10000);
    }
    assert_non_null(out);
    json_t *attempt = json_array_get(json_object_get(out, "attempts"), 0);
    assert_string_equal(json_string_value(json_object_get(attempt, "error")), "idle_timeout");
    json_decref(out);
    h_resp_free(&r);
}

static void test_upstream_timeout(void **state) {
    (void)state;
    char auth[2100];
    fx_bearer(auth, sizeof auth, BOT_TOKEN);
    struct h_resp r = {0};
    assert_int_equal(h_mock_fault(F.mock.url, "{\"kind\":\"hang\",\"count\":1}"), 0);
    assert_int_equal(h_http(&r, "POST", url("/v1/chat/completions"), "{}", auth, NULL), 0);
    assert_error(&r, 503, "upstream_unavailable");
    assert_non_null(strstr(r.body, "timeout"));
    h_resp_free(&r);
}

struct call {
    const char *url; /* built once by the test: url() reuses one static buffer */
    char auth[2100];
    long status;
    int curl_code; /* kept so a failed call says why it failed */
};

static void *one_call(void *arg) {
    struct call *c = arg;
    struct h_resp r = {0};
    h_http(&r, "POST", c->url, "{}", c->auth, NULL);
    c->status = r.status;
    c->curl_code = r.curl_code;
    h_resp_free(&r);
    return NULL;
}

static void test_listener_is_not_blocked_by_slow_upstream(void **state) {
    (void)state;
    enum { N = 100 };
    assert_int_equal(
        h_mock_fault(F.mock.url, "{\"kind\":\"delay\",\"delay_ms\":200,\"count\":100}"), 0);
    static struct call calls[N];
    pthread_t threads[N];
    char chat_url[512];
    snprintf(chat_url, sizeof chat_url, "%s", url("/v1/chat/completions"));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < N; i++) {
        calls[i].url = chat_url;
        fx_bearer(calls[i].auth, sizeof calls[i].auth, BOT_TOKEN);
        assert_int_equal(pthread_create(&threads[i], NULL, one_call, &calls[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(threads[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    for (int i = 0; i < N; i++) {
        if (calls[i].status != 200)
            fprintf(stderr, "call %d: status %ld, curl: %s\n", i, calls[i].status,
                    curl_easy_strerror((CURLcode)calls[i].curl_code));
        assert_int_equal(calls[i].status, 200);
    }
    /* Serialized, 100 × 200 ms would take 20 s; concurrent, about 0.2 s plus overhead.
     * The bound is loose on purpose: it only proves the calls overlapped. */
    fprintf(stderr, "100 calls with 200 ms upstream delay took %.2f s\n", secs);
    assert_true(secs < 10.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_health_ready_jwks),
        cmocka_unit_test(test_no_route_is_audited),
        cmocka_unit_test(test_non_normalized_paths_refused),
        cmocka_unit_test(test_ambiguous_framing_refused),
        cmocka_unit_test(test_malformed_header_names_refused),
        cmocka_unit_test(test_query_characters_refused),
        cmocka_unit_test(test_body_too_large),
        cmocka_unit_test(test_allowed_call_is_forwarded_and_audited),
        cmocka_unit_test(test_tenant_from_path),
        cmocka_unit_test(test_insufficient_scope),
        cmocka_unit_test(test_missing_and_garbage_tokens),
        cmocka_unit_test(test_revocation_takes_effect_before_the_call_returns),
        cmocka_unit_test(test_disable_and_shrink_agent),
        cmocka_unit_test(test_upstream_failures),
        cmocka_unit_test(test_no_headers_added_upstream),
        cmocka_unit_test(test_outcome_audited_when_client_leaves),
        cmocka_unit_test(test_idle_timeout_with_a_body),
        cmocka_unit_test(test_upstream_timeout),
        cmocka_unit_test(test_listener_is_not_blocked_by_slow_upstream),
    };
    return cmocka_run_group_tests_name("dataplane", tests, group_setup, group_teardown);
}
