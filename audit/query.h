/*
 * query.h — reading the audit log for reviewers (SPEC 5, 6.3, 8): the query, the export
 * and the request trace.
 *
 * Three layers, in three files:
 *  - query.c, pure: the filters of a query string parsed and checked one parameter at a
 *    time (audit_filter_set names the filter and why it is refused), the SQL of a filter
 *    built from fixed fragments with every value a bound parameter (audit_sql_build: no
 *    value is ever part of the SQL text), and the encoders of the answers (JSON string,
 *    CSV field, NDJSON line, CSV row).
 *  - scan.c, SQLite: a cursor over the rows that match a filter, in seq order, on a
 *    read-only connection of its own (audit_open_reader), reading in short statements so
 *    that no read transaction lasts (a reader pins the WAL: the writer's checkpoints cannot
 *    copy back past its snapshot).  A query page and an export batch are both a bounded run
 *    of the cursor: at most so many rows or so much time, and the cursor says how far it
 *    got (`after`), so the next run — or the client, through next_after_seq — goes on from
 *    there.
 *  - trace.c, SQLite: everything recorded about one request, following the approvals and
 *    escalations its records name to the records of the operators who decided them.
 *
 * How a filter is read (audit_scan_open): always in seq order, in seq windows
 * (`seq > ? AND seq <= ?`), never sorted.
 *  - request_id, or agent: their index: an index on one column is ordered by (value, seq),
 *    so each window is a range of it, already in seq order;
 *  - anything else: the table itself (its rowid is the seq).
 *  - since/until first narrow the seqs to read: the ts index gives, in one index-only pass
 *    over the time range (at most AUDIT_TS_BOUND_MAX entries, or no bound is taken), the
 *    lowest and highest seq any record of the range has.  Exact whatever the clocks did:
 *    records are in seq order, not necessarily in ts order, and no record outside
 *    [lowest, highest] is in the range.
 * The ts comparisons in the windows are written `+ts`, so that SQLite never reads them
 * through the ts index: a ts range of unknown size sorted by seq is unbounded work.
 *
 * Semantics: since is inclusive, until exclusive ([since, until)), both compared with the
 * record's `ts` (RFC 3339 UTC, microseconds).  A run never reads past the head the cursor
 * saw when it opened: records appended meanwhile belong to the next query.
 *
 * Threads: any thread, each cursor on one thread at a time, on a connection it owns.
 */
#ifndef PEP_AUDIT_QUERY_H
#define PEP_AUDIT_QUERY_H

#include "pep/common.h"

#include <sqlite3.h>
#include <sys/types.h>

#define AUDIT_QUERY_LIMIT_DEFAULT 100
#define AUDIT_QUERY_LIMIT_MAX 1000
#define AUDIT_FILTER_VALUE_MAX 1024 /* bytes of one string filter value */
/* A time range of at most this many records bounds the seqs a scan reads (query.h). */
#define AUDIT_TS_BOUND_MAX 500000

/* What the filters are parsed for: a query page (`limit`), or an export (`format`). */
enum audit_filter_mode { AUDIT_FILTER_QUERY, AUDIT_FILTER_EXPORT };

enum audit_export_format { AUDIT_EXPORT_NONE, AUDIT_EXPORT_NDJSON, AUDIT_EXPORT_CSV };

/* The string filters, in the order of their SQL fragments (and of the copy columns). */
enum audit_filter_field {
    AUDIT_F_AGENT,
    AUDIT_F_TENANT,
    AUDIT_F_ACTION,
    AUDIT_F_DECISION,
    AUDIT_F_CODE,
    AUDIT_F_KIND,
    AUDIT_F_REQUEST_ID,
    AUDIT_F_COUNT
};

/* A parsed filter.  Zero it, then audit_filter_set each parameter, then audit_filter_check.
 * Owns its strings: audit_filter_clear frees them. */
struct audit_filter {
    char *eq[AUDIT_F_COUNT];         /* column = value, NULL: not filtered */
    char since[32];                  /* the ts column's form of since ("" when not given) */
    char until[32];                  /* likewise until */
    int64_t after_seq;               /* rows with seq > after_seq (0: from the start) */
    int limit;                       /* query: rows per page (0 until set: the default applies) */
    enum audit_export_format format; /* export only */
    unsigned given;                  /* bits (1 << audit_filter_param) of what was set */
};

/* The query parameters by name: audit_filter_param_name gives "agent", "since", … */
enum audit_filter_param {
    AUDIT_P_AGENT,
    AUDIT_P_TENANT,
    AUDIT_P_ACTION,
    AUDIT_P_DECISION,
    AUDIT_P_CODE,
    AUDIT_P_KIND,
    AUDIT_P_REQUEST_ID,
    AUDIT_P_SINCE,
    AUDIT_P_UNTIL,
    AUDIT_P_AFTER_SEQ,
    AUDIT_P_LIMIT,
    AUDIT_P_FORMAT,
    AUDIT_P_COUNT
};
const char *audit_filter_param_name(enum audit_filter_param p);

/*
 * Sets the parameter key to value.  Returns 0, or PEP_EINVAL with why (a message naming
 * the parameter and what it must be, for a 400 answer) when the key is not a parameter of
 * mode, is given twice, or its value is malformed: decision not allow|deny, kind not one of
 * decision|outcome|admin|system, code not [a-z0-9_], a string filter empty, longer than
 * AUDIT_FILTER_VALUE_MAX or holding a control character, since/until not RFC 3339,
 * after_seq not a non-negative integer, limit not 1..AUDIT_QUERY_LIMIT_MAX, format not
 * ndjson|csv.  PEP_ENOMEM when a copy cannot be made.  Pure.
 */
int audit_filter_set(struct audit_filter *f, enum audit_filter_mode mode, const char *key,
                     const char *value, char *why, size_t why_cap);

/* The checks across parameters, once all are set: an export needs a format; since must be
 * before until.  Fills the default limit.  0, or PEP_EINVAL with why.  Pure. */
int audit_filter_check(struct audit_filter *f, enum audit_filter_mode mode, char *why,
                       size_t why_cap);

void audit_filter_clear(struct audit_filter *f);

/* ---- SQL ------------------------------------------------------------------------------------ */

/* Which columns a statement returns: seq and record (query, trace), or every column
 * (export: seq, record, prev_hash, hash, then ts … request_id as AUDIT_EXPORT_COLUMNS). */
enum audit_sql_columns { AUDIT_SQL_RECORDS, AUDIT_SQL_EXPORT };

#define AUDIT_SQL_MAX_ARGS 16

/*
 * A statement for a filter.  Its parameters are, in order: ?1 the seq the rows come
 * after, ?2 the last seq they may have, then one per filter, then the LIMIT, which
 * audit_sql_bind fills.  args holds the filters' values only (borrowed from the filter,
 * which must outlive the statement's use).
 */
struct audit_sql {
    char text[1024];
    const char *args[AUDIT_SQL_MAX_ARGS]; /* the filters' values (text), bound as ?3 … */
    size_t nargs;
    int limit_slot; /* the LIMIT's parameter number */
};

/* Builds the statement of f for cols.  Pure. */
void audit_sql_build(const struct audit_filter *f, enum audit_sql_columns cols,
                     struct audit_sql *out);

/* Binds q's values to st (prepared from q->text) with after, last and limit.  SQLite's
 * code. */
int audit_sql_bind(sqlite3_stmt *st, const struct audit_sql *q, int64_t after, int64_t last,
                   int64_t limit);

/* ---- encoders ------------------------------------------------------------------------------- */

/* A growable byte buffer.  failed is set (and stays) when memory ran out. */
struct audit_buf {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
};
void audit_buf_add(struct audit_buf *b, const char *s, size_t len);
void audit_buf_str(struct audit_buf *b, const char *s);
void audit_buf_free(struct audit_buf *b);

/* s as a JSON string, quotes included: '"', '\\' and control characters escaped, every
 * other byte as it is (s is UTF-8). */
void audit_buf_json_string(struct audit_buf *b, const char *s, size_t len);
/* One CSV field (RFC 4180): as it is, or quoted with its quotes doubled when it holds
 * ',', '"', CR or LF. */
void audit_buf_csv_field(struct audit_buf *b, const char *s, size_t len);

/* The CSV export's columns, in order; the header row is them joined by ',' and CRLF. */
#define AUDIT_EXPORT_COLUMNS                                                                       \
    "seq,ts,kind,agent,tenant,action,decision,code,request_id,record,prev_hash,hash"

/* One exported row, as an export statement (AUDIT_SQL_EXPORT) returns it. */
struct audit_row {
    int64_t seq;
    const char *record;
    size_t record_len;
    const uint8_t *prev_hash; /* 32 bytes, or NULL when the column is not 32 bytes */
    const uint8_t *hash;
    const char *copies[8]; /* ts, kind, agent, tenant, action, decision, code, request_id
                              (NULL: SQL NULL) */
};

/* {"seq":N,"record":"…","prev_hash":"hex","hash":"hex"} and '\n' (SPEC 8). */
void audit_buf_ndjson_row(struct audit_buf *b, const struct audit_row *row);
/* The row's fields in AUDIT_EXPORT_COLUMNS order, CRLF-terminated. */
void audit_buf_csv_row(struct audit_buf *b, const struct audit_row *row);

/* ---- the cursor (scan.c) -------------------------------------------------------------------- */

/* The bounds of a statement window, in seqs. */
#define AUDIT_SCAN_WINDOW_MIN 1024
#define AUDIT_SCAN_WINDOW_MAX (INT64_C(1) << 22)

struct audit_scan {
    sqlite3 *db;          /* a read-only connection, not owned */
    sqlite3_stmt *st;     /* the filter's statement */
    struct audit_sql sql; /* its text and values (borrowed from the filter) */
    int64_t after;        /* every matching row with seq <= after was handed out */
    int64_t head;         /* the last seq the scan reads: the head when it opened, or the highest
                             seq of the time range when that is lower */
    int64_t window;       /* seqs per statement run, adapted to the time a run takes */
};

/*
 * Opens a cursor over the rows of db matching f (whose strings must outlive it), after
 * f->after_seq, up to the head as it is now, narrowed to the seqs of the time range when
 * since/until are given (one bounded index-only pass).  Returns 0, or PEP_EDB with err (db
 * is not an audit store, SQLite failed).
 */
int audit_scan_open(struct audit_scan *sc, sqlite3 *db, const struct audit_filter *f,
                    enum audit_sql_columns cols, struct pep_err *err);

/* Called for each row, on the statement positioned on it.  0: go on; 1: stop after this
 * row; a negative code: stop, the run fails with it. */
typedef int (*audit_scan_row_fn)(void *arg, sqlite3_stmt *st);

/*
 * Hands out the next matching rows, in seq order, until `want` rows were handed out, row
 * asked to stop, budget_us of time passed (checked between statement runs; < 0: no
 * budget), or the head was reached.  *got: the rows handed out.  Returns 0, or a negative
 * code (row's, or PEP_EDB with err).  Each statement run is its own read transaction.
 */
int audit_scan_next(struct audit_scan *sc, int64_t want, int64_t budget_us, audit_scan_row_fn row,
                    void *arg, int64_t *got, struct pep_err *err);

/* Whether every row up to the head has been read. */
bool audit_scan_done(const struct audit_scan *sc);

void audit_scan_close(struct audit_scan *sc);

/*
 * One page of a query (SPEC 6.3, 8): appends to out the answer
 * {"records":[<stored record texts, byte for byte>],"next_after_seq":N|null}.  At most
 * f->limit records, oldest first.  next_after_seq is the cursor to go on from when more
 * may follow: the seq of the last record when the page is full, or — when budget_us ran
 * out first — the last seq examined (a page may then hold fewer records than the limit,
 * even none); null once the head was reached.  Returns 0, or a negative code with err.
 */
int audit_query_page(sqlite3 *db, const struct audit_filter *f, int64_t budget_us,
                     struct audit_buf *out, struct pep_err *err);

/* ---- the request trace (trace.c) ------------------------------------------------------------ */

#define AUDIT_TRACE_MAX_RECORDS 1000
#define AUDIT_TRACE_MAX_LINKS 16 /* approvals, escalations and requests followed, each */

/*
 * Everything recorded about request_id, oldest first, as
 * {"request_id":"…","records":[…],"complete":true|false}: its own records; the records of
 * every approval its records name (by `approval_id`: the request that created it, the
 * operator's decision, the re-sends that presented it, the one that used it) and of every
 * escalation (by `escalation_id`: opened, resolved), and the records of the requests found
 * so (their outcomes, with every attempt); and the original of an idempotent replay
 * (`replay_of`).  complete is false when a bound cut the search short (AUDIT_TRACE_MAX_*,
 * budget_us).  Returns 0, PEP_ENOTFOUND when no record has request_id, or a negative code
 * with err.
 */
int audit_trace(sqlite3 *db, const char *request_id, int64_t budget_us, struct audit_buf *out,
                struct pep_err *err);

#endif
