/*
 * canon.c — the canonical text of an audit record and the hash that links it to the chain.
 *
 * The hash covers the exact bytes stored in `record`, so the text must be a pure function
 * of the record's value: a verifier that re-dumps the parsed record must get the same
 * bytes (SPEC 6.2).  jansson's json_dumps(JSON_SORT_KEYS | JSON_COMPACT) gives that:
 * members sorted by memcmp of their UTF-8 keys at every level, "," and ":" separators
 * with no whitespace, strings escaped only where JSON requires it ('"', '\\', control
 * characters), non-ASCII UTF-8 and '/' written as is.  What it does not make canonical
 * is a real number ("0.1" dumps as "0.10000000000000001", "10" as "10.0", and other
 * languages print them differently), so records must hold integers only and a record
 * with a real has no canonical form; nor has one with U+0000 in a key (jansson writes it
 * but refuses to read it back, so it could never verify).  Nesting is capped so that checking a
 * record cannot recurse without bound.
 *
 * Invariant: for every record r accepted here, audit_canonical_json(parse(
 * audit_canonical_json(r))) is byte-identical to audit_canonical_json(r).
 *
 * Threads: every function is pure and may be called from any thread.
 */
#include "audit/audit.h"
#include "pep/util.h"

#include <ctype.h>
#include <string.h>

/* True when v and everything under it can be dumped canonically (no reals, depth ok). */
static bool canon_value_ok(json_t *v, int depth) {
    if (depth > AUDIT_MAX_DEPTH) return false;
    switch (json_typeof(v)) {
    case JSON_REAL:
        return false;
    case JSON_OBJECT: {
        const char *key;
        size_t key_len;
        json_t *member;
        json_object_keylen_foreach(v, key, key_len, member) {
            /* A key with U+0000 dumps as "\u0000" but jansson cannot read it back; one that
             * is not UTF-8 (only json_object_*_nocheck makes one) jansson drops from the
             * text without failing. */
            if (strlen(key) != key_len || !pep_utf8_valid(key, key_len) ||
                !canon_value_ok(member, depth + 1))
                return false;
        }
        return true;
    }
    case JSON_ARRAY: {
        size_t i;
        json_t *elem;
        json_array_foreach(v, i, elem) {
            if (!canon_value_ok(elem, depth + 1)) return false;
        }
        return true;
    }
    default:
        return true;
    }
}

/* jansson writes the \u escapes of control characters with uppercase hex digits; JSON
 * canonicalization (RFC 8785 3.2.2.2) and most encoders (Python, Go, JavaScript) write
 * lowercase, so a verifier in another language that re-serializes a record gets these
 * bytes.  Outside strings canonical JSON has no backslash, so a linear scan suffices. */
static void canon_lowercase_escapes(char *text) {
    for (char *p = text; *p; p++) {
        if (*p != '\\') continue;
        if (!*++p) break; /* the escaped character, never the start of another escape */
        if (*p == 'u')
            for (int i = 1; i <= 4 && p[i]; i++)
                p[i] = (char)tolower((unsigned char)p[i]);
    }
}

char *audit_canonical_json(const json_t *record) {
    /* jansson's iteration API takes non-const pointers but only reads here. */
    json_t *r = (json_t *)record;
    if (!r || !json_is_object(r) || !canon_value_ok(r, 1)) return NULL;
    /* json_dumps fails (NULL) on invalid UTF-8 in a string made with *_nocheck. */
    char *text = json_dumps(r, JSON_SORT_KEYS | JSON_COMPACT);
    if (text) canon_lowercase_escapes(text);
    return text;
}

int audit_chain_hash(const uint8_t prev_hash[32], const char *record, size_t len, uint8_t out[32]) {
    return pep_sha256_parts(prev_hash, 32, record, len, out);
}
