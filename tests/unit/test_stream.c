/*
 * test_stream.c — the streaming pipe (pep/stream.c): order across the ring's wrap, all or
 * nothing writes, backpressure both ways (want_more after a refused write, park/unpark on
 * an empty ring), the two ways a stream ends, a reader that left; and 8 MiB streamed
 * between two threads with a small read size, byte for byte, never holding more than the
 * ring.
 */
#include "pep/stream.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

struct side {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int parks, unparks, want_more;
    bool parked;
};

static void on_park(void *arg) {
    struct side *s = arg;
    pthread_mutex_lock(&s->lock);
    s->parks++;
    s->parked = true;
    pthread_mutex_unlock(&s->lock);
}

static void on_unpark(void *arg) {
    struct side *s = arg;
    pthread_mutex_lock(&s->lock);
    s->unparks++;
    s->parked = false;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static void on_want_more(void *arg) {
    struct side *s = arg;
    pthread_mutex_lock(&s->lock);
    s->want_more++;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static struct stream_pipe *new_pipe(struct side *s) {
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    struct stream_pipe_hooks h = {on_park, on_unpark, on_want_more, s};
    struct stream_pipe *p = stream_pipe_new(&h);
    assert_non_null(p);
    return p;
}

static void test_order_wrap_and_full(void **state) {
    (void)state;
    struct side s;
    struct stream_pipe *p = new_pipe(&s);
    static char chunk[1000], out[STREAM_PIPE_CAPACITY];
    size_t written = 0, read = 0;
    /* fill, drain part, fill again across the wrap, drain all: bytes come out in order */
    for (int round = 0; round < 5; round++) {
        for (;;) {
            for (size_t i = 0; i < sizeof chunk; i++)
                chunk[i] = (char)((written + i) * 7);
            size_t rc = stream_pipe_write(p, chunk, sizeof chunk);
            if (rc == STREAM_PIPE_FULL) break;
            assert_int_equal(rc, sizeof chunk);
            written += rc;
        }
        ssize_t n = stream_pipe_read(p, out, round % 2 ? 3000 : sizeof out);
        assert_true(n > 0);
        for (ssize_t i = 0; i < n; i++)
            assert_int_equal(out[i], (char)((read + (size_t)i) * 7));
        read += (size_t)n;
    }
    assert_int_equal(s.want_more, 5); /* each refused write, then room: one call */
    assert_int_equal(s.parks, 0);
    while (read < written) {
        ssize_t n = stream_pipe_read(p, out, 777);
        assert_true(n > 0);
        for (ssize_t i = 0; i < n; i++)
            assert_int_equal(out[i], (char)((read + (size_t)i) * 7));
        read += (size_t)n;
    }
    assert_int_equal(stream_pipe_delivered(p), written);
    stream_pipe_free(p);
}

static void test_park_unpark_and_ends(void **state) {
    (void)state;
    struct side s;
    char buf[16];
    struct stream_pipe *p = new_pipe(&s);
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), 0); /* empty: parked */
    assert_int_equal(s.parks, 1);
    assert_int_equal(stream_pipe_write(p, "data", 4), 4); /* wakes it */
    assert_int_equal(s.unparks, 1);
    assert_int_equal(stream_pipe_write(p, "more", 4), 4); /* not parked: no second wake */
    assert_int_equal(s.unparks, 1);
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), 8);
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), 0);
    stream_pipe_close(p, true); /* the end wakes a parked reader too */
    assert_int_equal(s.unparks, 2);
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), STREAM_PIPE_END);
    stream_pipe_free(p);

    p = new_pipe(&s);
    assert_int_equal(stream_pipe_write(p, "x", 1), 1);
    stream_pipe_close(p, false);
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), 1); /* what came is delivered */
    assert_int_equal(stream_pipe_read(p, buf, sizeof buf), STREAM_PIPE_ABORTED);
    stream_pipe_free(p);

    p = new_pipe(&s);
    static char big[STREAM_PIPE_CAPACITY];
    assert_int_equal(stream_pipe_write(p, big, sizeof big), sizeof big);
    assert_int_equal(stream_pipe_write(p, "y", 1), STREAM_PIPE_FULL);
    stream_pipe_reader_gone(p); /* a paused writer is told, and then refused */
    assert_int_equal(s.want_more, 1);
    assert_int_equal(stream_pipe_write(p, "y", 1), 0);
    stream_pipe_free(p);
}

/* ---- two threads ------------------------------------------------------------------------ */

#define TOTAL (8u * 1024 * 1024)

struct run {
    struct side s;
    struct stream_pipe *p;
    uint64_t bad;
};

static void *writer(void *arg) {
    struct run *r = arg;
    static char chunk[16384];
    size_t sent = 0;
    unsigned seed = 7;
    while (sent < TOTAL) {
        size_t n = 1 + (size_t)rand_r(&seed) % sizeof chunk;
        if (n > TOTAL - sent) n = TOTAL - sent;
        for (size_t i = 0; i < n; i++)
            chunk[i] = (char)((sent + i) % 251);
        size_t rc;
        for (;;) {
            /* read the count before writing: a want_more between the refused write and
             * the wait must not be missed (the forwarder keeps a flag for the same reason) */
            pthread_mutex_lock(&r->s.lock);
            int seen = r->s.want_more;
            pthread_mutex_unlock(&r->s.lock);
            if ((rc = stream_pipe_write(r->p, chunk, n)) != STREAM_PIPE_FULL) break;
            pthread_mutex_lock(&r->s.lock); /* a paused transfer: wait for want_more */
            while (r->s.want_more == seen)
                pthread_cond_wait(&r->s.cond, &r->s.lock);
            pthread_mutex_unlock(&r->s.lock);
        }
        assert_int_equal(rc, n);
        sent += n;
    }
    stream_pipe_close(r->p, true);
    return NULL;
}

static void test_threads_byte_for_byte(void **state) {
    (void)state;
    struct run r = {0};
    r.p = new_pipe(&r.s);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, writer, &r), 0);
    char buf[1500];
    uint64_t got = 0;
    for (;;) {
        ssize_t n = stream_pipe_read(r.p, buf, sizeof buf);
        if (n == STREAM_PIPE_END) break;
        assert_true(n >= 0);
        if (n == 0) { /* parked: a suspended connection waits to be resumed */
            pthread_mutex_lock(&r.s.lock);
            while (r.s.parked)
                pthread_cond_wait(&r.s.cond, &r.s.lock);
            pthread_mutex_unlock(&r.s.lock);
            continue;
        }
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != (char)((got + (uint64_t)i) % 251)) r.bad++;
        got += (uint64_t)n;
    }
    pthread_join(t, NULL);
    assert_int_equal(got, TOTAL);
    assert_int_equal(r.bad, 0);
    stream_pipe_free(r.p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order_wrap_and_full),
        cmocka_unit_test(test_park_unpark_and_ends),
        cmocka_unit_test(test_threads_byte_for_byte),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
