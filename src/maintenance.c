/*
 * maintenance.c
 *		saga.purge() and the pg_cron job that runs it:
 *		saga.schedule_maintenance() and saga.unschedule_maintenance().
 *
 * These are administrators' functions (not executable by PUBLIC). Each
 * checks its arguments as the caller, then works as the extension's owner
 * with search_path pinned, like the other functions in api.c.
 *
 * The pg_cron job belongs to the extension's owner, whoever schedules it:
 * it then runs with the rights purge needs however the administrators'
 * grants change, and there is one job per database, which scheduling again
 * replaces (pg_cron keys named jobs by name and role, and updates the
 * schedule and command of an existing one).
 */
#include "saga.h"
#include "api.h"

#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

/* rows per DELETE statement: a large purge never builds one huge statement */
#define PURGE_BATCH_SIZE	10000

/* what the job runs, every statement qualified */
#define MAINTENANCE_COMMAND	"SELECT saga._sweep_deadlines(), saga.purge()"

PG_FUNCTION_INFO_V1(saga_purge);
PG_FUNCTION_INFO_V1(saga_schedule_maintenance);
PG_FUNCTION_INFO_V1(saga_unschedule_maintenance);

/*
 * Deletes, in the caller's transaction, completed and compensated sagas with
 * their steps, invocations and messages kept after a NOTIFY, all older than
 * older_than; returns how many rows. The work is saga._purge().
 */
Datum
saga_purge(PG_FUNCTION_ARGS)
{
	Interval   *older_than;
	Interval	zero = {0};
	SagaOwnerContext oc;
	Oid			types[2] = {INTERVALOID, INT4OID};
	Datum		values[2];
	bool		isnull;
	int64		deleted;

	saga_require_arg(fcinfo, 0, "older_than");
	older_than = PG_GETARG_INTERVAL_P(0);
	if (DatumGetBool(DirectFunctionCall2(interval_lt, IntervalPGetDatum(older_than),
										 IntervalPGetDatum(&zero))))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("older_than must not be negative"),
				 errdetail("older_than is %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(older_than)))),
				 errhint("Rows whose last activity is older than now() - older_than are deleted.")));
	values[0] = IntervalPGetDatum(older_than);
	values[1] = Int32GetDatum(PURGE_BATCH_SIZE);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT saga._purge($1, $2)", 2, types, values, NULL, false);
	deleted = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	saga_end_as_owner(&oc);
	PG_RETURN_INT64(isnull ? 0 : deleted);
}

/* The job's name: one per database, clipped as pg_cron's name column would. */
static char *
maintenance_job_name(void)
{
	char	   *name = psprintf("saga maintenance (%s)", get_database_name(MyDatabaseId));
	int			len = strlen(name);

	if (len >= NAMEDATALEN)
		name[pg_mbcliplen(name, len, NAMEDATALEN - 1)] = '\0';
	return name;
}

/*
 * pg_cron keeps its jobs in one database (cron.database_name), where it is
 * installed; a job can be scheduled from this database only if that is this
 * database. Returns false, or raises an error when required, if not.
 */
static bool
pg_cron_here(bool required)
{
	char	   *db = get_database_name(MyDatabaseId);
	const char *cron_db;

	if (!OidIsValid(get_extension_oid("pg_cron", true)))
	{
		if (!required)
			return false;
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_cron is not installed in database \"%s\"", db),
				 errdetail("saga.schedule_maintenance() registers its job with pg_cron."),
				 errhint("Add pg_cron to shared_preload_libraries, set cron.database_name = '%s', "
						 "restart the server and run CREATE EXTENSION pg_cron here. "
						 "Where pg_cron runs in another database, schedule \"%s\" from there "
						 "with cron.schedule_in_database().",
						 db, MAINTENANCE_COMMAND)));
	}
	cron_db = GetConfigOption("cron.database_name", true, false);
	if (cron_db != NULL && strcmp(cron_db, db) != 0)
	{
		if (!required)
			return false;
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_cron runs jobs from database \"%s\", not \"%s\"", cron_db, db),
				 errhint("Set cron.database_name = '%s', or schedule \"%s\" from database \"%s\" "
						 "with cron.schedule_in_database().",
						 db, MAINTENANCE_COMMAND, cron_db)));
	}
	return true;
}

/*
 * Registers the maintenance job of this database with pg_cron, or changes
 * its schedule; returns the job id. pg_cron checks the schedule.
 */
Datum
saga_schedule_maintenance(PG_FUNCTION_ARGS)
{
	SagaOwnerContext oc;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3];
	bool		isnull;
	int64		jobid;

	saga_require_arg(fcinfo, 0, "schedule");
	(void) pg_cron_here(true);
	values[0] = CStringGetTextDatum(maintenance_job_name());
	values[1] = PG_GETARG_DATUM(0);
	values[2] = CStringGetTextDatum(MAINTENANCE_COMMAND);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT cron.schedule($1, $2, $3)", 3, types, values, NULL, false);
	jobid = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	saga_end_as_owner(&oc);
	if (isnull)
		elog(ERROR, "cron.schedule returned no job id");
	PG_RETURN_INT64(jobid);
}

/*
 * Removes the maintenance job of this database; false if there was none
 * (or no pg_cron to have one).
 */
Datum
saga_unschedule_maintenance(PG_FUNCTION_ARGS)
{
	SagaOwnerContext oc;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		removed;

	if (!pg_cron_here(false))
		PG_RETURN_BOOL(false);
	values[0] = CStringGetTextDatum(maintenance_job_name());

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT cron.unschedule(j.jobid) FROM cron.job j"
				 " WHERE j.jobname = $1::name AND j.username = current_user::text",
				 1, types, values, NULL, false);
	removed = SPI_processed > 0;
	saga_end_as_owner(&oc);
	PG_RETURN_BOOL(removed);
}
