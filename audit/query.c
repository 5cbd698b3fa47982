/*
 * query.c — the pure half of audit queries: filters parsed from query parameters, the SQL
 * built for them, and the encoders of the answers (see query.h).
 *
 * SECURITY: the SQL text is assembled only from the fixed fragments of this file; every
 * value a client sends is a bound parameter (audit_sql_bind), so no filter value can change
 * what the statement does.  Values are checked before they are bound (no control
 * character, bounded length): a filter is also echoed in error messages.
 *
 * Threads: any; nothing here holds state.
 */
#include "audit/query.h"
#include "pep/util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const param_names[AUDIT_P_COUNT] = {
    [AUDIT_P_AGENT] = "agent",           [AUDIT_P_TENANT] = "tenant", [AUDIT_P_ACTION] = "action",
    [AUDIT_P_DECISION] = "decision",     [AUDIT_P_CODE] = "code",     [AUDIT_P_KIND] = "kind",
    [AUDIT_P_REQUEST_ID] = "request_id", [AUDIT_P_SINCE] = "since",   [AUDIT_P_UNTIL] = "until",
    [AUDIT_P_AFTER_SEQ] = "after_seq",   [AUDIT_P_LIMIT] = "limit",   [AUDIT_P_FORMAT] = "format",
};

const char *audit_filter_param_name(enum audit_filter_param p) {
    return p < AUDIT_P_COUNT ? param_names[p] : "?";
}

/* The string parameters are the string filters, in the same order. */
_Static_assert((int)AUDIT_P_AGENT == (int)AUDIT_F_AGENT &&
                   (int)AUDIT_P_REQUEST_ID == (int)AUDIT_F_REQUEST_ID &&
                   (int)AUDIT_F_COUNT == (int)AUDIT_P_SINCE,
               "string parameters and filters must line up");

/* Fills why and returns PEP_EINVAL. */
static int filter_refuse(char *why, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int filter_refuse(char *why, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
    return PEP_EINVAL;
}

static bool is_one_of(const char *v, const char *const *set, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(v, set[i]) == 0) return true;
    return false;
}

/* A whole non-negative decimal integer of at most 18 digits (no sign, no space). */
static bool parse_count(const char *v, int64_t *out) {
    size_t n = strlen(v);
    if (n == 0 || n > 18 || strspn(v, "0123456789") != n) return false;
    int64_t x = 0;
    for (size_t i = 0; i < n; i++)
        x = x * 10 + (v[i] - '0');
    *out = x;
    return true;
}

int audit_filter_set(struct audit_filter *f, enum audit_filter_mode mode, const char *key,
                     const char *value, char *why, size_t why_cap) {
    int p = 0;
    while (p < AUDIT_P_COUNT && strcmp(param_names[p], key) != 0)
        p++;
    /* The parameters of one mode only: an export has no limit, a query no format. */
    if (p == AUDIT_P_COUNT || (p == AUDIT_P_LIMIT && mode != AUDIT_FILTER_QUERY) ||
        (p == AUDIT_P_FORMAT && mode != AUDIT_FILTER_EXPORT))
        return filter_refuse(why, why_cap,
                             "unknown parameter '%.40s' (filters: agent, tenant, action, "
                             "decision, code, kind, request_id, since, until, after_seq%s)",
                             key, mode == AUDIT_FILTER_QUERY ? ", limit" : ", format");
    if (f->given & (1u << p)) return filter_refuse(why, why_cap, "'%s' is given twice", key);
    f->given |= 1u << p;
    if (!value) value = "";
    size_t len = strlen(value);

    switch (p) {
    case AUDIT_P_SINCE:
    case AUDIT_P_UNTIL: {
        int64_t us;
        char *ts = p == AUDIT_P_SINCE ? f->since : f->until;
        /* The ts column's own form (UTC, microseconds, fixed width): compared as text, so
         * a time whose UTC year has other than four digits (an offset past 9999 or before
         * 0000) cannot be compared and is refused too. */
        /* A '+' of an offset left unescaped in a URL arrives as a space (form encoding):
         * "…T10:00:00 01:00" is read as "…T10:00:00+01:00". */
        char fixed[72];
        snprintf(fixed, sizeof fixed, "%s", value);
        if (len >= 7 && len <= 64 && fixed[len - 6] == ' ' && fixed[len - 3] == ':' &&
            strspn(fixed + len - 5, "0123456789") == 2 &&
            strspn(fixed + len - 2, "0123456789") == 2)
            fixed[len - 6] = '+';
        if (len <= 64 && pep_parse_rfc3339(fixed, &us) == 0) {
            pep_format_rfc3339_us(us, ts);
            if (strlen(ts) == 27 && ts[0] >= '0' && ts[0] <= '9') return 0;
        }
        ts[0] = '\0';
        return filter_refuse(why, why_cap,
                             "'%s' must be an RFC 3339 time such as 2026-01-31T00:00:00Z, not "
                             "'%.64s'",
                             key, value);
    }
    case AUDIT_P_AFTER_SEQ:
        if (!parse_count(value, &f->after_seq))
            return filter_refuse(why, why_cap,
                                 "'after_seq' must be a non-negative integer, not '%.40s'", value);
        return 0;
    case AUDIT_P_LIMIT: {
        int64_t n = 0;
        if (!parse_count(value, &n) || n < 1 || n > AUDIT_QUERY_LIMIT_MAX)
            return filter_refuse(why, why_cap,
                                 "'limit' must be an integer from 1 to 1000, not "
                                 "'%.40s'",
                                 value);
        f->limit = (int)n;
        return 0;
    }
    case AUDIT_P_FORMAT:
        if (strcmp(value, "ndjson") == 0)
            f->format = AUDIT_EXPORT_NDJSON;
        else if (strcmp(value, "csv") == 0)
            f->format = AUDIT_EXPORT_CSV;
        else
            return filter_refuse(why, why_cap, "'format' must be ndjson or csv, not '%.40s'",
                                 value);
        return 0;
    default:
        break;
    }

    /* A string filter: the copy column of the same name equals the value. */
    static const char *const decisions[] = {"allow", "deny"};
    static const char *const kinds[] = {"decision", "outcome", "admin", "system"};
    if (len == 0) return filter_refuse(why, why_cap, "'%s' must not be empty", key);
    if (len > AUDIT_FILTER_VALUE_MAX)
        return filter_refuse(why, why_cap, "'%s' is longer than 1024 bytes", key);
    if (!pep_has_no_control(value) || !pep_utf8_valid(value, len))
        return filter_refuse(why, why_cap, "'%s' must be UTF-8 text without control characters",
                             key);
    if (p == AUDIT_P_DECISION && !is_one_of(value, decisions, PEP_ARRAY_LEN(decisions)))
        return filter_refuse(why, why_cap, "'decision' must be allow or deny, not '%.40s'", value);
    if (p == AUDIT_P_KIND && !is_one_of(value, kinds, PEP_ARRAY_LEN(kinds)))
        return filter_refuse(
            why, why_cap, "'kind' must be decision, outcome, admin or system, not '%.40s'", value);
    if (p == AUDIT_P_CODE &&
        (len > 64 || strspn(value, "abcdefghijklmnopqrstuvwxyz0123456789_") != len))
        return filter_refuse(why, why_cap,
                             "'code' must be a code such as ok or denied_by_rule ([a-z0-9_]), "
                             "not '%.40s'",
                             value);
    /* The string parameters come first in both enums, in the same order. */
    char *copy = strdup(value);
    if (!copy) {
        snprintf(why, why_cap, "out of memory");
        return PEP_ENOMEM;
    }
    free(f->eq[p]);
    f->eq[p] = copy;
    return 0;
}

int audit_filter_check(struct audit_filter *f, enum audit_filter_mode mode, char *why,
                       size_t why_cap) {
    if (mode == AUDIT_FILTER_EXPORT && f->format == AUDIT_EXPORT_NONE)
        return filter_refuse(why, why_cap, "'format' is required: ndjson or csv");
    if (f->since[0] && f->until[0] && strcmp(f->since, f->until) >= 0)
        return filter_refuse(why, why_cap, "'since' (%s) must be before 'until' (%s)", f->since,
                             f->until);
    if (mode == AUDIT_FILTER_QUERY && f->limit == 0) f->limit = AUDIT_QUERY_LIMIT_DEFAULT;
    return 0;
}

void audit_filter_clear(struct audit_filter *f) {
    for (size_t i = 0; i < AUDIT_F_COUNT; i++)
        free(f->eq[i]);
    memset(f, 0, sizeof *f);
}

/* ---- SQL --------------------------------------------------------------------------------- */

/* Appends a fixed fragment; the buffer is sized for the longest statement (asserted). */
static void sql_add(struct audit_sql *q, size_t *at, const char *fragment) {
    size_t n = strlen(fragment);
    if (PEP_NEVER(*at + n >= sizeof q->text)) return;
    memcpy(q->text + *at, fragment, n + 1);
    *at += n;
}

/* Appends a fragment ending in a parameter: "<fragment>?<number>", its value in args. */
static void sql_add_param(struct audit_sql *q, size_t *at, const char *fragment,
                          const char *value) {
    char num[24];
    sql_add(q, at, fragment);
    snprintf(num, sizeof num, "?%zu", q->nargs + 3);
    sql_add(q, at, num);
    q->args[q->nargs++] = value;
}

void audit_sql_build(const struct audit_filter *f, enum audit_sql_columns cols,
                     struct audit_sql *out) {
    size_t at = 0;
    memset(out, 0, sizeof *out);
    sql_add(out, &at,
            cols == AUDIT_SQL_EXPORT ? "SELECT seq, record, prev_hash, hash, ts, kind, agent, "
                                       "tenant, action, decision, code, request_id FROM audit"
                                     : "SELECT seq, record FROM audit");
    sql_add(out, &at, " WHERE seq > ?1 AND seq <= ?2");
    static const char *const eq_fragments[AUDIT_F_COUNT] = {
        [AUDIT_F_AGENT] = " AND agent = ",
        [AUDIT_F_TENANT] = " AND tenant = ",
        [AUDIT_F_ACTION] = " AND action = ",
        [AUDIT_F_DECISION] = " AND decision = ",
        [AUDIT_F_CODE] = " AND code = ",
        [AUDIT_F_KIND] = " AND kind = ",
        [AUDIT_F_REQUEST_ID] = " AND request_id = ",
    };
    for (size_t i = 0; i < AUDIT_F_COUNT; i++)
        if (f->eq[i]) sql_add_param(out, &at, eq_fragments[i], f->eq[i]);
    /* `+ts`: never through the ts index here (query.h). */
    if (f->since[0]) sql_add_param(out, &at, " AND +ts >= ", f->since);
    if (f->until[0]) sql_add_param(out, &at, " AND +ts < ", f->until);
    char limit[40];
    out->limit_slot = (int)out->nargs + 3;
    snprintf(limit, sizeof limit, " ORDER BY seq LIMIT ?%d", out->limit_slot);
    sql_add(out, &at, limit);
}

int audit_sql_bind(sqlite3_stmt *st, const struct audit_sql *q, int64_t after, int64_t last,
                   int64_t limit) {
    int rc = sqlite3_bind_int64(st, 1, after);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 2, last);
    for (size_t i = 0; rc == SQLITE_OK && i < q->nargs; i++)
        rc = sqlite3_bind_text(st, (int)i + 3, q->args[i], -1, SQLITE_STATIC);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, q->limit_slot, limit);
    return rc;
}

/* ---- encoders ---------------------------------------------------------------------------- */

void audit_buf_add(struct audit_buf *b, const char *s, size_t len) {
    if (b->failed) return;
    if (len >= b->cap - b->len || !b->data) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap - b->len <= len)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            b->failed = true;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void audit_buf_str(struct audit_buf *b, const char *s) {
    audit_buf_add(b, s, strlen(s));
}

void audit_buf_free(struct audit_buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

void audit_buf_json_string(struct audit_buf *b, const char *s, size_t len) {
    static const char hexdig[] = "0123456789ABCDEF";
    audit_buf_add(b, "\"", 1);
    size_t run = 0; /* bytes copied as they are, pending */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            run++;
            continue;
        }
        audit_buf_add(b, s + i - run, run);
        run = 0;
        char esc[7] = {'\\', (char)c, 0};
        size_t n = 2;
        switch (c) {
        case '"':
        case '\\':
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        default:
            memcpy(esc, "\\u00", 4);
            esc[4] = hexdig[c >> 4];
            esc[5] = hexdig[c & 15];
            n = 6;
        }
        audit_buf_add(b, esc, n);
    }
    audit_buf_add(b, s + len - run, run);
    audit_buf_add(b, "\"", 1);
}

void audit_buf_csv_field(struct audit_buf *b, const char *s, size_t len) {
    if (!s) return; /* SQL NULL: an empty field */
    bool plain = true;
    for (size_t i = 0; i < len && plain; i++)
        plain = s[i] != ',' && s[i] != '"' && s[i] != '\r' && s[i] != '\n';
    if (plain) {
        audit_buf_add(b, s, len);
        return;
    }
    audit_buf_add(b, "\"", 1);
    for (const char *p = s, *end = s + len; p < end;) {
        const char *q = memchr(p, '"', (size_t)(end - p));
        if (!q) {
            audit_buf_add(b, p, (size_t)(end - p));
            break;
        }
        audit_buf_add(b, p, (size_t)(q - p) + 1);
        audit_buf_add(b, "\"", 1); /* the quote doubled */
        p = q + 1;
    }
    audit_buf_add(b, "\"", 1);
}

static void buf_hex(struct audit_buf *b, const uint8_t *h) {
    char hex[65];
    if (h)
        pep_hex(h, 32, hex);
    else
        hex[0] = '\0';
    audit_buf_str(b, hex);
}

void audit_buf_ndjson_row(struct audit_buf *b, const struct audit_row *row) {
    char seq[40];
    snprintf(seq, sizeof seq, "{\"seq\":%lld,\"record\":", (long long)row->seq);
    audit_buf_str(b, seq);
    audit_buf_json_string(b, row->record, row->record_len);
    audit_buf_str(b, ",\"prev_hash\":\"");
    buf_hex(b, row->prev_hash);
    audit_buf_str(b, "\",\"hash\":\"");
    buf_hex(b, row->hash);
    audit_buf_str(b, "\"}\n");
}

void audit_buf_csv_row(struct audit_buf *b, const struct audit_row *row) {
    char seq[24];
    snprintf(seq, sizeof seq, "%lld", (long long)row->seq);
    audit_buf_str(b, seq);
    for (size_t i = 0; i < 8; i++) {
        audit_buf_add(b, ",", 1);
        const char *c = row->copies[i];
        audit_buf_csv_field(b, c, c ? strlen(c) : 0);
    }
    audit_buf_add(b, ",", 1);
    audit_buf_csv_field(b, row->record, row->record_len);
    audit_buf_add(b, ",", 1);
    buf_hex(b, row->prev_hash);
    audit_buf_add(b, ",", 1);
    buf_hex(b, row->hash);
    audit_buf_add(b, "\r\n", 2);
}
