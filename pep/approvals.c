/*
 * approvals.c — human approvals: pure verdicts, the in-memory store, its SQLite rows and
 * its JSON views (see approvals.h for the states and the publish/undo protocol).
 *
 * Memory layout.  Each approval lives once, in a heap entry owned by `by_id`; `order`
 * holds the same pointers sorted by (created_at, id) so that lists are oldest first
 * without sorting; `latest` maps "agent fingerprint" to the newest approval of that pair,
 * which is the only one approval_create can reuse (an older one of the pair was no longer
 * pending and unexpired when the newer one was made, and neither state comes back, except
 * through a failed decision's undo — which at worst leaves two pending ones).
 *
 * Invariants (under `lock`): every entry of by_id is in order exactly once and vice versa;
 * an entry's stored state is never APPROVAL_EXPIRED; reserved_by is non-empty only while
 * the stored state is approved.
 *
 * Approvals are human-paced: one mutex for the whole store is enough, and it is held only
 * for memory work (copies, no I/O).
 */
#include "pep/approvals.h"
#include "pep/registry.h"
#include "pep/sqlrun.h"
#include "pep/strmap.h"
#include "pep/util.h"

#include <assert.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* A published approval and the key of its (agent, fingerprint) pair, kept so that
 * unpublishing needs no allocation. */
struct entry {
    struct approval a;
    char *pair; /* "agent fingerprint": ids and hex hold no space */
};

struct approval_store {
    pthread_mutex_t lock;  /* guards the three indexes and every entry's fields */
    struct strmap *by_id;  /* id → struct entry * (owns the entries) */
    struct strmap *latest; /* pair → the newest entry of that pair (borrowed) */
    struct entry **order;  /* every entry, sorted by (created_at_us, id) */
    size_t len, cap;
};

/* ---- copies -------------------------------------------------------------------------- */

static char *dup_or_null(const char *s, bool *ok) {
    if (!s) return NULL;
    char *d = strdup(s);
    if (!d) *ok = false;
    return d;
}

static void free_strv(char **v, size_t n) {
    for (size_t i = 0; v && i < n; i++)
        free(v[i]);
    free(v);
}

static char **copy_strv(const char *const *src, size_t n, bool *ok) {
    char **v = calloc(n ? n : 1, sizeof *v);
    if (!v) *ok = false;
    for (size_t i = 0; v && i < n; i++)
        if (!(v[i] = strdup(src[i]))) *ok = false;
    return v;
}

int approval_copy(struct approval *dst, const struct approval *src) {
    bool ok = true;
    *dst = *src;
    dst->agent = dup_or_null(src->agent, &ok);
    dst->owner = dup_or_null(src->owner, &ok);
    dst->tenant = dup_or_null(src->tenant, &ok);
    dst->action = dup_or_null(src->action, &ok);
    dst->method = dup_or_null(src->method, &ok);
    dst->path = dup_or_null(src->path, &ok);
    /* A deep copy: jansson values are not safe to share between threads that may change
     * them, and a copy outlives the store's entry. */
    dst->fields = src->fields ? json_deep_copy(src->fields) : NULL;
    if (src->fields && !dst->fields) ok = false;
    dst->approvers = copy_strv((const char *const *)src->approvers, src->approvers_len, &ok);
    dst->decided_by = dup_or_null(src->decided_by, &ok);
    dst->reason = dup_or_null(src->reason, &ok);
    dst->request_id = dup_or_null(src->request_id, &ok);
    dst->used_by = dup_or_null(src->used_by, &ok);
    if (ok) return 0;
    approval_clear(dst);
    return PEP_ENOMEM;
}

void approval_clear(struct approval *a) {
    if (!a) return;
    free(a->agent);
    free(a->owner);
    free(a->tenant);
    free(a->action);
    free(a->method);
    free(a->path);
    json_decref(a->fields);
    free_strv(a->approvers, a->approvers_len);
    free(a->decided_by);
    free(a->reason);
    free(a->request_id);
    free(a->used_by);
    memset(a, 0, sizeof *a);
}

static void entry_free(void *v) {
    struct entry *e = v;
    if (!e) return;
    approval_clear(&e->a);
    free(e->pair);
    free(e);
}

/* ---- pure ------------------------------------------------------------------------------ */

static const char *const state_names[] = {[APPROVAL_PENDING] = "pending",
                                          [APPROVAL_APPROVED] = "approved",
                                          [APPROVAL_DENIED] = "denied",
                                          [APPROVAL_EXPIRED] = "expired",
                                          [APPROVAL_USED] = "used"};

const char *approval_state_name(enum approval_state s) {
    return (unsigned)s < PEP_ARRAY_LEN(state_names) ? state_names[s] : "unknown";
}

int approval_state_parse(const char *s, enum approval_state *out) {
    for (size_t i = 0; s && i < PEP_ARRAY_LEN(state_names); i++)
        if (strcmp(s, state_names[i]) == 0) {
            *out = (enum approval_state)i;
            return 0;
        }
    return PEP_EINVAL;
}

enum approval_state approval_state_at(const struct approval *a, int64_t now_us) {
    assert(a->state != APPROVAL_EXPIRED);
    if ((a->state == APPROVAL_PENDING || a->state == APPROVAL_APPROVED) &&
        now_us >= a->expires_at_us)
        return APPROVAL_EXPIRED;
    return a->state;
}

enum approval_use approval_use_verdict(const struct approval *a, const char *agent,
                                       const char *fingerprint, int64_t now_us, const char **why) {
    const char *reason = NULL;
    enum approval_use v = APPROVAL_USE_INVALID;
    /* SECURITY: ids are ULIDs, partly predictable (time, then +1 within a millisecond);
     * another agent's approval must answer exactly like an unknown id, or an agent could
     * probe which requests of others wait for approval. */
    if (!a || strcmp(a->agent, agent) != 0)
        reason = "unknown approval";
    else if (strcmp(a->fingerprint, fingerprint) != 0)
        reason = "approval is for another request";
    else
        switch (approval_state_at(a, now_us)) {
        case APPROVAL_DENIED:
            v = APPROVAL_USE_DENIED;
            reason = "approval denied";
            break;
        case APPROVAL_USED:
            reason = "approval already used";
            break;
        case APPROVAL_EXPIRED:
            reason = "approval expired";
            break;
        case APPROVAL_PENDING:
            v = APPROVAL_USE_PENDING;
            break;
        case APPROVAL_APPROVED:
            if (a->reserved_by[0])
                reason = "approval in use by another request";
            else
                v = APPROVAL_USE_OK;
            break;
        }
    if (why) *why = reason;
    return v;
}

static bool has_string(const char *const *v, size_t n, const char *s) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], s) == 0) return true;
    return false;
}

enum approval_decide approval_decide_verdict(const struct approval *a, const char *operator_id,
                                             const char *const *roles, size_t roles_len,
                                             int64_t now_us) {
    bool may = has_string(roles, roles_len, "admin");
    for (size_t i = 0; !may && i < a->approvers_len; i++)
        may = has_string(roles, roles_len, a->approvers[i]);
    if (!may) return APPROVAL_DECIDE_NOT_APPROVER;
    /* SECURITY: four eyes — the person answerable for the agent must not approve its
     * requests.  Owners are often e-mail addresses, typed with any case. */
    if (a->distinct_from_owner && a->owner && a->owner[0] && strcasecmp(operator_id, a->owner) == 0)
        return APPROVAL_DECIDE_IS_OWNER;
    if (a->state != APPROVAL_PENDING) return APPROVAL_DECIDE_NOT_PENDING;
    if (now_us >= a->expires_at_us) return APPROVAL_DECIDE_EXPIRED;
    return APPROVAL_DECIDE_OK;
}

const char *approval_decide_name(enum approval_decide v) {
    static const char *const names[] = {[APPROVAL_DECIDE_OK] = "ok",
                                        [APPROVAL_DECIDE_NOT_APPROVER] = "not_approver",
                                        [APPROVAL_DECIDE_IS_OWNER] = "is_owner",
                                        [APPROVAL_DECIDE_NOT_PENDING] = "not_pending",
                                        [APPROVAL_DECIDE_EXPIRED] = "expired"};
    return (unsigned)v < PEP_ARRAY_LEN(names) ? names[v] : "unknown";
}

/* ---- the store ------------------------------------------------------------------------ */

struct approval_store *approval_store_new(void) {
    struct approval_store *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->by_id = strmap_new();
    s->latest = strmap_new();
    if (!s->by_id || !s->latest || pthread_mutex_init(&s->lock, NULL) != 0) {
        strmap_free(s->by_id, NULL);
        strmap_free(s->latest, NULL);
        free(s);
        return NULL;
    }
    return s;
}

void approval_store_free(struct approval_store *s) {
    if (!s) return;
    strmap_free(s->latest, NULL);
    strmap_free(s->by_id, entry_free);
    free(s->order);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static char *pair_key(const char *agent, const char *fingerprint) {
    char *k = NULL;
    return asprintf(&k, "%s %s", agent, fingerprint) < 0 ? NULL : k;
}

static bool order_before(const struct entry *x, const struct entry *y) {
    return x->a.created_at_us != y->a.created_at_us ? x->a.created_at_us < y->a.created_at_us
                                                    : strcmp(x->a.id, y->a.id) < 0;
}

/* Where e is, or would be, in order.  Locked. */
static size_t order_position(const struct approval_store *s, const struct entry *e) {
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

/* Publishes e (taking it over on success).  Locked.  0, PEP_EEXISTS or PEP_ENOMEM (then
 * nothing changed). */
static int store_insert(struct approval_store *s, struct entry *e) {
    if (strmap_get(s->by_id, e->a.id)) return PEP_EEXISTS;
    if (s->len == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        struct entry **o = realloc(s->order, cap * sizeof *o);
        if (!o) return PEP_ENOMEM;
        s->order = o;
        s->cap = cap;
    }
    if (strmap_put(s->by_id, e->a.id, e, NULL) != 0) return PEP_ENOMEM;
    /* The newest of a pair is the one reuse looks at (loading runs oldest first anyway). */
    const struct entry *cur = strmap_get(s->latest, e->pair);
    if ((!cur || order_before(cur, e)) && strmap_put(s->latest, e->pair, e, NULL) != 0) {
        strmap_remove(s->by_id, e->a.id);
        return PEP_ENOMEM;
    }
    size_t i = order_position(s, e);
    memmove(s->order + i + 1, s->order + i, (s->len - i) * sizeof *s->order);
    s->order[i] = e;
    s->len++;
    return 0;
}

/* Removes e from the maps (not from order).  Locked. */
static void store_unindex(struct approval_store *s, const struct entry *e) {
    strmap_remove(s->by_id, e->a.id);
    if (strmap_get(s->latest, e->pair) == e) strmap_remove(s->latest, e->pair);
}

static struct entry *store_get(struct approval_store *s, const char *id) {
    return id ? strmap_get(s->by_id, id) : NULL;
}

/* Builds the entry a request creates (outside the lock: only publication needs it). */
static struct entry *entry_new(const struct approval_request *in, int64_t now_us) {
    struct entry *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    struct approval *a = &e->a;
    bool ok = true;
    pep_request_id(a->id);
    a->agent = dup_or_null(in->agent, &ok);
    a->owner = dup_or_null(in->owner ? in->owner : "", &ok);
    a->tenant = dup_or_null(in->tenant, &ok);
    a->action = dup_or_null(in->action, &ok);
    a->method = dup_or_null(in->method, &ok);
    a->path = dup_or_null(in->path, &ok);
    memcpy(a->fingerprint, in->fingerprint, sizeof a->fingerprint);
    a->fields = in->fields ? json_deep_copy(in->fields) : json_object();
    a->approvers = copy_strv(in->approvers, in->approvers_len, &ok);
    a->approvers_len = in->approvers_len;
    a->distinct_from_owner = in->distinct_from_owner;
    a->created_at_us = now_us;
    /* A huge ttl saturates rather than wrapping into the past. */
    a->expires_at_us = in->ttl_us > INT64_MAX - now_us ? INT64_MAX : now_us + in->ttl_us;
    a->state = APPROVAL_PENDING;
    a->request_id = dup_or_null(in->request_id, &ok);
    e->pair = pair_key(in->agent, in->fingerprint);
    if (ok && a->fields && e->pair) return e;
    entry_free(e);
    return NULL;
}

static int validate_request(const struct approval_request *in) {
    if (!in->agent || !in->tenant || !in->action || !in->method || !in->path || !in->fingerprint ||
        !in->request_id || in->ttl_us <= 0 || (in->fields && !json_is_object(in->fields)) ||
        (in->approvers_len && !in->approvers))
        return PEP_EINVAL;
    if (strlen(in->fingerprint) != APPROVAL_FINGERPRINT_SIZE - 1 ||
        strspn(in->fingerprint, "0123456789abcdef") != APPROVAL_FINGERPRINT_SIZE - 1)
        return PEP_EINVAL;
    for (size_t i = 0; i < in->approvers_len; i++)
        if (!in->approvers[i]) return PEP_EINVAL;
    return 0;
}

int approval_create(struct approval_store *s, const struct approval_request *in, int64_t now_us,
                    struct approval *out, bool *created) {
    memset(out, 0, sizeof *out);
    *created = false;
    int rc = validate_request(in);
    if (rc != 0) return rc;
    struct entry *e = entry_new(in, now_us);
    if (!e) return PEP_ENOMEM;

    pthread_mutex_lock(&s->lock);
    const struct entry *old = strmap_get(s->latest, e->pair);
    if (old && approval_state_at(&old->a, now_us) == APPROVAL_PENDING) {
        rc = approval_copy(out, &old->a);
    } else {
        /* Copy first: an approval published without the caller holding its copy could
         * not be written (apply_insert's argument) nor forgotten. */
        rc = approval_copy(out, &e->a);
        if (rc == 0) rc = store_insert(s, e);
        if (rc == 0) {
            *created = true;
            e = NULL;
        } else {
            approval_clear(out);
        }
    }
    pthread_mutex_unlock(&s->lock);
    entry_free(e);
    return rc;
}

void approval_forget(struct approval_store *s, const char *id) {
    pthread_mutex_lock(&s->lock);
    struct entry *e = store_get(s, id);
    if (e) {
        size_t i = order_position(s, e);
        assert(i < s->len && s->order[i] == e);
        memmove(s->order + i, s->order + i + 1, (s->len - i - 1) * sizeof *s->order);
        s->len--;
        store_unindex(s, e);
    }
    pthread_mutex_unlock(&s->lock);
    entry_free(e);
}

size_t approval_store_prune(struct approval_store *s, int64_t now_us) {
    size_t kept = 0, dropped = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->len; i++) {
        struct entry *e = s->order[i];
        if (e->a.expires_at_us <= now_us - APPROVAL_RETAIN_US && !e->a.reserved_by[0]) {
            store_unindex(s, e);
            entry_free(e);
            dropped++;
        } else {
            s->order[kept++] = e;
        }
    }
    s->len = kept;
    pthread_mutex_unlock(&s->lock);
    return dropped;
}

/* Replaces a's decision fields, taking over by and reason. */
static void set_decision(struct approval *a, enum approval_state state, char *by, char *reason,
                         int64_t at_us) {
    free(a->decided_by);
    free(a->reason);
    a->state = state;
    a->decided_by = by;
    a->reason = reason;
    a->decided_at_us = at_us;
}

int approval_decide(struct approval_store *s, const char *id, const char *operator_id,
                    const char *const *roles, size_t roles_len, bool approve, const char *reason,
                    int64_t now_us, enum approval_decide *verdict, struct approval *before,
                    struct approval *after) {
    memset(before, 0, sizeof *before);
    memset(after, 0, sizeof *after);
    if (!operator_id || (roles_len && !roles)) return PEP_EINVAL;
    bool ok = true;
    char *by = dup_or_null(operator_id, &ok), *why = dup_or_null(reason, &ok);
    int rc = ok ? 0 : PEP_ENOMEM;

    pthread_mutex_lock(&s->lock);
    struct entry *e = rc == 0 ? store_get(s, id) : NULL;
    if (rc == 0 && !e) rc = PEP_ENOTFOUND;
    if (rc == 0) {
        *verdict = approval_decide_verdict(&e->a, operator_id, roles, roles_len, now_us);
        rc = approval_copy(before, &e->a);
    }
    if (rc == 0 && *verdict == APPROVAL_DECIDE_OK) {
        set_decision(&e->a, approve ? APPROVAL_APPROVED : APPROVAL_DENIED, by, why, now_us);
        by = why = NULL;
    }
    if (rc == 0 && (rc = approval_copy(after, &e->a)) != 0) {
        if (*verdict == APPROVAL_DECIDE_OK) /* was pending: no decision strings to restore */
            set_decision(&e->a, APPROVAL_PENDING, NULL, NULL, 0);
        approval_clear(before);
    }
    pthread_mutex_unlock(&s->lock);
    free(by);
    free(why);
    return rc;
}

void approval_undo_decide(struct approval_store *s, const struct approval *before) {
    bool ok = true;
    char *by = dup_or_null(before->decided_by, &ok), *why = dup_or_null(before->reason, &ok);
    pthread_mutex_lock(&s->lock);
    struct entry *e = store_get(s, before->id);
    /* Used means the decision's record committed after all (apply_use requires it). */
    if (e && e->a.state != APPROVAL_USED) {
        set_decision(&e->a, before->state, by, why, before->decided_at_us);
        by = why = NULL;
        /* A request holding it will fail at apply_use (the row is not approved) and its
         * release is then a no-op; keep the invariant: held only while approved. */
        if (e->a.state != APPROVAL_APPROVED) e->a.reserved_by[0] = '\0';
    }
    pthread_mutex_unlock(&s->lock);
    free(by);
    free(why);
}

enum approval_use approval_reserve(struct approval_store *s, const char *id, const char *agent,
                                   const char *fingerprint, const char *request_id, int64_t now_us,
                                   const char **why, struct approval *out) {
    if (out) memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->lock);
    struct entry *e = store_get(s, id);
    const char *reason = NULL;
    enum approval_use v =
        approval_use_verdict(e ? &e->a : NULL, agent, fingerprint, now_us, &reason);
    if (v == APPROVAL_USE_OK) {
        /* An empty holder would look free to the next request: refuse it. */
        if (PEP_NEVER(!request_id || !request_id[0] ||
                      strlen(request_id) >= sizeof e->a.reserved_by)) {
            v = APPROVAL_USE_INVALID;
            reason = "malformed request id";
        } else {
            strcpy(e->a.reserved_by, request_id);
        }
    }
    /* Never hand out another agent's approval (see approval_use_verdict). */
    if (out && e && agent && strcmp(e->a.agent, agent) == 0) (void)approval_copy(out, &e->a);
    pthread_mutex_unlock(&s->lock);
    if (why) *why = reason;
    return v;
}

void approval_release(struct approval_store *s, const char *id, const char *request_id) {
    pthread_mutex_lock(&s->lock);
    struct entry *e = store_get(s, id);
    if (e && request_id && request_id[0] && strcmp(e->a.reserved_by, request_id) == 0)
        e->a.reserved_by[0] = '\0';
    pthread_mutex_unlock(&s->lock);
}

void approval_mark_used(struct approval_store *s, const char *id, const char *request_id,
                        int64_t used_at_us) {
    bool ok = true;
    char *by = dup_or_null(request_id, &ok);
    pthread_mutex_lock(&s->lock);
    struct entry *e = store_get(s, id);
    if (e) {
        /* Even without memory for used_by the approval must read as used. */
        e->a.state = APPROVAL_USED;
        e->a.used_at_us = used_at_us;
        free(e->a.used_by);
        e->a.used_by = by;
        by = NULL;
        e->a.reserved_by[0] = '\0';
    }
    pthread_mutex_unlock(&s->lock);
    free(by);
}

int approval_get(struct approval_store *s, const char *id, struct approval *out) {
    return approval_get_for_agent(s, id, NULL, out);
}

int approval_get_for_agent(struct approval_store *s, const char *id, const char *agent,
                           struct approval *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->lock);
    const struct entry *e = store_get(s, id);
    int rc = PEP_ENOTFOUND;
    if (e && (!agent || strcmp(e->a.agent, agent) == 0)) rc = approval_copy(out, &e->a);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* ---- SQLite ---------------------------------------------------------------------------- */

const char APPROVALS_SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS approvals ("
    " id TEXT PRIMARY KEY, agent TEXT NOT NULL, owner TEXT NOT NULL, tenant TEXT NOT NULL,"
    " action TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,"
    " fingerprint TEXT NOT NULL, fields TEXT NOT NULL, approvers TEXT NOT NULL,"
    " distinct_from_owner INTEGER NOT NULL,"
    " created_at_us INTEGER NOT NULL, expires_at_us INTEGER NOT NULL,"
    " state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'used')),"
    " decided_by TEXT, decided_at_us INTEGER, reason TEXT,"
    " request_id TEXT NOT NULL, used_by TEXT, used_at_us INTEGER);"
    /* approval_store_load reads only the recent ones. */
    "CREATE INDEX IF NOT EXISTS approvals_expires ON approvals(expires_at_us);";

int approval_apply_insert(sqlite3 *db, void *arg) {
    const struct approval *a = arg;
    json_t *approvers = registry_strings_json((const char *const *)a->approvers, a->approvers_len);
    char *approvers_text = approvers ? json_dumps(approvers, JSON_COMPACT) : NULL;
    char *fields_text =
        a->fields ? json_dumps(a->fields, JSON_COMPACT | JSON_SORT_KEYS) : strdup("{}");
    json_decref(approvers);
    int rc = PEP_ENOMEM;
    if (approvers_text && fields_text) {
        const struct sql_arg args[] = {SQL_S(a->id),
                                       SQL_S(a->agent),
                                       SQL_S(a->owner),
                                       SQL_S(a->tenant),
                                       SQL_S(a->action),
                                       SQL_S(a->method),
                                       SQL_S(a->path),
                                       SQL_S(a->fingerprint),
                                       SQL_S(fields_text),
                                       SQL_S(approvers_text),
                                       SQL_I(a->distinct_from_owner),
                                       SQL_I(a->created_at_us),
                                       SQL_I(a->expires_at_us),
                                       SQL_S(approval_state_name(a->state)),
                                       SQL_S(a->decided_by),
                                       SQL_T(a->decided_at_us),
                                       SQL_S(a->reason),
                                       SQL_S(a->request_id),
                                       SQL_S(a->used_by),
                                       SQL_T(a->used_at_us)};
        rc = sql_run(db,
                     "INSERT INTO approvals(id, agent, owner, tenant, action, method, path,"
                     " fingerprint, fields, approvers, distinct_from_owner, created_at_us,"
                     " expires_at_us, state, decided_by, decided_at_us, reason, request_id,"
                     " used_by, used_at_us) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,"
                     " ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
                     args, (int)PEP_ARRAY_LEN(args), false);
    }
    free(approvers_text);
    free(fields_text);
    return rc;
}

int approval_apply_decide(sqlite3 *db, void *arg) {
    const struct approval *a = arg;
    if (a->state != APPROVAL_APPROVED && a->state != APPROVAL_DENIED) return PEP_EINVAL;
    const struct sql_arg args[] = {SQL_S(a->id), SQL_S(approval_state_name(a->state)),
                                   SQL_S(a->decided_by), SQL_T(a->decided_at_us), SQL_S(a->reason)};
    return sql_run(db,
                   "UPDATE approvals SET state = ?2, decided_by = ?3, decided_at_us = ?4,"
                   " reason = ?5 WHERE id = ?1 AND state = 'pending'",
                   args, (int)PEP_ARRAY_LEN(args), true);
}

int approval_apply_use(sqlite3 *db, void *arg) {
    const struct approval_use_write *w = arg;
    const struct sql_arg args[] = {SQL_S(w->id), SQL_S(w->used_by), SQL_I(w->used_at_us)};
    /* SECURITY: the row is the arbiter — a use whose approval's decision record failed, or
     * that comes too late or twice, changes nothing and its request is refused. */
    return sql_run(db,
                   "UPDATE approvals SET state = 'used', used_by = ?2, used_at_us = ?3"
                   " WHERE id = ?1 AND state = 'approved' AND expires_at_us > ?3",
                   args, (int)PEP_ARRAY_LEN(args), true);
}

static const char *column_text(sqlite3_stmt *st, int i) {
    return (const char *)sqlite3_column_text(st, i);
}

/* Parses a JSON array of strings into v (allocated even when empty).  0 or PEP_EINVAL. */
static int strv_from_json_text(const char *text, char ***v, size_t *n) {
    json_t *arr = text ? json_loads(text, 0, NULL) : NULL;
    int rc = json_is_array(arr) ? 0 : PEP_EINVAL;
    size_t len = rc == 0 ? json_array_size(arr) : 0;
    bool ok = true;
    *v = calloc(len ? len : 1, sizeof **v);
    *n = len;
    if (!*v) rc = PEP_ENOMEM;
    for (size_t i = 0; rc == 0 && i < len; i++) {
        const char *s = json_string_value(json_array_get(arr, i));
        if (!s)
            rc = PEP_EINVAL;
        else if (!((*v)[i] = dup_or_null(s, &ok)))
            rc = PEP_ENOMEM;
    }
    json_decref(arr);
    return rc;
}

/* Builds an entry from one row of approval_store_load's SELECT.  0, PEP_EINVAL (malformed)
 * or PEP_ENOMEM. */
static int entry_from_row(sqlite3_stmt *st, struct entry **out) {
    struct entry *e = calloc(1, sizeof *e);
    if (!e) return PEP_ENOMEM;
    struct approval *a = &e->a;
    bool ok = true;
    const char *id = column_text(st, 0), *fp = column_text(st, 7);
    int rc = id && strlen(id) == APPROVAL_ID_SIZE - 1 && fp &&
                     strlen(fp) == APPROVAL_FINGERPRINT_SIZE - 1 &&
                     approval_state_parse(column_text(st, 13), &a->state) == 0 &&
                     a->state != APPROVAL_EXPIRED
                 ? 0
                 : PEP_EINVAL;
    if (rc == 0) {
        memcpy(a->id, id, sizeof a->id);
        memcpy(a->fingerprint, fp, sizeof a->fingerprint);
        a->agent = dup_or_null(column_text(st, 1), &ok);
        a->owner = dup_or_null(column_text(st, 2), &ok);
        a->tenant = dup_or_null(column_text(st, 3), &ok);
        a->action = dup_or_null(column_text(st, 4), &ok);
        a->method = dup_or_null(column_text(st, 5), &ok);
        a->path = dup_or_null(column_text(st, 6), &ok);
        a->distinct_from_owner = sqlite3_column_int64(st, 10) != 0;
        a->created_at_us = sqlite3_column_int64(st, 11);
        a->expires_at_us = sqlite3_column_int64(st, 12);
        a->decided_by = dup_or_null(column_text(st, 14), &ok);
        a->decided_at_us = sqlite3_column_int64(st, 15); /* NULL reads as 0 */
        a->reason = dup_or_null(column_text(st, 16), &ok);
        a->request_id = dup_or_null(column_text(st, 17), &ok);
        a->used_by = dup_or_null(column_text(st, 18), &ok);
        a->used_at_us = sqlite3_column_int64(st, 19);
        const char *fields = column_text(st, 8);
        a->fields = fields ? json_loads(fields, 0, NULL) : NULL;
        rc = strv_from_json_text(column_text(st, 9), &a->approvers, &a->approvers_len);
        if (rc == 0 && !ok) rc = PEP_ENOMEM;
        if (rc == 0 && (!a->agent || !a->owner || !a->tenant || !a->action || !a->method ||
                        !a->path || !a->request_id || !json_is_object(a->fields)))
            rc = PEP_EINVAL;
    }
    if (rc == 0 && !(e->pair = pair_key(a->agent, a->fingerprint))) rc = PEP_ENOMEM;
    if (rc != 0) {
        entry_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

int approval_store_load(struct approval_store *s, sqlite3 *db, int64_t now_us,
                        struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db,
                           "SELECT id, agent, owner, tenant, action, method, path, fingerprint,"
                           " fields, approvers, distinct_from_owner, created_at_us, expires_at_us,"
                           " state, decided_by, decided_at_us, reason, request_id, used_by,"
                           " used_at_us FROM approvals WHERE expires_at_us > ?1"
                           " ORDER BY created_at_us, id",
                           -1, &st, NULL) != SQLITE_OK ||
        sqlite3_bind_int64(st, 1, now_us - APPROVAL_RETAIN_US) != SQLITE_OK) {
        sqlite3_finalize(st);
        return pep_err_set(err, PEP_EDB, "approvals: %s", sqlite3_errmsg(db));
    }
    int rc = 0, step;
    while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
        struct entry *e = NULL;
        rc = entry_from_row(st, &e);
        if (rc == PEP_EINVAL)
            rc = pep_err_set(err, PEP_EDB, "approvals: row %s is malformed",
                             column_text(st, 0) ? column_text(st, 0) : "(null id)");
        else if (rc != 0)
            rc = pep_err_set(err, rc, "approvals: out of memory");
        if (rc == 0) {
            pthread_mutex_lock(&s->lock);
            rc = store_insert(s, e);
            pthread_mutex_unlock(&s->lock);
            if (rc != 0) {
                rc = pep_err_set(err, rc == PEP_EEXISTS ? PEP_EDB : rc,
                                 "approvals: cannot load %s: %s", e->a.id, pep_strerror(rc));
                entry_free(e);
            }
        }
    }
    /* SECURITY: a read that stops early must fail the start rather than forget approvals. */
    if (rc == 0 && step != SQLITE_DONE)
        rc = pep_err_set(err, PEP_EDB, "approvals: reading failed: %s", sqlite3_errmsg(db));
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

static json_t *fields_json(const struct approval *a) {
    return a->fields ? json_deep_copy(a->fields) : json_object();
}

static json_t *list_item(const struct approval *a, int64_t now_us) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o}", "id", a->id, "state",
                     approval_state_name(approval_state_at(a, now_us)), "agent", a->agent, "tenant",
                     a->tenant, "action", a->action, "method", a->method, "path", a->path,
                     "created_at", time_json(a->created_at_us), "expires_at",
                     time_json(a->expires_at_us));
}

json_t *approval_list_json(struct approval_store *s, const enum approval_state *filter,
                           int64_t now_us) {
    json_t *arr = json_array();
    bool ok = arr != NULL;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; ok && i < s->len; i++) {
        const struct approval *a = &s->order[i]->a;
        if (!filter || approval_state_at(a, now_us) == *filter)
            ok = json_array_append_new(arr, list_item(a, now_us)) == 0;
    }
    pthread_mutex_unlock(&s->lock);
    if (!ok) {
        json_decref(arr);
        return NULL;
    }
    return json_pack("{s:o}", "approvals", arr);
}

json_t *approval_detail_json(const struct approval *a, int64_t now_us) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:b, s:o, s:o,"
                     " s:s?, s:o, s:s?, s:s?, s:s?, s:o}",
                     "id", a->id, "state", approval_state_name(approval_state_at(a, now_us)),
                     "action", a->action, "agent", a->agent, "owner", a->owner, "tenant", a->tenant,
                     "method", a->method, "path", a->path, "fields", fields_json(a), "approvers",
                     registry_strings_json((const char *const *)a->approvers, a->approvers_len),
                     "distinct_from_owner", a->distinct_from_owner, "created_at",
                     time_json(a->created_at_us), "expires_at", time_json(a->expires_at_us),
                     "decided_by", a->decided_by, "decided_at", time_or_null(a->decided_at_us),
                     "reason", a->reason, "request_id", a->request_id, "used_by", a->used_by,
                     "used_at", time_or_null(a->used_at_us));
}

json_t *approval_poll_json(const struct approval *a, int64_t now_us) {
    return json_pack("{s:s, s:s, s:o}", "id", a->id, "state",
                     approval_state_name(approval_state_at(a, now_us)), "expires_at",
                     time_json(a->expires_at_us));
}

json_t *approval_notify_json(const struct approval *a) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:o}", "id", a->id, "action",
                     a->action, "agent", a->agent, "owner", a->owner, "tenant", a->tenant, "method",
                     a->method, "path", a->path, "fields", fields_json(a), "created_at",
                     time_json(a->created_at_us), "expires_at", time_json(a->expires_at_us));
}
