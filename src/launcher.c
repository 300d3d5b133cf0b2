/*
 * launcher.c
 *		Starts one worker per database that has the extension, and keeps it
 *		running.
 *
 * The launcher cannot look inside another database, so it starts a worker in
 * every database it does not know yet; a worker that finds no extension
 * exits and says so in its slot, and the launcher leaves that database alone
 * until CREATE EXTENSION saga asks for a recheck (or RECHECK_INTERVAL passes,
 * for extensions arriving by pg_restore or a template).
 */
#include "saga.h"

#include <signal.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#define RECHECK_INTERVAL_MS		(5 * 60 * 1000)
#define RESTART_DELAY_MS		1000
#define LAUNCHER_NAP_MS			10000

/* What the launcher remembers about one database. */
typedef struct KnownDatabase
{
	Oid			dboid;			/* hash key */
	BackgroundWorkerHandle *handle; /* worker started by us, or NULL */
	pid_t		adopted_pid;	/* worker started by a previous launcher */
	int			slot;
	bool		no_extension;
	bool		seen;
	TimestampTz not_before;		/* do not start a worker before this */
} KnownDatabase;

static HTAB *known_databases = NULL;

void
saga_register_launcher(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* not on a standby: the launcher starts when recovery ends (promotion) */
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "saga");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "saga_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "saga launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "saga launcher");
	RegisterBackgroundWorker(&bgw);
}

/* Is this database allowed by saga.databases? */
static bool
database_allowed(const char *name)
{
	char	   *raw;
	List	   *names;
	ListCell   *lc;
	bool		allowed = false;

	if (saga_databases == NULL || saga_databases[0] == '\0')
		return true;

	raw = pstrdup(saga_databases);
	if (!SplitGUCList(raw, ',', &names))
	{
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("saga.databases is not a valid list of names: \"%s\"", saga_databases)));
		return false;
	}
	foreach(lc, names)
	{
		if (strcmp((char *) lfirst(lc), name) == 0)
			allowed = true;
	}
	return allowed;
}

/* Oids of the databases a worker may run in, read from pg_database. */
static List *
list_candidate_databases(void)
{
	List	   *result = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	MemoryContext caller_cxt = CurrentMemoryContext;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);
		MemoryContext old;

		if (!db->datallowconn || db->datistemplate || db->datconnlimit < -1)
			continue;
		if (!database_allowed(NameStr(db->datname)))
			continue;
		old = MemoryContextSwitchTo(caller_cxt);
		result = lappend_oid(result, db->oid);
		MemoryContextSwitchTo(old);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller_cxt);
	return result;
}

static int
claim_slot(Oid dboid)
{
	int			found = -1;

	SpinLockAcquire(&saga_shared->mutex);
	for (int i = 0; i < saga_shared->nslots; i++)
	{
		SagaWorkerSlot *slot = &saga_shared->slots[i];

		if (slot->state == SAGA_SLOT_FREE)
		{
			slot->dboid = dboid;
			slot->state = SAGA_SLOT_STARTING;
			slot->exit_reason = SAGA_EXIT_NONE;
			slot->pid = 0;
			slot->latch = NULL;
			slot->in_flight = 0;
			slot->remote_calls_in_flight = 0;
			slot->started_at = 0;
			slot->last_cycle_at = 0;
			pg_atomic_write_u64(&slot->published, 0);
			pg_atomic_write_u64(&slot->delivered, 0);
			pg_atomic_write_u64(&slot->retried, 0);
			pg_atomic_write_u64(&slot->dead_lettered, 0);
			found = i;
			break;
		}
	}
	SpinLockRelease(&saga_shared->mutex);
	return found;
}

static void
release_slot(int i)
{
	SpinLockAcquire(&saga_shared->mutex);
	saga_shared->slots[i].state = SAGA_SLOT_FREE;
	saga_shared->slots[i].dboid = InvalidOid;
	saga_shared->slots[i].pid = 0;
	saga_shared->slots[i].latch = NULL;
	SpinLockRelease(&saga_shared->mutex);
}

static void
start_worker(KnownDatabase *db, TimestampTz now)
{
	BackgroundWorker bgw;
	int			slot = claim_slot(db->dboid);
	MemoryContext old;
	bool		registered;

	if (slot < 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no free saga worker slot for database %u", db->dboid),
				 errhint("Increase saga.max_databases, or restrict saga.databases.")));
		db->not_before = TimestampTzPlusMilliseconds(now, LAUNCHER_NAP_MS);
		return;
	}

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher restarts it */
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "saga");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "saga_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "saga worker for database %u", db->dboid);
	snprintf(bgw.bgw_type, BGW_MAXLEN, "saga worker");
	bgw.bgw_main_arg = Int32GetDatum(slot);
	memcpy(bgw.bgw_extra, &db->dboid, sizeof(Oid));
	bgw.bgw_notify_pid = MyProcPid;

	/* the handle outlives this scan's memory */
	old = MemoryContextSwitchTo(TopMemoryContext);
	registered = RegisterDynamicBackgroundWorker(&bgw, &db->handle);
	MemoryContextSwitchTo(old);
	if (!registered)
	{
		release_slot(slot);
		db->handle = NULL;
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a saga worker for database %u", db->dboid),
				 errhint("Increase max_worker_processes: saga needs one for the launcher and one per database.")));
		db->not_before = TimestampTzPlusMilliseconds(now, LAUNCHER_NAP_MS);
		return;
	}
	db->slot = slot;
}

static bool
has_worker(KnownDatabase *db)
{
	return db->handle != NULL || db->adopted_pid != 0;
}

static bool
worker_alive(KnownDatabase *db)
{
	pid_t		pid;

	if (db->handle != NULL)
		return GetBackgroundWorkerPid(db->handle, &pid) != BGWH_STOPPED;
	if (db->adopted_pid != 0)
		return saga_shared->slots[db->slot].state != SAGA_SLOT_EXITED &&
			kill(db->adopted_pid, 0) == 0;
	return false;
}

/* Forget a worker that has stopped, learning from its slot why it stopped. */
static void
reap_worker(KnownDatabase *db, TimestampTz now)
{
	SagaExitReason reason = saga_shared->slots[db->slot].exit_reason;

	release_slot(db->slot);
	if (db->handle)
		pfree(db->handle);
	db->handle = NULL;
	db->adopted_pid = 0;
	db->slot = -1;
	db->no_extension = (reason == SAGA_EXIT_NO_EXTENSION);
	db->not_before = TimestampTzPlusMilliseconds(now, db->no_extension ?
												 RECHECK_INTERVAL_MS : RESTART_DELAY_MS);
}

/* One pass: reap stopped workers, start missing ones; returns ms to sleep. */
static long
launcher_scan(void)
{
	List	   *candidates = list_candidate_databases();
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = TimestampTzPlusMilliseconds(now, LAUNCHER_NAP_MS);
	HASH_SEQ_STATUS seq;
	KnownDatabase *db;
	ListCell   *lc;
	bool		recheck;

	SpinLockAcquire(&saga_shared->mutex);
	recheck = saga_shared->recheck_databases;
	saga_shared->recheck_databases = false;
	SpinLockRelease(&saga_shared->mutex);

	hash_seq_init(&seq, known_databases);
	while ((db = hash_seq_search(&seq)) != NULL)
		db->seen = false;

	foreach(lc, candidates)
	{
		Oid			dboid = lfirst_oid(lc);
		bool		found;

		db = hash_search(known_databases, &dboid, HASH_ENTER, &found);
		if (!found)
		{
			db->handle = NULL;
			db->adopted_pid = 0;
			db->slot = -1;
			db->no_extension = false;
			db->not_before = 0;
		}
		db->seen = true;

		if (has_worker(db))
		{
			if (worker_alive(db))
				continue;
			reap_worker(db, now);
		}
		if (db->no_extension && recheck)
			db->not_before = 0;
		if (now >= db->not_before)
			start_worker(db, now);
		if (db->handle == NULL && db->not_before < next)
			next = db->not_before;
	}

	/* Databases dropped, or no longer in saga.databases */
	hash_seq_init(&seq, known_databases);
	while ((db = hash_seq_search(&seq)) != NULL)
	{
		if (db->seen)
			continue;
		if (!has_worker(db))
			hash_search(known_databases, &db->dboid, HASH_REMOVE, NULL);
		else if (!worker_alive(db))
		{
			reap_worker(db, now);
			hash_search(known_databases, &db->dboid, HASH_REMOVE, NULL);
		}
		else if (db->handle != NULL)
			TerminateBackgroundWorker(db->handle);
		else
			kill(db->adopted_pid, SIGTERM);
	}

	list_free(candidates);
	return Max(10, TimestampDifferenceMilliseconds(now, next));
}

/*
 * A launcher that restarted (after an error, or pg_terminate_backend) finds
 * the workers of its predecessor still running: it adopts them, tracking
 * them by pid, instead of starting a second one per database. Slots whose
 * worker never started or has gone are freed.
 */
static void
adopt_running_workers(void)
{
	for (int i = 0; i < saga_shared->nslots; i++)
	{
		SagaWorkerSlot *slot = &saga_shared->slots[i];
		pid_t		pid;
		Oid			dboid;
		bool		alive;

		SagaWorkerState state;

		SpinLockAcquire(&saga_shared->mutex);
		pid = slot->pid;
		dboid = slot->dboid;
		state = slot->state;
		SpinLockRelease(&saga_shared->mutex);
		if (state == SAGA_SLOT_FREE)
			continue;
		alive = state != SAGA_SLOT_EXITED && pid != 0 && kill(pid, 0) == 0;
		if (!alive)
			release_slot(i);

		if (alive)
		{
			bool		found;
			KnownDatabase *db = hash_search(known_databases, &dboid, HASH_ENTER, &found);

			db->handle = NULL;
			db->adopted_pid = pid;
			db->slot = i;
			db->no_extension = false;
			db->not_before = 0;
		}
	}
}

void
saga_launcher_main(Datum arg)
{
	HASHCTL		ctl;
	MemoryContext scan_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (IsBinaryUpgrade)
		proc_exit(0);

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("saga launcher");

	SpinLockAcquire(&saga_shared->mutex);
	saga_shared->launcher_pid = MyProcPid;
	saga_shared->launcher_latch = MyLatch;
	saga_shared->launcher_started_at = GetCurrentTimestamp();
	SpinLockRelease(&saga_shared->mutex);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(KnownDatabase);
	known_databases = hash_create("saga known databases", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS);
	adopt_running_workers();

	scan_cxt = AllocSetContextCreate(TopMemoryContext, "saga launcher scan",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		long		sleep_ms;

		MemoryContextSwitchTo(scan_cxt);
		MemoryContextReset(scan_cxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		pgstat_report_activity(STATE_RUNNING, "scanning databases");
		sleep_ms = launcher_scan();
		pgstat_report_activity(STATE_IDLE, NULL);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Called by the backend running DROP DATABASE: ask the database's worker to
 * leave, and wait (up to five seconds) until it has, so that the drop does
 * not fail with "database is being accessed by other users".
 */
void
saga_stop_worker_for_database(Oid dboid)
{
	SagaWorkerSlot *slot = saga_slot_for_database(dboid);
	pid_t		pid = 0;

	if (slot == NULL)
		return;
	SpinLockAcquire(&saga_shared->mutex);
	if (slot->dboid == dboid)
		pid = slot->pid;
	SpinLockRelease(&saga_shared->mutex);
	if (pid == 0)
		return;
	if (kill(pid, SIGTERM) != 0)
		return;
	for (int i = 0; i < 500; i++)
	{
		if (kill(pid, 0) != 0)
			break;
		CHECK_FOR_INTERRUPTS();
		pg_usleep(10 * 1000L);
	}
}
