/*
 * dispatch.h — the forward stage (SPEC 4): runs an allowed request's chain on the
 * forwarder thread, move by move (chain.c plans, forward.c sends), and builds its answer.
 *
 *   dispatch_prepare   listener thread, while the decision is made: what every attempt
 *                      sends (upstream.c), the chain to run (a route's `forward: {upstream}`
 *                      is a one-step chain).
 *   dispatch_start     once the decision record is durable (audit writer thread): the first
 *                      move.  Each attempt's end (forwarder thread) asks the planner again;
 *                      waits are forwarder timers; open breakers are skipped; escalations
 *                      are opened, recorded and POSTed on the way.  At the end the outcome
 *                      is audited (with every attempt and skip), then the request resumes —
 *                      or, for a stream, its answer was already under way.
 *   dispatch_respond   listener thread: the upstream's answer relayed (buffered or streamed
 *                      chunk by chunk, SPEC 4.6), or pep's 502/503/504.
 *
 * Threads: as marked; the request is touched by one thread at a time (the one that will
 * resume it), except a streamed answer's pipe, which has its own lock (stream.h).
 */
#ifndef PEP_DISPATCH_H
#define PEP_DISPATCH_H

#include "pep/breaker.h"
#include "pep/http.h"

/* Builds r->dispatch for r's route.  Returns 0, or a negative code (the request is then
 * answered 503 upstream_unavailable: nothing was sent). */
int dispatch_prepare(struct request *r);

/* Starts the chain (r's decision record is durable); r is resumed when its answer is
 * ready.  Any thread. */
void dispatch_start(struct request *r);

/* Queues r's answer (listener thread, r resumed). */
enum MHD_Result dispatch_respond(struct request *r);

/* libmicrohttpd is done with r: a stream still running stops (its reader is gone). */
void dispatch_closed(struct request *r);

void dispatch_free(struct dispatch *d);

/* A breaker changed state (breaker.c's transition callback, arg: the server): logged,
 * counted and audited as `kind: system`. */
void dispatch_breaker_transition(void *arg, const char *upstream, enum breaker_state_kind from,
                                 enum breaker_state_kind to, int64_t now_ms);

#endif
