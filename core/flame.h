/*
 * flame.h - what the core's files share: the version, the per-concern openers that
 * luaopen_flame_core calls, and small helpers for the Lua C API.
 * Each opener adds its functions to the table at the top of the stack [-0, +0, m].
 */
#ifndef FLAME_H
#define FLAME_H

#include <lua.h>
#include <lauxlib.h>

#define FLAME_VERSION "0.1.0"

#ifdef FLAME_APICHECK
#include <assert.h>
#define flame_assert(c) assert(c)
#else
#define flame_assert(c) ((void)0)
#endif

/* For functions that end in lua_error: the Lua headers do not mark it noreturn. */
#define FLAME_NORETURN __attribute__((noreturn))
#define flame_unreachable() __builtin_unreachable()

int luaopen_flame_core(lua_State *L);
/* SIGPIPE ignored, unless the program has its own handler (binding.c). */
void flame_ignore_sigpipe(void);
void flame_codec_open(lua_State *L);
void flame_sandbox_open(lua_State *L);
void flame_loop_open(lua_State *L);
void flame_executor_open(lua_State *L);
void flame_link_open(lua_State *L);
void flame_crypto_open(lua_State *L);
void flame_hub_open(lua_State *L);
void flame_proc_open(lua_State *L);
void flame_http_open(lua_State *L);
void flame_pack_open(lua_State *L);
void flame_popts_open(lua_State *L);

#endif
