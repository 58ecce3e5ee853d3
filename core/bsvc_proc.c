/*
 * bsvc_proc.c - the backend environment's processes, served on the runtime thread
 * (bsvc.h) with proc.c:
 * - proc_spawn{ path, args, env, cwd, group } -> a process handle { kind =
 *   "process", process_id } | nil, why. Its output lines go to the pool's log with
 *   the runner's name (stderr as warnings); its exit reaches handle_info as
 *   { event = "exit", code, signal }.
 * - proc_run{ path, args, env, cwd, timeout = 60000, max_output = 1 MiB } -> { code,
 *   signal, stdout, stderr, truncated } | nil, why: to its end, in a process group
 *   of its own, killed with the group past its timeout.
 * - proc_kill(handle, signal, group) -> true | nil, why ("exited" once it has,
 *   unless to its group); proc_exited(handle) -> boolean.
 * Both count in bk_procs while they run. A process is a resource of the state:
 * closing the state lets go of it (it is still reaped) and of its handle.
 */
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "bsvc.h"
#include "buf.h"
#include "loop.h"
#include "proc.h"

#define RUN_TIMEOUT 60000
#define RUN_MAX_OUTPUT (1024 * 1024)

/* ------------------------------------------------------------ arguments ---- */

typedef struct spawn_args {
  proc_opts o;
  char **argv, **envp;
  char *cwd;
  int64_t timeout, max_output;
} spawn_args;

static void args_free(spawn_args *a) {
  if (a->argv) {
    for (char **p = a->argv; *p; p++) free(*p);
    free(a->argv);
  }
  free(a->envp);
  free(a->cwd);
}


/* Reads the options table; the message of what is wrong in why, or "". */
static int read_opts(const bval *o, const char *what, spawn_args *a, char *why, size_t n) {
  memset(a, 0, sizeof *a);
  const char *path = bval_str(bval_get(o, "path"), NULL);
  if (o == NULL || o->type != BV_TABLE || path == NULL) {
    snprintf(why, n, "%s: a table with a path expected", what);
    return -1;
  }
  const bval *args = bval_get(o, "args");
  if (args && args->type != BV_TABLE) {
    snprintf(why, n, "%s: args must be a list", what);
    return -1;
  }
  size_t nargs = 0;
  while (args) {                      /* the list 1..n, as # would see it */
    int found = 0;
    for (size_t i = 0; i < args->u.t.n; i++) {
      const bval *k = &args->u.t.kv[i].k;
      if (k->type == BV_INT && k->u.i == (lua_Integer)nargs + 1) found = 1;
    }
    if (!found) break;
    nargs++;
  }
  a->argv = calloc(nargs + 2, sizeof *a->argv);
  if (a->argv == NULL || (a->argv[0] = strdup(path)) == NULL) goto oom;
  for (size_t j = 1; j <= nargs; j++) {
    const bval *v = NULL;
    for (size_t i = 0; i < args->u.t.n; i++) {
      const bval *k = &args->u.t.kv[i].k;
      if (k->type == BV_INT && k->u.i == (lua_Integer)j) v = &args->u.t.kv[i].v;
    }
    if ((a->argv[j] = bval_text(v)) == NULL) {
      if (v->type == BV_STR || v->type == BV_INT || v->type == BV_NUM) goto oom;
      snprintf(why, n, "%s: args must be strings (argument %zu is not)", what, j);
      return -1;
    }
  }
  const bval *env = bval_get(o, "env");
  if (env && env->type != BV_TABLE) {
    snprintf(why, n, "%s: env must be a table", what);
    return -1;
  }
  if (env) {
    size_t ne = env->u.t.n;
    const char **names = calloc(ne + 1, sizeof *names);
    char **values = calloc(ne + 1, sizeof *values);
    int bad = names == NULL || values == NULL ? 2 : 0;
    for (size_t i = 0; !bad && i < ne; i++) {
      names[i] = bval_str(&env->u.t.kv[i].k, NULL);
      values[i] = bval_text(&env->u.t.kv[i].v);
      if (names[i] == NULL || values[i] == NULL) bad = 1;
    }
    if (!bad) a->envp = proc_env(names, (const char *const *)values, ne);
    for (size_t i = 0; values && i < ne; i++) free(values[i]);
    free(names);
    free(values);
    if (bad == 1) {
      snprintf(why, n, "%s: env must map names to strings", what);
      return -1;
    }
    if (a->envp == NULL) goto oom;
  }
  const bval *cwd = bval_get(o, "cwd");
  if (cwd && cwd->type != BV_STR) {
    snprintf(why, n, "%s: cwd must be a string", what);
    return -1;
  }
  if (cwd && (a->cwd = strdup(cwd->u.s.p)) == NULL) goto oom;
  const bval *g = bval_get(o, "group");
  a->o.path = a->argv[0];
  a->o.argv = a->argv;
  a->o.envp = a->envp;
  a->o.cwd = a->cwd;
  a->o.group = bval_truthy(g);
  return 0;
oom:
  snprintf(why, n, "%s: not enough memory", what);
  return -1;
}

/* ---------------------------------------------------------------- spawn ---- */

typedef struct bproc {
  bk_res res;
  bk *b;
  proc *p;                          /* NULL once done or let go */
  int64_t handle;
  int exited;
} bproc;

static void sp_output(void *ctx, const char *stream, const char *line, size_t len) {
  bproc *x = ctx;
  bk_log(x->b, strcmp(stream, "stderr") == 0 ? "warn" : "info", "[%s] %.*s",
         bk_runner(x->b), (int)len, line);
}

static void sp_exit(void *ctx, int64_t code, int sig) {
  bproc *x = ctx;
  x->exited = 1;
  bk_procs(x->b, -1);                 /* a shutdown waits for these to go */
  bval msg = { BV_NIL, { 0 } };
  if (bk_table_set_str(&msg, "event", "exit", 4) == 0 && bk_table_set_int(&msg, "code", code) == 0
      && bk_table_set_int(&msg, "signal", sig) == 0)
    bk_info(x->b, &msg);
  else
    bval_free(&msg);
}

static void sp_done(void *ctx) {
  bproc *x = ctx;
  x->p = NULL;                        /* kept: its handle still answers, "exited" */
}

/* The state closes: its processes are let go (still reaped), their handles gone. */
static void sp_close(bk_res *r) {
  bproc *x = (bproc *)((char *)r - offsetof(bproc, res));
  if (x->p) proc_detach(x->p);
  if (!x->exited) bk_procs(x->b, -1);  /* no longer watched: not waited for either */
  free(x);
}

void bsvc_proc_spawn(bk *b, int64_t co, bval *args, int n) {
  spawn_args a;
  char why[300];
  int rc = read_opts(n > 0 ? &args[0] : NULL, "proc.spawn", &a, why, sizeof why);
  bval_list_free(args, n);
  if (rc != 0) {
    args_free(&a);
    bk_fail(b, co, "%s", why);
    return;
  }
  bproc *x = calloc(1, sizeof *x);
  if (x == NULL) {
    args_free(&a);
    bk_fail(b, co, "proc.spawn: not enough memory");
    return;
  }
  x->b = b;
  x->res.close = sp_close;
  x->handle = bk_handle_new(b, BK_H_PROCESS, x);
  static const proc_cbs cbs = { sp_output, sp_exit, sp_done };
  if (x->handle < 0
      || proc_start(bk_loop(), &a.o, &cbs, x, &x->p, why, sizeof why) != 0) {
    if (x->handle < 0) snprintf(why, sizeof why, "proc.spawn: not enough memory");
    else bk_handle_drop(b, x->handle);
    args_free(&a);
    free(x);
    bk_fail(b, co, "%s", why);
    return;
  }
  args_free(&a);
  bk_res_add(b, &x->res);
  bk_procs(b, 1);
  bval *h = calloc(1, sizeof *h);
  if (h == NULL || bk_table_set_int(h, "__flame_handle", x->handle) != 0
      || bk_table_set_str(h, "kind", "process", 7) != 0
      || bk_table_set_int(h, "process_id", proc_pid(x->p)) != 0) {
    if (h) bval_free(h);
    free(h);
    bk_fail(b, co, "proc.spawn: not enough memory");   /* it runs: its exit still comes */
    return;
  }
  bk_answer(b, co, h, 1);
}

static bproc *handle_arg(bk *b, const bval *v) {
  if (v == NULL || v->type != BV_INT) return NULL;
  return bk_handle_get(b, v->u.i, BK_H_PROCESS);
}

void bsvc_proc_kill(bk *b, int64_t co, bval *args, int n) {
  bproc *x = handle_arg(b, n > 0 ? &args[0] : NULL);
  int sig = SIGTERM, ok = 1;
  const bval *s = n > 1 ? &args[1] : NULL;
  if (s && s->type == BV_INT) sig = (int)s->u.i;
  else if (s && s->type == BV_STR) {
    static const struct { const char *name; int sig; } names[] = {
      { "SIGTERM", SIGTERM }, { "SIGKILL", SIGKILL }, { "SIGINT", SIGINT },
      { "SIGHUP", SIGHUP }, { NULL, 0 }
    };
    ok = 0;
    for (int i = 0; names[i].name; i++)
      if (strcmp(names[i].name, s->u.s.p) == 0) {
        sig = names[i].sig;
        ok = 1;
      }
  } else if (s && s->type != BV_NIL) ok = 0;
  int group = n > 2 && bval_truthy(&args[2]);
  bval_list_free(args, n);
  if (!ok) {
    bk_fail(b, co, "kill: a signal name (SIGTERM, SIGKILL, SIGINT, SIGHUP) or number expected");
    return;
  }
  if (x == NULL) {
    bk_fail(b, co, "no such process");
    return;
  }
  if (x->p == NULL || (x->exited && !group)) {
    bk_fail(b, co, "exited");
    return;
  }
  int rc = proc_signal(x->p, sig, group);
  if (rc != 0) {
    bk_fail(b, co, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return;
  }
  bk_answer_bool(b, co, 1);
}

void bsvc_proc_exited(bk *b, int64_t co, bval *args, int n) {
  bproc *x = handle_arg(b, n > 0 ? &args[0] : NULL);
  bval_list_free(args, n);
  bk_answer_bool(b, co, x == NULL || x->exited || x->p == NULL);
}

/* ------------------------------------------------------------------ run ---- */

typedef struct brun {
  flame_handle base;                /* the timer's, first: a loop walk frees it */
  bk_res res;
  bk *b;
  int64_t co;
  proc *p;
  uv_timer_t timer;
  int timer_open, answered, exited;
  buf out, err;
  size_t size, max;
  int truncated;
  char *path;
  int64_t timeout;
  double timeout_shown;
  int timeout_float;
} brun;

static void run_free(brun *r) {
  buf_free(&r->out);
  buf_free(&r->err);
  free(r->path);
  free(r);
}

static void run_timer_freed(uv_handle_t *h) {
  brun *r = h->data;
  r->timer_open = 0;
  if (r->p == NULL) run_free(r);
}

/* Ends what r holds; frees it once the timer and the process have let go. */
static void run_end(brun *r) {
  bk_res_remove(&r->res);
  if (r->p) {
    proc_detach(r->p);
    r->p = NULL;
  }
  if (r->timer_open) {
    if (!uv_is_closing((uv_handle_t *)&r->timer)) uv_close((uv_handle_t *)&r->timer, run_timer_freed);
  } else {
    run_free(r);
  }
}

static void run_output(void *ctx, const char *stream, const char *line, size_t len) {
  brun *r = ctx;
  if (r->answered) return;
  if (r->size + len + 1 > r->max) {
    r->truncated = 1;
    return;
  }
  buf *b = strcmp(stream, "stderr") == 0 ? &r->err : &r->out;
  if (buf_append(b, line, len) != 0 || buf_append(b, "\n", 1) != 0) {
    r->truncated = 1;
    return;
  }
  r->size += len + 1;
}

static void run_exit(void *ctx, int64_t code, int sig) {
  brun *r = ctx;
  bk *b = r->b;
  r->exited = 1;
  bk_procs(b, -1);
  if (r->answered) return;
  r->answered = 1;
  bval *t = calloc(1, sizeof *t);
  int bad = t == NULL;
  if (!bad)
    bad = bk_table_set_int(t, "code", code) != 0 || bk_table_set_int(t, "signal", sig) != 0
       || bk_table_set_str(t, "stdout", r->out.data ? (const char *)r->out.data : "", r->out.len) != 0
       || bk_table_set_str(t, "stderr", r->err.data ? (const char *)r->err.data : "", r->err.len) != 0
       || bk_table_set_bool(t, "truncated", r->truncated) != 0;
  if (bad) {
    if (t) bval_free(t);
    free(t);
    bk_fail(b, r->co, "proc.run: not enough memory");
  } else {
    bk_answer(b, r->co, t, 1);
  }
  r->exited = 1;                      /* r->p stays: its output and on_done may follow */
}

static void run_done(void *ctx) {
  brun *r = ctx;
  r->p = NULL;
  run_end(r);
}

static void run_timeout(uv_timer_t *t) {
  brun *r = t->data;
  if (r->answered) return;
  r->answered = 1;
  if (r->p) proc_signal(r->p, SIGKILL, 1);
  if (r->timeout_float)
    bk_fail(r->b, r->co, "proc.run: %s did not end within %.14g ms (killed)", r->path, r->timeout_shown);
  else
    bk_fail(r->b, r->co, "proc.run: %s did not end within %lld ms (killed)", r->path,
            (long long)r->timeout);
}

/* The state closes: the process is let go (its group killed: nothing waits for it
 * now), the timer closed. */
static void run_close(bk_res *res) {
  brun *r = (brun *)((char *)res - offsetof(brun, res));
  r->answered = 1;
  if (r->p) proc_signal(r->p, SIGKILL, 1);
  if (r->p && !r->exited) bk_procs(r->b, -1);   /* killed: nothing waits for it now */
  run_end(r);
}

void bsvc_proc_run(bk *b, int64_t co, bval *args, int n) {
  const bval *o = n > 0 ? &args[0] : NULL;
  spawn_args a;
  char why[300];
  int rc = read_opts(o, "proc.run", &a, why, sizeof why);
  double timeout = RUN_TIMEOUT;
  int tfloat = 0;
  int64_t max = RUN_MAX_OUTPUT;
  if (rc == 0) {
    const bval *t = bval_get(o, "timeout");
    if (t && t->type == BV_INT) timeout = (double)t->u.i;
    else if (t && t->type == BV_NUM) {
      timeout = t->u.n;
      tfloat = 1;
    }
    if ((t && t->type != BV_INT && t->type != BV_NUM) || !(timeout > 0)) {
      snprintf(why, sizeof why, "proc.run: timeout must be milliseconds > 0");
      rc = -1;
    }
    const bval *m = bval_get(o, "max_output");
    if (rc == 0 && m && (m->type != BV_INT || m->u.i < 0)) {
      snprintf(why, sizeof why, "proc.run: max_output must be an integer >= 0");
      rc = -1;
    }
    if (m && m->type == BV_INT) max = m->u.i;
  }
  brun *r = rc == 0 ? calloc(1, sizeof *r) : NULL;
  if (rc == 0 && (r == NULL || (r->path = strdup(a.o.path)) == NULL)) {
    snprintf(why, sizeof why, "proc.run: not enough memory");
    rc = -1;
  }
  bval_list_free(args, n);
  if (rc != 0) {
    if (r) run_free(r);
    args_free(&a);
    bk_fail(b, co, "%s", why);
    return;
  }
  r->base.on_close = run_timer_freed;
  r->b = b;
  r->co = co;
  r->max = (size_t)max;
  r->timeout = (int64_t)timeout;
  r->timeout_shown = timeout;
  r->timeout_float = tfloat;
  r->res.close = run_close;
  a.o.group = 1;                      /* its children are killed with it */
  if (uv_timer_init(bk_loop(), &r->timer) != 0) {
    args_free(&a);
    run_free(r);
    bk_fail(b, co, "proc.run: cannot make a timer");
    return;
  }
  r->timer.data = r;
  r->timer_open = 1;
  static const proc_cbs cbs = { run_output, run_exit, run_done };
  char err[256];
  if (proc_start(bk_loop(), &a.o, &cbs, r, &r->p, err, sizeof err) != 0) {
    args_free(&a);
    r->p = NULL;
    r->answered = 1;
    bk_fail(b, co, "proc.run: %s", err);
    run_end(r);
    return;
  }
  args_free(&a);
  bk_procs(b, 1);
  bk_res_add(b, &r->res);
  double ms = timeout > 2147483647.0 ? 2147483647.0 : timeout;
  if (uv_timer_start(&r->timer, run_timeout, (uint64_t)ms, 0) != 0) {
    r->answered = 1;
    proc_signal(r->p, SIGKILL, 1);
    bk_fail(b, co, "proc.run: cannot start its timer (the command was killed)");
  }
}
