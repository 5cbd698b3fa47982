/*
 * test_reply.c — the reply under construction (pep/http.c): relayed upstream answers can
 * carry many headers (rate-limit families, tracing, provider ids), and none may be lost.
 */
#include "pep/http.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <cmocka.h>

static void test_many_headers_are_kept(void **state) {
    (void)state;
    struct reply rep = {0};
    char name[32], value[32];
    for (int i = 0; i < 100; i++) {
        snprintf(name, sizeof name, "X-Header-%d", i);
        snprintf(value, sizeof value, "value-%d", i);
        assert_int_equal(reply_set_header(&rep, name, value), 0);
    }
    assert_int_equal(rep.headers_len, 100);
    assert_string_equal(rep.headers[0].name, "X-Header-0");
    assert_string_equal(rep.headers[99].value, "value-99");
    reply_clear(&rep);
    assert_int_equal(rep.headers_len, 0);
    assert_null(rep.headers);
    /* a cleared reply is reusable */
    assert_int_equal(reply_set_header(&rep, "A", "b"), 0);
    reply_clear(&rep);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_many_headers_are_kept),
    };
    return cmocka_run_group_tests_name("reply", tests, NULL, NULL);
}
