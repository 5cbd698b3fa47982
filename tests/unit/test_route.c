/*
 * test_route.c — path normalization (SPEC 3.3), template compilation and route matching
 * (pep/route.c).
 *
 * The normalization table is the security contract: every path an upstream could read
 * differently from pep ("..", ".", "//", encoded '/', '.', '\', NUL or control bytes,
 * broken escapes) must be refused with the stated reason, and legitimate escapes decoded.
 * Matching is checked on a hand-built policy so that it does not depend on the YAML
 * compiler.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pep/route.h"

/* ---- normalization ------------------------------------------------------------------- */

struct norm_case {
    const char *raw;
    size_t len;          /* 0: strlen(raw) */
    const char *decoded; /* NULL: must be refused */
    const char *why;     /* the reason when refused */
};

static const struct norm_case norm_cases[] = {
    /* accepted */
    {"/", 0, "/", NULL},
    {"/a", 0, "/a", NULL},
    {"/v1/tenants/acme/search", 0, "/v1/tenants/acme/search", NULL},
    {"/a/", 0, "/a/", NULL}, /* a trailing slash is kept (and then matches no template) */
    {"/a%20b", 0, "/a b", NULL},
    {"/a%41%7e", 0, "/aA~", NULL},
    {"/caf%C3%A9", 0, "/caf\xc3\xa9", NULL},
    {"/a%25b", 0, "/a%b", NULL}, /* decoded once, never twice */
    {"/a%252e", 0, "/a%2e", NULL},
    {"/a..b/c.d", 0, "/a..b/c.d", NULL}, /* dots inside a segment are fine */
    {"/.well-known/jwks.json", 0, "/.well-known/jwks.json", NULL},
    {"/...", 0, "/...", NULL},
    {"/a?x=/../y", 0, "/a", NULL}, /* only the path part is looked at */
    {"/a?", 0, "/a", NULL},
    {"/ab", 2, "/a", NULL}, /* raw_len bytes only */
    {"/caf\xc3\xa9", 0, "/caf\xc3\xa9", NULL},
    /* refused */
    {"", 0, NULL, "empty path"},
    {"?x=1", 0, NULL, "empty path"},
    {"a/b", 0, NULL, "path must start with '/'"},
    {"%zz", 0, NULL, "path must start with '/'"},
    {"/a/../b", 0, NULL, "dot segment"},
    {"/a/./b", 0, NULL, "dot segment"},
    {"/a/..", 0, NULL, "dot segment"},
    {"/a/.", 0, NULL, "dot segment"},
    {"/..", 0, NULL, "dot segment"},
    {"/./", 0, NULL, "dot segment"},
    {"/a/..?x", 0, NULL, "dot segment"},
    {"/a//b", 0, NULL, "empty segment"},
    {"//", 0, NULL, "empty segment"},
    {"//a", 0, NULL, "empty segment"},
    {"/%2e%2e/x", 0, NULL, "encoded dot"},
    {"/%2E/", 0, NULL, "encoded dot"},
    {"/a%2eb", 0, NULL, "encoded dot"},
    {"/a%2fb", 0, NULL, "encoded slash"},
    {"/a%2Fb", 0, NULL, "encoded slash"},
    {"/a%5cb", 0, NULL, "encoded backslash"},
    {"/a%5Cb", 0, NULL, "encoded backslash"},
    {"/a%00b", 0, NULL, "encoded control character"},
    {"/a%0d%0aX-Injected:1", 0, NULL, "encoded control character"},
    {"/a%1f", 0, NULL, "encoded control character"},
    {"/a%7f", 0, NULL, "encoded control character"},
    {"/a\\b", 0, NULL, "backslash"},
    {"/a\x01", 0, NULL, "control character"},
    {"/a\x7f", 0, NULL, "control character"},
    {"/a\tb", 0, NULL, "control character"},
    {"/a\0b", 4, NULL, "control character"},
    {"/a#b", 0, NULL, "invalid character"},
    {"/a b", 0, NULL, "invalid character"},
    {"/a%zz", 0, NULL, "malformed percent-escape"},
    {"/a%", 0, NULL, "malformed percent-escape"},
    {"/a%2", 0, NULL, "malformed percent-escape"},
    {"/a%2?x", 0, NULL, "malformed percent-escape"},
    {"/a%g0", 0, NULL, "malformed percent-escape"},
    {"/a%%41", 0, NULL, "malformed percent-escape"},
};

static void test_normalize_table(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof norm_cases / sizeof *norm_cases; i++) {
        const struct norm_case *c = &norm_cases[i];
        size_t len = c->len ? c->len : strlen(c->raw);
        char *decoded = (char *)1;
        const char *why = (const char *)1;
        int rc = route_normalize_path(c->raw, len, &decoded, &why);
        bool as_expected = c->decoded ? rc == 0 && decoded && strcmp(decoded, c->decoded) == 0
                                      : rc == PEP_EINVAL && why && strcmp(why, c->why) == 0;
        if (!as_expected)
            print_error("normalization case %zu ('%s') failed: rc %d, why %s\n", i, c->raw, rc,
                        rc == PEP_EINVAL && why ? why : "-");
        if (c->decoded) {
            assert_int_equal(rc, 0);
            assert_non_null(decoded);
            assert_string_equal(decoded, c->decoded);
            assert_null(why);
            free(decoded);
        } else {
            assert_int_equal(rc, PEP_EINVAL);
            assert_null(decoded);
            assert_non_null(why);
            assert_string_equal(why, c->why);
        }
    }
}

static void test_normalize_null_why(void **state) {
    (void)state;
    char *decoded = NULL;
    assert_int_equal(route_normalize_path("/a/../b", 7, &decoded, NULL), PEP_EINVAL);
    assert_null(decoded);
    assert_int_equal(route_normalize_path("/a", 2, &decoded, NULL), 0);
    assert_string_equal(decoded, "/a");
    free(decoded);
}

/* ---- templates ----------------------------------------------------------------------- */

struct template_case {
    const char *tmpl;
    const char *why;
};

static const struct template_case bad_templates[] = {
    {NULL, "a template must start with '/'"},
    {"", "a template must start with '/'"},
    {"v1/x", "a template must start with '/'"},
    {"/a//b", "empty segment"},
    {"/a/", "empty segment"},
    {"//", "empty segment"},
    {"/{x", "a parameter is written {name} and fills a whole segment"},
    {"/a{x}", "a parameter is written {name} and fills a whole segment"},
    {"/{x}a", "a parameter is written {name} and fills a whole segment"},
    {"/x}", "a parameter is written {name} and fills a whole segment"},
    {"/{}", "a parameter is written {name} and fills a whole segment"},
    {"/{1x}", "a parameter name is [A-Za-z_][A-Za-z0-9_]*"},
    {"/{a-b}", "a parameter name is [A-Za-z_][A-Za-z0-9_]*"},
    {"/{x}/{x}", "duplicate parameter name"},
    {"/a/../b", "dot segment"},
    {"/.", "dot segment"},
    {"/a%20b", "invalid character (templates hold decoded text, without ' ', '%', '\\', '?' "
               "or '#')"},
    {"/a b", "invalid character (templates hold decoded text, without ' ', '%', '\\', '?' or "
             "'#')"},
    {"/a?b", "invalid character (templates hold decoded text, without ' ', '%', '\\', '?' or "
             "'#')"},
    {"/a\\b", "invalid character (templates hold decoded text, without ' ', '%', '\\', '?' or "
              "'#')"},
    {"/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/{m}/{n}/{o}/{p}/{q}", "too many parameters"},
};

static void test_template_errors(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof bad_templates / sizeof *bad_templates; i++) {
        struct route_segment *segs = (struct route_segment *)1;
        size_t len = 99;
        const char *why = NULL;
        int rc = route_compile_template(bad_templates[i].tmpl, &segs, &len, &why);
        if (rc != PEP_EINVAL || !why || strcmp(why, bad_templates[i].why) != 0)
            print_error("template case %zu failed: rc %d, why %s\n", i, rc, why ? why : "-");
        assert_int_equal(rc, PEP_EINVAL);
        assert_null(segs);
        assert_int_equal(len, 0);
        assert_string_equal(why, bad_templates[i].why);
    }
}

static void test_template_compile(void **state) {
    (void)state;
    struct route_segment *segs = NULL;
    size_t len = 99;
    const char *why = "x";
    assert_int_equal(route_compile_template("/", &segs, &len, &why), 0);
    assert_int_equal(len, 0);
    assert_null(why);
    route_segments_free(segs, len);

    assert_int_equal(
        route_compile_template("/v1/tenants/{tenant}/refunds/{_id2}", &segs, &len, &why), 0);
    assert_int_equal(len, 5);
    assert_string_equal(segs[0].literal, "v1");
    assert_null(segs[0].param);
    assert_string_equal(segs[1].literal, "tenants");
    assert_null(segs[2].literal);
    assert_string_equal(segs[2].param, "tenant");
    assert_string_equal(segs[3].literal, "refunds");
    assert_string_equal(segs[4].param, "_id2");
    route_segments_free(segs, len);

    /* Exactly ROUTE_MAX_PARAMS parameters is allowed. */
    assert_int_equal(route_compile_template("/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}/{j}/{k}/{l}/"
                                            "{m}/{n}/{o}/{p}",
                                            &segs, &len, &why),
                     0);
    assert_int_equal(len, ROUTE_MAX_PARAMS);
    route_segments_free(segs, len);
}

/* ---- matching ------------------------------------------------------------------------ */

static const struct {
    const char *method;
    const char *path;
} match_routes[] = {
    {"POST", "/v1/chat/completions"},          /* 0 */
    {"GET", "/v1/tenants/{tenant}/search"},    /* 1 */
    {NULL, "/v1/tenants/{tenant}/items/{id}"}, /* 2: any method */
    {"GET", "/v1/tenants/acme/search"},        /* 3: shadowed by 1 */
    {NULL, "/"},                               /* 4 */
    {"GET", "/v1/{a}/{b}"},                    /* 5 */
};

static int teardown_policy(void **state);

static int setup_policy(void **state) {
    size_t n = sizeof match_routes / sizeof *match_routes;
    struct policy *p = calloc(1, sizeof *p);
    if (!p) return -1;
    *state = p;
    p->routes = calloc(n, sizeof *p->routes);
    for (size_t i = 0; p->routes && i < n; i++) {
        struct route *r = &p->routes[p->routes_len++];
        const char *why;
        r->method = match_routes[i].method ? strdup(match_routes[i].method) : NULL;
        r->path = strdup(match_routes[i].path);
        r->tenant_param = -1;
        if (!r->path || route_compile_template(r->path, &r->segments, &r->segments_len, &why))
            break;
        for (size_t j = 0; j < r->segments_len; j++)
            if (r->segments[j].param && strcmp(r->segments[j].param, "tenant") == 0)
                r->tenant_param = (int)j;
    }
    if (p->routes_len == n && p->routes[n - 1].segments) return 0;
    teardown_policy(state); /* cmocka runs no teardown after a failed setup */
    return -1;
}

static int teardown_policy(void **state) {
    struct policy *p = *state;
    for (size_t i = 0; i < p->routes_len; i++) {
        free(p->routes[i].method);
        free(p->routes[i].path);
        route_segments_free(p->routes[i].segments, p->routes[i].segments_len);
    }
    free(p->routes);
    free(p);
    return 0;
}

/* Expects method+path to match route index want (-1: no match). */
static const struct route *expect_match(const struct policy *p, const char *method,
                                        const char *path, int want, struct route_match *m) {
    const struct route *r = route_match(p, method, path, m);
    if (want < 0 ? r != NULL : r != &p->routes[want])
        print_error("%s %s: expected route %d\n", method ? method : "(null)", path, want);
    if (want < 0) {
        assert_null(r);
        assert_null(m->route);
        assert_int_equal(m->params_len, 0);
        assert_null(m->tenant);
        return NULL;
    }
    assert_ptr_equal(r, &p->routes[want]);
    assert_ptr_equal(m->route, r);
    return r;
}

static void assert_param(const struct route_param *param, const char *name, const char *value) {
    assert_string_equal(param->name, name);
    assert_int_equal(param->value_len, strlen(value));
    assert_memory_equal(param->value, value, param->value_len);
}

static void test_match_first_match_and_method(void **state) {
    const struct policy *p = *state;
    struct route_match m;
    expect_match(p, "POST", "/v1/chat/completions", 0, &m);
    assert_int_equal(m.params_len, 0);
    assert_null(m.tenant);
    /* GET skips route 0 (POST only) and lands on the generic GET route 5. */
    expect_match(p, "GET", "/v1/chat/completions", 5, &m);
    assert_int_equal(m.params_len, 2);
    assert_param(&m.params[0], "a", "chat");
    assert_param(&m.params[1], "b", "completions");
    assert_null(m.tenant);
    /* No route for PUT on that path. */
    expect_match(p, "PUT", "/v1/chat/completions", -1, &m);
    /* Route 1 comes before the literal route 3: first match wins. */
    expect_match(p, "GET", "/v1/tenants/acme/search", 1, &m);
    assert_int_equal(m.params_len, 1);
    assert_param(&m.params[0], "tenant", "acme");
    assert_ptr_equal(m.tenant, &m.params[0]);
    expect_match(p, "POST", "/v1/tenants/acme/search", -1, &m);
}

static void test_match_params_and_tenant(void **state) {
    const struct policy *p = *state;
    struct route_match m;
    const char *path = "/v1/tenants/globex/items/42";
    expect_match(p, "DELETE", path, 2, &m);
    assert_int_equal(m.params_len, 2);
    assert_param(&m.params[0], "tenant", "globex");
    assert_param(&m.params[1], "id", "42");
    assert_ptr_equal(m.tenant, &m.params[0]);
    /* Values point into the caller's path. */
    assert_ptr_equal(m.params[0].value, path + strlen("/v1/tenants/"));
    assert_ptr_equal(m.params[1].value, path + strlen("/v1/tenants/globex/items/"));
    /* Any method matches a route without one. */
    expect_match(p, "PATCH", path, 2, &m);
    /* Decoded text is matched: a value may hold what its escape meant. */
    expect_match(p, "GET", "/v1/tenants/a b/items/x%y", 2, &m);
    assert_param(&m.params[0], "tenant", "a b");
    assert_param(&m.params[1], "id", "x%y");
}

static void test_match_segments_exactly(void **state) {
    const struct policy *p = *state;
    struct route_match m;
    /* {name} needs a non-empty segment. */
    expect_match(p, "GET", "/v1/tenants//search", -1, &m);
    expect_match(p, "GET", "/v1/tenants/acme/items/", -1, &m);
    /* A trailing slash does not match the template without one. */
    expect_match(p, "POST", "/v1/chat/completions/", -1, &m);
    expect_match(p, "GET", "/v1/tenants/acme/search/", -1, &m);
    /* Neither does a prefix or a longer path. */
    expect_match(p, "POST", "/v1/chat", -1, &m);
    expect_match(p, "POST", "/v1/chat/completionsX", -1, &m);
    expect_match(p, "POST", "/v1/chat/completions/x", -1, &m);
    /* Literals are case-sensitive. */
    expect_match(p, "POST", "/V1/chat/completions", -1, &m);
    /* "/" matches only "/". */
    expect_match(p, "OPTIONS", "/", 4, &m);
    assert_int_equal(m.params_len, 0);
    expect_match(p, "OPTIONS", "/x", -1, &m);
    /* Not a path at all. */
    expect_match(p, "GET", "", -1, &m);
    expect_match(p, "GET", "v1/a/b", -1, &m);
}

static void test_match_stale_state_cleared(void **state) {
    const struct policy *p = *state;
    struct route_match m;
    expect_match(p, "DELETE", "/v1/tenants/globex/items/42", 2, &m);
    /* A later miss leaves no parameter of the earlier attempt behind, even when a route
     * matched partway ({tenant} filled, then "items" vs "search" failed). */
    expect_match(p, "DELETE", "/v1/tenants/globex/search", -1, &m);
    assert_null(route_match(p, "GET", "/x", NULL)); /* m may be NULL */
    assert_ptr_equal(route_match(p, "GET", "/", NULL), &p->routes[4]);
}

static void test_match_empty_policy(void **state) {
    (void)state;
    struct policy empty = {0};
    struct route_match m;
    assert_null(route_match(&empty, "GET", "/", &m));
    assert_null(route_match(NULL, "GET", "/", &m));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_normalize_table),
        cmocka_unit_test(test_normalize_null_why),
        cmocka_unit_test(test_template_errors),
        cmocka_unit_test(test_template_compile),
        cmocka_unit_test_setup_teardown(test_match_first_match_and_method, setup_policy,
                                        teardown_policy),
        cmocka_unit_test_setup_teardown(test_match_params_and_tenant, setup_policy,
                                        teardown_policy),
        cmocka_unit_test_setup_teardown(test_match_segments_exactly, setup_policy, teardown_policy),
        cmocka_unit_test_setup_teardown(test_match_stale_state_cleared, setup_policy,
                                        teardown_policy),
        cmocka_unit_test(test_match_empty_policy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
