/*
 * rawup.c — a lenient raw TCP upstream (see rawup.h): one thread, poll() over the
 * listening socket and at most RAWUP_MAX_CONNS connections.
 */
#include "tests/integration/rawup.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define RAWUP_MAX_CONNS 64

struct rawup_conn {
    int fd;
    char *buf;
    size_t len, cap;
};

struct rawup {
    pthread_t thread;
    int listen_fd;
    bool stop;            /* atomic */
    pthread_mutex_t lock; /* guards everything below */
    struct rawup_request requests[RAWUP_MAX_REQUESTS];
    size_t requests_len;
    char *answer;
    size_t answer_len;
    bool close_after;
    int drop_next;
};

/* Length of the line terminator at p (CRLF, CR or LF), 0 if none. */
static size_t eol_at(const char *p, const char *end) {
    if (p >= end) return 0;
    if (*p == '\r') return (p + 1 < end && p[1] == '\n') ? 2 : 1;
    return *p == '\n' ? 1 : 0;
}

/* Parses one whole request at the start of c->buf, leniently.  Returns the bytes it took
 * (head and body) and fills *req, or 0 when more bytes are needed. */
static size_t parse_request(const struct rawup_conn *c, struct rawup_request *req) {
    const char *p = c->buf, *end = c->buf + c->len;
    memset(req, 0, sizeof *req);
    size_t content_length = 0;
    for (;;) {
        const char *line = p;
        while (p < end && !eol_at(p, end))
            p++;
        size_t t = eol_at(p, end);
        /* A lone CR at the end of what arrived may be the start of a CRLF: wait. */
        if (!t || (t == 1 && *p == '\r' && p + 1 == end)) goto more;
        size_t n = (size_t)(p - line);
        p += t;
        if (n == 0) {
            if (req->lines_len == 0) continue; /* blank lines before a request */
            break;
        }
        if (req->lines_len < RAWUP_MAX_LINES) req->lines[req->lines_len++] = strndup(line, n);
        if (n > 15 && strncasecmp(line, "Content-Length:", 15) == 0)
            content_length = strtoul(line + 15, NULL, 10);
    }
    if ((size_t)(end - p) < content_length) goto more;
    req->body_len = content_length;
    return (size_t)(p - c->buf) + content_length;
more:
    rawup_request_free(req);
    return 0;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return;
        p += k;
        n -= (size_t)k;
    }
}

/* Reads what arrived; records and answers every whole request.  false: close it. */
static bool conn_readable(struct rawup *u, struct rawup_conn *c) {
    if (c->cap - c->len < 4096) {
        size_t cap = c->cap ? c->cap * 2 : 65536;
        char *grown = realloc(c->buf, cap);
        if (!grown) return false;
        c->buf = grown;
        c->cap = cap;
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n <= 0) return n < 0 && errno == EINTR;
    c->len += (size_t)n;
    struct rawup_request req;
    size_t used;
    while ((used = parse_request(c, &req)) > 0) {
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        pthread_mutex_lock(&u->lock);
        if (u->requests_len < RAWUP_MAX_REQUESTS)
            u->requests[u->requests_len++] = req;
        else
            rawup_request_free(&req);
        if (u->drop_next > 0) {
            u->drop_next--;
            pthread_mutex_unlock(&u->lock);
            return false;
        }
        char *answer = u->answer_len ? malloc(u->answer_len) : NULL;
        size_t answer_len = answer ? u->answer_len : 0;
        if (answer) memcpy(answer, u->answer, answer_len);
        bool close_after = u->close_after;
        pthread_mutex_unlock(&u->lock);
        send_all(c->fd, answer, answer_len);
        free(answer);
        if (close_after) return false;
    }
    return true;
}

static void *rawup_main(void *arg) {
    struct rawup *u = arg;
    struct rawup_conn conns[RAWUP_MAX_CONNS];
    size_t nconns = 0;
    while (!__atomic_load_n(&u->stop, __ATOMIC_ACQUIRE)) {
        struct pollfd pfds[RAWUP_MAX_CONNS + 1];
        pfds[0] = (struct pollfd){.fd = u->listen_fd, .events = POLLIN};
        for (size_t i = 0; i < nconns; i++)
            pfds[i + 1] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
        if (poll(pfds, nconns + 1, 50) <= 0) continue;
        for (size_t i = nconns; i-- > 0;) {
            if (!(pfds[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            if (conn_readable(u, &conns[i])) continue;
            close(conns[i].fd);
            free(conns[i].buf);
            conns[i] = conns[--nconns];
        }
        if (pfds[0].revents & POLLIN) {
            int fd = accept(u->listen_fd, NULL, NULL);
            if (fd >= 0 && nconns < RAWUP_MAX_CONNS)
                conns[nconns++] = (struct rawup_conn){.fd = fd};
            else if (fd >= 0)
                close(fd);
        }
    }
    for (size_t i = 0; i < nconns; i++) {
        close(conns[i].fd);
        free(conns[i].buf);
    }
    return NULL;
}

struct rawup *rawup_start(char *url, size_t cap) {
    struct rawup *u = calloc(1, sizeof *u);
    if (!u) return NULL;
    pthread_mutex_init(&u->lock, NULL);
    u->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (u->listen_fd < 0 || bind(u->listen_fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        listen(u->listen_fd, 64) != 0 ||
        getsockname(u->listen_fd, (struct sockaddr *)&sa, &len) != 0 ||
        pthread_create(&u->thread, NULL, rawup_main, u) != 0) {
        if (u->listen_fd >= 0) close(u->listen_fd);
        free(u);
        return NULL;
    }
    snprintf(url, cap, "http://127.0.0.1:%u", (unsigned)ntohs(sa.sin_port));
    return u;
}

void rawup_stop(struct rawup *u) {
    if (!u) return;
    __atomic_store_n(&u->stop, true, __ATOMIC_RELEASE);
    pthread_join(u->thread, NULL);
    close(u->listen_fd);
    rawup_reset(u);
    free(u->answer);
    pthread_mutex_destroy(&u->lock);
    free(u);
}

void rawup_script(struct rawup *u, const void *answer, size_t len, bool close_after) {
    char *copy = malloc(len ? len : 1);
    if (copy) memcpy(copy, answer, len);
    pthread_mutex_lock(&u->lock);
    free(u->answer);
    u->answer = copy;
    u->answer_len = copy ? len : 0;
    u->close_after = close_after;
    pthread_mutex_unlock(&u->lock);
}

void rawup_drop_next(struct rawup *u, int n) {
    pthread_mutex_lock(&u->lock);
    u->drop_next = n;
    pthread_mutex_unlock(&u->lock);
}

void rawup_reset(struct rawup *u) {
    pthread_mutex_lock(&u->lock);
    for (size_t i = 0; i < u->requests_len; i++)
        rawup_request_free(&u->requests[i]);
    u->requests_len = 0;
    pthread_mutex_unlock(&u->lock);
}

size_t rawup_count(struct rawup *u) {
    pthread_mutex_lock(&u->lock);
    size_t n = u->requests_len;
    pthread_mutex_unlock(&u->lock);
    return n;
}

bool rawup_get(struct rawup *u, size_t i, struct rawup_request *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&u->lock);
    bool ok = i < u->requests_len;
    if (ok) {
        const struct rawup_request *r = &u->requests[i];
        for (size_t k = 0; k < r->lines_len; k++)
            out->lines[out->lines_len++] = strdup(r->lines[k]);
        out->body_len = r->body_len;
    }
    pthread_mutex_unlock(&u->lock);
    return ok;
}

void rawup_request_free(struct rawup_request *r) {
    for (size_t i = 0; i < r->lines_len; i++)
        free(r->lines[i]);
    memset(r, 0, sizeof *r);
}

const char *rawup_header(const struct rawup_request *r, const char *name, size_t *count) {
    const char *found = NULL;
    size_t n = 0, name_len = strlen(name);
    for (size_t i = 1; i < r->lines_len; i++) {
        const char *l = r->lines[i];
        if (strncasecmp(l, name, name_len) != 0 || l[name_len] != ':') continue;
        n++;
        if (!found) {
            found = l + name_len + 1;
            while (*found == ' ' || *found == '\t')
                found++;
        }
    }
    if (count) *count = n;
    return found;
}
