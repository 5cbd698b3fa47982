/*
 * seed.h — state pep writes on its own: the bootstrap operator and its admin.token at first
 * start, and the agents the policy file lists (at start and on every reload).  Each change
 * is written with its record, synchronously.
 *
 * Threads: startup, or a reload (both may block on the audit writer).
 */
#ifndef PEP_SEED_H
#define PEP_SEED_H

#include "pep/server.h"

/* First start: creates the bootstrap operator `admin` and writes DATA/admin.token (0600)
 * when that file does not exist.  Blocks on the audit writer (startup only). */
int server_bootstrap_admin(struct server *s, struct pep_err *err);

/* Brings the policy-managed agents in line with p (each change audited as kind `system`,
 * action `agents.seed`): creates the agents p lists that the registry lacks, updates
 * policy-managed ones that differ, disables policy-managed ones p no longer lists.
 * Agents changed through the admin API are left as they are (logged when p differs).
 * Blocks on the audit writer. */
int server_seed_agents(struct server *s, const struct policy *p);

#endif
