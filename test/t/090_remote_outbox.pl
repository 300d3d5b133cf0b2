# Messages delivered through postgresql:// destinations between two real
# clusters: "orders" (the sender, database orders) and "products" (the
# receiver, database postgres, reached as role svc_orders). Every committed
# message arrives exactly once with its key, payload and headers, per-key
# publish order is kept, nothing from a rolled-back transaction arrives; a
# sender worker killed with SIGKILL while deliveries were committed remotely
# but not yet recorded resends them and the receiver drops the duplicates, as
# it does for statements that timed out while blocked at the receiver; a
# receiver that is down makes messages retry until it is back; a message the
# receiver refuses with a non-transient error is the only dead letter of its
# batch; a role without EXECUTE on saga.receive dead-letters with 42501;
# destinations are not readable by ordinary roles and a password in the URL
# shows nowhere; unreachable and silent destinations retry with their
# connection error while other destinations keep delivering.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IO::Socket::INET;
use JSON::PP;
use SagaTest;

# the sender: small batches, so that several statements are in flight at once
my $orders = saga_node('orders', conf => "restart_after_crash = on\nsaga.batch_size = 100\n");
# the receiver also listens on TCP (the test clusters otherwise use a socket only)
my $products = saga_node('products', conf => "listen_addresses = '127.0.0.1'\n");
$orders->safe_psql('postgres', 'CREATE DATABASE orders');
$orders->safe_psql('orders', 'CREATE EXTENSION saga');
wait_for_worker($orders, 'orders');
wait_for_worker($products);

my $pport = $products->port;
my $secret = 's3cret';

sub osql { return $orders->safe_psql('orders', $_[0]); }
sub psql_p { return $products->safe_psql('postgres', $_[0]); }

sub uri_escape_path
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9\/._-])/sprintf('%%%02X', ord($1))/ge;
	return $s;
}

# wait until every message of a topic left the sender's queue as delivered
# and the receiver has handled at least $n of them
sub wait_delivered
{
	my ($topic, $n, $what) = @_;
	my $ok = $orders->poll_query_until('orders',
		qq{SELECT count(*) = 0 FROM saga.queue WHERE topic = '$topic' AND status = 'pending'})
	  && $products->poll_query_until('postgres',
		qq{SELECT count(*) >= $n AND count(*) FILTER (WHERE status <> 'processed') = 0
		   FROM saga.inbox WHERE topic = '$topic'});
	return ok($ok, $what);
}

# the sender's published messages of a topic: id => canonical JSON of [key, payload, headers]
my $canon = JSON::PP->new->canonical;
sub sent_messages
{
	my ($topic) = @_;
	my %m;
	for my $line (split /\n/, osql(qq{SELECT json_build_array(id, key, payload, headers)::text
	                                  FROM app.published WHERE topic = '$topic'}))
	{
		my $a = decode_json($line);
		$m{ $a->[0] } = $canon->encode([ @$a[ 1 .. 3 ] ]);
	}
	return %m;
}

# the same, as the receiver's handler got them (id => [count, JSON, source])
sub handled_messages
{
	my ($topic) = @_;
	my %m;
	for my $line (split /\n/, psql_p(qq{SELECT json_build_array(message_id, envelope -> 'key', envelope -> 'payload',
	                                        envelope -> 'headers', source)::text
	                                    FROM app.received WHERE topic = '$topic'}))
	{
		my $a = decode_json($line);
		$m{ $a->[0] }[0]++;
		$m{ $a->[0] }[1] = $canon->encode([ @$a[ 1 .. 3 ] ]);
		$m{ $a->[0] }[2] = $a->[4];
	}
	return %m;
}

# ---- the receiver: roles, a handler that records every message, and a
# trigger on the inbox that counts the receive calls of the crash test and
# refuses messages carrying a marker listed in app.refuse
psql_p(q{
CREATE ROLE svc_orders LOGIN;
GRANT EXECUTE ON FUNCTION saga.receive(uuid, text, jsonb, text, jsonb, text) TO svc_orders;
CREATE ROLE svc_pw LOGIN PASSWORD 's3cret';     -- trust auth; no EXECUTE on saga.receive
CREATE SCHEMA app;
CREATE TABLE app.received (
    seq bigserial PRIMARY KEY,
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    key_seq bigint,         -- the how-many-th message of its key this handler saw
    source text,
    envelope jsonb NOT NULL);
CREATE FUNCTION app.on_order(m jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO app.received (message_id, topic, key, key_seq, source, envelope)
    SELECT (m ->> 'id')::uuid, m ->> 'topic', m ->> 'key',
           CASE WHEN m ->> 'key' IS NOT NULL THEN
               (SELECT count(*) + 1 FROM app.received r WHERE r.key = m ->> 'key') END,
           m ->> 'source', m
$$;
SELECT saga.handle('order.*', 'app.on_order(jsonb)');
CREATE SEQUENCE app.crash_calls;
CREATE TABLE app.refuse (marker text PRIMARY KEY);
CREATE FUNCTION app.inbox_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.topic = 'order.crash' THEN
        PERFORM nextval('app.crash_calls');     -- not undone by a rollback
        PERFORM pg_sleep(0.002);                -- keep statements in flight a while
    END IF;
    IF EXISTS (SELECT FROM app.refuse r WHERE r.marker = NEW.payload ->> 'marker') THEN
        RAISE EXCEPTION 'message % refused: marker %', NEW.message_id, NEW.payload ->> 'marker'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER inbox_guard BEFORE INSERT ON saga.inbox_messages
    FOR EACH ROW EXECUTE FUNCTION app.inbox_guard();
});

# ---- the sender: the destination over TCP, and a record of what was published
osql(qq{
CREATE SCHEMA app;
CREATE TABLE app.published (
    pub_seq bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    topic text NOT NULL,
    n integer NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb);
SELECT saga.create_destination('products', 'postgresql://svc_orders\@127.0.0.1:$pport/postgres',
    '{"timeout": "5s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 1000}');
SELECT saga.subscribe('order.*', 'products');
});

# SQL that publishes messages n = $from..$to of a topic, in order, and
# records them; $key and $headers are SQL expressions of g
sub publish_sql
{
	my ($topic, $from, $to, $key, $headers, $payload) = @_;
	$key //= 'NULL';
	$headers //= 'NULL';
	$payload //= q{jsonb_build_object('n', g)};
	return qq{
	INSERT INTO app.published (id, topic, n, key, payload, headers)
	SELECT saga.publish(topic, payload, key, headers), topic, n, key, payload, headers
	FROM (SELECT '$topic'::text AS topic, g AS n, ($key)::text AS key, ($payload)::jsonb AS payload,
	             ($headers)::jsonb AS headers
	      FROM generate_series($from, $to) g ORDER BY g) s;
	};
}

# ===== 1. 2,000 messages in four transactions, keyed and unkeyed, plus rolled-back ones
# keys that need quoting in an array literal, and one spelled NULL
my $key_expr = q{CASE WHEN g % 2 = 0 THEN (ARRAY['alpha', 'NULL', 'k,"2"', 'k\3', 'k {4}'])[(g / 2) % 5 + 1] END};
my $headers_expr = q{CASE WHEN g % 7 = 0 THEN jsonb_build_object('trace', 't-' || g, 'X-Quote', 'a "b" \\ c') END};
my $payload_expr = q{jsonb_build_object('n', g, 'text', 'quote " backslash \ braces {} comma , ' || g,
	'nested', jsonb_build_array(g, NULL, true, 'ü€', jsonb_build_object('a', '{"b": 1}')))};
my @rolled_back;
for my $t (1 .. 4)
{
	my $publish = publish_sql('order.bulk', ($t - 1) * 500 + 1, $t * 500, $key_expr, $headers_expr, $payload_expr);
	if ($t == 3)
	{
		# a committed transaction with a rolled-back savepoint
		push @rolled_back, split /\n/, osql(qq{BEGIN;
			$publish
			SAVEPOINT s;
			SELECT saga.publish('order.bulk', jsonb_build_object('savepoint', g), 'NULL') FROM generate_series(1, 50) g;
			ROLLBACK TO SAVEPOINT s;
			COMMIT;});
		next;
	}
	osql($publish);
	if ($t == 2)
	{
		push @rolled_back, split /\n/, osql(q{BEGIN;
			SELECT saga.publish('order.bulk', jsonb_build_object('rolled_back', g), 'alpha') FROM generate_series(1, 300) g;
			ROLLBACK;});
	}
}
is(scalar(@rolled_back), 350, 'rolled-back publishes returned 350 ids');
is(osql(q{SELECT count(*) FROM app.published WHERE topic = 'order.bulk'}), '2000', '2,000 messages committed');

wait_delivered('order.bulk', 2000, 'the 2,000 messages are delivered and handled');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM saga.inbox_messages WHERE topic = 'order.bulk'}),
	'2000 2000', "the receiver's inbox holds 2,000 distinct messages");
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.received WHERE topic = 'order.bulk'}),
	'2000 2000', 'the handler took effect 2,000 times, once per message');
is(psql_p(q{SELECT string_agg(DISTINCT coalesce(source, '<null>'), ',') FROM saga.inbox_messages WHERE topic = 'order.bulk'}),
	'orders', "saga.inbox shows the sender's database as source");
{
	my %sent = sent_messages('order.bulk');
	my %got = handled_messages('order.bulk');
	is(scalar(keys %sent) . ' ' . scalar(keys %got), '2000 2000', '2,000 ids published, 2,000 handled');
	my @missing = grep { !$got{$_} } keys %sent;
	my @foreign = grep { !exists $sent{$_} } keys %got;
	my @changed = grep { $got{$_} && $got{$_}[1] ne $sent{$_} } keys %sent;
	is(scalar(@missing), 0, 'every committed message reached the handler')
	  or diag('missing, e.g. ' . join(', ', @missing[ 0 .. ($#missing < 4 ? $#missing : 4) ]));
	is(scalar(@foreign), 0, 'nothing reached it that was not committed');
	is(scalar(@changed), 0, 'key, payload and headers arrived unchanged (quotes, backslashes, braces, non-ASCII, a key spelled NULL)')
	  or diag("sent $sent{$changed[0]}\ngot  $got{$changed[0]}[1]");
	is(join(',', grep { $_->[2] ne 'orders' } values %got), '', "every envelope's source is \"orders\"");
	my %rb = map { $_ => 1 } @rolled_back;
	is(scalar(grep { $rb{$_} } keys %got), 0, 'no message of a rolled-back transaction or savepoint arrived');
	is(psql_p(q{SELECT count(*) FROM saga.inbox_messages WHERE payload ? 'rolled_back' OR payload ? 'savepoint'}),
		'0', 'not even under another id');
	is(psql_p(q{SELECT count(*) FROM saga.inbox_messages WHERE topic = 'order.bulk' AND key = 'NULL'}), '200',
		'the key spelled "NULL" arrived as that text, 200 times');
	is(psql_p(q{SELECT count(*) FROM saga.inbox_messages WHERE topic = 'order.bulk' AND key IS NULL AND headers IS NULL}),
		'857', 'unkeyed messages without headers arrived with SQL NULLs');
}
# per key: the handler saw the messages in publish order
{
	my %rank = map { split /\|/ } split /\n/, osql(q{
		SELECT id || '|' || row_number() OVER (PARTITION BY key ORDER BY pub_seq)
		FROM app.published WHERE topic = 'order.bulk' AND key IS NOT NULL});
	my %seen = map { split /\|/ } split /\n/, psql_p(q{
		SELECT message_id || '|' || key_seq FROM app.received WHERE topic = 'order.bulk' AND key IS NOT NULL});
	is(scalar(keys %rank), 1000, '1,000 keyed messages over 5 keys');
	my @out_of_order = grep { ($seen{$_} // -1) != $rank{$_} } keys %rank;
	is(scalar(@out_of_order), 0, 'each key\'s messages were handled in publish order');
}
is(osql(q{SELECT count(*) FROM saga.outbox}) . ' ' . osql(q{SELECT count(*) FROM saga.dead_letters}), '0 0',
	"the sender's saga.outbox is empty, no dead letters");

# ===== 4. a message the receiver refuses: only it becomes a dead letter
psql_p(q{INSERT INTO app.refuse VALUES ('bad')});
osql(publish_sql('order.poison', 1, 50, undef, undef,
	q{CASE WHEN g = 25 THEN jsonb_build_object('n', g, 'marker', 'bad') ELSE jsonb_build_object('n', g) END}));
my $poison = osql(q{SELECT id FROM app.published WHERE topic = 'order.poison' AND n = 25});
ok($orders->poll_query_until('orders',
		q{SELECT count(*) = 0 FROM saga.outbox WHERE topic = 'order.poison'}),
	'the 50 messages of one transaction are no longer pending');
is(osql(q{SELECT string_agg(message_id || ' ' || destination || ' ' || attempts, ',') FROM saga.dead_letters}),
	"$poison products 1", 'exactly one dead letter: the refused message, after one attempt');
like(osql(qq{SELECT last_error FROM saga.dead_letters WHERE message_id = '$poison'}),
	qr/^products: message $poison refused: marker bad \(SQLSTATE 23514\)$/,
	'its last_error is the remote error with its SQLSTATE');
{
	my @refusals = grep { /saga orders ERROR:  message $poison refused/ } split /\n/, slurp_file($products->logfile);
	is(scalar(@refusals), 2, 'the receiver refused it twice: in the statement that carried the batch, then alone');
}
wait_delivered('order.poison', 49, 'the other 49 are delivered and handled');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) || ' ' || count(*) FILTER (WHERE envelope -> 'payload' ? 'marker')
           FROM app.received WHERE topic = 'order.poison'}), '49 49 0',
	'the 49 took effect once each, the refused one not at all');
psql_p(q{DELETE FROM app.refuse});
is(osql(qq{SELECT saga.redeliver('$poison')}), '1', 'once the receiver accepts it, saga.redeliver() requeues the dead letter');
wait_delivered('order.poison', 50, 'and it is delivered');
is(psql_p(qq{SELECT count(*) FROM app.received WHERE message_id = '$poison'}), '1', 'it took effect once');
{
	my ($rc, $out, $err) = $orders->psql('orders', qq{SELECT saga.redeliver('$poison')});
	like($err, qr/message $poison not found/,
		'saga.redeliver() of a message already delivered is refused: it cannot cause a second delivery');
}

# ===== 2. kill -9 of the sender's worker while statements it sent are
# committing remotely and their outcomes cannot be recorded
for my $t (1 .. 3)
{
	osql(publish_sql('order.crash', ($t - 1) * 1000 + 1, $t * 1000));
}
ok($products->poll_query_until('postgres', q{SELECT count(*) >= 200 FROM saga.inbox_messages WHERE topic = 'order.crash'}),
	'the 3,000 crash-test messages are arriving');
# hold off the worker's next recording (and claim): what it has in flight
# commits remotely, but stays pending here
my $blocker = $orders->background_psql('orders');
$blocker->query_safe('BEGIN; LOCK TABLE saga.queue IN SHARE MODE;');
my $worker = osql(q{SELECT pid FROM saga.worker_status() WHERE kind = 'worker' AND database = 'orders'});
ok($orders->poll_query_until('orders', qq{SELECT count(*) > 0 FROM pg_locks WHERE pid = $worker AND NOT granted}),
	"the worker (pid $worker) waits to record outcomes");
ok($products->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = 'svc_orders' AND state = 'active'}),
	'the statements it had in flight have finished at the receiver');
my $received = psql_p(q{SELECT count(*) FROM saga.inbox_messages WHERE topic = 'order.crash'});
my $pending = osql(q{SELECT count(*) FROM saga.queue WHERE topic = 'order.crash' AND status = 'pending'});
my $unrecorded = $received + $pending - 3000;
cmp_ok($unrecorded, '>', 0,
	"the kill comes with $unrecorded messages received but still pending in the sender ($received received, $pending pending)");
cmp_ok($pending, '>', 0, 'and with messages not yet sent');
kill 'KILL', $worker or die "could not kill $worker: $!";
{
	local $SIG{PIPE} = 'IGNORE';
	eval { $blocker->quit; };    # the crash restart ended its session
}
ok($orders->poll_query_until('orders', qq{SELECT count(*) = 1 FROM saga.worker_status()
		WHERE kind = 'worker' AND database = 'orders' AND pid <> $worker AND state IN ('idle', 'dispatching')}),
	'a new worker runs after the crash restart');
wait_delivered('order.crash', 3000, 'all 3,000 messages are delivered after the crash');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM saga.inbox_messages WHERE topic = 'order.crash'}),
	'3000 3000', 'the inbox holds each once');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.received WHERE topic = 'order.crash'}),
	'3000 3000', 'handler effects equal the published count');
{
	my %sent = sent_messages('order.crash');
	my %got = handled_messages('order.crash');
	is(scalar(keys %sent) . ' ' . scalar(grep { !$got{$_} } keys %sent) . ' ' . scalar(grep { !exists $sent{$_} } keys %got),
		'3000 0 0',
		'exactly the published ids took effect');
}
my $calls = psql_p(q{SELECT last_value FROM app.crash_calls});
cmp_ok($calls, '>=', 3000 + $unrecorded,
	"the receiver was called $calls times: the $unrecorded unrecorded deliveries were sent again and dropped as duplicates");
is(osql(q{SELECT count(*) FROM saga.dead_letters}), '0', 'no dead letters');
like(slurp_file($orders->logfile), qr/saga worker.*\(PID $worker\) was terminated by signal 9/, 'the log shows the kill');
# a duplicate received directly is dropped too
my $dup = osql(q{SELECT id FROM app.published WHERE topic = 'order.crash' AND n = 7});
is(psql_p(qq{SELECT saga.receive('$dup', 'order.crash', '{"again": true}', NULL, NULL, 'orders')}), 'f',
	'saga.receive() of an id already received returns false');
is(psql_p(qq{SELECT count(*) || ' ' || min(payload ->> 'n') FROM saga.inbox_messages WHERE message_id = '$dup'}), '1 7',
	'and leaves the first copy alone');
is(psql_p(qq{SELECT count(*) FROM app.received WHERE message_id = '$dup'}), '1', 'one effect for that id');

# ===== 2b. statements that time out while the receiver is blocked: the
# connection is closed, the statement may still commit there, and the
# messages are sent again; the receiver keeps one of each
psql_p(q{SELECT saga.handle('slow.*', 'app.on_order(jsonb)')});
osql(qq{
SELECT saga.create_destination('slow', 'postgresql://svc_orders\@127.0.0.1:$pport/postgres',
    '{"timeout": "1s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 1000}');
SELECT saga.subscribe('slow.*', 'slow');
});
my $inbox_lock = $products->background_psql('postgres');
$inbox_lock->query_safe('BEGIN; LOCK TABLE saga.inbox_messages IN EXCLUSIVE MODE;');
osql(publish_sql('slow.item', 1, 20, q{CASE WHEN g % 2 = 0 THEN 'slow' END}));
ok($orders->poll_query_until('orders', q{SELECT count(*) FILTER (WHERE attempts >= 2
		AND last_error = 'no answer from destination "slow" within 1000 ms') = 11 FROM saga.outbox WHERE topic = 'slow.item'}),
	'while saga.receive is blocked at the receiver, the statements time out and are retried');
cmp_ok(psql_p(q{SELECT count(*) FROM pg_stat_activity WHERE usename = 'svc_orders' AND wait_event_type = 'Lock'}), '>=', 2,
	'statements of earlier attempts still wait at the receiver');
$inbox_lock->query_safe('COMMIT;');
$inbox_lock->quit;
wait_delivered('slow.item', 20, 'once the receiver is unblocked, the 20 messages are delivered');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.received WHERE topic = 'slow.item'}),
	'20 20', 'each took effect once, however many of the timed-out statements committed');
is(psql_p(q{SELECT string_agg((envelope -> 'payload' ->> 'n') || ':' || key_seq, ',' ORDER BY seq)
           FROM app.received WHERE key = 'slow'}),
	join(',', map { (2 * $_) . ":$_" } 1 .. 10), 'the messages of key "slow" arrived in publish order');

# ===== 3. the receiver is down: messages retry until it is back
$products->stop('immediate');
osql(publish_sql('order.down', 1, 200, q{CASE WHEN g > 180 THEN 'down' END}));
ok($orders->poll_query_until('orders',
		q{SELECT count(*) FILTER (WHERE attempts >= 2) = 181 FROM saga.outbox WHERE topic = 'order.down'}),
	'with the receiver down, the 181 messages that may go (180 unkeyed, the first of key "down") are retried');
my @down = split /\n/, osql(q{SELECT status || '|' || attempts || '|' || coalesce(last_error, '') FROM saga.outbox
                              WHERE topic = 'order.down' ORDER BY attempts DESC});
is(scalar(@down), 200, 'saga.outbox lists all 200');
is(scalar(grep { !/^(retrying|in_flight)\|/ } @down[ 0 .. 180 ]), 0, 'the 181 show as retrying');
is(scalar(grep { !m{^[a-z_]+\|\d+\|(could not connect to|lost the connection to|could not send to) destination "products": } } @down[ 0 .. 180 ]),
	0, 'with a last_error about the connection to destination "products"')
  or diag($down[0]);
like($down[0], qr/Connection refused/, 'the error says the connection was refused');
is(scalar(grep { !/^pending\|0\|$/ } @down[ 181 .. 199 ]), 0, 'the later messages of key "down" wait unsent');
is(osql(q{SELECT count(*) FROM saga.dead_letters}), '0', 'nothing is dead-lettered');
$products->start;
wait_delivered('order.down', 200, 'after the receiver restarts, all 200 arrive');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.received WHERE topic = 'order.down'}),
	'200 200', 'each took effect once');
is(psql_p(q{SELECT string_agg((envelope -> 'payload' ->> 'n') || ':' || key_seq, ',' ORDER BY seq)
           FROM app.received WHERE key = 'down'}),
	join(',', map { ($_ + 180) . ":$_" } 1 .. 20), 'the messages of key "down" arrived in publish order');

# ===== 5. permissions and secrets
my $sockdir = uri_escape_path($products->host);
osql(qq{
SELECT saga.create_destination('noperm', 'postgresql://svc_pw:$secret\@/postgres?host=$sockdir&port=$pport',
    '{"timeout": "5s", "backoff": "200ms", "max_backoff": "1s"}');
SELECT saga.subscribe('audit.*', 'noperm');
});
osql(publish_sql('audit.entry', 1, 3));
ok($orders->poll_query_until('orders', q{SELECT count(*) = 3 FROM saga.dead_letters WHERE destination = 'noperm'}),
	'messages to a role without EXECUTE on saga.receive become dead letters');
is(osql(q{SELECT string_agg(DISTINCT attempts || ' ' || last_error, ',') FROM saga.dead_letters WHERE destination = 'noperm'}),
	'1 noperm: permission denied for function receive (SQLSTATE 42501)', 'after one attempt, with permission denied (42501)');
is(psql_p(q{SELECT count(*) FROM saga.inbox_messages WHERE topic LIKE 'audit.%'}), '0', 'the receiver stored none of them');
osql(q{CREATE ROLE app_user LOGIN});
for my $table (qw(saga.destinations saga.queue))
{
	my ($rc, $out, $err) = $orders->psql('orders', "SELECT * FROM $table",
		connstr => $orders->connstr('orders') . ' user=app_user');
	like($err, qr/permission denied for table \w+/, "a role that is not superuser cannot read $table");
	is($out, '', '... and sees no row');
}

# ===== 6. an unreachable and a silent destination; the others keep going
my $nport = PostgreSQL::Test::Cluster::get_free_port();
my $silent = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 5, ReuseAddr => 1)
  or die "cannot listen: $!";
my $sport = $silent->sockport;
osql(qq{
SELECT saga.create_destination('nowhere', 'postgresql://svc_pw:$secret\@127.0.0.1:$nport/postgres',
    '{"timeout": "2s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 1000}');
SELECT saga.subscribe('lost.*', 'nowhere');
SELECT saga.create_destination('silent', 'postgresql://svc_orders\@127.0.0.1:$sport/postgres',
    '{"timeout": "1s", "backoff": "200ms", "max_backoff": "1s", "max_attempts": 1000}');
SELECT saga.subscribe('quiet.*', 'silent');
});
osql(publish_sql('lost.item', 1, 10) . publish_sql('quiet.item', 1, 10));
ok($orders->poll_query_until('orders', q{SELECT count(*) FILTER (WHERE attempts >= 2) = 10 FROM saga.outbox WHERE topic = 'lost.item'}),
	'messages to a port where nothing listens are retried');
like(osql(q{SELECT string_agg(DISTINCT regexp_replace(last_error, 'port \d+', 'port N'), E'\n') FROM saga.outbox WHERE topic = 'lost.item'}),
	qr/^could not connect to destination "nowhere": .*Connection refused/, 'their last_error is the refused connection');
ok($orders->poll_query_until('orders', q{SELECT count(*) FILTER (WHERE attempts >= 1 AND last_error IS NOT NULL) = 10 FROM saga.outbox WHERE topic = 'quiet.item'}),
	'messages to a server that never answers are retried');
{
	my @errors = split /\n/, osql(q{SELECT DISTINCT last_error FROM saga.outbox WHERE topic = 'quiet.item'});
	is(join("\n", grep { !/^(could not connect to|no connection to) destination "silent" within 1000 ms$/ } @errors), '',
		'their last_error says the destination did not answer within its time-out');
}
my $lost_attempts = osql(q{SELECT min(attempts) FROM saga.outbox WHERE topic = 'lost.item'});
osql(publish_sql('order.meanwhile', 1, 300, q{CASE WHEN g % 3 = 0 THEN 'm' || (g % 4) END}));
wait_delivered('order.meanwhile', 300, 'meanwhile 300 messages to the good destination are delivered');
is(psql_p(q{SELECT count(*) || ' ' || count(DISTINCT message_id) FROM app.received WHERE topic = 'order.meanwhile'}),
	'300 300', 'each took effect once');
ok($orders->poll_query_until('orders', qq{SELECT min(attempts) > $lost_attempts FROM saga.outbox WHERE topic = 'lost.item'}),
	'and the unreachable destination is still being retried');
is(osql(q{SELECT string_agg(DISTINCT destination, ',') || ' '
                  || count(*) FILTER (WHERE status NOT IN ('retrying', 'in_flight')) FROM saga.outbox}),
	'nowhere,silent 0', 'only the messages to the two bad destinations are pending, and retrying')
  or note(osql(q{SELECT destination, status, count(*) FROM saga.outbox GROUP BY 1, 2}));
is(osql(q{SELECT string_agg(DISTINCT destination, ',') FROM saga.dead_letters}), 'noperm',
	'none of them is dead');

# the password in two destination URLs shows nowhere
my %shown = (
	'saga.outbox' => osql(q{SELECT string_agg(o::text, E'\n') FROM saga.outbox o}),
	'saga.dead_letters' => osql(q{SELECT string_agg(d::text, E'\n') FROM saga.dead_letters d}),
	'saga.worker_status()' => osql(q{SELECT string_agg(w::text, E'\n') FROM saga.worker_status() w}),
	'saga.metrics()' => osql(q{SELECT string_agg(m::text, E'\n') FROM saga.metrics() m}),
	# the test cluster logs every statement, the test's own create_destination calls included
	"the sender's log (but for the statements the test ran)" =>
	  join('', grep { !/LOG:  statement: SELECT saga.create_destination\(/ } split /^/, slurp_file($orders->logfile)),
	"the receiver's pg_stat_activity" => psql_p(q{SELECT string_agg(a::text, E'\n') FROM pg_stat_activity a}));
like($shown{'saga.outbox'}, qr/nowhere/, 'saga.outbox shows the errors of "nowhere"');
like($shown{'saga.dead_letters'}, qr/noperm/, 'saga.dead_letters shows those of "noperm"');
for my $where (sort keys %shown)
{
	unlike($shown{$where}, qr/\Q$secret\E/, "$where does not show the password");
}

close($silent);
$orders->stop;
$products->stop;
done_testing();
