/*
 * indicators.c — the chains' reliability indicators (see indicators.h).
 *
 * Each chain keeps a running total and a ring of 60 one-minute buckets.  A bucket carries
 * the minute it counts; the slot of minute m is m mod 60, and a sample for a later minute
 * than the slot's clears it first, so stale minutes vanish without a timer.  last_hour
 * sums the buckets whose minute is in [now − 59, now].  Latencies go to a log-linear
 * histogram (HdrHistogram's layout with 4 significant bits): linear below 32 ms, then 16
 * equal buckets per power of two; percentiles are read from it, means from exact sums.
 *
 * Invariants:
 *   - total and every bucket hold the same kind of counts; a bucket with minute
 *     INDICATORS_NO_MINUTE is empty.
 *   - In every window, served_after_failure <= first_attempt_failed <= requests and
 *     fallback, escalated <= requests (samples are normalised on the way in).
 *
 * Threads: ind->lock (rwlock) guards ind->chains; sync takes it to write, record and json
 * to read.  chain->lock guards that chain's counts.  Order: ind->lock, then chain->lock.
 */
#include "pep/indicators.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define INDICATORS_MINUTE_MS 60000
#define INDICATORS_MINUTES 60
#define INDICATORS_NO_MINUTE INT64_MIN

/* Latency histogram: [0, 32) ms one bucket per ms, then octaves [2^k, 2^(k+1)) for k = 5 …
 * 21 in 16 buckets each; 2^22 ms and more land in the last bucket. */
#define INDICATORS_LINEAR 32
#define INDICATORS_SUB_BITS 4
#define INDICATORS_SUB (1 << INDICATORS_SUB_BITS)
#define INDICATORS_OCTAVES 17
#define INDICATORS_HIST (INDICATORS_LINEAR + INDICATORS_SUB * INDICATORS_OCTAVES)

/* Counts over one horizon.  hist is uint32_t in minute buckets (a minute never sees 2^32
 * requests) and uint64_t in totals, hence two structs sharing the counters. */
struct indicators_counts {
    uint64_t requests;
    uint64_t first_attempt_failed;
    uint64_t served_after_failure; /* first_attempt_failed and served */
    uint64_t fallback;
    uint64_t escalated;
    uint64_t latency_sum_ms;
};

struct indicators_minute {
    int64_t minute; /* floor(now_ms / 60000) these counts belong to, or NO_MINUTE */
    struct indicators_counts c;
    uint32_t hist[INDICATORS_HIST];
};

struct indicators_window {
    struct indicators_counts c;
    uint64_t hist[INDICATORS_HIST];
};

struct indicators_chain {
    char *name;
    pthread_mutex_t lock; /* guards total and minutes */
    struct indicators_window total;
    struct indicators_minute minutes[INDICATORS_MINUTES];
};

struct indicators {
    pthread_rwlock_t lock;            /* guards chains and len */
    struct indicators_chain **chains; /* sorted by name */
    size_t len;
};

/* ---- pure helpers ---------------------------------------------------------------------- */

static int64_t indicators_floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return a % b < 0 ? q - 1 : q;
}

static size_t indicators_bucket(int64_t ms) {
    if (ms < INDICATORS_LINEAR) return ms < 0 ? 0 : (size_t)ms;
    int k = 63 - __builtin_clzll((unsigned long long)ms); /* 2^k <= ms, k >= 5 */
    if (k >= 5 + INDICATORS_OCTAVES) return INDICATORS_HIST - 1;
    size_t sub = (size_t)(ms >> (k - INDICATORS_SUB_BITS)) & (INDICATORS_SUB - 1);
    return INDICATORS_LINEAR + (size_t)(k - 5) * INDICATORS_SUB + sub;
}

/* The value reported for bucket b: itself when exact, else its lower bound + width / 2. */
static int64_t indicators_bucket_value(size_t b) {
    if (b < INDICATORS_LINEAR) return (int64_t)b;
    int k = 5 + (int)((b - INDICATORS_LINEAR) / INDICATORS_SUB);
    int64_t sub = (int64_t)((b - INDICATORS_LINEAR) % INDICATORS_SUB);
    int64_t width = (int64_t)1 << (k - INDICATORS_SUB_BITS);
    return (INDICATORS_SUB + sub) * width + width / 2;
}

static void indicators_add(struct indicators_counts *c, const struct indicator_sample *s) {
    c->requests++;
    c->first_attempt_failed += s->first_attempt_failed;
    c->served_after_failure += s->first_attempt_failed && s->served;
    c->fallback += s->fallback && s->served;
    c->escalated += s->escalated;
    c->latency_sum_ms += s->latency_ms > 0 ? (uint64_t)s->latency_ms : 0;
}

static void indicators_sum(struct indicators_counts *to, const struct indicators_counts *from) {
    to->requests += from->requests;
    to->first_attempt_failed += from->first_attempt_failed;
    to->served_after_failure += from->served_after_failure;
    to->fallback += from->fallback;
    to->escalated += from->escalated;
    to->latency_sum_ms += from->latency_sum_ms;
}

/* The last hour at now: the buckets of minutes [now − 59, now]. */
static void indicators_last_hour(const struct indicators_chain *ch, int64_t now_ms,
                                 struct indicators_window *w) {
    int64_t now = indicators_floor_div(now_ms, INDICATORS_MINUTE_MS);
    memset(w, 0, sizeof *w);
    for (size_t i = 0; i < INDICATORS_MINUTES; i++) {
        const struct indicators_minute *b = &ch->minutes[i];
        if (b->minute == INDICATORS_NO_MINUTE || b->minute > now ||
            b->minute <= now - INDICATORS_MINUTES)
            continue;
        indicators_sum(&w->c, &b->c);
        for (size_t j = 0; j < INDICATORS_HIST; j++)
            w->hist[j] += b->hist[j];
    }
}

/* ---- life cycle ------------------------------------------------------------------------ */

static struct indicators_chain *indicators_chain_new(const char *name) {
    struct indicators_chain *ch = calloc(1, sizeof *ch);
    if (!ch) return NULL;
    if (!(ch->name = strdup(name)) || pthread_mutex_init(&ch->lock, NULL) != 0) {
        free(ch->name);
        free(ch);
        return NULL;
    }
    for (size_t i = 0; i < INDICATORS_MINUTES; i++)
        ch->minutes[i].minute = INDICATORS_NO_MINUTE;
    return ch;
}

static void indicators_chain_free(struct indicators_chain *ch) {
    if (!ch) return;
    pthread_mutex_destroy(&ch->lock);
    free(ch->name);
    free(ch);
}

struct indicators *indicators_new(void) {
    struct indicators *ind = calloc(1, sizeof *ind);
    if (ind && pthread_rwlock_init(&ind->lock, NULL) != 0) {
        free(ind);
        return NULL;
    }
    return ind;
}

void indicators_free(struct indicators *ind) {
    if (!ind) return;
    for (size_t i = 0; i < ind->len; i++)
        indicators_chain_free(ind->chains[i]);
    free(ind->chains);
    pthread_rwlock_destroy(&ind->lock);
    free(ind);
}

static int indicators_chain_cmp(const void *a, const void *b) {
    return strcmp((*(struct indicators_chain *const *)a)->name,
                  (*(struct indicators_chain *const *)b)->name);
}

/* ind->lock held (either way). */
static struct indicators_chain *indicators_find(const struct indicators *ind, const char *name) {
    size_t lo = 0, hi = ind->len;
    while (name && lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = strcmp(name, ind->chains[mid]->name);
        if (r == 0) return ind->chains[mid];
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

int indicators_sync(struct indicators *ind, const struct policy *p) {
    if (!ind || !p) return 0;
    size_t n = p->chains_len;
    struct indicators_chain **next = calloc(n ? n : 1, sizeof *next);
    bool *fresh = calloc(n ? n : 1, sizeof *fresh);
    int rc = next && fresh ? 0 : PEP_ENOMEM;

    pthread_rwlock_wrlock(&ind->lock);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *name = p->chains[i].name;
        if (!name) {
            rc = PEP_EINVAL;
        } else if (!(next[i] = indicators_find(ind, name))) {
            fresh[i] = true;
            if (!(next[i] = indicators_chain_new(name))) rc = PEP_ENOMEM;
        }
    }
    if (rc == 0) {
        /* Drop the chains p no longer names: those not carried into next. */
        qsort(next, n, sizeof *next, indicators_chain_cmp);
        for (size_t i = 0; i < ind->len; i++)
            if (!bsearch(&ind->chains[i], next, n, sizeof *next, indicators_chain_cmp))
                indicators_chain_free(ind->chains[i]);
        free(ind->chains);
        ind->chains = next;
        ind->len = n;
        next = NULL;
    } else {
        for (size_t i = 0; i < n; i++)
            if (fresh && fresh[i]) indicators_chain_free(next[i]);
    }
    pthread_rwlock_unlock(&ind->lock);
    free(next);
    free(fresh);
    return rc;
}

/* ---- recording ------------------------------------------------------------------------- */

int indicators_record(struct indicators *ind, const char *chain, const struct indicator_sample *s,
                      int64_t now_ms) {
    if (!ind || !s) return PEP_EINVAL;
    int64_t minute = indicators_floor_div(now_ms, INDICATORS_MINUTE_MS);
    size_t slot =
        (size_t)(minute - indicators_floor_div(minute, INDICATORS_MINUTES) * INDICATORS_MINUTES);
    size_t bucket = indicators_bucket(s->latency_ms);

    pthread_rwlock_rdlock(&ind->lock);
    struct indicators_chain *ch = indicators_find(ind, chain);
    if (!ch) {
        pthread_rwlock_unlock(&ind->lock);
        return PEP_ENOTFOUND;
    }
    pthread_mutex_lock(&ch->lock);
    indicators_add(&ch->total.c, s);
    ch->total.hist[bucket]++;
    struct indicators_minute *b = &ch->minutes[slot];
    if (b->minute < minute) { /* the slot's minute left the hour: reuse it */
        memset(b, 0, sizeof *b);
        b->minute = minute;
    }
    if (b->minute == minute) { /* else a sample from before the slot's hour: total only */
        indicators_add(&b->c, s);
        b->hist[bucket]++;
    }
    pthread_mutex_unlock(&ch->lock);
    pthread_rwlock_unlock(&ind->lock);
    return 0;
}

/* ---- JSON ------------------------------------------------------------------------------ */

/* num / den as a JSON real, or null without a denominator. */
static json_t *indicators_rate(uint64_t num, uint64_t den) {
    return den ? json_real((double)num / (double)den) : json_null();
}

static int64_t indicators_p95(const struct indicators_window *w) {
    /* Nearest rank: the ceil(0.95 n)-th smallest, in integers to stay exact. */
    uint64_t rank = (w->c.requests * 95 + 99) / 100, seen = 0;
    for (size_t i = 0; i < INDICATORS_HIST; i++)
        if ((seen += w->hist[i]) >= rank) return indicators_bucket_value(i);
    assert(!"histogram holds fewer samples than requests");
    return indicators_bucket_value(INDICATORS_HIST - 1);
}

static json_t *indicators_window_json(const struct indicators_window *w) {
    const struct indicators_counts *c = &w->c;
    return json_pack("{sI sI so so so so so}", "requests", (json_int_t)c->requests,
                     "first_attempt_failed", (json_int_t)c->first_attempt_failed,
                     "retry_success_rate",
                     indicators_rate(c->served_after_failure, c->first_attempt_failed),
                     "fallback_activation_rate", indicators_rate(c->fallback, c->requests),
                     "escalation_rate", indicators_rate(c->escalated, c->requests), "mean_ms",
                     indicators_rate(c->latency_sum_ms, c->requests), "p95_ms",
                     c->requests ? json_integer(indicators_p95(w)) : json_null());
}

/* Appends {indicator, target, value, met}; value NULL = no data (value and met null). */
static int indicators_objective(json_t *arr, const char *name, json_t *target, const double *value,
                                double limit, bool at_least) {
    json_t *met = !value     ? json_null()
                  : at_least ? json_boolean(*value >= limit)
                             : json_boolean(*value <= limit);
    return json_array_append_new(
        arr, json_pack("{ss so so so}", "indicator", name, "target", target, "value",
                       value ? json_real(*value) : json_null(), "met", met));
}

static json_t *indicators_objectives_json(const struct chain_objectives *o,
                                          const struct indicators_window *w) {
    const struct indicators_counts *c = &w->c;
    json_t *arr = json_array();
    int rc = arr ? 0 : -1;
    double v;
    if (rc == 0 && o->has_retry_success_rate) {
        bool known = c->first_attempt_failed > 0;
        if (known) v = (double)c->served_after_failure / (double)c->first_attempt_failed;
        rc = indicators_objective(arr, "retry_success_rate", json_real(o->retry_success_rate),
                                  known ? &v : NULL, o->retry_success_rate, true);
    }
    if (rc == 0 && o->has_fallback_activation_rate) {
        if (c->requests) v = (double)c->fallback / (double)c->requests;
        rc = indicators_objective(arr, "fallback_activation_rate",
                                  json_real(o->fallback_activation_rate), c->requests ? &v : NULL,
                                  o->fallback_activation_rate, false);
    }
    if (rc == 0 && o->has_escalation_rate) {
        if (c->requests) v = (double)c->escalated / (double)c->requests;
        rc = indicators_objective(arr, "escalation_rate", json_real(o->escalation_rate),
                                  c->requests ? &v : NULL, o->escalation_rate, false);
    }
    if (rc == 0 && o->mean_latency_ms > 0) {
        if (c->requests) v = (double)c->latency_sum_ms / (double)c->requests;
        rc = indicators_objective(arr, "mean_latency", json_integer(o->mean_latency_ms),
                                  c->requests ? &v : NULL, (double)o->mean_latency_ms, false);
    }
    if (rc != 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

json_t *indicators_json(struct indicators *ind, const struct policy *p, int64_t now_ms) {
    if (!ind || !p) return NULL;
    /* Two windows of 2.4 KiB each: on the heap, request threads have modest stacks. */
    struct indicators_window *since = malloc(sizeof *since), *hour = malloc(sizeof *hour);
    json_t *chains = json_array();
    json_t *out = chains ? json_pack("{so}", "chains", chains) : NULL;
    int rc = since && hour && out ? 0 : -1;

    pthread_rwlock_rdlock(&ind->lock);
    for (size_t i = 0; rc == 0 && i < p->chains_len; i++) {
        const struct chain *pc = &p->chains[i];
        struct indicators_chain *ch = indicators_find(ind, pc->name);
        memset(since, 0, sizeof *since);
        memset(hour, 0, sizeof *hour);
        if (ch) {
            pthread_mutex_lock(&ch->lock);
            *since = ch->total;
            indicators_last_hour(ch, now_ms, hour);
            pthread_mutex_unlock(&ch->lock);
        }
        json_t *objectives = indicators_objectives_json(&pc->objectives, hour);
        json_t *item = objectives
                           ? json_pack("{ss so so so}", "name", pc->name ? pc->name : "",
                                       "since_start", indicators_window_json(since), "last_hour",
                                       indicators_window_json(hour), "objectives", objectives)
                           : NULL;
        rc = json_array_append_new(chains, item);
    }
    pthread_rwlock_unlock(&ind->lock);

    free(since);
    free(hour);
    if (rc != 0) {
        json_decref(out);
        return NULL;
    }
    return out;
}
