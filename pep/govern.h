/*
 * govern.h — the stages between an identified request and its decision record: SPEC 3.2
 * steps 5 (controls: deny, step-up, approval) and 6 (rate limits), and 4.5 (idempotency).
 * The pipeline (pipeline.c) calls them in this order:
 *
 *   govern_decide      after decide() (steps 1-4): the body parsed when a condition reads
 *                      it, the Idempotency-Key looked up, the controls walked, the rate
 *                      limits taken, the key reserved.  Refusals land in r->decision.
 *   govern_record      adds to the decision record what these steps did (approval_id,
 *                      replay) and names the state change that commits with it.
 *   govern_settled     once that record is written (or not): a used approval is marked,
 *                      a new one announced to its `notify` webhook; a request not recorded
 *                      gives back what it held (approval, quota, key).
 *   govern_result      for the outcome record: the relayed answer of an idempotent
 *                      request, stored with it (or the key released).
 *   govern_reply       the answer's extra members and headers (RateLimit-*, Retry-After,
 *                      WWW-Authenticate for step-up, approval_id/approval_url).
 *
 * Nothing is consumed for a request refused at any step (SPEC 3.2): quota is taken only
 * once every control passed, and given back — with the approval's hold and the key's
 * reservation — when a later step or the record refuses it.
 *
 * Threads: the listener thread, except govern_settled (audit writer) and govern_result
 * (forwarder): the request is suspended then and touched by that thread alone.
 */
#ifndef PEP_GOVERN_H
#define PEP_GOVERN_H

#include "audit/audit.h"
#include "pep/http.h"

/* Runs steps 5-6 and the Idempotency-Key checks for r, whose decide() verdict is in
 * r->decision and whose agent is known.  A refused r only gets its rate-limit headers. */
void govern_decide(struct request *r);

/* True when r is answered from a stored idempotent result (not forwarded). */
bool govern_is_replay(const struct request *r);

/* Adds what steps 5-6 did to the decision record; returns the apply callback that commits
 * its state change with the record (and *arg), or NULL. */
audit_apply_fn govern_record(struct request *r, json_t *rec, void **arg);

/* The decision record was written (recorded) or not; the request proceeds (its record was
 * written, or on_failure: allow let it through) or is refused. */
void govern_settled(struct request *r, bool recorded, bool proceeds);

/* The forwarded call ended with job's answer (served by upstream with model, after
 * attempts); relayed says whether that answer, buffered whole, is what the agent gets.
 * Returns the idempotent result to store with the outcome record (apply idem_apply_store,
 * free idem_write_free) or NULL (nothing to store: the key is released). */
struct idem_write *govern_result(struct request *r, const struct forward_job *job,
                                 const char *upstream, const char *model, int attempts,
                                 bool relayed);

/* The SPEC 3.3 extra members of r's error answer (new reference, or NULL). */
json_t *govern_error_extra(const struct request *r);
/* Adds the headers of steps 5-6 to r->reply. */
void govern_reply(struct request *r);
/* Builds the answer of a replayed request in r->reply. */
void govern_reply_replay(struct request *r);

/* GET /v1/approvals/{id}: true when r is that endpoint (its id in *id, within r->target). */
bool govern_is_approval_poll(const struct request *r, const char **id, size_t *id_len);
/* Answers it for r's identified agent (200 or 404). */
void govern_answer_approval_poll(struct request *r, const char *id, size_t id_len);

void govern_free(struct governed *g);

#endif
