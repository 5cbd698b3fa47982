/*
 * test_audit.c — the audit store: canonical JSON, the writer (group commit, ordering,
 * apply in the same transaction, fail-closed batches under injected I/O faults,
 * checkpoints, drain on close), the triggers, and the verifier against tampering —
 * including a chain re-hashed after an edit, which only the checkpoints' signed JWTs
 * reveal (checked with a real keyring through token_check_checkpoint).
 *
 * Batches are made deterministic without timing: a "gate" item whose done callback blocks
 * the writer thread until the test has queued the next items, so they all land in the
 * following batch.  Every store lives in its own mkdtemp directory under /tmp.
 */
#include "audit/audit.h"
#include "pep/keys.h"
#include "pep/token.h"
#include "pep/util.h"
#include "tests/support/forge.h"

#include <ftw.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

/* ---------------------------------------------------------------- fixtures and helpers */

struct fixture {
    char dir[64];
    char db[128];
};

static int fixture_setup(void **state) {
    struct fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/pep_audit_test.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->db, sizeof(f->db), "%s/pep.db", f->dir);
    *state = f;
    return 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int fixture_teardown(void **state) {
    struct fixture *f = *state;
    nftw(f->dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

/* Completion bookkeeping for n items: every done call is counted per item. */
struct tracker;
struct slot {
    struct tracker *t;
    size_t idx;
};
struct tracker {
    pthread_mutex_t m;
    pthread_cond_t c;
    size_t n;
    size_t called;      /* total done calls */
    int *calls;         /* per item */
    int *rc;            /* per item, last rc */
    int64_t *seq;       /* per item, last seq */
    int64_t *order;     /* seqs in call order (called entries) */
    struct slot *slots; /* done_arg of item i */
};

static struct tracker *tracker_new(size_t n) {
    struct tracker *t = calloc(1, sizeof(*t));
    assert_non_null(t);
    pthread_mutex_init(&t->m, NULL);
    pthread_cond_init(&t->c, NULL);
    t->n = n;
    t->calls = calloc(n, sizeof(int));
    t->rc = calloc(n, sizeof(int));
    t->seq = calloc(n, sizeof(int64_t));
    t->order = calloc(n * 2 + 1, sizeof(int64_t));
    t->slots = calloc(n, sizeof(struct slot));
    assert_true(t->calls && t->rc && t->seq && t->order && t->slots);
    for (size_t i = 0; i < n; i++)
        t->slots[i] = (struct slot){t, i};
    return t;
}

static void tracker_free(struct tracker *t) {
    pthread_mutex_destroy(&t->m);
    pthread_cond_destroy(&t->c);
    free(t->calls);
    free(t->rc);
    free(t->seq);
    free(t->order);
    free(t->slots);
    free(t);
}

static void tracker_done(void *arg, int rc, int64_t seq) {
    struct slot *sl = arg;
    struct tracker *t = sl->t;
    pthread_mutex_lock(&t->m);
    t->calls[sl->idx]++;
    t->rc[sl->idx] = rc;
    t->seq[sl->idx] = seq;
    if (t->called < t->n * 2) t->order[t->called] = seq;
    t->called++;
    pthread_cond_broadcast(&t->c);
    pthread_mutex_unlock(&t->m);
}

static void tracker_wait(struct tracker *t, size_t n) {
    pthread_mutex_lock(&t->m);
    while (t->called < n)
        pthread_cond_wait(&t->c, &t->m);
    pthread_mutex_unlock(&t->m);
}

/* A gate: its done callback parks the writer thread until gate_open. */
struct gate {
    pthread_mutex_t m;
    pthread_cond_t c;
    bool entered;
    bool released;
    bool finished;
    int rc;
    int64_t seq;
};

static void gate_init(struct gate *g) {
    memset(g, 0, sizeof(*g));
    pthread_mutex_init(&g->m, NULL);
    pthread_cond_init(&g->c, NULL);
}

static void gate_done(void *arg, int rc, int64_t seq) {
    struct gate *g = arg;
    pthread_mutex_lock(&g->m);
    g->rc = rc;
    g->seq = seq;
    g->entered = true;
    pthread_cond_broadcast(&g->c);
    while (!g->released)
        pthread_cond_wait(&g->c, &g->m);
    g->finished = true;
    pthread_cond_broadcast(&g->c);
    pthread_mutex_unlock(&g->m);
}

static void gate_wait_entered(struct gate *g) {
    pthread_mutex_lock(&g->m);
    while (!g->entered)
        pthread_cond_wait(&g->c, &g->m);
    pthread_mutex_unlock(&g->m);
}

static void gate_open(struct gate *g) {
    pthread_mutex_lock(&g->m);
    g->released = true;
    pthread_cond_broadcast(&g->c);
    while (!g->finished)
        pthread_cond_wait(&g->c, &g->m);
    pthread_mutex_unlock(&g->m);
    pthread_mutex_destroy(&g->m);
    pthread_cond_destroy(&g->c);
}

static json_t *make_record(const char *request_id, int n) {
    json_t *r = json_pack("{s:s, s:s, s:s, s:s, s:s, s:i}", "ts", "2026-01-02T03:04:05.000006Z",
                          "kind", "decision", "request_id", request_id, "agent", "agent-1",
                          "decision", "allow", "n", n);
    assert_non_null(r);
    return r;
}

static struct audit_store *open_store(const char *path, const struct audit_options *opt) {
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    int rc = audit_open(path, opt, &s, &err);
    if (rc) fail_msg("audit_open: %s", err.msg);
    assert_non_null(s);
    return s;
}

/* Writes n records with request ids "<prefix><i>" and waits for them. */
static void write_records(struct audit_store *s, const char *prefix, int n) {
    struct tracker *t = tracker_new((size_t)n);
    for (int i = 0; i < n; i++) {
        char id[64];
        snprintf(id, sizeof(id), "%s%d", prefix, i);
        assert_int_equal(
            audit_submit(s, make_record(id, i), NULL, NULL, tracker_done, &t->slots[i]), 0);
    }
    tracker_wait(t, (size_t)n);
    for (int i = 0; i < n; i++)
        assert_int_equal(t->rc[i], 0);
    tracker_free(t);
}

static void make_store(const char *path, int n, const struct audit_options *opt) {
    struct audit_store *s = open_store(path, opt);
    write_records(s, "r", n);
    audit_close(s);
}

static sqlite3 *raw_open(const char *path) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

static int64_t query_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* Copies a 32-byte blob column of one row. */
static void query_hash(sqlite3 *db, const char *sql, uint8_t out[32]) {
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_bytes(st, 0), 32);
    memcpy(out, sqlite3_column_blob(st, 0), 32);
    sqlite3_finalize(st);
}

static void verify_expect(const char *path, bool ok, int64_t first_bad, const char *reason,
                          int64_t head) {
    struct audit_verify_result res;
    struct pep_err err = {0};
    assert_int_equal(audit_verify_file(path, &res, &err), 0);
    if (res.ok != ok || res.first_bad_seq != first_bad)
        fail_msg("verify: ok=%d first_bad=%lld reason=%s", res.ok, (long long)res.first_bad_seq,
                 res.reason);
    if (reason)
        assert_string_equal(res.reason, reason);
    else
        assert_string_equal(res.reason, "");
    assert_int_equal(res.head_seq, head);
}

/* ---------------------------------------------------------------- canonical JSON */

static void test_canonical_json(void **state) {
    (void)state;
    static const struct {
        const char *in;
        const char *want; /* NULL: no canonical form */
    } cases[] = {
        {"{}", "{}"},
        {"{ \"b\" : 1 , \"a\" : 2 }", "{\"a\":2,\"b\":1}"},
        /* nested objects sorted too, arrays keep their order */
        {"{\"b\":{\"z\":1,\"y\":[3,1,{\"d\":null,\"c\":true}]},\"a\":false}",
         "{\"a\":false,\"b\":{\"y\":[3,1,{\"c\":true,\"d\":null}],\"z\":1}}"},
        /* bytewise order: 'Z' 0x5a < 'a' 0x61 < 'z' < "é" 0xc3 0xa9 < "€" 0xe2 */
        {"{\"\\u20ac\":5,\"\\u00e9\":4,\"z\":3,\"a\":2,\"Z\":1}",
         "{\"Z\":1,\"a\":2,\"z\":3,\"\xc3\xa9\":4,\"\xe2\x82\xac\":5}"},
        /* a key sorts before its extensions; ' ' 0x20 < 'b' */
        {"{\"ab\":1,\"a\":2,\"a b\":3}", "{\"a\":2,\"a b\":3,\"ab\":1}"},
        {"{\"s\":\"a\\u0000b\"}", "{\"s\":\"a\\u0000b\"}"},
        /* escaping: quote, backslash, control chars; '/' and UTF-8 kept as is */
        {"{\"s\":\"q\\\"b\\\\c\\u0001\\u001f\\n\\t\\r\\b\\f/x\\/y\"}",
         "{\"s\":\"q\\\"b\\\\c\\u0001\\u001f\\n\\t\\r\\b\\f/x/y\"}"},
        /* an escaped backslash followed by "u" is not an escape to lowercase */
        {"{\"s\":\"\\\\uABCD\\u001B\"}", "{\"s\":\"\\\\uABCD\\u001b\"}"},
        {"{\"s\":\"\\u00e9\\u20ac\\ud83d\\ude00\x7f\"}",
         "{\"s\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\x7f\"}"},
        {"{\"n\":-9223372036854775808,\"m\":0,\"k\":123}",
         "{\"k\":123,\"m\":0,\"n\":-9223372036854775808}"},
        /* reals have no canonical form, wherever they are */
        {"{\"x\":1.5}", NULL},
        {"{\"a\":[1,{\"b\":10.0}]}", NULL},
        /* not an object */
        {"[1,2]", NULL},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        json_error_t jerr;
        json_t *v = json_loads(cases[i].in, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
        if (!v) fail_msg("case %zu: %s", i, jerr.text);
        char *got = audit_canonical_json(v);
        if (!cases[i].want) {
            if (got) fail_msg("case %zu: want NULL, got %s", i, got);
        } else {
            if (!got) fail_msg("case %zu: got NULL", i);
            assert_string_equal(got, cases[i].want);
            /* invariant: canonical of the parsed canonical text is the same bytes */
            json_t *again = json_loads(got, JSON_ALLOW_NUL, &jerr);
            assert_non_null(again);
            char *got2 = audit_canonical_json(again);
            assert_string_equal(got2, got);
            free(got2);
            json_decref(again);
        }
        free(got);
        json_decref(v);
    }
    assert_null(audit_canonical_json(NULL));
    /* no canonical form either: U+0000 in a key, invalid UTF-8 */
    json_t *o = json_object();
    assert_int_equal(json_object_setn_new(o, "a\0b", 3, json_integer(1)), 0);
    assert_null(audit_canonical_json(o));
    json_decref(o);
    o = json_pack("{s:o}", "s", json_string_nocheck("\xff\xfe"));
    assert_null(audit_canonical_json(o));
    json_decref(o);
}

static json_t *nested(int depth) {
    json_t *v = json_object();
    for (int i = 1; i < depth; i++)
        v = json_pack("{s:o}", "k", v);
    return v;
}

static void test_canonical_depth(void **state) {
    (void)state;
    json_t *ok = nested(AUDIT_MAX_DEPTH);
    json_t *deep = nested(AUDIT_MAX_DEPTH + 1);
    char *s = audit_canonical_json(ok);
    assert_non_null(s);
    free(s);
    assert_null(audit_canonical_json(deep));
    json_decref(ok);
    json_decref(deep);
}

static void test_chain_hash(void **state) {
    (void)state;
    uint8_t prev[32], got[32], want[32];
    char buf[32 + 16];
    for (int i = 0; i < 32; i++)
        prev[i] = (uint8_t)(i * 7 + 1);
    memcpy(buf, prev, 32);
    memcpy(buf + 32, "{\"seq\":1}", 9);
    pep_sha256(buf, 41, want);
    assert_int_equal(audit_chain_hash(prev, "{\"seq\":1}", 9, got), 0);
    assert_memory_equal(got, want, 32);
    /* a known vector: SHA-256 of 32 zero bytes followed by "{}" */
    static const uint8_t zero[32];
    char hex[65];
    assert_int_equal(audit_chain_hash(zero, "{}", 2, got), 0);
    memcpy(buf, zero, 32);
    memcpy(buf + 32, "{}", 2);
    pep_sha256(buf, 34, want);
    assert_memory_equal(got, want, 32);
    pep_hex(got, 32, hex);
    assert_int_equal(strlen(hex), 64);
}

/* ---------------------------------------------------------------- writer */

#define APPEND_THREADS 4
#define APPEND_PER_THREAD 250

struct appender {
    struct audit_store *s;
    struct tracker *t;
    int thread;
};

static void *appender_main(void *arg) {
    struct appender *a = arg;
    for (int i = 0; i < APPEND_PER_THREAD; i++) {
        char id[32];
        size_t idx = (size_t)(a->thread * APPEND_PER_THREAD + i);
        snprintf(id, sizeof(id), "t%d-%d", a->thread, i);
        if (audit_submit(a->s, make_record(id, i), NULL, NULL, tracker_done, &a->t->slots[idx]) !=
            0)
            abort();
    }
    return NULL;
}

static void test_concurrent_append(void **state) {
    struct fixture *f = *state;
    const size_t n = APPEND_THREADS * APPEND_PER_THREAD;
    struct audit_options opt = {.durability_full = true, .max_batch = 64};
    struct audit_store *s = open_store(f->db, &opt);
    struct tracker *t = tracker_new(n);
    pthread_t th[APPEND_THREADS];
    struct appender ap[APPEND_THREADS];
    for (int i = 0; i < APPEND_THREADS; i++) {
        ap[i] = (struct appender){s, t, i};
        assert_int_equal(pthread_create(&th[i], NULL, appender_main, &ap[i]), 0);
    }
    for (int i = 0; i < APPEND_THREADS; i++)
        pthread_join(th[i], NULL);
    tracker_wait(t, n);

    assert_int_equal(t->called, n);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(t->calls[i], 1);
        assert_int_equal(t->rc[i], 0);
    }
    /* callbacks in seq order, and seqs are exactly 1..n */
    for (size_t i = 0; i < n; i++)
        assert_int_equal(t->order[i], (int64_t)i + 1);
    /* within one thread, submission order is seq order */
    for (int th_i = 0; th_i < APPEND_THREADS; th_i++)
        for (int i = 1; i < APPEND_PER_THREAD; i++)
            assert_true(t->seq[th_i * APPEND_PER_THREAD + i] >
                        t->seq[th_i * APPEND_PER_THREAD + i - 1]);
    struct audit_stats st;
    audit_get_stats(s, &st);
    assert_int_equal(st.records_written, (int64_t)n);
    assert_int_equal(st.head_seq, (int64_t)n);
    assert_int_equal(st.failures, 0);
    assert_int_equal(st.queued, 0);
    assert_true(st.batches >= (int64_t)(n / 64) && st.batches <= (int64_t)n);
    assert_int_equal(audit_head_seq(s), (int64_t)n);
    assert_string_equal(audit_path(s), f->db);
    audit_close(s);

    /* each callback's seq is the row holding that item's record */
    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(f->db, &db, NULL), 0);
    sqlite3_stmt *q = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT seq FROM audit WHERE request_id = ?1", -1, &q, NULL),
        SQLITE_OK);
    for (int th_i = 0; th_i < APPEND_THREADS; th_i++) {
        for (int i = 0; i < APPEND_PER_THREAD; i++) {
            char id[32];
            snprintf(id, sizeof(id), "t%d-%d", th_i, i);
            sqlite3_bind_text(q, 1, id, -1, SQLITE_STATIC);
            assert_int_equal(sqlite3_step(q), SQLITE_ROW);
            assert_int_equal(sqlite3_column_int64(q, 0), t->seq[th_i * APPEND_PER_THREAD + i]);
            sqlite3_reset(q);
        }
    }
    sqlite3_finalize(q);
    /* copy columns are filled from the record */
    assert_int_equal(query_int(db, "SELECT COUNT(*) FROM audit WHERE kind = 'decision' AND"
                                   " agent = 'agent-1' AND decision = 'allow' AND"
                                   " ts = '2026-01-02T03:04:05.000006Z' AND tenant IS NULL"),
                     (int64_t)n);
    sqlite3_close(db);
    tracker_free(t);
    verify_expect(f->db, true, 0, NULL, (int64_t)n);
}

static void test_record_text_and_links(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 2, NULL);
    sqlite3 *db = raw_open(f->db);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT record, prev_hash, hash FROM audit"
                                        " ORDER BY seq",
                                        -1, &st, NULL),
                     SQLITE_OK);
    uint8_t prev[32] = {0}, h[32];
    for (int i = 0; i < 2; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        char want[256];
        snprintf(want, sizeof(want),
                 "{\"agent\":\"agent-1\",\"decision\":\"allow\",\"kind\":\"decision\",\"n\":%d,"
                 "\"request_id\":\"r%d\",\"seq\":%d,\"ts\":\"2026-01-02T03:04:05.000006Z\"}",
                 i, i, i + 1);
        assert_string_equal((const char *)sqlite3_column_text(st, 0), want);
        assert_int_equal(sqlite3_column_bytes(st, 1), 32);
        assert_memory_equal(sqlite3_column_blob(st, 1), prev, 32);
        assert_int_equal(audit_chain_hash(prev, want, strlen(want), h), 0);
        assert_memory_equal(sqlite3_column_blob(st, 2), h, 32);
        memcpy(prev, h, 32);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* The writer puts the real seq where the top-level "seq" sorts, never into a "seq" that
 * sits in a string, a nested object or an array, nor into a key that merely ends in seq. */
static void test_record_seq_placement(void **state) {
    struct fixture *f = *state;
    static const char *const records[] = {
        "{\"kind\":\"x\",\"nested\":{\"seq\":0,\"a\":1},\"note\":\",\\\"seq\\\":0\"}",
        "{\"kind\":\"x\",\"x\\\"seq\":0,\"a\":[{\"seq\":0}]}",
        "{\"se\":\"\\\\\",\"seqq\":\"{\",\"sep\":\"]\",\"r\":\"\\\"\"}",
        "{\"seq\":7,\"zz\":{\"seq\":{\"seq\":0}}}",
        "{}",
    };
    enum { N = sizeof records / sizeof *records };
    struct audit_store *s = open_store(f->db, NULL);
    struct tracker *t = tracker_new(N);
    for (size_t i = 0; i < N; i++) {
        json_t *rec = json_loads(records[i], 0, NULL);
        assert_non_null(rec);
        assert_int_equal(audit_submit(s, rec, NULL, NULL, tracker_done, &t->slots[i]), 0);
    }
    tracker_wait(t, N);
    tracker_free(t);
    audit_close(s);

    sqlite3 *db = raw_open(f->db);
    sqlite3_stmt *st = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT seq, record FROM audit ORDER BY seq", -1, &st, NULL),
        SQLITE_OK);
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        json_t *want = json_loads(records[i], 0, NULL);
        json_object_set_new(want, "seq", json_integer(sqlite3_column_int64(st, 0)));
        char *text = audit_canonical_json(want);
        assert_non_null(text);
        assert_string_equal((const char *)sqlite3_column_text(st, 1), text);
        free(text);
        json_decref(want);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    verify_expect(f->db, true, 0, NULL, N);
}

static void test_reopen_continues(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 3, NULL);
    sqlite3 *db = raw_open(f->db);
    uint8_t h3[32], p4[32];
    query_hash(db, "SELECT hash FROM audit WHERE seq = 3", h3);
    sqlite3_close(db);

    struct audit_store *s = open_store(f->db, NULL);
    assert_int_equal(audit_head_seq(s), 3);
    struct tracker *t = tracker_new(1);
    assert_int_equal(
        audit_submit(s, make_record("again", 0), NULL, NULL, tracker_done, &t->slots[0]), 0);
    tracker_wait(t, 1);
    assert_int_equal(t->rc[0], 0);
    assert_int_equal(t->seq[0], 4);
    tracker_free(t);
    audit_close(s);

    db = raw_open(f->db);
    query_hash(db, "SELECT prev_hash FROM audit WHERE seq = 4", p4);
    assert_memory_equal(p4, h3, 32);
    sqlite3_close(db);
    verify_expect(f->db, true, 0, NULL, 4);
}

static void test_db_file_mode(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 1, NULL);
    struct stat sb;
    assert_int_equal(stat(f->db, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
}

/* ---------------------------------------------------------------- triggers */

static void test_triggers_refuse(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 3, NULL);
    static const char *const refused[] = {
        "UPDATE audit SET record = '{}' WHERE seq = 2",
        "UPDATE audit SET agent = 'x' WHERE seq = 2",
        "DELETE FROM audit WHERE seq = 3",
        "DELETE FROM audit",
        "INSERT OR REPLACE INTO audit (seq, record, prev_hash, hash)"
        " VALUES (2, '{}', zeroblob(32), zeroblob(32))",
        "REPLACE INTO audit (seq, record, prev_hash, hash)"
        " VALUES (3, '{}', zeroblob(32), zeroblob(32))",
        "INSERT INTO audit (seq, record, prev_hash, hash)"
        " VALUES (7, '{}', zeroblob(32), zeroblob(32))",
        "INSERT INTO audit (record, prev_hash, hash) VALUES ('{}', zeroblob(32), zeroblob(32))",
    };
    /* both with and without recursive_triggers on the tampering connection */
    for (int recursive = 0; recursive < 2; recursive++) {
        sqlite3 *db = raw_open(f->db);
        if (recursive)
            assert_int_equal(sqlite3_exec(db, "PRAGMA recursive_triggers=ON", NULL, NULL, NULL),
                             SQLITE_OK);
        for (size_t i = 0; i < PEP_ARRAY_LEN(refused); i++) {
            char *msg = NULL;
            int rc = sqlite3_exec(db, refused[i], NULL, NULL, &msg);
            if (rc != SQLITE_CONSTRAINT) fail_msg("not refused (%d): %s", rc, refused[i]);
            assert_non_null(strstr(msg, "append-only"));
            sqlite3_free(msg);
        }
        sqlite3_close(db);
    }
    /* checkpoints are append-only as well */
    struct audit_store *s = NULL;
    sqlite3 *db = raw_open(f->db);
    assert_int_equal(sqlite3_exec(db,
                                  "INSERT INTO checkpoints VALUES (1, zeroblob(32), 'j', 'now')",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "DELETE FROM checkpoints", NULL, NULL, NULL),
                     SQLITE_CONSTRAINT);
    assert_int_equal(sqlite3_exec(db, "UPDATE checkpoints SET jwt = 'x'", NULL, NULL, NULL),
                     SQLITE_CONSTRAINT);
    /* REPLACE cannot overwrite one either (this connection has no recursive_triggers) */
    assert_int_equal(sqlite3_exec(db,
                                  "INSERT OR REPLACE INTO checkpoints"
                                  " VALUES (1, zeroblob(32), 'evil', 'now')",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(
        sqlite3_exec(db, "REPLACE INTO checkpoints VALUES (1, zeroblob(32), 'evil', 'now')", NULL,
                     NULL, NULL),
        SQLITE_OK);
    assert_int_equal(query_int(db, "SELECT count(*) FROM checkpoints WHERE jwt = 'j'"), 1);
    assert_int_equal(query_int(db, "SELECT count(*) FROM checkpoints"), 1);
    sqlite3_close(db);
    (void)s;
    verify_expect(f->db, false, 1, "hash differs from the checkpoint at seq 1", 0);
}

/* ---------------------------------------------------------------- tampering */

#define DROP_TRIGGERS                                                                              \
    "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;"                                  \
    " DROP TRIGGER audit_insert_guard;"

/* What an attacker with the file can do: drop the triggers, then edit. */
static void tamper(const char *path, const char *sql) {
    sqlite3 *db = raw_open(path);
    char *msg = NULL;
    if (sqlite3_exec(db, DROP_TRIGGERS, NULL, NULL, &msg) != SQLITE_OK ||
        sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("tamper: %s", msg);
    sqlite3_close(db);
}

/* Replaces a row's record and recomputes its own hash from its prev_hash, so that the row
 * is self-consistent and only later checks can catch it. */
static void rewrite_row(const char *path, int64_t seq, const char *text) {
    sqlite3 *db = raw_open(path);
    uint8_t prev[32], h[32];
    char sql[128];
    snprintf(sql, sizeof(sql), "SELECT prev_hash FROM audit WHERE seq = %lld", (long long)seq);
    query_hash(db, sql, prev);
    assert_int_equal(audit_chain_hash(prev, text, strlen(text), h), 0);
    assert_int_equal(sqlite3_exec(db, DROP_TRIGGERS, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "UPDATE audit SET record = ?1, hash = ?2 WHERE seq = ?3",
                                        -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 2, h, 32, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, seq);
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

static void test_tamper_sql(void **state) {
    struct fixture *f = *state;
    static const struct {
        const char *sql;
        int64_t first_bad;
        const char *reason;
        int64_t head;
    } cases[] = {
        /* an edited record */
        {"UPDATE audit SET record = replace(record, '\"n\":3', '\"n\":30') WHERE seq = 4", 4,
         "hash mismatch", 3},
        /* a middle row removed */
        {"DELETE FROM audit WHERE seq = 6", 6, "missing row", 5},
        {"DELETE FROM audit WHERE seq = 1", 1, "missing row", 0},
        /* two records swapped */
        {"CREATE TEMP TABLE t AS SELECT seq, record FROM audit WHERE seq IN (3, 4);"
         "UPDATE audit SET record = (SELECT record FROM t WHERE t.seq = 7 - audit.seq)"
         " WHERE seq IN (3, 4)",
         3, "hash mismatch", 2},
        /* a link cut */
        {"UPDATE audit SET prev_hash = zeroblob(32) WHERE seq = 7", 7,
         "prev_hash differs from the hash of seq 6", 6},
        {"UPDATE audit SET hash = x'00' WHERE seq = 9", 9, "hash mismatch", 8},
        /* a row with a seq outside the chain */
        {"INSERT INTO audit (seq, record, prev_hash, hash) VALUES (0, '{}', x'', x'')", 1,
         "unexpected seq 0 before seq 1", 0},
        /* the tail cut: nothing but a checkpoint can tell (none here) */
        {"DELETE FROM audit WHERE seq > 8", 0, NULL, 8},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        char path[160];
        snprintf(path, sizeof(path), "%s/case%zu.db", f->dir, i);
        make_store(path, 10, NULL);
        verify_expect(path, true, 0, NULL, 10);
        tamper(path, cases[i].sql);
        struct audit_verify_result res;
        assert_int_equal(audit_verify_file(path, &res, NULL), 0);
        if (res.first_bad_seq != cases[i].first_bad || res.ok != (cases[i].first_bad == 0))
            fail_msg("case %zu: first_bad %lld (%s)", i, (long long)res.first_bad_seq, res.reason);
        assert_string_equal(res.reason, cases[i].reason ? cases[i].reason : "");
        assert_int_equal(res.head_seq, cases[i].head);
    }
}

static void test_tamper_rehashed(void **state) {
    struct fixture *f = *state;
    char path[160];
    /* a self-consistent edit of row 5 still breaks row 6's link */
    snprintf(path, sizeof(path), "%s/a.db", f->dir);
    make_store(path, 10, NULL);
    rewrite_row(path, 5, "{\"kind\":\"decision\",\"seq\":5}");
    verify_expect(path, false, 6, "prev_hash differs from the hash of seq 5", 5);

    /* on the last row, the record itself is checked: canonical, seq, JSON */
    static const struct {
        const char *text;
        const char *reason;
    } last[] = {
        {"{\"kind\":\"decision\",\"seq\":10}", NULL},
        {"{\"seq\":10,\"kind\":\"decision\"}", "record is not canonical JSON"},
        {"{\"kind\": \"decision\",\"seq\":10}", "record is not canonical JSON"},
        {"{\"kind\":\"decision\",\"s\":\"a\\/b\",\"seq\":10}", "record is not canonical JSON"},
        {"{\"kind\":\"decision\",\"seq\":10,\"x\":1.5}", "record is not canonical JSON"},
        {"{\"kind\":\"decision\",\"seq\":11}", "record seq differs from the row's seq"},
        {"{\"kind\":\"decision\",\"seq\":\"10\"}", "record seq differs from the row's seq"},
        {"{\"kind\":\"decision\"}", "record seq differs from the row's seq"},
        {"{\"seq\":10,\"seq\":10}", "record is not a JSON object"},
        {"[10]", "record is not a JSON object"},
        {"not json", "record is not a JSON object"},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(last); i++) {
        snprintf(path, sizeof(path), "%s/last%zu.db", f->dir, i);
        make_store(path, 10, NULL);
        rewrite_row(path, 10, last[i].text);
        if (last[i].reason)
            verify_expect(path, false, 10, last[i].reason, 9);
        else
            verify_expect(path, true, 0, NULL, 10);
    }
}

/* ---------------------------------------------------------------- checkpoints */

struct signer {
    pthread_mutex_t m;
    int calls;
    bool fail;
};

static char *test_sign(void *arg, int64_t seq, const uint8_t hash[32]) {
    struct signer *sg = arg;
    pthread_mutex_lock(&sg->m);
    sg->calls++;
    bool fail = sg->fail;
    pthread_mutex_unlock(&sg->m);
    if (fail) return NULL;
    char hex[65], *out = NULL;
    pep_hex(hash, 32, hex);
    if (asprintf(&out, "jwt.%lld.%s", (long long)seq, hex) < 0) return NULL;
    return out;
}

/* Asserts the checkpoint rows are exactly seqs[], each with its row's hash and JWT. */
static void expect_checkpoints(const char *path, const int64_t *seqs, size_t n) {
    sqlite3 *db = raw_open(path);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT c.seq, c.hash, c.jwt, a.hash FROM checkpoints c"
                                        " LEFT JOIN audit a ON a.seq = c.seq ORDER BY c.seq",
                                        -1, &st, NULL),
                     SQLITE_OK);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        assert_int_equal(sqlite3_column_int64(st, 0), seqs[i]);
        assert_int_equal(sqlite3_column_bytes(st, 1), 32);
        assert_int_equal(sqlite3_column_bytes(st, 3), 32);
        assert_memory_equal(sqlite3_column_blob(st, 1), sqlite3_column_blob(st, 3), 32);
        char hex[65], want[128];
        pep_hex(sqlite3_column_blob(st, 1), 32, hex);
        snprintf(want, sizeof(want), "jwt.%lld.%s", (long long)seqs[i], hex);
        assert_string_equal((const char *)sqlite3_column_text(st, 2), want);
    }
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

static void test_checkpoints(void **state) {
    struct fixture *f = *state;
    struct signer sg = {.m = PTHREAD_MUTEX_INITIALIZER};
    struct audit_options opt = {.durability_full = true,
                                .checkpoint_every = 4,
                                .checkpoint_sign = test_sign,
                                .checkpoint_arg = &sg};
    struct audit_store *s = open_store(f->db, &opt);
    write_records(s, "a", 5);
    write_records(s, "b", 5);
    audit_close(s);
    /* every 4th seq, plus the head at close */
    static const int64_t want1[] = {4, 8, 10};
    expect_checkpoints(f->db, want1, 3);
    assert_int_equal(sg.calls, 3);

    sqlite3 *db = NULL;
    int64_t seq = 0;
    uint8_t h[32], h10[32];
    char *jwt = NULL;
    assert_int_equal(audit_open_reader(f->db, &db, NULL), 0);
    assert_int_equal(audit_latest_checkpoint(db, &seq, h, &jwt), 0);
    assert_int_equal(seq, 10);
    query_hash(db, "SELECT hash FROM audit WHERE seq = 10", h10);
    assert_memory_equal(h, h10, 32);
    assert_int_equal(strncmp(jwt, "jwt.10.", 7), 0);
    free(jwt);
    sqlite3_close(db);

    /* reopening without writing adds no checkpoint: the head already has one */
    s = open_store(f->db, &opt);
    audit_close(s);
    expect_checkpoints(f->db, want1, 3);
    assert_int_equal(sg.calls, 3);

    /* a failing signer skips the checkpoint, the records still commit */
    sg.fail = true;
    s = open_store(f->db, &opt);
    write_records(s, "c", 3);
    audit_close(s);
    expect_checkpoints(f->db, want1, 3);
    verify_expect(f->db, true, 0, NULL, 13);

    /* an empty store gets no checkpoint */
    char path[160];
    snprintf(path, sizeof(path), "%s/empty.db", f->dir);
    sg.fail = false;
    s = open_store(path, &opt);
    audit_close(s);
    assert_int_equal(audit_open_reader(path, &db, NULL), 0);
    assert_int_equal(audit_latest_checkpoint(db, &seq, h, NULL), PEP_ENOTFOUND);
    sqlite3_close(db);
}

static void test_truncated_tail(void **state) {
    struct fixture *f = *state;
    struct signer sg = {.m = PTHREAD_MUTEX_INITIALIZER};
    struct audit_options opt = {.durability_full = true,
                                .checkpoint_every = 5,
                                .checkpoint_sign = test_sign,
                                .checkpoint_arg = &sg};
    make_store(f->db, 10, &opt);
    verify_expect(f->db, true, 0, NULL, 10);
    tamper(f->db, "DELETE FROM audit WHERE seq > 7");
    verify_expect(f->db, false, 8, "truncated: checkpoint at seq 10", 7);

    /* pep keeps appending over the cut (SPEC 8); the new row 10 differs from the
     * checkpoint taken at 10, so the break stays provable */
    struct audit_store *s = open_store(f->db, &opt);
    assert_int_equal(audit_head_seq(s), 7);
    write_records(s, "x", 5);
    audit_close(s);
    verify_expect(f->db, false, 10, "hash differs from the checkpoint at seq 10", 9);
}

/* ---------------------------------------------------------------- signed checkpoints */

#define CHECKPOINT_IAT 1767225600 /* 2026-01-01T00:00:00Z */

static char *keyring_sign(void *arg, int64_t seq, const uint8_t hash[32]) {
    return keys_sign_checkpoint(arg, seq, hash, CHECKPOINT_IAT);
}

/* Walks path with checkpoint JWTs checked against k (NULL: not checked) and asserts the
 * outcome, as verify_expect does. */
static void verify_signed_expect(const char *path, struct keyring *k, bool ok, int64_t first_bad,
                                 const char *reason, int64_t head) {
    struct audit_verify_result res;
    struct pep_err err = {0};
    assert_int_equal(
        audit_verify_file_checked(path, k ? token_check_checkpoint : NULL, k, &res, &err), 0);
    if (res.ok != ok || res.first_bad_seq != first_bad)
        fail_msg("verify: ok=%d first_bad=%lld reason=%s", res.ok, (long long)res.first_bad_seq,
                 res.reason);
    assert_string_equal(res.reason, reason ? reason : "");
    assert_int_equal(res.head_seq, head);
    assert_int_equal(res.signatures_checked, k != NULL);
}

/* The JWT stored for the checkpoint at seq (caller frees). */
static char *checkpoint_jwt(const char *path, int64_t seq) {
    sqlite3 *db = raw_open(path);
    sqlite3_stmt *st = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT jwt FROM checkpoints WHERE seq = ?1", -1, &st, NULL),
        SQLITE_OK);
    sqlite3_bind_int64(st, 1, seq);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    char *jwt = strdup((const char *)sqlite3_column_text(st, 0));
    assert_non_null(jwt);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return jwt;
}

/* Replaces the JWT of the checkpoint at seq, as someone holding the file can. */
static void set_checkpoint_jwt(const char *path, int64_t seq, const char *jwt) {
    sqlite3 *db = raw_open(path);
    sqlite3_stmt *st = NULL;
    sqlite3_exec(db, "DROP TRIGGER IF EXISTS checkpoints_no_update", NULL, NULL, NULL);
    assert_int_equal(
        sqlite3_prepare_v2(db, "UPDATE checkpoints SET jwt = ?1 WHERE seq = ?2", -1, &st, NULL),
        SQLITE_OK);
    sqlite3_bind_text(st, 1, jwt, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, seq);
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    assert_int_equal(sqlite3_changes(db), 1);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* A JWT whose middle part is replaced by base64url(payload), keeping header and signature. */
static char *jwt_with_payload(const char *jwt, const char *payload) {
    const char *dot1 = strchr(jwt, '.');
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    assert_non_null(dot2);
    char *body = pep_base64url_encode((const uint8_t *)payload, strlen(payload));
    assert_non_null(body);
    char *out = NULL;
    assert_true(asprintf(&out, "%.*s.%s%s", (int)(dot1 - jwt), jwt, body, dot2) > 0);
    free(body);
    return out;
}

/* Flips one character in the middle of the signature (not the last one, whose low bits are
 * padding that decodes to the same bytes). */
static void jwt_flip_signature(char *jwt) {
    size_t n = strlen(jwt);
    assert_true(n > 20);
    jwt[n - 10] = jwt[n - 10] == 'A' ? 'B' : 'A';
}

static void test_checkpoint_signatures(void **state) {
    struct fixture *f = *state;
    struct pep_err err = {0};
    struct keyring *k = NULL, *other = NULL, *offline = NULL;
    char other_dir[160], keys_dir[160], path[160];
    snprintf(other_dir, sizeof(other_dir), "%s/other", f->dir);
    snprintf(keys_dir, sizeof(keys_dir), "%s/keys", f->dir);
    if (keys_load_or_create(f->dir, &k, &err) != 0 ||
        keys_load_or_create(other_dir, &other, &err) != 0)
        fail_msg("keys: %s", err.msg);
    struct audit_options opt = {.durability_full = true,
                                .checkpoint_every = 4,
                                .checkpoint_sign = keyring_sign,
                                .checkpoint_arg = k};

    /* A valid store verifies with its signatures checked: checkpoints 4, 8 and 10. */
    make_store(f->db, 10, &opt);
    struct audit_verify_result res;
    assert_int_equal(audit_verify_file_checked(f->db, token_check_checkpoint, k, &res, &err), 0);
    assert_true(res.ok);
    assert_true(res.signatures_checked);
    assert_int_equal(res.checkpoints, 3);
    assert_int_equal(res.records, 10);
    verify_signed_expect(f->db, NULL, true, 0, NULL, 10);

    /* The keyring pepctl reads offline (no creation, no mode repair) verifies as well. */
    char key_file[256];
    snprintf(key_file, sizeof(key_file), "%s/%s.pem", keys_dir, keys_active_kid(k));
    assert_int_equal(chmod(key_file, 0640), 0);
    assert_int_equal(keys_load_readonly(keys_dir, &offline, &err), 0);
    assert_string_equal(keys_active_kid(offline), keys_active_kid(k));
    struct stat st;
    assert_int_equal(stat(key_file, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    verify_signed_expect(f->db, offline, true, 0, NULL, 10);
    keys_free(offline);
    char empty_dir[160];
    snprintf(empty_dir, sizeof(empty_dir), "%s/empty", f->dir);
    assert_int_equal(mkdir(empty_dir, 0700), 0);
    assert_int_equal(keys_load_readonly(empty_dir, &offline, &err), PEP_ENOTFOUND);
    assert_null(offline);
    snprintf(empty_dir, sizeof(empty_dir), "%s/absent", f->dir);
    assert_int_equal(keys_load_readonly(empty_dir, &offline, &err), PEP_EIO);

    /* The reviewer's forgery: record 6 edited, the chain re-hashed to the head, the hash
     * column of checkpoints 8 and 10 rewritten, their JWTs untouched.  Without signatures
     * it passes; the JWT of checkpoint 8 still holds the old hash. */
    snprintf(path, sizeof(path), "%s/forged.db", f->dir);
    make_store(path, 10, &opt);
    forge_rehashed(path, 6);
    verify_signed_expect(path, NULL, true, 0, NULL, 10);
    verify_signed_expect(path, k, false, 8, "checkpoint at seq 8: jwt hash differs", 7);

    /* Forged further: the JWT's claims rewritten to the new hash, the signature kept. */
    snprintf(path, sizeof(path), "%s/forged-claims.db", f->dir);
    make_store(path, 10, &opt);
    forge_rehashed(path, 6);
    {
        sqlite3 *db = raw_open(path);
        uint8_t h8[32];
        char hex[65], claims[160];
        query_hash(db, "SELECT hash FROM audit WHERE seq = 8", h8);
        sqlite3_close(db);
        pep_hex(h8, 32, hex);
        snprintf(claims, sizeof(claims), "{\"hash\":\"%s\",\"iat\":%d,\"seq\":8}", hex,
                 CHECKPOINT_IAT);
        char *old = checkpoint_jwt(path, 8);
        char *jwt = jwt_with_payload(old, claims);
        set_checkpoint_jwt(path, 8, jwt);
        free(old);
        free(jwt);
    }
    verify_signed_expect(path, k, false, 8, "checkpoint at seq 8: signature invalid", 7);

    /* One JWT at a time: each case starts from a fresh valid store. */
    uint8_t h4[32];
    {
        sqlite3 *db = raw_open(f->db);
        query_hash(db, "SELECT hash FROM audit WHERE seq = 4", h4);
        sqlite3_close(db);
    }
    char *jwt4 = checkpoint_jwt(f->db, 4);
    char *flipped = strdup(jwt4);
    assert_non_null(flipped);
    jwt_flip_signature(flipped);
    char *foreign = keys_sign_checkpoint(other, 4, h4, CHECKPOINT_IAT);
    assert_non_null(foreign);
    char hex4[65], *seq_string = NULL, *alg_none = NULL;
    pep_hex(h4, 32, hex4);
    json_t *claims = json_pack("{s:s, s:s, s:i}", "seq", "4", "hash", hex4, "iat", CHECKPOINT_IAT);
    assert_int_equal(keys_sign_claims(k, claims, &seq_string, &err), 0);
    json_decref(claims);
    {
        char *none_head = pep_base64url_encode((const uint8_t *)"{\"alg\":\"none\"}", 14);
        const char *dot1 = strchr(jwt4, '.'), *dot2 = strchr(dot1 + 1, '.');
        assert_true(asprintf(&alg_none, "%s%.*s.", none_head, (int)(dot2 - dot1), dot1) > 0);
        free(none_head);
    }
    static const char *const names[] = {"flipped", "foreign", "seq8", "seq-string", "none", "junk"};
    const char *const jwts[] = {flipped, foreign, jwt4, seq_string, alg_none, "not.a.jwt"};
    const int64_t at[] = {4, 4, 8, 4, 4, 10};
    const char *const reasons[] = {
        "checkpoint at seq 4: signature invalid",
        "checkpoint at seq 4: signed by an unknown key",
        "checkpoint at seq 8: jwt seq differs",
        "checkpoint at seq 4: jwt seq differs",
        "checkpoint at seq 4: algorithm is not ES256",
        "checkpoint at seq 10: malformed jwt",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(names); i++) {
        snprintf(path, sizeof(path), "%s/%s.db", f->dir, names[i]);
        make_store(path, 10, &opt);
        set_checkpoint_jwt(path, at[i], jwts[i]);
        verify_signed_expect(path, NULL, true, 0, NULL, 10);
        verify_signed_expect(path, k, false, at[i], reasons[i], at[i] - 1);
    }
    free(jwt4);
    free(flipped);
    free(foreign);
    free(seq_string);
    free(alg_none);

    /* A cut tail is still caught with signatures checked (the checkpoint has no row). */
    snprintf(path, sizeof(path), "%s/cut.db", f->dir);
    make_store(path, 10, &opt);
    tamper(path, "DELETE FROM audit WHERE seq > 9");
    verify_signed_expect(path, k, false, 10, "truncated: checkpoint at seq 10", 9);
    keys_free(other);
    keys_free(k);
}

static void test_broken_store_keeps_appending(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 10, NULL);
    tamper(f->db, "UPDATE audit SET record = replace(record, 'allow', 'deny!') WHERE seq = 4");
    struct audit_store *s = open_store(f->db, NULL);
    write_records(s, "more", 2);
    assert_int_equal(audit_head_seq(s), 12);
    audit_close(s);
    verify_expect(f->db, false, 4, "hash mismatch", 3);
    /* the appended rows link to the real last row */
    sqlite3 *db = raw_open(f->db);
    uint8_t h10[32], p11[32];
    query_hash(db, "SELECT hash FROM audit WHERE seq = 10", h10);
    query_hash(db, "SELECT prev_hash FROM audit WHERE seq = 11", p11);
    assert_memory_equal(h10, p11, 32);
    sqlite3_close(db);
}

/* ---------------------------------------------------------------- apply, faults, close */

#define KV_SCHEMA "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY);"

/* An apply: inserts its key into kv, then returns `result`. */
struct kv_apply {
    const char *key;
    int result;
};

static int kv_apply_fn(sqlite3 *db, void *arg) {
    struct kv_apply *a = arg;
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    if (sqlite3_prepare_v2(db, "INSERT INTO kv (k) VALUES (?1)", -1, &st, NULL) != SQLITE_OK)
        goto out;
    sqlite3_bind_text(st, 1, a->key, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) goto out;
    rc = a->result;
out:
    sqlite3_finalize(st);
    return rc;
}

static bool row_exists(sqlite3 *db, const char *sql, const char *key) {
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    assert_true(rc == SQLITE_ROW || rc == SQLITE_DONE);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW;
}

static bool kv_has(sqlite3 *db, const char *key) {
    return row_exists(db, "SELECT 1 FROM kv WHERE k = ?1", key);
}

static bool audit_has(sqlite3 *db, const char *request_id) {
    return row_exists(db, "SELECT 1 FROM audit WHERE request_id = ?1", request_id);
}

/* Parks the writer on a gate item; returns once it is parked (its batch committed). */
static void park_writer(struct audit_store *s, struct gate *g, int64_t want_seq) {
    gate_init(g);
    assert_int_equal(audit_submit(s, make_record("gate", 0), NULL, NULL, gate_done, g), 0);
    gate_wait_entered(g);
    assert_int_equal(g->rc, 0);
    assert_int_equal(g->seq, want_seq);
}

static void test_apply_same_transaction(void **state) {
    struct fixture *f = *state;
    struct audit_options opt = {.durability_full = true, .schema_extra = KV_SCHEMA};
    struct audit_store *s = open_store(f->db, &opt);
    struct gate g;
    park_writer(s, &g, 1);

    /* queued while the writer is parked: one batch */
    struct kv_apply applies[] = {
        {"a", 0}, {"b", PEP_EDENIED}, {"c", 0}, {NULL, 0}, {"e", 7},
    };
    static const char *const ids[] = {"a", "b", "c", "d", "e"};
    struct tracker *t = tracker_new(5);
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(audit_submit(s, make_record(ids[i], (int)i),
                                      applies[i].key ? kv_apply_fn : NULL, &applies[i],
                                      tracker_done, &t->slots[i]),
                         0);
    struct audit_stats st;
    audit_get_stats(s, &st);
    assert_int_equal(st.queued, 5);
    gate_open(&g);
    tracker_wait(t, 5);

    static const int want_rc[] = {0, PEP_EDENIED, 0, 0, PEP_EDB};
    static const int64_t want_seq[] = {2, 0, 3, 4, 0};
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(t->calls[i], 1);
        assert_int_equal(t->rc[i], want_rc[i]);
        assert_int_equal(t->seq[i], want_seq[i]);
    }
    /* done calls in queue order, failed ones with seq 0 */
    static const int64_t want_order[] = {2, 0, 3, 4, 0};
    assert_memory_equal(t->order, want_order, sizeof(want_order));
    audit_get_stats(s, &st);
    assert_int_equal(st.batches, 2);
    assert_int_equal(st.records_written, 4);
    assert_int_equal(st.failures, 2);
    assert_int_equal(st.head_seq, 4);
    tracker_free(t);
    audit_close(s);

    sqlite3 *db = raw_open(f->db);
    assert_true(kv_has(db, "a") && audit_has(db, "a"));
    assert_true(!kv_has(db, "b") && !audit_has(db, "b"));
    assert_true(kv_has(db, "c") && audit_has(db, "c"));
    assert_true(audit_has(db, "d"));
    assert_true(!kv_has(db, "e") && !audit_has(db, "e"));
    sqlite3_close(db);
    verify_expect(f->db, true, 0, NULL, 4);
}

static void test_invalid_records(void **state) {
    struct fixture *f = *state;
    struct audit_store *s = open_store(f->db, NULL);
    assert_int_equal(audit_submit(s, json_array(), NULL, NULL, NULL, NULL), PEP_EINVAL);
    assert_int_equal(audit_submit(s, NULL, NULL, NULL, NULL, NULL), PEP_EINVAL);

    struct kv_apply never = {"never", 0};
    struct tracker *t = tracker_new(3);
    json_t *real = make_record("real", 0);
    json_object_set_new(real, "latency", json_real(1.5));
    assert_int_equal(audit_submit(s, make_record("one", 0), NULL, NULL, tracker_done, &t->slots[0]),
                     0);
    /* no canonical form: fails alone and its apply never runs (kv does not even exist) */
    assert_int_equal(audit_submit(s, real, kv_apply_fn, &never, tracker_done, &t->slots[1]), 0);
    assert_int_equal(audit_submit(s, make_record("two", 0), NULL, NULL, tracker_done, &t->slots[2]),
                     0);
    tracker_wait(t, 3);
    assert_int_equal(t->rc[0], 0);
    assert_int_equal(t->seq[0], 1);
    assert_int_equal(t->rc[1], PEP_EINVAL);
    assert_int_equal(t->seq[1], 0);
    assert_int_equal(t->rc[2], 0);
    assert_int_equal(t->seq[2], 2);
    tracker_free(t);
    audit_close(s);
    verify_expect(f->db, true, 0, NULL, 2);
}

/* Injected I/O failure: the whole batch fails closed, nothing of it is written, the store
 * still verifies, and the next batch succeeds with the next seq. */
static void run_fault(const char *dir, enum audit_fault mode) {
    char path[160];
    snprintf(path, sizeof(path), "%s/fault%d.db", dir, (int)mode);
    assert_int_equal(audit_fault_install(), 0);
    audit_fault_set(AUDIT_FAULT_NONE);
    struct audit_options opt = {
        .durability_full = true, .schema_extra = KV_SCHEMA, .vfs = AUDIT_FAULT_VFS};
    struct audit_store *s = open_store(path, &opt);
    write_records(s, "before", 2);
    struct gate g;
    park_writer(s, &g, 3);

    enum { N = 5 };
    struct kv_apply applies[N];
    char keys[N][16];
    struct tracker *t = tracker_new(N);
    for (int i = 0; i < N; i++) {
        snprintf(keys[i], sizeof(keys[i]), "f%d", i);
        applies[i] = (struct kv_apply){keys[i], 0};
        assert_int_equal(audit_submit(s, make_record(keys[i], i), kv_apply_fn, &applies[i],
                                      tracker_done, &t->slots[i]),
                         0);
    }
    audit_fault_set(mode);
    gate_open(&g);
    tracker_wait(t, N);
    audit_fault_set(AUDIT_FAULT_NONE);
    for (int i = 0; i < N; i++) {
        assert_int_equal(t->calls[i], 1);
        assert_true(t->rc[i] < 0);
        assert_int_equal(t->rc[i], PEP_EDB);
        assert_int_equal(t->seq[i], 0);
    }
    tracker_free(t);
    struct audit_stats st;
    audit_get_stats(s, &st);
    assert_int_equal(st.failures, N);
    assert_int_equal(st.head_seq, 3);
    verify_expect(path, true, 0, NULL, 3);

    /* the store is not dead: the next batch takes seq 4, 5 */
    t = tracker_new(2);
    struct kv_apply ok = {"after", 0};
    assert_int_equal(
        audit_submit(s, make_record("after", 0), kv_apply_fn, &ok, tracker_done, &t->slots[0]), 0);
    assert_int_equal(
        audit_submit(s, make_record("after2", 0), NULL, NULL, tracker_done, &t->slots[1]), 0);
    tracker_wait(t, 2);
    assert_int_equal(t->rc[0], 0);
    assert_int_equal(t->seq[0], 4);
    assert_int_equal(t->rc[1], 0);
    assert_int_equal(t->seq[1], 5);
    tracker_free(t);
    audit_close(s);

    verify_expect(path, true, 0, NULL, 5);
    sqlite3 *db = raw_open(path);
    for (int i = 0; i < N; i++) {
        assert_false(kv_has(db, keys[i]));
        assert_false(audit_has(db, keys[i]));
    }
    assert_true(kv_has(db, "after") && audit_has(db, "after"));
    assert_int_equal(query_int(db, "SELECT COUNT(*) FROM audit"), 5);
    sqlite3_close(db);
}

static void test_fault_write(void **state) {
    run_fault(((struct fixture *)*state)->dir, AUDIT_FAULT_WRITE);
}

static void test_fault_fsync(void **state) {
    run_fault(((struct fixture *)*state)->dir, AUDIT_FAULT_FSYNC);
}

static void test_fault_full(void **state) {
    run_fault(((struct fixture *)*state)->dir, AUDIT_FAULT_FULL);
}

/* Submits one record while every fsync fails; returns the record's result code. */
static int submit_while_fsync_fails(struct audit_store *s, const char *request_id) {
    struct tracker *t = tracker_new(1);
    audit_fault_set(AUDIT_FAULT_FSYNC);
    assert_int_equal(
        audit_submit(s, make_record(request_id, 0), NULL, NULL, tracker_done, &t->slots[0]), 0);
    tracker_wait(t, 1);
    audit_fault_set(AUDIT_FAULT_NONE);
    int rc = t->rc[0];
    tracker_free(t);
    return rc;
}

/* A reload's durability applies from the next batch (audit_retune).  Observed through the
 * commit's fsync: with `full` a failing fsync refuses the record; with `normal` a WAL commit
 * does not sync, so the same fault leaves it written; back to `full`, refused again. */
static void test_retune_durability(void **state) {
    struct fixture *f = *state;
    char path[160];
    snprintf(path, sizeof(path), "%s/retune.db", f->dir);
    assert_int_equal(audit_fault_install(), 0);
    audit_fault_set(AUDIT_FAULT_NONE);
    struct audit_options opt = {.durability_full = true, .vfs = AUDIT_FAULT_VFS};
    struct audit_store *s = open_store(path, &opt);
    write_records(s, "before", 1);

    assert_int_equal(submit_while_fsync_fails(s, "full"), PEP_EDB);
    audit_retune(s, false, opt.checkpoint_every);
    assert_int_equal(submit_while_fsync_fails(s, "normal"), 0);
    audit_retune(s, true, opt.checkpoint_every);
    assert_int_equal(submit_while_fsync_fails(s, "full-again"), PEP_EDB);
    write_records(s, "after", 1);
    audit_close(s);

    verify_expect(path, true, 0, NULL, 3);
    sqlite3 *db = raw_open(path);
    assert_true(audit_has(db, "normal"));
    assert_false(audit_has(db, "full") || audit_has(db, "full-again"));
    sqlite3_close(db);
}

static void test_close_drains(void **state) {
    struct fixture *f = *state;
    enum { N = 500 };
    struct audit_options opt = {.durability_full = false, .max_batch = 16};
    struct audit_store *s = open_store(f->db, &opt);
    struct tracker *t = tracker_new(N);
    for (int i = 0; i < N; i++) {
        char id[16];
        snprintf(id, sizeof(id), "d%d", i);
        assert_int_equal(
            audit_submit(s, make_record(id, i), NULL, NULL, tracker_done, &t->slots[i]), 0);
    }
    audit_shutdown(s);
    /* no wait: shutdown itself returns after every callback ran */
    assert_int_equal(t->called, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(t->calls[i], 1);
        assert_int_equal(t->rc[i], 0);
        assert_int_equal(t->seq[i], i + 1);
    }
    assert_int_equal(
        audit_submit(s, make_record("late", 0), NULL, NULL, tracker_done, &t->slots[0]),
        PEP_EUNAVAILABLE);
    assert_int_equal(audit_head_seq(s), N);
    audit_shutdown(s); /* idempotent */
    audit_close(s);
    assert_int_equal(t->calls[0], 1);
    tracker_free(t);
    verify_expect(f->db, true, 0, NULL, N);
}

static void test_queue_bound(void **state) {
    struct fixture *f = *state;
    struct audit_options opt = {.max_queue = 2};
    struct audit_store *s = open_store(f->db, &opt);
    struct gate g;
    park_writer(s, &g, 1);
    struct tracker *t = tracker_new(3);
    assert_int_equal(audit_submit(s, make_record("q0", 0), NULL, NULL, tracker_done, &t->slots[0]),
                     0);
    assert_int_equal(audit_submit(s, make_record("q1", 0), NULL, NULL, tracker_done, &t->slots[1]),
                     0);
    assert_int_equal(audit_submit(s, make_record("q2", 0), NULL, NULL, tracker_done, &t->slots[2]),
                     PEP_EUNAVAILABLE);
    gate_open(&g);
    tracker_wait(t, 2);
    audit_close(s);
    assert_int_equal(t->called, 2);
    assert_int_equal(t->calls[2], 0);
    assert_int_equal(t->seq[0], 2);
    assert_int_equal(t->seq[1], 3);
    tracker_free(t);
}

/* Readers see committed rows while the writer runs (WAL), and verify concurrently. */
static void test_reader_while_writing(void **state) {
    struct fixture *f = *state;
    struct audit_store *s = open_store(f->db, NULL);
    write_records(s, "w", 20);
    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(f->db, &db, NULL), 0);
    assert_int_equal(query_int(db, "SELECT COUNT(*) FROM audit"), 20);
    struct audit_verify_result res;
    assert_int_equal(audit_verify_db(db, &res), 0);
    assert_true(res.ok);
    assert_int_equal(res.records, 20);
    assert_int_equal(res.head_seq, 20);
    uint8_t h[32];
    query_hash(db, "SELECT hash FROM audit WHERE seq = 20", h);
    assert_memory_equal(res.head_hash, h, 32);
    /* read-only: writes are refused on a reader */
    assert_int_not_equal(sqlite3_exec(db, "CREATE TABLE x (a)", NULL, NULL, NULL), SQLITE_OK);
    write_records(s, "w2", 5);
    assert_int_equal(query_int(db, "SELECT COUNT(*) FROM audit"), 25);
    sqlite3_close(db);
    audit_close(s);
}

static void test_verify_errors(void **state) {
    struct fixture *f = *state;
    struct audit_verify_result res;
    struct pep_err err = {0};
    char path[160];
    snprintf(path, sizeof(path), "%s/absent.db", f->dir);
    assert_true(audit_verify_file(path, &res, &err) < 0);
    assert_false(res.ok);

    /* a SQLite file without the audit schema */
    snprintf(path, sizeof(path), "%s/other.db", f->dir);
    sqlite3 *db = raw_open(path);
    assert_int_equal(sqlite3_exec(db, "CREATE TABLE t (a)", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(audit_verify_file(path, &res, &err), PEP_EINVAL);
    assert_int_equal(err.code, PEP_EINVAL);

    /* not a database at all */
    snprintf(path, sizeof(path), "%s/junk.db", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("this is not a database, not even close to one; just some text.", fp);
    fclose(fp);
    assert_true(audit_verify_file(path, &res, &err) < 0);

    /* an empty store verifies, head 0 */
    snprintf(path, sizeof(path), "%s/empty.db", f->dir);
    struct audit_store *s = open_store(path, NULL);
    audit_close(s);
    verify_expect(path, true, 0, NULL, 0);

    /* audit_open fails cleanly on a bad schema_extra */
    struct audit_options opt = {.schema_extra = "CREATE TABLE ("};
    s = NULL;
    snprintf(path, sizeof(path), "%s/bad.db", f->dir);
    assert_int_equal(audit_open(path, &opt, &s, &err), PEP_EDB);
    assert_null(s);
    assert_non_null(strstr(err.msg, "schema_extra"));
}

/* ---------------------------------------------------------------- chunked walks */

/* The walk of one snapshot: inside a transaction the caller holds, in one pass. */
static void verify_one_snapshot(const char *path, struct audit_verify_result *res) {
    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(path, &db, NULL), 0);
    assert_int_equal(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(audit_verify_db(db, res), 0);
    assert_int_equal(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
}

static void expect_same_result(const struct audit_verify_result *got,
                               const struct audit_verify_result *want, const char *what) {
    if (got->ok != want->ok || got->records != want->records || got->head_seq != want->head_seq ||
        got->first_bad_seq != want->first_bad_seq || got->checkpoints != want->checkpoints ||
        strcmp(got->reason, want->reason) != 0 || memcmp(got->head_hash, want->head_hash, 32) != 0)
        fail_msg("%s: ok=%d records=%lld head=%lld bad=%lld cps=%lld '%s', one snapshot: ok=%d "
                 "records=%lld head=%lld bad=%lld cps=%lld '%s'",
                 what, got->ok, (long long)got->records, (long long)got->head_seq,
                 (long long)got->first_bad_seq, (long long)got->checkpoints, got->reason, want->ok,
                 (long long)want->records, (long long)want->head_seq,
                 (long long)want->first_bad_seq, (long long)want->checkpoints, want->reason);
}

/* Read transactions of any size add up to the one-snapshot walk, whatever the chain holds,
 * and wherever a chunk boundary falls relative to the break or to a checkpoint. */
static void test_verify_chunks_match_one_snapshot(void **state) {
    struct fixture *f = *state;
    struct signer sg = {.m = PTHREAD_MUTEX_INITIALIZER};
    struct audit_options opt = {.durability_full = false,
                                .checkpoint_every = 4,
                                .checkpoint_sign = test_sign,
                                .checkpoint_arg = &sg};
    static const struct {
        const char *sql; /* NULL: the store as written */
        int64_t first_bad;
    } cases[] = {
        {NULL, 0},
        {"UPDATE audit SET hash = x'00' WHERE seq = 13", 13},
        {"DELETE FROM audit WHERE seq = 17", 17},
        {"DELETE FROM audit WHERE seq = 1", 1},
        {"DELETE FROM audit WHERE seq > 30", 31}, /* truncated: checkpoint at 32 … 40 */
        {"DROP TRIGGER checkpoints_no_update;"
         "UPDATE checkpoints SET hash = zeroblob(32) WHERE seq = 20",
         20},
        {"INSERT INTO audit (seq, record, prev_hash, hash) VALUES (0, '{}', x'', x'')", 1},
        {"INSERT INTO checkpoints VALUES (0, zeroblob(32), 'j', 'now')", 0},
        {"INSERT INTO checkpoints VALUES (50, zeroblob(32), 'j', 'now')", 41},
    };
    static const int64_t chunk_rows[] = {1, 2, 3, 4, 5, 7, 39, 40, 41, 1000};
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        char path[160], what[96];
        snprintf(path, sizeof(path), "%s/chunks%zu.db", f->dir, i);
        make_store(path, 40, &opt);
        if (cases[i].sql) tamper(path, cases[i].sql);
        struct audit_verify_result want, got;
        verify_one_snapshot(path, &want);
        if (want.first_bad_seq != cases[i].first_bad)
            fail_msg("case %zu: first_bad %lld (%s)", i, (long long)want.first_bad_seq,
                     want.reason);
        for (size_t c = 0; c < PEP_ARRAY_LEN(chunk_rows); c++) {
            struct audit_verify_options o = {.chunk_rows = chunk_rows[c]};
            snprintf(what, sizeof(what), "case %zu, %lld rows per transaction", i,
                     (long long)chunk_rows[c]);
            assert_int_equal(audit_verify_file_opts(path, &o, &got, NULL), 0);
            expect_same_result(&got, &want, what);
        }
        /* A time budget too short for two rows: one row per transaction. */
        struct audit_verify_options o = {.chunk_us = 1};
        snprintf(what, sizeof(what), "case %zu, 1 us per transaction", i);
        assert_int_equal(audit_verify_file_opts(path, &o, &got, NULL), 0);
        expect_same_result(&got, &want, what);
        /* The default walk (pepctl --db, the startup check) too. */
        snprintf(what, sizeof(what), "case %zu, audit_verify_file", i);
        assert_int_equal(audit_verify_file(path, &got, NULL), 0);
        expect_same_result(&got, &want, what);
    }
}

/* What the pause callback of test_verify_between_chunks sees and does. */
struct chunk_probe {
    sqlite3 *reader;           /* the walk's connection */
    const char *path;          /* the store */
    struct audit_store *store; /* its writer, appending while the walk runs */
    int pauses;
    int stop_at;         /* > 0: the pause of that number cancels the walk */
    const char *tamper;  /* run at the first pause (triggers dropped first) */
    bool snapshot_free;  /* every pause: outside a transaction, WAL checkpointable */
    int checkpoint_busy; /* the last probe checkpoint's busy column */
};

/* A TRUNCATE checkpoint from another connection, without waiting: it completes (busy 0)
 * only when no reader holds a snapshot in the WAL.  Returns its busy column. */
static int probe_checkpoint(const char *path) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA wal_checkpoint(TRUNCATE)", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int busy = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return busy;
}

static bool probe_pause(void *arg) {
    struct chunk_probe *p = arg;
    p->pauses++;
    if (!sqlite3_get_autocommit(p->reader)) p->snapshot_free = false;
    if (p->store) write_records(p->store, "during", 3);
    p->checkpoint_busy = probe_checkpoint(p->path);
    if (p->checkpoint_busy != 0) p->snapshot_free = false;
    if (p->tamper && p->pauses == 1) tamper(p->path, p->tamper);
    return p->stop_at == 0 || p->pauses < p->stop_at;
}

/* Between two read transactions the walk holds no snapshot: the writer's WAL can be
 * checkpointed completely and truncated.  Records appended meanwhile (checkpoints past the
 * head included) are not walked: the answer is the chain as it stood when the walk began. */
static void test_verify_between_chunks(void **state) {
    struct fixture *f = *state;
    struct signer sg = {.m = PTHREAD_MUTEX_INITIALIZER};
    struct audit_options opt = {.durability_full = false,
                                .checkpoint_every = 4,
                                .checkpoint_sign = test_sign,
                                .checkpoint_arg = &sg};
    struct audit_store *s = open_store(f->db, &opt);
    write_records(s, "r", 30);
    struct chunk_probe probe = {.path = f->db, .store = s, .snapshot_free = true};
    assert_int_equal(audit_open_reader(f->db, &probe.reader, NULL), 0);

    /* The probe sees a snapshot when one is held. */
    assert_int_equal(
        sqlite3_exec(probe.reader, "BEGIN; SELECT count(*) FROM audit;", NULL, NULL, NULL),
        SQLITE_OK);
    write_records(s, "held", 1);
    assert_int_equal(probe_checkpoint(f->db), 1);
    assert_int_equal(sqlite3_exec(probe.reader, "COMMIT", NULL, NULL, NULL), SQLITE_OK);

    struct audit_verify_options o = {.chunk_rows = 5, .pause = probe_pause, .pause_arg = &probe};
    struct audit_verify_result res;
    assert_int_equal(audit_verify_db_opts(probe.reader, &o, &res), 0);
    assert_true(res.ok);
    assert_int_equal(res.head_seq, 31);
    assert_int_equal(res.records, 31);
    assert_int_equal(res.checkpoints, 7); /* 4, 8 … 28: those written later are past the head */
    assert_true(probe.pauses >= 6);
    assert_true(probe.snapshot_free);
    assert_int_equal(audit_head_seq(s), 31 + 3 * probe.pauses);
    /* A walk in the caller's transaction has no pauses. */
    probe.pauses = 0;
    assert_int_equal(sqlite3_exec(probe.reader, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(audit_verify_db_opts(probe.reader, &o, &res), 0);
    assert_int_equal(sqlite3_exec(probe.reader, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    assert_true(res.ok);
    assert_int_equal(res.head_seq, audit_head_seq(s));
    assert_int_equal(probe.pauses, 0);
    sqlite3_close(probe.reader);
    audit_close(s);
}

/* A pause that says stop cancels the walk; rows deleted behind the head while a walk runs
 * are reported missing. */
static void test_verify_cancel_and_vanishing_rows(void **state) {
    struct fixture *f = *state;
    make_store(f->db, 20, NULL);
    struct chunk_probe probe = {.path = f->db, .stop_at = 2, .snapshot_free = true};
    assert_int_equal(audit_open_reader(f->db, &probe.reader, NULL), 0);
    struct audit_verify_options o = {.chunk_rows = 5, .pause = probe_pause, .pause_arg = &probe};
    struct audit_verify_result res;
    assert_int_equal(audit_verify_db_opts(probe.reader, &o, &res), PEP_ECLOSED);
    assert_false(res.ok);
    assert_string_equal(res.reason, "cancelled");
    assert_int_equal(probe.pauses, 2);
    struct pep_err err = {0};
    probe.pauses = 0;
    assert_int_equal(audit_verify_file_opts(f->db, &o, &res, &err), PEP_ECLOSED);
    assert_int_equal(err.code, PEP_ECLOSED);

    probe = (struct chunk_probe){.reader = probe.reader,
                                 .path = f->db,
                                 .tamper = "DELETE FROM audit WHERE seq > 12",
                                 .snapshot_free = true};
    assert_int_equal(audit_verify_db_opts(probe.reader, &o, &res), 0);
    assert_false(res.ok);
    assert_int_equal(res.first_bad_seq, 13);
    assert_int_equal(res.head_seq, 12);
    assert_string_equal(res.reason, "missing row");
    assert_true(probe.snapshot_free);
    sqlite3_close(probe.reader);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical_json),
        cmocka_unit_test(test_canonical_depth),
        cmocka_unit_test(test_chain_hash),
        cmocka_unit_test_setup_teardown(test_concurrent_append, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_record_text_and_links, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_record_seq_placement, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_reopen_continues, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_db_file_mode, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_triggers_refuse, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_tamper_sql, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_tamper_rehashed, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_checkpoints, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_truncated_tail, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_signatures, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_broken_store_keeps_appending, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_apply_same_transaction, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_invalid_records, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_fault_write, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_fault_fsync, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_fault_full, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_retune_durability, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_close_drains, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_queue_bound, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_reader_while_writing, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_verify_errors, fixture_setup, fixture_teardown),
        cmocka_unit_test_setup_teardown(test_verify_chunks_match_one_snapshot, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_verify_between_chunks, fixture_setup,
                                        fixture_teardown),
        cmocka_unit_test_setup_teardown(test_verify_cancel_and_vanishing_rows, fixture_setup,
                                        fixture_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
