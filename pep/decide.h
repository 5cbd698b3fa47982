/*
 * decide.h — the decision core (SPEC 3.2), a pure function (DESIGN rule 1).
 *
 * Given the compiled policy, the matched route, what identity checks found and `now`,
 * decide() says allow or deny, with the HTTP status, the SPEC 3.3 code and a reason
 * that is safe to show (it never contains a token).  It touches no socket, file or
 * clock, so it is unit-tested exhaustively without a server.
 *
 * Order (first failing step wins): route (404 no_route) → authentication (401
 * invalid_token) → tenant (403 tenant_mismatch) → scope (403 insufficient_scope).
 * Controls and rate limits (steps 5-6) arrive with their own issue; the policy compiler
 * refuses policies that use them until then.
 *
 * Threads: any.
 */
#ifndef PEP_DECIDE_H
#define PEP_DECIDE_H

#include "pep/registry.h"
#include "pep/route.h"
#include "pep/token.h"

/* What the listener found out about the caller before deciding. */
struct decide_input {
    const struct policy *policy;
    const struct route_match *match;   /* NULL when no route matched */
    bool token_present;                /* an Authorization: Bearer header was sent */
    enum token_status token_status;    /* result of token_verify when present */
    const struct token_claims *claims; /* when token_status == TOKEN_OK */
    bool token_revoked;                /* claims->jti is revoked */
    bool token_unknown;                /* the store has no record of claims->jti */
    const struct agent *agent;         /* registry record of claims->sub, or NULL */
    int64_t now_s;
};

struct decision {
    bool allow;
    int status;                  /* HTTP status: 200 for allow */
    const char *code;            /* SPEC 3.3 code, "ok" for allow (static) */
    char reason[256];            /* human-readable; no secrets */
    const struct action *action; /* the route's action, when a route matched */
    const char *tenant;          /* the request's tenant (not NUL-terminated), or NULL */
    size_t tenant_len;
};

void decide(const struct decide_input *in, struct decision *out);

/* Step 2 alone: true when the caller proved an identity; otherwise *out is the 401
 * invalid_token refusal, with why (for pep's own endpoints, which have no route). */
bool decide_authenticated(const struct decide_input *in, struct decision *out);

/* True when `granted` grants `wanted`: equal, "*", or "x.*" granting "x.anything". */
bool scope_grants(const char *granted, const char *wanted);

/* True when wanted is granted by a scope held in both the token and the agent (effective
 * scopes = token scopes ∩ agent's current scopes, SPEC 3.1). */
bool scope_effective_grants(const struct token_claims *claims, const struct agent *agent,
                            const char *wanted);

#endif
