/*
 * fault.c — a SQLite VFS shim that fails writes or syncs on demand (tests only).
 *
 * STYLE asks for tests that inject I/O failures (disk full, fsync error) into the audit
 * writer, not only happy paths.  This VFS, registered as AUDIT_FAULT_VFS (never as the
 * default), wraps the default VFS: every file it opens is the real file plus a pointer to
 * it, and every method forwards to the real one — except xWrite and xSync, which return
 * the injected error while a fault is set.  Production code never opens a store with it.
 *
 * Invariant: with AUDIT_FAULT_NONE the shim is transparent (same results, same bytes).
 *
 * Threads: audit_fault_install and audit_fault_set from any thread; the mode is an atomic
 * read by whichever thread does the I/O.
 */
#include "audit/audit.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

/* A file opened through the shim: our header, then the real VFS's file right after it. */
struct fault_file {
    sqlite3_file base;  /* pMethods = &fault_io_methods while open */
    sqlite3_file *real; /* the wrapped file, stored just after this struct */
};

static sqlite3_vfs *fault_real_vfs; /* the default VFS at install time */
static sqlite3_vfs fault_vfs;       /* the registered shim */
static atomic_int fault_mode;       /* enum audit_fault */
static pthread_once_t fault_once = PTHREAD_ONCE_INIT;
static int fault_install_rc;

/* Offset of the real file inside the block SQLite allocates for us, pointer-aligned. */
#define FAULT_REAL_OFFSET                                                                          \
    ((sizeof(struct fault_file) + sizeof(void *) - 1) / sizeof(void *) * sizeof(void *))

static sqlite3_file *fault_real(sqlite3_file *f) {
    return ((struct fault_file *)f)->real;
}

static int fault_close(sqlite3_file *f) {
    sqlite3_file *r = fault_real(f);
    int rc = r->pMethods ? r->pMethods->xClose(r) : SQLITE_OK;
    f->pMethods = NULL;
    return rc;
}

static int fault_read(sqlite3_file *f, void *buf, int amt, sqlite3_int64 off) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xRead(r, buf, amt, off);
}

static int fault_write(sqlite3_file *f, const void *buf, int amt, sqlite3_int64 off) {
    sqlite3_file *r = fault_real(f);
    switch (atomic_load(&fault_mode)) {
    case AUDIT_FAULT_WRITE:
        return SQLITE_IOERR_WRITE;
    case AUDIT_FAULT_FULL:
        return SQLITE_FULL;
    default:
        return r->pMethods->xWrite(r, buf, amt, off);
    }
}

static int fault_truncate(sqlite3_file *f, sqlite3_int64 size) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xTruncate(r, size);
}

static int fault_sync(sqlite3_file *f, int flags) {
    sqlite3_file *r = fault_real(f);
    if (atomic_load(&fault_mode) == AUDIT_FAULT_FSYNC) return SQLITE_IOERR_FSYNC;
    return r->pMethods->xSync(r, flags);
}

static int fault_file_size(sqlite3_file *f, sqlite3_int64 *size) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xFileSize(r, size);
}

static int fault_lock(sqlite3_file *f, int lock) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xLock(r, lock);
}

static int fault_unlock(sqlite3_file *f, int lock) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xUnlock(r, lock);
}

static int fault_check_reserved(sqlite3_file *f, int *out) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xCheckReservedLock(r, out);
}

static int fault_file_control(sqlite3_file *f, int op, void *arg) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xFileControl(r, op, arg);
}

static int fault_sector_size(sqlite3_file *f) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xSectorSize(r);
}

static int fault_device_characteristics(sqlite3_file *f) {
    sqlite3_file *r = fault_real(f);
    return r->pMethods->xDeviceCharacteristics(r);
}

static int fault_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion < 2) return SQLITE_IOERR_SHMMAP;
    return r->pMethods->xShmMap(r, pg, pgsz, extend, pp);
}

static int fault_shm_lock(sqlite3_file *f, int offset, int n, int flags) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion < 2) return SQLITE_IOERR_SHMLOCK;
    return r->pMethods->xShmLock(r, offset, n, flags);
}

static void fault_shm_barrier(sqlite3_file *f) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion >= 2) r->pMethods->xShmBarrier(r);
}

static int fault_shm_unmap(sqlite3_file *f, int delete_flag) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion < 2) return SQLITE_OK;
    return r->pMethods->xShmUnmap(r, delete_flag);
}

static int fault_fetch(sqlite3_file *f, sqlite3_int64 off, int amt, void **pp) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion < 3) {
        *pp = NULL;
        return SQLITE_OK;
    }
    return r->pMethods->xFetch(r, off, amt, pp);
}

static int fault_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p) {
    sqlite3_file *r = fault_real(f);
    if (r->pMethods->iVersion < 3) return SQLITE_OK;
    return r->pMethods->xUnfetch(r, off, p);
}

static const sqlite3_io_methods fault_io_methods = {
    .iVersion = 3,
    .xClose = fault_close,
    .xRead = fault_read,
    .xWrite = fault_write,
    .xTruncate = fault_truncate,
    .xSync = fault_sync,
    .xFileSize = fault_file_size,
    .xLock = fault_lock,
    .xUnlock = fault_unlock,
    .xCheckReservedLock = fault_check_reserved,
    .xFileControl = fault_file_control,
    .xSectorSize = fault_sector_size,
    .xDeviceCharacteristics = fault_device_characteristics,
    .xShmMap = fault_shm_map,
    .xShmLock = fault_shm_lock,
    .xShmBarrier = fault_shm_barrier,
    .xShmUnmap = fault_shm_unmap,
    .xFetch = fault_fetch,
    .xUnfetch = fault_unfetch,
};

static int fault_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *file, int flags,
                      int *out_flags) {
    (void)vfs;
    struct fault_file *f = (struct fault_file *)file;
    f->real = (sqlite3_file *)((char *)file + FAULT_REAL_OFFSET);
    memset(f->real, 0, (size_t)fault_real_vfs->szOsFile);
    int rc = fault_real_vfs->xOpen(fault_real_vfs, name, f->real, flags, out_flags);
    /* SQLite calls xClose iff pMethods is set, even when xOpen failed. */
    f->base.pMethods = f->real->pMethods ? &fault_io_methods : NULL;
    return rc;
}

static int fault_delete(sqlite3_vfs *vfs, const char *name, int sync_dir) {
    (void)vfs;
    return fault_real_vfs->xDelete(fault_real_vfs, name, sync_dir);
}

static int fault_access(sqlite3_vfs *vfs, const char *name, int flags, int *out) {
    (void)vfs;
    return fault_real_vfs->xAccess(fault_real_vfs, name, flags, out);
}

static int fault_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out) {
    (void)vfs;
    return fault_real_vfs->xFullPathname(fault_real_vfs, name, n, out);
}

static void *fault_dlopen(sqlite3_vfs *vfs, const char *name) {
    (void)vfs;
    return fault_real_vfs->xDlOpen(fault_real_vfs, name);
}

static void fault_dlerror(sqlite3_vfs *vfs, int n, char *msg) {
    (void)vfs;
    fault_real_vfs->xDlError(fault_real_vfs, n, msg);
}

static void (*fault_dlsym(sqlite3_vfs *vfs, void *h, const char *sym))(void) {
    (void)vfs;
    return fault_real_vfs->xDlSym(fault_real_vfs, h, sym);
}

static void fault_dlclose(sqlite3_vfs *vfs, void *h) {
    (void)vfs;
    fault_real_vfs->xDlClose(fault_real_vfs, h);
}

static int fault_randomness(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return fault_real_vfs->xRandomness(fault_real_vfs, n, out);
}

static int fault_sleep(sqlite3_vfs *vfs, int us) {
    (void)vfs;
    return fault_real_vfs->xSleep(fault_real_vfs, us);
}

static int fault_current_time(sqlite3_vfs *vfs, double *out) {
    (void)vfs;
    return fault_real_vfs->xCurrentTime(fault_real_vfs, out);
}

static int fault_get_last_error(sqlite3_vfs *vfs, int n, char *out) {
    (void)vfs;
    return fault_real_vfs->xGetLastError(fault_real_vfs, n, out);
}

static int fault_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out) {
    (void)vfs;
    if (fault_real_vfs->iVersion >= 2 && fault_real_vfs->xCurrentTimeInt64)
        return fault_real_vfs->xCurrentTimeInt64(fault_real_vfs, out);
    double days;
    int rc = fault_real_vfs->xCurrentTime(fault_real_vfs, &days);
    *out = (sqlite3_int64)(days * 86400000.0);
    return rc;
}

static void fault_install_once(void) {
    fault_install_rc = PEP_EDB;
    if (sqlite3_initialize() != SQLITE_OK) return;
    fault_real_vfs = sqlite3_vfs_find(NULL);
    if (!fault_real_vfs) return;
    fault_vfs = (sqlite3_vfs){
        .iVersion = 2,
        .szOsFile = (int)FAULT_REAL_OFFSET + fault_real_vfs->szOsFile,
        .mxPathname = fault_real_vfs->mxPathname,
        .zName = AUDIT_FAULT_VFS,
        .xOpen = fault_open,
        .xDelete = fault_delete,
        .xAccess = fault_access,
        .xFullPathname = fault_full_pathname,
        .xDlOpen = fault_dlopen,
        .xDlError = fault_dlerror,
        .xDlSym = fault_dlsym,
        .xDlClose = fault_dlclose,
        .xRandomness = fault_randomness,
        .xSleep = fault_sleep,
        .xCurrentTime = fault_current_time,
        .xGetLastError = fault_get_last_error,
        .xCurrentTimeInt64 = fault_current_time_int64,
    };
    if (sqlite3_vfs_register(&fault_vfs, 0) == SQLITE_OK) fault_install_rc = 0;
}

int audit_fault_install(void) {
    if (pthread_once(&fault_once, fault_install_once) != 0) return PEP_EDB;
    return fault_install_rc;
}

void audit_fault_set(enum audit_fault mode) {
    atomic_store(&fault_mode, (int)mode);
}
