/*
 * test_controls.c — the walk of an action's controls (pep/controls.c, SPEC 3.2 step 5):
 * file order, only controls whose `when` holds, what stops the walk, RFC 9470 step-up
 * freshness at its exact boundaries, and the challenge pep answers with.
 */
#include "pep/controls.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

static const char POLICY[] = "version: 1\n"
                             "routes:\n"
                             "  - { match: { path: /r }, action: refund }\n"
                             "actions:\n"
                             "  refund:\n"
                             "    scope: refund\n"
                             "    controls:\n"
                             "      - when: { body.currency: { not_in: [USD, EUR] } }\n"
                             "        deny: currency not supported\n"
                             "      - step_up: { acr: mfa, max_age: 5m }\n"
                             "      - when: { body.amount: { gt: 1000 } }\n"
                             "        require_approval: { approvers: [approver] }\n"
                             "      - when: { header.x-test: { eq: last } }\n"
                             "        deny: last rule\n"
                             "  plain:\n"
                             "    scope: plain\n"
                             "    controls:\n"
                             "      - step_up: { acr: mfa }\n";

static struct policy *P;
static const struct action *REFUND, *PLAIN;

static int setup(void **state) {
    (void)state;
    struct policy_errors errs;
    if (policy_load_buffer("t.yaml", POLICY, strlen(POLICY), &P, &errs) != 0) {
        for (size_t i = 0; i < errs.len; i++)
            fprintf(stderr, "%s\n", errs.items[i]);
        return -1;
    }
    policy_errors_free(&errs);
    REFUND = policy_find_action(P, "refund");
    PLAIN = policy_find_action(P, "plain");
    return 0;
}

static int teardown(void **state) {
    (void)state;
    policy_release(P);
    return 0;
}

static const char *header_last(void *arg, const char *name) {
    (void)arg;
    return strcmp(name, "x-test") == 0 ? "last" : NULL;
}

/* A request with the given body; x-test: last when last. */
static void view(struct cond_request *v, json_t *body, bool last) {
    *v = (struct cond_request){.body = body, .method = "POST", .now_s = 1000000};
    if (last) v->header = header_last;
}

static void test_step_up_freshness(void **state) {
    (void)state;
    const struct control *c = &REFUND->controls[1]; /* acr mfa, max_age 300 s */
    const int64_t now = 1000000;
    struct token_claims t = {0};
    assert_false(controls_step_up_satisfied(c, &t, now)); /* no acr */
    t.acr = "pwd";
    t.auth_time = now;
    assert_false(controls_step_up_satisfied(c, &t, now)); /* another acr */
    t.acr = "mfa";
    t.auth_time = 0;
    assert_false(controls_step_up_satisfied(c, &t, now)); /* max_age but no auth_time */
    t.auth_time = now - 300;
    assert_true(controls_step_up_satisfied(c, &t, now)); /* exactly max_age old */
    t.auth_time = now - 301;
    assert_false(controls_step_up_satisfied(c, &t, now)); /* one second older */
    t.auth_time = now + 1;
    assert_false(controls_step_up_satisfied(c, &t, now)); /* from the future */
    t.auth_time = now;
    assert_true(controls_step_up_satisfied(c, &t, now));
    /* without max_age any age will do, even none */
    const struct control *any_age = &PLAIN->controls[0];
    t.auth_time = 0;
    assert_true(controls_step_up_satisfied(any_age, &t, now));
    t.acr = "MFA"; /* values are case-sensitive */
    assert_false(controls_step_up_satisfied(any_age, &t, now));
}

static void test_challenge(void **state) {
    (void)state;
    char out[200];
    controls_step_up_challenge(&REFUND->controls[1], out, sizeof out);
    assert_string_equal(
        out, "Bearer error=\"insufficient_user_authentication\", acr_values=\"mfa\", max_age=300");
    controls_step_up_challenge(&PLAIN->controls[0], out, sizeof out);
    assert_string_equal(out,
                        "Bearer error=\"insufficient_user_authentication\", acr_values=\"mfa\"");
}

static void test_walk_in_file_order(void **state) {
    (void)state;
    struct token_claims fresh = {.acr = "mfa", .auth_time = 1000000};
    struct token_claims stale = {.acr = "mfa", .auth_time = 1};
    struct control_step step;
    struct cond_request v;

    /* a deny that applies comes first, whatever follows */
    json_t *yen = json_pack("{s:s, s:i}", "currency", "JPY", "amount", 5000);
    view(&v, yen, true);
    controls_next(REFUND, 0, &v, &stale, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_DENY);
    assert_int_equal(step.index, 0);
    assert_string_equal(step.control->deny_reason, "currency not supported");

    /* then the step-up */
    json_t *big = json_pack("{s:s, s:i}", "currency", "USD", "amount", 5000);
    view(&v, big, false);
    controls_next(REFUND, 0, &v, &stale, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_STEP_UP);
    assert_int_equal(step.index, 1);

    /* a fresh token passes it; the approval's `when` holds */
    controls_next(REFUND, 0, &v, &fresh, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_APPROVAL);
    assert_int_equal(step.index, 2);
    /* the caller found an approval: the walk goes on after it */
    controls_next(REFUND, step.index + 1, &v, &fresh, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_PASS);
    assert_null(step.control);
    view(&v, big, true);
    controls_next(REFUND, 3, &v, &fresh, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_DENY);
    assert_string_equal(step.control->deny_reason, "last rule");

    /* a small refund: the approval's `when` does not hold, so it is skipped */
    json_t *small = json_pack("{s:s, s:i}", "currency", "EUR", "amount", 10);
    view(&v, small, false);
    controls_next(REFUND, 0, &v, &fresh, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_PASS);

    /* no body at all: body.currency is absent, so not_in is false and the deny is skipped */
    view(&v, NULL, false);
    controls_next(REFUND, 0, &v, &fresh, v.now_s, &step);
    assert_int_equal(step.outcome, CONTROLS_PASS);
    json_decref(yen);
    json_decref(big);
    json_decref(small);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step_up_freshness),
        cmocka_unit_test(test_challenge),
        cmocka_unit_test(test_walk_in_file_order),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
