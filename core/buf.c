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
