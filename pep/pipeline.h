/*
 * pipeline.h — the data plane's stages (see pipeline.c), called by the listener glue
 * (http.c) at each phase of a request.
 *
 * Threads: the listener thread handling the request.
 */
#ifndef PEP_PIPELINE_H
#define PEP_PIPELINE_H

#include "pep/server.h"

/* The head is in (first handler call): MHD_YES to read the body, or what answering from
 * the head returned. */
enum MHD_Result pipeline_on_head(struct request *r);
/* The whole body is in: decide, audit, forward. */
enum MHD_Result pipeline_on_complete(struct request *r);
/* The request resumed after its wait (audit, upstream): queue its answer. */
enum MHD_Result pipeline_respond(struct request *r);

#endif
