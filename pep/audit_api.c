/*
 * audit_api.c — the admin API's audit query, export and trace (see audit_api.h): HTTP glue
 * around audit/query.h.  Parameters are read here and parsed there; answers are built
 * there and sent here.
 *
 * The export is a chunked answer whose body libmicrohttpd pulls through export_read on the
 * listener thread, as the client takes it.  Each call hands out what is left of the
 * current batch, or reads the next one (audit_scan_next: at most
 * AUDIT_API_EXPORT_BATCH_ROWS rows, _BYTES bytes or _US time) into the same buffer, so
 * memory stays one batch for a log of any size, and each batch is short read transactions
 * of its own: an export of a million records never pins the WAL.  A call that found no
 * row in its time (a filter matching little of a large log) returns 0 and libmicrohttpd
 * calls again: the scan goes on where it stopped, and the connection's other work in
 * between.  The export covers the log up to the head it saw when it started (one definite
 * range: a full NDJSON export re-verifies from seq 1 to that head).
 *
 * Once its 200 is sent an export cannot say 5xx: a read error, or pep stopping, ends the
 * stream with MHD_CONTENT_READER_END_WITH_ERROR — libmicrohttpd closes the connection
 * without the last chunk, which every HTTP client reports as a truncated answer.
 *
 * Threads: the admin listener's threads.
 */
#include "pep/audit_api.h"
#include "audit/audit.h"
#include "audit/query.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parameters ------------------------------------------------------------------------ */

struct param_walk {
    struct audit_filter *f;
    enum audit_filter_mode mode;
    int rc;
    char why[300];
};

static enum MHD_Result param_one(void *cls, enum MHD_ValueKind kind, const char *key,
                                 const char *value) {
    (void)kind;
    struct param_walk *w = cls;
    w->rc = audit_filter_set(w->f, w->mode, key ? key : "", value, w->why, sizeof w->why);
    return w->rc == 0 ? MHD_YES : MHD_NO;
}

/* Parses the request's query parameters into f.  0, or a code after answering (400 with
 * the filter and why, or 500). */
static int parse_filters(struct request *r, enum audit_filter_mode mode, struct audit_filter *f) {
    struct param_walk w = {.f = f, .mode = mode};
    MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, param_one, &w);
    if (w.rc == 0) w.rc = audit_filter_check(f, mode, w.why, sizeof w.why);
    if (w.rc == PEP_ENOMEM)
        reply_error(r, 500, "internal", "out of memory", NULL);
    else if (w.rc != 0)
        reply_error(r, 400, "bad_request", w.why, NULL);
    return w.rc;
}

/* A read-only connection to the store; NULL after answering 503. */
static sqlite3 *open_reader(struct request *r) {
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    if (audit_open_reader(r->srv->db_path, &db, &err) != 0) {
        reply_error(r, 503, "audit_unavailable", err.msg, NULL);
        return NULL;
    }
    return db;
}

/* Answers 200 with a JSON body already rendered (taken from b). */
static void reply_rendered(struct request *r, struct audit_buf *b) {
    reply_clear(&r->reply);
    r->reply.status = 200;
    r->reply.content_type = "application/json";
    r->reply.body = b->data;
    r->reply.body_len = b->len;
    b->data = NULL;
    audit_buf_free(b);
}

static void reply_read_error(struct request *r, int rc, const struct pep_err *err) {
    if (rc == PEP_ENOMEM)
        reply_error(r, 500, "internal", "out of memory", NULL);
    else
        reply_error(r, 503, "audit_unavailable", err->msg[0] ? err->msg : pep_strerror(rc), NULL);
}

/* ---- GET /admin/v1/audit ------------------------------------------------------------------- */

enum MHD_Result audit_api_query(struct request *r, const char *const *arg) {
    (void)arg;
    struct audit_filter f = {0};
    struct audit_buf out = {0};
    struct pep_err err = {0};
    sqlite3 *db = NULL;
    if (parse_filters(r, AUDIT_FILTER_QUERY, &f) == 0 && (db = open_reader(r))) {
        int rc = audit_query_page(db, &f, AUDIT_API_QUERY_BUDGET_US, &out, &err);
        if (rc == 0)
            reply_rendered(r, &out);
        else
            reply_read_error(r, rc, &err);
    }
    sqlite3_close(db);
    audit_buf_free(&out);
    audit_filter_clear(&f);
    return MHD_YES;
}

/* ---- GET /admin/v1/audit/trace/{request_id} ------------------------------------------------ */

enum MHD_Result audit_api_trace(struct request *r, const char *const *arg) {
    const char *id = arg[0];
    struct audit_buf out = {0};
    struct pep_err err = {0};
    size_t len = strlen(id);
    if (len > 128 || !pep_has_no_control(id) || !pep_utf8_valid(id, len)) {
        reply_error(r, 400, "bad_request",
                    "the request id must be at most 128 bytes of UTF-8 without control characters",
                    NULL);
        return MHD_YES;
    }
    sqlite3 *db = open_reader(r);
    if (!db) return MHD_YES;
    int rc = audit_trace(db, id, AUDIT_API_TRACE_BUDGET_US, &out, &err);
    sqlite3_close(db);
    if (rc == 0) {
        reply_rendered(r, &out);
    } else if (rc == PEP_ENOTFOUND) {
        char msg[200];
        snprintf(msg, sizeof msg, "no audit record has request_id '%s'", id);
        reply_error(r, 404, "not_found", msg, NULL);
    } else {
        reply_read_error(r, rc, &err);
    }
    audit_buf_free(&out);
    return MHD_YES;
}

/* ---- GET /admin/v1/audit/export ------------------------------------------------------------ */

/* One export in flight; owned by its libmicrohttpd response (freed by export_free). */
struct export_stream {
    struct server *srv; /* for `stopping` */
    char request_id[27];
    sqlite3 *db;           /* its own read-only connection */
    struct audit_filter f; /* the filters (the scan's statement borrows their strings) */
    struct audit_scan scan;
    struct audit_buf buf; /* the current batch, rendered */
    size_t sent;          /* bytes of buf already handed to libmicrohttpd */
    int64_t rows;         /* exported so far, for the log line of a failed export */
};

static int export_row(void *arg, sqlite3_stmt *st) {
    struct export_stream *x = arg;
    struct audit_row row = {.seq = sqlite3_column_int64(st, 0)};
    row.record = (const char *)sqlite3_column_text(st, 1);
    row.record_len = (size_t)sqlite3_column_bytes(st, 1);
    if (sqlite3_column_bytes(st, 2) == 32) row.prev_hash = sqlite3_column_blob(st, 2);
    if (sqlite3_column_bytes(st, 3) == 32) row.hash = sqlite3_column_blob(st, 3);
    for (int i = 0; i < 8; i++)
        row.copies[i] = (const char *)sqlite3_column_text(st, 4 + i);
    if (!row.record) row.record = "";
    if (x->f.format == AUDIT_EXPORT_CSV)
        audit_buf_csv_row(&x->buf, &row);
    else
        audit_buf_ndjson_row(&x->buf, &row);
    x->rows++;
    if (x->buf.failed) return PEP_ENOMEM;
    return x->buf.len >= AUDIT_API_EXPORT_BATCH_BYTES ? 1 : 0;
}

static ssize_t export_read(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    struct export_stream *x = cls;
    if (__atomic_load_n(&x->srv->stopping, __ATOMIC_SEQ_CST)) {
        fprintf(stderr, "pep: audit export %s cut short after %lld records: pep is stopping\n",
                x->request_id, (long long)x->rows);
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (x->sent == x->buf.len) {
        x->buf.len = x->sent = 0; /* the buffer is kept: one batch's memory, reused */
        if (audit_scan_done(&x->scan)) return MHD_CONTENT_READER_END_OF_STREAM;
        struct pep_err err = {0};
        int64_t got = 0;
        int rc = audit_scan_next(&x->scan, AUDIT_API_EXPORT_BATCH_ROWS, AUDIT_API_EXPORT_BATCH_US,
                                 export_row, x, &got, &err);
        if (rc != 0) {
            fprintf(stderr, "pep: audit export %s failed after %lld records: %s\n", x->request_id,
                    (long long)x->rows, err.msg);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (x->buf.len == 0)
            return audit_scan_done(&x->scan) ? MHD_CONTENT_READER_END_OF_STREAM : 0;
    }
    size_t n = x->buf.len - x->sent < max ? x->buf.len - x->sent : max;
    memcpy(out, x->buf.data + x->sent, n);
    x->sent += n;
    return (ssize_t)n;
}

static void export_free(void *cls) {
    struct export_stream *x = cls;
    audit_scan_close(&x->scan);
    sqlite3_close(x->db);
    audit_filter_clear(&x->f);
    audit_buf_free(&x->buf);
    free(x);
}

enum MHD_Result audit_api_export(struct request *r, const char *const *arg) {
    (void)arg;
    struct export_stream *x = calloc(1, sizeof *x);
    if (!x) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    x->srv = r->srv;
    memcpy(x->request_id, r->id, sizeof x->request_id);
    struct pep_err err = {0};
    int rc = parse_filters(r, AUDIT_FILTER_EXPORT, &x->f);
    if (rc == 0 && !(x->db = open_reader(r))) rc = PEP_EDB;
    /* The head is fixed and the statement prepared before the 200: a store that cannot be
     * read is still answered 503. */
    if (rc == 0 && (rc = audit_scan_open(&x->scan, x->db, &x->f, AUDIT_SQL_EXPORT, &err)) != 0)
        reply_read_error(r, rc, &err);
    bool csv = x->f.format == AUDIT_EXPORT_CSV;
    if (rc == 0 && csv) audit_buf_str(&x->buf, AUDIT_EXPORT_COLUMNS "\r\n");
    if (rc == 0 && x->buf.failed) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        rc = PEP_ENOMEM;
    }
    if (rc != 0) {
        export_free(x);
        return MHD_YES;
    }
    reply_clear(&r->reply);
    r->reply.status = 200;
    r->reply.content_type = csv ? "text/csv" : "application/x-ndjson";
    reply_set_header(&r->reply, "Content-Disposition",
                     csv ? "attachment; filename=\"pep-audit.csv\""
                         : "attachment; filename=\"pep-audit.ndjson\"");
    return reply_send_stream(r, export_read, export_free, x);
}
