/*
 * http.c - HTTP requests on the loop, for backends: libcurl's multi interface
 * driven by libuv (a uv_poll for each socket curl watches, one uv_timer for curl's
 * timeouts; no thread per request, no busy polling).
 *
 * Contract:
 * - core.http_request{ method = "GET", url, unix_socket, headers = { name = value },
 *   body, timeout = ms, ca, cert, key, insecure, on_data = fn(chunk),
 *   on_head = fn(status) (once the response's headers have come: the server took
 *   the request; not called when the request fails before),
 *   on_done = fn(status, headers, body | nil, nil, nil, message) } starts a request
 *   and returns it; on_done is called exactly once, on the loop: the status, the
 *   response headers (lower-case names), and the body ("" when on_data took it), or
 *   nil and a message ("Couldn't connect to server (CURLE_COULDNT_CONNECT)").
 * - req:cancel() ends it: on_done gets nil, "cancelled" (also from inside on_data).
 *   Closing the loop cancels what is left.
 * - http_request raises when curl refuses an option ("http: cannot set
 *   CURLOPT_UNIX_SOCKET_PATH: <curl's message>") or the request cannot start. When
 *   curl or the loop fails under requests already started (a socket that cannot be
 *   watched, say), each of them ends with nil and a message saying what failed,
 *   rather than hang.
 */
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>
#include <curl/curl.h>

#include "flame.h"
#include "buf.h"
#include "loop.h"

#define HTTP_KEY "flame.http.instance"
#define HTTP_MT "flame.http"
#define REQ_MT "flame.http.request"

typedef struct req req;

typedef struct http {
  flame_handle base;                /* for the timer handle */
  uv_timer_t timer;
  CURLM *multi;
  flame_loop *lp;
  int closed;
  req *reqs;                        /* started and not yet freed */
  int reap;                         /* some of them wait for curl to let go (req_release) */
  char why[256];                    /* how one of our curl callbacks failed (http_failed) */
} http;

typedef struct sock {
  flame_handle base;
  uv_poll_t poll;
  http *h;
  curl_socket_t fd;
} sock;

struct req {
  CURL *easy;
  http *h;
  struct curl_slist *headers;
  buf body, head;
  int done_ref, data_ref, head_ref;  /* head_ref: on_head, until it is called */
  int started, finished;
  req **owner;
  req *next, **pprev;               /* in h->reqs once started */
  char err[CURL_ERROR_SIZE];
};

static uv_once_t curl_once = UV_ONCE_INIT;
static int curl_ok;

static void curl_init(void) {
  curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

static void req_link(req **head, req *r) {
  r->next = *head;
  if (r->next) r->next->pprev = &r->next;
  r->pprev = head;
  *head = r;
}

static void req_unlink(req *r) {
  if (r->pprev == NULL) return;
  *r->pprev = r->next;
  if (r->next) r->next->pprev = r->pprev;
  r->next = NULL;
  r->pprev = NULL;
}

static void req_free(req *r) {
  lua_State *L = r->h->lp->L;
  if (r->owner) *r->owner = NULL;
  req_unlink(r);
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->done_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->head_ref);
  }
  curl_slist_free_all(r->headers);
  curl_easy_cleanup(r->easy);
  buf_free(&r->body);
  buf_free(&r->head);
  free(r);
}

/* Frees a finished request once curl lets go of its transfer. Inside one of curl's
 * callbacks (an on_data that cancels) curl refuses; the request then waits in
 * h->reqs until check_done, which runs as soon as that callback's socket action
 * returns. Any other refusal means the handle is in no multi of ours, and
 * curl_easy_cleanup is all that is left to do. */
static void req_release(req *r) {
  http *h = r->h;
  if (h->multi && curl_multi_remove_handle(h->multi, r->easy) == CURLM_RECURSIVE_API_CALL) {
    h->reap = 1;
    return;
  }
  req_free(r);
}

/* [-0, +1, m] "Name: value" lines of the last response into a table. */
static void push_headers(lua_State *L, const buf *head) {
  lua_newtable(L);
  const char *p = (const char *)head->data, *end = p + head->len;
  while (p && p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *line_end = nl ? nl : end;
    const char *colon = memchr(p, ':', (size_t)(line_end - p));
    if (colon) {
      luaL_Buffer b;
      luaL_buffinit(L, &b);
      for (const char *c = p; c < colon; c++) luaL_addchar(&b, (char)tolower((unsigned char)*c));
      luaL_pushresult(&b);
      const char *v = colon + 1, *ve = line_end;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ')) ve--;
      lua_pushlstring(L, v, (size_t)(ve - v));
      lua_rawset(L, -3);
    }
    p = nl ? nl + 1 : NULL;
  }
}

/* Marks the request finished, lets go of its userdata and Lua references, and
 * pushes on_done with its four arguments: the response, or nil and why there is
 * none. Returns 0, having pushed nothing, when there is no on_done to call. */
static int req_push_done(lua_State *L, req *r, CURLcode rc, const char *why) {
  r->finished = 1;
  if (r->owner) *r->owner = NULL;
  r->owner = NULL;
  if (L == NULL || r->done_ref == LUA_NOREF || !lua_checkstack(L, 6)) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->done_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->done_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->head_ref);
  r->done_ref = r->data_ref = r->head_ref = LUA_NOREF;
  long status = 0;
  CURLcode irc = CURLE_OK;
  if (why == NULL && rc == CURLE_OK)
    irc = curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  if (why == NULL && rc == CURLE_OK && irc == CURLE_OK) {
    lua_pushinteger(L, status);
    push_headers(L, &r->head);
    lua_pushlstring(L, r->body.data ? (const char *)r->body.data : "", r->body.len);
    lua_pushnil(L);
    return 1;
  }
  lua_pushnil(L);
  lua_pushnil(L);
  lua_pushnil(L);
  if (why) lua_pushstring(L, why);
  else if (irc != CURLE_OK)
    lua_pushfstring(L, "http: cannot read the response status (CURLINFO_RESPONSE_CODE): %s",
                    curl_easy_strerror(irc));
  else lua_pushfstring(L, "%s (%s)", r->err[0] ? r->err : curl_easy_strerror(rc),
                       rc == CURLE_COULDNT_CONNECT ? "CURLE_COULDNT_CONNECT"
                       : rc == CURLE_OPERATION_TIMEDOUT ? "CURLE_OPERATION_TIMEDOUT"
                       : rc == CURLE_COULDNT_RESOLVE_HOST ? "CURLE_COULDNT_RESOLVE_HOST"
                       : "CURLE");
  return 1;
}

/* Calls on_done once and frees the request. */
static void req_finish(lua_State *L, req *r, CURLcode rc, const char *why) {
  if (r->finished) return;
  int call = req_push_done(L, r, rc, why);
  req_release(r);
  if (call) flame_pcall_report(L, 4, "an HTTP callback");
}

/* Our side of a curl callback failed. Returns the -1 that makes curl give up on
 * every transfer; h->why (the first reason, if several) is what they end with. */
static int http_failed(http *h, const char *what, const char *detail) {
  if (h->why[0] == '\0') snprintf(h->why, sizeof h->why, "http: %s: %s", what, detail);
  return -1;
}

/* Ends every request left with h->why. After one of our callbacks failed, curl has
 * given up on its transfers but no longer drives them (nor asks for its timer), so
 * without this they would hang; the same goes when curl itself failed to act. */
static void fail_all(http *h, lua_State *L) {
  char why[sizeof h->why];
  memcpy(why, h->why, sizeof why);
  h->why[0] = '\0';
  req *left = h->reqs;              /* requests an on_done starts meanwhile are not ended */
  h->reqs = NULL;
  if (left) left->pprev = &left;
  /* All out of the multi first: curl takes new transfers again (from an on_done)
   * only once none of the old ones is alive. req_release checks the outcome. */
  for (req *r = left; r; r = r->next) (void)curl_multi_remove_handle(h->multi, r->easy);
  while (left) {
    req *r = left;
    req_unlink(r);
    req_link(&h->reqs, r);          /* where req_release expects it */
    if (r->finished) req_release(r);
    else req_finish(L, r, CURLE_OK, why);
  }
}

/* After a curl call that may have run our callbacks, outside of them. */
static void settle(http *h, lua_State *L) {
  if (h->why[0]) fail_all(h, L);
}

/* The request of a transfer: its CURLOPT_PRIVATE or, should curl not say, a search. */
static req *req_of(http *h, CURL *easy) {
  char *p = NULL;
  if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, &p) == CURLE_OK && p) return (req *)p;
  for (req *r = h->reqs; r; r = r->next)
    if (r->easy == easy) return r;
  return NULL;
}

/* Frees the requests cancelled from inside a curl callback (see req_release). */
static void reap(http *h) {
  if (!h->reap) return;
  h->reap = 0;
  for (req *r = h->reqs, *next; r; r = next) {
    next = r->next;
    if (r->finished) req_release(r);
  }
}

static void check_done(http *h) {
  lua_State *L = h->lp->L;
  CURLMsg *m;
  int left;
  reap(h);
  while ((m = curl_multi_info_read(h->multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    CURLcode rc = m->data.result;
    req *r = req_of(h, m->easy_handle);
    if (r == NULL || r->finished) continue;
    /* Curl gives up on every transfer when one of our callbacks failed: say how. */
    req_finish(L, r, rc, rc == CURLE_ABORTED_BY_CALLBACK && h->why[0] ? h->why : NULL);
  }
}

/* After curl acted for the loop: delivers what finished and, when curl failed or
 * gave up, ends the requests left. */
static void after_action(http *h, CURLMcode mc) {
  if (mc != CURLM_OK) http_failed(h, "curl_multi_socket_action failed", curl_multi_strerror(mc));
  check_done(h);
  settle(h, h->lp->L);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock *s = p->data;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  http *h = s->h;
  after_action(h, curl_multi_socket_action(h->multi, s->fd, flags, &running));
}

static void sock_free(uv_handle_t *hd) {
  free(hd->data);
}

/* A poll for a socket curl starts to use, tied to it so later calls find it; NULL
 * when that fails, with h->why saying why. */
static sock *sock_watch(http *h, curl_socket_t fd) {
  sock *s = calloc(1, sizeof *s);
  if (s == NULL) {
    http_failed(h, "cannot watch a socket", "not enough memory");
    return NULL;
  }
  s->base.on_close = sock_free;
  s->h = h;
  s->fd = fd;
  int rc = uv_poll_init_socket(&h->lp->uv, &s->poll, fd);
  if (rc != 0) {
    free(s);
    http_failed(h, "cannot watch a socket (uv_poll_init_socket)", uv_strerror(rc));
    return NULL;
  }
  s->poll.data = s;
  CURLMcode mc = curl_multi_assign(h->multi, fd, s);
  if (mc != CURLM_OK) {
    /* Untied, the next call for fd would make a second poll for it. */
    uv_close((uv_handle_t *)&s->poll, sock_free);
    http_failed(h, "cannot watch a socket (curl_multi_assign)", curl_multi_strerror(mc));
    return NULL;
  }
  return s;
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  (void)easy;
  http *h = userp;
  sock *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    /* Closing stops the poll at once, before curl closes fd; curl forgets s as this
     * returns (curl_multi_assign(3)), so there is nothing to untie. */
    if (s) uv_close((uv_handle_t *)&s->poll, sock_free);
    return 0;
  }
  if (s == NULL && (s = sock_watch(h, fd)) == NULL) return -1;
  int events = 0;
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  int rc = uv_poll_start(&s->poll, events, on_poll);
  return rc == 0 ? 0 : http_failed(h, "cannot watch a socket (uv_poll_start)", uv_strerror(rc));
}

static void on_timeout(uv_timer_t *t) {
  http *h = t->data;
  int running;
  after_action(h, curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running));
}

static int on_timer(CURLM *multi, long ms, void *userp) {
  (void)multi;
  http *h = userp;
  int rc = ms < 0 ? uv_timer_stop(&h->timer)
                  : uv_timer_start(&h->timer, on_timeout, (uint64_t)ms, 0);
  return rc == 0 ? 0 : http_failed(h, "cannot set curl's timer", uv_strerror(rc));
}

/* Returning less than len makes curl end the transfer (CURLE_WRITE_ERROR), as it
 * must once the request is finished: cancelled from inside on_data, say. */
static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  req *r = ud;
  size_t len = size * n;
  lua_State *L = r->h->lp->L;
  if (r->finished) return 0;
  if (r->data_ref != LUA_NOREF && L && lua_checkstack(L, 3)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->data_ref);
    lua_pushlstring(L, p, len);
    flame_pcall_report(L, 1, "an HTTP data callback");
    return r->finished ? 0 : len;
  }
  return buf_append(&r->body, p, len) == 0 ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  req *r = ud;
  size_t len = size * n;
  if (r->finished) return 0;
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) r->head.len = 0;  /* a new response */
  if (buf_append(&r->head, p, len) != 0) return 0;
  /* The blank line ends a header block; the first final one (not 1xx) is when the
   * server has taken the request: on_head(status), once. */
  lua_State *L = r->h->lp->L;
  if (r->head_ref != LUA_NOREF && L && (len == 2 || len == 1) && (p[0] == '\r' || p[0] == '\n')) {
    long status = 0;
    if (curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK) status = 0;
    /* 1xx, or a proxy's answer to CONNECT (no status of the server's yet): not it */
    if (status < 200) return len;
    int ref = r->head_ref;
    r->head_ref = LUA_NOREF;
    if (!lua_checkstack(L, 3)) {
      luaL_unref(L, LUA_REGISTRYINDEX, ref);
      return len;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    lua_pushinteger(L, (lua_Integer)status);
    flame_pcall_report(L, 1, "an HTTP head callback");
    return r->finished ? 0 : len;
  }
  return len;
}

/* The http struct lives in C memory: its timer handle must outlive the userdata
 * until libuv has closed it. */
static void timer_closed(uv_handle_t *hd) {
  free(hd->data);
}

static void http_close(http **ud) {
  http *h = *ud;
  if (h == NULL || h->closed) return;
  *ud = NULL;
  h->closed = 1;
  /* Requests left die with the loop. A multi curl will not clean up (only from
   * inside its callbacks) may still call back into h: both are left, not freed. */
  if (h->multi && curl_multi_cleanup(h->multi) != CURLM_OK) return;
  h->multi = NULL;
  if (!uv_is_closing((uv_handle_t *)&h->timer)) uv_close((uv_handle_t *)&h->timer, timer_closed);
}

static int http_gc(lua_State *L) {
  http_close(luaL_checkudata(L, 1, HTTP_MT));
  return 0;
}

/* Sets an option of the instance being made; when curl refuses, unmakes it and
 * raises, naming the option. */
#define HTTP_SETOPT(opt, val) http_setopt(L, ud, #opt, curl_multi_setopt(h->multi, opt, val))

static void http_setopt(lua_State *L, http **ud, const char *name, CURLMcode rc) {
  if (rc == CURLM_OK) return;
  http_close(ud);
  luaL_error(L, "http: cannot set %s: %s", name, curl_multi_strerror(rc));
}

static http *http_get(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, HTTP_KEY) == LUA_TUSERDATA) {
    http *h = *(http **)lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (h == NULL) luaL_error(L, "http: closed");
    return h;
  }
  lua_pop(L, 1);
  uv_once(&curl_once, curl_init);
  if (!curl_ok) luaL_error(L, "http: libcurl could not be initialised");
  flame_loop *lp = flame_loop_get(L);
  http **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, HTTP_MT);
  http *h = calloc(1, sizeof *h);
  if (h == NULL) luaL_error(L, "not enough memory");
  h->lp = lp;
  h->base.on_close = timer_closed;
  if (uv_timer_init(&lp->uv, &h->timer) != 0) {
    free(h);
    luaL_error(L, "http: cannot make a timer");
  }
  h->timer.data = h;
  *ud = h;
  h->multi = curl_multi_init();
  if (h->multi == NULL) {
    http_close(ud);
    luaL_error(L, "http: cannot make a curl multi handle");
  }
  HTTP_SETOPT(CURLMOPT_SOCKETFUNCTION, on_socket);
  HTTP_SETOPT(CURLMOPT_SOCKETDATA, h);
  HTTP_SETOPT(CURLMOPT_TIMERFUNCTION, on_timer);
  HTTP_SETOPT(CURLMOPT_TIMERDATA, h);
  h->closed = 0;
  lua_setfield(L, LUA_REGISTRYINDEX, HTTP_KEY);
  return h;
}

static const char *opt_string(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  const char *s = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
  lua_pop(L, 1);                    /* kept alive by the options table */
  return s;
}

/* Sets an option of the request being made; when curl refuses (a value it rejects,
 * such as a string over its 8 MB limit, or no memory for its copy), frees the
 * request and raises, naming the option. */
#define REQ_SETOPT(opt, val) req_setopt(L, r, #opt, curl_easy_setopt(r->easy, opt, val))

static void req_setopt(lua_State *L, req *r, const char *name, CURLcode rc) {
  if (rc == CURLE_OK) return;
  req_free(r);
  luaL_error(L, "http: cannot set %s: %s", name, curl_easy_strerror(rc));
}

/* [-1, +0, m] Adds "name: value" from the key and value on the stack top. */
static void add_header(lua_State *L, req *r) {
  const char *line = lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
  struct curl_slist *n = curl_slist_append(r->headers, line);
  if (n == NULL) {
    req_free(r);
    luaL_error(L, "http: cannot add the header %s: not enough memory", lua_tostring(L, -3));
  }
  r->headers = n;
  lua_pop(L, 1);
}

/* http_request{...} -> request */
static int l_request(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  http *h = http_get(L);
  const char *url = opt_string(L, 1, "url");
  if (url == NULL) return luaL_error(L, "http: option 'url' is required");
  const char *method = opt_string(L, 1, "method");
  req **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, REQ_MT);
  req *r = calloc(1, sizeof *r);
  if (r == NULL) return luaL_error(L, "not enough memory");
  r->h = h;
  r->done_ref = r->data_ref = r->head_ref = LUA_NOREF;
  r->easy = curl_easy_init();
  if (r->easy == NULL) {
    free(r);
    return luaL_error(L, "http: cannot make a curl handle");
  }
  r->owner = ud;                    /* until started, an error below frees it in req_gc */
  *ud = r;
  REQ_SETOPT(CURLOPT_ERRORBUFFER, r->err);
  REQ_SETOPT(CURLOPT_URL, url);
  REQ_SETOPT(CURLOPT_PRIVATE, (char *)r);
  REQ_SETOPT(CURLOPT_NOSIGNAL, 1L);
  REQ_SETOPT(CURLOPT_WRITEFUNCTION, on_write);
  REQ_SETOPT(CURLOPT_WRITEDATA, r);
  REQ_SETOPT(CURLOPT_HEADERFUNCTION, on_header);
  REQ_SETOPT(CURLOPT_HEADERDATA, r);
  const char *s;
  if ((s = opt_string(L, 1, "unix_socket"))) REQ_SETOPT(CURLOPT_UNIX_SOCKET_PATH, s);
  if ((s = opt_string(L, 1, "ca"))) REQ_SETOPT(CURLOPT_CAINFO, s);
  if ((s = opt_string(L, 1, "cert"))) REQ_SETOPT(CURLOPT_SSLCERT, s);
  if ((s = opt_string(L, 1, "key"))) REQ_SETOPT(CURLOPT_SSLKEY, s);
  lua_getfield(L, 1, "insecure");
  if (lua_toboolean(L, -1)) {
    REQ_SETOPT(CURLOPT_SSL_VERIFYPEER, 0L);
    REQ_SETOPT(CURLOPT_SSL_VERIFYHOST, 0L);
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout");
  if (!lua_isnil(L, -1)) {
    lua_Number ms = luaL_checknumber(L, -1);
    if (ms > 0 && ms < 1e12) REQ_SETOPT(CURLOPT_TIMEOUT_MS, (long)ms);
  }
  lua_pop(L, 1);
  size_t blen = 0;
  lua_getfield(L, 1, "body");
  const char *body = lua_isnil(L, -1) ? NULL : luaL_checklstring(L, -1, &blen);
  if (body) {
    REQ_SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen);
    REQ_SETOPT(CURLOPT_COPYPOSTFIELDS, body);
  }
  lua_pop(L, 1);
  if (method) REQ_SETOPT(CURLOPT_CUSTOMREQUEST, method);
  lua_getfield(L, 1, "headers");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) add_header(L, r);
      lua_pop(L, 1);
    }
    REQ_SETOPT(CURLOPT_HTTPHEADER, r->headers);
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "on_data");
  if (lua_isfunction(L, -1)) r->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_getfield(L, 1, "on_head");
  if (lua_isfunction(L, -1)) r->head_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_getfield(L, 1, "on_done");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  r->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  r->started = 1;
  req_link(&h->reqs, r);
  CURLMcode mc = curl_multi_add_handle(h->multi, r->easy);
  if (mc != CURLM_OK) {
    /* Curl may have taken the handle before failing (when our timer callback failed,
     * which also ends the requests already running). */
    lua_pushfstring(L, "http: cannot start the request: %s",
                    h->why[0] ? h->why : curl_multi_strerror(mc));
    r->finished = 1;
    req_release(r);
    settle(h, L);
    return lua_error(L);
  }
  return 1;
}

static int req_cancel(lua_State *L) {
  req **ud = luaL_checkudata(L, 1, REQ_MT);
  req *r = *ud;
  if (r == NULL) return 0;
  http *h = r->h;
  req_finish(L, r, CURLE_OK, "cancelled");   /* on the caller's thread: it may not be in the loop */
  settle(h, L);
  return 0;
}

static int req_gc(lua_State *L) {
  req **ud = luaL_checkudata(L, 1, REQ_MT);
  req *r = *ud;
  if (r == NULL) return 0;
  if (r->started) {
    r->owner = NULL;                /* the request goes on */
    return 0;
  }
  /* An error stopped http_request before the request started: nothing else has it. */
  luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, r->head_ref);
  r->data_ref = r->head_ref = LUA_NOREF;
  req_free(r);
  return 0;
}

void flame_http_open(lua_State *L) {
  if (luaL_newmetatable(L, HTTP_MT)) {
    lua_pushcfunction(L, http_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, REQ_MT)) {
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, req_cancel);
    lua_setfield(L, -2, "cancel");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, req_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_request);
  lua_setfield(L, -2, "http_request");
}
