/*
 * decide.c — SPEC 3.2 steps 1-4 as one pure function.  See decide.h.
 */
#include "pep/decide.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

bool scope_grants(const char *granted, const char *wanted) {
    if (strcmp(granted, wanted) == 0 || strcmp(granted, "*") == 0) return true;
    size_t n = strlen(granted);
    /* "x.*" grants "x.anything" (any non-empty remainder), not "x" itself. */
    return n >= 2 && granted[n - 1] == '*' && granted[n - 2] == '.' &&
           strncmp(granted, wanted, n - 1) == 0 && wanted[n - 1] != '\0';
}

/* True when some scope in v grants wanted. */
static bool any_grants(char *const *v, size_t n, const char *wanted) {
    for (size_t i = 0; i < n; i++)
        if (scope_grants(v[i], wanted)) return true;
    return false;
}

bool scope_effective_grants(const struct token_claims *claims, const struct agent *agent,
                            const char *wanted) {
    /* Both must grant it: a token cannot exceed the agent's current scopes, and removing a
     * scope from the agent takes effect without reissuing tokens. */
    return any_grants(claims->scopes, claims->scopes_len, wanted) &&
           any_grants(agent->scopes, agent->scopes_len, wanted);
}

static void deny(struct decision *out, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void deny(struct decision *out, int status, const char *code, const char *fmt, ...) {
    out->allow = false;
    out->status = status;
    out->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out->reason, sizeof out->reason, fmt, ap);
    va_end(ap);
}

bool decide_authenticated(const struct decide_input *in, struct decision *out) {
    if (!in->token_present) {
        deny(out, 401, "invalid_token", "missing bearer token");
        return false;
    }
    if (in->token_status != TOKEN_OK || !in->claims) {
        deny(out, 401, "invalid_token", "%s", token_status_message(in->token_status));
        return false;
    }
    if (in->token_unknown) {
        /* SPEC 1: signed by pep, but unknown to its store (a store restored from a backup
         * older than the token): it could never be listed or revoked. */
        deny(out, 401, "invalid_token", "token is unknown to this pep's store");
        return false;
    }
    if (in->token_revoked) {
        deny(out, 401, "invalid_token", "token has been revoked");
        return false;
    }
    if (!in->agent) {
        deny(out, 401, "invalid_token", "unknown agent %s", in->claims->sub);
        return false;
    }
    if (!in->agent->enabled) {
        deny(out, 401, "invalid_token", "agent %s is disabled", in->agent->id);
        return false;
    }
    return true;
}

void decide(const struct decide_input *in, struct decision *out) {
    memset(out, 0, sizeof *out);
    if (!in->match || !in->match->route) {
        deny(out, 404, "no_route", "no route matches this method and path");
        return;
    }
    const struct route *route = in->match->route;
    out->action = route->action;

    /* 2. authentication */
    if (!decide_authenticated(in, out)) return;

    /* 3. tenant: the {tenant} path parameter, else the agent's first tenant */
    const struct agent *agent = in->agent;
    if (in->match->tenant) {
        out->tenant = in->match->tenant->value;
        out->tenant_len = in->match->tenant->value_len;
        if (!agent_has_tenant(agent, out->tenant, out->tenant_len)) {
            char tenant[128];
            snprintf(tenant, sizeof tenant, "%.*s", (int)out->tenant_len, out->tenant);
            deny(out, 403, "tenant_mismatch", "agent %s may not act for tenant %s", agent->id,
                 tenant);
            return;
        }
    } else if (agent->tenants_len > 0) {
        out->tenant = agent->tenants[0];
        out->tenant_len = strlen(agent->tenants[0]);
    } else {
        /* Fail closed: an agent with no tenant acts for nobody. */
        deny(out, 403, "tenant_mismatch", "agent %s has no tenant", agent->id);
        return;
    }

    /* 4. scope */
    const char *scope = route->action->scope;
    if (!scope_effective_grants(in->claims, agent, scope)) {
        deny(out, 403, "insufficient_scope", "agent %s lacks scope %s", agent->id, scope);
        return;
    }

    out->allow = true;
    out->status = 200;
    out->code = "ok";
    snprintf(out->reason, sizeof out->reason, "allowed by scope %s", scope);
}
