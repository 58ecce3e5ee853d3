/*
 * executor.h - runs encoded work on worker threads, each owning one sandbox.
 *
 * Contract:
 * - executor_submit queues a job, taking the bytes of `work` (no copy); a worker
 *   (made lazily, up to `workers`) decodes it into its sandbox (a fresh _ENV per job
 *   over the profile's libraries; loaded modules stay), runs it, and encodes the
 *   outcome (sandbox_run's format: a status byte, then codec data).
 * - Every submitted job completes exactly once: done(ud, id, out, truthy) is called
 *   on the loop's thread. out holds the status byte and codec data (empty when memory
 *   ran out); done may take out->data. For an EXECUTOR_CHECK job, truthy tells
 *   whether its first result is true (an idle check); for work it is 0. A job killed
 *   while queued completes as killed too; a job dropped by close does not complete.
 * - executor_kill reaches the job wherever it is: queued, or running (the sandbox's
 *   kill switch); a kill for a job that has ended does nothing.
 * - executor_close kills running work ("shutdown"), joins the workers, and frees
 *   everything once the loop has closed the wake-up handle (or at once when the
 *   loop is gone).
 * - Workers are woken one at a time: a job wakes an idle worker only when none is
 *   on its way already, and starts a new one only when none is idle or starting;
 *   a worker that takes a job with more pending wakes the next. Every job still
 *   gets a worker while jobs last (up to `workers`); a burst of short ones is
 *   served by the workers already awake.
 * - A worker with nothing to do may wait awake for the next job a short while
 *   before it sleeps (a caller calling one call after another then costs no
 *   wake-up): at most one worker of the process at a time, only while at most one
 *   job of the process is undelivered, never on one core. FLAME_WORKER_SPIN_US sets
 *   how long in us (default 50, at most 1 s, 0 turns it off); stats give it as
 *   `spin_us` and count the jobs so taken as `spun`.
 * Threads and locks: the loop thread submits, kills and closes; workers run jobs.
 * Lock order: executor.lock, then a sandbox's lock (sandbox_kill, sandbox_rearm).
 */
#ifndef FLAME_EXECUTOR_H
#define FLAME_EXECUTOR_H

#include <stdint.h>
#include <lua.h>
#include <uv.h>

#include "buf.h"
#include "sandbox.h"

typedef struct executor executor;

enum { EXECUTOR_WORK = 0, EXECUTOR_CHECK = 1 };
enum { EXECUTOR_QUEUED = 1, EXECUTOR_RUNNING = 2 };

typedef void (*executor_done_fn)(void *ud, int64_t id, buf *out, int truthy);

typedef struct executor_stats {
  int workers, max_workers, idle, running, peak, queued;
  long spun;                  /* jobs taken by a worker waiting awake (spin_for_job) */
  long spin_us;               /* how long a worker waits awake: 0 when it never does */
} executor_stats;

/* Flags of executor_new: EXECUTOR_PRESTART starts the first worker (and its
 * sandbox) now, instead of at the first job, and skips the probe below: ask
 * executor_ready whether that sandbox could be made. */
enum { EXECUTOR_PRESTART = 1 };

/* Waits until the prestarted worker has made its sandbox: 0, or -1 with the reason
 * copied into err (what a probe would have said: a missing --require module, a
 * memory limit too small). */
int executor_ready(executor *ex, char *err, size_t errlen);

/* cfg is copied (its strings and info bytes too). NULL with *err set to a static
 * message when the settings cannot make a sandbox (a probe sandbox is made and
 * closed) or memory ran out. */
executor *executor_new(uv_loop_t *loop, int workers, const sandbox_config *cfg, int flags,
                       executor_done_fn done, void *ud, const char **err);
/* The work is work's bytes from offset skip on (a SPAWN's header stays in front,
 * uncopied). 0, or -1 with *err set when no worker could be started at all (the job
 * is then not queued and will not complete). Takes work's bytes either way. */
int executor_submit(executor *ex, int64_t id, buf *work, size_t skip, int kind,
                    const char **err);
/* EXECUTOR_QUEUED, EXECUTOR_RUNNING, or 0 when the job has ended or is unknown. */
int executor_kill(executor *ex, int64_t id, int reason);
void executor_get_stats(executor *ex, executor_stats *st);
/* [-0, +1, m] st as a Lua table (the fields of executor_stats). */
void executor_stats_push(lua_State *L, const executor_stats *st);
/* loop_alive: 0 when the loop has already closed every handle (a Lua state's loop at
 * exit: its walk has freed the executor then), so the wake-up handle is not closed
 * twice. */
void executor_close(executor *ex, int loop_alive);
/* Like executor_close, but the workers are joined on libuv's thread pool, so the
 * loop's thread is not held by work stuck in a blocking C call; everything is freed
 * once they have gone. Only on a loop no close walk reaches while a join is queued
 * (the runtime's: it waits for executor_joining() to reach 0 before its walk); a Lua
 * state's loop uses executor_close. */
void executor_close_async(executor *ex);
/* Executors of executor_close_async not yet done (their loop must run for them). */
int executor_joining(void);

#endif
