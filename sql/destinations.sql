-- saga.create_destination and saga.drop_destination: what they store, and
-- every bad argument, each shown with its SQLSTATE, message, detail and hint.

CREATE VIEW pg_temp.dests AS
SELECT name, kind, target, headers, timeout, max_attempts, backoff, max_backoff, concurrency
FROM saga.destinations WHERE name LIKE 'dst\_%' ORDER BY name;

-- Happy paths: defaults, every option, both kinds.
SELECT saga.create_destination('dst_notify', 'notify:dst_channel');
SELECT saga.create_destination('dst_http', 'http://127.0.0.1:1/hook');
SELECT saga.create_destination('dst_https', 'https://example.invalid:8443/a/b?c=d',
	'{"headers": {"Authorization": "Bearer s3cret", "X-Tenant": "42"},
	  "timeout": "2.5s", "max_attempts": 3, "backoff": 0.5,
	  "max_backoff": "1 min", "concurrency": 4}');
-- a number of seconds and an interval string are both durations
SELECT saga.create_destination('dst_numbers', 'http://127.0.0.1:1/n',
	'{"timeout": 30, "backoff": "250 milliseconds", "max_backoff": 86400}');
-- NULL options mean the defaults, like the default '{}'
SELECT saga.create_destination('dst_null_options', 'http://127.0.0.1:1/x', NULL);
-- longest names accepted: 63-byte destination name and NOTIFY channel
SELECT saga.create_destination('dst_' || repeat('n', 59), 'notify:' || repeat('c', 63));
SELECT saga.create_destination('dst_Mixed.Case-name_1', 'HTTP://LOCALHOST:1/');
SELECT * FROM pg_temp.dests;

\pset format unaligned
\pset tuples_only on

-- NULL for each argument
SELECT try($$SELECT saga.create_destination(NULL, 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst_x', NULL)$$);
SELECT try($$SELECT saga.create_destination(NULL, NULL, NULL)$$);

-- bad names: empty, too long, quotes, semicolons, spaces
SELECT try($$SELECT saga.create_destination('', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination(repeat('n', 64), 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst_a''b', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst_a"b', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst_x; DROP TABLE saga.queue', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst_a;b', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst x', 'notify:c')$$);
SELECT try($$SELECT saga.create_destination('dst/x', 'notify:c')$$);

-- duplicate names
SELECT try($$SELECT saga.create_destination('dst_http', 'http://127.0.0.1:1/other')$$);
SELECT try($$SELECT saga.create_destination('dst_notify', 'notify:dst_channel')$$);

-- malformed URLs
SELECT try($$SELECT saga.create_destination('dst_x', '')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'example.com/hook')$$);
SELECT try($$SELECT saga.create_destination('dst_x', '127.0.0.1:8080')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'ftp://example.com/file')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'file:///etc/passwd')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'gopher://127.0.0.1:70/')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'https://')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://:8080/hook')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http:')$$);
-- no host: an empty host variable in "http://${HOST}/orders" must not
-- become a request to the host "orders"
SELECT try($$SELECT saga.create_destination('dst_x', 'http:///orders')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http:/orders')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://exa mple.com/')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://example.com:99999/')$$);
SELECT try($$SELECT saga.create_destination('dst_x', E'http://example.com/\r\nX-Evil: 1')$$);
SELECT try($$SELECT saga.create_destination('dst_x', '::not a url::')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http//example.com')$$);

-- other databases: libpq parses the URL; a bad one is refused without
-- repeating it (it may hold a password); headers make no sense there
SELECT try($$SELECT saga.create_destination('dst_x', 'postgresql://u:secret@db.internal:5432/orders?sslmod=require')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'postgres://u:secret@[::1/orders')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'postgresql://localhost/orders', '{"headers": {"A": "b"}}')$$);
SELECT saga.create_destination('dst_pg', 'postgresql://svc@db.internal:5432/orders?sslmode=verify-full');
SELECT saga.create_destination('dst_pg2', 'postgres:///orders?host=/var/run/postgresql', '{"concurrency": 2}');
SELECT name, kind, concurrency FROM saga.destinations WHERE name LIKE 'dst_pg%' ORDER BY name;
SELECT saga.drop_destination('dst_pg');
SELECT saga.drop_destination('dst_pg2');

-- NOTIFY channels: empty, too long; headers make no sense there
SELECT try($$SELECT saga.create_destination('dst_x', 'notify:')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'notify:' || repeat('c', 64))$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'notify:c', '{"headers": {"A": "b"}}')$$);

-- options that are not an object
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '[]')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '"10s"')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', 'null')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '42')$$);

-- unknown option
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"retries": 3}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"Timeout": "1s"}')$$);

-- durations: wrong JSON types, not an interval, zero, negative, too long
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": true}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": null}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": [10]}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": {"s": 10}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "ten seconds"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": 0}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "0s"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": -1}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "-5 seconds"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "2 days"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "1 year"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": 1e300}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"timeout": "infinity"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"backoff": -0.5}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"backoff": "0"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_backoff": "25 hours"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_backoff": false}')$$);

-- backoff longer than max_backoff, also against the default max_backoff of 5 min
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"backoff": "10 min", "max_backoff": "1 min"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"backoff": "10 min"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_backoff": "0.5s"}')$$);

-- integers: fractions, strings, out of range, wrong types
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": 2.5}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": "3"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": 0}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": -3}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": 1001}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": 1e30}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"max_attempts": null}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"concurrency": 0}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"concurrency": {}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"concurrency": true}')$$);

-- headers: not an object, non-string values, bad names, line breaks,
-- names saga sets itself, too large
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": "Authorization: x"}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": ["A", "b"]}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": null}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-Count": 1}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-Flag": true}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-Null": null}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-Obj": {"a": "b"}}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-A": "v\r\nX-Injected: 1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-A": "v\nX-Injected: 1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-A": "v\rX-Injected: 1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-A\r\nX-Injected": "1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X A": "1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"X-A:": "1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"": "1"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"Idempotency-Key": "fixed"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"idempotency-key": "fixed"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"Saga-Topic": "t"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"Content-Type": "text/plain"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"Content-Length": "0"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"HOST": "evil.example"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', '{"headers": {"Transfer-Encoding": "chunked"}}')$$);
SELECT try($$SELECT saga.create_destination('dst_x', 'http://127.0.0.1:1/x', jsonb_build_object('headers', jsonb_build_object('X-Big', repeat('v', 3000))))$$);

\pset format aligned
\pset tuples_only off

-- nothing of the rejected calls was stored
SELECT count(*) AS rejected_stored FROM saga.destinations WHERE name = 'dst_x';
SELECT * FROM pg_temp.dests;

-- drop_destination: bad arguments
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.drop_destination(NULL)$$);
SELECT try($$SELECT saga.drop_destination('')$$);
SELECT try($$SELECT saga.drop_destination('dst_missing')$$);
SELECT try($$SELECT saga.drop_destination('dst_http; DROP TABLE saga.queue')$$);
SELECT try($$SELECT saga.drop_destination('DST_HTTP')$$);
\pset format aligned
\pset tuples_only off

-- drop_destination removes the destination and its subscriptions
SELECT saga.subscribe('dst.topic', 'dst_notify');
SELECT saga.subscribe('dst.*', 'dst_notify');
SELECT saga.drop_destination('dst_notify');
SELECT count(*) AS subscriptions_left FROM saga.subscriptions WHERE destination = 'dst_notify';
SELECT try($$SELECT saga.drop_destination('dst_notify')$$) AS second_drop;
-- the name can be used again
SELECT saga.create_destination('dst_notify', 'notify:dst_other');
SELECT kind, target FROM saga.destinations WHERE name = 'dst_notify';

-- refused while messages to it are pending (scheduled in the future, so the
-- worker leaves them alone), and nothing is removed
SELECT saga.subscribe('dst.pending', 'dst_http');
SELECT saga.publish('dst.pending', '{"n": 1}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
SELECT saga.publish('dst.pending', '{"n": 2}', deliver_at => now() + interval '1 day') IS NOT NULL AS published;
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.drop_destination('dst_http')$$);
\pset format aligned
\pset tuples_only off
SELECT count(*) AS still_there FROM saga.destinations WHERE name = 'dst_http';
SELECT pattern FROM saga.subscriptions WHERE destination = 'dst_http';
SELECT topic, destination FROM saga.outbox WHERE destination = 'dst_http';

-- a dead letter does not block the drop; once the pending rows are gone it succeeds
UPDATE saga.queue SET status = 'dead', finished_at = now(), last_error = 'test'
WHERE destination = 'dst_http' AND payload = '{"n": 1}'
RETURNING message_id AS dead_id \gset
\pset format unaligned
\pset tuples_only on
SELECT try($$SELECT saga.drop_destination('dst_http')$$);
\pset format aligned
\pset tuples_only off
DELETE FROM saga.queue WHERE destination = 'dst_http' AND status = 'pending';
SELECT saga.drop_destination('dst_http');
SELECT count(*) AS gone FROM saga.destinations WHERE name = 'dst_http';
-- the dead letter stays visible, but cannot be requeued to a missing destination
SELECT topic, destination, last_error FROM saga.dead_letters WHERE destination = 'dst_http';
SELECT saga.redeliver(:'dead_id') AS requeued;
SELECT try(format('SELECT saga.redeliver(%L, %L)', :'dead_id', 'dst_http')) AS requeue_to_dropped;
SELECT count(*) AS still_dead FROM saga.dead_letters WHERE destination = 'dst_http';
DELETE FROM saga.queue WHERE destination = 'dst_http';

-- a rolled-back create or drop leaves nothing behind
BEGIN;
SELECT saga.create_destination('dst_rolled_back', 'notify:rb');
ROLLBACK;
SELECT count(*) AS rolled_back FROM saga.destinations WHERE name = 'dst_rolled_back';
BEGIN;
SELECT saga.drop_destination('dst_https');
ROLLBACK;
SELECT count(*) AS drop_rolled_back FROM saga.destinations WHERE name = 'dst_https';

-- clean up
SELECT saga.drop_destination(name) FROM saga.destinations WHERE name LIKE 'dst\_%' ORDER BY name;
SELECT count(*) AS left_over FROM saga.destinations WHERE name LIKE 'dst\_%';
