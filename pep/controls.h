/*
 * controls.h — SPEC 3.2 step 5: an action's controls, in file order, each only when its
 * `when` holds.  Pure (DESIGN rule 1): the request is seen through a cond_request, the
 * token through its claims, the time is a parameter.
 *
 * What a control does when it applies:
 *   deny              the request is refused (403 denied_by_rule, the control's message);
 *   step_up           unless the token carries the `acr` asked for and, with max_age, an
 *                     `auth_time` no older than it: 401 insufficient_user_authentication;
 *   require_approval  the caller checks the request's Pep-Approval (approvals.h); an
 *                     approval that lets it through satisfies the control, and the walk
 *                     goes on from the next one (controls_next with from = index + 1).
 *
 * Threads: any.
 */
#ifndef PEP_CONTROLS_H
#define PEP_CONTROLS_H

#include "pep/cond.h"
#include "pep/policy.h"
#include "pep/token.h"

enum control_outcome {
    CONTROLS_PASS,     /* no further control stops the request */
    CONTROLS_DENY,     /* a deny control applies */
    CONTROLS_STEP_UP,  /* a step_up control applies and the token does not satisfy it */
    CONTROLS_APPROVAL, /* a require_approval control applies: the caller decides */
};

struct control_step {
    enum control_outcome outcome;
    const struct control *control; /* the control that stopped the walk, or NULL (PASS) */
    size_t index;                  /* its index in the action's controls */
};

/* Walks a's controls from index `from`; fills *out with the first that stops the request. */
void controls_next(const struct action *a, size_t from, const struct cond_request *req,
                   const struct token_claims *claims, int64_t now_s, struct control_step *out);

/* RFC 9470: whether the token satisfies a step_up control at now_s. */
bool controls_step_up_satisfied(const struct control *c, const struct token_claims *claims,
                                int64_t now_s);

/* The RFC 9470 challenge for a step_up control: `Bearer error="insufficient_user_
 * authentication", acr_values="mfa"` and `, max_age=300` when the control has one. */
void controls_step_up_challenge(const struct control *c, char *out, size_t cap);

#endif
