/*
 * api_saga.c
 *		SQL-callable functions for sagas: define, start, begin, step,
 *		complete, fail, cancel, retry, get, wait.
 *
 * Each checks its arguments and calls an internal function (saga._define,
 * saga._start, ...) as the extension's owner, passing the caller's role:
 * the internal functions decide what that role may see and do. Steps later
 * run as the role recorded here, never as the owner.
 */
#include "saga.h"
#include "api.h"
#include "outbox.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "utils/wait_event.h"

PG_FUNCTION_INFO_V1(saga_define);
PG_FUNCTION_INFO_V1(saga_start);
PG_FUNCTION_INFO_V1(saga_begin);
PG_FUNCTION_INFO_V1(saga_step);
PG_FUNCTION_INFO_V1(saga_complete);
PG_FUNCTION_INFO_V1(saga_fail);
PG_FUNCTION_INFO_V1(saga_cancel);
PG_FUNCTION_INFO_V1(saga_retry);
PG_FUNCTION_INFO_V1(saga_get);
PG_FUNCTION_INFO_V1(saga_wait);

/* what call_internal appends to the caller's arguments */
#define WITH_CALLER		0x01	/* the calling role */
#define WITH_PATH		0x02	/* the caller's search_path, to resolve names */
#define WITH_NEW_ID		0x04	/* a new saga id */

/*
 * The caller's search_path as explicit schema names, resolved while still
 * the caller: "$user" must mean the caller, not the extension's owner.
 */
static char *
caller_search_path(void)
{
	List	   *oids = fetch_search_path(false);
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, oids)
	{
		char	   *name = get_namespace_name(lfirst_oid(lc));

		if (name == NULL)
			continue;
		appendStringInfo(&buf, "%s%s", buf.len > 0 ? ", " : "", quote_identifier(name));
	}
	list_free(oids);
	return buf.data;
}

/* the prepared "SELECT saga._fn(...)" statements, by function */
typedef struct InternalPlan
{
	const char *fn;
	SPIPlanPtr	plan;
} InternalPlan;

static InternalPlan plans[16];
static int	nplans = 0;

/*
 * The saved plan for fn with these argument types: start and step run in
 * business transactions, where parsing and planning on every call would
 * cost as much as the work.
 */
static SPIPlanPtr
internal_plan(const char *fn, int nargs, Oid *types)
{
	StringInfoData sql;
	SPIPlanPtr	plan;

	for (int i = 0; i < nplans; i++)
	{
		if (strcmp(plans[i].fn, fn) == 0)
			return plans[i].plan;
	}
	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT saga.%s(", fn);
	for (int i = 0; i < nargs; i++)
		appendStringInfo(&sql, "%s$%d", i > 0 ? ", " : "", i + 1);
	appendStringInfoChar(&sql, ')');
	plan = SPI_prepare(sql.data, nargs, types);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for %s: %s", sql.data, SPI_result_code_string(SPI_result));
	if (nplans < lengthof(plans))
	{
		SPI_keepplan(plan);
		plans[nplans].fn = fn;
		plans[nplans].plan = plan;
		nplans++;
	}
	return plan;
}

/*
 * Run saga._fn as the extension's owner with the first nargs arguments of
 * this call (types from argtypes), then what flags ask for, and return the
 * single result, copied out of SPI. fn must be a string constant.
 */
static Datum
call_internal(FunctionCallInfo fcinfo, const char *fn, int nargs, const Oid *argtypes,
			  int flags, bool *isnull)
{
	Oid			types[8];
	Datum		values[8];
	char		nulls[8];
	int			n = 0;
	SagaOwnerContext oc;
	Datum		result;
	int			rc;
	Oid			caller = GetUserId();
	char	   *caller_path = (flags & WITH_PATH) ? caller_search_path() : NULL;
	pg_uuid_t  *id = NULL;

	for (int i = 0; i < nargs; i++)
	{
		types[n] = argtypes[i];
		values[n] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[n] = PG_ARGISNULL(i) ? 'n' : ' ';
		n++;
	}
	if (flags & WITH_CALLER)
	{
		types[n] = OIDOID;
		values[n] = ObjectIdGetDatum(caller);
		nulls[n++] = ' ';
	}
	if (flags & WITH_PATH)
	{
		types[n] = TEXTOID;
		values[n] = CStringGetTextDatum(caller_path);
		nulls[n++] = ' ';
	}
	if (flags & WITH_NEW_ID)
	{
		id = palloc(sizeof(pg_uuid_t));
		saga_uuid7(id->data);
		types[n] = UUIDOID;
		values[n] = UUIDPGetDatum(id);
		nulls[n++] = ' ';
	}

	saga_begin_as_owner(&oc, true);
	rc = SPI_execute_plan(internal_plan(fn, n, types), values, nulls, false, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saga.%s failed: %s", fn, SPI_result_code_string(rc));
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
	if (!*isnull)
	{
		Form_pg_attribute att = TupleDescAttr(SPI_tuptable->tupdesc, 0);

		result = SPI_datumTransfer(result, att->attbyval, att->attlen);
	}
	saga_end_as_owner(&oc);
	return result;
}

Datum
saga_define(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {TEXTOID, JSONBOID};
	bool		isnull;
	Datum		v;

	saga_require_arg(fcinfo, 0, "saga name");
	saga_require_arg(fcinfo, 1, "saga definition");
	v = call_internal(fcinfo, "_define", 2, types, WITH_CALLER | WITH_PATH, &isnull);
	PG_RETURN_DATUM(v);
}

/* a saga's row in saga.instances, as saga.start makes it */
static const char *const instance_columns[] = {
	"id", "name", "version", "driver", "status", "input", "results", "owner",
	"position", "attempts", "next_run_at", "deadline", "started_at", "updated_at"
};
static const Oid instance_types[] = {
	UUIDOID, TEXTOID, INT4OID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, OIDOID,
	INT4OID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TIMESTAMPTZOID
};
static SagaRowShape instance_row = {"instances", lengthof(instance_columns), instance_columns, instance_types};

/*
 * Start a saga without an idempotency key: one row from the latest
 * definition (cached, definitions.c). Returns false, having done nothing,
 * when the saga is not defined; saga._start then raises the error.
 */
static bool
start_unkeyed(text *name, Jsonb *input, pg_uuid_t *id)
{
	SagaOwnerContext oc;
	char	   *cname = text_to_cstring(name);
	Datum		row[lengthof(instance_columns)];
	bool		nulls[lengthof(instance_columns)] = {false};
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	Oid			caller = GetUserId();
	Oid			nsp;
	Oid			definitions;
	Oid			instances;
	int32		version;
	Interval   *deadline;

	saga_begin_as_owner(&oc, false);
	nsp = get_namespace_oid("saga", false);
	definitions = get_relname_relid("definitions", nsp);
	instances = get_relname_relid("instances", nsp);
	if (!OidIsValid(definitions) || !OidIsValid(instances))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"saga\" is not installed correctly: its tables are missing")));
	if (!saga_latest_definition(cname, definitions, &version, &deadline))
	{
		saga_end_as_owner(&oc);
		return false;
	}
	row[0] = UUIDPGetDatum(id);
	row[1] = PointerGetDatum(name);
	row[2] = Int32GetDatum(version);
	row[3] = CStringGetTextDatum("worker");
	row[4] = CStringGetTextDatum("running");
	row[5] = JsonbPGetDatum(input);
	row[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	row[7] = ObjectIdGetDatum(caller);
	row[8] = Int32GetDatum(0);
	row[9] = Int32GetDatum(0);
	row[10] = TimestampTzGetDatum(now);
	row[11] = deadline ? DirectFunctionCall2(timestamptz_pl_interval, TimestampTzGetDatum(now),
											 IntervalPGetDatum(deadline)) : (Datum) 0;
	nulls[11] = deadline == NULL;
	row[12] = TimestampTzGetDatum(now);
	row[13] = TimestampTzGetDatum(now);
	saga_insert_row(&instance_row, instances, row, nulls);
	saga_end_as_owner(&oc);
	return true;
}

Datum
saga_start(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {TEXTOID, JSONBOID, TEXTOID};
	bool		isnull;
	Datum		v;
	Jsonb	   *input;

	saga_require_arg(fcinfo, 0, "saga name");
	saga_require_arg(fcinfo, 1, "saga input");
	PreventCommandIfReadOnly("saga.start()");
	input = PG_GETARG_JSONB_P(1);
	if (PG_ARGISNULL(2) && JB_ROOT_IS_OBJECT(input))
	{
		pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));

		saga_uuid7(id->data);
		if (start_unkeyed(PG_GETARG_TEXT_PP(0), input, id))
		{
			saga_wake_at_commit(0);
			PG_RETURN_UUID_P(id);
		}
	}
	/* a key, an input that is not an object, or an unknown saga */
	v = call_internal(fcinfo, "_start", 3, types, WITH_CALLER | WITH_NEW_ID, &isnull);
	saga_wake_at_commit(0);
	PG_RETURN_DATUM(v);
}

Datum
saga_begin(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {TEXTOID, JSONBOID, TEXTOID, INTERVALOID};
	bool		isnull;
	Datum		v;

	saga_require_arg(fcinfo, 0, "saga name");
	saga_require_arg(fcinfo, 1, "saga input");
	saga_require_arg(fcinfo, 3, "deadline");
	v = call_internal(fcinfo, "_begin", 4, types, WITH_CALLER | WITH_NEW_ID, &isnull);
	/* the worker learns the deadline */
	saga_wake_at_commit(0);
	PG_RETURN_DATUM(v);
}

Datum
saga_step(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {UUIDOID, TEXTOID, JSONBOID, JSONBOID};
	bool		isnull;

	saga_require_arg(fcinfo, 0, "saga id");
	saga_require_arg(fcinfo, 1, "step name");
	(void) call_internal(fcinfo, "_step", 4, types, WITH_CALLER | WITH_PATH, &isnull);
	PG_RETURN_VOID();
}

Datum
saga_complete(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {UUIDOID, JSONBOID};
	bool		isnull;

	saga_require_arg(fcinfo, 0, "saga id");
	(void) call_internal(fcinfo, "_complete", 2, types, WITH_CALLER, &isnull);
	PG_RETURN_VOID();
}

/* fail and cancel: the worker compensates once this commits */
static void
abort_saga(FunctionCallInfo fcinfo, const char *action)
{
	Oid			types[] = {UUIDOID, TEXTOID, OIDOID, TEXTOID};
	Datum		values[4];
	char		nulls[4] = "    ";
	SagaOwnerContext oc;

	saga_require_arg(fcinfo, 0, "saga id");
	saga_require_arg(fcinfo, 1, "reason");
	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = ObjectIdGetDatum(GetUserId());
	values[3] = CStringGetTextDatum(action);
	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT saga._abort($1, $2, $3, $4)", 4, types, values, nulls, false);
	saga_end_as_owner(&oc);
	saga_wake_at_commit(0);
}

Datum
saga_fail(PG_FUNCTION_ARGS)
{
	abort_saga(fcinfo, "fail");
	PG_RETURN_VOID();
}

Datum
saga_cancel(PG_FUNCTION_ARGS)
{
	abort_saga(fcinfo, "cancel");
	PG_RETURN_VOID();
}

Datum
saga_retry(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {UUIDOID};
	bool		isnull;

	saga_require_arg(fcinfo, 0, "saga id");
	(void) call_internal(fcinfo, "_retry", 1, types, WITH_CALLER, &isnull);
	saga_wake_at_commit(0);
	PG_RETURN_VOID();
}

Datum
saga_get(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {UUIDOID};
	bool		isnull;
	Datum		v;

	saga_require_arg(fcinfo, 0, "saga id");
	v = call_internal(fcinfo, "_get", 1, types, WITH_CALLER, &isnull);
	PG_RETURN_DATUM(v);
}

static bool
is_terminal(const char *status)
{
	return strcmp(status, "completed") == 0 || strcmp(status, "compensated") == 0 ||
		strcmp(status, "failed") == 0;
}

/*
 * Poll the saga's status with a fresh snapshot each time, sleeping on the
 * latch in between (5 ms, growing to 100 ms), until it is terminal or the
 * time-out passes. Under REPEATABLE READ the snapshot never moves: the
 * status seen first is returned when the time-out passes.
 */
Datum
saga_wait(PG_FUNCTION_ARGS)
{
	static const Oid types[] = {UUIDOID};
	Interval   *timeout;
	TimestampTz until;
	long		sleep_ms = 5;

	saga_require_arg(fcinfo, 0, "saga id");
	saga_require_arg(fcinfo, 1, "timeout");
	timeout = PG_GETARG_INTERVAL_P(1);
	if (timeout->time < 0 || timeout->day < 0 || timeout->month < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout must not be negative")));
	until = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													TimestampTzGetDatum(GetCurrentTimestamp()),
													IntervalPGetDatum(timeout)));
	for (;;)
	{
		bool		isnull;
		text	   *status = DatumGetTextPP(call_internal(fcinfo, "_status", 1, types, WITH_CALLER, &isnull));
		char	   *s = text_to_cstring(status);
		TimestampTz now = GetCurrentTimestamp();
		long		left_ms;

		if (is_terminal(s) || now >= until)
			PG_RETURN_TEXT_P(status);
		left_ms = (long) ((until - now) / 1000) + 1;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min(sleep_ms, left_ms), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		sleep_ms = Min(sleep_ms * 2, 100);
	}
}
