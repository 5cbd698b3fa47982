/*
 * main.c — `pep serve | check | version` (SPEC 1): argument parsing and wiring only.
 *
 * serve: load the policy, open the data dir (keys, audit store, registry), bootstrap the
 * admin token on first start, start the forwarder and the listeners, then wait for
 * signals on the main thread (every other thread blocks them): SIGHUP reloads, SIGTERM and
 * SIGINT drain and exit 0.
 */
#include "pep/admin.h"
#include "pep/approvals.h"
#include "pep/breaker.h"
#include "pep/datadir.h"
#include "pep/dispatch.h"
#include "pep/escalations.h"
#include "pep/idempotency.h"
#include "pep/indicators.h"
#include "pep/metrics.h"
#include "pep/pipeline.h"
#include "pep/ratelimit.h"
#include "pep/record.h"
#include "pep/seed.h"
#include "pep/server.h"
#include "pep/util.h"
#include "pep/verifier.h"
#include "pep/webhook.h"

#include <curl/curl.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#define PEP_VERSION "0.2.0"

static void usage(FILE *f) {
    fprintf(f, "usage:\n"
               "  pep serve -c FILE [--data-dir DIR] [--listen HOST:PORT] [--admin-listen "
               "HOST:PORT]\n"
               "  pep check -c FILE\n"
               "  pep version\n");
}

static void print_errors(const struct policy_errors *errs) {
    for (size_t i = 0; i < errs->len; i++)
        fprintf(stderr, "%s\n", errs->items[i]);
}

static int cmd_check(const char *file) {
    struct policy *p = NULL;
    struct policy_errors errs = {0};
    int rc = policy_load(file, &p, &errs);
    if (rc != 0) {
        print_errors(&errs);
        if (errs.len == 0)
            fprintf(stderr, "%s: cannot read the policy file: %s\n", file, strerror(errno));
        policy_errors_free(&errs);
        return 2;
    }
    printf("%s: ok (policy_hash %s, %zu routes, %zu actions, %zu upstreams, %zu agents)\n", file,
           p->policy_hash, p->routes_len, p->actions_len, p->upstreams_len, p->agents_len);
    policy_release(p);
    return 0;
}

static int cmd_version(void) {
    printf("pep %s\n", PEP_VERSION);
    printf("libmicrohttpd %s\n", MHD_get_version());
    printf("libjwt %s\n", PEP_LIBJWT_VERSION);
    printf("jansson %s\n", JANSSON_VERSION);
    printf("sqlite %s\n", sqlite3_libversion());
    printf("libyaml %s\n", yaml_get_version_string());
    printf("%s\n", curl_version());
    printf("%s\n", OpenSSL_version(OPENSSL_VERSION));
    return 0;
}

/* How long webhook deliveries still pending at shutdown are given to finish. */
#define WEBHOOK_STOP_GRACE_MS 2000
#define HOUSEKEEPING_TICK_S 1
/* Stored idempotent results past their 24 h are deleted this often (with a record). */
#define IDEMPOTENCY_EXPIRY_EVERY_US (10LL * 60 * 1000000)

/* ---- serve ------------------------------------------------------------------------------- */

static char *checkpoint_sign(void *arg, int64_t seq, const uint8_t hash[32]) {
    struct server *s = arg;
    return keys_sign_checkpoint(s->keys, seq, hash, pep_now_us() / 1000000);
}

static int make_dir(const char *path, struct pep_err *err) {
    if (mkdir(path, 0700) == 0 || errno == EEXIST) return 0;
    return pep_err_set(err, PEP_EIO, "cannot create %s: %s", path, strerror(errno));
}

/* pep_breaker_state's samples: each upstream's breaker state at render time. */
struct gauge_emit {
    metrics_breaker_emit_fn emit;
    void *ctx;
};

static void gauge_one(void *arg, const char *name, enum breaker_state_kind state, bool configured) {
    (void)configured;
    struct gauge_emit *g = arg;
    g->emit(g->ctx, name, (int)state);
}

static void breaker_gauge_source(void *arg, metrics_breaker_emit_fn emit, void *ctx) {
    struct server *s = arg;
    struct gauge_emit g = {emit, ctx};
    breakers_foreach(s->breakers, pep_mono_us() / 1000, gauge_one, &g);
}

/* Opens everything the listeners need.  Returns 0 or a negative code with err filled. */
static int server_open(struct server *s, struct pep_err *err) {
    int rc = make_dir(s->data_dir, err);
    if (rc == 0) rc = keys_load_or_create(s->data_dir, &s->keys, err);
    if (rc == 0) {
        s->verifier = token_verifier_new(0);
        s->registry = registry_new();
        s->approvals = approval_store_new();
        s->ratelimiter = ratelimiter_new(0);
        s->escalations = escalation_store_new(0, 0);
        s->metrics = metrics_new();
        s->indicators = indicators_new();
        s->breakers = breakers_new(dispatch_breaker_transition, s);
        if (!s->verifier || !s->registry || !s->approvals || !s->ratelimiter || !s->escalations ||
            !s->metrics || !s->indicators || !s->breakers)
            rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
    }
    if (rc == 0 && server_sync_state(s, s->policy) != 0)
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
    if (rc == 0) metrics_set_breaker_source(s->metrics, breaker_gauge_source, s);
    char *schema = NULL;
    if (rc == 0 && asprintf(&schema, "%s\n%s\n%s\n%s\n%s", registry_schema_sql(), APPROVALS_SCHEMA,
                            IDEMPOTENCY_SCHEMA, ESCALATIONS_SCHEMA, KEYS_SCHEMA) < 0) {
        schema = NULL;
        rc = pep_err_set(err, PEP_ENOMEM, "out of memory");
    }
    if (rc == 0) {
        struct audit_options opt = {
            .durability_full = s->policy->durability == AUDIT_DURABILITY_FULL,
            .schema_extra = schema,
            .checkpoint_every = s->policy->checkpoint_every,
            .checkpoint_sign = checkpoint_sign,
            .checkpoint_arg = s,
            .batch_observe = metrics_audit_batch,
            .batch_observe_arg = s->metrics,
        };
        rc = audit_open(s->db_path, &opt, &s->audit, err);
    }
    free(schema);
    if (rc == 0) {
        sqlite3 *db = NULL;
        rc = audit_open_reader(s->db_path, &db, err);
        if (rc == 0) rc = registry_load(s->registry, db, err);
        if (rc == 0) rc = keys_sql_load(s->keys, db, err); /* what rotations did */
        if (rc == 0) rc = approval_store_load(s->approvals, db, pep_now_us(), err);
        if (rc == 0) rc = escalation_store_load(s->escalations, db, pep_now_us(), err);
        sqlite3_close(db);
    }
    if (rc == 0) rc = idem_open(s->db_path, &s->idempotency, err);
    if (rc == 0) rc = webhook_start(NULL, &s->webhooks, err);
    if (rc == 0 && server_seed_agents(s, s->policy) != 0)
        rc = pep_err_set(err, PEP_EDB, "cannot seed the policy's agents");
    if (rc == 0) rc = server_bootstrap_admin(s, err);
    if (rc == 0) rc = forwarder_start(&s->forwarder, err);
    if (rc == 0) rc = verifier_start(s, &s->audit_verifier, err); /* audit/verify walks */
    return rc;
}

static void server_close(struct server *s) {
    verifier_cancel_all(s->audit_verifier); /* resumes its requests: stop_listeners waits */
    server_stop_listeners(s);
    verifier_stop(s->audit_verifier);
    forwarder_stop(s->forwarder);
    webhook_stop(s->webhooks, WEBHOOK_STOP_GRACE_MS);
    /* Its readers close first: the writer's connection, closing last, folds the WAL into
     * the database file (a read-only connection cannot). */
    idem_close(s->idempotency);
    if (s->audit) audit_close(s->audit);
    approval_store_free(s->approvals);
    ratelimiter_free(s->ratelimiter);
    escalation_store_free(s->escalations);
    breakers_free(s->breakers);
    indicators_free(s->indicators);
    metrics_free(s->metrics);
    token_verifier_free(s->verifier);
    registry_free(s->registry);
    keys_free(s->keys);
    if (s->policy) policy_release(s->policy);
    free(s->data_dir);
    free(s->db_path);
}

static int expire_idempotency(sqlite3 *db, void *arg) {
    return idem_apply_expire(db, arg);
}

/* Memory that only time frees: idempotent results surely committed, approvals long
 * expired; and, every IDEMPOTENCY_EXPIRY_EVERY_US, the stored results past their 24 h,
 * deleted by the writer with a system record saying up to when. */
static void housekeeping(struct server *s, int64_t *next_expiry_us) {
    int64_t now = pep_now_us();
    idem_sweep(s->idempotency, now);
    if (now < *next_expiry_us) return;
    *next_expiry_us = now + IDEMPOTENCY_EXPIRY_EVERY_US;
    approval_store_prune(s->approvals, now);
    escalation_store_prune(s->escalations, now);
    static int64_t before_us; /* the apply reads it on the writer: one expiry in flight */
    before_us = now;
    json_t *rec = server_record("system", NULL);
    char before[32];
    pep_format_rfc3339_us(now, before);
    json_object_set_new(rec, "action", json_string("idempotency.expire"));
    json_object_set_new(rec, "before", json_string(before));
    if (audit_submit(s->audit, rec, expire_idempotency, &before_us, NULL, NULL) != 0)
        fprintf(stderr, "pep: idempotency: the expiry of old results could not be queued\n");
}

static void audit_system(struct server *s, const char *action, const char *reason) {
    json_t *rec = server_record("system", NULL);
    json_object_set_new(rec, "action", json_string(action));
    json_object_set_new(rec, "reason", json_string(reason));
    json_object_set_new(rec, "policy_hash", json_string(s->policy->policy_hash));
    /* Nobody waits for it: pep started or is stopping whether or not the store can write
     * now, so the record is held through a write failure (SPEC 6.5), not failed. */
    if (audit_submit(s->audit, rec, NULL, NULL, NULL, NULL) != 0)
        fprintf(stderr, "pep: audit: the %s record could not be queued\n", action);
}

/* Waits until no request is in flight or the deadline passes; true when drained. */
static bool wait_idle(struct server *s, int64_t deadline_mono_us) {
    while (__atomic_load_n(&s->inflight, __ATOMIC_RELAXED) > 0) {
        if (pep_mono_us() >= deadline_mono_us) return false;
        usleep(10000);
    }
    return true;
}

/* Drains and stops the audit store; false when the store lost something on the way (a
 * record, the final checkpoint): the exit status says so. */
static bool drain(struct server *s) {
    __atomic_store_n(&s->draining, 1, __ATOMIC_RELAXED);
    MHD_socket fd = MHD_quiesce_daemon(s->data_daemon);
    if (fd != MHD_INVALID_SOCKET) close(fd);
    fd = MHD_quiesce_daemon(s->admin_daemon);
    if (fd != MHD_INVALID_SOCKET) close(fd);
    int64_t deadline = pep_mono_us() + s->policy->drain_timeout_ms * 1000;
    if (!wait_idle(s, deadline)) {
        fprintf(stderr, "pep: drain timeout: cancelling upstream calls still in flight\n");
        forwarder_cancel_all(s->forwarder);
        verifier_cancel_all(s->audit_verifier); /* audit verifications still running */
        wait_idle(s, pep_mono_us() + 5000000);
    }
    verifier_cancel_all(s->audit_verifier); /* one asked for after the drain: no new walk */
    server_stop_listeners(s);
    audit_system(s, "stop", "pep stopped (drained)");
    bool audited = audit_shutdown(s->audit) == 0;
    if (!audited)
        fprintf(stderr, "pep: audit: the stop record or the final checkpoint could not be "
                        "written; exiting with status 1\n");
    struct audit_stats st;
    audit_get_stats(s->audit, &st);
    if (st.batches > 0)
        fprintf(stderr,
                "pep: audit: %lld records in %lld batches (%.1f per batch), %lld us per commit, "
                "%lld failed\n",
                (long long)st.records_written, (long long)st.batches,
                (double)st.records_written / (double)st.batches,
                (long long)(st.commit_us_total / st.batches), (long long)st.failures);
    return audited;
}

static int cmd_serve(const char *file, const char *data_dir, const char *listen,
                     const char *admin_listen) {
    struct server s = {.policy_path = (char *)file,
                       .listen_override = listen,
                       .admin_listen_override = admin_listen,
                       .data_dir_override = data_dir};
    pthread_mutex_init(&s.policy_lock, NULL);
    server_init_decision_lock(&s);
    struct policy_errors errs = {0};
    if (policy_load(file, &s.policy, &errs) != 0) {
        print_errors(&errs);
        if (errs.len == 0)
            fprintf(stderr, "%s: cannot read the policy file: %s\n", file, strerror(errno));
        policy_errors_free(&errs);
        return 2;
    }
    s.policy_loaded_at_us = pep_now_us();
    server_warn_unset_credentials(s.policy);
    s.data_dir = strdup(data_dir ? data_dir : s.policy->data_dir);
    s.db_path = malloc(strlen(s.data_dir) + 8);
    if (!s.data_dir || !s.db_path) return 1;
    sprintf(s.db_path, "%s/pep.db", s.data_dir);

    /* Every thread started from here inherits this mask; only the main thread takes the
     * signals, with sigwait. SIGPIPE: a client gone mid-answer; SIGXFSZ: a file-size
     * limit hit by the audit store must fail the write (fail closed), not kill pep. */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    curl_global_init(CURL_GLOBAL_DEFAULT);

    /* SPEC 1: one pep per data dir, and nothing read or written in it before that is
     * settled; every file pep (or SQLite for it) creates is 0600. */
    umask(077);
    struct pep_err err = {0};
    int lock_fd = -1;
    char missing_triggers[256] = "";
    int rc = datadir_lock(s.data_dir, &lock_fd, &err);
    if (rc == 0) rc = datadir_check(s.data_dir, s.db_path, missing_triggers, &err);
    if (rc != 0) {
        fprintf(stderr, "pep: %s\n", err.msg);
        if (lock_fd >= 0) close(lock_fd);
        return 1;
    }
    /* Someone dropped the triggers that keep the tables append-only: the store was tampered
     * with.  They come back (the schema creates them), and that is said, here and in a
     * record once the store is open. */
    char tampered[400] = "";
    if (missing_triggers[0]) {
        snprintf(tampered, sizeof tampered,
                 "the store's append-only triggers were missing (%s): tampered with; recreated",
                 missing_triggers);
        fprintf(stderr, "pep: audit: %s\n", tampered);
    }
    rc = server_open(&s, &err);
    if (rc == 0) rc = server_start_listeners(&s, &pipeline_handlers, &admin_handlers, &err);
    if (rc != 0) {
        fprintf(stderr, "pep: %s\n", err.msg[0] ? err.msg : pep_strerror(rc));
        server_close(&s);
        return 1;
    }
    audit_system(&s, "start", "pep started");
    if (missing_triggers[0]) /* said on stderr before the listeners started */
        audit_system(&s, "audit.tampered", tampered);
    fprintf(stderr, "pep: serving policy %s (policy_hash %s), data in %s\n", file,
            s.policy->policy_hash, s.data_dir);

    int64_t next_expiry_us = 0;
    for (;;) {
        /* The main thread waits for signals and, between them, keeps house. */
        struct timespec tick = {.tv_sec = HOUSEKEEPING_TICK_S};
        int sig = sigtimedwait(&set, NULL, &tick);
        if (sig < 0) {
            housekeeping(&s, &next_expiry_us);
            continue;
        }
        if (sig == SIGHUP) {
            struct policy_errors rerrs = {0};
            if (server_reload(&s, NULL, NULL, &rerrs) != 0) {
                fprintf(stderr, "pep: reload refused, the active policy is kept:\n");
                print_errors(&rerrs);
            }
            policy_errors_free(&rerrs);
            continue;
        }
        fprintf(stderr, "pep: %s received, draining\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        break;
    }
    bool clean = drain(&s);
    server_close(&s);
    curl_global_cleanup();
    close(lock_fd);
    return clean ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1], *file = NULL, *data_dir = NULL, *listen = NULL, *admin_listen = NULL;
    bool check = strcmp(cmd, "check") == 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = NULL;
        if (strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0)
            slot = &file;
        else if (strcmp(a, "--data-dir") == 0)
            slot = &data_dir;
        else if (strcmp(a, "--listen") == 0)
            slot = &listen;
        else if (strcmp(a, "--admin-listen") == 0)
            slot = &admin_listen;
        /* `check` validates the file alone (SPEC 1: `pep check -c FILE`): a serve flag
         * given to it would be silently ignored, so the check would vouch for a command
         * line it never looked at. */
        if (check && slot && slot != &file) {
            fprintf(stderr, "pep: check takes only -c FILE; %s is an option of serve\n", a);
            usage(stderr);
            return 2;
        }
        if (!slot || i + 1 >= argc) {
            fprintf(stderr, "pep: %s: %s\n", slot ? "missing value for" : "unknown option", a);
            usage(stderr);
            return 2;
        }
        *slot = argv[++i];
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) return cmd_version();
    if ((strcmp(cmd, "check") == 0 || strcmp(cmd, "serve") == 0) && !file) {
        fprintf(stderr, "pep: %s needs -c FILE\n", cmd);
        return 2;
    }
    if (strcmp(cmd, "check") == 0) return cmd_check(file);
    if (strcmp(cmd, "serve") == 0) return cmd_serve(file, data_dir, listen, admin_listen);
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "pep: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
