/*
 * registry.c — in-memory identity state, written through the audit writer.
 *
 * Invariant: every record reachable from the maps is also in the database (it was
 * published only after its transaction committed), except during startup loading.
 */
#include "pep/registry.h"
#include "pep/strmap.h"
#include "pep/util.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct registry {
    pthread_rwlock_t lock;     /* guards the three maps; records themselves are immutable */
    struct strmap *agents;     /* id → struct agent* (one reference held by the map) */
    struct strmap *operators;  /* id → struct operator_rec* */
    struct strmap *tokens;     /* jti → struct token_rec* (owned by the map) */
    uint64_t tokens_published; /* the next token_rec.order; guarded by lock */
};

/* ---- string arrays ------------------------------------------------------------------ */

static void free_strv(char **v, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static char **copy_strv(const char *const *src, size_t n) {
    char **v = calloc(n ? n : 1, sizeof *v);
    if (!v) return NULL;
    for (size_t i = 0; i < n; i++) {
        v[i] = strdup(src[i]);
        if (!v[i]) {
            free_strv(v, i);
            return NULL;
        }
    }
    return v;
}

static bool strv_equal(char **a, size_t an, char **b, size_t bn) {
    if (an != bn) return false;
    for (size_t i = 0; i < an; i++)
        if (strcmp(a[i], b[i]) != 0) return false;
    return true;
}

json_t *registry_strings_json(const char *const *v, size_t n) {
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        json_array_append_new(arr, json_string(v[i]));
    return arr;
}

/* Parses a JSON array of strings stored in a TEXT column. */
static int strv_from_json_text(const char *text, char ***out, size_t *out_len) {
    json_t *arr = json_loads(text ? text : "[]", 0, NULL);
    if (!json_is_array(arr)) {
        json_decref(arr);
        return PEP_EINVAL;
    }
    size_t n = json_array_size(arr);
    const char **tmp = calloc(n ? n : 1, sizeof *tmp);
    int rc = tmp ? 0 : PEP_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        tmp[i] = json_string_value(json_array_get(arr, i));
        if (!tmp[i]) rc = PEP_EINVAL;
    }
    if (rc == 0) {
        *out = copy_strv(tmp, n);
        *out_len = n;
        if (!*out) rc = PEP_ENOMEM;
    }
    free(tmp);
    json_decref(arr);
    return rc;
}

static char *strv_to_json_text(char **v, size_t n) {
    json_t *arr = registry_strings_json((const char *const *)v, n);
    char *s = arr ? json_dumps(arr, JSON_COMPACT) : NULL;
    json_decref(arr);
    return s;
}

static json_t *time_json(int64_t us) {
    char buf[32];
    pep_format_rfc3339_us(us, buf);
    return json_string(buf);
}

/* ---- agents ------------------------------------------------------------------------- */

struct agent *agent_new(const char *id, const char *owner, const char *const *tenants,
                        size_t tenants_len, const char *const *scopes, size_t scopes_len,
                        bool enabled, int64_t created_at_us, int64_t updated_at_us) {
    struct agent *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->id = strdup(id);
    a->owner = strdup(owner ? owner : "");
    a->tenants = copy_strv(tenants, tenants_len);
    a->tenants_len = tenants_len;
    a->scopes = copy_strv(scopes, scopes_len);
    a->scopes_len = scopes_len;
    a->enabled = enabled;
    a->created_at_us = created_at_us;
    a->updated_at_us = updated_at_us;
    a->refcount = 1;
    if (!a->id || !a->owner || !a->tenants || !a->scopes) {
        agent_release(a);
        return NULL;
    }
    return a;
}

struct agent *agent_with_enabled(const struct agent *a, bool enabled, int64_t now_us) {
    return agent_new(a->id, a->owner, (const char *const *)a->tenants, a->tenants_len,
                     (const char *const *)a->scopes, a->scopes_len, enabled, a->created_at_us,
                     now_us);
}

struct agent *agent_retain(struct agent *a) {
    if (a) __atomic_add_fetch(&a->refcount, 1, __ATOMIC_RELAXED);
    return a;
}

void agent_release(struct agent *a) {
    if (!a || __atomic_sub_fetch(&a->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
    free(a->id);
    free(a->owner);
    if (a->tenants) free_strv(a->tenants, a->tenants_len);
    if (a->scopes) free_strv(a->scopes, a->scopes_len);
    free(a);
}

bool agent_has_tenant(const struct agent *a, const char *tenant, size_t len) {
    for (size_t i = 0; i < a->tenants_len; i++)
        if (strlen(a->tenants[i]) == len && memcmp(a->tenants[i], tenant, len) == 0) return true;
    return false;
}

json_t *agent_to_json(const struct agent *a) {
    return json_pack(
        "{s:s, s:s, s:o, s:o, s:b, s:s, s:o, s:o}", "id", a->id, "owner", a->owner, "tenants",
        registry_strings_json((const char *const *)a->tenants, a->tenants_len), "scopes",
        registry_strings_json((const char *const *)a->scopes, a->scopes_len), "enabled", a->enabled,
        "managed_by", a->from_policy ? "policy" : "admin", "created_at",
        time_json(a->created_at_us), "updated_at", time_json(a->updated_at_us));
}

bool agent_same(const struct agent *a, const struct agent *b) {
    return strcmp(a->id, b->id) == 0 && strcmp(a->owner, b->owner) == 0 &&
           a->enabled == b->enabled &&
           strv_equal(a->tenants, a->tenants_len, b->tenants, b->tenants_len) &&
           strv_equal(a->scopes, a->scopes_len, b->scopes, b->scopes_len);
}

/* ---- operators ---------------------------------------------------------------------- */

struct operator_rec *operator_new(const char *id, const char *const *roles, size_t roles_len,
                                  int64_t created_at_us) {
    struct operator_rec *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->id = strdup(id);
    o->roles = copy_strv(roles, roles_len);
    o->roles_len = roles_len;
    o->created_at_us = created_at_us;
    o->refcount = 1;
    if (!o->id || !o->roles) {
        operator_release(o);
        return NULL;
    }
    return o;
}

struct operator_rec *operator_retain(struct operator_rec *o) {
    if (o) __atomic_add_fetch(&o->refcount, 1, __ATOMIC_RELAXED);
    return o;
}

void operator_release(struct operator_rec *o) {
    if (!o || __atomic_sub_fetch(&o->refcount, 1, __ATOMIC_ACQ_REL) != 0) return;
    free(o->id);
    if (o->roles) free_strv(o->roles, o->roles_len);
    free(o);
}

bool operator_has_role(const struct operator_rec *o, const char *role) {
    for (size_t i = 0; i < o->roles_len; i++)
        if (strcmp(o->roles[i], role) == 0) return true;
    return false;
}

json_t *operator_to_json(const struct operator_rec *o) {
    return json_pack("{s:s, s:o, s:o}", "id", o->id, "roles",
                     registry_strings_json((const char *const *)o->roles, o->roles_len),
                     "created_at", time_json(o->created_at_us));
}

json_t *token_rec_to_json(const struct token_rec *t) {
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:o, s:o}", "jti", t->jti, t->operator_token ? "operator" : "agent",
        t->subject, "kind", t->operator_token ? "operator" : "agent", "issued_at",
        time_json(t->issued_at_s * 1000000), "expires_at", time_json(t->expires_at_s * 1000000));
    if (j)
        json_object_set_new(j, "revoked_at",
                            t->revoked_at_s ? time_json(t->revoked_at_s * 1000000) : json_null());
    return j;
}

/* ---- the registry --------------------------------------------------------------------- */

struct registry *registry_new(void) {
    struct registry *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    /* Prefer writers: requests read the registry constantly, and the audit writer, which
     * publishes changes, must not wait behind them (glibc's default favours readers). */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&r->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    r->agents = strmap_new();
    r->operators = strmap_new();
    r->tokens = strmap_new();
    if (!r->agents || !r->operators || !r->tokens) {
        registry_free(r);
        return NULL;
    }
    return r;
}

static void release_agent_value(void *v) {
    agent_release(v);
}

static void release_operator_value(void *v) {
    operator_release(v);
}

static void free_token_value(void *v) {
    struct token_rec *t = v;
    free(t->subject);
    free(t);
}

void registry_free(struct registry *r) {
    if (!r) return;
    strmap_free(r->agents, release_agent_value);
    strmap_free(r->operators, release_operator_value);
    strmap_free(r->tokens, free_token_value);
    pthread_rwlock_destroy(&r->lock);
    free(r);
}

const char *registry_schema_sql(void) {
    return "CREATE TABLE IF NOT EXISTS agents ("
           " id TEXT PRIMARY KEY, owner TEXT NOT NULL, tenants TEXT NOT NULL,"
           " scopes TEXT NOT NULL, enabled INTEGER NOT NULL,"
           " created_at_us INTEGER NOT NULL, updated_at_us INTEGER NOT NULL);"
           "CREATE TABLE IF NOT EXISTS operators ("
           " id TEXT PRIMARY KEY, roles TEXT NOT NULL, created_at_us INTEGER NOT NULL);"
           "CREATE TABLE IF NOT EXISTS tokens ("
           " jti TEXT PRIMARY KEY, subject TEXT NOT NULL, operator INTEGER NOT NULL,"
           " issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, revoked_at INTEGER);"
           "CREATE INDEX IF NOT EXISTS tokens_subject ON tokens(subject);"
           /* A table of its own rather than a column: stores created before it existed
            * need no migration, and their agents count as admin-managed (kept as they
            * are), the safe reading. */
           "CREATE TABLE IF NOT EXISTS policy_agents (id TEXT PRIMARY KEY);";
}

/* SECURITY: a read that stops early must fail the start — a registry missing rows
 * would, for one, accept tokens whose revocation it did not load. */
static int load_failed(sqlite3 *db, const char *table, struct pep_err *err) {
    return pep_err_set(err, PEP_EDB, "registry: reading %s failed: %s", table, sqlite3_errmsg(db));
}

static int load_agents(struct registry *r, sqlite3 *db, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    int rc = 0;
    if (sqlite3_prepare_v2(db,
                           "SELECT id, owner, tenants, scopes, enabled, created_at_us,"
                           " updated_at_us, id IN (SELECT id FROM policy_agents) FROM agents",
                           -1, &st, NULL) != SQLITE_OK)
        return pep_err_set(err, PEP_EDB, "registry: %s", sqlite3_errmsg(db));
    int step;
    while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
        char **tenants = NULL, **scopes = NULL;
        size_t nt = 0, ns = 0;
        if (strv_from_json_text((const char *)sqlite3_column_text(st, 2), &tenants, &nt) ||
            strv_from_json_text((const char *)sqlite3_column_text(st, 3), &scopes, &ns)) {
            rc = pep_err_set(err, PEP_EDB, "registry: agent %s has a malformed row",
                             (const char *)sqlite3_column_text(st, 0));
        } else {
            struct agent *a =
                agent_new((const char *)sqlite3_column_text(st, 0),
                          (const char *)sqlite3_column_text(st, 1), (const char *const *)tenants,
                          nt, (const char *const *)scopes, ns, sqlite3_column_int(st, 4) != 0,
                          sqlite3_column_int64(st, 5), sqlite3_column_int64(st, 6));
            if (!a) {
                rc = pep_err_set(err, PEP_ENOMEM, "registry: out of memory");
            } else {
                a->from_policy = sqlite3_column_int(st, 7) != 0;
                registry_publish_agent(r, a);
            }
        }
        if (tenants) free_strv(tenants, nt);
        if (scopes) free_strv(scopes, ns);
    }
    if (rc == 0 && step != SQLITE_DONE) rc = load_failed(db, "agents", err);
    sqlite3_finalize(st);
    return rc;
}

static int load_operators(struct registry *r, sqlite3 *db, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    int rc = 0;
    if (sqlite3_prepare_v2(db, "SELECT id, roles, created_at_us FROM operators", -1, &st, NULL) !=
        SQLITE_OK)
        return pep_err_set(err, PEP_EDB, "registry: %s", sqlite3_errmsg(db));
    int step;
    while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
        char **roles = NULL;
        size_t n = 0;
        if (strv_from_json_text((const char *)sqlite3_column_text(st, 1), &roles, &n)) {
            rc = pep_err_set(err, PEP_EDB, "registry: operator row malformed");
            break;
        }
        struct operator_rec *o =
            operator_new((const char *)sqlite3_column_text(st, 0), (const char *const *)roles, n,
                         sqlite3_column_int64(st, 2));
        free_strv(roles, n);
        if (!o)
            rc = pep_err_set(err, PEP_ENOMEM, "registry: out of memory");
        else
            registry_publish_operator(r, o);
    }
    if (rc == 0 && step != SQLITE_DONE) rc = load_failed(db, "operators", err);
    sqlite3_finalize(st);
    return rc;
}

static int load_tokens(struct registry *r, sqlite3 *db, struct pep_err *err) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db,
                           "SELECT jti, subject, operator, issued_at, expires_at,"
                           " coalesce(revoked_at, 0) FROM tokens ORDER BY rowid",
                           -1, &st, NULL) != SQLITE_OK)
        return pep_err_set(err, PEP_EDB, "registry: %s", sqlite3_errmsg(db));
    int step, rc = 0;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        struct token_rec t = {0};
        snprintf(t.jti, sizeof t.jti, "%s", (const char *)sqlite3_column_text(st, 0));
        t.subject = (char *)sqlite3_column_text(st, 1);
        t.operator_token = sqlite3_column_int(st, 2) != 0;
        t.issued_at_s = sqlite3_column_int64(st, 3);
        t.expires_at_s = sqlite3_column_int64(st, 4);
        t.revoked_at_s = sqlite3_column_int64(st, 5);
        registry_publish_token(r, &t);
    }
    if (step != SQLITE_DONE) rc = load_failed(db, "tokens", err);
    sqlite3_finalize(st);
    return rc;
}

int registry_load(struct registry *r, sqlite3 *db, struct pep_err *err) {
    int rc = load_agents(r, db, err);
    if (rc == 0) rc = load_operators(r, db, err);
    if (rc == 0) rc = load_tokens(r, db, err);
    return rc;
}

struct agent *registry_get_agent(struct registry *r, const char *id) {
    pthread_rwlock_rdlock(&r->lock);
    struct agent *a = agent_retain(strmap_get(r->agents, id));
    pthread_rwlock_unlock(&r->lock);
    return a;
}

struct operator_rec *registry_get_operator(struct registry *r, const char *id) {
    pthread_rwlock_rdlock(&r->lock);
    struct operator_rec *o = operator_retain(strmap_get(r->operators, id));
    pthread_rwlock_unlock(&r->lock);
    return o;
}

bool registry_is_revoked(struct registry *r, const char *jti) {
    return registry_token_state(r, jti) == REGISTRY_TOKEN_REVOKED;
}

enum registry_token_state registry_token_state(struct registry *r, const char *jti) {
    pthread_rwlock_rdlock(&r->lock);
    const struct token_rec *t = strmap_get(r->tokens, jti);
    enum registry_token_state st = !t                ? REGISTRY_TOKEN_UNKNOWN
                                   : t->revoked_at_s ? REGISTRY_TOKEN_REVOKED
                                                     : REGISTRY_TOKEN_LIVE;
    pthread_rwlock_unlock(&r->lock);
    return st;
}

bool registry_get_token(struct registry *r, const char *jti, struct token_rec *out) {
    pthread_rwlock_rdlock(&r->lock);
    const struct token_rec *t = strmap_get(r->tokens, jti);
    if (t) {
        *out = *t;
        out->subject = NULL; /* not owned by the copy */
    }
    pthread_rwlock_unlock(&r->lock);
    return t != NULL;
}

struct latest_expiry {
    int64_t since, latest;
};

static void latest_expiry_one(const char *key, void *value, void *arg) {
    (void)key;
    const struct token_rec *t = value;
    struct latest_expiry *x = arg;
    if (!t->revoked_at_s && t->issued_at_s >= x->since && t->expires_at_s > x->latest)
        x->latest = t->expires_at_s;
}

int64_t registry_latest_expiry(struct registry *r, int64_t issued_since_s) {
    struct latest_expiry x = {.since = issued_since_s, .latest = 0};
    pthread_rwlock_rdlock(&r->lock);
    strmap_each(r->tokens, latest_expiry_one, &x);
    pthread_rwlock_unlock(&r->lock);
    return x.latest;
}

/* Which records a listing keeps; NULL keeps all. */
typedef bool (*keep_fn)(const void *value, const void *arg);

struct collect {
    const void **items;
    size_t len;
    keep_fn keep;
    const void *keep_arg;
};

static void collect_value(const char *key, void *value, void *arg) {
    (void)key;
    struct collect *c = arg;
    if (!c->keep || c->keep(value, c->keep_arg)) c->items[c->len++] = value;
}

/* Lists are newest last (SPEC 8): agents by creation time (then id, for the agents a
 * policy seeds in the same instant), tokens by issue time, then by the order the registry
 * learnt of them (rowid order at load, then commit order): issue times are whole seconds. */
static int cmp_agent_created(const void *a, const void *b) {
    const struct agent *x = *(const struct agent *const *)a, *y = *(const struct agent *const *)b;
    if (x->created_at_us != y->created_at_us) return x->created_at_us < y->created_at_us ? -1 : 1;
    return strcmp(x->id, y->id);
}

static int cmp_token_order(const void *a, const void *b) {
    const struct token_rec *x = *(const struct token_rec *const *)a;
    const struct token_rec *y = *(const struct token_rec *const *)b;
    if (x->issued_at_s != y->issued_at_s) return x->issued_at_s < y->issued_at_s ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Collects a map's kept values under the read lock, sorts them and renders each. */
static json_t *list_sorted(struct registry *r, struct strmap *m, keep_fn keep, const void *keep_arg,
                           int (*cmp)(const void *, const void *),
                           json_t *(*render)(const void *)) {
    json_t *arr = json_array();
    pthread_rwlock_rdlock(&r->lock);
    struct collect c = {
        .items = calloc(strmap_len(m) + 1, sizeof(void *)), .keep = keep, .keep_arg = keep_arg};
    if (c.items && arr) {
        strmap_each(m, collect_value, &c);
        qsort(c.items, c.len, sizeof(void *), cmp);
        for (size_t i = 0; i < c.len; i++)
            json_array_append_new(arr, render(c.items[i]));
    }
    pthread_rwlock_unlock(&r->lock);
    free(c.items);
    return arr;
}

static json_t *render_agent(const void *v) {
    return agent_to_json(v);
}

static json_t *render_token(const void *v) {
    return token_rec_to_json(v);
}

struct token_filter {
    const char *agent, *operator_id; /* NULL: not asked for */
};

/* Every token when the filter names nobody; else the tokens of the agent or the operator
 * it names. */
static bool keep_token(const void *value, const void *arg) {
    const struct token_rec *t = value;
    const struct token_filter *f = arg;
    if (!f->agent && !f->operator_id) return true;
    const char *who = t->operator_token ? f->operator_id : f->agent;
    return who && strcmp(t->subject, who) == 0;
}

json_t *registry_list_agents(struct registry *r) {
    return list_sorted(r, r->agents, NULL, NULL, cmp_agent_created, render_agent);
}

static bool keep_policy_agent(const void *value, const void *arg) {
    (void)arg;
    return ((const struct agent *)value)->from_policy;
}

struct agent **registry_policy_agents(struct registry *r, size_t *len) {
    *len = 0;
    pthread_rwlock_rdlock(&r->lock);
    struct collect c = {.items = calloc(strmap_len(r->agents) + 1, sizeof(void *)),
                        .keep = keep_policy_agent};
    if (c.items) {
        strmap_each(r->agents, collect_value, &c);
        for (size_t i = 0; i < c.len; i++)
            agent_retain((struct agent *)c.items[i]);
        *len = c.len;
    }
    pthread_rwlock_unlock(&r->lock);
    return (struct agent **)c.items;
}

json_t *registry_list_tokens(struct registry *r, const char *agent, const char *operator_id) {
    struct token_filter f = {agent, operator_id};
    return list_sorted(r, r->tokens, keep_token, &f, cmp_token_order, render_token);
}

/* ---- write-through ---------------------------------------------------------------------- */

static int exec_bound(sqlite3 *db, const char *sql, const char *types, ...) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) return PEP_EDB;
    va_list ap;
    va_start(ap, types);
    for (int i = 0; types[i]; i++) {
        if (types[i] == 's') {
            const char *s = va_arg(ap, const char *);
            sqlite3_bind_text(st, i + 1, s, -1, SQLITE_TRANSIENT);
        } else {
            sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t));
        }
    }
    va_end(ap);
    int rc = sqlite3_step(st) == SQLITE_DONE ? 0 : PEP_EDB;
    sqlite3_finalize(st);
    return rc;
}

int registry_sql_put_agent(sqlite3 *db, const struct agent *a) {
    char *tenants = strv_to_json_text(a->tenants, a->tenants_len);
    char *scopes = strv_to_json_text(a->scopes, a->scopes_len);
    int rc = PEP_ENOMEM;
    if (tenants && scopes)
        rc = exec_bound(db,
                        "INSERT INTO agents(id, owner, tenants, scopes, enabled, created_at_us,"
                        " updated_at_us) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                        " ON CONFLICT(id) DO UPDATE SET owner = ?2, tenants = ?3, scopes = ?4,"
                        " enabled = ?5, updated_at_us = ?7",
                        "ssssiii", a->id, a->owner, tenants, scopes, (int64_t)a->enabled,
                        a->created_at_us, a->updated_at_us);
    if (rc == 0)
        rc = exec_bound(db,
                        a->from_policy ? "INSERT OR IGNORE INTO policy_agents(id) VALUES(?1)"
                                       : "DELETE FROM policy_agents WHERE id = ?1",
                        "s", a->id);
    free(tenants);
    free(scopes);
    return rc;
}

int registry_sql_put_operator(sqlite3 *db, const struct operator_rec *o) {
    char *roles = strv_to_json_text(o->roles, o->roles_len);
    int rc = PEP_ENOMEM;
    if (roles)
        rc = exec_bound(db,
                        "INSERT INTO operators(id, roles, created_at_us) VALUES(?1, ?2, ?3)"
                        " ON CONFLICT(id) DO UPDATE SET roles = ?2",
                        "ssi", o->id, roles, o->created_at_us);
    free(roles);
    return rc;
}

int registry_sql_put_token(sqlite3 *db, const struct token_rec *t) {
    return exec_bound(db,
                      "INSERT INTO tokens(jti, subject, operator, issued_at, expires_at)"
                      " VALUES(?1, ?2, ?3, ?4, ?5)",
                      "ssiii", t->jti, t->subject, (int64_t)t->operator_token, t->issued_at_s,
                      t->expires_at_s);
}

int registry_sql_revoke_token(sqlite3 *db, const char *jti, int64_t revoked_at_s) {
    return exec_bound(db, "UPDATE tokens SET revoked_at = ?2 WHERE jti = ?1 AND revoked_at IS NULL",
                      "si", jti, revoked_at_s);
}

void registry_publish_agent(struct registry *r, struct agent *a) {
    void *old = NULL;
    pthread_rwlock_wrlock(&r->lock);
    if (strmap_put(r->agents, a->id, a, &old) != 0)
        old = a; /* could not store: drop the new record, keep the old */
    pthread_rwlock_unlock(&r->lock);
    agent_release(old);
}

void registry_publish_operator(struct registry *r, struct operator_rec *o) {
    void *old = NULL;
    pthread_rwlock_wrlock(&r->lock);
    if (strmap_put(r->operators, o->id, o, &old) != 0) old = o;
    pthread_rwlock_unlock(&r->lock);
    operator_release(old);
}

void registry_publish_token(struct registry *r, const struct token_rec *t) {
    struct token_rec *copy = malloc(sizeof *copy);
    if (!copy) return;
    *copy = *t;
    copy->subject = strdup(t->subject);
    if (!copy->subject) {
        free(copy);
        return;
    }
    void *old = NULL;
    pthread_rwlock_wrlock(&r->lock);
    copy->order = r->tokens_published++;
    if (strmap_put(r->tokens, copy->jti, copy, &old) != 0) old = copy;
    pthread_rwlock_unlock(&r->lock);
    if (old) free_token_value(old);
}

void registry_publish_revoke(struct registry *r, const char *jti, int64_t revoked_at_s) {
    pthread_rwlock_wrlock(&r->lock);
    struct token_rec *t = strmap_get(r->tokens, jti);
    if (t && t->revoked_at_s == 0) t->revoked_at_s = revoked_at_s;
    pthread_rwlock_unlock(&r->lock);
}

void registry_unpublish_revoke(struct registry *r, const char *jti) {
    pthread_rwlock_wrlock(&r->lock);
    struct token_rec *t = strmap_get(r->tokens, jti);
    if (t) t->revoked_at_s = 0;
    pthread_rwlock_unlock(&r->lock);
}
