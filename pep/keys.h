/*
 * keys.h — pep's ES256 signing keys: the key ring (SPEC 1, 3.1, 3.6, 5, 6.4).
 *
 * Keys live as PEM files in DATA/keys/<kid>.pem (directory 0700, files 0600).  The kid is
 * the RFC 7638 JWK thumbprint (base64url SHA-256 of {"crv","kty","x","y"}).
 *
 * A key is in one of three states, a function of the ring and of `now`:
 *   active     it signs: agent and operator tokens, audit checkpoints.  Exactly one.
 *   verifying  rotated out, still verifying tokens (and listed in the JWKS) until its
 *              retires_at: the moment the last token it signed stops being valid.
 *   retired    past retires_at: out of the JWKS and of token verification, but still on
 *              disk and in the ring, where it verifies the audit checkpoints it signed.
 * Checkpoints are verified with any key of the ring (keys_public_key); tokens only with
 * the active and verifying ones (keys_token_key).
 *
 * Where the states come from: the files alone (keys_load_or_create) give the newest file
 * (mtime) as the active key and every other one verifying without end — the layout of a
 * data dir before its first rotation.  pep's store then says what rotations did
 * (keys_sql_load): the `signing_keys` table, written by each rotation in the same
 * transaction as its `keys.rotate` audit record (DESIGN rule 2), names the active key and
 * each rotated-out key's retires_at.  A restart rebuilds the same ring from the files and
 * the table.
 *
 * Rotation (keys_rotation_*), in steps around its audit record: begin generates the new key
 * and writes it as DATA/keys/<kid>.pem.pending (a file no load takes for a key), then holds
 * every token signature back, so that what the old key signed is final; the caller works
 * out the old key's retires_at, and commits the record whose apply (keys_sql_rotate)
 * writes the table; commit renames the file to <kid>.pem and makes the new key the active
 * one.  So a crash leaves either no rotation (a stale .pending, deleted at the next start)
 * or a whole one (the rename finished at the next start), never a key that signs without
 * its record.
 *
 * Every key is parsed once, when it is loaded or generated, into OpenSSL objects that are
 * then only read: the key pair (signing, with EVP_DigestSign) and its public half
 * (verifying, token.c with EVP_DigestVerify).  Nothing re-parses a PEM per signature or per
 * verification — libjwt 1.10 does, at 0.4–0.8 ms a call with OpenSSL 3, which let anyone
 * holding one token buy a millisecond of CPU per forged request.  The PEM texts are kept
 * only for tests and tools that cross-check with libjwt.
 *
 * Ownership and threads: a keyring lives from keys_load_* to keys_free, and its keys with
 * it (a key is never freed before the ring, so what keys_public_key and keys_active_kid
 * return stays valid).  Lookups, JWKS and signatures may run on any thread at once,
 * without a lock: the ring is a list that only grows, its active key and each key's
 * retirement are read atomically.  A rotation is serialized with other rotations and holds
 * back token signatures (not checkpoint signatures: the audit writer signs those while
 * the rotation waits for its record) from keys_rotation_begin to its commit or abort.
 */
#ifndef PEP_KEYS_H
#define PEP_KEYS_H

#include "pep/common.h"

#include <jansson.h>
#include <openssl/types.h>
#include <sqlite3.h>

struct keyring;

/* Loads every DATA/keys/<kid>.pem, creating the directory and a first P-256 key when there is none.
 * Returns 0 and *out (free with keys_free), or a negative code with err filled. */
int keys_load_or_create(const char *data_dir, struct keyring **out, struct pep_err *err);
void keys_free(struct keyring *k);

/*
 * Loads every DIR/<kid>.pem as it is, to verify with (pepctl audit verify --db): creates
 * nothing and changes no file mode, unlike keys_load_or_create, because the directory may
 * belong to someone else or be part of the evidence.  Every key verifies checkpoints.
 * Returns 0 and *out (free with keys_free), PEP_ENOTFOUND with err when DIR holds no key,
 * or a negative code with err.
 */
int keys_load_readonly(const char *dir, struct keyring **out, struct pep_err *err);

/* The signing key's kid (owned by k, valid as long as k is). */
const char *keys_active_kid(const struct keyring *k);

/* PEM of the active private key and its length (len may not be NULL).  pep signs with
 * the parsed key; this is for tests that sign through libjwt. */
const unsigned char *keys_active_private_pem(const struct keyring *k, size_t *len);

/* PEM of the public key named kid and its length (len may be NULL), or NULL when pep
 * holds no such key.  For cross-checks with libjwt: pep verifies with keys_public_key. */
const unsigned char *keys_public_pem(const struct keyring *k, const char *kid, size_t *len);

/*
 * The public key named kid, in any state (checkpoints: a retired key still verifies what
 * it signed), parsed at load (the public half only: it verifies, it cannot sign), or NULL
 * when pep holds no such key (or kid is NULL).  Owned by k and valid as long as k is;
 * never modified, so any thread may verify with it (not const only because OpenSSL's
 * EVP_DigestVerifyInit takes a non-const key).
 */
EVP_PKEY *keys_public_key(const struct keyring *k, const char *kid);

/* The public key named kid when it may verify tokens at now_s (active or verifying), else
 * NULL (unknown or retired).  As keys_public_key otherwise. */
EVP_PKEY *keys_token_key(const struct keyring *k, const char *kid, int64_t now_s);

/* An ES256 signature in a JWS (RFC 7518 3.4): R then S, each 32 bytes big-endian and
 * left-padded with zeros — not the DER ECDSA-Sig-Value OpenSSL produces and expects. */
#define KEYS_ES256_SIG_LEN 64
/* The longest DER ECDSA-Sig-Value for P-256: SEQUENCE of two INTEGERs of up to 33 bytes. */
#define KEYS_ES256_DER_MAX 72

/* RFC 7517 key set {"keys":[{kty:"EC",crv:"P-256",x,y,kid,alg:"ES256",use:"sig"}…]} of
 * the keys that verify tokens at now_s: the active key first, then the verifying ones,
 * newest first.  Returns a new reference, or NULL on allocation failure. */
json_t *keys_jwks_at(const struct keyring *k, int64_t now_s);
/* keys_jwks_at with the wall clock (GET /.well-known/jwks.json). */
json_t *keys_jwks(const struct keyring *k);

/* Length of a kid: base64url of a SHA-256 digest, without padding. */
#define KEYS_KID_LEN 43

/* Number of keys held, in every state (≥ 1 for a loaded keyring). */
size_t keys_count(const struct keyring *k);

enum keys_state {
    KEYS_ACTIVE,
    KEYS_VERIFYING,
    KEYS_RETIRED,
    KEYS_UNKNOWN, /* no such key in the ring */
};

/* "active", "verifying", "retired" (or "unknown"). */
const char *keys_state_name(enum keys_state st);
/* The state of the key named kid at now_s. */
enum keys_state keys_state_of(const struct keyring *k, const char *kid, int64_t now_s);

/* retires_at of a key whose end is not known: a rotated-out key of a data dir without
 * rotation records (keys made by hand, or by keys_rotate) verifies for ever. */
#define KEYS_NEVER INT64_MAX

/*
 * The ring as GET /admin/v1/keys answers it: {"keys":[{"kid", "state", "created_at",
 * "rotated_out_at", "retires_at"}…]}, oldest first (SPEC 8: newest last); times RFC 3339,
 * null when the key signs (rotated_out_at, retires_at) or has no known end (retires_at).
 * A new reference, or NULL on allocation failure.
 */
json_t *keys_list_json(const struct keyring *k, int64_t now_s);

/*
 * File-level rotation for tools and tests: creates a new P-256 key in DATA/keys (it
 * becomes the active key: its mtime is made newer than every existing key's) and loads
 * the whole directory again as a new keyring (every older key verifying without end).  Not
 * audited and not recorded in the store: pep itself rotates with keys_rotation_* below.
 * Returns 0 or a negative code with err.
 */
int keys_rotate(const char *data_dir, struct keyring **out, struct pep_err *err);

/* ---- rotation of a live ring, around its audit record ----------------------------------- */

struct keys_rotation;

/*
 * First step: waits for any other rotation of k, generates a P-256 key and writes it to
 * DATA/keys/<kid>.pem.pending (0600, atomic, directory synced), then holds back every token
 * signature until keys_rotation_commit or _abort.  k must come from keys_load_or_create.
 * Returns 0 and *out, or a negative code with err (nothing changed, nothing held).
 */
int keys_rotation_begin(struct keyring *k, int64_t now_s, struct keys_rotation **out,
                        struct pep_err *err);

/* The kids of the rotation: the new key, and the key that signs until the commit. */
const char *keys_rotation_new_kid(const struct keys_rotation *rot);
const char *keys_rotation_old_kid(const struct keys_rotation *rot);

/* What the key that signs until the commit signed, for working out when it retires.
 *
 * Since when tokens may carry it: its creation time (seconds; a token issued in the second
 * or minute before it took over may be its own: the caller keeps a margin), or INT64_MIN
 * when it is the data dir's first key, which signed every token the store knows.
 *
 * And what the store may not know yet: the latest `exp` (0 when none) of the tokens it
 * signed lately (in the last minute) whose jti `recorded` (may be NULL) does not know —
 * a token is signed before its record is written.  Final, since token signatures are held
 * back; recorded(arg, jti) is called under the ring's lock and must not sign. */
int64_t keys_rotation_old_signs_since(const struct keys_rotation *rot);
int64_t keys_rotation_old_unrecorded_exp(const struct keys_rotation *rot,
                                         bool (*recorded)(void *arg, const char *jti), void *arg);

/* Sets when the old key retires (seconds; clamped to at least the rotation's now_s). */
void keys_rotation_set_retires_at(struct keys_rotation *rot, int64_t retires_at_s);
int64_t keys_rotation_retires_at(const struct keys_rotation *rot);

/* The audit writer's apply callback for the rotation's record (arg: the struct
 * keys_rotation *): writes the signing_keys rows of both keys.  0 or PEP_EDB. */
int keys_sql_rotate(sqlite3 *db, void *rot);

/* Last step once the record committed: renames the key file to <kid>.pem (a failure is
 * reported on stderr and finished at the next start: the store already says the key
 * signs), makes the new key the active one and the old one verifying until its
 * retires_at, lets signatures go on, and frees rot. */
void keys_rotation_commit(struct keys_rotation *rot);

/* Last step when the record could not be written: deletes the pending file, lets
 * signatures go on with the old key, and frees rot.  Nothing changed. */
void keys_rotation_abort(struct keys_rotation *rot);

/* SQL creating the signing_keys table (part of the store's schema_extra). */
#define KEYS_SCHEMA                                                                                \
    "CREATE TABLE IF NOT EXISTS signing_keys ("                                                    \
    " kid TEXT PRIMARY KEY,"                                                                       \
    " created_at INTEGER NOT NULL,"                                                                \
    " rotated_out_at INTEGER,"                                                                     \
    " retires_at INTEGER);"

/*
 * Applies what the store says of the keys (startup, after the store opened, before any
 * signature): the table's active key signs (a rotation whose record committed but whose
 * rename did not happen is finished here), rotated-out keys verify until their retires_at,
 * and a key file the table does not know while it knows others is kept as retired (it
 * verifies checkpoints only), with a warning.  Stale .pending files of rotations that
 * never committed are deleted.  An empty table (no rotation yet) changes nothing.
 * Returns 0, or a negative code with err (a key the table names as active is missing).
 */
int keys_sql_load(struct keyring *k, sqlite3 *db, struct pep_err *err);

/* ---- signing ----------------------------------------------------------------------------- */

/* Signs a JSON object of claims with the active key: a compact JWS with header
 * {"alg":"ES256","kid":…,"typ":"JWT"}, header and claims serialized compact with sorted
 * keys (as libjwt writes them, so libjwt's jwt_decode verifies the result).  The one
 * signing path for agent/operator tokens and audit checkpoints; no PEM is parsed.  Claims
 * with an integer `exp` (tokens) wait while a rotation is in progress, and the key that
 * signed them remembers them for a minute (keys_rotation_old_unrecorded_exp).
 * Returns 0 and *jwt_out (malloc'd, caller frees), or a negative code with err. */
int keys_sign_claims(const struct keyring *k, const json_t *claims, char **jwt_out,
                     struct pep_err *err);

/* A signed audit checkpoint (SPEC 6.4): claims {"seq":seq,"hash":"<hex>","iat":now_s}.
 * Returns a malloc'd JWT the caller frees, or NULL on failure.  Verify it with
 * token_verify_signature (token.h). */
char *keys_sign_checkpoint(const struct keyring *k, int64_t seq, const uint8_t hash[32],
                           int64_t now_s);

#endif
