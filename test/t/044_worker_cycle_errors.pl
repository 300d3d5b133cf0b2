# A cycle that fails with an ERROR is logged and retried by the same worker
# process; it never crashes the worker (which would restart the whole
# cluster). Two ways to make a cycle fail: a trigger that refuses the
# worker's DELETE for a while, and DROP EXTENSION committing while the
# worker waits for the extension's tables (in a second database, so that a
# worker stuck in the first cannot hold it up).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
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
my $end = time() + 30;
while (time() < $end)
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
ok(Test::More->builder->is_passing && wait_until($node, 'SELECT count(*) = 0 FROM saga.queue'),
	'which goes on delivering');
unlike(slurp_file($node->logfile), qr/terminated by signal/,
	'no process was terminated by a signal');

# --- DROP EXTENSION commits while the worker waits for saga.destinations
$node->safe_psql('postgres', 'CREATE DATABASE dropper');
$node->safe_psql('dropper', 'CREATE EXTENSION saga');
ok(wait_until($node, q{SELECT count(*) = 1 FROM pg_stat_activity
	WHERE backend_type = 'saga worker' AND datname = 'dropper'}),
	'the second database gets a worker');
my $dropper = worker_pid($node, 'dropper');
$offset = -s $node->logfile;
$node->safe_psql('dropper', q{
	BEGIN;
	DROP EXTENSION saga;
	SELECT pg_sleep(1);
	COMMIT;
});
ok(wait_until($node, q{SELECT count(*) = 0 FROM pg_stat_activity
	WHERE backend_type = 'saga worker' AND datname = 'dropper'}),
	'the worker leaves after DROP EXTENSION');
my $end_watch = time() + 2;
my $back = 0;
while (time() < $end_watch)
{
	$back ||= $node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity
		WHERE backend_type = 'saga worker' AND datname = 'dropper'});
	usleep(100_000);
}
is($back, 0, 'and stays away (it is not restarted as after a failure)');
my $text = slurp_file($node->logfile, $offset);
like($text, qr/\[$dropper\] LOG:  saga worker exiting: extension "saga" is not installed/,
	'it says why it leaves');
unlike($text, qr/background worker "saga worker" \(PID $dropper\) exited with exit code [^0]/,
	'with exit code 0');
unlike($text, qr/terminated by signal/, 'no process was terminated by a signal');

# a worker stuck in a loop does not answer SIGTERM
if (Test::More->builder->is_passing)
{
	$node->stop('fast');
}
else
{
	$node->stop('immediate');
}
done_testing();

sub worker_pid
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'saga worker' AND datname = '$db'");
}

# Poll until the query returns true, for at most 30 seconds (generous: it
# takes well under a second), so that a stuck worker fails the test quickly.
sub wait_until
{
	my ($node, $sql) = @_;
	my $end = time() + 30;
	while (time() < $end)
	{
		my ($ret, $out) = $node->psql('postgres', $sql);
		return 1 if $ret == 0 && $out eq 't';
		usleep(100_000);
	}
	return 0;
}
