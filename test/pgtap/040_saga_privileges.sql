-- Sagas and roles: every role may use the saga API, nothing internal is
-- open to PUBLIC, a role sees and controls only its own sagas (members of
-- the extension's owner see and control all), a saga name belongs to the
-- role that defined it, step functions are checked against the caller's
-- privileges, and nothing on the caller's search_path is used by saga's
-- own code. Everything happens in one transaction that rolls back: the
-- worker never sees these sagas.
\set ON_ERROR_STOP 1
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off

BEGIN;
SELECT plan(104);

CREATE ROLE saga_test_app_a;
CREATE ROLE saga_test_app_b;
-- PUBLIC's rights only
CREATE ROLE saga_test_nobody;
-- an administrator: a member of the extension's owner, not superuser
CREATE ROLE saga_test_admin;
SELECT format('GRANT %I TO saga_test_admin', pg_get_userbyid(extowner)) AS grant_owner
FROM pg_extension WHERE extname = 'saga' \gset
:grant_owner;
-- role names that need quoting
CREATE ROLE "saga_test_App_a";
CREATE ROLE "saga_test_app c";

-- step functions: one everybody may run, one only app_a may run, one in a
-- schema nobody else may use, and app_a's own, in the schema named after it
-- (the first entry of the default search_path, "$user")
CREATE SCHEMA saga_test_fns;
GRANT USAGE ON SCHEMA saga_test_fns TO PUBLIC;
CREATE FUNCTION saga_test_fns.step_ok(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION saga_test_fns.step_private(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
REVOKE EXECUTE ON FUNCTION saga_test_fns.step_private(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION saga_test_fns.step_private(jsonb) TO saga_test_app_a;
CREATE SCHEMA saga_test_hidden;
CREATE FUNCTION saga_test_hidden.step(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE SCHEMA saga_test_app_a AUTHORIZATION saga_test_app_a;
CREATE FUNCTION saga_test_app_a.own_step(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
ALTER FUNCTION saga_test_app_a.own_step(jsonb) OWNER TO saga_test_app_a;
-- runs a statement as the current role: its SQLSTATE, or 'ok'
CREATE FUNCTION saga_test_fns.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END $$;
-- runs a statement as the current role; its uuid result, or NULL if it failed
CREATE FUNCTION saga_test_fns.uuid_or_null(stmt text) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
	r uuid;
BEGIN
	EXECUTE stmt INTO r;
	RETURN r;
EXCEPTION WHEN OTHERS THEN
	RETURN NULL;
END $$;

-- ---------- what PUBLIC may use ----------

SELECT function_privs_are('saga', 'define', ARRAY['text', 'jsonb'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'start', ARRAY['text', 'jsonb', 'text'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'begin', ARRAY['text', 'jsonb', 'text', 'interval'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'step', ARRAY['uuid', 'text', 'jsonb', 'jsonb'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'complete', ARRAY['uuid', 'jsonb'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'fail', ARRAY['uuid', 'text'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'cancel', ARRAY['uuid', 'text'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'retry', ARRAY['uuid'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'get', ARRAY['uuid'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'wait', ARRAY['uuid', 'interval'], 'public', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'define', ARRAY['text', 'jsonb'], 'saga_test_nobody', ARRAY['EXECUTE']);
SELECT function_privs_are('saga', 'start', ARRAY['text', 'jsonb', 'text'], 'saga_test_nobody', ARRAY['EXECUTE']);
SELECT table_privs_are('saga', 'sagas', 'public', ARRAY['SELECT']);
SELECT table_privs_are('saga', 'saga_steps', 'public', ARRAY['SELECT']);
SELECT table_privs_are('saga', 'stuck', 'public', ARRAY['SELECT']);

-- the internals are not: every saga._* function but _may_control (the
-- views' filter), and the tables
SELECT is_empty($$
	SELECT p.oid::regprocedure::text FROM pg_proc p
	WHERE p.pronamespace = 'saga'::regnamespace AND p.proname LIKE '\_%' AND p.proname <> '_may_control'
	  AND has_function_privilege('public', p.oid, 'EXECUTE')
$$, 'PUBLIC may execute no internal saga._* function');
SELECT cmp_ok((SELECT count(*) FROM pg_proc WHERE pronamespace = 'saga'::regnamespace AND proname LIKE '\_%'),
	'>=', 15::bigint, 'the check above saw the internal functions');
SELECT function_privs_are('saga', '_may_control', ARRAY['oid', 'oid'], 'public', ARRAY['EXECUTE']);
SELECT table_privs_are('saga', 'definitions', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'instances', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'instance_steps', 'public', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'definitions', 'saga_test_nobody', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'instances', 'saga_test_nobody', ARRAY[]::text[]);
SELECT table_privs_are('saga', 'instance_steps', 'saga_test_nobody', ARRAY[]::text[]);
SELECT is_empty($$
	SELECT c.oid::regclass::text || ': ' || a.privilege_type
	FROM pg_class c, aclexplode(c.relacl) a
	WHERE c.relnamespace = 'saga'::regnamespace AND a.grantee = 0
	  AND NOT (c.relname IN ('sagas', 'saga_steps', 'stuck') AND a.privilege_type = 'SELECT')
$$, 'PUBLIC has nothing on any relation of schema saga but SELECT on the three saga views');

SET ROLE saga_test_nobody;
SELECT throws_ok($$SELECT * FROM saga.instances$$, '42501', NULL, 'a role cannot read saga.instances');
SELECT throws_ok($$SELECT * FROM saga.instance_steps$$, '42501', NULL, 'a role cannot read saga.instance_steps');
SELECT throws_ok($$SELECT * FROM saga.definitions$$, '42501', NULL, 'a role cannot read saga.definitions');
SELECT throws_ok($$INSERT INTO saga.instances (id, name, driver, status, input, owner)
				   VALUES (gen_random_uuid(), 'forged', 'worker', 'running', '{}', 10)$$, '42501', NULL,
	'a role cannot forge a saga run as another role');
SELECT throws_ok($$UPDATE saga.definitions SET steps = '[]'$$, '42501', NULL, 'a role cannot rewrite definitions');
SELECT throws_ok($$SELECT saga._define('forged', '{"steps": [{"name": "a", "action": "saga_test_fns.step_ok"}]}', 10, 'public')$$,
	'42501', 'permission denied for function _define', 'a role cannot call saga._define with another caller');
SELECT throws_ok($$SELECT saga._start('forged', '{}', NULL, 10, gen_random_uuid())$$,
	'42501', 'permission denied for function _start', 'a role cannot call saga._start with another caller');
SELECT throws_ok($$SELECT * FROM saga._claim(10)$$, '42501', 'permission denied for function _claim',
	'a role cannot claim sagas as the worker');
SELECT lives_ok($$SELECT * FROM saga.sagas$$, 'a role can read saga.sagas');
SELECT is((SELECT count(*) FROM saga.sagas)::int, 0, 'a role without sagas sees none');
RESET ROLE;

-- ---------- sagas of two roles ----------

SET ROLE saga_test_app_a;
SELECT lives_ok($$SELECT saga.define('saga_test_a_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_private"}]}')$$,
	'app_a defines a saga with a function it may execute');
SELECT saga.begin('saga_test_a_app', '{"owner": "a"}') AS a_app \gset
SELECT saga.step(:'a_app', 'reserve', '{"function": "saga_test_fns.step_ok", "args": {"n": 1}}', '{"r": 1}');
SELECT saga.start('saga_test_a_flow', '{"owner": "a"}') AS a_flow \gset
RESET ROLE;
SET ROLE saga_test_app_b;
SELECT saga.begin('saga_test_b_app', '{"owner": "b"}') AS b_app \gset
SELECT saga.step(:'b_app', 'reserve', NULL, '{"r": 2}');
RESET ROLE;
-- app_a's application saga is past its deadline, so saga.stuck lists it
UPDATE saga.instances SET deadline = now() - interval '1 minute' WHERE id = :'a_app';

SET ROLE saga_test_app_a;
SELECT set_eq($$SELECT name FROM saga.sagas$$, ARRAY['saga_test_a_app', 'saga_test_a_flow'],
	'app_a sees its own sagas only');
SELECT set_eq($$SELECT step FROM saga.saga_steps$$, ARRAY['reserve'], 'app_a sees its own steps only');
SELECT is((SELECT string_agg(saga_id::text, ',') FROM saga.saga_steps), :'a_app', 'app_a''s step is its saga''s');
SELECT set_eq($$SELECT name FROM saga.stuck$$, ARRAY['saga_test_a_app'], 'app_a sees its saga past its deadline in saga.stuck');
SELECT is(saga.get(:'a_app') ->> 'name', 'saga_test_a_app', 'app_a can get its saga');
SELECT is(saga.wait(:'a_flow', '0s'), 'running', 'app_a can wait for its saga');
RESET ROLE;

SET ROLE saga_test_app_b;
SELECT set_eq($$SELECT name FROM saga.sagas$$, ARRAY['saga_test_b_app'], 'app_b does not see app_a''s sagas');
SELECT is((SELECT count(*) FROM saga.saga_steps WHERE saga_id IN (:'a_app', :'a_flow'))::int, 0,
	'app_b does not see app_a''s steps');
SELECT is((SELECT count(*) FROM saga.stuck)::int, 0, 'app_b does not see app_a''s stuck saga');
SELECT throws_ok(format($$SELECT saga.get(%L)$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot get app_a''s saga');
SELECT throws_ok(format($$SELECT saga.wait(%L, '0s')$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot wait for app_a''s saga');
SELECT throws_ok(format($$SELECT saga.step(%L, 'evil')$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot record a step in app_a''s saga');
SELECT throws_ok(format($$SELECT saga.complete(%L)$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot complete app_a''s saga');
SELECT throws_ok(format($$SELECT saga.fail(%L, 'evil')$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot fail app_a''s saga');
SELECT throws_ok(format($$SELECT saga.cancel(%L, 'evil')$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot cancel app_a''s application saga');
SELECT throws_ok(format($$SELECT saga.cancel(%L, 'evil')$$, :'a_flow'), '42704', format('saga %s does not exist', :'a_flow'),
	'app_b cannot cancel app_a''s worker saga');
SELECT throws_ok(format($$SELECT saga.retry(%L)$$, :'a_app'), '42704', format('saga %s does not exist', :'a_app'),
	'app_b cannot retry app_a''s saga');
-- a saga name is app_a's: app_b cannot redefine it
SELECT throws_ok($$SELECT saga.define('saga_test_a_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok"}]}')$$,
	'42501', 'permission denied to redefine saga "saga_test_a_flow"', 'app_b cannot redefine app_a''s saga');
RESET ROLE;
-- an idempotency key app_a used does not hand app_a's saga to app_b
-- (whether app_b gets an error or a saga of its own)
SET ROLE saga_test_app_a;
SELECT saga.begin('saga_test_keyed', '{}', 'shared-key') AS a_keyed \gset
SELECT saga.start('saga_test_a_flow', '{}', 'shared-key') AS a_keyed_flow \gset
RESET ROLE;
SET ROLE saga_test_app_b;
SELECT isnt(saga_test_fns.uuid_or_null($$SELECT saga.begin('saga_test_keyed', '{}', 'shared-key')$$), :'a_keyed'::uuid,
	'saga.begin with app_a''s idempotency key does not return app_a''s saga to app_b');
SELECT isnt(saga_test_fns.uuid_or_null($$SELECT saga.start('saga_test_a_flow', '{}', 'shared-key')$$), :'a_keyed_flow'::uuid,
	'saga.start with app_a''s idempotency key does not return app_a''s saga to app_b');
RESET ROLE;
-- app_a's sagas are as they were
SELECT results_eq(format($$SELECT status, error FROM saga.instances WHERE id IN (%L, %L) ORDER BY driver$$, :'a_app', :'a_flow'),
	$$VALUES ('running'::text, NULL::text), ('running', NULL)$$, 'app_b changed nothing in app_a''s sagas');
SELECT is((SELECT count(*) FROM saga.instance_steps WHERE saga_id = :'a_app')::int, 1, 'app_b added no step to app_a''s saga');
SELECT results_eq($$SELECT version, owner::regrole::text FROM saga.definitions WHERE name = 'saga_test_a_flow' ORDER BY version$$,
	$$VALUES (1, 'saga_test_app_a')$$, 'app_a''s definition is untouched');

-- app_a itself may redefine its saga
SET ROLE saga_test_app_a;
SELECT is(saga.define('saga_test_a_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok"}]}'), 2,
	'app_a redefines its saga');
RESET ROLE;

-- the administrator sees and controls every saga
SET ROLE saga_test_admin;
SELECT ok((SELECT rolsuper FROM pg_roles WHERE rolname = current_user) IS FALSE, 'the administrator is not superuser');
SELECT set_eq($$SELECT name FROM saga.sagas WHERE name LIKE 'saga\_test\_%' AND owner IN ('saga_test_app_a', 'saga_test_app_b')$$,
	ARRAY['saga_test_a_app', 'saga_test_a_flow', 'saga_test_b_app', 'saga_test_keyed', 'saga_test_a_flow'],
	'the administrator sees the sagas of both roles');
SELECT set_eq($$SELECT owner FROM saga.sagas WHERE id IN (SELECT saga_id FROM saga.saga_steps) AND owner LIKE 'saga\_test\_%'$$,
	ARRAY['saga_test_app_a', 'saga_test_app_b'], 'the administrator sees the steps of both roles');
SELECT ok((SELECT count(*) FROM saga.stuck WHERE id = :'a_app') = 1, 'the administrator sees app_a''s stuck saga');
SELECT is(saga.get(:'b_app') ->> 'name', 'saga_test_b_app', 'the administrator can get app_b''s saga');
SELECT lives_ok(format($$SELECT saga.cancel(%L, 'by the administrator')$$, :'b_app'), 'the administrator can cancel app_b''s saga');
SELECT is(saga.define('saga_test_a_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok"}]}'), 3,
	'the administrator can redefine app_a''s saga');
RESET ROLE;
SELECT results_eq(format($$SELECT status, error FROM saga.instances WHERE id = %L$$, :'b_app'),
	$$VALUES ('compensating'::text, 'by the administrator'::text)$$, 'the administrator''s cancel took effect');
SELECT is((SELECT owner::regrole::text FROM saga.definitions WHERE name = 'saga_test_a_flow' AND version = 3),
	'saga_test_app_a', 'the name stays app_a''s after the administrator''s redefinition');

-- ---------- step functions and the caller's privileges ----------

SET ROLE saga_test_app_b;
SELECT throws_ok($$SELECT saga.define('saga_test_b_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_private"}]}')$$,
	'42501', NULL, 'app_b cannot define a saga whose action it may not execute');
SELECT throws_ok($$SELECT saga.define('saga_test_b_flow', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok", "compensation": "saga_test_fns.step_private"}]}')$$,
	'42501', NULL, 'app_b cannot define a saga whose compensation it may not execute');
SELECT saga.begin('saga_test_b_app2') AS b_app2 \gset
SELECT throws_ok(format($$SELECT saga.step(%L, 'two', '{"function": "saga_test_fns.step_private"}')$$, :'b_app2'),
	'42501', NULL, 'app_b cannot register a compensation it may not execute');
-- a schema app_b may not use hides its functions, whatever their EXECUTE grants
SELECT throws_ok($$SELECT saga_test_hidden.step('{}')$$, '42501', NULL, 'app_b cannot call saga_test_hidden.step itself');
SELECT throws_ok($$SELECT saga.define('saga_test_b_hidden', '{"steps": [{"name": "one", "action": "saga_test_hidden.step"}]}')$$,
	'42501', NULL, 'app_b cannot define a saga with a function in a schema it may not use');
SELECT throws_ok($$SELECT saga.define('saga_test_b_hidden', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok", "compensation": "saga_test_hidden.step"}]}')$$,
	'42501', NULL, 'nor as a compensation');
RESET ROLE;
SELECT is((SELECT count(*) FROM saga.definitions WHERE name LIKE 'saga\_test\_b\_%')::int, 0, 'app_b defined nothing');
SELECT is((SELECT count(*) FROM saga.instance_steps WHERE saga_id = :'b_app2')::int, 0, 'app_b registered no step');

-- "$user" on the caller's search_path is the caller, not saga's owner
SET ROLE saga_test_app_a;
SELECT is(current_setting('search_path'), '"$user", public', 'app_a has the default search_path');
SELECT lives_ok($$SELECT saga.define('saga_test_a_user', '{"steps": [{"name": "one", "action": "own_step"}]}')$$,
	'app_a defines a saga with a function of its own schema, found through "$user"');
RESET ROLE;
SELECT is((SELECT steps -> 0 -> 'action' ->> 'function' FROM saga.definitions WHERE name = 'saga_test_a_user'),
	'saga_test_app_a.own_step(jsonb)', 'the action is app_a''s function');

-- ---------- role names that need quoting ----------

-- "saga_test_App_a" is not saga_test_app_a
SET ROLE "saga_test_App_a";
SELECT is((SELECT count(*) FROM saga.sagas)::int, 0, 'a role whose name differs in case sees none of app_a''s sagas');
SELECT is((SELECT count(*) FROM saga.saga_steps)::int, 0, 'nor their steps');
SELECT is((SELECT count(*) FROM saga.stuck)::int, 0, 'nor app_a''s stuck saga');
SELECT throws_ok(format($$SELECT saga.get(%L)$$, :'a_app'), '42704', NULL, 'nor can it get app_a''s saga');
RESET ROLE;
-- a role name with a space can use the views
SET ROLE "saga_test_app c";
SELECT saga.begin('saga_test_c_app') AS c_app \gset
SELECT lives_ok($$SELECT * FROM saga.sagas$$, 'a role named with a space can read saga.sagas');
SELECT lives_ok($$SELECT * FROM saga.saga_steps$$, 'a role named with a space can read saga.saga_steps');
SELECT lives_ok($$SELECT * FROM saga.stuck$$, 'a role named with a space can read saga.stuck');
SELECT is(saga.get(:'c_app') ->> 'name', 'saga_test_c_app', 'a role named with a space can get its saga');
RESET ROLE;

-- ---------- search_path hijacking ----------

-- Look-alikes of what saga's SQL uses, in public and pg_temp, record every
-- call and try to make their caller superuser.
CREATE TABLE saga_test_fns.calls (what text, called_as text);
GRANT INSERT ON saga_test_fns.calls TO PUBLIC;
CREATE FUNCTION saga_test_fns.record(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO saga_test_fns.calls VALUES (what, current_user);
	BEGIN
		EXECUTE 'ALTER ROLE saga_test_app_b SUPERUSER';
	EXCEPTION WHEN OTHERS THEN
		NULL;
	END;
END $$;
GRANT CREATE ON SCHEMA public TO saga_test_app_b;
SET ROLE saga_test_app_b;
CREATE FUNCTION public.jsonb_typeof(j jsonb) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('jsonb_typeof'); RETURN pg_catalog.jsonb_typeof(j); END $$;
CREATE FUNCTION public.jsonb_array_length(j jsonb) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('jsonb_array_length'); RETURN pg_catalog.jsonb_array_length(j); END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION public.to_regprocedure(t text) RETURNS regprocedure LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('to_regprocedure'); RETURN pg_catalog.to_regprocedure(t); END $$;
CREATE FUNCTION public.set_config(a text, b text, c boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('set_config'); RETURN pg_catalog.set_config(a, b, c); END $$;
CREATE FUNCTION public.saga_test_text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('=(text,text)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.saga_test_text_eq);
CREATE FUNCTION public.saga_test_uuid_eq(a uuid, b uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('=(uuid,uuid)'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.saga_test_uuid_eq);
CREATE FUNCTION public.saga_test_jsonb_arrow(a jsonb, b text) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM saga_test_fns.record('->(jsonb,text)'); RETURN a OPERATOR(pg_catalog.->) b; END $$;
CREATE OPERATOR public.-> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = public.saga_test_jsonb_arrow);
-- tables named like saga's, in public and as temporary tables
CREATE TABLE public.definitions (name text, version integer, definition jsonb, steps jsonb, deadline interval, owner oid);
CREATE TABLE public.instances (id uuid, name text);
CREATE TEMP TABLE definitions (name text, version integer, definition jsonb, steps jsonb, deadline interval, owner oid);
CREATE TEMP TABLE instances (id uuid, name text);
CREATE TEMP TABLE instance_steps (saga_id uuid, step text);
-- a look-alike definition that would run saga_test_fns.step_private
INSERT INTO public.definitions VALUES ('saga_test_a_flow', 99, '{}',
	'[{"name": "x", "action": {"kind": "function", "function": "saga_test_fns.step_private(jsonb)"}}]', NULL, 0);
INSERT INTO definitions SELECT * FROM public.definitions;
RESET ROLE;

-- the look-alikes work when the caller's own SQL uses them
SET ROLE saga_test_app_b;
SET search_path = public, pg_catalog;
SELECT 'a'::text = 'b'::text AS self_test \gset
RESET search_path;
RESET ROLE;
SELECT isnt((SELECT count(*) FROM saga_test_fns.calls)::int, 0, 'the look-alike operator records its calls');
TRUNCATE saga_test_fns.calls;

-- define, start, begin, step, get, cancel with public first, then pg_temp first
SET ROLE saga_test_app_b;
SET search_path = public, pg_catalog;
SELECT saga.define('saga_test_b_hijack', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok"}], "deadline": "1 hour"}') AS b_version \gset
SELECT saga.start('saga_test_b_hijack', '{"n": 1}', 'hijack-1') AS b_hijack \gset
SELECT saga.start('saga_test_a_flow', '{"n": 2}') AS b_on_a_flow \gset
SELECT saga.begin('saga_test_b_hijack_app', '{"n": 3}') AS b_hijack_app \gset
SELECT saga.step(:'b_hijack_app', 'one', '{"function": "saga_test_fns.step_ok"}') AS ignored \gset
SELECT saga.get(:'b_hijack') ->> 'status' AS b_hijack_status \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM saga_test_fns.calls), NULL,
	'define, start, begin, step and get run none of the caller''s functions or operators (public first)');
SELECT is(:'b_version'::int, 1, 'define stored version 1 in saga.definitions');
SELECT is((SELECT count(*) FROM public.definitions)::int, 1, 'define wrote nothing into a look-alike table');
SELECT results_eq($$SELECT d.steps -> 0 -> 'action' ->> 'function' FROM saga.definitions d WHERE d.name = 'saga_test_b_hijack'$$,
	$$VALUES ('saga_test_fns.step_ok(jsonb)')$$, 'the stored definition is the one given');
SELECT results_eq(format($$SELECT name, version, owner::regrole::text, deadline IS NOT NULL FROM saga.instances WHERE id = %L$$, :'b_on_a_flow'),
	$$VALUES ('saga_test_a_flow'::text, 3, 'saga_test_app_b'::text, false)$$,
	'start took the latest version from saga.definitions, not a look-alike');
SELECT is(:'b_hijack_status'::text, 'running', 'get answered');
TRUNCATE saga_test_fns.calls;

SET ROLE saga_test_app_b;
SET search_path = pg_temp, public, pg_catalog;
SELECT saga.define('saga_test_b_hijack', '{"steps": [{"name": "one", "action": "saga_test_fns.step_ok"}]}') AS b_version2 \gset
SELECT saga.start('saga_test_b_hijack', '{"n": 1}', 'hijack-1') AS b_hijack_again \gset
SELECT saga.start('saga_test_a_flow', '{"n": 4}') AS b_on_a_flow2 \gset
SELECT saga.cancel(:'b_hijack', 'stop') AS ignored \gset
RESET search_path;
RESET ROLE;
SELECT is((SELECT string_agg(DISTINCT what || ' as ' || called_as, ', ') FROM saga_test_fns.calls), NULL,
	'define, start and cancel run none of the caller''s functions or operators (pg_temp first)');
SELECT is(:'b_version2'::int, 2, 'define ignored the temporary look-alike table');
SELECT is(:'b_hijack_again'::uuid, :'b_hijack'::uuid, 'start found the idempotency key in saga.instances, not in a look-alike');
SELECT results_eq(format($$SELECT version FROM saga.instances WHERE id = %L$$, :'b_on_a_flow2'),
	$$VALUES (3)$$, 'start ignored the temporary look-alike definition');
SELECT is((SELECT status FROM saga.instances WHERE id = :'b_hijack'), 'compensating', 'cancel took effect');
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'saga_test_app_b'), false,
	'no saga function let the caller make itself superuser');

-- A type named jsonb ahead of pg_catalog on the caller's search_path: a
-- function taking it is not a step function (the worker would pass it a
-- real jsonb, read as another type).
CREATE SCHEMA saga_test_b AUTHORIZATION saga_test_app_b;
SET ROLE saga_test_app_b;
CREATE TYPE saga_test_b.jsonb AS (a integer, b text);
CREATE FUNCTION saga_test_b.fake_step(ctx saga_test_b.jsonb) RETURNS pg_catalog.jsonb LANGUAGE sql
	AS $$ SELECT pg_catalog.to_jsonb(ctx.b) $$;
SELECT saga.begin('saga_test_b_fake') AS b_fake \gset
SET search_path = saga_test_b, pg_catalog;
SELECT saga_test_fns.sqlstate_of($$SELECT saga.define('saga_test_b_fake', '{"steps": [{"name": "one", "action": "fake_step"}]}')$$) AS fake_define \gset
SELECT saga_test_fns.sqlstate_of(format($$SELECT saga.step(%L, 'one', '{"function": "fake_step"}')$$, :'b_fake')) AS fake_step \gset
RESET search_path;
RESET ROLE;
SELECT is(:'fake_define'::text, '42883', 'define does not take a function of a look-alike jsonb type for a step function');
SELECT is(:'fake_step'::text, '42883', 'step does not take a function of a look-alike jsonb type for a compensation');
SELECT is((SELECT count(*) FROM saga.definitions WHERE name = 'saga_test_b_fake')::int, 0,
	'no definition calls the look-alike function');

SELECT * FROM finish();
ROLLBACK;
