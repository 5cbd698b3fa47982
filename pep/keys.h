/*
 * keys.h — pep's ES256 signing keys (SPEC 1, 3.1, 3.6).
 *
 * Keys live as PEM files in DATA/keys/<kid>.pem (directory 0700, files 0600).  The kid is
 * the RFC 7638 JWK thumbprint (base64url SHA-256 of {"crv","kty","x","y"}).  The newest
 * key (by file mtime, ties broken by kid) signs; every key in the directory verifies.
 *
 * Every key is parsed once, when the keyring is loaded or rotated, into OpenSSL objects
 * that are then only read: the key pair (signing, with EVP_DigestSign) and its public
 * half (verifying, token.c with EVP_DigestVerify).  Nothing re-parses a PEM per signature
 * or per verification — libjwt 1.10 does, at 0.4–0.8 ms a call with OpenSSL 3, which let
 * anyone holding one token buy a millisecond of CPU per forged request.  The PEM texts are
 * kept only for tests and tools that cross-check with libjwt.
 *
 * Ownership and threads: a keyring is immutable after keys_load_or_create and may be read
 * from any thread, its EVP_PKEYs included (OpenSSL allows concurrent operations on one
 * EVP_PKEY, each with its own context); rotation (keys_rotate) builds a new keyring and
 * the caller swaps it.
 */
#ifndef PEP_KEYS_H
#define PEP_KEYS_H

#include "pep/common.h"

#include <jansson.h>
#include <openssl/types.h>

struct keyring;

/* Loads every DATA/keys/<kid>.pem, creating the directory and a first P-256 key when there is none.
 * Returns 0 and *out (free with keys_free), or a negative code with err filled. */
int keys_load_or_create(const char *data_dir, struct keyring **out, struct pep_err *err);
void keys_free(struct keyring *k);

/*
 * Loads every DIR/<kid>.pem as it is, to verify with (pepctl audit verify --db): creates
 * nothing and changes no file mode, unlike keys_load_or_create, because the directory may
 * belong to someone else or be part of the evidence.  Returns 0 and *out (free with
 * keys_free), PEP_ENOTFOUND with err when DIR holds no key, or a negative code with err.
 */
int keys_load_readonly(const char *dir, struct keyring **out, struct pep_err *err);

/* The signing key's kid. */
const char *keys_active_kid(const struct keyring *k);

/* PEM of the active private key and its length (len may not be NULL).  pep signs with
 * the parsed key; this is for tests that sign through libjwt. */
const unsigned char *keys_active_private_pem(const struct keyring *k, size_t *len);

/* PEM of the public key named kid and its length (len may be NULL), or NULL when pep
 * holds no such key.  For cross-checks with libjwt: pep verifies with keys_public_key. */
const unsigned char *keys_public_pem(const struct keyring *k, const char *kid, size_t *len);

/*
 * The public key named kid, parsed at load (the public half only: it verifies, it cannot
 * sign), or NULL when pep holds no such key (or kid is NULL).  Owned by k and valid as
 * long as k is; never modified, so any thread may verify with it (not const only because
 * OpenSSL's EVP_DigestVerifyInit takes a non-const key).
 */
EVP_PKEY *keys_public_key(const struct keyring *k, const char *kid);

/* An ES256 signature in a JWS (RFC 7518 3.4): R then S, each 32 bytes big-endian and
 * left-padded with zeros — not the DER ECDSA-Sig-Value OpenSSL produces and expects. */
#define KEYS_ES256_SIG_LEN 64
/* The longest DER ECDSA-Sig-Value for P-256: SEQUENCE of two INTEGERs of up to 33 bytes. */
#define KEYS_ES256_DER_MAX 72

/* RFC 7517 key set {"keys":[{kty:"EC",crv:"P-256",x,y,kid,alg:"ES256",use:"sig"}…]},
 * the active key first.  Returns a new reference, or NULL on allocation failure. */
json_t *keys_jwks(const struct keyring *k);

/* Length of a kid: base64url of a SHA-256 digest, without padding. */
#define KEYS_KID_LEN 43

/* Number of keys held (≥ 1 for a loaded keyring). */
size_t keys_count(const struct keyring *k);

/* Creates a new P-256 key in DATA/keys (it becomes the active key: its mtime is made
 * newer than every existing key's) and loads the whole directory again.  The old keyring
 * stays valid; the caller swaps it for *out.  Returns 0 or a negative code with err. */
int keys_rotate(const char *data_dir, struct keyring **out, struct pep_err *err);

/* Signs a JSON object of claims with the active key: a compact JWS with header
 * {"alg":"ES256","kid":…,"typ":"JWT"}, header and claims serialized compact with sorted
 * keys (as libjwt writes them, so libjwt's jwt_decode verifies the result).  The one
 * signing path for agent/operator tokens and audit checkpoints; no PEM is parsed.
 * Returns 0 and *jwt_out (malloc'd, caller frees), or a negative code with err. */
int keys_sign_claims(const struct keyring *k, const json_t *claims, char **jwt_out,
                     struct pep_err *err);

/* A signed audit checkpoint (SPEC 6.4): claims {"seq":seq,"hash":"<hex>","iat":now_s}.
 * Returns a malloc'd JWT the caller frees, or NULL on failure.  Verify it with
 * token_verify_signature (token.h). */
char *keys_sign_checkpoint(const struct keyring *k, int64_t seq, const uint8_t hash[32],
                           int64_t now_s);

#endif
