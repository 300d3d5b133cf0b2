# Only one process dispatches for a database: the worker holds the
# database's worker lock while it runs. The lock is of an advisory class that
# SQL cannot name, so no role can take it and keep the worker from starting.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('one_dispatcher');
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);
$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('one.*', 'hook');
	CREATE ROLE mallory LOGIN;
});
my $first = worker_pid($node);

is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM pg_locks
	WHERE pid = $first AND locktype = 'advisory' AND granted
	  AND classid = 1935763297 AND objid = 1 AND objsubid = 21319}),
	'1', 'the running worker holds the worker lock');

# a plain role takes the advisory locks SQL can name with the same keys,
# then the worker is replaced: the new one must not be held up
my $other = $node->background_psql('postgres');
$other->query_safe('SET ROLE mallory');
is($other->query_safe('SELECT pg_try_advisory_lock(1935763297, 1)'), 't',
	'the two-key advisory lock with the worker keys is a different lock');
is($other->query_safe('SELECT pg_try_advisory_lock((1935763297::int8 << 32) | 1)'), 't',
	'so is the one-key advisory lock');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($first)");
ok($node->poll_query_until('postgres', qq{
	SELECT count(*) = 1 FROM saga.worker_status()
	WHERE kind = 'worker' AND pid <> $first AND state IN ('idle', 'dispatching')}),
	'a new worker starts although a role holds those locks');
my $second = worker_pid($node);
isnt($second, $first, 'it is a new process');

$node->safe_psql('postgres', q{
	SELECT saga.publish('one.test', jsonb_build_object('n', g)) FROM generate_series(1, 3) g;
});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'and it delivers');
my %keys;
$keys{ $_->{headers}{'Idempotency-Key'} }++ for receiver_requests($log);
is_deeply([ sort values %keys ], [ 1, 1, 1 ], 'each message arrived once');
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM pg_locks
	WHERE locktype = 'advisory' AND granted AND objsubid = 21319}),
	'1', 'exactly one process holds the worker lock');

$other->quit;
$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/,
	'no process was terminated by a signal');
done_testing();

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker'");
}
