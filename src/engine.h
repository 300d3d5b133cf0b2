/*
 * engine.h
 *		The worker's side of sagas.
 */
#ifndef SAGA_ENGINE_H
#define SAGA_ENGINE_H

#include "datatype/timestamp.h"

extern int	saga_engine_run(int limit, int *http_calls);
extern TimestampTz saga_engine_next_due(void);

#endif							/* SAGA_ENGINE_H */
