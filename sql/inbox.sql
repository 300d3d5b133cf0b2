-- The inbox through the SQL API: saga.receive (new or duplicate, the stored
-- row, every bad input), saga.handle and saga.unhandle (bad input,
-- privileges, who may remove what), the privileges of PUBLIC, saga.redeliver,
-- saga.purge and saga.metrics on inbox messages, and a few messages handled by
-- the worker from end to end (the worker's retries, crashes and concurrency
-- are covered by test/t/080_inbox.pl).
--
-- The worker runs in this cluster and handles a committed message within
-- about 200 ms: stored rows are looked at in transactions that roll back, or
-- after waiting for the worker with pg_temp.wait_inbox. Message ids are
-- fixed, so that the output is the same on every run.

-- Errors without what changes from run to run (ids, temporary schemas).
CREATE FUNCTION pg_temp.err(stmt text) RETURNS text LANGUAGE sql AS $$
	SELECT regexp_replace(regexp_replace(public.try(stmt),
		'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'g'),
		'pg_temp_[0-9]+', 'pg_temp_N', 'g')
$$;
-- Wait (at most 60 s) until the worker has brought every message of ids to
-- the status want; says which are not there yet if it times out.
CREATE FUNCTION pg_temp.wait_inbox(ids uuid[], want text DEFAULT 'processed') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	late text;
BEGIN
	FOR i IN 1 .. 600 LOOP
		SELECT string_agg(x.id::text || ' ' || coalesce(m.status, 'missing'), ', ' ORDER BY x.id) INTO late
		FROM unnest(ids) x(id) LEFT JOIN saga.inbox m ON m.message_id = x.id
		WHERE m.status IS DISTINCT FROM want;
		IF late IS NULL THEN
			RETURN 'all ' || want;
		END IF;
		PERFORM pg_sleep(0.1);
	END LOOP;
	RETURN 'still waiting for: ' || late;
END $$;
-- A fixed message id: inbox_id(7) = 00000000-0000-4000-8000-000000000007.
CREATE FUNCTION pg_temp.inbox_id(n integer) RETURNS uuid LANGUAGE sql AS $$
	SELECT format('00000000-0000-4000-8000-%s', lpad(n::text, 12, '0'))::uuid
$$;

-- Roles: an application that registers handlers, another one, and the role
-- a remote service connects as to deliver messages.
CREATE ROLE regress_inbox_app;
CREATE ROLE regress_inbox_other;
CREATE ROLE regress_inbox_remote;

-- What handlers did: one row per call, with the role it ran as and the
-- search_path it ran with.
CREATE TABLE public.inbox_effects (handler text, who name, path text, message jsonb);
GRANT SELECT, INSERT ON public.inbox_effects TO regress_inbox_app;
CREATE FUNCTION public.inbox_record(message jsonb) RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.inbox_effects VALUES ('record', current_user, current_setting('search_path'), message)
$$;
CREATE FUNCTION public.inbox_exact(message jsonb) RETURNS jsonb LANGUAGE sql AS $$
	INSERT INTO public.inbox_effects VALUES ('exact', current_user, current_setting('search_path'), message)
	RETURNING message
$$;
CREATE FUNCTION public.inbox_fail(message jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.inbox_effects VALUES ('fail', current_user, current_setting('search_path'), message);
	RAISE EXCEPTION 'cannot handle %', message ->> 'topic' USING ERRCODE = 'check_violation';
END $$;
-- functions that are not handlers
CREATE FUNCTION public.inbox_two(message jsonb, n integer) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION public.inbox_json(message json) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION public.inbox_none() RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION public.inbox_set(message jsonb) RETURNS SETOF jsonb LANGUAGE sql AS $$ SELECT message $$;
CREATE FUNCTION public.inbox_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE PROCEDURE public.inbox_proc(message jsonb) LANGUAGE sql AS $$ SELECT $$;
CREATE AGGREGATE public.inbox_agg(jsonb) (sfunc = jsonb_concat, stype = jsonb);
CREATE FUNCTION pg_temp.inbox_tmp(message jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION public.inbox_secret(message jsonb) RETURNS void LANGUAGE sql AS $$ SELECT $$;
REVOKE EXECUTE ON FUNCTION public.inbox_secret(jsonb) FROM PUBLIC;

-- ---------- saga.receive ----------

-- true for a new id, false for the same id again, also in one transaction
-- and in one statement; the stored row is the first one received.
BEGIN;
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.placed', '{"order": 1}', 'order-1',
                    '{"X-Trace": "t1"}', 'orders') AS first;
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.changed', '{"order": 99}') AS second;
SELECT message_id, topic, key, source, status, attempts, processed_at, last_error,
       received_at = now() AS received_now, next_attempt_at <= now() AS due
FROM saga.inbox WHERE message_id = pg_temp.inbox_id(1);
SELECT topic, key, payload, headers, source FROM saga.inbox_messages WHERE message_id = pg_temp.inbox_id(1);
SELECT g, saga.receive(pg_temp.inbox_id(2), 'inbox.nobody.placed', jsonb_build_object('g', g)) AS new
FROM generate_series(1, 3) g ORDER BY g;
SELECT payload FROM saga.inbox_messages WHERE message_id = pg_temp.inbox_id(2);
-- a savepoint rolled back forgets the message
SAVEPOINT s;
SELECT saga.receive(pg_temp.inbox_id(3), 'inbox.nobody.placed', '{}') AS in_savepoint;
ROLLBACK TO SAVEPOINT s;
SELECT saga.receive(pg_temp.inbox_id(3), 'inbox.nobody.placed', '{}') AS after_savepoint;
ROLLBACK;
-- rolled back: the messages were never received
SELECT count(*) AS left_after_rollback FROM saga.inbox WHERE message_id IN (pg_temp.inbox_id(1), pg_temp.inbox_id(2), pg_temp.inbox_id(3));
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.placed', '{"order": 1}', 'order-1',
                    '{"X-Trace": "t1"}', 'orders') AS new_after_rollback;
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.placed', '{"order": 1}') AS duplicate_committed;

-- Any JSON value is a payload; key, headers and source are optional.
SELECT saga.receive(pg_temp.inbox_id(4), 'inbox.nobody.scalar', '"just text"') AS scalar;
SELECT saga.receive(pg_temp.inbox_id(5), 'inbox.nobody.array', '[1, 2]', headers => '{}') AS array_payload;
SELECT saga.receive(pg_temp.inbox_id(6), 'inbox.nobody.null', 'null', source => 'billing') AS json_null;
SELECT message_id, topic, key, payload, headers, source FROM saga.inbox_messages
WHERE message_id IN (pg_temp.inbox_id(4), pg_temp.inbox_id(5), pg_temp.inbox_id(6)) ORDER BY message_id;

-- No handler matches these topics: the worker marks them processed.
SELECT pg_temp.wait_inbox(ARRAY[pg_temp.inbox_id(1), pg_temp.inbox_id(4), pg_temp.inbox_id(5), pg_temp.inbox_id(6)]);
SELECT message_id, status, attempts, last_error, processed_at >= received_at AS processed_after_received
FROM saga.inbox WHERE message_id IN (pg_temp.inbox_id(1), pg_temp.inbox_id(4)) ORDER BY message_id;
-- a processed message is still a duplicate, and the stored row is unchanged
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.changed', '{"order": 99}', 'other',
                    '{"X-Trace": "t2"}', 'elsewhere') AS after_processing;
SELECT topic, key, payload, headers, source, status FROM saga.inbox_messages WHERE message_id = pg_temp.inbox_id(1);

-- A dead message (made by hand here) is a duplicate too.
BEGIN;
SELECT saga.receive(pg_temp.inbox_id(7), 'inbox.nobody.dead', '{"v": 1}') AS new;
UPDATE saga.inbox_messages SET status = 'dead', attempts = 10, last_error = 'handler failed'
WHERE message_id = pg_temp.inbox_id(7);
COMMIT;
SELECT saga.receive(pg_temp.inbox_id(7), 'inbox.nobody.dead', '{"v": 2}') AS dead_duplicate;
SELECT status, attempts, last_error, payload FROM saga.inbox_messages WHERE message_id = pg_temp.inbox_id(7);

-- Bad input: an error with its SQLSTATE, and nothing stored.
\pset format unaligned
\pset tuples_only on
-- NULL id, topic or payload
SELECT pg_temp.err($$SELECT saga.receive(NULL, 'inbox.bad', '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), NULL, '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', NULL)$$);
-- topics: empty, a pattern, spaces and control characters, too long
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), '', '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.*', '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox bad', '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), E'inbox.bad\n', '{}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.' || repeat('t', 300), '{}')$$);
-- payload larger than saga.max_payload_size
SET saga.max_payload_size = '1kB';
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', jsonb_build_object('s', repeat('x', 2000)))$$);
RESET saga.max_payload_size;
-- headers that are not an object of strings
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, '[]')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, '"X-A: b"')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, 'null')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, '{"X-N": 1}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, '{"X-N": {"a": "b"}}')$$);
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', NULL, '{"X-N": null}')$$);
-- an empty key (NULL means no key)
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(90), 'inbox.bad', '{}', '')$$);
\pset format aligned
\pset tuples_only off
SELECT count(*) AS bad_messages_stored FROM saga.inbox_messages
WHERE message_id = pg_temp.inbox_id(90) OR topic LIKE 'inbox.bad%';

-- ---------- saga.handle and saga.unhandle ----------

-- An application registers handlers: an exact topic and a prefix pattern.
SET ROLE regress_inbox_app;
SELECT saga.handle('inbox.rec.*', 'public.inbox_record(jsonb)');
SELECT saga.handle('inbox.exact', 'public.inbox_exact(jsonb)');
-- the same registration again: a notice, nothing changes
SELECT saga.handle('inbox.rec.*', 'public.inbox_record(jsonb)');
-- the same function for another pattern is another registration
SELECT saga.handle('inbox.exact', 'public.inbox_record(jsonb)');
RESET ROLE;
SELECT pattern, prefix, handler, owner::regrole AS owner FROM saga.handlers ORDER BY pattern, handler;
-- '*' matches every topic (not committed: it would take every message)
BEGIN;
SELECT saga.handle('*', 'public.inbox_record(jsonb)');
SELECT pattern, prefix, handler FROM saga.handlers WHERE pattern = '*';
ROLLBACK;

-- Bad input and functions that cannot be handlers.
\pset format unaligned
\pset tuples_only on
-- NULL arguments
SELECT pg_temp.err($$SELECT saga.handle(NULL, 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.rec.*', NULL)$$);
SELECT pg_temp.err($$SELECT saga.unhandle(NULL, 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.unhandle('inbox.rec.*', NULL)$$);
-- patterns as saga.subscribe takes them: not empty, "*" only at the end
SELECT pg_temp.err($$SELECT saga.handle('', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('*.placed', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.*.placed', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.rec**', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox rec', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.' || repeat('t', 300), 'public.inbox_record(jsonb)')$$);
-- a function that does not exist
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_missing(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 4294967295::oid::regprocedure)$$);
-- wrong arguments: two, json instead of jsonb, none (a trigger function too)
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_two(jsonb, integer)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_json(json)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_none()')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_trigger()')$$);
-- a set-returning function, a procedure, an aggregate
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_set(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_proc(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'public.inbox_agg(jsonb)')$$);
-- a temporary function: it would be gone with this session
SELECT pg_temp.err($$SELECT saga.handle('inbox.bad', 'pg_temp.inbox_tmp(jsonb)')$$);
\pset format aligned
\pset tuples_only off
SELECT count(*) AS bad_handlers_stored FROM saga.handlers WHERE pattern NOT IN ('inbox.rec.*', 'inbox.exact');

-- A function the caller may not execute cannot be its handler; a role that
-- may execute it can register it.
\pset format unaligned
\pset tuples_only on
SET ROLE regress_inbox_app;
SELECT pg_temp.err($$SELECT saga.handle('inbox.secret', 'public.inbox_secret(jsonb)')$$);
RESET ROLE;
\pset format aligned
\pset tuples_only off
BEGIN;
GRANT EXECUTE ON FUNCTION public.inbox_secret(jsonb) TO regress_inbox_app;
SET ROLE regress_inbox_app;
SELECT saga.handle('inbox.secret', 'public.inbox_secret(jsonb)');
RESET ROLE;
SELECT pattern, handler, owner::regrole AS owner FROM saga.handlers WHERE pattern = 'inbox.secret';
ROLLBACK;

-- Only the role that registered a handler (or an administrator) removes it.
\pset format unaligned
\pset tuples_only on
SET ROLE regress_inbox_other;
SELECT pg_temp.err($$SELECT saga.unhandle('inbox.rec.*', 'public.inbox_record(jsonb)')$$);
SELECT pg_temp.err($$SELECT saga.unhandle('inbox.exact', 'public.inbox_record(jsonb)')$$);
-- nothing registered: false, whoever asks
SELECT pg_temp.err($$SELECT saga.unhandle('inbox.nothing', 'public.inbox_record(jsonb)')$$);
SELECT saga.unhandle('inbox.nothing', 'public.inbox_record(jsonb)');
RESET ROLE;
\pset format aligned
\pset tuples_only off
SELECT count(*) AS still_registered FROM saga.handlers WHERE pattern IN ('inbox.rec.*', 'inbox.exact');
-- an administrator removes the application's second registration
SELECT saga.unhandle('inbox.exact', 'public.inbox_record(jsonb)') AS removed_by_admin;
SELECT saga.unhandle('inbox.exact', 'public.inbox_record(jsonb)') AS removed_again;
SELECT pattern, handler FROM saga.handlers ORDER BY pattern, handler;

-- ---------- handled by the worker ----------

-- Every handler whose pattern matches runs once per message, with the
-- envelope, as the role that registered it, with search_path
-- pg_catalog, pg_temp.
SELECT saga.receive(pg_temp.inbox_id(10), 'inbox.rec.placed', '{"order": 10}', 'order-10',
                    '{"X-Trace": "t10"}', 'orders') AS new;
SELECT saga.receive(pg_temp.inbox_id(11), 'inbox.rec.cancelled', '{"order": 11}') AS new;
SELECT saga.receive(pg_temp.inbox_id(12), 'inbox.exact', '[12]', 'k12') AS new;
-- topics the patterns do not match
SELECT saga.receive(pg_temp.inbox_id(13), 'inbox.recx', '{}') AS new;
SELECT saga.receive(pg_temp.inbox_id(14), 'inbox.exact.more', '{}') AS new;
SELECT saga.receive(pg_temp.inbox_id(15), 'inbox.rec', '{}') AS new;
-- the same id again, whether or not the worker has handled it yet: a duplicate
SELECT saga.receive(pg_temp.inbox_id(10), 'inbox.rec.placed', '{"order": 10, "copy": 2}') AS duplicate;
SELECT pg_temp.wait_inbox(ARRAY(SELECT pg_temp.inbox_id(g) FROM generate_series(10, 15) g));
SELECT handler, who, path, jsonb_pretty(message) AS message FROM public.inbox_effects
ORDER BY message ->> 'id', handler;
SELECT message_id, topic, status, attempts, last_error FROM saga.inbox
WHERE message_id IN (SELECT pg_temp.inbox_id(g) FROM generate_series(10, 15) g) ORDER BY message_id;
-- a duplicate after handling runs nothing again
SELECT saga.receive(pg_temp.inbox_id(10), 'inbox.rec.placed', '{"order": 10, "copy": 3}') AS duplicate;
SELECT saga.receive(pg_temp.inbox_id(16), 'inbox.rec.sentinel', '{}') AS new;
SELECT pg_temp.wait_inbox(ARRAY[pg_temp.inbox_id(16)]);
SELECT message ->> 'id' AS id, count(*) AS calls FROM public.inbox_effects
GROUP BY 1 ORDER BY 1;

-- A handler that fails: its effect is undone, the error recorded, and the
-- message retried later (the first retry comes after about a second).
SELECT saga.handle('inbox.failing', 'public.inbox_fail(jsonb)');
SELECT saga.receive(pg_temp.inbox_id(20), 'inbox.failing', '{"n": 20}') AS new;
DO $$
BEGIN
	FOR i IN 1 .. 600 LOOP
		EXIT WHEN (SELECT attempts >= 1 FROM saga.inbox WHERE message_id = pg_temp.inbox_id(20));
		PERFORM pg_sleep(0.1);
	END LOOP;
END $$;
SELECT status, attempts >= 1 AS attempted, last_error, next_attempt_at > received_at AS later, processed_at
FROM saga.inbox WHERE message_id = pg_temp.inbox_id(20);
SELECT count(*) AS effects_of_failed_attempts FROM public.inbox_effects WHERE handler = 'fail';
-- without its handler, the next attempt finds nothing to run: processed
SELECT saga.unhandle('inbox.failing', 'public.inbox_fail(jsonb)') AS removed;
SELECT pg_temp.wait_inbox(ARRAY[pg_temp.inbox_id(20)]);
SELECT status, last_error, processed_at IS NOT NULL AS processed FROM saga.inbox WHERE message_id = pg_temp.inbox_id(20);
SELECT count(*) AS effects_of_failed_attempts FROM public.inbox_effects WHERE handler = 'fail';

-- After unhandle, the application's handler runs no more.
SET ROLE regress_inbox_app;
SELECT saga.unhandle('inbox.rec.*', 'public.inbox_record(jsonb)') AS removed_by_owner;
SELECT saga.unhandle('inbox.rec.*', 'public.inbox_record(jsonb)') AS removed_again;
RESET ROLE;
SELECT saga.receive(pg_temp.inbox_id(21), 'inbox.rec.late', '{}') AS new;
SELECT pg_temp.wait_inbox(ARRAY[pg_temp.inbox_id(21)]);
SELECT count(*) AS effects_after_unhandle FROM public.inbox_effects WHERE message ->> 'id' = pg_temp.inbox_id(21)::text;

-- ---------- saga.redeliver ----------

-- A dead inbox message goes back to pending with no attempts, due now.
BEGIN;
SELECT saga.redeliver(pg_temp.inbox_id(7)) AS requeued;
SELECT status, attempts, next_attempt_at = now() AS due_now FROM saga.inbox WHERE message_id = pg_temp.inbox_id(7);
ROLLBACK;
SELECT status, attempts FROM saga.inbox WHERE message_id = pg_temp.inbox_id(7);
-- naming a destination requeues outbox messages only
SELECT saga.create_destination('inbox_hook', 'http://127.0.0.1:1/inbox', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT pg_temp.err($$SELECT saga.redeliver(pg_temp.inbox_id(7), 'inbox_hook')$$) AS with_destination;
SELECT status FROM saga.inbox WHERE message_id = pg_temp.inbox_id(7);
-- requeued for real: no handler matches, so the worker marks it processed
SELECT saga.redeliver(pg_temp.inbox_id(7)) AS requeued;
SELECT pg_temp.wait_inbox(ARRAY[pg_temp.inbox_id(7)]);
SELECT status, attempts, last_error FROM saga.inbox WHERE message_id = pg_temp.inbox_id(7);
-- nothing dead: 0
SELECT saga.redeliver(pg_temp.inbox_id(7)) AS again;
SELECT saga.redeliver(pg_temp.inbox_id(1)) AS processed_message;
-- an id that is dead in both the outbox and the inbox: both are requeued
SELECT saga.subscribe('inbox.out', 'inbox_hook');
BEGIN;
SELECT saga.publish('inbox.out', '{"both": true}') AS both_id \gset
UPDATE saga.queue SET status = 'dead', attempts = 10, finished_at = now(), last_error = 'HTTP 503'
WHERE message_id = :'both_id';
SELECT saga.receive(:'both_id', 'inbox.out', '{"both": true}') AS received;
UPDATE saga.inbox_messages SET status = 'dead', attempts = 10, last_error = 'handler failed'
WHERE message_id = :'both_id';
SELECT saga.redeliver(:'both_id', 'inbox_hook') AS outbox_only;
SELECT status FROM saga.inbox WHERE message_id = :'both_id';
UPDATE saga.queue SET status = 'dead', finished_at = now() WHERE message_id = :'both_id';
SELECT saga.redeliver(:'both_id') AS outbox_and_inbox;
SELECT status, attempts FROM saga.inbox WHERE message_id = :'both_id';
SELECT status, attempts FROM saga.outbox WHERE message_id = :'both_id';
ROLLBACK;
SELECT saga.unsubscribe('inbox.out', 'inbox_hook');

-- ---------- saga.purge ----------

-- Processed messages older than the cut-off go; dead and pending ones stay,
-- whatever their age. A purged id is new again.
BEGIN;
SELECT saga.receive(pg_temp.inbox_id(30), 'inbox.nobody.pending', '{}') AS new;
SELECT saga.receive(pg_temp.inbox_id(31), 'inbox.nobody.dead', '{}') AS new;
UPDATE saga.inbox_messages SET received_at = now() - interval '30 days', next_attempt_at = now() + interval '1 day'
WHERE message_id = pg_temp.inbox_id(30);
UPDATE saga.inbox_messages SET status = 'dead', received_at = now() - interval '30 days'
WHERE message_id = pg_temp.inbox_id(31);
UPDATE saga.inbox_messages SET received_at = now() - interval '30 days', processed_at = now() - interval '8 days'
WHERE message_id IN (pg_temp.inbox_id(1), pg_temp.inbox_id(4));
UPDATE saga.inbox_messages SET received_at = now() - interval '30 days', processed_at = now() - interval '6 days'
WHERE message_id = pg_temp.inbox_id(5);
SELECT saga.purge('7 days') >= 2 AS purged;
SELECT message_id, status FROM saga.inbox
WHERE message_id IN (pg_temp.inbox_id(1), pg_temp.inbox_id(4), pg_temp.inbox_id(5), pg_temp.inbox_id(30), pg_temp.inbox_id(31))
ORDER BY message_id;
SELECT saga.receive(pg_temp.inbox_id(1), 'inbox.nobody.placed', '{}') AS new_after_purge;
ROLLBACK;

-- ---------- saga.metrics ----------

-- inbox_messages{status}: what the table holds, seen in this transaction.
BEGIN;
SELECT count(*) AS processed_so_far FROM saga.inbox_messages WHERE status = 'processed';
SELECT saga.receive(pg_temp.inbox_id(40), 'inbox.nobody.m', '{}') AS new;
SELECT saga.receive(pg_temp.inbox_id(41), 'inbox.nobody.m', '{}') AS new;
SELECT saga.receive(pg_temp.inbox_id(42), 'inbox.nobody.m', '{}') AS new;
UPDATE saga.inbox_messages SET status = 'dead' WHERE message_id = pg_temp.inbox_id(42);
SELECT name, labels, value FROM saga.metrics() WHERE name = 'inbox_messages' ORDER BY labels ->> 'status';
ROLLBACK;

-- ---------- privileges ----------

-- PUBLIC may register handlers, but neither receive messages nor read them.
\pset format unaligned
\pset tuples_only on
SET ROLE regress_inbox_other;
SELECT pg_temp.err($$SELECT saga.receive(pg_temp.inbox_id(50), 'inbox.forged', '{}')$$);
SELECT pg_temp.err($$SELECT * FROM saga.inbox$$);
SELECT pg_temp.err($$SELECT * FROM saga.inbox_messages$$);
SELECT pg_temp.err($$INSERT INTO saga.inbox_messages (message_id, topic, payload) VALUES (pg_temp.inbox_id(50), 'inbox.forged', '{}')$$);
SELECT pg_temp.err($$UPDATE saga.inbox_messages SET status = 'pending'$$);
SELECT pg_temp.err($$SELECT * FROM saga.handlers$$);
SELECT pg_temp.err($$INSERT INTO saga.handlers (pattern, handler, owner) VALUES ('*', 'public.inbox_record(jsonb)', 10)$$);
SELECT pg_temp.err($$SELECT saga._handle('*', '', 'public.inbox_record(jsonb)', 10)$$);
SELECT pg_temp.err($$SELECT saga._unhandle('inbox.exact', 'public.inbox_exact(jsonb)', 10)$$);
RESET ROLE;
\pset format aligned
\pset tuples_only off
-- the role a remote service connects as is granted receive, and nothing more
BEGIN;
GRANT EXECUTE ON FUNCTION saga.receive(uuid, text, jsonb, text, jsonb, text) TO regress_inbox_remote;
SET ROLE regress_inbox_remote;
SELECT saga.receive(pg_temp.inbox_id(51), 'inbox.remote', '{"from": "remote"}', NULL, NULL, 'remote') AS received;
SELECT saga.receive(pg_temp.inbox_id(51), 'inbox.remote', '{"from": "remote"}', NULL, NULL, 'remote') AS again;
SELECT try($$SELECT * FROM saga.inbox$$);
RESET ROLE;
SELECT topic, payload, source FROM saga.inbox_messages WHERE message_id = pg_temp.inbox_id(51);
ROLLBACK;
SELECT count(*) AS forged FROM saga.inbox_messages WHERE topic = 'inbox.forged';
SELECT pattern, handler FROM saga.handlers ORDER BY pattern, handler;

-- Catalog contract: who may execute what, comments, dumped tables.
SELECT p.oid::regprocedure AS function, has_function_privilege('public', p.oid, 'EXECUTE') AS public_execute,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS commented
FROM pg_proc p WHERE p.pronamespace = 'saga'::regnamespace
  AND p.proname IN ('receive', 'handle', 'unhandle', '_handle', '_unhandle')
ORDER BY p.proname;
SELECT c.relname, has_table_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') AS public_any,
       obj_description(c.oid, 'pg_class') IS NOT NULL AS commented,
       c.oid = ANY (e.extconfig) AS dumped
FROM pg_class c, pg_extension e
WHERE e.extname = 'saga' AND c.relnamespace = 'saga'::regnamespace
  AND c.relname IN ('inbox', 'inbox_messages', 'handlers')
ORDER BY c.relname;

-- Clean up what would otherwise run in later tests.
SELECT saga.unhandle('inbox.exact', 'public.inbox_exact(jsonb)') AS removed;
SELECT count(*) AS handlers_left FROM saga.handlers;
SELECT saga.drop_destination('inbox_hook');
DROP OWNED BY regress_inbox_app, regress_inbox_other, regress_inbox_remote;
DROP ROLE regress_inbox_app;
DROP ROLE regress_inbox_other;
DROP ROLE regress_inbox_remote;
