/*
 * inbox.h
 *		The worker's side of the inbox.
 */
#ifndef SAGA_INBOX_H
#define SAGA_INBOX_H

#include "datatype/timestamp.h"

extern int	saga_inbox_run(int limit);
extern TimestampTz saga_inbox_next_due(void);

#endif							/* SAGA_INBOX_H */
