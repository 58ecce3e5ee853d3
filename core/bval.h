/*
 * bval.h - plain Lua values as C data (bval.c), for what crosses between a backend
 * state and its host on another thread: a request's arguments, its reply, a
 * callback's results. Nothing of a Lua state is kept, so the data may be read and
 * freed on any thread.
 *
 * Contract:
 * - A bval is nil, a boolean, an integer, a float, a string (bytes, any length) or
 *   a table (key/value pairs; keys are not nil). Functions, userdata and threads do
 *   not cross: bval_read refuses them, naming where they were ("argument 2.env.x").
 * - bval_read(L, idx, out, err, n) copies the value at idx (raw reads: no
 *   metamethod runs; nothing is pushed, nothing raises): 0, or -1 with err set (a
 *   value that cannot cross, more than BVAL_DEPTH levels of tables, which is also
 *   how a table that holds itself is refused, more than BVAL_MAX_BYTES in all (a
 *   table met twice is copied twice, and counted twice), or
 *   not enough memory). On -1, *out holds nothing to free.
 * - bval_push(L, v) [-0, +1, m] pushes a copy: call it where a memory error may be
 *   raised (a protected call).
 * - bval_free(v) frees what v holds (v itself is the caller's); bval_list_free
 *   frees n values and the array.
 * - Accessors for C readers: bval_get(t, key) (a string key; NULL when absent or t
 *   is not a table), bval_str(v) (the bytes, or NULL when v is not a string).
 */
#ifndef FLAME_BVAL_H
#define FLAME_BVAL_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#define BVAL_DEPTH 100
#define BVAL_MAX_BYTES ((size_t)64 * 1024 * 1024)   /* a backend state's memory */

enum { BV_NIL, BV_BOOL, BV_INT, BV_NUM, BV_STR, BV_TABLE };

typedef struct bkv bkv;

typedef struct bval {
  int type;
  union {
    int b;
    lua_Integer i;
    lua_Number n;
    struct { char *p; size_t len; } s;
    struct { bkv *kv; size_t n; } t;
  } u;
} bval;

struct bkv {
  bval k, v;
};

int bval_read(lua_State *L, int idx, bval *out, char *err, size_t errlen);
/* The values idx .. idx+n-1 as an array (NULL when n is 0): 0, or -1 with err. */
int bval_read_list(lua_State *L, int idx, int n, bval **out, char *err, size_t errlen);
void bval_push(lua_State *L, const bval *v);
void bval_free(bval *v);
void bval_list_free(bval *list, int n);

const bval *bval_get(const bval *t, const char *key);
const char *bval_str(const bval *v, size_t *len);
/* Lua's truth: anything but nil and false (and an absent value, NULL). */
int bval_truthy(const bval *v);
/* A string, or a number as Lua's tostring writes it, as malloc'd text; NULL when v
 * is neither (or out of memory): what luaL_checkstring takes. */
char *bval_text(const bval *v);
/* A deep copy of src into dst: 0, or -1 out of memory (dst then holds nothing). */
int bval_copy(bval *dst, const bval *src);

/* Builders for C writers: 0, or -1 when out of memory (v then holds nothing). */
int bval_set_str(bval *v, const char *p, size_t len);
void bval_set_int(bval *v, lua_Integer i);
void bval_set_bool(bval *v, int b);

#endif
