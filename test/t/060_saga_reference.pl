# The reference scenario inside one database, run by the real worker: orders
# placed from several sessions at once start an "order" saga each
# (reserve_stock -> create_delivery -> confirm_order, local steps) against
# limited stock. Exactly the orders that got stock complete, the others are
# compensated; stock is never negative and ends at initial - completed; each
# step and compensation took effect once (I2); compensations undo exactly
# the done steps, newest first, and nothing for a step that never ran (I6).
# A transient error (SQLSTATE 40001) is retried until the step succeeds; a
# step whose attempts run out fails the saga, which then compensates.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time);
use SagaTest;

my $t0 = time;
my $node = saga_node('saga_reference');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE SCHEMA shop;
CREATE TABLE shop.stock (item text PRIMARY KEY, qty integer NOT NULL CHECK (qty >= 0));
CREATE TABLE shop.orders (
    id integer PRIMARY KEY,
    item text NOT NULL,
    qty integer NOT NULL,
    flag text,
    saga_id uuid,
    status text NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'confirmed')));
CREATE TABLE shop.deliveries (
    order_id integer PRIMARY KEY,
    status text NOT NULL CHECK (status IN ('created', 'cancelled')));
-- what every step and compensation did, in the order it did it
CREATE TABLE shop.effects (
    seq bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    step text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('action', 'compensation')),
    attempt integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
-- calls of the transient steps; a sequence is not rolled back with the
-- failing call's subtransaction
CREATE SEQUENCE shop.flaky_calls;
CREATE SEQUENCE shop.busy_calls;

CREATE FUNCTION shop.effect(ctx jsonb, kind text) RETURNS void
LANGUAGE sql SET search_path = shop, pg_temp AS $$
    INSERT INTO effects (saga_id, step, kind, attempt)
    VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', kind, (ctx ->> 'attempt')::integer)
$$;

CREATE FUNCTION shop.reserve_stock(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
DECLARE
    n integer := (ctx -> 'input' ->> 'qty')::integer;
    left_over integer;
BEGIN
    PERFORM effect(ctx, 'action');
    -- the row lock and CHECK (qty >= 0) refuse an order larger than the stock
    UPDATE stock SET qty = qty - n WHERE item = ctx -> 'input' ->> 'item' RETURNING qty INTO left_over;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown item %', ctx -> 'input' ->> 'item';
    END IF;
    RETURN jsonb_build_object('reserved', n, 'left', left_over);
END
$$;

CREATE FUNCTION shop.release_stock(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM effect(ctx, 'compensation');
    UPDATE stock SET qty = qty + (ctx -> 'steps' -> 'reserve_stock' ->> 'reserved')::integer
    WHERE item = ctx -> 'input' ->> 'item';
    RETURN jsonb_build_object('released', ctx -> 'steps' -> 'reserve_stock' -> 'reserved');
END
$$;

CREATE FUNCTION shop.create_delivery(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM effect(ctx, 'action');
    IF ctx -> 'input' ->> 'flag' = 'bad_address' THEN
        RAISE EXCEPTION 'no such address for order %', ctx -> 'input' ->> 'order_id';
    END IF;
    INSERT INTO deliveries (order_id, status) VALUES ((ctx -> 'input' ->> 'order_id')::integer, 'created');
    RETURN jsonb_build_object('delivery', ctx -> 'input' -> 'order_id');
END
$$;

CREATE FUNCTION shop.cancel_delivery(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM effect(ctx, 'compensation');
    UPDATE deliveries SET status = 'cancelled'
    WHERE order_id = (ctx -> 'input' ->> 'order_id')::integer AND status = 'created';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no delivery to cancel for order %', ctx -> 'input' ->> 'order_id';
    END IF;
    RETURN '{"cancelled": true}';
END
$$;

CREATE FUNCTION shop.confirm_order(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM effect(ctx, 'action');
    IF ctx -> 'input' ->> 'flag' = 'fraud' THEN
        RAISE EXCEPTION 'payment refused for order %', ctx -> 'input' ->> 'order_id'
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE orders SET status = 'confirmed' WHERE id = (ctx -> 'input' ->> 'order_id')::integer;
    RETURN '{"confirmed": true}';
END
$$;

-- transient twice (serialization failure), then fine
CREATE FUNCTION shop.flaky_delivery(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM nextval('flaky_calls');
    PERFORM effect(ctx, 'action');
    IF (ctx ->> 'attempt')::integer <= 2 THEN
        RAISE EXCEPTION 'could not serialize access (attempt %)', ctx ->> 'attempt'
            USING ERRCODE = 'serialization_failure';
    END IF;
    INSERT INTO deliveries (order_id, status) VALUES ((ctx -> 'input' ->> 'order_id')::integer, 'created');
    RETURN jsonb_build_object('attempt', ctx -> 'attempt');
END
$$;

-- always transient
CREATE FUNCTION shop.always_busy(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = shop, pg_temp AS $$
BEGIN
    PERFORM nextval('busy_calls');
    PERFORM effect(ctx, 'action');
    RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure';
END
$$;

INSERT INTO shop.stock VALUES ('widget', 120), ('gadget', 50), ('spare', 1000), ('gizmo', 10);
});

is(sql(q{SELECT saga.define('order', '{"steps": [
	{"name": "reserve_stock", "action": "shop.reserve_stock", "compensation": "shop.release_stock"},
	{"name": "create_delivery", "action": "shop.create_delivery", "compensation": "shop.cancel_delivery"},
	{"name": "confirm_order", "action": "shop.confirm_order"}]}')}), '1', 'saga "order" defined');
sql(q{SELECT saga.define('order_retry', '{"steps": [
	{"name": "reserve_stock", "action": "shop.reserve_stock", "compensation": "shop.release_stock"},
	{"name": "create_delivery", "action": "shop.flaky_delivery", "compensation": "shop.cancel_delivery",
	 "backoff": "100ms"},
	{"name": "confirm_order", "action": "shop.confirm_order"}]}')});
sql(q{SELECT saga.define('order_busy', '{"steps": [
	{"name": "reserve_stock", "action": "shop.reserve_stock", "compensation": "shop.release_stock"},
	{"name": "create_delivery", "action": "shop.always_busy", "compensation": "shop.cancel_delivery",
	 "max_attempts": 2, "backoff": "100ms"},
	{"name": "confirm_order", "action": "shop.confirm_order"}]}')});

# The orders:
#   1..160   widget, 1 unit each, against 120 in stock: 120 complete, 40 do not
#   161..180 spare (ample stock), bad address: create_delivery fails
#   181..200 spare, fraud: confirm_order fails after the delivery was created
#   201..260 gadget, 1 to 4 units each, against 50 in stock
my %order;
for my $id (1 .. 260)
{
	my ($item, $qty, $flag) =
	    $id <= 160 ? ('widget', 1, undef)
	  : $id <= 180 ? ('spare', 2, 'bad_address')
	  : $id <= 200 ? ('spare', 2, 'fraud')
	  :              ('gadget', 1 + $id % 4, undef);
	$order{$id} = { item => $item, qty => $qty, flag => $flag };
}

# MultiXacts in use before the run (see the check at the end)
sub next_multixact
{
	sql('CHECKPOINT');
	return sql('SELECT next_multixact_id FROM pg_control_checkpoint()');
}
my $multixact_before = next_multixact();

# Four sessions place them at the same time, one transaction per order, the
# order row and saga.start committed together; a fifth places orders and
# rolls them back.
my $dir = PostgreSQL::Test::Utils::tempdir();
my @harness;
for my $s (0 .. 4)
{
	my @lines;
	for my $id (sort { $a <=> $b } keys %order)
	{
		next unless $id % 4 == $s || $s == 4 && $id <= 10;
		my $o = $order{$id};
		my $oid = $s == 4 ? 1000 + $id : $id;
		my $flag = defined $o->{flag} ? "'$o->{flag}'" : 'NULL';
		push @lines, 'BEGIN;',
		  "INSERT INTO shop.orders (id, item, qty, flag) VALUES ($oid, '$o->{item}', $o->{qty}, $flag);",
		  "UPDATE shop.orders SET saga_id = saga.start('order', jsonb_build_object('order_id', $oid, "
		  . "'item', '$o->{item}', 'qty', $o->{qty}, 'flag', ${flag}::text), 'order-$oid') WHERE id = $oid;",
		  $s == 4 ? 'ROLLBACK;' : 'COMMIT;';
	}
	PostgreSQL::Test::Utils::append_to_file("$dir/s$s.sql", join("\n", @lines) . "\n");
	push @harness, IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', "$dir/s$s.sql" ],
		'>', "$dir/s$s.out", '2>', "$dir/s$s.err");
}
# the transient sagas run meanwhile
sql(q{
INSERT INTO shop.orders (id, item, qty) VALUES (301, 'gizmo', 1), (302, 'gizmo', 1);
UPDATE shop.orders SET saga_id = saga.start('order_retry', '{"order_id": 301, "item": "gizmo", "qty": 1}') WHERE id = 301;
UPDATE shop.orders SET saga_id = saga.start('order_busy', '{"order_id": 302, "item": "gizmo", "qty": 1}') WHERE id = 302;
});
my $placed_ok = 1;
for my $s (0 .. 4)
{
	$placed_ok &&= $harness[$s]->finish;
	my $err = slurp_file("$dir/s$s.err");
	$placed_ok &&= $err eq '';
	diag("session $s: $err") if $err ne '';
}
ok($placed_ok, 'five sessions placed their orders without errors');
is(sql(q{SELECT count(*) FROM shop.orders WHERE saga_id IS NOT NULL AND id < 300}), '260', '260 orders placed, each with a saga');

# a repeated idempotency key returns the saga of that order and starts nothing
is(sql(q{SELECT saga.start('order', '{"order_id": 1, "item": "widget", "qty": 1}', 'order-1') = saga_id
         FROM shop.orders WHERE id = 1}), 't', 'a repeated idempotency key returns the existing saga');

ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 0 FROM saga.sagas WHERE status NOT IN ('completed', 'compensated', 'failed')}),
	'every saga reached a terminal status');
my $elapsed_run = time - $t0;

is(sql(q{SELECT count(*) FROM saga.sagas WHERE name = 'order'}), '260',
	'one saga per committed order: none from the rolled-back transactions, none from the repeated key');
is(sql(q{SELECT count(*) FROM saga.sagas WHERE (input ->> 'order_id')::integer >= 1000}), '0',
	'no saga from a rolled-back order');
is(sql(q{SELECT count(*) FROM saga.sagas WHERE status = 'failed'}), '0', 'no saga failed');

# per order: its saga's status, its ledger, its steps
my %status = map { split /\|/ } split /\n/, sql(q{
	SELECT o.id, s.status FROM shop.orders o JOIN saga.sagas s ON s.id = o.saga_id});
my %ledger = map { my ($id, $l) = split /\|/; ($id => [ split /,/, $l ]) } split /\n/, sql(q{
	SELECT o.id, string_agg(e.kind || ':' || e.step, ',' ORDER BY e.seq)
	FROM shop.orders o JOIN shop.effects e ON e.saga_id = o.saga_id GROUP BY o.id});
my %steps = map { my ($id, $l) = split /\|/; ($id => $l) } split /\n/, sql(q{
	SELECT o.id, string_agg(x.step || ':' || x.status, ',' ORDER BY x.position)
	FROM shop.orders o JOIN saga.saga_steps x ON x.saga_id = o.saga_id GROUP BY o.id});

# widget: exactly the stock's worth completes
my @widget = grep { $order{$_}{item} eq 'widget' } keys %order;
is(scalar(grep { $status{$_} eq 'completed' } @widget), 120, 'widget: exactly 120 orders completed (the stock)');
is(scalar(grep { $status{$_} eq 'compensated' } @widget), 40, 'widget: the other 40 were compensated');
is(sql(q{SELECT qty FROM shop.stock WHERE item = 'widget'}), '0', 'widget: stock is 0, not negative');
my @wrong = grep {
	my $l = join(',', @{ $ledger{$_} // [] });
	$status{$_} eq 'completed'
	  ? $l ne 'action:reserve_stock,action:create_delivery,action:confirm_order'
	  : ($l ne '' || ($steps{$_} // '') ne 'reserve_stock:failed')
} @widget;
is_deeply(\@wrong, [], 'widget: completed orders ran each step once; out-of-stock ones left no effect at all')
  or diag(join("\n", map { "order $_: $status{$_}: " . join(',', @{ $ledger{$_} // [] }) . ' / ' . ($steps{$_} // '') } @wrong[0 .. ($#wrong < 4 ? $#wrong : 4)]));
like(sql(q{SELECT s.error FROM saga.sagas s JOIN shop.orders o ON o.saga_id = s.id
           WHERE o.item = 'widget' AND s.status = 'compensated' LIMIT 1}),
	qr/^step "reserve_stock" failed: .*check constraint.*\(SQLSTATE 23514\)$/,
	'an out-of-stock order records the reservation error');

# spare: every order compensated, newest first, the failed step never compensated
my @bad = grep { ($order{$_}{flag} // '') eq 'bad_address' } keys %order;
my @fraud = grep { ($order{$_}{flag} // '') eq 'fraud' } keys %order;
is(scalar(grep { $status{$_} eq 'compensated' } @bad, @fraud), 40, 'spare: all 40 flagged orders were compensated');
@wrong = grep { join(',', @{ $ledger{$_} // [] }) ne 'action:reserve_stock,compensation:reserve_stock'
	  || $steps{$_} ne 'reserve_stock:compensated,create_delivery:failed' } @bad;
is_deeply(\@wrong, [], 'bad address: the reservation was released; the failed delivery was not compensated');
@wrong = grep {
	join(',', @{ $ledger{$_} // [] }) ne
	  'action:reserve_stock,action:create_delivery,compensation:create_delivery,compensation:reserve_stock'
	  || $steps{$_} ne 'reserve_stock:compensated,create_delivery:compensated,confirm_order:failed'
} @fraud;
is_deeply(\@wrong, [], 'fraud: delivery cancelled, then stock released (newest first), confirm_order not compensated')
  or diag(join("\n", map { "order $_: " . join(',', @{ $ledger{$_} // [] }) . " / $steps{$_}" } @wrong[0 .. ($#wrong < 4 ? $#wrong : 4)]));
is(sql(q{SELECT qty FROM shop.stock WHERE item = 'spare'}), '1000', 'spare: every reservation was released');
is(sql(q{SELECT count(*) FILTER (WHERE a.compensated_at >= b.compensated_at)
         FROM saga.saga_steps a JOIN saga.saga_steps b ON b.saga_id = a.saga_id
         WHERE a.step = 'reserve_stock' AND b.step = 'create_delivery' AND b.status = 'compensated'}), '20',
	'saga_steps: create_delivery was compensated no later than reserve_stock in all 20 fraud orders');
like(sql(qq{SELECT s.error FROM saga.sagas s JOIN shop.orders o ON o.saga_id = s.id WHERE o.id = $bad[0]}),
	qr/^step "create_delivery" failed: no such address for order $bad[0] \(SQLSTATE P0001\)$/,
	'the business error is recorded on the saga');

# gadget: mixed quantities; stock goes down only by what completed
my @gadget = grep { $order{$_}{item} eq 'gadget' } keys %order;
my $gadget_left = sql(q{SELECT qty FROM shop.stock WHERE item = 'gadget'});
my $gadget_sold = 0;
$gadget_sold += $order{$_}{qty} for grep { $status{$_} eq 'completed' } @gadget;
is($gadget_left, 50 - $gadget_sold, "gadget: stock $gadget_left = 50 - $gadget_sold sold by completed orders");
my @refused = grep { $status{$_} eq 'compensated' } @gadget;
ok(@refused > 0 && @refused < 60, scalar(@refused) . ' of 60 gadget orders were refused');
is_deeply([ grep { $order{$_}{qty} <= $gadget_left } @refused ], [],
	'gadget: every refused order asked for more than was left');

# I2, across every saga of this test
is(sql(q{SELECT count(*) - count(DISTINCT (saga_id, step, kind)) FROM shop.effects}), '0',
	'I2: each step and compensation took effect once');
# I6 in general: compensations come after every action of their saga and in
# reverse order of the actions
is(sql(q{
	SELECT count(*) FROM (
		SELECT e.saga_id,
		       string_agg(e.step, ',' ORDER BY e.seq DESC) FILTER (WHERE e.kind = 'action' AND e.step <> 'confirm_order') AS undo,
		       string_agg(e.step, ',' ORDER BY e.seq) FILTER (WHERE e.kind = 'compensation') AS done,
		       max(e.seq) FILTER (WHERE e.kind = 'action') AS last_action,
		       min(e.seq) FILTER (WHERE e.kind = 'compensation') AS first_compensation
		FROM shop.effects e JOIN saga.sagas s ON s.id = e.saga_id
		WHERE s.status = 'compensated'
		GROUP BY e.saga_id) c
	WHERE undo IS DISTINCT FROM done OR last_action > first_compensation}), '0',
	'I6: every compensated saga undid exactly its done steps, newest first, after the last of them');
is(sql(q{SELECT count(*) FROM shop.effects e JOIN saga.sagas s ON s.id = e.saga_id
         WHERE s.status = 'completed' AND e.kind = 'compensation'}), '0', 'no completed saga was compensated');

# the orders and deliveries agree with the sagas
is(sql(q{SELECT count(*) FROM shop.orders o JOIN saga.sagas s ON s.id = o.saga_id
         WHERE (o.status = 'confirmed') <> (s.status = 'completed')}), '0',
	'an order is confirmed exactly when its saga completed');
is(sql(q{SELECT count(*) FROM shop.orders o JOIN saga.sagas s ON s.id = o.saga_id
         LEFT JOIN shop.deliveries d ON d.order_id = o.id
         WHERE s.status = 'completed' AND d.status IS DISTINCT FROM 'created'
            OR s.status = 'compensated' AND d.status = 'created'}), '0',
	'completed orders have a delivery; compensated ones none that is still active');
is(sql(q{SELECT count(*) FROM shop.deliveries WHERE status = 'cancelled'}), '20', '20 deliveries cancelled (the fraud orders)');

# the transient step: retried twice, then done
is(sql(q{SELECT s.status FROM saga.sagas s JOIN shop.orders o ON o.saga_id = s.id WHERE o.id = 301}),
	'completed', 'a step failing with 40001 twice is retried and the saga completes');
is(sql(q{SELECT x.status || ' ' || x.attempts || ' ' || (x.result ->> 'attempt') || ' ' || coalesce(x.error, '-')
         FROM saga.saga_steps x JOIN shop.orders o ON o.saga_id = x.saga_id
         WHERE o.id = 301 AND x.step = 'create_delivery'}),
	'done 3 3 -', 'saga_steps: the step is done after 3 attempts, the third one succeeded, no error left');
is(sql(q{SELECT last_value FROM shop.flaky_calls}), '3', 'the transient step was called exactly 3 times');
is(sql(q{SELECT string_agg(e.step || '#' || e.attempt, ',' ORDER BY e.seq) FROM shop.effects e
         JOIN shop.orders o ON o.saga_id = e.saga_id WHERE o.id = 301}),
	'reserve_stock#1,create_delivery#3,confirm_order#1', 'only the successful attempt left an effect');

# the step whose attempts run out fails the saga, which compensates
is(sql(q{SELECT s.status FROM saga.sagas s JOIN shop.orders o ON o.saga_id = s.id WHERE o.id = 302}),
	'compensated', 'a step that stays transient past max_attempts 2 fails the saga, which is compensated');
is(sql(q{SELECT string_agg(x.step || ':' || x.status || ':' || x.attempts, ',' ORDER BY x.position)
         FROM saga.saga_steps x JOIN shop.orders o ON o.saga_id = x.saga_id WHERE o.id = 302}),
	'reserve_stock:compensated:1,create_delivery:failed:2', 'saga_steps: failed after 2 attempts; stock released');
is(sql(q{SELECT last_value FROM shop.busy_calls}), '2', 'the always-busy step was called exactly twice');
like(sql(q{SELECT s.error FROM saga.sagas s JOIN shop.orders o ON o.saga_id = s.id WHERE o.id = 302}),
	qr/^step "create_delivery" failed after 2 attempts: could not serialize access \(SQLSTATE 40001\)$/,
	'the saga records the exhausted step and its last error');
is(sql(q{SELECT string_agg(e.kind || ':' || e.step, ',' ORDER BY e.seq) FROM shop.effects e
         JOIN shop.orders o ON o.saga_id = e.saga_id WHERE o.id = 302}),
	'action:reserve_stock,compensation:reserve_stock', 'ledger: the reservation and its release, nothing else');
is(sql(q{SELECT qty FROM shop.stock WHERE item = 'gizmo'}), '9', 'gizmo: only the completed order took stock');

# The worker locks the sagas it runs and records each step in its own
# transaction, not in the step's subtransaction: no row version ever carries
# two transaction ids, so running sagas allocates no MultiXact.
is(next_multixact(), $multixact_before, 'running the sagas created no MultiXact');

note(sprintf('sagas placed and finished in %.1f s', $elapsed_run));
$node->stop;
done_testing();
