/*
 * http.h — the listeners (libmicrohttpd glue): a request's lifetime, the checks every
 * request head passes, replies, and suspend/resume.  What a request means is not decided
 * here: each listener is handed its handlers (struct listener_handlers) by main.c — the
 * data plane's pipeline (pipeline.h) and the admin API (admin.h).
 *
 * Threads: the listener threads run the handlers; request_resume may be called from any
 * thread.
 */
#ifndef PEP_HTTP_H
#define PEP_HTTP_H

#include "pep/server.h"

/* What a listener does with a request, stage by stage.  Each returns what libmicrohttpd's
 * access handler must return. */
struct listener_handlers {
    /* The head is in: MHD_YES to read the body, or the answer queued from the head. */
    enum MHD_Result (*on_head)(struct request *r);
    /* The whole body is in: answer, or suspend (request_suspend + request_wait). */
    enum MHD_Result (*on_complete)(struct request *r);
    /* A suspended request resumed: queue its answer. */
    enum MHD_Result (*on_resume)(struct request *r);
    /* libmicrohttpd is done with the request (answered, or its connection gone); stages
     * that still hold it (a stream) learn it here.  May be NULL. */
    void (*on_closed)(struct request *r);
    /* The last hold on the request is gone: free what the stages attached to it.  May be
     * NULL. */
    void (*on_free)(struct request *r);
};

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
/* Queues a streamed answer (chunked) with r->reply's status and headers: libmicrohttpd
 * calls read(arg, …) for the body as the connection can take it, and done(arg) once it is
 * finished with it (also when the reply cannot be queued). */
enum MHD_Result reply_send_stream(struct request *r, MHD_ContentReaderCallback read,
                                  MHD_ContentReaderFreeCallback done, void *arg);

/* A request lives while someone holds it: libmicrohttpd until the connection is done with
 * it, and a stream's forwarder and reader until they are.  Any thread. */
void request_hold(struct request *r);
void request_release(struct request *r);
/* A streamed answer's reader has nothing to send: suspend the connection until
 * request_unpark (counted like request_suspend, so that shutdown waits for it). */
void request_park(struct request *r);
void request_unpark(struct request *r);

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

/* Starts both listeners, each with its handlers; prints their addresses. */
int server_start_listeners(struct server *s, const struct listener_handlers *data,
                           const struct listener_handlers *admin, struct pep_err *err);
void server_stop_listeners(struct server *s);

#endif
