/*
 * datadir.c — the data directory's lock and its checks at start (see datadir.h).
 */
#include "pep/datadir.h"

#include "audit/audit.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

int datadir_lock(const char *data_dir, int *lock_fd, struct pep_err *err) {
    if (mkdir(data_dir, 0700) != 0 && errno != EEXIST)
        return pep_err_set(err, PEP_EIO, "cannot create %s: %s", data_dir, strerror(errno));
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", data_dir, DATADIR_LOCK_FILE);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return pep_err_set(err, PEP_EIO, "cannot open %s: %s", path, strerror(errno));
    /* SECURITY: two writers on one store break its chain for good (each moves the head
     * the other relies on); a flock is released by the kernel when the holder dies, so a
     * crash never leaves a stale lock behind. */
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        close(fd);
        if (e == EWOULDBLOCK)
            return pep_err_set(err, PEP_EEXISTS,
                               "data directory %s is in use by another pep (pid %s holds %s): "
                               "one pep per data directory",
                               data_dir, pid[0] ? pid : "?", path);
        return pep_err_set(err, PEP_EIO, "cannot lock %s: %s", path, strerror(e));
    }
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)len, 0) != len)
        fprintf(stderr, "pep: warning: cannot write the pid into %s\n", path);
    *lock_fd = fd;
    return 0;
}

/* Whether DATA/keys holds at least one key file. */
static bool has_keys(const char *data_dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/keys", data_dir);
    DIR *d = opendir(path);
    if (!d) return false;
    bool found = false;
    for (struct dirent *e; !found && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        found = n > 4 && strcmp(e->d_name + n - 4, ".pem") == 0;
    }
    closedir(d);
    return found;
}

static bool exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Warns about a path others may read or write, and takes their access away from a file
 * (a directory only gets the warning: it may be the operator's own). */
static void tighten(const char *path, bool is_dir) {
    struct stat st;
    if (lstat(path, &st) != 0 || S_ISLNK(st.st_mode) || !(st.st_mode & 077)) return;
    if (is_dir) {
        fprintf(stderr,
                "pep: warning: %s is open to other users (mode %04o): chmod 700 it; audit "
                "records, keys and admin.token live there\n",
                path, (unsigned)(st.st_mode & 07777));
        return;
    }
    if (chmod(path, 0600) == 0)
        fprintf(stderr, "pep: warning: %s was open to other users (mode %04o): made 0600\n", path,
                (unsigned)(st.st_mode & 07777));
    else
        fprintf(stderr,
                "pep: warning: %s is open to other users (mode %04o) and cannot be "
                "changed: %s\n",
                path, (unsigned)(st.st_mode & 07777), strerror(errno));
}

static void tighten_modes(const char *data_dir, const char *db_path) {
    static const char *const files[] = {"admin.token", DATADIR_LOCK_FILE};
    static const char *const db_suffixes[] = {"", "-wal", "-shm"};
    char path[4096];
    tighten(data_dir, true);
    for (size_t i = 0; i < PEP_ARRAY_LEN(files); i++) {
        snprintf(path, sizeof path, "%s/%s", data_dir, files[i]);
        tighten(path, false);
    }
    for (size_t i = 0; i < PEP_ARRAY_LEN(db_suffixes); i++) {
        snprintf(path, sizeof path, "%s%s", db_path, db_suffixes[i]);
        tighten(path, false);
    }
    snprintf(path, sizeof path, "%s/keys", data_dir);
    tighten(path, true);
    DIR *d = opendir(path);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char key[4096 + 256];
        snprintf(key, sizeof key, "%s/%s", path, e->d_name);
        tighten(key, false);
    }
    if (d) closedir(d);
}

int datadir_check(const char *data_dir, const char *db_path, char missing_triggers[256],
                  struct pep_err *err) {
    static const char start_over[] =
        "pep never starts over silently: to start over, give it a new, empty data directory";
    missing_triggers[0] = '\0';
    tighten_modes(data_dir, db_path);
    struct audit_inspection in;
    int rc = audit_inspect(db_path, &in, err);
    if (rc != 0) return rc;
    char token[4096];
    snprintf(token, sizeof token, "%s/admin.token", data_dir);
    bool keys = has_keys(data_dir), admin_token = exists(token);
    switch (in.state) {
    case AUDIT_STORE_MISSING:
    case AUDIT_STORE_EMPTY:
        if (keys || admin_token)
            return pep_err_set(err, PEP_EINVAL,
                               "%s is %s, but %s holds %s: this data directory was in use and "
                               "its audit history is gone (restore it from a backup); %s",
                               db_path, in.state == AUDIT_STORE_MISSING ? "missing" : "empty",
                               data_dir, keys ? "signing keys" : "admin.token", start_over);
        return 0;
    case AUDIT_STORE_FOREIGN:
        return pep_err_set(err, PEP_EINVAL,
                           "%s is not pep's audit store (no audit table with pep's columns); "
                           "pep will not adopt another database: %s",
                           db_path, start_over);
    case AUDIT_STORE_PEP:
        if (in.records > 0 && !keys)
            return pep_err_set(err, PEP_EINVAL,
                               "%s holds %lld audit records but %s/keys holds no key: tokens "
                               "and checkpoints were signed by the lost keys (restore the keys "
                               "directory from a backup); a new key would be minted silently "
                               "otherwise; %s",
                               db_path, (long long)in.records, data_dir, start_over);
        snprintf(missing_triggers, 256, "%s", in.missing_triggers);
        return 0;
    }
    return 0;
}
