-- Dead letters: saga.dead_letters, saga.redeliver() and saga.message() on
-- them, and the bad arguments of both functions.
--
-- Dead letters are made by hand (UPDATE on saga.queue as superuser) on rows
-- scheduled far in the future, so the worker never touches them first.

SELECT saga.create_destination('dl_a', 'http://127.0.0.1:1/a', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('dl_b', 'http://127.0.0.1:1/b', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.create_destination('dl_other', 'http://127.0.0.1:1/o', '{"backoff": "1 hour", "max_backoff": "1 hour"}');
SELECT saga.subscribe('dl.order.*', 'dl_a');
SELECT saga.subscribe('dl.order.*', 'dl_b');

SELECT saga.publish('dl.order.placed', '{"order": 7}', 'order-7', '{"X-Trace": "t7"}',
                    now() + interval '1 day') AS m_dead \gset
SELECT saga.publish('dl.order.placed', '{"order": 8}', NULL, NULL,
                    now() + interval '1 day') AS m_pending \gset

-- the worker gave up on both copies of m_dead
UPDATE saga.queue
SET status = 'dead', attempts = 10, last_error = 'HTTP 503: unavailable', last_status = 503,
    finished_at = now()
WHERE message_id = :'m_dead';

SELECT topic, key, destination, attempts, last_error, last_status, dead_at <= now() AS dead_at_set,
       payload, headers
FROM saga.dead_letters WHERE message_id = :'m_dead' ORDER BY destination;
-- dead letters are not in the outbox; the pending message is
SELECT message_id = :'m_pending' AS is_pending_message, destination, status
FROM saga.outbox WHERE topic = 'dl.order.placed' ORDER BY destination;
-- saga.message() reads a dead letter
SELECT saga.message(:'m_dead') - 'id' - 'published_at' AS envelope;

-- redeliver one destination: back to pending with a fresh attempt count,
-- due now; the other copy stays dead. Rolled back, nothing changed.
BEGIN;
SELECT saga.redeliver(:'m_dead', 'dl_a') AS requeued;
SELECT destination, status, attempts, next_attempt_at = now() AS due_now
FROM saga.outbox WHERE message_id = :'m_dead' ORDER BY destination;
SELECT destination FROM saga.dead_letters WHERE message_id = :'m_dead' ORDER BY destination;
ROLLBACK;
SELECT destination, attempts FROM saga.dead_letters WHERE message_id = :'m_dead' ORDER BY destination;

-- redeliver every destination of the message
BEGIN;
SELECT saga.redeliver(:'m_dead') AS requeued;
SELECT destination, status, attempts, next_attempt_at = now() AS due_now
FROM saga.outbox WHERE message_id = :'m_dead' ORDER BY destination;
COMMIT;
-- committed: no dead letter left, both copies are in the outbox again (the
-- worker may already be retrying them against the closed port)
SELECT count(*) AS dead_left FROM saga.dead_letters WHERE message_id = :'m_dead';
SELECT destination FROM saga.outbox WHERE message_id = :'m_dead' ORDER BY destination;

-- nothing dead to requeue: 0, not an error
SELECT saga.redeliver(:'m_dead') AS again;
SELECT saga.redeliver(:'m_pending') AS pending_message;
SELECT saga.redeliver(:'m_pending', 'dl_b') AS pending_message_one_destination;
-- a destination the message never went to
UPDATE saga.queue SET status = 'dead', finished_at = now(), last_error = 'gave up'
WHERE message_id = :'m_pending' AND destination = 'dl_a';
SELECT saga.redeliver(:'m_pending', 'dl_other') AS other_destination;
SELECT destination FROM saga.dead_letters WHERE message_id = :'m_pending';

-- a message NOTIFY delivered without its payload is kept as 'delivered':
-- saga.message() reads it, redeliver() does not resurrect it
UPDATE saga.queue SET status = 'delivered', finished_at = now()
WHERE message_id = :'m_pending' AND destination = 'dl_b';
SELECT saga.message(:'m_pending')->'payload' AS kept_payload;
SELECT saga.redeliver(:'m_pending', 'dl_b') AS delivered_message;
SELECT destination, status FROM saga.queue WHERE message_id = :'m_pending' ORDER BY destination;

\pset format unaligned
\pset tuples_only on

-- NULL and malformed ids
SELECT try($$SELECT saga.redeliver(NULL)$$);
SELECT try($$SELECT saga.redeliver(NULL, 'dl_a')$$);
SELECT try($$SELECT saga.redeliver(NULL, NULL)$$);
SELECT try($$SELECT saga.message(NULL)$$);
SELECT try($$SELECT saga.redeliver('not-a-uuid')$$);
SELECT try($$SELECT saga.message('')$$);

-- unknown message ids
SELECT try($$SELECT saga.redeliver('00000000-0000-7000-8000-000000000000')$$);
SELECT try($$SELECT saga.redeliver('00000000-0000-7000-8000-000000000000', 'dl_a')$$);
SELECT try($$SELECT saga.message('00000000-0000-7000-8000-000000000000')$$);
SELECT try($$SELECT saga.message('ffffffff-ffff-ffff-ffff-ffffffffffff')$$);

-- unknown destinations (checked before the message)
SELECT try($$SELECT saga.redeliver('00000000-0000-7000-8000-000000000000', 'dl_missing')$$);
SELECT try(format('SELECT saga.redeliver(%L, %L)', :'m_pending', 'dl_missing'));
SELECT try(format('SELECT saga.redeliver(%L, %L)', :'m_pending', ''));
SELECT try(format('SELECT saga.redeliver(%L, %L)', :'m_pending', 'dl_a''; DELETE FROM saga.queue; --'));

\pset format aligned
\pset tuples_only off

-- the rejected calls changed nothing
SELECT destination, status FROM saga.queue WHERE message_id = :'m_pending' ORDER BY destination;

-- clean up
DELETE FROM saga.queue WHERE destination LIKE 'dl\_%';
SELECT saga.drop_destination('dl_a');
SELECT saga.drop_destination('dl_b');
SELECT saga.drop_destination('dl_other');
