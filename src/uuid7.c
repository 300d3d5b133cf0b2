/*
 * uuid7.c
 *		Time-ordered message ids (UUID version 7, RFC 9562).
 *
 * Ids that grow with time keep the queue's primary key appending at its
 * right edge instead of splitting pages all over it. Within one backend the
 * ids are strictly increasing: the 12 bits after the millisecond timestamp
 * hold a sub-millisecond counter.
 *
 * The 62 random bits come from a generator seeded once per process from the
 * strong source: ids must be unique, not secret, and the strong source costs
 * a system call per id (a seventh of saga.publish's time).
 */
#include "saga.h"

#include <sys/time.h>

#if PG_VERSION_NUM >= 150000
#include "common/pg_prng.h"

static void
random_tail(unsigned char *out)
{
	static pg_prng_state state;
	static bool seeded = false;
	uint64		r;

	if (!seeded)
	{
		if (!pg_prng_strong_seed(&state))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not seed the generator of message ids")));
		seeded = true;
	}
	r = pg_prng_uint64(&state);
	memcpy(out, &r, sizeof(r));
}
#else
static void
random_tail(unsigned char *out)
{
	if (!pg_strong_random(out, 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes for a message id")));
}
#endif

void
saga_uuid7(unsigned char *out)
{
	static uint64 last_ms = 0;
	static uint32 last_sub = 0;
	struct timeval tv;
	uint64		ms;
	uint32		sub;

	gettimeofday(&tv, NULL);
	ms = (uint64) tv.tv_sec * 1000 + tv.tv_usec / 1000;
	sub = (uint32) ((tv.tv_usec % 1000) * 4096 / 1000);
	if (ms < last_ms || (ms == last_ms && sub <= last_sub))
	{
		/* the clock did not move (or went back): count on from the last id */
		ms = last_ms;
		sub = last_sub + 1;
		if (sub > 0xFFF)
		{
			ms++;
			sub = 0;
		}
	}
	last_ms = ms;
	last_sub = sub;

	random_tail(out + 8);
	for (int i = 0; i < 6; i++)
		out[i] = (unsigned char) (ms >> (8 * (5 - i)));
	out[6] = 0x70 | (unsigned char) (sub >> 8);
	out[7] = (unsigned char) (sub & 0xFF);
	out[8] = (out[8] & 0x3F) | 0x80;
}
