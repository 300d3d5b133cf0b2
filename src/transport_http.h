/*
 * transport_http.h
 *		HTTP POST over libcurl's multi interface, many requests in flight.
 */
#ifndef SAGA_TRANSPORT_HTTP_H
#define SAGA_TRANSPORT_HTTP_H

#include "lib/ilist.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "storage/itemptr.h"
#include "utils/uuid.h"

#include <curl/curl.h>

typedef enum SagaOutcome
{
	SAGA_OUTCOME_DELIVERED = 0,
	SAGA_OUTCOME_RETRY = 1,
	SAGA_OUTCOME_DEAD = 2
} SagaOutcome;

/* One request; lives in its own memory context until recorded. */
typedef struct SagaHttpRequest
{
	MemoryContext cxt;
	dlist_node	node;

	/* what to send, set by the caller */
	ItemPointerData tid;		/* the claimed row, as the claim left it */
	pg_uuid_t	message_id;
	char	   *destination;
	int			attempt;
	char	   *url;
	char	   *body;
	struct curl_slist *headers;
	long		timeout_ms;
	int			response_limit; /* bytes of the response body to keep */
	bool		for_saga;		/* the call of a saga step, not a message */

	/* retry policy of the destination, copied by the caller */
	int			max_attempts;
	int			backoff_ms;
	int			max_backoff_ms;

	/* what happened, set by the transport */
	CURL	   *easy;
	CURLcode	result;
	long		status;
	long		retry_after_s;	/* -1 when the response had none */
	char		curl_error[CURL_ERROR_SIZE];
	StringInfoData response;	/* the first bytes of the response body */
	size_t		response_bytes; /* the whole body's length */

	/* the verdict, set when the request completes */
	SagaOutcome outcome;
	char	   *error;
} SagaHttpRequest;

typedef struct SagaHttp SagaHttp;

extern SagaHttp *saga_http_create(void);
extern SagaHttpRequest *saga_http_new_request(SagaHttp *http);
extern void saga_http_add_header(SagaHttpRequest *req, const char *name, const char *value);
extern void saga_http_submit_new(SagaHttp *http);
extern void saga_http_discard_new(SagaHttp *http);
extern int	saga_http_in_flight(SagaHttp *http, const char *destination);
extern int	saga_http_total_in_flight(SagaHttp *http);
extern pgsocket saga_http_wait_fd(SagaHttp *http);
extern long saga_http_timeout_ms(SagaHttp *http);
extern void saga_http_perform(SagaHttp *http);
extern bool saga_http_has_completed(SagaHttp *http);
extern List *saga_http_completed(SagaHttp *http);
extern void saga_http_release(List *requests);

#endif							/* SAGA_TRANSPORT_HTTP_H */
