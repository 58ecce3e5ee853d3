/*
 * link_lua.c - the link (link.h) for Lua: core.listen, core.connect and connection
 * objects (the specs' puppet runner and parent use them; the parent's own hub
 * is C, core/hub.c).
 *
 * Contract:
 * - core.listen{host, port, on_connect} accepts connections; core.connect{host,
 *   port, on_connect} makes one. conn:start(on_message, on_close [, max_message])
 *   delivers whole messages to on_message(type, id, payload) and the end, once, to
 *   on_close(reason).
 * - conn:send(type, id, payload [, prefix]) queues a message (prefix first) and
 *   returns true, or nil, "closed". conn:close(reason), conn:finish(reason) (close
 *   once the queue is written), conn:limits(max_message, max_partials),
 *   conn:queued(), conn:peer() -> ip, port. finish closes when the peer has closed
 *   too, after the FIN; a peer that never does holds it until conn:close.
 * - A connection object that is collected does not close its connection: its
 *   callbacks, held in the registry, keep it until it ends.
 * Callbacks run on the thread running the state's loop, through flame_pcall_report.
 */
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "link.h"
#include "loop.h"

#define CONN_MT "flame.conn"
#define LISTENER_MT "flame.listener"

/* What the link's ud points at: outlives the Lua object, ends with the link. */
typedef struct lconn {
  link_conn *c;                     /* NULL once the link has ended */
  flame_loop *lp;
  int msg_ref, close_ref;           /* Lua callbacks */
  int cb_ref, self_ref;             /* connect: its callback, the object until then */
  int connecting;
  struct lconn **owner;             /* the Lua object pointing here, or NULL */
} lconn;

typedef struct llistener {
  link_listener *l;
  flame_loop *lp;
  int accept_ref;
  struct llistener **owner;
} llistener;

static void unref(lua_State *L, int *ref) {
  if (L) luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
}

static void on_message(link_conn *c, void *ud, int type, uint64_t id, buf *msg) {
  (void)c;
  lconn *lc = ud;
  lua_State *L = lc->lp->L;
  if (L == NULL || lc->msg_ref == LUA_NOREF || !lua_checkstack(L, 5)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, lc->msg_ref);
  lua_pushinteger(L, type);
  lua_pushinteger(L, (lua_Integer)id);
  lua_pushlstring(L, msg->data ? (const char *)msg->data : "", msg->len);
  buf_free(msg);                    /* the Lua string is the copy: not both at once */
  flame_pcall_report(L, 3, "a link's message callback");
}

static void on_close(link_conn *c, void *ud, const char *reason) {
  (void)c;
  lconn *lc = ud;
  lua_State *L = lc->lp->L;
  lc->c = NULL;
  if (lc->close_ref != LUA_NOREF && L && lua_checkstack(L, 3)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lc->close_ref);
    lua_pushstring(L, reason);
    flame_pcall_report(L, 1, "a link's close callback");
  }
  unref(L, &lc->msg_ref);
  unref(L, &lc->close_ref);
  unref(L, &lc->cb_ref);
  unref(L, &lc->self_ref);
  if (lc->owner) *lc->owner = NULL;
  free(lc);
}

static const link_handlers lua_handlers = { on_message, on_close };

static lconn **conn_ud(lua_State *L) {
  return luaL_checkudata(L, 1, CONN_MT);
}

static link_conn *conn_check(lua_State *L) {
  lconn *lc = *conn_ud(L);
  if (lc == NULL || lc->c == NULL || link_closed(lc->c)) luaL_error(L, "link is closed");
  return lc->c;
}

/* [-0, +1, m] A Lua object for a new link (handlers set, not reading yet). */
static lconn *conn_push(lua_State *L, flame_loop *lp, link_conn *c) {
  lconn **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, CONN_MT);
  lconn *lc = calloc(1, sizeof *lc);
  if (lc == NULL) {
    link_close(c, "not enough memory");
    luaL_error(L, "not enough memory");
  }
  lc->c = c;
  lc->lp = lp;
  lc->msg_ref = lc->close_ref = lc->cb_ref = lc->self_ref = LUA_NOREF;
  lc->owner = ud;
  *ud = lc;
  link_set_handlers(c, &lua_handlers, lc);
  return lc;
}

/* conn:start(on_message, on_close [, max_message]) */
static int conn_start(lua_State *L) {
  link_conn *c = conn_check(L);
  lconn *lc = *conn_ud(L);
  if (lc->connecting) return luaL_error(L, "link is still connecting: start it in on_connect");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  lua_Integer max = luaL_optinteger(L, 4, 0);
  luaL_argcheck(L, max >= 0, 4, "bytes >= 0 expected (0: the current limit)");
  lua_pushvalue(L, 2);
  unref(L, &lc->msg_ref);
  lc->msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 3);
  unref(L, &lc->close_ref);
  lc->close_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  link_start(c, &lua_handlers, lc, (size_t)max);
  return 0;
}

/* conn:send(type, id, payload [, prefix]) -> true, or nil, "closed"
 * prefix goes before payload, saving a copy of a big payload in Lua. */
static int conn_send(lua_State *L) {
  lconn *lc = *conn_ud(L);
  lua_Integer type = luaL_checkinteger(L, 2);
  lua_Integer id = luaL_checkinteger(L, 3);
  size_t plen, len;
  const char *payload = luaL_optlstring(L, 4, "", &plen);
  const char *prefix = luaL_optlstring(L, 5, "", &len);
  luaL_argcheck(L, type >= 0 && type <= 255, 2, "a type in [0, 255] expected");
  int rc = lc && lc->c ? link_send(lc->c, (int)type, (uint64_t)id, prefix, len, payload, plen)
                       : -1;
  if (rc == -2) return luaL_error(L, "not enough memory");
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:limits(max_message, max_partials): what a peer may make this side hold; a
 * parent keeps them small until the peer has authenticated. */
static int conn_limits(lua_State *L) {
  link_conn *c = conn_check(L);
  lua_Integer max = luaL_checkinteger(L, 2), parts = luaL_checkinteger(L, 3);
  luaL_argcheck(L, max > 0, 2, "bytes > 0 expected");
  luaL_argcheck(L, parts >= 1 && parts <= LINK_PARTIALS_MAX, 3, "1 to 64 expected");
  link_limits(c, (size_t)max, (int)parts);
  return 0;
}

static int conn_lclose(lua_State *L) {
  lconn *lc = *conn_ud(L);
  if (lc && lc->c) link_close(lc->c, luaL_optstring(L, 2, "closed"));
  return 0;
}

/* conn:finish(reason): close after what is queued has been written (a last word) */
static int conn_finish(lua_State *L) {
  lconn *lc = *conn_ud(L);
  if (lc && lc->c) link_finish(lc->c, luaL_optstring(L, 2, "closed"));
  return 0;
}

static int conn_queued(lua_State *L) {
  lconn *lc = *conn_ud(L);
  lua_pushinteger(L, lc && lc->c ? (lua_Integer)link_queued(lc->c) : 0);
  return 1;
}

static int conn_peer(lua_State *L) {
  link_conn *c = conn_check(L);
  char ip[64];
  int port;
  link_peer(c, ip, sizeof ip, &port);
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

static int conn_gc(lua_State *L) {
  lconn **ud = conn_ud(L);
  if (*ud) (*ud)->owner = NULL;     /* the connection lives on until closed */
  return 0;
}

/* ------------------------------------------------------------- addresses ---- */

static void parse_addr(lua_State *L, int t, struct sockaddr_storage *sa) {
  lua_getfield(L, t, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, t, "port");
  lua_Integer port = luaL_optinteger(L, -1, 0);
  if (port < 0 || port > 65535) luaL_error(L, "bad port %I", (LUAI_UACINT)port);
  if (link_addr(host, (int)port, sa) != 0)
    luaL_error(L, "bad address '%s' (an IPv4 or IPv6 address expected)", host);
  lua_pop(L, 2);
}

/* ------------------------------------------------------------- listeners ---- */

static void listener_closed(void *ud) {
  llistener *ll = ud;
  unref(ll->lp->L, &ll->accept_ref);
  if (ll->owner) *ll->owner = NULL;
  free(ll);
}

static void on_accept(link_listener *l, void *ud, link_conn *c) {
  (void)l;
  llistener *ll = ud;
  lua_State *L = ll->lp->L;
  if (L == NULL || !lua_checkstack(L, 4)) {
    link_close(c, "the loop is gone");
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, ll->accept_ref);
  conn_push(L, ll->lp, c);
  flame_pcall_report(L, 1, "a listener's accept callback");
}

/* listen{ host = "127.0.0.1", port = 0, on_connect = fn(conn) } -> listener */
static int l_listen(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  struct sockaddr_storage sa;
  parse_addr(L, 1, &sa);
  lua_getfield(L, 1, "on_connect");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  llistener **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, LISTENER_MT);
  llistener *ll = calloc(1, sizeof *ll);
  if (ll == NULL) return luaL_error(L, "not enough memory");
  ll->lp = lp;
  ll->accept_ref = LUA_NOREF;
  int err = 0;
  ll->l = link_listen(&lp->uv, (struct sockaddr *)&sa, on_accept, ll, &err);
  if (ll->l == NULL) {
    free(ll);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot listen: %s", uv_strerror(err));
    return 2;
  }
  lua_pushvalue(L, -2);
  ll->accept_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  ll->owner = ud;
  *ud = ll;
  return 1;
}

static int listener_address(lua_State *L) {
  llistener *ll = *(llistener **)luaL_checkudata(L, 1, LISTENER_MT);
  if (ll == NULL || ll->l == NULL) return luaL_error(L, "listener is closed");
  char ip[64];
  int port;
  int rc = link_listener_address(ll->l, ip, sizeof ip, &port);
  if (rc != 0) return luaL_error(L, "getsockname: %s", uv_strerror(rc));
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

static void listener_stop(llistener **ud) {
  llistener *ll = *ud;
  if (ll && ll->l) {
    link_listener_close(ll->l, listener_closed);
    ll->l = NULL;
  }
}

static int listener_close(lua_State *L) {
  listener_stop(luaL_checkudata(L, 1, LISTENER_MT));
  return 0;
}

static int listener_gc(lua_State *L) {
  llistener **ud = luaL_checkudata(L, 1, LISTENER_MT);
  if (*ud) {
    (*ud)->owner = NULL;            /* a dropped listener stops listening */
    listener_stop(ud);
  }
  return 0;
}

/* --------------------------------------------------------------- connect ---- */

static void on_connected(link_conn *c, void *ud, int status) {
  lconn *lc = ud;
  lua_State *L = lc->lp->L;
  lc->connecting = 0;
  if (L == NULL || !lua_checkstack(L, 4)) {
    if (status == 0) link_close(c, "connect: the loop is gone");
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, lc->cb_ref);
  unref(L, &lc->cb_ref);
  if (status != 0) {                /* the link closes by itself: on_close frees lc */
    lua_pushnil(L);
    lua_pushfstring(L, "%s (%s)", uv_strerror(status), uv_err_name(status));
  } else {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lc->self_ref);   /* the object made at connect */
    lua_pushnil(L);
  }
  unref(L, &lc->self_ref);
  flame_pcall_report(L, 2, "a connect callback");
}

/* connect{ host, port, on_connect = fn(conn | nil, err) } -> conn (pending), or
 * nil, message */
static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  struct sockaddr_storage sa;
  parse_addr(L, 1, &sa);
  lua_getfield(L, 1, "on_connect");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  int err = 0;
  link_conn *c = link_connect(&lp->uv, (struct sockaddr *)&sa, NULL, NULL, &err);
  if (c == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s (%s)", uv_strerror(err), uv_err_name(err));
    return 2;
  }
  lconn *lc = conn_push(L, lp, c);
  lc->connecting = 1;
  /* link_connect was given no callback: the link's connect callback is set now,
   * before the loop runs again, so nothing can have been missed */
  link_on_connect(c, on_connected, lc);
  lua_pushvalue(L, -2);
  lc->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);               /* keep the object alive until on_connect */
  lc->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

void flame_link_open(lua_State *L) {
  static const luaL_Reg conn_methods[] = {
    { "start", conn_start }, { "send", conn_send }, { "close", conn_lclose },
    { "finish", conn_finish }, { "limits", conn_limits },
    { "queued", conn_queued }, { "peer", conn_peer }, { NULL, NULL }
  };
  static const luaL_Reg listener_methods[] = {
    { "address", listener_address }, { "close", listener_close }, { NULL, NULL }
  };
  static const luaL_Reg fns[] = {
    { "listen", l_listen }, { "connect", l_connect }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, CONN_MT)) {
    luaL_newlib(L, conn_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, conn_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, LISTENER_MT)) {
    luaL_newlib(L, listener_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, listener_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, fns, 0);
  lua_pushinteger(L, LINK_CHUNK);
  lua_setfield(L, -2, "LINK_CHUNK");
}
