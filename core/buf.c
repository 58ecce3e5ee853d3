/*
 * buf.c - growable byte buffer (see buf.h). Capacity doubles, so appends are
 * amortised O(1); a failed growth leaves data and len untouched.
 */
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>

#include "buf.h"

void buf_init(buf *b) {
  b->data = NULL;
  b->len = b->cap = 0;
}

void buf_free(buf *b) {
  free(b->data);
  buf_init(b);
}

int buf_reserve(buf *b, size_t extra) {
  if (extra > SIZE_MAX - b->len) return -1;
  size_t need = b->len + extra;
  if (need <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
  unsigned char *p = realloc(b->data, cap);
  if (p == NULL) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

int buf_append(buf *b, const void *p, size_t n) {
  if (n == 0) return 0;
  if (buf_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

int buf_byte(buf *b, unsigned char c) {
  if (b->len == b->cap && buf_reserve(b, 1) != 0) return -1;
  b->data[b->len++] = c;
  return 0;
}

static int box_gc(lua_State *L) {
  buf_free(lua_touserdata(L, 1));
  return 0;
}

buf *buf_box(lua_State *L) {
  buf *b = lua_newuserdatauv(L, sizeof *b, 0);
  buf_init(b);
  if (luaL_newmetatable(L, "flame.buf")) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return b;
}

static int bytes_gc(lua_State *L) {
  buf_bytes *x = lua_touserdata(L, 1);
  buf_free(&x->b);
  return 0;
}

static int bytes_len(lua_State *L) {
  buf_bytes *x = lua_touserdata(L, 1);
  if (x->spent) return luaL_error(L, "these bytes were sent already");
  lua_pushinteger(L, (lua_Integer)(x->b.len - x->head));
  return 1;
}

buf_bytes *buf_bytes_new(lua_State *L, size_t head) {
  buf_bytes *x = lua_newuserdatauv(L, sizeof *x, 0);
  buf_init(&x->b);
  x->head = 0;
  x->spent = 0;
  if (luaL_newmetatable(L, "flame.bytes")) {
    lua_pushcfunction(L, bytes_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, bytes_len);
    lua_setfield(L, -2, "__len");
  }
  lua_setmetatable(L, -2);
  if (head > 0) {                          /* the room, zeroed until its header */
    if (buf_reserve(&x->b, head) != 0) luaL_error(L, "not enough memory");
    memset(x->b.data, 0, head);
    x->b.len = x->head = head;
  }
  return x;
}

int buf_take_arg(lua_State *L, int idx, size_t head, buf *out, const char **err) {
  buf_init(out);
  const unsigned char *p;
  size_t len;
  buf_bytes *x = luaL_testudata(L, idx, "flame.bytes");
  if (x) {
    if (x->spent) {
      *err = "these bytes were sent already";
      return -1;
    }
    if (x->head == head) {                 /* the header goes where the room is */
      *out = x->b;
      buf_init(&x->b);
      x->spent = 1;
      return 0;
    }
    p = x->b.data + x->head;
    len = x->b.len - x->head;
  } else if (lua_type(L, idx) == LUA_TSTRING) {
    p = (const unsigned char *)lua_tolstring(L, idx, &len);
  } else {
    *err = "a string or encoded bytes expected";
    return -1;
  }
  if (buf_reserve(out, head + len) != 0) {
    *err = "not enough memory";
    return -1;
  }
  if (head) memset(out->data, 0, head);      /* empty: data may still be NULL */
  if (len) memcpy(out->data + head, p, len);
  out->len = head + len;
  if (x) {                                 /* taken whole, copied or not */
    buf_free(&x->b);
    x->spent = 1;
  }
  return 0;
}
