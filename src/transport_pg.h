/*
 * transport_pg.h
 *		Calls into other service databases over libpq, without blocking.
 */
#ifndef SAGA_TRANSPORT_PG_H
#define SAGA_TRANSPORT_PG_H

#include "nodes/pg_list.h"

#include "request.h"

typedef struct SagaPg SagaPg;

extern SagaPg *saga_pg_create(const char *source);
extern SagaRequest *saga_pg_new_request(SagaPg *pg, int max_connections);
extern void saga_pg_submit_new(SagaPg *pg);
extern void saga_pg_discard_new(SagaPg *pg);
extern int	saga_pg_in_flight(SagaPg *pg, const char *destination);
extern int	saga_pg_total_in_flight(SagaPg *pg);
extern pgsocket saga_pg_wait_fd(SagaPg *pg);
extern long saga_pg_timeout_ms(SagaPg *pg);
extern void saga_pg_perform(SagaPg *pg);
extern bool saga_pg_has_completed(SagaPg *pg);
extern List *saga_pg_completed(SagaPg *pg);
extern void saga_pg_release(List *requests);

#endif							/* SAGA_TRANSPORT_PG_H */
