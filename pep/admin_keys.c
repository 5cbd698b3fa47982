/*
 * admin_keys.c — key rotation, the key ring's view and the latest signed checkpoint, for
 * the admin API.  See admin_keys.h for the endpoints.
 *
 * Rotation (SPEC 5; keys.h for the ring).  A new ES256 key signs every token and
 * checkpoint from the rotation on; the old key keeps verifying tokens, and stays in the
 * JWKS, until the last token it signed has expired — its retires_at — and then only
 * verifies the checkpoints it signed.  retires_at is worked out once, at the rotation,
 * while token signatures are held back (keys_rotation_begin), so that nothing the old key
 * signs can come after it:
 *
 *   retires_at = max(now, T + identity.clock_skew), where T is the latest `exp` of
 *     - the tokens the registry knows, not revoked, issued since the old key took over
 *       (less ADMIN_KEYS_ISSUE_MARGIN_S), or all of them for the data dir's first key:
 *       what the store knows, across restarts; and
 *     - the tokens the old key signed lately whose jti the registry does not know yet (the
 *       ring notes each token it signs for a minute): a token is signed before its record
 *       is written, and one whose record is still on its way must count too.
 *   A token is accepted until exp + clock_skew, so no token of the old key can be valid
 *   once it retires.  A token revoked before the rotation does not hold the key back;
 *   one revoked after does (the bound is not recomputed): to retire a key sooner, revoke
 *   its long-lived tokens (the bootstrap admin token lives 365 days) before rotating.
 *
 * The rotation is one audited change (DESIGN rule 2): its `kind: admin` record
 * (`action: keys.rotate`, `kid` the new key, `old_kid`, `old_retires_at`) and the
 * signing_keys rows that a restart rebuilds the ring from commit in one transaction
 * (keys_sql_rotate); only then does the new key sign.  A record that cannot be written
 * leaves everything as it was (503 audit_unavailable).  Like a policy reload, the handler
 * waits for the record's fsync on its listener thread: rotations are rare operator acts,
 * and the answer says the new key signs.
 *
 * The latest checkpoint is read from the store with a read-only connection of its own
 * (WAL: the writer is not held up).
 *
 * Threads: the admin listener's threads; keys_sql_rotate runs on the audit writer.
 */
#include "pep/admin_keys.h"

#include "pep/change.h"
#include "pep/record.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Whether the registry knows the token (its record is written; revoked or not). */
static bool admin_keys_recorded(void *registry, const char *jti) {
    return registry_token_state(registry, jti) != REGISTRY_TOKEN_UNKNOWN;
}

enum MHD_Result admin_keys_rotate(struct request *r, const char *const *arg) {
    (void)arg;
    struct server *s = r->srv;
    int64_t now = pep_now_us() / 1000000;
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    if (keys_rotation_begin(s->keys, now, &rot, &err) != 0) {
        fprintf(stderr, "pep: keys: rotation refused: %s\n", err.msg);
        reply_error(r, 500, "internal", "a new signing key could not be created", NULL);
        return MHD_YES;
    }
    /* Token signatures are held back from here: the old key's count is final. */
    int64_t since = keys_rotation_old_signs_since(rot);
    if (since != INT64_MIN) since -= ADMIN_KEYS_ISSUE_MARGIN_S;
    int64_t last = registry_latest_expiry(s->registry, since);
    int64_t unrecorded = keys_rotation_old_unrecorded_exp(rot, admin_keys_recorded, s->registry);
    if (unrecorded > last) last = unrecorded;
    int64_t skew = r->policy->clock_skew_ms > 0 ? r->policy->clock_skew_ms / 1000 : 0;
    keys_rotation_set_retires_at(rot, last > 0 ? last + skew : now);

    char kid[KEYS_KID_LEN + 1], old_kid[KEYS_KID_LEN + 1], retires[32], created[32];
    snprintf(kid, sizeof kid, "%s", keys_rotation_new_kid(rot));
    snprintf(old_kid, sizeof old_kid, "%s", keys_rotation_old_kid(rot));
    pep_format_rfc3339_us(keys_rotation_retires_at(rot) * 1000000, retires);
    pep_format_rfc3339_us(now * 1000000, created);
    json_t *rec = change_record(r->id, r->claims->sub, "keys.rotate");
    if (rec && (json_object_set_new(rec, "kid", json_string(kid)) != 0 ||
                json_object_set_new(rec, "old_kid", json_string(old_kid)) != 0 ||
                json_object_set_new(rec, "old_retires_at", json_string(retires)) != 0)) {
        json_decref(rec);
        rec = NULL;
    }
    int64_t seq = 0;
    int rc = rec ? server_audit_sync(s, rec, keys_sql_rotate, rot, &seq) : PEP_ENOMEM;
    if (rc != 0) {
        keys_rotation_abort(rot);
        reply_error(r, 503, "audit_unavailable",
                    "the rotation could not be written to the audit log; the signing key is "
                    "unchanged",
                    NULL);
        return MHD_YES;
    }
    keys_rotation_commit(rot);
    r->audit_seq = seq;
    reply_json(r, 201,
               json_pack("{s:s, s:s, s:s, s:s}", "kid", kid, "created_at", created, "old_kid",
                         old_kid, "old_retires_at", retires));
    return MHD_YES;
}

enum MHD_Result admin_keys_list(struct request *r, const char *const *arg) {
    (void)arg;
    json_t *list = keys_list_json(r->srv->keys, pep_now_us() / 1000000);
    if (!list) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_json(r, 200, list);
    return MHD_YES;
}

enum MHD_Result admin_checkpoint_latest(struct request *r, const char *const *arg) {
    (void)arg;
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    int64_t seq = 0;
    uint8_t hash[32];
    char *jwt = NULL, hex[65];
    int rc = audit_open_reader(r->srv->db_path, &db, &err);
    if (rc == 0) rc = audit_latest_checkpoint(db, &seq, hash, &jwt);
    sqlite3_close(db);
    if (rc == PEP_ENOTFOUND) {
        reply_error(r, 404, "not_found", "no checkpoint has been written yet", NULL);
    } else if (rc != 0) {
        reply_error(r, 503, "audit_unavailable", "the audit store cannot be read", NULL);
    } else {
        pep_hex(hash, sizeof hash, hex);
        json_t *answer =
            json_pack("{s:I, s:s, s:s}", "seq", (json_int_t)seq, "hash", hex, "jwt", jwt);
        if (answer)
            reply_json(r, 200, answer);
        else
            reply_error(r, 500, "internal", "out of memory", NULL);
    }
    free(jwt);
    return MHD_YES;
}
