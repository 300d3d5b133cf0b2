-- Schema contract of the saga extension: the public objects, their
-- signatures, keys and comments.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off

BEGIN;
SELECT plan(131);

-- the extension and its schema
SELECT has_extension('saga');
SELECT has_schema('saga');
SELECT is((SELECT extrelocatable FROM pg_extension WHERE extname = 'saga'), false,
	'saga is not relocatable');
SELECT isnt(obj_description('saga'::regnamespace, 'pg_namespace'), NULL, 'schema saga has a comment');

-- tables and their keys
SELECT tables_are('saga', ARRAY['destinations', 'subscriptions', 'queue', 'definitions', 'instances',
							   'instance_steps', 'invocations', 'handlers', 'inbox_messages']);
SELECT has_table('saga', 'destinations', 'table saga.destinations exists');
SELECT has_table('saga', 'subscriptions', 'table saga.subscriptions exists');
SELECT has_table('saga', 'queue', 'table saga.queue exists');
SELECT col_is_pk('saga', 'destinations', ARRAY['name'], 'destinations are keyed by name');
SELECT col_is_pk('saga', 'subscriptions', ARRAY['pattern', 'destination'],
	'subscriptions are keyed by pattern and destination');
SELECT col_is_pk('saga', 'queue', ARRAY['message_id', 'destination'],
	'the queue has one row per message and destination');
SELECT fk_ok('saga', 'subscriptions', 'destination', 'saga', 'destinations', 'name');
SELECT has_sequence('saga', 'queue_seq', 'sequence saga.queue_seq exists');
SELECT col_not_null('saga', 'queue', 'payload', 'a queued message always has a payload');
SELECT col_not_null('saga', 'queue', 'next_attempt_at', 'a queued message always has a due time');
SELECT has_table('saga', 'definitions', 'table saga.definitions exists');
SELECT has_table('saga', 'instances', 'table saga.instances exists');
SELECT has_table('saga', 'instance_steps', 'table saga.instance_steps exists');
SELECT has_table('saga', 'invocations', 'table saga.invocations exists');
SELECT col_is_pk('saga', 'definitions', ARRAY['name', 'version'], 'definitions are keyed by name and version');
SELECT col_is_pk('saga', 'instances', ARRAY['id'], 'sagas are keyed by id');
SELECT col_is_pk('saga', 'instance_steps', ARRAY['saga_id', 'position'], 'saga steps are keyed by saga and position');
SELECT col_is_pk('saga', 'invocations', ARRAY['key'], 'invocations are keyed by action key');
SELECT col_type_is('saga', 'instances', 'id', 'uuid', 'saga ids are uuids');
SELECT col_not_null('saga', 'instances', 'owner', 'every saga records the role it runs as');
SELECT col_not_null('saga', 'definitions', 'owner', 'every definition records the role that owns its name');
SELECT col_not_null('saga', 'definitions', 'steps', 'every definition has its resolved steps');

-- views promised by the design, with their columns
SELECT views_are('saga', ARRAY['outbox', 'dead_letters', 'sagas', 'saga_steps', 'stuck', 'inbox']);
SELECT has_view('saga', 'outbox', 'view saga.outbox exists');
SELECT has_view('saga', 'dead_letters', 'view saga.dead_letters exists');
SELECT ok(ARRAY['message_id', 'topic', 'key', 'destination', 'status', 'attempts', 'next_attempt_at', 'last_error']::name[]
		  <@ ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = 'saga.outbox'::regclass AND attnum > 0),
	'saga.outbox has message_id, topic, key, destination, status, attempts, next_attempt_at, last_error');
SELECT ok(ARRAY['message_id', 'topic', 'key', 'destination', 'attempts', 'last_error', 'last_status', 'dead_at']::name[]
		  <@ ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = 'saga.dead_letters'::regclass AND attnum > 0),
	'saga.dead_letters has message_id, topic, key, destination, attempts, last_error, last_status, dead_at');
SELECT has_view('saga', 'sagas', 'view saga.sagas exists');
SELECT has_view('saga', 'saga_steps', 'view saga.saga_steps exists');
SELECT has_view('saga', 'stuck', 'view saga.stuck exists');
SELECT ok(ARRAY['id', 'name', 'version', 'status', 'input', 'error', 'started_at', 'updated_at', 'deadline']::name[]
		  <@ ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = 'saga.sagas'::regclass AND attnum > 0),
	'saga.sagas has id, name, version, status, input, error, started_at, updated_at, deadline');
SELECT ok(ARRAY['saga_id', 'step', 'position', 'status', 'attempts', 'result', 'error', 'updated_at']::name[]
		  <@ ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = 'saga.saga_steps'::regclass AND attnum > 0),
	'saga.saga_steps has saga_id, step, position, status, attempts, result, error, updated_at');
SELECT ok(ARRAY['id', 'name', 'status', 'reason', 'since']::name[]
		  <@ ARRAY(SELECT attname FROM pg_attribute WHERE attrelid = 'saga.stuck'::regclass AND attnum > 0),
	'saga.stuck has id, name, status, reason, since');
SELECT col_type_is('saga', 'sagas', 'id', 'uuid', 'saga.sagas ids are uuids');
SELECT col_type_is('saga', 'stuck', 'since', 'timestamp with time zone', 'saga.stuck since is a timestamptz');
SELECT col_type_is('saga', 'outbox', 'message_id', 'uuid', 'outbox message ids are uuids');
SELECT col_type_is('saga', 'dead_letters', 'dead_at', 'timestamp with time zone', 'dead_at is a timestamptz');

-- functions: names, signatures, return types
SELECT functions_are('saga', ARRAY['create_destination', 'drop_destination', 'subscribe', 'unsubscribe',
								   'publish', 'message', 'redeliver', 'metrics', 'worker_status',
								   'config_changed',
								   'define', 'start', 'begin', 'step', 'complete', 'fail', 'cancel', 'retry',
								   'get', 'wait', 'invoke', 'compensate',
								   '_may_control', '_resolve_call', '_interval', '_define', '_start', '_begin',
								   '_lock', '_check_compensation', '_step', '_complete', '_abort', '_retry',
								   '_get', '_status', '_next', '_claim', '_succeeded', '_failed', '_send', '_received',
								   'purge', 'schedule_maintenance', 'unschedule_maintenance', '_purge', '_sweep_deadlines',
								   'receive', 'handle', 'unhandle', '_handle', '_unhandle']);
SELECT has_function('saga', 'create_destination', ARRAY['text', 'text', 'jsonb']);
SELECT has_function('saga', 'drop_destination', ARRAY['text']);
SELECT has_function('saga', 'subscribe', ARRAY['text', 'text']);
SELECT has_function('saga', 'unsubscribe', ARRAY['text', 'text']);
SELECT has_function('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone']);
SELECT has_function('saga', 'message', ARRAY['uuid']);
SELECT has_function('saga', 'redeliver', ARRAY['uuid', 'text']);
SELECT has_function('saga', 'metrics', ARRAY[]::name[]);
SELECT has_function('saga', 'worker_status', ARRAY[]::name[]);
SELECT function_returns('saga', 'create_destination', ARRAY['text', 'text', 'jsonb'], 'void');
SELECT function_returns('saga', 'drop_destination', ARRAY['text'], 'void');
SELECT function_returns('saga', 'subscribe', ARRAY['text', 'text'], 'void');
SELECT function_returns('saga', 'unsubscribe', ARRAY['text', 'text'], 'void');
SELECT function_returns('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone'], 'uuid');
SELECT function_returns('saga', 'message', ARRAY['uuid'], 'jsonb');
SELECT function_returns('saga', 'redeliver', ARRAY['uuid', 'text'], 'integer');
SELECT function_returns('saga', 'metrics', ARRAY[]::name[], 'setof record');
SELECT function_returns('saga', 'worker_status', ARRAY[]::name[], 'setof record');
SELECT has_function('saga', 'define', ARRAY['text', 'jsonb']);
SELECT has_function('saga', 'start', ARRAY['text', 'jsonb', 'text']);
SELECT has_function('saga', 'begin', ARRAY['text', 'jsonb', 'text', 'interval']);
SELECT has_function('saga', 'step', ARRAY['uuid', 'text', 'jsonb', 'jsonb']);
SELECT has_function('saga', 'complete', ARRAY['uuid', 'jsonb']);
SELECT has_function('saga', 'fail', ARRAY['uuid', 'text']);
SELECT has_function('saga', 'cancel', ARRAY['uuid', 'text']);
SELECT has_function('saga', 'retry', ARRAY['uuid']);
SELECT has_function('saga', 'get', ARRAY['uuid']);
SELECT has_function('saga', 'wait', ARRAY['uuid', 'interval']);
SELECT has_function('saga', 'invoke', ARRAY['text', 'regprocedure', 'jsonb']);
SELECT has_function('saga', 'compensate', ARRAY['text', 'regprocedure', 'jsonb']);
SELECT function_returns('saga', 'define', ARRAY['text', 'jsonb'], 'integer');
SELECT function_returns('saga', 'start', ARRAY['text', 'jsonb', 'text'], 'uuid');
SELECT function_returns('saga', 'begin', ARRAY['text', 'jsonb', 'text', 'interval'], 'uuid');
SELECT function_returns('saga', 'step', ARRAY['uuid', 'text', 'jsonb', 'jsonb'], 'void');
SELECT function_returns('saga', 'complete', ARRAY['uuid', 'jsonb'], 'void');
SELECT function_returns('saga', 'fail', ARRAY['uuid', 'text'], 'void');
SELECT function_returns('saga', 'cancel', ARRAY['uuid', 'text'], 'void');
SELECT function_returns('saga', 'retry', ARRAY['uuid'], 'void');
SELECT function_returns('saga', 'get', ARRAY['uuid'], 'jsonb');
SELECT function_returns('saga', 'wait', ARRAY['uuid', 'interval'], 'text');
SELECT function_returns('saga', 'invoke', ARRAY['text', 'regprocedure', 'jsonb'], 'jsonb');
SELECT function_returns('saga', 'compensate', ARRAY['text', 'regprocedure', 'jsonb'], 'jsonb');

-- argument names and defaults as the design writes them
SELECT is(pg_get_function_arguments('saga.create_destination(text, text, jsonb)'::regprocedure),
	'name text, url text, options jsonb DEFAULT ''{}''::jsonb', 'create_destination arguments');
SELECT is(pg_get_function_arguments('saga.publish(text, jsonb, text, jsonb, timestamptz)'::regprocedure),
	'topic text, payload jsonb, key text DEFAULT NULL::text, headers jsonb DEFAULT NULL::jsonb, deliver_at timestamp with time zone DEFAULT NULL::timestamp with time zone',
	'publish arguments');
SELECT is(pg_get_function_arguments('saga.subscribe(text, text)'::regprocedure),
	'topic text, destination text', 'subscribe arguments');
SELECT is(pg_get_function_arguments('saga.unsubscribe(text, text)'::regprocedure),
	'topic text, destination text', 'unsubscribe arguments');
SELECT is(pg_get_function_arguments('saga.redeliver(uuid, text)'::regprocedure),
	'message_id uuid, destination text DEFAULT NULL::text', 'redeliver arguments');
SELECT is(pg_get_function_arguments('saga.message(uuid)'::regprocedure), 'id uuid', 'message arguments');
SELECT is(pg_get_function_result('saga.metrics()'::regprocedure),
	'TABLE(name text, labels jsonb, value double precision)', 'metrics columns');
SELECT ok(pg_get_function_result('saga.worker_status()'::regprocedure) ~ '^TABLE\(.*database text, pid integer, state text',
	'worker_status shows each worker''s database, pid and state');
SELECT is(pg_get_function_arguments('saga.define(text, jsonb)'::regprocedure),
	'name text, definition jsonb', 'define arguments');
SELECT is(pg_get_function_arguments('saga.start(text, jsonb, text)'::regprocedure),
	'name text, input jsonb DEFAULT ''{}''::jsonb, idempotency_key text DEFAULT NULL::text', 'start arguments');
SELECT is(pg_get_function_arguments('saga.begin(text, jsonb, text, interval)'::regprocedure),
	'name text, input jsonb DEFAULT ''{}''::jsonb, idempotency_key text DEFAULT NULL::text, deadline interval DEFAULT ''01:00:00''::interval',
	'begin arguments (deadline 1 hour by default)');
SELECT is(pg_get_function_arguments('saga.step(uuid, text, jsonb, jsonb)'::regprocedure),
	'saga_id uuid, step text, compensation jsonb DEFAULT NULL::jsonb, result jsonb DEFAULT NULL::jsonb', 'step arguments');
SELECT is(pg_get_function_arguments('saga.complete(uuid, jsonb)'::regprocedure),
	'saga_id uuid, result jsonb DEFAULT NULL::jsonb', 'complete arguments');
SELECT is(pg_get_function_arguments('saga.fail(uuid, text)'::regprocedure), 'saga_id uuid, reason text', 'fail arguments');
SELECT is(pg_get_function_arguments('saga.cancel(uuid, text)'::regprocedure), 'saga_id uuid, reason text', 'cancel arguments');
SELECT is(pg_get_function_arguments('saga.retry(uuid)'::regprocedure), 'saga_id uuid', 'retry arguments');
SELECT is(pg_get_function_arguments('saga.get(uuid)'::regprocedure), 'saga_id uuid', 'get arguments');
SELECT is(pg_get_function_arguments('saga.wait(uuid, interval)'::regprocedure),
	'saga_id uuid, timeout interval DEFAULT ''00:00:30''::interval', 'wait arguments (30 s by default)');
SELECT is(pg_get_function_arguments('saga.invoke(text, regprocedure, jsonb)'::regprocedure),
	'key text, fn regprocedure, ctx jsonb', 'invoke arguments');
SELECT is(pg_get_function_arguments('saga.compensate(text, regprocedure, jsonb)'::regprocedure),
	'action_key text, fn regprocedure, ctx jsonb', 'compensate arguments');

-- NULL arguments must reach the C code and be rejected with an error, not
-- swallowed by STRICT
SELECT isnt_strict('saga', 'create_destination', ARRAY['text', 'text', 'jsonb']);
SELECT isnt_strict('saga', 'drop_destination', ARRAY['text']);
SELECT isnt_strict('saga', 'subscribe', ARRAY['text', 'text']);
SELECT isnt_strict('saga', 'unsubscribe', ARRAY['text', 'text']);
SELECT isnt_strict('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone']);
SELECT isnt_strict('saga', 'message', ARRAY['uuid']);
SELECT isnt_strict('saga', 'redeliver', ARRAY['uuid', 'text']);
SELECT is_empty($$
	SELECT p.oid::regprocedure::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace AND p.proisstrict
	  AND p.proname IN ('define', 'start', 'begin', 'step', 'complete', 'fail', 'cancel', 'retry', 'get', 'wait',
						'invoke', 'compensate')
$$, 'no saga API function is STRICT: NULL arguments are rejected with an error');
-- publish writes, so it can never be mistaken for a read-only function
SELECT volatility_is('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone'], 'volatile');
SELECT volatility_is('saga', 'start', ARRAY['text', 'jsonb', 'text'], 'volatile');
SELECT volatility_is('saga', 'wait', ARRAY['uuid', 'interval'], 'volatile');

-- no SECURITY DEFINER anywhere: identity is switched in C after the checks
SELECT is_empty($$
	SELECT p.oid::regprocedure::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace AND p.prosecdef
$$, 'no function in schema saga is SECURITY DEFINER');

-- every public object is documented
SELECT is_empty($$
	SELECT p.oid::regprocedure::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace
	  AND coalesce(obj_description(p.oid, 'pg_proc'), '') = ''
$$, 'every function in schema saga has a COMMENT');
SELECT is_empty($$
	SELECT c.oid::regclass::text FROM pg_class c
	WHERE c.relnamespace = 'saga'::regnamespace AND c.relkind IN ('r', 'v', 'm')
	  AND coalesce(obj_description(c.oid, 'pg_class'), '') = ''
$$, 'every table and view in schema saga has a COMMENT');
SELECT cmp_ok((SELECT count(*) FROM pg_proc WHERE pronamespace = 'saga'::regnamespace), '>=', 9::bigint,
	'the comment check saw the functions');

-- every object in schema saga belongs to the extension (nothing stray that
-- DROP EXTENSION would leave behind, nothing a user slipped in)
SELECT is_empty($$
	SELECT c.oid::regclass::text FROM pg_class c
	WHERE c.relnamespace = 'saga'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'm', 'f', 'p')
	  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
					  AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')
$$, 'every relation in schema saga is a member of the extension');
SELECT is_empty($$
	SELECT p.oid::regprocedure::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace
	  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
					  AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')
$$, 'every function in schema saga is a member of the extension');

-- pg_dump keeps declared destinations, subscriptions and undelivered messages
SELECT set_eq($$
	SELECT unnest(extconfig)::regclass::text FROM pg_extension WHERE extname = 'saga'
$$, ARRAY['saga.destinations', 'saga.subscriptions', 'saga.queue', 'saga.queue_seq',
		  'saga.definitions', 'saga.instances', 'saga.instance_steps', 'saga.invocations',
		  'saga.handlers', 'saga.inbox_messages'],
	'pg_dump keeps destinations, subscriptions, the queue and its sequence, sagas, invocations and the inbox');

-- the kinds of destination the table accepts, and the statuses of the queue
SELECT throws_ok($$INSERT INTO saga.destinations (name, kind, target, timeout, max_attempts, backoff, max_backoff, concurrency)
				   VALUES ('x', 'smtp', 'x', '1s', 1, '1s', '1s', 1)$$, '23514', NULL,
	'saga.destinations accepts only known kinds');
SELECT throws_ok($$INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at, status)
				   VALUES (gen_random_uuid(), 'x', 't', '{}', now(), 'lost')$$, '23514', NULL,
	'saga.queue accepts only known statuses');
SELECT throws_ok($$INSERT INTO saga.instances (id, name, driver, status, input, owner)
				   VALUES (gen_random_uuid(), 'x', 'worker', 'paused', '{}', 10)$$, '23514', NULL,
	'saga.instances accepts only known statuses');
SELECT throws_ok($$INSERT INTO saga.instances (id, name, driver, status, input, owner)
				   VALUES (gen_random_uuid(), 'x', 'cron', 'running', '{}', 10)$$, '23514', NULL,
	'saga.instances accepts only known drivers');
SELECT throws_ok($$INSERT INTO saga.instance_steps (saga_id, position, step, status)
				   VALUES (gen_random_uuid(), 0, 'x', 'skipped')$$, '23514', NULL,
	'saga.instance_steps accepts only known statuses');

-- the queue table is WAL-logged: a crash must not empty it
SELECT is((SELECT relpersistence::text FROM pg_class WHERE oid = 'saga.queue'::regclass), 'p',
	'saga.queue is a permanent (logged) table');
SELECT is((SELECT relpersistence::text FROM pg_class WHERE oid = 'saga.destinations'::regclass), 'p',
	'saga.destinations is a permanent (logged) table');
SELECT is_empty($$
	SELECT c.oid::regclass::text FROM pg_class c
	WHERE c.oid IN ('saga.definitions'::regclass, 'saga.instances'::regclass, 'saga.instance_steps'::regclass,
					'saga.invocations'::regclass)
	  AND c.relpersistence <> 'p'
$$, 'the saga tables are permanent (logged) tables');

SELECT * FROM finish();
ROLLBACK;
