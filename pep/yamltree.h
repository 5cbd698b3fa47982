/*
 * yamltree.h — a bounded YAML node tree built from libyaml's event API.
 *
 * Why not libyaml's document API: it has no depth limit, is quadratic in nesting depth and
 * expands aliases (a 24-node "billion laughs" file becomes millions of nodes).  Here the
 * tree is built from events with hard caps on input size, nesting depth and node count,
 * and the YAML features a policy never needs are refused where they appear:
 *
 *   - anchors and aliases (an alias becomes a YAMLTREE_INVALID node),
 *   - explicit tags,
 *   - non-scalar mapping keys (the pair is dropped),
 *   - duplicate mapping keys (libyaml accepts them silently; the later pair is dropped),
 *   - more than one document.
 *
 * Those are reported through the caller's callback and parsing goes on, so that one run
 * reports as much as possible.  A syntax error or a cap exceeded is fatal: the callback is
 * told, and no tree is returned.  Every location is 1-based (libyaml's marks are 0-based).
 *
 * Scalars are typed by the YAML 1.2 core schema: a plain `10` is an integer, `1.5` a float,
 * `true`/`false` a boolean, `null`, `~` or nothing null; any quoted or block scalar, and
 * every other plain scalar, is a string.
 *
 * Threads: no global state; any thread may parse, a tree belongs to its caller.
 */
#ifndef PEP_YAMLTREE_H
#define PEP_YAMLTREE_H

#include "pep/common.h"

enum yamltree_kind {
    YAMLTREE_SCALAR,
    YAMLTREE_MAPPING,
    YAMLTREE_SEQUENCE,
    YAMLTREE_INVALID /* an alias, refused and already reported: callers skip it silently */
};

enum yamltree_type { /* of a scalar, YAML 1.2 core schema */
                     YAMLTREE_NULL,
                     YAMLTREE_BOOL,
                     YAMLTREE_INT,
                     YAMLTREE_FLOAT,
                     YAMLTREE_STRING
};

struct yamltree_node {
    enum yamltree_kind kind;
    int line; /* 1-based start of the node (of '{' / '[' in flow style) */
    int col;
    /* YAMLTREE_SCALAR */
    char *text;      /* NUL-terminated; may hold NULs from "\0" escapes */
    size_t text_len; /* bytes in text, the terminating NUL excluded */
    enum yamltree_type type;
    /* YAMLTREE_MAPPING: items[2i] is the key (always a scalar), items[2i+1] its value, and
     * len counts pairs.  YAMLTREE_SEQUENCE: items[i], len counts items. */
    struct yamltree_node **items;
    size_t len;
    size_t nitems; /* pointers in items (2*len for a complete mapping) */
    size_t cap;    /* allocated slots in items */
};

struct yamltree_limits {
    size_t max_bytes; /* input larger than this is refused before parsing */
    int max_depth;    /* nested mappings/sequences, the root counting as 1 */
    size_t max_nodes; /* scalars + mappings + sequences + aliases */
};

/* Receives one problem: 1-based location and a message (valid only during the call). */
typedef void (*yamltree_error_fn)(void *arg, int line, int col, const char *msg);

/*
 * Parses len bytes of data (need not be NUL-terminated).  Returns 0 with *root set (NULL
 * for an empty stream) — non-fatal problems may have been reported —, PEP_EINVAL after a
 * fatal problem (reported; *root is NULL), or PEP_ENOMEM.  Free the tree with
 * yamltree_free.
 */
int yamltree_parse(const char *data, size_t len, const struct yamltree_limits *lim,
                   yamltree_error_fn on_error, void *arg, struct yamltree_node **root);

void yamltree_free(struct yamltree_node *node);

/* A mapping's i-th key and value (i < len). */
static inline const struct yamltree_node *yamltree_key(const struct yamltree_node *map, size_t i) {
    return map->items[2 * i];
}
static inline const struct yamltree_node *yamltree_value(const struct yamltree_node *map,
                                                         size_t i) {
    return map->items[2 * i + 1];
}

/* The value of `key` in map, or NULL when absent or map is not a mapping. */
const struct yamltree_node *yamltree_get(const struct yamltree_node *map, const char *key);
/* The key node of `key` in map (for its location), or NULL. */
const struct yamltree_node *yamltree_get_key(const struct yamltree_node *map, const char *key);

/* Whether a scalar's text equals the C string s (and holds no NUL). */
bool yamltree_text_is(const struct yamltree_node *scalar, const char *s);

/* "a mapping", "a sequence", "a string", "an integer", "a number", "a boolean", "null". */
const char *yamltree_describe(const struct yamltree_node *node);

/* Value of a YAMLTREE_INT scalar (decimal, 0x hex, 0o octal); PEP_EINVAL when it is not an
 * integer or overflows int64_t. */
int yamltree_int(const struct yamltree_node *scalar, int64_t *out);
/* Value of a YAMLTREE_INT or YAMLTREE_FLOAT scalar (.inf and .nan included). */
int yamltree_double(const struct yamltree_node *scalar, double *out);

/* Writes s (len bytes) into buf for an error message: non-printable bytes as \xNN, cut
 * with "..." to fit.  Returns buf. */
const char *yamltree_quote(const char *s, size_t len, char *buf, size_t bufsz);

#endif
