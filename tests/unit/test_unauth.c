/*
 * test_unauth.c — server.unauthenticated_limit's counting (pep/unauth.c), with time as a
 * parameter.
 */
#include "pep/unauth.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#define S 1000000LL /* one second in µs */

struct emitted {
    struct unauth_window w[8192];
    size_t n;
};

static void collect(void *arg, const struct unauth_window *w) {
    struct emitted *e = arg;
    if (e->n < sizeof e->w / sizeof e->w[0]) e->w[e->n++] = *w;
}

static void test_limit_then_counted(void **state) {
    (void)state;
    struct unauth_limiter *l = unauth_new();
    assert_non_null(l);
    /* limit 3 per 10 s: three answered as usual, the rest limited */
    for (int i = 0; i < 3; i++)
        assert_false(unauth_refused(l, "10.0.0.1", 3, 10000, 100 * S + i).limited);
    struct unauth_verdict v = unauth_refused(l, "10.0.0.1", 3, 10000, 100 * S + 3);
    assert_true(v.limited);
    assert_true(v.first_limited);
    assert_int_equal(v.retry_after_s, 10); /* the window ends at 110 s */
    v = unauth_refused(l, "10.0.0.1", 3, 10000, 107 * S + 500000);
    assert_true(v.limited);
    assert_false(v.first_limited);
    assert_int_equal(v.retry_after_s, 3); /* 2.5 s left, rounded up */
    /* another address has its own window */
    assert_false(unauth_refused(l, "10.0.0.2", 3, 10000, 105 * S).limited);

    struct emitted *e = calloc(1, sizeof *e);
    /* nothing has ended yet */
    assert_int_equal(unauth_flush(l, 109 * S, false, collect, e), 0);
    /* 10.0.0.1's window ended at 110 s: one window, two limited refusals */
    assert_int_equal(unauth_flush(l, 110 * S, false, collect, e), 1);
    assert_string_equal(e->w[0].source, "10.0.0.1");
    assert_int_equal(e->w[0].count, 2);
    assert_int_equal(e->w[0].started_us, 100 * S);
    assert_int_equal(e->w[0].ended_us, 110 * S);
    /* handed out once; a new window starts afresh */
    assert_int_equal(unauth_flush(l, 111 * S, false, collect, e), 0);
    assert_false(unauth_refused(l, "10.0.0.1", 3, 10000, 111 * S).limited);
    /* 10.0.0.2 limited nothing: its ended window is dropped without a record */
    assert_int_equal(unauth_flush(l, 200 * S, true, collect, e), 0);
    free(e);
    unauth_free(l);
}

/* A window that limited refusals keeps counting until it is flushed, even past its end:
 * nothing limited is ever lost from a record. */
static void test_unflushed_window_keeps_counting(void **state) {
    (void)state;
    struct unauth_limiter *l = unauth_new();
    assert_false(unauth_refused(l, "a", 1, 1000, 0).limited);
    assert_true(unauth_refused(l, "a", 1, 1000, 500000).limited);
    assert_true(unauth_refused(l, "a", 1, 1000, 1500000).limited); /* late, not yet flushed */
    struct emitted *e = calloc(1, sizeof *e);
    assert_int_equal(unauth_flush(l, 2 * S, false, collect, e), 1);
    assert_int_equal(e->w[0].count, 2);
    free(e);
    unauth_free(l);
}

/* Past UNAUTH_MAX_SOURCES addresses, the rest share the "other" window; flushing frees
 * slots (deletion keeps every remaining address reachable). */
static void test_table_full_and_removal(void **state) {
    (void)state;
    struct unauth_limiter *l = unauth_new();
    char src[UNAUTH_SOURCE_LEN];
    for (int i = 0; i < UNAUTH_MAX_SOURCES; i++) {
        snprintf(src, sizeof src, "10.%d.%d.1", i / 256, i % 256);
        /* even addresses open at t=0 (1 s windows), odd ones at t=0.5 s (10 s windows) */
        int64_t t = i % 2 ? S / 2 : 0;
        int64_t window = i % 2 ? 10000 : 1000;
        assert_false(unauth_refused(l, src, 1, window, t).limited);
        assert_true(unauth_refused(l, src, 1, window, t).limited);
    }
    /* the table is full: a new address is limited under "other" */
    assert_false(unauth_refused(l, "192.0.2.1", 1, 1000, S / 2).limited);
    assert_true(unauth_refused(l, "192.0.2.2", 1, 1000, S / 2).limited);
    struct emitted *e = calloc(1, sizeof *e);
    /* at 1.6 s the even addresses and "other" ended */
    size_t n = unauth_flush(l, 1600000, false, collect, e);
    assert_int_equal(n, UNAUTH_MAX_SOURCES / 2 + 1);
    bool other = false;
    for (size_t i = 0; i < e->n; i++)
        if (strcmp(e->w[i].source, "other") == 0) other = true;
    assert_true(other);
    /* every odd address is still found in its own window (still limited) */
    for (int i = 1; i < UNAUTH_MAX_SOURCES; i += 2) {
        snprintf(src, sizeof src, "10.%d.%d.1", i / 256, i % 256);
        struct unauth_verdict v = unauth_refused(l, src, 1, 10000, 2 * S);
        if (!v.limited || v.first_limited) fail_msg("%s lost its window", src);
    }
    e->n = 0;
    assert_int_equal(unauth_flush(l, 11 * S, false, collect, e), UNAUTH_MAX_SOURCES / 2);
    for (size_t i = 0; i < e->n; i++)
        assert_int_equal(e->w[i].count, 2);
    free(e);
    unauth_free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_limit_then_counted),
        cmocka_unit_test(test_unflushed_window_keeps_counting),
        cmocka_unit_test(test_table_full_and_removal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
