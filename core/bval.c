/*
 * bval.c - plain Lua values as C data; the contract is in bval.h. Tables are read
 * raw and whole (array part and hash part alike, as lua_next gives them), so what
 * arrives is what was there, whatever metatables said.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "bval.h"

typedef struct reader {
  size_t bytes;
  char *err;
  size_t errlen;
  char path[128];                   /* where we are, for the message */
} reader;

static int fail(reader *r, const char *what) {
  if (r->path[0]) snprintf(r->err, r->errlen, "%s (at %s)", what, r->path);
  else snprintf(r->err, r->errlen, "%s", what);
  return -1;
}

static int charge(reader *r, size_t n) {
  if (n > BVAL_MAX_BYTES - r->bytes) return fail(r, "more than 64 MB of values (a table shared many times counts each time)");
  r->bytes += n;
  return 0;
}

static int read_value(lua_State *L, int idx, bval *out, int depth, reader *r);

/* Appends ".key" or "[n]" to the path; returns the old length to restore. */
static size_t path_push(lua_State *L, reader *r, int kidx) {
  size_t old = strlen(r->path);
  size_t room = sizeof r->path - old;
  if (lua_type(L, kidx) == LUA_TSTRING)
    snprintf(r->path + old, room, ".%s", lua_tostring(L, kidx));
  else if (lua_isinteger(L, kidx))
    snprintf(r->path + old, room, "[%lld]", (long long)lua_tointeger(L, kidx));
  else
    snprintf(r->path + old, room, "[%s]", luaL_typename(L, kidx));
  return old;
}

static int read_table(lua_State *L, int idx, bval *out, int depth, reader *r) {
  if (depth >= BVAL_DEPTH) return fail(r, "tables nested more than 100 deep (or one holds itself)");
  if (!lua_checkstack(L, 3)) return fail(r, "the Lua stack is full");
  size_t n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    n++;
  }
  out->type = BV_TABLE;
  out->u.t.n = 0;
  out->u.t.kv = NULL;
  if (n == 0) return 0;
  if (charge(r, n * sizeof(bkv)) != 0) return -1;
  out->u.t.kv = calloc(n, sizeof(bkv));
  if (out->u.t.kv == NULL) return fail(r, "not enough memory");
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (out->u.t.n == n) {          /* cannot happen: nothing runs between the walks */
      lua_pop(L, 2);
      break;
    }
    bkv *kv = &out->u.t.kv[out->u.t.n];
    size_t old = path_push(L, r, lua_gettop(L) - 1);
    int rc = read_value(L, lua_gettop(L) - 1, &kv->k, depth + 1, r);
    if (rc == 0) {
      rc = read_value(L, lua_gettop(L), &kv->v, depth + 1, r);
      if (rc != 0) bval_free(&kv->k);
    }
    r->path[old] = '\0';
    lua_pop(L, 1);
    if (rc != 0) {
      lua_pop(L, 1);
      bval_free(out);
      out->type = BV_NIL;
      return -1;
    }
    out->u.t.n++;
  }
  return 0;
}

static int read_value(lua_State *L, int idx, bval *out, int depth, reader *r) {
  out->type = BV_NIL;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return 0;
  case LUA_TBOOLEAN:
    out->type = BV_BOOL;
    out->u.b = lua_toboolean(L, idx);
    return 0;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      out->type = BV_INT;
      out->u.i = lua_tointeger(L, idx);
    } else {
      out->type = BV_NUM;
      out->u.n = lua_tonumber(L, idx);
    }
    return 0;
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (charge(r, len + 1 + sizeof(bval)) != 0) return -1;
    char *p = malloc(len + 1);
    if (p == NULL) return fail(r, "not enough memory");
    memcpy(p, s, len);
    p[len] = '\0';
    out->type = BV_STR;
    out->u.s.p = p;
    out->u.s.len = len;
    return 0;
  }
  case LUA_TTABLE:
    return read_table(L, lua_absindex(L, idx), out, depth, r);
  default: {
    char what[64];
    snprintf(what, sizeof what, "a %s cannot cross to the other side", luaL_typename(L, idx));
    return fail(r, what);
  }
  }
}

int bval_read(lua_State *L, int idx, bval *out, char *err, size_t errlen) {
  reader r = { 0, err, errlen, "" };
  return read_value(L, lua_absindex(L, idx), out, 0, &r);
}

int bval_read_list(lua_State *L, int idx, int n, bval **out, char *err, size_t errlen) {
  *out = NULL;
  if (n <= 0) return 0;
  bval *list = calloc((size_t)n, sizeof *list);
  if (list == NULL) {
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  reader r = { 0, err, errlen, "" };
  idx = lua_absindex(L, idx);
  for (int i = 0; i < n; i++) {
    snprintf(r.path, sizeof r.path, "value %d", i + 1);
    if (read_value(L, idx + i, &list[i], 0, &r) != 0) {
      bval_list_free(list, i);
      return -1;
    }
  }
  *out = list;
  return 0;
}

void bval_push(lua_State *L, const bval *v) {
  luaL_checkstack(L, 3, "values nested too deep");
  switch (v->type) {
  case BV_BOOL: lua_pushboolean(L, v->u.b); break;
  case BV_INT: lua_pushinteger(L, v->u.i); break;
  case BV_NUM: lua_pushnumber(L, v->u.n); break;
  case BV_STR: lua_pushlstring(L, v->u.s.p, v->u.s.len); break;
  case BV_TABLE:
    lua_createtable(L, 0, (int)(v->u.t.n > 1000000 ? 1000000 : v->u.t.n));
    for (size_t i = 0; i < v->u.t.n; i++) {
      if (v->u.t.kv[i].k.type == BV_NIL) continue;
      bval_push(L, &v->u.t.kv[i].k);
      bval_push(L, &v->u.t.kv[i].v);
      lua_rawset(L, -3);
    }
    break;
  default: lua_pushnil(L); break;
  }
}

void bval_free(bval *v) {
  if (v->type == BV_STR) {
    free(v->u.s.p);
  } else if (v->type == BV_TABLE) {
    for (size_t i = 0; i < v->u.t.n; i++) {
      bval_free(&v->u.t.kv[i].k);
      bval_free(&v->u.t.kv[i].v);
    }
    free(v->u.t.kv);
  }
  v->type = BV_NIL;
}

void bval_list_free(bval *list, int n) {
  if (list == NULL) return;
  for (int i = 0; i < n; i++) bval_free(&list[i]);
  free(list);
}

const bval *bval_get(const bval *t, const char *key) {
  if (t == NULL || t->type != BV_TABLE) return NULL;
  size_t klen = strlen(key);
  for (size_t i = 0; i < t->u.t.n; i++) {
    const bval *k = &t->u.t.kv[i].k;
    if (k->type == BV_STR && k->u.s.len == klen && memcmp(k->u.s.p, key, klen) == 0)
      return &t->u.t.kv[i].v;
  }
  return NULL;
}

const char *bval_str(const bval *v, size_t *len) {
  if (v == NULL || v->type != BV_STR) return NULL;
  if (len) *len = v->u.s.len;
  return v->u.s.p;
}

int bval_truthy(const bval *v) {
  return v && !(v->type == BV_NIL || (v->type == BV_BOOL && !v->u.b));
}

char *bval_text(const bval *v) {
  char tmp[64];
  if (v == NULL) return NULL;
  if (v->type == BV_STR) return strdup(v->u.s.p);
  if (v->type == BV_INT) {
    snprintf(tmp, sizeof tmp, "%lld", (long long)v->u.i);
  } else if (v->type == BV_NUM) {
    snprintf(tmp, sizeof tmp, "%.14g", (double)v->u.n);
    if (tmp[strspn(tmp, "-0123456789")] == '\0') strcat(tmp, ".0");   /* a float: 1.0 */
  } else {
    return NULL;
  }
  return strdup(tmp);
}

int bval_copy(bval *dst, const bval *src) {
  dst->type = BV_NIL;
  if (src->type == BV_STR) return bval_set_str(dst, src->u.s.p, src->u.s.len);
  if (src->type != BV_TABLE) {
    *dst = *src;
    return 0;
  }
  size_t n = src->u.t.n;
  bkv *kv = n ? calloc(n, sizeof *kv) : NULL;  /* zeroed: BV_NIL pairs */
  if (n && kv == NULL) return -1;
  dst->type = BV_TABLE;
  dst->u.t.kv = kv;
  dst->u.t.n = 0;
  for (size_t i = 0; i < n; i++) {
    dst->u.t.n = i + 1;               /* what bval_free must see of a half copy */
    if (bval_copy(&kv[i].k, &src->u.t.kv[i].k) != 0 || bval_copy(&kv[i].v, &src->u.t.kv[i].v) != 0) {
      bval_free(dst);
      return -1;
    }
  }
  return 0;
}

int bval_set_str(bval *v, const char *p, size_t len) {
  char *c = malloc(len + 1);
  v->type = BV_NIL;
  if (c == NULL) return -1;
  memcpy(c, p, len);
  c[len] = '\0';
  v->type = BV_STR;
  v->u.s.p = c;
  v->u.s.len = len;
  return 0;
}

void bval_set_int(bval *v, lua_Integer i) {
  v->type = BV_INT;
  v->u.i = i;
}

void bval_set_bool(bval *v, int b) {
  v->type = BV_BOOL;
  v->u.b = b;
}
