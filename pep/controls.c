/*
 * controls.c — SPEC 3.2 step 5, pure.  See controls.h.
 */
#include "pep/controls.h"

#include <stdio.h>
#include <string.h>

bool controls_step_up_satisfied(const struct control *c, const struct token_claims *claims,
                                int64_t now_s) {
    if (!claims->acr || strcmp(claims->acr, c->acr) != 0) return false;
    if (c->max_age_ms == 0) return true;
    /* A token that says nothing of when its owner authenticated cannot be fresh enough; one
     * from the future (auth_time > now) is refused too rather than trusted forever. */
    return claims->auth_time > 0 && claims->auth_time <= now_s &&
           now_s - claims->auth_time <= c->max_age_ms / 1000;
}

void controls_step_up_challenge(const struct control *c, char *out, size_t cap) {
    int n = snprintf(
        out, cap, "Bearer error=\"insufficient_user_authentication\", acr_values=\"%s\"", c->acr);
    if (c->max_age_ms > 0 && n > 0 && (size_t)n < cap)
        snprintf(out + n, cap - (size_t)n, ", max_age=%lld", (long long)(c->max_age_ms / 1000));
}

void controls_next(const struct action *a, size_t from, const struct cond_request *req,
                   const struct token_claims *claims, int64_t now_s, struct control_step *out) {
    *out = (struct control_step){.outcome = CONTROLS_PASS};
    for (size_t i = from; i < a->controls_len; i++) {
        const struct control *c = &a->controls[i];
        if (c->when && !cond_holds(c->when, req)) continue;
        enum control_outcome o = CONTROLS_PASS;
        switch (c->kind) {
        case CONTROL_DENY:
            o = CONTROLS_DENY;
            break;
        case CONTROL_STEP_UP:
            if (!controls_step_up_satisfied(c, claims, now_s)) o = CONTROLS_STEP_UP;
            break;
        case CONTROL_REQUIRE_APPROVAL:
            o = CONTROLS_APPROVAL;
            break;
        }
        if (o != CONTROLS_PASS) {
            *out = (struct control_step){.outcome = o, .control = c, .index = i};
            return;
        }
    }
}
