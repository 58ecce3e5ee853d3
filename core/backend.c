/*
 * backend.c - backend states, owned by the runtime thread: one sandboxed Lua state
 * per runner (profile "backend") in which the pool's backend runs. Its callbacks
 * are coroutines stepped on libuv's thread pool, never on the runtime loop nor the
 * application's thread: a backend that computes holds up neither heartbeats nor
 * the program, and it is stopped after BK_STEP_LIMIT ms without waiting. What a
 * callback asks of its environment (docs/backends.md) comes out of its coroutine as
 * a request; the answer resumes it. The environment's plain functions are C of the
 * state itself (benv.c) and are no requests. Requests are served here, on the
 * runtime thread (timers, logs, processes, HTTP, runners and their links:
 * bsvc_*.c); one the environment does not have is answered nil and why.
 *
 * Contract (runtime thread; runner.c is the one user, hub.h and runner.h):
 *   backend_new(h, name, bytes, path, runner, is_min) -> id   a backend state: the
 *        module `name` (flame.backends.NAME, else NAME), or the backend table the
 *        codec made into `bytes`; `path` is package.path for its require; is_min:
 *        its runner keeps the pool's min. Made on the thread pool; when it cannot
 *        be, every call on it fails with why.
 *   backend_call(id, callback, arg, fn, ud)   runs callback ("init", "remote_boot",
 *        "remote_spawn_monitor", "handle_info", "remote_shutdown") as a coroutine;
 *        its end goes to fn, also when the state closes first ("closed").
 *   backend_close(id)      the state closes once its step is done; calls waiting
 *        end with "closed" (their fn is called before backend_close returns). A
 *        state outlives the pool's hub closing (a remote_shutdown may still run, a
 *        late exit reach handle_info): it holds the hub, and so its mailbox, until
 *        it is closed (or the process exits).
 * What its services tell goes to runner.c (runner_on_info: a message for
 * handle_info; runner_on_procs: processes the backend started that still run), and
 * log lines to the application ("blog", id, level, line).
 * Threads: bk structs are the runtime thread's; a step's lua_State belongs to the
 * thread-pool thread running it until its after-work callback runs (libuv orders
 * the two), and one state runs at most one step at a time. No lock.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "bval.h"
#include "bsvc.h"
#include "codec.h"
#include "hub.h"
#include "runner.h"
#include "runtime.h"
#include "sandbox.h"

#define BK_MEMORY ((size_t)64 * 1024 * 1024)
/* ms a callback may run between two waits: well within the default heartbeat
 * window (3 s), though the heartbeats do not depend on it any more */
#define BK_STEP_LIMIT 2000

/* The bootstrap: loads the backend, builds its environment, and defines the
 * dispatcher each callback runs through. Requests are yields: (name, args...). */
static const char BOOTSTRAP[] =
  "local spec = ...\n"
  "local B = spec\n"
  "if type(spec) == 'string' then\n"
  "  local ok, mod = pcall(require, 'flame.backends.' .. spec)\n"
  "  if not ok then mod = require(spec) end\n"
  "  B = mod\n"
  "end\n"
  "if type(B) ~= 'table' then error('the backend module returned no table', 0) end\n"
  "local yield = coroutine.yield\n"
  "local function request(name, ...) return yield(name, ...) end\n"
  /* values sent to the host: handles as their ids, no functions */
  "local function plain(x, seen)\n"
  "  if type(x) ~= 'table' then\n"
  "    if type(x) == 'function' or type(x) == 'thread' or type(x) == 'userdata' then return nil end\n"
  "    return x\n"
  "  end\n"
  "  if x.__flame_handle then return { __flame_handle = x.__flame_handle } end\n"
  "  seen = seen or {}\n"
  "  if seen[x] then return seen[x] end\n"
  "  local out = {}\n"
  "  seen[x] = out\n"
  "  for k, v in pairs(x) do out[plain(k, seen)] = plain(v, seen) end\n"
  "  return out\n"
  "end\n"
  /* a handle from the host, with its methods as requests */
  "local function handle(h, ...)\n"
  "  if type(h) ~= 'table' or not h.__flame_handle then return h, ... end\n"
  "  local id = h.__flame_handle\n"
  "  if h.kind == 'http_stream' then\n"
  "    function h.read() return request('stream_read', id) end\n"
  "    function h.close() return request('stream_close', id) end\n"
  "  elseif h.kind == 'process' then\n"
  "    function h.pid() return h.process_id end\n"
  "    function h.kill(_, sig, group) return request('proc_kill', id, sig, group) end\n"
  "    function h.exited() return request('proc_exited', id) end\n"
  "  end\n"
  "  return h\n"
  "end\n"
  "local env = {}\n"
  "function env.merge(a, b)\n"
  "  local out = {}\n"
  "  for k, v in pairs(a or {}) do out[k] = v end\n"
  "  for k, v in pairs(b or {}) do out[k] = v end\n"
  "  return out\n"
  "end\n"
  "for _, name in ipairs { 'config', 'parent_new', 'flame_bin', 'sleep', 'exit', 'code_paths' } do\n"
  "  env[name] = function(a) return request(name, plain(a)) end\n"
  "end\n"
  /* what needs nothing of the pool is C of this state (benv.c): plain calls */
  "local E = require 'flame.env'\n"
  "for _, name in ipairs { 'random_id', 'parent_encode', 'parent_info', 'getenv', 'environ',\n"
  "                        'now', 'proc_alive' } do\n"
  "  env[name] = E[name]\n"
  "end\n"
  "env.json = { encode = E.json_encode, decode = E.json_decode }\n"
  "function env.await_remote_up(p, timeout)\n"
  "  return handle(request('await_remote_up', plain(p), timeout))\n"
  "end\n"
  "function env.local_terminator(state)\n"
  "  return handle(request('local_terminator', plain(state)))\n"
  "end\n"
  "function env.spawn_monitor(term, work) return request('spawn_monitor', plain(term), plain(work)) end\n"
  "function env.send_after(ms, msg) return request('send_after', ms, plain(msg)) end\n"
  "env.proc = { spawn = function(o) return handle(request('proc_spawn', plain(o))) end,\n"
  "             run = function(o) return request('proc_run', plain(o)) end }\n"
  "env.http = {\n"
  "  request = function(o) return request('http_request', plain(o)) end,\n"
  "  watch = function(o, tag) return request('http_watch', plain(o), plain(tag)) end,\n"
  "  stream = function(o) return handle(request('http_stream', plain(o))) end,\n"
  "}\n"
  "env.log = {}\n"
  "for _, level in ipairs { 'debug', 'info', 'warn', 'error' } do\n"
  "  env.log[level] = function(fmt, ...)\n"
  "    local ok, msg = pcall(string.format, fmt, ...)\n"
  "    return request('log', level, ok and msg or tostring(fmt))\n"
  "  end\n"
  "end\n"
  "local STATE\n"
  "function __flame_dispatch(cb, arg)\n"
  "  if cb == 'init' then\n"
  "    STATE = B.init(arg, env)\n"
  "    if STATE == nil then error('the backend\\'s init returned no state', 0) end\n"
  "    return true\n"
  "  elseif cb == 'remote_boot' then\n"
  "    local term, st = B.remote_boot(STATE, env)\n"
  "    if not term then return nil, tostring(st or 'remote_boot returned nothing') end\n"
  "    if type(st) == 'table' then STATE = st end\n"
  "    return plain(term)\n"
  "  elseif cb == 'remote_spawn_monitor' then\n"
  "    if B.remote_spawn_monitor then B.remote_spawn_monitor(STATE, arg, env)\n"
  "    else env.spawn_monitor(STATE.terminator, arg) end\n"
  "    return true\n"
  "  elseif cb == 'handle_info' then\n"
  "    if not B.handle_info then return true end\n"
  "    local st, reason = B.handle_info(arg, STATE, env)\n"
  "    if st == nil then return nil, tostring(reason or 'the backend reported the runner down') end\n"
  "    STATE = st\n"
  "    return true\n"
  "  elseif cb == 'remote_shutdown' then\n"
  "    if B.remote_shutdown then B.remote_shutdown(STATE, arg, env) end\n"
  "    return true\n"
  "  end\n"
  "  error('unknown callback ' .. tostring(cb), 0)\n"
  "end\n";

static const char COS_KEY[] = "flame.backend.cos";   /* registry: co id -> thread */

enum { BS_START, BS_CALL, BS_RESUME, BS_CLOSE };
enum { BO_NONE, BO_REQUEST, BO_DONE, BO_ERROR };

/* One step: what to run in the state, and what came of it. */
typedef struct bstep {
  struct bstep *next;
  int kind;
  int64_t co;
  char *cb;                         /* BS_CALL */
  bval *in;                         /* BS_CALL: the argument; BS_RESUME: the reply */
  int nin;
  int outcome;
  char *name;                       /* BO_REQUEST: what it asks for */
  bval *out;                        /* BO_REQUEST: its arguments; BO_DONE: results */
  int nout;
  char *msg;                        /* BO_ERROR */
} bstep;

/* A callback the runtime side itself called (backend_call): its end goes to fn. */
typedef struct bkcall {
  struct bkcall *next;
  int64_t co;
  bk_done_fn fn;
  void *ud;
} bkcall;

typedef struct bhandle {
  int64_t id;
  int kind;
  void *obj;
} bhandle;

struct bk {
  struct bk *next;
  int64_t id;
  char *runner;                     /* the runner's name, for logs */
  bk_res *res;                      /* what lives on for it: timers, processes */
  bhandle *handles;
  size_t nhandles, cap;
  int64_t next_handle;
  int nprocs;
  int is_min;                       /* a runner booted to keep the pool's min */
  struct blink *link;               /* bsvc_link.c's: its parents and boot wait */
  hub *h;                           /* held (hub_hold) while the state lives */
  sandbox *sb;                      /* the step thread's while a step runs */
  char *name, *path;                /* BS_START's */
  buf spec;
  char *start_err;                  /* the state could not be made */
  bstep *queue, *tail;
  bstep *running;
  bkcall *ccalls;                   /* backend_call's, not ended yet */
  int64_t next_cco;
  uv_work_t work;
  int closing;
  bstep close_step;
};

static bk *all;                     /* the runtime thread's */
static atomic_llong next_id;

static char *dup(const char *s) {
  return s ? strdup(s) : NULL;
}

static void step_free(bstep *st) {
  if (st->kind == BS_CLOSE) return;   /* bk's own close_step */
  free(st->cb);
  free(st->name);
  free(st->msg);
  bval_list_free(st->in, st->nin);
  bval_list_free(st->out, st->nout);
  free(st);
}

/* ------------------------------------------------------- on the thread pool ---- */

/* Protected, on the state's main thread: loads the bootstrap and runs it with the
 * spec (the module name, or the backend table decoded with its functions). */
static int start_p(lua_State *S) {
  bk *b = lua_touserdata(S, 1);
  lua_settop(S, 0);
  lua_newtable(S);
  lua_setfield(S, LUA_REGISTRYINDEX, COS_KEY);
  if (luaL_loadbufferx(S, BOOTSTRAP, sizeof BOOTSTRAP - 1, "=(flame backend)", "t") != LUA_OK)
    return lua_error(S);
  if (b->name) {
    lua_pushstring(S, b->name);
  } else {
    codec_opts o;
    codec_opts_init(&o);
    o.functions = 1;
    int n = codec_decode(S, (const char *)b->spec.data, b->spec.len, &o);
    if (n < 0) return lua_error(S);
    if (n != 1) return luaL_error(S, "the backend table did not cross whole");
  }
  return 1 + 1;                     /* the chunk and its argument, for the bounded call */
}

static void set_msg(bstep *st, const char *m) {
  st->outcome = BO_ERROR;
  free(st->msg);
  st->msg = strdup(m ? m : "(error object is not a string)");
}

static const char *kill_text(void) {
  return "a backend callback computed for more than 2000 ms without waiting, and was "
         "stopped (a backend waits for what it needs: flame.sleep, http, proc, "
         "await_remote_up)";
}

static void do_start(bk *b, bstep *st) {
  sandbox_config c;
  memset(&c, 0, sizeof c);
  c.profile = SANDBOX_BACKEND;
  c.memory_limit = BK_MEMORY;
  c.path = b->path;
  const char *err = NULL;
  b->sb = sandbox_new(&c, &err);
  if (b->sb == NULL) {
    char m[300];
    snprintf(m, sizeof m, "cannot make a backend state: %s", err ? err : "?");
    set_msg(st, m);
    return;
  }
  lua_State *S = sandbox_state(b->sb);
  lua_settop(S, 0);
  lua_pushcfunction(S, start_p);
  lua_pushlightuserdata(S, b);
  if (lua_pcall(S, 1, 2, 0) != LUA_OK) {
    set_msg(st, lua_tostring(S, -1));
  } else if (sandbox_pcall_bounded(b->sb, 1, 0, BK_STEP_LIMIT) != LUA_OK) {
    if (sandbox_killed(b->sb)) set_msg(st, kill_text());
    else set_msg(st, lua_tostring(S, -1));
  } else {
    st->outcome = BO_DONE;
  }
  lua_settop(S, 0);
  sandbox_rearm(b->sb);
}

/* Protected: puts the coroutine and what it is given on its stack; returns it. */
static int prepare_p(lua_State *S) {
  bstep *st = lua_touserdata(S, 1);
  lua_settop(S, 0);
  lua_getfield(S, LUA_REGISTRYINDEX, COS_KEY);
  lua_State *co;
  if (st->kind == BS_CALL) {
    co = lua_newthread(S);
    lua_pushvalue(S, -1);
    lua_rawseti(S, 1, st->co);
    lua_getglobal(co, "__flame_dispatch");
    lua_pushstring(co, st->cb);
    if (st->nin > 0) bval_push(co, &st->in[0]);
    else lua_pushnil(co);
  } else {
    if (lua_rawgeti(S, 1, st->co) != LUA_TTHREAD) return luaL_error(S, "no such callback");
    co = lua_tothread(S, -1);
    luaL_checkstack(co, st->nin + 4, "too many values");
    for (int i = 0; i < st->nin; i++) bval_push(co, &st->in[i]);
  }
  lua_pushlightuserdata(S, co);
  return 1;
}

static void forget(lua_State *S, int64_t co) {
  if (lua_getfield(S, LUA_REGISTRYINDEX, COS_KEY) == LUA_TTABLE) {
    lua_pushnil(S);
    lua_rawseti(S, -2, co);
  }
  lua_pop(S, 1);
}

/* Whether an error message carries a position ("file:12: ..."): a bug in the
 * backend, whose traceback helps; error(msg, 0) is a message for the user. */
static int positioned(const char *m) {
  for (const char *p = m; *p && *p != '\n'; p++) {
    if (*p != ':' || p[1] < '0' || p[1] > '9') continue;
    const char *q = p + 1;
    while (*q >= '0' && *q <= '9') q++;
    if (q[0] == ':' && q[1] == ' ') return 1;
  }
  return 0;
}

/* Protected: nil and "bad request: why", for a coroutine that yielded no request. */
static int bad_request_p(lua_State *S) {
  lua_pushnil(S);
  lua_pushfstring(S, "bad request: %s", lua_tostring(S, 1));
  return 2;
}

/* Protected: the error message with the traceback when it is a bug's. */
static int error_text_p(lua_State *S) {
  lua_State *co = lua_touserdata(S, 1);
  const char *m = lua_tostring(co, -1);
  if (m == NULL) m = "(error object is not a string)";
  if (positioned(m)) luaL_traceback(S, co, m, 0);
  else lua_pushstring(S, m);
  return 1;
}

static void do_step(bk *b, bstep *st) {
  if (b->sb == NULL) {
    set_msg(st, b->start_err ? b->start_err : "the runner's backend state is closed");
    return;
  }
  lua_State *S = sandbox_state(b->sb);
  lua_settop(S, 0);
  lua_pushcfunction(S, prepare_p);
  lua_pushlightuserdata(S, st);
  if (lua_pcall(S, 1, 1, 0) != LUA_OK) {
    set_msg(st, lua_tostring(S, -1));
    lua_settop(S, 0);
    forget(S, st->co);
    return;
  }
  lua_State *co = lua_touserdata(S, -1);
  lua_settop(S, 0);
  int nargs = st->kind == BS_CALL ? 2 : st->nin;
  for (;;) {
    int nres = 0;
    int rs = sandbox_resume_bounded(b->sb, co, nargs, &nres, BK_STEP_LIMIT);
    if (sandbox_killed(b->sb)) {
      set_msg(st, kill_text());
      break;
    }
    if (rs == LUA_YIELD) {
      char why[200];
      int is_req = nres > 0 && lua_type(co, -nres) == LUA_TSTRING;
      const char *name = is_req ? lua_tostring(co, -nres) : NULL;
      if (is_req && bval_read_list(co, -nres + 1, nres - 1, &st->out, why, sizeof why) == 0) {
        st->outcome = BO_REQUEST;
        st->nout = nres - 1;
        st->name = strdup(name);
        lua_pop(co, nres);
        if (st->name == NULL) {
          bval_list_free(st->out, st->nout);
          st->out = NULL;
          st->nout = 0;
          set_msg(st, "not enough memory");
          break;
        }
        return;                       /* the coroutine waits for the answer */
      }
      if (!is_req) snprintf(why, sizeof why, "not a request");
      lua_pop(co, nres);              /* answered here, at once: nil and why, made */
      lua_pushcfunction(S, bad_request_p);   /* where a memory error is caught */
      lua_pushstring(S, why);         /* no allocation: a literal's room is kept */
      if (lua_checkstack(co, 2) == 0 || lua_pcall(S, 1, 2, 0) != LUA_OK) {
        lua_settop(S, 0);
        set_msg(st, "the backend made a bad request and there is no memory to tell it why");
        break;
      }
      lua_xmove(S, co, 2);
      nargs = 2;
      continue;
    }
    if (rs == LUA_OK) {
      char why[200];
      if (bval_read_list(co, -nres, nres, &st->out, why, sizeof why) == 0) {
        st->outcome = BO_DONE;
        st->nout = nres;
      } else {
        char m[260];
        snprintf(m, sizeof m, "the backend's answer cannot be read: %s", why);
        set_msg(st, m);
      }
      break;
    }
    lua_pushcfunction(S, error_text_p);
    lua_pushlightuserdata(S, co);
    if (lua_pcall(S, 1, 1, 0) == LUA_OK) set_msg(st, lua_tostring(S, -1));
    else set_msg(st, "the backend raised an error, and there is no memory to read it");
    lua_settop(S, 0);
    break;
  }
  forget(S, st->co);                  /* ended: returned, raised or stopped */
  lua_settop(S, 0);
  sandbox_rearm(b->sb);
}

static void step_work(uv_work_t *w) {
  bk *b = w->data;
  bstep *st = b->running;
  if (st->kind == BS_START) do_start(b, st);
  else if (st->kind == BS_CLOSE) {
    if (b->sb) sandbox_close(b->sb);
    b->sb = NULL;
  } else do_step(b, st);
}

/* --------------------------------------------------------- runtime thread ---- */

static void pump(bk *b);

static void post_done(bk *b, int64_t co, int ok, bval *vals, int n, const char *msg) {
  for (bkcall **q = &b->ccalls; *q; q = &(*q)->next) {
    if ((*q)->co == co) {             /* the runtime side's own call */
      bkcall *c = *q;
      *q = c->next;
      c->fn(c->ud, ok, vals, n, ok ? NULL : (msg ? msg : "failed"));
      free(c);
      return;
    }
  }
  (void)b;
  bval_list_free(vals, n);            /* a call nobody waits for any more */
}

/* Frees what b holds and b (not linked, not holding its hub: any thread). */
static void bk_fields_free(bk *b) {
  free(b->runner);
  free(b->handles);
  free(b->name);
  free(b->path);
  free(b->start_err);
  buf_free(&b->spec);
  free(b);
}

static void bk_free(bk *b) {
  for (bk **p = &all; *p; p = &(*p)->next) {
    if (*p == b) {
      *p = b->next;
      break;
    }
  }
  if (b->h) hub_release(b->h);
  bk_fields_free(b);
}

/* The requests, served on the runtime thread (bsvc.h). */
static const struct {
  const char *name;
  bk_service fn;
} services[] = {
  { "sleep", bsvc_sleep }, { "send_after", bsvc_send_after }, { "exit", bsvc_exit },
  { "log", bsvc_log }, { "proc_spawn", bsvc_proc_spawn }, { "proc_run", bsvc_proc_run },
  { "proc_kill", bsvc_proc_kill }, { "proc_exited", bsvc_proc_exited },
  { "http_request", bsvc_http_request }, { "http_watch", bsvc_http_watch },
  { "http_stream", bsvc_http_stream }, { "stream_read", bsvc_stream_read },
  { "stream_close", bsvc_stream_close }, { "parent_new", bsvc_parent_new },
  { "await_remote_up", bsvc_await_remote_up }, { "local_terminator", bsvc_local_terminator },
  { "spawn_monitor", bsvc_spawn_monitor }, { "config", bsvc_config },
  { "flame_bin", bsvc_flame_bin }, { "code_paths", bsvc_code_paths }, { NULL, NULL }
};

static void serve(bk *b, bstep *st) {
  if (b->closing) return;             /* closed while it ran: no resource may start now */
  for (int i = 0; services[i].name; i++) {
    if (strcmp(services[i].name, st->name) == 0) {
      bval *args = st->out;
      int n = st->nout;
      st->out = NULL;
      st->nout = 0;
      services[i].fn(b, st->co, args, n);
      return;
    }
  }
  bk_fail(b, st->co, "the backend environment has no %s", st->name);
}

static void step_after(uv_work_t *w, int status) {
  bk *b = w->data;
  bstep *st = b->running;
  b->running = NULL;
  if (status != 0 && st->outcome == BO_NONE) set_msg(st, "the step was cancelled");
  switch (st->kind) {
    case BS_START:
      if (st->outcome != BO_DONE) b->start_err = dup(st->msg ? st->msg : "cannot start");
      break;
    case BS_CLOSE:
      step_free(st);
      bk_free(b);
      return;
    default:
      if (st->outcome == BO_REQUEST) serve(b, st);
      else if (st->outcome == BO_DONE) {
        post_done(b, st->co, 1, st->out, st->nout, NULL);
        st->out = NULL;
        st->nout = 0;
      } else {
        post_done(b, st->co, 0, NULL, 0, st->msg);
      }
      break;
  }
  step_free(st);
  pump(b);
}

static void enqueue(bk *b, bstep *st) {
  st->next = NULL;
  if (b->tail) b->tail->next = st;
  else b->queue = st;
  b->tail = st;
  pump(b);
}

static void pump(bk *b) {
  while (b->running == NULL && b->queue) {
    bstep *st = b->queue;
    b->queue = st->next;
    if (b->queue == NULL) b->tail = NULL;
    if (st->kind == BS_CALL && b->start_err) {   /* no state: the call fails now */
      post_done(b, st->co, 0, NULL, 0, b->start_err);
      step_free(st);
      continue;
    }
    b->running = st;
    b->work.data = b;
    int rc = uv_queue_work(runtime_loop(), &b->work, step_work, step_after);
    if (rc != 0) {
      b->running = NULL;
      if (st->kind == BS_CLOSE) {         /* closed here, then */
        if (b->sb) sandbox_close(b->sb);
        b->sb = NULL;
        step_free(st);
        bk_free(b);
        return;
      }
      char m[160];
      snprintf(m, sizeof m, "cannot run the backend's step: %s", uv_strerror(rc));
      if (st->kind == BS_START) b->start_err = dup(m);
      else post_done(b, st->co, 0, NULL, 0, m);
      step_free(st);
    }
  }
}

static bk *find(int64_t id) {
  for (bk *b = all; b; b = b->next)
    if (b->id == id) return b;
  return NULL;
}

/* Closes b: what waits in its queue is answered "closed", then the state closes
 * on the thread pool once the running step (if any) is done. */
static void close_bk(bk *b) {
  if (b->closing) return;
  b->closing = 1;
  while (b->res) {                    /* timers, processes, requests: no callback after */
    bk_res *r = b->res;
    bk_res_remove(r);
    r->close(r);
  }
  b->nhandles = 0;                    /* what they named is gone */
  bstep *st = b->queue;
  b->queue = b->tail = NULL;
  while (st) {
    bstep *next = st->next;
    if (st->kind == BS_CALL) post_done(b, st->co, 0, NULL, 0, "the runner's backend state is closed");
    step_free(st);
    st = next;
  }
  while (b->ccalls)                   /* waiting on a request that will not be answered */
    post_done(b, b->ccalls->co, 0, NULL, 0, "the runner's backend state is closed");
  bstep *c = &b->close_step;          /* made with b: a close needs no memory */
  memset(c, 0, sizeof *c);
  c->kind = BS_CLOSE;
  enqueue(b, c);
}

/* At exit, after the loop stopped: every state closes on the thread pool, after
 * its running step (the loop runs on until the work is done); nothing is posted. */
static void backends_at_stop(void) {
  bk *b = all;
  while (b) {
    bk *next = b->next;                 /* close_bk may free b at once */
    close_bk(b);
    b = next;
  }
}

int backend_call(int64_t id, const char *cb, bval *arg, bk_done_fn fn, void *ud) {
  bk *b = find(id);
  bkcall *c = b && !b->closing ? calloc(1, sizeof *c) : NULL;
  bstep *st = c ? calloc(1, sizeof *st) : NULL;
  if (st == NULL || (st->cb = strdup(cb)) == NULL) {
    free(st);
    free(c);
    bval_free(arg);
    return -1;
  }
  /* apart from the ids the pool's Lua picks (counted from 1) */
  c->co = ((int64_t)1 << 48) + ++b->next_cco;
  c->fn = fn;
  c->ud = ud;
  c->next = b->ccalls;
  b->ccalls = c;
  st->kind = BS_CALL;
  st->co = c->co;
  st->in = malloc(sizeof *st->in);
  if (st->in == NULL) {
    b->ccalls = c->next;
    free(c);
    step_free(st);
    bval_free(arg);
    return -1;
  }
  *st->in = *arg;
  arg->type = BV_NIL;
  st->nin = 1;
  enqueue(b, st);
  return 0;
}

/* ------------------------------------------------- for the services (bsvc.h) ---- */

uv_loop_t *bk_loop(void) {
  return runtime_loop();
}

const char *bk_runner(const bk *b) {
  return b->runner ? b->runner : "?";
}

hub *bk_hub(bk *b) {
  return b->h;
}

int64_t bk_id(const bk *b) {
  return b->id;
}

int bk_is_min(const bk *b) {
  return b->is_min;
}

struct blink **bk_link(bk *b) {
  return &b->link;
}

bk *bk_find(int64_t id) {
  bk *b = find(id);
  return b && !b->closing ? b : NULL;
}

void bk_answer(bk *b, int64_t co, bval *vals, int n) {
  bstep *st = b->closing ? NULL : calloc(1, sizeof *st);
  if (st == NULL) {                   /* closing, or no memory: the coroutine is dropped */
    bval_list_free(vals, n);
    return;
  }
  st->kind = BS_RESUME;
  st->co = co;
  st->in = vals;
  st->nin = n;
  enqueue(b, st);
}

void bk_answer_bool(bk *b, int64_t co, int v) {
  bval *x = calloc(1, sizeof *x);
  if (x) bval_set_bool(x, v);
  bk_answer(b, co, x, x ? 1 : 0);
}

void bk_fail(bk *b, int64_t co, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  bval *v = calloc(2, sizeof *v);
  if (v == NULL || bval_set_str(&v[1], msg, strlen(msg)) != 0) {
    free(v);
    bk_answer(b, co, NULL, 0);
    return;
  }
  bk_answer(b, co, v, 2);
}

void bk_info(bk *b, bval *msg) {
  if (b->closing) {
    bval_free(msg);
    return;
  }
  runner_on_info(b->id, msg);         /* its handle_info decides (runner.c) */
}

void bk_log(bk *b, const char *level, const char *fmt, ...) {
  hub_event *e = hub_event_new(EV_BLOG);
  if (e == NULL) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);        /* whole lines: a child's are 64 KiB */
  va_end(ap);
  char *line = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (line) {
    va_start(ap, fmt);
    vsnprintf(line, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  e->tid = b->id;
  e->text = strdup(level);
  e->text2 = line;
  if (e->text == NULL || e->text2 == NULL) {
    hub_event_free(e);
    return;
  }
  hub_post(b->h, e);
}

void bk_procs(bk *b, int delta) {
  b->nprocs += delta;
  runner_on_procs(b->id, b->nprocs);  /* a shutdown waits for them (runner.c) */
}

void bk_res_add(bk *b, bk_res *r) {
  r->next = b->res;
  if (b->res) b->res->pprev = &r->next;
  r->pprev = &b->res;
  b->res = r;
}

void bk_res_remove(bk_res *r) {
  if (r->pprev == NULL) return;
  *r->pprev = r->next;
  if (r->next) r->next->pprev = r->pprev;
  r->next = NULL;
  r->pprev = NULL;
}

int64_t bk_handle_new(bk *b, int kind, void *obj) {
  if (b->nhandles == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 8;
    bhandle *h = realloc(b->handles, cap * sizeof *h);
    if (h == NULL) return -1;
    b->handles = h;
    b->cap = cap;
  }
  int64_t id = ((int64_t)1 << 32) + ++b->next_handle;
  b->handles[b->nhandles++] = (bhandle){ id, kind, obj };
  return id;
}

void *bk_handle_get(bk *b, int64_t id, int kind) {
  for (size_t i = 0; i < b->nhandles; i++)
    if (b->handles[i].id == id && b->handles[i].kind == kind) return b->handles[i].obj;
  return NULL;
}

void bk_handle_drop(bk *b, int64_t id) {
  for (size_t i = 0; i < b->nhandles; i++) {
    if (b->handles[i].id == id) {
      b->handles[i] = b->handles[--b->nhandles];
      return;
    }
  }
}

static int table_add(bval *t, const char *k, bval *v) {
  if (t->type != BV_TABLE) {
    t->type = BV_TABLE;
    t->u.t.kv = NULL;
    t->u.t.n = 0;
  }
  bkv *kv = realloc(t->u.t.kv, (t->u.t.n + 1) * sizeof *kv);
  if (kv == NULL) {
    bval_free(v);
    return -1;
  }
  t->u.t.kv = kv;
  if (bval_set_str(&kv[t->u.t.n].k, k, strlen(k)) != 0) {
    bval_free(v);
    return -1;
  }
  kv[t->u.t.n].v = *v;
  v->type = BV_NIL;
  t->u.t.n++;
  return 0;
}

int bk_table_set(bval *t, const char *k, bval *v) {
  return table_add(t, k, v);
}

int bk_table_set_str(bval *t, const char *k, const char *s, size_t len) {
  bval v;
  if (bval_set_str(&v, s, len) != 0) return -1;
  return table_add(t, k, &v);
}

int bk_table_set_int(bval *t, const char *k, lua_Integer i) {
  bval v;
  bval_set_int(&v, i);
  return table_add(t, k, &v);
}

int bk_table_set_bool(bval *t, const char *k, int x) {
  bval v;
  bval_set_bool(&v, x);
  return table_add(t, k, &v);
}

/* ------------------------------------------------- for runner.c ---- */

int64_t backend_new(hub *h, const char *name, const void *spec, size_t slen,
                    const char *path, const char *runner, int is_min, char *err,
                    size_t errlen) {
  static int registered;
  if (!registered) {
    registered = 1;
    runtime_at_stop(backends_at_stop);
  }
  if ((name != NULL) == (spec != NULL)) {
    snprintf(err, errlen, "a backend module name or the backend's bytes expected");
    return -1;
  }
  bk *b = calloc(1, sizeof *b);
  bstep *st = calloc(1, sizeof *st);
  if (b == NULL || st == NULL) goto oom;
  b->id = (int64_t)atomic_fetch_add(&next_id, 1) + 1;
  b->h = h;
  b->is_min = is_min;
  b->name = dup(name);
  b->path = dup(path ? path : "");
  b->runner = dup(runner ? runner : "?");
  if ((name && b->name == NULL) || b->path == NULL || b->runner == NULL
      || (spec && buf_append(&b->spec, spec, slen) != 0))
    goto oom;
  hub_hold(h);
  b->next = all;
  all = b;
  st->kind = BS_START;                /* made on the thread pool */
  enqueue(b, st);
  return b->id;
oom:
  if (b) bk_fields_free(b);
  free(st);
  snprintf(err, errlen, "not enough memory");
  return -1;
}

void backend_close(int64_t id) {
  bk *b = find(id);
  if (b) close_bk(b);
}
