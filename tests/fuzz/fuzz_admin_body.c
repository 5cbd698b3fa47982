/*
 * fuzz_admin_body.c — libFuzzer target for the admin API's JSON bodies (pep/admin.c):
 * POST /admin/v1/agents {id, owner, tenants, scopes, enabled}, POST /admin/v1/operators
 * {id, roles}, POST /admin/v1/agents/{id}/tokens {ttl, scopes, acr} and
 * POST /admin/v1/operators/{id}/tokens {ttl}.  (SPEC 5's approvals {reason} has no
 * handler in this build yet.)  Every input is offered as the body of each of the four.
 *
 * The handlers are static: this file includes pep/admin.c, the h2o/SQLite habit, and is
 * linked with the library built without admin.o.  Before the include, four names admin.c
 * calls are redirected, for this file only, to stubs below: audit_submit (so nothing is
 * written: the stub checks the change the handler validated, then fails it as an
 * unavailable store would — the answer is then 503 and nothing is published, which keeps
 * every input independent of the ones before), and request_suspend / request_resume /
 * request_wait (no libmicrohttpd connection: the reply is built at once).  The handlers
 * run after authentication, as an operator holding `admin`.
 *
 * Properties, for any bytes:
 *   - no crash, no leak, no undefined behaviour;
 *   - the answer is 400 bad_request exactly when the body breaks SPEC 5's rules as
 *     restated here (expect_* below), and otherwise the change reaches the audit log
 *     (503 here, from the stub); never a 500, never another status;
 *   - what reaches the audit log obeys the rules: agent and operator ids pass pep_is_id,
 *     tenants pep_is_word (at least one), scopes pep_is_scope_token, owner without control
 *     characters, roles among admin/approver/auditor; its record has a canonical form;
 *   - an issued token verifies (token_verify) for its subject and audience, within
 *     max_token_ttl, with only scopes the agent holds and the acr asked for.
 */
#include "tests/fuzz/fuzz.h"

#include "pep/decide.h"
#include "pep/registry.h"
#include "pep/http.h"
#include "pep/util.h"

#include <ftw.h>
#include <string.h>

static int fuzz_audit_submit(struct audit_store *s, json_t *record, audit_apply_fn apply,
                             void *apply_arg, audit_done_fn done, void *done_arg);
static void fuzz_request_suspend(struct request *r);
static void fuzz_request_resume(struct request *r);
static enum MHD_Result fuzz_request_wait(struct request *r);

#define audit_submit fuzz_audit_submit
#define request_suspend fuzz_request_suspend
#define request_resume fuzz_request_resume
#define request_wait fuzz_request_wait
#include "pep/admin.c"
#undef audit_submit
#undef request_suspend
#undef request_resume
#undef request_wait

#define AGENT "demo-bot"
#define OPERATOR "admin"

static const char policy_yaml[] = "version: 1\n"
                                  "identity: { issuer: pep, token_ttl: 1h, max_token_ttl: 7d }\n";
static const char *const agent_tenants[] = {"acme", "globex"};
static const char *const agent_scopes[] = {"llm.chat", "tool.*", "refunds.read"};
static const char *const operator_roles[] = {"admin", "auditor"};

static struct server srv;
static struct policy *policy;
static char *caller_roles[] = {(char *)"admin"};
static struct token_claims caller = {
    .sub = (char *)"fuzz-operator", .roles = caller_roles, .roles_len = 1, .refcount = 1};

enum handler { PUT_AGENT, PUT_OPERATOR, AGENT_TOKEN, OPERATOR_TOKEN };
static const char *const handler_name[] = {"POST /admin/v1/agents", "POST /admin/v1/operators",
                                           "POST /admin/v1/agents/" AGENT "/tokens",
                                           "POST /admin/v1/operators/" OPERATOR "/tokens"};

/* The input being run: what the stubs compare against. */
static struct {
    enum handler handler;
    json_t *body; /* the body as the handler sees it (NULL: not a JSON object) */
    int submits;
    bool resumed;
} cur;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char dir[] = "/tmp/pep-fuzz-admin-XXXXXX";
    FUZZ_CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    struct pep_err err = {0};
    int rc = keys_load_or_create(dir, &srv.keys, &err);
    nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    FUZZ_CHECK(rc == 0, "keys: %s", err.msg);
    struct policy_errors errs = {0};
    rc = policy_load_buffer("fuzz_admin.yaml", policy_yaml, strlen(policy_yaml), &policy, &errs);
    for (size_t i = 0; i < errs.len; i++)
        fprintf(stderr, "%s\n", errs.items[i]);
    policy_errors_free(&errs);
    FUZZ_CHECK(rc == 0, "policy rc %d", rc);
    srv.policy = policy;
    srv.registry = registry_new();
    FUZZ_CHECK(srv.registry, "registry_new");
    struct agent *a =
        agent_new(AGENT, "demo@example.test", agent_tenants, 2, agent_scopes, 3, true, 0, 0);
    struct operator_rec *o = operator_new(OPERATOR, operator_roles, 2, 0);
    FUZZ_CHECK(a && o, "out of memory");
    registry_publish_agent(srv.registry, a);
    registry_publish_operator(srv.registry, o);
    return 0;
}

/* ---- the rules, restated from SPEC 5 and docs/behaviour.md ---------------------------- */

static int64_t max_ttl_s(void) {
    return policy->max_token_ttl_ms / 1000;
}

/* An array whose items are all strings passing ok(); non-empty when asked. */
static bool string_array(json_t *v, bool (*ok)(const char *), bool non_empty) {
    if (!json_is_array(v) || (non_empty && json_array_size(v) == 0)) return false;
    size_t i;
    json_t *item;
    json_array_foreach(v, i, item) {
        if (!json_is_string(item) || !ok(json_string_value(item))) return false;
    }
    return true;
}

static bool is_role(const char *s) {
    return strcmp(s, "admin") == 0 || strcmp(s, "approver") == 0 || strcmp(s, "auditor") == 0;
}

static bool agent_grants(const char *wanted) {
    if (!pep_is_scope_token(wanted)) return false;
    for (size_t i = 0; i < PEP_ARRAY_LEN(agent_scopes); i++)
        if (scope_grants(agent_scopes[i], wanted)) return true;
    return false;
}

/* ttl: absent, whole seconds > 0, or a duration of at least 1s; at most max_token_ttl. */
static bool ttl_ok(json_t *v) {
    if (!v) return true;
    if (json_is_integer(v))
        return json_integer_value(v) > 0 && json_integer_value(v) <= max_ttl_s();
    int64_t ms;
    return json_is_string(v) && pep_parse_duration_ms(json_string_value(v), &ms) == 0 &&
           ms >= 1000 && ms / 1000 <= max_ttl_s();
}

/* scopes of a token request: absent, an array, or one space-separated string, of scopes
 * the agent holds. */
static bool token_scopes_ok(json_t *v) {
    if (!v) return true;
    if (json_is_array(v)) return string_array(v, agent_grants, false);
    if (!json_is_string(v)) return false;
    char *copy = strdup(json_string_value(v)), *save = NULL;
    bool ok = copy != NULL;
    for (char *t = strtok_r(copy, " ", &save); ok && t; t = strtok_r(NULL, " ", &save))
        ok = agent_grants(t);
    free(copy);
    return ok;
}

static bool expect_valid(enum handler h, json_t *b) {
    if (!b) return false;
    json_t *owner = json_object_get(b, "owner"), *enabled = json_object_get(b, "enabled");
    json_t *acr = json_object_get(b, "acr");
    switch (h) {
    case PUT_AGENT:
        return pep_is_id(json_string_value(json_object_get(b, "id"))) &&
               (!owner ||
                (json_is_string(owner) && pep_has_no_control(json_string_value(owner)))) &&
               string_array(json_object_get(b, "tenants"), pep_is_word, true) &&
               string_array(json_object_get(b, "scopes"), pep_is_scope_token, false) &&
               (!enabled || json_is_boolean(enabled));
    case PUT_OPERATOR:
        return pep_is_id(json_string_value(json_object_get(b, "id"))) &&
               string_array(json_object_get(b, "roles"), is_role, true);
    case AGENT_TOKEN:
        return ttl_ok(json_object_get(b, "ttl")) && token_scopes_ok(json_object_get(b, "scopes")) &&
               (!acr || (json_is_string(acr) && *json_string_value(acr)));
    case OPERATOR_TOKEN:
        return ttl_ok(json_object_get(b, "ttl"));
    }
    return false;
}

/*
 * A token request SPEC 5 accepts may still ask for more than a token can carry: more than
 * TOKEN_MAX_SCOPES scopes (repeats count), or scopes and acr long enough for the token to
 * pass TOKEN_MAX_LEN.  Those are answered 400 ("the token cannot be issued").  The length
 * is estimated here, so within TOKEN_LIMIT_SLACK bytes of the bound either answer is right.
 */
enum token_limits { TOKEN_UNDER, TOKEN_NEAR, TOKEN_OVER };
#define TOKEN_LIMIT_SLACK 400

static enum token_limits token_limits(json_t *b) {
    json_t *scopes = json_object_get(b, "scopes"), *acr = json_object_get(b, "acr");
    size_t n = 0, chars = acr ? json_string_length(acr) : 0;
    if (json_is_array(scopes)) {
        size_t i;
        json_t *item;
        json_array_foreach(scopes, i, item) {
            n++;
            chars += json_string_length(item) + 1;
        }
    } else if (json_is_string(scopes)) {
        const char *v = json_string_value(scopes);
        chars += strlen(v);
        for (size_t i = 0; v[i]; i++)
            n += v[i] != ' ' && (i == 0 || v[i - 1] == ' ');
    } else if (!scopes) {
        n = PEP_ARRAY_LEN(agent_scopes);
    }
    /* ~250 bytes of other claims, base64url (4/3), header and signature ~200 bytes. */
    size_t estimate = (250 + chars) * 4 / 3 + 200;
    if (n > TOKEN_MAX_SCOPES || estimate > TOKEN_MAX_LEN + TOKEN_LIMIT_SLACK) return TOKEN_OVER;
    return estimate > TOKEN_MAX_LEN - TOKEN_LIMIT_SLACK ? TOKEN_NEAR : TOKEN_UNDER;
}

/* ---- what reached the audit log ---------------------------------------------------------- */

static bool same_str(const char *a, const char *b) {
    return a && b && strcmp(a, b) == 0;
}

static void check_agent(const struct agent *a, int status) {
    FUZZ_CHECK(a && pep_is_id(a->id), "agent id");
    FUZZ_CHECK(same_str(a->id, json_string_value(json_object_get(cur.body, "id"))), "id differs");
    FUZZ_CHECK(pep_has_no_control(a->owner), "owner of '%s'", a->id);
    FUZZ_CHECK(a->tenants_len > 0 &&
                   a->tenants_len == json_array_size(json_object_get(cur.body, "tenants")),
               "tenants of '%s'", a->id);
    for (size_t i = 0; i < a->tenants_len; i++)
        FUZZ_CHECK(pep_is_word(a->tenants[i]), "tenant '%s'", a->tenants[i]);
    for (size_t i = 0; i < a->scopes_len; i++)
        FUZZ_CHECK(pep_is_scope_token(a->scopes[i]), "scope '%s'", a->scopes[i]);
    json_t *enabled = json_object_get(cur.body, "enabled");
    FUZZ_CHECK(a->enabled == (enabled ? json_is_true(enabled) : true), "enabled flag");
    FUZZ_CHECK(status == (strcmp(a->id, AGENT) == 0 ? 200 : 201), "status %d for '%s'", status,
               a->id);
}

static void check_operator(const struct operator_rec *o) {
    FUZZ_CHECK(o && pep_is_id(o->id), "operator id");
    FUZZ_CHECK(same_str(o->id, json_string_value(json_object_get(cur.body, "id"))), "id differs");
    FUZZ_CHECK(o->roles_len > 0, "operator '%s' without roles", o->id);
    for (size_t i = 0; i < o->roles_len; i++)
        FUZZ_CHECK(is_role(o->roles[i]), "role '%s'", o->roles[i]);
}

static void check_token(const struct admin_op *op) {
    bool agent = cur.handler == AGENT_TOKEN;
    const struct token_rec *t = &op->ch.token;
    FUZZ_CHECK(same_str(t->subject, agent ? AGENT : OPERATOR), "token subject");
    FUZZ_CHECK(t->operator_token == !agent, "token kind");
    FUZZ_CHECK(strlen(t->jti) == 32 && strspn(t->jti, "0123456789abcdef") == 32, "jti");
    int64_t ttl = t->expires_at_s - t->issued_at_s;
    FUZZ_CHECK(ttl >= 1 && ttl <= max_ttl_s(), "ttl %lld", (long long)ttl);
    const char *token = json_string_value(json_object_get(op->answer, "token"));
    FUZZ_CHECK(token, "no token in the answer");
    struct token_claims *c = NULL;
    enum token_status st = token_verify(NULL, srv.keys, token, policy->issuer,
                                        agent ? "pep" : "pep-admin", t->issued_at_s, 0, &c);
    FUZZ_CHECK(st == TOKEN_OK, "issued token refused: %s", token_status_message(st));
    FUZZ_CHECK(same_str(c->sub, t->subject) && same_str(c->jti, t->jti) &&
                   c->exp == t->expires_at_s,
               "issued token's claims differ from the record");
    for (size_t i = 0; i < c->scopes_len; i++)
        FUZZ_CHECK(agent && agent_grants(c->scopes[i]), "scope '%s' not held", c->scopes[i]);
    json_t *acr = agent ? json_object_get(cur.body, "acr") : NULL; /* operators: no acr */
    FUZZ_CHECK(acr ? same_str(c->acr, json_string_value(acr)) : c->acr == NULL, "acr");
    if (!agent) FUZZ_CHECK(c->roles_len == PEP_ARRAY_LEN(operator_roles), "operator roles");
    token_claims_release(c);
}

static int fuzz_audit_submit(struct audit_store *s, json_t *record, audit_apply_fn apply,
                             void *apply_arg, audit_done_fn done, void *done_arg) {
    (void)s;
    cur.submits++;
    FUZZ_CHECK(json_is_object(record), "record is not an object");
    char *text = audit_canonical_json(record);
    FUZZ_CHECK(text != NULL, "the admin record has no canonical form");
    free(text);
    json_decref(record);
    const struct admin_op *op = done_arg;
    FUZZ_CHECK(apply == change_apply && done == op_done && apply_arg == &op->ch, "callbacks");
    switch (op->ch.kind) {
    case CHANGE_PUT_AGENT:
        FUZZ_CHECK(cur.handler == PUT_AGENT, "an agent from %s", handler_name[cur.handler]);
        check_agent(op->ch.agent, op->status);
        break;
    case CHANGE_PUT_OPERATOR:
        FUZZ_CHECK(cur.handler == PUT_OPERATOR, "an operator from %s", handler_name[cur.handler]);
        check_operator(op->ch.op_rec);
        break;
    case CHANGE_PUT_TOKEN:
        FUZZ_CHECK(cur.handler == AGENT_TOKEN || cur.handler == OPERATOR_TOKEN, "a token from %s",
                   handler_name[cur.handler]);
        check_token(op);
        break;
    default:
        FUZZ_CHECK(false, "op kind %d from %s", (int)op->ch.kind, handler_name[cur.handler]);
    }
    return PEP_EUNAVAILABLE; /* the caller fails the op: nothing is published */
}

static void fuzz_request_suspend(struct request *r) {
    r->phase = PHASE_WAITING;
}

static void fuzz_request_resume(struct request *r) {
    r->phase = PHASE_RESPOND;
    cur.resumed = true;
}

static enum MHD_Result fuzz_request_wait(struct request *r) {
    FUZZ_CHECK(cur.resumed, "a request left suspended");
    admin_finish(r);
    return MHD_YES;
}

/* ---- one input ------------------------------------------------------------------------------ */

static void run(enum handler h, const uint8_t *data, size_t size) {
    struct request r = {.srv = &srv, .method = "POST", .policy = policy};
    memcpy(r.id, "01HFUZZ0000000000000000000", sizeof r.id);
    r.body = (char *)data;
    r.body_len = size;
    r.claims = &caller;
    cur.handler = h;
    cur.submits = 0;
    cur.resumed = false;

    switch (h) {
    case PUT_AGENT:
        put_agent(&r);
        break;
    case PUT_OPERATOR:
        put_operator(&r);
        break;
    case AGENT_TOKEN:
        issue_agent_token(&r, AGENT);
        break;
    case OPERATOR_TOKEN:
        issue_operator_token_handler(&r, OPERATOR);
        break;
    }
    bool valid = expect_valid(h, cur.body);
    int status = r.reply.status;
    if (h == AGENT_TOKEN && valid) {
        enum token_limits lim = token_limits(cur.body);
        if (lim == TOKEN_OVER || (lim == TOKEN_NEAR && status == 400)) {
            FUZZ_CHECK(status == 400 && cur.submits == 0,
                       "a token past what it can carry answered %d", status);
            goto out;
        }
    }
    FUZZ_CHECK(status == 400 || status == 503, "%s answered %d: %.300s", handler_name[h], status,
               r.reply.body ? r.reply.body : "");
    FUZZ_CHECK((status == 503) == valid, "%s answered %d to a body %s: %.300s", handler_name[h],
               status, valid ? "SPEC 5 accepts" : "SPEC 5 refuses",
               r.reply.body ? r.reply.body : "");
    FUZZ_CHECK(cur.submits == (status == 503), "%d changes submitted", cur.submits);
    json_t *answer = r.reply.body ? json_loadb(r.reply.body, r.reply.body_len, 0, NULL) : NULL;
    FUZZ_CHECK(answer, "the answer is not JSON");
    const char *code = json_string_value(json_object_get(json_object_get(answer, "error"), "code"));
    FUZZ_CHECK(same_str(code, status == 400 ? "bad_request" : "audit_unavailable"), "code %s",
               code ? code : "NULL");
    json_decref(answer);
out:
    if (r.admin_op) r.admin_op_free(r.admin_op);
    reply_clear(&r.reply);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 65536) return 0;
    /* The body as body_object sees it: empty is {}, anything but an object is refused. */
    cur.body = size == 0 ? json_object() : json_loadb((const char *)data, size, 0, NULL);
    if (!json_is_object(cur.body)) {
        json_decref(cur.body);
        cur.body = NULL;
    }
    for (int h = PUT_AGENT; h <= OPERATOR_TOKEN; h++)
        run((enum handler)h, data, size);
    json_decref(cur.body);
    cur.body = NULL;
    return 0;
}
