/*
 * test_token.c — unit tests for pep/keys.c and pep/token.c.
 *
 * Keys: files, modes, reload, the RFC 7638 kid checked against a value computed here from
 * the RFC 7515 A.3 example key, JWKS shape, rotation.  Tokens: a table of claim sets and
 * verification parameters (time edges, issuer, audience, claim types), hand-built attack
 * tokens (alg none, HS256 keyed with our public PEM, another key claiming our kid, a
 * flipped signature byte, malformed shapes), issue round trips, the claims cache and the
 * signed audit checkpoint.  Against libjwt as the reference: a generated corpus (signed
 * tokens and ~2 000 mutants of them: truncations, flipped signature bytes, changed
 * characters, swapped alg and kid, algorithm-confusion tokens) on which pep's OpenSSL
 * verifier must accept only what the keyring signed and nothing libjwt's jwt_decode (alg
 * pinned to ES256) refuses; signing round trips through libjwt, including signatures
 * whose R or S has leading zero bytes; the order of the checks (the signature last).
 * Each test uses its own mkdtemp directory under /tmp.
 *
 * Single-threaded except test_cache_threads, which shares one verifier across threads.
 */
#include "pep/keys.h"
#include "pep/token.h"
#include "pep/util.h"

#include <ftw.h>
#include <jwt.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <pthread.h>
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

#define ISS "pep"
#define AUD "pep"
#define AUD_ADMIN "pep-admin"

/* ---------------------------------------------------------------------------------- */
/* Helpers                                                                             */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_rf(const char *dir) {
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static char *make_tmpdir(void) {
    char *t = strdup("/tmp/pep-token-XXXXXX");
    assert_non_null(t);
    assert_non_null(mkdtemp(t));
    return t;
}

static unsigned file_mode(const char *path) {
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (unsigned)(st.st_mode & 07777);
}

/* base64url without padding, done here with OpenSSL directly (independent of util.c). */
static void test_b64url(const uint8_t *in, size_t n, char *out) {
    int m = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    while (m > 0 && out[m - 1] == '=')
        m--;
    out[m] = '\0';
    for (char *p = out; *p; p++)
        *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
}

static size_t test_b64url_decode(const char *s, uint8_t *out) {
    char in[256];
    size_t n = strlen(s), padded = (n + 3) / 4 * 4;
    assert_true(padded < sizeof in);
    for (size_t i = 0; i < n; i++)
        in[i] = s[i] == '-' ? '+' : s[i] == '_' ? '/' : s[i];
    memset(in + n, '=', padded - n);
    int m = EVP_DecodeBlock(out, (unsigned char *)in, (int)padded);
    assert_true(m >= 0);
    return (size_t)m - (padded - n);
}

/* "b64url(header).b64url(payload).sig" from JSON texts. */
static char *hand_token(const char *header, const char *payload, const char *sig) {
    char *h = pep_base64url_encode((const uint8_t *)header, strlen(header));
    char *p = pep_base64url_encode((const uint8_t *)payload, strlen(payload));
    assert_non_null(h);
    assert_non_null(p);
    size_t n = strlen(h) + strlen(p) + strlen(sig) + 3;
    char *t = malloc(n);
    assert_non_null(t);
    snprintf(t, n, "%s.%s.%s", h, p, sig);
    free(h);
    free(p);
    return t;
}

/* Signs payload JSON text with libjwt: any alg, any key bytes, any kid header. */
static char *libjwt_token(jwt_alg_t alg, const unsigned char *key, size_t key_len, const char *kid,
                          const char *payload) {
    jwt_t *j = NULL;
    assert_int_equal(jwt_new(&j), 0);
    assert_int_equal(jwt_set_alg(j, alg, key, (int)key_len), 0);
    if (kid) assert_int_equal(jwt_add_header(j, "kid", kid), 0);
    assert_int_equal(jwt_add_grants_json(j, payload), 0);
    char *t = jwt_encode_str(j);
    assert_non_null(t);
    jwt_free(j);
    return t;
}

/* Signs payload JSON text with the keyring (the production signing path). */
static char *sign_json(const struct keyring *k, const char *payload) {
    json_t *claims = json_loads(payload, 0, NULL);
    assert_non_null(claims);
    char *t = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_sign_claims(k, claims, &t, &err), 0);
    json_decref(claims);
    return t;
}

/* Decodes a token's header into a JSON object. */
static json_t *token_header(const char *token) {
    uint8_t buf[512];
    char part[512];
    const char *dot = strchr(token, '.');
    assert_non_null(dot);
    assert_true((size_t)(dot - token) < sizeof part);
    memcpy(part, token, (size_t)(dot - token));
    part[dot - token] = '\0';
    size_t n = test_b64url_decode(part, buf);
    json_t *h = json_loadb((const char *)buf, n, 0, NULL);
    assert_non_null(h);
    return h;
}

/* Shared fixture: one keyring for the token tests, and a second, unrelated one. */
struct fixture {
    char *dir, *other_dir;
    struct keyring *k, *other;
};

static struct fixture fx;

static int group_setup(void **state) {
    (void)state;
    struct pep_err err = {0};
    fx.dir = make_tmpdir();
    fx.other_dir = make_tmpdir();
    if (keys_load_or_create(fx.dir, &fx.k, &err) != 0 ||
        keys_load_or_create(fx.other_dir, &fx.other, &err) != 0) {
        fprintf(stderr, "setup: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    keys_free(fx.k);
    keys_free(fx.other);
    rm_rf(fx.dir);
    rm_rf(fx.other_dir);
    free(fx.dir);
    free(fx.other_dir);
    return 0;
}

/* ---------------------------------------------------------------------------------- */
/* Keys                                                                                */

static void test_keys_create_and_reload(void **state) {
    (void)state;
    char *tmp = make_tmpdir();
    char data[512], keysdir[600], file[700];
    snprintf(data, sizeof data, "%s/data", tmp); /* missing: must be created */
    snprintf(keysdir, sizeof keysdir, "%s/keys", data);
    struct keyring *k = NULL, *k2 = NULL;
    struct pep_err err = {0};

    assert_int_equal(keys_load_or_create(data, &k, &err), 0);
    assert_int_equal(keys_count(k), 1);
    const char *kid = keys_active_kid(k);
    assert_int_equal(strlen(kid), KEYS_KID_LEN);
    snprintf(file, sizeof file, "%s/%s.pem", keysdir, kid);
    assert_int_equal(file_mode(data), 0700);
    assert_int_equal(file_mode(keysdir), 0700);
    assert_int_equal(file_mode(file), 0600);

    size_t priv_len = 0, pub_len = 0;
    const unsigned char *priv = keys_active_private_pem(k, &priv_len);
    assert_non_null(strstr((const char *)priv, "-----BEGIN PRIVATE KEY-----"));
    assert_int_equal(strlen((const char *)priv), priv_len);
    const unsigned char *pub = keys_public_pem(k, kid, &pub_len);
    assert_non_null(pub);
    assert_non_null(strstr((const char *)pub, "-----BEGIN PUBLIC KEY-----"));
    assert_null(keys_public_pem(k, "no-such-kid", &pub_len));
    assert_null(keys_public_pem(k, NULL, &pub_len));

    /* Reload: same single key, no new file. */
    assert_int_equal(keys_load_or_create(data, &k2, &err), 0);
    assert_int_equal(keys_count(k2), 1);
    assert_string_equal(keys_active_kid(k2), kid);

    keys_free(k);
    keys_free(k2);
    rm_rf(tmp);
    free(tmp);
}

/* RFC 7515 appendix A.3: the ES256 example key. */
static const char RFC_X[] = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
static const char RFC_Y[] = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
static const char RFC_D[] = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";

static EVP_PKEY *rfc7515_key(void) {
    uint8_t d[40], pub[65];
    pub[0] = 4; /* uncompressed point */
    assert_int_equal(test_b64url_decode(RFC_D, d), 32);
    assert_int_equal(test_b64url_decode(RFC_X, pub + 1), 32);
    assert_int_equal(test_b64url_decode(RFC_Y, pub + 33), 32);
    BIGNUM *priv = BN_bin2bn(d, 32, NULL);
    OSSL_PARAM_BLD *b = OSSL_PARAM_BLD_new();
    assert_non_null(priv);
    assert_non_null(b);
    assert_int_equal(
        OSSL_PARAM_BLD_push_utf8_string(b, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0), 1);
    assert_int_equal(OSSL_PARAM_BLD_push_BN(b, OSSL_PKEY_PARAM_PRIV_KEY, priv), 1);
    assert_int_equal(OSSL_PARAM_BLD_push_octet_string(b, OSSL_PKEY_PARAM_PUB_KEY, pub, 65), 1);
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(b);
    assert_non_null(params);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    EVP_PKEY *pkey = NULL;
    assert_non_null(ctx);
    assert_int_equal(EVP_PKEY_fromdata_init(ctx), 1);
    assert_int_equal(EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params), 1);
    EVP_PKEY_CTX *chk = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    assert_int_equal(EVP_PKEY_pairwise_check(chk), 1); /* d really matches x, y */
    EVP_PKEY_CTX_free(chk);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(b);
    BN_free(priv);
    return pkey;
}

static void test_keys_thumbprint_fixed_key(void **state) {
    (void)state;
    char *tmp = make_tmpdir();
    char keysdir[512], file[600];
    snprintf(keysdir, sizeof keysdir, "%s/keys", tmp);
    snprintf(file, sizeof file, "%s/rfc7515.pem", keysdir);
    assert_int_equal(mkdir(keysdir, 0700), 0);

    /* Write the key group/world-readable: the loader must repair it to 0600. */
    EVP_PKEY *pkey = rfc7515_key();
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL), 1);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(file, 0644), 0);
    EVP_PKEY_free(pkey);

    /* RFC 7638 thumbprint computed here from the RFC's own x and y strings. */
    char jwk[256], expect[64];
    uint8_t digest[32];
    unsigned dlen = 0;
    snprintf(jwk, sizeof jwk, "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}", RFC_X,
             RFC_Y);
    assert_int_equal(EVP_Digest(jwk, strlen(jwk), digest, &dlen, EVP_sha256(), NULL), 1);
    assert_int_equal(dlen, 32);
    test_b64url(digest, 32, expect);
    /* The same value other JOSE implementations publish for this key. */
    assert_string_equal(expect, "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U");

    struct keyring *k = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(tmp, &k, &err), 0);
    assert_int_equal(keys_count(k), 1); /* the existing key: none created */
    assert_string_equal(keys_active_kid(k), expect);
    assert_int_equal(file_mode(file), 0600);

    json_t *jwks = keys_jwks(k);
    json_t *key = json_array_get(json_object_get(jwks, "keys"), 0);
    assert_string_equal(json_string_value(json_object_get(key, "x")), RFC_X);
    assert_string_equal(json_string_value(json_object_get(key, "y")), RFC_Y);
    json_decref(jwks);

    keys_free(k);
    rm_rf(tmp);
    free(tmp);
}

static void test_keys_refuses_bad_files(void **state) {
    (void)state;
    static const char *const bodies[] = {
        "not a pem\n",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bodies); i++) {
        char *tmp = make_tmpdir();
        char keysdir[512], file[600];
        snprintf(keysdir, sizeof keysdir, "%s/keys", tmp);
        snprintf(file, sizeof file, "%s/bad.pem", keysdir);
        assert_int_equal(mkdir(keysdir, 0700), 0);
        assert_int_equal(pep_write_file_atomic(file, bodies[i], strlen(bodies[i]), 0600), 0);
        struct keyring *k = NULL;
        struct pep_err err = {0};
        assert_int_equal(keys_load_or_create(tmp, &k, &err), PEP_ECRYPTO);
        assert_null(k);
        assert_non_null(strstr(err.msg, "bad.pem"));
        rm_rf(tmp);
        free(tmp);
    }
    /* An RSA key is a key, but not ours to sign ES256 with. */
    char *tmp = make_tmpdir();
    char keysdir[512], file[600];
    snprintf(keysdir, sizeof keysdir, "%s/keys", tmp);
    snprintf(file, sizeof file, "%s/rsa.pem", keysdir);
    assert_int_equal(mkdir(keysdir, 0700), 0);
    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    assert_non_null(rsa);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, rsa, NULL, NULL, 0, NULL, NULL), 1);
    assert_int_equal(fclose(f), 0);
    EVP_PKEY_free(rsa);
    struct keyring *k = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(tmp, &k, &err), PEP_ECRYPTO);
    assert_non_null(strstr(err.msg, "P-256"));
    rm_rf(tmp);
    free(tmp);
}

static void test_keys_jwks_shape(void **state) {
    (void)state;
    json_t *jwks = keys_jwks(fx.k);
    assert_non_null(jwks);
    assert_int_equal(json_object_size(jwks), 1);
    json_t *keys = json_object_get(jwks, "keys");
    assert_true(json_is_array(keys));
    assert_int_equal(json_array_size(keys), 1);
    json_t *key = json_array_get(keys, 0);
    assert_int_equal(json_object_size(key), 7);
    assert_string_equal(json_string_value(json_object_get(key, "kty")), "EC");
    assert_string_equal(json_string_value(json_object_get(key, "crv")), "P-256");
    assert_string_equal(json_string_value(json_object_get(key, "alg")), "ES256");
    assert_string_equal(json_string_value(json_object_get(key, "use")), "sig");
    assert_string_equal(json_string_value(json_object_get(key, "kid")), keys_active_kid(fx.k));
    assert_int_equal(strlen(json_string_value(json_object_get(key, "x"))), 43);
    assert_int_equal(strlen(json_string_value(json_object_get(key, "y"))), 43);
    assert_null(json_object_get(key, "d")); /* never the private part */
    json_decref(jwks);
}

static void test_keys_rotate(void **state) {
    (void)state;
    char *tmp = make_tmpdir();
    struct keyring *k1 = NULL, *k2 = NULL, *k3 = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(tmp, &k1, &err), 0);
    char *old_token = sign_json(k1, "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"a\",\"jti\":\"j\","
                                    "\"iat\":1000,\"exp\":2000}");

    /* Two rotations within the same instant: each new key must become the active one. */
    assert_int_equal(keys_rotate(tmp, &k2, &err), 0);
    assert_int_equal(keys_rotate(tmp, &k3, &err), 0);
    assert_int_equal(keys_count(k2), 2);
    assert_int_equal(keys_count(k3), 3);
    assert_string_not_equal(keys_active_kid(k2), keys_active_kid(k1));
    assert_string_not_equal(keys_active_kid(k3), keys_active_kid(k1));
    assert_string_not_equal(keys_active_kid(k3), keys_active_kid(k2));
    assert_non_null(keys_public_pem(k3, keys_active_kid(k1), NULL));
    assert_non_null(keys_public_pem(k3, keys_active_kid(k2), NULL));

    json_t *jwks = keys_jwks(k3);
    json_t *keys = json_object_get(jwks, "keys");
    assert_int_equal(json_array_size(keys), 3);
    assert_string_equal(json_string_value(json_object_get(json_array_get(keys, 0), "kid")),
                        keys_active_kid(k3));
    json_decref(jwks);

    /* Old tokens still verify; new ones carry the new kid. */
    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, k3, old_token, ISS, AUD, 1500, 0, &c), TOKEN_OK);
    token_claims_release(c);
    char *new_token = sign_json(k3, "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"a\",\"jti\":\"j\","
                                    "\"iat\":1000,\"exp\":2000}");
    json_t *h = token_header(new_token);
    assert_string_equal(json_string_value(json_object_get(h, "kid")), keys_active_kid(k3));
    json_decref(h);
    /* The old keyring does not know the new key. */
    assert_int_equal(token_verify(NULL, k1, new_token, ISS, AUD, 1500, 0, &c), TOKEN_UNKNOWN_KID);

    /* A restart loads the same active key. */
    struct keyring *k4 = NULL;
    assert_int_equal(keys_load_or_create(tmp, &k4, &err), 0);
    assert_string_equal(keys_active_kid(k4), keys_active_kid(k3));

    free(old_token);
    free(new_token);
    keys_free(k1);
    keys_free(k2);
    keys_free(k3);
    keys_free(k4);
    rm_rf(tmp);
    free(tmp);
}

/* ---------------------------------------------------------------------------------- */
/* Verify: claims and time table                                                       */

struct verify_case {
    const char *name;
    const char *claims; /* JSON payload, signed with the fixture key */
    int64_t now, skew;
    const char *iss, *aud;
    enum token_status want;
};

#define BASE "\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"bot\",\"jti\":\"J1\""

static const struct verify_case verify_cases[] = {
    {"valid", "{" BASE ",\"iat\":1000,\"exp\":2000}", 1500, 30, ISS, AUD, TOKEN_OK},
    /* exp is exclusive: valid while now < exp + skew */
    {"exp edge inside", "{" BASE ",\"iat\":1000,\"exp\":2000}", 2029, 30, ISS, AUD, TOKEN_OK},
    {"exp edge outside", "{" BASE ",\"iat\":1000,\"exp\":2000}", 2030, 30, ISS, AUD, TOKEN_EXPIRED},
    {"exp no skew inside", "{" BASE ",\"iat\":1000,\"exp\":2000}", 1999, 0, ISS, AUD, TOKEN_OK},
    {"exp no skew at exp", "{" BASE ",\"iat\":1000,\"exp\":2000}", 2000, 0, ISS, AUD,
     TOKEN_EXPIRED},
    {"expired long ago", "{" BASE ",\"iat\":1000,\"exp\":2000}", 900000, 30, ISS, AUD,
     TOKEN_EXPIRED},
    {"negative skew is zero", "{" BASE ",\"iat\":1000,\"exp\":2000}", 2000, -50, ISS, AUD,
     TOKEN_EXPIRED},
    /* nbf is inclusive: valid from now == nbf - skew */
    {"nbf edge inside", "{" BASE ",\"iat\":1000,\"nbf\":1500,\"exp\":2000}", 1470, 30, ISS, AUD,
     TOKEN_OK},
    {"nbf edge outside", "{" BASE ",\"iat\":1000,\"nbf\":1500,\"exp\":2000}", 1469, 30, ISS, AUD,
     TOKEN_NOT_YET_VALID},
    {"nbf defaults to iat", "{" BASE ",\"iat\":1000,\"exp\":2000}", 969, 30, ISS, AUD,
     TOKEN_NOT_YET_VALID},
    {"iat future outside", "{" BASE ",\"iat\":1600,\"nbf\":0,\"exp\":3000}", 1569, 30, ISS, AUD,
     TOKEN_NOT_YET_VALID},
    {"iat future inside", "{" BASE ",\"iat\":1600,\"nbf\":0,\"exp\":3000}", 1570, 30, ISS, AUD,
     TOKEN_OK},
    {"exp before nbf", "{" BASE ",\"iat\":1000,\"nbf\":3000,\"exp\":2000}", 2500, 0, ISS, AUD,
     TOKEN_EXPIRED},
    {"huge exp, no overflow", "{" BASE ",\"iat\":0,\"exp\":9223372036854775807}",
     9223372036854775807LL, 9223372036854775807LL, ISS, AUD, TOKEN_OK},
    {"min exp, no overflow", "{" BASE ",\"iat\":0,\"exp\":-9223372036854775808}",
     -9223372036854775807LL - 1, 30, ISS, AUD, TOKEN_EXPIRED},
    {"wrong issuer", "{" BASE ",\"iat\":1000,\"exp\":2000}", 1500, 30, "other", AUD,
     TOKEN_WRONG_ISSUER},
    {"wrong audience", "{" BASE ",\"iat\":1000,\"exp\":2000}", 1500, 30, ISS, AUD_ADMIN,
     TOKEN_WRONG_AUDIENCE},
    {"issuer checked before time", "{" BASE ",\"iat\":1000,\"exp\":2000}", 5000, 30, "x", AUD,
     TOKEN_WRONG_ISSUER},
    {"aud array of ours alone",
     "{\"iss\":\"pep\",\"aud\":[\"pep\"],\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,"
     "\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_OK},
    /* SPEC 3.1 "aud equals pep": a token for several audiences is refused. */
    {"aud array containing ours and another",
     "{\"iss\":\"pep\",\"aud\":[\"x\",\"pep\"],\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,"
     "\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_WRONG_AUDIENCE},
    {"aud array naming both planes",
     "{\"iss\":\"pep\",\"aud\":[\"pep\",\"pep-admin\"],\"sub\":\"bot\",\"jti\":\"J1\","
     "\"iat\":1000,\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_WRONG_AUDIENCE},
    {"aud array lacking",
     "{\"iss\":\"pep\",\"aud\":[\"x\"],\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_WRONG_AUDIENCE},
    {"aud empty array",
     "{\"iss\":\"pep\",\"aud\":[],\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}", 1500,
     30, ISS, AUD, TOKEN_WRONG_AUDIENCE},
    /* Types: MALFORMED whatever else is wrong. */
    {"exp as string", "{" BASE ",\"iat\":1000,\"exp\":\"2000\"}", 1500, 30, ISS, AUD,
     TOKEN_MALFORMED},
    {"exp as real", "{" BASE ",\"iat\":1000,\"exp\":2000.0}", 1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"exp missing", "{" BASE ",\"iat\":1000}", 1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"iat missing", "{" BASE ",\"exp\":2000}", 1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"nbf as string", "{" BASE ",\"iat\":1000,\"nbf\":\"1\",\"exp\":2000}", 1500, 30, ISS, AUD,
     TOKEN_MALFORMED},
    {"iss as number",
     "{\"iss\":1,\"aud\":\"pep\",\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}", 1500,
     30, ISS, AUD, TOKEN_MALFORMED},
    {"aud as number",
     "{\"iss\":\"pep\",\"aud\":1,\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}", 1500,
     30, ISS, AUD, TOKEN_MALFORMED},
    {"aud array with number",
     "{\"iss\":\"pep\",\"aud\":[\"pep\",1],\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,"
     "\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"sub missing", "{\"iss\":\"pep\",\"aud\":\"pep\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"jti as bool",
     "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"bot\",\"jti\":true,\"iat\":1000,\"exp\":2000}",
     1500, 30, ISS, AUD, TOKEN_MALFORMED},
    {"scope as array", "{" BASE ",\"iat\":1000,\"exp\":2000,\"scope\":[\"a\"]}", 1500, 30, ISS, AUD,
     TOKEN_MALFORMED},
    {"scope double space", "{" BASE ",\"iat\":1000,\"exp\":2000,\"scope\":\"a  b\"}", 1500, 30, ISS,
     AUD, TOKEN_MALFORMED},
    {"roles as string", "{" BASE ",\"iat\":1000,\"exp\":2000,\"roles\":\"admin\"}", 1500, 30, ISS,
     AUD, TOKEN_MALFORMED},
    {"roles with number", "{" BASE ",\"iat\":1000,\"exp\":2000,\"roles\":[\"admin\",2]}", 1500, 30,
     ISS, AUD, TOKEN_MALFORMED},
    {"acr as number", "{" BASE ",\"iat\":1000,\"exp\":2000,\"acr\":2}", 1500, 30, ISS, AUD,
     TOKEN_MALFORMED},
    {"auth_time as string", "{" BASE ",\"iat\":1000,\"exp\":2000,\"auth_time\":\"1\"}", 1500, 30,
     ISS, AUD, TOKEN_MALFORMED},
    {"types before issuer",
     "{\"iss\":\"x\",\"aud\":\"pep\",\"sub\":\"bot\",\"jti\":\"J1\","
     "\"iat\":1000,\"exp\":\"2000\"}",
     1500, 30, ISS, AUD, TOKEN_MALFORMED},
};

static void test_verify_table(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(verify_cases); i++) {
        const struct verify_case *tc = &verify_cases[i];
        char *t = sign_json(fx.k, tc->claims);
        struct token_claims *c = (struct token_claims *)0x1;
        enum token_status st = token_verify(NULL, fx.k, t, tc->iss, tc->aud, tc->now, tc->skew, &c);
        if (st != tc->want)
            fail_msg("case \"%s\": got %d (%s), want %d", tc->name, st, token_status_message(st),
                     tc->want);
        if (st == TOKEN_OK) {
            assert_non_null(c);
            assert_string_equal(c->sub, "bot");
            assert_string_equal(c->jti, "J1");
            assert_string_equal(c->iss, ISS);
            assert_string_equal(c->aud, tc->aud);
            assert_int_equal(c->refcount, 1);
            token_claims_release(c);
        } else {
            assert_null(c);
        }
        free(t);
    }
}

static void test_verify_claim_values(void **state) {
    (void)state;
    char *t = sign_json(fx.k, "{" BASE ",\"iat\":1000,\"nbf\":1100,\"exp\":2000,"
                              "\"scope\":\"llm.chat refund.issue\",\"roles\":[\"admin\"],"
                              "\"acr\":\"mfa\",\"auth_time\":999}");
    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1500, 0, &c), TOKEN_OK);
    assert_int_equal(c->iat, 1000);
    assert_int_equal(c->nbf, 1100);
    assert_int_equal(c->exp, 2000);
    assert_int_equal(c->scopes_len, 2);
    assert_string_equal(c->scopes[0], "llm.chat");
    assert_string_equal(c->scopes[1], "refund.issue");
    assert_int_equal(c->roles_len, 1);
    assert_string_equal(c->roles[0], "admin");
    assert_string_equal(c->acr, "mfa");
    assert_int_equal(c->auth_time, 999);
    token_claims_release(c);
    free(t);

    /* Optional claims absent. */
    t = sign_json(fx.k, "{" BASE ",\"iat\":1000,\"exp\":2000}");
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1500, 0, &c), TOKEN_OK);
    assert_int_equal(c->nbf, 1000);
    assert_int_equal(c->scopes_len, 0);
    assert_int_equal(c->roles_len, 0);
    assert_null(c->acr);
    assert_int_equal(c->auth_time, 0);
    token_claims_release(c);
    free(t);
}

/* ---------------------------------------------------------------------------------- */
/* Verify: hostile and malformed tokens                                                */

#define GOOD_PAYLOAD "{" BASE ",\"iat\":1000,\"exp\":2000}"

static void expect_status(const char *name, const char *token, enum token_status want) {
    struct token_claims *c = NULL;
    enum token_status st = token_verify(NULL, fx.k, token, ISS, AUD, 1500, 30, &c);
    if (st != want)
        fail_msg("\"%s\": got %d (%s), want %d", name, st, token_status_message(st), want);
    if (st == TOKEN_OK) {
        assert_non_null(c);
        token_claims_release(c);
    } else {
        assert_null(c);
    }
    json_t *j = (json_t *)0x1;
    if (strlen(token) <= TOKEN_MAX_LEN) {
        /* The shared signature path answers the same for anything short of claims. */
        enum token_status s2 = token_verify_signature(fx.k, token, &j);
        if (want != TOKEN_OK && s2 == TOKEN_OK)
            fail_msg("\"%s\": token_verify_signature accepted it", name);
        json_decref(j);
    }
}

static void test_verify_alg_none(void **state) {
    (void)state;
    char header[200];
    snprintf(header, sizeof header, "{\"alg\":\"none\",\"typ\":\"JWT\",\"kid\":\"%s\"}",
             keys_active_kid(fx.k));
    char *t = hand_token(header, GOOD_PAYLOAD, "");
    /* The attack is real: libjwt with a NULL key accepts it. */
    jwt_t *j = NULL;
    assert_int_equal(jwt_decode(&j, t, NULL, 0), 0);
    jwt_free(j);
    expect_status("alg none", t, TOKEN_BAD_ALG);
    free(t);

    snprintf(header, sizeof header, "{\"alg\":\"none\"}");
    t = hand_token(header, GOOD_PAYLOAD, "");
    expect_status("alg none, no kid", t, TOKEN_BAD_ALG);
    free(t);
}

static void test_verify_hs256_with_public_pem(void **state) {
    (void)state;
    size_t pem_len = 0;
    const char *kid = keys_active_kid(fx.k);
    const unsigned char *pem = keys_public_pem(fx.k, kid, &pem_len);
    char *t = libjwt_token(JWT_ALG_HS256, pem, pem_len, kid, GOOD_PAYLOAD);
    /* The attack is real: a bare jwt_decode with our public PEM verifies it. */
    jwt_t *j = NULL;
    assert_int_equal(jwt_decode(&j, t, pem, (int)pem_len), 0);
    assert_int_equal(jwt_get_alg(j), JWT_ALG_HS256);
    jwt_free(j);
    expect_status("HS256 keyed with the public PEM", t, TOKEN_BAD_ALG);
    free(t);
}

static void test_verify_header_table(void **state) {
    (void)state;
    static const struct {
        const char *name;
        const char *header_fmt; /* %s: our kid */
        enum token_status want;
    } cases[] = {
        {"lowercase es256", "{\"alg\":\"es256\",\"kid\":\"%s\"}", TOKEN_BAD_ALG},
        {"RS256", "{\"alg\":\"RS256\",\"kid\":\"%s\"}", TOKEN_BAD_ALG},
        {"ES384", "{\"alg\":\"ES384\",\"kid\":\"%s\"}", TOKEN_BAD_ALG},
        {"missing alg", "{\"kid\":\"%s\"}", TOKEN_BAD_ALG},
        {"alg number", "{\"alg\":7,\"kid\":\"%s\"}", TOKEN_BAD_ALG},
        {"missing kid", "{\"alg\":\"ES256\",\"x\":\"%s\"}", TOKEN_UNKNOWN_KID},
        {"kid number", "{\"alg\":\"ES256\",\"kid\":5,\"x\":\"%s\"}", TOKEN_UNKNOWN_KID},
        {"unknown kid", "{\"alg\":\"ES256\",\"kid\":\"x%s\"}", TOKEN_UNKNOWN_KID},
        {"crit", "{\"alg\":\"ES256\",\"kid\":\"%s\",\"crit\":[\"exp\"]}", TOKEN_MALFORMED},
        {"typ at+jwt", "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"at+jwt\"}", TOKEN_MALFORMED},
        {"duplicate alg", "{\"alg\":\"ES256\",\"alg\":\"none\",\"kid\":\"%s\"}", TOKEN_MALFORMED},
        {"header array", "[\"%s\"]", TOKEN_MALFORMED},
        {"good header, fake signature", "{\"alg\":\"ES256\",\"kid\":\"%s\"}", TOKEN_BAD_SIGNATURE},
    };
    /* 64 bytes of zeros, base64url: the right size for an ES256 signature. */
    static const char zero_sig[] =
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAAAAAA";
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        char header[300];
        snprintf(header, sizeof header, cases[i].header_fmt, keys_active_kid(fx.k));
        char *t = hand_token(header, GOOD_PAYLOAD, zero_sig);
        expect_status(cases[i].name, t, cases[i].want);
        free(t);
    }
}

static void test_verify_other_key_claiming_our_kid(void **state) {
    (void)state;
    size_t len = 0;
    const unsigned char *other_priv = keys_active_private_pem(fx.other, &len);
    char *t = libjwt_token(JWT_ALG_ES256, other_priv, len, keys_active_kid(fx.k), GOOD_PAYLOAD);
    expect_status("other key, our kid", t, TOKEN_BAD_SIGNATURE);
    free(t);
    /* With its own kid it is simply unknown to us. */
    t = sign_json(fx.other, GOOD_PAYLOAD);
    expect_status("other key, its kid", t, TOKEN_UNKNOWN_KID);
    free(t);
}

static void test_verify_flipped_signature(void **state) {
    (void)state;
    char *t = sign_json(fx.k, GOOD_PAYLOAD);
    expect_status("untouched", t, TOKEN_OK);
    char *sig = strrchr(t, '.') + 1;
    assert_int_equal(strlen(sig), 86); /* 64 bytes: raw R || S */
    /* A character in the middle: all six of its bits are significant. */
    sig[20] = sig[20] == 'A' ? 'B' : 'A';
    expect_status("flipped signature", t, TOKEN_BAD_SIGNATURE);
    free(t);

    /* Tampered payload, original signature. */
    t = sign_json(fx.k, GOOD_PAYLOAD);
    char *good_sig = strdup(strrchr(t, '.') + 1);
    char header[200];
    snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"JWT\"}",
             keys_active_kid(fx.k));
    char *forged = hand_token(header, "{" BASE ",\"iat\":1000,\"exp\":99999}", good_sig);
    expect_status("payload changed", forged, TOKEN_BAD_SIGNATURE);
    free(forged);
    free(good_sig);
    free(t);

    /* Truncated signature (wrong R||S length). */
    t = sign_json(fx.k, GOOD_PAYLOAD);
    t[strlen(t) - 4] = '\0';
    expect_status("short signature", t, TOKEN_BAD_SIGNATURE);
    free(t);
}

static void test_verify_malformed(void **state) {
    (void)state;
    char *good = sign_json(fx.k, GOOD_PAYLOAD);
    char *dot1 = strchr(good, '.'), *dot2 = strrchr(good, '.');
    char buf[TOKEN_MAX_LEN + 64];

    expect_status("empty", "", TOKEN_MALFORMED);
    expect_status("one part", "abc", TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "%.*s", (int)(dot2 - good), good);
    expect_status("two parts", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "%s.", good);
    expect_status("four parts", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "%s", good);
    buf[2] = '*';
    expect_status("garbage base64 in header", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "%s", good);
    buf[dot1 - good + 3] = '=';
    expect_status("padding in payload", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "%s", good);
    buf[dot2 - good + 3] = ' ';
    expect_status("space in signature", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, "A%s", good);
    expect_status("extra character in header", buf, TOKEN_MALFORMED);
    snprintf(buf, sizeof buf, ".%s", dot1 + 1);
    expect_status("empty header", buf, TOKEN_MALFORMED);

    char header[200];
    snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\"}", keys_active_kid(fx.k));
    char *t = hand_token("not json", GOOD_PAYLOAD, "AAAA");
    expect_status("non-JSON header", t, TOKEN_MALFORMED);
    free(t);
    t = hand_token(header, "not json", "AAAA");
    expect_status("non-JSON payload", t, TOKEN_MALFORMED);
    free(t);
    t = hand_token(header, "[1,2]", "AAAA");
    expect_status("payload array", t, TOKEN_MALFORMED);
    free(t);
    t = hand_token(header, "{\"exp\":1,\"exp\":2}", "AAAA");
    expect_status("duplicate claim", t, TOKEN_MALFORMED);
    free(t);

    /* Over the size cap, even if otherwise fine. */
    char *big = malloc(TOKEN_MAX_LEN + 2);
    assert_non_null(big);
    memset(big, 'A', TOKEN_MAX_LEN + 1);
    big[TOKEN_MAX_LEN + 1] = '\0';
    big[10] = '.';
    big[20] = '.';
    expect_status("over the size cap", big, TOKEN_MALFORMED);
    free(big);

    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, fx.k, NULL, ISS, AUD, 1500, 30, &c), TOKEN_MALFORMED);
    free(good);
}

/* ---------------------------------------------------------------------------------- */
/* Issue                                                                               */

static void test_issue_agent_round_trip(void **state) {
    (void)state;
    const char *scopes[] = {"llm.chat", "invoice.create", "refund.*"};
    struct token_request req = {.issuer = ISS,
                                .aud = AUD,
                                .sub = "billing-bot",
                                .scopes = scopes,
                                .scopes_len = 3,
                                .now_s = 1700000000,
                                .ttl_s = 3600};
    char *t = NULL, jti[TOKEN_JTI_SIZE];
    struct pep_err err = {0};
    assert_int_equal(token_issue(fx.k, &req, &t, jti, &err), 0);
    assert_int_equal(strlen(jti), 32);
    assert_int_equal(strspn(jti, "0123456789abcdef"), 32);

    json_t *h = token_header(t);
    assert_int_equal(json_object_size(h), 3);
    assert_string_equal(json_string_value(json_object_get(h, "alg")), "ES256");
    assert_string_equal(json_string_value(json_object_get(h, "typ")), "JWT");
    assert_string_equal(json_string_value(json_object_get(h, "kid")), keys_active_kid(fx.k));
    json_decref(h);

    json_t *raw = NULL;
    assert_int_equal(token_verify_signature(fx.k, t, &raw), TOKEN_OK);
    assert_int_equal(json_object_size(raw), 8);
    assert_string_equal(json_string_value(json_object_get(raw, "scope")),
                        "llm.chat invoice.create refund.*");
    assert_null(json_object_get(raw, "roles"));
    assert_null(json_object_get(raw, "acr"));
    json_decref(raw);

    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1700000000, 30, &c), TOKEN_OK);
    assert_string_equal(c->sub, "billing-bot");
    assert_string_equal(c->jti, jti);
    assert_string_equal(c->iss, ISS);
    assert_string_equal(c->aud, AUD);
    assert_int_equal(c->iat, 1700000000);
    assert_int_equal(c->nbf, 1700000000);
    assert_int_equal(c->exp, 1700003600);
    assert_int_equal(c->scopes_len, 3);
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(c->scopes[i], scopes[i]);
    assert_int_equal(c->roles_len, 0);
    assert_null(c->acr);
    assert_int_equal(c->auth_time, 0);
    token_claims_release(c);
    /* An agent token is refused on the admin audience. */
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD_ADMIN, 1700000000, 30, &c),
                     TOKEN_WRONG_AUDIENCE);
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1700003600, 0, &c), TOKEN_EXPIRED);

    /* Two issues never share a jti. */
    char *t2 = NULL, jti2[TOKEN_JTI_SIZE];
    assert_int_equal(token_issue(fx.k, &req, &t2, jti2, &err), 0);
    assert_string_not_equal(jti, jti2);
    free(t);
    free(t2);
}

static void test_issue_operator_and_acr(void **state) {
    (void)state;
    const char *roles[] = {"admin", "auditor"};
    struct token_request req = {.issuer = ISS,
                                .aud = AUD_ADMIN,
                                .sub = "alice",
                                .roles = roles,
                                .roles_len = 2,
                                .acr = "mfa",
                                .now_s = 1700000000,
                                .ttl_s = 60};
    char *t = NULL, jti[TOKEN_JTI_SIZE];
    struct pep_err err = {0};
    assert_int_equal(token_issue(fx.k, &req, &t, jti, &err), 0);
    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD_ADMIN, 1700000059, 0, &c), TOKEN_OK);
    assert_int_equal(c->roles_len, 2);
    assert_string_equal(c->roles[0], "admin");
    assert_string_equal(c->roles[1], "auditor");
    assert_int_equal(c->scopes_len, 0);
    assert_string_equal(c->acr, "mfa");
    assert_int_equal(c->auth_time, 1700000000);
    token_claims_release(c);
    assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1700000000, 0, &c),
                     TOKEN_WRONG_AUDIENCE);
    free(t);
}

static void test_issue_refuses_bad_requests(void **state) {
    (void)state;
    const char *spaced[] = {"a b"};
    const char *empty[] = {""};
    const char *quote[] = {"a\"b"};
    const char *fine[] = {"a"};
    const char *bad_utf8[] = {"\xff"};
    char *many[TOKEN_MAX_SCOPES + 1];
    for (size_t i = 0; i < PEP_ARRAY_LEN(many); i++)
        many[i] = "s";
    struct {
        const char *name;
        struct token_request req;
    } cases[] = {
        {"no issuer", {.aud = AUD, .sub = "a", .now_s = 1, .ttl_s = 1}},
        {"no subject", {.issuer = ISS, .aud = AUD, .sub = "", .now_s = 1, .ttl_s = 1}},
        {"no audience", {.issuer = ISS, .sub = "a", .now_s = 1, .ttl_s = 1}},
        {"zero ttl", {.issuer = ISS, .aud = AUD, .sub = "a", .now_s = 1, .ttl_s = 0}},
        {"ttl overflow", {.issuer = ISS, .aud = AUD, .sub = "a", .now_s = INT64_MAX, .ttl_s = 1}},
        {"scope with space", {ISS, AUD, "a", spaced, 1, NULL, 0, NULL, 1, 1}},
        {"empty scope", {ISS, AUD, "a", empty, 1, NULL, 0, NULL, 1, 1}},
        {"scope with quote", {ISS, AUD, "a", quote, 1, NULL, 0, NULL, 1, 1}},
        {"too many scopes",
         {ISS, AUD, "a", (const char *const *)many, TOKEN_MAX_SCOPES + 1, NULL, 0, NULL, 1, 1}},
        {"empty role", {ISS, AUD, "a", fine, 1, empty, 1, NULL, 1, 1}},
        {"empty acr", {ISS, AUD, "a", fine, 1, NULL, 0, "", 1, 1}},
        {"subject not UTF-8", {ISS, AUD, "\xff", fine, 1, NULL, 0, NULL, 1, 1}},
        {"role not UTF-8", {ISS, AUD, "a", fine, 1, bad_utf8, 1, NULL, 1, 1}},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        char *t = (char *)0x1, jti[TOKEN_JTI_SIZE];
        struct pep_err err = {0};
        int rc = token_issue(fx.k, &cases[i].req, &t, jti, &err);
        if (rc != PEP_EINVAL) fail_msg("case \"%s\": rc %d", cases[i].name, rc);
        assert_null(t);
        assert_int_equal(err.code, PEP_EINVAL);
    }
}

/* ---------------------------------------------------------------------------------- */
/* Cache                                                                               */

static char *issue_simple(const char *sub, int64_t now, int64_t ttl) {
    const char *scopes[] = {"llm.chat"};
    struct token_request req = {.issuer = ISS,
                                .aud = AUD,
                                .sub = sub,
                                .scopes = scopes,
                                .scopes_len = 1,
                                .now_s = now,
                                .ttl_s = ttl};
    char *t = NULL, jti[TOKEN_JTI_SIZE];
    struct pep_err err = {0};
    assert_int_equal(token_issue(fx.k, &req, &t, jti, &err), 0);
    return t;
}

static void test_cache_hits_and_rechecks(void **state) {
    (void)state;
    struct token_verifier *v = token_verifier_new(8);
    struct token_cache_stats s;
    struct token_claims *c1 = NULL, *c2 = NULL;
    assert_non_null(v);
    char *t = issue_simple("bot", 1000, 1000); /* valid [1000, 2000) */

    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1500, 30, &c1), TOKEN_OK);
    token_verifier_stats(v, &s);
    assert_int_equal(s.misses, 1);
    assert_int_equal(s.hits, 0);
    assert_int_equal(s.inserts, 1);
    assert_int_equal(s.entries, 1);

    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1600, 30, &c2), TOKEN_OK);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 1);
    assert_int_equal(s.misses, 1);
    assert_ptr_equal(c1, c2);          /* one shared, immutable copy */
    assert_int_equal(c1->refcount, 3); /* cache + two callers */
    token_claims_release(c1);
    token_claims_release(c2);

    /* Different audience or issuer: refused even though cached, entry kept. */
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD_ADMIN, 1600, 30, &c1), TOKEN_WRONG_AUDIENCE);
    assert_null(c1);
    assert_int_equal(token_verify(v, fx.k, t, "evil", AUD, 1600, 30, &c1), TOKEN_WRONG_ISSUER);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 1);
    assert_int_equal(s.misses, 3);
    assert_int_equal(s.inserts, 1);
    assert_int_equal(s.entries, 1);

    /* Earlier than iat - skew: not yet valid, answered from the cache. */
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 969, 30, &c1), TOKEN_NOT_YET_VALID);
    assert_null(c1);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 2);
    assert_int_equal(s.entries, 1);

    /* Time passes: the cached entry is refused at exp + skew and dropped. */
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 2029, 30, &c1), TOKEN_OK);
    token_claims_release(c1);
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 2030, 30, &c1), TOKEN_EXPIRED);
    assert_null(c1);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 4);
    assert_int_equal(s.expired, 1);
    assert_int_equal(s.entries, 0);

    /* A keyring without the token's key: refused even though cached. */
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1500, 30, &c1), TOKEN_OK);
    token_claims_release(c1);
    assert_int_equal(token_verify(v, fx.other, t, ISS, AUD, 1500, 30, &c1), TOKEN_UNKNOWN_KID);
    assert_null(c1);
    token_verifier_stats(v, &s);
    assert_int_equal(s.entries, 0);

    /* Failures are never cached. */
    size_t inserts = (size_t)s.inserts;
    t[strlen(t) - 20] = t[strlen(t) - 20] == 'A' ? 'B' : 'A';
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1500, 30, &c1), TOKEN_BAD_SIGNATURE);
    assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1500, 30, &c1), TOKEN_BAD_SIGNATURE);
    token_verifier_stats(v, &s);
    assert_int_equal(s.inserts, inserts);
    assert_int_equal(s.entries, 0);

    free(t);
    token_verifier_free(v);
}

static void test_cache_bounded(void **state) {
    (void)state;
    struct token_verifier *v = token_verifier_new(4);
    struct token_cache_stats s;
    char *tokens[10];
    for (size_t i = 0; i < 10; i++) {
        char sub[16];
        snprintf(sub, sizeof sub, "bot%zu", i);
        tokens[i] = issue_simple(sub, 1000, 1000);
        struct token_claims *c = NULL;
        assert_int_equal(token_verify(v, fx.k, tokens[i], ISS, AUD, 1500, 0, &c), TOKEN_OK);
        assert_string_equal(c->sub, sub);
        token_claims_release(c);
    }
    token_verifier_stats(v, &s);
    assert_int_equal(s.capacity, 4);
    assert_int_equal(s.entries, 4);
    assert_int_equal(s.evictions, 6);
    assert_int_equal(s.inserts, 10);

    /* The newest is cached, the oldest was evicted (and still verifies). */
    struct token_claims *c = NULL;
    assert_int_equal(token_verify(v, fx.k, tokens[9], ISS, AUD, 1500, 0, &c), TOKEN_OK);
    token_claims_release(c);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 1);
    assert_int_equal(token_verify(v, fx.k, tokens[0], ISS, AUD, 1500, 0, &c), TOKEN_OK);
    assert_string_equal(c->sub, "bot0");
    token_claims_release(c);
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits, 1);
    assert_int_equal(s.misses, 11);
    assert_int_equal(s.entries, 4);
    assert_int_equal(s.evictions, 7); /* bot0 came back in, the coldest went */

    /* Expired entries at the cold end go first, before any live one is evicted. */
    char *late = issue_simple("late", 5000, 1000);
    assert_int_equal(token_verify(v, fx.k, late, ISS, AUD, 5000, 0, &c), TOKEN_OK);
    token_claims_release(c);
    token_verifier_stats(v, &s);
    assert_int_equal(s.expired, 4);
    assert_int_equal(s.evictions, 7); /* unchanged: only expired entries went */
    assert_int_equal(s.entries, 1);

    token_verifier_flush(v);
    token_verifier_stats(v, &s);
    assert_int_equal(s.entries, 0);
    free(late);
    for (size_t i = 0; i < 10; i++)
        free(tokens[i]);
    token_verifier_free(v);
}

struct thread_arg {
    struct token_verifier *v;
    char **tokens;
    size_t n;
    int failures;
};

static void *cache_thread(void *p) {
    struct thread_arg *a = p;
    for (size_t i = 0; i < 400; i++) {
        struct token_claims *c = NULL;
        if (token_verify(a->v, fx.k, a->tokens[i % a->n], ISS, AUD, 1500, 0, &c) != TOKEN_OK)
            a->failures++;
        token_claims_release(c);
    }
    return NULL;
}

static void test_cache_threads(void **state) {
    (void)state;
    enum { NTOK = 12, NTHR = 4 };
    struct token_verifier *v = token_verifier_new(8); /* smaller than the set: evictions */
    char *tokens[NTOK];
    for (size_t i = 0; i < NTOK; i++)
        tokens[i] = issue_simple("bot", 1000, 1000);
    pthread_t th[NTHR];
    struct thread_arg args[NTHR];
    for (int i = 0; i < NTHR; i++) {
        args[i] = (struct thread_arg){v, tokens, NTOK, 0};
        assert_int_equal(pthread_create(&th[i], NULL, cache_thread, &args[i]), 0);
    }
    for (int i = 0; i < NTHR; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(args[i].failures, 0);
    }
    struct token_cache_stats s;
    token_verifier_stats(v, &s);
    assert_int_equal(s.hits + s.misses, NTHR * 400);
    assert_true(s.entries <= 8);
    for (size_t i = 0; i < NTOK; i++)
        free(tokens[i]);
    token_verifier_free(v);
}

static void test_cache_timing(void **state) {
    (void)state;
    enum { N = 1000 };
    char *t = issue_simple("bot", 1000, 1000);
    struct token_verifier *v = token_verifier_new(0);
    struct token_claims *c = NULL;

    int64_t t0 = pep_mono_us();
    for (int i = 0; i < N; i++) {
        assert_int_equal(token_verify(NULL, fx.k, t, ISS, AUD, 1500, 0, &c), TOKEN_OK);
        token_claims_release(c);
    }
    int64_t t1 = pep_mono_us();
    for (int i = 0; i < N; i++) {
        assert_int_equal(token_verify(v, fx.k, t, ISS, AUD, 1500, 0, &c), TOKEN_OK);
        token_claims_release(c);
    }
    int64_t t2 = pep_mono_us();
    /* A forged signature: refused after every cheap check, by the one P-256 verify. */
    char *forged = strdup(t);
    assert_non_null(forged);
    char *sig = strrchr(forged, '.') + 1;
    sig[20] = sig[20] == 'A' ? 'B' : 'A';
    for (int i = 0; i < N; i++)
        assert_int_equal(token_verify(v, fx.k, forged, ISS, AUD, 1500, 0, &c), TOKEN_BAD_SIGNATURE);
    int64_t t3 = pep_mono_us();
    /* What libjwt's jwt_decode costs for the same token (it parses the PEM every call). */
    size_t pem_len = 0;
    const unsigned char *pem = keys_public_pem(fx.k, keys_active_kid(fx.k), &pem_len);
    for (int i = 0; i < N / 10; i++) {
        jwt_t *j = NULL;
        assert_int_equal(jwt_decode(&j, t, pem, (int)pem_len), 0);
        jwt_free(j);
    }
    int64_t t4 = pep_mono_us();
    /* Printed, never asserted: timings depend on the machine. */
    printf("token_verify over %d iterations: cold %.1f us/op, cached %.2f us/op, "
           "forged signature %.1f us/op; libjwt jwt_decode %.1f us/op\n",
           N, (double)(t1 - t0) / N, (double)(t2 - t1) / N, (double)(t3 - t2) / N,
           (double)(t4 - t3) / (N / 10));
    free(forged);
    struct token_cache_stats s;
    token_verifier_stats(v, &s);
    assert_int_equal(s.misses, 1 + N);
    assert_int_equal(s.hits, N - 1);
    assert_int_equal(s.inserts, 1); /* failures are never cached */
    token_verifier_free(v);
    free(t);
}

/* ---------------------------------------------------------------------------------- */
/* Agreement with libjwt                                                               */

#define AGREE_NOW 1500
#define AGREE_SKEW 30

static const char B64URL_ALPHABET[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* base64url decoding that reports failure instead of asserting, for mutated tokens:
 * -1, or the decoded length (out has room for cap bytes). */
static long lenient_b64url_decode(const char *s, size_t n, uint8_t *out, size_t cap) {
    size_t padded = (n + 3) / 4 * 4;
    if (n % 4 == 1 || padded / 4 * 3 > cap) return -1;
    char *in = malloc(padded + 1);
    assert_non_null(in);
    for (size_t i = 0; i < n; i++)
        in[i] = s[i] == '-' ? '+' : s[i] == '_' ? '/' : s[i];
    memset(in + n, '=', padded - n);
    int m = EVP_DecodeBlock(out, (unsigned char *)in, (int)padded);
    free(in);
    return m < 0 ? -1 : m - (long)(padded - n);
}

/*
 * The reference verifier: libjwt's jwt_decode with the public PEM of the key the header's
 * kid names (the kid read here with jansson), the algorithm pinned to ES256 after the
 * decode (libjwt 1.10 cannot pin it before).  True when it accepts; *grants is then the
 * payload as libjwt decoded it (caller decrefs).
 */
static bool ref_accepts(const struct keyring *k, const char *token, json_t **grants) {
    *grants = NULL;
    const char *dot = strchr(token, '.');
    if (!dot) return false;
    size_t n = (size_t)(dot - token);
    uint8_t *buf = malloc(n + 4);
    assert_non_null(buf);
    long m = lenient_b64url_decode(token, n, buf, n + 4);
    json_t *h = m < 0 ? NULL : json_loadb((const char *)buf, (size_t)m, 0, NULL);
    free(buf);
    size_t pem_len = 0;
    const unsigned char *pem =
        keys_public_pem(k, json_string_value(json_object_get(h, "kid")), &pem_len);
    json_decref(h);
    if (!pem) return false;
    jwt_t *j = NULL;
    bool ok = jwt_decode(&j, token, pem, (int)pem_len) == 0 && j && jwt_get_alg(j) == JWT_ALG_ES256;
    if (ok) {
        char *g = jwt_get_grants_json(j, NULL);
        assert_non_null(g);
        *grants = json_loads(g, 0, NULL);
        assert_non_null(*grants);
        free(g);
    }
    if (j) jwt_free(j);
    return ok;
}

/* t with part `part` (0 header, 1 payload, 2 signature) replaced by text. */
static char *with_part(const char *t, int part, const char *text) {
    const char *d1 = strchr(t, '.');
    assert_non_null(d1);
    const char *d2 = strchr(d1 + 1, '.');
    assert_non_null(d2);
    const char *start[3] = {t, d1 + 1, d2 + 1};
    int len[3] = {(int)(d1 - t), (int)(d2 - d1 - 1), (int)strlen(d2 + 1)};
    start[part] = text;
    len[part] = (int)strlen(text);
    char *out = NULL;
    assert_true(
        asprintf(&out, "%.*s.%.*s.%.*s", len[0], start[0], len[1], start[1], len[2], start[2]) > 0);
    return out;
}

/* Where part `part` of t starts, and its length. */
static const char *part_of(const char *t, int part, size_t *len) {
    const char *p = t;
    for (int i = 0; i < part; i++) {
        p = strchr(p, '.');
        assert_non_null(p);
        p++;
    }
    *len = strcspn(p, ".");
    return p;
}

/* The 64 raw signature bytes of a well-formed ES256 token. */
static void sig_raw(const char *t, uint8_t raw[66]) {
    size_t n = 0;
    const char *sig = part_of(t, 2, &n);
    assert_int_equal(n, 86);
    char copy[100];
    memcpy(copy, sig, n);
    copy[n] = '\0';
    assert_int_equal(test_b64url_decode(copy, raw), 64);
}

/* One token of the corpus: what it is and where it comes from. */
struct corpus_entry {
    char *token;
    const char *what; /* the family it belongs to, for failure messages */
    int base;         /* the signed token it was derived from, or -1 */
    bool is_signed;   /* signed by a keyring key under that key's own kid */
    bool expired;     /* signed, but expired at AGREE_NOW */
};

struct corpus {
    struct corpus_entry *e;
    size_t len, cap;
};

static int corpus_add(struct corpus *c, char *token, const char *what, int base) {
    if (c->len == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 256;
        c->e = realloc(c->e, c->cap * sizeof *c->e);
        assert_non_null(c->e);
    }
    c->e[c->len] = (struct corpus_entry){.token = token, .what = what, .base = base};
    return (int)c->len++;
}

static int corpus_add_signed(struct corpus *c, char *token, const char *what, bool expired) {
    int i = corpus_add(c, token, what, -1);
    c->e[i].is_signed = true;
    c->e[i].expired = expired;
    return i;
}

/* Every prefix of base's token. */
static void corpus_truncations(struct corpus *c, int base) {
    const char *t = c->e[base].token;
    for (size_t n = 0; n < strlen(t); n++) {
        char *p = strndup(t, n);
        assert_non_null(p);
        corpus_add(c, p, "truncated", base);
    }
}

/* One bit flipped in each signature byte, lowest and highest bit in turn. */
static void corpus_signature_bytes(struct corpus *c, int base) {
    uint8_t raw[66];
    sig_raw(c->e[base].token, raw);
    for (size_t pos = 0; pos < 64; pos++) {
        for (int mask = 0x01; mask <= 0x80; mask <<= 7) {
            uint8_t flipped[64];
            char enc[100];
            memcpy(flipped, raw, 64);
            flipped[pos] ^= (uint8_t)mask;
            test_b64url(flipped, 64, enc);
            corpus_add(c, with_part(c->e[base].token, 2, enc), "signature byte flipped", base);
        }
    }
}

/* Each character of part `part` replaced by the next (+1) and the 17th next (+16) letter of
 * the alphabet: for the last character of the signature, +1 only touches the unused low
 * bits — the same bytes, another spelling — and +16 the data bits. */
static void corpus_characters(struct corpus *c, int base, int part, const char *what) {
    size_t n = 0;
    const char *t = c->e[base].token;
    const char *p = part_of(t, part, &n);
    for (size_t pos = 0; pos < n; pos++) {
        for (int step = 1; step <= 16; step += 15) {
            char *m = strdup(t);
            assert_non_null(m);
            size_t at = (size_t)(p - t) + pos;
            size_t idx = (size_t)(strchr(B64URL_ALPHABET, m[at]) - B64URL_ALPHABET);
            m[at] = B64URL_ALPHABET[(idx + (size_t)step) % 64];
            corpus_add(c, m, what, base);
        }
    }
}

/* base with its header replaced by the JSON text header_json (its signature kept). */
static void corpus_header(struct corpus *c, int base, const char *header_json, const char *what) {
    char *h = pep_base64url_encode((const uint8_t *)header_json, strlen(header_json));
    assert_non_null(h);
    corpus_add(c, with_part(c->e[base].token, 0, h), what, base);
    free(h);
}

static void test_verify_agrees_with_libjwt(void **state) {
    (void)state;
    char *tmp = make_tmpdir();
    struct keyring *ka = NULL, *k = NULL;
    struct pep_err err = {0};
    assert_int_equal(keys_load_or_create(tmp, &ka, &err), 0); /* key A */
    assert_int_equal(keys_rotate(tmp, &k, &err), 0);          /* A and B, B active */
    char kid_a[KEYS_KID_LEN + 1], kid_b[KEYS_KID_LEN + 1];
    snprintf(kid_a, sizeof kid_a, "%s", keys_active_kid(ka));
    snprintf(kid_b, sizeof kid_b, "%s", keys_active_kid(k));
    assert_string_not_equal(kid_a, kid_b);
    size_t priv_a_len = 0, pub_b_len = 0, other_len = 0;
    const unsigned char *priv_a = keys_active_private_pem(ka, &priv_a_len);
    const unsigned char *pub_b = keys_public_pem(k, kid_b, &pub_b_len);
    const unsigned char *other_priv = keys_active_private_pem(fx.other, &other_len);

    struct corpus c = {0};
    /* Signed by a key of the keyring, under its kid: ours must accept each signature. */
    const char *const scoped = "{" BASE ",\"iat\":1000,\"exp\":2000,\"scope\":\"llm.chat a.*\"}";
    int by_a = corpus_add_signed(&c, sign_json(ka, scoped), "signed by A (ours)", false);
    int by_b = corpus_add_signed(
        &c,
        sign_json(k,
                  "{\"iss\":\"pep\",\"aud\":[\"pep\"],\"sub\":\"bot\",\"jti\":\"J2\","
                  "\"iat\":1000,\"nbf\":1000,\"exp\":2000,\"roles\":[\"admin\"],"
                  "\"acr\":\"mfa\",\"auth_time\":1000,\"x\":{\"deep\":[1,2.5,null,\"\\u00e9\"]}}"),
        "signed by B (ours)", false);
    corpus_add_signed(&c, sign_json(k, "{" BASE ",\"iat\":1000,\"exp\":1200}"),
                      "signed by B, expired", true);
    corpus_add_signed(&c,
                      sign_json(k, "{\"iss\":\"pep\",\"aud\":[\"pep\",\"pep-admin\"],"
                                   "\"sub\":\"bot\",\"jti\":\"J3\",\"iat\":1000,\"exp\":2000}"),
                      "signed by B, two audiences", false);
    int by_libjwt =
        corpus_add_signed(&c, libjwt_token(JWT_ALG_ES256, priv_a, priv_a_len, kid_a, GOOD_PAYLOAD),
                          "signed by A (libjwt)", false);
    const char *scopes[] = {"llm.chat"};
    struct token_request req = {.issuer = ISS,
                                .aud = AUD,
                                .sub = "bot",
                                .scopes = scopes,
                                .scopes_len = 1,
                                .now_s = 1400,
                                .ttl_s = 3600};
    char *issued = NULL, jti[TOKEN_JTI_SIZE];
    assert_int_equal(token_issue(k, &req, &issued, jti, &err), 0);
    int by_issue = corpus_add_signed(&c, issued, "token_issue", false);

    /* Mutants of the signed tokens. */
    corpus_truncations(&c, by_issue);
    corpus_truncations(&c, by_libjwt);
    corpus_signature_bytes(&c, by_a);
    corpus_signature_bytes(&c, by_issue);
    corpus_signature_bytes(&c, by_libjwt);
    corpus_characters(&c, by_a, 2, "signature character changed");
    corpus_characters(&c, by_issue, 2, "signature character changed");
    corpus_characters(&c, by_issue, 1, "payload character changed");
    corpus_characters(&c, by_b, 0, "header character changed");
    char header[256];
    static const char *const algs[] = {"HS256", "none", "RS256", "ES384", "es256", "ES512"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(algs); i++) {
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"JWT\"}", algs[i],
                 kid_b);
        corpus_header(&c, by_issue, header, "alg swapped, signature kept");
    }
    snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"JWT\"}", kid_b);
    corpus_header(&c, by_a, header, "kid swapped A -> B, signature kept");
    snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\",\"typ\":\"JWT\"}", kid_a);
    corpus_header(&c, by_issue, header, "kid swapped B -> A, signature kept");
    snprintf(header, sizeof header, "{\"alg\":\"ES256\",\"kid\":\"%s\"}", kid_b);
    corpus_header(&c, by_issue, header, "header rewritten without typ, signature kept");
    static const char *const payloads[] = {
        "{" BASE ",\"iat\":1000,\"exp\":99999}",
        "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"admin\",\"jti\":\"J1\",\"iat\":1000,"
        "\"exp\":2000}",
        "{" BASE ",\"iat\":1000,\"exp\":2000,\"scope\":\"llm.chat refund.*\"}",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(payloads); i++) {
        char *p = pep_base64url_encode((const uint8_t *)payloads[i], strlen(payloads[i]));
        assert_non_null(p);
        corpus_add(&c, with_part(c.e[by_issue].token, 1, p), "payload replaced", by_issue);
        free(p);
    }
    /* Signed, but not by us, or not ES256: the algorithm-confusion family. */
    corpus_add(&c, libjwt_token(JWT_ALG_HS256, pub_b, pub_b_len, kid_b, GOOD_PAYLOAD),
               "HS256 MAC'd with B's public PEM", -1);
    corpus_add(&c, libjwt_token(JWT_ALG_NONE, NULL, 0, kid_b, GOOD_PAYLOAD), "alg none", -1);
    corpus_add(&c, libjwt_token(JWT_ALG_ES256, other_priv, other_len, kid_b, GOOD_PAYLOAD),
               "re-signed by another key, kid B", -1);
    corpus_add(&c, libjwt_token(JWT_ALG_ES256, other_priv, other_len, kid_a, GOOD_PAYLOAD),
               "re-signed by another key, kid A", -1);
    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    assert_non_null(rsa);
    BIO *bio = BIO_new(BIO_s_mem());
    assert_non_null(bio);
    assert_int_equal(PEM_write_bio_PrivateKey(bio, rsa, NULL, NULL, 0, NULL, NULL), 1);
    char *rsa_pem = NULL;
    long rsa_len = BIO_get_mem_data(bio, &rsa_pem);
    corpus_add(
        &c,
        libjwt_token(JWT_ALG_RS256, (unsigned char *)rsa_pem, (size_t)rsa_len, kid_b, GOOD_PAYLOAD),
        "RS256 by an RSA key, kid B", -1);
    BIO_free(bio);
    EVP_PKEY_free(rsa);

    size_t accepted = 0, signed_total = 0, ref_only = 0;
    for (size_t i = 0; i < c.len; i++) {
        const struct corpus_entry *e = &c.e[i];
        json_t *ours = NULL, *ref = NULL;
        struct token_claims *cl = NULL;
        enum token_status sig_st = token_verify_signature(k, e->token, &ours);
        enum token_status st =
            token_verify(NULL, k, e->token, ISS, AUD, AGREE_NOW, AGREE_SKEW, &cl);
        bool ref_ok = ref_accepts(k, e->token, &ref);
        if (sig_st == TOKEN_OK) {
            accepted++;
            /* What ours accepts, libjwt accepts, with the same claims, and it was signed. */
            if (!ref_ok)
                fail_msg("entry %zu (%s): ours accepts, libjwt refuses: %s", i, e->what, e->token);
            if (!json_equal(ours, ref))
                fail_msg("entry %zu (%s): claims differ from libjwt's", i, e->what);
            if (!e->is_signed)
                fail_msg("entry %zu (%s): accepted, but no key signed it: %s", i, e->what,
                         e->token);
        } else {
            assert_null(ours);
        }
        if (st == TOKEN_OK) {
            if (sig_st != TOKEN_OK)
                fail_msg("entry %zu (%s): claims OK, signature not", i, e->what);
            assert_string_equal(cl->sub, json_string_value(json_object_get(ref, "sub")));
            assert_string_equal(cl->jti, json_string_value(json_object_get(ref, "jti")));
            assert_string_equal(cl->iss, json_string_value(json_object_get(ref, "iss")));
            assert_int_equal(cl->exp, json_integer_value(json_object_get(ref, "exp")));
            assert_int_equal(cl->iat, json_integer_value(json_object_get(ref, "iat")));
            token_claims_release(cl);
        } else {
            assert_null(cl);
        }
        if (e->is_signed) {
            signed_total++;
            /* Everything a keyring key signed under its own kid verifies, signature-wise. */
            if (sig_st != TOKEN_OK || !ref_ok)
                fail_msg("entry %zu (%s): signed, but ours %d, libjwt %d", i, e->what, sig_st,
                         ref_ok);
            if (e->expired && st != TOKEN_EXPIRED)
                fail_msg("entry %zu (%s): want EXPIRED, got %d", i, e->what, st);
        }
        if (ref_ok && sig_st != TOKEN_OK) {
            /* libjwt is laxer in one way only: a signature spelled with the unused low bits
             * of its last character set decodes to the same bytes, and it accepts it. */
            ref_only++;
            const struct corpus_entry *b = e->base >= 0 ? &c.e[e->base] : NULL;
            size_t n = strlen(e->token);
            if (!b || strcmp(e->what, "signature character changed") != 0 ||
                strlen(b->token) != n || memcmp(b->token, e->token, n - 1) != 0)
                fail_msg("entry %zu (%s): libjwt accepts, ours refuses (%d): %s", i, e->what,
                         sig_st, e->token);
            assert_int_equal(sig_st, TOKEN_BAD_SIGNATURE);
        }
        json_decref(ours);
        json_decref(ref);
    }
    assert_int_equal(accepted, signed_total);
    assert_true(ref_only > 0); /* the lax spelling was in the corpus */
    printf("agreement corpus: %zu tokens, %zu signed and accepted by both, %zu refused by both, "
           "%zu non-canonical signature spellings accepted by libjwt only\n",
           c.len, accepted, c.len - accepted - ref_only, ref_only);

    for (size_t i = 0; i < c.len; i++)
        free(c.e[i].token);
    free(c.e);
    keys_free(ka);
    keys_free(k);
    rm_rf(tmp);
    free(tmp);
}

/* The signer's DER → R‖S and the verifier's R‖S → DER: an R or S below 2^248 has a leading
 * zero byte, which DER drops; signing until both have happened a few times (each about
 * one signature in 256) checks that the padding and its removal agree with libjwt. */
static void test_sign_round_trip_short_r_s(void **state) {
    (void)state;
    size_t pem_len = 0;
    const unsigned char *pem = keys_public_pem(fx.k, keys_active_kid(fx.k), &pem_len);
    json_t *want = json_loads(GOOD_PAYLOAD, 0, NULL);
    assert_non_null(want);
    int short_r = 0, short_s = 0, high_r = 0, by_libjwt = 0, i;
    for (i = 0; i < 40000 && (short_r < 3 || short_s < 3); i++) {
        char *t = sign_json(fx.k, GOOD_PAYLOAD);
        uint8_t raw[66];
        sig_raw(t, raw);
        bool r_short = raw[0] == 0, s_short = raw[32] == 0;
        short_r += r_short;
        short_s += s_short;
        high_r += raw[0] >= 0x80; /* DER needs a leading zero byte there */
        json_t *ours = NULL;
        if (token_verify_signature(fx.k, t, &ours) != TOKEN_OK) fail_msg("ours refuses %s", t);
        assert_true(json_equal(ours, want));
        json_decref(ours);
        if (r_short || s_short || i % 64 == 0) {
            jwt_t *j = NULL;
            if (jwt_decode(&j, t, pem, (int)pem_len) != 0)
                fail_msg("libjwt refuses our signature (R short %d, S short %d): %s", r_short,
                         s_short, t);
            assert_int_equal(jwt_get_alg(j), JWT_ALG_ES256);
            char *g = jwt_get_grants_json(j, NULL);
            json_t *grants = json_loads(g, 0, NULL);
            assert_true(json_equal(grants, want));
            json_decref(grants);
            free(g);
            jwt_free(j);
            by_libjwt++;
        }
        free(t);
    }
    assert_true(short_r >= 3);
    assert_true(short_s >= 3);
    assert_true(high_r > 0);
    printf("signed %d tokens: %d with a short R, %d with a short S; %d checked by libjwt\n", i,
           short_r, short_s, by_libjwt);

    /* libjwt's signer, which pads R and S its own way, verifies with ours as well. */
    size_t priv_len = 0;
    const unsigned char *priv = keys_active_private_pem(fx.k, &priv_len);
    for (i = 0; i < 200; i++) {
        char *t = libjwt_token(JWT_ALG_ES256, priv, priv_len, keys_active_kid(fx.k), GOOD_PAYLOAD);
        json_t *ours = NULL;
        if (token_verify_signature(fx.k, t, &ours) != TOKEN_OK) fail_msg("ours refuses %s", t);
        json_decref(ours);
        free(t);
    }
    json_decref(want);
}

/* A signature part differing from a valid one only in the unused low bits of its last
 * character decodes to the same 64 bytes: libjwt accepts it, ours refuses the spelling. */
static void test_verify_noncanonical_signature(void **state) {
    (void)state;
    char *t = sign_json(fx.k, GOOD_PAYLOAD);
    size_t n = strlen(t);
    char last = t[n - 1];
    size_t idx = (size_t)(strchr(B64URL_ALPHABET, last) - B64URL_ALPHABET);
    assert_int_equal(idx % 16, 0); /* canonical: 2 data bits, 4 zero bits */
    t[n - 1] = B64URL_ALPHABET[idx + 1];
    size_t pem_len = 0;
    const unsigned char *pem = keys_public_pem(fx.k, keys_active_kid(fx.k), &pem_len);
    jwt_t *j = NULL;
    assert_int_equal(jwt_decode(&j, t, pem, (int)pem_len), 0);
    jwt_free(j);
    expect_status("non-canonical signature spelling", t, TOKEN_BAD_SIGNATURE);
    t[n - 1] = last;
    expect_status("canonical again", t, TOKEN_OK);

    /* The same rule for the header and the payload, where the other spelling also changes
     * the signed bytes: refused as malformed before the signature is looked at. */
    for (int part = 0; part < 2; part++) {
        size_t len = 0;
        const char *p = part_of(t, part, &len);
        if (len % 4 == 0) continue; /* no unused bits to set */
        char *m = strdup(t);
        assert_non_null(m);
        size_t at = (size_t)(p - t) + len - 1;
        idx = (size_t)(strchr(B64URL_ALPHABET, m[at]) - B64URL_ALPHABET);
        m[at] = B64URL_ALPHABET[idx + 1];
        expect_status(part == 0 ? "non-canonical header" : "non-canonical payload", m,
                      TOKEN_MALFORMED);
        free(m);
    }
    free(t);
}

/* Cheap checks first, the signature last: a token with a bad signature and a bad claim is
 * refused for the claim, without the signature being checked. */
static void test_verify_order(void **state) {
    (void)state;
    static const struct {
        const char *name;
        const char *payload;
        enum token_status want;
    } cases[] = {
        {"expired", "{" BASE ",\"iat\":1000,\"exp\":1200}", TOKEN_EXPIRED},
        {"wrong issuer",
         "{\"iss\":\"x\",\"aud\":\"pep\",\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}",
         TOKEN_WRONG_ISSUER},
        {"wrong audience",
         "{\"iss\":\"pep\",\"aud\":\"x\",\"sub\":\"bot\",\"jti\":\"J1\",\"iat\":1000,\"exp\":2000}",
         TOKEN_WRONG_AUDIENCE},
        {"claim type", "{" BASE ",\"iat\":1000,\"exp\":\"2000\"}", TOKEN_MALFORMED},
        {"not yet valid", "{" BASE ",\"iat\":1000,\"nbf\":1900,\"exp\":2000}", TOKEN_NOT_YET_VALID},
        {"all good", GOOD_PAYLOAD, TOKEN_BAD_SIGNATURE},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        char *t = sign_json(fx.k, cases[i].payload);
        char *sig = strrchr(t, '.') + 1;
        sig[20] = sig[20] == 'A' ? 'B' : 'A';
        struct token_claims *c = (struct token_claims *)0x1;
        enum token_status st = token_verify(NULL, fx.k, t, ISS, AUD, 1500, 30, &c);
        if (st != cases[i].want)
            fail_msg("case \"%s\": got %d, want %d", cases[i].name, st, cases[i].want);
        assert_null(c);
        /* The signature-only check knows no claim: bad signature, whatever the claims. */
        json_t *j = (json_t *)0x1;
        assert_int_equal(token_verify_signature(fx.k, t, &j), TOKEN_BAD_SIGNATURE);
        assert_null(j);
        free(t);
    }
}

/* ---------------------------------------------------------------------------------- */
/* Checkpoints                                                                         */

static void test_checkpoint_sign_verify(void **state) {
    (void)state;
    uint8_t hash[32];
    for (int i = 0; i < 32; i++)
        hash[i] = (uint8_t)(i * 7 + 1);
    char *jwt = keys_sign_checkpoint(fx.k, 42, hash, 1700000000);
    assert_non_null(jwt);

    json_t *claims = NULL;
    assert_int_equal(token_verify_signature(fx.k, jwt, &claims), TOKEN_OK);
    assert_int_equal(json_object_size(claims), 3);
    assert_int_equal(json_integer_value(json_object_get(claims, "seq")), 42);
    assert_int_equal(json_integer_value(json_object_get(claims, "iat")), 1700000000);
    assert_string_equal(json_string_value(json_object_get(claims, "hash")),
                        "01080f161d242b323940474e555c636a71787f868d949ba2a9b0b7bec5ccd3da");
    json_decref(claims);

    json_t *h = token_header(jwt);
    assert_string_equal(json_string_value(json_object_get(h, "alg")), "ES256");
    assert_string_equal(json_string_value(json_object_get(h, "kid")), keys_active_kid(fx.k));
    json_decref(h);

    /* Not an agent token: the claim checks refuse it. */
    struct token_claims *c = NULL;
    assert_int_equal(token_verify(NULL, fx.k, jwt, ISS, AUD, 1700000000, 0, &c), TOKEN_MALFORMED);
    /* Another keyring does not hold the key. */
    assert_int_equal(token_verify_signature(fx.other, jwt, &claims), TOKEN_UNKNOWN_KID);
    assert_null(claims);
    /* Tampered. */
    char *sig = strrchr(jwt, '.') + 1;
    sig[30] = sig[30] == 'Q' ? 'R' : 'Q';
    assert_int_equal(token_verify_signature(fx.k, jwt, &claims), TOKEN_BAD_SIGNATURE);
    assert_null(claims);
    free(jwt);
}

static void test_status_messages(void **state) {
    (void)state;
    for (int st = TOKEN_OK; st <= TOKEN_NOT_YET_VALID; st++) {
        const char *m = token_status_message((enum token_status)st);
        assert_non_null(m);
        assert_true(strlen(m) > 0);
        for (int o = TOKEN_OK; o < st; o++)
            assert_string_not_equal(m, token_status_message((enum token_status)o));
    }
    assert_string_equal(token_status_message(TOKEN_EXPIRED), "token expired");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_create_and_reload),
        cmocka_unit_test(test_keys_thumbprint_fixed_key),
        cmocka_unit_test(test_keys_refuses_bad_files),
        cmocka_unit_test(test_keys_jwks_shape),
        cmocka_unit_test(test_keys_rotate),
        cmocka_unit_test(test_verify_table),
        cmocka_unit_test(test_verify_claim_values),
        cmocka_unit_test(test_verify_alg_none),
        cmocka_unit_test(test_verify_hs256_with_public_pem),
        cmocka_unit_test(test_verify_header_table),
        cmocka_unit_test(test_verify_other_key_claiming_our_kid),
        cmocka_unit_test(test_verify_flipped_signature),
        cmocka_unit_test(test_verify_malformed),
        cmocka_unit_test(test_verify_agrees_with_libjwt),
        cmocka_unit_test(test_sign_round_trip_short_r_s),
        cmocka_unit_test(test_verify_noncanonical_signature),
        cmocka_unit_test(test_verify_order),
        cmocka_unit_test(test_issue_agent_round_trip),
        cmocka_unit_test(test_issue_operator_and_acr),
        cmocka_unit_test(test_issue_refuses_bad_requests),
        cmocka_unit_test(test_cache_hits_and_rechecks),
        cmocka_unit_test(test_cache_bounded),
        cmocka_unit_test(test_cache_threads),
        cmocka_unit_test(test_cache_timing),
        cmocka_unit_test(test_checkpoint_sign_verify),
        cmocka_unit_test(test_status_messages),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
