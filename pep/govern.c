/*
 * govern.c — controls, approvals, rate limits and idempotency for one request.  See
 * govern.h.
 */
#include "pep/govern.h"
#include "pep/approvals.h"
#include "pep/cond.h"
#include "pep/controls.h"
#include "pep/fingerprint.h"
#include "pep/idempotency.h"
#include "pep/metrics.h"
#include "pep/ratelimit.h"
#include "pep/record.h"
#include "pep/util.h"
#include "pep/webhook.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct governed {
    json_t *body; /* parsed once, when a condition of the action reads it */
    char fingerprint[FINGERPRINT_HEX_LEN + 1]; /* "" until needed */
    const struct control *control;             /* the control that refused the request */

    /* approvals */
    struct approval approval; /* created (a copy: the insert's apply arg) or reserved */
    bool approval_created;    /* new: it commits with the decision record */
    bool approval_reused;     /* a pending one for the same request was answered again */
    bool approval_reserved;   /* this request holds an approved one */
    struct approval_use_write use;
    const char *notify; /* the control's webhook (the policy outlives the request) */
    char approval_url[300];

    /* rate limits: the tightest rule's verdict */
    bool ratelimit_known;
    struct ratelimit_verdict ratelimit;
    size_t ratelimit_taken; /* rules taken, given back when the request is not recorded */

    /* idempotency */
    char *idem_key; /* the request's Idempotency-Key on a forwarded route */
    bool idem_reserved;
    bool replay;
    struct idem_result replay_result;
};

void govern_free(struct governed *g) {
    if (!g) return;
    json_decref(g->body);
    approval_clear(&g->approval);
    free(g->idem_key);
    idem_result_clear(&g->replay_result);
    free(g);
}

static void refuse(struct request *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Turns r's decision into a refusal with the SPEC 3.3 code and a reason. */
static void refuse(struct request *r, int status, const char *code, const char *fmt, ...) {
    r->decision.allow = false;
    r->decision.status = status;
    r->decision.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->decision.reason, sizeof r->decision.reason, fmt, ap);
    va_end(ap);
}

/* ---- the request as conditions see it ---------------------------------------------------- */

static const char *header_of(void *arg, const char *lowercase_name) {
    return MHD_lookup_connection_value(arg, MHD_HEADER_KIND, lowercase_name);
}

static void cond_view(const struct request *r, struct cond_request *v) {
    const struct agent *a = r->agent;
    *v = (struct cond_request){
        .body = r->gov->body,
        .header = header_of,
        .header_arg = r->conn,
        .query = r->query,
        .match = &r->match,
        .method = r->method,
        .tenant = r->decision.tenant,
        .tenant_len = r->decision.tenant_len,
        .agent_id = a->id,
        .agent_owner = a->owner,
        .now_s = r->start_wall_us / 1000000,
    };
}

/* SPEC 8: the exact body bytes, with the agent, method, path and query. */
static int fingerprint(struct request *r) {
    struct governed *g = r->gov;
    if (g->fingerprint[0]) return 0;
    struct fingerprint_input in = {.agent = r->agent->id,
                                   .method = r->method,
                                   .path = r->path,
                                   .query = r->query,
                                   .body = r->body,
                                   .body_len = r->body_len};
    return request_fingerprint(&in, g->fingerprint);
}

/* ---- step 6: rate limits ------------------------------------------------------------------- */

static const char *const ratelimit_key_names[] = {[RATELIMIT_KEY_AGENT] = "agent",
                                                  [RATELIMIT_KEY_TENANT] = "tenant",
                                                  [RATELIMIT_KEY_GLOBAL] = "global"};

/* The limiter's key of one rule for r: the action and the rule as written (so a reload that
 * keeps the rule keeps its state), then whose quota it is. */
static size_t ratelimit_key(const struct request *r, const struct ratelimit_rule *rule, char *buf,
                            size_t cap) {
    const char *who = "";
    size_t who_len = 0;
    if (rule->key == RATELIMIT_KEY_AGENT) {
        who = r->agent->id;
        who_len = strlen(who);
    } else if (rule->key == RATELIMIT_KEY_TENANT) {
        who = r->decision.tenant;
        who_len = r->decision.tenant_len;
    }
    int n = snprintf(buf, cap, "%s\x1f%s\x1f%lld\x1f%lld\x1f%.*s", r->decision.action->name,
                     ratelimit_key_names[rule->key], (long long)rule->limit,
                     (long long)rule->window_ms, (int)who_len, who);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap; /* too long: refused by take */
}

static int ratelimit_rule_take(struct request *r, const struct ratelimit_rule *rule, int64_t cost,
                               struct ratelimit_verdict *v) {
    char key[RATELIMIT_MAX_KEY_LEN + 2];
    size_t len = ratelimit_key(r, rule, key, sizeof key);
    return ratelimit_take(r->srv->ratelimiter, key, len, rule->limit, rule->window_ms * 1000, cost,
                          r->start_mono_us, v);
}

/* The tighter of two verdicts: a refusal over a pass (the longest wait among refusals);
 * among passes, fewer remaining, then the later reset. */
static bool tighter(const struct ratelimit_verdict *a, const struct ratelimit_verdict *b) {
    if (a->allowed != b->allowed) return !a->allowed;
    if (!a->allowed) return a->retry_after_s > b->retry_after_s;
    if (a->remaining != b->remaining) return a->remaining < b->remaining;
    return a->reset_s > b->reset_s;
}

/* Gives back what the request took (it is refused, or not recorded). */
static void ratelimit_give_back(struct request *r) {
    const struct action *a = r->decision.action;
    struct governed *g = r->gov;
    for (size_t i = 0; i < g->ratelimit_taken; i++) {
        struct ratelimit_verdict v;
        ratelimit_rule_take(r, &a->rate_limits[i], -1, &v);
    }
    g->ratelimit_taken = 0;
}

/* Looks at every rule without taking anything: the headers of a refused request. */
static void ratelimit_peek(struct request *r) {
    const struct action *a = r->decision.action;
    struct governed *g = r->gov;
    for (size_t i = 0; i < a->rate_limits_len; i++) {
        struct ratelimit_verdict v;
        if (ratelimit_rule_take(r, &a->rate_limits[i], 0, &v) != 0) continue;
        v.allowed = true; /* a look is not a refusal: the headers say what is left */
        v.retry_after_s = 0;
        if (!g->ratelimit_known || tighter(&v, &g->ratelimit)) g->ratelimit = v;
        g->ratelimit_known = true;
    }
}

/* Step 6: takes one request from every rule; refused when one refuses (nothing kept). */
static bool ratelimit_pass(struct request *r) {
    const struct action *a = r->decision.action;
    struct governed *g = r->gov;
    for (size_t i = 0; i < a->rate_limits_len; i++) {
        struct ratelimit_verdict v;
        if (ratelimit_rule_take(r, &a->rate_limits[i], 1, &v) != 0) {
            ratelimit_give_back(r);
            refuse(r, 503, "audit_unavailable", "the rate limiter cannot keep its state");
            return false;
        }
        if (!g->ratelimit_known || tighter(&v, &g->ratelimit)) g->ratelimit = v;
        g->ratelimit_known = true;
        if (!v.allowed) {
            ratelimit_give_back(r);
            /* The others were taken before this one refused: their headers now say what
             * is left with this request given back. */
            char msg[160];
            snprintf(msg, sizeof msg, "rate limit of action %s exceeded: %lld per %lld ms (key %s)",
                     a->name, (long long)a->rate_limits[i].limit,
                     (long long)a->rate_limits[i].window_ms,
                     ratelimit_key_names[a->rate_limits[i].key]);
            refuse(r, 429, "rate_limited", "%s", msg);
            return false;
        }
        g->ratelimit_taken = i + 1;
    }
    return true;
}

/* ---- step 5: controls and approvals ---------------------------------------------------------- */

/* The URL an agent polls its approval at: this listener, as the agent reached it. */
static void approval_url(struct request *r, const char *id) {
    const char *host = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Host");
    if (host && *host && strlen(host) < 200 && !strpbrk(host, "/?#@\\ "))
        snprintf(r->gov->approval_url, sizeof r->gov->approval_url, "http://%s/v1/approvals/%s",
                 host, id);
    else
        snprintf(r->gov->approval_url, sizeof r->gov->approval_url, "/v1/approvals/%s", id);
}

/* A require_approval control applies and the request carries no Pep-Approval: a pending
 * approval is created (or the one already pending for this very request is given again). */
static void approval_required(struct request *r, const struct control *c) {
    struct governed *g = r->gov;
    const struct decision *d = &r->decision;
    if (fingerprint(r) != 0) {
        refuse(r, 503, "audit_unavailable", "cannot fingerprint the request");
        return;
    }
    json_t *fields = cond_body_fields(d->action, g->body);
    char tenant[256];
    snprintf(tenant, sizeof tenant, "%.*s", (int)d->tenant_len, d->tenant);
    struct approval_request in = {.agent = r->agent->id,
                                  .owner = r->agent->owner ? r->agent->owner : "",
                                  .tenant = tenant,
                                  .action = d->action->name,
                                  .method = r->method,
                                  .path = r->path,
                                  .fingerprint = g->fingerprint,
                                  .request_id = r->id,
                                  .fields = fields,
                                  .approvers = (const char *const *)c->approvers,
                                  .approvers_len = c->approvers_len,
                                  .distinct_from_owner = c->distinct_from_owner,
                                  .ttl_us = c->approval_ttl_ms * 1000};
    bool created = false;
    int rc = fields
                 ? approval_create(r->srv->approvals, &in, r->start_wall_us, &g->approval, &created)
                 : PEP_ENOMEM;
    json_decref(fields);
    if (rc != 0) {
        refuse(r, 503, "audit_unavailable", "cannot create the approval");
        return;
    }
    g->approval_created = created;
    g->approval_reused = !created;
    g->notify = c->notify;
    g->control = c;
    approval_url(r, g->approval.id);
    char msg[200];
    snprintf(msg, sizeof msg, "action %s needs a human's approval: re-send with Pep-Approval: %s",
             d->action->name, g->approval.id);
    refuse(r, 403, "approval_required", "%s", msg);
}

/* The request carries Pep-Approval: true when it may go on past the control. */
static bool approval_presented(struct request *r, const struct control *c, const char *id) {
    struct governed *g = r->gov;
    if (fingerprint(r) != 0) {
        refuse(r, 503, "audit_unavailable", "cannot fingerprint the request");
        return false;
    }
    if (g->approval_reserved) return true; /* one approval answers every approval control */
    const char *why = "unknown approval";
    enum approval_use use =
        strlen(id) == APPROVAL_ID_SIZE - 1
            ? approval_reserve(r->srv->approvals, id, r->agent->id, g->fingerprint, r->id,
                               r->start_wall_us, &why, &g->approval)
            : APPROVAL_USE_INVALID;
    g->control = c;
    switch (use) {
    case APPROVAL_USE_OK:
        g->approval_reserved = true;
        snprintf(g->use.id, sizeof g->use.id, "%s", id);
        snprintf(g->use.used_by, sizeof g->use.used_by, "%s", r->id);
        g->use.used_at_us = r->start_wall_us;
        return true;
    case APPROVAL_USE_PENDING:
        g->approval_reused = true;
        approval_url(r, g->approval.id);
        refuse(r, 403, "approval_required", "approval %s is still pending", g->approval.id);
        return false;
    case APPROVAL_USE_DENIED:
        refuse(r, 403, "approval_denied", "approval %s was denied", g->approval.id);
        return false;
    case APPROVAL_USE_INVALID:
        break;
    }
    char msg[200];
    snprintf(msg, sizeof msg, "the approval cannot be used: %s", why);
    refuse(r, 403, "approval_invalid", "%s", msg);
    return false;
}

/* Step 5: the controls in file order, only those whose `when` holds. */
static bool controls_pass(struct request *r) {
    const struct action *a = r->decision.action;
    struct cond_request view;
    cond_view(r, &view);
    const char *presented = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Pep-Approval");
    int64_t now_s = r->start_wall_us / 1000000;
    for (size_t from = 0;;) {
        struct control_step step;
        controls_next(a, from, &view, r->claims, now_s, &step);
        switch (step.outcome) {
        case CONTROLS_PASS:
            return true;
        case CONTROLS_DENY:
            r->gov->control = step.control;
            refuse(r, 403, "denied_by_rule", "%s", step.control->deny_reason);
            return false;
        case CONTROLS_STEP_UP:
            r->gov->control = step.control;
            refuse(r, 401, "insufficient_user_authentication",
                   "this action needs a token with acr %s", step.control->acr);
            if (step.control->max_age_ms > 0) {
                size_t n = strlen(r->decision.reason);
                snprintf(r->decision.reason + n, sizeof r->decision.reason - n,
                         " issued within %lld s of its owner's authentication",
                         (long long)(step.control->max_age_ms / 1000));
            }
            return false;
        case CONTROLS_APPROVAL:
            if (!presented) {
                approval_required(r, step.control);
                return false;
            }
            if (!approval_presented(r, step.control, presented)) return false;
            from = step.index + 1;
            break;
        }
    }
}

static void approval_give_back(struct request *r) {
    struct governed *g = r->gov;
    if (g->approval_reserved) approval_release(r->srv->approvals, g->use.id, r->id);
    g->approval_reserved = false;
}

/* ---- idempotency (SPEC 4.5) ------------------------------------------------------------------ */

/* Looks the key up before the controls: a replay is answered from the stored result, and a
 * key in use by another request is refused, without consuming anything. */
static bool idempotency_lookup(struct request *r) {
    struct governed *g = r->gov;
    const char *key = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Idempotency-Key");
    if (!key || !r->match.route->forwards) return true;
    if (!idem_key_valid(key)) {
        refuse(r, 400, "bad_request", "Idempotency-Key must be 1-255 printable ASCII characters");
        return false;
    }
    if (fingerprint(r) != 0 || !(g->idem_key = strdup(key))) {
        refuse(r, 503, "audit_unavailable", "cannot fingerprint the request");
        return false;
    }
    enum idem_verdict v = idem_lookup(r->srv->idempotency, r->agent->id, key, g->fingerprint,
                                      r->start_wall_us, &g->replay_result);
    switch (v) {
    case IDEM_NONE:
        return true;
    case IDEM_REPLAY:
        g->replay = true;
        snprintf(r->decision.reason, sizeof r->decision.reason, "idempotent replay of request %s",
                 g->replay_result.request_id);
        return false;
    case IDEM_MISMATCH:
        refuse(r, 422, "idempotency_mismatch", "this Idempotency-Key was used for another request");
        return false;
    case IDEM_IN_PROGRESS:
        refuse(r, 409, "idempotency_in_progress",
               "a request with this Idempotency-Key is still in flight");
        return false;
    case IDEM_ERROR:
        break;
    }
    refuse(r, 503, "audit_unavailable", "the idempotency store cannot be read");
    return false;
}

/* Every check passed: the key is taken for this request (another may have taken it since
 * the lookup). */
static bool idempotency_reserve(struct request *r) {
    struct governed *g = r->gov;
    if (!g->idem_key) return true;
    enum idem_verdict v = idem_reserve(r->srv->idempotency, r->agent->id, g->idem_key,
                                       g->fingerprint, r->id, r->start_wall_us, &g->replay_result);
    if (v == IDEM_NONE) {
        g->idem_reserved = true;
        return true;
    }
    ratelimit_give_back(r);
    approval_give_back(r);
    if (v == IDEM_REPLAY) {
        g->replay = true;
        snprintf(r->decision.reason, sizeof r->decision.reason, "idempotent replay of request %s",
                 g->replay_result.request_id);
    } else if (v == IDEM_MISMATCH) {
        refuse(r, 422, "idempotency_mismatch", "this Idempotency-Key was used for another request");
    } else if (v == IDEM_IN_PROGRESS) {
        refuse(r, 409, "idempotency_in_progress",
               "a request with this Idempotency-Key is still in flight");
    } else {
        refuse(r, 503, "audit_unavailable", "the idempotency store cannot be read");
    }
    return false;
}

/* ---- the stages ------------------------------------------------------------------------------ */

void govern_decide(struct request *r) {
    const struct action *a = r->decision.action;
    if (!a || !r->agent) return;
    /* An action without controls or limits, called without a key, costs nothing here. */
    if (a->controls_len == 0 && a->rate_limits_len == 0 &&
        !MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Idempotency-Key"))
        return;
    struct governed *g = r->gov = calloc(1, sizeof *g);
    if (!g) {
        if (r->decision.allow) refuse(r, 503, "audit_unavailable", "out of memory");
        return;
    }
    if (!r->decision.allow) {
        ratelimit_peek(r);
        return;
    }
    if (a->reads_body) {
        /* SECURITY: duplicate keys are refused — a condition must not read another value of
         * `amount` than the upstream acts on. */
        json_error_t jerr;
        g->body = json_loadb(r->body ? r->body : "", r->body_len,
                             JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
        if (!g->body) {
            char msg[sizeof r->decision.reason];
            snprintf(msg, sizeof msg,
                     "the body is not valid JSON (%.80s), and action %.100s reads it", jerr.text,
                     a->name);
            refuse(r, 400, "bad_request", "%s", msg);
            ratelimit_peek(r);
            return;
        }
    }
    if (!idempotency_lookup(r)) {
        ratelimit_peek(r);
        return;
    }
    if (!controls_pass(r)) {
        approval_give_back(r);
        ratelimit_peek(r);
        return;
    }
    if (!ratelimit_pass(r)) {
        approval_give_back(r);
        return;
    }
    idempotency_reserve(r);
}

bool govern_is_replay(const struct request *r) {
    return r->gov && r->gov->replay;
}

audit_apply_fn govern_record(struct request *r, json_t *rec, void **arg) {
    struct governed *g = r->gov;
    *arg = NULL;
    if (!g) return NULL;
    if (g->approval.id[0]) json_object_set_new(rec, "approval_id", json_string(g->approval.id));
    if (g->replay) {
        json_object_set_new(rec, "idempotent_replay", json_true());
        json_object_set_new(rec, "replay_of", json_string(g->replay_result.request_id));
    }
    if (g->approval_created) {
        *arg = &g->approval;
        return approval_apply_insert;
    }
    if (g->approval_reserved && r->decision.allow) {
        *arg = &g->use;
        return approval_apply_use;
    }
    return NULL;
}

void govern_settled(struct request *r, bool recorded, bool proceeds) {
    struct governed *g = r->gov;
    if (!g) return;
    struct server *s = r->srv;
    if (g->approval_created) {
        if (recorded) metrics_approval(s->metrics, METRICS_APPROVAL_PENDING);
        if (!recorded)
            approval_forget(s->approvals, g->approval.id);
        else if (g->notify && webhook_post(s->webhooks, g->notify, "approval.pending",
                                           approval_notify_json(&g->approval)) != 0)
            fprintf(stderr,
                    "pep: approvals: approval %s could not be queued for its notify "
                    "webhook\n",
                    g->approval.id);
        g->approval_created = false;
    }
    if (proceeds && r->decision.allow) {
        if (g->approval_reserved) {
            approval_mark_used(s->approvals, g->use.id, g->use.used_by, g->use.used_at_us);
            metrics_approval(s->metrics, METRICS_APPROVAL_USED);
        }
        g->approval_reserved = false;
        return;
    }
    /* Refused (the record could not be written, or the upstream call could not be built
     * after the checks): nothing is consumed. */
    approval_give_back(r);
    ratelimit_give_back(r);
    if (g->idem_reserved) idem_release(s->idempotency, r->agent->id, g->idem_key, r->id);
    g->idem_reserved = false;
}

struct idem_write *govern_result(struct request *r, const struct forward_job *job,
                                 const char *upstream, const char *model, int attempts,
                                 bool relayed) {
    struct governed *g = r->gov;
    if (!g || !g->idem_reserved) return NULL;
    g->idem_reserved = false;
    struct idem_store *store = r->srv->idempotency;
    if (!relayed) {
        idem_release(store, r->agent->id, g->idem_key, r->id);
        return NULL;
    }
    /* What the agent received: the upstream's status, headers and body, and pep's own
     * headers saying what served it (Pep-Request-Id and Pep-Audit-Seq are the replay's). */
    size_t n = job->resp_headers_len;
    struct forward_header *headers = calloc(n + 3, sizeof *headers);
    char count[16];
    snprintf(count, sizeof count, "%d", attempts);
    struct idem_write *w = NULL;
    if (headers) {
        for (size_t i = 0; i < n; i++)
            headers[i] = job->resp_headers[i];
        if (upstream) headers[n++] = (struct forward_header){"Pep-Upstream", (char *)upstream};
        if (model && *model) headers[n++] = (struct forward_header){"Pep-Model", (char *)model};
        headers[n++] = (struct forward_header){"Pep-Attempts", count};
        struct idem_result res = {.status = (int)job->status,
                                  .headers = headers,
                                  .headers_len = n,
                                  .body = job->body_out ? job->body_out : "",
                                  .body_len = job->body_out_len,
                                  .created_at_us = pep_now_us()};
        snprintf(res.request_id, sizeof res.request_id, "%s", r->id);
        if (idem_complete(store, r->agent->id, g->idem_key, r->id, &res, res.created_at_us, &w) !=
            0)
            w = NULL; /* too large to keep (released), or out of memory */
        free(headers);
    }
    if (!headers) idem_release(store, r->agent->id, g->idem_key, r->id);
    return w;
}

json_t *govern_error_extra(const struct request *r) {
    const struct governed *g = r->gov;
    const char *code = r->decision.code;
    if (strcmp(code, "rate_limited") == 0 && g && g->ratelimit_known)
        return json_pack("{s:I}", "retry_after_s", (json_int_t)g->ratelimit.retry_after_s);
    if (strcmp(code, "approval_required") == 0 && g)
        return json_pack("{s:s, s:s}", "approval_id", g->approval.id, "approval_url",
                         g->approval_url);
    if ((strcmp(code, "approval_denied") == 0 || strcmp(code, "approval_invalid") == 0) && g &&
        g->approval.id[0])
        return json_pack("{s:s}", "approval_id", g->approval.id);
    return NULL;
}

void govern_reply(struct request *r) {
    const struct governed *g = r->gov;
    if (!g) return;
    char v[48];
    if (g->ratelimit_known) {
        snprintf(v, sizeof v, "%lld", (long long)g->ratelimit.limit);
        reply_set_header(&r->reply, "RateLimit-Limit", v);
        snprintf(v, sizeof v, "%lld", (long long)g->ratelimit.remaining);
        reply_set_header(&r->reply, "RateLimit-Remaining", v);
        snprintf(v, sizeof v, "%lld", (long long)g->ratelimit.reset_s);
        reply_set_header(&r->reply, "RateLimit-Reset", v);
        if (!r->decision.allow && strcmp(r->decision.code, "rate_limited") == 0) {
            snprintf(v, sizeof v, "%lld", (long long)g->ratelimit.retry_after_s);
            reply_set_header(&r->reply, "Retry-After", v);
        }
    }
    if (g->control && g->control->kind == CONTROL_STEP_UP && !r->decision.allow) {
        char challenge[300];
        controls_step_up_challenge(g->control, challenge, sizeof challenge);
        reply_set_header(&r->reply, "WWW-Authenticate", challenge);
    }
}

void govern_reply_replay(struct request *r) {
    struct idem_result *res = &r->gov->replay_result;
    reply_clear(&r->reply);
    r->reply.status = res->status;
    r->reply.body = res->body;
    r->reply.body_len = res->body_len;
    res->body = NULL;
    for (size_t i = 0; i < res->headers_len; i++)
        reply_set_header(&r->reply, res->headers[i].name, res->headers[i].value);
    reply_set_header(&r->reply, "Pep-Idempotent-Replay", "true");
    govern_reply(r);
}

/* ---- GET /v1/approvals/{id} ------------------------------------------------------------------ */

bool govern_is_approval_poll(const struct request *r, const char **id, size_t *id_len) {
    static const char prefix[] = "/v1/approvals/";
    if (strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0) return false;
    if (strncmp(r->target, prefix, sizeof prefix - 1) != 0) return false;
    *id = r->target + sizeof prefix - 1;
    *id_len = strcspn(*id, "?");
    return *id_len > 0 && !memchr(*id, '/', *id_len);
}

void govern_answer_approval_poll(struct request *r, const char *id, size_t id_len) {
    char want[APPROVAL_ID_SIZE];
    struct approval a = {0};
    if (id_len == APPROVAL_ID_SIZE - 1) {
        memcpy(want, id, id_len);
        want[id_len] = '\0';
    }
    if (id_len != APPROVAL_ID_SIZE - 1 ||
        approval_get_for_agent(r->srv->approvals, want, r->agent->id, &a) != 0) {
        reply_error(r, 404, "not_found", "no such approval for this agent", NULL);
        return;
    }
    reply_json(r, 200, approval_poll_json(&a, pep_now_us()));
    approval_clear(&a);
}
