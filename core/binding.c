/*
 * binding.c - luaopen_flame_core: the C core as the Lua module flame.core. Each
 * concern adds its functions to one table; the Lua half (lua/flame/init.lua) wraps it.
 */
#include <lua.h>
#include <lauxlib.h>

#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <uv.h>

#include "flame.h"

/* random_bytes(n) -> n bytes from the system's CSPRNG (uv_random) */
static int l_random_bytes(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 0 && n <= 4096, 1, "0 to 4096 bytes");
  unsigned char b[4096];
  int rc = uv_random(NULL, NULL, b, (size_t)n, 0, NULL);
  if (rc != 0) return luaL_error(L, "random_bytes: %s", uv_strerror(rc));
  lua_pushlstring(L, (const char *)b, (size_t)n);
  return 1;
}

/* hrtime() -> nanoseconds on a monotonic clock (uv_hrtime), for measurements */
static int l_hrtime(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_hrtime());
  return 1;
}

static int l_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

/* exit(code): ends the process now (a runner's system_shutdown): output is
 * flushed, nothing else runs, worker threads blocked in C calls do not hold it. */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  fflush(NULL);
  _exit(code);
  return 0;
}

/* Writing to a socket or pipe whose reader is gone raises SIGPIPE, whose default
 * action ends the process: a runner whose parent died would die on its next log
 * line instead of draining, and a parent would die on a lost runner's socket. With
 * SIGPIPE ignored such writes fail with EPIPE, which libuv reports. Once per
 * process; a program that has installed its own SIGPIPE handler keeps it. */
static void ignore_sigpipe(void) {
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
  }
}

static uv_once_t sigpipe_once = UV_ONCE_INIT;

int luaopen_flame_core(lua_State *L) {
  luaL_checkversion(L);
  uv_once(&sigpipe_once, ignore_sigpipe);
  lua_newtable(L);
  flame_codec_open(L);
  flame_sandbox_open(L);
  flame_loop_open(L);
  flame_executor_open(L);
  flame_link_open(L);
  flame_proc_open(L);
  flame_http_open(L);
  lua_pushcfunction(L, l_pid);
  lua_setfield(L, -2, "pid");
  lua_pushcfunction(L, l_exit);
  lua_setfield(L, -2, "exit");
  lua_pushcfunction(L, l_hrtime);
  lua_setfield(L, -2, "hrtime");
  lua_pushcfunction(L, l_random_bytes);
  lua_setfield(L, -2, "random_bytes");
  lua_pushliteral(L, FLAME_VERSION);
  lua_setfield(L, -2, "VERSION");
  return 1;
}
