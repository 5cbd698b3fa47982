/*
 * test_indicators.c — pep/indicators.c with an injected clock: rates from known samples,
 * nulls without denominators, the last hour rolling off at the exact minute, p95 within
 * the documented 1/32, objectives met / not met / null, the exact JSON, reloads, threads;
 * and the policy compiler's `objectives` (values and FILE:LINE:COL errors).
 */
#include "pep/indicators.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#define MIN_MS 60000LL
#define M0 28333333LL    /* a minute of 2023, as floor(epoch ms / 60000) */
#define T0 (M0 * MIN_MS) /* its first millisecond */

/* ---- a policy holding only what indicators read: chain names and objectives ------------ */

struct chains {
    struct policy p;
    struct chain items[8];
};

static void chains_set(struct chains *c, const char *const *names) {
    memset(c, 0, sizeof *c);
    c->p.chains = c->items;
    for (; names && *names; names++)
        c->items[c->p.chains_len++].name = (char *)*names;
}

static struct indicators *indicators_with(struct chains *c, const char *const *names) {
    chains_set(c, names);
    struct indicators *ind = indicators_new();
    assert_non_null(ind);
    assert_int_equal(indicators_sync(ind, &c->p), 0);
    return ind;
}

static void record(struct indicators *ind, const char *chain, bool first_failed, bool served,
                   bool fallback, bool escalated, int64_t latency_ms, int64_t now_ms) {
    struct indicator_sample s = {.first_attempt_failed = first_failed,
                                 .served = served,
                                 .fallback = fallback,
                                 .escalated = escalated,
                                 .latency_ms = latency_ms};
    assert_int_equal(indicators_record(ind, chain, &s, now_ms), 0);
}

/* chains[i][horizon] of indicators_json; the caller releases *root. */
static json_t *horizon(struct indicators *ind, const struct policy *p, int64_t now_ms, size_t i,
                       const char *which, json_t **root) {
    *root = indicators_json(ind, p, now_ms);
    assert_non_null(*root);
    json_t *h = json_object_get(json_array_get(json_object_get(*root, "chains"), i), which);
    assert_non_null(h);
    return h;
}

static json_int_t int_of(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    assert_true(json_is_integer(v));
    return json_integer_value(v);
}

static double real_of(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    if (!json_is_real(v)) fail_msg("%s is not a real", key);
    return json_real_value(v);
}

static void assert_null_member(const json_t *o, const char *key) {
    if (!json_is_null(json_object_get(o, key))) fail_msg("%s is not null", key);
}

/* ---- tests ---------------------------------------------------------------------------- */

static const char *const CHAT[] = {"chat", NULL};

static void test_rates(void **state) {
    (void)state;
    struct chains c;
    struct indicators *ind = indicators_with(&c, CHAT);
    int64_t t = T0 + 1234;
    for (int i = 0; i < 5; i++)
        record(ind, "chat", false, true, false, false, 100, t); /* first attempt served */
    record(ind, "chat", true, true, false, false, 200, t);      /* served by a retry */
    record(ind, "chat", true, true, true, false, 200, t);       /* served by step 1 */
    record(ind, "chat", true, false, false, true, 1000, t);     /* exhausted, escalated: 503 */
    record(ind, "chat", true, true, true, false, 300, t);       /* context_overflow step */
    record(ind, "chat", false, false, false, false, 400, t);    /* 504 deadline */
    record(ind, "chat", false, false, true, false, 0, t); /* fallback without served: ignored */
    /* 11 requests: 4 first-attempt failures of which 3 served, 2 fallbacks, 1 escalation;
     * latencies sum 2600; p95 = the 11th smallest (ceil 10.45) = 1000 ms, reported as the
     * middle of its bucket [992, 1023]: 1008. */
    static const char *const horizons[] = {"since_start", "last_hour"};
    for (size_t h = 0; h < 2; h++) {
        json_t *root;
        json_t *w = horizon(ind, &c.p, t + 1, 0, horizons[h], &root);
        assert_int_equal(int_of(w, "requests"), 11);
        assert_int_equal(int_of(w, "first_attempt_failed"), 4);
        assert_true(real_of(w, "retry_success_rate") == 0.75);
        assert_true(real_of(w, "fallback_activation_rate") == 2.0 / 11);
        assert_true(real_of(w, "escalation_rate") == 1.0 / 11);
        assert_true(real_of(w, "mean_ms") == 2600.0 / 11);
        assert_int_equal(int_of(w, "p95_ms"), 1008);
        json_decref(root);
    }
    indicators_free(ind);
}

static void test_nulls(void **state) {
    (void)state;
    struct chains c;
    struct indicators *ind = indicators_with(&c, CHAT);
    json_t *root;
    json_t *w = horizon(ind, &c.p, T0, 0, "since_start", &root);
    assert_int_equal(int_of(w, "requests"), 0);
    assert_int_equal(int_of(w, "first_attempt_failed"), 0);
    assert_null_member(w, "retry_success_rate");
    assert_null_member(w, "fallback_activation_rate");
    assert_null_member(w, "escalation_rate");
    assert_null_member(w, "mean_ms");
    assert_null_member(w, "p95_ms");
    json_decref(root);

    /* Requests, but no first-attempt failure: only retry_success_rate has no denominator. */
    record(ind, "chat", false, true, false, false, 7, T0);
    w = horizon(ind, &c.p, T0, 0, "last_hour", &root);
    assert_null_member(w, "retry_success_rate");
    assert_true(real_of(w, "fallback_activation_rate") == 0);
    assert_true(real_of(w, "escalation_rate") == 0);
    assert_true(real_of(w, "mean_ms") == 7);
    assert_int_equal(int_of(w, "p95_ms"), 7);
    json_decref(root);

    /* Unknown chain: nothing recorded. */
    struct indicator_sample s = {.served = true};
    assert_int_equal(indicators_record(ind, "nope", &s, T0), PEP_ENOTFOUND);
    assert_int_equal(indicators_record(ind, NULL, &s, T0), PEP_ENOTFOUND);
    indicators_free(ind);
}

static json_int_t requests_at(struct indicators *ind, const struct policy *p, int64_t now_ms,
                              const char *which) {
    json_t *root;
    json_int_t n = int_of(horizon(ind, p, now_ms, 0, which, &root), "requests");
    json_decref(root);
    return n;
}

/* A sample of minute M counts in last_hour until the first millisecond of minute M + 60. */
static void test_last_hour_roll_off(void **state) {
    (void)state;
    struct chains c;
    struct indicators *ind = indicators_with(&c, CHAT);
    record(ind, "chat", false, true, false, false, 5, T0 + MIN_MS - 1); /* last ms of M0 */
    record(ind, "chat", false, true, false, false, 5, T0 + MIN_MS);     /* first ms of M0+1 */
    assert_int_equal(requests_at(ind, &c.p, T0 + MIN_MS, "last_hour"), 2);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS - 1, "last_hour"), 2);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS, "last_hour"), 1);
    assert_int_equal(requests_at(ind, &c.p, T0 + 61 * MIN_MS - 1, "last_hour"), 1);
    assert_int_equal(requests_at(ind, &c.p, T0 + 61 * MIN_MS, "last_hour"), 0);
    assert_int_equal(requests_at(ind, &c.p, T0 + 61 * MIN_MS, "since_start"), 2);
    /* A window in the past does not see later samples. */
    assert_int_equal(requests_at(ind, &c.p, T0 + MIN_MS - 1, "last_hour"), 1);

    /* Minute M0 + 60 reuses M0's slot: the old minute's counts go. */
    record(ind, "chat", false, true, false, false, 5, T0 + 60 * MIN_MS);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS, "last_hour"), 2);
    /* A late sample of minute M0 (now went backwards) counts in since_start only. */
    record(ind, "chat", false, true, false, false, 5, T0);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS, "last_hour"), 2);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS, "since_start"), 4);
    /* After a long silence every slot is stale. */
    assert_int_equal(requests_at(ind, &c.p, T0 + 1000 * MIN_MS, "last_hour"), 0);
    record(ind, "chat", false, true, false, false, 5, T0 + 1000 * MIN_MS);
    assert_int_equal(requests_at(ind, &c.p, T0 + 1000 * MIN_MS, "last_hour"), 1);
    indicators_free(ind);
}

static json_int_t p95_of(struct indicators *ind, const struct policy *p, int64_t now_ms) {
    json_t *root;
    json_int_t v = int_of(horizon(ind, p, now_ms, 0, "since_start", &root), "p95_ms");
    json_decref(root);
    return v;
}

static void assert_within_precision(int64_t got, int64_t want) {
    int64_t err = got > want ? got - want : want - got;
    if (want < 32 ? err != 0 : err * 32 > want)
        fail_msg("p95 %lld for %lld: beyond 1/32", (long long)got, (long long)want);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_p95_precision(void **state) {
    (void)state;
    struct chains c, none;
    struct indicators *ind = indicators_with(&c, CHAT);
    chains_set(&none, NULL);
    /* One sample: p95 is that sample's bucket, for every value to 4 s and geometric steps
     * past the top of the histogram.  Dropping the chain (sync without it) resets it. */
    for (int64_t v = 0; v < (int64_t)1 << 23; v = v < 4096 ? v + 1 : v + v / 50) {
        assert_int_equal(indicators_sync(ind, &none.p), 0);
        assert_int_equal(indicators_sync(ind, &c.p), 0);
        record(ind, "chat", false, true, false, false, v, T0);
        if (v < ((int64_t)1 << 22))
            assert_within_precision(p95_of(ind, &c.p, T0), v);
        else
            assert_int_equal(p95_of(ind, &c.p, T0), 4128768); /* the last bucket */
    }
    /* Log-uniform latencies from 1 ms to ~100 s, against the exact nearest rank. */
    int64_t lat[2000];
    uint64_t x = 88172645463325252ull;
    for (size_t n = 1; n <= PEP_ARRAY_LEN(lat); n = n * 3 + 1) {
        assert_int_equal(indicators_sync(ind, &none.p), 0);
        assert_int_equal(indicators_sync(ind, &c.p), 0);
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64 */
            int shift = (int)(x % 17);
            lat[i] = (int64_t)(1 + ((x >> 20) & (((uint64_t)1 << shift) - 1)) + (1u << shift));
            record(ind, "chat", false, true, false, false, lat[i], T0);
        }
        qsort(lat, n, sizeof lat[0], cmp_i64);
        assert_within_precision(p95_of(ind, &c.p, T0), lat[(n * 95 + 99) / 100 - 1]);
    }
    indicators_free(ind);
}

static const json_t *objective(const json_t *root, size_t chain, const char *name) {
    const json_t *arr =
        json_object_get(json_array_get(json_object_get(root, "chains"), chain), "objectives");
    size_t i;
    const json_t *o;
    json_array_foreach(arr, i, o) if (strcmp(json_string_value(json_object_get(o, "indicator")),
                                             name) == 0) return o;
    return NULL;
}

/* met: 1 true, 0 false, -1 null. */
static void assert_met(const json_t *root, const char *name, int met) {
    const json_t *o = objective(root, 0, name);
    if (!o) fail_msg("no objective %s", name);
    const json_t *m = json_object_get(o, "met");
    if (met < 0) {
        assert_true(json_is_null(m));
        assert_true(json_is_null(json_object_get(o, "value")));
    } else {
        if (!json_is_boolean(m) || json_is_true(m) != (met == 1))
            fail_msg("%s: met should be %d", name, met);
    }
}

static void test_objectives(void **state) {
    (void)state;
    struct chains c;
    struct indicators *ind = indicators_with(&c, CHAT);
    struct chain_objectives *o = &c.items[0].objectives;
    *o = (struct chain_objectives){.has_retry_success_rate = true,
                                   .retry_success_rate = 0.5,
                                   .has_fallback_activation_rate = true,
                                   .fallback_activation_rate = 0.25,
                                   .has_escalation_rate = true,
                                   .escalation_rate = 0.25,
                                   .mean_latency_ms = 100};
    /* No data: every value and met null. */
    json_t *root = indicators_json(ind, &c.p, T0);
    assert_met(root, "retry_success_rate", -1);
    assert_met(root, "fallback_activation_rate", -1);
    assert_met(root, "escalation_rate", -1);
    assert_met(root, "mean_latency", -1);
    json_decref(root);

    /* 4 requests, no first failure: retry_success_rate still null; the rest exactly at
     * their targets (met: the bounds are inclusive). */
    record(ind, "chat", false, true, true, false, 100, T0);
    record(ind, "chat", false, true, false, true, 100, T0);
    record(ind, "chat", false, true, false, false, 50, T0);
    record(ind, "chat", false, true, false, false, 150, T0);
    root = indicators_json(ind, &c.p, T0);
    assert_met(root, "retry_success_rate", -1);
    assert_met(root, "fallback_activation_rate", 1);
    assert_met(root, "escalation_rate", 1);
    assert_met(root, "mean_latency", 1);
    json_decref(root);

    /* One failure not recovered, one escalation more, slower: 0 < 0.5, 2/5 > 0.25,
     * mean 120 > 100, fallback 1/5 <= 0.25. */
    record(ind, "chat", true, false, false, true, 200, T0);
    root = indicators_json(ind, &c.p, T0);
    assert_met(root, "retry_success_rate", 0);
    assert_met(root, "fallback_activation_rate", 1);
    assert_met(root, "escalation_rate", 0);
    assert_met(root, "mean_latency", 0);
    assert_true(json_real_value(json_object_get(objective(root, 0, "mean_latency"), "value")) ==
                120);
    json_decref(root);

    /* Judged on the last hour: an hour later every objective is null again, since_start
     * keeps the counts. */
    root = indicators_json(ind, &c.p, T0 + 60 * MIN_MS);
    assert_met(root, "escalation_rate", -1);
    json_decref(root);
    assert_int_equal(requests_at(ind, &c.p, T0 + 60 * MIN_MS, "since_start"), 5);

    /* Only the objectives written are listed, in the documented order. */
    *o = (struct chain_objectives){
        .mean_latency_ms = 5, .has_retry_success_rate = true, .retry_success_rate = 0};
    root = indicators_json(ind, &c.p, T0);
    const json_t *arr =
        json_object_get(json_array_get(json_object_get(root, "chains"), 0), "objectives");
    assert_int_equal(json_array_size(arr), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "indicator")),
                        "retry_success_rate");
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 1), "indicator")),
                        "mean_latency");
    assert_int_equal(json_integer_value(json_object_get(json_array_get(arr, 1), "target")), 5);
    assert_met(root, "retry_success_rate", 1); /* 0 >= 0 */
    json_decref(root);
    indicators_free(ind);
}

/* The whole answer, byte for byte (values chosen exact in binary). */
static void test_json_exact(void **state) {
    (void)state;
    static const char *const names[] = {"zeta", "alpha", NULL};
    struct chains c;
    struct indicators *ind = indicators_with(&c, names);
    c.items[0].objectives = (struct chain_objectives){.has_retry_success_rate = true,
                                                      .retry_success_rate = 0.5,
                                                      .has_fallback_activation_rate = true,
                                                      .fallback_activation_rate = 0.25,
                                                      .has_escalation_rate = true,
                                                      .escalation_rate = 0.125,
                                                      .mean_latency_ms = 25};
    /* A chain the policy has but sync has not seen yet: listed, empty. */
    c.items[2].name = "fresh";
    c.p.chains_len = 3;
    record(ind, "zeta", true, true, true, false, 10, T0);
    record(ind, "zeta", true, false, false, true, 30, T0);
    record(ind, "zeta", false, true, false, false, 20, T0);
    record(ind, "zeta", false, true, false, false, 20, T0);
    json_t *root = indicators_json(ind, &c.p, T0);
    char *text = json_dumps(root, JSON_COMPACT);
    const char *i_zeta = "{\"requests\":4,\"first_attempt_failed\":2,\"retry_success_rate\":0.5,"
                         "\"fallback_activation_rate\":0.25,\"escalation_rate\":0.25,"
                         "\"mean_ms\":20.0,\"p95_ms\":30}";
    const char *i_empty = "{\"requests\":0,\"first_attempt_failed\":0,\"retry_success_rate\":null,"
                          "\"fallback_activation_rate\":null,\"escalation_rate\":null,"
                          "\"mean_ms\":null,\"p95_ms\":null}";
    char want[4096];
    snprintf(want, sizeof want,
             "{\"chains\":["
             "{\"name\":\"zeta\",\"since_start\":%s,\"last_hour\":%s,\"objectives\":["
             "{\"indicator\":\"retry_success_rate\",\"target\":0.5,\"value\":0.5,\"met\":true},"
             "{\"indicator\":\"fallback_activation_rate\",\"target\":0.25,\"value\":0.25,"
             "\"met\":true},"
             "{\"indicator\":\"escalation_rate\",\"target\":0.125,\"value\":0.25,\"met\":false},"
             "{\"indicator\":\"mean_latency\",\"target\":25,\"value\":20.0,\"met\":true}]},"
             "{\"name\":\"alpha\",\"since_start\":%s,\"last_hour\":%s,\"objectives\":[]},"
             "{\"name\":\"fresh\",\"since_start\":%s,\"last_hour\":%s,\"objectives\":[]}]}",
             i_zeta, i_zeta, i_empty, i_empty, i_empty, i_empty);
    assert_string_equal(text, want);
    free(text);
    json_decref(root);
    indicators_free(ind);
}

/* Reload: kept names keep their counts, new names start empty, removed names are gone (and
 * start over if they come back). */
static void test_reload(void **state) {
    (void)state;
    static const char *const before[] = {"a", "b", NULL};
    static const char *const after[] = {"c", "a", NULL};
    struct chains c1, c2;
    struct indicators *ind = indicators_with(&c1, before);
    record(ind, "a", false, true, false, false, 1, T0);
    record(ind, "a", false, true, false, false, 1, T0);
    record(ind, "b", false, true, false, false, 1, T0);
    chains_set(&c2, after);
    assert_int_equal(indicators_sync(ind, &c2.p), 0);
    json_t *root = indicators_json(ind, &c2.p, T0);
    json_t *arr = json_object_get(root, "chains");
    assert_int_equal(json_array_size(arr), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "name")), "c");
    assert_int_equal(int_of(json_object_get(json_array_get(arr, 0), "since_start"), "requests"), 0);
    assert_int_equal(int_of(json_object_get(json_array_get(arr, 1), "last_hour"), "requests"), 2);
    json_decref(root);
    struct indicator_sample s = {.served = true};
    assert_int_equal(indicators_record(ind, "b", &s, T0), PEP_ENOTFOUND);
    record(ind, "c", false, true, false, false, 1, T0);
    assert_int_equal(indicators_sync(ind, &c1.p), 0);                /* b back, c gone */
    assert_int_equal(requests_at(ind, &c1.p, T0, "since_start"), 2); /* a */
    root = indicators_json(ind, &c1.p, T0);
    assert_int_equal(
        int_of(json_object_get(json_array_get(json_object_get(root, "chains"), 1), "since_start"),
               "requests"),
        0);
    json_decref(root);
    indicators_free(ind);
}

#define THREADS 8
#define ROUNDS 10000

struct ctx {
    struct indicators *ind;
    struct chains *c;
};

static void *record_worker(void *arg) {
    struct ctx *x = arg;
    for (int i = 0; i < ROUNDS; i++) {
        struct indicator_sample s = {.first_attempt_failed = i % 4 == 0,
                                     .served = i % 2 == 0,
                                     .fallback = i % 8 == 0,
                                     .escalated = i % 10 == 0,
                                     .latency_ms = 10};
        if (indicators_record(x->ind, "chat", &s, T0 + i) != 0) abort();
    }
    return NULL;
}

static void *sync_worker(void *arg) {
    struct ctx *x = arg;
    for (int i = 0; i < 200; i++) {
        if (indicators_sync(x->ind, &x->c->p) != 0) abort();
        json_decref(indicators_json(x->ind, &x->c->p, T0));
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    struct chains c;
    struct ctx x = {indicators_with(&c, CHAT), &c};
    pthread_t workers[THREADS], syncer;
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&workers[i], NULL, record_worker, &x), 0);
    assert_int_equal(pthread_create(&syncer, NULL, sync_worker, &x), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(workers[i], NULL);
    pthread_join(syncer, NULL);
    json_t *root;
    json_t *w = horizon(x.ind, &c.p, T0 + ROUNDS, 0, "last_hour", &root);
    assert_int_equal(int_of(w, "requests"), THREADS * ROUNDS);
    assert_int_equal(int_of(w, "first_attempt_failed"), THREADS * ROUNDS / 4);
    assert_true(real_of(w, "retry_success_rate") == 1); /* i % 4 == 0 is even: served */
    assert_true(real_of(w, "fallback_activation_rate") == 0.125);
    assert_true(real_of(w, "escalation_rate") == 0.1);
    assert_true(real_of(w, "mean_ms") == 10);
    json_decref(root);
    indicators_free(x.ind);
}

/* ---- the policy compiler's `objectives` ------------------------------------------------ */

#define NAME "o.yaml"

static void test_policy_objectives(void **state) {
    (void)state;
    const char *ok = "version: 1\n"
                     "upstreams:\n"
                     "  u: { base_url: http://h }\n"
                     "chains:\n"
                     "  c:\n"
                     "    steps: [ { upstream: u } ]\n"
                     "    objectives:\n"
                     "      retry_success_rate: 0.95\n"
                     "      fallback_activation_rate: 0\n"
                     "      escalation_rate: 1\n"
                     "      mean_latency: 5s\n"
                     "  d:\n"
                     "    steps: [ { upstream: u } ]\n";
    struct policy *p = NULL;
    struct policy_errors errs;
    assert_int_equal(policy_load_buffer(NAME, ok, strlen(ok), &p, &errs), 0);
    policy_errors_free(&errs);
    const struct chain_objectives *o = &p->chains[0].objectives;
    assert_true(o->has_retry_success_rate && o->retry_success_rate == 0.95);
    assert_true(o->has_fallback_activation_rate && o->fallback_activation_rate == 0);
    assert_true(o->has_escalation_rate && o->escalation_rate == 1);
    assert_int_equal(o->mean_latency_ms, 5000);
    assert_int_equal(o->loc.line, 8);
    o = &p->chains[1].objectives;
    assert_false(o->has_retry_success_rate || o->has_fallback_activation_rate ||
                 o->has_escalation_rate);
    assert_int_equal(o->mean_latency_ms, 0);
    policy_release(p);

    const char *bad = "version: 1\n"
                      "upstreams:\n"
                      "  u: { base_url: http://h }\n"
                      "chains:\n"
                      "  c:\n"
                      "    steps: [ { upstream: u } ]\n"
                      "    objectives:\n"
                      "      retry_success_rate: 1.5\n"
                      "      fallback_activation_rate: fast\n"
                      "      escalation_rate: [0.1]\n"
                      "      mean_latency: 5\n"
                      "      p99: 1s\n"
                      "  d:\n"
                      "    steps: [ { upstream: u } ]\n"
                      "    objectives: 0.5\n"
                      "  e:\n"
                      "    steps: [ { upstream: u } ]\n"
                      "    objectives: { escalation_rate: .nan, retry_success_rate: -0.1 }\n";
    static const char *const want[] = {
        NAME ":8:27: retry_success_rate must be between 0 and 1",
        NAME ":9:33: expected a number, got a string",
        NAME ":10:24: expected a number, got a sequence",
        NAME ":11:21: bad duration '5': expected a positive integer followed by ms, s, m, h or d "
             "(250ms, 30s, 5m, 1h, 7d)",
        NAME ":12:7: unknown key 'p99'",
        NAME ":15:17: expected a mapping, got a number",
        NAME ":18:36: escalation_rate must be between 0 and 1",
        NAME ":18:62: retry_success_rate must be between 0 and 1",
    };
    p = NULL;
    assert_int_equal(policy_load_buffer(NAME, bad, strlen(bad), &p, &errs), PEP_EINVAL);
    assert_null(p);
    bool same = errs.len == PEP_ARRAY_LEN(want);
    for (size_t i = 0; same && i < errs.len; i++)
        same = strcmp(errs.items[i], want[i]) == 0;
    if (!same) {
        for (size_t i = 0; i < errs.len; i++)
            print_error("got: %s\n", errs.items[i]);
        fail();
    }
    policy_errors_free(&errs);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rates),
        cmocka_unit_test(test_nulls),
        cmocka_unit_test(test_last_hour_roll_off),
        cmocka_unit_test(test_p95_precision),
        cmocka_unit_test(test_objectives),
        cmocka_unit_test(test_json_exact),
        cmocka_unit_test(test_reload),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_policy_objectives),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
