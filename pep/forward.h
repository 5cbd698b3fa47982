/*
 * forward.h — the forwarder thread: upstream HTTP through libcurl's multi interface
 * (SPEC 4.7, DESIGN rule 3).
 *
 * Listener threads never wait on an upstream: they fill a struct forward_job, hand it to
 * forwarder_submit() (which only queues it and wakes the forwarder through an eventfd)
 * and suspend the connection.  The forwarder thread owns the multi
 * handle, drives every transfer, and calls job->done on its own thread when the answer is
 * in (or the attempt failed); done resumes the connection.  Connections to each upstream
 * are reused through the multi handle's connection cache.
 *
 * SECURITY: only http and https are allowed as protocols (a policy cannot point curl at
 * file:// or gopher://); redirects are not followed; the agent's Authorization, Cookie,
 * Pep-* and hop-by-hop headers never reach the upstream (forward_header_allowed).
 *
 * Threads: forwarder_submit from any thread; job callbacks on the forwarder thread.
 */
#ifndef PEP_FORWARD_H
#define PEP_FORWARD_H

#include "pep/common.h"

#include <curl/curl.h>

/* Caps the relayed answer; a larger one fails the attempt. */
#define FORWARD_MAX_RESPONSE (32u * 1024 * 1024)
/* Caps the answer bytes all transfers in flight hold at once (answers are buffered whole
 * until they are relayed): an attempt that would pass it fails as FORWARD_TOO_LARGE. */
#define FORWARD_MAX_BUFFERED (256u * 1024 * 1024)
/* Sends of one request whose times are kept (libcurl re-sends at most 5 times). */
#define FORWARD_MAX_SENDS 8
/* Caps a response head (status line and header lines); a larger one cannot be relayed
 * faithfully, so the attempt is a connect_error (SPEC 8). */
#define FORWARD_MAX_HEAD (32u * 1024)

enum forward_error {
    FORWARD_OK = 0,        /* an HTTP answer arrived (any status) */
    FORWARD_TIMEOUT,       /* no complete answer within timeout_ms */
    FORWARD_IDLE_TIMEOUT,  /* silence longer than idle_timeout_ms */
    FORWARD_CONNECT_ERROR, /* refused, reset, or closed before a complete answer; also an
                              answer pep cannot relay faithfully: a head over
                              FORWARD_MAX_HEAD, a head cut off, a status outside 200-599 */
    FORWARD_TOO_LARGE,     /* answer over FORWARD_MAX_RESPONSE or FORWARD_MAX_BUFFERED */
    FORWARD_CANCELLED,     /* pep is shutting down */
};

/* One response header kept for relaying to the agent. */
struct forward_header {
    char *name;
    char *value;
};

struct forward_job {
    /* --- request, filled by the submitter; must stay valid until done is called --- */
    char *url; /* owned by the job (freed by forward_job_clear) */
    const char *method;
    struct curl_slist *headers; /* owned by the job */
    const char *body;           /* not owned */
    size_t body_len;
    int64_t timeout_ms;
    int64_t idle_timeout_ms; /* 0 = none */
    bool repeatable;         /* safe to send again (SPEC 4.2); else at most once */

    /* --- result, filled by the forwarder before done --- */
    enum forward_error error;
    long status;    /* HTTP status when error == FORWARD_OK */
    char *body_out; /* malloc'd answer body (NUL-terminated), owned by the job */
    size_t body_out_len;
    size_t body_out_cap;                 /* allocated size of body_out */
    struct forward_header *resp_headers; /* relayable headers, owned by the job */
    size_t resp_headers_len;
    size_t resp_headers_cap;
    int64_t elapsed_us;
    /* How many times the request went upstream (SPEC 4.2: each is an attempt): libcurl
     * sends a request again, on a fresh connection, when a reused one closes before any
     * answer byte; a request not `repeatable` is never sent twice (the transfer fails as
     * FORWARD_CONNECT_ERROR instead).  0 when no connection was made. */
    int sends;
    int64_t send_at_us[FORWARD_MAX_SENDS]; /* monotonic time of each send (the first ones) */

    void (*done)(struct forward_job *job, void *arg); /* forwarder thread */
    void *done_arg;

    /* --- streaming (SPEC 4.6): set by the submitter --- */
    /* Called on the forwarder thread when the head of a final 2xx answer is complete
     * (job->status and resp_headers are set): return true to have the body written to
     * job->sink as it arrives instead of buffered.  NULL: never streamed. */
    bool (*on_head)(struct forward_job *job, void *arg);
    /* Where a streamed body goes (forwarder thread): returns n when it took all n bytes,
     * FORWARD_SINK_FULL when it has no room now (the transfer is paused until
     * forwarder_continue is called for it), or 0 when nobody reads any more (the transfer
     * is aborted). */
    size_t (*sink)(void *arg, const char *data, size_t n);
    bool streaming;      /* the body goes to sink (set when on_head said so) */
    bool streamed_bytes; /* sink took at least one byte */
    int continue_wanted; /* atomic: forwarder_continue asked to resume the paused transfer */

    /* --- private to the forwarder --- */
    struct forward_job *next;
    struct forwarder *owner; /* while running */
    CURL *easy;
    size_t head_bytes;   /* of the current response head */
    bool head_complete;  /* the current head's blank line arrived */
    bool head_too_large; /* some head passed FORWARD_MAX_HEAD */
    bool resend_refused; /* libcurl wanted to send a request that is not repeatable again */
    bool paused;         /* the sink was full: the transfer waits for forwarder_continue */
    int64_t started_mono_us;
    int64_t last_byte_mono_us; /* when the upstream last sent a byte (or the job started) */
    char curl_errbuf[CURL_ERROR_SIZE];
};

struct forwarder;

/* Starts the forwarder thread.  Returns 0 and *out, or a negative code. */
int forwarder_start(struct forwarder **out, struct pep_err *err);
/* Fails every queued and running job with FORWARD_CANCELLED (their done callbacks run),
 * stops the thread and frees the forwarder. */
void forwarder_stop(struct forwarder *f);
/* Queues a job; returns 0, or PEP_ECLOSED after stop or cancel_all began (done is then not
 * called). */
int forwarder_submit(struct forwarder *f, struct forward_job *job);
/* Fails every job in flight with FORWARD_CANCELLED (drain timeout, shutdown) without
 * stopping the thread, and refuses every later job: nothing starts upstream any more. */
void forwarder_cancel_all(struct forwarder *f);

/* What a sink returns when it cannot take the bytes now (libcurl's pause value). */
#define FORWARD_SINK_FULL CURL_WRITEFUNC_PAUSE

/* A streamed job's sink has room again: the forwarder resumes its paused transfer.  Any
 * thread; the job must still be running (its done callback not yet called). */
void forwarder_continue(struct forwarder *f, struct forward_job *job);

/* A wait on the forwarder thread (a retry's backoff): no thread sleeps. */
struct forward_timer {
    int64_t at_mono_us;
    /* Runs on the forwarder thread once at_mono_us has passed, or at once with cancelled
     * true when pep shuts down (forwarder_cancel_all, forwarder_stop). */
    void (*fire)(struct forward_timer *t, bool cancelled);
    void *arg;
    struct forward_timer *next; /* private */
};

/* Arms t; returns 0, or PEP_ECLOSED after stop or cancel_all began (fire is then not
 * called).  Any thread. */
int forwarder_schedule(struct forwarder *f, struct forward_timer *t);

/* Frees what the job owns (url, headers, answer) and zeroes it. */
void forward_job_clear(struct forward_job *job);
/* Frees the job's answer and result and resets it for another attempt; keeps the request
 * part (url, headers, body) and the callbacks. */
void forward_job_reset_result(struct forward_job *job);

/* True when an incoming request header may be sent upstream (case-insensitive name).
 * `connection_tokens` is the agent's Connection header values, joined by commas (their
 * tokens name more hop-by-hop headers), or NULL. */
bool forward_header_allowed(const char *name, const char *connection_tokens);

/* True when an upstream response header may be relayed to the agent. */
bool forward_response_header_relayable(const char *name);

const char *forward_error_name(enum forward_error e); /* "timeout", "connect_error" … */

#endif
