/*
 * main.c - the flame executable.
 *   flame SCRIPT [ARGS...]   runs SCRIPT as a task, with the global `flame` =
 *                            require "flame", until every task it started ends
 *   flame -e CODE            runs CODE the same way
 *   flame runner [--require MOD]...   the runner (core/terminator.c, no Lua state
 *                            on its thread): needs FLAME_PARENT
 * Scripts load flame's modules as lua5.4 does (LUA_PATH, LUA_CPATH: flame.core is
 * the module flame/core.so), then from beside the executable (PREFIX/share/lua/5.4,
 * PREFIX/lib/lua/5.4), so an installed flame finds its own files without `luarocks
 * path`. The runner links none of that: no Lua state on its main thread, no HTTP.
 * Exit status: 0 on success, 1 when the script raised, 2 on bad usage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "flame.h"
#include "terminator.h"

static const char USAGE[] =
  "usage: flame SCRIPT [ARGS...]     run a Lua script with flame loaded\n"
  "       flame -e CODE [ARGS...]    run CODE\n"
  "       flame runner [--require MODULE]...\n"
  "                                  become a runner (a backend starts this with\n"
  "                                  FLAME_PARENT set)\n"
  "       flame --version | --help\n";

typedef struct args {
  int argc;
  char **argv;
  int first;          /* index of the script (or of -e) in argv */
} args;

static int msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* [-0, +0, e] Appends the installation's own module directories to package.path
 * and package.cpath: PREFIX/bin/flame -> PREFIX/{share,lib}/lua/5.4. */
static void add_own_paths(lua_State *L) {
  char exe[4096];
  size_t size = sizeof exe;
  if (uv_exepath(exe, &size) != 0) return;
  char *slash = strrchr(exe, '/');
  if (slash == NULL) return;
  *slash = '\0';
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s;%s/../share/lua/5.4/?.lua;%s/../share/lua/5.4/?/init.lua",
                  lua_tostring(L, -1), exe, exe);
  lua_setfield(L, -3, "path");
  lua_pop(L, 1);
  lua_getfield(L, -1, "cpath");
  lua_pushfstring(L, "%s;%s/../lib/lua/5.4/?.so", lua_tostring(L, -1), exe);
  lua_setfield(L, -3, "cpath");
  lua_pop(L, 2);
}

/* Protected main: [args*] -> exit status. */
static int pmain(lua_State *L) {
  const args *a = lua_touserdata(L, 1);
  luaL_openlibs(L);
  add_own_paths(L);
  const char *first = a->argv[a->first];
  int is_code = strcmp(first, "-e") == 0;
  int script = a->first + is_code;          /* argv index of the script or code */
  if (script >= a->argc) {
    fprintf(stderr, "flame: -e needs an argument\n%s", USAGE);
    lua_pushinteger(L, 2);
    return 1;
  }
  /* arg: arg[0] is the script, arg[1..] its arguments, as lua5.4 sets it */
  lua_createtable(L, a->argc - script - 1, script + 1);
  for (int i = 0; i < a->argc; i++) {
    lua_pushstring(L, a->argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
  lua_getglobal(L, "require");
  lua_pushliteral(L, "flame");
  lua_call(L, 1, 1);
  lua_setglobal(L, "flame");

  /* the script runs as a task: require("flame.task").main(chunk, args...) */
  lua_pushcfunction(L, msgh);
  int h = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "flame.task");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_remove(L, -2);
  const char *src = a->argv[script];
  int st = is_code ? luaL_loadbuffer(L, src, strlen(src), "=(command line)")
                   : luaL_loadfile(L, strcmp(src, "-") == 0 ? NULL : src);
  if (st == LUA_OK) {
    int nargs = a->argc - script - 1;
    luaL_checkstack(L, nargs, "too many arguments to script");
    for (int i = script + 1; i < a->argc; i++) lua_pushstring(L, a->argv[i]);
    st = lua_pcall(L, nargs + 1, 0, h);
  }
  if (st != LUA_OK) {
    fprintf(stderr, "flame: %s\n", lua_tostring(L, -1));
    lua_pushinteger(L, 1);
    return 1;
  }
  lua_pushinteger(L, 0);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    fputs(USAGE, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-v") == 0) {
    printf("flame %s (%s)\n", FLAME_VERSION, LUA_RELEASE);
    return 0;
  }
  if (strcmp(argv[1], "runner") == 0) {     /* no Lua state: the terminator is C */
    flame_ignore_sigpipe();
    return terminator_main(argc - 1, argv + 1);
  }
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "flame: cannot create a Lua state: not enough memory\n");
    return 1;
  }
  args a = { argc, argv, 1 };
  lua_pushcfunction(L, pmain);
  lua_pushlightuserdata(L, &a);
  int status;
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "flame: %s\n", msg ? msg : "(error object is not a string)");
    status = 1;
  } else {
    status = (int)lua_tointeger(L, -1);
  }
  lua_close(L);
  return status;
}
