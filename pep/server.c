/*
 * server.c — service-wide operations that both the signal loop (main.c) and the admin API
 * (admin.c) trigger: reloading the policy.
 *
 * Threads: any; reloads are serialized by reload_lock, and the snapshot swap itself is
 * guarded by server.policy_lock so that requests always retain a whole policy.
 */
#include "pep/server.h"
#include "pep/breaker.h"
#include "pep/indicators.h"
#include "pep/metrics.h"
#include "pep/record.h"
#include "pep/seed.h"
#include "pep/util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t reload_lock = PTHREAD_MUTEX_INITIALIZER;

/* The policy.reload record of p, by an operator (kind admin) or by SIGHUP (kind system). */
struct policy *server_policy(struct server *s) {
    pthread_mutex_lock(&s->policy_lock);
    struct policy *p = policy_retain(s->policy);
    pthread_mutex_unlock(&s->policy_lock);
    return p;
}

void server_init_decision_lock(struct server *s) {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->decision_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
}

static json_t *reload_record(const struct policy *p, const struct reload_origin *by) {
    bool by_operator = by && by->operator_id;
    json_t *rec = server_record(by_operator ? "admin" : "system", by ? by->request_id : NULL);
    if (!rec) return NULL;
    json_object_set_new(rec, "action", json_string("policy.reload"));
    json_object_set_new(rec, "policy_hash", json_string(p->policy_hash));
    json_object_set_new(rec, "reason", json_string(p->file));
    if (by_operator) {
        json_object_set_new(rec, "operator", json_string(by->operator_id));
        json_object_set_new(rec, "decision", json_string("allow"));
        json_object_set_new(rec, "code", json_string("ok"));
    }
    return rec;
}

void server_warn_unset_credentials(const struct policy *p) {
    for (size_t i = 0; i < p->upstreams_len; i++) {
        const struct upstream *u = &p->upstreams[i];
        const char *var = u->api_key_env;
        if (var && !getenv(var))
            fprintf(stderr,
                    "pep: warning: upstream %s: api_key_env %s is not set; its requests go "
                    "without Authorization\n",
                    u->name, var);
        for (size_t k = 0; k < u->headers_len; k++)
            if (u->headers[k].env && !getenv(u->headers[k].env))
                fprintf(stderr,
                        "pep: warning: upstream %s: header %s: %s is not set; the header is not "
                        "sent\n",
                        u->name, u->headers[k].name, u->headers[k].env);
    }
}

/* Adds "FILE:LINE:COL: message" to errs (best effort: out of memory drops it). */
__attribute__((format(printf, 4, 5))) static void reload_add_error(struct policy_errors *errs,
                                                                   const char *file,
                                                                   struct policy_loc at,
                                                                   const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char **grown = realloc(errs->items, (errs->len + 1) * sizeof *grown);
    if (!grown) return;
    errs->items = grown;
    /* A setting deleted from the file has no position left: the file's start stands in. */
    if (asprintf(&errs->items[errs->len], "%s:%d:%d: %s", file, at.line ? at.line : 1,
                 at.line ? at.col : 1, msg) >= 0)
        errs->len++;
}

/* Settings that take effect only at start (the sockets, the data directory) must not
 * change on a reload: accepting the file would report as active a policy whose settings
 * are not.  A command-line override makes the file's value moot.  Returns the number of
 * errors added. */
static size_t reload_start_only_errors(const struct server *s, const struct policy *active,
                                       const struct policy *p, struct policy_errors *errs) {
    static const char restart[] = "it takes effect only at start: restart pep to change it";
    struct {
        const char *key, *now, *next;
        bool overridden;
        struct policy_loc at;
    } settings[] = {
        {"server.listen", active->listen, p->listen, s->listen_override != NULL, p->listen_loc},
        {"server.admin_listen", active->admin_listen, p->admin_listen,
         s->admin_listen_override != NULL, p->admin_listen_loc},
        {"server.data_dir", active->data_dir, p->data_dir, s->data_dir_override != NULL,
         p->data_dir_loc},
    };
    size_t before = errs->len;
    for (size_t i = 0; i < PEP_ARRAY_LEN(settings); i++)
        if (!settings[i].overridden && strcmp(settings[i].now, settings[i].next) != 0)
            reload_add_error(errs, p->file, settings[i].at, "%s changed from '%s' to '%s': %s",
                             settings[i].key, settings[i].now, settings[i].next, restart);
    return errs->len - before;
}

int server_sync_state(struct server *s, const struct policy *p) {
    int rc = breakers_sync(s->breakers, p, pep_mono_us() / 1000);
    if (rc == 0) rc = metrics_sync(s->metrics, p);
    if (rc == 0) rc = indicators_sync(s->indicators, p);
    return rc;
}

int server_reload(struct server *s, const struct reload_origin *by, int64_t *audit_seq,
                  struct policy_errors *errs) {
    pthread_mutex_lock(&reload_lock);
    struct policy *p = NULL;
    int rc = policy_load(s->policy_path, &p, errs);
    if (rc != 0) {
        /* policy_load reports an unreadable or invalid file itself; what is left (out of
         * memory) is said in the same shape. */
        if (errs->len == 0)
            reload_add_error(errs, s->policy_path, (struct policy_loc){0},
                             "the policy could not be loaded: %s", pep_strerror(rc));
        goto out;
    }
    struct policy *active = server_policy(s);
    size_t refused = reload_start_only_errors(s, active, p, errs);
    policy_release(active);
    if (refused) {
        rc = PEP_EINVAL;
        policy_release(p);
        goto out;
    }
    /* State kept by name across reloads learns the new names before a request can use
     * them: breakers (a new upstream's), metric series, the chains' indicators. */
    if (server_sync_state(s, p) != 0) {
        rc = PEP_ENOMEM;
        reload_add_error(errs, s->policy_path, (struct policy_loc){0},
                         "out of memory; the active policy is kept");
        policy_release(p);
        goto out;
    }
    /* SPEC 6.5: the reload record, the new rules and the agents they seed are one step for
     * the decisions (server.decision_lock): none is queued between them, so every decision
     * agrees with the policy whose hash it carries.  Decisions wait meanwhile (a few
     * fsyncs: the reload's record and each seeded agent's). */
    pthread_rwlock_wrlock(&s->decision_lock);
    json_t *rec = reload_record(p, by);
    if (!rec || server_audit_sync(s, rec, NULL, NULL, audit_seq) != 0) {
        pthread_rwlock_unlock(&s->decision_lock);
        rc = PEP_EUNAVAILABLE;
        reload_add_error(errs, s->policy_path, (struct policy_loc){0},
                         "the reload could not be audited; the active policy is kept");
        policy_release(p);
        goto out;
    }
    pthread_mutex_lock(&s->policy_lock);
    struct policy *old = s->policy;
    s->policy = p;
    s->policy_loaded_at_us = pep_now_us();
    pthread_mutex_unlock(&s->policy_lock);
    if (old->durability != p->durability || old->checkpoint_every != p->checkpoint_every)
        audit_retune(s->audit, p->durability == AUDIT_DURABILITY_FULL, p->checkpoint_every);
    if (s->conn_guard) conn_guard_set_receive_timeout(s->conn_guard, p->receive_timeout_ms);
    policy_release(old);
    if (server_seed_agents(s, p) != 0)
        fprintf(stderr, "pep: reload: policy agents could not be seeded\n");
    pthread_rwlock_unlock(&s->decision_lock);
    server_warn_unset_credentials(p);
    fprintf(stderr, "pep: policy reloaded from %s (policy_hash %s)\n", p->file, p->policy_hash);
out:
    pthread_mutex_unlock(&reload_lock);
    return rc;
}
