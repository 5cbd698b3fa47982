/*
 * admin.c — the admin API (SPEC 5) for agents, tokens, operators, policy and audit
 * verification.
 *
 * Authentication: an operator JWT (aud "pep-admin"); its effective roles are the token's
 * roles that the operator still holds.  `admin` may do everything, `auditor` reads,
 * `approver` decides approvals.
 *
 * Every state change follows DESIGN rule 2: the request is suspended, an audit item of
 * kind `admin` is queued whose apply callback writes the registry table in the same
 * transaction, and whose done callback publishes the change to memory before resuming
 * the request.  So when the call returns, the change is durable, audited and in force
 * (a revoked token is refused from then on).
 *
 * Threads: handlers on the admin listener thread; apply/done on the audit writer thread.
 */
#include "pep/server.h"
#include "pep/util.h"
#include "pep/verifier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define BOOTSTRAP_OPERATOR "admin"
#define BOOTSTRAP_TOKEN_TTL_S (365 * 86400)

/* ---- state changes written through the audit writer ----------------------------------- */

enum admin_op_kind { OP_PUT_AGENT, OP_PUT_OPERATOR, OP_PUT_TOKEN, OP_REVOKE_TOKEN };

struct admin_op {
    enum admin_op_kind kind;
    struct server *srv;
    struct request *req;     /* NULL for synchronous (startup) use */
    struct agent *agent;     /* OP_PUT_AGENT (reference moves to the registry) */
    struct operator_rec *op; /* OP_PUT_OPERATOR */
    struct token_rec token;  /* OP_PUT_TOKEN, OP_REVOKE_TOKEN (jti, revoked_at_s) */
    /* Published before its record was queued (see commit_async); undone if the record
     * could not be written: */
    bool published_early;
    struct agent *previous; /* OP_PUT_AGENT: the agent it replaced (retained) */
    bool was_revoked;       /* OP_REVOKE_TOKEN: the token was revoked already */
    int status;             /* HTTP status of the answer once committed */
    json_t *answer;         /* the answer once committed */
};

static void admin_op_free(void *p) {
    struct admin_op *op = p;
    agent_release(op->agent);
    agent_release(op->previous);
    operator_release(op->op);
    free(op->token.subject);
    json_decref(op->answer);
    free(op);
}

static int op_apply(sqlite3 *db, void *arg) {
    struct admin_op *op = arg;
    switch (op->kind) {
    case OP_PUT_AGENT:
        return registry_sql_put_agent(db, op->agent);
    case OP_PUT_OPERATOR:
        return registry_sql_put_operator(db, op->op);
    case OP_PUT_TOKEN:
        return registry_sql_put_token(db, &op->token);
    case OP_REVOKE_TOKEN:
        return registry_sql_revoke_token(db, op->token.jti, op->token.revoked_at_s);
    }
    return PEP_EINVAL;
}

/* Makes a committed change visible in memory. */
static void op_publish(struct admin_op *op) {
    struct registry *reg = op->srv->registry;
    switch (op->kind) {
    case OP_PUT_AGENT:
        registry_publish_agent(reg, op->agent);
        op->agent = NULL;
        break;
    case OP_PUT_OPERATOR:
        registry_publish_operator(reg, op->op);
        op->op = NULL;
        break;
    case OP_PUT_TOKEN:
        registry_publish_token(reg, &op->token);
        break;
    case OP_REVOKE_TOKEN:
        registry_publish_revoke(reg, op->token.jti, op->token.revoked_at_s);
        /* Cached verifications of this token stay valid claims-wise; the revocation set
         * is checked on every request, so nothing to evict. */
        break;
    }
}

/*
 * SPEC 3.1 and 6.5: what a decision reads of the registry (revocations, an agent's scopes,
 * tenants and enabled flag) changes in memory no later than its record is queued, as one
 * step for the decisions (server.decision_lock): a decision queued after the record of a
 * revocation was made knowing it, and none queued before it was.  A new agent and the
 * other changes (operators, issued tokens) cannot affect a decision before their answer,
 * so they are published once committed.
 */
static bool op_publishes_early(const struct admin_op *op) {
    return op->kind == OP_REVOKE_TOKEN || op->kind == OP_PUT_AGENT;
}

/* Under the decision lock, held for writing. */
static void op_publish_early(struct admin_op *op) {
    struct registry *reg = op->srv->registry;
    if (op->kind == OP_PUT_AGENT) {
        op->previous = registry_get_agent(reg, op->agent->id);
        if (!op->previous) return; /* a new agent: published once committed */
        registry_publish_agent(reg, agent_retain(op->agent)); /* op keeps its own for apply */
    } else {
        registry_publish_revoke(reg, op->token.jti, op->token.revoked_at_s);
    }
    op->published_early = true;
}

/* The record could not be written: nothing was changed, in memory either. */
static void op_unpublish(struct admin_op *op) {
    struct registry *reg = op->srv->registry;
    if (op->kind == OP_PUT_AGENT) {
        registry_publish_agent(reg, op->previous);
        op->previous = NULL;
    } else if (!op->was_revoked) {
        registry_unpublish_revoke(reg, op->token.jti);
    }
}

static void op_done(void *arg, int rc, int64_t seq) {
    struct admin_op *op = arg;
    if (op->published_early) {
        if (rc != 0) op_unpublish(op);
    } else if (rc == 0) {
        op_publish(op);
    }
    op->req->audit_rc = rc;
    op->req->audit_seq = seq;
    request_resume(op->req);
}

static json_t *admin_record(const struct request *r, const char *operator_id, const char *action) {
    json_t *rec = server_record("admin", r ? r->id : NULL);
    if (rec) {
        json_object_set_new(rec, "operator", json_string(operator_id));
        json_object_set_new(rec, "action", json_string(action));
        json_object_set_new(rec, "decision", json_string("allow"));
        json_object_set_new(rec, "code", json_string("ok"));
    }
    return rec;
}

/* Queues op with its audit record and suspends the request; the answer is sent by
 * admin_finish once the transaction committed. */
static enum MHD_Result commit_async(struct request *r, struct admin_op *op, json_t *record) {
    op->req = r;
    op->srv = r->srv;
    r->admin_op = op;
    r->admin_op_free = admin_op_free;
    request_suspend(r);
    bool early = record && op_publishes_early(op);
    if (early) {
        pthread_rwlock_wrlock(&r->srv->decision_lock);
        op_publish_early(op);
    }
    int rc =
        record ? audit_submit(r->srv->audit, record, op_apply, op, op_done, op) : PEP_EUNAVAILABLE;
    if (early) pthread_rwlock_unlock(&r->srv->decision_lock);
    if (rc != 0) op_done(op, rc, 0);
    return request_wait(r);
}

static void audit_verify_finish(struct request *r, const struct verify_job *job);
static void verify_job_free(void *job);

void admin_finish(struct request *r) {
    if (r->admin_op && r->admin_op_free == verify_job_free) {
        audit_verify_finish(r, r->admin_op);
        return;
    }
    struct admin_op *op = r->admin_op;
    if (r->audit_rc != 0 || !op) {
        r->audit_seq = 0;
        reply_error(r, 503, "audit_unavailable",
                    "the change could not be written to the audit log; nothing was changed", NULL);
        return;
    }
    reply_json(r, op->status, json_incref(op->answer));
}

/* ---- request helpers ------------------------------------------------------------------------ */

/* Frees a token string after overwriting it: it must not linger in freed memory. */
static void free_secret(char *secret) {
    if (secret) {
        explicit_bzero(secret, strlen(secret));
        free(secret);
    }
}

static enum MHD_Result bad_request(struct request *r, const char *fmt, const char *arg) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, arg ? arg : "");
    reply_error(r, 400, "bad_request", msg, NULL);
    return MHD_YES;
}

static enum MHD_Result not_found(struct request *r, const char *what, const char *id) {
    char msg[256];
    snprintf(msg, sizeof msg, "no %s '%s'", what, id);
    reply_error(r, 404, "not_found", msg, NULL);
    return MHD_YES;
}

/* Parses the body as a JSON object (an empty body is {}); NULL after answering 400. */
static json_t *body_object(struct request *r) {
    if (r->body_len == 0) return json_object();
    json_error_t jerr;
    json_t *doc = json_loadb(r->body, r->body_len, 0, &jerr);
    if (!json_is_object(doc)) {
        json_decref(doc);
        bad_request(r, "the body must be a JSON object", NULL);
        return NULL;
    }
    return doc;
}

/* A JSON array of strings that each pass `valid`, or (when allow_string) one space-separated
 * string of them, as a NULL-terminated vector whose strings point into `v` (or into
 * *scratch).  NULL when malformed. */
static const char **string_list(json_t *v, bool allow_string, bool (*valid)(const char *),
                                char **scratch, size_t *len) {
    const char **out = NULL;
    *len = 0;
    if (json_is_string(v) && allow_string) {
        *scratch = strdup(json_string_value(v));
        if (!*scratch) return NULL;
        out = calloc(strlen(*scratch) / 2 + 2, sizeof *out);
        for (char *save = NULL, *tok = strtok_r(*scratch, " ", &save); out && tok;
             tok = strtok_r(NULL, " ", &save)) {
            if (!valid(tok)) {
                free(out);
                return NULL;
            }
            out[(*len)++] = tok;
        }
        return out;
    }
    if (!json_is_array(v)) return NULL;
    out = calloc(json_array_size(v) + 1, sizeof *out);
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item) {
        const char *s = json_string_value(item);
        if (!out || !s || !valid(s)) {
            free(out);
            return NULL;
        }
        out[(*len)++] = s;
    }
    return out;
}

/* ttl as a duration string ("1h") or whole seconds; 0 when absent.  -1 when malformed. */
static int64_t ttl_seconds(json_t *v) {
    if (!v) return 0;
    if (json_is_integer(v)) return json_integer_value(v) > 0 ? json_integer_value(v) : -1;
    int64_t ms;
    if (json_is_string(v) && pep_parse_duration_ms(json_string_value(v), &ms) == 0)
        return ms >= 1000 ? ms / 1000 : -1;
    return -1;
}

/* ---- authentication ------------------------------------------------------------------------- */

/* Effective roles: the token's roles the operator still holds. */
static bool has_role(const struct request *r, const char *role) {
    for (size_t i = 0; i < r->claims->roles_len; i++) {
        const char *held = r->claims->roles[i];
        if ((strcmp(held, role) == 0 || strcmp(held, "admin") == 0) &&
            operator_has_role(r->operator_rec, held))
            return true;
    }
    return false;
}

/* Verifies the operator token; on failure answers 401 and returns false. */
static bool authenticate(struct request *r) {
    const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
    const char *msg = "missing bearer token";
    /* Checked when the head arrives and again with the body: the later check sees a
     * revocation in between, and replaces what the first one found. */
    token_claims_release(r->claims);
    operator_release(r->operator_rec);
    r->claims = NULL;
    r->operator_rec = NULL;
    if (h && strncasecmp(h, "Bearer ", 7) == 0) {
        const struct policy *p = r->policy;
        int64_t now = r->start_wall_us / 1000000;
        enum token_status st = token_verify(r->srv->verifier, r->srv->keys, h + 7, p->issuer,
                                            "pep-admin", now, p->clock_skew_ms / 1000, &r->claims);
        msg = token_status_message(st);
        if (st == TOKEN_OK) {
            r->operator_rec = registry_get_operator(r->srv->registry, r->claims->sub);
            enum registry_token_state ts = registry_token_state(r->srv->registry, r->claims->jti);
            if (ts == REGISTRY_TOKEN_REVOKED)
                msg = "token has been revoked";
            else if (ts == REGISTRY_TOKEN_UNKNOWN) /* SPEC 1 */
                msg = "token is unknown to this pep's store";
            else if (!r->operator_rec)
                msg = "unknown operator";
            else
                return true;
        }
    }
    reply_error(r, 401, "invalid_token", msg, NULL);
    return false;
}

static bool require_role(struct request *r, const char *role, const char *alt) {
    if (has_role(r, role) || (alt && has_role(r, alt))) return true;
    char msg[200];
    snprintf(msg, sizeof msg, "operator %s lacks role %s", r->claims->sub, role);
    reply_error(r, 403, "insufficient_scope", msg, NULL);
    return false;
}

/* ---- handlers ------------------------------------------------------------------------------- */

/* Commits op, whose record (agent or operator) was just built, answering it rendered:
 * audited as `action` with `target` under `target_key`.  An op whose record could not be
 * built (out of memory) is answered 500 and freed. */
/* What a change set (SPEC 6.2: an admin record says what was set, not only whose). */
static json_t *agent_set_json(const struct agent *a) {
    return json_pack("{s:s, s:o, s:o, s:b}", "owner", a->owner, "tenants",
                     registry_strings_json((const char *const *)a->tenants, a->tenants_len),
                     "scopes", registry_strings_json((const char *const *)a->scopes, a->scopes_len),
                     "enabled", a->enabled);
}

static json_t *operator_set_json(const struct operator_rec *o) {
    return json_pack("{s:o}", "roles",
                     registry_strings_json((const char *const *)o->roles, o->roles_len));
}

/* A token's grant: its scopes, acr and expiry (never the token). */
static json_t *token_set_json(const char *const *scopes, size_t n, const char *acr,
                              int64_t expires_at_s) {
    char at[32];
    pep_format_rfc3339_us(expires_at_s * 1000000, at);
    json_t *set =
        json_pack("{s:o, s:s}", "scopes", registry_strings_json(scopes, n), "expires_at", at);
    if (acr) json_object_set_new(set, "acr", json_string(acr));
    return set;
}

/* An operator token's grant: the operator's roles it carries, and its expiry. */
static json_t *operator_token_set_json(const struct operator_rec *o, const struct token_rec *t) {
    json_t *set = operator_set_json(o);
    char at[32];
    pep_format_rfc3339_us(t->expires_at_s * 1000000, at);
    json_object_set_new(set, "expires_at", json_string(at));
    return set;
}

static enum MHD_Result commit_put(struct request *r, struct admin_op *op, const char *action,
                                  const char *target_key, const char *target) {
    if (!op || (!op->agent && !op->op)) {
        if (op) admin_op_free(op);
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->answer = op->agent ? agent_to_json(op->agent) : operator_to_json(op->op);
    json_t *rec = admin_record(r, r->claims->sub, action);
    json_object_set_new(rec, target_key, json_string(target));
    json_object_set_new(rec, "set",
                        op->agent ? agent_set_json(op->agent) : operator_set_json(op->op));
    return commit_async(r, op, rec);
}

static enum MHD_Result put_agent(struct request *r) {
    json_t *body = body_object(r);
    if (!body) return MHD_YES;
    const char *id = json_string_value(json_object_get(body, "id"));
    json_t *owner_v = json_object_get(body, "owner");
    json_t *enabled_v = json_object_get(body, "enabled");
    char *scratch = NULL;
    size_t nt = 0, ns = 0;
    const char **tenants =
        string_list(json_object_get(body, "tenants"), false, pep_is_word, &scratch, &nt);
    const char **scopes =
        string_list(json_object_get(body, "scopes"), false, pep_is_scope_token, &scratch, &ns);
    enum MHD_Result rc = MHD_YES;
    if (!pep_is_id(id))
        bad_request(r, "'id' must be 1-128 characters of [A-Za-z0-9._@-]", NULL);
    else if (owner_v &&
             (!json_is_string(owner_v) || !pep_has_no_control(json_string_value(owner_v))))
        bad_request(r, "'owner' must be a string without control characters", NULL);
    else if (!tenants || nt == 0)
        bad_request(r,
                    "'tenants' must be a non-empty array of strings without whitespace or "
                    "control characters",
                    NULL);
    else if (!scopes)
        bad_request(r,
                    "'scopes' must be an array of RFC 6749 scope tokens (printable ASCII "
                    "except space, '\"' and '\\')",
                    NULL);
    else if (enabled_v && !json_is_boolean(enabled_v))
        bad_request(r, "'enabled' must be a boolean", NULL);
    else {
        int64_t now = pep_now_us();
        struct agent *old = registry_get_agent(r->srv->registry, id);
        struct admin_op *op = calloc(1, sizeof *op);
        if (op) {
            op->kind = OP_PUT_AGENT;
            /* Without "enabled", a replaced agent keeps its state: updating the scopes of an
             * agent disabled as compromised must not quietly re-enable it. */
            bool enabled = enabled_v ? json_is_true(enabled_v) : old ? old->enabled : true;
            op->agent = agent_new(id, json_string_value(owner_v), tenants, nt, scopes, ns, enabled,
                                  old ? old->created_at_us : now, now);
            op->status = old ? 200 : 201;
        }
        agent_release(old);
        rc = commit_put(r, op, "agents.put", "agent", id);
    }
    free(tenants);
    free(scopes);
    free(scratch);
    json_decref(body);
    return rc;
}

static enum MHD_Result set_agent_enabled(struct request *r, const char *id, bool enabled) {
    struct agent *old = registry_get_agent(r->srv->registry, id);
    if (!old) return not_found(r, "agent", id);
    struct admin_op *op = calloc(1, sizeof *op);
    if (op) {
        op->kind = OP_PUT_AGENT;
        op->agent = agent_with_enabled(old, enabled, pep_now_us());
        op->status = 200;
    }
    agent_release(old);
    return commit_put(r, op, enabled ? "agents.enable" : "agents.disable", "agent", id);
}

/* Builds the op that records a freshly issued token (not yet committed). */
static struct admin_op *token_op(const char *subject, bool operator_token, const char *jti,
                                 int64_t now_s, int64_t ttl_s, const char *token) {
    struct admin_op *op = calloc(1, sizeof *op);
    if (!op) return NULL;
    op->kind = OP_PUT_TOKEN;
    snprintf(op->token.jti, sizeof op->token.jti, "%s", jti);
    op->token.subject = strdup(subject);
    op->token.operator_token = operator_token;
    op->token.issued_at_s = now_s;
    op->token.expires_at_s = now_s + ttl_s;
    op->status = 201;
    char expires[32];
    pep_format_rfc3339_us((now_s + ttl_s) * 1000000, expires);
    op->answer = json_pack("{s:s, s:s, s:s}", "token", token, "jti", jti, "expires_at", expires);
    if (!op->token.subject || !op->answer) {
        admin_op_free(op);
        return NULL;
    }
    return op;
}

static enum MHD_Result issue_agent_token(struct request *r, const char *id) {
    struct agent *agent = registry_get_agent(r->srv->registry, id);
    if (!agent) return not_found(r, "agent", id);
    json_t *body = body_object(r);
    if (!body) {
        agent_release(agent);
        return MHD_YES;
    }
    const struct policy *p = r->policy;
    int64_t ttl = ttl_seconds(json_object_get(body, "ttl"));
    json_t *scopes_v = json_object_get(body, "scopes");
    json_t *acr_v = json_object_get(body, "acr");
    char *scratch = NULL;
    size_t ns = 0;
    const char **scopes = scopes_v ? string_list(scopes_v, true, pep_is_scope_token, &scratch, &ns)
                                   : (const char **)agent->scopes;
    if (!scopes_v) ns = agent->scopes_len;
    enum MHD_Result rc = MHD_YES;
    const char *missing = NULL;
    for (size_t i = 0; scopes && i < ns && !missing; i++) {
        bool granted = false;
        for (size_t j = 0; j < agent->scopes_len && !granted; j++)
            granted = scope_grants(agent->scopes[j], scopes[i]);
        if (!granted) missing = scopes[i];
    }
    if (ttl < 0)
        bad_request(r, "'ttl' must be a duration such as \"1h\" or whole seconds", NULL);
    else if (ttl > p->max_token_ttl_ms / 1000) /* no ttl * 1000: it could overflow */
        bad_request(r, "'ttl' exceeds identity.max_token_ttl", NULL);
    else if (!scopes)
        bad_request(r, "'scopes' must be an array of strings or a space-separated string", NULL);
    else if (missing)
        bad_request(r, "scope '%s' is not granted to this agent", missing);
    else if (acr_v && (!json_is_string(acr_v) || !*json_string_value(acr_v)))
        bad_request(r, "'acr' must be a non-empty string", NULL);
    else {
        if (ttl == 0) ttl = p->token_ttl_ms / 1000;
        int64_t now = pep_now_us() / 1000000;
        struct token_request tr = {.issuer = p->issuer,
                                   .aud = "pep",
                                   .sub = id,
                                   .scopes = scopes,
                                   .scopes_len = ns,
                                   .acr = json_string_value(acr_v),
                                   .now_s = now,
                                   .ttl_s = ttl};
        char *token = NULL, jti[TOKEN_JTI_SIZE];
        struct pep_err err = {0};
        struct admin_op *op = NULL;
        int irc = token_issue(r->srv->keys, &tr, &token, jti, &err);
        if (irc == 0) op = token_op(id, false, jti, now, ttl, token);
        free_secret(token);
        if (irc == PEP_EINVAL) {
            /* What a token can carry (TOKEN_MAX_SCOPES, TOKEN_MAX_LEN): the request's. */
            bad_request(r, "the token cannot be issued: %.160s", err.msg);
        } else if (!op) {
            reply_error(r, 500, "internal", "could not issue the token", NULL);
        } else {
            json_t *rec = admin_record(r, r->claims->sub, "tokens.issue");
            json_object_set_new(rec, "agent", json_string(id));
            json_object_set_new(rec, "jti", json_string(jti));
            json_object_set_new(rec, "set", token_set_json(scopes, ns, tr.acr, now + ttl));
            rc = commit_async(r, op, rec);
        }
    }
    if (scopes_v) free(scopes);
    free(scratch);
    json_decref(body);
    agent_release(agent);
    return rc;
}

static enum MHD_Result revoke_token(struct request *r, const char *jti) {
    struct token_rec t;
    if (!registry_get_token(r->srv->registry, jti, &t)) return not_found(r, "token", jti);
    struct admin_op *op = calloc(1, sizeof *op);
    if (!op) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->kind = OP_REVOKE_TOKEN;
    op->was_revoked = t.revoked_at_s != 0;
    snprintf(op->token.jti, sizeof op->token.jti, "%s", jti);
    op->token.revoked_at_s = t.revoked_at_s ? t.revoked_at_s : pep_now_us() / 1000000;
    char at[32];
    pep_format_rfc3339_us(op->token.revoked_at_s * 1000000, at);
    op->status = 200;
    op->answer = json_pack("{s:s, s:s}", "jti", jti, "revoked_at", at);
    json_t *rec = admin_record(r, r->claims->sub, "tokens.revoke");
    json_object_set_new(rec, "jti", json_string(jti));
    json_object_set_new(rec, "set", json_pack("{s:s}", "revoked_at", at));
    return commit_async(r, op, rec);
}

static enum MHD_Result put_operator(struct request *r) {
    json_t *body = body_object(r);
    if (!body) return MHD_YES;
    const char *id = json_string_value(json_object_get(body, "id"));
    char *scratch = NULL;
    size_t nr = 0;
    const char **roles =
        string_list(json_object_get(body, "roles"), false, pep_is_word, &scratch, &nr);
    static const char *const known[] = {"admin", "approver", "auditor"};
    const char *unknown = NULL;
    for (size_t i = 0; roles && i < nr && !unknown; i++) {
        bool ok = false;
        for (size_t k = 0; k < PEP_ARRAY_LEN(known); k++)
            ok = ok || strcmp(roles[i], known[k]) == 0;
        if (!ok) unknown = roles[i];
    }
    enum MHD_Result rc = MHD_YES;
    if (!pep_is_id(id))
        bad_request(r, "'id' must be 1-128 characters of [A-Za-z0-9._@-]", NULL);
    else if (!roles || nr == 0)
        bad_request(r, "'roles' must be a non-empty array of strings", NULL);
    else if (unknown)
        bad_request(r, "unknown role '%s' (admin, approver, auditor)", unknown);
    else {
        struct operator_rec *old = registry_get_operator(r->srv->registry, id);
        struct admin_op *op = calloc(1, sizeof *op);
        if (op) {
            op->kind = OP_PUT_OPERATOR;
            op->op = operator_new(id, roles, nr, old ? old->created_at_us : pep_now_us());
            op->status = old ? 200 : 201;
        }
        operator_release(old);
        rc = commit_put(r, op, "operators.put", "reason", id);
    }
    free(roles);
    free(scratch);
    json_decref(body);
    return rc;
}

/* Issues an operator token carrying all of the operator's roles. */
static int issue_operator_token(struct server *s, const struct policy *p,
                                const struct operator_rec *o, int64_t ttl_s, char **token,
                                struct admin_op **op_out) {
    int64_t now = pep_now_us() / 1000000;
    struct token_request tr = {.issuer = p->issuer,
                               .aud = "pep-admin",
                               .sub = o->id,
                               .roles = (const char *const *)o->roles,
                               .roles_len = o->roles_len,
                               .now_s = now,
                               .ttl_s = ttl_s};
    char jti[TOKEN_JTI_SIZE];
    int rc = token_issue(s->keys, &tr, token, jti, NULL);
    if (rc != 0) return rc;
    *op_out = token_op(o->id, true, jti, now, ttl_s, *token);
    return *op_out ? 0 : PEP_ENOMEM;
}

static enum MHD_Result issue_operator_token_handler(struct request *r, const char *id) {
    struct operator_rec *o = registry_get_operator(r->srv->registry, id);
    if (!o) return not_found(r, "operator", id);
    json_t *body = body_object(r);
    enum MHD_Result rc = MHD_YES;
    if (body) {
        int64_t ttl = ttl_seconds(json_object_get(body, "ttl"));
        if (ttl < 0)
            bad_request(r, "'ttl' must be a duration such as \"1h\" or whole seconds", NULL);
        else if (ttl > r->policy->max_token_ttl_ms / 1000)
            bad_request(r, "'ttl' exceeds identity.max_token_ttl", NULL);
        else {
            char *token = NULL;
            struct admin_op *op = NULL;
            if (issue_operator_token(r->srv, r->policy, o,
                                     ttl ? ttl : r->policy->token_ttl_ms / 1000, &token,
                                     &op) != 0) {
                reply_error(r, 500, "internal", "could not issue the token", NULL);
            } else {
                json_t *rec = admin_record(r, r->claims->sub, "operators.token");
                json_object_set_new(rec, "jti", json_string(op->token.jti));
                json_object_set_new(rec, "reason", json_string(id));
                json_object_set_new(rec, "set", operator_token_set_json(o, &op->token));
                rc = commit_async(r, op, rec);
            }
            free_secret(token);
        }
        json_decref(body);
    }
    operator_release(o);
    return rc;
}

/* ---- audit verification: walked on the verifier thread (pep/verifier.c) ------------------- */

/* r->admin_op_free of a verify request; also what tells admin_finish the op is a
 * verify_job rather than an admin_op. */
static void verify_job_free(void *job) {
    free(job);
}

/* Verifier thread: the walk is over, the listener builds the answer (admin_finish). */
static void verify_job_done(struct verify_job *job) {
    request_resume(job->arg);
}

/* The request is suspended while the verifier walks: a walk of a large store takes
 * seconds, and on a listener thread it would stall every admin call sharing that thread. */
static enum MHD_Result audit_verify(struct request *r) {
    struct verify_job *job = calloc(1, sizeof *job);
    if (!job) {
        reply_error(r, 503, "audit_unavailable", "out of memory", NULL);
        return MHD_YES;
    }
    job->done = verify_job_done;
    job->arg = r;
    r->admin_op = job;
    r->admin_op_free = verify_job_free;
    request_suspend(r);
    if (verifier_submit(r->srv->audit_verifier, job) != 0) {
        job->rc = PEP_ECLOSED; /* shutting down: answered at once */
        request_resume(r);
    }
    return request_wait(r);
}

static void audit_verify_finish(struct request *r, const struct verify_job *job) {
    if (job->rc == PEP_ECLOSED)
        reply_error(r, 503, "audit_unavailable",
                    "pep is shutting down: the verification was cancelled", NULL);
    else if (job->rc != 0)
        reply_error(r, 503, "audit_unavailable", job->err.msg, NULL);
    else
        reply_json(r, 200, audit_verify_result_json(&job->res));
}

static enum MHD_Result policy_show(struct request *r) {
    char loaded[32];
    pep_format_rfc3339_us(r->srv->policy_loaded_at_us, loaded);
    reply_json(r, 200,
               json_pack("{s:s, s:s, s:s}", "policy_hash", r->policy->policy_hash, "file",
                         r->policy->file, "loaded_at", loaded));
    return MHD_YES;
}

/* Runs on the listener thread and waits for the reload record's fsync: reloads are rare
 * operator actions, and answering only once the new policy is audited and active is what
 * the operator needs to know. */
static enum MHD_Result policy_reload(struct request *r) {
    struct policy_errors errs = {0};
    struct reload_origin by = {.operator_id = r->operator_rec->id, .request_id = r->id};
    int64_t seq = 0;
    int rc = server_reload(r->srv, &by, &seq, &errs);
    if (rc == PEP_EUNAVAILABLE) {
        reply_error(r, 503, "audit_unavailable",
                    "the reload could not be audited; the active policy is kept", NULL);
    } else if (rc != 0) {
        json_t *list = json_array();
        for (size_t i = 0; i < errs.len; i++)
            json_array_append_new(list, json_string(errs.items[i]));
        reply_error(r, 422, "invalid_policy",
                    "the policy file is invalid; the active policy is kept",
                    json_pack("{s:o}", "errors", list));
    } else {
        r->audit_seq = seq;
        struct policy *p = server_policy(r->srv);
        reply_json(r, 200, json_pack("{s:s, s:s}", "policy_hash", p->policy_hash, "file", p->file));
        policy_release(p);
    }
    policy_errors_free(&errs);
    return MHD_YES;
}

/* ---- routing ------------------------------------------------------------------------------- */

/* Splits "/admin/v1/a/b/c" into at most 6 segments (pointers into buf). */
static size_t split_path(char *buf, const char *seg[6]) {
    size_t n = 0;
    for (char *save = NULL, *tok = strtok_r(buf, "/", &save); tok && n < 6;
         tok = strtok_r(NULL, "/", &save))
        seg[n++] = tok;
    return n;
}

static bool is(const char *a, const char *b) {
    return a && strcmp(a, b) == 0;
}

/* Paths of the admin listener that need no operator token. */
static bool admin_is_open_path(const char *target) {
    size_t n = strcspn(target, "?");
    return n == 8 && strncmp(target, "/healthz", 8) == 0;
}

bool admin_head_authenticated(struct request *r) {
    return admin_is_open_path(r->target) || authenticate(r);
}

enum MHD_Result admin_handle(struct request *r) {
    size_t path_len = strcspn(r->target, "?");
    const char *why = NULL;
    if (route_normalize_path(r->target, path_len, &r->path, &why) != 0)
        return bad_request(r, "path is not in normal form (%s)", why);
    if (strcmp(r->path, "/healthz") == 0) {
        reply_json(r, 200, json_pack("{s:s}", "status", "ok"));
        return MHD_YES;
    }
    char buf[512];
    snprintf(buf, sizeof buf, "%s", r->path);
    const char *seg[6] = {0};
    size_t n = split_path(buf, seg);
    const char *m = r->method;
    bool get = is(m, "GET"), post = is(m, "POST"), del = is(m, "DELETE");
    if (n < 3 || !is(seg[0], "admin") || !is(seg[1], "v1")) {
        reply_error(r, 404, "no_route", "no admin endpoint at this path", NULL);
        return MHD_YES;
    }
    if (!authenticate(r)) return MHD_YES;
    const char *res = seg[2], *id = seg[3], *sub = seg[4];

    if (is(res, "agents")) {
        if (n == 3 && post) return require_role(r, "admin", NULL) ? put_agent(r) : MHD_YES;
        if (n == 3 && get) {
            if (require_role(r, "auditor", NULL))
                reply_json(r, 200,
                           json_pack("{s:o}", "agents", registry_list_agents(r->srv->registry)));
            return MHD_YES;
        }
        if (n == 4 && get) {
            if (!require_role(r, "auditor", NULL)) return MHD_YES;
            struct agent *a = registry_get_agent(r->srv->registry, id);
            if (!a) return not_found(r, "agent", id);
            reply_json(r, 200, agent_to_json(a));
            agent_release(a);
            return MHD_YES;
        }
        if (n == 5 && post && (is(sub, "disable") || is(sub, "enable")))
            return require_role(r, "admin", NULL) ? set_agent_enabled(r, id, is(sub, "enable"))
                                                  : MHD_YES;
        if (n == 5 && post && is(sub, "tokens"))
            return require_role(r, "admin", NULL) ? issue_agent_token(r, id) : MHD_YES;
    } else if (is(res, "tokens")) {
        if (n == 3 && get) {
            if (!require_role(r, "auditor", NULL)) return MHD_YES;
            const char *agent =
                MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "agent");
            const char *op =
                MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "operator");
            reply_json(
                r, 200,
                json_pack("{s:o}", "tokens",
                          registry_list_tokens(r->srv->registry, agent && *agent ? agent : NULL,
                                               op && *op ? op : NULL)));
            return MHD_YES;
        }
        if (n == 4 && del) return require_role(r, "admin", NULL) ? revoke_token(r, id) : MHD_YES;
    } else if (is(res, "operators")) {
        if (n == 3 && post) return require_role(r, "admin", NULL) ? put_operator(r) : MHD_YES;
        if (n == 5 && post && is(sub, "tokens"))
            return require_role(r, "admin", NULL) ? issue_operator_token_handler(r, id) : MHD_YES;
    } else if (is(res, "audit")) {
        if (n == 4 && get && is(id, "verify"))
            return require_role(r, "auditor", NULL) ? audit_verify(r) : MHD_YES;
    } else if (is(res, "policy")) {
        if (n == 3 && get) return require_role(r, "admin", NULL) ? policy_show(r) : MHD_YES;
        if (n == 4 && post && is(id, "reload"))
            return require_role(r, "admin", NULL) ? policy_reload(r) : MHD_YES;
    }
    reply_error(r, 404, "no_route", "no admin endpoint for this method and path", NULL);
    return MHD_YES;
}

/* ---- bootstrap --------------------------------------------------------------------------------
 */

static int sync_apply(sqlite3 *db, void *arg) {
    return op_apply(db, arg);
}

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
        struct admin_op op = {.kind = OP_REVOKE_TOKEN, .srv = s};
        snprintf(op.token.jti, sizeof op.token.jti, "%s", jti);
        op.token.revoked_at_s = now;
        json_t *rec = admin_record(NULL, "pep", "tokens.revoke");
        json_object_set_new(rec, "jti", json_string(jti));
        json_object_set_new(rec, "reason",
                            json_string("admin.token re-minted: the previous bootstrap token is "
                                        "revoked"));
        rc = server_audit_sync(s, rec, sync_apply, &op, NULL);
        if (rc == 0) op_publish(&op);
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
        struct admin_op op = {.kind = OP_PUT_OPERATOR, .srv = s};
        op.op = operator_new(BOOTSTRAP_OPERATOR, roles, 1, pep_now_us());
        json_t *rec = admin_record(NULL, "pep", "operators.put");
        json_object_set_new(rec, "reason",
                            json_string("bootstrap operator created at first start"));
        rc = op.op ? server_audit_sync(s, rec, sync_apply, &op, NULL) : PEP_ENOMEM;
        if (rc == 0) op_publish(&op);
        operator_release(op.op);
        if (rc != 0) return pep_err_set(err, rc, "cannot create the bootstrap operator");
        o = registry_get_operator(s->registry, BOOTSTRAP_OPERATOR);
    } else if ((rc = revoke_bootstrap_tokens(s)) != 0) {
        operator_release(o);
        return pep_err_set(err, rc, "cannot revoke the previous bootstrap tokens");
    }
    char *token = NULL;
    struct admin_op *op = NULL;
    rc = issue_operator_token(s, s->policy, o, BOOTSTRAP_TOKEN_TTL_S, &token, &op);
    json_t *set = rc == 0 ? operator_token_set_json(o, &op->token) : NULL;
    operator_release(o);
    if (rc == 0) {
        op->srv = s;
        json_t *rec = admin_record(NULL, "pep", "operators.token");
        json_object_set_new(rec, "jti", json_string(op->token.jti));
        json_object_set_new(rec, "set", set);
        json_object_set_new(rec, "reason", json_string("bootstrap token written to admin.token"));
        rc = server_audit_sync(s, rec, sync_apply, op, NULL);
        if (rc == 0) {
            op_publish(op);
            size_t len = strlen(token);
            token[len] = '\n';
            rc = pep_write_file_atomic(path, token, len + 1, 0600);
            token[len] = '\0';
        }
    }
    free_secret(token);
    if (op) admin_op_free(op);
    return rc ? pep_err_set(err, rc, "cannot write %s", path) : 0;
}

/* Writes one agent state from the policy file with its system record (agents.seed). */
static int seed_write(struct server *s, const struct policy *p, struct agent *a,
                      const char *reason) {
    struct admin_op op = {.kind = OP_PUT_AGENT, .srv = s, .agent = agent_retain(a)};
    json_t *rec = server_record("system", NULL);
    json_object_set_new(rec, "action", json_string("agents.seed"));
    json_object_set_new(rec, "agent", json_string(a->id));
    json_object_set_new(rec, "set", agent_set_json(a));
    json_object_set_new(rec, "policy_hash", json_string(p->policy_hash));
    json_object_set_new(rec, "reason", json_string(reason));
    int rc = server_audit_sync(s, rec, sync_apply, &op, NULL);
    if (rc == 0) op_publish(&op);
    agent_release(op.agent);
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
