# Schema and privilege contracts: run the pgTAP scripts in test/pgtap with
# pg_prove against a real cluster that has saga preloaded.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/..";
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use SagaTest;

my @scripts = sort glob("$FindBin::Bin/../pgtap/*.sql");
ok(scalar(@scripts) >= 3, 'pgTAP scripts found: ' . join(', ', map { s{.*/}{}r } @scripts));

my $node = saga_node('pgtap');
wait_for_worker($node);
$node->safe_psql('postgres', 'CREATE EXTENSION pgtap');

# One pg_prove run per script, so a failure names its file.
for my $script (@scripts)
{
	my $name = $script =~ s{.*/}{}r;
	my ($out, $err) = ('', '');
	my $ran = IPC::Run::run(
		[
			'pg_prove', '--nocolor', '--verbose',
			'--host' => $node->host,
			'--port' => $node->port,
			'--dbname' => 'postgres',
			$script
		],
		'>' => \$out,
		'2>' => \$err);
	note($out);
	note($err) if $err ne '';
	ok($ran, "pg_prove $name exits 0")
	  or diag(join("\n", grep { /^(not ok|#|psql:)/ || /ERROR/ } split(/\n/, $out . "\n" . $err)));
	ok($out =~ /^Result: PASS$/m, "pg_prove $name reports PASS");
}

# The pgTAP scripts roll back: nothing they did is left in the cluster.
is($node->safe_psql('postgres', q{
	SELECT (SELECT count(*) FROM saga.destinations) + (SELECT count(*) FROM saga.queue)
	     + (SELECT count(*) FROM pg_roles WHERE rolname LIKE 'saga\_test\_%')}),
	'0', 'the pgTAP scripts left nothing behind');

# The server survived every script.
ok($node->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM saga.worker_status() WHERE kind = 'worker' AND database = 'postgres'}),
	'the saga worker is still running');

$node->stop;
done_testing();
