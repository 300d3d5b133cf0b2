/*
 * api.h
 *		Helpers shared by the SQL-callable functions: argument checks and
 *		running SQL as the extension's owner.
 */
#ifndef SAGA_API_H
#define SAGA_API_H

#include "fmgr.h"
#include "utils/jsonb.h"

typedef struct SagaOwnerContext
{
	Oid			saved_user;
	int			saved_sec;
	int			guc_level;
} SagaOwnerContext;

extern void saga_begin_as_owner(SagaOwnerContext *oc, bool pin_search_path);
extern void saga_end_as_owner(SagaOwnerContext *oc);
extern int	saga_run_sql(const char *sql, int nargs, Oid *types, Datum *values,
						 const char *nulls, bool read_only);
extern void saga_require_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern void saga_check_message(FunctionCallInfo fcinfo, char **topic, Jsonb **payload,
							   text **key, Jsonb **headers);
extern void saga_check_topic_pattern(const char *pattern);

#endif							/* SAGA_API_H */
