/*
 * popts.c - the options of flame.pool and flame.call, checked (docs/pools.md).
 *
 *   core.pool_options(opts) -> a new table: every option of the pool, the given
 *                              ones as given, the others at their defaults
 *                           | nil, message
 *   core.call_options(opts) -> a new table of the call's options | nil, message
 *
 * The message names the function, the option, what it must be and what it got:
 * `flame.pool: option 'max' must be an integer >= 1 (got number 0)`; a key that is
 * no option gets the nearest name as a suggestion. Options are checked in one
 * fixed order (the table below), so a table with two bad options always names the
 * same one. Values are not copied deeply: functions and tables given stay the
 * caller's (a backend table, backend_opts, link, code_sync, hooks). Nothing here
 * raises except on memory.
 */
#include <lua.h>
#include <lauxlib.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "flame.h"

typedef int (*popts_check_fn)(lua_State *L, int v);  /* the value at index v is good */

typedef struct {
  const char *name;
  const char *expected;                 /* "must be ..." */
  popts_check_fn check;
  int def;                              /* the default's kind, below */
  double num;                           /* its value for POPTS_NUM and POPTS_INT */
  const char *str;                      /* its value for POPTS_STR */
} popts_option;

enum { POPTS_NONE, POPTS_NUM, POPTS_INT, POPTS_STR, POPTS_FALSE, POPTS_TABLE };

static int is_ms(lua_State *L, int v) {  /* a number >= 0, math.huge included, no NaN */
  if (lua_type(L, v) != LUA_TNUMBER) return 0;
  lua_Number n = lua_tonumber(L, v);
  return n == n && n >= 0;
}

static int is_pos_ms(lua_State *L, int v) { return is_ms(L, v) && lua_tonumber(L, v) > 0; }

static int is_int_min(lua_State *L, int v, lua_Integer min) {
  return lua_isinteger(L, v) && lua_tointeger(L, v) >= min;
}

static int is_int0(lua_State *L, int v) { return is_int_min(L, v, 0); }
static int is_int1(lua_State *L, int v) { return is_int_min(L, v, 1); }
static int is_bool(lua_State *L, int v) { return lua_type(L, v) == LUA_TBOOLEAN; }
static int is_table(lua_State *L, int v) { return lua_type(L, v) == LUA_TTABLE; }
static int is_function(lua_State *L, int v) { return lua_type(L, v) == LUA_TFUNCTION; }

static int is_name(lua_State *L, int v) {
  return lua_type(L, v) == LUA_TSTRING && lua_rawlen(L, v) > 0;
}

static int is_backend(lua_State *L, int v) {
  return lua_type(L, v) == LUA_TSTRING || lua_type(L, v) == LUA_TTABLE;
}

static int is_code_sync(lua_State *L, int v) { return is_bool(L, v) || is_table(L, v); }

/* { ms, function }: the idle check's form */
static int is_idle(lua_State *L, int v) {
  if (is_ms(L, v)) return 1;
  if (!is_table(L, v)) return 0;
  lua_rawgeti(L, v, 1);
  lua_rawgeti(L, v, 2);
  int ok = is_ms(L, -2) && lua_type(L, -1) == LUA_TFUNCTION;
  lua_pop(L, 2);
  return ok;
}

static const char *const LOG_LEVELS[] = { "debug", "info", "warn", "error", NULL };

static int is_log(lua_State *L, int v) {
  if (lua_type(L, v) == LUA_TBOOLEAN) return !lua_toboolean(L, v);
  if (lua_type(L, v) != LUA_TSTRING) return 0;
  const char *s = lua_tostring(L, v);
  for (int i = 0; LOG_LEVELS[i]; i++)
    if (strcmp(s, LOG_LEVELS[i]) == 0) return 1;
  return 0;
}

static int is_profile(lua_State *L, int v) {
  if (lua_type(L, v) != LUA_TSTRING) return 0;
  const char *s = lua_tostring(L, v);
  return strcmp(s, "application") == 0 || strcmp(s, "restricted") == 0;
}

/* a profile name, or { profile = name, memory_limit = bytes } and nothing else */
static int is_sandbox(lua_State *L, int v) {
  if (is_profile(L, v)) return 1;
  if (!is_table(L, v)) return 0;
  int ok = 1;
  lua_pushnil(L);
  while (ok && lua_next(L, v) != 0) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
    if (strcmp(k, "profile") == 0) ok = is_profile(L, lua_gettop(L));
    else if (strcmp(k, "memory_limit") == 0) ok = is_int0(L, lua_gettop(L));
    else ok = 0;
    lua_pop(L, 1);
  }
  if (!ok) lua_pop(L, 1);               /* the key lua_next left */
  return ok;
}

/* { bind, port, advertise, heartbeat_interval, heartbeat_misses, tls }, each of its
 * type; tls is "auto", true or false */
static int is_link(lua_State *L, int v) {
  static const struct { const char *key; int type; } keys[] = {
    { "bind", LUA_TSTRING }, { "port", LUA_TNUMBER }, { "advertise", LUA_TTABLE },
    { "heartbeat_interval", LUA_TNUMBER }, { "heartbeat_misses", LUA_TNUMBER },
  };
  if (!is_table(L, v)) return 0;
  int ok = 1;
  lua_pushnil(L);
  while (ok && lua_next(L, v) != 0) {
    ok = 0;
    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -2);
      for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if (strcmp(k, keys[i].key) == 0) ok = lua_type(L, -1) == keys[i].type;
      if (strcmp(k, "tls") == 0)
        ok = lua_type(L, -1) == LUA_TBOOLEAN
             || (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "auto") == 0);
    }
    lua_pop(L, 1);
  }
  if (!ok) {
    lua_pop(L, 1);
    return 0;
  }
  lua_getfield(L, v, "heartbeat_interval");
  lua_getfield(L, v, "heartbeat_misses");
  ok = (lua_isnil(L, -2) || lua_tonumber(L, -2) > 0)
    && (lua_isnil(L, -1) || lua_tonumber(L, -1) >= 1);
  lua_pop(L, 2);
  return ok;
}

#define MS_POS "milliseconds (a number > 0, or math.huge)"
#define MS_ANY "milliseconds (a number >= 0, or math.huge)"

/* in the order of docs/pools.md's table */
static const popts_option POOL_OPTIONS[] = {
  { "name", "a non-empty string", is_name, POPTS_NONE, 0, NULL },
  { "backend", "a backend name or table", is_backend, POPTS_STR, 0, "local" },
  { "backend_opts", "a table", is_table, POPTS_NONE, 0, NULL },
  { "min", "an integer >= 0", is_int0, POPTS_INT, 0, NULL },
  { "max", "an integer >= 1", is_int1, POPTS_INT, 1, NULL },
  { "max_concurrency", "an integer >= 1", is_int1, POPTS_INT, 100, NULL },
  { "single_use", "a boolean", is_bool, POPTS_FALSE, 0, NULL },
  { "timeout", MS_POS, is_pos_ms, POPTS_INT, 30000, NULL },
  { "boot_timeout", MS_POS, is_pos_ms, POPTS_INT, 30000, NULL },
  { "shutdown_timeout", MS_ANY, is_ms, POPTS_INT, 30000, NULL },
  { "idle_shutdown_after", "milliseconds, or { milliseconds, function }", is_idle,
    POPTS_INT, 30000, NULL },
  { "min_idle_shutdown_after", MS_ANY, is_ms, POPTS_NUM, HUGE_VAL, NULL },
  { "on_grow_start", "a function", is_function, POPTS_NONE, 0, NULL },
  { "on_grow_end", "a function", is_function, POPTS_NONE, 0, NULL },
  { "on_shrink", "a function", is_function, POPTS_NONE, 0, NULL },
  { "log", "false or one of \"debug\", \"info\", \"warn\", \"error\"", is_log,
    POPTS_FALSE, 0, NULL },
  { "sandbox", "\"application\", \"restricted\" or { profile = ..., memory_limit = ... }",
    is_sandbox, POPTS_STR, 0, "application" },
  { "code_sync", "true, false or { paths, modules, max_bytes }", is_code_sync,
    POPTS_FALSE, 0, NULL },
  { "link", "{ bind, port, advertise, heartbeat_interval, heartbeat_misses, "
    "tls = \"auto\" | true | false }", is_link,
    POPTS_TABLE, 0, NULL },
  { NULL, NULL, NULL, 0, 0, NULL },
};

static const popts_option CALL_OPTIONS[] = {
  { "timeout", MS_POS, is_pos_ms, POPTS_NONE, 0, NULL },
  { "link", "a boolean", is_bool, POPTS_NONE, 0, NULL },
  { NULL, NULL, NULL, 0, 0, NULL },
};

/* Levenshtein distance of two short names (option names are under 32 bytes; a
 * longer key is compared by its first 63) */
static size_t distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 63) la = 63;
  if (lb > 63) lb = 63;
  size_t prev[64], cur[64];
  for (size_t j = 0; j <= lb; j++) prev[j] = j;
  for (size_t i = 1; i <= la; i++) {
    cur[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      size_t d = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      if (prev[j] + 1 < d) d = prev[j] + 1;
      if (cur[j - 1] + 1 < d) d = cur[j - 1] + 1;
      cur[j] = d;
    }
    memcpy(prev, cur, (lb + 1) * sizeof *prev);
  }
  return prev[lb];
}

/* pushes " (did you mean 'x'?)" for the nearest option within reach, or "" */
static void push_suggestion(lua_State *L, const popts_option *spec, const char *key) {
  const char *best = NULL;
  size_t bd = 0, len = strlen(key), reach = len / 3 > 2 ? len / 3 : 2;
  for (const popts_option *o = spec; o->name; o++) {
    size_t d = distance(key, o->name);
    if (best == NULL || d < bd) best = o->name, bd = d;
  }
  if (best && bd <= reach) lua_pushfstring(L, " (did you mean '%s'?)", best);
  else lua_pushliteral(L, "");
}

/* pushes how a bad value is told: string "x" (quoted as %q would), a table,
 * number 0, boolean true */
static void push_described(lua_State *L, int v) {
  int t = lua_type(L, v);
  if (t == LUA_TSTRING) {
    size_t n;
    const char *s = lua_tolstring(L, v, &n);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, "string \"");
    for (size_t i = 0; i < n && i < 200; i++) {
      unsigned char c = (unsigned char)s[i];
      if (c == '"' || c == '\\') {
        luaL_addchar(&b, '\\');
        luaL_addchar(&b, (char)c);
      } else if (c < 32 || c == 127) {
        char esc[8];
        snprintf(esc, sizeof esc, "\\%d", c);
        luaL_addstring(&b, esc);
      } else {
        luaL_addchar(&b, (char)c);
      }
    }
    if (n > 200) luaL_addstring(&b, "...");
    luaL_addchar(&b, '"');
    luaL_pushresult(&b);
  } else if (t == LUA_TTABLE) {
    lua_pushliteral(L, "a table");
  } else {
    luaL_tolstring(L, v, NULL);          /* a __tostring of userdata may raise: so be it */
    lua_pushfstring(L, "%s %s", lua_typename(L, t), lua_tostring(L, -1));
    lua_remove(L, -2);
  }
}

static void push_default(lua_State *L, const popts_option *o) {
  switch (o->def) {
  case POPTS_NUM: lua_pushnumber(L, o->num); break;
  case POPTS_INT: lua_pushinteger(L, (lua_Integer)o->num); break;
  case POPTS_STR: lua_pushstring(L, o->str); break;
  case POPTS_FALSE: lua_pushboolean(L, 0); break;
  case POPTS_TABLE: lua_newtable(L); break;
  default: lua_pushnil(L); break;
  }
}

/* checks the table at index 1 against spec: pushes the new table (1 result) or
 * nil and the message (2) */
static int check(lua_State *L, const char *where, const popts_option *spec) {
  if (lua_type(L, 1) != LUA_TTABLE) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: options must be a table", where);
    return 2;
  }
  lua_settop(L, 1);
  lua_pushnil(L);
  while (lua_next(L, 1) != 0) {
    lua_pop(L, 1);
    int known = 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -1);
      for (const popts_option *o = spec; o->name && !known; o++) known = strcmp(k, o->name) == 0;
    }
    if (!known) {
      int kt = lua_type(L, -1) == LUA_TSTRING;
      luaL_tolstring(L, -1, NULL);
      if (kt) push_suggestion(L, spec, lua_tostring(L, -1));
      else lua_pushliteral(L, "");
      lua_pushnil(L);
      lua_pushfstring(L, "%s: unknown option '%s'%s", where, lua_tostring(L, -3),
                      lua_tostring(L, -2));
      return 2;
    }
  }
  lua_newtable(L);                                   /* 2: the result */
  for (const popts_option *o = spec; o->name; o++) {
    lua_getfield(L, 1, o->name);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      push_default(L, o);
    } else if (!o->check(L, lua_gettop(L))) {
      push_described(L, lua_gettop(L));
      lua_pushnil(L);
      lua_pushfstring(L, "%s: option '%s' must be %s (got %s)", where, o->name, o->expected,
                      lua_tostring(L, -2));
      return 2;
    }
    lua_setfield(L, 2, o->name);
  }
  return 1;
}

static int l_pool_options(lua_State *L) {
  if (check(L, "flame.pool", POOL_OPTIONS) != 1) return 2;
  if (lua_getfield(L, 2, "name") == LUA_TNIL) {
    lua_pushnil(L);
    lua_pushliteral(L, "flame.pool: option 'name' is required");
    return 2;
  }
  lua_getfield(L, 2, "min");
  lua_getfield(L, 2, "max");
  lua_Integer min = lua_tointeger(L, -2), max = lua_tointeger(L, -1);
  if (min > max) {
    lua_pushnil(L);
    lua_pushfstring(L, "flame.pool: min (%I) is larger than max (%I)", (LUAI_UACINT)min,
                    (LUAI_UACINT)max);
    return 2;
  }
  lua_settop(L, 2);
  return 1;
}

static int l_call_options(lua_State *L) {
  return check(L, "flame.call", CALL_OPTIONS);
}

void flame_popts_open(lua_State *L) {
  lua_pushcfunction(L, l_pool_options);
  lua_setfield(L, -2, "pool_options");
  lua_pushcfunction(L, l_call_options);
  lua_setfield(L, -2, "call_options");
}
