/*
 * binding.c - luaopen_flame_core: the C core as the Lua module flame.core. Each
 * concern adds its functions to one table; the Lua half (lua/flame/init.lua) wraps it.
 */
#include <lua.h>
#include <lauxlib.h>

#include "flame.h"

int luaopen_flame_core(lua_State *L) {
  luaL_checkversion(L);
  lua_newtable(L);
  flame_codec_open(L);
  flame_sandbox_open(L);
  lua_pushliteral(L, FLAME_VERSION);
  lua_setfield(L, -2, "VERSION");
  return 1;
}
