/*
 * yamltree.c — libyaml events → bounded node tree (see yamltree.h for the why).
 *
 * The builder keeps an explicit stack of open containers, never deeper than
 * lim->max_depth, so neither libyaml nor this code recurses on hostile input; the only
 * recursion (yamltree_free) is bounded by the same cap.  Every node is linked into its
 * parent the moment it is created, so one yamltree_free(root) releases everything on any
 * exit path.  Duplicate keys are found when a mapping closes, by sorting its keys
 * (O(n log n): a mapping with 100k keys must not cost 10^10 comparisons).
 *
 * Threads: no shared state.
 */
#include "pep/yamltree.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

/* One parse in progress. */
struct yamltree_builder {
    const struct yamltree_limits *lim;
    yamltree_error_fn on_error;
    void *arg;
    const char *data; /* the input, to locate reader errors by byte offset */
    size_t data_len;
    struct yamltree_node *root;
    struct yamltree_node **stack; /* open containers, stack[0] outermost */
    int depth;
    size_t nodes;
    int documents;
    bool fatal; /* stop: syntax error or cap exceeded (already reported) */
    bool oom;
};

static void yamltree_report(struct yamltree_builder *b, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void yamltree_report(struct yamltree_builder *b, int line, int col, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (b->on_error) b->on_error(b->arg, line, col, msg);
}

const char *yamltree_quote(const char *s, size_t len, char *buf, size_t bufsz) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (bufsz == 0) return buf;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        bool plain = ch >= 0x20 && ch < 0x7f && ch != '\\';
        size_t need = plain ? 1 : 4;
        /* keep room for "..." and the NUL when more input follows */
        size_t reserve = i + 1 < len ? 4 : 1;
        if (o + need + reserve > bufsz) {
            if (o + 4 <= bufsz) {
                memcpy(buf + o, "...", 3);
                o += 3;
            }
            break;
        }
        if (plain) {
            buf[o++] = (char)ch;
        } else {
            buf[o++] = '\\';
            buf[o++] = 'x';
            buf[o++] = hex[ch >> 4];
            buf[o++] = hex[ch & 15];
        }
    }
    buf[o < bufsz ? o : bufsz - 1] = '\0';
    return buf;
}

void yamltree_free(struct yamltree_node *node) {
    if (!node) return;
    for (size_t i = 0; i < node->nitems; i++)
        yamltree_free(node->items[i]);
    free(node->items);
    free(node->text);
    free(node);
}

/* ---- scalar typing (YAML 1.2 core schema) ------------------------------------------- */

static bool yamltree_all(const char *s, const char *set) {
    if (*s == '\0') return false;
    return strspn(s, set) == strlen(s);
}

static bool yamltree_is_int(const char *s) {
    if (strncmp(s, "0o", 2) == 0) return yamltree_all(s + 2, "01234567");
    if (strncmp(s, "0x", 2) == 0) return yamltree_all(s + 2, "0123456789abcdefABCDEF");
    if (*s == '-' || *s == '+') s++;
    return yamltree_all(s, "0123456789");
}

static bool yamltree_is_float(const char *s) {
    static const char *const special[] = {".inf", ".Inf", ".INF", ".nan", ".NaN", ".NAN"};
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    for (size_t i = 0; i < PEP_ARRAY_LEN(special); i++)
        if (strcmp(p, special[i]) == 0) return i < 3 || p == s; /* .nan takes no sign */
    /* [-+]? ( \.[0-9]+ | [0-9]+ ( \.[0-9]* )? ) ( [eE] [-+]? [0-9]+ )? */
    size_t int_digits = strspn(p, "0123456789");
    p += int_digits;
    size_t frac_digits = 0;
    if (*p == '.') {
        p++;
        frac_digits = strspn(p, "0123456789");
        p += frac_digits;
    }
    if (int_digits == 0 && frac_digits == 0) return false;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '-' || *p == '+') p++;
        size_t exp_digits = strspn(p, "0123456789");
        if (exp_digits == 0) return false;
        p += exp_digits;
    }
    return *p == '\0';
}

static enum yamltree_type yamltree_type_of(const char *text, size_t len, bool plain) {
    static const char *const nulls[] = {"~", "null", "Null", "NULL"};
    static const char *const bools[] = {"true", "True", "TRUE", "false", "False", "FALSE"};
    if (!plain || strlen(text) != len) return YAMLTREE_STRING;
    if (len == 0) return YAMLTREE_NULL;
    for (size_t i = 0; i < PEP_ARRAY_LEN(nulls); i++)
        if (strcmp(text, nulls[i]) == 0) return YAMLTREE_NULL;
    for (size_t i = 0; i < PEP_ARRAY_LEN(bools); i++)
        if (strcmp(text, bools[i]) == 0) return YAMLTREE_BOOL;
    if (yamltree_is_int(text)) return YAMLTREE_INT;
    if (yamltree_is_float(text)) return YAMLTREE_FLOAT;
    return YAMLTREE_STRING;
}

int yamltree_int(const struct yamltree_node *n, int64_t *out) {
    if (!n || n->kind != YAMLTREE_SCALAR || n->type != YAMLTREE_INT) return PEP_EINVAL;
    const char *s = n->text;
    int base = 10;
    if (strncmp(s, "0o", 2) == 0) {
        s += 2;
        base = 8;
    } else if (strncmp(s, "0x", 2) == 0) {
        s += 2;
        base = 16;
    }
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, base);
    if (errno == ERANGE || *end != '\0') return PEP_EINVAL;
    *out = (int64_t)v;
    return 0;
}

int yamltree_double(const struct yamltree_node *n, double *out) {
    if (!n || n->kind != YAMLTREE_SCALAR) return PEP_EINVAL;
    if (n->type == YAMLTREE_INT) {
        int64_t v;
        if (yamltree_int(n, &v) != 0) return PEP_EINVAL;
        *out = (double)v;
        return 0;
    }
    if (n->type != YAMLTREE_FLOAT) return PEP_EINVAL;
    const char *s = n->text;
    const char *p = s + (*s == '-' || *s == '+');
    if (p[0] == '.' && (p[1] == 'i' || p[1] == 'I')) {
        *out = *s == '-' ? -INFINITY : INFINITY;
        return 0;
    }
    if (p[0] == '.' && (p[1] == 'n' || p[1] == 'N')) {
        *out = NAN;
        return 0;
    }
    char *end;
    *out = strtod(s, &end); /* ERANGE: ±HUGE_VAL or 0, still a number */
    return *end == '\0' ? 0 : PEP_EINVAL;
}

/* ---- lookups ------------------------------------------------------------------------ */

bool yamltree_text_is(const struct yamltree_node *n, const char *s) {
    return n && n->kind == YAMLTREE_SCALAR && n->text_len == strlen(s) &&
           memcmp(n->text, s, n->text_len) == 0;
}

const struct yamltree_node *yamltree_get_key(const struct yamltree_node *map, const char *key) {
    if (!map || map->kind != YAMLTREE_MAPPING) return NULL;
    for (size_t i = 0; i < map->len; i++)
        if (yamltree_text_is(yamltree_key(map, i), key)) return yamltree_key(map, i);
    return NULL;
}

const struct yamltree_node *yamltree_get(const struct yamltree_node *map, const char *key) {
    if (!map || map->kind != YAMLTREE_MAPPING) return NULL;
    for (size_t i = 0; i < map->len; i++)
        if (yamltree_text_is(yamltree_key(map, i), key)) return yamltree_value(map, i);
    return NULL;
}

const char *yamltree_describe(const struct yamltree_node *n) {
    if (!n) return "nothing";
    switch (n->kind) {
    case YAMLTREE_MAPPING:
        return "a mapping";
    case YAMLTREE_SEQUENCE:
        return "a sequence";
    case YAMLTREE_INVALID:
        return "an alias";
    case YAMLTREE_SCALAR:
        break;
    }
    switch (n->type) {
    case YAMLTREE_NULL:
        return "null";
    case YAMLTREE_BOOL:
        return "a boolean";
    case YAMLTREE_INT:
        return "an integer";
    case YAMLTREE_FLOAT:
        return "a number";
    case YAMLTREE_STRING:
        break;
    }
    return "a string";
}

/* ---- building ----------------------------------------------------------------------- */

static int yamltree_append(struct yamltree_node *parent, struct yamltree_node *child) {
    if (parent->nitems == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 4;
        struct yamltree_node **items = realloc(parent->items, cap * sizeof *items);
        if (!items) return PEP_ENOMEM;
        parent->items = items;
        parent->cap = cap;
    }
    parent->items[parent->nitems++] = child;
    if (parent->kind == YAMLTREE_SEQUENCE) parent->len = parent->nitems;
    return 0;
}

/* Creates a node at mark and links it into the open container (or makes it the root).
 * Returns NULL after reporting a cap or setting oom. */
static struct yamltree_node *yamltree_new_node(struct yamltree_builder *b, enum yamltree_kind kind,
                                               yaml_mark_t mark) {
    int line = (int)mark.line + 1, col = (int)mark.column + 1;
    if (++b->nodes > b->lim->max_nodes) {
        yamltree_report(b, line, col, "too many YAML nodes (the limit is %zu)", b->lim->max_nodes);
        b->fatal = true;
        return NULL;
    }
    struct yamltree_node *n = calloc(1, sizeof *n);
    if (!n) {
        b->oom = true;
        return NULL;
    }
    n->kind = kind;
    n->line = line;
    n->col = col;
    if (b->depth == 0) {
        if (b->root) { /* cannot happen: one document, one root */
            yamltree_free(n);
            b->fatal = true;
            return NULL;
        }
        b->root = n;
    } else if (yamltree_append(b->stack[b->depth - 1], n) != 0) {
        yamltree_free(n);
        b->oom = true;
        return NULL;
    }
    return n;
}

/* SECURITY: anchors and aliases are refused (billion laughs, and a policy that reads
 * differently from what it says); tags are refused because the schema types scalars itself. */
static void yamltree_check_props(struct yamltree_builder *b, yaml_mark_t mark,
                                 const yaml_char_t *anchor, const yaml_char_t *tag) {
    char q[80];
    int line = (int)mark.line + 1, col = (int)mark.column + 1;
    if (anchor) {
        const char *a = (const char *)anchor;
        yamltree_report(b, line, col, "YAML anchors are not allowed ('&%s')",
                        yamltree_quote(a, strlen(a), q, sizeof q));
    }
    if (tag) {
        const char *t = (const char *)tag;
        yamltree_report(b, line, col, "YAML tags are not allowed ('%s')",
                        yamltree_quote(t, strlen(t), q, sizeof q));
    }
}

/* A mapping key just arrived when the open container is a mapping with an even count. */
static bool yamltree_expecting_key(const struct yamltree_builder *b) {
    if (b->depth == 0) return false;
    const struct yamltree_node *top = b->stack[b->depth - 1];
    return top->kind == YAMLTREE_MAPPING && top->nitems % 2 == 0;
}

static int yamltree_push(struct yamltree_builder *b, enum yamltree_kind kind, yaml_mark_t mark) {
    if (b->depth >= b->lim->max_depth) {
        yamltree_report(b, (int)mark.line + 1, (int)mark.column + 1,
                        "YAML nesting is deeper than %d levels", b->lim->max_depth);
        b->fatal = true;
        return PEP_EINVAL;
    }
    if (yamltree_expecting_key(b))
        yamltree_report(b, (int)mark.line + 1, (int)mark.column + 1,
                        "mapping keys must be scalars");
    struct yamltree_node *n = yamltree_new_node(b, kind, mark);
    if (!n) return b->oom ? PEP_ENOMEM : PEP_EINVAL;
    b->stack[b->depth++] = n;
    return 0;
}

/* Sort entry for duplicate detection: a key and its pair index. */
struct yamltree_keyref {
    const struct yamltree_node *key;
    size_t index;
};

static int yamltree_keyref_cmp(const void *a, const void *b) {
    const struct yamltree_keyref *x = a, *y = b;
    size_t n = x->key->text_len < y->key->text_len ? x->key->text_len : y->key->text_len;
    int c = memcmp(x->key->text, y->key->text, n);
    if (c != 0) return c;
    if (x->key->text_len != y->key->text_len) return x->key->text_len < y->key->text_len ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* A mapping closed: drop pairs with a non-scalar key (reported when they opened) and the
 * later pairs of duplicate keys (reported here), keeping file order. */
static int yamltree_close_mapping(struct yamltree_builder *b, struct yamltree_node *map) {
    size_t pairs = map->nitems / 2;
    int rc = 0;
    bool *drop = calloc(pairs ? pairs : 1, sizeof *drop);
    struct yamltree_keyref *refs = calloc(pairs ? pairs : 1, sizeof *refs);
    if (!drop || !refs) {
        rc = PEP_ENOMEM;
        goto out;
    }
    size_t nrefs = 0;
    for (size_t i = 0; i < pairs; i++) {
        const struct yamltree_node *k = map->items[2 * i];
        if (k->kind != YAMLTREE_SCALAR)
            drop[i] = true;
        else
            refs[nrefs++] = (struct yamltree_keyref){k, i};
    }
    qsort(refs, nrefs, sizeof *refs, yamltree_keyref_cmp);
    /* Sorted by (text, index): each run of equal keys starts with the one written first. */
    size_t first = 0;
    for (size_t i = 1; i < nrefs; i++) {
        const struct yamltree_node *k = refs[i].key, *f = refs[first].key;
        if (k->text_len != f->text_len || memcmp(k->text, f->text, k->text_len) != 0) {
            first = i;
            continue;
        }
        char q[80];
        yamltree_report(b, k->line, k->col, "duplicate key '%s' (first at line %d, column %d)",
                        yamltree_quote(k->text, k->text_len, q, sizeof q), f->line, f->col);
        drop[refs[i].index] = true;
    }
    size_t o = 0;
    for (size_t i = 0; i < pairs; i++) {
        if (drop[i]) {
            yamltree_free(map->items[2 * i]);
            yamltree_free(map->items[2 * i + 1]);
            continue;
        }
        map->items[o++] = map->items[2 * i];
        map->items[o++] = map->items[2 * i + 1];
    }
    map->nitems = o;
    map->len = o / 2;
out:
    free(drop);
    free(refs);
    return rc;
}

/* Reports a libyaml error with its own problem text and mark. */
static void yamltree_syntax_error(struct yamltree_builder *b, const yaml_parser_t *parser) {
    int line = (int)parser->problem_mark.line + 1, col = (int)parser->problem_mark.column + 1;
    if (parser->error == YAML_READER_ERROR) {
        /* Reader errors carry a byte offset, not a mark. */
        size_t off = parser->problem_offset < b->data_len ? parser->problem_offset : b->data_len;
        line = 1;
        col = 1;
        for (size_t i = 0; i < off; i++) {
            if (b->data[i] == '\n') {
                line++;
                col = 1;
            } else if (((unsigned char)b->data[i] & 0xC0) != 0x80) {
                col++; /* columns count characters, as libyaml's marks do */
            }
        }
    }
    const char *problem = parser->problem ? parser->problem : "invalid YAML";
    if (parser->context)
        yamltree_report(b, line, col, "YAML syntax error: %s (%s at line %d, column %d)", problem,
                        parser->context, (int)parser->context_mark.line + 1,
                        (int)parser->context_mark.column + 1);
    else
        yamltree_report(b, line, col, "YAML syntax error: %s", problem);
    b->fatal = true;
}

/* Handles one event; sets *done at the end of the stream. */
static int yamltree_event(struct yamltree_builder *b, const yaml_event_t *ev, bool *done) {
    int rc = 0;
    switch (ev->type) {
    case YAML_NO_EVENT:
    case YAML_STREAM_START_EVENT:
    case YAML_DOCUMENT_END_EVENT:
        break;
    case YAML_STREAM_END_EVENT:
        *done = true;
        break;
    case YAML_DOCUMENT_START_EVENT:
        if (b->documents++ > 0) {
            yamltree_report(b, (int)ev->start_mark.line + 1, (int)ev->start_mark.column + 1,
                            "a policy file holds a single YAML document");
            b->fatal = true;
            rc = PEP_EINVAL;
        }
        break;
    case YAML_ALIAS_EVENT: {
        char q[80];
        const char *a = (const char *)ev->data.alias.anchor;
        yamltree_report(b, (int)ev->start_mark.line + 1, (int)ev->start_mark.column + 1,
                        "YAML aliases are not allowed ('*%s')",
                        yamltree_quote(a, strlen(a), q, sizeof q));
        if (!yamltree_new_node(b, YAMLTREE_INVALID, ev->start_mark))
            rc = b->oom ? PEP_ENOMEM : PEP_EINVAL;
        break;
    }
    case YAML_SCALAR_EVENT: {
        yamltree_check_props(b, ev->start_mark, ev->data.scalar.anchor, ev->data.scalar.tag);
        struct yamltree_node *n = yamltree_new_node(b, YAMLTREE_SCALAR, ev->start_mark);
        if (!n) return b->oom ? PEP_ENOMEM : PEP_EINVAL;
        n->text = malloc(ev->data.scalar.length + 1);
        if (!n->text) {
            b->oom = true;
            return PEP_ENOMEM;
        }
        memcpy(n->text, ev->data.scalar.value, ev->data.scalar.length);
        n->text[ev->data.scalar.length] = '\0';
        n->text_len = ev->data.scalar.length;
        n->type = yamltree_type_of(n->text, n->text_len,
                                   ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE);
        break;
    }
    case YAML_SEQUENCE_START_EVENT:
        yamltree_check_props(b, ev->start_mark, ev->data.sequence_start.anchor,
                             ev->data.sequence_start.tag);
        rc = yamltree_push(b, YAMLTREE_SEQUENCE, ev->start_mark);
        break;
    case YAML_MAPPING_START_EVENT:
        yamltree_check_props(b, ev->start_mark, ev->data.mapping_start.anchor,
                             ev->data.mapping_start.tag);
        rc = yamltree_push(b, YAMLTREE_MAPPING, ev->start_mark);
        break;
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
        if (PEP_NEVER(b->depth == 0)) return PEP_EINVAL;
        b->depth--;
        if (ev->type == YAML_MAPPING_END_EVENT) rc = yamltree_close_mapping(b, b->stack[b->depth]);
        break;
    }
    return rc;
}

int yamltree_parse(const char *data, size_t len, const struct yamltree_limits *lim,
                   yamltree_error_fn on_error, void *arg, struct yamltree_node **root) {
    struct yamltree_builder b = {
        .lim = lim, .on_error = on_error, .arg = arg, .data = data, .data_len = len};
    yaml_parser_t parser;
    bool parser_ready = false;
    int rc = 0;

    *root = NULL;
    if (len > lim->max_bytes) {
        yamltree_report(&b, 1, 1, "the file is larger than %zu bytes", lim->max_bytes);
        return PEP_EINVAL;
    }
    b.stack = calloc((size_t)lim->max_depth + 1, sizeof *b.stack);
    if (!b.stack) return PEP_ENOMEM;
    if (!yaml_parser_initialize(&parser)) {
        rc = PEP_ENOMEM;
        goto out;
    }
    parser_ready = true;
    yaml_parser_set_input_string(&parser, (const unsigned char *)data, len);

    for (bool done = false; !done && rc == 0;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            if (parser.error == YAML_MEMORY_ERROR) {
                rc = PEP_ENOMEM;
            } else {
                yamltree_syntax_error(&b, &parser);
                rc = PEP_EINVAL;
            }
            break;
        }
        rc = yamltree_event(&b, &ev, &done);
        yaml_event_delete(&ev);
        if (rc == 0 && b.oom) rc = PEP_ENOMEM;
        if (rc == 0 && b.fatal) rc = PEP_EINVAL;
    }
out:
    if (parser_ready) yaml_parser_delete(&parser);
    free(b.stack);
    if (rc != 0) {
        yamltree_free(b.root);
        return rc;
    }
    *root = b.root;
    return 0;
}
