/*
 * decode_fuzz.c - libFuzzer target for the codec decoder in the mode that faces
 * untrusted bytes (functions refused: how the parent reads results). Every input
 * must give values or an error message; ASan and UBSan watch for the rest.
 * Run with scripts/fuzz SECONDS.
 */
#include <stdint.h>
#include <stddef.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *fuzz_state(void) {
  static lua_State *L;
  if (L == NULL) {
    L = luaL_newstate();
    luaL_openlibs(L);
    lua_newtable(L);                        /* a registered metatable, for T_TABLE_MT */
    codec_register(L, "m", -1);
    lua_pop(L, 1);
  }
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned runs;
  lua_State *L = fuzz_state();
  codec_opts o;
  codec_opts_init(&o);
  o.functions = 0;
  o.max_size = 1 << 20;
  int top = lua_gettop(L);
  int n = codec_decode(L, (const char *)data, size, &o);
  if (n < 0 && lua_type(L, -1) != LUA_TSTRING) __builtin_trap();  /* errors are text */
  lua_settop(L, top);
  if (++runs % 1024 == 0) lua_gc(L, LUA_GCCOLLECT);
  return 0;
}
