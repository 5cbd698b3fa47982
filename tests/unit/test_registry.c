/*
 * test_registry.c — agents, operators and issued tokens in memory, and their SQL
 * write-through (pep/registry.c).
 *
 * What must hold: records are copied on creation and immutable; a replacement is
 * published in place of the old record while a reader that retained the old one keeps a
 * valid record until it releases it (run under ASan: no use-after-free, no leak);
 * revocation is sticky (the first time wins); lists are sorted and operator tokens are
 * never listed; what the registry_sql_* functions write, registry_load reads back
 * exactly; a malformed row fails the load with PEP_EDB; concurrent readers and a
 * publishing writer neither crash nor leak.
 *
 * Uses in-memory SQLite databases only; the concurrency test runs five threads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <pthread.h>
#include <sched.h>
#include <sqlite3.h>

#include "pep/registry.h"

/* 2023-11-14T22:13:20.123456Z */
#define T0_US INT64_C(1700000000123456)

static struct agent *make_agent_at(const char *id, bool enabled, int64_t created_at_us) {
    const char *tenants[] = {"acme", "globex"};
    const char *scopes[] = {"llm.chat", "tool.*"};
    struct agent *a = agent_new(id, "owner@example.test", tenants, 2, scopes, 2, enabled,
                                created_at_us, created_at_us + 1);
    assert_non_null(a);
    return a;
}

static struct agent *make_agent(const char *id, bool enabled) {
    struct agent *a = make_agent_at(id, enabled, T0_US);
    assert_non_null(a);
    return a;
}

/* Asserts that j equals the JSON text expected. */
static void assert_json(json_t *j, const char *expected) {
    json_error_t e;
    json_t *want = json_loads(expected, 0, &e);
    if (!want) fail_msg("bad expected JSON: %s", e.text);
    if (!json_equal(j, want)) {
        char *got = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
        print_error("got:      %s\nexpected: %s\n", got ? got : "(null)", expected);
        free(got);
        json_decref(want);
        fail();
    }
    json_decref(want);
}

/* ---- agents ------------------------------------------------------------------------------ */

static void test_agent_new_copies(void **state) {
    (void)state;
    char id[] = "bot", owner[] = "o@x", t0[] = "acme", s0[] = "llm.chat";
    const char *tenants[] = {t0}, *scopes[] = {s0};
    struct agent *a = agent_new(id, owner, tenants, 1, scopes, 1, true, 10, 20);
    assert_non_null(a);
    /* the caller's buffers are not referenced */
    id[0] = owner[0] = t0[0] = s0[0] = 'X';
    assert_string_equal(a->id, "bot");
    assert_string_equal(a->owner, "o@x");
    assert_int_equal(a->tenants_len, 1);
    assert_string_equal(a->tenants[0], "acme");
    assert_int_equal(a->scopes_len, 1);
    assert_string_equal(a->scopes[0], "llm.chat");
    assert_true(a->enabled);
    assert_int_equal(a->created_at_us, 10);
    assert_int_equal(a->updated_at_us, 20);
    assert_int_equal(a->refcount, 1);
    agent_release(a);

    /* NULL owner is stored as ""; empty lists are allowed */
    a = agent_new("solo", NULL, NULL, 0, NULL, 0, false, 0, 0);
    assert_non_null(a);
    assert_string_equal(a->owner, "");
    assert_non_null(a->tenants);
    assert_non_null(a->scopes);
    assert_int_equal(a->tenants_len, 0);
    assert_int_equal(a->scopes_len, 0);
    assert_false(a->enabled);
    assert_false(agent_has_tenant(a, "", 0));
    agent_release(a);
}

static void test_agent_with_enabled(void **state) {
    (void)state;
    struct agent *a = make_agent("bot", true);
    struct agent *b = agent_with_enabled(a, false, T0_US + 99);
    assert_non_null(b);
    assert_ptr_not_equal(a, b);
    assert_false(b->enabled);
    assert_int_equal(b->refcount, 1);
    assert_int_equal(b->created_at_us, T0_US);
    assert_int_equal(b->updated_at_us, T0_US + 99);
    assert_string_equal(b->id, "bot");
    assert_string_equal(b->owner, "owner@example.test");
    assert_int_equal(b->tenants_len, 2);
    assert_string_equal(b->tenants[1], "globex");
    assert_ptr_not_equal(b->tenants[1], a->tenants[1]); /* deep copy */
    assert_int_equal(b->scopes_len, 2);
    assert_string_equal(b->scopes[1], "tool.*");
    /* the original is untouched */
    assert_true(a->enabled);
    assert_int_equal(a->updated_at_us, T0_US + 1);
    assert_false(agent_same(a, b));
    struct agent *c = agent_with_enabled(b, true, 5);
    assert_true(agent_same(a, c)); /* times are not part of the identity */
    agent_release(a);
    agent_release(b);
    agent_release(c);
}

struct same_case {
    const char *id, *owner;
    const char *tenants[3]; /* NULL-terminated */
    const char *scopes[3];
    bool enabled;
    bool same; /* as the reference: bot, o, [acme, globex], [a.b, c.d], enabled */
};

static const struct same_case same_cases[] = {
    {"bot", "o", {"acme", "globex"}, {"a.b", "c.d"}, true, true},
    {"bot2", "o", {"acme", "globex"}, {"a.b", "c.d"}, true, false},
    {"bot", "o2", {"acme", "globex"}, {"a.b", "c.d"}, true, false},
    {"bot", "", {"acme", "globex"}, {"a.b", "c.d"}, true, false},
    {"bot", "o", {"acme", "globex"}, {"a.b", "c.d"}, false, false},
    {"bot", "o", {"globex", "acme"}, {"a.b", "c.d"}, true, false}, /* default tenant differs */
    {"bot", "o", {"acme"}, {"a.b", "c.d"}, true, false},
    {"bot", "o", {"acme", "globex"}, {"a.b"}, true, false},
    {"bot", "o", {"acme", "globex"}, {"a.b", "c.e"}, true, false},
    {"bot", "o", {"acme", "globex"}, {"a.b", "c.d", "e.f"}, true, false},
    {"bot", "o", {"acme", "globex"}, {NULL}, true, false},
};

static size_t strv_len(const char *const *v, size_t cap) {
    size_t n = 0;
    while (n < cap && v[n])
        n++;
    return n;
}

static void test_agent_same_table(void **state) {
    (void)state;
    const char *rt[] = {"acme", "globex"}, *rs[] = {"a.b", "c.d"};
    struct agent *ref = agent_new("bot", "o", rt, 2, rs, 2, true, 1, 2);
    assert_non_null(ref);
    for (size_t i = 0; i < PEP_ARRAY_LEN(same_cases); i++) {
        const struct same_case *c = &same_cases[i];
        struct agent *a = agent_new(c->id, c->owner, c->tenants, strv_len(c->tenants, 3), c->scopes,
                                    strv_len(c->scopes, 3), c->enabled, 77, 88);
        assert_non_null(a);
        print_message("agent_same case %zu\n", i);
        assert_int_equal(agent_same(ref, a), c->same);
        assert_int_equal(agent_same(a, ref), c->same);
        agent_release(a);
    }
    agent_release(ref);
}

static void test_agent_has_tenant(void **state) {
    (void)state;
    struct agent *a = make_agent("bot", true);
    assert_true(agent_has_tenant(a, "acme", 4));
    assert_true(agent_has_tenant(a, "globex", 6));
    assert_true(agent_has_tenant(a, "acmeXYZ", 4)); /* only len bytes are read */
    assert_true(agent_has_tenant(a, "/v1/tenants/globex/search" + 12, 6));
    assert_false(agent_has_tenant(a, "acm", 3));
    assert_false(agent_has_tenant(a, "acmee", 5));
    assert_false(agent_has_tenant(a, "acme", 3));
    assert_false(agent_has_tenant(a, "ACME", 4));
    assert_false(agent_has_tenant(a, "", 0));
    assert_false(agent_has_tenant(a, "initech", 7));
    agent_release(a);
}

static void test_agent_to_json(void **state) {
    (void)state;
    struct agent *a = make_agent("bot", false);
    json_t *j = agent_to_json(a);
    assert_non_null(j);
    assert_json(j, "{\"id\":\"bot\",\"owner\":\"owner@example.test\","
                   "\"tenants\":[\"acme\",\"globex\"],\"scopes\":[\"llm.chat\",\"tool.*\"],"
                   "\"enabled\":false,\"managed_by\":\"admin\","
                   "\"created_at\":\"2023-11-14T22:13:20.123456Z\","
                   "\"updated_at\":\"2023-11-14T22:13:20.123457Z\"}");
    json_decref(j);
    agent_release(a);

    a = agent_new("e", NULL, NULL, 0, NULL, 0, true, 0, 0);
    assert_non_null(a);
    a->from_policy = true;
    j = agent_to_json(a);
    assert_json(j, "{\"id\":\"e\",\"owner\":\"\",\"tenants\":[],\"scopes\":[],\"enabled\":true,"
                   "\"managed_by\":\"policy\","
                   "\"created_at\":\"1970-01-01T00:00:00.000000Z\","
                   "\"updated_at\":\"1970-01-01T00:00:00.000000Z\"}");
    json_decref(j);
    agent_release(a);
}

/* ---- operators and token records ----------------------------------------------------------- */

static void test_operator(void **state) {
    (void)state;
    char r0[] = "admin";
    const char *roles[] = {r0, "approver"};
    struct operator_rec *o = operator_new("alice", roles, 2, T0_US);
    assert_non_null(o);
    r0[0] = 'X';
    assert_string_equal(o->id, "alice");
    assert_int_equal(o->roles_len, 2);
    assert_int_equal(o->refcount, 1);
    assert_int_equal(o->created_at_us, T0_US);
    assert_true(operator_has_role(o, "admin"));
    assert_true(operator_has_role(o, "approver"));
    assert_false(operator_has_role(o, "Admin"));
    assert_false(operator_has_role(o, "admi"));
    assert_false(operator_has_role(o, "admins"));
    assert_false(operator_has_role(o, ""));
    json_t *j = operator_to_json(o);
    assert_json(j, "{\"id\":\"alice\",\"roles\":[\"admin\",\"approver\"],"
                   "\"created_at\":\"2023-11-14T22:13:20.123456Z\"}");
    json_decref(j);
    assert_ptr_equal(operator_retain(o), o);
    assert_int_equal(o->refcount, 2);
    operator_release(o);
    operator_release(o);

    o = operator_new("nobody", NULL, 0, 0);
    assert_non_null(o);
    assert_false(operator_has_role(o, "admin"));
    operator_release(o);
    operator_release(NULL);
    agent_release(NULL);
    assert_null(agent_retain(NULL));
    assert_null(operator_retain(NULL));
}

static void test_token_rec_to_json(void **state) {
    (void)state;
    struct token_rec t = {
        .jti = "J1", .subject = "bot", .issued_at_s = 1700000000, .expires_at_s = 1700086400};
    json_t *j = token_rec_to_json(&t);
    assert_json(j, "{\"jti\":\"J1\",\"agent\":\"bot\",\"kind\":\"agent\","
                   "\"issued_at\":\"2023-11-14T22:13:20.000000Z\","
                   "\"expires_at\":\"2023-11-15T22:13:20.000000Z\",\"revoked_at\":null}");
    json_decref(j);
    t.operator_token = true;
    t.subject = "alice";
    t.revoked_at_s = 1700000001;
    j = token_rec_to_json(&t);
    assert_json(j, "{\"jti\":\"J1\",\"operator\":\"alice\",\"kind\":\"operator\","
                   "\"issued_at\":\"2023-11-14T22:13:20.000000Z\","
                   "\"expires_at\":\"2023-11-15T22:13:20.000000Z\","
                   "\"revoked_at\":\"2023-11-14T22:13:21.000000Z\"}");
    json_decref(j);
}

/* ---- the registry in memory ------------------------------------------------------------------ */

static void test_publish_get_replace(void **state) {
    (void)state;
    struct registry *r = registry_new();
    assert_non_null(r);
    assert_null(registry_get_agent(r, "bot"));

    struct agent *a = make_agent("bot", true);
    registry_publish_agent(r, a); /* the map now holds the only reference */
    assert_int_equal(a->refcount, 1);
    struct agent *held = registry_get_agent(r, "bot");
    assert_ptr_equal(held, a);
    assert_int_equal(a->refcount, 2);
    assert_null(registry_get_agent(r, "bo"));
    assert_null(registry_get_agent(r, "bot2"));

    /* a replacement: the reader's record stays valid until it lets go */
    struct agent *b = agent_with_enabled(a, false, T0_US + 5);
    registry_publish_agent(r, b);
    assert_int_equal(held->refcount, 1);
    assert_string_equal(held->id, "bot");
    assert_true(held->enabled);
    assert_string_equal(held->tenants[1], "globex");
    struct agent *now = registry_get_agent(r, "bot");
    assert_ptr_equal(now, b);
    assert_false(now->enabled);
    assert_int_equal(b->refcount, 2);
    agent_release(held); /* frees a: ASan proves nothing else still points to it */
    agent_release(now);
    assert_int_equal(b->refcount, 1);

    /* publishing the same id again while nobody holds the old record frees it at once */
    registry_publish_agent(r, make_agent("bot", true));
    now = registry_get_agent(r, "bot");
    assert_true(now->enabled);
    agent_release(now);

    /* operators follow the same rules */
    const char *roles[] = {"admin"};
    struct operator_rec *o = operator_new("alice", roles, 1, 1);
    registry_publish_operator(r, o);
    struct operator_rec *oh = registry_get_operator(r, "alice");
    assert_ptr_equal(oh, o);
    assert_int_equal(o->refcount, 2);
    const char *roles2[] = {"approver"};
    registry_publish_operator(r, operator_new("alice", roles2, 1, 1));
    assert_int_equal(oh->refcount, 1);
    assert_true(operator_has_role(oh, "admin"));
    struct operator_rec *o2 = registry_get_operator(r, "alice");
    assert_true(operator_has_role(o2, "approver"));
    assert_false(operator_has_role(o2, "admin"));
    operator_release(oh);
    operator_release(o2);
    assert_null(registry_get_operator(r, "bob"));

    /* the registry drops its references when freed; a record still held survives it */
    struct agent *survivor = registry_get_agent(r, "bot");
    registry_free(r);
    assert_int_equal(survivor->refcount, 1);
    assert_string_equal(survivor->id, "bot");
    agent_release(survivor);
    registry_free(NULL);
}

static void test_revocation(void **state) {
    (void)state;
    struct registry *r = registry_new();
    char subject[] = "bot";
    struct token_rec t = {.jti = "J1", .subject = subject, .issued_at_s = 100, .expires_at_s = 200};
    registry_publish_token(r, &t);
    subject[0] = 'X'; /* the registry keeps its own copy */

    struct token_rec got;
    memset(&got, 0xa5, sizeof got);
    assert_true(registry_get_token(r, "J1", &got));
    assert_string_equal(got.jti, "J1");
    assert_null(got.subject); /* not handed out */
    assert_false(got.operator_token);
    assert_int_equal(got.issued_at_s, 100);
    assert_int_equal(got.expires_at_s, 200);
    assert_int_equal(got.revoked_at_s, 0);
    assert_false(registry_is_revoked(r, "J1"));

    registry_publish_revoke(r, "J1", 150);
    assert_true(registry_is_revoked(r, "J1"));
    assert_true(registry_get_token(r, "J1", &got));
    assert_int_equal(got.revoked_at_s, 150);

    /* revoking twice keeps the first time */
    registry_publish_revoke(r, "J1", 175);
    assert_true(registry_get_token(r, "J1", &got));
    assert_int_equal(got.revoked_at_s, 150);
    assert_true(registry_is_revoked(r, "J1"));

    /* unknown jti: not revoked, nothing created */
    assert_false(registry_is_revoked(r, "J2"));
    registry_publish_revoke(r, "J2", 150);
    assert_false(registry_is_revoked(r, "J2"));
    assert_false(registry_get_token(r, "J2", &got));
    assert_false(registry_is_revoked(r, "J"));
    assert_false(registry_is_revoked(r, ""));

    json_t *list = registry_list_tokens(r, NULL, NULL);
    assert_json(list, "[{\"jti\":\"J1\",\"agent\":\"bot\",\"kind\":\"agent\","
                      "\"issued_at\":\"1970-01-01T00:01:40.000000Z\","
                      "\"expires_at\":\"1970-01-01T00:03:20.000000Z\","
                      "\"revoked_at\":\"1970-01-01T00:02:30.000000Z\"}]");
    json_decref(list);
    registry_free(r);
}

static void test_list_agents_sorted(void **state) {
    (void)state;
    struct registry *r = registry_new();
    json_t *l = registry_list_agents(r);
    assert_json(l, "[]");
    json_decref(l);

    /* Newest last; agents created in the same instant (seeded by a policy) by id. */
    const char *ids[] = {"zeta", "alpha", "mike", "Bravo", "alpha2"};
    const int64_t created[] = {T0_US + 5, T0_US + 1, T0_US + 1, T0_US + 1, T0_US};
    for (size_t i = 0; i < PEP_ARRAY_LEN(ids); i++)
        registry_publish_agent(r, make_agent_at(ids[i], i % 2 == 0, created[i]));
    /* a replacement is listed once, where its creation time puts it */
    registry_publish_agent(r, make_agent_at("mike", false, T0_US + 1));
    l = registry_list_agents(r);
    assert_int_equal(json_array_size(l), 5);
    const char *sorted[] = {"alpha2", "Bravo", "alpha", "mike", "zeta"};
    for (size_t i = 0; i < PEP_ARRAY_LEN(sorted); i++) {
        json_t *item = json_array_get(l, i);
        assert_string_equal(json_string_value(json_object_get(item, "id")), sorted[i]);
        struct agent *a = registry_get_agent(r, sorted[i]);
        json_t *want = agent_to_json(a);
        assert_true(json_equal(item, want));
        json_decref(want);
        agent_release(a);
    }
    assert_false(json_is_true(json_object_get(json_array_get(l, 3), "enabled")));
    json_decref(l);
    registry_free(r);
}

/* The jti's of a token list, space-separated. */
static void list_jtis(json_t *list, char *out, size_t cap) {
    out[0] = '\0';
    size_t i;
    json_t *t;
    json_array_foreach(list, i, t) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s%s", i ? " " : "",
                 json_string_value(json_object_get(t, "jti")));
    }
}

static void test_list_tokens(void **state) {
    (void)state;
    struct registry *r = registry_new();
    static const struct token_rec toks[] = {
        {.jti = "T3", .subject = "a", .issued_at_s = 300, .expires_at_s = 900},
        {.jti = "T1", .subject = "b", .issued_at_s = 100, .expires_at_s = 900},
        {.jti = "T2b", .subject = "a", .issued_at_s = 200, .expires_at_s = 900},
        {.jti = "T2a", .subject = "b", .issued_at_s = 200, .expires_at_s = 900},
        /* operator tokens, one whose subject is also an agent id */
        {.jti = "O1",
         .subject = "a",
         .operator_token = true,
         .issued_at_s = 50,
         .expires_at_s = 900},
        {.jti = "O2",
         .subject = "alice",
         .operator_token = true,
         .issued_at_s = 250,
         .expires_at_s = 900},
    };
    char buf[256];
    json_t *l = registry_list_tokens(r, NULL, NULL);
    assert_json(l, "[]");
    json_decref(l);
    for (size_t i = 0; i < PEP_ARRAY_LEN(toks); i++)
        registry_publish_token(r, &toks[i]);
    registry_publish_revoke(r, "T1", 150);

    l = registry_list_tokens(r, NULL, NULL);
    list_jtis(l, buf, sizeof buf);
    /* both kinds; issue time, then publication order */
    assert_string_equal(buf, "O1 T1 T2b T2a O2 T3");
    assert_json(json_array_get(l, 0), "{\"jti\":\"O1\",\"operator\":\"a\",\"kind\":\"operator\","
                                      "\"issued_at\":\"1970-01-01T00:00:50.000000Z\","
                                      "\"expires_at\":\"1970-01-01T00:15:00.000000Z\","
                                      "\"revoked_at\":null}");
    assert_json(json_array_get(l, 1), "{\"jti\":\"T1\",\"agent\":\"b\",\"kind\":\"agent\","
                                      "\"issued_at\":\"1970-01-01T00:01:40.000000Z\","
                                      "\"expires_at\":\"1970-01-01T00:15:00.000000Z\","
                                      "\"revoked_at\":\"1970-01-01T00:02:30.000000Z\"}");
    json_decref(l);

    l = registry_list_tokens(r, "a", NULL);
    list_jtis(l, buf, sizeof buf);
    assert_string_equal(buf, "T2b T3");
    json_decref(l);
    l = registry_list_tokens(r, "b", NULL);
    list_jtis(l, buf, sizeof buf);
    assert_string_equal(buf, "T1 T2a");
    json_decref(l);
    l = registry_list_tokens(r, "alice", NULL); /* alice is an operator, not an agent */
    assert_json(l, "[]");
    json_decref(l);
    l = registry_list_tokens(r, NULL, "alice");
    list_jtis(l, buf, sizeof buf);
    assert_string_equal(buf, "O2");
    json_decref(l);
    l = registry_list_tokens(r, "a", "alice"); /* both asked for */
    list_jtis(l, buf, sizeof buf);
    assert_string_equal(buf, "T2b O2 T3");
    json_decref(l);
    l = registry_list_tokens(r, "nobody", NULL);
    assert_json(l, "[]");
    json_decref(l);
    registry_free(r);
}

/* ---- SQL write-through ------------------------------------------------------------------- */

static sqlite3 *open_db(void) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    char *msg = NULL;
    if (sqlite3_exec(db, registry_schema_sql(), NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("schema: %s", msg);
    /* idempotent (IF NOT EXISTS): audit_open runs it on every start */
    assert_int_equal(sqlite3_exec(db, registry_schema_sql(), NULL, NULL, NULL), SQLITE_OK);
    return db;
}

static void exec_ok(sqlite3 *db, const char *sql) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) fail_msg("%s: %s", sql, msg);
}

static int64_t query_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void assert_agents_equal(const struct agent *a, const struct agent *b) {
    assert_true(agent_same(a, b));
    assert_int_equal(a->created_at_us, b->created_at_us);
    assert_int_equal(a->updated_at_us, b->updated_at_us);
}

static void test_sql_round_trip(void **state) {
    (void)state;
    sqlite3 *db = open_db();
    const char *t3[] = {"acme", "globex", "initech"}, *s3[] = {"llm.*", "tool.search", "*"};
    const char *quoted[] = {"a \"quoted\" tenant", "caf\xc3\xa9"}, *none[] = {NULL};
    struct agent *agents[] = {
        agent_new("bot", "o@x", t3, 3, s3, 3, true, T0_US, T0_US + 1),
        agent_new("off", "", t3, 1, s3, 1, false, 5, 6),
        agent_new("odd", "o'neil", quoted, 2, none, 0, true, -1, INT64_MAX),
    };
    const char *roles[] = {"admin", "approver"};
    struct operator_rec *ops[] = {operator_new("alice", roles, 2, T0_US),
                                  operator_new("bob", NULL, 0, 7)};
    struct token_rec toks[] = {
        {.jti = "AAAAAAAAAAAAAAAAAAAAAA",
         .subject = "bot",
         .issued_at_s = 100,
         .expires_at_s = 200},
        {.jti = "BBBBBBBBBBBBBBBBBBBBBB",
         .subject = "bot",
         .issued_at_s = 110,
         .expires_at_s = 210},
        {.jti = "CCCCCCCCCCCCCCCCCCCCCC",
         .subject = "alice",
         .operator_token = true,
         .issued_at_s = 120,
         .expires_at_s = 220},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(agents); i++) {
        assert_non_null(agents[i]);
        assert_int_equal(registry_sql_put_agent(db, agents[i]), 0);
    }
    for (size_t i = 0; i < PEP_ARRAY_LEN(ops); i++) {
        assert_non_null(ops[i]);
        assert_int_equal(registry_sql_put_operator(db, ops[i]), 0);
    }
    for (size_t i = 0; i < PEP_ARRAY_LEN(toks); i++)
        assert_int_equal(registry_sql_put_token(db, &toks[i]), 0);
    assert_int_equal(registry_sql_revoke_token(db, toks[1].jti, 150), 0);
    /* a second revocation keeps the first time; an unknown jti changes nothing */
    assert_int_equal(registry_sql_revoke_token(db, toks[1].jti, 175), 0);
    assert_int_equal(registry_sql_revoke_token(db, "unknown", 175), 0);
    assert_int_equal(query_int(db, "SELECT revoked_at FROM tokens WHERE jti = "
                                   "'BBBBBBBBBBBBBBBBBBBBBB'"),
                     150);
    assert_int_equal(query_int(db, "SELECT count(*) FROM tokens"), 3);
    assert_int_equal(query_int(db, "SELECT count(*) FROM tokens WHERE revoked_at IS NULL"), 2);

    struct registry *r = registry_new();
    struct pep_err err = {0};
    assert_int_equal(registry_load(r, db, &err), 0);

    for (size_t i = 0; i < PEP_ARRAY_LEN(agents); i++) {
        struct agent *got = registry_get_agent(r, agents[i]->id);
        assert_non_null(got);
        assert_ptr_not_equal(got, agents[i]);
        assert_agents_equal(got, agents[i]);
        agent_release(got);
    }
    struct agent *odd = registry_get_agent(r, "odd");
    assert_string_equal(odd->tenants[0], "a \"quoted\" tenant");
    assert_string_equal(odd->owner, "o'neil");
    assert_int_equal(odd->scopes_len, 0);
    agent_release(odd);
    for (size_t i = 0; i < PEP_ARRAY_LEN(ops); i++) {
        struct operator_rec *got = registry_get_operator(r, ops[i]->id);
        assert_non_null(got);
        assert_int_equal(got->roles_len, ops[i]->roles_len);
        for (size_t k = 0; k < got->roles_len; k++)
            assert_string_equal(got->roles[k], ops[i]->roles[k]);
        assert_int_equal(got->created_at_us, ops[i]->created_at_us);
        operator_release(got);
    }
    for (size_t i = 0; i < PEP_ARRAY_LEN(toks); i++) {
        struct token_rec got;
        assert_true(registry_get_token(r, toks[i].jti, &got));
        assert_string_equal(got.jti, toks[i].jti);
        assert_int_equal(got.operator_token, toks[i].operator_token);
        assert_int_equal(got.issued_at_s, toks[i].issued_at_s);
        assert_int_equal(got.expires_at_s, toks[i].expires_at_s);
        assert_int_equal(got.revoked_at_s, i == 1 ? 150 : 0);
        assert_int_equal(registry_is_revoked(r, toks[i].jti), i == 1);
    }
    /* subjects survive the trip (visible through the lists) */
    json_t *l = registry_list_tokens(r, "bot", NULL);
    assert_int_equal(json_array_size(l), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(l, 1), "agent")), "bot");
    json_decref(l);
    l = registry_list_tokens(r, NULL, NULL);
    assert_int_equal(json_array_size(l), 3); /* the operator token too (SPEC 5) */
    json_decref(l);

    registry_free(r);
    for (size_t i = 0; i < PEP_ARRAY_LEN(agents); i++)
        agent_release(agents[i]);
    for (size_t i = 0; i < PEP_ARRAY_LEN(ops); i++)
        operator_release(ops[i]);
    sqlite3_close(db);
}

/* Loads db into a fresh registry and says whether agent id is policy-managed there. */
static bool loaded_from_policy(sqlite3 *db, const char *id) {
    struct registry *r = registry_new();
    struct pep_err err = {0};
    assert_int_equal(registry_load(r, db, &err), 0);
    struct agent *got = registry_get_agent(r, id);
    assert_non_null(got);
    bool from_policy = got->from_policy;
    agent_release(got);
    registry_free(r);
    return from_policy;
}

static void test_sql_put_agent_updates(void **state) {
    (void)state;
    sqlite3 *db = open_db();
    struct agent *a = make_agent("bot", true);
    assert_int_equal(registry_sql_put_agent(db, a), 0);
    const char *t[] = {"initech"}, *s[] = {"x.y"};
    struct agent *b = agent_new("bot", "new-owner", t, 1, s, 1, false, 42 /* ignored */, 9999);
    assert_int_equal(registry_sql_put_agent(db, b), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM agents"), 1);
    assert_int_equal(query_int(db, "SELECT created_at_us FROM agents"), T0_US);
    assert_int_equal(query_int(db, "SELECT updated_at_us FROM agents"), 9999);

    struct registry *r = registry_new();
    struct pep_err err = {0};
    assert_int_equal(registry_load(r, db, &err), 0);
    struct agent *got = registry_get_agent(r, "bot");
    assert_true(agent_same(got, b));
    assert_int_equal(got->created_at_us, T0_US);
    assert_int_equal(got->updated_at_us, 9999);
    agent_release(got);
    registry_free(r);

    /* Who manages it survives the trip: seeded from the policy, then changed by an admin. */
    assert_false(loaded_from_policy(db, "bot"));
    b->from_policy = true;
    assert_int_equal(registry_sql_put_agent(db, b), 0);
    assert_true(loaded_from_policy(db, "bot"));
    struct agent *changed = agent_with_enabled(b, true, 10000);
    assert_false(changed->from_policy);
    assert_int_equal(registry_sql_put_agent(db, changed), 0);
    assert_false(loaded_from_policy(db, "bot"));
    agent_release(changed);

    /* operators too: roles change, created_at stays */
    const char *r1[] = {"admin"}, *r2[] = {"auditor"};
    struct operator_rec *o1 = operator_new("alice", r1, 1, 10),
                        *o2 = operator_new("alice", r2, 1, 20);
    assert_int_equal(registry_sql_put_operator(db, o1), 0);
    assert_int_equal(registry_sql_put_operator(db, o2), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM operators"), 1);
    assert_int_equal(query_int(db, "SELECT created_at_us FROM operators"), 10);
    r = registry_new();
    assert_int_equal(registry_load(r, db, &err), 0);
    struct operator_rec *og = registry_get_operator(r, "alice");
    assert_true(operator_has_role(og, "auditor"));
    assert_false(operator_has_role(og, "admin"));
    assert_int_equal(og->created_at_us, 10);
    operator_release(og);
    registry_free(r);

    /* a token is written once: the same jti again is a database error */
    struct token_rec tk = {.jti = "J", .subject = "bot", .issued_at_s = 1, .expires_at_s = 2};
    assert_int_equal(registry_sql_put_token(db, &tk), 0);
    assert_int_equal(registry_sql_put_token(db, &tk), PEP_EDB);

    operator_release(o1);
    operator_release(o2);
    agent_release(a);
    agent_release(b);
    sqlite3_close(db);
}

/* Writing to or loading from a database without the registry's tables fails with PEP_EDB. */
static void test_sql_without_schema(void **state) {
    (void)state;
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    struct agent *a = make_agent("bot", true);
    struct operator_rec *o = operator_new("alice", NULL, 0, 1);
    struct token_rec t = {.jti = "J", .subject = "bot"};
    assert_int_equal(registry_sql_put_agent(db, a), PEP_EDB);
    assert_int_equal(registry_sql_put_operator(db, o), PEP_EDB);
    assert_int_equal(registry_sql_put_token(db, &t), PEP_EDB);
    assert_int_equal(registry_sql_revoke_token(db, "J", 1), PEP_EDB);
    struct registry *r = registry_new();
    struct pep_err err = {0};
    assert_int_equal(registry_load(r, db, &err), PEP_EDB);
    assert_int_equal(err.code, PEP_EDB);
    registry_free(r);
    agent_release(a);
    operator_release(o);
    sqlite3_close(db);
}

struct malformed_case {
    const char *sql;
    const char *msg; /* expected pep_err message */
};

static const struct malformed_case malformed_cases[] = {
    {"INSERT INTO agents VALUES('bad', 'o', 'not json', '[]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '{\"a\":1}', '[]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '\"acme\"', '[]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '[1]', '[]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '[\"acme\", null]', '[]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '[\"acme\"]', 'llm.chat', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO agents VALUES('bad', 'o', '[\"acme\"]', '[[\"x\"]]', 1, 0, 0)",
     "registry: agent bad has a malformed row"},
    {"INSERT INTO operators VALUES('alice', 'admin', 0)", "registry: operator row malformed"},
    {"INSERT INTO operators VALUES('alice', '[true]', 0)", "registry: operator row malformed"},
};

static void test_sql_malformed_rows(void **state) {
    (void)state;
    for (size_t i = 0; i < PEP_ARRAY_LEN(malformed_cases); i++) {
        print_message("malformed: %s\n", malformed_cases[i].sql);
        sqlite3 *db = open_db();
        /* good rows around the bad one */
        struct agent *good = make_agent("good", true);
        assert_int_equal(registry_sql_put_agent(db, good), 0);
        agent_release(good);
        exec_ok(db, malformed_cases[i].sql);
        struct registry *r = registry_new();
        struct pep_err err = {0};
        assert_int_equal(registry_load(r, db, &err), PEP_EDB);
        assert_int_equal(err.code, PEP_EDB);
        assert_string_equal(err.msg, malformed_cases[i].msg);
        registry_free(r);
        sqlite3_close(db);
    }
}

/* ---- concurrency ------------------------------------------------------------------------ */

#define PUBLISHES 10000
#define READERS 4

struct shared {
    struct registry *r;
    int stop; /* atomic: set by the writer when done */
    long reads[READERS];
    int bad; /* atomic: inconsistent reads seen */
};

struct reader_arg {
    struct shared *s;
    int index;
};

static void *reader_main(void *arg) {
    struct reader_arg *ra = arg;
    struct shared *s = ra->s;
    struct agent *kept = NULL; /* held across a replacement, released one read later */
    long n = 0;
    while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE) || n == 0) {
        struct agent *a = registry_get_agent(s->r, "bot");
        bool ok = a && strcmp(a->id, "bot") == 0 && a->tenants_len == 2 &&
                  strcmp(a->tenants[0], "acme") == 0 && strcmp(a->scopes[1], "tool.*") == 0 &&
                  a->updated_at_us >= (kept ? kept->updated_at_us : 0);
        ok = ok && registry_is_revoked(s->r, "REVOKED") && !registry_is_revoked(s->r, "LIVE");
        struct token_rec t;
        ok = ok && registry_get_token(s->r, "LIVE", &t) && t.revoked_at_s == 0;
        if (!ok) __atomic_add_fetch(&s->bad, 1, __ATOMIC_RELAXED);
        agent_release(kept);
        kept = a;
        n++;
        /* glibc's default rwlock prefers readers: without a pause, four readers on a
         * small machine starve the writer for minutes (see the report on registry.c). */
        sched_yield();
    }
    agent_release(kept);
    s->reads[ra->index] = n;
    return NULL;
}

/* Interrupts every statement after a few VM steps, as a read error partway would. */
static int interrupt_soon(void *arg) {
    int *budget = arg;
    return --*budget < 0;
}

/* A read that stops early must fail the load: a registry missing rows could accept a
 * revoked token. */
static void test_load_fails_on_interrupted_read(void **state) {
    (void)state;
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, registry_schema_sql(), NULL, NULL, NULL), SQLITE_OK);
    for (int i = 0; i < 200; i++) {
        char jti[16];
        snprintf(jti, sizeof jti, "J%d", i);
        struct token_rec t = {.subject = "bot", .issued_at_s = 1, .expires_at_s = 2};
        snprintf(t.jti, sizeof t.jti, "%s", jti);
        assert_int_equal(registry_sql_put_token(db, &t), 0);
    }
    assert_int_equal(registry_sql_revoke_token(db, "J199", 5), 0);
    int budget = 400;
    sqlite3_progress_handler(db, 1, interrupt_soon, &budget);
    struct registry *r = registry_new();
    struct pep_err err = {0};
    assert_int_equal(registry_load(r, db, &err), PEP_EDB);
    assert_non_null(strstr(err.msg, "reading"));
    registry_free(r);
    sqlite3_progress_handler(db, 0, NULL, NULL);
    sqlite3_close(db);
}

static void test_concurrent_readers_and_publisher(void **state) {
    (void)state;
    struct shared s = {.r = registry_new()};
    assert_non_null(s.r);
    registry_publish_agent(s.r, make_agent("bot", true));
    struct token_rec live = {.jti = "LIVE", .subject = "bot", .issued_at_s = 1, .expires_at_s = 9};
    struct token_rec revoked = {
        .jti = "REVOKED", .subject = "bot", .issued_at_s = 1, .expires_at_s = 9};
    registry_publish_token(s.r, &live);
    registry_publish_token(s.r, &revoked);
    registry_publish_revoke(s.r, "REVOKED", 5);

    pthread_t threads[READERS];
    struct reader_arg args[READERS];
    for (int i = 0; i < READERS; i++) {
        args[i] = (struct reader_arg){&s, i};
        assert_int_equal(pthread_create(&threads[i], NULL, reader_main, &args[i]), 0);
    }
    const char *tenants[] = {"acme", "globex"}, *scopes[] = {"llm.chat", "tool.*"};
    for (int i = 1; i <= PUBLISHES; i++) {
        struct agent *a =
            agent_new("bot", "owner", tenants, 2, scopes, 2, i % 2 == 0, T0_US, T0_US + i);
        assert_non_null(a);
        registry_publish_agent(s.r, a);
        /* the token map changes too: a re-published LIVE record, new unrelated tokens */
        registry_publish_token(s.r, &live);
        char jti[32];
        snprintf(jti, sizeof jti, "N%d", i);
        struct token_rec t = {.subject = "other", .issued_at_s = i, .expires_at_s = i + 1};
        memcpy(t.jti, jti, sizeof jti);
        registry_publish_token(s.r, &t);
        if (i % 3 == 0) registry_publish_revoke(s.r, jti, i);
    }
    __atomic_store_n(&s.stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < READERS; i++)
        assert_int_equal(pthread_join(threads[i], NULL), 0);
    assert_int_equal(s.bad, 0);
    for (int i = 0; i < READERS; i++)
        assert_true(s.reads[i] > 0);

    struct agent *last = registry_get_agent(s.r, "bot");
    assert_int_equal(last->updated_at_us, T0_US + PUBLISHES);
    assert_true(last->enabled);
    assert_int_equal(last->refcount, 2); /* the map's and ours: readers released theirs */
    agent_release(last);
    assert_true(registry_is_revoked(s.r, "N3"));
    assert_false(registry_is_revoked(s.r, "N4"));
    json_t *l = registry_list_tokens(s.r, "other", NULL);
    assert_int_equal(json_array_size(l), PUBLISHES);
    json_decref(l);
    registry_free(s.r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_agent_new_copies),
        cmocka_unit_test(test_agent_with_enabled),
        cmocka_unit_test(test_agent_same_table),
        cmocka_unit_test(test_agent_has_tenant),
        cmocka_unit_test(test_agent_to_json),
        cmocka_unit_test(test_operator),
        cmocka_unit_test(test_token_rec_to_json),
        cmocka_unit_test(test_publish_get_replace),
        cmocka_unit_test(test_revocation),
        cmocka_unit_test(test_list_agents_sorted),
        cmocka_unit_test(test_list_tokens),
        cmocka_unit_test(test_sql_round_trip),
        cmocka_unit_test(test_sql_put_agent_updates),
        cmocka_unit_test(test_sql_without_schema),
        cmocka_unit_test(test_sql_malformed_rows),
        cmocka_unit_test(test_load_fails_on_interrupted_read),
        cmocka_unit_test(test_concurrent_readers_and_publisher),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
