# Nothing is lost when the worker is killed with SIGKILL in the middle of
# delivering 10,000 HTTP messages (twice): after the crash restart the outbox
# drains, every committed message id reached the receiver at least once,
# nothing from a rolled-back transaction did, and nothing was dead-lettered.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;
use SagaCrash;

my $node = saga_node('crash_worker', conf => "restart_after_crash = on\n");
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('crash.*', 'hook');
	CREATE TABLE committed_ids (id uuid PRIMARY KEY);
});

# 10,000 committed messages in five transactions, with three rolled-back
# transactions in between; the ids of the rolled-back ones are kept aside.
my @rolled_back = publish_for_crash($node, 'crash.worker', 5, 2000, 3);
is($node->safe_psql('postgres', 'SELECT count(*) FROM committed_ids'), '10000',
	'10,000 messages committed');

# Kill the worker twice while deliveries are under way: once the receiver
# has seen 2,500 requests, and again at 6,000.
my $reader = { offset => 0, lines => 0 };
my @killed;
for my $round (1 .. 2)
{
	my $pid = worker_pid($node);
	ok($pid, "round $round: a saga worker runs (pid $pid)");
	my $moving = wait_for_lines($log, $reader, $round == 1 ? 2500 : 6000);
	my $pending = $node->safe_psql('postgres',
		q{SELECT count(*) FROM saga.queue WHERE status = 'pending'});
	ok($moving && $pending > 0,
		"round $round: the kill comes while deliveries are running ($pending pending, "
		  . $reader->{lines} . ' requests so far)');
	kill 'KILL', $pid or die "could not kill $pid: $!";
	push @killed, $pid;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $pid"),
		"round $round: a new worker runs after the crash restart");
}

ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'the outbox drains after the crashes');
is($node->safe_psql('postgres', 'SELECT count(*) FROM saga.dead_letters'), '0',
	'no dead letters');

my %committed = map { $_ => 1 } split /\n/,
  $node->safe_psql('postgres', 'SELECT id FROM committed_ids');
my %arrived;
$arrived{ $_->{headers}{'Idempotency-Key'} }++ for receiver_requests($log);

my @missing = grep { !$arrived{$_} } keys %committed;
is(scalar(@missing), 0, 'every committed message arrived at least once')
  or diag('missing, for example: ' . join(', ', @missing[ 0 .. ($#missing < 4 ? $#missing : 4) ]));
my @foreign = grep { !$committed{$_} } keys %arrived;
is(scalar(@foreign), 0, 'nothing arrived that was not committed');
is(scalar(grep { $arrived{$_} } @rolled_back), 0,
	'no id from a rolled-back transaction arrived');
my $dups = grep { $arrived{$_} > 1 } keys %arrived;
my $extra = 0;
$extra += $arrived{$_} - 1 for keys %arrived;
note("duplicates after two worker crashes: $dups ids delivered more than once, $extra extra requests");

# I8: the only crashes in the log are the ones this test caused
my $logtext = slurp_file($node->logfile);
like($logtext, qr/saga worker.*\(PID $_\) was terminated by signal 9/, "log shows the kill of $_")
  for @killed;
my @unexpected = grep { my $l = $_; !grep { $l =~ /\(PID $_\)/ } @killed }
  grep { /terminated by signal/ } split /\n/, $logtext;
is_deeply(\@unexpected, [], 'no other process was terminated by a signal');

$node->stop;
done_testing();

# The pid of the database's saga worker, from pg_stat_activity.
sub worker_pid
{
	my ($node) = @_;
	$node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'")
	  or return 0;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'");
}
