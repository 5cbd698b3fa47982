/*
 * pipeline.c — the data plane's stages (SPEC 3.2), in the order a request meets them:
 *
 *   head      pipeline_on_head: the head's form (http.c's request_head_problem), built-in
 *             endpoints, the declared body size, the path and route, the token; a request
 *             without a valid token is decided and answered here, its body never read.
 *   decide    pipeline_on_complete, under server.decision_lock: the registry (identify),
 *             decide() (pure), the upstream call built (upstream.c), the decision record
 *             queued (audit_and_wait); the lock ends once it is queued.
 *   audit     on_decision_durable (audit writer thread): hands an allowed call to the
 *             forwarder, else resumes the request.
 *   forward   on_forward_done (forwarder thread): the outcome audited, the request resumed.
 *   respond   pipeline_respond: the error JSON, or the upstream's answer relayed.
 *
 * Threads: as marked per function; the listener threads unless said otherwise.
 */
#include "pep/pipeline.h"
#include "pep/dispatch.h"
#include "pep/govern.h"
#include "pep/metrics.h"
#include "pep/record.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Begins the checks of a decision (see server.decision_lock): from here until its record
 * is queued (decision_end), no reload, revocation or agent change is published.  The
 * request switches to the policy in force now if a reload came since it arrived. */
static void decision_begin(struct request *r) {
    pthread_rwlock_rdlock(&r->srv->decision_lock);
    r->decision_locked = true;
    if (r->policy != r->srv->policy) { /* stable: reloads hold the lock to swap it */
        policy_release(r->policy);
        r->policy = policy_retain(r->srv->policy);
        r->policy_replaced = true;
    }
}

static void decision_end(struct request *r) {
    if (!r->decision_locked) return;
    r->decision_locked = false;
    pthread_rwlock_unlock(&r->srv->decision_lock);
}

/* ---- audit records ---------------------------------------------------------------------- */

static void set_str(json_t *rec, const char *key, const char *value) {
    if (value) json_object_set_new(rec, key, json_text(value, strlen(value)));
}

/* A field whose bytes come from the client and must stay distinct in the record (SPEC 6.2:
 * two forwarded paths that differ never share a recorded path). */
static void set_exact(json_t *rec, const char *key, const char *value, size_t len) {
    if (value) json_object_set_new(rec, key, json_exact_text(value, len));
}

static json_t *decision_record(const struct request *r) {
    json_t *rec = server_record("decision", r->id);
    if (!rec) return NULL;
    set_str(rec, "method", r->method);
    if (r->path) set_exact(rec, "path", r->path, strlen(r->path));
    if (!r->path && r->target) {
        /* A refused path is recorded as received (minus the query: it may hold secrets). */
        set_exact(rec, "path", r->target, strcspn(r->target, "?"));
    }
    if (r->query && *r->query) {
        /* Not the query itself (it may hold secrets): enough to tell two queries apart and
         * to check one a reviewer is shown (SPEC 6.2). */
        uint8_t digest[32];
        char hex[65];
        pep_sha256(r->query, strlen(r->query), digest);
        pep_hex(digest, sizeof digest, hex);
        json_object_set_new(rec, "query_sha256", json_string(hex));
    }
    const struct decision *d = &r->decision;
    json_object_set_new(rec, "decision", json_string(d->allow ? "allow" : "deny"));
    set_str(rec, "code", d->code);
    set_str(rec, "reason", d->reason);
    if (d->action) set_str(rec, "action", d->action->name);
    if (r->agent)
        set_str(rec, "agent", r->agent->id);
    else if (r->claims)
        set_str(rec, "agent", r->claims->sub);
    set_exact(rec, "tenant", d->tenant, d->tenant_len);
    if (r->policy) set_str(rec, "policy_hash", r->policy->policy_hash);
    return rec;
}

static void on_decision_durable(void *arg, int rc, int64_t seq);

/* Whether the request is refused because its decision record was not written: fail closed
 * (on_failure: deny), and always when the store holds back too many records already
 * (SPEC 6.5: nothing may be decided whose outcome could not be kept). */
static bool audit_refuses(const struct request *r) {
    return r->audit_rc != 0 &&
           (r->policy->on_failure == AUDIT_ON_FAILURE_DENY || r->audit_rc == PEP_EBACKLOG);
}

/* Audits r->decision and suspends; the writer's callback continues the request.  Ends the
 * decision's critical section once the record is queued. */
static enum MHD_Result audit_and_wait(struct request *r) {
    json_t *rec = decision_record(r);
    void *apply_arg = NULL;
    audit_apply_fn apply = rec ? govern_record(r, rec, &apply_arg) : NULL;
    request_suspend(r);
    int rc = rec ? audit_submit(r->srv->audit, rec, apply, apply_arg, on_decision_durable, r)
                 : PEP_EUNAVAILABLE;
    decision_end(r);
    if (rc != 0) on_decision_durable(r, rc, 0);
    return request_wait(r);
}

/* Fills r->decision with a refusal decided before any identity is known. */
static void set_refusal(struct request *r, int status, const char *code, const char *reason) {
    r->decision.allow = false;
    r->decision.status = status;
    r->decision.code = code;
    snprintf(r->decision.reason, sizeof r->decision.reason, "%s", reason);
    if (r->match.route) r->decision.action = r->match.route->action;
}

/* Refuses from the request line and headers alone, audits it and answers as soon as the
 * record is durable — without reading the body; the connection is then closed. */
static enum MHD_Result refuse_now(struct request *r, int status, const char *code,
                                  const char *reason) {
    if (!r->decision_locked) decision_begin(r);
    set_refusal(r, status, code, reason);
    request_close_after_answer(r);
    return audit_and_wait(r);
}

/* ---- the data plane ------------------------------------------------------------------------ */

/* /healthz, /readyz and the JWKS: not policy routes, not audited. */
static bool is_builtin(const struct request *r) {
    if (strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0) return false;
    size_t n = strcspn(r->target, "?");
    return (n == 8 && strncmp(r->target, "/healthz", 8) == 0) ||
           (n == 7 && strncmp(r->target, "/readyz", 7) == 0) ||
           (n == 22 && strncmp(r->target, "/.well-known/jwks.json", 22) == 0);
}

static enum MHD_Result answer_builtin(struct request *r) {
    if (strncmp(r->target, "/healthz", 8) == 0) {
        reply_json(r, 200, json_pack("{s:s}", "status", "ok"));
    } else if (strncmp(r->target, "/readyz", 7) == 0) {
        /* Not ready while draining, or while the audit store cannot write (every audited
         * request would be refused): a load balancer should send traffic elsewhere. */
        struct audit_stats st;
        audit_get_stats(r->srv->audit, &st);
        const char *status = "ready";
        if (__atomic_load_n(&r->srv->draining, __ATOMIC_RELAXED))
            status = "draining";
        else if (st.failing)
            status = "audit_unavailable";
        reply_json(r, strcmp(status, "ready") == 0 ? 200 : 503,
                   json_pack("{s:s}", "status", status));
    } else {
        reply_json(r, 200, keys_jwks(r->srv->keys));
    }
    return reply_send(r);
}

/* Records a refusal decided from the request line and headers alone.  Its answer waits
 * for the end of the (small, bounded) body so that the connection can be kept alive. */
static enum MHD_Result refuse_after_body(struct request *r, int status, const char *code,
                                         const char *reason) {
    r->decided_early = true;
    set_refusal(r, status, code, reason);
    return MHD_YES;
}

/* "Bearer <token>" → the token, or NULL. */
static const char *bearer_token(struct MHD_Connection *conn) {
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return NULL;
    h += 7;
    while (*h == ' ')
        h++;
    return *h ? h : NULL;
}

/* Refusals decided from the path alone (query, normal form, route), or NULL: the path is
 * fine and r->match holds the route. */
static const char *path_refusal(struct request *r, int *status, const char **code, char *reason,
                                size_t reason_cap) {
    *status = 400;
    *code = "bad_request";
    size_t path_len = strcspn(r->target, "?");
    if (r->target[path_len] == '?') r->query = r->target + path_len + 1;
    /* SECURITY: the query is relayed as received; a raw '#' would end it early in libcurl
     * (the upstream would see another query than the one decided on). */
    if (r->query && strchr(r->query, '#'))
        return "the query has a character that must be percent-encoded";
    const char *why = NULL;
    if (route_normalize_path(r->target, path_len, &r->path, &why) != 0) {
        snprintf(reason, reason_cap, "path is not in normal form (%s)", why ? why : "invalid");
        return reason;
    }
    if (!route_match(r->policy, r->method, r->path, &r->match)) {
        *status = 404;
        *code = "no_route";
        return "no route matches this method and path";
    }
    return NULL;
}

/* Looks up what the registry says of the verified token's jti and subject, now: called
 * when the head arrives and again when deciding, so that a revocation or a disabled agent
 * in between is seen. */
static void identify(struct request *r, struct decide_input *in) {
    in->token_present = r->token_present;
    in->token_status = r->token_status;
    if (!r->claims) return;
    in->claims = r->claims;
    enum registry_token_state st = registry_token_state(r->srv->registry, r->claims->jti);
    in->token_revoked = st == REGISTRY_TOKEN_REVOKED;
    in->token_unknown = st == REGISTRY_TOKEN_UNKNOWN;
    agent_release(r->agent);
    r->agent = registry_get_agent(r->srv->registry, r->claims->sub);
    in->agent = r->agent;
}

/* A request that proved no identity: answered from its head (401, or what the route
 * steps found), its body never read (SECURITY: a client without a credential cannot
 * make pep hold its connection or buffer its body).  Past server.unauthenticated_limit,
 * the refusal is answered 429 at once and counted instead of audited (SPEC 3.2 step 2). */
static enum MHD_Result refuse_unauthenticated(struct request *r) {
    const struct policy *p = r->policy;
    if (p->unauthenticated_limit.limit > 0 && r->decision.status == 401) {
        char source[CONN_ADDRESS_LEN];
        conn_client_address(r->conn, source);
        struct unauth_verdict v =
            unauth_refused(r->srv->unauth, source, p->unauthenticated_limit.limit,
                           p->unauthenticated_limit.window_ms, pep_mono_us());
        if (v.first_limited)
            fprintf(stderr,
                    "pep: warning: %s was refused without a valid credential %lld times in "
                    "%lld ms; its refusals are answered 429 and counted until the window ends\n",
                    source, (long long)p->unauthenticated_limit.limit,
                    (long long)p->unauthenticated_limit.window_ms);
        if (v.limited) {
            decision_end(r); /* nothing is recorded for it one by one */
            char wait[24], msg[160];
            snprintf(wait, sizeof wait, "%lld", (long long)v.retry_after_s);
            snprintf(msg, sizeof msg,
                     "too many requests without a valid credential from %s; retry in %llds", source,
                     (long long)v.retry_after_s);
            reply_error(r, 429, "rate_limited", msg,
                        json_pack("{s:I}", "retry_after_s", (json_int_t)v.retry_after_s));
            reply_set_header(&r->reply, "Retry-After", wait);
            request_close_after_answer(r);
            return reply_send(r);
        }
    }
    request_close_after_answer(r);
    return audit_and_wait(r);
}

static enum MHD_Result pipeline_on_head(struct request *r) {
    r->policy = server_policy(r->srv);

    /* SECURITY: a malformed head or ambiguous framing is answered at once and the
     * connection closed: its body must not be read, since pep and the client may disagree
     * on where it ends.  Built-in endpoints too: the connection is what is at stake. */
    const char *problem = request_head_problem(r);
    if (problem) return refuse_now(r, 400, "bad_request", problem);
    if (is_builtin(r)) {
        r->builtin = true;
        return MHD_YES;
    }

    decision_begin(r); /* max_body and the routes are the policy's */
    r->body_limit = r->policy->max_body;
    const char *cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Length");
    if (cl) {
        char *end;
        unsigned long long n = strtoull(cl, &end, 10);
        if (*end == '\0' && n > r->body_limit) {
            char reason[96];
            snprintf(reason, sizeof reason, "body of %llu bytes exceeds max_body %llu", n,
                     (unsigned long long)r->body_limit);
            return refuse_now(r, 413, "body_too_large", reason);
        }
    }

    int status;
    const char *code;
    char why[128];
    const char *refusal = path_refusal(r, &status, &code, why, sizeof why);

    /* Authenticate now, before any body byte is read (cheap: cached, or one verify). */
    const char *token = bearer_token(r->conn);
    r->token_present = token != NULL;
    if (token) {
        const struct policy *p = r->policy;
        r->token_status =
            token_verify(r->srv->verifier, r->srv->keys, token, p->issuer, "pep",
                         r->start_wall_us / 1000000, p->clock_skew_ms / 1000, &r->claims);
    }
    struct decide_input in = {
        .policy = r->policy,
        .match = refusal ? NULL : &r->match,
        .now_s = r->start_wall_us / 1000000,
    };
    identify(r, &in);
    bool authenticated = in.token_present && in.token_status == TOKEN_OK && in.claims &&
                         !in.token_revoked && !in.token_unknown && in.agent && in.agent->enabled;
    const char *approval_id;
    size_t approval_id_len;
    if (govern_is_approval_poll(r, &approval_id, &approval_id_len)) {
        /* pep's own endpoint, ahead of the routes; a read, not a decision: not audited. */
        decision_end(r);
        if (authenticated) {
            govern_answer_approval_poll(r, approval_id, approval_id_len);
        } else {
            decide_authenticated(&in, &r->decision);
            reply_error(r, 401, "invalid_token", r->decision.reason, NULL);
        }
        request_close_after_answer(r);
        return reply_send(r);
    }
    if (!authenticated) {
        if (refusal) {
            set_refusal(r, status, code, refusal);
        } else {
            decide(&in, &r->decision); /* 401 invalid_token, with why */
        }
        return refuse_unauthenticated(r);
    }
    /* An identified agent's request is decided once its (bounded) body is in; a refusal
     * from its head is answered then too, so that its connection stays usable. */
    decision_end(r);
    if (refusal) return refuse_after_body(r, status, code, refusal);
    return MHD_YES;
}

/* Audit writer thread: the decision record is durable (or could not be written). */
static void on_decision_durable(void *arg, int rc, int64_t seq) {
    struct request *r = arg;
    r->audit_rc = rc;
    r->audit_seq = seq;
    bool audited = !audit_refuses(r);
    govern_settled(r, rc == 0, audited);
    const struct action *action = r->decision.action;
    metrics_decision(r->srv->metrics, action ? action->name : NULL, audited && r->decision.allow,
                     audited ? r->decision.code : "audit_unavailable",
                     pep_mono_us() - r->start_mono_us);
    if (audited && r->decision.allow && r->forwarding) {
        dispatch_start(r); /* the forward stage resumes it */
        return;
    }
    request_resume(r);
}

/* The policy changed between the request's head and its decision: the route is matched
 * again under the policy the decision will carry (a path refusal does not depend on it). */
static void rematch(struct request *r) {
    r->policy_replaced = false;
    bool path_refused = r->decided_early && strcmp(r->decision.code, "no_route") != 0;
    if (!r->path || path_refused) return;
    if (route_match(r->policy, r->method, r->path, &r->match)) {
        r->decided_early = false;
    } else {
        r->match.route = NULL;
        r->decided_early = true;
        set_refusal(r, 404, "no_route", "no route matches this method and path");
    }
}

static enum MHD_Result pipeline_on_complete(struct request *r) {
    if (r->builtin) return answer_builtin(r);
    if (r->body_too_large) {
        char reason[96];
        snprintf(reason, sizeof reason, "body exceeds max_body %llu",
                 (unsigned long long)r->body_limit);
        return refuse_now(r, 413, "body_too_large", reason);
    }
    decision_begin(r);
    if (r->policy_replaced) rematch(r);
    if (r->decided_early) return audit_and_wait(r);
    struct decide_input in = {
        .policy = r->policy,
        .match = &r->match,
        .now_s = r->start_wall_us / 1000000,
    };
    identify(r, &in);
    decide(&in, &r->decision);
    govern_decide(r); /* steps 5-6, idempotency */
    if (r->decision.allow && r->match.route->forwards && !govern_is_replay(r)) {
        r->forwarding = true;
        if (dispatch_prepare(r) != 0) {
            r->decision.allow = false;
            r->decision.status = 503;
            r->decision.code = "upstream_unavailable";
            snprintf(r->decision.reason, sizeof r->decision.reason,
                     "cannot prepare the upstream request");
            r->forwarding = false;
        }
    }
    return audit_and_wait(r);
}

static enum MHD_Result pipeline_respond(struct request *r) {
    if (audit_refuses(r)) {
        r->audit_seq = 0;
        reply_error(r, 503, "audit_unavailable",
                    "the audit log cannot be written; request refused (fail closed)", NULL);
        reply_set_header(&r->reply, "Retry-After", "1");
        return reply_send(r);
    }
    if (govern_is_replay(r)) {
        govern_reply_replay(r);
        return reply_send(r);
    }
    if (!r->decision.allow) {
        reply_error(r, r->decision.status, r->decision.code, r->decision.reason,
                    govern_error_extra(r));
    } else if (r->forwarding) {
        return dispatch_respond(r);
    } else {
        reply_json(r, 200,
                   json_pack("{s:s, s:s, s:s}", "decision", "allow", "action",
                             r->decision.action->name, "request_id", r->id));
    }
    govern_reply(r);
    return reply_send(r);
}

/* A streamed answer whose agent left before its reader started must stop the transfer. */
static void pipeline_closed(struct request *r) {
    dispatch_closed(r);
}

static void pipeline_free(struct request *r) {
    govern_free(r->gov);
    dispatch_free(r->dispatch);
}

const struct listener_handlers pipeline_handlers = {
    .on_head = pipeline_on_head,
    .on_complete = pipeline_on_complete,
    .on_resume = pipeline_respond,
    .on_closed = pipeline_closed,
    .on_free = pipeline_free,
};
