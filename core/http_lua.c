/*
 * http_lua.c - core.http_request: the Lua binding of the HTTP engine (http.h), one
 * engine per application loop (kept in the registry), for backends.
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
 *   Closing the loop (the Lua state) cancels what is left, without calling back.
 * - http_request raises when curl refuses an option ("http: cannot set
 *   CURLOPT_UNIX_SOCKET_PATH: <curl's message>") or the request cannot start. When
 *   curl or the loop fails under requests already started (a socket that cannot be
 *   watched, say), each of them ends with nil and a message saying what failed,
 *   rather than hang.
 * Callbacks run through flame_pcall_report on the thread running the loop, or on
 * the caller's when one of ours ends requests (req:cancel, a start whose failure
 * ends others).
 */
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "flame.h"
#include "http.h"
#include "loop.h"

#define HTTP_KEY "flame.http.instance"
#define HTTP_MT "flame.http"
#define REQ_MT "flame.http.request"

/* The registry's instance: a userdata, so its memory lasts until every finalizer
 * of the closing state has run (requests name it until their on_done). */
typedef struct lhttp {
  http_engine *e;                   /* NULL once closed */
  flame_loop *lp;
  lua_State *cur;                   /* while a function of ours ends requests: its caller */
} lhttp;

/* A request's Lua side: C memory, as the request goes on after its handle is
 * collected, until on_done. */
typedef struct lreq {
  lhttp *b;
  http_req *r;                      /* NULL until started */
  int done_ref, data_ref, head_ref; /* head_ref: on_head, until it is called */
  struct lreq **owner;              /* the Lua handle pointing here, or NULL */
} lreq;

/* The thread callbacks run on: the caller's of req:cancel (it may not be in the
 * loop), else the one running the loop; NULL when neither (the state closes). */
static lua_State *cb_state(lhttp *b) {
  return b->cur ? b->cur : b->lp->L;
}

static void lreq_unref(lua_State *L, lreq *q) {
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, q->done_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, q->data_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, q->head_ref);
  }
  q->done_ref = q->data_ref = q->head_ref = LUA_NOREF;
}

static void lreq_free(lua_State *L, lreq *q) {
  if (q->owner) *q->owner = NULL;
  lreq_unref(L, q);
  free(q);
}

/* [-0, +1, m] The response's headers as a table (a name seen twice: the last). */
static void push_headers(lua_State *L, const http_header *h, size_t nh) {
  lua_createtable(L, 0, nh > 64 ? 64 : (int)nh);
  for (size_t i = 0; i < nh; i++) {
    lua_pushlstring(L, h[i].name, h[i].name_len);
    lua_pushlstring(L, h[i].value, h[i].value_len);
    lua_rawset(L, -3);
  }
}

static void on_done(void *ctx, long status, const http_header *h, size_t nh,
                    const char *body, size_t blen, const char *err) {
  lreq *q = ctx;
  lua_State *L = cb_state(q->b);
  int call = L && q->done_ref != LUA_NOREF && lua_checkstack(L, 6);
  if (call) lua_rawgeti(L, LUA_REGISTRYINDEX, q->done_ref);
  lreq_free(L, q);                  /* first: the handle is spent for on_done's code */
  if (!call) return;
  if (err == NULL) {
    lua_pushinteger(L, (lua_Integer)status);
    push_headers(L, h, nh);
    lua_pushlstring(L, body, blen);
    lua_pushnil(L);
  } else {
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushstring(L, err);
  }
  flame_pcall_report(L, 4, "an HTTP callback");
}

static void on_data(void *ctx, const char *p, size_t n) {
  lreq *q = ctx;
  lua_State *L = cb_state(q->b);
  if (L == NULL || q->data_ref == LUA_NOREF || !lua_checkstack(L, 3)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, q->data_ref);
  lua_pushlstring(L, p, n);
  flame_pcall_report(L, 1, "an HTTP data callback");   /* q may be gone after */
}

static void on_head(void *ctx, long status) {
  lreq *q = ctx;
  lua_State *L = cb_state(q->b);
  int ref = q->head_ref;
  if (L == NULL || ref == LUA_NOREF) return;
  q->head_ref = LUA_NOREF;
  if (!lua_checkstack(L, 3)) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
  lua_pushinteger(L, (lua_Integer)status);
  flame_pcall_report(L, 1, "an HTTP head callback");
}

/* The requests left end with the state; when the loop was closed first (its
 * finalizer runs after ours, as it was made first, but should it not), its close
 * walk has already closed the engine. No Lua is called: cb_state is NULL here. */
static int http_gc(lua_State *L) {
  lhttp *b = luaL_checkudata(L, 1, HTTP_MT);
  http_engine *e = b->e;
  b->e = NULL;
  if (e && !b->lp->closed) http_engine_close(e);
  return 0;
}

static lhttp *http_get(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, HTTP_KEY) == LUA_TUSERDATA) {
    lhttp *b = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (b->e == NULL) luaL_error(L, "http: closed");
    return b;
  }
  lua_pop(L, 1);
  flame_loop *lp = flame_loop_get(L);
  if (lp->closed) luaL_error(L, "flame: the event loop is closed");
  lhttp *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->e = NULL;
  b->lp = lp;
  b->cur = NULL;
  luaL_setmetatable(L, HTTP_MT);
  char err[256];
  b->e = http_engine_new(&lp->uv, err, sizeof err);
  if (b->e == NULL) luaL_error(L, "%s", err);
  lua_setfield(L, LUA_REGISTRYINDEX, HTTP_KEY);
  return b;
}

/* [-0, +1, e] The option k of the table at 1, left on the stack so it stays alive
 * (an __index may have made it); NULL when nil. */
static const char *opt_string(lua_State *L, const char *k) {
  lua_getfield(L, 1, k);
  return lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
}

/* [-0, +2, m] The "Name: value" lines of the table at idx (string keys and values
 * only) into o, anchored by a table and a userdata left on the stack. */
static void opt_headers(lua_State *L, int idx, http_opts *o) {
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) n++;
    lua_pop(L, 1);
  }
  const char **lines = lua_newuserdatauv(L, (n ? n : 1) * sizeof *lines, 0);
  lua_createtable(L, n > 64 ? 64 : (int)n, 0);
  size_t i = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (i < n && lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
      lines[i++] = lua_pushfstring(L, "%s: %s", lua_tostring(L, -2), lua_tostring(L, -1));
      lua_rawseti(L, -4, (lua_Integer)i);
    }
    lua_pop(L, 1);
  }
  o->headers = lines;
  o->nheaders = i;
}

/* http_request{...} -> request */
static int l_request(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkstack(L, 32, "http_request");
  lhttp *b = http_get(L);
  http_opts o;
  memset(&o, 0, sizeof o);
  if ((o.url = opt_string(L, "url")) == NULL) return luaL_error(L, "http: option 'url' is required");
  o.method = opt_string(L, "method");
  o.unix_socket = opt_string(L, "unix_socket");
  o.ca = opt_string(L, "ca");
  o.cert = opt_string(L, "cert");
  o.key = opt_string(L, "key");
  lua_getfield(L, 1, "insecure");
  o.insecure = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "timeout");
  if (!lua_isnil(L, -1)) {
    lua_Number ms = luaL_checknumber(L, -1);
    if (ms > 0 && ms < 1e12) o.timeout_ms = (long)ms;
  }
  lua_pop(L, 1);
  lua_getfield(L, 1, "body");
  if (!lua_isnil(L, -1)) o.body = luaL_checklstring(L, -1, &o.body_len);
  lua_getfield(L, 1, "headers");
  if (lua_istable(L, -1)) opt_headers(L, lua_gettop(L), &o);
  lua_getfield(L, 1, "on_data");
  int data_i = lua_gettop(L);
  lua_getfield(L, 1, "on_head");
  int head_i = lua_gettop(L);
  lua_getfield(L, 1, "on_done");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  int done_i = lua_gettop(L);
  o.stream = lua_isfunction(L, data_i);
  http_cbs cbs = { lua_isfunction(L, head_i) ? on_head : NULL, on_data, on_done };

  lreq **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, REQ_MT);
  lreq *q = calloc(1, sizeof *q);
  if (q == NULL) return luaL_error(L, "not enough memory");
  q->b = b;
  q->done_ref = q->data_ref = q->head_ref = LUA_NOREF;
  q->owner = ud;                    /* until started, an error below frees it in req_gc */
  *ud = q;
  if (o.stream) {
    lua_pushvalue(L, data_i);
    q->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if (cbs.on_head) {
    lua_pushvalue(L, head_i);
    q->head_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_pushvalue(L, done_i);
  q->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  char err[512];
  lua_State *prev = b->cur;
  b->cur = L;                       /* a failure ends the others: on this thread */
  http_req *r = http_start(b->e, &o, &cbs, q, err, sizeof err);
  b->cur = prev;
  if (r == NULL) {
    lreq_free(L, q);
    return luaL_error(L, "%s", err);
  }
  q->r = r;
  return 1;
}

static int req_cancel(lua_State *L) {
  lreq **ud = luaL_checkudata(L, 1, REQ_MT);
  lreq *q = *ud;
  if (q == NULL || q->r == NULL) return 0;
  lhttp *b = q->b;
  lua_State *prev = b->cur;
  b->cur = L;                       /* on the caller's thread: it may not be in the loop */
  http_cancel(q->r);                /* on_done frees q */
  b->cur = prev;
  return 0;
}

static int req_gc(lua_State *L) {
  lreq **ud = luaL_checkudata(L, 1, REQ_MT);
  lreq *q = *ud;
  if (q == NULL) return 0;
  *ud = NULL;
  if (q->r) {
    q->owner = NULL;                /* the request goes on */
    return 0;
  }
  /* An error stopped http_request before the request started: nothing else has it. */
  lreq_free(L, q);
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
