-- search_path hijacking: saga's functions run their SQL as the extension's
-- owner, so nothing a caller puts on its search_path (functions, operators,
-- tables named like saga's) may be used by them. A role that owns a schema
-- creates look-alikes there and in public, puts them first on its
-- search_path and calls every saga function; the look-alikes record every
-- call and try to make the role superuser.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off

BEGIN;
SELECT plan(27);

CREATE ROLE saga_test_hijacker;
CREATE SCHEMA hijack AUTHORIZATION saga_test_hijacker;
-- as on databases created before PostgreSQL 15, anyone may create in public
GRANT CREATE ON SCHEMA public TO saga_test_hijacker;
-- a delegated administrator: may call the admin functions, nothing more
GRANT EXECUTE ON FUNCTION saga.create_destination(text, text, jsonb), saga.drop_destination(text),
	saga.subscribe(text, text), saga.unsubscribe(text, text), saga.redeliver(uuid, text),
	saga.metrics() TO saga_test_hijacker;

DO $$
BEGIN
	PERFORM saga.create_destination('sp_hook', 'http://127.0.0.1:1/hook', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
	PERFORM saga.create_destination('sp_other', 'http://127.0.0.1:1/other', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
	PERFORM saga.subscribe('sp.order.*', 'sp_hook');
END $$;
CREATE FUNCTION public.sp_step(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
SELECT saga.define('sp_flow', '{"steps": [{"name": "one", "action": "public.sp_step"}], "deadline": "1 hour"}')
	AS ignored \gset

SET ROLE saga_test_hijacker;
CREATE TABLE hijack.calls (what text, called_as text);
GRANT INSERT ON hijack.calls TO PUBLIC;

-- record a call, and try to become superuser while running as someone else
CREATE FUNCTION hijack.record(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO hijack.calls VALUES (what, current_user);
	BEGIN
		EXECUTE 'ALTER ROLE saga_test_hijacker SUPERUSER';
	EXCEPTION WHEN OTHERS THEN
		NULL;
	END;
END $$;

-- operators that answer correctly, so only the record shows they ran
CREATE FUNCTION hijack.text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('=(text,text)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR hijack.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hijack.text_eq);
CREATE FUNCTION hijack.uuid_eq(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('=(uuid,uuid)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR hijack.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = hijack.uuid_eq);
CREATE FUNCTION hijack.int8_mul_interval(a bigint, b interval) RETURNS interval LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('*(bigint,interval)'); RETURN a::float8 OPERATOR(pg_catalog.*) b; END $$;
CREATE OPERATOR hijack.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = hijack.int8_mul_interval);
CREATE FUNCTION hijack.ts_le(a timestamptz, b timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('<=(timestamptz,timestamptz)'); RETURN a OPERATOR(pg_catalog.<=) b; END $$;
CREATE OPERATOR hijack.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = hijack.ts_le);
CREATE FUNCTION hijack.ts_plus_interval(a timestamptz, b interval) RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('+(timestamptz,interval)'); RETURN a OPERATOR(pg_catalog.+) b; END $$;
CREATE OPERATOR hijack.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = hijack.ts_plus_interval);
-- functions with the names of built-ins
CREATE FUNCTION hijack.starts_with(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('starts_with'); RETURN pg_catalog.starts_with(a, b); END $$;
CREATE FUNCTION hijack.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION hijack.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('nextval'); RETURN pg_catalog.nextval($1); END $$;
-- tables named like saga's: a subscription that would send the order
-- topics to sp_other if saga read it
CREATE TABLE hijack.subscriptions (pattern text, destination text, prefix text);
INSERT INTO hijack.subscriptions VALUES ('sp.order.placed', 'sp_other', NULL), ('sp.*', 'sp_other', 'sp.');
CREATE TABLE hijack.destinations (name text, kind text, target text);
INSERT INTO hijack.destinations VALUES ('sp_hook', 'http', 'http://attacker.invalid/');
CREATE TABLE hijack.queue (message_id uuid, destination text, topic text, key text, payload jsonb,
	headers jsonb, next_attempt_at timestamptz, seq bigint);
CREATE TABLE hijack.definitions (name text, version integer, deadline interval);
INSERT INTO hijack.definitions VALUES ('sp_flow', 99, '1 second');
-- the same in public, for callers whose search_path starts with public
CREATE FUNCTION public.starts_with(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('public.starts_with'); RETURN pg_catalog.starts_with(a, b); END $$;
CREATE FUNCTION public.saga_test_text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM hijack.record('public.=(text,text)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.saga_test_text_eq);
CREATE TABLE public.subscriptions (pattern text, destination text, prefix text);
INSERT INTO public.subscriptions VALUES ('sp.order.placed', 'sp_other', NULL);
RESET ROLE;

-- the look-alikes work: called directly (as their owner, who cannot make
-- itself superuser), they record
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT 'a'::text = 'a'::text AS self_test \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'saga_test_hijacker'), false,
	'the hijacker is not superuser to begin with');
SELECT isnt((SELECT count(*) FROM hijack.calls)::int, 0, 'the look-alike operator records its calls');
TRUNCATE hijack.calls;

-- publish, with the look-alikes first on the search_path
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.publish('sp.order.placed', '{"n": 1}', 'k1', '{"X-A": "b"}') AS sp_msg \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'publish runs none of the caller''s functions or operators');
SELECT results_eq(format($$SELECT destination FROM saga.queue WHERE message_id = %L$$, :'sp_msg'),
	$$VALUES ('sp_hook'::text)$$, 'publish routes by saga.subscriptions only');
SELECT is((SELECT count(*) FROM hijack.queue)::int, 0, 'publish does not write into a look-alike queue');
TRUNCATE hijack.calls;

-- publish, with public first
SET ROLE saga_test_hijacker;
SET search_path = public, pg_catalog;
SELECT saga.publish('sp.order.placed', '{"n": 2}') AS sp_msg2 \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'publish ignores public.starts_with and public.=');
SELECT results_eq(format($$SELECT destination FROM saga.queue WHERE message_id = %L$$, :'sp_msg2'),
	$$VALUES ('sp_hook'::text)$$, 'publish routes by saga.subscriptions only (public first)');
TRUNCATE hijack.calls;

-- publish, with pg_temp first and temporary look-alike tables
SET ROLE saga_test_hijacker;
CREATE TEMP TABLE subscriptions (pattern text, destination text, prefix text);
INSERT INTO subscriptions VALUES ('sp.order.placed', 'sp_other', NULL);
SET search_path = pg_temp, hijack, pg_catalog;
SELECT saga.publish('sp.order.placed', '{"n": 3}') AS sp_msg3 \gset
RESET search_path;
RESET ROLE;
SELECT results_eq(format($$SELECT destination FROM saga.queue WHERE message_id = %L$$, :'sp_msg3'),
	$$VALUES ('sp_hook'::text)$$, 'publish ignores temporary look-alike tables');
TRUNCATE hijack.calls;

-- start without a key: a kept insert that runs under the caller's search_path
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.start('sp_flow', '{"n": 1}') AS sp_saga \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'start runs none of the caller''s functions or operators');
SELECT results_eq(format($$SELECT version, deadline - started_at, owner::regrole::text FROM saga.instances WHERE id = %L$$, :'sp_saga'),
	$$VALUES (1, interval '1 hour', 'saga_test_hijacker')$$,
	'start reads saga.definitions only, and records the caller as the owner');
SELECT is((SELECT count(*) FROM saga.instances WHERE name = 'sp_flow')::int, 1, 'start inserted one saga');
TRUNCATE hijack.calls;

-- message
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.message(:'sp_msg') ->> 'topic' AS sp_topic \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'message runs none of the caller''s functions or operators');
SELECT is(:'sp_topic'::text, 'sp.order.placed', 'message still answers');
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'saga_test_hijacker'), false,
	'saga.message(), which every role may call, did not let the caller make itself superuser');
TRUNCATE hijack.calls;

-- worker_status
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT count(*) AS n_workers FROM saga.worker_status() \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'worker_status runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

-- the admin functions, called by a delegated administrator
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.create_destination('sp_new', 'http://127.0.0.1:1/new') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'create_destination runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

-- pg_catalog first (implicitly) is no protection against an operator that
-- matches argument types pg_catalog has no exact match for
SET ROLE saga_test_hijacker;
SET search_path = hijack;
SELECT saga.create_destination('sp_new2', 'http://127.0.0.1:1/new2') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'create_destination runs none of the caller''s operators with pg_catalog first on the search_path');
TRUNCATE hijack.calls;

SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.subscribe('sp.new', 'sp_new') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'subscribe runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.unsubscribe('sp.new', 'sp_new') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'unsubscribe runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.drop_destination('sp_new') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'drop_destination runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

UPDATE saga.queue SET status = 'dead', finished_at = pg_catalog.now() WHERE message_id = :'sp_msg';
SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT saga.redeliver(:'sp_msg', 'sp_hook') AS sp_requeued \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'redeliver runs none of the caller''s functions or operators');
SELECT is(:'sp_requeued'::int, 1, 'redeliver still requeues the dead letter');
TRUNCATE hijack.calls;

SET ROLE saga_test_hijacker;
SET search_path = hijack, pg_catalog;
SELECT count(*) AS n_metrics FROM saga.metrics() \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM hijack.calls), NULL,
	'metrics runs none of the caller''s functions or operators');
TRUNCATE hijack.calls;

-- whatever ran, it must not have run with the owner's rights
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'saga_test_hijacker'), false,
	'no saga function let the caller make itself superuser');
SELECT is((SELECT count(*) FROM saga.destinations WHERE name = 'sp_new')::int, 0,
	'the admin calls took effect as asked (sp_new created and dropped)');
SELECT is((SELECT count(*) FROM saga.queue WHERE destination = 'sp_other')::int, 0,
	'nothing was routed by a look-alike subscription');
SELECT is((SELECT target FROM saga.destinations WHERE name = 'sp_hook'), 'http://127.0.0.1:1/hook',
	'the destination the worker uses is the one saga stored');

SELECT * FROM finish();
ROLLBACK;
