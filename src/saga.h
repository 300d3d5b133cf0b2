/*
 * saga.h
 *		Declarations shared between the files of the saga extension.
 */
#ifndef SAGA_H
#define SAGA_H

#include "postgres.h"

#include "access/attnum.h"
#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/spin.h"

/* guc.c */
extern char *saga_databases;
extern int	saga_poll_interval_ms;
extern int	saga_batch_size;
extern int	saga_max_databases;
extern int	saga_max_payload_size;
extern int	saga_message_retention_s;
extern void saga_define_gucs(void);

/* shmem.c: one slot per database worker */
typedef enum SagaWorkerState
{
	SAGA_SLOT_FREE = 0,
	SAGA_SLOT_STARTING,
	SAGA_SLOT_IDLE,
	SAGA_SLOT_DISPATCHING,
	SAGA_SLOT_WAITING_LOCK,
	SAGA_SLOT_EXITED
} SagaWorkerState;

typedef enum SagaExitReason
{
	SAGA_EXIT_NONE = 0,
	SAGA_EXIT_NO_EXTENSION,		/* database has no saga extension: do not restart soon */
	SAGA_EXIT_ERROR				/* anything else: restart after a short delay */
} SagaExitReason;

typedef struct SagaWorkerSlot
{
	Oid			dboid;
	SagaWorkerState state;
	SagaExitReason exit_reason;
	pid_t		pid;
	Latch	   *latch;
	TimestampTz started_at;
	TimestampTz last_cycle_at;
	int			in_flight;		/* HTTP requests and calls into databases */
	int			remote_calls_in_flight; /* ... of which into databases */
	pg_atomic_uint64 published;
	pg_atomic_uint64 delivered;
	pg_atomic_uint64 retried;
	pg_atomic_uint64 dead_lettered;
} SagaWorkerSlot;

typedef struct SagaShared
{
	slock_t		mutex;
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	TimestampTz launcher_started_at;
	bool		recheck_databases;	/* set when CREATE EXTENSION saga commits */
	pg_atomic_uint64 config_version;	/* bumped when destinations change */
	int			nslots;
	SagaWorkerSlot slots[FLEXIBLE_ARRAY_MEMBER];
} SagaShared;

extern SagaShared *saga_shared;
extern void saga_shmem_request(void);
extern void saga_shmem_startup(void);
extern bool saga_shmem_available(void);
extern SagaWorkerSlot *saga_slot_for_database(Oid dboid);
extern void saga_wake_worker(Oid dboid);
extern void saga_wake_launcher(bool recheck);
extern uint64 saga_config_version(void);

/* a backend's copy of a configuration table, reread when the version moves */
typedef struct SagaCopy
{
	const char *name;			/* identifies its memory context */
	const char *query;			/* reads the table's rows */
	MemoryContext cxt;
	bool		valid;
	uint64		version;
	Oid			relid;
} SagaCopy;

struct SPITupleTable;
extern void saga_copy_refresh(SagaCopy *copy, Oid relid,
							  void (*load) (MemoryContext cxt, struct SPITupleTable *rows, uint64 n));

/* launcher.c */
extern void saga_register_launcher(void);
extern PGDLLEXPORT void saga_launcher_main(Datum arg);
extern void saga_stop_worker_for_database(Oid dboid);

/* worker.c */
extern PGDLLEXPORT void saga_worker_main(Datum arg);

/* routing.c */
extern List *saga_route(const char *topic, Oid subscriptions_relid, bool *to_inbox);

/* definitions.c */
extern bool saga_latest_definition(const char *name, Oid relid, int32 *version,
								   Interval **deadline);

/* row_insert.c: the columns one kind of row fills, by name and type */
typedef struct SagaRowShape
{
	const char *table;			/* in schema saga */
	int			ncolumns;
	const char *const *columns;
	const Oid  *types;
	/* where they are in the table, found on first use */
	Oid			relid;
	int			natts;
	AttrNumber *attnums;
	/* the table's indexes, described once (row_insert.c) */
	MemoryContext index_cxt;
	bool		indexes_valid;
	int			nindexes;		/* -1 while being described */
	Oid		   *index_oids;
	struct IndexInfo **index_infos;	/* NULL: built for each row */
} SagaRowShape;

extern void saga_insert_row(SagaRowShape *shape, Oid relid, const Datum *values, const bool *nulls);

/* uuid7.c */
extern void saga_uuid7(unsigned char *out);

/* api.c: wake the worker when the current transaction commits */
extern void saga_wake_at_commit(int published);
extern void saga_wake_launcher_at_commit(void);
extern void saga_config_changed_at_commit(void);
extern bool saga_config_changed_in_xact(void);

#endif							/* SAGA_H */
