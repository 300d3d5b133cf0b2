-- saga.subscribe and saga.unsubscribe: patterns, duplicates, and every bad
-- argument with its SQLSTATE and message.

CREATE VIEW pg_temp.subs AS
SELECT CASE WHEN octet_length(pattern) > 40
            THEN left(pattern, 16) || '...(' || octet_length(pattern) || ' bytes)'
            ELSE pattern END AS pattern,
       destination, coalesce(quote_literal(prefix), 'NULL') AS prefix
FROM saga.subscriptions
WHERE destination LIKE 'sub\_%' ORDER BY destination, pattern COLLATE "C";

SELECT saga.create_destination('sub_a', 'http://127.0.0.1:1/a');
SELECT saga.create_destination('sub_b', 'http://127.0.0.1:1/b');

-- exact topics and prefix patterns; "*" alone matches every topic
SELECT saga.subscribe('sub.order.placed', 'sub_a');
SELECT saga.subscribe('sub.order.*', 'sub_a');
SELECT saga.subscribe('sub.order.*', 'sub_b');
SELECT saga.subscribe('sub.ord*', 'sub_b');
SELECT saga.subscribe('*', 'sub_b');
-- printable characters other than space, including quotes and semicolons,
-- are plain text in a topic
SELECT saga.subscribe('sub.it''s;DROP-TABLE', 'sub_a');
SELECT saga.subscribe('sub.ünïcødé', 'sub_a');
-- the longest topic: 200 bytes
SELECT saga.subscribe('sub.' || repeat('t', 196), 'sub_a');
SELECT * FROM pg_temp.subs;

-- subscribing twice is a no-op with a notice
SELECT saga.subscribe('sub.order.placed', 'sub_a');
SELECT count(*) AS once FROM saga.subscriptions WHERE pattern = 'sub.order.placed' AND destination = 'sub_a';

\pset format unaligned
\pset tuples_only on

-- NULL for each argument
SELECT try($$SELECT saga.subscribe(NULL, 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.t', NULL)$$);
SELECT try($$SELECT saga.unsubscribe(NULL, 'sub_a')$$);
SELECT try($$SELECT saga.unsubscribe('sub.t', NULL)$$);

-- empty strings
SELECT try($$SELECT saga.subscribe('', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.t', '')$$);
SELECT try($$SELECT saga.unsubscribe('', 'sub_a')$$);
SELECT try($$SELECT saga.unsubscribe('sub.t', '')$$);

-- unknown destinations, including names that look like SQL
SELECT try($$SELECT saga.subscribe('sub.t', 'sub_missing')$$);
SELECT try($$SELECT saga.subscribe('sub.t', 'SUB_A')$$);
SELECT try($$SELECT saga.subscribe('sub.t', 'sub_a''; DELETE FROM saga.subscriptions; --')$$);
SELECT try($$SELECT saga.unsubscribe('sub.order.*', 'sub_missing')$$);

-- spaces and control characters
SELECT try($$SELECT saga.subscribe('sub order', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe(' sub.order', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.order ', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe(E'sub.\torder', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe(E'sub.order\n', 'sub_a')$$);
SELECT replace(try($$SELECT saga.subscribe(E'sub.\x7Forder', 'sub_a')$$), E'\x7F', '<DEL>');

-- "*" anywhere but at the end
SELECT try($$SELECT saga.subscribe('*.placed', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.*.placed', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.**', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('**', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub*x', 'sub_a')$$);

-- too long: 201 bytes, also when the 201st byte is the "*"
SELECT try($$SELECT saga.subscribe('sub.' || repeat('t', 197), 'sub_a')$$);
SELECT try($$SELECT saga.subscribe('sub.' || repeat('t', 196) || '*', 'sub_a')$$);
SELECT try($$SELECT saga.subscribe(repeat('ü', 101), 'sub_a')$$);

-- unsubscribing what is not subscribed
SELECT try($$SELECT saga.unsubscribe('sub.never', 'sub_a')$$);
-- a pattern is matched as written, not as a wildcard
SELECT try($$SELECT saga.unsubscribe('sub.order.placed', 'sub_b')$$);
SELECT try($$SELECT saga.unsubscribe('sub.order.%', 'sub_a')$$);
SELECT try($$SELECT saga.unsubscribe('sub.*', 'sub_a')$$);

\pset format aligned
\pset tuples_only off

-- nothing changed by the rejected calls
SELECT * FROM pg_temp.subs;

-- unsubscribe removes exactly one pattern of one destination
SELECT saga.unsubscribe('sub.order.*', 'sub_a');
SELECT * FROM pg_temp.subs;
SELECT try($$SELECT saga.unsubscribe('sub.order.*', 'sub_a')$$) AS second_unsubscribe;

-- rolled back: the subscription is still there
BEGIN;
SELECT saga.unsubscribe('*', 'sub_b');
ROLLBACK;
SELECT count(*) AS kept FROM saga.subscriptions WHERE pattern = '*' AND destination = 'sub_b';
BEGIN;
SELECT saga.subscribe('sub.rolled.back', 'sub_a');
ROLLBACK;
SELECT count(*) AS not_kept FROM saga.subscriptions WHERE pattern = 'sub.rolled.back';

-- clean up: drop_destination removes the remaining subscriptions
SELECT saga.drop_destination('sub_a');
SELECT saga.drop_destination('sub_b');
SELECT * FROM pg_temp.subs;
