# The launcher itself can be terminated: the postmaster starts a new one,
# which must take over the running workers (or replace them) rather than
# start a second worker for each database, and must still manage them:
# saga.databases stops them, DROP DATABASE gets them out of the way.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use SagaTest;

my $node = saga_node('launcher_restart');
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);
$node->safe_psql('postgres', 'CREATE DATABASE other');
$node->safe_psql('other', 'CREATE EXTENSION saga');
wait_for_worker($node, 'other');
$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('lr.*', 'hook');
});

my $launcher = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga launcher'");

$node->safe_psql('postgres', "SELECT pg_terminate_backend($launcher)");
# the launcher is a static background worker with a restart interval of 5s
ok($node->poll_query_until('postgres', qq{
	SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga launcher' AND pid <> $launcher}),
	'a new launcher starts');
ok($node->poll_query_until('postgres', qq{
	SELECT pid <> $launcher AND state = 'running' FROM saga.worker_status() WHERE kind = 'launcher'}),
	'worker_status() shows the new launcher');

# give the new launcher time for its first scans
my $most = 0;
my $end = time() + 3;
while (time() < $end)
{
	my $n = $node->safe_psql('postgres', q{
		SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM pg_stat_activity
		WHERE backend_type = 'saga worker' GROUP BY datname) s});
	$most = $n if $n > $most;
	usleep(100_000);
}
is($most, 1, 'still one worker process per database');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.worker_status() WHERE kind = 'worker'}),
	'2', 'worker_status() lists one worker for each of the two databases');

$node->safe_psql('postgres', q{SELECT saga.publish('lr.test', '{"tag": "after launcher restart"}')});
ok(wait_for(sub { grep { $_->{body} =~ /after launcher restart/ } receiver_requests($log) }),
	'delivery continues');

# the new launcher manages the workers it inherited (waits of at most 30s,
# generous for what takes well under a second: a worker that nobody manages
# any more would keep them waiting to no end)
{
	my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE other');
	is($ret, 0, 'DROP DATABASE of a database whose worker started before the launcher restart')
	  or diag($err);

	$node->safe_psql('postgres',
		q{ALTER SYSTEM SET saga.databases = 'no_such_database'; SELECT pg_reload_conf()});
	ok(wait_sql($node, q{
		SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'}),
		'excluding the database stops its worker');
	$node->safe_psql('postgres', q{ALTER SYSTEM RESET saga.databases; SELECT pg_reload_conf()});
	ok(wait_sql($node, q{
		SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker'}),
		'including it again starts one');
}

$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/,
	'no process was terminated by a signal');
done_testing();

sub wait_for
{
	my ($cond) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if $cond->();
		usleep(100_000);
	}
	return 0;
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
