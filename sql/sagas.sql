-- Sagas through the SQL API, synchronously: saga.define and every invalid
-- definition, saga.start, the application-driven API (begin, step, complete,
-- fail, cancel, retry, get, wait), the views and the saga metrics.
--
-- The worker runs in this cluster, so nothing here may depend on when it
-- acts: worker-driven sagas are only started in transactions that roll back,
-- and the only sagas committed are application-driven ones that are running
-- (the worker has nothing to do for them before their 1-hour deadline) or
-- completed.

-- Step functions. sagas_fn.reserve exists twice, so that the search_path
-- decides which one an unqualified name means.
CREATE SCHEMA sagas_fn;
CREATE FUNCTION sagas_fn.reserve(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"reserved": true}'::jsonb $$;
CREATE FUNCTION sagas_fn.release(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"released": true}'::jsonb $$;
CREATE FUNCTION sagas_fn.ship(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION public.reserve(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{"public": true}'::jsonb $$;
CREATE FUNCTION sagas_fn.returns_text(ctx jsonb) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION sagas_fn.takes_json(ctx json) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION sagas_fn.takes_two(ctx jsonb, n integer) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
CREATE FUNCTION sagas_fn.takes_none() RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
SELECT saga.create_destination('sagas_http', 'http://127.0.0.1:1/sagas', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('sagas_notify', 'notify:sagas_channel');
SELECT saga.create_destination('sagas_db', 'postgresql://127.0.0.1:1/sagas', '{"backoff": "1 hour", "max_backoff": "1 hour"}');

-- Saga ids change from run to run: errors show them as <id>.
CREATE FUNCTION pg_temp.err(stmt text) RETURNS text LANGUAGE sql AS $$
	SELECT regexp_replace(public.try(stmt),
		'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'g')
$$;
-- An application-driven saga renamed to a fixed id, for the tests whose
-- notices name it.
CREATE FUNCTION pg_temp.app_saga(fixed uuid, name text, input jsonb DEFAULT '{}') RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
	new_id uuid := saga.begin(name, input);
BEGIN
	UPDATE saga.instances i SET id = fixed WHERE i.id = new_id;
	RETURN fixed;
END $$;
-- saga.get without what changes from run to run (ids and timestamps)
CREATE FUNCTION pg_temp.get(id uuid) RETURNS jsonb LANGUAGE sql AS $$
	SELECT g - 'id' - 'started_at' - 'updated_at' - 'finished_at' - 'deadline' - 'steps' - 'timeline'
		|| jsonb_build_object(
			'steps', (SELECT coalesce(jsonb_agg(s - 'started_at' - 'finished_at' - 'compensated_at'), '[]')
					  FROM jsonb_array_elements(g -> 'steps') s),
			'timeline', (SELECT coalesce(jsonb_agg(e - 'at'), '[]')
						 FROM jsonb_array_elements(g -> 'timeline') e))
	FROM saga.get(id) g
$$;

-- ---------- saga.define ----------

-- the first definition is version 1, a redefinition version 2
SELECT saga.define('sagas_order', '{"steps": [
	{"name": "reserve", "action": "sagas_fn.reserve", "compensation": "sagas_fn.release"},
	{"name": "ship", "action": {"function": "sagas_fn.ship"}}]}');
SELECT saga.define('sagas_order', '{"steps": [
	{"name": "reserve", "action": "sagas_fn.reserve", "compensation": {"function": "sagas_fn.release"},
	 "timeout": "5s", "max_attempts": 3, "backoff": "250 ms"},
	{"name": "ship", "action": "sagas_fn.ship", "compensation": null}],
	"deadline": "1 hour"}');
-- what is stored: functions resolved to qualified signatures, defaults filled in
SELECT version, jsonb_pretty(steps) AS steps, deadline, owner::regrole = current_user::regrole AS mine
FROM saga.definitions WHERE name = 'sagas_order' ORDER BY version;
SELECT version, definition -> 'deadline' AS written_deadline
FROM saga.definitions WHERE name = 'sagas_order' ORDER BY version;
-- an HTTP step: a declared HTTP destination and a path under its URL
SELECT saga.define('sagas_charge', '{"steps": [
	{"name": "charge", "action": {"destination": "sagas_http", "path": "/charge"},
	 "compensation": {"destination": "sagas_http"}, "timeout": "2s"}]}');
SELECT jsonb_pretty(steps) AS steps FROM saga.definitions WHERE name = 'sagas_charge';

-- Unqualified names resolve through the caller's search_path, as the
-- caller would resolve them.
SET search_path = sagas_fn, public;
SELECT saga.define('sagas_path', '{"steps": [{"name": "a", "action": "reserve", "compensation": "release"}]}');
SET search_path = public, sagas_fn;
SELECT saga.define('sagas_path', '{"steps": [{"name": "a", "action": "reserve", "compensation": "release"}]}');
SET search_path = public;
\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err($$SELECT saga.define('sagas_path', '{"steps": [{"name": "a", "action": "release"}]}')$$);
\pset format aligned
\pset tuples_only off
RESET search_path;
SELECT version, steps -> 0 -> 'action' ->> 'function' AS action, steps -> 0 -> 'compensation' ->> 'function' AS compensation
FROM saga.definitions WHERE name = 'sagas_path' ORDER BY version;
-- saga.define leaves the caller's search_path as it was
SHOW search_path;

-- Every invalid definition is refused with a fitting SQLSTATE and a
-- message that names the offending step; nothing is stored.
\pset format unaligned
\pset tuples_only on
-- NULL name or definition
SELECT pg_temp.err($$SELECT saga.define(NULL, '{"steps": [{"name": "a", "action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', NULL)$$);
-- the name
SELECT pg_temp.err($$SELECT saga.define('', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define(repeat('n', 64), '{"steps": [{"name": "a", "action": "sagas_fn.ship"}]}')$$);
-- not an object
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '[]')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '"steps"')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', 'null')$$);
-- unknown top-level field
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}], "timeout": "1s"}')$$);
-- missing, empty or malformed steps
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": []}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": {"name": "a", "action": "sagas_fn.ship"}}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": null}')$$);
-- a step that is not an object (the second one here)
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}, "sagas_fn.ship"]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [[]]}')$$);
-- missing, empty, non-text, too long and duplicate step names
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}, {"name": "", "action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": 7, "action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": null, "action": "sagas_fn.ship"}]}')$$);
SELECT pg_temp.err(format($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "%s", "action": "sagas_fn.ship"}]}')$$, repeat('s', 64)));
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}, {"name": "b", "action": "sagas_fn.ship"}, {"name": "a", "action": "sagas_fn.reserve"}]}')$$);
-- unknown step field
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "retries": 3}]}')$$);
-- missing action
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "compensation": "sagas_fn.release"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": null}]}')$$);
-- an action that is neither a name nor an object, or an object without a function
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": 42}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": ["sagas_fn.ship"]}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"function": 1}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"function": "sagas_fn.ship", "args": {}}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": ""}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"function": ""}}]}')$$);
-- unknown function, in the action or the compensation of a later step
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.nope"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "nope_schema.ship"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}, {"name": "b", "action": "sagas_fn.ship", "compensation": "sagas_fn.unship"}]}')$$);
-- unqualified, and not on the search_path
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "ship"}]}')$$);
-- a name that is not a function name
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship(jsonb)"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship; DROP TABLE saga.instances"}]}')$$);
-- wrong signature: another argument type, more or fewer arguments
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.takes_json"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.takes_two"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.takes_none"}]}')$$);
-- wrong return type, in the action or the compensation
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.returns_text"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "compensation": "sagas_fn.returns_text"}]}')$$);
-- unknown destination; a destination that is not HTTP; HTTP (not yet)
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_nowhere", "path": "/x"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_notify", "path": "/x"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_http", "path": "charge"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "compensation": {"destination": "sagas_http", "path": "/re fund"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_http", "path": "/x"}, "timeout": "2 days"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"function": "sagas_fn.ship", "path": "/x"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_http", "function": "sagas_fn.ship"}}]}')$$);
-- a call into another database names a function, and nothing else
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_db", "path": "/x"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_db"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_db", "function": "x; DROP TABLE t"}}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": {"destination": "sagas_db", "function": 42}}]}')$$);
SELECT saga.define('sagas_remote', '{"steps": [{"name": "a", "action": {"destination": "sagas_db", "function": "stock.reserve"}, "compensation": {"destination": "sagas_db", "function": "release"}}]}');
SELECT step ->> 'name', step -> 'action', step -> 'compensation' FROM saga.definitions, jsonb_array_elements(steps) step WHERE name = 'sagas_remote';
-- bad timeout, backoff and deadline intervals
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "timeout": "soon"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "timeout": "0s"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "timeout": "-5s"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "timeout": 5}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "backoff": "1 fortnight"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "backoff": "-1s"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "backoff": "99999999999 years"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}], "deadline": "tomorrow"}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}], "deadline": "-1 hour"}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship"}], "deadline": 3600}')$$);
-- bad max_attempts
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "max_attempts": 0}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "max_attempts": -1}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "max_attempts": 2.5}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "max_attempts": "3"}]}')$$);
SELECT pg_temp.err($$SELECT saga.define('sagas_bad', '{"steps": [{"name": "a", "action": "sagas_fn.ship", "max_attempts": 1001}]}')$$);
-- a redefinition that is invalid does not replace the valid one
SELECT pg_temp.err($$SELECT saga.define('sagas_order', '{"steps": [{"name": "a", "action": "sagas_fn.nope"}]}')$$);
\pset format aligned
\pset tuples_only off
SELECT count(*) AS bad_definitions_stored FROM saga.definitions WHERE name = 'sagas_bad' OR name LIKE 'nnnn%' OR name = '';
SELECT max(version) AS sagas_order_version FROM saga.definitions WHERE name = 'sagas_order';
-- the limits themselves are accepted: 63-byte names, 1 and 1000 attempts
SELECT saga.define(repeat('n', 63), format('{"steps": [{"name": "%s", "action": "sagas_fn.ship", "max_attempts": 1},
	{"name": "b", "action": "sagas_fn.ship", "max_attempts": 1000}]}', repeat('s', 63))::jsonb);
SELECT steps -> 0 ->> 'name' = repeat('s', 63) AS long_step_name, steps -> 0 -> 'max_attempts' AS first,
       steps -> 1 -> 'max_attempts' AS second
FROM saga.definitions WHERE name = repeat('n', 63);
DELETE FROM saga.definitions WHERE name = repeat('n', 63);

-- ---------- saga.start ----------

\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err($$SELECT saga.start('sagas_undefined')$$);
SELECT pg_temp.err($$SELECT saga.start(NULL)$$);
SELECT pg_temp.err($$SELECT saga.start('sagas_order', NULL)$$);
SELECT pg_temp.err($$SELECT saga.start('sagas_order', '[1]')$$);
SELECT pg_temp.err($$SELECT saga.start('sagas_order', '"x"')$$);
SELECT pg_temp.err($$SELECT saga.start('sagas_order', 'null')$$);
\pset format aligned
\pset tuples_only off

-- A saga started in a transaction that rolls back never existed.
BEGIN;
SELECT saga.start('sagas_order', '{"order": 1}') AS rolled_back_id \gset
SELECT name, version, status, input, driver, owner = current_user::text AS mine, error,
       deadline = now() + interval '1 hour' AS deadline_from_definition
FROM saga.sagas WHERE id = :'rolled_back_id';
ROLLBACK;
SELECT count(*) AS after_rollback FROM saga.sagas WHERE id = :'rolled_back_id';
SELECT count(*) AS instances_left FROM saga.instances WHERE name = 'sagas_order';

BEGIN;
-- the same idempotency key returns the same saga (even with another input),
-- and starts nothing more; another key or no key starts another saga
SELECT saga.start('sagas_order', '{"order": 2}', 'order-2') AS first_id \gset
SELECT saga.start('sagas_order', '{"order": 2, "again": true}', 'order-2') = :'first_id' AS same_id;
SELECT saga.start('sagas_order', '{"order": 3}', 'order-3') <> :'first_id' AS other_key_other_id;
SELECT saga.start('sagas_order', '{"order": 4}') <> :'first_id' AS no_key_other_id;
SELECT idempotency_key, input, version, status FROM saga.sagas WHERE name = 'sagas_order' ORDER BY input ->> 'order';
-- a running saga keeps the version it started with
SELECT saga.define('sagas_order', '{"steps": [{"name": "only", "action": "sagas_fn.ship"}]}') AS new_version;
SELECT saga.start('sagas_order', '{"order": 5}') AS v3_id \gset
SELECT input ->> 'order' AS "order", version FROM saga.sagas WHERE name = 'sagas_order' ORDER BY input ->> 'order';
-- a definition without a deadline gives sagas without one
SELECT deadline IS NULL AS no_deadline FROM saga.sagas WHERE id = :'v3_id';
-- nothing has run yet: no steps
SELECT count(*) AS steps FROM saga.saga_steps s JOIN saga.sagas g ON g.id = s.saga_id WHERE g.name = 'sagas_order';
SELECT pg_temp.get(:'first_id');
-- the status at once with a 0 s timeout; a short one times out on a running saga
SELECT saga.wait(:'first_id', '0s');
SELECT saga.wait(:'first_id', '20 ms');
-- worker-driven sagas are not driven by the application
\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'x')$$, :'first_id'));
SELECT pg_temp.err(format($$SELECT saga.complete(%L)$$, :'first_id'));
SELECT pg_temp.err(format($$SELECT saga.fail(%L, 'no')$$, :'first_id'));
SELECT pg_temp.err(format($$SELECT saga.retry(%L)$$, :'first_id'));
\pset format aligned
\pset tuples_only off
-- ... but can be cancelled from outside
SELECT saga.cancel(:'first_id', 'customer changed their mind');
SELECT status, error FROM saga.sagas WHERE id = :'first_id';
ROLLBACK;
SELECT count(*) AS instances_left FROM saga.instances WHERE name = 'sagas_order';
-- the redefinition rolled back: a start gets version 2 again, and every
-- column of its row is what the table's defaults and the definition say
BEGIN;
SELECT saga.start('sagas_order', '{"order": 6}') AS v2_id \gset
SELECT version, driver, status, results, result, error, owner = current_user::regrole::oid AS mine,
       idempotency_key, position, attempts, next_run_at = now() AS due_now, request_id,
       deadline = now() + interval '1 hour' AS deadline_from_definition,
       started_at = now() AS started_now, updated_at = now() AS updated_now, finished_at
FROM saga.instances WHERE id = :'v2_id';
ROLLBACK;
-- a read-only transaction starts nothing
BEGIN READ ONLY;
SELECT try($$SELECT saga.start('sagas_order', '{}')$$);
ROLLBACK;

-- ---------- application-driven sagas ----------

\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err($$SELECT saga.begin(NULL)$$);
SELECT pg_temp.err($$SELECT saga.begin('sagas_app', NULL)$$);
SELECT pg_temp.err($$SELECT saga.begin('sagas_app', '[]')$$);
SELECT pg_temp.err($$SELECT saga.begin('sagas_app', '{}', NULL, NULL)$$);
SELECT pg_temp.err($$SELECT saga.begin('sagas_app', '{}', NULL, '0s')$$);
SELECT pg_temp.err($$SELECT saga.begin('sagas_app', '{}', NULL, '-1 hour')$$);
SELECT pg_temp.err($$SELECT saga.begin('')$$);
SELECT pg_temp.err($$SELECT saga.begin(repeat('n', 64))$$);
\pset format aligned
\pset tuples_only off

-- A committed saga, running: the worker has nothing to do for it before its
-- deadline. The same idempotency key returns it from another transaction.
SELECT saga.begin('sagas_app', '{"cart": 7}', 'cart-7') AS app_id \gset
SELECT saga.begin('sagas_app', '{"cart": 8}', 'cart-7') = :'app_id' AS same_id;
SELECT count(*) AS sagas_with_key FROM saga.sagas WHERE name = 'sagas_app' AND idempotency_key = 'cart-7';
SELECT name, version, status, input, driver, deadline = started_at + interval '1 hour' AS default_deadline
FROM saga.sagas WHERE id = :'app_id';
-- steps, each in its own transaction, with compensations in both forms
SELECT saga.step(:'app_id', 'reserve', '{"function": "sagas_fn.release", "args": {"sku": "A", "qty": 2}}', '{"reservation": 11}');
SET search_path = sagas_fn;
SELECT saga.step(:'app_id', 'charge', '{"function": "release"}');
RESET search_path;
SELECT saga.step(:'app_id', 'notify');
SELECT step, position, status, attempts, result, error, compensation, compensation_attempts, compensation_error
FROM saga.saga_steps WHERE saga_id = :'app_id' ORDER BY position;
-- saga.get: every key, then the content without ids and timestamps
SELECT array_agg(k ORDER BY k) AS keys FROM jsonb_object_keys(saga.get(:'app_id')) k;
SELECT saga.get(:'app_id') ->> 'id' = :'app_id' AS id_matches,
       (saga.get(:'app_id') ->> 'started_at')::timestamptz = started_at AS started_at_matches,
       (saga.get(:'app_id') ->> 'deadline')::timestamptz = deadline AS deadline_matches
FROM saga.sagas WHERE id = :'app_id';
SELECT jsonb_pretty(pg_temp.get(:'app_id'));
SELECT saga.wait(:'app_id', '0s');
SELECT saga.wait(:'app_id', '20ms');

\pset format unaligned
\pset tuples_only on
-- a step name is used once per saga; the failed call records nothing
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'reserve')$$, :'app_id'));
-- NULL and empty step names
SELECT pg_temp.err(format($$SELECT saga.step(%L, NULL)$$, :'app_id'));
SELECT pg_temp.err($$SELECT saga.step(NULL, 'x')$$);
SELECT pg_temp.err(format($$SELECT saga.step(%L, '')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, %L)$$, :'app_id', repeat('s', 64)));
-- compensations are checked like definitions
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c1', '"sagas_fn.release"')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c2', '{"function": "sagas_fn.release", "retries": 3}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c3', '{"function": "sagas_fn.unrelease"}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c4', '{"function": "release"}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c5', '{"function": "sagas_fn.returns_text"}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c6', '{"args": {"sku": "A"}}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c7', '{"destination": "sagas_nowhere", "path": "/undo"}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c8', '{"destination": "sagas_http", "path": "undo", "body": {}}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c9', '{"destination": "sagas_db", "function": "release", "body": {}}')$$, :'app_id'));
SELECT pg_temp.err(format($$SELECT saga.step(%L, 'c9', '[]')$$, :'app_id'));
\pset format aligned
\pset tuples_only off
SELECT count(*) AS steps_still FROM saga.saga_steps WHERE saga_id = :'app_id';
-- a JSON null compensation is no compensation
SELECT saga.step(:'app_id', 'pivot', 'null', '"shipped"');
SELECT step, position, compensation IS NULL AS no_compensation, result FROM saga.saga_steps
WHERE saga_id = :'app_id' AND step = 'pivot';

-- complete: the result is kept; completing again is a no-op with a notice
-- (fixed ids from here on, so that messages can name them)
SELECT pg_temp.app_saga('00000000-0000-7000-8000-000000000001', 'sagas_done', '{"n": 1}');
SELECT saga.step('00000000-0000-7000-8000-000000000001', 'a', '{"function": "sagas_fn.release"}', '{"a": 1}');
SELECT saga.complete('00000000-0000-7000-8000-000000000001', '{"total": 42}');
SELECT saga.complete('00000000-0000-7000-8000-000000000001', '{"total": 0}');
SELECT status, result, error, finished_at >= started_at AS finished FROM saga.sagas
WHERE id = '00000000-0000-7000-8000-000000000001';
SELECT jsonb_pretty(pg_temp.get('00000000-0000-7000-8000-000000000001'));
SELECT saga.wait('00000000-0000-7000-8000-000000000001', '0s');
SELECT saga.wait('00000000-0000-7000-8000-000000000001', '60s');
\pset format unaligned
\pset tuples_only on
-- a completed saga takes no steps, is not failed, cancelled or retried
SELECT pg_temp.err($$SELECT saga.step('00000000-0000-7000-8000-000000000001', 'late')$$);
SELECT pg_temp.err($$SELECT saga.fail('00000000-0000-7000-8000-000000000001', 'too late')$$);
SELECT pg_temp.err($$SELECT saga.cancel('00000000-0000-7000-8000-000000000001', 'too late')$$);
SELECT pg_temp.err($$SELECT saga.retry('00000000-0000-7000-8000-000000000001')$$);
\pset format aligned
\pset tuples_only off
SELECT status, result, error FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000001';
SELECT step, status FROM saga.saga_steps WHERE saga_id = '00000000-0000-7000-8000-000000000001';
-- complete with no result
SELECT pg_temp.app_saga('00000000-0000-7000-8000-000000000002', 'sagas_done');
SELECT saga.complete('00000000-0000-7000-8000-000000000002');
SELECT status, result FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000002';

-- fail and cancel: in transactions that roll back, since the worker would
-- compensate once they commit
BEGIN;
SELECT pg_temp.app_saga('00000000-0000-7000-8000-000000000003', 'sagas_failing', '{"n": 3}');
SELECT saga.step('00000000-0000-7000-8000-000000000003', 'a', '{"function": "sagas_fn.release", "args": {"n": 1}}');
SELECT saga.step('00000000-0000-7000-8000-000000000003', 'b', '{"function": "sagas_fn.release", "args": {"n": 2}}');
SELECT saga.fail('00000000-0000-7000-8000-000000000003', 'payment declined');
SELECT status, error FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000003';
-- the steps wait for their compensations
SELECT step, status, compensation_attempts FROM saga.saga_steps
WHERE saga_id = '00000000-0000-7000-8000-000000000003' ORDER BY position;
-- failing or cancelling again is a no-op with a notice; the first reason stays
SELECT saga.fail('00000000-0000-7000-8000-000000000003', 'again');
SELECT saga.cancel('00000000-0000-7000-8000-000000000003', 'and again');
SELECT status, error FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000003';
-- a compensating saga is not terminal: wait times out and says so
SELECT saga.wait('00000000-0000-7000-8000-000000000003', '0s');
SELECT saga.wait('00000000-0000-7000-8000-000000000003', '20ms');
\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err($$SELECT saga.complete('00000000-0000-7000-8000-000000000003')$$);
SELECT pg_temp.err($$SELECT saga.step('00000000-0000-7000-8000-000000000003', 'c')$$);
SELECT pg_temp.err($$SELECT saga.retry('00000000-0000-7000-8000-000000000003')$$);
\pset format aligned
\pset tuples_only off
SELECT status, error FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000003';
SELECT count(*) AS steps FROM saga.saga_steps WHERE saga_id = '00000000-0000-7000-8000-000000000003';

-- cancel a running application saga
SELECT pg_temp.app_saga('00000000-0000-7000-8000-000000000004', 'sagas_cancelled');
SELECT saga.cancel('00000000-0000-7000-8000-000000000004', 'operator');
SELECT saga.fail('00000000-0000-7000-8000-000000000004', 'application');
SELECT status, error FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000004';

-- retry resumes a failed saga: its failed compensations run again.
-- (Made failed by hand, as the worker would after a compensation ran out
-- of attempts.)
UPDATE saga.instances SET status = 'failed', error = 'payment declined; compensation of step "b" failed',
       next_run_at = NULL, finished_at = now()
WHERE id = '00000000-0000-7000-8000-000000000003';
UPDATE saga.instance_steps SET status = 'compensation_failed', compensation_attempts = 10,
       compensation_error = 'boom'
WHERE saga_id = '00000000-0000-7000-8000-000000000003' AND step = 'b';
SELECT id, name, status, reason, since = now() AS since_finished FROM saga.stuck ORDER BY id;
SELECT saga.wait('00000000-0000-7000-8000-000000000003', '60s');
-- failing or cancelling a failed saga is a no-op
SELECT saga.fail('00000000-0000-7000-8000-000000000003', 'again');
SELECT saga.cancel('00000000-0000-7000-8000-000000000003', 'again');
SELECT saga.retry('00000000-0000-7000-8000-000000000003');
SELECT status, finished_at IS NULL AS unfinished FROM saga.sagas WHERE id = '00000000-0000-7000-8000-000000000003';
SELECT step, status, compensation_attempts, compensation_error FROM saga.saga_steps
WHERE saga_id = '00000000-0000-7000-8000-000000000003' ORDER BY position;
SELECT count(*) AS stuck FROM saga.stuck WHERE id = '00000000-0000-7000-8000-000000000003';
-- a saga past its deadline is stuck too
UPDATE saga.instances SET deadline = now() - interval '1 minute' WHERE id = :'app_id';
SELECT name, status, reason = format('deadline passed at %s', now() - interval '1 minute') AS reason_ok,
       since = now() - interval '1 minute' AS since_deadline
FROM saga.stuck WHERE id = :'app_id';

-- saga.metrics(): sagas by status, and those past their deadline (this
-- transaction: 1 running, past its deadline; 2 completed; 2 compensating)
SELECT name, labels, value FROM saga.metrics() WHERE name LIKE 'sagas%' ORDER BY name, labels ->> 'status';
ROLLBACK;

-- ---------- unknown ids and NULL arguments ----------

\pset format unaligned
\pset tuples_only on
SELECT pg_temp.err($$SELECT saga.step('00000000-0000-7000-8000-0000000000ff', 'x')$$);
SELECT pg_temp.err($$SELECT saga.complete('00000000-0000-7000-8000-0000000000ff')$$);
SELECT pg_temp.err($$SELECT saga.fail('00000000-0000-7000-8000-0000000000ff', 'x')$$);
SELECT pg_temp.err($$SELECT saga.cancel('00000000-0000-7000-8000-0000000000ff', 'x')$$);
SELECT pg_temp.err($$SELECT saga.retry('00000000-0000-7000-8000-0000000000ff')$$);
SELECT pg_temp.err($$SELECT saga.get('00000000-0000-7000-8000-0000000000ff')$$);
SELECT pg_temp.err($$SELECT saga.wait('00000000-0000-7000-8000-0000000000ff')$$);
SELECT pg_temp.err($$SELECT saga.wait('00000000-0000-7000-8000-0000000000ff', '0s')$$);
SELECT pg_temp.err($$SELECT saga.complete(NULL)$$);
SELECT pg_temp.err($$SELECT saga.complete(NULL, '{}')$$);
SELECT pg_temp.err($$SELECT saga.fail(NULL, 'x')$$);
SELECT pg_temp.err($$SELECT saga.fail('00000000-0000-7000-8000-000000000001', NULL)$$);
SELECT pg_temp.err($$SELECT saga.cancel(NULL, 'x')$$);
SELECT pg_temp.err($$SELECT saga.cancel('00000000-0000-7000-8000-000000000001', NULL)$$);
SELECT pg_temp.err($$SELECT saga.retry(NULL)$$);
SELECT pg_temp.err($$SELECT saga.get(NULL)$$);
SELECT pg_temp.err($$SELECT saga.wait(NULL)$$);
SELECT pg_temp.err($$SELECT saga.wait('00000000-0000-7000-8000-000000000001', NULL)$$);
-- a negative timeout is an error, even for a finished saga
SELECT pg_temp.err($$SELECT saga.wait('00000000-0000-7000-8000-000000000001', '-1s')$$);
SELECT pg_temp.err($$SELECT saga.wait('00000000-0000-7000-8000-000000000001', '-1 day')$$);
\pset format aligned
\pset tuples_only off

-- ---------- the views and metrics ----------

SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
WHERE attrelid = 'saga.sagas'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
WHERE attrelid = 'saga.saga_steps'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
WHERE attrelid = 'saga.stuck'::regclass AND attnum > 0 ORDER BY attnum;
-- the committed sagas: one running, two completed
SELECT name, status, idempotency_key, result FROM saga.sagas ORDER BY name, id;
SELECT g.name, s.step, s.position, s.status FROM saga.saga_steps s JOIN saga.sagas g ON g.id = s.saga_id
ORDER BY g.name, g.id, s.position;
SELECT count(*) AS stuck FROM saga.stuck;
SELECT name, labels, value FROM saga.metrics() WHERE name LIKE 'sagas%' ORDER BY name, labels ->> 'status';

-- clean up (the sagas left are not due: the worker never saw them)
DELETE FROM saga.instance_steps WHERE saga_id IN (SELECT id FROM saga.instances WHERE name LIKE 'sagas\_%');
DELETE FROM saga.instances WHERE name LIKE 'sagas\_%';
DELETE FROM saga.definitions WHERE name LIKE 'sagas\_%';
SELECT saga.drop_destination('sagas_http');
SELECT saga.drop_destination('sagas_notify');
DROP SCHEMA sagas_fn CASCADE;
DROP FUNCTION public.reserve(jsonb);
