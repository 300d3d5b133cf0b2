# While HTTP requests hang, the worker holds no transaction, snapshot or lock
# other than its advisory lock: pg_stat_activity shows it idle without
# backend_xmin, pg_locks shows only the advisory lock, and VACUUM can remove
# rows deleted meanwhile.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;

# a long poll interval: between wake-ups the worker only waits on the sockets
my $node = saga_node('idle_wait', conf => "saga.poll_interval = 10min\n");
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('slow', 'http://127.0.0.1:$port/hang', '{"timeout": "30s"}');
	SELECT saga.subscribe('slow.*', 'slow');
	SELECT saga.create_destination('chan', 'notify:idle_wait');
	SELECT saga.subscribe('fast.*', 'chan');
	SELECT saga.publish('slow.test', jsonb_build_object('n', g)) FROM generate_series(1, 5) g;
});

ok(wait_for(sub { scalar(grep { $_->{path} eq '/hang' } receiver_requests($log)) >= 5 }),
	'five requests are hanging at the receiver');
ok($node->poll_query_until('postgres', q{
	SELECT in_flight = 5 FROM saga.worker_status() WHERE kind = 'worker'}),
	'the worker has five requests in flight');

my $state_sql = q{
	SELECT a.state, a.backend_xmin IS NULL, a.backend_xid IS NULL,
	       (SELECT string_agg(l.locktype || '/' || l.mode || '/' || l.granted, ',')
	        FROM pg_locks l WHERE l.pid = a.pid)
	FROM pg_stat_activity a WHERE a.backend_type = 'saga worker'};
my @samples;
for (1 .. 10)
{
	push @samples, $node->safe_psql('postgres', $state_sql);
	usleep(100_000);
}
is_deeply(\@samples, [ ('idle|t|t|advisory/ExclusiveLock/true') x 10 ],
	'while waiting the worker is idle, with no xmin, no xid and only its advisory lock');
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
	WHERE a.backend_type = 'saga worker' AND l.locktype = 'advisory'
	  AND l.classid = 1935763297 AND l.objid = 1 AND l.objsubid = 21319
	  AND l.database = (SELECT oid FROM pg_database WHERE datname = 'postgres')}),
	'1', 'the advisory lock is the database\'s worker lock');

# dead rows made while the requests hang: by the worker (NOTIFY deliveries
# delete their rows) and by another session
$node->safe_psql('postgres', q{
	SELECT saga.publish('fast.test', jsonb_build_object('n', g)) FROM generate_series(1, 100) g;
});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.queue WHERE topic = 'fast.test'}),
	'the worker delivers NOTIFY messages while the HTTP requests hang');
$node->safe_psql('postgres', q{
	INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at)
	SELECT gen_random_uuid(), 'chan', 'vac.test', '{}', now() + interval '1 day'
	FROM generate_series(1, 100);
	DELETE FROM saga.queue WHERE topic = 'vac.test';
});
my ($ret, $out, $err) = $node->psql('postgres', 'VACUUM (VERBOSE) saga.queue');
is($ret, 0, 'VACUUM runs');
my ($removed, $remain, $kept) =
  $err =~ /tuples: (\d+) removed, (\d+) remain, (\d+) are dead but not yet removable/;
ok(defined $kept && $kept == 0, 'no dead row is kept back by the waiting worker')
  or diag($err);
ok(defined $removed && $removed > 0, "VACUUM removed dead rows ($removed)");
is($node->safe_psql('postgres', q{SELECT in_flight FROM saga.worker_status() WHERE kind = 'worker'}),
	'5', 'the requests were still in flight');
is(scalar(grep { $_->{path} eq '/hang' } receiver_requests($log)), 5, 'and not yet retried');

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
