# Per-key ordering at a real receiver: messages with the same key reach a
# destination in publish order, even while an earlier one is retried; other
# keys and messages without a key are not held up.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;
use SagaTest;

my $node = saga_node('ordering');
my ($port, $log, $rpid) = start_receiver();
wait_for_worker($node);
my $base = "http://127.0.0.1:$port";


sub sql { return $node->safe_psql('postgres', $_[0]); }

# Publish in one transaction with a PL/pgSQL body (so the order is the
# order of the statements), and return the queued rows of that destination
# in publish (seq) order, read before COMMIT: [{id, key, n}, ...].
sub publish_in_order
{
	my ($dest, $body) = @_;
	my $out = sql(qq{
		BEGIN;
		DO \$\$ BEGIN $body END \$\$;
		SELECT json_build_object('id', message_id, 'key', key, 'n', payload->'n')
		FROM saga.queue WHERE destination = '$dest' AND status = 'pending' ORDER BY seq;
		COMMIT;
	});
	return map { decode_json($_) } grep { /^\{/ } split /\n/, $out;
}

# log entries at one path: [index in the log, id, status]
sub log_at
{
	my ($path) = @_;
	my @all = receiver_requests($log);
	my @out;
	for my $i (0 .. $#all)
	{
		next unless $all[$i]{path} eq $path;
		push @out, { idx => $i, id => lc(request_header($all[$i], 'Idempotency-Key') // ''), status => $all[$i]{status} };
	}
	return @out;
}

# Check I7 for the messages of one destination: per key, the order of first
# successful deliveries equals publish order, and no attempt of a message
# is made before the previous message of its key succeeded. Returns the
# number of violations (and reports the first few).
sub check_key_order
{
	my ($label, $msgs, $entries) = @_;
	my (%first_ok, %first_try, %oks);
	for my $e (@$entries)
	{
		$first_try{ $e->{id} } //= $e->{idx};
		if ($e->{status} == 200)
		{
			$first_ok{ $e->{id} } //= $e->{idx};
			$oks{ $e->{id} }++;
		}
	}
	my %by_key;
	push @{ $by_key{ $_->{key} } }, $_ for grep { defined $_->{key} } @$msgs;

	my $missing = grep { !defined $first_ok{ lc $_->{id} } } @$msgs;
	is($missing, 0, "$label: every message was delivered");
	my $dups = grep { ($oks{ lc $_->{id} } // 0) > 1 } @$msgs;
	is($dups, 0, "$label: no message was answered 200 twice");

	my ($order_bad, $overtake) = (0, 0);
	for my $key (sort keys %by_key)
	{
		my @ids = map { lc $_->{id} } @{ $by_key{$key} };
		my @by_success = sort { ($first_ok{$a} // 1e9) <=> ($first_ok{$b} // 1e9) } @ids;
		if ("@by_success" ne "@ids")
		{
			$order_bad++;
			diag("$label: key $key delivered out of order") if $order_bad <= 3;
		}
		for my $i (1 .. $#ids)
		{
			my ($prev, $cur) = ($ids[ $i - 1 ], $ids[$i]);
			next unless defined $first_try{$cur} && defined $first_ok{$prev};
			if ($first_try{$cur} < $first_ok{$prev})
			{
				$overtake++;
				diag("$label: key $key: message $i was sent before message " . ($i - 1) . " succeeded")
				  if $overtake <= 3;
			}
		}
	}
	is($order_bad, 0, "$label: per key, first successful delivery order = publish order");
	is($overtake, 0, "$label: no message was sent before its key's previous one succeeded");
	return (\%first_try, \%first_ok);
}

# ---------------------------------------------------------------- a blocked key
# /flaky/2 fails the first two requests of every message, so each message
# needs three attempts; K's later messages must wait for the earlier ones.
sql(qq{
	SELECT saga.create_destination('ord', '$base/flaky/2/ord',
		'{"max_attempts": 20, "backoff": "300ms", "max_backoff": "1s", "concurrency": 16}');
	SELECT saga.subscribe('ord.*', 'ord');
});
my @msgs = publish_in_order('ord', q{
	PERFORM saga.publish('ord.e', '{"n": "K1"}', 'K');
	PERFORM saga.publish('ord.e', '{"n": "L1"}', 'L');
	PERFORM saga.publish('ord.e', '{"n": "N1"}');
	PERFORM saga.publish('ord.e', '{"n": "K2"}', 'K');
	PERFORM saga.publish('ord.e', '{"n": "L2"}', 'L');
	PERFORM saga.publish('ord.e', '{"n": "N2"}');
	PERFORM saga.publish('ord.e', '{"n": "K3"}', 'K');
});
is(scalar(@msgs), 7, 'seven messages queued');
my %id_of = map { $_->{n} => lc $_->{id} } @msgs;
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE destination = 'ord'"),
	'all delivered');
my @entries = log_at('/flaky/2/ord');
my ($first_try, $first_ok) = check_key_order('blocked key', \@msgs, \@entries);
for my $n (qw(K1 L1 N1 K2 L2 N2 K3))
{
	my @tries = grep { $_->{id} eq $id_of{$n} } @entries;
	is_deeply([ map { $_->{status} } @tries ], [ 500, 500, 200 ], "$n: three attempts, the last one 200");
}
for my $n (qw(L1 N1 N2))
{
	ok(defined $first_try->{ $id_of{$n} } && defined $first_ok->{ $id_of{K1} }
		  && $first_try->{ $id_of{$n} } < $first_ok->{ $id_of{K1} },
		"$n was sent while K1 was still failing (not blocked by key K)");
}

# ---------------------------------------------------------------- many keys, one go
sql(qq{
	SELECT saga.create_destination('many', '$base/ok/many', '{"concurrency": 8}');
	SELECT saga.subscribe('many.*', 'many');
});
@msgs = publish_in_order('many', q{
	FOR i IN 1..25 LOOP
		FOR k IN 1..20 LOOP
			PERFORM saga.publish('many.e', jsonb_build_object('n', i * 100 + k), 'key-' || k);
		END LOOP;
		PERFORM saga.publish('many.e', jsonb_build_object('n', i), NULL);
		PERFORM saga.publish('many.e', jsonb_build_object('n', -i), NULL);
	END LOOP;
});
is(scalar(@msgs), 550, '550 messages queued');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE destination = 'many'"),
	'all delivered');
@entries = log_at('/ok/many');
is(scalar(@entries), 550, 'the receiver saw 550 requests');
check_key_order('20 keys x 25 at concurrency 8', \@msgs, \@entries);

# ---------------------------------------------------------------- many keys, every message retried
sql(qq{
	SELECT saga.create_destination('manyflaky', '$base/flaky/1/many',
		'{"concurrency": 4, "backoff": "20ms", "max_backoff": "100ms", "max_attempts": 10}');
	SELECT saga.subscribe('mf.*', 'manyflaky');
});
@msgs = publish_in_order('manyflaky', q{
	FOR i IN 1..12 LOOP
		FOR k IN 1..8 LOOP
			PERFORM saga.publish('mf.e', jsonb_build_object('n', i * 100 + k), 'fk-' || ((k * 7 + i) % 8));
		END LOOP;
	END LOOP;
});
is(scalar(@msgs), 96, '96 messages queued');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE destination = 'manyflaky'"),
	'all delivered');
@entries = log_at('/flaky/1/many');
is(scalar(@entries), 192, 'the receiver saw two requests per message');
check_key_order('8 keys x 12, each retried once, concurrency 4', \@msgs, \@entries);

# ---------------------------------------------------------------- one transaction per message
# each publish commits on its own while earlier ones are already being sent
sql(qq{
	SELECT saga.create_destination('seqtx', '$base/flaky/1/seqtx',
		'{"concurrency": 8, "backoff": "20ms", "max_backoff": "100ms", "max_attempts": 10}');
	SELECT saga.subscribe('st.*', 'seqtx');
});
my $stmts = join "\n", map {
	my $k = $_ % 3 ? 'S' : 'T';
	"SELECT json_build_object('id', saga.publish('st.e', '{\"n\": $_}', '$k'), 'key', '$k', 'n', $_);"
} 1 .. 30;
@msgs = map { decode_json($_) } grep { /^\{/ } split /\n/, sql($stmts);
is(scalar(@msgs), 30, '30 messages published in 30 transactions');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM saga.queue WHERE destination = 'seqtx'"),
	'all delivered');
@entries = log_at('/flaky/1/seqtx');
check_key_order('one transaction per message', \@msgs, \@entries);

kill 'TERM', $rpid;
$node->stop;
done_testing();
