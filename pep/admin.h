/*
 * admin.h — the admin API (SPEC 5): the handlers its listener is given.
 *
 * Threads: the admin listener's threads.
 */
#ifndef PEP_ADMIN_H
#define PEP_ADMIN_H

#include "pep/http.h"

extern const struct listener_handlers admin_handlers;

#endif
