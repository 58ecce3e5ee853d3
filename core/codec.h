/*
 * codec.h - Lua values to bytes and back, between any two Lua 5.4 states.
 *
 * Contract:
 * - codec_encode takes n values off the stack and appends their encoding to a buf.
 *   nil, booleans, integers and floats (kept apart; NaN, inf, -0.0 exact), strings,
 *   tables (identity and cycles kept; a metatable only when registered by name),
 *   strings of 32 bytes or more sent once and then referenced,
 *   Lua functions (bytecode and upvalues; shared upvalues stay shared), standard
 *   library C functions and library tables (by name), and the globals table and
 *   every upvalue named _ENV (as "the receiver's environment"), and modules by
 *   name: a table that is package.loaded[name] travels as name (but one that is a
 *   Lua file on package.path, flame aside, still by value), a C function or
 *   userdata reachable from one through string keys (cjson.encode, cjson.null) as its
 *   path; the receiver looks them up in its own package.loaded (requiring the module
 *   when opts.modules says so). Anything else fails with a message naming the
 *   path to the value: "upvalue 'conn' of work: userdata cannot be sent".
 * - codec_decode is total: any byte string gives values or an error message, never
 *   a crash. It is bounded (input size, nesting depth, element count) and, unless
 *   opts.functions is set, refuses functions: bytecode reaches lua_load only when
 *   the caller trusts the bytes (an authenticated parent).
 * - Neither raises: both run protected and return -1 with the message pushed.
 */
#ifndef FLAME_CODEC_H
#define FLAME_CODEC_H

#include <lua.h>
#include "buf.h"

#define CODEC_VERSION 1
#define CODEC_MAX_DEPTH 200          /* also the size of the encoder's path stack */
#define CODEC_DEFAULT_MAX_SIZE ((size_t)1 << 30)
#define CODEC_DEFAULT_MAX_ITEMS ((size_t)1 << 26)

typedef struct codec_opts {
  int functions;      /* encode: allow Lua functions; decode: load them */
  int env;            /* stack index of the table _G/_ENV stand for; 0: globals */
  const char *root;   /* encode: name of the values in error paths; a "%d" in it
                         is replaced by the value's position (1-based) */
  int max_depth;      /* nesting of tables and functions, at most CODEC_MAX_DEPTH */
  size_t max_size;    /* decode: input bytes at most */
  size_t max_items;   /* decode: values at most */
  int modules;        /* decode: require a named module that is not loaded yet (a
                         runner's work); 0: only modules already loaded resolve */
  int synced;         /* encode: stack index of a set of module names ({ ["app.util"]
                         = true }) that are Lua files the receiver has (code_sync):
                         they, and what is in them (Lua functions and tables too),
                         travel by name; 0: such modules travel by value */
} codec_opts;

void codec_opts_init(codec_opts *o);

/* [-n, +(0|1), -] Encodes the n top values; 0, or -1 with the message pushed. */
int codec_encode(lua_State *L, int n, const codec_opts *o, buf *out);

/* [-0, +(k|1), -] Decodes data; pushes the k values and returns k, or returns -1
 * with the message pushed (or, when L's stack cannot grow by 3 slots, nothing). */
int codec_decode(lua_State *L, const char *data, size_t len, const codec_opts *o);

/* [-0, +0, -] Appends the encoding of one string without a Lua state: for reports
 * that must go out when the state is out of memory. 0, or -1 out of memory. */
int codec_encode_cstring(buf *out, const char *s);

/* [-0, +0, -] Appends the encoding of one table of string keys and string values
 * without a Lua state (flame.parent() on a runner, made by its terminator in C):
 * kv holds n pairs, key then value; a pair whose value is NULL is left out. 0, or
 * -1 out of memory. */
int codec_encode_strings(buf *out, const char *const *kv, int n);

/* [-0, +0, m] Builds L's table of library names now (sandboxes do, before any
 * work could change their libraries). */
void codec_names(lua_State *L);

/* [-0, +0, m] Registers mt under name in L (flame.codec.register). */
void codec_register(lua_State *L, const char *name, int mtidx);

#endif
