/*
 * request.h
 *		One claimed row of saga.queue on its way to a destination: a message,
 *		or the call of a saga step. Both transports (HTTP, libpq) fill in the
 *		outcome; outbox.c records it.
 */
#ifndef SAGA_REQUEST_H
#define SAGA_REQUEST_H

#include <curl/curl.h>

#include "datatype/timestamp.h"
#include "lib/ilist.h"
#include "lib/stringinfo.h"
#include "storage/itemptr.h"
#include "utils/uuid.h"

typedef enum SagaOutcome
{
	SAGA_OUTCOME_DELIVERED = 0,
	SAGA_OUTCOME_RETRY = 1,
	SAGA_OUTCOME_DEAD = 2
} SagaOutcome;

/* One request; lives in its own memory context until recorded. */
typedef struct SagaRequest
{
	MemoryContext cxt;
	dlist_node	node;

	/* what to send, set by the caller */
	ItemPointerData tid;		/* the claimed row, as the claim left it */
	TransactionId claim_xid;	/* the claim's transaction: that row's xmin */
	pg_uuid_t	message_id;
	char	   *destination;
	int			attempt;
	char	   *url;			/* URL or conninfo */
	char	   *body;			/* payload or ctx, JSON text */
	long		timeout_ms;
	int			response_limit; /* bytes of the response body to keep */
	bool		for_saga;		/* the call of a saga step, not a message */

	/* retry policy of the destination, copied by the caller */
	int			max_attempts;
	int			backoff_ms;
	int			max_backoff_ms;

	/* HTTP only */
	struct curl_slist *headers;
	CURL	   *easy;
	CURLcode	result;
	char		curl_error[CURL_ERROR_SIZE];

	/* libpq only */
	char	   *topic;
	char	   *key;			/* the message's key */
	char	   *headers_json;	/* the message's headers, JSON text or NULL */
	char	   *function;		/* a saga step's remote function */
	char	   *call_key;		/* its key for saga.invoke or saga.compensate */
	bool		compensation;	/* saga.compensate, not saga.invoke */
	int			max_connections;	/* the destination's concurrency */
	bool		alone;			/* send in a statement of its own */
	TimestampTz deadline;		/* the request times out then */

	/* what happened, set by the transport */
	long		status;			/* HTTP status; 0 for libpq */
	long		retry_after_s;	/* -1 when the response had none */
	StringInfoData response;	/* the first bytes of the response body */
	size_t		response_bytes; /* the whole body's length */

	/* the verdict, set when the request completes */
	SagaOutcome outcome;
	char	   *error;
} SagaRequest;

#endif							/* SAGA_REQUEST_H */
