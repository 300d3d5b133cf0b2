# NOTIFY delivery to a real LISTEN session: one JSON envelope per committed
# message, in publish order, sent by the worker; nothing for rolled-back
# messages; envelopes too large for NOTIFY come without their payload and
# saga.message() returns it.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep time);
use SagaTest;

my $node = saga_node('notify');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
	SELECT saga.create_destination('ev', 'notify:saga_events');
	SELECT saga.subscribe('ev.*', 'ev');
	CREATE ROLE app LOGIN;
});
my $worker_pid = sql(q{SELECT pid FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres'});

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN saga_events');

# notifications received so far: [{pid, payload (decoded), raw}]
my @received;

sub drain
{
	my $out = $listener->query('SELECT 1');
	while ($out =~ /^Asynchronous notification "saga_events" with payload "(.*)" received from server process with PID (\d+)\.$/mg)
	{
		my ($raw, $pid) = ($1, $2);
		push @received, { raw => $raw, pid => $pid, msg => JSON::PP->new->decode($raw) };
	}
}

# drain until a notification for $id arrived (or time runs out)
sub wait_for_id
{
	my ($id) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		drain();
		return 1 if grep { lc($_->{msg}{id} // '') eq lc($id) } @received;
		usleep(100_000);
	}
	return 0;
}

sub received_for
{
	my ($id) = @_;
	return grep { lc($_->{msg}{id} // '') eq lc($id) } @received;
}

# ---------------------------------------------------------------- committed vs rolled back
my $out = sql(q{
	BEGIN;
	SELECT json_build_array(
		saga.publish('ev.a', '{"a": 1, "nested": {"x": [1, "two"]}}', 'k1', '{"X-H": "v"}'),
		saga.publish('ev.b', '[1, 2, 3]'),
		saga.publish('ev.c', '"just a string"', 'k2'));
	COMMIT;
	BEGIN;
	SELECT saga.publish('ev.rb', '{"rolled_back": 1}');
	ROLLBACK;
	BEGIN;
	SAVEPOINT s;
	SELECT saga.publish('ev.rb', '{"rolled_back": 2}');
	ROLLBACK TO SAVEPOINT s;
	SELECT json_build_array(saga.publish('ev.sentinel', '{"last": true}'));
	COMMIT;
});
my @arrays = map { decode_json($_) } grep { /^\[/ } split /\n/, $out;
my ($ida, $idb, $idc) = @{ $arrays[0] };
my ($sentinel) = @{ $arrays[1] };
ok(wait_for_id($sentinel), 'the last committed message was notified');
drain();

my @ours = grep { ($_->{msg}{topic} // '') =~ /^ev\.(a|b|c|rb|sentinel)$/ } @received;
is_deeply([ map { lc $_->{msg}{id} } @ours ], [ map { lc } $ida, $idb, $idc, $sentinel ],
	'one notification per committed message, in publish order');
is(scalar(grep { $_->{raw} =~ /rolled_back/ } @received), 0, 'nothing from rolled-back publishes');
is(scalar(grep { $_->{pid} != $worker_pid } @received), 0, 'every notification was sent by the worker');

is_deeply((received_for($ida))[0]{msg},
	{ id => $ida, topic => 'ev.a', key => 'k1', payload => { a => 1, nested => { x => [ 1, 'two' ] } },
		headers => { 'X-H' => 'v' } },
	'envelope of a keyed message with headers');
is_deeply((received_for($idb))[0]{msg},
	{ id => $idb, topic => 'ev.b', key => undef, payload => [ 1, 2, 3 ], headers => undef },
	'envelope of a message without key and headers');
is_deeply((received_for($idc))[0]{msg},
	{ id => $idc, topic => 'ev.c', key => 'k2', payload => 'just a string', headers => undef },
	'envelope of a scalar payload');
is(sql(q{SELECT count(*) FROM saga.queue WHERE destination = 'ev'}), '0', 'notified messages are gone from the queue');

# ---------------------------------------------------------------- size limit
# envelope length without the payload string, for the exact 8000-byte boundary
my $base_len = sql(q{
	SELECT octet_length(jsonb_build_object('id', '00000000-0000-0000-0000-000000000000'::uuid,
		'topic', 'ev.big', 'key', NULL::text, 'payload', jsonb_build_object('s', ''),
		'headers', NULL::jsonb)::text)});
my $fits = 7999 - $base_len;	# envelope of 7999 bytes: still fits
my $over = 8000 - $base_len;	# envelope of 8000 bytes: too large for NOTIFY
$out = sql(qq{
	BEGIN;
	SELECT json_build_array(
		saga.publish('ev.big', jsonb_build_object('s', repeat('x', $fits))),
		saga.publish('ev.big', jsonb_build_object('s', repeat('x', $over))),
		saga.publish('ev.big', jsonb_build_object('s', repeat(chr(233), 4000))),
		saga.publish('ev.big', jsonb_build_object('s', repeat('y', 100000)), 'bk', '{"X-Big": "1"}'),
		saga.publish('ev.sentinel', '{"last": 2}'));
	COMMIT;
});
my ($id_fits, $id_over, $id_multibyte, $id_huge, $sentinel2) = @{ decode_json((grep { /^\[/ } split /\n/, $out)[0]) };
ok(wait_for_id($sentinel2), 'notifications after large messages still arrive');
drain();

my ($n_fits) = received_for($id_fits);
ok($n_fits, 'a 7999-byte envelope arrived');
is(length($n_fits->{raw}), 7999, '... as 7999 bytes') if $n_fits;
is(length($n_fits->{msg}{payload}{s} // ''), $fits, '... with its whole payload') if $n_fits;
ok(!exists $n_fits->{msg}{truncated}, '... and not marked truncated') if $n_fits;

for my $c ([ $id_over, '8000-byte envelope', 'ev.big', undef, undef ],
	[ $id_multibyte, 'envelope of 4000 two-byte characters', 'ev.big', undef, undef ],
	[ $id_huge, '100 kB payload', 'ev.big', 'bk', { 'X-Big' => '1' } ])
{
	my ($id, $what, $topic, $key, $headers) = @$c;
	my ($n) = received_for($id);
	ok($n, "$what: notified");
	next unless $n;
	is_deeply($n->{msg}, { id => $id, topic => $topic, key => $key, headers => $headers, truncated => JSON::PP::true },
		"$what: envelope without payload, with \"truncated\": true");
	cmp_ok(length($n->{raw}), '<', 8000, "$what: notification fits");
}
is(scalar(grep { lc($_->{msg}{id} // '') eq lc($id_fits) || lc($_->{msg}{id} // '') eq lc($id_over) } @received), 2,
	'one notification each');

is(sql(qq{SELECT saga.message('$id_over')->'payload' = jsonb_build_object('s', repeat('x', $over))}), 't',
	'saga.message() returns the full payload of a truncated notification');
is(sql(qq{SELECT saga.message('$id_multibyte')->'payload' = jsonb_build_object('s', repeat(chr(233), 4000))}), 't',
	'... also for the multibyte one');
is($node->safe_psql('postgres',
		qq{SELECT saga.message('$id_huge')->'payload' = jsonb_build_object('s', repeat('y', 100000))
		   AND saga.message('$id_huge')->>'key' = 'bk'},
		extra_params => [ '-U', 'app' ]), 't',
	'... also for an unprivileged role');
is(sql(qq{SELECT count(*) FROM saga.outbox WHERE message_id IN ('$id_over', '$id_multibyte', '$id_huge')}), '0',
	'truncated messages are not in the outbox');
is(sql(qq{SELECT count(*) FROM saga.dead_letters WHERE message_id IN ('$id_over', '$id_multibyte', '$id_huge')}), '0',
	'... nor dead letters');
my ($ret, $o, $err) = $node->psql('postgres', "SELECT saga.message('$id_fits')");
like($err, qr/not found/, 'a message that fit in its notification is not kept');

# ---------------------------------------------------------------- deliver_at and keys
# K1 waits for deliver_at; K2 (same key, due now) must wait for it; L and a
# message without a key go at once.
$out = sql(q{
	BEGIN;
	SELECT json_build_array(
		saga.publish('ev.later', '{"n": "K1"}', 'K', NULL, now() + interval '3 s'),
		saga.publish('ev.later', '{"n": "K2"}', 'K'),
		saga.publish('ev.later', '{"n": "L"}', 'L'),
		saga.publish('ev.later', '{"n": "none"}'),
		extract(epoch FROM now() + interval '3 s'));
	COMMIT;
});
my ($k1, $k2, $l, $none, $due) = @{ decode_json((grep { /^\[/ } split /\n/, $out)[0]) };
ok(wait_for_id($l) && wait_for_id($none), 'messages due now are notified');
usleep(1_000_000);
drain();
ok(time() < $due, 'still before deliver_at');
is(scalar(received_for($k1)), 0, 'a delayed message is not notified before deliver_at');
is(scalar(received_for($k2)), 0, 'a later message of its key waits for it');
ok(wait_for_id($k1) && wait_for_id($k2), 'both are notified after deliver_at');
cmp_ok(time(), '>=', $due, '... not before');
my @order = map { lc $_->{msg}{id} } grep { ($_->{msg}{topic} // '') eq 'ev.later' } @received;
is_deeply([ @order[2, 3] ], [ lc $k1, lc $k2 ], 'K1 is notified before K2');
is(scalar(@order), 4, 'each delayed-test message notified once');

# ---------------------------------------------------------------- bursts of many batches
# Batches of 10: a burst spans several batches and cycles (8 batches each).
# A batch starts where the previous one of its cycle stopped, so a message
# that commits behind that point must be found by the next cycle.
sql(q{ALTER SYSTEM SET saga.batch_size = 10; SELECT pg_reload_conf();});
usleep(500_000);

sub published_ids
{
	my ($sql) = @_;
	return map { lc } grep { /^[0-9a-f-]{36}$/ } split /\n/, sql($sql);
}

my $late = $node->background_psql('postgres');
$late->query_safe('BEGIN');
my ($behind) = grep { /^[0-9a-f-]{36}$/ } split /\n/,
	$late->query_safe(q{SELECT saga.publish('ev.behind', '{"late": true}')});
my @burst = published_ids(q{SELECT saga.publish('ev.burst', jsonb_build_object('n', g)) FROM generate_series(1, 200) g});
ok(wait_for_id($burst[-1]), 'a burst of 200 in batches of 10: the last one arrives');
drain();
is_deeply([ map { lc $_->{msg}{id} } grep { ($_->{msg}{topic} // '') eq 'ev.burst' } @received ], \@burst,
	'... every one once, in publish order');
$late->query_safe('COMMIT');
$late->quit;
ok(wait_for_id($behind), 'a message that committed behind the batches already sent arrives too');

my @mixed = published_ids(q{
	SELECT saga.publish('ev.mixed', jsonb_build_object('n', g), CASE WHEN g % 3 = 0 THEN 'M' END)
	FROM generate_series(1, 120) g});
ok(wait_for_id($mixed[-1]), 'a burst of 120 with every third message on one key: the last one arrives');
drain();
my @got = map { lc $_->{msg}{id} } grep { ($_->{msg}{topic} // '') eq 'ev.mixed' } @received;
is(scalar(@got), 120, '... every one once');
is_deeply([ grep { my $id = $_; grep { $_ eq $id } @mixed[ grep { ($_ + 1) % 3 == 0 } 0 .. $#mixed ] } @got ],
	[ @mixed[ grep { ($_ + 1) % 3 == 0 } 0 .. $#mixed ] ], '... the keyed ones in publish order');
sql(q{ALTER SYSTEM RESET saga.batch_size; SELECT pg_reload_conf();});

$listener->quit;
$node->stop;
done_testing();
