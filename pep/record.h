/*
 * record.h — audit records: their common fields, client bytes as JSON text, and writing one
 * synchronously (startup and shutdown).
 *
 * Threads: any.
 */
#ifndef PEP_RECORD_H
#define PEP_RECORD_H

#include "pep/server.h"

/* A JSON string of len bytes that may not be UTF-8 (a path, an id or a tenant as a client
 * sent it, or a message quoting one).  When they are not valid UTF-8, bytes of 0x80 and
 * above are written %XX, so that an answer or a record never loses the field (jansson
 * refuses invalid UTF-8).  NULL only when out of memory. */
json_t *json_text(const char *s, size_t len);
/* Like json_text, but reversible, for record fields whose bytes a client chose (paths,
 * tenants): '%' is written %25 whenever anything is escaped, so two different byte strings
 * never give the same JSON string.  Valid UTF-8 without '%' is kept as is.  NULL only
 * when out of memory (or s is NULL). */
json_t *json_exact_text(const char *s, size_t len);

/* Writes an audit item and waits for it (startup and shutdown only: blocks). */
int server_audit_sync(struct server *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                      int64_t *seq);

/* A fresh audit record {ts, kind, request_id} (new reference); a record not caused by a
 * request (start, stop, SIGHUP…) gets a request id of its own, so that every record can
 * be named by one (SPEC 6.2). */
json_t *server_record(const char *kind, const char *request_id);

#endif
