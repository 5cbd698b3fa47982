/*
 * datadir.h — what pep checks of its data directory before it reads or writes anything in
 * it (SPEC 1: one pep per data dir, never a silent fresh start, files 0600).
 *
 * An operator's ordinary mistakes must not destroy history or resurrect revoked
 * credentials: a second `pep serve` on a directory in use, a store removed, emptied or
 * swapped for another database while the keys and admin.token stay, a keys directory lost
 * next to a store full of records.  Each is refused at start with exit 1, naming the file
 * and how to start over deliberately (a new, empty data directory).
 *
 * Threads: main thread, at start.
 */
#ifndef PEP_DATADIR_H
#define PEP_DATADIR_H

#include "pep/common.h"

/* The lock that makes one pep per data dir, held for the life of the process. */
#define DATADIR_LOCK_FILE "pep.lock"

/*
 * Creates DATA (0700) if needed and takes an exclusive flock on DATA/pep.lock, writing this
 * process's pid into it.  Returns 0 and *lock_fd (keep it open until exit), or PEP_EEXISTS
 * with err naming the pid that holds the directory, or another code with err.
 */
int datadir_lock(const char *data_dir, int *lock_fd, struct pep_err *err);

/*
 * Refuses a data dir that was in use but whose store pep would have to start over: keys or
 * admin.token present while DATA/pep.db is missing, empty or not pep's; a pep.db that is
 * not pep's; a store holding records while DATA/keys holds no key.  Warns on stderr about a
 * directory or files other users can read or write, and makes pep's files 0600 (SQLite
 * gives -wal and -shm the database file's mode).  *missing_triggers receives the names of
 * pep's append-only triggers that the store lacks ("" when none): the store was tampered
 * with, and the caller reports it once the store is open.  Returns 0, or PEP_EINVAL with err.
 */
int datadir_check(const char *data_dir, const char *db_path, char missing_triggers[256],
                  struct pep_err *err);

#endif
