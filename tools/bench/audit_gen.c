/*
 * audit_gen.c — fills an audit store with generated records, fast, for the audit benchmark
 * (tools/bench/audit_bench.sh): `audit_gen DB N [AGENTS] [DAYS]`.
 *
 * The records go through the real writer (audit_open, audit_submit), so the chain is
 * pep's own and verifies; they look like a data plane's: for each request a decision record
 * and, when allowed (9 in 10), an outcome record with one attempt, the fields and sizes of
 * what pep writes (policy_hash, reason, path, attempts …).  AGENTS agents (default 50) over
 * 5 tenants; timestamps spread evenly over DAYS days (default 30) from the ts of the store's
 * last record (now for an empty store), so that they follow the seqs as a real log's do.
 * DB is normally the pep.db of a data dir pep created (stopped): the chain continues from
 * its head, and pep serves the result.  The last line printed is
 * "span FIRST_TS LAST_TS" (RFC 3339), for the benchmark's time filters.
 *
 * Submitting does not wait for each record (fire-and-forget items, durability normal,
 * large batches); it pauses while the writer's queue is long, so memory stays bounded.
 *
 * Threads: main, and the store's writer.
 */
#include "audit/audit.h"
#include "pep/util.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GEN_MAX_QUEUED 50000

static json_t *gen_decision(int64_t ts_us, const char *agent, const char *tenant,
                            const char *request_id, bool allow) {
    char ts[32];
    pep_format_rfc3339_us(ts_us, ts);
    return json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "ts", ts, "kind",
        "decision", "request_id", request_id, "agent", agent, "tenant", tenant, "action",
        "llm.chat", "method", "POST", "path", "/v1/chat/completions", "decision",
        allow ? "allow" : "deny", "code", allow ? "ok" : "insufficient_scope", "reason",
        allow ? "allowed by scope llm.chat" : "agent lacks scope llm.chat", "policy_hash",
        "35c29cedb2b61cab4c624432dd4106d7fa6c6d0bcb94805d28a551b54e06c819");
}

static json_t *gen_outcome(int64_t ts_us, const char *agent, const char *tenant,
                           const char *request_id, int ms) {
    char ts[32];
    pep_format_rfc3339_us(ts_us, ts);
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:i, s:s, s:s, s:i, s:I,"
                     " s:[{s:s, s:s, s:i, s:i}]}",
                     "ts", ts, "kind", "outcome", "request_id", request_id, "agent", agent,
                     "tenant", tenant, "action", "llm.chat", "code", "ok", "status", 200,
                     "upstream", "mock", "model", "gpt-4o-mini", "fallback_step", 0, "latency_us",
                     (json_int_t)ms * 1000 + 180, "attempts", "upstream", "mock", "model",
                     "gpt-4o-mini", "status", 200, "ms", ms);
}

/* The ts of the store's last record (us), or now when there is none. */
static int64_t gen_last_ts(const char *path) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int64_t ts = pep_now_us();
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db,
                           "SELECT json_extract(record, '$.ts') FROM audit ORDER BY seq DESC"
                           " LIMIT 1",
                           -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
        pep_parse_rfc3339((const char *)sqlite3_column_text(st, 0), &ts);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return ts;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: audit_gen DB N [AGENTS] [DAYS]\n");
        return 2;
    }
    const char *path = argv[1];
    long long n = atoll(argv[2]);
    int agents = argc > 3 ? atoi(argv[3]) : 50;
    int days = argc > 4 ? atoi(argv[4]) : 30;
    if (n <= 0 || agents <= 0 || days <= 0) {
        fprintf(stderr, "audit_gen: N, AGENTS and DAYS must be positive\n");
        return 2;
    }
    int64_t start = gen_last_ts(path) + 1000;
    struct audit_options opt = {.durability_full = false, .max_batch = 4096, .linger_us = -1};
    struct audit_store *s = NULL;
    struct pep_err err = {0};
    int64_t t0 = pep_mono_us();
    if (audit_open(path, &opt, &s, &err) != 0) {
        fprintf(stderr, "audit_gen: %s\n", err.msg);
        return 1;
    }
    int64_t opened_us = pep_mono_us() - t0;
    int64_t span = (int64_t)days * 86400 * 1000000;
    int64_t step = span / n;
    int64_t ts = start;
    long long written = 0;
    unsigned seed = 12345;
    t0 = pep_mono_us();
    while (written < n) {
        char agent[32], tenant[32], request_id[27];
        seed = seed * 1103515245u + 12345u;
        snprintf(agent, sizeof agent, "agent-%03u", (seed >> 8) % (unsigned)agents);
        snprintf(tenant, sizeof tenant, "tenant-%u", (seed >> 8) % (unsigned)agents % 5);
        pep_request_id(request_id);
        bool allow = (seed >> 20) % 10 != 0;
        int rc = audit_submit(s, gen_decision(ts, agent, tenant, request_id, allow), NULL, NULL,
                              NULL, NULL);
        written++;
        ts += step;
        if (rc == 0 && allow && written < n) {
            rc = audit_submit(s, gen_outcome(ts, agent, tenant, request_id, 5 + (int)(seed % 400)),
                              NULL, NULL, NULL, NULL);
            written++;
            ts += step;
        }
        if (rc != 0) {
            fprintf(stderr, "audit_gen: submit: %s\n", pep_strerror(rc));
            audit_close(s);
            return 1;
        }
        if (written % 4096 == 0) {
            struct audit_stats st;
            for (audit_get_stats(s, &st); st.queued > GEN_MAX_QUEUED; audit_get_stats(s, &st))
                usleep(1000);
        }
    }
    if (audit_shutdown(s) != 0) {
        fprintf(stderr, "audit_gen: the writer could not write everything\n");
        audit_close(s);
        return 1;
    }
    int64_t head = audit_head_seq(s);
    audit_close(s);
    double secs = (double)(pep_mono_us() - t0) / 1e6;
    char first[32], last[32];
    pep_format_rfc3339_us(start, first);
    pep_format_rfc3339_us(ts - step, last);
    printf("generated %lld records in %.1f s (%.0f records/s); head seq %lld; opening the store "
           "took %.2f s\nspan %s %s\n",
           written, secs, (double)written / secs, (long long)head, (double)opened_us / 1e6, first,
           last);
    return 0;
}
