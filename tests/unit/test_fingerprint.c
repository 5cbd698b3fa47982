/*
 * test_fingerprint.c — what makes two requests the same request (pep/fingerprint.c): the
 * same input gives the same fingerprint, and a change in agent, method, path, query or a
 * single body byte gives another; parts cannot be shifted into each other.
 */
#include "pep/fingerprint.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

static const struct fingerprint_input BASE = {.agent = "billing-bot",
                                              .method = "POST",
                                              .path = "/v1/tenants/acme/refunds",
                                              .query = "dry=1",
                                              .body = "{\"amount\":1500}",
                                              .body_len = 15};

static void fp(const struct fingerprint_input *in, char out[FINGERPRINT_HEX_LEN + 1]) {
    assert_int_equal(request_fingerprint(in, out), 0);
    assert_int_equal(strlen(out), FINGERPRINT_HEX_LEN);
    assert_int_equal(strspn(out, "0123456789abcdef"), FINGERPRINT_HEX_LEN);
}

static void test_stable(void **state) {
    (void)state;
    char a[65], b[65];
    fp(&BASE, a);
    struct fingerprint_input copy = BASE; /* equal bytes elsewhere in memory */
    char body[32];
    memcpy(body, BASE.body, BASE.body_len);
    copy.body = body;
    fp(&copy, b);
    assert_string_equal(a, b);
}

static void test_every_part_counts(void **state) {
    (void)state;
    char base[65], other[65];
    fp(&BASE, base);
    struct fingerprint_input v[] = {BASE, BASE, BASE, BASE, BASE, BASE, BASE, BASE};
    v[0].agent = "billing-bot2";
    v[1].method = "PUT";
    v[2].path = "/v1/tenants/acme/refunds/";
    v[3].query = "dry=2";
    v[4].query = NULL;
    v[5].body = "{\"amount\":1501}";  /* one byte */
    v[6].body_len = 14;               /* one byte fewer */
    v[7].body = "{\"amount\": 1500}"; /* the same JSON, other bytes */
    v[7].body_len = 16;
    for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
        fp(&v[i], other);
        if (strcmp(base, other) == 0) fail_msg("variant %zu has the base's fingerprint", i);
    }
}

/* Lengths are part of the input: moving bytes from one part to the next changes it. */
static void test_parts_cannot_shift(void **state) {
    (void)state;
    struct fingerprint_input a = {.agent = "ab", .method = "c", .path = "/p"};
    struct fingerprint_input b = {.agent = "a", .method = "bc", .path = "/p"};
    struct fingerprint_input c = {.agent = "a", .method = "b", .path = "c/p"};
    char fa[65], fb[65], fc[65];
    fp(&a, fa);
    fp(&b, fb);
    fp(&c, fc);
    assert_string_not_equal(fa, fb);
    assert_string_not_equal(fb, fc);
    assert_string_not_equal(fa, fc);
}

/* No query and an empty one are the same request; no body and an empty one too. */
static void test_absent_equals_empty(void **state) {
    (void)state;
    struct fingerprint_input a = BASE, b = BASE;
    a.query = NULL;
    b.query = "";
    char fa[65], fb[65];
    fp(&a, fa);
    fp(&b, fb);
    assert_string_equal(fa, fb);
    a.body = NULL;
    a.body_len = 0;
    b = a;
    b.body = "";
    fp(&a, fa);
    fp(&b, fb);
    assert_string_equal(fa, fb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stable),
        cmocka_unit_test(test_every_part_counts),
        cmocka_unit_test(test_parts_cannot_shift),
        cmocka_unit_test(test_absent_equals_empty),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
