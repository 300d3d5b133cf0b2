/*
 * inbox.c
 *		The inbox: saga.receive(), saga.handle(), saga.unhandle(), and the
 *		worker's side, which runs the handlers of received messages.
 *
 * A received message is stored once per id (a duplicate is dropped). The
 * worker calls every matching handler in one subtransaction of its own
 * transaction, which also marks the message processed: the handlers'
 * effects, what they publish, and the record that the message is done
 * commit together, so each message takes effect exactly once. A failure
 * rolls back the handlers of that message only, and is retried later.
 */
#include "saga.h"
#include "api.h"
#include "engine.h"
#include "outbox.h"
#include "inbox.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/uuid.h"

PG_FUNCTION_INFO_V1(saga_receive);
PG_FUNCTION_INFO_V1(saga_handle);
PG_FUNCTION_INFO_V1(saga_unhandle);

/*
 * Store a received message, unless its id was received before. Senders call
 * this for every message of a batch: the insert is prepared once per session,
 * with a generic plan, and names everything with its schema, so it runs under
 * the caller's search_path (pinning it costs a search-path recomputation per
 * call), as saga.publish does.
 */
Datum
saga_receive(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	char	   *topic;
	Jsonb	   *payload;
	text	   *key;
	Jsonb	   *headers;
	SagaOwnerContext oc;
	Datum		values[6];
	char		nulls[6] = "      ";
	bool		new;
	int			rc;

	saga_require_arg(fcinfo, 0, "message id");
	/* topic, payload, key and headers are checked as publish checks them */
	{
		LOCAL_FCINFO(shifted, 4);

		InitFunctionCallInfoData(*shifted, NULL, 4, InvalidOid, NULL, NULL);
		for (int i = 0; i < 4; i++)
			shifted->args[i] = fcinfo->args[i + 1];
		saga_check_message(shifted, &topic, &payload, &key, &headers);
	}
	values[0] = PG_GETARG_DATUM(0);
	values[1] = CStringGetTextDatum(topic);
	values[2] = key ? PointerGetDatum(key) : (Datum) 0;
	nulls[2] = key ? ' ' : 'n';
	values[3] = JsonbPGetDatum(payload);
	values[4] = headers ? JsonbPGetDatum(headers) : (Datum) 0;
	nulls[4] = headers ? ' ' : 'n';
	values[5] = PG_ARGISNULL(5) ? (Datum) 0 : PG_GETARG_DATUM(5);
	nulls[5] = PG_ARGISNULL(5) ? 'n' : ' ';

	saga_begin_as_owner(&oc, false);
	if (plan == NULL)
	{
		Oid			types[6] = {UUIDOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, TEXTOID};

		plan = saga_prepare_kept_generic("INSERT INTO saga.inbox_messages (message_id, topic, key, payload,"
										 " headers, source) VALUES ($1, $2, $3, $4, $5, $6)"
										 " ON CONFLICT ON CONSTRAINT inbox_messages_pkey DO NOTHING",
										 6, types);
	}
	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "saga.receive: insert into the inbox failed: %s", SPI_result_code_string(rc));
	new = (SPI_processed == 1);
	saga_end_as_owner(&oc);
	if (new)
		saga_wake_at_commit(0);
	PG_RETURN_BOOL(new);
}

Datum
saga_handle(PG_FUNCTION_ARGS)
{
	char	   *pattern;
	size_t		len;
	Oid			caller = GetUserId();
	SagaOwnerContext oc;
	Oid			types[4] = {TEXTOID, TEXTOID, REGPROCEDUREOID, OIDOID};
	Datum		values[4];
	char		nulls[4] = "    ";

	saga_require_arg(fcinfo, 0, "topic");
	saga_require_arg(fcinfo, 1, "handler");
	pattern = text_to_cstring(PG_GETARG_TEXT_PP(0));
	saga_check_topic_pattern(pattern);
	len = strlen(pattern);
	values[0] = CStringGetTextDatum(pattern);
	if (pattern[len - 1] == '*')
		values[1] = CStringGetTextDatum(pnstrdup(pattern, len - 1));
	else
		nulls[1] = 'n';
	values[2] = PG_GETARG_DATUM(1);
	values[3] = ObjectIdGetDatum(caller);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT saga._handle($1, $2, $3, $4)", 4, types, values, nulls, false);
	saga_end_as_owner(&oc);
	PG_RETURN_VOID();
}

Datum
saga_unhandle(PG_FUNCTION_ARGS)
{
	Oid			caller = GetUserId();
	SagaOwnerContext oc;
	Oid			types[3] = {TEXTOID, REGPROCEDUREOID, OIDOID};
	Datum		values[3];
	bool		isnull;
	bool		removed;

	saga_require_arg(fcinfo, 0, "topic");
	saga_require_arg(fcinfo, 1, "handler");
	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	values[2] = ObjectIdGetDatum(caller);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT saga._unhandle($1, $2, $3)", 3, types, values, NULL, false);
	removed = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	saga_end_as_owner(&oc);
	PG_RETURN_BOOL(removed);
}

/* ---------- the worker's side ---------- */

/* a claimed message: its envelope, the handlers to call, and the outcome */
typedef struct InboxMessage
{
	pg_uuid_t	id;
	Jsonb	   *envelope;
	int			nhandlers;
	Oid		   *handlers;
	Oid		   *owners;
	char	   *error;			/* NULL: handled */
} InboxMessage;

/*
 * Due messages, locked, each with its envelope and the handlers whose pattern
 * matches its topic, in registration order.
 */
#define CLAIM_SQL \
	"SELECT m.message_id," \
	"       jsonb_build_object('id', m.message_id, 'topic', m.topic, 'key', m.key," \
	"                          'payload', m.payload, 'headers', m.headers, 'source', m.source)," \
	"       h.handlers, h.owners" \
	" FROM saga.inbox_messages m," \
	"      LATERAL (SELECT coalesce(array_agg(x.handler::oid ORDER BY x.created_at, x.handler), '{}') AS handlers," \
	"                      coalesce(array_agg(x.owner ORDER BY x.created_at, x.handler), '{}') AS owners" \
	"               FROM saga.handlers x" \
	"               WHERE x.pattern = m.topic OR starts_with(m.topic, x.prefix)) h" \
	" WHERE m.status = 'pending' AND m.next_attempt_at <= now()" \
	" ORDER BY m.next_attempt_at, m.seq" \
	" LIMIT $1" \
	" FOR UPDATE OF m SKIP LOCKED"

/*
 * How handling went, for a whole batch in one statement. A failure is
 * retried after 1 s, 2 s, 4 s ... (with jitter, at most 5 minutes); the 10th
 * failure makes the message dead.
 */
#define DONE_SQL \
	"UPDATE saga.inbox_messages m" \
	" SET attempts = m.attempts + 1," \
	"     status = CASE WHEN d.error IS NULL THEN 'processed'" \
	"                   WHEN m.attempts + 1 >= 10 THEN 'dead' ELSE 'pending' END," \
	"     processed_at = CASE WHEN d.error IS NULL THEN clock_timestamp() END," \
	"     last_error = d.error," \
	"     next_attempt_at = CASE WHEN d.error IS NULL THEN m.next_attempt_at" \
	"         ELSE clock_timestamp() + least(interval '5 minutes'," \
	"              make_interval(secs => power(2, least(m.attempts, 20)) * (0.75 + random() / 2))) END" \
	" FROM ROWS FROM (unnest($1::uuid[]), unnest($2::text[])) AS d (message_id, error)" \
	" WHERE m.message_id = d.message_id"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr done_plan = NULL;


/* Row i of the last SPI result (CLAIM_SQL), copied into cxt. */
static InboxMessage *
message_from_row(uint64 i, MemoryContext cxt)
{
	HeapTuple	tup = SPI_tuptable->vals[i];
	TupleDesc	desc = SPI_tuptable->tupdesc;
	MemoryContext old = MemoryContextSwitchTo(cxt);
	InboxMessage *m = palloc0(sizeof(InboxMessage));
	bool		isnull;
	Datum	   *elems;
	int			n;

	memcpy(m->id.data, DatumGetUUIDP(SPI_getbinval(tup, desc, 1, &isnull))->data, UUID_LEN);
	m->envelope = DatumGetJsonbPCopy(SPI_getbinval(tup, desc, 2, &isnull));
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 3, &isnull)),
					  OIDOID, sizeof(Oid), true, TYPALIGN_INT, &elems, NULL, &n);
	m->nhandlers = n;
	m->handlers = palloc(sizeof(Oid) * Max(n, 1));
	for (int j = 0; j < n; j++)
		m->handlers[j] = DatumGetObjectId(elems[j]);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 4, &isnull)),
					  OIDOID, sizeof(Oid), true, TYPALIGN_INT, &elems, NULL, &n);
	m->owners = palloc(sizeof(Oid) * Max(n, 1));
	for (int j = 0; j < n; j++)
		m->owners[j] = DatumGetObjectId(elems[j]);
	MemoryContextSwitchTo(old);
	return m;
}

/* Record the outcomes of a batch of messages in one statement. */
static void
record_done(List *messages)
{
	int			n = list_length(messages);
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *errors = palloc(sizeof(Datum) * n);
	bool	   *error_nulls = palloc(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	Datum		values[2];
	int			i = 0;
	ListCell   *lc;
	int			rc;

	if (done_plan == NULL)
	{
		Oid			types[2] = {UUIDARRAYOID, TEXTARRAYOID};

		/* custom plans: a generic one would not know the arrays are short */
		done_plan = saga_prepare_kept_custom(DONE_SQL, 2, types);
	}
	foreach(lc, messages)
	{
		InboxMessage *m = lfirst(lc);

		ids[i] = UUIDPGetDatum(&m->id);
		error_nulls[i] = (m->error == NULL);
		errors[i] = m->error ? CStringGetTextDatum(m->error) : (Datum) 0;
		i++;
	}
	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = PointerGetDatum(construct_md_array(errors, error_nulls, 1, dims, lbs,
												   TEXTOID, -1, false, TYPALIGN_INT));
	rc = saga_execute_confined(done_plan, values, NULL);
	if (rc != SPI_OK_UPDATE || SPI_processed != (uint64) n)
		elog(ERROR, "saga: recording %d handled inbox messages failed: %s",
			 n, SPI_result_code_string(rc));
}

/*
 * Call the handlers of one message in a subtransaction. The outcome is
 * recorded afterwards, in the worker's transaction, which holds the row's
 * lock (recording it in the subtransaction would make the row version need
 * a MultiXact).
 */
static void
handle_message(InboxMessage *m, MemoryContext cxt)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		for (int i = 0; i < m->nhandlers; i++)
		{
			bool		isnull;

			CHECK_FOR_INTERRUPTS();
			(void) saga_call_as_owner(m->handlers[i], m->owners[i], m->envelope, 0, false, &isnull);
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		m->error = psprintf("%s (SQLSTATE %s)", edata->message ? edata->message : "unknown error",
							unpack_sql_state(edata->sqlerrcode));
		FreeErrorData(edata);
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ereport(DEBUG1, (errmsg("saga: handling an inbox message failed: %s", m->error)));
	}
	PG_END_TRY();
}

/*
 * Handle up to limit due inbox messages. Called in a transaction with SPI
 * connected; returns how many it claimed.
 */
int
saga_inbox_run(int limit)
{
	MemoryContext cxt = CurrentMemoryContext;
	List	   *messages = NIL;
	ListCell   *lc;
	Datum		values[1];
	int			rc;

	if (claim_plan == NULL)
	{
		Oid			types[1] = {INT4OID};

		/* generic: only the LIMIT varies, and the confined planner orders by inbox_due */
		claim_plan = saga_prepare_kept_generic(CLAIM_SQL, 1, types);
	}
	values[0] = Int32GetDatum(limit);
	rc = saga_execute_confined(claim_plan, values, NULL);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "saga: claiming inbox messages failed: %s", SPI_result_code_string(rc));
	for (uint64 i = 0; i < SPI_processed; i++)
		messages = lappend(messages, message_from_row(i, cxt));
	if (messages == NIL)
		return 0;

	/* handlers' effects are seen once committed: never undo them in a crash */
	ForceSyncCommit();
	foreach(lc, messages)
		handle_message(lfirst(lc), cxt);
	record_done(messages);
	return list_length(messages);
}

/* When the next inbox message falls due (a retry); 0 if none. */
TimestampTz
saga_inbox_next_due(void)
{
	static SPIPlanPtr plan = NULL;

	return saga_query_timestamp(&plan,
								"SELECT pg_catalog.min(next_attempt_at) FROM saga.inbox_messages"
								" WHERE status = 'pending'",
								"when the next inbox message falls due");
}
