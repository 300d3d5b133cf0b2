# The worker vacuums saga.queue itself after deleting many delivered rows,
# so the table does not wait for autovacuum's next round to be reused.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

# autovacuum off: any vacuum of the queue is the worker's
my $node = saga_node('queue_vacuum', conf => "autovacuum = off\n");
wait_for_worker($node);
$node->safe_psql('postgres', q{
	SELECT saga.create_destination('chan', 'notify:vacuum_test');
	SELECT saga.subscribe('v.*', 'chan');
});
is($node->safe_psql('postgres',
	"SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'saga.queue'::regclass"),
	'0', 'the queue has not been vacuumed yet');

$node->safe_psql('postgres', q{
	SELECT count(saga.publish('v.e', jsonb_build_object('n', g))) FROM generate_series(1, 30000) g;
});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'30,000 messages delivered');
ok($node->poll_query_until('postgres',
	"SELECT vacuum_count >= 1 FROM pg_stat_user_tables WHERE relid = 'saga.queue'::regclass"),
	'the worker vacuumed the queue after deleting them');
ok($node->poll_query_until('postgres',
	"SELECT n_dead_tup < 30000 FROM pg_stat_user_tables WHERE relid = 'saga.queue'::regclass"),
	'and fewer dead rows are left than were deleted');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'saga worker'"),
	'1', 'the worker is still running');

$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/, 'no crash');
done_testing();
