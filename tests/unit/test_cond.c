/*
 * test_cond.c — the `when` evaluator (pep/cond.c) against SPEC 2 and SPEC 8 "Conditions".
 *
 * Conditions are written as YAML and compiled by the real policy compiler, so the tables
 * read like policies and check the compiler's typing of values along the way (10 is an
 * integer, 10.0 a real, "10" a string).  Every evaluation runs twice (same answer) and,
 * outside ASan builds, with malloc counted: cond_holds must not allocate (DESIGN rule 1).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pep/cond.h"

/* ---- counting allocations (glibc, not under ASan, which owns malloc) ----------------- */

static bool counting;
static int allocations;

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
#define COUNTS_ALLOCATIONS 1
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
void *malloc(size_t n) {
    allocations += counting;
    return __libc_malloc(n);
}
void *calloc(size_t n, size_t size) {
    allocations += counting;
    return __libc_calloc(n, size);
}
void *realloc(void *p, size_t n) {
    allocations += counting;
    return __libc_realloc(p, n);
}
#else
#define COUNTS_ALLOCATIONS 0
#endif

/* ---- the request every table row is evaluated against -------------------------------- */

/* Every JSON type, nested objects, numbers at the edges of int64 and of doubles. */
static const char default_body[] =
    "{\"s\": \"abc\", \"n\": \"1000\", \"i\": 10, \"r\": 2.5, \"ten\": 10.0, \"t\": true,"
    " \"f\": false, \"z\": null, \"zero\": 0, \"e\": \"\", \"o\": {\"a\": {\"b\": 1}},"
    " \"arr\": [1, 2], \"ea\": [], \"eo\": {}, \"nul\": \"a\\u0000b\","
    " \"big\": 9007199254740993, \"bigr\": 9007199254740992.0,"
    " \"imax\": 9223372036854775807, \"imin\": -9223372036854775808}";

static const char default_query[] =
    "a=%41b+c&n=42&rep=first&rep=second&empty=&bare&pct=100%&pct2=%zz&short=%4"
    "&enc%20key=v&p+k=1&plus=1+2&nul=a%00b&x=%2B1&amp=x%26y&eqs=1=2&k%3Dz=1&&last=%41";

static const char *const headers[][2] = {
    {"x-amount", "1500"}, {"x-name", "Alice"}, {"x-empty", ""},
    {"x-num", "-1.5e1"},  {"x-true", "true"},  {"x-space", " 42"},
};

static const char *header_of(void *arg, const char *name) {
    int *calls = arg;
    (*calls)++;
    for (size_t i = 0; i < sizeof headers / sizeof headers[0]; i++)
        if (strcmp(headers[i][0], name) == 0) return headers[i][1];
    return NULL;
}

static int header_calls;
static struct route_match default_match = {
    .params = {{.name = "tenant", .value = "acme/x", .value_len = 4},
               {.name = "id", .value = "10", .value_len = 2}},
    .params_len = 2,
};

/* 2023-11-14T22:13:20Z, a Tuesday. */
#define DEFAULT_NOW 1700000000

static struct cond_request default_request(const json_t *body) {
    return (struct cond_request){
        .body = body,
        .header = header_of,
        .header_arg = &header_calls,
        .query = default_query,
        .match = &default_match,
        .method = "POST",
        .tenant = "acmeXYZ", /* not NUL-terminated at its length: only 4 bytes count */
        .tenant_len = 4,
        .agent_id = "bot-1",
        .agent_owner = "alice",
        .now_s = DEFAULT_NOW,
    };
}

/* ---- compiling and evaluating ------------------------------------------------------- */

static struct policy *compile(const char *controls) {
    char yaml[8192];
    int n = snprintf(yaml, sizeof yaml, "version: 1\nactions:\n  a:\n    scope: s\n%s", controls);
    assert_true(n > 0 && (size_t)n < sizeof yaml);
    struct policy *p = NULL;
    struct policy_errors errs;
    int rc = policy_load_buffer("t.yaml", yaml, strlen(yaml), &p, &errs);
    for (size_t i = 0; i < errs.len; i++)
        print_error("%s\n", errs.items[i]);
    policy_errors_free(&errs);
    assert_int_equal(rc, 0);
    return p;
}

/* Compiles `when` (a YAML flow mapping) and evaluates it, checking purity on the way. */
static bool eval(const char *when, const struct cond_request *req) {
    char controls[4096];
    snprintf(controls, sizeof controls, "    controls:\n      - when: %s\n        deny: x\n", when);
    struct policy *p = compile(controls);
    const struct cond *c = p->actions[0].controls[0].when;
    assert_non_null(c);
    allocations = 0;
    counting = true;
    bool first = cond_holds(c, req), second = cond_holds(c, req);
    counting = false;
    policy_release(p);
    if (allocations != 0) print_error("%s: %d allocations\n", when, allocations);
    assert_int_equal(allocations, 0);
    assert_true(first == second);
    return first;
}

static json_t *parse(const char *text) {
    json_error_t err;
    json_t *j = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    if (!j) print_error("%s: %s\n", text, err.text);
    assert_non_null(j);
    return j;
}

struct row {
    const char *when;
    bool want;
    const char *body;  /* NULL: default_body; "-": no body */
    const char *query; /* NULL: default_query; "-": no query */
};

/* Evaluates every row; prints each one that is wrong, then fails if any was. */
static void run_rows(const struct row *rows, size_t n) {
    int wrong = 0;
    for (size_t i = 0; i < n; i++) {
        const struct row *r = &rows[i];
        const char *btext = r->body ? r->body : default_body;
        json_t *body = strcmp(btext, "-") == 0 ? NULL : parse(btext);
        struct cond_request req = default_request(body);
        if (r->query) req.query = strcmp(r->query, "-") == 0 ? NULL : r->query;
        bool got = eval(r->when, &req);
        if (got != r->want) {
            print_error("row %zu: %s%s%s%s%s should be %s\n", i, r->when, r->body ? " body " : "",
                        r->body ? r->body : "", r->query ? " query " : "", r->query ? r->query : "",
                        r->want ? "true" : "false");
            wrong++;
        }
        json_decref(body);
    }
    assert_int_equal(wrong, 0);
}

#define ROW(when, want)                                                                            \
    { when, want, NULL, NULL }
#define ROW_BODY(when, want, body)                                                                 \
    { when, want, body, NULL }
#define ROW_QUERY(when, want, query)                                                               \
    { when, want, NULL, query }
#define RUN(rows) run_rows(rows, sizeof(rows) / sizeof((rows)[0]))

/* ---- every op against every JSON type ----------------------------------------------- */

static void test_ops_by_body_type(void **state) {
    (void)state;
    static const struct row rows[] = {
        /* string */
        ROW("{ body.s: { eq: abc } }", true),
        ROW("{ body.s: { ne: abc } }", false),
        ROW("{ body.s: { ne: abd } }", true),
        ROW("{ body.s: { lt: 100 } }", false),
        ROW("{ body.s: { le: 10 } }", false),
        ROW("{ body.s: { gt: 1 } }", false),
        ROW("{ body.s: { ge: 10 } }", false),
        ROW("{ body.s: { in: [1, abc] } }", true),
        ROW("{ body.s: { in: [ab, abcd] } }", false),
        ROW("{ body.s: { not_in: [abc] } }", false),
        ROW("{ body.s: { not_in: [x, y] } }", true),
        ROW("{ body.s: { exists: true } }", true),
        ROW("{ body.s: { exists: false } }", false),
        ROW("{ body.s: { prefix: ab } }", true),
        ROW("{ body.s: { prefix: abcd } }", false),
        ROW("{ body.s: { prefix: \"\" } }", true),
        ROW("{ body.s: { eq: ABC } }", false), /* case-sensitive */
        /* a string that is wholly a number compares as one against a number, as a
         * header or query value does: {"amount": "5000"} cannot slip under `gt: 1000` */
        ROW("{ body.n: { gt: 999 } }", true),
        ROW("{ body.n: { lt: 999 } }", false),
        ROW("{ body.n: { eq: 1000 } }", true),
        ROW("{ body.n: { eq: 1e3 } }", true),
        ROW("{ body.n: { ne: 1000 } }", false),
        ROW("{ body.n: { eq: \"1000\" } }", true),
        ROW("{ body.n: { eq: \"1e3\" } }", false), /* against a string: the bytes */
        ROW("{ body.n: { in: [1000] } }", true),
        ROW("{ body.n: { prefix: 10 } }", true),
        ROW("{ body.s: { gt: 0 } }", false), /* not a number: no order */
        ROW("{ body.s: { ne: 0 } }", true),
        /* integer */
        ROW("{ body.i: { eq: 10 } }", true),
        ROW("{ body.i: { eq: 10.0 } }", true),
        ROW("{ body.i: { eq: \"10\" } }", false),
        ROW("{ body.i: { ne: 10 } }", false),
        ROW("{ body.i: { ne: \"10\" } }", true),
        ROW("{ body.i: { lt: 100 } }", true),
        ROW("{ body.i: { lt: 10 } }", false),
        ROW("{ body.i: { le: 10 } }", true),
        ROW("{ body.i: { gt: 1 } }", true),
        ROW("{ body.i: { gt: 10 } }", false),
        ROW("{ body.i: { ge: 10 } }", true),
        ROW("{ body.i: { ge: 10.5 } }", false),
        ROW("{ body.i: { in: [abc, 10] } }", true),
        ROW("{ body.i: { not_in: [10.0] } }", false),
        ROW("{ body.i: { exists: true } }", true),
        ROW("{ body.i: { prefix: 1 } }", false),
        ROW("{ body.i: { eq: true } }", false),
        /* real */
        ROW("{ body.r: { eq: 2.5 } }", true),
        ROW("{ body.r: { ne: 2.5 } }", false),
        ROW("{ body.r: { eq: 2 } }", false),
        ROW("{ body.r: { lt: 100 } }", true),
        ROW("{ body.r: { le: 2.5 } }", true),
        ROW("{ body.r: { gt: 2 } }", true),
        ROW("{ body.r: { lt: 3 } }", true),
        ROW("{ body.r: { ge: 3 } }", false),
        ROW("{ body.r: { in: [2.5] } }", true),
        ROW("{ body.r: { not_in: [2] } }", true),
        ROW("{ body.r: { prefix: 2 } }", false),
        ROW("{ body.ten: { eq: 10 } }", true), /* 10.0 equals 10 */
        ROW("{ body.ten: { in: [10] } }", true),
        ROW("{ body.ten: { ge: 10, le: 10 } }", true),
        /* bool */
        ROW("{ body.t: { eq: true } }", true),
        ROW("{ body.t: { ne: true } }", false),
        ROW("{ body.t: { eq: false } }", false),
        ROW("{ body.t: { eq: 1 } }", false),
        ROW("{ body.t: { eq: \"true\" } }", false),
        ROW("{ body.t: { lt: 100 } }", false),
        ROW("{ body.t: { gt: 0 } }", false),
        ROW("{ body.t: { in: [true] } }", true),
        ROW("{ body.t: { in: [\"true\", 1] } }", false),
        ROW("{ body.t: { not_in: [false] } }", true),
        ROW("{ body.t: { prefix: t } }", false),
        ROW("{ body.f: { eq: false } }", true),
        ROW("{ body.f: { exists: true } }", true),
        /* null */
        ROW("{ body.z: { eq: null } }", true),
        ROW("{ body.z: { eq: ~ } }", true),
        ROW("{ body.z: { ne: null } }", false),
        ROW("{ body.z: { eq: 0 } }", false),
        ROW("{ body.z: { eq: \"\" } }", false),
        ROW("{ body.z: { eq: false } }", false),
        ROW("{ body.z: { lt: 1 } }", false),
        ROW("{ body.z: { in: [null] } }", true),
        ROW("{ body.z: { not_in: [null] } }", false),
        ROW("{ body.z: { not_in: [0] } }", true),
        ROW("{ body.z: { exists: true } }", true),
        ROW("{ body.z: { exists: false } }", false),
        ROW("{ body.z: { prefix: n } }", false),
        ROW("{ body.i: { eq: null } }", false),
        /* object */
        ROW("{ body.o: { eq: 1 } }", false),
        ROW("{ body.o: { ne: 1 } }", true),
        ROW("{ body.o: { lt: 1 } }", false),
        ROW("{ body.o: { ge: 0 } }", false),
        ROW("{ body.o: { in: [1, a] } }", false),
        ROW("{ body.o: { not_in: [1] } }", true),
        ROW("{ body.o: { exists: true } }", true),
        ROW("{ body.o: { exists: false } }", false),
        ROW("{ body.o: { prefix: a } }", false),
        ROW("{ body.o: { eq: null } }", false),
        /* array */
        ROW("{ body.arr: { eq: 1 } }", false),
        ROW("{ body.arr: { ne: 1 } }", true),
        ROW("{ body.arr: { gt: 0 } }", false),
        ROW("{ body.arr: { in: [1] } }", false), /* the array is the value: no membership */
        ROW("{ body.arr: { not_in: [1] } }", true),
        ROW("{ body.arr: { exists: true } }", true),
        ROW("{ body.arr: { prefix: \"[\" } }", false),
        /* absent */
        ROW("{ body.nope: { eq: 1 } }", false),
        ROW("{ body.nope: { eq: null } }", false),
        ROW("{ body.nope: { ne: 1 } }", true),
        ROW("{ body.nope: { lt: 1 } }", false),
        ROW("{ body.nope: { le: 1 } }", false),
        ROW("{ body.nope: { gt: 1 } }", false),
        ROW("{ body.nope: { ge: 1 } }", false),
        ROW("{ body.nope: { in: [1, null] } }", false),
        ROW("{ body.nope: { not_in: [1] } }", false),
        ROW("{ body.nope: { exists: true } }", false),
        ROW("{ body.nope: { exists: false } }", true),
        ROW("{ body.nope: { prefix: \"\" } }", false),
        /* present "falsy" values exist */
        ROW("{ body.zero: { exists: true } }", true),
        ROW("{ body.e: { exists: true } }", true),
        ROW("{ body.ea: { exists: true } }", true),
        ROW("{ body.eo: { exists: true } }", true),
        ROW("{ body.zero: { eq: false } }", false),
        ROW("{ body.e: { eq: \"\" } }", true),
        ROW("{ body.e: { prefix: \"\" } }", true),
        /* strings with NUL compare all their bytes */
        ROW("{ body.nul: { eq: \"a\\0b\" } }", true),
        ROW("{ body.nul: { eq: a } }", false),
        ROW("{ body.nul: { prefix: a } }", true),
        ROW("{ body.nul: { prefix: \"a\\0\" } }", true),
        ROW("{ body.nul: { prefix: \"a\\0c\" } }", false),
    };
    RUN(rows);
}

/* ---- paths, bodies that are no object, numbers at the edges --------------------------- */

static void test_body_paths(void **state) {
    (void)state;
    static const struct row rows[] = {
        ROW("{ body.o.a.b: { eq: 1 } }", true),
        ROW("{ body.o.a: { exists: true } }", true),
        ROW("{ body.o.a: { eq: 1 } }", false),
        ROW("{ body.o.x.y: { exists: false } }", true),
        ROW("{ body.s.x: { exists: false } }", true),   /* through a string */
        ROW("{ body.arr.0: { exists: false } }", true), /* arrays are not indexed */
        ROW("{ body.z.x: { exists: false } }", true),   /* through null */
        ROW("{ body.o.a.b.c: { ne: 1 } }", true),
        ROW_BODY("{ body.i: { exists: false } }", true, "-"), /* no body */
        ROW_BODY("{ body.i: { ne: 1 } }", true, "-"),
        ROW_BODY("{ body.i: { not_in: [1] } }", false, "-"),
        ROW_BODY("{ body.i: { exists: false } }", true, "[{\"i\": 1}]"), /* root not an object */
        ROW_BODY("{ body.i: { exists: false } }", true, "5"),
        ROW_BODY("{ body.i: { exists: false } }", true, "\"i\""),
        ROW_BODY("{ \"body.a b.c\": { eq: 1 } }", true, "{\"a b\": {\"c\": 1}}"),
        ROW_BODY("{ body.k: { eq: 1 } }", true, "{\"k\": 1, \"K\": 2}"),
    };
    RUN(rows);
}

static void test_numbers_exact(void **state) {
    (void)state;
    static const struct row rows[] = {
        /* 2^53 + 1 is no double: as an integer it still exceeds the real 2^53 */
        ROW("{ body.big: { gt: 9007199254740992.0 } }", true),
        ROW("{ body.big: { eq: 9007199254740992.0 } }", false),
        ROW("{ body.big: { ne: 9007199254740992.0 } }", true),
        ROW("{ body.big: { eq: 9007199254740993 } }", true),
        ROW("{ body.big: { eq: 9007199254740992 } }", false),
        ROW("{ body.bigr: { lt: 9007199254740993 } }", true),
        ROW("{ body.bigr: { eq: 9007199254740992 } }", true),
        ROW("{ body.bigr: { in: [9007199254740993] } }", false),
        /* int64's ends against the reals ±2^63 */
        ROW("{ body.imax: { lt: 9223372036854775808.0 } }", true),
        ROW("{ body.imax: { eq: 9223372036854775808.0 } }", false),
        ROW("{ body.imax: { eq: 9223372036854775807 } }", true),
        ROW("{ body.imax: { gt: 1e300 } }", false),
        ROW("{ body.imin: { eq: -9223372036854775808.0 } }", true),
        ROW("{ body.imin: { eq: -9223372036854775808 } }", true),
        ROW("{ body.imin: { lt: -9223372036854775807 } }", true),
        ROW("{ body.imin: { gt: -1e300 } }", true),
        /* fractions against integers */
        ROW("{ body.i: { lt: 10.000001 } }", true),
        ROW("{ body.i: { gt: 9.999999 } }", true),
        ROW("{ body.i: { gt: -10.5 } }", true),
        ROW_BODY("{ body.v: { lt: -10 } }", true, "{\"v\": -10.5}"),
        ROW_BODY("{ body.v: { gt: -11 } }", true, "{\"v\": -10.5}"),
        ROW_BODY("{ body.v: { eq: -10 } }", false, "{\"v\": -10.5}"),
        ROW_BODY("{ body.v: { eq: 0 } }", true, "{\"v\": -0.0}"),
        ROW_BODY("{ body.v: { eq: 1000 } }", true, "{\"v\": 1e3}"),
        ROW_BODY("{ body.v: { eq: 1e3 } }", true, "{\"v\": 1000}"),
        ROW_BODY("{ body.v: { eq: 0x10 } }", true, "{\"v\": 16}"), /* YAML 1.2 hex */
        ROW_BODY("{ body.v: { eq: 0o17 } }", true, "{\"v\": 15}"),
    };
    RUN(rows);
}

/* ---- text fields -------------------------------------------------------------------- */

static void test_text_fields(void **state) {
    (void)state;
    static const struct row rows[] = {
        /* header names case-insensitive (the compiler lowercases), values case-sensitive */
        ROW("{ header.X-Amount: { eq: \"1500\" } }", true),
        ROW("{ header.x-name: { eq: Alice } }", true),
        ROW("{ header.X-NAME: { eq: alice } }", false),
        ROW("{ header.x-name: { ne: alice } }", true),
        ROW("{ header.x-missing: { exists: false } }", true),
        ROW("{ header.x-missing: { ne: x } }", true),
        ROW("{ header.x-missing: { eq: \"\" } }", false),
        ROW("{ header.x-empty: { exists: true } }", true),
        ROW("{ header.x-empty: { eq: \"\" } }", true),
        ROW("{ header.x-empty: { gt: -1 } }", false),
        ROW("{ header.x-empty: { prefix: \"\" } }", true),
        /* text that is a number compares as one against numbers */
        ROW("{ header.x-amount: { eq: 1500 } }", true),
        ROW("{ header.x-amount: { eq: 1500.0 } }", true),
        ROW("{ header.x-amount: { ne: 1500 } }", false),
        ROW("{ header.x-amount: { lt: 2000 } }", true),
        ROW("{ header.x-amount: { le: 1500 } }", true),
        ROW("{ header.x-amount: { gt: 1000 } }", true),
        ROW("{ header.x-amount: { ge: 1501 } }", false),
        ROW("{ header.x-amount: { in: [a, 1500.0] } }", true),
        ROW("{ header.x-amount: { not_in: [1] } }", true),
        ROW("{ header.x-amount: { prefix: 15 } }", true),
        ROW("{ header.x-amount: { eq: \"1500.0\" } }", false), /* against a string: bytes */
        ROW("{ header.x-num: { eq: -15 } }", true),            /* "-1.5e1" */
        ROW("{ header.x-num: { lt: -14.9 } }", true),
        ROW("{ header.x-space: { eq: 42 } }", false), /* " 42" is not entirely a number */
        ROW("{ header.x-space: { ne: 42 } }", true),
        /* text that is not a number */
        ROW("{ header.x-name: { gt: 0 } }", false),
        ROW("{ header.x-name: { lt: 0 } }", false),
        ROW("{ header.x-name: { eq: 0 } }", false),
        ROW("{ header.x-name: { ne: 0 } }", true),
        ROW("{ header.x-name: { in: [alice, Alice] } }", true),
        ROW("{ header.x-name: { not_in: [Bob] } }", true),
        ROW("{ header.x-name: { not_in: [Alice] } }", false),
        ROW("{ header.x-name: { prefix: Al } }", true),
        ROW("{ header.x-name: { prefix: al } }", false),
        /* text is never a bool or null */
        ROW("{ header.x-true: { eq: true } }", false),
        ROW("{ header.x-true: { ne: true } }", true),
        ROW("{ header.x-true: { eq: \"true\" } }", true),
        ROW("{ header.x-true: { in: [true, null] } }", false),
        ROW("{ method: { eq: null } }", false),
        /* path parameters */
        ROW("{ path.id: { eq: \"10\" } }", true),
        ROW("{ path.id: { eq: 10 } }", true),
        ROW("{ path.id: { gt: 9.5 } }", true),
        ROW("{ path.tenant: { eq: acme } }", true), /* value_len bytes only */
        ROW("{ path.nope: { exists: false } }", true),
        ROW("{ path.nope: { ne: x } }", true),
        /* method, tenant, agent */
        ROW("{ method: { eq: POST } }", true),
        ROW("{ method: { eq: post } }", false),
        ROW("{ method: { in: [GET, POST] } }", true),
        ROW("{ tenant: { eq: acme } }", true),
        ROW("{ tenant: { eq: acmeXYZ } }", false),
        ROW("{ tenant: { prefix: acmeX } }", false),
        ROW("{ agent.id: { eq: bot-1 } }", true),
        ROW("{ agent.id: { prefix: bot- } }", true),
        ROW("{ agent.owner: { eq: alice } }", true),
        ROW("{ agent.owner: { ne: alice } }", false),
    };
    RUN(rows);
}

static void test_query(void **state) {
    (void)state;
    static const struct row rows[] = {
        ROW("{ query.a: { eq: Ab c } }", true), /* %41 and '+' */
        ROW("{ query.a: { eq: \"%41b+c\" } }", false),
        ROW("{ query.a: { prefix: \"Ab \" } }", true),
        ROW("{ query.n: { eq: 42 } }", true),
        ROW("{ query.n: { gt: 41.5 } }", true),
        ROW("{ query.rep: { eq: first } }", true), /* the first occurrence wins */
        ROW("{ query.rep: { eq: second } }", false),
        ROW("{ query.rep: { in: [second] } }", false),
        ROW("{ query.missing: { exists: false } }", true),
        ROW("{ query.missing: { eq: \"\" } }", false),
        ROW("{ query.missing: { ne: x } }", true),
        ROW("{ query.empty: { exists: true } }", true), /* a= */
        ROW("{ query.empty: { eq: \"\" } }", true),
        ROW("{ query.bare: { exists: true } }", true), /* a key without '=' */
        ROW("{ query.bare: { eq: \"\" } }", true),
        ROW("{ query.bar: { exists: false } }", true),
        ROW("{ query.pct: { eq: \"100%\" } }", true), /* a broken escape stays itself */
        ROW("{ query.pct2: { eq: \"%zz\" } }", true),
        ROW("{ query.short: { eq: \"%4\" } }", true),
        ROW("{ \"query.enc key\": { eq: v } }", true), /* names are decoded too */
        ROW("{ \"query.p k\": { eq: 1 } }", true),
        ROW("{ \"query.k=z\": { eq: 1 } }", true),
        ROW("{ query.plus: { eq: 1 2 } }", true),
        ROW("{ query.plus: { eq: 1 } }", false),
        ROW("{ query.nul: { eq: \"a\\0b\" } }", true),
        ROW("{ query.nul: { eq: a } }", false),
        ROW("{ query.x: { eq: \"+1\" } }", true), /* %2B is a plus, not a space */
        ROW("{ query.x: { gt: 0 } }", false),     /* "+1" is no JSON number */
        ROW("{ query.amp: { eq: \"x&y\" } }", true),
        ROW("{ query.eqs: { eq: \"1=2\" } }", true),
        ROW("{ query.last: { eq: A } }", true),
        ROW_QUERY("{ query.a: { exists: false } }", true, "-"), /* no query at all */
        ROW_QUERY("{ query.a: { ne: x } }", true, "-"),
        ROW_QUERY("{ query.a: { eq: \"\" } }", false, ""),
        ROW_QUERY("{ query.a: { eq: 1 } }", true, "&&a=1&"),
        ROW_QUERY("{ query.a: { eq: \"\" } }", true, "a"),
        ROW_QUERY("{ query.a: { eq: \"\" } }", true, "a=&a=2"),
        ROW_QUERY("{ query.a: { exists: false } }", true, "=a&ab=1&b=a"),
        ROW_QUERY("{ query.a: { eq: \" \" } }", true, "%61=%20"),
        ROW_QUERY("{ query.A: { exists: false } }", true, "a=1"), /* names are case-sensitive */
        ROW_QUERY("{ query.a: { eq: \"%\" } }", true, "a=%"),
    };
    RUN(rows);
}

/* Which texts are numbers: exactly JSON's grammar, read from the decoded query value. */
static void test_text_numbers(void **state) {
    (void)state;
    static const struct row rows[] = {
        ROW_QUERY("{ query.q: { eq: 42 } }", true, "q=42"),
        ROW_QUERY("{ query.q: { eq: 1000 } }", true, "q=1e3"),
        ROW_QUERY("{ query.q: { eq: 1000 } }", true, "q=1E%2B3"),
        ROW_QUERY("{ query.q: { eq: 0.001 } }", true, "q=1e-3"),
        ROW_QUERY("{ query.q: { eq: 0 } }", true, "q=-0"),
        ROW_QUERY("{ query.q: { eq: 0 } }", true, "q=0.000"),
        ROW_QUERY("{ query.q: { eq: -1.5 } }", true, "q=-1.5"),
        ROW_QUERY("{ query.q: { lt: 2 } }", true, "q=1.5"),
        ROW_QUERY("{ query.q: { eq: 0.0012 } }", true, "q=0.0012"),
        ROW_QUERY("{ query.q: { eq: 120 } }", true, "q=1.20e2"),
        ROW_QUERY("{ query.q: { eq: 42 } }", true, "q=%34%32"), /* decoded first */
        /* not JSON numbers */
        ROW_QUERY("{ query.q: { ne: 1 } }", true, "q=01"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=01"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=.5"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1."),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1e"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1e%2B"),
        ROW_QUERY("{ query.q: { lt: 0 } }", false, "q=-"),
        ROW_QUERY("{ query.q: { gt: -1 } }", false, "q="),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=0x10"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1+"), /* "1 " */
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1%00"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=Infinity"),
        ROW_QUERY("{ query.q: { lt: 0 } }", false, "q=-Infinity"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=NaN"),
        ROW_QUERY("{ query.q: { gt: 0 } }", false, "q=1_000"),
        /* exact at the edges */
        ROW_QUERY("{ query.q: { gt: 9007199254740992.0 } }", true, "q=9007199254740993"),
        ROW_QUERY("{ query.q: { eq: 9007199254740993 } }", true, "q=9007199254740993"),
        ROW_QUERY("{ query.q: { eq: 9007199254740992.0 } }", true, "q=9007199254740993.0"),
        ROW_QUERY("{ query.q: { eq: 9223372036854775807 } }", true, "q=9223372036854775807"),
        ROW_QUERY("{ query.q: { eq: -9223372036854775808 } }", true, "q=-9223372036854775808"),
        ROW_QUERY("{ query.q: { gt: 9223372036854775807 } }", true, "q=9223372036854775808"),
        ROW_QUERY("{ query.q: { lt: -9223372036854775807 } }", true, "q=-9223372036854775809"),
        /* past int64 a text is a double, as jansson reads it: -(2^63 + 1) rounds to -2^63 */
        ROW_QUERY("{ query.q: { eq: -9223372036854775808 } }", true, "q=-9223372036854775809"),
        ROW_QUERY("{ query.q: { gt: 1e300 } }", true, "q=1e400"), /* past the doubles: inf */
        ROW_QUERY("{ query.q: { lt: -1e300 } }", true, "q=-1e400"),
        ROW_QUERY("{ query.q: { gt: 1e300 } }", true, "q=1e99999999999999999999"),
        ROW_QUERY("{ query.q: { eq: 0 } }", true, "q=1e-99999999999999999999"),
    };
    RUN(rows);
}

/* Digits beyond what a double holds still round as the whole text does. */
static void test_long_text_numbers(void **state) {
    (void)state;
    static const struct {
        const char *head;
        char fill;
        size_t fill_len;
        const char *tail;
        const char *when;
    } cases[] = {
        /* halfway between 2^53 and 2^53 + 2: ties to even, unless a far digit says above */
        {"q=9007199254740993.", '0', 900, "", "{ query.q: { eq: 9007199254740992.0 } }"},
        {"q=9007199254740993.", '0', 900, "1", "{ query.q: { eq: 9007199254740994.0 } }"},
        {"q=9007199254740993.", '0', 900, "1", "{ query.q: { gt: 9007199254740993 } }"},
        {"q=0.", '0', 300, "1", "{ query.q: { gt: 0 } }"},
        {"q=-0.", '0', 300, "1", "{ query.q: { lt: 0 } }"},
        {"q=0.", '0', 1000, "1", "{ query.q: { eq: 0 } }"}, /* below the doubles: 0 */
        {"q=1", '0', 400, "", "{ query.q: { gt: 1e300 } }"},
        {"q=1", '0', 2000, "e-1990", "{ query.q: { eq: 1e10 } }"},
        {"q=0.", '0', 2000, "1e2010", "{ query.q: { eq: 1e9 } }"},
        {"q=1.", '1', 2000, "", "{ query.q: { lt: 1.2 } }"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t hl = strlen(cases[i].head), tl = strlen(cases[i].tail);
        char *q = malloc(hl + cases[i].fill_len + tl + 1);
        assert_non_null(q);
        memcpy(q, cases[i].head, hl);
        memset(q + hl, cases[i].fill, cases[i].fill_len);
        memcpy(q + hl + cases[i].fill_len, cases[i].tail, tl + 1);
        struct cond_request req = default_request(NULL);
        req.query = q;
        if (!eval(cases[i].when, &req)) print_error("case %zu: %s\n", i, cases[i].when);
        assert_true(eval(cases[i].when, &req));
        free(q);
    }
}

/* ---- time ----------------------------------------------------------------------------- */

static void test_time(void **state) {
    (void)state;
    static const struct {
        int64_t now;
        int hour, weekday;
    } cases[] = {
        {0, 0, 4}, /* 1970-01-01T00:00:00Z, a Thursday */
        {3599, 0, 4},
        {3600, 1, 4},
        {86399, 23, 4},
        {86400, 0, 5},
        {-1, 23, 3}, /* 1969-12-31T23:59:59Z, a Wednesday */
        {-86400, 0, 3},
        {-86401, 23, 2},
        {3 * 86400 + 86399, 23, 7}, /* Sunday 1970-01-04 */
        {4 * 86400, 0, 1},          /* Monday 1970-01-05 */
        {DEFAULT_NOW, 22, 2},
        {951782400, 0, 2}, /* 2000-02-29T00:00:00Z, a Tuesday */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct cond_request req = default_request(NULL);
        req.now_s = cases[i].now;
        char when[128];
        snprintf(when, sizeof when, "{ time.hour: { eq: %d }, time.weekday: { eq: %d } }",
                 cases[i].hour, cases[i].weekday);
        if (!eval(when, &req)) print_error("now %lld: not %s\n", (long long)cases[i].now, when);
        assert_true(eval(when, &req));
        snprintf(when, sizeof when, "{ time.hour: { ne: %d } }", cases[i].hour);
        assert_false(eval(when, &req));
    }
    /* the ends of int64 still give a valid hour and weekday */
    const int64_t ends[] = {INT64_MIN, INT64_MIN + 1, INT64_MAX};
    for (size_t i = 0; i < 3; i++) {
        struct cond_request req = default_request(NULL);
        req.now_s = ends[i];
        assert_true(eval("{ time.hour: { ge: 0, le: 23 }, time.weekday: { ge: 1, le: 7 } }", &req));
    }
    /* time fields are integers: compared as numbers, never as text */
    static const struct row rows[] = {
        ROW("{ time.hour: { eq: 22.0 } }", true),
        ROW("{ time.hour: { eq: \"22\" } }", false),
        ROW("{ time.hour: { in: [21, 22] } }", true),
        ROW("{ time.hour: { ge: 9, lt: 17 } }", false),
        ROW("{ time.hour: { prefix: 2 } }", false),
        ROW("{ time.weekday: { in: [1, 2, 3, 4, 5] } }", true),
        ROW("{ time.weekday: { exists: true } }", true),
        ROW("{ time.weekday: { exists: false } }", false),
    };
    RUN(rows);
}

/* ---- combining: several ops, several fields, any ------------------------------------ */

static void test_combining(void **state) {
    (void)state;
    static const struct row rows[] = {
        ROW("{ body.i: { gt: 5, lt: 20 } }", true),
        ROW("{ body.i: { gt: 5, lt: 8 } }", false),
        ROW("{ body.i: { eq: 10 }, method: { eq: POST } }", true),
        ROW("{ body.i: { eq: 10 }, method: { eq: GET } }", false),
        ROW("{ any: [ { body.s: { eq: zzz } }, { method: { eq: POST } } ] }", true),
        ROW("{ any: [ { body.s: { eq: zzz } }, { method: { eq: GET } } ] }", false),
        ROW("{ body.i: { eq: 10 }, any: [ { body.s: { eq: zzz } }, { tenant: { eq: acme } } ] }",
            true),
        ROW("{ body.i: { eq: 11 }, any: [ { method: { eq: POST } } ] }", false),
        ROW("{ any: [ { body.i: { eq: 10 }, body.s: { eq: x } }, { body.s: { eq: x } } ] }", false),
        ROW("{ any: [ { body.i: { eq: 10 }, body.s: { eq: abc } } ] }", true),
        ROW("{ any: [ { body.nope: { exists: true } }, { query.bare: { exists: true } } ] }", true),
        ROW("{}", true),
    };
    RUN(rows);
}

/* Requests without headers, parameters, tenant or agent: those fields are absent. */
static void test_absent_sources(void **state) {
    (void)state;
    struct cond_request req = {.now_s = 0};
    static const char *const absent[] = {
        "header.x-amount", "query.a", "path.id", "method", "tenant", "agent.id", "agent.owner",
    };
    for (size_t i = 0; i < sizeof absent / sizeof absent[0]; i++) {
        char when[128];
        snprintf(when, sizeof when, "{ %s: { exists: false, ne: x, not_in: [y] } }", absent[i]);
        assert_false(eval(when, &req)); /* not_in is false on an absent field */
        snprintf(when, sizeof when, "{ %s: { exists: false, ne: x } }", absent[i]);
        assert_true(eval(when, &req));
        snprintf(when, sizeof when, "{ %s: { prefix: \"\" } }", absent[i]);
        assert_false(eval(when, &req));
    }
    /* the header callback gets the lowercase name */
    header_calls = 0;
    req = default_request(NULL);
    assert_true(eval("{ header.X-Amount: { exists: true } }", &req));
    assert_int_equal(header_calls, 2); /* once per evaluation, eval evaluates twice */
    /* a NULL condition always applies */
    assert_true(cond_holds(NULL, &req));
}

/* ---- the fields an approver sees ------------------------------------------------------ */

static void test_body_fields(void **state) {
    (void)state;
    struct policy *p =
        compile("    controls:\n"
                "      - when: { body.amount: { gt: 1 } }\n"
                "        deny: big\n"
                "      - when:\n"
                "          body.customer.id: { exists: true }\n"
                "          method: { eq: POST }\n"
                "          any: [ { body.note: { prefix: x } }, { body.o: { ne: 1 } } ]\n"
                "        require_approval: { approvers: [a] }\n"
                "      - when: { body.amount: { lt: 5 }, body.flag: { eq: true } }\n"
                "        deny: dup\n"
                "      - step_up: { acr: mfa }\n");
    const struct action *a = &p->actions[0];

    json_t *body = parse("{\"amount\": 12, \"customer\": {\"id\": \"c1\", \"name\": \"n\"},"
                         " \"o\": {\"deep\": [1, {\"x\": null}]}, \"flag\": false, \"other\": 1}");
    json_t *got = cond_body_fields(a, body);
    json_t *want = parse("{\"amount\": 12, \"customer.id\": \"c1\","
                         " \"o\": {\"deep\": [1, {\"x\": null}]}, \"flag\": false}");
    assert_true(json_equal(got, want));
    /* a copy: changing the body afterwards does not change the fields */
    json_object_set_new(json_object_get(body, "o"), "deep", json_string("changed"));
    assert_true(json_equal(got, want));
    json_decref(got);
    json_decref(want);
    json_decref(body);

    /* a path through a non-object is absent; no body gives {} */
    body = parse("{\"customer\": \"c1\", \"note\": \"xy\"}");
    got = cond_body_fields(a, body);
    want = parse("{\"note\": \"xy\"}");
    assert_true(json_equal(got, want));
    json_decref(got);
    json_decref(want);
    json_decref(body);
    got = cond_body_fields(a, NULL);
    assert_true(json_is_object(got) && json_object_size(got) == 0);
    json_decref(got);
    body = parse("[1]");
    got = cond_body_fields(a, body);
    assert_true(json_is_object(got) && json_object_size(got) == 0);
    json_decref(got);
    json_decref(body);
    policy_release(p);
}

/* The malloc counter must see allocations, or the purity checks above prove nothing. */
static void test_allocation_counter_counts(void **state) {
    (void)state;
    if (!COUNTS_ALLOCATIONS) skip();
    allocations = 0;
    counting = true;
    json_t *j = json_object();
    counting = false;
    json_decref(j);
    assert_true(allocations > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ops_by_body_type),
        cmocka_unit_test(test_body_paths),
        cmocka_unit_test(test_numbers_exact),
        cmocka_unit_test(test_text_fields),
        cmocka_unit_test(test_query),
        cmocka_unit_test(test_text_numbers),
        cmocka_unit_test(test_long_text_numbers),
        cmocka_unit_test(test_time),
        cmocka_unit_test(test_combining),
        cmocka_unit_test(test_absent_sources),
        cmocka_unit_test(test_body_fields),
        cmocka_unit_test(test_allocation_counter_counts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
