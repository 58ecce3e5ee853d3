/*
 * binding.c - luaopen_flame_core: the C core as the Lua module flame.core. Each
 * concern adds its functions to one table; the Lua half (lua/flame/init.lua) wraps it.
 * Loaded as a shared module, it stays mapped until the process ends: its threads
 * (executor workers, the sandbox watchdog) may still run when lua_close unloads C
 * modules, and their code must not vanish under them.
 */
#define _GNU_SOURCE                 /* dladdr, RTLD_NODELETE */
#include <dirent.h>
#include <dlfcn.h>

#include <lua.h>
#include <lauxlib.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "flame.h"
#include "benv.h"
#include "wire.h"

/* core.wire: the link's protocol version, message types and SPAWN's header size,
 * as wire.h has them (the specs check their own copy against these) */
static void push_wire(lua_State *L) {
  static const struct { const char *name; int v; } w[] = {
    { "PROTOCOL", WIRE_PROTOCOL }, { "HELLO", WIRE_HELLO }, { "CHALLENGE", WIRE_CHALLENGE },
    { "PROOF", WIRE_PROOF }, { "REMOTE_UP", WIRE_REMOTE_UP }, { "SPAWN", WIRE_SPAWN },
    { "RESULT", WIRE_RESULT }, { "KILL", WIRE_KILL }, { "SHUTDOWN", WIRE_SHUTDOWN },
    { "REMOTE_SHUTDOWN", WIRE_REMOTE_SHUTDOWN }, { "PING", WIRE_PING },
    { "CONFIG", WIRE_CONFIG }, { "CLOSE", WIRE_CLOSE }, { "CODE", WIRE_CODE },
    { "SPAWN_HEADER", WIRE_SPAWN_HEADER }, { "NONCE", WIRE_NONCE },
  };
  lua_createtable(L, 0, (int)(sizeof w / sizeof *w));
  for (size_t i = 0; i < sizeof w / sizeof *w; i++) {
    lua_pushinteger(L, w[i].v);
    lua_setfield(L, -2, w[i].name);
  }
}

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

/* cwd() -> the process's working directory (uv_cwd), or nil and why */
static int l_cwd(lua_State *L) {
  char dir[4096];
  size_t n = sizeof dir;
  int rc = uv_cwd(dir, &n);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cwd: %s", uv_strerror(rc));
    return 2;
  }
  lua_pushlstring(L, dir, n);
  return 1;
}

/* children() -> { pid, ... }: this process's child processes, whichever of its
 * threads started them (the runtime thread starts the backends'): for specs and
 * diagnostics. Read from /proc/self/task/TID/children. */
static int l_children(lua_State *L) {
  lua_newtable(L);
  DIR *d = opendir("/proc/self/task");
  if (d == NULL) return 1;
  lua_Integer n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%.20s/children", e->d_name);
    FILE *f = fopen(path, "r");
    if (f == NULL) continue;
    long pid;
    while (fscanf(f, "%ld", &pid) == 1) {
      lua_pushinteger(L, pid);
      lua_rawseti(L, -2, ++n);
    }
    fclose(f);
  }
  closedir(d);
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

static uv_once_t sigpipe_once = UV_ONCE_INIT;

/* Marks this library "never unload" (RTLD_NODELETE on a handle to itself). Linked
 * into the flame executable there is no library to pin, and dladdr names the
 * executable: dlopen with RTLD_NOLOAD then finds it loaded and changes nothing. If
 * it fails, the process still works; only threads alive at lua_close are at risk,
 * as they were before. */
static void pin_library(void) {
  Dl_info info;
  if (dladdr((void *)&luaopen_flame_core, &info) == 0 || info.dli_fname == NULL) return;
  void *self = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  if (self == NULL) return;
  /* the reference dlopen took is kept on purpose: the library is never closed */
}

static uv_once_t pin_once = UV_ONCE_INIT;

int luaopen_flame_core(lua_State *L) {
  luaL_checkversion(L);
  uv_once(&sigpipe_once, flame_ignore_sigpipe);
  uv_once(&pin_once, pin_library);
  lua_newtable(L);
  flame_codec_open(L);
  flame_sandbox_open(L);
  flame_loop_open(L);
  flame_executor_open(L);
  flame_link_open(L);
  flame_hub_open(L);
  flame_crypto_open(L);
  flame_proc_open(L);
  flame_http_open(L);
  flame_pack_open(L);
  flame_popts_open(L);
  lua_pushcfunction(L, l_pid);
  lua_setfield(L, -2, "pid");
  lua_pushcfunction(L, l_children);
  lua_setfield(L, -2, "children");
  lua_pushcfunction(L, benv_environ);     /* benv.c: backend states have it too */
  lua_setfield(L, -2, "environ");
  lua_pushcfunction(L, l_cwd);
  lua_setfield(L, -2, "cwd");
  lua_pushcfunction(L, l_exit);
  lua_setfield(L, -2, "exit");
  lua_pushcfunction(L, l_hrtime);
  lua_setfield(L, -2, "hrtime");
  lua_pushcfunction(L, l_random_bytes);
  lua_setfield(L, -2, "random_bytes");
  lua_pushliteral(L, FLAME_VERSION);
  lua_setfield(L, -2, "VERSION");
  push_wire(L);
  lua_setfield(L, -2, "wire");
  return 1;
}
