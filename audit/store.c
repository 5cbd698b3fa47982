/*
 * store.c — opening the audit store and its single writer thread (SPEC 6.1, 6.4, 6.5;
 * DESIGN rule 2).
 *
 * Every durable change of pep goes through one thread.  Producers (listener, forwarder,
 * admin threads) queue items {record, apply, done}; the writer takes what is queued (up
 * to max_batch), and writes it in one `BEGIN IMMEDIATE … COMMIT`: for each item it runs
 * `apply` inside a SAVEPOINT (the state change that must agree with the record), gives
 * the record the next seq, links it (hash = SHA-256(prev_hash || canonical text)) and
 * inserts it with prepared, persistent statements.  With durability full the connection
 * runs synchronous=FULL, so the COMMIT is one fsync for the whole batch (group commit).
 * Only after COMMIT returns does the writer call the items' done callbacks, in seq
 * order: a request is answered only once its decision record is durable.
 *
 * Failure is closed: if anything in the batch fails at the SQLite level (insert, commit,
 * SQLITE_FULL, SQLITE_IOERR …) the transaction is rolled back, the in-memory head stays
 * where it was, and every item of the batch someone waits for gets done(PEP_EDB, 0) —
 * nothing of it was written — as does every such item still queued (it would only wait
 * behind what is held).  Fire-and-forget items (what they record has happened) are
 * held instead: put back at the front of the queue, in order, and retried every
 * AUDIT_RETRY_US until a batch commits (SPEC 6.5).  A full disk that gets space back, or a
 * transient I/O error, heals without a restart.  One log line per failure streak, one on
 * recovery.
 * An item whose own apply fails, or whose record has no canonical form, fails alone (its
 * savepoint is rolled back, it takes no seq) and the rest of the batch commits.
 * One window is left, as in SQLite itself: when the WAL fsync of COMMIT fails, the batch's
 * frames (commit frame included) are already in the WAL file; SQLite ignores them while
 * running and the next batch overwrites them, but a crash before that next batch lets WAL
 * recovery replay them — records whose items were reported failed (the chain still
 * verifies).  After a failed fsync the kernel's view of the file is unknown anyway.
 *
 * Checkpoints (SPEC 6.4): when a batch writes seq k·checkpoint_every, the writer signs
 * (seq, hash) with checkpoint_sign and inserts the checkpoint row in the same
 * transaction; audit_shutdown writes one more at the head if the head has none.
 *
 * Invariants: seqs are contiguous and assigned in queue order; s->head_seq/head_hash are
 * the last committed row (they move only after a successful COMMIT); the schema's
 * triggers refuse UPDATE, DELETE and any INSERT whose seq is not head + 1.
 *
 * Threads: audit_open / audit_close / audit_shutdown from one controlling thread;
 * audit_submit, audit_get_stats, audit_head_seq, audit_path from any thread.  The SQLite
 * connection, the prepared statements and the chain head belong to the writer thread
 * once it runs.  `lock` guards the queue, the closing/stopped flags and the stats.
 */
#include "audit/audit.h"
#include "pep/util.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define AUDIT_DEFAULT_MAX_BATCH 1024
#define AUDIT_DEFAULT_MAX_QUEUE 65536
#define AUDIT_BUSY_TIMEOUT_MS 5000
#define AUDIT_RETRY_US 50000     /* pause between retries of held records */
#define AUDIT_CLOSING_RETRIES 40 /* at shutdown, held records are retried this often */

/* The audit schema.  Copy columns (ts … request_id) duplicate record fields for queries;
 * the record text stays the only thing the chain covers.  Every index costs the single
 * writer a page per batch, so only selective ones exist: request_id, agent and ts (kind,
 * with four values, is filtered after one of those). */
static const char audit_schema_sql[] =
    "CREATE TABLE IF NOT EXISTS audit ("
    " seq INTEGER PRIMARY KEY,"
    " record TEXT NOT NULL,"
    " prev_hash BLOB NOT NULL,"
    " hash BLOB NOT NULL,"
    " ts TEXT, kind TEXT, agent TEXT, tenant TEXT, action TEXT, decision TEXT, code TEXT,"
    " request_id TEXT);"
    "CREATE INDEX IF NOT EXISTS audit_request_id ON audit(request_id);"
    "CREATE INDEX IF NOT EXISTS audit_agent ON audit(agent);"
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);"
    /* SECURITY: append-only against mistakes and casual edits (PITFALLS: SQLite).  Anyone
     * with the file can drop these; the chain and signed checkpoints are the evidence. */
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit BEGIN"
    " SELECT RAISE(ABORT, 'audit is append-only: UPDATE refused'); END;"
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit BEGIN"
    " SELECT RAISE(ABORT, 'audit is append-only: DELETE refused'); END;"
    /* SECURITY: INSERT OR REPLACE of an existing seq would overwrite a row without a
     * DELETE trigger on a connection lacking recursive_triggers; this guard refuses it
     * (and any gap) on every connection. */
    "CREATE TRIGGER IF NOT EXISTS audit_insert_guard BEFORE INSERT ON audit"
    " WHEN NEW.seq IS NOT (SELECT IFNULL(MAX(seq), 0) + 1 FROM audit) BEGIN"
    " SELECT RAISE(ABORT, 'audit is append-only: seq must be head+1'); END;"
    "CREATE TABLE IF NOT EXISTS checkpoints ("
    " seq INTEGER PRIMARY KEY,"
    " hash BLOB NOT NULL,"
    " jwt TEXT NOT NULL,"
    " created_at TEXT NOT NULL);"
    "CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints BEGIN"
    " SELECT RAISE(ABORT, 'checkpoints are append-only: UPDATE refused'); END;"
    "CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints BEGIN"
    " SELECT RAISE(ABORT, 'checkpoints are append-only: DELETE refused'); END;"
    /* SECURITY: the same REPLACE hole as the audit table's.  An existing checkpoint is kept
     * and the insert silently dropped (IGNORE, not ABORT: the writer's own INSERT OR IGNORE
     * of a checkpoint that survived a truncated tail must not fail its batch). */
    "CREATE TRIGGER IF NOT EXISTS checkpoints_insert_guard BEFORE INSERT ON checkpoints"
    " WHEN EXISTS (SELECT 1 FROM checkpoints WHERE seq = NEW.seq) BEGIN"
    " SELECT RAISE(IGNORE); END;";

/* Record fields copied into columns, in the insert statement's order (?5 …). */
static const char *const audit_copy_fields[] = {
    "ts", "kind", "agent", "tenant", "action", "decision", "code", "request_id",
};

#define AUDIT_COPY_FIELDS PEP_ARRAY_LEN(audit_copy_fields)

/* One queued item; owned by the queue, then by the writer until its callback ran.
 *
 * The record is rendered by audit_submit, on the submitting thread, to its canonical text
 * with "seq": 0; the writer only replaces that 0 with the seq it assigns.  The digits of
 * a seq never change where "seq" sorts, so the result is exactly the canonical text of
 * the record with its real seq, and the serial writer spends no time in jansson. */
struct audit_item {
    struct audit_item *next; /* queue order */
    char *text;              /* canonical text with "seq":0 ("" when invalid) */
    size_t seq_at;           /* offset in text of that 0 */
    bool invalid;            /* the record has no canonical form: fails with PEP_EINVAL */
    char *copies[8];         /* the indexed copy columns' values (NULL: SQL NULL) */
    audit_apply_fn apply;    /* may be NULL */
    void *apply_arg;
    void (*apply_arg_free)(void *); /* frees apply_arg with the item; may be NULL */
    audit_done_fn done;             /* may be NULL */
    void *done_arg;
    bool held;   /* put back after a failed batch (counted in audit_store.held) */
    int rc;      /* outcome in the current batch: 0 or PEP_E* */
    int64_t seq; /* assigned seq, 0 when the item failed */
};

struct audit_store {
    char *path;               /* as given to audit_open */
    sqlite3 *db;              /* writer connection; writer thread once started */
    size_t max_batch;         /* items per transaction */
    size_t max_queue;         /* queued items before audit_submit refuses */
    int64_t checkpoint_every; /* 0: no checkpoints */
    char *(*checkpoint_sign)(void *, int64_t, const uint8_t[32]);
    void *checkpoint_arg;
    void (*batch_observe)(void *, size_t, int64_t);
    void *batch_observe_arg;

    /* Prepared once, SQLITE_PREPARE_PERSISTENT; writer thread only. */
    sqlite3_stmt *st_begin;       /* BEGIN IMMEDIATE */
    sqlite3_stmt *st_commit;      /* COMMIT */
    sqlite3_stmt *st_rollback;    /* ROLLBACK */
    sqlite3_stmt *st_savepoint;   /* SAVEPOINT audit_item */
    sqlite3_stmt *st_release;     /* RELEASE audit_item */
    sqlite3_stmt *st_rollback_to; /* ROLLBACK TO audit_item */
    sqlite3_stmt *st_insert;      /* INSERT INTO audit … */
    sqlite3_stmt *st_checkpoint;  /* INSERT OR IGNORE INTO checkpoints … */

    /* Chain head: the last committed row.  Writer thread only once it runs. */
    int64_t head_seq;
    uint8_t head_hash[32];
    bool head_checkpointed; /* a checkpoint row exists for head_seq */
    bool failing;           /* inside a failure streak (for logging once) */
    int64_t failed_batches; /* batches failed in the current streak */
    int closing_retries;    /* failed batches since closing began */
    bool shutdown_failed;   /* a record was lost at shutdown or the final checkpoint failed */

    pthread_t thread; /* the writer */
    bool thread_started;

    pthread_mutex_t lock;      /* guards everything below */
    pthread_cond_t cond;       /* work queued / closing / writer stopped */
    struct audit_item *q_head; /* oldest queued item */
    struct audit_item *q_tail; /* newest queued item */
    size_t q_len;
    size_t q_waiting;  /* queued items with a done callback (someone waits) */
    size_t held;       /* fire-and-forget items put back after a failed batch (at the front) */
    size_t unwaited;   /* fire-and-forget items not yet written, queued or in the batch */
    int64_t linger_us; /* how long fire-and-forget items may wait for company */
    bool closing;      /* audit_submit refuses; the writer drains and stops */
    /* Settings a reload changed (audit_retune), applied by the writer between batches. */
    bool retune;
    bool retune_full;
    int64_t retune_checkpoint_every;
    bool stopped;             /* the writer has returned */
    bool join_claimed;        /* one audit_shutdown caller joins the thread */
    struct audit_stats stats; /* queued is filled from q_len when read */
};

/* Runs one prepared statement that returns no row; leaves it reset. */
static int store_step(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

static int store_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st) {
    return sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
}

/* Per-connection settings and the schema; returns 0 or PEP_EDB with err filled. */
static int store_setup_db(struct audit_store *s, const struct audit_options *opt,
                          struct pep_err *err) {
    sqlite3 *db = s->db;
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    bool in_tx = false;

    if (sqlite3_busy_timeout(db, AUDIT_BUSY_TIMEOUT_MS) != SQLITE_OK) goto db_error;
    /* journal_mode answers with the mode it ended up in; WAL may be refused. */
    if (sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL) != SQLITE_OK ||
        sqlite3_step(st) != SQLITE_ROW)
        goto db_error;
    const char *mode = (const char *)sqlite3_column_text(st, 0);
    if (!mode || strcmp(mode, "wal") != 0) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: cannot use WAL (journal_mode %s)", s->path,
                         mode ? mode : "?");
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;
    /* Per connection (PITFALLS: SQLite): synchronous decides whether COMMIT fsyncs;
     * recursive_triggers makes REPLACE fire the DELETE trigger. */
    if (sqlite3_exec(db,
                     opt->durability_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
                     NULL, NULL, NULL) != SQLITE_OK ||
        sqlite3_exec(db, "PRAGMA recursive_triggers=ON", NULL, NULL, NULL) != SQLITE_OK)
        goto db_error;

    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) goto db_error;
    in_tx = true;
    if (sqlite3_exec(db, audit_schema_sql, NULL, NULL, NULL) != SQLITE_OK) goto db_error;
    if (opt->schema_extra && sqlite3_exec(db, opt->schema_extra, NULL, NULL, NULL) != SQLITE_OK) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: schema_extra: %s", s->path, sqlite3_errmsg(db));
        goto out;
    }
    if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) goto db_error;
    in_tx = false;
    rc = 0;
    goto out;
db_error:
    rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", s->path, sqlite3_errmsg(db));
out:
    sqlite3_finalize(st);
    if (in_tx && !sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

static int store_prepare_all(struct audit_store *s) {
    sqlite3 *db = s->db;
    if (store_prepare(db, "BEGIN IMMEDIATE", &s->st_begin) != SQLITE_OK ||
        store_prepare(db, "COMMIT", &s->st_commit) != SQLITE_OK ||
        store_prepare(db, "ROLLBACK", &s->st_rollback) != SQLITE_OK ||
        store_prepare(db, "SAVEPOINT audit_item", &s->st_savepoint) != SQLITE_OK ||
        store_prepare(db, "RELEASE audit_item", &s->st_release) != SQLITE_OK ||
        store_prepare(db, "ROLLBACK TO audit_item", &s->st_rollback_to) != SQLITE_OK ||
        store_prepare(db,
                      "INSERT INTO audit (seq, record, prev_hash, hash, ts, kind, agent, tenant,"
                      " action, decision, code, request_id)"
                      " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                      &s->st_insert) != SQLITE_OK ||
        store_prepare(db,
                      "INSERT OR IGNORE INTO checkpoints (seq, hash, jwt, created_at)"
                      " VALUES (?1, ?2, ?3, ?4)",
                      &s->st_checkpoint) != SQLITE_OK)
        return PEP_EDB;
    return 0;
}

static void store_finalize_all(struct audit_store *s) {
    sqlite3_finalize(s->st_begin);
    sqlite3_finalize(s->st_commit);
    sqlite3_finalize(s->st_rollback);
    sqlite3_finalize(s->st_savepoint);
    sqlite3_finalize(s->st_release);
    sqlite3_finalize(s->st_rollback_to);
    sqlite3_finalize(s->st_insert);
    sqlite3_finalize(s->st_checkpoint);
    s->st_begin = s->st_commit = s->st_rollback = NULL;
    s->st_savepoint = s->st_release = s->st_rollback_to = NULL;
    s->st_insert = s->st_checkpoint = NULL;
}

/* Reads the last row (the head the next record links to) and whether it is checkpointed.
 * The head is the last row even on a broken chain: appending goes on from there and the
 * break stays where it is, provable (SPEC 8). */
static int store_read_head(struct audit_store *s, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    s->head_seq = 0;
    memset(s->head_hash, 0, 32);
    if (sqlite3_prepare_v2(s->db, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", -1, &st,
                           NULL) != SQLITE_OK)
        goto db_error;
    int src = sqlite3_step(st);
    if (src == SQLITE_ROW) {
        s->head_seq = sqlite3_column_int64(st, 0);
        const void *h = sqlite3_column_blob(st, 1);
        if (h && sqlite3_column_bytes(st, 1) == 32) memcpy(s->head_hash, h, 32);
    } else if (src != SQLITE_DONE) {
        goto db_error;
    }
    int64_t cp_seq = 0;
    uint8_t cp_hash[32];
    int crc = audit_latest_checkpoint(s->db, &cp_seq, cp_hash, NULL);
    if (crc != 0 && crc != PEP_ENOTFOUND) goto db_error;
    s->head_checkpointed = crc == 0 && cp_seq == s->head_seq;
    rc = 0;
    goto out;
db_error:
    rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", s->path, sqlite3_errmsg(s->db));
out:
    sqlite3_finalize(st);
    return rc;
}

/* Inserts one linked row; returns the SQLite code. */
static int store_insert_row(struct audit_store *s, int64_t seq, const struct audit_item *it,
                            const char *text, size_t len, const uint8_t prev[32],
                            const uint8_t hash[32]) {
    sqlite3_stmt *st = s->st_insert;
    int rc = sqlite3_bind_int64(st, 1, seq);
    if (rc == SQLITE_OK) rc = sqlite3_bind_text64(st, 2, text, len, SQLITE_STATIC, SQLITE_UTF8);
    if (rc == SQLITE_OK) rc = sqlite3_bind_blob(st, 3, prev, 32, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_bind_blob(st, 4, hash, 32, SQLITE_STATIC);
    for (size_t i = 0; rc == SQLITE_OK && i < AUDIT_COPY_FIELDS; i++)
        rc = it->copies[i] ? sqlite3_bind_text(st, 5 + (int)i, it->copies[i], -1, SQLITE_STATIC)
                           : sqlite3_bind_null(st, 5 + (int)i);
    if (rc == SQLITE_OK) rc = store_step(st);
    sqlite3_clear_bindings(st);
    return rc;
}

/* Signs and inserts a checkpoint for (seq, hash) inside the open transaction.  A failed
 * signature is logged and skipped (the records still commit); a failed insert is a
 * SQLite failure of the batch.  Returns the SQLite code; *made says whether a row was
 * added. */
static int store_checkpoint(struct audit_store *s, int64_t seq, const uint8_t hash[32],
                            bool *made) {
    *made = false;
    char *jwt = s->checkpoint_sign(s->checkpoint_arg, seq, hash);
    if (!jwt) {
        fprintf(stderr, "audit: checkpoint at seq %lld: signing failed, skipped\n", (long long)seq);
        return SQLITE_OK;
    }
    char created[32];
    pep_format_rfc3339_us(pep_now_us(), created);
    sqlite3_stmt *st = s->st_checkpoint;
    int rc = sqlite3_bind_int64(st, 1, seq);
    if (rc == SQLITE_OK) rc = sqlite3_bind_blob(st, 2, hash, 32, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 3, jwt, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_bind_text(st, 4, created, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = store_step(st);
    sqlite3_clear_bindings(st);
    free(jwt);
    if (rc == SQLITE_OK) {
        if (sqlite3_changes(s->db) == 1)
            *made = true;
        else /* a row for this seq survives from before a truncation: keep it, it is proof */
            fprintf(stderr, "audit: checkpoint at seq %lld already exists, kept\n", (long long)seq);
    }
    return rc;
}

/* The canonical text of the item's record with "seq": seq; malloc'd, or NULL. */
static char *store_splice_seq(const struct audit_item *it, int64_t seq) {
    char *text = NULL;
    int n = asprintf(&text, "%.*s%lld%s", (int)it->seq_at, it->text, (long long)seq,
                     it->text + it->seq_at + 1);
    return n < 0 ? NULL : text;
}

static void store_item_free(struct audit_item *it) {
    if (it->apply_arg_free) it->apply_arg_free(it->apply_arg);
    free(it->text);
    for (size_t i = 0; i < AUDIT_COPY_FIELDS; i++)
        free(it->copies[i]);
    free(it);
}

/* Runs one item inside the batch transaction.  Returns the SQLite code of a failure that
 * dooms the batch, or SQLITE_OK (the item either was written — it->seq set — or failed
 * alone — it->rc set).  *seq and prev advance when the item was written. */
static int store_write_item(struct audit_store *s, struct audit_item *it, int64_t *seq,
                            uint8_t prev[32], bool *checkpointed) {
    int rc = SQLITE_OK;
    int64_t next = *seq + 1;
    char *text = NULL;
    uint8_t hash[32];

    if (it->invalid) {
        it->rc = PEP_EINVAL;
        goto out;
    }
    text = store_splice_seq(it, next);
    if (!text) {
        it->rc = PEP_ENOMEM;
        goto out;
    }
    if (it->apply) {
        if ((rc = store_step(s->st_savepoint)) != SQLITE_OK) goto out;
        int arc = it->apply(s->db, it->apply_arg);
        /* An apply that hit SQLITE_FULL/IOERR may have had SQLite roll the whole
         * transaction back: nothing may then be written outside it. */
        if (sqlite3_get_autocommit(s->db)) {
            rc = SQLITE_ABORT;
            goto out;
        }
        if (arc != 0) {
            if ((rc = store_step(s->st_rollback_to)) != SQLITE_OK ||
                (rc = store_step(s->st_release)) != SQLITE_OK)
                goto out;
            it->rc = arc < 0 ? arc : PEP_EDB;
            goto out;
        }
    }
    size_t len = strlen(text);
    if (audit_chain_hash(prev, text, len, hash) != 0) {
        rc = SQLITE_ERROR;
        goto out;
    }
    if ((rc = store_insert_row(s, next, it, text, len, prev, hash)) != SQLITE_OK) goto out;
    if (it->apply && (rc = store_step(s->st_release)) != SQLITE_OK) goto out;
    it->seq = next;
    *seq = next;
    memcpy(prev, hash, 32);
    *checkpointed = false;
    if (s->checkpoint_every > 0 && s->checkpoint_sign && next % s->checkpoint_every == 0) {
        bool made;
        if ((rc = store_checkpoint(s, next, hash, &made)) != SQLITE_OK) goto out;
        *checkpointed = made;
    }
out:
    free(text);
    return rc;
}

/* After a failed batch: the store may have been changed underneath the writer (another
 * process appended to it: the one-pep-per-data-dir lock broken or bypassed).  Its head is
 * read again so that such a change is reported and the next batch links to the real head,
 * instead of every write failing on "seq must be head+1" forever.  The chain's break, if
 * any, stays in the store, provable. */
static void store_reread_head(struct audit_store *s) {
    int64_t seq = s->head_seq;
    uint8_t hash[32];
    memcpy(hash, s->head_hash, 32);
    struct pep_err err = {0};
    if (store_read_head(s, &err) != 0) {
        s->head_seq = seq; /* unreadable now: keep what we had */
        memcpy(s->head_hash, hash, 32);
        return;
    }
    if (s->head_seq != seq || memcmp(s->head_hash, hash, 32) != 0)
        fprintf(stderr,
                "audit: the store was changed underneath pep: its head is seq %lld, pep's was "
                "%lld; appending from there\n",
                (long long)s->head_seq, (long long)seq);
}

/* Writes one batch in one transaction.  Returns 0 (each item's rc/seq says its fate) or
 * PEP_EDB after a rollback (every item failed, the head did not move). */
static int store_write_batch(struct audit_store *s, struct audit_item *batch, size_t *written,
                             int64_t *commit_us) {
    int rc = SQLITE_OK;
    int64_t seq = s->head_seq;
    uint8_t prev[32];
    bool checkpointed = s->head_checkpointed;
    char msg[256] = "";

    memcpy(prev, s->head_hash, 32);
    *written = 0;
    if ((rc = store_step(s->st_begin)) != SQLITE_OK) goto fail;
    for (struct audit_item *it = batch; it; it = it->next) {
        it->rc = 0;
        it->seq = 0;
        if ((rc = store_write_item(s, it, &seq, prev, &checkpointed)) != SQLITE_OK) goto fail;
        if (it->rc == 0) (*written)++;
    }
    int64_t t0 = pep_mono_us();
    if ((rc = store_step(s->st_commit)) != SQLITE_OK) goto fail;
    *commit_us = pep_mono_us() - t0;

    s->head_seq = seq;
    memcpy(s->head_hash, prev, 32);
    s->head_checkpointed = checkpointed;
    if (s->failing) {
        fprintf(stderr, "audit: store writable again after %lld failed batch(es)\n",
                (long long)s->failed_batches);
        s->failing = false;
        s->failed_batches = 0;
    }
    return 0;

fail:
    snprintf(msg, sizeof(msg), "%s (%d)", sqlite3_errmsg(s->db), rc);
    /* After FULL/IOERR SQLite may already have rolled back; otherwise we do. */
    if (!sqlite3_get_autocommit(s->db)) store_step(s->st_rollback);
    for (struct audit_item *it = batch; it; it = it->next) {
        it->rc = PEP_EDB;
        it->seq = 0;
    }
    *written = 0;
    s->failed_batches++;
    store_reread_head(s);
    if (!s->failing) {
        /* Once per streak: a dead disk must not flood the log. */
        fprintf(stderr, "audit: write failed, batch refused (fail closed): %s\n", msg);
        s->failing = true;
    }
    return PEP_EDB;
}

/* Whether a failed batch's item is kept to be written later: nobody waits for it (what it
 * records has happened), and only the store failed it, not its own content. */
static bool store_holds(const struct audit_store *s, const struct audit_item *it) {
    return !it->done && !it->invalid && s->closing_retries < AUDIT_CLOSING_RETRIES;
}

/* Writes a batch, publishes the outcome, runs the callbacks and frees the items — or, when
 * the batch failed, puts the items it holds back at the front of the queue.  Returns the
 * batch's rc. */
static int store_run_batch(struct audit_store *s, struct audit_item *batch, size_t n) {
    size_t written = 0;
    int64_t commit_us = 0;
    int rc = store_write_batch(s, batch, &written, &commit_us);
    if (rc != 0 && s->closing) s->closing_retries++;

    /* Split off what is held (in queue order); the rest is reported and freed. */
    struct audit_item *held = NULL, *held_last = NULL, *report = NULL, **report_tail = &report;
    size_t held_n = 0, lost = 0, were_held = 0;
    for (struct audit_item *it = batch, *next; it; it = next) {
        next = it->next;
        it->next = NULL;
        were_held += it->held;
        if (rc != 0 && store_holds(s, it)) {
            it->held = true;
            if (held_last)
                held_last->next = it;
            else
                held = it;
            held_last = it;
            held_n++;
        } else {
            if (rc != 0 && !it->done && !it->invalid) lost++;
            *report_tail = it;
            report_tail = &it->next;
        }
    }
    if (lost > 0) {
        fprintf(stderr, "audit: %zu held record(s) lost: the store still failed at shutdown\n",
                lost);
        s->shutdown_failed = true;
    }
    size_t unwaited_done = 0;
    for (struct audit_item *it = report; it; it = it->next)
        unwaited_done += !it->done;

    pthread_mutex_lock(&s->lock);
    s->unwaited -= unwaited_done;
    /* The store cannot write now: whoever waits in the queue behind what is held hears so
     * at once (fail closed) instead of waiting for the store to heal. */
    struct audit_item *refused = NULL, **refused_tail = &refused;
    if (rc != 0) {
        struct audit_item **pp = &s->q_head, *last = NULL;
        while (*pp) {
            struct audit_item *it = *pp;
            if (!it->done) {
                last = it;
                pp = &it->next;
                continue;
            }
            *pp = it->next;
            it->next = NULL;
            it->rc = PEP_EDB;
            *refused_tail = it;
            refused_tail = &it->next;
            s->q_len--;
            s->q_waiting--;
        }
        s->q_tail = last;
    }
    s->stats.batches++;
    s->stats.records_written += (int64_t)written;
    s->stats.failures += (int64_t)(n - written - held_n);
    s->stats.head_seq = s->head_seq;
    s->stats.failing = rc != 0;
    s->stats.commit_us_total += commit_us;
    if (held) { /* back in front of everything queued meanwhile */
        held_last->next = s->q_head;
        if (!s->q_head) s->q_tail = held_last;
        s->q_head = held;
        s->q_len += held_n;
    }
    s->held = s->held - were_held + held_n;
    s->stats.held = s->held;
    pthread_mutex_unlock(&s->lock);

    if (rc == 0 && s->batch_observe) s->batch_observe(s->batch_observe_arg, written, commit_us);
    *report_tail = refused;
    /* Queue order is seq order: written items got increasing seqs. */
    while (report) {
        struct audit_item *next = report->next;
        if (report->done) report->done(report->done_arg, report->rc, report->seq);
        store_item_free(report);
        report = next;
    }
    return rc;
}

/* The closing checkpoint at the head, in its own transaction. */
static void store_final_checkpoint(struct audit_store *s) {
    if (s->checkpoint_every <= 0 || !s->checkpoint_sign || s->head_seq == 0 || s->head_checkpointed)
        return;
    bool made = false;
    int rc = store_step(s->st_begin);
    if (rc == SQLITE_OK) rc = store_checkpoint(s, s->head_seq, s->head_hash, &made);
    if (rc == SQLITE_OK) rc = store_step(s->st_commit);
    if (rc != SQLITE_OK) {
        fprintf(stderr, "audit: final checkpoint at seq %lld failed: %s\n", (long long)s->head_seq,
                sqlite3_errmsg(s->db));
        if (!sqlite3_get_autocommit(s->db)) store_step(s->st_rollback);
        s->shutdown_failed = true;
        return;
    }
    s->head_checkpointed = made;
}

/* Between transactions (synchronous cannot change inside one).  A failed PRAGMA leaves the
 * stricter setting in force when it was full, and is logged. */
static void store_apply_retune(struct audit_store *s, bool full, int64_t checkpoint_every) {
    if (sqlite3_exec(s->db, full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL", NULL,
                     NULL, NULL) != SQLITE_OK)
        fprintf(stderr, "audit: durability %s could not be applied: %s\n", full ? "full" : "normal",
                sqlite3_errmsg(s->db));
    if (s->checkpoint_sign) s->checkpoint_every = checkpoint_every;
}

/* After a failed batch that held records: waits AUDIT_RETRY_US before trying again, unless
 * an item someone waits for arrives (it deserves its answer, success or refusal, now).
 * Called with s->lock held. */
static void store_pause_before_retry(struct audit_store *s) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    int64_t ns = until.tv_nsec + AUDIT_RETRY_US * 1000LL;
    until.tv_sec += ns / 1000000000;
    until.tv_nsec = ns % 1000000000;
    size_t waiting = s->q_waiting;
    while (s->q_waiting == waiting && pthread_cond_timedwait(&s->cond, &s->lock, &until) == 0)
        ;
}

static void *store_writer_main(void *arg) {
    struct audit_store *s = arg;
    bool retry = false;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        if (retry) store_pause_before_retry(s);
        while (!s->q_head && !s->closing)
            pthread_cond_wait(&s->cond, &s->lock);
        if (!s->q_head) { /* closing and drained */
            pthread_mutex_unlock(&s->lock);
            break;
        }
        /* Nobody waits on what is queued (outcome records): let it linger briefly so that
         * it shares the fsync of the next decision instead of costing one of its own — at
         * low load that halves the fsyncs per request.  A waiting item ends the linger. */
        if (s->q_waiting == 0 && s->linger_us > 0 && !s->closing) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            int64_t ns = until.tv_nsec + s->linger_us * 1000;
            until.tv_sec += ns / 1000000000;
            until.tv_nsec = ns % 1000000000;
            while (s->q_waiting == 0 && !s->closing && s->q_len < s->max_batch &&
                   pthread_cond_timedwait(&s->cond, &s->lock, &until) == 0)
                ;
        }
        struct audit_item *batch = s->q_head, *last = batch;
        size_t n = 1;
        size_t waiting = batch->done ? 1 : 0;
        while (n < s->max_batch && last->next) {
            last = last->next;
            n++;
            waiting += last->done ? 1 : 0;
        }
        s->q_waiting -= waiting;
        s->q_head = last->next;
        if (!s->q_head) s->q_tail = NULL;
        last->next = NULL;
        s->q_len -= n;
        bool retune = s->retune, retune_full = s->retune_full;
        int64_t retune_every = s->retune_checkpoint_every;
        s->retune = false;
        pthread_mutex_unlock(&s->lock);
        if (retune) store_apply_retune(s, retune_full, retune_every);
        retry = store_run_batch(s, batch, n) != 0 && s->held > 0;
    }
    store_final_checkpoint(s);
    pthread_mutex_lock(&s->lock);
    s->stopped = true;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Creates the file with mode 0600 if it does not exist; SQLite gives -wal and -shm the
 * database file's mode.  SECURITY: audit records name agents, tenants and actions; other
 * local users have no business reading them. */
static int store_precreate(const char *path, struct pep_err *err) {
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return pep_err_set(err, PEP_EIO, "audit: cannot open %s: %s", path, strerror(errno));
    close(fd);
    return 0;
}

static void store_free(struct audit_store *s) {
    store_finalize_all(s);
    if (s->db && sqlite3_close(s->db) != SQLITE_OK) {
        /* A statement another module prepared on this connection was not finalized. */
        fprintf(stderr, "audit: close: %s\n", sqlite3_errmsg(s->db));
        sqlite3_close_v2(s->db);
    }
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->path);
    free(s);
}

int audit_open(const char *path, const struct audit_options *opt, struct audit_store **out,
               struct pep_err *err) {
    static const struct audit_options defaults = {.durability_full = true};
    struct audit_store *s = NULL;
    int rc = 0;
    *out = NULL;
    if (!opt) opt = &defaults;
    if (!path || !*path) return pep_err_set(err, PEP_EINVAL, "audit: no database path");

    s = calloc(1, sizeof(*s));
    if (!s) return pep_err_set(err, PEP_ENOMEM, "audit: out of memory");
    if (pthread_mutex_init(&s->lock, NULL) != 0) {
        free(s);
        return pep_err_set(err, PEP_ENOMEM, "audit: cannot create a mutex");
    }
    if (pthread_cond_init(&s->cond, NULL) != 0) {
        pthread_mutex_destroy(&s->lock);
        free(s);
        return pep_err_set(err, PEP_ENOMEM, "audit: cannot create a condition variable");
    }
    s->path = strdup(path);
    if (!s->path) {
        rc = pep_err_set(err, PEP_ENOMEM, "audit: out of memory");
        goto out;
    }
    s->max_batch = opt->max_batch ? opt->max_batch : AUDIT_DEFAULT_MAX_BATCH;
    s->max_queue = opt->max_queue ? opt->max_queue : AUDIT_DEFAULT_MAX_QUEUE;
    s->linger_us = opt->linger_us < 0 ? 0
                   : opt->linger_us   ? opt->linger_us
                                      : AUDIT_DEFAULT_LINGER_US;
    s->checkpoint_every = opt->checkpoint_sign ? opt->checkpoint_every : 0;
    s->checkpoint_sign = opt->checkpoint_sign;
    s->checkpoint_arg = opt->checkpoint_arg;
    s->batch_observe = opt->batch_observe;
    s->batch_observe_arg = opt->batch_observe_arg;

    if ((rc = store_precreate(path, err)) != 0) goto out;
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, opt->vfs) !=
        SQLITE_OK) {
        rc = pep_err_set(err, PEP_EDB, "audit: cannot open %s: %s", path,
                         s->db ? sqlite3_errmsg(s->db) : "out of memory");
        goto out;
    }
    sqlite3_extended_result_codes(s->db, 1);
    if ((rc = store_setup_db(s, opt, err)) != 0) goto out;
    if (store_prepare_all(s) != 0) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", path, sqlite3_errmsg(s->db));
        goto out;
    }
    if ((rc = store_read_head(s, err)) != 0) goto out;

    /* The promise of SPEC 8: a broken store is reported and kept, not refused. */
    struct audit_verify_result vr;
    int vrc = audit_verify_db(s->db, &vr);
    if (vrc != 0) {
        rc = pep_err_set(err, vrc, "audit: %s: cannot verify: %s", path, vr.reason);
        goto out;
    }
    if (!vr.ok)
        fprintf(stderr, "audit: chain broken at seq %lld: %s\n", (long long)vr.first_bad_seq,
                vr.reason);
    s->stats.head_seq = s->head_seq;

    /* The writer takes no signals: they belong to the main thread (SIGTERM drain). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int trc = pthread_create(&s->thread, NULL, store_writer_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (trc != 0) {
        rc = pep_err_set(err, PEP_ENOMEM, "audit: cannot start the writer: %s", strerror(trc));
        goto out;
    }
    pthread_setname_np(s->thread, "pep-audit");
    s->thread_started = true;
out:
    if (rc) {
        store_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int audit_shutdown(struct audit_store *s) {
    if (!s) return 0;
    pthread_mutex_lock(&s->lock);
    s->closing = true;
    pthread_cond_broadcast(&s->cond);
    bool join = s->thread_started && !s->join_claimed;
    s->join_claimed = true;
    /* Every caller returns only after the drain, whoever joins. */
    while (s->thread_started && !s->stopped)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
    if (join) pthread_join(s->thread, NULL);
    return s->shutdown_failed ? PEP_EDB : 0;
}

/* The triggers of audit_schema_sql (checked by name: they are what keeps the tables
 * append-only against mistakes). */
static const char *const audit_triggers[] = {
    "audit_no_update",       "audit_no_delete",       "audit_insert_guard",
    "checkpoints_no_update", "checkpoints_no_delete", "checkpoints_insert_guard",
};

int audit_inspect(const char *path, struct audit_inspection *out, struct pep_err *err) {
    memset(out, 0, sizeof *out);
    struct stat st;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT) return 0; /* AUDIT_STORE_MISSING */
        return pep_err_set(err, PEP_EIO, "audit: %s: %s", path, strerror(errno));
    }
    if (st.st_size == 0) {
        out->state = AUDIT_STORE_EMPTY;
        return 0;
    }
    sqlite3 *db = NULL;
    sqlite3_stmt *q = NULL;
    int rc = 0;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", path, db ? sqlite3_errmsg(db) : "?");
        goto out;
    }
    /* Not a database at all: SQLite says so on the first read (SQLITE_NOTADB). */
    out->state = AUDIT_STORE_FOREIGN;
    int tables = 0, audit_columns = 0;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM sqlite_master WHERE type = 'table'", -1, &q,
                           NULL) != SQLITE_OK ||
        sqlite3_step(q) != SQLITE_ROW)
        goto out;
    tables = sqlite3_column_int(q, 0);
    sqlite3_finalize(q);
    q = NULL;
    if (tables == 0) {
        out->state = AUDIT_STORE_EMPTY;
        goto out;
    }
    if (sqlite3_prepare_v2(db,
                           "SELECT count(*) FROM pragma_table_info('audit')"
                           " WHERE name IN ('seq', 'record', 'prev_hash', 'hash')",
                           -1, &q, NULL) != SQLITE_OK ||
        sqlite3_step(q) != SQLITE_ROW)
        goto out;
    audit_columns = sqlite3_column_int(q, 0);
    sqlite3_finalize(q);
    q = NULL;
    if (audit_columns != 4) goto out;
    out->state = AUDIT_STORE_PEP;
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM audit", -1, &q, NULL) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW)
        out->records = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    q = NULL;
    if (sqlite3_prepare_v2(db, "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                           -1, &q, NULL) != SQLITE_OK) {
        rc = pep_err_set(err, PEP_EDB, "audit: %s: %s", path, sqlite3_errmsg(db));
        goto out;
    }
    for (size_t i = 0; i < PEP_ARRAY_LEN(audit_triggers); i++) {
        sqlite3_bind_text(q, 1, audit_triggers[i], -1, SQLITE_STATIC);
        if (sqlite3_step(q) != SQLITE_ROW) {
            size_t n = strlen(out->missing_triggers);
            snprintf(out->missing_triggers + n, sizeof out->missing_triggers - n, "%s%s",
                     n ? ", " : "", audit_triggers[i]);
        }
        sqlite3_reset(q);
    }
out:
    sqlite3_finalize(q);
    sqlite3_close(db);
    return rc;
}

void audit_close(struct audit_store *s) {
    if (!s) return;
    audit_shutdown(s);
    store_free(s);
}

/* The offset of the value of the top-level "seq" member in text, the canonical text of
 * an object, or -1.  The scan follows strings (and their escapes) and nesting, so a "seq"
 * inside a string or a nested object is never taken for it: at depth 1 and outside a
 * string, a '"' that follows '{' or ',' opens a key. */
static long store_find_seq(const char *text) {
    int depth = 0;
    bool in_string = false;
    for (size_t i = 0; text[i]; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\' && text[i + 1])
                i++; /* the escaped character; \uXXXX digits are harmless */
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            if (depth == 1 && (text[i - 1] == '{' || text[i - 1] == ',') &&
                strncmp(text + i, "\"seq\":", 6) == 0)
                return (long)(i + 6);
            in_string = true;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    return -1;
}

/* Renders record (which it modifies: "seq" is set to 0) into it->text and it->seq_at.
 * Returns false when the record has no canonical form. */
static bool store_render(struct audit_item *it, json_t *record) {
    if (json_object_set_new(record, "seq", json_integer(0)) != 0) return false;
    it->text = audit_canonical_json(record);
    if (!it->text) return false;
    long at = store_find_seq(it->text);
    if (at < 0 || it->text[at] != '0') return false; /* cannot happen: jansson wrote it */
    it->seq_at = (size_t)at;
    return true;
}

static int store_submit(struct audit_store *s, json_t *record, audit_apply_fn apply,
                        void *apply_arg, void (*apply_arg_free)(void *), audit_done_fn done,
                        void *done_arg) {
    if (!json_is_object(record)) {
        json_decref(record);
        if (apply_arg_free) apply_arg_free(apply_arg);
        return PEP_EINVAL;
    }
    struct audit_item *it = calloc(1, sizeof(*it));
    if (!it) {
        json_decref(record);
        if (apply_arg_free) apply_arg_free(apply_arg);
        return PEP_EUNAVAILABLE;
    }
    *it = (struct audit_item){.apply = apply,
                              .apply_arg = apply_arg,
                              .apply_arg_free = apply_arg_free,
                              .done = done,
                              .done_arg = done_arg};
    /* The serial writer's work is done here, on the caller's thread, in parallel.  A record
     * with no canonical form (a real, a bad key …) is invalid and fails alone. */
    it->invalid = !store_render(it, record);
    for (size_t i = 0; !it->invalid && i < AUDIT_COPY_FIELDS; i++) {
        const char *v = json_string_value(json_object_get(record, audit_copy_fields[i]));
        if (v && !(it->copies[i] = strdup(v))) it->invalid = true;
    }
    json_decref(record);
    if (it->invalid) {
        free(it->text);
        it->text = strdup("");
    }
    if (!it->text) {
        store_item_free(it);
        return PEP_EUNAVAILABLE;
    }
    pthread_mutex_lock(&s->lock);
    /* Fire-and-forget items record what has happened: only closing refuses them. */
    int refuse = s->closing                      ? PEP_EUNAVAILABLE
                 : !done                         ? 0
                 : s->unwaited >= AUDIT_MAX_HELD ? PEP_EBACKLOG
                 : s->q_len >= s->max_queue      ? PEP_EUNAVAILABLE
                                                 : 0;
    if (refuse) {
        pthread_mutex_unlock(&s->lock);
        store_item_free(it);
        return refuse;
    }
    if (s->q_tail)
        s->q_tail->next = it;
    else
        s->q_head = it;
    s->q_tail = it;
    s->q_len++;
    if (done)
        s->q_waiting++;
    else
        s->unwaited++;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int audit_submit(struct audit_store *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                 audit_done_fn done, void *done_arg) {
    return store_submit(s, record, apply, apply_arg, NULL, done, done_arg);
}

int audit_submit_owned(struct audit_store *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                       void (*apply_arg_free)(void *)) {
    return store_submit(s, record, apply, apply_arg, apply_arg_free, NULL, NULL);
}

void audit_retune(struct audit_store *s, bool durability_full, int64_t checkpoint_every) {
    pthread_mutex_lock(&s->lock);
    s->retune = true;
    s->retune_full = durability_full;
    s->retune_checkpoint_every = checkpoint_every;
    pthread_mutex_unlock(&s->lock);
}

void audit_get_stats(struct audit_store *s, struct audit_stats *out) {
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    out->queued = s->q_len;
    pthread_mutex_unlock(&s->lock);
}

int64_t audit_head_seq(struct audit_store *s) {
    pthread_mutex_lock(&s->lock);
    int64_t seq = s->stats.head_seq;
    pthread_mutex_unlock(&s->lock);
    return seq;
}

const char *audit_path(struct audit_store *s) {
    return s->path;
}
