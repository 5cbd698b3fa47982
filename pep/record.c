/*
 * record.c — building audit records and writing one synchronously.  See record.h.
 */
#include "pep/record.h"
#include "pep/server.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The bytes as a JSON string with some written %XX: every byte of 0x80 and above when
 * escape_high, and '%' itself when escape_percent. */
static json_t *json_escaped(const char *s, size_t len, bool escape_high, bool escape_percent) {
    char *escaped = malloc(3 * len + 1), *o = escaped;
    if (!escaped) return NULL;
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)s[i];
        if ((b >= 0x80 && escape_high) || (b == '%' && escape_percent))
            o += sprintf(o, "%%%02X", b);
        else
            *o++ = (char)b;
    }
    json_t *v = json_stringn(escaped, (size_t)(o - escaped));
    free(escaped);
    return v;
}

json_t *json_text(const char *s, size_t len) {
    json_t *v = json_stringn(s, len);
    if (v || !s) return v;
    return json_escaped(s, len, true, false);
}

json_t *json_exact_text(const char *s, size_t len) {
    if (!s) return NULL;
    json_t *v = json_stringn(s, len);
    if (v && !memchr(s, '%', len)) return v;
    bool utf8 = v != NULL;
    json_decref(v);
    return json_escaped(s, len, !utf8, true);
}

json_t *server_record(const char *kind, const char *request_id) {
    char ts[32];
    pep_format_rfc3339_us(pep_now_us(), ts);
    char own_id[27];
    if (!request_id) {
        pep_request_id(own_id);
        request_id = own_id;
    }
    return json_pack("{s:s, s:s, s:s}", "ts", ts, "kind", kind, "request_id", request_id);
}

static void on_sync_done(void *arg, int rc, int64_t seq) {
    struct sync_wait *w = arg;
    pthread_mutex_lock(&w->lock);
    w->done = true;
    w->rc = rc;
    w->seq = seq;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

int server_audit_sync(struct server *s, json_t *record, audit_apply_fn apply, void *apply_arg,
                      int64_t *seq) {
    struct sync_wait w = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};
    int rc = audit_submit(s->audit, record, apply, apply_arg, on_sync_done, &w);
    if (rc != 0) return rc;
    pthread_mutex_lock(&w.lock);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    if (seq) *seq = w.seq;
    return w.rc;
}
