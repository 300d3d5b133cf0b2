/*
 * transport_http.c
 *		HTTP POST over libcurl's multi interface.
 *
 * The worker owns the event loop: it asks for the sockets libcurl waits on,
 * waits on them together with its latch, then lets libcurl perform. Nothing
 * here touches a transaction; outcomes are data for the caller to record.
 */
#include "postgres.h"

#include <sys/epoll.h>
#include <unistd.h>

#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "transport_http.h"

#define RESPONSE_SNIPPET_BYTES	512
/* finished easy handles kept for the next requests, with their buffers */
#define IDLE_HANDLES_MAX		256
#define MAX_RETRY_AFTER_S		(24 * 3600)

static void classify(SagaRequest *req);

/*
 * What the epoll set holds for one socket, indexed by descriptor. A
 * keep-alive connection between requests stays registered for reading
 * ("parked") instead of being removed and added again around every request:
 * two epoll_ctl calls saved per request. Only sockets libcurl opened through
 * open_socket are parked, because close_socket tells us when they go away.
 */
typedef struct WatchedSocket
{
	uint32		registered;		/* events in the epoll set; 0: not in it */
	bool		wanted;			/* libcurl is waiting on it */
	bool		ours;			/* opened by open_socket, closed by close_socket */
} WatchedSocket;

struct SagaHttp
{
	CURLM	   *multi;
	int			epfd;			/* the sockets libcurl waits on */
	WatchedSocket *sockets;
	int			nsockets;
	TimestampTz timer;			/* when libcurl wants to run; 0: no timer */
	CURL	   *idle_handles[IDLE_HANDLES_MAX];
	int			nidle_handles;
	MemoryContext cxt;
	dlist_head	created;		/* claimed, not yet submitted */
	dlist_head	running;
	dlist_head	completed;		/* finished, outcome not yet recorded */
};

static WatchedSocket *
watched(SagaHttp *http, int fd)
{
	if (fd >= http->nsockets)
	{
		int			n = Max(fd + 1, 2 * http->nsockets);

		http->sockets = repalloc(http->sockets, sizeof(WatchedSocket) * n);
		memset(&http->sockets[http->nsockets], 0, sizeof(WatchedSocket) * (n - http->nsockets));
		http->nsockets = n;
	}
	return &http->sockets[fd];
}

static int
set_registration(SagaHttp *http, int fd, uint32 events)
{
	WatchedSocket *ws = watched(http, fd);
	struct epoll_event ev;
	int			op = events == 0 ? EPOLL_CTL_DEL : ws->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;

	if (events == ws->registered)
		return 0;
	memset(&ev, 0, sizeof(ev));
	ev.events = events;
	ev.data.fd = fd;
	if (epoll_ctl(http->epfd, op, fd, &ev) != 0 && op != EPOLL_CTL_DEL &&
		epoll_ctl(http->epfd, op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) != 0)
		return -1;
	ws->registered = events;
	return 0;
}

/*
 * libcurl tells us which sockets to watch for what; we keep them in an epoll
 * set whose own descriptor the worker waits on, next to its latch.
 */
static int
watch_socket(CURL *easy, curl_socket_t fd, int what, void *arg, void *known)
{
	SagaHttp   *http = (SagaHttp *) arg;
	WatchedSocket *ws = watched(http, fd);
	uint32		events = 0;

	if (what == CURL_POLL_REMOVE)
	{
		ws->wanted = false;
		/* park an idle connection; saga_http_perform drops it if it stirs */
		return (ws->ours && ws->registered == EPOLLIN) ? 0 : set_registration(http, fd, 0);
	}
	ws->wanted = true;
	if (what & CURL_POLL_IN)
		events |= EPOLLIN;
	if (what & CURL_POLL_OUT)
		events |= EPOLLOUT;
	return set_registration(http, fd, events);
}

static curl_socket_t
open_socket(void *arg, curlsocktype purpose, struct curl_sockaddr *address)
{
	SagaHttp   *http = (SagaHttp *) arg;
	curl_socket_t fd = socket(address->family, address->socktype, address->protocol);

	if (fd != CURL_SOCKET_BAD)
	{
		WatchedSocket *ws = watched(http, fd);

		ws->registered = 0;
		ws->wanted = false;
		ws->ours = true;
	}
	return fd;
}

static int
close_socket(void *arg, curl_socket_t fd)
{
	SagaHttp   *http = (SagaHttp *) arg;
	WatchedSocket *ws = watched(http, fd);

	(void) set_registration(http, fd, 0);
	ws->ours = false;
	ws->wanted = false;
	return close(fd);
}

static int
set_timer(CURLM *multi, long timeout_ms, void *arg)
{
	SagaHttp   *http = (SagaHttp *) arg;

	http->timer = timeout_ms < 0 ? 0 :
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	return 0;
}

SagaHttp *
saga_http_create(void)
{
	SagaHttp   *http = MemoryContextAllocZero(TopMemoryContext, sizeof(SagaHttp));

	http->cxt = AllocSetContextCreate(TopMemoryContext, "saga http",
									  ALLOCSET_DEFAULT_SIZES);
	http->multi = curl_multi_init();
	if (http->multi == NULL)
		elog(ERROR, "curl_multi_init failed");
	http->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (http->epfd < 0)
		elog(ERROR, "epoll_create1 failed: %m");
	http->nsockets = 64;
	http->sockets = MemoryContextAllocZero(TopMemoryContext, sizeof(WatchedSocket) * http->nsockets);
	curl_multi_setopt(http->multi, CURLMOPT_SOCKETFUNCTION, watch_socket);
	curl_multi_setopt(http->multi, CURLMOPT_SOCKETDATA, http);
	curl_multi_setopt(http->multi, CURLMOPT_TIMERFUNCTION, set_timer);
	curl_multi_setopt(http->multi, CURLMOPT_TIMERDATA, http);
	/* keep idle connections to every destination for reuse */
	curl_multi_setopt(http->multi, CURLMOPT_MAXCONNECTS, 1024L);
	dlist_init(&http->created);
	dlist_init(&http->running);
	dlist_init(&http->completed);
	return http;
}

/*
 * A request for a claimed delivery. It waits in "created" until the claim has
 * committed (saga_http_submit_new) or was rolled back (saga_http_discard_new).
 */
SagaRequest *
saga_http_new_request(SagaHttp *http)
{
	MemoryContext cxt = AllocSetContextCreate(http->cxt, "saga http request",
											  ALLOCSET_SMALL_SIZES);
	SagaRequest *req = MemoryContextAllocZero(cxt, sizeof(SagaRequest));

	req->cxt = cxt;
	req->retry_after_s = -1;
	req->response_limit = RESPONSE_SNIPPET_BYTES;
	dlist_push_tail(&http->created, &req->node);
	return req;
}

static void
free_request(SagaRequest *req)
{
	if (req->easy)
		curl_easy_cleanup(req->easy);
	if (req->headers)
		curl_slist_free_all(req->headers);
	MemoryContextDelete(req->cxt);
}

void
saga_http_add_header(SagaRequest *req, const char *name, const char *value)
{
	char	   *line = psprintf("%s: %s", name, value);
	struct curl_slist *l = curl_slist_append(req->headers, line);

	pfree(line);
	if (l == NULL)
		elog(ERROR, "out of memory in curl_slist_append");
	req->headers = l;
}

static size_t
collect_response(char *data, size_t size, size_t nmemb, void *arg)
{
	SagaRequest *req = (SagaRequest *) arg;
	size_t		len = size * nmemb;
	size_t		room = req->response_limit - req->response.len;

	/* keep the start of the body (the error message, a step's result) */
	if (room > 0)
		appendBinaryStringInfo(&req->response, data, Min(len, room));
	req->response_bytes += len;
	return len;
}

/*
 * An easy handle for a new request. Handles are reused: a new one allocates
 * its buffers afresh, and doing that per request showed in profiles.
 */
static CURL *
take_handle(SagaHttp *http)
{
	CURL	   *easy;

	if (http->nidle_handles > 0)
		return http->idle_handles[--http->nidle_handles];
	easy = curl_easy_init();
	if (easy == NULL)
		elog(ERROR, "curl_easy_init failed");
	return easy;
}

/* Keep a finished request's handle, every option reset to its default. */
static void
give_back_handle(SagaHttp *http, CURL *easy)
{
	if (http->nidle_handles == IDLE_HANDLES_MAX)
	{
		curl_easy_cleanup(easy);
		return;
	}
	curl_easy_reset(easy);
	http->idle_handles[http->nidle_handles++] = easy;
}

static void
submit_one(SagaHttp *http, SagaRequest *req)
{
	CURL	   *easy = take_handle(http);
	MemoryContext old;

	req->easy = easy;
	old = MemoryContextSwitchTo(req->cxt);
	initStringInfo(&req->response);
	MemoryContextSwitchTo(old);

	/* a large body must not wait a second for "100 Continue" */
	saga_http_add_header(req, "Expect", "");

	curl_easy_setopt(easy, CURLOPT_PRIVATE, req);
	curl_easy_setopt(easy, CURLOPT_URL, req->url);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(easy, CURLOPT_POST, 1L);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDS, req->body);
	curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(req->body));
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, req->headers);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, req->timeout_ms);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, req->timeout_ms);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, "saga/" "0.1");
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, req->curl_error);
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, collect_response);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, req);
	curl_easy_setopt(easy, CURLOPT_OPENSOCKETFUNCTION, open_socket);
	curl_easy_setopt(easy, CURLOPT_OPENSOCKETDATA, http);
	curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
	curl_easy_setopt(easy, CURLOPT_CLOSESOCKETDATA, http);

	if (curl_multi_add_handle(http->multi, easy) != CURLM_OK)
		elog(ERROR, "curl_multi_add_handle failed");
	dlist_push_tail(&http->running, &req->node);
}

/* Start every request whose claim has committed. */
void
saga_http_submit_new(SagaHttp *http)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &http->created)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		dlist_delete(&req->node);
		submit_one(http, req);
	}
	if (!dlist_is_empty(&http->running))
		saga_http_perform(http);
}

/* Forget requests whose claim was rolled back. */
void
saga_http_discard_new(SagaHttp *http)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &http->created)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		dlist_delete(&req->node);
		free_request(req);
	}
}

int
saga_http_in_flight(SagaHttp *http, const char *destination)
{
	dlist_iter	iter;
	int			n = 0;

	dlist_foreach(iter, &http->running)
	{
		SagaRequest *req = dlist_container(SagaRequest, node, iter.cur);

		if (strcmp(req->destination, destination) == 0)
			n++;
	}
	return n;
}

int
saga_http_total_in_flight(SagaHttp *http)
{
	dlist_iter	iter;
	int			n = 0;

	dlist_foreach(iter, &http->running)
		n++;
	return n;
}

/* A descriptor that becomes readable when a socket libcurl waits on is ready. */
pgsocket
saga_http_wait_fd(SagaHttp *http)
{
	return http->epfd;
}

/* How long libcurl may wait before it needs to run; -1 when it has no timer. */
long
saga_http_timeout_ms(SagaHttp *http)
{
	if (http->timer == 0)
		return -1;
	return Max(0, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), http->timer));
}

static long
parse_retry_after(CURL *easy)
{
#if LIBCURL_VERSION_NUM >= 0x075400
	struct curl_header *h;
	char	   *end;
	long		seconds;
	time_t		when;

	if (curl_easy_header(easy, "Retry-After", 0, CURLH_HEADER, -1, &h) != CURLHE_OK)
		return -1;
	errno = 0;
	seconds = strtol(h->value, &end, 10);
	if (errno == 0 && end != h->value && *end == '\0' && seconds >= 0)
		return Min(seconds, MAX_RETRY_AFTER_S);
	when = curl_getdate(h->value, NULL);
	if (when < 0)
		return -1;
	seconds = (long) (when - time(NULL));
	return Max(0, Min(seconds, MAX_RETRY_AFTER_S));
#else
	return -1;
#endif
}

/* Let libcurl act on ready sockets and due timers; collect what finished. */
void
saga_http_perform(SagaHttp *http)
{
	struct epoll_event events[64];
	int			running;
	int			queued;
	int			n;
	CURLMsg    *msg;

	while ((n = epoll_wait(http->epfd, events, lengthof(events), 0)) > 0)
	{
		for (int i = 0; i < n; i++)
		{
			int			fd = events[i].data.fd;
			int			flags = 0;

			if (!watched(http, fd)->wanted)
			{
				/* a parked connection was closed by the peer or sent junk */
				(void) set_registration(http, fd, 0);
				continue;
			}
			if (events[i].events & (EPOLLIN | EPOLLHUP))
				flags |= CURL_CSELECT_IN;
			if (events[i].events & EPOLLOUT)
				flags |= CURL_CSELECT_OUT;
			if (events[i].events & EPOLLERR)
				flags |= CURL_CSELECT_ERR;
			curl_multi_socket_action(http->multi, fd, flags, &running);
		}
		if (n < lengthof(events))
			break;
	}
	if (http->timer != 0 && GetCurrentTimestamp() >= http->timer)
	{
		http->timer = 0;
		curl_multi_socket_action(http->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	}
	while ((msg = curl_multi_info_read(http->multi, &queued)) != NULL)
	{
		SagaRequest *req;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &req);
		req->result = msg->data.result;
		curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &req->status);
		req->retry_after_s = parse_retry_after(req->easy);
		curl_multi_remove_handle(http->multi, req->easy);
		give_back_handle(http, req->easy);
		req->easy = NULL;
		classify(req);
		dlist_delete(&req->node);
		dlist_push_tail(&http->completed, &req->node);
	}
}

bool
saga_http_has_completed(SagaHttp *http)
{
	return !dlist_is_empty(&http->completed);
}

/*
 * The finished requests, left in place: they are released only once their
 * outcomes are recorded, so a failed recording is tried again.
 */
List *
saga_http_completed(SagaHttp *http)
{
	dlist_iter	iter;
	List	   *result = NIL;

	dlist_foreach(iter, &http->completed)
		result = lappend(result, dlist_container(SagaRequest, node, iter.cur));
	return result;
}

void
saga_http_release(List *requests)
{
	ListCell   *lc;

	foreach(lc, requests)
	{
		SagaRequest *req = lfirst(lc);

		dlist_delete(&req->node);
		free_request(req);
	}
}

/*
 * Sort an outcome into delivered, retry or dead, as DESIGN.md says: 2xx is
 * delivered; 408, 425, 429, 5xx, time-outs and connection errors are worth
 * another attempt; any other answer is permanent.
 */
static void
classify(SagaRequest *req)
{
	long		s = req->status;
	MemoryContext old = MemoryContextSwitchTo(req->cxt);

	if (req->result != CURLE_OK)
	{
		req->outcome = SAGA_OUTCOME_RETRY;
		req->error = psprintf("%s (curl error %d)",
							  req->curl_error[0] ? req->curl_error : curl_easy_strerror(req->result),
							  (int) req->result);
		req->status = 0;
	}
	else
	{
		if (s >= 200 && s < 300)
			req->outcome = SAGA_OUTCOME_DELIVERED;
		else if (s == 408 || s == 425 || s == 429 || s >= 500)
			req->outcome = SAGA_OUTCOME_RETRY;
		else
			req->outcome = SAGA_OUTCOME_DEAD;
		if (req->outcome != SAGA_OUTCOME_DELIVERED)
		{
			/* the snippet becomes text in a table: keep it valid UTF-8-ish */
			for (int i = 0; i < req->response.len; i++)
				if ((unsigned char) req->response.data[i] < 0x20 && req->response.data[i] != '\t')
					req->response.data[i] = ' ';
			req->error = req->response.len > 0 ?
				psprintf("HTTP %ld: %.*s", s, Min(req->response.len, RESPONSE_SNIPPET_BYTES),
						 req->response.data) :
				psprintf("HTTP %ld", s);
		}
	}
	MemoryContextSwitchTo(old);
}
