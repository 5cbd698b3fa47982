/*
 * rawup.h — a raw TCP upstream for tests of what pep sends upstream and of how it relays
 * answers that no well-behaved server would send.
 *
 * It listens on 127.0.0.1:0 in a thread of the test.  It parses requests the way a
 * lenient server does (Python's http.server among them): a CR, an LF or a CRLF each end a
 * line, and a Content-Length body follows the head.  So if pep ever let a bare CR through
 * inside a header value, rawup would see one more header line — or one more request —
 * than pep meant to send, and the test would say so.
 *
 * Each request parsed is recorded (its request line and header lines, as rawup split
 * them) and answered with the scripted answer: raw bytes sent as they are (a head over
 * 32 KiB, a status of 999, a head cut off…), after which the connection is closed when
 * close_after is set.
 *
 * Threads: rawup_start/rawup_stop from the test's thread; the getters from any thread.
 */
#ifndef PEP_TESTS_RAWUP_H
#define PEP_TESTS_RAWUP_H

#include <stdbool.h>
#include <stddef.h>

#define RAWUP_MAX_REQUESTS 64
#define RAWUP_MAX_LINES 64

struct rawup_request {
    char *lines[RAWUP_MAX_LINES]; /* [0] the request line, then header lines */
    size_t lines_len;
    size_t body_len;
};

struct rawup;

/* Starts it; *url gets "http://127.0.0.1:PORT" (cap ≥ 64).  NULL on failure. */
struct rawup *rawup_start(char *url, size_t cap);
void rawup_stop(struct rawup *u);

/* The answer to every following request: `len` bytes sent as they are, then the
 * connection is closed when close_after (else kept for the next request).  answer is
 * copied. */
void rawup_script(struct rawup *u, const void *answer, size_t len, bool close_after);
/* The next n requests parsed are recorded and then their connection is closed without an
 * answer (an upstream dropping a keep-alive connection as a request arrives). */
void rawup_drop_next(struct rawup *u, int n);
/* Forgets what was recorded. */
void rawup_reset(struct rawup *u);
/* Requests parsed so far. */
size_t rawup_count(struct rawup *u);
/* A copy of request i (caller frees with rawup_request_free), or false. */
bool rawup_get(struct rawup *u, size_t i, struct rawup_request *out);
void rawup_request_free(struct rawup_request *r);
/* The value of header `name` (case-insensitive) in r, trimmed, or NULL; *count gets how
 * many lines carry that name (may be NULL). */
const char *rawup_header(const struct rawup_request *r, const char *name, size_t *count);

#endif
