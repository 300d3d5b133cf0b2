/*
 * compat.h
 *		Shims for the PostgreSQL versions saga builds against (14 to 17).
 */
#ifndef SAGA_COMPAT_H
#define SAGA_COMPAT_H

#include "storage/latch.h"
#include "utils/memutils.h"

#if PG_VERSION_NUM >= 170000
#define SagaCreateWaitEventSet(n) CreateWaitEventSet(NULL, (n))
#else
#define SagaCreateWaitEventSet(n) CreateWaitEventSet(CurrentMemoryContext, (n))
#endif

#if PG_VERSION_NUM < 150000
#define MarkGUCPrefixReserved(prefix) EmitWarningsOnPlaceholders(prefix)
#define pg_prng_double(state) ((double) random() / ((double) MAX_RANDOM_VALUE + 1))
#else
#include "common/pg_prng.h"
#endif

#if PG_VERSION_NUM >= 160000
#define SagaExecInsertIndexTuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL, false)
#else
#define SagaExecInsertIndexTuples(rri, slot, estate) \
	ExecInsertIndexTuples((rri), (slot), (estate), false, false, NULL, NIL)
#endif

#endif							/* SAGA_COMPAT_H */
