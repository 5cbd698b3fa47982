/*
 * upstream.h — building the upstream call of an allowed request (SPEC 4.2, 4.7): the URL
 * (forward.path with the matched parameters put in), the headers (the agent's, less what
 * never leaves pep, plus the upstream's credentials, X-Forwarded-For and X-Request-Id),
 * the body and the model it names, and whether the call may be sent again.
 *
 * The forwarder (forward.c) executes what this builds, one attempt per chain step
 * (dispatch.c).
 */
#ifndef PEP_UPSTREAM_H
#define PEP_UPSTREAM_H

#include "pep/http.h"

#define UPSTREAM_MAX_HEADER_LINE 8192

/* What every attempt of one request sends, captured once on the listener thread (attempts
 * are built later on the forwarder thread, where the connection must not be read). */
struct upstream_request {
    char *path_query;               /* the upstream path (forward.path rendered) + query */
    struct forward_header *headers; /* the agent's headers that may travel (SPEC 4.7) */
    size_t headers_len, headers_cap;
    bool has_accept, has_content_type;
    char client[CONN_ADDRESS_LEN]; /* for X-Forwarded-For */
    char request_id[27];           /* sent as X-Request-Id */
    const char *method;            /* the request's (valid while it lives) */
    const char *body;
    size_t body_len;
    bool body_is_object; /* the body is a JSON object: its model can be rewritten */
    char model[256];     /* the body's "model", cut on a character boundary; "" none */
    bool stream;         /* the body says "stream": true (SPEC 4.6) */
    bool repeatable;     /* SPEC 4.2: safe to send more than once */
};

/* Captures r's (its route is r->match).  Returns 0 or PEP_ENOMEM (the request is then
 * answered 503: nothing was sent).  Listener thread.  Free with upstream_request_clear. */
int upstream_capture(struct request *r, struct upstream_request *u);
void upstream_request_clear(struct upstream_request *u);

/* Builds one attempt of u to upstream up into job (url, headers, body, timeouts,
 * repeatable), the body's "model" set to model when model is not NULL and the body is a
 * JSON object (the rewritten body in *body_owned, freed by the next call or the caller).
 * model_sent gets the model the upstream will see.  Returns 0 or a negative code.  Any
 * thread. */
int upstream_attempt(const struct upstream_request *u, const struct upstream *up, const char *model,
                     struct forward_job *job, char **body_owned, char model_sent[256]);

#endif
