/*
 * test_policy.c — the policy compiler (pep/policy.c, pep/yamltree.c).
 *
 * What must hold: the shipped policies compile (example.yaml and every scenario, as-is); a rich
 * policy compiles to exactly the values written, references resolved to the right pointers and
 * defaults filled; every kind of error is reported as the exact "FILE:LINE:COL: message", all of
 * them, in file order; hostile YAML (alias bombs, deep nesting, huge files, many nodes) is refused
 * by the caps; a path that is not a regular file (a FIFO, a directory, a device) is refused without
 * waiting.  Every test also runs under ASan in `make test`, so error paths must not leak either.
 *
 * Runs from the repository root (policies/ paths are relative).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "pep/policy.h"
#include "pep/route.h"

#define NAME "t.yaml"

static const char *const scenario_files[] = {
    "policies/scenarios/customer-service.yaml",
    "policies/scenarios/finance-refunds.yaml",
    "policies/scenarios/industrial-control.yaml",
    "policies/scenarios/healthcare-records.yaml",
};

/* Loads yaml (NUL-terminated) and expects success. */
static struct policy *load_ok(const char *yaml) {
    struct policy *p = NULL;
    struct policy_errors errs;
    int rc = policy_load_buffer(NAME, yaml, strlen(yaml), &p, &errs);
    for (size_t i = 0; i < errs.len; i++)
        print_error("unexpected: %s\n", errs.items[i]);
    assert_int_equal(rc, 0);
    assert_int_equal(errs.len, 0);
    policy_errors_free(&errs);
    assert_non_null(p);
    return p;
}

/* Loads len bytes and expects exactly the errors expected[0..n), in this order. */
static void expect_errors_n(const char *data, size_t len, const char *const *expected, size_t n) {
    struct policy *p = (struct policy *)1;
    struct policy_errors errs;
    int rc = policy_load_buffer(NAME, data, len, &p, &errs);
    bool same = errs.len == n;
    for (size_t i = 0; same && i < n; i++)
        same = strcmp(errs.items[i], expected[i]) == 0;
    if (!same) {
        for (size_t i = 0; i < errs.len; i++)
            print_error("got:      %s\n", errs.items[i]);
        for (size_t i = 0; i < n; i++)
            print_error("expected: %s\n", expected[i]);
    }
    assert_int_equal(rc, PEP_EINVAL);
    assert_null(p);
    assert_true(same);
    policy_errors_free(&errs);
}

/* The same for a NUL-terminated yaml. */
static void expect_errors(const char *yaml, const char *const *expected, size_t n) {
    expect_errors_n(yaml, strlen(yaml), expected, n);
}

static void expect_error(const char *yaml, const char *expected) {
    expect_errors(yaml, &expected, 1);
}

#define ERRS(list) (list), (sizeof(list) / sizeof *(list))

/* ---- shipped policies ---------------------------------------------------------------- */

static void test_example_compiles(void **state) {
    (void)state;
    struct policy *p = NULL;
    struct policy_errors errs;
    int rc = policy_load("policies/example.yaml", &p, &errs);
    for (size_t i = 0; i < errs.len; i++)
        print_error("%s\n", errs.items[i]);
    assert_int_equal(rc, 0);
    assert_int_equal(errs.len, 0);
    policy_errors_free(&errs);

    assert_string_equal(p->file, "policies/example.yaml");
    assert_int_equal(strlen(p->policy_hash), 64);
    assert_string_equal(p->listen, "127.0.0.1:8080");
    assert_string_equal(p->admin_listen, "127.0.0.1:8081");
    assert_string_equal(p->data_dir, "./var");

    assert_int_equal(p->agents_len, 1);
    assert_string_equal(p->agents[0].id, "demo-bot");
    assert_string_equal(p->agents[0].owner, "demo@example.test");
    assert_int_equal(p->agents[0].tenants_len, 1);
    assert_string_equal(p->agents[0].tenants[0], "acme");
    assert_int_equal(p->agents[0].scopes_len, 6);
    assert_string_equal(p->agents[0].scopes[0], "llm.chat");
    assert_string_equal(p->agents[0].scopes[1], "tool.search");
    assert_true(p->agents[0].enabled);

    assert_int_equal(p->upstreams_len, 2);
    struct upstream *mock = policy_find_upstream(p, "mock");
    assert_ptr_equal(mock, &p->upstreams[0]);
    assert_string_equal(mock->base_url, "http://127.0.0.1:9099");
    assert_string_equal(mock->api_key_env, "MOCK_API_KEY");

    assert_int_equal(p->routes_len, 6);
    assert_string_equal(p->routes[0].method, "POST");
    assert_string_equal(p->routes[0].path, "/v1/chat/completions");
    assert_ptr_equal(p->routes[0].action, policy_find_action(p, "llm.chat"));
    assert_null(p->routes[0].upstream);
    assert_ptr_equal(p->routes[0].chain, policy_find_chain(p, "chat"));
    assert_true(p->routes[0].retry_safe);
    assert_null(p->routes[0].forward_path);
    assert_int_equal(p->routes[0].tenant_param, -1);
    assert_string_equal(p->routes[1].method, "GET");
    assert_ptr_equal(p->routes[1].action, policy_find_action(p, "tool.search"));
    assert_ptr_equal(p->routes[1].upstream, mock);
    assert_string_equal(p->routes[1].forward_path, "/search");
    assert_int_equal(p->routes[1].tenant_param, 2);
    assert_int_equal(p->chains_len, 1);
    assert_int_equal(p->chains[0].steps_len, 2);
    assert_ptr_equal(p->chains[0].steps[0].upstream, mock);
    assert_string_equal(p->chains[0].steps[1].model, "gpt-4o");
    assert_true(mock->breaker.present);

    assert_int_equal(p->actions_len, 6);
    assert_string_equal(policy_find_action(p, "llm.chat")->scope, "llm.chat");
    assert_string_equal(policy_find_action(p, "tool.search")->scope, "tool.search");
    /* the example shows each control (issue 14 part 8) */
    const struct action *refund = policy_find_action(p, "refund.issue");
    assert_int_equal(refund->controls_len, 2);
    assert_int_equal(refund->controls[0].kind, CONTROL_DENY);
    assert_int_equal(refund->controls[1].kind, CONTROL_REQUIRE_APPROVAL);
    assert_true(refund->controls[1].distinct_from_owner);
    assert_true(refund->reads_body);
    const struct action *export = policy_find_action(p, "user.export");
    assert_int_equal(export->controls[0].kind, CONTROL_STEP_UP);
    assert_string_equal(export->controls[0].acr, "mfa");
    assert_int_equal(export->controls[0].max_age_ms, 300000);
    assert_false(export->reads_body);
    const struct action *report = policy_find_action(p, "report.run");
    assert_int_equal(report->rate_limits_len, 1);
    assert_int_equal(report->rate_limits[0].limit, 5);
    assert_int_equal(report->rate_limits[0].window_ms, 60000);
    policy_release(p);
}

static void test_scenarios_compile(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof scenario_files / sizeof *scenario_files; i++) {
        struct policy *p = NULL;
        struct policy_errors errs;
        int rc = policy_load(scenario_files[i], &p, &errs);
        for (size_t j = 0; j < errs.len; j++)
            print_error("%s\n", errs.items[j]);
        assert_int_equal(rc, 0);
        policy_errors_free(&errs);
        assert_true(p->chains_len >= 1);
        assert_true(p->routes_len >= 4);
        policy_release(p);
    }
}

static void test_load_missing_file(void **state) {
    (void)state;
    struct policy *p = (struct policy *)1;
    struct policy_errors errs;
    int rc = policy_load("policies/does-not-exist.yaml", &p, &errs);
    assert_int_equal(rc, PEP_EIO);
    assert_null(p);
    assert_int_equal(errs.len, 1);
    assert_string_equal(errs.items[0],
                        "policies/does-not-exist.yaml:1:1: cannot read: No such file or directory");
    policy_errors_free(&errs);
}

/* Loads path and expects exactly "PATH:1:1: cannot read: not a regular file". */
static void expect_not_regular(const char *path) {
    struct policy *p = (struct policy *)1;
    struct policy_errors errs;
    int rc = policy_load(path, &p, &errs);
    assert_int_equal(rc, PEP_EIO);
    assert_null(p);
    assert_int_equal(errs.len, 1);
    char want[512];
    snprintf(want, sizeof want, "%s:1:1: cannot read: not a regular file", path);
    assert_string_equal(errs.items[0], want);
    policy_errors_free(&errs);
}

/* Only a regular file is read, and nothing waits: a FIFO nobody writes to (which used to
 * hold `pep check`, `pep serve` and a SIGHUP reload forever), a directory and a device are
 * refused at once; a symlink to a regular file is followed. */
static void test_load_not_a_regular_file(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-test-policy-XXXXXX", fifo[64], link[64], target[4096];
    assert_non_null(mkdtemp(dir));
    snprintf(fifo, sizeof fifo, "%s/fifo.yaml", dir);
    snprintf(link, sizeof link, "%s/link.yaml", dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_non_null(realpath("policies/example.yaml", target));
    assert_int_equal(symlink(target, link), 0);

    /* Were the FIFO opened blocking, open() would never return: SIGALRM (its default action
     * ends the process) turns that hang into a failure. */
    alarm(30);
    expect_not_regular(fifo);
    alarm(0);
    expect_not_regular(dir);
    expect_not_regular("/dev/null");

    struct policy *p = NULL;
    struct policy_errors errs;
    assert_int_equal(policy_load(link, &p, &errs), 0);
    assert_int_equal(errs.len, 0);
    assert_string_equal(p->agents[0].id, "demo-bot");
    policy_errors_free(&errs);
    policy_release(p);

    unlink(link);
    unlink(fifo);
    rmdir(dir);
}

/* ---- a rich valid policy ------------------------------------------------------------- */

static const char rich_policy[] =
    "version: 1\n"
    "server:\n"
    "  listen: 0.0.0.0:9000\n"
    "  admin_listen: '[::1]:9001'\n"
    "  data_dir: /tmp/pepdata\n"
    "  max_body: 2MiB\n"
    "  drain_timeout: 250ms\n"
    "audit: { durability: normal, on_failure: allow, checkpoint_every: 10 }\n"
    "identity: { issuer: me, token_ttl: 1h, max_token_ttl: 2h, clock_skew: 5s }\n"
    "agents:\n"
    "  - id: billing-bot\n"
    "    owner: alice@acme.example\n"
    "    tenants: [acme, globex]\n"
    "    scopes: [llm.chat, refund.issue, 'tool.*']\n"
    "  - { id: off-bot, tenants: [acme], scopes: [], enabled: false }\n"
    "upstreams:\n"
    "  openai:\n"
    "    base_url: https://api.openai.com//\n"
    "    api_key_env: OPENAI_API_KEY\n"
    "    timeout: 45s\n"
    "    idle_timeout: 10s\n"
    "    breaker:\n"
    "      failure_threshold: 7\n"
    "      failure_rate: 0.25\n"
    "      min_requests: 3\n"
    "      window: 1m\n"
    "      open_for: 2m\n"
    "      half_open_probes: 2\n"
    "      success_threshold: 4\n"
    "      count_429: true\n"
    "  backup:\n"
    "    base_url: http://127.0.0.1:9002/v1\n"
    "    headers: { x-api-key: { env: BACKUP_KEY }, X-Client: pep }\n"
    "chains:\n"
    "  chat:\n"
    "    retry:\n"
    "      on: [429, 503, timeout]\n"
    "      max_attempts: 3\n"
    "      base: 2s\n"
    "      max: 30s\n"
    "      jitter: equal\n"
    "      respect_retry_after: false\n"
    "    steps:\n"
    "      - { upstream: openai, model: gpt-4-turbo }\n"
    "      - { upstream: backup }\n"
    "    context_overflow:\n"
    "      match: { status: 400, body_contains: [context_length_exceeded, too long] }\n"
    "      step: { upstream: openai, model: gpt-4-128k }\n"
    "    deadline: 2m\n"
    "    escalate: { webhook: 'http://127.0.0.1:9000/esc/', after_attempts: 3 }\n"
    "  plain:\n"
    "    steps: [ { upstream: backup } ]\n"
    "routes:\n"
    "  - match: { method: post, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "    forward: { chain: chat, retry_safe: true }\n"
    "  - match: { method: POST, path: '/v1/tenants/{tenant}/refunds/{id}' }\n"
    "    action: refund.issue\n"
    "    forward:\n"
    "      upstream: backup\n"
    "      path: /refunds\n"
    "      retry: { on: [502], max_attempts: 2 }\n"
    "  - match: { path: / }\n"
    "    action: llm.chat\n"
    "actions:\n"
    "  llm.chat:\n"
    "    scope: llm.chat\n"
    "    rate_limits:\n"
    "      - { key: agent, limit: 600, window: 1m }\n"
    "      - { key: global, limit: 10000, window: 1h }\n"
    "  refund.issue:\n"
    "    scope: refund.issue\n"
    "    rate_limits: [ { key: tenant, limit: 1, window: 1m } ]\n"
    "    controls:\n"
    "      - when: { body.currency: { not_in: [USD, EUR] } }\n"
    "        deny: currency not supported\n"
    "      - when:\n"
    "          body.order.amount: { gt: 1000, le: 1.5e6 }\n"
    "          header.X-Reason: { exists: true }\n"
    "          any:\n"
    "            - { time.hour: { lt: 8 } }\n"
    "            - { tenant: { in: [acme, 42, null, true] }, query.q: { prefix: 555 } }\n"
    "        require_approval: { approvers: [approver, admin], ttl: 30m,"
    " distinct_from_owner: true }\n"
    "      - when: { path.id: { eq: '10' }, method: { ne: GET }, agent.id: { eq: 10 } }\n"
    "        step_up: { acr: mfa, max_age: 5m }\n"
    "      - when: { agent.owner: { eq: null }, time.weekday: { ge: 6 } }\n"
    "        deny: no weekend work\n";

static void test_rich_policy_fields(void **state) {
    (void)state;
    struct policy *p = load_ok(rich_policy);

    /* server, audit, identity */
    assert_string_equal(p->listen, "0.0.0.0:9000");
    assert_string_equal(p->admin_listen, "[::1]:9001");
    assert_string_equal(p->data_dir, "/tmp/pepdata");
    assert_int_equal(p->max_body, 2 * 1024 * 1024);
    assert_int_equal(p->drain_timeout_ms, 250);
    assert_int_equal(p->durability, AUDIT_DURABILITY_NORMAL);
    assert_int_equal(p->on_failure, AUDIT_ON_FAILURE_ALLOW);
    assert_int_equal(p->checkpoint_every, 10);
    assert_string_equal(p->issuer, "me");
    assert_int_equal(p->token_ttl_ms, 3600000);
    assert_int_equal(p->max_token_ttl_ms, 7200000);
    assert_int_equal(p->clock_skew_ms, 5000);

    /* agents */
    assert_int_equal(p->agents_len, 2);
    struct policy_agent *bb = policy_find_agent(p, "billing-bot");
    assert_ptr_equal(bb, &p->agents[0]);
    assert_int_equal(bb->tenants_len, 2);
    assert_string_equal(bb->tenants[1], "globex");
    assert_int_equal(bb->scopes_len, 3);
    assert_string_equal(bb->scopes[2], "tool.*");
    assert_int_equal(bb->loc.line, 11);
    assert_int_equal(bb->loc.col, 5);
    assert_false(p->agents[1].enabled);
    assert_null(p->agents[1].owner);
    assert_int_equal(p->agents[1].scopes_len, 0);

    /* upstreams */
    assert_int_equal(p->upstreams_len, 2);
    struct upstream *openai = policy_find_upstream(p, "openai");
    struct upstream *backup = policy_find_upstream(p, "backup");
    assert_ptr_equal(openai, &p->upstreams[0]);
    assert_ptr_equal(backup, &p->upstreams[1]);
    assert_string_equal(openai->base_url, "https://api.openai.com");
    assert_int_equal(openai->timeout_ms, 45000);
    assert_int_equal(openai->idle_timeout_ms, 10000);
    assert_true(openai->breaker.present);
    assert_int_equal(openai->breaker.failure_threshold, 7);
    assert_true(openai->breaker.failure_rate == 0.25);
    assert_int_equal(openai->breaker.min_requests, 3);
    assert_int_equal(openai->breaker.window_ms, 60000);
    assert_int_equal(openai->breaker.open_for_ms, 120000);
    assert_int_equal(openai->breaker.half_open_probes, 2);
    assert_int_equal(openai->breaker.success_threshold, 4);
    assert_true(openai->breaker.count_429);
    assert_string_equal(backup->base_url, "http://127.0.0.1:9002/v1");
    assert_null(backup->api_key_env);
    assert_int_equal(backup->timeout_ms, 30000);
    assert_int_equal(backup->idle_timeout_ms, 0);
    assert_false(backup->breaker.present);
    assert_int_equal(backup->breaker.failure_threshold, 5);
    assert_true(backup->breaker.failure_rate == 0.5);
    assert_int_equal(backup->breaker.min_requests, 10);
    assert_int_equal(backup->breaker.window_ms, 30000);
    assert_int_equal(backup->breaker.open_for_ms, 60000);
    assert_int_equal(backup->breaker.half_open_probes, 1);
    assert_int_equal(backup->breaker.success_threshold, 2);
    assert_false(backup->breaker.count_429);
    assert_int_equal(backup->headers_len, 2);
    assert_string_equal(backup->headers[0].name, "x-api-key");
    assert_string_equal(backup->headers[0].env, "BACKUP_KEY");
    assert_null(backup->headers[0].value);
    assert_string_equal(backup->headers[1].name, "X-Client");
    assert_null(backup->headers[1].env);
    assert_string_equal(backup->headers[1].value, "pep");

    /* chains */
    assert_int_equal(p->chains_len, 2);
    struct chain *chat = policy_find_chain(p, "chat");
    assert_ptr_equal(chat, &p->chains[0]);
    assert_true(chat->retry.present);
    assert_int_equal(chat->retry.on_status_len, 2);
    assert_int_equal(chat->retry.on_status[0], 429);
    assert_int_equal(chat->retry.on_status[1], 503);
    assert_true(chat->retry.on_timeout);
    assert_false(chat->retry.on_connect_error);
    assert_int_equal(chat->retry.max_attempts, 3);
    assert_int_equal(chat->retry.base_ms, 2000);
    assert_int_equal(chat->retry.max_ms, 30000);
    assert_int_equal(chat->retry.jitter, RETRY_JITTER_EQUAL);
    assert_false(chat->retry.respect_retry_after);
    assert_int_equal(chat->steps_len, 2);
    assert_ptr_equal(chat->steps[0].upstream, openai);
    assert_string_equal(chat->steps[0].model, "gpt-4-turbo");
    assert_ptr_equal(chat->steps[1].upstream, backup);
    assert_null(chat->steps[1].model);
    assert_true(chat->has_context_overflow);
    assert_int_equal(chat->context_overflow_status, 400);
    assert_int_equal(chat->context_overflow_body_contains_len, 2);
    assert_string_equal(chat->context_overflow_body_contains[1], "too long");
    assert_ptr_equal(chat->context_overflow_step.upstream, openai);
    assert_string_equal(chat->context_overflow_step.model, "gpt-4-128k");
    assert_int_equal(chat->deadline_ms, 120000);
    assert_string_equal(chat->escalate_webhook, "http://127.0.0.1:9000/esc");
    assert_int_equal(chat->escalate_after_attempts, 3);
    struct chain *plain = policy_find_chain(p, "plain");
    assert_false(plain->retry.present);
    assert_int_equal(plain->retry.max_attempts, 1);
    assert_int_equal(plain->retry.base_ms, 1000);
    assert_int_equal(plain->retry.max_ms, 60000);
    assert_int_equal(plain->retry.jitter, RETRY_JITTER_FULL);
    assert_true(plain->retry.respect_retry_after);
    assert_int_equal(plain->retry.on_status_len, 5);
    assert_true(plain->retry.on_timeout && plain->retry.on_connect_error);
    assert_false(plain->has_context_overflow);
    assert_int_equal(plain->deadline_ms, 0);
    assert_null(plain->escalate_webhook);

    /* routes */
    assert_int_equal(p->routes_len, 3);
    struct action *chat_action = policy_find_action(p, "llm.chat");
    struct action *refund = policy_find_action(p, "refund.issue");
    struct route *r0 = &p->routes[0], *r1 = &p->routes[1], *r2 = &p->routes[2];
    assert_string_equal(r0->method, "POST");
    assert_ptr_equal(r0->action, chat_action);
    assert_true(r0->forwards);
    assert_ptr_equal(r0->chain, chat);
    assert_null(r0->upstream);
    assert_true(r0->retry_safe);
    assert_int_equal(r0->segments_len, 3);
    assert_string_equal(r0->segments[2].literal, "completions");
    assert_int_equal(r0->loc.line, 54);
    assert_ptr_equal(r1->action, refund);
    assert_ptr_equal(r1->upstream, backup);
    assert_null(r1->chain);
    assert_false(r1->retry_safe);
    assert_string_equal(r1->forward_path, "/refunds");
    assert_string_equal(r1->path, "/v1/tenants/{tenant}/refunds/{id}");
    assert_int_equal(r1->segments_len, 5);
    assert_null(r1->segments[2].literal);
    assert_string_equal(r1->segments[2].param, "tenant");
    assert_string_equal(r1->segments[4].param, "id");
    assert_int_equal(r1->tenant_param, 2);
    assert_true(r1->retry.present);
    assert_int_equal(r1->retry.on_status_len, 1);
    assert_int_equal(r1->retry.on_status[0], 502);
    assert_false(r1->retry.on_timeout);
    assert_int_equal(r1->retry.max_attempts, 2);
    assert_null(r2->method);
    assert_int_equal(r2->segments_len, 0);
    assert_false(r2->forwards);
    assert_false(r2->retry.present);
    assert_int_equal(r2->retry.max_attempts, 1);

    /* actions: rate limits */
    assert_int_equal(chat_action->rate_limits_len, 2);
    assert_int_equal(chat_action->rate_limits[0].key, RATELIMIT_KEY_AGENT);
    assert_int_equal(chat_action->rate_limits[0].limit, 600);
    assert_int_equal(chat_action->rate_limits[0].window_ms, 60000);
    assert_int_equal(chat_action->rate_limits[1].key, RATELIMIT_KEY_GLOBAL);
    assert_int_equal(chat_action->rate_limits[1].window_ms, 3600000);
    assert_false(chat_action->reads_body);
    assert_int_equal(chat_action->controls_len, 0);
    assert_int_equal(refund->rate_limits_len, 1);
    assert_int_equal(refund->rate_limits[0].key, RATELIMIT_KEY_TENANT);
    assert_true(refund->reads_body);
    assert_int_equal(refund->controls_len, 4);

    /* control 0: deny with not_in */
    struct control *c0 = &refund->controls[0];
    assert_int_equal(c0->kind, CONTROL_DENY);
    assert_string_equal(c0->deny_reason, "currency not supported");
    assert_true(c0->when->reads_body);
    assert_int_equal(c0->when->tests_len, 1);
    assert_int_equal(c0->when->any_len, 0);
    struct cond_test *t = &c0->when->tests[0];
    assert_int_equal(t->kind, COND_FIELD_BODY);
    assert_int_equal(t->path_len, 1);
    assert_string_equal(t->path[0], "currency");
    assert_int_equal(t->op, COND_OP_NOT_IN);
    assert_true(json_is_array(t->value));
    assert_int_equal(json_array_size(t->value), 2);
    assert_string_equal(json_string_value(json_array_get(t->value, 1)), "EUR");

    /* control 1: approval; a field with two ops, a header, an any */
    struct control *c1 = &refund->controls[1];
    assert_int_equal(c1->kind, CONTROL_REQUIRE_APPROVAL);
    assert_int_equal(c1->approvers_len, 2);
    assert_string_equal(c1->approvers[1], "admin");
    assert_int_equal(c1->approval_ttl_ms, 1800000);
    assert_true(c1->distinct_from_owner);
    struct cond *w = c1->when;
    assert_int_equal(w->tests_len, 3);
    assert_int_equal(w->tests[0].kind, COND_FIELD_BODY);
    assert_int_equal(w->tests[0].path_len, 2);
    assert_string_equal(w->tests[0].path[0], "order");
    assert_string_equal(w->tests[0].path[1], "amount");
    assert_int_equal(w->tests[0].op, COND_OP_GT);
    assert_true(json_is_integer(w->tests[0].value));
    assert_int_equal(json_integer_value(w->tests[0].value), 1000);
    assert_int_equal(w->tests[0].loc.line, 78);
    assert_int_equal(w->tests[0].loc.col, 11);
    assert_int_equal(w->tests[1].op, COND_OP_LE);
    assert_true(json_is_real(w->tests[1].value));
    assert_true(json_real_value(w->tests[1].value) == 1.5e6);
    assert_string_equal(w->tests[1].path[1], "amount");
    assert_int_equal(w->tests[2].kind, COND_FIELD_HEADER);
    assert_string_equal(w->tests[2].name, "x-reason");
    assert_int_equal(w->tests[2].op, COND_OP_EXISTS);
    assert_true(json_is_true(w->tests[2].value));
    assert_int_equal(w->any_len, 2);
    assert_false(w->any[0].reads_body);
    assert_int_equal(w->any[0].tests_len, 1);
    assert_int_equal(w->any[0].tests[0].kind, COND_FIELD_TIME_HOUR);
    assert_int_equal(w->any[0].tests[0].op, COND_OP_LT);
    assert_int_equal(json_integer_value(w->any[0].tests[0].value), 8);
    assert_int_equal(w->any[1].tests_len, 2);
    struct cond_test *in = &w->any[1].tests[0];
    assert_int_equal(in->kind, COND_FIELD_TENANT);
    assert_int_equal(in->op, COND_OP_IN);
    assert_int_equal(json_array_size(in->value), 4);
    assert_string_equal(json_string_value(json_array_get(in->value, 0)), "acme");
    assert_int_equal(json_integer_value(json_array_get(in->value, 1)), 42);
    assert_true(json_is_null(json_array_get(in->value, 2)));
    assert_true(json_is_true(json_array_get(in->value, 3)));
    struct cond_test *prefix = &w->any[1].tests[1];
    assert_int_equal(prefix->kind, COND_FIELD_QUERY);
    assert_string_equal(prefix->name, "q");
    assert_int_equal(prefix->op, COND_OP_PREFIX);
    assert_string_equal(json_string_value(prefix->value), "555");

    /* control 2: step-up; quoted vs plain scalars */
    struct control *c2 = &refund->controls[2];
    assert_int_equal(c2->kind, CONTROL_STEP_UP);
    assert_string_equal(c2->acr, "mfa");
    assert_int_equal(c2->max_age_ms, 300000);
    assert_false(c2->when->reads_body);
    assert_int_equal(c2->when->tests_len, 3);
    assert_int_equal(c2->when->tests[0].kind, COND_FIELD_PATH);
    assert_string_equal(c2->when->tests[0].name, "id");
    assert_true(json_is_string(c2->when->tests[0].value)); /* '10' is quoted */
    assert_string_equal(json_string_value(c2->when->tests[0].value), "10");
    assert_int_equal(c2->when->tests[1].kind, COND_FIELD_METHOD);
    assert_int_equal(c2->when->tests[1].op, COND_OP_NE);
    assert_int_equal(c2->when->tests[2].kind, COND_FIELD_AGENT_ID);
    assert_true(json_is_integer(c2->when->tests[2].value)); /* 10 is plain */

    /* control 3 */
    struct control *c3 = &refund->controls[3];
    assert_int_equal(c3->when->tests[0].kind, COND_FIELD_AGENT_OWNER);
    assert_true(json_is_null(c3->when->tests[0].value));
    assert_int_equal(c3->when->tests[1].kind, COND_FIELD_TIME_WEEKDAY);
    assert_int_equal(c3->when->tests[1].op, COND_OP_GE);

    policy_release(p);
}

static void test_defaults(void **state) {
    (void)state;
    struct policy *p = load_ok("version: 1\n");
    assert_string_equal(p->file, NAME);
    assert_string_equal(p->listen, "127.0.0.1:8080");
    assert_string_equal(p->admin_listen, "127.0.0.1:8081");
    assert_string_equal(p->data_dir, "./var");
    assert_int_equal(p->max_body, 1048576);
    assert_int_equal(p->drain_timeout_ms, 10000);
    assert_int_equal(p->receive_timeout_ms, 30000);
    assert_int_equal(p->unauthenticated_limit.limit, 0); /* off */
    assert_int_equal(p->durability, AUDIT_DURABILITY_FULL);
    assert_int_equal(p->on_failure, AUDIT_ON_FAILURE_DENY);
    assert_int_equal(p->checkpoint_every, 1000);
    assert_string_equal(p->issuer, "pep");
    assert_int_equal(p->token_ttl_ms, 86400000);
    assert_int_equal(p->max_token_ttl_ms, 604800000);
    assert_int_equal(p->clock_skew_ms, 30000);
    assert_int_equal(
        p->agents_len + p->upstreams_len + p->chains_len + p->routes_len + p->actions_len, 0);
    /* hex SHA-256 of the 11 bytes "version: 1\n" */
    assert_string_equal(p->policy_hash,
                        "09bfcc6a14b83e2192b8673677725c84883ee9cd0c70e45c9ec09daa8f2b2847");
    policy_release(p);
}

static void test_refcount(void **state) {
    (void)state;
    struct policy *p = load_ok("version: 1\n");
    assert_int_equal(p->refcount, 1);
    assert_ptr_equal(policy_retain(p), p);
    assert_int_equal(p->refcount, 2);
    policy_release(p);
    assert_int_equal(p->refcount, 1);
    policy_release(p); /* freed: ASan would report a leak otherwise */
    policy_release(NULL);
}

static void test_empty_sections_and_null_sections(void **state) {
    (void)state;
    struct policy *p = load_ok("version: 1\nagents:\nroutes: []\nactions: {}\n");
    assert_int_equal(p->agents_len, 0);
    assert_int_equal(p->routes_len, 0);
    assert_int_equal(p->actions_len, 0);
    policy_release(p);
}

/* ---- one test per error kind ---------------------------------------------------------- */

static void test_error_unknown_key(void **state) {
    (void)state;
    expect_error("version: 1\nserver:\n  listn: 127.0.0.1:1\n",
                 NAME ":3:3: unknown key 'listn'; did you mean 'listen'?");
    expect_error("version: 1\nfrobnicate: 1\n", NAME ":2:1: unknown key 'frobnicate'");
    expect_error("version: 1\nactions:\n  a: { scope: s, rate_limit: [] }\n",
                 NAME ":3:18: unknown key 'rate_limit'; did you mean 'rate_limits'?");
}

static void test_error_wrong_type(void **state) {
    (void)state;
    const char *const errs[] = {
        NAME ":2:9: expected a sequence, got a mapping",
        NAME ":3:9: expected a mapping, got a string",
        NAME ":4:8: expected a mapping, got a sequence",
        NAME ":5:21: expected a string, got a sequence",
    };
    expect_errors("version: 1\n"
                  "agents: {}\n"
                  "server: fast\n"
                  "audit: [1]\n"
                  "identity: { issuer: [x] }\n",
                  ERRS(errs));
    expect_error("version: 1\naudit: { checkpoint_every: '5' }\n",
                 NAME ":2:28: expected an integer, got a string");
    /* YAML 1.2: `yes` is a string, not a boolean. */
    expect_error("version: 1\nagents: [ { id: a, tenants: [t], scopes: [], enabled: yes } ]\n",
                 NAME ":2:55: expected a boolean (true or false), got a string");
}

static void test_error_bad_duration(void **state) {
    (void)state;
    expect_error("version: 1\nidentity:\n  clock_skew: 30 s\n",
                 NAME ":3:15: bad duration '30 s': expected a positive integer followed by ms, "
                      "s, m, h or d (250ms, 30s, 5m, 1h, 7d)");
    expect_error("version: 1\nserver: { drain_timeout: 0s }\n",
                 NAME ":2:26: bad duration '0s': expected a positive integer followed by ms, "
                      "s, m, h or d (250ms, 30s, 5m, 1h, 7d)");
    /* A bad first duration does not hide a bad second one. */
    const char *const both[] = {
        NAME ":2:24: bad duration '1x': expected a positive integer followed by ms, s, m, h or d "
             "(250ms, 30s, 5m, 1h, 7d)",
        NAME ":2:43: bad duration '2y': expected a positive integer followed by ms, s, m, h or d "
             "(250ms, 30s, 5m, 1h, 7d)",
    };
    expect_errors("version: 1\nidentity: { token_ttl: 1x, max_token_ttl: 2y }\n", ERRS(both));
}

static void test_server_limits(void **state) {
    (void)state;
    struct policy *p = load_ok("version: 1\nserver:\n  receive_timeout: 5s\n"
                               "  unauthenticated_limit: { limit: 100, window: 1s }\n");
    assert_int_equal(p->receive_timeout_ms, 5000);
    assert_int_equal(p->unauthenticated_limit.limit, 100);
    assert_int_equal(p->unauthenticated_limit.window_ms, 1000);
    policy_release(p);
    const char *const errs[] = {
        NAME ":3:20: receive_timeout must be at least 1s",
        NAME ":4:35: '0' is out of range: must be at least 1",
    };
    expect_errors("version: 1\nserver:\n  receive_timeout: 500ms\n"
                  "  unauthenticated_limit: { limit: 0, window: 1s }\n",
                  ERRS(errs));
    expect_error("version: 1\nserver: { unauthenticated_limit: { limit: 5 } }\n",
                 NAME ":2:34: missing required key 'window'");
    expect_error(
        "version: 1\nserver: { unauthenticated_limit: { limit: 5, window: 1s, burst: 2 } }\n",
        NAME ":2:58: unknown key 'burst'");
}

static void test_error_bad_size(void **state) {
    (void)state;
    expect_error("version: 1\nserver:\n  max_body: 1 MiB\n",
                 NAME ":3:13: bad size '1 MiB': expected a positive integer with an optional "
                      "unit B, KB, KiB, MB, MiB, GB or GiB (e.g. 1MiB)");
}

static void test_error_unknown_reference(void **state) {
    (void)state;
    const char *yaml =
        "version: 1\n"
        "upstreams: { u: { base_url: 'http://h' } }\n"
        "chains:\n"
        "  c: { steps: [ { upstream: nope } ],\n"
        "       context_overflow: { match: { status: 400 }, step: { upstream: gone } } }\n"
        "routes:\n"
        "  - match: { path: /a }\n"
        "    action: missing\n"
        "    forward: { upstream: ghost }\n"
        "  - match: { path: /b }\n"
        "    action: a\n"
        "    forward: { chain: nochain }\n"
        "actions: { a: { scope: s } }\n";
    const char *const errs[] = {
        NAME ":4:29: unknown upstream 'nope'",  NAME ":5:70: unknown upstream 'gone'",
        NAME ":8:13: unknown action 'missing'", NAME ":9:26: unknown upstream 'ghost'",
        NAME ":12:23: unknown chain 'nochain'",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_duplicate_route(void **state) {
    (void)state;
    /* Same method and the same template shape: the parameter's name does not matter. */
    expect_error("version: 1\n"
                 "routes:\n"
                 "  - { match: { method: GET, path: '/t/{a}' }, action: x }\n"
                 "  - { match: { method: get, path: '/t/{b}' }, action: x }\n"
                 "  - { match: { method: POST, path: '/t/{b}' }, action: x }\n"
                 "  - { match: { path: '/t/{b}' }, action: x }\n"
                 "actions: { x: { scope: s } }\n",
                 NAME ":4:35: duplicate route GET /t/{b} (first at line 3)");
}

static void test_error_duplicate_action(void **state) {
    (void)state;
    /* Actions, upstreams and chains are mapping keys: a second one is a duplicate key. */
    expect_error("version: 1\n"
                 "actions:\n"
                 "  refund.issue: { scope: a }\n"
                 "  refund.issue: { scope: b }\n",
                 NAME ":4:3: duplicate key 'refund.issue' (first at line 3, column 3)");
}

static void test_error_duplicate_agent_id(void **state) {
    (void)state;
    expect_error("version: 1\n"
                 "agents:\n"
                 "  - { id: bot, tenants: [t], scopes: [] }\n"
                 "  - { id: other, tenants: [t], scopes: [] }\n"
                 "  - { id: bot, tenants: [u], scopes: [] }\n",
                 NAME ":5:11: duplicate agent id 'bot' (first at line 3)");
}

static void test_error_agent_id_not_addressable(void **state) {
    (void)state;
    /* The admin API's id rule: a seeded agent must be reachable at /admin/v1/agents/{id}. */
    char yaml[512];
    snprintf(yaml, sizeof yaml,
             "version: 1\n"
             "agents:\n"
             "  - { id: a/b, tenants: [t], scopes: [] }\n"
             "  - { id: 'a b', tenants: [t], scopes: [] }\n"
             "  - { id: %0129d, tenants: [t], scopes: [] }\n"
             "  - { id: b.bot_1@acme-x, tenants: [t], scopes: [] }\n",
             0);
    const char *const errs[] = {
        NAME ":3:11: agent id 'a/b' must be 1-128 characters of [A-Za-z0-9._@-]",
        NAME ":4:11: agent id 'a b' must be 1-128 characters of [A-Za-z0-9._@-]",
        NAME ":5:11: agent id '000000000000000000000000000000000000000000000000000000000000"
             "...' must be 1-128 characters of [A-Za-z0-9._@-]", /* quoted, cut */
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_duplicate_key(void **state) {
    (void)state;
    expect_error("version: 1\n"
                 "server:\n"
                 "  listen: 127.0.0.1:1\n"
                 "  data_dir: a\n"
                 "  listen: 127.0.0.1:2\n",
                 NAME ":5:3: duplicate key 'listen' (first at line 3, column 3)");
}

static void test_error_bad_op(void **state) {
    (void)state;
    const char *const errs[] = {
        NAME ":5:37: unknown operator 'gte': valid operators are eq, ne, lt, le, gt, ge, in, "
             "not_in, exists and prefix",
    };
    expect_errors("version: 1\n"
                  "actions:\n"
                  "  a:\n"
                  "    scope: s\n"
                  "    controls: [ { when: { body.x: { gte: 1 } }, deny: no } ]\n",
                  ERRS(errs));
}

static void test_error_bad_op_value(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "actions:\n"
                       "  a:\n"
                       "    scope: s\n"
                       "    controls:\n"
                       "      - when:\n"
                       "          body.a: { gt: ten }\n"
                       "          body.b: { in: x }\n"
                       "          body.c: { exists: 1 }\n"
                       "          body.d: { prefix: true }\n"
                       "          body.e: { eq: [1] }\n"
                       "          body.f: { in: [ { a: 1 } ] }\n"
                       "          nope: { eq: 1 }\n"
                       "          method: GET\n"
                       "        deny: no\n";
    const char *const errs[] = {
        NAME ":7:25: 'gt' takes a number, got a string",
        NAME ":8:25: 'in' takes a sequence of scalars, got a string",
        NAME ":9:29: 'exists' takes true or false, got an integer",
        NAME ":10:29: 'prefix' takes a string, got a boolean",
        NAME ":11:25: 'eq' takes a scalar, got a sequence",
        NAME ":12:27: 'in' takes a sequence of scalars, got a mapping in it",
        NAME ":13:11: unknown condition field 'nope': expected body.<path>, header.<name>, "
             "query.<name>, path.<param>, method, tenant, agent.id, agent.owner, time.hour or "
             "time.weekday",
        NAME ":14:19: expected a mapping of operator to value (e.g. { eq: x }), got a string",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_missing_required_key(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "agents:\n"
                       "  - id: a\n"
                       "    scopes: []\n"
                       "upstreams:\n"
                       "  u: { timeout: 1s }\n"
                       "routes:\n"
                       "  - match: { method: GET }\n"
                       "  - action: x\n"
                       "    forward: { path: /x }\n"
                       "actions:\n"
                       "  x: {}\n";
    const char *const errs[] = {
        NAME ":3:5: missing required key 'tenants'",
        NAME ":6:6: missing required key 'base_url'",
        NAME ":8:5: missing required key 'action'",
        NAME ":8:12: missing required key 'path'",
        NAME ":9:5: missing required key 'match'",
        NAME ":10:14: missing required key 'upstream' or 'chain'",
        NAME ":12:6: missing required key 'scope'",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_missing_control_kind_and_limits(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "actions:\n"
                       "  x:\n"
                       "    scope: s\n"
                       "    rate_limits: [ { key: agent } ]\n"
                       "    controls:\n"
                       "      - when: { method: { eq: GET } }\n"
                       "      - { deny: a, step_up: { acr: mfa } }\n";
    const char *const errs[] = {
        NAME ":5:20: missing required key 'limit'",
        NAME ":5:20: missing required key 'window'",
        NAME ":7:9: missing required key 'deny', 'step_up' or 'require_approval'",
        NAME ":8:20: a control has exactly one of 'deny', 'step_up' or 'require_approval'",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_yaml_syntax(void **state) {
    (void)state;
    expect_error("version: 1\nroutes: [\n  { a: b\n",
                 NAME ":4:1: YAML syntax error: did not find expected ',' or '}' (while parsing "
                      "a flow mapping at line 3, column 3)");
    /* An unquoted template starts a flow mapping: the classic mistake. */
    expect_error("version: 1\nroutes:\n  - match: { path: /a/{x} }\n",
                 NAME ":3:23: YAML syntax error: did not find expected ',' or '}' (while parsing "
                      "a flow mapping at line 3, column 12)");
    /* Columns count characters: two 2-byte characters before the bad byte. */
    expect_error("version: 1\nserver: { data_dir: \xc3\xa9\xc3\xa9, lisen: \xff }\n",
                 NAME ":2:32: YAML syntax error: invalid leading UTF-8 octet");
    expect_error("version: 1\n\tserver: {}\n",
                 NAME ":2:1: YAML syntax error: found a tab character that violates "
                      "indentation (while scanning a plain scalar at line 1, column 10)");
}

static void test_error_bad_enum(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "audit: { durability: fsync, on_failure: open }\n"
                       "chains:\n"
                       "  c:\n"
                       "    retry: { jitter: half, on: [429, 600, timeout, timeouts] }\n"
                       "    steps: []\n"
                       "actions:\n"
                       "  a: { scope: s, rate_limits: [ { key: user, limit: 1, window: 1s } ] }\n";
    const char *const errs[] = {
        NAME ":2:22: invalid durability 'fsync': expected full or normal",
        NAME ":2:41: invalid on_failure 'open': expected deny or allow",
        NAME ":5:22: invalid jitter 'half': expected none, full or equal",
        NAME ":5:38: invalid retry.on entry '600': expected an HTTP status (100-599), timeout "
             "or connect_error",
        NAME ":5:52: invalid retry.on entry 'timeouts': expected an HTTP status (100-599), "
             "timeout or connect_error",
        NAME ":6:12: steps must not be empty",
        NAME ":8:40: invalid rate limit key 'user': expected agent, tenant or global",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_bad_scheme(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "upstreams:\n"
                       "  a: { base_url: 'file:///etc/passwd' }\n"
                       "  b: { base_url: 'gopher://h' }\n"
                       "  c: { base_url: 'https://user:secret@h' }\n"
                       "  d: { base_url: 'http://' }\n"
                       "  e: { base_url: 'http://h/x?y=1' }\n";
    const char *const errs[] = {
        NAME ":3:18: base_url must start with http:// or https://",
        NAME ":4:18: base_url must start with http:// or https://",
        NAME ":5:18: base_url must not contain credentials (use api_key_env or headers)",
        NAME ":6:18: base_url has no host",
        NAME ":7:18: base_url must not contain whitespace, '?', '#' or '\\'",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_every_feature_is_enforced(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "upstreams:\n"
                       "  u:\n"
                       "    base_url: http://h\n"
                       "    breaker: { failure_threshold: 3 }\n"
                       "chains:\n"
                       "  c: { steps: [ { upstream: u } ] }\n"
                       "routes:\n"
                       "  - match: { path: /a }\n"
                       "    action: a\n"
                       "    forward: { chain: c, retry_safe: true }\n"
                       "  - match: { path: /b }\n"
                       "    action: a\n"
                       "    forward: { upstream: u, retry: { max_attempts: 2 } }\n"
                       "actions:\n"
                       "  a:\n"
                       "    scope: s\n"
                       "    rate_limits: [ { key: agent, limit: 1, window: 1s } ]\n"
                       "    controls: [ { deny: no } ]\n";
    /* Every feature is enforced now: the file that used each one compiles as-is. */
    struct policy *p = load_ok(yaml);
    assert_true(p->upstreams[0].breaker.present);
    assert_ptr_equal(p->routes[0].chain, &p->chains[0]);
    assert_true(p->routes[0].retry_safe);
    assert_int_equal(p->routes[1].retry.max_attempts, 2);
    policy_release(p);
}

static void test_error_version(void **state) {
    (void)state;
    expect_error("server: {}\n", NAME ":1:1: missing required key 'version'");
    expect_error("version: 2\n", NAME ":1:10: unsupported policy version 2: this build reads "
                                      "version 1");
    expect_error("version: '1'\n", NAME ":1:10: expected an integer, got a string");
    expect_error("", NAME ":1:1: the policy is empty: it needs at least 'version: 1'");
    expect_error("- version: 1\n", NAME ":1:1: expected a mapping, got a sequence");
}

static void test_error_yaml_features_refused(void **state) {
    (void)state;
    /* One line per feature.  The refused alias is not reported a second time as a wrong
     * type, and a non-scalar key's pair is dropped. */
    const char *const errs[] = {
        NAME ":2:11: YAML anchors are not allowed ('&d')",
        NAME ":3:8: YAML aliases are not allowed ('*d')",
        NAME ":4:21: YAML tags are not allowed ('tag:yaml.org,2002:str')",
        NAME ":5:3: mapping keys must be scalars",
    };
    expect_errors("version: 1\n"
                  "server: { &d data_dir: a }\n"
                  "audit: *d\n"
                  "identity: { issuer: !!str pep }\n"
                  "? [a]\n"
                  ": 1\n",
                  ERRS(errs));
    expect_error("version: 1\n---\nversion: 1\n",
                 NAME ":2:1: a policy file holds a single YAML document");
}

static void test_errors_several_in_file_order(void **state) {
    (void)state;
    /* Sections are compiled in dependency order (actions before routes), yet the errors
     * come out sorted by position. */
    const char *yaml = "version: 1\n"
                       "routes:\n"
                       "  - { match: { path: /a }, action: nope }\n"
                       "server: { listen: nowhere, max_body: big }\n"
                       "actions:\n"
                       "  a: { scope: 'two words' }\n"
                       "identity: { token_ttl: forever }\n"
                       "bogus: 1\n";
    const char *const errs[] = {
        NAME ":3:36: unknown action 'nope'",
        NAME ":4:19: bad listen address 'nowhere': expected HOST:PORT (e.g. 127.0.0.1:8080)",
        NAME ":4:38: bad size 'big': expected a positive integer with an optional unit B, KB, "
             "KiB, MB, MiB, GB or GiB (e.g. 1MiB)",
        NAME ":6:15: scope must not contain whitespace or control characters",
        NAME ":7:24: bad duration 'forever': expected a positive integer followed by ms, s, "
             "m, h or d (250ms, 30s, 5m, 1h, 7d)",
        NAME ":8:1: unknown key 'bogus'",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_sanity_checks(void **state) {
    (void)state;
    const char *yaml = "version: 1\n"
                       "identity: { token_ttl: 2d, max_token_ttl: 1d }\n"
                       "audit: { checkpoint_every: 0 }\n"
                       "upstreams:\n"
                       "  u:\n"
                       "    base_url: http://h\n"
                       "    breaker: { failure_rate: 1.5, min_requests: 0 }\n"
                       "    headers: { host: evil, 'bad name': x, x-a: { env: 'no-dash' } }\n"
                       "routes:\n"
                       "  - match: { path: /a }\n"
                       "    action: a\n"
                       "    forward: { upstream: u, path: '/x/%2e%2e/y', retry: { max_attempts: 0,"
                       " base: 2s, max: 1s } }\n"
                       "  - { match: { path: '/b/{x}/{x}' }, action: a }\n"
                       "  - { match: { path: '/c/a{x}' }, action: a }\n"
                       "actions:\n"
                       "  a: { scope: s, rate_limits: [ { key: agent, limit: 0, window: 1s } ] }\n";
    const char *const errs[] = {
        NAME ":2:43: max_token_ttl must be at least token_ttl",
        NAME ":3:28: '0' is out of range: must be at least 1",
        NAME ":7:30: failure_rate must be in (0, 1]",
        NAME ":7:49: '0' is out of range: must be at least 1",
        NAME ":8:16: header 'host' cannot be set on an upstream",
        NAME ":8:28: bad header name 'bad name'",
        NAME ":8:55: bad environment variable name 'no-dash'",
        NAME ":12:35: bad forward path '/x/%2e%2e/y': encoded dot",
        NAME ":12:73: '0' is out of range: must be between 1 and 100",
        NAME ":12:91: retry max must be at least retry base",
        NAME ":13:22: bad path template '/b/{x}/{x}': duplicate parameter name",
        NAME ":14:22: bad path template '/c/a{x}': a parameter is written {name} and fills a "
             "whole segment",
        NAME ":16:54: '0' is out of range: must be at least 1",
    };
    expect_errors(yaml, ERRS(errs));
}

static void test_error_duration_not_whole_seconds(void **state) {
    (void)state;
    /* Kept in whole seconds (JWT NumericDates, RFC 9470 max_age): 1500ms would be cut. */
    const char *const errs[] = {
        NAME ":2:24: token_ttl must be a whole number of seconds, got '1500ms'",
        NAME ":2:67: clock_skew must be a whole number of seconds, got '500ms'",
        NAME ":7:49: max_age must be a whole number of seconds, got '1500ms'",
    };
    expect_errors("version: 1\n"
                  "identity: { token_ttl: 1500ms, max_token_ttl: 2000ms, clock_skew: 500ms }\n"
                  "actions:\n"
                  "  a:\n"
                  "    scope: s\n"
                  "    # a step-up control\n"
                  "    controls: [ { step_up: { acr: mfa, max_age: 1500ms } } ]\n",
                  ERRS(errs));
    /* Whole seconds written in ms are fine; durations kept in ms still take ms. */
    struct policy *p =
        load_ok("version: 1\n"
                "server: { drain_timeout: 1500ms }\n"
                "identity: { token_ttl: 2000ms, max_token_ttl: 3000ms, "
                "clock_skew: 1000ms }\n"
                "upstreams:\n"
                "  u: { base_url: 'http://h', timeout: 1500ms, idle_timeout: 250ms }\n"
                "actions:\n"
                "  a:\n"
                "    scope: s\n"
                "    rate_limits: [ { key: agent, limit: 1, window: 1500ms } ]\n"
                "    controls: [ { step_up: { acr: mfa, max_age: 3000ms } } ]\n");
    assert_int_equal(p->drain_timeout_ms, 1500);
    assert_int_equal(p->token_ttl_ms, 2000);
    assert_int_equal(p->max_token_ttl_ms, 3000);
    assert_int_equal(p->clock_skew_ms, 1000);
    assert_int_equal(p->upstreams[0].timeout_ms, 1500);
    assert_int_equal(p->upstreams[0].idle_timeout_ms, 250);
    assert_int_equal(p->actions[0].rate_limits[0].window_ms, 1500);
    assert_int_equal(p->actions[0].controls[0].max_age_ms, 3000);
    policy_release(p);
}

static void test_error_upstream_headers(void **state) {
    (void)state;
    /* Names differing only in case are one header; api_key_env owns Authorization. */
    const char *yaml = "version: 1\n"
                       "upstreams:\n"
                       "  u:\n"
                       "    base_url: http://h\n"
                       "    api_key_env: KEY\n"
                       "    headers: { X-A: a, x-a: { env: B }, Authorization: x, x-A: c }\n"
                       "  v:\n"
                       "    api_key_env: KEY\n"
                       "    base_url: http://h\n"
                       "    headers: { authorization: { env: B } }\n"
                       "  w:\n"
                       "    base_url: http://h\n"
                       "    headers: { Authorization: { env: W_TOKEN }, X-A: a }\n";
    const char *const errs[] = {
        NAME ":6:24: duplicate header 'x-a' (same as 'X-A' at line 6, column 16: header names "
             "are case-insensitive)",
        NAME ":6:41: header 'Authorization' conflicts with api_key_env, which sends "
             "'Authorization: Bearer ...': keep one of them",
        NAME ":6:59: duplicate header 'x-A' (same as 'X-A' at line 6, column 16: header names "
             "are case-insensitive)",
        NAME ":10:16: header 'authorization' conflicts with api_key_env, which sends "
             "'Authorization: Bearer ...': keep one of them",
    };
    expect_errors(yaml, ERRS(errs));
    /* Without api_key_env an Authorization header is the upstream's one credential, and
     * each upstream has its own header names. */
    struct policy *p = load_ok("version: 1\n"
                               "upstreams:\n"
                               "  w:\n"
                               "    base_url: http://h\n"
                               "    headers: { Authorization: { env: W_TOKEN }, X-A: a }\n"
                               "  x:\n"
                               "    base_url: http://h\n"
                               "    api_key_env: KEY\n"
                               "    headers: { x-a: b }\n");
    assert_int_equal(p->upstreams[0].headers_len, 2);
    assert_string_equal(p->upstreams[0].headers[0].name, "Authorization");
    assert_int_equal(p->upstreams[1].headers_len, 1);
    policy_release(p);
}

static void test_error_listen_equals_admin_listen(void **state) {
    (void)state;
    expect_error("version: 1\n"
                 "server: { listen: '127.0.0.1:8080', admin_listen: '127.0.0.1:8080' }\n",
                 NAME ":2:51: admin_listen must differ from listen (both are '127.0.0.1:8080')");
    /* Host names compare case-insensitively and ports as numbers. */
    expect_error("version: 1\n"
                 "server: { listen: LOCALHOST:09000, admin_listen: 'localhost:9000' }\n",
                 NAME ":2:50: admin_listen must differ from listen (both are 'localhost:9000')");
    /* Against the other one's default. */
    expect_error("version: 1\nserver: { listen: '127.0.0.1:8081' }\n",
                 NAME ":2:19: listen must differ from admin_listen (default '127.0.0.1:8081')");
    expect_error("version: 1\nserver: { admin_listen: '127.0.0.1:8080' }\n",
                 NAME ":2:25: admin_listen must differ from listen (both are '127.0.0.1:8080')");
    /* Port 0 picks a free port for each; other hosts or ports are other sockets. */
    policy_release(load_ok("version: 1\n"
                           "server: { listen: '127.0.0.1:0', admin_listen: '127.0.0.1:0' }\n"));
    policy_release(load_ok("version: 1\n"
                           "server: { listen: '127.0.0.1:8080', admin_listen: '[::1]:8080' }\n"));
    policy_release(load_ok("version: 1\n"
                           "server: { listen: '127.0.0.1:8080', admin_listen: '127.0.0.1:80' }\n"));
}

static void test_forward_path_parameters(void **state) {
    (void)state;
    struct policy *p =
        load_ok("version: 1\n"
                "upstreams: { u: { base_url: 'http://h' } }\n"
                "routes:\n"
                "  - match: { method: POST, path: '/v1/tenants/{tenant}/refunds/{id}' }\n"
                "    action: a\n"
                "    forward: { upstream: u, path: '/refunds/{id}/t/{tenant}/' }\n"
                "  - match: { path: '/x/{id}' }\n"
                "    action: a\n"
                "    forward: { upstream: u, path: '/x%20y/{id}' }\n"
                "  - { match: { path: /y }, action: a, forward: { upstream: u, path: / } }\n"
                "  - { match: { path: /z }, action: a, forward: { upstream: u } }\n"
                "actions: { a: { scope: s } }\n");
    const struct route *r0 = &p->routes[0], *r1 = &p->routes[1];
    assert_string_equal(r0->forward_path, "/refunds/{id}/t/{tenant}/");
    assert_int_equal(r0->forward_parts_len, 5);
    assert_true(r0->forward_path_params);
    assert_string_equal(r0->forward_parts[0].literal, "/refunds/");
    assert_null(r0->forward_parts[0].param);
    assert_null(r0->forward_parts[1].literal);
    assert_string_equal(r0->forward_parts[1].param, "id");
    assert_int_equal(r0->forward_parts[1].param_index, 1);
    assert_string_equal(r0->forward_parts[2].literal, "/t/");
    assert_string_equal(r0->forward_parts[3].param, "tenant");
    assert_int_equal(r0->forward_parts[3].param_index, 0);
    assert_string_equal(r0->forward_parts[4].literal, "/");
    /* param_index is where route_match puts that parameter's value. */
    struct route_match m;
    assert_ptr_equal(route_match(p, "POST", "/v1/tenants/acme/refunds/r1", &m), r0);
    for (size_t i = 1; i < 4; i += 2)
        assert_string_equal(m.params[r0->forward_parts[i].param_index].name,
                            r0->forward_parts[i].param);
    assert_int_equal(m.params[r0->forward_parts[1].param_index].value_len, 2);
    assert_memory_equal(m.params[r0->forward_parts[1].param_index].value, "r1", 2);
    /* Literals stay as written, percent-escapes included. */
    assert_int_equal(r1->forward_parts_len, 2);
    assert_string_equal(r1->forward_parts[0].literal, "/x%20y/");
    assert_string_equal(r1->forward_parts[1].param, "id");
    assert_int_equal(r1->forward_parts[1].param_index, 0);
    /* Without parameters: one literal; without a rewrite: nothing. */
    assert_int_equal(p->routes[2].forward_parts_len, 1);
    assert_false(p->routes[2].forward_path_params);
    assert_string_equal(p->routes[2].forward_parts[0].literal, "/");
    assert_null(p->routes[3].forward_path);
    assert_null(p->routes[3].forward_parts);
    assert_int_equal(p->routes[3].forward_parts_len, 0);
    policy_release(p);
}

static void test_error_forward_path_parameters(void **state) {
    (void)state;
    const char *yaml =
        "version: 1\n"
        "upstreams: { u: { base_url: 'http://h' } }\n"
        "routes:\n"
        "  - match: { path: '/r/{id}' }\n"
        "    action: a\n"
        "    forward: { upstream: u, path: '/r/{nope}/{id}/{tenant}' }\n"
        "  - { match: { path: '/s/{id}' }, action: a,"
        " forward: { upstream: u, path: '/s/a{id}' } }\n"
        "  - { match: { path: '/s/{id}/1' }, action: a, forward: { upstream: u, path: '/{1x}' } }\n"
        "  - { match: { path: '/s/{id}/2' }, action: a, forward: { upstream: u, path: '/{id' } }\n"
        "  - { match: { path: '/s/{id}/3' }, action: a, forward: { upstream: u, path: '/id}' } }\n"
        "  - { match: { path: '/s/{id}/4' }, action: a, forward: { upstream: u, path: '/{}' } }\n"
        "  - { match: { path: '/t/a{id}' }, action: a,"
        " forward: { upstream: u, path: '/t/{no}' } }\n"
        "actions: { a: { scope: s } }\n";
    const char *const errs[] = {
        NAME ":6:35: forward.path: {nope} is not a parameter of the route's path",
        NAME ":6:35: forward.path: {tenant} is not a parameter of the route's path",
        NAME ":7:76: bad forward path '/s/a{id}': a parameter is written {name}, name "
             "[A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
        NAME ":8:78: bad forward path '/{1x}': a parameter is written {name}, name "
             "[A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
        NAME ":9:78: bad forward path '/{id': a parameter is written {name}, name "
             "[A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
        NAME ":10:78: bad forward path '/id}': a parameter is written {name}, name "
             "[A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
        NAME ":11:78: bad forward path '/{}': a parameter is written {name}, name "
             "[A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
        /* The template is wrong: its parameters are unknown, so only that is reported. */
        NAME ":12:22: bad path template '/t/a{id}': a parameter is written {name} and fills a "
             "whole segment",
    };
    expect_errors(yaml, ERRS(errs));
}

/* ---- hostile input ------------------------------------------------------------------- */

static void test_alias_bomb_refused(void **state) {
    (void)state;
    /* "Billion laughs": 9 levels of 9 aliases each would expand to 9^9 nodes. */
    char yaml[4096];
    size_t o = (size_t)snprintf(yaml, sizeof yaml,
                                "version: 1\na: &a [lol,lol,lol,lol,lol,"
                                "lol,lol,lol,lol]\n");
    for (char c = 'b'; c <= 'i'; c++) {
        o += (size_t)snprintf(yaml + o, sizeof yaml - o, "%c: &%c [", c, c);
        for (int i = 0; i < 9; i++)
            o += (size_t)snprintf(yaml + o, sizeof yaml - o, "%s*%c", i ? "," : "", c - 1);
        o += (size_t)snprintf(yaml + o, sizeof yaml - o, "]\n");
    }
    struct policy *p = (struct policy *)1;
    struct policy_errors e;
    int rc = policy_load_buffer(NAME, yaml, o, &p, &e);
    assert_int_equal(rc, PEP_EINVAL);
    assert_null(p);
    size_t anchors = 0, aliases = 0, unknown = 0;
    for (size_t i = 0; i < e.len; i++) {
        anchors += strstr(e.items[i], "YAML anchors are not allowed") != NULL;
        aliases += strstr(e.items[i], "YAML aliases are not allowed") != NULL;
        unknown += strstr(e.items[i], "unknown key") != NULL;
    }
    /* Each alias is refused once where it is written: nothing was expanded. */
    assert_int_equal(anchors, 9);
    assert_int_equal(aliases, 8 * 9);
    assert_int_equal(unknown, 9);
    assert_int_equal(e.len, 9 + 8 * 9 + 9);
    assert_string_equal(e.items[0], NAME ":2:1: unknown key 'a'");
    assert_string_equal(e.items[1], NAME ":2:4: YAML anchors are not allowed ('&a')");
    assert_string_equal(e.items[4], NAME ":3:8: YAML aliases are not allowed ('*a')");
    policy_errors_free(&e);
}

static void test_deep_nesting_refused(void **state) {
    (void)state;
    size_t depth = 10000;
    size_t len = strlen("version: 1\nx: ") + 2 * depth + 1;
    char *yaml = malloc(len + 1);
    assert_non_null(yaml);
    size_t o = (size_t)sprintf(yaml, "version: 1\nx: ");
    memset(yaml + o, '[', depth);
    memset(yaml + o + depth, ']', depth);
    yaml[o + 2 * depth] = '\n';
    yaml[len] = '\0';
    /* The root mapping is level 1; the 64th '[' (column 67) would be level 65. */
    expect_errors_n(yaml, len,
                    (const char *const[]){NAME ":2:67: YAML nesting is deeper than 64 levels"}, 1);
    free(yaml);
}

static void test_file_size_cap(void **state) {
    (void)state;
    size_t len = POLICY_MAX_FILE_BYTES + 1;
    char *yaml = malloc(len);
    assert_non_null(yaml);
    memcpy(yaml, "version: 1\n", 11);
    memset(yaml + 11, '#', len - 11); /* a comment: valid YAML if it were allowed */
    expect_errors_n(yaml, len,
                    (const char *const[]){NAME ":1:1: the policy file is larger than 4194304 "
                                               "bytes"},
                    1);
    /* One byte less is accepted. */
    struct policy *p = NULL;
    struct policy_errors e;
    assert_int_equal(policy_load_buffer(NAME, yaml, len - 1, &p, &e), 0);
    policy_errors_free(&e);
    policy_release(p);

    /* The same cap when reading a file. */
    char path[] = "/tmp/pep-test-policy-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, yaml, len), (ssize_t)len);
    assert_int_equal(close(fd), 0);
    p = (struct policy *)1;
    assert_int_equal(policy_load(path, &p, &e), PEP_EINVAL);
    unlink(path);
    assert_null(p);
    assert_int_equal(e.len, 1);
    char want[128];
    snprintf(want, sizeof want, "%s:1:1: the policy file is larger than 4194304 bytes", path);
    assert_string_equal(e.items[0], want);
    policy_errors_free(&e);
    free(yaml);
}

static void test_null_buffer(void **state) {
    (void)state;
    expect_errors_n(NULL, 0,
                    (const char *const[]){NAME ":1:1: the policy is empty: it needs at least "
                                               "'version: 1'"},
                    1);
}

static void test_node_cap(void **state) {
    (void)state;
    /* A flow sequence of more scalars than POLICY_MAX_NODES. */
    size_t items = POLICY_MAX_NODES + 10;
    size_t len = strlen("version: 1\nx: [") + 2 * items + 2;
    char *yaml = malloc(len + 1);
    assert_non_null(yaml);
    size_t o = (size_t)sprintf(yaml, "version: 1\nx: [");
    for (size_t i = 0; i < items; i++) {
        yaml[o++] = '0';
        yaml[o++] = ',';
    }
    yaml[o - 1] = ']';
    yaml[o++] = '\n';
    struct policy *p = (struct policy *)1;
    struct policy_errors e;
    int rc = policy_load_buffer(NAME, yaml, o, &p, &e);
    assert_int_equal(rc, PEP_EINVAL);
    assert_null(p);
    assert_int_equal(e.len, 1);
    /* nodes: root mapping, 'version', 1, 'x', the sequence = 5, then items; the
     * 200001st node is item 199996 at column 5 + 2 * 199995. */
    char want[128];
    snprintf(want, sizeof want, NAME ":2:%d: too many YAML nodes (the limit is %d)",
             5 + 2 * (POLICY_MAX_NODES - 5), POLICY_MAX_NODES);
    assert_string_equal(e.items[0], want);
    policy_errors_free(&e);
    free(yaml);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example_compiles),
        cmocka_unit_test(test_scenarios_compile),
        cmocka_unit_test(test_load_missing_file),
        cmocka_unit_test(test_load_not_a_regular_file),
        cmocka_unit_test(test_rich_policy_fields),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_refcount),
        cmocka_unit_test(test_empty_sections_and_null_sections),
        cmocka_unit_test(test_error_unknown_key),
        cmocka_unit_test(test_error_wrong_type),
        cmocka_unit_test(test_error_bad_duration),
        cmocka_unit_test(test_server_limits),
        cmocka_unit_test(test_error_bad_size),
        cmocka_unit_test(test_error_unknown_reference),
        cmocka_unit_test(test_error_duplicate_route),
        cmocka_unit_test(test_error_duplicate_action),
        cmocka_unit_test(test_error_duplicate_agent_id),
        cmocka_unit_test(test_error_agent_id_not_addressable),
        cmocka_unit_test(test_error_duplicate_key),
        cmocka_unit_test(test_error_bad_op),
        cmocka_unit_test(test_error_bad_op_value),
        cmocka_unit_test(test_error_missing_required_key),
        cmocka_unit_test(test_error_missing_control_kind_and_limits),
        cmocka_unit_test(test_error_yaml_syntax),
        cmocka_unit_test(test_error_bad_enum),
        cmocka_unit_test(test_error_bad_scheme),
        cmocka_unit_test(test_every_feature_is_enforced),
        cmocka_unit_test(test_error_version),
        cmocka_unit_test(test_error_yaml_features_refused),
        cmocka_unit_test(test_errors_several_in_file_order),
        cmocka_unit_test(test_error_sanity_checks),
        cmocka_unit_test(test_error_duration_not_whole_seconds),
        cmocka_unit_test(test_error_upstream_headers),
        cmocka_unit_test(test_error_listen_equals_admin_listen),
        cmocka_unit_test(test_forward_path_parameters),
        cmocka_unit_test(test_error_forward_path_parameters),
        cmocka_unit_test(test_alias_bomb_refused),
        cmocka_unit_test(test_deep_nesting_refused),
        cmocka_unit_test(test_file_size_cap),
        cmocka_unit_test(test_null_buffer),
        cmocka_unit_test(test_node_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
