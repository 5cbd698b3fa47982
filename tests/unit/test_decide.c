/*
 * test_decide.c — the decision core (pep/decide.c, SPEC 3.2 steps 1-4).
 *
 * decide() is pure, so every outcome is reached here without a server: a small policy is
 * compiled from YAML, real paths go through route_match, token claims and agents are
 * built by hand.  The table covers every code decide() can produce (no_route 404,
 * invalid_token 401 for each cause, tenant_mismatch 403, insufficient_scope 403, ok 200),
 * the order of the steps (first failing step wins), the tenant taken from {tenant} or
 * defaulted to the agent's first tenant, and effective scopes = token ∩ agent.  Every
 * reason is checked exactly and must not look like a JWT.
 *
 * Single-threaded; runs from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pep/decide.h"

#define NOW_S 1700000000

static const char policy_yaml[] =
    "version: 1\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "  - match: { method: GET, path: \"/v1/tenants/{tenant}/search\" }\n"
    "    action: tool.search\n"
    "  - match: { method: POST, path: \"/v1/tenants/{tenant}/refunds\" }\n"
    "    action: refund.issue\n"
    "actions:\n"
    "  llm.chat:\n"
    "    scope: llm.chat\n"
    "  tool.search:\n"
    "    scope: tool.search\n"
    "  refund.issue:\n"
    "    scope: refund.issue\n";

/* The fixture: one compiled policy and the agents the table refers to. */
enum agent_kind {
    AG_NONE,     /* registry has no record of the token's sub */
    AG_BOT,      /* bot: tenants [acme, globex], scopes [llm.chat, tool.search] */
    AG_DISABLED, /* bot, disabled */
    AG_NARROWED, /* bot after tool.search was removed: scopes [llm.chat] */
    AG_WILD,     /* wild: tenants [acme], scopes [llm.*, refund.issue] */
    AG_STAR,     /* root: tenants [acme], scopes [*] */
    AG_COUNT
};

struct fixture {
    struct policy *policy;
    struct agent *agents[AG_COUNT];
};

static int setup(void **state) {
    struct fixture *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    struct policy_errors errs;
    int rc =
        policy_load_buffer("decide.yaml", policy_yaml, strlen(policy_yaml), &fx->policy, &errs);
    for (size_t i = 0; i < errs.len; i++)
        print_error("policy: %s\n", errs.items[i]);
    policy_errors_free(&errs);
    assert_int_equal(rc, 0);

    const char *two_tenants[] = {"acme", "globex"}, *one_tenant[] = {"acme"};
    const char *bot_scopes[] = {"llm.chat", "tool.search"}, *narrow[] = {"llm.chat"};
    const char *wild[] = {"llm.*", "refund.issue"}, *star[] = {"*"};
    fx->agents[AG_BOT] =
        agent_new("bot", "owner@example.test", two_tenants, 2, bot_scopes, 2, true, 1, 1);
    assert_non_null(fx->agents[AG_BOT]);
    fx->agents[AG_DISABLED] = agent_with_enabled(fx->agents[AG_BOT], false, 2);
    fx->agents[AG_NARROWED] =
        agent_new("bot", "owner@example.test", two_tenants, 2, narrow, 1, true, 1, 3);
    fx->agents[AG_WILD] = agent_new("wild", NULL, one_tenant, 1, wild, 2, true, 1, 1);
    fx->agents[AG_STAR] = agent_new("root", NULL, one_tenant, 1, star, 1, true, 1, 1);
    for (int i = AG_BOT; i < AG_COUNT; i++)
        assert_non_null(fx->agents[i]);
    *state = fx;
    return 0;
}

static int teardown(void **state) {
    struct fixture *fx = *state;
    for (int i = 0; i < AG_COUNT; i++)
        agent_release(fx->agents[i]);
    policy_release(fx->policy);
    free(fx);
    return 0;
}

/* True when s contains three '.'-separated base64url runs (a JWT's shape), or "eyJ". */
static bool looks_like_jwt(const char *s) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    if (strstr(s, "eyJ")) return true;
    for (const char *p = s; *p; p++) {
        size_t a = strspn(p, b64);
        if (a == 0 || p[a] != '.') continue;
        const char *q = p + a + 1;
        size_t b = strspn(q, b64);
        if (b > 0 && q[b] == '.' && strspn(q + b + 1, b64) > 0) return true;
    }
    return false;
}

static void test_jwt_detector(void **state) {
    (void)state;
    assert_true(looks_like_jwt("abc.def.ghi"));
    assert_true(looks_like_jwt("token aB-_1.c2Q.x_y here"));
    assert_true(looks_like_jwt("eyJhbGciOi"));
    assert_false(looks_like_jwt("allowed by scope llm.chat"));
    assert_false(looks_like_jwt("a.b c.d"));
    assert_false(looks_like_jwt("a..b"));
    assert_false(looks_like_jwt(""));
}

/* ---- the decision table --------------------------------------------------------------- */

#define MAX_SCOPES 4

struct decide_case {
    const char *name;
    const char *method;
    const char *path;
    bool token_present;
    enum token_status status;
    bool no_claims;                       /* TOKEN_OK but claims NULL (defensive) */
    const char *token_scopes[MAX_SCOPES]; /* NULL-terminated */
    bool revoked;
    enum agent_kind agent;
    /* expected */
    bool allow;
    int http;
    const char *code;
    const char *action; /* NULL: no route */
    const char *tenant; /* NULL: none */
    const char *reason;
};

#define CHAT "POST", "/v1/chat/completions"
#define SEARCH(t) "GET", "/v1/tenants/" t "/search"
#define REFUND(t) "POST", "/v1/tenants/" t "/refunds"
#define BOTH_SCOPES                                                                                \
    { "llm.chat", "tool.search", NULL }

static const struct decide_case cases[] = {
    /* 1. route */
    {"unknown path", "POST", "/v1/unknown", true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT,
     false, 404, "no_route", NULL, NULL, "no route matches this method and path"},
    {"wrong method", "GET", "/v1/chat/completions", true, TOKEN_OK, false, BOTH_SCOPES, false,
     AG_BOT, false, 404, "no_route", NULL, NULL, "no route matches this method and path"},
    {"route before token",
     "GET",
     "/v1/tenants/acme/search/x",
     false,
     TOKEN_MALFORMED,
     false,
     {NULL},
     true,
     AG_NONE,
     false,
     404,
     "no_route",
     NULL,
     NULL,
     "no route matches this method and path"},

    /* 2. authentication: every cause */
    {"token absent", CHAT, false, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT, false, 401,
     "invalid_token", "llm.chat", NULL, "missing bearer token"},
    {"token absent, status ignored",
     SEARCH("acme"),
     false,
     TOKEN_EXPIRED,
     true,
     {NULL},
     false,
     AG_NONE,
     false,
     401,
     "invalid_token",
     "tool.search",
     NULL,
     "missing bearer token"},
    {"malformed",
     CHAT,
     true,
     TOKEN_MALFORMED,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "malformed token"},
    {"bad alg",
     CHAT,
     true,
     TOKEN_BAD_ALG,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token algorithm not accepted"},
    {"unknown kid",
     CHAT,
     true,
     TOKEN_UNKNOWN_KID,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token signed by an unknown key"},
    {"bad signature",
     CHAT,
     true,
     TOKEN_BAD_SIGNATURE,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token signature invalid"},
    {"wrong issuer",
     CHAT,
     true,
     TOKEN_WRONG_ISSUER,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token issuer not accepted"},
    {"wrong audience",
     CHAT,
     true,
     TOKEN_WRONG_AUDIENCE,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token audience not accepted"},
    {"expired",
     SEARCH("acme"),
     true,
     TOKEN_EXPIRED,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "tool.search",
     NULL,
     "token expired"},
    {"not yet valid",
     SEARCH("acme"),
     true,
     TOKEN_NOT_YET_VALID,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "tool.search",
     NULL,
     "token not yet valid"},
    {"bad status wins over claims", CHAT, true, TOKEN_EXPIRED, false, BOTH_SCOPES, true, AG_BOT,
     false, 401, "invalid_token", "llm.chat", NULL, "token expired"},
    {"OK without claims",
     CHAT,
     true,
     TOKEN_OK,
     true,
     {NULL},
     false,
     AG_BOT,
     false,
     401,
     "invalid_token",
     "llm.chat",
     NULL,
     "token valid"},
    {"revoked", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, true, AG_BOT, false, 401, "invalid_token",
     "llm.chat", NULL, "token has been revoked"},
    {"revoked before unknown agent", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, true, AG_NONE, false,
     401, "invalid_token", "llm.chat", NULL, "token has been revoked"},
    {"revoked before disabled", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, true, AG_DISABLED, false,
     401, "invalid_token", "llm.chat", NULL, "token has been revoked"},
    {"unknown agent", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, false, AG_NONE, false, 401,
     "invalid_token", "llm.chat", NULL, "unknown agent bot"},
    {"disabled agent", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, false, AG_DISABLED, false, 401,
     "invalid_token", "llm.chat", NULL, "agent bot is disabled"},
    {"disabled before tenant", SEARCH("initech"), true, TOKEN_OK, false, BOTH_SCOPES, false,
     AG_DISABLED, false, 401, "invalid_token", "tool.search", NULL, "agent bot is disabled"},

    /* 3. tenant */
    {"tenant not the agent's", SEARCH("initech"), true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT,
     false, 403, "tenant_mismatch", "tool.search", "initech",
     "agent bot may not act for tenant initech"},
    {"tenant prefix of the agent's", SEARCH("acm"), true, TOKEN_OK, false, BOTH_SCOPES, false,
     AG_BOT, false, 403, "tenant_mismatch", "tool.search", "acm",
     "agent bot may not act for tenant acm"},
    {"tenant extending the agent's", SEARCH("acmex"), true, TOKEN_OK, false, BOTH_SCOPES, false,
     AG_BOT, false, 403, "tenant_mismatch", "tool.search", "acmex",
     "agent bot may not act for tenant acmex"},
    {"tenant case differs", SEARCH("ACME"), true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT,
     false, 403, "tenant_mismatch", "tool.search", "ACME", "agent bot may not act for tenant ACME"},
    {"tenant before scope",
     REFUND("initech"),
     true,
     TOKEN_OK,
     false,
     {"llm.chat", NULL},
     false,
     AG_BOT,
     false,
     403,
     "tenant_mismatch",
     "refund.issue",
     "initech",
     "agent bot may not act for tenant initech"},
    {"second tenant from path", SEARCH("globex"), true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT,
     true, 200, "ok", "tool.search", "globex", "allowed by scope tool.search"},
    {"default tenant without {tenant}", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT,
     true, 200, "ok", "llm.chat", "acme", "allowed by scope llm.chat"},

    /* 4. scope */
    {"token lacks scope",
     SEARCH("acme"),
     true,
     TOKEN_OK,
     false,
     {"llm.chat", NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "tool.search",
     "acme",
     "agent bot lacks scope tool.search"},
    {"token has no scope",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "llm.chat",
     "acme",
     "agent bot lacks scope llm.chat"},
    {"agent lost scope after issue", SEARCH("acme"), true, TOKEN_OK, false, BOTH_SCOPES, false,
     AG_NARROWED, false, 403, "insufficient_scope", "tool.search", "acme",
     "agent bot lacks scope tool.search"},
    {"narrowed agent keeps the rest", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, false, AG_NARROWED,
     true, 200, "ok", "llm.chat", "acme", "allowed by scope llm.chat"},
    {"neither holds it", REFUND("acme"), true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT, false,
     403, "insufficient_scope", "refund.issue", "acme", "agent bot lacks scope refund.issue"},
    {"token holds what agent lacks",
     REFUND("globex"),
     true,
     TOKEN_OK,
     false,
     {"refund.issue", NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "refund.issue",
     "globex",
     "agent bot lacks scope refund.issue"},
    {"prefix scope is not a grant",
     SEARCH("acme"),
     true,
     TOKEN_OK,
     false,
     {"tool", "tool.", NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "tool.search",
     "acme",
     "agent bot lacks scope tool.search"},

    /* allowed */
    {"exact scope",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {"llm.chat", NULL},
     false,
     AG_BOT,
     true,
     200,
     "ok",
     "llm.chat",
     "acme",
     "allowed by scope llm.chat"},
    {"exact scope with {tenant}",
     SEARCH("acme"),
     true,
     TOKEN_OK,
     false,
     {"tool.search", NULL},
     false,
     AG_BOT,
     true,
     200,
     "ok",
     "tool.search",
     "acme",
     "allowed by scope tool.search"},
    {"wildcard token and agent",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {"llm.*", NULL},
     false,
     AG_WILD,
     true,
     200,
     "ok",
     "llm.chat",
     "acme",
     "allowed by scope llm.chat"},
    {"wildcard token, exact agent",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {"llm.*", NULL},
     false,
     AG_BOT,
     true,
     200,
     "ok",
     "llm.chat",
     "acme",
     "allowed by scope llm.chat"},
    {"exact token, wildcard agent",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {"llm.chat", NULL},
     false,
     AG_WILD,
     true,
     200,
     "ok",
     "llm.chat",
     "acme",
     "allowed by scope llm.chat"},
    {"wildcard agent, token lacks",
     CHAT,
     true,
     TOKEN_OK,
     false,
     {"refund.issue", NULL},
     false,
     AG_WILD,
     false,
     403,
     "insufficient_scope",
     "llm.chat",
     "acme",
     "agent wild lacks scope llm.chat"},
    {"wildcard of another family",
     SEARCH("acme"),
     true,
     TOKEN_OK,
     false,
     {"llm.*", NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "tool.search",
     "acme",
     "agent bot lacks scope tool.search"},
    {"star token bounded by agent",
     REFUND("acme"),
     true,
     TOKEN_OK,
     false,
     {"*", NULL},
     false,
     AG_BOT,
     false,
     403,
     "insufficient_scope",
     "refund.issue",
     "acme",
     "agent bot lacks scope refund.issue"},
    {"star token and star agent",
     REFUND("acme"),
     true,
     TOKEN_OK,
     false,
     {"*", NULL},
     false,
     AG_STAR,
     true,
     200,
     "ok",
     "refund.issue",
     "acme",
     "allowed by scope refund.issue"},
};

/* SPEC 1: a token the store has no record of (run with token_unknown set); it is refused
 * before the revocation check. */
static const struct decide_case unknown_cases[] = {
    {"unknown to the store", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, false, AG_BOT, false, 401,
     "invalid_token", "llm.chat", NULL, "token is unknown to this pep's store"},
    {"unknown to the store before revoked", CHAT, true, TOKEN_OK, false, BOTH_SCOPES, true, AG_BOT,
     false, 401, "invalid_token", "llm.chat", NULL, "token is unknown to this pep's store"},
};

static void run_case(const struct fixture *fx, const struct decide_case *c, bool unknown) {
    print_message("case: %s\n", c->name);
    struct route_match m;
    const struct route *r = route_match(fx->policy, c->method, c->path, &m);

    /* Claims are a plain struct: built by hand, never released (no heap). */
    char *scopes[MAX_SCOPES] = {0};
    size_t n = 0;
    while (n < MAX_SCOPES && c->token_scopes[n]) {
        scopes[n] = (char *)c->token_scopes[n];
        n++;
    }
    struct token_claims claims = {
        .sub = (char *)(c->agent == AG_WILD   ? "wild"
                        : c->agent == AG_STAR ? "root"
                                              : "bot"),
        .jti = "AAAAAAAAAAAAAAAAAAAAAA",
        .iss = "pep",
        .aud = "pep",
        .iat = NOW_S - 60,
        .nbf = NOW_S - 60,
        .exp = NOW_S + 3600,
        .scopes = scopes,
        .scopes_len = n,
        .refcount = 1,
    };
    struct decide_input in = {
        .policy = fx->policy,
        .match = r ? &m : NULL,
        .token_present = c->token_present,
        .token_status = c->status,
        .claims = c->no_claims ? NULL : &claims,
        .token_revoked = c->revoked,
        .token_unknown = unknown,
        .agent = fx->agents[c->agent],
        .now_s = NOW_S,
    };
    struct decision out;
    memset(&out, 0xa5, sizeof out); /* decide must set every field */
    decide(&in, &out);

    assert_int_equal(out.allow, c->allow);
    assert_int_equal(out.status, c->http);
    assert_non_null(out.code);
    assert_string_equal(out.code, c->code);
    assert_string_equal(out.reason, c->reason);
    assert_true(strlen(out.reason) > 0);
    assert_false(looks_like_jwt(out.reason));
    if (c->action) {
        assert_non_null(r);
        assert_non_null(out.action);
        assert_ptr_equal(out.action, r->action);
        assert_string_equal(out.action->name, c->action);
    } else {
        assert_null(r);
        assert_null(out.action);
    }
    if (c->tenant) {
        assert_non_null(out.tenant);
        assert_int_equal(out.tenant_len, strlen(c->tenant));
        assert_memory_equal(out.tenant, c->tenant, out.tenant_len);
    } else {
        assert_null(out.tenant);
        assert_int_equal(out.tenant_len, 0);
    }
}

static void test_decide_table(void **state) {
    const struct fixture *fx = *state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++)
        run_case(fx, &cases[i], false);
    for (size_t i = 0; i < PEP_ARRAY_LEN(unknown_cases); i++)
        run_case(fx, &unknown_cases[i], true);
}

/* Every code decide() can produce appears in the table with its status. */
static void test_decide_table_covers_every_code(void **state) {
    (void)state;
    static const struct {
        const char *code;
        int status;
    } codes[] = {{"no_route", 404},
                 {"invalid_token", 401},
                 {"tenant_mismatch", 403},
                 {"insufficient_scope", 403},
                 {"ok", 200}};
    for (size_t i = 0; i < PEP_ARRAY_LEN(codes); i++) {
        bool seen = false;
        for (size_t j = 0; j < PEP_ARRAY_LEN(cases); j++) {
            if (strcmp(cases[j].code, codes[i].code) == 0) {
                assert_int_equal(cases[j].http, codes[i].status);
                seen = true;
            }
        }
        assert_true(seen);
    }
    /* and every token_status other than TOKEN_OK */
    for (int st = TOKEN_MALFORMED; st <= TOKEN_NOT_YET_VALID; st++) {
        bool seen = false;
        for (size_t j = 0; j < PEP_ARRAY_LEN(cases); j++)
            seen |= cases[j].token_present && (int)cases[j].status == st &&
                    strcmp(cases[j].reason, token_status_message(st)) == 0;
        assert_true(seen);
    }
}

/* Decides method+path for an agent holding a valid token with one scope. */
static void decide_one(const struct fixture *fx, const char *method, const char *path,
                       const struct agent *agent, const char *scope, struct decision *out) {
    struct route_match m;
    assert_non_null(route_match(fx->policy, method, path, &m));
    char *scopes[] = {(char *)scope};
    struct token_claims claims = {
        .sub = agent->id, .jti = "j", .scopes = scopes, .scopes_len = 1, .refcount = 1};
    struct decide_input in = {.policy = fx->policy,
                              .match = &m,
                              .token_present = true,
                              .token_status = TOKEN_OK,
                              .claims = &claims,
                              .agent = agent,
                              .now_s = NOW_S};
    decide(&in, out);
}

/* The tenant returned points into the path the route was matched against (no copy). */
static void test_decide_tenant_points_into_path(void **state) {
    const struct fixture *fx = *state;
    char path[] = "/v1/tenants/globex/search";
    struct decision out;
    decide_one(fx, "GET", path, fx->agents[AG_BOT], "tool.search", &out);
    assert_true(out.allow);
    assert_ptr_equal(out.tenant, path + strlen("/v1/tenants/"));
    assert_int_equal(out.tenant_len, 6);
}

/* A tenant longer than the reason buffer is truncated in the reason, never overflows. */
static void test_decide_long_tenant(void **state) {
    const struct fixture *fx = *state;
    char path[1200];
    char tenant[1000];
    memset(tenant, 't', sizeof tenant - 1);
    tenant[sizeof tenant - 1] = '\0';
    snprintf(path, sizeof path, "/v1/tenants/%s/search", tenant);
    struct decision out;
    decide_one(fx, "GET", path, fx->agents[AG_BOT], "tool.search", &out);
    assert_false(out.allow);
    assert_int_equal(out.status, 403);
    assert_string_equal(out.code, "tenant_mismatch");
    assert_int_equal(out.tenant_len, strlen(tenant));
    assert_true(strlen(out.reason) < sizeof out.reason);
    assert_true(strncmp(out.reason, "agent bot may not act for tenant ttt", 36) == 0);
}

/* An agent with no tenant acts for nobody, even on a route without {tenant}. */
static void test_decide_agent_without_tenant(void **state) {
    const struct fixture *fx = *state;
    const char *scopes[] = {"llm.chat"};
    struct agent *lonely = agent_new("lonely", "o", NULL, 0, scopes, 1, true, 1, 1);
    assert_non_null(lonely);
    struct decision out;
    decide_one(fx, "POST", "/v1/chat/completions", lonely, "llm.chat", &out);
    assert_false(out.allow);
    assert_int_equal(out.status, 403);
    assert_string_equal(out.code, "tenant_mismatch");
    assert_string_equal(out.reason, "agent lonely has no tenant");
    agent_release(lonely);
}

/* ---- scope_grants ---------------------------------------------------------------------- */

struct grant_case {
    const char *granted;
    const char *wanted;
    bool grants;
};

static const struct grant_case grant_cases[] = {
    {"llm.chat", "llm.chat", true},
    {"llm.chat", "llm.chat2", false},
    {"llm.chat", "llm", false},
    {"llm", "llm.chat", false}, /* a bare family is not a wildcard */
    {"LLM.chat", "llm.chat", false},
    {"*", "llm.chat", true},
    {"*", "x", true},
    {"*", "*", true},
    {"x.*", "x.y", true},
    {"x.*", "x.y.z", true},
    {"x.*", "x.*", true}, /* equal strings */
    {"x.*", "x", false},
    {"x.*", "xy.z", false},
    {"x.*", "x.", false},
    {"x.*", "y.x", false},
    {"x.*", "X.y", false},
    {"x.y", "x.*", false},
    {"x.y.*", "x.y.z", true},
    {"x.y.*", "x.yz", false},
    {"x.y.*", "x.y", false},
    {"x*", "xy", false}, /* '*' only after a dot */
    {"x*", "x.y", false},
    {"*.y", "x.y", false}, /* no leading wildcard */
    {"x.", "x.y", false},
    {"", "x", false},
    {"x", "", false},
    {"x.*", "", false},
    {"", "", true}, /* equal; policies and tokens never hold an empty scope */
};

static void test_scope_grants_table(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(grant_cases); i++) {
        const struct grant_case *c = &grant_cases[i];
        print_message("scope_grants(\"%s\", \"%s\")\n", c->granted, c->wanted);
        assert_int_equal(scope_grants(c->granted, c->wanted), c->grants);
    }
}

/* ---- scope_effective_grants -------------------------------------------------------------- */

struct effective_case {
    const char *token[3]; /* NULL-terminated */
    const char *agent[3];
    const char *wanted;
    bool grants;
};

static const struct effective_case effective_cases[] = {
    {{"a.b", NULL}, {"a.b", NULL}, "a.b", true},
    {{"a.b", NULL}, {"a.*", NULL}, "a.b", true},
    {{"a.*", NULL}, {"a.b", NULL}, "a.b", true},
    {{"a.*", NULL}, {"a.b", NULL}, "a.c", false},
    {{"a.b", NULL}, {"c.d", NULL}, "a.b", false},
    {{"a.b", NULL}, {"c.d", NULL}, "c.d", false},
    {{"a.b", "c.d"}, {"c.d", NULL}, "a.b", false},
    {{"a.b", "c.d"}, {"c.d", NULL}, "c.d", true},
    {{NULL}, {"a.b", NULL}, "a.b", false},
    {{"a.b", NULL}, {NULL}, "a.b", false},
    {{NULL}, {NULL}, "a.b", false},
    {{"*", NULL}, {"*", NULL}, "any.thing", true},
    {{"*", NULL}, {"a.b", NULL}, "a.c", false},
    {{"a.b", NULL}, {"*", NULL}, "a.c", false},
    {{"a.*", NULL}, {"*", NULL}, "a.c.d", true},
};

static void test_scope_effective_grants_table(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(effective_cases); i++) {
        const struct effective_case *c = &effective_cases[i];
        char *tv[3] = {0};
        size_t tn = 0, an = 0;
        while (tn < 3 && c->token[tn]) {
            tv[tn] = (char *)c->token[tn];
            tn++;
        }
        while (an < 3 && c->agent[an])
            an++;
        struct token_claims claims = {
            .sub = "a", .jti = "j", .scopes = tv, .scopes_len = tn, .refcount = 1};
        const char *tenants[] = {"t"};
        struct agent *a = agent_new("a", "o", tenants, 1, c->agent, an, true, 0, 0);
        assert_non_null(a);
        print_message("effective case %zu: %s\n", i, c->wanted);
        assert_int_equal(scope_effective_grants(&claims, a, c->wanted), c->grants);
        agent_release(a);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_decide_agent_without_tenant, setup, teardown),
        cmocka_unit_test(test_jwt_detector),
        cmocka_unit_test_setup_teardown(test_decide_table, setup, teardown),
        cmocka_unit_test(test_decide_table_covers_every_code),
        cmocka_unit_test_setup_teardown(test_decide_tenant_points_into_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_decide_long_tenant, setup, teardown),
        cmocka_unit_test(test_scope_grants_table),
        cmocka_unit_test(test_scope_effective_grants_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
