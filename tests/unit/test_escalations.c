/*
 * test_escalations.c — the human escalation queue (pep/escalations.c): the store, its
 * bounds, its SQLite rows and its JSON views, with time as a parameter.
 *
 * What must hold: create publishes an open escalation with a fresh id and refuses bad
 * input; lists filter by state and run oldest first; resolve publishes once (a second is
 * a verdict, not a change), undo reopens, forget removes; the bounds refuse the open one
 * too many and drop the oldest resolution; what the apply functions write — directly and
 * through the real audit writer, with the store owning the insert's argument — a new
 * store loads back identically, and the database refuses what the protocol forbids;
 * retention applies alike to load and prune; JSON shapes are exact; 8 threads creating
 * at once get distinct ids, all listed in order.
 *
 * In-memory SQLite databases, and one store file in a mkdtemp directory under /tmp.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <pthread.h>
#include <sqlite3.h>

#include "audit/audit.h"
#include "pep/escalations.h"

#define S INT64_C(1000000)
#define HOUR (3600 * S)
#define DAY (24 * HOUR)
/* 2023-11-14T22:13:20.123456Z */
#define T0 INT64_C(1700000000123456)
#define REQ1 "01HZZZZZZZZZZZZZZZZZZZZZR1"

static json_t *attempts(void) {
    static json_t *a;
    if (!a)
        a = json_pack("[{s:s, s:s, s:i, s:i}, {s:s, s:s, s:s, s:i}, {s:s, s:s, s:s}]", "upstream",
                      "openai", "model", "gpt-4", "status", 503, "ms", 120, "upstream", "openai",
                      "model", "gpt-4", "error", "timeout", "ms", 30000, "upstream", "backup",
                      "model", "claude", "skipped", "breaker_open");
    return a;
}

static struct escalation_request request(const char *agent) {
    return (struct escalation_request){.chain = "chat",
                                       .request_id = REQ1,
                                       .agent = agent,
                                       .action = "llm.chat",
                                       .tenant = "acme",
                                       .attempts = attempts(),
                                       .last_status = 503};
}

/* Creates one and returns its copy (the caller clears it). */
static struct escalation create(struct escalation_store *s, const char *agent, int64_t now) {
    struct escalation_request in = request(agent);
    struct escalation e;
    assert_int_equal(escalation_create(s, &in, now, &e), 0);
    return e;
}

static enum escalation_resolve resolve(struct escalation_store *s, const char *id, const char *op,
                                       const char *note, int64_t now) {
    struct escalation before, after;
    enum escalation_resolve v;
    assert_int_equal(escalation_resolve(s, id, op, note, now, &v, &before, &after), 0);
    escalation_clear(&before);
    escalation_clear(&after);
    return v;
}

static enum escalation_state state_of(struct escalation_store *s, const char *id) {
    struct escalation e;
    assert_int_equal(escalation_get(s, id, &e), 0);
    enum escalation_state st = e.state;
    escalation_clear(&e);
    return st;
}

static char *dump(json_t *j) {
    assert_non_null(j);
    char *text = json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT);
    assert_non_null(text);
    json_decref(j);
    return text;
}

static void assert_json(json_t *j, const char *expected) {
    char *text = dump(j);
    if (strcmp(text, expected) != 0) fail_msg("got      %s\nexpected %s", text, expected);
    free(text);
}

static json_t *list(struct escalation_store *s, int filter) {
    enum escalation_state st = (enum escalation_state)filter;
    return escalation_list_json(s, filter < 0 ? NULL : &st);
}

/* The ids of a list, in order, joined by spaces. */
static void list_ids(struct escalation_store *s, int filter, char *out, size_t size) {
    json_t *l = list(s, filter);
    json_t *arr = json_object_get(l, "escalations");
    size_t i;
    json_t *item;
    out[0] = '\0';
    json_array_foreach(arr, i, item) {
        size_t len = strlen(out);
        snprintf(out + len, size - len, "%s%s", i ? " " : "",
                 json_string_value(json_object_get(item, "id")));
    }
    json_decref(l);
}

/* ---- the store ------------------------------------------------------------------------- */

static void test_state_names(void **state) {
    (void)state;
    enum escalation_state st;
    assert_string_equal(escalation_state_name(ESCALATION_OPEN), "open");
    assert_string_equal(escalation_state_name(ESCALATION_RESOLVED), "resolved");
    assert_string_equal(escalation_state_name((enum escalation_state)7), "unknown");
    assert_int_equal(escalation_state_parse("resolved", &st), 0);
    assert_int_equal(st, ESCALATION_RESOLVED);
    assert_int_equal(escalation_state_parse("open", &st), 0);
    assert_int_equal(st, ESCALATION_OPEN);
    assert_int_equal(escalation_state_parse("all", &st), PEP_EINVAL);
    assert_int_equal(escalation_state_parse("Open", &st), PEP_EINVAL);
    assert_int_equal(escalation_state_parse(NULL, &st), PEP_EINVAL);
}

static void test_create_open(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0);
    assert_int_equal(strlen(a.id), ESCALATION_ID_SIZE - 1);
    assert_int_equal(a.state, ESCALATION_OPEN);
    assert_string_equal(a.chain, "chat");
    assert_string_equal(a.request_id, REQ1);
    assert_string_equal(a.agent, "bot");
    assert_string_equal(a.action, "llm.chat");
    assert_string_equal(a.tenant, "acme");
    assert_true(json_equal(a.attempts, attempts()));
    assert_ptr_not_equal(a.attempts, attempts()); /* a copy, not the caller's */
    assert_int_equal(a.last_status, 503);
    assert_int_equal(a.created_at_us, T0);
    assert_null(a.resolved_by);
    assert_null(a.note);
    assert_int_equal(a.resolved_at_us, 0);

    /* published at once: get returns an equal copy */
    struct escalation got;
    assert_int_equal(escalation_get(s, a.id, &got), 0);
    char *x = dump(escalation_detail_json(&a)), *y = dump(escalation_detail_json(&got));
    assert_string_equal(x, y);
    free(x);
    free(y);
    escalation_clear(&got);
    assert_int_equal(escalation_get(s, "01HNOSUCHESCALATIONXXXXXXX", &got), PEP_ENOTFOUND);
    assert_int_equal(escalation_get(s, NULL, &got), PEP_ENOTFOUND);

    /* no attempts, no status: [] and none */
    struct escalation_request in = request("bot");
    in.attempts = NULL;
    in.last_status = 0;
    struct escalation b;
    assert_int_equal(escalation_create(s, &in, T0, &b), 0);
    assert_int_equal(json_array_size(b.attempts), 0);
    assert_int_equal(b.last_status, 0);
    assert_string_not_equal(a.id, b.id);
    escalation_clear(&b);

    /* refusals publish nothing */
    json_t *not_array = json_object(), *not_objects = json_pack("[i]", 1);
    for (int i = 0; i < 10; i++) {
        in = request("bot");
        switch (i) {
        case 0:
            in.chain = NULL;
            break;
        case 1:
            in.request_id = NULL;
            break;
        case 2:
            in.agent = "";
            break;
        case 3:
            in.action = NULL;
            break;
        case 4:
            in.tenant = NULL;
            break;
        case 5:
            in.attempts = not_array;
            break;
        case 6:
            in.attempts = not_objects;
            break;
        case 7:
            in.last_status = 99;
            break;
        case 8:
            in.last_status = 600;
            break;
        default:
            in.last_status = -1;
            break;
        }
        assert_int_equal(escalation_create(s, &in, T0, &b), PEP_EINVAL);
        assert_null(b.chain);
    }
    json_decref(not_array);
    json_decref(not_objects);
    json_t *l = list(s, -1);
    assert_int_equal(json_array_size(json_object_get(l, "escalations")), 2);
    json_decref(l);

    /* forget: as if never created; twice is a no-op */
    escalation_forget(s, a.id);
    assert_int_equal(escalation_get(s, a.id, &got), PEP_ENOTFOUND);
    escalation_forget(s, a.id);
    escalation_forget(s, NULL);
    l = list(s, -1);
    assert_int_equal(json_array_size(json_object_get(l, "escalations")), 1);
    json_decref(l);
    escalation_clear(&a);
    escalation_store_free(s);
}

static void test_list_filter_order(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    /* created out of time order: lists still run oldest first (newest last) */
    struct escalation b = create(s, "bot", T0 + S);
    struct escalation a = create(s, "bot", T0);
    struct escalation c = create(s, "other", T0 + 2 * S);
    struct escalation d = create(s, "other", T0 + 2 * S); /* same time: by id */
    assert_int_equal(resolve(s, b.id, "bob", NULL, T0 + 3 * S), ESCALATION_RESOLVE_OK);
    assert_int_equal(resolve(s, d.id, "bob", "fixed", T0 + 4 * S), ESCALATION_RESOLVE_OK);
    char got[256], want[256];

    list_ids(s, -1, got, sizeof got);
    snprintf(want, sizeof want, "%s %s %s %s", a.id, b.id, c.id, d.id);
    assert_string_equal(got, want);
    list_ids(s, ESCALATION_OPEN, got, sizeof got);
    snprintf(want, sizeof want, "%s %s", a.id, c.id);
    assert_string_equal(got, want);
    list_ids(s, ESCALATION_RESOLVED, got, sizeof got);
    snprintf(want, sizeof want, "%s %s", b.id, d.id);
    assert_string_equal(got, want);

    struct escalation_store *empty = escalation_store_new(0, 0);
    assert_json(list(empty, -1), "{\"escalations\":[]}");
    assert_json(list(empty, ESCALATION_OPEN), "{\"escalations\":[]}");
    escalation_store_free(empty);
    escalation_clear(&a);
    escalation_clear(&b);
    escalation_clear(&c);
    escalation_clear(&d);
    escalation_store_free(s);
}

static void test_resolve(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0);
    struct escalation before, after;
    enum escalation_resolve v;

    assert_int_equal(
        escalation_resolve(s, a.id, "bob", "upstream back", T0 + S, &v, &before, &after), 0);
    assert_int_equal(v, ESCALATION_RESOLVE_OK);
    assert_int_equal(before.state, ESCALATION_OPEN);
    assert_null(before.resolved_by);
    assert_int_equal(after.state, ESCALATION_RESOLVED);
    assert_string_equal(after.resolved_by, "bob");
    assert_string_equal(after.note, "upstream back");
    assert_int_equal(after.resolved_at_us, T0 + S);
    assert_true(json_equal(after.attempts, a.attempts));
    assert_int_equal(state_of(s, a.id), ESCALATION_RESOLVED);
    escalation_clear(&before);
    escalation_clear(&after);

    /* twice: a verdict, nothing changes; after = before = the first resolution */
    assert_int_equal(
        escalation_resolve(s, a.id, "carol", "me too", T0 + 2 * S, &v, &before, &after), 0);
    assert_int_equal(v, ESCALATION_RESOLVE_ALREADY);
    assert_string_equal(before.resolved_by, "bob");
    assert_string_equal(after.resolved_by, "bob");
    assert_string_equal(after.note, "upstream back");
    assert_int_equal(after.resolved_at_us, T0 + S);
    /* undoing a verdict's before must not reopen the first resolution */
    escalation_undo_resolve(s, &before);
    assert_int_equal(state_of(s, a.id), ESCALATION_RESOLVED);
    escalation_clear(&before);
    escalation_clear(&after);

    /* unknown id, bad operator, note too long: nothing filled, nothing changed */
    struct escalation b = create(s, "bot", T0 + 3 * S);
    assert_int_equal(
        escalation_resolve(s, "01HNOSUCHESCALATIONXXXXXXX", "bob", NULL, T0, &v, &before, &after),
        PEP_ENOTFOUND);
    assert_null(before.chain);
    assert_null(after.chain);
    assert_int_equal(escalation_resolve(s, NULL, "bob", NULL, T0, &v, &before, &after),
                     PEP_ENOTFOUND);
    assert_int_equal(escalation_resolve(s, b.id, NULL, NULL, T0, &v, &before, &after), PEP_EINVAL);
    assert_int_equal(escalation_resolve(s, b.id, "", NULL, T0, &v, &before, &after), PEP_EINVAL);
    char *note = malloc(ESCALATION_NOTE_MAX + 2);
    memset(note, 'n', ESCALATION_NOTE_MAX + 1);
    note[ESCALATION_NOTE_MAX + 1] = '\0';
    assert_int_equal(escalation_resolve(s, b.id, "bob", note, T0, &v, &before, &after), PEP_EINVAL);
    assert_int_equal(state_of(s, b.id), ESCALATION_OPEN);
    note[ESCALATION_NOTE_MAX] = '\0'; /* exactly the limit: fine */
    assert_int_equal(resolve(s, b.id, "bob", note, T0 + 4 * S), ESCALATION_RESOLVE_OK);
    free(note);
    escalation_clear(&a);
    escalation_clear(&b);
    escalation_store_free(s);
}

static void test_undo(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0);
    struct escalation before, after;
    enum escalation_resolve v;
    assert_int_equal(escalation_resolve(s, a.id, "bob", "done", T0 + S, &v, &before, &after), 0);
    assert_int_equal(v, ESCALATION_RESOLVE_OK);
    /* the resolution's record failed: open again, as if never resolved */
    escalation_undo_resolve(s, &before);
    struct escalation got;
    assert_int_equal(escalation_get(s, a.id, &got), 0);
    assert_int_equal(got.state, ESCALATION_OPEN);
    assert_null(got.resolved_by);
    assert_null(got.note);
    assert_int_equal(got.resolved_at_us, 0);
    escalation_clear(&got);
    char ids[64];
    list_ids(s, ESCALATION_OPEN, ids, sizeof ids);
    assert_string_equal(ids, a.id);
    escalation_undo_resolve(s, &before); /* twice: no-op */
    assert_int_equal(state_of(s, a.id), ESCALATION_OPEN);
    /* and it can be resolved again, by someone else */
    assert_int_equal(resolve(s, a.id, "carol", NULL, T0 + 2 * S), ESCALATION_RESOLVE_OK);
    assert_int_equal(escalation_get(s, a.id, &got), 0);
    assert_string_equal(got.resolved_by, "carol");
    assert_null(got.note);
    escalation_clear(&got);
    /* undo of a forgotten one: no-op */
    escalation_forget(s, a.id);
    escalation_undo_resolve(s, &before);
    assert_int_equal(escalation_get(s, a.id, &got), PEP_ENOTFOUND);
    escalation_clear(&before);
    escalation_clear(&after);
    escalation_clear(&a);
    escalation_store_free(s);
}

static void test_bounds(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(3, 2);
    struct escalation e[6];
    for (int i = 0; i < 3; i++)
        e[i] = create(s, "bot", T0 + i);
    /* the open one too many: refused, nothing published */
    struct escalation_request in = request("bot");
    struct escalation x;
    assert_int_equal(escalation_create(s, &in, T0 + 3, &x), PEP_EUNAVAILABLE);
    assert_null(x.chain);
    json_t *l = list(s, -1);
    assert_int_equal(json_array_size(json_object_get(l, "escalations")), 3);
    json_decref(l);
    /* a resolution frees a place */
    assert_int_equal(resolve(s, e[0].id, "bob", NULL, T0 + 10), ESCALATION_RESOLVE_OK);
    e[3] = create(s, "bot", T0 + 4);
    assert_int_equal(escalation_create(s, &in, T0 + 5, &x), PEP_EUNAVAILABLE);

    /* resolved ones: at most 2, the oldest resolution dropped first, never the one just
     * resolved (its record may still fail) */
    assert_int_equal(resolve(s, e[2].id, "bob", NULL, T0 + 11), ESCALATION_RESOLVE_OK);
    struct escalation before, after;
    enum escalation_resolve v;
    /* e[1] resolved at an earlier time than the others (a clock step): still kept */
    assert_int_equal(escalation_resolve(s, e[1].id, "bob", NULL, T0 + 9, &v, &before, &after), 0);
    char got[256], want[256];
    list_ids(s, ESCALATION_RESOLVED, got, sizeof got);
    snprintf(want, sizeof want, "%s %s", e[1].id, e[2].id); /* e[0] (T0 + 10) dropped */
    assert_string_equal(got, want);
    /* undo: open again, even beyond max_open (the database says open) */
    e[4] = create(s, "bot", T0 + 6);
    e[5] = create(s, "bot", T0 + 7);
    escalation_undo_resolve(s, &before);
    list_ids(s, ESCALATION_OPEN, got, sizeof got);
    snprintf(want, sizeof want, "%s %s %s %s", e[1].id, e[3].id, e[4].id, e[5].id);
    assert_string_equal(got, want);
    assert_int_equal(escalation_create(s, &in, T0 + 8, &x), PEP_EUNAVAILABLE);
    escalation_clear(&before);
    escalation_clear(&after);
    for (int i = 0; i < 6; i++)
        escalation_clear(&e[i]);
    escalation_store_free(s);

    /* the default: ESCALATION_MAX_OPEN */
    s = escalation_store_new(0, 0);
    for (int i = 0; i < ESCALATION_MAX_OPEN; i++) {
        assert_int_equal(escalation_create(s, &in, T0 + i, &x), 0);
        escalation_clear(&x);
    }
    assert_int_equal(escalation_create(s, &in, T0, &x), PEP_EUNAVAILABLE);
    escalation_store_free(s);
}

/* Creates from 8 threads at once: distinct ids, every one listed, the list in order. */
struct racer {
    struct escalation_store *s;
    pthread_barrier_t *go;
    int n;
    char ids[200][ESCALATION_ID_SIZE];
};

static void *race_create(void *arg) {
    struct racer *r = arg;
    struct escalation_request in = request("bot");
    pthread_barrier_wait(r->go);
    for (int i = 0; i < 200; i++) {
        struct escalation e;
        /* times interleave across threads, so that inserts land mid-list too */
        if (escalation_create(r->s, &in, T0 + (i * 8 + r->n) % 50, &e) != 0) return NULL;
        memcpy(r->ids[i], e.id, sizeof e.id);
        escalation_clear(&e);
    }
    return r;
}

static int cmp_str(const void *x, const void *y) {
    return strcmp(x, y);
}

static void test_concurrent_creates(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 8);
    static struct racer r[8];
    pthread_t t[8];
    for (int i = 0; i < 8; i++) {
        r[i] = (struct racer){.s = s, .go = &go, .n = i};
        assert_int_equal(pthread_create(&t[i], NULL, race_create, &r[i]), 0);
    }
    static char all[1600][ESCALATION_ID_SIZE];
    for (int i = 0; i < 8; i++) {
        void *ret = NULL;
        pthread_join(t[i], &ret);
        assert_ptr_equal(ret, &r[i]);
        memcpy(all[i * 200], r[i].ids, sizeof r[i].ids);
    }
    pthread_barrier_destroy(&go);
    qsort(all, 1600, ESCALATION_ID_SIZE, cmp_str);
    for (int i = 1; i < 1600; i++)
        assert_true(strcmp(all[i - 1], all[i]) < 0);

    json_t *l = list(s, ESCALATION_OPEN);
    json_t *arr = json_object_get(l, "escalations");
    assert_int_equal(json_array_size(arr), 1600);
    const char *prev_id = NULL, *prev_at = NULL;
    size_t i;
    json_t *item;
    json_array_foreach(arr, i, item) {
        const char *id = json_string_value(json_object_get(item, "id"));
        const char *at = json_string_value(json_object_get(item, "created_at"));
        assert_non_null(bsearch(id, all, 1600, ESCALATION_ID_SIZE, cmp_str));
        if (prev_at) {
            int c = strcmp(prev_at, at); /* same format and length: text order is time order */
            assert_true(c < 0 || (c == 0 && strcmp(prev_id, id) < 0));
        }
        prev_id = id;
        prev_at = at;
    }
    json_decref(l);
    escalation_store_free(s);
}

/* ---- SQLite ---------------------------------------------------------------------------- */

static sqlite3 *memdb(void) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(":memory:", &db), SQLITE_OK);
    char *msg = NULL;
    if (sqlite3_exec(db, ESCALATIONS_SCHEMA, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("schema: %s", msg);
    /* idempotent, as audit_open runs it on every start */
    assert_int_equal(sqlite3_exec(db, ESCALATIONS_SCHEMA, NULL, NULL, NULL), SQLITE_OK);
    return db;
}

/* Creates one and writes it with apply_insert, as the writer would; resolves and writes
 * that too when resolved_at != 0.  The id into id_out. */
static void scripted(struct escalation_store *s, sqlite3 *db, const char *agent, int64_t t,
                     int64_t resolved_at, const char *note, char id_out[ESCALATION_ID_SIZE]) {
    struct escalation e = create(s, agent, t);
    assert_int_equal(escalation_apply_insert(db, &e), 0);
    memcpy(id_out, e.id, ESCALATION_ID_SIZE);
    if (resolved_at) {
        struct escalation before, after;
        enum escalation_resolve v;
        assert_int_equal(escalation_resolve(s, e.id, "bob", note, resolved_at, &v, &before, &after),
                         0);
        assert_int_equal(v, ESCALATION_RESOLVE_OK);
        assert_int_equal(escalation_apply_resolve(db, &after), 0);
        escalation_clear(&before);
        escalation_clear(&after);
    }
    escalation_clear(&e);
}

/* Both stores answer alike: every list, and every escalation's detail. */
static void assert_same_stores(struct escalation_store *x, struct escalation_store *y) {
    for (int f = -1; f <= ESCALATION_RESOLVED; f++) {
        char *lx = dump(list(x, f)), *ly = dump(list(y, f));
        assert_string_equal(lx, ly);
        free(lx);
        free(ly);
    }
    json_t *l = list(x, -1);
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(l, "escalations"), i, item) {
        struct escalation ex, ey;
        const char *id = json_string_value(json_object_get(item, "id"));
        assert_int_equal(escalation_get(x, id, &ex), 0);
        assert_int_equal(escalation_get(y, id, &ey), 0);
        char *dx = dump(escalation_detail_json(&ex)), *dy = dump(escalation_detail_json(&ey));
        assert_string_equal(dx, dy);
        free(dx);
        free(dy);
        escalation_clear(&ex);
        escalation_clear(&ey);
    }
    json_decref(l);
}

static void test_persistence(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct escalation_store *s = escalation_store_new(0, 0);
    char ids[4][ESCALATION_ID_SIZE];
    scripted(s, db, "bot", T0, 0, NULL, ids[0]);
    scripted(s, db, "bot", T0 + 1, T0 + S, "quote \"it\" \n and é", ids[1]);
    scripted(s, db, "other", T0 - 30 * DAY, 0, NULL, ids[2]); /* old but open: kept */
    scripted(s, db, "other", T0 + 2, T0 + 2 * S, NULL, ids[3]);
    /* no attempts, no status */
    struct escalation_request in = request("bare");
    in.attempts = NULL;
    in.last_status = 0;
    struct escalation bare;
    assert_int_equal(escalation_create(s, &in, T0 + 3, &bare), 0);
    assert_int_equal(escalation_apply_insert(db, &bare), 0);

    struct escalation_store *s2 = escalation_store_new(0, 0);
    struct pep_err err = {0};
    if (escalation_store_load(s2, db, T0 + HOUR, &err) != 0) fail_msg("load: %s", err.msg);
    assert_same_stores(s, s2);
    char got[256];
    list_ids(s2, -1, got, sizeof got);
    assert_int_equal(strncmp(got, ids[2], ESCALATION_ID_SIZE - 1), 0); /* oldest first */
    struct escalation y;
    assert_int_equal(escalation_get(s2, bare.id, &y), 0);
    assert_int_equal(y.last_status, 0);
    assert_int_equal(json_array_size(y.attempts), 0);
    escalation_clear(&y);

    /* the reloaded store goes on: resolve there, write, reload again */
    struct escalation before, after;
    enum escalation_resolve v;
    assert_int_equal(
        escalation_resolve(s2, ids[0], "carol", "ok", T0 + 2 * HOUR, &v, &before, &after), 0);
    assert_int_equal(escalation_apply_resolve(db, &after), 0);
    struct escalation_store *s3 = escalation_store_new(0, 0);
    assert_int_equal(escalation_store_load(s3, db, T0 + 3 * HOUR, &err), 0);
    assert_same_stores(s2, s3);
    escalation_clear(&before);
    escalation_clear(&after);

    /* loading the same rows twice is refused, not duplicated */
    assert_int_equal(escalation_store_load(s3, db, T0 + 3 * HOUR, &err), PEP_EDB);
    escalation_store_free(s3);
    escalation_store_free(s2);
    escalation_clear(&bare);
    escalation_store_free(s);
    sqlite3_close(db);
}

static void test_database_refuses(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0);
    struct escalation before, after;
    enum escalation_resolve v;
    assert_int_equal(escalation_resolve(s, a.id, "bob", NULL, T0 + 1, &v, &before, &after), 0);
    /* resolved before its row exists (its open record failed, or is not written yet) */
    assert_int_equal(escalation_apply_resolve(db, &after), PEP_EDB);
    assert_int_equal(escalation_apply_insert(db, &a), 0);
    assert_int_equal(escalation_apply_insert(db, &a), PEP_EDB);          /* same id */
    assert_int_equal(escalation_apply_insert(db, &after), PEP_EINVAL);   /* born open only */
    assert_int_equal(escalation_apply_resolve(db, &before), PEP_EINVAL); /* not a resolution */
    assert_int_equal(escalation_apply_resolve(db, &after), 0);
    assert_int_equal(escalation_apply_resolve(db, &after), PEP_EDB); /* no longer open */
    snprintf(after.id, sizeof after.id, "%s", "01HNOSUCHESCALATIONXXXXXXX");
    assert_int_equal(escalation_apply_resolve(db, &after), PEP_EDB);
    /* the CHECKs keep state and resolution fields together */
    const char *bad[] = {
        "UPDATE escalations SET state = 'closed'",
        "UPDATE escalations SET state = 'open'",
        "UPDATE escalations SET resolved_by = NULL",
        "UPDATE escalations SET resolved_at_us = NULL",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad); i++)
        assert_int_not_equal(sqlite3_exec(db, bad[i], NULL, NULL, NULL), SQLITE_OK);
    escalation_clear(&before);
    escalation_clear(&after);

    /* no table */
    sqlite3 *bare = NULL;
    assert_int_equal(sqlite3_open(":memory:", &bare), SQLITE_OK);
    assert_int_equal(escalation_apply_insert(bare, &a), PEP_EDB);
    struct pep_err err = {0};
    struct escalation_store *s2 = escalation_store_new(0, 0);
    assert_int_equal(escalation_store_load(s2, bare, T0, &err), PEP_EDB);
    escalation_store_free(s2);
    sqlite3_close(bare);
    escalation_clear(&a);
    escalation_store_free(s);
    sqlite3_close(db);
}

static void test_load_retention_and_malformed(void **state) {
    (void)state;
    sqlite3 *db = memdb();
    struct escalation_store *s = escalation_store_new(0, 0);
    const int64_t now = T0 + 100 * DAY;
    /* resolved exactly ESCALATION_RETAIN_US ago: skipped; 1 µs later: kept; open: kept */
    char old[ESCALATION_ID_SIZE], kept[ESCALATION_ID_SIZE], open[ESCALATION_ID_SIZE];
    scripted(s, db, "bot", T0, now - ESCALATION_RETAIN_US, NULL, old);
    scripted(s, db, "bot", T0 + 1, now - ESCALATION_RETAIN_US + 1, NULL, kept);
    scripted(s, db, "bot", T0 + 2, 0, NULL, open);

    struct escalation_store *s2 = escalation_store_new(0, 0);
    struct pep_err err = {0};
    assert_int_equal(escalation_store_load(s2, db, now, &err), 0);
    struct escalation got;
    assert_int_equal(escalation_get(s2, old, &got), PEP_ENOTFOUND);
    assert_int_equal(escalation_get(s2, kept, &got), 0);
    escalation_clear(&got);
    assert_int_equal(escalation_get(s2, open, &got), 0);
    escalation_clear(&got);

    /* prune applies the same rule to a running store */
    assert_int_equal(escalation_store_prune(s, now), 1);
    assert_int_equal(escalation_get(s, old, &got), PEP_ENOTFOUND);
    assert_same_stores(s, s2);
    assert_int_equal(escalation_store_prune(s, now), 0);
    escalation_store_free(s2);

    /* max_resolved: the newest resolutions are loaded, as a running store keeps them */
    char r3[ESCALATION_ID_SIZE];
    scripted(s, db, "bot", T0 + 3, now - 1, NULL, r3);
    s2 = escalation_store_new(0, 1);
    assert_int_equal(escalation_store_load(s2, db, now, &err), 0);
    char ids[128], want[128];
    list_ids(s2, -1, ids, sizeof ids);
    snprintf(want, sizeof want, "%s %s", open, r3);
    assert_string_equal(ids, want);
    escalation_store_free(s2);

    /* a malformed row fails the load */
    const char *bad[] = {
        "UPDATE escalations SET attempts = '{}' WHERE id = ?1",
        "UPDATE escalations SET attempts = 'not json' WHERE id = ?1",
        "UPDATE escalations SET last_status = 700 WHERE id = ?1",
        "UPDATE escalations SET agent = NULL WHERE id = ?1",
        "UPDATE escalations SET id = 'abc' WHERE id = ?1",
    };
    for (size_t i = 0; i < PEP_ARRAY_LEN(bad); i++) {
        sqlite3_stmt *st = NULL;
        assert_int_equal(sqlite3_exec(db, "SAVEPOINT t", NULL, NULL, NULL), SQLITE_OK);
        assert_int_equal(sqlite3_prepare_v2(db, bad[i], -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_text(st, 1, open, -1, SQLITE_STATIC);
        int step = sqlite3_step(st);
        sqlite3_finalize(st);
        if (step == SQLITE_DONE) { /* NOT NULL refuses some of them already: fine too */
            s2 = escalation_store_new(0, 0);
            assert_int_equal(escalation_store_load(s2, db, now, &err), PEP_EDB);
            assert_non_null(strstr(err.msg, i == 4 ? "abc" : open));
            escalation_store_free(s2);
        }
        assert_int_equal(sqlite3_exec(db, "ROLLBACK TO t; RELEASE t", NULL, NULL, NULL), SQLITE_OK);
    }
    escalation_store_free(s);
    sqlite3_close(db);
}

/* Through the real audit writer: the insert rides on a fire-and-forget record whose apply
 * argument the store owns and frees; the resolution on a waited admin record. */
struct waiter {
    pthread_mutex_t m;
    pthread_cond_t c;
    int done;
    int rc;
};

static void waiter_done(void *arg, int rc, int64_t seq) {
    (void)seq;
    struct waiter *w = arg;
    pthread_mutex_lock(&w->m);
    w->rc = rc;
    w->done = 1;
    pthread_cond_broadcast(&w->c);
    pthread_mutex_unlock(&w->m);
}

static json_t *record(const char *kind, const char *action, const char *escalation_id) {
    return json_pack("{s:s, s:s, s:s, s:s, s:s}", "ts", "2023-11-14T22:13:20.123456Z", "kind", kind,
                     "request_id", REQ1, "action", action, "escalation_id", escalation_id);
}

static int submit_and_wait(struct audit_store *as, const char *id, audit_apply_fn apply,
                           void *arg) {
    struct waiter w = {.m = PTHREAD_MUTEX_INITIALIZER, .c = PTHREAD_COND_INITIALIZER};
    assert_int_equal(
        audit_submit(as, record("admin", "escalation.resolve", id), apply, arg, waiter_done, &w),
        0);
    pthread_mutex_lock(&w.m);
    while (!w.done)
        pthread_cond_wait(&w.c, &w.m);
    pthread_mutex_unlock(&w.m);
    return w.rc;
}

static void test_through_audit_writer(void **state) {
    (void)state;
    char dir[] = "/tmp/pep-escalations-XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/pep.db", dir);
    struct audit_options opt = {.durability_full = false, .schema_extra = ESCALATIONS_SCHEMA};
    struct audit_store *as = NULL;
    struct pep_err err = {0};
    if (audit_open(path, &opt, &as, &err) != 0) fail_msg("audit_open: %s", err.msg);

    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0), b = create(s, "other", T0 + 1);
    /* fire and forget: the copies are the store's from here on (ASan checks they are
     * freed) */
    assert_int_equal(audit_submit_owned(as, record("system", "escalation.open", a.id),
                                        escalation_apply_insert, escalation_dup(&a),
                                        escalation_free),
                     0);
    assert_int_equal(audit_submit_owned(as, record("system", "escalation.open", b.id),
                                        escalation_apply_insert, escalation_dup(&b),
                                        escalation_free),
                     0);
    struct escalation before, after;
    enum escalation_resolve v;
    assert_int_equal(escalation_resolve(s, a.id, "bob", "back up", T0 + S, &v, &before, &after), 0);
    /* queued behind the inserts: the row is there */
    assert_int_equal(submit_and_wait(as, a.id, escalation_apply_resolve, &after), 0);
    /* a second resolution of the row is refused by the database: the item fails alone */
    assert_true(submit_and_wait(as, a.id, escalation_apply_resolve, &after) < 0);
    escalation_clear(&before);
    escalation_clear(&after);

    /* a resolution whose record fails is undone: b is open again in memory as in the db */
    assert_int_equal(escalation_resolve(s, b.id, "bob", NULL, T0 + 2 * S, &v, &before, &after), 0);
    escalation_clear(&after);
    struct escalation wrong;
    assert_int_equal(escalation_copy(&wrong, &before), 0); /* an open copy: apply refuses it */
    if (submit_and_wait(as, b.id, escalation_apply_resolve, &wrong) != 0)
        escalation_undo_resolve(s, &before);
    assert_int_equal(state_of(s, b.id), ESCALATION_OPEN);
    escalation_clear(&wrong);
    escalation_clear(&before);
    audit_close(as);

    sqlite3 *db = NULL;
    assert_int_equal(audit_open_reader(path, &db, &err), 0);
    struct escalation_store *s2 = escalation_store_new(0, 0);
    if (escalation_store_load(s2, db, T0 + HOUR, &err) != 0) fail_msg("load: %s", err.msg);
    assert_same_stores(s, s2);
    assert_int_equal(state_of(s2, a.id), ESCALATION_RESOLVED);
    assert_int_equal(state_of(s2, b.id), ESCALATION_OPEN);
    /* the failed items left no record: 3 records for 5 submissions */
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*) FROM audit", -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 3);
    sqlite3_finalize(st);
    sqlite3_close(db);

    escalation_clear(&a);
    escalation_clear(&b);
    escalation_store_free(s);
    escalation_store_free(s2);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* ---- JSON ---------------------------------------------------------------------------- */

#define ATTEMPTS_JSON                                                                              \
    "[{\"model\":\"gpt-4\",\"ms\":120,\"status\":503,\"upstream\":\"openai\"},"                    \
    "{\"error\":\"timeout\",\"model\":\"gpt-4\",\"ms\":30000,\"upstream\":\"openai\"},"            \
    "{\"model\":\"claude\",\"skipped\":\"breaker_open\",\"upstream\":\"backup\"}]"

static void test_json_shapes(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation late = create(s, "bot", T0 + S);
    struct escalation a = create(s, "bot", T0);
    char expect[2048];

    /* SPEC 8: exactly {id, state, chain, request_id, agent, action, created_at} */
    snprintf(expect, sizeof expect,
             "{\"escalations\":[{\"action\":\"llm.chat\",\"agent\":\"bot\",\"chain\":\"chat\","
             "\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"request_id\":\"%s\",\"state\":\"open\"},{\"action\":\"llm.chat\","
             "\"agent\":\"bot\",\"chain\":\"chat\","
             "\"created_at\":\"2023-11-14T22:13:21.123456Z\",\"id\":\"%s\","
             "\"request_id\":\"%s\",\"state\":\"open\"}]}",
             a.id, REQ1, late.id, REQ1);
    assert_json(list(s, -1), expect);

    /* the webhook: no token, no body, no resolution fields */
    snprintf(expect, sizeof expect,
             "{\"action\":\"llm.chat\",\"agent\":\"bot\",\"attempts\":" ATTEMPTS_JSON
             ",\"chain\":\"chat\",\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"request_id\":\"%s\",\"tenant\":\"acme\",\"upstream_status\":503}",
             a.id, REQ1);
    assert_json(escalation_webhook_json(&a), expect);

    /* detail, open: what has not happened is null */
    snprintf(expect, sizeof expect,
             "{\"action\":\"llm.chat\",\"agent\":\"bot\",\"attempts\":" ATTEMPTS_JSON
             ",\"chain\":\"chat\",\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"note\":null,\"request_id\":\"%s\",\"resolved_at\":null,\"resolved_by\":null,"
             "\"state\":\"open\",\"tenant\":\"acme\",\"upstream_status\":503}",
             a.id, REQ1);
    assert_json(escalation_detail_json(&a), expect);

    /* detail, resolved */
    assert_int_equal(resolve(s, a.id, "bob", "provider back", T0 + 2 * S), ESCALATION_RESOLVE_OK);
    struct escalation r;
    assert_int_equal(escalation_get(s, a.id, &r), 0);
    snprintf(expect, sizeof expect,
             "{\"action\":\"llm.chat\",\"agent\":\"bot\",\"attempts\":" ATTEMPTS_JSON
             ",\"chain\":\"chat\",\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"note\":\"provider back\",\"request_id\":\"%s\","
             "\"resolved_at\":\"2023-11-14T22:13:22.123456Z\",\"resolved_by\":\"bob\","
             "\"state\":\"resolved\",\"tenant\":\"acme\",\"upstream_status\":503}",
             a.id, REQ1);
    assert_json(escalation_detail_json(&r), expect);
    escalation_clear(&r);
    snprintf(expect, sizeof expect,
             "{\"escalations\":[{\"action\":\"llm.chat\",\"agent\":\"bot\",\"chain\":\"chat\","
             "\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"request_id\":\"%s\",\"state\":\"resolved\"}]}",
             a.id, REQ1);
    assert_json(list(s, ESCALATION_RESOLVED), expect);

    /* no status answered (every step skipped): null */
    struct escalation_request in = request("bot");
    in.last_status = 0;
    in.attempts = NULL;
    struct escalation n;
    assert_int_equal(escalation_create(s, &in, T0, &n), 0);
    snprintf(expect, sizeof expect,
             "{\"action\":\"llm.chat\",\"agent\":\"bot\",\"attempts\":[],\"chain\":\"chat\","
             "\"created_at\":\"2023-11-14T22:13:20.123456Z\",\"id\":\"%s\","
             "\"request_id\":\"%s\",\"tenant\":\"acme\",\"upstream_status\":null}",
             n.id, REQ1);
    assert_json(escalation_webhook_json(&n), expect);
    escalation_clear(&n);
    escalation_clear(&a);
    escalation_clear(&late);
    escalation_store_free(s);
}

/* A dup is a deep copy freed by escalation_free (the audit store's apply_arg_free). */
static void test_dup(void **state) {
    (void)state;
    struct escalation_store *s = escalation_store_new(0, 0);
    struct escalation a = create(s, "bot", T0);
    struct escalation *d = escalation_dup(&a);
    assert_non_null(d);
    assert_string_equal(d->id, a.id);
    assert_ptr_not_equal(d->chain, a.chain);
    assert_ptr_not_equal(d->attempts, a.attempts);
    assert_true(json_equal(d->attempts, a.attempts));
    escalation_free(d);
    escalation_free(NULL);
    escalation_clear(NULL);
    escalation_clear(&a);
    escalation_store_free(s);
    escalation_store_free(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_names),
        cmocka_unit_test(test_create_open),
        cmocka_unit_test(test_list_filter_order),
        cmocka_unit_test(test_resolve),
        cmocka_unit_test(test_undo),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_concurrent_creates),
        cmocka_unit_test(test_persistence),
        cmocka_unit_test(test_database_refuses),
        cmocka_unit_test(test_load_retention_and_malformed),
        cmocka_unit_test(test_through_audit_writer),
        cmocka_unit_test(test_json_shapes),
        cmocka_unit_test(test_dup),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    json_decref(attempts());
    return rc;
}
