/*
 * token.h — issuing and verifying pep's JWTs (SPEC 3.1, 5).
 *
 * Issue: keys_sign_claims signs with the keyring's active ES256 key, parsed at load;
 * header {"alg":"ES256","kid":…,"typ":"JWT"}.  libjwt's jwt_decode verifies the result.
 *
 * Verify, cheapest first and the signature last: shape and size, the header (alg exactly
 * ES256, typ, crit), the kid (a key of the keyring that verifies tokens at `now`: active,
 * or rotated out and not yet retired; keys.h), the payload and, in token_verify,
 * the claim types, iss, aud and times; then one ES256 verification with OpenSSL against
 * the kid's public key, parsed once when the keyring was loaded.  A token with several
 * faults gets the earliest fault's status.  SECURITY: the algorithm is ours, never the
 * token's — anything but ES256 (none, HS*, RS* …) is refused before any key is used, so an
 * HS256 token MAC'd with the public PEM (algorithm confusion) never verifies.  libjwt is not
 * on this path: it lets the token choose the algorithm and re-parses the PEM key per call.
 *
 * Cost: a token refused before the signature costs a few microseconds; the signature is
 * one P-256 verification, ~50–60 µs here — what a forged token costs, and a valid one the
 * first time.  Verified claims are then cached, keyed by SHA-256 of the token bytes
 * (bounded, LRU-ish, entries dropped once expired).  A cache hit still re-checks
 * exp/nbf/iat against `now`, and that its kid still verifies tokens; revocation, the agent's
 * enabled flag and its current scopes are the caller's live checks (registry).  Failures
 * are never cached.
 *
 * Threads: token_verify and token_issue may be called from any thread; the cache has one
 * lock (cache_lock) held only for lookup/insert.
 */
#ifndef PEP_TOKEN_H
#define PEP_TOKEN_H

#include "pep/keys.h"

#define TOKEN_MAX_SCOPES 64
#define TOKEN_MAX_ROLES 16

/* Verified claims.  Immutable and reference counted: a cache entry and its callers share
 * one copy.  Release with token_claims_release. */
struct token_claims {
    char *sub; /* agent or operator id */
    char *jti;
    char *iss;
    char *aud;             /* "pep" or "pep-admin" */
    int64_t iat, nbf, exp; /* seconds since the epoch; nbf defaults to iat when absent */
    char **scopes;         /* from the space-separated `scope` claim */
    size_t scopes_len;
    char **roles; /* operator tokens: `roles` array */
    size_t roles_len;
    char *acr;         /* NULL when absent */
    int64_t auth_time; /* 0 when absent */
    int refcount;      /* atomic */
};

struct token_claims *token_claims_retain(struct token_claims *c);
void token_claims_release(struct token_claims *c);

/* What an issued token says.  aud is "pep" (agent: scopes) or "pep-admin" (operator:
 * roles).  acr non-NULL adds acr and auth_time = now. */
struct token_request {
    const char *issuer;
    const char *aud;
    const char *sub;
    const char *const *scopes;
    size_t scopes_len;
    const char *const *roles;
    size_t roles_len;
    const char *acr;
    int64_t now_s;
    int64_t ttl_s;
};

/* A token id: 128 random bits as 32 lowercase hex digits, plus the NUL.  Hex, not base64url,
 * so an id never starts with '-' and is never taken for a flag on a command line. */
#define TOKEN_JTI_SIZE 33

/* Issues a token.  Returns 0 with *token (malloc'd, caller frees) and jti_out filled, or a
 * negative code. */
int token_issue(const struct keyring *k, const struct token_request *req, char **token,
                char jti_out[TOKEN_JTI_SIZE], struct pep_err *err);

enum token_status {
    TOKEN_OK = 0,
    TOKEN_MALFORMED, /* not three base64url parts / not JSON / wrong claim types */
    TOKEN_BAD_ALG,   /* header alg is not ES256 */
    TOKEN_UNKNOWN_KID,
    TOKEN_BAD_SIGNATURE,
    TOKEN_WRONG_ISSUER,
    TOKEN_WRONG_AUDIENCE,
    TOKEN_EXPIRED,
    TOKEN_NOT_YET_VALID, /* nbf or iat in the future beyond skew */
};

/* A short static description of a status, safe to show to the caller (never the token). */
const char *token_status_message(enum token_status st);

struct token_verifier; /* the claims cache; one per service */

/* capacity: max cached tokens (0 → 65536). */
struct token_verifier *token_verifier_new(size_t capacity);
void token_verifier_free(struct token_verifier *v);
/* Drops every cached entry (key rotation, tests). */
void token_verifier_flush(struct token_verifier *v);

/*
 * Verifies `token` (the bytes after "Bearer ") against keyring k, expecting issuer and
 * audience, at `now_s` with `skew_s` tolerance.  On TOKEN_OK, *claims is a new reference
 * the caller releases (otherwise *claims is NULL).  v may be NULL (no cache: tests).
 *
 * Checks, in order, the first failure answering: size and shape (MALFORMED), header alg
 * (BAD_ALG), header typ/crit (MALFORMED), kid (UNKNOWN_KID: not held, or retired at now_s),
 * payload JSON and claim types
 * (MALFORMED), iss (WRONG_ISSUER), aud (WRONG_AUDIENCE), times (EXPIRED, NOT_YET_VALID),
 * signature (BAD_SIGNATURE).  So a forged token with expired claims answers EXPIRED.
 * Every part must be canonical base64url (RFC 4648 3.5); a signature must be exactly 64
 * bytes, R‖S.
 *
 * Time edges (all in whole seconds, skew_s < 0 counts as 0):
 *   valid while   now_s <  exp + skew_s     (exp is exclusive, RFC 7519 4.1.4)
 *   TOKEN_EXPIRED when now_s >= exp + skew_s
 *   TOKEN_NOT_YET_VALID when nbf > now_s + skew_s or iat > now_s + skew_s
 *                 (so nbf itself is inclusive: valid from now_s == nbf - skew_s)
 * `aud` may be a string equal to audience or an array of strings containing it.
 * A token longer than TOKEN_MAX_LEN bytes is TOKEN_MALFORMED.  An internal failure
 * (allocation) also answers TOKEN_MALFORMED: the caller refuses either way (fail closed).
 */
enum token_status token_verify(struct token_verifier *v, const struct keyring *k, const char *token,
                               const char *issuer, const char *audience, int64_t now_s,
                               int64_t skew_s, struct token_claims **claims);

/* Longest token accepted or issued, in bytes.  SECURITY: bounds what one token can make
 * the verifier decode and parse before it is refused. */
#define TOKEN_MAX_LEN 8192

/*
 * The signature half of token_verify, shared with audit checkpoints — the same parser and
 * the same OpenSSL verifier: structure, header (alg exactly "ES256", no "crit", typ absent
 * or "JWT"), kid held by k in any state (a retired key verifies the checkpoints it signed),
 * payload a JSON object, then the ES256 signature by that key.
 * Checks no claim.  On TOKEN_OK *claims_out is the payload object (a new reference the
 * caller decrefs); otherwise NULL.
 */
enum token_status token_verify_signature(const struct keyring *k, const char *jwt,
                                         json_t **claims_out);

/*
 * The checker audit_verify_*_checked (audit/audit.h) calls for each checkpoint JWT, with
 * keyring the struct keyring * to trust: token_verify_signature, its status turned into
 * the verifier's reason ("signature invalid", "signed by an unknown key", "algorithm is
 * not ES256", "malformed jwt"); NULL and *claims (the payload, caller decrefs) when valid.
 * Any thread (the keyring is immutable).
 */
const char *token_check_checkpoint(void *keyring, const char *jwt, json_t **claims);

/* Cache counters, for tests and metrics. */
struct token_cache_stats {
    uint64_t hits;      /* verifications answered from the cache */
    uint64_t misses;    /* verifications that ran the signature check */
    uint64_t inserts;   /* successful verifications stored */
    uint64_t evictions; /* entries dropped to stay within capacity */
    uint64_t expired;   /* entries dropped because their token expired */
    size_t entries;     /* entries held now */
    size_t capacity;
};

void token_verifier_stats(struct token_verifier *v, struct token_cache_stats *out);

#endif
