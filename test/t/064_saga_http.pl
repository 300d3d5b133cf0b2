# HTTP steps of worker-driven sagas, against a real HTTP server: the step
# POSTs the saga context with "Idempotency-Key: <saga id>:<step>", the same
# on every retry; the response JSON becomes the step's result; 5xx and
# time-outs are retried; a 4xx fails the saga without compensating the
# refused step; a step whose time-outs exhaust its attempts has an unknown
# outcome and is compensated too; a cancelled saga waits for its call in
# flight before compensating it; a slow service does not stall other sagas;
# a worker killed during a call sends it again with the same key.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use SagaTest;

my $node = saga_node('saga_http', conf => "restart_after_crash = on\n");
wait_for_worker($node);
my ($port, $log) = start_receiver();

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(qq{
SELECT saga.create_destination('svc', 'http://127.0.0.1:$port', '{"timeout": "5s", "concurrency": 16}');
CREATE SCHEMA shop;
CREATE TABLE shop.ledger (saga_id uuid, what text, detail jsonb, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION shop.reserve(ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    INSERT INTO shop.ledger (saga_id, what) VALUES ((ctx ->> 'saga_id')::uuid, 'reserve')
    RETURNING jsonb_build_object('reserved', true)
\$\$;
CREATE FUNCTION shop.release(ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    INSERT INTO shop.ledger (saga_id, what) VALUES ((ctx ->> 'saga_id')::uuid, 'release')
    RETURNING jsonb_build_object('released', true)
\$\$;
-- keeps what the HTTP step answered, as the next step saw it
CREATE FUNCTION shop.ship(ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    INSERT INTO shop.ledger (saga_id, what, detail)
    VALUES ((ctx ->> 'saga_id')::uuid, 'ship', ctx -> 'steps' -> 'charge')
    RETURNING jsonb_build_object('shipped', true)
\$\$;
CREATE FUNCTION shop.local(ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$
    INSERT INTO shop.ledger (saga_id, what) VALUES ((ctx ->> 'saga_id')::uuid, 'local')
    RETURNING '{}'::jsonb
\$\$;
SELECT saga.define('local_only', '{"steps": [{"name": "a", "action": "shop.local"}, {"name": "b", "action": "shop.local"}]}');
});

# A saga reserve -> charge (HTTP, at path) -> ship, with the charge's options.
sub define_order
{
	my ($name, $path, $options) = @_;
	my $charge = encode_json({
		name => 'charge',
		action => { destination => 'svc', path => $path },
		compensation => { destination => 'svc', path => '/echo/refund' },
		backoff => '100ms',
		%$options });
	sql(qq{SELECT saga.define('$name', '{"steps": [
		{"name": "reserve", "action": "shop.reserve", "compensation": "shop.release"},
		$charge,
		{"name": "ship", "action": "shop.ship"}]}')});
}

sub start
{
	my ($name, $input) = @_;
	return sql("SELECT saga.start('$name', '$input')");
}

sub wait_status
{
	my ($id, $status) = @_;
	return $node->poll_query_until('postgres',
		"SELECT status FROM saga.sagas WHERE id = '$id'", $status);
}

# requests the receiver logged for a path prefix
sub requests_to
{
	my ($prefix) = @_;
	return grep { index($_->{path}, $prefix) == 0 } receiver_requests($log);
}

sub ledger
{
	my ($id) = @_;
	return sql("SELECT string_agg(what, ',' ORDER BY at) FROM shop.ledger WHERE saga_id = '$id'");
}

# --- success: ctx posted, key stable, response stored and passed on
define_order('ok_order', '/echo/charge', {});
my $ok = start('ok_order', '{"order": 1, "amount": 30}');
ok(wait_status($ok, 'completed'), 'saga with an HTTP step completes');
my @charge = requests_to('/echo/charge');
is(scalar @charge, 1, 'the HTTP step was sent once');
is(request_header($charge[0], 'Idempotency-Key'), "$ok:charge", 'Idempotency-Key is <saga id>:<step>');
like(request_header($charge[0], 'Content-Type'), qr{application/json}, 'the body is JSON');
my $sent = decode_json($charge[0]{body});
is($sent->{saga_id}, $ok, 'the body is the saga context: saga_id');
is($sent->{input}{amount}, 30, 'the body is the saga context: input');
is($sent->{step}, 'charge', 'the body is the saga context: step');
is_deeply($sent->{steps}{reserve}, { reserved => JSON::PP::true }, 'the context carries earlier results');
is(sql("SELECT result -> 'request' ->> 'saga_id' FROM saga.saga_steps WHERE saga_id = '$ok' AND step = 'charge'"),
	$ok, 'the response JSON is the step result');
is(sql("SELECT detail ->> 'key' FROM shop.ledger WHERE saga_id = '$ok' AND what = 'ship'"),
	"$ok:charge", 'the next step sees the HTTP result in ctx.steps');
is(ledger($ok), 'reserve,ship', 'local steps ran once each');
is(sql("SELECT count(*) FROM saga.queue WHERE saga_call IS NOT NULL"), '0', 'no call is left in the queue');

# --- 5xx twice, then 200: retried with the same key
define_order('flaky_order', '/flaky/2/charge', { max_attempts => 5 });
my $flaky = start('flaky_order', '{"order": 2}');
ok(wait_status($flaky, 'completed'), 'a step answered 500 twice completes on the third attempt');
my @flaky = requests_to('/flaky/2/charge');
is(scalar @flaky, 3, 'three requests');
is(scalar(grep { request_header($_, 'Idempotency-Key') eq "$flaky:charge" } @flaky), 3,
	'every attempt carries the same Idempotency-Key');
is(sql("SELECT attempts FROM saga.saga_steps WHERE saga_id = '$flaky' AND step = 'charge'"), '3',
	'the step records three attempts');

# --- 4xx: business failure, the refused step is not compensated
define_order('refused_order', '/status/402', {});
my $refused = start('refused_order', '{"order": 3}');
ok(wait_status($refused, 'compensated'), 'a 402 fails the saga and it is compensated');
is(scalar(requests_to('/status/402')), 1, 'a 4xx is not retried');
is(sql("SELECT status FROM saga.saga_steps WHERE saga_id = '$refused' AND step = 'charge'"), 'failed',
	'the refused step is failed');
is(scalar(grep { request_header($_, 'Idempotency-Key') eq "$refused:charge:compensation" } requests_to('/echo/refund')),
	0, 'a refused step is not compensated');
is(ledger($refused), 'reserve,release', 'the reservation was released');
like(sql("SELECT error FROM saga.sagas WHERE id = '$refused'"), qr/step "charge" failed: HTTP 402/,
	'the saga error names the step and the HTTP status');

# --- time-outs until the attempts run out: outcome unknown, compensated
define_order('hung_order', '/hang/charge', { timeout => '300ms', max_attempts => 2 });
my $hung = start('hung_order', '{"order": 4}');
ok(wait_status($hung, 'compensated'), 'a step that keeps timing out fails the saga');
my @hung = requests_to('/hang/charge');
is(scalar @hung, 2, 'the hanging step was tried max_attempts times');
is(sql("SELECT status FROM saga.saga_steps WHERE saga_id = '$hung' AND step = 'charge'"), 'compensated',
	'a step with an unknown outcome is compensated');
my @refund = grep { request_header($_, 'Idempotency-Key') eq "$hung:charge:compensation" } requests_to('/echo/refund');
is(scalar @refund, 1, 'its compensation was called once, with key <saga id>:<step>:compensation');
is(ledger($hung), 'reserve,release', 'then the reservation was released (newest first)');
is(sql("SELECT string_agg(e ->> 'event', ',') FROM jsonb_array_elements(saga.get('$hung') -> 'timeline') e WHERE e ->> 'step' = 'charge'"),
	'step outcome unknown,step compensated', 'saga.get: the timeline says the outcome was unknown, then compensated');
ok($refund[0]{time} > $hung[1]{time}, 'the refund came after the last attempt');

# --- a hang, then the service recovers
define_order('recovering_order', '/hang-then-ok/1/charge', { timeout => '300ms', max_attempts => 3 });
my $recovering = start('recovering_order', '{"order": 5}');
ok(wait_status($recovering, 'completed'), 'a step that timed out once completes on retry');
is(scalar(grep { request_header($_, 'Idempotency-Key') eq "$recovering:charge" } requests_to('/hang-then-ok/1/charge')),
	2, 'the retry carried the same key');

# --- a slow service does not stall local sagas; cancel waits for the call
define_order('slow_order', '/hang/charge-slow', { timeout => '4s', max_attempts => 3 });
my $slow = start('slow_order', '{"order": 6}');
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM saga.queue WHERE saga_call ->> 'saga_id' = '$slow' AND lease_until IS NOT NULL")
  or die 'the slow call was not sent';
my @locals = map { start('local_only', '{}') } 1 .. 20;
my $in = join(',', map { "'$_'" } @locals);
ok($node->poll_query_until('postgres', "SELECT count(*) = 20 FROM saga.sagas WHERE id IN ($in) AND status = 'completed'"),
	'20 local sagas complete while an HTTP step hangs');
is(sql("SELECT status FROM saga.sagas WHERE id = '$slow'"), 'running', 'the slow saga is still running');
is(sql("SELECT status FROM saga.saga_steps WHERE saga_id = '$slow' AND step = 'charge'"), 'running',
	'its HTTP step shows as running');
sql("SELECT saga.cancel('$slow', 'customer cancelled')");
is(sql("SELECT status FROM saga.sagas WHERE id = '$slow'"), 'compensating', 'cancelled while the call is in flight');
ok(wait_status($slow, 'compensated'), 'the cancelled saga is compensated once the call has ended');
my @slow = requests_to('/hang/charge-slow');
my @slow_refund = grep { request_header($_, 'Idempotency-Key') eq "$slow:charge:compensation" } requests_to('/echo/refund');
is(scalar @slow, 1, 'the call in flight was not retried after the cancel');
is(scalar @slow_refund, 1, 'the call with an unknown outcome was compensated');
ok($slow_refund[0]{time} >= $slow[0]{time} + 3.5, 'the compensation waited for the call to time out');
is(sql("SELECT error FROM saga.sagas WHERE id = '$slow'"), 'customer cancelled', 'the reason is kept');

# --- an application-driven saga with an HTTP compensation and a body
my $app = sql("SELECT saga.begin('app_http', '{\"order\": 7}')");
sql(qq{SELECT saga.step('$app', 'book', '{"destination": "svc", "path": "/echo/unbook", "body": {"booking": 99}}')});
sql("SELECT saga.fail('$app', 'payment declined')");
ok(wait_status($app, 'compensated'), 'an application-driven saga compensates through HTTP');
my @unbook = requests_to('/echo/unbook');
is(scalar @unbook, 1, 'the compensation was posted once');
is_deeply(decode_json($unbook[0]{body}), { booking => 99 }, 'with the registered body');
is(request_header($unbook[0], 'Idempotency-Key'), "$app:book:compensation", 'and the compensation key');

# --- the worker is killed while a call is in flight: sent again, same key
define_order('crash_order', '/hang-then-ok/1/crash', { timeout => '20s', max_attempts => 2 });
my $crash = start('crash_order', '{"order": 8}');
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM saga.queue WHERE saga_call ->> 'saga_id' = '$crash' AND lease_until IS NOT NULL")
  or die 'the call was not sent';
my $pid = sql("SELECT pid FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres'");
kill 'KILL', $pid;
ok(wait_status($crash, 'completed'), 'after a crash the saga completes');
my @crash = requests_to('/hang-then-ok/1/crash');
is(scalar @crash, 2, 'the call was sent again after the crash');
is(scalar(grep { request_header($_, 'Idempotency-Key') eq "$crash:charge" } @crash), 2, 'with the same key');
is(sql("SELECT attempts FROM saga.saga_steps WHERE saga_id = '$crash' AND step = 'charge'"), '1',
	'the resent call counts as the same attempt');
is(ledger($crash), 'reserve,ship', 'local steps ran once each across the crash');

$node->stop;
done_testing();
