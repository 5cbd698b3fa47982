/*
 * route.c — path hygiene (SPEC 3.3) and first-match routing over compiled templates.
 *
 * route_normalize_path refuses instead of repairing.  An upstream may resolve "..",
 * decode "%2f" into a separator or treat '\' as '/', while pep matched the raw form: any
 * such path would let an agent reach a resource through a route (and an action, scope and
 * control set) meant for another.  So only paths already in normal form pass, and the
 * decoded form is what routes are matched against.  A raw '#' is refused too: libcurl
 * would cut the URL there, so the upstream would see a shorter path than pep matched.
 *
 * Invariants: a compiled template is '/'-separated non-empty segments, each a literal
 * (no '%', '\', '?', '#', control byte, "." or "..") or a whole-segment "{name}"; at most
 * ROUTE_MAX_PARAMS parameters, names unique.  "/" compiles to zero segments.
 *
 * Pure: no I/O, no clock, no global state; any thread.
 */
#include "pep/route.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

static int route_hex(unsigned char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Whether raw[start, end) is a dot segment ("." or ".."). */
static bool route_is_dot_segment(const char *raw, size_t start, size_t end) {
    size_t n = end - start;
    return (n == 1 && raw[start] == '.') || (n == 2 && raw[start] == '.' && raw[start + 1] == '.');
}

int route_normalize_path(const char *raw, size_t raw_len, char **decoded, const char **why) {
    const char *reason = NULL;
    char *out = NULL;
    size_t n = 0, o = 0, seg_start = 1;

    *decoded = NULL;
    if (!raw) raw_len = 0;
    while (n < raw_len && raw[n] != '?')
        n++;
    if (n == 0) {
        reason = "empty path";
        goto out;
    }
    if (raw[0] != '/') {
        reason = "path must start with '/'";
        goto out;
    }
    out = malloc(n + 1);
    if (!out) {
        if (why) *why = "out of memory";
        return PEP_ENOMEM;
    }
    for (size_t i = 0; i < n && !reason; i++) {
        unsigned char ch = (unsigned char)raw[i];
        if (ch == '/') {
            if (i > 0 && i == seg_start)
                reason = "empty segment";
            else if (i > 0 && route_is_dot_segment(raw, seg_start, i))
                reason = "dot segment";
            seg_start = i + 1;
            out[o++] = '/';
        } else if (ch < 0x20 || ch == 0x7f) {
            reason = "control character";
        } else if (ch == '\\') {
            reason = "backslash";
        } else if (ch == '#' || ch == ' ') {
            reason = "invalid character";
        } else if (ch == '%') {
            int hi = i + 1 < n ? route_hex((unsigned char)raw[i + 1]) : -1;
            int lo = i + 2 < n ? route_hex((unsigned char)raw[i + 2]) : -1;
            if (hi < 0 || lo < 0) {
                reason = "malformed percent-escape";
                break;
            }
            unsigned char b = (unsigned char)(hi << 4 | lo);
            /* SECURITY: each of these decodes into something that changes the path's
             * structure (or its meaning to a C string) after pep matched it. */
            if (b == '/')
                reason = "encoded slash";
            else if (b == '.')
                reason = "encoded dot";
            else if (b == '\\')
                reason = "encoded backslash";
            else if (b < 0x20 || b == 0x7f)
                reason = "encoded control character";
            out[o++] = (char)b;
            i += 2;
        } else {
            out[o++] = (char)ch;
        }
    }
    if (!reason && route_is_dot_segment(raw, seg_start, n)) reason = "dot segment";
out:
    if (reason) {
        free(out);
        if (why) *why = reason;
        return PEP_EINVAL;
    }
    out[o] = '\0';
    *decoded = out;
    if (why) *why = NULL;
    return 0;
}

void route_segments_free(struct route_segment *segments, size_t len) {
    for (size_t i = 0; segments && i < len; i++) {
        free(segments[i].literal);
        free(segments[i].param);
    }
    free(segments);
}

/* Checks one template segment s[0, len); returns a reason or NULL. */
static const char *route_check_segment(const char *s, size_t len, bool *is_param) {
    *is_param = false;
    if (len == 0) return "empty segment";
    if (s[0] == '{') {
        if (s[len - 1] != '}' || len < 3)
            return "a parameter is written {name} and fills a whole segment";
        if (!(isalpha((unsigned char)s[1]) || s[1] == '_'))
            return "a parameter name is [A-Za-z_][A-Za-z0-9_]*";
        for (size_t i = 2; i + 1 < len; i++)
            if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
                return "a parameter name is [A-Za-z_][A-Za-z0-9_]*";
        *is_param = true;
        return NULL;
    }
    if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.')) return "dot segment";
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '{' || ch == '}')
            return "a parameter is written {name} and fills a whole segment";
        if (ch < 0x20 || ch == 0x7f || ch == ' ' || ch == '%' || ch == '\\' || ch == '?' ||
            ch == '#')
            return "invalid character (templates hold decoded text, without ' ', '%', '\\', "
                   "'?' or '#')";
    }
    return NULL;
}

int route_compile_template(const char *tmpl, struct route_segment **segments, size_t *len,
                           const char **why) {
    struct route_segment *segs = NULL;
    size_t nsegs = 0, nparams = 0, count = 0;
    const char *reason = NULL;
    int rc = 0;

    *segments = NULL;
    *len = 0;
    if (!tmpl || tmpl[0] != '/') {
        reason = "a template must start with '/'";
        goto out;
    }
    if (tmpl[1] == '\0') goto out; /* "/": zero segments */
    for (const char *p = tmpl; *p; p++)
        count += *p == '/';
    segs = calloc(count, sizeof *segs);
    if (!segs) {
        rc = PEP_ENOMEM;
        goto out;
    }
    for (const char *p = tmpl + 1; !reason;) {
        size_t seglen = strcspn(p, "/");
        bool is_param;
        reason = route_check_segment(p, seglen, &is_param);
        if (reason) break;
        struct route_segment *s = &segs[nsegs++];
        if (is_param) {
            s->param = strndup(p + 1, seglen - 2);
            if (!s->param) {
                rc = PEP_ENOMEM;
                break;
            }
            for (size_t i = 0; i + 1 < nsegs; i++)
                if (segs[i].param && strcmp(segs[i].param, s->param) == 0)
                    reason = "duplicate parameter name";
            if (++nparams > ROUTE_MAX_PARAMS) reason = "too many parameters";
        } else {
            s->literal = strndup(p, seglen);
            if (!s->literal) {
                rc = PEP_ENOMEM;
                break;
            }
        }
        if (p[seglen] == '\0') break;
        p += seglen + 1;
    }
out:
    if (rc == 0 && reason) rc = PEP_EINVAL;
    if (why) *why = rc == PEP_ENOMEM ? "out of memory" : reason;
    if (rc != 0) {
        route_segments_free(segs, nsegs);
        return rc;
    }
    *segments = segs;
    *len = nsegs;
    return 0;
}

/* Matches one route's template against path (which starts with '/'), filling m. */
static bool route_match_one(const struct route *r, const char *path, struct route_match *m) {
    const char *p = path + 1;
    m->params_len = 0;
    m->tenant = NULL;
    if (r->segments_len == 0) return *p == '\0';
    for (size_t i = 0; i < r->segments_len; i++) {
        if (i > 0) {
            if (*p != '/') return false;
            p++;
        }
        size_t seglen = strcspn(p, "/");
        const struct route_segment *s = &r->segments[i];
        if (s->literal) {
            if (strlen(s->literal) != seglen || memcmp(s->literal, p, seglen) != 0) return false;
        } else {
            if (seglen == 0 || m->params_len >= ROUTE_MAX_PARAMS) return false;
            struct route_param *param = &m->params[m->params_len++];
            param->name = s->param;
            param->value = p;
            param->value_len = seglen;
            if ((int)i == r->tenant_param) m->tenant = param;
        }
        p += seglen;
    }
    return *p == '\0'; /* more path left (a trailing slash included): no match */
}

const struct route *route_match(const struct policy *p, const char *method, const char *path,
                                struct route_match *m) {
    struct route_match scratch;
    if (!m) m = &scratch;
    memset(m, 0, sizeof *m);
    if (!p || !path || path[0] != '/') return NULL;
    for (size_t i = 0; i < p->routes_len; i++) {
        const struct route *r = &p->routes[i];
        if (r->method && (!method || strcmp(r->method, method) != 0)) continue;
        if (route_match_one(r, path, m)) {
            m->route = r;
            return r;
        }
    }
    memset(m, 0, sizeof *m);
    return NULL;
}
