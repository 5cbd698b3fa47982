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
#include "pep/admin.h"
#include "pep/admin_keys.h"
#include "pep/approvals.h"
#include "pep/audit_api.h"
#include "pep/breaker.h"
#include "pep/escalations.h"
#include "pep/indicators.h"
#include "pep/metrics.h"
#include "pep/change.h"
#include "pep/record.h"
#include "pep/util.h"
#include "pep/verifier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* ---- state changes written through the audit writer ----------------------------------- */

/* A change in flight for one admin request — to the registry, an approval's decision or an
 * escalation's resolution — and the answer it gets once written. */
struct admin_op {
    struct change ch;
    bool decides_approval;    /* an approval's decision, not a registry change: */
    struct approval before;   /*   as it was (put back if the record fails) */
    struct approval after;    /*   as decided (the apply's argument) */
    bool resolves_escalation; /* an escalation's resolution, likewise: */
    struct escalation escalation_before, escalation_after;
    struct request *req;
    int status;     /* HTTP status of the answer once committed */
    json_t *answer; /* the answer once committed */
};

static struct admin_op *admin_op_new(struct request *r, enum change_kind kind) {
    struct admin_op *op = calloc(1, sizeof *op);
    if (op) {
        op->ch.kind = kind;
        op->ch.registry = r->srv->registry;
        op->req = r;
    }
    return op;
}

static void admin_op_free(void *p) {
    struct admin_op *op = p;
    change_clear(&op->ch);
    approval_clear(&op->before);
    approval_clear(&op->after);
    escalation_clear(&op->escalation_before);
    escalation_clear(&op->escalation_after);
    json_decref(op->answer);
    free(op);
}

static void op_done(void *arg, int rc, int64_t seq) {
    struct admin_op *op = arg;
    if (op->decides_approval) {
        if (rc != 0)
            approval_undo_decide(op->req->srv->approvals, &op->before);
        else
            metrics_approval(op->req->srv->metrics, op->after.state == APPROVAL_APPROVED
                                                        ? METRICS_APPROVAL_APPROVED
                                                        : METRICS_APPROVAL_DENIED);
    } else if (op->resolves_escalation) {
        if (rc != 0) escalation_undo_resolve(op->req->srv->escalations, &op->escalation_before);
    } else if (op->ch.published_early) {
        if (rc != 0) change_unpublish(&op->ch);
    } else if (rc == 0) {
        change_publish(&op->ch);
    }
    op->req->audit_rc = rc;
    op->req->audit_seq = seq;
    request_resume(op->req);
}

static json_t *admin_record(const struct request *r, const char *action) {
    return change_record(r->id, r->claims->sub, action);
}

/* Queues op with its audit record and suspends the request; the answer is sent by
 * admin_finish once the transaction committed. */
static enum MHD_Result commit_async(struct request *r, struct admin_op *op, json_t *record) {
    r->admin_op = op;
    r->admin_op_free = admin_op_free;
    request_suspend(r);
    bool early = record && change_publishes_early(&op->ch);
    if (early) {
        pthread_rwlock_wrlock(&r->srv->decision_lock);
        change_publish_early(&op->ch);
    }
    int rc = record ? audit_submit(r->srv->audit, record, change_apply, &op->ch, op_done, op)
                    : PEP_EUNAVAILABLE;
    if (early) pthread_rwlock_unlock(&r->srv->decision_lock);
    if (rc != 0) op_done(op, rc, 0);
    return request_wait(r);
}

/* An approval's decision, published already (approval_decide) under the decision lock,
 * which is held until its record is queued: a re-send that uses the approval is recorded
 * after the decision that allowed it (SPEC 6.5). */
static enum MHD_Result commit_approval_decision(struct request *r, struct admin_op *op,
                                                json_t *record) {
    r->admin_op = op;
    r->admin_op_free = admin_op_free;
    request_suspend(r);
    int rc =
        record ? audit_submit(r->srv->audit, record, approval_apply_decide, &op->after, op_done, op)
               : PEP_EUNAVAILABLE;
    pthread_rwlock_unlock(&r->srv->decision_lock);
    if (rc != 0) op_done(op, rc, 0);
    return request_wait(r);
}

static void audit_verify_finish(struct request *r, const struct verify_job *job);
static void verify_job_free(void *job);

static void admin_finish(struct request *r) {
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

static bool require_role(struct request *r, const char *role) {
    if (has_role(r, role)) return true;
    char msg[200];
    snprintf(msg, sizeof msg, "operator %s lacks role %s", r->claims->sub, role);
    reply_error(r, 403, "insufficient_scope", msg, NULL);
    return false;
}

/* ---- handlers ------------------------------------------------------------------------------- */

/* Commits op, whose record (agent or operator) was just built, answering it rendered:
 * audited as `action` with `target` under `target_key`.  An op whose record could not be
 * built (out of memory) is answered 500 and freed. */
static enum MHD_Result commit_put(struct request *r, struct admin_op *op, const char *action,
                                  const char *target_key, const char *target) {
    if (!op || (!op->ch.agent && !op->ch.op_rec)) {
        if (op) admin_op_free(op);
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->answer = op->ch.agent ? agent_to_json(op->ch.agent) : operator_to_json(op->ch.op_rec);
    json_t *rec = admin_record(r, action);
    json_object_set_new(rec, target_key, json_string(target));
    json_object_set_new(rec, "set",
                        op->ch.agent ? change_agent_set_json(op->ch.agent)
                                     : change_operator_set_json(op->ch.op_rec));
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
        struct admin_op *op = admin_op_new(r, CHANGE_PUT_AGENT);
        if (op) {
            /* Without "enabled", a replaced agent keeps its state: updating the scopes of an
             * agent disabled as compromised must not quietly re-enable it. */
            bool enabled = enabled_v ? json_is_true(enabled_v) : old ? old->enabled : true;
            op->ch.agent = agent_new(id, json_string_value(owner_v), tenants, nt, scopes, ns,
                                     enabled, old ? old->created_at_us : now, now);
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
    struct admin_op *op = admin_op_new(r, CHANGE_PUT_AGENT);
    if (op) {
        op->ch.agent = agent_with_enabled(old, enabled, pep_now_us());
        op->status = 200;
    }
    agent_release(old);
    return commit_put(r, op, enabled ? "agents.enable" : "agents.disable", "agent", id);
}

/* The op that records a freshly issued token (not yet committed), answering it. */
static struct admin_op *token_op(struct request *r, const char *subject, bool operator_token,
                                 const char *jti, int64_t now_s, int64_t ttl_s, const char *token) {
    struct admin_op *op = admin_op_new(r, CHANGE_PUT_TOKEN);
    if (!op) return NULL;
    char expires[32];
    pep_format_rfc3339_us((now_s + ttl_s) * 1000000, expires);
    op->status = 201;
    op->answer = json_pack("{s:s, s:s, s:s}", "token", token, "jti", jti, "expires_at", expires);
    if (change_token(&op->ch, r->srv->registry, subject, operator_token, jti, now_s, ttl_s) != 0 ||
        !op->answer) {
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
        if (irc == 0) op = token_op(r, id, false, jti, now, ttl, token);
        change_free_secret(token);
        if (irc == PEP_EINVAL) {
            /* What a token can carry (TOKEN_MAX_SCOPES, TOKEN_MAX_LEN): the request's. */
            bad_request(r, "the token cannot be issued: %.160s", err.msg);
        } else if (!op) {
            reply_error(r, 500, "internal", "could not issue the token", NULL);
        } else {
            json_t *rec = admin_record(r, "tokens.issue");
            json_object_set_new(rec, "agent", json_string(id));
            json_object_set_new(rec, "jti", json_string(jti));
            json_object_set_new(rec, "set", change_token_set_json(scopes, ns, tr.acr, now + ttl));
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
    struct admin_op *op = admin_op_new(r, CHANGE_REVOKE_TOKEN);
    if (!op) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->ch.was_revoked = t.revoked_at_s != 0;
    snprintf(op->ch.token.jti, sizeof op->ch.token.jti, "%s", jti);
    op->ch.token.revoked_at_s = t.revoked_at_s ? t.revoked_at_s : pep_now_us() / 1000000;
    char at[32];
    pep_format_rfc3339_us(op->ch.token.revoked_at_s * 1000000, at);
    op->status = 200;
    op->answer = json_pack("{s:s, s:s}", "jti", jti, "revoked_at", at);
    json_t *rec = admin_record(r, "tokens.revoke");
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
        struct admin_op *op = admin_op_new(r, CHANGE_PUT_OPERATOR);
        if (op) {
            op->ch.op_rec = operator_new(id, roles, nr, old ? old->created_at_us : pep_now_us());
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
            struct admin_op *op = admin_op_new(r, CHANGE_PUT_TOKEN);
            int64_t ttl_s = ttl ? ttl : r->policy->token_ttl_ms / 1000;
            if (!op || change_issue_operator_token(r->srv->keys, r->srv->registry, r->policy, o,
                                                   ttl_s, &token, &op->ch) != 0) {
                if (op) admin_op_free(op);
                reply_error(r, 500, "internal", "could not issue the token", NULL);
            } else {
                char expires[32];
                pep_format_rfc3339_us(op->ch.token.expires_at_s * 1000000, expires);
                op->status = 201;
                op->answer = json_pack("{s:s, s:s, s:s}", "token", token, "jti", op->ch.token.jti,
                                       "expires_at", expires);
                json_t *rec = admin_record(r, "operators.token");
                json_object_set_new(rec, "jti", json_string(op->ch.token.jti));
                json_object_set_new(rec, "reason", json_string(id));
                json_object_set_new(rec, "set", change_operator_token_set_json(o, &op->ch.token));
                rc = commit_async(r, op, rec);
            }
            change_free_secret(token);
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

static enum MHD_Result list_agents(struct request *r, const char *const *arg) {
    (void)arg;
    reply_json(r, 200, json_pack("{s:o}", "agents", registry_list_agents(r->srv->registry)));
    return MHD_YES;
}

static enum MHD_Result show_agent(struct request *r, const char *const *arg) {
    struct agent *a = registry_get_agent(r->srv->registry, arg[0]);
    if (!a) return not_found(r, "agent", arg[0]);
    reply_json(r, 200, agent_to_json(a));
    agent_release(a);
    return MHD_YES;
}

static enum MHD_Result list_tokens(struct request *r, const char *const *arg) {
    (void)arg;
    const char *agent = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "agent");
    const char *op = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "operator");
    reply_json(r, 200,
               json_pack("{s:o}", "tokens",
                         registry_list_tokens(r->srv->registry, agent && *agent ? agent : NULL,
                                              op && *op ? op : NULL)));
    return MHD_YES;
}

static enum MHD_Result post_agent(struct request *r, const char *const *arg) {
    (void)arg;
    return put_agent(r);
}
static enum MHD_Result disable_agent(struct request *r, const char *const *arg) {
    return set_agent_enabled(r, arg[0], false);
}
static enum MHD_Result enable_agent(struct request *r, const char *const *arg) {
    return set_agent_enabled(r, arg[0], true);
}
static enum MHD_Result post_agent_token(struct request *r, const char *const *arg) {
    return issue_agent_token(r, arg[0]);
}
static enum MHD_Result delete_token(struct request *r, const char *const *arg) {
    return revoke_token(r, arg[0]);
}
static enum MHD_Result post_operator(struct request *r, const char *const *arg) {
    (void)arg;
    return put_operator(r);
}
static enum MHD_Result post_operator_token(struct request *r, const char *const *arg) {
    return issue_operator_token_handler(r, arg[0]);
}
static enum MHD_Result get_audit_verify(struct request *r, const char *const *arg) {
    (void)arg;
    return audit_verify(r);
}
static enum MHD_Result get_policy(struct request *r, const char *const *arg) {
    (void)arg;
    return policy_show(r);
}
static enum MHD_Result post_policy_reload(struct request *r, const char *const *arg) {
    (void)arg;
    return policy_reload(r);
}

/* ---- approvals (SPEC 3.4) ---------------------------------------------------------------- */

static enum MHD_Result list_approvals(struct request *r, const char *const *arg) {
    (void)arg;
    const char *state = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "state");
    enum approval_state filter;
    bool all = !state || !*state || strcmp(state, "all") == 0;
    if (!all && approval_state_parse(state, &filter) != 0)
        return bad_request(r,
                           "'state' must be pending, approved, denied, expired, used or all, "
                           "not '%.40s'",
                           state);
    json_t *list = approval_list_json(r->srv->approvals, all ? NULL : &filter, pep_now_us());
    if (!list) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_json(r, 200, list);
    return MHD_YES;
}

static enum MHD_Result show_approval(struct request *r, const char *const *arg) {
    struct approval a = {0};
    if (approval_get(r->srv->approvals, arg[0], &a) != 0) return not_found(r, "approval", arg[0]);
    reply_json(r, 200, approval_detail_json(&a, pep_now_us()));
    approval_clear(&a);
    return MHD_YES;
}

/* The operator's effective roles (the token's roles it still holds), as a vector. */
static size_t effective_roles(const struct request *r, const char **roles, size_t cap) {
    size_t n = 0;
    for (size_t i = 0; i < r->claims->roles_len && n < cap; i++)
        if (operator_has_role(r->operator_rec, r->claims->roles[i]))
            roles[n++] = r->claims->roles[i];
    return n;
}

static enum MHD_Result decide_approval(struct request *r, const char *id, bool approve) {
    json_t *body = body_object(r);
    if (!body) return MHD_YES;
    json_t *reason_v = json_object_get(body, "reason");
    const char *reason = json_string_value(reason_v);
    if (reason_v && (!reason || !pep_has_no_control(reason) || strlen(reason) > 1000)) {
        json_decref(body);
        return bad_request(r,
                           "'reason' must be a string of at most 1000 characters without "
                           "control characters",
                           NULL);
    }
    const char *roles[16];
    size_t nroles = effective_roles(r, roles, PEP_ARRAY_LEN(roles));
    struct admin_op *op = calloc(1, sizeof *op);
    if (!op) {
        json_decref(body);
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->req = r;
    op->decides_approval = true;
    enum approval_decide verdict = APPROVAL_DECIDE_OK;
    pthread_rwlock_wrlock(&r->srv->decision_lock);
    int rc = approval_decide(r->srv->approvals, id, r->claims->sub, roles, nroles, approve, reason,
                             pep_now_us(), &verdict, &op->before, &op->after);
    if (rc != 0 || verdict != APPROVAL_DECIDE_OK) {
        pthread_rwlock_unlock(&r->srv->decision_lock);
        admin_op_free(op);
        json_decref(body);
        char msg[300];
        if (rc == PEP_ENOTFOUND) return not_found(r, "approval", id);
        if (rc != 0) {
            reply_error(r, 500, "internal", "out of memory", NULL);
        } else if (verdict == APPROVAL_DECIDE_NOT_APPROVER || verdict == APPROVAL_DECIDE_IS_OWNER) {
            snprintf(msg, sizeof msg, "operator %s may not decide approval %s: %s", r->claims->sub,
                     id, approval_decide_name(verdict));
            reply_error(r, 403, "insufficient_scope", msg, NULL);
        } else {
            snprintf(msg, sizeof msg, "approval %s cannot be decided: %s", id,
                     approval_decide_name(verdict));
            reply_error(r, 409, "conflict", msg, NULL);
        }
        return MHD_YES;
    }
    op->status = 200;
    op->answer = approval_detail_json(&op->after, pep_now_us());
    json_t *rec = admin_record(r, approve ? "approvals.approve" : "approvals.deny");
    json_object_set_new(rec, "approval_id", json_string(id));
    json_object_set_new(rec, "agent", json_string(op->after.agent));
    if (reason) json_object_set_new(rec, "reason", json_string(reason));
    json_decref(body);
    return commit_approval_decision(r, op, rec);
}

static enum MHD_Result approve_approval(struct request *r, const char *const *arg) {
    return decide_approval(r, arg[0], true);
}
static enum MHD_Result deny_approval(struct request *r, const char *const *arg) {
    return decide_approval(r, arg[0], false);
}

/* ---- resilience (SPEC 4.4, 5, 7) --------------------------------------------------------- */

static enum MHD_Result metrics_answer(struct request *r) {
    size_t len = 0;
    char *text = metrics_render(r->srv->metrics, &len);
    if (!text) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_clear(&r->reply);
    r->reply.status = 200;
    r->reply.body = text;
    r->reply.body_len = len;
    r->reply.content_type = "text/plain; version=0.0.4; charset=utf-8";
    return MHD_YES;
}

static enum MHD_Result list_upstreams(struct request *r, const char *const *arg) {
    (void)arg;
    json_t *list = breakers_json(r->srv->breakers, pep_mono_us() / 1000, pep_now_us());
    if (!list) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_json(r, 200, list);
    return MHD_YES;
}

static enum MHD_Result list_chains(struct request *r, const char *const *arg) {
    (void)arg;
    json_t *list = indicators_json(r->srv->indicators, r->policy, pep_now_us() / 1000);
    if (!list) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_json(r, 200, list);
    return MHD_YES;
}

static enum MHD_Result list_escalations(struct request *r, const char *const *arg) {
    (void)arg;
    const char *state = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "state");
    enum escalation_state filter;
    bool all = !state || !*state || strcmp(state, "all") == 0;
    if (!all && escalation_state_parse(state, &filter) != 0)
        return bad_request(r, "'state' must be open, resolved or all, not '%.40s'", state);
    json_t *list = escalation_list_json(r->srv->escalations, all ? NULL : &filter);
    if (!list) {
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    reply_json(r, 200, list);
    return MHD_YES;
}

static enum MHD_Result show_escalation(struct request *r, const char *const *arg) {
    struct escalation e = {0};
    if (escalation_get(r->srv->escalations, arg[0], &e) != 0)
        return not_found(r, "escalation", arg[0]);
    reply_json(r, 200, escalation_detail_json(&e));
    escalation_clear(&e);
    return MHD_YES;
}

static enum MHD_Result resolve_escalation(struct request *r, const char *const *arg) {
    json_t *body = body_object(r);
    if (!body) return MHD_YES;
    json_t *note_v = json_object_get(body, "note");
    const char *note = json_string_value(note_v);
    if (note_v && (!note || !pep_has_no_control(note) || strlen(note) > ESCALATION_NOTE_MAX)) {
        json_decref(body);
        return bad_request(r,
                           "'note' must be a string of at most 4096 bytes without control "
                           "characters",
                           NULL);
    }
    struct admin_op *op = calloc(1, sizeof *op);
    if (!op) {
        json_decref(body);
        reply_error(r, 500, "internal", "out of memory", NULL);
        return MHD_YES;
    }
    op->req = r;
    op->resolves_escalation = true;
    enum escalation_resolve verdict = ESCALATION_RESOLVE_OK;
    int rc = escalation_resolve(r->srv->escalations, arg[0], r->claims->sub, note, pep_now_us(),
                                &verdict, &op->escalation_before, &op->escalation_after);
    if (rc != 0 || verdict != ESCALATION_RESOLVE_OK) {
        json_decref(body);
        admin_op_free(op);
        if (rc == PEP_ENOTFOUND) return not_found(r, "escalation", arg[0]);
        if (rc != 0) {
            reply_error(r, 500, "internal", "out of memory", NULL);
        } else {
            char msg[160];
            snprintf(msg, sizeof msg, "escalation %s is resolved already", arg[0]);
            reply_error(r, 409, "conflict", msg, NULL);
        }
        return MHD_YES;
    }
    op->status = 200;
    op->answer = escalation_detail_json(&op->escalation_after);
    json_t *rec = admin_record(r, "escalations.resolve");
    json_object_set_new(rec, "escalation_id", json_string(arg[0]));
    if (note) json_object_set_new(rec, "reason", json_string(note));
    json_decref(body); /* note points into it */
    r->admin_op = op;
    r->admin_op_free = admin_op_free;
    request_suspend(r);
    rc = rec ? audit_submit(r->srv->audit, rec, escalation_apply_resolve, &op->escalation_after,
                            op_done, op)
             : PEP_EUNAVAILABLE;
    if (rc != 0) op_done(op, rc, 0);
    return request_wait(r);
}

#define ADMIN_MAX_ARGS 2

/* One admin endpoint (SPEC 5): `{x}` in the path matches one segment, handed to the
 * handler in order; `role` is the role it needs (`admin` holds every role). */
struct admin_route {
    const char *method;
    const char *path;
    const char *role;
    enum MHD_Result (*handler)(struct request *r, const char *const *arg);
};

static const struct admin_route admin_routes[] = {
    {"POST", "/admin/v1/agents", "admin", post_agent},
    {"GET", "/admin/v1/agents", "auditor", list_agents},
    {"GET", "/admin/v1/agents/{id}", "auditor", show_agent},
    {"POST", "/admin/v1/agents/{id}/disable", "admin", disable_agent},
    {"POST", "/admin/v1/agents/{id}/enable", "admin", enable_agent},
    {"POST", "/admin/v1/agents/{id}/tokens", "admin", post_agent_token},
    {"GET", "/admin/v1/tokens", "auditor", list_tokens},
    {"DELETE", "/admin/v1/tokens/{jti}", "admin", delete_token},
    {"POST", "/admin/v1/operators", "admin", post_operator},
    {"POST", "/admin/v1/operators/{id}/tokens", "admin", post_operator_token},
    {"GET", "/admin/v1/approvals", "approver", list_approvals},
    {"GET", "/admin/v1/approvals/{id}", "approver", show_approval},
    {"POST", "/admin/v1/approvals/{id}/approve", "approver", approve_approval},
    {"POST", "/admin/v1/approvals/{id}/deny", "approver", deny_approval},
    {"GET", "/admin/v1/upstreams", "auditor", list_upstreams},
    {"GET", "/admin/v1/chains", "auditor", list_chains},
    {"GET", "/admin/v1/escalations", "admin", list_escalations},
    {"GET", "/admin/v1/escalations/{id}", "admin", show_escalation},
    {"POST", "/admin/v1/escalations/{id}/resolve", "admin", resolve_escalation},
    {"GET", "/admin/v1/audit/verify", "auditor", get_audit_verify},
    /* signing keys and signed checkpoints: pep/admin_keys.c */
    {"GET", "/admin/v1/audit/checkpoints/latest", "auditor", admin_checkpoint_latest},
    {"GET", "/admin/v1/keys", "auditor", admin_keys_list},
    {"POST", "/admin/v1/keys/rotate", "admin", admin_keys_rotate},
    /* audit reads for reviewers (pep/audit_api.c) */
    {"GET", "/admin/v1/audit", "auditor", audit_api_query},
    {"GET", "/admin/v1/audit/export", "auditor", audit_api_export},
    {"GET", "/admin/v1/audit/trace/{request_id}", "auditor", audit_api_trace},
    {"GET", "/admin/v1/policy", "admin", get_policy},
    {"POST", "/admin/v1/policy/reload", "admin", post_policy_reload},
};

/* Whether the normalized path matches the template; its `{x}` segments go to arg (pointers
 * into path, cut at '/' in place of the caller's copy). */
static bool admin_path_match(const char *tmpl, char *path, const char *arg[ADMIN_MAX_ARGS]) {
    size_t n = 0;
    while (*tmpl && *path) {
        if (*tmpl++ != '/' || *path++ != '/') return false;
        size_t tl = strcspn(tmpl, "/"), pl = strcspn(path, "/");
        if (tmpl[0] == '{') {
            if (pl == 0 || n == ADMIN_MAX_ARGS) return false;
            arg[n++] = path;
        } else if (tl != pl || strncmp(tmpl, path, tl) != 0) {
            return false;
        }
        tmpl += tl;
        path += pl;
    }
    if (*tmpl || *path) return false;
    /* Cut the arguments at their '/': only now, once the whole template matched. */
    for (size_t i = 0; i < n; i++) {
        char *end = strchr(arg[i], '/');
        if (end) *end = '\0';
    }
    return true;
}

/* Paths of the admin listener that need no operator token. */
static bool admin_is_open_path(const char *target) {
    size_t n = strcspn(target, "?");
    return (n == 8 && strncmp(target, "/healthz", 8) == 0) ||
           (n == 8 && strncmp(target, "/metrics", 8) == 0);
}

static enum MHD_Result admin_on_head(struct request *r) {
    r->policy = server_policy(r->srv);
    r->body_limit = r->policy->max_body;
    /* SECURITY: as on the data plane (not audited: nothing was decided). */
    const char *problem = request_head_problem(r);
    if (problem) {
        reply_error(r, 400, "bad_request", problem, NULL);
        request_close_after_answer(r);
        return reply_send(r);
    }
    /* SECURITY: a client without a credential is answered before its body is read or
     * buffered, as on the data plane. */
    if (!admin_is_open_path(r->target) && !authenticate(r)) {
        request_close_after_answer(r);
        return reply_send(r);
    }
    return MHD_YES;
}

static enum MHD_Result admin_route(struct request *r) {
    size_t path_len = strcspn(r->target, "?");
    const char *why = NULL;
    if (route_normalize_path(r->target, path_len, &r->path, &why) != 0)
        return bad_request(r, "path is not in normal form (%s)", why);
    if (strcmp(r->path, "/healthz") == 0) {
        reply_json(r, 200, json_pack("{s:s}", "status", "ok"));
        return MHD_YES;
    }
    if (strcmp(r->path, "/metrics") == 0 && strcmp(r->method, "GET") == 0) /* SPEC 5: no auth */
        return metrics_answer(r);
    if (!authenticate(r)) return MHD_YES;
    for (size_t i = 0; i < PEP_ARRAY_LEN(admin_routes); i++) {
        const struct admin_route *rt = &admin_routes[i];
        char path[512];
        const char *arg[ADMIN_MAX_ARGS] = {0};
        snprintf(path, sizeof path, "%s", r->path);
        if (!admin_path_match(rt->path, path, arg)) continue;
        if (strcmp(rt->method, r->method) != 0) continue;
        if (!require_role(r, rt->role)) return MHD_YES;
        return rt->handler(r, arg);
    }
    reply_error(r, 404, "no_route", "no admin endpoint for this method and path", NULL);
    return MHD_YES;
}

static enum MHD_Result admin_on_complete(struct request *r) {
    if (r->body_too_large) {
        reply_error(r, 413, "body_too_large", "body exceeds max_body", NULL);
        return reply_send(r);
    }
    enum MHD_Result rc = admin_route(r);
    /* Answered at once, or suspended until the audit writer resumes it. */
    return r->phase == PHASE_BODY ? reply_send(r) : rc;
}

static enum MHD_Result admin_on_resume(struct request *r) {
    admin_finish(r);
    return reply_send(r);
}

const struct listener_handlers admin_handlers = {
    .on_head = admin_on_head,
    .on_complete = admin_on_complete,
    .on_resume = admin_on_resume,
};
