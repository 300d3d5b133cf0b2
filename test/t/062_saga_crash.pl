# Sagas survive crashes: 600 three-step sagas of local steps (each step
# writes a ledger row and sleeps a millisecond; the last one publishes an
# event to a real HTTP receiver; one saga in ten fails at its last step and
# compensates the other two) run while the saga worker is killed with
# SIGKILL, and then the postmaster. Afterwards every saga is finished (I1),
# each step and compensation took effect exactly once (I2), compensations
# undid exactly the done steps, newest first (I6), every committed event
# arrived and none from a rolled-back step (I3, I4), and the only processes
# terminated by a signal are the ones this test killed (I8). What a session
# saw committed before a crash (finished sagas, effects) is still there
# after it, and an event that reached the receiver came from a step whose
# commit survives the crash.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;

my $node = saga_node('saga_crash', conf => "restart_after_crash = on\n");
my ($port, $log, $rpid) = start_receiver();
# stop the receiver even if the test dies half-way
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $nsagas = 600;
sql(q{
CREATE SCHEMA crash;
-- ids of the messages the last steps published, committed with them
CREATE TABLE crash.published (id uuid PRIMARY KEY, saga_id uuid NOT NULL);
CREATE TABLE crash.ledger (
    seq bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    step text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('action', 'compensation')));

CREATE FUNCTION crash.act(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = crash, pg_temp AS $$
BEGIN
    INSERT INTO ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action');
    PERFORM pg_sleep(0.001);
    IF ctx ->> 'step' = 's3' AND (ctx -> 'input' ->> 'fail')::boolean THEN
        RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation';
    END IF;
    IF ctx ->> 'step' = 's3' THEN
        INSERT INTO published (id, saga_id)
        VALUES (saga.publish('crash.done', jsonb_build_object('n', ctx -> 'input' -> 'n')), (ctx ->> 'saga_id')::uuid);
    END IF;
    RETURN jsonb_build_object('n', ctx -> 'input' -> 'n');
END
$$;

CREATE FUNCTION crash.undo(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = crash, pg_temp AS $$
BEGIN
    INSERT INTO ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'compensation');
    PERFORM pg_sleep(0.001);
    RETURN '{}';
END
$$;
});
sql(qq{
	SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
	SELECT saga.subscribe('crash.*', 'hook');
});
sql(q{SELECT saga.define('crashy', '{"steps": [
	{"name": "s1", "action": "crash.act", "compensation": "crash.undo"},
	{"name": "s2", "action": "crash.act", "compensation": "crash.undo"},
	{"name": "s3", "action": "crash.act"}]}')});

# 600 sagas in six transactions; every tenth one fails at s3
for my $t (0 .. 5)
{
	sql(qq{SELECT saga.start('crashy', jsonb_build_object('n', g, 'fail', g % 10 = 0))
	       FROM generate_series($t * 100 + 1, $t * 100 + 100) g});
}
is(sql(q{SELECT count(*) FROM saga.sagas}), $nsagas, "$nsagas sagas started");

my $total_effects = $nsagas * 3 - $nsagas / 10 + 2 * $nsagas / 10;

# the kill comes once part of the work is done, while sagas are still running;
# returns what had been committed (was visible to this session) just before
sub strike_when
{
	my ($effects, $what) = @_;
	ok($node->poll_query_until('postgres', "SELECT count(*) >= $effects FROM crash.ledger"),
		"$what: $effects effects recorded before the kill");
	my $running = sql(q{SELECT count(*) FROM saga.sagas WHERE status IN ('running', 'compensating')});
	ok($running > 0, "$what: the kill comes while sagas run ($running not finished)");
	# strike in the middle of a worker transaction, while a step sleeps
	ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'saga worker' AND wait_event = 'PgSleep' AND backend_xid IS NOT NULL}),
		"$what: the worker is inside a step of an open transaction");
	return sql(q{SELECT (SELECT count(*) FROM crash.ledger) || ' ' ||
	                    (SELECT count(*) FROM saga.sagas WHERE status IN ('completed', 'compensated'))});
}

# What a session saw committed before a crash is still there after it: a
# finished saga does not come back to life, an effect is not redone.
sub nothing_committed_lost
{
	my ($before, $what) = @_;
	my ($effects, $finished) = split / /, $before;
	my ($effects_now, $finished_now) = split / /, sql(q{
		SELECT (SELECT count(*) FROM crash.ledger) || ' ' ||
		       (SELECT count(*) FROM saga.sagas WHERE status IN ('completed', 'compensated'))});
	cmp_ok($effects_now, '>=', $effects, "$what: the $effects effects committed before the kill survived it");
	cmp_ok($finished_now, '>=', $finished, "$what: the $finished sagas finished before the kill are still finished");
}

# ---- kill -9 of the worker
my $worker = worker_pid($node);
my @killed = ($worker);
ok($worker, "a saga worker runs (pid $worker)");
my $before = strike_when(300, 'worker kill');
kill 'KILL', $worker or die "could not kill $worker: $!";
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $worker"),
	'a new worker runs after the crash restart');
nothing_committed_lost($before, 'worker kill');

# ---- kill -9 of the postmaster
my $done_before = sql(q{SELECT count(*) FROM crash.ledger});
$before = strike_when($done_before + 300, 'postmaster kill');
my @server_pids = split /\n/, sql('SELECT pid FROM pg_stat_activity');
$node->kill9;
my $gone = 0;
for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
{
	$gone = !grep { kill(0, $_) } @server_pids;
	last if $gone;
	usleep(100_000);
}
ok($gone, 'every server process exited after the postmaster was killed');
$node->start;
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'"),
	'a worker runs after the restart');
nothing_committed_lost($before, 'postmaster kill');

# ---- I1: every saga finishes
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM saga.sagas WHERE status NOT IN ('completed', 'compensated', 'failed')}),
	'I1: every saga reached a terminal status');
is(sql(q{SELECT string_agg(status || '=' || n, ',' ORDER BY status)
         FROM (SELECT status, count(*) AS n FROM saga.sagas GROUP BY status) s}),
	'compensated=' . ($nsagas / 10) . ',completed=' . ($nsagas * 9 / 10),
	'the failing tenth was compensated, the rest completed');

# ---- I2: exactly once
is(sql(q{SELECT count(*) - count(DISTINCT (saga_id, step, kind)) FROM crash.ledger}), '0',
	'I2: no step or compensation took effect twice');
is(sql(q{SELECT count(*) FROM crash.ledger}), $total_effects, "$total_effects effects in all: none lost");

# ---- I6: per saga, exactly the expected effects in the expected order
is(sql(q{
	SELECT count(*) FROM saga.sagas s
	LEFT JOIN LATERAL (SELECT string_agg(l.kind || ':' || l.step, ',' ORDER BY l.seq) AS effects
	                   FROM crash.ledger l WHERE l.saga_id = s.id) e ON true
	WHERE e.effects IS DISTINCT FROM CASE WHEN (s.input ->> 'fail')::boolean
	      THEN 'action:s1,action:s2,compensation:s2,compensation:s1'
	      ELSE 'action:s1,action:s2,action:s3' END}), '0',
	'I6: each saga did its steps in order; failing ones undid s2 then s1, and never s3');
is(sql(q{SELECT count(*) FROM saga.saga_steps x JOIN saga.sagas s ON s.id = x.saga_id
         WHERE x.status <> CASE WHEN (s.input ->> 'fail')::boolean
                                THEN CASE WHEN x.step = 's3' THEN 'failed' ELSE 'compensated' END
                                ELSE 'done' END}), '0',
	'saga_steps agree with the ledger');
is(sql(q{SELECT count(*) FROM saga.sagas WHERE status = 'completed' AND (input ->> 'n')::int::text IS DISTINCT FROM
         (SELECT (x.result ->> 'n') FROM saga.saga_steps x WHERE x.saga_id = sagas.id AND x.step = 's3')}), '0',
	'each completed saga stored its last step\'s result');

# ---- I3/I4 for the events the last steps published
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'), 'the outbox drains');
is(sql('SELECT count(*) FROM saga.dead_letters'), '0', 'no dead letters');
my %committed = map { $_ => 1 } split /\n/, sql('SELECT id FROM crash.published');
is(scalar(keys %committed), $nsagas * 9 / 10, 'one event committed per completed saga');
my %arrived;
$arrived{ request_header($_, 'Idempotency-Key') }++ for receiver_requests($log);
my @missing = grep { !$arrived{$_} } keys %committed;
is(scalar(@missing), 0, 'I4: every committed event arrived');
my @foreign = grep { !$committed{$_} } keys %arrived;
is(scalar(@foreign), 0, 'I3: no event arrived whose publishing step was not committed')
  or diag(scalar(@foreign) . ' events arrived from step transactions that a crash rolled back, e.g. ' . $foreign[0]);

# ---- what was seen committed stays committed. A saga seen finished, and
# an event that left the server, must not be undone by a crash. The WAL
# writer is slowed down so that only a commit itself makes WAL durable.
$node->append_conf('postgresql.conf', "wal_writer_delay = 10s\nbgwriter_lru_maxpages = 0\n");
$node->reload;
sql(q{
CREATE FUNCTION crash.announce(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = crash, pg_temp AS $$
BEGIN
    INSERT INTO ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action');
    INSERT INTO published (id, saga_id)
    VALUES (saga.publish('durable.done', jsonb_build_object('n', ctx -> 'input' -> 'n')), (ctx ->> 'saga_id')::uuid);
    RETURN '{}';
END
$$;
SELECT saga.define('durable', '{"steps": [{"name": "only", "action": "crash.act"}]}');
SELECT saga.define('announce', '{"steps": [{"name": "only", "action": "crash.announce"}]}');
});
sql(qq{
	SELECT saga.create_destination('slow', 'http://127.0.0.1:$port/hang', '{"timeout": "1s", "max_attempts": 1}');
	SELECT saga.subscribe('durable.*', 'slow');
});

# A saga seen completed: after a crash it is still completed, its step not run again.
my $durable = sql(q{SELECT saga.start('durable', '{"n": 100001, "fail": false}')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$durable'}),
	'a one-step saga completed');
my $seen_seq = sql(qq{SELECT seq FROM crash.ledger WHERE saga_id = '$durable'});
kill_worker_and_wait('third');
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$durable'}),
	'it is completed after the crash');
is(sql(qq{SELECT string_agg(seq::text, ',') FROM crash.ledger WHERE saga_id = '$durable'}), $seen_seq,
	'a saga seen completed before the crash was not run again after it (its effect is the same row)');

# An event that reached a receiver came from a committed step.
my $announce = sql(q{SELECT saga.start('announce', '{"n": 100002}')});
my @seen;
for (1 .. 50 * $PostgreSQL::Test::Utils::timeout_default)
{
	@seen = grep { $_->{path} eq '/hang' } receiver_requests($log);
	last if @seen;
	usleep(20_000);
}
is(scalar(@seen), 1, 'the event published by a step reached the receiver');
kill_worker_and_wait('fourth');
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$announce'})
	  && $node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM saga.queue WHERE destination = 'slow' AND status = 'pending'}),
	'after the crash the saga is completed and its event dealt with');
my %arrived_ids = map { request_header($_, 'Idempotency-Key') => 1 } grep { $_->{path} eq '/hang' } receiver_requests($log);
my @committed_ids = split /\n/, sql(qq{SELECT id FROM crash.published WHERE saga_id = '$announce'});
is_deeply([ sort keys %arrived_ids ], \@committed_ids,
	'I3: the receiver got only the committed event, none from a step whose commit the crash undid');

# ---- I8: the only crashes are the ones caused here
my $logtext = slurp_file($node->logfile);
like($logtext, qr/saga worker.*\(PID $_\) was terminated by signal 9/, "the log shows the kill of worker $_")
  for @killed;
my @unexpected = grep { my $l = $_; !grep { $l =~ /\(PID $_\)/ } @killed } grep { /terminated by signal/ } split /\n/, $logtext;
is_deeply(\@unexpected, [], 'no other process was terminated by a signal');
my @panics = grep { /PANIC|TRAP:/ } split /\n/, $logtext;
is_deeply(\@panics, [], 'no PANIC or assertion failure in the log');

$node->stop;
done_testing();

# The pid of the database's saga worker, from pg_stat_activity.
sub worker_pid
{
	my ($node) = @_;
	$node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'")
	  or return 0;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'");
}

# Kill the worker and wait for its successor.
sub kill_worker_and_wait
{
	my ($round) = @_;
	my $pid = worker_pid($node);
	kill 'KILL', $pid or die "could not kill $pid: $!";
	push @killed, $pid;
	ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $pid"),
		"a new worker runs after the $round crash");
}
