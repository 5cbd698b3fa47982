/*
 * strmap.h — a small string-keyed hash map (open addressing, linear probing, tombstones).
 *
 * Used for the registry's agents, operators and token ids.  Keys are copied; values are
 * opaque pointers the caller owns.  Not thread-safe: the owner guards it with its lock.
 */
#ifndef PEP_STRMAP_H
#define PEP_STRMAP_H

#include "pep/common.h"

struct strmap;

struct strmap *strmap_new(void);
/* Frees the map and its key copies; calls free_value on each value when not NULL. */
void strmap_free(struct strmap *m, void (*free_value)(void *));
/* Looks up key; returns the value or NULL. */
void *strmap_get(const struct strmap *m, const char *key);
/* Inserts or replaces; *old (if not NULL) receives the replaced value or NULL.
 * Returns 0 or PEP_ENOMEM. */
int strmap_put(struct strmap *m, const char *key, void *value, void **old);
/* Removes key; returns its value or NULL. */
void *strmap_remove(struct strmap *m, const char *key);
size_t strmap_len(const struct strmap *m);
/* Calls fn(key, value, arg) for every entry, in no particular order. */
void strmap_each(const struct strmap *m, void (*fn)(const char *key, void *value, void *arg),
                 void *arg);

#endif
