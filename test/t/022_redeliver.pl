# saga.redeliver() puts dead letters back in the queue, and the worker
# delivers them again; a destination argument limits it to that destination.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('redeliver');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";


# requests for one message id, optionally at one path, in arrival order
sub requests_for
{
	my ($id, $path) = @_;
	return grep {
		lc(request_header($_, 'Idempotency-Key') // '') eq lc($id)
		  && (!defined $path || $_->{path} eq $path)
	} receiver_requests($log);
}

sub sql { return $node->safe_psql('postgres', $_[0]); }

# /flaky/N fails the first N requests of every message: with max_attempts
# below N+1 each message dead-letters, and a redelivery can then succeed.
sql(qq{
	SELECT saga.create_destination('a', '$base/flaky/3/a',
		'{"max_attempts": 2, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.subscribe('one.*', 'a');
	SELECT saga.create_destination('b1', '$base/flaky/1/b1',
		'{"max_attempts": 1, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.create_destination('b2', '$base/flaky/1/b2',
		'{"max_attempts": 1, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.subscribe('two.*', 'b1');
	SELECT saga.subscribe('two.*', 'b2');
});

# ---------------------------------------------------------------- one destination
my $id = sql(q{SELECT saga.publish('one.x', '{"v": "a"}')});
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM saga.dead_letters WHERE message_id = '$id' AND attempts = 2"),
	'dead-lettered after two attempts');
is(scalar(requests_for($id)), 2, 'receiver saw two failing requests');

# a rolled-back redelivery changes nothing
sql(qq{BEGIN; SELECT saga.redeliver('$id'); ROLLBACK;});
usleep(500_000);
is(sql("SELECT count(*) FROM saga.dead_letters WHERE message_id = '$id'"), '1',
	'a rolled-back redeliver leaves the dead letter');
is(scalar(requests_for($id)), 2, 'and sends nothing');

is(sql("SELECT saga.redeliver('$id')"), '1', 'redeliver returns 1');
# attempts start again: 500 (third request), then 200 (fourth)
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$id'"),
	'redelivered message is delivered');
my @r = requests_for($id);
is_deeply([ map { $_->{status} } @r ], [ 500, 500, 500, 200 ],
	'receiver saw the redelivered attempts, the last one 200');
is(request_header($r[-1], 'Idempotency-Key'), $id, 'same Idempotency-Key on redelivery') if @r;
is($r[-1]{body}, '{"v": "a"}', 'same body on redelivery') if @r;
my ($ret, $out, $err) = $node->psql('postgres', "SELECT saga.redeliver('$id')");
isnt($ret, 0, 'redeliver of a delivered (gone) message fails');
like($err, qr/not found/, '... with "not found"');

# ---------------------------------------------------------------- two destinations
my $m1 = sql(q{SELECT saga.publish('two.x', '{"v": "m1"}')});
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 2 FROM saga.dead_letters WHERE message_id = '$m1'"),
	'dead-lettered at both destinations');
is(sql("SELECT saga.redeliver('$m1', 'b1')"), '1', 'redeliver to b1 returns 1');
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$m1' AND destination = 'b1'"),
	'b1 delivered');
usleep(500_000);
is(sql("SELECT count(*) FROM saga.dead_letters WHERE message_id = '$m1' AND destination = 'b2'"), '1',
	'b2 is still a dead letter');
is(sql("SELECT attempts FROM saga.dead_letters WHERE message_id = '$m1' AND destination = 'b2'"), '1',
	'b2 dead letter untouched');
is_deeply([ map { $_->{status} } requests_for($m1, '/flaky/1/b1') ], [ 500, 200 ], 'b1 got the redelivery');
is_deeply([ map { $_->{status} } requests_for($m1, '/flaky/1/b2') ], [500], 'b2 got nothing more');

is(sql("SELECT saga.redeliver('$m1', 'b1')"), '0', 'redeliver to b1 again: nothing dead there, returns 0');
is(sql("SELECT saga.redeliver('$m1')"), '1', 'redeliver without destination returns 1 (only b2 is dead)');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$m1'"),
	'b2 delivered too');
is_deeply([ map { $_->{status} } requests_for($m1, '/flaky/1/b2') ], [ 500, 200 ], 'b2 got the redelivery');
is_deeply([ map { $_->{status} } requests_for($m1, '/flaky/1/b1') ], [ 500, 200 ], 'b1 got nothing more');

my $m2 = sql(q{SELECT saga.publish('two.x', '{"v": "m2"}')});
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 2 FROM saga.dead_letters WHERE message_id = '$m2'"),
	'second message dead at both destinations');
is(sql("SELECT saga.redeliver('$m2')"), '2', 'redeliver without destination returns 2');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$m2'"),
	'delivered to both');
is(scalar(grep { $_->{status} == 200 } requests_for($m2)), 2, 'one successful request per destination');

# ---------------------------------------------------------------- bad arguments
($ret, $out, $err) = $node->psql('postgres', "SELECT saga.redeliver('$m1', 'nosuch')");
like($err, qr/destination "nosuch" does not exist/, 'unknown destination is an error');
($ret, $out, $err) = $node->psql('postgres', "SELECT saga.redeliver(gen_random_uuid())");
like($err, qr/not found/, 'unknown message is an error');

kill 'TERM', $rpid;
$node->stop;
done_testing();
