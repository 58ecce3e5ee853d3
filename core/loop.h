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

/* A wake-up of a loop from any thread, in place of uv_async_t on the hot paths.
 * libuv's (1.44) receiver, once woken, spins until the sender has come back from
 * its write() to the loop's eventfd: on 2 cores, with the sender preempted by the
 * very thread it woke, that spin took a third of a local call's CPU (perf). Here
 * the receiver reads its own eventfd (a pipe where there is none) and runs cb; it
 * never waits for the sender. flame_waker_send writes only when no wake-up is
 * pending already (the flag is cleared before cb runs, so a send during cb wakes
 * again). Like a uv_async handle it keeps its loop alive unless unreferenced.
 * Contract:
 * - flame_waker_init(loop, w, cb): 0, or a libuv error. On an error w->made tells
 *   whether the handle was made all the same (its start failed): then it must be
 *   closed with flame_waker_close and its memory kept until close_cb. w->poll.data
 *   is the caller's (a flame_handle first, as for every flame handle).
 * - flame_waker_send(w): any thread, until w is closed; never blocks.
 * - flame_waker_close(w, close_cb) on the loop's thread: the handle is closed
 *   (close_cb when libuv lets go) and the descriptors now. A close walk that
 *   closes w->poll directly must be followed by flame_waker_end(w), which closes
 *   the descriptors once (flame_waker_close calls it). */
typedef struct flame_waker {
  uv_poll_t poll;
  int rfd, wfd;               /* the same eventfd, or a pipe's ends; -1 once closed */
  int pending;                /* atomic: a wake-up written and not yet read */
  int made;                   /* the poll handle was initialised */
  void (*cb)(struct flame_waker *w);
} flame_waker;

int flame_waker_init(uv_loop_t *loop, flame_waker *w, void (*cb)(flame_waker *w));
void flame_waker_send(flame_waker *w);
void flame_waker_close(flame_waker *w, uv_close_cb close_cb);
void flame_waker_end(flame_waker *w);

/* A loop that polls without sleeping for a while after its last event (loop.c):
 * waking a sleeping thread on another core costs these VMs about 20 us each way
 * (a trivial call on a process runner: ~26 us at the median with every thread on
 * one core, ~90 us across two), and a call crosses four sleeping loops. A loop
 * whose thread is woken by its peer's next message within the window finds it
 * without a wake-up. Window: FLAME_LOOP_SPIN_US (default 50, at most 1 s; 0 off),
 * off on a machine of one core. For the runtime's loop and a runner's main loop,
 * never the application's (a program waiting must not burn its core).
 * - flame_spin_start(loop, s, load): 0 or a libuv error; s lives as long as the
 *   loop's handles (its two handles are unreferenced: they keep no loop alive);
 *   *load (read on the loop's thread) above the machine's cores turns it off.
 * - flame_spin_touch(): an event came, on this thread's spinning loop (a no-op
 *   on a thread without one).
 * - flame_spin_close(s): closes its handles (no callback; s kept until the loop
 *   has run its close callbacks). */
typedef struct flame_spin {
  uv_idle_t idle;
  uv_check_t check;
  const int *load;            /* calls in flight, the owner's count: no spin above
                                 the machine's cores (a busy process's cores are
                                 better spent on its work than on polling) */
  int spinning;
  int made;                   /* started: its handles are to be closed */
} flame_spin;

int flame_spin_start(uv_loop_t *loop, flame_spin *s, const int *load);
/* A spin window in ns, this loop's or an executor worker's: the microseconds the
 * variable env says (0 to 1000000; anything else leaves 50), 0 on one core. */
uint64_t flame_spin_window_ns(const char *env);
void flame_spin_touch(void);
void flame_spin_close(flame_spin *s);

/* [-0, +0, e] The state's loop, made on first use. */
flame_loop *flame_loop_get(lua_State *L);

/* [-(nargs+1), +0, -] Calls the function below the nargs arguments; an error goes to
 * stderr with a traceback, naming where. Returns the lua_pcall status. */
int flame_pcall_report(lua_State *L, int nargs, const char *where);

void flame_loop_open(lua_State *L);

#endif
