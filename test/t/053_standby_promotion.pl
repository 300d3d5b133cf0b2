# On a streaming standby no saga launcher or worker runs and nothing is
# dispatched, even with messages pending in the replicated outbox; after
# promotion a launcher and a worker start and deliver them.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use SagaTest;

my $primary = saga_node('primary', init => { allows_streaming => 1 });
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($primary);

$primary->safe_psql('postgres', qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('sb.*', 'hook');
	CREATE TABLE committed_ids (id uuid PRIMARY KEY, phase text NOT NULL);
	INSERT INTO committed_ids
	SELECT saga.publish('sb.before', jsonb_build_object('n', g)), 'before'
	FROM generate_series(1, 5) g;
});
ok($primary->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'the primary delivers');

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;

# From now on nobody may deliver: the primary's worker is stopped (the
# setting is made after the backup, so the standby does not inherit it).
$primary->safe_psql('postgres',
	q{ALTER SYSTEM SET saga.databases = 'no_such_database'; SELECT pg_reload_conf()});
ok($primary->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'"),
	'the primary\'s worker is stopped');

$primary->safe_psql('postgres', q{
	INSERT INTO committed_ids
	SELECT saga.publish('sb.pending', jsonb_build_object('n', g)), 'pending'
	FROM generate_series(1, 20) g;
});
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM saga.queue WHERE status = 'pending'}),
	'20', 'the standby has the pending messages');

my $saga_procs = q{SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type LIKE 'saga%'};
ok(never($standby, $saga_procs, 3), 'no saga launcher or worker runs on the standby');
is($standby->safe_psql('postgres', q{SELECT string_agg(kind || ':' || state, ',') FROM saga.worker_status()}),
	'launcher:not running', 'worker_status() on the standby: launcher not running, no worker');
my @pending_ids = split /\n/,
  $standby->safe_psql('postgres', q{SELECT id FROM committed_ids WHERE phase = 'pending'});
is(scalar(@pending_ids), 20, 'the standby sees the committed ids');
is(scalar(arrived_count($log, \@pending_ids)), 0, 'nothing pending was dispatched meanwhile');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM saga.queue WHERE lease_until IS NOT NULL}),
	'0', 'and nothing is claimed');

# --- promotion
$primary->stop('fast');
$standby->promote;
ok($standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()'), 'the standby is promoted');
ok($standby->poll_query_until('postgres', q{
	SELECT count(*) = 2 FROM pg_stat_activity
	WHERE backend_type IN ('saga launcher', 'saga worker')}),
	'a launcher and a worker start on the promoted node');
ok($standby->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
	'the promoted node drains the outbox');
is(scalar(arrived_count($log, \@pending_ids)), 20, 'every pending message arrived');

my @before_ids = split /\n/,
  $standby->safe_psql('postgres', q{SELECT id FROM committed_ids WHERE phase = 'before'});
my %seen;
$seen{ $_->{headers}{'Idempotency-Key'} }++ for receiver_requests($log);
is(scalar(grep { ($seen{$_} // 0) == 1 } @before_ids), 5,
	'messages the primary delivered before the backup arrived once each, never again from the standby');

$standby->safe_psql('postgres', q{SELECT saga.publish('sb.after', '{"after": true}')});
ok(wait_for(sub { grep { $_->{body} =~ /"after": true/ } receiver_requests($log) }),
	'the promoted node delivers new messages');

$standby->stop('fast');
for my $n ($primary, $standby)
{
	unlike(slurp_file($n->logfile), qr/terminated by signal|PANIC|TRAP:/,
		'no process was terminated by a signal on ' . $n->name);
}
done_testing();

# The ids (of the given list) the receiver has seen.
sub arrived_count
{
	my ($log, $ids) = @_;
	my %seen = map { $_->{headers}{'Idempotency-Key'} => 1 } receiver_requests($log);
	return grep { $seen{$_} } @$ids;
}

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
