/*
 * sandbox.h - sandboxed Lua states: a profile of libraries, a memory cap, and a kill
 * switch that another thread may pull.
 *
 * Contract:
 * - sandbox_new makes a state whose allocator refuses to grow past memory_limit (the
 *   allocation fails as a Lua memory error; the state stays usable).
 * - Profiles: "application" has the standard libraries, require and subprocesses,
 *   without os.exit, package.loadlib, binary chunks (load, loadfile, dofile and
 *   require load text only; C modules come from the C path the sandbox was made
 *   with), and with debug reduced to traceback. "restricted" is pure computation: base functions
 *   (without load, loadfile, dofile, print, collectgarbage), string, table, math,
 *   utf8, coroutine, and os.clock/time/date/difftime. "backend" (where backend
 *   callbacks run on the parent) is restricted plus require of Lua text modules from
 *   a given path: no C modules, no I/O; a backend reaches the world only through the
 *   requests its environment's stubs yield to the host.
 * - sandbox_kill may be called from any thread: running Lua code in the state (and in
 *   the coroutine it is resuming or closing) raises "flame: work killed (<reason>)"
 *   at its next instruction, again after every pcall that catches it, until
 *   sandbox_rearm. Code blocked inside a C function (a subprocess, a pattern match)
 *   is stopped when it returns to Lua. Both profiles refuse __gc metamethods
 *   (finalizers run with hooks off, so they could not be stopped) and run xpcall
 *   handlers, coroutine.close and __close handlers where the kill reaches them.
 * - Everything else belongs to the thread that owns the state.
 */
#ifndef FLAME_SANDBOX_H
#define FLAME_SANDBOX_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>
#include "buf.h"

typedef enum { SANDBOX_APPLICATION, SANDBOX_RESTRICTED, SANDBOX_BACKEND } sandbox_profile;

/* Why work was killed; 0 means it was not. */
enum { SANDBOX_KILL_TIMEOUT = 1, SANDBOX_KILL_CANCEL, SANDBOX_KILL_SHUTDOWN,
       SANDBOX_KILL_REQUEST, SANDBOX_KILL_COUNT };

/* How a run ended: the first byte of sandbox_run's output, codec data after it. */
enum {
  SANDBOX_RESULT = 'r',  /* the work's return values */
  SANDBOX_ERROR = 'e',   /* message, traceback, and the error value if it can cross */
  SANDBOX_KILLED = 'k',  /* reason name ("timeout", ...) */
  SANDBOX_ENCODE = 'c',  /* a result that cannot cross: message naming it */
  SANDBOX_DECODE = 'd'   /* the work could not be decoded: message */
};

typedef struct sandbox_config {
  sandbox_profile profile;
  size_t memory_limit;   /* bytes; 0 means no limit */
  const char *requires;  /* modules to require at creation, comma-separated, or NULL */
  const char *info;      /* codec bytes of a table: what flame.parent() returns in the */
  size_t info_len;       /* sandbox (require "flame" gives { parent, VERSION }), or NULL */
  const char *path;      /* package.path: the backend profile's text-only require, or
                            the application profile's (NULL: the environment's) */
  const char *cpath;     /* application profile: package.cpath (NULL: the environment's) */
} sandbox_config;

typedef struct sandbox sandbox;

/* NULL on failure with *err set to a static message. */
sandbox *sandbox_new(const sandbox_config *c, const char **err);
void sandbox_close(sandbox *s);
lua_State *sandbox_state(sandbox *s);
sandbox *sandbox_of(lua_State *L);       /* NULL when L is not a sandbox's state */
size_t sandbox_memory(const sandbox *s);
void sandbox_kill(sandbox *s, int reason);   /* any thread */
int sandbox_killed(sandbox *s);              /* the reason, or 0 */
void sandbox_rearm(sandbox *s);
const char *sandbox_kill_name(int reason);
int sandbox_profile_parse(const char *name, sandbox_profile *p);

/* lua_pcall in the sandbox's state, killed ("timeout") when it runs past ms
 * milliseconds (ms < 0: no bound): for host code that drives a sandbox directly,
 * like a runner's system_shutdown. Returns lua_pcall's status. */
int sandbox_pcall_bounded(sandbox *s, int nargs, int nresults, int64_t ms);

/* lua_resume of coroutine co of the sandbox's state, bounded the same way (the
 * kill reaches co); sandbox_killed tells whether it was stopped. Returns
 * lua_resume's status, the count of values in *nres. */
int sandbox_resume_bounded(sandbox *s, lua_State *co, int nargs, int *nres, int64_t ms);

/* Decodes work into the state and runs it: a function and its arguments, or a
 * table {module, function, args} (require(module)[function](unpack(args))). Each run
 * gets a fresh _ENV over the profile's globals, so globals it writes are gone after
 * it; modules it requires stay loaded. Appends the outcome to out: a status byte,
 * then codec data. Returns 0, or -1 when out ran out of memory. Leaves the state's
 * stack empty. */
int sandbox_run(sandbox *s, const char *work, size_t len, buf *out);

#endif
