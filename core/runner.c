/*
 * runner.c - a runner's life on the parent's side, on the runtime thread (contract
 * in runner.h). A runner record lives from its boot until it has ended and its
 * backend state is closed: booting (waiting for its code, in init, in remote_boot),
 * up, then down; released once down (the backend's remote_shutdown), its state
 * closed after a linger (the backend may still hear of it: a process exit, its own
 * reap timer), ended once released with none of its backend's processes left.
 * What the application hears of it are events: "grow" (on_grow_start), "grown"
 * (on_grow_end), "shrink" (on_shrink), log lines ("blog" of state 0) and "ended".
 * Nothing here waits: every backend callback is a backend_call whose end comes back
 * as a function call on this loop.
 * Threads: the runtime thread only, but for the Lua functions, which post commands.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "bsvc.h"
#include "bval.h"
#include "hub.h"
#include "loop.h"
#include "runner.h"
#include "runtime.h"
#include "wire.h"

/* ms a backend's handle_info has to say more of a lost link than a closed socket
 * says (a process exit, a node gone) before the loss is the runner's end: an
 * engine's wait on a killed container (Podman's) was seen to answer after 100 ms */
#define LOST_GRACE 1000

enum { S_WAIT_GO, S_INIT, S_BOOT, S_UP, S_DOWN };

typedef struct rrun rrun;

/* A timer apart from its runner: its close callback frees it, so the runner may go
 * at once. */
typedef struct rtimer {
  flame_handle base;
  uv_timer_t t;
  rrun *r;                          /* NULL once cancelled */
  void (*fire)(rrun *r);
} rtimer;

struct rrun {
  rrun *next;
  pool_rt *p;
  uint64_t boot;
  int64_t bk, tid;                  /* its backend state (0: none), its runner */
  int state, is_min, local, inited, released, release_done, nprocs, bk_closed;
  int shrink_reported, calls;       /* calls: backend_calls not yet ended */
  char *failed;                     /* booting: declared down, or the boot refused */
  char *leaving;                    /* it said REMOTE_SHUTDOWN: why */
  char *down_why;                   /* for a later runner_down */
  int down_quiet;
  rtimer *soon, *grace, *linger;
  char name[96];
};

typedef struct ewait {
  struct ewait *next;
  pool_rt *p;
  rtimer *t;                        /* its r is unused: the wait is found by t */
} ewait;

static rrun *runs;                  /* every runner record of the process */
static ewait *waits;
static int stopping;                /* the process exits: records wait only for their
                                     * backend calls to end, then go */

static char *dup(const char *s) {
  return s ? strdup(s) : NULL;
}

/* ---------------------------------------------------------------- timers ---- */

static void rtimer_freed(uv_handle_t *h) {
  free(h->data);
}

static void rtimer_cb(uv_timer_t *ut) {
  rtimer *t = ut->data;
  rrun *r = t->r;
  if (r == NULL) return;
  t->fire(r);
}

static void rtimer_cancel(rtimer *t) {
  if (t == NULL) return;
  t->r = NULL;
  uv_timer_stop(&t->t);
  uv_close((uv_handle_t *)&t->t, rtimer_freed);
}

/* NULL when libuv or memory refuse. */
static rtimer *rtimer_start(rrun *r, uint64_t ms, void (*fire)(rrun *r)) {
  rtimer *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  if (uv_timer_init(runtime_loop(), &t->t) != 0) {
    free(t);
    return NULL;
  }
  t->base.on_close = rtimer_freed;
  t->t.data = t;
  t->r = r;
  t->fire = fire;
  if (uv_timer_start(&t->t, rtimer_cb, ms, 0) != 0) {
    rtimer_cancel(t);
    return NULL;
  }
  return t;
}

/* ---------------------------------------------------------------- events ---- */

static hub *H(rrun *r) {
  return pool_hub(r->p);
}

static void post_log(pool_rt *p, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void post_log(pool_rt *p, const char *level, const char *fmt, ...) {
  hub_event *e = hub_event_new(EV_BLOG);
  if (e == NULL) return;
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  e->tid = 0;                       /* the pool's own log */
  e->text = dup(level);
  e->text2 = dup(line);
  if (e->text == NULL || e->text2 == NULL) {
    hub_event_free(e);
    return;
  }
  hub_post(pool_hub(p), e);
}

/* on_grow_end: result "ok" or why, the pool's count of runners. */
static void post_grown(rrun *r, const char *result, int count) {
  hub_event *e = hub_event_new(EV_GROWN);
  if (e == NULL) return;
  e->tid = r->state == S_UP ? r->tid : 0;
  e->pid = count;
  e->text = dup(result);
  e->text2 = dup(r->name);
  hub_post(H(r), e);
}

/* on_shrink unless told already (hook 0: only the runner's end) */
static void post_shrink(rrun *r, const char *why, int count, int hook) {
  hub_event *e = hub_event_new(EV_SHRINK);
  if (e == NULL) return;
  e->tid = r->tid;
  e->text = dup(why);
  e->pid = count;
  e->type = hook;
  hub_post(H(r), e);
}

/* ----------------------------------------------------------- the records ---- */

static int ended(const rrun *r) {
  return r->release_done && r->nprocs == 0;
}

static int booting(const rrun *r) {
  return r->state == S_WAIT_GO || r->state == S_INIT || r->state == S_BOOT;
}

static void free_run(rrun *r) {
  for (rrun **q = &runs; *q; q = &(*q)->next) {
    if (*q == r) {
      *q = r->next;
      break;
    }
  }
  free(r->failed);
  free(r->leaving);
  free(r->down_why);
  free(r);
}

static void maybe_free(rrun *r) {
  if (!ended(r) || booting(r) || (r->bk != 0 && !r->bk_closed) || r->calls > 0
      || r->soon || r->grace || r->linger)
    return;
  free_run(r);
}

/* A backend call of r ended (its callback holds r until here). At exit nothing more
 * happens to r: it goes with its last call. 1: the callback returns at once. */
static int call_ended(rrun *r) {
  r->calls--;
  if (!stopping) return 0;
  if (r->calls == 0) free_run(r);
  return 1;
}

static rrun *find_tid(pool_rt *p, int64_t tid) {
  for (rrun *r = runs; r; r = r->next)
    if (r->p == p && r->tid == tid && tid != 0 && !r->bk_closed) return r;
  return NULL;
}

static rrun *find_bk(int64_t bkid) {
  for (rrun *r = runs; r; r = r->next)
    if (r->bk == bkid && !r->bk_closed) return r;
  return NULL;
}

static int all_ended(pool_rt *p) {
  for (rrun *r = runs; r; r = r->next)
    if (r->p == p && !ended(r)) return 0;
  return 1;
}

static void post_ended(pool_rt *p, const char *left) {
  hub_event *e = hub_event_new(EV_ENDED);
  if (e == NULL) return;
  e->text = dup(left);
  hub_post(pool_hub(p), e);
}

static void wait_end(ewait *w, const char *left) {
  for (ewait **q = &waits; *q; q = &(*q)->next) {
    if (*q == w) {
      *q = w->next;
      break;
    }
  }
  post_ended(w->p, left);
  rtimer_cancel(w->t);
  free(w);
}

static void ended_check(rrun *r) {
  if (!ended(r)) return;
  pool_rt *p = r->p;
  if (!all_ended(p)) return;
  for (ewait *w = waits, *next; w; w = next) {
    next = w->next;
    if (w->p == p) wait_end(w, "");
  }
}

/* The state closes: its processes end with it, what it was asked ends "closed". */
static void close_state(rrun *r) {
  if (r->bk == 0 || r->bk_closed) return;
  rtimer_cancel(r->linger);
  rtimer_cancel(r->grace);
  r->linger = r->grace = NULL;
  r->bk_closed = 1;
  r->nprocs = 0;
  r->calls++;                         /* r stays while the calls waiting end, now */
  backend_close(r->bk);
  r->calls--;
  r->release_done = 1;
  ended_check(r);
  maybe_free(r);
}

static void on_linger(rrun *r) {
  rtimer *t = r->linger;
  r->linger = NULL;
  rtimer_cancel(t);
  close_state(r);
}

static double shutdown_ms(pool_rt *p) {
  const bval *cfg = blink_config(pool_hub(p));
  const bval *st = cfg ? bval_get(bval_get(cfg, "settings"), "shutdown_timeout") : NULL;
  if (st && st->type == BV_INT) return (double)st->u.i;
  if (st && st->type == BV_NUM) return st->u.n;
  return 30000;
}

static void on_released(void *ud, int ok, bval *vals, int n, const char *msg) {
  rrun *r = ud;
  if (call_ended(r)) {
    bval_list_free(vals, n);
    return;
  }
  bval_list_free(vals, n);
  if (r->bk_closed) {
    maybe_free(r);
    return;
  }
  if (!ok) post_log(r->p, "error", "runner %s: remote_shutdown failed: %s", r->name,
                    msg ? msg : "?");
  r->release_done = 1;
  ended_check(r);
  /* the state lives on a while: after the backend's own reap (shutdown_timeout +
   * 1 s for processes), then it closes, and nothing of it outlives that */
  double st = shutdown_ms(r->p);
  double linger = (st < 0 || st > 1e9 ? 5000 : st + 1000) + 5000;
  r->linger = rtimer_start(r, (uint64_t)linger, on_linger);
  if (r->linger == NULL) close_state(r);
}

/* The backend releases what the runner held (remote_shutdown: kill the process,
 * remove the container); a shutdown waits for it. */
static void release(rrun *r, const char *reason) {
  if (r->released) return;
  r->released = 1;
  if (r->bk == 0 || r->bk_closed) {
    r->release_done = 1;
    ended_check(r);
    maybe_free(r);
    return;
  }
  bval arg;
  if (bval_set_str(&arg, reason, strlen(reason)) != 0) arg.type = BV_NIL;
  r->calls++;
  if (backend_call(r->bk, "remote_shutdown", &arg, on_released, r) != 0) {
    r->calls--;
    close_state(r);
  }
}

/* Its link or executor closed: no more calls reach it. */
static void close_term(rrun *r, const char *reason, int shutdown) {
  if (r->tid == 0) return;
  if (r->local) {
    pool_local_close(r->p, r->tid);
  } else {
    if (shutdown) {
      buf none;
      buf_init(&none);
      (void)hub_term_send(H(r), r->tid, WIRE_SHUTDOWN, 0, &none);
      buf_free(&none);
    }
    hub_term_close(H(r), r->tid, reason);
  }
}

/* Stopped on purpose (idle, single use, the pool's shutdown): told to go, released. */
static void stop(rrun *r) {
  r->state = S_DOWN;
  close_term(r, "closed by the parent", 1);
  release(r, "shutdown");
}

/* It went away: its callers get runner_down (all at once), it leaves the pool, the
 * backend releases it. quiet: it said goodbye (idle shutdown), no failure. r stays
 * (the caller ends with maybe_free): the release may close its state at once. */
static void runner_down(rrun *r, const char *reason, int quiet) {
  if (r->state != S_UP) return;
  r->calls++;
  r->state = S_DOWN;
  rtimer_cancel(r->grace);
  r->grace = NULL;
  if (quiet) post_log(r->p, "info", "runner %s: %s", r->name, reason);
  else post_log(r->p, "warn", "runner %s down: %s", r->name, reason);
  close_term(r, reason, 0);
  int count = pool_runner_down(r->p, r->tid, reason, quiet);
  post_shrink(r, reason, count, !r->shrink_reported);
  release(r, reason);
  r->calls--;
}

static void on_soon_down(rrun *r) {
  rtimer *t = r->soon;
  r->soon = NULL;
  rtimer_cancel(t);
  char *why = r->down_why;
  r->down_why = NULL;
  runner_down(r, why ? why : "the runner went away", r->down_quiet);
  free(why);
  maybe_free(r);
}

/* runner_down on a later turn of the loop: the callers are in the middle of a
 * link's or an executor's callback, or of pool.c's lists. */
static void down_later(rrun *r, const char *why, int quiet) {
  if (r->state != S_UP || r->soon) return;
  free(r->down_why);
  r->down_why = dup(why);
  r->down_quiet = quiet;
  r->soon = rtimer_start(r, 0, on_soon_down);
  if (r->soon == NULL) {
    runner_down(r, why, quiet);
    maybe_free(r);
  }
}

/* ------------------------------------------------------------------ boot ---- */

static void boot_fail(rrun *r, const char *reason) {
  pool_rt *p = r->p;
  char msg[1200];
  post_log(p, "error", "runner %s failed to boot: %s", r->name, reason);
  snprintf(msg, sizeof msg, "pool '%s': runner %s failed to boot: %s", pool_name(p),
           r->name, reason);
  r->state = S_DOWN;
  pool_boot_failed(p, r->boot, msg);
  post_grown(r, reason, pool_count(p));
  /* a runner of this boot that connects later is refused; one it met is let go */
  if (r->bk != 0 && !r->bk_closed) blink_fail(H(r), r->bk, reason);
  /* the backend releases what it made (a container, a process group) as after any
   * runner; a state whose init did not run has nothing to release */
  if (r->inited) {
    char why[1300];
    snprintf(why, sizeof why, "boot failed: %s", reason);
    release(r, why);
  } else {
    r->released = r->release_done = 1;
    if (r->bk != 0) close_state(r);
    else {
      ended_check(r);
      maybe_free(r);
    }
  }
}

/* A bval's text for a reason: a string or a number, else def. */
static void text_of(const bval *v, const char *def, char *out, size_t n) {
  char *t = v ? bval_text(v) : NULL;
  snprintf(out, n, "%s", t ? t : def);
  free(t);
}

static void on_remote_boot(void *ud, int ok, bval *vals, int n, const char *msg) {
  rrun *r = ud;
  if (call_ended(r)) {
    bval_list_free(vals, n);
    return;
  }
  if (r->bk_closed || r->state != S_BOOT) {
    bval_list_free(vals, n);
    maybe_free(r);
    return;
  }
  char err[600] = "";
  int64_t tid = 0, code = 0;
  int local = 0, found = 0;
  if (!ok) {
    snprintf(err, sizeof err, "%s", msg ? msg : "remote_boot failed");
  } else {
    const bval *h = n > 0 ? &vals[0] : NULL;
    const bval *id = h && h->type == BV_TABLE ? bval_get(h, "__flame_handle") : NULL;
    if (id && id->type == BV_INT) found = blink_term(r->bk, id->u.i, &tid, &local, &code);
    if (!found && bval_truthy(h))
      snprintf(err, sizeof err, "remote_boot returned something that is not a terminator");
    else if (!found)
      text_of(n > 1 ? &vals[1] : NULL, "remote_boot returned nothing", err, sizeof err);
    else if (r->failed)                       /* declared down while it booted */
      snprintf(err, sizeof err, "%s", r->failed);
  }
  bval_list_free(vals, n);
  if (err[0]) {
    boot_fail(r, err);
    return;
  }
  r->tid = tid;
  r->local = local;
  hub *hb = H(r);
  if (!local) {                               /* the pool's idle check, before any call */
    const bval *cfg = blink_config(hb);
    size_t len = 0;
    const char *work = cfg ? bval_str(bval_get(cfg, "idle_work"), &len) : NULL;
    if (work) {
      buf b;
      buf_init(&b);
      int rc = buf_append(&b, work, len) != 0 ? -2
               : hub_term_send(hb, tid, WIRE_CONFIG, 0, &b);
      buf_free(&b);
      if (rc != 0) post_log(r->p, "error", "runner %s: idle check not sent: %s", r->name,
                            rc == -2 ? "not enough memory" : "its link is closing");
    }
  }
  /* up before the pool has it: the first call it is given may fail at once
   * (runner_lost_slot), and that must find it up */
  r->state = S_UP;
  int count = pool_boot_up(r->p, r->boot, tid, (int)code, r->name, r->bk);
  if (count < 0) {                            /* the pool closed meanwhile */
    stop(r);
    return;
  }
  post_log(r->p, "info", "runner %s up", r->name);
  post_grown(r, "ok", count);
  /* a link lost while it booted (the loss found no runner then) */
  if (!local && !hub_term_alive(hb, tid))
    runner_on_lost(r->p, tid, "the link closed while the runner booted");
}

static void on_init(void *ud, int ok, bval *vals, int n, const char *msg) {
  rrun *r = ud;
  if (call_ended(r)) {
    bval_list_free(vals, n);
    return;
  }
  bval_list_free(vals, n);
  if (r->bk_closed || r->state != S_INIT) {
    maybe_free(r);
    return;
  }
  if (!ok) {
    boot_fail(r, msg ? msg : "init failed");
    return;
  }
  r->inited = 1;
  if (r->failed) {
    char why[600];
    snprintf(why, sizeof why, "%s", r->failed);
    boot_fail(r, why);
    return;
  }
  r->state = S_BOOT;
  bval none = { .type = BV_NIL };
  r->calls++;
  if (backend_call(r->bk, "remote_boot", &none, on_remote_boot, r) != 0) {
    r->calls--;
    boot_fail(r, "cannot call the backend's remote_boot");
  }
}

/* The boot proper: a backend state for the runner, then init(settings). */
static void boot_start(rrun *r) {
  pool_rt *p = r->p;
  hub *hb = H(r);
  const bval *cfg = blink_config(hb);
  char err[400];
  if (pool_is_closed(p)) {
    snprintf(err, sizeof err, "pool '%s' is shutting down", pool_name(p));
    boot_fail(r, err);
    return;
  }
  if (r->failed) {
    snprintf(err, sizeof err, "%s", r->failed);
    boot_fail(r, err);
    return;
  }
  if (cfg == NULL) {
    boot_fail(r, "the pool is not configured");
    return;
  }
  size_t slen = 0;
  const char *name = bval_str(bval_get(cfg, "backend"), NULL);
  const char *spec = bval_str(bval_get(cfg, "spec"), &slen);
  const char *path = bval_str(bval_get(bval_get(cfg, "code_paths"), "path"), NULL);
  if (spec) name = NULL;                      /* a backend table, copied in */
  int64_t bkid = backend_new(hb, name, spec, slen, path ? path : "", r->name, r->is_min,
                           err, sizeof err);
  if (bkid < 0) {
    char why[500];
    snprintf(why, sizeof why, "cannot make a backend state: %s", err);
    boot_fail(r, why);
    return;
  }
  r->bk = bkid;
  bval settings = { .type = BV_NIL };
  const bval *init = bval_get(cfg, "init");
  if ((init && bval_copy(&settings, init) != 0) || settings.type != BV_TABLE
      || bk_table_set_str(&settings, "runner_id", r->name, strlen(r->name)) != 0) {
    bval_free(&settings);
    boot_fail(r, "not enough memory for the backend's settings");
    return;
  }
  r->state = S_INIT;
  r->calls++;
  if (backend_call(bkid, "init", &settings, on_init, r) != 0) {
    r->calls--;
    boot_fail(r, "cannot call the backend's init");
  }
}

static void on_soon_boot(rrun *r) {
  rtimer *t = r->soon;
  r->soon = NULL;
  rtimer_cancel(t);
  boot_start(r);
}

int runner_boot(pool_rt *p, uint64_t boot, int is_min, int count) {
  rrun *r = calloc(1, sizeof *r);
  if (r == NULL) return -1;
  r->p = p;
  r->boot = boot;
  r->is_min = is_min;
  r->state = S_WAIT_GO;
  snprintf(r->name, sizeof r->name, "%s-%d", pool_name(p), pool_next_no(p));
  hub *hb = H(r);
  const bval *cfg = blink_config(hb);
  /* code_sync: the application packs what it loaded since, then says go, so the
   * grow event must reach it; else the boot starts on the next turn */
  int code_sync = cfg && bval_truthy(bval_get(cfg, "code_sync"));
  hub_event *e = hub_event_new(EV_GROW);       /* on_grow_start; code_sync packs */
  if (e) {
    e->id = boot;
    e->type = is_min;
    e->pid = count;
    e->text = dup(r->name);
  }
  if (!code_sync) r->soon = rtimer_start(r, 0, on_soon_boot);
  if (code_sync ? e == NULL || e->text == NULL : r->soon == NULL) {
    hub_event_free(e);                         /* nothing started: pool.c undoes it */
    rtimer_cancel(r->soon);
    free(r);
    return -1;
  }
  r->next = runs;
  runs = r;
  if (e) hub_post(hb, e);
  post_log(p, "info", "runner %s booting", r->name);
  return 0;
}

/* --------------------------------------------------- what pool.c tells ---- */

static void on_soon_stop(rrun *r) {
  rtimer *t = r->soon;
  r->soon = NULL;
  rtimer_cancel(t);
  close_term(r, "closed by the parent", 1);
  release(r, "shutdown");
}

void runner_shrunk(pool_rt *p, int64_t tid, const char *why, int count) {
  rrun *r = find_tid(p, tid);
  if (r == NULL || r->state != S_UP) return;
  r->state = S_DOWN;                           /* out of the pool already */
  rtimer_cancel(r->grace);
  r->grace = NULL;
  post_log(p, "info", "runner %s: shut down (%s)", r->name, why);
  post_shrink(r, why, count, !r->shrink_reported);
  r->shrink_reported = 1;
  /* stopped on a later turn: pool.c is inside the link's or executor's callback */
  rtimer_cancel(r->soon);
  r->soon = rtimer_start(r, 0, on_soon_stop);
  if (r->soon == NULL) on_soon_stop(r);
}

void runner_lost_slot(pool_rt *p, int64_t tid, const char *why) {
  rrun *r = find_tid(p, tid);
  if (r) down_later(r, why, 0);
}

void runner_stop_all(pool_rt *p, const char *why) {
  for (rrun *r = runs, *next; r; r = next) {
    next = r->next;
    if (r->p != p || r->bk_closed) continue;
    if (r->state == S_UP) {
      rtimer_cancel(r->soon);                  /* a down on its way: a stop now */
      r->soon = NULL;
      stop(r);
    } else if (booting(r) && r->failed == NULL) {
      r->failed = dup(why);
      if (r->state == S_WAIT_GO) {
        rtimer_cancel(r->soon);
        r->soon = NULL;
        boot_fail(r, why);                     /* may free r: next was read */
      } else if (r->bk != 0) {
        blink_fail(H(r), r->bk, why);          /* await_remote_up returns at once */
      }
    }
  }
}

static void on_grace(rrun *r) {
  rtimer *t = r->grace;
  r->grace = NULL;
  rtimer_cancel(t);
  char *why = r->down_why;
  r->down_why = NULL;
  runner_down(r, why ? why : "lost the link to the runner", 0);
  free(why);
  maybe_free(r);
}

static void info(rrun *r, bval *msg);

void runner_on_lost(pool_rt *p, int64_t tid, const char *reason) {
  rrun *r = find_tid(p, tid);
  /* a down on its way already (grace, or a later turn's) keeps its reason */
  if (r == NULL || r->state != S_UP || r->grace || r->soon) return;
  if (r->leaving) {                            /* it said goodbye first */
    down_later(r, r->leaving, 1);
    return;
  }
  char why[600];
  snprintf(why, sizeof why, "lost the link to the runner: %s", reason ? reason : "closed");
  free(r->down_why);
  r->down_why = dup(why);
  /* the backend hears of it too, and may know more (an exit, a node gone): its
   * handle_info speaks first, briefly */
  r->calls++;                                  /* r stays, whatever info's end does */
  bval msg = { .type = BV_TABLE };
  if (bk_table_set_str(&msg, "event", "link_lost", 9) == 0
      && bk_table_set_str(&msg, "reason", why, strlen(why)) == 0)
    info(r, &msg);
  else
    bval_free(&msg);
  /* what this side found wrong with the link itself (a TLS record that failed its
   * check, a broken frame) says more than the exit that follows it */
  int own = reason && (strncmp(reason, "tls: ", 5) == 0 || strncmp(reason, "protocol", 8) == 0);
  if (r->state == S_UP) {
    r->grace = own ? NULL : rtimer_start(r, LOST_GRACE, on_grace);
    if (r->grace == NULL) down_later(r, why, 0);
  }
  r->calls--;
  maybe_free(r);
}

void runner_on_remote_shutdown(pool_rt *p, int64_t tid, const buf *text) {
  rrun *r = find_tid(p, tid);
  if (r == NULL || r->state != S_UP || r->leaving) return;
  /* it takes no more calls; calls on their way get "shutdown" and are retried
   * elsewhere; it leaves the pool when its link closes */
  char why[400];
  int n = text && text->len < 300 ? (int)text->len : 300;
  snprintf(why, sizeof why, "runner shut down: %.*s", n,
           text && text->data ? (const char *)text->data : "");
  r->leaving = dup(why);
  post_shrink(r, why, pool_count(p) - 1, 1);
  r->shrink_reported = 1;
}

static void on_info(void *ud, int ok, bval *vals, int n, const char *msg) {
  rrun *r = ud;
  if (call_ended(r)) {
    bval_list_free(vals, n);
    return;
  }
  int alive = ok && n > 0 && bval_truthy(&vals[0]);
  char why[600];
  if (ok) text_of(n > 1 ? &vals[1] : NULL, "the backend reported the runner down", why,
                  sizeof why);
  else snprintf(why, sizeof why, "%s", msg ? msg : "handle_info failed");
  bval_list_free(vals, n);
  /* already gone: only the backend cared */
  if (alive || r->bk_closed || r->state == S_DOWN) {
    maybe_free(r);
    return;
  }
  if (booting(r)) {
    if (r->failed == NULL) {                   /* the boot fails with it */
      r->failed = dup(why);
      if (r->bk != 0) blink_fail(H(r), r->bk, why);
    }
    return;
  }
  runner_down(r, why, 0);
  maybe_free(r);
}

/* handle_info(msg) in the runner's backend state; its verdict here. */
static void info(rrun *r, bval *msg) {
  r->calls++;
  if (backend_call(r->bk, "handle_info", msg, on_info, r) != 0) r->calls--;
}

void runner_on_info(int64_t bkid, bval *msg) {
  rrun *r = find_bk(bkid);
  if (r == NULL) {
    bval_free(msg);
    return;
  }
  info(r, msg);
}

void runner_on_procs(int64_t bkid, int n) {
  rrun *r = find_bk(bkid);
  if (r == NULL) return;
  r->nprocs = n;
  ended_check(r);
}

/* ---------------------------------------------------------- a shutdown ---- */

static void on_wait_bound(rrun *unused) {
  (void)unused;
}

static void wait_fire(uv_timer_t *ut) {
  rtimer *t = ut->data;
  for (ewait *w = waits; w; w = w->next) {
    if (w->t != t) continue;
    char left[1024] = "";
    size_t len = 0;
    for (rrun *r = runs; r; r = r->next) {
      if (r->p != w->p || ended(r)) continue;
      int k = snprintf(left + len, sizeof left - len, "%s%s", len ? ", " : "", r->name);
      if (k < 0 || (size_t)k >= sizeof left - len) break;
      len += (size_t)k;
    }
    w->t = NULL;
    wait_end(w, left[0] ? left : "?");
    rtimer_cancel(t);
    return;
  }
}

void runner_await_ended(pool_rt *p, double bound_ms) {
  if (all_ended(p)) {
    post_ended(p, "");
    return;
  }
  ewait *w = calloc(1, sizeof *w);
  rtimer *t = w ? calloc(1, sizeof *t) : NULL;
  if (t == NULL || uv_timer_init(runtime_loop(), &t->t) != 0) {
    free(t);
    free(w);
    post_ended(p, "?");                        /* no way to wait: do not hang */
    return;
  }
  t->base.on_close = rtimer_freed;
  t->t.data = t;
  t->fire = on_wait_bound;
  w->p = p;
  w->t = t;
  w->next = waits;
  waits = w;
  if (uv_timer_start(&t->t, wait_fire, (uint64_t)(bound_ms < 0 ? 0 : bound_ms), 0) != 0)
    wait_end(w, "?");
}

void runner_pool_closing(pool_rt *p) {
  for (ewait *w = waits, *next; w; w = next) {
    next = w->next;
    if (w->p != p) continue;
    for (ewait **q = &waits; *q; q = &(*q)->next) {
      if (*q == w) {
        *q = w->next;
        break;
      }
    }
    rtimer_cancel(w->t);
    free(w);
  }
  /* the hub closed without a shutdown (collected): its runners are stopped and
   * released, its boots fail; a record that holds no backend state goes now */
  runner_stop_all(p, "the pool's hub closed");
}

void runner_at_stop(void) {
  stopping = 1;
  for (rrun *r = runs, *next; r; r = next) {
    next = r->next;
    rtimer_cancel(r->soon);
    rtimer_cancel(r->grace);
    rtimer_cancel(r->linger);
    r->soon = r->grace = r->linger = NULL;
    if (r->calls == 0) free_run(r);          /* else with its last call's end */
  }
  while (waits) {                              /* the application waits no more */
    ewait *w = waits;
    waits = w->next;
    rtimer_cancel(w->t);
    free(w);
  }
}

/* ------------------------------------------------------------------- Lua ---- */

enum { ROP_GO, ROP_ENDED };

typedef struct rn_cmd {
  hub *h;
  int op;
  uint64_t boot;
  double ms;
  char *why;                        /* ROP_GO: the boot fails with it */
} rn_cmd;

static void rn_cmd_run(void *arg) {
  rn_cmd *m = arg;
  pool_rt *p = hub_closing(m->h) ? NULL : hub_pool(m->h);
  if (p && m->op == ROP_GO) {
    for (rrun *r = runs; r; r = r->next) {
      if (r->p == p && r->boot == m->boot && r->state == S_WAIT_GO) {
        if (m->why) boot_fail(r, m->why);
        else boot_start(r);
        break;
      }
    }
  } else if (p && m->op == ROP_ENDED) {
    runner_await_ended(p, m->ms);
  }
  free(m->why);
  free(m);
}

static int post_rcmd(lua_State *L, int op, uint64_t boot, double ms, const char *why) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  if (lh->rt == NULL) return luaL_error(L, "hub is closed");
  rn_cmd *m = calloc(1, sizeof *m);
  if (m == NULL) return luaL_error(L, "not enough memory");
  m->h = lh->rt;
  m->op = op;
  m->boot = boot;
  m->ms = ms;
  if (why && (m->why = strdup(why)) == NULL) {
    free(m);
    return luaL_error(L, "not enough memory");
  }
  if (runtime_post(rn_cmd_run, m) != 0) {
    free(m->why);
    free(m);
    return luaL_error(L, "runner: the runtime thread is not running");
  }
  return 0;
}

static int l_boot_go(lua_State *L) {
  return post_rcmd(L, ROP_GO, (uint64_t)luaL_checkinteger(L, 2), 0, luaL_optstring(L, 3, NULL));
}

static int l_await_ended(lua_State *L) {
  double ms = luaL_checknumber(L, 2);
  return post_rcmd(L, ROP_ENDED, 0, ms != ms || ms > 9e15 ? 9e15 : ms, NULL);
}

void runner_lua_methods(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "boot_go", l_boot_go }, { "await_ended", l_await_ended }, { NULL, NULL }
  };
  luaL_setfuncs(L, methods, 0);
}
