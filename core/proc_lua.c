/*
 * proc_lua.c - child processes (proc.h) for Lua: core.spawn, on the state's loop.
 *
 * Contract:
 * - core.spawn{ path, args = {...}, env = { NAME = value }, cwd, on_output =
 *   fn(stream, line), on_exit = fn(code, signal) } starts path with args (argv[0] is
 *   path); env adds to, or overrides, this process's environment. Returns the
 *   process object, or nil and a message ("cannot start PATH: no such file or
 *   directory (ENOENT)").
 * - on_exit is called exactly once, when the process has ended (output still held
 *   by its own children may follow; the handles close when that ends too).
 *   p:kill(signal [, group]) sends a signal ("SIGTERM" default, "SIGKILL", "SIGINT",
 *   "SIGHUP", or a number), to the process group when group is true, and returns
 *   true, or nil and a message ("exited" once the process has ended, unless to the
 *   group while its handles are open); p:pid() (nothing once the handles have
 *   closed); p:exited().
 * - group = true starts the process as the leader of a new process group, so what
 *   it leaves behind can be ended with it.
 * - A line longer than 64 KiB is delivered in 64 KiB pieces.
 * - A process object that is collected does not stop its process: its callbacks,
 *   held in the registry, are still called until it ends.
 * Callbacks run on the thread running the state's loop, through flame_pcall_report;
 * none while the loop is not running.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "loop.h"
#include "proc.h"

#define PROC_MT "flame.process"

/* What the proc's ctx points at: outlives the Lua object, ends with the process. */
typedef struct lproc {
  proc *p;
  flame_loop *lp;
  int exit_ref, output_ref;         /* Lua callbacks, or LUA_NOREF */
  struct lproc **owner;             /* the Lua object pointing here, or NULL */
} lproc;

static void unref(lua_State *L, int *ref) {
  if (L) luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
}

static void cb_output(void *ctx, const char *stream, const char *line, size_t len) {
  lproc *lpr = ctx;
  lua_State *L = lpr->lp->L;
  if (!L || lpr->output_ref == LUA_NOREF || !lua_checkstack(L, 4)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, lpr->output_ref);
  lua_pushstring(L, stream);
  lua_pushlstring(L, line, len);
  flame_pcall_report(L, 2, "a process output callback");
}

static void cb_exit(void *ctx, int64_t code, int sig) {
  lproc *lpr = ctx;
  lua_State *L = lpr->lp->L;
  if (!L || lpr->exit_ref == LUA_NOREF || !lua_checkstack(L, 4)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, lpr->exit_ref);
  lua_pushinteger(L, (lua_Integer)code);
  lua_pushinteger(L, sig);
  flame_pcall_report(L, 2, "a process exit callback");
}

/* The proc is freed after this returns. Without a running loop (the state is
 * closing: loop.c's walk) the registry is left alone; it goes with the state. */
static void cb_done(void *ctx) {
  lproc *lpr = ctx;
  unref(lpr->lp->L, &lpr->exit_ref);
  unref(lpr->lp->L, &lpr->output_ref);
  if (lpr->owner) *lpr->owner = NULL;
  free(lpr);
}

static const proc_cbs lua_cbs = { cb_output, cb_exit, cb_done };

/* [-0, +1, m] argv or the env's names and values as an array in a userdata */
static void *strings_array(lua_State *L, size_t n) {
  char **a = lua_newuserdatauv(L, sizeof(char *) * (n + 1), 0);
  a[n] = NULL;
  return a;
}

/* [-1, +0, m] the function on top, referenced, or LUA_NOREF (popped either way) */
static int ref_function(lua_State *L) {
  if (lua_isfunction(L, -1)) return luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  return LUA_NOREF;
}

static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  lua_settop(L, 1);
  lua_getfield(L, 1, "path");                               /* 2 */
  const char *path = luaL_checkstring(L, 2);
  lua_getfield(L, 1, "args");                               /* 3 */
  int nargs = lua_istable(L, 3) ? (int)luaL_len(L, 3) : 0;
  char **argv = strings_array(L, (size_t)nargs + 1);        /* 4 */
  argv[0] = (char *)path;
  lua_newtable(L);                                          /* 5: strings kept alive */
  for (int i = 1; i <= nargs; i++) {
    lua_geti(L, 3, i);
    argv[i] = (char *)luaL_checkstring(L, -1);
    lua_rawseti(L, 5, i);
  }
  size_t nenv = 0;
  const char **names = NULL, **values = NULL;
  lua_getfield(L, 1, "env");                                /* 6 */
  if (lua_istable(L, 6)) {
    lua_pushnil(L);
    while (lua_next(L, 6)) { nenv++; lua_pop(L, 1); }
    names = strings_array(L, 2 * nenv);                     /* 7 */
    values = names + nenv;
    size_t k = 0;
    lua_pushnil(L);
    while (lua_next(L, 6)) {
      if (lua_type(L, -2) != LUA_TSTRING)  /* tostring on a number key would break next */
        return luaL_error(L, "spawn: env keys must be strings");
      values[k] = luaL_checkstring(L, -1);
      names[k] = lua_tostring(L, -2);      /* held by the env table */
      lua_rawseti(L, 5, nargs + 1 + (lua_Integer)k++);      /* the value, maybe converted */
    }
  }
  lua_getfield(L, 1, "cwd");
  const char *cwd = luaL_optstring(L, -1, NULL);
  lua_getfield(L, 1, "group");
  int group = lua_toboolean(L, -1);
  size_t errlen = strlen(path) + 160;      /* the message names the path */
  char *err = lua_newuserdatauv(L, errlen, 0);

  lproc **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, PROC_MT);
  int obj = lua_gettop(L);
  lua_getfield(L, 1, "on_exit");
  int exit_ref = ref_function(L);
  lua_getfield(L, 1, "on_output");
  int output_ref = ref_function(L);
  /* From here nothing raises before the C side is set up or undone. */
  lproc *lpr = calloc(1, sizeof *lpr);
  char **envp = NULL;
  if (lpr && nenv > 0) envp = proc_env(names, values, nenv);
  if (lpr == NULL || (nenv > 0 && envp == NULL)) {
    free(lpr);
    unref(L, &exit_ref);
    unref(L, &output_ref);
    return luaL_error(L, "not enough memory");
  }
  lpr->lp = lp;
  lpr->exit_ref = exit_ref;
  lpr->output_ref = output_ref;
  proc_opts o = { .path = path, .argv = argv, .envp = envp, .cwd = cwd, .group = group };
  int rc = proc_start(&lp->uv, &o, &lua_cbs, lpr, &lpr->p, err, errlen);
  free(envp);                              /* the child has its copy */
  if (rc != 0) {
    unref(L, &lpr->exit_ref);
    unref(L, &lpr->output_ref);
    free(lpr);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lpr->owner = ud;
  *ud = lpr;
  lua_settop(L, obj);
  return 1;
}

static lproc *check(lua_State *L) {
  return *(lproc **)luaL_checkudata(L, 1, PROC_MT);
}

static int l_pid(lua_State *L) {
  lproc *lpr = check(L);
  if (lpr == NULL) return 0;
  lua_pushinteger(L, proc_pid(lpr->p));
  return 1;
}

/* p:kill([signal [, group]]) -> true | nil, message (after exit: nil, "exited") */
static int l_kill(lua_State *L) {
  lproc *lpr = check(L);
  int sig = SIGTERM;
  if (lua_type(L, 2) == LUA_TNUMBER) sig = (int)lua_tointeger(L, 2);
  else if (!lua_isnoneornil(L, 2)) {
    static const char *const names[] = { "SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", NULL };
    static const int nums[] = { SIGTERM, SIGKILL, SIGINT, SIGHUP };
    sig = nums[luaL_checkoption(L, 2, NULL, names)];
  }
  int group = lua_toboolean(L, 3);
  if (lpr == NULL || (proc_exited(lpr->p) && !group)) {
    lua_pushnil(L);
    lua_pushliteral(L, "exited");
    return 2;
  }
  int rc = proc_signal(lpr->p, sig, group);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_exited(lua_State *L) {
  lproc *lpr = check(L);
  lua_pushboolean(L, lpr == NULL || proc_exited(lpr->p));
  return 1;
}

static int l_gc(lua_State *L) {
  lproc **ud = luaL_checkudata(L, 1, PROC_MT);
  if (*ud) (*ud)->owner = NULL;     /* the process is still watched until it ends */
  return 0;
}

void flame_proc_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "pid", l_pid }, { "kill", l_kill }, { "exited", l_exited }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, PROC_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_spawn);
  lua_setfield(L, -2, "spawn");
}
