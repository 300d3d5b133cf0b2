# Transient failures below HTTP status codes: Retry-After, time-outs,
# connection resets and refusals are retried, with a backoff that grows.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('transport');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";


sub requests_for
{
	my ($id, $file) = @_;
	return grep { lc(request_header($_, 'Idempotency-Key') // '') eq lc($id) } receiver_requests($file // $log);
}

sub create_destination
{
	my ($name, $url, $options, $pattern) = @_;
	$node->safe_psql('postgres', qq{
		SELECT saga.create_destination('$name', '$url', '$options');
		SELECT saga.subscribe('$pattern', '$name');
	});
}

sub publish
{
	my ($topic, $payload) = @_;
	return $node->safe_psql('postgres', "SELECT saga.publish('$topic', '$payload')");
}

sub dead_letter
{
	my ($id) = @_;
	my $row = $node->safe_psql('postgres', qq{
		SELECT row_to_json(d) FROM (
			SELECT attempts, last_status, last_error FROM saga.dead_letters WHERE message_id = '$id') d});
	return $row eq '' ? undef : decode_json($row);
}

sub wait_dead
{
	my ($id, $what) = @_;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM saga.dead_letters WHERE message_id = '$id'"),
		"$what: dead-lettered");
}

# ---------------------------------------------------------------- Retry-After
# The backoff is tiny, so only an honoured Retry-After explains a long gap.
create_destination('ra', "$base/retry-after/2",
	'{"max_attempts": 5, "backoff": "50ms", "max_backoff": "100ms"}', 'ra.*');
my $ra_id = publish('ra.x', '{"ra": 1}');

# ---------------------------------------------------------------- time-out
create_destination('hang', "$base/hang",
	'{"timeout": "1s", "max_attempts": 2, "backoff": "50ms", "max_backoff": "100ms"}', 'hang.*');
my $hang_id = publish('hang.x', '{"hang": 1}');

# ---------------------------------------------------------------- reset
create_destination('reset', "$base/reset",
	'{"max_attempts": 3, "backoff": "50ms", "max_backoff": "100ms"}', 'reset.*');
my $reset_id = publish('reset.x', '{"reset": 1}');

# ---------------------------------------------------------------- applied, then dropped
# the receiver applies the first request and drops the connection: the
# retry carries the same Idempotency-Key and body, so it can be deduplicated
create_destination('atd', "$base/apply-then-drop/x",
	'{"max_attempts": 5, "backoff": "50ms", "max_backoff": "100ms"}', 'atd.*');
my $atd_id = publish('atd.x', '{"atd": 1}');

# ---------------------------------------------------------------- backoff growth
create_destination('backoff', "$base/status/503",
	'{"max_attempts": 5, "backoff": "200ms", "max_backoff": "10s"}', 'backoff.*');
my $backoff_id = publish('backoff.x', '{"b": 1}');

# ---------------------------------------------------------------- refused
# a port nobody listens on (yet)
my $sock = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1)
  or die "cannot bind: $!";
my $closed_port = $sock->sockport;
close $sock;
create_destination('refused', "http://127.0.0.1:$closed_port/ok",
	'{"max_attempts": 1000, "backoff": "100ms", "max_backoff": "300ms", "timeout": "2s"}', 'refused.*');
my $refused_id = publish('refused.x', '{"refused": 1}');

ok($node->poll_query_until('postgres', qq{
	SELECT attempts >= 2 AND last_error IS NOT NULL AND last_status IS NULL
	FROM saga.outbox WHERE message_id = '$refused_id'}),
	'refused: retried, still pending, error recorded');
my $refused_error = $node->safe_psql('postgres',
	"SELECT last_error FROM saga.outbox WHERE message_id = '$refused_id'");
like($refused_error, qr/curl error 7\b/, 'refused: the error is a connection failure (curl error 7)');
like($refused_error, qr/connect/i, 'refused: the error says it could not connect');

# now the receiver appears on that port: the retries deliver the message
my $dir2 = PostgreSQL::Test::Utils::tempdir();
my $log2 = "$dir2/requests.jsonl";
my $rpid2 = fork();
if ($rpid2 == 0)
{
	exec('python3', "$FindBin::Bin/../http_receiver.py", '--log', $log2,
		'--port', $closed_port, '--port-file', "$dir2/port")
	  or die "cannot start receiver: $!";
}
my $started = 0;
for (1 .. 100)
{
	$started = 1, last if -e "$dir2/port";
	usleep(100_000);
}
SKIP:
{
	# the port was free a moment ago; something else may have taken it since
	skip 'could not start a receiver on the refused port', 3 unless $started;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$refused_id'"),
		'refused: delivered once the port accepts connections');
	my @r2 = requests_for($refused_id, $log2);
	is(scalar(@r2), 1, 'refused: the receiver got it once');
	is($r2[0]{status}, 200, 'refused: answered 200');
}

# ---------------------------------------------------------------- results
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$ra_id'"),
	'retry-after: delivered');
my @ra = requests_for($ra_id);
is_deeply([ map { $_->{status} } @ra ], [ 429, 200 ], 'retry-after: 429, then 200');
if (@ra == 2)
{
	my $gap = $ra[1]{time} - $ra[0]{time};
	cmp_ok($gap, '>=', 2 - 0.02, "retry-after: second request not before 2 s after the first (gap $gap)");
}

wait_dead($hang_id, 'hang');
my $d = dead_letter($hang_id);
is($d->{attempts}, 2, 'hang: both attempts used');
ok(!defined $d->{last_status}, 'hang: no HTTP status recorded');
like($d->{last_error}, qr/curl error 28\b/, 'hang: the error is a time-out (curl error 28)');
like($d->{last_error}, qr/time/i, 'hang: the error says it timed out');
my @hang = requests_for($hang_id);
is(scalar(@hang), 2, 'hang: the receiver saw two requests');
if (@hang == 2)
{
	my $gap = $hang[1]{time} - $hang[0]{time};
	cmp_ok($gap, '>=', 0.9, "hang: the retry came after the 1 s time-out (gap $gap)");
}

wait_dead($reset_id, 'reset');
$d = dead_letter($reset_id);
is($d->{attempts}, 3, 'reset: retried up to max_attempts');
ok(!defined $d->{last_status}, 'reset: no HTTP status recorded');
like($d->{last_error}, qr/curl error (52|55|56)\b/, 'reset: the error is a connection failure');
# libcurl resends a request once, on a fresh connection, when the kept-alive
# connection it reused turns out to be dead: each of the three attempts may
# reach the receiver twice (the Idempotency-Key is the same every time).
my $reset_seen = scalar(requests_for($reset_id));
ok($reset_seen >= 3 && $reset_seen <= 6, "reset: the receiver saw 3 to 6 requests for 3 attempts (saw $reset_seen)");

ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.queue WHERE message_id = '$atd_id'"),
	'apply-then-drop: delivered');
my @atd = requests_for($atd_id);
is_deeply([ map { $_->{status} } @atd ], [ 0, 200 ], 'apply-then-drop: dropped, then retried and answered 200');
is(scalar(grep { $_->{body} eq '{"atd": 1}' } @atd), 2, 'apply-then-drop: both requests carry the same body');

wait_dead($backoff_id, 'backoff');
my @b = requests_for($backoff_id);
is(scalar(@b), 5, 'backoff: five attempts');
# the n-th retry waits between half and all of 200ms * 2^(n-1)
for my $n (1 .. $#b)
{
	my $gap = $b[$n]{time} - $b[ $n - 1 ]{time};
	my $min = 0.1 * 2**($n - 1);
	cmp_ok($gap, '>=', $min - 0.01, sprintf('backoff: gap before attempt %d is at least %.1f s (%.3f)', $n + 1, $min, $gap));
}
kill 'TERM', $rpid, $rpid2;
$node->stop;
done_testing();
