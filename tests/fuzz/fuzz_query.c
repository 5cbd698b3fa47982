/*
 * fuzz_query.c — libFuzzer target for the audit query's filters, SQL and encoders
 * (audit/query.c).  The input is a query string ("key=value&key=value…", raw bytes, no
 * %-decoding: libmicrohttpd has done that before audit_filter_set sees a value), then
 * optionally "\n" and bytes for the encoders (any bytes, NUL included).
 *
 * Properties, for any bytes:
 *   - audit_filter_set, for the query and for the export, either accepts a parameter or
 *     refuses it with a reason that names it (`'key'`, or "unknown parameter");
 *   - an accepted string filter is kept byte for byte;
 *   - SECURITY: the SQL of an accepted filter is made of this module's fixed fragments only:
 *     no quote, no byte outside the fragments' alphabet, its parameters numbered ?1 … ?N in
 *     order, and every value a bound argument pointing at the filter's own copy;
 *   - since/until, once accepted, are in the ts column's fixed-width form, and since sorts
 *     before until when the final check passes;
 *   - the encoders: a CSV field reads back (RFC 4180) to the exact bytes, and the JSON
 *     string of valid UTF-8 without NUL parses back (jansson) to the exact bytes.
 */
#include "tests/fuzz/fuzz.h"

#include "audit/query.h"
#include "pep/util.h"

#include <jansson.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

/* The bytes the fixed fragments of audit_sql_build are written with. */
static bool sql_alphabet(const char *text) {
    return strspn(text, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ,?<=>+") ==
           strlen(text);
}

/* The parameters of text are ?1, ?2 … in order, each once, and there are n of them. */
static bool sql_params_in_order(const char *text, size_t n) {
    size_t next = 1;
    for (const char *p = strchr(text, '?'); p; p = strchr(p + 1, '?')) {
        if (strtoul(p + 1, NULL, 10) != next) return false;
        next++;
    }
    return next == n + 1;
}

static void check_filters(const char *qs, enum audit_filter_mode mode) {
    struct audit_filter f = {0};
    char *copy = strdup(qs);
    FUZZ_CHECK(copy, "out of memory");
    bool all_ok = true;
    for (char *save = NULL, *pair = strtok_r(copy, "&", &save); pair;
         pair = strtok_r(NULL, "&", &save)) {
        char *eq = strchr(pair, '=');
        const char *value = eq ? eq + 1 : NULL;
        if (eq) *eq = '\0';
        char why[300] = "";
        int rc = audit_filter_set(&f, mode, pair, value, why, sizeof why);
        if (rc == PEP_ENOMEM) abort();
        if (rc != 0) {
            char quoted[64];
            snprintf(quoted, sizeof quoted, "'%.40s", pair);
            FUZZ_CHECK(strstr(why, quoted) || strstr(why, "unknown parameter"),
                       "refusal of '%s' does not name it: %s", pair, why);
            all_ok = false;
            break;
        }
        for (int k = 0; k < AUDIT_F_COUNT; k++)
            if (strcmp(audit_filter_param_name((enum audit_filter_param)k), pair) == 0)
                FUZZ_CHECK(f.eq[k] && strcmp(f.eq[k], value ? value : "") == 0,
                           "filter %s not kept as given", pair);
    }
    char why[300];
    if (all_ok && audit_filter_check(&f, mode, why, sizeof why) == 0) {
        if (f.since[0]) FUZZ_CHECK(strlen(f.since) == 27, "since %s", f.since);
        if (f.until[0]) FUZZ_CHECK(strlen(f.until) == 27, "until %s", f.until);
        if (f.since[0] && f.until[0])
            FUZZ_CHECK(strcmp(f.since, f.until) < 0, "%s !< %s", f.since, f.until);
        for (int cols = 0; cols < 2; cols++) {
            struct audit_sql q;
            audit_sql_build(&f, (enum audit_sql_columns)cols, &q);
            FUZZ_CHECK(sql_alphabet(q.text), "SQL holds a foreign byte: %s", q.text);
            FUZZ_CHECK(sql_params_in_order(q.text, q.nargs + 3), "parameters: %s", q.text);
            size_t n = 0;
            for (int k = 0; k < AUDIT_F_COUNT; k++)
                if (f.eq[k])
                    FUZZ_CHECK(q.args[n++] == f.eq[k], "argument %zu is not the filter", n);
            if (f.since[0]) FUZZ_CHECK(q.args[n++] == f.since, "since not bound");
            if (f.until[0]) FUZZ_CHECK(q.args[n++] == f.until, "until not bound");
            FUZZ_CHECK(n == q.nargs, "%zu arguments, %zu bound", n, q.nargs);
        }
    }
    audit_filter_clear(&f);
    free(copy);
}

static void check_encoders(const char *s, size_t len) {
    struct audit_buf b = {0};
    audit_buf_csv_field(&b, s, len);
    FUZZ_CHECK(!b.failed, "out of memory");
    /* Read the field back. */
    struct audit_buf back = {0};
    audit_buf_add(&back, "", 0);
    const char *p = b.data ? b.data : "";
    if (*p == '"') {
        for (p++;; p++) {
            FUZZ_CHECK(p < b.data + b.len, "quoted field not closed");
            if (*p == '"' && p[1] == '"') {
                audit_buf_add(&back, "\"", 1);
                p++;
            } else if (*p == '"') {
                FUZZ_CHECK(p + 1 == b.data + b.len, "bytes after the closing quote");
                break;
            } else {
                audit_buf_add(&back, p, 1);
            }
        }
    } else {
        for (size_t i = 0; i < b.len; i++)
            FUZZ_CHECK(p[i] != ',' && p[i] != '"' && p[i] != '\r' && p[i] != '\n',
                       "an unquoted field holds a special byte");
        audit_buf_add(&back, p, b.len);
    }
    FUZZ_CHECK(back.len == len && memcmp(back.data, s, len) == 0, "CSV field does not read back");
    audit_buf_free(&back);
    audit_buf_free(&b);

    if (!pep_utf8_valid(s, len) || memchr(s, '\0', len)) return;
    audit_buf_json_string(&b, s, len);
    json_error_t e;
    json_t *v = json_loadb(b.data, b.len, JSON_DECODE_ANY, &e);
    FUZZ_CHECK(json_is_string(v), "JSON string does not parse: %s", e.text);
    FUZZ_CHECK(json_string_length(v) == len && memcmp(json_string_value(v), s, len) == 0,
               "JSON string does not read back");
    json_decref(v);
    audit_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nl = memchr(data, '\n', size);
    size_t qs_len = nl ? (size_t)(nl - data) : size;
    char *qs = fuzz_strndup(data, qs_len); /* a NUL ends it: values are C strings */
    check_filters(qs, AUDIT_FILTER_QUERY);
    check_filters(qs, AUDIT_FILTER_EXPORT);
    if (nl) check_encoders((const char *)nl + 1, size - qs_len - 1);
    free(qs);
    return 0;
}
