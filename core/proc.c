/*
 * proc.c - child processes for backends: spawn with arguments and environment,
 * stdout and stderr delivered line by line, exit reported once.
 *
 * Contract:
 * - core.spawn{ path, args = {...}, env = { NAME = value }, cwd, on_output =
 *   fn(stream, line), on_exit = fn(code, signal) } starts path with args (argv[0] is
 *   path); env adds to, or overrides, this process's environment. Returns the
 *   process object, or nil and a message ("ENOENT: no such file or directory").
 * - on_exit is called exactly once, when the process has ended (output still held
 *   by its own children may follow; the handles close when that ends too).
 *   p:kill(signal [, group]) sends a signal ("SIGTERM" default, "SIGKILL", or a
 *   number), to the process group when group is true; p:pid().
 * - group = true starts the process as the leader of a new process group, so what
 *   it leaves behind can be ended with it.
 * - A line longer than 64 KiB is delivered in 64 KiB pieces.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "loop.h"

#define PROC_MT "flame.process"
#define PROC_LINE_MAX (64 * 1024)

extern char **environ;

typedef struct pipe_s {
  flame_handle base;
  uv_pipe_t pipe;
  struct proc *p;
  const char *name;                 /* "stdout" | "stderr" */
  buf line;
  int open;
} pipe_s;

typedef struct proc {
  flame_handle base;
  uv_process_t h;
  flame_loop *lp;
  pipe_s out, err;
  int exit_ref, output_ref;
  int exited, handles;              /* handles still open: process + pipes */
  int64_t code;
  int signal;
  struct proc **owner;
} proc;

static void proc_release(proc *p) {
  if (--p->handles > 0) return;
  if (p->lp->L) {
    luaL_unref(p->lp->L, LUA_REGISTRYINDEX, p->exit_ref);
    luaL_unref(p->lp->L, LUA_REGISTRYINDEX, p->output_ref);
  }
  if (p->owner) *p->owner = NULL;
  buf_free(&p->out.line);
  buf_free(&p->err.line);
  free(p);
}

static void handle_closed(uv_handle_t *h) {
  proc_release(h->type == UV_NAMED_PIPE ? ((pipe_s *)h->data)->p : (proc *)h->data);
}

static void emit_line(pipe_s *s, const char *line, size_t len) {
  proc *p = s->p;
  lua_State *L = p->lp->L;
  if (!L || p->output_ref == LUA_NOREF || !lua_checkstack(L, 4)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->output_ref);
  lua_pushstring(L, s->name);
  lua_pushlstring(L, line, len);
  flame_pcall_report(L, 2, "a process output callback");
}

/* The process handle closes once the process has ended and both pipes are done. */
static void maybe_close(proc *p) {
  if (!p->exited || p->out.open || p->err.open) return;
  if (!uv_is_closing((uv_handle_t *)&p->h)) uv_close((uv_handle_t *)&p->h, handle_closed);
}

static void pipe_done(pipe_s *s) {
  if (!s->open) return;
  s->open = 0;
  if (s->line.len) emit_line(s, (const char *)s->line.data, s->line.len);
  s->line.len = 0;
  if (!uv_is_closing((uv_handle_t *)&s->pipe)) uv_close((uv_handle_t *)&s->pipe, handle_closed);
  maybe_close(s->p);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  (void)suggested;
  pipe_s *s = h->data;
  *b = uv_buf_init(s->p->lp->scratch, sizeof s->p->lp->scratch);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  pipe_s *s = st->data;
  if (n < 0) {
    pipe_done(s);
    return;
  }
  const char *p = b->base, *end = b->base + n;
  while (p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t take = nl ? (size_t)(nl - p) : (size_t)(end - p);
    if (s->line.len + take > PROC_LINE_MAX) take = PROC_LINE_MAX - s->line.len;
    if (buf_append(&s->line, p, take) != 0) s->line.len = 0;
    p += take;
    if ((nl && p == nl) || s->line.len == PROC_LINE_MAX) {
      emit_line(s, (const char *)s->line.data, s->line.len);
      s->line.len = 0;
      if (nl && p == nl) p++;
    }
  }
}

static void on_exit_cb(uv_process_t *h, int64_t code, int sig) {
  proc *p = h->data;
  p->exited = 1;
  p->code = code;
  p->signal = sig;
  lua_State *L = p->lp->L;
  if (L && p->exit_ref != LUA_NOREF && lua_checkstack(L, 4)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->exit_ref);
    lua_pushinteger(L, (lua_Integer)code);
    lua_pushinteger(L, sig);
    flame_pcall_report(L, 2, "a process exit callback");
  }
  maybe_close(p);
}

/* [-0, +1, m] argv or envp as a NULL-terminated array in a userdata */
static char **strings_array(lua_State *L, int n) {
  char **a = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
  a[n] = NULL;
  return a;
}

static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  lua_settop(L, 1);
  lua_getfield(L, 1, "path");                               /* 2 */
  const char *path = luaL_checkstring(L, 2);
  lua_getfield(L, 1, "args");                               /* 3 */
  int nargs = lua_istable(L, 3) ? (int)luaL_len(L, 3) : 0;
  char **argv = strings_array(L, nargs + 1);                /* 4 */
  argv[0] = (char *)path;
  lua_newtable(L);                                          /* 5: strings kept alive */
  for (int i = 1; i <= nargs; i++) {
    lua_geti(L, 3, i);
    argv[i] = (char *)luaL_checkstring(L, -1);
    lua_rawseti(L, 5, i);
  }
  char **envp = NULL;
  lua_getfield(L, 1, "env");                                /* 6 */
  if (lua_istable(L, 6)) {
    int n = 0;
    for (char **e = environ; *e; e++) n++;
    lua_pushnil(L);
    while (lua_next(L, 6)) { n++; lua_pop(L, 1); }
    envp = strings_array(L, n);                             /* 7 */
    int k = 0;
    for (char **e = environ; *e; e++) {
      const char *eq = strchr(*e, '=');
      if (eq) {
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        int overridden = lua_rawget(L, 6) != LUA_TNIL;
        lua_pop(L, 1);
        if (overridden) continue;
      }
      envp[k++] = *e;
    }
    lua_pushnil(L);
    while (lua_next(L, 6)) {
      if (lua_type(L, -2) != LUA_TSTRING)  /* tostring on a number key would break next */
        return luaL_error(L, "spawn: env keys must be strings");
      lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), luaL_checkstring(L, -1));
      envp[k++] = (char *)lua_tostring(L, -1);
      lua_rawseti(L, 5, nargs + k);
      lua_pop(L, 1);
    }
    envp[k] = NULL;
  }
  lua_getfield(L, 1, "cwd");
  const char *cwd = luaL_optstring(L, -1, NULL);
  int top = lua_gettop(L);

  proc **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, PROC_MT);
  proc *p = calloc(1, sizeof *p);
  if (p == NULL) return luaL_error(L, "not enough memory");
  p->lp = lp;
  p->exit_ref = p->output_ref = LUA_NOREF;
  p->base.on_close = handle_closed;
  p->out.base.on_close = handle_closed;
  p->err.base.on_close = handle_closed;
  p->out.p = p->err.p = p;
  p->out.name = "stdout";
  p->err.name = "stderr";
  int rc = uv_pipe_init(&lp->uv, &p->out.pipe, 0);
  if (rc == 0) {
    rc = uv_pipe_init(&lp->uv, &p->err.pipe, 0);
    if (rc != 0) {
      p->handles = 1;
      p->out.pipe.data = &p->out;
      uv_close((uv_handle_t *)&p->out.pipe, handle_closed);
      lua_pushnil(L);
      lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
      return 2;
    }
  } else {
    free(p);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return 2;
  }
  p->out.pipe.data = &p->out;
  p->err.pipe.data = &p->err;
  uv_stdio_container_t stdio[3];
  stdio[0].flags = UV_IGNORE;
  stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[1].data.stream = (uv_stream_t *)&p->out.pipe;
  stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[2].data.stream = (uv_stream_t *)&p->err.pipe;
  uv_process_options_t opt;
  memset(&opt, 0, sizeof opt);
  opt.file = path;
  opt.args = argv;
  opt.env = envp;
  opt.cwd = cwd;
  opt.exit_cb = on_exit_cb;
  opt.stdio = stdio;
  opt.stdio_count = 3;
  lua_getfield(L, 1, "group");
  if (lua_toboolean(L, -1)) opt.flags |= UV_PROCESS_DETACHED;   /* setsid(): a group */
  lua_pop(L, 1);
  p->h.data = p;
  rc = uv_spawn(&lp->uv, &p->h, &opt);
  if (rc != 0) {                    /* the process handle still has to be closed */
    p->handles = 3;
    uv_close((uv_handle_t *)&p->h, handle_closed);
    uv_close((uv_handle_t *)&p->out.pipe, handle_closed);
    uv_close((uv_handle_t *)&p->err.pipe, handle_closed);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start %s: %s (%s)", path, uv_strerror(rc), uv_err_name(rc));
    return 2;
  }
  p->handles = 3;
  p->out.open = p->err.open = 1;
  uv_read_start((uv_stream_t *)&p->out.pipe, on_alloc, on_read);
  uv_read_start((uv_stream_t *)&p->err.pipe, on_alloc, on_read);
  lua_getfield(L, 1, "on_exit");
  if (lua_isfunction(L, -1)) p->exit_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_getfield(L, 1, "on_output");
  if (lua_isfunction(L, -1)) p->output_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  p->owner = ud;
  *ud = p;
  lua_settop(L, top + 1);
  return 1;
}

static int proc_pid(lua_State *L) {
  proc *p = *(proc **)luaL_checkudata(L, 1, PROC_MT);
  if (p == NULL) return 0;
  lua_pushinteger(L, p->h.pid);
  return 1;
}

/* p:kill([signal]) -> true | nil, message (after exit: nil, "exited") */
static int proc_kill(lua_State *L) {
  proc *p = *(proc **)luaL_checkudata(L, 1, PROC_MT);
  int sig = SIGTERM;
  if (lua_type(L, 2) == LUA_TNUMBER) sig = (int)lua_tointeger(L, 2);
  else if (!lua_isnoneornil(L, 2)) {
    static const char *const names[] = { "SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", NULL };
    static const int nums[] = { SIGTERM, SIGKILL, SIGINT, SIGHUP };
    sig = nums[luaL_checkoption(L, 2, NULL, names)];
  }
  int group = lua_toboolean(L, 3);
  if (p == NULL || (p->exited && !group)) {
    lua_pushnil(L);
    lua_pushliteral(L, "exited");
    return 2;
  }
  int rc = group ? uv_kill(-p->h.pid, sig) : uv_process_kill(&p->h, sig);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int proc_exited(lua_State *L) {
  proc *p = *(proc **)luaL_checkudata(L, 1, PROC_MT);
  lua_pushboolean(L, p == NULL || p->exited);
  return 1;
}

static int proc_gc(lua_State *L) {
  proc **ud = luaL_checkudata(L, 1, PROC_MT);
  if (*ud) (*ud)->owner = NULL;     /* the process is still watched until it exits */
  return 0;
}

void flame_proc_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "pid", proc_pid }, { "kill", proc_kill }, { "exited", proc_exited }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, PROC_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, proc_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_spawn);
  lua_setfield(L, -2, "spawn");
}
