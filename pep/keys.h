/*
 * keys.h — pep's ES256 signing keys (SPEC 1, 3.1, 3.6).
 *
 * Keys live as PEM files in DATA/keys/<kid>.pem (directory 0700, files 0600).  The kid is
 * the RFC 7638 JWK thumbprint (base64url SHA-256 of {"crv","kty","x","y"}).  The newest
 * key (by file mtime, ties broken by kid) signs; every key in the directory verifies.
 * Each key's public half is also kept as a parsed EVP_PKEY and as PEM bytes, so that
 * verification never re-parses a file on the request path.
 *
 * Ownership and threads: a keyring is immutable after keys_load_or_create and may be read
 * from any thread; rotation (a later issue) builds a new keyring and swaps it.
 */
#ifndef PEP_KEYS_H
#define PEP_KEYS_H

#include "pep/common.h"

#include <jansson.h>

struct keyring;

/* Loads DATA/keys/*.pem, creating the directory and a first P-256 key when there is none.
 * Returns 0 and *out (free with keys_free), or a negative code with err filled. */
int keys_load_or_create(const char *data_dir, struct keyring **out, struct pep_err *err);
void keys_free(struct keyring *k);

/* The signing key's kid. */
const char *keys_active_kid(const struct keyring *k);

/* PEM of the active private key (for libjwt's encoder) and its length. */
const unsigned char *keys_active_private_pem(const struct keyring *k, size_t *len);

/* PEM of the public key named kid, or NULL when pep holds no such key. */
const unsigned char *keys_public_pem(const struct keyring *k, const char *kid, size_t *len);

/* RFC 7517 key set {"keys":[{kty:"EC",crv:"P-256",x,y,kid,alg:"ES256",use:"sig"}…]}.
 * Returns a new reference. */
json_t *keys_jwks(const struct keyring *k);

#endif
