/*
 * stream.h — the pipe between an upstream answer being streamed (SPEC 4.6) and the agent's
 * connection: a bounded byte ring with backpressure in both directions.
 *
 * The writer (the forwarder thread, from libcurl's write callback) puts bytes in; when the
 * ring has no room for them it is told "full" and pauses the transfer, and the reader's
 * next read calls `want_more` so that the transfer resumes.  The reader (libmicrohttpd's
 * content reader on a listener thread) takes bytes out; when the ring is empty and the
 * stream not over it calls `park` (which suspends the connection) and reads nothing; the
 * writer's next write, or the close, calls `unpark`.  park and unpark run under the pipe's
 * lock, so a write cannot slip between "empty" and "parked" and leave the reader asleep.
 * So pep never holds more than the ring's capacity of a stream, whatever its length, and
 * a slow agent slows the upstream transfer instead of growing memory.
 *
 * Threads: one writer thread, one reader thread at a time; every function is safe to call
 * concurrently with the other side's.
 */
#ifndef PEP_STREAM_H
#define PEP_STREAM_H

#include "pep/common.h"

#include <sys/types.h>

#define STREAM_PIPE_CAPACITY (64u * 1024)

/* What stream_pipe_write returns when the ring has no room for the bytes now. */
#define STREAM_PIPE_FULL ((size_t)-1)
/* What stream_pipe_read returns at the end of the stream, and when it ended badly. */
#define STREAM_PIPE_END ((ssize_t)-1)
#define STREAM_PIPE_ABORTED ((ssize_t)-2)

struct stream_pipe_hooks {
    void (*park)(void *arg);      /* under the lock: the reader found nothing; suspend it */
    void (*unpark)(void *arg);    /* under the lock: bytes or the end came for a parked reader */
    void (*want_more)(void *arg); /* outside the lock: a full ring has room again */
    void *arg;
};

struct stream_pipe;

/* NULL when out of memory.  Free with stream_pipe_free once both sides are done. */
struct stream_pipe *stream_pipe_new(const struct stream_pipe_hooks *hooks);
void stream_pipe_free(struct stream_pipe *p);

/* Writer: takes all n bytes and returns n, or STREAM_PIPE_FULL (nothing taken: offer them
 * again after want_more), or 0 when the reader is gone. */
size_t stream_pipe_write(struct stream_pipe *p, const char *data, size_t n);
/* Writer: the stream is over, whole (ok) or cut off. */
void stream_pipe_close(struct stream_pipe *p, bool ok);

/* Reader: up to max bytes into buf; 0 after parking (nothing yet); STREAM_PIPE_END once
 * everything written before a good close was read; STREAM_PIPE_ABORTED after a bad close. */
ssize_t stream_pipe_read(struct stream_pipe *p, char *buf, size_t max);
/* Reader: the agent's connection is gone; later writes return 0. */
void stream_pipe_reader_gone(struct stream_pipe *p);

/* Bytes the reader has taken so far (any thread). */
uint64_t stream_pipe_delivered(struct stream_pipe *p);

#endif
