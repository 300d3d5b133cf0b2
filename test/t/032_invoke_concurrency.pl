# saga.invoke and saga.compensate under concurrency.
#
# First, each race between two sessions on one key, step by step: the second
# call waits for the first transaction and then returns its result, or runs
# the function itself if the first rolled back; compensate against invoke in
# both orders; REPEATABLE READ callers get a serialization failure instead of
# a second run. In every one, the second call's statement took its snapshot
# before the first transaction committed.
#
# Then many sessions at once: 8 psql processes call invoke on the same keys in
# different orders (some calls rolled back), and race compensate against
# invoke on other keys. All of them first meet on one key whose function is
# held until every session waits for it. A ledger written by the functions proves each effect
# happened at most once per key, that every caller got the stored result, and
# that a compensation ran exactly when its action did.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use JSON::PP;
use SagaTest;

my $node = saga_node('invoke', conf => "log_lock_waits = on\ndeadlock_timeout = 10ms\n");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
	-- with "gate" in ctx, a function waits (in the middle of its run) until
	-- the test releases advisory lock 4242
	CREATE FUNCTION gate(ctx jsonb) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN
		IF ctx ? 'gate' THEN
			PERFORM pg_advisory_lock_shared(4242);
			PERFORM pg_advisory_unlock_shared(4242);
		END IF;
	END $$;
	CREATE TABLE ledger (id bigserial, key text NOT NULL, kind text NOT NULL, session int NOT NULL);
	CREATE FUNCTION act(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO ledger (key, kind, session) VALUES (ctx->>'k', 'do', (ctx->>'s')::int);
		PERFORM pg_sleep(coalesce((ctx->>'sleep')::float8, 0));
		PERFORM gate(ctx);
		RETURN jsonb_build_object('k', ctx->>'k', 's', (ctx->>'s')::int);
	END $$;
	CREATE FUNCTION undo(ctx jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO ledger (key, kind, session) VALUES (ctx->>'k', 'undo', (ctx->>'s')::int);
		PERFORM gate(ctx);
		RETURN jsonb_build_object('undone', ctx->>'k', 's', (ctx->>'s')::int);
	END $$;
});

sub invoke_sql
{
	my ($key, $s, $gate) = @_;
	my $g = $gate ? ', "gate": true' : '';
	return qq{SELECT saga.invoke('$key', 'act(jsonb)', '{"k": "$key", "s": $s$g}')};
}

sub compensate_sql
{
	my ($key, $s, $gate) = @_;
	my $g = $gate ? ', "gate": true' : '';
	return qq{SELECT saga.compensate('$key', 'undo(jsonb)', '{"k": "$key", "s": $s$g}')};
}

# who ran what for a key, as "do:1,undo:2"
sub ledger_of
{
	my ($key) = @_;
	return sql(qq{SELECT coalesce(string_agg(kind || ':' || session, ',' ORDER BY id), '') FROM ledger WHERE key = '$key'});
}

sub status_of
{
	my ($key) = @_;
	return sql(qq{SELECT coalesce((SELECT status FROM saga.invocations WHERE key = '$key'), 'none')});
}

# ---------- two sessions, one key ----------

my $s0 = $node->background_psql('postgres');
my $s1 = $node->background_psql('postgres', on_error_stop => 0);
my $s2 = $node->background_psql('postgres', on_error_stop => 0);
$s2->query_safe('\set VERBOSITY verbose');
my $pid1 = $s1->query_safe('SELECT pg_backend_pid()');
my $pid2 = $s2->query_safe('SELECT pg_backend_pid()');

# Start a statement in a session without waiting for it, and check that it
# blocks on a lock.
sub start_waiting
{
	my ($session, $pid, $stmt, $what) = @_;
	$session->{stderr} = '';
	$session->query_until(qr/started/, "\\echo started\n$stmt;\n");
	ok( $node->poll_query_until('postgres',
			"SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $pid"),
		$what);
}

sub start_blocked
{
	my ($name, $stmt) = @_;
	start_waiting($s2, $pid2, $stmt, "$name: the second call waits for the first transaction");
}

# What a session's pending statement printed: (stdout, stderr).
sub finish
{
	my ($session) = @_;
	my ($out) = $session->query("SELECT 'end-of-statement'");
	my $err = $session->{stderr};
	$session->{stderr} = '';
	$out =~ s/\n?end-of-statement$//;
	return ($out, $err);
}

sub finish_s2 { return finish($s2); }

my ($out, $err);

# invoke vs invoke, first commits: the second returns the first's result
$s1->query_safe('BEGIN; ' . invoke_sql('r1', 1));
start_blocked('invoke/invoke, commit', invoke_sql('r1', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'invoke/invoke, commit: no error');
is($out, '{"k": "r1", "s": 1}', 'invoke/invoke, commit: the second call returns the stored result');
is(ledger_of('r1'), 'do:1', 'invoke/invoke, commit: the action ran once');

# invoke vs invoke, first rolls back: the second runs the action itself
$s1->query_safe('BEGIN; ' . invoke_sql('r2', 1));
start_blocked('invoke/invoke, rollback', invoke_sql('r2', 2));
$s1->query_safe('ROLLBACK');
($out, $err) = finish_s2();
is($err, '', 'invoke/invoke, rollback: no error');
is($out, '{"k": "r2", "s": 2}', 'invoke/invoke, rollback: the second call ran the action');
is(ledger_of('r2'), 'do:2', 'invoke/invoke, rollback: one run, by the second session');

# compensate first (tombstone), invoke waits; tombstone commits: refused
$s1->query_safe('BEGIN; ' . compensate_sql('r3', 1));
start_blocked('tombstone/invoke, commit', invoke_sql('r3', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
like($err, qr/ERROR:  55000: action "r3" was already compensated before it ran/,
	'tombstone/invoke, commit: the late invoke is refused with 55000');
is(ledger_of('r3'), '', 'tombstone/invoke, commit: nothing ran');
is(status_of('r3'), 'tombstone', 'tombstone/invoke, commit: the tombstone stays');

# compensate first, invoke waits; tombstone rolled back: the action runs
$s1->query_safe('BEGIN; ' . compensate_sql('r4', 1));
start_blocked('tombstone/invoke, rollback', invoke_sql('r4', 2));
$s1->query_safe('ROLLBACK');
($out, $err) = finish_s2();
is($err, '', 'tombstone/invoke, rollback: no error');
is($out, '{"k": "r4", "s": 2}', 'tombstone/invoke, rollback: the action ran');
is(status_of('r4'), 'executed', 'tombstone/invoke, rollback: executed');

# compensate vs compensate of an executed action, first commits
sql(invoke_sql('r5', 0));
$s1->query_safe('BEGIN; ' . compensate_sql('r5', 1));
start_blocked('compensate/compensate, commit', compensate_sql('r5', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'compensate/compensate, commit: no error');
is($out, '{"s": 1, "undone": "r5"}', 'compensate/compensate, commit: the second returns the stored compensation');
is(ledger_of('r5'), 'do:0,undo:1', 'compensate/compensate, commit: compensated once');

# compensate vs compensate, first rolls back: the second compensates
sql(invoke_sql('r6', 0));
$s1->query_safe('BEGIN; ' . compensate_sql('r6', 1));
start_blocked('compensate/compensate, rollback', compensate_sql('r6', 2));
$s1->query_safe('ROLLBACK');
($out, $err) = finish_s2();
is($err, '', 'compensate/compensate, rollback: no error');
is($out, '{"s": 2, "undone": "r6"}', 'compensate/compensate, rollback: the second compensated');
is(ledger_of('r6'), 'do:0,undo:2', 'compensate/compensate, rollback: compensated once, by the second');

# invoke first, compensate waits; invoke commits: the compensation runs
$s1->query_safe('BEGIN; ' . invoke_sql('r7', 1));
start_blocked('invoke/compensate, commit', compensate_sql('r7', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'invoke/compensate, commit: no error');
is($out, '{"s": 2, "undone": "r7"}', 'invoke/compensate, commit: the compensation ran');
is(ledger_of('r7'), 'do:1,undo:2', 'invoke/compensate, commit: action then compensation');
is(status_of('r7'), 'compensated', 'invoke/compensate, commit: compensated');

# invoke first, compensate waits; invoke rolls back: tombstone, nothing runs
$s1->query_safe('BEGIN; ' . invoke_sql('r8', 1));
start_blocked('invoke/compensate, rollback', compensate_sql('r8', 2));
$s1->query_safe('ROLLBACK');
($out, $err) = finish_s2();
is($err, '', 'invoke/compensate, rollback: no error');
is($out, '', 'invoke/compensate, rollback: compensate returns NULL');
is(ledger_of('r8'), '', 'invoke/compensate, rollback: nothing ran');
is(status_of('r8'), 'tombstone', 'invoke/compensate, rollback: tombstone');

# a compensation in progress, and a repeat of the action: refused once the
# compensation commits; given the stored result if it rolls back
sql(invoke_sql('r9', 0));
$s1->query_safe('BEGIN; ' . compensate_sql('r9', 1));
start_blocked('compensate/invoke, commit', invoke_sql('r9', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
like($err, qr/ERROR:  55000: action "r9" was already compensated\n/,
	'compensate/invoke, commit: the repeat is refused');
is(ledger_of('r9'), 'do:0,undo:1', 'compensate/invoke, commit: no second run');
sql(invoke_sql('r10', 0));
$s1->query_safe('BEGIN; ' . compensate_sql('r10', 1));
start_blocked('compensate/invoke, rollback', invoke_sql('r10', 2));
$s1->query_safe('ROLLBACK');
($out, $err) = finish_s2();
is($err, '', 'compensate/invoke, rollback: no error');
is($out, '{"k": "r10", "s": 0}', 'compensate/invoke, rollback: the stored result');
is(ledger_of('r10'), 'do:0', 'compensate/invoke, rollback: no second run');

# The second call arrives while the first one's function is still running
# (held at a gate): it waits for the first transaction all the same.
$s0->query_safe('SELECT pg_advisory_lock(4242)');
start_waiting($s1, $pid1, 'BEGIN; ' . invoke_sql('r14', 1, 1), 'invoke in flight: held at the gate');
start_blocked('invoke/invoke, in flight', invoke_sql('r14', 2));
$s0->query_safe('SELECT pg_advisory_unlock(4242)');
($out, $err) = finish($s1);
is($out, '{"k": "r14", "s": 1}', 'invoke/invoke, in flight: the first call ran the action');
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'invoke/invoke, in flight: no error');
is($out, '{"k": "r14", "s": 1}', 'invoke/invoke, in flight: the second call returns the stored result');
is(ledger_of('r14'), 'do:1', 'invoke/invoke, in flight: the action ran once');

sql(invoke_sql('r15', 0));
$s0->query_safe('SELECT pg_advisory_lock(4242)');
start_waiting($s1, $pid1, 'BEGIN; ' . compensate_sql('r15', 1, 1), 'compensation in flight: held at the gate');
start_blocked('compensate/compensate, in flight', compensate_sql('r15', 2));
$s0->query_safe('SELECT pg_advisory_unlock(4242)');
($out, $err) = finish($s1);
is($out, '{"s": 1, "undone": "r15"}', 'compensate/compensate, in flight: the first call compensated');
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'compensate/compensate, in flight: no error');
is($out, '{"s": 1, "undone": "r15"}', 'compensate/compensate, in flight: the second returns the stored compensation');
is(ledger_of('r15'), 'do:0,undo:1', 'compensate/compensate, in flight: compensated once');

$s0->query_safe('SELECT pg_advisory_lock(4242)');
start_waiting($s1, $pid1, 'BEGIN; ' . invoke_sql('r16', 1, 1), 'invoke in flight before compensate: held at the gate');
start_blocked('invoke/compensate, in flight', compensate_sql('r16', 2));
$s0->query_safe('SELECT pg_advisory_unlock(4242)');
finish($s1);
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
is($err, '', 'invoke/compensate, in flight: no error');
is($out, '{"s": 2, "undone": "r16"}', 'invoke/compensate, in flight: compensated after the action committed');
is(ledger_of('r16'), 'do:1,undo:2', 'invoke/compensate, in flight: action, then compensation');

# REPEATABLE READ: a row committed after the transaction's snapshot is a
# serialization failure, never a second run
$s2->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1');
sql(invoke_sql('r11', 1));
($out, $err) = $s2->query(invoke_sql('r11', 2));
like($s2->{stderr}, qr/ERROR:  40001: could not serialize access/,
	'repeatable read, committed after the snapshot: serialization failure');
$s2->{stderr} = '';
$s2->query_safe('ROLLBACK');
is($s2->query_safe(invoke_sql('r11', 2)), '{"k": "r11", "s": 1}', 'repeatable read: the retry gets the stored result');
is(ledger_of('r11'), 'do:1', 'repeatable read: the action ran once');

$s1->query_safe('BEGIN; ' . invoke_sql('r12', 1));
$s2->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1');
start_blocked('repeatable read, invoke/invoke', invoke_sql('r12', 2));
$s1->query_safe('COMMIT');
($out, $err) = finish_s2();
like($err, qr/ERROR:  40001: could not serialize access/,
	'repeatable read, waited for a commit: serialization failure');
$s2->query_safe('ROLLBACK');
is(ledger_of('r12'), 'do:1', 'repeatable read, waited: the action ran once');

sql(invoke_sql('r13', 0));
$s2->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1');
sql(compensate_sql('r13', 1));
$s2->query(compensate_sql('r13', 2));
like($s2->{stderr}, qr/ERROR:  40001: could not serialize access/,
	'repeatable read, compensated after the snapshot: serialization failure');
$s2->{stderr} = '';
$s2->query_safe('ROLLBACK');
is(ledger_of('r13'), 'do:0,undo:1', 'repeatable read: compensated once');

$s1->quit;
$s2->quit;

# ---------- many sessions at once ----------

my $log_offset = -s $node->logfile;

my $nsessions = 8;
my @hot = map { "h:$_" } 1 .. 5;       # every session starts with these, in this order
my @akeys = map { "a:$_" } 1 .. 200;   # invoke only, in a different order per session
my @ckeys = map { "c:$_" } 1 .. 100;   # invoke racing compensate
my $dir = PostgreSQL::Test::Utils::tempdir();
my (%ops, @harness);

$s0->query_safe('SELECT pg_advisory_lock(4242)');

for my $s (1 .. $nsessions)
{
	srand(1000 + $s);
	my @lines = ('\set VERBOSITY verbose');
	my @keys = (@akeys, @ckeys);
	# Fisher-Yates with this session's seed
	for (my $i = $#keys; $i > 0; $i--)
	{
		my $j = int(rand($i + 1));
		@keys[ $i, $j ] = @keys[ $j, $i ];
	}
	for my $k (@hot, @keys)
	{
		my ($n) = $k =~ /:(\d+)$/;
		my $kind;
		my $rollback;
		if ($k =~ /^c:/)
		{
			# each key: compensated by about half of the sessions, invoked by
			# the others; session 1 rolls back what it does
			$kind = ($s + $n) % 2 == 0 ? 'c' : 'i';
			$rollback = $s == 1;
		}
		else
		{
			$kind = 'i';
			$rollback = $k =~ /^a:/ && ($n * 7 + $s) % 10 == 0;
		}
		# the first hot key waits at the gate until every session is queued
		# behind it; the others take a while, so that sessions meet on them
		my $extra = $k eq 'h:1' ? ', "gate": true' : $k =~ /^h:/ ? ', "sleep": 0.05' : '';
		my $ctx = qq[{"k": "$k", "s": $s$extra}];
		my $call = $kind eq 'i'
		  ? "saga.invoke('$k', 'act(jsonb)', '$ctx')"
		  : "saga.compensate('$k', 'undo(jsonb)', '$ctx')";
		my $tag = ($rollback ? 'r' : '') . $kind;
		push @lines, $rollback
		  ? "BEGIN; SELECT '$tag', '$k', $call; ROLLBACK;"
		  : "SELECT '$tag', '$k', $call;";
		$ops{$s}{$k} = { tag => $tag, line => scalar(@lines) };
	}
	PostgreSQL::Test::Utils::append_to_file("$dir/s$s.sql", join("\n", @lines) . "\n");
	push @harness, IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=0', '-d', $node->connstr('postgres'), '-f', "$dir/s$s.sql" ],
		'>', "$dir/s$s.out", '2>', "$dir/s$s.err");
}
ok( $node->poll_query_until('postgres',
		qq{SELECT count(*) = $nsessions FROM pg_stat_activity
		   WHERE wait_event_type = 'Lock' AND query LIKE '%saga.invoke(''h:1''%'}),
	'all sessions meet on the first key: one runs it, the others wait');
$s0->query_safe('SELECT pg_advisory_unlock(4242)');
$s0->quit;
$_->finish for @harness;

# outcome of each statement: its output row, or its error
my %outcome;
my @unexpected;
for my $s (1 .. $nsessions)
{
	for my $line (split /\n/, slurp_file("$dir/s$s.out"))
	{
		my ($tag, $k, $json) = split /\|/, $line, 3;
		push @unexpected, "s$s: two outcomes for $k" if exists $outcome{$s}{$k};
		$outcome{$s}{$k} = { tag => $tag, result => $json eq '' ? undef : decode_json($json) };
	}
	my %lineof = map { $ops{$s}{$_}{line} => $_ } keys %{ $ops{$s} };
	for my $line (split /\n/, slurp_file("$dir/s$s.err"))
	{
		next if $line =~ /^(DETAIL|LOCATION|HINT):/;
		if ($line =~ /^psql:[^:]*:(\d+): ERROR:  (\w{5}): (.*)$/ && defined $lineof{$1})
		{
			my $k = $lineof{$1};
			push @unexpected, "s$s: two outcomes for $k" if exists $outcome{$s}{$k};
			$outcome{$s}{$k} = { error => "$2: $3" };
		}
		else
		{
			push @unexpected, "s$s: $line";
		}
	}
	for my $k (keys %{ $ops{$s} })
	{
		push @unexpected, "s$s: no outcome for $k" unless exists $outcome{$s}{$k};
	}
}

my %ledger;
for my $row (split /\n/, sql(q{SELECT key, kind, session FROM ledger WHERE key ~ '^[ahc]:'}))
{
	my ($k, $kind, $s) = split /\|/, $row;
	push @{ $ledger{$k}{$kind} }, $s;
}
my %status = map { split /\|/ } split /\n/, sql(q{SELECT key, status FROM saga.invocations WHERE key ~ '^[ahc]:'});

is(sql(q{SELECT count(*) || '/' || count(DISTINCT key) FROM ledger WHERE kind = 'do' AND key ~ '^[ah]:'}),
	'205/205', 'invoke-only keys: each action ran exactly once');

my @bad;
for my $k (@hot, @akeys)
{
	my $runner = $ledger{$k}{do}[0];
	push @bad, "$k: status " . ($status{$k} // 'none') unless ($status{$k} // '') eq 'executed';
	for my $s (1 .. $nsessions)
	{
		my $o = $outcome{$s}{$k};
		next unless $o;
		if ($o->{error})
		{
			push @bad, "$k: s$s got $o->{error}";
			next;
		}
		# a committed call got the stored result of the run that committed;
		# a rolled-back call got it too, or ran the action itself
		my $got = $o->{result}{s};
		if ($o->{tag} eq 'i')
		{
			push @bad, "$k: s$s got the result of s$got, the action ran in s$runner" if $got != $runner;
		}
		elsif ($got != $runner && $got != $s)
		{
			push @bad, "$k: rolled-back call in s$s got the result of s$got";
		}
		push @bad, "$k: run by s$s, whose call was rolled back" if $runner == $s && $o->{tag} ne 'i';
	}
}
is(join("\n", @bad), '', 'invoke-only keys: every caller got the result of the one committed run');

@bad = ();
my %final;
for my $k (@ckeys)
{
	my $do = $ledger{$k}{do} // [];
	my $undo = $ledger{$k}{undo} // [];
	my $st = $status{$k} // 'none';
	$final{$st}++;
	if ($st eq 'compensated')
	{
		push @bad, "$k: compensated, but ran " . scalar(@$do) . ' times and was compensated ' . scalar(@$undo) . ' times'
		  unless @$do == 1 && @$undo == 1;
	}
	elsif ($st eq 'tombstone')
	{
		push @bad, "$k: tombstone, but ran " . scalar(@$do) . ' times and was compensated ' . scalar(@$undo) . ' times'
		  unless @$do == 0 && @$undo == 0;
	}
	else
	{
		push @bad, "$k: status $st after committed compensations";
		next;
	}
	for my $s (2 .. $nsessions)		# session 1 rolled back its calls
	{
		my $o = $outcome{$s}{$k};
		next unless $o && !$o->{error};
		if ($o->{tag} eq 'i')
		{
			push @bad, "$k: s$s invoked it after a tombstone" if $st eq 'tombstone';
			push @bad, "$k: s$s got the action result of s$o->{result}{s}"
			  if $st eq 'compensated' && $o->{result}{s} != $do->[0];
		}
		elsif ($st eq 'tombstone')
		{
			push @bad, "$k: s$s got a compensation result for a tombstone" if defined $o->{result};
		}
		else
		{
			push @bad, "$k: s$s got compensation result " . encode_json($o->{result}) . ", but s$undo->[0] compensated"
			  unless defined $o->{result} && $o->{result}{s} == $undo->[0];
		}
	}
	for my $s (1 .. $nsessions)
	{
		my $o = $outcome{$s}{$k};
		next unless $o && $o->{error};
		push @bad, "$k: s$s got $o->{error}"
		  unless $o->{error} =~ /^55000: action "\Q$k\E" was already compensated( before it ran)?$/
		  && $ops{$s}{$k}{tag} =~ /i$/;
	}
}
is(join("\n", @bad), '', 'invoke racing compensate: each action and compensation ran at most once, in that order');
note('invoke racing compensate: ' . join(', ', map { "$_ $final{$_}" } sort keys %final));
ok(($final{compensated} // 0) > 0 && ($final{tombstone} // 0) > 0,
	'both orders occurred (some actions compensated after running, some tombstoned)');

is(join("\n", @unexpected), '', 'no session saw an unexpected error, and every call had one outcome');

# the sessions did contend: some call waited for another's transaction
my $log = substr(slurp_file($node->logfile), $log_offset);
my $waits = () = $log =~ /still waiting for ShareLock on transaction/g;
cmp_ok($waits, '>', 0, "calls waited for each other ($waits lock waits logged)");
is(sql(q{SELECT deadlocks FROM pg_stat_database WHERE datname = 'postgres'}), '0', 'no deadlocks');

$node->stop;
done_testing();
