/*
 * change.h — a change to the registry (an agent, an operator, a token, a revocation) and
 * the record that says what it set.  The admin API and pep's own seeding both write their
 * changes this way (DESIGN rule 2): the change's `apply` writes the registry table inside
 * the transaction of its audit record, and the change is published to memory — after the
 * commit, or, for what a decision reads (change_publishes_early), before the record is
 * queued and undone if it cannot be written.
 *
 * Threads: change_apply on the audit writer; the others where their caller is.
 */
#ifndef PEP_CHANGE_H
#define PEP_CHANGE_H

#include "pep/keys.h"
#include "pep/policy.h"
#include "pep/registry.h"

#include <jansson.h>
#include <sqlite3.h>

enum change_kind { CHANGE_PUT_AGENT, CHANGE_PUT_OPERATOR, CHANGE_PUT_TOKEN, CHANGE_REVOKE_TOKEN };

struct change {
    enum change_kind kind;
    struct registry *registry;
    struct agent *agent;         /* PUT_AGENT (reference moves to the registry) */
    struct operator_rec *op_rec; /* PUT_OPERATOR */
    struct token_rec token;      /* PUT_TOKEN, REVOKE_TOKEN (jti, revoked_at_s) */
    /* Published before its record was queued; undone if the record could not be written: */
    bool published_early;
    struct agent *previous; /* PUT_AGENT: the agent it replaced (retained) */
    bool was_revoked;       /* REVOKE_TOKEN: the token was revoked already */
};

/* Releases what ch holds (not ch itself). */
void change_clear(struct change *ch);

/* The audit writer's apply callback (arg: struct change *). */
int change_apply(sqlite3 *db, void *arg);

/* Makes a committed change visible in memory. */
void change_publish(struct change *ch);

/*
 * SPEC 3.1 and 6.5: what a decision reads of the registry (revocations, an agent's scopes,
 * tenants and enabled flag) changes in memory no later than its record is queued, as one
 * step for the decisions (server.decision_lock): a decision queued after the record of a
 * revocation was made knowing it, and none queued before it was.  A new agent and the
 * other changes (operators, issued tokens) cannot affect a decision before their answer,
 * so they are published once committed.
 */
bool change_publishes_early(const struct change *ch);
/* Under the decision lock, held for writing. */
void change_publish_early(struct change *ch);
/* Its record could not be written: nothing was changed, in memory either. */
void change_unpublish(struct change *ch);

/* A fresh `admin` record by operator_id for action (allowed, code ok); request_id NULL
 * gives it an id of its own. */
json_t *change_record(const char *request_id, const char *operator_id, const char *action);

/* What a change set (SPEC 6.2: an admin record says what was set, not only whose). */
json_t *change_agent_set_json(const struct agent *a);
json_t *change_operator_set_json(const struct operator_rec *o);
/* A token's grant: its scopes, acr and expiry (never the token). */
json_t *change_token_set_json(const char *const *scopes, size_t n, const char *acr,
                              int64_t expires_at_s);
/* An operator token's grant: the operator's roles it carries, and its expiry. */
json_t *change_operator_token_set_json(const struct operator_rec *o, const struct token_rec *t);

/* Fills ch (kind PUT_TOKEN) for a token just issued; 0 or PEP_ENOMEM. */
int change_token(struct change *ch, struct registry *reg, const char *subject, bool operator_token,
                 const char *jti, int64_t now_s, int64_t ttl_s);

/* Issues an operator token carrying all of o's roles (*token: the caller frees it with
 * change_free_secret) and fills ch to record it.  0, or a negative code. */
int change_issue_operator_token(struct keyring *keys, struct registry *reg, const struct policy *p,
                                const struct operator_rec *o, int64_t ttl_s, char **token,
                                struct change *ch);

/* Frees a token string after overwriting it: it must not linger in freed memory. */
void change_free_secret(char *secret);

#endif
