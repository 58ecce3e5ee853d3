/*
 * sandbox.c - sandboxed Lua states (contract in sandbox.h).
 *
 * The kill switch sets a count hook on the state from the killing thread: lua_sethook
 * is the one Lua API made to be called asynchronously (lua.c calls it from a signal
 * handler). A hook on the main thread does not reach a coroutine that is running, so
 * the sandbox's coroutine.resume and coroutine.wrap record the innermost running
 * coroutine, and the kill hooks it too; when a resume returns into a killed state it
 * raises in the resumer. A permanent hook would have done the same without the
 * bookkeeping, but costs 2.3x on tight loops (Lua 5.4 traps every instruction).
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "flame.h"
#include "codec.h"
#include "sandbox.h"
#include "benv.h"

struct sandbox {
  lua_State *L;
  size_t used, limit;          /* bytes; touched only by the owning thread */
  sandbox_profile profile;
  atomic_int kill;             /* 0 or a SANDBOX_KILL_* reason */
  uv_mutex_t lock;             /* guards running and hook changes; a leaf lock */
  lua_State *running;          /* innermost coroutine resumed by our resume, or NULL */
};

static const char *const kill_names[SANDBOX_KILL_COUNT] = {
  NULL, "timeout", "cancelled", "shutdown", "killed"
};

const char *sandbox_kill_name(int reason) {
  return reason > 0 && reason < SANDBOX_KILL_COUNT ? kill_names[reason] : "killed";
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  sandbox *s = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) {
    free(ptr);
    s->used -= old;
    return NULL;
  }
  if (nsize > old && s->limit && s->used - old + nsize > s->limit) return NULL;
  void *p = realloc(ptr, nsize);
  if (p == NULL) return nsize <= old ? ptr : NULL;  /* Lua assumes shrinking works */
  s->used = s->used - old + nsize;
  return p;
}

sandbox *sandbox_of(lua_State *L) {
  void *ud;
  return lua_getallocf(L, &ud) == sb_alloc ? ud : NULL;
}

/* ------------------------------------------------------------ kill switch ---- */

static void sb_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  sandbox *s = sandbox_of(L);
  int k = atomic_load(&s->kill);
  if (k == 0) {                /* a hook left from an earlier kill: remove it */
    uv_mutex_lock(&s->lock);
    if (atomic_load(&s->kill) == 0) lua_sethook(L, NULL, 0, 0);
    uv_mutex_unlock(&s->lock);
    return;
  }
  lua_pushfstring(L, "flame: work killed (%s)", sandbox_kill_name(k));
  lua_error(L);
}

static void sb_arm(lua_State *L) {
  lua_sethook(L, sb_hook, LUA_MASKCOUNT, 1);
}

void sandbox_kill(sandbox *s, int reason) {
  if (reason <= 0 || reason >= SANDBOX_KILL_COUNT) reason = SANDBOX_KILL_REQUEST;
  uv_mutex_lock(&s->lock);
  atomic_store(&s->kill, reason);
  sb_arm(s->L);
  if (s->running) sb_arm(s->running);
  uv_mutex_unlock(&s->lock);
}

int sandbox_killed(sandbox *s) {
  return atomic_load(&s->kill);
}

void sandbox_rearm(sandbox *s) {
  uv_mutex_lock(&s->lock);
  atomic_store(&s->kill, 0);
  lua_sethook(s->L, NULL, 0, 0);
  s->running = NULL;
  uv_mutex_unlock(&s->lock);
}

/* ------------------------------------------------------------- coroutines ---- */

/* Makes co the innermost running coroutine, armed if a kill is pending; returns
 * the one it replaces. Every way the sandbox runs code of another coroutine
 * (resume, wrap, close) goes through sb_enter and sb_leave. */
static lua_State *sb_enter(sandbox *s, lua_State *co) {
  uv_mutex_lock(&s->lock);
  lua_State *prev = s->running;
  s->running = co;
  if (atomic_load(&s->kill)) sb_arm(co);
  uv_mutex_unlock(&s->lock);
  return prev;
}

/* Puts prev back; if a kill came meanwhile, it reaches L too: armed, and raised. */
static void sb_leave(sandbox *s, lua_State *L, lua_State *prev) {
  uv_mutex_lock(&s->lock);
  s->running = prev;
  int k = atomic_load(&s->kill);
  if (k) sb_arm(L);
  uv_mutex_unlock(&s->lock);
  if (k) {
    lua_pushfstring(L, "flame: work killed (%s)", sandbox_kill_name(k));
    lua_error(L);
  }
}

/* lcorolib's auxresume, with the running coroutine recorded for the kill switch. */
static int sb_auxresume(lua_State *L, lua_State *co, int narg) {
  sandbox *s = sandbox_of(L);
  int nres;
  if (!lua_checkstack(co, narg)) {
    lua_pushliteral(L, "too many arguments to resume");
    return -1;
  }
  lua_xmove(L, co, narg);
  lua_State *prev = sb_enter(s, co);
  int st = lua_resume(co, L, narg, &nres);
  sb_leave(s, L, prev);
  if (st == LUA_OK || st == LUA_YIELD) {
    if (!lua_checkstack(L, nres + 1)) {
      lua_pop(co, nres);
      lua_pushliteral(L, "too many results to resume");
      return -1;
    }
    lua_xmove(co, L, nres);
    return nres;
  }
  lua_xmove(co, L, 1);
  return -1;
}

/* lua_resetthread runs co's pending __close handlers: they run as co, tracked. */
static int sb_reset(lua_State *L, lua_State *co) {
  sandbox *s = sandbox_of(L);
  lua_State *prev = sb_enter(s, co);
  int st = lua_resetthread(co);
  sb_leave(s, L, prev);
  return st;
}

static int sb_coclose(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  lua_Debug ar;
  luaL_argexpected(L, co, 1, "coroutine");
  if (co == L) return luaL_error(L, "cannot close a running coroutine");
  if (lua_status(co) == LUA_OK && lua_getstack(co, 0, &ar))
    return luaL_error(L, "cannot close a normal coroutine");
  if (sb_reset(L, co) == LUA_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_xmove(co, L, 1);
  return 2;
}

static int sb_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  luaL_argexpected(L, co, 1, "coroutine");
  int r = sb_auxresume(L, co, lua_gettop(L) - 1);
  if (r < 0) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushboolean(L, 1);
  lua_insert(L, -(r + 1));
  return r + 1;
}

static int sb_auxwrap(lua_State *L) {
  lua_State *co = lua_tothread(L, lua_upvalueindex(1));
  int r = sb_auxresume(L, co, lua_gettop(L));
  if (r < 0) {
    int st = lua_status(co);
    if (st != LUA_OK && st != LUA_YIELD) {   /* error in the coroutine: close it */
      st = sb_reset(L, co);
      lua_xmove(co, L, 1);
    }
    if (st != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
      luaL_where(L, 1);
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    return lua_error(L);
  }
  return r;
}

static int sb_wrap(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_State *co = lua_newthread(L);
  lua_pushvalue(L, 1);
  lua_xmove(L, co, 1);
  lua_pushcclosure(L, sb_auxwrap, 1);
  return 1;
}

/* --------------------------------------------------------------- profiles ---- */

static const char RUNENV_KEY[] = "flame.sandbox.runenv";

/* Fills argument `envarg` with the running work's environment when the caller gave
 * none, so code loaded by work sees the work's globals, not the shared ones. */
static void sb_default_env(lua_State *L, int envarg) {
  if (lua_gettop(L) >= envarg) return;
  lua_settop(L, envarg - 1);
  if (lua_getfield(L, LUA_REGISTRYINDEX, RUNENV_KEY) != LUA_TTABLE) lua_pop(L, 1);
}

/* load, loadfile and dofile that accept text only: bytecode can break the VM. */
static int sb_load(lua_State *L) {
  sb_default_env(L, 4);
  int n = lua_gettop(L) < 3 ? 3 : lua_gettop(L);
  lua_settop(L, n);
  lua_pushliteral(L, "t");
  lua_replace(L, 3);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L);
}

static int sb_loadfile(lua_State *L) {
  sb_default_env(L, 3);
  int n = lua_gettop(L) < 2 ? 2 : lua_gettop(L);
  lua_settop(L, n);
  lua_pushliteral(L, "t");
  lua_replace(L, 2);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L);
}

static int sb_dofile(lua_State *L) {
  lua_settop(L, 1);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  lua_call(L, 1, 2);
  if (lua_isnil(L, -2)) return lua_error(L);
  lua_pop(L, 1);
  lua_call(L, 0, LUA_MULTRET);
  return lua_gettop(L) - 1;
}

/* setmetatable refusing __gc: Lua runs finalizers with hooks off, so a finalizer
 * could never be killed. */
static int sb_setmetatable(lua_State *L) {
  if (lua_type(L, 2) == LUA_TTABLE) {
    lua_pushliteral(L, "__gc");
    if (lua_rawget(L, 2) != LUA_TNIL)
      return luaL_error(L, "setmetatable: __gc metamethods are not allowed in a sandbox "
                           "(a finalizer cannot be stopped); use a <close> variable");
    lua_pop(L, 1);
  }
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 1);
  return 1;
}

/* package.searchers[2], text only: a module file may not be bytecode. */
static int sb_search_lua(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_settop(L, 1);
  lua_getfield(L, lua_upvalueindex(1), "searchpath");
  lua_pushvalue(L, 1);
  if (lua_getfield(L, lua_upvalueindex(1), "path") != LUA_TSTRING)
    return luaL_error(L, "'package.path' must be a string");
  lua_call(L, 2, 2);
  if (lua_isnil(L, -2)) return 1;           /* the message of the path search */
  const char *file = lua_tostring(L, -2);
  if (file == NULL) return luaL_error(L, "package.searchpath returned a non-string");
  if (luaL_loadfilex(L, file, "t") != LUA_OK)
    return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", name, file,
                      lua_tostring(L, -1));
  lua_pushstring(L, file);
  return 2;
}

/* package.searchers[3] and [4] on the C path the sandbox was made with: work may
 * change package.cpath, but cannot make require load any other shared object (such
 * as the Lua library's own luaopen_debug). */
static int sb_search_c(lua_State *L) {
  lua_settop(L, 1);
  lua_getfield(L, lua_upvalueindex(2), "cpath");
  lua_pushvalue(L, lua_upvalueindex(3));
  lua_setfield(L, lua_upvalueindex(2), "cpath");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, 1);
  int st = lua_pcall(L, 1, 2, 0);
  lua_pushvalue(L, 2);                       /* the work's cpath, put back */
  lua_setfield(L, lua_upvalueindex(2), "cpath");
  if (st != LUA_OK) return lua_error(L);
  return 2;
}

static void sb_searchers(lua_State *L) {
  lua_getglobal(L, "package");
  int pkg = lua_gettop(L);
  lua_getfield(L, pkg, "searchers");
  int searchers = lua_gettop(L);
  lua_pushvalue(L, pkg);
  lua_pushcclosure(L, sb_search_lua, 1);
  lua_rawseti(L, searchers, 2);
  for (int i = 3; i <= 4; i++) {
    lua_rawgeti(L, searchers, i);
    lua_pushvalue(L, pkg);
    lua_getfield(L, pkg, "cpath");
    lua_pushcclosure(L, sb_search_c, 3);
    lua_rawseti(L, searchers, i);
  }
  lua_settop(L, pkg - 1);
}

/* [-0, +0, e] Replaces t[name] with fn closed over the old value. */
static void sb_wrapfield(lua_State *L, int t, const char *name, lua_CFunction fn) {
  lua_getfield(L, t, name);
  lua_pushcclosure(L, fn, 1);
  lua_setfield(L, t, name);
}

static void sb_setlib(lua_State *L, const char *name) {
  lua_pushvalue(L, -1);
  lua_setglobal(L, name);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, name);
  lua_pop(L, 2);
}

/* xpcall whose handler is skipped for a kill: after a hook raises, Lua runs the
 * handler with hooks off, so a handler that loops could never be stopped. */
static int sb_xpcall_handler(lua_State *L) {
  if (atomic_load(&sandbox_of(L)->kill)) return 1;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, 1);
  return 1;
}

static int sb_finishpcall(lua_State *L, int status, lua_KContext extra) {
  if (status != LUA_OK && status != LUA_YIELD) {
    lua_pushboolean(L, 0);
    lua_pushvalue(L, -2);
    return 2;
  }
  return lua_gettop(L) - (int)extra;
}

static int sb_xpcall(lua_State *L) {
  int n = lua_gettop(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushvalue(L, 2);
  lua_pushcclosure(L, sb_xpcall_handler, 1);
  lua_replace(L, 2);
  lua_pushboolean(L, 1);
  lua_pushvalue(L, 1);
  lua_rotate(L, 3, 2);                       /* [f, h, true, f, args...] */
  int status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, sb_finishpcall);
  return sb_finishpcall(L, status, 2);
}

/* What both profiles replace: everything that runs code the kill switch must reach. */
static void sb_coroutines(lua_State *L) {
  lua_pushcfunction(L, sb_xpcall);
  lua_setglobal(L, "xpcall");
  lua_pushglobaltable(L);
  sb_wrapfield(L, lua_gettop(L), "setmetatable", sb_setmetatable);
  lua_pop(L, 1);
  lua_getglobal(L, "coroutine");
  lua_pushcfunction(L, sb_coclose);
  lua_setfield(L, -2, "close");
  lua_pop(L, 1);
  lua_getglobal(L, "coroutine");
  lua_pushcfunction(L, sb_resume);
  lua_setfield(L, -2, "resume");
  lua_pushcfunction(L, sb_wrap);
  lua_setfield(L, -2, "wrap");
  lua_pop(L, 1);
}

static void sb_application(lua_State *L, const sandbox_config *c) {
  luaL_openlibs(L);
  lua_getglobal(L, "package");               /* before the searchers keep the C path */
  if (c->path) {
    lua_pushstring(L, c->path);
    lua_setfield(L, -2, "path");
  }
  if (c->cpath) {
    lua_pushstring(L, c->cpath);
    lua_setfield(L, -2, "cpath");
  }
  lua_pop(L, 1);
  lua_pushglobaltable(L);
  int g = lua_gettop(L);
  sb_wrapfield(L, g, "load", sb_load);
  sb_wrapfield(L, g, "loadfile", sb_loadfile);
  lua_getfield(L, g, "loadfile");            /* dofile goes through the text-only one */
  lua_pushcclosure(L, sb_dofile, 1);
  lua_setfield(L, g, "dofile");
  lua_getglobal(L, "os");
  lua_pushnil(L);
  lua_setfield(L, -2, "exit");
  lua_getglobal(L, "package");
  lua_pushnil(L);
  lua_setfield(L, -2, "loadlib");
  lua_createtable(L, 0, 1);                  /* debug keeps traceback only */
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_setfield(L, -3, "traceback");
  lua_pop(L, 1);
  sb_setlib(L, "debug");
  lua_settop(L, g - 1);
  sb_searchers(L);
  sb_coroutines(L);
}

static void sb_restricted(lua_State *L) {
  static const luaL_Reg libs[] = {
    { LUA_GNAME, luaopen_base }, { LUA_COLIBNAME, luaopen_coroutine },
    { LUA_TABLIBNAME, luaopen_table }, { LUA_STRLIBNAME, luaopen_string },
    { LUA_MATHLIBNAME, luaopen_math }, { LUA_UTF8LIBNAME, luaopen_utf8 },
    { NULL, NULL }
  };
  static const char *const gone[] = {
    "load", "loadfile", "dofile", "print", "collectgarbage", NULL
  };
  static const char *const os_kept[] = { "clock", "time", "date", "difftime", NULL };
  for (const luaL_Reg *lib = libs; lib->func; lib++) {
    luaL_requiref(L, lib->name, lib->func, 1);
    lua_pop(L, 1);
  }
  for (const char *const *name = gone; *name; name++) {
    lua_pushnil(L);
    lua_setglobal(L, *name);
  }
  luaL_requiref(L, LUA_OSLIBNAME, luaopen_os, 0);
  lua_createtable(L, 0, 4);
  for (const char *const *name = os_kept; *name; name++) {
    lua_getfield(L, -2, *name);
    lua_setfield(L, -2, *name);
  }
  sb_setlib(L, LUA_OSLIBNAME);
  lua_pop(L, 1);
  sb_coroutines(L);
}

/* Runs {module, function, args}: the work a caller names instead of sending. */
static const char MFA_CHUNK[] =
  "local spec = ...\n"
  "local mod, fname, args = spec[1], spec[2], spec[3]\n"
  "if not require then\n"
  "  error('this sandbox cannot load modules (restricted profile): send a function', 0)\n"
  "end\n"
  "local m = require(mod)\n"
  "local f = type(m) == 'table' and m[fname] or nil\n"
  "if type(f) ~= 'function' then\n"
  "  error(string.format(\"module '%s' has no function '%s'\", mod, fname), 0)\n"
  "end\n"
  "if args == nil then return f() end\n"
  "return f(table.unpack(args, 1, args.n or #args))\n";

/* The flame module work sees in a sandbox: flame.parent() and flame.VERSION, not
 * the whole library (no loop, no pools inside a worker's state). */
static const char FLAME_CHUNK[] =
  "local info, version = ...\n"
  "local M = { VERSION = version }\n"
  "function M.parent()\n"
  "  if info == nil then return nil end\n"
  "  local t = {}\n"
  "  for k, v in pairs(info) do t[k] = v end\n"
  "  return t\n"
  "end\n"
  "return M\n";

static const char ENVMT_KEY[] = "flame.sandbox.envmt";
static const char MFA_KEY[] = "flame.sandbox.mfa";

/* restricted, plus require of text modules from one path (no C modules) */
static void sb_backend(lua_State *L, const char *path) {
  sb_restricted(L);
  luaL_requiref(L, LUA_LOADLIBNAME, luaopen_package, 1);
  int pkg = lua_gettop(L);
  lua_pushstring(L, path ? path : "");
  lua_setfield(L, pkg, "path");
  lua_pushliteral(L, "");
  lua_setfield(L, pkg, "cpath");
  lua_pushnil(L);
  lua_setfield(L, pkg, "loadlib");
  lua_createtable(L, 2, 0);                  /* searchers: preload, then text files */
  lua_getfield(L, pkg, "searchers");
  lua_rawgeti(L, -1, 1);
  lua_rawseti(L, -3, 1);
  lua_pop(L, 1);
  lua_pushvalue(L, pkg);
  lua_pushcclosure(L, sb_search_lua, 1);
  lua_rawseti(L, -2, 2);
  lua_setfield(L, pkg, "searchers");
  /* the environment's plain functions (benv.c), for the backend bootstrap */
  luaL_requiref(L, "flame.env", benv_open, 0);
  lua_settop(L, pkg - 1);
}

static int sb_setup(lua_State *L) {
  const sandbox_config *c0 = lua_touserdata(L, 2);
  if (lua_tointeger(L, 1) == SANDBOX_RESTRICTED) sb_restricted(L);
  else if (lua_tointeger(L, 1) == SANDBOX_BACKEND) sb_backend(L, c0->path);
  else sb_application(L, c0);
  /* each run's _ENV reads the profile's globals and writes its own table; the
   * metatable is hidden so work cannot reach the shared globals through it */
  lua_createtable(L, 0, 2);
  lua_pushglobaltable(L);
  lua_setfield(L, -2, "__index");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "__metatable");
  lua_setfield(L, LUA_REGISTRYINDEX, ENVMT_KEY);
  if (luaL_loadbufferx(L, MFA_CHUNK, sizeof MFA_CHUNK - 1, "=(flame mfa)", "t") != LUA_OK)
    return lua_error(L);
  lua_setfield(L, LUA_REGISTRYINDEX, MFA_KEY);
  codec_names(L);
  const sandbox_config *cfg = lua_touserdata(L, 2);
  if (luaL_loadbufferx(L, FLAME_CHUNK, sizeof FLAME_CHUNK - 1, "=(flame)", "t") != LUA_OK)
    return lua_error(L);
  codec_opts o;
  codec_opts_init(&o);
  o.functions = 0;
  if (cfg->info == NULL || codec_decode(L, cfg->info, cfg->info_len, &o) != 1) {
    lua_settop(L, 3);
    lua_pushnil(L);
  }
  lua_pushliteral(L, FLAME_VERSION);
  lua_call(L, 2, 1);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_insert(L, -2);
  lua_setfield(L, -2, "flame");
  lua_pop(L, 1);
  const char *req = cfg->requires;           /* `flame runner --require app` */
  while (req && *req) {
    const char *comma = strchr(req, ',');
    size_t n = comma ? (size_t)(comma - req) : strlen(req);
    lua_getglobal(L, "require");
    if (!lua_isfunction(L, -1))
      return luaL_error(L, "this profile cannot require modules");
    lua_pushlstring(L, req, n);
    lua_call(L, 1, 0);
    req = comma ? comma + 1 : NULL;
  }
  return 0;
}

/* [-0, +1, m] A fresh environment for one run. */
static void sb_newenv(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -1);
  lua_setfield(L, -2, "_G");
  lua_getfield(L, LUA_REGISTRYINDEX, ENVMT_KEY);
  lua_setmetatable(L, -2);
}

static int sb_panic(lua_State *L) {
  const char *msg = lua_tostring(L, -1);
  fprintf(stderr, "flame: unprotected error in a sandbox: %s\n", msg ? msg : "?");
  return 0;
}

int sandbox_profile_parse(const char *name, sandbox_profile *p) {
  if (strcmp(name, "application") == 0) *p = SANDBOX_APPLICATION;
  else if (strcmp(name, "restricted") == 0) *p = SANDBOX_RESTRICTED;
  else if (strcmp(name, "backend") == 0) *p = SANDBOX_BACKEND;
  else return -1;
  return 0;
}

sandbox *sandbox_new(const sandbox_config *c, const char **err) {
  sandbox *s = calloc(1, sizeof *s);
  if (s == NULL) {
    *err = "not enough memory";
    return NULL;
  }
  if (uv_mutex_init(&s->lock) != 0) {
    free(s);
    *err = "cannot create a mutex";
    return NULL;
  }
  atomic_init(&s->kill, 0);
  s->profile = c->profile;
  s->limit = c->memory_limit;
  s->L = lua_newstate(sb_alloc, s);
  if (s->L == NULL) {
    *err = "memory limit too small for a Lua state";
    goto fail;
  }
  lua_atpanic(s->L, sb_panic);
  lua_pushcfunction(s->L, sb_setup);
  lua_pushinteger(s->L, c->profile);
  lua_pushlightuserdata(s->L, (void *)c);
  int st = lua_pcall(s->L, 2, 0, 0);
  if (st != LUA_OK) {
    if (st == LUA_ERRMEM) {
      *err = "memory limit too small for the sandbox's libraries";
    } else {
      static _Thread_local char msg[256];   /* s is freed below: the message outlives it */
      snprintf(msg, sizeof msg, "%s", lua_tostring(s->L, -1));
      *err = msg;
    }
    lua_close(s->L);
    goto fail;
  }
  return s;
fail:
  uv_mutex_destroy(&s->lock);
  free(s);
  return NULL;
}

void sandbox_close(sandbox *s) {
  if (s == NULL) return;
  lua_close(s->L);
  uv_mutex_destroy(&s->lock);
  free(s);
}

lua_State *sandbox_state(sandbox *s) {
  return s->L;
}

size_t sandbox_memory(const sandbox *s) {
  return s->used;
}

/* -------------------------------------------------------------------- run ---- */

/* Message handler: {message, traceback, value}. Errors are strings or values whose
 * __tostring we call; the original value travels too when it can. */
static int sb_msgh(lua_State *L) {
  lua_settop(L, 1);
  lua_createtable(L, 3, 0);
  if (lua_type(L, 1) == LUA_TSTRING) lua_pushvalue(L, 1);
  else if (!luaL_callmeta(L, 1, "__tostring") || lua_type(L, -1) != LUA_TSTRING) {
    lua_settop(L, 2);
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  lua_rawseti(L, 2, 1);
  luaL_traceback(L, L, NULL, 1);
  lua_rawseti(L, 2, 2);
  lua_pushvalue(L, 1);
  lua_rawseti(L, 2, 3);
  return 1;
}

/* Appends a status byte and the top n values (the run's environment, at index 1,
 * travels as "the environment"); on an encode failure of the values, falls back to
 * SANDBOX_ENCODE with the message, written without Lua. */
static int sb_emit(lua_State *L, buf *out, int status, int n, const char *root) {
  codec_opts o;
  codec_opts_init(&o);
  o.functions = 0;
  o.root = root;
  o.env = 1;
  size_t at = out->len;
  if (buf_byte(out, (unsigned char)status) != 0) return -1;
  if (codec_encode(L, n, &o, out) == 0) return 0;
  out->len = at;
  const char *msg = lua_tostring(L, -1);
  if (buf_byte(out, SANDBOX_ENCODE) != 0) return -1;
  return codec_encode_cstring(out, msg ? msg : "a result cannot be sent") == 0 ? 0 : -1;
}

typedef struct run_ctx {
  sandbox *s;
  const char *work;
  size_t len;
  buf *out;
  int rc;
} run_ctx;

/* Protected body of sandbox_run: [run_ctx*]. Stack while running:
 * [env, msgh, work, args...]. */
static int sb_run_main(lua_State *L) {
  run_ctx *r = lua_touserdata(L, 1);
  buf *out = r->out;
  codec_opts o;
  codec_opts_init(&o);
  lua_settop(L, 0);
  sb_newenv(L);
  lua_pushvalue(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, RUNENV_KEY);
  o.env = 1;
  o.modules = 1;                             /* a module the work names is required */
  int n = codec_decode(L, r->work, r->len, &o);
  if (n < 0) {
    int killed = sandbox_killed(r->s);       /* in a module's require: its kill, not a
                                                module to install */
    if (killed) {
      lua_settop(L, 0);
      lua_pushstring(L, sandbox_kill_name(killed));
      r->rc = sb_emit(L, out, SANDBOX_KILLED, 1, "reason");
      return 0;
    }
    r->rc = sb_emit(L, out, SANDBOX_DECODE, 1, "message");
    return 0;
  }
  if (n >= 1 && lua_type(L, 2) == LUA_TTABLE) {      /* {module, function, args} */
    lua_getfield(L, LUA_REGISTRYINDEX, MFA_KEY);
    lua_insert(L, 2);
    n++;
  }
  if (n < 1 || lua_type(L, 2) != LUA_TFUNCTION) {
    lua_settop(L, 0);
    lua_pushliteral(L, "work is not a function");
    r->rc = sb_emit(L, out, SANDBOX_DECODE, 1, "message");
    return 0;
  }
  luaL_checkstack(L, 2, "too many values");
  lua_pushcfunction(L, sb_msgh);
  lua_insert(L, 2);
  int st = lua_pcall(L, n - 1, LUA_MULTRET, 2);
  int killed = sandbox_killed(r->s);
  if (killed) {
    lua_settop(L, 0);
    lua_pushstring(L, sandbox_kill_name(killed));
    r->rc = sb_emit(L, out, SANDBOX_KILLED, 1, "reason");
  } else if (st == LUA_OK) {
    r->rc = sb_emit(L, out, SANDBOX_RESULT, lua_gettop(L) - 2, "result %d");
  } else if (lua_istable(L, -1)) {
    int e = lua_gettop(L);
    lua_rawgeti(L, e, 1);
    lua_rawgeti(L, e, 2);
    lua_rawgeti(L, e, 3);
    size_t at = out->len;
    r->rc = sb_emit(L, out, SANDBOX_ERROR, 3, "error");
    if (r->rc == 0 && out->data[at] != SANDBOX_ERROR) {   /* the value cannot cross */
      out->len = at;
      lua_rawgeti(L, e, 1);
      lua_rawgeti(L, e, 2);
      r->rc = sb_emit(L, out, SANDBOX_ERROR, 2, "error");
    }
  } else {                         /* memory: Lua does not call the handler */
    lua_pushliteral(L, "");
    r->rc = sb_emit(L, out, SANDBOX_ERROR, 2, "error");
  }
  return 0;
}

static int sb_forget_runenv(lua_State *L) {
  lua_pushnil(L);
  lua_setfield(L, LUA_REGISTRYINDEX, RUNENV_KEY);
  return 0;
}

int sandbox_run(sandbox *s, const char *work, size_t len, buf *out) {
  lua_State *L = s->L;
  run_ctx r = { s, work, len, out, 0 };
  size_t at = out->len;
  lua_settop(L, 0);
  lua_pushcfunction(L, sb_run_main);
  lua_pushlightuserdata(L, &r);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {   /* out of memory outside the work itself */
    const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                     : "not enough memory";
    out->len = at;
    r.rc = buf_byte(out, SANDBOX_ERROR) == 0 ? codec_encode_cstring(out, msg) : -1;
  }
  lua_settop(L, 0);
  lua_pushcfunction(L, sb_forget_runenv);    /* protected: it may allocate */
  lua_pcall(L, 0, 0, 0);
  lua_settop(L, 0);
  return r.rc;
}

/* ---------------------------------------------------------------- binding ---- */

#define SANDBOX_MT "flame.sandbox"

typedef struct sbox {
  sandbox *s;
  int busy;                   /* inside sb:call: close must wait */
} sbox;

static sbox *sbox_check(lua_State *L) {
  sbox *b = luaL_checkudata(L, 1, SANDBOX_MT);
  if (b->s == NULL) luaL_error(L, "sandbox is closed");
  return b;
}

static int sbox_close(lua_State *L) {
  sbox *b = luaL_checkudata(L, 1, SANDBOX_MT);
  if (b->busy) return luaL_error(L, "sandbox is busy: it cannot be closed during its call");
  sandbox_close(b->s);
  b->s = NULL;
  return 0;
}

/* One watchdog thread for the whole process pulls the kill switch of runs with a
 * deadline (sb:call's timeout, the steps of backend states): a run registers its
 * deadline and unregisters when it ends; one still registered at its deadline is
 * killed with its reason. Cheaper than a thread per run (a backend callback runs
 * for every call). Lock order: the watchdog's lock, then a sandbox's. The thread
 * lives as long as the process. */
typedef struct watch {
  struct watch *prev, *next;
  sandbox *s;
  uint64_t deadline;
  int reason;
} watch;

static uv_once_t watchdog_once = UV_ONCE_INIT;
static uv_mutex_t watchdog_lock;
static uv_cond_t watchdog_cond;
static watch watchdog_list = { &watchdog_list, &watchdog_list, NULL, 0, 0 };
static int watchdog_ok;

static void watchdog_main(void *arg) {
  (void)arg;
  uv_mutex_lock(&watchdog_lock);
  for (;;) {
    uint64_t now = uv_hrtime(), next = 0;
    for (watch *w = watchdog_list.next; w != &watchdog_list; w = w->next) {
      if (w->deadline <= now) {
        if (w->s) sandbox_kill(w->s, w->reason);
        w->s = NULL;                         /* fired once; the step unlinks it */
      } else if (next == 0 || w->deadline < next) {
        next = w->deadline;
      }
    }
    if (next == 0) uv_cond_wait(&watchdog_cond, &watchdog_lock);
    else uv_cond_timedwait(&watchdog_cond, &watchdog_lock, next - now);
  }
}

static void watchdog_start(void) {
  static uv_thread_t thread;
  if (uv_mutex_init(&watchdog_lock) != 0) return;
  if (uv_cond_init(&watchdog_cond) != 0) return;
  if (uv_thread_create(&thread, watchdog_main, NULL) != 0) return;
  watchdog_ok = 1;
}

/* 0, or -1 when no watchdog could be started (the step then runs unguarded). */
static int watch_begin(watch *w, sandbox *s, lua_Integer ms, int reason) {
  uv_once(&watchdog_once, watchdog_start);
  if (!watchdog_ok) return -1;
  w->s = s;
  w->reason = reason;
  w->deadline = uv_hrtime() + (uint64_t)ms * 1000000u;
  uv_mutex_lock(&watchdog_lock);
  w->next = watchdog_list.next;
  w->prev = &watchdog_list;
  watchdog_list.next->prev = w;
  watchdog_list.next = w;
  uv_cond_signal(&watchdog_cond);
  uv_mutex_unlock(&watchdog_lock);
  return 0;
}

static void watch_end(watch *w) {
  uv_mutex_lock(&watchdog_lock);
  w->prev->next = w->next;
  w->next->prev = w->prev;
  uv_mutex_unlock(&watchdog_lock);
}

int sandbox_resume_bounded(sandbox *s, lua_State *co, int nargs, int *nres, int64_t ms) {
  watch w;
  int watched = ms >= 0 && watch_begin(&w, s, (lua_Integer)ms, SANDBOX_KILL_TIMEOUT) == 0;
  sandbox_rearm(s);
  uv_mutex_lock(&s->lock);
  s->running = co;
  uv_mutex_unlock(&s->lock);
  int rs = lua_resume(co, NULL, nargs, nres);
  uv_mutex_lock(&s->lock);
  s->running = NULL;
  uv_mutex_unlock(&s->lock);
  if (watched) watch_end(&w);
  return rs;
}

int sandbox_pcall_bounded(sandbox *s, int nargs, int nresults, int64_t ms) {
  watch w;
  int watched = ms >= 0 && watch_begin(&w, s, (lua_Integer)ms, SANDBOX_KILL_TIMEOUT) == 0;
  sandbox_rearm(s);
  int st = lua_pcall(s->L, nargs, nresults, 0);
  if (watched) watch_end(&w);
  return st;
}

static int kill_parse(lua_State *L, int t) {
  static const char *const names[] = { "timeout", "cancelled", "shutdown", "killed", NULL };
  lua_getfield(L, t, "reason");
  int r = luaL_checkoption(L, -1, "timeout", names) + 1;
  lua_pop(L, 1);
  return r;
}

/* sb:call(fn [, { timeout = ms, reason = "timeout" }])
 *   -> true, results... | false, kind, message [, traceback [, value]]
 * The function and its captures cross into the sandbox through the codec, the results
 * cross back with functions refused: what flame.call does on a runner. With a
 * timeout, another thread pulls the kill switch when it passes. */
static int sbox_call(lua_State *L) {
  sbox *b = sbox_check(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_Integer ms = -1;
  int reason = SANDBOX_KILL_TIMEOUT;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "timeout");
    if (!lua_isnil(L, -1)) {
      ms = luaL_checkinteger(L, -1);
      luaL_argcheck(L, ms >= 0, 3, "timeout: milliseconds >= 0 expected");
    }
    lua_pop(L, 1);
    reason = kill_parse(L, 3);
  }
  lua_settop(L, 2);
  buf *work = buf_box(L);                    /* both freed by the GC on any error */
  buf *out = buf_box(L);
  lua_rotate(L, 2, 2);                       /* [sb, work, out, fn] */
  codec_opts o;
  codec_opts_init(&o);
  o.root = "work";
  /* the boxes above could run a finalizer that closed this sandbox: from busy on,
   * a close is refused */
  if (b->s == NULL) return luaL_error(L, "sandbox is closed");
  b->busy = 1;
  if (codec_encode(L, 1, &o, work) != 0) {
    b->busy = 0;
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "encode");
    lua_rotate(L, -3, 2);
    return 3;
  }
  sandbox_rearm(b->s);
  watch w;
  int guarded = ms >= 0 && watch_begin(&w, b->s, ms, reason) == 0;
  int rc = ms < 0 || guarded ? sandbox_run(b->s, (const char *)work->data, work->len, out) : 0;
  if (guarded) watch_end(&w);
  b->busy = 0;
  buf_free(work);
  if (ms >= 0 && !guarded) return luaL_error(L, "sandbox: cannot start the watchdog thread");
  if (rc != 0) return luaL_error(L, "sandbox: not enough memory for the results");
  static const struct { int status; const char *kind; } kinds[] = {
    { SANDBOX_ERROR, "remote" }, { SANDBOX_KILLED, "killed" },
    { SANDBOX_ENCODE, "encode" }, { SANDBOX_DECODE, "decode" }, { 0, NULL }
  };
  lua_settop(L, 3);
  int status = out->data[0];
  if (status == SANDBOX_RESULT) lua_pushboolean(L, 1);
  else {
    lua_pushboolean(L, 0);
    for (int i = 0; kinds[i].kind; i++)
      if (kinds[i].status == status) lua_pushstring(L, kinds[i].kind);
  }
  codec_opts_init(&o);
  o.functions = 0;
  int n = codec_decode(L, (const char *)out->data + 1, out->len - 1, &o);
  buf_free(out);
  if (n < 0) {                     /* what the sandbox sent cannot be read here */
    lua_replace(L, 4);
    lua_settop(L, 4);
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "decode");
    lua_rotate(L, 4, 2);
    return 3;
  }
  return lua_gettop(L) - 3;
}

static int sbox_memory(lua_State *L) {
  sbox *b = sbox_check(L);
  lua_pushinteger(L, (lua_Integer)sandbox_memory(b->s));
  return 1;
}

static int sbox_limit(lua_State *L) {
  sbox *b = sbox_check(L);
  lua_pushinteger(L, (lua_Integer)b->s->limit);
  return 1;
}

static int sbox_profile(lua_State *L) {
  sbox *b = sbox_check(L);
  lua_pushstring(L, b->s->profile == SANDBOX_RESTRICTED ? "restricted" : "application");
  return 1;
}

/* sandbox{ profile = "application"|"restricted", memory_limit = bytes } */
static int l_sandbox(lua_State *L) {
  sandbox_config c = { SANDBOX_APPLICATION, 0, NULL, NULL, 0, NULL, NULL };
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
      if (strcmp(k, "profile") == 0) {
        if (lua_type(L, -1) != LUA_TSTRING
            || sandbox_profile_parse(lua_tostring(L, -1), &c.profile) != 0)
          return luaL_error(L, "sandbox: bad option 'profile' (\"application\", "
                               "\"restricted\" or \"backend\" expected)");
      } else if (strcmp(k, "path") == 0) {
        c.path = luaL_checkstring(L, -1);    /* kept alive by the options table */
      } else if (strcmp(k, "memory_limit") == 0) {
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < 0)
          return luaL_error(L, "sandbox: bad option 'memory_limit' (bytes >= 0 expected)");
        c.memory_limit = (size_t)v;
      } else {
        return luaL_error(L, "sandbox: unknown option '%s'", luaL_tolstring(L, -2, NULL));
      }
      lua_pop(L, 1);
    }
  }
  sbox *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, SANDBOX_MT);
  const char *err;
  b->s = sandbox_new(&c, &err);
  if (b->s == NULL) return luaL_error(L, "sandbox: %s", err);
  return 1;
}

void flame_sandbox_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "call", sbox_call },
    { "memory", sbox_memory }, { "memory_limit", sbox_limit },
    { "profile", sbox_profile }, { "close", sbox_close }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, SANDBOX_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, sbox_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, sbox_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_sandbox);
  lua_setfield(L, -2, "sandbox");
}
