/*
 * test_audit_hold.c — SPEC 6.5 "while pep runs it never drops a record": records nobody
 * waits for (outcomes) are held through write failures and written, in order, once the
 * store accepts writes again; what is held is bounded (audit/store.c).
 */
#include "audit/audit.h"
#include "pep/util.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

struct waiter {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int rc;
    int64_t seq;
};

static void on_done(void *arg, int rc, int64_t seq) {
    struct waiter *w = arg;
    pthread_mutex_lock(&w->lock);
    w->done = true;
    w->rc = rc;
    w->seq = seq;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Submits a record with a waiter and waits for it; returns its rc (seq in *seq). */
static int submit_wait(struct audit_store *s, const char *name, int64_t *seq) {
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0, 0};
    int rc = audit_submit(s, json_pack("{s:s, s:s}", "kind", "decision", "request_id", name), NULL,
                          NULL, on_done, &w);
    if (rc != 0) return rc;
    pthread_mutex_lock(&w.lock);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    if (seq) *seq = w.seq;
    return w.rc;
}

static void submit_outcome(struct audit_store *s, const char *name) {
    assert_int_equal(audit_submit(s, json_pack("{s:s, s:s}", "kind", "outcome", "request_id", name),
                                  NULL, NULL, NULL, NULL),
                     0);
}

/* The request_id of every row, in seq order, space-separated. */
static char *rows(const char *path) {
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    assert_int_equal(audit_open_reader(path, &db, &err), 0);
    sqlite3_stmt *st = NULL;
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT request_id FROM audit ORDER BY seq", -1, &st, NULL),
        SQLITE_OK);
    char *out = calloc(1, 65536);
    while (sqlite3_step(st) == SQLITE_ROW) {
        strcat(out, (const char *)sqlite3_column_text(st, 0));
        strcat(out, " ");
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return out;
}

static void wait_written(struct audit_store *s, int64_t head) {
    for (int i = 0; i < 6000 && audit_head_seq(s) < head; i++) /* 60 s at most (ASan) */
        usleep(10000);
    assert_int_equal(audit_head_seq(s), head);
}

/* A store in a fresh directory dir (a mkdtemp template), opened through the fault VFS. */
static struct audit_store *open_faulty(char *dir, char path[64], bool durability_full) {
    assert_non_null(mkdtemp(dir));
    snprintf(path, 64, "%s/pep.db", dir);
    assert_int_equal(audit_fault_install(), 0);
    audit_fault_set(AUDIT_FAULT_NONE);
    struct audit_options opt = {
        .durability_full = durability_full, .vfs = AUDIT_FAULT_VFS, .linger_us = -1};
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    assert_int_equal(audit_open(path, &opt, &s, &err), 0);
    return s;
}

static void remove_dir(const char *dir) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static void test_outcomes_held_through_failures(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-hold-XXXXXX", path[64];
    struct audit_store *s = open_faulty(dir, path, true);
    struct pep_err err = {0};
    assert_int_equal(submit_wait(s, "d1", NULL), 0);

    /* The disk fails while two upstream calls end: their outcomes are held, and a decision
     * made meanwhile is refused (its waiter hears so), not held. */
    audit_fault_set(AUDIT_FAULT_FULL);
    submit_outcome(s, "o1");
    submit_outcome(s, "o2");
    assert_int_equal(submit_wait(s, "d-refused", NULL), PEP_EDB);
    struct audit_stats st;
    audit_get_stats(s, &st);
    assert_true(st.held >= 1); /* o2 may not have met the failure yet: it is queued behind */
    assert_true(st.failing);
    submit_outcome(s, "o3");

    /* The store heals: everything held is written, in order, before what follows. */
    audit_fault_set(AUDIT_FAULT_NONE);
    int64_t seq = 0;
    assert_int_equal(submit_wait(s, "d2", &seq), 0);
    assert_int_equal(seq, 5);
    wait_written(s, 5);
    char *got = rows(path);
    assert_string_equal(got, "d1 o1 o2 o3 d2 ");
    free(got);
    audit_get_stats(s, &st);
    assert_int_equal(st.held, 0);
    assert_false(st.failing);

    /* An outcome held when nothing else comes is retried on its own. */
    audit_fault_set(AUDIT_FAULT_WRITE);
    submit_outcome(s, "o4");
    usleep(200000);
    audit_fault_set(AUDIT_FAULT_NONE);
    wait_written(s, 6);

    struct audit_verify_result vr;
    audit_close(s);
    assert_int_equal(audit_verify_file(path, &vr, &err), 0);
    assert_true(vr.ok);
    assert_int_equal(vr.records, 6);
    remove_dir(dir);
}

/* Past AUDIT_MAX_HELD held records, what has a waiter is refused with PEP_EBACKLOG (a
 * request is then refused audit_unavailable), while outcomes are still kept. */
static void test_backlog_bound(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-hold-XXXXXX", path[64];
    struct audit_store *s = open_faulty(dir, path, false);
    audit_fault_set(AUDIT_FAULT_WRITE);
    for (int i = 0; i < AUDIT_MAX_HELD + 10; i++)
        submit_outcome(s, "o");
    assert_int_equal(submit_wait(s, "d", NULL), PEP_EBACKLOG);
    struct audit_stats st;
    for (int i = 0; i < 500; i++) { /* the writer has met the failure */
        audit_get_stats(s, &st);
        if (st.held > 0) break;
        usleep(10000);
    }
    assert_true(st.held > 0);
    audit_fault_set(AUDIT_FAULT_NONE);
    wait_written(s, AUDIT_MAX_HELD + 10);
    assert_int_equal(submit_wait(s, "d", NULL), 0);
    audit_close(s);
    remove_dir(dir);
}

/* Another process appended to the store (the one-pep lock bypassed): the write that finds
 * out fails, the writer reads the head again, and the next write links to the real head
 * instead of every write failing on "seq must be head+1" forever. */
static void test_head_read_again_after_a_failed_write(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-hold-XXXXXX", path[64];
    struct audit_store *s = open_faulty(dir, path, false);
    int64_t seq = 0;
    assert_int_equal(submit_wait(s, "d1", &seq), 0);
    assert_int_equal(seq, 1);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    assert_int_equal(sqlite3_exec(db,
                                  "INSERT INTO audit (seq, record, prev_hash, hash) VALUES "
                                  "(2, '{\"seq\":2}', zeroblob(32), zeroblob(32))",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(submit_wait(s, "d2", NULL), PEP_EDB);
    assert_int_equal(submit_wait(s, "d3", &seq), 0);
    assert_int_equal(seq, 3);
    audit_close(s);
    remove_dir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_outcomes_held_through_failures),
        cmocka_unit_test(test_backlog_bound),
        cmocka_unit_test(test_head_read_again_after_a_failed_write),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
