/*
 * cond.c — evaluates compiled `when` conditions (semantics: pep/cond.h).
 *
 * The evaluator never allocates: a field's value is viewed where it lies (a json_t inside
 * the caller's body, a header string, a span of the raw query) and every comparison reads
 * it in place.  Query text is percent-decoded byte by byte while it is compared, and a text
 * that must be read as a number is validated against the JSON number grammar and converted
 * through a bounded stack buffer.
 *
 * Numbers are exact: int64 against int64 as integers, int64 against double without the
 * lossy conversion of the int (2^53 + 1 is greater than the real 2^53), double against
 * double as doubles.
 *
 * Invariants (from the compiler): ordering ops hold a number, exists a JSON bool, prefix a
 * string, in/not_in an array of scalars, eq/ne a scalar; `any` alternatives have no `any`.
 *
 * Pure: no I/O, no clock, no global state; any thread.
 */
#include "pep/cond.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- numbers ------------------------------------------------------------------------ */

#define COND_UNORDERED 2 /* what a comparison with NaN gives (no source produces NaN) */

struct cond_number {
    bool is_int;
    int64_t i; /* is_int */
    double d;  /* !is_int */
};

/* Compares i with d exactly: -1, 0, 1 or COND_UNORDERED. */
static int cond_int_real_cmp(int64_t i, double d) {
    if (isnan(d)) return COND_UNORDERED;
    /* ±2^63 are exact doubles; past them d lies beyond every int64. */
    if (d >= 9223372036854775808.0) return -1;
    if (d < -9223372036854775808.0) return 1;
    int64_t whole = (int64_t)d; /* in range, so the truncation is defined */
    if (i != whole) return i < whole ? -1 : 1;
    double frac = d - (double)whole; /* exact: whole is d's own integer part */
    return frac > 0 ? -1 : frac < 0 ? 1 : 0;
}

static int cond_number_cmp(const struct cond_number *a, const struct cond_number *b) {
    if (a->is_int && b->is_int) return (a->i > b->i) - (a->i < b->i);
    if (a->is_int) return cond_int_real_cmp(a->i, b->d);
    if (b->is_int) {
        int c = cond_int_real_cmp(b->i, a->d);
        return c == COND_UNORDERED ? c : -c;
    }
    if (isnan(a->d) || isnan(b->d)) return COND_UNORDERED;
    return (a->d > b->d) - (a->d < b->d);
}

static bool cond_json_number(const json_t *j, struct cond_number *out) {
    if (json_is_integer(j)) {
        *out = (struct cond_number){.is_int = true, .i = (int64_t)json_integer_value(j)};
        return true;
    }
    if (json_is_real(j)) {
        *out = (struct cond_number){.d = json_real_value(j)};
        return true;
    }
    return false;
}

/* ---- text, read in place ------------------------------------------------------------ */

/* A text field's bytes [p, end); with `form`, a query name or value decoded while read. */
struct cond_text {
    const char *p, *end;
    bool form;
};

static int cond_hex(unsigned char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* The next (decoded) byte, or -1 at the end. */
static int cond_text_next(struct cond_text *t) {
    if (t->p == t->end) return -1;
    unsigned char ch = (unsigned char)*t->p++;
    if (!t->form) return ch;
    if (ch == '+') return ' ';
    if (ch == '%' && t->end - t->p >= 2) {
        int hi = cond_hex((unsigned char)t->p[0]), lo = cond_hex((unsigned char)t->p[1]);
        if (hi >= 0 && lo >= 0) {
            t->p += 2;
            return hi << 4 | lo;
        }
    }
    return ch; /* a '%' that starts no escape is itself (WHATWG urlencoded parsing) */
}

/* Consumes s[0, n) from t; false at the first byte that differs. */
static bool cond_text_skip(struct cond_text *t, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (cond_text_next(t) != (unsigned char)s[i]) return false;
    return true;
}

static bool cond_text_equals(struct cond_text t, const char *s, size_t n) {
    return cond_text_skip(&t, s, n) && cond_text_next(&t) < 0;
}

/*
 * Enough significant digits that keeping this many, plus a '1' standing for any nonzero
 * digit cut off, rounds to the same double as the whole text: a value halfway between two
 * doubles has at most 767 significant digits, so the cut never moves a value across one.
 */
#define COND_DIGITS_KEPT 800

/* A decimal being read: value = digits × 10^exp10. */
struct cond_decimal {
    char digits[COND_DIGITS_KEPT + 1]; /* significant digits, no leading zero; +1: sticky */
    size_t len;
    bool cut;      /* a nonzero digit past the kept ones */
    int64_t exp10; /* bounded by the text's length and the exponent's saturation */
};

static void cond_decimal_digit(struct cond_decimal *d, int digit, bool fraction) {
    if (d->len == 0 && digit == 0) {
        d->exp10 -= fraction; /* a leading zero only shifts the point */
    } else if (d->len < COND_DIGITS_KEPT) {
        d->digits[d->len++] = (char)('0' + digit);
        d->exp10 -= fraction;
    } else {
        d->cut |= digit != 0;
        d->exp10 += !fraction;
    }
}

/* Reads t as a number when it is entirely one in JSON's grammar
 * (-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?). */
static bool cond_text_number(struct cond_text t, struct cond_number *out) {
    struct cond_decimal d = {.len = 0};
    bool neg = false, integer = true;
    int ch = cond_text_next(&t);
    if (ch == '-') {
        neg = true;
        ch = cond_text_next(&t);
    }
    if (ch < '0' || ch > '9') return false;
    if (ch == '0') {
        ch = cond_text_next(&t); /* a leading 0 stands alone: "01" is no JSON number */
    } else {
        for (; ch >= '0' && ch <= '9'; ch = cond_text_next(&t))
            cond_decimal_digit(&d, ch - '0', false);
    }
    if (ch == '.') {
        integer = false;
        ch = cond_text_next(&t);
        if (ch < '0' || ch > '9') return false;
        for (; ch >= '0' && ch <= '9'; ch = cond_text_next(&t))
            cond_decimal_digit(&d, ch - '0', true);
    }
    if (ch == 'e' || ch == 'E') {
        integer = false;
        ch = cond_text_next(&t);
        bool eneg = ch == '-';
        if (ch == '-' || ch == '+') ch = cond_text_next(&t);
        if (ch < '0' || ch > '9') return false;
        int64_t e = 0;
        for (; ch >= '0' && ch <= '9'; ch = cond_text_next(&t))
            if (e < 1000000000) e = e * 10 + (ch - '0'); /* past this: 0 or inf anyway */
        d.exp10 += eneg ? -e : e;
    }
    if (ch >= 0) return false; /* trailing bytes */

    if (integer && d.len <= 19) { /* no cut digits, so exp10 == 0; < 10^19 fits uint64 */
        uint64_t mag = 0;
        for (size_t i = 0; i < d.len; i++)
            mag = mag * 10 + (uint64_t)(d.digits[i] - '0');
        if (mag <= INT64_MAX) {
            *out = (struct cond_number){.is_int = true, .i = neg ? -(int64_t)mag : (int64_t)mag};
            return true;
        }
        if (neg && mag == (uint64_t)INT64_MAX + 1) {
            *out = (struct cond_number){.is_int = true, .i = INT64_MIN};
            return true;
        }
    }
    if (d.cut) {
        d.digits[d.len++] = '1';
        d.exp10--;
    }
    /* Digits and an exponent, no decimal point: strtod reads it the same in every locale.
     * Past ±100000 the exponent gives 0 or ±inf whatever the ≤ 801 digits are. */
    int64_t e = d.exp10 > 100000 ? 100000 : d.exp10 < -100000 ? -100000 : d.exp10;
    char buf[COND_DIGITS_KEPT + 16], *o = buf;
    if (neg) *o++ = '-';
    if (d.len == 0) *o++ = '0';
    memcpy(o, d.digits, d.len);
    o += d.len;
    *o++ = 'e';
    if (e < 0) *o++ = '-';
    char rev[8];
    size_t n = 0;
    for (uint64_t u = (uint64_t)(e < 0 ? -e : e); n == 0 || u > 0; u /= 10)
        rev[n++] = (char)('0' + u % 10);
    while (n > 0)
        *o++ = rev[--n];
    *o = '\0';
    *out = (struct cond_number){.d = strtod(buf, NULL)}; /* ±HUGE_VAL (inf) past the range */
    return true;
}

/* ---- a field's value ---------------------------------------------------------------- */

enum cond_value_kind {
    COND_VALUE_JSON,   /* body.*: keeps its JSON type */
    COND_VALUE_TEXT,   /* header, query, path, method, tenant, agent.* */
    COND_VALUE_NUMBER, /* time.* */
};

struct cond_value {
    enum cond_value_kind kind;
    const json_t *json;
    struct cond_text text;
    struct cond_number number; /* NUMBER; TEXT once read as a number */
    int text_number;           /* TEXT: 0 not read yet, 1 a number, -1 not a number */
};

static int64_t cond_floor_mod(int64_t a, int64_t b) {
    int64_t r = a % b;
    return r < 0 ? r + b : r;
}

static const json_t *cond_body_get(const json_t *body, const struct cond_test *t) {
    const json_t *j = body;
    for (size_t i = 0; i < t->path_len && j; i++)
        j = json_is_object(j) ? json_object_get(j, t->path[i]) : NULL;
    return j;
}

static bool cond_query_get(const char *query, const char *name, struct cond_text *out) {
    size_t name_len = strlen(name);
    for (const char *p = query; *p;) {
        const char *end = strchrnul(p, '&');
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (cond_text_equals((struct cond_text){p, eq ? eq : end, true}, name, name_len)) {
            *out = (struct cond_text){eq ? eq + 1 : end, end, true};
            return true; /* the first occurrence wins */
        }
        p = *end ? end + 1 : end;
    }
    return false;
}

static bool cond_plain(const char *s, size_t len, struct cond_value *v) {
    if (!s) return false;
    v->kind = COND_VALUE_TEXT;
    v->text = (struct cond_text){s, s + len, false};
    return true;
}

/* Fills *v with the value t reads; false when the field is absent. */
static bool cond_field_get(const struct cond_test *t, const struct cond_request *in,
                           struct cond_value *v) {
    *v = (struct cond_value){.kind = COND_VALUE_JSON};
    switch (t->kind) {
    case COND_FIELD_BODY:
        v->json = cond_body_get(in->body, t);
        /* A string is text like any other field: "5000" gt 1000 holds.  An upstream that
         * reads numbers from strings must not get past a limit written for numbers. */
        if (json_is_string(v->json))
            return cond_plain(json_string_value(v->json), json_string_length(v->json), v);
        return v->json != NULL;
    case COND_FIELD_HEADER: {
        const char *s = in->header ? in->header(in->header_arg, t->name) : NULL;
        return cond_plain(s, s ? strlen(s) : 0, v);
    }
    case COND_FIELD_QUERY:
        v->kind = COND_VALUE_TEXT;
        return in->query && cond_query_get(in->query, t->name, &v->text);
    case COND_FIELD_PATH:
        for (size_t i = 0; in->match && i < in->match->params_len; i++) {
            const struct route_param *rp = &in->match->params[i];
            if (strcmp(rp->name, t->name) == 0) return cond_plain(rp->value, rp->value_len, v);
        }
        return false;
    case COND_FIELD_METHOD:
        return cond_plain(in->method, in->method ? strlen(in->method) : 0, v);
    case COND_FIELD_TENANT:
        return cond_plain(in->tenant, in->tenant_len, v);
    case COND_FIELD_AGENT_ID:
        return cond_plain(in->agent_id, in->agent_id ? strlen(in->agent_id) : 0, v);
    case COND_FIELD_AGENT_OWNER:
        return cond_plain(in->agent_owner, in->agent_owner ? strlen(in->agent_owner) : 0, v);
    case COND_FIELD_TIME_HOUR:
    case COND_FIELD_TIME_WEEKDAY: {
        int64_t day_s = cond_floor_mod(in->now_s, 86400);
        int64_t days = in->now_s / 86400 - (in->now_s % 86400 < 0); /* floor, as day_s */
        v->kind = COND_VALUE_NUMBER;
        v->number.is_int = true;
        /* 1970-01-01 (day 0) was a Thursday, weekday 4 */
        v->number.i =
            t->kind == COND_FIELD_TIME_HOUR ? day_s / 3600 : cond_floor_mod(days + 3, 7) + 1;
        return true;
    }
    }
    return false;
}

/* v as a number: a JSON number, a time field, or a text that is a JSON number. */
static bool cond_value_number(struct cond_value *v, struct cond_number *out) {
    switch (v->kind) {
    case COND_VALUE_JSON:
        return cond_json_number(v->json, out);
    case COND_VALUE_NUMBER:
        *out = v->number;
        return true;
    case COND_VALUE_TEXT:
        if (v->text_number == 0) v->text_number = cond_text_number(v->text, &v->number) ? 1 : -1;
        *out = v->number;
        return v->text_number > 0;
    }
    return false;
}

/* eq against one scalar of the policy. */
static bool cond_equal(struct cond_value *v, const json_t *want) {
    struct cond_number a, b;
    if (cond_json_number(want, &b)) return cond_value_number(v, &a) && cond_number_cmp(&a, &b) == 0;
    if (json_is_string(want)) {
        const char *s = json_string_value(want);
        size_t n = json_string_length(want);
        if (v->kind == COND_VALUE_TEXT) return cond_text_equals(v->text, s, n);
        return v->kind == COND_VALUE_JSON && json_is_string(v->json) &&
               json_string_length(v->json) == n && memcmp(json_string_value(v->json), s, n) == 0;
    }
    if (v->kind != COND_VALUE_JSON) return false; /* text and time are never bool or null */
    if (json_is_boolean(want))
        return json_is_boolean(v->json) && json_is_true(v->json) == json_is_true(want);
    return json_is_null(want) && json_is_null(v->json);
}

static bool cond_in(struct cond_value *v, const json_t *items) {
    for (size_t i = 0; i < json_array_size(items); i++)
        if (cond_equal(v, json_array_get(items, i))) return true;
    return false;
}

static bool cond_prefix(const struct cond_value *v, const json_t *want) {
    const char *s = json_string_value(want);
    size_t n = json_string_length(want);
    if (v->kind == COND_VALUE_TEXT) {
        struct cond_text t = v->text;
        return cond_text_skip(&t, s, n);
    }
    return v->kind == COND_VALUE_JSON && json_is_string(v->json) &&
           json_string_length(v->json) >= n && memcmp(json_string_value(v->json), s, n) == 0;
}

static bool cond_test_holds(const struct cond_test *t, const struct cond_request *in) {
    struct cond_value v;
    bool present = cond_field_get(t, in, &v);
    switch (t->op) {
    case COND_OP_EXISTS:
        assert(json_is_boolean(t->value));
        return present == json_is_true(t->value);
    case COND_OP_NE:
        return !present || !cond_equal(&v, t->value);
    case COND_OP_NOT_IN:
        return present && !cond_in(&v, t->value);
    default:
        break;
    }
    if (!present) return false;
    switch (t->op) {
    case COND_OP_EQ:
        return cond_equal(&v, t->value);
    case COND_OP_IN:
        return cond_in(&v, t->value);
    case COND_OP_PREFIX:
        assert(json_is_string(t->value));
        return cond_prefix(&v, t->value);
    case COND_OP_LT:
    case COND_OP_LE:
    case COND_OP_GT:
    case COND_OP_GE: {
        struct cond_number a, b;
        if (!cond_json_number(t->value, &b) || !cond_value_number(&v, &a)) return false;
        int c = cond_number_cmp(&a, &b);
        if (c == COND_UNORDERED) return false;
        return t->op == COND_OP_LT   ? c < 0
               : t->op == COND_OP_LE ? c <= 0
               : t->op == COND_OP_GT ? c > 0
                                     : c >= 0;
    }
    default:
        return false;
    }
}

bool cond_holds(const struct cond *c, const struct cond_request *in) {
    if (!c) return true;
    assert(in);
    for (size_t i = 0; i < c->tests_len; i++)
        if (!cond_test_holds(&c->tests[i], in)) return false;
    for (size_t i = 0; i < c->any_len; i++) {
        assert(c->any[i].any_len == 0);
        if (cond_holds(&c->any[i], in)) return true;
    }
    return c->any_len == 0;
}

/* ---- the fields an approver sees ---------------------------------------------------- */

/* Adds c's present body fields to out; -1 when memory ran out. */
static int cond_body_fields_add(json_t *out, const struct cond *c, const json_t *body) {
    for (size_t i = 0; i < c->tests_len; i++) {
        const struct cond_test *t = &c->tests[i];
        const json_t *v = t->kind == COND_FIELD_BODY ? cond_body_get(body, t) : NULL;
        if (!v) continue;
        assert(t->path_len > 0);
        size_t len = 0;
        for (size_t k = 0; k < t->path_len; k++)
            len += strlen(t->path[k]) + 1;
        char *key = malloc(len), *o = key;
        if (!key) return -1;
        for (size_t k = 0; k < t->path_len; k++) {
            size_t n = strlen(t->path[k]);
            memcpy(o, t->path[k], n);
            o += n;
            *o++ = k + 1 < t->path_len ? '.' : '\0';
        }
        /* A copy: the approval outlives the request's body, which may be rewritten. */
        int rc = json_object_get(out, key) ? 0 : json_object_set_new(out, key, json_deep_copy(v));
        free(key);
        if (rc != 0) return -1;
    }
    for (size_t i = 0; i < c->any_len; i++)
        if (cond_body_fields_add(out, &c->any[i], body) != 0) return -1;
    return 0;
}

json_t *cond_body_fields(const struct action *a, const json_t *body) {
    json_t *out = json_object();
    for (size_t i = 0; out && i < a->controls_len; i++) {
        const struct cond *c = a->controls[i].when;
        if (c && cond_body_fields_add(out, c, body) != 0) {
            json_decref(out);
            out = NULL;
        }
    }
    return out;
}
