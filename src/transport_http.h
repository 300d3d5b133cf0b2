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

#include "request.h"

typedef struct SagaHttp SagaHttp;

extern SagaHttp *saga_http_create(void);
extern SagaRequest *saga_http_new_request(SagaHttp *http);
extern void saga_http_add_header(SagaRequest *req, const char *name, const char *value);
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
