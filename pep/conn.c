/*
 * conn.c — the connection guard (see conn.h).
 *
 * Invariant: an entry is in the `conns` list from NOTIFY_STARTED to NOTIFY_CLOSED, and
 * libmicrohttpd closes the socket only after NOTIFY_CLOSED returns; the guard thread
 * shuts a socket down only while holding conns_lock with the entry still listed, so it
 * never touches a descriptor that was closed (and maybe reused).
 */
#include "pep/conn.h"
#include "pep/util.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum conn_stage { CONN_READY, CONN_RECEIVING, CONN_PROCESSING };

struct conn_entry {
    struct conn_entry *prev, *next; /* in guard->conns, under conns_lock */
    struct conn_guard *guard;
    int fd;
    int stage;         /* atomic: enum conn_stage */
    int64_t since_us;  /* atomic: monotonic time the stage began */
    int64_t limit_ms;  /* atomic: the clock of the current stage */
    bool linger;       /* atomic: set by conn_linger_on_close */
    bool deadline_hit; /* counted once (conns_lock) */
};

struct lingering {
    int fd; /* our own dup of the connection's socket */
    int64_t started_us, last_read_us;
};

struct conn_guard {
    pthread_t thread;
    int epoll_fd; /* lingering sockets and wake_fd */
    int wake_fd;
    bool stop;                  /* atomic */
    int64_t receive_timeout_ms; /* atomic */
    void (*tick)(void *arg, int64_t now_mono_us);
    void *tick_arg;

    pthread_mutex_t conns_lock; /* guards conns, open and the linger hand-over queue */
    struct conn_entry *conns;
    size_t open;
    int *handover; /* dup'd sockets waiting for the guard thread to start lingering */
    size_t handover_len, handover_cap;

    /* guard thread only */
    struct lingering linger[CONN_LINGER_MAX];
    size_t linger_len;

    uint64_t deadline_closed, lingered, linger_refused; /* atomic */
};

#define CONN_SWEEP_US 100000 /* clock precision */

static struct conn_entry *entry_of(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

static void set_stage(struct conn_entry *e, enum conn_stage stage, int64_t limit_ms) {
    if (!e) return;
    __atomic_store_n(&e->limit_ms, limit_ms, __ATOMIC_RELAXED);
    __atomic_store_n(&e->since_us, pep_mono_us(), __ATOMIC_RELAXED);
    __atomic_store_n(&e->stage, (int)stage, __ATOMIC_RELEASE);
}

void conn_request_started(struct MHD_Connection *conn) {
    struct conn_entry *e = entry_of(conn);
    if (e)
        set_stage(e, CONN_RECEIVING,
                  __atomic_load_n(&e->guard->receive_timeout_ms, __ATOMIC_RELAXED));
}

void conn_request_received(struct MHD_Connection *conn) {
    set_stage(entry_of(conn), CONN_PROCESSING, 0);
}

void conn_request_done(struct MHD_Connection *conn) {
    set_stage(entry_of(conn), CONN_READY, CONN_READY_TIMEOUT_MS);
}

void conn_linger_on_close(struct MHD_Connection *conn) {
    struct conn_entry *e = entry_of(conn);
    if (e) __atomic_store_n(&e->linger, true, __ATOMIC_RELAXED);
}

static void wake(struct conn_guard *g) {
    uint64_t one = 1;
    if (write(g->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        fprintf(stderr, "pep: conn: wake write failed\n");
}

/* NOTIFY_CLOSED of a connection marked to linger: keep the socket open past
 * libmicrohttpd's close with a descriptor of our own. */
static void hand_over(struct conn_guard *g, int fd) {
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return;
    pthread_mutex_lock(&g->conns_lock);
    if (g->handover_len == g->handover_cap) {
        size_t cap = g->handover_cap ? 2 * g->handover_cap : 64;
        int *grown = cap <= 2 * CONN_LINGER_MAX ? realloc(g->handover, cap * sizeof *grown) : NULL;
        if (!grown) {
            pthread_mutex_unlock(&g->conns_lock);
            __atomic_add_fetch(&g->linger_refused, 1, __ATOMIC_RELAXED);
            close(own);
            return;
        }
        g->handover = grown;
        g->handover_cap = cap;
    }
    g->handover[g->handover_len++] = own;
    bool first = g->handover_len == 1;
    pthread_mutex_unlock(&g->conns_lock);
    if (first) wake(g);
}

void conn_guard_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                       enum MHD_ConnectionNotificationCode code) {
    struct conn_guard *g = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        struct conn_entry *e = calloc(1, sizeof *e);
        *socket_context = e;
        if (!e || !ci) return; /* unguarded: the idle timeout still applies */
        e->guard = g;
        e->fd = ci->connect_fd;
        set_stage(e, CONN_READY, CONN_READY_TIMEOUT_MS);
        pthread_mutex_lock(&g->conns_lock);
        e->next = g->conns;
        if (g->conns) g->conns->prev = e;
        g->conns = e;
        g->open++;
        pthread_mutex_unlock(&g->conns_lock);
        return;
    }
    struct conn_entry *e = *socket_context;
    *socket_context = NULL;
    if (!e) return;
    pthread_mutex_lock(&g->conns_lock);
    if (e->prev)
        e->prev->next = e->next;
    else
        g->conns = e->next;
    if (e->next) e->next->prev = e->prev;
    g->open--;
    pthread_mutex_unlock(&g->conns_lock);
    if (__atomic_load_n(&e->linger, __ATOMIC_RELAXED)) hand_over(g, e->fd);
    free(e);
}

/* Shuts down every connection past its clock (guard thread). */
static void sweep(struct conn_guard *g, int64_t now) {
    pthread_mutex_lock(&g->conns_lock);
    for (struct conn_entry *e = g->conns; e; e = e->next) {
        int stage = __atomic_load_n(&e->stage, __ATOMIC_ACQUIRE);
        int64_t limit = __atomic_load_n(&e->limit_ms, __ATOMIC_RELAXED);
        int64_t since = __atomic_load_n(&e->since_us, __ATOMIC_RELAXED);
        if (stage == CONN_PROCESSING || limit <= 0 || now - since < limit * 1000) continue;
        /* SECURITY: a slow client (one byte every few seconds) holds a connection no
         * longer than its clock; libmicrohttpd reads the end of the stream and closes. */
        shutdown(e->fd, SHUT_RDWR);
        if (!e->deadline_hit) {
            e->deadline_hit = true;
            __atomic_add_fetch(&g->deadline_closed, 1, __ATOMIC_RELAXED);
        }
    }
    pthread_mutex_unlock(&g->conns_lock);
}

static void linger_close(struct conn_guard *g, size_t i) {
    epoll_ctl(g->epoll_fd, EPOLL_CTL_DEL, g->linger[i].fd, NULL);
    close(g->linger[i].fd);
    g->linger[i] = g->linger[--g->linger_len];
}

/* Starts lingering on the sockets libmicrohttpd let go of (guard thread). */
static void take_handovers(struct conn_guard *g, int64_t now) {
    pthread_mutex_lock(&g->conns_lock);
    int *fds = g->handover;
    size_t n = g->handover_len;
    g->handover = NULL;
    g->handover_len = g->handover_cap = 0;
    pthread_mutex_unlock(&g->conns_lock);
    for (size_t i = 0; i < n; i++) {
        int fd = fds[i];
        /* FIN after the answer: the client reads it to the end, then sees ours. */
        shutdown(fd, SHUT_WR);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (g->linger_len == CONN_LINGER_MAX || epoll_ctl(g->epoll_fd, EPOLL_CTL_ADD, fd, &ev)) {
            __atomic_add_fetch(&g->linger_refused, 1, __ATOMIC_RELAXED);
            close(fd);
            continue;
        }
        g->linger[g->linger_len++] = (struct lingering){fd, now, now};
        __atomic_add_fetch(&g->lingered, 1, __ATOMIC_RELAXED);
    }
    free(fds);
}

/* Reads and discards what a lingering client sends; closes it at its end (guard thread). */
static void drain(struct conn_guard *g, int fd, int64_t now) {
    static char sink[65536]; /* guard thread only; nothing read is looked at */
    for (size_t i = 0; i < g->linger_len; i++) {
        if (g->linger[i].fd != fd) continue;
        ssize_t n;
        while ((n = recv(fd, sink, sizeof sink, MSG_DONTWAIT)) > 0)
            g->linger[i].last_read_us = now;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            linger_close(g, i);
        return;
    }
}

static void expire_lingering(struct conn_guard *g, int64_t now) {
    for (size_t i = 0; i < g->linger_len;) {
        const struct lingering *l = &g->linger[i];
        if (now - l->started_us >= CONN_LINGER_TOTAL_MS * 1000LL ||
            now - l->last_read_us >= CONN_LINGER_IDLE_MS * 1000LL)
            linger_close(g, i); /* the last one moved to i: look at i again */
        else
            i++;
    }
}

static void *guard_main(void *arg) {
    struct conn_guard *g = arg;
    pthread_setname_np(pthread_self(), "pep-conn");
    int64_t next_sweep = 0;
    while (!__atomic_load_n(&g->stop, __ATOMIC_ACQUIRE)) {
        struct epoll_event events[64];
        int n = epoll_wait(g->epoll_fd, events, 64, CONN_SWEEP_US / 1000);
        int64_t now = pep_mono_us();
        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == g->wake_fd) {
                uint64_t count;
                if (read(g->wake_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                    fprintf(stderr, "pep: conn: wake read failed\n");
                take_handovers(g, now);
            } else {
                drain(g, events[i].data.fd, now);
            }
        }
        if (now >= next_sweep) {
            sweep(g, now);
            expire_lingering(g, now);
            if (g->tick) g->tick(g->tick_arg, now);
            next_sweep = now + CONN_SWEEP_US;
        }
    }
    return NULL;
}

static void guard_free(struct conn_guard *g) {
    while (g->linger_len > 0)
        linger_close(g, 0);
    for (size_t i = 0; i < g->handover_len; i++)
        close(g->handover[i]);
    free(g->handover);
    if (g->epoll_fd >= 0) close(g->epoll_fd);
    if (g->wake_fd >= 0) close(g->wake_fd);
    pthread_mutex_destroy(&g->conns_lock);
    free(g);
}

int conn_guard_start(struct conn_guard **out, int64_t receive_timeout_ms,
                     void (*tick)(void *arg, int64_t now_mono_us), void *tick_arg,
                     struct pep_err *err) {
    struct conn_guard *g = calloc(1, sizeof *g);
    if (!g) return pep_err_set(err, PEP_ENOMEM, "connection guard: out of memory");
    pthread_mutex_init(&g->conns_lock, NULL);
    g->receive_timeout_ms = receive_timeout_ms;
    g->tick = tick;
    g->tick_arg = tick_arg;
    g->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    g->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = g->wake_fd};
    if (g->epoll_fd < 0 || g->wake_fd < 0 ||
        epoll_ctl(g->epoll_fd, EPOLL_CTL_ADD, g->wake_fd, &ev) != 0) {
        guard_free(g);
        return pep_err_set(err, PEP_EIO, "connection guard: cannot set up epoll");
    }
    if (pthread_create(&g->thread, NULL, guard_main, g) != 0) {
        guard_free(g);
        return pep_err_set(err, PEP_EIO, "connection guard: cannot start thread");
    }
    *out = g;
    return 0;
}

void conn_guard_stop(struct conn_guard *g) {
    if (!g) return;
    __atomic_store_n(&g->stop, true, __ATOMIC_RELEASE);
    wake(g);
    pthread_join(g->thread, NULL);
    guard_free(g);
}

void conn_guard_set_receive_timeout(struct conn_guard *g, int64_t receive_timeout_ms) {
    __atomic_store_n(&g->receive_timeout_ms, receive_timeout_ms, __ATOMIC_RELAXED);
}

void conn_guard_get_stats(struct conn_guard *g, struct conn_guard_stats *out) {
    out->deadline_closed = __atomic_load_n(&g->deadline_closed, __ATOMIC_RELAXED);
    out->lingered = __atomic_load_n(&g->lingered, __ATOMIC_RELAXED);
    out->linger_refused = __atomic_load_n(&g->linger_refused, __ATOMIC_RELAXED);
    pthread_mutex_lock(&g->conns_lock);
    out->open = g->open;
    pthread_mutex_unlock(&g->conns_lock);
}

void conn_client_address(struct MHD_Connection *conn, char out[CONN_ADDRESS_LEN]) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci ? ci->client_addr : NULL;
    socklen_t len = !sa                         ? 0
                    : sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                : sizeof(struct sockaddr_in);
    if (!sa || getnameinfo(sa, len, out, CONN_ADDRESS_LEN, NULL, 0, NI_NUMERICHOST) != 0)
        snprintf(out, CONN_ADDRESS_LEN, "unknown");
}
