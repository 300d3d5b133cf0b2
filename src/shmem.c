/*
 * shmem.c
 *		Shared state: the launcher's latch and one slot per database worker.
 *
 * Nothing here is durable: after a crash the slots start empty and the
 * workers rebuild everything they need from the tables.
 */
#include "saga.h"

#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/memutils.h"

SagaShared *saga_shared = NULL;

static Size
saga_shmem_size(void)
{
	return add_size(offsetof(SagaShared, slots),
					mul_size(saga_max_databases, sizeof(SagaWorkerSlot)));
}

void
saga_shmem_request(void)
{
	RequestAddinShmemSpace(saga_shmem_size());
}

void
saga_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	saga_shared = ShmemInitStruct("saga", saga_shmem_size(), &found);
	if (!found)
	{
		memset(saga_shared, 0, saga_shmem_size());
		SpinLockInit(&saga_shared->mutex);
		pg_atomic_init_u64(&saga_shared->config_version, 0);
		saga_shared->nslots = saga_max_databases;
		for (int i = 0; i < saga_shared->nslots; i++)
		{
			SagaWorkerSlot *slot = &saga_shared->slots[i];

			pg_atomic_init_u64(&slot->published, 0);
			pg_atomic_init_u64(&slot->delivered, 0);
			pg_atomic_init_u64(&slot->retried, 0);
			pg_atomic_init_u64(&slot->dead_lettered, 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/* False in a server that did not preload the library. */
bool
saga_shmem_available(void)
{
	return saga_shared != NULL;
}

/* The slot of the worker serving a database, or NULL. */
SagaWorkerSlot *
saga_slot_for_database(Oid dboid)
{
	if (saga_shared == NULL)
		return NULL;
	for (int i = 0; i < saga_shared->nslots; i++)
	{
		SagaWorkerState state = saga_shared->slots[i].state;

		if (state != SAGA_SLOT_FREE && state != SAGA_SLOT_EXITED &&
			saga_shared->slots[i].dboid == dboid)
			return &saga_shared->slots[i];
	}
	return NULL;
}

/*
 * Set the latch of a database's worker. A stale pointer is harmless: a latch
 * lives in PGPROC, which is never freed, so at worst another process wakes
 * up for nothing.
 */
void
saga_wake_worker(Oid dboid)
{
	Latch	   *latch = NULL;

	if (saga_shared == NULL)
		return;
	SpinLockAcquire(&saga_shared->mutex);
	for (int i = 0; i < saga_shared->nslots; i++)
	{
		SagaWorkerSlot *slot = &saga_shared->slots[i];

		if (slot->state != SAGA_SLOT_FREE && slot->state != SAGA_SLOT_EXITED &&
			slot->dboid == dboid)
		{
			latch = slot->latch;
			break;
		}
	}
	SpinLockRelease(&saga_shared->mutex);
	if (latch)
		SetLatch(latch);
}

/*
 * Changes whenever a destination, subscription, handler or saga definition
 * changed, in any database.
 */
uint64
saga_config_version(void)
{
	return saga_shared ? pg_atomic_read_u64(&saga_shared->config_version) : 0;
}

/*
 * A backend's copy of a configuration table (routes, definitions): run its
 * query again and let load copy the rows into an emptied memory context,
 * unless it is up to date. It is while the shared version has not moved,
 * which a trigger on the table does at commit. A transaction that changed
 * the table itself reads it for each use, as its change may yet roll back.
 * Without the preload there is no shared version, and it is read every time.
 */
void
saga_copy_refresh(SagaCopy *copy, Oid relid,
				  void (*load) (MemoryContext cxt, SPITupleTable *rows, uint64 n))
{
	uint64		version = saga_config_version();
	bool		changed_in_xact = saga_config_changed_in_xact();
	int			rc;

	if (copy->valid && saga_shared != NULL && !changed_in_xact &&
		version == copy->version && relid == copy->relid)
		return;
	copy->valid = false;
	if (copy->cxt == NULL)
	{
		copy->cxt = AllocSetContextCreate(TopMemoryContext, "saga copy", ALLOCSET_SMALL_SIZES);
		MemoryContextSetIdentifier(copy->cxt, copy->name);
	}
	MemoryContextReset(copy->cxt);
	rc = SPI_execute(copy->query, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read saga's %s: %s", copy->name, SPI_result_code_string(rc));
	load(copy->cxt, SPI_tuptable, SPI_processed);
	copy->version = version;
	copy->relid = relid;
	copy->valid = !changed_in_xact;
}

void
saga_wake_launcher(bool recheck)
{
	Latch	   *latch;

	if (saga_shared == NULL)
		return;
	SpinLockAcquire(&saga_shared->mutex);
	if (recheck)
		saga_shared->recheck_databases = true;
	latch = saga_shared->launcher_latch;
	SpinLockRelease(&saga_shared->mutex);
	if (latch)
		SetLatch(latch);
}
