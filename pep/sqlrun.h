/*
 * sqlrun.h — one SQL statement with bound parameters, run to completion: what the audit
 * writer's apply callbacks (approvals, escalations) do to write their rows.  Values are
 * only ever bound, never put into the SQL text.
 *
 * Threads: the caller's connection, on the caller's thread.
 */
#ifndef PEP_SQLRUN_H
#define PEP_SQLRUN_H

#include "pep/common.h"

#include <sqlite3.h>

/* One bound parameter: text (NULL binds NULL), an integer, or a time in µs where 0 means
 * "not yet" and binds NULL. */
struct sql_arg {
    char type; /* 's', 'i', 't' */
    const char *s;
    int64_t i;
};
#define SQL_S(v)                                                                                   \
    { 's', (v), 0 }
#define SQL_I(v)                                                                                   \
    { 'i', NULL, (v) }
#define SQL_T(v)                                                                                   \
    { 't', NULL, (v) }

/* Runs sql with args bound as ?1…?n (text bound SQLITE_STATIC: it must outlive the call).
 * With one_row, exactly one row must change: an UPDATE whose WHERE no longer holds is a
 * refusal, not a success.  Returns 0 or PEP_EDB. */
int sql_run(sqlite3 *db, const char *sql, const struct sql_arg *args, int n, bool one_row);

#endif
