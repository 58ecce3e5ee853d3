/*
 * bsvc_basic.c - the backend environment's timers and small requests, served on
 * the runtime thread (bsvc.h):
 * - sleep(ms): answers nothing after ms.
 * - send_after(ms, msg): answers true now; msg reaches handle_info after ms.
 * - exit(): nil and why (exit ends a runner, in system_shutdown, not the parent).
 * - log(level, line): the line to the pool's log; answers nothing.
 * A timer is a resource of the state: closing the state stops it.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "bsvc.h"
#include "loop.h"

typedef struct btimer {
  flame_handle base;                /* first: a loop's close walk frees it */
  bk_res res;
  uv_timer_t t;
  bk *b;
  int64_t co;                       /* sleep: the coroutine to answer */
  bval msg;                         /* send_after: what handle_info gets */
  int is_send;
} btimer;

static void timer_freed(uv_handle_t *h) {
  btimer *t = h->data;
  bval_free(&t->msg);
  free(t);
}

static void timer_end(btimer *t) {
  bk_res_remove(&t->res);
  uv_timer_stop(&t->t);
  if (!uv_is_closing((uv_handle_t *)&t->t)) uv_close((uv_handle_t *)&t->t, timer_freed);
}

static void timer_closed_by_state(bk_res *r) {
  btimer *t = (btimer *)((char *)r - offsetof(btimer, res));
  timer_end(t);
}

static void timer_fire(uv_timer_t *ut) {
  btimer *t = ut->data;
  bk *b = t->b;
  if (t->is_send) {
    bval msg = t->msg;
    t->msg.type = BV_NIL;
    timer_end(t);
    bk_info(b, &msg);
  } else {
    int64_t co = t->co;
    timer_end(t);
    bk_answer(b, co, NULL, 0);
  }
}

/* ms from a request's argument: a number >= 0 (clamped to what a uv timer takes),
 * or -1. */
static int64_t ms_arg(const bval *v) {
  double ms;
  if (v == NULL) return -1;
  if (v->type == BV_INT) ms = (double)v->u.i;
  else if (v->type == BV_NUM) ms = v->u.n;
  else return -1;
  if (!(ms >= 0)) return -1;
  if (ms > 2147483647.0) ms = 2147483647.0;
  return (int64_t)ms;
}

static btimer *timer_start(bk *b, int64_t ms) {
  btimer *t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  t->base.on_close = timer_freed;
  t->b = b;
  t->res.close = timer_closed_by_state;
  if (uv_timer_init(bk_loop(), &t->t) != 0) {
    free(t);
    return NULL;
  }
  t->t.data = t;
  if (uv_timer_start(&t->t, timer_fire, (uint64_t)ms, 0) != 0) {
    uv_close((uv_handle_t *)&t->t, timer_freed);
    return NULL;
  }
  bk_res_add(b, &t->res);
  return t;
}

void bsvc_sleep(bk *b, int64_t co, bval *args, int n) {
  int64_t ms = ms_arg(n > 0 ? &args[0] : NULL);
  bval_list_free(args, n);
  if (ms < 0) {
    bk_fail(b, co, "sleep: milliseconds >= 0 expected");
    return;
  }
  btimer *t = timer_start(b, ms);
  if (t == NULL) {
    bk_fail(b, co, "sleep: cannot start a timer");
    return;
  }
  t->co = co;
}

void bsvc_send_after(bk *b, int64_t co, bval *args, int n) {
  int64_t ms = ms_arg(n > 0 ? &args[0] : NULL);
  if (ms < 0) {
    bval_list_free(args, n);
    bk_fail(b, co, "send_after: milliseconds >= 0 expected");
    return;
  }
  btimer *t = timer_start(b, ms);
  if (t == NULL) {
    bval_list_free(args, n);
    bk_fail(b, co, "send_after: cannot start a timer");
    return;
  }
  t->is_send = 1;
  if (n > 1) {
    t->msg = args[1];
    args[1].type = BV_NIL;
  }
  bval_list_free(args, n);
  bk_answer_bool(b, co, 1);
}

void bsvc_exit(bk *b, int64_t co, bval *args, int n) {
  bval_list_free(args, n);
  bk_fail(b, co, "exit ends a runner (in system_shutdown), not the parent");
}

void bsvc_log(bk *b, int64_t co, bval *args, int n) {
  const char *level = n > 0 ? bval_str(&args[0], NULL) : NULL;
  const char *line = n > 1 ? bval_str(&args[1], NULL) : NULL;
  static const char *const levels[] = { "debug", "info", "warn", "error", NULL };
  const char *lv = "info";
  for (int i = 0; level && levels[i]; i++)
    if (strcmp(level, levels[i]) == 0) lv = levels[i];
  bk_log(b, lv, "%s", line ? line : "");
  bval_list_free(args, n);
  bk_answer(b, co, NULL, 0);
}
