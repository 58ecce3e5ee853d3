/*
 * http.c - HTTP requests on a libuv loop (contract in http.h): libcurl's multi
 * interface driven by libuv, one engine per loop.
 *
 * Reentrancy: user callbacks run inside curl's (on_data, on_head) or inside our
 * loop callbacks, and may call back into the engine. Every entry (a loop callback,
 * an API call) is counted (enter/leave); requests are unlinked and freed, failures
 * delivered and a close carried out only when the outermost entry leaves, where no
 * curl call is on the stack. So a request's memory outlives every callback that
 * can name it, and curl is never asked, from inside its own callbacks, to let go
 * of a transfer (it would refuse: CURLM_RECURSIVE_API_CALL).
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>
#include <curl/curl.h>

#include "buf.h"
#include "http.h"
#include "loop.h"                   /* flame_handle only */

typedef struct sock sock;

struct http_engine {
  flame_handle base;                /* the timer's: a close walk closes the engine */
  uv_timer_t timer;
  uv_loop_t *loop;
  CURLM *multi;
  http_req *reqs;                   /* started and not yet freed, newest first */
  sock *socks;                      /* polls made for curl's sockets, not yet freed */
  int depth;                        /* entries on the stack (enter, leave) */
  int closing;                      /* http_engine_close (or the walk) began */
  int freed;                        /* engine_free ran: the timer's close frees it */
  int leaked;                       /* curl would not let go: nothing is freed */
  int timer_closed;                 /* the timer's close callback ran */
  int reap;                         /* some finished request waits to be freed */
  char why[256];                    /* how one of our curl callbacks failed */
};

struct sock {
  flame_handle base;                /* the poll's */
  uv_poll_t poll;
  http_engine *e;                   /* NULL once the engine has let go of it */
  curl_socket_t fd;
  int assigned;                     /* curl holds it (curl_multi_assign) until REMOVE */
  int closed;                       /* the poll's close callback ran */
  sock *next, **pprev;              /* in e->socks */
};

struct http_req {
  http_engine *e;
  CURL *easy;
  struct curl_slist *headers;
  buf body, head;
  http_header *hv;                  /* the headers given to on_done */
  http_cbs cb;
  void *ctx;
  int stream;
  int head_pending;                 /* on_head wanted and not called yet */
  int in_multi;                     /* curl may hold the transfer: remove before free */
  int finished;                     /* on_done called (or the start failed) */
  http_req *next, **pprev;          /* in e->reqs */
  char err[CURL_ERROR_SIZE];
};

static uv_once_t curl_once = UV_ONCE_INIT;
static int curl_ok;

static void curl_init(void) {
  curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

__attribute__((format(printf, 3, 4)))
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* ---------------------------------------------------------- requests ---- */

static void req_link(http_engine *e, http_req *r) {
  r->next = e->reqs;
  if (r->next) r->next->pprev = &r->next;
  r->pprev = &e->reqs;
  e->reqs = r;
}

static void req_unlink(http_req *r) {
  if (r->pprev == NULL) return;
  *r->pprev = r->next;
  if (r->next) r->next->pprev = r->pprev;
  r->next = NULL;
  r->pprev = NULL;
}

static void req_free(http_req *r) {
  req_unlink(r);
  curl_slist_free_all(r->headers);
  curl_easy_cleanup(r->easy);
  buf_free(&r->body);
  buf_free(&r->head);
  free(r->hv);
  free(r);
}

/* The "Name: value" lines of the last response into r->hv, in place in r->head:
 * names lower-cased, names and values NUL-terminated. Returns the count, or -1
 * when memory ran out. */
static long parse_headers(http_req *r) {
  buf *b = &r->head;
  if (buf_byte(b, '\0') != 0) return -1;   /* room for a NUL after the last line */
  b->len--;
  char *p = (char *)b->data, *end = p + b->len;
  size_t n = 0;
  for (char *q = p; q < end;) {
    char *nl = memchr(q, '\n', (size_t)(end - q));
    char *le = nl ? nl : end;
    if (memchr(q, ':', (size_t)(le - q))) n++;
    q = nl ? nl + 1 : end;
  }
  free(r->hv);
  r->hv = NULL;
  if (n == 0) return 0;
  if ((r->hv = malloc(n * sizeof *r->hv)) == NULL) return -1;
  size_t i = 0;
  while (p < end) {
    char *nl = memchr(p, '\n', (size_t)(end - p));
    char *le = nl ? nl : end;
    char *colon = memchr(p, ':', (size_t)(le - p));
    if (colon) {
      for (char *c = p; c < colon; c++) *c = (char)tolower((unsigned char)*c);
      char *v = colon + 1, *ve = le;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ')) ve--;
      r->hv[i].name = p;
      r->hv[i].name_len = (size_t)(colon - p);
      r->hv[i].value = v;
      r->hv[i].value_len = (size_t)(ve - v);
      *colon = '\0';                /* after the name's bytes are read above */
      *ve = '\0';                   /* the '\r', a space, the '\n' or the NUL past end */
      i++;
    }
    p = nl ? nl + 1 : end;
  }
  return (long)i;
}

/* Ends a request: on_done, once. Its memory stays until reap (at the outermost
 * leave), so whatever still names it (curl's callbacks, a caller up the stack)
 * only sees it finished. */
static void req_end(http_req *r, long status, const char *err) {
  if (r->finished) return;
  r->finished = 1;
  r->e->reap = 1;
  long nh = 0;
  if (err == NULL && (nh = parse_headers(r)) < 0)
    err = "http: not enough memory for the response's headers";
  if (err) {
    r->cb.on_done(r->ctx, 0, NULL, 0, NULL, 0, err);
    return;
  }
  const char *body = "";
  size_t blen = 0;
  if (!r->stream && r->body.data) {
    body = (const char *)r->body.data;
    blen = r->body.len;
  }
  r->cb.on_done(r->ctx, status, r->hv, (size_t)nh, body, blen, NULL);
}

static const char *code_name(CURLcode rc) {
  return rc == CURLE_COULDNT_CONNECT ? "CURLE_COULDNT_CONNECT"
       : rc == CURLE_OPERATION_TIMEDOUT ? "CURLE_OPERATION_TIMEDOUT"
       : rc == CURLE_COULDNT_RESOLVE_HOST ? "CURLE_COULDNT_RESOLVE_HOST"
       : "CURLE";
}

/* Ends a request curl finished with rc: its response, or why there is none. */
static void req_done(http_req *r, CURLcode rc) {
  char msg[CURL_ERROR_SIZE + 96];
  if (rc != CURLE_OK) {
    snprintf(msg, sizeof msg, "%s (%s)", r->err[0] ? r->err : curl_easy_strerror(rc),
             code_name(rc));
    req_end(r, 0, msg);
    return;
  }
  long status = 0;
  CURLcode irc = curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  if (irc != CURLE_OK) {
    snprintf(msg, sizeof msg, "http: cannot read the response status "
             "(CURLINFO_RESPONSE_CODE): %s", curl_easy_strerror(irc));
    req_end(r, 0, msg);
    return;
  }
  req_end(r, status, NULL);
}

/* Frees the finished requests, each out of the multi first. Only at the outermost
 * leave: curl is not in a callback then, so it lets go; should it refuse with
 * CURLM_RECURSIVE_API_CALL all the same, the request waits for the next time. Any
 * other refusal means the transfer is in no multi of ours. */
static void reap(http_engine *e) {
  if (!e->reap) return;
  e->reap = 0;
  for (http_req *r = e->reqs, *next; r; r = next) {
    next = r->next;
    if (!r->finished) continue;
    if (r->in_multi) {
      if (curl_multi_remove_handle(e->multi, r->easy) == CURLM_RECURSIVE_API_CALL) {
        e->reap = 1;
        continue;
      }
      r->in_multi = 0;
    }
    req_free(r);
  }
}

/* ------------------------------------------------------------ engine ---- */

/* Our side of a curl callback failed. Returns the -1 that makes curl give up on
 * every transfer; e->why (the first reason, if several) is what they end with. */
static int http_failed(http_engine *e, const char *what, const char *detail) {
  if (e->why[0] == '\0') snprintf(e->why, sizeof e->why, "http: %s: %s", what, detail);
  return -1;
}

/* Ends every request left with e->why. After one of our callbacks failed, nothing
 * drives curl's transfers any more (a socket unwatched, its timer unset, or curl
 * gave up on them and asks for no timer), so without this they would hang; the
 * same goes when curl itself failed to act. Requests an on_done starts meanwhile
 * go in front of `first`: not ended. */
static void fail_all(http_engine *e) {
  char why[sizeof e->why];
  memcpy(why, e->why, sizeof why);
  e->why[0] = '\0';
  http_req *first = e->reqs;
  /* All out of the multi first: curl takes new transfers again (from an on_done)
   * only once none of the old ones is alive. */
  for (http_req *r = first; r; r = r->next) {
    if (!r->in_multi) continue;
    if (curl_multi_remove_handle(e->multi, r->easy) != CURLM_RECURSIVE_API_CALL) r->in_multi = 0;
    e->reap = 1;
  }
  for (http_req *r = first; r; r = r->next)
    if (!r->finished) req_end(r, 0, why);
}

static void engine_free(http_engine *e);

static void enter(http_engine *e) {
  e->depth++;
}

/* Leaving the outermost entry: delivers failures, frees finished requests (which
 * can fail anew: curl calls our callbacks as it lets go), then carries out a close
 * asked for meanwhile. e may be gone after. */
static void leave(http_engine *e) {
  if (e->depth > 1) {
    e->depth--;
    return;
  }
  do {
    while (e->why[0]) fail_all(e);
    reap(e);
  } while (e->why[0]);
  e->depth = 0;
  if (e->closing) engine_free(e);
}

/* The request of a transfer: its CURLOPT_PRIVATE or, should curl not say, a search. */
static http_req *req_of(http_engine *e, CURL *easy) {
  char *p = NULL;
  if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, &p) == CURLE_OK && p) return (http_req *)p;
  for (http_req *r = e->reqs; r; r = r->next)
    if (r->easy == easy) return r;
  return NULL;
}

static void check_done(http_engine *e) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(e->multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    CURLcode rc = m->data.result;
    http_req *r = req_of(e, m->easy_handle);
    if (r == NULL || r->finished) continue;
    if (rc == CURLE_ABORTED_BY_CALLBACK && e->why[0]) {
      /* curl gave up on every transfer because one of our callbacks failed: say how */
      char why[sizeof e->why];
      memcpy(why, e->why, sizeof why);
      req_end(r, 0, why);
    } else {
      req_done(r, rc);
    }
  }
}

/* After curl acted for the loop: delivers what finished; a failure of curl's
 * ends the requests left (in leave). */
static void after_action(http_engine *e, CURLMcode mc) {
  if (mc != CURLM_OK) http_failed(e, "curl_multi_socket_action failed", curl_multi_strerror(mc));
  check_done(e);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock *s = p->data;
  http_engine *e = s->e;
  if (e == NULL) return;            /* let go of: its close is on the way */
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  enter(e);
  after_action(e, curl_multi_socket_action(e->multi, s->fd, flags, &running));
  leave(e);
}

static void sock_unlink(sock *s) {
  if (s->pprev == NULL) return;
  *s->pprev = s->next;
  if (s->next) s->next->pprev = s->pprev;
  s->next = NULL;
  s->pprev = NULL;
}

/* The poll's close callback, ours or a close walk's: frees the sock unless curl
 * still holds it (then CURL_POLL_REMOVE, or the engine's end, frees it). */
static void sock_closed(uv_handle_t *hd) {
  sock *s = hd->data;
  s->closed = 1;
  if (s->assigned) return;
  sock_unlink(s);
  free(s);
}

/* A poll for a socket curl starts to use, tied to it so later calls find it; NULL
 * when that fails, with e->why saying why. */
static sock *sock_watch(http_engine *e, curl_socket_t fd) {
  sock *s = calloc(1, sizeof *s);
  if (s == NULL) {
    http_failed(e, "cannot watch a socket", "not enough memory");
    return NULL;
  }
  s->base.on_close = sock_closed;
  s->e = e;
  s->fd = fd;
  int rc = uv_poll_init_socket(e->loop, &s->poll, fd);
  if (rc != 0) {
    free(s);
    http_failed(e, "cannot watch a socket (uv_poll_init_socket)", uv_strerror(rc));
    return NULL;
  }
  s->poll.data = s;
  s->next = e->socks;
  if (s->next) s->next->pprev = &s->next;
  s->pprev = &e->socks;
  e->socks = s;
  CURLMcode mc = curl_multi_assign(e->multi, fd, s);
  if (mc != CURLM_OK) {
    /* Untied, the next call for fd would make a second poll for it. */
    uv_close((uv_handle_t *)&s->poll, sock_closed);
    http_failed(e, "cannot watch a socket (curl_multi_assign)", curl_multi_strerror(mc));
    return NULL;
  }
  s->assigned = 1;
  return s;
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  (void)easy;
  http_engine *e = userp;
  sock *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    /* Closing stops the poll at once, before curl closes fd; curl forgets s as this
     * returns (curl_multi_assign(3)), so there is nothing to untie. */
    if (s == NULL) return 0;
    s->assigned = 0;
    if (s->closed) {                /* a close walk's close came first */
      sock_unlink(s);
      free(s);
    } else if (!uv_is_closing((uv_handle_t *)&s->poll)) {
      uv_close((uv_handle_t *)&s->poll, sock_closed);
    }                               /* else its close, on the way, frees it */
    return 0;
  }
  if (e->closing) return 0;         /* every transfer is ending: nothing to watch */
  if (s && uv_is_closing((uv_handle_t *)&s->poll))
    return http_failed(e, "cannot watch a socket", "its loop is closing");
  if (s == NULL && (s = sock_watch(e, fd)) == NULL) return -1;
  int events = 0;
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  int rc = uv_poll_start(&s->poll, events, on_poll);
  return rc == 0 ? 0 : http_failed(e, "cannot watch a socket (uv_poll_start)", uv_strerror(rc));
}

static void on_timeout(uv_timer_t *t) {
  http_engine *e = t->data;
  int running;
  enter(e);
  after_action(e, curl_multi_socket_action(e->multi, CURL_SOCKET_TIMEOUT, 0, &running));
  leave(e);
}

/* A failure here is told to curl as a success: every call into curl ends at leave,
 * which ends all transfers with e->why. Told -1, curl 7.88 would mark itself dead
 * and, inside curl_multi_add_handle, leave the new transfer half added: tied to the
 * multi but in none of its lists, so that removing it (or curl_easy_cleanup)
 * drops every other transfer from the multi's list and no transfer can be added
 * again (CURLM_ABORTED_BY_CALLBACK for good). */
static int on_timer(CURLM *multi, long ms, void *userp) {
  (void)multi;
  http_engine *e = userp;
  int rc = 0;
  if (ms < 0) rc = uv_timer_stop(&e->timer);
  else if (e->closing) return 0;    /* every transfer is ending: nothing to time */
  else if (uv_is_closing((uv_handle_t *)&e->timer)) rc = UV_EINVAL;
  else rc = uv_timer_start(&e->timer, on_timeout, (uint64_t)ms, 0);
  if (rc != 0) http_failed(e, ms < 0 ? "cannot stop curl's timer" : "cannot set curl's timer",
                           uv_strerror(rc));
  return 0;
}

/* The timer's close callback, ours (engine_free) or a close walk's: the loop is
 * going away, so the engine closes with it. */
static void timer_closed(uv_handle_t *hd) {
  http_engine *e = hd->data;
  e->timer_closed = 1;
  if (e->freed) {
    if (!e->leaked) free(e);
    return;
  }
  http_engine_close(e);             /* engine_free sees timer_closed and frees e */
}

/* At the outermost leave of a closing engine, every request finished and reaped:
 * lets go of curl, the polls and the timer; the struct goes with the timer's
 * close. */
static void engine_free(http_engine *e) {
  if (e->freed) return;
  e->freed = 1;
  /* Polls stop before curl closes their sockets; curl's CURL_POLL_REMOVE during the
   * cleanup, or the loop below, frees each once closed. */
  for (sock *s = e->socks; s; s = s->next)
    if (!uv_is_closing((uv_handle_t *)&s->poll)) uv_close((uv_handle_t *)&s->poll, sock_closed);
  if (e->multi) {
    if (curl_multi_cleanup(e->multi) != CURLM_OK) {
      /* Curl refuses only from inside its callbacks, which leave rules out; should
       * it all the same, it may still call into e and the socks: keep them all. */
      e->leaked = 1;
      if (!uv_is_closing((uv_handle_t *)&e->timer)) uv_close((uv_handle_t *)&e->timer, timer_closed);
      return;
    }
    e->multi = NULL;
  }
  while (e->reqs) req_free(e->reqs);   /* none, unless curl refused to let one go */
  while (e->socks) {
    sock *s = e->socks;
    sock_unlink(s);
    s->e = NULL;
    s->assigned = 0;
    if (s->closed) free(s);         /* else its close, on the way, frees it */
  }
  if (e->timer_closed) free(e);
  else if (!uv_is_closing((uv_handle_t *)&e->timer))
    uv_close((uv_handle_t *)&e->timer, timer_closed);
  /* else a close walk's close of the timer, on the way, frees e */
}

#define MULTI_SETOPT(opt, val)                                                    \
  do {                                                                            \
    CURLMcode mc_ = curl_multi_setopt(e->multi, opt, val);                        \
    if (mc_ != CURLM_OK) {                                                        \
      set_err(err, errlen, "http: cannot set %s: %s", #opt, curl_multi_strerror(mc_)); \
      engine_free(e);                                                             \
      return NULL;                                                                \
    }                                                                             \
  } while (0)

http_engine *http_engine_new(uv_loop_t *loop, char *err, size_t errlen) {
  uv_once(&curl_once, curl_init);
  if (!curl_ok) {
    set_err(err, errlen, "%s", "http: libcurl could not be initialised");
    return NULL;
  }
  http_engine *e = calloc(1, sizeof *e);
  if (e == NULL) {
    set_err(err, errlen, "%s", "not enough memory");
    return NULL;
  }
  e->loop = loop;
  e->base.on_close = timer_closed;
  int rc = uv_timer_init(loop, &e->timer);
  if (rc != 0) {
    free(e);
    set_err(err, errlen, "http: cannot make a timer: %s", uv_strerror(rc));
    return NULL;
  }
  e->timer.data = e;
  e->multi = curl_multi_init();
  if (e->multi == NULL) {
    engine_free(e);
    set_err(err, errlen, "%s", "http: cannot make a curl multi handle");
    return NULL;
  }
  MULTI_SETOPT(CURLMOPT_SOCKETFUNCTION, on_socket);
  MULTI_SETOPT(CURLMOPT_SOCKETDATA, e);
  MULTI_SETOPT(CURLMOPT_TIMERFUNCTION, on_timer);
  MULTI_SETOPT(CURLMOPT_TIMERDATA, e);
  return e;
}

void http_engine_close(http_engine *e) {
  if (e == NULL || e->closing) return;
  e->closing = 1;
  enter(e);
  /* Requests are not freed before the outermost leave: the walk is safe, and
   * http_start refuses new ones. */
  for (http_req *r = e->reqs; r; r = r->next)
    if (!r->finished) req_end(r, 0, "cancelled");
  leave(e);
}

/* ---------------------------------------------------------- transfers ---- */

/* Returning less than len makes curl end the transfer (CURLE_WRITE_ERROR), as it
 * must once the request is finished: cancelled from inside on_data, say. */
static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  http_req *r = ud;
  size_t len = size * n;
  if (r->finished) return 0;
  if (r->stream) {
    if (r->cb.on_data) r->cb.on_data(r->ctx, p, len);
    return r->finished ? 0 : len;
  }
  return buf_append(&r->body, p, len) == 0 ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  http_req *r = ud;
  size_t len = size * n;
  if (r->finished) return 0;
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) r->head.len = 0;  /* a new response */
  if (buf_append(&r->head, p, len) != 0) return 0;
  /* The blank line ends a header block; the first final one (not 1xx) is when the
   * server has taken the request: on_head(status), once. */
  if (r->head_pending && (len == 2 || len == 1) && (p[0] == '\r' || p[0] == '\n')) {
    long status = 0;
    if (curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK) status = 0;
    /* 1xx, or a proxy's answer to CONNECT (no status of the server's yet): not it */
    if (status < 200) return len;
    r->head_pending = 0;
    r->cb.on_head(r->ctx, status);
    return r->finished ? 0 : len;
  }
  return len;
}

/* Sets an option of the request being made; when curl refuses (a value it rejects,
 * such as a string over its 8 MB limit, or no memory for its copy), frees the
 * request and fails, naming the option. */
#define REQ_SETOPT(opt, val)                                                      \
  do {                                                                            \
    CURLcode rc_ = curl_easy_setopt(r->easy, opt, val);                           \
    if (rc_ != CURLE_OK) {                                                        \
      set_err(err, errlen, "http: cannot set %s: %s", #opt, curl_easy_strerror(rc_)); \
      req_free(r);                                                                \
      return NULL;                                                                \
    }                                                                             \
  } while (0)

http_req *http_start(http_engine *e, const http_opts *o, const http_cbs *cb, void *ctx,
                     char *err, size_t errlen) {
  if (e->closing) {
    set_err(err, errlen, "%s", "http: closed");
    return NULL;
  }
  if (o->url == NULL) {
    set_err(err, errlen, "%s", "http: option 'url' is required");
    return NULL;
  }
  if (cb == NULL || cb->on_done == NULL) {
    set_err(err, errlen, "%s", "http: on_done is required");
    return NULL;
  }
  http_req *r = calloc(1, sizeof *r);
  if (r == NULL) {
    set_err(err, errlen, "%s", "not enough memory");
    return NULL;
  }
  r->e = e;
  r->cb = *cb;
  r->ctx = ctx;
  r->stream = o->stream != 0;
  r->head_pending = cb->on_head != NULL;
  r->easy = curl_easy_init();
  if (r->easy == NULL) {
    free(r);
    set_err(err, errlen, "%s", "http: cannot make a curl handle");
    return NULL;
  }
  REQ_SETOPT(CURLOPT_ERRORBUFFER, r->err);
  REQ_SETOPT(CURLOPT_URL, o->url);
  REQ_SETOPT(CURLOPT_PRIVATE, (char *)r);
  REQ_SETOPT(CURLOPT_NOSIGNAL, 1L);
  REQ_SETOPT(CURLOPT_WRITEFUNCTION, on_write);
  REQ_SETOPT(CURLOPT_WRITEDATA, r);
  REQ_SETOPT(CURLOPT_HEADERFUNCTION, on_header);
  REQ_SETOPT(CURLOPT_HEADERDATA, r);
  if (o->unix_socket) REQ_SETOPT(CURLOPT_UNIX_SOCKET_PATH, o->unix_socket);
  if (o->ca) REQ_SETOPT(CURLOPT_CAINFO, o->ca);
  if (o->cert) REQ_SETOPT(CURLOPT_SSLCERT, o->cert);
  if (o->key) REQ_SETOPT(CURLOPT_SSLKEY, o->key);
  if (o->insecure) {
    REQ_SETOPT(CURLOPT_SSL_VERIFYPEER, 0L);
    REQ_SETOPT(CURLOPT_SSL_VERIFYHOST, 0L);
  }
  if (o->timeout_ms > 0) REQ_SETOPT(CURLOPT_TIMEOUT_MS, o->timeout_ms);
  if (o->body) {
    REQ_SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
    REQ_SETOPT(CURLOPT_COPYPOSTFIELDS, o->body);
  }
  if (o->method) REQ_SETOPT(CURLOPT_CUSTOMREQUEST, o->method);
  if (o->headers) {
    for (size_t i = 0; i < o->nheaders; i++) {
      struct curl_slist *l = curl_slist_append(r->headers, o->headers[i]);
      if (l == NULL) {
        const char *h = o->headers[i], *colon = strchr(h, ':');
        set_err(err, errlen, "http: cannot add the header %.*s: not enough memory",
                (int)(colon ? (size_t)(colon - h) : strlen(h)), h);
        req_free(r);
        return NULL;
      }
      r->headers = l;
    }
    REQ_SETOPT(CURLOPT_HTTPHEADER, r->headers);
  }
  enter(e);
  req_link(e, r);
  r->in_multi = 1;
  int failed = e->why[0] != '\0';  /* before: then leave ends r too, after its start */
  CURLMcode mc = curl_multi_add_handle(e->multi, r->easy);
  if (mc != CURLM_OK || (!failed && e->why[0])) {
    /* Our timer callback failed as curl took r (on_timer): that also ends the
     * requests already running, in leave, with the same reason. */
    set_err(err, errlen, "http: cannot start the request: %s",
            e->why[0] ? e->why : curl_multi_strerror(mc));
    r->finished = 1;                /* no on_done: the caller hears it from us */
    e->reap = 1;
    leave(e);
    return NULL;
  }
  leave(e);                         /* at the outermost level nothing ends r here */
  return r;
}

void http_cancel(http_req *r) {
  if (r == NULL || r->finished) return;
  http_engine *e = r->e;
  enter(e);
  req_end(r, 0, "cancelled");
  leave(e);
}
