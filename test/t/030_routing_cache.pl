# publish routes through a per-backend copy of saga.subscriptions: a session
# that has published before must see subscriptions changed by others after
# they commit, however they were changed, and its own uncommitted changes.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('routing');
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


# the worker deletes what it delivers: a trigger logs every routed row
$node->safe_psql('postgres', q{
	CREATE TABLE routed_log (topic text, destination text);
	CREATE FUNCTION log_route() RETURNS trigger LANGUAGE plpgsql AS
	  $$BEGIN INSERT INTO routed_log VALUES (NEW.topic, NEW.destination); RETURN NEW; END$$;
	CREATE TRIGGER log_route AFTER INSERT ON saga.queue FOR EACH ROW EXECUTE FUNCTION log_route();
});

sub logged
{
	my ($topic) = @_;
	return $node->safe_psql('postgres', qq{
		SELECT coalesce(string_agg(destination, ',' ORDER BY destination), '')
		FROM routed_log WHERE topic = '$topic'});
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

$app->quit;
$node->stop;
done_testing();
