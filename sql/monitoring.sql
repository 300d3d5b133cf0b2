-- Operating it: saga.worker_status(), saga.metrics(), and the columns and
-- statuses of the views saga.outbox and saga.dead_letters.

-- Wait (up to 60 s, polling) until this database's worker is running.
DO $$
BEGIN
	FOR i IN 1 .. 600 LOOP
		EXIT WHEN EXISTS (SELECT 1 FROM saga.worker_status()
						  WHERE kind = 'worker' AND database = current_database()
							AND state IN ('idle', 'dispatching'));
		PERFORM pg_sleep(0.1);
	END LOOP;
END $$;

-- The launcher and exactly one worker for this database, both real processes.
SELECT w.kind, w.database = current_database() AS this_database, w.state IN ('running', 'idle', 'dispatching') AS running,
       a.backend_type, w.started_at <= now() AS started,
       w.last_cycle_at IS NOT NULL AS has_cycled, w.in_flight
FROM saga.worker_status() w LEFT JOIN pg_stat_activity a ON a.pid = w.pid
WHERE w.kind = 'launcher' OR w.database = current_database()
ORDER BY w.kind;
SELECT count(*) AS workers_for_this_database FROM saga.worker_status()
WHERE kind = 'worker' AND database = current_database();
SELECT kind, database, state, pid, started_at, last_cycle_at, in_flight FROM saga.worker_status() WHERE false;

-- Columns of the views (saga.outbox and saga.dead_letters carry at least
-- what the design promises).
SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
WHERE attrelid = 'saga.outbox'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
WHERE attrelid = 'saga.dead_letters'::regclass AND attnum > 0 ORDER BY attnum;
SELECT name FROM unnest(ARRAY['message_id', 'topic', 'key', 'destination', 'status', 'attempts',
                              'next_attempt_at', 'last_error']) name
WHERE name NOT IN (SELECT attname FROM pg_attribute WHERE attrelid = 'saga.outbox'::regclass);
SELECT name FROM unnest(ARRAY['message_id', 'topic', 'key', 'destination', 'attempts',
                              'last_error', 'last_status', 'dead_at']) name
WHERE name NOT IN (SELECT attname FROM pg_attribute WHERE attrelid = 'saga.dead_letters'::regclass);

SELECT saga.create_destination('mon_parked', 'http://127.0.0.1:1/p', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('mon_idle', 'http://127.0.0.1:1/i', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.subscribe('mon.t', 'mon_parked');

-- The statuses of saga.outbox, made by hand in a transaction the worker
-- cannot see: pending (due), scheduled (future), retrying (tried before,
-- waiting), in_flight (leased).
BEGIN;
SELECT saga.publish('mon.t', '{"s": "pending"}') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{"s": "scheduled"}', deliver_at => now() + interval '1 minute') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{"s": "retrying"}') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{"s": "in_flight"}') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{"s": "dead"}') IS NOT NULL AS published;
UPDATE saga.queue SET attempts = 2, last_error = 'HTTP 503', last_status = 503,
       next_attempt_at = now() + interval '1 minute'
WHERE payload->>'s' = 'retrying';
UPDATE saga.queue SET attempts = 1, lease_until = now() + interval '1 minute'
WHERE payload->>'s' = 'in_flight';
UPDATE saga.queue SET attempts = 10, status = 'dead', finished_at = now(), last_error = 'HTTP 503', last_status = 503
WHERE payload->>'s' = 'dead';
SELECT topic, destination, status, attempts, last_error, last_status FROM saga.outbox
WHERE destination = 'mon_parked' ORDER BY attempts, status;
SELECT topic, destination, attempts, last_error, last_status FROM saga.dead_letters
WHERE destination = 'mon_parked';
-- metrics see the same transaction: 4 pending (the dead one is not),
-- 1 dead, lag of the oldest due message (published at now(): 0 s)
SELECT name, labels, value FROM saga.metrics()
WHERE labels->>'destination' IN ('mon_parked', 'mon_idle') ORDER BY name, labels->>'destination';
ROLLBACK;

-- Lag: the oldest due message of a destination, in seconds.
BEGIN;
SELECT saga.publish('mon.t', '{}', deliver_at => now() - interval '90 seconds') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{}', deliver_at => now() - interval '30 seconds') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{}', deliver_at => now() + interval '1 hour') IS NOT NULL AS published;
SELECT name, value FROM saga.metrics()
WHERE labels->>'destination' = 'mon_parked' ORDER BY name;
ROLLBACK;

-- Counters of this database's worker slot.
SELECT name, labels FROM saga.metrics() WHERE labels = '{}' ORDER BY name;
SELECT value AS published_before FROM saga.metrics() WHERE name = 'messages_published_total' \gset
-- each committed publish counts (three here), a rolled-back one does not
SELECT saga.publish('mon.t', '{"n": 1}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
BEGIN;
SELECT saga.publish('mon.t', '{"n": 2}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
SELECT saga.publish('mon.t', '{"n": 3}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
COMMIT;
BEGIN;
SELECT saga.publish('mon.t', '{"n": 4}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
ROLLBACK;
SELECT value - :published_before AS published_delta FROM saga.metrics() WHERE name = 'messages_published_total';
SELECT value AS pending FROM saga.metrics()
WHERE name = 'outbox_pending' AND labels = '{"destination": "mon_parked"}';

-- Who may call what: worker_status() and the views' absence of grants.
CREATE ROLE regress_saga_monitor;
SET ROLE regress_saga_monitor;
SELECT count(*) > 0 AS sees_workers FROM saga.worker_status();
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT * FROM saga.metrics()$$);
SELECT try($$SELECT * FROM saga.outbox$$);
SELECT try($$SELECT * FROM saga.dead_letters$$);
\pset format aligned
\pset tuples_only off
RESET ROLE;
DROP ROLE regress_saga_monitor;

-- clean up
DELETE FROM saga.queue WHERE destination LIKE 'mon\_%';
SELECT saga.drop_destination('mon_parked');
SELECT saga.drop_destination('mon_idle');
-- a dropped destination has no gauges any more
SELECT count(*) AS gauges_left FROM saga.metrics() WHERE labels->>'destination' LIKE 'mon\_%';
