/*
 * escalations.c — the human escalation queue: the in-memory store, its SQLite rows and its
 * JSON views (see escalations.h for the states, the bounds and the publish/undo protocol).
 *
 * Memory layout.  Each escalation lives once, on the heap, owned by `by_id`; `order` holds
 * the same pointers sorted by (created_at, id), so that lists run oldest first without
 * sorting (ids are increasing ULIDs and creation times mostly increase, so an insert is
 * nearly always an append).
 *
 * Invariants (under `lock`): every escalation of by_id is in order exactly once and vice
 * versa; `open` and `resolved` count the entries in each state; an open entry has no
 * resolved_by, resolved_at or note, a resolved one has resolved_by and resolved_at;
 * resolved <= max_resolved after every call that changes the store (open may exceed
 * max_open only through load or undo: those record what the database already says).
 *
 * The lock is held for memory work only (no I/O, no allocation-heavy JSON outside the
 * list); creation copies its answer before taking it, so that an outage's many creates
 * contend briefly.
 */
#include "pep/escalations.h"
#include "pep/sqlrun.h"
#include "pep/strmap.h"
#include "pep/util.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct escalation_store {
    pthread_mutex_t lock;      /* guards by_id, order, the counts and every entry's fields */
    struct strmap *by_id;      /* id → struct escalation * (owns them) */
    struct escalation **order; /* every entry, sorted by (created_at_us, id) */
    size_t len, cap;
    size_t open, resolved;         /* entries in each state */
    size_t max_open, max_resolved; /* the bounds (escalations.h) */
};

/* ---- copies -------------------------------------------------------------------------- */

static char *dup_or_null(const char *s, bool *ok) {
    if (!s) return NULL;
    char *d = strdup(s);
    if (!d) *ok = false;
    return d;
}

int escalation_copy(struct escalation *dst, const struct escalation *src) {
    bool ok = true;
    *dst = *src;
    dst->chain = dup_or_null(src->chain, &ok);
    dst->request_id = dup_or_null(src->request_id, &ok);
    dst->agent = dup_or_null(src->agent, &ok);
    dst->action = dup_or_null(src->action, &ok);
    dst->tenant = dup_or_null(src->tenant, &ok);
    /* A deep copy: a copy outlives the store's entry and may be read on another thread. */
    dst->attempts = src->attempts ? json_deep_copy(src->attempts) : NULL;
    if (src->attempts && !dst->attempts) ok = false;
    dst->resolved_by = dup_or_null(src->resolved_by, &ok);
    dst->note = dup_or_null(src->note, &ok);
    if (ok) return 0;
    escalation_clear(dst);
    return PEP_ENOMEM;
}

void escalation_clear(struct escalation *e) {
    if (!e) return;
    free(e->chain);
    free(e->request_id);
    free(e->agent);
    free(e->action);
    free(e->tenant);
    json_decref(e->attempts);
    free(e->resolved_by);
    free(e->note);
    memset(e, 0, sizeof *e);
}

struct escalation *escalation_dup(const struct escalation *src) {
    struct escalation *e = malloc(sizeof *e);
    if (e && escalation_copy(e, src) != 0) {
        free(e);
        return NULL;
    }
    return e;
}

void escalation_free(void *v) {
    escalation_clear(v);
    free(v);
}

/* ---- states ---------------------------------------------------------------------------- */

static const char *const state_names[] = {
    [ESCALATION_OPEN] = "open", [ESCALATION_RESOLVED] = "resolved"};

const char *escalation_state_name(enum escalation_state s) {
    return (unsigned)s < PEP_ARRAY_LEN(state_names) ? state_names[s] : "unknown";
}

int escalation_state_parse(const char *s, enum escalation_state *out) {
    for (size_t i = 0; s && i < PEP_ARRAY_LEN(state_names); i++)
        if (strcmp(s, state_names[i]) == 0) {
            *out = (enum escalation_state)i;
            return 0;
        }
    return PEP_EINVAL;
}

/* ---- the store ------------------------------------------------------------------------ */

struct escalation_store *escalation_store_new(size_t max_open, size_t max_resolved) {
    struct escalation_store *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->max_open = max_open ? max_open : ESCALATION_MAX_OPEN;
    s->max_resolved = max_resolved ? max_resolved : ESCALATION_MAX_RESOLVED;
    s->by_id = strmap_new();
    if (!s->by_id || pthread_mutex_init(&s->lock, NULL) != 0) {
        strmap_free(s->by_id, NULL);
        free(s);
        return NULL;
    }
    return s;
}

void escalation_store_free(struct escalation_store *s) {
    if (!s) return;
    strmap_free(s->by_id, escalation_free);
    free(s->order);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static bool order_before(const struct escalation *x, const struct escalation *y) {
    return x->created_at_us != y->created_at_us ? x->created_at_us < y->created_at_us
                                                : strcmp(x->id, y->id) < 0;
}

/* Where e is, or would be, in order.  Locked. */
static size_t order_position(const struct escalation_store *s, const struct escalation *e) {
    size_t lo = 0, hi = s->len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (order_before(s->order[mid], e))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static size_t *state_count(struct escalation_store *s, enum escalation_state st) {
    return st == ESCALATION_OPEN ? &s->open : &s->resolved;
}

/* Publishes e (taking it over on success).  Locked.  0, PEP_EEXISTS or PEP_ENOMEM (then
 * nothing changed).  Bounds are the caller's. */
static int store_insert(struct escalation_store *s, struct escalation *e) {
    if (strmap_get(s->by_id, e->id)) return PEP_EEXISTS;
    if (s->len == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        struct escalation **o = realloc(s->order, cap * sizeof *o);
        if (!o) return PEP_ENOMEM;
        s->order = o;
        s->cap = cap;
    }
    if (strmap_put(s->by_id, e->id, e, NULL) != 0) return PEP_ENOMEM;
    size_t i = order_position(s, e);
    memmove(s->order + i + 1, s->order + i, (s->len - i) * sizeof *s->order);
    s->order[i] = e;
    s->len++;
    (*state_count(s, e->state))++;
    return 0;
}

/* Unpublishes e (the caller frees it).  Locked. */
static void store_remove(struct escalation_store *s, struct escalation *e) {
    size_t i = order_position(s, e);
    assert(i < s->len && s->order[i] == e);
    memmove(s->order + i, s->order + i + 1, (s->len - i - 1) * sizeof *s->order);
    s->len--;
    strmap_remove(s->by_id, e->id);
    (*state_count(s, e->state))--;
}

/* Moves e to state st with these resolution fields, taking over by and note and freeing
 * the old ones.  Locked. */
static void store_set_state(struct escalation_store *s, struct escalation *e,
                            enum escalation_state st, char *by, char *note, int64_t at_us) {
    (*state_count(s, e->state))--;
    (*state_count(s, st))++;
    free(e->resolved_by);
    free(e->note);
    e->state = st;
    e->resolved_by = by;
    e->note = note;
    e->resolved_at_us = at_us;
}

static bool resolved_before(const struct escalation *x, const struct escalation *y) {
    return x->resolved_at_us != y->resolved_at_us ? x->resolved_at_us < y->resolved_at_us
                                                  : strcmp(x->id, y->id) < 0;
}

/* Keeps resolved <= max_resolved by dropping the oldest resolutions other than keep (the
 * one just resolved: its record may still fail and need the entry for the undo).  The
 * load keeps the newest by the same order, so a restart answers alike.  Locked; O(n) per
 * drop, at the pace of operators' resolutions. */
static void store_bound_resolved(struct escalation_store *s, const struct escalation *keep) {
    while (s->resolved > s->max_resolved) {
        struct escalation *oldest = NULL;
        for (size_t i = 0; i < s->len; i++) {
            struct escalation *e = s->order[i];
            if (e != keep && e->state == ESCALATION_RESOLVED &&
                (!oldest || resolved_before(e, oldest)))
                oldest = e;
        }
        if (PEP_NEVER(!oldest)) return;
        store_remove(s, oldest);
        escalation_free(oldest);
    }
}

static int validate_request(const struct escalation_request *in) {
    const char *const strings[] = {in->chain, in->request_id, in->agent, in->action, in->tenant};
    for (size_t i = 0; i < PEP_ARRAY_LEN(strings); i++)
        if (!strings[i] || !strings[i][0]) return PEP_EINVAL;
    if (in->last_status != 0 && (in->last_status < 100 || in->last_status > 599)) return PEP_EINVAL;
    if (in->attempts) {
        if (!json_is_array(in->attempts)) return PEP_EINVAL;
        for (size_t i = 0; i < json_array_size(in->attempts); i++)
            if (!json_is_object(json_array_get(in->attempts, i))) return PEP_EINVAL;
    }
    return 0;
}

/* Builds the escalation a request opens (outside the lock: only publication needs it). */
static struct escalation *escalation_new(const struct escalation_request *in, int64_t now_us) {
    struct escalation *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    bool ok = true;
    pep_request_id(e->id);
    e->state = ESCALATION_OPEN;
    e->chain = dup_or_null(in->chain, &ok);
    e->request_id = dup_or_null(in->request_id, &ok);
    e->agent = dup_or_null(in->agent, &ok);
    e->action = dup_or_null(in->action, &ok);
    e->tenant = dup_or_null(in->tenant, &ok);
    e->attempts = in->attempts ? json_deep_copy(in->attempts) : json_array();
    e->last_status = in->last_status;
    e->created_at_us = now_us;
    if (ok && e->attempts) return e;
    escalation_free(e);
    return NULL;
}

int escalation_create(struct escalation_store *s, const struct escalation_request *in,
                      int64_t now_us, struct escalation *out) {
    memset(out, 0, sizeof *out);
    int rc = validate_request(in);
    if (rc != 0) return rc;
    struct escalation *e = escalation_new(in, now_us);
    if (!e) return PEP_ENOMEM;
    /* Copy first: an escalation published without the caller holding its copy could not
     * be written (apply_insert's argument) nor forgotten. */
    rc = escalation_copy(out, e);
    if (rc == 0) {
        pthread_mutex_lock(&s->lock);
        rc = s->open >= s->max_open ? PEP_EUNAVAILABLE : store_insert(s, e);
        pthread_mutex_unlock(&s->lock);
    }
    if (rc != 0) {
        escalation_clear(out);
        escalation_free(e);
    }
    return rc;
}

void escalation_forget(struct escalation_store *s, const char *id) {
    pthread_mutex_lock(&s->lock);
    struct escalation *e = id ? strmap_get(s->by_id, id) : NULL;
    if (e) store_remove(s, e);
    pthread_mutex_unlock(&s->lock);
    escalation_free(e);
}

int escalation_resolve(struct escalation_store *s, const char *id, const char *operator_id,
                       const char *note, int64_t now_us, enum escalation_resolve *verdict,
                       struct escalation *before, struct escalation *after) {
    memset(before, 0, sizeof *before);
    memset(after, 0, sizeof *after);
    if (!operator_id || !operator_id[0] || (note && strlen(note) > ESCALATION_NOTE_MAX))
        return PEP_EINVAL;
    bool ok = true;
    char *by = dup_or_null(operator_id, &ok), *text = dup_or_null(note, &ok);
    int rc = ok ? 0 : PEP_ENOMEM;

    pthread_mutex_lock(&s->lock);
    struct escalation *e = rc == 0 && id ? strmap_get(s->by_id, id) : NULL;
    if (rc == 0 && !e) rc = PEP_ENOTFOUND;
    if (rc == 0) rc = escalation_copy(before, e);
    if (rc == 0) {
        *verdict = e->state == ESCALATION_OPEN ? ESCALATION_RESOLVE_OK : ESCALATION_RESOLVE_ALREADY;
        if (*verdict == ESCALATION_RESOLVE_OK) {
            store_set_state(s, e, ESCALATION_RESOLVED, by, text, now_us);
            by = text = NULL;
        }
        if ((rc = escalation_copy(after, e)) != 0) {
            /* Nothing published without the caller's copy to write it. */
            if (*verdict == ESCALATION_RESOLVE_OK)
                store_set_state(s, e, ESCALATION_OPEN, NULL, NULL, 0);
            escalation_clear(before);
        } else if (*verdict == ESCALATION_RESOLVE_OK) {
            store_bound_resolved(s, e);
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(by);
    free(text);
    return rc;
}

void escalation_undo_resolve(struct escalation_store *s, const struct escalation *before) {
    /* Only an OK resolution (before open) is ever undone; undoing an ALREADY verdict's
     * before would reopen someone else's resolution. */
    if (before->state != ESCALATION_OPEN) return;
    pthread_mutex_lock(&s->lock);
    struct escalation *e = strmap_get(s->by_id, before->id);
    if (e && e->state == ESCALATION_RESOLVED) store_set_state(s, e, ESCALATION_OPEN, NULL, NULL, 0);
    pthread_mutex_unlock(&s->lock);
}

size_t escalation_store_prune(struct escalation_store *s, int64_t now_us) {
    size_t kept = 0, dropped = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->len; i++) {
        struct escalation *e = s->order[i];
        if (e->state == ESCALATION_RESOLVED && e->resolved_at_us <= now_us - ESCALATION_RETAIN_US) {
            strmap_remove(s->by_id, e->id);
            s->resolved--;
            escalation_free(e);
            dropped++;
        } else {
            s->order[kept++] = e;
        }
    }
    s->len = kept;
    pthread_mutex_unlock(&s->lock);
    return dropped;
}

int escalation_get(struct escalation_store *s, const char *id, struct escalation *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->lock);
    const struct escalation *e = id ? strmap_get(s->by_id, id) : NULL;
    int rc = e ? escalation_copy(out, e) : PEP_ENOTFOUND;
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* ---- SQLite ---------------------------------------------------------------------------- */

const char ESCALATIONS_SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS escalations ("
    " id TEXT PRIMARY KEY,"
    " state TEXT NOT NULL CHECK (state IN ('open', 'resolved')),"
    " chain TEXT NOT NULL, request_id TEXT NOT NULL, agent TEXT NOT NULL,"
    " action TEXT NOT NULL, tenant TEXT NOT NULL, attempts TEXT NOT NULL,"
    " last_status INTEGER, created_at_us INTEGER NOT NULL,"
    " resolved_by TEXT, resolved_at_us INTEGER, note TEXT,"
    /* The resolution fields exist exactly when resolved. */
    " CHECK ((state = 'open' AND resolved_by IS NULL AND resolved_at_us IS NULL"
    " AND note IS NULL) OR (state = 'resolved' AND resolved_by IS NOT NULL"
    " AND resolved_at_us IS NOT NULL)));"
    /* escalation_store_load reads the open ones and the recent resolutions. */
    "CREATE INDEX IF NOT EXISTS escalations_state ON escalations(state, resolved_at_us);";

int escalation_apply_insert(sqlite3 *db, void *arg) {
    const struct escalation *e = arg;
    if (e->state != ESCALATION_OPEN) return PEP_EINVAL;
    char *attempts = e->attempts ? json_dumps(e->attempts, JSON_COMPACT) : strdup("[]");
    if (!attempts) return PEP_ENOMEM;
    const struct sql_arg args[] = {SQL_S(e->id),    SQL_S(e->chain),       SQL_S(e->request_id),
                                   SQL_S(e->agent), SQL_S(e->action),      SQL_S(e->tenant),
                                   SQL_S(attempts), SQL_T(e->last_status), SQL_I(e->created_at_us)};
    int rc = sql_run(db,
                     "INSERT INTO escalations(id, state, chain, request_id, agent, action, tenant,"
                     " attempts, last_status, created_at_us) VALUES(?1, 'open', ?2, ?3, ?4, ?5,"
                     " ?6, ?7, ?8, ?9)",
                     args, (int)PEP_ARRAY_LEN(args), false);
    free(attempts);
    return rc;
}

int escalation_apply_resolve(sqlite3 *db, void *arg) {
    const struct escalation *e = arg;
    if (e->state != ESCALATION_RESOLVED || !e->resolved_by) return PEP_EINVAL;
    const struct sql_arg args[] = {SQL_S(e->id), SQL_S(e->resolved_by), SQL_I(e->resolved_at_us),
                                   SQL_S(e->note)};
    return sql_run(db,
                   "UPDATE escalations SET state = 'resolved', resolved_by = ?2,"
                   " resolved_at_us = ?3, note = ?4 WHERE id = ?1 AND state = 'open'",
                   args, (int)PEP_ARRAY_LEN(args), true);
}

static const char *column_text(sqlite3_stmt *st, int i) {
    return (const char *)sqlite3_column_text(st, i);
}

/* Builds an escalation from one row of escalation_store_load's SELECT.  0, PEP_EINVAL
 * (malformed) or PEP_ENOMEM. */
static int escalation_from_row(sqlite3_stmt *st, struct escalation **out) {
    struct escalation *e = calloc(1, sizeof *e);
    if (!e) return PEP_ENOMEM;
    bool ok = true;
    const char *id = column_text(st, 0);
    int rc = id && strlen(id) == ESCALATION_ID_SIZE - 1 &&
                     escalation_state_parse(column_text(st, 1), &e->state) == 0
                 ? 0
                 : PEP_EINVAL;
    if (rc == 0) {
        memcpy(e->id, id, sizeof e->id);
        e->chain = dup_or_null(column_text(st, 2), &ok);
        e->request_id = dup_or_null(column_text(st, 3), &ok);
        e->agent = dup_or_null(column_text(st, 4), &ok);
        e->action = dup_or_null(column_text(st, 5), &ok);
        e->tenant = dup_or_null(column_text(st, 6), &ok);
        const char *attempts = column_text(st, 7);
        e->attempts = attempts ? json_loads(attempts, 0, NULL) : NULL;
        int64_t status = sqlite3_column_int64(st, 8); /* NULL reads as 0 */
        e->last_status = status >= 100 && status <= 599 ? (int)status : 0;
        e->created_at_us = sqlite3_column_int64(st, 9);
        e->resolved_by = dup_or_null(column_text(st, 10), &ok);
        e->resolved_at_us = sqlite3_column_int64(st, 11);
        e->note = dup_or_null(column_text(st, 12), &ok);
        if (!ok)
            rc = PEP_ENOMEM;
        else if (!e->chain || !e->request_id || !e->agent || !e->action || !e->tenant ||
                 !json_is_array(e->attempts) || e->last_status != status ||
                 (e->state == ESCALATION_RESOLVED) != (e->resolved_by != NULL))
            rc = PEP_EINVAL;
    }
    if (rc != 0) {
        escalation_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

int escalation_store_load(struct escalation_store *s, sqlite3 *db, int64_t now_us,
                          struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    /* Oldest first, so that publishing appends; the resolved ones kept are those
     * store_bound_resolved and prune would have kept. */
    if (sqlite3_prepare_v2(db,
                           "SELECT id, state, chain, request_id, agent, action, tenant, attempts,"
                           " last_status, created_at_us, resolved_by, resolved_at_us, note"
                           " FROM escalations WHERE state = 'open' OR id IN (SELECT id FROM"
                           " escalations WHERE state = 'resolved' AND resolved_at_us > ?1"
                           " ORDER BY resolved_at_us DESC, id DESC LIMIT ?2)"
                           " ORDER BY created_at_us, id",
                           -1, &st, NULL) != SQLITE_OK ||
        sqlite3_bind_int64(st, 1, now_us - ESCALATION_RETAIN_US) != SQLITE_OK ||
        sqlite3_bind_int64(st, 2, (int64_t)s->max_resolved) != SQLITE_OK) {
        sqlite3_finalize(st);
        return pep_err_set(err, PEP_EDB, "escalations: %s", sqlite3_errmsg(db));
    }
    int rc = 0, step;
    while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
        struct escalation *e = NULL;
        rc = escalation_from_row(st, &e);
        if (rc == PEP_EINVAL)
            rc = pep_err_set(err, PEP_EDB, "escalations: row %s is malformed",
                             column_text(st, 0) ? column_text(st, 0) : "(null id)");
        else if (rc != 0)
            rc = pep_err_set(err, rc, "escalations: out of memory");
        if (rc == 0) {
            pthread_mutex_lock(&s->lock);
            rc = store_insert(s, e);
            pthread_mutex_unlock(&s->lock);
            if (rc != 0) {
                rc = pep_err_set(err, rc == PEP_EEXISTS ? PEP_EDB : rc,
                                 "escalations: cannot load %s: %s", e->id, pep_strerror(rc));
                escalation_free(e);
            }
        }
    }
    /* A read that stops early must fail the start rather than hide open escalations. */
    if (rc == 0 && step != SQLITE_DONE)
        rc = pep_err_set(err, PEP_EDB, "escalations: reading failed: %s", sqlite3_errmsg(db));
    sqlite3_finalize(st);
    return rc;
}

/* ---- JSON ------------------------------------------------------------------------------ */

static json_t *time_json(int64_t us) {
    char buf[32];
    pep_format_rfc3339_us(us, buf);
    return json_string(buf);
}

static json_t *time_or_null(int64_t us) {
    return us ? time_json(us) : json_null();
}

static json_t *status_json(const struct escalation *e) {
    return e->last_status ? json_integer(e->last_status) : json_null();
}

static json_t *attempts_json(const struct escalation *e) {
    return e->attempts ? json_deep_copy(e->attempts) : json_array();
}

static json_t *list_item(const struct escalation *e) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:o}", "id", e->id, "state",
                     escalation_state_name(e->state), "chain", e->chain, "request_id",
                     e->request_id, "agent", e->agent, "action", e->action, "created_at",
                     time_json(e->created_at_us));
}

json_t *escalation_list_json(struct escalation_store *s, const enum escalation_state *filter) {
    json_t *arr = json_array();
    bool ok = arr != NULL;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; ok && i < s->len; i++) {
        const struct escalation *e = s->order[i];
        if (!filter || e->state == *filter) ok = json_array_append_new(arr, list_item(e)) == 0;
    }
    pthread_mutex_unlock(&s->lock);
    if (!ok) {
        json_decref(arr);
        return NULL;
    }
    return json_pack("{s:o}", "escalations", arr);
}

json_t *escalation_detail_json(const struct escalation *e) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:o, s:s?, s:o, s:s?}", "id",
                     e->id, "state", escalation_state_name(e->state), "chain", e->chain,
                     "request_id", e->request_id, "agent", e->agent, "action", e->action, "tenant",
                     e->tenant, "attempts", attempts_json(e), "upstream_status", status_json(e),
                     "created_at", time_json(e->created_at_us), "resolved_by", e->resolved_by,
                     "resolved_at", time_or_null(e->resolved_at_us), "note", e->note);
}

json_t *escalation_webhook_json(const struct escalation *e) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:o}", "id", e->id, "chain",
                     e->chain, "request_id", e->request_id, "agent", e->agent, "action", e->action,
                     "tenant", e->tenant, "attempts", attempts_json(e), "upstream_status",
                     status_json(e), "created_at", time_json(e->created_at_us));
}
