/*
 * idempotency.h — Idempotency-Key (SPEC 4.5): the first completed, relayed, non-streaming
 * answer to a request carrying a key is kept 24 h and given back to repeats of that request.
 *
 * A key belongs to one agent.  Its life: idem_lookup (after authentication and scope) →
 * idem_reserve (all checks passed, just before the decision is recorded) → either
 * idem_release (refused later, upstream failed, answer streamed, …) or idem_complete
 * (upstream answered and pep relayed it), whose struct idem_write the audit writer turns
 * into a row (idem_apply_store, in the outcome record's transaction: DESIGN rule 2).
 *
 * Where an entry lives:
 *   in flight   memory only, from reserve to release/complete.  A crash forgets it: the
 *               client's retry after a restart is forwarded again.
 *   recent      memory, from complete until its row is surely committed and visible to
 *               readers: at least IDEM_RECENT_US, then idem_sweep drops it.  Past
 *               IDEM_RECENT_MAX_BYTES the oldest are dropped once IDEM_RECENT_MIN_US old.
 *   stored      the `idempotency` table, read through this module's own read-only
 *               connections; a row whose expires_at_us <= now counts as absent, and
 *               idem_apply_expire deletes such rows in bounded batches.
 * Limits that follow (documented, not bugs): if the audit writer cannot commit for longer
 * than IDEM_RECENT_US, a repeat in that gap is forwarded again (and its own row then
 * conflicts: PEP_EEXISTS); an answer whose body exceeds IDEM_MAX_BODY, or whose header
 * bytes are not UTF-8 (they are stored as JSON text), is relayed but not stored: the key
 * is released, and the next request with it is forwarded.
 *
 * Threads: every function taking a struct idem_store may be called from any thread
 * (listener, forwarder, sweeper) except idem_open/idem_close.  `lock` guards the memory
 * map and is held only for map work (no I/O, no large copy).  Database reads take one of a
 * few reader connections, never under `lock`: a lookup that misses memory, and every
 * reserve, cost one primary-key read on the calling thread, which may wait up to
 * IDEM_BUSY_TIMEOUT_MS on a busy database.  idem_apply_* run on the audit writer thread,
 * inside its transaction, and touch no store.
 */
#ifndef PEP_IDEMPOTENCY_H
#define PEP_IDEMPOTENCY_H

#include "pep/common.h"
#include "pep/forward.h"

#include <sqlite3.h>

#define IDEM_MAX_KEY 255
#define IDEM_MAX_BODY (1024 * 1024)
#define IDEM_TTL_US (24LL * 3600 * 1000000)
/* Recent entries stay in memory at least this long after complete (their row is committed
 * long before, unless the writer is failing). */
#define IDEM_RECENT_US (30LL * 1000000)
/* Bytes of recent entries above which the oldest are dropped once IDEM_RECENT_MIN_US old. */
#define IDEM_RECENT_MAX_BYTES ((size_t)64 * 1024 * 1024)
#define IDEM_RECENT_MIN_US 1000000LL
/* Most rows one idem_apply_expire deletes (keeps the writer's transaction short). */
#define IDEM_EXPIRE_BATCH 10000
#define IDEM_BUSY_TIMEOUT_MS 100

/* True when key is a valid Idempotency-Key: 1-IDEM_MAX_KEY bytes of 0x21-0x7E, with space
 * (0x20) allowed only between them.  Otherwise the caller answers 400 bad_request. */
bool idem_key_valid(const char *key);

/* The table and its expiry index; append it to audit_options.schema_extra. */
extern const char IDEMPOTENCY_SCHEMA[];

/* A stored answer. */
struct idem_result {
    int status;
    struct forward_header *headers; /* relayed and pep-set headers, in order */
    size_t headers_len;
    char *body; /* body_len bytes (NULL allowed when 0 in idem_complete's input); in results
                   this module fills, NUL-terminated and never NULL */
    size_t body_len;
    char request_id[27];   /* the request whose answer this is */
    int64_t created_at_us; /* when it was completed; it expires IDEM_TTL_US later */
};

/* Frees what r holds (headers, body) and zeroes it.  NULL-safe. */
void idem_result_clear(struct idem_result *r);

struct idem_store;

/* Opens the store and its reader connections on the database at db_path, whose table the
 * audit writer already created (else PEP_EDB).  Returns 0 and *out, or a negative code
 * with err filled.  Call once, before any other thread uses the store. */
int idem_open(const char *db_path, struct idem_store **out, struct pep_err *err);
/* Frees everything; no other call may be running or follow.  idem_writes already handed
 * out stay valid (they hold their own references).  NULL is a no-op. */
void idem_close(struct idem_store *s);

enum idem_verdict {
    IDEM_NONE,        /* unknown key (lookup), or reserved (reserve): go on */
    IDEM_REPLAY,      /* same key, same fingerprint, completed: answer *replay with
                         Pep-Idempotent-Replay: true, do not forward */
    IDEM_MISMATCH,    /* same key, another fingerprint (in flight or completed): 422 */
    IDEM_IN_PROGRESS, /* same key and fingerprint, still in flight: 409 */
    IDEM_ERROR,       /* database read failed, memory ran out, or invalid arguments: 503 */
};

/*
 * What a request with (agent, key, fingerprint) should get now.  Memory first, then the
 * database.  On IDEM_REPLAY, *replay (zeroed by the call in every case) receives a deep
 * copy the caller frees with idem_result_clear.  fingerprint is request_fingerprint's hex
 * (64 characters); agent at most 256 bytes; key idem_key_valid — else IDEM_ERROR.
 * Reserves nothing: idem_reserve is the atomic step.
 */
enum idem_verdict idem_lookup(struct idem_store *s, const char *agent, const char *key,
                              const char *fingerprint, int64_t now_us, struct idem_result *replay);

/*
 * Takes the key for request_id (26-char id) if nobody holds it: IDEM_NONE = reserved.
 * Otherwise IDEM_IN_PROGRESS / IDEM_MISMATCH, or IDEM_REPLAY when a request with the same
 * fingerprint completed since idem_lookup (then *replay, if not NULL, is filled as by
 * idem_lookup; with NULL call idem_lookup for it), or IDEM_ERROR.  Atomic across threads.
 * Every IDEM_NONE must be followed by exactly one idem_release or idem_complete: an
 * abandoned reservation answers 409 to that key until restart.
 */
enum idem_verdict idem_reserve(struct idem_store *s, const char *agent, const char *key,
                               const char *fingerprint, const char *request_id, int64_t now_us,
                               struct idem_result *replay);

/* Frees the key reserved by request_id (a no-op when request_id does not hold it). */
void idem_release(struct idem_store *s, const char *agent, const char *key, const char *request_id);

/* A row for the audit writer to insert (idem_apply_store).  Independent of the store. */
struct idem_write;

/*
 * The reservation of request_id got an answer pep relayed: result (status, headers, body;
 * its request_id and created_at_us are ignored) is copied, kept in memory as a recent
 * entry (replays work at once) and returned as *write for the outcome record's apply.
 * The caller owns *write and frees it with idem_write_free once the record's fate is known.
 * Returns 0, or with *write NULL: PEP_EINVAL (body over IDEM_MAX_BODY, or a header not
 * UTF-8: not stored) or PEP_ENOMEM — the key is then released — or PEP_ENOTFOUND when
 * request_id holds no reservation of the key (nothing changes).
 */
int idem_complete(struct idem_store *s, const char *agent, const char *key, const char *request_id,
                  const struct idem_result *result, int64_t now_us, struct idem_write **write);

/* audit_apply_fn (writer thread, inside the transaction): deletes an expired row of the
 * same (agent, key) if one is left, then INSERTs this one.  write is a struct idem_write;
 * it is not freed (it may be applied again when its batch is retried).  Returns 0,
 * PEP_EEXISTS when a live row already holds the key, or PEP_EDB. */
int idem_apply_store(sqlite3 *db, void *write);
void idem_write_free(struct idem_write *w); /* NULL-safe */

/* Drops recent entries that are old enough (IDEM_RECENT_US, and the byte bound).  Call
 * periodically, e.g. every second. */
void idem_sweep(struct idem_store *s, int64_t now_us);

/* audit_apply_fn (writer thread, inside a `kind: system` record's transaction): deletes at
 * most IDEM_EXPIRE_BATCH rows whose expires_at_us <= *(const int64_t *)now_us (more may be
 * left for the next call).  Returns 0 or PEP_EDB. */
int idem_apply_expire(sqlite3 *db, void *now_us);

struct idem_stats {
    size_t in_flight, recent, recent_bytes;    /* now */
    uint64_t replays, mismatches, in_progress; /* verdicts given since open */
};
void idem_get_stats(struct idem_store *s, struct idem_stats *out);

#endif
