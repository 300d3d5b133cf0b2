/*
 * guc.c
 *		Every saga.* configuration setting.
 */
#include "saga.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "compat.h"

char	   *saga_databases = NULL;
int			saga_poll_interval_ms = 1000;
int			saga_batch_size = 500;
int			saga_max_databases = 16;
int			saga_max_payload_size = 1024 * 1024;
int			saga_message_retention_s = 3600;

void
saga_define_gucs(void)
{
	DefineCustomStringVariable("saga.databases",
							   "Databases the launcher may start a worker in.",
							   "A comma-separated list of database names. Empty means every database that has the extension.",
							   &saga_databases,
							   "",
							   PGC_SIGHUP,
							   GUC_LIST_INPUT,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("saga.poll_interval",
							"Longest time a worker sleeps before looking for due work.",
							"Commits wake the worker at once; this timer only covers retries, delayed messages and missed wake-ups.",
							&saga_poll_interval_ms,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("saga.batch_size",
							"Messages a worker claims in one transaction.",
							NULL,
							&saga_batch_size,
							500, 1, 100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	/* a postmaster setting can only be defined while preloading */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("saga.max_databases",
								"Most databases that can have a saga worker at the same time.",
								"Each worker also needs one of max_worker_processes.",
								&saga_max_databases,
								16, 1, 1024,
								PGC_POSTMASTER,
								0,
								NULL, NULL, NULL);

	DefineCustomIntVariable("saga.max_payload_size",
							"Largest payload saga.publish accepts.",
							NULL,
							&saga_max_payload_size,
							1024 * 1024, 1024, 256 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("saga.message_retention",
							"How long a message delivered to NOTIFY without its payload stays readable with saga.message().",
							NULL,
							&saga_message_retention_s,
							3600, 1, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("saga");
}
