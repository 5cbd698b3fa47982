/*
 * fixture.c — see fixture.h.
 */
#include "tests/integration/fixture.h"

#include <sqlite3.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *fx_replace_all(const char *text, const char *from, const char *to) {
    size_t n = 0, fl = strlen(from), tl = strlen(to);
    for (const char *p = strstr(text, from); p; p = strstr(p + fl, from))
        n++;
    char *out = malloc(strlen(text) + n * tl + 1), *w = out;
    if (!out) return NULL;
    for (const char *p = text;;) {
        const char *hit = strstr(p, from);
        if (!hit) {
            strcpy(w, p);
            break;
        }
        memcpy(w, p, (size_t)(hit - p));
        w += hit - p;
        memcpy(w, to, tl);
        w += tl;
        p = hit + fl;
    }
    return out;
}

static int read_admin_token(struct fx *f) {
    char path[400];
    snprintf(path, sizeof path, "%s/admin.token", f->data);
    char *t = h_read_file(path);
    if (!t) return -1;
    t[strcspn(t, "\r\n")] = '\0';
    snprintf(f->admin_token, sizeof f->admin_token, "%s", t);
    free(t);
    return 0;
}

int fx_start(struct fx *f, const char *policy_text, char *const env[],
             const struct h_spawn_opts *opts) {
    memset(f, 0, sizeof *f);
    if (h_tmpdir(f->dir) != 0 || h_start_mockllm(&f->mock) != 0) return -1;
    snprintf(f->policy, sizeof f->policy, "%s/policy.yaml", f->dir);
    snprintf(f->data, sizeof f->data, "%s/data", f->dir);
    snprintf(f->db, sizeof f->db, "%s/pep.db", f->data);
    char *text = fx_replace_all(policy_text, "@MOCK@", f->mock.url);
    int rc = text ? h_write_file(f->policy, text) : -1;
    free(text);
    if (rc == 0) rc = h_start_pep_opts(&f->pep, f->policy, f->data, env, opts);
    if (rc == 0) rc = read_admin_token(f);
    return rc;
}

int fx_restart_pep(struct fx *f, char *const env[]) {
    return h_start_pep(&f->pep, f->policy, f->data, env);
}

void fx_stop(struct fx *f) {
    if (f->pep.pid > 0) h_stop(&f->pep, SIGTERM);
    if (f->mock.pid > 0) h_stop(&f->mock, SIGTERM);
    if (f->dir[0]) h_rmrf(f->dir);
}

const char *fx_bearer(char *buf, size_t cap, const char *token) {
    snprintf(buf, cap, "Authorization: Bearer %s", token);
    return buf;
}

int fx_admin(struct fx *f, struct h_resp *r, const char *method, const char *path,
             const char *body) {
    char url[512], auth[2100];
    snprintf(url, sizeof url, "%s%s", f->pep.admin_url, path);
    fx_bearer(auth, sizeof auth, f->admin_token);
    return h_http(r, method, url, body, auth, NULL);
}

char *fx_issue(struct fx *f, const char *agent, const char *body, char jti_out[64]) {
    char path[256];
    snprintf(path, sizeof path, "/admin/v1/agents/%s/tokens", agent);
    struct h_resp r = {0};
    char *token = NULL;
    if (fx_admin(f, &r, "POST", path, body ? body : "{}") == 0 && r.status == 201) {
        json_t *j = h_json(&r);
        const char *t = json_string_value(json_object_get(j, "token"));
        if (t) token = strdup(t);
        if (jti_out) snprintf(jti_out, 64, "%s", json_string_value(json_object_get(j, "jti")));
        json_decref(j);
    } else {
        fprintf(stderr, "fx_issue: HTTP %ld %s\n", r.status, r.body ? r.body : "");
    }
    h_resp_free(&r);
    return token;
}

static sqlite3 *open_ro(struct fx *f) {
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(f->db, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        sqlite3_close(db);
        return NULL;
    }
    sqlite3_busy_timeout(db, 5000);
    return db;
}

json_t *fx_record(struct fx *f, const char *request_id, const char *kind) {
    sqlite3 *db = open_ro(f);
    sqlite3_stmt *st = NULL;
    json_t *rec = NULL;
    if (db && sqlite3_prepare_v2(db,
                                 "SELECT record FROM audit WHERE json_extract(record,"
                                 " '$.request_id') = ?1 AND json_extract(record, '$.kind') = ?2"
                                 " ORDER BY seq LIMIT 1",
                                 -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, request_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, kind, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            rec = json_loads((const char *)sqlite3_column_text(st, 0), 0, NULL);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return rec;
}

long fx_count_records_where(struct fx *f, const char *where) {
    sqlite3 *db = open_ro(f);
    sqlite3_stmt *st = NULL;
    long n = -1;
    char *sql = sqlite3_mprintf("SELECT count(*) FROM audit%s%s", where ? " WHERE " : "",
                                where ? where : "");
    if (db && sql && sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        n = (long)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_free(sql);
    sqlite3_close(db);
    return n;
}

long fx_count_records(struct fx *f) {
    return fx_count_records_where(f, NULL);
}
