/*
 * routing.c
 *		Which destinations a topic goes to: saga.subscriptions, cached in each
 *		backend; and whether this database's own inbox handlers want it
 *		(saga.handlers), cached the same way.
 *
 * publish runs inside every business transaction, so it must cost little
 * more than one row. Reading saga.subscriptions on every call (a join in the
 * executor) cost as much as the insert itself; the table changes rarely, so
 * each backend keeps a copy and rereads it when the shared configuration
 * version moves. A trigger on the table bumps that version at commit, so
 * changes made with plain SQL or restored by pg_restore count too. Without
 * the preload there is no shared version and the table is read every time.
 */
#include "saga.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

typedef struct Route
{
	char	   *pattern;		/* exact topic, or NULL for a prefix route */
	char	   *prefix;
	char	   *destination;	/* NULL: this database's inbox */
} Route;

static SagaCopy routes_copy = {
	"routes",
	"SELECT pattern, prefix, destination FROM saga.subscriptions"
	" UNION ALL SELECT DISTINCT pattern, prefix, NULL FROM saga.handlers"
};
static Route *routes = NULL;
static int	nroutes = 0;

static void
load_routes(MemoryContext cxt, SPITupleTable *rows, uint64 n)
{
	routes = MemoryContextAllocZero(cxt, sizeof(Route) * Max(n, 1));
	nroutes = 0;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = rows->vals[i];
		TupleDesc	desc = rows->tupdesc;
		char	   *prefix = SPI_getvalue(tup, desc, 2);
		Route	   *r = &routes[nroutes++];

		if (prefix != NULL)
			r->prefix = MemoryContextStrdup(cxt, prefix);
		else
			r->pattern = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 1));
		if (SPI_getvalue(tup, desc, 3) != NULL)
			r->destination = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 3));
	}
}

/*
 * The destinations subscribed to topic, each once, as a List of C strings
 * valid until the next call; *to_inbox says whether a handler of this
 * database takes it. Runs with SPI connected, as the extension's
 * owner, after the caller locked saga.queue: a drop_destination that
 * committed before that lock was granted has already moved the version.
 */
List *
saga_route(const char *topic, Oid subscriptions_relid, bool *to_inbox)
{
	List	   *result = NIL;

	*to_inbox = false;
	saga_copy_refresh(&routes_copy, subscriptions_relid, load_routes);

	for (int i = 0; i < nroutes; i++)
	{
		Route	   *r = &routes[i];
		bool		match = r->pattern ? strcmp(r->pattern, topic) == 0
			: strncmp(topic, r->prefix, strlen(r->prefix)) == 0;
		ListCell   *lc;
		bool		seen = false;

		if (!match)
			continue;
		if (r->destination == NULL)
		{
			*to_inbox = true;
			continue;
		}
		foreach(lc, result)
		{
			if (strcmp((char *) lfirst(lc), r->destination) == 0)
				seen = true;
		}
		if (!seen)
			result = lappend(result, r->destination);
	}
	return result;
}
