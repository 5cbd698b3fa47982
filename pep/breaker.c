/*
 * breaker.c — circuit breakers: the pure state machine and the per-name registry (see
 * breaker.h for the semantics and the decisions made).
 *
 * Invariants of a struct breaker_state (asserted where they matter):
 *   - probes_in_flight and probe_successes are 0 unless kind is HALF_OPEN, and
 *     probes_in_flight only counts PROBE tickets of the current period;
 *   - ring bucket starts increase from head + 1 (oldest) to head (newest): a new bucket
 *     always replaces the oldest one;
 *   - with one bucket width w = ⌈window / BREAKER_BUCKETS⌉, every bucket that still counts
 *     (now < start + window) has a distinct start in (now − BUCKETS·w, now], so at most
 *     BREAKER_BUCKETS of them exist and the ring never overwrites one that counts.
 * The counts are summed over the ring on demand (10 buckets): no running totals to drift.
 *
 * Registry locks: bs->lock (read-write) guards the name map and the listing; b->lock
 * guards one breaker's cfg, configured and st.  Order: bs->lock before b->lock.  Neither is
 * held while on_transition runs: transitions are collected under the locks and reported
 * after.  No clock is read in this file.
 */
#include "pep/breaker.h"
#include "pep/strmap.h"
#include "pep/util.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- pure core ------------------------------------------------------------------------ */

const char *breaker_state_name(enum breaker_state_kind kind) {
    switch (kind) {
    case BREAKER_CLOSED:
        return "closed";
    case BREAKER_OPEN:
        return "open";
    case BREAKER_HALF_OPEN:
        return "half_open";
    }
    return "unknown";
}

static int64_t bucket_width(const struct breaker_config *cfg) {
    assert(cfg->window_ms >= 1);
    return (cfg->window_ms - 1) / BREAKER_BUCKETS + 1;
}

void breaker_core_init(struct breaker_state *st, int64_t now_ms, bool keep_period) {
    uint32_t period = keep_period ? st->period + 1 : 0;
    memset(st, 0, sizeof *st);
    st->kind = BREAKER_CLOSED;
    st->since_ms = now_ms;
    st->period = period;
}

static void enter(struct breaker_state *st, enum breaker_state_kind kind, int64_t since_ms) {
    st->kind = kind;
    st->since_ms = since_ms;
    st->period++;
    st->probes_in_flight = 0;
    st->probe_successes = 0;
}

/* Counts one SUCCESS or FAILURE in the bucket of now_ms, starting a bucket if its width
 * has passed since the newest one started.  A now_ms older than the newest bucket (a
 * thread that read the clock before another) lands in the newest bucket. */
static void window_add(struct breaker_state *st, const struct breaker_config *cfg, int64_t now_ms,
                       bool failure) {
    assert(now_ms >= 0);
    int64_t w = bucket_width(cfg);
    struct breaker_bucket *bk = &st->ring[st->head];
    if (now_ms - bk->start_ms >= w) {
        st->head = (st->head + 1) % BREAKER_BUCKETS;
        bk = &st->ring[st->head];
        *bk = (struct breaker_bucket){.start_ms = now_ms - now_ms % w};
    }
    bk->requests++;
    bk->failures += failure;
}

void breaker_core_counts(const struct breaker_state *st, const struct breaker_config *cfg,
                         int64_t now_ms, int64_t *requests, int64_t *failures) {
    int64_t r = 0, f = 0;
    for (unsigned i = 0; i < BREAKER_BUCKETS; i++) {
        const struct breaker_bucket *bk = &st->ring[i];
        /* now − start rather than start + window: no overflow for any window */
        if (bk->requests > 0 && now_ms - bk->start_ms < cfg->window_ms) {
            r += bk->requests;
            f += bk->failures;
        }
    }
    *requests = r;
    *failures = f;
}

static bool should_open(const struct breaker_state *st, const struct breaker_config *cfg,
                        int64_t now_ms) {
    int64_t requests, failures;
    breaker_core_counts(st, cfg, now_ms, &requests, &failures);
    if (failures == 0) return false;
    if (failures >= cfg->failure_threshold) return true;
    /* A division, not failures >= rate·requests: 3/10 rounds to the same double as the
     * literal 0.3, while 0.3·10 rounds above 3. */
    return requests >= cfg->min_requests &&
           (double)failures / (double)requests >= cfg->failure_rate;
}

enum breaker_transition breaker_core_observe(struct breaker_state *st,
                                             const struct breaker_config *cfg, int64_t now_ms) {
    if (st->kind != BREAKER_OPEN || now_ms - st->since_ms < cfg->open_for_ms)
        return BREAKER_UNCHANGED;
    /* half-open since open_for ran out, however late we notice; no overflow: since_ms +
     * open_for_ms ≤ now_ms */
    enter(st, BREAKER_HALF_OPEN, st->since_ms + cfg->open_for_ms);
    return BREAKER_TO_HALF_OPEN;
}

enum breaker_transition breaker_core_admit(struct breaker_state *st,
                                           const struct breaker_config *cfg, int64_t now_ms,
                                           struct breaker_ticket *ticket) {
    enum breaker_transition t = breaker_core_observe(st, cfg, now_ms);
    *ticket = (struct breaker_ticket){.admission = BREAKER_ALLOW, .period = st->period};
    switch (st->kind) {
    case BREAKER_CLOSED:
        break;
    case BREAKER_OPEN:
        ticket->admission = BREAKER_DENY;
        ticket->half_open_in_ms = cfg->open_for_ms - (now_ms - st->since_ms);
        assert(ticket->half_open_in_ms >= 1);
        break;
    case BREAKER_HALF_OPEN:
        assert(st->probes_in_flight >= 0);
        if (st->probes_in_flight < cfg->half_open_probes) {
            st->probes_in_flight++;
            ticket->admission = BREAKER_PROBE;
        } else {
            ticket->admission = BREAKER_DENY; /* half_open_in_ms 0: it is half-open now */
        }
        break;
    }
    return t;
}

enum breaker_transition breaker_core_record(struct breaker_state *st,
                                            const struct breaker_config *cfg,
                                            const struct breaker_ticket *ticket,
                                            enum breaker_result result, int64_t now_ms) {
    if (ticket->admission == BREAKER_DENY) return BREAKER_UNCHANGED;
    /* The period changes at every transition, so a matching PROBE means half-open still */
    bool probe = ticket->admission == BREAKER_PROBE && ticket->period == st->period;
    bool counted = result == BREAKER_SUCCESS || result == BREAKER_FAILURE;
    if (probe) {
        assert(st->kind == BREAKER_HALF_OPEN && st->probes_in_flight > 0);
        st->probes_in_flight--;
    }
    if (counted) window_add(st, cfg, now_ms, result == BREAKER_FAILURE);

    if (probe && result == BREAKER_FAILURE) {
        enter(st, BREAKER_OPEN, now_ms);
        return BREAKER_TO_OPEN;
    }
    if (probe && result == BREAKER_SUCCESS && ++st->probe_successes >= cfg->success_threshold) {
        enter(st, BREAKER_CLOSED, now_ms);
        for (unsigned i = 0; i < BREAKER_BUCKETS; i++) /* a fresh start */
            st->ring[i].requests = st->ring[i].failures = 0;
        return BREAKER_TO_CLOSED;
    }
    if (!probe && counted && st->kind == BREAKER_CLOSED && should_open(st, cfg, now_ms)) {
        enter(st, BREAKER_OPEN, now_ms);
        return BREAKER_TO_OPEN;
    }
    return BREAKER_UNCHANGED;
}

enum breaker_result breaker_classify(const struct breaker_config *cfg, bool transport_error,
                                     int status) {
    /* Past 599 (or below 100) is an answer pep cannot relay: a connect_error (SPEC 8) */
    if (transport_error || status < 100 || status >= 500) return BREAKER_FAILURE;
    if (status == 429) return cfg && cfg->count_429 ? BREAKER_FAILURE : BREAKER_NEUTRAL;
    if (status >= 400) return BREAKER_NEUTRAL;
    return BREAKER_SUCCESS;
}

/* ---- registry ------------------------------------------------------------------------- */

struct breaker {
    pthread_mutex_t lock; /* guards cfg, configured and st */
    char *name;           /* immutable (the map holds its own copy as key) */
    struct breakers *owner;
    struct breaker_config cfg; /* the upstream's, as of the last sync that listed it */
    bool configured;           /* cfg.present: an inert breaker otherwise */
    struct breaker_state st;
};

struct breakers {
    pthread_rwlock_t lock;   /* guards by_name, listed and listed_len */
    struct strmap *by_name;  /* name → struct breaker *, every name ever synced */
    struct breaker **listed; /* the last synced policy's upstreams, in its order */
    size_t listed_len;
    breaker_transition_fn on_transition;
    void *arg;
};

/* A transition seen under a lock, reported once the locks are released. */
struct moved {
    const char *name;
    enum breaker_state_kind from, to;
};

static void report(const struct breakers *bs, const struct moved *m, int64_t now_ms) {
    if (bs->on_transition && m->from != m->to)
        bs->on_transition(bs->arg, m->name, m->from, m->to, now_ms);
}

static void breaker_destroy(void *v) {
    struct breaker *b = v;
    pthread_mutex_destroy(&b->lock);
    free(b->name);
    free(b);
}

static struct breaker *breaker_create(struct breakers *bs, const char *name, int64_t now_ms) {
    struct breaker *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    if (!(b->name = strdup(name)) || pthread_mutex_init(&b->lock, NULL) != 0) {
        free(b->name);
        free(b);
        return NULL;
    }
    b->owner = bs;
    breaker_core_init(&b->st, now_ms, false);
    return b;
}

struct breakers *breakers_new(breaker_transition_fn on_transition, void *arg) {
    struct breakers *bs = calloc(1, sizeof *bs);
    if (!bs) return NULL;
    if (!(bs->by_name = strmap_new())) goto fail;
    if (pthread_rwlock_init(&bs->lock, NULL) != 0) {
        strmap_free(bs->by_name, NULL);
        goto fail;
    }
    bs->on_transition = on_transition;
    bs->arg = arg;
    return bs;
fail:
    free(bs);
    return NULL;
}

void breakers_free(struct breakers *bs) {
    if (!bs) return;
    strmap_free(bs->by_name, breaker_destroy);
    free(bs->listed);
    pthread_rwlock_destroy(&bs->lock);
    free(bs);
}

int breakers_sync(struct breakers *bs, const struct policy *p, int64_t now_ms) {
    size_t n = p->upstreams_len;
    /* Everything that can fail comes first, so a failure changes no config or listing;
     * breakers it created stay in the map, unlisted and inert. */
    struct breaker **list = calloc(n ? n : 1, sizeof *list);
    struct moved *moved = calloc(n ? n : 1, sizeof *moved);
    size_t moved_len = 0;
    bool ok = list && moved;
    pthread_rwlock_wrlock(&bs->lock);
    for (size_t i = 0; ok && i < n; i++) {
        const char *name = p->upstreams[i].name;
        if ((list[i] = strmap_get(bs->by_name, name))) continue;
        ok = (list[i] = breaker_create(bs, name, now_ms)) != NULL;
        if (ok && strmap_put(bs->by_name, name, list[i], NULL) != 0) {
            breaker_destroy(list[i]);
            ok = false;
        }
    }
    if (!ok) {
        pthread_rwlock_unlock(&bs->lock);
        free(list);
        free(moved);
        return PEP_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        struct breaker *b = list[i];
        const struct breaker_config *cfg = &p->upstreams[i].breaker;
        pthread_mutex_lock(&b->lock);
        if (b->configured && !cfg->present && b->st.kind != BREAKER_CLOSED)
            moved[moved_len++] = (struct moved){b->name, b->st.kind, BREAKER_CLOSED};
        /* Gaining or losing `breaker:` starts afresh; a changed config keeps the counts */
        if (b->configured != cfg->present) breaker_core_init(&b->st, now_ms, true);
        b->cfg = *cfg;
        b->configured = cfg->present;
        pthread_mutex_unlock(&b->lock);
    }
    free(bs->listed);
    bs->listed = list;
    bs->listed_len = n;
    pthread_rwlock_unlock(&bs->lock);
    for (size_t i = 0; i < moved_len; i++)
        report(bs, &moved[i], now_ms);
    free(moved);
    return 0;
}

struct breaker *breakers_get(struct breakers *bs, const char *name) {
    pthread_rwlock_rdlock(&bs->lock);
    struct breaker *b = strmap_get(bs->by_name, name);
    pthread_rwlock_unlock(&bs->lock);
    return b;
}

enum breaker_admission breaker_admit(struct breaker *b, int64_t now_ms,
                                     struct breaker_ticket *ticket) {
    *ticket = (struct breaker_ticket){.admission = BREAKER_ALLOW};
    if (!b) return BREAKER_ALLOW;
    struct moved m = {b->name, BREAKER_CLOSED, BREAKER_CLOSED};
    pthread_mutex_lock(&b->lock);
    if (b->configured) {
        m.from = b->st.kind;
        breaker_core_admit(&b->st, &b->cfg, now_ms, ticket);
        m.to = b->st.kind;
    } else {
        ticket->period = b->st.period;
    }
    pthread_mutex_unlock(&b->lock);
    report(b->owner, &m, now_ms);
    return ticket->admission;
}

void breaker_record(struct breaker *b, const struct breaker_ticket *ticket,
                    enum breaker_result result, int64_t now_ms) {
    if (!b) return;
    struct moved m = {b->name, BREAKER_CLOSED, BREAKER_CLOSED};
    pthread_mutex_lock(&b->lock);
    if (b->configured) { /* without `breaker:` results are dropped */
        m.from = b->st.kind;
        breaker_core_record(&b->st, &b->cfg, ticket, result, now_ms);
        m.to = b->st.kind;
    }
    pthread_mutex_unlock(&b->lock);
    report(b->owner, &m, now_ms);
}

void breaker_peek(struct breaker *b, struct breaker_state *out, bool *configured) {
    pthread_mutex_lock(&b->lock);
    *out = b->st;
    if (configured) *configured = b->configured;
    pthread_mutex_unlock(&b->lock);
}

/* One listed breaker as seen at now_ms. */
struct view {
    const char *name;
    enum breaker_state_kind kind;
    int64_t since_ms, requests, failures;
    bool configured;
};

/* Views of the listed breakers, after making their due open → half_open moves (reported
 * here, with no lock held).  Returns a malloc'd array the caller frees, or NULL. */
static struct view *breakers_views(struct breakers *bs, int64_t now_ms, size_t *len) {
    pthread_rwlock_rdlock(&bs->lock);
    size_t n = bs->listed_len;
    struct view *v = calloc(n ? n : 1, sizeof *v);
    struct moved *moved = calloc(n ? n : 1, sizeof *moved);
    size_t moved_len = 0;
    for (size_t i = 0; v && moved && i < n; i++) {
        struct breaker *b = bs->listed[i];
        pthread_mutex_lock(&b->lock);
        v[i] = (struct view){b->name, BREAKER_CLOSED, b->st.since_ms, 0, 0, b->configured};
        if (b->configured) {
            if (breaker_core_observe(&b->st, &b->cfg, now_ms) != BREAKER_UNCHANGED)
                moved[moved_len++] = (struct moved){b->name, BREAKER_OPEN, BREAKER_HALF_OPEN};
            v[i].kind = b->st.kind;
            v[i].since_ms = b->st.since_ms;
            breaker_core_counts(&b->st, &b->cfg, now_ms, &v[i].requests, &v[i].failures);
        }
        pthread_mutex_unlock(&b->lock);
    }
    pthread_rwlock_unlock(&bs->lock);
    for (size_t i = 0; i < moved_len; i++)
        report(bs, &moved[i], now_ms);
    if (!v || !moved) { /* the views may be half made */
        free(v);
        free(moved);
        return NULL;
    }
    free(moved);
    *len = n;
    return v;
}

json_t *breakers_json(struct breakers *bs, int64_t now_ms, int64_t now_wall_us) {
    size_t n = 0;
    struct view *v = breakers_views(bs, now_ms, &n);
    json_t *root = json_object(), *list = json_array();
    bool ok = v && root && list && json_object_set(root, "upstreams", list) == 0;
    for (size_t i = 0; ok && i < n; i++) {
        char since[32];
        pep_format_rfc3339_us(now_wall_us - (now_ms - v[i].since_ms) * 1000, since);
        json_t *u = json_pack("{s:s, s:s, s:s, s:I, s:I, s:b}", "name", v[i].name, "state",
                              breaker_state_name(v[i].kind), "since", since, "requests",
                              (json_int_t)v[i].requests, "failures", (json_int_t)v[i].failures,
                              "breaker", (int)v[i].configured);
        ok = u && json_array_append_new(list, u) == 0;
    }
    json_decref(list); /* root holds it */
    free(v);
    if (!ok) {
        json_decref(root);
        return NULL;
    }
    return root;
}

int breakers_foreach(struct breakers *bs, int64_t now_ms,
                     void (*fn)(void *arg, const char *name, enum breaker_state_kind state,
                                bool configured),
                     void *arg) {
    size_t n = 0;
    struct view *v = breakers_views(bs, now_ms, &n);
    if (!v) return PEP_ENOMEM;
    for (size_t i = 0; i < n; i++)
        fn(arg, v[i].name, v[i].kind, v[i].configured);
    free(v);
    return 0;
}
