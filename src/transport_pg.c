/*
 * transport_pg.c
 *		Calls into other service databases over libpq, without blocking.
 *
 * Messages go to the remote saga.receive, many in one statement; the call of
 * a saga step goes to saga.invoke or saga.compensate, alone. A destination
 * has up to `concurrency` connections, opened when there is work and kept
 * for reuse. As in the HTTP transport, nothing here touches a transaction:
 * the worker waits on one epoll descriptor for every socket, and outcomes
 * are data for the caller to record.
 *
 * libpq cannot cancel a statement without blocking (before PostgreSQL 17),
 * so a statement that times out closes its connection. It may still commit
 * remotely; that is why everything sent is idempotent there (saga.receive
 * dedups by message id, saga.invoke by key).
 */
#include "postgres.h"

#include <ctype.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "libpq-fe.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "saga.h"
#include "transport_pg.h"

/* an idle connection is closed after this long */
#define IDLE_CONNECTION_MS	(5 * 60 * 1000)

/*
 * A statement whose connection the worker closed on time-out would go on
 * running remotely, holding its invocation key against the retries; this
 * makes the remote backend notice the closed connection and roll back.
 */
#define SESSION_OPTIONS		"-c client_connection_check_interval=1000"

#define RECEIVE_SQL \
	"SELECT pg_catalog.count(*) FROM ROWS FROM (" \
	" pg_catalog.unnest($1::pg_catalog.uuid[]), pg_catalog.unnest($2::pg_catalog.text[])," \
	" pg_catalog.unnest($3::pg_catalog.jsonb[]), pg_catalog.unnest($4::pg_catalog.text[])," \
	" pg_catalog.unnest($5::pg_catalog.jsonb[])) AS m(id, topic, payload, key, headers)" \
	" WHERE saga.receive(m.id, m.topic, m.payload, m.key, m.headers, $6)"
#define INVOKE_SQL \
	"SELECT saga.invoke($1, $2::pg_catalog.regprocedure, $3::pg_catalog.jsonb)::pg_catalog.text"
#define COMPENSATE_SQL \
	"SELECT saga.compensate($1, $2::pg_catalog.regprocedure, $3::pg_catalog.jsonb)::pg_catalog.text"

typedef enum ConnectionState
{
	CONN_CONNECTING,
	CONN_IDLE,
	CONN_BUSY
} ConnectionState;

typedef struct Connection
{
	dlist_node	node;
	char	   *destination;
	char	   *conninfo;
	PGconn	   *conn;
	ConnectionState state;
	PostgresPollingStatusType polling;	/* while connecting */
	bool		flushing;		/* the statement is not all sent yet */
	uint32		ready;			/* epoll events seen since the last drive */
	pgsocket	watched_fd;
	uint32		watched_events;
	long		timeout_ms;
	TimestampTz deadline;		/* of the connect or statement; 0: none */
	TimestampTz idle_since;
	dlist_head	batch;			/* the requests the statement carries */
	int			batch_size;
	SagaOutcome batch_outcome;
	char	   *batch_error;
} Connection;

struct SagaPg
{
	MemoryContext cxt;
	MemoryContext scratch;		/* reset on every entry */
	char	   *source;			/* this database, as receivers see it */
	int			epfd;			/* every connection's socket */
	dlist_head	connections;
	dlist_head	created;		/* claimed, not yet submitted */
	dlist_head	waiting;		/* submitted, waiting for a connection */
	dlist_head	completed;		/* finished, outcome not yet recorded */
};

SagaPg *
saga_pg_create(const char *source)
{
	SagaPg	   *pg = MemoryContextAllocZero(TopMemoryContext, sizeof(SagaPg));

	pg->cxt = AllocSetContextCreate(TopMemoryContext, "saga libpq",
									ALLOCSET_DEFAULT_SIZES);
	pg->scratch = AllocSetContextCreate(pg->cxt, "saga libpq scratch",
										ALLOCSET_DEFAULT_SIZES);
	pg->source = MemoryContextStrdup(pg->cxt, source);
	pg->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (pg->epfd < 0)
		elog(ERROR, "epoll_create1 failed: %m");
	dlist_init(&pg->connections);
	dlist_init(&pg->created);
	dlist_init(&pg->waiting);
	dlist_init(&pg->completed);
	return pg;
}

/*
 * A request for a claimed row. It waits in "created" until the claim has
 * committed (saga_pg_submit_new) or was rolled back (saga_pg_discard_new).
 */
SagaRequest *
saga_pg_new_request(SagaPg *pg, int max_connections)
{
	MemoryContext cxt = AllocSetContextCreate(pg->cxt, "saga libpq request",
											  ALLOCSET_SMALL_SIZES);
	SagaRequest *req = MemoryContextAllocZero(cxt, sizeof(SagaRequest));

	req->cxt = cxt;
	req->retry_after_s = -1;
	req->max_connections = Max(max_connections, 1);
	req->response.data = MemoryContextStrdup(cxt, "");
	req->response.maxlen = 1;
	dlist_push_tail(&pg->created, &req->node);
	return req;
}

static void
complete(SagaPg *pg, SagaRequest *req, SagaOutcome outcome, const char *error)
{
	req->outcome = outcome;
	req->error = error ? MemoryContextStrdup(req->cxt, error) : NULL;
	dlist_push_tail(&pg->completed, &req->node);
}

/* libpq's last error, on one line */
static char *
connection_error(PGconn *conn)
{
	const char *msg = conn ? PQerrorMessage(conn) : "out of memory";
	StringInfoData buf;
	bool		space = false;

	initStringInfo(&buf);
	for (const char *p = msg; *p; p++)
	{
		if (isspace((unsigned char) *p))
			space = true;
		else
		{
			if (space && buf.len > 0)
				appendStringInfoChar(&buf, ' ');
			space = false;
			appendStringInfoChar(&buf, *p);
		}
	}
	return buf.data;
}

/* Watch the connection's socket for what it waits for. */
static void
watch(SagaPg *pg, Connection *c)
{
	pgsocket	fd = PQsocket(c->conn);
	uint32		events = EPOLLIN;
	struct epoll_event ev;

	if (c->state == CONN_CONNECTING)
		events = c->polling == PGRES_POLLING_WRITING ? EPOLLOUT : EPOLLIN;
	else if (c->flushing)
		events |= EPOLLOUT;

	/* while connecting libpq may close a socket and open one with its number */
	if (fd == c->watched_fd && events == c->watched_events && c->state != CONN_CONNECTING)
		return;
	if (c->watched_fd != PGINVALID_SOCKET && c->watched_fd != fd)
		(void) epoll_ctl(pg->epfd, EPOLL_CTL_DEL, c->watched_fd, NULL);
	c->watched_fd = PGINVALID_SOCKET;
	if (fd == PGINVALID_SOCKET)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.events = events;
	ev.data.ptr = c;
	if (epoll_ctl(pg->epfd, EPOLL_CTL_MOD, fd, &ev) != 0 &&
		epoll_ctl(pg->epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
		elog(ERROR, "epoll_ctl failed: %m");
	c->watched_fd = fd;
	c->watched_events = events;
}

static int
connections_to(SagaPg *pg, const char *destination, const char *conninfo, bool *connecting)
{
	dlist_iter	iter;
	int			n = 0;

	*connecting = false;
	dlist_foreach(iter, &pg->connections)
	{
		Connection *c = dlist_container(Connection, node, iter.cur);

		if (strcmp(c->destination, destination) == 0 && strcmp(c->conninfo, conninfo) == 0)
		{
			n++;
			if (c->state == CONN_CONNECTING)
				*connecting = true;
		}
	}
	return n;
}

/* Fail the waiting requests of a destination (it cannot be reached). */
static void
fail_waiting(SagaPg *pg, const char *destination, const char *error)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &pg->waiting)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		if (strcmp(req->destination, destination) == 0)
		{
			dlist_delete(&req->node);
			complete(pg, req, SAGA_OUTCOME_RETRY, error);
		}
	}
}

/*
 * Close a connection. The requests of its statement get another attempt;
 * if it was the destination's last connection, so do the ones waiting.
 */
static void
close_connection(SagaPg *pg, Connection *c, const char *error)
{
	dlist_mutable_iter iter;
	bool		connecting;

	dlist_foreach_modify(iter, &c->batch)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		dlist_delete(&req->node);
		complete(pg, req, SAGA_OUTCOME_RETRY, error);
	}
	if (c->watched_fd != PGINVALID_SOCKET)
		(void) epoll_ctl(pg->epfd, EPOLL_CTL_DEL, c->watched_fd, NULL);
	if (c->conn)
		PQfinish(c->conn);
	dlist_delete(&c->node);
	if (error != NULL && connections_to(pg, c->destination, c->conninfo, &connecting) == 0)
		fail_waiting(pg, c->destination, error);
	pfree(c->destination);
	pfree(c->conninfo);
	if (c->batch_error)
		pfree(c->batch_error);
	pfree(c);
}

/* SESSION_OPTIONS, then the URL's own "options" (which win), if any. */
static char *
session_options(const char *url)
{
	PQconninfoOption *parsed = PQconninfoParse(url, NULL);
	char	   *result = pstrdup(SESSION_OPTIONS);

	if (parsed == NULL)
		return result;			/* connecting reports the error */
	for (PQconninfoOption *o = parsed; o->keyword != NULL; o++)
		if (strcmp(o->keyword, "options") == 0 && o->val != NULL && o->val[0] != '\0')
			result = psprintf("%s %s", SESSION_OPTIONS, o->val);
	PQconninfoFree(parsed);
	return result;
}

/* Start connecting; false if that failed at once. */
static bool
start_connection(SagaPg *pg, SagaRequest *req)
{
	/* later keywords override what the URL (dbname) sets */
	const char *keys[] = {"dbname", "options", "fallback_application_name", NULL};
	const char *values[] = {req->url, session_options(req->url),
	psprintf("saga %s", pg->source), NULL};
	MemoryContext old = MemoryContextSwitchTo(pg->cxt);
	Connection *c = palloc0(sizeof(Connection));

	c->destination = pstrdup(req->destination);
	c->conninfo = pstrdup(req->url);
	c->state = CONN_CONNECTING;
	c->polling = PGRES_POLLING_WRITING;
	c->watched_fd = PGINVALID_SOCKET;
	c->timeout_ms = req->timeout_ms;
	c->deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), req->timeout_ms);
	dlist_init(&c->batch);
	dlist_push_tail(&pg->connections, &c->node);
	MemoryContextSwitchTo(old);

	c->conn = PQconnectStartParams(keys, values, 1);
	if (c->conn == NULL || PQstatus(c->conn) == CONNECTION_BAD)
	{
		char	   *error = psprintf("could not connect to destination \"%s\": %s",
									 req->destination, connection_error(c->conn));

		close_connection(pg, c, error);
		fail_waiting(pg, req->destination, error);
		return false;
	}
	watch(pg, c);
	return true;
}

/* Append a text array element (NULL for a null pointer) to an array literal. */
static void
append_element(StringInfo buf, const char *value)
{
	if (buf->len > 1)
		appendStringInfoChar(buf, ',');
	if (value == NULL)
	{
		appendStringInfoString(buf, "NULL");
		return;
	}
	appendStringInfoChar(buf, '"');
	for (const char *p = value; *p; p++)
	{
		if (*p == '"' || *p == '\\')
			appendStringInfoChar(buf, '\\');
		appendStringInfoChar(buf, *p);
	}
	appendStringInfoChar(buf, '"');
}

/*
 * Send the statement for first and, if it is a message, the other messages
 * waiting for the same destination, in publish order.
 */
static void
send_batch(SagaPg *pg, Connection *c, SagaRequest *first, int max_batch)
{
	const char *values[6];
	const char *sql;
	int			nparams;
	int			r;

	dlist_delete(&first->node);
	dlist_push_tail(&c->batch, &first->node);
	c->batch_size = 1;
	if (first->for_saga)
	{
		sql = first->compensation ? COMPENSATE_SQL : INVOKE_SQL;
		values[0] = first->call_key;
		values[1] = psprintf("%s(pg_catalog.jsonb)", first->function);
		values[2] = first->body;
		nparams = 3;
	}
	else
	{
		StringInfoData arrays[5];
		dlist_mutable_iter iter;

		if (!first->alone)
		{
			dlist_foreach_modify(iter, &pg->waiting)
			{
				SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

				if (c->batch_size >= max_batch)
					break;
				if (req->for_saga || req->alone ||
					strcmp(req->destination, c->destination) != 0 ||
					strcmp(req->url, c->conninfo) != 0)
					continue;
				dlist_delete(&req->node);
				dlist_push_tail(&c->batch, &req->node);
				c->batch_size++;
			}
		}
		for (int i = 0; i < 5; i++)
		{
			initStringInfo(&arrays[i]);	/* libpq copies the parameters */
			appendStringInfoChar(&arrays[i], '{');
		}
		dlist_foreach_modify(iter, &c->batch)
		{
			SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

			append_element(&arrays[0],
						   DatumGetCString(DirectFunctionCall1(uuid_out,
															   UUIDPGetDatum(&req->message_id))));
			append_element(&arrays[1], req->topic);
			append_element(&arrays[2], req->body);
			append_element(&arrays[3], req->key);
			append_element(&arrays[4], req->headers_json);
		}
		for (int i = 0; i < 5; i++)
		{
			appendStringInfoChar(&arrays[i], '}');
			values[i] = arrays[i].data;
		}
		values[5] = pg->source;
		sql = RECEIVE_SQL;
		nparams = 6;
	}

	c->state = CONN_BUSY;
	c->batch_outcome = SAGA_OUTCOME_RETRY;
	if (c->batch_error)
		pfree(c->batch_error);
	c->batch_error = NULL;
	c->deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), first->timeout_ms);
	c->timeout_ms = first->timeout_ms;
	if (!PQsendQueryParams(c->conn, sql, nparams, NULL, values, NULL, NULL, 0))
	{
		close_connection(pg, c, psprintf("could not send to destination \"%s\": %s",
										 c->destination, connection_error(c->conn)));
		return;
	}
	r = PQflush(c->conn);
	if (r < 0)
	{
		close_connection(pg, c, psprintf("could not send to destination \"%s\": %s",
										 c->destination, connection_error(c->conn)));
		return;
	}
	c->flushing = (r == 1);
	watch(pg, c);
}

static bool
transient_sqlstate(const char *sqlstate)
{
	if (sqlstate == NULL || strlen(sqlstate) != 5)
		return true;			/* not from the server: the connection failed */
	return strncmp(sqlstate, "08", 2) == 0 || strncmp(sqlstate, "40", 2) == 0 ||
		strncmp(sqlstate, "53", 2) == 0 || strncmp(sqlstate, "57", 2) == 0 ||
		strcmp(sqlstate, "55P03") == 0;
}

/* Take the outcome of the statement from one of its results. */
static void
take_result(SagaPg *pg, Connection *c, PGresult *res)
{
	if (PQresultStatus(res) == PGRES_TUPLES_OK)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, dlist_head_node(&c->batch));

		c->batch_outcome = SAGA_OUTCOME_DELIVERED;
		if (req->for_saga && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
		{
			const char *value = PQgetvalue(res, 0, 0);
			MemoryContext old = MemoryContextSwitchTo(req->cxt);

			req->response_bytes = strlen(value);
			initStringInfo(&req->response);
			appendBinaryStringInfo(&req->response, value,
								   Min(req->response_bytes, (size_t) req->response_limit));
			MemoryContextSwitchTo(old);
		}
	}
	else
	{
		const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

		c->batch_outcome = transient_sqlstate(sqlstate) ? SAGA_OUTCOME_RETRY : SAGA_OUTCOME_DEAD;
		if (c->batch_error)
			pfree(c->batch_error);
		c->batch_error = MemoryContextStrdup(pg->cxt,
											 primary && sqlstate ?
											 psprintf("%s: %s (SQLSTATE %s)", c->destination, primary, sqlstate) :
											 psprintf("%s: %s", c->destination, PQresultErrorMessage(res)));
	}
}

/*
 * The statement has finished. A batch of messages refused as a whole is
 * sent again one message per statement, so that only the messages at fault
 * become dead letters.
 */
static void
finish_batch(SagaPg *pg, Connection *c)
{
	dlist_mutable_iter iter;

	if (c->batch_outcome == SAGA_OUTCOME_DEAD && c->batch_size > 1)
	{
		TimestampTz now = GetCurrentTimestamp();

		while (!dlist_is_empty(&c->batch))
		{
			SagaRequest *req = dlist_container(SagaRequest, node, dlist_tail_node(&c->batch));

			dlist_delete(&req->node);
			req->alone = true;
			req->deadline = TimestampTzPlusMilliseconds(now, req->timeout_ms);
			dlist_push_head(&pg->waiting, &req->node);
		}
	}
	else
	{
		dlist_foreach_modify(iter, &c->batch)
		{
			SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

			dlist_delete(&req->node);
			complete(pg, req, c->batch_outcome,
					 c->batch_outcome == SAGA_OUTCOME_DELIVERED ? NULL : c->batch_error);
		}
	}
	c->batch_size = 0;
	c->state = CONN_IDLE;
	c->deadline = 0;
	c->idle_since = GetCurrentTimestamp();
}

/* Move a connection on after its socket became ready. */
static void
drive(SagaPg *pg, Connection *c)
{
	switch (c->state)
	{
		case CONN_CONNECTING:
			c->polling = PQconnectPoll(c->conn);
			if (c->polling == PGRES_POLLING_FAILED)
			{
				close_connection(pg, c, psprintf("could not connect to destination \"%s\": %s",
												 c->destination, connection_error(c->conn)));
				return;
			}
			if (c->polling == PGRES_POLLING_OK)
			{
				if (PQsetnonblocking(c->conn, 1) != 0)
				{
					close_connection(pg, c, connection_error(c->conn));
					return;
				}
				c->state = CONN_IDLE;
				c->deadline = 0;
				c->idle_since = GetCurrentTimestamp();
			}
			break;
		case CONN_BUSY:
			if (c->flushing)
			{
				int			r = PQflush(c->conn);

				if (r < 0)
				{
					close_connection(pg, c, psprintf("lost the connection to destination \"%s\": %s",
													 c->destination, connection_error(c->conn)));
					return;
				}
				c->flushing = (r == 1);
			}
			if (!PQconsumeInput(c->conn))
			{
				close_connection(pg, c, psprintf("lost the connection to destination \"%s\": %s",
												 c->destination, connection_error(c->conn)));
				return;
			}
			while (!PQisBusy(c->conn))
			{
				PGresult   *res = PQgetResult(c->conn);

				if (res == NULL)
				{
					finish_batch(pg, c);
					break;
				}
				take_result(pg, c, res);
				PQclear(res);
			}
			break;
		case CONN_IDLE:
			/* the server went away, or sent something we do not wait for */
			if (!PQconsumeInput(c->conn) || PQstatus(c->conn) == CONNECTION_BAD)
			{
				close_connection(pg, c, NULL);
				return;
			}
			break;
	}
	watch(pg, c);
}

static Connection *
idle_connection(SagaPg *pg, SagaRequest *req)
{
	dlist_iter	iter;

	dlist_foreach(iter, &pg->connections)
	{
		Connection *c = dlist_container(Connection, node, iter.cur);

		if (c->state == CONN_IDLE && strcmp(c->destination, req->destination) == 0 &&
			strcmp(c->conninfo, req->url) == 0)
			return c;
	}
	return NULL;
}

/*
 * Give waiting requests to idle connections; open a connection (one at a
 * time per destination, up to its concurrency) where they have none.
 */
static void
assign_work(SagaPg *pg)
{
	dlist_mutable_iter iter;
	bool		sent;

	do
	{
		sent = false;
		dlist_foreach_modify(iter, &pg->waiting)
		{
			SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);
			Connection *c = idle_connection(pg, req);

			if (c != NULL)
			{
				send_batch(pg, c, req, saga_batch_size);
				sent = true;
				break;			/* the batch took others: start over */
			}
		}
	} while (sent);

	dlist_foreach_modify(iter, &pg->waiting)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);
		bool		connecting;

		if (connections_to(pg, req->destination, req->url, &connecting) < req->max_connections &&
			!connecting && !start_connection(pg, req))
		{
			/* the destination's waiting requests failed with it: start over */
			iter.cur = &pg->waiting.head;
			iter.next = pg->waiting.head.next;
		}
	}
}

/* Send every request whose claim has committed. */
void
saga_pg_submit_new(SagaPg *pg)
{
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext old = MemoryContextSwitchTo(pg->scratch);
	dlist_mutable_iter iter;

	MemoryContextReset(pg->scratch);
	dlist_foreach_modify(iter, &pg->created)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		dlist_delete(&req->node);
		req->deadline = TimestampTzPlusMilliseconds(now, req->timeout_ms);
		dlist_push_tail(&pg->waiting, &req->node);
	}
	assign_work(pg);
	MemoryContextSwitchTo(old);
}

/* Forget requests whose claim was rolled back. */
void
saga_pg_discard_new(SagaPg *pg)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &pg->created)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		dlist_delete(&req->node);
		MemoryContextDelete(req->cxt);
	}
}

int
saga_pg_in_flight(SagaPg *pg, const char *destination)
{
	dlist_iter	iter;
	int			n = 0;

	dlist_foreach(iter, &pg->waiting)
	{
		if (strcmp(dlist_container(SagaRequest, node, iter.cur)->destination, destination) == 0)
			n++;
	}
	dlist_foreach(iter, &pg->connections)
	{
		Connection *c = dlist_container(Connection, node, iter.cur);

		if (strcmp(c->destination, destination) == 0)
			n += c->batch_size;
	}
	return n;
}

int
saga_pg_total_in_flight(SagaPg *pg)
{
	dlist_iter	iter;
	int			n = 0;

	dlist_foreach(iter, &pg->waiting)
		n++;
	dlist_foreach(iter, &pg->connections)
		n += dlist_container(Connection, node, iter.cur)->batch_size;
	return n;
}

/* A descriptor that becomes readable when a connection's socket is ready. */
pgsocket
saga_pg_wait_fd(SagaPg *pg)
{
	return pg->epfd;
}

/* How long until a connection or request times out; -1 if none can. */
long
saga_pg_timeout_ms(SagaPg *pg)
{
	TimestampTz first = 0;
	dlist_iter	iter;

	dlist_foreach(iter, &pg->connections)
	{
		Connection *c = dlist_container(Connection, node, iter.cur);
		TimestampTz t = c->deadline != 0 ? c->deadline :
			TimestampTzPlusMilliseconds(c->idle_since, IDLE_CONNECTION_MS);

		if (first == 0 || t < first)
			first = t;
	}
	dlist_foreach(iter, &pg->waiting)
	{
		TimestampTz t = dlist_container(SagaRequest, node, iter.cur)->deadline;

		if (first == 0 || t < first)
			first = t;
	}
	if (first == 0)
		return -1;
	return Max(0, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), first));
}

/* Act on ready sockets and passed deadlines; collect what finished. */
void
saga_pg_perform(SagaPg *pg)
{
	struct epoll_event events[64];
	MemoryContext old = MemoryContextSwitchTo(pg->scratch);
	TimestampTz now;
	dlist_mutable_iter iter;
	int			n;

	MemoryContextReset(pg->scratch);

	while ((n = epoll_wait(pg->epfd, events, lengthof(events), 0)) > 0)
	{
		for (int i = 0; i < n; i++)
			((Connection *) events[i].data.ptr)->ready |= events[i].events;
		if (n < lengthof(events))
			break;
	}

	now = GetCurrentTimestamp();
	dlist_foreach_modify(iter, &pg->connections)
	{
		Connection *c = dlist_container(Connection, node, iter.cur);
		bool		ready = c->ready != 0;

		c->ready = 0;
		if (ready)
			drive(pg, c);
		else if (c->deadline != 0 && now >= c->deadline)
			close_connection(pg, c, c->state == CONN_CONNECTING ?
							 psprintf("could not connect to destination \"%s\" within %ld ms",
									  c->destination, c->timeout_ms) :
							 psprintf("no answer from destination \"%s\" within %ld ms",
									  c->destination, c->timeout_ms));
		else if (c->state == CONN_IDLE &&
				 TimestampDifferenceExceeds(c->idle_since, now, IDLE_CONNECTION_MS))
			close_connection(pg, c, NULL);
	}

	dlist_foreach_modify(iter, &pg->waiting)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		if (now >= req->deadline)
		{
			dlist_delete(&req->node);
			complete(pg, req, SAGA_OUTCOME_RETRY,
					 psprintf("no connection to destination \"%s\" within %ld ms",
							  req->destination, req->timeout_ms));
		}
	}
	assign_work(pg);
	MemoryContextSwitchTo(old);
}

bool
saga_pg_has_completed(SagaPg *pg)
{
	return !dlist_is_empty(&pg->completed);
}

/*
 * The finished requests, left in place: they are released only once their
 * outcomes are recorded, so a failed recording is tried again.
 */
List *
saga_pg_completed(SagaPg *pg)
{
	dlist_iter	iter;
	List	   *result = NIL;

	dlist_foreach(iter, &pg->completed)
		result = lappend(result, dlist_container(SagaRequest, node, iter.cur));
	return result;
}

void
saga_pg_release(List *requests)
{
	ListCell   *lc;

	foreach(lc, requests)
	{
		SagaRequest *req = lfirst(lc);

		dlist_delete(&req->node);
		MemoryContextDelete(req->cxt);
	}
}
