# Without shared_preload_libraries the extension still installs and
# publishes (the rows wait in saga.queue), no saga process runs, and
# saga.worker_status() returns nothing with a WARNING that says why.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = PostgreSQL::Test::Cluster->new('no_preload');
$node->init;
$node->start;

my ($ret, $out, $err) = $node->psql('postgres', 'CREATE EXTENSION saga');
if (!is($ret, 0, 'CREATE EXTENSION works without shared_preload_libraries'))
{
	diag($err);
	# nothing below can run without the extension
	$node->stop('fast');
	done_testing();
	exit;
}

$node->safe_psql('postgres', q{
	SELECT saga.create_destination('chan', 'notify:no_preload');
	SELECT saga.create_destination('hook', 'http://127.0.0.1:9/ok');
	SELECT saga.subscribe('np.*', 'chan');
	SELECT saga.subscribe('np.*', 'hook');
});
my $id = $node->safe_psql('postgres', q{
	BEGIN;
	SELECT saga.publish('np.test', '{"n": 1}');
	COMMIT;
});
like($id, qr/^[0-9a-f-]{36}$/, 'publish returns a message id');
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT saga.publish('np.test', '{"n": 2}');
	ROLLBACK;
});
is($node->safe_psql('postgres', q{
	SELECT string_agg(destination || ':' || status, ',' ORDER BY destination)
	FROM saga.queue WHERE message_id = '} . $id . q{'}),
	'chan:pending,hook:pending', 'the committed message waits in saga.queue, one row per destination');
is($node->safe_psql('postgres', 'SELECT count(*) FROM saga.queue'), '2',
	'nothing from the rolled-back transaction');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.outbox}), '2',
	'saga.outbox shows both deliveries');

($ret, $out, $err) = $node->psql('postgres', 'SELECT count(*) FROM saga.worker_status()');
is($ret, 0, 'worker_status() does not fail');
is($out, '0', 'worker_status() returns no rows');
like($err, qr/WARNING:  .*saga is not in shared_preload_libraries/,
	'and warns that saga is not in shared_preload_libraries');

is($node->safe_psql('postgres', q{
	SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'saga%'}),
	'0', 'no saga launcher or worker runs');

($ret, $out, $err) = $node->psql('postgres',
	q{SELECT value FROM saga.metrics() WHERE name = 'outbox_pending' AND labels->>'destination' = 'chan'});
is($out, '1', 'metrics() counts the pending message');

# the message stays where it is: no process delivers it
sleep 1;
is($node->safe_psql('postgres', 'SELECT count(*) FROM saga.queue'), '2',
	'the messages are still pending a second later');

$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/,
	'no process was terminated by a signal');
done_testing();
