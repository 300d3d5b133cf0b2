/*
 * engine.c
 *		The worker's side of sagas: run the next call of every saga that is
 *		due, each call in its own subtransaction, all in one transaction.
 *
 * The state machine lives in SQL (saga._claim, saga._succeeded,
 * saga._failed); this file makes the calls. A local step's effects and the
 * record of its result commit together, so each step takes effect exactly
 * once; a failing step rolls back only its own subtransaction and its error
 * becomes data. Consecutive steps of one saga run back to back, so a saga
 * of local steps usually finishes in one transaction of the worker.
 *
 * A call to another service (HTTP, or a function in another database) is
 * not made here: it is queued (saga._send) for the worker's transports, and
 * the saga waits for its outcome without holding anything, so a slow
 * service never stalls other sagas.
 */
#include "saga.h"
#include "engine.h"
#include "outbox.h"

#include "access/xact.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* a call to make: the columns of saga._claim, _succeeded and _failed */
typedef struct SagaCall
{
	pg_uuid_t	saga_id;
	Oid			owner;
	char	   *phase;
	int			position;
	char	   *step;
	Jsonb	   *call;
	Jsonb	   *ctx;
	int			attempt;
} SagaCall;

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr succeeded_plan = NULL;
static SPIPlanPtr failed_plan = NULL;
static SPIPlanPtr send_plan = NULL;


/* The call in row i of the last SPI result, copied into cxt; NULL if none. */
static SagaCall *
call_from_row(uint64 i, MemoryContext cxt)
{
	HeapTuple	tup = SPI_tuptable->vals[i];
	TupleDesc	desc = SPI_tuptable->tupdesc;
	MemoryContext old;
	SagaCall   *c;
	bool		isnull;
	Datum		d;

	(void) SPI_getbinval(tup, desc, 3, &isnull);
	if (isnull)
		return NULL;
	old = MemoryContextSwitchTo(cxt);
	c = palloc0(sizeof(SagaCall));
	d = SPI_getbinval(tup, desc, 1, &isnull);
	memcpy(c->saga_id.data, DatumGetUUIDP(d)->data, UUID_LEN);
	c->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 2, &isnull));
	c->phase = TextDatumGetCString(SPI_getbinval(tup, desc, 3, &isnull));
	c->position = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
	c->step = TextDatumGetCString(SPI_getbinval(tup, desc, 5, &isnull));
	c->call = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 6, &isnull));
	c->ctx = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 7, &isnull));
	c->attempt = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
	MemoryContextSwitchTo(old);
	return c;
}

/* A text field of a call's JSON, or NULL. */
static char *
call_field(Jsonb *call, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&call->root, JB_FOBJECT, &k);
	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* An integer field of a call's JSON, or 0. */
static int
call_int_field(Jsonb *call, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	v = findJsonbValueFromContainer(&call->root, JB_FOBJECT, &k);
	if (v == NULL || v->type != jbvNumeric)
		return 0;
	return DatumGetInt32(DirectFunctionCall1(numeric_int4, NumericGetDatum(v->val.numeric)));
}

/*
 * SQLSTATEs worth retrying: connection (08), transaction rollback (40),
 * insufficient resources (53), operator intervention (57), lock not
 * available (55P03).
 */
static bool
is_transient(int sqlerrcode)
{
	int			class = ERRCODE_TO_CATEGORY(sqlerrcode);

	return class == ERRCODE_CONNECTION_EXCEPTION ||
		class == ERRCODE_TRANSACTION_ROLLBACK ||
		class == ERRCODE_INSUFFICIENT_RESOURCES ||
		class == ERRCODE_OPERATOR_INTERVENTION ||
		sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * fn(jsonb), a plain function, returning jsonb if returns_jsonb: what
 * define or handle checked, still true.
 */
static bool
takes_one_jsonb(Oid fn, bool returns_jsonb)
{
	Oid		   *argtypes;
	int			nargs;
	Oid			rettype = get_func_signature(fn, &argtypes, &nargs);

	return (rettype == JSONBOID || !returns_jsonb) && nargs == 1 && argtypes[0] == JSONBOID &&
		!get_func_retset(fn) && get_func_prokind(fn) == PROKIND_FUNCTION;
}

/*
 * Call fn(arg) as role owner, in a restricted security context (no SET
 * ROLE, no SET SESSION AUTHORIZATION); returns its result. A timeout_ms > 0
 * cancels it like statement_timeout (57014). Saga steps and compensations
 * return jsonb; inbox handlers may return anything (returns_jsonb false).
 * Run it in a subtransaction: an error leaves the identity and settings to
 * the subtransaction's abort.
 */
Datum
saga_call_as_owner(Oid fn, Oid owner, Jsonb *arg, int timeout_ms,
				   bool returns_jsonb, bool *isnull)
{
	Oid			save_user;
	int			save_sec;
	FmgrInfo	flinfo;
	LOCAL_FCINFO(fcinfo, 1);
	Datum		result;
	int			guc_level;
	char	   *fname;

	/* a role dropped since it registered the call: never run it as PUBLIC */
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role with OID %u, which the call would run as, does not exist", owner),
				 errhint("The role was dropped after it started the saga or registered the handler.")));
	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(fn)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("function with OID %u does not exist", fn)));
	fname = format_procedure(fn);
	if (!takes_one_jsonb(fn, returns_jsonb))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg(returns_jsonb ? "%s is not a function taking and returning one jsonb value" :
						"%s is not a function taking one jsonb value", fname)));
	if (pg_proc_aclcheck(fn, owner, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not execute function %s",
						GetUserNameFromId(owner, true) ? GetUserNameFromId(owner, true) : "?", fname)));

	/*
	 * Settings the function changes, even with SET at session level, must
	 * not outlive it: the worker's search_path and read-only state protect
	 * every later statement (an error undoes them with the subtransaction).
	 */
	guc_level = NewGUCNestLevel();
	GetUserIdAndSecContext(&save_user, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	fmgr_info(fn, &flinfo);
	InitFunctionCallInfoData(*fcinfo, &flinfo, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = JsonbPGetDatum(arg);
	fcinfo->args[0].isnull = false;
	if (timeout_ms > 0)
		enable_timeout_after(STATEMENT_TIMEOUT, timeout_ms);
	result = FunctionCallInvoke(fcinfo);
	if (timeout_ms > 0)
		disable_timeout(STATEMENT_TIMEOUT, false);
	*isnull = fcinfo->isnull;
	SetUserIdAndSecContext(save_user, save_sec);
	AtEOXact_GUC(false, guc_level);
	return result;
}

/* Call the step's function as the saga's owner; returns its result. */
static Datum
invoke_as_owner(SagaCall *c, bool *isnull)
{
	char	   *fname = call_field(c->call, "function");

	if (fname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("step \"%s\" is not a local function call", c->step)));
	return saga_call_as_owner(DatumGetObjectId(DirectFunctionCall1(regprocedurein,
																   CStringGetDatum(fname))),
							  c->owner, c->ctx, call_int_field(c->call, "timeout_ms"), true, isnull);
}

static SagaCall *
record_success(SagaCall *c, Datum result, bool isnull, MemoryContext cxt)
{
	Datum		values[6];
	char		nulls[6] = "      ";
	int			rc;

	if (succeeded_plan == NULL)
	{
		Oid			types[6] = {UUIDOID, TEXTOID, INT4OID, TEXTOID, INT4OID, JSONBOID};

		succeeded_plan = saga_prepare_kept("SELECT * FROM saga._succeeded($1, $2, $3, $4, $5, $6)", 6, types);
	}
	values[0] = UUIDPGetDatum(&c->saga_id);
	values[1] = CStringGetTextDatum(c->phase);
	values[2] = Int32GetDatum(c->position);
	values[3] = CStringGetTextDatum(c->step);
	values[4] = Int32GetDatum(c->attempt);
	values[5] = result;
	nulls[5] = isnull ? 'n' : ' ';
	rc = SPI_execute_plan(succeeded_plan, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saga._succeeded failed: %s", SPI_result_code_string(rc));
	return call_from_row(0, cxt);
}

static SagaCall *
record_failure(SagaCall *c, ErrorData *edata, MemoryContext cxt)
{
	Datum		values[8];
	char		nulls[8] = "        ";
	StringInfoData msg;
	int			rc;

	if (failed_plan == NULL)
	{
		Oid			types[8] = {UUIDOID, TEXTOID, INT4OID, TEXTOID, INT4OID, JSONBOID, BOOLOID, TEXTOID};

		failed_plan = saga_prepare_kept("SELECT * FROM saga._failed($1, $2, $3, $4, $5, $6, $7, $8)", 8, types);
	}
	initStringInfo(&msg);
	appendStringInfo(&msg, "%s (SQLSTATE %s)", edata->message ? edata->message : "unknown error",
					 unpack_sql_state(edata->sqlerrcode));
	values[0] = UUIDPGetDatum(&c->saga_id);
	values[1] = CStringGetTextDatum(c->phase);
	values[2] = Int32GetDatum(c->position);
	values[3] = CStringGetTextDatum(c->step);
	values[4] = Int32GetDatum(c->attempt);
	values[5] = JsonbPGetDatum(c->call);
	values[6] = BoolGetDatum(is_transient(edata->sqlerrcode));
	values[7] = CStringGetTextDatum(msg.data);
	rc = SPI_execute_plan(failed_plan, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saga._failed failed: %s", SPI_result_code_string(rc));
	return call_from_row(0, cxt);
}

/* Queue the call of a step to a destination; the saga waits for its outcome. */
static void
send_call(SagaCall *c)
{
	Datum		values[8];
	pg_uuid_t	request;
	int			rc;

	if (send_plan == NULL)
	{
		Oid			types[8] = {UUIDOID, TEXTOID, INT4OID, TEXTOID, INT4OID, JSONBOID, JSONBOID, UUIDOID};

		send_plan = saga_prepare_kept("SELECT saga._send($1, $2, $3, $4, $5, $6, $7, $8)", 8, types);
	}
	saga_uuid7(request.data);
	values[0] = UUIDPGetDatum(&c->saga_id);
	values[1] = CStringGetTextDatum(c->phase);
	values[2] = Int32GetDatum(c->position);
	values[3] = CStringGetTextDatum(c->step);
	values[4] = Int32GetDatum(c->attempt);
	values[5] = JsonbPGetDatum(c->call);
	values[6] = JsonbPGetDatum(c->ctx);
	values[7] = UUIDPGetDatum(&request);
	rc = SPI_execute_plan(send_plan, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "saga._send failed: %s", SPI_result_code_string(rc));
}

/* Does the call go to a destination (HTTP or another database)? */
static bool
is_remote_call(SagaCall *c)
{
	char	   *kind = call_field(c->call, "kind");

	return kind != NULL && (strcmp(kind, "http") == 0 || strcmp(kind, "remote") == 0);
}

/*
 * Make one call and record its outcome; returns the saga's next call if it
 * can be made at once (never after a call to a destination, which only
 * queues it).
 *
 * A local step runs in a subtransaction, so that a failure rolls back only
 * its own effects. Its outcome is recorded afterwards, in the worker's
 * transaction, which has locked the saga: had the subtransaction updated the
 * locked row, the new row version would need a MultiXact (the worker's lock
 * and the subtransaction's update), one per step, which costs a lookup on
 * every later visit and ages the cluster's MultiXact counter.
 */
static SagaCall *
run_call(SagaCall *c, MemoryContext cxt, int *sent_calls)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *edata = NULL;
	Datum		result = (Datum) 0;
	bool		isnull = true;
	SagaCall   *next;

	if (is_remote_call(c))
	{
		send_call(c);
		*sent_calls += 1;
		return NULL;
	}

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		result = invoke_as_owner(c, &isnull);
		/* the result outlives the subtransaction, whatever it points into */
		if (!isnull)
		{
			MemoryContextSwitchTo(cxt);
			result = PointerGetDatum(DatumGetJsonbPCopy(result));
			MemoryContextSwitchTo(oldcxt);
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		disable_timeout(STATEMENT_TIMEOUT, false);
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();

	if (edata == NULL)
		return record_success(c, result, isnull, cxt);
	ereport(DEBUG1,
			(errmsg("saga: %s of step \"%s\" failed: %s", c->phase, c->step, edata->message)));
	next = record_failure(c, edata, cxt);
	FreeErrorData(edata);
	return next;
}

/*
 * Run the due calls of up to limit sagas. Called in a transaction with SPI
 * connected; returns how many sagas had a call to make, and in *sent_calls
 * how many calls to destinations it queued.
 */
int
saga_engine_run(int limit, int *sent_calls)
{
	MemoryContext cxt = CurrentMemoryContext;
	Datum		values[1];
	List	   *calls = NIL;
	ListCell   *lc;
	int			rc;

	*sent_calls = 0;

	if (claim_plan == NULL)
	{
		Oid			types[1] = {INT4OID};

		claim_plan = saga_prepare_kept("SELECT * FROM saga._claim($1)", 1, types);
	}
	values[0] = Int32GetDatum(limit);
	rc = SPI_execute_plan(claim_plan, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "saga._claim failed: %s", SPI_result_code_string(rc));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		SagaCall   *c = call_from_row(i, cxt);

		if (c != NULL)
			calls = lappend(calls, c);
	}
	/*
	 * The worker commits asynchronously, which only repeats a delivery when
	 * a commit is lost. A step's effects are seen by others once committed,
	 * and must not be undone and run again by a crash: commit them durably.
	 */
	if (calls != NIL)
		ForceSyncCommit();
	foreach(lc, calls)
	{
		SagaCall   *c = lfirst(lc);

		while (c != NULL)
		{
			CHECK_FOR_INTERRUPTS();
			c = run_call(c, cxt, sent_calls);
		}
	}
	return list_length(calls);
}

/* When the next saga falls due (a retry, a deadline); 0 if none. */
TimestampTz
saga_engine_next_due(void)
{
	static SPIPlanPtr plan = NULL;

	return saga_query_timestamp(&plan,
								"SELECT pg_catalog.min(next_run_at) FROM saga.instances WHERE next_run_at IS NOT NULL",
								"when the next saga falls due");
}
