/*
 * http.c - HTTP requests on the loop, for backends: libcurl's multi interface
 * driven by libuv (a uv_poll for each socket curl watches, one uv_timer for curl's
 * timeouts; no thread per request, no busy polling).
 *
 * Contract:
 * - core.http_request{ method = "GET", url, unix_socket, headers = { name = value },
 *   body, timeout = ms, ca, cert, key, insecure, on_data = fn(chunk),
 *   on_done = fn(status, headers, body | nil, nil, nil, message) } starts a request
 *   and returns it; on_done is called exactly once, on the loop: the status, the
 *   response headers (lower-case names), and the body ("" when on_data took it), or
 *   nil and a message ("Couldn't connect to server (CURLE_COULDNT_CONNECT)").
 * - req:cancel() ends it: on_done gets nil, "cancelled". Closing the loop cancels
 *   what is left.
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

typedef struct http {
  flame_handle base;                /* for the timer handle */
  uv_timer_t timer;
  CURLM *multi;
  flame_loop *lp;
  int closed;
} http;

typedef struct sock {
  flame_handle base;
  uv_poll_t poll;
  http *h;
  curl_socket_t fd;
} sock;

typedef struct req {
  CURL *easy;
  http *h;
  struct curl_slist *headers;
  buf body, head;
  int done_ref, data_ref;
  int finished;
  struct req **owner;
  char err[CURL_ERROR_SIZE];
} req;

static uv_once_t curl_once = UV_ONCE_INIT;
static int curl_ok;

static void curl_init(void) {
  curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

static void req_free(req *r) {
  lua_State *L = r->h->lp->L;
  if (r->owner) *r->owner = NULL;
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->done_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
  }
  curl_slist_free_all(r->headers);
  curl_easy_cleanup(r->easy);
  buf_free(&r->body);
  buf_free(&r->head);
  free(r);
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

/* Calls on_done once and frees the request. */
static void req_finish(lua_State *L, req *r, CURLcode rc, const char *why) {
  if (r->finished) return;
  r->finished = 1;
  if (L && r->done_ref != LUA_NOREF && lua_checkstack(L, 6)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->done_ref);
    if (why == NULL && rc == CURLE_OK) {
      long status = 0;
      curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
      lua_pushinteger(L, status);
      push_headers(L, &r->head);
      lua_pushlstring(L, r->body.data ? (const char *)r->body.data : "", r->body.len);
      lua_pushnil(L);
    } else {
      lua_pushnil(L);
      lua_pushnil(L);
      lua_pushnil(L);
      if (why) lua_pushstring(L, why);
      else lua_pushfstring(L, "%s (%s)", r->err[0] ? r->err : curl_easy_strerror(rc),
                           rc == CURLE_COULDNT_CONNECT ? "CURLE_COULDNT_CONNECT"
                           : rc == CURLE_OPERATION_TIMEDOUT ? "CURLE_OPERATION_TIMEDOUT"
                           : rc == CURLE_COULDNT_RESOLVE_HOST ? "CURLE_COULDNT_RESOLVE_HOST"
                           : "CURLE");
    }
    req_free(r);
    flame_pcall_report(L, 4, "an HTTP callback");
    return;
  }
  req_free(r);
}

static void check_done(http *h) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(h->multi, &left))) {
    if (m->msg != CURLMSG_DONE) continue;
    req *r = NULL;
    CURL *easy = m->easy_handle;
    CURLcode rc = m->data.result;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&r);
    curl_multi_remove_handle(h->multi, easy);
    if (r) req_finish(h->lp->L, r, rc, NULL);
  }
}

static void on_poll(uv_poll_t *p, int status, int events) {
  sock *s = p->data;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  http *h = s->h;
  curl_multi_socket_action(h->multi, s->fd, flags, &running);
  check_done(h);
}

static void sock_free(uv_handle_t *hd) {
  free(hd->data);
}

static int on_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  (void)easy;
  http *h = userp;
  sock *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      uv_poll_stop(&s->poll);
      uv_close((uv_handle_t *)&s->poll, sock_free);
      curl_multi_assign(h->multi, fd, NULL);
    }
    return 0;
  }
  if (s == NULL) {
    s = calloc(1, sizeof *s);
    if (s == NULL) return -1;
    s->base.on_close = sock_free;
    s->h = h;
    s->fd = fd;
    if (uv_poll_init_socket(&h->lp->uv, &s->poll, fd) != 0) {
      free(s);
      return -1;
    }
    s->poll.data = s;
    curl_multi_assign(h->multi, fd, s);
  }
  int events = 0;
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  return uv_poll_start(&s->poll, events, on_poll) == 0 ? 0 : -1;
}

static void on_timeout(uv_timer_t *t) {
  http *h = t->data;
  int running;
  curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done(h);
}

static int on_timer(CURLM *multi, long ms, void *userp) {
  (void)multi;
  http *h = userp;
  if (ms < 0) uv_timer_stop(&h->timer);
  else uv_timer_start(&h->timer, on_timeout, (uint64_t)ms, 0);
  return 0;
}

static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  req *r = ud;
  size_t len = size * n;
  lua_State *L = r->h->lp->L;
  if (r->data_ref != LUA_NOREF && L && lua_checkstack(L, 3)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->data_ref);
    lua_pushlstring(L, p, len);
    flame_pcall_report(L, 1, "an HTTP data callback");
    return len;
  }
  return buf_append(&r->body, p, len) == 0 ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  req *r = ud;
  size_t len = size * n;
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) r->head.len = 0;  /* a new response */
  return buf_append(&r->head, p, len) == 0 ? len : 0;
}

/* The http struct lives in C memory: its timer handle must outlive the userdata
 * until libuv has closed it. */
static void timer_closed(uv_handle_t *hd) {
  free(hd->data);
}

static int http_gc(lua_State *L) {
  http **ud = luaL_checkudata(L, 1, HTTP_MT);
  http *h = *ud;
  if (h == NULL || h->closed) return 0;
  *ud = NULL;
  h->closed = 1;
  if (h->multi) curl_multi_cleanup(h->multi);   /* requests left die with the loop */
  h->multi = NULL;
  if (!uv_is_closing((uv_handle_t *)&h->timer)) uv_close((uv_handle_t *)&h->timer, timer_closed);
  return 0;
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
  if (h->multi == NULL) luaL_error(L, "http: cannot make a curl multi handle");
  curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
  curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timer);
  curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
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
  r->done_ref = r->data_ref = LUA_NOREF;
  r->easy = curl_easy_init();
  if (r->easy == NULL) {
    free(r);
    return luaL_error(L, "http: cannot make a curl handle");
  }
  CURL *e = r->easy;
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->err);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
  const char *s;
  if ((s = opt_string(L, 1, "unix_socket"))) curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, s);
  if ((s = opt_string(L, 1, "ca"))) curl_easy_setopt(e, CURLOPT_CAINFO, s);
  if ((s = opt_string(L, 1, "cert"))) curl_easy_setopt(e, CURLOPT_SSLCERT, s);
  if ((s = opt_string(L, 1, "key"))) curl_easy_setopt(e, CURLOPT_SSLKEY, s);
  lua_getfield(L, 1, "insecure");
  if (lua_toboolean(L, -1)) {
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout");
  if (!lua_isnil(L, -1)) {
    lua_Number ms = luaL_checknumber(L, -1);
    if (ms > 0 && ms < 1e12) curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)ms);
  }
  lua_pop(L, 1);
  size_t blen = 0;
  lua_getfield(L, 1, "body");
  const char *body = lua_isnil(L, -1) ? NULL : luaL_checklstring(L, -1, &blen);
  if (body) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen);
    curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body);
  }
  lua_pop(L, 1);
  if (method) curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  lua_getfield(L, 1, "headers");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
        lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
        struct curl_slist *n = curl_slist_append(r->headers, lua_tostring(L, -1));
        if (n) r->headers = n;
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "on_data");
  if (lua_isfunction(L, -1)) r->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_getfield(L, 1, "on_done");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  r->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  r->owner = ud;
  *ud = r;
  if (curl_multi_add_handle(h->multi, e) != CURLM_OK) {
    r->owner = NULL;
    *ud = NULL;
    req_free(r);
    return luaL_error(L, "http: cannot start the request");
  }
  return 1;
}

static int req_cancel(lua_State *L) {
  req **ud = luaL_checkudata(L, 1, REQ_MT);
  req *r = *ud;
  if (r == NULL) return 0;
  curl_multi_remove_handle(r->h->multi, r->easy);
  req_finish(L, r, CURLE_OK, "cancelled");   /* on the caller's thread: it may not be in the loop */
  return 0;
}

static int req_gc(lua_State *L) {
  req **ud = luaL_checkudata(L, 1, REQ_MT);
  if (*ud) (*ud)->owner = NULL;     /* the request goes on */
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
