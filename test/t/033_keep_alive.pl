# Connections are kept alive between requests and reused, and a kept-alive
# connection that the server closes while the worker is idle is forgotten:
# the worker does not spin on it, and the next messages go out on new
# connections.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('keep_alive');
# the receiver closes a connection after it has been idle for half a second
my ($port, $log, $rpid) = start_receiver('--idle-timeout', '0.5');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{
	SELECT saga.create_destination('ka', 'http://127.0.0.1:$port/ok/ka', '{"concurrency": 2}');
	SELECT saga.subscribe('ka.*', 'ka');
});
my $worker = sql(q{SELECT pid FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres'});

sub worker_cpu_seconds
{
	my @f = split ' ', (split /\)/, PostgreSQL::Test::Utils::slurp_file("/proc/$worker/stat"))[1];
	return ($f[11] + $f[12]) / 100;    # utime + stime, in USER_HZ ticks
}

# Publish n messages in one transaction, wait until they are delivered, and
# return the client ports of the requests that carried them.
sub deliver
{
	my ($n, $what) = @_;
	my %ids = map { $_ => 1 } split /\n/, sql(qq{
		SELECT saga.publish('ka.e', jsonb_build_object('g', g)) FROM generate_series(1, $n) g});
	ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.outbox WHERE destination = 'ka'"),
		"$what: delivered");
	my @mine = grep { $ids{ lc(request_header($_, 'Idempotency-Key') // '') } } receiver_requests($log);
	my %keys = map { lc(request_header($_, 'Idempotency-Key')) => 1 } @mine;
	is(scalar(keys %keys), $n, "$what: the receiver got all $n messages");
	return map { $_->{client_port} } @mine;
}

my @first = deliver(40, 'first batch');
my %first_ports = map { $_ => 1 } @first;
cmp_ok(scalar(keys %first_ports), '<=', 4,
	'first batch: 40 requests over at most 4 connections (kept alive, concurrency 2)');

# the receiver closes both connections while they sit in libcurl's cache
sleep(2);
my $cpu0 = worker_cpu_seconds();
sleep(2);
my $spent = worker_cpu_seconds() - $cpu0;
cmp_ok($spent, '<', 0.5, "an idle worker with closed connections uses no CPU (${spent} s in 2 s)");

my @second = deliver(40, 'second batch');
is(scalar(grep { $first_ports{$_} } @second), 0, 'second batch: only new connections');
is(sql(q{SELECT count(*) FROM saga.dead_letters}), '0', 'no dead letters');

# many idle periods in a row: connections closed and replaced each time
for my $round (1 .. 3)
{
	usleep(800_000);
	deliver(5, "round $round after an idle period");
}

kill 'TERM', $rpid;
$node->stop;
done_testing();
