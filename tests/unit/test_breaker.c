/*
 * test_breaker.c — circuit breakers (pep/breaker.c): the pure state machine with an
 * injected clock, then the registry (sync across reloads, transition callbacks, the
 * upstreams listing) and a stress run of 8 threads on one breaker.
 */
#include "pep/breaker.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <cmocka.h>

/* The policy defaults, with a threshold high enough that only what a test sets opens it. */
static struct breaker_config cfg_default(void) {
    return (struct breaker_config){.present = true,
                                   .failure_threshold = 1000,
                                   .failure_rate = 0.5,
                                   .min_requests = 1000,
                                   .window_ms = 10000,
                                   .open_for_ms = 5000,
                                   .half_open_probes = 1,
                                   .success_threshold = 2};
}

/* Admits (expecting `as`) and records one result at now. */
static enum breaker_transition step(struct breaker_state *st, const struct breaker_config *c,
                                    enum breaker_result r, int64_t now) {
    struct breaker_ticket t;
    breaker_core_admit(st, c, now, &t);
    assert_int_not_equal(t.admission, BREAKER_DENY);
    return breaker_core_record(st, c, &t, r, now);
}

static void assert_counts(const struct breaker_state *st, const struct breaker_config *c,
                          int64_t now, int64_t requests, int64_t failures) {
    int64_t r, f;
    breaker_core_counts(st, c, now, &r, &f);
    assert_int_equal(r, requests);
    assert_int_equal(f, failures);
}

/* Opens a breaker at `now` with failure_threshold 1 semantics regardless of c. */
static void open_at(struct breaker_state *st, const struct breaker_config *c, int64_t now) {
    struct breaker_config once = *c;
    once.failure_threshold = 1;
    assert_int_equal(step(st, &once, BREAKER_FAILURE, now), BREAKER_TO_OPEN);
}

/* ---- pure core ------------------------------------------------------------------------ */

static void test_names_and_classify(void **state) {
    (void)state;
    assert_string_equal(breaker_state_name(BREAKER_CLOSED), "closed");
    assert_string_equal(breaker_state_name(BREAKER_OPEN), "open");
    assert_string_equal(breaker_state_name(BREAKER_HALF_OPEN), "half_open");
    struct breaker_config plain = cfg_default(), c429 = cfg_default();
    c429.count_429 = true;
    static const struct {
        bool transport;
        int status;
        enum breaker_result plain, with_429;
    } cases[] = {
        {true, 0, BREAKER_FAILURE, BREAKER_FAILURE},
        {true, 200, BREAKER_FAILURE, BREAKER_FAILURE},
        {false, 200, BREAKER_SUCCESS, BREAKER_SUCCESS},
        {false, 204, BREAKER_SUCCESS, BREAKER_SUCCESS},
        {false, 304, BREAKER_SUCCESS, BREAKER_SUCCESS},
        {false, 400, BREAKER_NEUTRAL, BREAKER_NEUTRAL},
        {false, 401, BREAKER_NEUTRAL, BREAKER_NEUTRAL},
        {false, 404, BREAKER_NEUTRAL, BREAKER_NEUTRAL},
        {false, 429, BREAKER_NEUTRAL, BREAKER_FAILURE},
        {false, 499, BREAKER_NEUTRAL, BREAKER_NEUTRAL},
        {false, 500, BREAKER_FAILURE, BREAKER_FAILURE},
        {false, 503, BREAKER_FAILURE, BREAKER_FAILURE},
        {false, 599, BREAKER_FAILURE, BREAKER_FAILURE},
        {false, 600, BREAKER_FAILURE, BREAKER_FAILURE},
        {false, 0, BREAKER_FAILURE, BREAKER_FAILURE},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        assert_int_equal(breaker_classify(&plain, cases[i].transport, cases[i].status),
                         cases[i].plain);
        assert_int_equal(breaker_classify(&c429, cases[i].transport, cases[i].status),
                         cases[i].with_429);
    }
    assert_int_equal(breaker_classify(NULL, false, 429), BREAKER_NEUTRAL);
}

static void test_failure_threshold(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.failure_threshold = 3;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    assert_int_equal(step(&st, &c, BREAKER_FAILURE, 100), BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 150), BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_FAILURE, 200), BREAKER_UNCHANGED);
    assert_int_equal(st.kind, BREAKER_CLOSED); /* one fewer than the threshold */
    assert_int_equal(step(&st, &c, BREAKER_FAILURE, 300), BREAKER_TO_OPEN);
    assert_int_equal(st.kind, BREAKER_OPEN);
    assert_int_equal(st.since_ms, 300);
    assert_counts(&st, &c, 300, 4, 3); /* opening keeps the counts (listing) */
    struct breaker_ticket t;
    assert_int_equal(breaker_core_admit(&st, &c, 301, &t), BREAKER_UNCHANGED);
    assert_int_equal(t.admission, BREAKER_DENY);
    assert_int_equal(t.half_open_in_ms, 4999);
}

static void test_failure_rate(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.min_requests = 10;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    /* 9 requests at 5/9 failed: below min_requests, the rate does not count */
    for (int i = 0; i < 5; i++)
        assert_int_equal(step(&st, &c, BREAKER_FAILURE, 10 + i), BREAKER_UNCHANGED);
    for (int i = 0; i < 4; i++)
        assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 20 + i), BREAKER_UNCHANGED);
    /* the 10th request makes min_requests with 5/10 = failure_rate: open, on a success */
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 30), BREAKER_TO_OPEN);

    /* 4/10 stays closed; 3/10 opens at 0.3 (exact decimal ratios are not lost to rounding) */
    breaker_core_init(&st, 0, false);
    for (int i = 0; i < 10; i++)
        assert_int_equal(step(&st, &c, i < 4 ? BREAKER_FAILURE : BREAKER_SUCCESS, i),
                         BREAKER_UNCHANGED);
    c.failure_rate = 0.3;
    c.min_requests = 10;
    breaker_core_init(&st, 0, false);
    for (int i = 0; i < 9; i++)
        assert_int_equal(step(&st, &c, i < 3 ? BREAKER_FAILURE : BREAKER_SUCCESS, i),
                         BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 9), BREAKER_TO_OPEN);
}

static void test_window_rolls_off(void **state) {
    (void)state;
    struct breaker_config c = cfg_default(); /* window 10 s: buckets of 1 s */
    c.failure_threshold = 3;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    step(&st, &c, BREAKER_FAILURE, 12500); /* bucket [12000, 13000): counts until 22000 */
    step(&st, &c, BREAKER_FAILURE, 12999); /* same bucket: counted 9001 ms only */
    step(&st, &c, BREAKER_SUCCESS, 15000);
    assert_counts(&st, &c, 21999, 3, 2);
    assert_counts(&st, &c, 22000, 1, 0);
    assert_counts(&st, &c, 24999, 1, 0);
    assert_counts(&st, &c, 25000, 0, 0);
    /* a third failure at 22000 finds only itself: the old two are gone */
    assert_int_equal(step(&st, &c, BREAKER_FAILURE, 22000), BREAKER_UNCHANGED);
    assert_counts(&st, &c, 22000, 2, 1);

    /* ... at 21999 it would have opened */
    breaker_core_init(&st, 0, false);
    step(&st, &c, BREAKER_FAILURE, 12500);
    step(&st, &c, BREAKER_FAILURE, 12999);
    assert_int_equal(step(&st, &c, BREAKER_FAILURE, 21999), BREAKER_TO_OPEN);

    /* the ring is constant memory: a long run of buckets keeps only the last window */
    breaker_core_init(&st, 0, false);
    for (int64_t t = 0; t < 100000; t += 250)
        step(&st, &c, BREAKER_SUCCESS, t);
    assert_counts(&st, &c, 99999, 40, 0); /* 10 buckets × 4 */

    /* a window not divisible by 10: 25 ms → buckets of 3 ms; counted at most 25 ms */
    c.window_ms = 25;
    breaker_core_init(&st, 0, false);
    step(&st, &c, BREAKER_FAILURE, 1000); /* bucket [999, 1002) */
    assert_counts(&st, &c, 1023, 1, 1);
    assert_counts(&st, &c, 1024, 0, 0);
}

static void test_open_for_then_half_open(void **state) {
    (void)state;
    struct breaker_config c = cfg_default(); /* open_for 5 s */
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    open_at(&st, &c, 1000);
    struct breaker_ticket t;
    assert_int_equal(breaker_core_admit(&st, &c, 1000, &t), BREAKER_UNCHANGED);
    assert_int_equal(t.admission, BREAKER_DENY);
    assert_int_equal(t.half_open_in_ms, 5000);
    assert_int_equal(breaker_core_admit(&st, &c, 5999, &t), BREAKER_UNCHANGED);
    assert_int_equal(t.admission, BREAKER_DENY);
    assert_int_equal(t.half_open_in_ms, 1);
    assert_int_equal(breaker_core_record(&st, &c, &t, BREAKER_FAILURE, 5999), BREAKER_UNCHANGED);
    assert_int_equal(breaker_core_admit(&st, &c, 6000, &t), BREAKER_TO_HALF_OPEN);
    assert_int_equal(t.admission, BREAKER_PROBE);
    assert_int_equal(st.kind, BREAKER_HALF_OPEN);
    assert_int_equal(st.since_ms, 6000);

    /* noticed late, it has been half-open since open_for ran out */
    breaker_core_init(&st, 0, false);
    open_at(&st, &c, 1000);
    assert_int_equal(breaker_core_observe(&st, &c, 5999), BREAKER_UNCHANGED);
    assert_int_equal(breaker_core_observe(&st, &c, 9000), BREAKER_TO_HALF_OPEN);
    assert_int_equal(st.since_ms, 6000);
    assert_int_equal(breaker_core_observe(&st, &c, 9001), BREAKER_UNCHANGED);
}

static void test_probe_limit_and_abandon(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.half_open_probes = 2;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    open_at(&st, &c, 0);
    struct breaker_ticket a, b, d;
    breaker_core_admit(&st, &c, 5000, &a);
    breaker_core_admit(&st, &c, 5001, &b);
    breaker_core_admit(&st, &c, 5002, &d);
    assert_int_equal(a.admission, BREAKER_PROBE);
    assert_int_equal(b.admission, BREAKER_PROBE);
    assert_int_equal(d.admission, BREAKER_DENY);
    assert_int_equal(d.half_open_in_ms, 0);
    /* an abandoned probe gives its slot back and decides nothing */
    assert_int_equal(breaker_core_record(&st, &c, &a, BREAKER_ABANDONED, 5003), BREAKER_UNCHANGED);
    assert_counts(&st, &c, 5003, 1, 1); /* only the failure that opened it */
    breaker_core_admit(&st, &c, 5004, &a);
    assert_int_equal(a.admission, BREAKER_PROBE);
    breaker_core_admit(&st, &c, 5005, &d);
    assert_int_equal(d.admission, BREAKER_DENY);
    /* so does a neutral one */
    assert_int_equal(breaker_core_record(&st, &c, &b, BREAKER_NEUTRAL, 5006), BREAKER_UNCHANGED);
    assert_int_equal(st.probes_in_flight, 1);
    assert_int_equal(st.probe_successes, 0);
    breaker_core_admit(&st, &c, 5007, &b);
    assert_int_equal(b.admission, BREAKER_PROBE);
    assert_int_equal(st.kind, BREAKER_HALF_OPEN);
}

static void test_success_threshold_closes(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.success_threshold = 3;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    open_at(&st, &c, 0);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 5000), BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 5001), BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_NEUTRAL, 5002), BREAKER_UNCHANGED); /* no break */
    assert_int_equal(st.kind, BREAKER_HALF_OPEN);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 5003), BREAKER_TO_CLOSED);
    assert_int_equal(st.kind, BREAKER_CLOSED);
    assert_int_equal(st.since_ms, 5003);
    assert_counts(&st, &c, 5003, 0, 0); /* closed afresh */
    struct breaker_ticket t;
    breaker_core_admit(&st, &c, 5004, &t);
    assert_int_equal(t.admission, BREAKER_ALLOW);
}

static void test_probe_failure_reopens(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.half_open_probes = 2;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    open_at(&st, &c, 0);
    struct breaker_ticket a, b, t;
    breaker_core_admit(&st, &c, 5000, &a);
    breaker_core_admit(&st, &c, 5000, &b);
    assert_int_equal(breaker_core_record(&st, &c, &a, BREAKER_SUCCESS, 5100), BREAKER_UNCHANGED);
    breaker_core_admit(&st, &c, 5150, &a);
    assert_int_equal(breaker_core_record(&st, &c, &a, BREAKER_FAILURE, 5200), BREAKER_TO_OPEN);
    assert_int_equal(st.kind, BREAKER_OPEN);
    assert_int_equal(st.since_ms, 5200);
    assert_int_equal(st.probes_in_flight, 0);
    breaker_core_admit(&st, &c, 10199, &t);
    assert_int_equal(t.admission, BREAKER_DENY);
    assert_int_equal(t.half_open_in_ms, 1);
    /* the other probe, of the old period, ends late: counted, decides nothing */
    assert_int_equal(breaker_core_record(&st, &c, &b, BREAKER_SUCCESS, 10199), BREAKER_UNCHANGED);
    assert_counts(&st, &c, 10199, 3, 1); /* the failure that opened it at 0 rolled off */
    assert_int_equal(breaker_core_admit(&st, &c, 10200, &t), BREAKER_TO_HALF_OPEN);
    assert_int_equal(t.admission, BREAKER_PROBE);
    assert_int_equal(breaker_core_record(&st, &c, &b, BREAKER_FAILURE, 10201), BREAKER_UNCHANGED);
    assert_int_equal(st.kind, BREAKER_HALF_OPEN);
    assert_int_equal(st.probes_in_flight, 1); /* t's slot is still t's */
}

static void test_429_and_neutral(void **state) {
    (void)state;
    struct breaker_config c = cfg_default();
    c.failure_threshold = 2;
    struct breaker_state st;
    breaker_core_init(&st, 0, false);
    for (int i = 0; i < 5; i++)
        step(&st, &c, breaker_classify(&c, false, 429), i);
    assert_int_equal(st.kind, BREAKER_CLOSED);
    assert_counts(&st, &c, 10, 0, 0);
    c.count_429 = true;
    step(&st, &c, breaker_classify(&c, false, 429), 11);
    assert_int_equal(step(&st, &c, breaker_classify(&c, false, 429), 12), BREAKER_TO_OPEN);

    /* neutral results are not requests: they cannot dilute the rate */
    c = cfg_default();
    c.min_requests = 4;
    breaker_core_init(&st, 0, false);
    step(&st, &c, BREAKER_FAILURE, 1);
    step(&st, &c, BREAKER_FAILURE, 2);
    for (int i = 0; i < 10; i++)
        assert_int_equal(step(&st, &c, BREAKER_NEUTRAL, 3 + i), BREAKER_UNCHANGED);
    assert_counts(&st, &c, 20, 2, 2);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 21), BREAKER_UNCHANGED);
    assert_int_equal(step(&st, &c, BREAKER_SUCCESS, 22), BREAKER_TO_OPEN); /* 2/4 */
    /* an abandoned ALLOW is nothing at all */
    breaker_core_init(&st, 0, false);
    step(&st, &c, BREAKER_ABANDONED, 1);
    assert_counts(&st, &c, 1, 0, 0);
}

/* ---- registry ------------------------------------------------------------------------- */

#define WALL (1700000000LL * 1000000) /* 2023-11-14T22:13:20Z */

struct seen {
    struct breakers *bs;
    int calls;
    char upstream[32];
    enum breaker_state_kind from, to;
    int64_t now;
    enum breaker_admission inner; /* what the callback's own admit got */
};

static void on_transition(void *arg, const char *upstream, enum breaker_state_kind from,
                          enum breaker_state_kind to, int64_t now_ms) {
    struct seen *s = arg;
    s->calls++;
    snprintf(s->upstream, sizeof s->upstream, "%s", upstream);
    s->from = from;
    s->to = to;
    s->now = now_ms;
    /* No lock of the module is held: the same breaker and the registry can be used */
    struct breaker *b = breakers_get(s->bs, upstream);
    struct breaker_ticket t;
    s->inner = breaker_admit(b, now_ms, &t);
    breaker_record(b, &t, BREAKER_ABANDONED, now_ms);
    json_t *j = breakers_json(s->bs, now_ms, WALL);
    assert_non_null(j);
    json_decref(j);
}

/* A policy holding only upstreams (all breakers_sync reads). */
struct fake_policy {
    struct policy p;
    struct upstream u[3];
};

static void fake_policy(struct fake_policy *fp, size_t n, const char *const names[],
                        const struct breaker_config cfgs[]) {
    memset(fp, 0, sizeof *fp);
    for (size_t i = 0; i < n; i++) {
        fp->u[i].name = (char *)names[i];
        fp->u[i].breaker = cfgs[i];
    }
    fp->p.upstreams = fp->u;
    fp->p.upstreams_len = n;
}

static void assert_json(json_t *j, const char *want) {
    assert_non_null(j);
    char *got = json_dumps(j, JSON_COMPACT);
    assert_string_equal(got, want);
    free(got);
    json_decref(j);
}

static void test_callback_once_outside_lock(void **state) {
    (void)state;
    struct seen s = {0};
    struct breakers *bs = breakers_new(on_transition, &s);
    s.bs = bs;
    struct breaker_config c = cfg_default();
    c.failure_threshold = 2;
    struct fake_policy fp;
    fake_policy(&fp, 1, (const char *[]){"a"}, &c);
    assert_int_equal(breakers_sync(bs, &fp.p, 0), 0);
    struct breaker *b = breakers_get(bs, "a");
    assert_non_null(b);
    assert_null(breakers_get(bs, "nope"));
    struct breaker_ticket t;
    for (int i = 0; i < 2; i++) {
        assert_int_equal(breaker_admit(b, 100 + i, &t), BREAKER_ALLOW);
        breaker_record(b, &t, BREAKER_FAILURE, 100 + i);
    }
    assert_int_equal(s.calls, 1);
    assert_string_equal(s.upstream, "a");
    assert_int_equal(s.from, BREAKER_CLOSED);
    assert_int_equal(s.to, BREAKER_OPEN);
    assert_int_equal(s.now, 101);
    assert_int_equal(s.inner, BREAKER_DENY);
    /* refusals while open are not transitions */
    assert_int_equal(breaker_admit(b, 200, &t), BREAKER_DENY);
    assert_int_equal(s.calls, 1);
    /* the lazy half-open: one call, after our admit took the only probe slot */
    assert_int_equal(breaker_admit(b, 5101, &t), BREAKER_PROBE);
    assert_int_equal(s.calls, 2);
    assert_int_equal(s.from, BREAKER_OPEN);
    assert_int_equal(s.to, BREAKER_HALF_OPEN);
    assert_int_equal(s.inner, BREAKER_DENY);
    breaker_record(b, &t, BREAKER_SUCCESS, 5102);
    assert_int_equal(breaker_admit(b, 5103, &t), BREAKER_PROBE);
    breaker_record(b, &t, BREAKER_SUCCESS, 5104);
    assert_int_equal(s.calls, 3);
    assert_int_equal(s.from, BREAKER_HALF_OPEN);
    assert_int_equal(s.to, BREAKER_CLOSED);
    assert_int_equal(s.inner, BREAKER_ALLOW);
    /* a NULL handle (no such upstream) has no breaker */
    assert_int_equal(breaker_admit(NULL, 0, &t), BREAKER_ALLOW);
    breaker_record(NULL, &t, BREAKER_FAILURE, 0);
    breakers_free(bs);
}

static void test_sync_keeps_state(void **state) {
    (void)state;
    struct seen s = {0};
    struct breakers *bs = breakers_new(on_transition, &s);
    s.bs = bs;
    struct breaker_config c = cfg_default(), none = {.present = false, .window_ms = 30000};
    c.failure_threshold = 5;
    struct fake_policy fp;
    fake_policy(&fp, 2, (const char *[]){"a", "b"}, (struct breaker_config[]){c, c});
    assert_int_equal(breakers_sync(bs, &fp.p, 0), 0);
    struct breaker *a = breakers_get(bs, "a"), *b = breakers_get(bs, "b");
    struct breaker_ticket t;
    for (int i = 0; i < 3; i++) {
        breaker_admit(a, 10, &t);
        breaker_record(a, &t, BREAKER_FAILURE, 10);
    }
    /* a reload lowers the threshold: the three failures count towards the new one */
    c.failure_threshold = 4;
    fake_policy(&fp, 2, (const char *[]){"a", "b"}, (struct breaker_config[]){c, c});
    assert_int_equal(breakers_sync(bs, &fp.p, 20), 0);
    assert_ptr_equal(breakers_get(bs, "a"), a);
    struct breaker_state st;
    bool configured;
    breaker_peek(a, &st, &configured);
    assert_true(configured);
    assert_counts(&st, &c, 20, 3, 3);
    breaker_admit(a, 30, &t);
    breaker_record(a, &t, BREAKER_FAILURE, 30);
    assert_int_equal(s.calls, 1);
    assert_int_equal(s.to, BREAKER_OPEN);

    /* "a" leaves the policy: unlisted, state kept, its handle still works */
    fake_policy(&fp, 1, (const char *[]){"b"}, &c);
    assert_int_equal(breakers_sync(bs, &fp.p, 40), 0);
    assert_json(
        breakers_json(bs, 40, WALL),
        "{\"upstreams\":[{\"name\":\"b\",\"state\":\"closed\",\"since\":"
        "\"2023-11-14T22:13:19.960000Z\",\"requests\":0,\"failures\":0,\"breaker\":true}]}");
    assert_ptr_equal(breakers_get(bs, "a"), a);
    assert_int_equal(breaker_admit(a, 50, &t), BREAKER_DENY);
    /* ... and back under the same name, it carries on open since 30 */
    fake_policy(&fp, 2, (const char *[]){"b", "a"}, (struct breaker_config[]){c, c});
    assert_int_equal(breakers_sync(bs, &fp.p, 60), 0);
    breaker_peek(a, &st, NULL);
    assert_int_equal(st.kind, BREAKER_OPEN);
    assert_int_equal(st.since_ms, 30);
    assert_int_equal(s.calls, 1);

    /* `breaker:` removed from "a": inert, reset (reported as closed), always admits */
    fake_policy(&fp, 2, (const char *[]){"b", "a"}, (struct breaker_config[]){c, none});
    assert_int_equal(breakers_sync(bs, &fp.p, 70), 0);
    assert_int_equal(s.calls, 2);
    assert_int_equal(s.from, BREAKER_OPEN);
    assert_int_equal(s.to, BREAKER_CLOSED);
    assert_int_equal(s.now, 70);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(breaker_admit(a, 80, &t), BREAKER_ALLOW);
        breaker_record(a, &t, BREAKER_FAILURE, 80);
    }
    breaker_peek(a, &st, &configured);
    assert_false(configured);
    assert_int_equal(st.kind, BREAKER_CLOSED);
    assert_counts(&st, &c, 80, 0, 0);
    /* added back: closed, empty, since the reload */
    fake_policy(&fp, 2, (const char *[]){"b", "a"}, (struct breaker_config[]){c, c});
    assert_int_equal(breakers_sync(bs, &fp.p, 90), 0);
    breaker_peek(a, &st, &configured);
    assert_true(configured);
    assert_int_equal(st.since_ms, 90);
    assert_int_equal(s.calls, 2);
    (void)b;
    breakers_free(bs);
}

struct gauge {
    char line[256];
};

static void gauge_line(void *arg, const char *name, enum breaker_state_kind state,
                       bool configured) {
    struct gauge *g = arg;
    size_t len = strlen(g->line);
    snprintf(g->line + len, sizeof g->line - len, "%s=%d%s ", name, (int)state,
             configured ? "" : "(none)");
}

static void test_json_and_foreach(void **state) {
    (void)state;
    struct seen s = {0};
    struct breakers *bs = breakers_new(on_transition, &s);
    s.bs = bs;
    struct breaker_config c = cfg_default(), none = cfg_default();
    c.failure_threshold = 2;
    none.present = false;
    struct fake_policy fp;
    fake_policy(&fp, 3, (const char *[]){"primary", "backup", "plain"},
                (struct breaker_config[]){c, c, none});
    assert_int_equal(breakers_sync(bs, &fp.p, 1000), 0);
    struct breaker *p = breakers_get(bs, "primary"), *b = breakers_get(bs, "backup");
    struct breaker_ticket t;
    for (int i = 0; i < 2; i++) { /* opens at 95500, may half-open at 100500 */
        breaker_admit(p, 95500, &t);
        breaker_record(p, &t, BREAKER_FAILURE, 95500);
    }
    breaker_admit(b, 99000, &t);
    breaker_record(b, &t, BREAKER_FAILURE, 99000);
    breaker_admit(b, 99500, &t);
    breaker_record(b, &t, BREAKER_SUCCESS, 99500);
    breaker_admit(b, 99600, &t);
    breaker_record(b, &t, BREAKER_NEUTRAL, 99600);
    /* now_ms 100000 is WALL */
    assert_json(
        breakers_json(bs, 100000, WALL),
        "{\"upstreams\":["
        "{\"name\":\"primary\",\"state\":\"open\",\"since\":\"2023-11-14T22:13:15.500000Z\","
        "\"requests\":2,\"failures\":2,\"breaker\":true},"
        "{\"name\":\"backup\",\"state\":\"closed\",\"since\":\"2023-11-14T22:11:41.000000Z\","
        "\"requests\":2,\"failures\":1,\"breaker\":true},"
        "{\"name\":\"plain\",\"state\":\"closed\",\"since\":\"2023-11-14T22:11:41.000000Z\","
        "\"requests\":0,\"failures\":0,\"breaker\":false}]}");
    struct gauge g = {""};
    assert_int_equal(breakers_foreach(bs, 100000, gauge_line, &g), 0);
    assert_string_equal(g.line, "primary=1 backup=0 plain=0(none) ");
    /* a look after open_for makes (and reports) the half-open move, since 100500 */
    assert_int_equal(s.calls, 1);
    g.line[0] = '\0';
    assert_int_equal(breakers_foreach(bs, 100623, gauge_line, &g), 0);
    assert_string_equal(g.line, "primary=2 backup=0 plain=0(none) ");
    assert_int_equal(s.calls, 2);
    assert_int_equal(s.to, BREAKER_HALF_OPEN);
    json_t *j = breakers_json(bs, 100623, WALL + 623000);
    assert_non_null(j);
    json_t *u0 = json_array_get(json_object_get(j, "upstreams"), 0);
    assert_string_equal(json_string_value(json_object_get(u0, "state")), "half_open");
    assert_string_equal(json_string_value(json_object_get(u0, "since")),
                        "2023-11-14T22:13:20.500000Z");
    json_decref(j);
    assert_int_equal(s.calls, 2);

    /* an empty policy lists nothing */
    fake_policy(&fp, 0, NULL, NULL);
    assert_int_equal(breakers_sync(bs, &fp.p, 200000), 0);
    assert_json(breakers_json(bs, 200000, WALL), "{\"upstreams\":[]}");
    breakers_free(bs);
}

/* ---- stress --------------------------------------------------------------------------- */

#define THREADS 8
#define ROUNDS 20000

struct tally {
    atomic_long moves[3][3]; /* [from][to] */
};

static void count_move(void *arg, const char *upstream, enum breaker_state_kind from,
                       enum breaker_state_kind to, int64_t now_ms) {
    (void)upstream, (void)now_ms;
    struct tally *t = arg;
    atomic_fetch_add(&t->moves[from][to], 1);
}

struct worker {
    struct breaker *flappy, *steady;
    atomic_llong *clock;
    pthread_barrier_t *go;
    unsigned seed;
    long steady_requests, steady_failures; /* what this thread recorded on steady */
    long probes;
};

static void *hammer(void *arg) {
    struct worker *w = arg;
    pthread_barrier_wait(w->go);
    for (int i = 0; i < ROUNDS; i++) {
        int64_t now = atomic_fetch_add(w->clock, 1) / 8;
        struct breaker_ticket t;
        unsigned r = (unsigned)rand_r(&w->seed);
        static const enum breaker_result results[] = {
            BREAKER_SUCCESS, BREAKER_SUCCESS, BREAKER_FAILURE, BREAKER_NEUTRAL, BREAKER_ABANDONED};
        enum breaker_result res = results[r % PEP_ARRAY_LEN(results)];
        if (breaker_admit(w->flappy, now, &t) != BREAKER_DENY) {
            w->probes += t.admission == BREAKER_PROBE;
            breaker_record(w->flappy, &t, res, now + (r >> 8) % 3);
        }
        breaker_admit(w->steady, now, &t);
        breaker_record(w->steady, &t, res, now);
        w->steady_requests += res == BREAKER_SUCCESS || res == BREAKER_FAILURE;
        w->steady_failures += res == BREAKER_FAILURE;
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    struct tally tally = {0};
    struct breakers *bs = breakers_new(count_move, &tally);
    struct breaker_config flappy = cfg_default(), steady = cfg_default();
    flappy.failure_threshold = 3;
    flappy.window_ms = 50;
    flappy.open_for_ms = 2;
    flappy.half_open_probes = 3;
    steady.window_ms = 1000000000;
    steady.failure_threshold = INT64_MAX;
    steady.min_requests = INT64_MAX;
    struct fake_policy fp;
    fake_policy(&fp, 2, (const char *[]){"flappy", "steady"},
                (struct breaker_config[]){flappy, steady});
    assert_int_equal(breakers_sync(bs, &fp.p, 0), 0);

    atomic_llong clock = 0;
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, THREADS);
    struct worker w[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){breakers_get(bs, "flappy"),
                               breakers_get(bs, "steady"),
                               &clock,
                               &go,
                               (unsigned)i * 7919u + 1,
                               0,
                               0,
                               0};
        assert_int_equal(pthread_create(&th[i], NULL, hammer, &w[i]), 0);
    }
    long requests = 0, failures = 0, probes = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        requests += w[i].steady_requests;
        failures += w[i].steady_failures;
        probes += w[i].probes;
    }
    pthread_barrier_destroy(&go);

    /* steady counted every result exactly once */
    int64_t now = atomic_load(&clock) / 8;
    struct breaker_state st;
    breaker_peek(breakers_get(bs, "steady"), &st, NULL);
    assert_int_equal(st.kind, BREAKER_CLOSED);
    assert_counts(&st, &steady, now, requests, failures);

    /* flappy flapped, each transition reported once: entries and exits of every state
     * balance, but for its start (closed) and where it ended */
    breaker_peek(breakers_get(bs, "flappy"), &st, NULL);
    assert_int_equal(st.probes_in_flight, 0); /* every probe slot came back */
    long opened = 0;
    for (int s = 0; s < 3; s++) {
        long in = 0, out = 0;
        for (int o = 0; o < 3; o++) {
            in += atomic_load(&tally.moves[o][s]);
            out += atomic_load(&tally.moves[s][o]);
        }
        assert_int_equal(in - out, (s == (int)st.kind) - (s == BREAKER_CLOSED));
        if (s == BREAKER_OPEN) opened = in;
    }
    assert_true(opened > 10);
    assert_true(probes > 10);
    assert_int_equal(atomic_load(&tally.moves[BREAKER_CLOSED][BREAKER_HALF_OPEN]), 0);
    assert_int_equal(atomic_load(&tally.moves[BREAKER_OPEN][BREAKER_CLOSED]), 0);
    breakers_free(bs);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_and_classify),
        cmocka_unit_test(test_failure_threshold),
        cmocka_unit_test(test_failure_rate),
        cmocka_unit_test(test_window_rolls_off),
        cmocka_unit_test(test_open_for_then_half_open),
        cmocka_unit_test(test_probe_limit_and_abandon),
        cmocka_unit_test(test_success_threshold_closes),
        cmocka_unit_test(test_probe_failure_reopens),
        cmocka_unit_test(test_429_and_neutral),
        cmocka_unit_test(test_callback_once_outside_lock),
        cmocka_unit_test(test_sync_keeps_state),
        cmocka_unit_test(test_json_and_foreach),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
