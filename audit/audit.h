/*
 * audit.h — the append-only, hash-chained audit store (SPEC 6.1, 6.2, 6.5).
 *
 * One writer thread owns every SQLite write (DESIGN rule 2).  Other threads hand it
 * records with audit_submit(); it takes everything queued, writes it in one
 * `BEGIN IMMEDIATE … COMMIT` (with `durability: full`, synchronous=FULL: one fsync per
 * batch — group commit), and only then calls each item's completion callback, in seq
 * order, on the writer thread.  A request waiting for its decision record is suspended
 * and is resumed from that callback.
 *
 * Chain invariants: seq is 1, 2, 3 … with no gap; record is the canonical JSON of the
 * record object (keys sorted bytewise, no insignificant whitespace, `seq` included);
 * prev_hash of seq 1 is 32 zero bytes; hash = SHA-256(prev_hash || record).  Triggers
 * abort UPDATE and DELETE on the audit table; recursive_triggers is on for every
 * connection so that REPLACE cannot bypass them.  Reopening a database continues the
 * chain from its last row.
 *
 * State that must agree with the log (agents, tokens, revocations, later approvals …)
 * is written by an item's `apply` callback inside the same transaction as its record.
 *
 * Threads: audit_submit / audit_stats may be called from any thread.  Callbacks run on the
 * writer thread and must not block (they resume a connection, update memory, return).
 */
#ifndef PEP_AUDIT_H
#define PEP_AUDIT_H

#include "pep/common.h"

#include <jansson.h>
#include <sqlite3.h>

struct audit_store;

/* Called on the writer thread after the batch holding the item committed (rc == 0, seq is
 * the record's seq) or failed (rc < 0, seq == 0: nothing of the item was written). */
typedef void (*audit_done_fn)(void *arg, int rc, int64_t seq);

/* Called on the writer thread inside the batch transaction, before the item's record is
 * inserted.  Returns 0, or a negative code to fail this item alone (its changes are rolled
 * back to a savepoint; the rest of the batch commits). */
typedef int (*audit_apply_fn)(sqlite3 *db, void *arg);

struct audit_options {
    bool durability_full;     /* synchronous=FULL (fsync per batch) vs NORMAL (WAL, no fsync) */
    size_t max_batch;         /* records per transaction; 0 → 1024 */
    size_t max_queue;         /* queued items before audit_submit refuses; 0 → 65536 */
    const char *schema_extra; /* optional SQL run once at open (other modules' tables) */
    /* Signed checkpoints (SPEC 6.4): every `checkpoint_every` records and at close, call
     * checkpoint_sign(seq, hash) on the writer thread and store the JWT it returns (a
     * malloc'd string the store frees).  NULL or 0 disables checkpoints. */
    int64_t checkpoint_every;
    char *(*checkpoint_sign)(void *arg, int64_t seq, const uint8_t hash[32]);
    void *checkpoint_arg;
    /* Optional observer, called on the writer thread after every committed batch with the
     * number of records written and the time COMMIT took (the fsync with durability full),
     * for the pep_audit_batch_records / pep_audit_fsync_duration_seconds metrics. */
    /* Longest wait, in microseconds, of queued items nobody waits for (no done callback)
     * before they are committed on their own: they share the next waited item's fsync
     * when one comes sooner.  0 → AUDIT_DEFAULT_LINGER_US; negative → no lingering. */
    int64_t linger_us;
    void (*batch_observe)(void *arg, size_t records, int64_t commit_us);
    void *batch_observe_arg;
    /* SQLite VFS name to open the database with; NULL = the default.  Tests only
     * (AUDIT_FAULT_VFS); production never sets it. */
    const char *vfs;
};

/*
 * Opens (creating if needed) the database at path, sets WAL, installs the schema and the
 * triggers, reads the chain head and starts the writer thread.  On a store whose chain
 * does not verify, logs the first bad seq and keeps appending (SPEC 8) — the verification
 * walks the whole chain, so opening a large store takes time proportional to its size.
 * opt may be NULL (durability full, defaults elsewhere).  The file is created mode 0600.
 * Returns 0 and *out, or a negative code with err filled.
 */
int audit_open(const char *path, const struct audit_options *opt, struct audit_store **out,
               struct pep_err *err);

/* Drains the queue (every item already submitted is written or failed), writes a final
 * checkpoint, stops the writer and closes the database.  Call it once, from a thread other
 * than the writer (never from a callback).  NULL is a no-op. */
void audit_close(struct audit_store *s);

/* The first half of audit_close: stops accepting (audit_submit → PEP_EUNAVAILABLE), drains
 * the queue, writes the final checkpoint and joins the writer, but keeps the store
 * allocated so that threads still holding it get a clean refusal, and audit_get_stats /
 * audit_head_seq still answer.  Idempotent; audit_close calls it. */
int audit_shutdown(struct audit_store *s);
/* (audit_shutdown returns 0, or PEP_EDB when a held record could not be written before the
 * writer stopped or the final checkpoint failed: a shutdown that lost something says so.) */

/* What a file at a store's path is, looked at read-only before audit_open would create
 * anything (SPEC 1: pep never silently starts over). */
enum audit_store_state {
    AUDIT_STORE_MISSING, /* no such file */
    AUDIT_STORE_EMPTY,   /* 0 bytes, or an SQLite database without any table */
    AUDIT_STORE_PEP,     /* an `audit` table with pep's columns */
    AUDIT_STORE_FOREIGN, /* not SQLite, or SQLite without pep's audit table */
};

struct audit_inspection {
    enum audit_store_state state;
    int64_t records;            /* AUDIT_STORE_PEP: rows in `audit` */
    char missing_triggers[256]; /* AUDIT_STORE_PEP: names of pep's triggers absent, comma-
                                   separated ("" when all are there) */
};

/* Looks at path without changing it.  Returns 0 and *out, or PEP_EIO/PEP_EDB with err
 * (the file exists but cannot be read). */
int audit_inspect(const char *path, struct audit_inspection *out, struct pep_err *err);

/* Seq of the last record written (0 for an empty store).  Any thread. */
int64_t audit_head_seq(struct audit_store *s);

/* The path the store was opened with (owned by the store).  Any thread. */
const char *audit_path(struct audit_store *s);

/*
 * Queues one item.  `record` is a JSON object without `seq` (the writer adds it); its
 * reference is stolen in every case.  `apply` may be NULL.  `done` may be NULL (fire and
 * forget, e.g. outcome records).  Returns 0, or PEP_EUNAVAILABLE when the store is closed
 * or the queue is full, PEP_EBACKLOG when AUDIT_MAX_HELD records are held back (see
 * below), or PEP_EINVAL when record is not a JSON object — then no callback will run.
 *
 * SPEC 6.5, nothing dropped while pep runs: a fire-and-forget item records something that
 * has happened (an upstream call, an ended window), so when its batch fails it is not
 * failed but held, in queue order, and written as soon as the store accepts writes
 * again; the queue bound does not refuse it.  Items someone waits for (decisions, admin
 * changes) fail with their batch, and so does every such item queued behind held ones
 * when a batch fails: their caller refuses what they record at once.  While AUDIT_MAX_HELD
 * or more fire-and-forget records are not yet written, items with a waiter are refused
 * with PEP_EBACKLOG, so that nothing new is decided whose outcome could not be kept.  Held
 * records that still cannot be written when the store is shut down are reported on
 * stderr (their count) and lost: the process is exiting.  From the call on the store owns the
 * record alone (it adds `seq` to it on the writer thread): the caller must not keep and read
 * another reference. A record that has no canonical form (see audit_canonical_json: a real number,
 * invalid UTF-8 …) fails alone: done(arg, PEP_EINVAL, 0), its apply never runs. `apply` must not
 * BEGIN/COMMIT: it runs inside a SAVEPOINT of the batch transaction.
 */
int audit_submit(struct audit_store *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                 audit_done_fn done, void *done_arg);

/* A fire-and-forget item (no done callback) whose apply_arg the store owns: apply_arg_free
 * frees it once the item is written, or dropped (refused here, or lost at shutdown) — so
 * a state change can ride on a record nobody waits for (an outcome storing an idempotent
 * result).  Returns as audit_submit. */
int audit_submit_owned(struct audit_store *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                       void (*apply_arg_free)(void *));

#define AUDIT_MAX_HELD 65536

/* Deepest nesting a record may have (the record object itself is depth 1). */
#define AUDIT_MAX_DEPTH 32

/* Canonical JSON of a record: jansson's json_dumps(JSON_SORT_KEYS | JSON_COMPACT) — keys
 * sorted bytewise (memcmp of the UTF-8 bytes), no whitespace, UTF-8 kept as is, '/' not
 * escaped, only '"', '\\' and control characters escaped (\b \f \n \r \t, others \u00XX
 * with uppercase hex: \u001F).
 * Records hold no real numbers (their text form is not portable): a record containing one
 * has no canonical form.  Returns a malloc'd string the caller frees with free(), or NULL
 * (not an object, a real, invalid UTF-8, U+0000 in a key, deeper than AUDIT_MAX_DEPTH,
 * or ENOMEM). */
char *audit_canonical_json(const json_t *record);

/* Hash of one link: SHA-256(prev_hash || record bytes).  Returns 0, or PEP_ECRYPTO (out
 * zeroed) if OpenSSL fails.  (Was void; int is source-compatible for existing callers.) */
int audit_chain_hash(const uint8_t prev_hash[32], const char *record, size_t len, uint8_t out[32]);

struct audit_verify_result {
    bool ok;
    int64_t records;         /* rows walked */
    int64_t head_seq;        /* last good seq (0 for an empty store) */
    uint8_t head_hash[32];   /* hash of head_seq */
    int64_t first_bad_seq;   /* 0 when ok */
    int64_t checkpoints;     /* checkpoint rows found to match the chain */
    bool signatures_checked; /* a checker verified every checkpoint's JWT (see below) */
    char reason[160];        /* why first_bad_seq is bad: "missing row", "hash mismatch" … */
};

/*
 * Verifies one checkpoint JWT's signature for the walk.  audit/ holds no keys, so the
 * caller supplies this (pep: token_check_checkpoint over its keyring).  Returns NULL when
 * jwt is validly signed by a key the caller trusts, with *claims set to its payload object
 * (a new reference the walk releases); otherwise a short static reason ("signature
 * invalid", "signed by an unknown key" …) and *claims NULL.  It checks no claim: the walk
 * compares "seq" and "hash" with the checkpoint's row and the chain.  Called on the
 * walking thread, once per checkpoint that has a row.
 */
typedef const char *(*audit_checkpoint_check_fn)(void *arg, const char *jwt, json_t **claims);

/*
 * Walks the whole chain of the database at path (its own read-only connection; safe while
 * the writer runs, and usable offline on a copy) and reports the first bad seq.
 * Returns 0 when the walk ran (see res->ok), or a negative code when the file cannot be
 * read as an audit store.
 */
int audit_verify_file(const char *path, struct audit_verify_result *res, struct pep_err *err);

/* audit_verify_file, with every checkpoint's JWT checked by check (see audit_verify_db). */
int audit_verify_file_checked(const char *path, audit_checkpoint_check_fn check, void *check_arg,
                              struct audit_verify_result *res, struct pep_err *err);

/* Read transactions of a walk end after this many rows or this long, whichever is first:
 * a reader holds back the writer's WAL checkpoints only while its transaction lasts. */
#define AUDIT_VERIFY_CHUNK_ROWS 4096
#define AUDIT_VERIFY_CHUNK_US 50000

/* How a walk runs; a zeroed struct is audit_verify_db's walk. */
struct audit_verify_options {
    audit_checkpoint_check_fn check; /* checks every checkpoint's JWT; NULL: not checked */
    void *check_arg;
    int64_t chunk_rows; /* most rows per read transaction; <= 0: AUDIT_VERIFY_CHUNK_ROWS */
    int64_t chunk_us;   /* a read transaction ends after this long; <= 0: AUDIT_VERIFY_CHUNK_US */
    /* Called between two read transactions (outside both, so the writer may checkpoint
     * the WAL meanwhile), on the walking thread; false stops the walk, which then returns
     * PEP_ECLOSED.  NULL: never stops. */
    bool (*pause)(void *arg);
    void *pause_arg;
};

/*
 * The walk itself, on an open connection (a reader, or the writer's before its thread
 * starts).  Checks, row by row in seq order: seq = previous + 1 from 1 ("missing row"
 * names the missing seq); prev_hash = previous hash (zeros for seq 1); hash =
 * SHA-256(prev_hash || record); the record parses as a JSON object whose "seq" is the
 * row's seq; the record is canonical (re-dumping it gives the same bytes).  Every
 * checkpoint row must match the hash of the row of its seq, and no checkpoint may lie
 * beyond the last row ("truncated: checkpoint at seq N", first_bad_seq = head + 1).
 * Checkpoint JWT signatures are not checked (res->signatures_checked false): see
 * audit_verify_db_checked.
 * On a connection outside any transaction the walk reads in bounded read transactions
 * (audit_verify_options) up to the head of the first one, so that it never holds back
 * the WAL for long: rows appended meanwhile are not walked, and the result is that of
 * the chain as it stood when the walk began (the table is append-only; a row of that
 * range gone before the walk reached it is reported "missing row").
 * Inside a transaction the caller holds, it walks that snapshot in one pass.
 * Returns 0 when the walk ran (see res->ok), PEP_EINVAL when db is not an audit store, or
 * PEP_EDB when SQLite fails during the walk (res->reason says why).
 */
int audit_verify_db(sqlite3 *db, struct audit_verify_result *res);

/*
 * audit_verify_db, and the checkpoints' JWTs too (SPEC 6.4): the hash column of a
 * checkpoint row is only a copy anyone with the file can rewrite, the signed JWT is the
 * evidence.  For every checkpoint whose row exists, check must accept the JWT's signature
 * and its claims must say "seq" = the checkpoint's seq (an integer) and "hash" = the
 * lowercase hex of the chain's hash at that seq; otherwise res is bad at that seq, with a
 * reason "checkpoint at seq N: signature invalid" (check's reason), "…: jwt seq differs"
 * or "…: jwt hash differs".  check NULL = audit_verify_db.  res->signatures_checked says
 * whether check was given.
 */
int audit_verify_db_checked(sqlite3 *db, audit_checkpoint_check_fn check, void *check_arg,
                            struct audit_verify_result *res);

/* audit_verify_db with options: JWT checks, chunk bounds, and a pause between chunks that
 * may cancel the walk (then PEP_ECLOSED, res->reason "cancelled", res not a result). */
int audit_verify_db_opts(sqlite3 *db, const struct audit_verify_options *opt,
                         struct audit_verify_result *res);

/* audit_verify_file with options (see audit_verify_db_opts). */
int audit_verify_file_opts(const char *path, const struct audit_verify_options *opt,
                           struct audit_verify_result *res, struct pep_err *err);

/* The SPEC 5 answer of GET /admin/v1/audit/verify for res: {ok, records, head_seq,
 * head_hash, checkpoints_signed} plus first_bad_seq and reason when not ok (new
 * reference, NULL when memory ran out).  One shape for the API and pepctl --db. */
json_t *audit_verify_result_json(const struct audit_verify_result *res);

/* The checkpoint of the highest seq: 0 and *seq, hash and (if jwt is not NULL) a malloc'd
 * copy of the JWT the caller frees; PEP_ENOTFOUND when there is none; PEP_EDB. */
int audit_latest_checkpoint(sqlite3 *db, int64_t *seq, uint8_t hash[32], char **jwt);

#define AUDIT_DEFAULT_LINGER_US 2000

/* A reload's new durability and checkpoint interval: the writer applies them before the
 * next batch it writes (records already queued included).  Any thread. */
void audit_retune(struct audit_store *s, bool durability_full, int64_t checkpoint_every);

struct audit_stats {
    int64_t records_written; /* since open */
    int64_t batches;
    int64_t failures; /* items failed */
    int64_t head_seq;
    size_t queued;
    bool failing;            /* the last batch failed: the store cannot write now */
    size_t held;             /* records held back by failed batches, to be written (SPEC 6.5) */
    int64_t commit_us_total; /* time spent in COMMIT (the fsync), summed over batches */
};
void audit_get_stats(struct audit_store *s, struct audit_stats *out);

/* Opens a read-only connection to the store's database for queries (WAL readers). The
 * caller closes it with sqlite3_close. */
int audit_open_reader(const char *path, sqlite3 **out, struct pep_err *err);

/*
 * Fault injection, for tests only: a VFS named AUDIT_FAULT_VFS that wraps the default VFS
 * and, while a fault is set, fails every xWrite (AUDIT_FAULT_WRITE → SQLITE_IOERR_WRITE,
 * AUDIT_FAULT_FULL → SQLITE_FULL) or every xSync (AUDIT_FAULT_FSYNC → SQLITE_IOERR_FSYNC)
 * of every file opened through it.  Open a store with options.vfs = AUDIT_FAULT_VFS.
 * audit_fault_install is idempotent and returns 0 or PEP_EDB; audit_fault_set may be
 * called from any thread and applies to the next I/O call.
 */
#define AUDIT_FAULT_VFS "pep-faulty"
enum audit_fault { AUDIT_FAULT_NONE, AUDIT_FAULT_WRITE, AUDIT_FAULT_FSYNC, AUDIT_FAULT_FULL };
int audit_fault_install(void);
void audit_fault_set(enum audit_fault mode);

#endif
