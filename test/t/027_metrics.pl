# saga.metrics(): the counters match what happened in a small scenario with
# deliveries, retries, dead letters and rolled-back publishes.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('metrics', conf => "max_prepared_transactions = 4\n");
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";

sub sql { return $node->safe_psql('postgres', $_[0]); }

# metric name (and destination label, if any) => value
sub metrics
{
	my %m;
	for my $line (split /\n/, sql(q{SELECT name, coalesce(labels->>'destination', ''), value FROM saga.metrics()}))
	{
		my ($name, $dest, $value) = split /\|/, $line;
		$m{ $dest eq '' ? $name : "$name/$dest" } = $value;
	}
	return %m;
}

my %before = metrics();
for my $c (qw(published delivered retried dead_lettered))
{
	ok(exists $before{"messages_${c}_total"}, "metric messages_${c}_total exists");
}

sql(qq{
	SELECT saga.create_destination('ok', '$base/ok', '{}');
	SELECT saga.subscribe('ok.*', 'ok');
	SELECT saga.create_destination('flaky', '$base/flaky/2/m', '{"max_attempts": 5, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.subscribe('flaky.*', 'flaky');
	SELECT saga.create_destination('bad', '$base/status/400', '{"max_attempts": 5, "backoff": "50ms"}');
	SELECT saga.subscribe('bad.*', 'bad');
	SELECT saga.create_destination('down', '$base/status/500', '{"max_attempts": 3, "backoff": "50ms", "max_backoff": "100ms"}');
	SELECT saga.subscribe('down.*', 'down');
	SELECT saga.create_destination('ev', 'notify:metrics_events');
	SELECT saga.subscribe('ev.*', 'ev');
});

# 8 committed messages; 3 rolled back by ROLLBACK, 2 by ROLLBACK TO SAVEPOINT
sql(q{
	BEGIN;
	SELECT saga.publish('ok.x', jsonb_build_object('g', g)) FROM generate_series(1, 3) g;
	SELECT saga.publish('flaky.x', '{}');
	SELECT saga.publish('bad.x', '{}');
	SELECT saga.publish('down.x', '{}');
	SELECT saga.publish('ev.x', jsonb_build_object('g', g)) FROM generate_series(1, 2) g;
	COMMIT;
	BEGIN;
	SELECT saga.publish('ok.rolled_back', jsonb_build_object('g', g)) FROM generate_series(1, 3) g;
	ROLLBACK;
});
my %m1 = metrics();
is($m1{messages_published_total} - $before{messages_published_total}, 8,
	'published counts the 8 committed messages, not the rolled-back ones');
sql(q{
	BEGIN;
	SAVEPOINT s;
	SELECT saga.publish('ok.rolled_back', jsonb_build_object('g', g)) FROM generate_series(1, 2) g;
	ROLLBACK TO SAVEPOINT s;
	COMMIT;
});
my %m2 = metrics();
is($m2{messages_published_total} - $before{messages_published_total}, 8,
	'publishes rolled back to a savepoint do not count either');

ok($node->poll_query_until('postgres', q{
	SELECT (SELECT count(*) FROM saga.outbox) = 0 AND (SELECT count(*) FROM saga.dead_letters) = 2}),
	'scenario finished: nothing pending, two dead letters');
is(sql(q{SELECT string_agg(destination, ',' ORDER BY destination) FROM saga.dead_letters}), 'bad,down',
	'dead letters at bad and down');

# counters are bumped after the recording commits: wait for them to settle
my %expect = (
	messages_delivered_total => 6,       # 3 ok + 1 flaky + 2 notify
	messages_retried_total => 4,         # flaky: 2; down: attempts 1 and 2
	messages_dead_lettered_total => 2,   # bad: at once; down: after 3 attempts
);
my $cond = join ' AND ', map {
	sprintf("coalesce(max(value) FILTER (WHERE name = '%s'), -1) = %d", $_, $before{$_} + $expect{$_})
} sort keys %expect;
$node->poll_query_until('postgres', "SELECT $cond FROM saga.metrics()");
usleep(500_000);	# anything still to be counted would be counted by now

my %after = metrics();
for my $name (sort keys %expect)
{
	is($after{$name} - $before{$name}, $expect{$name}, "$name went up by $expect{$name}");
}
is($after{'outbox_dead/bad'}, 1, 'outbox_dead for bad');
is($after{'outbox_dead/down'}, 1, 'outbox_dead for down');
ok(!exists $after{'outbox_dead/ok'} || $after{'outbox_dead/ok'} == 0, 'no outbox_dead for ok');
is($after{"outbox_pending/$_"}, 0, "outbox_pending for $_ is 0") for qw(ok flaky bad down ev);
is($after{"outbox_lag_seconds/$_"}, 0, "outbox_lag_seconds for $_ is 0") for qw(ok flaky bad down ev);
is($after{http_requests_in_flight}, 0, 'no HTTP request in flight');

# the receiver agrees with the counters
my @reqs = receiver_requests($log);
is(scalar(grep { $_->{path} eq '/flaky/2/m' } @reqs), 3, 'receiver: flaky got 3 requests');
is(scalar(grep { $_->{path} eq '/status/500' } @reqs), 3, 'receiver: down got 3 requests');
is(scalar(grep { $_->{path} eq '/status/400' } @reqs), 1, 'receiver: bad got 1 request');
is(scalar(grep { $_->{path} eq '/ok' } @reqs), 3, 'receiver: ok got 3 requests');
is(scalar(grep { $_->{body} =~ /rolled_back/ } @reqs), 0, 'receiver: nothing rolled back');

# delayed messages are pending, not lagging
sql(q{SELECT saga.publish('down.x', '{}', NULL, NULL, now() + interval '1 hour') FROM generate_series(1, 2)});
my %mid = metrics();
is($mid{'outbox_pending/down'}, 2, 'outbox_pending counts messages waiting for deliver_at');
is($mid{'outbox_lag_seconds/down'}, 0, 'messages not yet due add no lag');
is($mid{messages_published_total} - $after{messages_published_total}, 2, 'published counts them at commit');

# a two-phase commit publishes too: COMMIT PREPARED wakes the worker (with a
# one-hour poll interval nothing else would deliver them in time), but the
# published counter, kept by the preparing session, cannot count them
my %m3 = metrics();
sql(q{ALTER SYSTEM SET saga.poll_interval = '1h'; SELECT pg_reload_conf();});
sql(q{
	BEGIN;
	SELECT saga.publish('ok.prepared', jsonb_build_object('prepared', g)) FROM generate_series(1, 2) g;
	PREPARE TRANSACTION 'p1';
});
sql(q{COMMIT PREPARED 'p1'});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM saga.outbox WHERE destination = 'ok'}),
	'messages of a prepared transaction are delivered after COMMIT PREPARED');
is(scalar(grep { $_->{body} =~ /"prepared"/ } receiver_requests($log)), 2, 'receiver: both arrived');
my %m4 = metrics();
is($m4{messages_published_total} - $m3{messages_published_total}, 0,
	'published does not count messages committed with COMMIT PREPARED (documented)');
sql(q{ALTER SYSTEM RESET saga.poll_interval; SELECT pg_reload_conf();});

kill 'TERM', $rpid;
$node->stop;
done_testing();
