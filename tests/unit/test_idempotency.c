/*
 * test_idempotency.c — Idempotency-Key entries (pep/idempotency.c, SPEC 4.5): memory and a
 * real SQLite file, with time as a parameter.  The apply functions run inside
 * BEGIN IMMEDIATE … COMMIT on a writer connection of the test's own, as the audit writer
 * would run them.
 */
#include "pep/idempotency.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#define S 1000000LL /* one second in µs */
#define T0 (1700000000LL * S)

static const char FP_A[] = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
static const char FP_B[] = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
static const char REQ1[] = "01JAAAAAAAAAAAAAAAAAAAAAA1";
static const char REQ2[] = "01JAAAAAAAAAAAAAAAAAAAAAA2";

struct fixture {
    char path[64];
    sqlite3 *writer; /* stands in for the audit writer's connection */
    struct idem_store *store;
};

static int setup(void **state) {
    struct fixture *f = calloc(1, sizeof *f);
    snprintf(f->path, sizeof f->path, "/tmp/pep-idem-XXXXXX");
    int fd = mkstemp(f->path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(sqlite3_open(f->path, &f->writer), SQLITE_OK);
    assert_int_equal(sqlite3_exec(f->writer, "PRAGMA journal_mode=WAL", NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_exec(f->writer, IDEMPOTENCY_SCHEMA, NULL, NULL, NULL), SQLITE_OK);
    struct pep_err err = {0};
    assert_int_equal(idem_open(f->path, &f->store, &err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    struct fixture *f = *state;
    idem_close(f->store);
    sqlite3_close(f->writer);
    char side[80];
    unlink(f->path);
    snprintf(side, sizeof side, "%s-wal", f->path);
    unlink(side);
    snprintf(side, sizeof side, "%s-shm", f->path);
    unlink(side);
    free(f);
    return 0;
}

/* Runs an apply function in its own write transaction, as the audit writer would. */
static int apply(struct fixture *f, int (*fn)(sqlite3 *, void *), void *arg) {
    assert_int_equal(sqlite3_exec(f->writer, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);
    int rc = fn(f->writer, arg);
    assert_int_equal(sqlite3_exec(f->writer, rc ? "ROLLBACK" : "COMMIT", NULL, NULL, NULL),
                     SQLITE_OK);
    return rc;
}

static int64_t rows(struct fixture *f) {
    sqlite3_stmt *st = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(f->writer, "SELECT count(*) FROM idempotency", -1, &st, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

/* A binary body with NUL bytes, and the headers pep would relay and set. */
static const char BODY[] = {'{', '\0', 'x', '\0', '\xff', '}'};
static struct forward_header HEADERS[] = {
    {"Content-Type", "application/octet-stream"},
    {"Pep-Upstream", "primary"},
    {"Pep-Attempts", "2"},
};

static struct idem_result answer(void) {
    return (struct idem_result){.status = 201,
                                .headers = HEADERS,
                                .headers_len = PEP_ARRAY_LEN(HEADERS),
                                .body = (char *)BODY,
                                .body_len = sizeof BODY};
}

static void assert_is_answer(const struct idem_result *r, int64_t created_at_us) {
    assert_int_equal(r->status, 201);
    assert_int_equal(r->headers_len, PEP_ARRAY_LEN(HEADERS));
    for (size_t i = 0; i < PEP_ARRAY_LEN(HEADERS); i++) {
        assert_string_equal(r->headers[i].name, HEADERS[i].name);
        assert_string_equal(r->headers[i].value, HEADERS[i].value);
    }
    assert_int_equal(r->body_len, sizeof BODY);
    assert_memory_equal(r->body, BODY, sizeof BODY);
    assert_int_equal(r->body[r->body_len], '\0');
    assert_string_equal(r->request_id, REQ1);
    assert_int_equal(r->created_at_us, created_at_us);
}

static void test_key_valid(void **state) {
    (void)state;
    char max[IDEM_MAX_KEY + 2];
    memset(max, 'k', sizeof max);
    max[IDEM_MAX_KEY] = '\0';
    char over[IDEM_MAX_KEY + 2];
    memset(over, 'k', sizeof over);
    over[IDEM_MAX_KEY + 1] = '\0';
    const struct {
        const char *key;
        bool valid;
    } cases[] = {
        {NULL, false},          {"", false},         {"a", true},        {"order-42:retry", true},
        {"!~", true},           {"two words", true}, {" lead", false},   {"trail ", false},
        {" ", false},           {max, true},         {over, false},      {"tab\there", false},
        {"nl\n", false},        {"cr\rx", false},    {"del\x7f", false}, {"\x01", false},
        {"caf\xc3\xa9", false}, {"\x80", false},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        if (idem_key_valid(cases[i].key) != cases[i].valid)
            fail_msg("case %zu: expected %s", i, cases[i].valid ? "valid" : "invalid");
    }
}

/* The whole life of one key, SPEC 4.5 step by step. */
static void test_lifecycle(void **state) {
    struct fixture *f = *state;
    struct idem_result r;
    struct idem_stats st;

    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, T0, &r), IDEM_NONE);
    assert_int_equal(idem_reserve(f->store, "bot", "k1", FP_A, REQ1, T0, &r), IDEM_NONE);
    /* in flight: the same request waits (409), another one is a mismatch (422) */
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, T0 + 1, &r), IDEM_IN_PROGRESS);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_B, T0 + 1, &r), IDEM_MISMATCH);
    assert_int_equal(idem_reserve(f->store, "bot", "k1", FP_A, REQ2, T0 + 1, &r), IDEM_IN_PROGRESS);
    assert_int_equal(idem_reserve(f->store, "bot", "k1", FP_B, REQ2, T0 + 1, &r), IDEM_MISMATCH);
    /* only the holder completes it */
    struct idem_result a = answer();
    struct idem_write *w = NULL;
    assert_int_equal(idem_complete(f->store, "bot", "k1", REQ2, &a, T0 + 2, &w), PEP_ENOTFOUND);
    assert_null(w);

    const int64_t done_at = T0 + 5 * S;
    assert_int_equal(idem_complete(f->store, "bot", "k1", REQ1, &a, done_at, &w), 0);
    assert_non_null(w);
    idem_get_stats(f->store, &st);
    assert_int_equal(st.in_flight, 0);
    assert_int_equal(st.recent, 1);
    assert_true(st.recent_bytes >= sizeof BODY);

    /* replayed from memory before its row is written */
    assert_int_equal(rows(f), 0);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, done_at + 1, &r), IDEM_REPLAY);
    assert_is_answer(&r, done_at);
    idem_result_clear(&r);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_B, done_at + 1, &r), IDEM_MISMATCH);

    /* the writer stores it; a second INSERT of the key is refused, never replaced */
    assert_int_equal(apply(f, idem_apply_store, w), 0);
    assert_int_equal(rows(f), 1);
    assert_int_equal(apply(f, idem_apply_store, w), PEP_EEXISTS);
    idem_write_free(w);

    /* kept in memory IDEM_RECENT_US, then only in the database */
    idem_sweep(f->store, done_at + IDEM_RECENT_US - 1);
    idem_get_stats(f->store, &st);
    assert_int_equal(st.recent, 1);
    idem_sweep(f->store, done_at + IDEM_RECENT_US);
    idem_get_stats(f->store, &st);
    assert_int_equal(st.recent, 0);
    assert_int_equal(st.recent_bytes, 0);

    const int64_t later = done_at + IDEM_RECENT_US + 1;
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, later, &r), IDEM_REPLAY);
    assert_is_answer(&r, done_at);
    idem_result_clear(&r);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_B, later, &r), IDEM_MISMATCH);
    /* a reserve that comes late sees the stored answer too */
    assert_int_equal(idem_reserve(f->store, "bot", "k1", FP_A, REQ2, later, &r), IDEM_REPLAY);
    assert_is_answer(&r, done_at);
    idem_result_clear(&r);
    assert_int_equal(idem_reserve(f->store, "bot", "k1", FP_B, REQ2, later, NULL), IDEM_MISMATCH);
    /* keys are per agent */
    assert_int_equal(idem_lookup(f->store, "other-bot", "k1", FP_A, later, &r), IDEM_NONE);

    /* 24 h: the last microsecond still replays, created + TTL is absent */
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, done_at + IDEM_TTL_US - 1, &r),
                     IDEM_REPLAY);
    idem_result_clear(&r);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_A, done_at + IDEM_TTL_US, &r),
                     IDEM_NONE);
    assert_int_equal(idem_lookup(f->store, "bot", "k1", FP_B, done_at + IDEM_TTL_US, &r),
                     IDEM_NONE);
    int64_t now = done_at + IDEM_TTL_US - 1;
    assert_int_equal(apply(f, idem_apply_expire, &now), 0);
    assert_int_equal(rows(f), 1);
    now = done_at + IDEM_TTL_US;
    assert_int_equal(apply(f, idem_apply_expire, &now), 0);
    assert_int_equal(rows(f), 0);

    idem_get_stats(f->store, &st);
    assert_int_equal(st.replays, 4);
    assert_int_equal(st.mismatches, 5);
    assert_int_equal(st.in_progress, 2);
}

/* An expired row that cleanup has not deleted yet does not hold the key. */
static void test_expired_row_is_replaced(void **state) {
    struct fixture *f = *state;
    struct idem_result a = answer(), r;
    struct idem_write *w = NULL;
    assert_int_equal(idem_reserve(f->store, "bot", "k", FP_A, REQ1, T0, NULL), IDEM_NONE);
    assert_int_equal(idem_complete(f->store, "bot", "k", REQ1, &a, T0, &w), 0);
    assert_int_equal(apply(f, idem_apply_store, w), 0);
    idem_write_free(w);

    const int64_t next_day = T0 + IDEM_TTL_US + 1;
    idem_sweep(f->store, next_day);
    assert_int_equal(idem_reserve(f->store, "bot", "k", FP_B, REQ2, next_day, NULL), IDEM_NONE);
    a.status = 200;
    assert_int_equal(idem_complete(f->store, "bot", "k", REQ2, &a, next_day, &w), 0);
    assert_int_equal(apply(f, idem_apply_store, w), 0);
    idem_write_free(w);
    assert_int_equal(rows(f), 1);
    idem_sweep(f->store, next_day + IDEM_RECENT_US);
    assert_int_equal(idem_lookup(f->store, "bot", "k", FP_B, next_day + IDEM_RECENT_US, &r),
                     IDEM_REPLAY);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.request_id, REQ2);
    idem_result_clear(&r);
}

static void test_release(void **state) {
    struct fixture *f = *state;
    struct idem_result r;
    assert_int_equal(idem_reserve(f->store, "bot", "k", FP_A, REQ1, T0, NULL), IDEM_NONE);
    /* only the holder can release */
    idem_release(f->store, "bot", "k", REQ2);
    assert_int_equal(idem_lookup(f->store, "bot", "k", FP_A, T0, &r), IDEM_IN_PROGRESS);
    idem_release(f->store, "bot", "k", REQ1);
    assert_int_equal(idem_lookup(f->store, "bot", "k", FP_A, T0, &r), IDEM_NONE);
    /* free again, for another request even */
    assert_int_equal(idem_reserve(f->store, "bot", "k", FP_B, REQ2, T0, NULL), IDEM_NONE);
    struct idem_stats st;
    idem_get_stats(f->store, &st);
    assert_int_equal(st.in_flight, 1);
    /* a completed entry is not released by a stale call */
    struct idem_result a = answer();
    struct idem_write *w = NULL;
    assert_int_equal(idem_complete(f->store, "bot", "k", REQ2, &a, T0, &w), 0);
    idem_release(f->store, "bot", "k", REQ2);
    assert_int_equal(idem_lookup(f->store, "bot", "k", FP_B, T0, &r), IDEM_REPLAY);
    idem_result_clear(&r);
    idem_write_free(w);
}

struct racer {
    struct idem_store *store;
    pthread_barrier_t *start;
    char key[32];
    char request_id[27];
    enum idem_verdict verdict;
};

static void *race(void *arg) {
    struct racer *r = arg;
    pthread_barrier_wait(r->start);
    r->verdict = idem_reserve(r->store, "bot", r->key, FP_A, r->request_id, T0, NULL);
    return NULL;
}

/* Eight listener threads reserve one key at once: exactly one gets it. */
static void test_concurrent_reserve(void **state) {
    struct fixture *f = *state;
    enum { THREADS = 8, ROUNDS = 50 };
    for (int round = 0; round < ROUNDS; round++) {
        pthread_barrier_t start;
        pthread_barrier_init(&start, NULL, THREADS);
        struct racer racers[THREADS];
        pthread_t th[THREADS];
        for (int i = 0; i < THREADS; i++) {
            racers[i] = (struct racer){.store = f->store, .start = &start};
            snprintf(racers[i].key, sizeof racers[i].key, "race-%d", round);
            snprintf(racers[i].request_id, sizeof racers[i].request_id, "REQ%02d%02d", round, i);
            assert_int_equal(pthread_create(&th[i], NULL, race, &racers[i]), 0);
        }
        int won = 0, waiting = 0;
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], NULL);
            won += racers[i].verdict == IDEM_NONE;
            waiting += racers[i].verdict == IDEM_IN_PROGRESS;
        }
        pthread_barrier_destroy(&start);
        assert_int_equal(won, 1);
        assert_int_equal(waiting, THREADS - 1);
    }
    struct idem_stats st;
    idem_get_stats(f->store, &st);
    assert_int_equal(st.in_flight, ROUNDS);
}

/* An answer that cannot be stored is relayed all the same; the key is let go. */
static void test_not_storable(void **state) {
    struct fixture *f = *state;
    struct idem_result a = answer(), r;
    struct idem_write *w = NULL;
    char *big = calloc(1, IDEM_MAX_BODY + 1);
    assert_non_null(big);

    a.body = big;
    a.body_len = IDEM_MAX_BODY + 1;
    assert_int_equal(idem_reserve(f->store, "bot", "big", FP_A, REQ1, T0, NULL), IDEM_NONE);
    assert_int_equal(idem_complete(f->store, "bot", "big", REQ1, &a, T0, &w), PEP_EINVAL);
    assert_null(w);
    assert_int_equal(idem_lookup(f->store, "bot", "big", FP_A, T0, &r), IDEM_NONE);

    /* exactly IDEM_MAX_BODY is kept */
    a.body_len = IDEM_MAX_BODY;
    assert_int_equal(idem_reserve(f->store, "bot", "big", FP_A, REQ1, T0, NULL), IDEM_NONE);
    assert_int_equal(idem_complete(f->store, "bot", "big", REQ1, &a, T0, &w), 0);
    assert_int_equal(apply(f, idem_apply_store, w), 0);
    idem_write_free(w);
    idem_sweep(f->store, T0 + IDEM_RECENT_US);
    assert_int_equal(idem_lookup(f->store, "bot", "big", FP_A, T0 + IDEM_RECENT_US, &r),
                     IDEM_REPLAY);
    assert_int_equal(r.body_len, IDEM_MAX_BODY);
    idem_result_clear(&r);
    free(big);

    /* header bytes that are not UTF-8 cannot be JSON text */
    struct forward_header bad[] = {{"X-Odd", "caf\xe9"}};
    a = answer();
    a.headers = bad;
    a.headers_len = 1;
    assert_int_equal(idem_reserve(f->store, "bot", "odd", FP_A, REQ1, T0, NULL), IDEM_NONE);
    assert_int_equal(idem_complete(f->store, "bot", "odd", REQ1, &a, T0, &w), PEP_EINVAL);
    assert_null(w);
    assert_int_equal(idem_lookup(f->store, "bot", "odd", FP_A, T0, &r), IDEM_NONE);

    struct idem_stats st;
    idem_get_stats(f->store, &st);
    assert_int_equal(st.in_flight, 0);
}

/* Past IDEM_RECENT_MAX_BYTES the oldest entries go once they are a second old. */
static void test_recent_byte_bound(void **state) {
    struct fixture *f = *state;
    const size_t n = IDEM_RECENT_MAX_BYTES / IDEM_MAX_BODY + 2;
    struct idem_result a = answer();
    a.body = calloc(1, IDEM_MAX_BODY);
    a.body_len = IDEM_MAX_BODY;
    struct idem_stats st;
    for (size_t i = 0; i < n; i++) {
        char key[16];
        struct idem_write *w = NULL;
        snprintf(key, sizeof key, "b%zu", i);
        assert_int_equal(idem_reserve(f->store, "bot", key, FP_A, REQ1, T0, NULL), IDEM_NONE);
        assert_int_equal(idem_complete(f->store, "bot", key, REQ1, &a, T0, &w), 0);
        idem_write_free(w);
    }
    /* all younger than a second: kept over the bound */
    idem_get_stats(f->store, &st);
    assert_int_equal(st.recent, n);
    assert_true(st.recent_bytes > IDEM_RECENT_MAX_BYTES);
    idem_sweep(f->store, T0 + IDEM_RECENT_MIN_US);
    idem_get_stats(f->store, &st);
    assert_true(st.recent < n);
    assert_true(st.recent_bytes <= IDEM_RECENT_MAX_BYTES);
    /* the newest stay */
    struct idem_result r;
    char key[16];
    snprintf(key, sizeof key, "b%zu", n - 1);
    assert_int_equal(idem_lookup(f->store, "bot", key, FP_A, T0 + S, &r), IDEM_REPLAY);
    idem_result_clear(&r);
    free(a.body);
}

/* A restart forgets memory; what was stored is still replayed. */
static void test_restart_replays(void **state) {
    struct fixture *f = *state;
    struct idem_result a = {.status = 204}, r; /* no header, empty body */
    struct idem_write *w = NULL;
    assert_int_equal(idem_reserve(f->store, "bot", "k", FP_A, REQ1, T0, NULL), IDEM_NONE);
    assert_int_equal(idem_complete(f->store, "bot", "k", REQ1, &a, T0, &w), 0);
    assert_int_equal(apply(f, idem_apply_store, w), 0);
    idem_write_free(w);
    assert_int_equal(idem_reserve(f->store, "bot", "in-flight", FP_A, REQ2, T0, NULL), IDEM_NONE);
    idem_close(f->store);

    struct pep_err err = {0};
    assert_int_equal(idem_open(f->path, &f->store, &err), 0);
    assert_int_equal(idem_lookup(f->store, "bot", "k", FP_A, T0 + S, &r), IDEM_REPLAY);
    assert_int_equal(r.status, 204);
    assert_int_equal(r.headers_len, 0);
    assert_int_equal(r.body_len, 0);
    assert_non_null(r.body);
    assert_string_equal(r.request_id, REQ1);
    idem_result_clear(&r);
    /* the in-flight reservation died with the process: a retry is forwarded again */
    assert_int_equal(idem_lookup(f->store, "bot", "in-flight", FP_A, T0 + S, &r), IDEM_NONE);
}

static void test_bad_arguments_fail_closed(void **state) {
    struct fixture *f = *state;
    struct idem_result r;
    char long_agent[300];
    memset(long_agent, 'a', sizeof long_agent - 1);
    long_agent[sizeof long_agent - 1] = '\0';
    assert_int_equal(idem_lookup(f->store, NULL, "k", FP_A, T0, &r), IDEM_ERROR);
    assert_int_equal(idem_lookup(f->store, long_agent, "k", FP_A, T0, &r), IDEM_ERROR);
    assert_int_equal(idem_lookup(f->store, "bot", " k", FP_A, T0, &r), IDEM_ERROR);
    assert_int_equal(idem_lookup(f->store, "bot", "k", "abc", T0, &r), IDEM_ERROR);
    assert_int_equal(
        idem_reserve(f->store, "bot", "k", FP_A, "0123456789012345678901234567", T0, NULL),
        IDEM_ERROR);
}

static void test_open_without_table(void **state) {
    (void)state;
    char path[] = "/tmp/pep-idem-empty-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    struct idem_store *s = NULL;
    struct pep_err err = {0};
    assert_int_equal(idem_open(path, &s, &err), PEP_EDB);
    assert_null(s);
    assert_non_null(strstr(err.msg, "idempotency"));
    unlink(path);
}

int main(void) {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_valid),  T(test_lifecycle),
        T(test_expired_row_is_replaced),   T(test_release),
        T(test_concurrent_reserve),        T(test_not_storable),
        T(test_recent_byte_bound),         T(test_restart_replays),
        T(test_bad_arguments_fail_closed), cmocka_unit_test(test_open_without_table),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
