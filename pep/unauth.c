/*
 * unauth.c — refusals without a credential, counted per address (see unauth.h).
 *
 * An open-addressed table of UNAUTH_MAX_SOURCES slots (linear probing, deletion by
 * backward shift so no tombstones build up), plus the shared "other" window used when
 * the table is full.  Invariant: a slot is in use iff its source is non-empty.
 */
#include "pep/unauth.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct unauth_slot {
    char source[UNAUTH_SOURCE_LEN]; /* "" = free */
    int64_t started_us, window_us;
    int64_t refusals; /* in this window, limited ones included */
    int64_t limited;
};

struct unauth_limiter {
    pthread_mutex_t lock; /* guards everything below */
    struct unauth_slot slots[UNAUTH_MAX_SOURCES];
    size_t used;
    struct unauth_slot other; /* the window shared by addresses that found the table full */
};

struct unauth_limiter *unauth_new(void) {
    struct unauth_limiter *l = calloc(1, sizeof *l);
    if (l) pthread_mutex_init(&l->lock, NULL);
    return l;
}

void unauth_free(struct unauth_limiter *l) {
    if (!l) return;
    pthread_mutex_destroy(&l->lock);
    free(l);
}

static size_t slot_hash(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return (size_t)(h % UNAUTH_MAX_SOURCES);
}

/* The slot of source, or a free slot for it (NULL when the table is full). */
static struct unauth_slot *slot_find(struct unauth_limiter *l, const char *source) {
    for (size_t i = slot_hash(source), n = 0; n < UNAUTH_MAX_SOURCES;
         i = (i + 1) % UNAUTH_MAX_SOURCES, n++) {
        struct unauth_slot *s = &l->slots[i];
        if (!s->source[0] || strcmp(s->source, source) == 0) return s;
    }
    return NULL;
}

/* Frees slot i and shifts back the entries of its probe run that hashed before the hole,
 * so that every entry stays reachable from its hash without tombstones. */
static void slot_remove(struct unauth_limiter *l, size_t i) {
    l->slots[i].source[0] = '\0';
    l->used--;
    for (size_t j = (i + 1) % UNAUTH_MAX_SOURCES; l->slots[j].source[0];
         j = (j + 1) % UNAUTH_MAX_SOURCES) {
        size_t home = slot_hash(l->slots[j].source);
        /* Entry j may fill hole i when i lies cyclically in [home, j). */
        bool movable = (j > i) ? (home <= i || home > j) : (home <= i && home > j);
        if (movable) {
            l->slots[i] = l->slots[j];
            l->slots[j].source[0] = '\0';
            i = j;
        }
    }
}

static void window_open(struct unauth_slot *s, int64_t window_ms, int64_t now_us) {
    s->started_us = now_us;
    s->window_us = window_ms * 1000;
    s->refusals = 0;
    s->limited = 0;
}

struct unauth_verdict unauth_refused(struct unauth_limiter *l, const char *source, int64_t limit,
                                     int64_t window_ms, int64_t now_us) {
    struct unauth_verdict v = {0};
    pthread_mutex_lock(&l->lock);
    struct unauth_slot *s = slot_find(l, source);
    if (s && !s->source[0]) {
        snprintf(s->source, sizeof s->source, "%s", source);
        l->used++;
        window_open(s, window_ms, now_us);
    } else if (!s) {
        s = &l->other;
        if (!s->source[0]) {
            snprintf(s->source, sizeof s->source, "other");
            window_open(s, window_ms, now_us);
        }
    }
    /* A window that ended without limiting anything is simply reopened; one that limited
     * refusals stays until unauth_flush has handed its count out, and counts on. */
    if (now_us - s->started_us >= s->window_us && s->limited == 0)
        window_open(s, window_ms, now_us);
    if (++s->refusals > limit) {
        v.limited = true;
        v.first_limited = ++s->limited == 1;
        int64_t left_us = s->started_us + s->window_us - now_us;
        v.retry_after_s = left_us > 0 ? (left_us + 999999) / 1000000 : 1;
    }
    pthread_mutex_unlock(&l->lock);
    return v;
}

size_t unauth_flush(struct unauth_limiter *l, int64_t now_us, bool all,
                    void (*emit)(void *arg, const struct unauth_window *w), void *arg) {
    struct unauth_window out[64];
    size_t emitted = 0;
    bool more = true;
    while (more) { /* in rounds of 64, so that emit runs outside the lock */
        size_t n = 0;
        more = false;
        pthread_mutex_lock(&l->lock);
        for (size_t i = 0; i <= UNAUTH_MAX_SOURCES && (l->used > 0 || l->other.source[0]);) {
            struct unauth_slot *s = i < UNAUTH_MAX_SOURCES ? &l->slots[i] : &l->other;
            bool ended = s->source[0] && (all || now_us - s->started_us >= s->window_us);
            if (!ended) {
                i++;
                continue;
            }
            if (s->limited > 0) {
                if (n == PEP_ARRAY_LEN(out)) {
                    more = true;
                    break;
                }
                struct unauth_window *w = &out[n++];
                snprintf(w->source, sizeof w->source, "%s", s->source);
                w->count = s->limited;
                w->started_us = s->started_us;
                w->ended_us = s->started_us + s->window_us;
            }
            if (s == &l->other) {
                s->source[0] = '\0';
                i++;
            } else {
                slot_remove(l, i); /* an entry may have moved into i: look at i again */
            }
        }
        pthread_mutex_unlock(&l->lock);
        for (size_t k = 0; k < n; k++)
            emit(arg, &out[k]);
        emitted += n;
    }
    return emitted;
}
