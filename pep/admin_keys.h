/*
 * admin_keys.h — the admin API's signing keys and signed checkpoints (SPEC 5, 6.4, 8):
 *
 *   POST /admin/v1/keys/rotate              admin            a new key signs from now on
 *   GET  /admin/v1/keys                     admin, auditor   the ring: kid, state, times
 *   GET  /admin/v1/audit/checkpoints/latest auditor, admin   {"seq", "hash", "jwt"}, or 404
 *
 * Handlers of the admin router's table (pep/admin.c: struct admin_route).
 *
 * Threads: the admin listener's threads.
 */
#ifndef PEP_ADMIN_KEYS_H
#define PEP_ADMIN_KEYS_H

#include "pep/http.h"

/* Seconds before a key took over from which tokens are still counted as possibly its own
 * when its retirement is worked out: a token's iat is read from the clock a moment before
 * the key that signs it is (see admin_keys.c). */
#define ADMIN_KEYS_ISSUE_MARGIN_S 60

enum MHD_Result admin_keys_rotate(struct request *r, const char *const *arg);
enum MHD_Result admin_keys_list(struct request *r, const char *const *arg);
enum MHD_Result admin_checkpoint_latest(struct request *r, const char *const *arg);

#endif
