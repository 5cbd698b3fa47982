/*
 * server.h — the running service: its shared state, the policy it runs and its reload,
 * and the per-request context that the listeners (http.c), the data plane (pipeline.c)
 * and the admin API (admin.c) share.
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
struct listener_handlers; /* pep/http.h */
struct listener {
    struct server *srv;
    bool admin; /* the admin API rather than the data plane */
    const struct listener_handlers *handlers;
};

struct verifier;         /* pep/verifier.h */
struct approval_store;   /* pep/approvals.h */
struct ratelimiter;      /* pep/ratelimit.h */
struct idem_store;       /* pep/idempotency.h */
struct webhook_sender;   /* pep/webhook.h */
struct breakers;         /* pep/breaker.h */
struct escalation_store; /* pep/escalations.h */
struct metrics;          /* pep/metrics.h */
struct indicators;       /* pep/indicators.h */

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
    struct verifier *audit_verifier;      /* the thread walking the chain for audit/verify */
    struct conn_guard *conn_guard;        /* receive deadlines, lingering close (conn.h) */
    struct unauth_limiter *unauth;        /* server.unauthenticated_limit (unauth.h) */
    struct approval_store *approvals;     /* human approvals (SPEC 3.4) */
    struct ratelimiter *ratelimiter;      /* per-action rate limits (SPEC 3.2 step 6) */
    struct idem_store *idempotency;       /* Idempotency-Key results (SPEC 4.5) */
    struct webhook_sender *webhooks;      /* approvals' notify, escalations */
    struct breakers *breakers;            /* one circuit breaker per upstream (SPEC 4.4) */
    struct escalation_store *escalations; /* the human escalation queue (SPEC 4.4) */
    struct metrics *metrics;              /* SPEC 7 */
    struct indicators *indicators;        /* the chains' reliability indicators (SPEC 8) */
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
    const struct listener *listener; /* the listener it arrived on, with its handlers */
    char id[27];                     /* ULID, also sent as Pep-Request-Id */
    int64_t start_mono_us;
    int64_t start_wall_us;
    enum request_phase phase;
    int holds; /* atomic: see request_hold */

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

    /* SPEC 3.2 steps 5-6 and 4.5 (govern.c): NULL until the request's agent and action
     * are known */
    struct governed *gov;

    bool forwarding;
    struct dispatch *dispatch; /* the forward stage (dispatch.c), once allowed to forward */

    struct reply reply;

    /* admin: the operation in flight while suspended */
    void *admin_op;
    void (*admin_op_free)(void *op);
    bool waits_here;       /* waits on its own thread (shutdown), with `sync` */
    struct sync_wait sync; /* initialized only when waits_here */
};

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

/* Makes the state kept by name across reloads (breakers, metric series, indicators) know
 * p's names; before p serves a request.  0 or PEP_ENOMEM. */
int server_sync_state(struct server *s, const struct policy *p);

/* Warns on stderr about every upstream credential whose environment variable is unset
 * (start and reload): the variables are read per request, so pep runs, but the upstream
 * would see calls without the credential the policy names. */
void server_warn_unset_credentials(const struct policy *p);

#endif
