/*
 * verifier.c — the verifier thread: walks of the audit chain for GET /admin/v1/audit/verify,
 * off the listener threads (see verifier.h for why, and for how requests share walks).
 *
 * A walk reads in bounded read transactions (audit_verify_file_opts: a few thousand rows
 * or ~50 ms each), so it never holds back the audit writer's WAL checkpoints for long.
 * Short transactions are not enough on their own under write load: SQLite restarts the
 * WAL from its beginning only when a write transaction starts with the WAL fully copied
 * back and no reader holding a snapshot in it; a walker that starts its next transaction
 * right after ending one almost always holds one, and the -wal file then grows as if the
 * walk were one transaction.  So between two chunks the walk pauses (verifier_pause) until
 * the writer has committed twice — the second commit, and the checkpoint it runs, began
 * after the walker's snapshot ended — at most 10 ms, and not at all when the writer wrote
 * nothing during the chunk.  Measured on 300k records with four clients writing: the WAL
 * stayed at 5-6 MB (its checkpoint size is ~4 MB), against 69-94 MB with the same short
 * transactions and no pause, and 31-74 MB for the old walk in one transaction; the walk
 * took 6-7.5 s under that load instead of 6-6.5 s without the pause (3.1-3.2 s idle, no
 * pause then).
 *
 * Shutdown: verifier_cancel_all stops a walk at its next pause and completes every job
 * with PEP_ECLOSED, so that server_stop_listeners, which waits for suspended requests,
 * waits at most one chunk.
 *
 * Threads: the verifier thread runs walks and the jobs' done callbacks; verifier_submit
 * and verifier_cancel_all from any thread.  `lock` guards the queue and `cancelled`.
 */
#include "pep/verifier.h"

#include "pep/server.h"
#include "pep/util.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The pause between two chunks of a walk: it ends once the writer committed twice since the
 * chunk ended, or after at most VERIFIER_PAUSE_MAX_US when the writer was busy during the
 * chunk (two commits or more), VERIFIER_PAUSE_QUIET_US when it committed once, not at all
 * when it committed nothing (no WAL growing: nothing to wait for). */
#define VERIFIER_PAUSE_MAX_US 10000
#define VERIFIER_PAUSE_QUIET_US 1000
#define VERIFIER_PAUSE_POLL_US 250

struct verifier {
    struct server *srv; /* db_path, keys and audit: read-only here */
    pthread_t thread;
    bool thread_started;

    pthread_mutex_t lock;          /* guards what follows */
    pthread_cond_t cond;           /* a job queued, or cancelled */
    struct verify_job *queue_head; /* jobs waiting for the next walk, oldest first */
    struct verify_job *queue_tail;
    bool cancelled; /* sticky: the walk in progress stops, submits are refused */

    int64_t pause_batches; /* writer batches when the last pause ended (verifier thread) */
};

/* Sleeps on v->cond for at most us; returns with v->lock held.  Caller holds v->lock. */
static void verifier_wait_us(struct verifier *v, int64_t us) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    int64_t ns = until.tv_nsec + us * 1000;
    until.tv_sec += ns / 1000000000;
    until.tv_nsec = ns % 1000000000;
    pthread_cond_timedwait(&v->cond, &v->lock, &until);
}

/* The walk's pause between two read transactions (audit_verify_options.pause): gives the
 * writer room to checkpoint and restart the WAL (see the top of the file).  Returns false
 * once cancelled, which stops the walk. */
static bool verifier_pause(void *arg) {
    struct verifier *v = arg;
    struct audit_stats st;
    audit_get_stats(v->srv->audit, &st);
    int64_t batches0 = st.batches, t0 = pep_mono_us();
    int64_t during_chunk = st.batches - v->pause_batches;
    int64_t budget_us = during_chunk >= 2   ? VERIFIER_PAUSE_MAX_US
                        : during_chunk == 1 ? VERIFIER_PAUSE_QUIET_US
                                            : 0;
    pthread_mutex_lock(&v->lock);
    while (!v->cancelled && st.batches < batches0 + 2 && pep_mono_us() - t0 < budget_us) {
        verifier_wait_us(v, VERIFIER_PAUSE_POLL_US);
        audit_get_stats(v->srv->audit, &st);
    }
    bool go_on = !v->cancelled;
    pthread_mutex_unlock(&v->lock);
    v->pause_batches = st.batches;
    return go_on;
}

/* One walk of the chain as it stands now, into job (rc, res, err). */
static void verifier_walk(struct verifier *v, struct verify_job *job) {
    struct server *s = v->srv;
    struct audit_stats st;
    audit_get_stats(s->audit, &st);
    v->pause_batches = st.batches;
    /* SECURITY: the checkpoints' hash column is unsigned; only their JWTs, checked against
     * the keys pep signs with, catch a chain re-hashed after an edit (SPEC 6.4). */
    struct audit_verify_options opt = {.check = token_check_checkpoint,
                                       .check_arg = s->keys,
                                       .pause = verifier_pause,
                                       .pause_arg = v};
    job->rc = audit_verify_file_opts(s->db_path, &opt, &job->res, &job->err);
}

/* Completes every job of the list with the outcome in result.  A job is not touched after
 * its done callback: the request it belongs to may be answered and freed at once. */
static void verifier_deliver(struct verify_job *jobs, const struct verify_job *result) {
    while (jobs) {
        struct verify_job *next = jobs->next;
        jobs->rc = result->rc;
        jobs->res = result->res;
        jobs->err = result->err;
        jobs->next = NULL;
        jobs->done(jobs);
        jobs = next;
    }
}

static void *verifier_main(void *arg) {
    struct verifier *v = arg;
    pthread_mutex_lock(&v->lock);
    for (;;) {
        while (!v->queue_head && !v->cancelled)
            pthread_cond_wait(&v->cond, &v->lock);
        if (!v->queue_head) break; /* cancelled, nothing left to answer */
        /* Everyone queued so far shares this walk; later arrivals wait for the next. */
        struct verify_job *batch = v->queue_head;
        v->queue_head = v->queue_tail = NULL;
        bool cancelled = v->cancelled;
        pthread_mutex_unlock(&v->lock);

        struct verify_job result = {.rc = PEP_ECLOSED};
        if (!cancelled) verifier_walk(v, &result);
        verifier_deliver(batch, &result);

        pthread_mutex_lock(&v->lock);
    }
    pthread_mutex_unlock(&v->lock);
    return NULL;
}

int verifier_start(struct server *s, struct verifier **out, struct pep_err *err) {
    *out = NULL;
    struct verifier *v = calloc(1, sizeof *v);
    if (!v) return pep_err_set(err, PEP_ENOMEM, "verifier: out of memory");
    v->srv = s;
    if (pthread_mutex_init(&v->lock, NULL) != 0) {
        free(v);
        return pep_err_set(err, PEP_ENOMEM, "verifier: cannot create a mutex");
    }
    if (pthread_cond_init(&v->cond, NULL) != 0) {
        pthread_mutex_destroy(&v->lock);
        free(v);
        return pep_err_set(err, PEP_ENOMEM, "verifier: cannot create a condition variable");
    }
    /* The verifier takes no signals: they belong to the main thread (SIGTERM drain). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int trc = pthread_create(&v->thread, NULL, verifier_main, v);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (trc != 0) {
        pthread_cond_destroy(&v->cond);
        pthread_mutex_destroy(&v->lock);
        free(v);
        return pep_err_set(err, PEP_ENOMEM, "verifier: cannot start its thread: %s", strerror(trc));
    }
    pthread_setname_np(v->thread, "pep-verify");
    v->thread_started = true;
    *out = v;
    return 0;
}

int verifier_submit(struct verifier *v, struct verify_job *job) {
    if (!v) return PEP_ECLOSED;
    job->next = NULL;
    pthread_mutex_lock(&v->lock);
    if (v->cancelled) {
        pthread_mutex_unlock(&v->lock);
        return PEP_ECLOSED;
    }
    if (v->queue_tail)
        v->queue_tail->next = job;
    else
        v->queue_head = job;
    v->queue_tail = job;
    pthread_cond_broadcast(&v->cond);
    pthread_mutex_unlock(&v->lock);
    return 0;
}

void verifier_cancel_all(struct verifier *v) {
    if (!v) return;
    pthread_mutex_lock(&v->lock);
    v->cancelled = true;
    pthread_cond_broadcast(&v->cond);
    pthread_mutex_unlock(&v->lock);
}

void verifier_stop(struct verifier *v) {
    if (!v) return;
    verifier_cancel_all(v);
    if (v->thread_started) pthread_join(v->thread, NULL);
    pthread_cond_destroy(&v->cond);
    pthread_mutex_destroy(&v->lock);
    free(v);
}
