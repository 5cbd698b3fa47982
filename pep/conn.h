/*
 * conn.h — the connection guard: what libmicrohttpd does not bound for us.
 *
 * 1. A whole-request receive deadline.  libmicrohttpd's MHD_OPTION_CONNECTION_TIMEOUT
 *    measures silence only, so a client sending one byte every few seconds could hold a
 *    connection (and, with enough of them, the listener's whole connection limit)
 *    forever.  The guard gives every connection a clock:
 *      ready      (accepted, or its previous answer sent): the next request line must be
 *                 in within CONN_READY_TIMEOUT_MS;
 *      receiving  (request line in): the head and the whole body must be in within
 *                 receive_timeout_ms;
 *      processing (body in; waiting for the audit writer or the upstream): no clock here,
 *                 the forwarder's deadlines apply.
 *    A connection past its clock is shut down (shutdown(2) on its socket, from the guard
 *    thread); libmicrohttpd then sees the end of the stream and closes it as usual.
 *
 * 2. A lingering close (as nginx's lingering_close).  A request answered before its body
 *    was read (a refusal from the head alone: no valid token, ambiguous framing, a body
 *    declared too large) leaves libmicrohttpd closing a socket with unread input, which
 *    makes the kernel send a reset that can destroy the answer before the client reads
 *    it.  Such a connection's socket is kept open by the guard after libmicrohttpd lets
 *    go: it sends FIN, then reads and discards what the client still sends for at most
 *    CONN_LINGER_IDLE_MS of silence and CONN_LINGER_TOTAL_MS in all, then closes.  Nothing
 *    read is kept, so a lingering client costs one file descriptor, never memory.
 *
 * Threads: conn_guard_notify runs on the listener threads (MHD_OPTION_NOTIFY_CONNECTION);
 * the conn_request_* calls on the listener thread handling the request; the guard's own
 * thread ("pep-conn") sweeps the clocks and drains lingering sockets.  The list of
 * connections has one lock (conns_lock); a connection's clock is two atomics.
 */
#ifndef PEP_CONN_H
#define PEP_CONN_H

#include "pep/common.h"

#include <microhttpd.h>

#define CONN_READY_TIMEOUT_MS 30000 /* as the listeners' idle timeout */
#define CONN_LINGER_IDLE_MS 2000
#define CONN_LINGER_TOTAL_MS 5000
#define CONN_LINGER_MAX 4096 /* sockets lingering at once; past that, closed at once */

struct conn_guard;

/* Starts the guard's thread.  receive_timeout_ms: the receiving clock (> 0).  tick (may be
 * NULL) runs on the guard thread after every sweep (about every 100 ms), for the
 * listeners' other housekeeping; it must not block. */
int conn_guard_start(struct conn_guard **out, int64_t receive_timeout_ms,
                     void (*tick)(void *arg, int64_t now_mono_us), void *tick_arg,
                     struct pep_err *err);
/* Stops the thread, closes every lingering socket, frees the guard.  Call after the
 * listeners are stopped (every connection closed).  NULL is a no-op. */
void conn_guard_stop(struct conn_guard *g);
/* Changes the receiving clock for requests that start from now on (reload). */
void conn_guard_set_receive_timeout(struct conn_guard *g, int64_t receive_timeout_ms);

/* MHD_OPTION_NOTIFY_CONNECTION callback; its closure is the guard. */
void conn_guard_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                       enum MHD_ConnectionNotificationCode code);

/* The request line arrived: the receiving clock starts. */
void conn_request_started(struct MHD_Connection *conn);
/* The whole request (head and body) arrived: no receive clock until the answer is sent. */
void conn_request_received(struct MHD_Connection *conn);
/* The request is over (answered or abandoned): the connection is ready for the next. */
void conn_request_done(struct MHD_Connection *conn);
/* The request is being answered before its body was read: linger when closing. */
void conn_linger_on_close(struct MHD_Connection *conn);

/* The client's address as text (IPv4 or IPv6, numeric), or "unknown". */
#define CONN_ADDRESS_LEN 48
void conn_client_address(struct MHD_Connection *conn, char out[CONN_ADDRESS_LEN]);

/* Counters, for tests and metrics. */
struct conn_guard_stats {
    uint64_t deadline_closed; /* connections shut down by a clock */
    uint64_t lingered;        /* sockets that lingered */
    uint64_t linger_refused;  /* closed at once: CONN_LINGER_MAX were lingering */
    size_t open;              /* connections now */
};
void conn_guard_get_stats(struct conn_guard *g, struct conn_guard_stats *out);

#endif
