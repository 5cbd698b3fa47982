/*
 * test_ratelimit.c — GCRA (pep/ratelimit.c) to the microsecond with an injected clock, and
 * its store: keys, the bound and eviction, threads.
 */
#include "pep/ratelimit.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#define MS 1000LL
#define S 1000000LL           /* one second in µs */
#define T0 (1700000000LL * S) /* a wall-clock now */

static struct ratelimit_verdict take(struct ratelimiter *rl, const char *key, int64_t limit,
                                     int64_t window_us, int64_t cost, int64_t now_us) {
    struct ratelimit_verdict v;
    assert_int_equal(ratelimit_take(rl, key, strlen(key), limit, window_us, cost, now_us, &v), 0);
    return v;
}

/* One step of a table: a call on one state and what it must answer. */
struct step {
    int64_t at_us, cost;
    bool allowed;
    int64_t remaining, reset_s, retry_after_s;
};

static void run_steps(int64_t limit, int64_t window_us, const struct step *steps, size_t n) {
    struct ratelimit_tat tat = {0, 0};
    for (size_t i = 0; i < n; i++) {
        struct ratelimit_verdict v;
        ratelimit_gcra(&tat, limit, window_us, steps[i].cost, T0 + steps[i].at_us, &v);
        if (v.allowed != steps[i].allowed || v.remaining != steps[i].remaining ||
            v.reset_s != steps[i].reset_s || v.retry_after_s != steps[i].retry_after_s ||
            v.limit != limit)
            fail_msg("step %zu (t=%lld µs, cost %lld): got allowed=%d remaining=%lld reset=%lld "
                     "retry=%lld",
                     i, (long long)steps[i].at_us, (long long)steps[i].cost, v.allowed,
                     (long long)v.remaining, (long long)v.reset_s, (long long)v.retry_after_s);
    }
}

/* limit 10 per 1 s: T = 100 ms.  A burst of 10, the 11th refused, the next one at exactly
 * t = 100 ms and not a microsecond before. */
static void test_burst_and_boundary(void **state) {
    (void)state;
    static const struct step steps[] = {
        {0, 1, true, 9, 1, 0},          {0, 1, true, 8, 1, 0},
        {0, 1, true, 7, 1, 0},          {0, 1, true, 6, 1, 0},
        {0, 1, true, 5, 1, 0},          {0, 1, true, 4, 1, 0},
        {0, 1, true, 3, 1, 0},          {0, 1, true, 2, 1, 0},
        {0, 1, true, 1, 1, 0},          {0, 1, true, 0, 1, 0},
        {0, 1, false, 0, 1, 1},         {99999, 1, false, 0, 1, 1},
        {100 * MS, 1, true, 0, 1, 0},  /* exactly one T later */
        {100 * MS, 1, false, 0, 1, 1}, /* and only one */
        {250 * MS, 1, true, 0, 1, 0},  /* 150 ms of refill: one request, 50 ms over */
        {299999, 1, false, 0, 1, 1},    {300 * MS, 1, true, 0, 1, 0},
        {1300 * MS, 0, true, 10, 1, 0}, /* a whole window later: full again */
    };
    run_steps(10, 1 * S, steps, PEP_ARRAY_LEN(steps));
}

/* limit 1 per 1 min: Retry-After and Reset are whole seconds, rounded up, at least 1. */
static void test_rounding(void **state) {
    (void)state;
    static const struct step steps[] = {
        {0, 1, true, 0, 60, 0},
        {0, 1, false, 0, 60, 60},
        {1, 1, false, 0, 60, 60}, /* 59.999999 s left: still 60 */
        {1 * S, 1, false, 0, 59, 59},
        {59 * S + 500 * MS, 1, false, 0, 1, 1}, /* 0.5 s left: 1 */
        {59 * S + 999999, 0, false, 0, 1, 1},
        {60 * S, 0, true, 1, 1, 0}, /* full again: Reset is still at least 1 */
        {60 * S, 1, true, 0, 60, 0},
    };
    run_steps(1, 60 * S, steps, PEP_ARRAY_LEN(steps));
}

/* Peek changes nothing; give-back restores one, never beyond a full quota. */
static void test_peek_and_give_back(void **state) {
    (void)state;
    static const struct step steps[] = {
        {0, 0, true, 3, 1, 0},  /* a peek on a fresh key */
        {0, -1, true, 3, 1, 0}, /* nothing to give back: stays full */
        {0, 1, true, 2, 4, 0},
        {0, 1, true, 1, 7, 0},
        {0, 1, true, 0, 10, 0},
        {0, 0, false, 0, 10, 4}, /* refused peek: one request passes in 3.33 s */
        {0, 0, false, 0, 10, 4}, /* peeking twice is the same */
        {0, 1, false, 0, 10, 4},
        {0, -1, true, 1, 7, 0}, /* the last take undone */
        {0, 1, true, 0, 10, 0}, /* and so taken again */
        {0, -3, true, 3, 1, 0},
        {0, -1, true, 3, 1, 0},
        {0, 3, true, 0, 10, 0}, /* cost 3 takes three at once */
        {0, 2, false, 0, 10, 7},
    };
    run_steps(3, 10 * S, steps, PEP_ARRAY_LEN(steps)); /* T = 3.333… s: not whole µs */
}

/* T below one µs or not a whole µs: exact, with no drift over many requests. */
static void test_fractional_interval(void **state) {
    (void)state;
    struct ratelimit_tat tat = {0, 0};
    struct ratelimit_verdict v;
    /* 3 per second: T = 333333.33 µs; after a burst of 3, the 4th passes at 333334 µs
     * (333333.33 rounded up), the 5th at 666667, the 6th at exactly 1 s. */
    for (int i = 0; i < 3; i++) {
        ratelimit_gcra(&tat, 3, S, 1, T0, &v);
        assert_true(v.allowed);
    }
    int64_t expect[] = {333334, 666667, 1000000, 1333334};
    for (size_t i = 0; i < PEP_ARRAY_LEN(expect); i++) {
        ratelimit_gcra(&tat, 3, S, 1, T0 + expect[i] - 1, &v);
        assert_false(v.allowed);
        ratelimit_gcra(&tat, 3, S, 1, T0 + expect[i], &v);
        assert_true(v.allowed);
    }
    /* 10^9 per second: a million requests in one instant leave 999,000,000 */
    tat = (struct ratelimit_tat){0, 0};
    for (int i = 0; i < 1000000; i++)
        ratelimit_gcra(&tat, 1000000000, S, 1, T0, &v);
    assert_int_equal(v.remaining, 999000000);
    /* ... and 1 ms gives back exactly a million of them */
    ratelimit_gcra(&tat, 1000000000, S, 0, T0 + 1 * MS, &v);
    assert_int_equal(v.remaining, 1000000000);
}

static void test_extremes(void **state) {
    (void)state;
    struct ratelimit_tat tat = {0, 0};
    struct ratelimit_verdict v;
    /* limit 1 per 365 days */
    const int64_t year = 365 * 86400 * S;
    ratelimit_gcra(&tat, 1, year, 1, T0, &v);
    assert_true(v.allowed);
    assert_int_equal(v.reset_s, 365 * 86400);
    ratelimit_gcra(&tat, 1, year, 1, T0 + year - 1, &v);
    assert_false(v.allowed);
    assert_int_equal(v.retry_after_s, 1);
    ratelimit_gcra(&tat, 1, year, 1, T0 + year, &v);
    assert_true(v.allowed);

    /* limit INT64_MAX per second, and per the longest window that fits */
    tat = (struct ratelimit_tat){0, 0};
    ratelimit_gcra(&tat, INT64_MAX, S, 1, T0, &v);
    assert_int_equal(v.remaining, INT64_MAX - 1);
    ratelimit_gcra(&tat, INT64_MAX, S, 1, T0, &v);
    assert_int_equal(v.remaining, INT64_MAX - 2);
    ratelimit_gcra(&tat, INT64_MAX, S, INT64_MAX - 2, T0, &v);
    assert_true(v.allowed);
    assert_int_equal(v.remaining, 0);
    ratelimit_gcra(&tat, INT64_MAX, S, 1, T0, &v);
    assert_false(v.allowed);
    assert_int_equal(v.retry_after_s, 1);

    tat = (struct ratelimit_tat){0, 0};
    ratelimit_gcra(&tat, INT64_MAX, INT64_MAX - T0, INT64_MAX, T0, &v);
    assert_true(v.allowed);
    assert_int_equal(tat.us, INT64_MAX);
    assert_int_equal(v.reset_s, (INT64_MAX - T0) / S + 1);
    ratelimit_gcra(&tat, INT64_MAX, INT64_MAX - T0, 1, T0, &v);
    assert_false(v.allowed);

    /* a state left by another limit is still handled: its fraction is cut, not reread */
    tat = (struct ratelimit_tat){T0 + 5, INT64_MAX - 1};
    ratelimit_gcra(&tat, 1, S, 0, T0, &v);
    assert_int_equal(v.reset_s, 1);
    assert_false(v.allowed);
}

static void test_store_keys(void **state) {
    (void)state;
    struct ratelimiter *rl = ratelimiter_new(0);
    assert_non_null(rl);
    /* keys are independent */
    assert_true(take(rl, "a", 2, S, 1, T0).allowed);
    assert_true(take(rl, "a", 2, S, 1, T0).allowed);
    assert_false(take(rl, "a", 2, S, 1, T0).allowed);
    assert_true(take(rl, "b", 2, S, 1, T0).allowed);
    assert_int_equal(take(rl, "b", 2, S, 0, T0).remaining, 1);
    /* keys are bytes, not strings: an embedded NUL and a prefix are other keys */
    struct ratelimit_verdict v;
    assert_int_equal(ratelimit_take(rl, "a\0x", 3, 2, S, 1, T0, &v), 0);
    assert_int_equal(v.remaining, 1);
    assert_int_equal(ratelimit_take(rl, NULL, 0, 2, S, 1, T0, &v), 0);
    assert_int_equal(v.remaining, 1);
    /* a reload that keeps the limit builds the same key bytes again: same state */
    char k1[64], k2[64];
    snprintf(k1, sizeof k1,
             "llm.chat\x1f"
             "agent\x1f"
             "2\x1f%lld\x1f"
             "bot",
             (long long)S);
    snprintf(k2, sizeof k2, "%s", k1);
    assert_true(take(rl, k1, 2, S, 1, T0).allowed);
    assert_true(take(rl, k2, 2, S, 1, T0).allowed);
    assert_false(take(rl, k1, 2, S, 1, T0).allowed);
    /* peeks, give-backs and refusals of unknown keys store nothing */
    struct ratelimit_stats st;
    ratelimiter_stats(rl, &st);
    size_t keys = st.keys;
    assert_int_equal(keys, 5);
    take(rl, "peek", 2, S, 0, T0);
    take(rl, "back", 2, S, -1, T0);
    assert_true(take(rl, "too-much", 2, S, 2, T0).allowed);
    ratelimiter_stats(rl, &st);
    assert_int_equal(st.keys, keys + 1); /* only "too-much", whose cost 2 fit */
    ratelimiter_free(rl);
}

static void test_invalid(void **state) {
    (void)state;
    struct ratelimiter *rl = ratelimiter_new(16);
    assert_non_null(rl);
    char big[RATELIMIT_MAX_KEY_LEN + 1];
    memset(big, 'k', sizeof big);
    struct ratelimit_verdict v;
    struct {
        const void *key;
        size_t len;
        int64_t limit, window, cost, now;
    } bad[] = {
        {big, sizeof big, 1, S, 1, T0}, {NULL, 1, 1, S, 1, T0},        {"k", 1, 0, S, 1, T0},
        {"k", 1, 1, 0, 1, T0},          {"k", 1, 2, S, 3, T0},         {"k", 1, 2, S, -3, T0},
        {"k", 1, 1, S, 1, -1},          {"k", 1, 1, INT64_MAX, 1, T0},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad); i++) {
        int rc = ratelimit_take(rl, bad[i].key, bad[i].len, bad[i].limit, bad[i].window,
                                bad[i].cost, bad[i].now, &v);
        if (rc != PEP_EINVAL || v.allowed || v.retry_after_s != 1) fail_msg("case %zu", i);
    }
    /* the longest key is fine */
    assert_int_equal(ratelimit_take(rl, big, RATELIMIT_MAX_KEY_LEN, 1, S, 1, T0, &v), 0);
    assert_true(v.allowed);
    ratelimiter_free(rl);
}

/* A small bound: idle keys go first and nothing is lost; a busy key keeps its state while
 * the table turns over around it; the size never passes the bound. */
static void test_eviction_bound(void **state) {
    (void)state;
    enum { MAX = 100 };
    struct ratelimiter *rl = ratelimiter_new(MAX);
    assert_non_null(rl);
    struct ratelimit_stats st;
    assert_true(take(rl, "busy", 1, 3600 * S, 1, T0).allowed);
    char key[32];
    for (int i = 0; i < MAX - 1; i++) { /* idle again 100 ms later */
        snprintf(key, sizeof key, "idle-%d", i);
        assert_true(take(rl, key, 10, S, 1, T0).allowed);
    }
    ratelimiter_stats(rl, &st);
    assert_int_equal(st.keys, MAX);
    assert_int_equal(st.evicted, 0);
    /* 1000 new keys at t = 10 s, each busy for 1 s after its take */
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof key, "new-%d", i);
        assert_true(take(rl, key, 1, S, 1, T0 + 10 * S).allowed);
        ratelimiter_stats(rl, &st);
        assert_true(st.keys <= MAX);
    }
    assert_int_equal(st.evicted, 1000);
    /* the 99 idle keys went without cost; then new keys pushed out each other (1 s from
     * idle), never "busy" (an hour from idle) */
    assert_true(st.evicted_busy <= 1000 - (MAX - 1));
    struct ratelimit_verdict v = take(rl, "busy", 1, 3600 * S, 1, T0 + 10 * S);
    assert_false(v.allowed);
    assert_int_equal(v.retry_after_s, 3590);
    ratelimiter_free(rl);
}

/* Several shards with uneven shares: the bound still holds in total. */
static void test_bound_sharded(void **state) {
    (void)state;
    enum { MAX = 5003 };
    struct ratelimiter *rl = ratelimiter_new(MAX);
    assert_non_null(rl);
    char key[32];
    struct ratelimit_stats st;
    for (int i = 0; i < 50000; i++) {
        snprintf(key, sizeof key, "agent-%06d", i);
        assert_true(take(rl, key, 5, 60 * S, 1, T0 + i * MS).allowed);
    }
    ratelimiter_stats(rl, &st);
    assert_true(st.keys <= MAX);
    assert_true(st.keys >= MAX - 4 * 2 * RATELIMIT_EVICT_SAMPLE); /* each shard fills up */
    assert_int_equal(st.keys + st.evicted, 50000);
    /* Each key is busy for 12 s after its take, and the table holds the last 5 s: every
     * eviction here took a busy key, the one of its sample closest to idle.  The newest
     * 1000 keys (farthest from idle) have all kept their state: 4 left, not a fresh 5. */
    assert_int_equal(st.evicted_busy, st.evicted);
    for (int i = 49000; i < 50000; i++) {
        snprintf(key, sizeof key, "agent-%06d", i);
        if (take(rl, key, 5, 60 * S, 0, T0 + 50 * S).remaining != 4) fail_msg("%s lost", key);
    }
    ratelimiter_free(rl);
}

struct race {
    struct ratelimiter *rl;
    pthread_barrier_t *start; /* all threads take at once: the most contention */
    int allowed, others_allowed;
};

static void *race_thread(void *arg) {
    struct race *r = arg;
    pthread_barrier_wait(r->start);
    for (int i = 0; i < 1000; i++) {
        struct ratelimit_verdict v;
        if (ratelimit_take(r->rl, "shared", 6, 1000, 3600 * S, 1, T0 + i, &v) != 0) abort();
        r->allowed += v.allowed;
        /* 16 more keys in step, so that some key is still being taken from while the
         * threads run, not only during the first thousand takes */
        char key[] = "other-?";
        for (int k = 0; k < 16; k++) {
            key[6] = (char)('a' + k);
            if (ratelimit_take(r->rl, key, 7, 1000, 3600 * S, 1, T0 + i, &v) != 0) abort();
            r->others_allowed += v.allowed;
        }
    }
    return NULL;
}

/* 8 threads x 1000 takes on one key, 1000 per hour: exactly 1000 pass (and as many on each
 * of 16 other keys). */
static void test_threads(void **state) {
    (void)state;
    struct ratelimiter *rl = ratelimiter_new(0);
    assert_non_null(rl);
    pthread_barrier_t start;
    assert_int_equal(pthread_barrier_init(&start, NULL, 8), 0);
    pthread_t th[8];
    struct race r[8];
    for (int i = 0; i < 8; i++) {
        r[i] = (struct race){rl, &start, 0, 0};
        assert_int_equal(pthread_create(&th[i], NULL, race_thread, &r[i]), 0);
    }
    int total = 0, others = 0;
    for (int i = 0; i < 8; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        total += r[i].allowed;
        others += r[i].others_allowed;
    }
    assert_int_equal(total, 1000);
    assert_int_equal(others, 16 * 1000);
    pthread_barrier_destroy(&start);
    ratelimiter_free(rl);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_burst_and_boundary),
        cmocka_unit_test(test_rounding),
        cmocka_unit_test(test_peek_and_give_back),
        cmocka_unit_test(test_fractional_interval),
        cmocka_unit_test(test_extremes),
        cmocka_unit_test(test_store_keys),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_eviction_bound),
        cmocka_unit_test(test_bound_sharded),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
