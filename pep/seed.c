/*
 * seed.c — what pep writes on its own: the bootstrap operator and admin.token, and the
 * agents of the policy file.  See seed.h.
 */
#include "pep/seed.h"
#include "pep/change.h"
#include "pep/record.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BOOTSTRAP_OPERATOR "admin"
#define BOOTSTRAP_TOKEN_TTL_S (365 * 86400)

/* admin.token is being minted again (the file was deleted to get a new one): whoever kept a
 * copy of the old one must not keep its power.  Every live token of the bootstrap operator
 * is revoked, each with its record (startup only: blocks on the writer). */
static int revoke_bootstrap_tokens(struct server *s) {
    json_t *list = registry_list_tokens(s->registry, NULL, BOOTSTRAP_OPERATOR);
    size_t i;
    json_t *t;
    int rc = list ? 0 : PEP_ENOMEM;
    int64_t now = pep_now_us() / 1000000;
    json_array_foreach(list, i, t) {
        const char *jti = json_string_value(json_object_get(t, "jti"));
        if (rc != 0 || !jti || !json_is_null(json_object_get(t, "revoked_at"))) continue;
        struct change ch = {.kind = CHANGE_REVOKE_TOKEN, .registry = s->registry};
        snprintf(ch.token.jti, sizeof ch.token.jti, "%s", jti);
        ch.token.revoked_at_s = now;
        json_t *rec = change_record(NULL, "pep", "tokens.revoke");
        json_object_set_new(rec, "jti", json_string(jti));
        json_object_set_new(rec, "reason",
                            json_string("admin.token re-minted: the previous bootstrap token is "
                                        "revoked"));
        rc = server_audit_sync(s, rec, change_apply, &ch, NULL);
        if (rc == 0) change_publish(&ch);
        change_clear(&ch);
    }
    json_decref(list);
    return rc;
}

int server_bootstrap_admin(struct server *s, struct pep_err *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/admin.token", s->data_dir);
    if (access(path, F_OK) == 0) return 0;
    int rc = 0;
    const char *roles[] = {"admin"};
    struct operator_rec *o = registry_get_operator(s->registry, BOOTSTRAP_OPERATOR);
    if (!o) {
        struct change ch = {.kind = CHANGE_PUT_OPERATOR, .registry = s->registry};
        ch.op_rec = operator_new(BOOTSTRAP_OPERATOR, roles, 1, pep_now_us());
        json_t *rec = change_record(NULL, "pep", "operators.put");
        json_object_set_new(rec, "reason",
                            json_string("bootstrap operator created at first start"));
        rc = ch.op_rec ? server_audit_sync(s, rec, change_apply, &ch, NULL) : PEP_ENOMEM;
        if (rc == 0) change_publish(&ch);
        change_clear(&ch);
        if (rc != 0) return pep_err_set(err, rc, "cannot create the bootstrap operator");
        o = registry_get_operator(s->registry, BOOTSTRAP_OPERATOR);
    } else if ((rc = revoke_bootstrap_tokens(s)) != 0) {
        operator_release(o);
        return pep_err_set(err, rc, "cannot revoke the previous bootstrap tokens");
    }
    char *token = NULL;
    struct change ch = {0};
    rc = change_issue_operator_token(s->keys, s->registry, s->policy, o, BOOTSTRAP_TOKEN_TTL_S,
                                     &token, &ch);
    json_t *set = rc == 0 ? change_operator_token_set_json(o, &ch.token) : NULL;
    operator_release(o);
    if (rc == 0) {
        json_t *rec = change_record(NULL, "pep", "operators.token");
        json_object_set_new(rec, "jti", json_string(ch.token.jti));
        json_object_set_new(rec, "set", set);
        json_object_set_new(rec, "reason", json_string("bootstrap token written to admin.token"));
        rc = server_audit_sync(s, rec, change_apply, &ch, NULL);
        if (rc == 0) {
            change_publish(&ch);
            size_t len = strlen(token);
            token[len] = '\n';
            rc = pep_write_file_atomic(path, token, len + 1, 0600);
            token[len] = '\0';
        }
    }
    change_free_secret(token);
    change_clear(&ch);
    return rc ? pep_err_set(err, rc, "cannot write %s", path) : 0;
}

/* Writes one agent state from the policy file with its system record (agents.seed). */
static int seed_write(struct server *s, const struct policy *p, struct agent *a,
                      const char *reason) {
    struct change ch = {
        .kind = CHANGE_PUT_AGENT, .registry = s->registry, .agent = agent_retain(a)};
    json_t *rec = server_record("system", NULL);
    json_object_set_new(rec, "action", json_string("agents.seed"));
    json_object_set_new(rec, "agent", json_string(a->id));
    json_object_set_new(rec, "set", change_agent_set_json(a));
    json_object_set_new(rec, "policy_hash", json_string(p->policy_hash));
    json_object_set_new(rec, "reason", json_string(reason));
    int rc = server_audit_sync(s, rec, change_apply, &ch, NULL);
    if (rc == 0) change_publish(&ch);
    change_clear(&ch);
    return rc;
}

/* Disables the policy-managed agents that p no longer lists: removing an agent from the
 * file must stop its tokens, as deleting a line from a config file is expected to. */
static int seed_disable_removed(struct server *s, const struct policy *p, int64_t now) {
    size_t n = 0;
    struct agent **managed = registry_policy_agents(s->registry, &n);
    if (!managed) return PEP_ENOMEM; /* a removed agent left enabled would keep its tokens */
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && managed[i]->enabled && !policy_find_agent(p, managed[i]->id)) {
            struct agent *off = agent_with_enabled(managed[i], false, now);
            if (!off) {
                rc = PEP_ENOMEM;
            } else {
                off->from_policy = true;
                rc = seed_write(s, p, off, "agent removed from the policy file: disabled");
                agent_release(off);
            }
        }
        agent_release(managed[i]);
    }
    free(managed);
    return rc;
}

int server_seed_agents(struct server *s, const struct policy *p) {
    int rc = 0;
    int64_t now = pep_now_us();
    for (size_t i = 0; rc == 0 && i < p->agents_len; i++) {
        const struct policy_agent *pa = &p->agents[i];
        struct agent *old = registry_get_agent(s->registry, pa->id);
        struct agent *seeded =
            agent_new(pa->id, pa->owner, (const char *const *)pa->tenants, pa->tenants_len,
                      (const char *const *)pa->scopes, pa->scopes_len, pa->enabled,
                      old ? old->created_at_us : now, now);
        if (!seeded) {
            rc = PEP_ENOMEM;
        } else if (old && !old->from_policy) {
            /* Changed through the admin API: the registry is authoritative for it. */
            if (!agent_same(old, seeded))
                fprintf(stderr,
                        "pep: agent %s is managed through the admin API; its entry in the "
                        "policy file is not applied\n",
                        pa->id);
        } else if (!old || !agent_same(old, seeded)) {
            seeded->from_policy = true;
            rc = seed_write(s, p, seeded, "agent seeded from the policy file");
        }
        agent_release(seeded);
        agent_release(old);
    }
    if (rc == 0) rc = seed_disable_removed(s, p, now);
    return rc;
}
