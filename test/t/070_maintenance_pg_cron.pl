# saga.schedule_maintenance() with a real pg_cron (Debian's
# postgresql-15-cron): the job belongs to the extension's owner whoever
# schedules it, and there is one per database: scheduling again changes its
# schedule. pg_cron checks the schedule. The job really runs: it purges old
# completed and compensated sagas with their steps, old invocations and old
# kept messages, keeps failed and running sagas, dead letters and newer rows,
# and its deadline sweep brings a saga whose wake-up was lost to the worker.
# saga.unschedule_maintenance() removes the job.
#
# pg_cron 1.4 schedules by the minute at the finest (no "N seconds"), so the
# test waits for the next minute to start (at most 90 s).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use SagaTest;

# pg_cron runs its jobs over libpq: point it at the test's socket directory
my $host = $PostgreSQL::Test::Cluster::test_pghost;
my $node = saga_node('maintenance_pg_cron', conf => qq{
shared_preload_libraries = 'saga,pg_cron'
cron.database_name = 'postgres'
cron.host = '$host'
# the worker drops kept messages after saga.message_retention itself; keep
# them longer here, so that only the purge can remove the old one
saga.message_retention = '30d'
});
wait_for_worker($node);

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql('CREATE EXTENSION pg_cron');
my $owner = sql(q{SELECT extowner::regrole FROM pg_extension WHERE extname = 'saga'});
my $jobname = 'saga maintenance (postgres)';
my $command = 'SELECT saga._sweep_deadlines(), saga.purge()';

# An administrator who may schedule maintenance, with no right on pg_cron or
# on saga's tables.
sql(q{CREATE ROLE maint_admin LOGIN;
GRANT EXECUTE ON FUNCTION saga.schedule_maintenance(text), saga.unschedule_maintenance() TO maint_admin});
sub as_admin { return sql("SET ROLE maint_admin; $_[0]"); }

sub jobs
{
	return sql(q{SELECT jobid, jobname, schedule, command, database, username, active
	             FROM cron.job ORDER BY jobid});
}

# ---- what the job will find

sql(q{
CREATE FUNCTION pg_temp.saga_row(name text, st text, age interval, nsteps integer,
                                 deadline timestamptz DEFAULT NULL) RETURNS void
LANGUAGE sql AS $$
    WITH s AS (
        INSERT INTO saga.instances (id, name, driver, status, input, owner, started_at, updated_at,
                                    finished_at, deadline)
        VALUES (gen_random_uuid(), name, 'application', st, '{}', 10, now() - age - interval '1 minute',
                now() - age, CASE WHEN st IN ('completed', 'compensated', 'failed') THEN now() - age END,
                deadline)
        RETURNING id)
    INSERT INTO saga.instance_steps (saga_id, position, step, status, finished_at)
    SELECT s.id, g, 'step' || g, 'done', now() - age FROM s, generate_series(0, nsteps - 1) g
$$;
SELECT pg_temp.saga_row('old_completed', 'completed', '8 days', 2);
SELECT pg_temp.saga_row('old_compensated', 'compensated', '8 days', 1);
SELECT pg_temp.saga_row('new_completed', 'completed', '1 hour', 1);
SELECT pg_temp.saga_row('old_failed', 'failed', '8 days', 1);
SELECT pg_temp.saga_row('old_running', 'running', '8 days', 1, now() + interval '1 day');
-- past its deadline, but nothing due: the wake-up that should have
-- compensated it was lost
SELECT pg_temp.saga_row('lost_wakeup', 'running', '1 hour', 0, now() - interval '1 minute');

INSERT INTO saga.invocations (key, status, fn, result, invoked_at, invoked_by)
VALUES ('old-executed', 'executed', 'public.f(jsonb)', '{}', now() - interval '8 days', 10),
       ('new-executed', 'executed', 'public.f(jsonb)', '{}', now() - interval '1 hour', 10);
INSERT INTO saga.invocations (key, status, compensation_fn, compensated_at, compensated_by)
VALUES ('old-tombstone', 'tombstone', 'public.g(jsonb)', now() - interval '8 days', 10);

INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at, attempts, status, finished_at)
VALUES (gen_random_uuid(), 'nowhere', 'old.kept', '{}', now(), 1, 'delivered', now() - interval '8 days'),
       (gen_random_uuid(), 'nowhere', 'new.kept', '{}', now(), 1, 'delivered', now() - interval '1 hour'),
       (gen_random_uuid(), 'nowhere', 'old.dead', '{}', now(), 10, 'dead', now() - interval '8 days');
});
my $t0 = sql('SELECT clock_timestamp()');

sub sagas
{
	return sql(q{SELECT i.name || ':' || i.status || ':' || (SELECT count(*) FROM saga.instance_steps x WHERE x.saga_id = i.id)
	             FROM saga.instances i ORDER BY i.name});
}
sub rest
{
	return sql(q{SELECT string_agg(key || ':' || status, ',' ORDER BY key) FROM saga.invocations})
	  . ' / ' . sql(q{SELECT string_agg(topic || ':' || status, ',' ORDER BY topic) FROM saga.queue});
}

# the worker has cycled since, and left the saga with the lost wake-up alone
ok($node->poll_query_until('postgres',
		qq{SELECT last_cycle_at > '$t0' FROM saga.worker_status() WHERE kind = 'worker'}),
	'the worker cycles');
is(sql(q{SELECT status FROM saga.instances WHERE name = 'lost_wakeup'}), 'running',
	'without the sweep, the worker does not see a saga past its deadline with nothing due');

# ---- scheduling

my $jobid = as_admin('SELECT saga.schedule_maintenance()');
like($jobid, qr/^\d+$/, 'schedule_maintenance() returns the job id');
is(jobs(), "$jobid|$jobname|*/10 * * * *|$command|postgres|$owner|t",
	'one job, every 10 minutes, in this database, owned by the extension owner although an administrator scheduled it');

my ($rc, $out, $err) = $node->psql('postgres', q{SELECT saga.schedule_maintenance('every minute')});
like($err, qr/ERROR:  invalid schedule: every minute/, 'a bad schedule gets pg_cron\'s error');
($rc, $out, $err) = $node->psql('postgres', q{SELECT saga.schedule_maintenance('30 seconds')});
like($err, qr/ERROR:  invalid schedule: 30 seconds/, 'pg_cron 1.4 has no schedules in seconds');
is(jobs(), "$jobid|$jobname|*/10 * * * *|$command|postgres|$owner|t", 'a refused schedule changes nothing');

# ---- rescheduling, and the job running

is(sql(q{SELECT saga.schedule_maintenance('* * * * *')}), $jobid, 'scheduling again returns the same job');
is(jobs(), "$jobid|$jobname|* * * * *|$command|postgres|$owner|t", 'still one job, with the new schedule');

{
	local $PostgreSQL::Test::Utils::timeout_default = 90;
	ok($node->poll_query_until('postgres',
			qq{SELECT count(*) > 0 FROM cron.job_run_details
			   WHERE jobid = $jobid AND start_time > '$t0' AND status IN ('succeeded', 'failed')}),
		'the job ran within 90 s')
	  or diag(sql('SELECT * FROM cron.job_run_details'));
}
is(sql(qq{SELECT status, return_message, username, database FROM cron.job_run_details
          WHERE jobid = $jobid AND start_time > '$t0' ORDER BY runid LIMIT 1}),
	"succeeded|1 row|$owner|postgres", 'it succeeded, as the extension owner, in this database');

# (the worker may already be compensating the saga with the lost wake-up)
my $after = sagas();
$after =~ s/lost_wakeup:(running|compensating|compensated)/lost_wakeup:*/;
is($after, join("\n",
		'lost_wakeup:*:0',
		'new_completed:completed:1',
		'old_failed:failed:1',
		'old_running:running:1'),
	'old completed and compensated sagas are gone with their steps; failed, running and new ones stay');
is(sql(q{SELECT count(*) FROM saga.instance_steps x WHERE NOT EXISTS (SELECT FROM saga.instances i WHERE i.id = x.saga_id)}),
	'0', 'no step is left without its saga');
is(rest(), 'new-executed:executed / new.kept:delivered,old.dead:dead',
	'old invocations and old kept messages are gone; newer ones and dead letters stay');

# the sweep made the saga due; the worker compensated it
ok($node->poll_query_until('postgres', q{SELECT status = 'compensated' FROM saga.instances WHERE name = 'lost_wakeup'}),
	'the deadline sweep brought the saga with the lost wake-up to the worker, which compensated it');

# ---- unscheduling

is(as_admin('SELECT saga.unschedule_maintenance()'), 't', 'unschedule_maintenance() removes the job');
is(sql('SELECT count(*) FROM cron.job'), '0', 'no job is left');
is(as_admin('SELECT saga.unschedule_maintenance()'), 'f', 'a second unschedule finds nothing');

$node->stop;
done_testing();
