/*
 * policy.c — compiles a `version: 1` policy file (SPEC 2) into a struct policy.
 *
 * Pipeline: bytes → yamltree (bounded, anchors/aliases/duplicate keys refused) → schema
 * check and compilation section by section, in dependency order (agents, upstreams,
 * chains, actions, routes) so that every reference resolves to a pointer into an array
 * that is never reallocated (found through sorted name indexes, so that even a policy at
 * the node cap compiles in O(n log n)) → errors sorted into file order.  Nothing stops at the first
 * error: every helper reports what is wrong with its node and the caller goes on with the next one,
 * so one run lists every problem.
 *
 * Invariants:
 *   - The compiled struct owns every string, array and json_t it points to; policy_free
 *     releases all of it and copes with a half-compiled struct (error paths).
 *   - A policy is returned only when no error was reported.  Every feature the file can
 *     name is enforced: a rule is never compiled and then silently ignored.
 *   - Error messages may quote names from the file, never a header's literal value
 *     (which could be a credential).
 *
 * Threads: loading touches no shared state and may run on any thread; a returned policy
 * is immutable and shared by reference count (policy_retain / policy_release).
 */
#include "pep/policy.h"

#include "pep/route.h"
#include "pep/util.h"
#include "pep/yamltree.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct yamltree_node ynode;

/* One error before formatting; seq keeps the order of errors at the same location. */
struct policy_error_entry {
    int line;
    int col;
    size_t seq;
    char *msg;
};

/* One entry of a sorted index: a key and the position, in file order, of what it names. */
struct policy_index_entry {
    char *key;
    size_t index;
    struct policy_loc loc; /* where a duplicate of this key is reported */
};

/* A sorted index (names → array positions, or route shapes), so that resolving references
 * and finding duplicates costs O(n log n) even for a policy of 10^5 entries. */
struct policy_index {
    struct policy_index_entry *entries;
    size_t len;
    size_t cap;
};

/* State of one load. */
struct policy_compiler {
    const char *name; /* FILE in messages */
    struct policy *p; /* being filled */
    struct policy_error_entry *errors;
    size_t errors_len;
    size_t errors_cap;
    bool oom;                      /* an allocation failed: the load fails with PEP_ENOMEM */
    struct policy_index upstreams; /* name → p->upstreams[] */
    struct policy_index chains;    /* name → p->chains[] */
    struct policy_index actions;   /* name → p->actions[] */
    struct policy_index agent_ids; /* id → p->agents[], for duplicates */
    struct policy_index routes;    /* method + template shape → p->routes[], for duplicates */
};

/* A key a mapping may hold. */
struct policy_key {
    const char *name;
    bool required;
};

/* Retryable by default when `retry.on` is not written (see policy.h). */
static const int policy_default_retry_status[] = {429, 500, 502, 503, 504};

/* ---- errors ------------------------------------------------------------------------- */

static void policy_error(struct policy_compiler *c, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void policy_error(struct policy_compiler *c, int line, int col, const char *fmt, ...) {
    if (c->errors_len == c->errors_cap) {
        size_t cap = c->errors_cap ? c->errors_cap * 2 : 16;
        struct policy_error_entry *e = realloc(c->errors, cap * sizeof *e);
        if (!e) {
            c->oom = true;
            return;
        }
        c->errors = e;
        c->errors_cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *msg = NULL;
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0) {
        c->oom = true;
        return;
    }
    c->errors[c->errors_len] =
        (struct policy_error_entry){.line = line, .col = col, .seq = c->errors_len, .msg = msg};
    c->errors_len++;
}

#define policy_error_at(c, node, ...) policy_error((c), (node)->line, (node)->col, __VA_ARGS__)

static void policy_tree_error(void *arg, int line, int col, const char *msg) {
    policy_error(arg, line, col, "%s", msg);
}

static int policy_error_cmp(const void *a, const void *b) {
    const struct policy_error_entry *x = a, *y = b;
    if (x->line != y->line) return x->line < y->line ? -1 : 1;
    if (x->col != y->col) return x->col < y->col ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Sorts the errors into file order and formats them "FILE:LINE:COL: message" into errs. */
static void policy_errors_export(struct policy_compiler *c, struct policy_errors *errs) {
    if (c->errors_len > 1) qsort(c->errors, c->errors_len, sizeof *c->errors, policy_error_cmp);
    if (!errs || c->errors_len == 0) return;
    errs->items = calloc(c->errors_len, sizeof *errs->items);
    if (!errs->items) {
        c->oom = true;
        return;
    }
    for (size_t i = 0; i < c->errors_len; i++) {
        const struct policy_error_entry *e = &c->errors[i];
        char *s = NULL;
        if (asprintf(&s, "%s:%d:%d: %s", c->name, e->line, e->col, e->msg) < 0) {
            c->oom = true;
            return;
        }
        errs->items[errs->len++] = s;
    }
}

/* One error without a location ("FILE: message"), for a file that cannot be read. */
static int policy_errors_single(struct policy_errors *errs, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int policy_errors_single(struct policy_errors *errs, int code, const char *fmt, ...) {
    if (!errs) return code;
    errs->items = calloc(1, sizeof *errs->items);
    if (!errs->items) return PEP_ENOMEM;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&errs->items[0], fmt, ap);
    va_end(ap);
    if (n < 0) {
        free(errs->items);
        errs->items = NULL;
        return PEP_ENOMEM;
    }
    errs->len = 1;
    return code;
}

void policy_errors_free(struct policy_errors *errs) {
    if (!errs) return;
    for (size_t i = 0; i < errs->len; i++)
        free(errs->items[i]);
    free(errs->items);
    errs->items = NULL;
    errs->len = 0;
}

/* ---- freeing ------------------------------------------------------------------------ */

static void policy_strv_free(char **v, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static void policy_cond_test_free(struct cond_test *t) {
    free(t->name);
    policy_strv_free(t->path, t->path_len);
    json_decref(t->value);
}

/* Frees what a struct cond holds, not the struct itself. */
static void policy_cond_free(struct cond *cd) {
    if (!cd) return;
    for (size_t i = 0; i < cd->tests_len; i++)
        policy_cond_test_free(&cd->tests[i]);
    free(cd->tests);
    for (size_t i = 0; i < cd->any_len; i++)
        policy_cond_free(&cd->any[i]);
    free(cd->any);
}

static void policy_action_free(struct action *a) {
    free(a->name);
    free(a->scope);
    free(a->rate_limits);
    for (size_t i = 0; i < a->controls_len; i++) {
        struct control *ctl = &a->controls[i];
        policy_cond_free(ctl->when);
        free(ctl->when);
        free(ctl->deny_reason);
        free(ctl->acr);
        policy_strv_free(ctl->approvers, ctl->approvers_len);
        free(ctl->notify);
    }
    free(a->controls);
}

static void policy_upstream_free(struct upstream *u) {
    free(u->name);
    free(u->base_url);
    free(u->api_key_env);
    for (size_t i = 0; i < u->headers_len; i++) {
        free(u->headers[i].name);
        free(u->headers[i].env);
        free(u->headers[i].value);
    }
    free(u->headers);
}

static void policy_chain_free(struct chain *ch) {
    free(ch->name);
    free(ch->retry.on_status);
    for (size_t i = 0; i < ch->steps_len; i++)
        free(ch->steps[i].model);
    free(ch->steps);
    policy_strv_free(ch->context_overflow_body_contains, ch->context_overflow_body_contains_len);
    free(ch->context_overflow_step.model);
    free(ch->escalate_webhook);
}

static void policy_route_free(struct route *r) {
    free(r->method);
    free(r->path);
    route_segments_free(r->segments, r->segments_len);
    free(r->forward_path);
    for (size_t i = 0; i < r->forward_parts_len; i++) {
        free(r->forward_parts[i].literal);
        free(r->forward_parts[i].param);
    }
    free(r->forward_parts);
    free(r->retry.on_status);
}

static void policy_agent_free(struct policy_agent *a) {
    free(a->id);
    free(a->owner);
    policy_strv_free(a->tenants, a->tenants_len);
    policy_strv_free(a->scopes, a->scopes_len);
}

/* Frees a policy, complete or half-compiled. */
static void policy_free(struct policy *p) {
    if (!p) return;
    free(p->file);
    free(p->listen);
    free(p->admin_listen);
    free(p->data_dir);
    free(p->issuer);
    for (size_t i = 0; i < p->agents_len; i++)
        policy_agent_free(&p->agents[i]);
    free(p->agents);
    for (size_t i = 0; i < p->upstreams_len; i++)
        policy_upstream_free(&p->upstreams[i]);
    free(p->upstreams);
    for (size_t i = 0; i < p->chains_len; i++)
        policy_chain_free(&p->chains[i]);
    free(p->chains);
    for (size_t i = 0; i < p->routes_len; i++)
        policy_route_free(&p->routes[i]);
    free(p->routes);
    for (size_t i = 0; i < p->actions_len; i++)
        policy_action_free(&p->actions[i]);
    free(p->actions);
    free(p);
}

struct policy *policy_retain(struct policy *p) {
    if (p) __atomic_add_fetch(&p->refcount, 1, __ATOMIC_RELAXED);
    return p;
}

void policy_release(struct policy *p) {
    /* acq_rel: the last releaser must see every other thread's reads as finished. */
    if (p && __atomic_sub_fetch(&p->refcount, 1, __ATOMIC_ACQ_REL) == 0) policy_free(p);
}

/* ---- lookups ------------------------------------------------------------------------ */

struct action *policy_find_action(const struct policy *p, const char *name) {
    for (size_t i = 0; p && name && i < p->actions_len; i++)
        if (p->actions[i].name && strcmp(p->actions[i].name, name) == 0) return &p->actions[i];
    return NULL;
}

struct upstream *policy_find_upstream(const struct policy *p, const char *name) {
    for (size_t i = 0; p && name && i < p->upstreams_len; i++)
        if (p->upstreams[i].name && strcmp(p->upstreams[i].name, name) == 0)
            return &p->upstreams[i];
    return NULL;
}

struct chain *policy_find_chain(const struct policy *p, const char *name) {
    for (size_t i = 0; p && name && i < p->chains_len; i++)
        if (p->chains[i].name && strcmp(p->chains[i].name, name) == 0) return &p->chains[i];
    return NULL;
}

struct policy_agent *policy_find_agent(const struct policy *p, const char *id) {
    for (size_t i = 0; p && id && i < p->agents_len; i++)
        if (p->agents[i].id && strcmp(p->agents[i].id, id) == 0) return &p->agents[i];
    return NULL;
}

/* ---- indexes ---------------------------------------------------------------------- */

static void policy_index_add(struct policy_compiler *c, struct policy_index *idx, char *key,
                             size_t index, struct policy_loc loc) {
    if (!key) { /* an allocation that failed upstream */
        c->oom = true;
        return;
    }
    if (idx->len == idx->cap) {
        size_t cap = idx->cap ? idx->cap * 2 : 16;
        struct policy_index_entry *e = realloc(idx->entries, cap * sizeof *e);
        if (!e) {
            c->oom = true;
            free(key);
            return;
        }
        idx->entries = e;
        idx->cap = cap;
    }
    idx->entries[idx->len++] = (struct policy_index_entry){.key = key, .index = index, .loc = loc};
}

static int policy_index_cmp(const void *a, const void *b) {
    const struct policy_index_entry *x = a, *y = b;
    int r = strcmp(x->key, y->key);
    if (r != 0) return r;
    return x->index < y->index ? -1 : x->index > y->index;
}

static void policy_index_sort(struct policy_index *idx) {
    if (idx->len > 1) qsort(idx->entries, idx->len, sizeof *idx->entries, policy_index_cmp);
}

/* The position of the first entry (in file order) with key, or -1. */
static long policy_index_find(const struct policy_index *idx, const char *key) {
    size_t lo = 0, hi = idx->len;
    while (lo < hi) { /* lower bound: the first entry not less than key */
        size_t mid = lo + (hi - lo) / 2;
        if (strcmp(idx->entries[mid].key, key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < idx->len && strcmp(idx->entries[lo].key, key) == 0 ? (long)idx->entries[lo].index
                                                                   : -1;
}

/* Calls report(c, dup, first) for every entry whose key an earlier entry already has. */
static void policy_index_duplicates(struct policy_compiler *c, struct policy_index *idx,
                                    void (*report)(struct policy_compiler *c,
                                                   const struct policy_index_entry *dup,
                                                   const struct policy_index_entry *first)) {
    policy_index_sort(idx);
    size_t first = 0;
    for (size_t i = 1; i < idx->len; i++) {
        if (strcmp(idx->entries[i].key, idx->entries[first].key) != 0)
            first = i;
        else
            report(c, &idx->entries[i], &idx->entries[first]);
    }
}

static void policy_index_free(struct policy_index *idx) {
    for (size_t i = 0; i < idx->len; i++)
        free(idx->entries[i].key);
    free(idx->entries);
}

/* ---- schema helpers ----------------------------------------------------------------- */

static struct policy_loc policy_loc_of(const ynode *n) {
    return (struct policy_loc){.line = n->line, .col = n->col};
}

/* For messages: the scalar's text, escaped and cut. */
static const char *policy_q(const ynode *n, char *buf, size_t bufsz) {
    return yamltree_quote(n->text, n->text_len, buf, bufsz);
}

static void *policy_calloc(struct policy_compiler *c, size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) c->oom = true;
    return p;
}

static char *policy_strdup(struct policy_compiler *c, const char *s) {
    char *d = strdup(s);
    if (!d) c->oom = true;
    return d;
}

/* A lowercase copy: header names are case-insensitive (RFC 9110 5.1), so they are
 * compared in one case. */
static char *policy_strdup_lower(struct policy_compiler *c, const char *s) {
    char *d = policy_strdup(c, s);
    for (char *p = d; p && *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return d;
}

static const char *policy_kind_name(enum yamltree_kind kind) {
    switch (kind) {
    case YAMLTREE_MAPPING:
        return "a mapping";
    case YAMLTREE_SEQUENCE:
        return "a sequence";
    case YAMLTREE_SCALAR:
    case YAMLTREE_INVALID:
        break;
    }
    return "a scalar";
}

/* Whether n is of kind; reports "expected …, got …" when it is not.  An alias (already
 * reported) is skipped silently so that one mistake gives one message. */
static bool policy_want(struct policy_compiler *c, const ynode *n, enum yamltree_kind kind) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    if (n->kind == kind) return true;
    policy_error_at(c, n, "expected %s, got %s", policy_kind_name(kind), yamltree_describe(n));
    return false;
}

/* Levenshtein distance, for "did you mean"; names are short (capped at 63 bytes). */
static size_t policy_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return SIZE_MAX;
    size_t row[64];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* The closest of names[] to key when it is plausibly a typo of it, else NULL. */
static const char *policy_suggest(const char *key, const char *const *names, size_t n) {
    const char *best = NULL;
    size_t best_d = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        size_t d = policy_distance(key, names[i]);
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    size_t len = strlen(key);
    return best && best_d <= 2 && best_d < len ? best : NULL;
}

static void policy_unknown_key(struct policy_compiler *c, const ynode *key,
                               const char *const *names, size_t n) {
    char q[96];
    const char *hint =
        strlen(key->text) == key->text_len ? policy_suggest(key->text, names, n) : NULL;
    if (hint)
        policy_error_at(c, key, "unknown key '%s'; did you mean '%s'?", policy_q(key, q, sizeof q),
                        hint);
    else
        policy_error_at(c, key, "unknown key '%s'", policy_q(key, q, sizeof q));
}

/* Checks that n is a mapping holding only keys of spec (NULL-terminated) and every
 * required one.  Returns false when n is not a mapping. */
static bool policy_map(struct policy_compiler *c, const ynode *n, const struct policy_key *spec) {
    if (!policy_want(c, n, YAMLTREE_MAPPING)) return false;
    const char *names[24];
    size_t nnames = 0;
    for (const struct policy_key *k = spec; k->name && nnames < PEP_ARRAY_LEN(names); k++)
        names[nnames++] = k->name;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *key = yamltree_key(n, i);
        bool known = false;
        for (size_t j = 0; j < nnames && !known; j++)
            known = yamltree_text_is(key, names[j]);
        if (!known) policy_unknown_key(c, key, names, nnames);
    }
    for (const struct policy_key *k = spec; k->name; k++)
        if (k->required && !yamltree_get(n, k->name))
            policy_error_at(c, n, "missing required key '%s'", k->name);
    return true;
}

/* A string: any non-null scalar, as written.  Replaces *out (freeing the old value). */
static bool policy_string(struct policy_compiler *c, const ynode *n, char **out) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    if (n->kind != YAMLTREE_SCALAR || n->type == YAMLTREE_NULL) {
        policy_error_at(c, n, "expected a string, got %s", yamltree_describe(n));
        return false;
    }
    if (strlen(n->text) != n->text_len) {
        policy_error_at(c, n, "a string cannot contain a NUL character");
        return false;
    }
    char *s = policy_strdup(c, n->text);
    if (!s) return false;
    free(*out);
    *out = s;
    return true;
}

/* A non-empty string; `what` names it in the message. */
static bool policy_name(struct policy_compiler *c, const ynode *n, const char *what, char **out) {
    if (!policy_string(c, n, out)) return false;
    if ((*out)[0] == '\0') {
        policy_error_at(c, n, "%s must not be empty", what);
        free(*out);
        *out = NULL;
        return false;
    }
    return true;
}

/* A non-empty string without whitespace (scopes travel space-separated in tokens). */
static bool policy_word(struct policy_compiler *c, const ynode *n, const char *what, char **out) {
    if (!policy_name(c, n, what, out)) return false;
    if (!pep_is_word(*out)) {
        policy_error_at(c, n, "%s must not contain whitespace or control characters", what);
        free(*out);
        *out = NULL;
        return false;
    }
    return true;
}

/* A sequence of words into a new array.  Entries in error are left out. */
/* A scope: a word that is also an RFC 6749 scope-token, so that tokens can carry it. */
static bool policy_scope(struct policy_compiler *c, const ynode *n, const char *what, char **out) {
    if (!policy_word(c, n, what, out)) return false;
    if (!pep_is_scope_token(*out)) {
        char q[64];
        policy_error_at(c, n,
                        "%s '%s' has a character a token cannot carry (RFC 6749: printable "
                        "ASCII except space, '\"' and '\\')",
                        what, policy_q(n, q, sizeof q));
        free(*out);
        *out = NULL;
        return false;
    }
    return true;
}

/* An agent id: the admin API's id rule (pep_is_id), since an agent seeded from the policy
 * is managed through /admin/v1/agents/{id} like any other; an id that is not one URL
 * path segment could never be addressed there. */
static bool policy_agent_id(struct policy_compiler *c, const ynode *n, char **out) {
    if (!policy_name(c, n, "agent id", out)) return false;
    if (!pep_is_id(*out)) {
        char q[64];
        policy_error_at(c, n, "agent id '%s' must be 1-128 characters of [A-Za-z0-9._@-]",
                        policy_q(n, q, sizeof q));
        free(*out);
        *out = NULL;
        return false;
    }
    return true;
}

typedef bool (*policy_item_fn)(struct policy_compiler *c, const ynode *n, const char *what,
                               char **out);

/* A sequence of strings, each checked by item (policy_word or policy_scope). */
static bool policy_word_list(struct policy_compiler *c, const ynode *n, const char *what,
                             bool nonempty, policy_item_fn item, char ***out, size_t *out_len) {
    if (!policy_want(c, n, YAMLTREE_SEQUENCE)) return false;
    if (nonempty && n->len == 0) {
        policy_error_at(c, n, "%s must not be empty", what);
        return false;
    }
    char **v = policy_calloc(c, n->len, sizeof *v);
    if (!v) return false;
    size_t len = 0;
    for (size_t i = 0; i < n->len; i++)
        if (item(c, n->items[i], what, &v[len])) len++;
    *out = v;
    *out_len = len;
    return true;
}

static bool policy_int(struct policy_compiler *c, const ynode *n, int64_t min, int64_t max,
                       int64_t *out) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    int64_t v;
    if (n->kind != YAMLTREE_SCALAR || n->type != YAMLTREE_INT) {
        policy_error_at(c, n, "expected an integer, got %s", yamltree_describe(n));
        return false;
    }
    if (yamltree_int(n, &v) != 0 || v < min || v > max) {
        char q[64];
        if (max == INT64_MAX)
            policy_error_at(c, n, "'%s' is out of range: must be at least %lld",
                            policy_q(n, q, sizeof q), (long long)min);
        else
            policy_error_at(c, n, "'%s' is out of range: must be between %lld and %lld",
                            policy_q(n, q, sizeof q), (long long)min, (long long)max);
        return false;
    }
    *out = v;
    return true;
}

static bool policy_bool(struct policy_compiler *c, const ynode *n, bool *out) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    if (n->kind != YAMLTREE_SCALAR || n->type != YAMLTREE_BOOL) {
        policy_error_at(c, n, "expected a boolean (true or false), got %s", yamltree_describe(n));
        return false;
    }
    *out = n->text[0] == 't' || n->text[0] == 'T';
    return true;
}

static bool policy_duration(struct policy_compiler *c, const ynode *n, int64_t *out_ms) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    char q[64];
    if (n->kind != YAMLTREE_SCALAR || n->type == YAMLTREE_NULL) {
        policy_error_at(c, n, "expected a duration such as 30s, got %s", yamltree_describe(n));
        return false;
    }
    if (strlen(n->text) != n->text_len || pep_parse_duration_ms(n->text, out_ms) != 0) {
        policy_error_at(c, n,
                        "bad duration '%s': expected a positive integer followed by ms, s, m, "
                        "h or d (250ms, 30s, 5m, 1h, 7d)",
                        policy_q(n, q, sizeof q));
        return false;
    }
    return true;
}

/* A duration the code keeps in whole seconds: token lifetimes and clock skew become JWT
 * NumericDates (seconds), a step-up max_age is compared with auth_time and sent as
 * `max_age=N` (RFC 9470, seconds).  1500ms would be cut to 1 s without a word, so only
 * whole seconds are accepted.  *out_ms is written only on success. */
static bool policy_duration_seconds(struct policy_compiler *c, const ynode *n, const char *what,
                                    int64_t *out_ms) {
    int64_t ms;
    if (!policy_duration(c, n, &ms)) return false;
    if (ms % 1000 != 0) {
        char q[64];
        policy_error_at(c, n, "%s must be a whole number of seconds, got '%s'", what,
                        policy_q(n, q, sizeof q));
        return false;
    }
    *out_ms = ms;
    return true;
}

static bool policy_size(struct policy_compiler *c, const ynode *n, uint64_t *out) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    char q[64];
    uint64_t v;
    if (n->kind != YAMLTREE_SCALAR || n->type == YAMLTREE_NULL) {
        policy_error_at(c, n, "expected a size such as 1MiB, got %s", yamltree_describe(n));
        return false;
    }
    if (strlen(n->text) != n->text_len || pep_parse_size(n->text, &v) != 0 || v == 0) {
        policy_error_at(c, n,
                        "bad size '%s': expected a positive integer with an optional unit B, "
                        "KB, KiB, MB, MiB, GB or GiB (e.g. 1MiB)",
                        policy_q(n, q, sizeof q));
        return false;
    }
    *out = v;
    return true;
}

/* One of names[0..n) (a string scalar); *out is its index.  key names the setting. */
static bool policy_enum(struct policy_compiler *c, const ynode *n, const char *key,
                        const char *const *names, size_t count, int *out) {
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    if (n->kind == YAMLTREE_SCALAR) {
        for (size_t i = 0; i < count; i++) {
            if (yamltree_text_is(n, names[i])) {
                *out = (int)i;
                return true;
            }
        }
    }
    char list[256] = "";
    size_t o = 0;
    for (size_t i = 0; i < count && o < sizeof list; i++)
        o += (size_t)snprintf(list + o, sizeof list - o, "%s%s",
                              i == 0           ? ""
                              : i + 1 == count ? " or "
                                               : ", ",
                              names[i]);
    if (n->kind == YAMLTREE_SCALAR) {
        char q[64];
        policy_error_at(c, n, "invalid %s '%s': expected %s", key, policy_q(n, q, sizeof q), list);
    } else {
        policy_error_at(c, n, "invalid %s: expected %s, got %s", key, list, yamltree_describe(n));
    }
    return false;
}

/* ---- small syntax checks ------------------------------------------------------------ */

static bool policy_is_tchar(unsigned char ch) {
    return isalnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static bool policy_is_identifier(const char *s) {
    if (!(isalpha((unsigned char)*s) || *s == '_')) return false;
    for (s++; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '_')) return false;
    return true;
}

/* HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 address; PORT 0-65535. */
static bool policy_check_listen(struct policy_compiler *c, const ynode *n, const char *s) {
    char q[96];
    if (pep_listen_address_ok(s)) return true;
    policy_error_at(c, n, "bad listen address '%s': expected HOST:PORT (e.g. 127.0.0.1:8080)",
                    policy_q(n, q, sizeof q));
    return false;
}

/* Whether two valid listen addresses name the same socket as written: the same host
 * (case-insensitively) and the same port, port 0 ("any free port") excepted. */
static bool policy_same_listen(const char *a, const char *b) {
    const char *ca = strrchr(a, ':'), *cb = strrchr(b, ':');
    if (!ca || !cb || ca - a != cb - b || strncasecmp(a, b, (size_t)(ca - a)) != 0) return false;
    long pa = strtol(ca + 1, NULL, 10), pb = strtol(cb + 1, NULL, 10);
    return pa == pb && pa != 0;
}

/*
 * SECURITY: an upstream or webhook URL must be http:// or https:// — libcurl would
 * otherwise follow a policy to file://, gopher:// or smtp:// — and must not carry
 * credentials (userinfo ends up in logs; keys belong in api_key_env) or a query or
 * fragment (paths are appended to it).  Trailing slashes are removed so that
 * base_url + "/path" never has "//".
 */
static bool policy_url(struct policy_compiler *c, const ynode *n, const char *what, char **out) {
    if (!policy_string(c, n, out)) return false;
    char *s = *out;
    size_t skip = strncasecmp(s, "http://", 7) == 0    ? 7
                  : strncasecmp(s, "https://", 8) == 0 ? 8
                                                       : 0;
    if (skip == 0) {
        policy_error_at(c, n, "%s must start with http:// or https://", what);
        return false;
    }
    for (const char *p = s; *p; p++) {
        if (isspace((unsigned char)*p) || iscntrl((unsigned char)*p) || *p == '?' || *p == '#' ||
            *p == '\\') {
            policy_error_at(c, n, "%s must not contain whitespace, '?', '#' or '\\'", what);
            return false;
        }
    }
    size_t host_len = strcspn(s + skip, "/");
    if (host_len == 0) {
        policy_error_at(c, n, "%s has no host", what);
        return false;
    }
    if (memchr(s + skip, '@', host_len)) {
        policy_error_at(c, n, "%s must not contain credentials (use api_key_env or headers)", what);
        return false;
    }
    size_t len = strlen(s);
    while (len > skip + host_len && s[len - 1] == '/')
        s[--len] = '\0';
    return true;
}

/* ---- conditions --------------------------------------------------------------------- */

/* Indexed by enum cond_op. */
static const char *const policy_cond_ops[] = {"eq", "ne", "lt",     "le",     "gt",
                                              "ge", "in", "not_in", "exists", "prefix"};

/* Converts a scalar to JSON by its YAML 1.2 core type; NULL after an error. */
static json_t *policy_scalar_json(struct policy_compiler *c, const ynode *n) {
    json_t *j = NULL;
    switch (n->type) {
    case YAMLTREE_NULL:
        j = json_null();
        break;
    case YAMLTREE_BOOL:
        j = json_boolean(n->text[0] == 't' || n->text[0] == 'T');
        break;
    case YAMLTREE_INT: {
        int64_t v;
        if (yamltree_int(n, &v) != 0) {
            policy_error_at(c, n, "integer out of range");
            return NULL;
        }
        j = json_integer((json_int_t)v);
        break;
    }
    case YAMLTREE_FLOAT: {
        double d;
        if (yamltree_double(n, &d) != 0 || !isfinite(d)) {
            policy_error_at(c, n, "a number in a condition must be finite");
            return NULL;
        }
        j = json_real(d);
        break;
    }
    case YAMLTREE_STRING:
        j = json_stringn(n->text, n->text_len);
        break;
    }
    if (!j) c->oom = true;
    return j;
}

/* The value of one `op: value`, type-checked for the op. */
static json_t *policy_cond_value(struct policy_compiler *c, enum cond_op op, const ynode *v) {
    const char *opname = policy_cond_ops[op];
    if (v->kind == YAMLTREE_INVALID) return NULL;
    switch (op) {
    case COND_OP_EQ:
    case COND_OP_NE:
        if (v->kind != YAMLTREE_SCALAR) break;
        return policy_scalar_json(c, v);
    case COND_OP_LT:
    case COND_OP_LE:
    case COND_OP_GT:
    case COND_OP_GE:
        if (v->kind != YAMLTREE_SCALAR || (v->type != YAMLTREE_INT && v->type != YAMLTREE_FLOAT))
            break;
        return policy_scalar_json(c, v);
    case COND_OP_EXISTS:
        if (v->kind != YAMLTREE_SCALAR || v->type != YAMLTREE_BOOL) break;
        return policy_scalar_json(c, v);
    case COND_OP_PREFIX:
        /* A prefix is text: 555 in `prefix: 555` means the characters "555". */
        if (v->kind != YAMLTREE_SCALAR || v->type == YAMLTREE_NULL || v->type == YAMLTREE_BOOL)
            break;
        json_t *j = json_stringn(v->text, v->text_len);
        if (!j) c->oom = true;
        return j;
    case COND_OP_IN:
    case COND_OP_NOT_IN: {
        if (v->kind != YAMLTREE_SEQUENCE) break;
        json_t *arr = json_array();
        if (!arr) {
            c->oom = true;
            return NULL;
        }
        bool ok = true;
        for (size_t i = 0; i < v->len; i++) {
            const ynode *item = v->items[i];
            if (item->kind == YAMLTREE_INVALID) {
                ok = false;
                continue;
            }
            if (item->kind != YAMLTREE_SCALAR) {
                policy_error_at(c, item, "'%s' takes a sequence of scalars, got %s in it", opname,
                                yamltree_describe(item));
                ok = false;
                continue;
            }
            json_t *j = policy_scalar_json(c, item);
            if (!j || json_array_append_new(arr, j) != 0) {
                ok = false;
                if (j) c->oom = true;
            }
        }
        if (!ok) {
            json_decref(arr);
            return NULL;
        }
        return arr;
    }
    }
    static const char *const wants[] = {[COND_OP_EQ] = "a scalar",
                                        [COND_OP_NE] = "a scalar",
                                        [COND_OP_LT] = "a number",
                                        [COND_OP_LE] = "a number",
                                        [COND_OP_GT] = "a number",
                                        [COND_OP_GE] = "a number",
                                        [COND_OP_IN] = "a sequence of scalars",
                                        [COND_OP_NOT_IN] = "a sequence of scalars",
                                        [COND_OP_EXISTS] = "true or false",
                                        [COND_OP_PREFIX] = "a string"};
    policy_error_at(c, v, "'%s' takes %s, got %s", opname, wants[op], yamltree_describe(v));
    return NULL;
}

/* Parses a condition field name into t (kind, name, path). */
static bool policy_cond_field(struct policy_compiler *c, const ynode *key, struct cond_test *t) {
    static const struct {
        const char *name;
        enum cond_field_kind kind;
    } fixed[] = {{"method", COND_FIELD_METHOD},       {"tenant", COND_FIELD_TENANT},
                 {"agent.id", COND_FIELD_AGENT_ID},   {"agent.owner", COND_FIELD_AGENT_OWNER},
                 {"time.hour", COND_FIELD_TIME_HOUR}, {"time.weekday", COND_FIELD_TIME_WEEKDAY}};
    char q[96];
    const char *s = key->text;
    if (strlen(s) != key->text_len) goto unknown;
    for (size_t i = 0; i < PEP_ARRAY_LEN(fixed); i++) {
        if (strcmp(s, fixed[i].name) == 0) {
            t->kind = fixed[i].kind;
            return true;
        }
    }
    if (strncmp(s, "body.", 5) == 0) {
        t->kind = COND_FIELD_BODY;
        const char *p = s + 5;
        size_t n = 1;
        for (const char *q2 = p; *q2; q2++)
            n += *q2 == '.';
        t->path = policy_calloc(c, n, sizeof *t->path);
        if (!t->path) return false;
        for (;;) {
            size_t seg = strcspn(p, ".");
            if (seg == 0) {
                policy_error_at(c, key, "empty segment in condition field '%s'",
                                policy_q(key, q, sizeof q));
                return false;
            }
            t->path[t->path_len] = strndup(p, seg);
            if (!t->path[t->path_len]) {
                c->oom = true;
                return false;
            }
            t->path_len++;
            if (p[seg] == '\0') break;
            p += seg + 1;
        }
        return true;
    }
    if (strncmp(s, "header.", 7) == 0) {
        t->kind = COND_FIELD_HEADER;
        const char *name = s + 7;
        bool ok = *name != '\0';
        for (const char *p = name; ok && *p; p++)
            ok = policy_is_tchar((unsigned char)*p);
        if (!ok) {
            policy_error_at(c, key, "bad header name in condition field '%s'",
                            policy_q(key, q, sizeof q));
            return false;
        }
        /* Header names are case-insensitive (SPEC 8); the evaluator compares lowercase. */
        t->name = policy_strdup_lower(c, name);
        return t->name != NULL;
    }
    if (strncmp(s, "query.", 6) == 0 || strncmp(s, "path.", 5) == 0) {
        bool query = s[0] == 'q';
        const char *name = s + (query ? 6 : 5);
        /* Actions are shared by routes, so a path parameter cannot be checked against one
         * template here; the name must at least be one a template could declare. */
        if (query ? *name == '\0' : !policy_is_identifier(name)) {
            policy_error_at(c, key, "bad %s name in condition field '%s'",
                            query ? "query parameter" : "path parameter",
                            policy_q(key, q, sizeof q));
            return false;
        }
        t->kind = query ? COND_FIELD_QUERY : COND_FIELD_PATH;
        t->name = policy_strdup(c, name);
        return t->name != NULL;
    }
unknown:
    policy_error_at(c, key,
                    "unknown condition field '%s': expected body.<path>, header.<name>, "
                    "query.<name>, path.<param>, method, tenant, agent.id, agent.owner, "
                    "time.hour or time.weekday",
                    policy_q(key, q, sizeof q));
    return false;
}

/* Deep copy of a parsed field (for a field with several ops). */
static bool policy_cond_field_copy(struct policy_compiler *c, const struct cond_test *from,
                                   struct cond_test *to) {
    to->kind = from->kind;
    if (from->name && !(to->name = policy_strdup(c, from->name))) return false;
    if (from->path_len) {
        to->path = policy_calloc(c, from->path_len, sizeof *to->path);
        if (!to->path) return false;
        for (size_t i = 0; i < from->path_len; i++) {
            if (!(to->path[i] = policy_strdup(c, from->path[i]))) return false;
            to->path_len++;
        }
    }
    return true;
}

/* Compiles a `when` mapping into *out; nested is true inside `any`. */
static void policy_compile_cond(struct policy_compiler *c, const ynode *n, struct cond *out,
                                bool nested) {
    if (!policy_want(c, n, YAMLTREE_MAPPING)) return;
    out->loc = policy_loc_of(n);
    size_t ntests = 0;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *v = yamltree_value(n, i);
        if (!yamltree_text_is(yamltree_key(n, i), "any") && v->kind == YAMLTREE_MAPPING)
            ntests += v->len;
    }
    out->tests = policy_calloc(c, ntests, sizeof *out->tests);
    if (!out->tests) return;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *key = yamltree_key(n, i), *v = yamltree_value(n, i);
        if (yamltree_text_is(key, "any")) {
            if (nested) {
                policy_error_at(c, key, "'any' cannot be nested inside 'any'");
                continue;
            }
            if (out->any || !policy_want(c, v, YAMLTREE_SEQUENCE)) continue;
            if (v->len == 0) {
                policy_error_at(c, v, "'any' needs at least one alternative");
                continue;
            }
            out->any = policy_calloc(c, v->len, sizeof *out->any);
            if (!out->any) return;
            for (size_t j = 0; j < v->len; j++) {
                policy_compile_cond(c, v->items[j], &out->any[out->any_len], true);
                out->reads_body |= out->any[out->any_len].reads_body;
                out->any_len++;
            }
            continue;
        }
        struct cond_test field = {0};
        if (!policy_cond_field(c, key, &field)) {
            policy_cond_test_free(&field);
            continue;
        }
        if (v->kind != YAMLTREE_INVALID && v->kind != YAMLTREE_MAPPING) {
            policy_error_at(c, v,
                            "expected a mapping of operator to value (e.g. { eq: x }), "
                            "got %s",
                            yamltree_describe(v));
        } else if (v->kind == YAMLTREE_MAPPING && v->len == 0) {
            policy_error_at(c, v,
                            "no operator given (eq, ne, lt, le, gt, ge, in, not_in, "
                            "exists or prefix)");
        }
        for (size_t j = 0; v->kind == YAMLTREE_MAPPING && j < v->len; j++) {
            const ynode *opkey = yamltree_key(v, j), *opval = yamltree_value(v, j);
            int op = -1;
            for (size_t k = 0; k < PEP_ARRAY_LEN(policy_cond_ops); k++)
                if (yamltree_text_is(opkey, policy_cond_ops[k])) op = (int)k;
            if (op < 0) {
                char q[64];
                policy_error_at(c, opkey,
                                "unknown operator '%s': valid operators are eq, ne, lt, le, "
                                "gt, ge, in, not_in, exists and prefix",
                                policy_q(opkey, q, sizeof q));
                continue;
            }
            json_t *value = policy_cond_value(c, (enum cond_op)op, opval);
            if (!value) continue;
            struct cond_test *t = &out->tests[out->tests_len++];
            t->op = (enum cond_op)op;
            t->value = value;
            t->loc = policy_loc_of(key);
            policy_cond_field_copy(c, &field, t);
            if (t->kind == COND_FIELD_BODY) out->reads_body = true;
        }
        policy_cond_test_free(&field);
    }
}

/* ---- sections ----------------------------------------------------------------------- */

static void policy_compile_server(struct policy_compiler *c, const ynode *n) {
    static const struct policy_key keys[] = {{"listen", false},
                                             {"admin_listen", false},
                                             {"data_dir", false},
                                             {"max_body", false},
                                             {"drain_timeout", false},
                                             {"receive_timeout", false},
                                             {"unauthenticated_limit", false},
                                             {NULL, false}};
    static const struct policy_key limit_keys[] = {
        {"limit", true}, {"window", true}, {NULL, false}};
    struct policy *p = c->p;
    if (!policy_map(c, n, keys)) return;
    const ynode *v, *listen = yamltree_get(n, "listen"), *admin = yamltree_get(n, "admin_listen");
    bool listen_ok = !listen || (policy_string(c, listen, &p->listen) &&
                                 policy_check_listen(c, listen, p->listen));
    bool admin_ok = !admin || (policy_string(c, admin, &p->admin_listen) &&
                               policy_check_listen(c, admin, p->admin_listen));
    /* One address cannot serve both planes: `pep serve` would fail to bind the second, so
     * a file that `pep check` calls valid would not start. */
    if (listen_ok && admin_ok && (listen || admin) &&
        policy_same_listen(p->listen, p->admin_listen)) {
        char q[96];
        if (admin)
            policy_error_at(c, admin, "admin_listen must differ from listen (both are '%s')",
                            policy_q(admin, q, sizeof q));
        else
            policy_error_at(c, listen, "listen must differ from admin_listen (default '%s')",
                            p->admin_listen);
    }
    if (listen) p->listen_loc = policy_loc_of(listen);
    if (admin) p->admin_listen_loc = policy_loc_of(admin);
    if ((v = yamltree_get(n, "data_dir"))) {
        policy_name(c, v, "data_dir", &p->data_dir);
        p->data_dir_loc = policy_loc_of(v);
    }
    if ((v = yamltree_get(n, "max_body"))) policy_size(c, v, &p->max_body);
    if ((v = yamltree_get(n, "drain_timeout"))) policy_duration(c, v, &p->drain_timeout_ms);
    if ((v = yamltree_get(n, "receive_timeout")) && policy_duration(c, v, &p->receive_timeout_ms) &&
        p->receive_timeout_ms < 1000)
        policy_error_at(c, v, "receive_timeout must be at least 1s");
    if ((v = yamltree_get(n, "unauthenticated_limit")) && policy_map(c, v, limit_keys)) {
        const ynode *w;
        if ((w = yamltree_get(v, "limit")))
            policy_int(c, w, 1, INT64_MAX, &p->unauthenticated_limit.limit);
        if ((w = yamltree_get(v, "window")))
            policy_duration(c, w, &p->unauthenticated_limit.window_ms);
    }
}

static void policy_compile_audit(struct policy_compiler *c, const ynode *n) {
    static const struct policy_key keys[] = {
        {"durability", false}, {"on_failure", false}, {"checkpoint_every", false}, {NULL, false}};
    static const char *const durability[] = {
        [AUDIT_DURABILITY_FULL] = "full", [AUDIT_DURABILITY_NORMAL] = "normal"};
    static const char *const on_failure[] = {
        [AUDIT_ON_FAILURE_DENY] = "deny", [AUDIT_ON_FAILURE_ALLOW] = "allow"};
    struct policy *p = c->p;
    if (!policy_map(c, n, keys)) return;
    const ynode *v;
    int e;
    if ((v = yamltree_get(n, "durability")) &&
        policy_enum(c, v, "durability", durability, PEP_ARRAY_LEN(durability), &e))
        p->durability = (enum audit_durability)e;
    if ((v = yamltree_get(n, "on_failure")) &&
        policy_enum(c, v, "on_failure", on_failure, PEP_ARRAY_LEN(on_failure), &e))
        p->on_failure = (enum audit_on_failure)e;
    if ((v = yamltree_get(n, "checkpoint_every")))
        policy_int(c, v, 1, INT64_MAX, &p->checkpoint_every);
}

static void policy_compile_identity(struct policy_compiler *c, const ynode *n) {
    static const struct policy_key keys[] = {{"issuer", false},
                                             {"token_ttl", false},
                                             {"max_token_ttl", false},
                                             {"clock_skew", false},
                                             {NULL, false}};
    struct policy *p = c->p;
    if (!policy_map(c, n, keys)) return;
    const ynode *v, *ttl = yamltree_get(n, "token_ttl"), *max = yamltree_get(n, "max_token_ttl");
    if ((v = yamltree_get(n, "issuer"))) policy_name(c, v, "issuer", &p->issuer);
    /* Both parsed before combining: every bad duration is reported in the same run. */
    bool ttl_ok = !ttl || policy_duration_seconds(c, ttl, "token_ttl", &p->token_ttl_ms);
    bool max_ok = !max || policy_duration_seconds(c, max, "max_token_ttl", &p->max_token_ttl_ms);
    bool ok = ttl_ok && max_ok;
    if ((v = yamltree_get(n, "clock_skew")))
        policy_duration_seconds(c, v, "clock_skew", &p->clock_skew_ms);
    if (ok && p->token_ttl_ms > p->max_token_ttl_ms) {
        if (max)
            policy_error_at(c, max, "max_token_ttl must be at least token_ttl");
        else
            policy_error_at(c, ttl, "token_ttl exceeds max_token_ttl (default 7d)");
    }
}

static void policy_report_duplicate_agent(struct policy_compiler *c,
                                          const struct policy_index_entry *dup,
                                          const struct policy_index_entry *first) {
    char q[96];
    const char *id = c->p->agents[dup->index].id;
    policy_error(c, dup->loc.line, dup->loc.col, "duplicate agent id '%s' (first at line %d)",
                 yamltree_quote(id, strlen(id), q, sizeof q), c->p->agents[first->index].loc.line);
}

static void policy_compile_agents(struct policy_compiler *c, const ynode *n) {
    static const struct policy_key keys[] = {{"id", true},       {"owner", false},
                                             {"tenants", true},  {"scopes", true},
                                             {"enabled", false}, {NULL, false}};
    struct policy *p = c->p;
    if (!policy_want(c, n, YAMLTREE_SEQUENCE)) return;
    p->agents = policy_calloc(c, n->len, sizeof *p->agents);
    if (!p->agents) return;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *item = n->items[i], *v;
        if (!policy_map(c, item, keys)) continue;
        struct policy_agent *a = &p->agents[p->agents_len++];
        a->enabled = true;
        a->loc = policy_loc_of(item);
        if ((v = yamltree_get(item, "id")) && policy_agent_id(c, v, &a->id))
            policy_index_add(c, &c->agent_ids, strdup(a->id), p->agents_len - 1, policy_loc_of(v));
        if ((v = yamltree_get(item, "owner"))) policy_name(c, v, "owner", &a->owner);
        if ((v = yamltree_get(item, "tenants")))
            policy_word_list(c, v, "tenants", true, policy_word, &a->tenants, &a->tenants_len);
        if ((v = yamltree_get(item, "scopes")))
            policy_word_list(c, v, "scope", false, policy_scope, &a->scopes, &a->scopes_len);
        if ((v = yamltree_get(item, "enabled"))) policy_bool(c, v, &a->enabled);
    }
    policy_index_duplicates(c, &c->agent_ids, policy_report_duplicate_agent);
}

static void policy_compile_breaker(struct policy_compiler *c, const ynode *n,
                                   struct breaker_config *b) {
    static const struct policy_key keys[] = {{"failure_threshold", false},
                                             {"failure_rate", false},
                                             {"min_requests", false},
                                             {"window", false},
                                             {"open_for", false},
                                             {"half_open_probes", false},
                                             {"success_threshold", false},
                                             {"count_429", false},
                                             {NULL, false}};
    if (!policy_map(c, n, keys)) return;
    b->present = true;
    b->loc = policy_loc_of(n);
    const ynode *v;
    if ((v = yamltree_get(n, "failure_threshold")))
        policy_int(c, v, 1, INT64_MAX, &b->failure_threshold);
    if ((v = yamltree_get(n, "failure_rate"))) {
        double d;
        if (v->kind != YAMLTREE_INVALID &&
            (v->kind != YAMLTREE_SCALAR || yamltree_double(v, &d) != 0))
            policy_error_at(c, v, "expected a number, got %s", yamltree_describe(v));
        else if (v->kind == YAMLTREE_SCALAR && !(d > 0 && d <= 1))
            policy_error_at(c, v, "failure_rate must be in (0, 1]");
        else if (v->kind == YAMLTREE_SCALAR)
            b->failure_rate = d;
    }
    if ((v = yamltree_get(n, "min_requests"))) policy_int(c, v, 1, INT64_MAX, &b->min_requests);
    if ((v = yamltree_get(n, "window"))) policy_duration(c, v, &b->window_ms);
    if ((v = yamltree_get(n, "open_for"))) policy_duration(c, v, &b->open_for_ms);
    if ((v = yamltree_get(n, "half_open_probes")))
        policy_int(c, v, 1, INT64_MAX, &b->half_open_probes);
    if ((v = yamltree_get(n, "success_threshold")))
        policy_int(c, v, 1, INT64_MAX, &b->success_threshold);
    if ((v = yamltree_get(n, "count_429"))) policy_bool(c, v, &b->count_429);
}

/*
 * SECURITY: headers that frame the message or the connection are pep's to set; an
 * upstream header that overrode them would desynchronise pep and the upstream (request
 * smuggling).
 */
static bool policy_header_forbidden(const char *name) {
    static const char *const forbidden[] = {
        "content-length", "transfer-encoding", "connection",      "host", "keep-alive", "te",
        "trailer",        "upgrade",           "proxy-connection"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(forbidden); i++)
        if (strcasecmp(name, forbidden[i]) == 0) return true;
    return false;
}

/* Header names are case-insensitive (RFC 9110 5.1): the YAML duplicate-key check does not
 * see X-A and x-a as the same key, so this reports every later spelling of a name. */
static void policy_headers_duplicates(struct policy_compiler *c, const ynode *n,
                                      struct policy_index *names) {
    policy_index_sort(names);
    size_t first = 0;
    for (size_t i = 1; i < names->len; i++) {
        const struct policy_index_entry *e = &names->entries[i], *f = &names->entries[first];
        if (strcmp(e->key, f->key) != 0) {
            first = i;
            continue;
        }
        /* Names passed the token check: they hold nothing that needs quoting. */
        policy_error(c, e->loc.line, e->loc.col,
                     "duplicate header '%s' (same as '%s' at line %d, column %d: header "
                     "names are case-insensitive)",
                     yamltree_key(n, e->index)->text, yamltree_key(n, f->index)->text, f->loc.line,
                     f->loc.col);
    }
}

/* has_api_key: the upstream sets api_key_env, which owns the Authorization header. */
static void policy_compile_headers(struct policy_compiler *c, const ynode *n, struct upstream *u,
                                   bool has_api_key) {
    if (!policy_want(c, n, YAMLTREE_MAPPING)) return;
    u->headers = policy_calloc(c, n->len, sizeof *u->headers);
    if (!u->headers) return;
    struct policy_index names = {0}; /* lowercase name → position, for duplicates */
    for (size_t i = 0; i < n->len; i++) {
        const ynode *key = yamltree_key(n, i), *v = yamltree_value(n, i);
        char q[96];
        bool ok = key->text_len > 0 && strlen(key->text) == key->text_len;
        for (const char *p = key->text; ok && *p; p++)
            ok = policy_is_tchar((unsigned char)*p);
        if (!ok) {
            policy_error_at(c, key, "bad header name '%s'", policy_q(key, q, sizeof q));
            continue;
        }
        if (policy_header_forbidden(key->text)) {
            policy_error_at(c, key, "header '%s' cannot be set on an upstream",
                            policy_q(key, q, sizeof q));
            continue;
        }
        policy_index_add(c, &names, policy_strdup_lower(c, key->text), i, policy_loc_of(key));
        /* SECURITY: api_key_env already sends "Authorization: Bearer …"; a second
         * Authorization would put two credentials in one request, and which one an upstream
         * honours is up to it. */
        if (has_api_key && strcasecmp(key->text, "authorization") == 0) {
            policy_error_at(c, key,
                            "header '%s' conflicts with api_key_env, which sends "
                            "'Authorization: Bearer ...': keep one of them",
                            key->text);
            continue;
        }
        struct upstream_header *h = &u->headers[u->headers_len];
        if (v->kind == YAMLTREE_MAPPING) {
            static const struct policy_key env_keys[] = {{"env", true}, {NULL, false}};
            const ynode *env = yamltree_get(v, "env");
            if (!policy_map(c, v, env_keys) || !env || !policy_name(c, env, "env", &h->env))
                continue;
            if (!policy_is_identifier(h->env)) {
                policy_error_at(c, env, "bad environment variable name '%s'",
                                policy_q(env, q, sizeof q));
                free(h->env);
                h->env = NULL;
                continue;
            }
        } else if (v->kind == YAMLTREE_SCALAR && v->type != YAMLTREE_NULL) {
            /* SECURITY: CR/LF in a value would inject headers.  The value itself is never
             * quoted in a message: it may be a credential. */
            bool clean = strlen(v->text) == v->text_len;
            for (const char *p = v->text; clean && *p; p++)
                clean = !iscntrl((unsigned char)*p) || *p == '\t';
            if (!clean) {
                policy_error_at(c, v, "header value must not contain control characters");
                continue;
            }
            if (!(h->value = policy_strdup(c, v->text))) continue;
        } else {
            if (v->kind != YAMLTREE_INVALID)
                policy_error_at(c, v, "expected a string or { env: VARIABLE }, got %s",
                                yamltree_describe(v));
            continue;
        }
        if (!(h->name = policy_strdup(c, key->text))) {
            free(h->env);
            free(h->value);
            h->env = h->value = NULL;
            continue;
        }
        u->headers_len++;
    }
    policy_headers_duplicates(c, n, &names);
    policy_index_free(&names);
}

static void policy_compile_upstream(struct policy_compiler *c, const ynode *n, struct upstream *u) {
    static const struct policy_key keys[] = {
        {"base_url", true},      {"api_key_env", false}, {"headers", false}, {"timeout", false},
        {"idle_timeout", false}, {"breaker", false},     {NULL, false}};
    u->timeout_ms = 30000;
    u->breaker = (struct breaker_config){.failure_threshold = 5,
                                         .failure_rate = 0.5,
                                         .min_requests = 10,
                                         .window_ms = 30000,
                                         .open_for_ms = 60000,
                                         .half_open_probes = 1,
                                         .success_threshold = 2};
    if (!policy_map(c, n, keys)) return;
    const ynode *v;
    if ((v = yamltree_get(n, "base_url"))) policy_url(c, v, "base_url", &u->base_url);
    if ((v = yamltree_get(n, "api_key_env")) && policy_name(c, v, "api_key_env", &u->api_key_env) &&
        !policy_is_identifier(u->api_key_env)) {
        char q[96];
        policy_error_at(c, v, "bad environment variable name '%s'", policy_q(v, q, sizeof q));
    }
    if ((v = yamltree_get(n, "headers")))
        policy_compile_headers(c, v, u, yamltree_get(n, "api_key_env") != NULL);
    if ((v = yamltree_get(n, "timeout"))) policy_duration(c, v, &u->timeout_ms);
    if ((v = yamltree_get(n, "idle_timeout"))) policy_duration(c, v, &u->idle_timeout_ms);
    if ((v = yamltree_get(n, "breaker"))) policy_compile_breaker(c, v, &u->breaker);
}

/* Allocates the array of a name → definition mapping; *len is its size, names copied. */
static bool policy_named_section(struct policy_compiler *c, const ynode *n, size_t elem_size,
                                 void **array, size_t *len) {
    if (!policy_want(c, n, YAMLTREE_MAPPING)) return false;
    *array = policy_calloc(c, n->len, elem_size);
    if (!*array) return false;
    *len = n->len;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *key = yamltree_key(n, i);
        if (key->text_len == 0) policy_error_at(c, key, "a name must not be empty");
    }
    return true;
}

static void policy_compile_upstreams(struct policy_compiler *c, const ynode *n) {
    struct policy *p = c->p;
    if (!policy_named_section(c, n, sizeof *p->upstreams, (void **)&p->upstreams,
                              &p->upstreams_len))
        return;
    for (size_t i = 0; i < n->len; i++) {
        struct upstream *u = &p->upstreams[i];
        u->loc = policy_loc_of(yamltree_key(n, i));
        if (policy_string(c, yamltree_key(n, i), &u->name))
            policy_index_add(c, &c->upstreams, strdup(u->name), i, u->loc);
        policy_compile_upstream(c, yamltree_value(n, i), u);
    }
    policy_index_sort(&c->upstreams);
}

/* Resolves an upstream name at node v; NULL (reported) when unknown. */
static struct upstream *policy_ref_upstream(struct policy_compiler *c, const ynode *v) {
    char *name = NULL;
    struct upstream *u = NULL;
    if (!policy_name(c, v, "upstream", &name)) return NULL;
    long i = policy_index_find(&c->upstreams, name);
    u = i >= 0 ? &c->p->upstreams[i] : NULL;
    if (!u) {
        char q[96];
        policy_error_at(c, v, "unknown upstream '%s'", policy_q(v, q, sizeof q));
    }
    free(name);
    return u;
}

/* Fills the defaults of a retry (see policy.h). */
static void policy_retry_defaults(struct policy_compiler *c, struct retry_config *r) {
    *r = (struct retry_config){.on_timeout = true,
                               .on_connect_error = true,
                               .max_attempts = 1,
                               .base_ms = 1000,
                               .max_ms = 60000,
                               .jitter = RETRY_JITTER_FULL,
                               .respect_retry_after = true};
    r->on_status = policy_calloc(c, PEP_ARRAY_LEN(policy_default_retry_status), sizeof(int));
    if (!r->on_status) return;
    memcpy(r->on_status, policy_default_retry_status, sizeof policy_default_retry_status);
    r->on_status_len = PEP_ARRAY_LEN(policy_default_retry_status);
}

static void policy_compile_retry(struct policy_compiler *c, const ynode *n,
                                 struct retry_config *r) {
    static const struct policy_key keys[] = {
        {"on", false},     {"max_attempts", false},        {"base", false}, {"max", false},
        {"jitter", false}, {"respect_retry_after", false}, {NULL, false}};
    static const char *const jitter[] = {
        [RETRY_JITTER_NONE] = "none", [RETRY_JITTER_FULL] = "full", [RETRY_JITTER_EQUAL] = "equal"};
    if (!policy_map(c, n, keys)) return;
    r->present = true;
    r->loc = policy_loc_of(n);
    const ynode *v;
    if ((v = yamltree_get(n, "on")) && policy_want(c, v, YAMLTREE_SEQUENCE)) {
        int *st = policy_calloc(c, v->len, sizeof *st);
        if (!st) return;
        free(r->on_status);
        r->on_status = st;
        r->on_status_len = 0;
        r->on_timeout = r->on_connect_error = false;
        for (size_t i = 0; i < v->len; i++) {
            const ynode *item = v->items[i];
            int64_t status;
            if (item->kind == YAMLTREE_INVALID) continue;
            if (yamltree_text_is(item, "timeout")) {
                r->on_timeout = true;
            } else if (yamltree_text_is(item, "connect_error")) {
                r->on_connect_error = true;
            } else if (item->kind == YAMLTREE_SCALAR && item->type == YAMLTREE_INT &&
                       yamltree_int(item, &status) == 0 && status >= 100 && status <= 599) {
                st[r->on_status_len++] = (int)status;
            } else if (item->kind == YAMLTREE_SCALAR) {
                char q[64];
                policy_error_at(c, item,
                                "invalid retry.on entry '%s': expected an HTTP status "
                                "(100-599), timeout or connect_error",
                                policy_q(item, q, sizeof q));
            } else {
                policy_error_at(c, item, "expected a scalar, got %s", yamltree_describe(item));
            }
        }
    }
    if ((v = yamltree_get(n, "max_attempts"))) policy_int(c, v, 1, 100, &r->max_attempts);
    const ynode *base = yamltree_get(n, "base"), *max = yamltree_get(n, "max");
    bool base_ok = !base || policy_duration(c, base, &r->base_ms);
    bool max_ok = !max || policy_duration(c, max, &r->max_ms);
    bool ok = base_ok && max_ok;
    if (ok && r->max_ms < r->base_ms)
        policy_error_at(c, max ? max : base, "retry max must be at least retry base");
    int e;
    if ((v = yamltree_get(n, "jitter")) &&
        policy_enum(c, v, "jitter", jitter, PEP_ARRAY_LEN(jitter), &e))
        r->jitter = (enum retry_jitter)e;
    if ((v = yamltree_get(n, "respect_retry_after"))) policy_bool(c, v, &r->respect_retry_after);
}

static void policy_compile_step(struct policy_compiler *c, const ynode *n, struct chain_step *s) {
    static const struct policy_key keys[] = {{"upstream", true}, {"model", false}, {NULL, false}};
    if (!policy_map(c, n, keys)) return;
    s->loc = policy_loc_of(n);
    const ynode *v;
    if ((v = yamltree_get(n, "upstream"))) s->upstream = policy_ref_upstream(c, v);
    if ((v = yamltree_get(n, "model"))) policy_name(c, v, "model", &s->model);
}

static void policy_compile_context_overflow(struct policy_compiler *c, const ynode *n,
                                            struct chain *ch) {
    static const struct policy_key keys[] = {{"match", true}, {"step", true}, {NULL, false}};
    static const struct policy_key match_keys[] = {
        {"status", true}, {"body_contains", false}, {NULL, false}};
    if (!policy_map(c, n, keys)) return;
    ch->has_context_overflow = true;
    const ynode *m = yamltree_get(n, "match"), *v;
    if (m && policy_map(c, m, match_keys)) {
        int64_t status;
        if ((v = yamltree_get(m, "status")) && policy_int(c, v, 100, 599, &status))
            ch->context_overflow_status = (int)status;
        if ((v = yamltree_get(m, "body_contains")) && policy_want(c, v, YAMLTREE_SEQUENCE)) {
            ch->context_overflow_body_contains =
                policy_calloc(c, v->len, sizeof *ch->context_overflow_body_contains);
            for (size_t i = 0; ch->context_overflow_body_contains && i < v->len; i++) {
                char **slot =
                    &ch->context_overflow_body_contains[ch->context_overflow_body_contains_len];
                if (policy_name(c, v->items[i], "body_contains entry", slot))
                    ch->context_overflow_body_contains_len++;
            }
        }
    }
    if ((v = yamltree_get(n, "step"))) policy_compile_step(c, v, &ch->context_overflow_step);
}

/* A share in [0, 1] (an objective's target rate); *out is written only on success. */
static bool policy_ratio(struct policy_compiler *c, const ynode *n, const char *what, double *out) {
    double d;
    if (!n || n->kind == YAMLTREE_INVALID) return false;
    if (n->kind != YAMLTREE_SCALAR || yamltree_double(n, &d) != 0) {
        policy_error_at(c, n, "expected a number, got %s", yamltree_describe(n));
        return false;
    }
    if (!(d >= 0 && d <= 1)) { /* NaN fails too */
        policy_error_at(c, n, "%s must be between 0 and 1", what);
        return false;
    }
    *out = d;
    return true;
}

static void policy_compile_objectives(struct policy_compiler *c, const ynode *n,
                                      struct chain_objectives *o) {
    static const struct policy_key keys[] = {{"retry_success_rate", false},
                                             {"fallback_activation_rate", false},
                                             {"escalation_rate", false},
                                             {"mean_latency", false},
                                             {NULL, false}};
    if (!policy_map(c, n, keys)) return;
    o->loc = policy_loc_of(n);
    const ynode *v;
    if ((v = yamltree_get(n, "retry_success_rate")))
        o->has_retry_success_rate =
            policy_ratio(c, v, "retry_success_rate", &o->retry_success_rate);
    if ((v = yamltree_get(n, "fallback_activation_rate")))
        o->has_fallback_activation_rate =
            policy_ratio(c, v, "fallback_activation_rate", &o->fallback_activation_rate);
    if ((v = yamltree_get(n, "escalation_rate")))
        o->has_escalation_rate = policy_ratio(c, v, "escalation_rate", &o->escalation_rate);
    if ((v = yamltree_get(n, "mean_latency"))) policy_duration(c, v, &o->mean_latency_ms);
}

static void policy_compile_chain(struct policy_compiler *c, const ynode *n, struct chain *ch) {
    static const struct policy_key keys[] = {
        {"retry", false},    {"steps", true},     {"context_overflow", false},
        {"deadline", false}, {"escalate", false}, {"objectives", false},
        {NULL, false}};
    static const struct policy_key escalate_keys[] = {
        {"webhook", true}, {"after_attempts", false}, {NULL, false}};
    policy_retry_defaults(c, &ch->retry);
    if (!policy_map(c, n, keys)) return;
    const ynode *v;
    if ((v = yamltree_get(n, "retry"))) policy_compile_retry(c, v, &ch->retry);
    if ((v = yamltree_get(n, "steps")) && policy_want(c, v, YAMLTREE_SEQUENCE)) {
        if (v->len == 0) policy_error_at(c, v, "steps must not be empty");
        ch->steps = policy_calloc(c, v->len, sizeof *ch->steps);
        for (size_t i = 0; ch->steps && i < v->len; i++)
            policy_compile_step(c, v->items[i], &ch->steps[ch->steps_len++]);
    }
    if ((v = yamltree_get(n, "context_overflow"))) policy_compile_context_overflow(c, v, ch);
    if ((v = yamltree_get(n, "deadline"))) policy_duration(c, v, &ch->deadline_ms);
    if ((v = yamltree_get(n, "escalate")) && policy_map(c, v, escalate_keys)) {
        const ynode *w;
        if ((w = yamltree_get(v, "webhook"))) policy_url(c, w, "webhook", &ch->escalate_webhook);
        if ((w = yamltree_get(v, "after_attempts")))
            policy_int(c, w, 1, INT64_MAX, &ch->escalate_after_attempts);
    }
    if ((v = yamltree_get(n, "objectives"))) policy_compile_objectives(c, v, &ch->objectives);
}

static void policy_compile_chains(struct policy_compiler *c, const ynode *n) {
    struct policy *p = c->p;
    if (!policy_named_section(c, n, sizeof *p->chains, (void **)&p->chains, &p->chains_len)) return;
    for (size_t i = 0; i < n->len; i++) {
        struct chain *ch = &p->chains[i];
        ch->loc = policy_loc_of(yamltree_key(n, i));
        if (policy_string(c, yamltree_key(n, i), &ch->name))
            policy_index_add(c, &c->chains, strdup(ch->name), i, ch->loc);
        policy_compile_chain(c, yamltree_value(n, i), ch);
    }
    policy_index_sort(&c->chains);
}

static void policy_compile_control(struct policy_compiler *c, const ynode *n, struct control *ctl) {
    static const struct policy_key keys[] = {{"when", false},
                                             {"deny", false},
                                             {"step_up", false},
                                             {"require_approval", false},
                                             {NULL, false}};
    static const struct policy_key step_up_keys[] = {
        {"acr", true}, {"max_age", false}, {NULL, false}};
    static const struct policy_key approval_keys[] = {{"approvers", true},
                                                      {"ttl", false},
                                                      {"distinct_from_owner", false},
                                                      {"notify", false},
                                                      {NULL, false}};
    static const char *const kinds[] = {[CONTROL_DENY] = "deny",
                                        [CONTROL_STEP_UP] = "step_up",
                                        [CONTROL_REQUIRE_APPROVAL] = "require_approval"};
    ctl->approval_ttl_ms = 3600000;
    if (!policy_map(c, n, keys)) return;
    ctl->loc = policy_loc_of(n);
    const ynode *v;
    if ((v = yamltree_get(n, "when"))) {
        ctl->when = policy_calloc(c, 1, sizeof *ctl->when);
        if (ctl->when) policy_compile_cond(c, v, ctl->when, false);
    }
    int found = 0;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *key = yamltree_key(n, i);
        for (size_t k = 0; k < PEP_ARRAY_LEN(kinds); k++) {
            if (!yamltree_text_is(key, kinds[k])) continue;
            if (found++ == 0)
                ctl->kind = (enum control_kind)k;
            else
                policy_error_at(c, key,
                                "a control has exactly one of 'deny', 'step_up' or "
                                "'require_approval'");
        }
    }
    if (found == 0) {
        policy_error_at(c, n, "missing required key 'deny', 'step_up' or 'require_approval'");
        return;
    }
    if ((v = yamltree_get(n, kinds[ctl->kind])) == NULL) return;
    switch (ctl->kind) {
    case CONTROL_DENY:
        policy_name(c, v, "deny reason", &ctl->deny_reason);
        break;
    case CONTROL_STEP_UP:
        if (policy_map(c, v, step_up_keys)) {
            const ynode *w;
            if ((w = yamltree_get(v, "acr"))) policy_word(c, w, "acr", &ctl->acr);
            if ((w = yamltree_get(v, "max_age")))
                policy_duration_seconds(c, w, "max_age", &ctl->max_age_ms);
        }
        break;
    case CONTROL_REQUIRE_APPROVAL:
        if (policy_map(c, v, approval_keys)) {
            const ynode *w;
            if ((w = yamltree_get(v, "approvers")))
                policy_word_list(c, w, "approvers", true, policy_word, &ctl->approvers,
                                 &ctl->approvers_len);
            if ((w = yamltree_get(v, "ttl"))) policy_duration(c, w, &ctl->approval_ttl_ms);
            if ((w = yamltree_get(v, "distinct_from_owner")))
                policy_bool(c, w, &ctl->distinct_from_owner);
            if ((w = yamltree_get(v, "notify"))) policy_url(c, w, "notify", &ctl->notify);
        }
        break;
    }
}

static void policy_compile_action(struct policy_compiler *c, const ynode *n, struct action *a) {
    static const struct policy_key keys[] = {
        {"scope", true}, {"rate_limits", false}, {"controls", false}, {NULL, false}};
    static const struct policy_key limit_keys[] = {
        {"key", true}, {"limit", true}, {"window", true}, {NULL, false}};
    static const char *const limit_key_names[] = {[RATELIMIT_KEY_AGENT] = "agent",
                                                  [RATELIMIT_KEY_TENANT] = "tenant",
                                                  [RATELIMIT_KEY_GLOBAL] = "global"};
    if (!policy_map(c, n, keys)) return;
    const ynode *v;
    if ((v = yamltree_get(n, "scope"))) policy_scope(c, v, "scope", &a->scope);
    if ((v = yamltree_get(n, "rate_limits")) && policy_want(c, v, YAMLTREE_SEQUENCE)) {
        a->rate_limits = policy_calloc(c, v->len, sizeof *a->rate_limits);
        for (size_t i = 0; a->rate_limits && i < v->len; i++) {
            const ynode *item = v->items[i], *w;
            if (!policy_map(c, item, limit_keys)) continue;
            struct ratelimit_rule *r = &a->rate_limits[a->rate_limits_len++];
            r->loc = policy_loc_of(item);
            int e;
            if ((w = yamltree_get(item, "key")) &&
                policy_enum(c, w, "rate limit key", limit_key_names, PEP_ARRAY_LEN(limit_key_names),
                            &e))
                r->key = (enum ratelimit_key)e;
            if ((w = yamltree_get(item, "limit"))) policy_int(c, w, 1, INT64_MAX, &r->limit);
            if ((w = yamltree_get(item, "window"))) policy_duration(c, w, &r->window_ms);
        }
    }
    if ((v = yamltree_get(n, "controls")) && policy_want(c, v, YAMLTREE_SEQUENCE)) {
        a->controls = policy_calloc(c, v->len, sizeof *a->controls);
        for (size_t i = 0; a->controls && i < v->len; i++) {
            struct control *ctl = &a->controls[a->controls_len++];
            policy_compile_control(c, v->items[i], ctl);
            if (ctl->when && ctl->when->reads_body) a->reads_body = true;
        }
    }
}

static void policy_compile_actions(struct policy_compiler *c, const ynode *n) {
    struct policy *p = c->p;
    if (!policy_named_section(c, n, sizeof *p->actions, (void **)&p->actions, &p->actions_len))
        return;
    for (size_t i = 0; i < n->len; i++) {
        struct action *a = &p->actions[i];
        a->loc = policy_loc_of(yamltree_key(n, i));
        if (policy_string(c, yamltree_key(n, i), &a->name))
            policy_index_add(c, &c->actions, strdup(a->name), i, a->loc);
        policy_compile_action(c, yamltree_value(n, i), a);
    }
    policy_index_sort(&c->actions);
}

/* A route's identity for duplicates: its method and its template's shape (a parameter's
 * name does not matter: /t/{a} and /t/{b} match the same requests).  Literals hold no
 * control byte, so "\x01" stands for a parameter and "\n" separates the method. */
static char *policy_route_key(const struct route *r) {
    size_t len = (r->method ? strlen(r->method) : 0) + 2;
    for (size_t i = 0; i < r->segments_len; i++)
        len += 1 + (r->segments[i].literal ? strlen(r->segments[i].literal) : 1);
    char *key = malloc(len), *o = key;
    if (!key) return NULL;
    o += sprintf(o, "%s\n", r->method ? r->method : "");
    for (size_t i = 0; i < r->segments_len; i++)
        o += sprintf(o, "/%s", r->segments[i].literal ? r->segments[i].literal : "\x01");
    return key;
}

static void policy_report_duplicate_route(struct policy_compiler *c,
                                          const struct policy_index_entry *dup,
                                          const struct policy_index_entry *first) {
    char q[96];
    const struct route *r = &c->p->routes[dup->index];
    policy_error(c, dup->loc.line, dup->loc.col, "duplicate route %s %s (first at line %d)",
                 r->method ? r->method : "(any method)",
                 yamltree_quote(r->path, strlen(r->path), q, sizeof q),
                 c->p->routes[first->index].loc.line);
}

/* Returns true when the route's path template compiled (its parameters are known). */
static bool policy_compile_match(struct policy_compiler *c, const ynode *n, struct route *r) {
    static const struct policy_key keys[] = {{"method", false}, {"path", true}, {NULL, false}};
    bool compiled = false;
    if (!policy_map(c, n, keys)) return false;
    const ynode *v;
    char q[96];
    if ((v = yamltree_get(n, "method")) && policy_name(c, v, "method", &r->method)) {
        bool ok = true;
        for (char *s = r->method; *s && ok; s++) {
            ok = isalpha((unsigned char)*s);
            *s = (char)toupper((unsigned char)*s);
        }
        if (!ok) policy_error_at(c, v, "bad method '%s'", policy_q(v, q, sizeof q));
    }
    if ((v = yamltree_get(n, "path")) && policy_string(c, v, &r->path)) {
        const char *why = NULL;
        int rc = route_compile_template(r->path, &r->segments, &r->segments_len, &why);
        if (rc == PEP_ENOMEM) {
            c->oom = true;
        } else if (rc != 0) {
            policy_error_at(c, v, "bad path template '%s': %s", policy_q(v, q, sizeof q),
                            why ? why : "invalid");
        } else {
            compiled = true;
            for (size_t i = 0; i < r->segments_len; i++)
                if (r->segments[i].param && strcmp(r->segments[i].param, "tenant") == 0)
                    r->tenant_param = (int)i;
            policy_index_add(c, &c->routes, policy_route_key(r), (size_t)(r - c->p->routes),
                             policy_loc_of(v));
        }
    }
    return compiled;
}

/* Append a literal or a parameter to r->forward_parts (sized for the worst case). */
static void policy_forward_literal(struct policy_compiler *c, struct route *r, const char *text,
                                   size_t len) {
    struct forward_path_part *part = &r->forward_parts[r->forward_parts_len];
    if ((part->literal = strndup(text, len)))
        r->forward_parts_len++;
    else
        c->oom = true;
}

static void policy_forward_param(struct policy_compiler *c, struct route *r, const char *name,
                                 size_t index) {
    struct forward_path_part *part = &r->forward_parts[r->forward_parts_len];
    part->param_index = index;
    if ((part->param = policy_strdup(c, name))) r->forward_parts_len++;
    r->forward_path_params = true;
}

/*
 * Compiles r->forward_path (already checked to be a normal-form path) into
 * r->forward_parts: literal text between whole-segment `{name}` parameters, each of which
 * must be a parameter of the route's own template (known when match_ok).  A name the
 * template lacks has no value to substitute: sent literally it would reach an upstream
 * resource nobody meant.
 */
static void policy_compile_forward_path(struct policy_compiler *c, const ynode *v, struct route *r,
                                        bool match_ok) {
    const char *s = r->forward_path;
    size_t nparts = 1;
    for (const char *p = s; *p; p++)
        nparts += *p == '{' ? 2 : 0;
    r->forward_parts = policy_calloc(c, nparts, sizeof *r->forward_parts);
    if (!r->forward_parts) return;
    /* The template's parameters in order (at most ROUTE_MAX_PARAMS): a lookup costs at
     * most that many comparisons however long the template or the rewrite. */
    const char *params[ROUTE_MAX_PARAMS];
    size_t nparams = 0;
    for (size_t i = 0; i < r->segments_len && nparams < ROUTE_MAX_PARAMS; i++)
        if (r->segments[i].param) params[nparams++] = r->segments[i].param;
    char q[96];
    const char *lit = s; /* start of the literal text not yet stored */
    for (const char *seg = s + 1;; seg++) {
        size_t len = strcspn(seg, "/");
        bool braces = memchr(seg, '{', len) || memchr(seg, '}', len);
        if (braces) {
            bool whole = len >= 3 && seg[0] == '{' && seg[len - 1] == '}';
            char *name = whole ? strndup(seg + 1, len - 2) : NULL;
            if (whole && !name) {
                c->oom = true;
                return;
            }
            if (!name || !policy_is_identifier(name)) {
                policy_error_at(c, v,
                                "bad forward path '%s': a parameter is written {name}, "
                                "name [A-Za-z_][A-Za-z0-9_]*, and fills a whole segment",
                                policy_q(v, q, sizeof q));
            } else {
                size_t index = 0;
                while (index < nparams && strcmp(params[index], name) != 0)
                    index++;
                if (index == nparams && match_ok)
                    policy_error_at(
                        c, v, "forward.path: {%s} is not a parameter of the route's path", name);
                policy_forward_literal(c, r, lit, (size_t)(seg - lit));
                policy_forward_param(c, r, name, index);
                lit = seg + len;
            }
            free(name);
        }
        if (seg[len] == '\0') break;
        seg += len;
    }
    if (*lit || r->forward_parts_len == 0) policy_forward_literal(c, r, lit, strlen(lit));
}

static void policy_compile_forward(struct policy_compiler *c, const ynode *n, struct route *r,
                                   bool match_ok) {
    static const struct policy_key keys[] = {{"upstream", false},   {"chain", false},
                                             {"path", false},       {"retry", false},
                                             {"retry_safe", false}, {NULL, false}};
    if (!policy_map(c, n, keys)) return;
    r->forwards = true;
    const ynode *up = yamltree_get(n, "upstream"), *chain = yamltree_get(n, "chain"), *v;
    if (up && chain)
        policy_error_at(c, yamltree_get_key(n, "chain"),
                        "forward has exactly one of 'upstream' or 'chain'");
    else if (!up && !chain)
        policy_error_at(c, n, "missing required key 'upstream' or 'chain'");
    if (up) r->upstream = policy_ref_upstream(c, up);
    if (chain && !up) {
        char *name = NULL;
        if (policy_name(c, chain, "chain", &name)) {
            long i = policy_index_find(&c->chains, name);
            if (i >= 0) {
                r->chain = &c->p->chains[i];
            } else {
                char q[96];
                policy_error_at(c, chain, "unknown chain '%s'", policy_q(chain, q, sizeof q));
            }
        }
        free(name);
    }
    if ((v = yamltree_get(n, "path")) && policy_string(c, v, &r->forward_path)) {
        /* SECURITY: the rewrite is sent upstream verbatim, so it must be a path pep itself
         * would accept: no dot segments, encoded slashes or control bytes. */
        char *decoded = NULL;
        const char *why = NULL;
        int rc =
            strpbrk(r->forward_path, "?#")
                ? PEP_EINVAL
                : route_normalize_path(r->forward_path, strlen(r->forward_path), &decoded, &why);
        free(decoded);
        if (rc == PEP_ENOMEM) {
            c->oom = true;
        } else if (rc != 0) {
            char q[96];
            policy_error_at(c, v, "bad forward path '%s': %s", policy_q(v, q, sizeof q),
                            why ? why : "a path has no query or fragment");
        } else {
            policy_compile_forward_path(c, v, r, match_ok);
        }
    }
    if ((v = yamltree_get(n, "retry"))) {
        if (chain && !up)
            policy_error_at(c, yamltree_get_key(n, "retry"),
                            "'retry' applies to forward.upstream; a chain has its own retry");
        else
            policy_compile_retry(c, v, &r->retry);
    }
    if ((v = yamltree_get(n, "retry_safe"))) policy_bool(c, v, &r->retry_safe);
}

static void policy_compile_routes(struct policy_compiler *c, const ynode *n) {
    static const struct policy_key keys[] = {
        {"match", true}, {"action", true}, {"forward", false}, {NULL, false}};
    struct policy *p = c->p;
    if (!policy_want(c, n, YAMLTREE_SEQUENCE)) return;
    p->routes = policy_calloc(c, n->len, sizeof *p->routes);
    if (!p->routes) return;
    for (size_t i = 0; i < n->len; i++) {
        const ynode *item = n->items[i], *v;
        if (!policy_map(c, item, keys)) continue;
        struct route *r = &p->routes[p->routes_len++];
        r->loc = policy_loc_of(item);
        r->tenant_param = -1;
        policy_retry_defaults(c, &r->retry);
        bool match_ok = (v = yamltree_get(item, "match")) && policy_compile_match(c, v, r);
        char *action = NULL;
        if ((v = yamltree_get(item, "action")) && policy_name(c, v, "action", &action)) {
            long a = policy_index_find(&c->actions, action);
            if (a >= 0) {
                r->action = &p->actions[a];
            } else {
                char q[96];
                policy_error_at(c, v, "unknown action '%s'", policy_q(v, q, sizeof q));
            }
        }
        free(action);
        if ((v = yamltree_get(item, "forward"))) policy_compile_forward(c, v, r, match_ok);
    }
    policy_index_duplicates(c, &c->routes, policy_report_duplicate_route);
}

/* ---- the whole file ----------------------------------------------------------------- */

static void policy_defaults(struct policy_compiler *c) {
    struct policy *p = c->p;
    p->listen = policy_strdup(c, "127.0.0.1:8080");
    p->admin_listen = policy_strdup(c, "127.0.0.1:8081");
    p->data_dir = policy_strdup(c, "./var");
    p->max_body = 1024 * 1024;
    p->drain_timeout_ms = 10000;
    p->receive_timeout_ms = 30000;
    p->durability = AUDIT_DURABILITY_FULL;
    p->on_failure = AUDIT_ON_FAILURE_DENY;
    p->checkpoint_every = 1000;
    p->issuer = policy_strdup(c, "pep");
    p->token_ttl_ms = 24LL * 3600 * 1000;
    p->max_token_ttl_ms = 7LL * 24 * 3600 * 1000;
    p->clock_skew_ms = 30000;
}

/* A top-level section, where an empty `section:` (null) means absent. */
static const ynode *policy_section(const ynode *root, const char *name) {
    const ynode *n = yamltree_get(root, name);
    return n && n->kind == YAMLTREE_SCALAR && n->type == YAMLTREE_NULL ? NULL : n;
}

static void policy_compile_tree(struct policy_compiler *c, const ynode *root) {
    static const struct policy_key keys[] = {
        {"version", true},  {"server", false},    {"audit", false},  {"identity", false},
        {"agents", false},  {"upstreams", false}, {"chains", false}, {"routes", false},
        {"actions", false}, {NULL, false}};
    if (!root) {
        policy_error(c, 1, 1, "the policy is empty: it needs at least 'version: 1'");
        return;
    }
    if (!policy_map(c, root, keys)) return;
    const ynode *v = yamltree_get(root, "version"), *s;
    int64_t version;
    if (v && v->kind == YAMLTREE_SCALAR && v->type == YAMLTREE_INT &&
        (yamltree_int(v, &version) != 0 || version != 1)) {
        char q[64];
        policy_error_at(c, v, "unsupported policy version %s: this build reads version 1",
                        policy_q(v, q, sizeof q));
    } else if (v && v->kind != YAMLTREE_INVALID &&
               (v->kind != YAMLTREE_SCALAR || v->type != YAMLTREE_INT)) {
        policy_error_at(c, v, "expected an integer, got %s", yamltree_describe(v));
    }
    if ((s = policy_section(root, "server"))) policy_compile_server(c, s);
    if ((s = policy_section(root, "audit"))) policy_compile_audit(c, s);
    if ((s = policy_section(root, "identity"))) policy_compile_identity(c, s);
    if ((s = policy_section(root, "agents"))) policy_compile_agents(c, s);
    /* Dependency order: what is referred to is compiled before what refers to it. */
    if ((s = policy_section(root, "upstreams"))) policy_compile_upstreams(c, s);
    if ((s = policy_section(root, "chains"))) policy_compile_chains(c, s);
    if ((s = policy_section(root, "actions"))) policy_compile_actions(c, s);
    if ((s = policy_section(root, "routes"))) policy_compile_routes(c, s);
}

int policy_load_buffer(const char *name, const char *data, size_t len, struct policy **out,
                       struct policy_errors *errs) {
    struct policy_compiler c = {.name = name ? name : "<policy>"};
    struct yamltree_node *root = NULL;
    int rc = 0;

    *out = NULL;
    if (errs) *errs = (struct policy_errors){0};
    if (!data) data = ""; /* libyaml asserts on a NULL input, even an empty one */
    c.p = calloc(1, sizeof *c.p);
    if (!c.p) return PEP_ENOMEM;
    c.p->refcount = 1;
    c.p->file = policy_strdup(&c, c.name);
    uint8_t hash[32];
    pep_sha256(data, len, hash);
    pep_hex(hash, sizeof hash, c.p->policy_hash);
    policy_defaults(&c);

    if (len > POLICY_MAX_FILE_BYTES) {
        policy_error(&c, 1, 1, "the policy file is larger than %u bytes",
                     (unsigned)POLICY_MAX_FILE_BYTES);
    } else {
        const struct yamltree_limits lim = {.max_bytes = POLICY_MAX_FILE_BYTES,
                                            .max_depth = POLICY_MAX_DEPTH,
                                            .max_nodes = POLICY_MAX_NODES};
        rc = yamltree_parse(data, len, &lim, policy_tree_error, &c, &root);
        if (rc == 0)
            policy_compile_tree(&c, root);
        else if (rc == PEP_ENOMEM)
            c.oom = true;
    }
    yamltree_free(root);

    policy_errors_export(&c, errs);
    if (c.oom)
        rc = PEP_ENOMEM;
    else if (c.errors_len > 0 || rc != 0)
        rc = PEP_EINVAL;
    if (rc == 0) {
        *out = c.p;
        c.p = NULL;
    } else if (errs && rc == PEP_EINVAL && errs->len == 0) {
        policy_errors_single(errs, rc, "%s:1:1: invalid policy", c.name);
    }
    policy_free(c.p);
    for (size_t i = 0; i < c.errors_len; i++)
        free(c.errors[i].msg);
    free(c.errors);
    policy_index_free(&c.upstreams);
    policy_index_free(&c.chains);
    policy_index_free(&c.actions);
    policy_index_free(&c.agent_ids);
    policy_index_free(&c.routes);
    return rc;
}

int policy_load(const char *path, struct policy **out, struct policy_errors *errs) {
    char *data = NULL;
    size_t len = 0;
    *out = NULL;
    if (errs) *errs = (struct policy_errors){0};
    /* A regular file only, opened without blocking: a FIFO named as the policy would hold
     * `pep check`, `pep serve`, and a SIGHUP reload (and with it shutdown), until a writer
     * came; a directory or a device is no policy either. */
    int rc = pep_read_regular_file(path, POLICY_MAX_FILE_BYTES, &data, &len);
    if (rc == PEP_EDENIED)
        return policy_errors_single(errs, PEP_EIO, "%s:1:1: cannot read: not a regular file", path);
    if (rc == PEP_EIO) {
        int err = errno;
        return policy_errors_single(errs, PEP_EIO, "%s:1:1: cannot read: %s", path, strerror(err));
    }
    if (rc == PEP_EINVAL)
        return policy_errors_single(errs, PEP_EINVAL,
                                    "%s:1:1: the policy file is larger than %u "
                                    "bytes",
                                    path, (unsigned)POLICY_MAX_FILE_BYTES);
    if (rc != 0) return rc;
    rc = policy_load_buffer(path, data, len, out, errs);
    free(data);
    return rc;
}
