# The inbox with the real worker: every received message id is handled
# exactly once however often it arrives; what a handler publishes commits
# with the consumption (and a failed attempt publishes nothing); failures are
# retried with growing backoff, then the message is dead until
# saga.redeliver(); handlers run as the role that registered them, in a
# security-restricted context; all handlers of a message succeed or fail
# together; a message nobody handles is processed without effect; and a
# worker killed with SIGKILL in the middle of 300 messages leaves each handled
# exactly once.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use SagaTest;

my $node = saga_node('inbox', conf => "restart_after_crash = on\n");
my ($port, $log, $rpid) = start_receiver();
END { kill 'TERM', $rpid if $rpid }
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

# run as another role, through its own connection
sub sql_as
{
	my ($role, $query) = @_;
	return $node->safe_psql('postgres', $query, connstr => $node->connstr('postgres') . " user=$role");
}

sub wait_until
{
	my ($query, $what) = @_;
	return ok($node->poll_query_until('postgres', $query), $what);
}

# every message of a topic (pattern, as in LIKE) is processed
sub all_processed
{
	my ($like) = @_;
	return qq{SELECT count(*) > 0 AND count(*) FILTER (WHERE status <> 'processed') = 0
	          FROM saga.inbox WHERE topic LIKE '$like'};
}

# receive one message under a new id; returns the id
sub receive_new
{
	my ($topic, $payload) = @_;
	$payload //= '{}';
	my $id = sql('SELECT gen_random_uuid()');
	sql(qq{SELECT saga.receive('$id', '$topic', '$payload')}) eq 't' or die "receive of $id returned false";
	return $id;
}

my $superuser = sql('SELECT current_user');

sql(q{
CREATE SCHEMA app;
-- one row per handler call that took effect
CREATE TABLE app.effects (
    seq bigserial PRIMARY KEY,
    handler text NOT NULL,
    message_id uuid NOT NULL,
    topic text NOT NULL,
    attempt integer,
    envelope jsonb NOT NULL);
-- the attempt a handler runs in: how many attempts the inbox recorded before
-- it (handlers registered by the superuser may read saga's tables)
CREATE FUNCTION app.attempt(m jsonb) RETURNS integer
LANGUAGE sql AS $$
    SELECT attempts FROM saga.inbox_messages WHERE message_id = (m ->> 'id')::uuid
$$;
CREATE FUNCTION app.record(handler text, m jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO app.effects (handler, message_id, topic, attempt, envelope)
    VALUES (handler, (m ->> 'id')::uuid, m ->> 'topic', app.attempt(m), m)
$$;
-- the flags the test flips
CREATE TABLE app.flags (name text PRIMARY KEY, broken boolean NOT NULL);
INSERT INTO app.flags VALUES ('broken', true);

-- 1. exactly once
CREATE FUNCTION app.once(m jsonb) RETURNS void
LANGUAGE sql AS $$ SELECT app.record('once', m) $$;
SELECT saga.handle('once.*', 'app.once(jsonb)');

-- 2. publishes a reply, then fails while its attempt is below the message's
-- "fail_first"
CREATE FUNCTION app.relay(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a integer := app.attempt(m);
BEGIN
    PERFORM saga.publish('relay.out', jsonb_build_object('for', m ->> 'id', 'attempt', a), m ->> 'key');
    PERFORM app.record('relay', m);
    IF a < coalesce((m -> 'payload' ->> 'fail_first')::integer, 0) THEN
        RAISE EXCEPTION 'relay failed on attempt %', a;
    END IF;
END
$$;
SELECT saga.handle('relay.in', 'app.relay(jsonb)');

-- 3. fails on its first two attempts
CREATE FUNCTION app.flaky(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM app.record('flaky', m);
    IF app.attempt(m) < 2 THEN
        RAISE EXCEPTION 'flaky handler failed on attempt %', app.attempt(m) USING ERRCODE = 'data_exception';
    END IF;
END
$$;
SELECT saga.handle('flaky', 'app.flaky(jsonb)');

-- 4. fails while app.flags says so
CREATE FUNCTION app.fragile(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM app.record('fragile', m);
    IF (SELECT broken FROM app.flags WHERE name = 'broken') THEN
        RAISE EXCEPTION 'downstream is broken';
    END IF;
END
$$;
SELECT saga.handle('fragile', 'app.fragile(jsonb)');

-- 6. two handlers for one topic; the second fails on the first attempt of
-- messages that ask for it
CREATE FUNCTION app.order_any(m jsonb) RETURNS void
LANGUAGE sql AS $$ SELECT app.record('order_any', m) $$;
CREATE FUNCTION app.order_placed(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM app.record('order_placed', m);
    IF (m -> 'payload' ->> 'fail')::boolean AND app.attempt(m) < 1 THEN
        RAISE EXCEPTION 'order_placed failed on attempt %', app.attempt(m);
    END IF;
END
$$;
SELECT saga.handle('order.*', 'app.order_any(jsonb)');
SELECT saga.handle('order.placed', 'app.order_placed(jsonb)');
});

# ---- 1. exactly once: 50 ids, received again in the same and in later transactions
sql(q{CREATE TABLE app.sent (n integer PRIMARY KEY, id uuid NOT NULL DEFAULT gen_random_uuid());
      INSERT INTO app.sent (n) SELECT generate_series(1, 61);});
my $recv = q{SELECT count(*) FILTER (WHERE r) || '/' || count(*) FILTER (WHERE NOT r) FROM (
	SELECT saga.receive(s.id, 'once.placed', jsonb_build_object('n', s.n), 'k' || mod(s.n, 7), NULL, 'orders') AS r
	FROM app.sent s WHERE s.n BETWEEN %d AND %d ORDER BY s.n) x};
is(sql('BEGIN;' . sprintf($recv, 1, 30) . ';' . sprintf($recv, 1, 10) . ';COMMIT;'), "30/0\n0/10",
	'30 new ids, then 10 of them again in the same transaction: duplicates');
is(sql(sprintf($recv, 20, 50)), '20/11', 'ids 20..50 in another transaction: 20 new, 11 duplicates');
is(sql('BEGIN;' . sprintf($recv, 51, 60) . ';ROLLBACK;'), '10/0', 'ids 51..60 received in a transaction that rolls back');
# the same id from two sessions at once: the second waits for the first
my $first = $node->background_psql('postgres');
is($first->query_safe(q{BEGIN; SELECT saga.receive(id, 'once.placed', '{"n": 61}', 'k5', NULL, 'orders') FROM app.sent WHERE n = 61}),
	't', 'a session receives a new id and has not committed yet');
sql(q{CREATE TABLE app.concurrent (r boolean)});
my $second = $node->background_psql('postgres');
$second->query_until(qr/started/, q{\echo started
INSERT INTO app.concurrent SELECT saga.receive(id, 'once.placed', '{"n": 61}') FROM app.sent WHERE n = 61;
});
$first->query_safe('COMMIT');
wait_until(q{SELECT count(*) = 1 FROM app.concurrent}, 'a concurrent receive of an id ends');
is(sql(q{SELECT r FROM app.concurrent}), 'f', '... and finds it a duplicate');
$second->quit;
$first->quit;

wait_until(all_processed('once.%'), 'the worker processes all received messages');
is(sql(sprintf($recv, 1, 60)), '10/50', 'after processing, the 50 ids are still duplicates (the 10 rolled back are new)');
wait_until(all_processed('once.%'), 'the worker processes those too');
is(sql(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.effects WHERE handler = 'once'}), '61 61',
	'exactly one effect per distinct id');
is(sql(q{SELECT count(*) FROM app.sent s
         WHERE (SELECT count(*) FROM app.effects e WHERE e.message_id = s.id AND e.handler = 'once') <> 1}), '0',
	'every id received took effect once');
is(sql(q{SELECT string_agg(DISTINCT status || ':' || attempts, ',') FROM saga.inbox WHERE topic = 'once.placed'}),
	'processed:1', 'all inbox rows processed, at the first attempt');
my $env = decode_json(sql(q{SELECT envelope FROM app.effects e JOIN app.sent s ON s.id = e.message_id WHERE s.n = 8}));
is_deeply($env, { id => sql(q{SELECT id FROM app.sent WHERE n = 8}), topic => 'once.placed', key => 'k1',
		payload => { n => 8 }, headers => undef, source => 'orders' },
	'the handler got the envelope {id, topic, key, payload, headers, source}');

# ---- 2. a handler that publishes: one reply per message, nothing from a failed attempt
sql(qq{SELECT saga.create_destination('hook', 'http://127.0.0.1:$port/ok');
       SELECT saga.subscribe('relay.out', 'hook');});
sql(q{CREATE TABLE app.relayed (n integer, id uuid);
      INSERT INTO app.relayed SELECT g, gen_random_uuid() FROM generate_series(1, 20) g;
      SELECT saga.receive(id, 'relay.in', jsonb_build_object('n', n, 'fail_first', CASE WHEN n % 2 = 1 THEN 2 ELSE 0 END),
                          'relay-' || n, '{"X-Trace": "relay"}')
      FROM app.relayed ORDER BY n;});
wait_until(all_processed('relay.in'), 'messages whose handler publishes are processed');
wait_until(q{SELECT count(*) = 0 FROM saga.queue WHERE topic = 'relay.out'}, 'and what the handler published is delivered');
my %replies;
for my $req (grep { $_->{path} eq '/ok' } receiver_requests($log))
{
	my $body = decode_json($req->{body});
	push @{ $replies{ $body->{for} } }, $body->{attempt};
}
my %sent = map { my ($n, $id) = split /\|/; ($id => $n) } split /\n/, sql(q{SELECT n || '|' || id FROM app.relayed});
is(scalar(keys %replies), 20, 'one reply arrived for each of the 20 messages');
is(scalar(grep { !exists $sent{$_} } keys %replies), 0, 'and none for anything else');
is(join(',', map { scalar(@{ $replies{$_} }) } grep { @{ $replies{$_} } != 1 } keys %replies), '',
	'no message replied twice');
is(join(',', sort { $a <=> $b } map { $sent{$_} } grep { $replies{$_}[0] == 2 } keys %replies), '1,3,5,7,9,11,13,15,17,19',
	'the messages that failed twice replied from their third attempt: replies of failed attempts never left');
is(join(',', sort { $a <=> $b } map { $sent{$_} } grep { $replies{$_}[0] == 0 } keys %replies), '2,4,6,8,10,12,14,16,18,20',
	'the others replied from their first attempt');
is(sql(q{SELECT string_agg(DISTINCT attempts::text, ',' ORDER BY attempts::text) FROM saga.inbox WHERE topic = 'relay.in'}), '1,3',
	'saga.inbox counts 1 or 3 attempts');
is(sql(q{SELECT count(*) || ' ' || count(DISTINCT message_id) || ' ' || count(*) FILTER (WHERE attempt NOT IN (0, 2))
         FROM app.effects WHERE handler = 'relay'}), '20 20 0', 'one effect per message, from the successful attempt');

# ---- 3. failing on the first two attempts: retried with backoff, then processed
my $flaky = receive_new('flaky', '{"f": 1}');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$flaky'}, 'the flaky handler\'s first attempt ran');
like(sql(qq{SELECT status || ' ' || coalesce(last_error, '-') FROM saga.inbox WHERE message_id = '$flaky'}),
	qr/^pending flaky handler failed on attempt [01]\b/, 'after a failure: pending, with the error');
wait_until(qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$flaky'}, 'the flaky message is processed in the end');
is(sql(qq{SELECT attempts FROM saga.inbox WHERE message_id = '$flaky'}), '3', 'saga.inbox records 3 attempts');
is(sql(qq{SELECT string_agg(attempt::text, ',') FROM app.effects WHERE message_id = '$flaky'}), '2',
	'one effect, from the third attempt');
cmp_ok(sql(qq{SELECT extract(epoch FROM processed_at - received_at) FROM saga.inbox WHERE message_id = '$flaky'}),
	'>=', 2.25, 'the retries waited for their backoff (about 1 s, then 2 s, with jitter)');

# ---- 4. always failing: backoff grows, dead after 10 attempts, redeliver
my $fragile = receive_new('fragile', '{"f": 2}');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$fragile'}, 'the fragile handler failed once');
my ($a1, $next1) = split /\|/, sql(qq{SELECT attempts, extract(epoch FROM next_attempt_at) FROM saga.inbox WHERE message_id = '$fragile'});
wait_until(qq{SELECT attempts > $a1 FROM saga.inbox WHERE message_id = '$fragile'}, 'and again');
my ($a2, $next2, $st2, $err2) = split /\|/,
  sql(qq{SELECT attempts, extract(epoch FROM next_attempt_at), status, last_error FROM saga.inbox WHERE message_id = '$fragile'});
is($st2, 'pending', 'still pending after two failures');
like($err2, qr/downstream is broken/, 'last_error says why');
# the wait before the next attempt after n failures is 2^(n-1) s +-25 %
cmp_ok($next2 - $next1, '>=', 0.75 * 2**($a2 - 1) - 0.05,
	"the next attempt moved further away after $a2 failures: the backoff grew");
# skip most of the ten attempts (about 8 minutes of backoff)
sql(qq{UPDATE saga.inbox_messages SET attempts = 9, next_attempt_at = now() WHERE message_id = '$fragile'});
wait_until(qq{SELECT status = 'dead' FROM saga.inbox WHERE message_id = '$fragile'}, 'after its 10th failure the message is dead');
like(sql(qq{SELECT attempts || ' ' || last_error FROM saga.inbox WHERE message_id = '$fragile'}),
	qr/^10 .*downstream is broken/, 'dead with 10 attempts and the last error');
is(sql(qq{SELECT count(*) FROM app.effects WHERE message_id = '$fragile'}), '0', 'no failed attempt left an effect');
is(sql(qq{SELECT saga.receive('$fragile', 'fragile', '{"again": true}')}), 'f', 'a dead message is still a duplicate');
sleep(1);    # let time pass: a dead message is not retried
is(sql(qq{SELECT status || ' ' || attempts FROM saga.inbox WHERE message_id = '$fragile'}), 'dead 10',
	'a dead message stays dead');
sql(q{UPDATE app.flags SET broken = false});
is(sql(qq{SELECT saga.redeliver('$fragile')}), '1', 'saga.redeliver() requeues the dead message');
wait_until(qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$fragile'}, 'once the handler works, it is processed');
is(sql(qq{SELECT attempts FROM saga.inbox WHERE message_id = '$fragile'}), '1', 'attempts counted from 0 again');
is(sql(qq{SELECT count(*) || ' ' || min(envelope -> 'payload' ->> 'f') FROM app.effects WHERE message_id = '$fragile'}), '1 2',
	'one effect, with the payload first received');

# ---- 5. handlers run as the role that registered them, restricted
sql(q{
CREATE ROLE inbox_app LOGIN;
CREATE ROLE inbox_weak LOGIN;
GRANT USAGE ON SCHEMA app TO inbox_app, inbox_weak;
CREATE TABLE app.who (message_id uuid, handler text, cur name, sess name, path text);
GRANT INSERT ON app.who TO inbox_app;
CREATE FUNCTION app.whoami(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO app.who VALUES ((m ->> 'id')::uuid, 'whoami', current_user, session_user, current_setting('search_path'));
END
$$;
CREATE FUNCTION app.also_whoami(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO app.who VALUES ((m ->> 'id')::uuid, 'also_whoami', current_user, session_user, current_setting('search_path'));
END
$$;
-- what a handler may not do: change its role, or (in a security-restricted
-- operation) LISTEN
CREATE FUNCTION app.sneaky(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    SET LOCAL ROLE inbox_app;
END
$$;
CREATE FUNCTION app.listener(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LISTEN inbox_sneaky;
END
$$;
-- reads saga's own tables
CREATE FUNCTION app.peek(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM count(*) FROM saga.inbox_messages;
END
$$;
});
sql_as('inbox_app', q{SELECT saga.handle('who.*', 'app.whoami(jsonb)');
                      SELECT saga.handle('sneaky', 'app.sneaky(jsonb)');
                      SELECT saga.handle('listener', 'app.listener(jsonb)');
                      SELECT saga.handle('peek', 'app.peek(jsonb)');});
sql_as('inbox_weak', q{SELECT saga.handle('weak', 'app.whoami(jsonb)')});
sql(q{SELECT saga.handle('who.both', 'app.also_whoami(jsonb)')});
is(sql(q{SELECT string_agg(pattern || ':' || owner::regrole, ',' ORDER BY pattern) FROM saga.handlers
         WHERE pattern IN ('who.*', 'who.both', 'weak', 'sneaky', 'listener', 'peek')}),
	"listener:inbox_app,peek:inbox_app,sneaky:inbox_app,weak:inbox_weak,who.*:inbox_app,who.both:$superuser",
	'each registration is owned by the role that made it');
my ($who_one, $who_both, $weak, $sneaky, $listener, $peek) =
  map { receive_new($_) } qw(who.one who.both weak sneaky listener peek);
wait_until(qq{SELECT count(*) = 2 FROM saga.inbox WHERE message_id IN ('$who_one', '$who_both') AND status = 'processed'},
	'the messages for the application\'s handlers are processed');
is(sql(qq{SELECT handler || ':' || cur || ':' || path FROM app.who WHERE message_id = '$who_one'}),
	'whoami:inbox_app:pg_catalog, pg_temp', 'the handler ran as the role that registered it, with search_path pg_catalog, pg_temp');
is(sql(qq{SELECT string_agg(handler || ':' || cur, ',' ORDER BY handler) FROM app.who WHERE message_id = '$who_both'}),
	"also_whoami:$superuser,whoami:inbox_app", 'two handlers of one message: each ran as its own role');
note('session_user in a handler: ' . sql(qq{SELECT sess FROM app.who WHERE message_id = '$who_one'}));
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$weak'}, 'the weak role\'s handler was called');
like(sql(qq{SELECT status || ' ' || last_error FROM saga.inbox WHERE message_id = '$weak'}),
	qr/^pending .*permission denied for table who.*42501/,
	'a handler of a role without INSERT on the table fails with 42501 (it does not run as superuser)');
is(sql(qq{SELECT count(*) FROM app.who WHERE message_id = '$weak'}), '0', 'and wrote nothing');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$sneaky'}, 'the sneaky handler was called');
like(sql(qq{SELECT last_error FROM saga.inbox WHERE message_id = '$sneaky'}),
	qr/cannot set parameter "role" within security-(restricted operation|definer function) \(SQLSTATE 42501\)/,
	'a handler cannot SET ROLE');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$listener'}, 'the listening handler was called');
like(sql(qq{SELECT last_error FROM saga.inbox WHERE message_id = '$listener'}),
	qr/cannot execute LISTEN within security-restricted operation \(SQLSTATE 42501\)/,
	'a handler runs in a security-restricted operation');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$peek'}, 'the peeking handler was called');
like(sql(qq{SELECT last_error FROM saga.inbox WHERE message_id = '$peek'}), qr/permission denied for table inbox_messages/,
	'a handler cannot read saga\'s tables: it does not run as the extension owner');
# the owners take their handlers back; the messages then have none
sql_as('inbox_weak', q{SELECT saga.unhandle('weak', 'app.whoami(jsonb)')});
sql_as('inbox_app', q{SELECT saga.unhandle('sneaky', 'app.sneaky(jsonb)'); SELECT saga.unhandle('peek', 'app.peek(jsonb)');
                      SELECT saga.unhandle('listener', 'app.listener(jsonb)');});
my ($rc, $out, $err) = $node->psql('postgres', q{SELECT saga.unhandle('who.both', 'app.also_whoami(jsonb)')},
	connstr => $node->connstr('postgres') . ' user=inbox_app');
like($err, qr/permission denied/, 'a role cannot remove another role\'s handler');

# ---- 6. two handlers for one topic: both run once, or neither takes effect
my $placed_ok = receive_new('order.placed', '{"fail": false}');
my $placed_fail = receive_new('order.placed', '{"fail": true}');
my $cancelled = receive_new('order.cancelled');
wait_until(all_processed('order.%'), 'the order messages are processed');
my $order_effects = sub {
	my ($id) = @_;
	return sql(qq{SELECT string_agg(handler || '\@' || attempt, ',' ORDER BY handler) FROM app.effects WHERE message_id = '$id'});
};
is($order_effects->($placed_ok), 'order_any@0,order_placed@0', 'order.placed: "order.*" and "order.placed" each ran once');
is($order_effects->($placed_fail), 'order_any@1,order_placed@1',
	'when "order.placed" failed, the effect of "order.*" in that attempt was undone; both took effect on the retry');
is(sql(qq{SELECT attempts || ' ' || status FROM saga.inbox WHERE message_id = '$placed_fail'}), '2 processed',
	'that message took two attempts');
is($order_effects->($cancelled), 'order_any@0', 'order.cancelled: only "order.*" ran');

# ---- 7. no matching handler: processed without effect
my $nobody = receive_new('nobody.listens', '{"x": 1}');
wait_until(qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$nobody'},
	'a message no handler matches is processed');
is(sql(qq{SELECT coalesce(last_error, '-') || ' ' || (SELECT count(*) FROM app.effects WHERE message_id = '$nobody')
                 || ' ' || (SELECT count(*) FROM app.who WHERE message_id = '$nobody')
          FROM saga.inbox WHERE message_id = '$nobody'}), '- 0 0', 'without error or effect');

# ---- 8. kill -9 of the worker while 300 messages are handled
sql(q{
CREATE SEQUENCE app.crash_calls;
CREATE TABLE app.crash_effects (message_id uuid NOT NULL);
CREATE FUNCTION app.crash(m jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('app.crash_calls');     -- not undone by a rollback
    PERFORM pg_sleep(0.01);
    INSERT INTO app.crash_effects VALUES ((m ->> 'id')::uuid);
END
$$;
SELECT saga.handle('crash.*', 'app.crash(jsonb)');
});
sql(q{CREATE TABLE app.crash_ids (id uuid PRIMARY KEY)});
for my $t (1 .. 3)
{
	sql(q{INSERT INTO app.crash_ids SELECT id FROM (SELECT gen_random_uuid() id FROM generate_series(1, 100)) x
	      WHERE saga.receive(id, 'crash.msg', '{}')});
}
is(sql(q{SELECT count(*) FROM app.crash_ids}), '300', '300 messages received');
my $worker = sql(q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = 'postgres'});
wait_until(q{SELECT last_value >= 30 AND is_called FROM app.crash_calls}, 'the worker is handling them');
my $pending = sql(q{SELECT count(*) FROM saga.inbox WHERE topic = 'crash.msg' AND status = 'pending'});
kill 'KILL', $worker or die "could not kill $worker: $!";
cmp_ok($pending, '>', 0, "the worker (pid $worker) was killed with $pending messages still pending");
wait_until(qq{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'saga worker' AND pid <> $worker},
	'a new worker runs after the crash restart');
wait_until(all_processed('crash.%'), 'all 300 messages are processed after the crash');
is(sql(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.crash_effects}), '300 300',
	'each took effect exactly once');
is(sql(q{SELECT count(*) FROM app.crash_ids i WHERE NOT EXISTS (SELECT FROM app.crash_effects e WHERE e.message_id = i.id)}), '0',
	'none was lost');
note('handler calls, counting the ones the crash undid: ' . sql(q{SELECT last_value FROM app.crash_calls}));
like(slurp_file($node->logfile), qr/saga worker.*\(PID $worker\) was terminated by signal 9/, 'the log shows the kill');

# ---- '*' matches every topic
sql(q{CREATE FUNCTION app.star(m jsonb) RETURNS void LANGUAGE sql AS $$ SELECT app.record('star', m) $$;
      SELECT saga.handle('*', 'app.star(jsonb)');});
my $any = receive_new('anything.at.all');
wait_until(qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$any'}, 'a message for "*" is processed');
is(sql(qq{SELECT string_agg(handler, ',') FROM app.effects WHERE message_id = '$any'}), 'star', '"*" handled it');
is(sql(q{SELECT saga.unhandle('*', 'app.star(jsonb)')}), 't', 'saga.unhandle() removes it');

# ---- a commit that received something wakes the worker at once
wait_until(q{SELECT count(*) = 0 FROM saga.inbox WHERE status = 'pending'}, 'nothing is pending in the inbox');
sql(q{ALTER SYSTEM SET saga.poll_interval = '10min'; SELECT pg_reload_conf();});
sleep(1);    # let the worker go back to sleep, now for up to 10 minutes
my $direct = sql('SELECT gen_random_uuid()');
sql(qq{INSERT INTO saga.inbox_messages (message_id, topic, payload) VALUES ('$direct', 'wake.direct', '{}')});
sleep(2);    # let time pass: a row written without saga.receive wakes nobody
is(sql(qq{SELECT status FROM saga.inbox WHERE message_id = '$direct'}), 'pending',
	'a message inserted without saga.receive waits for the (now 10-minute) timer');
my $woken = receive_new('wake.received');
wait_until(qq{SELECT count(*) = 2 FROM saga.inbox WHERE message_id IN ('$direct', '$woken') AND status = 'processed'},
	'a commit with saga.receive wakes the worker, which handles both');

# ---- metrics: the gauges match the table (one snapshot for both)
my ($gauges, $counted) = split /\n/, sql(q{BEGIN ISOLATION LEVEL REPEATABLE READ;
	SELECT string_agg(labels ->> 'status' || '=' || value, ',' ORDER BY labels ->> 'status')
	FROM saga.metrics() WHERE name = 'inbox_messages';
	SELECT 'dead=' || count(*) FILTER (WHERE status = 'dead') || ',pending=' || count(*) FILTER (WHERE status = 'pending')
	       || ',processed=' || count(*) FILTER (WHERE status = 'processed') FROM saga.inbox;
	COMMIT;});
is($gauges, $counted, "saga.metrics() counts inbox messages by status ($counted)");

# ---- a handler is its function, not its name: a function created later
# under the same signature is not called in its place
sql(q{
CREATE FUNCTION app.replaceable(m jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO app.effects (handler, message_id, topic, envelope) VALUES ('original', (m ->> 'id')::uuid, m ->> 'topic', m) $$;
SELECT saga.handle('swap.x', 'app.replaceable(jsonb)');
ALTER FUNCTION app.replaceable(jsonb) RENAME TO renamed;});
my $renamed = receive_new('swap.x');
wait_until(qq{SELECT status = 'processed' FROM saga.inbox WHERE message_id = '$renamed'},
	'a renamed handler function still handles its messages');
is(sql(qq{SELECT string_agg(handler, ',') FROM app.effects WHERE message_id = '$renamed'}), 'original',
	'the renamed function ran');
sql(q{
DROP FUNCTION app.renamed(jsonb);
CREATE FUNCTION app.replaceable(m jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO app.effects (handler, message_id, topic, envelope) VALUES ('impostor', (m ->> 'id')::uuid, m ->> 'topic', m) $$;});
my $swapped = receive_new('swap.x');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$swapped'},
	'a message whose handler function was dropped is attempted');
like(sql(qq{SELECT last_error FROM saga.inbox WHERE message_id = '$swapped'}), qr/function with OID \d+ does not exist.*42883/,
	'it fails: the handler function no longer exists');
is(sql(qq{SELECT count(*) FROM app.effects WHERE message_id = '$swapped'}), '0',
	'the function created later under the same name was not called');

# ---- a handler whose role was dropped does not run (as PUBLIC or anyone)
sql(q{CREATE ROLE inbox_gone LOGIN;
      GRANT USAGE ON SCHEMA app TO inbox_gone;
      GRANT INSERT ON app.who TO PUBLIC;});
sql_as('inbox_gone', q{SELECT saga.handle('gone.x', 'app.whoami(jsonb)')});
sql(q{REVOKE USAGE ON SCHEMA app FROM inbox_gone; DROP ROLE inbox_gone;});
my $orphan = receive_new('gone.x');
wait_until(qq{SELECT attempts >= 1 FROM saga.inbox WHERE message_id = '$orphan'},
	'a message for the handler of a dropped role is attempted');
like(sql(qq{SELECT last_error FROM saga.inbox WHERE message_id = '$orphan'}), qr/role with OID \d+.*does not exist.*42704/,
	'it fails: the role the handler would run as is gone');
is(sql(qq{SELECT count(*) FROM app.who WHERE message_id = '$orphan'}), '0', 'the handler did not run');

$node->stop;
done_testing();
