/*
 * idempotency.c — Idempotency-Key entries in memory and in the `idempotency` table
 * (SPEC 4.5; see idempotency.h for the life of a key).
 *
 * One map, keyed "agent\nkey" (unambiguous: a valid key holds no '\n'), holds in-flight
 * entries (stored == NULL) and recent ones (stored != NULL).  Recent entries are also on a
 * list in completion order, so that sweeping and the byte bound drop the oldest first.
 *
 * A completed answer is a struct idem_stored: immutable, reference counted, shared by the
 * recent entry and the idem_write, so the body is copied once on complete and once per
 * replay — the replay copy is made after `lock` is let go.
 *
 * Invariants (under `lock`): an entry is on the recent list iff stored != NULL;
 * recent/recent_bytes are the list's length and the sum of its entries' stored->bytes;
 * in_flight counts the entries with stored == NULL.
 *
 * Why reserve reads the database too: idem_lookup's answer may be old by the time the
 * request reaches idem_reserve.  Reading the row first and the map second means a key
 * completed by someone else is seen in one of them unless its row took more than
 * IDEM_RECENT_US to commit (the documented limit).
 */
#include "pep/idempotency.h"
#include "audit/audit.h"
#include "pep/fingerprint.h"
#include "pep/strmap.h"
#include "pep/util.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IDEM_READERS 4 /* reader connections: listener threads rarely wait for one */
/* Map keys live on the stack ("agent\nkey"), so that looking up, releasing and completing
 * never fail for want of memory; agent ids are at most 128 bytes (pep_is_id). */
#define IDEM_MAX_AGENT 256
#define IDEM_MAP_KEY_SIZE (IDEM_MAX_AGENT + 1 + IDEM_MAX_KEY + 1)
#define IDEM_REQUEST_ID_LEN 26

const char IDEMPOTENCY_SCHEMA[] =
    "CREATE TABLE IF NOT EXISTS idempotency ("
    " agent TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,"
    " request_id TEXT NOT NULL, status INTEGER NOT NULL, headers TEXT NOT NULL,"
    " body BLOB NOT NULL, created_at_us INTEGER NOT NULL, expires_at_us INTEGER NOT NULL,"
    " PRIMARY KEY (agent, key));"
    "CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires_at_us);";

struct idem_stored {
    int refs;           /* atomic */
    size_t bytes;       /* memory held, counted against IDEM_RECENT_MAX_BYTES */
    char *headers_json; /* [[name, value], …]: the row's headers column */
    struct idem_result r;
};

struct idem_entry {
    char fingerprint[FINGERPRINT_HEX_LEN + 1];
    char request_id[IDEM_REQUEST_ID_LEN + 1]; /* the holder of the reservation */
    struct idem_stored *stored;               /* NULL while in flight */
    int64_t completed_at_us;
    struct idem_entry *prev, *next; /* recent list, oldest first */
    char map_key[];                 /* "agent\nkey", to remove the entry when sweeping */
};

struct idem_write {
    char *agent, *key;
    char fingerprint[FINGERPRINT_HEX_LEN + 1];
    struct idem_stored *stored; /* one reference */
};

struct idem_reader {
    pthread_mutex_t lock; /* guards db and get */
    sqlite3 *db;
    sqlite3_stmt *get;
};

struct idem_store {
    pthread_mutex_t lock;   /* guards entries, the recent list and the counters */
    struct strmap *entries; /* "agent\nkey" → struct idem_entry */
    struct idem_entry *oldest, *newest;
    size_t in_flight, recent, recent_bytes;
    uint64_t replays, mismatches, in_progress; /* atomic: counted outside `lock` too */
    unsigned next_reader;                      /* atomic: where the next reader search starts */
    struct idem_reader readers[IDEM_READERS];
};

bool idem_key_valid(const char *key) {
    size_t n = key ? strlen(key) : 0;
    if (n == 0 || n > IDEM_MAX_KEY || key[0] == ' ' || key[n - 1] == ' ') return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7e) return false;
    return true;
}

void idem_result_clear(struct idem_result *r) {
    if (!r) return;
    for (size_t i = 0; i < r->headers_len; i++) {
        free(r->headers[i].name);
        free(r->headers[i].value);
    }
    free(r->headers);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* Deep copy of src's status, headers and body into dst (zeroed first); the body gets a
 * terminating NUL.  0 or PEP_ENOMEM (dst cleared). */
static int result_copy(struct idem_result *dst, const struct idem_result *src) {
    memset(dst, 0, sizeof *dst);
    dst->status = src->status;
    memcpy(dst->request_id, src->request_id, sizeof dst->request_id);
    dst->created_at_us = src->created_at_us;
    if (!(dst->body = malloc(src->body_len + 1))) goto nomem;
    if (src->body_len) memcpy(dst->body, src->body, src->body_len);
    dst->body[src->body_len] = '\0';
    dst->body_len = src->body_len;
    if (src->headers_len && !(dst->headers = calloc(src->headers_len, sizeof *dst->headers)))
        goto nomem;
    for (; dst->headers_len < src->headers_len; dst->headers_len++) {
        struct forward_header *h = &dst->headers[dst->headers_len];
        h->name = strdup(src->headers[dst->headers_len].name);
        h->value = strdup(src->headers[dst->headers_len].value);
        if (!h->name || !h->value) {
            dst->headers_len++; /* so that clear frees this pair too */
            goto nomem;
        }
    }
    return 0;
nomem:
    idem_result_clear(dst);
    return PEP_ENOMEM;
}

static struct idem_stored *stored_retain(struct idem_stored *st) {
    __atomic_add_fetch(&st->refs, 1, __ATOMIC_RELAXED);
    return st;
}

static void stored_release(struct idem_stored *st) {
    if (!st || __atomic_sub_fetch(&st->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    free(st->headers_json);
    idem_result_clear(&st->r);
    free(st);
}

/* The headers as the row's JSON text, or NULL with *rc (PEP_EINVAL: not UTF-8, which
 * JSON text cannot carry; PEP_ENOMEM). */
static char *headers_to_json(const struct idem_result *r, int *rc) {
    json_t *arr = json_array();
    char *text = NULL;
    *rc = arr ? 0 : PEP_ENOMEM;
    for (size_t i = 0; !*rc && i < r->headers_len; i++) {
        const struct forward_header *h = &r->headers[i];
        if (!pep_utf8_valid(h->name, strlen(h->name)) ||
            !pep_utf8_valid(h->value, strlen(h->value)))
            *rc = PEP_EINVAL;
        else if (json_array_append_new(arr, json_pack("[ss]", h->name, h->value)) != 0)
            *rc = PEP_ENOMEM;
    }
    if (!*rc && !(text = json_dumps(arr, JSON_COMPACT))) *rc = PEP_ENOMEM;
    json_decref(arr);
    return text;
}

/* Parses the row's headers column into r (headers empty).  0, PEP_EDB (not our shape),
 * PEP_ENOMEM. */
static int headers_from_json(const char *text, size_t len, struct idem_result *r) {
    json_t *arr = json_loadb(text, len, 0, NULL);
    int rc = json_is_array(arr) ? 0 : PEP_EDB;
    size_t n = rc ? 0 : json_array_size(arr);
    if (n && !(r->headers = calloc(n, sizeof *r->headers))) rc = PEP_ENOMEM;
    for (size_t i = 0; !rc && i < n; i++) {
        const char *name, *value;
        if (json_unpack(json_array_get(arr, i), "[ss!]", &name, &value) != 0) {
            rc = PEP_EDB;
            break;
        }
        struct forward_header *h = &r->headers[r->headers_len++];
        if (!(h->name = strdup(name)) || !(h->value = strdup(value))) rc = PEP_ENOMEM;
    }
    json_decref(arr);
    return rc;
}

/* "agent\nkey" into mk; false when agent or key cannot be one (too long, invalid). */
static bool map_key(char mk[IDEM_MAP_KEY_SIZE], const char *agent, const char *key) {
    if (!agent || strnlen(agent, IDEM_MAX_AGENT + 1) > IDEM_MAX_AGENT || !idem_key_valid(key))
        return false;
    snprintf(mk, IDEM_MAP_KEY_SIZE, "%s\n%s", agent, key);
    return true;
}

static bool fingerprint_valid(const char *fingerprint) {
    return fingerprint && strlen(fingerprint) == FINGERPRINT_HEX_LEN;
}

/* ---- memory (callers hold s->lock) ------------------------------------------------------ */

static bool entry_expired(const struct idem_entry *e, int64_t now_us) {
    return e->stored && e->stored->r.created_at_us + IDEM_TTL_US <= now_us;
}

/* Removes e from the map (and the recent list) and frees it. */
static void entry_drop(struct idem_store *s, struct idem_entry *e) {
    strmap_remove(s->entries, e->map_key);
    if (e->stored) {
        *(e->prev ? &e->prev->next : &s->oldest) = e->next;
        *(e->next ? &e->next->prev : &s->newest) = e->prev;
        s->recent--;
        s->recent_bytes -= e->stored->bytes;
        stored_release(e->stored);
    } else {
        s->in_flight--;
    }
    free(e);
}

static void recent_trim(struct idem_store *s, int64_t now_us) {
    while (s->oldest && (s->oldest->completed_at_us + IDEM_RECENT_US <= now_us ||
                         (s->recent_bytes > IDEM_RECENT_MAX_BYTES &&
                          s->oldest->completed_at_us + IDEM_RECENT_MIN_US <= now_us)))
        entry_drop(s, s->oldest);
}

/* The verdict of a live entry for fingerprint; on REPLAY *hold gets a reference. */
static enum idem_verdict entry_verdict(const struct idem_entry *e, const char *fingerprint,
                                       struct idem_stored **hold) {
    if (strcmp(e->fingerprint, fingerprint) != 0) return IDEM_MISMATCH;
    if (!e->stored) return IDEM_IN_PROGRESS;
    *hold = stored_retain(e->stored);
    return IDEM_REPLAY;
}

static enum idem_verdict count_verdict(struct idem_store *s, enum idem_verdict v) {
    uint64_t *c = v == IDEM_REPLAY        ? &s->replays
                  : v == IDEM_MISMATCH    ? &s->mismatches
                  : v == IDEM_IN_PROGRESS ? &s->in_progress
                                          : NULL;
    if (c) __atomic_add_fetch(c, 1, __ATOMIC_RELAXED);
    return v;
}

/* ---- database ------------------------------------------------------------------------- */

static struct idem_reader *reader_acquire(struct idem_store *s) {
    unsigned start = __atomic_fetch_add(&s->next_reader, 1, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < IDEM_READERS; i++) {
        struct idem_reader *r = &s->readers[(start + i) % IDEM_READERS];
        if (pthread_mutex_trylock(&r->lock) == 0) return r;
    }
    struct idem_reader *r = &s->readers[start % IDEM_READERS];
    pthread_mutex_lock(&r->lock);
    return r;
}

/* Fills r from the current row of get (columns: request_id, status, headers, body,
 * created_at_us).  0, PEP_EDB, PEP_ENOMEM (r cleared on failure). */
static int row_to_result(sqlite3_stmt *get, struct idem_result *r) {
    const char *rid = (const char *)sqlite3_column_text(get, 1);
    const char *headers = (const char *)sqlite3_column_text(get, 3);
    int rc = 0;
    memset(r, 0, sizeof *r);
    if (!rid || strlen(rid) >= sizeof r->request_id || !headers) return PEP_EDB;
    strcpy(r->request_id, rid);
    r->status = sqlite3_column_int(get, 2);
    r->created_at_us = sqlite3_column_int64(get, 5);
    rc = headers_from_json(headers, (size_t)sqlite3_column_bytes(get, 3), r);
    if (!rc) {
        const void *body = sqlite3_column_blob(get, 4);
        size_t len = (size_t)sqlite3_column_bytes(get, 4);
        if (!(r->body = malloc(len + 1)))
            rc = PEP_ENOMEM;
        else {
            if (len) memcpy(r->body, body, len);
            r->body[len] = '\0';
            r->body_len = len;
        }
    }
    if (rc) idem_result_clear(r);
    return rc;
}

/* The verdict of the live row of (agent, key), if any.  *replay filled on REPLAY when
 * not NULL. */
static enum idem_verdict db_verdict(struct idem_store *s, const char *agent, const char *key,
                                    const char *fingerprint, int64_t now_us,
                                    struct idem_result *replay) {
    struct idem_reader *r = reader_acquire(s);
    enum idem_verdict v = IDEM_ERROR;
    if (sqlite3_bind_text(r->get, 1, agent, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_text(r->get, 2, key, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_int64(r->get, 3, now_us) != SQLITE_OK)
        goto out;
    int step = sqlite3_step(r->get);
    if (step == SQLITE_DONE) {
        v = IDEM_NONE;
    } else if (step == SQLITE_ROW) {
        const char *fp = (const char *)sqlite3_column_text(r->get, 0);
        if (!fp || strcmp(fp, fingerprint) != 0)
            v = IDEM_MISMATCH;
        else if (!replay || row_to_result(r->get, replay) == 0)
            v = IDEM_REPLAY;
    }
out:
    /* Reset at once: it ends the read transaction, which would hold back the writer's
     * WAL checkpoints. */
    sqlite3_reset(r->get);
    sqlite3_clear_bindings(r->get);
    pthread_mutex_unlock(&r->lock);
    return v;
}

/* ---- the store ------------------------------------------------------------------------- */

int idem_open(const char *db_path, struct idem_store **out, struct pep_err *err) {
    struct idem_store *s = calloc(1, sizeof *s);
    int rc = 0;
    *out = NULL;
    if (!s || !(s->entries = strmap_new())) {
        free(s);
        return pep_err_set(err, PEP_ENOMEM, "idempotency: out of memory");
    }
    pthread_mutex_init(&s->lock, NULL);
    for (int i = 0; i < IDEM_READERS; i++)
        pthread_mutex_init(&s->readers[i].lock, NULL);
    for (int i = 0; !rc && i < IDEM_READERS; i++) {
        struct idem_reader *r = &s->readers[i];
        if ((rc = audit_open_reader(db_path, &r->db, err)) != 0) break;
        /* A listener thread waits at most this long on a busy database, then fails closed. */
        if (sqlite3_busy_timeout(r->db, IDEM_BUSY_TIMEOUT_MS) != SQLITE_OK ||
            sqlite3_prepare_v3(r->db,
                               "SELECT fingerprint, request_id, status, headers, body,"
                               " created_at_us FROM idempotency"
                               " WHERE agent = ?1 AND key = ?2 AND expires_at_us > ?3",
                               -1, SQLITE_PREPARE_PERSISTENT, &r->get, NULL) != SQLITE_OK)
            rc = pep_err_set(err, PEP_EDB, "idempotency: %s: %s", db_path, sqlite3_errmsg(r->db));
    }
    if (rc) {
        idem_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

static void entry_free_cb(void *value) {
    struct idem_entry *e = value;
    stored_release(e->stored);
    free(e);
}

void idem_close(struct idem_store *s) {
    if (!s) return;
    for (int i = 0; i < IDEM_READERS; i++) {
        sqlite3_finalize(s->readers[i].get);
        sqlite3_close(s->readers[i].db);
        pthread_mutex_destroy(&s->readers[i].lock);
    }
    strmap_free(s->entries, entry_free_cb);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* Copies a held answer out (after `lock` is let go) and drops the reference. */
static enum idem_verdict replay_out(struct idem_stored *hold, struct idem_result *replay) {
    int rc = replay ? result_copy(replay, &hold->r) : 0;
    stored_release(hold);
    return rc ? IDEM_ERROR : IDEM_REPLAY;
}

enum idem_verdict idem_lookup(struct idem_store *s, const char *agent, const char *key,
                              const char *fingerprint, int64_t now_us, struct idem_result *replay) {
    char mk[IDEM_MAP_KEY_SIZE];
    struct idem_stored *hold = NULL;
    enum idem_verdict v = IDEM_NONE;
    if (replay) memset(replay, 0, sizeof *replay);
    if (!map_key(mk, agent, key) || !fingerprint_valid(fingerprint)) return IDEM_ERROR;
    pthread_mutex_lock(&s->lock);
    struct idem_entry *e = strmap_get(s->entries, mk);
    if (e && !entry_expired(e, now_us)) v = entry_verdict(e, fingerprint, &hold);
    pthread_mutex_unlock(&s->lock);
    if (hold) return count_verdict(s, replay_out(hold, replay));
    if (v == IDEM_NONE) v = db_verdict(s, agent, key, fingerprint, now_us, replay);
    return count_verdict(s, v);
}

enum idem_verdict idem_reserve(struct idem_store *s, const char *agent, const char *key,
                               const char *fingerprint, const char *request_id, int64_t now_us,
                               struct idem_result *replay) {
    char mk[IDEM_MAP_KEY_SIZE];
    struct idem_stored *hold = NULL;
    if (replay) memset(replay, 0, sizeof *replay);
    if (!map_key(mk, agent, key) || !fingerprint_valid(fingerprint) || !request_id ||
        strlen(request_id) > IDEM_REQUEST_ID_LEN)
        return IDEM_ERROR;
    /* The row first, the map second (see the top of the file). */
    enum idem_verdict v = db_verdict(s, agent, key, fingerprint, now_us, replay);
    if (v != IDEM_NONE) return count_verdict(s, v);
    size_t mk_len = strlen(mk) + 1;
    struct idem_entry *fresh = calloc(1, sizeof *fresh + mk_len);
    if (!fresh) return IDEM_ERROR;
    memcpy(fresh->map_key, mk, mk_len);
    strcpy(fresh->fingerprint, fingerprint);
    strcpy(fresh->request_id, request_id);
    pthread_mutex_lock(&s->lock);
    struct idem_entry *e = strmap_get(s->entries, mk);
    if (e && entry_expired(e, now_us)) {
        entry_drop(s, e); /* a recent entry outlived its TTL (the clock jumped): absent */
        e = NULL;
    }
    if (e) {
        v = entry_verdict(e, fingerprint, &hold);
    } else if (strmap_put(s->entries, mk, fresh, NULL) == 0) {
        s->in_flight++;
        fresh = NULL;
    } else {
        v = IDEM_ERROR;
    }
    pthread_mutex_unlock(&s->lock);
    free(fresh);
    return count_verdict(s, hold ? replay_out(hold, replay) : v);
}

void idem_release(struct idem_store *s, const char *agent, const char *key,
                  const char *request_id) {
    char mk[IDEM_MAP_KEY_SIZE];
    if (!map_key(mk, agent, key) || !request_id) return;
    pthread_mutex_lock(&s->lock);
    struct idem_entry *e = strmap_get(s->entries, mk);
    if (e && !e->stored && strcmp(e->request_id, request_id) == 0) entry_drop(s, e);
    pthread_mutex_unlock(&s->lock);
}

/* A new stored answer (one reference) copied from result, or NULL with *rc. */
static struct idem_stored *stored_new(const struct idem_result *result, const char *request_id,
                                      int64_t now_us, int *rc) {
    if (result->body_len > IDEM_MAX_BODY) {
        *rc = PEP_EINVAL;
        return NULL;
    }
    char *json = headers_to_json(result, rc);
    if (!json) return NULL;
    struct idem_stored *st = calloc(1, sizeof *st);
    if (!st || (*rc = result_copy(&st->r, result)) != 0) {
        *rc = PEP_ENOMEM;
        free(st);
        free(json);
        return NULL;
    }
    st->refs = 1;
    st->headers_json = json;
    snprintf(st->r.request_id, sizeof st->r.request_id, "%s", request_id);
    st->r.created_at_us = now_us;
    st->bytes =
        sizeof *st + strlen(json) + st->r.body_len + 1 + st->r.headers_len * sizeof *st->r.headers;
    for (size_t i = 0; i < st->r.headers_len; i++)
        st->bytes += strlen(st->r.headers[i].name) + strlen(st->r.headers[i].value) + 2;
    return st;
}

int idem_complete(struct idem_store *s, const char *agent, const char *key, const char *request_id,
                  const struct idem_result *result, int64_t now_us, struct idem_write **write) {
    char mk[IDEM_MAP_KEY_SIZE];
    int rc = 0;
    *write = NULL;
    if (!map_key(mk, agent, key) || !request_id) return PEP_ENOTFOUND;
    struct idem_stored *st = stored_new(result, request_id, now_us, &rc);
    struct idem_write *w = rc ? NULL : calloc(1, sizeof *w);
    if (!rc && (!w || !(w->agent = strdup(agent)) || !(w->key = strdup(key)))) rc = PEP_ENOMEM;
    pthread_mutex_lock(&s->lock);
    struct idem_entry *e = strmap_get(s->entries, mk);
    if (!e || e->stored || strcmp(e->request_id, request_id) != 0) {
        rc = PEP_ENOTFOUND;
    } else if (rc) {
        entry_drop(s, e); /* not stored: the key is free for the client's next try */
    } else {
        memcpy(w->fingerprint, e->fingerprint, sizeof w->fingerprint);
        w->stored = stored_retain(st);
        e->stored = st;
        st = NULL;
        e->completed_at_us = now_us;
        e->prev = s->newest;
        *(s->newest ? &s->newest->next : &s->oldest) = e;
        s->newest = e;
        s->in_flight--;
        s->recent++;
        s->recent_bytes += e->stored->bytes;
        recent_trim(s, now_us);
    }
    pthread_mutex_unlock(&s->lock);
    stored_release(st);
    if (rc)
        idem_write_free(w);
    else
        *write = w;
    return rc;
}

void idem_write_free(struct idem_write *w) {
    if (!w) return;
    free(w->agent);
    free(w->key);
    stored_release(w->stored);
    free(w);
}

/* Statements on the writer's connection are prepared per call: apply gets the connection
 * as an argument, and a prepare costs microseconds next to the batch's fsync. */
static int prepare(sqlite3 *db, const char *sql, sqlite3_stmt **out) {
    return sqlite3_prepare_v2(db, sql, -1, out, NULL);
}

int idem_apply_store(sqlite3 *db, void *arg) {
    const struct idem_write *w = arg;
    const struct idem_result *r = &w->stored->r;
    sqlite3_stmt *del = NULL, *ins = NULL;
    int rc = PEP_EDB;
    /* Bound parameters only: keys and header values are the agent's and upstream's bytes. */
    if (prepare(db, "DELETE FROM idempotency WHERE agent = ?1 AND key = ?2 AND expires_at_us <= ?3",
                &del) != SQLITE_OK ||
        sqlite3_bind_text(del, 1, w->agent, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_text(del, 2, w->key, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_int64(del, 3, r->created_at_us) != SQLITE_OK ||
        sqlite3_step(del) != SQLITE_DONE)
        goto out;
    /* Never INSERT OR REPLACE (PITFALLS): a second answer for a live key is a bug to
     * report, not a row to overwrite. */
    if (prepare(db,
                "INSERT INTO idempotency(agent, key, fingerprint, request_id, status, headers,"
                " body, created_at_us, expires_at_us) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                &ins) != SQLITE_OK ||
        sqlite3_bind_text(ins, 1, w->agent, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_text(ins, 2, w->key, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_text(ins, 3, w->fingerprint, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_text(ins, 4, r->request_id, -1, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_int(ins, 5, r->status) != SQLITE_OK ||
        sqlite3_bind_text(ins, 6, w->stored->headers_json, -1, SQLITE_STATIC) != SQLITE_OK ||
        /* r->body is never NULL here: a NULL pointer would bind SQL NULL, not an empty blob */
        sqlite3_bind_blob(ins, 7, r->body, (int)r->body_len, SQLITE_STATIC) != SQLITE_OK ||
        sqlite3_bind_int64(ins, 8, r->created_at_us) != SQLITE_OK ||
        sqlite3_bind_int64(ins, 9, r->created_at_us + IDEM_TTL_US) != SQLITE_OK)
        goto out;
    int step = sqlite3_step(ins);
    if (step == SQLITE_DONE)
        rc = 0;
    else if (sqlite3_extended_errcode(db) == SQLITE_CONSTRAINT_PRIMARYKEY)
        rc = PEP_EEXISTS;
out:
    sqlite3_finalize(del);
    sqlite3_finalize(ins);
    return rc;
}

void idem_sweep(struct idem_store *s, int64_t now_us) {
    pthread_mutex_lock(&s->lock);
    recent_trim(s, now_us);
    pthread_mutex_unlock(&s->lock);
}

int idem_apply_expire(sqlite3 *db, void *now_us) {
    sqlite3_stmt *st = NULL;
    int rc = PEP_EDB;
    /* Bounded so that one system record's transaction stays short; the index on
     * expires_at_us makes the inner SELECT a range scan. */
    if (prepare(db,
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency"
                " WHERE expires_at_us <= ?1 LIMIT ?2)",
                &st) == SQLITE_OK &&
        sqlite3_bind_int64(st, 1, *(const int64_t *)now_us) == SQLITE_OK &&
        sqlite3_bind_int(st, 2, IDEM_EXPIRE_BATCH) == SQLITE_OK && sqlite3_step(st) == SQLITE_DONE)
        rc = 0;
    sqlite3_finalize(st);
    return rc;
}

void idem_get_stats(struct idem_store *s, struct idem_stats *out) {
    pthread_mutex_lock(&s->lock);
    *out = (struct idem_stats){s->in_flight, s->recent, s->recent_bytes, 0, 0, 0};
    pthread_mutex_unlock(&s->lock);
    out->replays = __atomic_load_n(&s->replays, __ATOMIC_RELAXED);
    out->mismatches = __atomic_load_n(&s->mismatches, __ATOMIC_RELAXED);
    out->in_progress = __atomic_load_n(&s->in_progress, __ATOMIC_RELAXED);
}
