# A destination's "concurrency" caps its requests in flight: against an
# endpoint that never answers, at most that many requests are open at once,
# and the cap is reached. Another destination keeps flowing meanwhile.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('concurrency');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $timeout = 2;
sql(qq{
	SELECT saga.create_destination('slow', '$base/hang',
		'{"concurrency": 4, "timeout": "${timeout}s", "max_attempts": 1}');
	SELECT saga.subscribe('slow.*', 'slow');
	SELECT saga.create_destination('fast', '$base/ok/fast', '{"concurrency": 2}');
	SELECT saga.subscribe('fast.*', 'fast');
	CREATE FUNCTION sample_in_flight(n int) RETURNS int[] LANGUAGE plpgsql AS \$\$
	DECLARE
		r int[] := '{}';
	BEGIN
		FOR i IN 1..n LOOP
			r := r || (SELECT in_flight FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres');
			PERFORM pg_sleep(0.05);
		END LOOP;
		RETURN r;
	END \$\$;
});

sql(q{SELECT saga.publish('slow.e', jsonb_build_object('g', g)) FROM generate_series(1, 12) g});

ok($node->poll_query_until('postgres',
		q{SELECT in_flight = 4 FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres'}),
	'worker_status shows 4 requests in flight');

# sample while only the slow destination has work (spans a time-out round)
my $samples = sql('SELECT sample_in_flight(50)');
$samples =~ s/[{}]//g;
my @s = split /,/, $samples;
my ($peak) = sort { $b <=> $a } @s;
cmp_ok($peak, '<=', 4, "in_flight never above 4 in 50 samples (peak $peak)");

# while the slow requests hang, another destination is delivered
sql(q{SELECT saga.publish('fast.e', jsonb_build_object('g', g)) FROM generate_series(1, 30) g});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.queue WHERE destination = 'fast'}),
	'the other destination was delivered meanwhile');
cmp_ok(sql(q{SELECT count(*) FROM saga.outbox WHERE destination = 'slow'}), '>', 0,
	'... while slow messages were still waiting');
ok($node->poll_query_until('postgres', q{SELECT count(*) = 12 FROM saga.dead_letters WHERE destination = 'slow'}),
	'every slow message timed out and was dead-lettered');
$samples = sql('SELECT sample_in_flight(10)');
is($samples, '{0,0,0,0,0,0,0,0,0,0}', 'nothing in flight at the end');

# From the receiver's arrival times: a request to /hang stays open until the
# client's time-out, so five arrivals within less than the time-out would
# mean five requests open at once.
my @t = sort { $a <=> $b } map { $_->{time} } grep { $_->{path} eq '/hang' } receiver_requests($log);
is(scalar(@t), 12, 'the receiver saw each slow message once');
my $window = $timeout * 0.75;
my $max = 0;
for my $i (0 .. $#t)
{
	my $n = grep { $_ >= $t[$i] && $_ < $t[$i] + $window } @t;
	$max = $n if $n > $max;
}
is($max, 4, "at most (and at some point exactly) 4 requests arrived within ${window}s");

my @fast = grep { $_->{path} eq '/ok/fast' } receiver_requests($log);
is(scalar(@fast), 30, 'fast destination: 30 requests');

kill 'TERM', $rpid;
$node->stop;
done_testing();
