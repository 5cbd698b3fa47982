/*
 * test_operations.c — an operator's ordinary mistakes (SPEC 1): two instances on one data
 * directory, a store removed, emptied, swapped or restored from a backup, a keys directory
 * lost, loose file modes, a shutdown on a failing store.  Each on a scratch data directory,
 * the way an operator would do it: with cp, rm and chmod on the real files.
 */
#include "tests/integration/fixture.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

static const char *POLICY =
    "version: 1\n"
    "audit: { durability: normal }\n"
    "agents:\n"
    "  - { id: bot, owner: o@example.test, tenants: [acme], scopes: [tool.read] }\n"
    "routes:\n"
    "  - match: { method: GET, path: /v1/check }\n"
    "    action: tool.read\n"
    "actions:\n"
    "  tool.read: { scope: tool.read }\n";

static long check(struct fx *f, const char *token) {
    char url[256], auth[2100];
    snprintf(url, sizeof url, "%s/v1/check", f->pep.url);
    struct h_resp r = {0};
    h_http(&r, "GET", url, NULL, fx_bearer(auth, sizeof auth, token), NULL);
    long status = r.status;
    h_resp_free(&r);
    return status;
}

static int sh(const char *fmt, ...) {
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return system(cmd);
}

/* Starting pep on f's data dir must fail with exit 1 and say `why` on stderr. */
static void assert_refused(struct fx *f, const char *why) {
    struct h_proc p = {0};
    assert_int_equal(h_start_pep(&p, f->policy, f->data, NULL), -1);
    char *err = h_read_file(p.err_path);
    assert_non_null(err);
    if (!strstr(err, why)) fail_msg("expected '%s' in: %s", why, err);
    free(err);
}

static mode_t mode_of(const char *path) {
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return st.st_mode & 07777;
}

/* A second instance is refused before it writes anything; the first keeps serving and
 * auditing. */
static void test_one_pep_per_data_dir(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char *token = fx_issue(&f, "bot", NULL, NULL);
    long before = fx_count_records(&f);
    struct h_proc second = {0};
    assert_int_equal(h_start_pep(&second, f.policy, f.data, NULL), -1);
    char *err = h_read_file(second.err_path);
    assert_non_null(strstr(err, "in use by another pep"));
    free(err);
    assert_int_equal(fx_count_records(&f), before); /* it wrote nothing */
    assert_int_equal(check(&f, token), 200);
    assert_int_equal(fx_count_records(&f), before + 1); /* the first one audits its decision */
    free(token);
    fx_stop(&f);
}

static void test_no_silent_fresh_start(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    assert_int_equal(h_stop(&f.pep, SIGTERM), 0);
    assert_int_equal(sh("cp -a %s/pep.db %s/keep.db", f.data, f.dir), 0);
    /* emptied */
    assert_int_equal(
        sh("rm -f %s/pep.db-wal %s/pep.db-shm && : > %s/pep.db", f.data, f.data, f.data), 0);
    assert_refused(&f, "pep.db is empty");
    /* removed */
    assert_int_equal(sh("rm -f %s/pep.db", f.data), 0);
    assert_refused(&f, "pep.db is missing");
    /* something else in its place: not a database, then another SQLite database */
    char foreign[600];
    snprintf(foreign, sizeof foreign, "%s/pep.db", f.data);
    assert_int_equal(h_write_file(foreign, "not a database at all, but not empty either\n"), 0);
    assert_refused(&f, "is not pep's audit store");
    assert_int_equal(sh("rm -f %s", foreign), 0);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(foreign, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
                                  "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);"
                                  "INSERT INTO users (name) VALUES ('alice');",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    assert_refused(&f, "is not pep's audit store");
    assert_int_equal(sh("rm -f %s", foreign), 0);
    /* the store back, its keys gone */
    assert_int_equal(
        sh("cp -a %s/keep.db %s/pep.db && mv %s/keys %s/keys.away", f.dir, f.data, f.data, f.dir),
        0);
    assert_refused(&f, "holds no key");
    assert_int_equal(sh("mv %s/keys.away %s/keys", f.dir, f.data), 0);
    /* all back, but an append-only trigger dropped: reported as tampering, not silently
     * recreated */
    assert_int_equal(sqlite3_open(foreign, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "DROP TRIGGER audit_no_delete", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    char *err = h_read_file(f.pep.err_path);
    assert_non_null(strstr(err, "append-only triggers were missing (audit_no_delete)"));
    free(err);
    long tampered = 0;
    for (int i = 0; i < 50 && tampered == 0; i++) {
        tampered =
            fx_count_records_where(&f, "json_extract(record, '$.action') = 'audit.tampered'");
        if (tampered == 0) usleep(100000);
    }
    assert_int_equal(tampered, 1);
    struct h_resp r = {0};
    assert_int_equal(fx_admin(&f, &r, "GET", "/admin/v1/audit/verify", NULL), 0);
    assert_non_null(strstr(r.body, "\"ok\":true"));
    h_resp_free(&r);
    fx_stop(&f);
}

/* A store restored from a backup older than a token: the token is unknown to it, so it is
 * refused (it could never be listed or revoked). */
static void test_restored_backup_refuses_later_tokens(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char *old = fx_issue(&f, "bot", NULL, NULL);
    assert_int_equal(h_stop(&f.pep, SIGTERM), 0);
    assert_int_equal(sh("cp -a %s/pep.db %s/backup.db", f.data, f.dir), 0);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    char *later = fx_issue(&f, "bot", NULL, NULL);
    assert_int_equal(check(&f, later), 200);
    assert_int_equal(h_stop(&f.pep, SIGTERM), 0);
    assert_int_equal(sh("rm -f %s/pep.db-wal %s/pep.db-shm && cp -a %s/backup.db %s/pep.db", f.data,
                        f.data, f.dir, f.data),
                     0);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    assert_int_equal(check(&f, later), 401);
    assert_int_equal(check(&f, old), 200);
    free(old);
    free(later);
    fx_stop(&f);
}

/* Deleting admin.token to get a new one revokes the old one; operator tokens are listed. */
static void test_reminted_admin_token_revokes_the_old(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char old[2048];
    snprintf(old, sizeof old, "%s", f.admin_token);
    assert_int_equal(h_stop(&f.pep, SIGTERM), 0);
    assert_int_equal(sh("rm %s/admin.token", f.data), 0);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    char token_path[400];
    snprintf(token_path, sizeof token_path, "%s/admin.token", f.data);
    char *fresh = h_read_file(token_path);
    assert_non_null(fresh);
    fresh[strcspn(fresh, "\n")] = '\0';
    assert_string_not_equal(fresh, old);
    char url[512], auth[2100];
    snprintf(url, sizeof url, "%s/admin/v1/tokens", f.pep.admin_url);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "GET", url, NULL, fx_bearer(auth, sizeof auth, old), NULL), 0);
    assert_int_equal(r.status, 401);
    assert_int_equal(h_http(&r, "GET", url, NULL, fx_bearer(auth, sizeof auth, fresh), NULL), 0);
    assert_int_equal(r.status, 200);
    json_t *j = h_json(&r);
    size_t i, operators = 0, revoked = 0;
    json_t *t;
    json_array_foreach(json_object_get(j, "tokens"), i, t) {
        if (strcmp(json_string_value(json_object_get(t, "kind")), "operator") != 0) continue;
        operators++;
        revoked += !json_is_null(json_object_get(t, "revoked_at"));
    }
    assert_int_equal(operators, 2);
    assert_int_equal(revoked, 1);
    json_decref(j);
    h_resp_free(&r);
    free(fresh);
    fx_stop(&f);
}

static void test_file_modes(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    char *token = fx_issue(&f, "bot", NULL, NULL);
    assert_int_equal(check(&f, token), 200);
    static const char *const files[] = {"pep.db", "pep.db-wal", "pep.db-shm", "admin.token",
                                        "pep.lock"};
    char path[600];
    assert_int_equal(mode_of(f.data), 0700);
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(path, sizeof path, "%s/%s", f.data, files[i]);
        if (mode_of(path) != 0600) fail_msg("%s is %04o", files[i], mode_of(path));
    }
    assert_int_equal(h_stop(&f.pep, SIGTERM), 0);
    /* an existing directory and store opened up: warned about, the files closed again */
    assert_int_equal(
        sh("chmod 755 %s && chmod 644 %s/pep.db %s/admin.token", f.data, f.data, f.data), 0);
    assert_int_equal(fx_restart_pep(&f, NULL), 0);
    char *err = h_read_file(f.pep.err_path);
    assert_non_null(strstr(err, "is open to other users (mode 0755)"));
    assert_non_null(strstr(err, "pep.db was open to other users (mode 0644): made 0600"));
    free(err);
    snprintf(path, sizeof path, "%s/pep.db", f.data);
    assert_int_equal(mode_of(path), 0600);
    assert_int_equal(check(&f, token), 200);
    snprintf(path, sizeof path, "%s/pep.db-wal", f.data);
    assert_int_equal(mode_of(path), 0600);
    free(token);
    fx_stop(&f);
}

/* SIGTERM while the store cannot write: the stop record and the final checkpoint are lost,
 * and the exit status says so. */
static void test_exit_status_on_a_failing_store(void **state) {
    (void)state;
    struct fx f = {0};
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    struct rlimit rl;
    assert_int_equal(prlimit(f.pep.pid, RLIMIT_FSIZE, NULL, &rl), 0);
    rl.rlim_cur = 1;
    assert_int_equal(prlimit(f.pep.pid, RLIMIT_FSIZE, &rl, NULL), 0);
    int status = h_stop(&f.pep, SIGTERM);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    fx_stop(&f);
    /* and a clean stop exits 0 */
    memset(&f, 0, sizeof f);
    assert_int_equal(fx_start(&f, POLICY, NULL, NULL), 0);
    status = h_stop(&f.pep, SIGTERM);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    fx_stop(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_pep_per_data_dir),
        cmocka_unit_test(test_no_silent_fresh_start),
        cmocka_unit_test(test_restored_backup_refuses_later_tokens),
        cmocka_unit_test(test_reminted_admin_token_revokes_the_old),
        cmocka_unit_test(test_file_modes),
        cmocka_unit_test(test_exit_status_on_a_failing_store),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
