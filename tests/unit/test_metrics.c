/*
 * test_metrics.c — pep/metrics.c read back through a small Prometheus text-format parser
 * written here: every family with its exact name, type and label keys, histograms
 * cumulative with _count equal to the +Inf bucket, counts (also from 8 threads while the
 * registry grows), `other` for names and codes sync never registered, escaping.
 */
#include "pep/metrics.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

/* ---- a text format 0.0.4 parser (what this test needs of it) ---------------------------- */

#define MAX_LABELS 4

struct sample {
    char name[96];
    char family[96]; /* the # TYPE it falls under */
    size_t nlabels;
    char keys[MAX_LABELS][32];
    char values[MAX_LABELS][256]; /* unescaped */
    double value;
};

struct family {
    char name[96];
    char type[16];
    bool help;
};

struct parsed {
    struct sample *samples;
    size_t len;
    struct family families[32];
    size_t nfamilies;
};

static bool is_name_char(char c, bool first) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
           (!first && c >= '0' && c <= '9');
}

/* Reads a metric or label name at *p into out. */
static void parse_name(const char **p, char *out, size_t size) {
    size_t n = 0;
    assert_true(is_name_char(**p, true));
    while (is_name_char(**p, n == 0)) {
        assert_true(n + 1 < size);
        out[n++] = *(*p)++;
    }
    out[n] = '\0';
}

/* A sample's name belongs to its family: itself, or a histogram's _bucket, _sum, _count. */
static bool belongs(const char *name, const struct family *f) {
    size_t n = strlen(f->name);
    if (strncmp(name, f->name, n) != 0) return false;
    if (name[n] == '\0') return strcmp(f->type, "histogram") != 0;
    return strcmp(f->type, "histogram") == 0 &&
           (strcmp(name + n, "_bucket") == 0 || strcmp(name + n, "_sum") == 0 ||
            strcmp(name + n, "_count") == 0);
}

static void parse_sample(const char *line, const struct family *f, struct sample *s) {
    const char *p = line;
    memset(s, 0, sizeof *s);
    parse_name(&p, s->name, sizeof s->name);
    assert_non_null(f);
    if (!belongs(s->name, f)) fail_msg("sample %s outside its family %s", s->name, f->name);
    snprintf(s->family, sizeof s->family, "%s", f->name);
    if (*p == '{') {
        p++;
        while (*p != '}') {
            assert_true(s->nlabels < MAX_LABELS);
            parse_name(&p, s->keys[s->nlabels], sizeof s->keys[0]);
            for (size_t i = 0; i < s->nlabels; i++)
                assert_string_not_equal(s->keys[i], s->keys[s->nlabels]);
            assert_true(*p++ == '=');
            assert_true(*p++ == '"');
            char *v = s->values[s->nlabels];
            size_t n = 0;
            while (*p != '"') {
                assert_true(*p != '\0' && *p != '\n' && n + 1 < sizeof s->values[0]);
                if (*p == '\\') {
                    p++;
                    if (*p == 'n')
                        v[n++] = '\n';
                    else if (*p == '\\' || *p == '"')
                        v[n++] = *p;
                    else
                        fail_msg("bad escape \\%c in %s", *p, line);
                    p++;
                } else {
                    v[n++] = *p++;
                }
            }
            v[n] = '\0';
            p++;
            s->nlabels++;
            if (*p == ',') p++;
        }
        p++;
    }
    assert_true(*p++ == ' ');
    char *end;
    s->value = strtod(p, &end);
    assert_true(end != p && *end == '\0');
}

/* Parses a whole exposition; fails the test on any line that is not well formed. */
static void parse(const char *text, struct parsed *out) {
    memset(out, 0, sizeof *out);
    size_t cap = 0;
    const struct family *current = NULL;
    assert_true(strlen(text) > 0 && text[strlen(text) - 1] == '\n');
    for (const char *line = text; *line;) {
        const char *nl = strchr(line, '\n');
        assert_non_null(nl);
        char buf[1024];
        assert_true((size_t)(nl - line) < sizeof buf);
        memcpy(buf, line, (size_t)(nl - line));
        buf[nl - line] = '\0';
        line = nl + 1;
        if (strncmp(buf, "# HELP ", 7) == 0) {
            assert_true(out->nfamilies < PEP_ARRAY_LEN(out->families));
            struct family *f = &out->families[out->nfamilies];
            const char *p = buf + 7;
            parse_name(&p, f->name, sizeof f->name);
            assert_true(*p == ' ' && p[1] != '\0');
            for (size_t i = 0; i < out->nfamilies; i++)
                assert_string_not_equal(out->families[i].name, f->name);
            f->help = true;
        } else if (strncmp(buf, "# TYPE ", 7) == 0) {
            struct family *f = &out->families[out->nfamilies];
            char name[96];
            const char *p = buf + 7;
            parse_name(&p, name, sizeof name);
            assert_true(f->help); /* HELP comes first */
            assert_string_equal(name, f->name);
            assert_true(*p++ == ' ');
            assert_true(strcmp(p, "counter") == 0 || strcmp(p, "gauge") == 0 ||
                        strcmp(p, "histogram") == 0);
            snprintf(f->type, sizeof f->type, "%s", p);
            current = &out->families[out->nfamilies++];
        } else {
            assert_true(buf[0] != '#' && buf[0] != '\0');
            if (out->len == cap) {
                cap = cap ? cap * 2 : 64;
                out->samples = realloc(out->samples, cap * sizeof *out->samples);
                assert_non_null(out->samples);
            }
            parse_sample(buf, current, &out->samples[out->len++]);
        }
    }
}

static const char *label(const struct sample *s, const char *key) {
    for (size_t i = 0; i < s->nlabels; i++)
        if (strcmp(s->keys[i], key) == 0) return s->values[i];
    return NULL;
}

/* The sample name{labels} where labels is "k=v,k=v" (values without ',' or '='), or NULL. */
static const struct sample *find(const struct parsed *ps, const char *name, const char *labels) {
    for (size_t i = 0; i < ps->len; i++) {
        const struct sample *s = &ps->samples[i];
        if (strcmp(s->name, name) != 0) continue;
        size_t n = 0;
        bool match = true;
        char want[256];
        snprintf(want, sizeof want, "%s", labels);
        for (char *save = NULL, *kv = strtok_r(want, ",", &save); kv && match;
             kv = strtok_r(NULL, ",", &save), n++) {
            char *eq = strchr(kv, '=');
            *eq = '\0';
            const char *v = label(s, kv);
            match = v && strcmp(v, eq + 1) == 0;
        }
        if (match && n == s->nlabels) return s;
    }
    return NULL;
}

static double value(const struct parsed *ps, const char *name, const char *labels) {
    const struct sample *s = find(ps, name, labels);
    if (!s) fail_msg("no sample %s{%s}", name, labels);
    return s->value;
}

static void render(struct metrics *m, struct parsed *ps) {
    size_t len = 0;
    char *text = metrics_render(m, &len);
    assert_non_null(text);
    assert_int_equal(len, strlen(text));
    parse(text, ps);
    free(text);
}

/* ---- a policy holding only what metrics_sync reads ------------------------------------- */

struct names {
    struct policy p;
    struct action actions[8];
    struct upstream upstreams[8];
    struct chain chains[8];
};

static void names_set(struct names *n, const char *const *actions, const char *const *upstreams,
                      const char *const *chains) {
    memset(n, 0, sizeof *n);
    n->p.actions = n->actions;
    n->p.upstreams = n->upstreams;
    n->p.chains = n->chains;
    for (; actions && *actions; actions++)
        n->actions[n->p.actions_len++].name = (char *)*actions;
    for (; upstreams && *upstreams; upstreams++)
        n->upstreams[n->p.upstreams_len++].name = (char *)*upstreams;
    for (; chains && *chains; chains++)
        n->chains[n->p.chains_len++].name = (char *)*chains;
}

static struct metrics *metrics_with(const char *const *actions, const char *const *upstreams,
                                    const char *const *chains) {
    struct names n;
    names_set(&n, actions, upstreams, chains);
    struct metrics *m = metrics_new();
    assert_non_null(m);
    assert_int_equal(metrics_sync(m, &n.p), 0);
    return m;
}

static const char *const ACTIONS[] = {"llm.chat", "refund.issue", NULL};
static const char *const UPSTREAMS[] = {"openai", "backup", NULL};
static const char *const CHAINS[] = {"chat", NULL};

/* ---- tests ---------------------------------------------------------------------------- */

struct breaker_fixture {
    const char *names[4];
    int states[4];
    size_t len;
};

static void breaker_foreach(void *arg, metrics_breaker_emit_fn emit, void *ctx) {
    const struct breaker_fixture *f = arg;
    for (size_t i = 0; i < f->len; i++)
        emit(ctx, f->names[i], f->states[i]);
}

/* Every SPEC 7 family, with its type and the exact label keys of its samples. */
static void test_families(void **state) {
    (void)state;
    static const struct {
        const char *name, *type, *labels; /* labels: keys joined by ',' ("" none) */
    } want[] = {
        {"pep_requests_total", "counter", "action,decision,code"},
        {"pep_decision_duration_seconds", "histogram", ""},
        {"pep_upstream_attempts_total", "counter", "upstream,outcome"},
        {"pep_retries_total", "counter", "upstream"},
        {"pep_fallbacks_total", "counter", "chain,step"},
        {"pep_breaker_state", "gauge", "upstream"},
        {"pep_breaker_transitions_total", "counter", "upstream,to"},
        {"pep_escalations_total", "counter", "chain"},
        {"pep_approvals_total", "counter", "state"},
        {"pep_audit_records_total", "counter", ""},
        {"pep_audit_fsync_duration_seconds", "histogram", ""},
        {"pep_audit_batch_records", "histogram", ""},
    };
    struct metrics *m = metrics_with(ACTIONS, UPSTREAMS, CHAINS);
    struct breaker_fixture bf = {{"openai"}, {1}, 1};
    metrics_set_breaker_source(m, breaker_foreach, &bf);
    metrics_decision(m, "llm.chat", true, "ok", 10);
    metrics_upstream_attempt(m, "openai", METRICS_OUTCOME_2XX);
    metrics_retry(m, "openai");
    metrics_fallback(m, "chat", 1);
    metrics_breaker_transition(m, "openai", METRICS_BREAKER_OPEN);
    metrics_escalation(m, "chat");
    metrics_approval(m, METRICS_APPROVAL_PENDING);
    metrics_audit_batch(m, 3, 700);

    struct parsed ps;
    render(m, &ps);
    assert_int_equal(ps.nfamilies, PEP_ARRAY_LEN(want));
    for (size_t i = 0; i < PEP_ARRAY_LEN(want); i++) {
        assert_string_equal(ps.families[i].name, want[i].name);
        assert_string_equal(ps.families[i].type, want[i].type);
        size_t seen = 0;
        for (size_t j = 0; j < ps.len; j++) {
            const struct sample *s = &ps.samples[j];
            if (strcmp(s->family, want[i].name) != 0) continue;
            seen++;
            char keys[128] = "";
            for (size_t k = 0; k < s->nlabels; k++)
                if (strcmp(s->keys[k], "le") != 0 ||
                    strcmp(s->name + strlen(s->family), "_bucket") != 0) {
                    if (keys[0]) strcat(keys, ",");
                    strcat(keys, s->keys[k]);
                }
            if (strcmp(keys, want[i].labels) != 0)
                fail_msg("%s: labels %s, want %s", s->name, keys, want[i].labels);
        }
        if (seen == 0) fail_msg("family %s has no sample", want[i].name);
    }
    free(ps.samples);
    metrics_free(m);
}

static void test_counts(void **state) {
    (void)state;
    struct metrics *m = metrics_with(ACTIONS, UPSTREAMS, CHAINS);
    for (int i = 0; i < 3; i++)
        metrics_decision(m, "llm.chat", true, "ok", 100);
    metrics_decision(m, "refund.issue", false, "denied_by_rule", 100);
    metrics_decision(m, NULL, false, "no_route", 100);
    metrics_decision(m, "", false, "bad_request", -1); /* no duration observed */
    for (int i = 0; i < 5; i++)
        metrics_upstream_attempt(m, "openai", METRICS_OUTCOME_5XX);
    metrics_upstream_attempt(m, "backup", METRICS_OUTCOME_IDLE_TIMEOUT);
    metrics_upstream_attempt(m, "backup", METRICS_OUTCOME_STREAM_ABORTED);
    metrics_upstream_attempt(m, "backup", metrics_outcome_of_status(302));
    metrics_retry(m, "openai");
    metrics_retry(m, "openai");
    metrics_fallback(m, "chat", 1);
    metrics_fallback(m, "chat", METRICS_STEP_CONTEXT_OVERFLOW);
    metrics_fallback(m, "chat", METRICS_MAX_STEPS - 1);
    metrics_fallback(m, "chat", METRICS_MAX_STEPS); /* beyond the table */
    metrics_breaker_transition(m, "openai", METRICS_BREAKER_OPEN);
    metrics_breaker_transition(m, "openai", METRICS_BREAKER_HALF_OPEN);
    metrics_breaker_transition(m, "openai", METRICS_BREAKER_CLOSED);
    metrics_escalation(m, "chat");
    metrics_approval(m, METRICS_APPROVAL_PENDING);
    metrics_approval(m, METRICS_APPROVAL_PENDING);
    metrics_approval(m, METRICS_APPROVAL_APPROVED);
    metrics_approval(m, METRICS_APPROVAL_USED);
    metrics_audit_batch(m, 4, 120);
    metrics_audit_batch(m, 1, 80);

    struct parsed ps;
    render(m, &ps);
    const char *R = "pep_requests_total";
    assert_true(value(&ps, R, "action=llm.chat,decision=allow,code=ok") == 3);
    assert_true(value(&ps, R, "action=refund.issue,decision=deny,code=denied_by_rule") == 1);
    assert_true(value(&ps, R, "action=none,decision=deny,code=no_route") == 1);
    assert_true(value(&ps, R, "action=none,decision=deny,code=bad_request") == 1);
    assert_null(find(&ps, R, "action=llm.chat,decision=deny,code=ok")); /* zero: absent */
    const char *A = "pep_upstream_attempts_total";
    assert_true(value(&ps, A, "upstream=openai,outcome=5xx") == 5);
    assert_true(value(&ps, A, "upstream=backup,outcome=idle_timeout") == 1);
    assert_true(value(&ps, A, "upstream=backup,outcome=stream_aborted") == 1);
    assert_true(value(&ps, A, "upstream=backup,outcome=3xx") == 1);
    assert_true(value(&ps, "pep_retries_total", "upstream=openai") == 2);
    assert_true(value(&ps, "pep_retries_total", "upstream=backup") == 0); /* present at 0 */
    assert_null(find(&ps, "pep_retries_total", "upstream=other"));
    const char *F = "pep_fallbacks_total";
    assert_true(value(&ps, F, "chain=chat,step=1") == 1);
    assert_true(value(&ps, F, "chain=chat,step=context_overflow") == 1);
    assert_true(value(&ps, F, "chain=chat,step=15") == 1);
    assert_true(value(&ps, F, "chain=chat,step=other") == 1);
    const char *T = "pep_breaker_transitions_total";
    assert_true(value(&ps, T, "upstream=openai,to=open") == 1);
    assert_true(value(&ps, T, "upstream=openai,to=half_open") == 1);
    assert_true(value(&ps, T, "upstream=openai,to=closed") == 1);
    assert_true(value(&ps, T, "upstream=backup,to=open") == 0);
    assert_true(value(&ps, "pep_escalations_total", "chain=chat") == 1);
    assert_true(value(&ps, "pep_approvals_total", "state=pending") == 2);
    assert_true(value(&ps, "pep_approvals_total", "state=approved") == 1);
    assert_true(value(&ps, "pep_approvals_total", "state=denied") == 0);
    assert_true(value(&ps, "pep_approvals_total", "state=used") == 1);
    assert_true(value(&ps, "pep_approvals_total", "state=expired") == 0);
    assert_true(value(&ps, "pep_audit_records_total", "") == 5);
    /* No breaker source: the family is there, without samples. */
    assert_null(find(&ps, "pep_breaker_state", "upstream=openai"));
    free(ps.samples);

    /* metrics_outcome_of_status: classes, and what cannot be relayed. */
    assert_int_equal(metrics_outcome_of_status(200), METRICS_OUTCOME_2XX);
    assert_int_equal(metrics_outcome_of_status(299), METRICS_OUTCOME_2XX);
    assert_int_equal(metrics_outcome_of_status(404), METRICS_OUTCOME_4XX);
    assert_int_equal(metrics_outcome_of_status(599), METRICS_OUTCOME_5XX);
    assert_int_equal(metrics_outcome_of_status(101), METRICS_OUTCOME_CONNECT_ERROR);
    assert_int_equal(metrics_outcome_of_status(600), METRICS_OUTCOME_CONNECT_ERROR);
    metrics_free(m);
}

/* Checks a histogram's samples: buckets ascending in le and cumulative, +Inf last and
 * equal to _count; returns the bucket counts through le_counts (by position). */
static void check_histogram(const struct parsed *ps, const char *name, double *le_counts,
                            size_t *nbuckets, double *sum) {
    char bucket[128], count[128], sumname[128];
    snprintf(bucket, sizeof bucket, "%s_bucket", name);
    snprintf(count, sizeof count, "%s_count", name);
    snprintf(sumname, sizeof sumname, "%s_sum", name);
    double prev_le = -1, prev = 0;
    size_t n = 0;
    bool inf = false;
    for (size_t i = 0; i < ps->len; i++) {
        const struct sample *s = &ps->samples[i];
        if (strcmp(s->name, bucket) != 0) continue;
        assert_false(inf); /* nothing after +Inf */
        const char *le = label(s, "le");
        assert_non_null(le);
        double bound = strcmp(le, "+Inf") == 0 ? (inf = true, 1e300) : strtod(le, NULL);
        assert_true(bound > prev_le);
        assert_true(s->value >= prev);
        prev_le = bound;
        prev = s->value;
        le_counts[n++] = s->value;
    }
    assert_true(inf);
    assert_true(value(ps, count, "") == prev);
    *sum = value(ps, sumname, "");
    *nbuckets = n;
}

static void test_histograms(void **state) {
    (void)state;
    struct metrics *m = metrics_with(ACTIONS, NULL, NULL);
    struct parsed ps;
    double c[32], sum;
    size_t n;

    /* Empty: every bucket 0. */
    render(m, &ps);
    check_histogram(&ps, "pep_decision_duration_seconds", c, &n, &sum);
    assert_int_equal(n, 17); /* 16 bounds, 100 µs … 10 s, and +Inf */
    assert_true(c[16] == 0 && sum == 0);
    assert_string_equal(label(find(&ps, "pep_decision_duration_seconds_bucket", "le=0.0001"), "le"),
                        "0.0001");
    assert_non_null(find(&ps, "pep_decision_duration_seconds_bucket", "le=10"));
    assert_non_null(find(&ps, "pep_audit_fsync_duration_seconds_bucket", "le=0.00005"));
    assert_non_null(find(&ps, "pep_audit_fsync_duration_seconds_bucket", "le=1"));
    assert_non_null(find(&ps, "pep_audit_batch_records_bucket", "le=1"));
    assert_non_null(find(&ps, "pep_audit_batch_records_bucket", "le=1024"));
    free(ps.samples);

    /* le is inclusive: 100 µs is in le=0.0001, 101 µs in the next. */
    metrics_decision(m, "llm.chat", true, "ok", 100);
    metrics_decision(m, "llm.chat", true, "ok", 101);
    metrics_decision(m, "llm.chat", true, "ok", 0);
    metrics_decision(m, "llm.chat", true, "ok", 20000000); /* 20 s: only +Inf */
    metrics_audit_batch(m, 1, 50);
    metrics_audit_batch(m, 1024, 1000000);
    metrics_audit_batch(m, 2000, 2000000);
    render(m, &ps);
    check_histogram(&ps, "pep_decision_duration_seconds", c, &n, &sum);
    assert_true(c[0] == 2 && c[1] == 3 && c[15] == 3 && c[16] == 4);
    assert_true(sum == 20.000201);
    check_histogram(&ps, "pep_audit_fsync_duration_seconds", c, &n, &sum);
    assert_int_equal(n, 15);
    assert_true(c[0] == 1 && c[12] == 1 && c[13] == 2 && c[14] == 3);
    assert_true(sum == 3.00005);
    check_histogram(&ps, "pep_audit_batch_records", c, &n, &sum);
    assert_int_equal(n, 12);
    assert_true(c[0] == 1 && c[9] == 1 && c[10] == 2 && c[11] == 3);
    assert_true(sum == 3025);
    assert_true(value(&ps, "pep_audit_records_total", "") == 3025);
    free(ps.samples);
    metrics_free(m);
}

/* Names sync did not register, and codes outside the table, count as `other`; none of
 * them ever shows up as a label value. */
static void test_unknown_is_other(void **state) {
    (void)state;
    struct metrics *m = metrics_with(ACTIONS, UPSTREAMS, CHAINS);
    metrics_decision(m, "evil\"}\nx", true, "ok", 1);
    metrics_decision(m, "llm.chat", false, "made_up_code", 1);
    metrics_decision(m, "llm.chat", false, NULL, 1);
    metrics_upstream_attempt(m, "attacker.example", METRICS_OUTCOME_2XX);
    metrics_upstream_attempt(m, NULL, METRICS_OUTCOME_2XX);
    metrics_upstream_attempt(m, "openai", METRICS_OUTCOME_COUNT); /* out of range: ignored */
    metrics_retry(m, "nope");
    metrics_breaker_transition(m, "nope", METRICS_BREAKER_OPEN);
    metrics_breaker_transition(m, "openai", METRICS_BREAKER_COUNT); /* ignored */
    metrics_fallback(m, "nope", 0);
    metrics_fallback(m, "chat", -7);
    metrics_escalation(m, "nope");
    metrics_approval(m, METRICS_APPROVAL_COUNT); /* ignored */

    size_t len;
    char *text = metrics_render(m, &len);
    assert_non_null(text);
    assert_null(strstr(text, "evil"));
    assert_null(strstr(text, "attacker"));
    assert_null(strstr(text, "nope"));
    assert_null(strstr(text, "made_up"));
    struct parsed ps;
    parse(text, &ps);
    free(text);
    const char *R = "pep_requests_total";
    assert_true(value(&ps, R, "action=other,decision=allow,code=ok") == 1);
    assert_true(value(&ps, R, "action=llm.chat,decision=deny,code=other") == 2);
    assert_true(value(&ps, "pep_upstream_attempts_total", "upstream=other,outcome=2xx") == 2);
    assert_null(find(&ps, "pep_upstream_attempts_total", "upstream=openai,outcome=2xx"));
    assert_true(value(&ps, "pep_retries_total", "upstream=other") == 1);
    assert_true(value(&ps, "pep_breaker_transitions_total", "upstream=other,to=open") == 1);
    assert_true(value(&ps, "pep_breaker_transitions_total", "upstream=openai,to=open") == 0);
    assert_true(value(&ps, "pep_fallbacks_total", "chain=other,step=0") == 1);
    assert_true(value(&ps, "pep_fallbacks_total", "chain=chat,step=other") == 1);
    assert_true(value(&ps, "pep_escalations_total", "chain=other") == 1);
    for (size_t i = 0; i < ps.len; i++)
        if (strcmp(ps.samples[i].name, "pep_approvals_total") == 0)
            assert_true(ps.samples[i].value == 0);
    free(ps.samples);
    metrics_free(m);
}

/* A policy name `other` (or action `none`) is not a second series of that label set. */
static void test_reserved_names(void **state) {
    (void)state;
    static const char *const actions[] = {"other", "none", NULL};
    static const char *const ups[] = {"other", NULL};
    struct metrics *m = metrics_with(actions, ups, NULL);
    metrics_decision(m, "other", true, "ok", 1);
    metrics_decision(m, "none", true, "ok", 1);
    metrics_decision(m, "unknown", true, "ok", 1);
    metrics_decision(m, NULL, true, "ok", 1);
    metrics_retry(m, "other");
    struct parsed ps;
    render(m, &ps);
    const char *R = "pep_requests_total";
    assert_true(value(&ps, R, "action=other,decision=allow,code=ok") == 3);
    assert_true(value(&ps, R, "action=none,decision=allow,code=ok") == 1);
    size_t retries = 0;
    for (size_t i = 0; i < ps.len; i++)
        retries += strcmp(ps.samples[i].name, "pep_retries_total") == 0;
    assert_int_equal(retries, 1);
    assert_true(value(&ps, "pep_retries_total", "upstream=other") == 1);
    free(ps.samples);
    metrics_free(m);
}

static void test_escaping(void **state) {
    (void)state;
    static const char *const ups[] = {"a\\b\"c\nd", NULL};
    struct metrics *m = metrics_with(NULL, ups, NULL);
    metrics_retry(m, "a\\b\"c\nd");
    size_t len;
    char *text = metrics_render(m, &len);
    assert_non_null(text);
    assert_non_null(strstr(text, "pep_retries_total{upstream=\"a\\\\b\\\"c\\nd\"} 1\n"));
    struct parsed ps;
    parse(text, &ps);
    free(text);
    const struct sample *s = NULL;
    for (size_t i = 0; i < ps.len && !s; i++)
        if (strcmp(ps.samples[i].name, "pep_retries_total") == 0) s = &ps.samples[i];
    assert_non_null(s);
    assert_string_equal(label(s, "upstream"), "a\\b\"c\nd");
    assert_true(s->value == 1);
    free(ps.samples);
    metrics_free(m);
}

static void test_breaker_state(void **state) {
    (void)state;
    struct metrics *m = metrics_with(NULL, UPSTREAMS, NULL);
    /* Emitted out of order, with a name sync never saw, a bad state and a duplicate. */
    struct breaker_fixture bf = {{"openai", "ghost", "backup", "openai"}, {2, 1, 0, 1}, 4};
    metrics_set_breaker_source(m, breaker_foreach, &bf);
    size_t len;
    char *text = metrics_render(m, &len);
    assert_non_null(text);
    assert_non_null(strstr(text, "# TYPE pep_breaker_state gauge\n"
                                 "pep_breaker_state{upstream=\"backup\"} 0\n"
                                 "pep_breaker_state{upstream=\"openai\"} "));
    assert_null(strstr(text, "ghost"));
    struct parsed ps;
    parse(text, &ps);
    size_t gauges = 0;
    for (size_t i = 0; i < ps.len; i++)
        gauges += strcmp(ps.samples[i].name, "pep_breaker_state") == 0;
    assert_int_equal(gauges, 2); /* one openai */
    free(ps.samples);
    free(text);
    bf.states[0] = 7; /* out of range: left out */
    bf.len = 1;
    render(m, &ps);
    assert_null(find(&ps, "pep_breaker_state", "upstream=openai"));
    free(ps.samples);
    metrics_set_breaker_source(m, NULL, NULL);
    metrics_free(m);
}

/* Reload: a removed name keeps its series and counts, a new one appears only once
 * synced; the table grows past its first size with every name still found. */
static void test_sync_and_growth(void **state) {
    (void)state;
    static const char *const before[] = {"a", "b", NULL};
    static const char *const after[] = {"b", "c", NULL};
    struct metrics *m = metrics_with(NULL, before, NULL);
    metrics_retry(m, "a");
    metrics_retry(m, "c"); /* not registered yet */
    struct names n;
    names_set(&n, NULL, after, NULL);
    assert_int_equal(metrics_sync(m, &n.p), 0);
    metrics_retry(m, "c");
    metrics_retry(m, "a");
    struct parsed ps;
    render(m, &ps);
    assert_true(value(&ps, "pep_retries_total", "upstream=a") == 2);
    assert_true(value(&ps, "pep_retries_total", "upstream=b") == 0);
    assert_true(value(&ps, "pep_retries_total", "upstream=c") == 1);
    assert_true(value(&ps, "pep_retries_total", "upstream=other") == 1);
    free(ps.samples);

    /* 1000 names, one sync each (as many reloads), each counted once under its own name. */
    char names[1000][16];
    for (int i = 0; i < 1000; i++) {
        snprintf(names[i], sizeof names[i], "u%03d", i);
        const char *one[] = {names[i], NULL};
        names_set(&n, NULL, one, NULL);
        assert_int_equal(metrics_sync(m, &n.p), 0);
    }
    for (int i = 0; i < 1000; i++)
        metrics_retry(m, names[i]);
    render(m, &ps);
    for (int i = 0; i < 1000; i++) {
        char want[32];
        snprintf(want, sizeof want, "upstream=%.15s", names[i]);
        assert_true(value(&ps, "pep_retries_total", want) == 1);
    }
    assert_true(value(&ps, "pep_retries_total", "upstream=other") == 1);
    /* Sorted: a, b, c, other, u000 … */
    const char *prev = "";
    for (size_t i = 0; i < ps.len; i++)
        if (strcmp(ps.samples[i].name, "pep_retries_total") == 0) {
            const char *v = label(&ps.samples[i], "upstream");
            assert_true(strcmp(prev, v) < 0);
            prev = v;
        }
    free(ps.samples);

    /* Deterministic: the same state renders the same bytes. */
    char *one = metrics_render(m, NULL), *two = metrics_render(m, NULL);
    assert_string_equal(one, two);
    free(one);
    free(two);
    metrics_free(m);
}

/* 8 threads count while another registers names (growing the tables) and renders. */
#define THREADS 8
#define ROUNDS 20000

struct worker {
    struct metrics *m;
    pthread_t thread;
};

static void *count_worker(void *arg) {
    struct metrics *m = arg;
    for (int i = 0; i < ROUNDS; i++) {
        metrics_decision(m, "llm.chat", true, "ok", 150);
        metrics_decision(m, (i & 1) ? "refund.issue" : "unknown", false, "rate_limited", -1);
        metrics_upstream_attempt(m, "openai", METRICS_OUTCOME_2XX);
        metrics_retry(m, "backup");
        metrics_fallback(m, "chat", 1);
        metrics_escalation(m, "chat");
        metrics_approval(m, METRICS_APPROVAL_USED);
        metrics_audit_batch(m, 2, 60);
    }
    return NULL;
}

static void *sync_worker(void *arg) {
    struct metrics *m = arg;
    char names[200][16];
    for (int i = 0; i < 200; i++) {
        snprintf(names[i], sizeof names[i], "x%03d", i);
        const char *one[] = {names[i], NULL};
        struct names n;
        names_set(&n, one, one, one);
        assert_int_equal(metrics_sync(m, &n.p), 0);
        if (i % 20 == 0) free(metrics_render(m, NULL));
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    struct metrics *m = metrics_with(ACTIONS, UPSTREAMS, CHAINS);
    pthread_t workers[THREADS], syncer;
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&workers[i], NULL, count_worker, m), 0);
    assert_int_equal(pthread_create(&syncer, NULL, sync_worker, m), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(workers[i], NULL);
    pthread_join(syncer, NULL);

    const double N = (double)THREADS * ROUNDS;
    struct parsed ps;
    double c[32], sum;
    size_t n;
    render(m, &ps);
    const char *R = "pep_requests_total";
    assert_true(value(&ps, R, "action=llm.chat,decision=allow,code=ok") == N);
    assert_true(value(&ps, R, "action=refund.issue,decision=deny,code=rate_limited") == N / 2);
    assert_true(value(&ps, R, "action=other,decision=deny,code=rate_limited") == N / 2);
    assert_true(value(&ps, "pep_upstream_attempts_total", "upstream=openai,outcome=2xx") == N);
    assert_true(value(&ps, "pep_retries_total", "upstream=backup") == N);
    assert_true(value(&ps, "pep_fallbacks_total", "chain=chat,step=1") == N);
    assert_true(value(&ps, "pep_escalations_total", "chain=chat") == N);
    assert_true(value(&ps, "pep_approvals_total", "state=used") == N);
    assert_true(value(&ps, "pep_audit_records_total", "") == 2 * N);
    check_histogram(&ps, "pep_decision_duration_seconds", c, &n, &sum);
    assert_true(c[0] == 0 && c[1] == N); /* 150 µs: le=0.00025 */
    assert_true(sum == N * 150 / 1e6);
    check_histogram(&ps, "pep_audit_batch_records", c, &n, &sum);
    assert_true(c[0] == 0 && c[1] == N && sum == 2 * N);
    assert_true(value(&ps, "pep_retries_total", "upstream=x199") == 0);
    free(ps.samples);
    metrics_free(m);
}

static void test_null_tolerant(void **state) {
    (void)state;
    metrics_decision(NULL, "a", true, "ok", 1);
    metrics_upstream_attempt(NULL, "a", METRICS_OUTCOME_2XX);
    metrics_retry(NULL, "a");
    metrics_fallback(NULL, "a", 0);
    metrics_breaker_transition(NULL, "a", METRICS_BREAKER_OPEN);
    metrics_escalation(NULL, "a");
    metrics_approval(NULL, METRICS_APPROVAL_USED);
    metrics_audit_batch(NULL, 1, 1);
    assert_int_equal(metrics_sync(NULL, NULL), 0);
    assert_null(metrics_render(NULL, NULL));
    metrics_free(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_families),       cmocka_unit_test(test_counts),
        cmocka_unit_test(test_histograms),     cmocka_unit_test(test_unknown_is_other),
        cmocka_unit_test(test_reserved_names), cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_breaker_state),  cmocka_unit_test(test_sync_and_growth),
        cmocka_unit_test(test_threads),        cmocka_unit_test(test_null_tolerant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
