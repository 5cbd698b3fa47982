/*
 * scan.c — the cursor over the audit rows that match a filter, and a query page on top of
 * it (see query.h for how a filter is read and why that is bounded).
 *
 * A run of the cursor is a series of statement runs, each over a window of seqs
 * (`seq > after AND seq <= after + window`), each its own implicit read transaction that
 * ends when the statement is reset: nothing here keeps a snapshot open between two
 * statement runs, so a long export never holds back the writer's WAL checkpoints.  The
 * table is append-only, so successive snapshots agree on every seq up to the head the
 * cursor saw when it opened, which is as far as it reads.
 *
 * The window adapts to what a run costs: it doubles while runs end under
 * SCAN_FAST_RUN_US without filling their LIMIT (a sparse match through an index, or a
 * cheap scan) and halves when one takes over SCAN_SLOW_RUN_US, so that the time budget is
 * checked often enough and sparse matches still move quickly.  A run still slower than
 * SCAN_RUN_MAX_US (a wide window that met a dense stretch) is interrupted and read again in
 * windows an eighth the size, keeping what it handed out: no run blocks longer than that.
 *
 * Threads: the caller's; one cursor on one thread at a time.
 */
#include "audit/query.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCAN_FAST_RUN_US 2000
#define SCAN_SLOW_RUN_US 20000
#define SCAN_FIRST_WINDOW 4096
#define SCAN_RUN_MAX_US 100000 /* one statement run at most */

/* Runs a one-row, one-column integer statement; *out = its value (NULL reads 0).  st is
 * finalized.  SQLite's code. */
static int scan_one_int(sqlite3_stmt *st, int64_t *out) {
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *out = sqlite3_column_int64(st, 0);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Narrows the cursor to the seqs of f's time range: one index-only pass over the ts
 * index, at most AUDIT_TS_BOUND_MAX entries (past that, no bound is taken: the range is a
 * large part of the log anyway).  Exact: see query.h. */
static void scan_bound_by_time(struct audit_scan *sc, const struct audit_filter *f) {
    sqlite3_stmt *st = NULL;
    /* '' sorts before every ts and 'A' after (a ts starts with a digit). */
    if (sqlite3_prepare_v2(sc->db,
                           "SELECT count(*), MIN(seq), MAX(seq) FROM (SELECT seq FROM audit"
                           " INDEXED BY audit_ts WHERE ts >= ?1 AND ts < ?2 LIMIT ?3)",
                           -1, &st, NULL) != SQLITE_OK) {
        sqlite3_finalize(st); /* no ts index (not pep's schema): no bound, only slower */
        return;
    }
    sqlite3_bind_text(st, 1, f->since, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, f->until[0] ? f->until : "A", -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, AUDIT_TS_BOUND_MAX + 1);
    if (sqlite3_step(st) == SQLITE_ROW) {
        int64_t n = sqlite3_column_int64(st, 0);
        if (n == 0) {
            sc->after = sc->head; /* nothing in the range: done */
        } else if (n <= AUDIT_TS_BOUND_MAX) {
            int64_t lo = sqlite3_column_int64(st, 1), hi = sqlite3_column_int64(st, 2);
            if (sc->after < lo - 1) sc->after = lo - 1;
            if (sc->head > hi) sc->head = hi;
            if (sc->after > sc->head) sc->after = sc->head;
        }
    }
    sqlite3_finalize(st);
}

int audit_scan_open(struct audit_scan *sc, sqlite3 *db, const struct audit_filter *f,
                    enum audit_sql_columns cols, struct pep_err *err) {
    memset(sc, 0, sizeof *sc);
    sc->db = db;
    sc->window = SCAN_FIRST_WINDOW;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT MAX(seq) FROM audit", -1, &st, NULL) != SQLITE_OK) {
        sqlite3_finalize(st);
        return pep_err_set(err, PEP_EDB, "audit: not an audit store: %s", sqlite3_errmsg(db));
    }
    if (scan_one_int(st, &sc->head) != SQLITE_OK) /* finalizes st */
        return pep_err_set(err, PEP_EDB, "audit: cannot read the head: %s", sqlite3_errmsg(db));
    sc->after = f->after_seq < sc->head ? f->after_seq : sc->head;
    if ((f->since[0] || f->until[0]) && sc->after < sc->head) scan_bound_by_time(sc, f);
    audit_sql_build(f, cols, &sc->sql);
    if (sqlite3_prepare_v2(db, sc->sql.text, -1, &sc->st, NULL) != SQLITE_OK) {
        int rc =
            pep_err_set(err, PEP_EDB, "audit: cannot prepare the query: %s", sqlite3_errmsg(db));
        sqlite3_finalize(sc->st);
        sc->st = NULL;
        return rc;
    }
    return 0;
}

void audit_scan_close(struct audit_scan *sc) {
    sqlite3_finalize(sc->st);
    sc->st = NULL;
}

bool audit_scan_done(const struct audit_scan *sc) {
    return sc->after >= sc->head;
}

/* The progress handler of a window's statement run: past its deadline, interrupt it. */
static int scan_progress(void *arg) {
    return pep_mono_us() > *(const int64_t *)arg;
}

int audit_scan_next(struct audit_scan *sc, int64_t want, int64_t budget_us, audit_scan_row_fn row,
                    void *arg, int64_t *got, struct pep_err *err) {
    int64_t t0 = pep_mono_us();
    *got = 0;
    while (*got < want && sc->after < sc->head) {
        int64_t last = sc->head - sc->after <= sc->window ? sc->head : sc->after + sc->window;
        int64_t limit = want - *got, n = 0, t1 = pep_mono_us();
        /* A window that grew while matches were sparse may land on a dense stretch: its run
         * is cut at SCAN_RUN_MAX_US and retried smaller, so no run outlasts that. */
        int64_t deadline = t1 + SCAN_RUN_MAX_US;
        bool guard = sc->window > AUDIT_SCAN_WINDOW_MIN; /* the smallest runs to its end */
        if (guard) sqlite3_progress_handler(sc->db, 1000, scan_progress, &deadline);
        int src = audit_sql_bind(sc->st, &sc->sql, sc->after, last, limit);
        int stop = 0;
        while (src == SQLITE_OK && (src = sqlite3_step(sc->st)) == SQLITE_ROW) {
            src = SQLITE_OK;
            n++;
            (*got)++;
            sc->after = sqlite3_column_int64(sc->st, 0);
            if ((stop = row(arg, sc->st)) != 0) break;
        }
        if (guard) sqlite3_progress_handler(sc->db, 0, NULL, NULL);
        bool cut = stop == 0 && src == SQLITE_INTERRUPT;
        if (stop == 0 && !cut && src != SQLITE_DONE && src != SQLITE_OK) {
            int rc =
                pep_err_set(err, PEP_EDB, "audit: reading the log: %s", sqlite3_errmsg(sc->db));
            sqlite3_reset(sc->st);
            return rc;
        }
        /* The end of the statement run: its read transaction ends here. */
        sqlite3_reset(sc->st);
        if (stop < 0) return pep_err_set(err, stop, "audit: %s", pep_strerror(stop));
        if (stop > 0) return 0;
        if (cut) {
            /* The rows handed out stand (after is the last of them); the rest of the window
             * is read again, in smaller windows. */
            sc->window =
                sc->window / 8 > AUDIT_SCAN_WINDOW_MIN ? sc->window / 8 : AUDIT_SCAN_WINDOW_MIN;
        } else if (n < limit) {
            /* The whole window was read: nothing more matches up to its end. */
            sc->after = last;
            int64_t took = pep_mono_us() - t1;
            if (took < SCAN_FAST_RUN_US && sc->window < AUDIT_SCAN_WINDOW_MAX)
                sc->window *= 2;
            else if (took > SCAN_SLOW_RUN_US && sc->window > AUDIT_SCAN_WINDOW_MIN)
                sc->window /= 2;
        }
        if (budget_us >= 0 && pep_mono_us() - t0 >= budget_us) break;
    }
    return 0;
}

/* ---- a query page ------------------------------------------------------------------------ */

struct page {
    struct audit_buf *out;
    int64_t limit;
    int64_t count;    /* records written */
    int64_t last_seq; /* of the last record written */
    bool more;        /* a record beyond the limit was found */
};

static int page_row(void *arg, sqlite3_stmt *st) {
    struct page *pg = arg;
    if (pg->count == pg->limit) {
        pg->more = true;
        return 1;
    }
    const char *text = (const char *)sqlite3_column_text(st, 1);
    if (!text) return sqlite3_errcode(sqlite3_db_handle(st)) == SQLITE_NOMEM ? PEP_ENOMEM : 0;
    if (pg->count > 0) audit_buf_add(pg->out, ",", 1);
    /* SPEC 8: the stored record objects themselves — the stored text is canonical JSON. */
    audit_buf_add(pg->out, text, (size_t)sqlite3_column_bytes(st, 1));
    pg->count++;
    pg->last_seq = sqlite3_column_int64(st, 0);
    return pg->out->failed ? PEP_ENOMEM : 0;
}

int audit_query_page(sqlite3 *db, const struct audit_filter *f, int64_t budget_us,
                     struct audit_buf *out, struct pep_err *err) {
    struct audit_scan sc;
    int rc = audit_scan_open(&sc, db, f, AUDIT_SQL_RECORDS, err);
    if (rc != 0) return rc;
    struct page pg = {.out = out, .limit = f->limit > 0 ? f->limit : AUDIT_QUERY_LIMIT_DEFAULT};
    int64_t got = 0;
    audit_buf_str(out, "{\"records\":[");
    rc = audit_scan_next(&sc, pg.limit + 1, budget_us, page_row, &pg, &got, err);
    if (rc == 0) {
        char next[64];
        if (pg.more)
            snprintf(next, sizeof next, "%lld", (long long)pg.last_seq);
        else if (audit_scan_done(&sc))
            snprintf(next, sizeof next, "null");
        else /* the budget ran out: go on from the last seq examined */
            snprintf(next, sizeof next, "%lld", (long long)sc.after);
        audit_buf_str(out, "],\"next_after_seq\":");
        audit_buf_str(out, next);
        audit_buf_str(out, "}");
        if (out->failed) rc = pep_err_set(err, PEP_ENOMEM, "audit: out of memory");
    }
    audit_scan_close(&sc);
    return rc;
}
