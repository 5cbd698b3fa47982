/*
 * stream.c — the streaming pipe (see stream.h): a ring of STREAM_PIPE_CAPACITY bytes under
 * one mutex.
 */
#include "pep/stream.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct stream_pipe {
    pthread_mutex_t lock;
    struct stream_pipe_hooks hooks;
    char ring[STREAM_PIPE_CAPACITY];
    size_t head; /* next byte to read */
    size_t len;  /* bytes held */
    bool closed, closed_ok;
    bool reader_gone;
    bool parked;      /* the reader is suspended until bytes or the end come */
    bool writer_full; /* a write was refused for room: want_more when some is freed */
    uint64_t delivered;
};

struct stream_pipe *stream_pipe_new(const struct stream_pipe_hooks *hooks) {
    struct stream_pipe *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    p->hooks = *hooks;
    return p;
}

void stream_pipe_free(struct stream_pipe *p) {
    if (!p) return;
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* Under the lock: a parked reader is woken for what just changed. */
static void wake_reader(struct stream_pipe *p) {
    if (!p->parked) return;
    p->parked = false;
    p->hooks.unpark(p->hooks.arg);
}

size_t stream_pipe_write(struct stream_pipe *p, const char *data, size_t n) {
    pthread_mutex_lock(&p->lock);
    if (p->reader_gone) {
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    /* All or nothing: libcurl offers refused bytes again, whole, after the pause. */
    if (n > STREAM_PIPE_CAPACITY - p->len) {
        p->writer_full = true;
        pthread_mutex_unlock(&p->lock);
        return STREAM_PIPE_FULL;
    }
    size_t tail = (p->head + p->len) % STREAM_PIPE_CAPACITY;
    size_t first = n < STREAM_PIPE_CAPACITY - tail ? n : STREAM_PIPE_CAPACITY - tail;
    memcpy(p->ring + tail, data, first);
    memcpy(p->ring, data + first, n - first);
    p->len += n;
    if (n > 0) wake_reader(p);
    pthread_mutex_unlock(&p->lock);
    return n;
}

void stream_pipe_close(struct stream_pipe *p, bool ok) {
    pthread_mutex_lock(&p->lock);
    if (!p->closed) {
        p->closed = true;
        p->closed_ok = ok;
        wake_reader(p);
    }
    pthread_mutex_unlock(&p->lock);
}

ssize_t stream_pipe_read(struct stream_pipe *p, char *buf, size_t max) {
    pthread_mutex_lock(&p->lock);
    if (p->len == 0) {
        ssize_t rc = 0;
        if (p->closed)
            rc = p->closed_ok ? STREAM_PIPE_END : STREAM_PIPE_ABORTED;
        else if (!p->parked) {
            p->parked = true;
            p->hooks.park(p->hooks.arg);
        }
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    size_t n = max < p->len ? max : p->len;
    size_t first = n < STREAM_PIPE_CAPACITY - p->head ? n : STREAM_PIPE_CAPACITY - p->head;
    memcpy(buf, p->ring + p->head, first);
    memcpy(buf + first, p->ring, n - first);
    p->head = (p->head + n) % STREAM_PIPE_CAPACITY;
    p->len -= n;
    p->delivered += n;
    bool more = p->writer_full;
    p->writer_full = false;
    pthread_mutex_unlock(&p->lock);
    if (more) p->hooks.want_more(p->hooks.arg);
    return (ssize_t)n;
}

void stream_pipe_reader_gone(struct stream_pipe *p) {
    pthread_mutex_lock(&p->lock);
    p->reader_gone = true;
    p->parked = false;
    bool more = p->writer_full; /* a paused writer must run again to see it */
    p->writer_full = false;
    pthread_mutex_unlock(&p->lock);
    if (more) p->hooks.want_more(p->hooks.arg);
}

uint64_t stream_pipe_delivered(struct stream_pipe *p) {
    pthread_mutex_lock(&p->lock);
    uint64_t n = p->delivered;
    pthread_mutex_unlock(&p->lock);
    return n;
}
