/*
 * server.h — the running service: its shared state and the per-request context that the
 * data plane (http.c) and the admin API (admin.c) share.
 *
 * Threads: the listener threads (libmicrohttpd's epoll pool) run the handlers; the audit
 * writer and the forwarder call back into a request only through the functions marked
 * "any thread" below, and then resume its connection.  A suspended request is touched by
 * exactly one other thread at a time (the one that will resume it), and the resume itself
 * (a mutex inside libmicrohttpd) orders those writes before the listener reads them.
 */
#ifndef PEP_SERVER_H
#define PEP_SERVER_H

#include "audit/audit.h"
#include "pep/conn.h"
#include "pep/decide.h"
#include "pep/forward.h"
#include "pep/keys.h"
#include "pep/policy.h"
#include "pep/registry.h"
#include "pep/token.h"
#include "pep/unauth.h"

#include <microhttpd.h>
#include <pthread.h>

/* What a listener's callbacks receive as their closure. */
struct listener {
    struct server *srv;
    bool admin; /* the admin API rather than the data plane */
};

struct verifier; /* pep/verifier.h */

struct server {
    char *data_dir;
    char *db_path;
    char *policy_path;
    const char *listen_override;       /* --listen, or NULL */
    const char *admin_listen_override; /* --admin-listen, or NULL */
    const char *data_dir_override;     /* --data-dir, or NULL */

    pthread_mutex_t policy_lock; /* guards `policy` (the pointer swap on reload) */
    /* SPEC 6.5, the chain's order is the order of what happened.  Read-held by a request
     * from the checks of its decision (policy, revocation, agent) until its decision record
     * is queued; write-held by whatever changes what those checks read (a reload, a
     * revocation, an agent's change) until its own record is queued.  So no decision
     * queued after such a record was made without it, and every decision agrees with the
     * policy whose hash it carries.  Writers are preferred: a stream of requests cannot
     * starve a revocation.  Never taken on the audit writer's thread. */
    pthread_rwlock_t decision_lock;
    struct policy *policy; /* current snapshot; requests retain their own */
    int64_t policy_loaded_at_us;

    struct keyring *keys;
    struct token_verifier *verifier;
    struct registry *registry;
    struct audit_store *audit;
    struct forwarder *forwarder;
    struct verifier *audit_verifier; /* the thread walking the chain for audit/verify */
    struct conn_guard *conn_guard;   /* receive deadlines, lingering close (conn.h) */
    struct unauth_limiter *unauth;   /* server.unauthenticated_limit (unauth.h) */
    struct MHD_Daemon *data_daemon;
    struct MHD_Daemon *admin_daemon;
    struct listener data_listener;
    struct listener admin_listener;

    int draining;  /* atomic: SIGTERM received, /readyz answers 503 */
    long inflight; /* atomic: requests between URI and completion */
    int suspended; /* atomic: suspended connections not yet resumed (see request_suspend) */
    int stopping;  /* atomic: listeners are stopping; requests no longer suspend */
};

/* The current policy snapshot, retained (caller releases).  Any thread. */
struct policy *server_policy(struct server *s);
/* Initializes s->decision_lock (writer-preferring). */
void server_init_decision_lock(struct server *s);

/* ---- per-request context -------------------------------------------------------------- */

enum request_phase {
    PHASE_HEADERS, /* created; first handler call not yet seen */
    PHASE_BODY,    /* receiving the body */
    PHASE_WAITING, /* suspended: the audit writer or the forwarder will resume it */
    PHASE_RESPOND, /* resumed: the handler builds and queues the answer */
    PHASE_DONE,    /* answer queued */
};

struct reply {
    int status;
    char *body; /* malloc'd, freed with the request */
    size_t body_len;
    const char *content_type;       /* static */
    struct forward_header *headers; /* extra headers (relayed ones too), malloc'd; grows */
    size_t headers_len;
    size_t headers_cap;
};

/* A waiter for one callback: server_audit_sync, and requests that may not suspend. */
struct sync_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int rc;
    int64_t seq;
};

struct request {
    struct server *srv;
    struct MHD_Connection *conn;
    bool admin;  /* arrived on the admin listener */
    char id[27]; /* ULID, also sent as Pep-Request-Id */
    int64_t start_mono_us;
    int64_t start_wall_us;
    enum request_phase phase;

    char *target;          /* the raw request target (path and query), as received */
    size_t head_bytes;     /* the size of the request line and headers, about */
    const char *method;    /* libmicrohttpd's copy, valid for the request */
    char *path;            /* decoded, normalized path (NULL when refused) */
    const char *query;     /* raw query after '?', into target, or NULL */
    struct policy *policy; /* the snapshot this request uses (retained) */
    struct route_match match;

    char *body; /* request body (at most max_body bytes) */
    size_t body_len;
    size_t body_cap;
    uint64_t body_limit;
    bool body_too_large;
    bool decided_early;    /* refused at headers; answered after the body is read
                              (so the connection stays alive) */
    bool builtin;          /* /healthz, /readyz or the JWKS: answered unaudited */
    bool close_connection; /* the answer closes the connection (Connection: close) */
    bool decision_locked;  /* holds srv->decision_lock (read) until its record is queued */
    bool policy_replaced;  /* a reload replaced `policy` after the route was matched */

    /* the bearer token, verified when the head arrived (token_status valid only when
     * token_present) */
    bool token_present;
    enum token_status token_status;

    /* identity (retained, released with the request) */
    struct token_claims *claims;
    struct agent *agent;
    struct operator_rec *operator_rec;

    struct decision decision;
    int audit_rc;      /* of the decision (or admin) record */
    int64_t audit_seq; /* 0 when not audited */

    bool forwarding;
    struct forward_job job;
    char model[256]; /* the model sent upstream, if known (cut on a character boundary) */

    struct reply reply;

    /* admin: the operation in flight while suspended */
    void *admin_op;
    void (*admin_op_free)(void *op);
    bool waits_here;       /* waits on its own thread (shutdown), with `sync` */
    struct sync_wait sync; /* initialized only when waits_here */
    bool forward_refused;  /* the forwarder refused the job (shutdown): no attempt made */
};

/* A JSON string of len bytes that may not be UTF-8 (a path, an id or a tenant as a client
 * sent it, or a message quoting one).  When they are not valid UTF-8, bytes of 0x80 and
 * above are written %XX, so that an answer or a record never loses the field (jansson
 * refuses invalid UTF-8).  NULL only when out of memory. */
json_t *json_text(const char *s, size_t len);
/* Like json_text, but reversible, for record fields whose bytes a client chose (paths,
 * tenants): '%' is written %25 whenever anything is escaped, so two different byte strings
 * never give the same JSON string.  Valid UTF-8 without '%' is kept as is.  NULL only
 * when out of memory (or s is NULL). */
json_t *json_exact_text(const char *s, size_t len);

/* Per connection: the request head, and the answer's head on its way out.  libmicrohttpd
 * mallocs a pool of at most 32 KiB and mmaps a larger one per connection (then zeroes all
 * of it for every request): measured here, 128 KiB made each new connection cost ~700 µs
 * of CPU instead of ~55 µs.  So the pool stays at 32 KiB, and an upstream head that would
 * not fit beside the agent's own request head is a failed attempt (relay_fits). */
#define CONNECTION_MEMORY (32u * 1024)
/* What libmicrohttpd and pep's own answer headers (Pep-*, Content-Length, Date …) take of
 * the pool besides the request head and the relayed upstream head. */
#define CONNECTION_MEMORY_RESERVE (2u * 1024)

/* Reply helpers (listener thread, or a callback before resuming). */
int reply_set_header(struct reply *rep, const char *name, const char *value);
/* Frees what rep holds and zeroes it. */
void reply_clear(struct reply *rep);
void reply_json(struct request *r, int status, json_t *body); /* steals body */
/* SPEC 3.3 error body with request_id; `extra` (may be NULL) members are merged in
 * (stolen).  401 invalid_token adds WWW-Authenticate. */
void reply_error(struct request *r, int status, const char *code, const char *message,
                 json_t *extra);

/* Queues r->reply as the answer (with Pep-Request-Id and, when audited, Pep-Audit-Seq). */
enum MHD_Result reply_send(struct request *r);
/* The answer will close the connection, lingering when a body was announced and not read
 * (conn.h): for answers given from the head alone. */
void request_close_after_answer(struct request *r);
/* NULL when the request line and headers are well-formed and its framing and credentials
 * unambiguous, else why to refuse it with 400 (both listeners; sets r->head_bytes). */
const char *request_head_problem(struct request *r);

/* Suspends the request's connection (phase WAITING).  Must run on the listener thread,
 * before handing the request to another thread; the handler then returns
 * request_wait(r).  While listeners stop, the request is not suspended but waits on its
 * own thread in request_wait. */
void request_suspend(struct request *r);
/* Resumes it (phase RESPOND).  Any thread. */
void request_resume(struct request *r);
/* What the handler returns after request_suspend (see there). */
enum MHD_Result request_wait(struct request *r);

/* The admin API (admin.c): called on the complete request (body received). */
enum MHD_Result admin_handle(struct request *r);
/* Called when the head arrives: true when the request needs no operator token or carries a
 * valid one; otherwise the 401 is in r->reply (SECURITY: a client without a credential is
 * answered before its body is read or buffered, as on the data plane). */
bool admin_head_authenticated(struct request *r);
/* Called when a suspended admin request resumes, to build its reply. */
void admin_finish(struct request *r);

/* Service lifecycle (http.c). */
int server_start_listeners(struct server *s, struct pep_err *err);
void server_stop_listeners(struct server *s);

/* Writes an audit item and waits for it (startup and shutdown only: blocks). */
int server_audit_sync(struct server *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                      int64_t *seq);

/* A fresh audit record {ts, kind, request_id} (new reference); a record not caused by a
 * request (start, stop, SIGHUP…) gets a request id of its own, so that every record can
 * be named by one (SPEC 6.2). */
json_t *server_record(const char *kind, const char *request_id);

/* Who asked for a reload: an operator through the admin API, or NULL fields for SIGHUP. */
struct reload_origin {
    const char *operator_id; /* the record is kind `admin` with this operator, else `system` */
    const char *request_id;
};

/* Reloads the policy file (SIGHUP, POST /admin/v1/policy/reload).  The new policy is
 * compiled, its `policy.reload` record written durably (*audit_seq, may be NULL), and only
 * then swapped in; policy agents are reseeded.  Blocks on the audit writer.  Returns 0;
 * PEP_EINVAL (or PEP_EIO, PEP_ENOMEM) with errs filled when the file is refused — the
 * active policy is kept; PEP_EUNAVAILABLE when the record could not be written (nothing
 * changed: a change that cannot be audited is not made).  errs: caller frees with
 * policy_errors_free.  Any thread; reloads are serialized. */
int server_reload(struct server *s, const struct reload_origin *by, int64_t *audit_seq,
                  struct policy_errors *errs);

/* Warns on stderr about every upstream credential whose environment variable is unset
 * (start and reload): the variables are read per request, so pep runs, but the upstream
 * would see calls without the credential the policy names. */
void server_warn_unset_credentials(const struct policy *p);

/* First start: creates the bootstrap operator `admin` and writes DATA/admin.token (0600)
 * when that file does not exist.  Blocks on the audit writer (startup only). */
int server_bootstrap_admin(struct server *s, struct pep_err *err);

/* Brings the policy-managed agents in line with p (each change audited as kind `system`,
 * action `agents.seed`): creates the agents p lists that the registry lacks, updates
 * policy-managed ones that differ, disables policy-managed ones p no longer lists.
 * Agents changed through the admin API are left as they are (logged when p differs).
 * Blocks on the audit writer. */
int server_seed_agents(struct server *s, const struct policy *p);

#endif
