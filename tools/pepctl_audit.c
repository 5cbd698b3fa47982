/*
 * pepctl_audit.c — `pepctl audit query | export | trace`: the reviewer's commands over the
 * admin API's audit reads (SPEC 5, 6.3, 8; pep/audit_api.h).
 *
 * Not a translation unit of its own: tools/pepctl.c includes it just before its command
 * table, so these commands share pepctl's flags, its one call (pepctl_api), its answer
 * checks and its tables, and pepctl stays one binary built from one compile.
 *
 *   audit query   every filter as a flag; --since/--until take RFC 3339 or a duration
 *                 back from now (`--since 1h`, `--since 7d`), which pepctl turns into RFC
 *                 3339; a table (seq, ts, kind, agent, action, decision, code,
 *                 request_id) or --json (the API's answer shape).  A page may come back
 *                 short when the server's time budget ran out (next_after_seq is then a
 *                 cursor): pepctl follows pages until it has --limit records or the log
 *                 ends, and says on stderr how to go on when more may follow.  --all
 *                 follows next_after_seq to the end, printing page by page (constant
 *                 memory, whatever the size of the log).
 *   audit export  --format ndjson|csv, the same filters, streamed by libcurl's write
 *                 callback straight into -o FILE (written as FILE.part and renamed once
 *                 complete, so a cut export never looks whole) or stdout.  No overall time
 *                 limit (a large log takes minutes); a transfer silent for
 *                 PEPCTL_EXPORT_STALL_S is given up.
 *   audit trace   REQUEST_ID: the server's trace (one query, server side: the request's
 *                 records, the approvals and escalations they name followed to the
 *                 operators' records), one line per record with the attempts of an outcome
 *                 underneath.
 *
 * Threads: single-threaded, like pepctl.
 */

#include <sys/stat.h>

#define PEPCTL_EXPORT_STALL_S 60L
#define PEPCTL_EXPORT_MAX_ERROR (64u * 1024) /* bytes of a refusal's body kept */

/* The filter flags and the query parameters they become. */
static const struct {
    int flag;
    const char *param;
} pepctl_audit_filters[] = {
    {F_AGENT, "agent"},           {F_TENANT, "tenant"}, {F_ACTION, "action"},
    {F_DECISION, "decision"},     {F_CODE, "code"},     {F_KIND, "kind"},
    {F_REQUEST_ID, "request_id"}, {F_SINCE, "since"},   {F_UNTIL, "until"},
    {F_AFTER_SEQ, "after_seq"},
};

#define PEPCTL_AUDIT_FILTER_FLAGS                                                                  \
    (BIT(F_AGENT) | BIT(F_TENANT) | BIT(F_ACTION) | BIT(F_DECISION) | BIT(F_CODE) | BIT(F_KIND) |  \
     BIT(F_REQUEST_ID) | BIT(F_SINCE) | BIT(F_UNTIL) | BIT(F_AFTER_SEQ))

/* --since/--until as RFC 3339: as given when it is, or now minus a duration ("90m", "1h",
 * "7d").  0, or PEPCTL_FAIL after a message. */
static int pepctl_audit_time(const char *flag, const char *v, char out[32]) {
    int64_t us, ms;
    if (pep_parse_rfc3339(v, &us) == 0) {
        snprintf(out, 32, "%s", v);
        return 0;
    }
    if (pep_parse_duration_ms(v, &ms) == 0) {
        pep_format_rfc3339_us(pep_now_us() - ms * 1000, out);
        return 0;
    }
    pepctl_errorf("%s: '%s' is neither an RFC 3339 time (2026-01-31T00:00:00Z) nor a duration "
                  "back from now (30m, 1h, 7d)",
                  flag, v);
    return PEPCTL_FAIL;
}

/* Whether v is a whole number in [lo, hi]. */
static bool pepctl_audit_number(const char *v, long long lo, long long hi) {
    size_t n = strlen(v);
    if (n == 0 || n > 18 || strspn(v, "0123456789") != n) return false;
    long long x = atoll(v);
    return x >= lo && x <= hi;
}

/* The query string of the filter flags given ("agent=x&since=…", escaped), plus extra (an
 * already escaped "k=v", may be NULL), with after_seq replaced by after when after >= 0.
 * malloc'd; NULL after a message. */
static char *pepctl_audit_params(struct pepctl *ctx, const struct pepctl_args *a, const char *extra,
                                 long long after) {
    char *qs = strdup(extra ? extra : "");
    if (!ctx->curl && !(ctx->curl = curl_easy_init())) goto oom;
    for (size_t i = 0; qs && i < PEP_ARRAY_LEN(pepctl_audit_filters); i++) {
        int f = pepctl_audit_filters[i].flag;
        const char *v = a->value[f];
        char num[32], when[32];
        if (f == F_AFTER_SEQ && after >= 0) {
            snprintf(num, sizeof num, "%lld", after);
            v = num;
        }
        if (!v) continue;
        if (!*v) {
            pepctl_errorf("%s needs a non-empty value", pepctl_flags[f].name);
            free(qs);
            return NULL;
        }
        if (f == F_AFTER_SEQ && !pepctl_audit_number(v, 0, 999999999999999999LL)) {
            pepctl_errorf("--after-seq: '%s' is not a non-negative integer", v);
            free(qs);
            return NULL;
        }
        if ((f == F_SINCE || f == F_UNTIL) && pepctl_audit_time(pepctl_flags[f].name, v, when)) {
            free(qs);
            return NULL;
        }
        if (f == F_SINCE || f == F_UNTIL) v = when;
        char *esc = curl_easy_escape(ctx->curl, v, 0);
        char *grown = NULL;
        if (!esc || asprintf(&grown, "%s%s%s=%s", qs, *qs ? "&" : "", pepctl_audit_filters[i].param,
                             esc) < 0)
            grown = NULL;
        curl_free(esc);
        free(qs);
        qs = grown;
    }
    if (qs) return qs;
oom:
    pepctl_errorf("out of memory");
    return NULL;
}

/* {"records": [objects with an integer "seq"], "next_after_seq": integer or null}. */
static const char *pepctl_shape_audit_page(const json_t *answer) {
    json_t *recs = json_object_get(answer, "records"), *rec;
    json_t *next = json_object_get(answer, "next_after_seq");
    size_t i;
    if (!json_is_array(recs) || !(json_is_integer(next) || json_is_null(next)))
        return "no 'records' array and integer or null 'next_after_seq'";
    json_array_foreach(recs, i, rec) {
        if (!json_is_integer(json_object_get(rec, "seq"))) return "a record without integer 'seq'";
    }
    return NULL;
}

static const char *pepctl_shape_audit_trace(const json_t *answer) {
    if (!pepctl_has_string(answer, "request_id") ||
        !json_is_array(json_object_get(answer, "records")))
        return "no string 'request_id' and 'records' array";
    return NULL;
}

static const char *const pepctl_audit_cols[] = {"seq",    "ts",       "kind", "agent",
                                                "action", "decision", "code", "request_id"};
#define PEPCTL_AUDIT_NCOLS PEP_ARRAY_LEN(pepctl_audit_cols)

static void pepctl_audit_header(struct pepctl_table *t) {
    char *row[PEPCTL_AUDIT_NCOLS];
    for (size_t c = 0; c < PEPCTL_AUDIT_NCOLS; c++)
        row[c] = pepctl_column_title(pepctl_audit_cols[c]);
    pepctl_table_add(t, row);
}

static void pepctl_audit_row(struct pepctl_table *t, const json_t *rec) {
    char *row[PEPCTL_AUDIT_NCOLS];
    for (size_t c = 0; c < PEPCTL_AUDIT_NCOLS; c++)
        row[c] = pepctl_cell(json_object_get(rec, pepctl_audit_cols[c]));
    pepctl_table_add(t, row);
}

/* Frees a table's cells without printing it. */
static void pepctl_audit_table_free(struct pepctl_table *t) {
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    t->cells = NULL;
    t->nrows = 0;
}

/* Appends page's records to the JSON list `all` (--json) or to the table. */
static void pepctl_audit_take(struct pepctl *ctx, json_t *page, json_t *all,
                              struct pepctl_table *t) {
    size_t i;
    json_t *rec;
    json_array_foreach(json_object_get(page, "records"), i, rec) {
        if (ctx->json)
            json_array_append(all, rec);
        else
            pepctl_audit_row(t, rec);
    }
}

/* One page from after (or the --after-seq flag when after < 0), at most limit records
 * (0: the server's default).  0 and *page, or PEPCTL_FAIL after a message. */
static int pepctl_audit_page(struct pepctl *ctx, const struct pepctl_args *a, long long after,
                             int limit, json_t **page) {
    char lim[32] = "";
    if (limit > 0) snprintf(lim, sizeof lim, "limit=%d", limit);
    char *qs = pepctl_audit_params(ctx, a, limit > 0 ? lim : NULL, after);
    char *path = NULL;
    int rc = PEPCTL_FAIL;
    if (qs && asprintf(&path, "/admin/v1/audit%s%s", *qs ? "?" : "", qs) < 0) {
        path = NULL;
        pepctl_errorf("out of memory");
    }
    if (path) rc = pepctl_api(ctx, "GET", path, NULL, pepctl_shape_audit_page, page, NULL);
    free(qs);
    free(path);
    return rc;
}

/* --all: every page to the end, each printed as it comes (the table's widths are the first
 * page's; --json writes the API's shape, records one per line). */
static int pepctl_audit_query_all(struct pepctl *ctx, const struct pepctl_args *a, int limit) {
    long long after = -1;
    bool first = true;
    size_t printed = 0;
    size_t *width = NULL;
    int rc = PEPCTL_OK;
    if (ctx->json) fputs("{\"records\":[", stdout);
    for (;;) {
        json_t *page = NULL;
        if (pepctl_audit_page(ctx, a, after, limit, &page) != 0) {
            rc = PEPCTL_FAIL;
            break;
        }
        json_t *recs = json_object_get(page, "records"), *rec;
        size_t i;
        if (ctx->json) {
            json_array_foreach(recs, i, rec) {
                fputs(printed++ ? ",\n  " : "\n  ", stdout);
                json_dumpf(rec, stdout, JSON_COMPACT);
            }
        } else {
            struct pepctl_table t = {.ncols = PEPCTL_AUDIT_NCOLS};
            pepctl_audit_header(&t);
            json_array_foreach(recs, i, rec) {
                pepctl_audit_row(&t, rec);
            }
            /* One width per column for the whole output: the first page's. */
            if (!width && !t.failed && (width = calloc(t.ncols, sizeof *width))) {
                width[2] = strlen("decision"); /* the widest kind, whatever page 1 holds */
                for (size_t r = 0; r < t.nrows; r++)
                    for (size_t c = 0; c < t.ncols; c++) {
                        size_t n = strlen(t.cells[r * t.ncols + c]);
                        width[c] = n > width[c] ? n : width[c];
                    }
            }
            if (!width || t.failed) {
                pepctl_errorf("out of memory");
                rc = PEPCTL_FAIL;
            }
            for (size_t r = first ? 0 : 1; rc == PEPCTL_OK && r < t.nrows; r++)
                for (size_t c = 0; c < t.ncols; c++) {
                    const char *cell = t.cells[r * t.ncols + c];
                    if (c + 1 < t.ncols)
                        printf("%-*s  ", (int)width[c], cell);
                    else
                        printf("%s\n", cell);
                }
            pepctl_audit_table_free(&t);
        }
        json_t *next = json_object_get(page, "next_after_seq");
        bool done = json_is_null(next);
        after = done ? after : (long long)json_integer_value(next);
        json_decref(page);
        first = false;
        if (done || rc != PEPCTL_OK) break;
    }
    if (ctx->json && rc == PEPCTL_OK) fputs("\n],\"next_after_seq\":null}\n", stdout);
    free(width);
    return rc;
}

static int pepctl_audit_query(struct pepctl *ctx, const struct pepctl_args *a) {
    int limit = 0;
    if (a->value[F_LIMIT]) {
        if (!pepctl_audit_number(a->value[F_LIMIT], 1, 1000)) {
            pepctl_errorf("--limit: '%s' is not an integer from 1 to 1000", a->value[F_LIMIT]);
            return PEPCTL_FAIL;
        }
        limit = atoi(a->value[F_LIMIT]);
    }
    if (a->value[F_ALL]) return pepctl_audit_query_all(ctx, a, limit ? limit : 1000);

    /* One page of --limit records (the server's default when not given), following the
     * cursor of pages the server's time budget cut short. */
    int want = limit ? limit : 100;
    long long after = -1;
    json_t *all = json_array(), *next = json_null();
    struct pepctl_table t = {.ncols = PEPCTL_AUDIT_NCOLS};
    int rc = PEPCTL_FAIL;
    if (!all) goto out;
    pepctl_audit_header(&t);
    for (;;) {
        json_t *page = NULL;
        int have = ctx->json ? (int)json_array_size(all) : (int)t.nrows - 1;
        if (pepctl_audit_page(ctx, a, after, want - have, &page) != 0) goto out;
        pepctl_audit_take(ctx, page, all, &t);
        json_decref(next);
        next = json_incref(json_object_get(page, "next_after_seq"));
        json_decref(page);
        have = ctx->json ? (int)json_array_size(all) : (int)t.nrows - 1;
        if (json_is_null(next) || have >= want || t.failed) break;
        after = (long long)json_integer_value(next);
    }
    if (ctx->json) {
        json_t *answer = json_pack("{s:O, s:O}", "records", all, "next_after_seq", next);
        rc = answer ? pepctl_print_json(answer) : PEPCTL_FAIL;
        json_decref(answer);
    } else {
        rc = pepctl_table_print(&t);
    }
    if (rc == PEPCTL_OK && json_is_integer(next))
        fprintf(stderr,
                "pepctl: more records may follow: add --after-seq %" JSON_INTEGER_FORMAT
                " for the next page, or --all\n",
                json_integer_value(next));
out:
    pepctl_audit_table_free(&t);
    json_decref(all);
    json_decref(next);
    return rc;
}

/* ---- export ------------------------------------------------------------------------------- */

struct pepctl_export {
    FILE *out;
    struct pepctl_buf head;  /* Pep-Request-Id seen (pepctl_on_header) */
    struct pepctl_buf error; /* the body of a refusal (not 200) */
    long status;
    CURL *curl;
    uint64_t bytes;
    uint64_t lines; /* '\n' written: NDJSON records; CSV rows + the header */
    int write_errno;
};

static size_t pepctl_export_write(char *ptr, size_t size, size_t nmemb, void *arg) {
    struct pepctl_export *x = arg;
    size_t n = size * nmemb;
    if (!x->status) curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &x->status);
    if (x->status != 200 || !x->head.pep_request_id) {
        /* A refusal (or not pep at all): keep a bounded part to report, write nothing. */
        if (x->error.len < PEPCTL_EXPORT_MAX_ERROR) {
            size_t keep = PEPCTL_EXPORT_MAX_ERROR - x->error.len < n
                              ? PEPCTL_EXPORT_MAX_ERROR - x->error.len
                              : n;
            if (pepctl_on_body(ptr, 1, keep, &x->error) != keep) return 0;
        }
        return n;
    }
    if (fwrite(ptr, 1, n, x->out) != n) {
        x->write_errno = errno ? errno : EIO;
        return 0;
    }
    x->bytes += n;
    for (const char *p = ptr, *end = ptr + n; (p = memchr(p, '\n', (size_t)(end - p))); p++)
        x->lines++;
    return n;
}

static int pepctl_audit_export(struct pepctl *ctx, const struct pepctl_args *a) {
    const char *format = a->value[F_FORMAT];
    if (strcmp(format, "ndjson") != 0 && strcmp(format, "csv") != 0) {
        pepctl_errorf("--format: '%s' is not ndjson or csv", format);
        return PEPCTL_FAIL;
    }
    const char *file = a->value[F_OUT];
    if (file && !*file) {
        pepctl_errorf("-o/--out needs a non-empty value");
        return PEPCTL_FAIL;
    }
    char extra[32];
    snprintf(extra, sizeof extra, "format=%s", format);
    struct pepctl_export x = {.out = stdout};
    struct curl_slist *headers = NULL;
    char *qs = pepctl_audit_params(ctx, a, extra, -1), *url = NULL, *auth = NULL, *part = NULL;
    char errbuf[CURL_ERROR_SIZE] = "";
    int rc = PEPCTL_FAIL;
    if (!qs || pepctl_load_token(ctx) != 0) goto out;
    size_t base_len = strlen(ctx->url);
    while (base_len > 0 && ctx->url[base_len - 1] == '/')
        base_len--;
    if (asprintf(&url, "%.*s/admin/v1/audit/export?%s", (int)base_len, ctx->url, qs) < 0 ||
        asprintf(&auth, "Authorization: Bearer %s", ctx->token) < 0) {
        url = auth = NULL;
        pepctl_errorf("out of memory");
        goto out;
    }
    /* A regular file (or a new one) is written as FILE.part and renamed once the export is
     * whole; anything else (a FIFO, /dev/stdout) is written as it is. */
    struct stat st;
    bool direct = file && stat(file, &st) == 0 && !S_ISREG(st.st_mode);
    if (file) {
        if (!direct && asprintf(&part, "%s.part", file) < 0) {
            part = NULL;
            pepctl_errorf("out of memory");
            goto out;
        }
        x.out = fopen(direct ? file : part, "w");
        if (!x.out) {
            pepctl_errorf("cannot write %s: %s", direct ? file : part, strerror(errno));
            goto out;
        }
    }
    headers = curl_slist_append(NULL, auth);
    if (!headers) {
        pepctl_errorf("out of memory");
        goto out;
    }
    CURL *c = ctx->curl;
    x.curl = c;
    curl_easy_reset(c);
    CURLcode crc = CURLE_OK;
    /* As pepctl_api (PITFALLS: libcurl), but no overall time limit: a stall limit. */
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_URL, url);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    if (crc == CURLE_OK)
        crc = curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, PEPCTL_CONNECT_TIMEOUT_MS);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, PEPCTL_EXPORT_STALL_S);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, pepctl_export_write);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_WRITEDATA, &x);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, pepctl_on_header);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HEADERDATA, &x.head);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    if (crc != CURLE_OK) {
        pepctl_errorf("cannot set up the request: %s", curl_easy_strerror(crc));
        goto out;
    }
    crc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &x.status);
    if (x.write_errno) {
        /* stdout closed by a reader that had enough (| head): not worth a message. */
        if (x.write_errno != EPIPE)
            pepctl_errorf("cannot write %s: %s", file ? file : "the output",
                          strerror(x.write_errno));
        goto out;
    }
    if (crc != CURLE_OK && x.status == 200 && x.head.pep_request_id) {
        pepctl_errorf("the export was cut short after %llu bytes (%s): it is incomplete%s",
                      (unsigned long long)x.bytes, errbuf[0] ? errbuf : curl_easy_strerror(crc),
                      file ? ", nothing was kept" : "");
        goto out;
    }
    if (crc != CURLE_OK) {
        pepctl_errorf("cannot reach pep admin API at %.*s: %s", (int)base_len, ctx->url,
                      errbuf[0] ? errbuf : curl_easy_strerror(crc));
        goto out;
    }
    if (x.status != 200 || !x.head.pep_request_id) {
        json_t *doc = x.error.data ? json_loadb(x.error.data, x.error.len, 0, NULL) : NULL;
        const char *not_pep = !x.head.pep_request_id ? "no Pep-Request-Id header"
                              : !json_is_object(doc) ? "the body is not a JSON object"
                                                     : pepctl_shape_error(doc);
        if (not_pep)
            pepctl_errorf("%s: the answer is not pep's admin API (HTTP %ld, %s)", url, x.status,
                          not_pep);
        else
            pepctl_report_api_error(x.status, doc);
        json_decref(doc);
        goto out;
    }
    if (x.out != stdout && (fflush(x.out) != 0 || (!direct && fsync(fileno(x.out)) != 0))) {
        pepctl_errorf("cannot write %s: %s", direct ? file : part, strerror(errno));
        goto out;
    }
    if (file && x.out && fclose(x.out) != 0) {
        x.out = NULL;
        pepctl_errorf("cannot write %s: %s", direct ? file : part, strerror(errno));
        goto out;
    }
    x.out = NULL;
    if (part && rename(part, file) != 0) {
        pepctl_errorf("cannot rename %s to %s: %s", part, file, strerror(errno));
        goto out;
    }
    if (file) {
        uint64_t records = strcmp(format, "csv") == 0 && x.lines ? x.lines - 1 : x.lines;
        fprintf(stderr, "pepctl: exported %llu records (%llu bytes) to %s\n",
                (unsigned long long)records, (unsigned long long)x.bytes, file);
    }
    rc = PEPCTL_OK;
out:
    if (x.out && x.out != stdout) fclose(x.out);
    if (rc != PEPCTL_OK && part) unlink(part);
    if (ctx->curl) curl_easy_setopt(ctx->curl, CURLOPT_ERRORBUFFER, NULL);
    for (struct curl_slist *it = headers; it; it = it->next)
        explicit_bzero(it->data, strlen(it->data));
    curl_slist_free_all(headers);
    if (auth) {
        explicit_bzero(auth, strlen(auth));
        free(auth);
    }
    free(x.error.data);
    free(qs);
    free(url);
    free(part);
    return rc;
}

/* ---- trace -------------------------------------------------------------------------------- */

/* What one record says, in a line: the fields a reviewer reads first, those present. */
static void pepctl_trace_line(const json_t *rec) {
    static const char *const keys[] = {"agent",     "action",   "decision",      "code",
                                       "status",    "operator", "approval_id",   "escalation_id",
                                       "upstream",  "model",    "fallback_step", "chain",
                                       "replay_of", "reason"};
    char *ts = pepctl_cell(json_object_get(rec, "ts"));
    char *kind = pepctl_cell(json_object_get(rec, "kind"));
    char *rid = pepctl_cell(json_object_get(rec, "request_id"));
    printf("%-8" JSON_INTEGER_FORMAT "  %s  %-8s  %s ",
           json_integer_value(json_object_get(rec, "seq")), ts ? ts : "-", kind ? kind : "-",
           rid ? rid : "-");
    free(ts);
    free(kind);
    free(rid);
    for (size_t i = 0; i < PEP_ARRAY_LEN(keys); i++) {
        json_t *v = json_object_get(rec, keys[i]);
        if (!v) continue;
        char *cell = pepctl_cell(v);
        printf(" %s=%s", keys[i], cell ? cell : "?");
        free(cell);
    }
    fputc('\n', stdout);
    /* The outcome's attempts, one per line. */
    size_t i;
    json_t *at;
    json_array_foreach(json_object_get(rec, "attempts"), i, at) {
        printf("          attempt %zu:", i + 1);
        const char *k;
        json_t *v;
        json_object_foreach(at, k, v) {
            char *cell = pepctl_cell(v);
            printf(" %s=%s", k, cell ? cell : "?");
            free(cell);
        }
        fputc('\n', stdout);
    }
}

static int pepctl_audit_trace(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    char *path = pepctl_path(ctx, "audit/trace", a->pos[2], NULL);
    int rc = PEPCTL_FAIL;
    if (!path) {
        pepctl_errorf("out of memory");
        return rc;
    }
    if (pepctl_api(ctx, "GET", path, NULL, pepctl_shape_audit_trace, &answer, NULL) == 0) {
        if (ctx->json) {
            rc = pepctl_print_json(answer);
        } else {
            printf("%-8s  %-27s  %-8s  %-26s  %s\n", "SEQ", "TS", "KIND", "REQUEST_ID", "WHAT");
            size_t i;
            json_t *rec;
            json_array_foreach(json_object_get(answer, "records"), i, rec) {
                pepctl_trace_line(rec);
            }
            rc = PEPCTL_OK;
        }
        if (json_is_false(json_object_get(answer, "complete")))
            fprintf(stderr, "pepctl: the trace may be incomplete: the server's search reached "
                            "one of its bounds\n");
    }
    json_decref(answer);
    free(path);
    return rc;
}
