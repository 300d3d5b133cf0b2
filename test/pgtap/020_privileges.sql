-- Privilege contract: applications get publish, message and worker_status;
-- administrators' functions and every table stay closed to PUBLIC; a role
-- granted an admin function can use it without any table privilege.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off

BEGIN;
SELECT plan(97);

CREATE ROLE saga_test_app;
CREATE FUNCTION public.saga_test_trigger() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
CREATE ROLE saga_test_admin;
GRANT EXECUTE ON FUNCTION saga.create_destination(text, text, jsonb), saga.drop_destination(text),
	saga.subscribe(text, text), saga.unsubscribe(text, text), saga.redeliver(uuid, text),
	saga.metrics() TO saga_test_admin;

-- EXECUTE for PUBLIC: only the application API
SELECT function_privs_are('saga', 'create_destination', ARRAY['text', 'text', 'jsonb'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'drop_destination', ARRAY['text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'subscribe', ARRAY['text', 'text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'unsubscribe', ARRAY['text', 'text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'redeliver', ARRAY['uuid', 'text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'metrics', ARRAY[]::text[], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'purge', ARRAY['interval'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'schedule_maintenance', ARRAY['text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'unschedule_maintenance', ARRAY[]::text[], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'message', ARRAY['uuid'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'worker_status', ARRAY[]::text[], 'public', ARRAY['EXECUTE']);
-- the inbox: remote services' roles are granted receive; handlers are the application's
SELECT function_privs_are('saga', 'receive', ARRAY['uuid', 'text', 'jsonb', 'text', 'jsonb', 'text'], 'public', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'handle', ARRAY['text', 'regprocedure'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'unhandle', ARRAY['text', 'regprocedure'], 'public', ARRAY['EXECUTE']);
-- the same seen from a fresh role
SELECT function_privs_are('saga', 'create_destination', ARRAY['text', 'text', 'jsonb'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'drop_destination', ARRAY['text'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'subscribe', ARRAY['text', 'text'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'unsubscribe', ARRAY['text', 'text'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'redeliver', ARRAY['uuid', 'text'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'metrics', ARRAY[]::text[], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'publish', ARRAY['text', 'jsonb', 'text', 'jsonb', 'timestamp with time zone'], 'saga_test_app', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'message', ARRAY['uuid'], 'saga_test_app', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'worker_status', ARRAY[]::text[], 'saga_test_app', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'receive', ARRAY['uuid', 'text', 'jsonb', 'text', 'jsonb', 'text'], 'saga_test_app', ARRAY[]::text[]);
SELECT function_privs_are('saga', 'handle', ARRAY['text', 'regprocedure'], 'saga_test_app', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'unhandle', ARRAY['text', 'regprocedure'], 'saga_test_app', ARRAY['EXECUTE']);
-- and nothing else in the schema is executable by PUBLIC (catches new functions)
SELECT set_eq($$
	SELECT p.proname::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')
$$, ARRAY['publish', 'message', 'worker_status', 'invoke', 'compensate',
		'define', 'start', 'begin', 'step', 'complete', 'fail', 'cancel', 'retry', 'get', 'wait',
		'_may_control', 'handle', 'unhandle'],
	'PUBLIC may execute the application API only');

-- the schema: USAGE, never CREATE
SELECT schema_privs_are('saga', 'public', ARRAY['USAGE']);
SELECT schema_privs_are('saga', 'saga_test_app', ARRAY['USAGE']);

-- tables, views, sequence: nothing for PUBLIC or an application role
SELECT table_privs_are('saga', 'destinations', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'subscriptions', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'queue', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'outbox', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'dead_letters', 'public', ARRAY[]::text[]);
SELECT sequence_privs_are('saga', 'queue_seq', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'destinations', 'saga_test_app', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'queue', 'saga_test_app', ARRAY[]::text[]);
SELECT is_empty($$
	SELECT c.oid::regclass::text || ': ' || a.privilege_type
	FROM pg_class c, aclexplode(c.relacl) a
	WHERE c.relnamespace = 'saga'::regnamespace AND a.grantee = 0
$$ || $$ AND c.relname NOT IN ('sagas', 'saga_steps', 'stuck')$$,
	'no relation in schema saga grants anything to PUBLIC but the saga views');
SELECT table_privs_are('saga', 'sagas', 'public', ARRAY['SELECT']);
SELECT table_privs_are('saga', 'saga_steps', 'public', ARRAY['SELECT']);
SELECT table_privs_are('saga', 'stuck', 'public', ARRAY['SELECT']);
SELECT table_privs_are('saga', 'instances', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'inbox', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'inbox_messages', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'handlers', 'public', ARRAY[]::text[]);
SELECT is_empty($$
	SELECT c.oid::regclass::text || '.' || att.attname
	FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid
	WHERE c.relnamespace = 'saga'::regnamespace AND att.attacl IS NOT NULL
$$, 'no column-level grants in schema saga');

-- a destination and a subscription for the application tests below
SELECT lives_ok($$SELECT saga.create_destination('privs_hook', 'http://127.0.0.1:1/hook',
	'{"headers": {"Authorization": "Bearer top-secret"}, "backoff": "1 hour", "max_backoff": "1 hour"}')$$,
	'superuser creates a destination with a secret header');
SELECT lives_ok($$SELECT saga.subscribe('privs.order.*', 'privs_hook')$$, 'superuser subscribes');

-- An application role: admin functions are refused with 42501
SET ROLE saga_test_app;
SELECT throws_ok($$SELECT saga.create_destination('privs_x', 'notify:x')$$, '42501',
	'permission denied for function create_destination', 'an application cannot create destinations');
SELECT throws_ok($$SELECT saga.drop_destination('privs_hook')$$, '42501',
	'permission denied for function drop_destination', 'an application cannot drop destinations');
SELECT throws_ok($$SELECT saga.subscribe('privs.other', 'privs_hook')$$, '42501',
	'permission denied for function subscribe', 'an application cannot subscribe');
SELECT throws_ok($$SELECT saga.unsubscribe('privs.order.*', 'privs_hook')$$, '42501',
	'permission denied for function unsubscribe', 'an application cannot unsubscribe');
SELECT throws_ok($$SELECT saga.redeliver(gen_random_uuid())$$, '42501',
	'permission denied for function redeliver', 'an application cannot redeliver');
SELECT throws_ok($$SELECT * FROM saga.metrics()$$, '42501',
	'permission denied for function metrics', 'an application cannot read metrics');
-- ... and so is every table and view: destination headers hold secrets
SELECT throws_ok($$SELECT headers FROM saga.destinations$$, '42501', NULL,
	'an application cannot read destination headers');
SELECT throws_ok($$SELECT * FROM saga.subscriptions$$, '42501', NULL, 'an application cannot read subscriptions');
SELECT throws_ok($$SELECT * FROM saga.queue$$, '42501', NULL, 'an application cannot read the queue');
SELECT throws_ok($$SELECT * FROM saga.outbox$$, '42501', NULL, 'an application cannot read saga.outbox');
SELECT throws_ok($$SELECT * FROM saga.dead_letters$$, '42501', NULL, 'an application cannot read saga.dead_letters');
SELECT throws_ok($$SELECT saga.receive(gen_random_uuid(), 'privs.order.placed', '{}')$$, '42501',
	'permission denied for function receive', 'an application cannot receive messages unless granted');
SELECT throws_ok($$SELECT * FROM saga.inbox$$, '42501', NULL, 'an application cannot read saga.inbox');
SELECT throws_ok($$INSERT INTO saga.inbox_messages (message_id, topic, payload) VALUES (gen_random_uuid(), 'privs.forged', '{}')$$,
	'42501', NULL, 'an application cannot insert into the inbox behind receive''s checks');
SELECT throws_ok($$INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at)
				   VALUES (gen_random_uuid(), 'privs_hook', 'privs.order.forged', '{}', now())$$, '42501', NULL,
	'an application cannot insert into the queue behind publish''s checks');
SELECT throws_ok($$UPDATE saga.queue SET status = 'dead'$$, '42501', NULL, 'an application cannot update the queue');
SELECT throws_ok($$DELETE FROM saga.queue$$, '42501', NULL, 'an application cannot delete from the queue');
SELECT throws_ok($$TRUNCATE saga.queue$$, '42501', NULL, 'an application cannot truncate the queue');
SELECT throws_ok($$INSERT INTO saga.destinations (name, kind, target, timeout, max_attempts, backoff, max_backoff, concurrency)
				   VALUES ('evil', 'http', 'http://169.254.169.254/', '1s', 1, '1s', '1s', 1)$$, '42501', NULL,
	'an application cannot add a destination by hand (no SSRF)');
SELECT throws_ok($$INSERT INTO saga.subscriptions (pattern, destination) VALUES ('*', 'privs_hook')$$, '42501', NULL,
	'an application cannot subscribe by hand');
SELECT throws_ok($$SELECT nextval('saga.queue_seq')$$, '42501', NULL, 'an application cannot use the queue sequence');
SELECT throws_ok($$CREATE TABLE saga.mine (x int)$$, '42501', NULL, 'an application cannot create objects in schema saga');
SELECT throws_ok($$CREATE TRIGGER evil BEFORE INSERT ON saga.queue FOR EACH ROW EXECUTE FUNCTION public.saga_test_trigger()$$,
	'42501', NULL, 'an application cannot attach a trigger to the queue (it would run in the worker)');

-- ... but can publish, read its message back and see the workers
SELECT lives_ok($$SELECT saga.publish('privs.order.placed', '{"from": "app"}', 'order-1', '{"X-Trace": "app"}')$$,
	'an application can publish');
SELECT saga.publish('privs.order.placed', '{"from": "app", "n": 2}', 'order-2') AS app_msg \gset
SELECT is(saga.message(:'app_msg') -> 'payload', '{"from": "app", "n": 2}'::jsonb,
	'an application can read its message with saga.message()');
SELECT is(saga.message(:'app_msg') ->> 'topic', 'privs.order.placed', 'saga.message() returns the topic');
SELECT lives_ok($$SELECT * FROM saga.worker_status()$$, 'an application can call worker_status()');
SELECT is(current_user::text, 'saga_test_app', 'the application is still itself after calling saga functions');
RESET ROLE;

-- checked as superuser: the message landed in the queue for the subscribed destination
SELECT results_eq(
	format($$SELECT destination, topic, key, payload, status FROM saga.queue WHERE message_id = %L$$, :'app_msg'),
	$$VALUES ('privs_hook'::text, 'privs.order.placed'::text, 'order-2'::text, '{"from": "app", "n": 2}'::jsonb, 'pending'::text)$$,
	'the application''s message is queued for the subscribed destination');
SELECT is((SELECT count(*) FROM saga.queue WHERE destination = 'privs_hook')::int, 2,
	'both messages the application published are queued');
SELECT is((SELECT count(*) FROM saga.queue q WHERE q.destination = 'privs_hook' AND q.topic = 'privs.order.forged')::int, 0,
	'the forged insert left nothing');
SELECT is((SELECT count(*) FROM pg_trigger WHERE tgrelid = 'saga.queue'::regclass AND NOT tgisinternal)::int, 0,
	'no trigger was attached to the queue');

-- A delegated administrator (EXECUTE granted, no table privileges) can use
-- the admin functions: they act as the extension owner after their checks.
SET ROLE saga_test_admin;
SELECT lives_ok($$SELECT saga.create_destination('privs_admin_dest', 'http://127.0.0.1:1/admin',
	'{"backoff": "1 hour", "max_backoff": "1 hour"}')$$, 'a delegated admin can create a destination');
SELECT lives_ok($$SELECT saga.subscribe('privs.admin', 'privs_admin_dest')$$, 'a delegated admin can subscribe');
SELECT lives_ok(format($$SELECT saga.redeliver(%L)$$, :'app_msg'), 'a delegated admin can redeliver');
SELECT ok((SELECT count(*) FROM saga.metrics() WHERE labels ->> 'destination' = 'privs_admin_dest') > 0,
	'a delegated admin can read metrics');
SELECT lives_ok($$SELECT saga.unsubscribe('privs.admin', 'privs_admin_dest')$$, 'a delegated admin can unsubscribe');
SELECT lives_ok($$SELECT saga.drop_destination('privs_admin_dest')$$, 'a delegated admin can drop a destination');
SELECT throws_ok($$SELECT * FROM saga.destinations$$, '42501', NULL,
	'a delegated admin still cannot read the tables directly');
SELECT throws_ok($$SELECT * FROM saga.queue$$, '42501', NULL, 'nor the queue');
SELECT is(current_user::text, 'saga_test_admin', 'the admin is still itself after the owner switch');
SELECT is(session_user::text, (SELECT session_user::text), 'the session user is untouched');
RESET ROLE;
SELECT is((SELECT count(*) FROM saga.destinations WHERE name = 'privs_admin_dest')::int, 0,
	'the delegated admin''s create and drop took effect');

-- An admin function refuses before doing anything when EXECUTE is revoked
-- again, even inside the same transaction
REVOKE EXECUTE ON FUNCTION saga.create_destination(text, text, jsonb) FROM saga_test_admin;
SET ROLE saga_test_admin;
SELECT throws_ok($$SELECT saga.create_destination('privs_late', 'notify:late')$$, '42501', NULL,
	'revoking EXECUTE takes effect at once');
RESET ROLE;

-- saga.message() of an unknown id is an error, not NULL
SET ROLE saga_test_app;
SELECT throws_ok($$SELECT saga.message('00000000-0000-7000-8000-000000000000')$$, '42704', NULL,
	'saga.message() of an unknown id is an error');
RESET ROLE;

-- a role with no USAGE on the schema cannot reach even the public API
REVOKE USAGE ON SCHEMA saga FROM PUBLIC;
SET ROLE saga_test_app;
SELECT throws_ok($$SELECT saga.publish('privs.order.placed', '{}')$$, '42501', NULL,
	'without USAGE on schema saga, publish is refused');
RESET ROLE;
GRANT USAGE ON SCHEMA saga TO PUBLIC;

-- the worker's view of the world is not changed by any of the above
SELECT is((SELECT count(*) FROM saga.destinations WHERE name LIKE 'privs\_%')::int, 1,
	'only the superuser''s destination exists');
SELECT is((SELECT headers FROM saga.destinations WHERE name = 'privs_hook'),
	'{"Authorization": "Bearer top-secret"}'::jsonb, 'destination headers are stored as given');

SELECT * FROM finish();
ROLLBACK;
