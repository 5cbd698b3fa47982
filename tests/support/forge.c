#include "tests/support/forge.h"

#include "audit/audit.h"
#include "pep/util.h"

#include <jansson.h>
#include <setjmp.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

void forge_rehashed(const char *path, int64_t seq) {
    sqlite3 *db = NULL;
    sqlite3_stmt *get = NULL, *put = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
                                  "DROP TRIGGER audit_no_update;"
                                  "DROP TRIGGER checkpoints_no_update;",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "SELECT seq, record, prev_hash FROM audit WHERE seq >= ?1"
                                        " ORDER BY seq",
                                        -1, &get, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "UPDATE audit SET record = ?1, prev_hash = ?2, hash = ?3"
                                        " WHERE seq = ?4",
                                        -1, &put, NULL),
                     SQLITE_OK);
    /* Read the rows to re-hash first: no update while the select is stepping. */
    struct {
        int64_t seq;
        char *text;
    } rows[256];
    size_t nrows = 0;
    uint8_t prev[32], h[32];
    sqlite3_bind_int64(get, 1, seq);
    while (sqlite3_step(get) == SQLITE_ROW) {
        assert_true(nrows < PEP_ARRAY_LEN(rows));
        if (nrows == 0) memcpy(prev, sqlite3_column_blob(get, 2), 32);
        rows[nrows].seq = sqlite3_column_int64(get, 0);
        rows[nrows].text = strdup((const char *)sqlite3_column_text(get, 1));
        assert_non_null(rows[nrows].text);
        nrows++;
    }
    sqlite3_finalize(get);
    assert_true(nrows > 0);
    json_t *rec = json_loads(rows[0].text, 0, NULL);
    assert_non_null(rec);
    json_object_set_new(rec, "forged", json_true());
    free(rows[0].text);
    rows[0].text = audit_canonical_json(rec);
    assert_non_null(rows[0].text);
    json_decref(rec);
    for (size_t i = 0; i < nrows; i++) {
        assert_int_equal(audit_chain_hash(prev, rows[i].text, strlen(rows[i].text), h), 0);
        sqlite3_bind_text(put, 1, rows[i].text, -1, SQLITE_STATIC);
        sqlite3_bind_blob(put, 2, prev, 32, SQLITE_STATIC);
        sqlite3_bind_blob(put, 3, h, 32, SQLITE_STATIC);
        sqlite3_bind_int64(put, 4, rows[i].seq);
        assert_int_equal(sqlite3_step(put), SQLITE_DONE);
        sqlite3_reset(put);
        memcpy(prev, h, 32);
        free(rows[i].text);
    }
    sqlite3_finalize(put);
    assert_int_equal(sqlite3_exec(db,
                                  "UPDATE checkpoints SET hash ="
                                  " (SELECT hash FROM audit a WHERE a.seq = checkpoints.seq)",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
}
