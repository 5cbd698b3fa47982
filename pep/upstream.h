/*
 * upstream.h — building the upstream call of an allowed request (SPEC 4.2, 4.7): the URL
 * (forward.path with the matched parameters put in), the headers (the agent's, less what
 * never leaves pep, plus the upstream's credentials, X-Forwarded-For and X-Request-Id),
 * the body and the model it names, and whether the call may be sent again.
 *
 * The forwarder (forward.c) executes what this builds; the chain planner of the
 * resilience issue will call it per step.
 *
 * Threads: the listener thread handling the request.
 */
#ifndef PEP_UPSTREAM_H
#define PEP_UPSTREAM_H

#include "pep/http.h"

/* Fills r->job for r's route (r->match) and sets r->model.  Returns 0, or a negative code
 * (then the request is answered 503: nothing was sent). */
int upstream_prepare(struct request *r);

#endif
