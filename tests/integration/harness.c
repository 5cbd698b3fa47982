/*
 * harness.c — process, HTTP and file helpers for pep's integration tests (see harness.h).
 *
 * Children are started with fork + execve.  Everything the child needs (argv, envp, open
 * descriptors) is prepared before fork, so the child only makes async-signal-safe calls
 * even when the test has threads.  Each child is entered in a small registry; an atexit
 * handler kills and reaps whatever is still there, and PR_SET_PDEATHSIG kills children of a
 * test process that dies without running atexit (a crash, a timeout's SIGKILL).
 *
 * Servers announce themselves on stdout ("listening ..."); the harness polls the stdout
 * file until every expected line is complete, the child exits, or H_START_TIMEOUT_MS pass.
 *
 * Threads: the registry is behind h_registry_lock; HTTP and file helpers keep no shared
 * state apart from curl_global_init, done once under pthread_once.
 */
#include "tests/integration/harness.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pep/util.h"

extern char **environ;

#define H_MAX_CHILDREN 64
#define H_MAX_FILE ((size_t)256 << 20) /* h_read_file / h_file_contains limit */
#define H_MAX_BODY ((size_t)256 << 20) /* h_http aborts a response larger than this */
#define H_RAW_TIMEOUT_MS 5000

/* Children still running, so that none outlives the test binary. */
static struct {
    pid_t pid;     /* 0 = free slot */
    char dir[256]; /* directory to remove at exit, or "" */
} h_children[H_MAX_CHILDREN];
static pthread_mutex_t h_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t h_atexit_once = PTHREAD_ONCE_INIT;
static pthread_once_t h_curl_once = PTHREAD_ONCE_INIT;

/* ------------------------------------------------------------------ small helpers */

static void h_sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static const char *h_build_dir(void) {
    const char *d = getenv("PEP_BUILD_DIR");
    return d != NULL && d[0] != '\0' ? d : "build";
}

/* ------------------------------------------------------------------ files */

int h_tmpdir(char out[256]) {
    char tmpl[] = "/tmp/pep-it-XXXXXX";
    if (mkdtemp(tmpl) == NULL) {
        fprintf(stderr, "harness: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    snprintf(out, 256, "%s", tmpl);
    return 0;
}

static int h_rmrf_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "harness: remove %s: %s\n", path, strerror(errno));
    return 0;
}

void h_rmrf(const char *dir) {
    /* A test bug must not be able to turn this into rm -rf of something that matters. */
    if (dir == NULL || strncmp(dir, "/tmp/", 5) != 0 || dir[5] == '\0' ||
        strstr(dir, "..") != NULL) {
        fprintf(stderr, "harness: h_rmrf refuses \"%s\"\n", dir != NULL ? dir : "(null)");
        return;
    }
    nftw(dir, h_rmrf_one, 16, FTW_DEPTH | FTW_PHYS);
}

int h_write_file(const char *path, const char *text) {
    int rc = -1;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) goto out;
    size_t len = strlen(text), done = 0;
    while (done < len) {
        ssize_t n = write(fd, text + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) goto out;
        done += (size_t)n;
    }
    rc = 0;
out:
    if (fd >= 0 && close(fd) != 0) rc = -1;
    if (rc != 0) fprintf(stderr, "harness: write %s: %s\n", path, strerror(errno));
    return rc;
}

char *h_read_file(const char *path) {
    char *data = NULL;
    size_t len = 0;
    if (pep_read_file(path, H_MAX_FILE, &data, &len) != 0) return NULL;
    return data;
}

int h_file_contains(const char *path, const void *needle, size_t len) {
    char *data = NULL;
    size_t data_len = 0;
    if (pep_read_file(path, H_MAX_FILE, &data, &data_len) != 0) return -1;
    int found = memmem(data, data_len, needle, len) != NULL ? 1 : 0;
    free(data);
    return found;
}

void h_print_tail(const char *path, size_t max_bytes) {
    char *data = NULL;
    size_t len = 0;
    if (pep_read_file(path, H_MAX_FILE, &data, &len) != 0) {
        fprintf(stderr, "harness: (cannot read %s)\n", path);
        return;
    }
    size_t from = len > max_bytes ? len - max_bytes : 0;
    fprintf(stderr, "---- tail of %s ----\n%s%s---- end ----\n", path, data + from,
            len > 0 && data[len - 1] != '\n' ? "\n" : "");
    free(data);
}

/* ------------------------------------------------------------------ child registry */

static void h_cleanup_at_exit(void) {
    pthread_mutex_lock(&h_registry_lock);
    for (size_t i = 0; i < H_MAX_CHILDREN; i++) {
        if (h_children[i].pid > 0) {
            kill(h_children[i].pid, SIGKILL);
            while (waitpid(h_children[i].pid, NULL, 0) < 0 && errno == EINTR)
                ;
            h_children[i].pid = 0;
        }
        if (h_children[i].dir[0] != '\0') {
            h_rmrf(h_children[i].dir);
            h_children[i].dir[0] = '\0';
        }
    }
    pthread_mutex_unlock(&h_registry_lock);
}

static void h_register_atexit(void) {
    if (atexit(h_cleanup_at_exit) != 0)
        fprintf(stderr, "harness: atexit failed; children may outlive a failed test\n");
}

static int h_register(pid_t pid, const char *dir) {
    int rc = -1;
    pthread_mutex_lock(&h_registry_lock);
    for (size_t i = 0; i < H_MAX_CHILDREN; i++) {
        if (h_children[i].pid == 0 && h_children[i].dir[0] == '\0') {
            h_children[i].pid = pid;
            snprintf(h_children[i].dir, sizeof(h_children[i].dir), "%s", dir != NULL ? dir : "");
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&h_registry_lock);
    return rc;
}

/* Forgets pid (it was reaped); its directory stays registered only if keep_dir. */
static void h_unregister(pid_t pid) {
    pthread_mutex_lock(&h_registry_lock);
    for (size_t i = 0; i < H_MAX_CHILDREN; i++) {
        if (h_children[i].pid == pid) {
            h_children[i].pid = 0;
            h_children[i].dir[0] = '\0';
        }
    }
    pthread_mutex_unlock(&h_registry_lock);
}

/* ------------------------------------------------------------------ spawning */

/* environ with extra_env added; a NAME=... in extra_env replaces the inherited one.
 * The strings are not copied.  Caller frees the array. */
static char **h_make_env(char *const extra_env[]) {
    size_t n_env = 0, n_extra = 0;
    while (environ != NULL && environ[n_env] != NULL)
        n_env++;
    while (extra_env != NULL && extra_env[n_extra] != NULL)
        n_extra++;
    char **env = calloc(n_env + n_extra + 1, sizeof(*env));
    if (env == NULL) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n_env; i++) {
        size_t name_len = strcspn(environ[i], "=");
        bool overridden = false;
        for (size_t j = 0; j < n_extra && !overridden; j++)
            overridden =
                strncmp(extra_env[j], environ[i], name_len) == 0 && extra_env[j][name_len] == '=';
        if (!overridden) env[k++] = environ[i];
    }
    for (size_t j = 0; j < n_extra; j++)
        env[k++] = extra_env[j];
    env[k] = NULL;
    return env;
}

/* Starts argv[0] with stdout/stderr redirected to out_path/err_path.  Returns the pid, or
 * -1.  The child is registered (with owned_dir, removed at exit if the test forgets). */
static pid_t h_spawn(char *const argv[], char *const extra_env[], const char *out_path,
                     const char *err_path, const struct h_spawn_opts *opts, const char *owned_dir) {
    pthread_once(&h_atexit_once, h_register_atexit);
    pid_t pid = -1;
    char **env = h_make_env(extra_env);
    int in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int out_fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int err_fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (env == NULL || in_fd < 0 || out_fd < 0 || err_fd < 0) {
        fprintf(stderr, "harness: cannot prepare %s: %s\n", argv[0], strerror(errno));
        goto out;
    }
    if (access(argv[0], X_OK) != 0) {
        fprintf(stderr, "harness: %s is not an executable (PEP_BUILD_DIR=%s): %s\n", argv[0],
                h_build_dir(), strerror(errno));
        goto out;
    }
    long fsize_limit = opts != NULL ? opts->fsize_limit : 0;
    pid_t parent = getpid();
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "harness: fork: %s\n", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        /* Child: async-signal-safe calls only. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(127);
        if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) _exit(127);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        sigaction(SIGPIPE, &dfl, NULL); /* pep must cope with SIGPIPE itself */
        if (fsize_limit > 0) {
            struct rlimit rl = {.rlim_cur = (rlim_t)fsize_limit, .rlim_max = (rlim_t)fsize_limit};
            struct sigaction ign = {.sa_handler = SIG_IGN};
            if (setrlimit(RLIMIT_FSIZE, &rl) != 0 || sigaction(SIGXFSZ, &ign, NULL) != 0)
                _exit(127);
        }
        execve(argv[0], argv, env);
        _exit(127);
    }
    if (h_register(pid, owned_dir) != 0)
        fprintf(stderr, "harness: child registry full; pid %d is not tracked\n", (int)pid);
out:
    if (in_fd >= 0) close(in_fd);
    if (out_fd >= 0) close(out_fd);
    if (err_fd >= 0) close(err_fd);
    free(env);
    return pid;
}

/* Copies the rest of the complete line after prefix into url; true if found. */
static bool h_find_line(const char *text, const char *prefix, char url[128]) {
    const char *at = text;
    while ((at = strstr(at, prefix)) != NULL) {
        if (at == text || at[-1] == '\n') {
            const char *start = at + strlen(prefix);
            const char *nl = strchr(start, '\n');
            if (nl == NULL) return false; /* not complete yet */
            size_t n = (size_t)(nl - start);
            if (n > 0 && start[n - 1] == '\r') n--;
            if (n == 0 || n >= 128) return false;
            memcpy(url, start, n);
            url[n] = '\0';
            return true;
        }
        at++;
    }
    return false;
}

/* Waits for the "listening" lines of p; admin_prefix NULL for mockllm. */
static int h_wait_listening(struct h_proc *p, const char *data_prefix, const char *admin_prefix) {
    int64_t deadline = pep_mono_us() + (int64_t)H_START_TIMEOUT_MS * 1000;
    for (;;) {
        char *out = h_read_file(p->out_path);
        bool data_ok = out != NULL && h_find_line(out, data_prefix, p->url);
        bool admin_ok =
            admin_prefix == NULL || (out != NULL && h_find_line(out, admin_prefix, p->admin_url));
        free(out);
        if (data_ok && admin_ok) return 0;
        int status = 0;
        pid_t w = waitpid(p->pid, &status, WNOHANG);
        if (w == p->pid) {
            fprintf(stderr, "harness: pid %d exited before listening (status 0x%x)\n", (int)p->pid,
                    status);
            h_unregister(p->pid);
            p->pid = 0;
            return -1;
        }
        if (pep_mono_us() > deadline) {
            fprintf(stderr, "harness: pid %d did not print its listening lines in %d ms\n",
                    (int)p->pid, H_START_TIMEOUT_MS);
            return -1;
        }
        h_sleep_ms(10);
    }
}

int h_start_mockllm(struct h_proc *p) {
    memset(p, 0, sizeof(*p));
    if (h_tmpdir(p->dir) != 0) return -1;
    p->owns_dir = true;
    snprintf(p->out_path, sizeof(p->out_path), "%s/mockllm.stdout", p->dir);
    snprintf(p->err_path, sizeof(p->err_path), "%s/mockllm.stderr", p->dir);
    char bin[512];
    snprintf(bin, sizeof(bin), "%s/mockllm", h_build_dir());
    char *argv[] = {bin, "--listen", "127.0.0.1:0", NULL};
    p->pid = h_spawn(argv, NULL, p->out_path, p->err_path, NULL, p->dir);
    if (p->pid <= 0 || h_wait_listening(p, "listening ", NULL) != 0) {
        h_print_tail(p->err_path, 2048);
        p->pid = p->pid < 0 ? 0 : p->pid;
        h_stop(p, SIGKILL);
        return -1;
    }
    return 0;
}

int h_start_pep_opts(struct h_proc *p, const char *policy_path, const char *data_dir,
                     char *const extra_env[], const struct h_spawn_opts *opts) {
    memset(p, 0, sizeof(*p));
    char copy[256], copy2[256];
    if (strlen(data_dir) >= 200) {
        fprintf(stderr, "harness: data dir path too long: %s\n", data_dir);
        return -1;
    }
    snprintf(copy, sizeof(copy), "%s", data_dir);
    size_t n = strlen(copy);
    while (n > 1 && copy[n - 1] == '/')
        copy[--n] = '\0';
    memcpy(copy2, copy, sizeof(copy));
    snprintf(p->dir, sizeof(p->dir), "%s", dirname(copy));
    const char *base = basename(copy2);
    snprintf(p->out_path, sizeof(p->out_path), "%.200s/%.40s.stdout", p->dir, base);
    snprintf(p->err_path, sizeof(p->err_path), "%.200s/%.40s.stderr", p->dir, base);

    char bin[512];
    snprintf(bin, sizeof(bin), "%s/pep", h_build_dir());
    char *argv[] = {bin,
                    "serve",
                    "-c",
                    (char *)policy_path,
                    "--data-dir",
                    (char *)data_dir,
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    NULL};
    /* listen_from_policy: argv ends where the listen flags start, so the file's addresses
     * apply (the flags would override them). */
    for (size_t i = 0; opts && opts->listen_from_policy && argv[i]; i++)
        if (strcmp(argv[i], "--listen") == 0) {
            argv[i] = NULL;
            break;
        }
    p->pid = h_spawn(argv, extra_env, p->out_path, p->err_path, opts, NULL);
    if (p->pid <= 0 || h_wait_listening(p, "listening data ", "listening admin ") != 0) {
        h_print_tail(p->err_path, 4096);
        p->pid = p->pid < 0 ? 0 : p->pid;
        h_stop(p, SIGKILL);
        return -1;
    }
    return 0;
}

int h_start_pep(struct h_proc *p, const char *policy_path, const char *data_dir,
                char *const extra_env[]) {
    return h_start_pep_opts(p, policy_path, data_dir, extra_env, NULL);
}

int h_wait_exit(struct h_proc *p, int timeout_ms, int *status) {
    if (p->pid <= 0) return -1;
    int64_t deadline = pep_mono_us() + (int64_t)timeout_ms * 1000;
    for (;;) {
        int st = 0;
        pid_t w = waitpid(p->pid, &st, WNOHANG);
        if (w == p->pid) {
            h_unregister(p->pid);
            p->pid = 0;
            if (status != NULL) *status = st;
            return 0;
        }
        if (w < 0 && errno != EINTR) {
            fprintf(stderr, "harness: waitpid %d: %s\n", (int)p->pid, strerror(errno));
            h_unregister(p->pid);
            p->pid = 0;
            return -1;
        }
        if (pep_mono_us() >= deadline) return -1;
        h_sleep_ms(5);
    }
}

int h_stop(struct h_proc *p, int sig) {
    int status = -1;
    if (p->pid > 0) {
        kill(p->pid, sig);
        if (h_wait_exit(p, H_STOP_TIMEOUT_MS, &status) != 0 && p->pid > 0) {
            fprintf(stderr, "harness: pid %d ignored signal %d for %d ms; SIGKILL\n", (int)p->pid,
                    sig, H_STOP_TIMEOUT_MS);
            kill(p->pid, SIGKILL);
            while (waitpid(p->pid, &status, 0) < 0 && errno == EINTR)
                ;
            h_unregister(p->pid);
            p->pid = 0;
        }
    }
    if (p->owns_dir && p->dir[0] != '\0') {
        h_rmrf(p->dir);
        p->owns_dir = false;
    }
    return status;
}

/* ------------------------------------------------------------------ HTTP */

static void h_curl_init(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        fprintf(stderr, "harness: curl_global_init failed\n");
}

static size_t h_on_body(char *data, size_t size, size_t nmemb, void *userdata) {
    struct h_resp *r = userdata;
    size_t n = size * nmemb;
    if (n > H_MAX_BODY - r->body_len) return 0; /* aborts the transfer */
    char *grown = realloc(r->body, r->body_len + n + 1);
    if (grown == NULL) return 0;
    r->body = grown;
    memcpy(r->body + r->body_len, data, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return n;
}

static size_t h_on_header(char *data, size_t size, size_t nmemb, void *userdata) {
    struct h_resp *r = userdata;
    size_t n = size * nmemb, len = n;
    if (len >= 5 && strncmp(data, "HTTP/", 5) == 0) {
        /* A new status line (after a 1xx): only the final response's headers count. */
        curl_slist_free_all(r->headers);
        r->headers = NULL;
    }
    while (len > 0 && (data[len - 1] == '\r' || data[len - 1] == '\n' || data[len - 1] == ' ' ||
                       data[len - 1] == '\t'))
        len--;
    if (len == 0) return n;
    char *line = strndup(data, len);
    if (line == NULL) return 0;
    struct curl_slist *grown = curl_slist_append(r->headers, line);
    free(line);
    if (grown == NULL) return 0;
    r->headers = grown;
    return n;
}

static bool h_has_header(const char *const *headers, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; headers != NULL && headers[i] != NULL; i++)
        if (strncasecmp(headers[i], name, n) == 0 && headers[i][n] == ':') return true;
    return false;
}

void h_resp_free(struct h_resp *r) {
    free(r->body);
    curl_slist_free_all(r->headers);
    memset(r, 0, sizeof(*r));
}

int h_request(struct h_resp *r, const struct h_req *req) {
    pthread_once(&h_curl_once, h_curl_init);
    h_resp_free(r);
    CURLcode rc = CURLE_FAILED_INIT;
    struct curl_slist *hdrs = NULL;
    CURL *c = curl_easy_init();
    if (c == NULL) goto out;
    bool ok = true;
    for (size_t i = 0; req->headers != NULL && req->headers[i] != NULL && ok; i++) {
        struct curl_slist *grown = curl_slist_append(hdrs, req->headers[i]);
        ok = grown != NULL;
        hdrs = grown != NULL ? grown : hdrs;
    }
    if (ok && req->body != NULL && !h_has_header(req->headers, "Content-Type")) {
        struct curl_slist *grown = curl_slist_append(hdrs, "Content-Type: application/json");
        ok = grown != NULL;
        hdrs = grown != NULL ? grown : hdrs;
    }
    if (ok && !h_has_header(req->headers, "Expect")) {
        struct curl_slist *grown = curl_slist_append(hdrs, "Expect:");
        ok = grown != NULL;
        hdrs = grown != NULL ? grown : hdrs;
    }
    if (!ok) goto out;
    const char *method = req->method != NULL ? req->method : req->body != NULL ? "POST" : "GET";
    long timeout = req->timeout_ms > 0 ? req->timeout_ms : H_HTTP_TIMEOUT_MS;
    rc = curl_easy_setopt(c, CURLOPT_URL, req->url);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http");
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, h_on_body);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, h_on_header);
    if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    if (req->body != NULL) {
        size_t len = req->body_len != 0 ? req->body_len : strlen(req->body);
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_POSTFIELDS, req->body);
        if (rc == CURLE_OK && strcmp(method, "POST") != 0)
            rc = curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    } else if (strcmp(method, "HEAD") == 0) {
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    } else if (strcmp(method, "POST") == 0) {
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, 0L);
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_POSTFIELDS, "");
    } else if (strcmp(method, "GET") != 0) {
        if (rc == CURLE_OK) rc = curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    }
    if (rc == CURLE_OK) rc = curl_easy_perform(c);
    long status = 0;
    if (curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status) == CURLE_OK) r->status = status;
out:
    if (r->body == NULL) r->body = calloc(1, 1);
    r->curl_code = (int)rc;
    curl_slist_free_all(hdrs);
    if (c != NULL) curl_easy_cleanup(c);
    return (int)rc;
}

int h_http(struct h_resp *r, const char *method, const char *url, const char *body, ...) {
    const char *headers[33];
    size_t n = 0;
    va_list ap;
    va_start(ap, body);
    const char *h;
    while ((h = va_arg(ap, const char *)) != NULL) {
        if (n == 32) {
            fprintf(stderr, "harness: h_http takes at most 32 headers\n");
            va_end(ap);
            return CURLE_BAD_FUNCTION_ARGUMENT;
        }
        headers[n++] = h;
    }
    va_end(ap);
    headers[n] = NULL;
    struct h_req req = {.method = method, .url = url, .body = body, .headers = headers};
    return h_request(r, &req);
}

const char *h_header(const struct h_resp *r, const char *name) {
    size_t n = strlen(name);
    for (const struct curl_slist *l = r->headers; l != NULL; l = l->next) {
        if (strncasecmp(l->data, name, n) == 0 && l->data[n] == ':') {
            const char *v = l->data + n + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            return v;
        }
    }
    return NULL;
}

json_t *h_json(const struct h_resp *r) {
    if (r->body == NULL) return NULL;
    return json_loadb(r->body, r->body_len, 0, NULL);
}

/* ------------------------------------------------------------------ raw sockets */

/* Connects to the host:port of "http://HOST:PORT[/...]"; returns the socket or -1. */
static int h_connect_url(const char *base_url) {
    const char *hp = strncmp(base_url, "http://", 7) == 0 ? base_url + 7 : base_url;
    char host[128], port[16];
    const char *colon;
    if (hp[0] == '[') {
        const char *close_br = strchr(hp, ']');
        if (close_br == NULL || close_br[1] != ':' || (size_t)(close_br - hp - 1) >= sizeof(host))
            return -1;
        snprintf(host, sizeof(host), "%.*s", (int)(close_br - hp - 1), hp + 1);
        colon = close_br + 1;
    } else {
        colon = strchr(hp, ':');
        if (colon == NULL || (size_t)(colon - hp) >= sizeof(host)) return -1;
        snprintf(host, sizeof(host), "%.*s", (int)(colon - hp), hp);
    }
    size_t plen = strcspn(colon + 1, "/");
    if (plen == 0 || plen >= sizeof(port)) return -1;
    snprintf(port, sizeof(port), "%.*s", (int)plen, colon + 1);

    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    if (getaddrinfo(host, port, &hints, &res) != 0 || res == NULL) return -1;
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int h_raw_request_ex(const char *base_url, const void *raw, size_t raw_len, int timeout_ms,
                     char **reply, size_t *reply_len) {
    *reply = NULL;
    if (reply_len != NULL) *reply_len = 0;
    int fd = h_connect_url(base_url);
    if (fd < 0) {
        fprintf(stderr, "harness: cannot connect to %s\n", base_url);
        return -1;
    }
    int rc = -1;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) goto out;
    int64_t deadline = pep_mono_us() + (int64_t)timeout_ms * 1000;
    size_t sent = 0;
    bool send_failed = false;
    while (sent < raw_len) {
        struct pollfd pw = {.fd = fd, .events = POLLOUT, .revents = 0};
        int64_t left = (deadline - pep_mono_us()) / 1000;
        if (left <= 0 || poll(&pw, 1, (int)left) <= 0) {
            send_failed = true;
            break;
        }
        ssize_t n = send(fd, (const char *)raw + sent, raw_len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            /* The server may refuse mid-request and still have answered: read it. */
            send_failed = true;
            break;
        }
        sent += (size_t)n;
    }
    for (;;) {
        int64_t left = (deadline - pep_mono_us()) / 1000;
        if (left <= 0) break;
        struct pollfd pr = {.fd = fd, .events = POLLIN, .revents = 0};
        int pn = poll(&pr, 1, (int)left);
        if (pn < 0 && errno == EINTR) continue;
        if (pn <= 0) break;
        if (cap - len < 2048) {
            char *grown = realloc(buf, cap * 2);
            if (grown == NULL) break;
            buf = grown;
            cap *= 2;
        }
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break; /* closed (or reset) by the server */
        len += (size_t)n;
    }
    buf[len] = '\0';
    *reply = buf;
    buf = NULL;
    if (reply_len != NULL) *reply_len = len;
    rc = send_failed && len == 0 ? -1 : 0;
out:
    free(buf);
    close(fd);
    return rc;
}

int h_raw_request(const char *base_url, const char *raw, char **reply) {
    return h_raw_request_ex(base_url, raw, strlen(raw), H_RAW_TIMEOUT_MS, reply, NULL);
}

/* ------------------------------------------------------------------ mockllm control */

int h_mock_fault(const char *mock_url, const char *json) {
    char url[256];
    snprintf(url, sizeof(url), "%s/_mock/faults", mock_url);
    struct h_resp r = {0};
    int rc = h_http(&r, "POST", url, json, NULL);
    if (rc != 0 || r.status != 200) {
        fprintf(stderr, "harness: fault %s refused: curl %d, status %ld, %s\n", json, rc, r.status,
                r.body != NULL ? r.body : "");
        rc = -1;
    }
    h_resp_free(&r);
    return rc;
}

int h_mock_reset(const char *mock_url) {
    char url[256];
    snprintf(url, sizeof(url), "%s/_mock/reset", mock_url);
    struct h_resp r = {0};
    int rc = h_http(&r, "POST", url, NULL, NULL);
    rc = rc == 0 && r.status == 200 ? 0 : -1;
    h_resp_free(&r);
    return rc;
}

json_t *h_mock_stats(const char *mock_url) {
    char url[256];
    snprintf(url, sizeof(url), "%s/_mock/stats", mock_url);
    struct h_resp r = {0};
    json_t *stats = NULL;
    if (h_http(&r, "GET", url, NULL, NULL) == 0 && r.status == 200) stats = h_json(&r);
    h_resp_free(&r);
    return stats;
}
