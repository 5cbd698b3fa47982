/*
 * test_pepctl.c — integration tests of tools/pepctl.c, the admin CLI: one real `pep serve`
 * on port 0 (a small policy written here: one route forwarding to an upstream nobody
 * listens on), and $PEP_BUILD_DIR/pepctl run as a subprocess whose exit code, stdout and
 * stderr are checked.
 *
 * What is checked, in SPEC terms: agents add/list/show/disable/enable round trip (SPEC 5);
 * a token printed by `tokens issue` works on the data plane (503 upstream_unavailable, not
 * 401) until `tokens revoke`, then 401 (SPEC 3.1: revocation effective before the call
 * returns); --json output is the API's JSON; operators and their roles; global flags
 * before or after the command and from the environment; usage errors, API errors and an
 * unreachable admin API all exit 2 with the reason on stderr and never the token; so does
 * an admin URL that is not pep (mockllm: no Pep-Request-Id, SPEC 3.5; a raw server sending
 * the header with answers of the wrong shape for the endpoint, SPEC 5, 8 and 3.3), with or
 * without --json;
 * `audit verify` through the API, and `audit verify --db` offline on the live file and on
 * a copy after pep stopped, including a tampered copy (exit 1, first bad seq); the signed
 * checkpoints (SPEC 6.4, a checkpoint every 5 records here) checked by the API with pep's
 * keys, and offline with the keys next to the copy or named by --keys — a chain re-hashed
 * after an edit, with the checkpoints' hash column rewritten and their JWTs untouched,
 * passes only when no key is found (and a warning says so).
 *
 * The tests share one pep and run in order (cmocka runs them in table order); the last one
 * stops pep.  Each pepctl run is bounded (CTL_TIMEOUT_MS) and killed if it overruns.
 *
 * Thread: cmocka's main thread only.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "audit/audit.h"
#include "pep/keys.h"
#include "pep/util.h"
#include "tests/integration/harness.h"
#include "tests/integration/rawup.h"
#include "tests/support/forge.h"

#include <dirent.h>
#include <sys/stat.h>

#define CTL_TIMEOUT_MS 60000
#define CHAT_BODY "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"

static struct h_proc g_pep;
static char g_tmp[256];  /* the test's temporary directory */
static char g_data[300]; /* pep's data dir */
static char g_policy[300];
static char g_chat_url[300]; /* data plane route */
static char *g_admin_token;  /* DATA/admin.token, first line */

static const char g_policy_text[] = "version: 1\n"
                                    "server:\n"
                                    "  listen: 127.0.0.1:0\n"
                                    "  admin_listen: 127.0.0.1:0\n"
                                    "audit:\n"
                                    "  durability: full\n"
                                    "  checkpoint_every: 5\n"
                                    "identity:\n"
                                    "  issuer: pep\n"
                                    "  token_ttl: 1h\n"
                                    "  max_token_ttl: 7d\n"
                                    "agents:\n"
                                    "  - id: seed-bot\n"
                                    "    owner: seed@example.test\n"
                                    "    tenants: [acme]\n"
                                    "    scopes: [llm.chat]\n"
                                    "  - id: refund-bot\n"
                                    "    owner: refunds@example.test\n"
                                    "    tenants: [acme]\n"
                                    "    scopes: [refund.issue]\n"
                                    "upstreams:\n"
                                    "  nowhere:\n"
                                    "    base_url: http://127.0.0.1:%d\n"
                                    "    api_key_env: PEPCTL_TEST_KEY\n"
                                    "    timeout: 5s\n"
                                    "routes:\n"
                                    "  - match: { method: POST, path: /v1/chat/completions }\n"
                                    "    action: llm.chat\n"
                                    "    forward: { upstream: nowhere }\n"
                                    "  - match: { method: POST, path: /v1/refunds }\n"
                                    "    action: refund.issue\n"
                                    "    forward: { upstream: nowhere }\n"
                                    "actions:\n"
                                    "  llm.chat:\n"
                                    "    scope: llm.chat\n"
                                    "  refund.issue:\n"
                                    "    scope: refund.issue\n"
                                    "    controls:\n"
                                    "      - when: { body.amount: { gt: 1000 } }\n"
                                    "        require_approval: { approvers: [approver] }\n";

/* ---- running pepctl --------------------------------------------------------------------- */

/* What one pepctl run did. */
struct ctl_result {
    int code;  /* exit status, or 128 + signal */
    char *out; /* its whole stdout, NUL-terminated */
    char *err; /* its whole stderr */
};

static void ctl_free(struct ctl_result *r) {
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof(*r));
}

/* A loopback port nothing listens on: tcpmux (1) is privileged and unused.  (A port
 * bound and closed again is not safe: the kernel may hand it to pep's own listeners,
 * which are started on port 0 right after.) */
#define DEAD_PORT 1

/* Runs $PEP_BUILD_DIR/pepctl with args (NULL-terminated) and extra environment ("N=v",
 * NULL-terminated, may be NULL), waits at most CTL_TIMEOUT_MS, and fills r. */
static void ctl_exec(struct ctl_result *r, char *const env[], const char *const args[]) {
    const char *build = getenv("PEP_BUILD_DIR");
    char bin[512], out_path[320], err_path[320];
    snprintf(bin, sizeof(bin), "%s/pepctl", build && *build ? build : "build");
    snprintf(out_path, sizeof(out_path), "%s/ctl.stdout", g_tmp);
    snprintf(err_path, sizeof(err_path), "%s/ctl.stderr", g_tmp);
    const char *argv[40] = {bin};
    size_t n = 1;
    for (; args[n - 1] && n < 39; n++)
        argv[n] = args[n - 1];
    argv[n] = NULL;
    assert_null(args[n - 1]);

    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int o = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int e = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
        for (size_t i = 0; env && env[i]; i++)
            putenv(env[i]);
        execv(bin, (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    int status = 0;
    int64_t deadline = pep_mono_us() + (int64_t)CTL_TIMEOUT_MS * 1000;
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        assert_true(w == 0 || errno == EINTR);
        if (pep_mono_us() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            fail_msg("pepctl %s did not finish within %d ms", args[0], CTL_TIMEOUT_MS);
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 5000000L};
        nanosleep(&ts, NULL);
    }
    r->code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r->out = h_read_file(out_path);
    r->err = h_read_file(err_path);
    assert_non_null(r->out);
    assert_non_null(r->err);
    if (r->err[0]) /* its first line, so that a failing test explains itself */
        fprintf(stderr, "  [pepctl %s ...] stderr: %.*s\n", args[0], (int)strcspn(r->err, "\n"),
                r->err);
}

/* pepctl --url ADMIN --data-dir DATA args...: the usual way the tests call it. */
static void ctl_run(struct ctl_result *r, const char *const args[]) {
    const char *argv[40] = {"--url", g_pep.admin_url, "--data-dir", g_data};
    size_t n = 4;
    for (size_t i = 0; args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    ctl_exec(r, NULL, argv);
}

#define CTL(r, ...) ctl_run((r), (const char *const[]){__VA_ARGS__, NULL})
#define CTL_RAW(r, env, ...) ctl_exec((r), (env), (const char *const[]){__VA_ARGS__, NULL})

/* stdout parsed as JSON (asserted to be an object); caller json_decref()s. */
static json_t *ctl_json(const struct ctl_result *r) {
    json_error_t e;
    json_t *j = json_loads(r->out, 0, &e);
    if (!j) fail_msg("pepctl --json printed no JSON: %s (%s)", e.text, r->out);
    assert_true(json_is_object(j));
    return j;
}

static const char *jstr(const json_t *o, const char *key) {
    const char *v = json_string_value(json_object_get(o, key));
    return v ? v : "<missing>";
}

/* The status of a chat call on the data plane with token. */
static long chat_status(const char *token, char code_out[64]) {
    char auth[2048];
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", g_chat_url, CHAT_BODY, auth, (const char *)NULL), 0);
    long status = r.status;
    if (code_out) {
        json_t *j = h_json(&r);
        snprintf(code_out, 64, "%s", jstr(json_object_get(j, "error"), "code"));
        json_decref(j);
    }
    h_resp_free(&r);
    return status;
}

/* Issues a token for agent with pepctl and returns it (caller frees); asserts that stdout
 * is exactly one line holding a three-part JWT. */
static char *issue_token(const char *agent, const char *ttl) {
    struct ctl_result r = {0};
    if (ttl)
        CTL(&r, "tokens", "issue", agent, "--ttl", ttl);
    else
        CTL(&r, "tokens", "issue", agent);
    assert_int_equal(r.code, 0);
    size_t len = strlen(r.out);
    assert_true(len > 20);
    assert_int_equal(r.out[len - 1], '\n');
    assert_ptr_equal(strchr(r.out, '\n'), r.out + len - 1); /* one line */
    r.out[len - 1] = '\0';
    assert_int_equal(strspn(r.out, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789-_."),
                     len - 1);
    char *dot1 = strchr(r.out, '.');
    assert_non_null(dot1);
    assert_non_null(strchr(dot1 + 1, '.'));
    char *tok = strdup(r.out);
    assert_non_null(tok);
    ctl_free(&r);
    return tok;
}

/* ---- fixtures --------------------------------------------------------------------------- */

static int group_setup(void **state) {
    (void)state;
    /* The developer's own settings must not leak into what is tested. */
    unsetenv("PEP_TOKEN");
    unsetenv("PEP_ADMIN_URL");
    unsetenv("PEP_DATA_DIR");
    if (h_tmpdir(g_tmp) != 0) return -1;
    snprintf(g_data, sizeof(g_data), "%s/data", g_tmp);
    snprintf(g_policy, sizeof(g_policy), "%s/policy.yaml", g_tmp);
    char text[sizeof(g_policy_text) + 16];
    snprintf(text, sizeof(text), g_policy_text, DEAD_PORT);
    char *env[] = {"PEPCTL_TEST_KEY=test-upstream-key", NULL};
    if (h_write_file(g_policy, text) != 0 || h_start_pep(&g_pep, g_policy, g_data, env) != 0)
        return -1;
    snprintf(g_chat_url, sizeof(g_chat_url), "%s/v1/chat/completions", g_pep.url);
    char path[400];
    snprintf(path, sizeof(path), "%s/admin.token", g_data);
    g_admin_token = h_read_file(path);
    if (!g_admin_token) return -1;
    g_admin_token[strcspn(g_admin_token, "\r\n")] = '\0';
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (g_pep.pid > 0) h_stop(&g_pep, SIGTERM);
    if (g_tmp[0]) h_rmrf(g_tmp);
    free(g_admin_token);
    return 0;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_help(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL_RAW(&r, NULL, "--help");
    assert_int_equal(r.code, 0);
    static const char *const cmds[] = {
        "agents add",    "agents list",     "agents show",  "agents disable",
        "agents enable", "tokens issue",    "tokens list",  "tokens revoke",
        "operators add", "operators token", "audit verify", "--url",
        "--token",       "--data-dir",      "--json",       "--keys"};
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (!strstr(r.out, cmds[i])) fail_msg("--help does not mention '%s'", cmds[i]);
    assert_string_equal(r.err, "");
    ctl_free(&r);
    CTL_RAW(&r, NULL, "agents", "list", "-h");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "usage: pepctl"));
    ctl_free(&r);
}

/* Usage errors: message and usage on stderr, nothing on stdout, exit 2, no call made. */
static void test_usage_errors(void **state) {
    (void)state;
    static const char *const cases[][8] = {
        {"agents", "list", "--bogus", NULL},
        {"agents", "add", "bot-x", "--owner", "o", "--tenants", "acme", NULL}, /* no --scopes */
        {"agents", "show", NULL},                                              /* no ID */
        {"agents", "show", "a", "b", NULL},                                    /* one too many */
        {"agents", "frobnicate", NULL},
        {"tokens", "issue", "seed-bot", "--ttl", "soon", NULL},
        {"tokens", "issue", "seed-bot", "--ttl", NULL}, /* flag without its value */
        {"tokens", "list", "--owner", "o", NULL},       /* another command's flag */
        {"agents", "add", "b", "--owner", "o", "--tenants", "a,,b", NULL},
        {"--json=yes", "agents", "list", NULL},
        {"audit", "verify", "--keys", "/tmp", NULL}, /* --keys without --db */
        {"audit", "verify", "--db", "x.db", "--keys", NULL},
        {NULL}, /* no command at all */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct ctl_result r = {0};
        const char *const *c = cases[i];
        const char *argv[12] = {"--url", g_pep.admin_url, "--data-dir", g_data};
        size_t n = 4;
        for (size_t k = 0; c[k]; k++)
            argv[n++] = c[k];
        argv[n] = NULL;
        ctl_exec(&r, NULL, argv);
        if (r.code != 2 || !strstr(r.err, "usage: pepctl") || strncmp(r.err, "pepctl: ", 8))
            fail_msg("case %zu: exit %d, stderr '%s'", i, r.code, r.err);
        assert_string_equal(r.out, "");
        ctl_free(&r);
    }
    struct ctl_result r = {0};
    CTL(&r, "agents", "list", "--bogus");
    assert_non_null(strstr(r.err, "--bogus"));
    ctl_free(&r);
}

static void test_agents_round_trip(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "agents", "add", "bot-1", "--owner", "alice@example.test", "--tenants", "acme,beta",
        "--scopes", "llm.chat,tool.search");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "agent bot-1 created"));
    ctl_free(&r);

    /* list: a header and one aligned row per agent. */
    CTL(&r, "agents", "list");
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "ID ", 3), 0);
    const char *hdr_owner = strstr(r.out, "OWNER");
    assert_non_null(hdr_owner);
    assert_non_null(strstr(r.out, "TENANTS"));
    assert_non_null(strstr(r.out, "SCOPES"));
    assert_non_null(strstr(r.out, "ENABLED"));
    const char *row = strstr(r.out, "\nbot-1 ");
    assert_non_null(row);
    row++;
    /* Aligned: the owner starts in the OWNER column. */
    assert_int_equal(strncmp(row + (hdr_owner - r.out), "alice@example.test", 18), 0);
    const char *eol = strchr(row, '\n');
    assert_non_null(eol);
    char line[512];
    snprintf(line, sizeof(line), "%.*s", (int)(eol - row), row);
    assert_non_null(strstr(line, "acme,beta"));
    assert_non_null(strstr(line, "llm.chat,tool.search"));
    assert_non_null(strstr(line, "true"));
    assert_non_null(strstr(r.out, "\nseed-bot "));
    ctl_free(&r);

    /* show, human and --json (global flag before the command). */
    CTL(&r, "agents", "show", "bot-1");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "owner"));
    assert_non_null(strstr(r.out, "alice@example.test"));
    assert_non_null(strstr(r.out, "acme,beta"));
    ctl_free(&r);
    CTL_RAW(&r, NULL, "--json", "--url", g_pep.admin_url, "--data-dir", g_data, "agents", "show",
            "bot-1");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_string_equal(jstr(j, "id"), "bot-1");
    assert_string_equal(jstr(j, "owner"), "alice@example.test");
    assert_int_equal(json_array_size(json_object_get(j, "tenants")), 2);
    assert_string_equal(json_string_value(json_array_get(json_object_get(j, "tenants"), 1)),
                        "beta");
    assert_true(json_is_true(json_object_get(j, "enabled")));
    assert_true(json_is_string(json_object_get(j, "created_at")));
    json_decref(j);
    ctl_free(&r);

    /* disable / enable, checked through show --json (global flags after the command). */
    CTL(&r, "agents", "disable", "bot-1");
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "agent bot-1 disabled\n");
    ctl_free(&r);
    CTL_RAW(&r, NULL, "agents", "show", "bot-1", "--json", "--url", g_pep.admin_url, "--data-dir",
            g_data);
    assert_int_equal(r.code, 0);
    j = ctl_json(&r);
    assert_true(json_is_false(json_object_get(j, "enabled")));
    json_decref(j);
    ctl_free(&r);
    CTL(&r, "agents", "enable", "bot-1");
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "agent bot-1 enabled\n");
    ctl_free(&r);
    CTL(&r, "--json", "agents", "list");
    assert_int_equal(r.code, 0);
    j = ctl_json(&r);
    json_t *agents = json_object_get(j, "agents");
    assert_true(json_is_array(agents));
    bool found = false;
    size_t i;
    json_t *a;
    json_array_foreach(agents, i, a) {
        if (strcmp(jstr(a, "id"), "bot-1") == 0) {
            found = true;
            assert_true(json_is_true(json_object_get(a, "enabled")));
        }
    }
    assert_true(found);
    json_decref(j);
    ctl_free(&r);

    /* add again: replaced, and --disabled creates it disabled. */
    CTL(&r, "agents", "add", "bot-1", "--owner", "alice@example.test", "--tenants", "acme",
        "--scopes", "llm.chat", "--disabled");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "agent bot-1 replaced"));
    ctl_free(&r);
    CTL(&r, "--json", "agents", "show", "bot-1");
    j = ctl_json(&r);
    assert_true(json_is_false(json_object_get(j, "enabled")));
    assert_int_equal(json_array_size(json_object_get(j, "tenants")), 1);
    json_decref(j);
    ctl_free(&r);
}

/* A token printed by `tokens issue` works on the data plane until it is revoked. */
static void test_token_issue_works_then_revoke(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "agents", "add", "bot-2", "--owner", "bob@example.test", "--tenants", "acme",
        "--scopes", "llm.chat");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    char *token = issue_token("bot-2", "1h");
    char code[64];
    /* Passes authentication: the upstream is down, so 503 upstream_unavailable. */
    assert_int_equal(chat_status(token, code), 503);
    assert_string_equal(code, "upstream_unavailable");

    CTL(&r, "--json", "tokens", "list", "--agent", "bot-2");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    json_t *tokens = json_object_get(j, "tokens");
    assert_int_equal(json_array_size(tokens), 1);
    json_t *t = json_array_get(tokens, 0);
    char jti[64];
    snprintf(jti, sizeof(jti), "%s", jstr(t, "jti"));
    assert_string_equal(jstr(t, "agent"), "bot-2");
    assert_true(json_is_null(json_object_get(t, "revoked_at")));
    assert_null(strstr(r.out, token)); /* never the token itself */
    json_decref(j);
    ctl_free(&r);

    CTL(&r, "tokens", "list", "--agent", "bot-2");
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "JTI ", 4), 0);
    assert_non_null(strstr(r.out, "REVOKED_AT"));
    assert_non_null(strstr(r.out, jti));
    assert_non_null(strstr(r.out, "bot-2"));
    ctl_free(&r);

    CTL(&r, "tokens", "revoke", jti);
    assert_int_equal(r.code, 0);
    char expect[128];
    snprintf(expect, sizeof(expect), "token %s revoked at ", jti);
    assert_int_equal(strncmp(r.out, expect, strlen(expect)), 0);
    ctl_free(&r);
    /* Effective before the revoke call returned. */
    assert_int_equal(chat_status(token, code), 401);
    assert_string_equal(code, "invalid_token");

    CTL(&r, "--json", "tokens", "list", "--agent", "bot-2");
    j = ctl_json(&r);
    assert_true(json_is_string(
        json_object_get(json_array_get(json_object_get(j, "tokens"), 0), "revoked_at")));
    json_decref(j);
    ctl_free(&r);
    free(token);
}

/* `tokens issue --json` prints the whole answer; a disabled agent's token is refused. */
static void test_token_issue_json_and_disable(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "agents", "add", "bot-3", "--owner", "carol@example.test", "--tenants", "acme",
        "--scopes", "llm.chat,tool.search");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    CTL(&r, "tokens", "issue", "bot-3", "--json", "--ttl", "2h", "--scopes", "llm.chat", "--acr",
        "mfa");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_true(json_is_string(json_object_get(j, "token")));
    assert_true(json_is_string(json_object_get(j, "jti")));
    assert_true(json_is_string(json_object_get(j, "expires_at")));
    char *token = strdup(jstr(j, "token"));
    json_decref(j);
    ctl_free(&r);
    assert_int_equal(chat_status(token, NULL), 503);
    CTL(&r, "agents", "disable", "bot-3");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    assert_int_equal(chat_status(token, NULL), 401);
    CTL(&r, "agents", "enable", "bot-3");
    ctl_free(&r);
    assert_int_equal(chat_status(token, NULL), 503);
    free(token);
}

/* Defaults from the environment: PEP_ADMIN_URL, PEP_DATA_DIR (token file), PEP_TOKEN. */
static void test_environment_defaults(void **state) {
    (void)state;
    char url_env[200], data_env[400], tok_env[2048];
    snprintf(url_env, sizeof(url_env), "PEP_ADMIN_URL=%s", g_pep.admin_url);
    snprintf(data_env, sizeof(data_env), "PEP_DATA_DIR=%s", g_data);
    snprintf(tok_env, sizeof(tok_env), "PEP_TOKEN=%s", g_admin_token);
    struct ctl_result r = {0};
    char *env1[] = {url_env, data_env, NULL};
    CTL_RAW(&r, env1, "agents", "show", "seed-bot");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "seed@example.test"));
    ctl_free(&r);
    char *env2[] = {url_env, tok_env, "PEP_DATA_DIR=/nonexistent-dir", NULL};
    CTL_RAW(&r, env2, "agents", "show", "seed-bot");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    /* --token wins over the file. */
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--data-dir", "/nonexistent-dir", "--token",
            g_admin_token, "agents", "list");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    /* No token anywhere: exit 2 with a hint. */
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--data-dir", "/nonexistent-dir", "agents", "list");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "admin.token"));
    ctl_free(&r);
}

/* API errors: "pepctl: <code>: <message> (HTTP <status>)", exit 2, never the token. */
static void test_api_errors(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "agents", "show", "no-such-agent");
    assert_int_equal(r.code, 2);
    assert_int_equal(strncmp(r.err, "pepctl: not_found: ", 19), 0);
    assert_non_null(strstr(r.err, "(HTTP 404)"));
    assert_null(strstr(r.err, g_admin_token));
    assert_string_equal(r.out, "");
    ctl_free(&r);

    CTL(&r, "tokens", "issue", "no-such-agent");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "not_found"));
    assert_string_equal(r.out, "");
    ctl_free(&r);

    /* An argument after "--" is an operand even when it starts with '-'. */
    CTL(&r, "tokens", "revoke", "--", "-no-such-jti");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "pepctl: not_found: "));
    ctl_free(&r);

    CTL(&r, "tokens", "issue", "seed-bot", "--scopes", "not.granted");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "bad_request"));
    assert_non_null(strstr(r.err, "(HTTP 400)"));
    ctl_free(&r);

    static const char bad_token[] = "not-a-real-token-7f3a9c";
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--token", bad_token, "agents", "list");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "pepctl: invalid_token: "));
    assert_non_null(strstr(r.err, "(HTTP 401)"));
    assert_null(strstr(r.err, bad_token));
    ctl_free(&r);

    /* An agent token is refused on the admin API (SPEC 3.1). */
    char *agent_token = issue_token("seed-bot", NULL);
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--token", agent_token, "agents", "list");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "invalid_token"));
    assert_null(strstr(r.err, agent_token));
    ctl_free(&r);
    free(agent_token);
}

static void test_unreachable(void **state) {
    (void)state;
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", DEAD_PORT);
    struct ctl_result r = {0};
    CTL_RAW(&r, NULL, "--url", url, "--token", "secret-token-4b1d", "agents", "list");
    assert_int_equal(r.code, 2);
    char expect[128];
    snprintf(expect, sizeof(expect), "pepctl: cannot reach pep admin API at %s: ", url);
    assert_int_equal(strncmp(r.err, expect, strlen(expect)), 0);
    assert_null(strstr(r.err, "secret-token-4b1d"));
    assert_string_equal(r.out, "");
    ctl_free(&r);
}

/* ---- an admin URL that is not pep (SPEC 3.5: every pep answer carries Pep-Request-Id) ---- */

/* Runs pepctl --url url --token TOKEN args... and asserts exit 2, nothing on stdout, and
 * stderr "pepctl: <url><path>: the answer is not pep's admin API (HTTP <status>, <why>)". */
static void expect_not_pep(const char *url, const char *path, long status, const char *why,
                           const char *const args[]) {
    const char *argv[40] = {"--url", url, "--token", "secret-token-4b1d"};
    size_t n = 4;
    for (size_t i = 0; args[i] && n < 39; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    struct ctl_result r = {0};
    ctl_exec(&r, NULL, argv);
    char expect[512];
    snprintf(expect, sizeof(expect),
             "pepctl: %s%s: the answer is not pep's admin API (HTTP %ld, %s)\n", url, path, status,
             why);
    if (r.code != 2 || strcmp(r.err, expect) != 0 || r.out[0] != '\0')
        fail_msg("pepctl %s %s: exit %d, stdout '%s', stderr '%s', expected stderr '%s'", args[0],
                 args[1], r.code, r.out, r.err, expect);
    ctl_free(&r);
}

#define NOT_PEP(url, path, status, why, ...)                                                       \
    expect_not_pep((url), (path), (status), (why), (const char *const[]){__VA_ARGS__, NULL})

/* mockllm answers every admin path with its echo JSON (200) or a scripted 404, and never
 * with Pep-Request-Id: every command refuses the answer, --json or not, instead of printing
 * another service's JSON (or an empty table) with exit 0. */
static void test_not_pep_mockllm(void **state) {
    (void)state;
    struct h_proc mock = {0};
    assert_int_equal(h_start_mockllm(&mock), 0);
    static const char no_id[] = "no Pep-Request-Id header";
    NOT_PEP(mock.url, "/admin/v1/agents", 200, no_id, "--json", "agents", "list");
    NOT_PEP(mock.url, "/admin/v1/agents", 200, no_id, "agents", "list");
    NOT_PEP(mock.url, "/admin/v1/tokens", 200, no_id, "tokens", "list");
    NOT_PEP(mock.url, "/admin/v1/tokens?agent=bot-1", 200, no_id, "--json", "tokens", "list",
            "--agent", "bot-1");
    NOT_PEP(mock.url, "/admin/v1/audit/verify", 200, no_id, "audit", "verify");
    NOT_PEP(mock.url, "/admin/v1/audit/verify", 200, no_id, "audit", "verify", "--json");
    NOT_PEP(mock.url, "/admin/v1/agents/bot-1", 200, no_id, "agents", "show", "bot-1");
    NOT_PEP(mock.url, "/admin/v1/agents/bot-1/disable", 200, no_id, "agents", "disable", "bot-1");
    NOT_PEP(mock.url, "/admin/v1/agents", 200, no_id, "agents", "add", "bot-1", "--owner", "o",
            "--tenants", "acme", "--scopes", "llm.chat", "--json");
    NOT_PEP(mock.url, "/admin/v1/agents/bot-1/tokens", 200, no_id, "tokens", "issue", "bot-1");
    NOT_PEP(mock.url, "/admin/v1/tokens/abc", 200, no_id, "tokens", "revoke", "abc");
    NOT_PEP(mock.url, "/admin/v1/operators", 200, no_id, "operators", "add", "op-1", "--roles",
            "auditor");
    NOT_PEP(mock.url, "/admin/v1/operators/op-1/tokens", 200, no_id, "operators", "token", "op-1");
    /* An error status without the header is not read as pep's error either. */
    assert_int_equal(h_mock_fault(mock.url, "{\"kind\":\"status\",\"status\":404,\"count\":2}"), 0);
    NOT_PEP(mock.url, "/admin/v1/agents", 404, no_id, "--json", "agents", "list");
    NOT_PEP(mock.url, "/admin/v1/audit/verify", 404, no_id, "audit", "verify");
    h_stop(&mock, SIGTERM);
}

/* Sets u's answer: status, the extra header lines (each ending in CRLF) and body. */
static void script_answer(struct rawup *u, int status, const char *headers, const char *body) {
    char raw[2048];
    int n = snprintf(raw, sizeof(raw),
                     "HTTP/1.1 %d Whatever\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n%sConnection: close\r\n\r\n%s",
                     status, strlen(body), headers, body);
    assert_true(n > 0 && (size_t)n < sizeof(raw));
    rawup_script(u, raw, (size_t)n, true);
}

/* A server that does send Pep-Request-Id is still read only through the shape SPEC 5 and 8
 * give each endpoint (errors: SPEC 3.3); what pepctl does not read is not required. */
static void test_not_pep_shapes(void **state) {
    (void)state;
    char url[64];
    struct rawup *u = rawup_start(url, sizeof(url));
    assert_non_null(u);
    static const char id[] = "Pep-Request-Id: 01JTESTTESTTESTTESTTESTTEST\r\n";
    static const struct {
        int status;
        const char *body;
        const char *path;
        const char *why;
        const char *args[8];
    } cases[] = {
        {200,
         "{\"agents\":{\"id\":\"a\"}}",
         "/admin/v1/agents",
         "no 'agents' array of objects with a string 'id'",
         {"--json", "agents", "list"}},
        {200,
         "{\"agents\":[{\"name\":\"a\"}]}",
         "/admin/v1/agents",
         "no 'agents' array of objects with a string 'id'",
         {"agents", "list"}},
        {200,
         "{\"items\":[]}",
         "/admin/v1/tokens",
         "no 'tokens' array of objects with a string 'jti'",
         {"tokens", "list"}},
        {200,
         "{\"tokens\":[{\"jti\":7}]}",
         "/admin/v1/tokens",
         "no 'tokens' array of objects with a string 'jti'",
         {"--json", "tokens", "list"}},
        {200,
         "{\"ok\":\"true\"}",
         "/admin/v1/audit/verify",
         "no boolean 'ok'",
         {"audit", "verify"}},
        {200,
         "{\"ok\":true}",
         "/admin/v1/audit/verify",
         "'ok' true without integer 'records' and 'head_seq'",
         {"audit", "verify", "--json"}},
        {200,
         "{\"ok\":false,\"head_seq\":3}",
         "/admin/v1/audit/verify",
         "'ok' false without an integer 'first_bad_seq'",
         {"audit", "verify"}},
        {200, "{\"name\":\"a\"}", "/admin/v1/agents/a", "no string 'id'", {"agents", "show", "a"}},
        {200,
         "{\"token\":\"x.y.z\"}",
         "/admin/v1/agents/a/tokens",
         "no string 'token', 'jti' and 'expires_at'",
         {"tokens", "issue", "a", "--json"}},
        {200, "{}", "/admin/v1/tokens/j", "no string 'jti'", {"tokens", "revoke", "j"}},
        {201,
         "[]",
         "/admin/v1/operators",
         "the body is not a JSON object",
         {"operators", "add", "o", "--roles", "admin"}},
        {200,
         "<html>hello</html>",
         "/admin/v1/agents",
         "the body is not a JSON object",
         {"agents", "list"}},
        {404,
         "{\"detail\":\"Not Found\"}",
         "/admin/v1/agents",
         "no SPEC 3.3 error object with a string 'code'",
         {"agents", "list"}},
        {401,
         "{\"error\":\"invalid_token\"}",
         "/admin/v1/audit/verify",
         "no SPEC 3.3 error object with a string 'code'",
         {"audit", "verify"}},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        script_answer(u, cases[i].status, id, cases[i].body);
        expect_not_pep(url, cases[i].path, cases[i].status, cases[i].why, cases[i].args);
    }

    /* The header's name is case-insensitive; an empty value is no request id; only the
     * final response's head counts (not that of a 100 Continue before it). */
    script_answer(u, 200, "pep-request-id: \r\n", "{\"agents\":[]}");
    NOT_PEP(url, "/admin/v1/agents", 200, "no Pep-Request-Id header", "agents", "list");
    static const char continued[] =
        "HTTP/1.1 100 Continue\r\nPep-Request-Id: 01JTESTTESTTESTTESTTESTTEST\r\n\r\n"
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
        "Connection: close\r\n\r\n{\"agents\":[]}";
    rawup_script(u, continued, strlen(continued), true);
    NOT_PEP(url, "/admin/v1/agents", 200, "no Pep-Request-Id header", "agents", "list");

    /* The right shapes pass, with members pepctl does not know and without those it does
     * not need. */
    struct ctl_result r = {0};
    script_answer(u, 200, "pep-request-id: x\r\n", "{\"agents\":[{\"id\":\"a-1\",\"x\":1}]}");
    CTL_RAW(&r, NULL, "--url", url, "--token", "t", "agents", "list");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "\na-1 "));
    ctl_free(&r);
    script_answer(u, 200, id, "{\"ok\":false,\"first_bad_seq\":4}");
    CTL_RAW(&r, NULL, "--url", url, "--token", "t", "audit", "verify", "--json");
    assert_int_equal(r.code, 1);
    ctl_free(&r);
    script_answer(u, 403, id, "{\"error\":{\"code\":\"insufficient_scope\",\"message\":\"m\"}}");
    CTL_RAW(&r, NULL, "--url", url, "--token", "t", "agents", "list");
    assert_int_equal(r.code, 2);
    assert_string_equal(r.err, "pepctl: insufficient_scope: m (HTTP 403)\n");
    ctl_free(&r);
    rawup_stop(u);
}

static void test_operators(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "operators", "add", "aud-1", "--roles", "auditor");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "operator aud-1 created"));
    ctl_free(&r);
    CTL(&r, "operators", "token", "aud-1", "--ttl", "8h");
    assert_int_equal(r.code, 0);
    size_t len = strlen(r.out);
    assert_true(len > 20 && r.out[len - 1] == '\n');
    r.out[len - 1] = '\0';
    assert_null(strchr(r.out, '\n'));
    char *op_token = strdup(r.out);
    ctl_free(&r);

    /* An auditor reads but does not write. */
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--token", op_token, "agents", "list");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "seed-bot"));
    ctl_free(&r);
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--token", op_token, "agents", "disable",
            "seed-bot");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "insufficient_scope"));
    assert_non_null(strstr(r.err, "(HTTP 403)"));
    ctl_free(&r);
    CTL_RAW(&r, NULL, "--url", g_pep.admin_url, "--token", op_token, "audit", "verify");
    assert_int_equal(r.code, 0);
    ctl_free(&r);
    /* An operator token is refused on the data plane. */
    assert_int_equal(chat_status(op_token, NULL), 401);
    free(op_token);

    CTL(&r, "operators", "add", "aud-1", "--roles", "auditor,approver", "--json");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_string_equal(jstr(j, "id"), "aud-1");
    assert_int_equal(json_array_size(json_object_get(j, "roles")), 2);
    json_decref(j);
    ctl_free(&r);
    CTL(&r, "operators", "add", "aud-2", "--roles", "superuser");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "bad_request"));
    ctl_free(&r);
}

/* A refund of `amount` by refund-bot: its status, and the approval id of a 403
 * approval_required in id_out. */
static long refund(const char *token, int amount, const char *approval, char id_out[64]) {
    char url[300], auth[2048], body[64], hdr[128];
    snprintf(url, sizeof url, "%s/v1/refunds", g_pep.url);
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
    snprintf(body, sizeof body, "{\"amount\":%d}", amount);
    snprintf(hdr, sizeof hdr, "Pep-Approval: %s", approval ? approval : "");
    struct h_resp r = {0};
    assert_int_equal(h_http(&r, "POST", url, body, auth, approval ? hdr : NULL, (const char *)NULL),
                     0);
    long status = r.status;
    if (id_out) {
        json_t *j = h_json(&r);
        snprintf(id_out, 64, "%s", jstr(json_object_get(j, "error"), "approval_id"));
        json_decref(j);
    }
    h_resp_free(&r);
    return status;
}

/* approvals list / show / deny / approve, and what the data plane does after each. */
static void test_approvals(void **state) {
    (void)state;
    char *token = issue_token("refund-bot", NULL);
    char first[64], second[64];
    assert_int_equal(refund(token, 5000, NULL, first), 403);
    assert_int_equal(refund(token, 7000, NULL, second), 403);
    assert_string_not_equal(first, second);

    struct ctl_result r = {0};
    CTL(&r, "approvals", "list");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "ID"));
    assert_non_null(strstr(r.out, first));
    assert_non_null(strstr(r.out, "pending"));
    assert_non_null(strstr(r.out, "refund.issue"));
    ctl_free(&r);
    CTL(&r, "approvals", "show", first);
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "refunds@example.test")); /* the owner */
    assert_non_null(strstr(r.out, "\"amount\":5000"));      /* the field a human decides on */
    ctl_free(&r);

    /* deny needs a reason */
    CTL(&r, "approvals", "deny", first);
    assert_int_equal(r.code, 2);
    ctl_free(&r);
    CTL(&r, "approvals", "deny", first, "--reason", "not this customer");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, "denied"));
    assert_non_null(strstr(r.out, "not this customer"));
    ctl_free(&r);
    CTL(&r, "approvals", "approve", first); /* decided already */
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "(HTTP 409)"));
    ctl_free(&r);
    assert_int_equal(refund(token, 5000, first, NULL), 403); /* approval_denied */

    CTL(&r, "approvals", "approve", second, "--reason", "ok", "--json");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_string_equal(jstr(j, "state"), "approved");
    assert_string_equal(jstr(j, "decided_by"), "admin");
    json_decref(j);
    ctl_free(&r);
    /* past the control: forwarded, to an upstream nobody listens on */
    assert_int_equal(refund(token, 7000, second, NULL), 503);
    assert_int_equal(refund(token, 7000, second, NULL), 403); /* used */

    CTL(&r, "approvals", "list", "--state", "all", "--json");
    assert_int_equal(r.code, 0);
    j = ctl_json(&r);
    assert_int_equal(json_array_size(json_object_get(j, "approvals")), 2);
    json_decref(j);
    ctl_free(&r);
    CTL(&r, "approvals", "list", "--state", "bogus");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "bad_request"));
    ctl_free(&r);
    CTL(&r, "approvals", "show", "01NOSUCHAPPROVAL0000000000");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "(HTTP 404)"));
    ctl_free(&r);
    free(token);
}

static void test_audit_verify_api(void **state) {
    (void)state;
    struct ctl_result r = {0};
    CTL(&r, "audit", "verify");
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "ok: ", 4), 0);
    ctl_free(&r);
    CTL(&r, "audit", "verify", "--json");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_true(json_is_true(json_object_get(j, "ok")));
    assert_true(json_integer_value(json_object_get(j, "records")) > 5);
    assert_int_equal(json_integer_value(json_object_get(j, "records")),
                     json_integer_value(json_object_get(j, "head_seq")));
    assert_int_equal(strlen(jstr(j, "head_hash")), 64);
    assert_true(json_is_true(json_object_get(j, "checkpoints_signed")));
    json_decref(j);
    ctl_free(&r);
}

/* The API checks the checkpoints' signatures with pep's keys: a JWT whose signature no
 * longer holds (one character of it changed in the live store) is the first bad seq.  The
 * store is restored afterwards for the tests that follow. */
static void test_audit_verify_api_signature(void **state) {
    (void)state;
    char db_path[400];
    snprintf(db_path, sizeof(db_path), "%s/pep.db", g_data);
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_open(db_path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    assert_int_equal(
        sqlite3_prepare_v2(db, "SELECT jwt FROM checkpoints WHERE seq = 5", -1, &st, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    char *good = strdup((const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    assert_non_null(good);
    char *bad = strdup(good);
    assert_non_null(bad);
    size_t n = strlen(bad);
    bad[n - 10] = bad[n - 10] == 'A' ? 'B' : 'A'; /* not the last char: its low bits are padding */
    static const char set_jwt[] = "UPDATE checkpoints SET jwt = ?1 WHERE seq = 5";
    assert_int_equal(sqlite3_exec(db, "DROP TRIGGER checkpoints_no_update", NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, set_jwt, -1, &st, NULL), SQLITE_OK);
    sqlite3_bind_text(st, 1, bad, -1, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);

    struct ctl_result r = {0};
    CTL(&r, "audit", "verify", "--json");
    assert_int_equal(r.code, 1);
    json_t *j = ctl_json(&r);
    assert_true(json_is_false(json_object_get(j, "ok")));
    assert_int_equal(json_integer_value(json_object_get(j, "first_bad_seq")), 5);
    assert_string_equal(jstr(j, "reason"), "checkpoint at seq 5: signature invalid");
    assert_true(json_is_true(json_object_get(j, "checkpoints_signed")));
    json_decref(j);
    ctl_free(&r);

    assert_int_equal(sqlite3_prepare_v2(db, set_jwt, -1, &st, NULL), SQLITE_OK);
    sqlite3_bind_text(st, 1, good, -1, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    assert_int_equal(sqlite3_exec(db,
                                  "CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON"
                                  " checkpoints BEGIN SELECT RAISE(ABORT, 'checkpoints are"
                                  " append-only: UPDATE refused'); END;",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
    free(good);
    free(bad);
    CTL(&r, "audit", "verify");
    assert_int_equal(r.code, 0);
    assert_non_null(strstr(r.out, ", checkpoint signatures valid\n"));
    ctl_free(&r);
}

/* Copies a file byte for byte; 0 or -1. */
static int copy_file(const char *from, const char *to) {
    FILE *in = fopen(from, "rb");
    FILE *out = in ? fopen(to, "wb") : NULL;
    int rc = in && out ? 0 : -1;
    char buf[65536];
    size_t n;
    while (rc == 0 && (n = fread(buf, 1, sizeof(buf), in)) > 0)
        if (fwrite(buf, 1, n, out) != n) rc = -1;
    if (in && ferror(in)) rc = -1;
    if (out && fclose(out) != 0) rc = -1;
    if (in) fclose(in);
    return rc;
}

/* Offline verification: on the live file while pep runs, then on a copy after pep stopped
 * (no server at all), then on a tampered copy.  Stops the shared pep: only tests that need
 * no server come after it. */
static void test_audit_verify_offline(void **state) {
    (void)state;
    char db[400], copy[400], missing[400];
    snprintf(db, sizeof(db), "%s/pep.db", g_data);
    snprintf(copy, sizeof(copy), "%s/copy.db", g_tmp);
    snprintf(missing, sizeof(missing), "%s/missing.db", g_tmp);
    struct ctl_result r = {0};

    CTL(&r, "--json", "audit", "verify");
    assert_int_equal(r.code, 0);
    json_t *api = ctl_json(&r);
    ctl_free(&r);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", db, "--json");
    assert_int_equal(r.code, 0);
    json_t *off = ctl_json(&r);
    ctl_free(&r);
    /* Same walk, same answer (nothing was written in between). */
    assert_true(json_equal(api, off));
    json_decref(api);
    json_decref(off);

    assert_true(WIFEXITED(h_stop(&g_pep, SIGTERM)));
    assert_int_equal(copy_file(db, copy), 0);
    /* No keys/ next to the copy: the chain is walked, the signatures are not (a warning). */
    CTL_RAW(&r, NULL, "audit", "verify", "--db", copy);
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "ok: ", 4), 0);
    assert_null(strstr(r.out, "signatures"));
    assert_non_null(strstr(r.err, "pepctl: warning: checkpoint signatures not checked"));
    ctl_free(&r);

    /* Tamper with record 2 of the copy (the triggers are a guard against mistakes, not
     * against someone holding the file: SPEC 6, PITFALLS). */
    sqlite3 *sdb = NULL;
    assert_int_equal(sqlite3_open(copy, &sdb), SQLITE_OK);
    assert_int_equal(sqlite3_exec(sdb,
                                  "DROP TRIGGER audit_no_update;"
                                  "UPDATE audit SET record = record || ' ' WHERE seq = 2;",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_close(sdb), SQLITE_OK);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", copy);
    assert_int_equal(r.code, 1);
    assert_int_equal(strncmp(r.out, "NOT OK: first bad seq 2", 23), 0);
    ctl_free(&r);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", copy, "--json");
    assert_int_equal(r.code, 1);
    json_t *j = ctl_json(&r);
    assert_true(json_is_false(json_object_get(j, "ok")));
    assert_int_equal(json_integer_value(json_object_get(j, "first_bad_seq")), 2);
    assert_int_equal(json_integer_value(json_object_get(j, "head_seq")), 1);
    json_decref(j);
    ctl_free(&r);

    /* Not there, or not a database: exit 2. */
    CTL_RAW(&r, NULL, "audit", "verify", "--db", missing);
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, missing));
    ctl_free(&r);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", g_policy);
    assert_int_equal(r.code, 2);
    ctl_free(&r);

    /* With pep gone, an API call cannot reach it. */
    CTL(&r, "agents", "list");
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "cannot reach pep admin API at "));
    ctl_free(&r);
}

/* Copies every *.pem of from into to (created). */
static void copy_keys(const char *from, const char *to) {
    assert_int_equal(mkdir(to, 0700), 0);
    DIR *d = opendir(from);
    assert_non_null(d);
    int copied = 0;
    for (struct dirent *de; (de = readdir(d));) {
        size_t n = strlen(de->d_name);
        if (n < 5 || strcmp(de->d_name + n - 4, ".pem") != 0) continue;
        char a[600], b[600];
        snprintf(a, sizeof(a), "%s/%s", from, de->d_name);
        snprintf(b, sizeof(b), "%s/%s", to, de->d_name);
        assert_int_equal(copy_file(a, b), 0);
        copied++;
    }
    closedir(d);
    assert_true(copied > 0);
}

/* Offline checkpoint signatures, on copies of the store pep left (pep is stopped). */
static void test_audit_verify_forged_checkpoints(void **state) {
    (void)state;
    char db[400], forge_dir[300], forged[400], clean_dir[300], clean[400], keys[400], dir[400];
    snprintf(db, sizeof(db), "%s/pep.db", g_data);
    snprintf(keys, sizeof(keys), "%s/keys", g_data);
    snprintf(forge_dir, sizeof(forge_dir), "%s/forge", g_tmp);
    snprintf(forged, sizeof(forged), "%s/pep.db", forge_dir);
    snprintf(clean_dir, sizeof(clean_dir), "%s/clean", g_tmp);
    snprintf(clean, sizeof(clean), "%s/pep.db", clean_dir);
    assert_int_equal(mkdir(forge_dir, 0700), 0);
    assert_int_equal(mkdir(clean_dir, 0700), 0);
    assert_int_equal(copy_file(db, forged), 0);
    assert_int_equal(copy_file(db, clean), 0);
    forge_rehashed(forged, 2);
    struct ctl_result r = {0};

    /* No key next to the forged copy: the forgery passes the walk, with a warning. */
    CTL_RAW(&r, NULL, "audit", "verify", "--db", forged, "--json");
    assert_int_equal(r.code, 0);
    json_t *j = ctl_json(&r);
    assert_true(json_is_true(json_object_get(j, "ok")));
    assert_true(json_is_false(json_object_get(j, "checkpoints_signed")));
    json_decref(j);
    assert_non_null(strstr(r.err, "pepctl: warning: checkpoint signatures not checked"));
    ctl_free(&r);

    /* --keys: the first checkpoint after the edit still signs the old hash. */
    CTL_RAW(&r, NULL, "audit", "verify", "--db", forged, "--keys", keys, "--json");
    assert_int_equal(r.code, 1);
    j = ctl_json(&r);
    assert_true(json_is_false(json_object_get(j, "ok")));
    assert_int_equal(json_integer_value(json_object_get(j, "first_bad_seq")), 5);
    assert_int_equal(json_integer_value(json_object_get(j, "head_seq")), 4);
    assert_string_equal(jstr(j, "reason"), "checkpoint at seq 5: jwt hash differs");
    assert_true(json_is_true(json_object_get(j, "checkpoints_signed")));
    json_decref(j);
    assert_string_equal(r.err, "");
    ctl_free(&r);

    /* The keys found next to the copy, as in pep's data dir. */
    snprintf(dir, sizeof(dir), "%s/keys", forge_dir);
    copy_keys(keys, dir);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", forged);
    assert_int_equal(r.code, 1);
    assert_string_equal(r.out,
                        "NOT OK: first bad seq 5 (checkpoint at seq 5: jwt hash differs); last "
                        "good seq 4\n");
    assert_string_equal(r.err, "");
    ctl_free(&r);

    /* An untouched copy with its keys verifies, signatures included. */
    snprintf(dir, sizeof(dir), "%s/keys", clean_dir);
    copy_keys(keys, dir);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", clean);
    assert_int_equal(r.code, 0);
    assert_int_equal(strncmp(r.out, "ok: ", 4), 0);
    assert_non_null(strstr(r.out, ", checkpoint signatures valid\n"));
    assert_string_equal(r.err, "");
    ctl_free(&r);

    /* Keys that are not pep's: its checkpoints are signed by an unknown key. */
    char other_data[300];
    struct keyring *other = NULL;
    struct pep_err err = {0};
    snprintf(other_data, sizeof(other_data), "%s/other", g_tmp);
    if (keys_load_or_create(other_data, &other, &err) != 0) fail_msg("keys: %s", err.msg);
    keys_free(other);
    snprintf(dir, sizeof(dir), "%s/keys", other_data);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", clean, "--keys", dir);
    assert_int_equal(r.code, 1);
    static const char unknown[] =
        "NOT OK: first bad seq 5 (checkpoint at seq 5: signed by an unknown key)";
    assert_int_equal(strncmp(r.out, unknown, sizeof(unknown) - 1), 0);
    ctl_free(&r);

    /* --keys names a directory with no key, or none at all: exit 2, the check is not
     * dropped silently. */
    snprintf(dir, sizeof(dir), "%s/empty-keys", g_tmp);
    assert_int_equal(mkdir(dir, 0700), 0);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", clean, "--keys", dir);
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, "pepctl: --keys: "));
    assert_string_equal(r.out, "");
    ctl_free(&r);
    snprintf(dir, sizeof(dir), "%s/no-such-keys", g_tmp);
    CTL_RAW(&r, NULL, "audit", "verify", "--db", clean, "--keys", dir);
    assert_int_equal(r.code, 2);
    assert_non_null(strstr(r.err, dir));
    ctl_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_agents_round_trip),
        cmocka_unit_test(test_token_issue_works_then_revoke),
        cmocka_unit_test(test_token_issue_json_and_disable),
        cmocka_unit_test(test_environment_defaults),
        cmocka_unit_test(test_api_errors),
        cmocka_unit_test(test_unreachable),
        cmocka_unit_test(test_not_pep_mockllm),
        cmocka_unit_test(test_not_pep_shapes),
        cmocka_unit_test(test_operators),
        cmocka_unit_test(test_approvals),
        cmocka_unit_test(test_audit_verify_api),
        cmocka_unit_test(test_audit_verify_api_signature),
        cmocka_unit_test(test_audit_verify_offline),
        cmocka_unit_test(test_audit_verify_forged_checkpoints),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
