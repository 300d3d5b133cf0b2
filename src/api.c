/*
 * api.c
 *		SQL-callable functions: argument checks, then SQL on the extension's
 *		tables as the extension's owner.
 *
 * Roles get EXECUTE on functions, never privileges on the tables; a function
 * that may be called checks its arguments and then switches to the owner
 * (as pg_cron does) instead of being SECURITY DEFINER.
 */
#include "saga.h"
#include "api.h"
#include "outbox.h"

#include <ctype.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/sequence.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "storage/lmgr.h"
#include "tcop/utility.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/uuid.h"

#include <curl/curl.h>

#include "libpq-fe.h"

#define MAX_NAME_BYTES		63
#define MAX_TOPIC_BYTES		200
#define MAX_KEY_BYTES		512
#define MAX_HEADERS_BYTES	2048

PG_FUNCTION_INFO_V1(saga_create_destination);
PG_FUNCTION_INFO_V1(saga_drop_destination);
PG_FUNCTION_INFO_V1(saga_publish);
PG_FUNCTION_INFO_V1(saga_subscribe);
PG_FUNCTION_INFO_V1(saga_unsubscribe);
PG_FUNCTION_INFO_V1(saga_config_changed);
PG_FUNCTION_INFO_V1(saga_message);
PG_FUNCTION_INFO_V1(saga_redeliver);
PG_FUNCTION_INFO_V1(saga_metrics);
PG_FUNCTION_INFO_V1(saga_worker_status);

/* ---------- waking the worker when the caller commits ---------- */

static bool xact_callback_registered = false;
static bool wake_worker_pending = false;
static bool wake_launcher_pending = false;
static bool config_changed_pending = false;

/* messages published, per transaction nesting level, not yet committed */
static int *published_at_level = NULL;
static int	published_levels = 0;

static void
reset_pending(void)
{
	wake_worker_pending = false;
	wake_launcher_pending = false;
	config_changed_pending = false;
	if (published_at_level)
		memset(published_at_level, 0, sizeof(int) * published_levels);
}

static void
saga_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (config_changed_pending && saga_shared != NULL)
				pg_atomic_fetch_add_u64(&saga_shared->config_version, 1);
			if (wake_launcher_pending)
				saga_wake_launcher(true);
			if (wake_worker_pending)
			{
				SagaWorkerSlot *slot = saga_slot_for_database(MyDatabaseId);
				int			published = 0;

				for (int i = 0; i < published_levels; i++)
					published += published_at_level[i];
				if (slot != NULL && published > 0)
					pg_atomic_fetch_add_u64(&slot->published, published);
				saga_wake_worker(MyDatabaseId);
			}
			reset_pending();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			reset_pending();
			break;
		default:
			break;
	}
}

/* Publishes in a rolled-back savepoint are not counted. */
static void
saga_subxact_callback(SubXactEvent event, SubTransactionId sub, SubTransactionId parent, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();

	if (level <= 0 || level >= published_levels)
		return;
	if (event == SUBXACT_EVENT_COMMIT_SUB)
		published_at_level[level - 1] += published_at_level[level];
	if (event == SUBXACT_EVENT_COMMIT_SUB || event == SUBXACT_EVENT_ABORT_SUB)
		published_at_level[level] = 0;
}

static void
register_callback(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(saga_xact_callback, NULL);
		RegisterSubXactCallback(saga_subxact_callback, NULL);
		xact_callback_registered = true;
	}
}

/*
 * Ask for the worker's latch to be set when the current transaction commits.
 * Only a latch: the user's transaction never NOTIFYs or takes a global lock.
 */
void
saga_wake_at_commit(int published)
{
	int			level = GetCurrentTransactionNestLevel();

	register_callback();
	wake_worker_pending = true;
	if (published == 0)
		return;
	if (level >= published_levels)
	{
		int			n = Max(level + 1, 2 * published_levels);

		if (published_at_level == NULL)
			published_at_level = MemoryContextAllocZero(TopMemoryContext, sizeof(int) * n);
		else
		{
			published_at_level = repalloc(published_at_level, sizeof(int) * n);
			memset(published_at_level + published_levels, 0, sizeof(int) * (n - published_levels));
		}
		published_levels = n;
	}
	published_at_level[level] += published;
}

void
saga_wake_launcher_at_commit(void)
{
	register_callback();
	wake_launcher_pending = true;
}

/* Has this transaction changed what backends keep copies of? */
bool
saga_config_changed_in_xact(void)
{
	return config_changed_pending;
}

/* Workers reread their destinations when this transaction commits. */
void
saga_config_changed_at_commit(void)
{
	register_callback();
	config_changed_pending = true;
	wake_worker_pending = true;
}

/* ---------- running SQL as the extension's owner ---------- */

/*
 * The extension's owner, read as the owner of saga.queue: every lookup on the
 * way is a syscache hit, which matters on the publish path.
 */
static Oid
extension_owner(void)
{
	Oid			nsp = get_namespace_oid("saga", true);
	Oid			rel = OidIsValid(nsp) ? get_relname_relid("queue", nsp) : InvalidOid;
	HeapTuple	tup;
	Oid			owner;

	if (!OidIsValid(rel))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"saga\" is not installed correctly: table saga.queue is missing")));
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(rel));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", rel);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * Become the extension's owner and connect SPI. Errors need no cleanup: the
 * (sub)transaction abort restores the user, the settings and SPI. With
 * pin_search_path, also set a search_path the caller cannot influence; only
 * SQL that qualifies every name (publish, on the hot path) may do without.
 */
void
saga_begin_as_owner(SagaOwnerContext *oc, bool pin_search_path)
{
	Oid			owner = extension_owner();

	oc->guc_level = -1;
	if (pin_search_path)
	{
		oc->guc_level = NewGUCNestLevel();
		(void) set_config_option("search_path", "pg_catalog, pg_temp",
								 PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	}
	GetUserIdAndSecContext(&oc->saved_user, &oc->saved_sec);
	SetUserIdAndSecContext(owner, oc->saved_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

void
saga_end_as_owner(SagaOwnerContext *oc)
{
	SPI_finish();
	SetUserIdAndSecContext(oc->saved_user, oc->saved_sec);
	if (oc->guc_level >= 0)
		AtEOXact_GUC(true, oc->guc_level);
}

int
saga_run_sql(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls, bool read_only)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, read_only, 0);

	if (rc < 0)
		elog(ERROR, "saga: SPI failed (%s) for: %s", SPI_result_code_string(rc), sql);
	return rc;
}

/* ---------- argument checks ---------- */

void
saga_require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
}

static void
check_name(const char *what, const char *name)
{
	size_t		len = strlen(name);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	if (len > MAX_NAME_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("%s \"%.*s...\" is too long", what, 20, name),
				 errdetail("A %s has at most %d bytes.", what, MAX_NAME_BYTES)));
	for (const char *p = name; *p; p++)
		if (!(isalnum((unsigned char) *p) || *p == '_' || *p == '-' || *p == '.'))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s \"%s\" contains an invalid character", what, name),
					 errdetail("Use letters, digits, \"_\", \"-\" and \".\".")));
}

/*
 * A topic: printable, without spaces, at most MAX_TOPIC_BYTES. A pattern
 * (for subscribe) may end in "*" to match every topic with that prefix.
 */
static void
check_topic(const char *topic, bool pattern)
{
	size_t		len = strlen(topic);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topic must not be empty")));
	if (len > MAX_TOPIC_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("topic is too long (%zu bytes)", len),
				 errdetail("A topic has at most %d bytes.", MAX_TOPIC_BYTES)));
	for (const char *p = topic; *p; p++)
	{
		if ((unsigned char) *p <= ' ' || *p == 0x7F)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("topic \"%s\" contains a space or control character", topic)));
		if (*p == '*' && (!pattern || p[1] != '\0'))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("topic \"%s\" has \"*\" in the wrong place", topic),
					 errdetail(pattern ? "\"*\" may only end a subscription pattern, as in \"order.*\"." :
							   "Published topics cannot contain \"*\"; it is for subscription patterns.")));
	}
}

static bool
header_name_valid(const char *name)
{
	if (*name == '\0')
		return false;
	for (const char *p = name; *p; p++)
		if (!(isalnum((unsigned char) *p) || strchr("!#$%&'*+-.^_`|~", *p) != NULL))
			return false;
	return true;
}

static bool
header_name_reserved(const char *name)
{
	static const char *const reserved[] = {
		"content-type", "content-length", "idempotency-key", "saga-topic", "host",
		"transfer-encoding", "connection", "expect", NULL
	};

	for (int i = 0; reserved[i]; i++)
		if (pg_strcasecmp(name, reserved[i]) == 0)
			return true;
	return false;
}

/* HTTP headers given as a JSON object of strings. */
static void
check_headers(Jsonb *headers, const char *where)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *name = NULL;

	if (!JB_ROOT_IS_OBJECT(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON object of header names and string values", where)));
	if (VARSIZE(headers) > MAX_HEADERS_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s are too large", where),
				 errdetail("Headers take at most %d bytes.", MAX_HEADERS_BYTES)));

	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			name = pnstrdup(v.val.string.val, v.val.string.len);
			if (!header_name_valid(name))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid header name \"%s\" in %s", name, where)));
			if (header_name_reserved(name))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("header \"%s\" in %s is set by saga and cannot be overridden", name, where)));
		}
		else if (tok == WJB_VALUE)
		{
			if (v.type != jbvString)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("header \"%s\" in %s must have a string value", name, where)));
			if (v.val.string.len == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("header \"%s\" in %s has an empty value", name, where)));
			for (int i = 0; i < v.val.string.len; i++)
				if ((unsigned char) v.val.string.val[i] < 0x20 && v.val.string.val[i] != '\t')
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("header \"%s\" in %s contains a line break or control character", name, where)));
		}
	}
}

/* ---------- destinations ---------- */

typedef struct DestinationOptions
{
	Jsonb	   *headers;
	int64		timeout_ms;
	int64		max_attempts;
	int64		backoff_ms;
	int64		max_backoff_ms;
	int64		concurrency;
} DestinationOptions;

static char *
jsonb_value_text(JsonbValue *v)
{
	if (v->type == jbvString)
		return psprintf("the string \"%s\"", pnstrdup(v->val.string.val, v->val.string.len));
	if (v->type == jbvNumeric)
		return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	return pstrdup(v->type == jbvBool ? "boolean" : v->type == jbvNull ? "null" : "a container");
}

typedef struct OptionErrorContext
{
	const char *dest;
	const char *opt;
} OptionErrorContext;

static void
option_error_callback(void *arg)
{
	OptionErrorContext *c = (OptionErrorContext *) arg;

	errcontext("option \"%s\" of destination \"%s\"", c->opt, c->dest);
}

/* A duration: an interval string ("10s", "5 min") or a number of seconds. */
static int64
option_duration_ms(const char *dest, const char *opt, JsonbValue *v)
{
	double		ms = -1;

	if (v->type == jbvNumeric)
		ms = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric))) * 1000.0;
	else if (v->type == jbvString)
	{
		OptionErrorContext c = {dest, opt};
		ErrorContextCallback cb;
		Interval   *iv;

		cb.callback = option_error_callback;
		cb.arg = &c;
		cb.previous = error_context_stack;
		error_context_stack = &cb;
		iv = DatumGetIntervalP(DirectFunctionCall3(interval_in,
												   CStringGetDatum(pnstrdup(v->val.string.val, v->val.string.len)),
												   ObjectIdGetDatum(InvalidOid),
												   Int32GetDatum(-1)));
		error_context_stack = cb.previous;
		ms = iv->time / 1000.0 + (iv->day + iv->month * 30.0) * 86400000.0;
	}
	if (ms <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" of destination \"%s\" must be a positive duration, not %s",
						opt, dest, jsonb_value_text(v)),
				 errhint("Give an interval such as \"10s\" or \"5 min\", or a number of seconds.")));
	if (ms > 86400000.0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" of destination \"%s\" must be at most one day", opt, dest)));
	return (int64) Max(ms, 1);
}

static int64
option_integer(const char *dest, const char *opt, JsonbValue *v, int64 min, int64 max)
{
	double		d = -1;

	if (v->type == jbvNumeric)
		d = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric)));
	if (v->type != jbvNumeric || d < min || d > max || d != (double) (int64) d)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" of destination \"%s\" must be an integer from " INT64_FORMAT " to " INT64_FORMAT ", not %s",
						opt, dest, min, max, jsonb_value_text(v))));
	return (int64) d;
}

static void
parse_destination_options(const char *dest, Jsonb *options, const char *kind, DestinationOptions *o)
{
	bool		http = strcmp(kind, "http") == 0;

	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *key = NULL;

	o->headers = NULL;
	o->timeout_ms = 10000;
	o->max_attempts = 10;
	o->backoff_ms = 1000;
	o->max_backoff_ms = 300000;
	/* a connection to a database carries many messages per statement */
	o->concurrency = strcmp(kind, "postgresql") == 0 ? 4 : 16;

	if (!JB_ROOT_IS_OBJECT(options) || JB_ROOT_IS_SCALAR(options))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options of destination \"%s\" must be a JSON object", dest)));

	it = JsonbIteratorInit(&options->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			continue;
		}
		if (tok != WJB_VALUE)
			continue;
		if (strcmp(key, "headers") == 0)
		{
			if (!http)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("option \"headers\" of destination \"%s\" applies only to HTTP destinations", dest)));
			if (v.type != jbvBinary)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("option \"headers\" of destination \"%s\" must be a JSON object", dest)));
			o->headers = JsonbValueToJsonb(&v);
			check_headers(o->headers, "destination headers");
		}
		else if (strcmp(key, "timeout") == 0)
			o->timeout_ms = option_duration_ms(dest, key, &v);
		else if (strcmp(key, "backoff") == 0)
			o->backoff_ms = option_duration_ms(dest, key, &v);
		else if (strcmp(key, "max_backoff") == 0)
			o->max_backoff_ms = option_duration_ms(dest, key, &v);
		else if (strcmp(key, "max_attempts") == 0)
			o->max_attempts = option_integer(dest, key, &v, 1, 1000);
		else if (strcmp(key, "concurrency") == 0)
			o->concurrency = option_integer(dest, key, &v, 1, 1000);
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown option \"%s\" for destination \"%s\"", key, dest),
					 errhint("Valid options are headers, timeout, max_attempts, backoff, max_backoff and concurrency.")));
	}
	if (o->backoff_ms > o->max_backoff_ms)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"backoff\" of destination \"%s\" is longer than \"max_backoff\"", dest)));
}

/*
 * libcurl reads "http:/x" and "http:///x" as host "x", and "http://h:/" as
 * port 80: a destination must spell out its host, and its port if it has a
 * colon.
 */
static bool
url_has_authority(const char *url)
{
	const char *p = strstr(url, "://");
	size_t		n;

	if (p == NULL)
		return false;
	p += 3;
	n = strcspn(p, "/?#");
	return n > 0 && p[n - 1] != ':' && p[n - 1] != '@';
}

/* Check an http(s) URL with libcurl's own parser. */
static void
check_http_url(const char *url)
{
	CURLU	   *u = curl_url();
	CURLUcode	rc;
	char	   *scheme = NULL;
	char	   *host = NULL;
	bool		ok;

	if (u == NULL)
		elog(ERROR, "out of memory in curl_url");
	rc = curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME);
	if (rc != CURLUE_OK)
	{
		curl_url_cleanup(u);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid destination URL \"%s\"", url),
				 errdetail("%s.", curl_url_strerror(rc))));
	}
	curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
	curl_url_get(u, CURLUPART_HOST, &host, 0);
	ok = scheme && host && host[0] != '\0';
	if (!ok || (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) ||
		!url_has_authority(url))
	{
		curl_free(scheme);
		curl_free(host);
		curl_url_cleanup(u);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid destination URL \"%s\"", url),
				 errdetail("A destination URL is notify:<channel>, http://host/..., https://host/... or postgresql://...")));
	}
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
}

static bool
is_postgresql_url(const char *url)
{
	return strncmp(url, "postgresql://", 13) == 0 || strncmp(url, "postgres://", 11) == 0;
}

/* The URL with the password of its user info, if any, replaced by "***". */
static char *
url_without_password(const char *url)
{
	const char *start = strstr(url, "://") + 3;
	size_t		authority = strcspn(start, "/?");
	const char *at = NULL;
	const char *colon;

	for (const char *p = start; p < start + authority; p++)
		if (*p == '@')
			at = p;
	if (at == NULL)
		return pstrdup(url);
	colon = memchr(start, ':', at - start);
	if (colon == NULL)
		return pstrdup(url);
	return psprintf("%.*s***%s", (int) (colon + 1 - url), url, at);
}

/* s with every occurrence of from replaced by to */
static char *
replace_all(const char *s, const char *from, const char *to)
{
	StringInfoData buf;
	const char *p;

	initStringInfo(&buf);
	while ((p = strstr(s, from)) != NULL)
	{
		appendBinaryStringInfo(&buf, s, p - s);
		appendStringInfoString(&buf, to);
		s = p + strlen(from);
	}
	appendStringInfoString(&buf, s);
	return buf.data;
}

/*
 * Check a postgresql:// URL with libpq's own parser. The URL may hold a
 * password: errors do not show it.
 */
static void
check_postgresql_url(const char *url)
{
	char	   *error = NULL;
	PQconninfoOption *options = PQconninfoParse(url, &error);

	if (options == NULL)
	{
		char	   *detail = error ? pstrdup(error) : pstrdup("out of memory");
		int			len = strlen(detail);

		if (error)
			PQfreemem(error);
		while (len > 0 && detail[len - 1] == '\n')
			detail[--len] = '\0';
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid postgresql destination URL"),
				 errdetail("%s", replace_all(detail, url, url_without_password(url)))));
	}
	PQconninfoFree(options);
}

Datum
saga_create_destination(PG_FUNCTION_ARGS)
{
	char	   *name;
	char	   *url;
	Jsonb	   *options;
	const char *kind;
	const char *target;
	DestinationOptions o;
	SagaOwnerContext oc;
	Oid			types[9] = {TEXTOID, TEXTOID, TEXTOID, JSONBOID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID};
	Datum		values[9];
	char		nulls[9] = "         ";

	saga_require_arg(fcinfo, 0, "destination name");
	saga_require_arg(fcinfo, 1, "destination URL");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	url = text_to_cstring(PG_GETARG_TEXT_PP(1));
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	check_name("destination name", name);

	if (strncmp(url, "notify:", 7) == 0)
	{
		kind = "notify";
		target = url + 7;
		if (target[0] == '\0' || strlen(target) >= NAMEDATALEN)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid NOTIFY channel in destination URL \"%s\"", url),
					 errdetail("A channel name has 1 to %d bytes.", NAMEDATALEN - 1)));
	}
	else if (is_postgresql_url(url))
	{
		check_postgresql_url(url);
		kind = "postgresql";
		target = url;
	}
	else
	{
		check_http_url(url);
		kind = "http";
		target = url;
	}
	if (options == NULL)
		options = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	parse_destination_options(name, options, kind, &o);

	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(kind);
	values[2] = CStringGetTextDatum(target);
	values[3] = o.headers ? JsonbPGetDatum(o.headers) :
		DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	values[4] = Int64GetDatum(o.timeout_ms);
	values[5] = Int64GetDatum(o.max_attempts);
	values[6] = Int64GetDatum(o.backoff_ms);
	values[7] = Int64GetDatum(o.max_backoff_ms);
	values[8] = Int64GetDatum(o.concurrency);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT 1 FROM saga.destinations WHERE name = $1", 1, types, values, nulls, true);
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("destination \"%s\" already exists", name),
				 errhint("Drop it first with saga.drop_destination() to change it.")));
	saga_run_sql("INSERT INTO saga.destinations (name, kind, target, headers, timeout, max_attempts,"
			" backoff, max_backoff, concurrency) VALUES ($1, $2, $3, $4,"
			" $5 * interval '1 millisecond', $6, $7 * interval '1 millisecond',"
			" $8 * interval '1 millisecond', $9)",
			9, types, values, nulls, false);
	saga_end_as_owner(&oc);
	saga_config_changed_at_commit();
	PG_RETURN_VOID();
}

static void
require_destination(const char *name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(name)};

	saga_run_sql("SELECT 1 FROM saga.destinations WHERE name = $1", 1, types, values, NULL, true);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("destination \"%s\" does not exist", name)));
}

Datum
saga_drop_destination(PG_FUNCTION_ARGS)
{
	char	   *name;
	SagaOwnerContext oc;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	int64		pending;
	bool		isnull;

	saga_require_arg(fcinfo, 0, "destination name");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	values[0] = CStringGetTextDatum(name);

	saga_begin_as_owner(&oc, true);
	/* lock the row so no concurrent subscribe slips in */
	saga_run_sql("SELECT 1 FROM saga.destinations WHERE name = $1 FOR UPDATE", 1, types, values, NULL, false);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("destination \"%s\" does not exist", name)));
	/*
	 * Stop routing to it, then wait for transactions that may already have
	 * routed a message to it (they hold RowExclusiveLock on the queue) before
	 * counting what is pending: an uncommitted publish must not be stranded.
	 */
	saga_run_sql("DELETE FROM saga.subscriptions WHERE destination = $1", 1, types, values, NULL, false);
	saga_run_sql("LOCK TABLE saga.queue IN SHARE ROW EXCLUSIVE MODE", 0, NULL, NULL, NULL, false);
	saga_run_sql("SELECT count(*) FROM saga.queue WHERE destination = $1 AND status = 'pending'",
			1, types, values, NULL, false);
	pending = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (pending > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg_plural("destination \"%s\" still has " INT64_FORMAT " undelivered message",
							   "destination \"%s\" still has " INT64_FORMAT " undelivered messages",
							   pending, name, pending),
				 errhint("Unsubscribe its topics and wait until saga.outbox shows nothing for it.")));
	saga_run_sql("DELETE FROM saga.destinations WHERE name = $1", 1, types, values, NULL, false);
	saga_end_as_owner(&oc);
	saga_config_changed_at_commit();
	PG_RETURN_VOID();
}

/* ---------- subscriptions ---------- */

/*
 * Statement trigger on saga.subscriptions, saga.handlers and
 * saga.definitions: however they change (the API, plain SQL, pg_restore),
 * backends reread their copies after commit.
 */
Datum
saga_config_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("saga.config_changed() must be called as a trigger")));
	saga_config_changed_at_commit();
	PG_RETURN_POINTER(NULL);
}

Datum
saga_subscribe(PG_FUNCTION_ARGS)
{
	char	   *topic;
	char	   *dest;
	char	   *prefix = NULL;
	size_t		len;
	SagaOwnerContext oc;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = "   ";

	saga_require_arg(fcinfo, 0, "topic");
	saga_require_arg(fcinfo, 1, "destination name");
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	dest = text_to_cstring(PG_GETARG_TEXT_PP(1));
	check_topic(topic, true);

	len = strlen(topic);
	if (topic[len - 1] == '*')
		prefix = pnstrdup(topic, len - 1);
	values[0] = CStringGetTextDatum(topic);
	values[1] = CStringGetTextDatum(dest);
	values[2] = prefix ? CStringGetTextDatum(prefix) : (Datum) 0;
	nulls[2] = prefix ? ' ' : 'n';

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT 1 FROM saga.destinations WHERE name = $1 FOR KEY SHARE", 1, types + 1, values + 1, NULL, false);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("destination \"%s\" does not exist", dest)));
	saga_run_sql("INSERT INTO saga.subscriptions (pattern, destination, prefix) VALUES ($1, $2, $3)"
			" ON CONFLICT DO NOTHING", 3, types, values, nulls, false);
	if (SPI_processed == 0)
		ereport(NOTICE,
				(errmsg("topic \"%s\" is already subscribed to destination \"%s\", skipping", topic, dest)));
	saga_end_as_owner(&oc);
	PG_RETURN_VOID();
}

Datum
saga_unsubscribe(PG_FUNCTION_ARGS)
{
	char	   *topic;
	char	   *dest;
	SagaOwnerContext oc;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	saga_require_arg(fcinfo, 0, "topic");
	saga_require_arg(fcinfo, 1, "destination name");
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	dest = text_to_cstring(PG_GETARG_TEXT_PP(1));
	values[0] = CStringGetTextDatum(topic);
	values[1] = CStringGetTextDatum(dest);

	saga_begin_as_owner(&oc, true);
	require_destination(dest);
	saga_run_sql("DELETE FROM saga.subscriptions WHERE pattern = $1 AND destination = $2",
			2, types, values, NULL, false);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("topic \"%s\" is not subscribed to destination \"%s\"", topic, dest)));
	saga_end_as_owner(&oc);
	PG_RETURN_VOID();
}

/* ---------- publishing ---------- */

/*
 * The arguments saga.publish and saga.receive share, checked: topic (0),
 * payload (1), key (2) and headers (3); key and headers may be NULL.
 */
void
saga_check_message(FunctionCallInfo fcinfo, char **topic, Jsonb **payload, text **key,
				   Jsonb **headers)
{
	saga_require_arg(fcinfo, 0, "topic");
	saga_require_arg(fcinfo, 1, "payload");
	*topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	check_topic(*topic, false);
	*payload = PG_GETARG_JSONB_P(1);
	if (VARSIZE(*payload) > (Size) saga_max_payload_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large (%zu bytes)", (size_t) VARSIZE(*payload)),
				 errdetail("saga.max_payload_size is %d bytes.", saga_max_payload_size)));
	*key = NULL;
	if (!PG_ARGISNULL(2))
	{
		*key = PG_GETARG_TEXT_PP(2);
		if (VARSIZE_ANY_EXHDR(*key) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("key must not be empty"),
					 errhint("Pass NULL for a message without a key.")));
		if (VARSIZE_ANY_EXHDR(*key) > MAX_KEY_BYTES)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("key is too long (%zu bytes)", (size_t) VARSIZE_ANY_EXHDR(*key)),
					 errdetail("A key has at most %d bytes.", MAX_KEY_BYTES)));
	}
	*headers = NULL;
	if (!PG_ARGISNULL(3))
	{
		*headers = PG_GETARG_JSONB_P(3);
		check_headers(*headers, "message headers");
	}
}

/* A topic or topic pattern ("order.*", "*") as saga.subscribe takes it. */
void
saga_check_topic_pattern(const char *pattern)
{
	check_topic(pattern, true);
}

/*
 * A message published here that this database's own handlers take: it goes
 * straight into the inbox, in the publishing transaction, without a
 * network hop (source NULL). values and nulls are publish's parameters: id,
 * destination (unused), topic, key, payload, headers, deliver_at.
 */
static void
receive_locally(Datum *values, char *nulls)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[6];
	char		argnulls[6];
	int			rc;

	if (plan == NULL)
	{
		Oid			types[6] = {UUIDOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, TIMESTAMPTZOID};

		plan = saga_prepare_kept_generic("INSERT INTO saga.inbox_messages (message_id, topic, key, payload,"
										 " headers, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6)",
										 6, types);
	}
	for (int i = 0; i < 6; i++)
	{
		args[i] = values[i == 0 ? 0 : i + 1];
		argnulls[i] = nulls[i == 0 ? 0 : i + 1];
	}
	rc = SPI_execute_plan(plan, args, argnulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "saga.publish: insert into the inbox failed: %s", SPI_result_code_string(rc));
}

/* a message's row in saga.queue, one per destination */
static const char *const queue_columns[] = {
	"message_id", "destination", "seq", "topic", "key", "payload", "headers",
	"published_at", "next_attempt_at", "attempts", "status"
};
static const Oid queue_types[] = {
	UUIDOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, JSONBOID, JSONBOID,
	TIMESTAMPTZOID, TIMESTAMPTZOID, INT4OID, TEXTOID
};
static SagaRowShape queue_row = {"queue", lengthof(queue_columns), queue_columns, queue_types};

static void
queue_insert(Oid queue, Oid queue_seq, Datum *values, char *nulls, const char *destination)
{
	Datum		row[lengthof(queue_columns)];
	bool		rownulls[lengthof(queue_columns)] = {false};

	row[0] = values[0];
	row[1] = CStringGetTextDatum(destination);
	row[2] = Int64GetDatum(nextval_internal(queue_seq, false));
	row[3] = values[2];
	row[4] = values[3];
	rownulls[4] = nulls[3] == 'n';
	row[5] = values[4];
	row[6] = values[5];
	rownulls[6] = nulls[5] == 'n';
	row[7] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	row[8] = values[6];
	row[9] = Int32GetDatum(0);
	row[10] = CStringGetTextDatum("pending");
	saga_insert_row(&queue_row, queue, row, rownulls);
}

Datum
saga_publish(PG_FUNCTION_ARGS)
{
	char	   *topic;
	text	   *key = NULL;
	Jsonb	   *payload;
	Jsonb	   *headers = NULL;
	TimestampTz deliver_at;
	pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));
	SagaOwnerContext oc;
	Oid			nsp;
	Oid			queue;
	Oid			queue_seq;
	Oid			subscriptions;
	List	   *destinations;
	bool		to_inbox;
	ListCell   *lc;
	Datum		values[7];
	char		nulls[7] = "       ";

	saga_check_message(fcinfo, &topic, &payload, &key, &headers);
	PreventCommandIfReadOnly("saga.publish()");
	deliver_at = PG_ARGISNULL(4) ? GetCurrentTransactionStartTimestamp() : PG_GETARG_TIMESTAMPTZ(4);
	if (TIMESTAMP_NOT_FINITE(deliver_at))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deliver_at must be a finite timestamp")));

	saga_uuid7(id->data);
	values[0] = UUIDPGetDatum(id);
	values[2] = CStringGetTextDatum(topic);
	values[3] = key ? PointerGetDatum(key) : (Datum) 0;
	nulls[3] = key ? ' ' : 'n';
	values[4] = JsonbPGetDatum(payload);
	values[5] = headers ? JsonbPGetDatum(headers) : (Datum) 0;
	nulls[5] = headers ? ' ' : 'n';
	values[6] = TimestampTzGetDatum(deliver_at);

	saga_begin_as_owner(&oc, false);
	nsp = get_namespace_oid("saga", false);
	queue = get_relname_relid("queue", nsp);
	queue_seq = get_relname_relid("queue_seq", nsp);
	subscriptions = get_relname_relid("subscriptions", nsp);
	if (!OidIsValid(queue) || !OidIsValid(queue_seq) || !OidIsValid(subscriptions))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"saga\" is not installed correctly: its tables are missing")));

	/*
	 * Lock the queue before routing: drop_destination holds a stronger lock
	 * on it until it commits, and a route must not outlive its destination.
	 */
	LockRelationOid(queue, RowExclusiveLock);
	destinations = saga_route(topic, subscriptions, &to_inbox);
	if (to_inbox)
		receive_locally(values, nulls);
	if (destinations == NIL)
	{
		if (to_inbox)
			saga_wake_at_commit(1);
		saga_end_as_owner(&oc);
		PG_RETURN_UUID_P(id);
	}

	foreach(lc, destinations)
		queue_insert(queue, queue_seq, values, nulls, (char *) lfirst(lc));
	saga_wake_at_commit(1);
	saga_end_as_owner(&oc);

	PG_RETURN_UUID_P(id);
}

Datum
saga_message(PG_FUNCTION_ARGS)
{
	SagaOwnerContext oc;
	Oid			types[1] = {UUIDOID};
	Datum		values[1];
	Datum		result;
	bool		isnull;

	saga_require_arg(fcinfo, 0, "message id");
	values[0] = PG_GETARG_DATUM(0);

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT jsonb_build_object('id', message_id, 'topic', topic, 'key', key,"
			" 'payload', payload, 'headers', headers, 'published_at', published_at)"
			" FROM saga.queue WHERE message_id = $1 LIMIT 1",
			1, types, values, NULL, true);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("message %s not found",
						DatumGetCString(DirectFunctionCall1(uuid_out, values[0]))),
				 errdetail("Delivered messages are kept for saga.message_retention only when NOTIFY delivered them without their payload.")));
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	result = PointerGetDatum(SPI_datumTransfer(result, false, -1));
	saga_end_as_owner(&oc);
	PG_RETURN_DATUM(result);
}

Datum
saga_redeliver(PG_FUNCTION_ARGS)
{
	SagaOwnerContext oc;
	Oid			types[2] = {UUIDOID, TEXTOID};
	Datum		values[2];
	char		nulls[2] = "  ";
	char	   *dest = NULL;
	uint64		n;

	saga_require_arg(fcinfo, 0, "message id");
	values[0] = PG_GETARG_DATUM(0);
	if (!PG_ARGISNULL(1))
	{
		dest = text_to_cstring(PG_GETARG_TEXT_PP(1));
		values[1] = CStringGetTextDatum(dest);
	}
	else
		nulls[1] = 'n';

	saga_begin_as_owner(&oc, true);
	if (dest)
		require_destination(dest);
	saga_run_sql("SELECT 1 FROM saga.queue WHERE message_id = $1"
			" UNION ALL SELECT 1 FROM saga.inbox_messages WHERE message_id = $1 AND $2::text IS NULL"
			" LIMIT 1", 2, types, values, nulls, true);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("message %s not found",
						DatumGetCString(DirectFunctionCall1(uuid_out, values[0])))));
	saga_run_sql("UPDATE saga.queue q SET status = 'pending', attempts = 0, lease_until = NULL,"
			" next_attempt_at = now(), finished_at = NULL"
			" WHERE q.message_id = $1 AND q.status = 'dead'"
			"   AND ($2::text IS NULL OR q.destination = $2)"
			"   AND EXISTS (SELECT 1 FROM saga.destinations d WHERE d.name = q.destination)",
			2, types, values, nulls, false);
	n = SPI_processed;
	/* a dead inbox message: its handlers run again */
	saga_run_sql("UPDATE saga.inbox_messages m SET status = 'pending', attempts = 0, next_attempt_at = now()"
			" WHERE m.message_id = $1 AND m.status = 'dead' AND $2::text IS NULL",
			2, types, values, nulls, false);
	n += SPI_processed;
	saga_end_as_owner(&oc);
	if (n > 0)
		saga_wake_at_commit(0);
	PG_RETURN_INT32((int32) n);
}

/* ---------- monitoring ---------- */

static Tuplestorestate *
begin_srf(FunctionCallInfo fcinfo, TupleDesc *desc)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext old;
	Tuplestorestate *store;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("set-valued function called in context that cannot accept a set")));
	old = MemoryContextSwitchTo(rsinfo->econtext->ecxt_per_query_memory);
	if (get_call_result_type(fcinfo, NULL, desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	*desc = CreateTupleDescCopy(*desc);
	store = tuplestore_begin_heap(true, false, work_mem);
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = store;
	rsinfo->setDesc = *desc;
	MemoryContextSwitchTo(old);
	return store;
}

static void
put_metric(Tuplestorestate *store, TupleDesc desc, const char *name, const char *labels, double value)
{
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	values[0] = CStringGetTextDatum(name);
	values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(labels));
	values[2] = Float8GetDatum(value);
	tuplestore_putvalues(store, desc, values, nulls);
}

Datum
saga_metrics(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Tuplestorestate *store = begin_srf(fcinfo, &desc);
	SagaWorkerSlot *slot = saga_slot_for_database(MyDatabaseId);
	SagaOwnerContext oc;

	if (slot != NULL)
	{
		put_metric(store, desc, "messages_published_total", "{}", (double) pg_atomic_read_u64(&slot->published));
		put_metric(store, desc, "messages_delivered_total", "{}", (double) pg_atomic_read_u64(&slot->delivered));
		put_metric(store, desc, "messages_retried_total", "{}", (double) pg_atomic_read_u64(&slot->retried));
		put_metric(store, desc, "messages_dead_lettered_total", "{}", (double) pg_atomic_read_u64(&slot->dead_lettered));
		put_metric(store, desc, "http_requests_in_flight", "{}",
				   (double) (slot->in_flight - slot->remote_calls_in_flight));
		put_metric(store, desc, "database_requests_in_flight", "{}",
				   (double) slot->remote_calls_in_flight);
	}

	saga_begin_as_owner(&oc, true);
	saga_run_sql("SELECT m.name, m.labels::text, m.value FROM ("
			" SELECT 'outbox_pending' AS name, jsonb_build_object('destination', d.name) AS labels,"
			"   (SELECT count(*) FROM saga.queue q WHERE q.destination = d.name AND q.status = 'pending')::float8 AS value, d.name AS sort"
			" FROM saga.destinations d"
			" UNION ALL"
			" SELECT 'outbox_dead', jsonb_build_object('destination', q.destination), count(*)::float8, q.destination"
			" FROM saga.queue q WHERE q.status = 'dead' GROUP BY q.destination"
			" UNION ALL"
			" SELECT 'outbox_lag_seconds', jsonb_build_object('destination', d.name),"
			"   coalesce((SELECT extract(epoch FROM now() - min(q.next_attempt_at)) FROM saga.queue q"
			"     WHERE q.destination = d.name AND q.status = 'pending' AND q.next_attempt_at <= now()), 0)::float8, d.name"
			" FROM saga.destinations d"
			" UNION ALL"
			" SELECT 'sagas', jsonb_build_object('status', st.status),"
			"   (SELECT count(*) FROM saga.instances i WHERE i.status = st.status)::float8, st.status"
			" FROM unnest(ARRAY['running', 'compensating', 'completed', 'compensated', 'failed']) st(status)"
			" UNION ALL"
			" SELECT 'sagas_past_deadline', '{}', count(*)::float8, ''"
			" FROM saga.instances i WHERE i.status IN ('running', 'compensating') AND i.deadline < now()"
			" UNION ALL"
			" SELECT 'inbox_messages', jsonb_build_object('status', st.status),"
			"   (SELECT count(*) FROM saga.inbox_messages m WHERE m.status = st.status)::float8, st.status"
			" FROM unnest(ARRAY['pending', 'processed', 'dead']) st(status)"
			") m ORDER BY m.name, m.sort",
			0, NULL, NULL, NULL, true);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;

		put_metric(store, desc, SPI_getvalue(tup, SPI_tuptable->tupdesc, 1),
				   SPI_getvalue(tup, SPI_tuptable->tupdesc, 2),
				   DatumGetFloat8(SPI_getbinval(tup, SPI_tuptable->tupdesc, 3, &isnull)));
	}
	saga_end_as_owner(&oc);
	return (Datum) 0;
}

static const char *
state_name(SagaWorkerState s)
{
	switch (s)
	{
		case SAGA_SLOT_STARTING:
			return "starting";
		case SAGA_SLOT_IDLE:
			return "idle";
		case SAGA_SLOT_DISPATCHING:
			return "dispatching";
		case SAGA_SLOT_WAITING_LOCK:
			return "waiting for another worker of this database to exit";
		case SAGA_SLOT_EXITED:
			return "exited";
		default:
			return "free";
	}
}

Datum
saga_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Tuplestorestate *store = begin_srf(fcinfo, &desc);
	Datum		values[7];
	bool		nulls[7];
	pid_t		launcher_pid;
	TimestampTz launcher_started_at;

	if (!saga_shmem_available())
	{
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no saga worker is running: saga is not in shared_preload_libraries"),
				 errhint("Add saga to shared_preload_libraries in postgresql.conf and restart the server.")));
		return (Datum) 0;
	}

	SpinLockAcquire(&saga_shared->mutex);
	launcher_pid = saga_shared->launcher_pid;
	launcher_started_at = saga_shared->launcher_started_at;
	SpinLockRelease(&saga_shared->mutex);
	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum("launcher");
	nulls[1] = true;
	values[2] = Int32GetDatum(launcher_pid);
	values[3] = CStringGetTextDatum(launcher_pid ? "running" : "not running");
	values[4] = TimestampTzGetDatum(launcher_started_at);
	nulls[4] = launcher_pid == 0;
	nulls[5] = true;
	nulls[6] = true;
	tuplestore_putvalues(store, desc, values, nulls);

	for (int i = 0; i < saga_shared->nslots; i++)
	{
		SagaWorkerSlot copy;
		char	   *dbname;

		SpinLockAcquire(&saga_shared->mutex);
		memcpy(&copy, &saga_shared->slots[i], sizeof(copy));
		SpinLockRelease(&saga_shared->mutex);
		if (copy.state == SAGA_SLOT_FREE || copy.state == SAGA_SLOT_EXITED)
			continue;
		dbname = get_database_name(copy.dboid);
		memset(nulls, 0, sizeof(nulls));
		values[0] = CStringGetTextDatum("worker");
		values[1] = dbname ? CStringGetTextDatum(dbname) : (Datum) 0;
		nulls[1] = dbname == NULL;
		values[2] = Int32GetDatum(copy.pid);
		values[3] = CStringGetTextDatum(state_name(copy.state));
		values[4] = TimestampTzGetDatum(copy.started_at);
		nulls[4] = copy.started_at == 0;
		values[5] = TimestampTzGetDatum(copy.last_cycle_at);
		nulls[5] = copy.last_cycle_at == 0;
		values[6] = Int32GetDatum(copy.in_flight);
		tuplestore_putvalues(store, desc, values, nulls);
	}
	return (Datum) 0;
}
