/*
 * test_query.c — audit/query.h: the filters of SPEC 6.3 parsed one parameter at a time
 * (every filter, and the 400 reasons: limit 0/1001/abc, since not RFC 3339, an unknown
 * parameter, a decision or kind outside its set …), the SQL built for a filter (its exact
 * text, and values only ever bound), the encoders (CSV quoting of RFC 4180, NDJSON lines
 * whose record reads back byte for byte), and the cursor on a real store of 10 000
 * generated records: every filter returns exactly the generated records it should,
 * pagination covers every record once, a spent time budget answers a cursor that goes
 * on, reads use an index, never sort, and a time range narrows the seqs read — exactly,
 * even when the clock did not follow the seqs — and the trace follows approvals and
 * escalations.
 *
 * The store is written once per group (audit_open, audit_submit, audit_close) in a mkdtemp
 * directory, then read through audit_open_reader as pep's admin API reads it.
 */
#include "audit/audit.h"
#include "audit/query.h"
#include "pep/approvals.h"
#include "pep/util.h"

#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

/* ---- filter parsing ------------------------------------------------------------------------ */

struct param_case {
    enum audit_filter_mode mode;
    const char *key;
    const char *value;
    int rc;
    const char *why; /* a substring of the reason, for refusals */
};

static void test_filter_parse_table(void **state) {
    (void)state;
    static const struct param_case cases[] = {
        {AUDIT_FILTER_QUERY, "agent", "bot", 0, NULL},
        {AUDIT_FILTER_QUERY, "tenant", "acme", 0, NULL},
        {AUDIT_FILTER_QUERY, "action", "llm.chat", 0, NULL},
        {AUDIT_FILTER_QUERY, "decision", "allow", 0, NULL},
        {AUDIT_FILTER_QUERY, "decision", "deny", 0, NULL},
        {AUDIT_FILTER_QUERY, "code", "denied_by_rule", 0, NULL},
        {AUDIT_FILTER_QUERY, "kind", "decision", 0, NULL},
        {AUDIT_FILTER_QUERY, "kind", "outcome", 0, NULL},
        {AUDIT_FILTER_QUERY, "kind", "admin", 0, NULL},
        {AUDIT_FILTER_QUERY, "kind", "system", 0, NULL},
        {AUDIT_FILTER_QUERY, "request_id", "01J0000000000000000000000", 0, NULL},
        {AUDIT_FILTER_QUERY, "since", "2026-01-31T00:00:00Z", 0, NULL},
        {AUDIT_FILTER_QUERY, "until", "2026-01-31T10:00:00.5+02:00", 0, NULL},
        {AUDIT_FILTER_QUERY, "after_seq", "0", 0, NULL},
        {AUDIT_FILTER_QUERY, "after_seq", "123456789", 0, NULL},
        {AUDIT_FILTER_QUERY, "limit", "1", 0, NULL},
        {AUDIT_FILTER_QUERY, "limit", "1000", 0, NULL},
        {AUDIT_FILTER_EXPORT, "format", "ndjson", 0, NULL},
        {AUDIT_FILTER_EXPORT, "format", "csv", 0, NULL},
        {AUDIT_FILTER_EXPORT, "agent", "bot", 0, NULL},
        /* refusals, each naming its filter */
        {AUDIT_FILTER_QUERY, "limit", "0", PEP_EINVAL, "'limit' must be an integer from 1 to 1000"},
        {AUDIT_FILTER_QUERY, "limit", "1001", PEP_EINVAL, "'limit'"},
        {AUDIT_FILTER_QUERY, "limit", "abc", PEP_EINVAL, "not 'abc'"},
        {AUDIT_FILTER_QUERY, "limit", "-1", PEP_EINVAL, "'limit'"},
        {AUDIT_FILTER_QUERY, "limit", "", PEP_EINVAL, "'limit'"},
        {AUDIT_FILTER_QUERY, "limit", "10 ", PEP_EINVAL, "'limit'"},
        {AUDIT_FILTER_QUERY, "since", "yesterday", PEP_EINVAL, "'since' must be an RFC 3339"},
        {AUDIT_FILTER_QUERY, "since", "2026-01-31", PEP_EINVAL, "'since'"},
        {AUDIT_FILTER_QUERY, "until", "2026-01-31T00:00:00", PEP_EINVAL, "'until'"},
        {AUDIT_FILTER_QUERY, "until", "9999-12-31T23:00:00-05:00", PEP_EINVAL, "'until'"},
        {AUDIT_FILTER_QUERY, "after_seq", "-5", PEP_EINVAL, "'after_seq'"},
        {AUDIT_FILTER_QUERY, "after_seq", "1e3", PEP_EINVAL, "'after_seq'"},
        {AUDIT_FILTER_QUERY, "decision", "maybe", PEP_EINVAL, "'decision' must be allow or deny"},
        {AUDIT_FILTER_QUERY, "kind", "everything", PEP_EINVAL,
         "'kind' must be decision, outcome, admin or system"},
        {AUDIT_FILTER_QUERY, "code", "Denied", PEP_EINVAL, "'code'"},
        {AUDIT_FILTER_QUERY, "code", "x' OR '1'='1", PEP_EINVAL, "'code'"},
        {AUDIT_FILTER_QUERY, "agent", "", PEP_EINVAL, "'agent' must not be empty"},
        {AUDIT_FILTER_QUERY, "agent", "a\nb", PEP_EINVAL, "'agent' must be UTF-8 text"},
        {AUDIT_FILTER_QUERY, "tenant", "\xff", PEP_EINVAL, "'tenant' must be UTF-8 text"},
        {AUDIT_FILTER_QUERY, "bogus", "1", PEP_EINVAL, "unknown parameter 'bogus'"},
        {AUDIT_FILTER_QUERY, "format", "csv", PEP_EINVAL, "unknown parameter 'format'"},
        {AUDIT_FILTER_EXPORT, "limit", "10", PEP_EINVAL, "unknown parameter 'limit'"},
        {AUDIT_FILTER_EXPORT, "format", "xml", PEP_EINVAL, "'format' must be ndjson or csv"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct param_case *c = &cases[i];
        struct audit_filter f = {0};
        char why[300] = "";
        int rc = audit_filter_set(&f, c->mode, c->key, c->value, why, sizeof why);
        if (rc != c->rc || (c->why && !strstr(why, c->why)))
            fail_msg("case %zu: %s=%s: rc %d (want %d), why '%s'", i, c->key, c->value, rc, c->rc,
                     why);
        audit_filter_clear(&f);
    }
    /* An over-long value. */
    char *big = malloc(AUDIT_FILTER_VALUE_MAX + 2);
    assert_non_null(big);
    memset(big, 'a', AUDIT_FILTER_VALUE_MAX + 1);
    big[AUDIT_FILTER_VALUE_MAX + 1] = '\0';
    struct audit_filter f = {0};
    char why[300];
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "action", big, why, sizeof why),
                     PEP_EINVAL);
    assert_non_null(strstr(why, "'action' is longer than 1024 bytes"));
    free(big);
    audit_filter_clear(&f);
}

static void test_filter_values(void **state) {
    (void)state;
    struct audit_filter f = {0};
    char why[300];
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "agent", "bot", why, sizeof why), 0);
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "request_id", "r1", why, sizeof why),
                     0);
    /* Times become the ts column's form: UTC, microseconds. */
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "since", "2026-01-31T01:30:00+01:30",
                                      why, sizeof why),
                     0);
    assert_string_equal(f.since, "2026-01-31T00:00:00.000000Z");
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "until", "2026-01-31T10:00:00.25Z",
                                      why, sizeof why),
                     0);
    assert_string_equal(f.until, "2026-01-31T10:00:00.250000Z");
    audit_filter_clear(&f);
    /* An offset's '+' left unescaped in a URL arrives as a space. */
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "since", "2026-01-31T10:00:00 01:00",
                                      why, sizeof why),
                     0);
    assert_string_equal(f.since, "2026-01-31T09:00:00.000000Z");
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "agent", "bot", why, sizeof why), 0);
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "request_id", "r1", why, sizeof why),
                     0);
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "until", "2026-01-31T10:00:00.25Z",
                                      why, sizeof why),
                     0);
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "after_seq", "42", why, sizeof why),
                     0);
    assert_string_equal(f.eq[AUDIT_F_AGENT], "bot");
    assert_string_equal(f.eq[AUDIT_F_REQUEST_ID], "r1");
    assert_null(f.eq[AUDIT_F_TENANT]);
    assert_int_equal(f.after_seq, 42);
    /* A parameter given twice is refused, whatever the value. */
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_QUERY, "agent", "bot", why, sizeof why),
                     PEP_EINVAL);
    assert_string_equal(why, "'agent' is given twice");
    /* The default limit, filled by the final check. */
    assert_int_equal(audit_filter_check(&f, AUDIT_FILTER_QUERY, why, sizeof why), 0);
    assert_int_equal(f.limit, AUDIT_QUERY_LIMIT_DEFAULT);
    audit_filter_clear(&f);

    /* since must come before until. */
    assert_int_equal(
        audit_filter_set(&f, AUDIT_FILTER_QUERY, "since", "2026-02-01T00:00:00Z", why, sizeof why),
        0);
    assert_int_equal(
        audit_filter_set(&f, AUDIT_FILTER_QUERY, "until", "2026-02-01T00:00:00Z", why, sizeof why),
        0);
    assert_int_equal(audit_filter_check(&f, AUDIT_FILTER_QUERY, why, sizeof why), PEP_EINVAL);
    assert_non_null(strstr(why, "'since'"));
    audit_filter_clear(&f);

    /* An export needs its format. */
    assert_int_equal(audit_filter_check(&f, AUDIT_FILTER_EXPORT, why, sizeof why), PEP_EINVAL);
    assert_string_equal(why, "'format' is required: ndjson or csv");
    assert_int_equal(audit_filter_set(&f, AUDIT_FILTER_EXPORT, "format", "csv", why, sizeof why),
                     0);
    assert_int_equal(audit_filter_check(&f, AUDIT_FILTER_EXPORT, why, sizeof why), 0);
    assert_int_equal(f.format, AUDIT_EXPORT_CSV);
    audit_filter_clear(&f);
}

/* ---- SQL ---------------------------------------------------------------------------------- */

static void set(struct audit_filter *f, const char *key, const char *value) {
    char why[300];
    if (audit_filter_set(f, AUDIT_FILTER_QUERY, key, value, why, sizeof why) != 0)
        fail_msg("%s=%s: %s", key, value, why);
}

static void test_sql_build(void **state) {
    (void)state;
    struct audit_filter f = {0};
    struct audit_sql q;

    audit_sql_build(&f, AUDIT_SQL_RECORDS, &q);
    assert_string_equal(q.text, "SELECT seq, record FROM audit WHERE seq > ?1 AND seq <= ?2"
                                " ORDER BY seq LIMIT ?3");
    assert_int_equal(q.nargs, 0);
    assert_int_equal(q.limit_slot, 3);

    /* Every filter: fixed fragments in a fixed order, the values bound. */
    set(&f, "request_id", "r-1");
    set(&f, "kind", "decision");
    set(&f, "agent", "x' OR 1=1 --");
    set(&f, "code", "denied_by_rule");
    set(&f, "tenant", "acme");
    set(&f, "decision", "deny");
    set(&f, "action", "llm.chat");
    set(&f, "since", "2026-01-01T00:00:00Z");
    set(&f, "until", "2026-01-02T00:00:00Z");
    audit_sql_build(&f, AUDIT_SQL_RECORDS, &q);
    assert_string_equal(q.text, "SELECT seq, record FROM audit WHERE seq > ?1 AND seq <= ?2"
                                " AND agent = ?3 AND tenant = ?4 AND action = ?5"
                                " AND decision = ?6 AND code = ?7 AND kind = ?8"
                                " AND request_id = ?9 AND +ts >= ?10 AND +ts < ?11"
                                " ORDER BY seq LIMIT ?12");
    static const char *const want[] = {"x' OR 1=1 --",
                                       "acme",
                                       "llm.chat",
                                       "deny",
                                       "denied_by_rule",
                                       "decision",
                                       "r-1",
                                       "2026-01-01T00:00:00.000000Z",
                                       "2026-01-02T00:00:00.000000Z"};
    assert_int_equal(q.nargs, 9);
    for (size_t i = 0; i < q.nargs; i++)
        assert_string_equal(q.args[i], want[i]);
    assert_int_equal(q.limit_slot, 12);
    /* SECURITY: no value is ever in the text. */
    assert_null(strstr(q.text, "OR 1=1"));
    assert_null(strstr(q.text, "acme"));
    assert_null(strstr(q.text, "2026"));
    audit_filter_clear(&f);

    /* The export's columns. */
    set(&f, "since", "2026-01-01T00:00:00Z");
    set(&f, "kind", "admin");
    audit_sql_build(&f, AUDIT_SQL_EXPORT, &q);
    assert_string_equal(q.text,
                        "SELECT seq, record, prev_hash, hash, ts, kind, agent, tenant, action,"
                        " decision, code, request_id FROM audit"
                        " WHERE seq > ?1 AND seq <= ?2 AND kind = ?3 AND +ts >= ?4"
                        " ORDER BY seq LIMIT ?5");
    assert_string_equal(q.args[0], "admin");
    assert_string_equal(q.args[1], "2026-01-01T00:00:00.000000Z");
    audit_filter_clear(&f);
}

/* ---- encoders ----------------------------------------------------------------------------- */

static void test_csv_quoting(void **state) {
    (void)state;
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"plain", "plain"},
        {"", ""},
        {"a,b", "\"a,b\""},
        {"say \"hi\"", "\"say \"\"hi\"\"\""},
        {"\"", "\"\"\"\""},
        {"line\nbreak", "\"line\nbreak\""},
        {"cr\rhere", "\"cr\rhere\""},
        {"crlf\r\n", "\"crlf\r\n\""},
        {"{\"a\":1,\"b\":\"x\"}", "\"{\"\"a\"\":1,\"\"b\"\":\"\"x\"\"}\""},
        {"semi;colon 'single' caf\xc3\xa9", "semi;colon 'single' caf\xc3\xa9"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct audit_buf b = {0};
        audit_buf_csv_field(&b, cases[i].in, strlen(cases[i].in));
        assert_false(b.failed);
        assert_string_equal(b.data ? b.data : "", cases[i].out);
        audit_buf_free(&b);
    }
    /* SQL NULL is an empty field. */
    struct audit_buf b = {0};
    audit_buf_csv_field(&b, NULL, 0);
    assert_int_equal(b.len, 0);
    audit_buf_free(&b);
}

/* A minimal RFC 4180 reader: the fields of the first record of *p (advanced past it), each
 * malloc'd into fields[]; returns the count. */
static size_t csv_read_record(const char **p, char **fields, size_t cap) {
    size_t n = 0;
    const char *s = *p;
    for (;;) {
        struct audit_buf f = {0};
        audit_buf_add(&f, "", 0);
        if (*s == '"') {
            s++;
            for (;;) {
                if (*s == '"' && s[1] == '"') {
                    audit_buf_add(&f, "\"", 1);
                    s += 2;
                } else if (*s == '"') {
                    s++;
                    break;
                } else {
                    assert_true(*s != '\0');
                    audit_buf_add(&f, s++, 1);
                }
            }
        } else {
            size_t len = strcspn(s, ",\r\n");
            audit_buf_add(&f, s, len);
            s += len;
        }
        assert_true(n < cap);
        fields[n++] = f.data;
        if (*s == ',') {
            s++;
            continue;
        }
        assert_memory_equal(s, "\r\n", 2);
        s += 2;
        break;
    }
    *p = s;
    return n;
}

static void test_export_rows(void **state) {
    (void)state;
    /* A record with everything that needs escaping in JSON and quoting in CSV. */
    const char record[] = "{\"path\":\"/a,b\\\"c\\\\d\\n\\u0001\",\"reason\":\"caf\xc3\xa9 \xe2\x80"
                          "\xa8\",\"seq\":7}";
    uint8_t prev[32], hash[32];
    memset(prev, 0xab, 32);
    memset(hash, 0x01, 32);
    struct audit_row row = {.seq = 7,
                            .record = record,
                            .record_len = strlen(record),
                            .prev_hash = prev,
                            .hash = hash,
                            .copies = {"2026-01-01T00:00:00.000000Z", "decision", "bot", NULL,
                                       "a,b", "deny", "no_route", "r\"1"}};
    struct audit_buf b = {0};
    audit_buf_ndjson_row(&b, &row);
    assert_false(b.failed);
    assert_int_equal(b.data[b.len - 1], '\n');
    assert_null(memchr(b.data, '\n', b.len - 1)); /* one line */
    json_error_t jerr;
    json_t *line = json_loadb(b.data, b.len, 0, &jerr);
    assert_non_null(line);
    assert_int_equal(json_object_size(line), 4);
    assert_int_equal(json_integer_value(json_object_get(line, "seq")), 7);
    json_t *rec = json_object_get(line, "record");
    assert_int_equal(json_string_length(rec), strlen(record));
    assert_memory_equal(json_string_value(rec), record, strlen(record)); /* byte for byte */
    char hex[65];
    pep_hex(prev, 32, hex);
    assert_string_equal(json_string_value(json_object_get(line, "prev_hash")), hex);
    pep_hex(hash, 32, hex);
    assert_string_equal(json_string_value(json_object_get(line, "hash")), hex);
    json_decref(line);
    audit_buf_free(&b);

    audit_buf_str(&b, AUDIT_EXPORT_COLUMNS "\r\n");
    audit_buf_csv_row(&b, &row);
    const char *p = b.data;
    char *fields[16];
    size_t n = csv_read_record(&p, fields, 16);
    assert_int_equal(n, 12);
    assert_string_equal(fields[0], "seq");
    assert_string_equal(fields[9], "record");
    for (size_t i = 0; i < n; i++)
        free(fields[i]);
    n = csv_read_record(&p, fields, 16);
    assert_int_equal(n, 12);
    assert_string_equal(fields[0], "7");
    assert_string_equal(fields[1], "2026-01-01T00:00:00.000000Z");
    assert_string_equal(fields[4], "");
    assert_string_equal(fields[5], "a,b");
    assert_string_equal(fields[8], "r\"1");
    assert_string_equal(fields[9], record);
    pep_hex(prev, 32, hex);
    assert_string_equal(fields[10], hex);
    for (size_t i = 0; i < n; i++)
        free(fields[i]);
    assert_int_equal(*p, '\0');
    audit_buf_free(&b);
}

/* ---- the cursor on a real store ------------------------------------------------------------ */

#define N_RECORDS 10000
#define T0_US INT64_C(1767225600000000) /* 2026-01-01T00:00:00Z */

static char g_dir[64], g_db[128];

/* The generated record i (seq i + 1): one a minute, fields cycling with different periods so
 * that every filter matches a different subset. */
struct gen {
    char ts[32], agent[16], tenant[16], action[16], request_id[32];
    const char *kind, *decision, *code;
};

static void gen(size_t i, struct gen *g) {
    static const char *const kinds[] = {"decision", "outcome", "decision", "admin", "system"};
    static const char *const codes[] = {"ok", "denied_by_rule",    "ok", "no_route", "rate_limited",
                                        "ok", "insufficient_scope"};
    pep_format_rfc3339_us(T0_US + (int64_t)i * 60000000, g->ts);
    snprintf(g->agent, sizeof g->agent, "agent-%zu", i % 7);
    snprintf(g->tenant, sizeof g->tenant, "t%zu", i % 3);
    snprintf(g->action, sizeof g->action, "act.%zu", i % 5);
    snprintf(g->request_id, sizeof g->request_id, "req-%zu", i / 2);
    g->kind = kinds[i % 5];
    g->code = codes[i % 7];
    g->decision = strcmp(g->code, "ok") == 0 ? "allow" : "deny";
}

static json_t *gen_record(size_t i) {
    struct gen g;
    gen(i, &g);
    json_t *r = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "ts", g.ts, "kind", g.kind,
                          "agent", g.agent, "tenant", g.tenant, "action", g.action, "decision",
                          g.decision, "code", g.code, "request_id", g.request_id);
    if (i % 5 == 3) json_object_del(r, "decision"); /* some records lack a field */
    return r;
}

/* Whether generated record i matches f (the reference the store's answers are held to). */
static bool gen_matches(size_t i, const struct audit_filter *f) {
    struct gen g;
    gen(i, &g);
    const char *v[AUDIT_F_COUNT] = {g.agent, g.tenant, g.action,    i % 5 == 3 ? NULL : g.decision,
                                    g.code,  g.kind,   g.request_id};
    for (size_t k = 0; k < AUDIT_F_COUNT; k++)
        if (f->eq[k] && (!v[k] || strcmp(f->eq[k], v[k]) != 0)) return false;
    if (f->since[0] && strcmp(g.ts, f->since) < 0) return false;
    if (f->until[0] && strcmp(g.ts, f->until) >= 0) return false;
    return (int64_t)i + 1 > f->after_seq;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int store_setup(void **state) {
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/pep_query_test.XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_db, sizeof g_db, "%s/pep.db", g_dir);
    struct audit_options opt = {.durability_full = false, .schema_extra = APPROVALS_SCHEMA};
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    if (audit_open(g_db, &opt, &s, &err) != 0) {
        fprintf(stderr, "audit_open: %s\n", err.msg);
        return -1;
    }
    for (size_t i = 0; i < N_RECORDS; i++)
        if (audit_submit(s, gen_record(i), NULL, NULL, NULL, NULL) != 0) return -1;
    audit_close(s); /* drains: every record is written */
    return 0;
}

static int store_teardown(void **state) {
    (void)state;
    nftw(g_dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

static sqlite3 *reader(void) {
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    assert_int_equal(audit_open_reader(g_db, &db, &err), 0);
    return db;
}

/* Pages through f with limit until next_after_seq is null; checks that every generated
 * record matching f comes exactly once, in seq order, and returns the number of pages. */
static size_t page_through(sqlite3 *db, struct audit_filter *f, int limit, int64_t budget_us) {
    char why[300];
    f->limit = limit;
    assert_int_equal(audit_filter_check(f, AUDIT_FILTER_QUERY, why, sizeof why), 0);
    size_t expect = 0, pages = 0;
    int64_t after0 = f->after_seq;
    for (size_t i = 0; i < N_RECORDS; i++)
        expect += gen_matches(i, f);
    size_t next_i = 0; /* the generated index the next matching record must have */
    size_t seen = 0;
    for (;;) {
        struct audit_buf out = {0};
        struct pep_err err = {0};
        assert_int_equal(audit_query_page(db, f, budget_us, &out, &err), 0);
        pages++;
        json_error_t jerr;
        json_t *ans = json_loadb(out.data, out.len, 0, &jerr);
        if (!ans) fail_msg("page is not JSON: %s", jerr.text);
        json_t *recs = json_object_get(ans, "records"), *rec;
        assert_true(json_is_array(recs));
        assert_true(json_array_size(recs) <= (size_t)limit);
        size_t k;
        json_array_foreach(recs, k, rec) {
            size_t i = (size_t)json_integer_value(json_object_get(rec, "seq")) - 1;
            while (next_i < i) {
                if (gen_matches(next_i, f) && (int64_t)next_i + 1 > after0)
                    fail_msg("record %zu was skipped", next_i + 1);
                next_i++;
            }
            if (!gen_matches(i, f)) fail_msg("record %zu does not match", i + 1);
            struct gen g;
            gen(i, &g);
            assert_string_equal(json_string_value(json_object_get(rec, "ts")), g.ts);
            next_i = i + 1;
            seen++;
        }
        json_t *next = json_object_get(ans, "next_after_seq");
        bool done = json_is_null(next);
        if (!done) {
            assert_true(json_is_integer(next));
            assert_true(json_integer_value(next) > f->after_seq); /* always progress */
            f->after_seq = json_integer_value(next);
        }
        json_decref(ans);
        audit_buf_free(&out);
        if (done) break;
        assert_true(pages < 100000);
    }
    assert_int_equal(seen, expect);
    f->after_seq = after0;
    return pages;
}

static void test_every_filter(void **state) {
    (void)state;
    sqlite3 *db = reader();
    static const char *const filters[][2] = {
        {"agent", "agent-3"},
        {"tenant", "t1"},
        {"action", "act.4"},
        {"decision", "deny"},
        {"decision", "allow"},
        {"code", "rate_limited"},
        {"kind", "outcome"},
        {"kind", "admin"},
        {"request_id", "req-777"},
        {"since", "2026-01-05T00:00:00Z"},
        {"until", "2026-01-02T00:00:00Z"},
        {"agent", "nobody"},
    };
    for (size_t i = 0; i < sizeof filters / sizeof filters[0]; i++) {
        struct audit_filter f = {0};
        set(&f, filters[i][0], filters[i][1]);
        page_through(db, &f, AUDIT_QUERY_LIMIT_MAX, -1);
        audit_filter_clear(&f);
    }
    /* Combinations: one agent, one day (the ts plan or the agent's index), and more. */
    struct audit_filter f = {0};
    set(&f, "agent", "agent-2");
    set(&f, "since", "2026-01-03T00:00:00Z");
    set(&f, "until", "2026-01-04T00:00:00Z");
    page_through(db, &f, 50, -1);
    set(&f, "kind", "decision");
    set(&f, "decision", "deny");
    page_through(db, &f, 7, -1);
    audit_filter_clear(&f);
    set(&f, "request_id", "req-10");
    set(&f, "kind", "decision");
    page_through(db, &f, 100, -1);
    audit_filter_clear(&f);
    /* after_seq: only what follows. */
    set(&f, "tenant", "t2");
    set(&f, "after_seq", "9000");
    page_through(db, &f, 100, -1);
    audit_filter_clear(&f);
    sqlite3_close(db);
}

static void test_pagination(void **state) {
    (void)state;
    sqlite3 *db = reader();
    struct audit_filter f = {0};
    /* Every record once, 7 at a time. */
    size_t pages = page_through(db, &f, 7, -1);
    assert_int_equal(pages, (N_RECORDS + 6) / 7);
    /* A page that is exactly full: the next page is empty and says so. */
    set(&f, "request_id", "req-5");
    page_through(db, &f, 2, -1);
    audit_filter_clear(&f);
    /* A spent time budget still answers, with a cursor that goes on: a filter matching
     * nothing crosses the whole log a window per page. */
    set(&f, "code", "no_such_code");
    pages = page_through(db, &f, 100, 0);
    assert_true(pages > 1);
    audit_filter_clear(&f);
    set(&f, "kind", "system");
    page_through(db, &f, 30, 0);
    audit_filter_clear(&f);
    sqlite3_close(db);
}

/* EXPLAIN QUERY PLAN of the statement a cursor chose, as one string. */
static void plan_of(sqlite3 *db, const struct audit_scan *sc, char *out, size_t cap) {
    char sql[1200];
    snprintf(sql, sizeof sql, "EXPLAIN QUERY PLAN %s", sc->sql.text);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    out[0] = '\0';
    while (sqlite3_step(st) == SQLITE_ROW) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s; ", (const char *)sqlite3_column_text(st, 3));
    }
    sqlite3_finalize(st);
}

static void test_plans(void **state) {
    (void)state;
    sqlite3 *db = reader();
    struct pep_err err = {0};
    char plan[512];
    struct {
        const char *k1, *v1, *k2, *v2;
        const char *uses;    /* in the query plan */
        int64_t after, head; /* the seqs the cursor is narrowed to */
    } cases[] = {
        {"agent", "agent-1", NULL, NULL, "INDEX audit_agent", 0, N_RECORDS},
        {"request_id", "req-1", "kind", "outcome", "INDEX audit_request_id", 0, N_RECORDS},
        {"kind", "admin", NULL, NULL, "INTEGER PRIMARY KEY", 0, N_RECORDS},
        /* day 2 is records 1440 … 2879 (seqs 1441 … 2880): only those are read */
        {"since", "2026-01-02T00:00:00Z", "until", "2026-01-03T00:00:00Z", "INTEGER PRIMARY KEY",
         1440, 2880},
        {"since", "2026-01-02T00:00:00Z", "agent", "agent-6", "INDEX audit_agent", 1440, N_RECORDS},
        {"until", "2026-01-01T01:00:00Z", NULL, NULL, "INTEGER PRIMARY KEY", 0, 60},
        /* a range holding nothing: done before reading */
        {"since", "2030-01-01T00:00:00Z", NULL, NULL, "INTEGER PRIMARY KEY", N_RECORDS, N_RECORDS},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct audit_filter f = {0};
        set(&f, cases[i].k1, cases[i].v1);
        if (cases[i].k2) set(&f, cases[i].k2, cases[i].v2);
        struct audit_scan sc;
        assert_int_equal(audit_scan_open(&sc, db, &f, AUDIT_SQL_RECORDS, &err), 0);
        plan_of(db, &sc, plan, sizeof plan);
        if (!strstr(plan, cases[i].uses) || sc.after != cases[i].after || sc.head != cases[i].head)
            fail_msg("case %zu: (%lld, %lld] %s", i, (long long)sc.after, (long long)sc.head, plan);
        /* Never a sort, never the ts index: seq order is the read order. */
        assert_null(strstr(plan, "TEMP B-TREE"));
        assert_null(strstr(plan, "audit_ts"));
        audit_scan_close(&sc);
        audit_filter_clear(&f);
    }
    sqlite3_close(db);
}

/* Records whose ts is not in seq order (a clock stepped back and forth): time filters still
 * answer exactly the records of the range, because the seq bounds come from every record
 * of the range. */
static void test_time_not_in_seq_order(void **state) {
    (void)state;
    char dir[64], path[128];
    snprintf(dir, sizeof dir, "/tmp/pep_query_clock.XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/pep.db", dir);
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    struct audit_options opt = {.durability_full = false};
    assert_int_equal(audit_open(path, &opt, &s, &err), 0);
    int64_t minute[60];
    for (int i = 0; i < 60; i++) {
        minute[i] = (i * 37) % 60; /* a permutation of 0 … 59 */
        char ts[32];
        pep_format_rfc3339_us(T0_US + minute[i] * 60000000, ts);
        assert_int_equal(audit_submit(s,
                                      json_pack("{s:s, s:s, s:s}", "ts", ts, "kind", "decision",
                                                "request_id", "r"),
                                      NULL, NULL, NULL, NULL),
                         0);
    }
    audit_close(s);
    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(path, &db, &err), 0);
    static const int ranges[][2] = {{0, 60}, {10, 11}, {10, 20}, {0, 1}, {59, 60}, {25, 45}};
    for (size_t k = 0; k < sizeof ranges / sizeof ranges[0]; k++) {
        char since[32], until[32];
        pep_format_rfc3339_us(T0_US + ranges[k][0] * INT64_C(60000000), since);
        pep_format_rfc3339_us(T0_US + ranges[k][1] * INT64_C(60000000), until);
        struct audit_filter f = {0};
        set(&f, "since", since);
        set(&f, "until", until);
        f.limit = 1000;
        struct audit_buf out = {0};
        assert_int_equal(audit_query_page(db, &f, -1, &out, &err), 0);
        json_t *ans = json_loadb(out.data, out.len, 0, NULL);
        assert_non_null(ans);
        size_t n = 0, j;
        json_t *rec;
        json_array_foreach(json_object_get(ans, "records"), j, rec) {
            int64_t seq = json_integer_value(json_object_get(rec, "seq"));
            int64_t m = minute[seq - 1];
            assert_true(m >= ranges[k][0] && m < ranges[k][1]);
            n++;
        }
        size_t want = 0;
        for (int i = 0; i < 60; i++)
            want += minute[i] >= ranges[k][0] && minute[i] < ranges[k][1];
        assert_int_equal(n, want);
        json_decref(ans);
        audit_buf_free(&out);
        audit_filter_clear(&f);
    }
    sqlite3_close(db);
    nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static void test_not_a_store(void **state) {
    (void)state;
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    struct audit_filter f = {0};
    struct audit_buf out = {0};
    struct pep_err err = {0};
    f.limit = 10;
    assert_int_equal(audit_query_page(db, &f, -1, &out, &err), PEP_EDB);
    assert_non_null(strstr(err.msg, "not an audit store"));
    audit_buf_free(&out);
    sqlite3_close(db);
}

/* ---- the trace ----------------------------------------------------------------------------- */

/* A store holding one approval's and one escalation's story among noise. */
static char g_tdir[64], g_tdb[128];

static void submit(struct audit_store *s, int64_t t_s, const char *kind, const char *request_id,
                   const char *extra_key, const char *extra_value, const char *action) {
    char ts[32];
    pep_format_rfc3339_us(T0_US + t_s * 1000000, ts);
    json_t *r = json_pack("{s:s, s:s, s:s}", "ts", ts, "kind", kind, "request_id", request_id);
    if (extra_key) json_object_set_new(r, extra_key, json_string(extra_value));
    if (action) json_object_set_new(r, "action", json_string(action));
    assert_int_equal(audit_submit(s, r, NULL, NULL, NULL, NULL), 0);
}

static int trace_setup(void **state) {
    (void)state;
    snprintf(g_tdir, sizeof g_tdir, "/tmp/pep_trace_test.XXXXXX");
    if (!mkdtemp(g_tdir)) return -1;
    snprintf(g_tdb, sizeof g_tdb, "%s/pep.db", g_tdir);
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    struct audit_options opt = {.durability_full = false};
    if (audit_open(g_tdb, &opt, &s, &err) != 0) return -1;
    submit(s, 0, "decision", "noise-0", NULL, NULL, "x");
    submit(s, 10, "decision", "R1", "approval_id", "A1", "t.refund"); /* created */
    submit(s, 11, "decision", "noise-1", "approval_id", "A2", "t.refund");
    submit(s, 20, "decision", "R2", "approval_id", "A1", "t.refund"); /* re-sent, pending */
    submit(s, 30, "admin", "ADM1", "approval_id", "A1", "approvals.approve");
    submit(s, 31, "admin", "ADM2", "approval_id", "A2", "approvals.deny");
    submit(s, 40, "decision", "R3", "approval_id", "A1", "t.refund"); /* used */
    submit(s, 41, "outcome", "R3", "escalation_id", "E1", "t.refund");
    submit(s, 41, "system", "R3", "escalation_id", "E1", "escalation.open");
    submit(s, 50, "decision", "noise-2", "path", "\"approval_id\":\"A1\"", "x"); /* in a string */
    submit(s, 60, "admin", "ADM3", "escalation_id", "E1", "escalations.resolve");
    submit(s, 70, "decision", "R4", "replay_of", "R3", "t.refund");
    submit(s, 5 * 3600, "decision", "late", "approval_id", "A1", "t.refund"); /* out of window */
    audit_close(s);
    return 0;
}

static int trace_teardown(void **state) {
    (void)state;
    nftw(g_tdir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* The request ids of a trace's records, in order, joined by ' '; *complete. */
static void trace_ids(const char *request_id, char *out, size_t cap, bool *complete) {
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    assert_int_equal(audit_open_reader(g_tdb, &db, &err), 0);
    struct audit_buf b = {0};
    int rc = audit_trace(db, request_id, 1000000, &b, &err);
    sqlite3_close(db);
    out[0] = '\0';
    if (rc == PEP_ENOTFOUND) {
        snprintf(out, cap, "not found");
        return;
    }
    assert_int_equal(rc, 0);
    json_t *t = json_loadb(b.data, b.len, 0, NULL);
    assert_non_null(t);
    assert_string_equal(json_string_value(json_object_get(t, "request_id")), request_id);
    *complete = json_is_true(json_object_get(t, "complete"));
    size_t i;
    json_t *rec;
    int64_t last = 0;
    json_array_foreach(json_object_get(t, "records"), i, rec) {
        int64_t seq = json_integer_value(json_object_get(rec, "seq"));
        assert_true(seq > last); /* oldest first */
        last = seq;
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s%s", n ? " " : "",
                 json_string_value(json_object_get(rec, "request_id")));
    }
    json_decref(t);
    audit_buf_free(&b);
}

static void test_trace(void **state) {
    (void)state;
    char ids[512];
    bool complete = false;
    /* From the request that created the approval: its decision, the re-send, the operator's
     * approval, the request that used it with its outcome and escalation, the resolution,
     * and the replay's original pulled in by nothing (R4 names R3, not the reverse). */
    trace_ids("R1", ids, sizeof ids, &complete);
    assert_string_equal(ids, "R1 R2 ADM1 R3 R3 R3 ADM3");
    assert_true(complete);
    /* From the request that used it: the same story. */
    trace_ids("R3", ids, sizeof ids, &complete);
    assert_string_equal(ids, "R1 R2 ADM1 R3 R3 R3 ADM3");
    /* A replay brings its original. */
    trace_ids("R4", ids, sizeof ids, &complete);
    assert_string_equal(ids, "R1 R2 ADM1 R3 R3 R3 ADM3 R4");
    /* The other approval's story stays apart. */
    trace_ids("noise-1", ids, sizeof ids, &complete);
    assert_string_equal(ids, "noise-1 ADM2");
    trace_ids("nobody", ids, sizeof ids, &complete);
    assert_string_equal(ids, "not found");
}

int main(void) {
    const struct CMUnitTest pure[] = {
        cmocka_unit_test(test_filter_parse_table),
        cmocka_unit_test(test_filter_values),
        cmocka_unit_test(test_sql_build),
        cmocka_unit_test(test_csv_quoting),
        cmocka_unit_test(test_export_rows),
        cmocka_unit_test(test_not_a_store),
        cmocka_unit_test(test_time_not_in_seq_order),
    };
    const struct CMUnitTest store[] = {
        cmocka_unit_test(test_every_filter),
        cmocka_unit_test(test_pagination),
        cmocka_unit_test(test_plans),
    };
    const struct CMUnitTest trace[] = {
        cmocka_unit_test(test_trace),
    };
    int failed = cmocka_run_group_tests_name("query", pure, NULL, NULL);
    failed += cmocka_run_group_tests_name("query_store", store, store_setup, store_teardown);
    failed += cmocka_run_group_tests_name("query_trace", trace, trace_setup, trace_teardown);
    return failed;
}
