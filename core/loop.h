/*
 * loop.h - the loop of a Lua state (see loop.c), shared with the executor, links,
 * HTTP and processes: every uv handle flame creates, on this loop or the runtime
 * thread's, has in its data a struct that starts with flame_handle, so closing the
 * loop can close it.
 */
#ifndef FLAME_LOOP_H
#define FLAME_LOOP_H

#include <lua.h>
#include <uv.h>

typedef struct flame_handle {
  uv_close_cb on_close;       /* frees the struct the handle lives in */
} flame_handle;

typedef struct flame_loop {
  uv_loop_t uv;
  uv_idle_t idle;             /* runs the task dispatcher when tasks are ready */
  lua_State *L;               /* the thread running loop:run; NULL when not running */
  int running, closed;
  int dispatch_ref;
} flame_loop;

/* [-0, +0, e] The state's loop, made on first use. */
flame_loop *flame_loop_get(lua_State *L);

/* [-(nargs+1), +0, -] Calls the function below the nargs arguments; an error goes to
 * stderr with a traceback, naming where. Returns the lua_pcall status. */
int flame_pcall_report(lua_State *L, int nargs, const char *where);

void flame_loop_open(lua_State *L);

#endif
