/*
 * invoke.c
 *		Exactly-once calls: saga.invoke() and saga.compensate().
 *
 * saga.invocations holds one row per action key. The row is written in the
 * caller's transaction, together with whatever the action function did, so
 * the two commit or roll back as one.
 *
 * Concurrency rests on the key's unique index and on row locks:
 *
 * - The first caller claims a key by inserting its row (INSERT ... ON
 *   CONFLICT DO NOTHING) before running anything. A second caller's insert of
 *   the same key waits on the first caller's transaction: if that commits,
 *   the insert does nothing and the row is read; if it rolls back, the insert
 *   goes through and the second caller runs the function itself.
 * - The row is read by a statement of its own, with a snapshot taken after
 *   the insert returned. In READ COMMITTED that snapshot sees the row the
 *   insert conflicted with, even when its transaction committed after the
 *   caller's statement began (a single statement could not see it). Under
 *   REPEATABLE READ or SERIALIZABLE, a conflicting row the transaction's
 *   snapshot cannot see makes the insert fail with a serialization failure
 *   (40001), and the caller retries its transaction.
 * - compensate() reads the row FOR UPDATE and keeps the lock until its
 *   transaction ends, so a second compensate() waits and then sees the
 *   compensation (or, after a rollback, runs it itself).
 *
 * The action and compensation functions run as the calling role, with the
 * caller's settings; only the statements on saga.invocations run as the
 * extension's owner.
 */
#include "saga.h"
#include "api.h"

#include "access/htup_details.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#define MAX_ACTION_KEY_BYTES	512

#if PG_VERSION_NUM >= 160000
#define saga_proc_aclcheck(proc, role, mode) \
	object_aclcheck(ProcedureRelationId, (proc), (role), (mode))
#else
#define saga_proc_aclcheck(proc, role, mode) pg_proc_aclcheck((proc), (role), (mode))
#endif

PG_FUNCTION_INFO_V1(saga_invoke);
PG_FUNCTION_INFO_V1(saga_compensate);

/* What saga.invocations holds for a key. */
typedef struct Invocation
{
	char	   *status;
	char	   *fn;
	Datum		result;
	bool		result_null;
	Oid			invoked_by;
	char	   *compensation_fn;
	Datum		compensation_result;
	bool		compensation_result_null;
} Invocation;

/* ---------- statements on saga.invocations ---------- */

#define INVOCATION_COLUMNS \
	"status, fn, result, invoked_by, compensation_fn, compensation_result"

enum
{
	PLAN_CLAIM,
	PLAN_READ,
	PLAN_READ_LOCKED,
	PLAN_SET_RESULT,
	PLAN_TOMBSTONE,
	PLAN_COMPENSATED,
	NUM_PLANS
};

static SPIPlanPtr plans[NUM_PLANS];

/*
 * Run one of the statements, preparing it the first time. Called as the
 * extension's owner with search_path pinned, so a kept plan never depends on
 * the caller's settings.
 */
static void
run_plan(int which, Datum *values, const char *nulls)
{
	static const struct
	{
		const char *sql;
		int			nargs;
		Oid			types[4];
	}			stmts[NUM_PLANS] = {
		[PLAN_CLAIM] = {
			"INSERT INTO saga.invocations (key, status, fn, invoked_at, invoked_by)"
			" VALUES ($1, 'executed', $2, pg_catalog.now(), $3)"
			" ON CONFLICT (key) DO NOTHING",
			3, {TEXTOID, TEXTOID, REGROLEOID}
		},
		[PLAN_READ] = {
			"SELECT " INVOCATION_COLUMNS " FROM saga.invocations WHERE key = $1",
			1, {TEXTOID}
		},
		[PLAN_READ_LOCKED] = {
			"SELECT " INVOCATION_COLUMNS " FROM saga.invocations WHERE key = $1 FOR UPDATE",
			1, {TEXTOID}
		},
		[PLAN_SET_RESULT] = {
			"UPDATE saga.invocations SET result = $2 WHERE key = $1",
			2, {TEXTOID, JSONBOID}
		},
		[PLAN_TOMBSTONE] = {
			"INSERT INTO saga.invocations (key, status, compensation_fn, compensated_at, compensated_by)"
			" VALUES ($1, 'tombstone', $2, pg_catalog.now(), $3)"
			" ON CONFLICT (key) DO NOTHING",
			3, {TEXTOID, TEXTOID, REGROLEOID}
		},
		[PLAN_COMPENSATED] = {
			"UPDATE saga.invocations SET status = 'compensated', compensation_fn = $2,"
			" compensation_result = $3, compensated_at = pg_catalog.now(), compensated_by = $4"
			" WHERE key = $1",
			4, {TEXTOID, TEXTOID, JSONBOID, REGROLEOID}
		},
	};
	int			rc;

	if (plans[which] == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(stmts[which].sql, stmts[which].nargs,
									   (Oid *) stmts[which].types);

		if (plan == NULL)
			elog(ERROR, "saga: SPI_prepare failed (%s) for: %s",
				 SPI_result_code_string(SPI_result), stmts[which].sql);
		SPI_keepplan(plan);
		plans[which] = plan;
	}
	/* read_only = false: each statement takes a fresh snapshot */
	rc = SPI_execute_plan(plans[which], values, nulls, false, 0);
	if (rc < 0)
		elog(ERROR, "saga: SPI failed (%s) for: %s",
			 SPI_result_code_string(rc), stmts[which].sql);
}

/* A column as text, in the memory of the function that connected SPI. */
static char *
getvalue_out(HeapTuple tup, TupleDesc desc, int col)
{
	char	   *s = SPI_getvalue(tup, desc, col);
	char	   *copy;

	if (s == NULL)
		return NULL;
	copy = SPI_palloc(strlen(s) + 1);
	strcpy(copy, s);
	return copy;
}

/* Copy the row the last read returned out of SPI's memory. */
static void
fetch_invocation(Invocation *inv)
{
	HeapTuple	tup = SPI_tuptable->vals[0];
	TupleDesc	desc = SPI_tuptable->tupdesc;
	bool		isnull;
	Datum		d;

	inv->status = getvalue_out(tup, desc, 1);
	inv->fn = getvalue_out(tup, desc, 2);
	d = SPI_getbinval(tup, desc, 3, &inv->result_null);
	inv->result = inv->result_null ? (Datum) 0 : SPI_datumTransfer(d, false, -1);
	d = SPI_getbinval(tup, desc, 4, &isnull);
	inv->invoked_by = isnull ? InvalidOid : DatumGetObjectId(d);
	inv->compensation_fn = getvalue_out(tup, desc, 5);
	d = SPI_getbinval(tup, desc, 6, &inv->compensation_result_null);
	inv->compensation_result = inv->compensation_result_null ? (Datum) 0 :
		SPI_datumTransfer(d, false, -1);
}

/* ---------- argument checks ---------- */

static text *
get_action_key(FunctionCallInfo fcinfo, const char *name)
{
	text	   *key;
	size_t		len;

	saga_require_arg(fcinfo, 0, name);
	key = PG_GETARG_TEXT_PP(0);
	len = VARSIZE_ANY_EXHDR(key);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name)));
	if (len > MAX_ACTION_KEY_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s is too long (%zu bytes)", name, len),
				 errdetail("An action key has at most %d bytes.", MAX_ACTION_KEY_BYTES)));
	return key;
}

/*
 * The function must be a plain function f(jsonb) RETURNS jsonb that the
 * calling role may execute. Returns its schema-qualified signature, which is
 * what saga.invocations records (an OID would not survive a dump and
 * restore, and pg_upgrade refuses regprocedure columns).
 */
static char *
check_action_function(Oid fnoid)
{
	HeapTuple	tup;
	Form_pg_proc proc;
	char	   *name;
	char	   *qualified;
	AclResult	aclresult;

	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fnoid));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function with OID %u does not exist", fnoid)));
	proc = (Form_pg_proc) GETSTRUCT(tup);
	name = format_procedure(fnoid);

	if (proc->prokind != PROKIND_FUNCTION)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("%s is not a plain function", name),
				 errdetail("It is %s.",
						   proc->prokind == PROKIND_PROCEDURE ? "a procedure" :
						   proc->prokind == PROKIND_AGGREGATE ? "an aggregate function" :
						   "a window function"),
				 errhint("Give a function f(jsonb) RETURNS jsonb.")));
	if (proc->pronargs != 1 || proc->proargtypes.values[0] != JSONBOID)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function %s must take a single argument of type jsonb", name),
				 errhint("Give a function f(jsonb) RETURNS jsonb.")));
	if (proc->prorettype != JSONBOID || proc->proretset)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("function %s must return jsonb", name),
				 errdetail("It returns %s%s.", proc->proretset ? "setof " : "",
						   format_type_be(proc->prorettype)),
				 errhint("Give a function f(jsonb) RETURNS jsonb.")));
	qualified = psprintf("%s(jsonb)",
						 quote_qualified_identifier(get_namespace_name(proc->pronamespace),
													NameStr(proc->proname)));
	ReleaseSysCache(tup);

	aclresult = saga_proc_aclcheck(fnoid, GetUserId(), ACL_EXECUTE);
	if (aclresult != ACLCHECK_OK)
		aclcheck_error(aclresult, OBJECT_FUNCTION, get_func_name(fnoid));
	return qualified;
}

/* ---------- keys being worked on by this backend ---------- */

/*
 * An action function that calls saga.invoke() or saga.compensate() with its
 * own key would find the row its caller has claimed but not finished. Such
 * calls are refused.
 */
static List *running_keys = NIL;

static void
enter_key(const char *key, const char *what)
{
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, running_keys)
		if (strcmp((char *) lfirst(lc), key) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("%s for action \"%s\" called while that action is being run or compensated",
							what, key),
					 errdetail("An action or compensation function cannot use its own key.")));
	old = MemoryContextSwitchTo(TopMemoryContext);
	running_keys = lcons(pstrdup(key), running_keys);
	MemoryContextSwitchTo(old);
}

static void
leave_key(void)
{
	char	   *key = linitial(running_keys);

	running_keys = list_delete_first(running_keys);
	pfree(key);
}

/* ---------- calling the action ---------- */

/* Call fn(ctx) as the current user; returns its result, which may be NULL. */
static Datum
call_action(Oid fnoid, Datum ctx, bool *isnull)
{
	FmgrInfo	flinfo;
	PgStat_FunctionCallUsage fcusage;
	Datum		result;

	LOCAL_FCINFO(callinfo, 1);

	/* fmgr_info honours SECURITY DEFINER and SET clauses of the function */
	fmgr_info(fnoid, &flinfo);
	InitFunctionCallInfoData(*callinfo, &flinfo, 1, InvalidOid, NULL, NULL);
	callinfo->args[0].value = ctx;
	callinfo->args[0].isnull = false;
	pgstat_init_function_usage(callinfo, &fcusage);
	result = FunctionCallInvoke(callinfo);
	pgstat_end_function_usage(&fcusage, true);
	*isnull = callinfo->isnull;
	return result;
}

/*
 * The caller may see a stored result, or compensate, only if it has the
 * privileges of the role that ran the action.
 */
static void
check_same_role(const char *key, Oid caller, Oid owner)
{
	if (OidIsValid(owner) && !has_privs_of_role(caller, owner))
	{
		char	   *rolname = GetUserNameFromId(owner, true);

		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for action \"%s\"", key),
				 errdetail("The action was run by role \"%s\"; only roles with its privileges may see or compensate it.",
						   rolname ? rolname : "(dropped)")));
	}
}

/* ---------- saga.invoke ---------- */

static Datum
invoke_action(text *key, Oid fnoid, const char *fn, Datum ctx, bool *isnull)
{
	Oid			caller = GetUserId();
	char	   *keystr = text_to_cstring(key);
	SagaOwnerContext oc;
	Invocation	inv;
	Datum		values[3];
	char		nulls[3] = "   ";
	Datum		result;

	values[0] = PointerGetDatum(key);
	values[1] = CStringGetTextDatum(fn);
	values[2] = ObjectIdGetDatum(caller);

	for (;;)
	{
		bool		claimed;
		bool		found;

		CHECK_FOR_INTERRUPTS();
		saga_begin_as_owner(&oc, true);
		run_plan(PLAN_CLAIM, values, nulls);
		claimed = SPI_processed == 1;
		found = false;
		if (!claimed)
		{
			/* the conflicting row is committed (or our own): read it */
			run_plan(PLAN_READ, values, nulls);
			found = SPI_processed == 1;
			if (found)
				fetch_invocation(&inv);
		}
		saga_end_as_owner(&oc);
		if (claimed)
			break;
		if (!found)
			continue;			/* deleted meanwhile: claim again */

		if (strcmp(inv.status, "tombstone") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("action \"%s\" was already compensated before it ran", keystr),
					 errdetail("saga.compensate() was called for this key before any saga.invoke(); the action will not run.")));
		if (strcmp(inv.status, "compensated") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("action \"%s\" was already compensated", keystr),
					 errdetail("It ran and was then compensated; it will not run again.")));
		check_same_role(keystr, caller, inv.invoked_by);
		if (inv.fn == NULL || strcmp(inv.fn, fn) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("action \"%s\" was run with function %s, not %s",
							keystr, inv.fn ? inv.fn : "(unknown)", fn),
					 errhint("Give each action a key of its own.")));
		*isnull = inv.result_null;
		return inv.result;
	}

	/* this transaction holds the key: run the action as the caller */
	result = call_action(fnoid, ctx, isnull);

	{
		Datum		uvalues[2];
		char		unulls[2] = "  ";

		uvalues[0] = PointerGetDatum(key);
		uvalues[1] = *isnull ? (Datum) 0 : result;
		unulls[1] = *isnull ? 'n' : ' ';
		saga_begin_as_owner(&oc, true);
		run_plan(PLAN_SET_RESULT, uvalues, unulls);
		if (SPI_processed != 1)
			elog(ERROR, "saga: the row of action \"%s\" disappeared while it ran", keystr);
		saga_end_as_owner(&oc);
	}
	return result;
}

/* invoke_action or compensate_action */
typedef Datum (*KeyedCall) (text *key, Oid fnoid, const char *fn, Datum ctx, bool *isnull);

/*
 * The common part of saga.invoke and saga.compensate: check the arguments,
 * mark the key as running in this session (no recursion on it), make the
 * call.
 */
static Datum
run_keyed_call(FunctionCallInfo fcinfo, const char *what, const char *caller, KeyedCall call)
{
	text	   *key;
	Oid			fnoid;
	char	   *fn;
	char		argname[64];
	Datum		result = (Datum) 0;
	bool		isnull = true;

	key = get_action_key(fcinfo, "action key");
	snprintf(argname, sizeof(argname), "%s function", what);
	saga_require_arg(fcinfo, 1, argname);
	snprintf(argname, sizeof(argname), "%s context", what);
	saga_require_arg(fcinfo, 2, argname);
	fnoid = PG_GETARG_OID(1);
	fn = check_action_function(fnoid);

	enter_key(text_to_cstring(key), caller);
	PG_TRY();
	{
		result = call(key, fnoid, fn, PG_GETARG_DATUM(2), &isnull);
	}
	PG_FINALLY();
	{
		leave_key();
	}
	PG_END_TRY();

	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}

/*
 * saga.invoke(key text, fn regprocedure, ctx jsonb) RETURNS jsonb
 *
 * Runs fn(ctx) once per key in this database, in the caller's transaction,
 * and records the key with the result. A repeat returns the stored result.
 */
Datum
saga_invoke(PG_FUNCTION_ARGS)
{
	return run_keyed_call(fcinfo, "action", "saga.invoke()", invoke_action);
}

/* ---------- saga.compensate ---------- */

static Datum
compensate_action(text *key, Oid fnoid, const char *fn, Datum ctx, bool *isnull)
{
	Oid			caller = GetUserId();
	char	   *keystr = text_to_cstring(key);
	SagaOwnerContext oc;
	Invocation	inv;
	Datum		values[4];
	char		nulls[4] = "    ";
	Datum		result;

	values[0] = PointerGetDatum(key);
	values[1] = CStringGetTextDatum(fn);
	values[2] = ObjectIdGetDatum(caller);

	for (;;)
	{
		bool		tombstoned;
		bool		found;

		CHECK_FOR_INTERRUPTS();
		saga_begin_as_owner(&oc, true);
		run_plan(PLAN_TOMBSTONE, values, nulls);
		tombstoned = SPI_processed == 1;
		found = false;
		if (!tombstoned)
		{
			/*
			 * A fresh snapshot sees the committed row; the lock waits for a
			 * compensation in progress and then reads the row it left.
			 */
			run_plan(PLAN_READ_LOCKED, values, nulls);
			found = SPI_processed == 1;
			if (found)
				fetch_invocation(&inv);
		}
		saga_end_as_owner(&oc);
		if (tombstoned)
		{
			/* never ran here: nothing to undo, and now it never will */
			*isnull = true;
			return (Datum) 0;
		}
		if (found)
			break;
	}

	if (strcmp(inv.status, "tombstone") == 0)
	{
		*isnull = true;
		return (Datum) 0;
	}
	check_same_role(keystr, caller, inv.invoked_by);
	if (strcmp(inv.status, "compensated") == 0)
	{
		if (inv.compensation_fn == NULL || strcmp(inv.compensation_fn, fn) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("action \"%s\" was compensated with function %s, not %s",
							keystr, inv.compensation_fn ? inv.compensation_fn : "(unknown)", fn)));
		*isnull = inv.compensation_result_null;
		return inv.compensation_result;
	}

	/* executed, and this transaction holds the row lock: undo it */
	result = call_action(fnoid, ctx, isnull);

	values[2] = *isnull ? (Datum) 0 : result;
	nulls[2] = *isnull ? 'n' : ' ';
	values[3] = ObjectIdGetDatum(caller);
	saga_begin_as_owner(&oc, true);
	run_plan(PLAN_COMPENSATED, values, nulls);
	if (SPI_processed != 1)
		elog(ERROR, "saga: the row of action \"%s\" disappeared while it was compensated", keystr);
	saga_end_as_owner(&oc);
	return result;
}

/*
 * saga.compensate(action_key text, fn regprocedure, ctx jsonb) RETURNS jsonb
 *
 * Runs fn(ctx) once, and only if the action with that key ran here. If it
 * did not, leaves a tombstone that makes a later saga.invoke() of the key
 * fail, and returns NULL.
 */
Datum
saga_compensate(PG_FUNCTION_ARGS)
{
	return run_keyed_call(fcinfo, "compensation", "saga.compensate()", compensate_action);
}
