/*
 * forward.c — the forwarder thread (see forward.h).
 *
 * Invariant: a job is in exactly one place — the submit queue (guarded by queue_lock),
 * or the multi handle (touched only by the forwarder thread) — until its done callback
 * runs, after which the forwarder never touches it again.
 */
#include "pep/forward.h"
#include "pep/util.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* The thread drives libcurl with curl_multi_socket_action over its own epoll set, so each
 * wake-up costs work proportional to the sockets that are ready, not to every transfer in
 * flight (curl_multi_poll would poll() them all on every turn). */
struct forwarder {
    pthread_t thread;
    CURLM *multi;               /* forwarder thread only */
    int epoll_fd;               /* the sockets libcurl asked to watch, and wake_fd */
    int wake_fd;                /* eventfd: written by forwarder_submit / stop / cancel */
    int64_t deadline_us;        /* libcurl's timer as a monotonic deadline; -1 = none */
    int64_t next_idle_check_us; /* when running jobs are next checked for idle_timeout */
    pthread_mutex_t queue_lock; /* guards queue_head/tail, stopping, cancel_requested */
    struct forward_job *queue_head, *queue_tail;
    bool stopping;
    bool cancel_requested;
    bool refusing;               /* after forwarder_cancel_all: new jobs are refused (sticky) */
    struct forward_job *running; /* jobs added to multi (forwarder thread only) */
    CURL *idle_easy[64];         /* reusable easy handles (forwarder thread only) */
    size_t idle_easy_len;
    size_t buffered;              /* answer bytes held by running jobs (forwarder thread only) */
    struct forward_timer *armed;  /* submitted timers, not yet merged (queue_lock) */
    struct forward_timer *timers; /* by at_mono_us (forwarder thread only) */
    int continue_wanted;          /* atomic: some job's forwarder_continue is pending */
};

static const char *const hop_by_hop[] = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
};

static bool in_list(const char *name, const char *const *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(name, list[i]) == 0) return true;
    return false;
}

/* True when the comma-separated Connection header value names `name`. */
static bool connection_names(const char *tokens, const char *name) {
    size_t n = strlen(name);
    for (const char *p = tokens; p && *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        const char *end = p;
        while (*end && *end != ',' && *end != ' ' && *end != '\t')
            end++;
        if ((size_t)(end - p) == n && strncasecmp(p, name, n) == 0) return true;
        p = end;
    }
    return false;
}

bool forward_header_allowed(const char *name, const char *connection_tokens) {
    /* SECURITY: the agent's credentials (Authorization, Cookie) and pep's own control
     * headers stop here; framing headers are curl's to set (no smuggling through us).
     * Headers that make a server or framework act on another method, URL or client than
     * the one pep decided on stop here too (SPEC 4.7): an agent allowed GET /x must not
     * have the upstream run DELETE /admin through X-HTTP-Method-Override or
     * X-Original-URL, nor speak for another client through Forwarded/X-Forwarded-*. */
    static const char *const never[] = {"authorization",
                                        "cookie",
                                        "content-length",
                                        "host",
                                        "expect",
                                        "x-request-id",
                                        "x-http-method-override",
                                        "x-http-method",
                                        "x-method-override",
                                        "x-original-url",
                                        "x-rewrite-url",
                                        "forwarded"};
    if (strncasecmp(name, "pep-", 4) == 0 || strncasecmp(name, "x-forwarded-", 12) == 0)
        return false;
    if (in_list(name, never, PEP_ARRAY_LEN(never)) ||
        in_list(name, hop_by_hop, PEP_ARRAY_LEN(hop_by_hop)))
        return false;
    return !connection_names(connection_tokens, name);
}

bool forward_response_header_relayable(const char *name) {
    static const char *const never[] = {"content-length", "date", "server"};
    if (strncasecmp(name, "pep-", 4) == 0) return false;
    return !in_list(name, never, PEP_ARRAY_LEN(never)) &&
           !in_list(name, hop_by_hop, PEP_ARRAY_LEN(hop_by_hop));
}

const char *forward_error_name(enum forward_error e) {
    switch (e) {
    case FORWARD_OK:
        return "ok";
    case FORWARD_TIMEOUT:
        return "timeout";
    case FORWARD_IDLE_TIMEOUT:
        return "idle_timeout";
    case FORWARD_CONNECT_ERROR:
        return "connect_error";
    case FORWARD_TOO_LARGE:
        return "response_too_large";
    case FORWARD_CANCELLED:
        return "cancelled";
    }
    return "error";
}

void forward_job_reset_result(struct forward_job *job) {
    free(job->body_out);
    job->body_out = NULL;
    job->body_out_len = job->body_out_cap = 0;
    for (size_t i = 0; i < job->resp_headers_len; i++) {
        free(job->resp_headers[i].name);
        free(job->resp_headers[i].value);
    }
    job->resp_headers_len = 0;
    job->error = FORWARD_OK;
    job->status = 0;
    job->elapsed_us = 0;
    job->sends = 0;
    job->streaming = job->streamed_bytes = false;
    job->continue_wanted = 0;
}

void forward_job_clear(struct forward_job *job) {
    free(job->url);
    curl_slist_free_all(job->headers);
    free(job->body_out);
    for (size_t i = 0; i < job->resp_headers_len; i++) {
        free(job->resp_headers[i].name);
        free(job->resp_headers[i].value);
    }
    free(job->resp_headers);
    memset(job, 0, sizeof *job);
}

/* ---- curl callbacks (forwarder thread) ---------------------------------------------- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
    struct forward_job *job = arg;
    size_t n = size * nmemb;
    job->last_byte_mono_us = pep_mono_us();
    if (job->streaming) {
        size_t took = job->sink(job->done_arg, data, n);
        if (took == FORWARD_SINK_FULL) {
            job->paused = true; /* libcurl keeps the bytes and offers them again */
            return CURL_WRITEFUNC_PAUSE;
        }
        if (took == n && n > 0) job->streamed_bytes = true;
        return took; /* 0: the reader is gone; libcurl aborts the transfer */
    }
    if (job->body_out_len + n > FORWARD_MAX_RESPONSE ||
        job->owner->buffered + n > FORWARD_MAX_BUFFERED) {
        job->error = FORWARD_TOO_LARGE;
        return 0; /* makes curl fail the transfer with CURLE_WRITE_ERROR */
    }
    if (job->body_out_len + n + 1 > job->body_out_cap) {
        /* Doubling keeps a large answer's copying linear in its size. */
        size_t cap = job->body_out_cap ? job->body_out_cap : 4096;
        while (cap < job->body_out_len + n + 1)
            cap *= 2;
        char *grown = realloc(job->body_out, cap);
        if (!grown) return 0;
        job->body_out = grown;
        job->body_out_cap = cap;
    }
    memcpy(job->body_out + job->body_out_len, data, n);
    job->body_out_len += n;
    job->owner->buffered += n;
    job->body_out[job->body_out_len] = '\0';
    return n;
}

static void drop_response_headers(struct forward_job *job) {
    for (size_t i = 0; i < job->resp_headers_len; i++) {
        free(job->resp_headers[i].name);
        free(job->resp_headers[i].value);
    }
    job->resp_headers_len = 0;
}

static size_t on_header(char *line, size_t size, size_t nmemb, void *arg) {
    struct forward_job *job = arg;
    size_t n = size * nmemb;
    job->last_byte_mono_us = pep_mono_us();
    if (n >= 5 && strncmp(line, "HTTP/", 5) == 0) {
        drop_response_headers(job); /* a new (e.g. after 100 Continue) response head */
        job->head_bytes = n;
        job->head_complete = false;
        return n;
    }
    /* SECURITY: a head the agent's connection could not carry whole (libmicrohttpd's
     * per-connection pool) would reach it as an empty reply; refuse it as an attempt. */
    job->head_bytes += n;
    if (job->head_bytes > FORWARD_MAX_HEAD) {
        job->head_too_large = true;
        return 0;
    }
    if ((n == 2 && line[0] == '\r' && line[1] == '\n') || (n == 1 && line[0] == '\n')) {
        job->head_complete = true;
        long status = 0;
        curl_easy_getinfo(job->easy, CURLINFO_RESPONSE_CODE, &status);
        /* A final 2xx answer may be streamed (SPEC 4.6): the caller decides, once. */
        if (job->on_head && status >= 200 && status <= 299) {
            job->status = status;
            job->streaming = job->on_head(job, job->done_arg);
        }
        return n;
    }
    const char *colon = memchr(line, ':', n);
    if (!colon) return n;
    size_t name_len = (size_t)(colon - line);
    const char *v = colon + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    char *name = strndup(line, name_len);
    if (!name) return 0;
    if (!forward_response_header_relayable(name)) {
        free(name);
        return n;
    }
    if (job->resp_headers_len == job->resp_headers_cap) {
        size_t cap = job->resp_headers_cap ? job->resp_headers_cap * 2 : 16;
        struct forward_header *g = realloc(job->resp_headers, cap * sizeof *g);
        if (!g) {
            free(name);
            return 0;
        }
        job->resp_headers = g;
        job->resp_headers_cap = cap;
    }
    char *value = strndup(v, (size_t)(end - v));
    if (!value) {
        free(name);
        return 0;
    }
    job->resp_headers[job->resp_headers_len++] = (struct forward_header){name, value};
    return n;
}

/* ---- the thread ------------------------------------------------------------------------ */

static CURL *take_easy(struct forwarder *f) {
    if (f->idle_easy_len > 0) {
        CURL *e = f->idle_easy[--f->idle_easy_len];
        curl_easy_reset(e);
        return e;
    }
    return curl_easy_init();
}

static void put_easy(struct forwarder *f, CURL *e) {
    if (f->idle_easy_len < PEP_ARRAY_LEN(f->idle_easy))
        f->idle_easy[f->idle_easy_len++] = e;
    else
        curl_easy_cleanup(e);
}

static void finish(struct forwarder *f, struct forward_job *job, enum forward_error error) {
    /* unlink from running */
    for (struct forward_job **pp = &f->running; *pp; pp = &(*pp)->next) {
        if (*pp == job) {
            *pp = job->next;
            break;
        }
    }
    if (job->easy) {
        curl_multi_remove_handle(f->multi, job->easy);
        put_easy(f, job->easy);
        job->easy = NULL;
    }
    job->next = NULL;
    f->buffered -= job->body_out_len; /* the answer is the job's now, not in flight */
    job->error = error;
    job->elapsed_us = pep_mono_us() - job->started_mono_us;
    job->done(job, job->done_arg);
}

#define FORWARD_MAX_IDLE_REUSE_S 4

/*
 * CURLOPT_PREREQFUNCTION: libcurl calls it each time it is about to send the request on a
 * connection — including when it sends it again on a fresh connection because a reused
 * one closed before any answer byte (Curl_retry_request, up to 5 times).  So it counts
 * the request's real attempts, and SECURITY (SPEC 4.2): it refuses the second send of a
 * request that is not safe to repeat (a refund must not reach the upstream twice because
 * a keep-alive connection died under it).
 */
static int on_prereq(void *arg, char *primary_ip, char *local_ip, int primary_port,
                     int local_port) {
    (void)primary_ip;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    struct forward_job *job = arg;
    if (job->sends > 0 && !job->repeatable) {
        job->resend_refused = true;
        return CURL_PREREQFUNC_ABORT;
    }
    if (job->sends < FORWARD_MAX_SENDS) job->send_at_us[job->sends] = pep_mono_us();
    job->sends++;
    return CURL_PREREQFUNC_OK;
}

static int setup(struct forwarder *f, struct forward_job *job) {
    CURL *e = take_easy(f);
    if (!e) return -1;
    job->easy = e;
    job->head_bytes = 0;
    job->head_complete = false;
    job->head_too_large = false;
    job->resend_refused = false;
    job->paused = false;
    job->sends = 0;
    job->curl_errbuf[0] = '\0';
    job->last_byte_mono_us = pep_mono_us();
    int64_t connect_ms = job->timeout_ms < 10000 ? job->timeout_ms : 10000;
    CURLcode rc = CURLE_OK;
#define SET(opt, val)                                                                              \
    if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val)
    SET(CURLOPT_URL, job->url);
    SET(CURLOPT_PRIVATE, job);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 0L);
    /* A job that may stream is timed here (fail_idle_jobs): its whole-answer timeout ends
     * when streaming begins, and libcurl's cannot be lifted mid-transfer. */
    if (!job->on_head) SET(CURLOPT_TIMEOUT_MS, (long)job->timeout_ms);
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)connect_ms);
    SET(CURLOPT_HTTPHEADER, job->headers);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_WRITEDATA, job);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_HEADERDATA, job);
    SET(CURLOPT_ERRORBUFFER, job->curl_errbuf);
    SET(CURLOPT_PREREQFUNCTION, on_prereq);
    SET(CURLOPT_PREREQDATA, job);
    SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    SET(CURLOPT_ACCEPT_ENCODING, NULL); /* relay bytes as the upstream sent them */
    SET(CURLOPT_PROXY, "");             /* never an environment proxy for upstream calls */
    /* libcurl re-sends a request when a reused connection turns out closed before any
     * answer byte (on_prereq counts and, for a request not safe to repeat, refuses that).
     * The usual cause is the upstream's keep-alive timeout expiring as the request goes out
     * (Node and uvicorn close idle connections after 5 s); not reusing connections idle
     * for more than FORWARD_MAX_IDLE_REUSE_S makes it rare, at the cost of one connect
     * after a lull. */
    SET(CURLOPT_MAXAGE_CONN, (long)FORWARD_MAX_IDLE_REUSE_S);
    if (strcmp(job->method, "GET") == 0) {
        SET(CURLOPT_HTTPGET, 1L);
    } else if (strcmp(job->method, "HEAD") == 0) {
        SET(CURLOPT_NOBODY, 1L);
    } else {
        SET(CURLOPT_CUSTOMREQUEST, job->method);
        SET(CURLOPT_POSTFIELDS, job->body ? job->body : "");
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)job->body_len);
    }
#undef SET
    if (rc != CURLE_OK || curl_multi_add_handle(f->multi, e) != CURLM_OK) {
        put_easy(f, e);
        job->easy = NULL;
        return -1;
    }
    job->next = f->running;
    f->running = job;
    return 0;
}

static enum forward_error classify(const struct forward_job *job, CURLcode result) {
    if (job->error == FORWARD_TOO_LARGE) return FORWARD_TOO_LARGE;
    if (job->head_too_large) return FORWARD_CONNECT_ERROR;
    switch (result) {
    case CURLE_OK:
        /* SECURITY (SPEC 8): only an answer pep can relay as sent counts as one: a head
         * the upstream cut off (libcurl ends such a transfer without an error) or a status
         * outside 200-599 (which the agent's HTTP stack would misread) is a failed attempt. */
        if (!job->head_complete || job->status < 200 || job->status > 599)
            return FORWARD_CONNECT_ERROR;
        return FORWARD_OK;
    case CURLE_OPERATION_TIMEDOUT: {
        /* The connect timeout and the overall timeout share this code: a connection that
         * was never established is a connection error (SPEC 8). */
        curl_off_t connect_us = 0;
        if (job->easy &&
            curl_easy_getinfo(job->easy, CURLINFO_CONNECT_TIME_T, &connect_us) == CURLE_OK &&
            connect_us == 0)
            return FORWARD_CONNECT_ERROR;
        return FORWARD_TIMEOUT;
    }
    default:
        return FORWARD_CONNECT_ERROR;
    }
}

/*
 * idle_timeout (SPEC 8: silence longer than idle_timeout) is enforced here, not with
 * libcurl's low-speed limit: that limit averages upload and download bytes over seconds,
 * so a request body being sent masks a silent upstream.  Running jobs are checked at most
 * every FORWARD_IDLE_CHECK_US, which is the precision of the timeout.
 */
#define FORWARD_IDLE_CHECK_US 50000

static void fail_idle_jobs(struct forwarder *f) {
    int64_t now = pep_mono_us();
    if (now < f->next_idle_check_us) return;
    f->next_idle_check_us = now + FORWARD_IDLE_CHECK_US;
    for (struct forward_job *job = f->running, *next; job; job = next) {
        next = job->next; /* finish() unlinks job */
        /* A paused stream waits for its reader, not for the upstream: not silence. */
        if (job->paused) continue;
        if (job->idle_timeout_ms > 0 && now - job->last_byte_mono_us > job->idle_timeout_ms * 1000)
            finish(f, job, FORWARD_IDLE_TIMEOUT);
        else if (job->on_head && !job->streaming &&
                 now - job->started_mono_us > job->timeout_ms * 1000)
            finish(f, job, FORWARD_TIMEOUT);
    }
}

static void cancel_everything(struct forwarder *f, struct forward_job *queued) {
    while (queued) {
        struct forward_job *next = queued->next;
        queued->started_mono_us = pep_mono_us();
        finish(f, queued, FORWARD_CANCELLED);
        queued = next;
    }
    while (f->running)
        finish(f, f->running, FORWARD_CANCELLED);
}

/* CURLMOPT_SOCKETFUNCTION: keep the epoll set in step with what libcurl waits for. */
static int on_socket(CURL *easy, curl_socket_t fd, int what, void *arg, void *socketp) {
    (void)easy;
    struct forwarder *f = arg;
    if (what == CURL_POLL_REMOVE) {
        epoll_ctl(f->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
        curl_multi_assign(f->multi, fd, NULL);
        return 0;
    }
    struct epoll_event ev = {.data.fd = fd};
    if (what & CURL_POLL_IN) ev.events |= EPOLLIN;
    if (what & CURL_POLL_OUT) ev.events |= EPOLLOUT;
    /* socketp marks sockets already in the set (MOD) versus new ones (ADD). */
    int op = socketp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(f->epoll_fd, op, fd, &ev) != 0 && errno == EEXIST)
        epoll_ctl(f->epoll_fd, EPOLL_CTL_MOD, fd, &ev);
    if (!socketp) curl_multi_assign(f->multi, fd, f);
    return 0;
}

/* CURLMOPT_TIMERFUNCTION: libcurl's next deadline, honoured by epoll_wait's timeout. */
static int on_timer(CURLM *multi, long timeout_ms, void *arg) {
    (void)multi;
    struct forwarder *f = arg;
    f->deadline_us = timeout_ms < 0 ? -1 : pep_mono_us() + (int64_t)timeout_ms * 1000;
    return 0;
}

/* Finishes every transfer libcurl reports done. */
static void reap(struct forwarder *f) {
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(f->multi, &left))) {
        if (msg->msg != CURLMSG_DONE) continue;
        struct forward_job *job = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&job);
        CURLcode result = msg->data.result;
        if (result == CURLE_OK)
            curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &job->status);
        enum forward_error error = classify(job, result);
        if (error != FORWARD_OK) job->status = 0; /* no answer that can be relayed */
        finish(f, job, error);
    }
}

/* Resumes the paused transfers whose sink has room again. */
static void continue_paused(struct forwarder *f) {
    if (!__atomic_exchange_n(&f->continue_wanted, 0, __ATOMIC_ACQ_REL)) return;
    for (struct forward_job *job = f->running, *next; job; job = next) {
        next = job->next; /* curl_easy_pause may deliver bytes, even finish the job */
        if (job->paused && __atomic_exchange_n(&job->continue_wanted, 0, __ATOMIC_ACQ_REL)) {
            job->paused = false;
            job->last_byte_mono_us = pep_mono_us();
            curl_easy_pause(job->easy, CURLPAUSE_CONT);
        }
    }
}

/* Moves newly armed timers into the sorted list (forwarder thread). */
static void merge_timers(struct forwarder *f, struct forward_timer *armed) {
    while (armed) {
        struct forward_timer *t = armed, **pp = &f->timers;
        armed = armed->next;
        while (*pp && (*pp)->at_mono_us <= t->at_mono_us)
            pp = &(*pp)->next;
        t->next = *pp;
        *pp = t;
    }
}

static void fire_due_timers(struct forwarder *f, bool cancelled) {
    int64_t now = pep_mono_us();
    while (f->timers && (cancelled || f->timers->at_mono_us <= now)) {
        struct forward_timer *t = f->timers;
        f->timers = t->next;
        t->next = NULL;
        t->fire(t, cancelled); /* may arm another timer or submit a job */
    }
}

static void *forwarder_main(void *arg) {
    struct forwarder *f = arg;
    pthread_setname_np(pthread_self(), "pep-forward");
    int running = 0;
    for (;;) {
        pthread_mutex_lock(&f->queue_lock);
        struct forward_job *batch = f->queue_head;
        f->queue_head = f->queue_tail = NULL;
        struct forward_timer *armed = f->armed;
        f->armed = NULL;
        bool stopping = f->stopping, cancel = f->cancel_requested;
        f->cancel_requested = false;
        pthread_mutex_unlock(&f->queue_lock);
        merge_timers(f, armed);

        if (stopping || cancel) {
            cancel_everything(f, batch);
            fire_due_timers(f, true); /* their owners learn that nothing more will run */
            if (stopping) break;
            continue;
        }
        bool added = batch != NULL;
        while (batch) {
            struct forward_job *next = batch->next;
            batch->next = NULL;
            batch->owner = f;
            batch->started_mono_us = pep_mono_us();
            if (setup(f, batch) != 0) finish(f, batch, FORWARD_CONNECT_ERROR);
            batch = next;
        }
        if (added) /* new handles start on the timeout path */
            curl_multi_socket_action(f->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        reap(f);

        continue_paused(f);
        fire_due_timers(f, false);

        struct epoll_event events[64];
        int wait_ms = f->running ? FORWARD_IDLE_CHECK_US / 1000 : 1000;
        if (f->deadline_us >= 0) {
            int64_t left = (f->deadline_us - pep_mono_us() + 999) / 1000;
            if (left < wait_ms) wait_ms = left < 0 ? 0 : (int)left;
        }
        if (f->timers) {
            int64_t left = (f->timers->at_mono_us - pep_mono_us() + 999) / 1000;
            if (left < wait_ms) wait_ms = left < 0 ? 0 : (int)left;
        }
        int n = epoll_wait(f->epoll_fd, events, 64, wait_ms);
        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == f->wake_fd) {
                uint64_t count;
                if (read(f->wake_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                    fprintf(stderr, "pep: forwarder: wake read failed\n");
                continue;
            }
            int flags = 0;
            if (events[i].events & (EPOLLIN | EPOLLHUP)) flags |= CURL_CSELECT_IN;
            if (events[i].events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
            if (events[i].events & EPOLLERR) flags |= CURL_CSELECT_ERR;
            curl_multi_socket_action(f->multi, events[i].data.fd, flags, &running);
        }
        if (f->deadline_us >= 0 && pep_mono_us() >= f->deadline_us) {
            f->deadline_us = -1;
            curl_multi_socket_action(f->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        }
        reap(f);
        fail_idle_jobs(f);
    }
    return NULL;
}

static void wake(struct forwarder *f) {
    uint64_t one = 1;
    if (write(f->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        fprintf(stderr, "pep: forwarder: wake write failed\n");
}

static void forwarder_free(struct forwarder *f) {
    for (size_t i = 0; i < f->idle_easy_len; i++)
        curl_easy_cleanup(f->idle_easy[i]);
    if (f->multi) curl_multi_cleanup(f->multi);
    if (f->epoll_fd >= 0) close(f->epoll_fd);
    if (f->wake_fd >= 0) close(f->wake_fd);
    pthread_mutex_destroy(&f->queue_lock);
    free(f);
}

int forwarder_start(struct forwarder **out, struct pep_err *err) {
    struct forwarder *f = calloc(1, sizeof *f);
    if (!f) return pep_err_set(err, PEP_ENOMEM, "forwarder: out of memory");
    pthread_mutex_init(&f->queue_lock, NULL);
    f->deadline_us = -1;
    f->multi = curl_multi_init();
    f->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    f->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = f->wake_fd};
    if (!f->multi || f->epoll_fd < 0 || f->wake_fd < 0 ||
        epoll_ctl(f->epoll_fd, EPOLL_CTL_ADD, f->wake_fd, &ev) != 0) {
        forwarder_free(f);
        return pep_err_set(err, PEP_EIO, "forwarder: cannot set up curl multi and epoll");
    }
    /* Keep enough idle connections for every upstream's concurrent load. */
    curl_multi_setopt(f->multi, CURLMOPT_MAXCONNECTS, 256L);
    curl_multi_setopt(f->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(f->multi, CURLMOPT_SOCKETDATA, f);
    curl_multi_setopt(f->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(f->multi, CURLMOPT_TIMERDATA, f);
    if (pthread_create(&f->thread, NULL, forwarder_main, f) != 0) {
        forwarder_free(f);
        return pep_err_set(err, PEP_EIO, "forwarder: cannot start thread");
    }
    *out = f;
    return 0;
}

int forwarder_schedule(struct forwarder *f, struct forward_timer *t) {
    pthread_mutex_lock(&f->queue_lock);
    if (f->stopping || f->refusing) {
        pthread_mutex_unlock(&f->queue_lock);
        return PEP_ECLOSED;
    }
    t->next = f->armed;
    f->armed = t;
    pthread_mutex_unlock(&f->queue_lock);
    wake(f);
    return 0;
}

void forwarder_continue(struct forwarder *f, struct forward_job *job) {
    __atomic_store_n(&job->continue_wanted, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&f->continue_wanted, 1, __ATOMIC_RELEASE);
    wake(f);
}

int forwarder_submit(struct forwarder *f, struct forward_job *job) {
    job->next = NULL;
    pthread_mutex_lock(&f->queue_lock);
    if (f->stopping || f->refusing) {
        pthread_mutex_unlock(&f->queue_lock);
        return PEP_ECLOSED;
    }
    /* Only the first job of a queue needs to wake the thread: it takes the whole queue
     * at once, so later jobs ride along (one eventfd write per batch, not per job). */
    bool was_empty = f->queue_head == NULL;
    if (f->queue_tail)
        f->queue_tail->next = job;
    else
        f->queue_head = job;
    f->queue_tail = job;
    pthread_mutex_unlock(&f->queue_lock);
    if (was_empty) wake(f);
    return 0;
}

void forwarder_cancel_all(struct forwarder *f) {
    pthread_mutex_lock(&f->queue_lock);
    f->cancel_requested = true;
    f->refusing = true;
    pthread_mutex_unlock(&f->queue_lock);
    wake(f);
}

void forwarder_stop(struct forwarder *f) {
    if (!f) return;
    pthread_mutex_lock(&f->queue_lock);
    f->stopping = true;
    pthread_mutex_unlock(&f->queue_lock);
    wake(f);
    pthread_join(f->thread, NULL);
    forwarder_free(f);
}
