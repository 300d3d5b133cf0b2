# Nothing is lost when the server is stopped with "pg_ctl stop -m immediate"
# while HTTP deliveries are running: after it is started again the outbox
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

my $node = saga_node('crash_immediate');
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('crash.*', 'hook');
	CREATE TABLE committed_ids (id uuid PRIMARY KEY);
});

# 4,000 committed messages in four transactions, with two rolled-back
# transactions in between whose ids are kept aside.
my @rolled_back = publish_for_crash($node, 'crash.immediate', 4, 1000, 2);

my $reader = { offset => 0, lines => 0 };
my $worker = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker'");
ok($worker, "a saga worker runs (pid $worker)");
# strike once the receiver has seen a quarter of the messages
my $moving = wait_for_lines($log, $reader, 1000);
my $pending = $node->safe_psql('postgres',
	q{SELECT count(*) FROM saga.queue WHERE status = 'pending'});
ok($moving && $pending > 0,
	"the stop comes while deliveries are running ($pending pending, $reader->{lines} requests so far)");

$node->stop('immediate');
$node->start;

ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $worker"),
	'a new worker runs after the restart');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'the outbox drains after the restart');
is($node->safe_psql('postgres', 'SELECT count(*) FROM saga.dead_letters'), '0',
	'no dead letters');

check_nothing_lost($node, $log, \@rolled_back, 4000, 'immediate stop');

my @unexpected = grep { /terminated by signal/ } split /\n/, slurp_file($node->logfile);
is_deeply(\@unexpected, [], 'no process was reported terminated by a signal');

$node->stop;
done_testing();
