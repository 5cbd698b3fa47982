/*
 * fuzz_cond.c — libFuzzer target for the `when` evaluator (pep/cond.c).
 *
 * Input: a raw query string, then (after the first '\n', when there is one) a request body,
 * parsed with jansson (JSON_DECODE_ANY | JSON_ALLOW_NUL; not JSON: no body).  The header
 * x-q carries the query part's raw bytes up to any NUL, present only when the input has a
 * '\n'.  now_s is a hash of the input, so time.* see every hour and weekday.
 *
 * The policy, compiled once, has an action "pairs" of groups of six controls on one field
 * and one value: eq V, ne V, exists true, exists false, in [V, …], not_in [V, …]; and an
 * action "mixed" of conditions combining fields, ops and `any`.
 *
 * Properties, for any input:
 *   - cond_holds is deterministic (the same answer twice) for every control;
 *   - in every group: eq and ne are complementary, so are exists true and exists false;
 *     eq, in and not_in imply exists; on a present field exactly one of in and not_in holds;
 *   - every group agrees with a reference written here from SPEC 2: the query decoded whole
 *     (WHATWG urlencoded: '+' then %XX, first name wins), text numbers read by jansson
 *     itself, numbers compared as long doubles (exact for int64 and double on x86-64);
 *   - cond_body_fields gives, for each action, exactly the present body fields its
 *     conditions name, each equal to the body's value there.
 */
#include "tests/fuzz/fuzz.h"

#include "pep/cond.h"

#include <float.h>
#include <string.h>

/* One group: a field and a value (YAML), tried with eq, ne, exists, in and not_in. */
static const struct {
    const char *field;
    const char *value;
} groups[] = {
    {"body.amount", "1000"},    {"body.amount", "1000.5"}, {"body.amount", "\"1000\""},
    {"body.customer.id", "c1"}, {"body.customer", "null"}, {"body.flag", "true"},
    {"body.s", "\"\""},         {"query.q", "\"a b\""},    {"query.q", "9007199254740993"},
    {"query.n", "42"},          {"query.n", "-1.5e-3"},    {"query.n", "9007199254740992.0"},
    {"header.x-q", "abc"},      {"header.x-q", "1.5"},
};
#define GROUP_OPS 6 /* eq, ne, exists true, exists false, in, not_in */
#define NGROUPS (sizeof groups / sizeof groups[0])

static const char mixed_controls[] =
    "      - when: { body.amount: { gt: 1000, le: 1e6 }, query.mode: { prefix: fast } }\n"
    "        deny: x\n"
    "      - when:\n"
    "          any: [ { body.customer.tier: { in: [gold, 2, true] } },\n"
    "                 { header.x-q: { exists: false } }, { time.hour: { lt: 8 } } ]\n"
    "        deny: x\n"
    "      - when: { body.items: { exists: true }, query.n: { ge: -1.5, lt: 1e300 } }\n"
    "        deny: x\n"
    "      - when: { body.a.b.c: { ne: null }, query.q: { not_in: [\"\", x, 0] } }\n"
    "        deny: x\n"
    "      - when: { time.weekday: { in: [6, 7] }, \"query.a b\": { prefix: \"%\" } }\n"
    "        deny: x\n"
    "      - when: { header.x-q: { gt: 9007199254740992 }, body.amount: { lt: -0.5 } }\n"
    "        deny: x\n";

static struct policy *policy;
static const struct action *pairs, *mixed;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    static char yaml[16384];
    size_t o = (size_t)snprintf(yaml, sizeof yaml,
                                "version: 1\nactions:\n  pairs:\n    scope: s\n"
                                "    controls:\n");
    for (size_t g = 0; g < NGROUPS; g++) {
        const char *f = groups[g].field, *v = groups[g].value;
        o += (size_t)snprintf(
            yaml + o, sizeof yaml - o,
            "      - { when: { \"%s\": { eq: %s } }, deny: x }\n"
            "      - { when: { \"%s\": { ne: %s } }, deny: x }\n"
            "      - { when: { \"%s\": { exists: true } }, deny: x }\n"
            "      - { when: { \"%s\": { exists: false } }, deny: x }\n"
            "      - { when: { \"%s\": { in: [%s, x, 0, false, null] } }, deny: x }\n"
            "      - { when: { \"%s\": { not_in: [%s, x, 0, false, null] } }, "
            "deny: x }\n",
            f, v, f, v, f, f, f, v, f, v);
        FUZZ_CHECK(o < sizeof yaml, "policy buffer too small");
    }
    o += (size_t)snprintf(yaml + o, sizeof yaml - o, "  mixed:\n    scope: s\n    controls:\n%s",
                          mixed_controls);
    FUZZ_CHECK(o < sizeof yaml, "policy buffer too small");
    struct policy_errors errs = {0};
    int rc = policy_load_buffer("fuzz_cond.yaml", yaml, o, &policy, &errs);
    for (size_t i = 0; i < errs.len; i++)
        fprintf(stderr, "%s\n", errs.items[i]);
    policy_errors_free(&errs);
    FUZZ_CHECK(rc == 0, "the condition policy does not compile (rc %d)", rc);
    pairs = policy_find_action(policy, "pairs");
    mixed = policy_find_action(policy, "mixed");
    FUZZ_CHECK(pairs && mixed && pairs->controls_len == NGROUPS * GROUP_OPS, "policy shape");
    /* The reference compares numbers as long doubles: exact only with a 64-bit mantissa. */
    FUZZ_CHECK(LDBL_MANT_DIG >= 64, "long double too narrow for the reference");
    return 0;
}

/* ---- the reference ------------------------------------------------------------------ */

static long double ref_number(const json_t *j) {
    return json_is_integer(j) ? (long double)json_integer_value(j)
                              : (long double)json_real_value(j);
}

static bool ref_text_eq(const char *s, size_t n, const json_t *want);

static bool ref_json_eq(const json_t *v, const json_t *want) {
    /* a body string is text, as a header is */
    if (json_is_string(v)) return ref_text_eq(json_string_value(v), json_string_length(v), want);
    if (json_is_number(v) || json_is_number(want))
        return json_is_number(v) && json_is_number(want) && ref_number(v) == ref_number(want);
    if (json_is_object(v) || json_is_array(v)) return false;
    return json_equal(v, want); /* strings by bytes, true, false, null */
}

/* The number jansson reads from all of s (an integer, else a real), or NULL. */
static json_t *ref_text_number(const char *s, size_t n) {
    /* jansson skips surrounding whitespace; a text with any is no number */
    if (n == 0 || strchr(" \t\r\n", s[0]) || strchr(" \t\r\n", s[n - 1])) return NULL;
    json_t *j = json_loadb(s, n, JSON_DECODE_ANY, NULL);
    if (!j) j = json_loadb(s, n, JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, NULL); /* > int64 */
    if (j && !json_is_number(j)) {
        json_decref(j);
        j = NULL;
    }
    return j;
}

static bool ref_text_eq(const char *s, size_t n, const json_t *want) {
    if (json_is_string(want))
        return n == json_string_length(want) && memcmp(s, json_string_value(want), n) == 0;
    if (!json_is_number(want)) return false;
    json_t *j = ref_text_number(s, n);
    bool eq = j && ref_number(j) == ref_number(want);
    json_decref(j);
    return eq;
}

static int ref_hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* WHATWG application/x-www-form-urlencoded decoding of s[0, n) into out; returns length. */
static size_t ref_decode(const char *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i] == '+' ? ' ' : s[i];
        if (c == '%' && n - i >= 3 && ref_hex(s[i + 1]) >= 0 && ref_hex(s[i + 2]) >= 0) {
            c = (char)(ref_hex(s[i + 1]) * 16 + ref_hex(s[i + 2]));
            i += 2;
        }
        out[o++] = c;
    }
    return o;
}

/* The decoded value of the first parameter `name`, into out; false when absent. */
static bool ref_query(const char *query, const char *name, char *out, size_t *out_len) {
    size_t qlen = strlen(query);
    char *key = malloc(qlen + 1);
    if (!key) abort();
    bool found = false;
    for (size_t i = 0; i <= qlen && !found;) {
        size_t end = i;
        while (end < qlen && query[end] != '&')
            end++;
        size_t eq = i;
        while (eq < end && query[eq] != '=')
            eq++;
        if (end > i) {
            size_t klen = ref_decode(query + i, eq - i, key);
            if (klen == strlen(name) && memcmp(key, name, klen) == 0) {
                *out_len = eq < end ? ref_decode(query + eq + 1, end - eq - 1, out) : 0;
                found = true;
            }
        }
        i = end + 1;
    }
    free(key);
    return found;
}

static const json_t *ref_body(const json_t *body, const struct cond_test *t) {
    const json_t *j = body;
    for (size_t i = 0; j && i < t->path_len; i++)
        j = json_is_object(j) ? json_object_get(j, t->path[i]) : NULL;
    return j;
}

/* ---- the request ---------------------------------------------------------------------- */

struct input {
    const char *header_xq; /* NULL: absent */
};

static const char *header_of(void *arg, const char *name) {
    const struct input *in = arg;
    return strcmp(name, "x-q") == 0 ? in->header_xq : NULL;
}

static bool holds_twice(const struct cond *c, const struct cond_request *req) {
    bool a = cond_holds(c, req), b = cond_holds(c, req);
    FUZZ_CHECK(a == b, "cond_holds answered %d then %d", a, b);
    return a;
}

static void check_group(size_t g, const struct cond_request *req, const char *query,
                        char *scratch) {
    const struct control *ctl = &pairs->controls[g * GROUP_OPS];
    bool eq = holds_twice(ctl[0].when, req), ne = holds_twice(ctl[1].when, req);
    bool ex = holds_twice(ctl[2].when, req), nex = holds_twice(ctl[3].when, req);
    bool in = holds_twice(ctl[4].when, req), not_in = holds_twice(ctl[5].when, req);
    const char *f = groups[g].field;
    FUZZ_CHECK(eq != ne, "%s: eq %d, ne %d", f, eq, ne);
    FUZZ_CHECK(ex != nex, "%s: exists true %d, exists false %d", f, ex, nex);
    FUZZ_CHECK(!eq || ex, "%s: eq on an absent field", f);
    FUZZ_CHECK((in || not_in) == ex && !(in && not_in), "%s: in %d, not_in %d, exists %d", f, in,
               not_in, ex);

    /* The reference, from the same compiled values. */
    const struct cond_test *t_eq = &ctl[0].when->tests[0], *t_in = &ctl[4].when->tests[0];
    bool present, want_eq, want_in = false;
    if (t_eq->kind == COND_FIELD_BODY) {
        const json_t *v = ref_body(req->body, t_eq);
        present = v != NULL;
        want_eq = present && ref_json_eq(v, t_eq->value);
        for (size_t i = 0; present && i < json_array_size(t_in->value); i++)
            want_in |= ref_json_eq(v, json_array_get(t_in->value, i));
    } else {
        const char *s = scratch;
        size_t n = 0;
        if (t_eq->kind == COND_FIELD_QUERY) {
            present = query && ref_query(query, t_eq->name, scratch, &n);
        } else {
            s = req->header(req->header_arg, t_eq->name);
            present = s != NULL;
            n = s ? strlen(s) : 0;
        }
        want_eq = present && ref_text_eq(s, n, t_eq->value);
        for (size_t i = 0; present && i < json_array_size(t_in->value); i++)
            want_in |= ref_text_eq(s, n, json_array_get(t_in->value, i));
    }
    FUZZ_CHECK(ex == present, "%s: exists %d, the reference %d", f, ex, present);
    FUZZ_CHECK(eq == want_eq, "%s eq %s: %d, the reference %d", f, groups[g].value, eq, want_eq);
    FUZZ_CHECK(in == want_in, "%s in [%s, ...]: %d, the reference %d", f, groups[g].value, in,
               want_in);
}

/* Every key of cond_body_fields(a) is a body field a's conditions name, equal to the body's
 * value, and every such present field is there. */
static void check_body_fields(const struct action *a, const json_t *body) {
    json_t *fields = cond_body_fields(a, body);
    FUZZ_CHECK(json_is_object(fields), "cond_body_fields gave no object");
    size_t named_present = 0;
    json_t *seen = json_object();
    for (size_t i = 0; i < a->controls_len; i++) {
        const struct cond *c = a->controls[i].when;
        for (size_t alt = 0; c && alt <= c->any_len; alt++) {
            const struct cond *part = alt == 0 ? c : &c->any[alt - 1];
            for (size_t k = 0; k < part->tests_len; k++) {
                const struct cond_test *t = &part->tests[k];
                if (t->kind != COND_FIELD_BODY) continue;
                char key[256] = "";
                for (size_t s = 0; s < t->path_len; s++) {
                    if (s) strcat(key, ".");
                    strcat(key, t->path[s]);
                }
                const json_t *v = ref_body(body, t);
                const json_t *got = json_object_get(fields, key);
                FUZZ_CHECK((v != NULL) == (got != NULL), "fields[%s]: present %d, in body %d", key,
                           got != NULL, v != NULL);
                FUZZ_CHECK(!v || json_equal(v, got), "fields[%s] differs from the body", key);
                if (v && !json_object_get(seen, key)) {
                    json_object_set_new(seen, key, json_true());
                    named_present++;
                }
            }
        }
    }
    FUZZ_CHECK(json_object_size(fields) == named_present, "%zu fields, %zu named and present",
               json_object_size(fields), named_present);
    json_decref(seen);
    json_decref(fields);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 65536) return 0;
    const uint8_t *nl = memchr(data, '\n', size);
    size_t qlen = nl ? (size_t)(nl - data) : size;
    char *query = fuzz_strndup(data, qlen);
    json_t *body = NULL;
    if (nl)
        body = json_loadb((const char *)nl + 1, size - qlen - 1, JSON_DECODE_ANY | JSON_ALLOW_NUL,
                          NULL);
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 1099511628211u;

    struct input in = {.header_xq = nl ? query : NULL};
    struct cond_request req = {
        .body = body,
        .header = header_of,
        .header_arg = &in,
        .query = query,
        .method = "POST",
        .tenant = "acme",
        .tenant_len = 4,
        .now_s = (int64_t)h,
    };
    char *scratch = malloc(qlen + 1);
    if (!scratch) abort();
    for (size_t g = 0; g < NGROUPS; g++)
        check_group(g, &req, query, scratch);
    for (size_t i = 0; i < mixed->controls_len; i++)
        holds_twice(mixed->controls[i].when, &req);
    check_body_fields(pairs, body);
    check_body_fields(mixed, body);

    free(scratch);
    json_decref(body);
    free(query);
    return 0;
}
