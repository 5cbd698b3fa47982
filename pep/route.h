/*
 * route.h — request-path hygiene and route matching (pure: no I/O, no clock).
 *
 * route_normalize_path() is the SECURITY gate of SPEC 3.3: a path that is not already in
 * normal form ("..", ".", "//", an encoded '/', '.', '\' or NUL, a control byte, a broken
 * %-escape) is refused, never repaired, so that pep and the upstream can never disagree
 * about which resource a request names.  It works on the raw request target as it came
 * off the wire (libmicrohttpd's own unescaping is switched off for this reason).
 *
 * route_match() walks the compiled routes in file order; the first whose method and
 * template match wins.  `{name}` matches exactly one non-empty segment.
 *
 * Thread-safety: pure functions over immutable data; call from any thread.
 */
#ifndef PEP_ROUTE_H
#define PEP_ROUTE_H

#include "pep/policy.h"

#define ROUTE_MAX_PARAMS 16

/*
 * Checks the path part (before any '?') of a raw request target and percent-decodes it.
 * Returns 0 and a malloc'd NUL-terminated decoded path in *decoded (caller frees), or
 * PEP_EINVAL with *why set to a static reason ("dot segment", "empty segment",
 * "encoded slash", ...).  raw need not be NUL-terminated; raw_len bytes are read.
 */
int route_normalize_path(const char *raw, size_t raw_len, char **decoded, const char **why);

struct route_param {
    const char *name;  /* the template's parameter name (owned by the policy) */
    const char *value; /* points into the decoded path passed to route_match */
    size_t value_len;
};

struct route_match {
    const struct route *route;
    struct route_param params[ROUTE_MAX_PARAMS];
    size_t params_len;
    const struct route_param *tenant; /* the {tenant} parameter, or NULL */
};

/*
 * Finds the first route of p matching method (uppercase) and the decoded path.  Returns
 * the route and fills *m, or NULL when none matches.  m->params point into `path`, which
 * must outlive m.
 */
const struct route *route_match(const struct policy *p, const char *method, const char *path,
                                struct route_match *m);

/*
 * Compiles a path template ("/v1/tenants/{tenant}/refunds") into segments; used by the
 * policy compiler.  Returns 0, or PEP_EINVAL with a reason in *why (template must start
 * with '/', no empty segment, a parameter is a whole segment named [A-Za-z_][A-Za-z0-9_]*,
 * no duplicate parameter names).  Segments are malloc'd; free with route_segments_free.
 */
int route_compile_template(const char *tmpl, struct route_segment **segments, size_t *len,
                           const char **why);
void route_segments_free(struct route_segment *segments, size_t len);

#endif
