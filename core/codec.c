/*
 * codec.c - Lua values to bytes and back (contract in codec.h, format in
 * docs/codec.md). The encoder walks values depth first, giving every table and
 * Lua function an id the first time it meets it, so later meetings become
 * references and cycles and sharing survive. The decoder reads like lundump.c:
 * one reader, one checked take, one error format, limits before every allocation.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <math.h>

#include <lua.h>
#include <lauxlib.h>

#include "flame.h"
#include "codec.h"

enum {
  T_NIL, T_FALSE, T_TRUE, T_INT, T_FLOAT, T_STR, T_TABLE, T_TABLE_MT, T_REF,
  T_ENV, T_NAME, T_FUNC, T_MODULE
};
enum { U_VALUE, U_SHARED };                 /* how one upvalue of a function travels */

#define CODEC_MAGIC0 'F'
#define CODEC_MAGIC1 'L'
#define CODEC_NAME_MAX 256                  /* longest library name ("string.format") */
#define CODEC_MT_NAME_MAX 256
#define CODEC_STRING_REF 32                 /* strings this long travel once, then
                                               as references (both sides agree) */

static const char NAMES_KEY[] = "flame.codec.names";
#define CODEC_PATH_MAX 1024                 /* "app.util" NUL "sub" NUL "resize" */
#define MODS_DEPTH 3                        /* fields followed below a module */
#define MODS_VISITS 20000                   /* fields looked at, at most, per module */
#define MODS_SYNC "\2"                      /* the same, in a Lua-file module: by name only
                                               where code_sync ships it (opts.synced) */
#define MODS_MARK "\1"                      /* a module's path in the index, not a library
                                               name (no name starts with it) */
static const char MTS_KEY[] = "flame.codec.mt";

/* The libraries whose C functions and tables travel by name. */
static const char *const codec_libs[] = {
  "_G", "string", "table", "math", "utf8", "coroutine", "os", "io", "debug",
  "package", NULL
};

void codec_opts_init(codec_opts *o) {
  o->functions = 1;
  o->env = 0;
  o->root = "value";
  o->max_depth = CODEC_MAX_DEPTH;
  o->max_size = CODEC_DEFAULT_MAX_SIZE;
  o->max_items = CODEC_DEFAULT_MAX_ITEMS;
  o->modules = 0;
  o->synced = 0;
}

/* [-0, +1, m] The registry table at key, created empty on first use. */
static void registry_table(lua_State *L, const char *key) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, key);
}

/* [-0, +1, m] The state's library names: a table mapping each standard library
 * C function and library table to its name ("string.format", "print", "math"),
 * and each name back to its value. Built once per state from package.loaded with
 * raw access only (no metamethod of the state's runs), so a sandbox names what it
 * has. Sandboxes build it before any work runs (codec_names). */
static int is_mod_path(const char *name) {
  return name[0] == MODS_MARK[0] || name[0] == MODS_SYNC[0];
}

static void names_push(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, NAMES_KEY) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  int names = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  int loaded = lua_gettop(L);
  for (const char *const *lib = codec_libs; *lib; lib++) {
    if (!lua_istable(L, loaded)) break;
    lua_pushstring(L, *lib);
    if (lua_rawget(L, loaded) != LUA_TTABLE) {
      lua_pop(L, 1);
      continue;
    }
    int t = lua_gettop(L);
    int global = strcmp(*lib, "_G") == 0;
    if (!global) {
      lua_pushvalue(L, t);
      lua_pushstring(L, *lib);
      lua_rawset(L, names);
      lua_pushstring(L, *lib);
      lua_pushvalue(L, t);
      lua_rawset(L, names);
    }
    lua_pushnil(L);
    while (lua_next(L, t)) {
      /* a global named like a module path ("\1...") would be read as one */
      if (lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1)
          && !(global && is_mod_path(lua_tostring(L, -2)))) {
        lua_pushvalue(L, -1);
        if (lua_rawget(L, names) == LUA_TNIL) {      /* first name wins */
          lua_pop(L, 1);
          if (global) lua_pushvalue(L, -2);
          else lua_pushfstring(L, "%s.%s", *lib, lua_tostring(L, -2));
          lua_pushvalue(L, -2);                        /* name -> function */
          lua_pushvalue(L, -2);
          lua_insert(L, -2);
          lua_rawset(L, names);
          lua_pushvalue(L, -2);                        /* function -> name */
          lua_insert(L, -2);
          lua_rawset(L, names);
        } else {
          lua_pop(L, 1);
        }
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_pushvalue(L, names);
  lua_setfield(L, LUA_REGISTRYINDEX, NAMES_KEY);
}

void codec_names(lua_State *L) {
  names_push(L);
  lua_pop(L, 1);
}

static int is_lib(const char *name) {
  for (const char *const *lib = codec_libs; *lib; lib++)
    if (strcmp(*lib, name) == 0) return 1;
  return 0;
}


/* A module name or field key that can be part of a path. */
static int path_part(lua_State *L, int idx, size_t most) {
  size_t len;
  if (lua_type(L, idx) != LUA_TSTRING) return 0;
  const char *s = lua_tolstring(L, idx, &len);
  return len > 0 && len <= most && memchr(s, '\0', len) == NULL;
}

/* What tells one package.loaded from another cheaply: its names and values'
 * identities, mixed. The index is rebuilt when it changes (a module loaded or
 * replaced); a field added to a loaded module later is not seen until then. */
static lua_Integer mods_fingerprint(lua_State *L, int loaded) {
  uint64_t h = 1469598103934665603u;
  lua_pushnil(L);
  while (lua_next(L, loaded)) {
    h = (h ^ (uint64_t)(uintptr_t)lua_topointer(L, -1)) * 1099511628211u;
    h = (h ^ (uint64_t)(uintptr_t)lua_topointer(L, -2)) * 1099511628211u;
    lua_pop(L, 1);
  }
  return (lua_Integer)h;
}

/* The globals or package.loaded: reachable from a module (M.env = _G), but what is
 * in them is not the module's (a global of the main chunk would get its path). */
static int is_shared(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  int same = lua_rawequal(L, -1, idx);
  lua_pop(L, 1);
  if (same) return 1;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  same = lua_rawequal(L, -1, idx);
  lua_pop(L, 1);
  return same;
}

static void mods_cache(lua_State *L);

/* Whether the module name of path p (after its mark, up to its first NUL) is one a
 * receiver can require: a file on package.path or package.cpath has it (cjson, not
 * an alias package.loaded.json = cjson). Cached per name in the cache's [7]. */
static int mods_findable(lua_State *L, const char *p, size_t len) {
  luaL_checkstack(L, 8, "codec: module index");
  int top = lua_gettop(L);
  const char *nul = memchr(p + 1, '\0', len - 1);
  lua_pushlstring(L, p + 1, nul ? (size_t)(nul - p - 1) : len - 1);
  int name = lua_gettop(L);
  mods_cache(L);
  if (lua_rawgeti(L, -1, 7) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, 7);
  }
  int seen = lua_gettop(L);
  lua_pushvalue(L, name);
  if (lua_rawget(L, seen) == LUA_TBOOLEAN) {
    int yes = lua_toboolean(L, -1);
    lua_settop(L, top);
    return yes;
  }
  int yes = 0;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_istable(L, -1) && lua_getfield(L, -1, "package") == LUA_TTABLE) {
    int pkg = lua_gettop(L);
    for (int i = 0; i < 2 && !yes; i++) {
      lua_getfield(L, pkg, "searchpath");
      lua_pushvalue(L, name);
      lua_getfield(L, pkg, i == 0 ? "path" : "cpath");
      yes = lua_isfunction(L, -3) && lua_type(L, -1) == LUA_TSTRING
            && lua_pcall(L, 2, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING;
      lua_settop(L, pkg);
    }
  }
  lua_pushvalue(L, name);
  lua_pushboolean(L, yes);
  lua_rawset(L, seen);
  lua_settop(L, top);
  return yes;
}

/* Path a is better than b: in a module every runner resolves (MODS_MARK) before one
 * code_sync may not have shipped (MODS_SYNC), then fewer steps, then a module a
 * receiver can require before an alias, then byte order. So a value reachable in
 * several ways (cjson.encode, app.json.encode, package.loaded.json = cjson) gets
 * the same path whatever order package.loaded is walked in. */
static int mods_better(lua_State *L, const char *a, size_t al, const char *b, size_t bl) {
  if (a[0] != b[0]) return a[0] == MODS_MARK[0];
  size_t da = 0, db = 0;
  for (size_t i = 0; i < al; i++) da += a[i] == '\0';
  for (size_t i = 0; i < bl; i++) db += b[i] == '\0';
  if (da != db) return da < db;
  int fa = mods_findable(L, a, al), fb = mods_findable(L, b, bl);
  if (fa != fb) return fa;
  int c = memcmp(a, b, al < bl ? al : bl);
  return c < 0 || (c == 0 && al < bl);
}

/* index[value at v] = the path at path, unless it has a better one already. */
static void mods_put(lua_State *L, int index, int v, int path) {
  v = lua_absindex(L, v);
  path = lua_absindex(L, path);
  lua_pushvalue(L, v);
  if (lua_rawget(L, index) == LUA_TSTRING) {
    size_t ol, nl;
    const char *old = lua_tolstring(L, -1, &ol);
    const char *now = lua_tolstring(L, path, &nl);
    int keep = !(is_mod_path(old) && mods_better(L, now, nl, old, ol));
    lua_pop(L, 1);
    if (keep) return;
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, v);
  lua_pushvalue(L, path);
  lua_rawset(L, index);
}

/* Fields of the table at t, whose path is at t - 1: C functions and userdata get
 * their path; tables are followed to MODS_DEPTH. With all (a Lua-file module's
 * fields), Lua functions and the tables themselves get theirs too. */
static void mods_walk(lua_State *L, int index, int t, int depth, int *visits, int all) {
  luaL_checkstack(L, 6, "codec: module index");
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (++*visits > MODS_VISITS) {
      lua_pop(L, 2);
      return;
    }
    if (path_part(L, -2, 64)) {
      int vt = lua_type(L, -1);
      int named = (vt == LUA_TFUNCTION && (all || lua_iscfunction(L, -1)))
                  || vt == LUA_TUSERDATA || vt == LUA_TLIGHTUSERDATA;
      int shared = vt == LUA_TTABLE && is_shared(L, -1);
      int follow = vt == LUA_TTABLE && depth < MODS_DEPTH && !shared;
      if (named || follow || (all && vt == LUA_TTABLE && !shared)) {
        lua_pushvalue(L, t - 1);                         /* the prefix */
        lua_pushlstring(L, "\0", 1);
        lua_pushvalue(L, -4);                            /* the key */
        lua_concat(L, 3);                                /* [.. k v path] */
        if (named || all) mods_put(L, index, -2, -1);
        if (follow) {
          lua_pushvalue(L, -2);                          /* [.. k v path v] */
          mods_walk(L, index, lua_gettop(L), depth + 1, visits, all);
          lua_pop(L, 1);
        }
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
}

/* The module index's cache, one table per state at the address of MODS_CACHE in
 * the registry: [1] the index, [2] the version it was built for, [3] true when
 * package.loaded is hooked, [4] the hook's count of modules added, [5] the hook's
 * metatable, [6] which module names are Lua files (mods_pure_lua). */
static char MODS_CACHE;                  /* its address is the key */
/* The index itself while package.loaded is hooked and no module was added since it
 * was built (the hook drops it): what most encodes look up. */
/* A program that sets a metatable of its own on package.loaded later takes the hook
 * away: a C function or userdata the index then misses makes the encoder build it
 * again (e_mark_again), and from then on the fingerprint keeps it current. */
static char MODS_INDEX;

static void mods_cache(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &MODS_CACHE) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_createtable(L, 5, 0);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &MODS_CACHE);
}

/* package.loaded's __newindex (upvalue: the cache): a new module, as require
 * stores it, counts as a change of package.loaded. */
static int mods_newindex(lua_State *L) {
  lua_settop(L, 3);
  lua_rawset(L, 1);
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &MODS_INDEX);
  lua_rawgeti(L, lua_upvalueindex(1), 4);
  lua_Integer n = lua_tointeger(L, -1);
  lua_pushinteger(L, n + 1);
  lua_rawseti(L, lua_upvalueindex(1), 4);
  return 0;
}

/* Which package.loaded the index was built for, cheaply: with package.loaded
 * hooked (by us, when it had no metatable), the count its __newindex keeps; else a
 * fingerprint of its names and values, O(modules) per encode. *hooked says which. */
static lua_Integer mods_version(lua_State *L, int cache, int loaded, int *hooked) {
  if (!lua_getmetatable(L, loaded)) {
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, cache);
    lua_pushcclosure(L, mods_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, -1);
    lua_rawseti(L, cache, 5);
    lua_setmetatable(L, loaded);
    *hooked = 1;
  } else {
    lua_rawgeti(L, cache, 5);
    *hooked = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (!*hooked) return mods_fingerprint(L, loaded);
  lua_rawgeti(L, cache, 4);
  lua_Integer n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return n;
}

/* The index is stale: the next mods_push builds it again. */
static void mods_invalidate(lua_State *L) {
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &MODS_INDEX);
  mods_cache(L);
  lua_pushnil(L);
  lua_rawseti(L, -2, 2);
  lua_pop(L, 1);
}

/* Whether path (as the index has it) still leads to the value at idx in this
 * state's package.loaded: a module replaced or removed since the index was built
 * is found out here. */
static int mods_current(lua_State *L, int idx, const char *path, size_t len) {
  luaL_checkstack(L, 4, "codec: module index");
  int top = lua_gettop(L);
  const char *end = path + len, *k = path;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  for (;;) {
    const char *nul = memchr(k, '\0', (size_t)(end - k));
    size_t klen = nul ? (size_t)(nul - k) : (size_t)(end - k);
    if (!lua_istable(L, -1)) break;
    lua_pushlstring(L, k, klen);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    if (nul == NULL) break;
    k = nul + 1;
  }
  int same = lua_rawequal(L, -1, idx);
  lua_settop(L, top);
  return same;
}

/* Whether the module named at name_idx is a Lua file on this state's package.path
 * (package.searchpath finds it), flame aside: such a module's table still travels by
 * value, as before modules travelled by name, because a runner need not have the
 * file (a container's image has none of the application's modules) until code_sync
 * ships them. C modules (cjson), modules no file made, and flame (every worker has
 * its own) travel by name. Cached per name in the cache's [6]. */
static int mods_pure_lua(lua_State *L, int cache, int loaded, int name_idx) {
  name_idx = lua_absindex(L, name_idx);
  luaL_checkstack(L, 6, "codec: module index");
  int top = lua_gettop(L);
  if (strcmp(lua_tostring(L, name_idx), "flame") == 0) return 0;
  if (lua_rawgeti(L, cache, 6) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, cache, 6);
  }
  lua_pushvalue(L, name_idx);
  if (lua_rawget(L, -2) == LUA_TBOOLEAN) {
    int pure = lua_toboolean(L, -1);
    lua_settop(L, top);
    return pure;
  }
  lua_pop(L, 1);
  int pure = 0;
  lua_pushliteral(L, "package");
  if (lua_rawget(L, loaded) == LUA_TTABLE) {              /* [seen package] */
    lua_getfield(L, -1, "searchpath");
    lua_getfield(L, -2, "path");
    if (lua_iscfunction(L, -2) && lua_type(L, -1) == LUA_TSTRING) {
      lua_pushvalue(L, name_idx);
      lua_insert(L, -2);                                  /* [.. searchpath name path] */
      pure = lua_pcall(L, 2, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING;
    }
  }
  lua_settop(L, top + 1);                                 /* [seen] */
  lua_pushvalue(L, name_idx);
  lua_pushboolean(L, pure);
  lua_rawset(L, -3);
  lua_settop(L, top);
  return pure;
}

/* [-0, +1, m] The state's index of what travels by name, for the encoder: the
 * library names (value -> "string.format", as names_push has them), then each table
 * that is package.loaded[name] (the standard libraries and Lua files aside, see
 * mods_pure_lua) -> MODS_MARK "name", each C function or userdata reachable from one
 * -> MODS_MARK "name\0key\0key". One table, so that a value costs the encoder one
 * lookup, as before modules travelled by name. Lua functions are not in it: they
 * travel as bytecode. */
static void mods_push(lua_State *L) {
  luaL_checkstack(L, 10, "codec: module index");
  /* the common case, one lookup (every encode that meets a table comes here): an
   * index the hook has not dropped since it was built */
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &MODS_INDEX) == LUA_TTABLE) return;
  lua_pop(L, 1);
  mods_cache(L);
  int cache = lua_gettop(L);

  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  int loaded = lua_gettop(L);
  if (!lua_istable(L, loaded)) {
    lua_pop(L, 2);
    names_push(L);
    return;
  }
  int hooked;
  lua_Integer fp = mods_version(L, cache, loaded, &hooked);
  if (lua_rawgeti(L, cache, 2) == LUA_TNUMBER && lua_tointeger(L, -1) == fp
      && lua_rawgeti(L, cache, 3) == LUA_TBOOLEAN && lua_toboolean(L, -1) == hooked
      && lua_rawgeti(L, cache, 1) == LUA_TTABLE) {
    lua_replace(L, cache);
    lua_settop(L, cache);
    return;
  }
  lua_settop(L, loaded);
  lua_newtable(L);
  int index = lua_gettop(L);
  lua_createtable(L, 0, 1);                  /* weak keys: the index keeps no module's
                                                value alive once it is unloaded */
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, index);
  names_push(L);                      /* the library names first: one lookup a value */
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, index);
    } else {
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  /* the modules, those that are Lua files after the others (and marked apart): a
   * value in both is named by the module every runner can resolve */
  for (int pure = 0; pure <= 1; pure++) {
    lua_pushnil(L);
    while (lua_next(L, loaded)) {
      if (path_part(L, -2, CODEC_NAME_MAX) && !is_lib(lua_tostring(L, -2))
          && lua_type(L, -1) == LUA_TTABLE && mods_pure_lua(L, cache, loaded, -2) == pure) {
        if (pure) lua_pushliteral(L, MODS_SYNC);
        else lua_pushliteral(L, MODS_MARK);
        lua_pushvalue(L, -3);
        lua_concat(L, 2);
        mods_put(L, index, -2, -1);
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
  }
  int visits = 0;
  for (int pure = 0; pure <= 1; pure++) {                /* then what is in them */
    lua_pushnil(L);
    while (lua_next(L, loaded)) {
      if (path_part(L, -2, CODEC_NAME_MAX) && !is_lib(lua_tostring(L, -2))
          && lua_type(L, -1) == LUA_TTABLE && mods_pure_lua(L, cache, loaded, -2) == pure) {
        if (pure) lua_pushliteral(L, MODS_SYNC);
        else lua_pushliteral(L, MODS_MARK);
        lua_pushvalue(L, -3);
        lua_concat(L, 2);
        lua_pushvalue(L, -2);                            /* [k v "\1name" v] */
        visits = 0;                           /* each module its own budget: a big one
                                                 does not hide the others' functions */
        mods_walk(L, index, lua_gettop(L), 1, &visits, pure);
        lua_pop(L, 2);
      }
      lua_pop(L, 1);
    }
  }
  lua_pushvalue(L, index);
  lua_rawseti(L, cache, 1);
  lua_pushinteger(L, fp);
  lua_rawseti(L, cache, 2);
  lua_pushboolean(L, hooked);
  lua_rawseti(L, cache, 3);
  if (hooked) {
    lua_pushvalue(L, index);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &MODS_INDEX);
  }
  lua_replace(L, cache);
  lua_settop(L, cache);
}

void codec_register(lua_State *L, const char *name, int mtidx) {
  mtidx = lua_absindex(L, mtidx);
  registry_table(L, MTS_KEY);
  lua_pushstring(L, name);
  lua_pushvalue(L, mtidx);
  lua_rawset(L, -3);
  lua_pushvalue(L, mtidx);
  lua_pushstring(L, name);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

/* ---------------------------------------------------------------- encoder ---- */

enum { SEG_INDEX, SEG_FIELD, SEG_KEY, SEG_UPVALUE };

typedef struct seg {
  int kind;
  int idx;                /* FIELD: stack index of the key; UPVALUE: of the function */
  lua_Integer n;          /* INDEX: array position; UPVALUE: upvalue number */
} seg;

typedef struct enc {
  lua_State *L;
  buf *out;
  const codec_opts *o;
  int seen, upvals, names, mts, env, globals;   /* stack indices of scratch tables */
  int synced;             /* stack index of opts.synced's set of module names, or 0 */
  int indexed;            /* names holds mods_push's index (not only the library names) */
  int rebuilt;            /* the index was built again in this encode, after a miss */
  lua_Integer nextid;
  int depth, valueno, nseg;
  seg path[CODEC_MAX_DEPTH + 2];
} enc;

/* [-0, +1, m] The path to the value being encoded, as a reader would write it. */
static void e_pushpath(enc *E) {
  lua_State *L = E->L;
  luaL_checkstack(L, 6, "codec path");
  if (strstr(E->o->root, "%d")) {           /* the name is data, never a format */
    char n[32];
    snprintf(n, sizeof n, "%d", E->valueno);
    luaL_gsub(L, E->o->root, "%d", n);
  } else {
    lua_pushstring(L, E->o->root);
  }
  int wrapped = 0;
  for (int i = 0; i < E->nseg; i++) {
    const seg *s = &E->path[i];
    if (s->kind == SEG_UPVALUE) {
      const char *name = lua_getupvalue(L, s->idx, (int)s->n);
      lua_pop(L, 1);
      if (name == NULL || *name == '\0' || *name == '(') name = "?";
      lua_pushfstring(L, "upvalue '%s' of %s", name, lua_tostring(L, -1));
      wrapped = 1;
    } else if (s->kind == SEG_KEY) {
      lua_pushfstring(L, "a key in %s", lua_tostring(L, -1));
      wrapped = 1;
    } else {
      if (wrapped) {
        lua_pushfstring(L, "(%s)", lua_tostring(L, -1));
        lua_remove(L, -2);
        wrapped = 0;
      }
      if (s->kind == SEG_INDEX) {
        lua_pushfstring(L, "%s[%I]", lua_tostring(L, -1), (LUAI_UACINT)s->n);
      } else {
        int k = s->idx;
        switch (lua_type(L, k)) {
          case LUA_TSTRING: {
            const char *key = lua_tostring(L, k);
            int ident = (*key != '\0' && !(*key >= '0' && *key <= '9'));
            for (const char *c = key; *c && ident; c++)
              ident = (*c == '_' || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')
                       || (*c >= '0' && *c <= '9'));
            if (ident) lua_pushfstring(L, "%s.%s", lua_tostring(L, -1), key);
            else lua_pushfstring(L, "%s[\"%s\"]", lua_tostring(L, -1), key);
            break;
          }
          case LUA_TNUMBER:
            if (lua_isinteger(L, k))
              lua_pushfstring(L, "%s[%I]", lua_tostring(L, -1),
                              (LUAI_UACINT)lua_tointeger(L, k));
            else
              lua_pushfstring(L, "%s[%f]", lua_tostring(L, -1),
                              (LUAI_UACNUMBER)lua_tonumber(L, k));
            break;
          case LUA_TBOOLEAN:
            lua_pushfstring(L, "%s[%s]", lua_tostring(L, -1),
                            lua_toboolean(L, k) ? "true" : "false");
            break;
          default:
            lua_pushfstring(L, "%s[<%s>]", lua_tostring(L, -1), luaL_typename(L, k));
        }
      }
    }
    lua_remove(L, -2);
  }
}

static FLAME_NORETURN void e_fail(enc *E, const char *what) {
  e_pushpath(E);
  lua_pushfstring(E->L, ": %s", what);
  lua_concat(E->L, 2);
  lua_error(E->L);
  flame_unreachable();
}

static void e_bytes(enc *E, const void *p, size_t n) {
  if (buf_append(E->out, p, n) != 0) luaL_error(E->L, "not enough memory");
}

static void e_byte(enc *E, int c) {
  if (buf_byte(E->out, (unsigned char)c) != 0) luaL_error(E->L, "not enough memory");
}

/* LEB128: 7 bits a byte, low first; at most 10 bytes for 64 bits. */
static size_t varint_put(unsigned char *b, uint64_t v) {
  size_t n = 0;
  do {
    b[n] = (unsigned char)(v & 0x7f);
    v >>= 7;
    if (v) b[n] |= 0x80;
    n++;
  } while (v);
  return n;
}

static void e_varint(enc *E, uint64_t v) {
  unsigned char b[10];
  e_bytes(E, b, varint_put(b, v));
}

static void e_u64le(enc *E, uint64_t v) {
  unsigned char b[8];
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
  e_bytes(E, b, 8);
}

static void e_string(enc *E, const char *s, size_t len) {
  e_varint(E, len);
  e_bytes(E, s, len);
}

static void e_push(enc *E, int kind, int idx, lua_Integer n) {
  seg *s = &E->path[E->nseg++];
  s->kind = kind;
  s->idx = idx;
  s->n = n;
}

static void e_enter(enc *E) {
  if (++E->depth > E->o->max_depth) {
    char msg[64];
    snprintf(msg, sizeof msg, "nested deeper than %d levels", E->o->max_depth);
    e_fail(E, msg);
  }
  luaL_checkstack(E->L, 8, "codec: nesting");
}

/* Whether the module of path (name, then "\0" and keys) is in opts.synced. */
static int e_synced(enc *E, const char *path, size_t len) {
  if (!E->synced) return 0;
  const char *nul = memchr(path, '\0', len);
  lua_pushlstring(E->L, path, nul ? (size_t)(nul - path) : len);
  int yes = lua_rawget(E->L, E->synced) != LUA_TNIL && lua_toboolean(E->L, -1);
  lua_pop(E->L, 1);
  return yes;
}

/* Values that travel as a mark: the environment, a library name, or a reference
 * to a table or function met before. Returns 1 when idx was written. */
static int e_mark(enc *E, int idx) {
  lua_State *L = E->L;
  if (lua_rawequal(L, idx, E->globals) || (E->env && lua_rawequal(L, idx, E->env))) {
    e_byte(E, T_ENV);
    return 1;
  }
  if (lua_type(L, idx) != LUA_TSTRING) {
    int vt = lua_type(L, idx);
    /* a Lua function has no name, unless it is in a module code_sync ships */
    if (vt != LUA_TFUNCTION || lua_iscfunction(L, idx) || E->synced) {
      if (!E->indexed) {                   /* built (or found current) once per encode */
        mods_push(L);
        lua_replace(L, E->names);
        E->indexed = 1;
      }
      lua_pushvalue(L, idx);
      if (lua_rawget(L, E->names) == LUA_TSTRING) {
        size_t len;
        const char *name = lua_tolstring(L, -1, &len);
        if (!is_mod_path(name)) {                         /* a library's */
          e_byte(E, T_NAME);
          e_string(E, name, len);
          lua_pop(L, 1);
          return 1;
        }
        if (!mods_current(L, idx, name + 1, len - 1)) {   /* replaced since: again */
          lua_pop(L, 1);
          mods_invalidate(L);
          mods_push(L);
          lua_replace(L, E->names);
          lua_pushvalue(L, idx);
          if (lua_rawget(L, E->names) != LUA_TSTRING) {
            lua_pop(L, 1);
            goto not_module;
          }
          name = lua_tolstring(L, -1, &len);
          if (!is_mod_path(name)) {
            e_byte(E, T_NAME);
            e_string(E, name, len);
            lua_pop(L, 1);
            return 1;
          }
        }
        if (name[0] == MODS_SYNC[0] && !e_synced(E, name + 1, len - 1)) {
          lua_pop(L, 1);                                  /* the runner lacks its file */
          goto not_module;
        }
        e_byte(E, T_MODULE);                              /* a module, or in one */
        e_string(E, name + 1, len - 1);
        lua_pop(L, 1);
        return 1;
      }
      lua_pop(L, 1);
    }
  not_module:
    lua_pushvalue(L, idx);
  } else {                    /* long strings by identity: cheap, no hashing */
    lua_pushlightuserdata(L, (void *)lua_topointer(L, idx));
  }
  if (lua_rawget(L, E->seen) == LUA_TNUMBER) {
    e_byte(E, T_REF);
    e_varint(E, (uint64_t)lua_tointeger(L, -1));
    lua_pop(L, 1);
    return 1;
  }
  lua_pop(L, 1);
  return 0;
}

static lua_Integer e_remember(enc *E, int idx) {
  if (lua_type(E->L, idx) == LUA_TSTRING)
    lua_pushlightuserdata(E->L, (void *)lua_topointer(E->L, idx));
  else
    lua_pushvalue(E->L, idx);
  lua_pushinteger(E->L, E->nextid);
  lua_rawset(E->L, E->seen);
  return E->nextid++;
}

static void e_value(enc *E, int idx);

static int is_array_key(lua_State *L, int k, lua_Integer narr) {
  if (!lua_isinteger(L, k)) return 0;
  lua_Integer i = lua_tointeger(L, k);
  return i >= 1 && i <= narr;
}

static void e_table(enc *E, int idx) {
  lua_State *L = E->L;
  if (e_mark(E, idx)) return;
  e_enter(E);
  int tag = T_TABLE;
  if (lua_getmetatable(L, idx)) {
    if (lua_rawget(L, E->mts) != LUA_TSTRING)
      e_fail(E, "table with a metatable cannot be sent (register the metatable by name "
                "on both sides: flame.codec.register(name, mt))");
    tag = T_TABLE_MT;
  }
  e_remember(E, idx);
  lua_Integer narr = 0, nhash = 0;
  while (lua_rawgeti(L, idx, narr + 1) != LUA_TNIL) {
    lua_pop(L, 1);
    narr++;
  }
  lua_pop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!is_array_key(L, -1, narr)) nhash++;
  }
  e_byte(E, tag);
  if (tag == T_TABLE_MT) {
    size_t len;
    const char *name = lua_tolstring(L, -1, &len);
    e_string(E, name, len);
    lua_pop(L, 1);
  }
  e_varint(E, (uint64_t)narr);
  e_varint(E, (uint64_t)nhash);
  for (lua_Integer i = 1; i <= narr; i++) {
    lua_rawgeti(L, idx, i);
    e_push(E, SEG_INDEX, 0, i);
    e_value(E, lua_gettop(L));
    E->nseg--;
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int v = lua_gettop(L), k = v - 1;
    if (!is_array_key(L, k, narr)) {
      e_push(E, SEG_KEY, 0, 0);
      e_value(E, k);
      E->nseg--;
      e_push(E, SEG_FIELD, k, 0);
      e_value(E, v);
      E->nseg--;
    }
    lua_pop(L, 1);
  }
  E->depth--;
}

static int e_writer(lua_State *L, const void *p, size_t n, void *ud) {
  (void)L;
  return buf_append(((enc *)ud)->out, p, n) != 0;
}

static int count_upvalues(lua_State *L, int idx) {
  int n = 0;
  while (lua_getupvalue(L, idx, n + 1) != NULL) {
    lua_pop(L, 1);
    n++;
  }
  return n;
}

/* A C function or userdata the index does not know: a module replaced under its
 * name, or a field added to one, since the index was built. Built again once per
 * encode before the value is refused. 1 when it was found then. */
static int e_mark_again(enc *E, int idx) {
  if (E->rebuilt) return 0;
  E->rebuilt = 1;
  mods_invalidate(E->L);
  mods_push(E->L);
  lua_replace(E->L, E->names);
  E->indexed = 1;
  return e_mark(E, idx);
}

static void e_function(enc *E, int idx) {
  lua_State *L = E->L;
  if (!E->o->functions) e_fail(E, "function cannot be sent here");
  if (e_mark(E, idx)) return;
  if (lua_iscfunction(L, idx) && !e_mark_again(E, idx))
    e_fail(E, "C function cannot be sent (only functions of the standard library and of "
              "loaded modules travel, by name)");
  if (lua_iscfunction(L, idx)) return;
  e_enter(E);
  lua_Integer fid = e_remember(E, idx);
  e_byte(E, T_FUNC);
  size_t at = E->out->len;
  e_u64le(E, 0);                            /* bytecode length, patched below */
  lua_pushvalue(L, idx);
  int st = lua_dump(L, e_writer, E, 0);
  lua_pop(L, 1);
  if (st != 0) luaL_error(L, "not enough memory");
  uint64_t len = (uint64_t)(E->out->len - at - 8);
  for (int i = 0; i < 8; i++) E->out->data[at + (size_t)i] = (unsigned char)(len >> (8 * i));
  int nups = count_upvalues(L, idx);
  e_varint(E, (uint64_t)nups);
  for (int i = 1; i <= nups; i++) {
    lua_pushlightuserdata(L, lua_upvalueid(L, idx, i));
    if (lua_rawget(L, E->upvals) == LUA_TNUMBER) {
      lua_Integer where = lua_tointeger(L, -1);
      lua_pop(L, 1);
      e_byte(E, U_SHARED);
      e_varint(E, (uint64_t)(where >> 8));
      e_varint(E, (uint64_t)(where & 0xff));
      continue;
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, lua_upvalueid(L, idx, i));
    lua_pushinteger(L, fid * 256 + i);
    lua_rawset(L, E->upvals);
    e_byte(E, U_VALUE);
    const char *name = lua_getupvalue(L, idx, i);
    if (name && strcmp(name, "_ENV") == 0) {  /* whatever table it is, it is the  */
      e_byte(E, T_ENV);                        /* sender's environment: rebind it */
      lua_pop(L, 1);
      continue;
    }
    e_push(E, SEG_UPVALUE, idx, i);
    e_value(E, lua_gettop(L));
    E->nseg--;
    lua_pop(L, 1);
  }
  E->depth--;
}

static void e_value(enc *E, int idx) {
  lua_State *L = E->L;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: e_byte(E, T_NIL); break;
    case LUA_TBOOLEAN: e_byte(E, lua_toboolean(L, idx) ? T_TRUE : T_FALSE); break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        uint64_t u = (uint64_t)lua_tointeger(L, idx);
        e_byte(E, T_INT);
        e_varint(E, (u << 1) ^ (0 - (u >> 63)));        /* zigzag: small |n|, short */
      } else {
        double d = (double)lua_tonumber(L, idx);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        e_byte(E, T_FLOAT);
        e_u64le(E, bits);
      }
      break;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      if (len >= CODEC_STRING_REF) {       /* met again: a reference, not a copy */
        if (e_mark(E, idx)) break;
        e_remember(E, idx);
      }
      e_byte(E, T_STR);
      e_string(E, s, len);
      break;
    }
    case LUA_TTABLE: e_table(E, idx); break;
    case LUA_TFUNCTION: e_function(E, idx); break;
    case LUA_TTHREAD: e_fail(E, "coroutine cannot be sent");
    default:
      if (e_mark(E, idx) || e_mark_again(E, idx)) break;   /* in a loaded module: by path */
      e_fail(E, "userdata cannot be sent");
  }
}

/* Protected body of codec_encode: [enc*, env|nil, synced|nil, v1 .. vn]. */
static int e_main(lua_State *L) {
  enc *E = lua_touserdata(L, 1);
  int n = lua_gettop(L) - 3;
  E->env = lua_isnil(L, 2) ? 0 : 2;
  E->synced = lua_isnil(L, 3) ? 0 : 3;
  E->nextid = 1;                            /* ids match the decoder's refs[1..] */
  lua_newtable(L);
  E->seen = lua_gettop(L);
  lua_newtable(L);
  E->upvals = lua_gettop(L);
  names_push(L);
  E->names = lua_gettop(L);
  registry_table(L, MTS_KEY);
  E->mts = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  E->globals = lua_gettop(L);
  E->indexed = 0;
  e_byte(E, CODEC_MAGIC0);
  e_byte(E, CODEC_MAGIC1);
  e_byte(E, CODEC_VERSION);
  e_varint(E, (uint64_t)n);
  for (int i = 1; i <= n; i++) {
    E->valueno = i;
    E->nseg = 0;
    e_value(E, 3 + i);
  }
  return 0;
}

int codec_encode(lua_State *L, int n, const codec_opts *o, buf *out) {
  enc E;
  memset(&E, 0, sizeof E);
  E.L = L;
  E.out = out;
  E.o = o;
  int env = o->env ? lua_absindex(L, o->env) : 0;
  int synced = o->synced ? lua_absindex(L, o->synced) : 0;
  int base = lua_gettop(L) - n + 1;
  if (!lua_checkstack(L, 4)) {
    lua_pop(L, n);
    lua_pushliteral(L, "codec: stack overflow");
    return -1;
  }
  lua_pushcfunction(L, e_main);
  lua_pushlightuserdata(L, &E);
  if (env) lua_pushvalue(L, env);
  else lua_pushnil(L);
  if (synced) lua_pushvalue(L, synced);
  else lua_pushnil(L);
  lua_rotate(L, base, 4);
  size_t start = out->len;
  if (lua_pcall(L, n + 3, 0, 0) != LUA_OK) {
    out->len = start;
    return -1;
  }
  return 0;
}

int codec_encode_cstring(buf *out, const char *s) {
  size_t len = strlen(s), at = out->len;
  unsigned char head[5 + 10] = { CODEC_MAGIC0, CODEC_MAGIC1, CODEC_VERSION, 1, T_STR };
  size_t n = 5 + varint_put(head + 5, len);
  if (buf_append(out, head, n) == 0 && buf_append(out, s, len) == 0) return 0;
  out->len = at;
  return -1;
}

static int put_string(buf *out, const char *s) {
  unsigned char head[1 + 10] = { T_STR };
  size_t len = strlen(s), n = 1 + varint_put(head + 1, len);
  return buf_append(out, head, n) == 0 && buf_append(out, s, len) == 0 ? 0 : -1;
}

int codec_encode_strings(buf *out, const char *const *kv, int n) {
  size_t at = out->len;
  int count = 0;
  for (int i = 0; i < n; i++) count += kv[2 * i + 1] != NULL;
  unsigned char head[5 + 1 + 10] = { CODEC_MAGIC0, CODEC_MAGIC1, CODEC_VERSION, 1, T_TABLE, 0 };
  size_t hn = 6 + varint_put(head + 6, (uint64_t)count);   /* no array part, count pairs */
  int rc = buf_append(out, head, hn);
  for (int i = 0; rc == 0 && i < n; i++) {
    if (kv[2 * i + 1] == NULL) continue;
    rc = put_string(out, kv[2 * i]);
    if (rc == 0) rc = put_string(out, kv[2 * i + 1]);
  }
  if (rc != 0) out->len = at;
  return rc;
}

/* ---------------------------------------------------------------- decoder ---- */

typedef struct dec {
  lua_State *L;
  const unsigned char *start, *p, *end;
  const codec_opts *o;
  int refs, env, mts, names;
  lua_Integer nrefs;
  int depth;
  size_t items;
  size_t prealloc;        /* table slots we may still reserve ahead: input-bound */
} dec;

typedef struct dreader {
  const char *p;
  size_t n;
} dreader;

static FLAME_NORETURN void d_fail(dec *D, const char *what) {
  luaL_error(D->L, "decode: %s at byte %I", what, (LUAI_UACINT)(D->p - D->start));
  flame_unreachable();
}

static size_t d_left(dec *D) {
  return (size_t)(D->end - D->p);
}

static const unsigned char *d_take(dec *D, size_t n) {
  if (n > d_left(D)) d_fail(D, "truncated input");
  const unsigned char *p = D->p;
  D->p += n;
  return p;
}

static int d_byte(dec *D) {
  return *d_take(D, 1);
}

static uint64_t d_varint(dec *D) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    int b = d_byte(D);
    if (shift == 63 && b > 1) d_fail(D, "varint overflow");
    v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
    if (shift == 63) d_fail(D, "varint overflow");
  }
}

/* A count of things still to read, each at least per bytes long. */
static size_t d_count(dec *D, size_t per, const char *what) {
  uint64_t v = d_varint(D);
  if (v > d_left(D) / per) d_fail(D, what);
  return (size_t)v;
}

static uint64_t d_u64le(dec *D) {
  const unsigned char *b = d_take(D, 8);
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)b[i] << (8 * i);
  return v;
}

static void d_enter(dec *D) {
  if (++D->depth > D->o->max_depth) d_fail(D, "nesting too deep");
  luaL_checkstack(D->L, 8, "decode: nesting");
}

static void d_remember(dec *D) {
  lua_pushvalue(D->L, -1);
  lua_rawseti(D->L, D->refs, ++D->nrefs);
}

static int d_prealloc(dec *D, size_t want) {
  size_t n = want < D->prealloc ? want : D->prealloc;
  if (n > (1u << 24)) n = 1u << 24;
  D->prealloc -= n;
  return (int)n;
}

static void d_value(dec *D);

static void d_table(dec *D, int tag) {
  lua_State *L = D->L;
  int mt = 0;
  d_enter(D);
  if (tag == T_TABLE_MT) {
    size_t len = d_count(D, 1, "metatable name too long");
    if (len > CODEC_MT_NAME_MAX) d_fail(D, "metatable name too long");
    const char *name = (const char *)d_take(D, len);
    lua_pushlstring(L, name, len);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, D->mts) != LUA_TTABLE) {
      lua_pushfstring(L, "metatable '%s' is not registered here", lua_tostring(L, -2));
      d_fail(D, lua_tostring(L, -1));
    }
    lua_remove(L, -2);
    mt = lua_gettop(L);
  }
  size_t narr = d_count(D, 1, "array count larger than the input");
  size_t nhash = d_count(D, 2, "field count larger than the input");
  lua_createtable(L, d_prealloc(D, narr), d_prealloc(D, nhash));
  int t = lua_gettop(L);
  d_remember(D);
  for (size_t i = 1; i <= narr; i++) {
    d_value(D);
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (size_t i = 0; i < nhash; i++) {
    d_value(D);
    if (lua_isnil(L, -1)) d_fail(D, "table key is nil");
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)
        && isnan((double)lua_tonumber(L, -1)))
      d_fail(D, "table key is NaN");
    d_value(D);
    lua_rawset(L, t);
  }
  if (mt) {
    lua_pushvalue(L, mt);
    lua_setmetatable(L, t);
    lua_remove(L, mt);
  }
  D->depth--;
}

/* A library function or table, found in the receiver's own library names (raw, so
 * no code of the receiver runs, and only standard library entries resolve). */
static void d_name(dec *D) {
  lua_State *L = D->L;
  size_t len = d_count(D, 1, "name too long");
  if (len > CODEC_NAME_MAX) d_fail(D, "name too long");
  const char *s = (const char *)d_take(D, len);
  lua_pushlstring(L, s, len);
  lua_pushvalue(L, -1);
  int t = lua_rawget(L, D->names);
  if (t == LUA_TFUNCTION && !D->o->functions) d_fail(D, "functions are refused here");
  if (t != LUA_TTABLE && t != LUA_TFUNCTION) {
    lua_pushfstring(L, "'%s' is not available here", lua_tostring(L, -2));
    d_fail(D, lua_tostring(L, -1));
  }
  lua_remove(L, -2);
}

/* A module by name, or a value in one by its path ("cjson" NUL "encode"): looked up
 * in the receiver's package.loaded (raw: no code of the receiver runs to find it),
 * the module required first when opts.modules allows it (a runner's work). */
static void d_module(dec *D) {
  lua_State *L = D->L;
  size_t len = d_count(D, 1, "truncated input");
  if (len == 0 || len > CODEC_PATH_MAX) d_fail(D, "bad module path");
  const char *s = (const char *)d_take(D, len);
  const char *end = s + len, *nul = memchr(s, '\0', len);
  size_t nlen = nul ? (size_t)(nul - s) : len;
  if (nlen == 0) d_fail(D, "bad module path");
  luaL_checkstack(L, 6, "decode: module");
  int steps = 0;                                        /* what the encoder can write: */
  for (const char *k = nul; k && k < end; k = memchr(k + 1, '\0', (size_t)(end - k - 1)))
    steps++;
  if (steps > MODS_DEPTH) d_fail(D, "bad module path (deeper than a module's index)");
  lua_pushlstring(L, s, nlen);                          /* [name] */
  if (is_lib(lua_tostring(L, -1)))                      /* libraries go by their names */
    d_fail(D, "bad module path (a standard library is not sent as a module)");
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, -2);
  int t = lua_istable(L, -2) ? lua_rawget(L, -2) : LUA_TNIL;   /* [name loaded v] */
  if (t == LUA_TNIL) {
    if (!D->o->modules) {
      lua_pushfstring(L, "module '%s' is not loaded here (what comes back may name only "
                      "modules this program has loaded)", lua_tostring(L, -3));
      d_fail(D, lua_tostring(L, -1));
    }
    lua_pop(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushliteral(L, "require");
    if (lua_rawget(L, -2) != LUA_TFUNCTION) {
      lua_pushfstring(L, "module '%s' is not loaded here, and there is no require",
                      lua_tostring(L, -4));
      d_fail(D, lua_tostring(L, -1));
    }
    lua_remove(L, -2);                                  /* [name loaded require] */
    lua_pushvalue(L, -3);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {              /* [name loaded err] */
      const char *err = lua_tostring(L, -1);
      size_t elen = 0;
      if (err) elen = strcspn(err, "\n");
      lua_pushfstring(L, "module '%s' cannot be loaded here (install it where the work "
                      "runs, or ship a Lua module with the pool's code_sync): %s", lua_tostring(L, -3), err ? "" : "(an error that is "
                      "not a string)");
      if (err) {
        lua_pushlstring(L, err, elen);
        lua_concat(L, 2);
      }
      d_fail(D, lua_tostring(L, -1));
    }
    t = lua_type(L, -1);
  }
  lua_remove(L, -2);                                    /* [name v] */
  for (const char *k = nul; k && k < end; ) {           /* each field of the path */
    k++;
    const char *next = memchr(k, '\0', (size_t)(end - k));
    size_t klen = next ? (size_t)(next - k) : (size_t)(end - k);
    if (klen == 0) d_fail(D, "bad module path");
    if (lua_istable(L, -1) && is_shared(L, -1))
      d_fail(D, "bad module path (it goes through the globals or package.loaded)");
    lua_pushlstring(L, k, klen);                        /* [name v key] */
    t = lua_istable(L, -2) ? lua_rawget(L, -2) : LUA_TNIL;
    if (t == LUA_TNIL) {
      luaL_Buffer b;                                     /* the path, dots for NULs */
      lua_pushnil(L);                                   /* keeps the indices below */
      luaL_buffinit(L, &b);
      for (size_t i = 0; i < len; i++) luaL_addchar(&b, s[i] ? s[i] : '.');
      luaL_pushresult(&b);
      lua_pushfstring(L, "'%s' is not available here (module '%s' has no such field)",
                      lua_tostring(L, -1), lua_tostring(L, -5));
      d_fail(D, lua_tostring(L, -1));
    }
    lua_remove(L, -2);                                  /* [name v'] */
    k = next;
  }
  if (t == LUA_TFUNCTION && !D->o->functions) d_fail(D, "functions are refused here");
  /* only what an index holds: tables, functions, userdata; never the globals or
   * package.loaded (a hostile sender could name them through a module's field) */
  if ((t != LUA_TTABLE && t != LUA_TFUNCTION && t != LUA_TUSERDATA && t != LUA_TLIGHTUSERDATA)
      || (t == LUA_TTABLE && is_shared(L, -1)))
    d_fail(D, "bad module path (it names no module, nor a function, table or userdata "
              "in one)");
  lua_remove(L, -2);                                    /* [v] */
}

/* lua_dump writes the prototype's upvalue count right after the 31-byte header of
 * a Lua 5.4 chunk; this writer keeps those 32 bytes and stops the dump there. */
typedef struct head { unsigned char b[32]; size_t n; } head;

static int head_writer(lua_State *L, const void *p, size_t n, void *ud) {
  head *h = ud;
  (void)L;
  size_t take = n < sizeof h->b - h->n ? n : sizeof h->b - h->n;
  memcpy(h->b + h->n, p, take);
  h->n += take;
  return h->n == sizeof h->b;              /* non-zero: enough, stop dumping */
}

/* The upvalues of a loaded Lua function, or -1 when its closure and its prototype
 * disagree. lua_load sizes the closure from a header byte it does not check against
 * the prototype, and lua_getupvalue and the VM index by the prototype: a mismatch
 * would read past the closure. */
static int d_upvalues(lua_State *L, int f) {
  lua_Debug ar;
  head h;
  h.n = 0;
  lua_pushvalue(L, f);
  lua_getinfo(L, ">u", &ar);
  lua_pushvalue(L, f);
  lua_dump(L, head_writer, &h, 1);
  lua_pop(L, 1);
  if (h.n != sizeof h.b || h.b[31] != ar.nups) return -1;
  return ar.nups;
}

static const char *d_reader(lua_State *L, void *ud, size_t *size) {
  dreader *r = ud;
  (void)L;
  *size = r->n;
  r->n = 0;
  return *size ? r->p : NULL;
}

static void d_function(dec *D) {
  lua_State *L = D->L;
  if (!D->o->functions) d_fail(D, "functions are refused here");
  d_enter(D);
  uint64_t len = d_u64le(D);
  if (len > d_left(D)) d_fail(D, "truncated input");
  dreader r = { (const char *)d_take(D, (size_t)len), (size_t)len };
  if (lua_load(L, d_reader, &r, "=(flame)", "b") != LUA_OK) {
    lua_pushfstring(L, "bad function (%s)", lua_tostring(L, -1));
    d_fail(D, lua_tostring(L, -1));
  }
  int f = lua_gettop(L);
  d_remember(D);
  int nups = d_upvalues(L, f);
  if (nups < 0) d_fail(D, "bad function (upvalues do not match its prototype)");
  if (d_varint(D) != (uint64_t)nups) d_fail(D, "upvalue count does not match the function");
  for (int i = 1; i <= nups; i++) {
    int kind = d_byte(D);
    if (kind == U_VALUE) {
      d_value(D);
      lua_setupvalue(L, f, i);
    } else if (kind == U_SHARED) {
      uint64_t fid = d_varint(D), k = d_varint(D);
      if (fid < 1 || fid > (uint64_t)D->nrefs) d_fail(D, "bad upvalue reference");
      lua_rawgeti(L, D->refs, (lua_Integer)fid);
      if (lua_type(L, -1) != LUA_TFUNCTION || lua_iscfunction(L, -1)
          || k < 1 || k > (uint64_t)d_upvalues(L, lua_gettop(L)))
        d_fail(D, "bad upvalue reference");
      lua_upvaluejoin(L, f, i, -1, (int)k);
      lua_pop(L, 1);
    } else {
      d_fail(D, "bad upvalue kind");
    }
  }
  D->depth--;
}

static void d_value(dec *D) {
  lua_State *L = D->L;
  if (++D->items > D->o->max_items) d_fail(D, "too many values");
  int tag = d_byte(D);
  switch (tag) {
    case T_NIL: lua_pushnil(L); break;
    case T_FALSE: lua_pushboolean(L, 0); break;
    case T_TRUE: lua_pushboolean(L, 1); break;
    case T_INT: {
      uint64_t u = d_varint(D);
      lua_pushinteger(L, (lua_Integer)((u >> 1) ^ (0 - (u & 1))));
      break;
    }
    case T_FLOAT: {
      uint64_t bits = d_u64le(D);
      double d;
      memcpy(&d, &bits, sizeof d);
      lua_pushnumber(L, (lua_Number)d);
      break;
    }
    case T_STR: {
      size_t len = d_count(D, 1, "truncated input");
      lua_pushlstring(L, (const char *)d_take(D, len), len);
      if (len >= CODEC_STRING_REF) d_remember(D);
      break;
    }
    case T_TABLE: case T_TABLE_MT: d_table(D, tag); break;
    case T_REF: {
      uint64_t id = d_varint(D);
      if (id < 1 || id > (uint64_t)D->nrefs) d_fail(D, "bad reference");
      lua_rawgeti(L, D->refs, (lua_Integer)id);
      break;
    }
    case T_ENV: lua_pushvalue(L, D->env); break;
    case T_NAME: d_name(D); break;
    case T_FUNC: d_function(D); break;
    case T_MODULE: d_module(D); break;
    default: d_fail(D, "unknown tag");
  }
}

/* Protected body of codec_decode: [dec*, env|nil] -> values. */
static int d_main(lua_State *L) {
  dec *D = lua_touserdata(L, 1);
  if (lua_isnil(L, 2)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_replace(L, 2);
  }
  D->env = 2;
  lua_newtable(L);
  D->refs = lua_gettop(L);
  registry_table(L, MTS_KEY);
  D->mts = lua_gettop(L);
  names_push(L);
  D->names = lua_gettop(L);
  if ((size_t)(D->end - D->start) > D->o->max_size) {
    lua_pushfstring(L, "decode: input of %I bytes is over the limit of %I",
                    (LUAI_UACINT)(D->end - D->start), (LUAI_UACINT)D->o->max_size);
    return lua_error(L);
  }
  const unsigned char *h = d_take(D, 3);
  if (h[0] != CODEC_MAGIC0 || h[1] != CODEC_MAGIC1) d_fail(D, "not flame codec data");
  if (h[2] != CODEC_VERSION) d_fail(D, "unsupported codec version");
  size_t n = d_count(D, 1, "value count larger than the input");
  int base = lua_gettop(L);
  for (size_t i = 0; i < n; i++) {
    luaL_checkstack(L, 2, "decode: too many values");
    d_value(D);
  }
  if (D->p != D->end) d_fail(D, "trailing bytes");
  return lua_gettop(L) - base;
}

int codec_decode(lua_State *L, const char *data, size_t len, const codec_opts *o) {
  if (!lua_checkstack(L, 3)) return -1;    /* the one case without a message */
  dec D;
  memset(&D, 0, sizeof D);
  D.L = L;
  D.o = o;
  D.start = D.p = (const unsigned char *)data;
  D.end = D.start + len;
  D.prealloc = len / 4;     /* at most ~12 bytes of slots reserved per input byte */
  int env = o->env ? lua_absindex(L, o->env) : 0;
  int top = lua_gettop(L);
  lua_pushcfunction(L, d_main);
  lua_pushlightuserdata(L, &D);
  if (env) lua_pushvalue(L, env);
  else lua_pushnil(L);
  if (lua_pcall(L, 2, LUA_MULTRET, 0) != LUA_OK) return -1;
  return lua_gettop(L) - top;
}

/* ---------------------------------------------------------------- binding ---- */

static int opt_bool(lua_State *L, int t, const char *k, int d) {
  int ty = lua_getfield(L, t, k);
  int v = d;
  if (ty == LUA_TBOOLEAN) v = lua_toboolean(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "bad option '%s' (boolean expected, got %s)", k,
                                      luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

static lua_Integer opt_int(lua_State *L, int t, const char *k, lua_Integer d,
                           lua_Integer lo, lua_Integer hi) {
  int ty = lua_getfield(L, t, k);
  lua_Integer v = d;
  if (ty != LUA_TNIL) {
    int ok;
    v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < lo || v > hi)
      luaL_error(L, "bad option '%s' (integer in [%I, %I] expected)", k, (LUAI_UACINT)lo,
                 (LUAI_UACINT)hi);
  }
  lua_pop(L, 1);
  return v;
}

/* Reads the options table at t (or nil) into o; misuse raises. */
static void opts_read(lua_State *L, int t, codec_opts *o, int encoding) {
  codec_opts_init(o);
  if (!encoding) o->functions = 0;          /* decoding code is opt-in */
  if (lua_isnoneornil(L, t)) return;
  luaL_checktype(L, t, LUA_TTABLE);
  o->functions = opt_bool(L, t, "functions", o->functions);
  o->max_depth = (int)opt_int(L, t, "max_depth", o->max_depth, 1, CODEC_MAX_DEPTH);
  if (encoding) {
    if (lua_getfield(L, t, "name") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "bad option 'name' (string expected)");
      o->root = lua_tostring(L, -1);        /* kept alive by the options table */
    }
    lua_pop(L, 1);
  } else {
    o->max_size = (size_t)opt_int(L, t, "max_size", (lua_Integer)o->max_size, 0,
                                  LUA_MAXINTEGER);
    o->max_items = (size_t)opt_int(L, t, "max_items", (lua_Integer)o->max_items, 1,
                                   LUA_MAXINTEGER);
  }
}

/* encode(opts, ...) -> bytes | nil, message. With opts.buffer the bytes stay C's
 * (a flame.bytes, see buf.h), after opts.head bytes of room for a header: a call's
 * work goes so to its runner without a copy into a string and out again. */
static int l_encode(lua_State *L) {
  codec_opts o;
  if (lua_gettop(L) == 0) lua_pushnil(L);
  opts_read(L, 1, &o, 1);
  int boxed = lua_istable(L, 1) && opt_bool(L, 1, "buffer", 0);
  size_t room = boxed ? (size_t)opt_int(L, 1, "head", 0, 0, 64) : 0;
  int n = lua_gettop(L) - 1;
  int at = 2;                                /* where the next helper value goes */
  if (lua_istable(L, 1)) {
    if (lua_getfield(L, 1, "env") != LUA_TNIL) {
      luaL_checktype(L, -1, LUA_TTABLE);
      lua_insert(L, at);
      o.env = at++;
    } else {
      lua_pop(L, 1);
    }
    if (lua_getfield(L, 1, "synced") != LUA_TNIL) {
      if (!lua_istable(L, -1)) return luaL_error(L, "bad option 'synced' (table expected)");
      lua_insert(L, at);
      o.synced = at++;
    } else {
      lua_pop(L, 1);
    }
  }
  buf *b = boxed ? &buf_bytes_new(L, room)->b : buf_box(L);
  lua_insert(L, at);
  if (codec_encode(L, n, &o, b) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  if (boxed) {
    lua_settop(L, at);                       /* the flame.bytes */
    return 1;
  }
  lua_pushlstring(L, (const char *)b->data, b->len);
  buf_free(b);
  return 1;
}

/* decode(bytes, opts) -> true, ... | false, message */
static int l_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  codec_opts o;
  opts_read(L, 2, &o, 0);
  lua_settop(L, 2);
  if (lua_istable(L, 2) && lua_getfield(L, 2, "env") != LUA_TNIL) {
    luaL_checktype(L, -1, LUA_TTABLE);
    o.env = 3;
  }
  lua_pushboolean(L, 1);
  int n = codec_decode(L, s, len, &o);
  if (n < 0) {
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
  }
  return n + 1;
}

/* register(name, mt): tables with metatable mt travel as name, and a table sent
 * as name gets this state's mt. Both sides register the same name. */
static int l_register(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, strlen(name) <= CODEC_MT_NAME_MAX, 1, "name too long");
  registry_table(L, MTS_KEY);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -1), name) != 0)
    return luaL_error(L, "metatable already registered as '%s'", lua_tostring(L, -1));
  lua_pushvalue(L, 1);
  if (lua_rawget(L, -3) == LUA_TTABLE) {     /* the name's old metatable forgets it */
    lua_pushnil(L);
    lua_rawset(L, -4);
  } else {
    lua_pop(L, 1);
  }
  codec_register(L, name, 2);
  return 0;
}

void flame_codec_open(lua_State *L) {
  static const luaL_Reg fns[] = {
    { "encode", l_encode }, { "decode", l_decode }, { "register", l_register },
    { NULL, NULL }
  };
  luaL_setfuncs(L, fns, 0);
  lua_pushinteger(L, CODEC_VERSION);
  lua_setfield(L, -2, "CODEC_VERSION");
}
