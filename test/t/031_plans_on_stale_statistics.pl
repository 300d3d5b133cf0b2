# The worker's statements over the queue tables keep their index and TID
# plans when the tables' statistics were taken at an empty moment (a queue
# is empty between bursts; autovacuum may analyze it then). Planned on such
# statistics without care, picking due rows becomes a sort of the whole
# table and recording outcomes a scan of it per batch. auto_explain logs the
# plans the worker actually ran.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

my $node = saga_node('stale_statistics', conf => q{
shared_preload_libraries = 'saga,auto_explain'
auto_explain.log_nested_statements = on
auto_explain.log_min_duration = -1
autovacuum = off
});
wait_for_worker($node);
$node->safe_psql('postgres', 'CREATE DATABASE receiver');
$node->safe_psql('receiver', q{
	CREATE EXTENSION saga;
	CREATE TABLE public.seen (id uuid PRIMARY KEY);
	CREATE FUNCTION public.remember(m jsonb) RETURNS void LANGUAGE sql
		AS $$ INSERT INTO public.seen VALUES ((m->>'id')::uuid) $$;
	SELECT saga.handle('s.*', 'public.remember(jsonb)');
});
my $url = 'postgresql:///receiver?host=' . $node->host . '&port=' . $node->port;
$node->safe_psql('postgres', qq{
	SELECT saga.create_destination('receiver', '$url');
	SELECT saga.create_destination('chan', 'notify:stale_statistics');
	SELECT saga.subscribe('s.*', 'receiver');
	SELECT saga.subscribe('s.*', 'chan');
});

sub publish_and_drain
{
	my ($n, $total) = @_;
	$node->safe_psql('postgres',
		"SELECT count(saga.publish('s.e', jsonb_build_object('n', g))) FROM generate_series(1, $n) g");
	ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM saga.queue'),
		"$n messages delivered to both destinations");
	ok($node->poll_query_until('receiver', "SELECT count(*) = $total FROM public.seen"),
		"and handled in the receiving database ($total in all)");
}

publish_and_drain(3000, 3000);

# statistics of the empty moment: no live rows in pages that are still there
$node->safe_psql('postgres', 'ANALYZE saga.queue');
$node->safe_psql('receiver', 'ANALYZE saga.inbox_messages');
is($node->safe_psql('postgres',
	"SELECT reltuples = 0 AND relpages > 0 FROM pg_class WHERE oid = 'saga.queue'::regclass"),
	't', 'the queue\'s statistics say: no rows');
is($node->safe_psql('receiver',
	"SELECT most_common_vals::text FROM pg_stats WHERE schemaname = 'saga' AND tablename = 'inbox_messages' AND attname = 'status'"),
	'{processed}', 'the inbox\'s statistics say: every message processed');
note('an unconfined plan of the due rows on these statistics: '
	. join(' / ', split /\n/, $node->safe_psql('postgres', q{
		EXPLAIN (COSTS OFF) SELECT c.ctid FROM saga.queue c
		WHERE c.destination = 'receiver' AND c.status = 'pending' AND c.next_attempt_at <= now()
		ORDER BY c.next_attempt_at, c.seq LIMIT 500})));

# from here on, every statement's plan goes to the log
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET auto_explain.log_min_duration = 0;
	SELECT pg_reload_conf();
});
ok($node->poll_query_until('postgres', "SELECT current_setting('auto_explain.log_min_duration') = '0'"),
	'auto_explain logs every plan');
sleep 1;	# the workers read the reloaded file at their next wake-up
publish_and_drain(5000, 8000);
$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET auto_explain.log_min_duration;
	SELECT pg_reload_conf();
});

# the plans the workers ran, by statement
my %plans;
my $log = substr(slurp_file($node->logfile), $log_offset);
for my $entry (split /LOG:  duration: [\d.]+ ms  plan:\n/, $log)
{
	next unless $entry =~ /Query Text: (.*)\n/;
	my $query = $1;
	my $kind =
	    $query =~ /^UPDATE saga\.queue q SET lease_until = \(now/ ? 'claim'
	  : $query =~ /^DELETE FROM saga\.queue q WHERE q\.ctid = ANY \(ARRAY\(SELECT c\.ctid FROM saga\.queue c WHERE c\.destination/ ? 'notify'
	  : $query =~ /^DELETE FROM saga\.queue q WHERE q\.ctid = ANY \(ARRAY\(SELECT pg_catalog\.unnest/ ? 'record'
	  : $query =~ /^SELECT m\.message_id,.*FROM saga\.inbox_messages m/ ? 'inbox claim'
	  : $query =~ /^UPDATE saga\.inbox_messages m/ ? 'inbox record'
	  : $query =~ /^SELECT min\(next_attempt_at\) FROM saga\.queue/ ? 'next due'
	  : $query =~ /^SELECT pg_catalog\.min\(next_attempt_at\) FROM saga\.inbox_messages/ ? 'inbox next due'
	  : next;
	push @{ $plans{$kind} }, $entry;
}

my %expected = (
	'claim' => [qr/Index Scan using queue_due on queue c/, qr/Tid Scan on queue q/],
	'notify' => [qr/Index Scan using queue_due on queue c/, qr/Tid Scan on queue q/],
	'record' => [qr/Tid Scan on queue q/],
	'inbox claim' => [qr/Index Scan using inbox_due on inbox_messages m/],
	'inbox record' => [qr/Index Scan using inbox_messages_pkey on inbox_messages m/],
	'next due' => [qr/Index (Only )?Scan using queue_due on queue/],
	'inbox next due' => [qr/Index (Only )?Scan using inbox_due on inbox_messages/],
);
for my $kind (sort keys %expected)
{
	my @ran = @{ $plans{$kind} // [] };
	ok(@ran > 0, "$kind: plans logged (" . scalar(@ran) . ')');
	my @bad = grep {
		my $plan = $_;
		(grep { $plan !~ $_ } @{ $expected{$kind} })
		  || $plan =~ /Seq Scan on (queue|inbox_messages)|Bitmap Heap Scan|Sort Key|JIT:/
	} @ran;
	is(scalar(@bad), 0, "$kind: every plan uses the index and tuple ids, nothing else")
	  or diag($bad[0]);
}

$node->stop('fast');
unlike(slurp_file($node->logfile), qr/terminated by signal|PANIC|TRAP:/, 'no crash');
done_testing();
