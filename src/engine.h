/*
 * engine.h
 *		The worker's side of sagas.
 */
#ifndef SAGA_ENGINE_H
#define SAGA_ENGINE_H

#include "datatype/timestamp.h"
#include "utils/jsonb.h"

extern int	saga_engine_run(int limit, int *sent_calls);
extern TimestampTz saga_engine_next_due(void);
extern Datum saga_call_as_owner(Oid fn, Oid owner, Jsonb *arg, int timeout_ms,
								bool returns_jsonb, bool *isnull);

#endif							/* SAGA_ENGINE_H */
