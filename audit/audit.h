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
};

/*
 * Opens (creating if needed) the database at path, sets WAL, installs the schema and the
 * triggers, reads the chain head and starts the writer thread.  On a store whose chain
 * does not verify, logs the first bad seq and keeps appending (SPEC 8).
 * Returns 0 and *out, or a negative code with err filled.
 */
int audit_open(const char *path, const struct audit_options *opt, struct audit_store **out,
               struct pep_err *err);

/* Drains the queue (every item already submitted is written or failed), writes a final
 * checkpoint, stops the writer and closes the database. */
void audit_close(struct audit_store *s);

/*
 * Queues one item.  `record` is a JSON object without `seq` (the writer adds it); its
 * reference is stolen in every case.  `apply` may be NULL.  `done` may be NULL (fire and
 * forget, e.g. outcome records).  Returns 0, or PEP_EUNAVAILABLE when the store is closed
 * or the queue is full — then no callback will run.
 */
int audit_submit(struct audit_store *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                 audit_done_fn done, void *done_arg);

/* Canonical JSON of a record: keys sorted, compact, UTF-8 kept as is, '/' not escaped.
 * Returns a malloc'd string the caller frees, or NULL. */
char *audit_canonical_json(const json_t *record);

/* Hash of one link: SHA-256(prev_hash || record bytes). */
void audit_chain_hash(const uint8_t prev_hash[32], const char *record, size_t len,
                      uint8_t out[32]);

struct audit_verify_result {
    bool ok;
    int64_t records;        /* rows walked */
    int64_t head_seq;       /* last good seq (0 for an empty store) */
    uint8_t head_hash[32];  /* hash of head_seq */
    int64_t first_bad_seq;  /* 0 when ok */
    char reason[160];       /* why first_bad_seq is bad: "missing row", "hash mismatch" … */
};

/*
 * Walks the whole chain of the database at path (its own read-only connection; safe while
 * the writer runs, and usable offline on a copy) and reports the first bad seq.
 * Returns 0 when the walk ran (see res->ok), or a negative code when the file cannot be
 * read as an audit store.
 */
int audit_verify_file(const char *path, struct audit_verify_result *res, struct pep_err *err);

struct audit_stats {
    int64_t records_written;  /* since open */
    int64_t batches;
    int64_t failures;         /* items failed */
    int64_t head_seq;
    size_t queued;
};
void audit_get_stats(struct audit_store *s, struct audit_stats *out);

/* Opens a read-only connection to the store's database for queries (WAL readers). The
 * caller closes it with sqlite3_close. */
int audit_open_reader(const char *path, sqlite3 **out, struct pep_err *err);

#endif
