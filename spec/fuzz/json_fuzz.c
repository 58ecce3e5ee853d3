/*
 * json_fuzz.c - libFuzzer target for the backend environment's json_decode
 * (core/benv.c over cJSON): outside bytes, from a Docker engine, a registry, a
 * Slurm REST server. Every input must give a Lua value or nil and a message (or
 * nil alone: the text "null"), in a
 * state whose memory is capped (the decoder's memory error is then a Lua error,
 * never a crash or a leak of cJSON's tree); a value that came out is encoded again
 * (json_encode must give text or nil and a message), and text that came out must
 * decode again. Run with scripts/fuzz SECONDS.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "benv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)
#define LIMIT (8 * 1024 * 1024)

static size_t used;

static void *capped(void *ud, void *p, size_t osize, size_t nsize) {
  (void)ud;
  size_t old = p ? osize : 0;
  if (nsize == 0) {
    used -= old;
    free(p);
    return NULL;
  }
  if (nsize > old && used + (nsize - old) > LIMIT) return NULL;
  void *q = realloc(p, nsize);
  if (q) used = used - old + nsize;
  return q;
}

/* Protected: decode, and encode and decode again what came out. */
static int run(lua_State *L) {
  size_t len;
  const char *text = lua_tolstring(L, 1, &len);
  lua_getfield(L, 2, "json_decode");
  lua_pushlstring(L, text, len);
  lua_call(L, 1, 2);
  if (lua_isnil(L, -2)) {             /* not JSON: why; the text "null": nothing */
    CHECK(lua_type(L, -1) == LUA_TSTRING || lua_isnil(L, -1));
    return 0;
  }
  lua_pop(L, 1);
  int value = lua_gettop(L);
  lua_getfield(L, 2, "json_encode");
  lua_pushvalue(L, value);
  lua_call(L, 1, 2);
  if (lua_isnil(L, -2)) {
    CHECK(lua_type(L, -1) == LUA_TSTRING);
    return 0;
  }
  CHECK(lua_type(L, -2) == LUA_TSTRING);
  lua_pop(L, 1);
  int again = lua_gettop(L);
  lua_getfield(L, 2, "json_decode");
  lua_pushvalue(L, again);
  lua_call(L, 1, 2);
  CHECK(!lua_isnil(L, -2));           /* what json_encode wrote, json_decode reads */
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  used = 0;
  lua_State *L = lua_newstate(capped, NULL);
  if (L == NULL) return 0;
  lua_pushcfunction(L, run);
  lua_pushlstring(L, (const char *)data, size);
  benv_open(L);
  int st = lua_pcall(L, 2, 0, 0);
  CHECK(st == LUA_OK || st == LUA_ERRMEM || st == LUA_ERRRUN);
  lua_close(L);
  CHECK(used == 0);
  return 0;
}
