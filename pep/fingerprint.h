/*
 * fingerprint.h — what makes two requests "the same request" for approvals (SPEC 3.4) and
 * idempotency (SPEC 4.5): the agent, the method, the normalized path, the raw query and the
 * exact body bytes (SPEC 8).
 *
 * The fingerprint is SHA-256 over the five parts, each preceded by its length as 8 bytes
 * big-endian, so that no two different tuples can give the same input ("a","bc" vs
 * "ab","c").  A missing query and an empty one are the same ("?" adds nothing a client could
 * mean).  Pure: threads any.
 */
#ifndef PEP_FINGERPRINT_H
#define PEP_FINGERPRINT_H

#include "pep/common.h"

#define FINGERPRINT_HEX_LEN 64

struct fingerprint_input {
    const char *agent;
    const char *method;
    const char *path;  /* decoded, normalized (what the decision matched) */
    const char *query; /* raw, after '?'; NULL = none */
    const char *body;  /* exact bytes; NULL with body_len 0 = none */
    size_t body_len;
};

/* Lowercase hex of the fingerprint into hex (65 bytes, NUL-terminated).  Returns 0, or
 * PEP_ECRYPTO when OpenSSL failed (hex is then ""): the caller refuses the request. */
int request_fingerprint(const struct fingerprint_input *in, char hex[FINGERPRINT_HEX_LEN + 1]);

#endif
