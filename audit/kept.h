/*
 * kept.h — signed checkpoints kept off the machine (SPEC 1 `pepctl audit checkpoint` and
 * `pepctl audit verify --checkpoint`, 6.4, 8).
 *
 * The store's own checkpoints live in the file they vouch for: whoever rewrites the whole
 * database with a key made for the forgery rewrites its checkpoints too, and the walk
 * holds.  A checkpoint copied elsewhere (the JSON GET /admin/v1/audit/checkpoints/latest
 * answers, saved by `pepctl audit checkpoint --out FILE`) does not move with it: its JWT
 * is signed by pep's key of the day, and its claims name a seq and the chain's hash there.
 * A chain it is in holds that hash at that seq; a rewritten one does not, or the kept
 * JWT's key is not among the rewritten store's keys.
 *
 * Threads: any thread, on a connection that thread owns.  Never writes.
 */
#ifndef PEP_AUDIT_KEPT_H
#define PEP_AUDIT_KEPT_H

#include "audit/audit.h"

/* A checkpoint as GET /admin/v1/audit/checkpoints/latest answers it. */
struct audit_kept {
    int64_t seq;   /* "seq", ≥ 1 */
    char hash[65]; /* "hash": 64 lowercase hex digits */
    char *jwt;     /* "jwt", malloc'd (audit_kept_clear) */
};

/* Reads a kept checkpoint from its JSON text: an object with an integer "seq" ≥ 1, a
 * "hash" of 64 hex digits (any case; kept lowercase) and a string "jwt".  Returns 0, or
 * PEP_EINVAL with why filled (out holds nothing then), or PEP_ENOMEM. */
int audit_kept_parse(const char *text, size_t len, struct audit_kept *out, char *why,
                     size_t why_len);
void audit_kept_clear(struct audit_kept *kc);

/*
 * Whether kc is in the chain of db, as `walk` (an audit_verify_db* result on the same
 * snapshot) found it: its JWT signed by a key the caller trusts (check, as for the store's
 * checkpoints: token_check_checkpoint over the keys), its claims "seq" and "hash" those of
 * the file and "iat" an integer (SPEC 6.4), and the chain holding that hash at that seq
 * (the seq within the part of the chain the walk found good).  Returns 0 when it holds; 1
 * when not, with *bad_seq and why ("signed by an unknown key", "the chain's hash at seq N
 * differs" …): the checkpoint's seq; or the walk's head + 1 when the chain ends before it
 * (records cut off); or the walk's first bad seq when the chain breaks before it.  A
 * negative code when the database cannot be read.
 */
int audit_kept_check(sqlite3 *db, const struct audit_verify_result *walk,
                     audit_checkpoint_check_fn check, void *check_arg, const struct audit_kept *kc,
                     int64_t *bad_seq, char *why, size_t why_len);

/* The hash column of the audit row of seq: 0, PEP_ENOTFOUND (no such row, or not 32
 * bytes), or PEP_EDB.  Only a walk that found the chain good up to seq makes it the
 * chain's hash. */
int audit_row_hash(sqlite3 *db, int64_t seq, uint8_t out[32]);

#endif
