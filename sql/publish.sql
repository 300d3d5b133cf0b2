-- saga.publish: which rows it queues (fan-out, prefix wildcards, nothing when
-- nobody subscribes, nothing after a rollback, scheduled delivery), the
-- message ids, saga.message(), and every bad argument.
--
-- The worker runs while this test does. Rows are looked at inside the
-- publishing transaction (the worker cannot see them yet) or are scheduled
-- in the future; destinations point at a closed port with a long backoff.

SELECT saga.create_destination('pub_a', 'http://127.0.0.1:1/a', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('pub_b', 'http://127.0.0.1:1/b', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('pub_all', 'http://127.0.0.1:1/all', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.subscribe('pub.order.placed', 'pub_a');
SELECT saga.subscribe('pub.order.*', 'pub_b');
-- pub_b also has the exact topic: still one row per destination
SELECT saga.subscribe('pub.order.placed', 'pub_b');
SELECT saga.subscribe('*', 'pub_all');
SELECT saga.subscribe('pub.it''s;DROP', 'pub_a');

-- Fan-out: one row per subscribed destination, pending, not yet attempted.
BEGIN;
SELECT saga.publish('pub.order.placed', '{"order": 1}', 'order-1', '{"X-Trace": "t1"}') AS m1 \gset
SELECT topic, key, destination, status, attempts, last_error, next_attempt_at = now() AS due_now
FROM saga.outbox WHERE message_id = :'m1' ORDER BY destination;
SELECT destination, payload, headers, status FROM saga.queue WHERE message_id = :'m1' ORDER BY destination;
-- prefix wildcard: "pub.order.*" matches "pub.order.shipped" and "pub.order."
-- but not "pub.order", "pub.orders.x" or another case; "*" matches everything
CREATE TEMP TABLE routed (topic text, id uuid);
INSERT INTO routed
SELECT t, saga.publish(t, '{}')
FROM unnest(ARRAY['pub.order.shipped', 'pub.order.', 'pub.order.a.b', 'pub.order',
                  'pub.orders.x', 'PUB.order.placed', 'pub.it''s;DROP', 'pub.it''s']) t;
SELECT r.topic, string_agg(q.destination, ', ' ORDER BY q.destination) AS destinations
FROM routed r LEFT JOIN saga.queue q ON q.message_id = r.id
GROUP BY r.topic ORDER BY r.topic COLLATE "C";
-- scheduled: a future deliver_at shows as scheduled; a past one is due
SELECT saga.publish('pub.order.placed', '{"later": true}', deliver_at => now() + interval '1 hour') AS m_later \gset
SELECT saga.publish('pub.order.placed', '{"earlier": true}', deliver_at => now() - interval '1 hour') AS m_earlier \gset
SELECT destination, status, next_attempt_at - now() AS due_in FROM saga.outbox
WHERE message_id = :'m_later' ORDER BY destination;
SELECT destination, status, next_attempt_at - now() AS due_in FROM saga.outbox
WHERE message_id = :'m_earlier' ORDER BY destination;
-- a publish in a rolled-back savepoint is gone, one in a released savepoint stays
SAVEPOINT s1;
SELECT saga.publish('pub.order.placed', '{"savepoint": "rolled back"}') AS m_sp1 \gset
ROLLBACK TO SAVEPOINT s1;
SAVEPOINT s2;
SELECT saga.publish('pub.order.placed', '{"savepoint": "released"}') AS m_sp2 \gset
RELEASE SAVEPOINT s2;
SELECT payload->>'savepoint' AS savepoint, count(*) AS rows FROM saga.queue
WHERE message_id IN (:'m_sp1', :'m_sp2') GROUP BY 1;
ROLLBACK;

-- the whole transaction rolled back: none of its messages exist
SELECT count(*) AS after_rollback FROM saga.queue
WHERE message_id IN (:'m1', :'m_later', :'m_earlier', :'m_sp2');

-- Nobody subscribed: an id is returned, nothing is queued, nothing to read.
SELECT saga.unsubscribe('*', 'pub_all');
SELECT saga.publish('pub.nobody.listens', '{"x": 1}') AS m_none \gset
SELECT count(*) AS queued FROM saga.queue WHERE message_id = :'m_none';
SELECT try(format('SELECT saga.message(%L)', :'m_none')) ~ '^42704: message [0-9a-f-]{36} not found' AS message_not_found;

-- Message ids: UUID version 7, RFC 9562 variant, strictly increasing.
WITH ids AS (
	SELECT g, saga.publish('pub.nobody.listens', '{}') AS id FROM generate_series(1, 200) g
)
SELECT count(DISTINCT id) AS distinct_ids,
       bool_and(substr(id::text, 15, 1) = '7') AS version_7,
       bool_and(substr(id::text, 20, 1) IN ('8', '9', 'a', 'b')) AS rfc_variant,
       bool_and(id > prev) FILTER (WHERE prev IS NOT NULL) AS increasing
FROM (SELECT g, id, lag(id) OVER (ORDER BY g) AS prev FROM ids) s;

-- Committed: the row is in the outbox (the worker may already have tried
-- the closed port; with a one-hour backoff it stays there), and
-- saga.message() returns its envelope.
SELECT saga.publish('pub.order.placed', '{"order": 2, "items": [1, 2]}', 'order-2',
                    '{"X-Trace": "t2"}') AS m2 \gset
SELECT topic, key, destination FROM saga.outbox WHERE message_id = :'m2' ORDER BY destination;
SELECT saga.message(:'m2') - 'id' - 'published_at' AS envelope;
SELECT (saga.message(:'m2')->>'id')::uuid = :'m2' AS same_id,
       (saga.message(:'m2')->>'published_at')::timestamptz <= now() AS published_at_is_a_time;
-- payloads may be any JSON value, and keys/headers may be absent
SELECT saga.publish('pub.order.placed', t.payload, deliver_at => now() + interval '1 day') AS m_scalar
FROM (VALUES ('null'::jsonb)) t(payload) \gset
SELECT saga.message(:'m_scalar') - 'id' - 'published_at' AS envelope;
SELECT saga.publish('pub.order.placed', '"text"', NULL, NULL, NULL) IS NOT NULL AS string_payload,
       saga.publish('pub.order.placed', '[1, "two", null]', NULL, '{}') IS NOT NULL AS array_payload;

-- the calls below that are accepted queue one row each for pub_a
SELECT saga.subscribe('pub.t', 'pub_a');

\pset format unaligned
\pset tuples_only on

-- NULL where a value is needed
SELECT try($$SELECT saga.publish(NULL, '{}')$$);
SELECT try($$SELECT saga.publish('pub.t', NULL)$$);
SELECT try($$SELECT saga.publish(NULL, NULL, NULL, NULL, NULL)$$);

-- bad topics: empty, spaces, control characters, "*", too long
SELECT try($$SELECT saga.publish('', '{}')$$);
SELECT try($$SELECT saga.publish('pub order placed', '{}')$$);
SELECT try($$SELECT saga.publish(' pub.t', '{}')$$);
SELECT try($$SELECT saga.publish(E'pub.t\r\nX-Injected: 1', '{}')$$);
SELECT try($$SELECT saga.publish('pub.order.*', '{}')$$);
SELECT try($$SELECT saga.publish('*', '{}')$$);
SELECT try($$SELECT saga.publish('pub.*.placed', '{}')$$);
SELECT try($$SELECT saga.publish('pub.' || repeat('t', 197), '{}')$$);

-- keys: empty, too long (bytes, not characters)
SELECT try($$SELECT saga.publish('pub.t', '{}', '')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', repeat('k', 513))$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', repeat('é', 257))$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', repeat('k', 512))$$);

-- payload larger than saga.max_payload_size
SET saga.max_payload_size = '1kB';
SELECT try($$SELECT saga.publish('pub.t', jsonb_build_object('x', repeat('p', 1100)))$$);
SELECT try($$SELECT saga.publish('pub.t', jsonb_build_object('x', repeat('p', 900)))$$);
RESET saga.max_payload_size;
SELECT try($$SELECT saga.publish('pub.t', jsonb_build_object('x', repeat('p', 1100000)))$$);

-- headers: not an object, non-string values, bad names, line breaks,
-- reserved names, too large
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '[]')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '"X-A: 1"')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, 'null')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-N": 1}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-N": null}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-N": ["a"]}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-A": "v\r\nX-Injected: 1"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-A": "v\nX-Injected: 1"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X-A\r\nX-Injected": "1"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"X A": "1"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"": "1"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"Idempotency-Key": "mine"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"IDEMPOTENCY-KEY": "mine"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"Saga-Topic": "other"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"content-type": "text/xml"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"Host": "evil.example"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"Connection": "close"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, '{"Expect": "100-continue"}')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, jsonb_build_object('X-Big', repeat('v', 3000)))$$);

-- deliver_at must be a real point in time
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, NULL, 'infinity')$$);
SELECT try($$SELECT saga.publish('pub.t', '{}', NULL, NULL, '-infinity')$$);

-- a read-only transaction publishes nothing
BEGIN READ ONLY;
SELECT try($$SELECT saga.publish('pub.order.placed', '{}')$$);
ROLLBACK;

-- publish writes saga.queue without the executor: a trigger on the table is
-- refused (it would not fire), and so is a column it does not know that needs
-- a value; a nullable column without a default is left NULL
CREATE FUNCTION pub_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER audit BEFORE INSERT ON saga.queue FOR EACH ROW EXECUTE FUNCTION pub_audit();
SELECT try($$SELECT saga.publish('pub.order.placed', '{}')$$);
DROP TRIGGER audit ON saga.queue;
DROP FUNCTION pub_audit();
ALTER TABLE saga.queue ADD COLUMN extra integer NOT NULL DEFAULT 0;
SELECT try($$SELECT saga.publish('pub.order.placed', '{}')$$);
ALTER TABLE saga.queue DROP COLUMN extra;
ALTER TABLE saga.queue ADD COLUMN note text;
BEGIN;
SELECT try($$SELECT saga.publish('pub.order.placed', '{}')$$);
ROLLBACK;
ALTER TABLE saga.queue DROP COLUMN note;

-- the table's indexes are described once and kept; any index created or
-- dropped since, of any kind, is maintained (or no longer touched) at once
BEGIN;
SELECT saga.publish('pub.order.indexed', '{"n": 1}') IS NOT NULL AS published;
CREATE UNIQUE INDEX queue_once ON saga.queue (topic) WHERE topic = 'pub.order.indexed';
CREATE INDEX queue_n ON saga.queue ((payload->>'n'));
CREATE INDEX queue_topic_hash ON saga.queue USING hash (topic);
SELECT try($$SELECT saga.publish('pub.order.indexed', '{}')$$);
SELECT saga.publish('pub.order.indexed2', '{"n": 2}') IS NOT NULL AS published;
SET LOCAL enable_seqscan = off;
SET LOCAL enable_bitmapscan = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM saga.queue WHERE payload->>'n' = '2';
SELECT count(*) FROM saga.queue WHERE payload->>'n' = '2';
EXPLAIN (COSTS OFF) SELECT count(*) FROM saga.queue WHERE topic = 'pub.order.indexed2';
SELECT count(*) FROM saga.queue WHERE topic = 'pub.order.indexed2';
DROP INDEX saga.queue_n, saga.queue_topic_hash, saga.queue_once;
SELECT saga.publish('pub.order.indexed', '{"n": 3}') IS NOT NULL AS published;
ROLLBACK;
-- a deferrable constraint checks through a trigger: refused like the others
BEGIN;
ALTER TABLE saga.queue ADD CONSTRAINT queue_deferred UNIQUE (message_id, destination) DEFERRABLE;
SELECT try($$SELECT saga.publish('pub.order.placed', '{}')$$);
ROLLBACK;
BEGIN;
SELECT saga.publish('pub.order.placed', '{}') IS NOT NULL AS published;
ROLLBACK;

\pset format aligned
\pset tuples_only off

-- every column of a published row is what the table's defaults would say
BEGIN;
SELECT saga.publish('pub.order.placed', '{"all": "columns"}', 'k1', '{"X-A": "1"}') AS m_all \gset
SELECT destination, seq > 0 AS has_seq, topic, key, payload, headers, published_at = now() AS published_now,
       next_attempt_at = now() AS due_now, lease_until, attempts, status, last_error, last_status,
       finished_at, saga_call
FROM saga.queue WHERE message_id = :'m_all' ORDER BY destination;
ROLLBACK;

-- only the two accepted calls queued anything
SELECT key IS NOT NULL AS keyed, octet_length(payload::text) AS payload_bytes
FROM saga.queue WHERE topic = 'pub.t' ORDER BY seq;

-- clean up (as superuser: the queue is not for applications)
DELETE FROM saga.queue WHERE destination LIKE 'pub\_%';
SELECT saga.drop_destination('pub_a');
SELECT saga.drop_destination('pub_b');
SELECT saga.drop_destination('pub_all');
