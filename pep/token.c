/*
 * token.c — issuing and verifying pep's ES256 JWTs, and the verified-claims cache.
 *
 * Issue: the claims are built as a jansson object and signed by keys_sign_claims, the one
 * signing path pep has (keys.c: the active key, parsed at load).
 *
 * Verify, cheapest first, so that a token pep did not sign costs at most one signature
 * check and anything refused before it costs microseconds (each step refuses with its own
 * status; the first failure wins):
 *   1. size and shape: ≤ TOKEN_MAX_LEN bytes, exactly three dot-separated parts, every
 *      part in the base64url alphabet (MALFORMED);
 *   2. the header, decoded with OpenSSL's base64 (url alphabet mapped, padding restored,
 *      canonical form required) and parsed by jansson: alg exactly "ES256" (BAD_ALG), typ
 *      absent or "JWT" and no "crit" (MALFORMED), kid a key the keyring holds
 *      (UNKNOWN_KID);
 *   3. the payload, decoded the same way: a JSON object without duplicate members
 *      (MALFORMED); token_verify then type-checks the claims (MALFORMED) and checks iss,
 *      aud and the time window (see token.h for the exact edges);
 *   4. the signature, last: the canonical base64url of exactly 64 bytes, R‖S, rewritten
 *      as the DER ECDSA-Sig-Value OpenSSL expects and verified with EVP_DigestVerify
 *      (SHA-256) over the token's "header.payload" bytes, against the kid's public key as
 *      parsed when the keyring was loaded (BAD_SIGNATURE).  One P-256 verification, about
 *      50–60 µs here: the whole cost of a forged token.
 * A token with several faults is refused with the earliest one's status (a forged token
 * whose claims have expired is EXPIRED): that tells its author nothing he did not write.
 * SECURITY: the claims of an unverified payload are only read to refuse early, never
 * returned or cached: both happen only after step 4 succeeds.
 * SECURITY: step 2 stops algorithm confusion — the algorithm is ours, not the token's: an
 * HS256 token MAC'd with our public PEM, or alg "none", is refused before any key is
 * touched, and step 4 knows no algorithm but ES256.  libjwt is not used to verify: its
 * jwt_decode lets the token choose the algorithm and re-parses the PEM key on every call
 * (0.4–0.8 ms with OpenSSL 3), which made every forged token a millisecond of our CPU.
 * SECURITY: base64url must be canonical (RFC 4648 3.5: the unused low bits of the last
 * character zero), so that one signature has one spelling; without it, up to 16 spellings
 * of a token's signature part decode to the same bytes and verify.  ECDSA's own
 * malleability remains ((r, n − s) verifies as well as (r, s)); it lets someone who
 * already holds a valid token make a second valid spelling of it, nothing more: the jti,
 * the claims and revocation are the same.
 *
 * The cache (struct token_verifier) maps SHA-256(token bytes) to the verified claims and
 * to the issuer, audience and kid they were verified for.  It is a chained hash table
 * with an LRU list: when full, the least recently used entry goes (expired entries at the
 * cold end go first).  A hit re-checks issuer/audience (a mismatch falls back to a full
 * verification), that the kid is still in the keyring, and the time window at the new
 * `now`; an expired entry is dropped.  Failures are never cached.  Revocation and the
 * agent's state are the caller's live checks.
 *
 * Threads: every function may be called from any thread.  A verifier's table, list and
 * counters are guarded by its cache_lock, held only for lookups and inserts (never across
 * a signature check).  Claims are immutable once built; their refcount is atomic.  The
 * keyring's EVP_PKEYs are shared read-only; each verification has its own EVP_MD_CTX.
 */
#include "pep/token.h"

#include "pep/util.h"

#include <limits.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------------------------- */
/* Claims                                                                              */

struct token_claims *token_claims_retain(struct token_claims *c) {
    if (c) __atomic_add_fetch(&c->refcount, 1, __ATOMIC_RELAXED);
    return c;
}

static void token_claims_destroy(struct token_claims *c) {
    free(c->sub);
    free(c->jti);
    free(c->iss);
    free(c->aud);
    for (size_t i = 0; i < c->scopes_len; i++)
        free(c->scopes[i]);
    free(c->scopes);
    for (size_t i = 0; i < c->roles_len; i++)
        free(c->roles[i]);
    free(c->roles);
    free(c->acr);
    free(c);
}

void token_claims_release(struct token_claims *c) {
    if (c && __atomic_sub_fetch(&c->refcount, 1, __ATOMIC_ACQ_REL) == 0) token_claims_destroy(c);
}

const char *token_status_message(enum token_status st) {
    switch (st) {
    case TOKEN_OK:
        return "token valid";
    case TOKEN_MALFORMED:
        return "malformed token";
    case TOKEN_BAD_ALG:
        return "token algorithm not accepted";
    case TOKEN_UNKNOWN_KID:
        return "token signed by an unknown key";
    case TOKEN_BAD_SIGNATURE:
        return "token signature invalid";
    case TOKEN_WRONG_ISSUER:
        return "token issuer not accepted";
    case TOKEN_WRONG_AUDIENCE:
        return "token audience not accepted";
    case TOKEN_EXPIRED:
        return "token expired";
    case TOKEN_NOT_YET_VALID:
        return "token not yet valid";
    }
    return "invalid token";
}

/* ---------------------------------------------------------------------------------- */
/* Issue                                                                               */

/* Joins scopes with single spaces into a malloc'd string. */
static char *token_join_scopes(const char *const *scopes, size_t n) {
    size_t total = 1;
    for (size_t i = 0; i < n; i++)
        total += strlen(scopes[i]) + 1;
    char *out = malloc(total), *p = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(scopes[i]);
        if (i > 0) *p++ = ' ';
        memcpy(p, scopes[i], l);
        p += l;
    }
    *p = '\0';
    return out;
}

int token_issue(const struct keyring *k, const struct token_request *req, char **token,
                char jti_out[TOKEN_JTI_SIZE], struct pep_err *err) {
    json_t *claims = NULL, *roles = NULL;
    char jti[TOKEN_JTI_SIZE];
    char *scope = NULL, *jwt = NULL;
    uint8_t rnd[16];
    int64_t exp;
    int rc;

    *token = NULL;
    jti_out[0] = '\0';
    if (!req->issuer || !*req->issuer || !req->aud || !*req->aud || !req->sub || !*req->sub)
        return pep_err_set(err, PEP_EINVAL, "issuer, audience and subject are required");
    if (req->ttl_s <= 0 || __builtin_add_overflow(req->now_s, req->ttl_s, &exp))
        return pep_err_set(err, PEP_EINVAL, "token lifetime must be positive");
    if (req->scopes_len > TOKEN_MAX_SCOPES || req->roles_len > TOKEN_MAX_ROLES)
        return pep_err_set(err, PEP_EINVAL, "at most %d scopes and %d roles", TOKEN_MAX_SCOPES,
                           TOKEN_MAX_ROLES);
    /* The scope claim is space-separated: a scope with a space in it would split. */
    for (size_t i = 0; i < req->scopes_len; i++) {
        if (!pep_is_scope_token(req->scopes[i]))
            return pep_err_set(err, PEP_EINVAL,
                               "scope %zu is empty or has a character "
                               "outside RFC 6749 scope-token",
                               i);
    }
    for (size_t i = 0; i < req->roles_len; i++) {
        if (!req->roles[i] || !*req->roles[i])
            return pep_err_set(err, PEP_EINVAL, "role %zu is empty", i);
    }
    if (req->acr && !*req->acr) return pep_err_set(err, PEP_EINVAL, "acr is empty");

    if ((rc = pep_random_bytes(rnd, sizeof rnd)) != 0)
        return pep_err_set(err, rc, "no randomness for the token id");
    pep_hex(rnd, sizeof rnd, jti);
    /* json_pack refuses strings that are not UTF-8, as it refuses a failed allocation. */
    claims = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I}", "iss", req->issuer, "aud", req->aud,
                       "sub", req->sub, "jti", jti, "iat", (json_int_t)req->now_s, "nbf",
                       (json_int_t)req->now_s, "exp", (json_int_t)exp);
    if (!claims) {
        rc = pep_err_set(err, PEP_EINVAL, "cannot build the claims (not UTF-8?)");
        goto out;
    }
    if (req->scopes_len > 0) {
        scope = token_join_scopes(req->scopes, req->scopes_len);
        if (!scope || json_object_set_new(claims, "scope", json_string(scope)) != 0) {
            rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
            goto out;
        }
    }
    if (req->roles_len > 0) {
        roles = json_array();
        if (!roles) {
            rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < req->roles_len; i++) {
            if (json_array_append_new(roles, json_string(req->roles[i])) != 0) {
                rc = pep_err_set(err, PEP_EINVAL, "cannot add role %zu (not UTF-8?)", i);
                goto out;
            }
        }
        int set = json_object_set_new(claims, "roles", roles);
        roles = NULL; /* consumed, even on failure */
        if (set != 0) {
            rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
            goto out;
        }
    }
    if (req->acr) {
        if (json_object_set_new(claims, "acr", json_string(req->acr)) != 0 ||
            json_object_set_new(claims, "auth_time", json_integer(req->now_s)) != 0) {
            rc = pep_err_set(err, PEP_EINVAL, "cannot add acr (not UTF-8?)");
            goto out;
        }
    }
    if ((rc = keys_sign_claims(k, claims, &jwt, err)) != 0) goto out;
    if (strlen(jwt) > TOKEN_MAX_LEN) {
        rc = pep_err_set(err, PEP_EINVAL, "token would exceed %d bytes", TOKEN_MAX_LEN);
        goto out;
    }
    memcpy(jti_out, jti, sizeof jti);
    *token = jwt;
    jwt = NULL;
    rc = 0;
out:
    free(jwt);
    free(scope);
    json_decref(roles);
    json_decref(claims);
    return rc;
}

/* ---------------------------------------------------------------------------------- */
/* Parsing and the signature                                                           */

/* A token cut into its parts by token_parse, with what the cheap checks found. */
struct token_parsed {
    size_t signed_len;          /* bytes of "header.payload": what the signature covers */
    const char *sig;            /* the signature part (base64url), inside the token */
    size_t sig_len;             /* its length in characters */
    EVP_PKEY *key;              /* the public key the header's kid names; the keyring's */
    char kid[KEYS_KID_LEN + 1]; /* that kid */
    json_t *payload;            /* the payload object, unverified until step 4; owned */
};

/* Characters of the base64url of a 64-byte ES256 signature, unpadded. */
#define TOKEN_SIG_B64_LEN ((KEYS_ES256_SIG_LEN * 4 + 2) / 3)

/* Room EVP_DecodeBlock needs for n base64url characters once padded. */
#define TOKEN_B64_DECODED_CAP(n) (((n) + 3) / 4 * 3)

static bool token_is_b64url(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_'))
            return false;
    }
    return true;
}

/*
 * Decodes n unpadded base64url characters (already checked against the alphabet) with
 * OpenSSL into out, which has room for TOKEN_B64_DECODED_CAP(n) bytes.  Returns the
 * decoded length, or -1 when n is no possible length, the last character has unused bits
 * set (not the canonical encoding), or an allocation failed.
 */
static long token_b64url_decode(const char *s, size_t n, unsigned char *out) {
    char small[TOKEN_SIG_B64_LEN + 3], *in = small; /* a signature needs no allocation */
    long decoded = -1;

    if (n % 4 == 1 || n > INT_MAX - 3) return -1;
    size_t padded = (n + 3) / 4 * 4, pad = padded - n;
    if (padded > sizeof small && !(in = malloc(padded))) return -1;
    for (size_t i = 0; i < n; i++)
        in[i] = s[i] == '-' ? '+' : s[i] == '_' ? '/' : s[i];
    memset(in + n, '=', pad);
    /* EVP_DecodeBlock counts the padding as zero bytes; they are dropped below. */
    int m = EVP_DecodeBlock(out, (const unsigned char *)in, (int)padded);
    if (m < 0 || (size_t)m < pad) goto out;
    decoded = m - (long)pad;
    /* Canonical form: the last, partial group must be what encoding its bytes gives. */
    size_t tail = n % 4;
    if (tail) {
        unsigned char again[5];
        EVP_EncodeBlock(again, out + decoded - (long)(tail - 1), (int)(tail - 1));
        if (memcmp(again, in + n - tail, tail) != 0) decoded = -1;
    }
out:
    if (in != small) free(in);
    return decoded;
}

/* Decodes a base64url part and parses it as a JSON object (duplicate members refused).
 * Returns a new reference or NULL. */
static json_t *token_b64url_json(const char *s, size_t n) {
    if (n == 0) return NULL;
    unsigned char *buf = malloc(TOKEN_B64_DECODED_CAP(n));
    if (!buf) return NULL;
    long m = token_b64url_decode(s, n, buf);
    json_t *j =
        m < 0 ? NULL : json_loadb((const char *)buf, (size_t)m, JSON_REJECT_DUPLICATES, NULL);
    free(buf);
    if (j && !json_is_object(j)) {
        json_decref(j);
        j = NULL;
    }
    return j;
}

/* token_parse's key_time for a checkpoint: any key of the ring, retired ones included. */
#define TOKEN_ANY_KEY INT64_MIN

/*
 * Steps 1–3 of the verification (see the top of the file), without the claim checks:
 * shape, header, kid, payload object.  The kid must name a key that verifies tokens at
 * key_time (active or verifying), or, with TOKEN_ANY_KEY, any key of the ring (audit
 * checkpoints: a retired key still verifies what it signed).  On TOKEN_OK, p is filled
 * and p->payload must be released; otherwise p holds nothing to release.
 */
static enum token_status token_parse(const struct keyring *k, const char *token, size_t len,
                                     int64_t key_time, struct token_parsed *p) {
    json_t *header = NULL;
    enum token_status st = TOKEN_MALFORMED;

    memset(p, 0, sizeof *p);
    const char *dot1 = memchr(token, '.', len);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
    if (!dot2 || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token))) return TOKEN_MALFORMED;
    size_t head_len = (size_t)(dot1 - token), body_len = (size_t)(dot2 - dot1 - 1);
    size_t sig_len = len - (size_t)(dot2 + 1 - token);
    if (!token_is_b64url(token, head_len) || !token_is_b64url(dot1 + 1, body_len) ||
        !token_is_b64url(dot2 + 1, sig_len))
        return TOKEN_MALFORMED;

    header = token_b64url_json(token, head_len);
    if (!header) goto out;
    /* SECURITY: alg pinned before any key is touched; exact match ("es256" is refused). */
    const char *alg = json_string_value(json_object_get(header, "alg"));
    if (!alg || strcmp(alg, "ES256") != 0) {
        st = TOKEN_BAD_ALG;
        goto out;
    }
    json_t *typ = json_object_get(header, "typ");
    if ((typ && (!json_is_string(typ) || strcasecmp(json_string_value(typ), "JWT") != 0)) ||
        json_object_get(header, "crit"))
        goto out; /* RFC 7515 4.1.11: we understand no critical extension */
    const char *kid = json_string_value(json_object_get(header, "kid"));
    EVP_PKEY *key =
        key_time == TOKEN_ANY_KEY ? keys_public_key(k, kid) : keys_token_key(k, kid, key_time);
    if (!key || strlen(kid) != KEYS_KID_LEN) {
        st = TOKEN_UNKNOWN_KID;
        goto out;
    }
    p->payload = token_b64url_json(dot1 + 1, body_len);
    if (!p->payload) goto out;
    memcpy(p->kid, kid, KEYS_KID_LEN + 1);
    p->key = key;
    p->signed_len = (size_t)(dot2 - token);
    p->sig = dot2 + 1;
    p->sig_len = sig_len;
    st = TOKEN_OK;
out:
    json_decref(header);
    return st;
}

/*
 * Step 4: the ES256 signature of a parsed token.  A JWS carries R‖S (RFC 7518 3.4);
 * OpenSSL verifies a DER ECDSA-Sig-Value, so the two halves become its INTEGERs.
 * TOKEN_OK, TOKEN_BAD_SIGNATURE, or TOKEN_MALFORMED when an allocation failed.
 */
static enum token_status token_check_signature(const char *token, const struct token_parsed *p) {
    unsigned char raw[TOKEN_B64_DECODED_CAP(TOKEN_SIG_B64_LEN)];
    unsigned char der[KEYS_ES256_DER_MAX], *der_end = der;
    ECDSA_SIG *sig = NULL;
    BIGNUM *r = NULL, *s = NULL;
    EVP_MD_CTX *ctx = NULL;
    enum token_status st = TOKEN_MALFORMED;

    /* A signature of any other length is not ES256 (libjwt refuses it too). */
    if (p->sig_len != TOKEN_SIG_B64_LEN ||
        token_b64url_decode(p->sig, p->sig_len, raw) != KEYS_ES256_SIG_LEN)
        return TOKEN_BAD_SIGNATURE;
    sig = ECDSA_SIG_new();
    r = BN_bin2bn(raw, KEYS_ES256_SIG_LEN / 2, NULL);
    s = BN_bin2bn(raw + KEYS_ES256_SIG_LEN / 2, KEYS_ES256_SIG_LEN / 2, NULL);
    if (!sig || !r || !s || ECDSA_SIG_set0(sig, r, s) != 1) goto out;
    r = s = NULL; /* owned by sig now */
    int der_len = i2d_ECDSA_SIG(sig, NULL);
    if (PEP_NEVER(der_len <= 0 || der_len > (int)sizeof der) ||
        i2d_ECDSA_SIG(sig, &der_end) != der_len)
        goto out;
    ctx = EVP_MD_CTX_new();
    if (!ctx || EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, p->key) != 1) goto out;
    int verified =
        EVP_DigestVerify(ctx, der, (size_t)der_len, (const unsigned char *)token, p->signed_len);
    st = verified == 1 ? TOKEN_OK : TOKEN_BAD_SIGNATURE;
out:
    /* A refused signature leaves reasons on this thread's OpenSSL error queue. */
    if (st != TOKEN_OK) ERR_clear_error();
    EVP_MD_CTX_free(ctx);
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    return st;
}

enum token_status token_verify_signature(const struct keyring *k, const char *jwt,
                                         json_t **claims_out) {
    struct token_parsed p;
    *claims_out = NULL;
    if (!k || !jwt) return TOKEN_MALFORMED;
    size_t len = strnlen(jwt, TOKEN_MAX_LEN + 1);
    if (len == 0 || len > TOKEN_MAX_LEN) return TOKEN_MALFORMED;
    enum token_status st = token_parse(k, jwt, len, TOKEN_ANY_KEY, &p);
    if (st != TOKEN_OK) return st;
    st = token_check_signature(jwt, &p);
    if (st == TOKEN_OK)
        *claims_out = p.payload;
    else
        json_decref(p.payload);
    return st;
}

const char *token_check_checkpoint(void *keyring, const char *jwt, json_t **claims) {
    switch (token_verify_signature(keyring, jwt, claims)) {
    case TOKEN_OK:
        return NULL;
    case TOKEN_BAD_SIGNATURE:
        return "signature invalid";
    case TOKEN_UNKNOWN_KID:
        return "signed by an unknown key";
    case TOKEN_BAD_ALG:
        return "algorithm is not ES256";
    default: /* malformed, or an allocation failed: refused either way (fail closed) */
        return "malformed jwt";
    }
}

/* ---------------------------------------------------------------------------------- */
/* Claims checks                                                                       */

/* Reads an optional string member: true when absent or a string. */
static bool token_opt_string(const json_t *o, const char *name, const char **out) {
    json_t *v = json_object_get(o, name);
    *out = v ? json_string_value(v) : NULL;
    return !v || json_is_string(v);
}

static bool token_opt_int(const json_t *o, const char *name, bool *present, int64_t *out) {
    json_t *v = json_object_get(o, name);
    *present = v != NULL;
    if (v && !json_is_integer(v)) return false;
    *out = v ? (int64_t)json_integer_value(v) : 0;
    return true;
}

/* Splits a space-separated scope claim; empty segments are malformed. */
static bool token_split_scopes(const char *s, struct token_claims *c) {
    if (!*s) return true;
    size_t n = 1;
    for (const char *p = s; *p; p++)
        n += *p == ' ';
    if (n > TOKEN_MAX_SCOPES) return false;
    c->scopes = calloc(n, sizeof *c->scopes);
    if (!c->scopes) return false;
    const char *start = s;
    for (;;) {
        const char *end = strchr(start, ' ');
        size_t l = end ? (size_t)(end - start) : strlen(start);
        if (l == 0) return false;
        c->scopes[c->scopes_len] = strndup(start, l);
        if (!c->scopes[c->scopes_len]) return false;
        c->scopes_len++;
        if (!end) return true;
        start = end + 1;
    }
}

/*
 * Type-checks the payload and builds claims; then checks iss and aud.  Any type problem
 * is TOKEN_MALFORMED, whatever else is wrong.
 */
static enum token_status token_claims_build(const json_t *o, const char *issuer,
                                            const char *audience, struct token_claims **out) {
    const char *iss, *sub, *jti, *scope, *acr;
    int64_t iat = 0, exp = 0, nbf = 0, auth_time = 0;
    bool has_iat, has_exp, has_nbf, has_auth_time;
    bool aud_ok = false;
    enum token_status st = TOKEN_MALFORMED;

    *out = NULL;
    if (!token_opt_string(o, "iss", &iss) || !iss || !token_opt_string(o, "sub", &sub) || !sub ||
        !token_opt_string(o, "jti", &jti) || !jti || !token_opt_int(o, "iat", &has_iat, &iat) ||
        !has_iat || !token_opt_int(o, "exp", &has_exp, &exp) || !has_exp ||
        !token_opt_int(o, "nbf", &has_nbf, &nbf) || !token_opt_string(o, "scope", &scope) ||
        !token_opt_string(o, "acr", &acr) ||
        !token_opt_int(o, "auth_time", &has_auth_time, &auth_time))
        return TOKEN_MALFORMED;
    json_t *aud = json_object_get(o, "aud");
    if (json_is_string(aud)) {
        aud_ok = strcmp(json_string_value(aud), audience) == 0;
    } else if (json_is_array(aud)) {
        size_t i;
        json_t *a;
        json_array_foreach(aud, i, a) {
            if (!json_is_string(a)) return TOKEN_MALFORMED;
        }
        /* SPEC 3.1: aud *equals* ours.  A token for several audiences is refused: one
         * naming both "pep" and "pep-admin" would open both planes. */
        aud_ok = json_array_size(aud) == 1 &&
                 strcmp(json_string_value(json_array_get(aud, 0)), audience) == 0;
    } else {
        return TOKEN_MALFORMED;
    }
    json_t *roles = json_object_get(o, "roles");
    if (roles && (!json_is_array(roles) || json_array_size(roles) > TOKEN_MAX_ROLES))
        return TOKEN_MALFORMED;

    struct token_claims *c = calloc(1, sizeof *c);
    if (!c) return TOKEN_MALFORMED;
    c->refcount = 1;
    c->iat = iat;
    c->exp = exp;
    c->nbf = has_nbf ? nbf : iat;
    c->auth_time = has_auth_time ? auth_time : 0;
    c->sub = strdup(sub);
    c->jti = strdup(jti);
    c->iss = strdup(iss);
    c->aud = strdup(audience);
    if (!c->sub || !c->jti || !c->iss || !c->aud || (acr && !(c->acr = strdup(acr)))) goto out;
    if (scope && !token_split_scopes(scope, c)) goto out;
    if (roles) {
        size_t n = json_array_size(roles), i;
        json_t *r;
        c->roles = calloc(n ? n : 1, sizeof *c->roles);
        if (!c->roles) goto out;
        json_array_foreach(roles, i, r) {
            if (!json_is_string(r) || !(c->roles[i] = strdup(json_string_value(r)))) goto out;
            c->roles_len = i + 1;
        }
    }
    /* Types are sound; now the values. */
    if (strcmp(iss, issuer) != 0) {
        st = TOKEN_WRONG_ISSUER;
        goto out;
    }
    if (!aud_ok) {
        st = TOKEN_WRONG_AUDIENCE;
        goto out;
    }
    *out = c;
    return TOKEN_OK;
out:
    token_claims_destroy(c);
    return st;
}

static bool token_is_expired(const struct token_claims *c, int64_t now_s, int64_t skew_s) {
    int64_t floor;
    /* now - skew >= exp ⇔ now >= exp + skew, without overflowing on a hostile exp. */
    if (__builtin_sub_overflow(now_s, skew_s, &floor)) floor = INT64_MIN;
    return floor >= c->exp;
}

static enum token_status token_check_times(const struct token_claims *c, int64_t now_s,
                                           int64_t skew_s) {
    int64_t ceiling;
    if (token_is_expired(c, now_s, skew_s)) return TOKEN_EXPIRED;
    if (__builtin_add_overflow(now_s, skew_s, &ceiling)) ceiling = INT64_MAX;
    if (c->nbf > ceiling || c->iat > ceiling) return TOKEN_NOT_YET_VALID;
    return TOKEN_OK;
}

/* ---------------------------------------------------------------------------------- */
/* Cache                                                                               */

struct token_cache_entry {
    uint8_t digest[32];                   /* SHA-256 of the token bytes: the key */
    struct token_cache_entry *chain_next; /* next entry in the same bucket */
    struct token_cache_entry *lru_prev;   /* towards the most recently used */
    struct token_cache_entry *lru_next;   /* towards the least recently used */
    struct token_claims *claims;          /* one reference owned by the entry */
    char *issuer;                         /* the issuer and audience it was verified for */
    char *audience;
    char kid[KEYS_KID_LEN + 1]; /* its signing key, still held on every hit */
};

struct token_verifier {
    pthread_mutex_t cache_lock;         /* guards every field below */
    struct token_cache_entry **buckets; /* chained hash table, power-of-two size */
    size_t mask;                        /* bucket count - 1 */
    struct token_cache_entry lru;       /* sentinel: lru.lru_next is the most recent */
    struct token_cache_stats stats;     /* counters; stats.entries = entries held */
};

#define TOKEN_CACHE_DEFAULT 65536
#define TOKEN_CACHE_MAX (1u << 24)
#define TOKEN_CACHE_EXPIRED_SWEEP 4 /* expired cold entries dropped per insert */

struct token_verifier *token_verifier_new(size_t capacity) {
    if (capacity == 0) capacity = TOKEN_CACHE_DEFAULT;
    if (capacity > TOKEN_CACHE_MAX) capacity = TOKEN_CACHE_MAX;
    size_t buckets = 16;
    while (buckets < capacity)
        buckets *= 2;
    struct token_verifier *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    v->buckets = calloc(buckets, sizeof *v->buckets);
    if (!v->buckets || pthread_mutex_init(&v->cache_lock, NULL) != 0) {
        free(v->buckets);
        free(v);
        return NULL;
    }
    v->mask = buckets - 1;
    v->lru.lru_next = v->lru.lru_prev = &v->lru;
    v->stats.capacity = capacity;
    return v;
}

static void token_cache_entry_free(struct token_cache_entry *e) {
    token_claims_release(e->claims);
    free(e->issuer);
    free(e->audience);
    free(e);
}

static size_t token_cache_index(const struct token_verifier *v, const uint8_t digest[32]) {
    uint64_t h;
    memcpy(&h, digest, sizeof h); /* a SHA-256 prefix is already uniform */
    return (size_t)(h & v->mask);
}

static struct token_cache_entry **token_cache_slot(struct token_verifier *v,
                                                   const uint8_t digest[32]) {
    struct token_cache_entry **p = &v->buckets[token_cache_index(v, digest)];
    while (*p && memcmp((*p)->digest, digest, 32) != 0)
        p = &(*p)->chain_next;
    return p;
}

static void token_lru_unlink(struct token_cache_entry *e) {
    e->lru_prev->lru_next = e->lru_next;
    e->lru_next->lru_prev = e->lru_prev;
}

static void token_lru_push_front(struct token_verifier *v, struct token_cache_entry *e) {
    e->lru_prev = &v->lru;
    e->lru_next = v->lru.lru_next;
    v->lru.lru_next->lru_prev = e;
    v->lru.lru_next = e;
}

/* Unlinks e from its bucket and the LRU list and frees it.  Caller holds cache_lock. */
static void token_cache_remove(struct token_verifier *v, struct token_cache_entry *e) {
    struct token_cache_entry **p = token_cache_slot(v, e->digest);
    if (PEP_NEVER(*p != e)) return;
    *p = e->chain_next;
    token_lru_unlink(e);
    v->stats.entries--;
    token_cache_entry_free(e);
}

void token_verifier_flush(struct token_verifier *v) {
    if (!v) return;
    pthread_mutex_lock(&v->cache_lock);
    struct token_cache_entry *e = v->lru.lru_next;
    while (e != &v->lru) {
        struct token_cache_entry *next = e->lru_next;
        token_cache_entry_free(e);
        e = next;
    }
    v->lru.lru_next = v->lru.lru_prev = &v->lru;
    memset(v->buckets, 0, (v->mask + 1) * sizeof *v->buckets);
    v->stats.entries = 0;
    pthread_mutex_unlock(&v->cache_lock);
}

void token_verifier_free(struct token_verifier *v) {
    if (!v) return;
    token_verifier_flush(v);
    pthread_mutex_destroy(&v->cache_lock);
    free(v->buckets);
    free(v);
}

void token_verifier_stats(struct token_verifier *v, struct token_cache_stats *out) {
    pthread_mutex_lock(&v->cache_lock);
    *out = v->stats;
    pthread_mutex_unlock(&v->cache_lock);
}

/*
 * Answers from the cache when it can: true with *st set (and *claims retained on
 * TOKEN_OK) for an entry verified for the same issuer and audience whose key is still
 * held; false when a full verification is needed.
 */
static bool token_cache_lookup(struct token_verifier *v, const struct keyring *k,
                               const uint8_t digest[32], const char *issuer, const char *audience,
                               int64_t now_s, int64_t skew_s, struct token_claims **claims,
                               enum token_status *st) {
    bool answered = false;
    pthread_mutex_lock(&v->cache_lock);
    struct token_cache_entry *e = *token_cache_slot(v, digest);
    if (!e || strcmp(e->issuer, issuer) != 0 || strcmp(e->audience, audience) != 0) goto out;
    /* SECURITY: a key dropped from the keyring, or retired, must stop its tokens at once,
     * cached or not. */
    if (!keys_token_key(k, e->kid, now_s)) {
        token_cache_remove(v, e);
        goto out;
    }
    *st = token_check_times(e->claims, now_s, skew_s);
    if (*st == TOKEN_EXPIRED) {
        token_cache_remove(v, e);
        v->stats.expired++;
    } else {
        if (*st == TOKEN_OK) *claims = token_claims_retain(e->claims);
        token_lru_unlink(e);
        token_lru_push_front(v, e);
    }
    answered = true;
    v->stats.hits++;
out:
    if (!answered) v->stats.misses++;
    pthread_mutex_unlock(&v->cache_lock);
    return answered;
}

/* Stores a successful verification (the entry takes its own reference to c). */
static void token_cache_insert(struct token_verifier *v, const uint8_t digest[32],
                               struct token_claims *c, const char *issuer, const char *audience,
                               const char *kid, int64_t now_s, int64_t skew_s) {
    /* Allocate outside the lock; an allocation failure only costs the caching. */
    struct token_cache_entry *n = calloc(1, sizeof *n);
    if (!n) return;
    n->issuer = strdup(issuer);
    n->audience = strdup(audience);
    if (!n->issuer || !n->audience) {
        free(n->issuer);
        free(n->audience);
        free(n);
        return;
    }
    memcpy(n->digest, digest, 32);
    memcpy(n->kid, kid, KEYS_KID_LEN + 1);
    n->claims = token_claims_retain(c);

    pthread_mutex_lock(&v->cache_lock);
    struct token_cache_entry **slot = token_cache_slot(v, digest);
    if (*slot) {
        /* Same token verified again (another audience, or a concurrent miss): replace. */
        token_cache_remove(v, *slot);
        slot = token_cache_slot(v, digest);
    }
    for (int i = 0; i < TOKEN_CACHE_EXPIRED_SWEEP && v->lru.lru_prev != &v->lru; i++) {
        struct token_cache_entry *cold = v->lru.lru_prev;
        if (!token_is_expired(cold->claims, now_s, skew_s)) break;
        token_cache_remove(v, cold);
        v->stats.expired++;
    }
    while (v->stats.entries >= v->stats.capacity && v->lru.lru_prev != &v->lru) {
        token_cache_remove(v, v->lru.lru_prev);
        v->stats.evictions++;
    }
    /* Removals may have unlinked the entry slot pointed into. */
    slot = token_cache_slot(v, digest);
    n->chain_next = NULL;
    *slot = n;
    token_lru_push_front(v, n);
    v->stats.entries++;
    v->stats.inserts++;
    pthread_mutex_unlock(&v->cache_lock);
}

/* ---------------------------------------------------------------------------------- */
/* Verify                                                                              */

enum token_status token_verify(struct token_verifier *v, const struct keyring *k, const char *token,
                               const char *issuer, const char *audience, int64_t now_s,
                               int64_t skew_s, struct token_claims **claims) {
    struct token_parsed p;
    uint8_t digest[32];
    struct token_claims *c = NULL;
    enum token_status st;

    *claims = NULL;
    if (!k || !token || !issuer || !audience) return TOKEN_MALFORMED;
    if (skew_s < 0) skew_s = 0;
    size_t len = strnlen(token, TOKEN_MAX_LEN + 1);
    if (len == 0 || len > TOKEN_MAX_LEN) return TOKEN_MALFORMED;
    /* SECURITY: without a digest (hashing failed) the cache is neither read nor written,
     * so two tokens can never share an entry. */
    if (v && pep_sha256_parts(token, len, "", 0, digest) != 0) v = NULL;
    if (v) {
        if (token_cache_lookup(v, k, digest, issuer, audience, now_s, skew_s, claims, &st))
            return st;
    }
    st = token_parse(k, token, len, now_s, &p);
    if (st != TOKEN_OK) return st;
    st = token_claims_build(p.payload, issuer, audience, &c);
    json_decref(p.payload);
    if (st == TOKEN_OK) st = token_check_times(c, now_s, skew_s);
    /* SECURITY: only now the signature, the one costly check; until it passes, c is the
     * unverified claims of whoever wrote the token, used for nothing but refusing. */
    if (st == TOKEN_OK) st = token_check_signature(token, &p);
    if (st != TOKEN_OK) {
        token_claims_release(c);
        return st;
    }
    if (v) token_cache_insert(v, digest, c, issuer, audience, p.kid, now_s, skew_s);
    *claims = c;
    return TOKEN_OK;
}
