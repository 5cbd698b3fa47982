/*
 * http.c — the listeners: libmicrohttpd glue, the request context, the data plane's
 * pipeline (SPEC 3) and the replies.
 *
 * A data-plane request goes through these phases, never blocking a listener thread:
 *   headers  the head's form (SECURITY: control bytes, method, request smuggling), path
 *            normalization, route match, declared body size, and the token (verified,
 *            cached).  A request refused here — every request without a valid token — is
 *            audited and answered without reading its body, and its connection closed
 *            (lingering, conn.c).
 *   body     accumulated up to server.max_body (only with a valid token).
 *   decide   under server.decision_lock: registry lookups, decide() (pure), and for an
 *            allowed forward the upstream call built (upstream.c), until the decision
 *            record is queued.
 *   audit    the connection is suspended.  The writer resumes it once the record is
 *            durable — or, for an allowed forward, hands the job to the forwarder, which
 *            audits the outcome and resumes it when the upstream answered.
 *   respond  the listener builds the reply (error JSON, or the relayed upstream answer).
 * Nothing is forwarded unless its decision record committed (or on_failure: allow).
 *
 * Threads: handlers run on libmicrohttpd's listener threads; on_decision_durable runs on
 * the audit writer thread, on_forward_done on the forwarder thread.
 */
#include "pep/server.h"
#include "pep/upstream.h"
#include "pep/util.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* What libmicrohttpd bounds (docs/behaviour.md, "Connections"): */
#define CONNECTION_TIMEOUT_S 30u /* idle: silence on a connection, between or within requests */
#define LISTENER_THREADS 2u      /* per listener: one epoll loop each */
#define CONNECTION_LIMIT 4096u   /* per listener, split evenly across its threads */
/* Per connection: the request head, and the answer's head on its way out.  libmicrohttpd
 * mallocs a pool of at most 32 KiB and mmaps a larger one per connection (then zeroes all
 * of it for every request): measured here, 128 KiB made each new connection cost ~700 µs
 * of CPU instead of ~55 µs.  So the pool stays at 32 KiB, and an upstream head that would
 * not fit beside the agent's own request head is a failed attempt (relay_fits). */
#define CONNECTION_MEMORY (32u * 1024)
/* What libmicrohttpd and pep's own answer headers (Pep-*, Content-Length, Date …) take of
 * the pool besides the request head and the relayed upstream head. */
#define CONNECTION_MEMORY_RESERVE (2u * 1024)

struct policy *server_policy(struct server *s) {
    pthread_mutex_lock(&s->policy_lock);
    struct policy *p = policy_retain(s->policy);
    pthread_mutex_unlock(&s->policy_lock);
    return p;
}

void server_init_decision_lock(struct server *s) {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->decision_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
}

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

/* The bytes as a JSON string with some written %XX: every byte of 0x80 and above when
 * escape_high, and '%' itself when escape_percent. */
static json_t *json_escaped(const char *s, size_t len, bool escape_high, bool escape_percent) {
    char *escaped = malloc(3 * len + 1), *o = escaped;
    if (!escaped) return NULL;
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)s[i];
        if ((b >= 0x80 && escape_high) || (b == '%' && escape_percent))
            o += sprintf(o, "%%%02X", b);
        else
            *o++ = (char)b;
    }
    json_t *v = json_stringn(escaped, (size_t)(o - escaped));
    free(escaped);
    return v;
}

json_t *json_text(const char *s, size_t len) {
    json_t *v = json_stringn(s, len);
    if (v || !s) return v;
    return json_escaped(s, len, true, false);
}

json_t *json_exact_text(const char *s, size_t len) {
    if (!s) return NULL;
    json_t *v = json_stringn(s, len);
    if (v && !memchr(s, '%', len)) return v;
    bool utf8 = v != NULL;
    json_decref(v);
    return json_escaped(s, len, !utf8, true);
}

json_t *server_record(const char *kind, const char *request_id) {
    char ts[32];
    pep_format_rfc3339_us(pep_now_us(), ts);
    char own_id[27];
    if (!request_id) {
        pep_request_id(own_id);
        request_id = own_id;
    }
    return json_pack("{s:s, s:s, s:s}", "ts", ts, "kind", kind, "request_id", request_id);
}

/* ---- replies ------------------------------------------------------------------------- */

int reply_set_header(struct reply *rep, const char *name, const char *value) {
    if (rep->headers_len == rep->headers_cap) {
        size_t cap = rep->headers_cap ? rep->headers_cap * 2 : 8;
        struct forward_header *grown = realloc(rep->headers, cap * sizeof *grown);
        if (!grown) return PEP_ENOMEM;
        rep->headers = grown;
        rep->headers_cap = cap;
    }
    char *n = strdup(name), *v = strdup(value);
    if (!n || !v) {
        free(n);
        free(v);
        return PEP_ENOMEM;
    }
    rep->headers[rep->headers_len].name = n;
    rep->headers[rep->headers_len].value = v;
    rep->headers_len++;
    return 0;
}

void reply_clear(struct reply *rep) {
    free(rep->body);
    for (size_t i = 0; i < rep->headers_len; i++) {
        free(rep->headers[i].name);
        free(rep->headers[i].value);
    }
    free(rep->headers);
    memset(rep, 0, sizeof *rep);
}

void reply_json(struct request *r, int status, json_t *body) {
    reply_clear(&r->reply);
    r->reply.status = status;
    r->reply.content_type = "application/json";
    r->reply.body = body ? json_dumps(body, JSON_COMPACT) : NULL;
    r->reply.body_len = r->reply.body ? strlen(r->reply.body) : 0;
    json_decref(body);
}

void reply_error(struct request *r, int status, const char *code, const char *message,
                 json_t *extra) {
    json_t *err = json_pack("{s:s, s:s, s:o, s:s}", "type", "pep_error", "code", code, "message",
                            json_text(message, strlen(message)), "request_id", r->id);
    if (err && extra) json_object_update(err, extra);
    json_decref(extra);
    reply_json(r, status, json_pack("{s:o}", "error", err));
    if (status == 401 && strcmp(code, "invalid_token") == 0)
        reply_set_header(&r->reply, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
}

/* Queues r->reply (plus Pep-Request-Id and, when audited, Pep-Audit-Seq). */
static enum MHD_Result send_reply(struct request *r) {
    struct reply *rep = &r->reply;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(rep->body_len, rep->body, MHD_RESPMEM_MUST_FREE);
    if (!resp) return MHD_NO;
    rep->body = NULL; /* owned by the response now */
    bool ok = MHD_add_response_header(resp, "Pep-Request-Id", r->id) == MHD_YES;
    if (rep->content_type)
        ok = ok && MHD_add_response_header(resp, "Content-Type", rep->content_type) == MHD_YES;
    if (r->audit_seq > 0) {
        char seq[24];
        snprintf(seq, sizeof seq, "%lld", (long long)r->audit_seq);
        ok = ok && MHD_add_response_header(resp, "Pep-Audit-Seq", seq) == MHD_YES;
    }
    /* Draining: keep-alive clients are told to go; the listening socket is already closed,
     * so their next request goes to another instance instead of into the drain. */
    if (r->close_connection || __atomic_load_n(&r->srv->draining, __ATOMIC_RELAXED))
        ok = ok && MHD_add_response_header(resp, "Connection", "close") == MHD_YES;
    for (size_t i = 0; i < rep->headers_len; i++) {
        /* A header value with CR/LF is refused by MHD: drop that header, keep the reply. */
        MHD_add_response_header(resp, rep->headers[i].name, rep->headers[i].value);
    }
    enum MHD_Result rc = ok ? MHD_queue_response(r->conn, (unsigned)rep->status, resp) : MHD_NO;
    MHD_destroy_response(resp);
    r->phase = PHASE_DONE;
    return rc;
}

/* ---- suspend / resume ------------------------------------------------------------------ */

/*
 * libmicrohttpd aborts the process when a daemon is stopped with a connection still
 * suspended, so suspending and stopping follow a handshake (both sides use sequentially
 * consistent atomics): a request counts itself in `suspended` and then checks `stopping`;
 * server_stop_listeners sets `stopping` and then waits for `suspended` to fall to zero.
 * Either the stopper sees the count or the request sees the flag, and a request that
 * sees the flag waits on its own thread instead (r->waits_here) — only during shutdown.
 */
void request_suspend(struct request *r) {
    struct server *s = r->srv;
    r->phase = PHASE_WAITING;
    __atomic_add_fetch(&s->suspended, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&s->stopping, __ATOMIC_SEQ_CST)) {
        MHD_suspend_connection(r->conn);
        return;
    }
    __atomic_sub_fetch(&s->suspended, 1, __ATOMIC_SEQ_CST);
    r->waits_here = true;
    pthread_mutex_init(&r->sync.lock, NULL);
    pthread_cond_init(&r->sync.cond, NULL);
}

void request_resume(struct request *r) {
    r->phase = PHASE_RESPOND;
    if (r->waits_here) {
        pthread_mutex_lock(&r->sync.lock);
        r->sync.done = true;
        pthread_cond_signal(&r->sync.cond);
        pthread_mutex_unlock(&r->sync.lock);
        return;
    }
    struct server *s = r->srv;
    MHD_resume_connection(r->conn);
    __atomic_sub_fetch(&s->suspended, 1, __ATOMIC_SEQ_CST);
}

static enum MHD_Result respond(struct request *r);

enum MHD_Result request_wait(struct request *r) {
    if (!r->waits_here) return MHD_YES;
    pthread_mutex_lock(&r->sync.lock);
    while (!r->sync.done)
        pthread_cond_wait(&r->sync.cond, &r->sync.lock);
    pthread_mutex_unlock(&r->sync.lock);
    return respond(r);
}

/* ---- request lifetime ------------------------------------------------------------------- */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn) {
    const struct listener *l = cls;
    struct server *s = l->srv;
    struct request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->srv = s;
    r->conn = conn;
    r->admin = l->admin;
    pep_request_id(r->id);
    r->start_mono_us = pep_mono_us();
    r->start_wall_us = pep_now_us();
    r->target = strdup(uri ? uri : "");
    __atomic_add_fetch(&s->inflight, 1, __ATOMIC_RELAXED);
    conn_request_started(conn);
    return r;
}

static void request_free(struct request *r) {
    if (r->waits_here) {
        pthread_mutex_destroy(&r->sync.lock);
        pthread_cond_destroy(&r->sync.cond);
    }
    if (r->admin_op_free && r->admin_op) r->admin_op_free(r->admin_op);
    forward_job_clear(&r->job);
    reply_clear(&r->reply);
    token_claims_release(r->claims);
    agent_release(r->agent);
    operator_release(r->operator_rec);
    if (r->policy) policy_release(r->policy);
    __atomic_sub_fetch(&r->srv->inflight, 1, __ATOMIC_RELAXED);
    free(r->body);
    free(r->path);
    free(r->target);
    free(r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)toe;
    if (*con_cls) request_free(*con_cls);
    *con_cls = NULL;
    conn_request_done(conn);
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
    request_suspend(r);
    int rc = rec ? audit_submit(r->srv->audit, rec, NULL, NULL, on_decision_durable, r)
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

/* True when the request announced a body (which is not read when it is answered from
 * its head alone). */
static bool announces_body(struct MHD_Connection *conn) {
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    return (cl && strspn(cl, "0") != strlen(cl)) ||
           MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Transfer-Encoding") != NULL;
}

/* Answers from the head alone and closes the connection: the body is never read (it may
 * be where pep and the client disagree, or come from a client that proved nothing).  A
 * client still sending its body reads the answer all the same: the close lingers
 * (conn.h). */
static void close_after_answer(struct request *r) {
    r->close_connection = true;
    if (announces_body(r->conn)) conn_linger_on_close(r->conn);
}

/* Refuses from the request line and headers alone, audits it and answers as soon as the
 * record is durable — without reading the body; the connection is then closed. */
static enum MHD_Result refuse_now(struct request *r, int status, const char *code,
                                  const char *reason) {
    if (!r->decision_locked) decision_begin(r);
    set_refusal(r, status, code, reason);
    close_after_answer(r);
    return audit_and_wait(r);
}

/* ---- SECURITY: framing checks (request smuggling) ----------------------------------------- */

struct framing {
    size_t bytes; /* the header lines' size, as received (near enough: ": " and CRLF) */
    int content_length_count;
    int transfer_encoding_count;
    int authorization_count;
    bool transfer_encoding_chunked;
    bool bad_header_name;
    bool bad_header_value;
};

/* RFC 9110 5.1: a field name is a token.  libmicrohttpd keeps "Authorization :" as the
 * name "Authorization " (RFC 9112 5.1 says to refuse it); such a name would slip past
 * every exact-name check (framing here, the headers never sent upstream) while an
 * upstream that trims it would honour it. */
static bool is_token(const char *s) {
    static const char tchar[] = "!#$%&'*+-.^_`|~";
    if (!*s) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr(tchar, *s)) return false;
    return true;
}

/* SECURITY: libmicrohttpd keeps a bare CR (and other control bytes) inside a header value
 * or the request target.  Relayed, an upstream that takes a bare CR for a line break
 * would read headers — or a whole second request — that the agent wrote and pep never
 * decided on.  Only tab is allowed (RFC 9110 5.5: field-content is VCHAR, SP, HTAB and
 * obs-text). */
static bool has_control_byte(const char *s) {
    for (; *s; s++) {
        unsigned char b = (unsigned char)*s;
        if ((b < 0x20 && b != '\t') || b == 0x7f) return true;
    }
    return false;
}

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value) {
    (void)kind;
    struct framing *f = cls;
    f->bytes += strlen(key) + (value ? strlen(value) : 0) + 4;
    if (!is_token(key)) f->bad_header_name = true;
    if (value && has_control_byte(value)) f->bad_header_value = true;
    if (strcasecmp(key, "Content-Length") == 0)
        f->content_length_count++;
    else if (strcasecmp(key, "Authorization") == 0)
        f->authorization_count++;
    else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        f->transfer_encoding_count++;
        f->transfer_encoding_chunked = value && strcasecmp(value, "chunked") == 0;
    }
    return MHD_YES;
}

/* Returns NULL when the request line and headers are well-formed and framing and
 * credentials unambiguous, else the reason to refuse with 400 (both listeners).  Two
 * Authorization headers: we would check one while a server behind us might honour the
 * other. */
static const char *head_problem(struct request *r) {
    /* SECURITY: a method is relayed as the request line's first word; "GET\t/x" or a
     * method with a control byte would be another request line upstream. */
    if (!is_token(r->method))
        return "malformed request line: the method must be a token (RFC 9110)";
    for (const char *t = r->target; *t; t++)
        if ((unsigned char)*t <= 0x20 || *t == 0x7f)
            return "malformed request target: a space or control byte must be percent-encoded";
    struct framing f = {0};
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, count_framing, &f);
    r->head_bytes = f.bytes + strlen(r->method) + strlen(r->target) + 12;
    if (f.bad_header_name) return "malformed header: a field name must be a token (RFC 9110)";
    if (f.bad_header_value)
        return "malformed header: a field value holds a control byte (CR, LF, NUL …)";
    if (f.content_length_count > 1) return "ambiguous framing: more than one Content-Length header";
    if (f.transfer_encoding_count > 1)
        return "ambiguous framing: more than one Transfer-Encoding header";
    if (f.transfer_encoding_count == 1 && f.content_length_count == 1)
        return "ambiguous framing: Content-Length with Transfer-Encoding";
    if (f.transfer_encoding_count == 1 && !f.transfer_encoding_chunked)
        return "unsupported Transfer-Encoding";
    if (f.authorization_count > 1)
        return "ambiguous credentials: more than one Authorization header";
    return NULL;
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
    return send_reply(r);
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
            close_after_answer(r);
            return send_reply(r);
        }
    }
    close_after_answer(r);
    return audit_and_wait(r);
}

static enum MHD_Result data_on_headers(struct request *r) {
    r->policy = server_policy(r->srv);
    r->body_limit = r->policy->max_body;

    /* SECURITY: a malformed head or ambiguous framing is answered at once and the
     * connection closed: its body must not be read, since pep and the client may disagree
     * on where it ends.  Built-in endpoints too: the connection is what is at stake. */
    const char *problem = head_problem(r);
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

static void append_body(struct request *r, const char *data, size_t len) {
    /* A refusal from the head is kept with its body: a reload before the decision may add
     * the route it lacked (rematch). */
    if (r->body_too_large || r->builtin) return; /* not needed: discarded */
    if (r->body_len + len > r->body_limit) {
        r->body_too_large = true; /* chunked upload over the limit: discard, answer 413 */
        return;
    }
    if (r->body_len + len + 1 > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap : 1024;
        while (cap < r->body_len + len + 1)
            cap *= 2;
        char *grown = realloc(r->body, cap);
        if (!grown) {
            r->body_too_large = true;
            return;
        }
        r->body = grown;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, data, len);
    r->body_len += len;
    r->body[r->body_len] = '\0';
}

static void submit_outcome(struct request *r);

/* Forwarder thread: the outcome is audited here, before the request resumes, so that a
 * client that has gone away cannot take the record of a call that was made with it. */
/* Whether the upstream's head, relayed, fits the agent's connection beside its request
 * head (CONNECTION_MEMORY): libmicrohttpd would otherwise close the connection without an
 * answer, while the outcome said the call was served. */
static bool relay_fits(const struct request *r, const struct forward_job *job) {
    size_t head = 0;
    for (size_t i = 0; i < job->resp_headers_len; i++)
        head += strlen(job->resp_headers[i].name) + strlen(job->resp_headers[i].value) + 4;
    return head + r->head_bytes + CONNECTION_MEMORY_RESERVE <= CONNECTION_MEMORY;
}

static void on_forward_done(struct forward_job *job, void *arg) {
    struct request *r = arg;
    if (job->error == FORWARD_OK && !relay_fits(r, job)) {
        job->error = FORWARD_CONNECT_ERROR; /* SPEC 8: an answer pep cannot relay faithfully */
        job->status = 0;
    }
    submit_outcome(r);
    request_resume(r);
}

static void on_decision_durable(void *arg, int rc, int64_t seq) {
    struct request *r = arg;
    r->audit_rc = rc;
    r->audit_seq = seq;
    bool audited = !audit_refuses(r);
    if (audited && r->decision.allow && r->forwarding) {
        r->job.done = on_forward_done;
        r->job.done_arg = r;
        if (forwarder_submit(r->srv->forwarder, &r->job) == 0)
            return; /* the forwarder resumes it */
        /* Shutting down: no attempt is made, and the request is answered as failed. */
        r->forward_refused = true;
        r->job.error = FORWARD_CANCELLED;
        submit_outcome(r);
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

static enum MHD_Result data_on_complete(struct request *r) {
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
    if (r->decision.allow && r->match.route->forwards) {
        r->forwarding = true;
        if (upstream_prepare(r) != 0) {
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

/* Statuses that end a one-step chain as "upstream unavailable" (SPEC 3.3, 4.1): the
 * route's retry.on, which the policy compiler fills with the defaults when absent. */
static bool retryable_status(const struct route *route, long status) {
    for (size_t i = 0; i < route->retry.on_status_len; i++)
        if (route->retry.on_status[i] == status) return true;
    return false;
}

/* How a forwarded request ends (SPEC 3.3, 4.3): the code it is answered with, and the
 * HTTP status in *status.  The reply and the outcome record both come from here. */
static const char *forwarded_code(const struct request *r, int *status) {
    const struct forward_job *job = &r->job;
    if (job->error != FORWARD_OK || retryable_status(r->match.route, job->status)) {
        *status = 503;
        return "upstream_unavailable";
    }
    if (job->status == 401 || job->status == 403) {
        *status = 502;
        return "upstream_auth_failed";
    }
    *status = (int)job->status;
    return "ok";
}

/* How many times the request went upstream (SPEC 4.2, Pep-Attempts): none when the
 * forwarder refused it; one for an attempt that failed before sending (connect_error). */
static int forward_attempts(const struct request *r) {
    if (r->forward_refused) return 0;
    return r->job.sends > 1 ? r->job.sends : 1;
}

/* Audits the outcome of a forwarded request (any thread: everything it reads was set
 * before the job was handed over, or by the finished job). */
static void submit_outcome(struct request *r) {
    const struct route *route = r->match.route;
    const struct forward_job *job = &r->job;
    int status;
    const char *code = forwarded_code(r, &status);
    json_t *rec = server_record("outcome", r->id);
    if (!rec) return;
    json_t *attempts = json_array();
    int n = forward_attempts(r);
    for (int k = 0; k < n; k++) {
        /* Sends before the last one were cut by the upstream closing a reused connection
         * before answering (libcurl sent the request again). */
        bool last = k == n - 1;
        int64_t from = k == 0 || k >= FORWARD_MAX_SENDS ? job->started_mono_us : job->send_at_us[k];
        int64_t to = last || k + 1 >= FORWARD_MAX_SENDS ? job->started_mono_us + job->elapsed_us
                                                        : job->send_at_us[k + 1];
        json_t *attempt = json_pack("{s:s, s:I}", "upstream", route->upstream->name, "ms",
                                    (json_int_t)((to - from) / 1000));
        /* null rather than absent: every attempt entry has the same members (SPEC 8). */
        json_object_set_new(attempt, "model",
                            r->model[0] ? json_text(r->model, strlen(r->model)) : json_null());
        if (!last)
            json_object_set_new(attempt, "error", json_string("connect_error"));
        else if (job->error == FORWARD_OK)
            json_object_set_new(attempt, "status", json_integer(job->status));
        else if (job->error == FORWARD_CANCELLED) /* drain deadline: pep stopped waiting */
            json_object_set_new(attempt, "error", json_string("timeout"));
        else
            json_object_set_new(attempt, "error", json_string(forward_error_name(job->error)));
        json_array_append_new(attempts, attempt);
    }
    json_object_set_new(rec, "attempts", attempts);
    set_str(rec, "code", code);
    json_object_set_new(rec, "status", json_integer(status));
    set_str(rec, "upstream", route->upstream->name);
    if (r->model[0]) set_str(rec, "model", r->model);
    set_str(rec, "action", route->action->name);
    if (r->agent) set_str(rec, "agent", r->agent->id);
    set_exact(rec, "tenant", r->decision.tenant, r->decision.tenant_len);
    /* The serving step's index: none served a request that ends unavailable. */
    if (strcmp(code, "ok") == 0) json_object_set_new(rec, "fallback_step", json_integer(0));
    json_object_set_new(rec, "latency_us", json_integer(pep_mono_us() - r->start_mono_us));
    if (audit_submit(r->srv->audit, rec, NULL, NULL, NULL, NULL) != 0)
        fprintf(stderr, "pep: audit: outcome record of %s could not be queued\n", r->id);
}

/* The upstream's Retry-After when it is a delay in seconds (an HTTP date is not passed
 * on: the agent would read it against its own clock), or NULL. */
static const char *upstream_retry_after(const struct forward_job *job) {
    for (size_t i = 0; job->error == FORWARD_OK && i < job->resp_headers_len; i++) {
        const char *v = job->resp_headers[i].value;
        if (strcasecmp(job->resp_headers[i].name, "Retry-After") == 0 && *v && strlen(v) <= 9 &&
            strspn(v, "0123456789") == strlen(v))
            return v;
    }
    return NULL;
}

/* The answer to a forwarded request: the upstream's, or a pep error (SPEC 3.3, 4.3). */
static enum MHD_Result respond_forwarded(struct request *r) {
    const struct route *route = r->match.route;
    struct forward_job *job = &r->job;
    int status;
    const char *code = forwarded_code(r, &status);
    if (strcmp(code, "upstream_unavailable") == 0) {
        json_t *extra = job->error == FORWARD_OK
                            ? json_pack("{s:I}", "upstream_status", (json_int_t)job->status)
                            : NULL;
        char msg[160];
        snprintf(msg, sizeof msg, "upstream %s unavailable (%s)", route->upstream->name,
                 job->error == FORWARD_OK ? "retryable status" : forward_error_name(job->error));
        reply_error(r, status, code, msg, extra);
        /* SPEC 3.5: Retry-After on 503 when known — the upstream's own, in seconds. */
        const char *wait = upstream_retry_after(job);
        if (wait) reply_set_header(&r->reply, "Retry-After", wait);
    } else if (strcmp(code, "upstream_auth_failed") == 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "upstream %s refused pep's credentials (%ld)",
                 route->upstream->name, job->status);
        reply_error(r, status, code, msg, NULL);
    } else {
        reply_clear(&r->reply);
        r->reply.status = (int)job->status;
        r->reply.body = job->body_out;
        r->reply.body_len = job->body_out_len;
        job->body_out = NULL;
        for (size_t i = 0; i < job->resp_headers_len; i++)
            reply_set_header(&r->reply, job->resp_headers[i].name, job->resp_headers[i].value);
    }
    reply_set_header(&r->reply, "Pep-Upstream", route->upstream->name);
    if (r->model[0]) reply_set_header(&r->reply, "Pep-Model", r->model);
    char attempts[16];
    snprintf(attempts, sizeof attempts, "%d", forward_attempts(r));
    reply_set_header(&r->reply, "Pep-Attempts", attempts);
    return send_reply(r);
}

static enum MHD_Result data_respond(struct request *r) {
    if (audit_refuses(r)) {
        r->audit_seq = 0;
        reply_error(r, 503, "audit_unavailable",
                    "the audit log cannot be written; request refused (fail closed)", NULL);
        reply_set_header(&r->reply, "Retry-After", "1");
        return send_reply(r);
    }
    if (!r->decision.allow) {
        reply_error(r, r->decision.status, r->decision.code, r->decision.reason, NULL);
        return send_reply(r);
    }
    if (r->forwarding) return respond_forwarded(r);
    reply_json(r, 200,
               json_pack("{s:s, s:s, s:s}", "decision", "allow", "action", r->decision.action->name,
                         "request_id", r->id));
    return send_reply(r);
}

/* ---- the handler ---------------------------------------------------------------------------- */

/* Answers a request whose wait (audit, upstream) is over. */
static enum MHD_Result respond(struct request *r) {
    if (r->admin) {
        admin_finish(r);
        return send_reply(r);
    }
    return data_respond(r);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    (void)cls;
    (void)url;
    (void)version;
    struct request *r = *con_cls;
    if (!r) return MHD_NO; /* out of memory when the request line arrived */
    switch (r->phase) {
    case PHASE_HEADERS:
        r->method = method;
        r->phase = PHASE_BODY;
        if (r->admin) {
            r->policy = server_policy(r->srv);
            r->body_limit = r->policy->max_body;
            /* SECURITY: as on the data plane (not audited: nothing was decided). */
            const char *problem = head_problem(r);
            if (problem) {
                reply_error(r, 400, "bad_request", problem, NULL);
                close_after_answer(r);
                return send_reply(r);
            }
            if (!admin_head_authenticated(r)) {
                close_after_answer(r);
                return send_reply(r);
            }
            return MHD_YES;
        }
        return data_on_headers(r);
    case PHASE_BODY:
        if (*upload_data_size) {
            append_body(r, upload_data, *upload_data_size);
            *upload_data_size = 0;
            return MHD_YES;
        }
        conn_request_received(conn);
        if (r->admin) {
            if (r->body_too_large) {
                reply_error(r, 413, "body_too_large", "body exceeds max_body", NULL);
                return send_reply(r);
            }
            enum MHD_Result rc = admin_handle(r);
            /* Answered at once, or suspended until the audit writer resumes it. */
            return r->phase == PHASE_BODY ? send_reply(r) : rc;
        }
        return data_on_complete(r);
    case PHASE_WAITING:
        *upload_data_size = 0;
        return MHD_YES;
    case PHASE_RESPOND:
        return respond(r);
    case PHASE_DONE:
        break;
    }
    return MHD_YES;
}

/* ---- listeners ---------------------------------------------------------------------------------
 */

/* One system record for an ended unauthenticated_limit window (SPEC 3.2 step 2). */
static void audit_unauth_window(void *arg, const struct unauth_window *w) {
    struct server *s = arg;
    json_t *rec = server_record("system", NULL);
    char reason[160];
    snprintf(reason, sizeof reason,
             "%lld requests without a valid credential answered 429 over %lld ms",
             (long long)w->count, (long long)((w->ended_us - w->started_us) / 1000));
    if (rec) {
        json_object_set_new(rec, "action", json_string("unauthenticated_limit"));
        json_object_set_new(rec, "source", json_string(w->source));
        json_object_set_new(rec, "count", json_integer(w->count));
        json_object_set_new(rec, "reason", json_string(reason));
    }
    if (!rec || audit_submit(s->audit, rec, NULL, NULL, NULL, NULL) != 0)
        fprintf(stderr, "pep: audit: unauthenticated_limit record for %s (%lld) not queued\n",
                w->source, (long long)w->count);
}

/* Splits "HOST:PORT" / "[V6]:PORT" and resolves it for binding. */
static int resolve_listen(const char *spec, struct sockaddr_storage *ss, socklen_t *len, char *host,
                          size_t host_cap, struct pep_err *err) {
    const char *colon = strrchr(spec, ':');
    if (!pep_listen_address_ok(spec))
        return pep_err_set(err, PEP_EINVAL,
                           "listen address '%s' is not HOST:PORT with a port of 0 to 65535", spec);
    size_t hlen = (size_t)(colon - spec);
    const char *h = spec;
    if (spec[0] == '[' && hlen >= 2 && spec[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    if (hlen + 1 > host_cap)
        return pep_err_set(err, PEP_EINVAL, "listen address '%s' is too long", spec);
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, colon + 1, &hints, &res);
    if (gai != 0)
        return pep_err_set(err, PEP_EINVAL, "listen address '%s': %s", spec, gai_strerror(gai));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Starts one listener; both share the handler and tell themselves apart by `l`. */
static struct MHD_Daemon *start_listener(struct listener *l, const char *spec,
                                         struct pep_err *err) {
    struct sockaddr_storage ss;
    socklen_t sslen;
    char host[256];
    if (resolve_listen(spec, &ss, &sslen, host, sizeof host, err) != 0) return NULL;
    bool admin = l->admin;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_USE_TURBO | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, l, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, l, MHD_OPTION_NOTIFY_COMPLETED, on_completed, l,
        MHD_OPTION_NOTIFY_CONNECTION, conn_guard_notify, l->srv->conn_guard,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)CONNECTION_TIMEOUT_S,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)CONNECTION_MEMORY, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned int)LISTENER_THREADS, MHD_OPTION_CONNECTION_LIMIT, (unsigned int)CONNECTION_LIMIT,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned int)1024, MHD_OPTION_END);
    if (!d) {
        pep_err_set(err, PEP_EIO, "cannot listen on %s", spec);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    unsigned port = info ? info->port : 0;
    bool v6 = ss.ss_family == AF_INET6;
    printf("listening %s http://%s%s%s:%u\n", admin ? "admin" : "data", v6 ? "[" : "", host,
           v6 ? "]" : "", port);
    fflush(stdout);
    return d;
}

/* The guard thread's housekeeping: audits the unauthenticated_limit windows that ended. */
static void on_guard_tick(void *arg, int64_t now_mono_us) {
    struct server *s = arg;
    unauth_flush(s->unauth, now_mono_us, false, audit_unauth_window, s);
}

/* Both listeners together may hold 2 × CONNECTION_LIMIT sockets, and the forwarder and
 * the audit store need descriptors of their own: a soft limit of 1024 (a common default)
 * would make accept() fail long before the connection limit. */
static void raise_descriptor_limit(void) {
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0 || nofile.rlim_cur >= nofile.rlim_max) return;
    nofile.rlim_cur = nofile.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0)
        fprintf(stderr, "pep: warning: cannot raise the open-file limit\n");
    else if (nofile.rlim_cur < 2 * CONNECTION_LIMIT + 1024)
        fprintf(stderr,
                "pep: warning: the open-file limit (%llu) is below what both listeners' "
                "connection limits need (%u)\n",
                (unsigned long long)nofile.rlim_cur, 2 * CONNECTION_LIMIT + 1024);
}

int server_start_listeners(struct server *s, struct pep_err *err) {
    const char *data = s->listen_override ? s->listen_override : s->policy->listen;
    const char *admin =
        s->admin_listen_override ? s->admin_listen_override : s->policy->admin_listen;
    raise_descriptor_limit();
    s->unauth = unauth_new();
    if (!s->unauth) return pep_err_set(err, PEP_ENOMEM, "out of memory");
    int rc = conn_guard_start(&s->conn_guard, s->policy->receive_timeout_ms, on_guard_tick, s, err);
    if (rc != 0) return rc;
    s->data_listener = (struct listener){.srv = s, .admin = false};
    s->admin_listener = (struct listener){.srv = s, .admin = true};
    s->data_daemon = start_listener(&s->data_listener, data, err);
    if (!s->data_daemon) return err ? err->code : PEP_EIO;
    s->admin_daemon = start_listener(&s->admin_listener, admin, err);
    if (!s->admin_daemon) {
        MHD_stop_daemon(s->data_daemon);
        s->data_daemon = NULL;
        return err ? err->code : PEP_EIO;
    }
    return 0;
}

void server_stop_listeners(struct server *s) {
    /* The handshake of request_suspend: from here on requests wait on their own threads;
     * those already suspended are resumed by the audit writer, or at once by a forwarder
     * that refuses and cancels everything. */
    __atomic_store_n(&s->stopping, 1, __ATOMIC_SEQ_CST);
    if (s->forwarder) forwarder_cancel_all(s->forwarder);
    while (__atomic_load_n(&s->suspended, __ATOMIC_SEQ_CST) > 0)
        usleep(1000);
    if (s->data_daemon) MHD_stop_daemon(s->data_daemon);
    if (s->admin_daemon) MHD_stop_daemon(s->admin_daemon);
    s->data_daemon = s->admin_daemon = NULL;
    conn_guard_stop(s->conn_guard);
    s->conn_guard = NULL;
    /* Windows still open are audited now: the stop record must not precede them. */
    if (s->unauth) unauth_flush(s->unauth, pep_mono_us(), true, audit_unauth_window, s);
    unauth_free(s->unauth);
    s->unauth = NULL;
}

/* ---- synchronous audit (startup, shutdown) -----------------------------------------------------
 */

static void on_sync_done(void *arg, int rc, int64_t seq) {
    struct sync_wait *w = arg;
    pthread_mutex_lock(&w->lock);
    w->done = true;
    w->rc = rc;
    w->seq = seq;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

int server_audit_sync(struct server *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                      int64_t *seq) {
    struct sync_wait w = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};
    int rc = audit_submit(s->audit, record, apply, apply_arg, on_sync_done, &w);
    if (rc != 0) return rc;
    pthread_mutex_lock(&w.lock);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    if (seq) *seq = w.seq;
    return w.rc;
}
