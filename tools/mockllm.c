/*
 * mockllm.c — pep's bundled fake upstream: an OpenAI-compatible chat endpoint, an echo
 * endpoint for everything else, and a control API that scripts faults.
 *
 * It is both the test double of the integration tests and the upstream of the
 * benchmarks, so a plain request must cost microseconds and many delayed requests must
 * be served at once.  libmicrohttpd runs with an internal polling thread and one thread
 * per connection: a scripted delay, a hang or a slow SSE stream simply sleeps in its own
 * connection's thread and never holds up another request.
 *
 *   mockllm [--listen HOST:PORT]     default 127.0.0.1:9099; port 0 picks a free port and
 *                                    prints "listening http://HOST:PORT" once it accepts
 *
 * Endpoints (the path is compared without its query string):
 *   POST .../chat/completions  a chat.completion for the request's model ("stream": true:
 *                              text/event-stream, 3 chunks then "data: [DONE]"); bad JSON
 *                              is a 400 OpenAI-style error.
 *   anything else              200 echo {method, path (raw, with query), query, headers
 *                              (lowercased names), body}.
 *   /_mock/...                 control API, never counted and never faulted:
 *     POST /_mock/faults       queue a fault, see mock_fault_parse for the fields
 *     GET  /_mock/faults       the pending faults
 *     POST /_mock/reset        drop pending faults, hit counters, last and recent
 *     GET  /_mock/stats        {hits, by_path, last, faults_pending}
 *     GET  /_mock/requests     {requests: [...]} the last MOCK_RECENT_MAX requests, oldest
 *                              first (each as in `last`, body cut at 64 KiB)
 *
 * Faults form one FIFO queue.  A request takes the first queued fault whose `path` filter
 * is absent or equal to its path, and that fault's count drops by one; at zero it leaves
 * the queue.  Kinds: status, context_overflow, delay, hang, drop, sse (see mock_apply).
 *
 * Invariants: every piece of shared state (fault queue, counters, last/recent requests) is
 * behind g_mock.lock; a request works on private copies (its fault is copied out of the
 * queue), so /_mock/reset can run at any time.  A request's record is shared with `last`
 * and `recent`, so its reference count changes only under the lock (mock_record_release).
 * Bodies are bounded by MOCK_MAX_BODY.
 * Sleeps are sliced and end as soon as g_mock_stopping is set, so SIGTERM always stops.
 *
 * Threads: main (parses arguments, waits for SIGTERM/SIGINT, stops the daemon), MHD's
 * listener thread, and one MHD thread per connection that runs every callback below.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MOCK_DEFAULT_LISTEN "127.0.0.1:9099"
#define MOCK_MAX_BODY ((size_t)8 << 20) /* request bodies above this get 413 */
#define MOCK_RECENT_MAX 64              /* requests kept for GET /_mock/requests */
#define MOCK_RECENT_BODY_MAX 65536      /* body bytes kept per request in that list */
#define MOCK_MAX_PATHS 10000            /* distinct keys of by_path; the rest share one */
#define MOCK_OTHER_PATHS "(other)"
#define MOCK_SLICE_MS 10           /* sleep granularity; bounds shutdown latency */
#define MOCK_CONN_TIMEOUT_S 60u    /* idle keep-alive connections are closed after */
#define MOCK_MAX_CHUNKS 100000L    /* upper bound of a scripted stream */
#define MOCK_MAX_DELAY_MS 3600000L /* one hour: scripted delays above are refused */
#define MOCK_DEFAULT_CHUNKS 3

enum mock_kind {
    MOCK_FAULT_STATUS,           /* answer `status` (default 503) with an error body */
    MOCK_FAULT_CONTEXT_OVERFLOW, /* answer 400 context_length_exceeded */
    MOCK_FAULT_DELAY,            /* sleep delay_ms, then answer normally */
    MOCK_FAULT_HANG,             /* never answer; hold the connection until the peer leaves */
    MOCK_FAULT_DROP,             /* close the connection without a response */
    MOCK_FAULT_SSE,              /* stream `chunks` events, chunk_delay_ms apart */
};

static const char *const mock_kind_names[] = {
    [MOCK_FAULT_STATUS] = "status", [MOCK_FAULT_CONTEXT_OVERFLOW] = "context_overflow",
    [MOCK_FAULT_DELAY] = "delay",   [MOCK_FAULT_HANG] = "hang",
    [MOCK_FAULT_DROP] = "drop",     [MOCK_FAULT_SSE] = "sse",
};

/* One scripted fault, queued or copied into the request it applies to. */
struct mock_fault {
    struct mock_fault *next; /* queue link (NULL in a request's private copy) */
    enum mock_kind kind;
    long count;          /* requests this fault still applies to (queued: >= 1) */
    int status;          /* answer status; 0 = the kind's default */
    char *retry_after;   /* Retry-After header value, or NULL */
    char *body;          /* answer body replacing the default, or NULL */
    long delay_ms;       /* wait before acting (every kind but hang) */
    long chunks;         /* sse: number of data events before [DONE]; -1 = default */
    long chunk_delay_ms; /* sse: pause between two events */
    char *path;          /* only requests with exactly this path (no query), or NULL */
};

/* Shared state; every field after `lock` is protected by it. */
static struct {
    pthread_mutex_t lock;
    struct mock_fault *head, *tail; /* fault FIFO */
    long pending;                   /* number of faults in the FIFO */
    uint64_t hits;                  /* non-control requests received */
    json_t *by_path;                /* object: path -> hit count */
    json_t *last;                   /* the most recent non-control request, or NULL */
    json_t *recent;                 /* array of the last MOCK_RECENT_MAX requests */
} g_mock = {.lock = PTHREAD_MUTEX_INITIALIZER};

static atomic_bool g_mock_stopping;             /* set once SIGTERM/SIGINT arrived */
static atomic_uint_fast64_t g_mock_next_id = 1; /* "chatcmpl-mock-<n>" */

/* Per-request context, created by the URI log callback, freed by mock_completed. */
struct mock_req {
    char *raw_uri;  /* request target exactly as received (path + query) */
    bool started;   /* the header-only first handler call has happened */
    bool too_large; /* body exceeded MOCK_MAX_BODY; the rest is discarded */
    char *body;     /* request body, NUL-terminated (not counted in body_len) */
    size_t body_len;
    size_t body_cap;
};

/* State of one text/event-stream answer, owned by its MHD response. */
struct mock_stream {
    json_t *model;     /* model echoed in each chunk (owned reference) */
    char id[48];       /* chat completion id shared by all chunks */
    long long created; /* unix seconds */
    long chunks;       /* data events to send before [DONE] */
    long sent;         /* data events already produced */
    long delay_ms;     /* pause before every event after the first */
    bool done;         /* [DONE] produced */
    char *pending;     /* bytes produced but not yet handed to MHD */
    size_t pending_len;
    size_t pending_pos;
};

/* ---------------------------------------------------------------- small helpers */

static bool mock_stopping(void) {
    return atomic_load(&g_mock_stopping);
}

/* Sleeps ms milliseconds in slices.  Returns 0, or -1 as soon as mockllm is stopping. */
static int mock_sleep_ms(long ms) {
    while (ms > 0) {
        if (mock_stopping()) return -1;
        long slice = ms < MOCK_SLICE_MS ? ms : MOCK_SLICE_MS;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = slice * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        ms -= slice;
    }
    return mock_stopping() ? -1 : 0;
}

/* A JSON string of len bytes.  Bytes that are not UTF-8 become '?' (jansson refuses
 * them), so any request, however malformed, can be echoed. */
static json_t *mock_jstr(const char *s, size_t len) {
    if (s == NULL) return json_null();
    json_t *j = json_stringn(s, len);
    if (j != NULL) return j;
    char *copy = malloc(len + 1);
    if (copy == NULL) return NULL;
    for (size_t i = 0; i < len; i++)
        copy[i] = (unsigned char)s[i] < 0x80 ? s[i] : '?';
    j = json_stringn(copy, len);
    free(copy);
    return j;
}

/* Length of the path part of a request target (up to '?'). */
static size_t mock_path_len(const char *uri) {
    return strcspn(uri, "?");
}

static bool mock_path_eq(const char *uri, const char *path) {
    size_t n = mock_path_len(uri);
    return strlen(path) == n && memcmp(uri, path, n) == 0;
}

/* The chat endpoint is any path ending in /chat/completions, so an upstream base_url
 * with a prefix (http://mock/openai) still reaches it. */
static bool mock_is_chat(const char *uri) {
    static const char suffix[] = "/chat/completions";
    size_t n = mock_path_len(uri), s = sizeof(suffix) - 1;
    return n >= s && memcmp(uri + n - s, suffix, s) == 0;
}

static bool mock_is_control(const char *uri) {
    return strncmp(uri, "/_mock/", 7) == 0 || mock_path_eq(uri, "/_mock");
}

/* ---------------------------------------------------------------- responses */

/* Queues a response of len bytes copied from data. */
static enum MHD_Result mock_send(struct MHD_Connection *conn, unsigned status, const char *ctype,
                                 const char *data, size_t len, const char *retry_after) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);
    if (resp == NULL) return MHD_NO;
    enum MHD_Result rc = MHD_NO;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype) != MHD_YES) goto out;
    if (retry_after != NULL &&
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, retry_after) != MHD_YES)
        goto out;
    rc = MHD_queue_response(conn, status, resp);
out:
    MHD_destroy_response(resp);
    return rc;
}

/* Sends doc (stolen) as a 200 JSON answer.  Called with g_mock.lock held, which it
 * releases: doc shares objects (by_path, recent) that other requests mutate in place, so
 * it is dumped before the lock is let go. */
static enum MHD_Result mock_send_json_unlock(struct MHD_Connection *conn, json_t *doc) {
    char *text = doc != NULL ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    pthread_mutex_unlock(&g_mock.lock);
    if (text == NULL) return MHD_NO;
    enum MHD_Result rc = mock_send(conn, MHD_HTTP_OK, "application/json", text, strlen(text), NULL);
    free(text);
    return rc;
}

/* Queues obj as compact JSON and drops the reference to obj. */
static enum MHD_Result mock_send_json(struct MHD_Connection *conn, unsigned status, json_t *obj,
                                      const char *retry_after) {
    char *text = obj != NULL ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (text == NULL) return MHD_NO;
    enum MHD_Result rc =
        mock_send(conn, status, "application/json", text, strlen(text), retry_after);
    free(text);
    return rc;
}

/* An OpenAI-style error object. */
static json_t *mock_error_obj(const char *message, const char *type, const char *code) {
    return json_pack("{s:{s:s, s:s, s:n, s:s?}}", "error", "message", message, "type", type,
                     "param", "code", code);
}

static enum MHD_Result mock_send_error(struct MHD_Connection *conn, unsigned status,
                                       const char *message, const char *type, const char *code) {
    return mock_send_json(conn, status, mock_error_obj(message, type, code), NULL);
}

/* ---------------------------------------------------------------- request records */

static enum MHD_Result mock_add_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                       const char *value) {
    (void)kind;
    json_t *obj = cls;
    if (key == NULL) return MHD_YES;
    char *name = strdup(key);
    if (name == NULL) return MHD_YES;
    json_t *valid = json_string(name);
    for (char *c = name; *c != '\0'; c++) {
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c - 'A' + 'a');
        else if (valid == NULL && (unsigned char)*c >= 0x80)
            *c = '?'; /* a JSON key must be UTF-8 */
    }
    json_decref(valid);
    if (value == NULL) value = "";
    json_t *prev = json_object_get(obj, name);
    if (json_is_string(prev)) {
        /* A repeated header is shown as one comma-joined value, as a proxy would see it. */
        size_t a = json_string_length(prev), b = strlen(value);
        char *joined = malloc(a + 2 + b + 1);
        if (joined != NULL) {
            memcpy(joined, json_string_value(prev), a);
            memcpy(joined + a, ", ", 2);
            memcpy(joined + a + 2, value, b + 1);
            json_object_set_new(obj, name, mock_jstr(joined, a + 2 + b));
            free(joined);
        }
    } else {
        json_object_set_new(obj, name, mock_jstr(value, strlen(value)));
    }
    free(name);
    return MHD_YES;
}

static enum MHD_Result mock_add_query(void *cls, enum MHD_ValueKind kind, const char *key,
                                      const char *value) {
    (void)kind;
    if (key != NULL && json_object_get(cls, key) == NULL) {
        json_t *k = mock_jstr(key, strlen(key));
        if (json_is_string(k))
            json_object_set_new(cls, json_string_value(k),
                                value != NULL ? mock_jstr(value, strlen(value)) : json_null());
        json_decref(k);
    }
    return MHD_YES;
}

/* {method, path, query, headers, body} of a request: the echo answer and the stats record. */
static json_t *mock_record(struct MHD_Connection *conn, const char *method,
                           const struct mock_req *rq) {
    json_t *headers = json_object(), *query = json_object();
    if (headers != NULL) MHD_get_connection_values(conn, MHD_HEADER_KIND, mock_add_header, headers);
    if (query != NULL)
        MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, mock_add_query, query);
    return json_pack("{s:o?, s:o?, s:o?, s:o?, s:o?}", "method", mock_jstr(method, strlen(method)),
                     "path", mock_jstr(rq->raw_uri, strlen(rq->raw_uri)), "query", query, "headers",
                     headers, "body", mock_jstr(rq->body != NULL ? rq->body : "", rq->body_len));
}

/* Drops a reference to a request record.  Records are shared with g_mock.last and
 * g_mock.recent, and jansson's json_decref reads the count non-atomically before its atomic
 * decrement, so every reference change of a record happens under g_mock.lock. */
static void mock_record_release(json_t *record) {
    pthread_mutex_lock(&g_mock.lock);
    json_decref(record);
    pthread_mutex_unlock(&g_mock.lock);
}

static void mock_fault_free(struct mock_fault *f) {
    if (f == NULL) return;
    free(f->retry_after);
    free(f->body);
    free(f->path);
    free(f);
}

/* A private copy of queued fault q for one request. */
static struct mock_fault *mock_fault_copy(const struct mock_fault *q) {
    struct mock_fault *f = malloc(sizeof(*f));
    if (f == NULL) return NULL;
    *f = *q;
    f->next = NULL;
    f->count = 1;
    f->retry_after = q->retry_after != NULL ? strdup(q->retry_after) : NULL;
    f->body = q->body != NULL ? strdup(q->body) : NULL;
    f->path = q->path != NULL ? strdup(q->path) : NULL;
    if ((q->retry_after != NULL && f->retry_after == NULL) ||
        (q->body != NULL && f->body == NULL) || (q->path != NULL && f->path == NULL)) {
        mock_fault_free(f);
        return NULL;
    }
    return f;
}

/* The record kept in `recent`: record itself, or a shallow copy whose body is cut to
 * MOCK_RECENT_BODY_MAX bytes (with "body_truncated": true), so that 64 large requests cannot
 * pin gigabytes.  Caller holds g_mock.lock (the copy shares record's members). */
static json_t *mock_record_for_recent(json_t *record) {
    json_t *body = json_object_get(record, "body");
    if (json_string_length(body) <= MOCK_RECENT_BODY_MAX) return json_incref(record);
    json_t *copy = json_copy(record);
    if (copy == NULL) return NULL;
    json_object_set_new(copy, "body", mock_jstr(json_string_value(body), MOCK_RECENT_BODY_MAX));
    json_object_set_new(copy, "body_truncated", json_true());
    return copy;
}

/* Counts a non-control request, remembers it and takes the fault that applies to it.
 * Returns the caller's copy of that fault, or NULL (none, or out of memory). */
static struct mock_fault *mock_account(json_t *record, const char *uri) {
    size_t plen = mock_path_len(uri);
    char *path = strndup(uri, plen);
    struct mock_fault *mine = NULL;

    pthread_mutex_lock(&g_mock.lock);
    g_mock.hits++;
    if (path != NULL && g_mock.by_path != NULL) {
        /* Bounded, so a client sending endless distinct paths cannot grow it forever. */
        const char *key = path;
        json_t *n = json_object_get(g_mock.by_path, key);
        if (n == NULL && json_object_size(g_mock.by_path) >= MOCK_MAX_PATHS)
            n = json_object_get(g_mock.by_path, key = MOCK_OTHER_PATHS);
        /* A path that is not UTF-8 cannot be a JSON key; it is still counted in hits. */
        if (n != NULL)
            json_integer_set(n, json_integer_value(n) + 1);
        else
            json_object_set_new(g_mock.by_path, key, json_integer(1));
    }
    if (record != NULL) {
        json_decref(g_mock.last);
        g_mock.last = json_incref(record);
        if (g_mock.recent != NULL) {
            if (json_array_size(g_mock.recent) >= MOCK_RECENT_MAX)
                json_array_remove(g_mock.recent, 0);
            json_array_append_new(g_mock.recent, mock_record_for_recent(record));
        }
    }
    struct mock_fault **link = &g_mock.head, *prev = NULL;
    for (struct mock_fault *f = g_mock.head; f != NULL; prev = f, link = &f->next, f = f->next) {
        if (f->path != NULL && !mock_path_eq(uri, f->path)) continue;
        mine = mock_fault_copy(f);
        if (--f->count <= 0) {
            *link = f->next;
            if (g_mock.tail == f) g_mock.tail = prev;
            g_mock.pending--;
            mock_fault_free(f);
        }
        break;
    }
    pthread_mutex_unlock(&g_mock.lock);
    free(path);
    return mine;
}

/* ---------------------------------------------------------------- chat completions */

/* The model to echo: the request's own value when the body is a JSON object with one. */
static json_t *mock_request_model(const json_t *req) {
    json_t *m = json_object_get(req, "model");
    return m != NULL ? json_incref(m) : json_string("mock");
}

static void mock_new_id(char out[48]) {
    snprintf(out, 48, "chatcmpl-mock-%llu",
             (unsigned long long)atomic_fetch_add(&g_mock_next_id, 1));
}

static ssize_t mock_stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    struct mock_stream *s = cls;
    if (s->pending_pos >= s->pending_len) {
        free(s->pending);
        s->pending = NULL;
        s->pending_len = s->pending_pos = 0;
        if (s->sent < s->chunks) {
            if (s->sent > 0 && mock_sleep_ms(s->delay_ms) != 0)
                return MHD_CONTENT_READER_END_WITH_ERROR;
            bool last = s->sent + 1 == s->chunks;
            json_t *chunk = json_pack(
                "{s:s, s:s, s:I, s:O, s:[{s:i, s:{s:s, s:s}, s:s?}]}", "id", s->id, "object",
                "chat.completion.chunk", "created", (json_int_t)s->created, "model", s->model,
                "choices", "index", 0, "delta", "role", "assistant", "content",
                last ? "reply" : "mock ", "finish_reason", last ? "stop" : NULL);
            char *text = chunk != NULL ? json_dumps(chunk, JSON_COMPACT) : NULL;
            json_decref(chunk);
            if (text == NULL) return MHD_CONTENT_READER_END_WITH_ERROR;
            size_t n = strlen(text);
            s->pending = malloc(n + 9);
            if (s->pending != NULL)
                s->pending_len = (size_t)sprintf(s->pending, "data: %s\n\n", text);
            free(text);
            s->sent++;
        } else if (!s->done) {
            s->pending = strdup("data: [DONE]\n\n");
            s->pending_len = s->pending != NULL ? strlen(s->pending) : 0;
            s->done = true;
        } else {
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (s->pending == NULL) return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = s->pending_len - s->pending_pos;
    if (n > max) n = max;
    memcpy(buf, s->pending + s->pending_pos, n);
    s->pending_pos += n;
    return (ssize_t)n;
}

static void mock_stream_free(void *cls) {
    struct mock_stream *s = cls;
    json_decref(s->model);
    free(s->pending);
    free(s);
}

/* Answers a chunked text/event-stream; takes the reference to model. */
static enum MHD_Result mock_send_stream(struct MHD_Connection *conn, unsigned status, json_t *model,
                                        long chunks, long delay_ms) {
    struct mock_stream *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        json_decref(model);
        return MHD_NO;
    }
    s->model = model;
    s->chunks = chunks;
    s->delay_ms = delay_ms;
    s->created = (long long)time(NULL);
    mock_new_id(s->id);
    struct MHD_Response *resp = MHD_create_response_from_callback(
        MHD_SIZE_UNKNOWN, 4096, mock_stream_read, s, mock_stream_free);
    if (resp == NULL) {
        mock_stream_free(s);
        return MHD_NO;
    }
    enum MHD_Result rc = MHD_NO;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream") !=
            MHD_YES ||
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache") != MHD_YES)
        goto out;
    rc = MHD_queue_response(conn, status, resp);
out:
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result mock_chat(struct MHD_Connection *conn, const struct mock_req *rq) {
    json_error_t jerr;
    json_t *req = json_loadb(rq->body != NULL ? rq->body : "", rq->body_len, 0, &jerr);
    if (!json_is_object(req)) {
        char msg[300];
        if (req == NULL)
            snprintf(msg, sizeof(msg), "mockllm: the body is not valid JSON: %s", jerr.text);
        else
            snprintf(msg, sizeof(msg), "mockllm: the body must be a JSON object");
        json_decref(req);
        return mock_send_error(conn, MHD_HTTP_BAD_REQUEST, msg, "invalid_request_error",
                               "invalid_json");
    }
    json_t *model = mock_request_model(req);
    bool stream = json_is_true(json_object_get(req, "stream"));
    json_decref(req);
    if (stream) return mock_send_stream(conn, MHD_HTTP_OK, model, MOCK_DEFAULT_CHUNKS, 0);

    char id[48];
    mock_new_id(id);
    json_int_t prompt = (json_int_t)(rq->body_len / 4 + 1);
    json_t *answer = json_pack(
        "{s:s, s:s, s:I, s:o, s:[{s:i, s:{s:s, s:s}, s:s}], s:{s:I, s:i, s:I}}", "id", id, "object",
        "chat.completion", "created", (json_int_t)time(NULL), "model", model, "choices", "index", 0,
        "message", "role", "assistant", "content", "mock reply", "finish_reason", "stop", "usage",
        "prompt_tokens", prompt, "completion_tokens", 2, "total_tokens", prompt + 2);
    return mock_send_json(conn, MHD_HTTP_OK, answer, NULL);
}

/* The answer when no fault applies. */
static enum MHD_Result mock_normal(struct MHD_Connection *conn, const char *method,
                                   const struct mock_req *rq, json_t *record) {
    if (strcmp(method, "POST") == 0 && mock_is_chat(rq->raw_uri)) return mock_chat(conn, rq);
    /* Dumped without taking a reference: see mock_record_release. */
    char *text = json_dumps(record, JSON_COMPACT);
    if (text == NULL) return MHD_NO;
    enum MHD_Result rc = mock_send(conn, MHD_HTTP_OK, "application/json", text, strlen(text), NULL);
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- faults */

/* Holds the connection without answering until the peer closes it or mockllm stops, then
 * closes it.  Polling for RDHUP notices a client that gave up, so its thread ends. */
static enum MHD_Result mock_hang(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    int fd = ci != NULL ? ci->connect_fd : -1;
    while (!mock_stopping()) {
        struct pollfd p = {.fd = fd, .events = POLLRDHUP, .revents = 0};
        int n = poll(&p, fd >= 0 ? 1 : 0, MOCK_SLICE_MS * 5);
        if (n > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) break;
    }
    return MHD_NO;
}

/* Answers a status/context_overflow fault: f->body verbatim, or an OpenAI-style error. */
static enum MHD_Result mock_fault_status(struct MHD_Connection *conn, const struct mock_fault *f,
                                         unsigned status, json_t *dflt) {
    if (f->body != NULL) {
        json_decref(dflt);
        const char *ctype =
            (f->body[0] == '{' || f->body[0] == '[') ? "application/json" : "text/plain";
        return mock_send(conn, status, ctype, f->body, strlen(f->body), f->retry_after);
    }
    return mock_send_json(conn, status, dflt, f->retry_after);
}

static enum MHD_Result mock_apply(struct MHD_Connection *conn, const char *method,
                                  const struct mock_req *rq, json_t *record,
                                  const struct mock_fault *f) {
    if (f->kind == MOCK_FAULT_HANG) return mock_hang(conn);
    if (mock_sleep_ms(f->delay_ms) != 0) return MHD_NO;
    switch (f->kind) {
    case MOCK_FAULT_STATUS: {
        unsigned status = f->status != 0 ? (unsigned)f->status : 503u;
        const char *type = status == 429   ? "rate_limit_error"
                           : status >= 500 ? "server_error"
                                           : "invalid_request_error";
        char msg[80];
        snprintf(msg, sizeof(msg), "mockllm: scripted status %u", status);
        return mock_fault_status(
            conn, f, status,
            mock_error_obj(msg, type, status == 429 ? "rate_limit_exceeded" : NULL));
    }
    case MOCK_FAULT_CONTEXT_OVERFLOW:
        return mock_fault_status(
            conn, f, f->status != 0 ? (unsigned)f->status : 400u,
            mock_error_obj("This model's maximum context length is 8192 tokens. However, your "
                           "messages resulted in 9000 tokens. Please reduce the length of the "
                           "messages.",
                           "invalid_request_error", "context_length_exceeded"));
    case MOCK_FAULT_DELAY:
        return mock_normal(conn, method, rq, record);
    case MOCK_FAULT_DROP:
        return MHD_NO; /* MHD closes the connection without writing anything */
    case MOCK_FAULT_SSE: {
        json_t *req = rq->body != NULL ? json_loadb(rq->body, rq->body_len, 0, NULL) : NULL;
        json_t *model = mock_request_model(req);
        json_decref(req);
        return mock_send_stream(conn, f->status != 0 ? (unsigned)f->status : 200u, model,
                                f->chunks >= 0 ? f->chunks : MOCK_DEFAULT_CHUNKS,
                                f->chunk_delay_ms);
    }
    case MOCK_FAULT_HANG:
        break;
    }
    return MHD_NO;
}

/* ---------------------------------------------------------------- control API */

/* Reads an optional integer field in [lo, hi]; returns 0 or -1 with msg filled. */
static int mock_get_long(json_t *obj, const char *key, long lo, long hi, long *out, char *msg,
                         size_t msg_size) {
    json_t *v = json_object_get(obj, key);
    if (v == NULL) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        snprintf(msg, msg_size, "%s must be an integer in [%ld, %ld]", key, lo, hi);
        return -1;
    }
    *out = (long)json_integer_value(v);
    return 0;
}

static int mock_get_str(json_t *obj, const char *key, char **out, char *msg, size_t msg_size) {
    json_t *v = json_object_get(obj, key);
    if (v == NULL) return 0;
    if (!json_is_string(v)) {
        snprintf(msg, msg_size, "%s must be a string", key);
        return -1;
    }
    *out = strdup(json_string_value(v));
    if (*out == NULL) {
        snprintf(msg, msg_size, "out of memory");
        return -1;
    }
    return 0;
}

/* Parses the body of POST /_mock/faults:
 *   {"kind": status|context_overflow|delay|hang|drop|sse (required), "count": N (1),
 *    "status": S, "retry_after": "v", "body": "text", "delay_ms": D, "chunks": K (3),
 *    "chunk_delay_ms": D, "path": "/exact/path"}
 * Unknown keys are refused so that a typo in a test does not silently script nothing. */
static struct mock_fault *mock_fault_parse(const char *body, size_t len, char *msg,
                                           size_t msg_size) {
    static const char *const known[] = {"kind",        "count",          "status",
                                        "retry_after", "body",           "delay_ms",
                                        "chunks",      "chunk_delay_ms", "path"};
    json_error_t jerr;
    struct mock_fault *f = NULL;
    json_t *obj = json_loadb(body != NULL ? body : "", len, 0, &jerr);
    if (!json_is_object(obj)) {
        snprintf(msg, msg_size, "the body must be a JSON object");
        goto fail;
    }
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val) {
        size_t i = 0;
        while (i < sizeof(known) / sizeof(known[0]) && strcmp(known[i], key) != 0)
            i++;
        if (i == sizeof(known) / sizeof(known[0])) {
            snprintf(msg, msg_size, "unknown key \"%.64s\"", key);
            goto fail;
        }
    }
    f = calloc(1, sizeof(*f));
    if (f == NULL) {
        snprintf(msg, msg_size, "out of memory");
        goto fail;
    }
    f->count = 1;
    f->chunks = -1;
    const char *kind = json_string_value(json_object_get(obj, "kind"));
    size_t k = 0;
    while (kind != NULL && k < sizeof(mock_kind_names) / sizeof(mock_kind_names[0]) &&
           strcmp(mock_kind_names[k], kind) != 0)
        k++;
    if (kind == NULL || k == sizeof(mock_kind_names) / sizeof(mock_kind_names[0])) {
        snprintf(msg, msg_size,
                 "kind must be one of status, context_overflow, delay, hang, drop, sse");
        goto fail;
    }
    f->kind = (enum mock_kind)k;
    long status = 0;
    if (mock_get_long(obj, "count", 1, LONG_MAX, &f->count, msg, msg_size) != 0 ||
        mock_get_long(obj, "status", 100, 599, &status, msg, msg_size) != 0 ||
        mock_get_long(obj, "delay_ms", 0, MOCK_MAX_DELAY_MS, &f->delay_ms, msg, msg_size) != 0 ||
        mock_get_long(obj, "chunks", 0, MOCK_MAX_CHUNKS, &f->chunks, msg, msg_size) != 0 ||
        mock_get_long(obj, "chunk_delay_ms", 0, MOCK_MAX_DELAY_MS, &f->chunk_delay_ms, msg,
                      msg_size) != 0 ||
        mock_get_str(obj, "retry_after", &f->retry_after, msg, msg_size) != 0 ||
        mock_get_str(obj, "body", &f->body, msg, msg_size) != 0 ||
        mock_get_str(obj, "path", &f->path, msg, msg_size) != 0)
        goto fail;
    f->status = (int)status;
    if (f->retry_after != NULL && strpbrk(f->retry_after, "\r\n") != NULL) {
        snprintf(msg, msg_size, "retry_after must not contain CR or LF");
        goto fail;
    }
    if (f->path != NULL && f->path[0] != '/') {
        snprintf(msg, msg_size, "path must start with /");
        goto fail;
    }
    json_decref(obj);
    return f;
fail:
    json_decref(obj);
    mock_fault_free(f);
    return NULL;
}

static json_t *mock_fault_json(const struct mock_fault *f) {
    return json_pack("{s:s, s:I, s:i, s:s?, s:s?, s:I, s:I, s:I, s:s?}", "kind",
                     mock_kind_names[f->kind], "count", (json_int_t)f->count, "status", f->status,
                     "retry_after", f->retry_after, "body", f->body, "delay_ms",
                     (json_int_t)f->delay_ms, "chunks", (json_int_t)f->chunks, "chunk_delay_ms",
                     (json_int_t)f->chunk_delay_ms, "path", f->path);
}

/* Drops faults, counters and remembered requests.  Caller holds g_mock.lock and releases
 * garbage (which receives the old JSON values) before unlocking it. */
static void mock_reset_locked(json_t *garbage) {
    struct mock_fault *f = g_mock.head;
    while (f != NULL) {
        struct mock_fault *next = f->next;
        mock_fault_free(f);
        f = next;
    }
    g_mock.head = g_mock.tail = NULL;
    g_mock.pending = 0;
    g_mock.hits = 0;
    json_array_append_new(garbage, g_mock.by_path);
    json_array_append_new(garbage, g_mock.recent);
    if (g_mock.last != NULL) json_array_append_new(garbage, g_mock.last);
    g_mock.by_path = json_object();
    g_mock.recent = json_array();
    g_mock.last = NULL;
}

static enum MHD_Result mock_control(struct MHD_Connection *conn, const char *method,
                                    const struct mock_req *rq) {
    bool get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    const char *uri = rq->raw_uri;

    if (mock_path_eq(uri, "/_mock/faults") && post) {
        char msg[200] = "";
        struct mock_fault *f = mock_fault_parse(rq->body, rq->body_len, msg, sizeof(msg));
        if (f == NULL)
            return mock_send_error(conn, MHD_HTTP_BAD_REQUEST, msg, "invalid_request_error",
                                   "bad_fault");
        pthread_mutex_lock(&g_mock.lock);
        if (g_mock.tail != NULL)
            g_mock.tail->next = f;
        else
            g_mock.head = f;
        g_mock.tail = f;
        long pending = ++g_mock.pending;
        pthread_mutex_unlock(&g_mock.lock);
        return mock_send_json(conn, MHD_HTTP_OK, json_pack("{s:I}", "pending", (json_int_t)pending),
                              NULL);
    }
    if (mock_path_eq(uri, "/_mock/faults") && get) {
        json_t *list = json_array();
        pthread_mutex_lock(&g_mock.lock);
        for (const struct mock_fault *f = g_mock.head; f != NULL; f = f->next)
            json_array_append_new(list, mock_fault_json(f));
        pthread_mutex_unlock(&g_mock.lock);
        return mock_send_json(conn, MHD_HTTP_OK, json_pack("{s:o}", "faults", list), NULL);
    }
    if (mock_path_eq(uri, "/_mock/reset") && post) {
        json_t *garbage = json_array();
        pthread_mutex_lock(&g_mock.lock);
        mock_reset_locked(garbage);
        json_decref(garbage);
        pthread_mutex_unlock(&g_mock.lock);
        return mock_send_json(conn, MHD_HTTP_OK, json_pack("{s:b}", "reset", 1), NULL);
    }
    if (mock_path_eq(uri, "/_mock/stats") && get) {
        pthread_mutex_lock(&g_mock.lock);
        json_t *stats = json_pack("{s:I, s:O?, s:O?, s:I}", "hits", (json_int_t)g_mock.hits,
                                  "by_path", g_mock.by_path, "last", g_mock.last, "faults_pending",
                                  (json_int_t)g_mock.pending);
        return mock_send_json_unlock(conn, stats);
    }
    if (mock_path_eq(uri, "/_mock/requests") && get) {
        pthread_mutex_lock(&g_mock.lock);
        return mock_send_json_unlock(conn, json_pack("{s:O?}", "requests", g_mock.recent));
    }
    if (mock_path_eq(uri, "/_mock/faults") || mock_path_eq(uri, "/_mock/reset") ||
        mock_path_eq(uri, "/_mock/stats") || mock_path_eq(uri, "/_mock/requests"))
        return mock_send_error(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "mockllm: method not allowed",
                               "invalid_request_error", "method_not_allowed");
    return mock_send_error(conn, MHD_HTTP_NOT_FOUND, "mockllm: unknown control endpoint",
                           "invalid_request_error", "not_found");
}

/* ---------------------------------------------------------------- MHD callbacks */

/* Called by MHD with the request target before it splits off the query and unescapes the
 * path: the only place the target is seen exactly as sent. */
static void *mock_uri_log(void *cls, const char *uri, struct MHD_Connection *conn) {
    (void)cls;
    (void)conn;
    struct mock_req *rq = calloc(1, sizeof(*rq));
    if (rq == NULL) return NULL;
    rq->raw_uri = strdup(uri != NULL ? uri : "");
    if (rq->raw_uri == NULL) {
        free(rq);
        return NULL;
    }
    return rq;
}

static void mock_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                           enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    struct mock_req *rq = *req_cls;
    if (rq == NULL) return;
    free(rq->raw_uri);
    free(rq->body);
    free(rq);
    *req_cls = NULL;
}

/* Appends one body chunk, or marks the request too large and drops the bytes. */
static void mock_body_append(struct mock_req *rq, const char *data, size_t len) {
    if (rq->too_large) return;
    if (len > MOCK_MAX_BODY - rq->body_len) {
        rq->too_large = true;
        return;
    }
    if (rq->body_len + len + 1 > rq->body_cap) {
        size_t cap = rq->body_cap != 0 ? rq->body_cap : 1024;
        while (cap < rq->body_len + len + 1)
            cap *= 2;
        char *grown = realloc(rq->body, cap);
        if (grown == NULL) {
            rq->too_large = true;
            return;
        }
        rq->body = grown;
        rq->body_cap = cap;
    }
    memcpy(rq->body + rq->body_len, data, len);
    rq->body_len += len;
    rq->body[rq->body_len] = '\0';
}

static enum MHD_Result mock_handler(void *cls, struct MHD_Connection *conn, const char *url,
                                    const char *method, const char *version,
                                    const char *upload_data, size_t *upload_data_size,
                                    void **req_cls) {
    (void)cls;
    (void)version;
    struct mock_req *rq = *req_cls;
    if (rq == NULL) { /* the URI log callback ran out of memory; fall back to the URL */
        rq = mock_uri_log(NULL, url, conn);
        if (rq == NULL) return MHD_NO;
        *req_cls = rq;
    }
    if (!rq->started) {
        rq->started = true;
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl != NULL && strtoull(cl, NULL, 10) > MOCK_MAX_BODY)
            return mock_send_error(conn, MHD_HTTP_CONTENT_TOO_LARGE,
                                   "mockllm: request body too large", "invalid_request_error",
                                   "body_too_large");
        return MHD_YES;
    }
    if (*upload_data_size != 0) {
        mock_body_append(rq, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (rq->too_large)
        return mock_send_error(conn, MHD_HTTP_CONTENT_TOO_LARGE, "mockllm: request body too large",
                               "invalid_request_error", "body_too_large");
    if (mock_is_control(rq->raw_uri)) return mock_control(conn, method, rq);

    json_t *record = mock_record(conn, method, rq);
    struct mock_fault *f = mock_account(record, rq->raw_uri);
    enum MHD_Result rc =
        f != NULL ? mock_apply(conn, method, rq, record, f) : mock_normal(conn, method, rq, record);
    mock_fault_free(f);
    mock_record_release(record);
    return rc;
}

/* ---------------------------------------------------------------- main */

static void mock_usage(FILE *to) {
    fprintf(to, "usage: mockllm [--listen HOST:PORT]   (default %s; port 0 = any free port)\n",
            MOCK_DEFAULT_LISTEN);
}

/* Splits "HOST:PORT" or "[V6]:PORT" and resolves it.  Returns 0 and fills out/host. */
static int mock_parse_listen(const char *spec, struct sockaddr_storage *out, socklen_t *out_len,
                             char *host, size_t host_size) {
    const char *colon = strrchr(spec, ':');
    if (colon == NULL || colon == spec || colon[1] == '\0') return -1;
    const char *h = spec;
    size_t hlen = (size_t)(colon - spec);
    if (h[0] == '[') {
        if (hlen < 3 || h[hlen - 1] != ']') return -1;
        h++;
        hlen -= 2;
    }
    if (hlen >= host_size) return -1;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    char *end;
    errno = 0;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || port > 65535) return -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_PASSIVE};
    struct addrinfo *res = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0 || res == NULL) return -1;
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *out_len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

int main(int argc, char **argv) {
    const char *listen = MOCK_DEFAULT_LISTEN;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            listen = argv[++i];
        } else if (strncmp(argv[i], "--listen=", 9) == 0) {
            listen = argv[i] + 9;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            mock_usage(stdout);
            return 0;
        } else {
            mock_usage(stderr);
            return 2;
        }
    }

    struct sockaddr_storage addr;
    socklen_t addr_len = 0;
    char host[256];
    if (mock_parse_listen(listen, &addr, &addr_len, host, sizeof(host)) != 0) {
        fprintf(stderr, "mockllm: bad listen address \"%s\" (want HOST:PORT)\n", listen);
        return 2;
    }

    /* The daemon's threads inherit this mask, so only sigwait below sees the signals. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    if (pthread_sigmask(SIG_BLOCK, &stop_signals, NULL) != 0) {
        fprintf(stderr, "mockllm: cannot block signals\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    /* Benchmarks open many connections, each one a thread and a descriptor. */
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &nofile) != 0)
            fprintf(stderr, "mockllm: cannot raise RLIMIT_NOFILE\n");
    }

    json_object_seed(0);
    g_mock.by_path = json_object();
    g_mock.recent = json_array();
    if (g_mock.by_path == NULL || g_mock.recent == NULL) {
        fprintf(stderr, "mockllm: out of memory\n");
        return 1;
    }

    unsigned int flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_THREAD_PER_CONNECTION;
    if (addr.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, 0, NULL, NULL, mock_handler, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)MOCK_CONN_TIMEOUT_S,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)4000, MHD_OPTION_LISTEN_BACKLOG_SIZE,
        (unsigned int)1024, MHD_OPTION_URI_LOG_CALLBACK, mock_uri_log, NULL,
        MHD_OPTION_NOTIFY_COMPLETED, mock_completed, NULL, MHD_OPTION_END);
    if (d == NULL) {
        fprintf(stderr, "mockllm: cannot listen on %s\n", listen);
        return 1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    if (info == NULL || info->port == 0) {
        fprintf(stderr, "mockllm: cannot read the bound port\n");
        MHD_stop_daemon(d);
        return 1;
    }
    bool v6 = addr.ss_family == AF_INET6;
    printf("listening http://%s%s%s:%u\n", v6 ? "[" : "", host, v6 ? "]" : "",
           (unsigned)info->port);
    fflush(stdout);

    int sig = 0;
    while (sigwait(&stop_signals, &sig) != 0)
        ;
    /* Sleeping handlers see the flag within MOCK_SLICE_MS and return, so the daemon's
     * join of the connection threads is bounded. */
    atomic_store(&g_mock_stopping, true);
    MHD_stop_daemon(d);

    json_t *garbage = json_array();
    pthread_mutex_lock(&g_mock.lock);
    mock_reset_locked(garbage);
    json_array_append_new(garbage, g_mock.by_path);
    json_array_append_new(garbage, g_mock.recent);
    g_mock.by_path = g_mock.recent = NULL;
    json_decref(garbage);
    pthread_mutex_unlock(&g_mock.lock);
    return 0;
}
