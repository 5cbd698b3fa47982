/*
 * dispatch.c — the forward stage: a request's chain, move by move (see dispatch.h).
 *
 * Invariants:
 *   - At most one thing is in flight for a request: an attempt (d->job in the forwarder)
 *     or a wait (d->timer armed).  Whatever ends it (the job's done, the timer's fire) runs
 *     on the forwarder thread and calls plan_next, which starts the next one or finishes.
 *   - Every ticket a breaker gave an attempt is recorded once: with the attempt's result,
 *     or as abandoned when pep stopped before it was known.
 *   - A buffered answer resumes the request once its outcome record is queued.  A streamed
 *     one resumes it as soon as its head is in (the answer starts), holds the request
 *     (request_hold) until the stream ends, and queues the outcome record then.
 */
#include "pep/dispatch.h"
#include "pep/breaker.h"
#include "pep/chain.h"
#include "pep/escalations.h"
#include "pep/govern.h"
#include "pep/idempotency.h"
#include "pep/indicators.h"
#include "pep/metrics.h"
#include "pep/record.h"
#include "pep/stream.h"
#include "pep/upstream.h"
#include "pep/util.h"
#include "pep/webhook.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* More history than any policy can plan (steps × max_attempts is bounded by the compiler
 * only loosely): past it the chain ends as exhausted. */
#define DISPATCH_MAX_HISTORY 128

/* What the outcome record says of one history entry beyond what the planner needs. */
struct attempt_note {
    const char *upstream; /* owned by the policy the request holds */
    char model[256];      /* the model sent ("" when none is known) */
    enum forward_error error;
    bool stream_aborted; /* failed after its first byte reached the agent */
};

struct dispatch {
    struct request *r;
    struct server *srv;
    const struct chain *chain; /* the route's chain, or `single` */
    struct chain single;
    struct chain_step single_step;
    bool named_chain; /* forward: {chain: X} (indicators, fallback metrics) */
    struct upstream_request up;
    struct forward_job job;
    char *body_owned; /* the body with its model rewritten, for the current attempt */
    char model_sent[256];
    struct breaker *breaker; /* the current attempt's, and its ticket */
    struct breaker_ticket ticket;
    bool ticket_open;
    struct forward_timer timer;
    uint32_t seed;
    bool escalated;
    char escalation_id[27];
    struct chain_attempt history[DISPATCH_MAX_HISTORY];
    struct attempt_note notes[DISPATCH_MAX_HISTORY];
    size_t n;
    struct chain_move end;            /* the terminal move */
    struct chain_breaker_view *views; /* one per step: the planner's view of the breakers */
    bool cancelled;                   /* pep is stopping: nothing more was tried */
    /* streaming */
    struct stream_pipe *pipe;
    bool streaming;
    int stream_status; /* the status of the head relayed */
    int64_t head_ms;   /* streaming: when the answer's head was ready (ms since receipt) */
};

static int64_t elapsed_ms(const struct dispatch *d) {
    return (pep_mono_us() - d->r->start_mono_us) / 1000;
}

void dispatch_free(struct dispatch *d) {
    if (!d) return;
    forward_job_clear(&d->job);
    free(d->body_owned);
    upstream_request_clear(&d->up);
    stream_pipe_free(d->pipe);
    free(d->views);
    free(d);
}

void dispatch_closed(struct request *r) {
    if (r->dispatch && r->dispatch->pipe) stream_pipe_reader_gone(r->dispatch->pipe);
}

int dispatch_prepare(struct request *r) {
    const struct route *route = r->match.route;
    struct dispatch *d = r->dispatch = calloc(1, sizeof *d);
    if (!d) return PEP_ENOMEM;
    d->r = r;
    d->srv = r->srv;
    if (route->chain) {
        d->chain = route->chain;
        d->named_chain = true;
    } else {
        chain_single(&d->single, &d->single_step, route->upstream, &route->retry);
        d->chain = &d->single;
    }
    if (pep_random_bytes(&d->seed, sizeof d->seed) != 0) d->seed = (uint32_t)r->start_mono_us;
    d->views = calloc(d->chain->steps_len ? d->chain->steps_len : 1, sizeof *d->views);
    if (!d->views) return PEP_ENOMEM;
    return upstream_capture(r, &d->up);
}

/* ---- the record and the answer ----------------------------------------------------------- */

static size_t attempts_made(const struct dispatch *d) {
    size_t n = 0;
    for (size_t i = 0; i < d->n; i++)
        n += d->history[i].outcome != CHAIN_OUTCOME_SKIPPED;
    return n;
}

/* The last entry that was an attempt (not a skip), or NULL. */
static const struct chain_attempt *last_attempt(const struct dispatch *d, size_t *index) {
    for (size_t i = d->n; i-- > 0;) {
        if (d->history[i].outcome != CHAIN_OUTCOME_SKIPPED) {
            if (index) *index = i;
            return &d->history[i];
        }
    }
    return NULL;
}

/* The last HTTP status an upstream answered, or 0. */
static int last_upstream_status(const struct dispatch *d) {
    for (size_t i = d->n; i-- > 0;)
        if (d->history[i].outcome == CHAIN_OUTCOME_STATUS) return d->history[i].status;
    return 0;
}

static const char *error_name(const struct attempt_note *note, const struct chain_attempt *a) {
    if (note->stream_aborted) return "stream_aborted";
    switch (a->outcome) {
    case CHAIN_OUTCOME_TIMEOUT:
        return "timeout";
    case CHAIN_OUTCOME_IDLE_TIMEOUT:
        return "idle_timeout";
    case CHAIN_OUTCOME_FAILED: /* cancelled at shutdown, or an answer too large */
        return note->error == FORWARD_CANCELLED ? "timeout" : "connect_error";
    default:
        return "connect_error";
    }
}

/* SPEC 8: every attempt and skip, in order. */
static json_t *attempts_json(const struct dispatch *d) {
    json_t *list = json_array();
    for (size_t i = 0; list && i < d->n; i++) {
        const struct chain_attempt *a = &d->history[i];
        const struct attempt_note *note = &d->notes[i];
        json_t *e = json_pack("{s:s}", "upstream", note->upstream);
        /* null rather than absent: every entry has the same members (SPEC 8). */
        json_object_set_new(
            e, "model", note->model[0] ? json_text(note->model, strlen(note->model)) : json_null());
        if (a->outcome == CHAIN_OUTCOME_SKIPPED) {
            json_object_set_new(e, "skipped", json_string("breaker_open"));
        } else {
            json_object_set_new(e, "ms", json_integer(a->end_ms - a->start_ms));
            if (a->outcome == CHAIN_OUTCOME_STATUS && !note->stream_aborted)
                json_object_set_new(e, "status", json_integer(a->status));
            else
                json_object_set_new(e, "error", json_string(error_name(note, a)));
        }
        json_array_append_new(list, e);
    }
    return list;
}

/* How the request ends, for the record and the answer: the code and the HTTP status the
 * agent receives. */
static const char *end_code(const struct dispatch *d, int *status) {
    if (d->cancelled) {
        *status = 503;
        return "upstream_unavailable";
    }
    switch (d->end.kind) {
    case CHAIN_PASS:
        *status = d->history[d->n - 1].status;
        if (d->notes[d->n - 1].stream_aborted) return "stream_aborted";
        return "ok";
    case CHAIN_AUTH_FAILED:
        *status = 502;
        return "upstream_auth_failed";
    case CHAIN_DEADLINE:
        *status = 504;
        return "deadline_exceeded";
    default:
        *status = 503;
        return "upstream_unavailable";
    }
}

/* The upstream named in the record and in Pep-Upstream: the serving one, else the last
 * one tried (skips included), else the chain's first. */
static const struct attempt_note *reported_note(const struct dispatch *d) {
    size_t i;
    if (last_attempt(d, &i)) return &d->notes[i];
    return d->n ? &d->notes[d->n - 1] : NULL;
}

static void free_idem_write(void *w) {
    idem_write_free(w);
}

/* The outcome record's apply: the relayed answer stored for its Idempotency-Key.  A row that
 * cannot be stored must not take the outcome record with it (an apply that fails fails its
 * item): the answer is then only not replayed. */
static int store_idem_result(sqlite3 *db, void *write) {
    int rc = idem_apply_store(db, write);
    if (rc != 0)
        fprintf(stderr,
                "pep: idempotency: a result could not be stored (%s); it will not be "
                "replayed\n",
                pep_strerror(rc));
    return 0;
}

/* Audits the outcome (forwarder thread, or the writer's when nothing was sent). */
static void submit_outcome(struct dispatch *d) {
    struct request *r = d->r;
    int status;
    const char *code = end_code(d, &status);
    const struct attempt_note *note = reported_note(d);
    bool relayed = strcmp(code, "ok") == 0 && !d->streaming;
    /* An idempotent request's relayed answer is stored with its outcome (SPEC 4.5). */
    struct idem_write *result = govern_result(r, &d->job, note ? note->upstream : NULL,
                                              d->model_sent, (int)attempts_made(d), relayed);
    json_t *rec = server_record("outcome", r->id);
    if (!rec) {
        idem_write_free(result);
        return;
    }
    json_object_set_new(rec, "attempts", attempts_json(d));
    json_object_set_new(rec, "code", json_string(code));
    json_object_set_new(rec, "status", json_integer(status));
    if (note) json_object_set_new(rec, "upstream", json_string(note->upstream));
    if (note && note->model[0])
        json_object_set_new(rec, "model", json_text(note->model, strlen(note->model)));
    json_object_set_new(rec, "action", json_string(r->match.route->action->name));
    if (d->named_chain) json_object_set_new(rec, "chain", json_string(d->chain->name));
    if (r->agent) json_object_set_new(rec, "agent", json_string(r->agent->id));
    if (r->decision.tenant)
        json_object_set_new(rec, "tenant",
                            json_exact_text(r->decision.tenant, r->decision.tenant_len));
    int upstream_status = last_upstream_status(d);
    if (strcmp(code, "ok") != 0 && strcmp(code, "stream_aborted") != 0 && upstream_status)
        json_object_set_new(rec, "upstream_status", json_integer(upstream_status));
    if (d->end.kind == CHAIN_PASS && !d->cancelled)
        json_object_set_new(rec, "fallback_step",
                            d->end.step == CHAIN_STEP_OVERFLOW ? json_string("context_overflow")
                                                               : json_integer(d->end.step));
    if (d->escalation_id[0])
        json_object_set_new(rec, "escalation_id", json_string(d->escalation_id));
    json_object_set_new(rec, "latency_us", json_integer(pep_mono_us() - r->start_mono_us));
    if (audit_submit_owned(r->srv->audit, rec, result ? store_idem_result : NULL, result,
                           result ? free_idem_write : NULL) != 0)
        fprintf(stderr, "pep: audit: outcome record of %s could not be queued\n", r->id);
}

/* The chain's reliability indicators (SPEC 8): one sample per request through a chain. */
static void record_indicators(struct dispatch *d) {
    if (!d->named_chain) return;
    int status;
    const char *code = end_code(d, &status);
    struct indicator_sample s = {
        .served = strcmp(code, "ok") == 0 || strcmp(code, "stream_aborted") == 0,
        .escalated = d->escalated,
        /* SPEC 2: receipt to the answer's head — for a stream, not to its end. */
        .latency_ms = d->streaming ? d->head_ms : elapsed_ms(d),
    };
    s.fallback = s.served && d->end.step != 0;
    if (d->n > 0) {
        const struct chain_attempt *first = &d->history[0];
        s.first_attempt_failed = first->step != 0 || first->outcome == CHAIN_OUTCOME_SKIPPED ||
                                 first->context_overflow ||
                                 chain_is_retryable(&d->chain->retry, first);
    }
    indicators_record(d->srv->indicators, d->chain->name, &s, pep_now_us() / 1000);
}

/* ---- escalation (SPEC 4.4) --------------------------------------------------------------------
 */

static void escalate(struct dispatch *d) {
    struct request *r = d->r;
    d->escalated = true;
    char tenant[256];
    snprintf(tenant, sizeof tenant, "%.*s", (int)r->decision.tenant_len,
             r->decision.tenant ? r->decision.tenant : "");
    json_t *attempts = attempts_json(d);
    struct escalation_request in = {.chain = d->chain->name,
                                    .request_id = r->id,
                                    .agent = r->agent ? r->agent->id : "",
                                    .action = r->match.route->action->name,
                                    .tenant = tenant,
                                    .attempts = attempts,
                                    .last_status = last_upstream_status(d)};
    struct escalation e = {0};
    int rc = escalation_create(d->srv->escalations, &in, pep_now_us(), &e);
    json_decref(attempts);
    if (rc != 0) {
        fprintf(stderr, "pep: escalation of %s on chain %s not opened: %s\n", r->id, d->chain->name,
                rc == PEP_EUNAVAILABLE ? "the queue is full" : pep_strerror(rc));
        return;
    }
    json_t *rec = server_record("system", r->id);
    json_object_set_new(rec, "action", json_string("escalation.open"));
    json_object_set_new(rec, "escalation_id", json_string(e.id));
    json_object_set_new(rec, "chain", json_string(d->chain->name));
    if (r->agent) json_object_set_new(rec, "agent", json_string(r->agent->id));
    json_object_set_new(rec, "attempts", attempts_json(d));
    json_t *hook = d->chain->escalate_webhook ? escalation_webhook_json(&e) : NULL;
    struct escalation *arg = escalation_dup(&e);
    if (!arg || audit_submit_owned(d->srv->audit, rec, escalation_apply_insert, arg,
                                   escalation_free) != 0) {
        if (!arg) json_decref(rec);
        escalation_forget(d->srv->escalations, e.id); /* never recorded: never was */
        fprintf(stderr, "pep: escalation of %s could not be recorded\n", r->id);
        json_decref(hook);
    } else {
        memcpy(d->escalation_id, e.id, sizeof d->escalation_id);
        metrics_escalation(d->srv->metrics, d->chain->name);
        if (hook && webhook_post(d->srv->webhooks, d->chain->escalate_webhook, "escalation.open",
                                 hook) != 0)
            fprintf(stderr, "pep: escalation %s could not be queued for its webhook\n", e.id);
    }
    escalation_clear(&e);
}

/* ---- the chain ------------------------------------------------------------------------------- */

static void plan_next(struct dispatch *d);

/* The request's answer is ready: audit the outcome and resume it. */
static void finish(struct dispatch *d) {
    submit_outcome(d);
    record_indicators(d);
    request_resume(d->r);
}

static struct breaker *breaker_of(struct dispatch *d, const struct upstream *u) {
    return u ? breakers_get(d->srv->breakers, u->name) : NULL;
}

/* What each step's breaker would say now, without taking a probe slot (planner input). */
static void breaker_view(struct dispatch *d, const struct chain_step *step,
                         struct chain_breaker_view *v) {
    *v = (struct chain_breaker_view){.admits = true};
    struct breaker *b = step ? breaker_of(d, step->upstream) : NULL;
    if (!b) return;
    struct breaker_state st;
    bool configured;
    breaker_peek(b, &st, &configured);
    if (!configured) return;
    struct breaker_ticket t;
    breaker_core_admit(&st, &step->upstream->breaker, pep_mono_us() / 1000, &t);
    v->admits = t.admission != BREAKER_DENY;
    v->half_open_in_ms = t.half_open_in_ms;
}

static void append(struct dispatch *d, int step, const struct upstream *u, const char *model,
                   const struct chain_attempt *a) {
    d->history[d->n] = *a;
    d->history[d->n].step = step;
    struct attempt_note *note = &d->notes[d->n];
    *note = (struct attempt_note){.upstream = u ? u->name : "", .error = FORWARD_OK};
    snprintf(note->model, sizeof note->model, "%s", model ? model : "");
    d->n++;
}

static void on_attempt_done(struct forward_job *job, void *arg);
static bool on_answer_head(struct forward_job *job, void *arg);
static size_t on_stream_bytes(void *arg, const char *data, size_t n);

static void on_timer(struct forward_timer *t, bool cancelled) {
    struct dispatch *d = t->arg;
    if (cancelled) {
        d->cancelled = true;
        finish(d);
        return;
    }
    plan_next(d);
}

/* Sends the attempt the planner asked for; false when it could not be sent (then the
 * caller goes on planning: the entry is in the history). */
static bool attempt(struct dispatch *d, const struct chain_move *m) {
    struct breaker *b = breaker_of(d, m->upstream);
    int64_t now = pep_mono_us() / 1000;
    if (breaker_admit(b, now, &d->ticket) == BREAKER_DENY) {
        /* It opened since the planner looked: a skip after all. */
        struct chain_attempt skip = {.outcome = CHAIN_OUTCOME_SKIPPED,
                                     .retry_after_ms = -1,
                                     .start_ms = elapsed_ms(d),
                                     .end_ms = elapsed_ms(d)};
        append(d, m->step, m->upstream, m->model ? m->model : d->up.model, &skip);
        return false;
    }
    d->breaker = b;
    d->ticket_open = true;
    forward_job_reset_result(&d->job);
    int rc =
        upstream_attempt(&d->up, m->upstream, m->model, &d->job, &d->body_owned, d->model_sent);
    struct forward_job *job = &d->job;
    if (m->remaining_ms >= 0 && m->remaining_ms < job->timeout_ms)
        job->timeout_ms = m->remaining_ms;
    job->done = on_attempt_done;
    job->done_arg = d;
    job->on_head = on_answer_head;
    job->sink = on_stream_bytes;
    if (m->step != 0 && d->n > 0 && d->history[d->n - 1].step != m->step && d->named_chain)
        metrics_fallback(d->srv->metrics, d->chain->name,
                         m->step == CHAIN_STEP_OVERFLOW ? METRICS_STEP_CONTEXT_OVERFLOW : m->step);
    if (d->n > 0 && d->history[d->n - 1].step == m->step &&
        d->history[d->n - 1].outcome != CHAIN_OUTCOME_SKIPPED)
        metrics_retry(d->srv->metrics, m->upstream->name);
    d->history[d->n] = (struct chain_attempt){.step = m->step, .retry_after_ms = -1};
    d->history[d->n].start_ms = elapsed_ms(d);
    if (rc == 0 && forwarder_submit(d->srv->forwarder, job) == 0) return true;
    /* Not sent: pep is stopping (or memory ran out building it). */
    breaker_record(b, &d->ticket, BREAKER_ABANDONED, now);
    d->ticket_open = false;
    d->cancelled = true;
    return false;
}

static void plan_next(struct dispatch *d) {
    for (;;) {
        if (d->cancelled) {
            finish(d);
            return;
        }
        struct chain_breaker_view overflow;
        for (size_t i = 0; i < d->chain->steps_len; i++)
            breaker_view(d, &d->chain->steps[i], &d->views[i]);
        breaker_view(d, d->chain->has_context_overflow ? &d->chain->context_overflow_step : NULL,
                     &overflow);
        struct chain_input in = {.chain = d->chain,
                                 .repeatable = d->up.repeatable,
                                 .escalated = d->escalated,
                                 .history = d->history,
                                 .history_len = d->n,
                                 .breakers = d->views,
                                 .overflow_breaker = &overflow,
                                 .now_ms = elapsed_ms(d),
                                 .seed = d->seed};
        struct chain_move m;
        chain_plan(&in, &m);
        if (d->n + 1 >= DISPATCH_MAX_HISTORY && (m.kind == CHAIN_ATTEMPT || m.kind == CHAIN_SKIP))
            m.kind = CHAIN_EXHAUSTED; /* cannot happen with a sane policy: fail closed */
        if (m.escalate_now && d->named_chain) escalate(d);
        switch (m.kind) {
        case CHAIN_ATTEMPT:
            if (attempt(d, &m)) return;
            continue;
        case CHAIN_WAIT:
            d->timer = (struct forward_timer){
                .at_mono_us = pep_mono_us() + m.wait_ms * 1000, .fire = on_timer, .arg = d};
            if (forwarder_schedule(d->srv->forwarder, &d->timer) == 0) return;
            d->cancelled = true;
            continue;
        case CHAIN_SKIP: {
            struct chain_attempt skip = {.outcome = CHAIN_OUTCOME_SKIPPED,
                                         .retry_after_ms = -1,
                                         .start_ms = elapsed_ms(d),
                                         .end_ms = elapsed_ms(d)};
            append(d, m.step, m.upstream, m.model ? m.model : d->up.model, &skip);
            continue;
        }
        default:
            d->end = m;
            finish(d);
            return;
        }
    }
}

/* The answer's head fits the agent's connection beside its request head (CONNECTION_
 * MEMORY): libmicrohttpd would otherwise close the connection without an answer, while the
 * outcome said the call was served. */
static bool relay_fits(const struct request *r, const struct forward_job *job) {
    size_t head = 0;
    for (size_t i = 0; i < job->resp_headers_len; i++)
        head += strlen(job->resp_headers[i].name) + strlen(job->resp_headers[i].value) + 4;
    return head + r->head_bytes + CONNECTION_MEMORY_RESERVE <= CONNECTION_MEMORY;
}

static const char *response_header(const struct forward_job *job, const char *name) {
    for (size_t i = 0; i < job->resp_headers_len; i++)
        if (strcasecmp(job->resp_headers[i].name, name) == 0) return job->resp_headers[i].value;
    return NULL;
}

static enum metrics_outcome metrics_outcome_of(const struct chain_attempt *a,
                                               const struct attempt_note *note) {
    if (note->stream_aborted) return METRICS_OUTCOME_STREAM_ABORTED;
    switch (a->outcome) {
    case CHAIN_OUTCOME_STATUS:
        return metrics_outcome_of_status(a->status);
    case CHAIN_OUTCOME_TIMEOUT:
        return METRICS_OUTCOME_TIMEOUT;
    case CHAIN_OUTCOME_IDLE_TIMEOUT:
        return METRICS_OUTCOME_IDLE_TIMEOUT;
    default:
        return METRICS_OUTCOME_CONNECT_ERROR;
    }
}

/* Forwarder thread: an attempt ended (for a stream: the stream ended). */
static void on_attempt_done(struct forward_job *job, void *arg) {
    struct dispatch *d = arg;
    const struct chain_step *step = chain_step_at(d->chain, d->history[d->n].step);
    const struct upstream *u = step->upstream;
    if (job->error == FORWARD_OK && !job->streaming && !relay_fits(d->r, job)) {
        job->error = FORWARD_CONNECT_ERROR; /* SPEC 8: an answer pep cannot relay faithfully */
        job->status = 0;
    }
    /* Sends before the last one were cut by the upstream closing a reused connection
     * before answering, and libcurl sent the request again (SPEC 4.2: each is an
     * attempt; forward.c refuses that for a request not safe to repeat). */
    int64_t t0 = d->r->start_mono_us;
    for (int k = 0;
         k + 1 < job->sends && k + 1 < FORWARD_MAX_SENDS && d->n + 2 < DISPATCH_MAX_HISTORY; k++) {
        struct chain_attempt cut = {.step = d->history[d->n].step,
                                    .outcome = CHAIN_OUTCOME_CONNECT_ERROR,
                                    .retry_after_ms = -1,
                                    .start_ms = (job->send_at_us[k] - t0) / 1000,
                                    .end_ms = (job->send_at_us[k + 1] - t0) / 1000};
        d->history[d->n + 1] = d->history[d->n]; /* the entry being filled moves up */
        append(d, cut.step, u, d->model_sent, &cut);
        metrics_upstream_attempt(d->srv->metrics, u->name, METRICS_OUTCOME_CONNECT_ERROR);
        d->history[d->n].start_ms = (job->send_at_us[k + 1] - t0) / 1000;
    }
    struct chain_attempt *a = &d->history[d->n];
    a->end_ms = elapsed_ms(d);
    switch (job->error) {
    case FORWARD_OK:
        a->outcome = CHAIN_OUTCOME_STATUS;
        a->status = (int)job->status;
        a->retry_after_ms =
            chain_parse_retry_after(response_header(job, "Retry-After"), pep_now_us() / 1000);
        a->context_overflow =
            !job->streaming &&
            chain_is_context_overflow(d->chain, a->status, job->body_out, job->body_out_len);
        break;
    case FORWARD_TIMEOUT:
        a->outcome = CHAIN_OUTCOME_TIMEOUT;
        break;
    case FORWARD_IDLE_TIMEOUT:
        a->outcome = CHAIN_OUTCOME_IDLE_TIMEOUT;
        break;
    case FORWARD_CONNECT_ERROR:
        a->outcome = CHAIN_OUTCOME_CONNECT_ERROR;
        break;
    default: /* too large, cancelled */
        a->outcome = CHAIN_OUTCOME_FAILED;
        break;
    }
    struct attempt_note *note = &d->notes[d->n];
    *note = (struct attempt_note){.upstream = u->name, .error = job->error};
    memcpy(note->model, d->model_sent, sizeof note->model);
    bool aborted_stream = d->streaming && job->error != FORWARD_OK;
    if (aborted_stream) { /* the agent has the head: the answer stays what it was */
        note->stream_aborted = true;
        a->outcome = CHAIN_OUTCOME_STATUS;
        a->status = d->stream_status; /* the job's was cleared with its failure */
    }
    d->n++;
    bool transport = job->error != FORWARD_OK && job->error != FORWARD_CANCELLED &&
                     job->error != FORWARD_TOO_LARGE;
    enum breaker_result result = job->error == FORWARD_CANCELLED ? BREAKER_ABANDONED
                                 : job->error == FORWARD_TOO_LARGE
                                     ? BREAKER_NEUTRAL
                                     : breaker_classify(&u->breaker, transport, a->status);
    int64_t now = pep_mono_us() / 1000;
    if (d->ticket_open) breaker_record(d->breaker, &d->ticket, result, now);
    d->ticket_open = false;
    metrics_upstream_attempt(d->srv->metrics, u->name, metrics_outcome_of(a, note));
    if (job->error == FORWARD_CANCELLED) d->cancelled = true;
    if (!d->streaming) {
        plan_next(d);
        return;
    }
    /* The stream is over: its end is the pipe's, its outcome is recorded now, and the
     * forwarder lets go of the request. */
    stream_pipe_close(d->pipe, job->error == FORWARD_OK);
    submit_outcome(d);
    record_indicators(d);
    request_release(d->r);
}

static void relay_head(struct dispatch *d) {
    struct request *r = d->r;
    struct forward_job *job = &d->job;
    reply_clear(&r->reply);
    r->reply.status = (int)job->status;
    for (size_t i = 0; i < job->resp_headers_len; i++)
        reply_set_header(&r->reply, job->resp_headers[i].name, job->resp_headers[i].value);
}

/* ---- streaming (SPEC 4.6) ---------------------------------------------------------------------
 */

static void pipe_park(void *arg) {
    request_park(arg);
}
static void pipe_unpark(void *arg) {
    request_unpark(arg);
}
static void pipe_want_more(void *arg) {
    struct request *r = arg;
    forwarder_continue(r->srv->forwarder, &r->dispatch->job);
}

/* Forwarder thread: the head of a final 2xx answer is in.  An answer the agent asked to
 * stream ("stream": true) or that is an event stream goes out as it comes: the request
 * resumes now, its answer a stream fed from here. */
static bool on_answer_head(struct forward_job *job, void *arg) {
    struct dispatch *d = arg;
    const char *ct = response_header(job, "Content-Type");
    bool event_stream = ct && strncasecmp(ct, "text/event-stream", 17) == 0;
    if (!d->up.stream && !event_stream) return false;
    /* The planner relays every 2xx: ask it, as for any answer, with this one in. */
    struct chain_attempt *a = &d->history[d->n];
    a->outcome = CHAIN_OUTCOME_STATUS;
    a->status = (int)job->status;
    a->end_ms = elapsed_ms(d);
    struct chain_input in = {.chain = d->chain,
                             .repeatable = d->up.repeatable,
                             .escalated = true, /* a look, not a move: no escalation */
                             .history = d->history,
                             .history_len = d->n + 1,
                             .now_ms = a->end_ms,
                             .seed = d->seed};
    struct chain_move m;
    chain_plan(&in, &m);
    if (m.kind != CHAIN_PASS || !relay_fits(d->r, job)) return false;
    struct stream_pipe_hooks hooks = {pipe_park, pipe_unpark, pipe_want_more, d->r};
    d->pipe = stream_pipe_new(&hooks);
    if (!d->pipe) return false;
    d->streaming = true;
    d->stream_status = a->status;
    d->head_ms = a->end_ms;
    d->end = m;
    /* The answer's head is built here, before the request resumes: from then on this
     * thread and the listener's share only the pipe. */
    struct request *r = d->r;
    const struct chain_step *step = chain_step_at(d->chain, a->step);
    relay_head(d);
    reply_set_header(&r->reply, "Pep-Upstream", step->upstream->name);
    if (d->model_sent[0]) reply_set_header(&r->reply, "Pep-Model", d->model_sent);
    char attempts[16];
    snprintf(attempts, sizeof attempts, "%zu", attempts_made(d) + 1);
    reply_set_header(&r->reply, "Pep-Attempts", attempts);
    govern_reply(r);
    request_hold(r); /* the forwarder's, until the stream ends (on_attempt_done) */
    request_resume(r);
    return true;
}

static size_t on_stream_bytes(void *arg, const char *data, size_t n) {
    struct dispatch *d = arg;
    size_t rc = stream_pipe_write(d->pipe, data, n);
    return rc == STREAM_PIPE_FULL ? FORWARD_SINK_FULL : rc;
}

/* libmicrohttpd's content reader (listener thread). */
static ssize_t read_stream(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    struct request *r = cls;
    if (__atomic_load_n(&r->srv->stopping, __ATOMIC_SEQ_CST))
        return MHD_CONTENT_READER_END_WITH_ERROR; /* listeners stop: no parking now */
    ssize_t n = stream_pipe_read(r->dispatch->pipe, buf, max);
    if (n == STREAM_PIPE_END) return MHD_CONTENT_READER_END_OF_STREAM;
    if (n == STREAM_PIPE_ABORTED) return MHD_CONTENT_READER_END_WITH_ERROR;
    return n;
}

static void stream_reader_done(void *cls) {
    struct request *r = cls;
    stream_pipe_reader_gone(r->dispatch->pipe);
    request_release(r); /* the reader's */
}

/* ---- the answer --------------------------------------------------------------------------------
 */

static void set_pep_headers(struct dispatch *d) {
    struct request *r = d->r;
    const struct attempt_note *note = reported_note(d);
    if (note && note->upstream[0]) reply_set_header(&r->reply, "Pep-Upstream", note->upstream);
    if (note && note->model[0]) reply_set_header(&r->reply, "Pep-Model", note->model);
    char attempts[16];
    snprintf(attempts, sizeof attempts, "%zu", attempts_made(d));
    reply_set_header(&r->reply, "Pep-Attempts", attempts);
}

enum MHD_Result dispatch_respond(struct request *r) {
    struct dispatch *d = r->dispatch;
    if (d->streaming) {  /* its head was built when it came (on_answer_head) */
        request_hold(r); /* the reader's, released by stream_reader_done */
        return reply_send_stream(r, read_stream, stream_reader_done, r);
    }
    int status;
    const char *code = end_code(d, &status);
    const struct attempt_note *note = reported_note(d);
    char msg[200];
    if (strcmp(code, "ok") == 0) {
        relay_head(d);
        r->reply.body = d->job.body_out;
        r->reply.body_len = d->job.body_out_len;
        d->job.body_out = NULL;
    } else if (strcmp(code, "upstream_auth_failed") == 0) {
        snprintf(msg, sizeof msg, "upstream %s refused pep's credentials (%d)",
                 note ? note->upstream : "-", last_upstream_status(d));
        reply_error(r, status, code, msg, NULL);
    } else if (strcmp(code, "deadline_exceeded") == 0) {
        snprintf(msg, sizeof msg, "the chain's deadline of %lld ms passed",
                 (long long)d->chain->deadline_ms);
        reply_error(r, status, code, msg, NULL);
    } else {
        json_t *extra = json_object();
        int upstream_status = last_upstream_status(d);
        if (upstream_status)
            json_object_set_new(extra, "upstream_status", json_integer(upstream_status));
        if (d->escalation_id[0])
            json_object_set_new(extra, "escalation_id", json_string(d->escalation_id));
        size_t li;
        const struct chain_attempt *last = last_attempt(d, &li);
        char what[64] = "no attempt";
        if (last && last->outcome == CHAIN_OUTCOME_STATUS)
            snprintf(what, sizeof what, "last: %s answered %d", d->notes[li].upstream,
                     last->status);
        else if (last)
            snprintf(what, sizeof what, "last: %s %s", d->notes[li].upstream,
                     error_name(&d->notes[li], last));
        snprintf(msg, sizeof msg, "%s (%s)",
                 d->cancelled         ? "pep is shutting down: the call was not completed"
                 : d->end.all_skipped ? "every upstream of the chain is unavailable (breaker open)"
                 : d->named_chain     ? "every step of the chain failed"
                                      : "the upstream is unavailable",
                 what);
        reply_error(r, status, code, msg, extra);
        /* SPEC 3.5, 8: Retry-After on 503 when known — when a breaker may half-open, or
         * what the upstream said. */
        if (!d->cancelled && d->end.retry_after_ms >= 0) {
            char wait[24];
            int64_t s = (d->end.retry_after_ms + 999) / 1000;
            snprintf(wait, sizeof wait, "%lld", (long long)(s < 1 ? 1 : s));
            reply_set_header(&r->reply, "Retry-After", wait);
        }
    }
    set_pep_headers(d);
    govern_reply(r);
    return reply_send(r);
}

/* ---- start -------------------------------------------------------------------------------------
 */

void dispatch_start(struct request *r) {
    plan_next(r->dispatch);
}

/* ---- breaker transitions ----------------------------------------------------------------------
 */

void dispatch_breaker_transition(void *arg, const char *upstream, enum breaker_state_kind from,
                                 enum breaker_state_kind to, int64_t now_ms) {
    (void)now_ms;
    struct server *s = arg;
    const char *from_name = breaker_state_name(from);
    const char *to_name = breaker_state_name(to);
    fprintf(stderr, "pep: breaker of upstream %s: %s -> %s\n", upstream, from_name, to_name);
    metrics_breaker_transition(s->metrics, upstream, (enum metrics_breaker)to);
    json_t *rec = server_record("system", NULL);
    json_object_set_new(rec, "action", json_string("breaker.transition"));
    json_object_set_new(rec, "upstream", json_string(upstream));
    char reason[64];
    snprintf(reason, sizeof reason, "%s -> %s", from_name, to_name);
    json_object_set_new(rec, "reason", json_string(reason));
    if (audit_submit(s->audit, rec, NULL, NULL, NULL, NULL) != 0)
        fprintf(stderr, "pep: audit: breaker transition of %s could not be queued\n", upstream);
}
