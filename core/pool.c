/*
 * pool.c - the pool's runtime side, on the runtime thread: its runners' slots, the
 * queue of callers, every call's deadline, the one grow rule, single_use, the idle
 * clock of local runners, min runners kept and replaced with backoff, and a runner's
 * loss told to every caller on it at once. One per hub (hub.h). docs/pools.md has the
 * rules; runner.c boots and stops the runners through their backends when this side
 * asks (runner_boot, runner_shrunk, runner_stop_all), and tells it when a runner is
 * up or gone (pool_boot_up, pool_boot_failed, pool_runner_down).
 *
 * Contract (Lua, methods of the hub object; "sync" ones wait for the runtime thread):
 *   hub:configure{ name, max, min, slots, single_use, direct, idle_ms, min_idle_ms,
 *                  idle_check }                      sync; grows the min runners
 *   hub:call(id, work, timeout_ms, link, code)      a call: its bytes taken, no copy
 *   hub:cancel(id)                 the caller went away: out of the queue, or its
 *                                  linked work killed (its slot waits for the end)
 *   hub:idle_answer(tid, ready)
 *   hub:reencoded(id, tid, work)   for runner tid's code
 *   hub:close_pool() -> busy       sync; queued callers get "shutdown"; "drained"
 *                                  comes when busy reaches 0
 *   hub:stop_all()                 sync; running calls are killed, their callers get
 *                                  "shutdown"; the runners are out of the pool and
 *                                  stopped (runner.c), boots in flight fail
 *   hub:pool_stats() -> { runners, pending, busy, waiting, calls, peak_busy,
 *                         workers, peak_running }    sync
 *   hub:local_close(tid), hub:local_stats(tid) -> table (sync)   a local runner's
 *                                  executor (made by bsvc_link.c's local_terminator)
 * Events (through the hub's mailbox, in order):
 *   "done", id, status, payload, leaving     a call's answer (leaving: its runner
 *                                             was shutting down)
 *   "fail", id, why, detail, phase, tid      no answer: why is "timeout" (phase
 *            "boot"/"queue" while waiting, nil once sent), "down", "boot",
 *            "unsent", "shutdown"
 *   "grow", boot, is_min, count, name   a boot starts (on_grow_start; a code_sync
 *                                   pool packs, then hub:boot_go)
 *   "grown", result, count, tid, name   it ended: "ok" or why (on_grow_end)
 *   "shrink", tid, why, count, hook     the runner left the pool (hook: on_shrink
 *                                   not told yet)
 *   "ended", left                   after hub:await_ended: the runners still ending
 *   "idle", tid                     run the idle check, then idle_answer
 *   "reencode", id, code, tid       encode again for runner tid's code, then
 *                                   reencoded (its slot is held)
 *   "drained"                       after close_pool, no call is running any more
 * A pool whose backend has its own remote_spawn_monitor hands each call to it here,
 * on the runtime thread (backend_call); the call is held until the backend's
 * spawn_monitor sends it (pool_via_sent), else it goes to another runner.
 * Every call ends with exactly one "done" or "fail" unless it was cancelled.
 * Threads: everything but the Lua functions runs on the runtime thread; the Lua
 * functions post commands (or wait for them) and read nothing of the runtime's.
 */
#include <math.h>
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
#include "executor.h"
#include "hub.h"
#include "loop.h"
#include "runner.h"
#include "runtime.h"
#include "sandbox.h"
#include "wire.h"

enum { R_UP, R_DRAINING, R_LOST };
enum { C_QUEUED, C_HELD, C_SENT };
enum { PHASE_NONE, PHASE_BOOT, PHASE_QUEUE };

/* A timer apart from what it times: its struct is freed by its own close callback,
 * so what it timed may go at once (a call answered, a runner gone). */
typedef struct ptimer {
  flame_handle base;
  uv_timer_t t;
  void (*fire)(void *owner);
  void *owner;                      /* NULL once cancelled */
  pool_rt *p;                       /* counted in p->handles until closed */
} ptimer;

typedef struct pcall pcall;
typedef struct prunner prunner;

struct pcall {
  pcall *next, *prev;               /* in the queue, or in its runner's calls */
  prunner *r;                       /* NULL while queued */
  pool_rt *p;
  ptimer *deadline_t;
  uint64_t id;
  uint64_t deadline;                /* runtime loop ms; UINT64_MAX for none */
  int link, code, tries, state;
  int answered;                     /* the caller has its answer (a timeout, a cancel) */
  buf work;                         /* until sent */
  char last[256];                   /* why the last runner could not take it */
  char lastname[96];                /* and its name */
};

typedef struct lterm {
  struct lterm *next;
  pool_rt *p;
  int64_t tid;
  executor *ex;
} lterm;

struct prunner {
  prunner *next;
  pool_rt *p;
  int64_t tid;
  int64_t bk;                       /* its backend state (backend.c), 0: none */
  lterm *lt;                        /* a local runner's executor, or NULL (remote) */
  int status, inflight, used, is_min, code, peak, checking;
  pcall *calls;
  ptimer *idle_t;
  char name[96];
};

typedef struct boot {
  struct boot *next;
  uint64_t id;
  int is_min;
} boot;

struct pool_rt {
  hub *h;
  pool_rt *next_pool;               /* every pool of the process (pools_at_stop) */
  char name[128];
  int max, min, slots, single_use, direct, idle_check;
  double idle_ms, min_idle_ms;      /* < 0: never */
  prunner *runners;
  int nrunners;
  pcall *qhead, *qtail;
  int nwaiting, booting, nmin;
  boot *boots;
  uint64_t next_boot;
  long calls, peak;
  int closed, drain_wanted, closing;
  double backoff;
  ptimer *min_t;
  lterm *lterms;
  int handles;                      /* ptimers not yet closed */
  int runner_no;                    /* runners booted so far (their names) */
};

static void pool_register(pool_rt *p);
static void pool_unregister(pool_rt *p);

static uv_loop_t *L_(void) {
  return runtime_loop();
}

/* ---------------------------------------------------------------- timers ---- */

static void ptimer_freed(uv_handle_t *hd) {
  ptimer *t = hd->data;
  pool_rt *p = t->p;
  free(t);
  if (p && --p->handles == 0 && p->closing) hub_maybe_free(p->h);
}

static void ptimer_cb(uv_timer_t *ut) {
  ptimer *t = ut->data;
  void *owner = t->owner;
  if (owner == NULL) return;
  t->fire(owner);
}

static void ptimer_cancel(ptimer *t) {
  if (t == NULL) return;
  t->owner = NULL;
  uv_timer_stop(&t->t);
  uv_close((uv_handle_t *)&t->t, ptimer_freed);
}

/* NULL when libuv or memory refuse: the caller goes on without that timer. */
static ptimer *ptimer_start(pool_rt *p, uint64_t ms, void (*fire)(void *), void *owner) {
  ptimer *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  if (uv_timer_init(L_(), &t->t) != 0) {
    free(t);
    return NULL;
  }
  t->base.on_close = ptimer_freed;
  t->t.data = t;
  t->fire = fire;
  t->owner = owner;
  t->p = p;
  p->handles++;
  if (uv_timer_start(&t->t, ptimer_cb, ms, 0) != 0) {
    ptimer_cancel(t);
    return NULL;
  }
  return t;
}

/* ---------------------------------------------------------------- events ---- */

static hub_event *ev(int kind) {
  return hub_event_new(kind);         /* NULL: out of memory, the event is lost */
}

static char *dup(const char *s) {
  return s ? strdup(s) : NULL;
}

static void fail_call_event(pool_rt *p, pcall *c, const char *why, const char *detail,
                            int phase, const char *name) {
  hub_event *e = ev(EV_FAIL);
  if (e == NULL) return;
  e->id = c->id;
  e->text = dup(why);
  e->text2 = dup(detail);
  e->type = phase;
  e->name = dup(name);
  hub_post(p->h, e);
}

/* ----------------------------------------------------------------- calls ---- */

int pool_live_calls;

static void call_free(pcall *c) {
  pool_live_calls--;
  ptimer_cancel(c->deadline_t);
  buf_free(&c->work);
  free(c);
}

static void queue_remove(pool_rt *p, pcall *c) {
  if (c->prev) c->prev->next = c->next;
  else p->qhead = c->next;
  if (c->next) c->next->prev = c->prev;
  else p->qtail = c->prev;
  c->next = c->prev = NULL;
  p->nwaiting--;
}

static void queue_push(pool_rt *p, pcall *c, int front) {
  c->r = NULL;
  c->state = C_QUEUED;
  if (front) {
    c->prev = NULL;
    c->next = p->qhead;
    if (p->qhead) p->qhead->prev = c;
    else p->qtail = c;
    p->qhead = c;
  } else {
    c->next = NULL;
    c->prev = p->qtail;
    if (p->qtail) p->qtail->next = c;
    else p->qhead = c;
    p->qtail = c;
  }
  p->nwaiting++;
}

static void runner_add_call(prunner *r, pcall *c) {
  c->r = r;
  c->prev = NULL;
  c->next = r->calls;
  if (r->calls) r->calls->prev = c;
  r->calls = c;
}

static void runner_remove_call(prunner *r, pcall *c) {
  if (c->prev) c->prev->next = c->next;
  else r->calls = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
  c->r = NULL;
}

static pcall *runner_find_call(prunner *r, uint64_t id) {
  for (pcall *c = r->calls; c; c = c->next)
    if (c->id == id) return c;
  return NULL;
}

static prunner *runner_find(pool_rt *p, int64_t tid) {
  for (prunner *r = p->runners; r; r = r->next)
    if (r->tid == tid) return r;
  return NULL;
}

static pcall *call_find(pool_rt *p, uint64_t id) {
  for (pcall *c = p->qhead; c; c = c->next)
    if (c->id == id) return c;
  for (prunner *r = p->runners; r; r = r->next) {
    pcall *c = runner_find_call(r, id);
    if (c) return c;
  }
  return NULL;
}

static long busy(const pool_rt *p) {
  long b = 0;
  for (prunner *r = p->runners; r; r = r->next) b += r->inflight;
  return b;
}

static void drained_check(pool_rt *p) {
  if (!p->drain_wanted || busy(p) > 0) return;
  p->drain_wanted = 0;
  hub_event *e = ev(EV_DRAINED);
  if (e) hub_post(p->h, e);
}

/* ---------------------------------------------------------------- slots ---- */

static int grow(pool_rt *p);
static void serve(pool_rt *p);
static void idle_watch(pool_rt *p, prunner *r);
static void send_call(pool_rt *p, prunner *r, pcall *c);

/* The up runner with the fewest calls that has a free slot, or NULL. */
static prunner *pick(pool_rt *p) {
  prunner *best = NULL;
  for (prunner *r = p->runners; r; r = r->next)
    if (r->status == R_UP && r->inflight < p->slots && !r->used
        && (best == NULL || r->inflight < best->inflight))
      best = r;
  return best;
}

static void take(pool_rt *p, prunner *r, pcall *c) {
  r->inflight++;
  if (r->inflight > r->peak) r->peak = r->inflight;
  if (p->single_use) r->used = 1;
  ptimer_cancel(r->idle_t);
  r->idle_t = NULL;
  runner_add_call(r, c);
  p->calls++;
  long b = busy(p);
  if (b > p->peak) p->peak = b;
}

static void untake(pool_rt *p, prunner *r, pcall *c) {
  runner_remove_call(r, c);
  r->inflight--;
  if (p->single_use) r->used = 0;
  drained_check(p);
}

/* The one grow rule: a runner more when the pool is below max and the callers
 * waiting are more than the boots in flight will serve. */
static int should_grow(const pool_rt *p) {
  return !p->closed && p->nrunners + p->booting < p->max
         && p->nwaiting > p->booting * p->slots;
}

static void grow_for_waiters(pool_rt *p) {
  if (should_grow(p)) (void)grow(p);
}

/* 1, or 0 when memory refused (nothing boots: callers time out). */
static int grow(pool_rt *p) {
  boot *b = calloc(1, sizeof *b);
  if (b == NULL) return 0;
  b->id = ++p->next_boot;
  b->is_min = p->nmin < p->min;               /* it keeps the pool at min: min rules */
  if (b->is_min) p->nmin++;
  b->next = p->boots;
  p->boots = b;
  p->booting++;
  if (runner_boot(p, b->id, b->is_min, p->nrunners + p->booting) != 0) {
    p->boots = b->next;                       /* nothing started: as if never asked */
    p->booting--;
    if (b->is_min) p->nmin--;
    free(b);
    return 0;
  }
  return 1;                                   /* it ends on a later turn */
}

static boot *boot_take(pool_rt *p, uint64_t id) {
  for (boot **q = &p->boots; *q; q = &(*q)->next) {
    if ((*q)->id == id) {
      boot *b = *q;
      *q = b->next;
      return b;
    }
  }
  return NULL;
}

static void fail_unsent(pool_rt *p, pcall *c) {
  fail_call_event(p, c, "unsent", c->last, PHASE_NONE, c->lastname);
  call_free(c);
}

/* A call no runner took: to the front of the queue for another, or, after three
 * runners, to its caller with why. */
static void requeue(pool_rt *p, pcall *c, const char *why, const char *name) {
  snprintf(c->last, sizeof c->last, "%s", why);
  snprintf(c->lastname, sizeof c->lastname, "%s", name);
  if (p->closed) {                            /* no runner will take it any more */
    fail_call_event(p, c, "shutdown", "closing", PHASE_NONE, NULL);
    call_free(c);
    return;
  }
  if (++c->tries >= 3) {
    fail_unsent(p, c);
    return;
  }
  queue_push(p, c, 1);
}

/* A runner's slots are no longer offered: it gets no calls from now on. */
static void runner_failed(pool_rt *p, prunner *r, const char *why) {
  r->status = R_LOST;
  runner_lost_slot(p, r->tid, why);          /* down on a later turn (runner.c) */
}

static int64_t ms_left(pcall *c) {
  if (c->deadline == UINT64_MAX) return -1;
  uint64_t now = uv_now(L_());
  return c->deadline > now ? (int64_t)(c->deadline - now) : 1;
}

/* The work goes to the runner: a SPAWN on its link, or its executor. 1 when it went;
 * 0 when it did not, and then c is no longer r's: back at the front of the queue for
 * another runner (its bytes kept), or answered and freed (its bytes gone with the
 * failed send). Do not touch c after a 0. */
static int transmit(pool_rt *p, prunner *r, pcall *c) {
  int64_t t = ms_left(c);
  c->state = C_SENT;
  char why[256];
  if (r->lt) {
    const char *err;
    if (executor_submit(r->lt->ex, (int64_t)c->id, &c->work, WIRE_SPAWN_HEADER,
                        EXECUTOR_WORK, &err) == 0)
      return 1;
    snprintf(why, sizeof why, "runner %s could not take the call: executor: %s", r->name, err);
    untake(p, r, c);
    fail_call_event(p, c, "unsent", why, PHASE_NONE, r->name);
    call_free(c);
    runner_failed(p, r, why);                 /* the application downs it */
    return 0;
  }
  wire_spawn_header(c->work.data, t, c->link);
  int rc = hub_term_send(p->h, r->tid, WIRE_SPAWN, c->id, &c->work);
  if (rc == 0) return 1;
  untake(p, r, c);
  if (rc == -1) {
    /* its link is closing: nothing went out, so another runner may take it; the
     * hub's "lost" tells the application why the runner went */
    snprintf(why, sizeof why, "runner %s was gone before the call was sent", r->name);
    r->status = R_LOST;
    requeue(p, c, why, r->name);
  } else {
    snprintf(why, sizeof why, "runner %s could not take the call: not enough memory", r->name);
    fail_call_event(p, c, "unsent", why, PHASE_NONE, r->name);
    call_free(c);
  }
  return 0;
}

static void via_failed(pool_rt *p, uint64_t id, int64_t tid, const char *why);

/* A call the backend's remote_spawn_monitor was to send: its end. */
typedef struct via {
  hub *h;
  uint64_t id;
  int64_t tid;
} via;

static void via_done(void *ud, int ok, bval *vals, int n, const char *msg) {
  via *v = ud;
  bval_list_free(vals, n);
  /* sent (spawn_monitor transmitted it): the call is not held any more, and this
   * changes nothing; else it goes to another runner */
  via_failed(hub_pool(v->h), v->id, v->tid, ok ? "the backend did not send the call" : msg);
  free(v);
}

/* Hands call c to runner r's backend (remote_spawn_monitor), holding its slot:
 * 0, or -1 when it cannot be asked. */
static int via_backend(pool_rt *p, prunner *r, pcall *c) {
  via *v = malloc(sizeof *v);
  bval arg = { .type = BV_NIL }, tmo = { .type = BV_NUM };
  int64_t left = ms_left(c);                  /* no deadline: math.huge, as a call's */
  tmo.u.n = left < 0 ? HUGE_VAL : (double)left;
  if (v == NULL || bk_table_set_int(&arg, "id", (lua_Integer)c->id) != 0
      || bk_table_set_bool(&arg, "link", c->link) != 0
      || bk_table_set(&arg, "timeout", &tmo) != 0) {
    free(v);
    bval_free(&arg);
    return -1;
  }
  *v = (via){ p->h, c->id, r->tid };
  c->state = C_HELD;
  if (backend_call(r->bk, "remote_spawn_monitor", &arg, via_done, v) != 0) {
    free(v);
    return -1;
  }
  return 0;
}

static void send_call(pool_rt *p, prunner *r, pcall *c) {
  if (c->code != r->code) {   /* code_sync: encoded for other code */
    hub_event *e = ev(EV_REENCODE);
    if (e) {
      c->state = C_HELD;
      e->id = c->id;
      e->pid = r->code;
      e->tid = r->tid;
      hub_post(p->h, e);
      return;
    }
  }
  if (!p->direct) {                           /* the backend's remote_spawn_monitor */
    if (via_backend(p, r, c) == 0) return;
    c->state = C_HELD;
    char why[256];
    snprintf(why, sizeof why, "runner %s could not take the call: its backend state is closed",
             r->name);
    untake(p, r, c);
    requeue(p, c, why, r->name);
    runner_failed(p, r, why);
    return;
  }
  (void)transmit(p, r, c);
}

/* Gives free slots to the oldest waiters. */
static void serve(pool_rt *p) {
  while (p->qhead) {
    prunner *r = pick(p);
    if (r == NULL) return;
    pcall *c = p->qhead;
    queue_remove(p, c);
    take(p, r, c);
    send_call(p, r, c);
  }
}

static void kill_work(pool_rt *p, prunner *r, pcall *c, const char *reason, int code) {
  if (c->state != C_SENT) return;
  if (r->lt) {
    executor_kill(r->lt->ex, (int64_t)c->id, code);
  } else {
    buf b;
    buf_init(&b);
    if (buf_append(&b, reason, strlen(reason)) == 0)
      hub_term_send(p->h, r->tid, WIRE_KILL, c->id, &b);   /* a closing link: no need */
    buf_free(&b);
  }
}

static void on_deadline(void *owner) {
  pcall *c = owner;
  pool_rt *p = c->p;
  ptimer *t = c->deadline_t;
  c->deadline_t = NULL;
  ptimer_cancel(t);
  if (c->state == C_QUEUED) {
    queue_remove(p, c);
    fail_call_event(p, c, "timeout", NULL, p->booting > 0 ? PHASE_BOOT : PHASE_QUEUE, NULL);
    call_free(c);
    return;
  }
  prunner *r = c->r;
  if (c->answered) return;
  c->answered = 1;
  if (c->state == C_HELD) {                   /* nothing was sent: the slot is free */
    fail_call_event(p, c, "timeout", NULL, PHASE_QUEUE, NULL);
    untake(p, r, c);
    call_free(c);
    serve(p);
    idle_watch(p, r);
    return;
  }
  fail_call_event(p, c, "timeout", NULL, PHASE_NONE, r->name);
  kill_work(p, r, c, "timeout", SANDBOX_KILL_TIMEOUT);   /* its slot waits for its end */
}

/* ---------------------------------------------------------------- runners ---- */

static void runner_free(prunner *r) {
  ptimer_cancel(r->idle_t);
  free(r);
}

static void runner_unlink(pool_rt *p, prunner *r) {
  for (prunner **q = &p->runners; *q; q = &(*q)->next) {
    if (*q == r) {
      *q = r->next;
      p->nrunners--;
      return;
    }
  }
}

/* A runner leaves on purpose (idle, single use): out of the pool, not replaced. */
static void shrink(pool_rt *p, prunner *r, const char *why) {
  runner_unlink(p, r);
  if (r->is_min) p->nmin--;
  runner_shrunk(p, r->tid, why, p->nrunners); /* stopped and released (runner.c) */
  for (pcall *c = r->calls, *next; c; c = next) {   /* none, unless answered already */
    next = c->next;
    call_free(c);
  }
  runner_free(r);
  grow_for_waiters(p);
}

static void idle_fire(pool_rt *p, prunner *r) {
  if (r->status != R_UP || r->inflight > 0 || p->closed) return;
  if (!p->idle_check) {
    shrink(p, r, "idle");
    return;
  }
  hub_event *e = ev(EV_IDLE);                 /* the check may wait: the application */
  if (e == NULL) return;
  r->checking = 1;
  e->tid = r->tid;
  hub_post(p->h, e);
}

static void on_idle(void *owner) {
  prunner *r = owner;
  ptimer *t = r->idle_t;
  r->idle_t = NULL;
  ptimer_cancel(t);
  idle_fire(r->p, r);
}

/* Local runners idle down here (remote ones decide on the runner). */
static void idle_watch(pool_rt *p, prunner *r) {
  if (r->lt == NULL || r->status != R_UP || r->inflight > 0 || p->closed || r->checking)
    return;
  double ms = r->is_min ? p->min_idle_ms : p->idle_ms;
  if (ms < 0) return;
  ptimer_cancel(r->idle_t);
  r->idle_t = ptimer_start(p, (uint64_t)ms, on_idle, r);
}

static void call_done(pool_rt *p, prunner *r, pcall *c, buf *out) {
  if (!c->answered) {
    hub_event *e = ev(EV_DONE);
    if (e) {
      e->id = c->id;
      e->payload = *out;                      /* the bytes are the event's now */
      buf_init(out);
      e->type = r->status == R_DRAINING;
      hub_post(p->h, e);
    }
  }
  untake(p, r, c);                            /* after: "drained" follows the last answer */
  call_free(c);
  drained_check(p);
  if (p->single_use && r->inflight == 0 && r->status == R_UP) {
    shrink(p, r, "single use");
    return;
  }
  serve(p);
  idle_watch(p, r);
}

void pool_on_result(pool_rt *p, int64_t tid, uint64_t id, buf *msg) {
  prunner *r = p ? runner_find(p, tid) : NULL;
  pcall *c = r ? runner_find_call(r, id) : NULL;
  if (c == NULL || c->state != C_SENT) return;   /* not ours, or answered already */
  call_done(p, r, c, msg);
}

void pool_on_draining(pool_rt *p, int64_t tid, const buf *msg) {
  prunner *r = p ? runner_find(p, tid) : NULL;
  if (r && r->status == R_UP) r->status = R_DRAINING;
  if (p && !p->closing) runner_on_remote_shutdown(p, tid, msg);
}

void pool_on_lost(pool_rt *p, int64_t tid, const char *reason) {
  prunner *r = p ? runner_find(p, tid) : NULL;
  if (r) r->status = R_LOST;
  if (p && !p->closing) runner_on_lost(p, tid, reason);
}

static void local_done(void *ud, int64_t id, buf *out, int truthy) {
  (void)truthy;
  lterm *lt = ud;
  pool_on_result(lt->p, lt->tid, (uint64_t)id, out);
}

/* --------------------------------------------------------- life of a pool ---- */

pool_rt *pool_rt_new(hub *h) {
  pool_rt *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  p->h = h;
  p->max = 1;
  p->slots = 1;
  p->direct = 1;
  p->idle_ms = p->min_idle_ms = -1;
  p->backoff = 500;
  pool_register(p);
  return p;
}

/* Its workers are joined off this thread: one stuck in a blocking C call (a sleep in
 * os.execute) must not hold the runtime's loop, and so every pool's heartbeats. */
static void lterm_close(lterm *lt) {
  if (lt->ex) executor_close_async(lt->ex);
  lt->ex = NULL;
}

/* The hub is closing: every handle goes; hub_maybe_free waits for them. */
void pool_rt_close(pool_rt *p) {
  p->closing = 1;
  p->closed = 1;
  for (pcall *c = p->qhead, *next; c; c = next) {   /* none after a shutdown; a caller */
    next = c->next;                                  /* of a hub closed otherwise hears */
    fail_call_event(p, c, "shutdown", "closing", PHASE_NONE, NULL);
    call_free(c);
  }
  p->qhead = p->qtail = NULL;
  p->nwaiting = 0;
  while (p->runners) {
    prunner *r = p->runners;
    p->runners = r->next;
    for (pcall *c = r->calls, *next; c; c = next) {
      next = c->next;
      if (!c->answered) fail_call_event(p, c, "shutdown", "stopped", PHASE_NONE, r->name);
      call_free(c);
    }
    runner_free(r);
  }
  p->nrunners = 0;
  ptimer_cancel(p->min_t);
  p->min_t = NULL;
  for (lterm *lt = p->lterms; lt; lt = lt->next) lterm_close(lt);
  runner_pool_closing(p);
}

hub *pool_hub(pool_rt *p) {
  return p->h;
}

const char *pool_name(const pool_rt *p) {
  return p->name;
}

int pool_is_closed(const pool_rt *p) {
  return p->closed;
}

int pool_count(const pool_rt *p) {
  return p->nrunners;
}

int pool_next_no(pool_rt *p) {
  return ++p->runner_no;
}

int pool_rt_closed(const pool_rt *p) {
  return p->handles == 0;
}

void pool_rt_free(pool_rt *p) {
  if (p == NULL) return;
  pool_unregister(p);
  while (p->boots) {
    boot *b = p->boots;
    p->boots = b->next;
    free(b);
  }
  while (p->lterms) {
    lterm *lt = p->lterms;
    p->lterms = lt->next;
    lterm_close(lt);
    free(lt);
  }
  free(p);
}

/* At the runtime's stop (process exit): executors on its loop are closed before its
 * walk, so no worker runs while their memory goes. The list is the runtime thread's. */
static pool_rt *all_pools;

static void pools_at_stop(void) {
  for (pool_rt *p = all_pools; p; p = p->next_pool) {
    p->closed = 1;                            /* nothing starts from here on */
    for (prunner *r = p->runners; r; r = r->next) {
      r->lt = NULL;                           /* a timer below kills nothing there */
      r->status = R_LOST;
    }
    for (lterm *lt = p->lterms; lt; lt = lt->next) {
      if (lt->ex) executor_close(lt->ex, 1);   /* the process is ending: here */
      lt->ex = NULL;
    }
  }
  while (executor_joining() > 0) uv_run(runtime_loop(), UV_RUN_ONCE);
  runner_at_stop();                           /* before the backend states close */
}

static void pool_register(pool_rt *p) {
  static int hooked;
  if (!hooked) {
    hooked = 1;
    runtime_at_stop(pools_at_stop);
  }
  p->next_pool = all_pools;
  all_pools = p;
}

static void pool_unregister(pool_rt *p) {
  for (pool_rt **q = &all_pools; *q; q = &(*q)->next_pool) {
    if (*q == p) {
      *q = p->next_pool;
      return;
    }
  }
}

/* -------------------------------------------------------------- commands ---- */

enum {
  OP_CONFIGURE, OP_CALL, OP_CANCEL,
  OP_IDLE_ANSWER, OP_REENCODED, OP_CLOSE_POOL, OP_STOP_ALL,
  OP_STATS, OP_LOCAL_STATS
};

typedef struct pcmd {
  hub *h;
  int op;
  uint64_t id;
  int64_t tid, boot, code, ms;
  int link, flag;
  char *text;
  buf work;
  /* configure */
  int max, min, slots, single_use, direct, idle_check;
  double idle_ms, min_idle_ms;
  /* answers of sync commands */
  int64_t ret;
  char err[256];
  long st[8];
  executor_stats xs;
} pcmd;

static void pcmd_free(pcmd *c) {
  free(c->text);
  buf_free(&c->work);
  free(c);
}

static lterm *lterm_find(pool_rt *p, int64_t tid) {
  for (lterm *lt = p->lterms; lt; lt = lt->next)
    if (lt->tid == tid) return lt;
  return NULL;
}

static void op_call(pool_rt *p, pcmd *m) {
  pcall *c = calloc(1, sizeof *c);
  if (c == NULL) {
    pcall none = { .id = m->id };
    fail_call_event(p, &none, "shutdown", "memory", PHASE_NONE, NULL);
    return;
  }
  pool_live_calls++;
  c->p = p;
  c->id = m->id;
  c->link = m->link;
  c->code = (int)m->code;
  c->work = m->work;
  buf_init(&m->work);
  c->deadline = m->ms < 0 ? UINT64_MAX : uv_now(L_()) + (uint64_t)m->ms;
  if (p->closed) {
    fail_call_event(p, c, "shutdown", "closed", PHASE_NONE, NULL);
    call_free(c);
    return;
  }
  if (c->deadline != UINT64_MAX) c->deadline_t = ptimer_start(p, (uint64_t)m->ms, on_deadline, c);
  prunner *r = pick(p);
  if (r) {
    take(p, r, c);
    send_call(p, r, c);
    serve(p);                                 /* a send that failed put it back */
    return;
  }
  queue_push(p, c, 0);
  grow_for_waiters(p);
}

static void op_cancel(pool_rt *p, pcmd *m) {
  pcall *c = call_find(p, m->id);
  if (c == NULL) return;
  if (c->state == C_QUEUED) {
    queue_remove(p, c);
    call_free(c);
    return;
  }
  prunner *r = c->r;
  if (c->state == C_HELD) {                   /* not sent: its slot back */
    untake(p, r, c);
    call_free(c);
    drained_check(p);
    serve(p);
    idle_watch(p, r);
    return;
  }
  if (c->answered) return;
  c->answered = 1;
  if (c->link) kill_work(p, r, c, "cancelled", SANDBOX_KILL_CANCEL);
}

int pool_boot_up(pool_rt *p, uint64_t boot_no, int64_t tid, int code, const char *name,
                 int64_t bkid) {
  boot *b = boot_take(p, boot_no);
  if (b == NULL) return -1;
  int is_min = b->is_min;
  free(b);
  p->booting--;
  if (p->closed) {
    if (is_min) p->nmin--;
    return -1;
  }
  prunner *r = calloc(1, sizeof *r);
  if (r == NULL) {
    if (is_min) p->nmin--;
    return -1;
  }
  r->p = p;
  r->tid = tid;
  r->bk = bkid;                               /* its backend state */
  r->code = code;
  r->is_min = is_min;
  r->lt = lterm_find(p, tid);
  /* a link lost between its "up" and now: in the pool until the application downs
   * it (it heard "lost"), but given no call */
  if (r->lt == NULL && !hub_term_alive(p->h, r->tid)) r->status = R_LOST;
  snprintf(r->name, sizeof r->name, "%s", name ? name : "?");
  prunner **q = &p->runners;
  while (*q) q = &(*q)->next;                 /* in boot order: ties go to the oldest */
  *q = r;
  p->nrunners++;
  if (is_min) p->backoff = 500;
  int n = p->nrunners;
  serve(p);
  idle_watch(p, r);
  return n;
}

static void on_min_timer(void *owner) {
  pool_rt *p = owner;
  ptimer *t = p->min_t;
  p->min_t = NULL;
  ptimer_cancel(t);
  while (!p->closed && p->nmin < p->min && p->nrunners + p->booting < p->max)
    if (!grow(p)) break;
}

void pool_boot_failed(pool_rt *p, uint64_t boot_no, const char *message) {
  boot *b = boot_take(p, boot_no);
  if (b == NULL) return;
  int is_min = b->is_min;
  free(b);
  p->booting--;
  /* the callers this boot was for learn why: all of them when nothing else is up or
   * booting, else as many as it would have served (the rest may get another) */
  int n = p->nwaiting;
  if ((p->nrunners > 0 || p->booting > 0) && n > p->slots) n = p->slots;
  for (int i = 0; i < n && p->qhead; i++) {
    pcall *c = p->qhead;
    queue_remove(p, c);
    fail_call_event(p, c, "boot", message, PHASE_NONE, NULL);
    call_free(c);
  }
  if (is_min) {
    p->nmin--;
    p->backoff = p->backoff * 2 > 30000 ? 30000 : p->backoff * 2;
    if (!p->closed) {                         /* min is kept: try again, later */
      ptimer_cancel(p->min_t);
      p->min_t = ptimer_start(p, (uint64_t)p->backoff, on_min_timer, p);
    }
  }
  grow_for_waiters(p);
}

int pool_runner_down(pool_rt *p, int64_t tid, const char *reason, int quiet) {
  prunner *r = runner_find(p, tid);
  if (r == NULL) return p->nrunners;
  runner_unlink(p, r);
  pcall *list = r->calls;                     /* off the runner first: some are requeued */
  r->calls = NULL;
  r->inflight = 0;
  int put_back = 0;
  for (pcall *c = list, *next; c; c = next) {
    next = c->next;
    c->next = c->prev = NULL;
    c->r = NULL;
    if (c->state == C_HELD && !c->answered) {  /* nothing was sent: another runner */
      char why[256];
      snprintf(why, sizeof why, "runner %s went away before the call was sent: %s",
               r->name, reason ? reason : "");
      requeue(p, c, why, r->name);
      put_back = 1;
      continue;
    }
    if (!c->answered) fail_call_event(p, c, "down", reason, PHASE_NONE, r->name);
    call_free(c);
  }
  int is_min = r->is_min;
  runner_free(r);
  int n = p->nrunners;
  drained_check(p);
  if (put_back) serve(p);                     /* another runner may be free now */
  if (is_min) {
    p->nmin--;
    if (!quiet && !p->closed) {               /* a min runner that died is replaced */
      (void)grow(p);
      return n;
    }
  }
  grow_for_waiters(p);
  return n;
}

static void op_idle_answer(pool_rt *p, pcmd *m) {
  prunner *r = runner_find(p, m->tid);
  if (r == NULL) return;
  r->checking = 0;
  if (r->status != R_UP || r->inflight > 0 || p->closed) return;
  if (m->flag) shrink(p, r, "idle");
  else idle_watch(p, r);
}

int pool_via_sent(pool_rt *p, uint64_t id, int64_t tid, char *err, size_t errlen) {
  pcall *c = call_find(p, id);
  if (c == NULL || c->state != C_HELD) {
    snprintf(err, errlen, "spawn_monitor: no such call");
    return 0;
  }
  if (c->r->tid != tid) {
    snprintf(err, errlen, "spawn_monitor: the call is for runner %s", c->r->name);
    return 0;
  }
  prunner *r = c->r;
  if (transmit(p, r, c)) return 1;
  snprintf(err, errlen, "spawn_monitor: runner %s could not take the call", r->name);
  serve(p);                                   /* it may have gone back to the queue */
  return 0;
}

static void via_failed(pool_rt *p, uint64_t id, int64_t tid, const char *msg) {
  pcall *c = call_find(p, id);
  /* only the try it was for: the call may be held for another runner by now */
  if (c == NULL || c->state != C_HELD || c->r->tid != tid) return;
  prunner *r = c->r;
  char why[400];
  snprintf(why, sizeof why, "runner %s could not take the call: %s", r->name,
           msg ? msg : "the backend did not send the call");
  untake(p, r, c);
  requeue(p, c, why, r->name);
  runner_failed(p, r, why);
  serve(p);
}

static void op_reencoded(pool_rt *p, pcmd *m) {
  pcall *c = call_find(p, m->id);
  /* only for the runner it was encoded for: the call may be held for another now */
  if (c == NULL || c->state != C_HELD || c->r->tid != m->tid) return;
  buf_free(&c->work);
  c->work = m->work;
  buf_init(&m->work);
  c->code = c->r->code;
  send_call(p, c->r, c);
  serve(p);
}

static void op_close_pool(pool_rt *p, pcmd *m) {
  p->closed = 1;
  ptimer_cancel(p->min_t);
  p->min_t = NULL;
  while (p->qhead) {
    pcall *c = p->qhead;
    queue_remove(p, c);
    fail_call_event(p, c, "shutdown", "closing", PHASE_NONE, NULL);
    call_free(c);
  }
  m->ret = busy(p);
  p->drain_wanted = m->ret > 0;
}

static void op_stop_all(pool_rt *p, pcmd *m) {
  p->closed = 1;
  p->drain_wanted = 0;
  while (p->qhead) {                          /* put back meanwhile: no runner for it */
    pcall *c = p->qhead;
    queue_remove(p, c);
    fail_call_event(p, c, "shutdown", "closing", PHASE_NONE, NULL);
    call_free(c);
  }
  (void)m;
  while (p->runners) {
    prunner *r = p->runners;
    p->runners = r->next;
    for (pcall *c = r->calls, *next; c; c = next) {
      next = c->next;
      kill_work(p, r, c, "shutdown", SANDBOX_KILL_SHUTDOWN);
      if (!c->answered) fail_call_event(p, c, "shutdown", "stopped", PHASE_NONE, r->name);
      call_free(c);
    }
    runner_free(r);
  }
  p->nrunners = 0;
  char why[200];
  snprintf(why, sizeof why, "pool '%s' is shutting down", p->name);
  runner_stop_all(p, why);                    /* stopped, boots in flight failed */
}

static void op_stats(pool_rt *p, pcmd *m) {
  long workers = 0, peak_running = 0;
  for (prunner *r = p->runners; r; r = r->next) {
    if (r->lt && r->lt->ex) {
      executor_stats xs;
      executor_get_stats(r->lt->ex, &xs);
      workers += xs.workers;
      if (xs.peak > peak_running) peak_running = xs.peak;
    } else {
      workers += r->inflight;
      if (r->peak > peak_running) peak_running = r->peak;
    }
  }
  m->st[0] = p->nrunners;
  m->st[1] = p->booting;
  m->st[2] = busy(p);
  m->st[3] = p->nwaiting;
  m->st[4] = p->calls;
  m->st[5] = p->peak;
  m->st[6] = workers;
  m->st[7] = peak_running;
}

int64_t pool_local_term(pool_rt *p, int workers, const sandbox_config *cfg, executor **ex,
                        char *err, size_t errlen) {
  lterm *lt = calloc(1, sizeof *lt);
  if (lt == NULL) {
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  lt->p = p;
  lt->tid = hub_new_tid(p->h);
  const char *why = "";
  lt->ex = executor_new(L_(), workers, cfg, EXECUTOR_PRESTART, local_done, lt, &why);
  if (lt->ex == NULL) {
    snprintf(err, errlen, "executor: %s", why);
    free(lt);
    return -1;
  }
  lt->next = p->lterms;
  p->lterms = lt;
  *ex = lt->ex;
  return lt->tid;
}

void pool_local_close(pool_rt *p, int64_t tid) {
  for (lterm **q = &p->lterms; *q; q = &(*q)->next) {
    if ((*q)->tid == tid) {
      lterm *lt = *q;
      *q = lt->next;
      prunner *r = runner_find(p, lt->tid);
      if (r) r->lt = NULL, r->status = R_LOST;   /* still in the pool: no calls to it */
      lterm_close(lt);
      free(lt);
      return;
    }
  }
}

static void op_local_stats(pool_rt *p, pcmd *m) {
  lterm *lt = lterm_find(p, m->tid);
  m->ret = lt && lt->ex;
  if (m->ret) executor_get_stats(lt->ex, &m->xs);
}

static void op_configure(pool_rt *p, pcmd *m) {
  snprintf(p->name, sizeof p->name, "%s", m->text ? m->text : "");
  p->max = m->max;
  p->min = m->min;
  p->slots = m->slots;
  p->single_use = m->single_use;
  p->direct = m->direct;
  p->idle_check = m->idle_check;
  p->idle_ms = m->idle_ms;
  p->min_idle_ms = m->min_idle_ms;
  for (int i = 0; i < p->min; i++)
    if (!grow(p)) break;
}

static void pcmd_run(void *arg) {
  pcmd *m = arg;
  pool_rt *p = hub_pool(m->h);
  int sync = m->op == OP_CONFIGURE
             || m->op == OP_CLOSE_POOL || m->op == OP_STOP_ALL
             || m->op == OP_STATS || m->op == OP_LOCAL_STATS;
  if (p && !p->closing) {
    switch (m->op) {
      case OP_CONFIGURE: op_configure(p, m); break;
      case OP_CALL: op_call(p, m); break;
      case OP_CANCEL: op_cancel(p, m); break;
      case OP_IDLE_ANSWER: op_idle_answer(p, m); break;
      case OP_REENCODED: op_reencoded(p, m); break;
      case OP_CLOSE_POOL: op_close_pool(p, m); break;
      case OP_STOP_ALL: op_stop_all(p, m); break;
      case OP_STATS: op_stats(p, m); break;
      case OP_LOCAL_STATS: op_local_stats(p, m); break;
      default: break;
    }
  }
  if (!sync) pcmd_free(m);
}

/* ------------------------------------------------------------------- Lua ---- */

static lhub *lhub_of(lua_State *L) {
  return luaL_checkudata(L, 1, HUB_MT);
}

static pcmd *pcmd_new(lua_State *L, lhub *lh, int op) {
  pcmd *m = calloc(1, sizeof *m);
  if (m == NULL) luaL_error(L, "not enough memory");
  m->h = lh->rt;
  m->op = op;
  return m;
}

/* Posts m; a pool whose hub is closed takes nothing (m is freed). */
static void post_cmd(lua_State *L, pcmd *m) {
  hub *h = m->h;
  if (h == NULL || runtime_post(pcmd_run, m) != 0) {
    pcmd_free(m);
    if (h != NULL) luaL_error(L, "pool: the runtime thread is not running");
  }
}

/* Runs m on the runtime thread and waits: 0, or -1 when the hub is closed (m is then
 * not run). The caller frees m. */
static int call_cmd(pcmd *m) {
  if (m->h == NULL) return -1;
  return runtime_call(pcmd_run, m);
}

static double opt_ms(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  double v = luaL_optnumber(L, -1, -1);
  lua_pop(L, 1);
  return v >= 9e18 || v != v ? -1 : v;
}

static int opt_int(lua_State *L, int t, const char *k, int def) {
  lua_getfield(L, t, k);
  int v = (int)luaL_optinteger(L, -1, def);
  lua_pop(L, 1);
  return v;
}

static int opt_bool(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* A string field of table t left on the stack (so it lives while the caller runs),
 * or NULL. */
static const char *str_field(lua_State *L, int t, const char *k, size_t *len) {
  lua_getfield(L, t, k);
  if (lua_isnil(L, -1)) return NULL;
  return luaL_checklstring(L, -1, len);
}

static int l_configure(lua_State *L) {
  lhub *lh = lhub_of(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  /* read first, so that an error raised here leaks no command */
  const char *name = str_field(L, 2, "name", NULL);
  pcmd c = { .max = opt_int(L, 2, "max", 1), .min = opt_int(L, 2, "min", 0),
             .slots = opt_int(L, 2, "slots", 1), .single_use = opt_bool(L, 2, "single_use"),
             .direct = opt_bool(L, 2, "direct"), .idle_check = opt_bool(L, 2, "idle_check"),
             .idle_ms = opt_ms(L, 2, "idle_ms"), .min_idle_ms = opt_ms(L, 2, "min_idle_ms") };
  pcmd *m = pcmd_new(L, lh, OP_CONFIGURE);
  c.h = m->h;
  c.op = m->op;
  *m = c;
  m->text = dup(name ? name : "");
  if (m->slots < 1) m->slots = 1;
  call_cmd(m);
  pcmd_free(m);
  return 0;
}

/* hub:call(id, work, timeout_ms, link, code): work a flame.bytes made with room for
 * SPAWN's header (taken, no copy) or a string (copied behind the room) */
static int l_call(lua_State *L) {
  lhub *lh = lhub_of(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  lua_Number ms = luaL_optnumber(L, 4, HUGE_VAL);
  luaL_argcheck(L, ms == ms, 4, "milliseconds expected");
  if (lh->rt == NULL) return luaL_error(L, "pool is shut down");
  pcmd *m = pcmd_new(L, lh, OP_CALL);
  m->id = (uint64_t)id;
  m->ms = ms >= 9e18 ? -1 : ms < 1 ? 1 : (int64_t)ms;
  m->link = lua_isnoneornil(L, 5) || lua_toboolean(L, 5);
  m->code = luaL_optinteger(L, 6, 0);
  const char *err;
  if (buf_take_arg(L, 3, WIRE_SPAWN_HEADER, &m->work, &err) != 0) {
    pcmd_free(m);
    return luaL_error(L, "pool: %s", err);
  }
  post_cmd(L, m);
  return 0;
}

static int l_with_id(lua_State *L, int op) {
  lhub *lh = lhub_of(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  if (lh->rt == NULL) return 0;
  pcmd *m = pcmd_new(L, lh, op);
  m->id = (uint64_t)id;
  m->tid = id;
  if (op == OP_IDLE_ANSWER) m->flag = lua_toboolean(L, 3);
  post_cmd(L, m);
  return 0;
}

static int l_cancel(lua_State *L) { return l_with_id(L, OP_CANCEL); }
static int l_idle_answer(lua_State *L) { return l_with_id(L, OP_IDLE_ANSWER); }

static int l_reencoded(lua_State *L) {
  lhub *lh = lhub_of(L);
  lua_Integer id = luaL_checkinteger(L, 2), tid = luaL_checkinteger(L, 3);
  if (lh->rt == NULL) return 0;
  pcmd *m = pcmd_new(L, lh, OP_REENCODED);
  m->id = (uint64_t)id;
  m->tid = tid;
  const char *err;
  if (buf_take_arg(L, 4, WIRE_SPAWN_HEADER, &m->work, &err) != 0) {
    pcmd_free(m);
    return luaL_error(L, "pool: %s", err);
  }
  post_cmd(L, m);
  return 0;
}

static int l_close_pool(lua_State *L) {
  lhub *lh = lhub_of(L);
  pcmd *m = pcmd_new(L, lh, OP_CLOSE_POOL);
  call_cmd(m);
  lua_pushinteger(L, (lua_Integer)m->ret);
  pcmd_free(m);
  return 1;
}

static int l_stop_all(lua_State *L) {
  lhub *lh = lhub_of(L);
  pcmd *m = pcmd_new(L, lh, OP_STOP_ALL);
  call_cmd(m);
  pcmd_free(m);
  return 0;
}

static int l_pool_stats(lua_State *L) {
  static const char *const names[] = { "runners", "pending", "busy", "waiting", "calls",
                                       "peak_busy", "workers", "peak_running" };
  lhub *lh = lhub_of(L);
  pcmd *m = pcmd_new(L, lh, OP_STATS);
  call_cmd(m);
  lua_createtable(L, 0, 8);
  for (int i = 0; i < 8; i++) {
    lua_pushinteger(L, m->st[i]);
    lua_setfield(L, -2, names[i]);
  }
  pcmd_free(m);
  return 1;
}

/* hub:local_term{ workers, profile, memory_limit, requires, info, path, cpath }
 * -> tid | nil, why: an executor on the runtime loop, its first sandbox made */
static int l_local_stats(lua_State *L) {
  lhub *lh = lhub_of(L);
  lua_Integer tid = luaL_checkinteger(L, 2);
  pcmd *m = pcmd_new(L, lh, OP_LOCAL_STATS);
  m->tid = tid;
  call_cmd(m);
  if (!m->ret) {
    pcmd_free(m);
    return 0;
  }
  executor_stats_push(L, &m->xs);
  pcmd_free(m);
  return 1;
}

void pool_lua_methods(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "configure", l_configure }, { "call", l_call }, { "cancel", l_cancel },
    { "idle_answer", l_idle_answer },
    { "reencoded", l_reencoded }, { "close_pool", l_close_pool },
    { "stop_all", l_stop_all }, { "pool_stats", l_pool_stats },
    { "local_stats", l_local_stats }, { NULL, NULL }
  };
  luaL_setfuncs(L, methods, 0);
}
