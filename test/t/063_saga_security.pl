# Steps and compensations run as the role that started the saga, never as
# the worker's superuser, and a step cannot get out of that role: SET ROLE,
# RESET ROLE, SET SESSION AUTHORIZATION and writes to a table only the
# superuser may write fail (the saga compensates and records the error) and
# write nothing. A saga defined by one role and started by another runs as
# the starter; revoking EXECUTE from the starter after the definition makes
# the step fail with a permission error. Settings a step changes stay with
# the step: they cannot make the worker run another role's code as the
# superuser (search_path) or stop it for everyone (read-only transactions).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use JSON::PP;
use SagaTest;

my $node = saga_node('saga_security');
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }
sub as
{
	my ($role, $query) = @_;
	return $node->safe_psql('postgres', $query, extra_params => [ '-U', $role ]);
}

# wait, with a short time limit, until a query returns t
sub wait_until
{
	my ($query, $seconds) = @_;
	my $until = time + $seconds;
	while (time < $until)
	{
		return 1 if sql($query) eq 't';
		usleep(100_000);
	}
	return 0;
}

my $superuser = sql('SELECT current_user');

sql(q{
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
CREATE SCHEMA sec;
GRANT USAGE ON SCHEMA sec TO PUBLIC;
-- written by steps and compensations, with the role they ran as
CREATE TABLE sec.ledger (
    seq bigserial PRIMARY KEY,
    saga_id uuid NOT NULL,
    step text NOT NULL,
    kind text NOT NULL,
    who text NOT NULL DEFAULT current_user,
    detail jsonb);
GRANT SELECT, INSERT ON sec.ledger TO PUBLIC;
GRANT USAGE ON SEQUENCE sec.ledger_seq_seq TO PUBLIC;
-- only the superuser may write here
CREATE TABLE sec.vault (what text, who text DEFAULT current_user);
CREATE SCHEMA alice AUTHORIZATION alice;
CREATE SCHEMA bob AUTHORIZATION bob;
GRANT USAGE ON SCHEMA bob TO alice;
});

as('alice', q{
CREATE FUNCTION alice.whoami(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action');
    RETURN jsonb_build_object(
        'current_user', current_user,
        'session_user', session_user,
        'is_superuser_setting', current_setting('is_superuser'),
        'rolsuper', (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
        'may_read_pg_authid', has_table_privilege('pg_authid', 'SELECT'),
        'may_write_vault', has_table_privilege('sec.vault', 'INSERT'),
        'search_path', current_setting('search_path'));
END
$$;
CREATE FUNCTION alice.undo(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'compensation')
    RETURNING jsonb_build_object('undone_by', who)
$$;
-- runs the statement the input names, then writes to the superuser's table
CREATE FUNCTION alice.escalate(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action');
    EXECUTE ctx -> 'input' ->> 'sql';
    INSERT INTO sec.vault (what) VALUES (ctx -> 'input' ->> 'sql');
    RETURN jsonb_build_object('current_user', current_user);
END
$$;
SELECT saga.define('escalate', '{"steps": [
	{"name": "first", "action": "alice.whoami", "compensation": "alice.undo"},
	{"name": "escalate", "action": "alice.escalate", "compensation": "alice.undo"}]}');
SELECT saga.define('whoami', '{"steps": [{"name": "whoami", "action": "alice.whoami"}]}');
});

# ---- 1. a step runs as the role that started the saga
my $id = as('alice', q{SELECT saga.start('whoami')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'alice\'s saga completed');
my $who = decode_json(sql(qq{SELECT result FROM saga.saga_steps WHERE saga_id = '$id'}));
is($who->{current_user}, 'alice', 'the step ran as alice');
is($who->{rolsuper} ? 1 : 0, 0, '... a role without superuser');
is($who->{may_read_pg_authid} ? 1 : 0, 0, '... that may not read pg_authid');
is($who->{may_write_vault} ? 1 : 0, 0, '... nor write the superuser\'s table');
is(sql(qq{SELECT who FROM sec.ledger WHERE saga_id = '$id'}), 'alice', 'its effect was written as alice');
note("inside a step: session_user = $who->{session_user}, is_superuser = $who->{is_superuser_setting}");

# a superuser's saga runs as the superuser: the role is the starter's, not a fixed one
$id = sql(q{SELECT saga.start('whoami')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'the same saga started by the superuser completed');
is(sql(qq{SELECT result ->> 'current_user' FROM saga.saga_steps WHERE saga_id = '$id'}), $superuser,
	'... and ran as the superuser who started it');

# ---- 2. a step cannot leave its role or write what its role may not
my @attempts = (
	'SET ROLE ' . $superuser,
	'SET LOCAL ROLE ' . $superuser,
	'RESET ROLE',
	'SET SESSION AUTHORIZATION ' . $superuser,
	'RESET SESSION AUTHORIZATION',
	"SELECT set_config('role', '$superuser', false)",
	"SELECT set_config('session_authorization', '$superuser', false)",
	'SELECT count(*) FROM pg_authid',
	'SELECT 1',    # then the write to sec.vault
);
my %esc;
for my $stmt (@attempts)
{
	my $q = $stmt =~ s/'/''/gr;
	$esc{$stmt} = as('alice', qq{SELECT saga.start('escalate', jsonb_build_object('sql', '$q'))});
}
my $ids = join(', ', map { "'$_'" } values %esc);
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM saga.sagas WHERE id IN ($ids) AND status NOT IN ('completed', 'compensated', 'failed')"),
	'every escalation saga finished');
for my $stmt (@attempts)
{
	my $sid = $esc{$stmt};
	my ($status, $error) = split /\|/, sql(qq{SELECT status, error FROM saga.sagas WHERE id = '$sid'}), 2;
	is($status, 'compensated', "$stmt: the step failed and the saga compensated");
	like($error // '', qr/^step "escalate" failed: .*\(SQLSTATE 42501\)$/, "$stmt: a privilege error is recorded")
	  or diag("error: " . ($error // 'none'));
	is(sql(qq{SELECT string_agg(kind || ':' || step || ':' || who, ',' ORDER BY seq) FROM sec.ledger WHERE saga_id = '$sid'}),
		'action:first:alice,compensation:first:alice', "$stmt: nothing of the step was kept; the compensation ran as alice");
}
is(sql(q{SELECT count(*) FROM sec.vault}), '0', 'nothing was written to the superuser\'s table');
is(sql(q{SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'}), 'f', 'alice is no superuser');

# an application-driven saga's compensation runs as the role that began it
$id = as('alice', q{SELECT saga.begin('app', '{}')});
as('alice', qq{SELECT saga.step('$id', 'charge', '{"function": "alice.undo"}')});
as('alice', qq{SELECT saga.fail('$id', 'cancelled')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'compensated' FROM saga.sagas WHERE id = '$id'}),
	'alice\'s application-driven saga was compensated');
is(sql(qq{SELECT kind || ':' || who FROM sec.ledger WHERE saga_id = '$id'}), 'compensation:alice',
	'... by a compensation that ran as alice');

# ---- 3. defined by bob, started by alice: runs as alice
as('bob', q{
CREATE FUNCTION bob.stamp(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action')
    RETURNING jsonb_build_object('by', who)
$$;
CREATE FUNCTION bob.unstamp(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'compensation')
    RETURNING jsonb_build_object('by', who)
$$;
CREATE FUNCTION bob.finish(ctx jsonb) RETURNS jsonb
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO sec.ledger (saga_id, step, kind) VALUES ((ctx ->> 'saga_id')::uuid, ctx ->> 'step', 'action')
    RETURNING jsonb_build_object('by', who)
$$;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA bob FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA bob TO alice;
SELECT saga.define('shared', '{"steps": [
	{"name": "stamp", "action": "bob.stamp", "compensation": "bob.unstamp"},
	{"name": "finish", "action": "bob.finish"}]}');
});
$id = as('alice', q{SELECT saga.start('shared')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'alice started bob\'s saga and it completed');
is(sql(qq{SELECT string_agg(step || ':' || who, ',' ORDER BY seq) FROM sec.ledger WHERE saga_id = '$id'}),
	'stamp:alice,finish:alice', 'its steps ran as alice, the starter, not as bob who defined it');
is(sql(qq{SELECT owner FROM saga.sagas WHERE id = '$id'}), 'alice', 'the saga belongs to alice');

# bob revokes EXECUTE on the last step from alice: her next saga fails there
as('bob', q{REVOKE EXECUTE ON FUNCTION bob.finish(jsonb) FROM alice});
$id = as('alice', q{SELECT saga.start('shared')});
ok($node->poll_query_until('postgres', qq{SELECT status IN ('compensated', 'failed') FROM saga.sagas WHERE id = '$id'}),
	'after the revoke, alice\'s saga of bob\'s steps finished');
is(sql(qq{SELECT status FROM saga.sagas WHERE id = '$id'}), 'compensated', '... compensated');
like(sql(qq{SELECT error FROM saga.sagas WHERE id = '$id'}),
	qr/^step "finish" failed: .*alice.*bob\.finish.*\(SQLSTATE 42501\)$/, '... because alice may not execute bob.finish');
is(sql(qq{SELECT string_agg(kind || ':' || step || ':' || who, ',' ORDER BY seq) FROM sec.ledger WHERE saga_id = '$id'}),
	'action:stamp:alice,compensation:stamp:alice', 'the step alice may no longer execute never ran; the first was undone');
is(sql(qq{SELECT status || ':' || attempts FROM saga.saga_steps WHERE saga_id = '$id' AND step = 'finish'}), 'failed:1',
	'a permission error is not retried');

# ---- 4. settings changed by a step do not outlive it
# alice's step puts her schema first on the search path for the rest of the
# session, where an aggregate of hers shadows pg_catalog.min()
as('alice', q{
CREATE FUNCTION alice.trap(state timestamptz, v timestamptz) RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO sec.vault (what) VALUES ('alice.min() ran');
        EXECUTE 'ALTER ROLE alice SUPERUSER';
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN CASE WHEN state IS NULL OR v < state THEN v ELSE state END;
END
$$;
CREATE AGGREGATE alice.min(timestamptz) (sfunc = alice.trap, stype = timestamptz);
CREATE FUNCTION alice.set_path(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('search_path', 'alice, pg_catalog, pg_temp', false);
    RETURN jsonb_build_object('search_path', current_setting('search_path'));
END
$$;
SELECT saga.define('set_path', '{"steps": [{"name": "set_path", "action": "alice.set_path"}]}');
});
as('bob', q{
CREATE FUNCTION bob.path(ctx jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('search_path', current_setting('search_path'))
$$;
SELECT saga.define('path', '{"steps": [{"name": "path", "action": "bob.path"}]}');
});
$id = as('alice', q{SELECT saga.start('set_path')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'alice\'s saga that changes search_path completed');
is(sql(qq{SELECT result ->> 'search_path' FROM saga.saga_steps WHERE saga_id = '$id'}), 'alice, pg_catalog, pg_temp',
	'... and its step did change it');
# another role's saga runs afterwards, and the worker goes on with its cycles
$id = as('bob', q{SELECT saga.start('path')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'a saga of bob\'s ran after it');
is(sql(qq{SELECT result ->> 'search_path' FROM saga.saga_steps WHERE saga_id = '$id'}), 'pg_catalog, pg_temp',
	'bob\'s step, which sets no search_path, runs with the worker\'s own, not with what alice\'s step set');
$id = as('bob', q{SELECT saga.start('path')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'and another one');
is(sql(q{SELECT string_agg(what || ' as ' || who, ', ') FROM sec.vault}), '',
	'the worker never ran alice\'s min() aggregate (nothing in the superuser\'s table)');
is(sql(q{SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'}), 'f',
	'alice did not make herself superuser through the worker');

# bob's step makes every later transaction of the session read-only
as('bob', q{
CREATE FUNCTION bob.read_only(ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('default_transaction_read_only', 'on', false);
    RETURN '{}';
END
$$;
SELECT saga.define('read_only', '{"steps": [{"name": "read_only", "action": "bob.read_only"}]}');
});
$id = as('bob', q{SELECT saga.start('read_only')});
ok($node->poll_query_until('postgres', qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}),
	'bob\'s saga that sets default_transaction_read_only completed');
$id = as('alice', q{SELECT saga.start('whoami')});
ok(wait_until(qq{SELECT status = 'completed' FROM saga.sagas WHERE id = '$id'}, 10),
	'alice\'s next saga still completes: the worker was not made read-only')
  or diag('worker log: ' . ((grep { /ERROR:.*read-only transaction/ } split /\n/, slurp_file($node->logfile))[0] // 'no read-only error'));

$node->stop;
done_testing();
