-- saga.invoke and saga.compensate: an action runs once per key, a repeat
-- returns the stored result, a compensation runs once and only after its
-- action, a compensation that comes first leaves a tombstone that refuses the
-- action; rollbacks leave nothing; functions run as the caller; bad input.
-- (Concurrent calls are covered by test/t/060_invoke_concurrency.pl.)

-- Every run of an action or compensation leaves a row here; "n" in a result
-- is how many times the action of that key has run, so a repeat that ran the
-- function again would show n = 2.
CREATE TABLE inv_effects (id serial, key text, kind text, who name, input jsonb);
CREATE FUNCTION inv_do(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_effects (key, kind, who, input) VALUES (ctx->>'key', 'do', current_user, ctx);
	RETURN jsonb_build_object('done', ctx->>'key',
		'n', (SELECT count(*) FROM inv_effects WHERE key = ctx->>'key' AND kind = 'do'));
END $$;
CREATE FUNCTION inv_undo(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_effects (key, kind, who, input) VALUES (ctx->>'key', 'undo', current_user, ctx);
	RETURN jsonb_build_object('undone', ctx->>'key',
		'n', (SELECT count(*) FROM inv_effects WHERE key = ctx->>'key' AND kind = 'undo'));
END $$;
CREATE FUNCTION inv_null(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_effects (key, kind, who, input) VALUES (ctx->>'key', 'null', current_user, ctx);
	RETURN NULL;
END $$;
CREATE FUNCTION inv_fail(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_effects (key, kind, who, input) VALUES (ctx->>'key', 'fail', current_user, ctx);
	RAISE EXCEPTION 'action % failed', ctx->>'key' USING ERRCODE = 'P0001';
END $$;
CREATE FUNCTION inv_effects_of(k text) RETURNS text LANGUAGE sql AS $$
	SELECT coalesce(string_agg(kind, ',' ORDER BY id), '(none)') FROM inv_effects WHERE key = k
$$;
CREATE FUNCTION inv_row(k text) RETURNS TABLE (status text, fn text, result jsonb, invoked boolean,
		invoked_by regrole, compensation_fn text, compensation_result jsonb, compensated boolean,
		compensated_by regrole)
LANGUAGE sql AS $$
	SELECT status, fn, result, invoked_at IS NOT NULL, invoked_by, compensation_fn,
		compensation_result, compensated_at IS NOT NULL, compensated_by
	FROM saga.invocations WHERE key = k
$$;

-- The action runs once; the repeat (even with another ctx) returns the
-- stored result without running it.
SELECT saga.invoke('inv-1', 'inv_do(jsonb)', '{"key": "inv-1"}');
SELECT saga.invoke('inv-1', 'inv_do(jsonb)', '{"key": "inv-1", "again": true}');
SELECT inv_effects_of('inv-1');
SELECT * FROM inv_row('inv-1');
-- the same key several times in one statement: one run
SELECT g, saga.invoke('inv-2', 'inv_do(jsonb)', '{"key": "inv-2"}') FROM generate_series(1, 3) g;
SELECT inv_effects_of('inv-2');
-- keys are exact: case and spaces matter
SELECT saga.invoke('INV-2', 'inv_do(jsonb)', '{"key": "INV-2"}');
SELECT saga.invoke('inv-2 ', 'inv_do(jsonb)', '{"key": "inv-2 "}');
-- a key already used by another action function is refused
SELECT try($$SELECT saga.invoke('inv-1', 'inv_undo(jsonb)', '{"key": "inv-1"}')$$);
SELECT inv_effects_of('inv-1');

-- Compensation after the action: runs once; the repeat returns its result;
-- a late repeat of the action is refused and does nothing.
SELECT saga.compensate('inv-1', 'inv_undo(jsonb)', '{"key": "inv-1"}');
SELECT saga.compensate('inv-1', 'inv_undo(jsonb)', '{"key": "inv-1", "again": true}');
SELECT inv_effects_of('inv-1');
SELECT * FROM inv_row('inv-1');
SELECT try($$SELECT saga.invoke('inv-1', 'inv_do(jsonb)', '{"key": "inv-1"}')$$);
SELECT try($$SELECT saga.compensate('inv-1', 'inv_do(jsonb)', '{"key": "inv-1"}')$$);
SELECT inv_effects_of('inv-1');

-- Compensation before the action: nothing runs, a tombstone stays, and the
-- late action is refused (55000) without running.
SELECT saga.compensate('inv-3', 'inv_undo(jsonb)', '{"key": "inv-3"}') IS NULL AS tombstone_returns_null;
SELECT * FROM inv_row('inv-3');
SELECT saga.compensate('inv-3', 'inv_undo(jsonb)', '{"key": "inv-3"}') IS NULL AS repeat_returns_null;
SELECT saga.invoke('inv-3', 'inv_do(jsonb)', '{"key": "inv-3"}');
SELECT try($$SELECT saga.invoke('inv-3', 'inv_do(jsonb)', '{"key": "inv-3"}')$$);
SELECT inv_effects_of('inv-3');
SELECT status FROM saga.invocations WHERE key = 'inv-3';

-- An action that returns NULL: recorded as executed with a NULL result; the
-- repeat returns NULL without running it.
SELECT saga.invoke('inv-4', 'inv_null(jsonb)', '{"key": "inv-4"}') IS NULL AS is_null;
SELECT saga.invoke('inv-4', 'inv_null(jsonb)', '{"key": "inv-4"}') IS NULL AS is_null;
SELECT inv_effects_of('inv-4');
SELECT status, result IS NULL AS result_is_null FROM saga.invocations WHERE key = 'inv-4';
-- and a compensation that returns NULL
SELECT saga.invoke('inv-4b', 'inv_do(jsonb)', '{"key": "inv-4b"}');
SELECT saga.compensate('inv-4b', 'inv_null(jsonb)', '{"key": "inv-4b"}') IS NULL AS is_null;
SELECT saga.compensate('inv-4b', 'inv_null(jsonb)', '{"key": "inv-4b"}') IS NULL AS is_null;
SELECT inv_effects_of('inv-4b');
SELECT status, compensation_result IS NULL AS result_is_null FROM saga.invocations WHERE key = 'inv-4b';

-- An action that fails: its error propagates and nothing is recorded, so the
-- next call runs it again.
SELECT try($$SELECT saga.invoke('inv-5', 'inv_fail(jsonb)', '{"key": "inv-5"}')$$);
SELECT count(*) FROM saga.invocations WHERE key = 'inv-5';
SELECT inv_effects_of('inv-5');
SELECT saga.invoke('inv-5', 'inv_do(jsonb)', '{"key": "inv-5"}');
-- a failing compensation leaves the action executed, to be compensated again
SELECT try($$SELECT saga.compensate('inv-5', 'inv_fail(jsonb)', '{"key": "inv-5"}')$$);
SELECT status FROM saga.invocations WHERE key = 'inv-5';
SELECT saga.compensate('inv-5', 'inv_undo(jsonb)', '{"key": "inv-5"}');
SELECT inv_effects_of('inv-5');

-- Rollbacks of the caller's transaction or savepoint leave no record.
BEGIN;
SELECT saga.invoke('inv-6', 'inv_do(jsonb)', '{"key": "inv-6"}');
ROLLBACK;
SELECT count(*) FROM saga.invocations WHERE key = 'inv-6';
SELECT saga.invoke('inv-6', 'inv_do(jsonb)', '{"key": "inv-6"}');
SELECT inv_effects_of('inv-6');
BEGIN;
SAVEPOINT s;
SELECT saga.invoke('inv-7', 'inv_do(jsonb)', '{"key": "inv-7"}');
ROLLBACK TO SAVEPOINT s;
SELECT saga.invoke('inv-7', 'inv_do(jsonb)', '{"key": "inv-7"}');
SELECT saga.invoke('inv-7', 'inv_do(jsonb)', '{"key": "inv-7"}');
COMMIT;
SELECT inv_effects_of('inv-7');
-- a rolled-back tombstone does not block the action
BEGIN;
SELECT saga.compensate('inv-8', 'inv_undo(jsonb)', '{"key": "inv-8"}') IS NULL AS tombstone;
ROLLBACK;
SELECT saga.invoke('inv-8', 'inv_do(jsonb)', '{"key": "inv-8"}');
-- a rolled-back compensation can be run again
BEGIN;
SELECT saga.compensate('inv-8', 'inv_undo(jsonb)', '{"key": "inv-8"}');
ROLLBACK;
SELECT status FROM saga.invocations WHERE key = 'inv-8';
SELECT saga.compensate('inv-8', 'inv_undo(jsonb)', '{"key": "inv-8"}');
SELECT inv_effects_of('inv-8');
-- action and compensation in one transaction
BEGIN;
SELECT saga.invoke('inv-8b', 'inv_do(jsonb)', '{"key": "inv-8b"}');
SELECT saga.compensate('inv-8b', 'inv_undo(jsonb)', '{"key": "inv-8b"}');
COMMIT;
SELECT status, inv_effects_of('inv-8b') FROM saga.invocations WHERE key = 'inv-8b';

-- An action may call other actions, but not itself.
CREATE FUNCTION inv_outer(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	RETURN jsonb_build_object('inner',
		saga.invoke(ctx->>'key' || '/inner', 'inv_do(jsonb)', jsonb_build_object('key', ctx->>'key' || '/inner')));
END $$;
CREATE FUNCTION inv_self(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_effects (key, kind, who, input) VALUES (ctx->>'key', 'self', current_user, ctx);
	IF ctx->>'via' = 'compensate' THEN
		RETURN saga.compensate(ctx->>'key', 'inv_undo(jsonb)', ctx);
	END IF;
	RETURN saga.invoke(ctx->>'key', 'inv_self(jsonb)', ctx);
END $$;
SELECT saga.invoke('inv-9', 'inv_outer(jsonb)', '{"key": "inv-9"}');
SELECT saga.invoke('inv-9', 'inv_outer(jsonb)', '{"key": "inv-9"}');
SELECT inv_effects_of('inv-9/inner');
SELECT try($$SELECT saga.invoke('inv-10', 'inv_self(jsonb)', '{"key": "inv-10"}')$$);
SELECT try($$SELECT saga.invoke('inv-10', 'inv_self(jsonb)', '{"key": "inv-10", "via": "compensate"}')$$);
SELECT saga.invoke('inv-11', 'inv_do(jsonb)', '{"key": "inv-11"}');
SELECT try($$SELECT saga.compensate('inv-11', 'inv_self(jsonb)', '{"key": "inv-11", "via": "compensate"}')$$);
SELECT count(*) FROM saga.invocations WHERE key = 'inv-10';
SELECT inv_effects_of('inv-10'), inv_effects_of('inv-11');
-- the guard is released after an error: the key can be used again
SELECT saga.invoke('inv-10', 'inv_do(jsonb)', '{"key": "inv-10"}');

-- Bad input: NULLs, empty and oversized keys, functions of the wrong shape.
SELECT try($$SELECT saga.invoke(NULL, 'inv_do(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', NULL, '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_do(jsonb)', NULL)$$);
SELECT try($$SELECT saga.compensate(NULL, 'inv_undo(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('inv-x', NULL, '{}')$$);
SELECT try($$SELECT saga.compensate('inv-x', 'inv_undo(jsonb)', NULL)$$);
SELECT try($$SELECT saga.invoke('', 'inv_do(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('', 'inv_undo(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke(repeat('k', 513), 'inv_do(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate(repeat('k', 513), 'inv_undo(jsonb)', '{}')$$);
-- 512 bytes is the limit, counted in bytes: 171 three-byte characters are 513
SELECT saga.invoke(repeat('k', 512), 'inv_do(jsonb)', jsonb_build_object('key', repeat('k', 512))) ->> 'n' AS n;
SELECT try($$SELECT saga.invoke(repeat('€', 171), 'inv_do(jsonb)', '{}')$$);
SELECT saga.invoke('it''s; DROP TABLE inv_effects; --', 'inv_do(jsonb)', '{"key": "quoted"}');
SELECT key, result FROM saga.invocations WHERE key LIKE 'it''s%';
CREATE FUNCTION inv_int(ctx integer) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION inv_two(ctx jsonb, n integer DEFAULT 1) RETURNS jsonb LANGUAGE sql AS $$ SELECT ctx $$;
CREATE FUNCTION inv_none() RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION inv_text(ctx jsonb) RETURNS text LANGUAGE sql AS $$ SELECT ctx::text $$;
CREATE FUNCTION inv_json(ctx jsonb) RETURNS json LANGUAGE sql AS $$ SELECT ctx::json $$;
CREATE FUNCTION inv_set(ctx jsonb) RETURNS SETOF jsonb LANGUAGE sql AS $$ SELECT ctx $$;
CREATE FUNCTION inv_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE PROCEDURE inv_proc(ctx jsonb) LANGUAGE sql AS $$ SELECT 1 $$;
CREATE AGGREGATE inv_agg(jsonb) (sfunc = jsonb_concat, stype = jsonb);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_int(integer)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_two(jsonb, integer)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_none()', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_text(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_json(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_set(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_trigger()', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_proc(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_agg(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('inv-x', 'inv_text(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('inv-x', 'inv_agg(jsonb)', '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 4294967295::oid::regprocedure, '{}')$$);
SELECT try($$SELECT saga.invoke('inv-x', 'inv_missing(jsonb)', '{}')$$);
-- none of them left a row or ran anything
SELECT count(*) FROM saga.invocations WHERE key = 'inv-x' OR key = '' OR key LIKE 'kkkkkkkkkkkkkkkkkkk%k';
SELECT inv_effects_of('inv-x');

-- Functions run as the calling role, with the caller's rights, never as the
-- extension's owner.
CREATE ROLE regress_invoke_app;
CREATE ROLE regress_invoke_other;
CREATE TABLE inv_who (key text, current_user_name name, session_user_name name);
GRANT SELECT, INSERT ON inv_who, inv_effects TO regress_invoke_app;
GRANT USAGE ON SEQUENCE inv_effects_id_seq TO regress_invoke_app;
CREATE FUNCTION inv_whoami(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO inv_who VALUES (ctx->>'key', current_user, session_user);
	RETURN jsonb_build_object('user', current_user);
END $$;
CREATE FUNCTION inv_peek(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
	RETURN jsonb_build_object('rows', (SELECT count(*) FROM saga.invocations));
END $$;
CREATE FUNCTION inv_secret(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"secret": true}'::jsonb $$;
REVOKE EXECUTE ON FUNCTION inv_secret(jsonb) FROM PUBLIC;

SET ROLE regress_invoke_app;
SELECT saga.invoke('inv-who', 'inv_whoami(jsonb)', '{"key": "inv-who"}');
SELECT key, current_user_name, session_user_name = current_user AS session_is_app FROM inv_who;
-- the function cannot read saga's tables: it does not run as their owner
SELECT try($$SELECT saga.invoke('inv-peek', 'inv_peek(jsonb)', '{}')$$);
-- nor can the caller
SELECT try($$SELECT count(*) FROM saga.invocations$$);
SELECT try($$DELETE FROM saga.invocations$$);
-- a function the caller may not execute is refused, before anything is recorded
SELECT try($$SELECT saga.invoke('inv-secret', 'inv_secret(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('inv-who', 'inv_secret(jsonb)', '{}')$$);
SELECT try($$SELECT saga.compensate('inv-secret', 'inv_secret(jsonb)', '{}')$$);
RESET ROLE;
SELECT count(*) FROM saga.invocations WHERE key IN ('inv-peek', 'inv-secret');
SELECT key, invoked_by FROM saga.invocations WHERE key = 'inv-who';

-- Another role neither sees the stored result nor compensates the action;
-- a late action after a tombstone is refused whoever calls it.
SET ROLE regress_invoke_other;
SELECT try($$SELECT saga.invoke('inv-who', 'inv_whoami(jsonb)', '{"key": "inv-who"}')$$);
SELECT try($$SELECT saga.compensate('inv-who', 'inv_undo(jsonb)', '{"key": "inv-who"}')$$);
SELECT try($$SELECT saga.invoke('inv-3', 'inv_do(jsonb)', '{"key": "inv-3"}')$$);
RESET ROLE;
SELECT count(*) AS runs FROM inv_who;
SELECT status FROM saga.invocations WHERE key = 'inv-who';
-- a superuser has every role's privileges: it gets the stored result (the
-- app role's), without running the function again
SELECT saga.invoke('inv-who', 'inv_whoami(jsonb)', '{"key": "inv-who"}');
SELECT count(*) AS runs FROM inv_who;
-- the app role compensates its own action; the compensation runs as it
SET ROLE regress_invoke_app;
SELECT saga.compensate('inv-who', 'inv_undo(jsonb)', '{"key": "inv-who"}');
RESET ROLE;
SELECT kind, who FROM inv_effects WHERE key = 'inv-who';
SELECT status, invoked_by, compensated_by FROM saga.invocations WHERE key = 'inv-who';

-- Catalog contract: PUBLIC may call both functions, but has no rights on the
-- table; everything is commented; the table is dumped with the extension.
SELECT p.oid::regprocedure AS function, has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS commented
FROM pg_proc p WHERE p.oid IN ('saga.invoke(text,regprocedure,jsonb)'::regprocedure,
                               'saga.compensate(text,regprocedure,jsonb)'::regprocedure)
ORDER BY p.proname;
SELECT has_table_privilege('public', 'saga.invocations', 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') AS public_any,
       obj_description('saga.invocations'::regclass, 'pg_class') IS NOT NULL AS commented,
       'saga.invocations'::regclass = ANY (e.extconfig) AS dumped
FROM pg_extension e WHERE e.extname = 'saga';

DROP OWNED BY regress_invoke_app, regress_invoke_other;
DROP ROLE regress_invoke_app;
DROP ROLE regress_invoke_other;
