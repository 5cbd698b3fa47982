/* Test support shared by the unit and integration suites: tampering with a store file
 * the way an attacker with write access to it would. */
#ifndef PEP_TESTS_SUPPORT_FORGE_H
#define PEP_TESTS_SUPPORT_FORGE_H

#include <stdint.h>

/* The reviewer's forgery on a closed store file: the triggers dropped, record `seq` given a
 * `"forged": true` member (still canonical JSON), prev_hash and hash recomputed from there
 * to the head, and the new hashes copied into the checkpoints' hash column; the checkpoint
 * JWTs stay as pep signed them.  The chain walk then holds: only a check of the signed
 * checkpoints catches it.  Fails the running cmocka test on any error. */
void forge_rehashed(const char *path, int64_t seq);

#endif
