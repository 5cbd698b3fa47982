/*
 * fuzz_policy.c — libFuzzer target for the policy loader and compiler (pep/policy.c,
 * pep/yamltree.c) through policy_load_buffer, the in-memory entry point `pep check` and
 * reloads share with policy_load.
 *
 * Properties, for any bytes:
 *   - no crash, no leak, no undefined behaviour (the sanitizers);
 *   - every refusal is reported: rc PEP_EINVAL comes with at least one error, success
 *     with none;
 *   - every error is "FILE:LINE:COL: message" with LINE ≥ 1 and COL ≥ 1 inside the input
 *     (LINE at most one past the last line break, COL at most one past the input's
 *     length), a non-empty one-line message (a line break inside one would let the input
 *     forge more lines of `pep check`'s output), and errors come in file order;
 *   - allow_unenforced only lifts checks: whatever compiles without it compiles with it,
 *     with no more errors;
 *   - a compiled policy is resolved: every route has its action, at most one forward
 *     target, a compiled forward path exactly when it has one, a {tenant} index that names
 *     a `tenant` parameter; every agent passes the admin API's id, tenant and scope rules.
 */
#include "tests/fuzz/fuzz.h"

#include "pep/policy.h"
#include "pep/route.h"
#include "pep/util.h"

#include <ctype.h>
#include <string.h>

#define NAME "fuzz.yaml"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    return 0;
}

/* Line breaks as libyaml counts them: \n, \r (\r\n counted twice here: an upper bound),
 * NEL, LS and PS. */
static size_t count_breaks(const uint8_t *d, size_t n) {
    size_t breaks = 0;
    for (size_t i = 0; i < n; i++) {
        if (d[i] == '\n' || d[i] == '\r') breaks++;
        if (i + 1 < n && d[i] == 0xc2 && d[i + 1] == 0x85) breaks++;
        if (i + 2 < n && d[i] == 0xe2 && d[i + 1] == 0x80 && (d[i + 2] == 0xa8 || d[i + 2] == 0xa9))
            breaks++;
    }
    return breaks;
}

/* Parses one unsigned decimal followed by ':' at *p; -1 when there is none. */
static long parse_number(const char **p) {
    const char *s = *p;
    if (!isdigit((unsigned char)*s)) return -1;
    long v = 0;
    while (isdigit((unsigned char)*s) && v < 1000000000L)
        v = v * 10 + (*s++ - '0');
    if (*s != ':') return -1;
    *p = s + 1;
    return v;
}

static void check_errors(const struct policy_errors *errs, size_t max_line, size_t max_col) {
    long prev_line = 0, prev_col = 0;
    for (size_t i = 0; i < errs->len; i++) {
        const char *item = errs->items[i];
        FUZZ_CHECK(item != NULL, "error %zu is NULL", i);
        FUZZ_CHECK(strncmp(item, NAME ":", strlen(NAME ":")) == 0, "no FILE: prefix in '%s'", item);
        const char *p = item + strlen(NAME ":");
        long line = parse_number(&p);
        long col = line >= 0 ? parse_number(&p) : -1;
        FUZZ_CHECK(line >= 1 && col >= 1, "no LINE:COL (both >= 1) in '%s'", item);
        FUZZ_CHECK((size_t)line <= max_line, "line %ld beyond the input (%zu) in '%s'", line,
                   max_line, item);
        FUZZ_CHECK((size_t)col <= max_col, "column %ld beyond the input (%zu) in '%s'", col,
                   max_col, item);
        FUZZ_CHECK(p[0] == ' ' && p[1] != '\0', "no message in '%s'", item);
        FUZZ_CHECK(strpbrk(p, "\n\r") == NULL, "line break inside the message of '%s'", item);
        FUZZ_CHECK(line > prev_line || (line == prev_line && col >= prev_col),
                   "errors out of file order at '%s'", item);
        prev_line = line;
        prev_col = col;
    }
}

static bool in_actions(const struct policy *p, const struct action *a) {
    return a && a >= p->actions && a < p->actions + p->actions_len;
}

static void check_policy(const struct policy *p) {
    FUZZ_CHECK(p->refcount == 1, "refcount %d", p->refcount);
    FUZZ_CHECK(strlen(p->policy_hash) == 64, "policy_hash '%s'", p->policy_hash);
    for (size_t i = 0; i < p->routes_len; i++) {
        const struct route *r = &p->routes[i];
        FUZZ_CHECK(in_actions(p, r->action), "route %zu (%s) has no resolved action", i, r->path);
        FUZZ_CHECK(!(r->upstream && r->chain), "route %zu forwards to an upstream and a chain", i);
        FUZZ_CHECK(r->forwards == (r->upstream || r->chain), "route %zu: forwards flag", i);
        FUZZ_CHECK((r->forward_path != NULL) ==
                       (r->forward_parts != NULL && r->forward_parts_len > 0),
                   "route %zu: forward_path and forward_parts disagree", i);
        FUZZ_CHECK(r->path && r->path[0] == '/', "route %zu: template '%s'", i, r->path);
        FUZZ_CHECK(r->tenant_param < (int)r->segments_len, "route %zu: tenant_param", i);
        if (r->tenant_param >= 0) {
            const char *param = r->segments[r->tenant_param].param;
            FUZZ_CHECK(param && strcmp(param, "tenant") == 0, "route %zu: tenant_param", i);
        }
        size_t params = 0;
        for (size_t j = 0; j < r->segments_len; j++) {
            const struct route_segment *s = &r->segments[j];
            FUZZ_CHECK((s->literal == NULL) != (s->param == NULL), "route %zu seg %zu", i, j);
            params += s->param != NULL;
        }
        FUZZ_CHECK(params <= ROUTE_MAX_PARAMS, "route %zu: %zu parameters", i, params);
        for (size_t j = 0; j < r->forward_parts_len; j++) {
            const struct forward_path_part *fp = &r->forward_parts[j];
            FUZZ_CHECK((fp->literal == NULL) != (fp->param == NULL), "route %zu part %zu", i, j);
            FUZZ_CHECK(!fp->param || fp->param_index < params, "route %zu part %zu index", i, j);
        }
    }
    for (size_t i = 0; i < p->actions_len; i++)
        FUZZ_CHECK(policy_find_action(p, p->actions[i].name) == &p->actions[i],
                   "action '%s' not found by name", p->actions[i].name);
    for (size_t i = 0; i < p->chains_len; i++) {
        const struct chain *c = &p->chains[i];
        FUZZ_CHECK(c->steps_len > 0, "chain '%s' without steps", c->name);
        for (size_t j = 0; j < c->steps_len; j++)
            FUZZ_CHECK(c->steps[j].upstream, "chain '%s' step %zu unresolved", c->name, j);
    }
    for (size_t i = 0; i < p->agents_len; i++) {
        const struct policy_agent *a = &p->agents[i];
        FUZZ_CHECK(pep_is_id(a->id), "agent id '%s'", a->id);
        FUZZ_CHECK(a->tenants_len > 0, "agent '%s' without tenants", a->id);
        for (size_t j = 0; j < a->tenants_len; j++)
            FUZZ_CHECK(pep_is_word(a->tenants[j]), "agent '%s' tenant '%s'", a->id, a->tenants[j]);
        for (size_t j = 0; j < a->scopes_len; j++)
            FUZZ_CHECK(pep_is_scope_token(a->scopes[j]), "agent '%s' scope '%s'", a->id,
                       a->scopes[j]);
        FUZZ_CHECK(pep_has_no_control(a->owner), "agent '%s' owner", a->id);
    }
}

/* Loads data once with the given option; returns rc and the number of errors. */
static int load(const uint8_t *data, size_t size, bool allow_unenforced, size_t *nerrs) {
    struct policy *p = NULL;
    struct policy_errors errs = {0};
    int rc = policy_load_buffer(NAME, (const char *)data, size, &p, &errs);
    FUZZ_CHECK(rc == 0 || rc == PEP_EINVAL || rc == PEP_ENOMEM, "rc %d", rc);
    if (rc == 0) {
        FUZZ_CHECK(p != NULL && errs.len == 0, "success with %zu errors", errs.len);
        check_policy(p);
    } else {
        FUZZ_CHECK(p == NULL, "refusal with a policy");
        FUZZ_CHECK(rc != PEP_EINVAL || errs.len > 0, "refusal without an error");
    }
    check_errors(&errs, count_breaks(data, size) + 2, size + 1);
    *nerrs = errs.len;
    policy_errors_free(&errs);
    policy_release(p);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t strict_errs = 0, lax_errs = 0;
    int strict = load(data, size, false, &strict_errs);
    int lax = load(data, size, true, &lax_errs);
    if (strict != PEP_ENOMEM && lax != PEP_ENOMEM) {
        FUZZ_CHECK(strict != 0 || lax == 0, "accepted strict, refused with allow_unenforced");
        FUZZ_CHECK(lax_errs <= strict_errs, "allow_unenforced added errors (%zu > %zu)", lax_errs,
                   strict_errs);
    }
    return 0;
}
