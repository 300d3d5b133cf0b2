/*
 * outbox.c
 *		The SQL the worker runs against the outbox: claim, dispatch to
 *		NOTIFY, record the outcomes of HTTP and libpq requests.
 *
 * Every function here runs inside a transaction the worker opened, with SPI
 * connected; none does network I/O. Plans are prepared once and kept.
 */
#include "saga.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "storage/itemptr.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "compat.h"
#include "outbox.h"

/* pg_notify refuses payloads of this many bytes or more */
#define NOTIFY_PAYLOAD_LIMIT	8000

/* how much longer than the request time-out a claim is leased */
#define LEASE_MARGIN_MS			"5000"

/*
 * Prepare a statement once for the worker's life. cursor_options may force
 * custom plans: the statements that pick due messages or match outcomes to
 * rows have generic plans that scan the whole queue, and the plan cache would
 * switch to them once the table's statistics change.
 */
static SPIPlanPtr
prepare_kept_with(const char *sql, int nargs, Oid *argtypes, int cursor_options)
{
	SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, cursor_options);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for a saga statement: %s",
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(plan);
	return plan;
}

SPIPlanPtr
saga_prepare_kept(const char *sql, int nargs, Oid *argtypes)
{
	return prepare_kept_with(sql, nargs, argtypes, 0);
}

/*
 * The same, planned once for any arguments: for hot statements whose best
 * plan does not depend on them.
 */
SPIPlanPtr
saga_prepare_kept_generic(const char *sql, int nargs, Oid *argtypes)
{
	return prepare_kept_with(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);
}

/* The same, planned for the arguments of each execution. */
SPIPlanPtr
saga_prepare_kept_custom(const char *sql, int nargs, Oid *argtypes)
{
	return prepare_kept_with(sql, nargs, argtypes, CURSOR_OPT_CUSTOM_PLAN);
}

/*
 * The queue tables (outbox, inbox, sagas) swing between empty and huge
 * faster than their statistics follow. Planned on statistics from an empty
 * moment, "the next due rows" becomes a sort of the whole table and "these
 * tuple ids" a scan of every pending row, once per batch. The worker's
 * statements over them are therefore planned with sequential scans, bitmap
 * scans and sorts disabled, and JIT too: the cost of a disabled plan type
 * would call for compiling. Under these settings one plan fits every
 * argument of the hot statements (claims, dispatch, recording deliveries),
 * so theirs is generic: made, and remade after an invalidation, inside the
 * confined execution, instead of planned for every batch. The others are
 * custom: each execution is planned under these settings.
 */
static int
confine_planner(void)
{
	static const char *const disabled[] = {"enable_seqscan", "enable_bitmapscan", "enable_sort", "jit"};
	int			nest_level = NewGUCNestLevel();

	for (int i = 0; i < lengthof(disabled); i++)
		(void) set_config_option(disabled[i], "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	return nest_level;
}

/* Execute a kept, custom-planned statement over a queue table; see above. */
int
saga_execute_confined(SPIPlanPtr plan, Datum *values, const char *nulls)
{
	int			nest_level = confine_planner();
	int			rc = SPI_execute_plan(plan, values, nulls, false, 0);

	AtEOXact_GUC(true, nest_level);
	return rc;
}

/*
 * The timestamp a one-row, one-column query without parameters returns; 0
 * for NULL. The plan is kept in *plan; having no parameters, it is generic,
 * made (and remade after an invalidation) inside the confined execution.
 */
TimestampTz
saga_query_timestamp(SPIPlanPtr *plan, const char *sql, const char *what)
{
	bool		isnull;
	Datum		d;
	int			rc;

	if (*plan == NULL)
		*plan = saga_prepare_kept(sql, 0, NULL);
	/* not read-only: it must see what this transaction recorded before */
	rc = saga_execute_confined(*plan, NULL, NULL);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saga: could not read %s: %s", what, SPI_result_code_string(rc));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

bool
saga_outbox_extension_present(void)
{
	return OidIsValid(get_extension_oid("saga", true));
}

/*
 * Leases left by a previous incarnation of the worker: it is gone (we hold
 * the database's worker lock), so its claims can be retried now.
 */
void
saga_outbox_reconcile(void)
{
	int			rc = SPI_execute("UPDATE saga.queue SET lease_until = NULL, next_attempt_at = now() "
								 "WHERE lease_until IS NOT NULL AND status = 'pending'",
								 false, 0);

	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "saga: could not reset leases: %s", SPI_result_code_string(rc));
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("saga worker released %llu deliveries claimed before a restart",
						(unsigned long long) SPI_processed)));
}

static char *
get_text(HeapTuple tup, TupleDesc desc, int col)
{
	return SPI_getvalue(tup, desc, col);
}

static int32
get_int4(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? 0 : DatumGetInt32(d);
}

/* Text array column as a List of C strings. */
static List *
get_text_list(HeapTuple tup, TupleDesc desc, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	List	   *result = NIL;

	if (isnull)
		return NIL;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
		if (!nulls[i])
			result = lappend(result, TextDatumGetCString(elems[i]));
	return result;
}

List *
saga_outbox_destinations(void)
{
	static SPIPlanPtr plan = NULL;
	List	   *result = NIL;
	MemoryContext caller = CurrentMemoryContext;
	int			rc;

	if (plan == NULL)
		plan = saga_prepare_kept(
							"SELECT name, kind, target,"
							" ARRAY(SELECT h.key || ': ' || h.value FROM jsonb_each_text(headers) h),"
							" (extract(epoch FROM timeout) * 1000)::int4,"
							" max_attempts,"
							" (extract(epoch FROM backoff) * 1000)::int4,"
							" (extract(epoch FROM max_backoff) * 1000)::int4,"
							" concurrency"
							" FROM saga.destinations ORDER BY name",
							0, NULL);
	rc = SPI_execute_plan(plan, NULL, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "saga: could not read destinations: %s", SPI_result_code_string(rc));

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(caller);
		SagaDestination *d = palloc0(sizeof(SagaDestination));
		char	   *kind;

		d->name = get_text(tup, desc, 1);
		kind = get_text(tup, desc, 2);
		d->kind = strcmp(kind, "notify") == 0 ? SAGA_DEST_NOTIFY :
			strcmp(kind, "postgresql") == 0 ? SAGA_DEST_POSTGRESQL : SAGA_DEST_HTTP;
		d->target = get_text(tup, desc, 3);
		d->header_lines = get_text_list(tup, desc, 4);
		d->timeout_ms = get_int4(tup, desc, 5);
		d->max_attempts = get_int4(tup, desc, 6);
		d->backoff_ms = get_int4(tup, desc, 7);
		d->max_backoff_ms = get_int4(tup, desc, 8);
		d->concurrency = get_int4(tup, desc, 9);
		result = lappend(result, d);
		MemoryContextSwitchTo(old);
	}
	return result;
}

/*
 * The due messages a destination may be sent now, oldest due first: a keyed
 * message only when no earlier message with its key is pending, so it never
 * overtakes one, even while that one waits for a retry. Rows leased to a
 * request in flight are not due. A statement that takes these tuple ids
 * needs no second look at the status: a row changed since this snapshot
 * has another tuple id, and the change is not followed.
 */
#define DUE_HEADS(limit) DUE_HEADS_AFTER("", limit)
#define DUE_HEADS_AFTER(after, limit) \
	"SELECT c.ctid FROM saga.queue c" \
	" WHERE c.destination = $1 AND c.status = 'pending'" after \
	"   AND c.next_attempt_at <= now()" \
	"   AND (c.lease_until IS NULL OR c.lease_until < now())" \
	"   AND (c.key IS NULL OR NOT EXISTS (" \
	"     SELECT 1 FROM saga.queue e" \
	"     WHERE e.destination = $1 AND e.key = c.key" \
	"       AND e.status = 'pending' AND e.seq < c.seq))" \
	" ORDER BY c.next_attempt_at, c.seq LIMIT " limit

typedef struct NotifyRow
{
	int64		seq;
	char	   *envelope;
	Datum		published_at;
} NotifyRow;

static int
notify_row_cmp(const void *a, const void *b)
{
	int64		x = ((const NotifyRow *) a)->seq;
	int64		y = ((const NotifyRow *) b)->seq;

	return (x > y) - (x < y);
}

/*
 * Keep a message that NOTIFY could not carry, marked delivered, so that
 * saga.message() can return it until saga.message_retention passes. The row
 * is rebuilt from its envelope.
 */
static void
keep_for_retention(SagaDestination *dest, NotifyRow *row)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[4];
	int			rc;

	if (plan == NULL)
	{
		Oid			types[4] = {TEXTOID, TEXTOID, INT8OID, TIMESTAMPTZOID};

		plan = saga_prepare_kept(
							"INSERT INTO saga.queue (message_id, destination, seq, topic, key, payload,"
							"  headers, published_at, next_attempt_at, attempts, status, finished_at)"
							" SELECT (e->>'id')::uuid, $2, $3, e->>'topic', e->>'key', e->'payload',"
							"  nullif(e->'headers', 'null'), $4, now(), 1, 'delivered', now()"
							" FROM (SELECT $1::jsonb AS e) m",
							4, types);
	}
	args[0] = CStringGetTextDatum(row->envelope);
	args[1] = CStringGetTextDatum(dest->name);
	args[2] = Int64GetDatum(row->seq);
	args[3] = row->published_at;
	rc = SPI_execute_plan(plan, args, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "saga: could not keep a truncated message: %s", SPI_result_code_string(rc));
}

/*
 * The envelope NOTIFY carries when the whole message is too large: the
 * envelope's fields named in names, and "truncated": true.
 */
static char *
envelope_without_payload(const char *envelope, const char *const *names, int nnames)
{
	Jsonb	   *full = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(envelope)));
	Datum		keys[5];
	Datum		vals[5];

	for (int i = 0; i < nnames; i++)
	{
		keys[i] = CStringGetTextDatum(names[i]);
		vals[i] = DirectFunctionCall2(jsonb_object_field, JsonbPGetDatum(full), keys[i]);
	}
	keys[nnames] = CStringGetTextDatum("truncated");
	vals[nnames] = DirectFunctionCall1(jsonb_in, CStringGetDatum("true"));
	{
		StringInfoData buf;

		initStringInfo(&buf);
		appendStringInfoChar(&buf, '{');
		for (int i = 0; i <= nnames; i++)
		{
			if (i > 0)
				appendStringInfoString(&buf, ", ");
			escape_json(&buf, TextDatumGetCString(keys[i]));
			appendStringInfoString(&buf, ": ");
			appendStringInfoString(&buf, DatumGetCString(DirectFunctionCall1(jsonb_out, vals[i])));
		}
		appendStringInfoChar(&buf, '}');
		return buf.data;
	}
}

static char *
truncated_envelope(const char *envelope)
{
	static const char *const names[] = {"id", "key", "topic", "headers"};

	return envelope_without_payload(envelope, names, 4);
}

static char *
minimal_envelope(const char *envelope)
{
	static const char *const names[] = {"id", "topic"};

	return envelope_without_payload(envelope, names, 2);
}

/*
 * Deliver up to limit due messages of one NOTIFY destination in the current
 * transaction: the rows are deleted and the notifications queued together, so
 * they commit (and are sent) together, in publish order. A message whose
 * envelope is too large for NOTIFY goes out without its payload and with
 * "truncated": true, and is kept for saga.message().
 *
 * The statement repeats while it finds work: once it has deleted the first
 * message of a key, the next one of that key becomes due in the same
 * transaction, so a burst on one key still goes out in one commit, in order.
 *
 * *cursor is where the previous batch of this cycle stopped, if it sent no
 * keyed message (else the next message of a key may lie behind it). The
 * index scan starts after it, instead of stepping again over every entry the
 * earlier batches deleted; the caller starts each cycle without one, so a
 * row that committed behind the cursor is found by the next cycle.
 */
int
saga_outbox_dispatch_notify(SagaDestination *dest, int limit, SagaNotifyCursor *cursor)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[4];
	int			sent = 0;

	if (plan == NULL)
	{
		Oid			types[4] = {TEXTOID, INT4OID, TIMESTAMPTZOID, INT8OID};

		plan = prepare_kept_with(
							"DELETE FROM saga.queue q"
							" WHERE q.ctid = ANY (ARRAY("
							DUE_HEADS_AFTER(" AND (c.next_attempt_at, c.seq) > ($3, $4)", "$2") "))"
							" RETURNING q.seq, jsonb_build_object('id', q.message_id, 'topic', q.topic,"
							"   'key', q.key, 'payload', q.payload, 'headers', q.headers)::text,"
							"   q.published_at, q.next_attempt_at, q.key IS NOT NULL",
							4, types, CURSOR_OPT_GENERIC_PLAN);
	}
	args[0] = CStringGetTextDatum(dest->name);
	while (sent < limit)
	{
		NotifyRow  *rows;
		uint64		n;
		int			rc;
		bool		keyed = false;
		SagaNotifyCursor last = *cursor;

		args[1] = Int32GetDatum(limit - sent);
		args[2] = TimestampTzGetDatum(cursor->valid ? cursor->due : DT_NOBEGIN);
		args[3] = Int64GetDatum(cursor->valid ? cursor->seq : PG_INT64_MIN);
		rc = saga_execute_confined(plan, args, NULL);
		if (rc != SPI_OK_DELETE_RETURNING)
			elog(ERROR, "saga: NOTIFY dispatch failed: %s", SPI_result_code_string(rc));
		n = SPI_processed;
		if (n == 0)
			break;

		/* a TID scan returns rows in physical order: notify in publish order */
		rows = palloc(sizeof(NotifyRow) * n);
		for (uint64 i = 0; i < n; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			TimestampTz due;

			rows[i].seq = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
			rows[i].envelope = SPI_getvalue(tup, desc, 2);
			rows[i].published_at = SPI_getbinval(tup, desc, 3, &isnull);
			due = DatumGetTimestampTz(SPI_getbinval(tup, desc, 4, &isnull));
			keyed |= DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
			/* the furthest row in index order: due time, then seq */
			if (!last.valid || due > last.due || (due == last.due && rows[i].seq > last.seq))
			{
				last.due = due;
				last.seq = rows[i].seq;
				last.valid = true;
			}
		}
		SPI_freetuptable(SPI_tuptable);
		cursor->valid = false;
		if (!keyed)
			*cursor = last;
		qsort(rows, n, sizeof(NotifyRow), notify_row_cmp);

		for (uint64 i = 0; i < n; i++)
		{
			if (strlen(rows[i].envelope) < NOTIFY_PAYLOAD_LIMIT)
				Async_Notify(dest->target, rows[i].envelope);
			else
			{
				char	   *small = truncated_envelope(rows[i].envelope);

				keep_for_retention(dest, &rows[i]);
				/* escaped headers and key can still be too long: id and topic only */
				if (strlen(small) >= NOTIFY_PAYLOAD_LIMIT)
					small = minimal_envelope(rows[i].envelope);
				Async_Notify(dest->target, small);
			}
			pfree(rows[i].envelope);
		}
		pfree(rows);
		sent += (int) n;
	}
	return sent;
}

/*
 * Exponential backoff with "equal jitter": the n-th retry waits between half
 * and all of backoff * 2^(n-1), capped at max_backoff.
 */
int
saga_backoff_ms(int attempt, int backoff_ms, int max_backoff_ms)
{
	double		delay = backoff_ms;

	for (int i = 1; i < attempt && delay < max_backoff_ms; i++)
		delay *= 2;
	if (delay > max_backoff_ms)
		delay = max_backoff_ms;
	return (int) (delay / 2 + pg_prng_double(&pg_global_prng_state) * delay / 2);
}

/* Does a "Name: value" line in lines have the same name as line? */
static bool
header_listed(List *lines, const char *line)
{
	size_t		len = strcspn(line, ":");
	ListCell   *lc;

	foreach(lc, lines)
	{
		const char *other = lfirst(lc);

		if (strcspn(other, ":") == len && pg_strncasecmp(other, line, len) == 0)
			return true;
	}
	return false;
}

/* The columns claim_due returns */
enum
{
	CLAIMED_ID = 1,
	CLAIMED_ATTEMPTS,
	CLAIMED_TOPIC,
	CLAIMED_PAYLOAD,
	CLAIMED_HEADER_LINES,
	CLAIMED_TID,
	CLAIMED_CALL_KEY,
	CLAIMED_CALL_PATH,
	CLAIMED_CALL_TIMEOUT,
	CLAIMED_KEY,
	CLAIMED_HEADERS,
	CLAIMED_CALL_FUNCTION,
	CLAIMED_CALL_METHOD
};

/*
 * When a claim made now expires: the request's time-out and a margin. A
 * claimed row is next due then (next_attempt_at), which also keeps the rows
 * in flight out of the way of the next claim's index scan.
 */
#define LEASE_END \
	"(now() + (coalesce((q.saga_call ->> 'timeout_ms')::int4, $3) + " LEASE_MARGIN_MS ")" \
	" * interval '1 millisecond')"

/*
 * Claim up to limit due rows of a destination: a lease (attempts
 * incremented, lease_until set) that outlives the request, so a crash leaves
 * nothing stuck. The rows are left in SPI_tuptable; the requests built from
 * them wait in their transport until the claim commits.
 *
 * The call of a saga step is a row like a message, with saga_call set: its
 * own time-out and idempotency key, and for HTTP a path.
 */
static uint64
claim_due(SagaDestination *dest, int limit)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[3];
	int			rc;

	if (plan == NULL)
	{
		Oid			types[3] = {TEXTOID, INT4OID, INT4OID};

		plan = prepare_kept_with(
							"UPDATE saga.queue q"
							" SET lease_until = " LEASE_END ", next_attempt_at = " LEASE_END ","
							"     attempts = q.attempts + 1"
							" WHERE q.ctid = ANY (ARRAY(" DUE_HEADS("$2") "))"
							" RETURNING q.message_id, q.attempts, q.topic, q.payload::text,"
							"   ARRAY(SELECT h.key || ': ' || h.value FROM jsonb_each_text(q.headers) h),"
							"   q.ctid, q.saga_call ->> 'key', q.saga_call ->> 'path',"
							"   (q.saga_call ->> 'timeout_ms')::int4, q.key, q.headers::text,"
							"   q.saga_call -> 'call' ->> 'function', q.saga_call ->> 'method'",
							3, types, CURSOR_OPT_GENERIC_PLAN);
	}
	args[0] = CStringGetTextDatum(dest->name);
	args[1] = Int32GetDatum(limit);
	args[2] = Int32GetDatum(dest->timeout_ms);
	rc = saga_execute_confined(plan, args, NULL);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "saga: claim failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/* What every request of a claimed row carries, whatever its transport. */
static void
fill_request(SagaRequest *req, SagaDestination *dest, HeapTuple tup, TupleDesc desc)
{
	MemoryContext old = MemoryContextSwitchTo(req->cxt);
	bool		isnull;

	memcpy(&req->message_id,
		   DatumGetUUIDP(SPI_getbinval(tup, desc, CLAIMED_ID, &isnull)), sizeof(pg_uuid_t));
	req->attempt = get_int4(tup, desc, CLAIMED_ATTEMPTS);
	ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, CLAIMED_TID, &isnull)),
					&req->tid);
	req->claim_xid = GetCurrentTransactionId();
	req->destination = pstrdup(dest->name);
	req->url = pstrdup(dest->target);
	req->body = get_text(tup, desc, CLAIMED_PAYLOAD);
	req->timeout_ms = dest->timeout_ms;
	req->max_attempts = dest->max_attempts;
	req->backoff_ms = dest->backoff_ms;
	req->max_backoff_ms = dest->max_backoff_ms;
	(void) SPI_getbinval(tup, desc, CLAIMED_CALL_KEY, &isnull);
	req->for_saga = !isnull;
	if (req->for_saga)
	{
		if (get_int4(tup, desc, CLAIMED_CALL_TIMEOUT) > 0)
			req->timeout_ms = get_int4(tup, desc, CLAIMED_CALL_TIMEOUT);
		req->response_limit = saga_max_payload_size;
	}
	MemoryContextSwitchTo(old);
}

/* Claim due rows of an HTTP destination; see claim_due. */
int
saga_outbox_claim_http(SagaHttp *http, SagaDestination *dest, int limit)
{
	uint64		n = claim_due(dest, limit);

	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		SagaRequest *req = saga_http_new_request(http);
		MemoryContext old;
		char	   *id;
		ListCell   *lc;

		fill_request(req, dest, tup, desc);
		old = MemoryContextSwitchTo(req->cxt);
		id = get_text(tup, desc, CLAIMED_ID);
		if (req->for_saga)
		{
			req->url = psprintf("%s%s", dest->target, get_text(tup, desc, CLAIMED_CALL_PATH));
			id = get_text(tup, desc, CLAIMED_CALL_KEY);
		}
		saga_http_add_header(req, "Content-Type", "application/json");
		saga_http_add_header(req, "Idempotency-Key", id);
		saga_http_add_header(req, "Saga-Topic", get_text(tup, desc, CLAIMED_TOPIC));
		foreach(lc, dest->header_lines)
			req->headers = curl_slist_append(req->headers, (char *) lfirst(lc));
		foreach(lc, get_text_list(tup, desc, CLAIMED_HEADER_LINES))
		{
			/* the administrator's headers (credentials) win over a publisher's */
			if (!header_listed(dest->header_lines, (char *) lfirst(lc)))
				req->headers = curl_slist_append(req->headers, (char *) lfirst(lc));
		}
		MemoryContextSwitchTo(old);
	}
	return (int) n;
}

/*
 * Claim due rows of a postgresql:// destination; see claim_due. A message
 * goes to the remote saga.receive; the call of a saga step to saga.invoke,
 * or saga.compensate with the key of the action it undoes (saga._send
 * chose which).
 */
int
saga_outbox_claim_pg(SagaPg *pg, SagaDestination *dest, int limit)
{
	uint64		n = claim_due(dest, limit);

	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		SagaRequest *req = saga_pg_new_request(pg, dest->concurrency);
		MemoryContext old;

		fill_request(req, dest, tup, desc);
		old = MemoryContextSwitchTo(req->cxt);
		req->topic = get_text(tup, desc, CLAIMED_TOPIC);
		req->key = get_text(tup, desc, CLAIMED_KEY);
		req->headers_json = get_text(tup, desc, CLAIMED_HEADERS);
		if (req->for_saga)
		{
			char	   *method = get_text(tup, desc, CLAIMED_CALL_METHOD);

			req->call_key = get_text(tup, desc, CLAIMED_CALL_KEY);
			req->function = get_text(tup, desc, CLAIMED_CALL_FUNCTION);
			req->compensation = method != NULL && strcmp(method, "compensate") == 0;
		}
		MemoryContextSwitchTo(old);
	}
	return (int) n;
}

static SagaRecordCounts record_messages(List *requests);

/* Replace bytes that are not valid in the database encoding. */
static char *
valid_text(const char *s)
{
	char	   *copy = pstrdup(s);
	int			len = strlen(copy);
	int			pos = 0;

	while (pos < len)
	{
		int			ok = pg_encoding_verifymbstr(GetDatabaseEncoding(), copy + pos, len - pos);

		pos += ok;
		if (pos < len)
			copy[pos++] = '?';
	}
	return copy;
}

/*
 * Hand the outcome of a saga step's call to the saga (saga._received
 * deletes the row, under the same fence as messages). A 2xx response is the
 * step's result; one larger than saga.max_payload_size is not kept.
 */
static void
record_saga_call(SagaRequest *req)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[6];
	char		nulls[6] = "      ";
	int			rc;

	if (plan == NULL)
	{
		Oid			types[6] = {TIDOID, UUIDOID, INT4OID, INT4OID, TEXTOID, TEXTOID};

		plan = saga_prepare_kept("SELECT saga._received($1, $2, $3, $4, $5, $6)", 6, types);
	}
	args[0] = PointerGetDatum(&req->tid);
	args[1] = UUIDPGetDatum(&req->message_id);
	args[2] = Int32GetDatum(req->attempt);
	args[3] = Int32GetDatum((int) req->outcome);
	if (req->outcome != SAGA_OUTCOME_DELIVERED)
		nulls[4] = 'n';
	else if (req->response_bytes > (size_t) req->response.len)
	{
		ereport(WARNING,
				(errmsg("saga: the answer of destination \"%s\" to a step's call has %zu bytes, more than saga.max_payload_size; its result is not kept",
						req->destination, req->response_bytes)));
		args[4] = CStringGetTextDatum(psprintf("{\"truncated\": true, \"bytes\": %zu}",
											   req->response_bytes));
	}
	else
		args[4] = CStringGetTextDatum(valid_text(req->response.data));
	if (req->error == NULL)
		nulls[5] = 'n';
	else
		args[5] = CStringGetTextDatum(valid_text(req->error));
	rc = SPI_execute_plan(plan, args, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "saga: could not record the outcome of a step's call: %s",
			 SPI_result_code_string(rc));
}

/*
 * Record the outcomes of finished requests: the calls of saga steps one by
 * one, the messages in one statement.
 */
SagaRecordCounts
saga_outbox_record(List *requests)
{
	List	   *messages = NIL;
	ListCell   *lc;

	foreach(lc, requests)
	{
		SagaRequest *req = lfirst(lc);

		if (req->for_saga)
			record_saga_call(req);
		else
			messages = lappend(messages, req);
	}
	return record_messages(messages);
}

/*
 * Record the outcomes of messages. A row is found by the tuple id the claim
 * returned and must still be the version the claim wrote (its xmin): a claim
 * that was lost (row updated or moved since) no longer matches and is left
 * alone, to be retried.
 *
 * Deliveries are deleted in one statement, failures updated one statement
 * each (they come a batch at a time, then wait for their backoff). Neither
 * joins the queue to the outcomes: the queue's statistics swing between
 * empty and huge, and a join planned on a wrong guess can scan the whole
 * queue once per outcome. The tuple ids are handed over through a subquery,
 * so the planner does not know how many there are: given hundreds, it would
 * prefer a sequential scan of the whole queue to a TID scan.
 */
static SagaRecordCounts
record_messages(List *requests)
{
	static SPIPlanPtr delivered_plan = NULL;
	static SPIPlanPtr failed_plan = NULL;
	SagaRecordCounts counts = {0, 0, 0};
	int			n = list_length(requests);
	Datum	   *tids = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *xids = palloc(sizeof(Datum) * Max(n, 1));
	int			nxids = 0;
	ListCell   *lc;
	int			rc;

	if (n == 0)
		return counts;
	if (delivered_plan == NULL)
	{
		Oid			dtypes[2] = {TIDARRAYOID, XIDARRAYOID};
		Oid			ftypes[6] = {TIDOID, XIDOID, BOOLOID, FLOAT8OID, TEXTOID, INT4OID};

		delivered_plan = prepare_kept_with(
							"DELETE FROM saga.queue q"
							" WHERE q.ctid = ANY (ARRAY(SELECT pg_catalog.unnest($1))) AND q.xmin = ANY ($2)",
							2, dtypes, CURSOR_OPT_GENERIC_PLAN);
		failed_plan = saga_prepare_kept(
							"UPDATE saga.queue q SET lease_until = NULL,"
							"  status = CASE WHEN $3 THEN 'dead' ELSE 'pending' END,"
							"  next_attempt_at = CASE WHEN $3 THEN now() ELSE now() + $4 * interval '1 second' END,"
							"  finished_at = CASE WHEN $3 THEN now() END,"
							"  last_error = $5, last_status = $6"
							" WHERE q.ctid = $1 AND q.xmin = $2",
							6, ftypes);
	}

	foreach(lc, requests)
	{
		SagaRequest *req = lfirst(lc);
		SagaOutcome outcome = req->outcome;
		Datum		args[6];
		char		nulls[6] = "      ";
		double		delay = 0;

		if (outcome == SAGA_OUTCOME_DELIVERED)
		{
			bool		seen = false;

			tids[counts.delivered++] = PointerGetDatum(&req->tid);
			for (int j = 0; j < nxids && !seen; j++)
				seen = (DatumGetTransactionId(xids[j]) == req->claim_xid);
			if (!seen)
				xids[nxids++] = TransactionIdGetDatum(req->claim_xid);
			continue;
		}
		if (outcome == SAGA_OUTCOME_RETRY && req->attempt >= req->max_attempts)
			outcome = SAGA_OUTCOME_DEAD;
		if (outcome == SAGA_OUTCOME_RETRY)
		{
			delay = req->retry_after_s >= 0 ? (double) req->retry_after_s :
				saga_backoff_ms(req->attempt, req->backoff_ms, req->max_backoff_ms) / 1000.0;
			counts.retried++;
		}
		else
			counts.dead++;
		args[0] = PointerGetDatum(&req->tid);
		args[1] = TransactionIdGetDatum(req->claim_xid);
		args[2] = BoolGetDatum(outcome == SAGA_OUTCOME_DEAD);
		args[3] = Float8GetDatum(delay);
		if (req->error)
			args[4] = CStringGetTextDatum(valid_text(req->error));
		else
			nulls[4] = 'n';
		args[5] = Int32GetDatum((int32) req->status);
		if (req->status == 0)
			nulls[5] = 'n';
		rc = SPI_execute_plan(failed_plan, args, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "saga: could not record a failed delivery: %s", SPI_result_code_string(rc));
	}

	if (counts.delivered > 0)
	{
		Datum		args[2];

		args[0] = PointerGetDatum(construct_array(tids, counts.delivered, TIDOID,
												  sizeof(ItemPointerData), false, TYPALIGN_SHORT));
		args[1] = PointerGetDatum(construct_array(xids, nxids, XIDOID, sizeof(TransactionId),
												  true, TYPALIGN_INT));
		rc = saga_execute_confined(delivered_plan, args, NULL);
		if (rc != SPI_OK_DELETE)
			elog(ERROR, "saga: could not record deliveries: %s", SPI_result_code_string(rc));
	}
	return counts;
}

/*
 * When the next message of a destination falls due (a retry, a deliver_at),
 * or 0 if none is waiting: the worker sleeps until then, not a whole poll
 * interval.
 */
TimestampTz
saga_outbox_next_due(SagaDestination *dest)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[1];
	bool		isnull;
	Datum		d;
	int			rc;

	if (plan == NULL)
	{
		Oid			types[1] = {TEXTOID};

		/*
		 * Generic: one plan, made inside the confined execution, serves every
		 * destination, and a commit that publishes (a wake-up) does not pay
		 * for planning it once per destination.
		 */
		plan = saga_prepare_kept_generic("SELECT min(next_attempt_at) FROM saga.queue"
										 " WHERE destination = $1 AND status = 'pending' AND next_attempt_at > now()",
										 1, types);
	}
	args[0] = CStringGetTextDatum(dest->name);
	/* not read-only: it must see the retries recorded earlier in this transaction */
	rc = saga_execute_confined(plan, args, NULL);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saga: could not read the next due time: %s", SPI_result_code_string(rc));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

/* Drop messages kept for saga.message() once their retention has passed. */
int
saga_outbox_expire_retained(void)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[1];
	int			total = 0;
	int			rc;

	if (plan == NULL)
	{
		Oid			types[1] = {INT4OID};

		plan = saga_prepare_kept(
							"DELETE FROM saga.queue q WHERE q.ctid = ANY (ARRAY("
							"  SELECT c.ctid FROM saga.queue c WHERE c.status = 'delivered'"
							"    AND c.finished_at < now() - $1 * interval '1 second' LIMIT 1000))",
							1, types);
	}
	args[0] = Int32GetDatum(saga_message_retention_s);
	do
	{
		rc = SPI_execute_plan(plan, args, NULL, false, 0);
		if (rc != SPI_OK_DELETE)
			elog(ERROR, "saga: could not expire retained messages: %s", SPI_result_code_string(rc));
		total += (int) SPI_processed;
	} while (SPI_processed == 1000);
	return total;
}
