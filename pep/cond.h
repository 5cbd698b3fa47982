/*
 * cond.h — the `when` condition evaluator (SPEC 2 `when`, SPEC 8 "Conditions").
 *
 * cond_holds() answers whether a compiled struct cond (pep/policy.h) holds for one request.
 * It is a pure function (DESIGN rule 1): no clock (now is a field of the request), no I/O,
 * and no allocation, so it cannot fail and runs on the listener thread unchanged.
 *
 * Semantics, in one place:
 *   - A field is present or absent.  An absent field makes every op false but `ne` and
 *     `exists: false`.  A present field: `ne` is exactly `not eq`, `not_in` exactly
 *     `not in`, `exists: true` holds (also for 0, false, "", [], {} and null).
 *   - body.<path> keeps its JSON type: eq compares number with number (as numbers: 10.0 eq
 *     10, an integer against a real exactly), bool with bool, null with null; a JSON string
 *     is text (below), so "5000" gt 1000 holds — an upstream that reads numbers from
 *     strings must not slip under a limit; an object or array equals nothing and orders
 *     nothing.  A path through a non-object, or with no body, is absent.
 *   - Text fields (a body string, header, query, path, method, tenant, agent.*) are strings
 *     compared byte for byte.  Against a number (lt/le/gt/ge, and eq/ne/in/not_in with a
 *     number value) a text that is entirely a JSON number ("42", "-1.5", "1e3") compares
 *     as the number jansson would read from the same characters in a body: an integer
 *     when it has no fraction or exponent and fits int64, otherwise the correctly rounded
 *     double (±inf past the double range, 0 below it).  Any other text is no number.
 *     A text never equals true, false or null.
 *   - Query values are decoded as application/x-www-form-urlencoded while they are read:
 *     '+' is a space, %XX a byte, a '%' not followed by two hex digits stays itself (the
 *     WHATWG reading).  Names are decoded the same way; `a` and `a=` are present with an
 *     empty value; the first occurrence of a name wins.
 *   - time.hour (0-23) and time.weekday (1 = Monday … 7 = Sunday) are integers computed
 *     from now_s in UTC, always present, compared like a body integer.
 *   - prefix holds when a string body value or a text field starts with the value's bytes.
 *
 * SECURITY: a condition guards the request the upstream will read, so pep and the upstream
 * must not read it differently.  A name given twice is the classic gap (parameter or key
 * smuggling: `?to=ok&to=evil` or {"amount": 1, "amount": 9999}): this module takes the
 * first occurrence of a query parameter; the caller should parse the body with
 * JSON_REJECT_DUPLICATES (a body that is no JSON then gives 400, SPEC 2) and give `header`
 * a lookup that does not pick one of several same-name headers silently.
 *
 * Threads: any; the compiled condition is immutable and nothing else is shared.
 */
#ifndef PEP_COND_H
#define PEP_COND_H

#include "pep/policy.h"
#include "pep/route.h"

#include <jansson.h>

/* What a condition may read about one request.  Nothing is copied: every pointer stays owned
 * by the caller and must stay valid during the call.  Each field is NULL when absent. */
struct cond_request {
    const json_t *body; /* the parsed JSON body; NULL (or not an object): every body.* absent */
    /* Value of a request header (NUL-terminated) for a lowercase name, or NULL when the
     * request has none.  The callback itself may be NULL (no headers).  It must not block;
     * which of several same-name headers it returns is the caller's choice. */
    const char *(*header)(void *arg, const char *lowercase_name);
    void *header_arg;
    const char *query;               /* raw query string after '?' (not decoded) */
    const struct route_match *match; /* path parameters (decoded) */
    const char *method;
    const char *tenant; /* not NUL-terminated: tenant_len bytes */
    size_t tenant_len;
    const char *agent_id;
    const char *agent_owner;
    int64_t now_s; /* Unix seconds */
};

/* Whether c holds for the request: every test holds and, when c has `any` alternatives, at
 * least one of them holds.  A NULL c holds (struct control: "NULL: always applies"). */
bool cond_holds(const struct cond *c, const struct cond_request *in);

/*
 * The body fields that an action's conditions name (every control's `when`, `any` included),
 * for a human deciding an approval (SPEC 3.4 `fields`): a JSON object keyed by the dotted
 * path as written ("amount", "customer.id") holding a copy of the body's value there, for the
 * fields present in the body only.  body may be NULL (→ {}).  Returns a new reference the
 * caller releases with json_decref, or NULL when memory ran out.
 */
json_t *cond_body_fields(const struct action *a, const json_t *body);

#endif
