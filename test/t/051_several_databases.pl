# Several databases in one cluster: one worker per database that has the
# extension, none (for long) in a database without it; DROP EXTENSION makes
# the worker leave for good, CREATE EXTENSION brings one back at once, and
# DROP DATABASE / CREATE DATABASE ... TEMPLATE work while a worker runs.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use SagaTest;

# a crashing worker must fail the log check below, not end the test early
my $node = saga_node('several_dbs', conf => "restart_after_crash = on\n");
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

$node->safe_psql('postgres', 'CREATE DATABASE a');
$node->safe_psql('postgres', 'CREATE DATABASE b');
$node->safe_psql('postgres', 'CREATE DATABASE c');
for my $db (qw(a b))
{
	$node->safe_psql($db, qq{
		CREATE EXTENSION saga;
		SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
		SELECT saga.subscribe('multi.*', 'hook');
	});
}
$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('multi.*', 'hook');
});

ok($node->poll_query_until('postgres', q{
	SELECT string_agg(datname || ':' || n, ',' ORDER BY datname) FROM (
	  SELECT datname, count(*) AS n FROM pg_stat_activity
	  WHERE backend_type = 'saga worker' GROUP BY datname) s},
		'a:1,b:1,postgres:1'),
	'one worker in each database that has the extension, none in c');
is($node->safe_psql('postgres', q{
	SELECT string_agg(w.database, ',' ORDER BY w.database) FROM saga.worker_status() w
	JOIN pg_stat_activity s ON s.pid = w.pid AND s.datname = w.database
	WHERE w.kind = 'worker' AND s.backend_type = 'saga worker'}),
	'a,b,postgres', 'worker_status() lists the same workers');
ok(never($node, q{SELECT count(*) > 0 FROM pg_stat_activity
	WHERE backend_type = 'saga worker' AND datname = 'c'}, 2),
	'the database without the extension gets no lasting worker');

for my $db (qw(a b postgres))
{
	$node->safe_psql($db, qq{SELECT saga.publish('multi.test', '{"db": "$db"}')});
	ok(arrived($log, qq{"db": "$db"}), "the worker of $db delivers its message");
}

my %pid = map { $_ => worker_pid($node, $_) } qw(a b postgres);

# --- DROP EXTENSION: the worker leaves and is not restarted
$node->safe_psql('a', 'DROP EXTENSION saga');
# (at most 30s, generous for what takes under a second, so that a stuck
# worker fails the test quickly)
ok(wait_sql($node, q{
	SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'a'}),
	'DROP EXTENSION makes the worker of that database leave');
ok(never($node, q{SELECT count(*) > 0 FROM pg_stat_activity
	WHERE backend_type = 'saga worker' AND datname = 'a'}, 3),
	'and no worker comes back to it over many poll intervals');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.worker_status() WHERE database = 'a'}),
	'0', 'worker_status() no longer lists it');
is(worker_pid($node, 'b'), $pid{b}, 'the worker of b is untouched');

# --- CREATE EXTENSION again: a worker comes back without waiting for a recheck
$node->safe_psql('a', qq{
	CREATE EXTENSION saga;
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('multi.*', 'hook');
});
# (the launcher's own recheck of databases without the extension comes only
# every five minutes, longer than the time-out of this wait)
my $t0 = time();
ok(eval { wait_for_worker($node, 'a'); 1 }, 'CREATE EXTENSION brings a worker back');
note(sprintf('the worker came back %.1fs after CREATE EXTENSION', time() - $t0));
isnt(worker_pid($node, 'a'), $pid{a}, 'it is a new worker');
$node->safe_psql('a', q{SELECT saga.publish('multi.test', '{"db": "a", "again": true}')});
ok(arrived($log, qq{"again": true}), 'and it delivers');

# --- DROP DATABASE while its worker runs, without FORCE
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE b');
is($ret, 0, 'DROP DATABASE of a database with a running worker succeeds');
is($err, '', 'without an error') or diag($err);
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 0 FROM saga.worker_status() WHERE kind = 'worker' AND (database IS NULL OR database = 'b')}),
	'its worker is gone from worker_status()');
ok(never($node, q{SELECT count(*) > 0 FROM pg_stat_activity
	WHERE backend_type = 'saga worker' AND datname IS DISTINCT FROM 'a' AND datname IS DISTINCT FROM 'postgres'}, 2),
	'no worker is started for the dropped database');
is(worker_pid($node, 'postgres'), $pid{postgres}, 'the worker of postgres is untouched');

# --- CREATE DATABASE ... TEMPLATE a database with a running worker
($ret, $out, $err) = $node->psql('postgres', 'CREATE DATABASE d TEMPLATE a');
is($ret, 0, 'CREATE DATABASE ... TEMPLATE of a database with a running worker succeeds')
  or diag($err);
ok(eval { wait_for_worker($node, 'a'); 1 }, 'the template database gets its worker back');
ok(eval { wait_for_worker($node, 'd'); 1 }, 'the copy, which has the extension, gets a worker');

is($node->safe_psql('postgres', q{
	SELECT count(*) FROM (SELECT database FROM saga.worker_status() WHERE kind = 'worker'
	GROUP BY database HAVING count(*) > 1) s}),
	'0', 'never two workers for one database');

$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/,
	'no process was reported terminated by a signal');

done_testing();

sub worker_pid
{
	my ($node, $db) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = '$db'");
}

# Whether a request whose body contains $text reached the receiver.
sub arrived
{
	my ($log, $text) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if grep { index($_->{body}, $text) >= 0 } receiver_requests($log);
		usleep(100_000);
	}
	return 0;
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

# Poll until the query returns true, for at most 30 seconds.
sub wait_sql
{
	my ($node, $sql) = @_;
	my $end = time() + 30;
	while (time() < $end)
	{
		my ($ret, $out) = $node->psql('postgres', $sql);
		return 1 if $ret == 0 && $out eq 't';
		usleep(100_000);
	}
	return 0;
}
