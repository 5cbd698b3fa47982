/*
 * test_record.c — record fields say exactly what happened (SPEC 6.2): hostile strings
 * (invalid UTF-8, a literal '%', NUL, a 10 kB model name) through the helpers that put
 * client bytes into records (json_exact_text, json_text, pep_utf8_cut) and the canonical
 * writer (audit_canonical_json).
 */
#include "audit/audit.h"
#include "pep/record.h"
#include "pep/util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

/* The canonical record {"path": exact(bytes)} as text (caller frees). */
static char *record_with(const char *bytes, size_t len) {
    json_t *rec = json_object();
    json_t *v = json_exact_text(bytes, len);
    assert_non_null(v); /* never dropped */
    json_object_set_new(rec, "path", v);
    char *text = audit_canonical_json(rec);
    assert_non_null(text); /* always has a canonical form */
    json_decref(rec);
    return text;
}

/* Undoes the %XX escapes of an exact text; out holds the original bytes. */
static size_t unescape(const char *s, char *out) {
    size_t n = 0;
    for (; *s; s++) {
        unsigned v;
        if (*s == '%' && sscanf(s + 1, "%2x", &v) == 1) {
            out[n++] = (char)v;
            s += 2;
        } else {
            out[n++] = *s;
        }
    }
    return n;
}

static void test_distinct_bytes_stay_distinct(void **state) {
    (void)state;
    /* the finding: raw bytes C0 AE, and the literal text "%C0%AE" */
    char *raw = record_with("/docs/\xC0\xAE", 8);
    char *literal = record_with("/docs/%C0%AE", 12);
    assert_string_not_equal(raw, literal);
    assert_string_equal(raw, "{\"path\":\"/docs/%C0%AE\"}");
    assert_string_equal(literal, "{\"path\":\"/docs/%25C0%25AE\"}");
    free(raw);
    free(literal);
    /* valid UTF-8 without '%' is kept as it is */
    char *plain = record_with("/caf\xC3\xA9/x", 8);
    assert_string_equal(plain, "{\"path\":\"/caf\xC3\xA9/x\"}");
    free(plain);
}

static void test_exact_text_is_reversible(void **state) {
    (void)state;
    static const struct {
        const char *bytes;
        size_t len;
    } cases[] = {
        {"/a%b", 4},        {"/a%25b", 6}, {"\xff\xfe%", 3},         {"/x\0y", 4}, {"%", 1},
        {"\xC3\xA9%41", 5}, {"\xC3", 1},   {"/\xE2\x82\xAC\xE2", 5}, {"", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        json_t *v = json_exact_text(cases[i].bytes, cases[i].len);
        assert_non_null(v);
        const char *text = json_string_value(v);
        size_t text_len = json_string_length(v);
        char back[64];
        size_t n;
        if (memchr(text, '%', text_len) || memchr(cases[i].bytes, '%', cases[i].len) ||
            text_len != cases[i].len) {
            n = unescape(text, back);
        } else {
            memcpy(back, text, text_len);
            n = text_len;
        }
        if (n != cases[i].len || memcmp(back, cases[i].bytes, n) != 0)
            fail_msg("case %zu does not round-trip", i);
        /* and each has a canonical form */
        json_t *rec = json_pack("{s:O}", "path", v);
        char *canon = audit_canonical_json(rec);
        assert_non_null(canon);
        free(canon);
        json_decref(rec);
        json_decref(v);
    }
}

/* A 10 kB model name of multi-byte characters, cut to fit: on a character boundary, so the
 * value stays valid UTF-8 and is recorded, never dropped. */
static void test_long_values_cut_between_characters(void **state) {
    (void)state;
    size_t len = 10240;
    char *model = malloc(len + 1);
    for (size_t i = 0; i < len; i += 3)
        memcpy(model + i, "\xE2\x82\xAC", len - i >= 3 ? 3 : len - i); /* € */
    model[len] = '\0';
    for (size_t max = 250; max <= 256; max++) {
        size_t n = pep_utf8_cut(model, len, max);
        assert_true(n <= max);
        assert_true(n >= max - 3);
        assert_int_equal(n % 3, 0);
        json_t *v = json_text(model, n);
        assert_non_null(v);
        assert_int_equal(json_string_length(v), n); /* valid UTF-8: kept whole, not escaped */
        json_decref(v);
    }
    assert_int_equal(pep_utf8_cut("abc", 3, 10), 3);
    assert_int_equal(pep_utf8_cut("ab\xC3\xA9", 4, 3), 2);
    /* json_text never drops invalid UTF-8 either */
    json_t *v = json_text("\xC3", 1);
    assert_non_null(v);
    assert_string_equal(json_string_value(v), "%C3");
    json_decref(v);
    free(model);
}

static void test_utf8_validity(void **state) {
    (void)state;
    static const struct {
        const char *s;
        size_t len;
        bool valid;
    } cases[] = {
        {"", 0, true},
        {"abc", 3, true},
        {"\xC3\xA9", 2, true},
        {"\xE2\x82\xAC", 3, true},
        {"\xF0\x9F\x98\x80", 4, true},
        {"a\0b", 3, true},
        {"\xC3", 1, false},
        {"\xC0\xAE", 2, false}, /* overlong '.' */
        {"\xE0\x80\xAF", 3, false},
        /* overlong '/' */ {"\xED\xA0\x80", 3, false}, /* surrogate */
        {"\xF4\x90\x80\x80", 4, false},                /* past U+10FFFF */
        {"\xF8\x88\x80\x80\x80", 5, false},
        {"\x80", 1, false},
        {"\xE2\x82", 2, false},
        {"\xC3\x28", 2, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        if (pep_utf8_valid(cases[i].s, cases[i].len) != cases[i].valid)
            fail_msg("case %zu: expected %s", i, cases[i].valid ? "valid" : "invalid");
    /* a record with a key that is not UTF-8 has no canonical form (never a mangled text) */
    json_t *rec = json_object();
    json_object_set_new_nocheck(rec, "\xf4", json_integer(1));
    assert_null(audit_canonical_json(rec));
    json_decref(rec);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_distinct_bytes_stay_distinct),
        cmocka_unit_test(test_exact_text_is_reversible),
        cmocka_unit_test(test_long_values_cut_between_characters),
        cmocka_unit_test(test_utf8_validity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
