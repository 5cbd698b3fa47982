/*
 * verify.c — walking the hash chain, read-only connections and checkpoint lookup.
 *
 * The verifier trusts nothing in the file but the rules of SPEC 6.1/6.2: it recomputes
 * every link from the stored bytes, so a record edited, removed, reordered or re-hashed
 * shows up at the first seq where the chain stops holding.  A tail cut cleanly leaves a
 * valid (shorter) chain; only a checkpoint beyond the new head, or one whose hash differs
 * from the row of its seq, reveals it — which is why every checkpoint is checked, not only
 * the latest: a store that was truncated and then appended to again has a valid chain
 * whose row N no longer matches the checkpoint taken at N.  Triggers can be dropped by
 * anyone with the file; this walk (and signed checkpoints kept elsewhere) is the evidence.
 *
 * The hash column of a checkpoint row is unsigned: whoever edits a record, re-hashes the
 * chain up to the head and rewrites that column gets a walk that holds.  Only the JWT
 * says what pep signed, so with a caller's checker every checkpoint's JWT is verified and
 * its claims compared with the chain, not with the column.  All of them, not only the
 * latest: it costs one ES256 verify per checkpoint_every records, measured at 0.5–1.1 ms
 * each (libjwt re-parses the PEM), i.e. +0.05–0.12 s on the ~0.9 s walk of a 100k-record
 * store with the default checkpoint_every of 1000.
 *
 * The walk streams: two statements (rows, checkpoints) stepped side by side in seq order,
 * so memory stays constant.  It reads in bounded read transactions (AUDIT_VERIFY_CHUNK_ROWS
 * rows or AUDIT_VERIFY_CHUNK_US, whichever comes first), carrying the previous hash from
 * one to the next, because a read transaction pins the WAL: while it lasts the writer's
 * checkpoints cannot copy back, nor the WAL restart, past the snapshot it reads, and under
 * load the -wal file grows for as long as the longest reader (a one-transaction walk of
 * 300k records took 3 s and let the WAL grow to 200 MB).  The chunks add up to one
 * consistent walk because the tables are append-only: the first transaction fixes the
 * end — the head (highest seq) and the highest checkpoint seq of that snapshot, which the
 * truncation check uses — and the rows up to that head never change afterwards.  Rows
 * appended later are beyond the head and not walked; a row of the range that disappears
 * before the walk reaches it (tampering while it runs) is reported missing, one changed
 * behind it is the next walk's to find, as with any walk that ended just before the edit.
 * Inside a transaction the caller already holds, the walk runs in it, in one pass (one
 * snapshot).  Between two transactions an optional pause callback runs: pep's verifier
 * cancels there at shutdown, and waits there for the writer to commit, because short
 * transactions alone let checkpoints copy the WAL back but seldom let it restart (see
 * pep/verifier.c).
 *
 * Threads: any thread, on a connection that thread owns.  Never writes.
 */
#include "audit/audit.h"
#include "pep/util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Waits this long for a lock before a read gives up (WAL readers rarely wait). */
#define VERIFY_BUSY_TIMEOUT_MS 5000

static const uint8_t zero_hash[32];

/* The walk's cursor: the checkpoint statement and its current row. */
struct verify_cp {
    sqlite3_stmt *st;
    bool have;        /* st holds a row */
    int64_t seq;      /* its seq */
    uint8_t hash[32]; /* its hash (zeros if malformed, which then never matches) */
};

/* Steps the checkpoint cursor; returns 0 or the SQLite error code. */
static int verify_cp_next(struct verify_cp *cp) {
    int rc = sqlite3_step(cp->st);
    cp->have = false;
    if (rc == SQLITE_DONE) return 0;
    if (rc != SQLITE_ROW) return rc;
    cp->have = true;
    cp->seq = sqlite3_column_int64(cp->st, 0);
    const void *h = sqlite3_column_blob(cp->st, 1);
    if (h && sqlite3_column_bytes(cp->st, 1) == 32)
        memcpy(cp->hash, h, 32);
    else
        memset(cp->hash, 0, 32);
    return 0;
}

static void verify_bad(struct audit_verify_result *res, int64_t seq, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void verify_bad(struct audit_verify_result *res, int64_t seq, const char *fmt, ...) {
    va_list ap;
    res->ok = false;
    res->first_bad_seq = seq;
    va_start(ap, fmt);
    vsnprintf(res->reason, sizeof(res->reason), fmt, ap);
    va_end(ap);
}

/* Checks the JWT of the checkpoint at seq against hash, the chain's hash at seq.  Returns
 * NULL when it holds, or the reason. */
static const char *verify_cp_jwt(int64_t seq, const char *jwt, const uint8_t hash[32],
                                 audit_checkpoint_check_fn check, void *check_arg) {
    json_t *claims = NULL;
    const char *why;
    char hex[65];
    if (!jwt) return "no jwt";
    why = check(check_arg, jwt, &claims);
    if (why) goto out;
    json_t *s = json_object_get(claims, "seq");
    if (!json_is_integer(s) || json_integer_value(s) != seq) {
        why = "jwt seq differs";
        goto out;
    }
    pep_hex(hash, 32, hex);
    const char *h = json_string_value(json_object_get(claims, "hash"));
    if (!h || strcmp(h, hex) != 0) why = "jwt hash differs";
out:
    json_decref(claims);
    return why;
}

/* Checks one row's record text: a canonical JSON object whose "seq" is seq.  Returns NULL
 * when fine, or the reason. */
static const char *verify_record(const char *text, size_t len, int64_t seq) {
    json_error_t jerr;
    const char *why = NULL;
    char *again = NULL;
    /* JSON_ALLOW_NUL: a string holding U+0000 dumps as \u0000 and must read back. */
    json_t *rec = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!rec || !json_is_object(rec)) {
        why = "record is not a JSON object";
        goto out;
    }
    json_t *s = json_object_get(rec, "seq");
    if (!json_is_integer(s) || json_integer_value(s) != seq) {
        why = "record seq differs from the row's seq";
        goto out;
    }
    again = audit_canonical_json(rec);
    if (!again || strlen(again) != len || memcmp(again, text, len) != 0) {
        why = "record is not canonical JSON";
        goto out;
    }
out:
    free(again);
    json_decref(rec);
    return why;
}

int audit_verify_db(sqlite3 *db, struct audit_verify_result *res) {
    return audit_verify_db_checked(db, NULL, NULL, res);
}

int audit_verify_db_checked(sqlite3 *db, audit_checkpoint_check_fn check, void *check_arg,
                            struct audit_verify_result *res) {
    struct audit_verify_options opt = {.check = check, .check_arg = check_arg};
    return audit_verify_db_opts(db, &opt, res);
}

/* The walk's state across its read transactions. */
struct verify_walk {
    sqlite3 *db;
    const struct audit_verify_options *opt;
    struct audit_verify_result *res;
    sqlite3_stmt *bounds; /* the head and the highest checkpoint, read once */
    sqlite3_stmt *rows;   /* rows in (?1, ?2] in seq order, at most ?3 */
    struct verify_cp cp;  /* checkpoints in (?1, ?2] in seq order */
    uint8_t prev[32];     /* hash of the last good row (zeros before seq 1) */
    int64_t expected;     /* seq the next row must have */
    int64_t after;        /* every row and checkpoint up to here is checked (INT64_MIN: none) */
    int64_t head;         /* highest seq of the audit table when the walk began */
    int64_t cp_max;       /* highest checkpoint seq then (0: none) */
};

/* Records a SQLite failure at the walk's position; returns PEP_EDB.  Call it before
 * anything else runs on the connection (COMMIT would reset the message). */
static int verify_db_error(struct verify_walk *w) {
    verify_bad(w->res, w->expected, "database error: %s", sqlite3_errmsg(w->db));
    return PEP_EDB;
}

/* Checks the row the rows statement is on.  Returns 0 when it holds (the walk moves past
 * it), 1 when the chain is bad there (res says why), or a negative code. */
static int verify_row(struct verify_walk *w) {
    struct audit_verify_result *res = w->res;
    sqlite3_stmt *rows = w->rows;
    struct verify_cp *cp = &w->cp;
    int64_t seq = sqlite3_column_int64(rows, 0);
    res->records++;
    if (seq != w->expected) {
        if (seq > w->expected)
            verify_bad(res, w->expected, "missing row");
        else /* ascending unique seqs: only a row with seq <= 0 comes first */
            verify_bad(res, w->expected, "unexpected seq %lld before seq %lld", (long long)seq,
                       (long long)w->expected);
        return 1;
    }
    const void *ph = sqlite3_column_blob(rows, 2);
    if (sqlite3_column_type(rows, 2) != SQLITE_BLOB || sqlite3_column_bytes(rows, 2) != 32 ||
        memcmp(ph, w->prev, 32) != 0) {
        verify_bad(res, seq, "prev_hash differs from the hash of seq %lld", (long long)(seq - 1));
        return 1;
    }
    const char *text = (const char *)sqlite3_column_text(rows, 1);
    size_t len = (size_t)sqlite3_column_bytes(rows, 1);
    if (!text) {
        if (sqlite3_errcode(w->db) == SQLITE_NOMEM) return verify_db_error(w);
        verify_bad(res, seq, "record is NULL");
        return 1;
    }
    uint8_t want[32];
    if (audit_chain_hash(w->prev, text, len, want) != 0) {
        verify_bad(res, seq, "SHA-256 failed");
        return PEP_ECRYPTO;
    }
    const void *h = sqlite3_column_blob(rows, 3);
    if (sqlite3_column_type(rows, 3) != SQLITE_BLOB || sqlite3_column_bytes(rows, 3) != 32 ||
        memcmp(h, want, 32) != 0) {
        verify_bad(res, seq, "hash mismatch");
        return 1;
    }
    const char *why = verify_record(text, len, seq);
    if (why) {
        verify_bad(res, seq, "%s", why);
        return 1;
    }
    /* Checkpoints below seq have no row of their own seq: the walk already failed on the
     * gap, or they name seq <= 0 (tampering); both end the walk as bad. */
    if (cp->have && cp->seq < seq) {
        verify_bad(res, cp->seq, "checkpoint at seq %lld has no row", (long long)cp->seq);
        return 1;
    }
    while (cp->have && cp->seq == seq) {
        if (memcmp(cp->hash, want, 32) != 0) {
            verify_bad(res, seq, "hash differs from the checkpoint at seq %lld", (long long)seq);
            return 1;
        }
        if (w->opt->check) {
            const char *jwt = (const char *)sqlite3_column_text(cp->st, 2);
            if (!jwt && sqlite3_errcode(w->db) == SQLITE_NOMEM) return verify_db_error(w);
            const char *bad = verify_cp_jwt(seq, jwt, want, w->opt->check, w->opt->check_arg);
            if (bad) {
                verify_bad(res, seq, "checkpoint at seq %lld: %s", (long long)seq, bad);
                return 1;
            }
        }
        res->checkpoints++;
        if (verify_cp_next(cp) != 0) return verify_db_error(w);
    }
    memcpy(w->prev, want, 32);
    res->head_seq = seq;
    memcpy(res->head_hash, want, 32);
    w->expected = seq + 1;
    w->after = seq;
    return 0;
}

/* Reads the head and the highest checkpoint: the walk's end, fixed at its start. */
static int verify_read_bounds(struct verify_walk *w) {
    if (sqlite3_step(w->bounds) != SQLITE_ROW) return verify_db_error(w);
    w->head = sqlite3_column_int64(w->bounds, 0); /* NULL (empty table) reads as 0 */
    w->cp_max = sqlite3_column_int64(w->bounds, 1);
    sqlite3_reset(w->bounds);
    return 0;
}

/* One read transaction's worth of rows: up to `limit` rows (< 0: all) or until `budget_us`
 * passed (< 0: no budget).  Sets *more when rows up to the head may remain.  Returns 0,
 * 1 when the chain is bad (res says why), or a negative code. */
static int verify_chunk(struct verify_walk *w, int64_t limit, int64_t budget_us, bool *more) {
    int64_t n = 0, t0 = budget_us >= 0 ? pep_mono_us() : 0;
    int rc = 0;
    *more = false;
    if (sqlite3_bind_int64(w->rows, 1, w->after) != SQLITE_OK ||
        sqlite3_bind_int64(w->rows, 2, w->head) != SQLITE_OK ||
        sqlite3_bind_int64(w->rows, 3, limit) != SQLITE_OK ||
        sqlite3_bind_int64(w->cp.st, 1, w->after) != SQLITE_OK ||
        sqlite3_bind_int64(w->cp.st, 2, w->head) != SQLITE_OK || verify_cp_next(&w->cp) != 0)
        return verify_db_error(w);
    for (;;) {
        int src = sqlite3_step(w->rows);
        if (src == SQLITE_DONE) {
            *more = limit >= 0 && n == limit;
            break;
        }
        if (src != SQLITE_ROW) {
            rc = verify_db_error(w);
            break;
        }
        if ((rc = verify_row(w)) != 0) break;
        n++;
        if (budget_us >= 0 && (limit < 0 || n < limit) && pep_mono_us() - t0 >= budget_us) {
            *more = true;
            break;
        }
    }
    sqlite3_reset(w->rows);
    sqlite3_reset(w->cp.st);
    return rc;
}

int audit_verify_db_opts(sqlite3 *db, const struct audit_verify_options *opt,
                         struct audit_verify_result *res) {
    int rc = 0;
    bool in_tx = false;
    struct verify_walk w = {.db = db, .opt = opt, .res = res, .expected = 1, .after = INT64_MIN};

    memset(res, 0, sizeof(*res));
    res->ok = true;
    res->signatures_checked = opt->check != NULL;
    memcpy(w.prev, zero_hash, 32);

    /* Inside the caller's transaction the walk sees that one snapshot, in one pass. */
    bool own = sqlite3_get_autocommit(db) != 0;
    int64_t limit = !own ? -1 : opt->chunk_rows > 0 ? opt->chunk_rows : AUDIT_VERIFY_CHUNK_ROWS;
    int64_t budget = !own ? -1 : opt->chunk_us > 0 ? opt->chunk_us : AUDIT_VERIFY_CHUNK_US;

    if (sqlite3_prepare_v2(
            db, "SELECT (SELECT MAX(seq) FROM audit), (SELECT MAX(seq) FROM checkpoints)", -1,
            &w.bounds, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db,
                           "SELECT seq, record, prev_hash, hash FROM audit"
                           " WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
                           -1, &w.rows, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db,
                           "SELECT seq, hash, jwt FROM checkpoints"
                           " WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                           -1, &w.cp.st, NULL) != SQLITE_OK) {
        verify_bad(res, 0, "not an audit store: %s", sqlite3_errmsg(db));
        rc = PEP_EINVAL;
        goto out;
    }

    for (bool first = true;; first = false) {
        bool more = false;
        if (own) {
            if (sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) {
                rc = verify_db_error(&w);
                goto out;
            }
            in_tx = true;
        }
        rc = first ? verify_read_bounds(&w) : 0;
        if (rc == 0) rc = verify_chunk(&w, limit, budget, &more);
        if (in_tx) {
            /* Read-only: COMMIT only ends the snapshot (it cannot fail for lack of a lock). */
            sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
            in_tx = false;
        }
        if (rc != 0) {
            rc = rc > 0 ? 0 : rc; /* 1: the chain is bad, and the walk did its job */
            goto out;
        }
        if (!more) break;
        /* Between transactions: the writer may checkpoint the WAL past what was read. */
        if (opt->pause && !opt->pause(opt->pause_arg)) {
            verify_bad(res, 0, "cancelled");
            rc = PEP_ECLOSED;
            goto out;
        }
    }
    /* Every row up to the head seen at the start was walked; one missing now was deleted
     * while the walk ran (the table is append-only: tampering). */
    if (res->head_seq < w.head) {
        verify_bad(res, w.expected, "missing row");
        goto out;
    }
    /* The chain holds; a checkpoint past its end means rows were cut off the tail. */
    if (w.cp_max > res->head_seq) {
        verify_bad(res, res->head_seq + 1, "truncated: checkpoint at seq %lld",
                   (long long)w.cp_max);
    }
out:
    sqlite3_finalize(w.bounds);
    sqlite3_finalize(w.rows);
    sqlite3_finalize(w.cp.st);
    if (in_tx && !sqlite3_get_autocommit(db)) sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    return rc;
}

int audit_open_reader(const char *path, sqlite3 **out, struct pep_err *err) {
    sqlite3 *db = NULL;
    int rc = 0;
    *out = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        rc = pep_err_set(err, PEP_EIO, "audit: cannot open %s: %s", path,
                         db ? sqlite3_errmsg(db) : "out of memory");
        goto out;
    }
    sqlite3_extended_result_codes(db, 1);
    /* Per connection settings (PITFALLS: SQLite): recursive_triggers so that no REPLACE on
     * this connection could slip past the DELETE trigger, even though it only reads. */
    if (sqlite3_busy_timeout(db, VERIFY_BUSY_TIMEOUT_MS) != SQLITE_OK ||
        sqlite3_exec(db, "PRAGMA recursive_triggers=ON", NULL, NULL, NULL) != SQLITE_OK) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", path, sqlite3_errmsg(db));
        goto out;
    }
out:
    if (rc) {
        sqlite3_close(db);
        db = NULL;
    }
    *out = db;
    return rc;
}

int audit_verify_file(const char *path, struct audit_verify_result *res, struct pep_err *err) {
    return audit_verify_file_checked(path, NULL, NULL, res, err);
}

int audit_verify_file_checked(const char *path, audit_checkpoint_check_fn check, void *check_arg,
                              struct audit_verify_result *res, struct pep_err *err) {
    struct audit_verify_options opt = {.check = check, .check_arg = check_arg};
    return audit_verify_file_opts(path, &opt, res, err);
}

int audit_verify_file_opts(const char *path, const struct audit_verify_options *opt,
                           struct audit_verify_result *res, struct pep_err *err) {
    sqlite3 *db = NULL;
    int rc = audit_open_reader(path, &db, err);
    if (rc) {
        memset(res, 0, sizeof(*res));
        snprintf(res->reason, sizeof(res->reason), "cannot open the database");
        return rc;
    }
    rc = audit_verify_db_opts(db, opt, res);
    if (rc) pep_err_set(err, rc, "audit: %s: %s", path, res->reason);
    sqlite3_close(db);
    return rc;
}

int audit_latest_checkpoint(sqlite3 *db, int64_t *seq, uint8_t hash[32], char **jwt) {
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    if (jwt) *jwt = NULL;
    if (sqlite3_prepare_v2(db, "SELECT seq, hash, jwt FROM checkpoints ORDER BY seq DESC LIMIT 1",
                           -1, &st, NULL) != SQLITE_OK)
        goto out;
    int src = sqlite3_step(st);
    if (src == SQLITE_DONE) {
        rc = PEP_ENOTFOUND;
        goto out;
    }
    if (src != SQLITE_ROW) goto out;
    *seq = sqlite3_column_int64(st, 0);
    const void *h = sqlite3_column_blob(st, 1);
    if (h && sqlite3_column_bytes(st, 1) == 32)
        memcpy(hash, h, 32);
    else
        memset(hash, 0, 32);
    if (jwt) {
        const char *j = (const char *)sqlite3_column_text(st, 2);
        *jwt = strdup(j ? j : "");
        if (!*jwt) {
            rc = PEP_ENOMEM;
            goto out;
        }
    }
    rc = 0;
out:
    sqlite3_finalize(st);
    return rc;
}

json_t *audit_verify_result_json(const struct audit_verify_result *res) {
    char head[65];
    pep_hex(res->head_hash, sizeof res->head_hash, head);
    json_t *v = json_pack("{s:b, s:I, s:I, s:s, s:b}", "ok", res->ok, "records",
                          (json_int_t)res->records, "head_seq", (json_int_t)res->head_seq,
                          "head_hash", head, "checkpoints_signed", res->signatures_checked);
    if (v && !res->ok &&
        (json_object_set_new(v, "first_bad_seq", json_integer(res->first_bad_seq)) != 0 ||
         json_object_set_new(v, "reason", json_string(res->reason)) != 0)) {
        json_decref(v);
        v = NULL;
    }
    return v;
}
