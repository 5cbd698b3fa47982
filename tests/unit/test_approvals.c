/*
 * test_approvals.c — human approvals (pep/approvals.c): the state machine, the store, its
 * SQLite rows and its JSON views, with time as a parameter.
 *
 * What must hold: create gives a pending approval and reuses only a pending, unexpired one
 * of the same agent and fingerprint; decide obeys roles, admin, distinct_from_owner (case-
 * insensitive), pending-only and expiry; use is OK exactly once (reserve is atomic under 8
 * threads), with every refusal its own verdict and now == expires_at already expired;
 * forget and undo restore what was; what the apply functions write — directly and through
 * the real audit writer — a new store loads back identically; the database refuses a
 * decision on a decided row and a use of an unapproved, used or expired one; JSON shapes
 * are exact and the notify body holds no body, token or fingerprint.
 *
 * In-memory SQLite databases, and one store file in a mkdtemp directory under /tmp.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <pthread.h>
#include <sqlite3.h>

#include "audit/audit.h"
#include "pep/approvals.h"

#define S INT64_C(1000000)
#define HOUR (3600 * S)
/* 2023-11-14T22:13:20.123456Z */
#define T0 INT64_C(1700000000123456)

#define FP_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define FP_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
#define REQ1 "01HZZZZZZZZZZZZZZZZZZZZZR1"
#define REQ2 "01HZZZZZZZZZZZZZZZZZZZZZR2"

static const char *const APPROVERS[] = {"approver", "finance"};
static const char *const R_APPROVER[] = {"approver"};
static const char *const R_ADMIN[] = {"admin"};
static const char *const R_AUDITOR[] = {"auditor"};
static const char *const R_FINANCE[] = {"auditor", "finance"};

/* A request as the pipeline would describe it: agent "bot", owned by Alice. */
static struct approval_request request(const char *agent, const char *fingerprint) {
    static json_t *fields;
    if (!fields) fields = json_pack("{s:i, s:s}", "amount", 1500, "currency", "USD");
    return (struct approval_request){.agent = agent,
                                     .owner = "Alice@Example.test",
                                     .tenant = "acme",
                                     .action = "refund.issue",
                                     .method = "POST",
                                     .path = "/v1/refunds",
                                     .fingerprint = fingerprint,
                                     .request_id = REQ1,
                                     .fields = fields,
                                     .approvers = APPROVERS,
                                     .approvers_len = 2,
                                     .distinct_from_owner = true,
                                     .ttl_us = HOUR};
}

/* Creates one and returns its copy (the caller clears it). */
static struct approval create(struct approval_store *s, const char *agent, const char *fp,
                              int64_t now, bool expect_created) {
    struct approval_request in = request(agent, fp);
    struct approval a;
    bool created = !expect_created;
    assert_int_equal(approval_create(s, &in, now, &a, &created), 0);
    assert_int_equal(created, expect_created);
    return a;
}

static enum approval_decide decide(struct approval_store *s, const char *id, const char *op,
                                   const char *const *roles, size_t n, bool approve,
                                   const char *reason, int64_t now) {
    struct approval before, after;
    enum approval_decide v;
    assert_int_equal(
        approval_decide(s, id, op, roles, n, approve, reason, now, &v, &before, &after), 0);
    approval_clear(&before);
    approval_clear(&after);
    return v;
}

static enum approval_state state_of(struct approval_store *s, const char *id, int64_t now) {
    struct approval a;
    assert_int_equal(approval_get(s, id, &a), 0);
    enum approval_state st = approval_state_at(&a, now);
    approval_clear(&a);
    return st;
}

static void assert_json(json_t *j, const char *expected) {
    assert_non_null(j);
    char *text = json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT);
    assert_non_null(text);
    if (strcmp(text, expected) != 0) fail_msg("got      %s\nexpected %s", text, expected);
    free(text);
    json_decref(j);
}

/* ---- the pure state machine ------------------------------------------------------------ */

static void test_state_names(void **state) {
    (void)state;
    const char *names[] = {"pending", "approved", "denied", "expired", "used"};
    for (int i = 0; i < 5; i++) {
        enum approval_state st;
        assert_string_equal(approval_state_name((enum approval_state)i), names[i]);
        assert_int_equal(approval_state_parse(names[i], &st), 0);
        assert_int_equal(st, i);
    }
    enum approval_state st;
    assert_int_equal(approval_state_parse("all", &st), PEP_EINVAL);
    assert_int_equal(approval_state_parse("Pending", &st), PEP_EINVAL);
    assert_int_equal(approval_state_parse(NULL, &st), PEP_EINVAL);
    assert_string_equal(approval_state_name((enum approval_state)42), "unknown");
}

static void test_state_at(void **state) {
    (void)state;
    struct approval a = {.created_at_us = T0, .expires_at_us = T0 + HOUR};
    const struct {
        enum approval_state stored;
        int64_t now;
        enum approval_state seen;
    } cases[] = {
        {APPROVAL_PENDING, T0 + HOUR - 1, APPROVAL_PENDING},
        {APPROVAL_PENDING, T0 + HOUR, APPROVAL_EXPIRED}, /* the boundary is expired */
        {APPROVAL_APPROVED, T0 + HOUR - 1, APPROVAL_APPROVED},
        {APPROVAL_APPROVED, T0 + HOUR, APPROVAL_EXPIRED},
        {APPROVAL_DENIED, T0 + 2 * HOUR, APPROVAL_DENIED}, /* decided stays decided */
        {APPROVAL_USED, T0 + 2 * HOUR, APPROVAL_USED},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        a.state = cases[i].stored;
        assert_int_equal(approval_state_at(&a, cases[i].now), cases[i].seen);
    }
}

static void test_decide_verdicts(void **state) {
    (void)state;
    char *approvers[] = {"approver", "finance"};
    struct approval a = {.owner = "Alice@Example.test",
                         .approvers = approvers,
                         .approvers_len = 2,
                         .distinct_from_owner = true,
                         .state = APPROVAL_PENDING,
                         .created_at_us = T0,
                         .expires_at_us = T0 + HOUR};
    const struct {
        const char *op;
        const char *const *roles;
        size_t n;
        bool distinct;
        enum approval_state stored;
        int64_t now;
        enum approval_decide want;
    } cases[] = {
        {"bob", R_APPROVER, 1, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_OK},
        {"bob", R_FINANCE, 2, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_OK}, /* 2nd role */
        {"root", R_ADMIN, 1, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_OK},
        {"bob", R_AUDITOR, 1, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_NOT_APPROVER},
        {"bob", NULL, 0, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_NOT_APPROVER},
        /* four eyes, case-insensitively; admin is no exception */
        {"alice@example.TEST", R_APPROVER, 1, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_IS_OWNER},
        {"Alice@Example.test", R_ADMIN, 1, true, APPROVAL_PENDING, T0, APPROVAL_DECIDE_IS_OWNER},
        {"alice@example.test", R_APPROVER, 1, false, APPROVAL_PENDING, T0, APPROVAL_DECIDE_OK},
        {"bob", R_APPROVER, 1, true, APPROVAL_APPROVED, T0, APPROVAL_DECIDE_NOT_PENDING},
        {"bob", R_APPROVER, 1, true, APPROVAL_DENIED, T0, APPROVAL_DECIDE_NOT_PENDING},
        {"bob", R_APPROVER, 1, true, APPROVAL_USED, T0, APPROVAL_DECIDE_NOT_PENDING},
        {"bob", R_APPROVER, 1, true, APPROVAL_PENDING, T0 + HOUR - 1, APPROVAL_DECIDE_OK},
        {"bob", R_APPROVER, 1, true, APPROVAL_PENDING, T0 + HOUR, APPROVAL_DECIDE_EXPIRED},
        /* authorization before state: a non-approver learns nothing */
        {"bob", R_AUDITOR, 1, true, APPROVAL_APPROVED, T0 + HOUR, APPROVAL_DECIDE_NOT_APPROVER},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        a.distinct_from_owner = cases[i].distinct;
        a.state = cases[i].stored;
        enum approval_decide v =
            approval_decide_verdict(&a, cases[i].op, cases[i].roles, cases[i].n, cases[i].now);
        if (v != cases[i].want)
            fail_msg("case %zu: got %s, want %s", i, approval_decide_name(v),
                     approval_decide_name(cases[i].want));
    }
    /* an agent without an owner has nobody to exclude */
    a.owner = "";
    a.state = APPROVAL_PENDING;
    a.distinct_from_owner = true;
    assert_int_equal(approval_decide_verdict(&a, "", R_APPROVER, 1, T0), APPROVAL_DECIDE_OK);
}

static void test_use_verdicts(void **state) {
    (void)state;
    struct approval a = {
        .agent = "bot", .fingerprint = FP_A, .created_at_us = T0, .expires_at_us = T0 + HOUR};
    const struct {
        enum approval_state stored;
        const char *reserved, *agent, *fp;
        int64_t now;
        enum approval_use want;
        const char *why;
    } cases[] = {
        {APPROVAL_APPROVED, "", "bot", FP_A, T0, APPROVAL_USE_OK, NULL},
        {APPROVAL_APPROVED, "", "bot", FP_A, T0 + HOUR - 1, APPROVAL_USE_OK, NULL},
        {APPROVAL_APPROVED, "", "bot", FP_A, T0 + HOUR, APPROVAL_USE_INVALID, "approval expired"},
        {APPROVAL_PENDING, "", "bot", FP_A, T0, APPROVAL_USE_PENDING, NULL},
        {APPROVAL_PENDING, "", "bot", FP_A, T0 + HOUR, APPROVAL_USE_INVALID, "approval expired"},
        {APPROVAL_DENIED, "", "bot", FP_A, T0, APPROVAL_USE_DENIED, "approval denied"},
        {APPROVAL_USED, "", "bot", FP_A, T0, APPROVAL_USE_INVALID, "approval already used"},
        {APPROVAL_APPROVED, REQ2, "bot", FP_A, T0, APPROVAL_USE_INVALID,
         "approval in use by another request"},
        {APPROVAL_APPROVED, "", "bot", FP_B, T0, APPROVAL_USE_INVALID,
         "approval is for another request"},
        /* another agent's looks unknown, whatever its state */
        {APPROVAL_APPROVED, "", "other", FP_A, T0, APPROVAL_USE_INVALID, "unknown approval"},
        {APPROVAL_DENIED, "", "other", FP_A, T0, APPROVAL_USE_INVALID, "unknown approval"},
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(cases); i++) {
        a.state = cases[i].stored;
        snprintf(a.reserved_by, sizeof a.reserved_by, "%s", cases[i].reserved);
        const char *why = "unset";
        enum approval_use v =
            approval_use_verdict(&a, cases[i].agent, cases[i].fp, cases[i].now, &why);
        if (v != cases[i].want) fail_msg("case %zu: verdict %d, want %d", i, v, cases[i].want);
        if (cases[i].why)
            assert_string_equal(why, cases[i].why);
        else
            assert_null(why);
    }
    const char *why = NULL;
    assert_int_equal(approval_use_verdict(NULL, "bot", FP_A, T0, &why), APPROVAL_USE_INVALID);
    assert_string_equal(why, "unknown approval");
}

/* ---- the store ---------------------------------------------------------------------------- */

static void test_create_pending(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    assert_non_null(s);
    struct approval_request in = request("bot", FP_A);
    struct approval a;
    bool created = false;
    assert_int_equal(approval_create(s, &in, T0, &a, &created), 0);
    assert_true(created);
    assert_int_equal(strlen(a.id), 26);
    assert_string_equal(a.agent, "bot");
    assert_string_equal(a.owner, "Alice@Example.test");
    assert_string_equal(a.fingerprint, FP_A);
    assert_string_equal(a.request_id, REQ1);
    assert_int_equal(a.state, APPROVAL_PENDING);
    assert_int_equal(a.created_at_us, T0);
    assert_int_equal(a.expires_at_us, T0 + HOUR);
    assert_int_equal(a.approvers_len, 2);
    assert_string_equal(a.approvers[1], "finance");
    assert_true(a.distinct_from_owner);
    assert_null(a.decided_by);
    assert_null(a.used_by);
    assert_string_equal(a.reserved_by, "");
    assert_true(json_equal(a.fields, in.fields));
    assert_ptr_not_equal(a.fields, in.fields); /* copied, not shared */

    /* the store holds its own copy too */
    json_object_set_new(a.fields, "amount", json_integer(1));
    struct approval b;
    assert_int_equal(approval_get(s, a.id, &b), 0);
    assert_int_equal(json_integer_value(json_object_get(b.fields, "amount")), 1500);
    approval_clear(&b);
    assert_int_equal(approval_get(s, "01HNOSUCHAPPROVALXXXXXXXXX", &b), PEP_ENOTFOUND);

    /* the agent polls its own; another agent's looks missing */
    assert_int_equal(approval_get_for_agent(s, a.id, "bot", &b), 0);
    approval_clear(&b);
    assert_int_equal(approval_get_for_agent(s, a.id, "other", &b), PEP_ENOTFOUND);
    assert_null(b.agent);

    /* no owner given: "" */
    in.owner = NULL;
    in.fingerprint = FP_B;
    in.fields = NULL;
    assert_int_equal(approval_create(s, &in, T0, &b, &created), 0);
    assert_string_equal(b.owner, "");
    assert_true(json_is_object(b.fields) && json_object_size(b.fields) == 0);
    approval_clear(&b);
    approval_clear(&a);
    approval_clear(&a); /* a cleared copy clears again harmlessly */
    approval_store_free(s);
}

static void test_create_invalid(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    struct approval a;
    bool created;
    struct approval_request in = request("bot", FP_A);
    in.fingerprint = FP_A + 1; /* 63 characters */
    assert_int_equal(approval_create(s, &in, T0, &a, &created), PEP_EINVAL);
    in.fingerprint = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_int_equal(approval_create(s, &in, T0, &a, &created), PEP_EINVAL);
    in = request("bot", FP_A);
    in.ttl_us = 0;
    assert_int_equal(approval_create(s, &in, T0, &a, &created), PEP_EINVAL);
    in = request(NULL, FP_A);
    assert_int_equal(approval_create(s, &in, T0, &a, &created), PEP_EINVAL);
    json_t *arr = json_array();
    in = request("bot", FP_A);
    in.fields = arr;
    assert_int_equal(approval_create(s, &in, T0, &a, &created), PEP_EINVAL);
    json_decref(arr);
    assert_false(created);
    json_t *list = approval_list_json(s, NULL, T0);
    assert_int_equal(json_array_size(json_object_get(list, "approvals")), 0);
    json_decref(list);
    /* a huge ttl saturates instead of wrapping into the past */
    in = request("bot", FP_A);
    in.ttl_us = INT64_MAX;
    assert_int_equal(approval_create(s, &in, T0, &a, &created), 0);
    assert_int_equal(a.expires_at_us, INT64_MAX);
    approval_clear(&a);
    approval_store_free(s);
}

static void test_create_reuse(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    struct approval a = create(s, "bot", FP_A, T0, true);

    /* the agent re-sends while it waits: the same approval, whatever the time */
    struct approval b = create(s, "bot", FP_A, T0 + HOUR - 1, false);
    assert_string_equal(b.id, a.id);
    assert_int_equal(b.created_at_us, T0);
    approval_clear(&b);

    /* another request, another agent: new ones */
    b = create(s, "bot", FP_B, T0 + 1, true);
    assert_string_not_equal(b.id, a.id);
    approval_clear(&b);
    b = create(s, "other", FP_A, T0 + 1, true);
    assert_string_not_equal(b.id, a.id);
    approval_clear(&b);

    /* once expired (the boundary included), a new one */
    b = create(s, "bot", FP_A, T0 + HOUR, true);
    assert_string_not_equal(b.id, a.id);
    /* ... and that new one is what the next re-send gets */
    struct approval c = create(s, "bot", FP_A, T0 + HOUR + 5, false);
    assert_string_equal(c.id, b.id);
    approval_clear(&c);

    /* once decided, a new one */
    assert_int_equal(decide(s, b.id, "bob", R_APPROVER, 1, false, "no", T0 + HOUR + 6),
                     APPROVAL_DECIDE_OK);
    c = create(s, "bot", FP_A, T0 + HOUR + 7, true);
    assert_string_not_equal(c.id, b.id);
    approval_clear(&c);

    json_t *list = approval_list_json(s, NULL, T0 + HOUR + 8);
    assert_int_equal(json_array_size(json_object_get(list, "approvals")), 5);
    json_decref(list);
    approval_clear(&a);
    approval_clear(&b);
    approval_store_free(s);
}

static void test_decide(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    struct approval a = create(s, "bot", FP_A, T0, true);
    struct approval before, after;
    enum approval_decide v;

    /* refusals change nothing and say why */
    assert_int_equal(
        approval_decide(s, a.id, "eve", R_AUDITOR, 1, true, "x", T0 + 1, &v, &before, &after), 0);
    assert_int_equal(v, APPROVAL_DECIDE_NOT_APPROVER);
    assert_int_equal(after.state, APPROVAL_PENDING);
    assert_null(after.decided_by);
    approval_clear(&before);
    approval_clear(&after);
    assert_int_equal(decide(s, a.id, "ALICE@example.test", R_APPROVER, 1, true, "mine", T0 + 1),
                     APPROVAL_DECIDE_IS_OWNER);
    assert_int_equal(state_of(s, a.id, T0 + 1), APPROVAL_PENDING);

    /* an approver approves */
    assert_int_equal(approval_decide(s, a.id, "bob", R_APPROVER, 1, true, "looks right", T0 + 2, &v,
                                     &before, &after),
                     0);
    assert_int_equal(v, APPROVAL_DECIDE_OK);
    assert_int_equal(before.state, APPROVAL_PENDING);
    assert_null(before.decided_by);
    assert_int_equal(after.state, APPROVAL_APPROVED);
    assert_string_equal(after.decided_by, "bob");
    assert_string_equal(after.reason, "looks right");
    assert_int_equal(after.decided_at_us, T0 + 2);
    approval_clear(&before);
    approval_clear(&after);

    /* decided twice: refused, the first decision stands */
    assert_int_equal(decide(s, a.id, "carol", R_ADMIN, 1, false, "no", T0 + 3),
                     APPROVAL_DECIDE_NOT_PENDING);
    assert_int_equal(approval_get(s, a.id, &before), 0);
    assert_int_equal(before.state, APPROVAL_APPROVED);
    assert_string_equal(before.decided_by, "bob");
    approval_clear(&before);

    /* admin denies another, without a reason */
    struct approval b = create(s, "bot", FP_B, T0, true);
    assert_int_equal(decide(s, b.id, "root", R_ADMIN, 1, false, NULL, T0 + 4), APPROVAL_DECIDE_OK);
    assert_int_equal(approval_get(s, b.id, &before), 0);
    assert_int_equal(before.state, APPROVAL_DENIED);
    assert_null(before.reason);
    approval_clear(&before);
    approval_clear(&b);

    /* too late */
    b = create(s, "other", FP_B, T0, true);
    assert_int_equal(decide(s, b.id, "bob", R_APPROVER, 1, true, "late", T0 + HOUR),
                     APPROVAL_DECIDE_EXPIRED);
    assert_int_equal(state_of(s, b.id, T0 + HOUR - 1), APPROVAL_PENDING);
    approval_clear(&b);

    /* unknown id */
    assert_int_equal(approval_decide(s, "01HNOSUCHAPPROVALXXXXXXXXX", "bob", R_APPROVER, 1, true,
                                     NULL, T0, &v, &before, &after),
                     PEP_ENOTFOUND);
    approval_clear(&before);
    approval_clear(&after);
    approval_clear(&a);
    approval_store_free(s);
}

static void test_reserve_and_use(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    struct approval a = create(s, "bot", FP_A, T0, true), out;
    const char *why = "unset";

    /* pending: ask again, same id */
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ1, T0 + 1, &why, &out),
                     APPROVAL_USE_PENDING);
    assert_null(why);
    assert_string_equal(out.id, a.id);
    approval_clear(&out);

    assert_int_equal(decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + 2), APPROVAL_DECIDE_OK);
    /* another agent, another request: refused, and nothing of it handed out */
    assert_int_equal(approval_reserve(s, a.id, "other", FP_A, REQ1, T0 + 3, &why, &out),
                     APPROVAL_USE_INVALID);
    assert_string_equal(why, "unknown approval");
    assert_null(out.agent);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_B, REQ1, T0 + 3, &why, NULL),
                     APPROVAL_USE_INVALID);
    assert_string_equal(why, "approval is for another request");
    assert_int_equal(
        approval_reserve(s, "01HNOSUCHAPPROVALXXXXXXXXX", "bot", FP_A, REQ1, T0 + 3, &why, NULL),
        APPROVAL_USE_INVALID);
    assert_string_equal(why, "unknown approval");
    assert_int_equal(approval_reserve(s, NULL, "bot", FP_A, REQ1, T0 + 3, &why, NULL),
                     APPROVAL_USE_INVALID);

    /* ok: held by REQ1; a second request is refused while it is in flight */
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ1, T0 + 4, &why, &out),
                     APPROVAL_USE_OK);
    assert_null(why);
    assert_string_equal(out.reserved_by, REQ1);
    approval_clear(&out);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ2, T0 + 5, &why, NULL),
                     APPROVAL_USE_INVALID);
    assert_string_equal(why, "approval in use by another request");
    /* only the holder releases; then it is usable again */
    approval_release(s, a.id, REQ2);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ2, T0 + 6, &why, NULL),
                     APPROVAL_USE_INVALID);
    approval_release(s, a.id, REQ1);
    assert_int_equal(state_of(s, a.id, T0 + 6), APPROVAL_APPROVED);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ2, T0 + 7, &why, NULL),
                     APPROVAL_USE_OK);

    /* used by REQ2 */
    approval_mark_used(s, a.id, REQ2, T0 + 8);
    assert_int_equal(approval_get(s, a.id, &out), 0);
    assert_int_equal(out.state, APPROVAL_USED);
    assert_string_equal(out.used_by, REQ2);
    assert_int_equal(out.used_at_us, T0 + 8);
    assert_string_equal(out.reserved_by, "");
    approval_clear(&out);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ1, T0 + 9, &why, NULL),
                     APPROVAL_USE_INVALID);
    assert_string_equal(why, "approval already used");
    approval_release(s, a.id, REQ2); /* late release: no-op */
    assert_int_equal(state_of(s, a.id, T0 + 9), APPROVAL_USED);
    assert_int_equal(state_of(s, a.id, T0 + 2 * HOUR), APPROVAL_USED); /* not "expired" */
    approval_clear(&a);

    /* approved then expired: the boundary is expired */
    a = create(s, "bot", FP_B, T0, true);
    assert_int_equal(decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + 1), APPROVAL_DECIDE_OK);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_B, REQ1, T0 + HOUR, &why, NULL),
                     APPROVAL_USE_INVALID);
    assert_string_equal(why, "approval expired");
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_B, REQ1, T0 + HOUR - 1, &why, NULL),
                     APPROVAL_USE_OK);
    approval_clear(&a);

    /* denied */
    a = create(s, "other", FP_A, T0, true);
    assert_int_equal(decide(s, a.id, "bob", R_APPROVER, 1, false, "no", T0 + 1),
                     APPROVAL_DECIDE_OK);
    assert_int_equal(approval_reserve(s, a.id, "other", FP_A, REQ1, T0 + 2, &why, NULL),
                     APPROVAL_USE_DENIED);
    assert_string_equal(why, "approval denied");
    approval_clear(&a);
    approval_store_free(s);
}

struct race {
    struct approval_store *s;
    const char *id;
    pthread_barrier_t *go;
    char request_id[27];
    enum approval_use verdict;
};

static void *race_reserve(void *arg) {
    struct race *r = arg;
    pthread_barrier_wait(r->go);
    r->verdict = approval_reserve(r->s, r->id, "bot", FP_A, r->request_id, T0 + 10, NULL, NULL);
    return NULL;
}

static void test_reserve_concurrent(void **state) {
    (void)state;
    for (int round = 0; round < 50; round++) {
        struct approval_store *s = approval_store_new();
        struct approval a = create(s, "bot", FP_A, T0, true);
        assert_int_equal(decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + 1),
                         APPROVAL_DECIDE_OK);
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, 8);
        struct race r[8];
        pthread_t t[8];
        for (int i = 0; i < 8; i++) {
            r[i] = (struct race){.s = s, .id = a.id, .go = &go};
            snprintf(r[i].request_id, sizeof r[i].request_id, "01HRACEXXXXXXXXXXXXXXXXXX%c",
                     (char)('0' + i));
            assert_int_equal(pthread_create(&t[i], NULL, race_reserve, &r[i]), 0);
        }
        int ok = 0, winner = -1;
        for (int i = 0; i < 8; i++) {
            pthread_join(t[i], NULL);
            if (r[i].verdict == APPROVAL_USE_OK) {
                ok++;
                winner = i;
            } else {
                assert_int_equal(r[i].verdict, APPROVAL_USE_INVALID);
            }
        }
        assert_int_equal(ok, 1);
        struct approval got;
        assert_int_equal(approval_get(s, a.id, &got), 0);
        assert_string_equal(got.reserved_by, r[winner].request_id);
        approval_clear(&got);
        pthread_barrier_destroy(&go);
        approval_clear(&a);
        approval_store_free(s);
    }
}

static void test_forget_and_undo(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    /* forget: as if never created; the pair is free for a new one */
    struct approval a = create(s, "bot", FP_A, T0, true);
    approval_forget(s, a.id);
    struct approval got;
    assert_int_equal(approval_get(s, a.id, &got), PEP_ENOTFOUND);
    approval_forget(s, a.id); /* twice: no-op */
    struct approval b = create(s, "bot", FP_A, T0 + 1, true);
    assert_string_not_equal(b.id, a.id);
    json_t *list = approval_list_json(s, NULL, T0 + 2);
    assert_int_equal(json_array_size(json_object_get(list, "approvals")), 1);
    json_decref(list);
    approval_clear(&a);

    /* undo: the decision's record failed, the approval is pending again */
    struct approval before, after;
    enum approval_decide v;
    assert_int_equal(
        approval_decide(s, b.id, "bob", R_APPROVER, 1, true, "ok", T0 + 3, &v, &before, &after), 0);
    assert_int_equal(v, APPROVAL_DECIDE_OK);
    /* meanwhile the agent got hold of it */
    assert_int_equal(approval_reserve(s, b.id, "bot", FP_A, REQ1, T0 + 4, NULL, NULL),
                     APPROVAL_USE_OK);
    approval_undo_decide(s, &before);
    assert_int_equal(approval_get(s, b.id, &got), 0);
    assert_int_equal(got.state, APPROVAL_PENDING);
    assert_null(got.decided_by);
    assert_null(got.reason);
    assert_int_equal(got.decided_at_us, 0);
    assert_string_equal(got.reserved_by, "");
    approval_clear(&got);
    assert_int_equal(approval_reserve(s, b.id, "bot", FP_A, REQ2, T0 + 5, NULL, NULL),
                     APPROVAL_USE_PENDING);
    approval_release(s, b.id, REQ1); /* the failed request's release: harmless */
    /* and it can be decided again */
    assert_int_equal(decide(s, b.id, "carol", R_APPROVER, 1, false, "no", T0 + 6),
                     APPROVAL_DECIDE_OK);
    assert_int_equal(state_of(s, b.id, T0 + 6), APPROVAL_DENIED);
    approval_clear(&before);
    approval_clear(&after);

    /* undo never revives a used approval */
    struct approval c = create(s, "bot", FP_B, T0, true);
    assert_int_equal(
        approval_decide(s, c.id, "bob", R_APPROVER, 1, true, "ok", T0 + 1, &v, &before, &after), 0);
    approval_mark_used(s, c.id, REQ1, T0 + 2);
    approval_undo_decide(s, &before);
    assert_int_equal(state_of(s, c.id, T0 + 3), APPROVAL_USED);
    approval_clear(&before);
    approval_clear(&after);
    approval_clear(&c);
    /* undo of a forgotten one: no-op */
    approval_forget(s, b.id);
    approval_undo_decide(s, &b);
    approval_clear(&b);
    approval_store_free(s);
}

/* ---- SQLite ---------------------------------------------------------------------------- */

static sqlite3 *memdb(void) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    char *msg = NULL;
    if (sqlite3_exec(db, APPROVALS_SCHEMA, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("schema: %s", msg);
    /* idempotent, as audit_open runs it on every start */
    assert_int_equal(sqlite3_exec(db, APPROVALS_SCHEMA, NULL, NULL, NULL), SQLITE_OK);
    return db;
}

static void assert_same(const struct approval *x, const struct approval *y) {
    assert_string_equal(x->id, y->id);
    assert_string_equal(x->agent, y->agent);
    assert_string_equal(x->owner, y->owner);
    assert_string_equal(x->tenant, y->tenant);
    assert_string_equal(x->action, y->action);
    assert_string_equal(x->method, y->method);
    assert_string_equal(x->path, y->path);
    assert_string_equal(x->fingerprint, y->fingerprint);
    assert_true(json_equal(x->fields, y->fields));
    assert_int_equal(x->approvers_len, y->approvers_len);
    for (size_t i = 0; i < x->approvers_len; i++)
        assert_string_equal(x->approvers[i], y->approvers[i]);
    assert_int_equal(x->distinct_from_owner, y->distinct_from_owner);
    assert_int_equal(x->created_at_us, y->created_at_us);
    assert_int_equal(x->expires_at_us, y->expires_at_us);
    assert_int_equal(x->state, y->state);
    if (x->decided_by || y->decided_by) assert_string_equal(x->decided_by, y->decided_by);
    if (x->reason || y->reason) assert_string_equal(x->reason, y->reason);
    assert_int_equal(x->decided_at_us, y->decided_at_us);
    assert_string_equal(x->request_id, y->request_id);
    if (x->used_by || y->used_by) assert_string_equal(x->used_by, y->used_by);
    assert_int_equal(x->used_at_us, y->used_at_us);
}

/* The whole life of one approval as the pipeline and admin API run it, each change
 * written by its apply function (here called directly, as the writer would). */
static void scripted_life(struct approval_store *s, sqlite3 *db, const char *agent, const char *fp,
                          int64_t t, int outcome, char id_out[27]) {
    struct approval a = create(s, agent, fp, t, true);
    assert_int_equal(approval_apply_insert(db, &a), 0);
    snprintf(id_out, 27, "%s", a.id);
    if (outcome > 0) {
        struct approval before, after;
        enum approval_decide v;
        assert_int_equal(
            approval_decide(s, a.id, "bob", R_APPROVER, 1, outcome != 2,
                            outcome == 2 ? "amount too high" : "checked with \"finance\"", t + S,
                            &v, &before, &after),
            0);
        assert_int_equal(v, APPROVAL_DECIDE_OK);
        assert_int_equal(approval_apply_decide(db, &after), 0);
        approval_clear(&before);
        approval_clear(&after);
    }
    if (outcome == 3) {
        assert_int_equal(approval_reserve(s, a.id, agent, fp, REQ2, t + 2 * S, NULL, NULL),
                         APPROVAL_USE_OK);
        struct approval_use_write w = {.used_at_us = t + 2 * S};
        snprintf(w.id, sizeof w.id, "%s", a.id);
        snprintf(w.used_by, sizeof w.used_by, "%s", REQ2);
        assert_int_equal(approval_apply_use(db, &w), 0);
        approval_mark_used(s, a.id, REQ2, w.used_at_us);
    }
    approval_clear(&a);
}

static void test_persistence(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct approval_store *s = approval_store_new();
    char ids[5][27];
    /* pending, approved, denied, used, and a pending one created earlier that expired */
    scripted_life(s, db, "bot", FP_A, T0, 0, ids[0]);
    scripted_life(s, db, "bot", FP_B, T0 + 1, 1, ids[1]);
    scripted_life(s, db, "other", FP_A, T0 + 2, 2, ids[2]);
    scripted_life(s, db, "other", FP_B, T0 + 3, 3, ids[3]);
    scripted_life(s, db, "third", FP_A, T0 - 2 * HOUR, 0, ids[4]);
    /* a reservation is memory only */
    assert_int_equal(approval_reserve(s, ids[1], "bot", FP_B, REQ1, T0 + 10, NULL, NULL),
                     APPROVAL_USE_OK);

    struct approval_store *s2 = approval_store_new();
    struct pep_err err = {0};
    assert_int_equal(approval_store_load(s2, db, T0 + 10, &err), 0);
    for (int i = 0; i < 5; i++) {
        struct approval x, y;
        assert_int_equal(approval_get(s, ids[i], &x), 0);
        assert_int_equal(approval_get(s2, ids[i], &y), 0);
        assert_same(&x, &y);
        assert_string_equal(y.reserved_by, "");
        approval_clear(&x);
        approval_clear(&y);
    }
    struct approval y;
    assert_int_equal(approval_get(s2, ids[3], &y), 0);
    assert_int_equal(y.state, APPROVAL_USED);
    assert_string_equal(y.used_by, REQ2);
    approval_clear(&y);
    assert_int_equal(approval_get(s2, ids[2], &y), 0);
    assert_string_equal(y.reason, "amount too high");
    approval_clear(&y);

    /* the same lists, in the same order (oldest first: the expired one leads) */
    for (int f = -1; f <= APPROVAL_USED; f++) {
        enum approval_state st = (enum approval_state)f;
        json_t *l1 = approval_list_json(s, f < 0 ? NULL : &st, T0 + 10);
        json_t *l2 = approval_list_json(s2, f < 0 ? NULL : &st, T0 + 10);
        assert_true(json_equal(l1, l2));
        json_decref(l1);
        json_decref(l2);
    }
    json_t *all = approval_list_json(s2, NULL, T0 + 10);
    json_t *arr = json_object_get(all, "approvals");
    assert_int_equal(json_array_size(arr), 5);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "id")), ids[4]);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "state")),
                        "expired");
    json_decref(all);

    /* reuse works after a restart too: the pending one is found again */
    struct approval again = create(s2, "bot", FP_A, T0 + 20, false);
    assert_string_equal(again.id, ids[0]);
    approval_clear(&again);

    /* loading the same rows twice is refused, not duplicated */
    assert_int_equal(approval_store_load(s2, db, T0 + 10, &err), PEP_EDB);
    approval_store_free(s2);
    approval_store_free(s);
    sqlite3_close(db);
}

static void test_database_refuses(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct approval_store *s = approval_store_new();
    struct approval a = create(s, "bot", FP_A, T0, true);
    assert_int_equal(approval_apply_insert(db, &a), 0);
    assert_int_equal(approval_apply_insert(db, &a), PEP_EDB); /* same id */

    struct approval_use_write w = {.used_at_us = T0 + 5};
    snprintf(w.id, sizeof w.id, "%s", a.id);
    snprintf(w.used_by, sizeof w.used_by, "%s", REQ1);
    /* SECURITY: not approved in the database (its decision record failed): no use */
    assert_int_equal(approval_apply_use(db, &w), PEP_EDB);

    struct approval before, after;
    enum approval_decide v;
    assert_int_equal(
        approval_decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + 1, &v, &before, &after), 0);
    assert_int_equal(approval_apply_decide(db, &before), PEP_EINVAL); /* not a decision */
    assert_int_equal(approval_apply_decide(db, &after), 0);
    assert_int_equal(approval_apply_decide(db, &after), PEP_EDB); /* no longer pending */

    w.used_at_us = T0 + HOUR; /* too late */
    assert_int_equal(approval_apply_use(db, &w), PEP_EDB);
    w.used_at_us = T0 + HOUR - 1;
    assert_int_equal(approval_apply_use(db, &w), 0);
    assert_int_equal(approval_apply_use(db, &w), PEP_EDB); /* twice */

    snprintf(after.id, sizeof after.id, "%s", "01HNOSUCHAPPROVALXXXXXXXXX");
    assert_int_equal(approval_apply_decide(db, &after), PEP_EDB);
    snprintf(w.id, sizeof w.id, "%s", "01HNOSUCHAPPROVALXXXXXXXXX");
    assert_int_equal(approval_apply_use(db, &w), PEP_EDB);
    approval_clear(&before);
    approval_clear(&after);

    /* no table */
    sqlite3 *bare = NULL;
    assert_int_equal(sqlite3_open(":memory:", &bare), SQLITE_OK);
    assert_int_equal(approval_apply_insert(bare, &a), PEP_EDB);
    struct pep_err err = {0};
    assert_int_equal(approval_store_load(s, bare, T0, &err), PEP_EDB);
    sqlite3_close(bare);
    approval_clear(&a);
    approval_store_free(s);
    sqlite3_close(db);
}

static void test_load_retention_and_malformed(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct approval_store *s = approval_store_new();
    const int64_t now = T0 + 100 * 24 * HOUR;
    /* expired exactly APPROVAL_RETAIN_US ago: skipped; 1 µs later: kept */
    struct approval_request in = request("bot", FP_A);
    in.ttl_us = 1;
    struct approval old, kept;
    bool created;
    assert_int_equal(approval_create(s, &in, now - APPROVAL_RETAIN_US - 1, &old, &created), 0);
    in.fingerprint = FP_B;
    assert_int_equal(approval_create(s, &in, now - APPROVAL_RETAIN_US, &kept, &created), 0);
    assert_int_equal(approval_apply_insert(db, &old), 0);
    assert_int_equal(approval_apply_insert(db, &kept), 0);

    struct approval_store *s2 = approval_store_new();
    struct pep_err err = {0};
    assert_int_equal(approval_store_load(s2, db, now, &err), 0);
    struct approval got;
    assert_int_equal(approval_get(s2, old.id, &got), PEP_ENOTFOUND);
    assert_int_equal(approval_get(s2, kept.id, &got), 0);
    approval_clear(&got);
    approval_store_free(s2);

    /* prune applies the same rule to a running store */
    assert_int_equal(approval_store_prune(s, now), 1);
    assert_int_equal(approval_get(s, old.id, &got), PEP_ENOTFOUND);
    assert_int_equal(approval_get(s, kept.id, &got), 0);
    approval_clear(&got);
    assert_int_equal(approval_store_prune(s, now), 0);

    /* a malformed row fails the load */
    const char *bad[] = {
        "UPDATE approvals SET fields = '[1]' WHERE id = ?1",
        "UPDATE approvals SET fields = 'not json' WHERE id = ?1",
        "UPDATE approvals SET approvers = '[1]' WHERE id = ?1",
        "UPDATE approvals SET fingerprint = 'abc' WHERE id = ?1",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad); i++) {
        sqlite3_stmt *st = NULL;
        assert_int_equal(sqlite3_exec(db, "SAVEPOINT t", NULL, NULL, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_prepare_v2(db, bad[i], -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_text(st, 1, kept.id, -1, SQLITE_STATIC);
        assert_int_equal(sqlite3_step(st), SQLITE_DONE);
        sqlite3_finalize(st);
        s2 = approval_store_new();
        assert_int_equal(approval_store_load(s2, db, now, &err), PEP_EDB);
        assert_non_null(strstr(err.msg, kept.id));
        approval_store_free(s2);
        assert_int_equal(sqlite3_exec(db, "ROLLBACK TO t; RELEASE t", NULL, NULL, NULL), SQLITE_OK);
    }
    /* the CHECK keeps 'expired' (a reported state, never stored) out */
    char *sql = sqlite3_mprintf("UPDATE approvals SET state = 'expired' WHERE id = %Q", kept.id);
    assert_int_not_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_free(sql);

    approval_clear(&old);
    approval_clear(&kept);
    approval_store_free(s);
    sqlite3_close(db);
}

/* Through the real audit writer: each apply runs inside the batch's savepoint next to its
 * record; a refused apply fails its item alone. */
struct waiter {
    pthread_mutex_t m;
    pthread_cond_t c;
    int done;
    int rc;
};

static void waiter_done(void *arg, int rc, int64_t seq) {
    (void)seq;
    struct waiter *w = arg;
    pthread_mutex_lock(&w->m);
    w->rc = rc;
    w->done = 1;
    pthread_cond_broadcast(&w->c);
    pthread_mutex_unlock(&w->m);
}

static int submit_and_wait(struct audit_store *as, const char *approval_id, audit_apply_fn apply,
                           void *arg) {
    struct waiter w = {.m = PTHREAD_MUTEX_INITIALIZER, .c = PTHREAD_COND_INITIALIZER};
    json_t *rec = json_pack("{s:s, s:s, s:s, s:s}", "ts", "2023-11-14T22:13:20.123456Z", "kind",
                            "decision", "request_id", REQ1, "approval_id", approval_id);
    assert_int_equal(audit_submit(as, rec, apply, arg, waiter_done, &w), 0);
    pthread_mutex_lock(&w.m);
    while (!w.done)
        pthread_cond_wait(&w.c, &w.m);
    pthread_mutex_unlock(&w.m);
    return w.rc;
}

static void test_through_audit_writer(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-approvals-XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/pep.db", dir);
    struct audit_options opt = {.durability_full = false, .schema_extra = APPROVALS_SCHEMA};
    struct audit_store *as = NULL;
    struct pep_err err = {0};
    if (audit_open(path, &opt, &as, &err) != 0) fail_msg("audit_open: %s", err.msg);

    struct approval_store *s = approval_store_new();
    struct approval a = create(s, "bot", FP_A, T0, true);
    assert_int_equal(submit_and_wait(as, a.id, approval_apply_insert, &a), 0);
    struct approval before, after;
    enum approval_decide v;
    assert_int_equal(
        approval_decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + 1, &v, &before, &after), 0);
    assert_int_equal(submit_and_wait(as, a.id, approval_apply_decide, &after), 0);
    /* a second decision of the same row is refused by the database: the item fails */
    assert_true(submit_and_wait(as, a.id, approval_apply_decide, &after) < 0);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ2, T0 + 2, NULL, NULL),
                     APPROVAL_USE_OK);
    struct approval_use_write w = {.used_at_us = T0 + 2};
    snprintf(w.id, sizeof w.id, "%s", a.id);
    snprintf(w.used_by, sizeof w.used_by, "%s", REQ2);
    assert_int_equal(submit_and_wait(as, a.id, approval_apply_use, &w), 0);
    approval_mark_used(s, a.id, REQ2, w.used_at_us);
    audit_close(as);

    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(path, &db, &err), 0);
    struct approval_store *s2 = approval_store_new();
    assert_int_equal(approval_store_load(s2, db, T0 + 3, &err), 0);
    struct approval x, y;
    assert_int_equal(approval_get(s, a.id, &x), 0);
    assert_int_equal(approval_get(s2, a.id, &y), 0);
    assert_same(&x, &y);
    assert_int_equal(y.state, APPROVAL_USED);
    approval_clear(&x);
    approval_clear(&y);
    /* the failed item left no record: 3 records for 4 submissions */
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*) FROM audit", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 3);
    sqlite3_finalize(st);
    sqlite3_close(db);

    approval_clear(&before);
    approval_clear(&after);
    approval_clear(&a);
    approval_store_free(s);
    approval_store_free(s2);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* ---- JSON ---------------------------------------------------------------------------- */

static void test_json_shapes(void **state) {
    (void)state;
    struct approval_store *s = approval_store_new();
    /* created out of time order: lists still run oldest first */
    struct approval late = create(s, "bot", FP_B, T0 + S, true);
    struct approval a = create(s, "bot", FP_A, T0, true);
    char expect[2048];

    snprintf(expect, sizeof expect,
             "{\"approvals\":[{\"action\":\"refund.issue\",\"agent\":\"bot\","
             "\"created_at\":\"2023-11-14T22:13:20.123456Z\","
             "\"expires_at\":\"2023-11-14T23:13:20.123456Z\",\"id\":\"%s\","
             "\"method\":\"POST\",\"path\":\"/v1/refunds\",\"state\":\"pending\","
             "\"tenant\":\"acme\"},{\"action\":\"refund.issue\",\"agent\":\"bot\","
             "\"created_at\":\"2023-11-14T22:13:21.123456Z\","
             "\"expires_at\":\"2023-11-14T23:13:21.123456Z\",\"id\":\"%s\","
             "\"method\":\"POST\",\"path\":\"/v1/refunds\",\"state\":\"pending\","
             "\"tenant\":\"acme\"}]}",
             a.id, late.id);
    assert_json(approval_list_json(s, NULL, T0 + 2 * S), expect);

    /* filters: by the state at now */
    enum approval_state st = APPROVAL_APPROVED;
    assert_json(approval_list_json(s, &st, T0), "{\"approvals\":[]}");
    st = APPROVAL_EXPIRED;
    json_t *l = approval_list_json(s, &st, T0 + HOUR);
    assert_int_equal(json_array_size(json_object_get(l, "approvals")), 1); /* a, not late */
    json_decref(l);

    snprintf(expect, sizeof expect,
             "{\"expires_at\":\"2023-11-14T23:13:20.123456Z\",\"id\":\"%s\","
             "\"state\":\"pending\"}",
             a.id);
    assert_json(approval_poll_json(&a, T0), expect);
    snprintf(expect, sizeof expect,
             "{\"expires_at\":\"2023-11-14T23:13:20.123456Z\",\"id\":\"%s\","
             "\"state\":\"expired\"}",
             a.id);
    assert_json(approval_poll_json(&a, T0 + HOUR), expect);

    /* notify: exactly SPEC 3.4's keys — no token, body or fingerprint */
    snprintf(expect, sizeof expect,
             "{\"action\":\"refund.issue\",\"agent\":\"bot\","
             "\"created_at\":\"2023-11-14T22:13:20.123456Z\","
             "\"expires_at\":\"2023-11-14T23:13:20.123456Z\","
             "\"fields\":{\"amount\":1500,\"currency\":\"USD\"},\"id\":\"%s\","
             "\"method\":\"POST\",\"owner\":\"Alice@Example.test\",\"path\":\"/v1/refunds\","
             "\"tenant\":\"acme\"}",
             a.id);
    assert_json(approval_notify_json(&a), expect);

    /* detail, pending: what has not happened is null */
    snprintf(expect, sizeof expect,
             "{\"action\":\"refund.issue\",\"agent\":\"bot\",\"approvers\":[\"approver\","
             "\"finance\"],\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"decided_at\":null,"
             "\"decided_by\":null,\"distinct_from_owner\":true,"
             "\"expires_at\":\"2023-11-14T23:13:20.123456Z\","
             "\"fields\":{\"amount\":1500,\"currency\":\"USD\"},\"id\":\"%s\","
             "\"method\":\"POST\",\"owner\":\"Alice@Example.test\",\"path\":\"/v1/refunds\","
             "\"reason\":null,\"request_id\":\"%s\",\"state\":\"pending\",\"tenant\":\"acme\","
             "\"used_at\":null,\"used_by\":null}",
             a.id, REQ1);
    assert_json(approval_detail_json(&a, T0), expect);

    /* detail, used */
    assert_int_equal(decide(s, a.id, "bob", R_APPROVER, 1, true, "ok", T0 + S), APPROVAL_DECIDE_OK);
    assert_int_equal(approval_reserve(s, a.id, "bot", FP_A, REQ2, T0 + 2 * S, NULL, NULL),
                     APPROVAL_USE_OK);
    approval_mark_used(s, a.id, REQ2, T0 + 3 * S);
    struct approval u;
    assert_int_equal(approval_get(s, a.id, &u), 0);
    snprintf(expect, sizeof expect,
             "{\"action\":\"refund.issue\",\"agent\":\"bot\",\"approvers\":[\"approver\","
             "\"finance\"],\"created_at\":\"2023-11-14T22:13:20.123456Z\","
             "\"decided_at\":\"2023-11-14T22:13:21.123456Z\",\"decided_by\":\"bob\","
             "\"distinct_from_owner\":true,\"expires_at\":\"2023-11-14T23:13:20.123456Z\","
             "\"fields\":{\"amount\":1500,\"currency\":\"USD\"},\"id\":\"%s\","
             "\"method\":\"POST\",\"owner\":\"Alice@Example.test\",\"path\":\"/v1/refunds\","
             "\"reason\":\"ok\",\"request_id\":\"%s\",\"state\":\"used\",\"tenant\":\"acme\","
             "\"used_at\":\"2023-11-14T22:13:23.123456Z\",\"used_by\":\"%s\"}",
             a.id, REQ1, REQ2);
    assert_json(approval_detail_json(&u, T0 + 2 * HOUR), expect);
    approval_clear(&u);
    approval_clear(&a);
    approval_clear(&late);
    approval_store_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_names),
        cmocka_unit_test(test_state_at),
        cmocka_unit_test(test_decide_verdicts),
        cmocka_unit_test(test_use_verdicts),
        cmocka_unit_test(test_create_pending),
        cmocka_unit_test(test_create_invalid),
        cmocka_unit_test(test_create_reuse),
        cmocka_unit_test(test_decide),
        cmocka_unit_test(test_reserve_and_use),
        cmocka_unit_test(test_reserve_concurrent),
        cmocka_unit_test(test_forget_and_undo),
        cmocka_unit_test(test_persistence),
        cmocka_unit_test(test_database_refuses),
        cmocka_unit_test(test_load_retention_and_malformed),
        cmocka_unit_test(test_through_audit_writer),
        cmocka_unit_test(test_json_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
