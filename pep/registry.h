/*
 * registry.h — who exists: agents, operators and the tokens pep issued (SPEC 3.1, 5).
 *
 * The request path reads the registry from memory only.  Durable changes follow DESIGN
 * rule 2: the admin layer queues an audit item whose apply callback calls a
 * registry_sql_* function (writer thread, inside the record's transaction) and whose
 * done callback, once the batch committed, calls the matching registry_publish_*.  So a
 * change is visible to requests only once it and its audit record are durable, and it is
 * visible before the admin call that made it returns (revocation in particular).
 *
 * Records are immutable once published and reference counted; a change publishes a new
 * record in place of the old.  Readers retain what they look up and release it when the
 * request ends, so a concurrent change never frees what a request is reading.
 *
 * Threads: registry_get_* / registry_is_revoked / registry_list_* from any thread
 * (rwlock `lock` guards the maps); registry_sql_* on the audit writer thread only;
 * registry_publish_* from the writer thread's done callbacks or at startup.
 */
#ifndef PEP_REGISTRY_H
#define PEP_REGISTRY_H

#include "pep/common.h"
#include "pep/token.h"

#include <jansson.h>
#include <sqlite3.h>

struct agent {
    char *id;
    char *owner;
    char **tenants; /* the first is the default tenant of routes without {tenant} */
    size_t tenants_len;
    char **scopes;
    size_t scopes_len;
    bool enabled;
    /* Managed by the policy file: seeded from it and not changed through the admin API
     * since.  Reloads update (and, when it leaves the file, disable) only such agents: an
     * operator's disable or scope removal must survive a reload or restart. */
    bool from_policy;
    int64_t created_at_us;
    int64_t updated_at_us;
    int refcount; /* atomic */
};

struct operator_rec {
    char *id;
    char **roles;
    size_t roles_len;
    int64_t created_at_us;
    int refcount; /* atomic */
};

struct token_rec {
    char jti[TOKEN_JTI_SIZE];
    char *subject;       /* agent or operator id */
    bool operator_token; /* aud pep-admin */
    int64_t issued_at_s;
    int64_t expires_at_s;
    int64_t revoked_at_s; /* 0 while valid */
    uint64_t order;       /* publication order (set by the registry): lists are newest last */
};

/* Builds a new agent record (refcount 1); strings are copied.  NULL on ENOMEM. */
struct agent *agent_new(const char *id, const char *owner, const char *const *tenants,
                        size_t tenants_len, const char *const *scopes, size_t scopes_len,
                        bool enabled, int64_t created_at_us, int64_t updated_at_us);
/* Copy of a with another enabled flag and update time (from_policy false: an admin change). */
struct agent *agent_with_enabled(const struct agent *a, bool enabled, int64_t now_us);
struct agent *agent_retain(struct agent *a);
void agent_release(struct agent *a);
bool agent_has_tenant(const struct agent *a, const char *tenant, size_t len);
/* The agent's JSON view {id, owner, tenants, scopes, enabled, managed_by ("policy" or
 * "admin"), created_at, updated_at}. */
json_t *agent_to_json(const struct agent *a);
/* True when both describe the same identity (id, owner, tenants, scopes, enabled). */
bool agent_same(const struct agent *a, const struct agent *b);

struct operator_rec *operator_new(const char *id, const char *const *roles, size_t roles_len,
                                  int64_t created_at_us);
struct operator_rec *operator_retain(struct operator_rec *o);
void operator_release(struct operator_rec *o);
bool operator_has_role(const struct operator_rec *o, const char *role);
json_t *operator_to_json(const struct operator_rec *o);

json_t *token_rec_to_json(const struct token_rec *t);
/* A JSON array of n strings (new reference): tenants, scopes, roles in views and records. */
json_t *registry_strings_json(const char *const *v, size_t n);

struct registry;

struct registry *registry_new(void);
void registry_free(struct registry *r);

/* SQL creating the registry's tables (passed to audit_open as schema_extra). */
const char *registry_schema_sql(void);
/* Loads every table into memory (startup, before any request). */
int registry_load(struct registry *r, sqlite3 *db, struct pep_err *err);

/* Lookups: a retained record or NULL. */
struct agent *registry_get_agent(struct registry *r, const char *id);
struct operator_rec *registry_get_operator(struct registry *r, const char *id);
bool registry_is_revoked(struct registry *r, const char *jti);
/* What the store knows of a token (one lookup, for the request path).  SPEC 1: a token
 * whose jti the store does not know (issued after the backup a store was restored from)
 * is not valid. */
enum registry_token_state { REGISTRY_TOKEN_UNKNOWN, REGISTRY_TOKEN_LIVE, REGISTRY_TOKEN_REVOKED };
enum registry_token_state registry_token_state(struct registry *r, const char *jti);
/* Copies the token record; returns false when unknown. */
bool registry_get_token(struct registry *r, const char *jti, struct token_rec *out);

/* The latest expiry (seconds) of the tokens of both kinds not revoked and issued at or
 * after issued_since_s, or 0 when there is none: how long a rotated-out signing key must
 * keep verifying (pep/admin_keys.c).  Any thread. */
int64_t registry_latest_expiry(struct registry *r, int64_t issued_since_s);

/* Lists as JSON arrays (new references), sorted by id (agents, operators) or by issue
 * time (tokens, oldest first).  agent_filter may be NULL. */
json_t *registry_list_agents(struct registry *r);
/* Tokens of both kinds (SPEC 5 GET /admin/v1/tokens): all of them when agent and
 * operator_id are NULL, else those of the agent and those of the operator named. */
json_t *registry_list_tokens(struct registry *r, const char *agent, const char *operator_id);
/* The agents managed by the policy file: an array of *len retained agents (release each,
 * then free the array), or NULL with *len 0 when memory ran out. */
struct agent **registry_policy_agents(struct registry *r, size_t *len);

/* Writer thread, inside the audit transaction.  Return 0 or PEP_EDB. */
int registry_sql_put_agent(sqlite3 *db, const struct agent *a);
int registry_sql_put_operator(sqlite3 *db, const struct operator_rec *o);
int registry_sql_put_token(sqlite3 *db, const struct token_rec *t);
int registry_sql_revoke_token(sqlite3 *db, const char *jti, int64_t revoked_at_s);

/* Make a committed change visible.  publish_* take over the caller's reference. */
void registry_publish_agent(struct registry *r, struct agent *a);
void registry_publish_operator(struct registry *r, struct operator_rec *o);
void registry_publish_token(struct registry *r, const struct token_rec *t);
void registry_publish_revoke(struct registry *r, const char *jti, int64_t revoked_at_s);
/* Undoes a revocation published before its record was written, when that record could
 * not be written (admin.c). */
void registry_unpublish_revoke(struct registry *r, const char *jti);

#endif
