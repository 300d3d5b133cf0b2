# The worker's lifecycle: it shows up in saga.worker_status() and
# pg_stat_activity, keeps its pid across a configuration reload while
# applying saga.poll_interval and saga.databases, leaves and comes back when
# saga.databases excludes and includes its database, is replaced after
# pg_terminate_backend, and shuts down without being reported as a crash.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use SagaTest;

my $node = saga_node('lifecycle');
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('life.*', 'hook');
});

# --- visible in saga.worker_status() and pg_stat_activity
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM saga.worker_status() w
	JOIN pg_stat_activity a ON a.pid = w.pid
	WHERE w.kind = 'worker' AND w.database = 'postgres'
	  AND a.backend_type = 'saga worker' AND a.datname = 'postgres'}),
	'1', 'the worker is in worker_status() and in pg_stat_activity as "saga worker"');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM saga.worker_status() w
	JOIN pg_stat_activity a ON a.pid = w.pid
	WHERE w.kind = 'launcher' AND w.state = 'running' AND a.backend_type = 'saga launcher'}),
	'1', 'the launcher is in worker_status() and in pg_stat_activity as "saga launcher"');
is($node->safe_psql('postgres', q{
	SELECT string_agg(backend_type, ',' ORDER BY backend_type) FROM pg_stat_activity
	WHERE backend_type LIKE 'saga%'}),
	'saga launcher,saga worker', 'one launcher and one worker run');

my $worker = worker_pid($node);
my $launcher = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga launcher'");
ok(delivered($node, $log, 'first'), 'the worker delivers');

# --- reload: same pid, new saga.poll_interval
$node->safe_psql('postgres', q{ALTER SYSTEM SET saga.poll_interval = '1h'; SELECT pg_reload_conf()});
# with a 200ms poll the worker cycles five times a second even when idle
ok($node->poll_query_until('postgres', q{
	SELECT last_cycle_at < now() - interval '1.5 s' FROM saga.worker_status()
	WHERE kind = 'worker'}),
	'after the reload the idle worker stops cycling every 200ms');
my $last_cycle = $node->safe_psql('postgres',
	"SELECT last_cycle_at FROM saga.worker_status() WHERE kind = 'worker'");
# a row written without saga.publish() wakes nobody: only the timer finds it
$node->safe_psql('postgres', raw_insert('raw1'));
sleep 2;
is($node->safe_psql('postgres',
		"SELECT last_cycle_at FROM saga.worker_status() WHERE kind = 'worker'"),
	$last_cycle, 'no cycle for 2 seconds with saga.poll_interval = 1h');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.queue WHERE payload->>'tag' = 'raw1'}),
	'1', 'the unannounced row waits for the timer');
is(worker_pid($node), $worker, 'the worker kept its pid across the reload');

$node->safe_psql('postgres', q{ALTER SYSTEM SET saga.poll_interval = '300ms'; SELECT pg_reload_conf()});
ok(arrived($log, 'raw1'), 'the reload woke the worker, which found the waiting row');
$node->safe_psql('postgres', raw_insert('raw2'));
ok(arrived($log, 'raw2'), 'with saga.poll_interval = 300ms the timer finds an unannounced row');
is(worker_pid($node), $worker, 'the worker kept its pid across the second reload');

# --- saga.databases: a list that still names the database keeps the worker
$node->safe_psql('postgres', q{ALTER SYSTEM SET saga.databases = 'other, postgres'; SELECT pg_reload_conf()});
sleep 1;
is(worker_pid($node), $worker, 'a saga.databases list that names the database keeps the worker');
ok(delivered($node, $log, 'listed'), 'and it still delivers');

# ... one that does not name it stops the worker
$node->safe_psql('postgres', q{ALTER SYSTEM SET saga.databases = 'other'; SELECT pg_reload_conf()});
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'}),
	'excluding the database stops its worker');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.worker_status() WHERE kind = 'worker'}),
	'0', 'worker_status() shows no worker');
$node->safe_psql('postgres', q{SELECT saga.publish('life.test', '{"tag": "excluded"}')});
ok(never($node, q{SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'}, 2),
	'no worker comes back while the database is excluded');
ok(!arrived($log, 'excluded', 0), 'nothing is delivered while the database is excluded');
is($node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga launcher'"),
	$launcher, 'the launcher kept its pid');

# ... and including it again starts a new one
$node->safe_psql('postgres', q{ALTER SYSTEM RESET saga.databases; SELECT pg_reload_conf()});
wait_for_worker($node);
my $worker2 = worker_pid($node);
isnt($worker2, $worker, "a new worker runs once the database is included again ($worker2)");
ok(arrived($log, 'excluded'), 'the message published meanwhile is delivered');

# --- pg_terminate_backend: the launcher starts a new worker
$node->safe_psql('postgres', "SELECT pg_terminate_backend($worker2)");
ok($node->poll_query_until('postgres', qq{
	SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $worker2}),
	'a new worker comes back after pg_terminate_backend');
my $worker3 = worker_pid($node);
ok(delivered($node, $log, 'after_terminate'), 'and delivery continues');

# --- clean shutdown and start
$node->stop('fast');
$node->start;
wait_for_worker($node);
ok(delivered($node, $log, 'after_restart'), 'after a fast shutdown and start the worker delivers');
$node->stop('smart');

my $logtext = slurp_file($node->logfile);
like($logtext, qr/background worker "saga worker" \(PID $worker2\) exited with exit code 1/,
	'the terminated worker exited with code 1');
unlike($logtext, qr/terminated by signal|was terminated|PANIC|TRAP:/,
	'no process was reported terminated by a signal');
is(scalar(() = $logtext =~ /saga worker started/g), 4, q{four worker starts: initial, re-included, after termination, after restart});

done_testing();

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker'");
}

sub raw_insert
{
	my ($tag) = @_;
	return qq{INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at)
		VALUES (gen_random_uuid(), 'hook', 'life.raw', '{"tag": "$tag"}', now())};
}

# Publish a message and wait until the receiver got it.
sub delivered
{
	my ($node, $log, $tag) = @_;
	$node->safe_psql('postgres', qq{SELECT saga.publish('life.test', '{"tag": "$tag"}')});
	return arrived($log, $tag);
}

# Whether a request whose body carries the tag reached the receiver,
# waiting up to $wait seconds (the default time-out unless given).
sub arrived
{
	my ($log, $tag, $wait) = @_;
	$wait //= $PostgreSQL::Test::Utils::timeout_default;
	for (my $i = 0;; $i++)
	{
		return 1 if grep { $_->{body} =~ /"tag": "\Q$tag\E"/ } receiver_requests($log);
		return 0 if $i >= 10 * $wait;
		usleep(100_000);
	}
}

# True if the query never returns true during $seconds of sampling.
sub never
{
	my ($node, $sql, $seconds) = @_;
	my $end = time() + $seconds;
	while (time() < $end)
	{
		return 0 if $node->safe_psql('postgres', $sql) eq 't';
		usleep(100_000);
	}
	return 1;
}
