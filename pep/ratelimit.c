/*
 * ratelimit.c — GCRA and its sharded, bounded store (see ratelimit.h for the formulas and
 * the eviction policy).
 *
 * Each shard is a chained hash table: a power-of-two array of buckets, each the head of a
 * list of entries, one malloc'd entry per key holding its TAT and its bytes.  Chains make
 * eviction in the middle of a sweep a plain unlink.  The array doubles while the shard
 * fills (load ≤ 1) and never shrinks: the bound is what memory is sized for.
 * Invariants, under the shard's lock: keys ≤ max_keys; every entry sits in the bucket
 * hash & (buckets_len − 1); no key is stored twice.
 *
 * No clock is read here.  The only outside input is randomness for the hash key, once, in
 * ratelimiter_new.
 */
#include "pep/ratelimit.h"
#include "pep/util.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

__extension__ typedef unsigned __int128 u128;

#define US_PER_S 1000000
#define SHARDS_MAX_BITS 6         /* 64 shards */
#define SHARD_MIN_KEYS 1024       /* fewer shards for small bounds, so each has room to choose */
#define SHARD_MAX_KEYS (1u << 30) /* bucket indexes come from 32 bits of the hash */
#define BUCKETS_INITIAL 16

/* ---- GCRA ---------------------------------------------------------------------------- */

static int64_t ceil_div_s(u128 ticks, u128 ticks_per_s) {
    return (int64_t)((ticks + ticks_per_s - 1) / ticks_per_s);
}

void ratelimit_gcra(struct ratelimit_tat *tat, int64_t limit, int64_t window_us, int64_t cost,
                    int64_t now_us, struct ratelimit_verdict *out) {
    assert(limit >= 1 && window_us >= 1 && now_us >= 0 && window_us <= INT64_MAX - now_us);
    assert(cost >= -limit && cost <= limit && tat->us >= 0 && tat->frac >= 0);
    /* Ticks of 1/L µs: T = W ticks, the burst L·W.  Every product below is < 2^127. */
    const u128 L = (u128)limit, W = (u128)window_us, burst = L * W, now = (u128)now_us * L;
    /* A fraction left by a larger limit is cut to under one µs rather than reread as many */
    u128 stored = (u128)tat->us * L + (u128)(tat->frac < limit ? tat->frac : limit - 1);
    u128 debt = stored > now ? stored - now : 0;
    u128 need = (u128)(cost > 0 ? cost : 1) * W; /* a peek asks about one request */
    bool allowed = true;

    if (cost < 0) {
        u128 back = (u128)(-cost) * W;
        debt = debt > back ? debt - back : 0;
    } else {
        allowed = debt + need <= burst;
        if (allowed && cost > 0) debt += need;
    }
    if (allowed && cost != 0) {
        u128 next = now + debt; /* ≤ (now_us + W)·L when it grew: us fits int64 */
        tat->us = (int64_t)(next / L);
        tat->frac = (int64_t)(next % L);
    }
    out->allowed = allowed;
    out->limit = limit;
    out->remaining = debt < burst ? (int64_t)((burst - debt) / W) : 0;
    out->reset_s = debt > 0 ? ceil_div_s(debt, L * US_PER_S) : 1;
    out->retry_after_s = allowed ? 0 : ceil_div_s(debt + need - burst, L * US_PER_S);
    assert(out->remaining >= 0 && out->remaining <= limit && out->reset_s >= 1);
    assert(allowed ? out->retry_after_s == 0 : out->retry_after_s >= 1);
}

/* A full quota, as if never seen: TAT ≤ now. */
static bool tat_idle(const struct ratelimit_tat *tat, int64_t now_us) {
    return tat->us < now_us || (tat->us == now_us && tat->frac == 0);
}

/* ---- SipHash-2-4 (Aumasson & Bernstein), 64-bit output -------------------------------- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1, v1 = ROTL(v1, 13), v1 ^= v0, v0 = ROTL(v0, 32);                                  \
        v2 += v3, v3 = ROTL(v3, 16), v3 ^= v2;                                                     \
        v0 += v3, v3 = ROTL(v3, 21), v3 ^= v0;                                                     \
        v2 += v1, v1 = ROTL(v1, 17), v1 ^= v2, v2 = ROTL(v2, 32);                                  \
    } while (0)

static uint64_t load_le64(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint64_t siphash24(const uint64_t k[2], const unsigned char *in, size_t len) {
    uint64_t v0 = k[0] ^ 0x736f6d6570736575ull, v1 = k[1] ^ 0x646f72616e646f6dull;
    uint64_t v2 = k[0] ^ 0x6c7967656e657261ull, v3 = k[1] ^ 0x7465646279746573ull;
    size_t whole = len & ~(size_t)7;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = load_le64(in + i, 8);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t m = load_le64(in + whole, len - whole) | (uint64_t)len << 56;
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- the store ----------------------------------------------------------------------- */

struct ratelimit_entry {
    struct ratelimit_entry *next; /* in the same bucket */
    struct ratelimit_tat tat;
    uint32_t hash;       /* low half of the key's hash: its bucket at any array size */
    uint16_t key_len;    /* ≤ RATELIMIT_MAX_KEY_LEN */
    unsigned char key[]; /* not NUL-terminated */
};

#if UINTPTR_MAX == UINT64_MAX
_Static_assert(offsetof(struct ratelimit_entry, key) == 30, "ratelimit.h documents this size");
#endif

struct ratelimit_shard {
    _Alignas(64) pthread_mutex_t lock; /* guards the fields below and the entries; own cache
                                          line so that shards do not share one */
    struct ratelimit_entry **buckets;
    size_t buckets_len; /* a power of two */
    size_t buckets_max; /* the power of two ≥ max_keys: load stays ≤ 1 */
    size_t keys;
    size_t max_keys; /* this shard's share of the bound */
    size_t bytes;    /* entries and bucket array, as asked of malloc */
    size_t hand;     /* the bucket where the next eviction sweep starts */
    uint64_t evicted, evicted_busy;
};

struct ratelimiter {
    uint64_t hash_key[2];
    unsigned shard_bits; /* shards in use: 1 << shard_bits; the top bits of a hash pick one */
    struct ratelimit_shard shards[1 << SHARDS_MAX_BITS];
};

static size_t entry_size(size_t key_len) {
    size_t n = offsetof(struct ratelimit_entry, key) + key_len;
    return n < sizeof(struct ratelimit_entry) ? sizeof(struct ratelimit_entry) : n;
}

/* The entry of key, moved to the front of its chain: a key in use is then found without
 * touching its bucket's other, likely idle and uncached, entries. */
static struct ratelimit_entry *shard_find(struct ratelimit_shard *sh, uint32_t hash,
                                          const void *key, size_t key_len) {
    struct ratelimit_entry **head = &sh->buckets[hash & (sh->buckets_len - 1)];
    for (struct ratelimit_entry **link = head, *e; (e = *link) != NULL; link = &e->next)
        if (e->hash == hash && e->key_len == key_len && memcmp(e->key, key, key_len) == 0) {
            if (link != head) {
                *link = e->next;
                e->next = *head;
                *head = e;
            }
            return e;
        }
    return NULL;
}

static void shard_drop(struct ratelimit_shard *sh, struct ratelimit_entry **link) {
    struct ratelimit_entry *e = *link;
    *link = e->next;
    sh->keys--;
    sh->bytes -= entry_size(e->key_len);
    sh->evicted++;
    free(e);
}

/* Makes room in a full shard: a clock sweep over about RATELIMIT_EVICT_SAMPLE keys drops
 * every idle key it meets, or, when none is, the one closest to idle among them. */
static void shard_evict(struct ratelimit_shard *sh, int64_t now_us) {
    struct ratelimit_entry *closest = NULL;
    size_t closest_bucket = 0, seen = 0, dropped = 0;
    for (size_t n = 0; n < sh->buckets_len && seen < RATELIMIT_EVICT_SAMPLE; n++) {
        size_t b = sh->hand;
        sh->hand = (sh->hand + 1) & (sh->buckets_len - 1);
        for (struct ratelimit_entry **link = &sh->buckets[b]; *link; seen++) {
            struct ratelimit_entry *e = *link;
            if (tat_idle(&e->tat, now_us)) {
                shard_drop(sh, link);
                dropped++;
                continue;
            }
            if (!closest || e->tat.us < closest->tat.us) closest = e, closest_bucket = b;
            link = &e->next;
        }
    }
    if (dropped > 0 || PEP_NEVER(!closest)) return; /* a full shard has keys to meet */
    struct ratelimit_entry **link = &sh->buckets[closest_bucket];
    while (*link != closest)
        link = &(*link)->next;
    shard_drop(sh, link);
    sh->evicted_busy++;
}

/* Doubles the bucket array.  On allocation failure the old one stays: chains grow longer,
 * answers stay right. */
static void shard_grow(struct ratelimit_shard *sh) {
    size_t len = sh->buckets_len * 2;
    struct ratelimit_entry **buckets = calloc(len, sizeof *buckets);
    if (!buckets) return;
    for (size_t b = 0; b < sh->buckets_len; b++)
        for (struct ratelimit_entry *e = sh->buckets[b], *next; e; e = next) {
            next = e->next;
            e->next = buckets[e->hash & (len - 1)];
            buckets[e->hash & (len - 1)] = e;
        }
    free(sh->buckets);
    sh->bytes += (len - sh->buckets_len) * sizeof *buckets;
    sh->buckets = buckets;
    sh->buckets_len = len;
    sh->hand = 0;
}

static int shard_insert(struct ratelimit_shard *sh, uint32_t hash, const void *key, size_t key_len,
                        const struct ratelimit_tat *tat, int64_t now_us) {
    if (sh->keys >= sh->max_keys) shard_evict(sh, now_us);
    assert(sh->keys < sh->max_keys);
    size_t size = entry_size(key_len);
    struct ratelimit_entry *e = malloc(size);
    if (!e) return PEP_ENOMEM;
    e->tat = *tat;
    e->hash = hash;
    e->key_len = (uint16_t)key_len;
    if (key_len) memcpy(e->key, key, key_len);
    e->next = sh->buckets[hash & (sh->buckets_len - 1)];
    sh->buckets[hash & (sh->buckets_len - 1)] = e;
    sh->keys++;
    sh->bytes += size;
    if (sh->keys > sh->buckets_len && sh->buckets_len < sh->buckets_max) shard_grow(sh);
    return 0;
}

struct ratelimiter *ratelimiter_new(size_t max_keys) {
    if (max_keys == 0) max_keys = RATELIMIT_DEFAULT_MAX_KEYS;
    struct ratelimiter *rl = aligned_alloc(64, (sizeof *rl + 63) & ~(size_t)63);
    if (!rl) return NULL;
    memset(rl, 0, sizeof *rl);
    if (pep_random_bytes(rl->hash_key, sizeof rl->hash_key) != 0) {
        free(rl);
        return NULL;
    }
    rl->shard_bits = SHARDS_MAX_BITS;
    while (rl->shard_bits > 0 && (max_keys >> rl->shard_bits) < SHARD_MIN_KEYS)
        rl->shard_bits--;
    size_t shards = (size_t)1 << rl->shard_bits, share = max_keys >> rl->shard_bits;
    for (size_t i = 0; i < shards; i++) {
        struct ratelimit_shard *sh = &rl->shards[i];
        sh->max_keys = share + (i < (max_keys & (shards - 1))); /* the shares add up to max_keys */
        if (sh->max_keys > SHARD_MAX_KEYS) sh->max_keys = SHARD_MAX_KEYS;
        for (sh->buckets_max = 1; sh->buckets_max < sh->max_keys; sh->buckets_max *= 2)
            ;
        sh->buckets_len = sh->buckets_max < BUCKETS_INITIAL ? sh->buckets_max : BUCKETS_INITIAL;
        sh->buckets = calloc(sh->buckets_len, sizeof *sh->buckets);
        sh->bytes = sh->buckets_len * sizeof *sh->buckets;
        if (!sh->buckets || pthread_mutex_init(&sh->lock, NULL) != 0) {
            free(sh->buckets);
            for (size_t j = 0; j < i; j++) {
                pthread_mutex_destroy(&rl->shards[j].lock);
                free(rl->shards[j].buckets);
            }
            free(rl);
            return NULL;
        }
    }
    return rl;
}

void ratelimiter_free(struct ratelimiter *rl) {
    if (!rl) return;
    for (size_t i = 0; i < (size_t)1 << rl->shard_bits; i++) {
        struct ratelimit_shard *sh = &rl->shards[i];
        for (size_t b = 0; b < sh->buckets_len; b++)
            for (struct ratelimit_entry *e = sh->buckets[b], *next; e; e = next) {
                next = e->next;
                free(e);
            }
        free(sh->buckets);
        pthread_mutex_destroy(&sh->lock);
    }
    free(rl);
}

int ratelimit_take(struct ratelimiter *rl, const void *key, size_t key_len, int64_t limit,
                   int64_t window_us, int64_t cost, int64_t now_us, struct ratelimit_verdict *out) {
    const struct ratelimit_verdict refused = {
        .allowed = false, .limit = limit, .remaining = 0, .reset_s = 1, .retry_after_s = 1};
    if (key_len > RATELIMIT_MAX_KEY_LEN || (!key && key_len > 0) || limit < 1 || window_us < 1 ||
        now_us < 0 || window_us > INT64_MAX - now_us || cost < -limit || cost > limit) {
        *out = refused;
        return PEP_EINVAL;
    }
    if (!key) key = ""; /* no pointer arithmetic on NULL, even for 0 bytes */
    uint64_t hash = siphash24(rl->hash_key, key, key_len);
    struct ratelimit_shard *sh = &rl->shards[rl->shard_bits ? hash >> (64 - rl->shard_bits) : 0];
    int rc = 0;
    pthread_mutex_lock(&sh->lock);
    struct ratelimit_entry *e = shard_find(sh, (uint32_t)hash, key, key_len);
    if (e) {
        ratelimit_gcra(&e->tat, limit, window_us, cost, now_us, out);
    } else {
        struct ratelimit_tat tat = {0, 0};
        ratelimit_gcra(&tat, limit, window_us, cost, now_us, out);
        /* Only an allowed take leaves a state that differs from a key never seen. */
        if (out->allowed && cost > 0)
            rc = shard_insert(sh, (uint32_t)hash, key, key_len, &tat, now_us);
    }
    pthread_mutex_unlock(&sh->lock);
    if (rc != 0) *out = refused; /* unstored, so not taken: refuse (fail closed) */
    return rc;
}

void ratelimiter_stats(struct ratelimiter *rl, struct ratelimit_stats *out) {
    *out = (struct ratelimit_stats){.bytes = sizeof *rl};
    for (size_t i = 0; i < (size_t)1 << rl->shard_bits; i++) {
        struct ratelimit_shard *sh = &rl->shards[i];
        pthread_mutex_lock(&sh->lock);
        out->keys += sh->keys;
        out->bytes += sh->bytes;
        out->evicted += sh->evicted;
        out->evicted_busy += sh->evicted_busy;
        pthread_mutex_unlock(&sh->lock);
    }
}
