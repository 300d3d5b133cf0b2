/*
 * shmem.c
 *		Shared state: the launcher's latch and one slot per database worker.
 *
 * Nothing here is durable: after a crash the slots start empty and the
 * workers rebuild everything they need from the tables.
 */
#include "saga.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

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

/* Changes whenever a destination was created or dropped, in any database. */
uint64
saga_config_version(void)
{
	return saga_shared ? pg_atomic_read_u64(&saga_shared->config_version) : 0;
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
