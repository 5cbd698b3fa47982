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

int server_reload(struct server *s, struct policy_errors *errs) {
    pthread_mutex_lock(&reload_lock);
    struct policy *p = NULL;
    int rc = policy_load(s->policy_path, NULL, &p, errs);
    if (rc == 0) {
        pthread_mutex_lock(&s->policy_lock);
        struct policy *old = s->policy;
        s->policy = p;
        s->policy_loaded_at_us = pep_now_us();
        pthread_mutex_unlock(&s->policy_lock);
        if (strcmp(old->listen, p->listen) != 0 || strcmp(old->admin_listen, p->admin_listen) != 0)
            fprintf(stderr, "pep: reload: listen addresses take effect at the next start\n");
        policy_release(old);
        json_t *rec = server_record("system", NULL);
        json_object_set_new(rec, "action", json_string("policy.reload"));
        json_object_set_new(rec, "policy_hash", json_string(p->policy_hash));
        json_object_set_new(rec, "reason", json_string(p->file));
        if (audit_submit(s->audit, rec, NULL, NULL, NULL, NULL) != 0)
            fprintf(stderr, "pep: reload: the reload record could not be queued\n");
        if (server_seed_agents(s, p) != 0)
            fprintf(stderr, "pep: reload: policy agents could not be seeded\n");
        fprintf(stderr, "pep: policy reloaded from %s (policy_hash %s)\n", p->file, p->policy_hash);
    } else if (errs->len == 0) {
        /* policy_load reports an unreadable or invalid file itself; what is left (out of
         * memory) is said in the same shape, so callers always have one error to show. */
        char msg[4200];
        snprintf(msg, sizeof msg, "%s:1:1: the policy could not be loaded: %s", s->policy_path,
                 pep_strerror(rc));
        errs->items = calloc(1, sizeof(char *));
        if (errs->items && (errs->items[0] = strdup(msg))) errs->len = 1;
    }
    pthread_mutex_unlock(&reload_lock);
    return rc;
}
