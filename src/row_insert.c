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
 */
#include "saga.h"
#include "compat.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "parser/parse_relation.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

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
		shape->attnums = MemoryContextAlloc(TopMemoryContext, sizeof(AttrNumber) * shape->ncolumns);
	if (!shape_matches(shape, rel))
		resolve_shape(shape, rel);

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
	ExecOpenIndices(rri, false);
	table_tuple_insert(rel, slot, GetCurrentCommandId(true), 0, NULL);
	if (rri->ri_NumIndices > 0)
		list_free(SagaExecInsertIndexTuples(rri, slot, estate));
	ExecCloseIndices(rri);
	ExecResetTupleTable(estate->es_tupleTable, false);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
}
