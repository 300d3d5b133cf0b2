# The "timeout" of a local step: a step running longer is cancelled like a
# statement past statement_timeout (SQLSTATE 57014, a transient failure),
# its subtransaction rolled back, and retried up to max_attempts; the
# worker goes on with other sagas, and nothing of the cancelled attempt
# remains.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('saga_step_timeout');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE SCHEMA slow;
CREATE TABLE slow.ledger (saga_id uuid, step text, attempt integer);
-- writes; step "second" then sleeps for ctx.input.sleep seconds on the
-- attempts listed in ctx.input.slow_on
CREATE FUNCTION slow.work(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO slow.ledger VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', (ctx ->> 'attempt')::integer);
    IF ctx ->> 'step' = 'second' AND ctx -> 'input' -> 'slow_on' @> to_jsonb((ctx ->> 'attempt')::integer) THEN
        PERFORM pg_sleep((ctx -> 'input' ->> 'sleep')::float8);
    END IF;
    RETURN jsonb_build_object('attempt', ctx -> 'attempt');
END
$$;
CREATE FUNCTION slow.undo(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO slow.ledger VALUES ((ctx ->> 'saga_id')::uuid, 'undo ' || (ctx ->> 'step'), NULL)
    RETURNING '{}'::jsonb
$$;
SELECT saga.define('timed', '{"steps": [
    {"name": "first", "action": "slow.work", "compensation": "slow.undo"},
    {"name": "second", "action": "slow.work", "timeout": "200ms", "max_attempts": 2, "backoff": "50ms"}]}');
});

# the second step always sleeps 30 s: both attempts are cancelled
my $t0 = time();
my $stuck = sql(q{SELECT saga.start('timed', '{"slow_on": [1, 2], "sleep": 30}')});
ok($node->poll_query_until('postgres', "SELECT status = 'compensated' FROM saga.sagas WHERE id = '$stuck'"),
	'a step that keeps exceeding its timeout fails the saga');
ok(time() - $t0 < 25, 'the sleeping step was cancelled, not waited for');
is(sql("SELECT attempts || ' ' || status FROM saga.saga_steps WHERE saga_id = '$stuck' AND step = 'second'"),
	'2 failed', 'the timed-out step was tried max_attempts times');
like(sql("SELECT error FROM saga.sagas WHERE id = '$stuck'"), qr/statement timeout.*57014/,
	'the error says it timed out, with SQLSTATE 57014');
is(sql("SELECT string_agg(step, ',' ORDER BY step) FROM slow.ledger WHERE saga_id = '$stuck'"),
	'first,undo first', 'the cancelled attempts left nothing; the first step was compensated');

# slow only on its first attempt: completes on the second
my $recovers = sql(q{SELECT saga.start('timed', '{"slow_on": [1], "sleep": 30}')});
ok($node->poll_query_until('postgres', "SELECT status = 'completed' FROM saga.sagas WHERE id = '$recovers'"),
	'a step that timed out once completes on retry');
is(sql("SELECT result FROM saga.saga_steps WHERE saga_id = '$recovers' AND step = 'second'"),
	'{"attempt": 2}', 'with the result of the second attempt');

# a quick step under its timeout, and the worker still works normally
my $quick = sql(q{SELECT saga.start('timed', '{"slow_on": [], "sleep": 0}')});
ok($node->poll_query_until('postgres', "SELECT status = 'completed' FROM saga.sagas WHERE id = '$quick'"),
	'a step within its timeout completes');
is(sql("SELECT count(*) FROM saga.worker_status() WHERE kind = 'worker'"), '1', 'the worker is still running');
is(sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'saga worker' AND state = 'active' AND query LIKE '%pg_sleep%'"),
	'0', 'no step is left sleeping');

$node->stop;
done_testing();
