/*
 * outbox.h
 *		The SQL the worker runs against the outbox tables.
 */
#ifndef SAGA_OUTBOX_H
#define SAGA_OUTBOX_H

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"

#include "transport_http.h"
#include "transport_pg.h"

typedef enum SagaDestinationKind
{
	SAGA_DEST_NOTIFY,
	SAGA_DEST_HTTP,
	SAGA_DEST_POSTGRESQL
} SagaDestinationKind;

/* A destination as the worker needs it for one cycle. */
typedef struct SagaDestination
{
	char	   *name;
	SagaDestinationKind kind;
	char	   *target;			/* NOTIFY channel, URL or conninfo */
	List	   *header_lines;	/* "Name: value", HTTP only */
	int			timeout_ms;
	int			max_attempts;
	int			backoff_ms;
	int			max_backoff_ms;
	int			concurrency;
} SagaDestination;

typedef struct SagaRecordCounts
{
	int			delivered;
	int			retried;
	int			dead;
} SagaRecordCounts;

/* where the previous NOTIFY batch of a cycle stopped, in index order */
typedef struct SagaNotifyCursor
{
	bool		valid;
	TimestampTz due;
	int64		seq;
} SagaNotifyCursor;

extern SPIPlanPtr saga_prepare_kept(const char *sql, int nargs, Oid *argtypes);
extern SPIPlanPtr saga_prepare_kept_custom(const char *sql, int nargs, Oid *argtypes);
extern SPIPlanPtr saga_prepare_kept_generic(const char *sql, int nargs, Oid *argtypes);
extern int	saga_execute_confined(SPIPlanPtr plan, Datum *values, const char *nulls);
extern TimestampTz saga_query_timestamp(SPIPlanPtr *plan, const char *sql, const char *what);
extern bool saga_outbox_extension_present(void);
extern void saga_outbox_reconcile(void);
extern List *saga_outbox_destinations(void);
extern int	saga_outbox_dispatch_notify(SagaDestination *dest, int limit, SagaNotifyCursor *cursor);
extern int	saga_outbox_claim_http(SagaHttp *http, SagaDestination *dest, int limit);
extern int	saga_outbox_claim_pg(SagaPg *pg, SagaDestination *dest, int limit);
extern SagaRecordCounts saga_outbox_record(List *requests);
extern TimestampTz saga_outbox_next_due(SagaDestination *dest);
extern int	saga_outbox_expire_retained(void);
extern int	saga_backoff_ms(int attempt, int backoff_ms, int max_backoff_ms);

#endif							/* SAGA_OUTBOX_H */
