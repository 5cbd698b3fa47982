/*
 * test_keyring.c — unit tests for the key ring's rotation (pep/keys.c) and for checkpoints
 * kept off the machine (audit/kept.c).
 *
 * Checkpoints: one signed by key A verifies with a ring holding A and not with a ring
 * holding only B; after A is rotated out and retired it still verifies (tokens signed by A
 * do not); its claims are checked (seq, hash, iat), and a kept checkpoint is in a chain
 * only when that chain holds its hash at its seq.
 *
 * Rotation, with injected times: states (active, verifying until retires_at, retired),
 * token verification and the JWKS at each edge; the latest exp the old key signed (also
 * under concurrent signing: none slips past the rotation); the signing_keys rows that a
 * restart rebuilds the same ring from; the crash windows (a key file written but never
 * recorded, a rotation recorded but its file not yet renamed); a key file no rotation made.
 *
 * Each test uses its own mkdtemp directory under /tmp.  Single-threaded except
 * test_rotation_holds_token_signatures.
 */
#include "audit/audit.h"
#include "audit/kept.h"
#include "pep/keys.h"
#include "pep/token.h"
#include "pep/util.h"

#include <dirent.h>
#include <ftw.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

/* ---- helpers ------------------------------------------------------------------------------ */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static char *make_tmpdir(void) {
    char *t = strdup("/tmp/pep-keyring-XXXXXX");
    assert_non_null(t);
    assert_non_null(mkdtemp(t));
    return t;
}

static void rm_tmpdir(char *dir) {
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* A token (claims only: iss, aud, sub, jti, iat, exp) signed by the ring's active key. */
static char *sign_token(const struct keyring *k, int64_t iat, int64_t exp) {
    json_t *claims = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I}", "iss", "pep", "aud", "pep", "sub",
                               "bot", "jti", "j", "iat", (json_int_t)iat, "exp", (json_int_t)exp);
    char *t = NULL;
    struct pep_err err = {0};
    assert_non_null(claims);
    assert_int_equal(keys_sign_claims(k, claims, &t, &err), 0);
    json_decref(claims);
    return t;
}

/* The kid of a JWT's header (the first part, base64url). */
static void kid_of(const char *jwt, char out[KEYS_KID_LEN + 1]) {
    char part[256], in[260];
    unsigned char buf[256];
    size_t n = strcspn(jwt, ".");
    assert_true(n < sizeof part);
    memcpy(part, jwt, n);
    part[n] = '\0';
    size_t padded = (n + 3) / 4 * 4;
    for (size_t i = 0; i < n; i++)
        in[i] = part[i] == '-' ? '+' : part[i] == '_' ? '/' : part[i];
    memset(in + n, '=', padded - n);
    int m = EVP_DecodeBlock(buf, (unsigned char *)in, (int)padded);
    assert_true(m > 0);
    json_t *h = json_loadb((const char *)buf, (size_t)m - (padded - n), 0, NULL);
    assert_non_null(h);
    snprintf(out, KEYS_KID_LEN + 1, "%s", json_string_value(json_object_get(h, "kid")));
    json_decref(h);
}

static enum token_status verify_at(const struct keyring *k, const char *token, int64_t now) {
    struct token_claims *c = NULL;
    enum token_status st = token_verify(NULL, k, token, "pep", "pep", now, 0, &c);
    token_claims_release(c);
    return st;
}

/* A store holding only the signing_keys table, as pep's schema_extra makes it. */
static sqlite3 *keys_db(const char *dir) {
    char path[300];
    sqlite3 *db = NULL;
    snprintf(path, sizeof path, "%s/pep.db", dir);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, KEYS_SCHEMA, NULL, NULL, NULL), SQLITE_OK);
    return db;
}

/* One whole rotation at now: begin, retires_at, the record's rows (db may be NULL), commit.
 * Returns the new kid in out. */
static void rotate(struct keyring *k, sqlite3 *db, int64_t now, int64_t retires_at,
                   char out[KEYS_KID_LEN + 1]) {
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_rotation_begin(k, now, &rot, &err), 0);
    keys_rotation_set_retires_at(rot, retires_at);
    if (db) assert_int_equal(keys_sql_rotate(db, rot), 0);
    snprintf(out, KEYS_KID_LEN + 1, "%s", keys_rotation_new_kid(rot));
    keys_rotation_commit(rot);
}

/* The ring's view at now, as compact text (for comparing two rings). */
static char *ring_text(const struct keyring *k, int64_t now) {
    json_t *j = keys_list_json(k, now);
    assert_non_null(j);
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    assert_non_null(s);
    return s;
}

static size_t pending_files(const char *data_dir) {
    char path[300];
    snprintf(path, sizeof path, "%s/keys", data_dir);
    size_t n = 0;
    DIR *d = opendir(path);
    assert_non_null(d);
    for (struct dirent *de; (de = readdir(d));)
        n += strstr(de->d_name, ".pending") != NULL;
    closedir(d);
    return n;
}

/* ---- checkpoints ------------------------------------------------------------------------ */

#define IAT 1767225600 /* 2026-01-01T00:00:00Z */

/* A chain of n canonical records in a fresh store file (audit and checkpoints tables, as
 * the walk reads them); hashes[i] is the hash of seq i + 1. */
static sqlite3 *chain_db(const char *dir, const char *name, int n, const char *salt,
                         uint8_t hashes[][32]) {
    char path[300];
    sqlite3 *db = NULL;
    sqlite3_stmt *ins = NULL;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
                                  "CREATE TABLE audit (seq INTEGER PRIMARY KEY, record TEXT,"
                                  " prev_hash BLOB, hash BLOB);"
                                  "CREATE TABLE checkpoints (seq INTEGER PRIMARY KEY, hash BLOB,"
                                  " jwt TEXT, created_at TEXT);",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(
        sqlite3_prepare_v2(db, "INSERT INTO audit VALUES (?1, ?2, ?3, ?4)", -1, &ins, NULL),
        SQLITE_OK);
    uint8_t prev[32] = {0};
    for (int i = 1; i <= n; i++) {
        json_t *rec = json_pack("{s:s, s:I, s:s, s:s}", "kind", "system", "seq", (json_int_t)i,
                                "reason", salt, "ts", "2026-01-01T00:00:00.000000Z");
        char *text = audit_canonical_json(rec);
        assert_non_null(text);
        assert_int_equal(audit_chain_hash(prev, text, strlen(text), hashes[i - 1]), 0);
        sqlite3_bind_int64(ins, 1, i);
        sqlite3_bind_text(ins, 2, text, -1, SQLITE_TRANSIENT);
        sqlite3_bind_blob(ins, 3, prev, 32, SQLITE_TRANSIENT);
        sqlite3_bind_blob(ins, 4, hashes[i - 1], 32, SQLITE_TRANSIENT);
        assert_int_equal(sqlite3_step(ins), SQLITE_DONE);
        sqlite3_reset(ins);
        memcpy(prev, hashes[i - 1], 32);
        free(text);
        json_decref(rec);
    }
    sqlite3_finalize(ins);
    return db;
}

/* A kept checkpoint file's content, as GET /admin/v1/audit/checkpoints/latest answers. */
static void kept_from(struct audit_kept *kc, int64_t seq, const uint8_t hash[32], char *jwt) {
    char hex[65];
    pep_hex(hash, 32, hex);
    char *text = NULL;
    assert_true(asprintf(&text, "{\"seq\": %lld, \"hash\": \"%s\", \"jwt\": \"%s\"}",
                         (long long)seq, hex, jwt) > 0);
    char why[200];
    assert_int_equal(audit_kept_parse(text, strlen(text), kc, why, sizeof why), 0);
    free(text);
    free(jwt);
}

static int kept_check(sqlite3 *db, const struct audit_verify_result *walk, struct keyring *k,
                      const struct audit_kept *kc, int64_t *bad, char *why, size_t why_len) {
    return audit_kept_check(db, walk, token_check_checkpoint, k, kc, bad, why, why_len);
}

static void test_checkpoint_sign_verify_rings(void **state) {
    (void)state;
    char *a_dir = make_tmpdir(), *b_dir = make_tmpdir();
    struct keyring *a = NULL, *b = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(a_dir, &a, &err), 0);
    assert_int_equal(keys_load_or_create(b_dir, &b, &err), 0);
    uint8_t hash[32];
    for (int i = 0; i < 32; i++)
        hash[i] = (uint8_t)(0xA0 + i);
    char *jwt = keys_sign_checkpoint(a, 12, hash, IAT);
    assert_non_null(jwt);

    /* A ring holding A: valid, with its claims. */
    json_t *claims = NULL;
    assert_null(token_check_checkpoint(a, jwt, &claims));
    char hex[65];
    pep_hex(hash, 32, hex);
    assert_int_equal(json_integer_value(json_object_get(claims, "seq")), 12);
    assert_string_equal(json_string_value(json_object_get(claims, "hash")), hex);
    assert_int_equal(json_integer_value(json_object_get(claims, "iat")), IAT);
    json_decref(claims);

    /* A ring holding only B: an unknown key. */
    assert_string_equal(token_check_checkpoint(b, jwt, &claims), "signed by an unknown key");
    assert_null(claims);

    /* A's keys read offline, as pepctl does. */
    char keys_dir[300];
    struct keyring *offline = NULL;
    snprintf(keys_dir, sizeof keys_dir, "%s/keys", a_dir);
    assert_int_equal(keys_load_readonly(keys_dir, &offline, &err), 0);
    assert_null(token_check_checkpoint(offline, jwt, &claims));
    json_decref(claims);
    keys_free(offline);

    /* A rotated out at 1000, retired at 1100: it verifies no token from then on, but the
     * checkpoints it signed still verify. */
    char *token = sign_token(a, 900, 1100);
    char kid_b[KEYS_KID_LEN + 1];
    rotate(a, NULL, 1000, 1100, kid_b);
    assert_int_equal(verify_at(a, token, 1099), TOKEN_OK);
    assert_int_equal(verify_at(a, token, 1100), TOKEN_UNKNOWN_KID);
    assert_null(token_check_checkpoint(a, jwt, &claims));
    json_decref(claims);
    /* A checkpoint signed now carries the new kid. */
    char *jwt2 = keys_sign_checkpoint(a, 13, hash, IAT);
    char kid[KEYS_KID_LEN + 1];
    kid_of(jwt2, kid);
    assert_string_equal(kid, kid_b);

    /* Tampered: the payload of another checkpoint under A's signature. */
    char *forged = NULL;
    const char *sig = strrchr(jwt, '.');
    size_t head_len = strcspn(jwt2, ".");
    const char *payload2 = jwt2 + head_len; /* ".payload.sig" of jwt2 */
    size_t payload_len = (size_t)(strrchr(jwt2, '.') - payload2);
    assert_true(asprintf(&forged, "%.*s%.*s%s", (int)strcspn(jwt, "."), jwt, (int)payload_len,
                         payload2, sig) > 0);
    assert_string_equal(token_check_checkpoint(a, forged, &claims), "signature invalid");
    free(forged);

    free(token);
    free(jwt);
    free(jwt2);
    keys_free(a);
    keys_free(b);
    rm_tmpdir(a_dir);
    rm_tmpdir(b_dir);
}

static void test_kept_checkpoint_in_the_chain(void **state) {
    (void)state;
    char *dir = make_tmpdir(), *b_dir = make_tmpdir();
    struct keyring *a = NULL, *b = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(dir, &a, &err), 0);
    assert_int_equal(keys_load_or_create(b_dir, &b, &err), 0);
    uint8_t h[10][32], other[10][32];
    sqlite3 *db = chain_db(dir, "chain.db", 10, "real", h);
    sqlite3 *forged_db = chain_db(dir, "forged.db", 10, "forged", other);
    struct audit_verify_result walk;
    assert_int_equal(audit_verify_db(db, &walk), 0);
    assert_true(walk.ok);
    assert_int_equal(walk.head_seq, 10);
    struct audit_kept kc;
    int64_t bad = -1;
    char why[300];

    /* Signed by A, seq 5 with the chain's hash: in the chain. */
    kept_from(&kc, 5, h[4], keys_sign_checkpoint(a, 5, h[4], IAT));
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 0);
    assert_int_equal(bad, 0);
    /* Not with B's keys. */
    assert_int_equal(kept_check(db, &walk, b, &kc, &bad, why, sizeof why), 1);
    assert_int_equal(bad, 5);
    assert_string_equal(why, "signed by an unknown key");
    /* Not in another chain of the same length (a store rewritten whole). */
    struct audit_verify_result fwalk;
    assert_int_equal(audit_verify_db(forged_db, &fwalk), 0);
    assert_true(fwalk.ok);
    assert_int_equal(kept_check(forged_db, &fwalk, a, &kc, &bad, why, sizeof why), 1);
    assert_int_equal(bad, 5);
    assert_string_equal(why, "the chain's hash at seq 5 differs from it");
    audit_kept_clear(&kc);

    /* The file's hash edited: not what the JWT says. */
    kept_from(&kc, 5, h[5], keys_sign_checkpoint(a, 5, h[4], IAT));
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 1);
    assert_string_equal(why, "its seq or hash is not what its jwt says");
    audit_kept_clear(&kc);

    /* Beyond the head: records were cut off (first bad seq: head + 1). */
    uint8_t h12[32] = {1, 2, 3};
    kept_from(&kc, 12, h12, keys_sign_checkpoint(a, 12, h12, IAT));
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 1);
    assert_int_equal(bad, 11);
    assert_non_null(strstr(why, "records were cut off"));
    audit_kept_clear(&kc);

    /* A chain that breaks before its seq: the walk's first bad seq. */
    kept_from(&kc, 8, h[7], keys_sign_checkpoint(a, 8, h[7], IAT));
    struct audit_verify_result broken = walk;
    broken.ok = false;
    broken.first_bad_seq = 3;
    broken.head_seq = 2;
    assert_int_equal(kept_check(db, &broken, a, &kc, &bad, why, sizeof why), 1);
    assert_int_equal(bad, 3);
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 0);
    audit_kept_clear(&kc);

    /* Claims without iat are not a checkpoint. */
    json_t *claims = json_pack("{s:I, s:s}", "seq", (json_int_t)5, "hash", "00");
    char hex[65], *jwt = NULL;
    pep_hex(h[4], 32, hex);
    json_object_set_new(claims, "hash", json_string(hex));
    assert_int_equal(keys_sign_claims(a, claims, &jwt, &err), 0);
    json_decref(claims);
    kept_from(&kc, 5, h[4], jwt);
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 1);
    assert_string_equal(why, "its jwt lacks the claims seq, hash and iat");
    audit_kept_clear(&kc);

    /* A key retired since still vouches for what it signed. */
    kept_from(&kc, 10, h[9], keys_sign_checkpoint(a, 10, h[9], IAT));
    char kid_b[KEYS_KID_LEN + 1];
    rotate(a, NULL, 1000, 1000, kid_b);
    assert_int_equal(keys_state_of(a, kid_b, 5000), KEYS_ACTIVE);
    assert_int_equal(kept_check(db, &walk, a, &kc, &bad, why, sizeof why), 0);
    audit_kept_clear(&kc);

    /* What a kept file must hold. */
    static const char *const bad_files[] = {
        "not json",
        "[1]",
        "{\"seq\": 0, \"hash\": \"" /* seq < 1 */
        "0000000000000000000000000000000000000000000000000000000000000000\", \"jwt\": \"x\"}",
        "{\"seq\": 1, \"hash\": \"00\", \"jwt\": \"x\"}",
        "{\"seq\": 1, \"hash\": "
        "\"0000000000000000000000000000000000000000000000000000000000000000\"}",
        "{\"seq\": \"1\", \"hash\": "
        "\"0000000000000000000000000000000000000000000000000000000000000000\", \"jwt\": \"x\"}",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad_files); i++) {
        why[0] = '\0';
        assert_int_equal(audit_kept_parse(bad_files[i], strlen(bad_files[i]), &kc, why, sizeof why),
                         PEP_EINVAL);
        assert_true(why[0] != '\0');
        assert_null(kc.jwt);
    }
    /* Upper-case hex is read as the same hash. */
    static const char upper[] =
        "{\"seq\": 1, \"hash\": "
        "\"ABCDEF0000000000000000000000000000000000000000000000000000000000\", \"jwt\": \"x\"}";
    assert_int_equal(audit_kept_parse(upper, strlen(upper), &kc, why, sizeof why), 0);
    assert_int_equal(strncmp(kc.hash, "abcdef00", 8), 0);
    audit_kept_clear(&kc);

    sqlite3_close(db);
    sqlite3_close(forged_db);
    keys_free(a);
    keys_free(b);
    rm_tmpdir(dir);
    rm_tmpdir(b_dir);
}

/* ---- rotation ----------------------------------------------------------------------------- */

/* A store that knows the tokens sign_token makes (jti "j"). */
static bool recorded_j(void *arg, const char *jti) {
    (void)arg;
    return strcmp(jti, "j") == 0;
}

static void test_rotation_states(void **state) {
    (void)state;
    char *dir = make_tmpdir();
    struct keyring *k = NULL;
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(dir, &k, &err), 0);
    char kid_a[KEYS_KID_LEN + 1], kid_b[KEYS_KID_LEN + 1], kid[KEYS_KID_LEN + 1];
    snprintf(kid_a, sizeof kid_a, "%s", keys_active_kid(k));
    char *ta = sign_token(k, 990, 1400);
    char *ta2 = sign_token(k, 995, 1500);

    assert_int_equal(keys_rotation_begin(k, 1000, &rot, &err), 0);
    snprintf(kid_b, sizeof kid_b, "%s", keys_rotation_new_kid(rot));
    assert_string_equal(keys_rotation_old_kid(rot), kid_a);
    assert_string_not_equal(kid_b, kid_a);
    /* The data dir's first key signed every token: all of them count. */
    assert_true(keys_rotation_old_signs_since(rot) == INT64_MIN);
    assert_int_equal(keys_rotation_old_unrecorded_exp(rot, NULL, NULL), 1500);
    /* Tokens the store knows are counted from the store, not from the note. */
    assert_int_equal(keys_rotation_old_unrecorded_exp(rot, recorded_j, NULL), 0);
    /* Until the commit nothing changed: A signs (checkpoints do not wait), B is unknown. */
    assert_string_equal(keys_active_kid(k), kid_a);
    assert_int_equal(keys_state_of(k, kid_b, 1000), KEYS_UNKNOWN);
    char *cp =
        keys_sign_checkpoint(k, 1, (const uint8_t *)"0123456789abcdef0123456789abcdef", 1000);
    kid_of(cp, kid);
    assert_string_equal(kid, kid_a);
    free(cp);
    keys_rotation_set_retires_at(rot, 900); /* never before the rotation itself */
    assert_int_equal(keys_rotation_retires_at(rot), 1000);
    keys_rotation_set_retires_at(rot, 1501);
    keys_rotation_commit(rot);

    assert_string_equal(keys_active_kid(k), kid_b);
    assert_int_equal(keys_count(k), 2);
    static const struct {
        int64_t now;
        enum keys_state a;
        size_t jwks;
    } edges[] = {{1000, KEYS_VERIFYING, 2},
                 {1500, KEYS_VERIFYING, 2},
                 {1501, KEYS_RETIRED, 1},
                 {99999, KEYS_RETIRED, 1}};
    for (size_t i = 0; i < PEP_ARRAY_LEN(edges); i++) {
        assert_int_equal(keys_state_of(k, kid_a, edges[i].now), edges[i].a);
        assert_int_equal(keys_state_of(k, kid_b, edges[i].now), KEYS_ACTIVE);
        assert_int_equal(keys_token_key(k, kid_a, edges[i].now) != NULL,
                         edges[i].a == KEYS_VERIFYING);
        assert_non_null(keys_public_key(k, kid_a)); /* checkpoints: any state */
        json_t *jwks = keys_jwks_at(k, edges[i].now);
        json_t *keys = json_object_get(jwks, "keys");
        assert_int_equal(json_array_size(keys), edges[i].jwks);
        assert_string_equal(json_string_value(json_object_get(json_array_get(keys, 0), "kid")),
                            kid_b);
        if (edges[i].jwks == 2)
            assert_string_equal(json_string_value(json_object_get(json_array_get(keys, 1), "kid")),
                                kid_a);
        json_decref(jwks);
    }
    /* Old tokens keep verifying until they expire; then the key is gone too. */
    assert_int_equal(verify_at(k, ta, 1399), TOKEN_OK);
    assert_int_equal(verify_at(k, ta, 1400), TOKEN_EXPIRED);
    assert_int_equal(verify_at(k, ta2, 1499), TOKEN_OK);
    assert_int_equal(verify_at(k, ta2, 1501), TOKEN_UNKNOWN_KID);
    /* New tokens carry the new kid. */
    char *tb = sign_token(k, 1001, 2500);
    kid_of(tb, kid);
    assert_string_equal(kid, kid_b);
    assert_int_equal(verify_at(k, tb, 2000), TOKEN_OK);

    /* The list: oldest first, times RFC 3339, null where a key has none. */
    json_t *list = keys_list_json(k, 1200);
    json_t *items = json_object_get(list, "keys");
    assert_int_equal(json_array_size(items), 2);
    json_t *ia = json_array_get(items, 0), *ib = json_array_get(items, 1);
    assert_string_equal(json_string_value(json_object_get(ia, "kid")), kid_a);
    assert_string_equal(json_string_value(json_object_get(ia, "state")), "verifying");
    assert_string_equal(json_string_value(json_object_get(ia, "rotated_out_at")),
                        "1970-01-01T00:16:40.000000Z");
    assert_string_equal(json_string_value(json_object_get(ia, "retires_at")),
                        "1970-01-01T00:25:01.000000Z");
    assert_string_equal(json_string_value(json_object_get(ib, "kid")), kid_b);
    assert_string_equal(json_string_value(json_object_get(ib, "state")), "active");
    assert_string_equal(json_string_value(json_object_get(ib, "created_at")),
                        "1970-01-01T00:16:40.000000Z");
    assert_true(json_is_null(json_object_get(ib, "rotated_out_at")));
    assert_true(json_is_null(json_object_get(ib, "retires_at")));
    json_decref(list);

    /* A second rotation: B was brought in at 1000, so only tokens from then count. */
    assert_int_equal(keys_rotation_begin(k, 2000, &rot, &err), 0);
    assert_string_equal(keys_rotation_old_kid(rot), kid_b);
    assert_int_equal(keys_rotation_old_signs_since(rot), 1000);
    assert_int_equal(keys_rotation_old_unrecorded_exp(rot, NULL, NULL), 2500);
    keys_rotation_set_retires_at(rot, 2500);
    keys_rotation_commit(rot);
    assert_int_equal(keys_count(k), 3);
    assert_int_equal(keys_state_of(k, kid_a, 2000), KEYS_RETIRED);
    assert_int_equal(keys_state_of(k, kid_b, 2499), KEYS_VERIFYING);
    assert_int_equal(keys_state_of(k, kid_b, 2500), KEYS_RETIRED);

    /* A read-only ring cannot rotate. */
    char keys_dir[300];
    struct keyring *ro = NULL;
    snprintf(keys_dir, sizeof keys_dir, "%s/keys", dir);
    assert_int_equal(keys_load_readonly(keys_dir, &ro, &err), 0);
    assert_int_equal(keys_rotation_begin(ro, 3000, &rot, &err), PEP_EINVAL);
    keys_free(ro);

    free(ta);
    free(ta2);
    free(tb);
    keys_free(k);
    rm_tmpdir(dir);
}

static void test_rotation_abort(void **state) {
    (void)state;
    char *dir = make_tmpdir();
    struct keyring *k = NULL;
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(dir, &k, &err), 0);
    char kid_a[KEYS_KID_LEN + 1];
    snprintf(kid_a, sizeof kid_a, "%s", keys_active_kid(k));
    assert_int_equal(keys_rotation_begin(k, 1000, &rot, &err), 0);
    assert_int_equal(pending_files(dir), 1);
    keys_rotation_abort(rot);
    assert_int_equal(pending_files(dir), 0);
    assert_int_equal(keys_count(k), 1);
    assert_string_equal(keys_active_kid(k), kid_a);
    /* Signatures go on (the lock is free again), with the same key. */
    char *t = sign_token(k, 1000, 2000), kid[KEYS_KID_LEN + 1];
    kid_of(t, kid);
    assert_string_equal(kid, kid_a);
    free(t);
    keys_free(k);
    rm_tmpdir(dir);
}

/* Two rotations recorded in the table: a restart (files, then the table) rebuilds the same
 * ring, states and times, even though the files alone would say otherwise. */
static void test_rotation_persists(void **state) {
    (void)state;
    char *dir = make_tmpdir();
    struct keyring *k = NULL, *k2 = NULL;
    struct pep_err err = {0};
    sqlite3 *db = keys_db(dir);
    assert_int_equal(keys_load_or_create(dir, &k, &err), 0);
    char kid_b[KEYS_KID_LEN + 1], kid_c[KEYS_KID_LEN + 1];
    rotate(k, db, 1000, 1500, kid_b);
    rotate(k, db, 2000, 2600, kid_c);

    assert_int_equal(keys_load_or_create(dir, &k2, &err), 0);
    assert_int_equal(keys_sql_load(k2, db, &err), 0);
    assert_string_equal(keys_active_kid(k2), kid_c);
    static const int64_t at[] = {1000, 1499, 1500, 2000, 2599, 2600, 4000000000};
    for (size_t i = 0; i < PEP_ARRAY_LEN(at); i++) {
        char *x = ring_text(k, at[i]), *y = ring_text(k2, at[i]);
        assert_string_equal(x, y);
        free(x);
        free(y);
    }
    /* And the next rotation from the restarted ring counts from C's creation. */
    struct keys_rotation *rot = NULL;
    assert_int_equal(keys_rotation_begin(k2, 3000, &rot, &err), 0);
    assert_int_equal(keys_rotation_old_signs_since(rot), 2000);
    assert_int_equal(keys_rotation_old_unrecorded_exp(rot, NULL, NULL), 0);
    keys_rotation_abort(rot);

    /* An empty table (no rotation recorded) changes nothing. */
    char *dir2 = make_tmpdir();
    struct keyring *k3 = NULL;
    sqlite3 *db2 = keys_db(dir2);
    assert_int_equal(keys_load_or_create(dir2, &k3, &err), 0);
    char *before = ring_text(k3, 5000);
    assert_int_equal(keys_sql_load(k3, db2, &err), 0);
    char *after = ring_text(k3, 5000);
    assert_string_equal(before, after);
    free(before);
    free(after);

    sqlite3_close(db);
    sqlite3_close(db2);
    keys_free(k);
    keys_free(k2);
    keys_free(k3);
    rm_tmpdir(dir);
    rm_tmpdir(dir2);
}

/* Reads a file whole (caller frees). */
static char *slurp(const char *path, size_t *len) {
    char *data = NULL;
    assert_int_equal(pep_read_file(path, 1 << 20, &data, len), 0);
    return data;
}

/* pep dies during a rotation: before its record committed (the key file stays .pending,
 * and the next start deletes it: nothing changed), or after (the next start finishes the
 * rename and the new key signs). */
static void test_rotation_crash_windows(void **state) {
    (void)state;
    char *dir = make_tmpdir();
    struct keyring *k = NULL, *k2 = NULL;
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    sqlite3 *db = keys_db(dir);
    assert_int_equal(keys_load_or_create(dir, &k, &err), 0);
    char kid_a[KEYS_KID_LEN + 1], kid_b[KEYS_KID_LEN + 1], pending[420], final[400];
    snprintf(kid_a, sizeof kid_a, "%s", keys_active_kid(k));

    /* Before the commit: the pending file is all that is left. */
    assert_int_equal(keys_rotation_begin(k, 1000, &rot, &err), 0);
    snprintf(kid_b, sizeof kid_b, "%s", keys_rotation_new_kid(rot));
    snprintf(final, sizeof final, "%s/keys/%s.pem", dir, kid_b);
    snprintf(pending, sizeof pending, "%s.pending", final);
    size_t len = 0;
    char *bytes = slurp(pending, &len);
    keys_rotation_abort(rot);
    assert_int_equal(pep_write_file_atomic(pending, bytes, len, 0600), 0);
    assert_int_equal(keys_load_or_create(dir, &k2, &err), 0);
    assert_int_equal(keys_count(k2), 1); /* a .pending file is no key */
    assert_int_equal(keys_sql_load(k2, db, &err), 0);
    assert_false(file_exists(pending));
    assert_string_equal(keys_active_kid(k2), kid_a);
    keys_free(k2);
    free(bytes);

    /* After the commit, before the rename. */
    assert_int_equal(keys_rotation_begin(k, 1000, &rot, &err), 0);
    snprintf(kid_b, sizeof kid_b, "%s", keys_rotation_new_kid(rot));
    snprintf(final, sizeof final, "%s/keys/%s.pem", dir, kid_b);
    snprintf(pending, sizeof pending, "%s.pending", final);
    keys_rotation_set_retires_at(rot, 1200);
    assert_int_equal(keys_sql_rotate(db, rot), 0);
    bytes = slurp(pending, &len);
    keys_rotation_abort(rot); /* in memory: as if pep had died */
    assert_int_equal(pep_write_file_atomic(pending, bytes, len, 0600), 0);
    free(bytes);
    assert_int_equal(keys_load_or_create(dir, &k2, &err), 0);
    assert_string_equal(keys_active_kid(k2), kid_a); /* the files alone */
    assert_int_equal(keys_sql_load(k2, db, &err), 0);
    assert_string_equal(keys_active_kid(k2), kid_b); /* the store says */
    assert_true(file_exists(final));
    assert_false(file_exists(pending));
    assert_int_equal(keys_state_of(k2, kid_a, 1199), KEYS_VERIFYING);
    assert_int_equal(keys_state_of(k2, kid_a, 1200), KEYS_RETIRED);
    keys_free(k2);

    /* A key file no rotation made (dropped in by hand, newest of all): it does not sign,
     * and verifies checkpoints only. */
    struct keyring *stray = NULL;
    assert_int_equal(keys_rotate(dir, &stray, &err), 0); /* file-level: no record */
    char kid_x[KEYS_KID_LEN + 1];
    snprintf(kid_x, sizeof kid_x, "%s", keys_active_kid(stray));
    keys_free(stray);
    assert_int_equal(keys_load_or_create(dir, &k2, &err), 0);
    assert_string_equal(keys_active_kid(k2), kid_x); /* the newest file */
    assert_int_equal(keys_sql_load(k2, db, &err), 0);
    assert_string_equal(keys_active_kid(k2), kid_b);
    assert_int_equal(keys_state_of(k2, kid_x, 0), KEYS_RETIRED);
    assert_non_null(keys_public_key(k2, kid_x));
    assert_null(keys_token_key(k2, kid_x, 0));
    keys_free(k2);

    /* The key the store says signs is gone: pep does not start with another one. */
    assert_int_equal(unlink(final), 0);
    assert_int_equal(keys_load_or_create(dir, &k2, &err), 0);
    assert_int_equal(keys_sql_load(k2, db, &err), PEP_ENOTFOUND);
    assert_non_null(strstr(err.msg, kid_b));
    keys_free(k2);

    sqlite3_close(db);
    keys_free(k);
    rm_tmpdir(dir);
}

/* Token signatures on other threads while a rotation happens: none by the old key comes
 * after the rotation read what that key signed. */
static int64_t g_next_exp; /* atomic: the exp of the next token, shared by the signers */

struct signer {
    struct keyring *k;
    int stop; /* atomic */
    size_t n; /* tokens signed */
    char (*kids)[KEYS_KID_LEN + 1];
    int64_t *exps;
    size_t cap;
};

static void *signer_main(void *arg) {
    struct signer *s = arg;
    while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE) && s->n < s->cap) {
        int64_t exp = __atomic_add_fetch(&g_next_exp, 1, __ATOMIC_RELAXED);
        char *t = sign_token(s->k, 1, exp);
        kid_of(t, s->kids[s->n]);
        s->exps[s->n++] = exp;
        free(t);
    }
    return NULL;
}

static void test_rotation_holds_token_signatures(void **state) {
    (void)state;
    char *dir = make_tmpdir();
    struct keyring *k = NULL;
    struct keys_rotation *rot = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(dir, &k, &err), 0);
    char kid_a[KEYS_KID_LEN + 1];
    snprintf(kid_a, sizeof kid_a, "%s", keys_active_kid(k));
    enum { THREADS = 3, CAP = 20000 };
    struct signer s[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        s[i] = (struct signer){.k = k, .cap = CAP};
        s[i].kids = calloc(CAP, sizeof *s[i].kids);
        s[i].exps = calloc(CAP, sizeof *s[i].exps);
        assert_non_null(s[i].kids);
        assert_non_null(s[i].exps);
    }
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&th[i], NULL, signer_main, &s[i]), 0);
    usleep(20000);
    assert_int_equal(keys_rotation_begin(k, 1000, &rot, &err), 0);
    int64_t seen = keys_rotation_old_unrecorded_exp(rot, NULL, NULL);
    usleep(20000); /* signers wait meanwhile */
    keys_rotation_set_retires_at(rot, seen);
    keys_rotation_commit(rot);
    usleep(20000);
    for (int i = 0; i < THREADS; i++)
        __atomic_store_n(&s[i].stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    int64_t max_a = 0;
    size_t by_a = 0, by_b = 0;
    for (int i = 0; i < THREADS; i++)
        for (size_t j = 0; j < s[i].n; j++) {
            if (strcmp(s[i].kids[j], kid_a) == 0) {
                by_a++;
                if (s[i].exps[j] > max_a) max_a = s[i].exps[j];
            } else {
                by_b++;
            }
        }
    assert_true(by_a > 0);
    assert_true(by_b > 0);
    /* Every token A signed is one the rotation knew of. */
    assert_int_equal(max_a, seen);
    for (int i = 0; i < THREADS; i++) {
        free(s[i].kids);
        free(s[i].exps);
    }
    keys_free(k);
    rm_tmpdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checkpoint_sign_verify_rings),
        cmocka_unit_test(test_kept_checkpoint_in_the_chain),
        cmocka_unit_test(test_rotation_states),
        cmocka_unit_test(test_rotation_abort),
        cmocka_unit_test(test_rotation_persists),
        cmocka_unit_test(test_rotation_crash_windows),
        cmocka_unit_test(test_rotation_holds_token_signatures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
