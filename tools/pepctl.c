/*
 * pepctl.c — pep's admin CLI: a thin client of the admin API (SPEC 5 and 8) for operators
 * and scripts, plus an offline audit-chain check that needs no server.
 *
 *   pepctl [global flags] GROUP VERB [ARGS] [flags]     (see pepctl_usage for the list)
 *
 * A command is one HTTP call (libcurl easy, bounded: connect 5 s, whole call 30 s, no proxy,
 * http/https only; `audit query --all` makes one per page, and `audit export` streams with a
 * 60 s stall limit instead of a whole-call one) whose JSON answer is printed as is (--json,
 * pretty) or as
 * aligned text meant for people — but only once it is known to be pep's: the answer must carry
 * the Pep-Request-Id header every pep answer has (SPEC 3.5) and have the shape SPEC 5 and 8
 * give the endpoint (errors: SPEC 3.3), else pepctl says the other end is not pep's admin API
 * and exits 2, whatever the output format.  `tokens issue` and `operators token` print the token
 * alone so that `TOKEN=$(pepctl tokens issue bot)` works.  `audit verify --db FILE` copies
 * FILE with SQLite's online backup (one consistent snapshot, WAL included, safe while pep
 * runs) into a private temporary directory and walks the copy
 * (audit_verify_file_checked), so the evidence file itself is only ever read.  The checkpoints'
 * JWTs are checked with pep's keys, read (never created or repaired) from --keys DIR or else from
 * the keys/ directory next to FILE (pep's data dir: DATA/pep.db, DATA/keys/<kid>.pem).  Without a
 * key the chain is still walked and a warning says the signatures went unchecked: the hash column
 * of a checkpoint row is unsigned, so a chain re-hashed after an edit passes such a walk.  Each
 * `--checkpoint CFILE` (a checkpoint kept off the machine, as `audit checkpoint --out` saved
 * it) must then be in the walked chain (audit/kept.h): a store rewritten whole, with
 * checkpoints of its own signed by a key made for the forgery, passes its own walk but not
 * that.  `keys rotate` and `keys list` manage pep's signing keys.
 *
 * Flags: global ones (--url, --token, --data-dir, --json, -h/--help) and the command's
 * own may appear anywhere after `pepctl`, in any order, as `--flag value` or `--flag=value`;
 * `--` ends the flags.  All flags are parsed in one pass against one table, so a flag's
 * value is never mistaken for a flag or a command word.  A flag given twice keeps its last
 * value, except a repeatable one (--checkpoint), whose every value is kept in order.
 *
 * Exit status: 0 done; 1 the audit chain does not verify; 2 usage error, API error,
 * unreachable server, an answer that is not pep's admin API, or an unreadable file.
 *
 * SECURITY: the operator token is a bearer credential.  It is sent only in the
 * Authorization header of calls to the admin URL, never printed in an error or echoed,
 * and wiped from memory before exit.  A token given with --token is visible to other
 * local users in the process list; the help says so and points to PEP_TOKEN and the
 * token file.
 *
 * Threads: single-threaded.
 */
#include "audit/audit.h"
#include "audit/kept.h"
#include "pep/keys.h"
#include "pep/token.h"
#include "pep/util.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define PEPCTL_DEFAULT_URL "http://127.0.0.1:8081"
#define PEPCTL_DEFAULT_DATA_DIR "./var"
#define PEPCTL_CONNECT_TIMEOUT_MS 5000L
#define PEPCTL_TIMEOUT_MS 30000L
#define PEPCTL_MAX_ANSWER (64u << 20) /* bytes; a larger answer is refused, not buffered */
#define PEPCTL_MAX_TOKEN_FILE 16384   /* bytes of DATA/admin.token we are willing to read */
#define PEPCTL_MAX_POSITIONALS 8
#define PEPCTL_MAX_REPEATS 16                  /* values of one repeatable flag */
#define PEPCTL_MAX_CHECKPOINT_FILE (64u << 10) /* bytes of a kept checkpoint file */

enum pepctl_exit { PEPCTL_OK = 0, PEPCTL_NOT_OK = 1, PEPCTL_FAIL = 2 };

/* ---- flags ----------------------------------------------------------------------------- */

enum pepctl_flag {
    F_URL,
    F_TOKEN,
    F_DATA_DIR,
    F_JSON,
    F_HELP,
    F_OWNER,
    F_TENANTS,
    F_SCOPES,
    F_DISABLED,
    F_TTL,
    F_ACR,
    F_AGENT,
    F_ROLES,
    F_DB,
    F_KEYS,
    F_STATE,
    F_REASON,
    F_NOTE,
    /* signing keys and signed checkpoints */
    F_CHECKPOINT,
    /* audit query | export | trace (tools/pepctl_audit.c) */
    F_TENANT,
    F_ACTION,
    F_DECISION,
    F_CODE,
    F_KIND,
    F_REQUEST_ID,
    F_SINCE,
    F_UNTIL,
    F_AFTER_SEQ,
    F_LIMIT,
    F_ALL,
    F_FORMAT,
    F_OUT,
    F_COUNT
};

struct pepctl_flag_def {
    const char *name;  /* "--owner" */
    const char *alias; /* "-h", or NULL */
    bool has_value;    /* takes a value (`--f v` or `--f=v`) rather than being a switch */
    bool repeatable;   /* may be given several times; every value is kept (pepctl_args.all) */
};

static const struct pepctl_flag_def pepctl_flags[F_COUNT] = {
    [F_URL] = {"--url", NULL, true},
    [F_TOKEN] = {"--token", NULL, true},
    [F_DATA_DIR] = {"--data-dir", NULL, true},
    [F_JSON] = {"--json", NULL, false},
    [F_HELP] = {"--help", "-h", false},
    [F_OWNER] = {"--owner", NULL, true},
    [F_TENANTS] = {"--tenants", NULL, true},
    [F_SCOPES] = {"--scopes", NULL, true},
    [F_DISABLED] = {"--disabled", NULL, false},
    [F_TTL] = {"--ttl", NULL, true},
    [F_ACR] = {"--acr", NULL, true},
    [F_AGENT] = {"--agent", NULL, true},
    [F_ROLES] = {"--roles", NULL, true},
    [F_DB] = {"--db", NULL, true},
    [F_KEYS] = {"--keys", NULL, true},
    [F_STATE] = {"--state", NULL, true},
    [F_REASON] = {"--reason", NULL, true},
    [F_NOTE] = {"--note", NULL, true},
    [F_CHECKPOINT] = {"--checkpoint", NULL, true, true},
    [F_TENANT] = {"--tenant", NULL, true},
    [F_ACTION] = {"--action", NULL, true},
    [F_DECISION] = {"--decision", NULL, true},
    [F_CODE] = {"--code", NULL, true},
    [F_KIND] = {"--kind", NULL, true},
    [F_REQUEST_ID] = {"--request-id", NULL, true},
    [F_SINCE] = {"--since", NULL, true},
    [F_UNTIL] = {"--until", NULL, true},
    [F_AFTER_SEQ] = {"--after-seq", NULL, true},
    [F_LIMIT] = {"--limit", NULL, true},
    [F_ALL] = {"--all", NULL, false},
    [F_FORMAT] = {"--format", NULL, true},
    [F_OUT] = {"--out", "-o", true},
};

/* 64 bits: more than 32 flags. */
#define BIT(f) (UINT64_C(1) << (f))
#define PEPCTL_GLOBAL_FLAGS                                                                        \
    (BIT(F_URL) | BIT(F_TOKEN) | BIT(F_DATA_DIR) | BIT(F_JSON) | BIT(F_HELP))

/* Every value of a repeatable flag, in command-line order. */
struct pepctl_values {
    const char *v[PEPCTL_MAX_REPEATS];
    size_t n;
};

/* The command line once parsed: flags by id, the rest in order. */
struct pepctl_args {
    const char *value[F_COUNT]; /* the flag's (last) value ("" for a switch); NULL when not given */
    struct pepctl_values all[F_COUNT];       /* repeatable flags: each value given */
    const char *pos[PEPCTL_MAX_POSITIONALS]; /* GROUP, VERB, then the command's arguments */
    size_t npos;
};

/* One invocation's state. */
struct pepctl {
    const char *url;       /* admin API base URL as given (no trailing '/' is added) */
    const char *data_dir;  /* where admin.token is looked up */
    const char *token_arg; /* --token or PEP_TOKEN, or NULL: then the token file is read */
    char *token;           /* SECURITY: the operator token once loaded; wiped by pepctl_free */
    bool json;             /* print the API's JSON as is */
    CURL *curl;            /* one easy handle, reused for the call(s) of the command */
};

struct pepctl_cmd;
typedef int (*pepctl_run_fn)(struct pepctl *ctx, const struct pepctl_args *a);

/* A command: `GROUP VERB` with nargs positional arguments and some flags. */
struct pepctl_cmd {
    const char *group;
    const char *verb;
    size_t nargs;      /* positional arguments after GROUP VERB, exactly */
    uint64_t flags;    /* BIT()s of the command's own flags (globals are always allowed) */
    uint64_t required; /* BIT()s of the flags it cannot do without */
    const char *synopsis;
    const char *what;
    pepctl_run_fn run;
};

/* ---- output helpers --------------------------------------------------------------------- */

static void pepctl_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void pepctl_errorf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("pepctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* Prints json pretty (2-space indent, members in the server's order) and a newline. */
static int pepctl_print_json(const json_t *j) {
    if (json_dumpf(j, stdout, JSON_INDENT(2)) != 0) return PEPCTL_FAIL;
    fputc('\n', stdout);
    return PEPCTL_OK;
}

/* A JSON value as table text (malloc'd): strings as is, arrays joined with ',', null or
 * missing "-", others in compact JSON.  NULL only when out of memory. */
static char *pepctl_cell(const json_t *v) {
    if (!v || json_is_null(v)) return strdup("-");
    if (json_is_string(v)) return strdup(json_string_value(v));
    if (json_is_array(v)) {
        size_t len = 0, i;
        json_t *item;
        char *out = strdup("");
        json_array_foreach(v, i, item) {
            char *c = pepctl_cell(item);
            char *grown = (out && c) ? realloc(out, len + strlen(c) + 2) : NULL;
            if (!grown) {
                free(c);
                free(out);
                return NULL;
            }
            out = grown;
            if (i > 0) out[len++] = ',';
            memcpy(out + len, c, strlen(c) + 1);
            len += strlen(c);
            free(c);
        }
        return out;
    }
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* An aligned text table: row 0 is the header, columns separated by two spaces, the last
 * column unpadded. */
struct pepctl_table {
    size_t ncols;
    size_t nrows;
    char **cells; /* nrows * ncols, each malloc'd */
    bool failed;  /* an allocation failed: pepctl_table_print reports it */
};

static void pepctl_table_add(struct pepctl_table *t, char **row) {
    char **grown = t->failed ? NULL : realloc(t->cells, (t->nrows + 1) * t->ncols * sizeof *grown);
    bool ok = grown != NULL;
    for (size_t c = 0; c < t->ncols; c++)
        ok = ok && row[c] != NULL;
    if (!ok) {
        if (grown) t->cells = grown;
        for (size_t c = 0; c < t->ncols; c++)
            free(row[c]);
        t->failed = true;
        return;
    }
    t->cells = grown;
    memcpy(t->cells + t->nrows * t->ncols, row, t->ncols * sizeof *row);
    t->nrows++;
}

static int pepctl_table_print(struct pepctl_table *t) {
    int rc = PEPCTL_FAIL;
    size_t *width = calloc(t->ncols, sizeof *width);
    if (!width || t->failed) {
        pepctl_errorf("out of memory");
        goto out;
    }
    for (size_t r = 0; r < t->nrows; r++)
        for (size_t c = 0; c < t->ncols; c++) {
            size_t n = strlen(t->cells[r * t->ncols + c]);
            width[c] = n > width[c] ? n : width[c];
        }
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            const char *cell = t->cells[r * t->ncols + c];
            if (c + 1 < t->ncols)
                printf("%-*s  ", (int)width[c], cell);
            else
                printf("%s\n", cell);
        }
    }
    rc = PEPCTL_OK;
out:
    free(width);
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    t->cells = NULL;
    t->nrows = 0;
    return rc;
}

/* A table column's title: the member's name in capitals (malloc'd; NULL when out of
 * memory, which pepctl_table_add reports). */
static char *pepctl_column_title(const char *member) {
    char *title = strdup(member);
    for (char *p = title; p && *p; p++)
        *p = (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
    return title;
}

/* Prints an object as "key  value" lines, keys aligned, in the server's order. */
static int pepctl_print_object(const json_t *obj) {
    struct pepctl_table t = {.ncols = 2};
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        char *row[2] = {strdup(key), pepctl_cell(v)};
        pepctl_table_add(&t, row);
    }
    return pepctl_table_print(&t);
}

/* ---- the admin API ---------------------------------------------------------------------- */

/* A response being received. */
struct pepctl_buf {
    char *data;
    size_t len;
    bool too_large;      /* the answer passed PEPCTL_MAX_ANSWER and the transfer was stopped */
    bool pep_request_id; /* the last response head carried a non-empty Pep-Request-Id */
};

static size_t pepctl_on_body(char *ptr, size_t size, size_t nmemb, void *arg) {
    struct pepctl_buf *b = arg;
    size_t n = size * nmemb;
    if (n > PEPCTL_MAX_ANSWER - b->len) {
        b->too_large = true;
        return 0;
    }
    char *grown = realloc(b->data, b->len + n + 1);
    if (!grown) return 0;
    b->data = grown;
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

/* Notes whether the response head carries Pep-Request-Id, which every pep answer has (SPEC
 * 3.5).  A new status line starts a new head (after a "100 Continue", say): only the final
 * response's headers count. */
static size_t pepctl_on_header(char *line, size_t size, size_t nitems, void *arg) {
    struct pepctl_buf *b = arg;
    size_t n = size * nitems;
    static const char name[] = "pep-request-id:";
    if (n >= 5 && strncmp(line, "HTTP/", 5) == 0) {
        b->pep_request_id = false;
    } else if (n > sizeof name - 1 && strncasecmp(line, name, sizeof name - 1) == 0) {
        for (size_t i = sizeof name - 1; i < n && !b->pep_request_id; i++)
            b->pep_request_id =
                line[i] != ' ' && line[i] != '\t' && line[i] != '\r' && line[i] != '\n';
    }
    return n;
}

/* Reads the operator token: --token, else PEP_TOKEN, else DATA/admin.token (first line).
 * Returns 0, or PEPCTL_FAIL after saying what is missing. */
static int pepctl_load_token(struct pepctl *ctx) {
    if (ctx->token) return 0;
    char *raw = NULL, *path = NULL;
    size_t len = 0;
    int rc = PEPCTL_FAIL;
    if (ctx->token_arg) {
        raw = strdup(ctx->token_arg);
        if (!raw) {
            pepctl_errorf("out of memory");
            goto out;
        }
        len = strlen(raw);
    } else {
        if (asprintf(&path, "%s/admin.token", ctx->data_dir) < 0) {
            path = NULL;
            pepctl_errorf("out of memory");
            goto out;
        }
        int frc = pep_read_file(path, PEPCTL_MAX_TOKEN_FILE, &raw, &len);
        if (frc != 0) {
            pepctl_errorf("no admin token: cannot read %s (%s); pass --token, set PEP_TOKEN, "
                          "or point --data-dir / PEP_DATA_DIR at pep's data directory",
                          path, frc == PEP_EIO ? strerror(errno) : "file too large");
            goto out;
        }
    }
    /* The token is one line: cut at the first CR/LF, trim surrounding blanks. */
    len = strcspn(raw, "\r\n");
    while (len > 0 && (raw[len - 1] == ' ' || raw[len - 1] == '\t'))
        len--;
    size_t start = strspn(raw, " \t");
    bool printable = len > start;
    for (size_t i = start; i < len && printable; i++)
        printable = (unsigned char)raw[i] > 0x20 && (unsigned char)raw[i] < 0x7f;
    if (!printable) {
        /* SECURITY: say where the bad token came from, never what it holds. */
        pepctl_errorf("the admin token from %s is empty or malformed",
                      ctx->token_arg ? "--token / PEP_TOKEN" : path);
        goto out;
    }
    ctx->token = strndup(raw + start, len - start);
    if (!ctx->token) {
        pepctl_errorf("out of memory");
        goto out;
    }
    rc = 0;
out:
    if (raw) {
        explicit_bzero(raw, strlen(raw));
        free(raw);
    }
    free(path);
    return rc;
}

/*
 * Answer shapes.  pepctl prints nothing, table or --json, that it has not recognised as
 * pep's: another HTTP service on the admin port (a wrong --url, a port reused after pep
 * stopped) would otherwise have its JSON printed, or read as an empty table, with exit 0.
 * Each endpoint's check returns NULL when the answer has the shape SPEC 5 and 8 give it,
 * else what is missing, for the message.  Only what the SPEC fixes and pepctl reads is
 * checked, so that members pep may add later do not break an older pepctl.
 */
typedef const char *(*pepctl_shape_fn)(const json_t *answer);

static bool pepctl_has_string(const json_t *obj, const char *key) {
    return json_is_string(json_object_get(obj, key));
}

/* {"<list>": [{"<key>": "…", …}, …]}: the admin API's lists (SPEC 8). */
static bool pepctl_is_list_of(const json_t *answer, const char *list, const char *key) {
    json_t *items = json_object_get(answer, list), *item;
    size_t i;
    if (!json_is_array(items)) return false;
    json_array_foreach(items, i, item) {
        if (!pepctl_has_string(item, key)) return false;
    }
    return true;
}

static const char *pepctl_shape_agents(const json_t *answer) {
    return pepctl_is_list_of(answer, "agents", "id")
               ? NULL
               : "no 'agents' array of objects with a string 'id'";
}

static const char *pepctl_shape_tokens(const json_t *answer) {
    return pepctl_is_list_of(answer, "tokens", "jti")
               ? NULL
               : "no 'tokens' array of objects with a string 'jti'";
}

/* An agent or an operator, as created, replaced, shown, disabled or enabled. */
static const char *pepctl_shape_identity(const json_t *answer) {
    return pepctl_has_string(answer, "id") ? NULL : "no string 'id'";
}

/* An issued token: {token, jti, expires_at}. */
static const char *pepctl_shape_issued(const json_t *answer) {
    return pepctl_has_string(answer, "token") && pepctl_has_string(answer, "jti") &&
                   pepctl_has_string(answer, "expires_at")
               ? NULL
               : "no string 'token', 'jti' and 'expires_at'";
}

static const char *pepctl_shape_revoked(const json_t *answer) {
    return pepctl_has_string(answer, "jti") ? NULL : "no string 'jti'";
}

/* {"ok":true,"records":N,"head_seq":N,…} or {"ok":false,"first_bad_seq":N,…}. */
static const char *pepctl_shape_verify(const json_t *answer) {
    json_t *ok = json_object_get(answer, "ok");
    if (!json_is_boolean(ok)) return "no boolean 'ok'";
    if (json_is_true(ok) && !(json_is_integer(json_object_get(answer, "records")) &&
                              json_is_integer(json_object_get(answer, "head_seq"))))
        return "'ok' true without integer 'records' and 'head_seq'";
    if (json_is_false(ok) && !json_is_integer(json_object_get(answer, "first_bad_seq")))
        return "'ok' false without an integer 'first_bad_seq'";
    return NULL;
}

static const char *pepctl_shape_approvals(const json_t *answer) {
    return pepctl_is_list_of(answer, "approvals", "id") &&
                   pepctl_is_list_of(answer, "approvals", "state")
               ? NULL
               : "no 'approvals' array of objects with a string 'id' and 'state'";
}

/* One approval or escalation, as shown or changed: {id, state, …}. */
static const char *pepctl_shape_item(const json_t *answer) {
    return pepctl_has_string(answer, "id") && pepctl_has_string(answer, "state")
               ? NULL
               : "no string 'id' and 'state'";
}

static const char *pepctl_shape_upstreams(const json_t *answer) {
    return pepctl_is_list_of(answer, "upstreams", "name") &&
                   pepctl_is_list_of(answer, "upstreams", "state")
               ? NULL
               : "no 'upstreams' array of objects with a string 'name' and 'state'";
}

static const char *pepctl_shape_chains(const json_t *answer) {
    return pepctl_is_list_of(answer, "chains", "name") ? NULL
                                                       : "no 'chains' array of objects with a "
                                                         "string 'name'";
}

static const char *pepctl_shape_escalations(const json_t *answer) {
    return pepctl_is_list_of(answer, "escalations", "id") &&
                   pepctl_is_list_of(answer, "escalations", "state")
               ? NULL
               : "no 'escalations' array of objects with a string 'id' and 'state'";
}

/* Every error pep answers: {"error":{"code":"…",…}} (SPEC 3.3). */
static const char *pepctl_shape_error(const json_t *answer) {
    return pepctl_has_string(json_object_get(answer, "error"), "code")
               ? NULL
               : "no SPEC 3.3 error object with a string 'code'";
}

/* Prints why the API refused, from an answer of the SPEC 3.3 shape: "pepctl: <code>:
 * <message> (HTTP <status>)". */
static void pepctl_report_api_error(long status, const json_t *doc) {
    json_t *err = json_object_get(doc, "error");
    const char *code = json_string_value(json_object_get(err, "code"));
    const char *msg = json_string_value(json_object_get(err, "message"));
    fprintf(stderr, "pepctl: %s: %s (HTTP %ld)\n", code ? code : "-", msg ? msg : "", status);
    /* A refused policy reload carries its list of errors; print them one per line. */
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(err, "errors"), i, item) {
        if (json_is_string(item)) fprintf(stderr, "  %s\n", json_string_value(item));
    }
}

/*
 * One admin API call: method on url + path (path already escaped), with body (borrowed;
 * NULL sends none).  On a 2xx answer from pep (Pep-Request-Id) holding a JSON object of the
 * endpoint's shape (checked by shape): 0 and *answer (caller json_decref()s), *status if
 * status is not NULL.  Otherwise PEPCTL_FAIL after printing why (API error, unreachable
 * server, an answer that is not pep's admin API).
 */
static int pepctl_api(struct pepctl *ctx, const char *method, const char *path, const json_t *body,
                      pepctl_shape_fn shape, json_t **answer, long *status_out) {
    struct pepctl_buf b = {0};
    struct curl_slist *headers = NULL;
    char *url = NULL, *auth = NULL, *payload = NULL;
    json_t *doc = NULL; /* the answer's body parsed, until it is handed to *answer */
    char errbuf[CURL_ERROR_SIZE] = "";
    long status = 0;
    int rc = PEPCTL_FAIL;
    *answer = NULL;

    if (pepctl_load_token(ctx) != 0) goto out;
    if (!ctx->curl && !(ctx->curl = curl_easy_init())) {
        pepctl_errorf("cannot initialise libcurl");
        goto out;
    }
    size_t base_len = strlen(ctx->url);
    while (base_len > 0 && ctx->url[base_len - 1] == '/')
        base_len--;
    if (asprintf(&url, "%.*s%s", (int)base_len, ctx->url, path) < 0 ||
        asprintf(&auth, "Authorization: Bearer %s", ctx->token) < 0) {
        url = auth = NULL;
        pepctl_errorf("out of memory");
        goto out;
    }
    /* curl_slist_append returns the list's head, or NULL (list unchanged) on ENOMEM. */
    headers = curl_slist_append(NULL, auth);
    bool built = headers && curl_slist_append(headers, "Accept: application/json");
    if (built && body) built = curl_slist_append(headers, "Content-Type: application/json") != NULL;
    payload = body ? json_dumps(body, JSON_COMPACT) : NULL;
    if (!built || (body && !payload)) {
        pepctl_errorf("out of memory");
        goto out;
    }

    CURL *c = ctx->curl;
    curl_easy_reset(c);
    CURLcode crc = CURLE_OK;
    /* PITFALLS (libcurl): no signals, bounded time, http(s) only; NOPROXY "*" because the
     * admin API is local: an HTTP(S)_PROXY in the environment must never see the token. */
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_URL, url);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    if (crc == CURLE_OK)
        crc = curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, PEPCTL_CONNECT_TIMEOUT_MS);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, PEPCTL_TIMEOUT_MS);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (crc == CURLE_OK && payload) crc = curl_easy_setopt(c, CURLOPT_POSTFIELDS, payload);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, pepctl_on_body);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, pepctl_on_header);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_HEADERDATA, &b);
    if (crc == CURLE_OK) crc = curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    if (crc != CURLE_OK) {
        pepctl_errorf("cannot set up the request: %s", curl_easy_strerror(crc));
        goto out;
    }
    crc = curl_easy_perform(c);
    if (crc == CURLE_WRITE_ERROR && b.too_large) {
        pepctl_errorf("the admin API's answer is larger than %u bytes", PEPCTL_MAX_ANSWER);
        goto out;
    }
    if (crc != CURLE_OK) {
        /* curl's message names the host and the failure, never the request headers. */
        pepctl_errorf("cannot reach pep admin API at %.*s: %s", (int)base_len, ctx->url,
                      errbuf[0] ? errbuf : curl_easy_strerror(crc));
        goto out;
    }
    if (curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK) status = 0;
    doc = b.data ? json_loadb(b.data, b.len, 0, NULL) : NULL;
    /* The header first: it alone tells pep from another HTTP service, whatever the body. */
    bool ok_status = status >= 200 && status <= 299;
    const char *not_pep = !b.pep_request_id      ? "no Pep-Request-Id header"
                          : !json_is_object(doc) ? "the body is not a JSON object"
                          : !ok_status           ? pepctl_shape_error(doc)
                          : shape                ? shape(doc)
                                                 : NULL;
    if (not_pep) {
        pepctl_errorf("%s: the answer is not pep's admin API (HTTP %ld, %s)", url, status, not_pep);
        goto out;
    }
    if (!ok_status) {
        pepctl_report_api_error(status, doc);
        goto out;
    }
    *answer = doc;
    doc = NULL;
    if (status_out) *status_out = status;
    rc = PEPCTL_OK;
out:
    json_decref(doc);
    if (ctx->curl) curl_easy_setopt(ctx->curl, CURLOPT_ERRORBUFFER, NULL);
    /* SECURITY: wipe our copies of the Authorization header before freeing them. */
    for (struct curl_slist *it = headers; it; it = it->next)
        explicit_bzero(it->data, strlen(it->data));
    curl_slist_free_all(headers);
    if (auth) {
        explicit_bzero(auth, strlen(auth));
        free(auth);
    }
    free(url);
    free(payload);
    if (b.data) {
        /* The answer may hold a freshly issued token. */
        explicit_bzero(b.data, b.len);
        free(b.data);
    }
    return rc;
}

/* "/admin/v1/<a>/<escaped id>/<b>" as a malloc'd string; b may be NULL.  NULL on ENOMEM. */
static char *pepctl_path(struct pepctl *ctx, const char *a, const char *id, const char *b) {
    if (!ctx->curl && !(ctx->curl = curl_easy_init())) return NULL;
    char *esc = curl_easy_escape(ctx->curl, id, 0);
    char *out = NULL;
    if (esc && asprintf(&out, "/admin/v1/%s/%s%s%s", a, esc, b ? "/" : "", b ? b : "") < 0)
        out = NULL;
    curl_free(esc);
    return out;
}

/* ---- argument helpers --------------------------------------------------------------------- */

/* "a,b , c" → ["a","b","c"]; "" → [].  NULL (after a message) when an item is empty. */
static json_t *pepctl_list(const char *flag, const char *csv) {
    json_t *arr = json_array();
    char *copy = strdup(csv);
    if (!arr || !copy) {
        pepctl_errorf("out of memory");
        goto fail;
    }
    if (strspn(copy, " \t") == strlen(copy)) {
        free(copy);
        return arr;
    }
    for (char *item = copy, *next; item; item = next) {
        next = strchr(item, ',');
        if (next) *next++ = '\0';
        item += strspn(item, " \t");
        size_t n = strlen(item);
        while (n > 0 && (item[n - 1] == ' ' || item[n - 1] == '\t'))
            item[--n] = '\0';
        if (n == 0) {
            pepctl_errorf("%s: empty item in '%s' (expected a,b,c)", flag, csv);
            goto fail;
        }
        if (json_array_append_new(arr, json_string(item)) != 0) {
            pepctl_errorf("%s: '%s' is not valid UTF-8", flag, item);
            goto fail;
        }
    }
    free(copy);
    return arr;
fail:
    free(copy);
    json_decref(arr);
    return NULL;
}

/* --ttl as sent to the API: whole seconds ("3600") as a number, a duration ("1h") as is.
 * NULL (after a message) when it is neither. */
static json_t *pepctl_ttl(const char *s) {
    int64_t ms;
    if (*s && strspn(s, "0123456789") == strlen(s) && strlen(s) < 12 && atoll(s) > 0)
        return json_integer(atoll(s));
    if (pep_parse_duration_ms(s, &ms) == 0 && ms >= 1000) return json_string(s);
    pepctl_errorf("--ttl: '%s' is not a duration of at least 1s (e.g. 90s, 15m, 8h, 7d)", s);
    return NULL;
}

/* ---- commands ---------------------------------------------------------------------------- */

static int pepctl_agents_add(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    long status = 0;
    int rc = PEPCTL_FAIL;
    json_t *body = json_object();
    json_t *tenants = pepctl_list("--tenants", a->value[F_TENANTS]);
    json_t *scopes = pepctl_list("--scopes", a->value[F_SCOPES]);
    if (!body || !tenants || !scopes) goto out;
    if (json_object_set_new(body, "id", json_string(a->pos[2])) != 0 ||
        json_object_set_new(body, "owner", json_string(a->value[F_OWNER])) != 0 ||
        json_object_set(body, "tenants", tenants) != 0 ||
        json_object_set(body, "scopes", scopes) != 0 ||
        json_object_set_new(body, "enabled", json_boolean(!a->value[F_DISABLED])) != 0) {
        pepctl_errorf("the agent id and owner must be valid UTF-8");
        goto out;
    }
    if (pepctl_api(ctx, "POST", "/admin/v1/agents", body, pepctl_shape_identity, &answer,
                   &status) != 0)
        goto out;
    if (ctx->json)
        rc = pepctl_print_json(answer);
    else {
        printf("agent %s %s\n", a->pos[2], status == 201 ? "created" : "replaced");
        rc = pepctl_print_object(answer);
    }
out:
    json_decref(body);
    json_decref(tenants);
    json_decref(scopes);
    json_decref(answer);
    return rc;
}

static int pepctl_agents_list(struct pepctl *ctx, const struct pepctl_args *a) {
    (void)a;
    json_t *answer = NULL;
    int rc = PEPCTL_FAIL;
    if (pepctl_api(ctx, "GET", "/admin/v1/agents", NULL, pepctl_shape_agents, &answer, NULL) != 0)
        goto out;
    json_t *agents = json_object_get(answer, "agents"); /* an array: pepctl_shape_agents */
    if (ctx->json) {
        rc = pepctl_print_json(answer);
        goto out;
    }
    static const char *const cols[] = {"id", "owner", "tenants", "scopes", "enabled"};
    struct pepctl_table t = {.ncols = PEP_ARRAY_LEN(cols)};
    char *header[] = {strdup("ID"), strdup("OWNER"), strdup("TENANTS"), strdup("SCOPES"),
                      strdup("ENABLED")};
    pepctl_table_add(&t, header);
    size_t i;
    json_t *agent;
    json_array_foreach(agents, i, agent) {
        char *row[PEP_ARRAY_LEN(cols)];
        for (size_t c = 0; c < PEP_ARRAY_LEN(cols); c++)
            row[c] = pepctl_cell(json_object_get(agent, cols[c]));
        pepctl_table_add(&t, row);
    }
    rc = pepctl_table_print(&t);
out:
    json_decref(answer);
    return rc;
}

/* agents show / disable / enable: one call on /admin/v1/agents/ID[/verb]. */
static int pepctl_agent_call(struct pepctl *ctx, const struct pepctl_args *a, const char *verb) {
    json_t *answer = NULL, *body = verb ? json_object() : NULL;
    int rc = PEPCTL_FAIL;
    char *path = pepctl_path(ctx, "agents", a->pos[2], verb);
    if (!path || (verb && !body)) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (pepctl_api(ctx, verb ? "POST" : "GET", path, body, pepctl_shape_identity, &answer, NULL) !=
        0)
        goto out;
    if (ctx->json)
        rc = pepctl_print_json(answer);
    else if (verb) {
        printf("agent %s %sd\n", a->pos[2], verb);
        rc = PEPCTL_OK;
    } else
        rc = pepctl_print_object(answer);
out:
    free(path);
    json_decref(body);
    json_decref(answer);
    return rc;
}

static int pepctl_agents_show(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_agent_call(ctx, a, NULL);
}

static int pepctl_agents_disable(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_agent_call(ctx, a, "disable");
}

static int pepctl_agents_enable(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_agent_call(ctx, a, "enable");
}

/* Prints an issued token alone (or the whole answer with --json). */
static int pepctl_print_token(struct pepctl *ctx, const json_t *answer) {
    if (ctx->json) return pepctl_print_json(answer);
    const char *token = json_string_value(json_object_get(answer, "token"));
    if (!token) {
        pepctl_errorf("unexpected answer from the admin API: no 'token'");
        return PEPCTL_FAIL;
    }
    printf("%s\n", token);
    return PEPCTL_OK;
}

/* POST /admin/v1/{collection}/ID/tokens with the flags given (--ttl; --scopes and --acr
 * are accepted by the parser for agent tokens only) and prints the token. */
static int pepctl_issue_token(struct pepctl *ctx, const struct pepctl_args *a,
                              const char *collection) {
    json_t *answer = NULL;
    int rc = PEPCTL_FAIL;
    json_t *body = json_object();
    char *path = pepctl_path(ctx, collection, a->pos[2], "tokens");
    if (!body || !path) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (a->value[F_TTL]) {
        json_t *ttl = pepctl_ttl(a->value[F_TTL]);
        if (!ttl || json_object_set_new(body, "ttl", ttl) != 0) goto out;
    }
    if (a->value[F_SCOPES]) {
        json_t *scopes = pepctl_list("--scopes", a->value[F_SCOPES]);
        if (!scopes || json_object_set_new(body, "scopes", scopes) != 0) goto out;
    }
    if (a->value[F_ACR] && json_object_set_new(body, "acr", json_string(a->value[F_ACR])) != 0) {
        pepctl_errorf("--acr: not valid UTF-8");
        goto out;
    }
    if (pepctl_api(ctx, "POST", path, body, pepctl_shape_issued, &answer, NULL) != 0) goto out;
    rc = pepctl_print_token(ctx, answer);
out:
    free(path);
    json_decref(body);
    json_decref(answer);
    return rc;
}

static int pepctl_tokens_issue(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_issue_token(ctx, a, "agents");
}

static int pepctl_tokens_list(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    char *path = NULL, *esc = NULL;
    int rc = PEPCTL_FAIL;
    if (a->value[F_AGENT]) {
        if (!ctx->curl && !(ctx->curl = curl_easy_init())) goto oom;
        esc = curl_easy_escape(ctx->curl, a->value[F_AGENT], 0);
        if (!esc || asprintf(&path, "/admin/v1/tokens?agent=%s", esc) < 0) {
            path = NULL;
            goto oom;
        }
    } else if (!(path = strdup("/admin/v1/tokens")))
        goto oom;
    if (pepctl_api(ctx, "GET", path, NULL, pepctl_shape_tokens, &answer, NULL) != 0) goto out;
    json_t *tokens = json_object_get(answer, "tokens"); /* an array: pepctl_shape_tokens */
    if (ctx->json) {
        rc = pepctl_print_json(answer);
        goto out;
    }
    struct pepctl_table t = {.ncols = 6};
    char *header[] = {strdup("JTI"),       strdup("KIND"),       strdup("SUBJECT"),
                      strdup("ISSUED_AT"), strdup("EXPIRES_AT"), strdup("REVOKED_AT")};
    pepctl_table_add(&t, header);
    size_t i;
    json_t *tok;
    json_array_foreach(tokens, i, tok) {
        /* The subject is under "agent" or "operator" depending on the token's kind. */
        json_t *subject = json_object_get(tok, "agent");
        if (!subject) subject = json_object_get(tok, "operator");
        char *row[] = {pepctl_cell(json_object_get(tok, "jti")),
                       pepctl_cell(json_object_get(tok, "kind")),
                       pepctl_cell(subject),
                       pepctl_cell(json_object_get(tok, "issued_at")),
                       pepctl_cell(json_object_get(tok, "expires_at")),
                       pepctl_cell(json_object_get(tok, "revoked_at"))};
        pepctl_table_add(&t, row);
    }
    rc = pepctl_table_print(&t);
    goto out;
oom:
    pepctl_errorf("out of memory");
out:
    curl_free(esc);
    free(path);
    json_decref(answer);
    return rc;
}

static int pepctl_tokens_revoke(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    int rc = PEPCTL_FAIL;
    char *path = pepctl_path(ctx, "tokens", a->pos[2], NULL);
    if (!path) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (pepctl_api(ctx, "DELETE", path, NULL, pepctl_shape_revoked, &answer, NULL) != 0) goto out;
    if (ctx->json)
        rc = pepctl_print_json(answer);
    else {
        const char *at = json_string_value(json_object_get(answer, "revoked_at"));
        printf("token %s revoked%s%s\n", a->pos[2], at ? " at " : "", at ? at : "");
        rc = PEPCTL_OK;
    }
out:
    free(path);
    json_decref(answer);
    return rc;
}

static int pepctl_operators_add(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    long status = 0;
    int rc = PEPCTL_FAIL;
    json_t *body = json_object();
    json_t *roles = pepctl_list("--roles", a->value[F_ROLES]);
    if (!body || !roles) goto out;
    if (json_object_set_new(body, "id", json_string(a->pos[2])) != 0 ||
        json_object_set(body, "roles", roles) != 0) {
        pepctl_errorf("the operator id must be valid UTF-8");
        goto out;
    }
    if (pepctl_api(ctx, "POST", "/admin/v1/operators", body, pepctl_shape_identity, &answer,
                   &status) != 0)
        goto out;
    if (ctx->json)
        rc = pepctl_print_json(answer);
    else {
        printf("operator %s %s\n", a->pos[2], status == 201 ? "created" : "replaced");
        rc = pepctl_print_object(answer);
    }
out:
    json_decref(body);
    json_decref(roles);
    json_decref(answer);
    return rc;
}

static int pepctl_operators_token(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_issue_token(ctx, a, "operators");
}

/* Prints a verification result ({ok, records, head_seq, head_hash, first_bad_seq?,
 * reason?}, the API's shape) and returns 0 when ok, 1 when not. */
static int pepctl_print_verify(struct pepctl *ctx, const json_t *v) {
    json_t *ok = json_object_get(v, "ok");
    if (!json_is_boolean(ok)) {
        pepctl_errorf("unexpected answer from the admin API: no 'ok'");
        return PEPCTL_FAIL;
    }
    json_t *kept = json_object_get(v, "kept_checkpoints");
    if (ctx->json) {
        if (pepctl_print_json(v) != 0) return PEPCTL_FAIL;
    } else if (json_is_true(ok)) {
        printf("ok: %" JSON_INTEGER_FORMAT " records, head seq %" JSON_INTEGER_FORMAT
               ", head hash %s%s",
               json_integer_value(json_object_get(v, "records")),
               json_integer_value(json_object_get(v, "head_seq")),
               json_string_value(json_object_get(v, "head_hash"))
                   ? json_string_value(json_object_get(v, "head_hash"))
                   : "-",
               json_is_true(json_object_get(v, "checkpoints_signed"))
                   ? ", checkpoint signatures valid"
                   : "");
        if (json_array_size(kept) > 0)
            printf(", %zu kept checkpoint%s in the chain", json_array_size(kept),
                   json_array_size(kept) == 1 ? "" : "s");
        printf("\n");
    } else {
        const char *reason = json_string_value(json_object_get(v, "reason"));
        printf("NOT OK: first bad seq %" JSON_INTEGER_FORMAT
               "%s%s%s; last good seq %" JSON_INTEGER_FORMAT "\n",
               json_integer_value(json_object_get(v, "first_bad_seq")), reason ? " (" : "",
               reason ? reason : "", reason ? ")" : "",
               json_integer_value(json_object_get(v, "head_seq")));
        /* Every kept checkpoint's own verdict, each naming its file. */
        size_t i;
        json_t *k;
        json_array_foreach(kept, i, k) {
            const char *why = json_string_value(json_object_get(k, "reason"));
            if (json_is_true(json_object_get(k, "ok")))
                printf("kept checkpoint %s: seq %" JSON_INTEGER_FORMAT " in the chain\n",
                       json_string_value(json_object_get(k, "file")),
                       json_integer_value(json_object_get(k, "seq")));
            else
                printf("kept checkpoint %s: NOT in the chain, first bad seq %" JSON_INTEGER_FORMAT
                       " (%s)\n",
                       json_string_value(json_object_get(k, "file")),
                       json_integer_value(json_object_get(k, "first_bad_seq")), why ? why : "-");
        }
    }
    return json_is_true(ok) ? PEPCTL_OK : PEPCTL_NOT_OK;
}

/* Best-effort removal of the snapshot directory and the files SQLite may have left. */
static void pepctl_remove_snapshot(const char *dir) {
    static const char *const names[] = {"pep.db", "pep.db-wal", "pep.db-shm", "pep.db-journal"};
    char path[4200];
    for (size_t i = 0; i < PEP_ARRAY_LEN(names); i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
}

/*
 * Copies the database at src_path into copy_path as one consistent snapshot (SQLite online
 * backup: one read transaction on the source, WAL content included), so that a live
 * store can be checked without tearing and the original is only read.  0 or PEPCTL_FAIL
 * after a message.
 */
static int pepctl_snapshot(const char *src_path, const char *copy_path) {
    sqlite3 *src = NULL, *dst = NULL;
    sqlite3_backup *bk = NULL;
    struct pep_err err = {0};
    int rc = PEPCTL_FAIL;
    if (access(src_path, R_OK) != 0) {
        pepctl_errorf("cannot read %s: %s", src_path, strerror(errno));
        goto out;
    }
    if (audit_open_reader(src_path, &src, &err) != 0) {
        pepctl_errorf("%s", err.msg);
        goto out;
    }
    if (sqlite3_open_v2(copy_path, &dst, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
        SQLITE_OK) {
        pepctl_errorf("cannot create the snapshot %s: %s", copy_path,
                      dst ? sqlite3_errmsg(dst) : "out of memory");
        goto out;
    }
    bk = sqlite3_backup_init(dst, "main", src, "main");
    if (!bk) {
        pepctl_errorf("cannot copy %s: %s", src_path, sqlite3_errmsg(dst));
        goto out;
    }
    /* One step copies every page under one read lock; BUSY/LOCKED (a writer holding an
     * exclusive lock, e.g. during a WAL restart) is retried for a bounded time. */
    int src_rc = SQLITE_OK;
    for (int tries = 0; tries < 100; tries++) {
        src_rc = sqlite3_backup_step(bk, -1);
        if (src_rc != SQLITE_BUSY && src_rc != SQLITE_LOCKED) break;
        sqlite3_sleep(50);
    }
    int fin_rc = sqlite3_backup_finish(bk);
    bk = NULL;
    if (src_rc != SQLITE_DONE || fin_rc != SQLITE_OK) {
        pepctl_errorf("cannot copy %s: %s", src_path,
                      sqlite3_errstr(src_rc != SQLITE_DONE ? src_rc : fin_rc));
        goto out;
    }
    rc = 0;
out:
    if (bk) sqlite3_backup_finish(bk);
    if (dst && sqlite3_close(dst) != SQLITE_OK && rc == 0) {
        pepctl_errorf("cannot close the snapshot %s", copy_path);
        rc = PEPCTL_FAIL;
    }
    sqlite3_close(src);
    return rc;
}

/*
 * The keys that checkpoint signatures are checked with offline: --keys DIR (keys_dir), else
 * the keys/ directory next to db_path.  0 with *out, which is NULL when the directory next
 * to db_path yields no key (after a warning: the walk goes on unsigned); PEPCTL_FAIL after
 * a message when keys_dir yields none — a check asked for is not dropped silently.
 */
static int pepctl_offline_keys(const char *db_path, const char *keys_dir, struct keyring **out) {
    struct pep_err err = {0};
    char dir[4200];
    *out = NULL;
    if (keys_dir) {
        if (keys_load_readonly(keys_dir, out, &err) == 0) return 0;
        pepctl_errorf("--keys: %s", err.msg);
        return PEPCTL_FAIL;
    }
    const char *slash = strrchr(db_path, '/');
    int n = slash ? snprintf(dir, sizeof dir, "%.*s/keys", (int)(slash - db_path), db_path)
                  : snprintf(dir, sizeof dir, "keys");
    if (n < 0 || (size_t)n >= sizeof dir)
        pep_err_set(&err, PEP_EINVAL, "the path of %s is too long", db_path);
    else if (keys_load_readonly(dir, out, &err) == 0)
        return 0;
    pepctl_errorf("warning: checkpoint signatures not checked: %s (--keys DIR names pep's keys)",
                  err.msg);
    return 0;
}

/* Reads one --checkpoint file (as `pepctl audit checkpoint` saves it) into kc.  0, or
 * PEPCTL_FAIL after a message naming it. */
static int pepctl_read_kept(const char *file, struct audit_kept *kc) {
    char *text = NULL, why[200];
    size_t len = 0;
    int frc = pep_read_file(file, PEPCTL_MAX_CHECKPOINT_FILE, &text, &len);
    if (frc != 0) {
        pepctl_errorf("--checkpoint %s: cannot read it: %s", file,
                      frc == PEP_EIO ? strerror(errno) : "file too large");
        return PEPCTL_FAIL;
    }
    int rc = audit_kept_parse(text, len, kc, why, sizeof why);
    free(text);
    if (rc != 0) {
        pepctl_errorf("--checkpoint %s: not a checkpoint as `pepctl audit checkpoint` saves it: %s",
                      file, why);
        return PEPCTL_FAIL;
    }
    return 0;
}

/*
 * Checks each kept checkpoint against the walked snapshot at copy (res: the walk) and adds
 * to v, the walk's answer: "kept_checkpoints" [{file, seq, ok, first_bad_seq?, reason?}];
 * and when a kept checkpoint fails before the walk's own first bad seq (or the walk held),
 * ok false, first_bad_seq, reason "kept checkpoint FILE: …", and the last good seq and
 * hash before it.  0, or PEPCTL_FAIL after a message.
 */
static int pepctl_check_kept(const char *copy, const struct audit_verify_result *res,
                             struct keyring *keys, const struct pepctl_values *files,
                             const struct audit_kept *kept, json_t *v) {
    sqlite3 *db = NULL;
    struct pep_err err = {0};
    json_t *list = json_array();
    int64_t first_bad = res->ok ? 0 : res->first_bad_seq;
    char reason[600] = "";
    int rc = PEPCTL_FAIL;
    if (!list || json_object_set(v, "kept_checkpoints", list) != 0) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (audit_open_reader(copy, &db, &err) != 0) {
        pepctl_errorf("%s", err.msg);
        goto out;
    }
    for (size_t i = 0; i < files->n; i++) {
        int64_t bad = 0;
        char why[300] = "";
        int krc = audit_kept_check(db, res, token_check_checkpoint, keys, &kept[i], &bad, why,
                                   sizeof why);
        if (krc < 0) {
            pepctl_errorf("--checkpoint %s: %s", files->v[i], why);
            goto out;
        }
        json_t *item = json_pack("{s:s, s:I, s:b}", "file", files->v[i], "seq",
                                 (json_int_t)kept[i].seq, "ok", krc == 0);
        if (item && krc != 0) {
            json_object_set_new(item, "first_bad_seq", json_integer(bad));
            json_object_set_new(item, "reason", json_string(why));
        }
        if (!item || json_array_append_new(list, item) != 0) {
            pepctl_errorf("out of memory");
            goto out;
        }
        if (krc != 0 && (first_bad == 0 || bad < first_bad)) {
            first_bad = bad;
            snprintf(reason, sizeof reason, "kept checkpoint %s: %s", files->v[i], why);
        }
    }
    if (reason[0]) { /* a kept checkpoint is the first failure */
        uint8_t h[32] = {0};
        char hex[65];
        if (first_bad > 1 && audit_row_hash(db, first_bad - 1, h) != 0) memset(h, 0, sizeof h);
        pep_hex(h, sizeof h, hex);
        if (json_object_set_new(v, "ok", json_false()) != 0 ||
            json_object_set_new(v, "first_bad_seq", json_integer(first_bad)) != 0 ||
            json_object_set_new(v, "reason", json_string(reason)) != 0 ||
            json_object_set_new(v, "head_seq", json_integer(first_bad - 1)) != 0 ||
            json_object_set_new(v, "head_hash", json_string(hex)) != 0) {
            pepctl_errorf("out of memory");
            goto out;
        }
    }
    rc = 0;
out:
    json_decref(list);
    sqlite3_close(db);
    return rc;
}

/* audit verify --db FILE [--keys DIR] [--checkpoint CFILE]…: the same walk as the API's,
 * offline, on a snapshot of FILE; then each kept checkpoint must be in the chain. */
static int pepctl_audit_verify_offline(struct pepctl *ctx, const struct pepctl_args *a) {
    const char *db_path = a->value[F_DB], *keys_dir = a->value[F_KEYS];
    const struct pepctl_values *files = &a->all[F_CHECKPOINT];
    const char *tmp = getenv("TMPDIR");
    char dir[4096], copy[4200];
    struct audit_verify_result res;
    struct audit_kept kept[PEPCTL_MAX_REPEATS] = {0};
    struct pep_err err = {0};
    struct keyring *keys = NULL;
    json_t *v = NULL;
    bool made_dir = false;
    int rc = PEPCTL_FAIL;
    /* The kept checkpoints first: a file that cannot be read is a usage error, before any
     * work. */
    for (size_t i = 0; i < files->n; i++)
        if (pepctl_read_kept(files->v[i], &kept[i]) != 0) goto out;
    snprintf(dir, sizeof dir, "%s/pepctl-verify-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        pepctl_errorf("cannot create a temporary directory in %s: %s", tmp && *tmp ? tmp : "/tmp",
                      strerror(errno));
        goto out;
    }
    made_dir = true;
    snprintf(copy, sizeof copy, "%s/pep.db", dir);
    if (pepctl_snapshot(db_path, copy) != 0) goto out;
    if (pepctl_offline_keys(db_path, keys_dir, &keys) != 0) goto out;
    if (files->n > 0 && !keys) {
        /* A kept checkpoint is evidence only through its signature: not checked, it would
         * be a file anyone could write. */
        pepctl_errorf("--checkpoint: no key to check its signature with; name pep's keys with "
                      "--keys DIR");
        goto out;
    }
    if (audit_verify_file_checked(copy, keys ? token_check_checkpoint : NULL, keys, &res, &err) !=
        0) {
        pepctl_errorf("%s is not a readable pep audit store: %s", db_path, res.reason);
        goto out;
    }
    if (!(v = audit_verify_result_json(&res))) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (files->n > 0 && pepctl_check_kept(copy, &res, keys, files, kept, v) != 0) goto out;
    rc = pepctl_print_verify(ctx, v);
out:
    for (size_t i = 0; i < files->n; i++)
        audit_kept_clear(&kept[i]);
    json_decref(v);
    keys_free(keys);
    if (made_dir) pepctl_remove_snapshot(dir);
    return rc;
}

/* ---- approvals --------------------------------------------------------------------------------
 */

/* GET path (checked by shape) and prints the array `list` as a table of the members cols
 * (headers are the member names in capitals), or the JSON with --json. */
static int pepctl_list_table(struct pepctl *ctx, const char *path, pepctl_shape_fn shape,
                             const char *list, const char *const *cols, size_t ncols) {
    json_t *answer = NULL;
    if (pepctl_api(ctx, "GET", path, NULL, shape, &answer, NULL) != 0) return PEPCTL_FAIL;
    int rc;
    if (ctx->json) {
        rc = pepctl_print_json(answer);
    } else {
        struct pepctl_table t = {.ncols = ncols};
        char *header[16];
        for (size_t c = 0; c < ncols; c++)
            header[c] = pepctl_column_title(cols[c]);
        pepctl_table_add(&t, header);
        size_t i;
        json_t *item;
        json_array_foreach(json_object_get(answer, list), i, item) {
            char *row[16];
            for (size_t c = 0; c < ncols; c++)
                row[c] = pepctl_cell(json_object_get(item, cols[c]));
            pepctl_table_add(&t, row);
        }
        rc = pepctl_table_print(&t);
    }
    json_decref(answer);
    return rc;
}

/* GET /admin/v1/COLLECTION?state=S (S from --state, else default_state) as a table. */
static int pepctl_state_list(struct pepctl *ctx, const struct pepctl_args *a,
                             const char *collection, const char *default_state,
                             pepctl_shape_fn shape, const char *const *cols, size_t ncols) {
    char *path = NULL, *esc = NULL;
    int rc = PEPCTL_FAIL;
    const char *state = a->value[F_STATE] ? a->value[F_STATE] : default_state;
    if (!ctx->curl && !(ctx->curl = curl_easy_init())) goto oom;
    esc = curl_easy_escape(ctx->curl, state, 0);
    if (!esc || asprintf(&path, "/admin/v1/%s?state=%s", collection, esc) < 0) {
        path = NULL;
        goto oom;
    }
    rc = pepctl_list_table(ctx, path, shape, collection, cols, ncols);
    goto out;
oom:
    pepctl_errorf("out of memory");
out:
    curl_free(esc);
    free(path);
    return rc;
}

/* GET /admin/v1/COLLECTION/ID, or POST …/ID/VERB with {body_key: the value of body_flag}
 * when given; prints the item as it stands after the call ("<what> ID <done>" first for a
 * change). */
static int pepctl_item_call(struct pepctl *ctx, const struct pepctl_args *a, const char *collection,
                            const char *what, const char *verb, const char *done,
                            const char *body_key, enum pepctl_flag body_flag) {
    json_t *answer = NULL, *body = NULL;
    int rc = PEPCTL_FAIL;
    char *path = pepctl_path(ctx, collection, a->pos[2], verb);
    if (verb) {
        body = json_object();
        if (body && a->value[body_flag] &&
            json_object_set_new(body, body_key, json_string(a->value[body_flag])) != 0) {
            pepctl_errorf("%s: not valid UTF-8", pepctl_flags[body_flag].name);
            goto out;
        }
    }
    if (!path || (verb && !body)) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (pepctl_api(ctx, verb ? "POST" : "GET", path, body, pepctl_shape_item, &answer, NULL) != 0)
        goto out;
    if (ctx->json) {
        rc = pepctl_print_json(answer);
        goto out;
    }
    if (verb) printf("%s %s %s\n", what, a->pos[2], done);
    rc = pepctl_print_object(answer);
out:
    free(path);
    json_decref(body);
    json_decref(answer);
    return rc;
}

static int pepctl_approvals_list(struct pepctl *ctx, const struct pepctl_args *a) {
    static const char *const cols[] = {"id",     "state", "agent",      "tenant",    "action",
                                       "method", "path",  "created_at", "expires_at"};
    return pepctl_state_list(ctx, a, "approvals", "pending", pepctl_shape_approvals, cols,
                             PEP_ARRAY_LEN(cols));
}

static int pepctl_approvals_show(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_item_call(ctx, a, "approvals", "approval", NULL, NULL, "reason", F_REASON);
}

static int pepctl_approvals_approve(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_item_call(ctx, a, "approvals", "approval", "approve", "approved", "reason",
                            F_REASON);
}

static int pepctl_approvals_deny(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_item_call(ctx, a, "approvals", "approval", "deny", "denied", "reason", F_REASON);
}

/* ---- upstreams, chains, escalations -------------------------------------------------------- */

static int pepctl_upstreams(struct pepctl *ctx, const struct pepctl_args *a) {
    (void)a;
    static const char *const cols[] = {"name", "state", "since", "requests", "failures", "breaker"};
    return pepctl_list_table(ctx, "/admin/v1/upstreams", pepctl_shape_upstreams, "upstreams", cols,
                             PEP_ARRAY_LEN(cols));
}

/* One line per chain and horizon: its indicators; then its objectives. */
static int pepctl_chains(struct pepctl *ctx, const struct pepctl_args *a) {
    (void)a;
    json_t *answer = NULL;
    if (pepctl_api(ctx, "GET", "/admin/v1/chains", NULL, pepctl_shape_chains, &answer, NULL) != 0)
        return PEPCTL_FAIL;
    int rc;
    if (ctx->json) {
        rc = pepctl_print_json(answer);
    } else {
        static const char *const ind[] = {"requests",
                                          "first_attempt_failed",
                                          "retry_success_rate",
                                          "fallback_activation_rate",
                                          "escalation_rate",
                                          "mean_ms",
                                          "p95_ms"};
        struct pepctl_table t = {.ncols = 2 + PEP_ARRAY_LEN(ind)};
        char *header[2 + PEP_ARRAY_LEN(ind)] = {strdup("CHAIN"), strdup("WINDOW")};
        for (size_t c = 0; c < PEP_ARRAY_LEN(ind); c++)
            header[2 + c] = pepctl_column_title(ind[c]);
        pepctl_table_add(&t, header);
        size_t i;
        json_t *chain;
        json_array_foreach(json_object_get(answer, "chains"), i, chain) {
            static const char *const windows[] = {"since_start", "last_hour"};
            for (size_t w = 0; w < 2; w++) {
                json_t *v = json_object_get(chain, windows[w]);
                char *row[2 + PEP_ARRAY_LEN(ind)] = {pepctl_cell(json_object_get(chain, "name")),
                                                     strdup(windows[w])};
                for (size_t c = 0; c < PEP_ARRAY_LEN(ind); c++)
                    row[2 + c] = pepctl_cell(json_object_get(v, ind[c]));
                pepctl_table_add(&t, row);
            }
        }
        rc = pepctl_table_print(&t);
    }
    json_decref(answer);
    return rc;
}

static int pepctl_escalations_list(struct pepctl *ctx, const struct pepctl_args *a) {
    static const char *const cols[] = {"id",    "state",  "chain",     "request_id",
                                       "agent", "action", "created_at"};
    return pepctl_state_list(ctx, a, "escalations", "open", pepctl_shape_escalations, cols,
                             PEP_ARRAY_LEN(cols));
}

static int pepctl_escalations_show(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_item_call(ctx, a, "escalations", "escalation", NULL, NULL, "note", F_NOTE);
}

static int pepctl_escalations_resolve(struct pepctl *ctx, const struct pepctl_args *a) {
    return pepctl_item_call(ctx, a, "escalations", "escalation", "resolve", "resolved", "note",
                            F_NOTE);
}

static void pepctl_usage(FILE *f);

static int pepctl_audit_verify(struct pepctl *ctx, const struct pepctl_args *a) {
    if (a->value[F_DB]) return pepctl_audit_verify_offline(ctx, a);
    if (a->value[F_KEYS] || a->value[F_CHECKPOINT]) {
        /* The server checks with its own keys; a directory here would be silently unused. */
        pepctl_errorf("%s goes with --db: pepctl audit verify --db FILE [--keys DIR] "
                      "[--checkpoint CFILE]...",
                      a->value[F_KEYS] ? "--keys" : "--checkpoint");
        pepctl_usage(stderr);
        return PEPCTL_FAIL;
    }
    json_t *answer = NULL;
    int rc = PEPCTL_FAIL;
    if (pepctl_api(ctx, "GET", "/admin/v1/audit/verify", NULL, pepctl_shape_verify, &answer,
                   NULL) == 0)
        rc = pepctl_print_verify(ctx, answer);
    json_decref(answer);
    return rc;
}

/* ---- signing keys and signed checkpoints (SPEC 1, 5, 6.4) ------------------------------------ */

/* {"seq": N, "hash": "<hex>", "jwt": "…"} (SPEC 8). */
static const char *pepctl_shape_checkpoint(const json_t *answer) {
    return json_is_integer(json_object_get(answer, "seq")) && pepctl_has_string(answer, "hash") &&
                   pepctl_has_string(answer, "jwt")
               ? NULL
               : "no integer 'seq' with a string 'hash' and 'jwt'";
}

static const char *pepctl_shape_keys(const json_t *answer) {
    return pepctl_is_list_of(answer, "keys", "kid") && pepctl_is_list_of(answer, "keys", "state")
               ? NULL
               : "no 'keys' array of objects with a string 'kid' and 'state'";
}

static const char *pepctl_shape_rotated(const json_t *answer) {
    return pepctl_has_string(answer, "kid") && pepctl_has_string(answer, "old_kid")
               ? NULL
               : "no string 'kid' and 'old_kid'";
}

/* audit checkpoint [--out FILE]: the latest signed checkpoint as the API answers it, to
 * keep off the machine (stdout, or FILE written atomically). */
static int pepctl_audit_checkpoint(struct pepctl *ctx, const struct pepctl_args *a) {
    json_t *answer = NULL;
    char *text = NULL;
    int rc = PEPCTL_FAIL;
    if (pepctl_api(ctx, "GET", "/admin/v1/audit/checkpoints/latest", NULL, pepctl_shape_checkpoint,
                   &answer, NULL) != 0)
        goto out;
    const char *out = a->value[F_OUT];
    if (!out) {
        rc = pepctl_print_json(answer);
        goto out;
    }
    text = json_dumps(answer, JSON_INDENT(2));
    size_t len = text ? strlen(text) : 0;
    char *grown = text ? realloc(text, len + 2) : NULL;
    if (!grown) {
        pepctl_errorf("out of memory");
        goto out;
    }
    text = grown;
    text[len++] = '\n';
    text[len] = '\0';
    /* Not a secret: anyone may read a checkpoint (it is verified with the public JWKS). */
    if (pep_write_file_atomic(out, text, len, 0644) != 0) {
        pepctl_errorf("--out %s: cannot write it: %s", out, strerror(errno));
        goto out;
    }
    if (ctx->json)
        rc = pepctl_print_json(answer);
    else {
        printf("checkpoint at seq %" JSON_INTEGER_FORMAT " saved to %s\n",
               json_integer_value(json_object_get(answer, "seq")), out);
        rc = PEPCTL_OK;
    }
out:
    free(text);
    json_decref(answer);
    return rc;
}

static int pepctl_keys_list(struct pepctl *ctx, const struct pepctl_args *a) {
    (void)a;
    static const char *const cols[] = {"kid", "state", "created_at", "retires_at"};
    return pepctl_list_table(ctx, "/admin/v1/keys", pepctl_shape_keys, "keys", cols,
                             PEP_ARRAY_LEN(cols));
}

static int pepctl_keys_rotate(struct pepctl *ctx, const struct pepctl_args *a) {
    (void)a;
    json_t *answer = NULL, *body = json_object();
    int rc = PEPCTL_FAIL;
    if (!body) {
        pepctl_errorf("out of memory");
        goto out;
    }
    if (pepctl_api(ctx, "POST", "/admin/v1/keys/rotate", body, pepctl_shape_rotated, &answer,
                   NULL) != 0)
        goto out;
    if (ctx->json) {
        rc = pepctl_print_json(answer);
        goto out;
    }
    const char *until = json_string_value(json_object_get(answer, "old_retires_at"));
    printf("key %s signs from now on; key %s verifies tokens until %s\n",
           json_string_value(json_object_get(answer, "kid")),
           json_string_value(json_object_get(answer, "old_kid")), until ? until : "-");
    rc = PEPCTL_OK;
out:
    json_decref(body);
    json_decref(answer);
    return rc;
}

/* audit query | export | trace: one translation unit with this file (see its top). */
#include "tools/pepctl_audit.c"

static const struct pepctl_cmd pepctl_cmds[] = {
    {"agents", "add", 1, BIT(F_OWNER) | BIT(F_TENANTS) | BIT(F_SCOPES) | BIT(F_DISABLED),
     BIT(F_OWNER) | BIT(F_TENANTS) | BIT(F_SCOPES),
     "agents add ID --owner OWNER --tenants T1,T2 --scopes S1,S2 [--disabled]",
     "create or replace an agent", pepctl_agents_add},
    {"agents", "list", 0, 0, 0, "agents list", "list the agents", pepctl_agents_list},
    {"agents", "show", 1, 0, 0, "agents show ID", "show one agent", pepctl_agents_show},
    {"agents", "disable", 1, 0, 0, "agents disable ID", "refuse all of the agent's tokens",
     pepctl_agents_disable},
    {"agents", "enable", 1, 0, 0, "agents enable ID", "accept the agent's tokens again",
     pepctl_agents_enable},
    {"tokens", "issue", 1, BIT(F_TTL) | BIT(F_SCOPES) | BIT(F_ACR), 0,
     "tokens issue AGENT [--ttl 1h] [--scopes S1,S2] [--acr mfa]",
     "issue an agent token; prints the token alone (--json: token, jti, expires_at)",
     pepctl_tokens_issue},
    {"tokens", "list", 0, BIT(F_AGENT), 0, "tokens list [--agent ID]",
     "list issued tokens (never the tokens themselves)", pepctl_tokens_list},
    {"tokens", "revoke", 1, 0, 0, "tokens revoke JTI", "revoke a token, effective at once",
     pepctl_tokens_revoke},
    {"operators", "add", 1, BIT(F_ROLES), BIT(F_ROLES), "operators add ID --roles R1,R2",
     "create or replace an operator (roles: admin, approver, auditor)", pepctl_operators_add},
    {"operators", "token", 1, BIT(F_TTL), 0, "operators token ID [--ttl 8h]",
     "issue an operator token; prints the token alone", pepctl_operators_token},
    {"approvals", "list", 0, BIT(F_STATE), 0, "approvals list [--state pending|approved|...|all]",
     "list approvals (default: pending), oldest first", pepctl_approvals_list},
    {"approvals", "show", 1, 0, 0, "approvals show ID",
     "what a human needs to decide: action, agent, owner, tenant, method, path, body fields",
     pepctl_approvals_show},
    {"approvals", "approve", 1, BIT(F_REASON), 0, "approvals approve ID [--reason TEXT]",
     "approve a pending approval (your operator id is recorded)", pepctl_approvals_approve},
    {"approvals", "deny", 1, BIT(F_REASON), BIT(F_REASON), "approvals deny ID --reason TEXT",
     "deny a pending approval", pepctl_approvals_deny},
    {"upstreams", "list", 0, 0, 0, "upstreams list",
     "each upstream's circuit breaker: state, since when, requests and failures in its window",
     pepctl_upstreams},
    {"chains", "list", 0, 0, 0, "chains list",
     "each chain's reliability indicators, since start and over the last hour", pepctl_chains},
    {"escalations", "list", 0, BIT(F_STATE), 0, "escalations list [--state open|resolved|all]",
     "the human escalation queue (default: open), oldest first", pepctl_escalations_list},
    {"escalations", "show", 1, 0, 0, "escalations show ID",
     "one escalation: chain, request, agent, every attempt", pepctl_escalations_show},
    {"escalations", "resolve", 1, BIT(F_NOTE), 0, "escalations resolve ID [--note TEXT]",
     "mark an escalation resolved (your operator id is recorded)", pepctl_escalations_resolve},
    {"audit", "verify", 0, BIT(F_DB) | BIT(F_KEYS) | BIT(F_CHECKPOINT), 0,
     "audit verify [--db FILE [--keys DIR] [--checkpoint CFILE]...]",
     "walk the audit hash chain and check the signed checkpoints (--db: offline, on a\n"
     "      snapshot of FILE, no server; checkpoint signatures checked with the keys in DIR,\n"
     "      else in the keys/ directory next to FILE, else not checked: a warning says so);\n"
     "      each --checkpoint CFILE (saved by `audit checkpoint`) must be in the chain, its\n"
     "      signature valid with those keys; exit 1 when it does not verify",
     pepctl_audit_verify},
    {"audit", "checkpoint", 0, BIT(F_OUT), 0, "audit checkpoint [--out FILE]",
     "the latest signed checkpoint as JSON, to keep off the machine (--out: saved to FILE)",
     pepctl_audit_checkpoint},
    {"keys", "list", 0, 0, 0, "keys list",
     "the signing keys: kid, state (active | verifying | retired), created_at, retires_at",
     pepctl_keys_list},
    {"keys", "rotate", 0, 0, 0, "keys rotate",
     "a new signing key signs from now on; the old one verifies until its tokens expire",
     pepctl_keys_rotate},
    {"audit", "query", 0, PEPCTL_AUDIT_FILTER_FLAGS | BIT(F_LIMIT) | BIT(F_ALL), 0,
     "audit query [--agent ID] [--tenant T] [--action A] [--decision allow|deny] [--code C]\n"
     "      [--kind decision|outcome|admin|system] [--request-id ID] [--since T] [--until T]\n"
     "      [--after-seq N] [--limit N] [--all]",
     "audit records, oldest first, as a table (--json: the API's answer); T is RFC 3339 or\n"
     "      a duration back from now (--since 1h, --since 7d); --all follows every page",
     pepctl_audit_query},
    {"audit", "export", 0, PEPCTL_AUDIT_FILTER_FLAGS | BIT(F_FORMAT) | BIT(F_OUT), BIT(F_FORMAT),
     "audit export --format ndjson|csv [the filters of audit query] [-o FILE]",
     "stream the matching records to FILE (or stdout): NDJSON with each record's text and\n"
     "      hashes (the chain can be recomputed from it), or CSV with a header row",
     pepctl_audit_export},
    {"audit", "trace", 1, 0, 0, "audit trace REQUEST_ID",
     "everything recorded about one request, in order: its decision, the approval created,\n"
     "      decided and used, the outcome with every attempt, the escalation",
     pepctl_audit_trace},
};

static void pepctl_usage(FILE *f) {
    fputs("usage: pepctl [global flags] COMMAND [ARGS] [flags]\n\ncommands:\n", f);
    for (size_t i = 0; i < PEP_ARRAY_LEN(pepctl_cmds); i++)
        fprintf(f, "  pepctl %s\n      %s\n", pepctl_cmds[i].synopsis, pepctl_cmds[i].what);
    fputs("\nglobal flags (before or after the command):\n"
          "  --url URL        admin API (default: $PEP_ADMIN_URL, else " PEPCTL_DEFAULT_URL ")\n"
          "  --token TOKEN    operator token (default: $PEP_TOKEN, else DATA/admin.token);\n"
          "                   prefer the variable or the file: a flag is visible in ps\n"
          "  --data-dir DATA  pep's data directory (default: $PEP_DATA_DIR, "
          "else " PEPCTL_DEFAULT_DATA_DIR ")\n"
          "  --json           print the API's JSON answer as is, pretty\n"
          "  -h, --help       this help\n"
          "\nexit status: 0 done, 1 the audit chain does not verify, 2 usage error, API error,\n"
          "unreachable admin API, an answer that is not pep's admin API, or a --db FILE,\n"
          "--keys DIR or --checkpoint CFILE that cannot be read\n",
          f);
}

/* Parses argv in one pass against the table of every flag.  0, or PEPCTL_FAIL after a
 * message. */
static int pepctl_parse(int argc, char **argv, struct pepctl_args *a) {
    bool flags_done = false;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (flags_done || arg[0] != '-' || arg[1] == '\0') {
            if (a->npos == PEPCTL_MAX_POSITIONALS) {
                pepctl_errorf("too many arguments");
                return PEPCTL_FAIL;
            }
            a->pos[a->npos++] = arg;
            continue;
        }
        if (strcmp(arg, "--") == 0) {
            flags_done = true;
            continue;
        }
        const char *eq = strchr(arg, '=');
        size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        int f = 0;
        for (; f < F_COUNT; f++) {
            const struct pepctl_flag_def *d = &pepctl_flags[f];
            if ((strlen(d->name) == name_len && strncmp(arg, d->name, name_len) == 0) ||
                (d->alias && strlen(d->alias) == name_len && strncmp(arg, d->alias, name_len) == 0))
                break;
        }
        if (f == F_COUNT) {
            pepctl_errorf("unknown flag '%.*s'", (int)name_len, arg);
            return PEPCTL_FAIL;
        }
        if (!pepctl_flags[f].has_value) {
            if (eq) {
                pepctl_errorf("%s takes no value", pepctl_flags[f].name);
                return PEPCTL_FAIL;
            }
            a->value[f] = "";
        } else if (eq) {
            a->value[f] = eq + 1;
        } else if (i + 1 < argc) {
            a->value[f] = argv[++i];
        } else {
            pepctl_errorf("%s needs a value", pepctl_flags[f].name);
            return PEPCTL_FAIL;
        }
        if (pepctl_flags[f].repeatable) {
            struct pepctl_values *all = &a->all[f];
            if (all->n == PEPCTL_MAX_REPEATS) {
                pepctl_errorf("%s is given more than %d times", pepctl_flags[f].name,
                              PEPCTL_MAX_REPEATS);
                return PEPCTL_FAIL;
            }
            all->v[all->n++] = a->value[f];
        }
    }
    return 0;
}

/* Finds the command and checks its arguments and flags.  NULL after a message. */
static const struct pepctl_cmd *pepctl_check(const struct pepctl_args *a) {
    if (a->npos == 0) {
        pepctl_errorf("no command given");
        return NULL;
    }
    /* A group alone means its `list` (pepctl upstreams, pepctl escalations). */
    const char *verb = a->npos >= 2 ? a->pos[1] : "list";
    const struct pepctl_cmd *cmd = NULL;
    for (size_t i = 0; i < PEP_ARRAY_LEN(pepctl_cmds) && !cmd; i++)
        if (strcmp(pepctl_cmds[i].group, a->pos[0]) == 0 && strcmp(pepctl_cmds[i].verb, verb) == 0)
            cmd = &pepctl_cmds[i];
    if (!cmd && a->npos < 2) {
        pepctl_errorf("'%s' needs a command word", a->pos[0]);
        return NULL;
    }
    if (!cmd) {
        pepctl_errorf("unknown command '%s %s'", a->pos[0], a->pos[1]);
        return NULL;
    }
    if ((a->npos >= 2 ? a->npos - 2 : 0) != cmd->nargs) {
        pepctl_errorf("'%s %s' takes %zu argument%s: pepctl %s", cmd->group, cmd->verb, cmd->nargs,
                      cmd->nargs == 1 ? "" : "s", cmd->synopsis);
        return NULL;
    }
    for (size_t i = 2; i < a->npos; i++)
        if (a->pos[i][0] == '\0') {
            pepctl_errorf("'%s %s': an empty argument", cmd->group, cmd->verb);
            return NULL;
        }
    for (int f = 0; f < F_COUNT; f++) {
        if (a->value[f] && !(BIT(f) & (cmd->flags | PEPCTL_GLOBAL_FLAGS))) {
            pepctl_errorf("%s is not a flag of '%s %s'", pepctl_flags[f].name, cmd->group,
                          cmd->verb);
            return NULL;
        }
        if (!a->value[f] && (BIT(f) & cmd->required)) {
            pepctl_errorf("'%s %s' needs %s: pepctl %s", cmd->group, cmd->verb,
                          pepctl_flags[f].name, cmd->synopsis);
            return NULL;
        }
    }
    static const int non_empty[] = {F_URL, F_TOKEN, F_DATA_DIR, F_OWNER, F_TENANTS, F_ROLES,
                                    F_TTL, F_ACR,   F_AGENT,    F_DB,    F_KEYS,    F_OUT};
    for (size_t i = 0; i < PEP_ARRAY_LEN(non_empty); i++)
        if (a->value[non_empty[i]] && a->value[non_empty[i]][0] == '\0') {
            pepctl_errorf("%s needs a non-empty value", pepctl_flags[non_empty[i]].name);
            return NULL;
        }
    for (size_t i = 0; i < a->all[F_CHECKPOINT].n; i++)
        if (a->all[F_CHECKPOINT].v[i][0] == '\0') {
            pepctl_errorf("--checkpoint needs a non-empty value");
            return NULL;
        }
    /* Malformed values are usage errors too: try them now, before any call is made. */
    static const int lists[] = {F_TENANTS, F_SCOPES, F_ROLES};
    for (size_t i = 0; i < PEP_ARRAY_LEN(lists); i++) {
        if (!a->value[lists[i]]) continue;
        json_t *l = pepctl_list(pepctl_flags[lists[i]].name, a->value[lists[i]]);
        if (!l) return NULL;
        json_decref(l);
    }
    json_t *ttl = a->value[F_TTL] ? pepctl_ttl(a->value[F_TTL]) : NULL;
    if (a->value[F_TTL] && !ttl) return NULL;
    json_decref(ttl);
    return cmd;
}

/* Whatever is set and non-empty: the flag, else the environment variable, else fallback. */
static const char *pepctl_pick(const char *flag, const char *env, const char *fallback) {
    const char *e = env ? getenv(env) : NULL;
    return flag ? flag : (e && *e) ? e : fallback;
}

int main(int argc, char **argv) {
    struct pepctl_args a = {0};
    struct pepctl ctx = {0};
    int rc = PEPCTL_FAIL;
    bool curl_ready = false;

    /* PITFALLS (libcurl): a peer closing mid-write must not kill us; write errors are
     * reported instead. */
    signal(SIGPIPE, SIG_IGN);
    if (pepctl_parse(argc, argv, &a) != 0) {
        pepctl_usage(stderr);
        goto out;
    }
    if (a.value[F_HELP]) {
        pepctl_usage(stdout);
        rc = PEPCTL_OK;
        goto out;
    }
    const struct pepctl_cmd *cmd = pepctl_check(&a);
    if (!cmd) {
        pepctl_usage(stderr);
        goto out;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        pepctl_errorf("cannot initialise libcurl");
        goto out;
    }
    curl_ready = true;
    ctx.url = pepctl_pick(a.value[F_URL], "PEP_ADMIN_URL", PEPCTL_DEFAULT_URL);
    ctx.data_dir = pepctl_pick(a.value[F_DATA_DIR], "PEP_DATA_DIR", PEPCTL_DEFAULT_DATA_DIR);
    ctx.token_arg = pepctl_pick(a.value[F_TOKEN], "PEP_TOKEN", NULL);
    ctx.json = a.value[F_JSON] != NULL;
    rc = cmd->run(&ctx, &a);
out:
    if (ctx.token) {
        explicit_bzero(ctx.token, strlen(ctx.token));
        free(ctx.token);
    }
    if (ctx.curl) curl_easy_cleanup(ctx.curl);
    if (curl_ready) curl_global_cleanup();
    if (fflush(stdout) != 0 || ferror(stdout)) {
        if (errno != EPIPE)
            fprintf(stderr, "pepctl: cannot write the output: %s\n", strerror(errno));
        rc = PEPCTL_FAIL;
    }
    return rc;
}
