# The "nothing lost" oracle of saga's crash tests (RELIABILITY.md I3, I4),
# and reading the receiver's log while a crash test waits for progress.
package SagaCrash;

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Utils;
use SagaTest;
use Exporter 'import';

our @EXPORT = qw(publish_for_crash check_nothing_lost receiver_lines wait_for_lines);

# Publish $txns transactions of $per messages on $topic, their ids kept in
# the test's table committed_ids, with a rolled-back transaction of 300 after each of
# the first $rollbacks; returns the ids the rolled-back publishes returned.
sub publish_for_crash
{
	my ($node, $topic, $txns, $per, $rollbacks) = @_;
	my @rolled_back;
	for my $t (1 .. $txns)
	{
		$node->safe_psql('postgres', qq{
			INSERT INTO committed_ids
			SELECT saga.publish('$topic', jsonb_build_object('t', $t, 'n', g))
			FROM generate_series(1, $per) g;
		});
		next if $t > $rollbacks;
		push @rolled_back, split /\n/, $node->safe_psql('postgres', qq{
			BEGIN;
			SELECT saga.publish('$topic', jsonb_build_object('rolled_back', $t, 'n', g))
			FROM generate_series(1, 300) g;
			ROLLBACK;
		});
	}
	is(scalar(@rolled_back), 300 * $rollbacks, 'rolled-back publishes returned their ids');
	return @rolled_back;
}

# I3/I4: receiver keys cover the committed ids, and nothing else arrived.
sub check_nothing_lost
{
	my ($node, $log, $rolled_back, $expected, $what) = @_;
	my %committed = map { $_ => 1 } split /\n/,
	  $node->safe_psql('postgres', 'SELECT id FROM committed_ids');
	is(scalar(keys %committed), $expected, "$expected messages committed");
	my %arrived;
	$arrived{ $_->{headers}{'Idempotency-Key'} }++ for receiver_requests($log);

	my @missing = grep { !$arrived{$_} } keys %committed;
	is(scalar(@missing), 0, 'every committed message arrived at least once')
	  or diag('missing, for example: ' . join(', ', @missing[ 0 .. ($#missing < 4 ? $#missing : 4) ]));
	my @foreign = grep { !$committed{$_} } keys %arrived;
	is(scalar(@foreign), 0, 'nothing arrived that was not committed');
	is(scalar(grep { $arrived{$_} } @$rolled_back), 0,
		'no id from a rolled-back transaction arrived');
	my $dups = grep { $arrived{$_} > 1 } keys %arrived;
	my $extra = 0;
	$extra += $arrived{$_} - 1 for keys %arrived;
	note("duplicates after $what: $dups ids delivered more than once, $extra extra requests");
}

# Number of requests the receiver has logged, read incrementally.
sub receiver_lines
{
	my ($log, $r) = @_;
	return $r->{lines} unless -e $log;
	open(my $fh, '<', $log) or die $!;
	seek($fh, $r->{offset}, 0);
	while (my $line = <$fh>)
	{
		last unless $line =~ /\n$/;
		$r->{offset} += length($line);
		$r->{lines}++;
	}
	close $fh;
	return $r->{lines};
}

# Wait until the receiver has logged $target requests; false on time-out.
sub wait_for_lines
{
	my ($log, $r, $target) = @_;
	for (1 .. 50 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if receiver_lines($log, $r) >= $target;
		usleep(20_000);
	}
	return 0;
}

1;
