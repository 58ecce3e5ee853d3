/*
 * loop.c - the libuv loop of a Lua state, and the primitives the Lua scheduler
 * (lua/flame/task.lua) builds tasks on: run the loop, one-shot timers, and an idle
 * dispatcher that resumes ready tasks.
 *
 * Contract:
 * - One loop per Lua state (core.loop() makes it on first use; it lives in the
 *   registry until lua_close, whose finalizer closes every handle and the loop).
 * - Callbacks into Lua run on the thread that called loop:run, through
 *   flame_pcall_report: an error in one is reported on stderr and does not stop the
 *   loop (the scheduler catches task errors itself, so these are bugs).
 * - loop:run is not reentrant (libuv's uv_run is not): calling it from a callback
 *   raises.
 * - A timer fires once; its callback is called exactly once unless stopped first.
 */
#include <errno.h>
#ifndef __linux__
#include <fcntl.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "loop.h"

#define LOOP_KEY "flame.loop.instance"
#define LOOP_MT "flame.loop"
#define TIMER_MT "flame.timer"

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = lua_pushfstring(L, "(error object is a %s value)",
                                         luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

int flame_pcall_report(lua_State *L, int nargs, const char *where) {
  int base = lua_gettop(L) - nargs;          /* the function's index */
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  int st = lua_pcall(L, nargs, 0, base);
  if (st != LUA_OK) {
    fprintf(stderr, "flame: error in %s: %s\n", where,
            lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(not a string)");
    lua_pop(L, 1);
  }
  lua_remove(L, base);
  return st;
}

/* ----------------------------------------------------------------- waker ---- */

/* Reads what the senders wrote: an eventfd's count in one read, a pipe until empty. */
static void waker_drain(flame_waker *w) {
  char b[64];
  for (;;) {
    ssize_t n = read(w->rfd, b, sizeof b);
    if (n < 0 && errno == EINTR) continue;
    if (n > 0 && w->rfd != w->wfd) continue;
    return;
  }
}

/* ------------------------------------------------------------------ spin ---- */

static uint64_t loop_spin_ns;
static int loop_spin_load;                 /* the machine's cores */
static uv_once_t loop_spin_once = UV_ONCE_INIT;
static __thread uint64_t spin_until;       /* this thread's loop polls until then */
static __thread int spin_here;             /* this thread runs a spinning loop */

uint64_t flame_spin_window_ns(const char *env) {
  const char *e = getenv(env);
  long us = 50;
  if (e && *e) {
    char *end;
    long v = strtol(e, &end, 10);
    if (*end == '\0' && v >= 0 && v <= 1000000) us = v;
  }
  return uv_available_parallelism() > 1 ? (uint64_t)us * 1000 : 0;
}

static void loop_spin_init(void) {
  loop_spin_load = (int)uv_available_parallelism();
  loop_spin_ns = flame_spin_window_ns("FLAME_LOOP_SPIN_US");
}

void flame_spin_touch(void) {
  if (spin_here) spin_until = uv_hrtime() + loop_spin_ns;
}

/* Active, it makes the poll not wait; a thread ready to run on this core (the
 * peer this loop waits for, perhaps) goes first. */
static void spin_idle(uv_idle_t *h) {
  (void)h;
  sched_yield();
}

/* After each poll: within the window the next poll does not wait, else it sleeps. */
static void spin_check(uv_check_t *h) {
  flame_spin *s = h->data;
  int want = *s->load <= loop_spin_load && uv_hrtime() < spin_until;
  if (want == s->spinning) return;
  if (want ? uv_idle_start(&s->idle, spin_idle) : uv_idle_stop(&s->idle)) return;
  s->spinning = want;
}

int flame_spin_start(uv_loop_t *loop, flame_spin *s, const int *load) {
  uv_once(&loop_spin_once, loop_spin_init);
  s->spinning = s->made = 0;
  s->load = load;
  if (loop_spin_ns == 0) return 0;
  int rc = uv_idle_init(loop, &s->idle);
  if (rc != 0) return rc;
  if ((rc = uv_check_init(loop, &s->check)) != 0) {
    uv_close((uv_handle_t *)&s->idle, NULL);
    return rc;
  }
  s->idle.data = s->check.data = s;
  uv_unref((uv_handle_t *)&s->idle);
  uv_unref((uv_handle_t *)&s->check);
  s->made = 1;
  if ((rc = uv_check_start(&s->check, spin_check)) != 0) {
    flame_spin_close(s);
    return rc;
  }
  spin_here = 1;
  return 0;
}

void flame_spin_close(flame_spin *s) {
  if (!s->made) return;
  s->made = 0;
  spin_here = 0;
  if (!uv_is_closing((uv_handle_t *)&s->idle)) uv_close((uv_handle_t *)&s->idle, NULL);
  if (!uv_is_closing((uv_handle_t *)&s->check)) uv_close((uv_handle_t *)&s->check, NULL);
}

static void on_waker(uv_poll_t *p, int status, int events) {
  (void)events;
  flame_waker *w = (flame_waker *)(void *)((char *)p - offsetof(flame_waker, poll));
  if (status < 0) {
    /* libuv stops a poll that reported an error: a waker that stopped would lose
     * every wake-up from now on, so it polls again (an eventfd has no error to
     * repeat; should it, the process cannot go on without its wake-ups) */
    int rc = uv_poll_start(p, UV_READABLE, on_waker);
    if (rc != 0) {
      fprintf(stderr, "flame: the loop's wake-up handle failed (%s): aborting\n",
              uv_strerror(rc));
      abort();
    }
  }
  waker_drain(w);
  flame_spin_touch();
  /* cleared before cb looks at its queue: what is queued from now on wakes again */
  __atomic_store_n(&w->pending, 0, __ATOMIC_SEQ_CST);
  w->cb(w);
}

#ifndef __linux__
static int nonblock_cloexec(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
  int fdf = fcntl(fd, F_GETFD);
  if (fdf < 0 || fcntl(fd, F_SETFD, fdf | FD_CLOEXEC) < 0) return -1;
  return 0;
}
#endif

void flame_waker_end(flame_waker *w) {
  if (w->wfd >= 0 && w->wfd != w->rfd) close(w->wfd);
  if (w->rfd >= 0) close(w->rfd);
  w->rfd = w->wfd = -1;
}

int flame_waker_init(uv_loop_t *loop, flame_waker *w, void (*cb)(flame_waker *w)) {
  w->rfd = w->wfd = -1;
  w->pending = 0;
  w->made = 0;
  w->cb = cb;
#ifdef __linux__
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return uv_translate_sys_error(errno);
  w->rfd = w->wfd = fd;
#else
  int fds[2];
  if (pipe(fds) != 0) return uv_translate_sys_error(errno);
  w->rfd = fds[0];
  w->wfd = fds[1];
  if (nonblock_cloexec(fds[0]) != 0 || nonblock_cloexec(fds[1]) != 0) {
    int e = uv_translate_sys_error(errno);
    flame_waker_end(w);
    return e;
  }
#endif
  int rc = uv_poll_init(loop, &w->poll, w->rfd);
  if (rc != 0) {
    flame_waker_end(w);
    return rc;
  }
  w->made = 1;
  return uv_poll_start(&w->poll, UV_READABLE, on_waker);
}

void flame_waker_send(flame_waker *w) {
  if (__atomic_exchange_n(&w->pending, 1, __ATOMIC_SEQ_CST) != 0) return;  /* on its way */
#ifdef __linux__
  uint64_t one = 1;
#else
  char one = 0;
#endif
  /* EAGAIN: a full pipe is readable already */
  while (write(w->wfd, &one, sizeof one) < 0 && errno == EINTR) {}
}

void flame_waker_close(flame_waker *w, uv_close_cb close_cb) {
  /* uv_close stops the poll (the descriptor leaves epoll) before it returns */
  if (w->made && !uv_is_closing((uv_handle_t *)&w->poll))
    uv_close((uv_handle_t *)&w->poll, close_cb);
  flame_waker_end(w);
}

/* ------------------------------------------------------------------ loop ---- */

static void on_idle(uv_idle_t *h) {
  flame_loop *lp = (flame_loop *)(void *)((char *)h - offsetof(flame_loop, idle));
  uv_idle_stop(h);                           /* the dispatcher wakes again if needed */
  lua_State *L = lp->L;
  if (L == NULL || lp->dispatch_ref == LUA_NOREF) return;
  if (!lua_checkstack(L, 4)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, lp->dispatch_ref);
  flame_pcall_report(L, 0, "the task dispatcher");
}

static void close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, h->data == NULL ? NULL : ((flame_handle *)h->data)->on_close);
}

static int loop_gc(lua_State *L) {
  flame_loop *lp = luaL_checkudata(L, 1, LOOP_MT);
  if (lp->closed) return 0;
  lp->closed = 1;
  lp->L = NULL;                              /* no more calls into Lua from here on */
  luaL_unref(L, LUA_REGISTRYINDEX, lp->dispatch_ref);
  lp->dispatch_ref = LUA_NOREF;
  uv_walk(&lp->uv, close_walk, NULL);
  uv_run(&lp->uv, UV_RUN_DEFAULT);           /* close callbacks free their memory */
  if (uv_loop_close(&lp->uv) != 0)
    fprintf(stderr, "flame: the loop still had handles when the state closed\n");
  return 0;
}

flame_loop *flame_loop_get(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, LOOP_KEY) == LUA_TUSERDATA) {
    flame_loop *lp = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return lp;
  }
  lua_pop(L, 1);
  flame_loop *lp = lua_newuserdatauv(L, sizeof *lp, 0);
  lp->closed = 1;                            /* until uv_loop_init succeeds */
  lp->L = NULL;
  lp->running = 0;
  lp->dispatch_ref = LUA_NOREF;
  luaL_setmetatable(L, LOOP_MT);
  int rc = uv_loop_init(&lp->uv);
  if (rc != 0) luaL_error(L, "flame: cannot create the event loop: %s", uv_strerror(rc));
  rc = uv_idle_init(&lp->uv, &lp->idle);
  if (rc != 0) {
    uv_loop_close(&lp->uv);
    luaL_error(L, "flame: cannot create the event loop: %s", uv_strerror(rc));
  }
  lp->idle.data = NULL;                      /* closed by the walk, nothing to free */
  lp->closed = 0;
  lua_setfield(L, LUA_REGISTRYINDEX, LOOP_KEY);
  return lp;
}

static flame_loop *loop_check(lua_State *L) {
  flame_loop *lp = luaL_checkudata(L, 1, LOOP_MT);
  if (lp->closed) luaL_error(L, "flame: the event loop is closed");
  return lp;
}

/* loop:run(mode) -> alive: mode "default" | "once" | "nowait" */
static int loop_run(lua_State *L) {
  static const char *const modes[] = { "default", "once", "nowait", NULL };
  static const uv_run_mode uvmodes[] = { UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT };
  flame_loop *lp = loop_check(L);
  int m = luaL_checkoption(L, 2, "default", modes);
  if (lp->running)
    return luaL_error(L, "flame: the event loop is already running (wait inside a "
                         "task, not inside a callback)");
  lua_State *prev = lp->L;
  lp->L = L;
  lp->running = 1;
  int alive = uv_run(&lp->uv, uvmodes[m]);
  lp->running = 0;
  lp->L = prev;
  lua_pushboolean(L, alive || uv_loop_alive(&lp->uv));
  return 1;
}

static int loop_running(lua_State *L) {
  flame_loop *lp = loop_check(L);
  lua_pushboolean(L, lp->running);
  return 1;
}

/* loop:on_idle(fn): the function the idle handle calls after loop:wake() */
static int loop_on_idle(lua_State *L) {
  flame_loop *lp = loop_check(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  luaL_unref(L, LUA_REGISTRYINDEX, lp->dispatch_ref);
  lp->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static int loop_wake(lua_State *L) {
  flame_loop *lp = loop_check(L);
  if (!uv_is_active((uv_handle_t *)&lp->idle)) {
    int rc = uv_idle_start(&lp->idle, on_idle);
    if (rc != 0) return luaL_error(L, "flame: uv_idle_start: %s", uv_strerror(rc));
  }
  return 0;
}

static int loop_now(lua_State *L) {
  flame_loop *lp = loop_check(L);
  uv_update_time(&lp->uv);
  lua_pushinteger(L, (lua_Integer)uv_now(&lp->uv));
  return 1;
}

/* ---------------------------------------------------------------- timers ---- */

typedef struct ftimer {
  flame_handle base;                         /* first: close callbacks find it */
  uv_timer_t h;
  flame_loop *lp;
  int cb_ref;
  struct ftimer **owner;                     /* the Lua handle pointing here, or NULL */
} ftimer;

static void timer_free(uv_handle_t *h) {
  free(((ftimer *)h->data));
}

static void timer_release(ftimer *t) {
  if (t->owner) *t->owner = NULL;
  t->owner = NULL;
  if (t->lp->L) luaL_unref(t->lp->L, LUA_REGISTRYINDEX, t->cb_ref);
  t->cb_ref = LUA_NOREF;
  uv_close((uv_handle_t *)&t->h, timer_free);
}

static void on_timer(uv_timer_t *h) {
  ftimer *t = h->data;
  lua_State *L = t->lp->L;
  if (L != NULL && lua_checkstack(L, 4)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->cb_ref);
    timer_release(t);                        /* before the call: it may stop others */
    flame_pcall_report(L, 0, "a timer callback");
  } else {
    timer_release(t);
  }
}

/* loop:timer(ms, fn) -> handle with :stop() */
static int loop_timer(lua_State *L) {
  flame_loop *lp = loop_check(L);
  lua_Number ms = luaL_checknumber(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, ms >= 0 && ms < 1e15, 2, "milliseconds in [0, 1e15) expected");
  ftimer **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, TIMER_MT);
  ftimer *t = calloc(1, sizeof *t);
  if (t == NULL) return luaL_error(L, "not enough memory");
  int rc = uv_timer_init(&lp->uv, &t->h);
  if (rc != 0) {
    free(t);
    return luaL_error(L, "flame: uv_timer_init: %s", uv_strerror(rc));
  }
  t->h.data = t;
  t->base.on_close = timer_free;
  t->lp = lp;
  lua_pushvalue(L, 3);
  t->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  rc = uv_timer_start(&t->h, on_timer, (uint64_t)ms, 0);
  if (rc != 0) {
    timer_release(t);
    return luaL_error(L, "flame: uv_timer_start: %s", uv_strerror(rc));
  }
  t->owner = ud;
  *ud = t;
  return 1;
}

/* timer:stop() -> true if it was stopped before firing */
static int timer_stop(lua_State *L) {
  ftimer **ud = luaL_checkudata(L, 1, TIMER_MT);
  if (*ud == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  timer_release(*ud);
  lua_pushboolean(L, 1);
  return 1;
}

static int timer_gc(lua_State *L) {
  ftimer **ud = luaL_checkudata(L, 1, TIMER_MT);
  if (*ud) (*ud)->owner = NULL;              /* the timer still fires */
  return 0;
}

static int l_loop(lua_State *L) {
  flame_loop_get(L);
  lua_getfield(L, LUA_REGISTRYINDEX, LOOP_KEY);
  return 1;
}

void flame_loop_open(lua_State *L) {
  static const luaL_Reg loop_methods[] = {
    { "run", loop_run }, { "running", loop_running }, { "on_idle", loop_on_idle },
    { "wake", loop_wake }, { "now", loop_now }, { "timer", loop_timer }, { NULL, NULL }
  };
  static const luaL_Reg timer_methods[] = { { "stop", timer_stop }, { NULL, NULL } };
  if (luaL_newmetatable(L, LOOP_MT)) {
    luaL_newlib(L, loop_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, loop_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, TIMER_MT)) {
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, timer_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_loop);
  lua_setfield(L, -2, "loop");
}
