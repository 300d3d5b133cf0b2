# Helpers shared by saga's process-level tests.
package SagaTest;

use strict;
use warnings;
use File::Basename qw(dirname);
use File::Spec;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);
use JSON::PP;
use Exporter 'import';

our @EXPORT = qw(saga_node start_receiver receiver_requests request_header wait_for_worker);

my $testdir = dirname(__FILE__);

# receivers started by this test, stopped however the test ends
my @receiver_pids;
END { kill 'TERM', @receiver_pids if @receiver_pids; }

# A cluster with saga preloaded and created in database "postgres".
sub saga_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $opts{init} // {} });
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'saga'
saga.poll_interval = 200ms
max_worker_processes = 16
log_min_messages = info
} . ($opts{conf} // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION saga') unless $opts{no_extension};
	return $node;
}

# Start test/http_receiver.py with extra options, if any; returns (port,
# log file, pid).
sub start_receiver
{
	my @options = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $log = "$dir/requests.jsonl";
	my $portfile = "$dir/port";
	my $pid = fork();
	if ($pid == 0)
	{
		exec('python3', "$testdir/http_receiver.py", '--log', $log, '--port-file', $portfile, @options)
		  or die "cannot start receiver: $!";
	}
	push @receiver_pids, $pid;
	for (1 .. 100)
	{
		last if -e $portfile;
		usleep(100_000);
	}
	die "receiver did not start" unless -e $portfile;
	my $port = PostgreSQL::Test::Utils::slurp_file($portfile);
	return ($port, $log, $pid);
}

# Requests the receiver logged so far, as a list of hashes.
sub receiver_requests
{
	my ($log) = @_;
	return () unless -e $log;
	my @out;
	open(my $fh, '<', $log) or die $!;
	while (my $line = <$fh>)
	{
		chomp $line;
		next unless $line =~ /\}$/;
		push @out, decode_json($line);
	}
	close $fh;
	return @out;
}

# A header of a logged request, whatever the case of its name.
sub request_header
{
	my ($req, $name) = @_;
	for my $k (keys %{ $req->{headers} })
	{
		return $req->{headers}{$k} if lc($k) eq lc($name);
	}
	return undef;
}

# Wait until the database's worker runs.
sub wait_for_worker
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	$node->poll_query_until($db,
		"SELECT count(*) = 1 FROM saga.worker_status() WHERE kind = 'worker' AND database = '$db' AND state IN ('idle', 'dispatching')")
	  or die "saga worker did not start in $db";
}

1;
