/*
 * approvals.h — human approvals (SPEC 3.4, 5, 8): a request that hits a `require_approval`
 * control waits for an operator's decision, then may be re-sent once.
 *
 * Three layers:
 *  - a pure state machine (approval_state_at, approval_use_verdict, approval_decide_verdict)
 *    that takes `now` and touches no lock, clock or file;
 *  - a thread-safe in-memory store (struct approval_store, one mutex) that the request
 *    path and the admin API read and change at once ("published" before the change's
 *    audit record is durable, undone by the caller if that record fails);
 *  - the SQLite side: APPROVALS_SCHEMA, approval_apply_* (run by the audit writer inside
 *    the transaction of the record that says what happened, DESIGN rule 2) and
 *    approval_store_load at start.  The database is the arbiter: apply_decide only moves
 *    a row out of `pending`, apply_use only consumes an `approved` unused row, so a use
 *    whose approval's decision record failed fails too.
 *
 * States.  Stored: pending, approved, denied, used.  Reported: the stored state, except
 * that a pending or approved approval is `expired` once now >= expires_at (nothing is
 * written when one expires).  Transitions: pending → approved | denied (decide, by an
 * operator holding one of `approvers` or `admin`, not the owner under distinct_from_owner,
 * before expiry); approved → used (one request that passed every check).  Between reserve
 * and mark_used/release an approved approval is held by one in-flight request
 * (`reserved_by`, memory only): a concurrent re-send is refused, never a second use.
 *
 * Copies: every function that hands out an approval fills a caller-owned struct approval
 * with deep copies (free them with approval_clear); nothing returned points into the store.
 *
 * Threads: approval_store_* and approval_create/decide/reserve/... from any thread (the
 * store's mutex `lock` guards every entry and the indexes); approval_apply_* on the audit
 * writer thread only (they touch only the db they are given); pure functions and JSON views
 * of a copy from any thread.
 */
#ifndef PEP_APPROVALS_H
#define PEP_APPROVALS_H

#include "pep/common.h"

#include <jansson.h>
#include <sqlite3.h>

#define APPROVAL_ID_SIZE 27          /* a ULID (pep_request_id) and its NUL */
#define APPROVAL_FINGERPRINT_SIZE 65 /* hex SHA-256 (pep/fingerprint.h) and its NUL */
/* approval_store_load skips rows that expired more than this long ago (7 days): they can no
 * longer be decided or used, their story is in the audit log, and a store that ran for
 * years must not load every approval it ever held.  approval_store_prune drops them from
 * memory with the same rule, so a running pep and a restarted one answer alike. */
#define APPROVAL_RETAIN_US (7 * 24 * 3600 * INT64_C(1000000))

enum approval_state {
    APPROVAL_PENDING,
    APPROVAL_APPROVED,
    APPROVAL_DENIED,
    APPROVAL_EXPIRED,
    APPROVAL_USED
};

/* "pending", "approved", "denied", "expired", "used" (static; "unknown" for others). */
const char *approval_state_name(enum approval_state s);
/* Parses one of those names; 0, or PEP_EINVAL ("all" is the caller's: no filter). */
int approval_state_parse(const char *s, enum approval_state *out);

struct approval {
    char id[APPROVAL_ID_SIZE];
    char *agent;  /* the requesting agent: only it may use or poll the approval */
    char *owner;  /* the agent's owner when created ("" when none) */
    char *tenant; /* the request's tenant */
    char *action; /* the policy action the request matched */
    char *method; /* the request's method and normalized path, for the human deciding */
    char *path;
    char fingerprint[APPROVAL_FINGERPRINT_SIZE]; /* of the request it approves */
    json_t *fields;   /* object: the body fields the control's conditions name (never the
                         body); owned by this struct */
    char **approvers; /* operator roles that may decide (from the control); `admin` may too */
    size_t approvers_len;
    bool distinct_from_owner; /* the deciding operator must not be `owner` */
    int64_t created_at_us;
    int64_t expires_at_us;     /* created + ttl: expired when now >= expires_at */
    enum approval_state state; /* as stored: pending, approved, denied or used, never expired */
    char *decided_by;          /* operator id; NULL while pending */
    char *reason;              /* the operator's reason; NULL when none given or pending */
    int64_t decided_at_us;     /* 0 while pending */
    char *request_id;          /* the request that created it */
    char *used_by;             /* the request that used it; NULL until used */
    int64_t used_at_us;        /* 0 until used */
    char reserved_by[APPROVAL_ID_SIZE]; /* memory only: the in-flight request holding it, ""
                                           when none */
};

/* Deep-copies src into dst (dst's old contents are not freed).  0 or PEP_ENOMEM (dst is then
 * zeroed).  Any thread; src must not change meanwhile. */
int approval_copy(struct approval *dst, const struct approval *src);
/* Frees a copy's members and zeroes it; a zeroed struct is fine, NULL is a no-op. */
void approval_clear(struct approval *a);

/* ---- the pure state machine (any thread) --------------------------------------------- */

/* The state a reader sees at now: the stored one, or EXPIRED for a pending or approved
 * approval once now >= expires_at. */
enum approval_state approval_state_at(const struct approval *a, int64_t now_us);

enum approval_use {
    APPROVAL_USE_OK,      /* approved, unexpired, unused, not held: the request may proceed */
    APPROVAL_USE_PENDING, /* not decided yet: answer 403 approval_required again, same id */
    APPROVAL_USE_DENIED,  /* 403 approval_denied */
    APPROVAL_USE_INVALID, /* 403 approval_invalid, *why says which rule refused */
};

/* May this agent's request (fingerprint) proceed on a (NULL = unknown id)?  Checked in this
 * order, so that another agent learns nothing of an approval's state: unknown, another
 * agent's, another request's fingerprint, then the state at now (denied, used, expired,
 * pending), then held by another in-flight request.  *why (when why is not NULL) is a static
 * reason for INVALID and DENIED, NULL otherwise. */
enum approval_use approval_use_verdict(const struct approval *a, const char *agent,
                                       const char *fingerprint, int64_t now_us, const char **why);

enum approval_decide {
    APPROVAL_DECIDE_OK,
    APPROVAL_DECIDE_NOT_APPROVER, /* none of the operator's roles is an approver or admin */
    APPROVAL_DECIDE_IS_OWNER,     /* distinct_from_owner and the operator owns the agent */
    APPROVAL_DECIDE_NOT_PENDING,  /* already approved, denied or used */
    APPROVAL_DECIDE_EXPIRED,      /* still pending but past expires_at */
};

/* May operator_id holding roles decide a at now?  Authorization first (an operator who may
 * not decide it learns nothing of its state), then the state. */
enum approval_decide approval_decide_verdict(const struct approval *a, const char *operator_id,
                                             const char *const *roles, size_t roles_len,
                                             int64_t now_us);
/* "ok", "not_approver", "is_owner", "not_pending", "expired" (static), for messages. */
const char *approval_decide_name(enum approval_decide v);

/* ---- the store (any thread) ----------------------------------------------------------- */

struct approval_store;

/* NULL on ENOMEM.  Free with approval_store_free once no other thread uses it. */
struct approval_store *approval_store_new(void);
void approval_store_free(struct approval_store *s);

/* Loads the approvals table into an empty store at start, before any request, skipping
 * rows that expired more than APPROVAL_RETAIN_US before now.  Reservations are not
 * persisted: a request in flight at a crash never committed its use.  Returns 0, or
 * PEP_EDB with err (SQLite failed, or a malformed row: a start must not go on with part of
 * the approvals), PEP_ENOMEM. */
int approval_store_load(struct approval_store *s, sqlite3 *db, int64_t now_us, struct pep_err *err);

/* Drops from memory the approvals that expired more than APPROVAL_RETAIN_US before now and
 * are not held; returns how many.  Call it now and then (e.g. once a minute). */
size_t approval_store_prune(struct approval_store *s, int64_t now_us);

/* What the pipeline knows when a require_approval control applies.  Strings are copied. */
struct approval_request {
    const char *agent, *owner, *tenant, *action, *method, *path;
    const char *fingerprint; /* 64 lowercase hex characters */
    const char *request_id;  /* the request creating it */
    const json_t *fields;    /* an object, deep-copied; NULL = {} */
    const char *const *approvers;
    size_t approvers_len;
    bool distinct_from_owner;
    int64_t ttl_us; /* > 0 */
};

/*
 * Creates a pending approval for in, or — when a pending, unexpired approval of the same
 * agent and fingerprint exists — returns that one instead (*created false), so that an
 * agent re-sending while it waits does not flood the approvers.  A new one is published at
 * once (its id from pep_request_id); the caller then queues its record with
 * apply = approval_apply_insert, apply_arg = out, and calls approval_forget(out->id) if that
 * record fails.  *out is a copy the caller clears.  Returns 0, PEP_EINVAL (a missing
 * string, a fingerprint that is not 64 hex characters, ttl <= 0, fields not an object), or
 * PEP_ENOMEM (nothing published).
 */
int approval_create(struct approval_store *s, const struct approval_request *in, int64_t now_us,
                    struct approval *out, bool *created);

/* Removes id from memory (its insert record failed).  Unknown id: no-op. */
void approval_forget(struct approval_store *s, const char *id);

/*
 * Decides id: checks approval_decide_verdict and, when OK, publishes the decision at once
 * (approved or denied, decided_by = operator_id, decided_at = now, reason copied; reason
 * may be NULL) so that a concurrent decide sees it.  Returns PEP_ENOTFOUND for an unknown
 * id, PEP_EINVAL (operator_id NULL), PEP_ENOMEM (nothing changed), or 0 with *verdict set, *before
 * the approval as it was and *after as it is now (equal to *before unless the verdict is OK):
 * copies the caller clears.  When OK, the caller queues an admin record with apply =
 * approval_apply_decide, apply_arg = after, and calls approval_undo_decide(before) if that record
 * fails.
 */
int approval_decide(struct approval_store *s, const char *id, const char *operator_id,
                    const char *const *roles, size_t roles_len, bool approve, const char *reason,
                    int64_t now_us, enum approval_decide *verdict, struct approval *before,
                    struct approval *after);

/* Puts back the decision fields (state, decided_by, decided_at, reason) of before, the
 * copy approval_decide returned.  No-op when the id is gone or already used. */
void approval_undo_decide(struct approval_store *s, const struct approval *before);

/*
 * The agent's re-send with `Pep-Approval: id`: approval_use_verdict on the stored approval
 * and, when OK, holds it for request_id (atomically: of concurrent re-sends exactly one gets
 * OK; the others see "in use by another request").  request_id is a pep request id (1-26
 * characters).  *why as approval_use_verdict.  out (may be NULL) receives a copy when the
 * approval is this agent's (zeroed otherwise, or when the copy failed); the caller clears it. After
 * OK the caller must end the hold: approval_mark_used once the request's decision record (apply =
 * approval_apply_use) committed, approval_release if the request is refused later or that record
 * failed.
 */
enum approval_use approval_reserve(struct approval_store *s, const char *id, const char *agent,
                                   const char *fingerprint, const char *request_id, int64_t now_us,
                                   const char **why, struct approval *out);

/* Ends request_id's hold on id; the approval is usable again.  No-op when request_id does
 * not hold it. */
void approval_release(struct approval_store *s, const char *id, const char *request_id);

/* Makes id used by request_id at used_at_us — pass the approval_use_write's values, whose
 * record has committed.  The database already says so: memory follows whatever the hold. */
void approval_mark_used(struct approval_store *s, const char *id, const char *request_id,
                        int64_t used_at_us);

/* A copy of id into *out (caller clears).  0, PEP_ENOTFOUND, or PEP_ENOMEM. */
int approval_get(struct approval_store *s, const char *id, struct approval *out);
/* approval_get for the agent polling GET /v1/approvals/{id}: PEP_ENOTFOUND as well when the
 * approval is another agent's.  SECURITY: an agent cannot learn that another agent's
 * approval exists, nor its state, by guessing ids. */
int approval_get_for_agent(struct approval_store *s, const char *id, const char *agent,
                           struct approval *out);

/* ---- SQLite (audit writer thread, inside the item's savepoint; never BEGIN/COMMIT) ------- */

/* CREATE TABLE IF NOT EXISTS approvals (…) and its index: append it to audit_options'
 * schema_extra (after registry_schema_sql()). */
extern const char APPROVALS_SCHEMA[];

/* INSERTs the approval arg (a const struct approval *: the copy approval_create returned).
 * 0, PEP_EDB (SQLite failed, the id exists), PEP_ENOMEM. */
int approval_apply_insert(sqlite3 *db, void *arg);

/* Writes the decision of arg (a const struct approval *: the `after` approval_decide
 * returned) onto its row, which must still be pending.  0, PEP_EDB (no such pending row,
 * SQLite failed). */
int approval_apply_decide(sqlite3 *db, void *arg);

struct approval_use_write {
    char id[APPROVAL_ID_SIZE];
    char used_by[APPROVAL_ID_SIZE]; /* the request using it */
    int64_t used_at_us;
};

/* Consumes the row of arg (a const struct approval_use_write *): it must be approved (not
 * used) and unexpired at used_at.  0, PEP_EDB (no such row, SQLite failed). */
int approval_apply_use(sqlite3 *db, void *arg);

/* ---- JSON views (new references, NULL when memory ran out) ------------------------------ */

/* {"approvals":[{id, state, agent, tenant, action, method, path, created_at, expires_at}]}
 * (SPEC 8), oldest first, those whose state at now is *filter (NULL = all).  Any thread. */
json_t *approval_list_json(struct approval_store *s, const enum approval_state *filter,
                           int64_t now_us);
/* The admin's view of one: {id, state, action, agent, owner, tenant, method, path, fields,
 * approvers, distinct_from_owner, created_at, expires_at, decided_by, decided_at, reason,
 * request_id, used_by, used_at} (null for what has not happened). */
json_t *approval_detail_json(const struct approval *a, int64_t now_us);
/* The agent's poll (SPEC 3.4): {id, state, expires_at}. */
json_t *approval_poll_json(const struct approval *a, int64_t now_us);
/* The notify body (SPEC 3.4): {id, action, agent, owner, tenant, method, path, fields,
 * created_at, expires_at} — never a token or the body. */
json_t *approval_notify_json(const struct approval *a);

#endif
