# Application-driven sagas with the real worker: an application that dies
# before saga.complete() has its recorded steps compensated after the
# deadline, newest first, each compensation getting the args it registered;
# saga.fail() compensates at once; a completed saga cannot be failed and is
# never compensated; a compensation that keeps failing is retried, and one
# whose attempts run out leaves the saga "failed" in saga.stuck until
# saga.retry() finishes the job.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use SagaTest;

my $node = saga_node('saga_app_driven');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE SCHEMA app;
-- what the application did (actions, in its own transactions) and what the
-- compensations did (run by the worker)
CREATE TABLE app.ledger (
    seq bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    step text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('action', 'compensation')),
    args jsonb,
    error text,
    attempt integer,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE app.flags (name text PRIMARY KEY, broken boolean NOT NULL);
INSERT INTO app.flags VALUES ('refunds', true);

CREATE FUNCTION app.undo(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = app, pg_temp AS $$
    INSERT INTO ledger (saga_id, step, kind, args, error, attempt)
    VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'compensation', ctx -> 'args', ctx ->> 'error',
            (ctx ->> 'attempt')::integer)
    RETURNING jsonb_build_object('undone', step)
$$;

-- fails while the refund service is "down"
CREATE FUNCTION app.fragile_undo(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = app, pg_temp AS $$
BEGIN
    INSERT INTO ledger (saga_id, step, kind, args, error, attempt)
    VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'compensation', ctx -> 'args', ctx ->> 'error',
            (ctx ->> 'attempt')::integer);
    IF (SELECT broken FROM flags WHERE name = 'refunds') THEN
        RAISE EXCEPTION 'refund service down';
    END IF;
    RETURN jsonb_build_object('refunded', ctx -> 'args' -> 'amount');
END
$$;

-- a worker-driven step that does its work, and one that always refuses
CREATE FUNCTION app.act(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = app, pg_temp AS $$
    INSERT INTO ledger (saga_id, step, kind, attempt)
    VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action', (ctx ->> 'attempt')::integer)
    RETURNING jsonb_build_object('amount', 42)
$$;
CREATE FUNCTION app.refuse(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'card declined' USING ERRCODE = 'check_violation';
END
$$;
});

# An application step: its business effect and saga.step() in one transaction.
sub app_step
{
	my ($id, $step, $comp, $result) = @_;
	$comp = defined $comp ? "'$comp'" : 'NULL';
	$result = defined $result ? "'$result'" : 'NULL';
	return qq{BEGIN;
		INSERT INTO app.ledger (saga_id, step, kind) VALUES ('$id', '$step', 'action');
		SELECT saga.step('$id', '$step', $comp, $result);
		COMMIT;};
}

sub ledger
{
	my ($id, $what) = @_;
	$what //= q{kind || ':' || step};
	return sql(qq{SELECT coalesce(string_agg($what, ',' ORDER BY seq), '') FROM app.ledger WHERE saga_id = '$id'});
}

# Fail a fresh saga and wait until the worker compensated it: once it has,
# the worker has also looked at everything that was due before.
my $sentinels = 0;
sub worker_caught_up
{
	my $n = ++$sentinels;
	my $id = sql(qq{SELECT saga.begin('sentinel', '{}', 'sentinel-$n')});
	sql(app_step($id, 'mark', '{"function": "app.undo"}'));
	sql(qq{SELECT saga.fail('$id', 'sentinel')});
	return $node->poll_query_until('postgres', qq{SELECT saga.wait('$id', '1s') = 'compensated'});
}

# ---- 1. the application dies before saga.complete(): compensated after the deadline
my $app = $node->background_psql('postgres');
my $app_pid = $app->query_safe('SELECT pg_backend_pid()');
my $dead = $app->query_safe(q{SELECT saga.begin('checkout', '{"cart": 7}', 'cart-7', '2 seconds')});
$app->query_safe(app_step($dead, 'charge', '{"function": "app.undo", "args": {"amount": 42, "card": "c-1"}}',
		'{"charge_id": "ch-1"}'));
$app->query_safe(app_step($dead, 'pack', undef));
$app->query_safe(app_step($dead, 'reserve', '{"function": "app.undo", "args": {"sku": "s-9", "n": 2}}'));
# the next step is under way when the application dies: never recorded
$app->query_safe(qq{BEGIN;
	INSERT INTO app.ledger (saga_id, step, kind) VALUES ('$dead', 'ship', 'action');
	SELECT saga.step('$dead', 'ship', '{"function": "app.undo", "args": {"parcel": 1}}');});
is(sql(qq{SELECT pg_terminate_backend($app_pid)}), 't', 'the application\'s session is terminated mid-transaction');
eval { $app->{run}->kill_kill; };
ok($node->poll_query_until('postgres', qq{SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $app_pid}),
	'the application is gone');
is(sql(qq{SELECT status FROM saga.sagas WHERE id = '$dead'}), 'running', 'its saga is still running');

ok($node->poll_query_until('postgres', qq{SELECT status = 'compensated' FROM saga.sagas WHERE id = '$dead'}),
	'after its deadline the worker failed and compensated the saga');
is(ledger($dead), 'action:charge,action:pack,action:reserve,compensation:reserve,compensation:charge',
	'the recorded steps with a compensation were undone newest first; the unfinished step never existed');
is(ledger($dead, q{coalesce(args::text, '-')}), '-,-,-,{"n": 2, "sku": "s-9"},{"card": "c-1", "amount": 42}',
	'each compensation got the args it registered under ctx->\'args\'');
is(ledger($dead, q{coalesce(error, '-') || '#' || coalesce(attempt, 0)}), '-#0,-#0,-#0,deadline passed#1,deadline passed#1',
	'ctx->\'error\' says the deadline passed; first attempts');
is(sql(qq{SELECT count(*) FROM app.ledger l JOIN saga.sagas s ON s.id = l.saga_id
          WHERE s.id = '$dead' AND l.kind = 'compensation' AND l.at < s.deadline}), '0',
	'no compensation ran before the deadline');
is(sql(qq{SELECT error FROM saga.sagas WHERE id = '$dead'}), 'deadline passed', 'the saga says why it failed');
is(sql(qq{SELECT string_agg(step || ':' || status, ',' ORDER BY position) FROM saga.saga_steps WHERE saga_id = '$dead'}),
	'charge:compensated,pack:done,reserve:compensated', 'saga_steps: both compensations recorded; pack has none');
my $got = decode_json(sql(qq{SELECT saga.get('$dead')}));
is_deeply([ map { $_->{compensation_result} } grep { $_->{compensation_result} } @{ $got->{steps} } ],
	[ { undone => 'charge' }, { undone => 'reserve' } ], 'saga.get shows what the compensations returned');
is(sql(qq{SELECT count(*) FROM saga.stuck WHERE id = '$dead'}), '0', 'a compensated saga is not stuck');

# ---- 2. saga.fail(): compensated at once (well before its deadline)
my $failed = sql(q{SELECT saga.begin('checkout', '{"cart": 8}')});
sql(app_step($failed, 'charge', '{"function": "app.undo", "args": {"amount": 10}}'));
sql(app_step($failed, 'reserve', '{"function": "app.undo", "args": {"sku": "s-1"}}'));
sql(qq{SELECT saga.fail('$failed', 'customer cancelled')});
ok($node->poll_query_until('postgres', qq{SELECT saga.wait('$failed', '1s') = 'compensated'}),
	'saga.fail(): the worker compensates the saga');
is(ledger($failed, q{kind || ':' || step || ':' || coalesce(error, '-')}),
	'action:charge:-,action:reserve:-,compensation:reserve:customer cancelled,compensation:charge:customer cancelled',
	'saga.fail(): newest first, with the reason in ctx->\'error\'');
is(sql(qq{SELECT error FROM saga.sagas WHERE id = '$failed'}), 'customer cancelled', 'the reason is recorded');
# asking again changes nothing
my ($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.fail('$failed', 'again')});
is($rc, 0, 'failing a compensated saga again is a no-op');
like($err, qr/already compensated/, '... that says so');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.complete('$failed')});
like($err, qr/ERROR:  saga \S+ is compensated, it cannot complete/, 'a compensated saga cannot complete');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.step('$failed', 'late', '{"function": "app.undo"}')});
like($err, qr/ERROR:  saga \S+ is compensated, it takes no more steps/, 'a compensated saga takes no more steps');

# ---- 3. saga.complete() then saga.fail(): an error, and nothing is compensated
my $done = sql(q{SELECT saga.begin('checkout', '{"cart": 9}')});
sql(app_step($done, 'charge', '{"function": "app.undo", "args": {"amount": 5}}'));
sql(qq{SELECT saga.complete('$done', '{"order": 9}')});
is(sql(qq{SELECT status || ' ' || result::text FROM saga.sagas WHERE id = '$done'}), 'completed {"order": 9}',
	'saga.complete() completes the saga with its result');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.fail('$done', 'too late')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($rc, 0, 'saga.fail() of a completed saga is an error');
like($err, qr/ERROR:  55000: saga \S+ is already completed/, '... object_not_in_prerequisite_state, saying why');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.cancel('$done', 'too late')});
like($err, qr/ERROR:  saga \S+ is already completed/, 'saga.cancel() of a completed saga is an error too');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.complete('$done')});
is($rc, 0, 'completing it again is a no-op');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.retry('$done')});
like($err, qr/ERROR:  saga \S+ is completed, only a failed saga can be retried/, 'a completed saga cannot be retried');
ok(worker_caught_up(), 'the worker ran after these calls');
is(ledger($done), 'action:charge', 'the completed saga was never compensated');
is(sql(qq{SELECT status || ' ' || coalesce(error, '-') FROM saga.sagas WHERE id = '$done'}), 'completed -',
	'it is still completed, with no error');
is(ledger($failed, q{kind}), 'action,action,compensation,compensation', 'the failed one was compensated only once');

# ---- 4. a compensation that fails is retried (backoff 1s, doubling) until it succeeds
my $refund = sql(q{SELECT saga.begin('checkout', '{"cart": 10}')});
sql(app_step($refund, 'charge', '{"function": "app.fragile_undo", "args": {"amount": 77}}'));
sql(qq{SELECT saga.fail('$refund', 'out of stock')});
ok($node->poll_query_until('postgres', qq{SELECT compensation_attempts >= 2 FROM saga.saga_steps WHERE saga_id = '$refund'}),
	'a failing compensation is retried');
is(sql(qq{SELECT s.status || ' / ' || x.status || ' / ' || x.compensation_error
          FROM saga.sagas s JOIN saga.saga_steps x ON x.saga_id = s.id WHERE s.id = '$refund'}),
	'compensating / done / refund service down (SQLSTATE P0001)',
	'meanwhile the saga is compensating and the step shows the last error');
is(ledger($refund), 'action:charge', 'the failed attempts left no effect');
sql(q{UPDATE app.flags SET broken = false});
ok($node->poll_query_until('postgres', qq{SELECT saga.wait('$refund', '1s') = 'compensated'}),
	'once the service is back, the compensation succeeds');
my $attempts = sql(qq{SELECT compensation_attempts FROM saga.saga_steps WHERE saga_id = '$refund'});
cmp_ok($attempts, '>=', 3, "it took $attempts attempts");
is(ledger($refund, q{kind || ':' || coalesce(args ->> 'amount', '-') || ':' || coalesce(attempt, 0)}),
	"action:-:0,compensation:77:$attempts", 'one compensation took effect, on the attempt the step records');

# ---- 5. a compensation whose attempts run out: failed, stuck, then saga.retry()
# (an application-driven compensation gets 10 attempts over about 8 minutes;
# a worker-driven step's compensation has the step's max_attempts and backoff)
sql(q{UPDATE app.flags SET broken = true});
sql(q{SELECT saga.define('charge_then_refuse', '{"steps": [
	{"name": "charge", "action": "app.act", "compensation": "app.fragile_undo", "max_attempts": 3, "backoff": "100ms"},
	{"name": "confirm", "action": "app.refuse"}]}')});
my $stuck = sql(q{SELECT saga.start('charge_then_refuse', '{"cart": 11}')});
ok($node->poll_query_until('postgres', qq{SELECT saga.wait('$stuck', '1s') = 'failed'}),
	'a compensation that fails max_attempts times leaves the saga failed');
is(sql(qq{SELECT string_agg(step || ':' || status || ':' || attempts || ':' || compensation_attempts, ',' ORDER BY position)
          FROM saga.saga_steps WHERE saga_id = '$stuck'}),
	'charge:compensation_failed:1:3,confirm:failed:1:0', 'saga_steps: 3 compensation attempts, then compensation_failed');
is(sql(qq{SELECT reason FROM saga.stuck WHERE id = '$stuck'}),
	'step "confirm" failed: card declined (SQLSTATE 23514); compensation of step "charge" failed after 3 attempts: refund service down (SQLSTATE P0001)',
	'saga.stuck lists it with the reason');
is(ledger($stuck), 'action:charge', 'no failed compensation attempt left an effect');
# the operator fixes the refund service and resumes the saga
sql(q{UPDATE app.flags SET broken = false});
sql(qq{SELECT saga.retry('$stuck')});
ok($node->poll_query_until('postgres', qq{SELECT saga.wait('$stuck', '1s') = 'compensated'}),
	'saga.retry() resumes the compensation and the saga is compensated');
is(ledger($stuck), 'action:charge,compensation:charge', 'the compensation took effect once');
is(sql(qq{SELECT count(*) FROM saga.stuck WHERE id = '$stuck'}), '0', 'it left saga.stuck');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT saga.retry('$stuck')});
like($err, qr/ERROR:  saga \S+ is compensated, only a failed saga can be retried/, 'retrying it again is an error');

# no compensation anywhere ran twice (I2), and none ran for an unknown step
is(sql(q{SELECT count(*) - count(DISTINCT (saga_id, step, kind)) FROM app.ledger}), '0',
	'I2: each action and compensation took effect once');
is(sql(q{SELECT count(*) FROM app.ledger c WHERE c.kind = 'compensation' AND NOT EXISTS
         (SELECT FROM app.ledger a WHERE a.saga_id = c.saga_id AND a.step = c.step AND a.kind = 'action')}), '0',
	'I6: nothing was compensated that had not been done');

$node->stop;
done_testing();
