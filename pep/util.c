/*
 * util.c — clocks, time formats, durations, sizes, hashing and encodings.
 *
 * Encodings delegate to OpenSSL (SHA-256, base64, randomness); only the thin adaptations
 * the JOSE specs require (url-safe alphabet, no padding) are done here.
 */
#include "pep/util.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *pep_strerror(int code) {
    switch (code) {
#define PEP_X_CASE(name, value, msg)                                                               \
    case (value):                                                                                  \
        return msg;
        PEP_ERRORS(PEP_X_CASE)
#undef PEP_X_CASE
    }
    return "unknown error";
}

int pep_err_set(struct pep_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

int64_t pep_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t pep_mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void pep_format_rfc3339_us(int64_t us, char out[32]) {
    time_t secs = (time_t)(us / 1000000);
    long frac = (long)(us % 1000000);
    if (frac < 0) {
        frac += 1000000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%06ldZ", frac % 1000000);
}

static int parse_digits(const char **p, int n, int *out) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)(*p)[i])) return -1;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

int pep_parse_rfc3339(const char *s, int64_t *out_us) {
    int Y, M, D, h, m, sec;
    const char *p = s;
    if (parse_digits(&p, 4, &Y) || *p++ != '-' || parse_digits(&p, 2, &M) || *p++ != '-' ||
        parse_digits(&p, 2, &D) || (*p != 'T' && *p != 't' && *p != ' '))
        return PEP_EINVAL;
    p++;
    if (parse_digits(&p, 2, &h) || *p++ != ':' || parse_digits(&p, 2, &m) || *p++ != ':' ||
        parse_digits(&p, 2, &sec))
        return PEP_EINVAL;
    if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60) return PEP_EINVAL;
    int64_t frac_us = 0;
    if (*p == '.') {
        p++;
        int digits = 0;
        while (isdigit((unsigned char)*p)) {
            if (digits < 6) {
                frac_us = frac_us * 10 + (*p - '0');
                digits++;
            }
            p++;
        }
        if (digits == 0) return PEP_EINVAL;
        while (digits++ < 6)
            frac_us *= 10;
    }
    int offset_s = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1, oh, om;
        p++;
        if (parse_digits(&p, 2, &oh) || *p++ != ':' || parse_digits(&p, 2, &om) || oh > 23 ||
            om > 59)
            return PEP_EINVAL;
        offset_s = sign * (oh * 3600 + om * 60);
    } else {
        return PEP_EINVAL;
    }
    if (*p != '\0') return PEP_EINVAL;
    struct tm tm = {.tm_year = Y - 1900,
                    .tm_mon = M - 1,
                    .tm_mday = D,
                    .tm_hour = h,
                    .tm_min = m,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    *out_us = ((int64_t)t - offset_s) * 1000000 + frac_us;
    return 0;
}

static int parse_number_unit(const char *s, uint64_t *num, const char **unit) {
    if (!s || !isdigit((unsigned char)*s)) return PEP_EINVAL;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno == ERANGE) return PEP_EINVAL;
    *num = v;
    *unit = end;
    return 0;
}

int pep_parse_duration_ms(const char *s, int64_t *out_ms) {
    uint64_t n;
    const char *unit;
    if (parse_number_unit(s, &n, &unit)) return PEP_EINVAL;
    static const struct {
        const char *name;
        uint64_t ms;
    } units[] = {{"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000}};
    for (size_t i = 0; i < PEP_ARRAY_LEN(units); i++) {
        if (strcmp(unit, units[i].name) == 0) {
            if (n == 0 || n > (uint64_t)INT64_MAX / units[i].ms / 1000) return PEP_EINVAL;
            *out_ms = (int64_t)(n * units[i].ms);
            return 0;
        }
    }
    return PEP_EINVAL;
}

int pep_parse_size(const char *s, uint64_t *out_bytes) {
    uint64_t n;
    const char *unit;
    if (parse_number_unit(s, &n, &unit)) return PEP_EINVAL;
    static const struct {
        const char *name;
        uint64_t mult;
    } units[] = {{"", 1},         {"B", 1},         {"KB", 1000},       {"KiB", 1024},
                 {"MB", 1000000}, {"MiB", 1048576}, {"GB", 1000000000}, {"GiB", 1073741824}};
    for (size_t i = 0; i < PEP_ARRAY_LEN(units); i++) {
        if (strcmp(unit, units[i].name) == 0) {
            if (n > UINT64_MAX / units[i].mult) return PEP_EINVAL;
            *out_bytes = n * units[i].mult;
            return 0;
        }
    }
    return PEP_EINVAL;
}

/* OpenSSL 3 looks an algorithm up by name on every one-shot SHA256() or
 * EVP_DigestInit(EVP_sha256()) (an "implicit fetch"), which costs more than hashing a
 * token or an audit record; SHA-256 is fetched once and reused. */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void sha256_fetch(void) {
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

int pep_sha256_parts(const void *a, size_t a_len, const void *b, size_t b_len, uint8_t out[32]) {
    pthread_once(&sha256_once, sha256_fetch);
    const EVP_MD *md = sha256_md ? sha256_md : EVP_sha256();
    unsigned int out_len = 0;
    int rc = PEP_ECRYPTO;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx && EVP_DigestInit_ex2(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, a, a_len) == 1 &&
        EVP_DigestUpdate(ctx, b, b_len) == 1 && EVP_DigestFinal_ex(ctx, out, &out_len) == 1 &&
        out_len == 32)
        rc = 0;
    EVP_MD_CTX_free(ctx);
    if (rc) memset(out, 0, 32);
    return rc;
}

void pep_sha256(const void *data, size_t len, uint8_t out[32]) {
    /* Only an allocation failure can fail this (out is then zeroed); callers that key
     * anything security-relevant by the digest use pep_sha256_parts and its result. */
    (void)pep_sha256_parts(data, len, "", 0, out);
}

void pep_hex(const uint8_t *data, size_t len, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[data[i] >> 4];
        out[2 * i + 1] = digits[data[i] & 15];
    }
    out[2 * len] = '\0';
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int pep_unhex(const char *hex, uint8_t *out, size_t len) {
    for (size_t i = 0; i < len; i++) {
        int hi = hex_value(hex[2 * i]);
        int lo = hi < 0 ? -1 : hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return PEP_EINVAL;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return hex[2 * len] == '\0' ? 0 : PEP_EINVAL;
}

char *pep_base64url_encode(const uint8_t *data, size_t len) {
    size_t cap = 4 * ((len + 2) / 3) + 1;
    char *out = malloc(cap);
    if (!out) return NULL;
    int n = EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    while (n > 0 && out[n - 1] == '=')
        n--;
    out[n] = '\0';
    for (char *p = out; *p; p++) {
        if (*p == '+')
            *p = '-';
        else if (*p == '/')
            *p = '_';
    }
    return out;
}

int pep_random_bytes(void *buf, size_t len) {
    return RAND_bytes(buf, (int)len) == 1 ? 0 : PEP_ECRYPTO;
}

/* ULID state: the last millisecond used and the 80-bit random part, incremented within
 * one millisecond so that ids stay strictly ordered.  Guarded by ulid_lock. */
static pthread_mutex_t ulid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t ulid_last_ms;
static uint8_t ulid_rand[10];

void pep_request_id(char out[27]) {
    static const char alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    uint8_t bytes[16];
    uint64_t ms = (uint64_t)(pep_now_us() / 1000);

    pthread_mutex_lock(&ulid_lock);
    if (ms <= ulid_last_ms) {
        ms = ulid_last_ms;
        for (int i = 9; i >= 0 && ++ulid_rand[i] == 0; i--)
            ;
    } else {
        ulid_last_ms = ms;
        if (pep_random_bytes(ulid_rand, sizeof ulid_rand) != 0) {
            /* No entropy: fall back to a counter reset, still unique by time order. */
            memset(ulid_rand, 0, sizeof ulid_rand);
        }
        ulid_rand[0] &= 0x7f; /* headroom so increments within one ms do not wrap */
    }
    memcpy(bytes + 6, ulid_rand, 10);
    pthread_mutex_unlock(&ulid_lock);

    for (int i = 5; i >= 0; i--) {
        bytes[i] = (uint8_t)(ms & 0xff);
        ms >>= 8;
    }
    /* 128 bits → 26 base32 digits, most significant first (the first digit holds 3 bits). */
    unsigned __int128 v = 0;
    for (int i = 0; i < 16; i++)
        v = (v << 8) | bytes[i];
    for (int i = 25; i >= 0; i--) {
        out[i] = alphabet[(unsigned)(v & 31)];
        v >>= 5;
    }
    out[26] = '\0';
}

int pep_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len) {
    FILE *f = fopen(path, "rb");
    if (!f) return PEP_EIO;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    int rc = 0;
    if (!buf) {
        fclose(f);
        return PEP_ENOMEM;
    }
    for (;;) {
        if (len == cap) {
            if (cap > max_bytes) {
                rc = PEP_EINVAL;
                break;
            }
            cap *= 2;
            char *n = realloc(buf, cap + 1);
            if (!n) {
                rc = PEP_ENOMEM;
                break;
            }
            buf = n;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f)) rc = PEP_EIO;
            break;
        }
        if (len > max_bytes) {
            rc = PEP_EINVAL;
            break;
        }
    }
    fclose(f);
    if (rc) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len) *out_len = len;
    return 0;
}

int pep_read_regular_file(const char *path, size_t max_bytes, char **out, size_t *out_len) {
    assert(max_bytes < SIZE_MAX / 2);
    /* O_NONBLOCK: a FIFO opens at once (not when a writer comes) and is then refused below;
     * on a regular file it changes nothing.  O_NOCTTY: a terminal named here must not become
     * the process's controlling terminal. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return PEP_EIO;
    struct stat st;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;
    /* fstat, not stat: the checked object is the one opened, whatever path names by then. */
    if (fstat(fd, &st) != 0)
        rc = PEP_EIO;
    else if (!S_ISREG(st.st_mode))
        rc = PEP_EDENIED;
    else if ((uint64_t)st.st_size > max_bytes)
        rc = PEP_EINVAL;
    if (rc == 0) {
        /* st_size only sizes the first buffer: the file may grow while it is read, so reading
         * goes on to end of file, and stops at max_bytes + 1 bytes (too large). */
        cap = (size_t)st.st_size + 1;
        cap = cap < 4096 ? 4096 : cap > max_bytes + 1 ? max_bytes + 1 : cap;
        if (!(buf = malloc(cap + 1))) rc = PEP_ENOMEM;
    }
    while (rc == 0) {
        if (len == cap) {
            if (len > max_bytes) {
                rc = PEP_EINVAL;
                break;
            }
            size_t next = cap > max_bytes / 2 ? max_bytes + 1 : cap * 2;
            char *grown = realloc(buf, next + 1);
            if (!grown) {
                rc = PEP_ENOMEM;
                break;
            }
            buf = grown;
            cap = next;
        }
        ssize_t got = read(fd, buf + len, cap - len);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) rc = PEP_EIO;
        if (got <= 0) break;
        len += (size_t)got;
    }
    if (rc == 0 && len > max_bytes) rc = PEP_EINVAL;
    int saved = errno; /* PEP_EIO's reason, which close() must not overwrite */
    close(fd);
    errno = saved;
    if (rc != 0) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len) *out_len = len;
    return 0;
}

int pep_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode) {
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
        return PEP_EINVAL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) return PEP_EIO;
    int rc = 0;
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t n = write(fd, p, left);
        if (n < 0) {
            if (errno == EINTR) continue;
            rc = PEP_EIO;
            break;
        }
        p += n;
        left -= (size_t)n;
    }
    if (rc == 0 && (fchmod(fd, mode) != 0 || fsync(fd) != 0)) rc = PEP_EIO;
    if (close(fd) != 0) rc = PEP_EIO;
    if (rc == 0 && rename(tmp, path) != 0) rc = PEP_EIO;
    if (rc) unlink(tmp);
    return rc;
}

bool pep_listen_address_ok(const char *s) {
    const char *colon = strrchr(s, ':');
    bool ok = colon && colon != s && colon[1] != '\0' && strlen(colon + 1) <= 5 &&
              strspn(colon + 1, "0123456789") == strlen(colon + 1) && atoi(colon + 1) <= 65535;
    if (ok && s[0] == '[')
        ok = colon[-1] == ']';
    else if (ok)
        ok = memchr(s, ':', (size_t)(colon - s)) == NULL;
    for (const char *p = s; ok && p < colon; p++)
        ok = !isspace((unsigned char)*p) && !iscntrl((unsigned char)*p) && *p != '/';
    return ok;
}

bool pep_is_word(const char *s) {
    if (!s || !*s) return false;
    for (; *s; s++)
        if (isspace((unsigned char)*s) || iscntrl((unsigned char)*s)) return false;
    return true;
}

bool pep_has_no_control(const char *s) {
    for (; s && *s; s++)
        if (iscntrl((unsigned char)*s)) return false;
    return true;
}

bool pep_is_scope_token(const char *s) {
    if (!s || !*s) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x21 || *p > 0x7e || *p == 0x22 || *p == 0x5c) return false;
    return true;
}

bool pep_is_id(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > 128) return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("._@-", s[i])) return false;
    return true;
}

size_t pep_utf8_cut(const char *s, size_t len, size_t max) {
    if (len <= max) return len;
    size_t n = max;
    /* Back over continuation bytes (10xxxxxx) to the start of the cut character. */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

bool pep_utf8_valid(const char *s, size_t len) {
    static const uint32_t min_for_len[] = {0, 0, 0x80, 0x800, 0x10000}; /* no overlong form */
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    while (p < end) {
        unsigned c = *p;
        size_t n = c < 0x80             ? 1
                   : (c & 0xE0) == 0xC0 ? 2
                   : (c & 0xF0) == 0xE0 ? 3
                   : (c & 0xF8) == 0xF0 ? 4
                                        : 0;
        if (n == 0 || (size_t)(end - p) < n) return false;
        uint32_t cp = n == 1 ? c : c & (0x7Fu >> n);
        for (size_t i = 1; i < n; i++) {
            if ((p[i] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i] & 0x3Fu);
        }
        if (cp < min_for_len[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        p += n;
    }
    return true;
}
