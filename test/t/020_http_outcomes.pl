# HTTP outcomes at a real receiver: what a 2xx delivery carries, which
# answers dead-letter at once, which are retried, and how often.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('outcomes');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";

# requests the receiver logged for one message id, in arrival order
sub requests_for
{
	my ($id) = @_;
	return grep { lc(request_header($_, 'Idempotency-Key') // '') eq lc($id) } receiver_requests($log);
}

# a request header, whatever its case on the wire

# publish from SQL that returns json lines {"id":..., ...}; decoded rows
sub publish_rows
{
	my ($sql) = @_;
	return map { decode_json($_) } grep { length } split /\n/, $node->safe_psql('postgres', $sql);
}

sub create_destination
{
	my ($name, $path, $options, $pattern) = @_;
	$node->safe_psql('postgres', qq{
		SELECT saga.create_destination('$name', '$base$path', '$options');
		SELECT saga.subscribe('$pattern', '$name');
	});
}

sub wait_settled
{
	my ($dest) = @_;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 0 FROM saga.outbox WHERE destination = '$dest'"),
		"$dest: nothing left in the outbox");
}

sub dead_letter
{
	my ($id, $dest) = @_;
	my $row = $node->safe_psql('postgres', qq{
		SELECT row_to_json(d) FROM (
			SELECT attempts, last_status, last_error, dead_at IS NOT NULL AS has_dead_at
			FROM saga.dead_letters WHERE message_id = '$id' AND destination = '$dest') d});
	return $row eq '' ? undef : decode_json($row);
}

# ---------------------------------------------------------------- 200
create_destination('ok', '/ok',
	'{"headers": {"Authorization": "Bearer s3cret-token", "X-Tenant": "acme"}}', 'ok.*');

# a second subscription that matches the same topic must not double deliveries
$node->safe_psql('postgres', q{SELECT saga.subscribe('ok.created', 'ok')});

my @published = publish_rows(q{
	BEGIN;
	SELECT json_build_object('id', saga.publish('ok.created',
			jsonb_build_object('n', g, 'name', 'caf' || chr(233) || ' ' || g,
				'nested', jsonb_build_object('list', jsonb_build_array(1, 2.50, true, null)),
				'quote', 'a "quoted" \ value'),
			'k' || (g % 3),
			jsonb_build_object('X-Trace', 'trace-' || g, 'X-Empty-Ish', '-')),
		'payload', jsonb_build_object('n', g, 'name', 'caf' || chr(233) || ' ' || g,
				'nested', jsonb_build_object('list', jsonb_build_array(1, 2.50, true, null)),
				'quote', 'a "quoted" \ value')::text,
		'n', g)
	FROM generate_series(1, 7) g;
	COMMIT;
});
is(scalar(@published), 7, 'publish returned seven ids');
wait_settled('ok');
usleep(500_000);	# any duplicate would have arrived by now

my @ok_reqs = grep { $_->{path} eq '/ok' } receiver_requests($log);
my %per_key;
$per_key{ lc(request_header($_, 'Idempotency-Key') // '') }++ for @ok_reqs;
is(scalar(keys %per_key), 7, 'distinct Idempotency-Keys equal the number published');
is(scalar(grep { $_ != 1 } values %per_key), 0, 'each message was sent exactly once');
is_deeply([ sort keys %per_key ], [ sort map { lc $_->{id} } @published ],
	'the Idempotency-Keys are the ids publish returned');

my $all_good = 1;
for my $m (@published)
{
	my @r = requests_for($m->{id});
	my $r = $r[0];
	unless ($r)
	{
		fail("message $m->{n} arrived");
		$all_good = 0;
		next;
	}
	is($r->{status}, 200, "message $m->{n}: answered 200");
	is(request_header($r, 'Content-Type'), 'application/json', "message $m->{n}: Content-Type");
	is(request_header($r, 'Saga-Topic'), 'ok.created', "message $m->{n}: Saga-Topic");
	is(request_header($r, 'Authorization'), 'Bearer s3cret-token', "message $m->{n}: destination Authorization header");
	is(request_header($r, 'X-Tenant'), 'acme', "message $m->{n}: second destination header");
	is(request_header($r, 'X-Trace'), "trace-$m->{n}", "message $m->{n}: message header");
	is($r->{body}, $m->{payload}, "message $m->{n}: body is the payload's JSON text");
	is_deeply(JSON::PP->new->decode($r->{body}), JSON::PP->new->decode($m->{payload}),
		"message $m->{n}: body decodes to the payload");
}
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.queue WHERE destination = 'ok'}),
	'0', 'delivered rows are gone from the queue');

# ---------------------------------------------------------------- other 2xx
for my $code (201, 202, 299)
{
	create_destination("s$code", "/status/$code", '{"max_attempts": 5, "backoff": "50ms"}', "two.$code");
}
my %two_ids = map { $_->{code} => $_->{id} } publish_rows(q{
	SELECT json_build_object('code', c, 'id', saga.publish('two.' || c, jsonb_build_object('c', c)))
	FROM unnest(ARRAY[201, 202, 299]) c;
});
for my $code (201, 202, 299)
{
	wait_settled("s$code");
}
usleep(300_000);
for my $code (201, 202, 299)
{
	my @r = requests_for($two_ids{$code});
	is_deeply([ map { $_->{status} } @r ], [$code], "$code: delivered with one request");
	is($node->safe_psql('postgres', "SELECT count(*) FROM saga.queue WHERE message_id = '$two_ids{$code}'"),
		'0', "$code: not kept as a dead letter");
}

# ---------------------------------------------------------------- permanent 4xx
for my $code (400, 404, 422)
{
	create_destination("s$code", "/status/$code",
		'{"max_attempts": 5, "backoff": "50ms", "max_backoff": "200ms"}', "perm.$code");
}
my %perm_ids = map { $_->{code} => $_->{id} } publish_rows(q{
	SELECT json_build_object('code', c, 'id', saga.publish('perm.' || c, jsonb_build_object('c', c)))
	FROM unnest(ARRAY[400, 404, 422]) c;
});
for my $code (400, 404, 422)
{
	my $id = $perm_ids{$code};
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM saga.dead_letters WHERE message_id = '$id'"),
		"$code: dead-lettered");
}
usleep(1_000_000);	# a wrong retry (backoff 50ms) would have been sent by now
for my $code (400, 404, 422)
{
	my $id = $perm_ids{$code};
	my @r = requests_for($id);
	is(scalar(@r), 1, "$code: exactly one attempt reached the receiver");
	my $d = dead_letter($id, "s$code");
	is($d->{attempts}, 1, "$code: dead letter shows one attempt");
	is($d->{last_status}, $code, "$code: last_status");
	like($d->{last_error}, qr/\b$code\b/, "$code: last_error names the status");
	like($d->{last_error}, qr/"status": $code/, "$code: last_error carries the response snippet");
	ok($d->{has_dead_at}, "$code: dead_at set");
	is($node->safe_psql('postgres', "SELECT count(*) FROM saga.outbox WHERE message_id = '$id'"),
		'0', "$code: not in the outbox any more");
}

# ---------------------------------------------------------------- 5xx until max_attempts
create_destination('s500', '/status/500',
	'{"max_attempts": 4, "backoff": "50ms", "max_backoff": "200ms"}', 'fail.500');
create_destination('s503', '/status/503',
	'{"max_attempts": 2, "backoff": "50ms", "max_backoff": "200ms"}', 'fail.503');
my ($id500) = map { $_->{id} } publish_rows(q{SELECT json_build_object('id', saga.publish('fail.500', '{"x": 1}'))});
my ($id503) = map { $_->{id} } publish_rows(q{SELECT json_build_object('id', saga.publish('fail.503', '{"x": 2}'))});
for my $c ([ $id500, 's500', 4, 500 ], [ $id503, 's503', 2, 503 ])
{
	my ($id, $dest, $max, $code) = @$c;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM saga.dead_letters WHERE message_id = '$id'"),
		"$code: dead-lettered after retries");
}
usleep(700_000);
for my $c ([ $id500, 's500', 4, 500 ], [ $id503, 's503', 2, 503 ])
{
	my ($id, $dest, $max, $code) = @$c;
	my @r = requests_for($id);
	is(scalar(@r), $max, "$code: receiver saw exactly max_attempts ($max) requests");
	is(scalar(grep { $_->{status} == $code } @r), $max, "$code: every one answered $code");
	my $d = dead_letter($id, $dest);
	is($d->{attempts}, $max, "$code: dead letter attempts = max_attempts");
	is($d->{last_status}, $code, "$code: last_status");
	like($d->{last_error}, qr/HTTP $code/, "$code: last_error");
}

# ---------------------------------------------------------------- /flaky/N recovers
create_destination('flaky', '/flaky/3/a',
	'{"max_attempts": 10, "backoff": "50ms", "max_backoff": "200ms"}', 'flaky.*');
my @flaky_ids = map { $_->{id} } publish_rows(q{
	SELECT json_build_object('id', saga.publish('flaky.x', jsonb_build_object('g', g)))
	FROM generate_series(1, 3) g});
wait_settled('flaky');
usleep(300_000);
for my $id (@flaky_ids)
{
	my @r = requests_for($id);
	is_deeply([ map { $_->{status} } @r ], [ 500, 500, 500, 200 ],
		"flaky/3: delivered on the fourth attempt ($id)");
}
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.dead_letters WHERE destination = 'flaky'}),
	'0', 'flaky/3: nothing dead-lettered');

# ---------------------------------------------------------------- 408 / 425 / 429 are transient
for my $code (408, 425, 429)
{
	create_destination("t$code", "/status/$code",
		'{"max_attempts": 3, "backoff": "50ms", "max_backoff": "200ms"}', "transient.$code");
}
my %t_ids = map { $_->{code} => $_->{id} } publish_rows(q{
	SELECT json_build_object('code', c, 'id', saga.publish('transient.' || c, jsonb_build_object('c', c)))
	FROM unnest(ARRAY[408, 425, 429]) c;
});
for my $code (408, 425, 429)
{
	my $id = $t_ids{$code};
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM saga.dead_letters WHERE message_id = '$id'"),
		"$code: dead-lettered once its attempts ran out");
}
usleep(500_000);
for my $code (408, 425, 429)
{
	my $id = $t_ids{$code};
	is(scalar(requests_for($id)), 3, "$code: retried up to max_attempts (3 requests)");
	my $d = dead_letter($id, "t$code");
	is($d->{attempts}, 3, "$code: dead letter attempts");
	is($d->{last_status}, $code, "$code: last_status");
}

kill 'TERM', $rpid;
$node->stop;
done_testing();
