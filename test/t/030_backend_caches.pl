# publish routes through a per-backend copy of saga.subscriptions, and
# saga.start takes the latest definition from a per-backend copy of
# saga.definitions: a session that used its copy before must see changes
# made by others after they commit, however they were made, and its own
# uncommitted changes, which a rollback takes back.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

# no worker in this database: what publish and start write stays in place
my $node = saga_node('caches', conf => "saga.databases = 'elsewhere'");
$node->safe_psql('postgres', q{
	SELECT saga.create_destination('a', 'notify:route_a');
	SELECT saga.create_destination('b', 'notify:route_b');
});

# one long-lived application session that keeps its cache between calls
my $app = $node->background_psql('postgres');
sub publish_in_app
{
	my ($topic) = @_;
	$app->query_safe("SELECT saga.publish('$topic', '{}')");
}


sub logged
{
	my ($topic) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT coalesce(string_agg(destination, ',' ORDER BY destination), '')
		FROM saga.queue WHERE topic = '$topic'});
}

publish_in_app('t.one');
is(logged('t.one'), '', 'no subscription: routed nowhere (and now cached)');

$node->safe_psql('postgres', q{SELECT saga.subscribe('t.*', 'a')});
publish_in_app('t.two');
is(logged('t.two'), 'a', 'a subscription committed by another session is seen');

$node->safe_psql('postgres', q{INSERT INTO saga.subscriptions (pattern, destination) VALUES ('t.three', 'b')});
publish_in_app('t.three');
is(logged('t.three'), 'a,b', 'a subscription added with plain SQL is seen');

$node->safe_psql('postgres', q{DELETE FROM saga.subscriptions WHERE destination = 'a'});
publish_in_app('t.four');
is(logged('t.four'), '', 'a subscription deleted with plain SQL is gone');

$app->query_safe(q{BEGIN});
$app->query_safe(q{SELECT saga.subscribe('t.five', 'b')});
publish_in_app('t.five');
$app->query_safe(q{COMMIT});
is(logged('t.five'), 'b', 'the session\'s own uncommitted subscription is used');

$app->query_safe(q{BEGIN});
$app->query_safe(q{SELECT saga.unsubscribe('t.five', 'b')});
publish_in_app('t.five');
$app->query_safe(q{ROLLBACK});
publish_in_app('t.five');
is(logged('t.five'), 'b,b', 'a rolled-back unsubscribe leaves the route in place');

# ---------- saga definitions ----------

$node->safe_psql('postgres', q{
	CREATE FUNCTION one(ctx jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT ctx';
	SELECT saga.define('d', '{"steps": [{"name": "a", "action": "one"}]}');
});
my $define_d = q{SELECT saga.define('d', '{"steps": [{"name": "a", "action": "one"}], "deadline": "1 hour"}')};

# the version and deadline of a saga the application session starts now
sub start_in_app
{
	my ($name) = @_;
	my $id = $app->query_safe("SELECT saga.start('$name', '{}')");
	$id =~ s/\s+//g;
	my $row = $app->query_safe(qq{
		SELECT version || ' ' || coalesce((deadline - started_at)::text, 'none')
		FROM saga.instances WHERE id = '$id'});
	$row =~ s/^\s+|\s+$//g;
	return $row;
}

is(start_in_app('d'), '1 none', 'the first start reads the definition (and now caches it)');
$node->safe_psql('postgres', $define_d);
is(start_in_app('d'), '2 01:00:00', 'a redefinition committed by another session is used');
$node->safe_psql('postgres', q{DELETE FROM saga.definitions WHERE name = 'd' AND version = 2});
is(start_in_app('d'), '1 none', 'a version deleted with plain SQL is gone');

$node->safe_psql('postgres', q{SELECT saga.define('e', '{"steps": [{"name": "a", "action": "one"}]}')});
is(start_in_app('e'), '1 none', 'a saga defined by another session after the copy was made starts');

$app->query_safe(q{BEGIN});
$app->query_safe($define_d);
is(start_in_app('d'), '2 01:00:00', 'the session\'s own uncommitted definition is used');
$app->query_safe(q{ROLLBACK});
is(start_in_app('d'), '1 none', 'after a rollback the definition before it is back');

$node->safe_psql('postgres', q{DELETE FROM saga.instances WHERE name = 'e'; DELETE FROM saga.definitions WHERE name = 'e'});
my ($ret, $out, $err) = $node->psql('postgres', q{SELECT saga.start('e', '{}')});
like($err, qr/saga "e" is not defined/, 'a definition deleted by another session cannot be started');
my $error = $app->query_safe(q{
	DO $$BEGIN PERFORM saga.start('e', '{}'); EXCEPTION WHEN undefined_object THEN
	  CREATE TEMP TABLE start_error AS SELECT SQLERRM AS message; END$$;
	SELECT message FROM start_error});
like($error, qr/saga "e" is not defined/, 'nor by the session that had it in its copy');

# ---------- the indexes of saga.queue and saga.instances ----------
# publish and start keep their description of these tables' indexes; indexes
# another session builds or drops concurrently, while the application
# session keeps its description, must be maintained (or left alone) at once

$node->safe_psql('postgres', q{
	SELECT saga.subscribe('t.idx', 'b');
	CREATE FUNCTION attempt(q text) RETURNS text LANGUAGE plpgsql AS $$
	BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
});
sub attempt_in_app
{
	my ($sql) = @_;
	my $state = $app->query_safe("SELECT attempt(\$q\$$sql\$q\$)");
	$state =~ s/\s+//g;
	return $state;
}
my $publish_idx = q{SELECT saga.publish('t.idx', '{}')};
my $start_u = q{SELECT saga.start('d', '{"u": 1}')};

is(attempt_in_app($publish_idx), 'ok', 'publish before the new index');
$node->safe_psql('postgres',
	q{CREATE UNIQUE INDEX CONCURRENTLY queue_idx_once ON saga.queue (topic) WHERE topic = 't.idx'});
is(attempt_in_app($publish_idx), '23505', 'a unique index built concurrently by another session is enforced');
$node->safe_psql('postgres', q{DROP INDEX CONCURRENTLY saga.queue_idx_once});
is(attempt_in_app($publish_idx), 'ok', 'and once dropped, it is left alone');
is(logged('t.idx'), 'b,b', 'the two accepted publishes are queued');

is(attempt_in_app($start_u), 'ok', 'start before the new index');
$node->safe_psql('postgres',
	q{CREATE UNIQUE INDEX CONCURRENTLY instances_u ON saga.instances ((input->>'u')) WHERE input ? 'u'});
is(attempt_in_app($start_u), '23505', 'an expression index built concurrently by another session is enforced');
$node->safe_psql('postgres', q{DROP INDEX CONCURRENTLY saga.instances_u});
is(attempt_in_app($start_u), 'ok', 'and once dropped, it is left alone');
is($node->safe_psql('postgres', q{SELECT count(*) FROM saga.instances WHERE input ? 'u'}), '2',
	'the two accepted starts made their sagas');

$app->quit;
$node->stop;
done_testing();
