/*
 * audit_api.h — the admin API's audit reads (SPEC 5, 6.3, 8): the query, the streamed
 * export and the request trace.  admin.c routes to these handlers (role auditor); what
 * they read and how is in audit/query.h.
 *
 *   GET /admin/v1/audit?agent=&tenant=&action=&decision=&code=&kind=&request_id=
 *                       &since=&until=&after_seq=&limit=
 *       → {"records":[…], "next_after_seq": N|null}
 *   GET /admin/v1/audit/export?format=ndjson|csv&<the same filters but limit>
 *       → 200, streamed: NDJSON lines or CSV rows
 *   GET /admin/v1/audit/trace/{request_id}
 *       → {"request_id", "records":[…], "complete": bool}, 404 when no record has it
 *
 * Each request reads on a read-only connection of its own (DESIGN rule 2), never the
 * writer's.  A query page and a trace are bounded in time (AUDIT_API_*_BUDGET_US) and run
 * on the listener thread.  An export is read by a thread of its own ("pep-export", at nice
 * AUDIT_API_EXPORT_NICE, at most AUDIT_API_MAX_EXPORTS at once), a batch at a time, each
 * batch its own short read transactions, into a bounded pipe the connection drains: its
 * memory is one batch and the pipe whatever the size of the log, and a slow client slows
 * the reading instead of growing memory.
 *
 * Threads: the admin listener's threads (handlers and the export's content reader); the
 * export's reading thread.
 */
#ifndef PEP_AUDIT_API_H
#define PEP_AUDIT_API_H

#include "pep/http.h"

/* Time a query page may spend reading before it answers with what it has (and a cursor). */
#define AUDIT_API_QUERY_BUDGET_US 200000
/* Time a trace may spend; past it the answer says "complete": false. */
#define AUDIT_API_TRACE_BUDGET_US 1000000
/* An export's batch: at most this many rows, bytes (then the batch stops after the row
 * that passed it) or this much time, per call of the content reader. */
#define AUDIT_API_EXPORT_BATCH_ROWS 500
#define AUDIT_API_EXPORT_BATCH_BYTES (256 * 1024)
#define AUDIT_API_EXPORT_BATCH_US 20000
/* Bytes handed to the connection's pipe at a time (its ring holds STREAM_PIPE_CAPACITY). */
#define AUDIT_API_EXPORT_PIECE (16 * 1024)
/* Exports reading at once; one more is answered 503. */
#define AUDIT_API_MAX_EXPORTS 4
/* The nice value of an export's reading thread: the request path comes first. */
#define AUDIT_API_EXPORT_NICE 19

/* The handlers, with the signature of admin.c's route table (arg: the path's {x}). */
enum MHD_Result audit_api_query(struct request *r, const char *const *arg);
enum MHD_Result audit_api_export(struct request *r, const char *const *arg);
enum MHD_Result audit_api_trace(struct request *r, const char *const *arg);

#endif
