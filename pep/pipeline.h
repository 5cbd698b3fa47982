/*
 * pipeline.h — the data plane's stages (see pipeline.c), handed to the data listener
 * (http.c) by main.c.
 *
 * Threads: the listener thread handling the request.
 */
#ifndef PEP_PIPELINE_H
#define PEP_PIPELINE_H

#include "pep/http.h"

/* The stages, for the data listener: on_head, on_complete (decide, audit, forward) and
 * on_resume (the answer, once the audit writer or the forwarder is done). */
extern const struct listener_handlers pipeline_handlers;

#endif
