/*
 * executor.c - runs encoded work on worker threads, each owning one sandbox.
 *
 * Contract:
 * - exec:submit(id, bytes) queues a job; a worker (made lazily, up to `workers`)
 *   decodes it into its sandbox (a fresh _ENV per job over the profile's libraries;
 *   loaded modules stay), runs it, and encodes the outcome (sandbox_run's format).
 * - Every submitted job completes exactly once: on_done(id, status, payload) is
 *   called on the loop thread, status being one of sandbox.h's letters. A job killed
 *   while queued completes as killed too; a job dropped by close does not complete.
 * - exec:kill(id, reason) reaches the job wherever it is: queued, or running (the
 *   sandbox's kill switch); a kill for a job that has ended does nothing.
 * - exec:close() kills running work ("shutdown"), joins the workers, and frees
 *   everything once the loop has closed the async handle.
 *
 * Threads and locks: the loop thread submits, kills and closes; workers run jobs.
 * Lock order: executor.lock, then a sandbox's lock (sandbox_kill, sandbox_rearm).
 */
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "codec.h"
#include "loop.h"
#include "sandbox.h"

#define EXECUTOR_MT "flame.executor"

typedef struct job {
  struct job *next;
  lua_Integer id;
  buf work;                   /* codec bytes in */
  buf out;                    /* status byte and codec bytes out */
} job;

typedef struct worker {
  uv_thread_t thread;
  struct executor *ex;
  sandbox *sb;
  job *current;               /* guarded by ex->lock */
} worker;

typedef struct executor {
  flame_handle base;          /* first: the loop closes async through it */
  uv_async_t async;
  flame_loop *lp;
  uv_mutex_t lock;            /* guards everything below it */
  uv_cond_t cond;
  job *pending, *pending_tail;
  job *done, *done_tail;
  worker *workers;
  int nworkers, maxworkers, idle, running, peak;
  int stopping;
  sandbox_config cfg;
  char *requires;             /* owned copies of cfg.requires and cfg.info */
  char *info;
  int done_ref;               /* on_done in the registry (loop thread only) */
  int closed;                 /* loop thread only */
  int inflight;               /* loop thread only: submitted, not yet delivered; the
                                 async handle keeps the loop alive only while > 0 */
} executor;

static void job_free(job *j) {
  buf_free(&j->work);
  buf_free(&j->out);
  free(j);
}

static void push(job **head, job **tail, job *j) {
  j->next = NULL;
  if (*tail) (*tail)->next = j;
  else *head = j;
  *tail = j;
}

/* Completes j with a status and one string, without a Lua state (killed in queue,
 * or no sandbox). Called with ex->lock held. */
static void complete_plain(executor *ex, job *j, int status, const char *text) {
  j->out.len = 0;
  if (buf_byte(&j->out, (unsigned char)status) != 0
      || codec_encode_cstring(&j->out, text) != 0)
    j->out.len = 0;           /* reported as "not enough memory" on the loop side */
  push(&ex->done, &ex->done_tail, j);
}

static void worker_main(void *arg) {
  worker *w = arg;
  executor *ex = w->ex;
  const char *err = NULL;
  w->sb = sandbox_new(&ex->cfg, &err);
  uv_mutex_lock(&ex->lock);
  for (;;) {
    while (!ex->stopping && ex->pending == NULL) {
      ex->idle++;
      uv_cond_wait(&ex->cond, &ex->lock);
      ex->idle--;
    }
    if (ex->stopping) break;
    job *j = ex->pending;
    ex->pending = j->next;
    if (ex->pending == NULL) ex->pending_tail = NULL;
    if (w->sb == NULL) {
      complete_plain(ex, j, SANDBOX_ERROR, err);
      uv_async_send(&ex->async);
      continue;
    }
    sandbox_rearm(w->sb);                 /* before current is set: a kill sticks */
    w->current = j;
    if (++ex->running > ex->peak) ex->peak = ex->running;
    uv_mutex_unlock(&ex->lock);

    int rc = sandbox_run(w->sb, (const char *)j->work.data, j->work.len, &j->out);
    if (rc != 0) j->out.len = 0;
    buf_free(&j->work);

    uv_mutex_lock(&ex->lock);
    ex->running--;
    w->current = NULL;
    push(&ex->done, &ex->done_tail, j);
    uv_async_send(&ex->async);
  }
  uv_mutex_unlock(&ex->lock);
  sandbox_close(w->sb);
  w->sb = NULL;
}

/* Loop thread: hands finished jobs to on_done, in the order they finished. */
static void on_async(uv_async_t *h) {
  executor *ex = h->data;
  uv_mutex_lock(&ex->lock);
  job *j = ex->done;
  ex->done = ex->done_tail = NULL;
  uv_mutex_unlock(&ex->lock);
  lua_State *L = ex->lp->L;
  while (j) {
    job *next = j->next;
    if (--ex->inflight == 0) uv_unref((uv_handle_t *)&ex->async);
    if (L && !ex->closed && lua_checkstack(L, 6)) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, ex->done_ref);
      lua_pushinteger(L, j->id);
      if (j->out.len == 0) {
        lua_pushliteral(L, "e");
        lua_pushnil(L);
      } else {
        lua_pushlstring(L, (const char *)j->out.data, 1);
        lua_pushlstring(L, (const char *)j->out.data + 1, j->out.len - 1);
      }
      job_free(j);
      flame_pcall_report(L, 3, "an executor callback");
    } else {
      job_free(j);
    }
    j = next;
  }
}

static void executor_free(uv_handle_t *h) {
  executor *ex = h->data;
  job *j = ex->done;
  while (j) {
    job *next = j->next;
    job_free(j);
    j = next;
  }
  uv_cond_destroy(&ex->cond);
  uv_mutex_destroy(&ex->lock);
  free(ex->workers);
  free(ex->requires);
  free(ex->info);
  free(ex);
}

/* Stops the workers and joins them; the executor is freed when the loop closes
 * the async handle. Loop thread. */
static void executor_shutdown(lua_State *L, executor *ex) {
  if (ex->closed) return;
  ex->closed = 1;
  uv_mutex_lock(&ex->lock);
  ex->stopping = 1;
  for (int i = 0; i < ex->nworkers; i++)
    if (ex->workers[i].current) sandbox_kill(ex->workers[i].sb, SANDBOX_KILL_SHUTDOWN);
  uv_cond_broadcast(&ex->cond);
  uv_mutex_unlock(&ex->lock);
  for (int i = 0; i < ex->nworkers; i++) uv_thread_join(&ex->workers[i].thread);
  job *j = ex->pending;
  while (j) {
    job *next = j->next;
    job_free(j);
    j = next;
  }
  ex->pending = ex->pending_tail = NULL;
  if (L) luaL_unref(L, LUA_REGISTRYINDEX, ex->done_ref);
  ex->done_ref = LUA_NOREF;
  if (!ex->lp->closed) uv_close((uv_handle_t *)&ex->async, executor_free);
}

static executor **exec_ud(lua_State *L) {
  return luaL_checkudata(L, 1, EXECUTOR_MT);
}

static executor *exec_check(lua_State *L) {
  executor *ex = *exec_ud(L);
  if (ex == NULL || ex->closed) luaL_error(L, "executor is closed");
  return ex;
}

/* exec:submit(id, bytes) */
static int exec_submit(lua_State *L) {
  executor *ex = exec_check(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  size_t len;
  const char *bytes = luaL_checklstring(L, 3, &len);
  job *j = calloc(1, sizeof *j);
  if (j == NULL || buf_append(&j->work, bytes, len) != 0) {
    free(j);
    return luaL_error(L, "not enough memory");
  }
  j->id = id;
  if (ex->inflight++ == 0) uv_ref((uv_handle_t *)&ex->async);
  uv_mutex_lock(&ex->lock);
  push(&ex->pending, &ex->pending_tail, j);
  int need = ex->idle == 0 && ex->nworkers < ex->maxworkers;
  int rc = 0;
  if (need) {
    worker *w = &ex->workers[ex->nworkers];
    memset(w, 0, sizeof *w);
    w->ex = ex;
    rc = uv_thread_create(&w->thread, worker_main, w);
    if (rc == 0) ex->nworkers++;
  }
  if (ex->idle > 0) uv_cond_signal(&ex->cond);
  uv_mutex_unlock(&ex->lock);
  if (rc != 0 && ex->nworkers == 0)       /* no worker at all: the job cannot run */
    return luaL_error(L, "executor: cannot start a worker thread: %s", uv_strerror(rc));
  return 0;
}

/* exec:kill(id, reason) -> where: "queued" | "running" | nil (ended or unknown) */
static int exec_kill(lua_State *L) {
  static const char *const names[] = { "timeout", "cancelled", "shutdown", "killed", NULL };
  executor *ex = exec_check(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  int reason = luaL_checkoption(L, 3, "killed", names) + 1;
  const char *where = NULL;
  uv_mutex_lock(&ex->lock);
  for (job **p = &ex->pending, *prev = NULL; *p; prev = *p, p = &(*p)->next) {
    if ((*p)->id == id) {
      job *j = *p;
      *p = j->next;
      if (ex->pending_tail == j) ex->pending_tail = prev;
      complete_plain(ex, j, SANDBOX_KILLED, sandbox_kill_name(reason));
      uv_async_send(&ex->async);
      where = "queued";
      break;
    }
  }
  for (int i = 0; where == NULL && i < ex->nworkers; i++) {
    if (ex->workers[i].current && ex->workers[i].current->id == id) {
      sandbox_kill(ex->workers[i].sb, reason);
      where = "running";
    }
  }
  uv_mutex_unlock(&ex->lock);
  if (where) lua_pushstring(L, where);
  else lua_pushnil(L);
  return 1;
}

static int exec_stats(lua_State *L) {
  executor *ex = exec_check(L);
  uv_mutex_lock(&ex->lock);
  int queued = 0;
  for (job *j = ex->pending; j; j = j->next) queued++;
  int workers = ex->nworkers, idle = ex->idle, running = ex->running, peak = ex->peak;
  uv_mutex_unlock(&ex->lock);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, workers);
  lua_setfield(L, -2, "workers");
  lua_pushinteger(L, ex->maxworkers);
  lua_setfield(L, -2, "max_workers");
  lua_pushinteger(L, idle);
  lua_setfield(L, -2, "idle");
  lua_pushinteger(L, running);
  lua_setfield(L, -2, "running");
  lua_pushinteger(L, peak);
  lua_setfield(L, -2, "peak");
  lua_pushinteger(L, queued);
  lua_setfield(L, -2, "queued");
  return 1;
}

static int exec_close(lua_State *L) {
  executor **ud = exec_ud(L);
  if (*ud) executor_shutdown(L, *ud);
  *ud = NULL;
  return 0;
}

/* executor{ workers = n, profile = "application"|"restricted", memory_limit = bytes,
 *           on_done = function(id, status, payload) } */
static int l_executor(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  sandbox_config cfg = { SANDBOX_APPLICATION, 0, NULL, NULL, 0, NULL };
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
  lua_getfield(L, 1, "on_done");
  luaL_checktype(L, -1, LUA_TFUNCTION);

  const char *err;
  sandbox *probe = sandbox_new(&cfg, &err);  /* settings a worker could not use fail here */
  if (probe == NULL) return luaL_error(L, "executor: %s", err);
  sandbox_close(probe);

  executor **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, EXECUTOR_MT);
  executor *ex = calloc(1, sizeof *ex);
  worker *ws = calloc((size_t)workers, sizeof *ws);
  if (ex == NULL || ws == NULL) {
    free(ex);
    free(ws);
    return luaL_error(L, "not enough memory");
  }
  ex->workers = ws;
  ex->maxworkers = (int)workers;
  ex->cfg = cfg;
  if ((cfg.requires && (ex->requires = strdup(cfg.requires)) == NULL)
      || (cfg.info && (ex->info = malloc(cfg.info_len)) == NULL)) {
    free(ex->requires);
    free(ws);
    free(ex);
    return luaL_error(L, "not enough memory");
  }
  ex->cfg.requires = ex->requires;
  if (cfg.info) memcpy(ex->info, cfg.info, cfg.info_len);
  ex->cfg.info = ex->info;
  ex->lp = lp;
  ex->base.on_close = executor_free;
  int rc = uv_mutex_init(&ex->lock);
  if (rc == 0) {
    rc = uv_cond_init(&ex->cond);
    if (rc != 0) uv_mutex_destroy(&ex->lock);
  }
  if (rc == 0) {
    rc = uv_async_init(&lp->uv, &ex->async, on_async);
    if (rc != 0) {
      uv_cond_destroy(&ex->cond);
      uv_mutex_destroy(&ex->lock);
    }
  }
  if (rc != 0) {
    free(ex->requires);
    free(ex->info);
    free(ws);
    free(ex);
    return luaL_error(L, "executor: %s", uv_strerror(rc));
  }
  ex->async.data = ex;
  uv_unref((uv_handle_t *)&ex->async);      /* referenced while jobs are in flight */
  lua_pushvalue(L, -2);
  ex->done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  *ud = ex;
  return 1;
}

void flame_executor_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "submit", exec_submit }, { "kill", exec_kill }, { "stats", exec_stats },
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
