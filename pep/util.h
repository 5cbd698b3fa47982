/*
 * util.h — clock, encoding and hashing helpers shared by pep, pepctl and the tests.
 *
 * The clocks are the only place that reads time; pure modules receive `now` as a
 * parameter instead of calling these.  Encoders use OpenSSL and jansson; nothing here is
 * a hand-written codec.
 *
 * Thread-safety: all functions are safe from any thread.
 */
#ifndef PEP_UTIL_H
#define PEP_UTIL_H

#include "pep/common.h"

/* Wall clock, microseconds since the Unix epoch. */
int64_t pep_now_us(void);
/* Monotonic clock, microseconds since an arbitrary origin. */
int64_t pep_mono_us(void);

/* Writes "2026-11-23T20:34:16.123456Z" (27 chars + NUL) for a wall-clock time in us. */
void pep_format_rfc3339_us(int64_t us, char out[32]);
/* Parses an RFC 3339 timestamp (Z or ±hh:mm offset, optional fraction) into us since the
 * epoch; returns 0 or PEP_EINVAL. */
int pep_parse_rfc3339(const char *s, int64_t *out_us);

/* Parses a duration: a positive integer followed by ms, s, m, h or d ("250ms", "7d").
 * Returns 0 and the value in milliseconds, or PEP_EINVAL. */
int pep_parse_duration_ms(const char *s, int64_t *out_ms);
/* Parses a size: an integer with optional unit B, KB, KiB, MB, MiB, GB, GiB (k=1000,
 * Ki=1024).  Returns 0 and the value in bytes, or PEP_EINVAL. */
int pep_parse_size(const char *s, uint64_t *out_bytes);

/* SHA-256 of len bytes into out[32]. */
void pep_sha256(const void *data, size_t len, uint8_t out[32]);
/* SHA-256 of a's bytes followed by b's into out[32]; 0, or PEP_ECRYPTO with out zeroed. */
int pep_sha256_parts(const void *a, size_t a_len, const void *b, size_t b_len, uint8_t out[32]);
/* True when s[0..len) is well-formed UTF-8 (RFC 3629: no overlong form, no surrogate, at
 * most U+10FFFF).  jansson checks this for the strings it makes but does not export it. */
bool pep_utf8_valid(const char *s, size_t len);
/* The length of the longest prefix of s[0..len) of at most max bytes that does not end
 * inside a UTF-8 sequence (a value cut to fit is cut between characters). */
size_t pep_utf8_cut(const char *s, size_t len, size_t max);
/* Lowercase hex of len bytes into out (2*len+1 bytes, NUL-terminated). */
void pep_hex(const uint8_t *data, size_t len, char *out);
/* Decodes 2*len hex digits into out[len]; returns 0 or PEP_EINVAL. */
int pep_unhex(const char *hex, uint8_t *out, size_t len);

/* base64url without padding (RFC 7515 §2).  Returns a malloc'd NUL-terminated string the
 * caller frees, or NULL on allocation failure. */
char *pep_base64url_encode(const uint8_t *data, size_t len);

/* Fills buf with len cryptographically random bytes; returns 0 or PEP_ECRYPTO. */
int pep_random_bytes(void *buf, size_t len);

/* A request id: a 26-character ULID (Crockford base32, 48-bit ms time + 80 random bits),
 * strictly increasing within this process even inside one millisecond. */
void pep_request_id(char out[27]);

/* Reads a whole file (at most max_bytes) into a malloc'd NUL-terminated buffer.  Returns
 * 0, PEP_EIO (with errno kept) or PEP_EINVAL when the file is larger than max_bytes. */
int pep_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len);

/* Reads a whole regular file (at most max_bytes, itself under SIZE_MAX / 2) into a malloc'd
 * NUL-terminated buffer, never waiting on a peer: path is opened with O_NONBLOCK (a FIFO
 * without a writer would otherwise hold open() until one came) and O_NOCTTY, and anything
 * fstat does not call a regular file (a FIFO, a directory, a device, a socket) is refused
 * before a byte is read.  A symlink to a regular file is followed.  Returns 0, PEP_EIO (with
 * errno kept), PEP_EINVAL when the file is larger than max_bytes, or PEP_EDENIED when it is
 * not a regular file.  Meant for files an operator names (the policy); pep_read_file still
 * reads whatever path names. */
int pep_read_regular_file(const char *path, size_t max_bytes, char **out, size_t *out_len);

/* Writes data to path atomically (temp file + fsync + rename) with the given mode. */
int pep_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode);

/* True when s is HOST:PORT or [V6]:PORT with a decimal port of at most 65535 (getaddrinfo
 * would silently wrap a larger one) and no space, control character or '/' in HOST. */
bool pep_listen_address_ok(const char *s);

/* A non-empty string with no whitespace and no control character: tenants, scopes, ids. */
bool pep_is_word(const char *s);
/* True when s (NULL counts as empty) has no control character: free text such as an
 * agent's owner. */
bool pep_has_no_control(const char *s);
/* RFC 6749 3.3 scope-token: 1*( %x21 / %x23-5B / %x5D-7E ), printable ASCII without space,
 * '"' and '\\'.  Only such scopes fit a token's space-separated `scope` claim, so agents
 * are refused any other (policy and admin API alike). */
bool pep_is_scope_token(const char *s);
/* An agent or operator id: 1-128 characters of [A-Za-z0-9._@-], so that it is one URL
 * path segment as it is (/admin/v1/agents/{id}).  The admin API and the policy compiler
 * apply this one rule. */
bool pep_is_id(const char *s);

#endif
