/*
 * change.c — registry changes written with their record.  See change.h.
 */
#include "pep/change.h"
#include "pep/record.h"
#include "pep/token.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void change_clear(struct change *ch) {
    agent_release(ch->agent);
    agent_release(ch->previous);
    operator_release(ch->op_rec);
    free(ch->token.subject);
    memset(ch, 0, sizeof *ch);
}

int change_apply(sqlite3 *db, void *arg) {
    struct change *ch = arg;
    switch (ch->kind) {
    case CHANGE_PUT_AGENT:
        return registry_sql_put_agent(db, ch->agent);
    case CHANGE_PUT_OPERATOR:
        return registry_sql_put_operator(db, ch->op_rec);
    case CHANGE_PUT_TOKEN:
        return registry_sql_put_token(db, &ch->token);
    case CHANGE_REVOKE_TOKEN:
        return registry_sql_revoke_token(db, ch->token.jti, ch->token.revoked_at_s);
    }
    return PEP_EINVAL;
}

void change_publish(struct change *ch) {
    struct registry *reg = ch->registry;
    switch (ch->kind) {
    case CHANGE_PUT_AGENT:
        registry_publish_agent(reg, ch->agent);
        ch->agent = NULL;
        break;
    case CHANGE_PUT_OPERATOR:
        registry_publish_operator(reg, ch->op_rec);
        ch->op_rec = NULL;
        break;
    case CHANGE_PUT_TOKEN:
        registry_publish_token(reg, &ch->token);
        break;
    case CHANGE_REVOKE_TOKEN:
        /* Cached verifications of this token stay valid claims-wise; the revocation set
         * is checked on every request, so nothing to evict. */
        registry_publish_revoke(reg, ch->token.jti, ch->token.revoked_at_s);
        break;
    }
}

bool change_publishes_early(const struct change *ch) {
    return ch->kind == CHANGE_REVOKE_TOKEN || ch->kind == CHANGE_PUT_AGENT;
}

void change_publish_early(struct change *ch) {
    struct registry *reg = ch->registry;
    if (ch->kind == CHANGE_PUT_AGENT) {
        ch->previous = registry_get_agent(reg, ch->agent->id);
        if (!ch->previous) return; /* a new agent: published once committed */
        registry_publish_agent(reg, agent_retain(ch->agent)); /* ch keeps its own for apply */
    } else {
        registry_publish_revoke(reg, ch->token.jti, ch->token.revoked_at_s);
    }
    ch->published_early = true;
}

void change_unpublish(struct change *ch) {
    struct registry *reg = ch->registry;
    if (ch->kind == CHANGE_PUT_AGENT) {
        registry_publish_agent(reg, ch->previous);
        ch->previous = NULL;
    } else if (!ch->was_revoked) {
        registry_unpublish_revoke(reg, ch->token.jti);
    }
}

json_t *change_record(const char *request_id, const char *operator_id, const char *action) {
    json_t *rec = server_record("admin", request_id);
    if (rec) {
        json_object_set_new(rec, "operator", json_string(operator_id));
        json_object_set_new(rec, "action", json_string(action));
        json_object_set_new(rec, "decision", json_string("allow"));
        json_object_set_new(rec, "code", json_string("ok"));
    }
    return rec;
}

json_t *change_agent_set_json(const struct agent *a) {
    return json_pack("{s:s, s:o, s:o, s:b}", "owner", a->owner, "tenants",
                     registry_strings_json((const char *const *)a->tenants, a->tenants_len),
                     "scopes", registry_strings_json((const char *const *)a->scopes, a->scopes_len),
                     "enabled", a->enabled);
}

json_t *change_operator_set_json(const struct operator_rec *o) {
    return json_pack("{s:o}", "roles",
                     registry_strings_json((const char *const *)o->roles, o->roles_len));
}

json_t *change_token_set_json(const char *const *scopes, size_t n, const char *acr,
                              int64_t expires_at_s) {
    char at[32];
    pep_format_rfc3339_us(expires_at_s * 1000000, at);
    json_t *set =
        json_pack("{s:o, s:s}", "scopes", registry_strings_json(scopes, n), "expires_at", at);
    if (acr) json_object_set_new(set, "acr", json_string(acr));
    return set;
}

json_t *change_operator_token_set_json(const struct operator_rec *o, const struct token_rec *t) {
    json_t *set = change_operator_set_json(o);
    char at[32];
    pep_format_rfc3339_us(t->expires_at_s * 1000000, at);
    json_object_set_new(set, "expires_at", json_string(at));
    return set;
}

int change_token(struct change *ch, struct registry *reg, const char *subject, bool operator_token,
                 const char *jti, int64_t now_s, int64_t ttl_s) {
    memset(ch, 0, sizeof *ch);
    ch->kind = CHANGE_PUT_TOKEN;
    ch->registry = reg;
    snprintf(ch->token.jti, sizeof ch->token.jti, "%s", jti);
    ch->token.subject = strdup(subject);
    ch->token.operator_token = operator_token;
    ch->token.issued_at_s = now_s;
    ch->token.expires_at_s = now_s + ttl_s;
    return ch->token.subject ? 0 : PEP_ENOMEM;
}

int change_issue_operator_token(struct keyring *keys, struct registry *reg, const struct policy *p,
                                const struct operator_rec *o, int64_t ttl_s, char **token,
                                struct change *ch) {
    int64_t now = pep_now_us() / 1000000;
    struct token_request tr = {.issuer = p->issuer,
                               .aud = "pep-admin",
                               .sub = o->id,
                               .roles = (const char *const *)o->roles,
                               .roles_len = o->roles_len,
                               .now_s = now,
                               .ttl_s = ttl_s};
    char jti[TOKEN_JTI_SIZE];
    int rc = token_issue(keys, &tr, token, jti, NULL);
    if (rc == 0) rc = change_token(ch, reg, o->id, true, jti, now, ttl_s);
    return rc;
}

void change_free_secret(char *secret) {
    if (secret) {
        explicit_bzero(secret, strlen(secret));
        free(secret);
    }
}
