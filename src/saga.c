/*
 * saga.c
 *		Module entry point: GUCs, shared memory, hooks and the launcher.
 */
#include "saga.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "tcop/utility.h"
#include "utils/acl.h"

#include <curl/curl.h>

PG_MODULE_MAGIC;

void		_PG_init(void);

#if PG_VERSION_NUM >= 150000
static shmem_request_hook_type prev_shmem_request_hook = NULL;
#endif
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;

#if PG_VERSION_NUM >= 150000
static void
saga_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	saga_shmem_request();
}
#endif

static void
saga_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	saga_shmem_startup();
}

/*
 * Only a role that owns the database (or a superuser) may make its worker
 * step aside; anyone else's DROP or CREATE DATABASE will fail anyway.
 */
static bool
may_stop_worker(Oid dboid)
{
	if (!OidIsValid(dboid))
		return false;
#if PG_VERSION_NUM >= 160000
	return object_ownercheck(DatabaseRelationId, dboid, GetUserId());
#else
	return pg_database_ownercheck(dboid, GetUserId());
#endif
}

/* The database named by CREATE DATABASE's TEMPLATE option, if any. */
static Oid
createdb_template(CreatedbStmt *stmt)
{
	ListCell   *lc;

	foreach(lc, stmt->options)
	{
		DefElem    *opt = lfirst(lc);

		if (strcmp(opt->defname, "template") == 0 && opt->arg != NULL)
			return get_database_oid(defGetString(opt), true);
	}
	return InvalidOid;
}

/*
 * Some utility commands need the runtime's help: CREATE EXTENSION saga should
 * get its database a worker at once, COMMIT PREPARED may have published, and
 * DROP DATABASE or CREATE DATABASE ... TEMPLATE must not fail because our
 * worker is connected to that database.
 */
static void
saga_process_utility(PlannedStmt *pstmt, const char *queryString,
					 bool readOnlyTree, ProcessUtilityContext context,
					 ParamListInfo params, QueryEnvironment *queryEnv,
					 DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, CreateExtensionStmt) &&
		strcmp(((CreateExtensionStmt *) parsetree)->extname, "saga") == 0)
		saga_wake_launcher_at_commit();
	else if (IsA(parsetree, TransactionStmt) &&
			 ((TransactionStmt *) parsetree)->kind == TRANS_STMT_COMMIT_PREPARED)
		saga_wake_at_commit(0);	/* it may have published */
	else if (IsA(parsetree, DropdbStmt))
	{
		Oid			dboid = get_database_oid(((DropdbStmt *) parsetree)->dbname, true);

		if (may_stop_worker(dboid))
			saga_stop_worker_for_database(dboid);
	}
	else if (IsA(parsetree, CreatedbStmt))
	{
		Oid			dboid = createdb_template((CreatedbStmt *) parsetree);

		if (may_stop_worker(dboid))
			saga_stop_worker_for_database(dboid);
	}

	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
								  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

void
_PG_init(void)
{
	saga_define_gucs();

	/* libcurl's global state must be set up before any thread exists */
	if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
		elog(ERROR, "could not initialize libcurl");

	if (!process_shared_preload_libraries_in_progress)
		return;

#if PG_VERSION_NUM >= 150000
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = saga_shmem_request_hook;
#else
	saga_shmem_request();
#endif
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = saga_shmem_startup_hook;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = saga_process_utility;

	saga_register_launcher();
}
