-- Maintenance: saga.purge() deletes completed and compensated sagas with
-- their steps, invocations, and messages kept after a NOTIFY, once they are
-- older than older_than; it keeps failed, running and compensating sagas,
-- dead letters, pending messages and anything newer. Batches, the deadline
-- sweep of the maintenance job, bad input, privileges, and
-- saga.schedule_maintenance() where pg_cron is not installed.
--
-- The worker runs in this cluster and expires kept messages and runs due
-- sagas itself: every row made here is made, purged and looked at in a
-- transaction that rolls back, which the worker never sees.

-- A saga of this file (name "mnt_<tag>", id kept in mnt_ids), finished (or,
-- if running, started) "age" ago, with nsteps steps.
CREATE TEMP TABLE mnt_ids (id uuid);
CREATE FUNCTION pg_temp.mnt_saga(tag text, st text, age interval, nsteps integer DEFAULT 1)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
	new_id uuid := gen_random_uuid();
BEGIN
	INSERT INTO saga.instances (id, name, driver, status, input, owner, started_at, updated_at, finished_at)
	VALUES (new_id, 'mnt_' || tag, 'application', st, '{}',
			(SELECT oid FROM pg_roles WHERE rolname = current_user),
			now() - age - interval '1 minute', now() - age,
			CASE WHEN st IN ('completed', 'compensated', 'failed') THEN now() - age END);
	INSERT INTO saga.instance_steps (saga_id, position, step, status, finished_at)
	SELECT new_id, g, 's' || g, CASE WHEN st = 'compensated' THEN 'compensated' ELSE 'done' END, now() - age
	FROM generate_series(0, nsteps - 1) g;
	INSERT INTO mnt_ids VALUES (new_id);
	RETURN new_id;
END $$;
-- What is left of this file's rows.
CREATE FUNCTION pg_temp.mnt_left() RETURNS TABLE (kind text, what text, n bigint)
LANGUAGE sql AS $$
	SELECT 'saga', i.name || ' ' || i.status, count(*) FROM saga.instances i
	WHERE i.name LIKE 'mnt\_%' GROUP BY 1, 2
	UNION ALL
	SELECT 'steps of', i.name, count(*) FROM saga.instance_steps x JOIN saga.instances i ON i.id = x.saga_id
	WHERE i.name LIKE 'mnt\_%' GROUP BY 1, 2
	UNION ALL
	SELECT 'steps of a deleted saga', '', count(*) FROM saga.instance_steps x JOIN mnt_ids m ON m.id = x.saga_id
	WHERE NOT EXISTS (SELECT FROM saga.instances i WHERE i.id = x.saga_id)
	HAVING count(*) > 0
	UNION ALL
	SELECT 'invocation', v.key || ' ' || v.status, count(*) FROM saga.invocations v
	WHERE v.key LIKE 'mnt-%' GROUP BY 1, 2
	UNION ALL
	SELECT 'message', q.topic || ' ' || q.status, count(*) FROM saga.queue q
	WHERE q.topic LIKE 'mnt.%' GROUP BY 1, 2
	ORDER BY 1, 2
$$;
-- The same on one line.
CREATE FUNCTION pg_temp.mnt_left_line() RETURNS text LANGUAGE sql AS $$
	SELECT string_agg(kind || ' ' || what || ': ' || n, '; ') FROM pg_temp.mnt_left()
$$;
-- An invocation of this file: invoked and/or compensated that long ago.
CREATE FUNCTION pg_temp.mnt_invocation(k text, invoked interval, compensated interval) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO saga.invocations (key, status, fn, result, invoked_at, invoked_by, compensation_fn,
								  compensated_at, compensated_by)
	VALUES (k, CASE WHEN invoked IS NULL THEN 'tombstone' WHEN compensated IS NULL THEN 'executed'
					ELSE 'compensated' END,
			CASE WHEN invoked IS NOT NULL THEN 'public.f(jsonb)' END, '{}', now() - invoked,
			CASE WHEN invoked IS NOT NULL THEN (SELECT oid FROM pg_roles WHERE rolname = current_user)::regrole END,
			CASE WHEN compensated IS NOT NULL THEN 'public.g(jsonb)' END, now() - compensated,
			CASE WHEN compensated IS NOT NULL THEN (SELECT oid FROM pg_roles WHERE rolname = current_user)::regrole END)
$$;
-- A message of this file in the queue, finished (or published) that long ago.
CREATE FUNCTION pg_temp.mnt_message(topic text, st text, age interval) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO saga.queue (message_id, destination, topic, payload, published_at, next_attempt_at,
							attempts, status, finished_at)
	VALUES (gen_random_uuid(), 'mnt_dest', topic, '{}', now() - age - interval '1 minute', now() - age,
			CASE WHEN st = 'pending' THEN 0 ELSE 1 END, st, CASE WHEN st <> 'pending' THEN now() - age END)
$$;

-- What is deleted and what is kept.
BEGIN;
SELECT pg_temp.mnt_saga('old_completed', 'completed', '10 days', 2) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('old_compensated', 'compensated', '10 days', 3) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('edge_completed', 'completed', '1 day 1 minute', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('new_completed', 'completed', '1 hour', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('new_compensated', 'compensated', '23 hours', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('old_failed', 'failed', '10 days', 2) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('old_running', 'running', '10 days', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('old_compensating', 'compensating', '10 days', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_invocation('mnt-old-executed', '10 days', NULL);
SELECT pg_temp.mnt_invocation('mnt-old-compensated', '10 days', '9 days');
SELECT pg_temp.mnt_invocation('mnt-old-tombstone', NULL, '10 days');
SELECT pg_temp.mnt_invocation('mnt-recently-compensated', '10 days', '1 hour');
SELECT pg_temp.mnt_invocation('mnt-new-executed', '1 hour', NULL);
SELECT pg_temp.mnt_invocation('mnt-new-tombstone', NULL, '1 hour');
SELECT pg_temp.mnt_message('mnt.old', 'delivered', '10 days');
SELECT pg_temp.mnt_message('mnt.new', 'delivered', '1 hour');
SELECT pg_temp.mnt_message('mnt.old', 'dead', '10 days');
SELECT pg_temp.mnt_message('mnt.old', 'pending', '10 days');
SELECT * FROM pg_temp.mnt_left();
-- 3 sagas with 6 steps, 3 invocations, 1 message
SELECT saga.purge('1 day') AS deleted;
SELECT * FROM pg_temp.mnt_left();
-- nothing more to do
SELECT saga.purge('1 day') AS deleted;
-- older_than 0: every completed or compensated saga, invocation and kept
-- message (here also those the files before this one left)
SELECT saga.purge('0') >= 8 AS deleted_the_rest;
SELECT * FROM pg_temp.mnt_left();
ROLLBACK;

-- The default is 7 days.
BEGIN;
SELECT pg_temp.mnt_saga('eight_days', 'completed', '8 days', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_saga('six_days', 'completed', '6 days', 1) IS NOT NULL AS made;
SELECT pg_temp.mnt_invocation('mnt-eight-days', '8 days', NULL);
SELECT pg_temp.mnt_invocation('mnt-six-days', '6 days', NULL);
SELECT saga.purge() AS deleted;
SELECT * FROM pg_temp.mnt_left();
ROLLBACK;

-- Batches: the same rows purged 1, 2, 5, 7 or 10,000 rows per statement give
-- the same result. The 25 sagas and the 5 messages share one finished_at,
-- so a batch boundary falls between equal timestamps; a failed saga and a
-- dead letter with that timestamp are kept.
BEGIN;
SELECT count(pg_temp.mnt_saga('batch', 'completed', '3 days', 1)) AS made FROM generate_series(1, 25);
SELECT pg_temp.mnt_saga('batch_failed', 'failed', '3 days', 1) IS NOT NULL AS made;
UPDATE saga.instances SET finished_at = date_trunc('day', now()) - interval '3 days' WHERE name LIKE 'mnt\_batch%';
SELECT pg_temp.mnt_invocation('mnt-batch-' || g, '3 days', NULL) FROM generate_series(1, 7) g;
SELECT pg_temp.mnt_message('mnt.batch', 'delivered', '3 days') FROM generate_series(1, 5);
SELECT pg_temp.mnt_message('mnt.batch', 'dead', '3 days');
UPDATE saga.queue SET finished_at = date_trunc('day', now()) - interval '3 days' WHERE topic = 'mnt.batch';
SELECT * FROM pg_temp.mnt_left();
SAVEPOINT fixture;
SELECT saga._purge('1 day', 1) AS deleted_in_batches_of_1;
SELECT pg_temp.mnt_left_line();
ROLLBACK TO fixture;
SELECT saga._purge('1 day', 2) AS deleted_in_batches_of_2;
SELECT pg_temp.mnt_left_line();
ROLLBACK TO fixture;
SELECT saga._purge('1 day', 5) AS deleted_in_batches_of_5;
SELECT pg_temp.mnt_left_line();
ROLLBACK TO fixture;
SELECT saga._purge('1 day', 7) AS deleted_in_batches_of_7;
SELECT pg_temp.mnt_left_line();
ROLLBACK TO fixture;
SELECT saga._purge('1 day', 10000) AS deleted_in_one_batch;
SELECT pg_temp.mnt_left_line();
ROLLBACK;

-- The deadline sweep of the maintenance job: sagas past their deadline that
-- nothing would bring to the worker become due now; the rest is untouched.
BEGIN;
-- (first whatever the files before this one left, so the count below is ours)
SELECT saga._sweep_deadlines() AS others \gset
CREATE TEMP TABLE mnt_sweep AS
SELECT v.*, pg_temp.mnt_saga(v.tag, v.status, '1 hour', 0) AS id
FROM (VALUES
	('late_idle',           'running',      '-1 minute', NULL,        false),  -- woken
	('late_sleeping',       'running',      '-1 minute', '1 hour',    false),  -- woken
	('late_due',            'running',      '-1 minute', '-1 second', false),  -- already due
	('on_time',             'running',      '1 hour',    NULL,        false),
	('late_compensating',   'compensating', '-1 minute', NULL,        false),  -- woken
	('compensation_backoff','compensating', '-1 minute', '1 minute',  false),  -- keeps its backoff
	('compensation_waiting','compensating', '-1 minute', NULL,        true),   -- waits for its HTTP call
	('late_completed',      'completed',    '-1 minute', NULL,        false),
	('late_failed',         'failed',       '-1 minute', NULL,        false)
) v(tag, status, deadline, next_run, request);
UPDATE saga.instances i SET deadline = now() + s.deadline::interval, next_run_at = now() + s.next_run::interval,
       request_id = CASE WHEN s.request THEN gen_random_uuid() END
FROM mnt_sweep s WHERE i.id = s.id;
SELECT saga._sweep_deadlines() AS woken;
SELECT s.tag, i.status,
       CASE WHEN i.next_run_at IS NULL THEN 'nothing due'
            WHEN i.next_run_at = now() THEN 'due now'
            WHEN i.next_run_at < now() THEN 'was due'
            ELSE 'due later' END AS next_run
FROM mnt_sweep s JOIN saga.instances i ON i.id = s.id ORDER BY s.tag;
-- a second sweep finds nothing
SELECT saga._sweep_deadlines() AS woken_again;
ROLLBACK;

-- Bad input.
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.purge(NULL)$$);
SELECT try($$SELECT saga.purge('-1 day')$$);
SELECT try($$SELECT saga.purge('1 day -25 hours')$$);
SELECT try($$SELECT saga.purge('-1 second')$$);
SELECT try($$SELECT saga.purge('1 week')$$);
SELECT try($$SELECT saga.purge('soon')$$);
SELECT try($$SELECT saga.schedule_maintenance(NULL)$$);
\pset format aligned
\pset tuples_only off
-- an older_than reaching before the earliest timestamp deletes nothing
SELECT saga.purge('200000 years') AS deleted;

-- Without pg_cron in this database: a clear error, nothing to unschedule.
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.schedule_maintenance()$$);
SELECT try($$SELECT saga.schedule_maintenance('*/5 * * * *')$$);
\pset format aligned
\pset tuples_only off
SELECT saga.unschedule_maintenance() AS removed;

-- Privileges: PUBLIC may call none of these; a role granted EXECUTE on
-- saga.purge purges without any right on the tables.
CREATE ROLE regress_maint_app;
CREATE ROLE regress_maint_ops;
GRANT EXECUTE ON FUNCTION saga.purge(interval) TO regress_maint_ops;
SELECT p.oid::regprocedure AS function, has_function_privilege('regress_maint_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('regress_maint_ops', p.oid, 'EXECUTE') AS ops
FROM pg_proc p
WHERE p.pronamespace = 'saga'::regnamespace
  AND p.proname IN ('purge', 'schedule_maintenance', 'unschedule_maintenance', '_purge', '_sweep_deadlines')
ORDER BY p.proname;
SET ROLE regress_maint_app;
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.purge()$$);
SELECT try($$SELECT saga.schedule_maintenance()$$);
SELECT try($$SELECT saga.unschedule_maintenance()$$);
SELECT try($$SELECT saga._purge('1 day', 10)$$);
SELECT try($$SELECT saga._sweep_deadlines()$$);
\pset format aligned
\pset tuples_only off
RESET ROLE;
BEGIN;
SELECT pg_temp.mnt_saga('ops', 'completed', '2 days', 2) IS NOT NULL AS made;
SET LOCAL ROLE regress_maint_ops;
SELECT try($$SELECT count(*) FROM saga.instances$$) AS reads_instances;
SELECT saga.purge('1 day') AS deleted_by_ops;
RESET ROLE;
SELECT * FROM pg_temp.mnt_left();
ROLLBACK;
REVOKE EXECUTE ON FUNCTION saga.purge(interval) FROM regress_maint_ops;
DROP ROLE regress_maint_app;
DROP ROLE regress_maint_ops;
