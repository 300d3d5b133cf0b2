# Choreography inside one database: a message published here goes straight
# into this database's inbox when one of its handlers takes the topic, in
# the publishing transaction (rolled back with it), and the worker runs the
# handlers. A chain of events (order placed -> out of stock -> order
# cancelled -> delivery cancelled) runs through handlers that publish, each
# effect exactly once. A session that published before sees handlers
# registered by others afterwards; deliver_at holds a local message back.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('inbox_local');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE SCHEMA shop;
CREATE TABLE shop.stock (item text PRIMARY KEY, qty integer NOT NULL CHECK (qty >= 0));
INSERT INTO shop.stock VALUES ('widget', 5);
CREATE TABLE shop.orders (id integer PRIMARY KEY, item text, qty integer, status text NOT NULL DEFAULT 'placed');
CREATE TABLE shop.deliveries (order_id integer PRIMARY KEY, status text NOT NULL);
-- every handler call that took effect, and the message it handled
CREATE TABLE shop.effects (handler text, message_id uuid, order_id integer);

-- products: reserve stock, or say it is out
CREATE FUNCTION shop.on_order_placed(m jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE o integer := (m -> 'payload' ->> 'order_id')::integer;
BEGIN
    INSERT INTO shop.effects VALUES ('products', (m ->> 'id')::uuid, o);
    UPDATE shop.stock SET qty = qty - (m -> 'payload' ->> 'qty')::integer
    WHERE item = m -> 'payload' ->> 'item' AND qty >= (m -> 'payload' ->> 'qty')::integer;
    IF FOUND THEN
        INSERT INTO shop.deliveries VALUES (o, 'created');
    ELSE
        PERFORM saga.publish('product.out_of_stock', jsonb_build_object('order_id', o));
    END IF;
END $$;
-- orders: cancel the order
CREATE FUNCTION shop.on_out_of_stock(m jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE o integer := (m -> 'payload' ->> 'order_id')::integer;
BEGIN
    INSERT INTO shop.effects VALUES ('orders', (m ->> 'id')::uuid, o);
    UPDATE shop.orders SET status = 'cancelled' WHERE id = o;
    PERFORM saga.publish('order.cancelled', jsonb_build_object('order_id', o));
END $$;
-- delivery: record the cancellation
CREATE FUNCTION shop.on_order_cancelled(m jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE o integer := (m -> 'payload' ->> 'order_id')::integer;
BEGIN
    INSERT INTO shop.effects VALUES ('delivery', (m ->> 'id')::uuid, o);
    INSERT INTO shop.deliveries VALUES (o, 'cancelled')
    ON CONFLICT (order_id) DO UPDATE SET status = 'cancelled';
END $$;
});

# a session that publishes before any handler exists keeps its routes cached
my $app = $node->background_psql('postgres');
my $early = $app->query_safe(q{SELECT saga.publish('order.placed', '{"order_id": 0, "item": "widget", "qty": 1}')});
is(sql(q{SELECT count(*) FROM saga.inbox_messages}), '0', 'no handler: nothing goes to the inbox');

sql(q{
SELECT saga.handle('order.placed', 'shop.on_order_placed(jsonb)');
SELECT saga.handle('product.*', 'shop.on_out_of_stock(jsonb)');
SELECT saga.handle('order.cancelled', 'shop.on_order_cancelled(jsonb)');
});

# the same session, after others registered handlers: its cache is reread
$app->query_safe(q{BEGIN; INSERT INTO shop.orders VALUES (1, 'widget', 2);
	SELECT saga.publish('order.placed', '{"order_id": 1, "item": "widget", "qty": 2}'); COMMIT;});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM shop.deliveries WHERE order_id = 1 AND status = 'created'}),
	'a session that published before sees handlers registered since');
is(sql(q{SELECT source IS NULL AND status = 'processed' FROM saga.inbox WHERE topic = 'order.placed'}), 't',
	'the local message went through the inbox, with no source');

# a rolled-back publish reaches no handler
sql(q{BEGIN; INSERT INTO shop.orders VALUES (2, 'widget', 1);
	SELECT saga.publish('order.placed', '{"order_id": 2, "item": "widget", "qty": 1}'); ROLLBACK;});

# orders 3..12 from several sessions: 3 units left, so one more fits
for my $id (3 .. 12)
{
	sql(qq{BEGIN; INSERT INTO shop.orders VALUES ($id, 'widget', 3);
		SELECT saga.publish('order.placed', '{"order_id": $id, "item": "widget", "qty": 3}'); COMMIT;});
}
ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.inbox WHERE status <> 'processed'}),
	'every message of the chain is processed');
is(sql(q{SELECT count(*) FROM shop.effects WHERE order_id = 2}), '0', 'the rolled-back order reached no handler');
is(sql(q{SELECT qty FROM shop.stock}), '0', 'stock: 5 - 2 - 3, never negative');
is(sql(q{SELECT count(*) FROM shop.orders WHERE status = 'cancelled'}), '9', 'nine orders got no stock and were cancelled');
is(sql(q{SELECT count(*) FROM shop.deliveries WHERE status = 'cancelled'}), '9', 'their deliveries were cancelled');
is(sql(q{SELECT count(*) FROM shop.deliveries WHERE status = 'created'}), '2', 'two deliveries were created');
is(sql(q{SELECT handler || ':' || count(*) FROM shop.effects WHERE order_id > 0
         GROUP BY handler ORDER BY handler}), "delivery:9\norders:9\nproducts:11",
	'each handler ran once per message: 11 placed, 9 out of stock, 9 cancelled');
is(sql(q{SELECT count(*) FROM (SELECT message_id FROM shop.effects GROUP BY message_id, handler HAVING count(*) > 1) d}),
	'0', 'no message was handled twice');
is(sql(q{SELECT count(*) FROM shop.effects WHERE message_id = '} . $early . q{'}), '0',
	'the message published before the handlers existed stayed unhandled');

# deliver_at holds a local message back
my $later = sql(q{SELECT saga.publish('order.cancelled', '{"order_id": 99}', deliver_at => now() + interval '3 seconds')});
sleep(1);    # let time pass: nothing may happen before deliver_at
is(sql(qq{SELECT status FROM saga.inbox WHERE message_id = '$later'}), 'pending', 'a message with deliver_at waits');
ok($node->poll_query_until('postgres', qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$later'}),
	'and is handled once deliver_at has passed');

$app->quit;
$node->stop;
done_testing();
