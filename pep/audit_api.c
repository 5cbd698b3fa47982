/*
 * audit_api.c — the admin API's audit query, export and trace (see audit_api.h): HTTP glue
 * around audit/query.h.  Parameters are read here and parsed there; answers are built
 * there and sent here.
 *
 * The export is a chunked answer fed through a bounded pipe (pep/stream.h, the one SSE
 * relaying uses).  Its reading thread ("pep-export", nice AUDIT_API_EXPORT_NICE) reads the
 * next batch (audit_scan_next: at most AUDIT_API_EXPORT_BATCH_ROWS rows, _BYTES bytes or
 * _US time, each statement run its own read transaction: an export of a million records
 * never pins the WAL), renders it into one reused buffer and hands it to the pipe, waiting
 * while the pipe is full; libmicrohttpd's content reader, on the listener thread, takes
 * what the pipe holds and parks the connection while it holds nothing.  So memory is one
 * batch and the pipe's ring for a log of any size, a slow client slows the reading, no
 * listener thread ever waits on the disk, and the request path keeps the CPU it needs: at
 * nice 19 the export runs at full speed on an idle machine and yields under load.  The
 * export covers the log up to the head it saw when it started (one definite range: a full
 * NDJSON export re-verifies from seq 1 to that head).
 *
 * Once its 200 is sent an export cannot say 5xx: a read error, or pep stopping, ends the
 * stream with MHD_CONTENT_READER_END_WITH_ERROR — libmicrohttpd closes the connection
 * without the last chunk, which every HTTP client reports as a truncated answer.
 *
 * Threads: the admin listener's threads (handlers, content readers); one reading thread
 * per export, which touches only its export_stream (the pipe's hooks reach the request
 * under the pipe's lock, and only while the content reader is there).
 */
#include "pep/audit_api.h"
#include "audit/audit.h"
#include "audit/query.h"
#include "pep/util.h"

#include "pep/stream.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

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

/* Exports running now (any thread). */
static int exports_running;

/* One export in flight, shared by its reading thread and libmicrohttpd's content reader;
 * freed by whichever lets go last (refs). */
struct export_stream {
    int refs;                 /* atomic: the reading thread's and the content reader's */
    struct server *srv;       /* the content reader's (listener thread): `stopping` */
    struct request *r;        /* held by the content reader: the pipe parks its connection */
    struct stream_pipe *pipe; /* the rendered bytes, reading thread → connection */
    char request_id[27];
    /* The reading thread's own, once it runs: */
    sqlite3 *db;           /* its read-only connection */
    struct audit_filter f; /* the filters (the scan's statement borrows their strings) */
    struct audit_scan scan;
    struct audit_buf buf; /* the current batch, rendered; one batch's memory, reused */
    int64_t rows;         /* exported so far, for the log line of a failed export */
    pthread_mutex_t lock; /* guards room */
    pthread_cond_t cond;
    bool room; /* the pipe asked for more since the last write it refused */
};

static void export_release(struct export_stream *x) {
    if (__atomic_sub_fetch(&x->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    audit_scan_close(&x->scan);
    sqlite3_close(x->db);
    audit_filter_clear(&x->f);
    audit_buf_free(&x->buf);
    stream_pipe_free(x->pipe);
    pthread_mutex_destroy(&x->lock);
    pthread_cond_destroy(&x->cond);
    free(x);
    __atomic_sub_fetch(&exports_running, 1, __ATOMIC_ACQ_REL);
}

static void export_park(void *arg) {
    request_park(((struct export_stream *)arg)->r);
}
static void export_unpark(void *arg) {
    request_unpark(((struct export_stream *)arg)->r);
}
static void export_want_more(void *arg) {
    struct export_stream *x = arg;
    pthread_mutex_lock(&x->lock);
    x->room = true;
    pthread_cond_signal(&x->cond);
    pthread_mutex_unlock(&x->lock);
}

/* Reading thread: hands n bytes to the pipe, waiting for room as the client reads.  False
 * when the client is gone. */
static bool export_write(struct export_stream *x, const char *data, size_t n) {
    for (size_t off = 0; off < n;) {
        size_t piece = n - off < AUDIT_API_EXPORT_PIECE ? n - off : AUDIT_API_EXPORT_PIECE;
        pthread_mutex_lock(&x->lock);
        x->room = false;
        pthread_mutex_unlock(&x->lock);
        size_t w = stream_pipe_write(x->pipe, data + off, piece);
        if (w == 0) return false;
        if (w == STREAM_PIPE_FULL) {
            /* want_more comes once the client has read some (or has gone). */
            pthread_mutex_lock(&x->lock);
            while (!x->room)
                pthread_cond_wait(&x->cond, &x->lock);
            pthread_mutex_unlock(&x->lock);
            continue;
        }
        off += piece;
    }
    return true;
}

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

/* The reading thread ("pep-export"): batch after batch, each its own short read
 * transactions, into the pipe.  It never touches the server or the request (the pipe's
 * hooks do, under the pipe's lock, only while the content reader is there), so it may
 * outlive both. */
static void *export_main(void *arg) {
    struct export_stream *x = arg;
    /* SECURITY (availability): a bulk read must not take the CPU the request path needs.
     * Raising one's own nice value needs no privilege; an idle machine still exports at
     * full speed. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), AUDIT_API_EXPORT_NICE);
    bool ok = true, gone = false;
    if (x->buf.len > 0) gone = !export_write(x, x->buf.data, x->buf.len); /* the CSV header */
    while (!gone && !audit_scan_done(&x->scan)) {
        struct pep_err err = {0};
        int64_t got = 0;
        x->buf.len = 0;
        int rc = audit_scan_next(&x->scan, AUDIT_API_EXPORT_BATCH_ROWS, AUDIT_API_EXPORT_BATCH_US,
                                 export_row, x, &got, &err);
        if (rc != 0) {
            fprintf(stderr, "pep: audit export %s failed after %lld records: %s\n", x->request_id,
                    (long long)x->rows, err.msg);
            ok = false;
            break;
        }
        gone = !export_write(x, x->buf.data, x->buf.len);
    }
    /* A cut export ends without HTTP's last chunk: the client sees a truncated answer. */
    if (!gone) stream_pipe_close(x->pipe, ok);
    export_release(x);
    return NULL;
}

/* libmicrohttpd's content reader (listener thread). */
static ssize_t export_read(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    struct export_stream *x = cls;
    if (__atomic_load_n(&x->srv->stopping, __ATOMIC_SEQ_CST)) {
        fprintf(stderr, "pep: audit export %s cut short: pep is stopping\n", x->request_id);
        return MHD_CONTENT_READER_END_WITH_ERROR; /* listeners stop: no parking now */
    }
    ssize_t n = stream_pipe_read(x->pipe, out, max);
    if (n == STREAM_PIPE_END) return MHD_CONTENT_READER_END_OF_STREAM;
    if (n == STREAM_PIPE_ABORTED) return MHD_CONTENT_READER_END_WITH_ERROR;
    return n; /* 0: parked until the reading thread writes */
}

static void export_reader_done(void *cls) {
    struct export_stream *x = cls;
    struct request *r = x->r;
    stream_pipe_reader_gone(x->pipe); /* the reading thread stops at its next write */
    export_release(x);
    request_release(r); /* the content reader's hold */
}

/* Starts the reading thread with every signal blocked (they are the main thread's). */
static int export_start_thread(struct export_stream *x) {
    pthread_t t;
    pthread_attr_t attr;
    sigset_t all, old;
    if (pthread_attr_init(&attr) != 0) return PEP_ENOMEM;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&t, &attr, export_main, x);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) return PEP_ENOMEM;
    pthread_setname_np(t, "pep-export");
    return 0;
}

enum MHD_Result audit_api_export(struct request *r, const char *const *arg) {
    (void)arg;
    if (__atomic_add_fetch(&exports_running, 1, __ATOMIC_ACQ_REL) > AUDIT_API_MAX_EXPORTS) {
        __atomic_sub_fetch(&exports_running, 1, __ATOMIC_ACQ_REL);
        reply_error(r, 503, "audit_unavailable",
                    "too many audit exports are running; try again when one has finished", NULL);
        return MHD_YES;
    }
    struct export_stream *x = calloc(1, sizeof *x);
    if (!x) {
        __atomic_sub_fetch(&exports_running, 1, __ATOMIC_ACQ_REL);
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    x->refs = 1; /* this handler's, until the work is handed over */
    x->srv = r->srv;
    x->r = r;
    memcpy(x->request_id, r->id, sizeof x->request_id);
    pthread_mutex_init(&x->lock, NULL);
    pthread_cond_init(&x->cond, NULL);
    struct stream_pipe_hooks hooks = {export_park, export_unpark, export_want_more, x};
    struct pep_err err = {0};
    int rc = parse_filters(r, AUDIT_FILTER_EXPORT, &x->f);
    if (rc == 0 && !(x->db = open_reader(r))) rc = PEP_EDB;
    /* The head is fixed and the statement prepared before the 200: a store that cannot be
     * read is still answered 503. */
    if (rc == 0 && (rc = audit_scan_open(&x->scan, x->db, &x->f, AUDIT_SQL_EXPORT, &err)) != 0)
        reply_read_error(r, rc, &err);
    bool csv = x->f.format == AUDIT_EXPORT_CSV;
    if (rc == 0 && csv) audit_buf_str(&x->buf, AUDIT_EXPORT_COLUMNS "\r\n");
    if (rc == 0 && (x->buf.failed || !(x->pipe = stream_pipe_new(&hooks)))) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        rc = PEP_ENOMEM;
    }
    if (rc != 0) {
        export_release(x);
        return MHD_YES;
    }
    reply_clear(&r->reply);
    r->reply.status = 200;
    r->reply.content_type = csv ? "text/csv" : "application/x-ndjson";
    reply_set_header(&r->reply, "Content-Disposition",
                     csv ? "attachment; filename=\"pep-audit.csv\""
                         : "attachment; filename=\"pep-audit.ndjson\"");
    /* The content reader's share (it holds the request for the pipe's hooks); released by
     * export_reader_done, which libmicrohttpd calls even when the answer cannot be queued. */
    __atomic_add_fetch(&x->refs, 1, __ATOMIC_ACQ_REL);
    request_hold(r);
    enum MHD_Result queued = reply_send_stream(r, export_read, export_reader_done, x);
    /* The handler's share becomes the reading thread's. */
    if (queued != MHD_YES || export_start_thread(x) != 0) {
        if (queued == MHD_YES) {
            fprintf(stderr, "pep: audit export %s: cannot start its thread\n", x->request_id);
            stream_pipe_close(x->pipe, false);
        }
        export_release(x);
    }
    return queued;
}
