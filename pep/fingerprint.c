/*
 * fingerprint.c — see fingerprint.h.
 */
#include "pep/fingerprint.h"
#include "pep/util.h"

#include <openssl/evp.h>
#include <string.h>

static void add_part(EVP_MD_CTX *ctx, const void *data, size_t len) {
    uint8_t n[8];
    for (int i = 0; i < 8; i++)
        n[i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    EVP_DigestUpdate(ctx, n, sizeof n);
    if (len) EVP_DigestUpdate(ctx, data, len);
}

static void add_string(EVP_MD_CTX *ctx, const char *s) {
    add_part(ctx, s, s ? strlen(s) : 0);
}

int request_fingerprint(const struct fingerprint_input *in, char hex[FINGERPRINT_HEX_LEN + 1]) {
    uint8_t digest[32];
    unsigned int len = 0;
    bool ok = false;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1) {
        add_string(ctx, in->agent);
        add_string(ctx, in->method);
        add_string(ctx, in->path);
        add_string(ctx, in->query);
        add_part(ctx, in->body, in->body_len);
        ok = EVP_DigestFinal_ex(ctx, digest, &len) == 1 && len == sizeof digest;
    }
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        hex[0] = '\0';
        return PEP_ECRYPTO;
    }
    pep_hex(digest, sizeof digest, hex);
    return 0;
}
