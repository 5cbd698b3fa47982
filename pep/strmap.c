/*
 * strmap.c — open-addressing string map.  Invariant: the table is at most 3/4 full
 * (live + tombstones), so every probe sequence ends at an empty slot.
 */
#include "pep/strmap.h"

#include <stdlib.h>
#include <string.h>

static char tombstone_key;
#define TOMBSTONE (&tombstone_key)

struct slot {
    char *key; /* NULL: empty; TOMBSTONE: deleted */
    void *value;
};

struct strmap {
    struct slot *slots;
    size_t cap; /* power of two */
    size_t live;
    size_t used; /* live + tombstones */
};

static uint64_t hash_key(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h;
}

struct strmap *strmap_new(void) {
    struct strmap *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cap = 16;
    m->slots = calloc(m->cap, sizeof *m->slots);
    if (!m->slots) {
        free(m);
        return NULL;
    }
    return m;
}

void strmap_free(struct strmap *m, void (*free_value)(void *)) {
    if (!m) return;
    for (size_t i = 0; i < m->cap; i++) {
        char *k = m->slots[i].key;
        if (k && k != TOMBSTONE) {
            if (free_value) free_value(m->slots[i].value);
            free(k);
        }
    }
    free(m->slots);
    free(m);
}

static struct slot *find(const struct strmap *m, const char *key) {
    size_t mask = m->cap - 1;
    for (size_t i = hash_key(key) & mask;; i = (i + 1) & mask) {
        struct slot *s = &m->slots[i];
        if (!s->key) return NULL;
        if (s->key != TOMBSTONE && strcmp(s->key, key) == 0) return s;
    }
}

void *strmap_get(const struct strmap *m, const char *key) {
    struct slot *s = find(m, key);
    return s ? s->value : NULL;
}

static int grow(struct strmap *m) {
    size_t ncap = m->live * 2 + 16 > m->cap ? m->cap * 2 : m->cap;
    struct slot *ns = calloc(ncap, sizeof *ns);
    if (!ns) return PEP_ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        struct slot *s = &m->slots[i];
        if (!s->key || s->key == TOMBSTONE) continue;
        size_t j = hash_key(s->key) & (ncap - 1);
        while (ns[j].key)
            j = (j + 1) & (ncap - 1);
        ns[j] = *s;
    }
    free(m->slots);
    m->slots = ns;
    m->cap = ncap;
    m->used = m->live;
    return 0;
}

int strmap_put(struct strmap *m, const char *key, void *value, void **old) {
    struct slot *s = find(m, key);
    if (s) {
        if (old) *old = s->value;
        s->value = value;
        return 0;
    }
    if (old) *old = NULL;
    if ((m->used + 1) * 4 > m->cap * 3 && grow(m) != 0) return PEP_ENOMEM;
    char *k = strdup(key);
    if (!k) return PEP_ENOMEM;
    size_t mask = m->cap - 1;
    size_t i = hash_key(key) & mask;
    while (m->slots[i].key && m->slots[i].key != TOMBSTONE)
        i = (i + 1) & mask;
    if (!m->slots[i].key) m->used++;
    m->slots[i].key = k;
    m->slots[i].value = value;
    m->live++;
    return 0;
}

void *strmap_remove(struct strmap *m, const char *key) {
    struct slot *s = find(m, key);
    if (!s) return NULL;
    void *v = s->value;
    free(s->key);
    s->key = TOMBSTONE;
    s->value = NULL;
    m->live--;
    return v;
}

size_t strmap_len(const struct strmap *m) {
    return m->live;
}

void strmap_each(const struct strmap *m, void (*fn)(const char *key, void *value, void *arg),
                 void *arg) {
    for (size_t i = 0; i < m->cap; i++) {
        struct slot *s = &m->slots[i];
        if (s->key && s->key != TOMBSTONE) fn(s->key, s->value, arg);
    }
}
