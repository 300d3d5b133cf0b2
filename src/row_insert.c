/*
 * row_insert.c
 *		One row into one of saga's own tables, without the executor.
 *
 * saga.publish and saga.start run inside every business transaction, and an
 * INSERT through SPI spent more time setting up its executor (the plan's
 * nodes, rebuilding the table's CHECK constraints from their stored text)
 * than writing the row. These rows are built entirely here, so they are
 * written the way logical replication applies a row: heap insert, then the
 * indexes. What the executor would have added does not apply: every column is
 * given (the table's other columns must be nullable and without a default,
 * which is checked), the values satisfy the CHECK constraints by
 * construction, and a table that has been given insert triggers is refused
 * rather than silently not firing them.
 *
 * Describing the table's indexes for every row (building each IndexInfo,
 * planning and compiling the partial-index predicates) cost a fifth of
 * writing it, so the descriptions are kept across transactions until a
 * relcache invalidation of the table says its indexes may have changed
 * (created, dropped, made ready by CREATE INDEX CONCURRENTLY).
 */
#include "saga.h"
#include "compat.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/pg_am_d.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "nodes/execnodes.h"
#include "optimizer/optimizer.h"
#include "parser/parse_relation.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"

/* the shapes in use, whose index descriptions an invalidation makes stale */
static SagaRowShape *shapes[4];
static int	nshapes = 0;

static void
table_changed(Datum arg, Oid relid)
{
	for (int i = 0; i < nshapes; i++)
		if (relid == InvalidOid || relid == shapes[i]->relid)
			shapes[i]->indexes_valid = false;
}

static void
register_shape(SagaRowShape *shape)
{
	if (nshapes == 0)
		CacheRegisterRelcacheCallback(table_changed, (Datum) 0);
	if (nshapes == lengthof(shapes))
		elog(ERROR, "too many saga row shapes");
	shapes[nshapes++] = shape;
	shape->attnums = MemoryContextAlloc(TopMemoryContext, sizeof(AttrNumber) * shape->ncolumns);
	shape->index_cxt = AllocSetContextCreate(CacheMemoryContext, "saga row indexes",
											 ALLOCSET_SMALL_SIZES);
}

/* Find the shape's columns in the table, and check the columns it leaves out. */
static void
resolve_shape(SagaRowShape *shape, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	shape->relid = InvalidOid;
	for (int i = 0; i < shape->ncolumns; i++)
	{
		AttrNumber	attnum = attnameAttNum(rel, shape->columns[i], false);

		if (attnum == InvalidAttrNumber ||
			TupleDescAttr(desc, attnum - 1)->atttypid != shape->types[i])
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("table saga.%s has no column \"%s\" of type %s",
							shape->table, shape->columns[i], format_type_be(shape->types[i])),
					 errhint("The installed saga library and the extension's version differ:"
							 " run ALTER EXTENSION saga UPDATE.")));
		shape->attnums[i] = attnum;
	}
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		bool		given = false;

		for (int i = 0; i < shape->ncolumns; i++)
			given |= shape->attnums[i] == att->attnum;
		if (!given && !att->attisdropped &&
			(att->attnotnull || att->atthasdef || att->attgenerated))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("column \"%s\" of table saga.%s is not known to this saga library",
							NameStr(att->attname), shape->table),
					 errhint("The installed saga library and the extension's version differ:"
							 " run ALTER EXTENSION saga UPDATE.")));
	}
	shape->natts = desc->natts;
	shape->relid = RelationGetRelid(rel);
	shape->indexes_valid = false;
}

/*
 * Describe the table's indexes in shape->index_cxt, their expressions and
 * predicates prepared there too. Only btree descriptions are kept: other
 * access methods cache state of the open index in its IndexInfo, so theirs
 * are built for each row. (A deferrable constraint comes with a trigger,
 * so saga_insert_row has refused its table already.)
 */
static void
describe_indexes(SagaRowShape *shape, Relation rel)
{
	MemoryContext old;
	List	   *oids;
	ListCell   *lc;
	int			n = 0;

	MemoryContextReset(shape->index_cxt);
	shape->nindexes = -1;
	shape->indexes_valid = true;	/* an invalidation from here on: again */
	old = MemoryContextSwitchTo(shape->index_cxt);
	oids = RelationGetIndexList(rel);
	shape->index_oids = palloc(sizeof(Oid) * list_length(oids));
	shape->index_infos = palloc0(sizeof(IndexInfo *) * list_length(oids));
	foreach(lc, oids)
	{
		Relation	index = index_open(lfirst_oid(lc), RowExclusiveLock);

		if (index->rd_rel->relam == BTREE_AM_OID)
		{
			IndexInfo  *info = BuildIndexInfo(index);

			if (info->ii_Predicate != NIL)
				info->ii_PredicateState =
					ExecInitQual((List *) expression_planner((Expr *) info->ii_Predicate), NULL);
			if (info->ii_Expressions != NIL)
				info->ii_ExpressionsState =
					ExecInitExprList((List *) expression_planner((Expr *) info->ii_Expressions), NULL);
			shape->index_infos[n] = info;
		}
		shape->index_oids[n++] = RelationGetRelid(index);
		index_close(index, NoLock);
	}
	MemoryContextSwitchTo(old);
	shape->nindexes = n;
}

/* What ExecOpenIndices does, with the kept descriptions. */
static void
open_indexes(SagaRowShape *shape, ResultRelInfo *rri)
{
	int			n = shape->nindexes;

	rri->ri_NumIndices = n;
	rri->ri_IndexRelationDescs = palloc(sizeof(Relation) * n);
	rri->ri_IndexRelationInfo = palloc(sizeof(IndexInfo *) * n);
	for (int i = 0; i < n; i++)
	{
		Relation	index = index_open(shape->index_oids[i], RowExclusiveLock);

		rri->ri_IndexRelationDescs[i] = index;
		rri->ri_IndexRelationInfo[i] = shape->index_infos[i] ? shape->index_infos[i] :
			BuildIndexInfo(index);
	}
}

static bool
has_insert_triggers(Relation rel)
{
	TriggerDesc *t = rel->trigdesc;

	return t != NULL &&
		(t->trig_insert_before_row || t->trig_insert_after_row || t->trig_insert_instead_row ||
		 t->trig_insert_before_statement || t->trig_insert_after_statement);
}

/* Still the table the shape was resolved against? A cheap check per row. */
static bool
shape_matches(SagaRowShape *shape, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (shape->relid != RelationGetRelid(rel) || shape->natts != desc->natts)
		return false;
	for (int i = 0; i < shape->ncolumns; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, shape->attnums[i] - 1);

		if (att->attisdropped || strcmp(NameStr(att->attname), shape->columns[i]) != 0)
			return false;
	}
	return true;
}

/*
 * Insert one row into saga.<shape->table> (relid), values and nulls in the
 * order of shape->columns. The caller runs as the extension's owner and has
 * refused a read-only transaction (PreventCommandIfReadOnly), naming the
 * API function the user called.
 */
void
saga_insert_row(SagaRowShape *shape, Oid relid, const Datum *values, const bool *nulls)
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;

	rel = table_open(relid, RowExclusiveLock);
	if (has_insert_triggers(rel))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("table saga.%s has insert triggers", shape->table),
				 errdetail("saga writes this internal table without firing triggers."),
				 errhint("Drop the insert triggers on saga.%s.", shape->table)));
	if (shape->attnums == NULL)
		register_shape(shape);
	if (!shape_matches(shape, rel))
		resolve_shape(shape, rel);
	if (!shape->indexes_valid || shape->nindexes < 0)
		describe_indexes(shape, rel);

	estate = CreateExecutorState();
	slot = ExecInitExtraTupleSlot(estate, RelationGetDescr(rel), &TTSOpsVirtual);
	ExecClearTuple(slot);
	memset(slot->tts_isnull, true, sizeof(bool) * shape->natts);
	for (int i = 0; i < shape->ncolumns; i++)
	{
		slot->tts_values[shape->attnums[i] - 1] = values[i];
		slot->tts_isnull[shape->attnums[i] - 1] = nulls[i];
	}
	ExecStoreVirtualTuple(slot);

	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 1, NULL, 0);
	open_indexes(shape, rri);
	table_tuple_insert(rel, slot, GetCurrentCommandId(true), 0, NULL);
	if (rri->ri_NumIndices > 0)
		list_free(SagaExecInsertIndexTuples(rri, slot, estate));
	ExecCloseIndices(rri);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
}
