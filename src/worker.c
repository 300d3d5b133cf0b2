/*
 * worker.c
 *		One worker per database: wait for work, then claim, dispatch and
 *		record in short transactions.
 *
 * The loop never holds a transaction, snapshot or lock while it waits on the
 * network: HTTP requests (libcurl) and calls into other databases (libpq)
 * run between transactions, and NOTIFY deliveries are queued and committed
 * together with the rows they remove.
 */
#include "saga.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "commands/dbcommands.h"
#include "commands/vacuum.h"
#include "nodes/makefuncs.h"
#include "parser/parse_node.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "compat.h"
#include "engine.h"
#include "inbox.h"
#include "outbox.h"

/*
 * The lock (with the database oid) fencing one worker per database. It is an
 * advisory lock of a class SQL cannot name (pg_advisory_lock uses classes 1
 * and 2), so no role can take it to keep the worker from starting.
 */
#define WORKER_LOCK_KEY1	0x73616761	/* "saga" */
#define WORKER_LOCK_KEY2	1
#define WORKER_LOCK_CLASS	0x5347

/* at most this many NOTIFY batches per destination before looking at HTTP */
#define NOTIFY_BATCHES_PER_CYCLE	8

/*
 * Sagas per transaction: each call is a subtransaction, and a transaction
 * with more than 64 subtransactions that wrote overflows the snapshot's
 * subxid cache, which slows every other session's visibility checks.
 */
#define SAGAS_PER_TRANSACTION	20
#define SAGA_BATCHES_PER_CYCLE	25
/* the same for inbox messages: one subtransaction each */
#define INBOX_MESSAGES_PER_TRANSACTION	50
#define INBOX_BATCHES_PER_CYCLE	25

#define RETENTION_SWEEP_MS	60000

/*
 * Wake-ups from commits run at most one cycle per this many milliseconds.
 * Meanwhile the latch stays set, so busy publishers find it set and send no
 * signal; at a low rate no cycle is delayed.
 */
#define MIN_WAKE_INTERVAL_MS	2

/*
 * The worker vacuums saga.queue itself once it has deleted this many rows:
 * at thousands of messages a second, waiting for autovacuum's next round lets
 * the table grow by all the rows deleted in between, and the claims walk
 * their dead index entries. A vacuum's cost grows with the table, so the
 * next one waits until as many rows have been deleted as the last one left
 * (a backlog being drained is vacuumed about once per halving), and starts no
 * sooner than VACUUM_PAUSE_FACTOR times the last one's duration after it
 * (vacuum takes at most a fifth of the worker's time) and at least
 * VACUUM_MIN_PAUSE_MS after it.
 */
#define VACUUM_AFTER_DELETES	20000
#define VACUUM_PAUSE_FACTOR		5
#define VACUUM_MIN_PAUSE_MS		100
/* ... and once it has been idle this long after deleting some */
#define VACUUM_WHEN_IDLE_AFTER	1000
#define VACUUM_IDLE_MS			1000

static SagaWorkerSlot *my_slot = NULL;

/* reset every loop iteration; results of a cycle's SQL are copied here */
static MemoryContext cycle_cxt = NULL;

/* destinations, kept across cycles and reread when they change */
#define DESTINATIONS_STALE	PG_UINT64_MAX
static MemoryContext destinations_cxt = NULL;
static List *destinations = NIL;
static uint64 destinations_version = DESTINATIONS_STALE;


/* the two transports, with requests in flight across cycles */
static SagaHttp *http = NULL;
static SagaPg *pg = NULL;

/* rows deleted since the worker last vacuumed saga.queue */
static uint64 deleted_since_vacuum = 0;
static long vacuum_pause_ms = VACUUM_MIN_PAUSE_MS;
static uint64 vacuum_after_deletes = VACUUM_AFTER_DELETES;

static void
set_state(SagaWorkerState state)
{
	SpinLockAcquire(&saga_shared->mutex);
	my_slot->state = state;
	SpinLockRelease(&saga_shared->mutex);
}

static void
worker_on_exit(int code, Datum arg)
{
	SpinLockAcquire(&saga_shared->mutex);
	my_slot->state = SAGA_SLOT_EXITED;
	my_slot->pid = 0;
	my_slot->latch = NULL;
	SpinLockRelease(&saga_shared->mutex);
}

static void
leave_no_extension(void)
{
	my_slot->exit_reason = SAGA_EXIT_NO_EXTENSION;
	proc_exit(0);
}

static void
begin_work(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cycle_cxt);
	pgstat_report_activity(STATE_RUNNING, activity);
	/* DROP EXTENSION may have committed since the last cycle */
	if (!saga_outbox_extension_present())
	{
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		ereport(LOG, (errmsg("saga worker exiting: extension \"saga\" is not installed in this database")));
		leave_no_extension();
	}
}

static void
end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cycle_cxt);
	/* without this, autovacuum never hears of the rows the worker deletes */
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Take the database's worker lock, a session-level advisory lock. Only one
 * worker per database dispatches, even if a launcher race or a failover ever
 * started two.
 */
static void
acquire_worker_lock(void)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, WORKER_LOCK_KEY1, WORKER_LOCK_KEY2, WORKER_LOCK_CLASS);
	for (;;)
	{
		LockAcquireResult r;

		StartTransactionCommand();
		r = LockAcquire(&tag, ExclusiveLock, true, true);
		CommitTransactionCommand();
		if (r != LOCKACQUIRE_NOT_AVAIL)
			return;
		set_state(SAGA_SLOT_WAITING_LOCK);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * The destinations, reread when one was created or dropped since the last
 * read (version was taken before this transaction's snapshot, so a change
 * committed after it bumps the version again) or when reread is asked for.
 */
static List *
current_destinations(uint64 version, bool reread)
{
	MemoryContext old;

	if (!reread && version == destinations_version)
		return destinations;
	if (destinations_cxt == NULL)
		destinations_cxt = AllocSetContextCreate(TopMemoryContext, "saga destinations",
												 ALLOCSET_SMALL_SIZES);
	destinations_version = DESTINATIONS_STALE;
	destinations = NIL;
	MemoryContextReset(destinations_cxt);
	old = MemoryContextSwitchTo(destinations_cxt);
	destinations = saga_outbox_destinations();
	MemoryContextSwitchTo(old);
	destinations_version = version;
	return destinations;
}

/* The earlier of two due times, where 0 means none. */
static TimestampTz
earliest(TimestampTz a, TimestampTz b)
{
	if (a == 0)
		return b;
	return (b != 0 && b < a) ? b : a;
}

/*
 * Claim a batch for a postgresql destination if one of its connections has
 * room. Returns true when the destination is busy (no room, or a full batch
 * claimed); sets *more when room for another batch is left.
 */
static bool
claim_database_batch(SagaDestination *dest, bool *more)
{
	int			room = dest->concurrency * saga_batch_size - saga_pg_in_flight(pg, dest->name);
	int			want = Min(room, saga_batch_size);

	if (room <= 0)
		return true;
	if (saga_outbox_claim_pg(pg, dest, want) < want)
		return false;
	if (room > want)
		*more = true;
	return true;
}

/*
 * glibc's defaults make a burst expensive for this process: libcurl allocates
 * a 16 kB receive buffer per transfer and frees it when the transfer is done,
 * and the adaptive trim threshold may give that memory back to the kernel
 * each time, a system call and fresh page faults per request. Keep freed
 * memory instead. Fixing the trim threshold also ends the adaptive mmap
 * threshold, so set that too, or each batch's large tuple table would be
 * mapped and unmapped.
 */
static void
keep_freed_memory(void)
{
#ifdef __GLIBC__
	mallopt(M_TRIM_THRESHOLD, 16 * 1024 * 1024);
	mallopt(M_MMAP_THRESHOLD, 8 * 1024 * 1024);
#endif
}

static inline bool
is_due(TimestampTz due, TimestampTz now)
{
	return due != 0 && due <= now;
}

/*
 * One cycle: record finished requests, claim more for every HTTP and
 * postgresql destination with room, then drain due NOTIFY messages. Returns true when
 * work was left behind (a full NOTIFY batch), so the caller does not sleep;
 * *next_due is set to when the next waiting message falls due (0: none).
 */
static bool
run_cycle(bool sweep_retained, bool reread, TimestampTz *next_due)
{
	List	   *finished_http = saga_http_completed(http);
	List	   *finished_pg = saga_pg_completed(pg);
	List	   *finished = list_concat_copy(finished_http, finished_pg);
	uint64		version = saga_config_version();
	List	   *dests;
	SagaRecordCounts counts;
	ListCell   *lc;
	bool		more = false;
	bool		more_databases = false;
	TimestampTz sagas_due;
	TimestampTz inbox_due;
	TimestampTz now;

	foreach(lc, finished)
	{
		SagaRequest *req = lfirst(lc);

		if (req->outcome != SAGA_OUTCOME_DELIVERED)
			ereport(DEBUG1,
					(errmsg("saga: attempt %d to deliver to destination \"%s\" failed: %s",
							req->attempt, req->destination, req->error)));
	}

	begin_work("claiming and recording");
	counts = saga_outbox_record(finished);
	dests = current_destinations(version, reread);
	*next_due = 0;
	foreach(lc, dests)
	{
		SagaDestination *dest = lfirst(lc);

		if (dest->kind == SAGA_DEST_HTTP)
		{
			int			room = dest->concurrency - saga_http_in_flight(http, dest->name);
			int			want = Min(room, saga_batch_size);

			/* a full destination is looked at again when a request finishes */
			if (room <= 0 || saga_outbox_claim_http(http, dest, want) == want)
				continue;
		}
		else if (dest->kind == SAGA_DEST_POSTGRESQL)
		{
			/* one batch now; the other connections' batches follow below */
			if (claim_database_batch(dest, &more_databases))
				continue;
		}
		*next_due = earliest(*next_due, saga_outbox_next_due(dest));
	}
	if (sweep_retained)
		saga_outbox_expire_retained();
	sagas_due = saga_engine_next_due();
	inbox_due = saga_inbox_next_due();
	*next_due = earliest(earliest(*next_due, sagas_due), inbox_due);
	end_work();

	/* committed: the outcomes are durable, the claims are ours */
	pg_atomic_fetch_add_u64(&my_slot->delivered, counts.delivered);
	deleted_since_vacuum += counts.delivered;
	pg_atomic_fetch_add_u64(&my_slot->retried, counts.retried);
	pg_atomic_fetch_add_u64(&my_slot->dead_lettered, counts.dead);
	saga_http_release(finished_http);
	saga_pg_release(finished_pg);
	saga_http_submit_new(http);
	saga_pg_submit_new(pg);

	/*
	 * A batch per connection of a postgresql destination, each claimed in a
	 * transaction of its own and sent as soon as that commits: the first
	 * connection works while the next batch is claimed.
	 */
	while (more_databases)
	{
		more_databases = false;
		begin_work("claiming for databases");
		foreach(lc, dests)
		{
			SagaDestination *dest = lfirst(lc);

			if (dest->kind == SAGA_DEST_POSTGRESQL)
				(void) claim_database_batch(dest, &more_databases);
		}
		end_work();
		saga_pg_submit_new(pg);
	}

	foreach(lc, dests)
	{
		SagaDestination *dest = lfirst(lc);
		SagaNotifyCursor cursor = {false};

		if (dest->kind != SAGA_DEST_NOTIFY)
			continue;
		for (int batch = 0;; batch++)
		{
			int			sent;

			if (batch == NOTIFY_BATCHES_PER_CYCLE)
			{
				more = true;
				break;
			}
			begin_work("dispatching to NOTIFY");
			sent = saga_outbox_dispatch_notify(dest, saga_batch_size, &cursor);
			end_work();
			pg_atomic_fetch_add_u64(&my_slot->delivered, sent);
			deleted_since_vacuum += sent;
			if (sent < saga_batch_size)
				break;
		}
	}

	/*
	 * Sagas and inbox messages get a transaction only when one is due: a
	 * commit that adds one sets the latch, so the next cycle looks again.
	 */
	now = GetCurrentTimestamp();
	for (int batch = 0; is_due(sagas_due, now); batch++)
	{
		int			sagas;
		int			sent_calls;

		if (batch == SAGA_BATCHES_PER_CYCLE)
		{
			more = true;
			break;
		}
		begin_work("running sagas");
		sagas = saga_engine_run(SAGAS_PER_TRANSACTION, &sent_calls);
		end_work();
		/* queued calls are claimed and sent by the next cycle */
		if (sent_calls > 0)
			more = true;
		if (sagas < SAGAS_PER_TRANSACTION)
			break;
	}

	for (int batch = 0; is_due(inbox_due, now); batch++)
	{
		int			handled;

		if (batch == INBOX_BATCHES_PER_CYCLE)
		{
			more = true;
			break;
		}
		begin_work("handling inbox messages");
		handled = saga_inbox_run(INBOX_MESSAGES_PER_TRANSACTION);
		end_work();
		if (handled < INBOX_MESSAGES_PER_TRANSACTION)
			break;
	}

	SpinLockAcquire(&saga_shared->mutex);
	my_slot->last_cycle_at = GetCurrentTimestamp();
	my_slot->remote_calls_in_flight = saga_pg_total_in_flight(pg);
	my_slot->in_flight = saga_http_total_in_flight(http) + my_slot->remote_calls_in_flight;
	SpinLockRelease(&saga_shared->mutex);
	return more;
}

/* the rows saga.queue held at its last vacuum, as pg_class says (-1: not known) */
static double
queue_reltuples(void)
{
	Oid			relid = RangeVarGetRelid(makeRangeVar("saga", "queue", -1), NoLock, true);
	HeapTuple	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	double		n = -1;

	if (HeapTupleIsValid(tuple))
	{
		n = ((Form_pg_class) GETSTRUCT(tuple))->reltuples;
		ReleaseSysCache(tuple);
	}
	return n;
}

/*
 * VACUUM saga.queue, as a top-level command of this process: it runs in its
 * own transactions and takes only a lock that publishers do not wait for.
 */
static void
vacuum_queue(void)
{
	VacuumStmt *stmt = makeNode(VacuumStmt);
	MemoryContext portal = AllocSetContextCreate(TopMemoryContext, "saga vacuum",
												 ALLOCSET_DEFAULT_SIZES);
	TimestampTz start = GetCurrentTimestamp();
	double		left;

	/*
	 * No truncation of empty pages at the end: it takes an exclusive lock
	 * that publishers queue behind, and the queue refills them soon anyway.
	 */
	stmt->options = list_make1(makeDefElem("truncate", (Node *) makeString("false"), -1));
	stmt->rels = list_make1(makeVacuumRelation(makeRangeVar("saga", "queue", -1),
											   InvalidOid, NIL));
	stmt->is_vacuumcmd = true;

	pgstat_report_activity(STATE_RUNNING, "VACUUM saga.queue");
	PortalContext = portal;
	StartTransactionCommand();
	ExecVacuum(make_parsestate(NULL), stmt, true);
	CommitTransactionCommand();
	StartTransactionCommand();
	left = queue_reltuples();
	CommitTransactionCommand();
	PortalContext = NULL;
	MemoryContextDelete(portal);
	MemoryContextSwitchTo(cycle_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	deleted_since_vacuum = 0;
	vacuum_after_deletes = Max(VACUUM_AFTER_DELETES, left);
	vacuum_pause_ms = Max(VACUUM_MIN_PAUSE_MS, VACUUM_PAUSE_FACTOR *
						  TimestampDifferenceMilliseconds(start, GetCurrentTimestamp()));
}

static bool
transports_have_completed(void)
{
	return saga_http_has_completed(http) || saga_pg_has_completed(pg);
}

/*
 * Sleep until the latch is set (if with_latch), a socket a transport waits
 * on is ready, or the timeout passes; then let both transports run. Returns
 * true if the latch was set. The two wait sets live as long as the worker.
 */
static bool
wait_for_work(long timeout_ms, bool with_latch)
{
	static WaitEventSet *with_latch_set = NULL;
	static WaitEventSet *without_latch_set = NULL;
	long		curl_timeout = saga_http_timeout_ms(http);
	long		pg_timeout = saga_pg_timeout_ms(pg);
	WaitEventSet *set;
	WaitEvent	occurred[4];
	bool		latch_set = false;
	int			n;

	if (with_latch_set == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		with_latch_set = SagaCreateWaitEventSet(4);
		AddWaitEventToSet(with_latch_set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
		AddWaitEventToSet(with_latch_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		AddWaitEventToSet(with_latch_set, WL_SOCKET_READABLE, saga_http_wait_fd(http), NULL, NULL);
		AddWaitEventToSet(with_latch_set, WL_SOCKET_READABLE, saga_pg_wait_fd(pg), NULL, NULL);
		without_latch_set = SagaCreateWaitEventSet(3);
		AddWaitEventToSet(without_latch_set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
		AddWaitEventToSet(without_latch_set, WL_SOCKET_READABLE, saga_http_wait_fd(http), NULL, NULL);
		AddWaitEventToSet(without_latch_set, WL_SOCKET_READABLE, saga_pg_wait_fd(pg), NULL, NULL);
		MemoryContextSwitchTo(old);
	}
	set = with_latch ? with_latch_set : without_latch_set;

	if (curl_timeout >= 0 && curl_timeout < timeout_ms)
		timeout_ms = curl_timeout;
	if (pg_timeout >= 0 && pg_timeout < timeout_ms)
		timeout_ms = pg_timeout;

	set_state(SAGA_SLOT_IDLE);
	n = WaitEventSetWait(set, timeout_ms, occurred, lengthof(occurred), PG_WAIT_EXTENSION);
	for (int i = 0; i < n; i++)
	{
		if (occurred[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latch_set = true;
		}
	}
	set_state(SAGA_SLOT_DISPATCHING);

	saga_http_perform(http);
	saga_pg_perform(pg);
	return latch_set;
}

void
saga_worker_main(Datum arg)
{
	int			slotno = DatumGetInt32(arg);
	Oid			dboid;
	static TimestampTz next_poll;
	static TimestampTz next_sweep;
	static TimestampTz last_cycle;
	static TimestampTz last_vacuum;
	static TimestampTz last_delete;
	static uint64 deleted_at_last_cycle;
	sigjmp_buf	local_sigjmp_buf;

	/* volatile: changed after sigsetjmp and read after a longjmp */
	volatile bool work = true;
	volatile int consecutive_errors = 0;

	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (slotno < 0 || slotno >= saga_shared->nslots ||
		saga_shared->slots[slotno].dboid != dboid)
		proc_exit(1);
	my_slot = &saga_shared->slots[slotno];
	SpinLockAcquire(&saga_shared->mutex);
	my_slot->pid = MyProcPid;
	my_slot->latch = MyLatch;
	my_slot->started_at = GetCurrentTimestamp();
	SpinLockRelease(&saga_shared->mutex);
	before_shmem_exit(worker_on_exit, (Datum) 0);

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("saga worker");

	/* our SQL names everything it uses; nobody else's objects may interfere */
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	/* a lost commit only repeats a delivery, which receivers deduplicate */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	StartTransactionCommand();
	if (!saga_outbox_extension_present())
	{
		CommitTransactionCommand();
		leave_no_extension();
	}
	/* receivers see messages as coming from this database */
	pg = saga_pg_create(get_database_name(MyDatabaseId));
	CommitTransactionCommand();

	cycle_cxt = AllocSetContextCreate(TopMemoryContext, "saga worker cycle",
									  ALLOCSET_DEFAULT_SIZES);
	acquire_worker_lock();
	begin_work("reconciling");
	saga_outbox_reconcile();
	end_work();
	ereport(LOG, (errmsg("saga worker started")));

	keep_freed_memory();
	http = saga_http_create();
	next_poll = GetCurrentTimestamp();
	next_sweep = next_poll;

	/*
	 * An error in a cycle (a NOTIFY queue that is full, a lock time-out, a
	 * bug) is logged and the cycle retried after a pause that grows with
	 * repeated failures, instead of restarting the process. Claims of the
	 * failed transaction are forgotten; finished requests stay queued for
	 * recording.
	 */
	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		/* the callbacks on the stack belonged to frames that are gone */
		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		EmitErrorReport();
		AbortOutOfAnyTransaction();
		saga_http_discard_new(http);
		saga_pg_discard_new(pg);
		destinations_version = DESTINATIONS_STALE;
		FlushErrorState();
		MemoryContextSwitchTo(TopMemoryContext);
		RESUME_INTERRUPTS();

		pgstat_report_activity(STATE_IDLE, NULL);
		consecutive_errors++;

		/* pause, but keep requests in flight moving so their leases hold */
		{
			TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															Min(30000L, 1000L << Min(consecutive_errors - 1, 5)));
			long		left;

			while ((left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until)) > 0)
			{
				CHECK_FOR_INTERRUPTS();
				(void) wait_for_work(left, true);
			}
		}
		work = true;
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		TimestampTz now;
		bool		more = false;
		long		timeout;

		MemoryContextSwitchTo(cycle_cxt);
		MemoryContextReset(cycle_cxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		now = GetCurrentTimestamp();
		if (now >= next_poll)
			work = true;
		if (work || transports_have_completed())
		{
			bool		sweep = now >= next_sweep;
			TimestampTz next_due;

			last_cycle = now;
			more = run_cycle(sweep, now >= next_poll, &next_due);
			consecutive_errors = 0;
			if (sweep)
				next_sweep = TimestampTzPlusMilliseconds(now, RETENTION_SWEEP_MS);
			if (deleted_since_vacuum >= vacuum_after_deletes &&
				TimestampDifferenceExceeds(last_vacuum, now, vacuum_pause_ms))
			{
				last_vacuum = now;
				vacuum_queue();
			}
			else if (deleted_since_vacuum != deleted_at_last_cycle)
				last_delete = now;
			else if (deleted_since_vacuum >= VACUUM_WHEN_IDLE_AFTER &&
					 TimestampDifferenceExceeds(last_delete, now, VACUUM_IDLE_MS))
			{
				/* a burst is over: clean up after it before the next one */
				last_vacuum = now;
				vacuum_queue();
			}
			deleted_at_last_cycle = deleted_since_vacuum;
			if (work)
				next_poll = TimestampTzPlusMilliseconds(now, saga_poll_interval_ms);
			/* wake up for the next retry or deliver_at, not a poll later */
			if (next_due != 0 && next_due < next_poll)
				next_poll = next_due;
		}

		if (more)
			timeout = 0;
		else
		{
			TimestampTz hold_until = TimestampTzPlusMilliseconds(last_cycle, MIN_WAKE_INTERVAL_MS);
			long		left;

			/*
			 * Hold off the next cycle until MIN_WAKE_INTERVAL_MS after the last
			 * one, still driving libcurl: outcomes and wake-ups that arrive
			 * meanwhile are handled by one cycle, not one cycle each.
			 */
			while ((left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), hold_until)) > 0 &&
				   GetCurrentTimestamp() < next_poll)
				(void) wait_for_work(left, false);
			timeout = transports_have_completed() ? 0 :
				Max(0, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next_poll));
		}
		work = wait_for_work(timeout, true) || more;
	}
}
