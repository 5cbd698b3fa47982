/*
 * harness.h — what pep's integration tests are written with: spawn real `pep serve` and
 * `mockllm` processes on port 0, talk to them over real HTTP (libcurl, or raw bytes for
 * malformed-framing tests), and look at the files they leave behind.
 *
 * Binaries come from $PEP_BUILD_DIR (default "build"): $PEP_BUILD_DIR/pep and
 * $PEP_BUILD_DIR/mockllm; tests run from the repository root.
 *
 * Everything is bounded in time: process start waits at most H_START_TIMEOUT_MS, HTTP
 * calls time out after 30 s unless told otherwise, stops escalate to SIGKILL after 10 s.
 * No fixed ports.  Every spawned child is registered and killed at exit (atexit) if a test
 * left it running, and dies with the test process anyway (PR_SET_PDEATHSIG), so a failed
 * assertion or a killed test never leaves a server behind.
 *
 * Conventions: functions returning int give 0 on success and -1 on failure (h_http: the
 * CURLcode), and print a short reason on stderr so a failing test explains itself.
 *
 * Threads: h_http, h_raw_request, the file helpers and the mock helpers may be called from
 * any thread at once.  Spawn and stop processes from the main thread: a child dies when
 * the thread that forked it exits (PR_SET_PDEATHSIG).
 */
#ifndef PEP_TESTS_HARNESS_H
#define PEP_TESTS_HARNESS_H

#include <curl/curl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define H_START_TIMEOUT_MS 20000 /* longest wait for a server's "listening" lines */
#define H_STOP_TIMEOUT_MS 10000  /* h_stop escalates to SIGKILL after this */
#define H_HTTP_TIMEOUT_MS 30000  /* default whole-transfer timeout of h_http */

/* A spawned server process. */
struct h_proc {
    pid_t pid;           /* > 0 while running and not yet reaped; 0 after h_stop */
    char url[128];       /* "http://127.0.0.1:PORT": mockllm, or pep's data listener */
    char admin_url[128]; /* pep's admin listener; "" for mockllm */
    char dir[256];       /* directory holding out_path and err_path */
    char out_path[300];  /* the child's stdout */
    char err_path[300];  /* the child's stderr */
    bool owns_dir;       /* dir was made by the harness and is removed by h_stop */
};

/* Options of h_start_pep_opts; a zeroed struct means "none". */
struct h_spawn_opts {
    long fsize_limit;        /* > 0: RLIMIT_FSIZE in bytes for the child (and SIGXFSZ ignored, so
                                a write past it fails with EFBIG instead of killing pep) */
    bool listen_from_policy; /* no --listen/--admin-listen: the policy's addresses apply */
};

/* ---- directories and files */

/* Makes a fresh directory /tmp/pep-it-XXXXXX; returns 0 and its path in out. */
int h_tmpdir(char out[256]);
/* Removes dir and everything under it (no symlink is followed).  Refuses "/" and paths
 * outside /tmp/, as a guard against a test bug wiping something else. */
void h_rmrf(const char *dir);
/* Writes text to path (created 0600 or truncated). */
int h_write_file(const char *path, const char *text);
/* The whole file, NUL-terminated; caller frees.  NULL on error. */
char *h_read_file(const char *path);
/* Whether the file's bytes contain needle: 1 yes, 0 no, -1 cannot read it.
 * (e.g. "no token in the db file": check pep.db and pep.db-wal.) */
int h_file_contains(const char *path, const void *needle, size_t len);

/* ---- processes */

/* Spawns $PEP_BUILD_DIR/mockllm --listen 127.0.0.1:0 with stdout/stderr in a fresh
 * temporary directory (removed by h_stop), waits for "listening http://H:P" and fills
 * p->url.  On failure nothing is left running and p->pid is 0. */
int h_start_mockllm(struct h_proc *p);

/* Spawns `$PEP_BUILD_DIR/pep serve -c POLICY --data-dir DIR --listen 127.0.0.1:0
 * --admin-listen 127.0.0.1:0`, stdout/stderr in DIR's parent as <basename>.stdout and
 * <basename>.stderr, with the test's environment plus extra_env ("NAME=value" strings,
 * NULL-terminated, may be NULL; they override variables of the same name).  Waits for
 * both "listening data http://H:P" and "listening admin http://H:P" (SPEC 1) and fills
 * url and admin_url.  If pep exits or stalls first: -1, the tail of its stderr printed,
 * nothing left running. */
int h_start_pep(struct h_proc *p, const char *policy_path, const char *data_dir,
                char *const extra_env[]);
/* Same with options (opts may be NULL). */
int h_start_pep_opts(struct h_proc *p, const char *policy_path, const char *data_dir,
                     char *const extra_env[], const struct h_spawn_opts *opts);

/* Sends sig and reaps the process, escalating to SIGKILL after H_STOP_TIMEOUT_MS.  Returns
 * the waitpid status (use WIFEXITED/WEXITSTATUS), or -1 if there was no process.  Removes
 * p->dir when the harness made it. */
int h_stop(struct h_proc *p, int sig);
/* Waits up to timeout_ms for the process to exit by itself; 0 and *status (may be NULL)
 * when it did (p->pid becomes 0), -1 on timeout. */
int h_wait_exit(struct h_proc *p, int timeout_ms, int *status);
/* Prints the last max_bytes of a file to stderr (for debugging a failed test). */
void h_print_tail(const char *path, size_t max_bytes);

/* ---- HTTP (libcurl easy; no proxy; http only) */

/* A response.  Zero it before the first use; h_http frees what it held before. */
struct h_resp {
    long status; /* HTTP status; 0 when no response arrived */
    char *body;  /* NUL-terminated (the NUL is not counted), never NULL
                    after h_http */
    size_t body_len;
    struct curl_slist *headers; /* the final response's header lines, CRLF removed */
    int curl_code;              /* CURLcode of the transfer (0 = CURLE_OK) */
};

/* One request.  Zeroed fields take their defaults. */
struct h_req {
    const char *method; /* default: POST if body, else GET */
    const char *url;
    const char *body;           /* NULL = no body */
    size_t body_len;            /* 0 = strlen(body) */
    const char *const *headers; /* NULL-terminated "Name: value" lines, or NULL */
    long timeout_ms;            /* whole transfer; 0 = H_HTTP_TIMEOUT_MS */
};

/* Performs req.  A body gets "Content-Type: application/json" unless a Content-Type
 * header is given; "Expect: 100-continue" is never sent.  Returns the CURLcode (0 when a
 * response arrived, whatever its status; e.g. 28 timeout, 52 empty reply). */
int h_request(struct h_resp *r, const struct h_req *req);
/* h_request with the default timeout; the variadic part is a NULL-terminated list of at
 * most 32 header lines: h_http(&r, "POST", url, "{}", "Authorization: Bearer x", NULL). */
int h_http(struct h_resp *r, const char *method, const char *url, const char *body, ...);
/* The value of the response header name (case-insensitive), trimmed; NULL if absent.
 * Points into r (valid until h_resp_free). */
const char *h_header(const struct h_resp *r, const char *name);
/* The body parsed as JSON; caller json_decref()s.  NULL if it is not JSON. */
json_t *h_json(const struct h_resp *r);
void h_resp_free(struct h_resp *r);

/* Writes raw exactly as given to the host:port of base_url ("http://127.0.0.1:P") and
 * reads until the server closes or 5 s pass (put "Connection: close" in raw to avoid
 * waiting out a keep-alive).  *reply: what was read, NUL-terminated, caller frees.
 * Returns 0, or -1 when it could not connect or send. */
int h_raw_request(const char *base_url, const char *raw, char **reply);
/* Same with an explicit length (raw may hold NULs) and read timeout. */
int h_raw_request_ex(const char *base_url, const void *raw, size_t raw_len, int timeout_ms,
                     char **reply, size_t *reply_len);

/* ---- mockllm control API */

/* POST mock_url/_mock/faults with json (a fault object, see tools/mockllm.c). */
int h_mock_fault(const char *mock_url, const char *json);
/* POST mock_url/_mock/reset. */
int h_mock_reset(const char *mock_url);
/* GET mock_url/_mock/stats; caller json_decref()s; NULL on error. */
json_t *h_mock_stats(const char *mock_url);

#endif
