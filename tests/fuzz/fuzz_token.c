/*
 * fuzz_token.c — libFuzzer target for token parsing and verification (pep/token.h:
 * token_verify_signature and token_verify, with and without the claims cache).  The
 * input is the string after "Bearer ".  Only token.h's public functions are used: the
 * verifier behind them may be rewritten freely.
 *
 * The keyring holds one fixed P-256 key (below; a test key, it signs nothing but fuzz
 * inputs) so that the committed corpus can hold tokens it really signed, and the fuzzer
 * starts from inputs that pass the signature and reach the claim checks.  At start the
 * target signs the claim sets of seed_claims[] and keeps their signing inputs
 * ("header.payload").  PEP_FUZZ_PRINT_SEEDS=1 prints those tokens, one "NAME TOKEN" a line,
 * to refresh tests/fuzz/corpus/fuzz_token/ (see README.md).
 *
 * Properties, for any string:
 *   - no crash, leak or undefined behaviour; every status is one of enum token_status;
 *   - nothing is accepted that the key did not sign: when token_verify_signature accepts
 *     X, X's signing input is byte for byte one of those signed at start (the fuzzer
 *     cannot forge ES256, so any other accept is a forgery), and the claims it returns
 *     are that claim set;
 *   - token_verify is the signature half plus the claims: it accepts only what
 *     token_verify_signature accepts, and an accepted token's claims are the claim set
 *     signed and respect issuer, audience and the time window of token.h;
 *   - the cache changes nothing: with a verifier, the first (miss) and second (hit) calls
 *     answer what the uncached call answers, for the agent and the operator audience.
 */
#include "tests/fuzz/fuzz.h"

#include "pep/keys.h"
#include "pep/token.h"

#include <jansson.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The fuzz key (PKCS#8) and its RFC 7638 thumbprint, the kid keys.c gives it. */
static const char fuzz_key_pem[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzgNV47p/S/AJQ10+\n"
    "NB/xNPVqtBeqTG8spOLq6pD62uehRANCAARBKAqlzqFYglgJmeQHfbLRIBzhCNYC\n"
    "GNZGRK4PDQ4lgK3QuP0pXoS/waMfeyPOI8OKWh1YmEUdpPID+TaNL5LT\n"
    "-----END PRIVATE KEY-----\n";
#define FUZZ_KID "hr3dUntupjWJjtbclvieR8U-eKKkUwGqpTrKkBbeKLA"

#define NOW 1700000000
#define SKEW 30
#define ISSUER "pep"

/* Claim sets signed at start: real pep tokens (agent, operator, step-up) and tokens that
 * are validly signed but refused on their claims. */
static const char *const seed_claims[][2] = {
    {"agent", "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":"
              "\"000102030405060708090a0b0c0d0e0f\",\"iat\":1699999940,\"nbf\":1699999940,"
              "\"exp\":1700003600,\"scope\":\"llm.chat tool.search\"}"},
    {"operator", "{\"iss\":\"pep\",\"aud\":\"pep-admin\",\"sub\":\"admin\",\"jti\":"
                 "\"101112131415161718191a1b1c1d1e1f\",\"iat\":1699999940,\"nbf\":1699999940,"
                 "\"exp\":1731535940,\"roles\":[\"admin\",\"auditor\"]}"},
    {"stepup", "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":"
               "\"202122232425262728292a2b2c2d2e2f\",\"iat\":1699999990,\"nbf\":1699999990,"
               "\"exp\":1700000290,\"scope\":\"refunds.approve\",\"acr\":\"mfa\","
               "\"auth_time\":1699999990}"},
    {"aud-array", "{\"iss\":\"pep\",\"aud\":[\"other\",\"pep\"],\"sub\":\"demo-bot\",\"jti\":"
                  "\"303132333435363738393a3b3c3d3e3f\",\"iat\":1699999940,\"exp\":1700003600}"},
    {"expired", "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":"
                "\"404142434445464748494a4b4c4d4e4f\",\"iat\":1699992800,\"nbf\":1699992800,"
                "\"exp\":1699996400,\"scope\":\"llm.chat\"}"},
    {"not-yet", "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":"
                "\"505152535455565758595a5b5c5d5e5f\",\"iat\":1700000000,\"nbf\":1700003600,"
                "\"exp\":1700007200}"},
    {"wrong-iss", "{\"iss\":\"evil\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":"
                  "\"606162636465666768696a6b6c6d6e6f\",\"iat\":1699999940,\"exp\":1700003600}"},
    {"bad-types", "{\"iss\":\"pep\",\"aud\":\"pep\",\"sub\":\"demo-bot\",\"jti\":7,"
                  "\"iat\":\"1699999940\",\"exp\":1.7e9,\"scope\":[\"llm.chat\"]}"},
    {"checkpoint", "{\"seq\":1000,\"hash\":\"00112233445566778899aabbccddeeff00112233445566778899"
                   "aabbccddeeff\",\"iat\":1700000000}"},
};
#define NSEEDS PEP_ARRAY_LEN(seed_claims)

static struct keyring *keys;
static struct token_verifier *verifier;
static json_t *claims_of[NSEEDS];
static char *signing_input[NSEEDS]; /* "header.payload" of each signed seed */

static void write_key(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/keys", dir);
    FUZZ_CHECK(mkdir(path, 0700) == 0, "mkdir %s", path);
    snprintf(path, sizeof path, "%s/keys/%s.pem", dir, FUZZ_KID);
    FILE *f = fopen(path, "w");
    FUZZ_CHECK(f && fchmod(fileno(f), 0600) == 0, "cannot write %s", path);
    fputs(fuzz_key_pem, f);
    fclose(f);
}

static void remove_key(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/keys/%s.pem", dir, FUZZ_KID);
    unlink(path);
    snprintf(path, sizeof path, "%s/keys", dir);
    rmdir(path);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char dir[] = "/tmp/pep-fuzz-token-XXXXXX";
    FUZZ_CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    write_key(dir);
    struct pep_err err = {0};
    int rc = keys_load_or_create(dir, &keys, &err);
    remove_key(dir); /* the keyring holds what it needs in memory */
    FUZZ_CHECK(rc == 0, "keys_load_or_create: %s", err.msg);
    FUZZ_CHECK(strcmp(keys_active_kid(keys), FUZZ_KID) == 0, "kid %s", keys_active_kid(keys));
    verifier = token_verifier_new(64);
    FUZZ_CHECK(verifier != NULL, "token_verifier_new");
    bool print = getenv("PEP_FUZZ_PRINT_SEEDS") != NULL;
    for (size_t i = 0; i < NSEEDS; i++) {
        json_error_t jerr;
        claims_of[i] = json_loads(seed_claims[i][1], 0, &jerr);
        FUZZ_CHECK(claims_of[i] != NULL, "seed %s: %s", seed_claims[i][0], jerr.text);
        char *jwt = NULL;
        FUZZ_CHECK(keys_sign_claims(keys, claims_of[i], &jwt, &err) == 0, "sign: %s", err.msg);
        signing_input[i] = strndup(jwt, (size_t)(strrchr(jwt, '.') - jwt));
        if (print) printf("%s %s\n", seed_claims[i][0], jwt);
        free(jwt);
    }
    return 0;
}

static const char *status_name(enum token_status st) {
    static char other[32];
    switch (st) {
    case TOKEN_OK:
        return "OK";
    case TOKEN_MALFORMED:
        return "MALFORMED";
    case TOKEN_BAD_ALG:
        return "BAD_ALG";
    case TOKEN_UNKNOWN_KID:
        return "UNKNOWN_KID";
    case TOKEN_BAD_SIGNATURE:
        return "BAD_SIGNATURE";
    case TOKEN_WRONG_ISSUER:
        return "WRONG_ISSUER";
    case TOKEN_WRONG_AUDIENCE:
        return "WRONG_AUDIENCE";
    case TOKEN_EXPIRED:
        return "EXPIRED";
    case TOKEN_NOT_YET_VALID:
        return "NOT_YET_VALID";
    }
    snprintf(other, sizeof other, "unknown status %d", (int)st);
    return other;
}

/* Index of the seed whose signing input the token carries, or -1. */
static int signed_seed(const char *token) {
    const char *dot = strrchr(token, '.');
    if (!dot) return -1;
    size_t n = (size_t)(dot - token);
    for (size_t i = 0; i < NSEEDS; i++)
        if (strlen(signing_input[i]) == n && memcmp(signing_input[i], token, n) == 0) return (int)i;
    return -1;
}

static bool same_str(const char *a, const char *b) {
    return a && b && strcmp(a, b) == 0;
}

/* An accepted token's claims against token.h's rules and the claim set that was signed. */
static void check_claims(const struct token_claims *c, const char *audience, int seed) {
    FUZZ_CHECK(c && c->sub && *c->sub, "accepted without a subject");
    FUZZ_CHECK(same_str(c->iss, ISSUER), "accepted issuer '%s'", c->iss ? c->iss : "NULL");
    FUZZ_CHECK(same_str(c->aud, audience), "accepted audience '%s' for '%s'",
               c->aud ? c->aud : "NULL", audience);
    FUZZ_CHECK(NOW < c->exp + SKEW, "accepted expired: exp %lld", (long long)c->exp);
    FUZZ_CHECK(c->nbf <= NOW + SKEW && c->iat <= NOW + SKEW, "accepted early: nbf %lld iat %lld",
               (long long)c->nbf, (long long)c->iat);
    FUZZ_CHECK(c->scopes_len <= TOKEN_MAX_SCOPES && c->roles_len <= TOKEN_MAX_ROLES, "too many");
    const json_t *want = claims_of[seed];
    FUZZ_CHECK(same_str(c->sub, json_string_value(json_object_get(want, "sub"))), "sub differs");
    FUZZ_CHECK(c->exp == json_integer_value(json_object_get(want, "exp")), "exp differs");
}

static void check_same(enum token_status a, const struct token_claims *ca, enum token_status b,
                       const struct token_claims *cb, const char *what) {
    FUZZ_CHECK(a == b, "%s: %s, uncached %s", what, status_name(b), status_name(a));
    FUZZ_CHECK((ca != NULL) == (a == TOKEN_OK) && (cb != NULL) == (b == TOKEN_OK),
               "%s: claims returned with a refusal, or none with TOKEN_OK", what);
    if (ca && cb)
        FUZZ_CHECK(same_str(ca->sub, cb->sub) && same_str(ca->jti, cb->jti) && ca->exp == cb->exp &&
                       ca->scopes_len == cb->scopes_len,
                   "%s: cached claims differ", what);
}

static void check_audience(const char *token, enum token_status sig, int seed,
                           const char *audience) {
    struct token_claims *plain = NULL, *miss = NULL, *hit = NULL;
    enum token_status st = token_verify(NULL, keys, token, ISSUER, audience, NOW, SKEW, &plain);
    /* Not the same status: token_verify may refuse on a claim before it checks the
     * signature (the earliest fault wins, token.c). */
    if (st == TOKEN_OK) {
        FUZZ_CHECK(sig == TOKEN_OK, "token_verify accepted what the signature check refused (%s)",
                   status_name(sig));
        check_claims(plain, audience, seed);
    }
    enum token_status st_miss =
        token_verify(verifier, keys, token, ISSUER, audience, NOW, SKEW, &miss);
    check_same(st, plain, st_miss, miss, "first cached call");
    enum token_status st_hit =
        token_verify(verifier, keys, token, ISSUER, audience, NOW, SKEW, &hit);
    check_same(st, plain, st_hit, hit, "second cached call");
    token_claims_release(plain);
    token_claims_release(miss);
    token_claims_release(hit);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 2 * TOKEN_MAX_LEN) return 0;
    char *token = fuzz_strndup(data, size);

    json_t *claims = NULL;
    enum token_status sig = token_verify_signature(keys, token, &claims);
    FUZZ_CHECK(sig >= TOKEN_OK && sig <= TOKEN_NOT_YET_VALID, "%s", status_name(sig));
    int seed = signed_seed(token);
    if (sig == TOKEN_OK) {
        FUZZ_CHECK(seed >= 0, "FORGERY: accepted a signing input the key never signed");
        FUZZ_CHECK(json_is_object(claims) && json_equal(claims, claims_of[seed]),
                   "accepted claims are not the claims signed (seed %s)", seed_claims[seed][0]);
    } else {
        FUZZ_CHECK(claims == NULL, "claims returned with %s", status_name(sig));
    }
    json_decref(claims);

    check_audience(token, sig, seed, "pep");
    check_audience(token, sig, seed, "pep-admin");
    free(token);
    return 0;
}
