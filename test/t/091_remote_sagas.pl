# Worker-driven and application-driven sagas whose steps run in other
# databases through postgresql:// destinations, between three real clusters:
# "orders" (runs the sagas), "products" (shop.reserve / shop.release) and
# "delivery" (ship.create / ship.cancel), both reached as role svc_orders.
# A step runs remotely as saga.invoke('<saga id>:<step>', f, ctx) and its
# compensation as saga.compensate with the action's key.
#
#  1. 30 orders against a stock of 20: 20 complete, 10 fail at the reservation
#     (a remote business error) without compensating anything; stock ends at 0,
#     never negative; every remote effect happened once; remote results are
#     stored under the saga's steps and passed on to later steps.
#  2. a local step fails after both remote steps succeeded: the remote
#     compensations run newest-first (ship.cancel, then shop.release), once each.
#  3. the delivery cluster stops (immediate) with 20 sagas running: they keep
#     retrying the ship step with connection errors, and complete once it is
#     back, with one shipment each.
#  4. a remote call that commits after its time-out (its answer held back by
#     a synchronous standby that never comes) is retried with the same key:
#     the action ran once, and the retry returned its stored result.
#  5. a step whose remote calls all time out without taking effect: outcome
#     unknown, compensated through saga.compensate, which leaves a tombstone
#     (the compensation function does not run) that refuses a late saga.invoke.
#  6. an application-driven saga with a remote compensation: saga.fail() makes
#     the worker run it in the other database, with the registered "args".
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use SagaTest;

my $orders = saga_node('orders');
my $products = saga_node('products');
# delivery can wait for a synchronous standby (case 4): it needs WAL senders
my $delivery = saga_node('delivery', init => { allows_streaming => 1 });
wait_for_worker($orders);

sub osql { return $orders->safe_psql('postgres', $_[0]); }
sub psql_p { return $products->safe_psql('postgres', $_[0]); }
sub psql_d { return $delivery->safe_psql('postgres', $_[0]); }

sub uri_escape_path
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9\/._-])/sprintf('%%%02X', ord($1))/ge;
	return $s;
}

# the URL of a remote cluster's database postgres, as role svc_orders, over its socket
sub url_of
{
	my ($node) = @_;
	return sprintf('postgresql://svc_orders@/postgres?host=%s&port=%d', uri_escape_path($node->host), $node->port);
}

# ---- products: stock that never goes negative, and a record of every effect.
# A call whose input carries "gate" waits, after doing its work, for the
# advisory lock of that number (held by the test to keep a call hanging).
psql_p(q{
CREATE ROLE svc_orders LOGIN;
CREATE SCHEMA shop;
CREATE TABLE shop.stock (item text PRIMARY KEY, qty integer NOT NULL CHECK (qty >= 0));
INSERT INTO shop.stock VALUES ('a', 20), ('b', 10), ('c', 10), ('d', 100), ('h', 5);
CREATE TABLE shop.effects (
    seq bigserial PRIMARY KEY,
    saga_id uuid,
    kind text NOT NULL,
    item text NOT NULL,
    qty_after integer,
    ctx jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
-- every entry into shop.reserve, committed or not
CREATE SEQUENCE shop.calls;
CREATE FUNCTION shop.reserve(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    it text := ctx -> 'input' ->> 'item';
    left_qty integer;
BEGIN
    PERFORM nextval('shop.calls');
    UPDATE shop.stock s SET qty = s.qty - 1 WHERE s.item = it AND s.qty > 0 RETURNING s.qty INTO left_qty;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'out of stock: %', it USING ERRCODE = 'P0001';
    END IF;
    INSERT INTO shop.effects (saga_id, kind, item, qty_after, ctx)
    VALUES ((ctx ->> 'saga_id')::uuid, 'reserve', it, left_qty, ctx);
    IF ctx -> 'input' ? 'gate' THEN
        PERFORM pg_advisory_xact_lock_shared((ctx -> 'input' ->> 'gate')::bigint);
    END IF;
    RETURN jsonb_build_object('reserved', it, 'left', left_qty);
END
$$;
CREATE FUNCTION shop.release(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    it text := coalesce(ctx -> 'args' ->> 'item', ctx -> 'input' ->> 'item');
    now_qty integer;
BEGIN
    UPDATE shop.stock s SET qty = s.qty + 1 WHERE s.item = it RETURNING s.qty INTO now_qty;
    INSERT INTO shop.effects (saga_id, kind, item, qty_after, ctx)
    VALUES ((ctx ->> 'saga_id')::uuid, 'release', it, now_qty, ctx);
    RETURN jsonb_build_object('released', it, 'left', now_qty);
END
$$;
GRANT USAGE ON SCHEMA shop TO svc_orders;
GRANT SELECT, UPDATE ON shop.stock TO svc_orders;
GRANT SELECT, INSERT ON shop.effects TO svc_orders;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA shop TO svc_orders;
});

# ---- delivery: shipments, a record of every effect; "ship_sleep" makes a
# call slow, "gate" makes it wait for an advisory lock after its work
psql_d(q{
CREATE ROLE svc_orders LOGIN;
CREATE SCHEMA ship;
CREATE TABLE ship.shipments (
    id bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    item text,
    cancelled boolean NOT NULL DEFAULT false);
CREATE TABLE ship.effects (
    seq bigserial PRIMARY KEY,
    saga_id uuid,
    kind text NOT NULL,
    shipment bigint,
    ctx jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE SEQUENCE ship.calls;
CREATE FUNCTION ship.create(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    sid bigint;
BEGIN
    PERFORM nextval('ship.calls');
    INSERT INTO ship.shipments (saga_id, item)
    VALUES ((ctx ->> 'saga_id')::uuid, ctx -> 'input' ->> 'item') RETURNING id INTO sid;
    INSERT INTO ship.effects (saga_id, kind, shipment, ctx)
    VALUES ((ctx ->> 'saga_id')::uuid, 'create', sid, ctx);
    IF ctx -> 'input' ? 'ship_sleep' THEN
        PERFORM pg_sleep((ctx -> 'input' ->> 'ship_sleep')::float8);
    END IF;
    IF ctx -> 'input' ? 'gate' THEN
        PERFORM pg_advisory_xact_lock_shared((ctx -> 'input' ->> 'gate')::bigint);
    END IF;
    RETURN jsonb_build_object('shipment', sid, 'reservation', ctx -> 'steps' -> 'reserve',
                              'attempt', ctx -> 'attempt');
END
$$;
CREATE FUNCTION ship.cancel(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    sid bigint := (ctx -> 'steps' -> 'ship' ->> 'shipment')::bigint;
BEGIN
    UPDATE ship.shipments s SET cancelled = true WHERE s.id = sid;
    INSERT INTO ship.effects (saga_id, kind, shipment, ctx)
    VALUES ((ctx ->> 'saga_id')::uuid, 'cancel', sid, ctx);
    RETURN jsonb_build_object('cancelled', sid);
END
$$;
GRANT USAGE ON SCHEMA ship TO svc_orders;
GRANT SELECT, INSERT, UPDATE ON ship.shipments TO svc_orders;
GRANT SELECT, INSERT ON ship.effects TO svc_orders;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ship TO svc_orders;
});

# ---- orders: the destinations, a local confirmation step, the sagas
my $purl = url_of($products);
my $durl = url_of($delivery);
osql(qq{
SELECT saga.create_destination('products_db', '$purl',
    '{"timeout": "2s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 20}');
SELECT saga.create_destination('delivery_db', '$durl',
    '{"timeout": "3s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 20, "concurrency": 10}');
CREATE SCHEMA orders;
-- the sagas each part of the test started
CREATE TABLE orders.batch (name text NOT NULL, saga_id uuid NOT NULL);
CREATE TABLE orders.confirmed (saga_id uuid NOT NULL, steps jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION orders.confirm(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS \$\$
BEGIN
    IF (ctx -> 'input' ->> 'fail_confirm')::boolean THEN
        RAISE EXCEPTION 'order % cannot be confirmed', ctx -> 'input' ->> 'n' USING ERRCODE = 'P0001';
    END IF;
    INSERT INTO orders.confirmed (saga_id, steps) VALUES ((ctx ->> 'saga_id')::uuid, ctx -> 'steps');
    RETURN jsonb_build_object('confirmed', true);
END
\$\$;
});

# reserve (products) -> ship (delivery) -> confirm (here); $ship and
# $reserve are extra fields of those steps
sub define_order
{
	my ($name, $reserve, $ship) = @_;
	my $def = {
		steps => [
			{
				name => 'reserve',
				action => { destination => 'products_db', function => 'shop.reserve' },
				compensation => { destination => 'products_db', function => 'shop.release' },
				backoff => '200ms',
				max_attempts => 20,
				%{ $reserve // {} } },
			{
				name => 'ship',
				action => { destination => 'delivery_db', function => 'ship.create' },
				compensation => { destination => 'delivery_db', function => 'ship.cancel' },
				backoff => '200ms',
				max_attempts => 30,
				%{ $ship // {} } },
			{ name => 'confirm', action => 'orders.confirm' } ] };
	my $json = encode_json($def);
	return osql("SELECT saga.define('$name', '$json')");
}

# start $n sagas of $saga as batch $batch; $input is an SQL expression of g
sub start_batch
{
	my ($batch, $saga, $n, $input) = @_;
	osql(qq{INSERT INTO orders.batch
	        SELECT '$batch', saga.start('$saga', $input) FROM generate_series(1, $n) g ORDER BY g});
	return split /\n/, osql(qq{SELECT saga_id FROM orders.batch WHERE name = '$batch' ORDER BY saga_id});
}

sub wait_batch_finished
{
	my ($batch, $n) = @_;
	return $orders->poll_query_until('postgres', qq{
		SELECT count(*) FILTER (WHERE s.status IN ('completed', 'compensated', 'failed')) = $n
		FROM orders.batch b JOIN saga.sagas s ON s.id = b.saga_id WHERE b.name = '$batch'});
}

sub batch_statuses
{
	my ($batch) = @_;
	return osql(qq{SELECT string_agg(status || ' ' || n, ', ' ORDER BY status) FROM (
		SELECT s.status, count(*) AS n FROM orders.batch b JOIN saga.sagas s ON s.id = b.saga_id
		WHERE b.name = '$batch' GROUP BY s.status) x});
}

sub wait_status
{
	my ($id, $status) = @_;
	return $orders->poll_query_until('postgres', "SELECT status FROM saga.sagas WHERE id = '$id'", $status);
}

sub in_list { return join(',', map { "'$_'" } @_); }

is(define_order('order'), '1', 'a saga reserve (products_db) -> ship (delivery_db) -> confirm (local) is defined');

# ===== 1. 30 orders for a stock of 20
my @c1 = start_batch('c1', 'order', 30, q{jsonb_build_object('item', 'a', 'n', g)});
is(scalar(@c1), 30, '30 sagas started');
ok(wait_batch_finished('c1', 30), 'the 30 sagas finish');
is(batch_statuses('c1'), 'compensated 10, completed 20', 'exactly 20 completed and 10 compensated');
my @done1 = split /\n/, osql(q{SELECT b.saga_id FROM orders.batch b JOIN saga.sagas s ON s.id = b.saga_id
                               WHERE b.name = 'c1' AND s.status = 'completed' ORDER BY 1});
my @failed1 = split /\n/, osql(q{SELECT b.saga_id FROM orders.batch b JOIN saga.sagas s ON s.id = b.saga_id
                                 WHERE b.name = 'c1' AND s.status = 'compensated' ORDER BY 1});
my $done1 = in_list(@done1);
my $failed1 = in_list(@failed1);

is(psql_p(q{SELECT qty FROM shop.stock WHERE item = 'a'}), '0', 'the stock of item a ends at 0');
is(psql_p(q{SELECT count(*) || ' ' || min(qty_after) || ' ' || max(qty_after) || ' ' || count(DISTINCT qty_after)
            FROM shop.effects WHERE item = 'a' AND kind = 'reserve'}),
	'20 0 19 20', 'products recorded 20 reservations, leaving 19 down to 0, each level once (never negative)');
is(psql_p(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM shop.effects
             WHERE kind = 'reserve' AND saga_id IN ($done1)}), '20 20',
	'one reservation per completed saga');
is(psql_p(qq{SELECT count(*) FROM shop.effects WHERE saga_id IN ($failed1)}), '0',
	'no effect at all in products for the 10 refused orders');
is(psql_p(q{SELECT count(*) FROM shop.effects WHERE kind = 'release'}), '0', 'nothing was released');
is(psql_d(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM ship.effects WHERE kind = 'create' AND saga_id IN ($done1)}),
	'20 20', 'one shipment created per completed saga');
is(psql_d(qq{SELECT count(*) FROM ship.effects WHERE saga_id IN ($failed1)}) . ' '
	  . psql_d(q{SELECT count(*) FROM ship.effects WHERE kind <> 'create'}),
	'0 0', 'none for the refused orders, and nothing cancelled');
is(osql(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM orders.confirmed WHERE saga_id IN ($done1)}), '20 20',
	'each completed order was confirmed once');
is(osql(qq{SELECT count(*) FROM orders.confirmed WHERE saga_id IN ($failed1)}), '0', 'no refused order was confirmed');

# the remote records of the calls, one per key
{
	my @keys = map { "'$_:reserve'" } @done1;
	is(psql_p(sprintf(q{SELECT count(*) || ' ' || count(*) FILTER (WHERE status = 'executed' AND fn = 'shop.reserve(jsonb)'
	                                                        AND invoked_by = 'svc_orders'::regrole)
	                    FROM saga.invocations WHERE key IN (%s)}, join(',', @keys))),
		'20 20', "products' saga.invocations: each completed saga's reservation executed once, by svc_orders");
	@keys = map { "'$_:ship'" } @done1;
	is(psql_d(sprintf(q{SELECT count(*) FILTER (WHERE status = 'executed') FROM saga.invocations WHERE key IN (%s)},
			join(',', @keys))),
		'20', "delivery's saga.invocations: each completed saga's shipment executed once");
	my $failed_keys = join(',', map { ("'$_:reserve'", "'$_:ship'") } @failed1);
	is(psql_p("SELECT count(*) FROM saga.invocations WHERE key IN ($failed_keys)") . ' '
		  . psql_d("SELECT count(*) FROM saga.invocations WHERE key IN ($failed_keys)"),
		'0 0', 'the refused reservations left no invocation row (rolled back) and no tombstone (nothing compensated)');
	is(psql_p(q{SELECT count(*) FROM saga.invocations}), '20', 'products holds 20 invocation rows in all');
}

# the refused orders: a business failure, not retried, nothing to compensate
is(osql(qq{SELECT string_agg(DISTINCT step || ' ' || status || ' ' || attempts || ' '
                             || coalesce(compensation_attempts::text, '-'), ',')
           FROM saga.saga_steps WHERE saga_id IN ($failed1)}),
	'reserve failed 1 0', 'each refused order: the reserve step failed after one attempt, no other step, no compensation ran');
is(osql(qq{SELECT string_agg(DISTINCT error, E'\n') FROM saga.sagas WHERE id IN ($failed1)}),
	'step "reserve" failed: products_db: out of stock: a (SQLSTATE P0001)',
	'their error is the remote business error with its SQLSTATE');

# saga.get: the remote results under steps, matching what the remote side did
{
	my %reserved = map { split /\|/ } split /\n/, psql_p(qq{
		SELECT saga_id || '|' || jsonb_build_object('reserved', item, 'left', qty_after)::text
		FROM shop.effects WHERE kind = 'reserve' AND saga_id IN ($done1)});
	my %shipped = map { split /\|/ } split /\n/, psql_d(qq{
		SELECT saga_id || '|' || shipment FROM ship.effects WHERE kind = 'create' AND saga_id IN ($done1)});
	my $json = JSON::PP->new->canonical;
	my ($bad_get, $bad_ctx) = (0, 0);
	for my $id (@done1)
	{
		my $got = decode_json(osql("SELECT saga.get('$id')"));
		my %steps = map { $_->{step} => $_ } @{ $got->{steps} };
		my $want_reserve = decode_json($reserved{$id});
		$bad_get++
		  unless $got->{status} eq 'completed'
		  && $json->encode($steps{reserve}{result}) eq $json->encode($want_reserve)
		  && $steps{ship}{result}{shipment} == $shipped{$id}
		  && $json->encode($steps{ship}{result}{reservation}) eq $json->encode($want_reserve)
		  && $steps{reserve}{status} eq 'done' && $steps{ship}{status} eq 'done' && $steps{confirm}{status} eq 'done';
		my $seen = decode_json(osql("SELECT steps FROM orders.confirmed WHERE saga_id = '$id'"));
		$bad_ctx++
		  unless $json->encode($seen->{reserve}) eq $json->encode($want_reserve)
		  && $seen->{ship}{shipment} == $shipped{$id};
	}
	is($bad_get, 0,
		'saga.get of each completed saga: the reserve result is what products returned, the ship result names the shipment delivery created (and the reservation ship.create saw in ctx)');
	is($bad_ctx, 0, 'the local confirm step saw both remote results in ctx.steps');
}

# ===== 2. the local step fails after both remote steps succeeded
my @c2 = start_batch('c2', 'order', 3, q{jsonb_build_object('item', 'c', 'n', 100 + g, 'fail_confirm', true)});
ok(wait_batch_finished('c2', 3), 'three orders whose confirmation fails finish');
is(batch_statuses('c2'), 'compensated 3', 'they are compensated');
my $c2 = in_list(@c2);
is(osql(qq{SELECT string_agg(DISTINCT x, ',') FROM (
	SELECT string_agg(step || ':' || status, ' ' ORDER BY position) AS x FROM saga.saga_steps
	WHERE saga_id IN ($c2) GROUP BY saga_id) y}),
	'reserve:compensated ship:compensated confirm:failed', 'each: confirm failed, both remote steps compensated');
is(osql(qq{SELECT count(*) FROM saga.saga_steps a JOIN saga.saga_steps b USING (saga_id)
           WHERE saga_id IN ($c2) AND a.step = 'ship' AND b.step = 'reserve' AND a.compensated_at < b.compensated_at}),
	'3', 'orders recorded the ship compensation before the reserve compensation');
is(psql_d(qq{SELECT string_agg(n::text, ',') FROM (SELECT count(*) AS n FROM ship.effects
             WHERE saga_id IN ($c2) AND kind = 'cancel' GROUP BY saga_id) x}), '1,1,1',
	'delivery: ship.cancel ran once per saga');
is(psql_p(qq{SELECT string_agg(n::text, ',') FROM (SELECT count(*) AS n FROM shop.effects
             WHERE saga_id IN ($c2) AND kind = 'release' GROUP BY saga_id) x}), '1,1,1',
	'products: shop.release ran once per saga');
{
	# newest first, by the clocks of the two remote effects (one machine)
	my %cancel_at = map { split /\|/ } split /\n/, psql_d(qq{
		SELECT saga_id || '|' || extract(epoch FROM at) FROM ship.effects WHERE saga_id IN ($c2) AND kind = 'cancel'});
	my %release_at = map { split /\|/ } split /\n/, psql_p(qq{
		SELECT saga_id || '|' || extract(epoch FROM at) FROM shop.effects WHERE saga_id IN ($c2) AND kind = 'release'});
	is(scalar(grep { defined $cancel_at{$_} && defined $release_at{$_} && $cancel_at{$_} < $release_at{$_} } @c2), 3,
		'in each saga the shipment was cancelled (delivery) before the stock was released (products)');
}
is(psql_d(qq{SELECT count(*) FILTER (WHERE cancelled) || '/' || count(*) FROM ship.shipments WHERE saga_id IN ($c2)}),
	'3/3', 'the three shipments are cancelled');
is(psql_p(q{SELECT qty FROM shop.stock WHERE item = 'c'}), '10', 'the stock of item c is back to 10');
is(psql_p(sprintf(q{SELECT string_agg(DISTINCT status || ' ' || compensation_fn, ',') || ' ' || count(*)
                    FROM saga.invocations WHERE key IN (%s)}, join(',', map { "'$_:reserve'" } @c2))),
	'compensated shop.release(jsonb) 3', "products' saga.invocations: the three reservations are marked compensated");
is(psql_d(sprintf(q{SELECT string_agg(DISTINCT status || ' ' || compensation_fn, ',') || ' ' || count(*)
                    FROM saga.invocations WHERE key IN (%s)}, join(',', map { "'$_:ship'" } @c2))),
	'compensated ship.cancel(jsonb) 3', "delivery's saga.invocations: the three shipments are marked compensated");
like(psql_d(qq{SELECT DISTINCT ctx ->> 'error' FROM ship.effects WHERE saga_id IN ($c2) AND kind = 'cancel' LIMIT 1}),
	qr/^step "confirm" failed: order 10\d cannot be confirmed \(SQLSTATE P0001\)$/, 'the remote compensation got the saga error in ctx');
is(osql(qq{SELECT count(*) FROM orders.confirmed WHERE saga_id IN ($c2)}), '0', 'nothing was confirmed');

# ===== 3. the delivery cluster stops while 20 sagas are running
# ship.create takes 1s: the cluster stops with calls in flight, some of which
# may have committed without their answer reaching orders
my @c3 = start_batch('c3', 'order', 20, q{jsonb_build_object('item', 'd', 'n', 200 + g, 'ship_sleep', 1)});
my $c3 = in_list(@c3);
ok($delivery->poll_query_until('postgres', qq{SELECT count(*) > 0 FROM ship.effects WHERE saga_id IN ($c3)}),
	'the first shipments are committed in delivery');
$delivery->stop('immediate');
ok($orders->poll_query_until('postgres', qq{
		SELECT count(*) FILTER (WHERE s.status = 'completed'
		                           OR (s.status = 'running' AND x.status IN ('retrying', 'running') AND x.attempts >= 2
		                               AND x.error LIKE '%destination "delivery_db"%')) = 20
		FROM saga.sagas s LEFT JOIN saga.saga_steps x ON x.saga_id = s.id AND x.step = 'ship'
		WHERE s.id IN ($c3)}),
	'with delivery down, every saga not yet completed retries its ship step');
my $stuck3 = osql(qq{SELECT count(*) FROM saga.sagas WHERE id IN ($c3) AND status = 'running'});
cmp_ok($stuck3, '>', 0, "$stuck3 of the 20 sagas are still running");
is(osql(qq{SELECT count(*) FROM saga.saga_steps WHERE saga_id IN ($c3) AND step = 'confirm' AND status <> 'done'}) . ' '
	  . osql(qq{SELECT count(*) FROM saga.sagas WHERE id IN ($c3) AND status NOT IN ('running', 'completed')}),
	'0 0', 'none of them failed or went past its ship step');
{
	my @errors = split /\n/, osql(qq{SELECT DISTINCT x.error FROM saga.saga_steps x JOIN saga.sagas s ON s.id = x.saga_id
	                                 WHERE s.id IN ($c3) AND s.status = 'running' AND x.step = 'ship'});
	is(scalar(grep { !/^(?:(?:could not connect to|lost the connection to|could not send to) destination "delivery_db": .*(?:connect|connection|socket|server)|no connection to destination "delivery_db" within \d+ ms$)/i } @errors),
		0, 'their errors say the connection to delivery_db failed')
	  or diag(join("\n", @errors));
}
my $att3 = osql(qq{SELECT max(x.attempts) FROM saga.saga_steps x JOIN saga.sagas s ON s.id = x.saga_id
                   WHERE s.id IN ($c3) AND s.status = 'running' AND x.step = 'ship'});
ok($orders->poll_query_until('postgres', qq{SELECT min(x.attempts) > $att3 FROM saga.saga_steps x JOIN saga.sagas s ON s.id = x.saga_id
		WHERE s.id IN ($c3) AND s.status = 'running' AND x.step = 'ship'}),
	"the attempts keep growing (all beyond $att3)");
is(osql(qq{SELECT count(*) FROM saga.sagas WHERE id IN ($c3) AND status NOT IN ('running', 'completed')}), '0',
	'still none has failed');
$delivery->start;
ok(wait_batch_finished('c3', 20), 'after delivery restarts the 20 sagas finish');
is(batch_statuses('c3'), 'completed 20', 'all 20 completed');
is(psql_d(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM ship.effects WHERE saga_id IN ($c3)}), '20 20',
	'delivery holds exactly one effect per saga');
note(osql(qq{SELECT count(*) FROM saga.saga_steps WHERE saga_id IN ($c3) AND step = 'ship' AND attempts > 1
             AND result ->> 'attempt' = '1'})
	  . ' ship calls committed before the stop without their answer reaching orders; a retry returned the stored result');
is(psql_d(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) || ' ' || count(*) FILTER (WHERE cancelled)
             FROM ship.shipments WHERE saga_id IN ($c3)}), '20 20 0', 'and one live shipment per saga');
is(psql_d(sprintf(q{SELECT count(*) FILTER (WHERE status = 'executed') FROM saga.invocations WHERE key IN (%s)},
		join(',', map { "'$_:ship'" } @c3))), '20', "delivery's saga.invocations: one executed row per saga");
is(osql(qq{SELECT count(*) FROM saga.saga_steps x WHERE saga_id IN ($c3) AND step = 'ship'
           AND (x.result ->> 'shipment')::bigint IS NULL}), '0', 'every ship step stored its shipment');
{
	my %stored = map { split /\|/ } split /\n/, osql(qq{SELECT saga_id || '|' || (result ->> 'shipment')
		FROM saga.saga_steps WHERE saga_id IN ($c3) AND step = 'ship'});
	my %real = map { split /\|/ } split /\n/, psql_d(qq{SELECT saga_id || '|' || id FROM ship.shipments WHERE saga_id IN ($c3)});
	is(scalar(grep { ($stored{$_} // '') ne ($real{$_} // 'none') } @c3), 0,
		'the shipment each saga stored is the one delivery kept');
}
is(psql_p(q{SELECT qty FROM shop.stock WHERE item = 'd'}), '80', 'products reserved 20 of item d, once each');
is(osql(qq{SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM orders.confirmed WHERE saga_id IN ($c3)}), '20 20',
	'each order was confirmed once');

# ===== 4. a remote call that commits after its time-out
# delivery waits for a synchronous standby that does not exist: ship.create's
# transaction is committed (its commit record flushed) but the answer never
# comes back, and the worker gives up after 1s. The retries, with the same
# key, wait for that transaction's key and time out too; the worker closes
# their connections and the remote side rolls them back. Once the standby
# requirement is lifted, the first transaction finishes and a retry gets its
# stored result.
is(define_order('order_slow', undef, { timeout => '1s', max_attempts => 20 }), '1', 'a saga whose ship step has a 1s time-out');
psql_d(q{ALTER SYSTEM SET synchronous_standby_names = 'nobody'; SELECT pg_reload_conf();});
$delivery->poll_query_until('postgres', q{SELECT current_setting('synchronous_standby_names') = 'nobody'})
  or die 'delivery did not reload';
# the worker's open connections may not have read the new setting yet: new ones will
psql_d(q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'svc_orders'});
my $calls_before = psql_d(q{SELECT last_value FROM ship.calls});
my ($slow) = start_batch('c4', 'order_slow', 1, q{jsonb_build_object('item', 'b', 'n', 300)});
ok($orders->poll_query_until('postgres', qq{SELECT attempts >= 3 AND error = 'no answer from destination "delivery_db" within 1000 ms'
		FROM saga.saga_steps WHERE saga_id = '$slow' AND step = 'ship'}),
	'the ship call times out and is retried (3 attempts so far, "no answer ... within 1000 ms")');
is(osql(qq{SELECT status FROM saga.sagas WHERE id = '$slow'}), 'running', 'the saga is still running');
cmp_ok(psql_d(q{SELECT count(*) FROM pg_stat_activity WHERE usename = 'svc_orders' AND wait_event = 'SyncRep'}), '>=', 1,
	'in delivery the first call has committed and waits for the synchronous standby');
psql_d(q{ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf();});
ok(wait_status($slow, 'completed'), 'once the first call finishes, a retry succeeds and the saga completes');
is(psql_d(qq{SELECT count(*) FROM ship.effects WHERE saga_id = '$slow'}) . ' '
	  . psql_d(qq{SELECT count(*) FROM ship.shipments WHERE saga_id = '$slow'}),
	'1 1', 'the shipment was created once');
is(psql_d(q{SELECT last_value FROM ship.calls}) - $calls_before, 1,
	'ship.create was entered only once: the retries got the stored result from saga.invoke');
{
	my ($attempts, $result) = split /\|/, osql(qq{SELECT attempts || '|' || result::text FROM saga.saga_steps
	                                             WHERE saga_id = '$slow' AND step = 'ship'});
	cmp_ok($attempts, '>=', 3, "the ship step took $attempts attempts");
	is(decode_json($result)->{attempt}, 1, 'its result is the one the first attempt produced');
	is(psql_d(qq{SELECT result::text FROM saga.invocations WHERE key = '$slow:ship'}), $result,
		"it is the result stored in delivery's saga.invocations");
}

# ===== 5. remote calls that time out without ever taking effect
# shop.reserve waits at a gate after its update; when the worker closes the
# connection, the remote statement ends (the worker's sessions set
# client_connection_check_interval)
# and rolls back: the action never happened in products
is(define_order('order_hang', { timeout => '1s', max_attempts => 2 }), '1', 'a saga whose reserve step has a 1s time-out and 2 attempts');
my $gate_p = $products->background_psql('postgres');
$gate_p->query_safe('SELECT pg_advisory_lock(4343)');
my ($hang) = start_batch('c5', 'order_hang', 1, q{jsonb_build_object('item', 'h', 'n', 400, 'gate', 4343)});
ok(wait_status($hang, 'compensated'), 'a step whose calls all time out fails the saga, which is compensated');
like(osql(qq{SELECT error FROM saga.sagas WHERE id = '$hang'}),
	qr/^step "reserve" failed after 2 attempts: no answer from destination "products_db" within 1000 ms$/,
	'the saga error says the step got no answer after 2 attempts');
is(osql(qq{SELECT string_agg(step || ':' || status || ':' || attempts || ':' || coalesce(compensation_attempts::text, '-'), ',')
           FROM saga.saga_steps WHERE saga_id = '$hang'}),
	'reserve:compensated:2:1', 'its reserve step (outcome unknown) was compensated with one call; nothing went further');
is(osql(qq{SELECT string_agg(e ->> 'event', ',') FROM jsonb_array_elements(saga.get('$hang') -> 'timeline') e
           WHERE e ->> 'step' = 'reserve'}),
	'step outcome unknown,step compensated', 'saga.get: outcome unknown, then compensated');
is(psql_p(qq{SELECT status || ' ' || coalesce(fn, '-') || ' ' || compensation_fn || ' ' || compensated_by::text
             || ' ' || (compensation_result IS NULL) FROM saga.invocations WHERE key = '$hang:reserve'}),
	'tombstone - shop.release(jsonb) svc_orders true',
	"products' saga.invocations: saga.compensate with the action key left a tombstone");
is(psql_p(qq{SELECT count(*) FROM shop.effects WHERE saga_id = '$hang'}), '0',
	'no reservation and no release in products: the compensation function did not run');
ok($products->poll_query_until('postgres', q{SELECT count(*) = 0 FROM pg_stat_activity
		WHERE usename = 'svc_orders' AND wait_event_type = 'Lock'}),
	'no timed-out remote statement is left waiting in products');
$gate_p->query_safe('SELECT pg_advisory_unlock(4343)');
$gate_p->quit;
is(psql_p(q{SELECT qty FROM shop.stock WHERE item = 'h'}) . ' ' . psql_p(qq{SELECT count(*) FROM shop.effects WHERE saga_id = '$hang'}),
	'5 0', 'after the gate opens the stock of item h is untouched');
{
	my $calls = psql_p(q{SELECT last_value FROM shop.calls});
	my ($rc, $out, $err) = $products->psql('postgres',
		qq{SELECT saga.invoke('$hang:reserve', 'shop.reserve(jsonb)',
		                      jsonb_build_object('saga_id', '$hang', 'input', jsonb_build_object('item', 'h')))},
		connstr => $products->connstr('postgres') . ' user=svc_orders');
	isnt($rc, 0, 'a late saga.invoke of the action key is refused');
	like($err, qr/action "\Q$hang\E:reserve" was already compensated before it ran/, 'with a clear error');
	is(psql_p(q{SELECT last_value FROM shop.calls}) . ' ' . psql_p(q{SELECT qty FROM shop.stock WHERE item = 'h'}),
		"$calls 5", 'shop.reserve was not entered and the stock is unchanged');
}

# ===== 6. an application-driven saga with a remote compensation
my $app = osql(q{SELECT saga.begin('app_order', '{"item": "a"}')});
osql(qq{SELECT saga.step('$app', 'x', '{"destination": "products_db", "function": "shop.release", "args": {"item": "a"}}')});
osql(qq{SELECT saga.fail('$app', 'customer changed their mind')});
ok(wait_status($app, 'compensated'), 'saga.fail(): the application-driven saga is compensated');
is(psql_p(qq{SELECT count(*) || ' ' || string_agg(kind || ' ' || item || ' ' || (ctx -> 'args')::text, ',')
             FROM shop.effects WHERE saga_id = '$app'}),
	'1 release a {"item": "a"}', 'the remote compensation ran once in products, with the registered args in ctx');
is(psql_p(qq{SELECT ctx ->> 'error' FROM shop.effects WHERE saga_id = '$app'}), 'customer changed their mind',
	'and the reason in ctx->error');
is(psql_p(q{SELECT qty FROM shop.stock WHERE item = 'a'}), '1', 'the stock of item a went from 0 to 1');
is(osql(qq{SELECT status || ' ' || compensation_attempts || ' ' || (compensation_result ->> 'released')
           FROM saga.instance_steps WHERE saga_id = '$app' AND step = 'x'}),
	'compensated 1 a', 'the step is compensated after one call, with the remote result');
is(psql_p(qq{SELECT string_agg(key || ' ' || status || ' ' || fn, ',') FROM saga.invocations WHERE key LIKE '$app:%'}),
	"$app:x:compensation executed shop.release(jsonb)",
	'in products it ran through saga.invoke under the key <saga id>:<step>:compensation (the step itself never ran there)');

$orders->stop;
$products->stop;
$delivery->stop;
done_testing();
