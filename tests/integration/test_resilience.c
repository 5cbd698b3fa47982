/*
 * test_resilience.c — SPEC 4 end to end (issue 15): retry, fallback, context overflow,
 * Retry-After, deadline, breakers, escalation, streaming, /metrics and the chain
 * indicators, against a real `pep serve` in front of two real mockllm instances whose
 * faults are scripted per test.
 *
 * Layout.  mockllm 1 (@MOCK@, the fixture's) serves every chain's first steps, mockllm 2
 * (@MOCK2@) the fallback steps and the escalation webhooks.  Every test has its own route
 * path (/tN/chat/completions, forwarded as is), its own chain and its own upstreams, so
 * breakers, metrics series and indicators never mix, and every fault is scripted with a
 * `path` filter on that test's path: mockllm's per-path hit counts are then exactly that
 * test's traffic, whatever order the tests run in.
 *
 * Timing: only lower bounds that cannot flake (a wait pep must have made), comparisons of
 * one measurement with another that must contain it (the first streamed byte against the
 * whole stream; pep's head latency against the client's first byte), and bounded polling
 * loops for what happens after the answer (outcome records, webhooks, transitions).
 */
#include "tests/integration/fixture.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY =
    "version: 1\n"
    "audit: { durability: full }\n"
    "agents:\n"
    "  - { id: bot, owner: o@example.test, tenants: [acme], scopes: [llm.chat] }\n"
    "upstreams:\n"
    "  u1: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u2a: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u2b: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u3a: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u3b: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u4a: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u4b: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u4big: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u5a: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u5b: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u6: { base_url: \"@MOCK@\", timeout: 20s }\n"
    "  u7sick:\n"
    "    base_url: \"@MOCK@\"\n"
    "    timeout: 10s\n"
    "    breaker: { failure_threshold: 2, window: 30s, open_for: 1s, half_open_probes: 1,\n"
    "               success_threshold: 2 }\n"
    "  u7ok: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u8a: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u8b: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u8c:\n"
    "    base_url: \"@MOCK@\"\n"
    "    timeout: 10s\n"
    "    breaker: { failure_threshold: 1, window: 30s, open_for: 30s }\n"
    "  u8d: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u8e: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u9: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "  u9b: { base_url: \"@MOCK@\", timeout: 10s, idle_timeout: 300ms }\n"
    "  u10a:\n"
    "    base_url: \"@MOCK@\"\n"
    "    timeout: 10s\n"
    "    breaker: { failure_threshold: 1000, min_requests: 1000 }\n"
    "  u10b: { base_url: \"@MOCK2@\", timeout: 10s }\n"
    "  u11: { base_url: \"@MOCK@\", timeout: 10s }\n"
    "chains:\n"
    "  c1:\n"
    "    retry: { on: [503], max_attempts: 3, base: 100ms, max: 1s, jitter: none }\n"
    "    steps: [ { upstream: u1, model: m1 } ]\n"
    "  c2:\n"
    "    retry: { on: [503], max_attempts: 2, base: 50ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u2a, model: m-primary }\n"
    "      - { upstream: u2b, model: m-backup }\n"
    "  c3:\n"
    "    retry: { on: [500, 503], max_attempts: 2, base: 50ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u3a, model: m3a }\n"
    "      - { upstream: u3b, model: m3b }\n"
    "  c4:\n"
    "    retry: { on: [400, 503], max_attempts: 3, base: 50ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u4a, model: small }\n"
    "      - { upstream: u4b, model: other }\n"
    "    context_overflow:\n"
    "      match: { status: 400, body_contains: [context_length_exceeded, \"prompt is too "
    "long\"] }\n"
    "      step: { upstream: u4big, model: big-128k }\n"
    "  c5:\n"
    "    retry: { on: [429, 503], max_attempts: 3, base: 50ms, max: 2s, jitter: none,\n"
    "             respect_retry_after: true }\n"
    "    steps:\n"
    "      - { upstream: u5a, model: m5a }\n"
    "      - { upstream: u5b, model: m5b }\n"
    "  c6:\n"
    "    retry: { on: [503, timeout], max_attempts: 3, base: 1s, max: 1s, jitter: none }\n"
    "    steps: [ { upstream: u6, model: m6 } ]\n"
    "    deadline: 1s\n"
    "  c7:\n"
    "    retry: { on: [503], max_attempts: 1 }\n"
    "    steps:\n"
    "      - { upstream: u7sick, model: s }\n"
    "      - { upstream: u7ok, model: b }\n"
    "  c8:\n"
    "    retry: { on: [503], max_attempts: 2, base: 50ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u8a, model: a }\n"
    "      - { upstream: u8b, model: b }\n"
    "    escalate: { webhook: \"@MOCK2@/hooks/esc8\" }\n"
    "  c8b:\n"
    "    retry: { on: [503], max_attempts: 1 }\n"
    "    steps: [ { upstream: u8c, model: c } ]\n"
    "    escalate: { webhook: \"@MOCK2@/hooks/esc8b\" }\n"
    "  c8c:\n"
    "    retry: { on: [503], max_attempts: 2, base: 50ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u8d, model: d }\n"
    "      - { upstream: u8e, model: e }\n"
    "    escalate: { webhook: \"@MOCK2@/hooks/esc8c\", after_attempts: 2 }\n"
    "  c9:\n"
    "    retry: { on: [503], max_attempts: 2, base: 20ms, max: 1s, jitter: none }\n"
    "    steps: [ { upstream: u9, model: m9 } ]\n"
    "  c9b:\n"
    "    steps: [ { upstream: u9b, model: m9b } ]\n"
    "  c10:\n"
    "    retry: { on: [503], max_attempts: 2, base: 20ms, max: 1s, jitter: none }\n"
    "    steps:\n"
    "      - { upstream: u10a, model: a }\n"
    "      - { upstream: u10b, model: b }\n"
    "    escalate: { webhook: \"@MOCK2@/hooks/esc10\" }\n"
    "  c11:\n"
    "    retry: { on: [503], max_attempts: 2, base: 20ms, max: 1s, jitter: none }\n"
    "    steps: [ { upstream: u11, model: m11 } ]\n"
    "    objectives: { retry_success_rate: 0.9, fallback_activation_rate: 0.5,\n"
    "                  escalation_rate: 0.1, mean_latency: 5s }\n"
    "routes:\n"
    "  - { match: { method: POST, path: /t1/chat/completions }, action: llm.t1,\n"
    "      forward: { chain: c1, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t2/chat/completions }, action: llm.t2,\n"
    "      forward: { chain: c2, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t2n/chat/completions }, action: llm.t2,\n"
    "      forward: { chain: c2 } }\n"
    "  - { match: { method: POST, path: /t3/chat/completions }, action: llm.t3,\n"
    "      forward: { chain: c3, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t4/chat/completions }, action: llm.t4,\n"
    "      forward: { chain: c4, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t4n/chat/completions }, action: llm.t4,\n"
    "      forward: { chain: c4 } }\n"
    "  - { match: { method: POST, path: /t5/chat/completions }, action: llm.t5,\n"
    "      forward: { chain: c5, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t6/chat/completions }, action: llm.t6,\n"
    "      forward: { chain: c6, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t7/chat/completions }, action: llm.t7,\n"
    "      forward: { chain: c7, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t8/chat/completions }, action: llm.t8,\n"
    "      forward: { chain: c8, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t8b/chat/completions }, action: llm.t8,\n"
    "      forward: { chain: c8b, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t8c/chat/completions }, action: llm.t8,\n"
    "      forward: { chain: c8c, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t9/chat/completions }, action: llm.t9,\n"
    "      forward: { chain: c9, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t9b/chat/completions }, action: llm.t9,\n"
    "      forward: { chain: c9b, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t10/chat/completions }, action: llm.t10,\n"
    "      forward: { chain: c10, retry_safe: true } }\n"
    "  - { match: { method: POST, path: /t11/chat/completions }, action: llm.t11,\n"
    "      forward: { chain: c11, retry_safe: true } }\n"
    "actions:\n"
    "  llm.t1: { scope: llm.chat }\n"
    "  llm.t2: { scope: llm.chat }\n"
    "  llm.t3: { scope: llm.chat }\n"
    "  llm.t4: { scope: llm.chat }\n"
    "  llm.t5: { scope: llm.chat }\n"
    "  llm.t6: { scope: llm.chat }\n"
    "  llm.t7: { scope: llm.chat }\n"
    "  llm.t8: { scope: llm.chat }\n"
    "  llm.t9: { scope: llm.chat }\n"
    "  llm.t10: { scope: llm.chat }\n"
    "  llm.t11: { scope: llm.chat }\n";

static const char *CHAT = "{\"model\":\"agent-model\",\"messages\":[{\"role\":\"user\","
                          "\"content\":\"hi\"}]}";
static const char *CHAT_STREAM = "{\"model\":\"agent-model\",\"stream\":true,\"messages\":[{"
                                 "\"role\":\"user\",\"content\":\"hi\"}]}";

static struct fx F;
static struct h_proc MOCK2;
static char *BOT_TOKEN;
static char BOT_AUTH[2100];

/* ---- small helpers ---------------------------------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
    usleep((useconds_t)ms * 1000);
}

static const char *jstr(const json_t *obj, const char *key) {
    const char *s = json_string_value(json_object_get(obj, key));
    return s ? s : "";
}

/* Queues a mockllm fault, printf-style. */
static void fault(const char *mock_url, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fault(const char *mock_url, const char *fmt, ...) {
    char json[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(json, sizeof json, fmt, ap);
    va_end(ap);
    assert_int_equal(h_mock_fault(mock_url, json), 0);
}

/* POSTs body to pep's data plane at path as agent bot, with one optional extra header.
 * Returns the status; *ms (may be NULL) gets the call's wall time. */
static long post(const char *path, const char *body, const char *extra, long timeout_ms,
                 struct h_resp *r, int64_t *ms) {
    char url[512];
    snprintf(url, sizeof url, "%s%s", F.pep.url, path);
    const char *headers[] = {BOT_AUTH, extra, NULL};
    struct h_req req = {
        .method = "POST", .url = url, .body = body, .headers = headers, .timeout_ms = timeout_ms};
    int64_t t0 = now_ms();
    int rc = h_request(r, &req);
    if (ms) *ms = now_ms() - t0;
    if (rc != 0) fprintf(stderr, "POST %s: curl %d\n", path, rc);
    return r->status;
}

/* The outcome record of request_id, waited for (it may be written after the answer). */
static json_t *outcome_of(const char *request_id) {
    json_t *rec = NULL;
    for (int i = 0; i < 100 && !rec; i++) {
        rec = fx_record(&F, request_id, "outcome");
        if (!rec) sleep_ms(50);
    }
    if (!rec) fprintf(stderr, "no outcome record for %s\n", request_id);
    return rec;
}

/* The request id of an answer, copied. */
static void request_id_of(const struct h_resp *r, char out[64]) {
    const char *id = h_header(r, "Pep-Request-Id");
    assert_non_null(id);
    snprintf(out, 64, "%s", id);
}

/* How many requests mockllm at mock_url received on path (0 if none). */
static long mock_hits(const char *mock_url, const char *path) {
    json_t *s = h_mock_stats(mock_url);
    assert_non_null(s);
    long n = (long)json_integer_value(json_object_get(json_object_get(s, "by_path"), path));
    json_decref(s);
    return n;
}

/* The requests mockllm at mock_url remembers whose path is path, oldest first (new
 * reference). */
static json_t *mock_requests(const char *mock_url, const char *path) {
    char url[256];
    snprintf(url, sizeof url, "%s/_mock/requests", mock_url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url, NULL, NULL), 0);
    json_t *all = h_json(&r);
    h_resp_free(&r);
    assert_non_null(all);
    json_t *out = json_array(), *item;
    size_t i;
    json_array_foreach(json_object_get(all, "requests"), i, item) {
        if (strcmp(jstr(item, "path"), path) == 0) json_array_append(out, item);
    }
    json_decref(all);
    return out;
}

/* The "model" of the JSON body of one of mock_requests' records, copied into out. */
static void model_sent(const json_t *rec, char out[64]) {
    json_t *body = json_loads(jstr(rec, "body"), 0, NULL);
    snprintf(out, 64, "%s", jstr(body, "model"));
    json_decref(body);
}

/* An admin GET answered 200, as JSON (new reference). */
static json_t *admin_get(const char *path) {
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&F, &r, "GET", path, NULL), 0);
    if (r.status != 200) fprintf(stderr, "GET %s: %ld %s\n", path, r.status, r.body);
    assert_int_equal(r.status, 200);
    json_t *j = h_json(&r);
    h_resp_free(&r);
    assert_non_null(j);
    return j;
}

/* The object of `list` (an array of objects) whose `key` is `value`, borrowed, or NULL. */
static json_t *find_by(json_t *list, const char *key, const char *value) {
    size_t i;
    json_t *item;
    json_array_foreach(list, i, item) {
        if (strcmp(jstr(item, key), value) == 0) return item;
    }
    return NULL;
}

/* Whether obj has exactly the n keys listed. */
static bool has_exactly_keys(const json_t *obj, const char *const *keys, size_t n) {
    if (!json_is_object(obj) || json_object_size(obj) != n) return false;
    for (size_t i = 0; i < n; i++)
        if (!json_object_get(obj, keys[i])) return false;
    return true;
}

/* ---- the outcome's attempts (SPEC 8) ------------------------------------------------------ */

static json_t *attempt_at(const json_t *outcome, size_t i) {
    json_t *a = json_array_get(json_object_get(outcome, "attempts"), i);
    assert_non_null(a);
    assert_true(json_is_string(json_object_get(a, "upstream")));
    return a;
}

/* Attempt i answered `status` from upstream with model: {upstream, model, ms, status}. */
static void expect_answered(const json_t *outcome, size_t i, const char *upstream,
                            const char *model, int status) {
    json_t *a = attempt_at(outcome, i);
    assert_string_equal(jstr(a, "upstream"), upstream);
    assert_string_equal(jstr(a, "model"), model);
    assert_true(json_is_integer(json_object_get(a, "ms")));
    assert_true(json_integer_value(json_object_get(a, "ms")) >= 0);
    assert_int_equal(json_integer_value(json_object_get(a, "status")), status);
    assert_null(json_object_get(a, "error"));
    assert_null(json_object_get(a, "skipped"));
}

/* Attempt i failed without an answer: {upstream, model, ms, error}. */
static void expect_error(const json_t *outcome, size_t i, const char *upstream, const char *model,
                         const char *error) {
    json_t *a = attempt_at(outcome, i);
    assert_string_equal(jstr(a, "upstream"), upstream);
    assert_string_equal(jstr(a, "model"), model);
    assert_true(json_is_integer(json_object_get(a, "ms")));
    assert_string_equal(jstr(a, "error"), error);
    assert_null(json_object_get(a, "status"));
    assert_null(json_object_get(a, "skipped"));
}

/* Entry i is a skipped step: {upstream, model, skipped: "breaker_open"}, no ms/status. */
static void expect_skipped(const json_t *outcome, size_t i, const char *upstream,
                           const char *model) {
    json_t *a = attempt_at(outcome, i);
    assert_string_equal(jstr(a, "upstream"), upstream);
    assert_string_equal(jstr(a, "model"), model);
    assert_string_equal(jstr(a, "skipped"), "breaker_open");
    assert_null(json_object_get(a, "status"));
    assert_null(json_object_get(a, "error"));
    assert_null(json_object_get(a, "ms"));
}

static size_t attempts_len(const json_t *outcome) {
    return json_array_size(json_object_get(outcome, "attempts"));
}

/* The outcome's code and status are what the agent received (SPEC 6.2). */
static void expect_outcome(const json_t *outcome, const char *code, long status) {
    assert_non_null(outcome);
    assert_string_equal(jstr(outcome, "code"), code);
    assert_int_equal(json_integer_value(json_object_get(outcome, "status")), status);
}

/* A pep error answer: status, JSON error with code; returns the body (new reference). */
static json_t *expect_pep_error(const struct h_resp *r, long status, const char *code) {
    if (r->status != status) fprintf(stderr, "got %ld: %s\n", r->status, r->body);
    assert_int_equal(r->status, status);
    json_t *j = h_json(r);
    assert_non_null(j);
    json_t *err = json_object_get(j, "error");
    assert_string_equal(jstr(err, "type"), "pep_error");
    assert_string_equal(jstr(err, "code"), code);
    return j;
}

static void expect_header(const struct h_resp *r, const char *name, const char *value) {
    const char *v = h_header(r, name);
    if (!v || strcmp(v, value) != 0)
        fprintf(stderr, "header %s: want \"%s\", got \"%s\"\n", name, value, v ? v : "(absent)");
    assert_non_null(v);
    assert_string_equal(v, value);
}

/* ---- Prometheus text (SPEC 7) --------------------------------------------------------------- */

/* A parsed exposition: `types` maps family → type, `samples` is [{name, labels, value}]. */
struct prom {
    json_t *types;
    json_t *samples;
};

/* Parses one sample line ("name{k=\"v\",…} value [timestamp]"); false if malformed. */
static bool prom_sample(const char *line, json_t *samples) {
    size_t n = strcspn(line, "{ ");
    if (n == 0 || n >= 200) return false;
    char name[200];
    memcpy(name, line, n);
    name[n] = '\0';
    const char *p = line + n;
    json_t *labels = json_object();
    if (*p == '{') {
        p++;
        while (*p && *p != '}') {
            size_t k = strcspn(p, "=");
            if (k == 0 || k >= 100 || p[k] != '=' || p[k + 1] != '"') goto bad;
            char key[100], val[512];
            memcpy(key, p, k);
            key[k] = '\0';
            p += k + 2;
            size_t v = 0;
            while (*p && *p != '"' && v + 1 < sizeof val) {
                if (*p == '\\' && p[1]) {
                    p++;
                    val[v++] = *p == 'n' ? '\n' : *p;
                } else {
                    val[v++] = *p;
                }
                p++;
            }
            if (*p != '"') goto bad;
            val[v] = '\0';
            p++;
            json_object_set_new(labels, key, json_string(val));
            if (*p == ',') p++;
        }
        if (*p != '}') goto bad;
        p++;
    }
    if (*p != ' ') goto bad;
    char *end;
    double value = strtod(p + 1, &end);
    if (end == p + 1 || (*end && *end != ' ')) goto bad;
    json_array_append_new(
        samples, json_pack("{s:s, s:o, s:f}", "name", name, "labels", labels, "value", value));
    return true;
bad:
    json_decref(labels);
    return false;
}

/* The family a sample belongs to: its own name, or a histogram's without _bucket, _sum or
 * _count. */
static const char *prom_type_of(const struct prom *m, const char *name) {
    const char *t = json_string_value(json_object_get(m->types, name));
    if (t) return t;
    static const char *const suffixes[] = {"_bucket", "_sum", "_count"};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(name), s = strlen(suffixes[i]);
        if (n > s && strcmp(name + n - s, suffixes[i]) == 0) {
            char family[200];
            snprintf(family, sizeof family, "%.*s", (int)(n - s), name);
            t = json_string_value(json_object_get(m->types, family));
            if (t && strcmp(t, "histogram") == 0) return t;
        }
    }
    return NULL;
}

/* GET /metrics on the admin listener without a token, parsed; every line must parse and
 * every sample must belong to a family with a # TYPE line. */
static void prom_scrape(struct prom *m) {
    char url[256];
    snprintf(url, sizeof url, "%s/metrics", F.pep.admin_url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url, NULL, NULL), 0);
    assert_int_equal(r.status, 200);
    const char *ct = h_header(&r, "Content-Type");
    assert_non_null(ct);
    assert_non_null(strstr(ct, "text/plain"));
    m->types = json_object();
    m->samples = json_array();
    char *text = r.body;
    for (char *line = text; line && *line;) {
        char *eol = strchr(line, '\n');
        if (eol) *eol = '\0';
        if (line[0] == '#') {
            char name[200], type[32];
            if (strncmp(line, "# TYPE ", 7) == 0) {
                assert_int_equal(sscanf(line, "# TYPE %199s %31s", name, type), 2);
                json_object_set_new(m->types, name, json_string(type));
            }
        } else if (line[0]) {
            bool ok = prom_sample(line, m->samples);
            if (!ok) fprintf(stderr, "bad sample line: %s\n", line);
            assert_true(ok);
        }
        line = eol ? eol + 1 : NULL;
    }
    h_resp_free(&r);
    size_t i;
    json_t *s;
    json_array_foreach(m->samples, i, s) {
        if (!prom_type_of(m, jstr(s, "name")))
            fprintf(stderr, "sample %s has no # TYPE\n", jstr(s, "name"));
        assert_non_null(prom_type_of(m, jstr(s, "name")));
    }
}

static void prom_free(struct prom *m) {
    json_decref(m->types);
    json_decref(m->samples);
}

/* The value of the sample name{labels}, labels written "k=v,k=v" (exactly those labels);
 * `absent` when there is no such sample. */
static double prom_get_or(const struct prom *m, const char *name, const char *labels,
                          double absent) {
    char spec[512];
    snprintf(spec, sizeof spec, "%s", labels ? labels : "");
    json_t *want = json_object();
    for (char *save = NULL, *kv = strtok_r(spec, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        assert_non_null(eq);
        *eq = '\0';
        json_object_set_new(want, kv, json_string(eq + 1));
    }
    size_t i;
    json_t *s;
    double value = absent;
    json_array_foreach(m->samples, i, s) {
        if (strcmp(jstr(s, "name"), name) == 0 && json_equal(json_object_get(s, "labels"), want)) {
            value = json_real_value(json_object_get(s, "value"));
            break;
        }
    }
    json_decref(want);
    return value;
}

/* The same for a sample that must be there. */
static double prom_get(const struct prom *m, const char *name, const char *labels) {
    double v = prom_get_or(m, name, labels, -1e300);
    if (v == -1e300) fprintf(stderr, "no sample %s{%s}\n", name, labels ? labels : "");
    assert_true(v != -1e300);
    return v;
}

/* ---- setup ---------------------------------------------------------------------------------- */

static int group_setup(void **state) {
    (void)state;
    if (h_start_mockllm(&MOCK2) != 0) return -1;
    char *text = fx_replace_all(POLICY, "@MOCK2@", MOCK2.url);
    int rc = text ? fx_start(&F, text, NULL, NULL) : -1;
    free(text);
    if (rc != 0) return -1;
    BOT_TOKEN = fx_issue(&F, "bot", NULL, NULL);
    if (!BOT_TOKEN) return -1;
    fx_bearer(BOT_AUTH, sizeof BOT_AUTH, BOT_TOKEN);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    free(BOT_TOKEN);
    fx_stop(&F);
    if (MOCK2.pid > 0) h_stop(&MOCK2, SIGTERM);
    return 0;
}

/* ---- 4.1: retry ----------------------------------------------------------------------------- */

/* A 503 then a 200 on the same step: two attempts after a 100 ms backoff (jitter none). */
static void test_retry_on_503_then_success(void **state) {
    (void)state;
    const char *path = "/t1/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    int64_t ms;
    assert_int_equal(post(path, CHAT, NULL, 0, &r, &ms), 200);
    expect_header(&r, "Pep-Attempts", "2");
    expect_header(&r, "Pep-Upstream", "u1");
    expect_header(&r, "Pep-Model", "m1");
    assert_true(ms >= 100); /* the backoff: base 100ms, jitter none */
    assert_int_equal(mock_hits(F.mock.url, path), 2);
    json_t *body = h_json(&r);
    assert_string_equal(jstr(body, "object"), "chat.completion");
    json_decref(body);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 2);
    expect_answered(out, 0, "u1", "m1", 503);
    expect_answered(out, 1, "u1", "m1", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 0);
    assert_true(json_is_integer(json_object_get(out, "fallback_step")));
    assert_string_equal(jstr(out, "chain"), "c1");
    assert_null(json_object_get(out, "escalation_id"));
    json_decref(out);
    h_resp_free(&r);
}

/* ---- 4.1, 4.2, 4.7: fallback with the model rewritten; one attempt when not repeatable ---- */

static void test_fallback_rewrites_model(void **state) {
    (void)state;
    const char *path = "/t2/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u2b");
    expect_header(&r, "Pep-Model", "m-backup");
    expect_header(&r, "Pep-Attempts", "3");
    assert_int_equal(mock_hits(F.mock.url, path), 2);
    assert_int_equal(mock_hits(MOCK2.url, path), 1);
    char model[64];
    json_t *seen = mock_requests(F.mock.url, path);
    assert_int_equal(json_array_size(seen), 2);
    for (size_t i = 0; i < 2; i++) {
        model_sent(json_array_get(seen, i), model);
        assert_string_equal(model, "m-primary");
    }
    json_decref(seen);
    seen = mock_requests(MOCK2.url, path);
    assert_int_equal(json_array_size(seen), 1);
    model_sent(json_array_get(seen, 0), model);
    assert_string_equal(model, "m-backup");
    /* The rest of the body travels unchanged. */
    json_t *sent = json_loads(jstr(json_array_get(seen, 0), "body"), 0, NULL);
    assert_string_equal(jstr(json_array_get(json_object_get(sent, "messages"), 0), "content"),
                        "hi");
    json_decref(sent);
    json_decref(seen);
    json_t *answer = h_json(&r);
    assert_string_equal(jstr(answer, "model"), "m-backup");
    json_decref(answer);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 3);
    expect_answered(out, 0, "u2a", "m-primary", 503);
    expect_answered(out, 1, "u2a", "m-primary", 503);
    expect_answered(out, 2, "u2b", "m-backup", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 1);
    assert_string_equal(jstr(out, "upstream"), "u2b");
    assert_string_equal(jstr(out, "model"), "m-backup");
    json_decref(out);

    /* A POST route without retry_safe and without Idempotency-Key: one attempt, no
     * fallback, 503 upstream_unavailable with the upstream's status. */
    const char *once = "/t2n/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", once);
    assert_int_equal(post(once, CHAT, NULL, 0, &r, NULL), 503);
    json_t *err = expect_pep_error(&r, 503, "upstream_unavailable");
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(err, "error"), "upstream_status")), 503);
    json_decref(err);
    expect_header(&r, "Pep-Attempts", "1");
    assert_int_equal(mock_hits(F.mock.url, once), 1);
    assert_int_equal(mock_hits(MOCK2.url, once), 0);
    request_id_of(&r, rid);
    out = outcome_of(rid);
    expect_outcome(out, "upstream_unavailable", 503);
    assert_int_equal(attempts_len(out), 1);
    expect_answered(out, 0, "u2a", "m-primary", 503);
    assert_int_equal(json_integer_value(json_object_get(out, "upstream_status")), 503);
    assert_null(json_object_get(out, "fallback_step"));
    json_decref(out);

    /* The same route with an Idempotency-Key is safe to repeat: it retries and falls back. */
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", once);
    assert_int_equal(post(once, CHAT, "Idempotency-Key: it15-fallback-1", 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u2b");
    expect_header(&r, "Pep-Attempts", "3");
    assert_int_equal(mock_hits(F.mock.url, once), 3);
    assert_int_equal(mock_hits(MOCK2.url, once), 1);
    request_id_of(&r, rid);
    out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 1);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- 4.3, 3.3: 401/403 is an operator problem; other answers are relayed as sent -------- */

static void test_auth_failure_and_passthrough(void **state) {
    (void)state;
    const char *path = "/t3/chat/completions";
    static const int refusals[] = {401, 403};
    struct h_resp r = {0};
    char rid[64];
    for (size_t i = 0; i < 2; i++) {
        fault(F.mock.url, "{\"kind\":\"status\",\"status\":%d,\"count\":1,\"path\":\"%s\"}",
              refusals[i], path);
        assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 502);
        json_decref(expect_pep_error(&r, 502, "upstream_auth_failed"));
        expect_header(&r, "Pep-Attempts", "1");
        assert_int_equal(mock_hits(F.mock.url, path), (long)i + 1);
        assert_int_equal(mock_hits(MOCK2.url, path), 0); /* no fallback */
        request_id_of(&r, rid);
        json_t *out = outcome_of(rid);
        expect_outcome(out, "upstream_auth_failed", 502);
        assert_int_equal(attempts_len(out), 1);
        expect_answered(out, 0, "u3a", "m3a", refusals[i]);
        json_decref(out);
    }

    /* A 400 not in retry.on: relayed byte for byte, no retry, no fallback. */
    const char *sent = "{\"error\":{\"message\":\"unsupported parameter: foo\",\"type\":"
                       "\"invalid_request_error\",\"param\":\"foo\",\"code\":\"bad_foo\"}}";
    fault(F.mock.url,
          "{\"kind\":\"status\",\"status\":400,\"count\":1,\"path\":\"%s\","
          "\"body\":\"{\\\"error\\\":{\\\"message\\\":\\\"unsupported parameter: foo\\\","
          "\\\"type\\\":\\\"invalid_request_error\\\",\\\"param\\\":\\\"foo\\\",\\\"code\\\":"
          "\\\"bad_foo\\\"}}\"}",
          path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 400);
    assert_string_equal(r.body, sent);
    assert_int_equal(r.body_len, strlen(sent));
    expect_header(&r, "Pep-Attempts", "1");
    expect_header(&r, "Pep-Upstream", "u3a");
    assert_non_null(strstr(h_header(&r, "Content-Type"), "application/json"));
    assert_int_equal(mock_hits(F.mock.url, path), 3);
    assert_int_equal(mock_hits(MOCK2.url, path), 0);
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 400);
    assert_int_equal(attempts_len(out), 1);
    expect_answered(out, 0, "u3a", "m3a", 400);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 0);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- SPEC 2 context_overflow: deterministic, never retried, jumps to its step ----------- */

static void test_context_overflow_jumps(void **state) {
    (void)state;
    const char *path = "/t4/chat/completions";
    /* 400 is in c4's retry.on: the overflow must still not be retried. */
    fault(F.mock.url, "{\"kind\":\"context_overflow\",\"count\":1,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u4big");
    expect_header(&r, "Pep-Model", "big-128k");
    expect_header(&r, "Pep-Attempts", "2");
    assert_int_equal(mock_hits(F.mock.url, path), 1);
    assert_int_equal(mock_hits(MOCK2.url, path), 1);
    char model[64];
    json_t *seen = mock_requests(F.mock.url, path);
    model_sent(json_array_get(seen, 0), model);
    assert_string_equal(model, "small");
    json_decref(seen);
    seen = mock_requests(MOCK2.url, path);
    assert_int_equal(json_array_size(seen), 1);
    model_sent(json_array_get(seen, 0), model);
    assert_string_equal(model, "big-128k");
    json_decref(seen);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 2);
    expect_answered(out, 0, "u4a", "small", 400);
    expect_answered(out, 1, "u4big", "big-128k", 200);
    assert_string_equal(jstr(out, "fallback_step"), "context_overflow");
    json_decref(out);
    struct prom m;
    prom_scrape(&m);
    assert_true(prom_get(&m, "pep_fallbacks_total", "chain=c4,step=context_overflow") == 1);
    assert_true(prom_get(&m, "pep_retries_total", "upstream=u4a") == 0);
    assert_true(prom_get(&m, "pep_upstream_attempts_total", "upstream=u4a,outcome=4xx") == 1);
    prom_free(&m);

    /* Not safe to repeat (no retry_safe, no Idempotency-Key): one attempt, one step, so the
     * overflow answer itself is relayed. */
    const char *once = "/t4n/chat/completions";
    fault(F.mock.url, "{\"kind\":\"context_overflow\",\"count\":1,\"path\":\"%s\"}", once);
    assert_int_equal(post(once, CHAT, NULL, 0, &r, NULL), 400);
    assert_non_null(strstr(r.body, "context_length_exceeded"));
    expect_header(&r, "Pep-Attempts", "1");
    expect_header(&r, "Pep-Upstream", "u4a");
    assert_int_equal(mock_hits(F.mock.url, once), 1);
    assert_int_equal(mock_hits(MOCK2.url, once), 0);
    request_id_of(&r, rid);
    out = outcome_of(rid);
    expect_outcome(out, "ok", 400);
    assert_int_equal(attempts_len(out), 1);
    expect_answered(out, 0, "u4a", "small", 400);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- SPEC 2 respect_retry_after ------------------------------------------------------------- */

static void test_retry_after_honoured(void **state) {
    (void)state;
    const char *path = "/t5/chat/completions";
    fault(F.mock.url,
          "{\"kind\":\"status\",\"status\":429,\"retry_after\":\"1\",\"count\":1,\"path\":\"%s\"}",
          path);
    struct h_resp r = {0};
    int64_t ms;
    assert_int_equal(post(path, CHAT, NULL, 0, &r, &ms), 200);
    fprintf(stderr, "429 with Retry-After: 1, then 200: %lld ms\n", (long long)ms);
    assert_true(ms >= 1000); /* the upstream's Retry-After, not the 50 ms backoff */
    expect_header(&r, "Pep-Attempts", "2");
    expect_header(&r, "Pep-Upstream", "u5a");
    assert_int_equal(mock_hits(F.mock.url, path), 2);
    assert_int_equal(mock_hits(MOCK2.url, path), 0);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 2);
    expect_answered(out, 0, "u5a", "m5a", 429);
    expect_answered(out, 1, "u5a", "m5a", 200);
    json_decref(out);

    /* A Retry-After beyond retry.max (2s): the next step at once, no retry on this one. */
    fault(F.mock.url,
          "{\"kind\":\"status\",\"status\":429,\"retry_after\":\"30\",\"count\":1,\"path\":\"%s\"}",
          path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, &ms), 200);
    fprintf(stderr, "429 with Retry-After: 30 (> retry.max), then step 2: %lld ms\n",
            (long long)ms);
    expect_header(&r, "Pep-Upstream", "u5b");
    expect_header(&r, "Pep-Model", "m5b");
    expect_header(&r, "Pep-Attempts", "2");
    assert_int_equal(mock_hits(F.mock.url, path), 3);
    assert_int_equal(mock_hits(MOCK2.url, path), 1);
    request_id_of(&r, rid);
    out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 2);
    expect_answered(out, 0, "u5a", "m5a", 429);
    expect_answered(out, 1, "u5b", "m5b", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 1);
    json_decref(out);

    /* Both steps say "come back in 30 s": 503 upstream_unavailable carries that Retry-After
     * (SPEC 3.5: on 503 when known) and the last status. */
    fault(F.mock.url,
          "{\"kind\":\"status\",\"status\":429,\"retry_after\":\"30\",\"count\":1,\"path\":\"%s\"}",
          path);
    fault(MOCK2.url,
          "{\"kind\":\"status\",\"status\":429,\"retry_after\":\"30\",\"count\":1,\"path\":\"%s\"}",
          path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 503);
    json_t *err = expect_pep_error(&r, 503, "upstream_unavailable");
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(err, "error"), "upstream_status")), 429);
    json_decref(err);
    expect_header(&r, "Retry-After", "30");
    expect_header(&r, "Pep-Attempts", "2");
    assert_int_equal(mock_hits(F.mock.url, path), 4);
    assert_int_equal(mock_hits(MOCK2.url, path), 2);
    request_id_of(&r, rid);
    out = outcome_of(rid);
    expect_outcome(out, "upstream_unavailable", 503);
    assert_int_equal(json_integer_value(json_object_get(out, "upstream_status")), 429);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- SPEC 2 deadline ------------------------------------------------------------------------ */

static void test_deadline_exceeded(void **state) {
    (void)state;
    const char *path = "/t6/chat/completions";
    fault(F.mock.url, "{\"kind\":\"hang\",\"count\":1,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    int64_t ms;
    /* The upstream's timeout is 20 s; the chain's deadline (1 s) must end it long before
     * this client gives up (10 s). */
    post(path, CHAT, NULL, 10000, &r, &ms);
    assert_int_equal(r.curl_code, 0);
    fprintf(stderr, "hanging upstream, deadline 1s: answered in %lld ms\n", (long long)ms);
    json_decref(expect_pep_error(&r, 504, "deadline_exceeded"));
    assert_true(ms >= 950);
    assert_int_equal(mock_hits(F.mock.url, path), 1);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "deadline_exceeded", 504);
    assert_int_equal(attempts_len(out), 1);
    expect_error(out, 0, "u6", "m6", "timeout");
    json_decref(out);
    h_resp_free(&r);
}

/* ---- 4.4 breaker: open, skipped, half-open probes, closed ----------------------------------- */

/* The entry of GET /admin/v1/upstreams for name (new reference). */
static json_t *upstream_state(const char *name) {
    json_t *all = admin_get("/admin/v1/upstreams");
    json_t *u = find_by(json_object_get(all, "upstreams"), "name", name);
    assert_non_null(u);
    json_incref(u);
    json_decref(all);
    return u;
}

static long transitions_recorded(const char *upstream, const char *reason) {
    char where[512];
    snprintf(where, sizeof where,
             "json_extract(record, '$.kind') = 'system' AND json_extract(record, '$.action') = "
             "'breaker.transition' AND json_extract(record, '$.upstream') = '%s'%s%s%s",
             upstream, reason ? " AND json_extract(record, '$.reason') = '" : "",
             reason ? reason : "", reason ? "'" : "");
    return fx_count_records_where(&F, where);
}

/* Polls until n transition records of upstream are in the store (they are audited
 * asynchronously); the count seen. */
static long wait_transitions(const char *upstream, long n) {
    long seen = 0;
    for (int i = 0; i < 100 && (seen = transitions_recorded(upstream, NULL)) < n; i++)
        sleep_ms(50);
    return seen;
}

static void test_breaker_opens_probes_and_closes(void **state) {
    (void)state;
    const char *path = "/t7/chat/completions";
    struct h_resp r = {0};
    char rid[64];
    /* Two failures (failure_threshold 2) open u7sick's breaker; both requests are served
     * by the fallback. */
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
        expect_header(&r, "Pep-Upstream", "u7ok");
        expect_header(&r, "Pep-Attempts", "2");
    }
    assert_int_equal(mock_hits(F.mock.url, path), 2);
    json_t *u = upstream_state("u7sick");
    static const char *const upstream_keys[] = {"name", "state", "since", "requests", "failures"};
    for (size_t k = 0; k < 5; k++)
        assert_non_null(json_object_get(u, upstream_keys[k]));
    assert_string_equal(jstr(u, "state"), "open");
    assert_true(strlen(jstr(u, "since")) >= 20); /* RFC 3339 */
    assert_int_equal(json_integer_value(json_object_get(u, "requests")), 2);
    assert_int_equal(json_integer_value(json_object_get(u, "failures")), 2);
    json_decref(u);
    u = upstream_state("u7ok");
    assert_string_equal(jstr(u, "state"), "closed");
    json_decref(u);
    struct prom m;
    prom_scrape(&m);
    assert_true(prom_get(&m, "pep_breaker_state", "upstream=u7sick") == 1);
    assert_true(prom_get(&m, "pep_breaker_transitions_total", "upstream=u7sick,to=open") == 1);
    prom_free(&m);

    /* Open: later requests do not reach it; the skip is in the outcome. */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
        expect_header(&r, "Pep-Upstream", "u7ok");
        expect_header(&r, "Pep-Attempts", "1");
        request_id_of(&r, rid);
        json_t *out = outcome_of(rid);
        expect_outcome(out, "ok", 200);
        assert_int_equal(attempts_len(out), 2);
        expect_skipped(out, 0, "u7sick", "s");
        expect_answered(out, 1, "u7ok", "b", 200);
        assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 1);
        json_decref(out);
    }
    assert_int_equal(mock_hits(F.mock.url, path), 2); /* stopped growing */
    assert_int_equal(mock_hits(MOCK2.url, path), 4);

    /* After open_for (1 s) it half-opens ... */
    json_t *st = NULL;
    int64_t t0 = now_ms();
    for (int i = 0; i < 100; i++) {
        json_decref(st);
        st = upstream_state("u7sick");
        if (strcmp(jstr(st, "state"), "half_open") == 0) break;
        sleep_ms(100);
    }
    assert_string_equal(jstr(st, "state"), "half_open");
    json_decref(st);
    fprintf(stderr, "u7sick half-open after %lld ms of polling\n", (long long)(now_ms() - t0));
    /* ... a request probes it (served by it, no fallback) ... */
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u7sick");
    expect_header(&r, "Pep-Attempts", "1");
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    assert_int_equal(attempts_len(out), 1);
    expect_answered(out, 0, "u7sick", "s", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 0);
    json_decref(out);
    assert_int_equal(mock_hits(F.mock.url, path), 3);
    st = upstream_state("u7sick");
    assert_string_equal(jstr(st, "state"), "half_open"); /* 1 of success_threshold 2 */
    json_decref(st);
    /* ... and the second probe success closes it. */
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u7sick");
    assert_int_equal(mock_hits(F.mock.url, path), 4);
    st = upstream_state("u7sick");
    assert_string_equal(jstr(st, "state"), "closed");
    json_decref(st);

    /* Every transition is a kind: system record, in order. */
    assert_int_equal(wait_transitions("u7sick", 3), 3);
    assert_int_equal(transitions_recorded("u7sick", "closed -> open"), 1);
    assert_int_equal(transitions_recorded("u7sick", "open -> half_open"), 1);
    assert_int_equal(transitions_recorded("u7sick", "half_open -> closed"), 1);
    assert_int_equal(transitions_recorded("u7ok", NULL), 0);
    prom_scrape(&m);
    assert_true(prom_get(&m, "pep_breaker_state", "upstream=u7sick") == 0);
    assert_true(prom_get(&m, "pep_upstream_attempts_total", "upstream=u7sick,outcome=5xx") == 2);
    assert_true(prom_get(&m, "pep_upstream_attempts_total", "upstream=u7sick,outcome=2xx") == 2);
    assert_true(prom_get(&m, "pep_upstream_attempts_total", "upstream=u7ok,outcome=2xx") == 4);
    /* Served by step 1 after a failure (twice) or after a skip (twice). */
    assert_true(prom_get(&m, "pep_fallbacks_total", "chain=c7,step=1") == 4);
    assert_true(prom_get(&m, "pep_breaker_transitions_total", "upstream=u7sick,to=half_open") == 1);
    assert_true(prom_get(&m, "pep_breaker_transitions_total", "upstream=u7sick,to=closed") == 1);
    prom_free(&m);
    h_resp_free(&r);
}

/* ---- 4.4 escalation ------------------------------------------------------------------------- */

/* The webhook POSTs mockllm 2 received on hook_path for request_id (new reference). */
static json_t *webhooks_for(const char *hook_path, const char *request_id) {
    json_t *all = mock_requests(MOCK2.url, hook_path), *out = json_array(), *item;
    size_t i;
    json_array_foreach(all, i, item) {
        json_t *body = json_loads(jstr(item, "body"), 0, NULL);
        if (strcmp(jstr(body, "request_id"), request_id) == 0) json_array_append(out, item);
        json_decref(body);
    }
    json_decref(all);
    return out;
}

/* Polls until n webhook POSTs for request_id arrived (bounded); returns them. */
static json_t *wait_webhooks(const char *hook_path, const char *request_id, size_t n) {
    json_t *got = NULL;
    for (int i = 0; i < 100; i++) {
        json_decref(got);
        got = webhooks_for(hook_path, request_id);
        if (json_array_size(got) >= n) break;
        sleep_ms(50);
    }
    return got;
}

static long escalation_records(const char *request_id) {
    char where[256];
    snprintf(where, sizeof where,
             "json_extract(record, '$.kind') = 'system' AND json_extract(record, '$.action') = "
             "'escalation.open' AND json_extract(record, '$.request_id') = '%s'",
             request_id);
    return fx_count_records_where(&F, where);
}

static void test_outage_escalates(void **state) {
    (void)state;
    const char *path = "/t8/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    fault(MOCK2.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 503);
    json_t *err = expect_pep_error(&r, 503, "upstream_unavailable");
    json_t *e = json_object_get(err, "error");
    char esc_id[64], rid[64];
    snprintf(esc_id, sizeof esc_id, "%s", jstr(e, "escalation_id"));
    assert_true(strlen(esc_id) > 0);
    assert_int_equal(json_integer_value(json_object_get(e, "upstream_status")), 503);
    json_decref(err);
    expect_header(&r, "Pep-Attempts", "4");
    assert_int_equal(mock_hits(F.mock.url, path), 2);
    assert_int_equal(mock_hits(MOCK2.url, path), 2);
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "upstream_unavailable", 503);
    assert_string_equal(jstr(out, "escalation_id"), esc_id);
    assert_int_equal(json_integer_value(json_object_get(out, "upstream_status")), 503);
    assert_int_equal(attempts_len(out), 4);
    expect_answered(out, 0, "u8a", "a", 503);
    expect_answered(out, 1, "u8a", "a", 503);
    expect_answered(out, 2, "u8b", "b", 503);
    expect_answered(out, 3, "u8b", "b", 503);
    json_decref(out);

    /* In the open queue, with SPEC 8's item keys. */
    json_t *list = admin_get("/admin/v1/escalations?state=open");
    json_t *item = find_by(json_object_get(list, "escalations"), "id", esc_id);
    assert_non_null(item);
    static const char *const item_keys[] = {"id",    "state",  "chain",     "request_id",
                                            "agent", "action", "created_at"};
    assert_true(has_exactly_keys(item, item_keys, 7));
    assert_string_equal(jstr(item, "state"), "open");
    assert_string_equal(jstr(item, "chain"), "c8");
    assert_string_equal(jstr(item, "request_id"), rid);
    assert_string_equal(jstr(item, "agent"), "bot");
    assert_string_equal(jstr(item, "action"), "llm.t8");
    assert_true(strlen(jstr(item, "created_at")) >= 20);
    json_decref(list);
    assert_int_equal(escalation_records(rid), 1);

    /* POSTed to the webhook: id, chain, request_id, agent, attempts; never the token. */
    json_t *hooks = wait_webhooks("/hooks/esc8", rid, 1);
    assert_int_equal(json_array_size(hooks), 1);
    json_t *hook = json_array_get(hooks, 0);
    assert_string_equal(jstr(hook, "method"), "POST");
    assert_string_equal(jstr(json_object_get(hook, "headers"), "x-pep-event"), "escalation.open");
    assert_non_null(
        strstr(jstr(json_object_get(hook, "headers"), "content-type"), "application/json"));
    json_t *hb = json_loads(jstr(hook, "body"), 0, NULL);
    assert_non_null(hb);
    assert_string_equal(jstr(hb, "id"), esc_id);
    assert_string_equal(jstr(hb, "chain"), "c8");
    assert_string_equal(jstr(hb, "request_id"), rid);
    assert_string_equal(jstr(hb, "agent"), "bot");
    assert_int_equal(json_array_size(json_object_get(hb, "attempts")), 4);
    json_decref(hb);
    char *whole = json_dumps(hook, JSON_COMPACT);
    assert_null(strstr(whole, BOT_TOKEN));
    free(whole);
    json_decref(hooks);

    /* Resolved once (200), then 409; it leaves the open queue. */
    char p[256];
    snprintf(p, sizeof p, "/admin/v1/escalations/%s/resolve", esc_id);
    assert_int_equal(fx_admin(&F, &r, "POST", p, "{\"note\":\"provider outage, retried\"}"), 0);
    assert_int_equal(r.status, 200);
    json_t *resolved = h_json(&r);
    assert_string_equal(jstr(resolved, "state"), "resolved");
    json_decref(resolved);
    snprintf(p, sizeof p, "/admin/v1/escalations/%s", esc_id);
    json_t *shown = admin_get(p);
    assert_string_equal(jstr(shown, "state"), "resolved");
    assert_string_equal(jstr(shown, "note"), "provider outage, retried");
    json_decref(shown);
    /* The resolution is audited with what the operator wrote. */
    char where[512];
    snprintf(where, sizeof where,
             "json_extract(record, '$.kind') = 'admin' AND json_extract(record, "
             "'$.escalation_id') = '%s' AND json_extract(record, '$.reason') = 'provider "
             "outage, retried'",
             esc_id);
    long resolutions = 0;
    for (int i = 0; i < 100 && (resolutions = fx_count_records_where(&F, where)) < 1; i++)
        sleep_ms(50);
    assert_int_equal(resolutions, 1);
    snprintf(p, sizeof p, "/admin/v1/escalations/%s/resolve", esc_id);
    assert_int_equal(fx_admin(&F, &r, "POST", p, "{\"note\":\"again\"}"), 0);
    assert_int_equal(r.status, 409);
    list = admin_get("/admin/v1/escalations?state=open");
    assert_null(find_by(json_object_get(list, "escalations"), "id", esc_id));
    json_decref(list);
    list = admin_get("/admin/v1/escalations?state=resolved");
    assert_non_null(find_by(json_object_get(list, "escalations"), "id", esc_id));
    json_decref(list);
    h_resp_free(&r);
}

/* Every step's breaker open: 503 with Retry-After, nothing sent, escalated, no
 * upstream_status (no upstream answered this request). */
static void test_all_breakers_open_retry_after(void **state) {
    (void)state;
    const char *path = "/t8b/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 503); /* opens u8c (threshold 1) */
    json_decref(expect_pep_error(&r, 503, "upstream_unavailable"));
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 503);
    json_t *err = expect_pep_error(&r, 503, "upstream_unavailable");
    json_t *e = json_object_get(err, "error");
    assert_true(strlen(jstr(e, "escalation_id")) > 0);
    assert_null(json_object_get(e, "upstream_status"));
    json_decref(err);
    const char *ra = h_header(&r, "Retry-After");
    assert_non_null(ra);
    long secs = atol(ra);
    fprintf(stderr, "every breaker open: Retry-After %s\n", ra);
    assert_true(secs >= 1 && secs <= 30); /* open_for 30s */
    expect_header(&r, "Pep-Attempts", "0");
    assert_int_equal(mock_hits(F.mock.url, path), 1);
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "upstream_unavailable", 503);
    assert_int_equal(attempts_len(out), 1);
    expect_skipped(out, 0, "u8c", "c");
    assert_null(json_object_get(out, "upstream_status"));
    assert_true(strlen(jstr(out, "escalation_id")) > 0);
    json_decref(out);
    h_resp_free(&r);
}

/* escalate.after_attempts: escalates once, while the later step still serves. */
static void test_escalate_after_attempts_once(void **state) {
    (void)state;
    const char *path = "/t8c/chat/completions";
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Upstream", "u8e");
    expect_header(&r, "Pep-Attempts", "3");
    char rid[64];
    request_id_of(&r, rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 1);
    const char *esc = jstr(out, "escalation_id");
    assert_true(strlen(esc) > 0);
    json_t *list = admin_get("/admin/v1/escalations?state=open");
    size_t i, mine = 0;
    json_t *item;
    json_array_foreach(json_object_get(list, "escalations"), i, item) {
        if (strcmp(jstr(item, "request_id"), rid) == 0) {
            mine++;
            assert_string_equal(jstr(item, "id"), esc);
            assert_string_equal(jstr(item, "chain"), "c8c");
        }
    }
    assert_int_equal(mine, 1);
    json_decref(list);
    json_t *hooks = wait_webhooks("/hooks/esc8c", rid, 1);
    assert_int_equal(json_array_size(hooks), 1);
    json_decref(hooks);
    sleep_ms(300); /* a second POST would have had time to come */
    hooks = webhooks_for("/hooks/esc8c", rid);
    assert_int_equal(json_array_size(hooks), 1);
    json_decref(hooks);
    assert_int_equal(escalation_records(rid), 1);
    json_decref(out);
    h_resp_free(&r);
}

/* ---- 4.6 streaming -------------------------------------------------------------------------- */

struct sse_client {
    int64_t t0, first_byte; /* ms, monotonic; first_byte 0 until a body byte came */
    char *body;
    size_t len;
    struct curl_slist *headers;
};

static size_t sse_on_body(char *data, size_t size, size_t n, void *arg) {
    struct sse_client *c = arg;
    size_t len = size * n;
    if (len && !c->first_byte) c->first_byte = now_ms();
    char *grown = realloc(c->body, c->len + len + 1);
    if (!grown) return 0;
    memcpy(grown + c->len, data, len);
    c->body = grown;
    c->len += len;
    c->body[c->len] = '\0';
    return len;
}

static size_t sse_on_header(char *data, size_t size, size_t n, void *arg) {
    struct sse_client *c = arg;
    size_t len = size * n;
    char line[1024];
    size_t l = len < sizeof line - 1 ? len : sizeof line - 1;
    memcpy(line, data, l);
    while (l && (line[l - 1] == '\r' || line[l - 1] == '\n'))
        l--;
    line[l] = '\0';
    if (strncmp(line, "HTTP/", 5) == 0) { /* a new response head: keep only the last */
        curl_slist_free_all(c->headers);
        c->headers = NULL;
    }
    if (l) c->headers = curl_slist_append(c->headers, line);
    return len;
}

static const char *sse_header(const struct sse_client *c, const char *name) {
    size_t n = strlen(name);
    for (const struct curl_slist *h = c->headers; h; h = h->next) {
        if (strncasecmp(h->data, name, n) == 0 && h->data[n] == ':') {
            const char *v = h->data + n + 1;
            while (*v == ' ')
                v++;
            return v;
        }
    }
    return NULL;
}

/* Streams a POST to path, reading it as it comes; returns the CURLcode, *status. */
static CURLcode sse_post(const char *path, const char *body, struct sse_client *c, long *status,
                         int64_t *total) {
    char url[512];
    snprintf(url, sizeof url, "%s%s", F.pep.url, path);
    struct curl_slist *hdrs = curl_slist_append(NULL, BOT_AUTH);
    hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    hdrs = curl_slist_append(hdrs, "Expect:");
    CURL *h = curl_easy_init();
    assert_non_null(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 20000L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sse_on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, sse_on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, c);
    c->t0 = now_ms();
    CURLcode rc = curl_easy_perform(h);
    *total = now_ms() - c->t0;
    *status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(h);
    curl_slist_free_all(hdrs);
    return rc;
}

static void sse_free(struct sse_client *c) {
    free(c->body);
    curl_slist_free_all(c->headers);
}

static size_t count_of(const char *hay, const char *needle) {
    size_t n = 0;
    for (const char *p = hay ? strstr(hay, needle) : NULL; p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* Streams one answer of 5 chunks 400 ms apart (the last one leaves mockllm 1.6 s after the
 * first) and checks it came through as it was produced; *first_ms gets the time to its
 * first body byte.  The request id goes to rid. */
static void stream_five_chunks(const char *path, const char *body, int64_t *first_ms,
                               char rid[64]) {
    fault(F.mock.url,
          "{\"kind\":\"sse\",\"chunks\":5,\"chunk_delay_ms\":400,\"count\":1,\"path\":\"%s\"}",
          path);
    struct sse_client c = {0};
    long status;
    int64_t total;
    CURLcode rc = sse_post(path, body, &c, &status, &total);
    assert_int_equal(rc, CURLE_OK);
    assert_int_equal(status, 200);
    assert_true(c.first_byte > 0);
    int64_t first = c.first_byte - c.t0;
    fprintf(stderr, "stream: first body byte after %lld ms, whole stream %lld ms\n",
            (long long)first, (long long)total);
    assert_true(first < total - 1000); /* the first chunk came before mockllm was done */
    *first_ms = first;
    assert_int_equal(count_of(c.body, "data: "), 6);
    assert_int_equal(count_of(c.body, "\"chat.completion.chunk\""), 5);
    assert_non_null(strstr(c.body, "\"model\":\"m9\""));
    size_t done = strlen("data: [DONE]\n\n");
    assert_true(c.len >= done);
    assert_memory_equal(c.body + c.len - done, "data: [DONE]\n\n", done);
    const char *ct = sse_header(&c, "Content-Type");
    assert_non_null(ct);
    assert_true(strncmp(ct, "text/event-stream", 17) == 0);
    const char *up = sse_header(&c, "Pep-Upstream");
    assert_non_null(up);
    assert_string_equal(up, "u9");
    assert_string_equal(sse_header(&c, "Pep-Model"), "m9");
    assert_string_equal(sse_header(&c, "Pep-Attempts"), "1");
    assert_non_null(sse_header(&c, "Pep-Audit-Seq"));
    const char *id = sse_header(&c, "Pep-Request-Id");
    assert_non_null(id);
    snprintf(rid, 64, "%s", id);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 1);
    expect_answered(out, 0, "u9", "m9", 200);
    assert_int_equal(json_integer_value(json_object_get(out, "fallback_step")), 0);
    json_decref(out);
    sse_free(&c);
}

static void test_sse_streams_incrementally(void **state) {
    (void)state;
    const char *path = "/t9/chat/completions";
    int64_t first[3];
    char rid[64];
    /* "stream": true */
    stream_five_chunks(path, CHAT_STREAM, &first[0], rid);
    /* No "stream" in the request, but the upstream answers text/event-stream (SPEC 4.6). */
    stream_five_chunks(path, CHAT, &first[1], rid);

    /* A retry happens before the first byte: 503, then the stream. */
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", path);
    fault(F.mock.url, "{\"kind\":\"sse\",\"chunks\":2,\"count\":1,\"path\":\"%s\"}", path);
    struct sse_client c = {0};
    long status;
    int64_t total;
    assert_int_equal(sse_post(path, CHAT_STREAM, &c, &status, &total), CURLE_OK);
    assert_int_equal(status, 200);
    first[2] = c.first_byte - c.t0;
    assert_string_equal(sse_header(&c, "Pep-Attempts"), "2");
    assert_int_equal(count_of(c.body, "\"chat.completion.chunk\""), 2);
    assert_non_null(strstr(c.body, "data: [DONE]"));
    assert_null(strstr(c.body, "error"));
    json_t *out = outcome_of(sse_header(&c, "Pep-Request-Id"));
    expect_outcome(out, "ok", 200);
    assert_int_equal(attempts_len(out), 2);
    expect_answered(out, 0, "u9", "m9", 503);
    expect_answered(out, 1, "u9", "m9", 200);
    json_decref(out);
    sse_free(&c);
    assert_int_equal(mock_hits(F.mock.url, path), 4);

    /* SPEC 2 objectives: latency is "receipt to the answer's head".  pep sends each head
     * before the client sees the first body byte, so c9's mean cannot exceed the mean of
     * the client's first-byte times (a few ms of rounding aside), however long the streams
     * lasted (1.6 s each for the first two). */
    json_t *all = admin_get("/admin/v1/chains");
    json_t *c9 = find_by(json_object_get(all, "chains"), "name", "c9");
    assert_non_null(c9);
    json_t *since = json_object_get(c9, "since_start");
    assert_int_equal(json_integer_value(json_object_get(since, "requests")), 3);
    assert_int_equal(json_integer_value(json_object_get(since, "first_attempt_failed")), 1);
    double mean = json_number_value(json_object_get(since, "mean_ms"));
    double first_mean = (double)(first[0] + first[1] + first[2]) / 3;
    fprintf(stderr, "c9: mean_ms %.1f, mean first byte at the client %.1f ms\n", mean, first_mean);
    assert_true(mean <= first_mean + 5);
    json_decref(all);
}

/* A stream whose upstream falls silent after its first chunk (idle_timeout 300 ms, chunks
 * 1 s apart): the stream ends early and the outcome says stream_aborted. */
static void test_sse_aborted_midway(void **state) {
    (void)state;
    const char *path = "/t9b/chat/completions";
    fault(F.mock.url,
          "{\"kind\":\"sse\",\"chunks\":5,\"chunk_delay_ms\":1000,\"count\":1,\"path\":\"%s\"}",
          path);
    struct sse_client c = {0};
    long status;
    int64_t total;
    CURLcode rc = sse_post(path, CHAT_STREAM, &c, &status, &total);
    fprintf(stderr, "aborted stream: curl %d (%s) after %lld ms, %zu bytes\n", (int)rc,
            curl_easy_strerror(rc), (long long)total, c.len);
    assert_int_equal(status, 200); /* the head was out before the upstream failed */
    assert_true(rc != CURLE_OK);   /* the agent sees the stream cut, not a clean end */
    assert_int_equal(count_of(c.body, "\"chat.completion.chunk\""), 1);
    assert_null(c.body ? strstr(c.body, "[DONE]") : NULL);
    const char *rid = sse_header(&c, "Pep-Request-Id");
    assert_non_null(rid);
    json_t *out = outcome_of(rid);
    expect_outcome(out, "stream_aborted", 200);
    assert_int_equal(attempts_len(out), 1);
    expect_error(out, 0, "u9b", "m9b", "stream_aborted");
    json_decref(out);
    struct prom m;
    prom_scrape(&m);
    assert_true(
        prom_get(&m, "pep_upstream_attempts_total", "upstream=u9b,outcome=stream_aborted") == 1);
    prom_free(&m);
    sse_free(&c);
}

/* ---- SPEC 7 /metrics ------------------------------------------------------------------------ */

static void test_metrics_families_and_counters(void **state) {
    (void)state;
    static const struct {
        const char *name, *type;
    } families[] = {
        {"pep_requests_total", "counter"},
        {"pep_decision_duration_seconds", "histogram"},
        {"pep_upstream_attempts_total", "counter"},
        {"pep_retries_total", "counter"},
        {"pep_fallbacks_total", "counter"},
        {"pep_breaker_state", "gauge"},
        {"pep_breaker_transitions_total", "counter"},
        {"pep_escalations_total", "counter"},
        {"pep_approvals_total", "counter"},
        {"pep_audit_records_total", "counter"},
        {"pep_audit_fsync_duration_seconds", "histogram"},
        {"pep_audit_batch_records", "histogram"},
    };
    struct prom before, after;
    prom_scrape(&before);
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        const char *t = json_string_value(json_object_get(before.types, families[i].name));
        if (!t) fprintf(stderr, "no # TYPE for %s\n", families[i].name);
        assert_non_null(t);
        assert_string_equal(t, families[i].type);
    }
    /* Series that exist from the start for every registered name. */
    assert_true(prom_get(&before, "pep_breaker_state", "upstream=u10a") == 0);
    prom_get(&before, "pep_retries_total", "upstream=u10a");
    prom_get(&before, "pep_escalations_total", "chain=c10");
    prom_get(&before, "pep_approvals_total", "state=pending");
    prom_get(&before, "pep_audit_records_total", NULL);
    prom_get(&before, "pep_decision_duration_seconds_count", NULL);

    /* A known batch on c10 (u10a on mockllm 1, u10b on mockllm 2, 2 attempts per step):
     *   A: u10a 503, 200                      → served by step 0
     *   B: u10a 503, 503; u10b 200            → fallback to step 1
     *   C: u10a 503, 503; u10b 503, 503       → exhausted, escalated */
    const char *path = "/t10/chat/completions";
    struct h_resp r = {0};
    char rids[3][64];
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    request_id_of(&r, rids[0]);
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    request_id_of(&r, rids[1]);
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    fault(MOCK2.url, "{\"kind\":\"status\",\"status\":503,\"count\":2,\"path\":\"%s\"}", path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 503);
    request_id_of(&r, rids[2]);
    h_resp_free(&r);
    for (int i = 0; i < 3; i++)
        json_decref(outcome_of(rids[i]));
    assert_int_equal(mock_hits(F.mock.url, path), 6);
    assert_int_equal(mock_hits(MOCK2.url, path), 3);

    /* pep_audit_records_total counts commits: wait until the batch's records are in. */
    double records_before = prom_get(&before, "pep_audit_records_total", NULL);
    for (int i = 0; i < 100; i++) {
        prom_scrape(&after);
        if (prom_get(&after, "pep_audit_records_total", NULL) - records_before >= 7) break;
        prom_free(&after);
        after.types = after.samples = NULL;
        sleep_ms(50);
    }
    assert_non_null(after.samples);

#define DELTA(name, labels)                                                                        \
    (prom_get_or(&after, name, labels, 0) - prom_get_or(&before, name, labels, 0))
    assert_true(DELTA("pep_upstream_attempts_total", "upstream=u10a,outcome=5xx") == 5);
    assert_true(DELTA("pep_upstream_attempts_total", "upstream=u10a,outcome=2xx") == 1);
    assert_true(DELTA("pep_upstream_attempts_total", "upstream=u10b,outcome=5xx") == 2);
    assert_true(DELTA("pep_upstream_attempts_total", "upstream=u10b,outcome=2xx") == 1);
    assert_true(DELTA("pep_upstream_attempts_total", "upstream=u10a,outcome=timeout") == 0);
    assert_true(DELTA("pep_retries_total", "upstream=u10a") == 3);
    assert_true(DELTA("pep_retries_total", "upstream=u10b") == 1);
    assert_true(DELTA("pep_fallbacks_total", "chain=c10,step=1") == 2);
    assert_true(DELTA("pep_fallbacks_total", "chain=c10,step=0") == 0);
    assert_true(DELTA("pep_escalations_total", "chain=c10") == 1);
    assert_true(DELTA("pep_requests_total", "action=llm.t10,decision=allow,code=ok") == 3);
    assert_true(DELTA("pep_decision_duration_seconds_count", NULL) == 3);
    assert_true(DELTA("pep_audit_records_total", NULL) >= 7); /* 3 decisions, 3 outcomes, 1 esc */
    assert_true(DELTA("pep_audit_batch_records_count", NULL) >= 1);
    assert_true(DELTA("pep_breaker_transitions_total", "upstream=u10a,to=open") == 0);
    assert_true(prom_get(&after, "pep_breaker_state", "upstream=u10a") == 0);
    assert_true(prom_get(&after, "pep_breaker_state", "upstream=u10b") == 0);
#undef DELTA
    prom_free(&before);
    prom_free(&after);
}

/* ---- SPEC 8 GET /admin/v1/chains ------------------------------------------------------------ */

static const char *const INDICATOR_KEYS[] = {"requests",
                                             "first_attempt_failed",
                                             "retry_success_rate",
                                             "fallback_activation_rate",
                                             "escalation_rate",
                                             "mean_ms",
                                             "p95_ms"};

/* Every chain has exactly SPEC 8's shape; returns c11's entry (new reference). */
static json_t *chains_c11(void) {
    json_t *all = admin_get("/admin/v1/chains");
    assert_int_equal(json_object_size(all), 1);
    json_t *chains = json_object_get(all, "chains");
    assert_true(json_is_array(chains));
    static const char *const chain_keys[] = {"name", "since_start", "last_hour", "objectives"};
    static const char *const objective_keys[] = {"indicator", "target", "value", "met"};
    size_t i, j;
    json_t *c, *o;
    json_array_foreach(chains, i, c) {
        assert_true(has_exactly_keys(c, chain_keys, 4));
        assert_true(has_exactly_keys(json_object_get(c, "since_start"), INDICATOR_KEYS, 7));
        assert_true(has_exactly_keys(json_object_get(c, "last_hour"), INDICATOR_KEYS, 7));
        assert_true(json_is_array(json_object_get(c, "objectives")));
        json_array_foreach(json_object_get(c, "objectives"), j, o) {
            assert_true(has_exactly_keys(o, objective_keys, 4));
        }
    }
    assert_non_null(find_by(chains, "name", "c1"));
    json_t *mine = find_by(chains, "name", "c11");
    assert_non_null(mine);
    json_incref(mine);
    json_decref(all);
    return mine;
}

static json_t *objective(json_t *chain, const char *indicator) {
    json_t *o = find_by(json_object_get(chain, "objectives"), "indicator", indicator);
    assert_non_null(o);
    return o;
}

static double num(const json_t *v) {
    assert_true(json_is_number(v));
    return json_number_value(v);
}

static void test_chains_indicators(void **state) {
    (void)state;
    const char *path = "/t11/chat/completions";
    json_t *c = chains_c11();
    /* Before any request: counts 0, every rate and latency null, objectives unjudged. */
    for (int h = 0; h < 2; h++) {
        json_t *ind = json_object_get(c, h ? "last_hour" : "since_start");
        assert_int_equal(json_integer_value(json_object_get(ind, "requests")), 0);
        assert_true(json_is_integer(json_object_get(ind, "requests")));
        assert_int_equal(json_integer_value(json_object_get(ind, "first_attempt_failed")), 0);
        for (size_t k = 2; k < 7; k++)
            assert_true(json_is_null(json_object_get(ind, INDICATOR_KEYS[k])));
    }
    assert_int_equal(json_array_size(json_object_get(c, "objectives")), 4);
    size_t i;
    json_t *o;
    json_array_foreach(json_object_get(c, "objectives"), i, o) {
        assert_true(json_is_number(json_object_get(o, "target")));
        assert_true(json_is_null(json_object_get(o, "value")));
        assert_true(json_is_null(json_object_get(o, "met")));
    }
    assert_true(num(json_object_get(objective(c, "retry_success_rate"), "target")) == 0.9);
    assert_true(num(json_object_get(objective(c, "mean_latency"), "target")) == 5000);
    json_decref(c);

    /* One request served at once: retry_success_rate still has no denominator. */
    struct h_resp r = {0};
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    c = chains_c11();
    json_t *hour = json_object_get(c, "last_hour");
    assert_int_equal(json_integer_value(json_object_get(hour, "requests")), 1);
    assert_int_equal(json_integer_value(json_object_get(hour, "first_attempt_failed")), 0);
    assert_true(json_is_null(json_object_get(hour, "retry_success_rate")));
    assert_true(num(json_object_get(hour, "fallback_activation_rate")) == 0);
    assert_true(num(json_object_get(hour, "escalation_rate")) == 0);
    assert_true(num(json_object_get(hour, "mean_ms")) >= 0);
    assert_true(json_is_null(json_object_get(objective(c, "retry_success_rate"), "value")));
    assert_true(json_is_null(json_object_get(objective(c, "retry_success_rate"), "met")));
    json_decref(c);

    /* A first attempt that fails (503) and a retry that serves: retry_success_rate 1. */
    fault(F.mock.url, "{\"kind\":\"status\",\"status\":503,\"count\":1,\"path\":\"%s\"}", path);
    assert_int_equal(post(path, CHAT, NULL, 0, &r, NULL), 200);
    expect_header(&r, "Pep-Attempts", "2");
    h_resp_free(&r);
    c = chains_c11();
    for (int h = 0; h < 2; h++) {
        json_t *ind = json_object_get(c, h ? "last_hour" : "since_start");
        assert_int_equal(json_integer_value(json_object_get(ind, "requests")), 2);
        assert_int_equal(json_integer_value(json_object_get(ind, "first_attempt_failed")), 1);
        assert_true(num(json_object_get(ind, "retry_success_rate")) == 1.0);
        assert_true(num(json_object_get(ind, "fallback_activation_rate")) == 0);
        assert_true(num(json_object_get(ind, "escalation_rate")) == 0);
        assert_true(num(json_object_get(ind, "mean_ms")) >= 0);
        assert_true(num(json_object_get(ind, "p95_ms")) >= 20); /* the 20 ms backoff */
    }
    hour = json_object_get(c, "last_hour");
    o = objective(c, "retry_success_rate");
    assert_true(num(json_object_get(o, "value")) == 1.0);
    assert_true(json_is_true(json_object_get(o, "met")));
    o = objective(c, "fallback_activation_rate");
    assert_true(num(json_object_get(o, "value")) == 0);
    assert_true(json_is_true(json_object_get(o, "met")));
    o = objective(c, "escalation_rate");
    assert_true(num(json_object_get(o, "value")) == 0);
    assert_true(json_is_true(json_object_get(o, "met")));
    o = objective(c, "mean_latency");
    assert_true(num(json_object_get(o, "value")) == num(json_object_get(hour, "mean_ms")));
    assert_true(json_is_boolean(json_object_get(o, "met")));
    assert_true(json_is_true(json_object_get(o, "met")) ==
                (num(json_object_get(hour, "mean_ms")) <= 5000));
    json_decref(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retry_on_503_then_success),
        cmocka_unit_test(test_fallback_rewrites_model),
        cmocka_unit_test(test_auth_failure_and_passthrough),
        cmocka_unit_test(test_context_overflow_jumps),
        cmocka_unit_test(test_retry_after_honoured),
        cmocka_unit_test(test_deadline_exceeded),
        cmocka_unit_test(test_breaker_opens_probes_and_closes),
        cmocka_unit_test(test_outage_escalates),
        cmocka_unit_test(test_all_breakers_open_retry_after),
        cmocka_unit_test(test_escalate_after_attempts_once),
        cmocka_unit_test(test_sse_streams_incrementally),
        cmocka_unit_test(test_sse_aborted_midway),
        cmocka_unit_test(test_metrics_families_and_counters),
        cmocka_unit_test(test_chains_indicators),
    };
    return cmocka_run_group_tests_name("resilience", tests, group_setup, group_teardown);
}
