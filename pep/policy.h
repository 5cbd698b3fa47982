/*
 * policy.h — the compiled policy: SPEC section 2 turned into immutable data.
 *
 * policy_load() parses a `version: 1` YAML file with libyaml's event API into a bounded
 * node tree (size, depth and node count capped; anchors and aliases refused), checks it
 * against the schema and compiles it: every reference resolved to a pointer (route →
 * action, route → chain or upstream, chain step → upstream), durations and sizes parsed,
 * `when` conditions compiled, path templates compiled.  Every problem is reported as
 * "FILE:LINE:COL: message" (1-based), all of them in one run.
 *
 * Ownership and threads: a struct policy is immutable once returned and shared between
 * threads by reference count (policy_retain / policy_release).  A request holds the
 * snapshot it started with; a reload swaps the service's pointer.
 */
#ifndef PEP_POLICY_H
#define PEP_POLICY_H

#include "pep/common.h"

#include <jansson.h>

/* Caps on what a hostile or broken policy file may cost to load. */
#define POLICY_MAX_FILE_BYTES (4u * 1024 * 1024)
#define POLICY_MAX_DEPTH 64
#define POLICY_MAX_NODES 200000

/* Where an element came from, for error messages (1-based). */
struct policy_loc {
    int line;
    int col;
};

/* ---- conditions (SPEC 2, `when`) ---------------------------------------------------- */

enum cond_field_kind {
    COND_FIELD_BODY,   /* body.<dotted.path>: segments in path[] */
    COND_FIELD_HEADER, /* header.<lowercase-name>: name */
    COND_FIELD_QUERY,  /* query.<name>: name */
    COND_FIELD_PATH,   /* path.<param>: name (must be a template parameter) */
    COND_FIELD_METHOD,
    COND_FIELD_TENANT,
    COND_FIELD_AGENT_ID,
    COND_FIELD_AGENT_OWNER,
    COND_FIELD_TIME_HOUR,   /* UTC 0-23 */
    COND_FIELD_TIME_WEEKDAY /* UTC 1=Mon … 7=Sun */
};

enum cond_op {
    COND_OP_EQ,
    COND_OP_NE,
    COND_OP_LT,
    COND_OP_LE,
    COND_OP_GT,
    COND_OP_GE,
    COND_OP_IN,
    COND_OP_NOT_IN,
    COND_OP_EXISTS,
    COND_OP_PREFIX
};

/* One `field: {op: value}` test.  A field with several ops compiles to several tests. */
struct cond_test {
    enum cond_field_kind kind;
    char *name;  /* header (lowercased), query or path parameter name; else NULL */
    char **path; /* body: dotted path split into segments */
    size_t path_len;
    enum cond_op op;
    json_t *value; /* scalar (string, number, bool, null) or, for in/not_in, an
                      array of scalars; for exists, a JSON boolean.  YAML scalars
                      are typed as YAML 1.2 core: 10 → integer, 1.5 → real,
                      true/false → bool, null/~ → null, quoted → string. */
    struct policy_loc loc;
};

/* A `when` map: every test holds, and, when any_len > 0, at least one `any` map holds. */
struct cond {
    struct cond_test *tests;
    size_t tests_len;
    struct cond *any; /* alternatives, each itself a struct cond (no nested any) */
    size_t any_len;
    bool reads_body; /* some test (here or in any) reads body.* */
    struct policy_loc loc;
};

/* ---- actions ------------------------------------------------------------------------ */

enum ratelimit_key { RATELIMIT_KEY_AGENT, RATELIMIT_KEY_TENANT, RATELIMIT_KEY_GLOBAL };

struct ratelimit_rule {
    enum ratelimit_key key;
    int64_t limit; /* requests per window, ≥ 1 */
    int64_t window_ms;
    struct policy_loc loc;
};

enum control_kind { CONTROL_DENY, CONTROL_STEP_UP, CONTROL_REQUIRE_APPROVAL };

struct control {
    struct cond *when; /* NULL: always applies */
    enum control_kind kind;
    char *deny_reason;  /* CONTROL_DENY */
    char *acr;          /* CONTROL_STEP_UP: required acr value */
    int64_t max_age_ms; /* CONTROL_STEP_UP: auth_time must be within this; 0 (max_age
                           not written) = any age */
    char **approvers;   /* CONTROL_REQUIRE_APPROVAL: operator roles that may decide */
    size_t approvers_len;
    int64_t approval_ttl_ms;  /* `ttl`, default 1h */
    bool distinct_from_owner; /* default false */
    char *notify;             /* CONTROL_REQUIRE_APPROVAL: webhook told of pending approvals,
                                 or NULL */
    struct policy_loc loc;
};

struct action {
    char *name;
    char *scope;
    struct ratelimit_rule *rate_limits;
    size_t rate_limits_len;
    struct control *controls;
    size_t controls_len;
    bool reads_body; /* a control's condition reads body.*: parse the body only then */
    struct policy_loc loc;
};

/* ---- upstreams ---------------------------------------------------------------------- */

struct upstream_header {
    char *name;  /* as written, sent as-is */
    char *env;   /* value read from this environment variable at request time, or */
    char *value; /* a literal value (exactly one of env / value is set) */
};

struct breaker_config {
    bool present;
    int64_t failure_threshold; /* default 5 */
    double failure_rate;       /* default 0.5 */
    int64_t min_requests;      /* default 10 */
    int64_t window_ms;         /* default 30s */
    int64_t open_for_ms;       /* default 60s */
    int64_t half_open_probes;  /* default 1 */
    int64_t success_threshold; /* default 2 */
    bool count_429;            /* default false */
    struct policy_loc loc;
};

struct upstream {
    char *name;
    char *base_url;    /* http:// or https://, no trailing slash */
    char *api_key_env; /* NULL if none: sent as "Authorization: Bearer $VALUE" */
    struct upstream_header *headers;
    size_t headers_len;
    int64_t timeout_ms;      /* default 30s */
    int64_t idle_timeout_ms; /* default 0 = none */
    struct breaker_config breaker;
    struct policy_loc loc;
};

/* ---- chains ------------------------------------------------------------------------- */

enum retry_jitter { RETRY_JITTER_NONE, RETRY_JITTER_FULL, RETRY_JITTER_EQUAL };

/* Written as `retry:` in a chain or in a route's `forward:` (next to `upstream:`).
 * When `on` is not written it defaults to [429, 500, 502, 503, 504, timeout,
 * connect_error]; that default is filled in even when the whole `retry:` is absent. */
struct retry_config {
    int *on_status; /* HTTP statuses that are retryable */
    size_t on_status_len;
    bool on_timeout; /* `timeout` listed (idle_timeout counts as timeout) */
    bool on_connect_error;
    int64_t max_attempts;     /* per step, first try included; default 1 */
    int64_t base_ms;          /* default 1s */
    int64_t max_ms;           /* default 60s */
    enum retry_jitter jitter; /* default full */
    bool respect_retry_after; /* default true */
    bool present;             /* written in the file */
    struct policy_loc loc;
};

struct chain_step {
    struct upstream *upstream; /* resolved */
    char *model;               /* NULL: the body's model is left alone */
    struct policy_loc loc;
};

/* `objectives:` (SPEC 2): targets for the chain's reliability indicators, judged on the
 * last hour by GET /admin/v1/chains (pep/indicators.h).  Each is optional: has_* (or a
 * non-zero mean_latency_ms) says it was written.  They change no request's fate. */
struct chain_objectives {
    bool has_retry_success_rate;
    double retry_success_rate; /* met when the indicator is >= this; in [0, 1] */
    bool has_fallback_activation_rate;
    double fallback_activation_rate; /* met when <=; in [0, 1] */
    bool has_escalation_rate;
    double escalation_rate;  /* met when <=; in [0, 1] */
    int64_t mean_latency_ms; /* met when mean_ms <=; a duration, 0 = not written */
    struct policy_loc loc;
};

struct chain {
    char *name;
    struct retry_config retry;
    struct chain_step *steps;
    size_t steps_len;
    bool has_context_overflow;
    int context_overflow_status;           /* match.status */
    char **context_overflow_body_contains; /* match.body_contains */
    size_t context_overflow_body_contains_len;
    struct chain_step context_overflow_step;
    int64_t deadline_ms;             /* 0 = none */
    char *escalate_webhook;          /* NULL: no escalation */
    int64_t escalate_after_attempts; /* 0 = only on exhaustion */
    struct chain_objectives objectives;
    struct policy_loc loc;
};

/* ---- routes ------------------------------------------------------------------------- */

/* One segment of a compiled path template: a literal or a `{param}`. */
struct route_segment {
    char *literal; /* NULL for a parameter */
    char *param;   /* NULL for a literal */
};

/*
 * One piece of a compiled `forward.path`.  The upstream path is the concatenation of the
 * pieces in order: a literal as written (raw, percent-escapes kept, '/' included), or the
 * value the request matched for one of the route's own path parameters.  That value is
 * the decoded segment (struct route_param), so the forwarder must percent-encode it for a
 * path segment before appending it (a decoded "a?b" or "a%b" would otherwise change the
 * URL).  In forward.path, as in match paths, `{name}` fills a whole segment.
 */
struct forward_path_part {
    char *literal;      /* NULL for a parameter */
    char *param;        /* NULL for a literal; always a parameter of the route's template */
    size_t param_index; /* parameter: its position among the match template's parameters,
                           which is its index in struct route_match.params[] */
};

struct route {
    char *method; /* uppercase; NULL matches any method */
    char *path;   /* the template as written */
    struct route_segment *segments;
    size_t segments_len;
    int tenant_param;      /* index into segments of {tenant}, or -1 */
    struct action *action; /* resolved */
    /* forward: exactly one of upstream / chain, or neither when the route has no forward */
    bool forwards;
    struct upstream *upstream; /* forward: {upstream: X} */
    struct chain *chain;       /* forward: {chain: X} */
    char *forward_path;        /* rewrite as written, NULL = same path + query; in normal form
                                  (SPEC 3.3), may hold `{name}` parameters */
    struct forward_path_part *forward_parts; /* forward_path compiled; in a loaded policy
                                                set (never empty) exactly when it is */
    size_t forward_parts_len;
    bool forward_path_params;  /* forward_parts holds a parameter: the upstream path is built
                                  per request; otherwise forward_path is used as it is */
    bool retry_safe;           /* forward.retry_safe, default false */
    struct retry_config retry; /* forward.retry, only with forward.upstream */
    struct policy_loc loc;
};

/* ---- agents ------------------------------------------------------------------------- */

struct policy_agent {
    char *id;
    char *owner;
    char **tenants;
    size_t tenants_len;
    char **scopes;
    size_t scopes_len;
    bool enabled; /* default true */
    struct policy_loc loc;
};

/* ---- the whole policy ----------------------------------------------------------------- */

enum audit_durability { AUDIT_DURABILITY_FULL, AUDIT_DURABILITY_NORMAL };
enum audit_on_failure { AUDIT_ON_FAILURE_DENY, AUDIT_ON_FAILURE_ALLOW };

struct policy {
    char *file;           /* path as given */
    char policy_hash[65]; /* hex SHA-256 of the file bytes */

    /* server */
    char *listen;               /* default 127.0.0.1:8080 */
    char *admin_listen;         /* default 127.0.0.1:8081 */
    char *data_dir;             /* default ./var */
    uint64_t max_body;          /* default 1 MiB */
    int64_t drain_timeout_ms;   /* default 10s */
    int64_t receive_timeout_ms; /* a request's head and body must arrive within this
                                   (default 30s; docs/behaviour.md) */
    /* server.unauthenticated_limit (SPEC 3.2 step 2): limit 0 = off */
    struct {
        int64_t limit;
        int64_t window_ms;
    } unauthenticated_limit;
    /* Where listen, admin_listen and data_dir are written (line 0 when defaulted): they
     * take effect only at start, so a reload that changes them is refused there. */
    struct policy_loc listen_loc, admin_listen_loc, data_dir_loc;

    /* audit */
    enum audit_durability durability; /* default full */
    enum audit_on_failure on_failure; /* default deny */
    int64_t checkpoint_every;         /* default 1000 */

    /* identity */
    char *issuer;             /* default "pep" */
    int64_t token_ttl_ms;     /* default 24h */
    int64_t max_token_ttl_ms; /* default 7d */
    int64_t clock_skew_ms;    /* default 30s */

    struct policy_agent *agents;
    size_t agents_len;
    struct upstream *upstreams;
    size_t upstreams_len;
    struct chain *chains;
    size_t chains_len;
    struct route *routes; /* in file order: first match wins */
    size_t routes_len;
    struct action *actions;
    size_t actions_len;

    int refcount; /* atomic; see policy_retain */
};

/* The errors of one load, each "FILE:LINE:COL: message", in file order. */
struct policy_errors {
    char **items;
    size_t len;
};

/*
 * Loads and compiles `path`.  On success returns 0 and *out (refcount 1; release with
 * policy_release).  On failure returns PEP_EINVAL (or PEP_EIO when the file cannot be
 * read; then errs holds "FILE: cannot read: <reason>") and fills errs with every error
 * found.  errs is overwritten (not appended to) and may be NULL; the caller frees it with
 * policy_errors_free, also after a success (it is then empty).  PEP_ENOMEM when memory
 * ran out.
 */
int policy_load(const char *path, struct policy **out, struct policy_errors *errs);

/* Same, from a buffer; `name` is used as FILE in messages and as policy->file. */
int policy_load_buffer(const char *name, const char *data, size_t len, struct policy **out,
                       struct policy_errors *errs);

void policy_errors_free(struct policy_errors *errs);

/* Reference counting, safe from any thread. */
struct policy *policy_retain(struct policy *p);
void policy_release(struct policy *p);

/* Lookups by name (linear; the lists are small and these run at load or on admin calls). */
struct action *policy_find_action(const struct policy *p, const char *name);
struct upstream *policy_find_upstream(const struct policy *p, const char *name);
struct chain *policy_find_chain(const struct policy *p, const char *name);
struct policy_agent *policy_find_agent(const struct policy *p, const char *id);

#endif
