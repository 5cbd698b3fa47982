/*
 * metrics.c — Prometheus counters, gauges and histograms (SPEC 7); see metrics.h.
 *
 * The idea: every label value a series can carry is known before the first request.
 * Policy names (actions, upstreams, chains) become series in metrics_sync; everything
 * else is a fixed table (codes, outcomes, states, steps).  A series is one struct holding
 * all of its name's counters (a flat array of atomics, laid out per kind below), so a
 * count is: find the name's series, add 1 to one cell.
 *
 * Names are found in one insert-only open-addressing hash table per kind.  Nothing is
 * ever removed (counters are cumulative), so readers need no lock: a slot, once written
 * (release, after the series is complete), never changes, and a reader that sees NULL
 * stops there.  The table is at most half full, so a probe always meets a NULL.  When an
 * insert would pass half, sync builds a table twice the size and publishes it by pointer;
 * readers still walking the old one stay safe because old tables are kept, on a list
 * freed with the metrics (their total is below the live table's size: geometric growth).
 *
 * Invariants:
 *   - A series and its name live until metrics_free; render may hold pointers to them
 *     after dropping the lock.
 *   - kind->table changes, and slots are written, only under m->lock.
 *   - Histogram buckets are stored per bucket (not cumulative); render accumulates them,
 *     so `_bucket{le="+Inf"}` and `_count` are the same sum and buckets never decrease.
 *
 * Threads: counting from any thread, lock-free; sync and render under m->lock.
 */
#include "pep/metrics.h"

#include <assert.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- fixed label sets ------------------------------------------------------------------ */

/* SPEC 3.3's codes, `ok` (allow) and `stream_aborted` (SPEC 8 outcome records).  `ok`
 * first: the common case costs one comparison. */
static const char *const metrics_codes[] = {
    "ok",
    "bad_request",
    "invalid_token",
    "insufficient_user_authentication",
    "tenant_mismatch",
    "insufficient_scope",
    "denied_by_rule",
    "approval_required",
    "approval_denied",
    "approval_invalid",
    "no_route",
    "idempotency_in_progress",
    "idempotency_mismatch",
    "invalid_policy",
    "body_too_large",
    "rate_limited",
    "upstream_auth_failed",
    "upstream_unavailable",
    "audit_unavailable",
    "deadline_exceeded",
    "stream_aborted",
};
#define METRICS_CODES (PEP_ARRAY_LEN(metrics_codes) + 1) /* + other */

static const char *const metrics_outcomes[METRICS_OUTCOME_COUNT] = {
    "2xx", "3xx", "4xx", "5xx", "timeout", "idle_timeout", "connect_error", "stream_aborted"};
static const char *const metrics_breaker_states[METRICS_BREAKER_COUNT] = {"closed", "open",
                                                                          "half_open"};
static const char *const metrics_approval_states[METRICS_APPROVAL_COUNT] = {
    "pending", "approved", "denied", "used", "expired"};

/* ---- series ---------------------------------------------------------------------------- */

/* Cell layout of each kind's series. */
enum {
    /* action: [decision (0 allow, 1 deny)][code] */
    ACTION_CELLS = 2 * METRICS_CODES,
    /* upstream */
    UPSTREAM_ATTEMPTS = 0, /* [outcome] */
    UPSTREAM_RETRIES = METRICS_OUTCOME_COUNT,
    UPSTREAM_TRANSITIONS, /* [to] */
    UPSTREAM_CELLS = UPSTREAM_TRANSITIONS + METRICS_BREAKER_COUNT,
    /* chain */
    CHAIN_FALLBACKS = 0, /* [step]: 0..MAX_STEPS-1, context_overflow, other */
    CHAIN_STEP_OVERFLOW = METRICS_MAX_STEPS,
    CHAIN_STEP_OTHER,
    CHAIN_ESCALATIONS,
    CHAIN_CELLS
};

/* One label value of one kind and its counters. */
struct metrics_series {
    char *name;       /* label value */
    uint64_t hash;    /* of name */
    uint64_t cells[]; /* atomic counters, layout per kind (enum above) */
};

/* An insert-only hash table; see the top of the file. */
struct metrics_table {
    struct metrics_table *retired_next; /* older tables, kept for readers still on them */
    size_t mask;                        /* capacity - 1, capacity a power of two */
    struct metrics_series *slots[];     /* NULL: empty; written once, with release */
};

struct metrics_kind {
    size_t cells;                 /* counters per series */
    struct metrics_table *table;  /* the current one, read with acquire */
    size_t len;                   /* series in table (m->lock) */
    struct metrics_series *other; /* names sync did not register */
};

/* A histogram over integer observations; bounds in the same unit. */
#define METRICS_MAX_BOUNDS 16
struct metrics_histogram {
    const uint64_t *bounds; /* upper bounds (inclusive, `le`), ascending */
    size_t nbounds;
    uint64_t scale;                          /* observations per exposition unit (1e6: µs→s) */
    uint64_t counts[METRICS_MAX_BOUNDS + 1]; /* per bucket, [nbounds] = above the last */
    uint64_t sum;                            /* atomic */
};

/* 100 µs … 10 s. */
static const uint64_t metrics_decision_bounds[] = {
    100,   250,    500,    1000,   2500,    5000,    10000,   25000,
    50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000};
/* 50 µs … 1 s. */
static const uint64_t metrics_fsync_bounds[] = {
    50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000};
static const uint64_t metrics_batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};

struct metrics {
    pthread_mutex_t lock; /* serialises sync and render: table growth, slot writes */
    struct metrics_kind actions, upstreams, chains;
    struct metrics_series *no_route; /* action `none` */
    uint64_t approvals[METRICS_APPROVAL_COUNT];
    uint64_t audit_records;
    struct metrics_histogram decision, fsync, batch;
    metrics_breaker_foreach_fn breaker_foreach; /* m->lock */
    void *breaker_arg;
};

static uint64_t metrics_hash(const char *s) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static struct metrics_series *metrics_series_new(const char *name, size_t cells) {
    struct metrics_series *s = calloc(1, sizeof *s + cells * sizeof s->cells[0]);
    if (!s) return NULL;
    if (!(s->name = strdup(name))) {
        free(s);
        return NULL;
    }
    s->hash = metrics_hash(name);
    return s;
}

static void metrics_series_free(struct metrics_series *s) {
    if (!s) return;
    free(s->name);
    free(s);
}

static struct metrics_table *metrics_table_new(size_t capacity) {
    struct metrics_table *t = calloc(1, sizeof *t + capacity * sizeof t->slots[0]);
    if (t) t->mask = capacity - 1;
    return t;
}

static void metrics_table_put(struct metrics_table *t, struct metrics_series *s) {
    size_t i = s->hash & t->mask;
    while (t->slots[i])
        i = (i + 1) & t->mask;
    __atomic_store_n(&t->slots[i], s, __ATOMIC_RELEASE);
}

/* The series of name, or kind->other: never NULL. */
static struct metrics_series *metrics_find(const struct metrics_kind *k, const char *name) {
    if (!name) return k->other;
    const struct metrics_table *t = __atomic_load_n(&k->table, __ATOMIC_ACQUIRE);
    uint64_t h = metrics_hash(name);
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        struct metrics_series *s = __atomic_load_n(&t->slots[i], __ATOMIC_ACQUIRE);
        if (!s) return k->other;
        if (s->hash == h && strcmp(s->name, name) == 0) return s;
    }
}

static int metrics_kind_init(struct metrics_kind *k, size_t cells) {
    k->cells = cells;
    k->table = metrics_table_new(16);
    k->other = metrics_series_new("other", cells);
    return k->table && k->other ? 0 : PEP_ENOMEM;
}

static void metrics_kind_destroy(struct metrics_kind *k) {
    struct metrics_table *t = k->table;
    for (size_t i = 0; t && i <= t->mask; i++)
        metrics_series_free(t->slots[i]);
    while (t) {
        struct metrics_table *next = t->retired_next;
        free(t);
        t = next;
    }
    metrics_series_free(k->other);
}

/* Registers name (m->lock held).  `reserved` is a label value of a fixed series (other,
 * none) that the name must not duplicate: it then simply shares that series. */
static int metrics_kind_add(struct metrics_kind *k, const char *name, const char *reserved) {
    if (!name || strcmp(name, "other") == 0 || (reserved && strcmp(name, reserved) == 0)) return 0;
    if (metrics_find(k, name) != k->other) return 0;
    struct metrics_table *t = k->table;
    if ((k->len + 1) * 2 > t->mask + 1) {
        struct metrics_table *bigger = metrics_table_new((t->mask + 1) * 2);
        if (!bigger) return PEP_ENOMEM;
        for (size_t i = 0; i <= t->mask; i++)
            if (t->slots[i]) metrics_table_put(bigger, t->slots[i]);
        bigger->retired_next = t;
        __atomic_store_n(&k->table, bigger, __ATOMIC_RELEASE);
        t = bigger;
    }
    struct metrics_series *s = metrics_series_new(name, k->cells);
    if (!s) return PEP_ENOMEM;
    metrics_table_put(t, s);
    k->len++;
    return 0;
}

/* ---- life cycle ------------------------------------------------------------------------ */

static void metrics_histogram_init(struct metrics_histogram *h, const uint64_t *bounds,
                                   size_t nbounds, uint64_t scale) {
    assert(nbounds <= METRICS_MAX_BOUNDS);
    h->bounds = bounds;
    h->nbounds = nbounds;
    h->scale = scale;
}

struct metrics *metrics_new(void) {
    struct metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (pthread_mutex_init(&m->lock, NULL) != 0) {
        free(m);
        return NULL;
    }
    int rc = metrics_kind_init(&m->actions, ACTION_CELLS);
    if (rc == 0) rc = metrics_kind_init(&m->upstreams, UPSTREAM_CELLS);
    if (rc == 0) rc = metrics_kind_init(&m->chains, CHAIN_CELLS);
    if (rc == 0 && !(m->no_route = metrics_series_new("none", ACTION_CELLS))) rc = PEP_ENOMEM;
    if (rc != 0) {
        metrics_free(m);
        return NULL;
    }
    metrics_histogram_init(&m->decision, metrics_decision_bounds,
                           PEP_ARRAY_LEN(metrics_decision_bounds), 1000000);
    metrics_histogram_init(&m->fsync, metrics_fsync_bounds, PEP_ARRAY_LEN(metrics_fsync_bounds),
                           1000000);
    metrics_histogram_init(&m->batch, metrics_batch_bounds, PEP_ARRAY_LEN(metrics_batch_bounds), 1);
    return m;
}

void metrics_free(struct metrics *m) {
    if (!m) return;
    metrics_kind_destroy(&m->actions);
    metrics_kind_destroy(&m->upstreams);
    metrics_kind_destroy(&m->chains);
    metrics_series_free(m->no_route);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

int metrics_sync(struct metrics *m, const struct policy *p) {
    int rc = 0;
    if (!m || !p) return 0;
    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; rc == 0 && i < p->actions_len; i++)
        rc = metrics_kind_add(&m->actions, p->actions[i].name, "none");
    for (size_t i = 0; rc == 0 && i < p->upstreams_len; i++)
        rc = metrics_kind_add(&m->upstreams, p->upstreams[i].name, NULL);
    for (size_t i = 0; rc == 0 && i < p->chains_len; i++)
        rc = metrics_kind_add(&m->chains, p->chains[i].name, NULL);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- counting -------------------------------------------------------------------------- */

static void metrics_inc(uint64_t *cell, uint64_t n) {
    __atomic_fetch_add(cell, n, __ATOMIC_RELAXED);
}

static void metrics_observe(struct metrics_histogram *h, uint64_t v) {
    size_t i = 0;
    while (i < h->nbounds && v > h->bounds[i])
        i++;
    metrics_inc(&h->counts[i], 1);
    metrics_inc(&h->sum, v);
}

static size_t metrics_code_index(const char *code) {
    for (size_t i = 0; code && i < PEP_ARRAY_LEN(metrics_codes); i++)
        if (strcmp(code, metrics_codes[i]) == 0) return i;
    return PEP_ARRAY_LEN(metrics_codes); /* other */
}

enum metrics_outcome metrics_outcome_of_status(int status) {
    if (status < 200 || status > 599) return METRICS_OUTCOME_CONNECT_ERROR;
    return (enum metrics_outcome)(METRICS_OUTCOME_2XX + (status / 100 - 2));
}

void metrics_decision(struct metrics *m, const char *action, bool allow, const char *code,
                      int64_t duration_us) {
    if (!m) return;
    struct metrics_series *s =
        !action || !*action ? m->no_route : metrics_find(&m->actions, action);
    metrics_inc(&s->cells[(allow ? 0 : METRICS_CODES) + metrics_code_index(code)], 1);
    if (duration_us >= 0) metrics_observe(&m->decision, (uint64_t)duration_us);
}

void metrics_upstream_attempt(struct metrics *m, const char *upstream,
                              enum metrics_outcome outcome) {
    if (!m || (unsigned)outcome >= METRICS_OUTCOME_COUNT) return;
    metrics_inc(&metrics_find(&m->upstreams, upstream)->cells[UPSTREAM_ATTEMPTS + outcome], 1);
}

void metrics_retry(struct metrics *m, const char *upstream) {
    if (!m) return;
    metrics_inc(&metrics_find(&m->upstreams, upstream)->cells[UPSTREAM_RETRIES], 1);
}

void metrics_fallback(struct metrics *m, const char *chain, int step) {
    if (!m) return;
    size_t cell = step == METRICS_STEP_CONTEXT_OVERFLOW   ? CHAIN_STEP_OVERFLOW
                  : step >= 0 && step < METRICS_MAX_STEPS ? (size_t)step
                                                          : CHAIN_STEP_OTHER;
    metrics_inc(&metrics_find(&m->chains, chain)->cells[CHAIN_FALLBACKS + cell], 1);
}

void metrics_breaker_transition(struct metrics *m, const char *upstream, enum metrics_breaker to) {
    if (!m || (unsigned)to >= METRICS_BREAKER_COUNT) return;
    metrics_inc(&metrics_find(&m->upstreams, upstream)->cells[UPSTREAM_TRANSITIONS + to], 1);
}

void metrics_escalation(struct metrics *m, const char *chain) {
    if (!m) return;
    metrics_inc(&metrics_find(&m->chains, chain)->cells[CHAIN_ESCALATIONS], 1);
}

void metrics_approval(struct metrics *m, enum metrics_approval state) {
    if (!m || (unsigned)state >= METRICS_APPROVAL_COUNT) return;
    metrics_inc(&m->approvals[state], 1);
}

void metrics_audit_batch(void *arg, size_t records, int64_t commit_us) {
    struct metrics *m = arg;
    if (!m) return;
    metrics_inc(&m->audit_records, records);
    metrics_observe(&m->batch, records);
    metrics_observe(&m->fsync, commit_us > 0 ? (uint64_t)commit_us : 0);
}

void metrics_set_breaker_source(struct metrics *m, metrics_breaker_foreach_fn foreach, void *arg) {
    if (!m) return;
    pthread_mutex_lock(&m->lock);
    m->breaker_foreach = foreach;
    m->breaker_arg = arg;
    pthread_mutex_unlock(&m->lock);
}

/* ---- rendering ------------------------------------------------------------------------- */

struct metrics_buf {
    char *data;
    size_t len;
    size_t cap;
    bool oom;
};

static void metrics_buf_add(struct metrics_buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->oom = true;
            return;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void metrics_buf_puts(struct metrics_buf *b, const char *s) {
    metrics_buf_add(b, s, strlen(s));
}

/* A label value, escaped as the text format wants: backslash, double quote, newline. */
static void metrics_buf_label_value(struct metrics_buf *b, const char *s) {
    for (const char *run = s;; s++) {
        const char *esc = *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : *s == '\n' ? "\\n" : NULL;
        if (!esc && *s) continue;
        metrics_buf_add(b, run, (size_t)(s - run));
        if (!*s) return;
        metrics_buf_puts(b, esc);
        run = s + 1;
    }
}

/* v / scale as an exact decimal (scale 1 or a power of ten), trailing zeros dropped,
 * into out (48 bytes hold any uint64_t); returns the length. */
static size_t metrics_format_scaled(char out[48], uint64_t v, uint64_t scale) {
    int n = snprintf(out, 48, "%" PRIu64, v / scale);
    if (scale > 1 && v % scale) {
        int digits = 0;
        for (uint64_t s = scale; s > 1; s /= 10)
            digits++;
        n += snprintf(out + n, 48 - (size_t)n, ".%0*" PRIu64, digits, v % scale);
        while (out[n - 1] == '0')
            out[--n] = '\0';
    }
    return (size_t)n;
}

static void metrics_buf_family(struct metrics_buf *b, const char *name, const char *type,
                               const char *help) {
    metrics_buf_puts(b, "# HELP ");
    metrics_buf_puts(b, name);
    metrics_buf_puts(b, " ");
    metrics_buf_puts(b, help);
    metrics_buf_puts(b, "\n# TYPE ");
    metrics_buf_puts(b, name);
    metrics_buf_puts(b, " ");
    metrics_buf_puts(b, type);
    metrics_buf_puts(b, "\n");
}

/* One sample: name{k1="v1",…} value; labels holds nlabels (key, value) pairs. */
static void metrics_buf_sample(struct metrics_buf *b, const char *name, const char *const *labels,
                               size_t nlabels, uint64_t value, uint64_t scale) {
    metrics_buf_puts(b, name);
    for (size_t i = 0; i < nlabels; i++) {
        metrics_buf_puts(b, i ? "," : "{");
        metrics_buf_puts(b, labels[2 * i]);
        metrics_buf_puts(b, "=\"");
        metrics_buf_label_value(b, labels[2 * i + 1]);
        metrics_buf_puts(b, "\"");
    }
    char text[48];
    metrics_buf_puts(b, nlabels ? "} " : " ");
    metrics_buf_add(b, text, metrics_format_scaled(text, value, scale));
    metrics_buf_puts(b, "\n");
}

static uint64_t metrics_load(const uint64_t *cell) {
    return __atomic_load_n(cell, __ATOMIC_RELAXED);
}

static void metrics_buf_histogram(struct metrics_buf *b, const char *name, const char *help,
                                  const struct metrics_histogram *h) {
    char sample[96];
    metrics_buf_family(b, name, "histogram", help);
    snprintf(sample, sizeof sample, "%s_bucket", name);
    uint64_t total = 0;
    for (size_t i = 0; i <= h->nbounds; i++) {
        char le[48] = "+Inf";
        if (i < h->nbounds) metrics_format_scaled(le, h->bounds[i], h->scale);
        total += metrics_load(&h->counts[i]);
        const char *labels[] = {"le", le};
        metrics_buf_sample(b, sample, labels, 1, total, 1);
    }
    snprintf(sample, sizeof sample, "%s_sum", name);
    metrics_buf_sample(b, sample, NULL, 0, metrics_load(&h->sum), h->scale);
    snprintf(sample, sizeof sample, "%s_count", name);
    metrics_buf_sample(b, sample, NULL, 0, total, 1);
}

/* The series of a kind, sorted by label value: the registered ones, other, extra. */
struct metrics_list {
    struct metrics_series **items;
    size_t len;
};

static int metrics_series_cmp(const void *a, const void *b) {
    return strcmp((*(struct metrics_series *const *)a)->name,
                  (*(struct metrics_series *const *)b)->name);
}

/* m->lock held. */
static int metrics_list_of(const struct metrics_kind *k, struct metrics_series *extra,
                           struct metrics_list *out) {
    out->len = 0;
    out->items = calloc(k->len + 2, sizeof *out->items);
    if (!out->items) return PEP_ENOMEM;
    for (size_t i = 0; i <= k->table->mask; i++)
        if (k->table->slots[i]) out->items[out->len++] = k->table->slots[i];
    out->items[out->len++] = k->other;
    if (extra) out->items[out->len++] = extra;
    qsort(out->items, out->len, sizeof *out->items, metrics_series_cmp);
    return 0;
}

/* A registered name's series is shown from 0 (rate() then sees its first increment);
 * `other` only once something fell into it. */
static bool metrics_shown_at_zero(const struct metrics_series *s, const struct metrics_kind *k) {
    return s != k->other;
}

/* pep_breaker_state samples collected from the breaker source. */
struct metrics_gauge {
    const struct metrics_series *upstream;
    int state;
};
struct metrics_gauges {
    struct metrics *m;
    struct metrics_gauge *items;
    size_t len;
    size_t cap;
    bool oom;
};

static void metrics_gauge_emit(void *ctx, const char *upstream, int state) {
    struct metrics_gauges *g = ctx;
    const struct metrics_series *s = metrics_find(&g->m->upstreams, upstream);
    if (s == g->m->upstreams.other || state < 0 || state >= METRICS_BREAKER_COUNT) return;
    if (g->len == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        struct metrics_gauge *items = realloc(g->items, cap * sizeof *items);
        if (!items) {
            g->oom = true;
            return;
        }
        g->items = items;
        g->cap = cap;
    }
    g->items[g->len++] = (struct metrics_gauge){.upstream = s, .state = state};
}

static int metrics_gauge_cmp(const void *a, const void *b) {
    const struct metrics_gauge *x = a, *y = b;
    return strcmp(x->upstream->name, y->upstream->name);
}

static void metrics_render_requests(struct metrics_buf *b, const struct metrics_list *actions) {
    static const char *const decisions[] = {"allow", "deny"};
    metrics_buf_family(b, "pep_requests_total", "counter",
                       "Audited data-plane decisions by action, decision and code.");
    for (size_t i = 0; i < actions->len; i++)
        for (size_t d = 0; d < 2; d++)
            for (size_t c = 0; c < METRICS_CODES; c++) {
                uint64_t v = metrics_load(&actions->items[i]->cells[d * METRICS_CODES + c]);
                const char *labels[] = {
                    "action",   actions->items[i]->name,
                    "decision", decisions[d],
                    "code",     c < PEP_ARRAY_LEN(metrics_codes) ? metrics_codes[c] : "other"};
                if (v) metrics_buf_sample(b, "pep_requests_total", labels, 3, v, 1);
            }
}

static void metrics_render_upstreams(struct metrics_buf *b, const struct metrics_kind *k,
                                     const struct metrics_list *ups) {
    metrics_buf_family(b, "pep_upstream_attempts_total", "counter",
                       "Attempts sent upstream, by how they ended.");
    for (size_t i = 0; i < ups->len; i++)
        for (size_t o = 0; o < METRICS_OUTCOME_COUNT; o++) {
            uint64_t v = metrics_load(&ups->items[i]->cells[UPSTREAM_ATTEMPTS + o]);
            const char *labels[] = {"upstream", ups->items[i]->name, "outcome",
                                    metrics_outcomes[o]};
            if (v) metrics_buf_sample(b, "pep_upstream_attempts_total", labels, 2, v, 1);
        }
    metrics_buf_family(b, "pep_retries_total", "counter",
                       "Re-attempts to an upstream within a chain step (2 attempts = 1 retry).");
    for (size_t i = 0; i < ups->len; i++) {
        uint64_t v = metrics_load(&ups->items[i]->cells[UPSTREAM_RETRIES]);
        const char *labels[] = {"upstream", ups->items[i]->name};
        if (v || metrics_shown_at_zero(ups->items[i], k))
            metrics_buf_sample(b, "pep_retries_total", labels, 1, v, 1);
    }
}

static void metrics_render_fallbacks(struct metrics_buf *b, const struct metrics_list *chains) {
    metrics_buf_family(b, "pep_fallbacks_total", "counter",
                       "Moves of a chain to a later step, by the step moved to.");
    for (size_t i = 0; i < chains->len; i++)
        for (size_t s = 0; s < CHAIN_STEP_OTHER + 1; s++) {
            uint64_t v = metrics_load(&chains->items[i]->cells[CHAIN_FALLBACKS + s]);
            char step[24];
            if (s < METRICS_MAX_STEPS) snprintf(step, sizeof step, "%zu", s);
            const char *labels[] = {"chain", chains->items[i]->name, "step",
                                    s == CHAIN_STEP_OVERFLOW ? "context_overflow"
                                    : s == CHAIN_STEP_OTHER  ? "other"
                                                             : step};
            if (v) metrics_buf_sample(b, "pep_fallbacks_total", labels, 2, v, 1);
        }
}

static void metrics_render_breakers(struct metrics_buf *b, struct metrics_gauges *g,
                                    const struct metrics_kind *k, const struct metrics_list *ups) {
    metrics_buf_family(b, "pep_breaker_state", "gauge",
                       "Circuit breaker state per upstream: 0 closed, 1 open, 2 half-open.");
    if (g->len > 1) qsort(g->items, g->len, sizeof *g->items, metrics_gauge_cmp);
    for (size_t i = 0; i < g->len; i++) {
        if (i > 0 && g->items[i].upstream == g->items[i - 1].upstream) continue; /* first wins */
        const char *labels[] = {"upstream", g->items[i].upstream->name};
        metrics_buf_sample(b, "pep_breaker_state", labels, 1, (uint64_t)g->items[i].state, 1);
    }
    metrics_buf_family(b, "pep_breaker_transitions_total", "counter",
                       "Circuit breaker state changes per upstream, by the state entered.");
    for (size_t i = 0; i < ups->len; i++)
        for (size_t t = 0; t < METRICS_BREAKER_COUNT; t++) {
            uint64_t v = metrics_load(&ups->items[i]->cells[UPSTREAM_TRANSITIONS + t]);
            const char *labels[] = {"upstream", ups->items[i]->name, "to",
                                    metrics_breaker_states[t]};
            if (v || metrics_shown_at_zero(ups->items[i], k))
                metrics_buf_sample(b, "pep_breaker_transitions_total", labels, 2, v, 1);
        }
}

char *metrics_render(struct metrics *m, size_t *len) {
    struct metrics_buf b = {0};
    struct metrics_list actions = {0}, ups = {0}, chains = {0};
    struct metrics_gauges gauges = {.m = m};
    if (!m) return NULL;

    pthread_mutex_lock(&m->lock);
    int rc = metrics_list_of(&m->actions, m->no_route, &actions);
    if (rc == 0) rc = metrics_list_of(&m->upstreams, NULL, &ups);
    if (rc == 0) rc = metrics_list_of(&m->chains, NULL, &chains);
    metrics_breaker_foreach_fn foreach = m->breaker_foreach;
    void *foreach_arg = m->breaker_arg;
    pthread_mutex_unlock(&m->lock);
    /* Outside the lock: the breaker module takes its own lock in there. */
    if (rc == 0 && foreach)
        foreach (foreach_arg, metrics_gauge_emit, &gauges)
            ;
    if (rc != 0 || gauges.oom) goto out;

    metrics_render_requests(&b, &actions);
    metrics_buf_histogram(&b, "pep_decision_duration_seconds",
                          "Time from receiving a request to its decision being audited.",
                          &m->decision);
    metrics_render_upstreams(&b, &m->upstreams, &ups);
    metrics_render_fallbacks(&b, &chains);
    metrics_render_breakers(&b, &gauges, &m->upstreams, &ups);
    metrics_buf_family(&b, "pep_escalations_total", "counter",
                       "Requests escalated to humans, per chain.");
    for (size_t i = 0; i < chains.len; i++) {
        uint64_t v = metrics_load(&chains.items[i]->cells[CHAIN_ESCALATIONS]);
        const char *labels[] = {"chain", chains.items[i]->name};
        if (v || metrics_shown_at_zero(chains.items[i], &m->chains))
            metrics_buf_sample(&b, "pep_escalations_total", labels, 1, v, 1);
    }
    metrics_buf_family(&b, "pep_approvals_total", "counter",
                       "Approval events: created (pending), approved, denied, used, expired.");
    for (size_t i = 0; i < METRICS_APPROVAL_COUNT; i++) {
        const char *labels[] = {"state", metrics_approval_states[i]};
        metrics_buf_sample(&b, "pep_approvals_total", labels, 1, metrics_load(&m->approvals[i]), 1);
    }
    metrics_buf_family(&b, "pep_audit_records_total", "counter", "Audit records committed.");
    metrics_buf_sample(&b, "pep_audit_records_total", NULL, 0, metrics_load(&m->audit_records), 1);
    metrics_buf_histogram(&b, "pep_audit_fsync_duration_seconds",
                          "Time to commit one audit batch (the fsync with durability full).",
                          &m->fsync);
    metrics_buf_histogram(&b, "pep_audit_batch_records", "Audit records per committed batch.",
                          &m->batch);

out:
    free(actions.items);
    free(ups.items);
    free(chains.items);
    free(gauges.items);
    if (rc != 0 || gauges.oom || b.oom) {
        free(b.data);
        return NULL;
    }
    if (len) *len = b.len;
    return b.data;
}
