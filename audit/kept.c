/*
 * kept.c — checking a checkpoint kept off the machine against a walked chain.  See kept.h.
 *
 * The order of the checks follows what can be trusted: the JWT first (until its signature
 * holds, its claims are only someone's words), then the file against its own JWT (a file
 * whose "hash" was edited is not what pep signed), then the chain at the claimed seq, read
 * from the row's hash column — which the walk has recomputed from the records for every
 * seq up to its last good one, so for those it is the chain's hash.
 *
 * Threads: any thread, on a connection that thread owns.  Never writes.
 */
#include "audit/kept.h"

#include "pep/util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((format(printf, 3, 4))) static void kept_why(char *why, size_t why_len,
                                                           const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (why && why_len) vsnprintf(why, why_len, fmt, ap);
    va_end(ap);
}

void audit_kept_clear(struct audit_kept *kc) {
    free(kc->jwt);
    memset(kc, 0, sizeof *kc);
}

int audit_kept_parse(const char *text, size_t len, struct audit_kept *out, char *why,
                     size_t why_len) {
    json_error_t jerr;
    int rc = PEP_EINVAL;
    memset(out, 0, sizeof *out);
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(doc)) {
        kept_why(why, why_len, "not a JSON object%s%s", doc ? "" : ": ", doc ? "" : jerr.text);
        goto out;
    }
    json_t *seq = json_object_get(doc, "seq");
    const char *hash = json_string_value(json_object_get(doc, "hash"));
    const char *jwt = json_string_value(json_object_get(doc, "jwt"));
    uint8_t raw[32];
    if (!json_is_integer(seq) || json_integer_value(seq) < 1) {
        kept_why(why, why_len, "no integer \"seq\" of at least 1");
        goto out;
    }
    if (!hash || strlen(hash) != 64 || pep_unhex(hash, raw, sizeof raw) != 0) {
        kept_why(why, why_len, "no \"hash\" of 64 hex digits");
        goto out;
    }
    if (!jwt || !*jwt) {
        kept_why(why, why_len, "no string \"jwt\"");
        goto out;
    }
    out->jwt = strdup(jwt);
    if (!out->jwt) {
        rc = PEP_ENOMEM;
        kept_why(why, why_len, "out of memory");
        goto out;
    }
    out->seq = (int64_t)json_integer_value(seq);
    pep_hex(raw, sizeof raw, out->hash);
    rc = 0;
out:
    json_decref(doc);
    return rc;
}

int audit_row_hash(sqlite3 *db, int64_t seq, uint8_t out[32]) {
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    if (sqlite3_prepare_v2(db, "SELECT hash FROM audit WHERE seq = ?1", -1, &st, NULL) !=
            SQLITE_OK ||
        sqlite3_bind_int64(st, 1, seq) != SQLITE_OK)
        goto out;
    int step = sqlite3_step(st);
    if (step == SQLITE_DONE) {
        rc = PEP_ENOTFOUND;
    } else if (step == SQLITE_ROW) {
        if (sqlite3_column_type(st, 0) == SQLITE_BLOB && sqlite3_column_bytes(st, 0) == 32) {
            memcpy(out, sqlite3_column_blob(st, 0), 32);
            rc = 0;
        } else {
            rc = PEP_ENOTFOUND;
        }
    }
out:
    sqlite3_finalize(st);
    return rc;
}

int audit_kept_check(sqlite3 *db, const struct audit_verify_result *walk,
                     audit_checkpoint_check_fn check, void *check_arg, const struct audit_kept *kc,
                     int64_t *bad_seq, char *why, size_t why_len) {
    json_t *claims = NULL;
    int rc = 1;
    *bad_seq = kc->seq;
    const char *sig = check(check_arg, kc->jwt, &claims);
    if (sig) {
        kept_why(why, why_len, "%s", sig);
        goto out;
    }
    json_t *cseq = json_object_get(claims, "seq");
    const char *chash = json_string_value(json_object_get(claims, "hash"));
    if (!json_is_integer(cseq) || !chash || !json_is_integer(json_object_get(claims, "iat"))) {
        kept_why(why, why_len, "its jwt lacks the claims seq, hash and iat");
        goto out;
    }
    if (json_integer_value(cseq) != kc->seq || strcmp(chash, kc->hash) != 0) {
        kept_why(why, why_len, "its seq or hash is not what its jwt says");
        goto out;
    }
    /* The claims are pep's and the file's: now the chain. */
    if (!walk->ok && walk->first_bad_seq <= kc->seq) {
        *bad_seq = walk->first_bad_seq;
        kept_why(why, why_len, "the chain breaks at seq %lld, before its seq %lld",
                 (long long)walk->first_bad_seq, (long long)kc->seq);
        goto out;
    }
    if (kc->seq > walk->head_seq) {
        *bad_seq = walk->head_seq + 1;
        kept_why(why, why_len,
                 "the chain ends at seq %lld, before its seq %lld: records were cut off",
                 (long long)walk->head_seq, (long long)kc->seq);
        goto out;
    }
    uint8_t h[32];
    char hex[65];
    int hrc = audit_row_hash(db, kc->seq, h);
    if (hrc == PEP_EDB) {
        rc = PEP_EDB;
        kept_why(why, why_len, "database error: %s", sqlite3_errmsg(db));
        goto out;
    }
    if (hrc != 0) { /* walked as good a moment ago: the snapshot changed underneath */
        kept_why(why, why_len, "no row at seq %lld", (long long)kc->seq);
        goto out;
    }
    pep_hex(h, sizeof h, hex);
    if (strcmp(hex, kc->hash) != 0) {
        kept_why(why, why_len, "the chain's hash at seq %lld differs from it", (long long)kc->seq);
        goto out;
    }
    rc = 0;
    *bad_seq = 0;
out:
    json_decref(claims);
    return rc;
}
