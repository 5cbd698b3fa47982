/*
 * fuzz_route.c — libFuzzer target for request-path hygiene and route matching
 * (pep/route.c).  The input is a raw request target as it comes off the wire.
 *
 * Properties, for any bytes:
 *   - route_normalize_path either refuses with a reason or returns a decoded path that is
 *     in normal form: it starts with '/', holds no empty segment ("//"), no "." or ".."
 *     segment, no control byte, NUL or backslash, as many '/' as the raw path (no
 *     encoded slash) and exactly the length the raw path has with each %XX taken as one
 *     byte;
 *   - normalizing is stable: a raw path without '%' decodes to itself, and a decoded path
 *     that holds no byte the raw syntax gives a meaning to ('%', '?', '#', ' ') normalizes
 *     again to the very same string;
 *   - route_match, on the decoded path and on the raw bytes alike (it must not crash on
 *     what it is not meant to get), agrees with a reference matcher written here from the
 *     contract in route.h: the first route (file order) whose method and template match,
 *     `{name}` one non-empty segment; and its parameters rebuild the path exactly.
 * The policy is compiled once, at initialisation, from the YAML below.
 */
#include "tests/fuzz/fuzz.h"

#include "pep/policy.h"
#include "pep/route.h"

#include <string.h>

static const char policy_yaml[] =
    "version: 1\n"
    "routes:\n"
    "  - match: { method: POST, path: /v1/chat/completions }\n"
    "    action: llm.chat\n"
    "  - match: { method: POST, path: \"/v1/tenants/{tenant}/refunds\" }\n"
    "    action: refund.create\n"
    "  - match: { method: GET, path: \"/v1/tenants/{tenant}/refunds/{id}\" }\n"
    "    action: refund.read\n"
    "  - match: { path: \"/v1/tenants/{tenant}/refunds/{id}/approve\" }\n"
    "    action: refund.approve\n"
    "  - match: { method: GET, path: \"/v1/tenants/{tenant}/search\" }\n"
    "    action: tool.search\n"
    "  - match: { method: GET, path: \"/files/{a}/x/{b}/{c}\" }\n"
    "    action: files.read\n"
    "  - match: { method: GET, path: /files/static/x/y/z }\n"
    "    action: files.read\n"
    "  - match: { method: GET, path: \"/caf\xc3\xa9/{tenant}\" }\n"
    "    action: files.read\n"
    "  - match: { method: GET, path: / }\n"
    "    action: files.read\n"
    "  - match: { path: \"/{any}\" }\n"
    "    action: files.read\n"
    "actions:\n"
    "  llm.chat: { scope: llm.chat }\n"
    "  refund.create: { scope: refunds.write }\n"
    "  refund.read: { scope: refunds.read }\n"
    "  refund.approve: { scope: refunds.approve }\n"
    "  tool.search: { scope: tool.search }\n"
    "  files.read: { scope: files.read }\n";

static struct policy *policy;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    struct policy_errors errs = {0};
    int rc =
        policy_load_buffer("fuzz_route.yaml", policy_yaml, strlen(policy_yaml), &policy, &errs);
    for (size_t i = 0; i < errs.len; i++)
        fprintf(stderr, "%s\n", errs.items[i]);
    policy_errors_free(&errs);
    FUZZ_CHECK(rc == 0, "the route policy does not compile (rc %d)", rc);
    return 0;
}

/* The contract of route_match for one route, written independently of route.c. */
static bool ref_match(const struct route *r, const char *method, const char *path) {
    if (r->method && (!method || strcmp(r->method, method) != 0)) return false;
    if (path[0] != '/') return false;
    if (r->segments_len == 0) return path[1] == '\0';
    const char *p = path + 1;
    for (size_t i = 0; i < r->segments_len; i++) {
        size_t len = strcspn(p, "/");
        const struct route_segment *s = &r->segments[i];
        if (s->literal && (strlen(s->literal) != len || memcmp(s->literal, p, len) != 0))
            return false;
        if (s->param && len == 0) return false;
        p += len;
        if (i + 1 < r->segments_len) {
            if (*p != '/') return false;
            p++;
        }
    }
    return *p == '\0';
}

static void check_match(const char *method, const char *path) {
    struct route_match m;
    const struct route *got = route_match(policy, method, path, &m);
    const struct route *want = NULL;
    for (size_t i = 0; i < policy->routes_len && !want; i++)
        if (ref_match(&policy->routes[i], method, path)) want = &policy->routes[i];
    FUZZ_CHECK(got == want, "%s '%s': route_match chose %s, the contract %s", method, path,
               got ? got->path : "none", want ? want->path : "none");
    if (!got) {
        FUZZ_CHECK(m.route == NULL && m.params_len == 0 && m.tenant == NULL, "stale match");
        return;
    }
    FUZZ_CHECK(m.route == got, "m.route");
    /* Rebuild the path from the template and the parameters. */
    char rebuilt[8192];
    size_t o = 0, k = 0, plen = strlen(path);
    rebuilt[o++] = '/';
    for (size_t i = 0; i < got->segments_len; i++) {
        const struct route_segment *s = &got->segments[i];
        const char *part = s->literal;
        size_t len = part ? strlen(part) : 0;
        if (s->param) {
            FUZZ_CHECK(k < m.params_len, "too few parameters");
            const struct route_param *rp = &m.params[k++];
            FUZZ_CHECK(strcmp(rp->name, s->param) == 0, "parameter name");
            FUZZ_CHECK(rp->value >= path && rp->value + rp->value_len <= path + plen,
                       "parameter outside the path");
            FUZZ_CHECK(rp->value_len > 0 && memchr(rp->value, '/', rp->value_len) == NULL,
                       "parameter %s is not one non-empty segment", s->param);
            part = rp->value;
            len = rp->value_len;
            if ((int)i == got->tenant_param)
                FUZZ_CHECK(m.tenant == rp, "tenant does not point at {tenant}");
        }
        if (i > 0 && o < sizeof rebuilt) rebuilt[o++] = '/';
        if (o + len < sizeof rebuilt) memcpy(rebuilt + o, part, len);
        o += len;
    }
    FUZZ_CHECK(k == m.params_len, "%zu parameters, %zu in the template", m.params_len, k);
    FUZZ_CHECK(got->tenant_param >= 0 || m.tenant == NULL, "tenant without {tenant}");
    FUZZ_CHECK(o == plen && o < sizeof rebuilt && memcmp(rebuilt, path, o) == 0,
               "parameters do not rebuild '%s'", path);
}

static size_t count_byte(const char *s, size_t n, char c) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += s[i] == c;
    return k;
}

static void check_normal_form(const char *raw, size_t path_len, const char *d) {
    size_t len = strlen(d);
    FUZZ_CHECK(d[0] == '/', "decoded '%s' does not start with '/'", d);
    FUZZ_CHECK(len == path_len - 2 * count_byte(raw, path_len, '%'),
               "decoded length %zu from %zu raw bytes (a NUL inside?)", len, path_len);
    FUZZ_CHECK(count_byte(d, len, '/') == count_byte(raw, path_len, '/'),
               "decoded '%s' has a '/' the raw path did not", d);
    FUZZ_CHECK(strstr(d, "//") == NULL, "'//' in '%s'", d);
    FUZZ_CHECK(strstr(d, "/./") == NULL && strstr(d, "/../") == NULL, "dot segment in '%s'", d);
    FUZZ_CHECK(strcmp(d, "/.") != 0 && strcmp(d, "/..") != 0, "dot segment '%s'", d);
    FUZZ_CHECK(len < 2 || strcmp(d + len - 2, "/.") != 0, "trailing dot segment in '%s'", d);
    FUZZ_CHECK(len < 3 || strcmp(d + len - 3, "/..") != 0, "trailing dot segment in '%s'", d);
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)d[i];
        FUZZ_CHECK(ch >= 0x20 && ch != 0x7f && ch != '\\', "byte 0x%02x in '%s'", ch, d);
    }
    if (!memchr(raw, '%', path_len))
        FUZZ_CHECK(len == path_len && memcmp(d, raw, len) == 0, "'%s' changed without escapes", d);
    if (!strpbrk(d, "%?# ")) {
        char *again = NULL;
        const char *why = NULL;
        int rc = route_normalize_path(d, len, &again, &why);
        FUZZ_CHECK(rc == 0 && strcmp(again, d) == 0, "'%s' normalizes again to %s (%s)", d,
                   again ? again : "a refusal", why ? why : "");
        free(again);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    char *raw = fuzz_strndup(data, size);
    size_t path_len = 0;
    while (path_len < size && raw[path_len] != '?')
        path_len++;

    char *decoded = (char *)"unset";
    const char *why = "unset";
    int rc = route_normalize_path(raw, size, &decoded, &why);
    FUZZ_CHECK(rc == 0 || rc == PEP_EINVAL, "rc %d", rc);
    if (rc == 0) {
        FUZZ_CHECK(decoded != NULL && why == NULL, "success without a path or with a reason");
        check_normal_form(raw, path_len, decoded);
        check_match("GET", decoded);
        check_match("POST", decoded);
        check_match("DELETE", decoded);
    } else {
        FUZZ_CHECK(decoded == NULL, "refusal with a path");
        FUZZ_CHECK(why != NULL && *why, "refusal without a reason");
    }
    free(decoded);

    /* route_match must also hold on strings it should never get (raw, unnormalized). */
    check_match("GET", raw);
    free(raw);
    return 0;
}
