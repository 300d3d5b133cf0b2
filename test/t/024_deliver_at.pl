# publish(..., deliver_at): nothing is sent before deliver_at, it is sent
# after; a delayed keyed message holds back the later messages of its key
# only.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep time);
use SagaTest;

my $node = saga_node('deliver_at');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";


sub sql { return $node->safe_psql('postgres', $_[0]); }

# log index and time of each request, by message id
sub arrivals
{
	my @all = receiver_requests($log);
	my %out;
	for my $i (0 .. $#all)
	{
		my $id = lc(request_header($all[$i], 'Idempotency-Key') // '');
		push @{ $out{$id} }, { idx => $i, time => $all[$i]{time}, status => $all[$i]{status} };
	}
	return %out;
}

sql(qq{
	SELECT saga.create_destination('later', '$base/ok/later');
	SELECT saga.subscribe('later.*', 'later');
});

my $delay = 5;
my $out = sql(qq{
	BEGIN;
	SELECT json_object_agg(n, json_build_object('id', id, 'at', extract(epoch FROM at)))
	FROM (VALUES
		('A',  saga.publish('later.e', '{"n": "A"}',  NULL, NULL, now() + interval '$delay s'), now() + interval '$delay s'),
		('K1', saga.publish('later.e', '{"n": "K1"}', 'K',  NULL, now() + interval '$delay s'), now() + interval '$delay s'),
		('B',  saga.publish('later.e', '{"n": "B"}'), now()),
		('K2', saga.publish('later.e', '{"n": "K2"}', 'K'), now()),
		('L1', saga.publish('later.e', '{"n": "L1"}', 'L'), now()),
		('P',  saga.publish('later.e', '{"n": "P"}',  NULL, NULL, now() - interval '1 hour'), now() - interval '1 hour')
	) v(n, id, at);
	COMMIT;
});
my ($json) = grep { /^\{/ } split /\n/, $out;
my $m = decode_json($json);
my %id = map { $_ => lc $m->{$_}{id} } keys %$m;
my $due = $m->{A}{at};
ok($due > time() - 5 && $due < time() + 60, 'deliver_at is in the near future');

ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.queue WHERE message_id IN ('$id{B}', '$id{L1}', '$id{P}')"),
	'messages without a delay (or with a past one) are delivered');
is(sql(qq{SELECT string_agg(status, ',' ORDER BY message_id) FROM saga.outbox
	WHERE message_id IN ('$id{A}', '$id{K1}')}), 'scheduled,scheduled', 'delayed messages show as scheduled');

# let some time pass, still well before deliver_at
usleep(1_500_000) while time() < $due - $delay + 2;
my %arr = arrivals();
ok(time() < $due, 'still before deliver_at');
ok(!$arr{ $id{A} }, 'A not delivered before deliver_at');
ok(!$arr{ $id{K1} }, 'K1 not delivered before deliver_at');
ok(!$arr{ $id{K2} }, 'K2 (due now, same key as delayed K1) is held back');
is(sql("SELECT count(*) FROM saga.outbox WHERE message_id IN ('$id{A}', '$id{K1}', '$id{K2}') AND attempts = 0"),
	'3', 'nothing was attempted for them');

ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE destination = 'later'"),
	'everything is delivered after deliver_at');
%arr = arrivals();
for my $n (qw(A B K1 K2 L1 P))
{
	is(scalar(@{ $arr{ $id{$n} } // [] }), 1, "$n delivered once");
}
cmp_ok($arr{ $id{A} }[0]{time}, '>=', $due, 'A arrived at or after deliver_at');
cmp_ok($arr{ $id{K1} }[0]{time}, '>=', $due, 'K1 arrived at or after deliver_at');
cmp_ok($arr{ $id{K2} }[0]{idx}, '>', $arr{ $id{K1} }[0]{idx}, 'K2 arrived after K1 (publish order of key K)');
cmp_ok($arr{ $id{L1} }[0]{idx}, '<', $arr{ $id{K1} }[0]{idx}, 'L1 (another key) was not held back');
cmp_ok($arr{ $id{B} }[0]{idx}, '<', $arr{ $id{A} }[0]{idx}, 'B (no key) was not held back');

kill 'TERM', $rpid;
$node->stop;
done_testing();
