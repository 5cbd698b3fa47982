/*
 * verifier.h — GET /admin/v1/audit/verify off the listener threads (SPEC 5, 8).
 *
 * A walk of the whole chain takes seconds on a large store (≈3 s for 300k records here).
 * Run on a listener thread it stalled every admin call that landed on that thread, and two
 * or three at once stalled them all.  So one thread of its own, the verifier ("pep-verify"),
 * does every walk; the admin handler suspends its request, hands a verify_job over, and the
 * verifier calls the job's done callback (which resumes the request) when the walk is over.
 *
 * Concurrent requests share walks, as group commit shares an fsync: every job queued while
 * a walk runs waits for the next walk, and that one walk answers all of them.  So each
 * answer covers at least every record committed before its request arrived (a walk that
 * had already started could not promise that), and N concurrent verifies cost at most two
 * walks instead of N — a FIFO queue of walks would make the last of ten callers wait ten
 * walks, past pepctl's timeout.
 *
 * Threads: verifier_start / verifier_cancel_all / verifier_stop from the main thread;
 * verifier_submit from any thread (listener threads).  A job's done callback runs on the
 * verifier thread.
 */
#ifndef PEP_VERIFIER_H
#define PEP_VERIFIER_H

#include "audit/audit.h"

struct server;
struct verifier;

/* One verification asked for.  Owned by whoever asked (the admin request); the verifier
 * holds it from verifier_submit until it calls done, and never touches it after. */
struct verify_job {
    /* Called once on the verifier thread when rc, res and err are final. */
    void (*done)(struct verify_job *job);
    void *arg;               /* for done (the suspended request) */
    struct verify_job *next; /* the verifier's queue (its lock) */
    int rc;                  /* 0: res is the walk's result; PEP_ECLOSED: cancelled (shutdown);
                                another code: the store could not be read (err says why) */
    struct audit_verify_result res;
    struct pep_err err;
};

/* Starts the verifier thread for s (it reads s->db_path, s->keys and s->audit, which must
 * outlive it).  Returns 0 and *out, or a negative code with err filled. */
int verifier_start(struct server *s, struct verifier **out, struct pep_err *err);

/* Queues job for the next walk.  Returns 0 (job->done will be called), or PEP_ECLOSED when
 * the verifier is cancelled or v is NULL (done will not be called).  Any thread. */
int verifier_submit(struct verifier *v, struct verify_job *job);

/* Shutdown, first step (like forwarder_cancel_all): the walk in progress stops at its next
 * chunk boundary (within about AUDIT_VERIFY_CHUNK_US), and it and every queued job are
 * completed with PEP_ECLOSED; later submits are refused.  Returns at once; sticky;
 * NULL is a no-op.  Call it before server_stop_listeners, which waits for every suspended
 * request to be resumed. */
void verifier_cancel_all(struct verifier *v);

/* Cancels (as verifier_cancel_all), joins the thread and frees v.  Call it once, after
 * the listeners stopped (nothing can submit any more).  NULL is a no-op. */
void verifier_stop(struct verifier *v);

#endif
