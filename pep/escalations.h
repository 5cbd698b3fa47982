/*
 * escalations.h — the human escalation queue (SPEC 4.4, 3.3, 5, 8).
 *
 * When a request's fallback chain is exhausted (every step skipped or failed), or
 * `escalate.after_attempts` of its attempts failed, the forwarder opens an escalation: a
 * durable note for a human that this request could not be served, with what was tried.
 * An operator lists the queue and resolves entries (optionally with a note).  States:
 * open → resolved, nothing else; a resolved escalation is never reopened (except by the
 * undo of a resolution whose record failed).
 *
 * Two layers, as in approvals.h:
 *  - a thread-safe in-memory store (struct escalation_store, one mutex) that the forwarder
 *    and the admin API change at once ("published" before the change's audit record is
 *    durable; undone by the caller if that record fails);
 *  - the SQLite side: ESCALATIONS_SCHEMA, escalation_apply_* (run by the audit writer inside
 *    the transaction of the record that says what happened, DESIGN rule 2) and
 *    escalation_store_load at start.  The row is the arbiter: apply_resolve only moves an
 *    open row, so a resolution whose escalation's own record failed (or is not written yet)
 *    fails too and is undone.
 *
 * Bounds.  An outage opens one escalation per failed request (SPEC asks for that), so
 * memory is bounded: at most max_open open escalations (ESCALATION_MAX_OPEN by default) —
 * beyond that escalation_create refuses with PEP_EUNAVAILABLE (the caller logs and counts
 * it; the agent still gets its 503 upstream_unavailable, without escalation_id); at most
 * max_resolved resolved ones (ESCALATION_MAX_RESOLVED), the oldest resolution dropped from
 * memory first; and resolved ones leave memory ESCALATION_RETAIN_US after their resolution
 * (escalation_store_prune).  Dropping from memory forgets nothing: the row stays in the
 * database and the story in the audit log.
 *
 * Copies: every function that hands out an escalation fills a caller-owned struct
 * escalation with deep copies (free with escalation_clear); nothing points into the store.
 *
 * Threads: escalation_store_* and escalation_create/forget/resolve/undo_resolve/get/
 * list_json from any thread (the store's mutex `lock` guards every entry and index; it is
 * held for memory work only); escalation_apply_* on the audit writer thread only (they
 * touch only the db they are given); escalation_store_load once at start, before other
 * threads use the store; the rest (copies, JSON views of a copy) from any thread.
 */
#ifndef PEP_ESCALATIONS_H
#define PEP_ESCALATIONS_H

#include "pep/common.h"

#include <jansson.h>
#include <sqlite3.h>

#define ESCALATION_ID_SIZE 27 /* a ULID (pep_request_id) and its NUL */
/* Default bounds of a store (see above). */
#define ESCALATION_MAX_OPEN 10000
#define ESCALATION_MAX_RESOLVED 10000
/* Resolved escalations stay in memory (and are loaded at start) this long after their
 * resolution: 7 days, like approvals.  Open ones stay until resolved, whatever their age. */
#define ESCALATION_RETAIN_US (7 * 24 * 3600 * INT64_C(1000000))
/* Longest operator note, in bytes: a longer one is refused (never cut), so that the record
 * says exactly what was written and a note cannot grow memory without bound. */
#define ESCALATION_NOTE_MAX 4096

enum escalation_state { ESCALATION_OPEN, ESCALATION_RESOLVED };

/* "open", "resolved" (static; "unknown" for others). */
const char *escalation_state_name(enum escalation_state s);
/* Parses one of those names; 0, or PEP_EINVAL ("all" is the caller's: no filter). */
int escalation_state_parse(const char *s, enum escalation_state *out);

struct escalation {
    char id[ESCALATION_ID_SIZE];
    enum escalation_state state;
    char *chain;      /* the policy chain whose attempts failed */
    char *request_id; /* the request that escalated */
    char *agent;      /* the requesting agent */
    char *action;     /* the policy action the request matched */
    char *tenant;     /* the request's tenant */
    json_t *attempts; /* array, owned: the attempts so far, as in the outcome record (SPEC 8):
                         {upstream, model, status|error, ms} or {upstream, model, skipped} */
    int last_status;  /* the last HTTP status an upstream answered; 0 = none (JSON null) */
    int64_t created_at_us;
    char *resolved_by;      /* operator id; NULL while open */
    int64_t resolved_at_us; /* 0 while open */
    char *note;             /* the operator's note; NULL when none given or open */
};

/* Deep-copies src into dst (dst's old contents are not freed).  0 or PEP_ENOMEM (dst is then
 * zeroed).  Any thread; src must not change meanwhile. */
int escalation_copy(struct escalation *dst, const struct escalation *src);
/* Frees a copy's members and zeroes it; a zeroed struct is fine, NULL is a no-op. */
void escalation_clear(struct escalation *e);

/* A heap deep copy of src, for an apply argument the audit store owns:
 * audit_submit_owned(as, rec, escalation_apply_insert, escalation_dup(&e), escalation_free).
 * NULL when memory ran out.  escalation_free clears and frees one (NULL: no-op); its
 * signature is audit_submit_owned's apply_arg_free. */
struct escalation *escalation_dup(const struct escalation *src);
void escalation_free(void *e);

/* ---- the store (any thread) ----------------------------------------------------------- */

struct escalation_store;

/* max_open, max_resolved: the bounds above; 0 takes ESCALATION_MAX_OPEN /
 * ESCALATION_MAX_RESOLVED.  NULL on ENOMEM.  Free with escalation_store_free once no other
 * thread uses it. */
struct escalation_store *escalation_store_new(size_t max_open, size_t max_resolved);
void escalation_store_free(struct escalation_store *s);

/* Loads, into an empty store at start, every open escalation (open ones are never dropped:
 * the queue must not hide work, even beyond max_open) and the newest max_resolved of those
 * resolved after now - ESCALATION_RETAIN_US (newest by resolution).  Returns 0, or PEP_EDB
 * with err (SQLite failed, or a malformed row: a start must not go on with part of the
 * queue), PEP_ENOMEM. */
int escalation_store_load(struct escalation_store *s, sqlite3 *db, int64_t now_us,
                          struct pep_err *err);

/* Drops from memory the escalations resolved at or before now - ESCALATION_RETAIN_US;
 * returns how many.  Call it now and then (e.g. once a minute) so that a running pep and a
 * restarted one answer alike. */
size_t escalation_store_prune(struct escalation_store *s, int64_t now_us);

/* What the forwarder knows when a request escalates.  Strings are copied. */
struct escalation_request {
    const char *chain, *request_id, *agent, *action, *tenant;
    const json_t *attempts; /* an array of objects, deep-copied; NULL = [] */
    int last_status;        /* 0 (none) or 100-599 */
};

/*
 * Opens an escalation for in at now and publishes it at once (its id from pep_request_id).
 * *out is a copy the caller clears.  The caller then queues a `kind: system` record
 * (`escalation.open`) with apply = escalation_apply_insert and an owned apply arg
 * (escalation_dup(out), freed by escalation_free), and calls escalation_forget(out->id)
 * if audit_submit_owned refuses it (it has then freed the dup already).  Returns 0, PEP_EINVAL (a
 * missing string, attempts not an array of objects, last_status out of range), PEP_EUNAVAILABLE
 * (max_open escalations are open: nothing published) or PEP_ENOMEM (nothing published).
 */
int escalation_create(struct escalation_store *s, const struct escalation_request *in,
                      int64_t now_us, struct escalation *out);

/* Removes id from memory (its record was refused).  Unknown id: no-op. */
void escalation_forget(struct escalation_store *s, const char *id);

enum escalation_resolve {
    ESCALATION_RESOLVE_OK,      /* it was open and is now resolved */
    ESCALATION_RESOLVE_ALREADY, /* it was resolved already (answer 409): nothing changed */
};

/*
 * Resolves id: when open, publishes the resolution at once (resolved_by = operator_id,
 * resolved_at = now, note copied; note may be NULL) so that a concurrent resolve sees it.
 * Returns PEP_ENOTFOUND for an unknown id, PEP_EINVAL (operator_id NULL or empty, a note
 * longer than ESCALATION_NOTE_MAX), PEP_ENOMEM (nothing changed), or 0 with *verdict set,
 * *before the escalation as it was and *after as it is now (equal to *before when
 * ALREADY): copies the caller clears.  When OK, the caller queues an admin record with
 * apply = escalation_apply_resolve, apply_arg = after (kept until the record's done
 * callback), and calls escalation_undo_resolve(before) if that record fails.
 */
int escalation_resolve(struct escalation_store *s, const char *id, const char *operator_id,
                       const char *note, int64_t now_us, enum escalation_resolve *verdict,
                       struct escalation *before, struct escalation *after);

/* Reopens before->id (its resolution's record failed): state open, no resolution fields.
 * No-op when the id is gone or already open, or when before is not open (the `before` of
 * an ALREADY verdict: undoing it would reopen someone else's resolution). */
void escalation_undo_resolve(struct escalation_store *s, const struct escalation *before);

/* A copy of id into *out (caller clears).  0, PEP_ENOTFOUND, or PEP_ENOMEM. */
int escalation_get(struct escalation_store *s, const char *id, struct escalation *out);

/* ---- SQLite (audit writer thread, inside the item's savepoint; never BEGIN/COMMIT) ------- */

/* CREATE TABLE IF NOT EXISTS escalations (…) and its index: append it to audit_options'
 * schema_extra. */
extern const char ESCALATIONS_SCHEMA[];

/* INSERTs the escalation arg (a const struct escalation *, open: the copy
 * escalation_create returned, or its escalation_dup).  May run more than once for one
 * item (a fire-and-forget record whose batch failed is retried in a new transaction).
 * 0, PEP_EINVAL (not open), PEP_EDB (SQLite failed, the id exists), PEP_ENOMEM. */
int escalation_apply_insert(sqlite3 *db, void *arg);

/* Writes the resolution of arg (a const struct escalation *, resolved: the `after`
 * escalation_resolve returned) onto its row, which must still be open.  0, PEP_EINVAL (not
 * resolved), PEP_EDB (no such open row, SQLite failed). */
int escalation_apply_resolve(sqlite3 *db, void *arg);

/* ---- JSON views (new references, NULL when memory ran out) ------------------------------ */

/* {"escalations":[{id, state, chain, request_id, agent, action, created_at}]} (SPEC 8),
 * oldest first (newest last), those in state *filter (NULL = all).  Any thread. */
json_t *escalation_list_json(struct escalation_store *s, const enum escalation_state *filter);
/* Everything, for GET /admin/v1/escalations/{id} and pepctl: {id, state, chain, request_id,
 * agent, action, tenant, attempts, upstream_status, created_at, resolved_by, resolved_at,
 * note} (null for what has not happened, and upstream_status null when none). */
json_t *escalation_detail_json(const struct escalation *e);
/* The webhook body (SPEC 4.4): {id, chain, request_id, agent, action, tenant, attempts,
 * upstream_status, created_at} — never a token or a request body. */
json_t *escalation_webhook_json(const struct escalation *e);

#endif
