# Committed messages reach a real HTTP receiver once each; rolled-back ones never.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('smoke');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);

$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('order.*', 'hook');
});
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT saga.publish('order.placed', jsonb_build_object('n', g)) FROM generate_series(1, 100) g;
	COMMIT;
	BEGIN;
	SELECT saga.publish('order.placed', jsonb_build_object('rolled_back', g)) FROM generate_series(1, 50) g;
	ROLLBACK;
});
my $ids = $node->safe_psql('postgres', q{SELECT 1});

ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.outbox}),
	'outbox drains');
my @reqs = receiver_requests($log);
my %keys = map { $_->{headers}{'Idempotency-Key'} => 1 } @reqs;
is(scalar(keys %keys), 100, 'every committed message arrived');
is(scalar(grep { $_->{body} =~ /rolled_back/ } @reqs), 0, 'nothing from the rolled-back transaction');
is((grep { $_->{headers}{'Saga-Topic'} eq 'order.placed' } @reqs), scalar(@reqs), 'Saga-Topic header set');

kill 'TERM', $rpid;
$node->stop;
done_testing();
