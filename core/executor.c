/*
 * executor.c - worker threads running encoded work in sandboxes (contract in
 * executor.h), and the Lua object over it (core.executor) that the local backend's
 * runners use:
 *   core.executor{ workers = n, profile = "application"|"restricted",
 *                  memory_limit = bytes, requires = "m1,m2", info = bytes,
 *                  prestart = bool, on_done = function(id, status, payload) }
 *   exec:submit(id, bytes), exec:kill(id, reason) -> "queued"|"running"|nil,
 *   exec:ready() -> true | nil, why (prestart: could its sandbox be made?),
 *   exec:stats(), exec:close()
 * Threads and locks: the loop thread submits, kills and closes; workers run jobs.
 * Lock order: executor.lock, then a sandbox's lock (sandbox_kill, sandbox_rearm).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "codec.h"
#include "executor.h"
#include "loop.h"
#include "sandbox.h"

#define EXECUTOR_MT "flame.executor"

typedef struct job {
  struct job *next;
  int64_t id;
  int kind;                   /* EXECUTOR_WORK or EXECUTOR_CHECK */
  int truthy;                 /* CHECK: the first result was true */
  buf work;                   /* codec bytes in, from offset skip */
  size_t skip;
  buf out;                    /* status byte and codec bytes out */
} job;

typedef struct worker {
  uv_thread_t thread;
  struct executor *ex;
  sandbox *sb;
  job *current;               /* guarded by ex->lock */
  int fresh;                  /* just started: counted in ex->starting */
} worker;

struct executor {
  flame_handle base;          /* first: a Lua loop's close walk frees through it */
  flame_waker waker;          /* finished jobs wake the loop (loop.h: not uv_async,
                                 whose receiver spins on the sender) */
  uv_mutex_t lock;            /* guards everything down to cfg */
  uv_cond_t cond;
  job *pending, *pending_tail;
  int npending;               /* jobs in pending */
  job *done, *done_tail;
  worker *workers;
  int nworkers, maxworkers, idle, running, peak;
  int spinning;               /* workers in spin_for_job: they take the next job */
  int returning;              /* workers waking the loop after a result, unlocked:
                                 they look for the next job before they sleep */
  int signalled;              /* signals not yet taken by a worker leaving its wait */
  int starting;               /* threads started, still making their sandbox */
  int spin_skip, spin_backoff;  /* idle turns left without a spin, and the next count */
  long spun;                  /* jobs a spinning worker took (stats) */
  int stopping;
  int first_ready;            /* the first worker has made its sandbox (or failed) */
  char first_err[256];        /* and why it failed, or "" */
  uv_cond_t ready_cond;
  sandbox_config cfg;         /* read-only once made */
  char *requires;             /* owned copies of cfg.requires, cfg.info, cfg.path,
                                 cfg.cpath */
  char *info;
  char *path, *cpath;
  executor_done_fn done_fn;   /* loop thread only, from here on */
  void *done_ud;
  int closed;
  int inflight;               /* submitted, not yet delivered; the waker keeps the
                                 loop alive only while > 0 */
  uv_work_t join;             /* executor_close_async: the workers joined off the loop */
};

static int joining;           /* executors closing off their loop's thread (any loop) */

static void job_free(job *j) {
  buf_free(&j->work);
  buf_free(&j->out);
  free(j);
}

static void jobs_free(job *j) {
  while (j) {
    job *next = j->next;
    job_free(j);
    j = next;
  }
}

static void push(job **head, job **tail, job *j) {
  j->next = NULL;
  if (*tail) (*tail)->next = j;
  else *head = j;
  *tail = j;
}

/* A finished job to the loop, with ex->lock held. The loop takes the whole list at
 * once, so only the push onto an empty list wakes it: a worker finishing while the
 * loop has not taken the last ones makes no system call. Returns whether to wake
 * it: the caller sends after its unlock, so the loop it wakes does not find the
 * lock still held (a futex wait and wake more a call). */
static int done_push(executor *ex, job *j) {
  int wake = ex->done == NULL;
  push(&ex->done, &ex->done_tail, j);
  return wake;
}

/* Completes j with a status and one string, without a Lua state (killed in queue,
 * or no sandbox). Called with ex->lock held. */
static void complete_plain(executor *ex, job *j, int status, const char *text) {
  j->out.len = 0;
  if (buf_byte(&j->out, (unsigned char)status) != 0
      || codec_encode_cstring(&j->out, text) != 0)
    j->out.len = 0;           /* reported as "not enough memory" on the loop side */
  /* rare (a kill in queue, no sandbox): sent with the lock held, for simplicity */
  if (done_push(ex, j)) flame_waker_send(&ex->waker);
}

/* An idle check's verdict: is the first of its results true? Decoded in the
 * worker's own state, functions refused. */
static int first_is_true(sandbox *sb, const buf *out) {
  if (out->len < 1 || out->data[0] != SANDBOX_RESULT) return 0;
  lua_State *L = sandbox_state(sb);
  codec_opts o;
  codec_opts_init(&o);
  o.functions = 0;
  int n = codec_decode(L, (const char *)out->data + 1, out->len - 1, &o);
  int truthy = n > 0 && lua_toboolean(L, -n);
  lua_settop(L, 0);
  return truthy;
}

/* Waiting for the next job without sleeping, briefly. A worker that sleeps on the
 * condition costs its waker a futex call and itself a wake-up on another core: on
 * these VMs about 30 us of a local call's 76 us at the median (bench/call). So a
 * worker that finds nothing to do spins a while (spin_ns, 50 us unless
 * FLAME_WORKER_SPIN_US says otherwise, up to 1 s; 0 turns it off) before it sleeps,
 * when:
 * - the machine has more than one core (else the spin holds the submitter's core);
 * - no other worker of the process spins (one core, at most, goes to waiting);
 * - at most one job of the process is not yet delivered (its own: a caller waiting
 *   on this result will submit the next job soon). With more in flight the process
 *   is busy and its cores are better spent on the results (100 callers ran 17%
 *   slower with spinning there).
 * A spin that ends with no job makes the next ones skip, 1, 2, 4 ... 64 idle turns:
 * a program calling once a second spins once in a while, not at every call.
 * busy: more than one job undelivered, read when the worker pushed its own result
 * (before it lets go of the lock to wake the loop, which may deliver it meanwhile).
 * Called and returns with ex->lock held. */
static int process_spinner;   /* 1 while a worker of the process spins */
static int undelivered;       /* jobs submitted, not yet delivered (process-wide) */
static uint64_t spin_ns;
static uv_once_t spin_once = UV_ONCE_INIT;

static void spin_init(void) {
  spin_ns = flame_spin_window_ns("FLAME_WORKER_SPIN_US");
}

static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static int spin_claim(void) {
  int zero = 0;
  return __atomic_compare_exchange_n(&process_spinner, &zero, 1, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED);
}

static void spin_for_job(executor *ex, int busy) {
  if (spin_ns == 0 || ex->spinning > 0 || busy) return;
  if (ex->spin_skip > 0) {
    ex->spin_skip--;
    return;
  }
  if (!spin_claim()) return;
  ex->spinning++;               /* submit counts it as idle, and need not signal it */
  uv_mutex_unlock(&ex->lock);
  uint64_t until = uv_hrtime() + spin_ns;
  int got = 0;
  for (unsigned i = 0;; i++) {
    if (__atomic_load_n(&ex->npending, __ATOMIC_RELAXED) > 0
        || __atomic_load_n(&ex->stopping, __ATOMIC_RELAXED)) {
      got = 1;
      break;
    }
    if ((i & 63) == 0 && uv_hrtime() > until) break;
    spin_pause();
  }
  __atomic_store_n(&process_spinner, 0, __ATOMIC_RELEASE);
  uv_mutex_lock(&ex->lock);
  ex->spinning--;
  if (got) {
    if (ex->pending) ex->spun++;          /* it takes the job below */
    ex->spin_backoff = 0;
  } else {                                /* the next 1, 2, 4 ... 64 idle turns skip */
    ex->spin_backoff = ex->spin_backoff == 0 ? 1
                       : ex->spin_backoff >= 32 ? 64 : ex->spin_backoff * 2;
    ex->spin_skip = ex->spin_backoff;
  }
}

static void wake_one(executor *ex);

static void worker_main(void *arg) {
  worker *w = arg;
  executor *ex = w->ex;
  const char *err = NULL;
  w->sb = sandbox_new(&ex->cfg, &err);
  uv_mutex_lock(&ex->lock);
  if (!ex->first_ready) {
    ex->first_ready = 1;
    snprintf(ex->first_err, sizeof ex->first_err, "%s", w->sb ? "" : err);
    uv_cond_broadcast(&ex->ready_cond);
  }
  int busy = -1;                          /* -1: read the count now */
  for (;;) {
    if (w->fresh) {                       /* its sandbox is made: it is here */
      w->fresh = 0;
      ex->starting--;
    }
    if (busy < 0) busy = __atomic_load_n(&undelivered, __ATOMIC_RELAXED) > 1;
    if (!ex->stopping && ex->pending == NULL) spin_for_job(ex, busy);
    busy = -1;
    while (!ex->stopping && ex->pending == NULL) {
      ex->idle++;
      uv_cond_wait(&ex->cond, &ex->lock);
      ex->idle--;
      if (ex->signalled > 0) ex->signalled--;   /* a wake-up of wake_one's arrived */
    }
    if (ex->stopping) break;
    job *j = ex->pending;
    ex->pending = j->next;
    __atomic_sub_fetch(&ex->npending, 1, __ATOMIC_RELAXED);
    if (ex->pending == NULL) ex->pending_tail = NULL;
    else wake_one(ex);                    /* more jobs than this one: a worker more */
    if (w->sb == NULL) {
      complete_plain(ex, j, SANDBOX_ERROR, err);
      continue;
    }
    sandbox_rearm(w->sb);                 /* before current is set: a kill sticks */
    w->current = j;
    if (++ex->running > ex->peak) ex->peak = ex->running;
    uv_mutex_unlock(&ex->lock);

    int rc = sandbox_run(w->sb, (const char *)j->work.data + j->skip, j->work.len - j->skip,
                         &j->out);
    if (rc != 0) j->out.len = 0;
    buf_free(&j->work);
    if (j->kind == EXECUTOR_CHECK) j->truthy = first_is_true(w->sb, &j->out);

    uv_mutex_lock(&ex->lock);
    ex->running--;
    w->current = NULL;
    busy = __atomic_load_n(&undelivered, __ATOMIC_RELAXED) > 1;  /* its own counts */
    if (done_push(ex, j)) {
      /* after the unlock: the waker is closed only once the workers are joined.
       * Meanwhile it counts as on its way to the next job (returning), so a job
       * submitted in this window does not start a worker more. */
      ex->returning++;
      uv_mutex_unlock(&ex->lock);
      flame_waker_send(&ex->waker);
      uv_mutex_lock(&ex->lock);
      ex->returning--;
    }
  }
  uv_mutex_unlock(&ex->lock);
  sandbox_close(w->sb);
  w->sb = NULL;
}

/* Loop thread: hands finished jobs to done, in the order they finished. */
static void on_wake(flame_waker *wk) {
  executor *ex = wk->poll.data;
  uv_mutex_lock(&ex->lock);
  job *j = ex->done;
  ex->done = ex->done_tail = NULL;
  uv_mutex_unlock(&ex->lock);
  while (j) {
    job *next = j->next;
    /* a done_fn that closed the executor (a single-use pool's shrink) took what was
     * in flight off the counts already: the rest is only freed */
    if (!ex->closed) {
      if (--ex->inflight == 0) uv_unref((uv_handle_t *)&ex->waker.poll);
      __atomic_sub_fetch(&undelivered, 1, __ATOMIC_RELAXED);
      ex->done_fn(ex->done_ud, j->id, &j->out, j->truthy);
    }
    job_free(j);
    j = next;
  }
}

static void executor_free(uv_handle_t *h) {
  executor *ex = h->data;
  flame_waker_end(&ex->waker);               /* a close walk closed only its handle */
  jobs_free(ex->done);
  uv_cond_destroy(&ex->cond);
  uv_cond_destroy(&ex->ready_cond);
  uv_mutex_destroy(&ex->lock);
  free(ex->workers);
  free(ex->requires);
  free(ex->info);
  free(ex->path);
  free(ex->cpath);
  free(ex);
}

/* Stops the workers: running work killed ("shutdown"), idle ones woken to leave. */
static void close_begin(executor *ex) {
  ex->closed = 1;
  uv_mutex_lock(&ex->lock);
  __atomic_store_n(&ex->stopping, 1, __ATOMIC_RELAXED);  /* a spinning worker reads it */
  for (int i = 0; i < ex->nworkers; i++)
    if (ex->workers[i].current) sandbox_kill(ex->workers[i].sb, SANDBOX_KILL_SHUTDOWN);
  uv_cond_broadcast(&ex->cond);
  uv_mutex_unlock(&ex->lock);
}

static void join_workers(executor *ex) {
  for (int i = 0; i < ex->nworkers; i++) uv_thread_join(&ex->workers[i].thread);
}

/* After the workers have gone. */
static void close_end(executor *ex, int loop_alive) {
  /* what this executor will never deliver no longer counts for the spin's rule */
  __atomic_sub_fetch(&undelivered, ex->inflight, __ATOMIC_RELAXED);
  ex->inflight = 0;
  jobs_free(ex->pending);
  ex->pending = ex->pending_tail = NULL;
  __atomic_store_n(&ex->npending, 0, __ATOMIC_RELAXED);
  if (loop_alive) flame_waker_close(&ex->waker, executor_free);
}

void executor_close(executor *ex, int loop_alive) {
  if (ex->closed) return;
  close_begin(ex);
  join_workers(ex);
  close_end(ex, loop_alive);
}

static void join_work(uv_work_t *req) {
  join_workers(req->data);
}

static void join_done(uv_work_t *req, int status) {
  (void)status;
  joining--;
  close_end(req->data, 1);
}

void executor_close_async(executor *ex) {
  if (ex->closed) return;
  close_begin(ex);
  ex->join.data = ex;
  if (uv_queue_work(ex->waker.poll.loop, &ex->join, join_work, join_done) == 0) {
    joining++;
    return;
  }
  join_workers(ex);                          /* no thread pool: here, then */
  close_end(ex, 1);
}

int executor_joining(void) {
  return joining;
}

static int worker_start(executor *ex) {
  worker *w = &ex->workers[ex->nworkers];
  memset(w, 0, sizeof *w);
  w->ex = ex;
  w->fresh = 1;                            /* read by the thread under ex->lock */
  int rc = uv_thread_create(&w->thread, worker_main, w);
  if (rc == 0) {
    ex->nworkers++;
    ex->starting++;
  }
  return rc;
}

/* Puts one worker on its way to the pending jobs, unless one is on its way already
 * (signalled, not yet back from its wait) or spinning: an idle one signalled, else
 * a new one started unless one is still starting, else none (every worker runs: the
 * first to finish takes the next job; so does it when a thread cannot be started).
 * A thread still making its sandbox (loading `requires`, which can take long) does
 * not count as on its way: an idle worker is signalled past it. A worker that takes
 * a job and sees more pending calls this again, so every job still gets a worker of
 * its own while the jobs last long; but a burst of short jobs is drained by the few
 * workers awake, not by one wake-up per job (on 2 cores a runner with 25 calls in
 * flight spent half its time switching between workers). Lock held. */
static void wake_one(executor *ex) {
  if (ex->signalled > 0 || ex->spinning > 0 || ex->returning > 0) return;
  if (ex->idle > 0) {
    ex->signalled++;
    uv_cond_signal(&ex->cond);
  } else if (ex->starting == 0 && ex->nworkers < ex->maxworkers) {
    (void)worker_start(ex);
  }
}

int executor_submit(executor *ex, int64_t id, buf *work, size_t skip, int kind,
                    const char **err) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL || skip > work->len) {
    *err = j ? "bad work offset" : "not enough memory";
    buf_free(work);
    free(j);
    return -1;
  }
  j->skip = skip;
  j->work = *work;                         /* the bytes are the job's now */
  buf_init(work);
  j->id = id;
  j->kind = kind;
  uv_mutex_lock(&ex->lock);
  if (ex->nworkers == 0 && worker_start(ex) != 0) {   /* no worker at all: it cannot run */
    uv_mutex_unlock(&ex->lock);
    job_free(j);
    *err = "cannot start a worker thread";
    return -1;
  }
  __atomic_add_fetch(&undelivered, 1, __ATOMIC_RELAXED);
  push(&ex->pending, &ex->pending_tail, j);
  __atomic_add_fetch(&ex->npending, 1, __ATOMIC_RELAXED);
  wake_one(ex);
  uv_mutex_unlock(&ex->lock);
  if (ex->inflight++ == 0) uv_ref((uv_handle_t *)&ex->waker.poll);
  return 0;
}

int executor_kill(executor *ex, int64_t id, int reason) {
  int where = 0;
  uv_mutex_lock(&ex->lock);
  for (job **p = &ex->pending, *prev = NULL; *p; prev = *p, p = &(*p)->next) {
    if ((*p)->id == id) {
      job *j = *p;
      *p = j->next;
      __atomic_sub_fetch(&ex->npending, 1, __ATOMIC_RELAXED);
      if (ex->pending_tail == j) ex->pending_tail = prev;
      complete_plain(ex, j, SANDBOX_KILLED, sandbox_kill_name(reason));
      where = EXECUTOR_QUEUED;
      break;
    }
  }
  for (int i = 0; where == 0 && i < ex->nworkers; i++) {
    if (ex->workers[i].current && ex->workers[i].current->id == id) {
      sandbox_kill(ex->workers[i].sb, reason);
      where = EXECUTOR_RUNNING;
    }
  }
  uv_mutex_unlock(&ex->lock);
  return where;
}

int executor_ready(executor *ex, char *err, size_t errlen) {
  uv_mutex_lock(&ex->lock);
  while (!ex->first_ready) uv_cond_wait(&ex->ready_cond, &ex->lock);
  int ok = ex->first_err[0] == '\0';
  if (!ok) snprintf(err, errlen, "%s", ex->first_err);
  uv_mutex_unlock(&ex->lock);
  return ok ? 0 : -1;
}

void executor_get_stats(executor *ex, executor_stats *st) {
  uv_mutex_lock(&ex->lock);
  st->workers = ex->nworkers;
  st->max_workers = ex->maxworkers;
  st->idle = ex->idle;
  st->running = ex->running;
  st->peak = ex->peak;
  st->queued = ex->npending;
  st->spun = ex->spun;
  st->spin_us = (long)(spin_ns / 1000);
  uv_mutex_unlock(&ex->lock);
}

static char *dup_bytes(const char *s, size_t n) {
  char *d = malloc(n + 1);
  if (d) {
    memcpy(d, s, n);
    d[n] = '\0';
  }
  return d;
}

executor *executor_new(uv_loop_t *loop, int workers, const sandbox_config *cfg, int flags,
                       executor_done_fn done, void *ud, const char **err) {
  uv_once(&spin_once, spin_init);
  if (!(flags & EXECUTOR_PRESTART)) {
    sandbox *probe = sandbox_new(cfg, err);  /* settings a worker could not use fail here */
    if (probe == NULL) return NULL;
    sandbox_close(probe);
  }
  *err = "not enough memory";
  if (workers < 1) workers = 1;
  executor *ex = calloc(1, sizeof *ex);
  if (ex == NULL) return NULL;
  ex->workers = calloc((size_t)workers, sizeof *ex->workers);
  ex->cfg = *cfg;
  if (ex->workers == NULL
      || (cfg->requires && (ex->requires = dup_bytes(cfg->requires, strlen(cfg->requires))) == NULL)
      || (cfg->info && (ex->info = dup_bytes(cfg->info, cfg->info_len)) == NULL)
      || (cfg->path && (ex->path = dup_bytes(cfg->path, strlen(cfg->path))) == NULL)
      || (cfg->cpath && (ex->cpath = dup_bytes(cfg->cpath, strlen(cfg->cpath))) == NULL))
    goto fail;
  ex->cfg.requires = ex->requires;
  ex->cfg.info = ex->info;
  ex->cfg.path = ex->path;
  ex->cfg.cpath = ex->cpath;
  ex->maxworkers = workers;
  ex->done_fn = done;
  ex->done_ud = ud;
  ex->base.on_close = executor_free;
  int rc = uv_mutex_init(&ex->lock);
  if (rc != 0) goto fail_uv;
  if ((rc = uv_cond_init(&ex->cond)) != 0) {
    uv_mutex_destroy(&ex->lock);
    goto fail_uv;
  }
  if ((rc = uv_cond_init(&ex->ready_cond)) != 0) {
    uv_cond_destroy(&ex->cond);
    uv_mutex_destroy(&ex->lock);
    goto fail_uv;
  }
  if ((rc = flame_waker_init(loop, &ex->waker, on_wake)) != 0) {
    if (ex->waker.made) {                   /* made, not started: freed once closed */
      ex->waker.poll.data = ex;
      flame_waker_close(&ex->waker, executor_free);
      *err = "cannot make the executor's locks or wake-up handle";
      return NULL;
    }
    uv_cond_destroy(&ex->ready_cond);
    uv_cond_destroy(&ex->cond);
    uv_mutex_destroy(&ex->lock);
    goto fail_uv;
  }
  ex->waker.poll.data = ex;
  uv_unref((uv_handle_t *)&ex->waker.poll);  /* referenced while jobs are in flight */
  if (flags & EXECUTOR_PRESTART) {
    uv_mutex_lock(&ex->lock);
    if (worker_start(ex) != 0) {             /* no thread: executor_ready says so */
      ex->first_ready = 1;
      snprintf(ex->first_err, sizeof ex->first_err, "cannot start a worker thread");
    }
    uv_mutex_unlock(&ex->lock);
  }
  return ex;
fail_uv:
  *err = "cannot make the executor's locks or wake-up handle";
fail:
  free(ex->workers);
  free(ex->requires);
  free(ex->info);
  free(ex->path);
  free(ex->cpath);
  free(ex);
  return NULL;
}

/* ------------------------------------------------------------------- Lua ---- */

typedef struct lexec {
  executor *ex;               /* NULL once closed */
  flame_loop *lp;
  int done_ref;               /* on_done in the registry */
} lexec;

static void lua_done(void *ud, int64_t id, buf *out, int truthy) {
  (void)truthy;
  lexec *le = ud;
  lua_State *L = le->lp->L;
  if (L == NULL || !lua_checkstack(L, 6)) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, le->done_ref);
  lua_pushinteger(L, (lua_Integer)id);
  if (out->len == 0) {
    lua_pushliteral(L, "e");
    lua_pushnil(L);
  } else {
    lua_pushlstring(L, (const char *)out->data, 1);
    lua_pushlstring(L, (const char *)out->data + 1, out->len - 1);
  }
  flame_pcall_report(L, 3, "an executor callback");
}

static lexec *exec_ud(lua_State *L) {
  return luaL_checkudata(L, 1, EXECUTOR_MT);
}

static executor *exec_check(lua_State *L) {
  lexec *le = exec_ud(L);
  if (le->ex == NULL) luaL_error(L, "executor is closed");
  return le->ex;
}

/* exec:submit(id, bytes): a string (copied) or a flame.bytes (taken as it is, its
 * room for a header skipped) */
static int exec_submit(lua_State *L) {
  executor *ex = exec_check(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  buf_bytes *x = luaL_testudata(L, 3, "flame.bytes");
  size_t skip = x ? x->head : 0;
  buf work;
  const char *err;
  if (buf_take_arg(L, 3, skip, &work, &err) != 0) return luaL_error(L, "executor: %s", err);
  if (executor_submit(ex, (int64_t)id, &work, skip, EXECUTOR_WORK, &err) != 0)
    return luaL_error(L, "executor: %s", err);
  return 0;
}

/* exec:kill(id, reason) -> where: "queued" | "running" | nil (ended or unknown) */
static int exec_kill(lua_State *L) {
  static const char *const names[] = { "timeout", "cancelled", "shutdown", "killed", NULL };
  executor *ex = exec_check(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  int reason = luaL_checkoption(L, 3, "killed", names) + 1;
  int where = executor_kill(ex, (int64_t)id, reason);
  if (where == EXECUTOR_QUEUED) lua_pushliteral(L, "queued");
  else if (where == EXECUTOR_RUNNING) lua_pushliteral(L, "running");
  else lua_pushnil(L);
  return 1;
}

void executor_stats_push(lua_State *L, const executor_stats *st) {
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, st->workers);
  lua_setfield(L, -2, "workers");
  lua_pushinteger(L, st->max_workers);
  lua_setfield(L, -2, "max_workers");
  lua_pushinteger(L, st->idle);
  lua_setfield(L, -2, "idle");
  lua_pushinteger(L, st->running);
  lua_setfield(L, -2, "running");
  lua_pushinteger(L, st->peak);
  lua_setfield(L, -2, "peak");
  lua_pushinteger(L, st->queued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, st->spun);
  lua_setfield(L, -2, "spun");
  lua_pushinteger(L, st->spin_us);
  lua_setfield(L, -2, "spin_us");
}

static int exec_stats(lua_State *L) {
  executor *ex = exec_check(L);
  executor_stats st;
  executor_get_stats(ex, &st);
  executor_stats_push(L, &st);
  return 1;
}

static int exec_ready(lua_State *L) {
  executor *ex = exec_check(L);
  char why[256];
  if (executor_ready(ex, why, sizeof why) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int exec_close(lua_State *L) {
  lexec *le = exec_ud(L);
  if (le->ex) {
    executor_close(le->ex, !le->lp->closed);
    luaL_unref(L, LUA_REGISTRYINDEX, le->done_ref);
    le->done_ref = LUA_NOREF;
  }
  le->ex = NULL;
  return 0;
}

/* executor{ workers = n, profile = "application"|"restricted", memory_limit = bytes,
 *           requires = "m1,m2", info = bytes,
 *           on_done = function(id, status, payload) } */
static int l_executor(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  sandbox_config cfg = { SANDBOX_APPLICATION, 0, NULL, NULL, 0, NULL, NULL };
  lua_getfield(L, 1, "workers");
  lua_Integer workers = luaL_optinteger(L, -1, 1);
  luaL_argcheck(L, workers >= 1 && workers <= 4096, 1, "workers in [1, 4096] expected");
  lua_getfield(L, 1, "profile");
  if (!lua_isnil(L, -1) && sandbox_profile_parse(luaL_checkstring(L, -1), &cfg.profile))
    return luaL_error(L, "executor: unknown profile '%s'", lua_tostring(L, -1));
  lua_getfield(L, 1, "memory_limit");
  lua_Integer limit = luaL_optinteger(L, -1, 0);
  luaL_argcheck(L, limit >= 0, 1, "memory_limit >= 0 expected");
  cfg.memory_limit = (size_t)limit;
  lua_getfield(L, 1, "requires");
  if (!lua_isnil(L, -1)) cfg.requires = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "info");                /* bytes: flame.parent() in the workers */
  if (!lua_isnil(L, -1)) cfg.info = luaL_checklstring(L, -1, &cfg.info_len);
  lua_getfield(L, 1, "path");                /* the workers' package.path, cpath */
  if (!lua_isnil(L, -1)) cfg.path = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "cpath");
  if (!lua_isnil(L, -1)) cfg.cpath = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "prestart");
  int flags = lua_toboolean(L, -1) ? EXECUTOR_PRESTART : 0;
  lua_getfield(L, 1, "on_done");
  luaL_checktype(L, -1, LUA_TFUNCTION);

  lexec *le = lua_newuserdatauv(L, sizeof *le, 0);
  le->ex = NULL;
  le->lp = lp;
  le->done_ref = LUA_NOREF;
  luaL_setmetatable(L, EXECUTOR_MT);
  const char *err;
  executor *ex = executor_new(&lp->uv, (int)workers, &cfg, flags, lua_done, le, &err);
  if (ex == NULL) return luaL_error(L, "executor: %s", err);
  lua_pushvalue(L, -2);
  le->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  le->ex = ex;
  return 1;
}

void flame_executor_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "submit", exec_submit }, { "kill", exec_kill }, { "stats", exec_stats },
    { "ready", exec_ready },
    { "close", exec_close }, { NULL, NULL }
  };
  if (luaL_newmetatable(L, EXECUTOR_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, exec_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_executor);
  lua_setfield(L, -2, "executor");
}
