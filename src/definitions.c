/*
 * definitions.c
 *		The latest version of each saga definition and its deadline: what
 *		saga.start needs to start a saga, cached in each backend.
 *
 * Like the routes (routing.c), the copy is reread when the shared
 * configuration version moves, which a trigger on saga.definitions does at
 * commit (saga_copy_refresh).
 */
#include "saga.h"

#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

typedef struct Definition
{
	char	   *name;
	int32		version;
	bool		has_deadline;
	Interval	deadline;
} Definition;

static SagaCopy definitions_copy = {
	"definitions",
	"SELECT DISTINCT ON (name) name, version, deadline FROM saga.definitions ORDER BY name, version DESC"
};
static Definition *definitions = NULL;
static int	ndefinitions = 0;

static int
compare_names(const void *a, const void *b)
{
	return strcmp(((const Definition *) a)->name, ((const Definition *) b)->name);
}

static void
load_definitions(MemoryContext cxt, SPITupleTable *rows, uint64 n)
{
	definitions = MemoryContextAllocZero(cxt, sizeof(Definition) * Max(n, 1));
	ndefinitions = 0;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = rows->vals[i];
		TupleDesc	desc = rows->tupdesc;
		Definition *d = &definitions[ndefinitions++];
		bool		isnull;
		Datum		deadline;

		d->name = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 1));
		d->version = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		deadline = SPI_getbinval(tup, desc, 3, &isnull);
		d->has_deadline = !isnull;
		if (!isnull)
			d->deadline = *DatumGetIntervalP(deadline);
	}
	/* C order, for bsearch; the query's order depends on the collation */
	if (ndefinitions > 1)
		qsort(definitions, ndefinitions, sizeof(Definition), compare_names);
}

/*
 * The latest version of saga name and its deadline (*deadline NULL: none),
 * or false if it is not defined. Runs with SPI connected, as the extension's
 * owner; *deadline is valid until the next call.
 */
bool
saga_latest_definition(const char *name, Oid relid, int32 *version, Interval **deadline)
{
	Definition	key;
	Definition *d;

	saga_copy_refresh(&definitions_copy, relid, load_definitions);
	key.name = (char *) name;
	d = ndefinitions > 0 ? bsearch(&key, definitions, ndefinitions, sizeof(Definition), compare_names) : NULL;
	if (d == NULL)
		return false;
	*version = d->version;
	*deadline = d->has_deadline ? &d->deadline : NULL;
	return true;
}
