/*
 * trace.c — everything the audit log holds about one request (see audit_trace in query.h):
 * what a reviewer pulls up when an agent quotes its Pep-Audit-Seq receipt.
 *
 * The search is a closure over three kinds of links, each followed once:
 *  - a request id: its records, through the request_id index;
 *  - an approval id (a record's top-level `approval_id`): the records that name it — the
 *    request that created it, the operator's approve/deny (kind admin, another request
 *    id), every re-send that presented it, the one that used it;
 *  - an escalation id (`escalation_id`): the records that name it — opened (system, the
 *    request's own id) and resolved (admin, the operator's request).
 * Every record found adds its own request id (an approval's re-send brings its outcome
 * with every attempt) and the ids it names; an idempotent replay adds its original
 * (`replay_of`).
 *
 * Approval and escalation ids have no index: their records are found in a time window,
 * through the ts index, and matched on the record text (`instr` first, then json_extract
 * on the few rows that pass).  The windows come from pep's own state tables when they are
 * there — an approval lives from created_at to expires_at (decided_at and used_at fall
 * inside), an escalation's resolution is at resolved_at — widened by TRACE_SLACK_US on each
 * side for the time between a state change and its record's ts; without those tables (a
 * bare audit store), from the ts of the records already found, up to TRACE_FALLBACK_US
 * later.  Every statement runs under a progress handler that stops it at the deadline:
 * `complete` is then false, as it is when a cap (AUDIT_TRACE_MAX_*) cut the search.
 *
 * Threads: the caller's, on a read-only connection it owns.
 */
#include "audit/query.h"
#include "pep/util.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRACE_SLACK_US (60 * INT64_C(1000000))
#define TRACE_FALLBACK_US (3600 * INT64_C(1000000))

/* One followed id and whether it has been looked up. */
struct trace_link {
    char *id;
    bool done;
};

struct trace_links {
    struct trace_link items[AUDIT_TRACE_MAX_LINKS * 2];
    size_t len;
    size_t cap; /* how many may be followed */
};

struct trace_record {
    int64_t seq;
    int64_t ts_us; /* 0 when the record has no readable ts */
    char *text;
};

struct trace {
    sqlite3 *db;
    int64_t deadline; /* monotonic us */
    bool complete;
    struct trace_record *recs;
    size_t nrecs, cap_recs;
    struct trace_links requests, approvals, escalations;
};

static int trace_progress(void *arg) {
    const struct trace *t = arg;
    return pep_mono_us() > t->deadline; /* non-zero interrupts the statement */
}

/* Adds id to links unless there or full (then the trace is incomplete). */
static void trace_link_add(struct trace *t, struct trace_links *links, const char *id) {
    if (!id || !*id) return;
    for (size_t i = 0; i < links->len; i++)
        if (strcmp(links->items[i].id, id) == 0) return;
    char *copy = links->len < links->cap ? strdup(id) : NULL;
    if (!copy) {
        t->complete = false;
        return;
    }
    links->items[links->len++] = (struct trace_link){.id = copy};
}

static void trace_links_free(struct trace_links *links) {
    for (size_t i = 0; i < links->len; i++)
        free(links->items[i].id);
}

/* Adds the record (seq, text) unless already found, and the links it names. */
static int trace_add(struct trace *t, int64_t seq, const char *text, size_t len) {
    for (size_t i = 0; i < t->nrecs; i++)
        if (t->recs[i].seq == seq) return 0;
    if (t->nrecs == AUDIT_TRACE_MAX_RECORDS) {
        t->complete = false;
        return 0;
    }
    if (t->nrecs == t->cap_recs) {
        size_t cap = t->cap_recs ? t->cap_recs * 2 : 32;
        struct trace_record *grown = realloc(t->recs, cap * sizeof *grown);
        if (!grown) return PEP_ENOMEM;
        t->recs = grown;
        t->cap_recs = cap;
    }
    char *copy = strndup(text, len);
    if (!copy) return PEP_ENOMEM;
    struct trace_record *r = &t->recs[t->nrecs++];
    *r = (struct trace_record){.seq = seq, .text = copy};
    json_t *rec = json_loadb(text, len, 0, NULL);
    const char *ts = json_string_value(json_object_get(rec, "ts"));
    if (ts && pep_parse_rfc3339(ts, &r->ts_us) != 0) r->ts_us = 0;
    trace_link_add(t, &t->requests, json_string_value(json_object_get(rec, "request_id")));
    trace_link_add(t, &t->requests, json_string_value(json_object_get(rec, "replay_of")));
    trace_link_add(t, &t->approvals, json_string_value(json_object_get(rec, "approval_id")));
    trace_link_add(t, &t->escalations, json_string_value(json_object_get(rec, "escalation_id")));
    json_decref(rec);
    return 0;
}

/* Runs st (bound) and adds every (seq, record) row.  A statement stopped by the deadline
 * makes the trace incomplete; other SQLite failures are errors. */
static int trace_collect(struct trace *t, sqlite3_stmt *st, struct pep_err *err) {
    int src, rc = 0;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        const char *text = (const char *)sqlite3_column_text(st, 1);
        if (text && (rc = trace_add(t, sqlite3_column_int64(st, 0), text,
                                    (size_t)sqlite3_column_bytes(st, 1))) != 0)
            break;
    }
    if (rc == 0 && src == SQLITE_INTERRUPT)
        t->complete = false;
    else if (rc == 0 && src != SQLITE_DONE)
        rc = pep_err_set(err, PEP_EDB, "audit: trace: %s", sqlite3_errmsg(t->db));
    else if (rc != 0)
        pep_err_set(err, rc, "audit: trace: out of memory");
    sqlite3_finalize(st);
    return rc;
}

static int trace_request(struct trace *t, const char *id, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(t->db,
                           "SELECT seq, record FROM audit WHERE request_id = ?1 ORDER BY seq"
                           " LIMIT ?2",
                           -1, &st, NULL) != SQLITE_OK) {
        sqlite3_finalize(st);
        return pep_err_set(err, PEP_EDB, "audit: trace: %s", sqlite3_errmsg(t->db));
    }
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, AUDIT_TRACE_MAX_RECORDS + 1);
    return trace_collect(t, st, err);
}

/* The earliest and latest ts (us) of the records found so far that name id under key. */
static bool trace_known_span(const struct trace *t, const char *key, const char *id, int64_t *lo,
                             int64_t *hi) {
    bool any = false;
    for (size_t i = 0; i < t->nrecs; i++) {
        if (!t->recs[i].ts_us) continue;
        json_t *rec = json_loads(t->recs[i].text, 0, NULL);
        const char *v = json_string_value(json_object_get(rec, key));
        if (v && strcmp(v, id) == 0) {
            *lo = any && *lo < t->recs[i].ts_us ? *lo : t->recs[i].ts_us;
            *hi = any && *hi > t->recs[i].ts_us ? *hi : t->recs[i].ts_us;
            any = true;
        }
        json_decref(rec);
    }
    return any;
}

/* Integers of one row of a state table (sql: one ?1 for the id); false when the table or
 * the row is not there.  Text columns go to texts[] (malloc'd, may be NULL). */
static bool trace_state_row(struct trace *t, const char *sql, const char *id, int64_t *ints,
                            size_t nints, char **texts, size_t ntexts) {
    sqlite3_stmt *st = NULL;
    bool found = false;
    if (sqlite3_prepare_v2(t->db, sql, -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW) {
            found = true;
            for (size_t i = 0; i < nints; i++)
                ints[i] = sqlite3_column_int64(st, (int)i);
            for (size_t i = 0; i < ntexts; i++) {
                const char *v = (const char *)sqlite3_column_text(st, (int)(nints + i));
                texts[i] = v ? strdup(v) : NULL;
            }
        }
    }
    sqlite3_finalize(st);
    return found;
}

/* The records of kinds (an SQL list of fixed names) whose top-level `key` is id, with ts in
 * [lo_us, hi_us], through the ts index. */
static int trace_window(struct trace *t, const char *sql_kinds, const char *key, const char *id,
                        int64_t lo_us, int64_t hi_us, struct pep_err *err) {
    char sql[512], lo[32], hi[32], path[64];
    struct audit_buf pattern = {0};
    /* The member as canonical JSON writes it: "key":"id" (the id escaped the same way). */
    audit_buf_json_string(&pattern, key, strlen(key));
    audit_buf_add(&pattern, ":", 1);
    audit_buf_json_string(&pattern, id, strlen(id));
    if (pattern.failed) return pep_err_set(err, PEP_ENOMEM, "audit: trace: out of memory");
    pep_format_rfc3339_us(lo_us, lo);
    pep_format_rfc3339_us(hi_us, hi);
    snprintf(path, sizeof path, "$.%s", key);
    /* Fixed fragments only: sql_kinds and key are this file's constants. */
    snprintf(sql, sizeof sql,
             "SELECT seq, record FROM audit INDEXED BY audit_ts WHERE ts >= ?1 AND ts <= ?2"
             " AND kind IN (%s) AND instr(record, ?3) > 0 AND json_extract(record, ?4) = ?5"
             " ORDER BY seq LIMIT ?6",
             sql_kinds);
    sqlite3_stmt *st = NULL;
    int rc = 0;
    if (sqlite3_prepare_v2(t->db, sql, -1, &st, NULL) != SQLITE_OK) {
        /* A store without the ts index cannot be searched by time: say so, not fail. */
        sqlite3_finalize(st);
        t->complete = false;
    } else {
        sqlite3_bind_text(st, 1, lo, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, hi, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, pattern.data, (int)pattern.len, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, path, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 6, AUDIT_TRACE_MAX_RECORDS + 1);
        rc = trace_collect(t, st, err);
    }
    audit_buf_free(&pattern);
    return rc;
}

static int trace_approval(struct trace *t, const char *id, struct pep_err *err) {
    int64_t v[4] = {0}; /* created, expires, decided, used */
    char *ids[2] = {NULL, NULL};
    int64_t lo, hi;
    if (trace_state_row(t,
                        "SELECT created_at_us, expires_at_us, IFNULL(decided_at_us, 0),"
                        " IFNULL(used_at_us, 0), request_id, used_by FROM approvals"
                        " WHERE id = ?1",
                        id, v, 4, ids, 2)) {
        trace_link_add(t, &t->requests, ids[0]);
        trace_link_add(t, &t->requests, ids[1]);
        lo = v[0];
        hi = v[1] > v[2] ? v[1] : v[2];
        hi = hi > v[3] ? hi : v[3];
    } else if (trace_known_span(t, "approval_id", id, &lo, &hi)) {
        hi += TRACE_FALLBACK_US;
    } else {
        return 0;
    }
    free(ids[0]);
    free(ids[1]);
    return trace_window(t, "'decision', 'admin'", "approval_id", id, lo - TRACE_SLACK_US,
                        hi + TRACE_SLACK_US, err);
}

static int trace_escalation(struct trace *t, const char *id, struct pep_err *err) {
    int64_t v[2] = {0}; /* created, resolved */
    char *ids[1] = {NULL};
    int64_t lo, hi;
    if (trace_state_row(t,
                        "SELECT created_at_us, IFNULL(resolved_at_us, 0), request_id"
                        " FROM escalations WHERE id = ?1",
                        id, v, 2, ids, 1)) {
        trace_link_add(t, &t->requests, ids[0]);
        free(ids[0]);
        if (!v[1]) return 0; /* open: the opening record is the request's own */
        lo = hi = v[1];
    } else if (trace_known_span(t, "escalation_id", id, &lo, &hi)) {
        hi += TRACE_FALLBACK_US;
    } else {
        return 0;
    }
    return trace_window(t, "'system', 'admin'", "escalation_id", id, lo - TRACE_SLACK_US,
                        hi + TRACE_SLACK_US, err);
}

/* Follows every link not yet followed; *progress when one was. */
static int trace_step(struct trace *t, bool *progress, struct pep_err *err) {
    int rc = 0;
    *progress = false;
    for (size_t i = 0; rc == 0 && i < t->requests.len; i++) {
        if (t->requests.items[i].done) continue;
        t->requests.items[i].done = *progress = true;
        rc = trace_request(t, t->requests.items[i].id, err);
    }
    for (size_t i = 0; rc == 0 && i < t->approvals.len; i++) {
        if (t->approvals.items[i].done) continue;
        t->approvals.items[i].done = *progress = true;
        rc = trace_approval(t, t->approvals.items[i].id, err);
    }
    for (size_t i = 0; rc == 0 && i < t->escalations.len; i++) {
        if (t->escalations.items[i].done) continue;
        t->escalations.items[i].done = *progress = true;
        rc = trace_escalation(t, t->escalations.items[i].id, err);
    }
    return rc;
}

static int trace_by_seq(const void *a, const void *b) {
    const struct trace_record *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

int audit_trace(sqlite3 *db, const char *request_id, int64_t budget_us, struct audit_buf *out,
                struct pep_err *err) {
    struct trace t = {.db = db, .deadline = pep_mono_us() + budget_us, .complete = true};
    t.requests.cap = AUDIT_TRACE_MAX_LINKS * 2; /* the request, its re-sends, operators' */
    t.approvals.cap = AUDIT_TRACE_MAX_LINKS;
    t.escalations.cap = AUDIT_TRACE_MAX_LINKS;
    int rc = 0;
    sqlite3_progress_handler(db, 1000, trace_progress, &t);
    t.requests.items[t.requests.len++] = (struct trace_link){.id = strdup(request_id)};
    if (!t.requests.items[0].id) rc = pep_err_set(err, PEP_ENOMEM, "audit: out of memory");
    if (rc == 0) rc = trace_request(&t, request_id, err);
    t.requests.items[0].done = true;
    if (rc == 0 && t.nrecs == 0)
        rc = t.complete ? PEP_ENOTFOUND : pep_err_set(err, PEP_EDB, "audit: trace: timed out");
    for (bool progress = true; rc == 0 && progress && pep_mono_us() <= t.deadline;)
        rc = trace_step(&t, &progress, err);
    /* Links left unfollowed at the deadline make the trace incomplete. */
    for (size_t i = 0; i < t.approvals.len; i++)
        t.complete = t.complete && t.approvals.items[i].done;
    for (size_t i = 0; i < t.escalations.len; i++)
        t.complete = t.complete && t.escalations.items[i].done;
    for (size_t i = 0; i < t.requests.len; i++)
        t.complete = t.complete && t.requests.items[i].done;
    sqlite3_progress_handler(db, 0, NULL, NULL);
    if (rc == 0) {
        qsort(t.recs, t.nrecs, sizeof *t.recs, trace_by_seq);
        audit_buf_str(out, "{\"request_id\":");
        audit_buf_json_string(out, request_id, strlen(request_id));
        audit_buf_str(out, ",\"records\":[");
        for (size_t i = 0; i < t.nrecs; i++) {
            if (i) audit_buf_add(out, ",", 1);
            audit_buf_str(out, t.recs[i].text);
        }
        audit_buf_str(out, t.complete ? "],\"complete\":true}" : "],\"complete\":false}");
        if (out->failed) rc = pep_err_set(err, PEP_ENOMEM, "audit: out of memory");
    }
    for (size_t i = 0; i < t.nrecs; i++)
        free(t.recs[i].text);
    free(t.recs);
    trace_links_free(&t.requests);
    trace_links_free(&t.approvals);
    trace_links_free(&t.escalations);
    return rc;
}
