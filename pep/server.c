/*
 * server.c — service-wide operations that both the signal loop (main.c) and the admin API
 * (admin.c) trigger: reloading the policy.
 *
 * Threads: any; reloads are serialized by reload_lock, and the snapshot swap itself is
 * guarded by server.policy_lock so that requests always retain a whole policy.
 */
#include "pep/server.h"
#include "pep/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t reload_lock = PTHREAD_MUTEX_INITIALIZER;

/* The policy.reload record of p, by an operator (kind admin) or by SIGHUP (kind system). */
static json_t *reload_record(const struct policy *p, const struct reload_origin *by) {
    bool operator= by && by->operator_id;
    json_t *rec = server_record(operator? "admin" : "system", by ? by->request_id : NULL);
    if (!rec) return NULL;
    json_object_set_new(rec, "action", json_string("policy.reload"));
    json_object_set_new(rec, "policy_hash", json_string(p->policy_hash));
    json_object_set_new(rec, "reason", json_string(p->file));
    if (operator) {
        json_object_set_new(rec, "operator", json_string(by->operator_id));
        json_object_set_new(rec, "decision", json_string("allow"));
        json_object_set_new(rec, "code", json_string("ok"));
    }
    return rec;
}

/* One error in the "FILE:LINE:COL: message" shape, so callers always have one to show. */
static void reload_error(struct policy_errors *errs, const char *file, const char *what) {
    char msg[4200];
    snprintf(msg, sizeof msg, "%s:1:1: %s", file, what);
    errs->items = calloc(1, sizeof(char *));
    if (errs->items && (errs->items[0] = strdup(msg))) errs->len = 1;
}

int server_reload(struct server *s, const struct reload_origin *by, int64_t *audit_seq,
                  struct policy_errors *errs) {
    pthread_mutex_lock(&reload_lock);
    struct policy *p = NULL;
    int rc = policy_load(s->policy_path, NULL, &p, errs);
    if (rc != 0) {
        /* policy_load reports an unreadable or invalid file itself; what is left (out of
         * memory) is said in the same shape. */
        if (errs->len == 0) {
            char what[200];
            snprintf(what, sizeof what, "the policy could not be loaded: %s", pep_strerror(rc));
            reload_error(errs, s->policy_path, what);
        }
        goto out;
    }
    json_t *rec = reload_record(p, by);
    if (!rec || server_audit_sync(s, rec, NULL, NULL, audit_seq) != 0) {
        rc = PEP_EUNAVAILABLE;
        reload_error(errs, s->policy_path,
                     "the reload could not be audited; the active policy is kept");
        policy_release(p);
        goto out;
    }
    pthread_mutex_lock(&s->policy_lock);
    struct policy *old = s->policy;
    s->policy = p;
    s->policy_loaded_at_us = pep_now_us();
    pthread_mutex_unlock(&s->policy_lock);
    if (strcmp(old->listen, p->listen) != 0 || strcmp(old->admin_listen, p->admin_listen) != 0)
        fprintf(stderr, "pep: reload: listen addresses take effect at the next start\n");
    policy_release(old);
    if (server_seed_agents(s, p) != 0)
        fprintf(stderr, "pep: reload: policy agents could not be seeded\n");
    fprintf(stderr, "pep: policy reloaded from %s (policy_hash %s)\n", p->file, p->policy_hash);
out:
    pthread_mutex_unlock(&reload_lock);
    return rc;
}
