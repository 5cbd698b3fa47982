/*
 * sqlrun.c — see sqlrun.h.
 */
#include "pep/sqlrun.h"

int sql_run(sqlite3 *db, const char *sql, const struct sql_arg *args, int n, bool one_row) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    for (int i = 0; rc == SQLITE_OK && i < n; i++) {
        const struct sql_arg *a = &args[i];
        if (a->type == 's')
            rc = sqlite3_bind_text(st, i + 1, a->s, -1, SQLITE_STATIC); /* NULL → NULL */
        else if (a->type == 't' && a->i == 0)
            rc = sqlite3_bind_null(st, i + 1);
        else
            rc = sqlite3_bind_int64(st, i + 1, a->i);
    }
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return PEP_EDB;
    return !one_row || sqlite3_changes(db) == 1 ? 0 : PEP_EDB;
}
