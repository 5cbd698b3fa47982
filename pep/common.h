/*
 * common.h — error codes, the error-detail struct and small helpers every module uses.
 *
 * Functions that can fail return int: 0 for success or a negative PEP_E* code.  When the
 * caller needs detail they also fill a struct pep_err.  The codes and their messages come
 * from one X-macro so that the two can never drift apart.
 *
 * Thread-safety: everything here is safe to call from any thread.
 */
#ifndef PEP_COMMON_H
#define PEP_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PEP_ERRORS(X)                                                                              \
    X(OK, 0, "ok")                                                                                 \
    X(NOMEM, -1, "out of memory")                                                                  \
    X(IO, -2, "I/O error")                                                                         \
    X(INVAL, -3, "invalid input")                                                                  \
    X(NOTFOUND, -4, "not found")                                                                   \
    X(CRYPTO, -5, "cryptographic failure")                                                         \
    X(DB, -6, "database error")                                                                    \
    X(EXISTS, -7, "already exists")                                                                \
    X(UNAVAILABLE, -8, "unavailable")                                                              \
    X(DENIED, -9, "denied")                                                                        \
    X(CLOSED, -10, "closed")                                                                       \
    X(BACKLOG, -11, "too many records held back")

enum pep_code {
#define PEP_X_ENUM(name, value, msg) PEP_E##name = (value),
    PEP_ERRORS(PEP_X_ENUM)
#undef PEP_X_ENUM
};

/* Returns the static message of a PEP_E* code ("unknown error" for others). */
const char *pep_strerror(int code);

/* Error detail filled by fallible functions when the caller passes one (may be NULL). */
struct pep_err {
    int code;      /* PEP_E* */
    char msg[512]; /* human-readable, never contains a secret */
};

/* Sets err (if not NULL) to code and a printf-formatted message; returns code. */
int pep_err_set(struct pep_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define PEP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Always-true / always-false defensive branches, in the SQLite manner. */
#define PEP_NEVER(x) __builtin_expect(!!(x), 0)

#endif
