/*
 * fuzz_canon.c — libFuzzer target for the canonical record writer (audit/canon.c) and the
 * json_text helper (pep/server.h) that turns client bytes into record strings.
 *
 * Input: JSON text (parsed as audit/verify.c parses records: NUL allowed in strings); any
 * input that is not JSON is cut into chunks at 0xff bytes, each chunk becoming a key and
 * a value of a record built directly from the raw bytes (invalid UTF-8 and NUL included),
 * as the string itself, through json_text, as an integer and as a nested object.
 *
 * Properties:
 *   - audit_canonical_json gives text exactly when the record has a canonical form
 *     (audit.h: an object, no real, no U+0000 in a key, no invalid UTF-8, at most
 *     AUDIT_MAX_DEPTH deep), as decided here independently;
 *   - the text parses back (verify.c's flags) to a record json_equal to the input, whose
 *     canonical text is the same bytes (canon.c's invariant, what verify checks);
 *   - the text is canonical as SPEC 6.2 says: members sorted bytewise at every level, no
 *     whitespace outside strings, only '"', '\\' and control characters escaped, \u
 *     escapes with lowercase hex;
 *   - json_text never fails on any bytes and always gives valid UTF-8: the bytes as they
 *     are when they were UTF-8, else every byte ≥ 0x80 written %XX.
 */
#include "tests/fuzz/fuzz.h"

#include "audit/audit.h"
#include "pep/record.h"
#include "pep/util.h"

#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

/* RFC 3629 UTF-8: no overlong form, no surrogate, nothing above U+10FFFF. */
static bool utf8_valid(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i < k + 1) return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return false;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += k + 1;
    }
    return true;
}

/* Whether v (at nesting level `level`, the record being 1) has a canonical form. */
static bool canonical_expected(json_t *v, int level) {
    if (level > AUDIT_MAX_DEPTH) return false;
    if (json_is_real(v)) return false;
    if (json_is_string(v))
        return utf8_valid((const uint8_t *)json_string_value(v), json_string_length(v));
    if (json_is_object(v)) {
        const char *key;
        size_t key_len;
        json_t *member;
        json_object_keylen_foreach(v, key, key_len, member) {
            if (memchr(key, '\0', key_len) || !utf8_valid((const uint8_t *)key, key_len) ||
                !canonical_expected(member, level + 1))
                return false;
        }
    }
    if (json_is_array(v)) {
        size_t i;
        json_t *elem;
        json_array_foreach(v, i, elem) {
            if (!canonical_expected(elem, level + 1)) return false;
        }
    }
    return true;
}

/* Members of every object, in text order (jansson keeps it), strictly increasing bytewise. */
static void check_sorted(json_t *v) {
    if (json_is_object(v)) {
        const char *key, *prev = NULL;
        json_t *member;
        json_object_foreach(v, key, member) {
            FUZZ_CHECK(!prev || strcmp(prev, key) < 0, "member '%s' after '%s'", key, prev);
            prev = key;
            check_sorted(member);
        }
    } else if (json_is_array(v)) {
        size_t i;
        json_t *elem;
        json_array_foreach(v, i, elem) {
            check_sorted(elem);
        }
    }
}

/* The text's lexical rules: whitespace, escapes. */
static void check_text(const char *t) {
    bool in_string = false;
    for (const char *p = t; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (!in_string) {
            FUZZ_CHECK(c != ' ' && c != '\t' && c != '\n' && c != '\r', "whitespace at %zu",
                       (size_t)(p - t));
            in_string = c == '"';
            continue;
        }
        FUZZ_CHECK(c >= 0x20, "raw control byte 0x%02x in a string", c);
        if (c == '"') {
            in_string = false;
        } else if (c == '\\') {
            char e = *++p;
            FUZZ_CHECK(strchr("\"\\bfnrtu", e) && e, "escape \\%c", e);
            if (e == 'u') {
                FUZZ_CHECK(p[1] == '0' && p[2] == '0' && (p[3] == '0' || p[3] == '1') && p[4] &&
                               strchr("0123456789abcdef", p[4]),
                           "\\u escape of a non-control character or uppercase: %.6s", p - 1);
                unsigned v =
                    (unsigned)((p[3] - '0') * 16 + (p[4] <= '9' ? p[4] - '0' : p[4] - 'a' + 10));
                FUZZ_CHECK(v != '\b' && v != '\f' && v != '\n' && v != '\r' && v != '\t',
                           "\\u escape where a short one exists: %.6s", p - 1);
                p += 4;
            }
        }
    }
    FUZZ_CHECK(!in_string, "unterminated string");
}

static void check_record(json_t *rec) {
    bool expected = json_is_object(rec) && canonical_expected(rec, 1);
    char *text = audit_canonical_json(rec);
    FUZZ_CHECK((text != NULL) == expected, "canonical text %s, expected %s",
               text ? "given" : "refused", expected ? "one" : "none");
    if (!text) return;
    json_error_t jerr;
    json_t *back = json_loads(text, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    FUZZ_CHECK(back != NULL, "canonical text does not parse back: %s: %s", jerr.text, text);
    FUZZ_CHECK(json_equal(back, rec), "parsed back differs: %s", text);
    char *again = audit_canonical_json(back);
    FUZZ_CHECK(again && strcmp(again, text) == 0, "not stable: %s then %s", text,
               again ? again : "NULL");
    check_sorted(back);
    check_text(text);
    free(again);
    json_decref(back);
    free(text);
}

static void check_json_text(const uint8_t *s, size_t n) {
    json_t *v = json_text((const char *)s, n);
    FUZZ_CHECK(v != NULL, "json_text refused %zu bytes", n);
    const uint8_t *out = (const uint8_t *)json_string_value(v);
    size_t len = json_string_length(v);
    FUZZ_CHECK(utf8_valid(out, len), "json_text gave invalid UTF-8");
    FUZZ_CHECK(pep_utf8_valid((const char *)s, n) == utf8_valid(s, n),
               "pep_utf8_valid disagrees with RFC 3629 on %zu bytes", n);
    if (utf8_valid(s, n)) {
        FUZZ_CHECK(len == n && memcmp(out, s, n) == 0, "json_text changed valid UTF-8");
    } else {
        size_t high = 0;
        for (size_t i = 0; i < n; i++)
            high += s[i] >= 0x80;
        FUZZ_CHECK(len == n + 2 * high, "json_text: %zu bytes for %zu (%zu high)", len, n, high);
        for (size_t i = 0; i < len; i++)
            FUZZ_CHECK(out[i] < 0x80, "json_text kept byte 0x%02x", out[i]);
    }
    json_decref(v);
}

/* A record from raw chunks (separated by 0xff); see the top of the file. */
static json_t *record_from_chunks(const uint8_t *data, size_t size) {
    json_t *rec = json_object(), *inner = json_object();
    if (!rec || !inner) abort();
    size_t start = 0, i = 0;
    for (size_t end = 0; end <= size && i < 256; end++) {
        if (end < size && data[end] != 0xff) continue;
        const char *chunk = (const char *)data + start;
        size_t n = end - start;
        check_json_text(data + start, n);
        char key[64];
        snprintf(key, sizeof key, "%zu", i);
        json_t *value;
        switch (i++ % 4) {
        case 0:
            value = json_stringn_nocheck(chunk, n);
            break;
        case 1:
            value = json_text(chunk, n);
            break;
        case 2:
            value = json_integer((json_int_t)n * (n && (chunk[0] & 1) ? -1 : 1));
            break;
        default:
            value = json_deep_copy(inner);
            break;
        }
        /* The chunk as a key of its own (raw bytes), and under a numbered key. */
        json_object_setn_new_nocheck(inner, chunk, n, json_integer((json_int_t)i));
        json_object_set_new(rec, key, value);
        start = end + 1;
    }
    json_object_set_new(rec, "keys", inner);
    return rec;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 65536) return 0;
    json_t *rec = json_loadb((const char *)data, size, JSON_ALLOW_NUL, NULL);
    if (!rec) rec = record_from_chunks(data, size);
    check_record(rec);
    json_decref(rec);
    return 0;
}
