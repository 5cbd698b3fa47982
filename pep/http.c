/*
 * http.c — the listeners: libmicrohttpd glue, a request's lifetime, the checks of a head
 * that both listeners share (SECURITY: control bytes, method, request smuggling), the
 * replies and suspend/resume.  What happens to a request is elsewhere: the data plane's
 * stages in pipeline.c, the admin API in admin.c; this file calls them at each phase
 * (head, body, complete, respond) and owns nothing of their logic.
 *
 * A request is never blocked on a listener thread: one that waits (for its record to be
 * durable, for an upstream, for an audit walk) is suspended, and whoever finishes the wait
 * resumes it (request_suspend / request_resume).
 *
 * Threads: handlers run on libmicrohttpd's listener threads; request_resume from any.
 */
#include "pep/http.h"
#include "pep/record.h"
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
    /* 15 significant digits: a rate of 0.95 reads 0.95, not 0.94999999999999996. */
    r->reply.body = body ? json_dumps(body, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
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

/* Adds pep's headers and r->reply's to resp and queues it with r->reply.status. */
static enum MHD_Result queue_reply(struct request *r, struct MHD_Response *resp) {
    struct reply *rep = &r->reply;
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

/* Queues r->reply (plus Pep-Request-Id and, when audited, Pep-Audit-Seq). */
enum MHD_Result reply_send(struct request *r) {
    struct reply *rep = &r->reply;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(rep->body_len, rep->body, MHD_RESPMEM_MUST_FREE);
    if (!resp) return MHD_NO;
    rep->body = NULL; /* owned by the response now */
    return queue_reply(r, resp);
}

enum MHD_Result reply_send_stream(struct request *r, MHD_ContentReaderCallback read,
                                  MHD_ContentReaderFreeCallback done, void *arg) {
    /* Chunked: the length is not known.  16 KiB blocks: one SSE event is far smaller, so
     * a chunk goes out as soon as it is read. */
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, read, arg, done);
    if (!resp) {
        done(arg);
        return MHD_NO;
    }
    return queue_reply(r, resp);
}

/* ---- request holds ------------------------------------------------------------------------ */

static void request_free(struct request *r);

void request_hold(struct request *r) {
    __atomic_add_fetch(&r->holds, 1, __ATOMIC_ACQ_REL);
}

void request_release(struct request *r) {
    if (__atomic_sub_fetch(&r->holds, 1, __ATOMIC_ACQ_REL) == 0) request_free(r);
}

void request_park(struct request *r) {
    __atomic_add_fetch(&r->srv->suspended, 1, __ATOMIC_SEQ_CST);
    MHD_suspend_connection(r->conn);
}

void request_unpark(struct request *r) {
    MHD_resume_connection(r->conn);
    __atomic_sub_fetch(&r->srv->suspended, 1, __ATOMIC_SEQ_CST);
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
    r->listener = l;
    pep_request_id(r->id);
    r->start_mono_us = pep_mono_us();
    r->start_wall_us = pep_now_us();
    r->target = strdup(uri ? uri : "");
    r->holds = 1; /* libmicrohttpd's, released when it is done with the request */
    __atomic_add_fetch(&s->inflight, 1, __ATOMIC_RELAXED);
    conn_request_started(conn);
    return r;
}

static void request_free(struct request *r) {
    if (r->waits_here) {
        pthread_mutex_destroy(&r->sync.lock);
        pthread_cond_destroy(&r->sync.cond);
    }
    if (r->listener->handlers->on_free) r->listener->handlers->on_free(r);
    if (r->admin_op_free && r->admin_op) r->admin_op_free(r->admin_op);
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
    struct request *r = *con_cls;
    if (r && r->listener->handlers->on_closed) r->listener->handlers->on_closed(r);
    if (r) request_release(r);
    *con_cls = NULL;
    conn_request_done(conn);
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
void request_close_after_answer(struct request *r) {
    r->close_connection = true;
    if (announces_body(r->conn)) conn_linger_on_close(r->conn);
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
const char *request_head_problem(struct request *r) {
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

/* ---- the handler ---------------------------------------------------------------------------- */

/* Answers a request whose wait (audit, upstream) is over. */
static enum MHD_Result respond(struct request *r) {
    return r->listener->handlers->on_resume(r);
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
        return r->listener->handlers->on_head(r);
    case PHASE_BODY:
        if (*upload_data_size) {
            append_body(r, upload_data, *upload_data_size);
            *upload_data_size = 0;
            return MHD_YES;
        }
        conn_request_received(conn);
        return r->listener->handlers->on_complete(r);
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

int server_start_listeners(struct server *s, const struct listener_handlers *data_handlers,
                           const struct listener_handlers *admin_handlers, struct pep_err *err) {
    const char *data = s->listen_override ? s->listen_override : s->policy->listen;
    const char *admin =
        s->admin_listen_override ? s->admin_listen_override : s->policy->admin_listen;
    raise_descriptor_limit();
    s->unauth = unauth_new();
    if (!s->unauth) return pep_err_set(err, PEP_ENOMEM, "out of memory");
    int rc = conn_guard_start(&s->conn_guard, s->policy->receive_timeout_ms, on_guard_tick, s, err);
    if (rc != 0) return rc;
    s->data_listener = (struct listener){.srv = s, .admin = false, .handlers = data_handlers};
    s->admin_listener = (struct listener){.srv = s, .admin = true, .handlers = admin_handlers};
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
