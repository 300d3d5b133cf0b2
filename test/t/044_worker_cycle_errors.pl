# A cycle that fails with an ERROR is logged and retried by the same worker
# process; it never crashes the worker (which would restart the whole
# cluster). Two ways to make a cycle fail: a trigger that refuses the
# worker's DELETE for a while, and DROP EXTENSION committing while the
# worker waits for the extension's tables.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use SagaTest;

# a crash must show up in the assertions below, not end the test early
my $node = saga_node('cycle_errors', conf => "restart_after_crash = on\n");
wait_for_worker($node);
my $worker = worker_pid($node);

$node->safe_psql('postgres', q{
	SELECT saga.create_destination('chan', 'notify:saga_errors');
	SELECT saga.subscribe('err.*', 'chan');
	CREATE TABLE public.refuse (refuse boolean NOT NULL);
	INSERT INTO public.refuse VALUES (true);
	CREATE FUNCTION public.refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT refuse FROM public.refuse) THEN
			RAISE EXCEPTION 'delete refused by the test';
		END IF;
		RETURN OLD;
	END $$;
	CREATE TRIGGER refuse_delete BEFORE DELETE ON saga.queue
		FOR EACH ROW EXECUTE FUNCTION public.refuse_delete();
});

# --- failing cycles: the dispatch's DELETE errors out, three times
my $offset = -s $node->logfile;
$node->safe_psql('postgres', q{SELECT saga.publish('err.test', '{"n": 1}')});
my $errors = 0;
for (1 .. 60 * 10)
{
	my $text = slurp_file($node->logfile, $offset);
	$errors = () = $text =~ /ERROR:  delete refused by the test/g;
	last if $errors >= 3 || $text =~ /terminated by signal/;
	usleep(100_000);
}
is($errors, 3, 'the failing cycle is logged and retried');
$node->safe_psql('postgres', 'UPDATE public.refuse SET refuse = false');
ok(wait_until($node, 'SELECT count(*) = 0 FROM saga.queue'),
	'once the cause is gone the message is delivered');
is(worker_pid($node), $worker, 'by the same worker process');
$node->safe_psql('postgres', q{SELECT saga.publish('err.test', '{"n": 2}')});
ok(wait_until($node, 'SELECT count(*) = 0 FROM saga.queue'), 'which goes on delivering');
unlike(slurp_file($node->logfile), qr/terminated by signal/,
	'no process was terminated by a signal');

# --- DROP EXTENSION commits while the worker waits for saga.destinations
$node->safe_psql('postgres', 'DROP TRIGGER refuse_delete ON saga.queue');
$worker = worker_pid($node);
$offset = -s $node->logfile;
$node->safe_psql('postgres', q{
	BEGIN;
	DROP EXTENSION saga;
	SELECT pg_sleep(1);
	COMMIT;
});
ok(wait_until($node, q{SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'saga worker'}),
	'the worker leaves after DROP EXTENSION');
my $text = slurp_file($node->logfile, $offset);
like($text, qr/saga worker exiting: extension "saga" is not installed/,
	'it says why it leaves');
like($text, qr/background worker "saga worker" \(PID $worker\) exited with exit code 0/,
	'and exits with code 0');
unlike($text, qr/terminated by signal/, 'no process was terminated by a signal');

$node->stop('fast');
done_testing();

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker'");
}

# poll_query_until with a one-minute limit, so a hung worker fails fast
sub wait_until
{
	my ($node, $sql) = @_;
	local $PostgreSQL::Test::Utils::timeout_default = 60;
	return $node->poll_query_until('postgres', $sql);
}
