# A worker killed with SIGKILL in the middle of a NOTIFY dispatch loses
# nothing: a LISTEN client that reconnects after the crash restart ends up
# with every committed message id, and with none from a rolled-back
# transaction.
#
# NOTIFY is not durable, so the listener must be listening whenever the
# worker commits a dispatch. To make that so across the crash, the worker is
# held up by a prepared transaction that keeps a row in the middle of the
# queue locked (FOR SHARE): the dispatch that reaches it waits, the test
# kills the worker while it waits, the lock survives the crash restart, and
# the test lets the new worker go on only once the listener is back.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('crash_notify', conf => qq{
restart_after_crash = on
max_prepared_transactions = 5
saga.batch_size = 200
});
wait_for_worker($node);

$node->safe_psql('postgres', q{
	SELECT saga.create_destination('chan', 'notify:saga_crash');
	SELECT saga.subscribe('note.*', 'chan');
	CREATE TABLE committed_ids (id uuid PRIMARY KEY);
});

# Hold the worker back while the messages are published, so that the
# dispatch is sure to be under way when the worker is killed.
$node->safe_psql('postgres', q{ALTER SYSTEM SET saga.databases = 'no_such_database'; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'"),
	'worker stopped while saga.databases excludes the database');

my @rolled_back;
for my $t (1 .. 5)
{
	$node->safe_psql('postgres', qq{
		INSERT INTO committed_ids
		SELECT saga.publish('note.crash', jsonb_build_object('t', $t, 'n', g))
		FROM generate_series(1, 1000) g;
	});
	next if $t > 2;
	push @rolled_back, split /\n/, $node->safe_psql('postgres', qq{
		BEGIN;
		SELECT saga.publish('note.crash', jsonb_build_object('rolled_back', $t, 'n', g))
		FROM generate_series(1, 200) g;
		ROLLBACK;
	});
}
is(scalar(@rolled_back), 400, 'rolled-back publishes returned their ids');

# the gate: the 2,500th message of the queue, locked by a prepared transaction
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT 1 FROM saga.queue WHERE seq = (SELECT seq FROM saga.queue ORDER BY seq OFFSET 2499 LIMIT 1) FOR SHARE;
	PREPARE TRANSACTION 'gate';
});

my $l = listener_start($node);
ok(listener_wait($l, sub { $l->{listening} }), 'the listener is listening');

$node->safe_psql('postgres', q{ALTER SYSTEM RESET saga.databases; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
	WHERE a.backend_type = 'saga worker' AND NOT l.granted}),
	'the worker dispatches and waits at the gate');
my $left = $node->safe_psql('postgres', 'SELECT count(*) FROM saga.queue');
ok($left > 0 && $left < 5000, "deliveries are under way ($left of 5000 left)");
ok(listener_wait($l, sub { scalar(keys %{ $l->{ids} }) >= 5000 - $left }),
	'the listener received every message whose dispatch committed');

my $pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker'");
kill 'KILL', $pid or die "could not kill $pid: $!";

ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $pid"),
	'a new worker runs after the crash restart');
ok(listener_wait($l, sub { $l->{connects} >= 2 && $l->{listening} }),
	'the listener reconnected and listens again');
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
	WHERE a.backend_type = 'saga worker' AND NOT l.granted}),
	'the new worker waits at the gate, which survived the crash');

$node->safe_psql('postgres', q{COMMIT PREPARED 'gate'});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'the outbox drains');

my %committed = map { $_ => 1 } split /\n/,
  $node->safe_psql('postgres', 'SELECT id FROM committed_ids');
is(scalar(keys %committed), 5000, '5000 messages committed');
ok(listener_wait($l, sub { !grep { !$l->{ids}{$_} } keys %committed }),
	'the listener ended up with every committed id')
  or diag('missing: ' . scalar(grep { !$l->{ids}{$_} } keys %committed));
is(scalar(grep { !$committed{$_} } keys %{ $l->{ids} }), 0,
	'the listener got nothing that was not committed');
is(scalar(grep { $l->{ids}{$_} } @rolled_back), 0,
	'no id from a rolled-back transaction was notified');
my $dups = grep { $l->{ids}{$_} > 1 } keys %{ $l->{ids} };
note("notified more than once: $dups ids; listener connections: $l->{connects}");

my $logtext = slurp_file($node->logfile);
like($logtext, qr/saga worker.*\(PID $pid\) was terminated by signal 9/, 'log shows the kill');
my @unexpected = grep { !/\(PID $pid\)/ } grep { /terminated by signal/ } split /\n/, $logtext;
is_deeply(\@unexpected, [], 'no other process was terminated by a signal');

listener_stop($l);
$node->stop;
done_testing();

# A LISTEN client: psql reading commands from a pipe. Notifications are
# printed when a command completes, so the client runs "SELECT 1" whenever
# it is polled; when the connection is lost it connects again.
sub listener_start
{
	my ($node) = @_;
	my $l = { node => $node, ids => {}, connects => 0, listening => 0 };
	listener_connect($l);
	return $l;
}

sub listener_connect
{
	my ($l) = @_;
	@$l{qw(in out err)} = ('', '', '');
	$l->{listening} = 0;
	$l->{h} = IPC::Run::start(
		[ 'psql', '-XAtq', '-d', $l->{node}->connstr('postgres') ],
		'<', \$l->{in}, '>', \$l->{out}, '2>', \$l->{err});
	$l->{in} .= "LISTEN saga_crash;\nSELECT 'listening';\n";
	$l->{connects}++;
}

# Read what the client printed; reconnect if it has lost its connection.
sub listener_poll
{
	my ($l) = @_;
	my $alive = eval { $l->{h}->pump_nb; 1 } && $l->{h}->pumpable;
	while ($l->{out} =~ s/^([^\n]*)\n//)
	{
		my $line = $1;
		if ($line eq 'listening')
		{
			$l->{listening} = 1;
		}
		elsif ($line =~ /^Asynchronous notification "saga_crash" with payload "(.*)" received from server process/)
		{
			my $payload = $1;
			$l->{ids}{$1}++ if $payload =~ /"id": "([0-9a-f-]{36})"/;
		}
	}
	if (!$alive)
	{
		eval { $l->{h}->kill_kill };
		usleep(20_000);
		listener_connect($l);
		return;
	}
	$l->{in} .= "SELECT 1;\n" if $l->{in} eq '';
}

# Poll the client until the condition holds; false on time-out.
sub listener_wait
{
	my ($l, $cond) = @_;
	for (1 .. 50 * $PostgreSQL::Test::Utils::timeout_default)
	{
		listener_poll($l);
		return 1 if $cond->();
		usleep(20_000);
	}
	return 0;
}

sub listener_stop
{
	my ($l) = @_;
	$l->{in} .= "\\q\n";
	eval { $l->{h}->finish };
}
