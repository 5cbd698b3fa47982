/*
 * fixture.h — a running pep in front of a running mockllm, for integration tests.
 *
 * fx_start writes the policy (its text may use @MOCK@ for mockllm's base URL), starts
 * mockllm and `pep serve` on port 0 and reads the bootstrap admin token.  Helpers issue
 * agent tokens through the real admin API and read audit records from the real SQLite
 * file (read-only), so a test sees exactly what an operator would.
 */
#ifndef PEP_TESTS_FIXTURE_H
#define PEP_TESTS_FIXTURE_H

#include "tests/integration/harness.h"

struct fx {
    char dir[256]; /* temporary directory holding policy and data */
    char policy[300];
    char data[300];
    char db[320];
    struct h_proc mock;
    struct h_proc pep;
    char admin_token[2048];
};

/* Starts mockllm and pep with policy_text (@MOCK@ replaced).  env: extra "NAME=value"
 * strings for pep (NULL-terminated, may be NULL).  opts may be NULL.  0 or -1. */
int fx_start(struct fx *f, const char *policy_text, char *const env[],
             const struct h_spawn_opts *opts);
/* Restarts pep only (same policy and data dir); the old process must be stopped. */
int fx_restart_pep(struct fx *f, char *const env[]);
/* Stops both (SIGTERM) and removes the directory. */
void fx_stop(struct fx *f);

/* An admin API call with the bootstrap operator token. */
int fx_admin(struct fx *f, struct h_resp *r, const char *method, const char *path,
             const char *body);
/* Issues a token for agent (body: the POST body, NULL = "{}").  Returns the token
 * (caller frees) and its jti in jti_out (may be NULL), or NULL. */
char *fx_issue(struct fx *f, const char *agent, const char *body, char jti_out[64]);

/* The audit record of kind for request_id (new reference), or NULL. */
json_t *fx_record(struct fx *f, const char *request_id, const char *kind);
/* The number of rows in the audit table, or -1. */
long fx_count_records(struct fx *f);
/* The number of rows matching an SQL condition (e.g. "json_extract(record, '$.kind') =
 * 'system'"), or -1. */
long fx_count_records_where(struct fx *f, const char *where);

/* text with every `from` replaced by `to` (malloc'd; NULL when out of memory): policy
 * templates with placeholders of a test's own, besides @MOCK@. */
char *fx_replace_all(const char *text, const char *from, const char *to);

/* "Authorization: Bearer <token>" in buf. */
const char *fx_bearer(char *buf, size_t cap, const char *token);

#endif
