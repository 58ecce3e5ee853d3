/*
 * link.c - framed messages over TCP between a parent and its runners.
 *
 * Contract:
 * - core.listen{host, port, on_connect} accepts connections; core.connect{host,
 *   port, on_connect} makes one. A connection delivers whole messages to
 *   on_message(type, id, payload) and its end, once, to on_close(reason).
 * - conn:send(type, id, payload) queues a message. Messages longer than one chunk
 *   (256 KiB) go out chunk by chunk, and a short message is sent before the next
 *   chunk of a long one: a 64 MB result never holds up a heartbeat or a small call.
 * - Wire: a frame is a 14-byte header (u32 chunk length, u8 type, u8 flags with
 *   bit 0 = last chunk, u64 id; little endian) and the chunk. A chunk over 256 KiB, a
 *   message over max_message, or more than 64 messages in reassembly at once is a
 *   protocol error: that connection closes (reason "protocol: ..."), nothing else.
 * - Errors of libuv calls close the connection with the libuv error name.
 * Handles: every uv handle here has a flame_handle first in its data, so the loop
 * can close what is left at exit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "flame.h"
#include "buf.h"
#include "loop.h"

#define CONN_MT "flame.conn"
#define LISTENER_MT "flame.listener"
#define LINK_HEADER 14
#define LINK_CHUNK (256 * 1024)
#define LINK_PARTIALS_MAX 64
#define LINK_WRITES_MAX 2           /* chunks in flight: small messages jump ahead */

typedef struct outmsg {
  struct outmsg *next;
  unsigned char type;
  uint64_t id;
  unsigned char *data;
  size_t len, off;                  /* off: bytes queued to the socket so far */
  int pending;                      /* chunk writes not yet completed */
} outmsg;

typedef struct wreq {
  uv_write_t req;
  unsigned char header[LINK_HEADER];
  outmsg *msg;
} wreq;

typedef struct partial {
  struct partial *next;
  unsigned char type;
  uint64_t id;
  buf data;
} partial;

typedef struct conn {
  flame_handle base;
  uv_tcp_t tcp;
  flame_loop *lp;
  int msg_ref, close_ref;           /* Lua callbacks */
  struct conn **owner;              /* the Lua handle pointing here, or NULL */
  outmsg *small, *small_tail, *big, *big_tail;
  int writes;                       /* write requests in flight */
  size_t queued;                    /* bytes queued and not yet written */
  unsigned char head[LINK_HEADER];
  size_t head_have;
  size_t chunk_len, chunk_have;
  unsigned char type, flags;
  uint64_t id;
  partial *cur;                     /* the message the current chunk belongs to */
  partial *partials;
  int npartials, max_partials;
  size_t max_message;
  int connecting;                   /* core.connect not yet answered */
  int closing, finishing;           /* finishing: close once the queue is written */
  char reason[96];
} conn;

typedef struct listener {
  flame_handle base;
  uv_tcp_t tcp;
  flame_loop *lp;
  int accept_ref;
  struct listener **owner;
} listener;

static void put_u32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* ------------------------------------------------------------ connections ---- */

static void msgs_free(outmsg *m) {
  while (m) {
    outmsg *next = m->next;
    free(m->data);
    free(m);
    m = next;
  }
}

static void conn_free(uv_handle_t *h) {
  conn *c = h->data;
  lua_State *L = c->lp->L;
  if (c->close_ref != LUA_NOREF && L && lua_checkstack(L, 3)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->close_ref);
    lua_pushstring(L, c->reason[0] ? c->reason : "closed");
    flame_pcall_report(L, 1, "a link's close callback");
  }
  if (L) {
    luaL_unref(L, LUA_REGISTRYINDEX, c->msg_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->close_ref);
  }
  if (c->owner) *c->owner = NULL;
  msgs_free(c->small);
  msgs_free(c->big);
  for (partial *p = c->partials; p;) {
    partial *next = p->next;
    buf_free(&p->data);
    free(p);
    p = next;
  }
  free(c);
}

/* Closes the connection once; the reason reaches on_close when libuv is done. */
static void conn_close(conn *c, const char *reason) {
  if (c->closing) return;
  c->closing = 1;
  if (reason && !c->reason[0]) snprintf(c->reason, sizeof c->reason, "%s", reason);
  uv_read_stop((uv_stream_t *)&c->tcp);
  uv_close((uv_handle_t *)&c->tcp, conn_free);
}

static void conn_fail(conn *c, const char *what, int err) {
  char r[96];
  snprintf(r, sizeof r, "%s: %s", what, uv_err_name(err));
  conn_close(c, r);
}

static void pump(conn *c);

static void on_write(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  conn *c = req->handle->data;
  outmsg *m = w->msg;
  free(w);
  c->writes--;
  if (--m->pending == 0 && m->off == m->len) {
    free(m->data);
    free(m);
  }
  if (status < 0) {
    if (status != UV_ECANCELED) conn_fail(c, "write", status);
    return;
  }
  pump(c);
}

/* Starts chunk writes while fewer than LINK_WRITES_MAX are in flight: whole short
 * messages first, then the next chunk of the oldest long one. */
static void pump(conn *c) {
  while (!c->closing && c->writes < LINK_WRITES_MAX) {
    outmsg *m;
    int from_small = c->small != NULL;
    if (from_small) m = c->small;
    else if (c->big) m = c->big;
    else {
      if (c->finishing && c->writes == 0) conn_close(c, NULL);
      return;
    }
    size_t n = m->len - m->off;
    if (n > LINK_CHUNK) n = LINK_CHUNK;
    int last = m->off + n == m->len;
    wreq *w = malloc(sizeof *w);
    if (w == NULL) {
      conn_close(c, "not enough memory");
      return;
    }
    put_u32(w->header, (uint32_t)n);
    w->header[4] = m->type;
    w->header[5] = last ? 1 : 0;
    put_u64(w->header + 6, m->id);
    w->msg = m;
    uv_buf_t bufs[2] = { uv_buf_init((char *)w->header, LINK_HEADER),
                         uv_buf_init((char *)m->data + m->off, (unsigned)n) };
    m->off += n;
    m->pending++;
    c->queued -= n;
    if (last) {                     /* the message leaves its queue; freed on write */
      if (from_small) {
        c->small = m->next;
        if (!c->small) c->small_tail = NULL;
      } else {
        c->big = m->next;
        if (!c->big) c->big_tail = NULL;
      }
    }
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs, 2, on_write);
    if (rc != 0) {
      m->pending--;
      free(w);
      if (last && m->pending == 0) {
        free(m->data);
        free(m);
      }
      conn_fail(c, "write", rc);
      return;
    }
    c->writes++;
  }
}

static partial *partial_find(conn *c, unsigned char type, uint64_t id) {
  for (partial *p = c->partials; p; p = p->next)
    if (p->type == type && p->id == id) return p;
  return NULL;
}

static void partial_drop(conn *c, partial *p) {
  for (partial **q = &c->partials; *q; q = &(*q)->next) {
    if (*q == p) {
      *q = p->next;
      break;
    }
  }
  c->npartials--;
  buf_free(&p->data);
  free(p);
}

/* A whole message: to Lua. Returns 0 when the connection may go on. */
static int deliver(conn *c, partial *p) {
  lua_State *L = c->lp->L;
  if (L && c->msg_ref != LUA_NOREF && lua_checkstack(L, 5)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->msg_ref);
    lua_pushinteger(L, p->type);
    lua_pushinteger(L, (lua_Integer)p->id);
    lua_pushlstring(L, p->data.data ? (const char *)p->data.data : "", p->data.len);
    partial_drop(c, p);
    flame_pcall_report(L, 3, "a link's message callback");
  } else {
    partial_drop(c, p);
  }
  return c->closing || c->finishing ? -1 : 0;
}

/* Parses bytes as they arrive; any violation closes this connection only. */
static void parse(conn *c, const unsigned char *p, size_t n) {
  while (n > 0 && !c->closing && !c->finishing) {
    if (c->head_have < LINK_HEADER) {
      size_t take = LINK_HEADER - c->head_have;
      if (take > n) take = n;
      memcpy(c->head + c->head_have, p, take);
      c->head_have += take;
      p += take;
      n -= take;
      if (c->head_have < LINK_HEADER) return;
      c->chunk_len = (size_t)c->head[0] | (size_t)c->head[1] << 8 | (size_t)c->head[2] << 16
                     | (size_t)c->head[3] << 24;
      c->type = c->head[4];
      c->flags = c->head[5];
      c->id = get_u64(c->head + 6);
      c->chunk_have = 0;
      if (c->chunk_len > LINK_CHUNK) {
        conn_close(c, "protocol: frame too large");
        return;
      }
      if (c->flags & ~1u) {
        conn_close(c, "protocol: bad frame flags");
        return;
      }
      c->cur = partial_find(c, c->type, c->id);
      if (c->cur == NULL) {
        if (c->npartials >= c->max_partials) {
          conn_close(c, "protocol: too many messages at once");
          return;
        }
        c->cur = calloc(1, sizeof *c->cur);
        if (c->cur == NULL) {
          conn_close(c, "not enough memory");
          return;
        }
        c->cur->type = c->type;
        c->cur->id = c->id;
        c->cur->next = c->partials;
        c->partials = c->cur;
        c->npartials++;
      }
      if (c->cur->data.len + c->chunk_len > c->max_message) {
        conn_close(c, "protocol: message too large");
        return;
      }
      if (buf_reserve(&c->cur->data, c->chunk_len) != 0) {
        conn_close(c, "not enough memory");
        return;
      }
    }
    size_t take = c->chunk_len - c->chunk_have;
    if (take > n) take = n;
    if (take) buf_append(&c->cur->data, p, take);   /* reserved above: cannot fail */
    c->chunk_have += take;
    p += take;
    n -= take;
    if (c->chunk_have == c->chunk_len) {
      c->head_have = 0;
      partial *done = c->cur;
      c->cur = NULL;
      if ((c->flags & 1u) && deliver(c, done) != 0) return;
    }
  }
}

/* Reads land in one buffer per loop; parse copies out of it before returning. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  (void)suggested;
  conn *c = h->data;
  *b = uv_buf_init(c->lp->scratch, sizeof c->lp->scratch);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  conn *c = s->data;
  if (nread == UV_EOF) {
    conn_close(c, "closed by peer");
    return;
  }
  if (nread < 0) {
    conn_fail(c, "read", (int)nread);
    return;
  }
  parse(c, (const unsigned char *)b->base, (size_t)nread);
}

static conn **conn_ud(lua_State *L) {
  return luaL_checkudata(L, 1, CONN_MT);
}

static conn *conn_check(lua_State *L) {
  conn *c = *conn_ud(L);
  if (c == NULL || c->closing) luaL_error(L, "link is closed");
  return c;
}

/* [-0, +1, m] A new connection object for an initialised tcp handle. */
static conn *conn_new(lua_State *L, flame_loop *lp) {
  conn **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, CONN_MT);
  conn *c = calloc(1, sizeof *c);
  if (c == NULL) luaL_error(L, "not enough memory");
  c->base.on_close = conn_free;
  c->lp = lp;
  c->msg_ref = c->close_ref = LUA_NOREF;
  c->max_message = (size_t)1 << 30;
  c->max_partials = LINK_PARTIALS_MAX;
  c->tcp.data = c;
  c->owner = ud;
  *ud = c;
  return c;
}

/* conn:start(on_message, on_close [, max_message]) */
static int conn_start(lua_State *L) {
  conn *c = conn_check(L);
  if (c->connecting) return luaL_error(L, "link is still connecting: start it in on_connect");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)c->max_message);
  luaL_argcheck(L, max > 0, 4, "bytes > 0 expected");
  c->max_message = (size_t)max;
  lua_pushvalue(L, 2);
  luaL_unref(L, LUA_REGISTRYINDEX, c->msg_ref);
  c->msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 3);
  luaL_unref(L, LUA_REGISTRYINDEX, c->close_ref);
  c->close_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc != 0 && rc != UV_EALREADY) conn_fail(c, "read", rc);
  return 0;
}

/* conn:send(type, id, payload [, prefix]) -> true, or nil, "closed"
 * prefix goes before payload, saving a copy of a big payload in Lua. */
static int conn_send(lua_State *L) {
  conn *c = *conn_ud(L);
  lua_Integer type = luaL_checkinteger(L, 2);
  lua_Integer id = luaL_checkinteger(L, 3);
  size_t plen, len;
  const char *payload = luaL_optlstring(L, 4, "", &plen);
  const char *prefix = luaL_optlstring(L, 5, "", &len);
  luaL_argcheck(L, plen <= SIZE_MAX - len, 4, "too long");
  size_t pre = len;
  len += plen;
  luaL_argcheck(L, type >= 0 && type <= 255, 2, "a type in [0, 255] expected");
  if (c == NULL || c->closing || c->finishing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  outmsg *m = calloc(1, sizeof *m);
  unsigned char *data = len ? malloc(len) : NULL;
  if (m == NULL || (len && data == NULL)) {
    free(m);
    free(data);
    return luaL_error(L, "not enough memory");
  }
  if (pre) memcpy(data, prefix, pre);
  if (plen) memcpy(data + pre, payload, plen);
  m->type = (unsigned char)type;
  m->id = (uint64_t)id;
  m->data = data;
  m->len = len;
  outmsg **head = len <= LINK_CHUNK ? &c->small : &c->big;
  outmsg **tail = len <= LINK_CHUNK ? &c->small_tail : &c->big_tail;
  if (*tail) (*tail)->next = m;
  else *head = m;
  *tail = m;
  c->queued += len;                 /* an empty message is one empty last chunk */
  pump(c);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:limits(max_message, max_partials): what a peer may make this side hold; a
 * parent keeps them small until the peer has authenticated. */
static int conn_limits(lua_State *L) {
  conn *c = conn_check(L);
  lua_Integer max = luaL_checkinteger(L, 2), parts = luaL_checkinteger(L, 3);
  luaL_argcheck(L, max > 0, 2, "bytes > 0 expected");
  luaL_argcheck(L, parts >= 1 && parts <= LINK_PARTIALS_MAX, 3, "1 to 64 expected");
  c->max_message = (size_t)max;
  c->max_partials = (int)parts;
  return 0;
}

static int conn_lclose(lua_State *L) {
  conn *c = *conn_ud(L);
  if (c) conn_close(c, luaL_optstring(L, 2, "closed"));
  return 0;
}

/* conn:finish(reason): close after what is queued has been written (a last word) */
static int conn_finish(lua_State *L) {
  conn *c = *conn_ud(L);
  if (c == NULL || c->closing) return 0;
  if (!c->reason[0]) snprintf(c->reason, sizeof c->reason, "%s", luaL_optstring(L, 2, "closed"));
  c->finishing = 1;
  uv_read_stop((uv_stream_t *)&c->tcp);
  pump(c);
  return 0;
}

static int conn_queued(lua_State *L) {
  conn *c = *conn_ud(L);
  lua_pushinteger(L, c ? (lua_Integer)c->queued : 0);
  return 1;
}

/* [-0, +2, m] The ip and port of an address ("?" and 0 for other families). */
static int push_addr(lua_State *L, const struct sockaddr_storage *sa) {
  char ip[64] = "?";
  int port = 0;
  if (sa->ss_family == AF_INET) {
    uv_ip4_name((const struct sockaddr_in *)sa, ip, sizeof ip);
    port = ntohs(((const struct sockaddr_in *)sa)->sin_port);
  } else if (sa->ss_family == AF_INET6) {
    uv_ip6_name((const struct sockaddr_in6 *)sa, ip, sizeof ip);
    port = ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
  }
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

static int conn_peer(lua_State *L) {
  conn *c = conn_check(L);
  struct sockaddr_storage sa;
  int len = sizeof sa;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &len) != 0) sa.ss_family = AF_UNSPEC;
  return push_addr(L, &sa);
}

static int conn_gc(lua_State *L) {
  conn **ud = conn_ud(L);
  if (*ud) (*ud)->owner = NULL;     /* the connection lives on until closed */
  return 0;
}

/* ------------------------------------------------------------- addresses ---- */

static int parse_addr(lua_State *L, int t, struct sockaddr_storage *sa) {
  lua_getfield(L, t, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, t, "port");
  lua_Integer port = luaL_optinteger(L, -1, 0);
  if (port < 0 || port > 65535) return luaL_error(L, "bad port %I", (LUAI_UACINT)port);
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)sa) != 0
      && uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)sa) != 0)
    return luaL_error(L, "bad address '%s' (an IPv4 or IPv6 address expected)", host);
  lua_pop(L, 2);
  return 0;
}

/* ------------------------------------------------------------- listeners ---- */

static void listener_free(uv_handle_t *h) {
  listener *l = h->data;
  if (l->lp->L) luaL_unref(l->lp->L, LUA_REGISTRYINDEX, l->accept_ref);
  if (l->owner) *l->owner = NULL;
  free(l);
}

static void closed_free(uv_handle_t *h) {
  free(h);
}

/* A connection nobody can take now: accepted and closed, so the backlog moves. */
static void refuse_pending(uv_stream_t *s) {
  uv_tcp_t *t = malloc(sizeof *t);
  if (t == NULL) return;
  if (uv_tcp_init(s->loop, t) != 0) {
    free(t);
    return;
  }
  t->data = NULL;
  uv_accept(s, (uv_stream_t *)t);
  uv_close((uv_handle_t *)t, closed_free);
}

static void on_connection(uv_stream_t *s, int status) {
  listener *l = s->data;
  lua_State *L = l->lp->L;
  if (status < 0) return;
  if (L == NULL || !lua_checkstack(L, 4)) {
    refuse_pending(s);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, l->accept_ref);
  conn *c = conn_new(L, l->lp);
  int rc = uv_tcp_init(&l->lp->uv, &c->tcp);
  if (rc != 0) {
    *c->owner = NULL;
    free(c);
    lua_pop(L, 2);
    return;
  }
  if ((rc = uv_accept(s, (uv_stream_t *)&c->tcp)) != 0) {
    conn_fail(c, "accept", rc);
    lua_pop(L, 2);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
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
  listener **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, LISTENER_MT);
  listener *l = calloc(1, sizeof *l);
  if (l == NULL) return luaL_error(L, "not enough memory");
  l->base.on_close = listener_free;
  l->lp = lp;
  l->accept_ref = LUA_NOREF;
  int rc = uv_tcp_init(&lp->uv, &l->tcp);
  if (rc != 0) {
    free(l);
    return luaL_error(L, "listen: %s", uv_strerror(rc));
  }
  l->tcp.data = l;
  lua_pushvalue(L, -2);
  l->accept_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  l->owner = ud;
  *ud = l;
  if ((rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&sa, 0)) != 0
      || (rc = uv_listen((uv_stream_t *)&l->tcp, 128, on_connection)) != 0) {
    uv_close((uv_handle_t *)&l->tcp, listener_free);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot listen: %s", uv_strerror(rc));
    return 2;
  }
  return 1;
}

static int listener_address(lua_State *L) {
  listener *l = *(listener **)luaL_checkudata(L, 1, LISTENER_MT);
  if (l == NULL) return luaL_error(L, "listener is closed");
  struct sockaddr_storage sa;
  int len = sizeof sa;
  int rc = uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&sa, &len);
  if (rc != 0) return luaL_error(L, "getsockname: %s", uv_strerror(rc));
  return push_addr(L, &sa);
}

static int listener_close(lua_State *L) {
  listener **ud = luaL_checkudata(L, 1, LISTENER_MT);
  if (*ud && !uv_is_closing((uv_handle_t *)&(*ud)->tcp))
    uv_close((uv_handle_t *)&(*ud)->tcp, listener_free);
  return 0;
}

static int listener_gc(lua_State *L) {
  listener **ud = luaL_checkudata(L, 1, LISTENER_MT);
  if (*ud) {
    (*ud)->owner = NULL;            /* a dropped listener stops listening */
    if (!uv_is_closing((uv_handle_t *)&(*ud)->tcp))
      uv_close((uv_handle_t *)&(*ud)->tcp, listener_free);
  }
  return 0;
}

/* --------------------------------------------------------------- connect ---- */

typedef struct creq {
  uv_connect_t req;
  conn *c;
  int cb_ref;
} creq;

static void on_connect(uv_connect_t *req, int status) {
  creq *r = (creq *)req;
  conn *c = r->c;
  lua_State *L = c->lp->L;
  int cb = r->cb_ref;
  free(r);
  c->connecting = 0;
  if (status == 0) uv_tcp_nodelay(&c->tcp, 1);
  if (L == NULL || !lua_checkstack(L, 4)) {
    conn_close(c, "connect: the loop is gone");
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, cb);
  luaL_unref(L, LUA_REGISTRYINDEX, cb);
  if (status != 0) {
    conn_fail(c, "connect", status);
    lua_pushnil(L);
    lua_pushfstring(L, "%s (%s)", uv_strerror(status), uv_err_name(status));
  } else {
    /* the Lua object made at connect time is pushed again through the registry */
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->msg_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->msg_ref);
    c->msg_ref = LUA_NOREF;
    lua_pushnil(L);
  }
  flame_pcall_report(L, 2, "a connect callback");
}

/* connect{ host, port, on_connect = fn(conn | nil, err) } */
static int l_connect(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  struct sockaddr_storage sa;
  parse_addr(L, 1, &sa);
  lua_getfield(L, 1, "on_connect");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  creq *r = calloc(1, sizeof *r);
  if (r == NULL) return luaL_error(L, "not enough memory");
  conn *c = conn_new(L, lp);
  int rc = uv_tcp_init(&lp->uv, &c->tcp);
  if (rc != 0) {
    free(r);
    *c->owner = NULL;
    free(c);
    return luaL_error(L, "connect: %s", uv_strerror(rc));
  }
  r->c = c;
  c->connecting = 1;
  lua_pushvalue(L, -2);
  r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);               /* keep the object alive until on_connect */
  c->msg_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  rc = uv_tcp_connect(&r->req, &c->tcp, (struct sockaddr *)&sa, on_connect);
  if (rc != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->msg_ref);
    c->msg_ref = LUA_NOREF;
    free(r);
    conn_fail(c, "connect", rc);
    lua_pushnil(L);
    lua_pushfstring(L, "%s (%s)", uv_strerror(rc), uv_err_name(rc));
    return 2;
  }
  return 1;
}

/* ----------------------------------------------------------------- crypto ---- */

/* hmac_sha256(key, data) -> 32 bytes */
static int l_hmac(lua_State *L) {
  size_t klen, dlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *data = luaL_checklstring(L, 2, &dlen);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int olen = 0;
  if (HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)data, dlen, out, &olen)
      == NULL)
    return luaL_error(L, "hmac_sha256 failed");
  lua_pushlstring(L, (const char *)out, olen);
  return 1;
}

/* equal(a, b): comparison in constant time for equal lengths (proofs) */
static int l_equal(lua_State *L) {
  size_t la, lb;
  const unsigned char *a = (const unsigned char *)luaL_checklstring(L, 1, &la);
  const unsigned char *b = (const unsigned char *)luaL_checklstring(L, 2, &lb);
  unsigned char d = la != lb;
  for (size_t i = 0; i < la && i < lb; i++) d |= a[i] ^ b[i];
  lua_pushboolean(L, d == 0);
  return 1;
}

static int l_b64encode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  luaL_argcheck(L, len < ((size_t)1 << 28), 1, "too long");
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, 4 * ((len + 2) / 3) + 1);
  int n = EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)s, (int)len);
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/* b64decode(s) -> bytes | nil, message */
static int l_b64decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (len % 4 != 0 || len >= ((size_t)1 << 28)) {
    lua_pushnil(L);
    lua_pushliteral(L, "not base64 (length is not a multiple of 4)");
    return 2;
  }
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, len / 4 * 3 + 1);
  int n = EVP_DecodeBlock((unsigned char *)out, (const unsigned char *)s, (int)len);
  if (n < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "not base64");
    return 2;
  }
  /* DecodeBlock counts padding as zero bytes: take them off */
  if (len >= 1 && s[len - 1] == '=') n--;
  if (len >= 2 && s[len - 2] == '=') n--;
  luaL_pushresultsize(&b, (size_t)n);
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
    { "listen", l_listen }, { "connect", l_connect }, { "hmac_sha256", l_hmac },
    { "equal", l_equal }, { "b64encode", l_b64encode }, { "b64decode", l_b64decode },
    { NULL, NULL }
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
