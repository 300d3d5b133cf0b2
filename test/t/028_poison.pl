# Poisoned messages never stop the others: a message the receiver refuses
# (too many headers: 431) is dead-lettered after one attempt while the
# messages around it, of its own key too, are delivered; a destination that
# hangs does not hold up another one; oversized input is refused at publish.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('poison');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";


sub sql { return $node->safe_psql('postgres', $_[0]); }

# the receiver's log, read once per phase (it holds a 900 kB body)
my @all;

sub requests_for
{
	my ($id) = @_;
	return map { { %{ $all[$_] }, idx => $_ } }
	  grep { lc(request_header($all[$_], 'Idempotency-Key') // '') eq lc($id) } 0 .. $#all;
}

sql(qq{
	SELECT saga.create_destination('svc', '$base/ok/svc',
		'{"concurrency": 2, "max_attempts": 5, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.subscribe('svc.*', 'svc');
	SELECT saga.create_destination('stuck', '$base/hang',
		'{"concurrency": 3, "timeout": "20s", "max_attempts": 3}');
	SELECT saga.subscribe('stuck.*', 'stuck');
});

# a hanging destination is busy for the whole test
sql(q{SELECT saga.publish('stuck.e', jsonb_build_object('g', g)) FROM generate_series(1, 6) g});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 3 FROM saga.outbox WHERE destination = 'stuck' AND status = 'in_flight'}),
	'the hanging destination has its requests open');

# 120 message headers: the receiver's HTTP parser refuses more than 100 (431)
my $many_headers = '{' . join(', ', map { sprintf('"H%03d": "v"', $_) } 1 .. 120) . '}';
my $long_value = 'x' x 1900;
my $out = sql(qq{
	BEGIN;
	SELECT json_build_object(
		'K1', saga.publish('svc.e', '{"n": "K1"}', 'K'),
		'N1', saga.publish('svc.e', '{"n": "N1"}'),
		'K2', saga.publish('svc.e', '{"n": "K2 poison"}', 'K', '$many_headers'),
		'P2', saga.publish('svc.e', '{"n": "P2 poison"}', NULL, '$many_headers'),
		'K3', saga.publish('svc.e', '{"n": "K3"}', 'K'),
		'LONG', saga.publish('svc.e', '{"n": "long header"}', 'K', '{"X-Long": "$long_value"}'),
		'BIG', saga.publish('svc.e', jsonb_build_object('n', 'big', 'blob', repeat('0123456789', 90000))),
		'UNI', saga.publish('svc.e', jsonb_build_object('n', 'unicode', 's', 'caf' || chr(233) || ' ' || chr(128512) || ' \\u0001 <>&')),
		'K4', saga.publish('svc.e', '{"n": "K4"}', 'K'));
	COMMIT;
});
my %id = %{ decode_json((grep { /^\{/ } split /\n/, $out)[0]) };

ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.outbox WHERE destination = 'svc'}),
	'every message to svc is delivered or dead-lettered');
is(sql(q{SELECT count(*) FROM saga.outbox WHERE destination = 'stuck'}), '6',
	'... while the hanging destination still holds all its messages');

for my $p (qw(K2 P2))
{
	my $d = sql(qq{SELECT attempts || '|' || last_status FROM saga.dead_letters WHERE message_id = '$id{$p}'});
	is($d, '1|431', "$p (too many headers): dead-lettered after one attempt with 431");
}
like(sql(qq{SELECT last_error FROM saga.dead_letters WHERE message_id = '$id{K2}'}), qr/^HTTP 431\b/,
	'the dead letter carries the answer');

@all = receiver_requests($log);
for my $p (qw(K1 N1 K3 LONG BIG UNI K4))
{
	my @r = requests_for($id{$p});
	is(scalar(@r), 1, "$p delivered once");
	is($r[0]{status}, 200, "$p answered 200") if @r;
}
my %first = map { my @r = requests_for($id{$_}); ($_ => (@r ? $r[0]{idx} : -1)) } qw(K1 K3 LONG K4);
ok($first{K1} < $first{K3} && $first{K3} < $first{LONG} && $first{LONG} < $first{K4},
	'key K stays in order around its dead-lettered message');

my ($long) = requests_for($id{LONG});
is(request_header($long, 'X-Long'), $long_value, 'a 1900-byte header value arrives intact') if $long;
my ($big) = requests_for($id{BIG});
is($big->{body}, sql(q{SELECT jsonb_build_object('n', 'big', 'blob', repeat('0123456789', 90000))::text}),
	'a 900 kB payload arrives whole') if $big;
my ($uni) = requests_for($id{UNI});
is_deeply(JSON::PP->new->decode($uni->{body}),
	{ n => 'unicode', s => "caf\x{e9} \x{1F600} \\u0001 <>&" }, 'a payload with non-ASCII and escapes arrives intact')
  if $uni;

# oversized input is refused at publish, and changes nothing
my $too_many = '{' . join(', ', map { sprintf('"Header-%04d": "value-%04d"', $_, $_) } 1 .. 150) . '}';
my ($ret, $o, $err) = $node->psql('postgres', qq{
	BEGIN;
	SELECT saga.publish('svc.e', '{"n": "fine"}');
	SELECT saga.publish('svc.e', '{"n": "huge headers"}', NULL, '$too_many');
	COMMIT;
});
like($err, qr/headers are too large/, 'headers over the limit are refused');
($ret, $o, $err) = $node->psql('postgres', q{SELECT saga.publish('svc.e', jsonb_build_object('s', repeat('x', 2000000)))});
like($err, qr/payload is too large/, 'payload over saga.max_payload_size is refused');
usleep(300_000);
is(scalar(grep { $_->{body} =~ /"fine"/ } receiver_requests($log)), 0,
	'the transaction with the refused publish sent nothing');

# and the worker goes on
my $after = sql(q{SELECT saga.publish('svc.e', '{"n": "after"}', 'K')});
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$after'"),
	'a later message of the same key is delivered');
is(sql(q{SELECT count(*) FROM saga.worker_status() WHERE kind = 'worker' AND state IN ('idle', 'dispatching')}), '1',
	'the worker is still running');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC/, 'no crash in the server log');

kill 'TERM', $rpid;
$node->stop;
done_testing();
