/*
 * bsvc_link.c - the backend environment's requests that make and meet runners,
 * served on the runtime thread (bsvc.h) with the pool's hub (hub.h) and runtime
 * side (pool.c):
 * - parent_new(fields): a parent record (ref, secret, addresses, settings) for one
 *   runner, which the hub will accept from now on.
 * - await_remote_up(p, timeout): waits for the runner of p to connect and prove
 *   itself (then its code, under code_sync, sent and unpacked): a terminator
 *   handle, or nil and why. timeout defaults to the pool's boot_timeout.
 * - local_terminator(state): a local runner (an executor whose workers run calls
 *   in sandboxes of this process), once its workers are ready.
 * - spawn_monitor(term, work): a backend's own remote_spawn_monitor sends the call.
 * - config(name) ({}), flame_bin(), code_paths(): what the pool was told.
 * What a pool's runners are booted with (its settings, addresses, code) is the
 * hub's blink_cfg, set from the pool's Lua (hub:boot_config, hub:boot_code). Each
 * state keeps a blink: the refs it made, the wait in progress, its terminators,
 * and why its boot failed when the pool said so (hub:bk_fail): a wait then ends at
 * once, and every later one too.
 *
 * Contract (Lua, methods of the hub object; the application's thread):
 *   hub:boot_config{ backend, addrs, settings, idle, min_idle, boot_timeout,
 *                    flame_bin, code_paths }   posted; for the boots from now
 *   hub:boot_code(gen, pack, raw, hash)       posted; code_sync's pack (gen 0: none)
 * For runner.c (runner.h): blink_config (the table above), blink_term (a
 * terminator handle of a state: its runner, local or not, the pack generation it
 * took, 0 none), blink_fail (the state's boot failed: its wait ends, a runner that
 * comes later is refused, and the runners it met already are let go).
 * Threads: everything but the Lua functions runs on the runtime thread.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "benv.h"
#include "buf.h"
#include "bsvc.h"
#include "bval.h"
#include "codec.h"
#include "crypto.h"
#include "executor.h"
#include "hub.h"
#include "loop.h"
#include "runner.h"
#include "runtime.h"
#include "sandbox.h"
#include "wire.h"

#define REF_LEN 20
#define SECRET_LEN 32

struct blink_cfg {
  bval cfg;                         /* hub:boot_config's table */
  int64_t gen;                      /* code_sync: the pack's generation, 0: none */
  buf pack;
  char raw[64];
  size_t rawlen;
  char *hash;
};

void blink_cfg_free(struct blink_cfg *c) {
  if (c == NULL) return;
  bval_free(&c->cfg);
  buf_free(&c->pack);
  free(c->hash);
  free(c);
}

static struct blink_cfg *cfg_of(hub *h) {
  struct blink_cfg **slot = hub_boot(h);
  if (*slot == NULL) *slot = calloc(1, sizeof **slot);
  return *slot;
}

typedef struct bterm {
  int64_t handle, tid, code;
  int local;
} bterm;

/* A timer apart from the blink: its close callback frees it, so the blink may go
 * at once. */
typedef struct ltimer {
  flame_handle base;
  uv_timer_t t;
  struct blink *owner;              /* NULL once let go */
} ltimer;

/* A local runner's workers starting, waited for on the thread pool. */
typedef struct lwait {
  uv_work_t w;
  struct blink *owner;              /* NULL once the state closed */
  executor *ex;
  int64_t tid, co;
  int rc;
  char why[256];
} lwait;

enum { W_NONE, W_UP, W_CODE, W_LOCAL };

typedef struct blink {
  bk_res res;
  bk *b;
  char *failed;                     /* the boot is over: why */
  char **refs;                      /* made by parent_new, not awaited yet */
  int nrefs;
  bterm *terms;
  int nterms;
  int code;                         /* code_sync: its runners get the pack */
  /* the wait in progress */
  int wait;
  int64_t co, tid, pid, gen;
  char *ref, *host;
  double timeout;
  ltimer *timer;
  lwait *lw;
} blink;

static void link_closed_by_state(bk_res *r);

static blink *link_of(bk *b) {
  blink **slot = bk_link(b);
  if (*slot) return *slot;
  blink *l = calloc(1, sizeof *l);
  if (l == NULL) return NULL;
  l->b = b;
  l->res.close = link_closed_by_state;
  bk_res_add(b, &l->res);
  *slot = l;
  return l;
}

static void timer_freed(uv_handle_t *h) {
  free(h->data);
}

static void timer_stop(blink *l) {
  ltimer *t = l->timer;
  if (t == NULL) return;
  l->timer = NULL;
  t->owner = NULL;
  uv_timer_stop(&t->t);
  uv_close((uv_handle_t *)&t->t, timer_freed);
}

static void forget_refs(blink *l) {
  hub *h = bk_hub(l->b);
  for (int i = 0; i < l->nrefs; i++) {
    hub_forget(h, l->refs[i]);
    free(l->refs[i]);
  }
  free(l->refs);
  l->refs = NULL;
  l->nrefs = 0;
}

/* The wait's end: its state cleared (the ref forgotten, the timer stopped). */
static void wait_clear(blink *l) {
  hub *h = bk_hub(l->b);
  timer_stop(l);
  if (l->ref) {
    hub_await_cancel(h, l->ref);
    hub_forget(h, l->ref);
  }
  if (l->wait == W_CODE) hub_code_cancel(h, l->tid);
  free(l->ref);
  free(l->host);
  l->ref = l->host = NULL;
  l->wait = W_NONE;
}

static void wait_fail(blink *l, const char *why) {
  int up = l->wait == W_CODE;
  int64_t tid = l->tid, co = l->co;
  wait_clear(l);
  /* connected, but the boot will not have it */
  if (up) hub_term_close(bk_hub(l->b), tid, "code_sync failed");
  bk_fail(l->b, co, "%s", why);
}

static int term_add(blink *l, int64_t tid, int local, int64_t code, int64_t *handle) {
  bterm *t = realloc(l->terms, (size_t)(l->nterms + 1) * sizeof *t);
  if (t == NULL) return -1;
  l->terms = t;
  int64_t id = bk_handle_new(l->b, BK_H_TERM, l);
  if (id < 0) return -1;
  t[l->nterms++] = (bterm){ id, tid, code, local };
  *handle = id;
  return 0;
}

static bterm *term_find(blink *l, int64_t handle) {
  for (int i = 0; l && i < l->nterms; i++)
    if (l->terms[i].handle == handle) return &l->terms[i];
  return NULL;
}

/* The terminator handle as the backend gets it: { __flame_handle, kind }. */
static void answer_term(blink *l, int64_t co, int64_t handle) {
  bval *t = calloc(1, sizeof *t);
  if (t == NULL || bk_table_set_int(t, "__flame_handle", handle) != 0
      || bk_table_set_str(t, "kind", "terminator", 10) != 0) {
    if (t) bval_free(t);
    free(t);
    bk_fail(l->b, co, "not enough memory");
    return;
  }
  bk_answer(l->b, co, t, 1);
}

static void wait_done(blink *l) {
  hub *h = bk_hub(l->b);
  int64_t handle, co = l->co, tid = l->tid;
  char *ref = l->ref, *host = l->host;
  l->ref = l->host = NULL;
  int64_t gen = l->wait == W_CODE ? l->gen : 0;
  l->wait = W_NONE;
  timer_stop(l);
  if (term_add(l, tid, 0, gen, &handle) != 0) {
    hub_term_close(h, tid, "not enough memory");
    bk_fail(l->b, co, "not enough memory");
  } else {
    hub_post_up(h, ref, tid, l->pid, host);   /* before the answer: the pool hears it first */
    answer_term(l, co, handle);
  }
  free(ref);
  free(host);
}

static void on_code(void *ud, int64_t tid, const buf *answer, const char *err) {
  (void)tid;
  blink *l = ud;
  if (l->wait != W_CODE) return;
  if (answer == NULL) {
    char m[300];
    snprintf(m, sizeof m, "code_sync: lost the link to the runner: %s", err ? err : "closed");
    wait_fail(l, m);
    return;
  }
  struct blink_cfg *c = cfg_of(bk_hub(l->b));
  const char *a = answer->data ? (const char *)answer->data : "";
  size_t n = answer->len;
  size_t hl = c && c->hash ? strlen(c->hash) : 0;
  if (n >= 1 && a[0] == 'o' && n - 1 == hl && hl > 0 && memcmp(a + 1, c->hash, hl) == 0) {
    wait_done(l);
  } else if (n >= 1 && a[0] == 'e') {
    char m[600];
    snprintf(m, sizeof m, "%.*s", (int)(n - 1 > 500 ? 500 : n - 1), a + 1);
    wait_fail(l, m);
  } else {
    char m[300];
    snprintf(m, sizeof m, "code_sync: the runner's answer does not match the pack sent: %.*s",
             (int)(n > 80 ? 80 : n), a);
    wait_fail(l, m);
  }
}

static void on_up(void *ud, int64_t tid, int64_t pid, const char *host, const char *err) {
  blink *l = ud;
  if (l->wait != W_UP) return;
  if (err) {
    wait_fail(l, err);
    return;
  }
  l->tid = tid;
  l->pid = pid;
  free(l->host);
  l->host = host ? strdup(host) : NULL;
  free(l->ref);                     /* the hub has let go of it */
  l->ref = NULL;
  struct blink_cfg *c = cfg_of(bk_hub(l->b));
  if (!l->code || c == NULL || c->gen == 0) {
    wait_done(l);
    return;
  }
  l->wait = W_CODE;                 /* its code first, before any call */
  l->gen = c->gen;
  if (hub_code_send(bk_hub(l->b), tid, c->raw, c->rawlen, c->pack.data, c->pack.len, on_code, l)
      != 0)
    wait_fail(l, "code_sync: the runner's link is closed");
}

static void on_timeout(uv_timer_t *ut) {
  ltimer *t = ut->data;
  blink *l = t->owner;
  if (l == NULL) return;
  char m[300];
  if (l->wait == W_CODE)
    snprintf(m, sizeof m, "code_sync: the runner did not take its code within %.0f ms (a runner "
             "of an older flame ignores it: run the same flame on both sides)", l->timeout);
  else
    snprintf(m, sizeof m, "the runner did not connect within the boot timeout of %.0f ms",
             l->timeout);
  wait_fail(l, m);
}

static int timer_start(blink *l, double ms) {
  ltimer *t = calloc(1, sizeof *t);
  if (t == NULL) return -1;
  t->base.on_close = timer_freed;
  t->owner = l;
  t->t.data = t;
  if (uv_timer_init(bk_loop(), &t->t) != 0) {
    free(t);
    return -1;
  }
  uint64_t due = ms > 9e15 ? (uint64_t)9e15 : (uint64_t)ms;
  if (uv_timer_start(&t->t, on_timeout, due, 0) != 0) {
    uv_close((uv_handle_t *)&t->t, timer_freed);
    return -1;
  }
  l->timer = t;
  return 0;
}

static void link_closed_by_state(bk_res *r) {
  blink *l = (blink *)((char *)r - offsetof(blink, res));
  int up = l->wait == W_CODE;
  int64_t tid = l->tid;
  wait_clear(l);
  if (up) hub_term_close(bk_hub(l->b), tid, "boot abandoned");
  if (l->lw) l->lw->owner = NULL;   /* its executor is closed when the wait ends */
  forget_refs(l);
  *bk_link(l->b) = NULL;
  free(l->failed);
  free(l->terms);
  free(l);
}

/* --------------------------------------------------------------- services ---- */

static double num(const bval *v, double def) {
  if (v && v->type == BV_INT) return (double)v->u.i;
  if (v && v->type == BV_NUM) return v->u.n;
  return def;
}

static const char *str_or(const bval *v, const char *def) {
  const char *s = bval_str(v, NULL);
  return s ? s : def;
}

void bsvc_parent_new(bk *b, int64_t co, bval *args, int n) {
  hub *h = bk_hub(b);
  struct blink_cfg *c = cfg_of(h);
  blink *l = link_of(b);
  const bval *fields = n >= 1 && args[0].type == BV_TABLE ? &args[0] : NULL;
  bval *rec = calloc(1, sizeof *rec);
  bval settings = { .type = BV_NIL }, x = { .type = BV_NIL }, addrs = { .type = BV_NIL };
  const bval *cf, *base, *idle, *ca;
  const char *backend, *node_base, *host_env;
  char **refs;
  int code;
  char ref[REF_LEN + 1] = { 0 }, node[32] = "flame-";
  unsigned char secret[SECRET_LEN];
  char secret64[64];
  const char *err = "not enough memory";
  if (rec == NULL || l == NULL || c == NULL || c->cfg.type != BV_TABLE) {
    err = c && c->cfg.type != BV_TABLE ? "parent_new: the pool is not configured" : err;
    goto fail;
  }
  if (hub_closing(h)) {
    err = "the pool is shutting down";
    goto fail;
  }
  if (benv_random_chars(ref, REF_LEN) != 0 || benv_random_chars(node + 6, 10) != 0
      || uv_random(NULL, NULL, secret, sizeof secret, 0, NULL) != 0) {
    err = "parent_new: no randomness for the runner's ref and secret";
    goto fail;
  }
  crypto_b64encode(secret, sizeof secret, secret64);
  cf = &c->cfg;
  /* the settings, with this runner's idle time and whether its code comes first */
  base = bval_get(cf, "settings");
  if (base && bval_copy(&settings, base) != 0) goto fail;
  if (settings.type != BV_TABLE) {
    settings.type = BV_TABLE;
    settings.u.t.kv = NULL;
    settings.u.t.n = 0;
  }
  idle = bval_get(cf, bk_is_min(b) ? "min_idle" : "idle");
  if (idle && bval_copy(&x, idle) != 0) goto fail;
  if (bk_table_set(&settings, "idle_shutdown_after", &x) != 0) goto fail;
  code = c->gen != 0 && bval_truthy(bval_get(cf, "code_sync"));
  if (code && bk_table_set_bool(&settings, "code_sync", 1) != 0) goto fail;
  backend = str_or(bval_get(cf, "backend"),
                               str_or(fields ? bval_get(fields, "backend") : NULL, "process"));
  node_base = str_or(fields ? bval_get(fields, "node_base") : NULL, node);
  host_env = fields ? bval_str(bval_get(fields, "host_env"), NULL) : NULL;
  ca = bval_get(cf, "addrs");
  if (ca && bval_copy(&addrs, ca) != 0) goto fail;
  if (bk_table_set_int(rec, "v", WIRE_PROTOCOL) != 0
      || bk_table_set_str(rec, "ref", ref, REF_LEN) != 0
      || bk_table_set_str(rec, "secret", secret64, strlen(secret64)) != 0
      || bk_table_set(rec, "addrs", &addrs) != 0
      || bk_table_set_str(rec, "backend", backend, strlen(backend)) != 0
      || bk_table_set_str(rec, "node_base", node_base, strlen(node_base)) != 0
      || (host_env && bk_table_set_str(rec, "host_env", host_env, strlen(host_env)) != 0)
      || bk_table_set_str(rec, "flame_vsn", FLAME_VERSION, strlen(FLAME_VERSION)) != 0
      || bk_table_set_bool(rec, "tls", hub_tls(h)) != 0
      || bk_table_set(rec, "settings", &settings) != 0)
    goto fail;
  refs = realloc(l->refs, (size_t)(l->nrefs + 1) * sizeof *refs);
  if (refs == NULL) goto fail;
  l->refs = refs;
  if ((refs[l->nrefs] = strdup(ref)) == NULL) goto fail;
  if (hub_expect(h, ref, secret, sizeof secret) != 0) {
    free(refs[l->nrefs]);
    goto fail;
  }
  l->nrefs++;
  l->code = l->code || code;
  bval_list_free(args, n);
  bk_answer(b, co, rec, 1);
  return;
fail:
  bval_free(&settings);
  bval_free(&x);
  bval_free(&addrs);
  if (rec) bval_free(rec);
  free(rec);
  bval_list_free(args, n);
  bk_fail(b, co, "%s", err);
}

void bsvc_await_remote_up(bk *b, int64_t co, bval *args, int n) {
  blink *l = link_of(b);
  struct blink_cfg *c = cfg_of(bk_hub(b));
  const char *ref = n >= 1 ? bval_str(bval_get(&args[0], "ref"), NULL) : NULL;
  double timeout = num(n >= 2 ? &args[1] : NULL, c ? num(bval_get(&c->cfg, "boot_timeout"), 30000) : 30000);
  char m[200];
  if (l == NULL || c == NULL) {
    snprintf(m, sizeof m, "not enough memory");
  } else if (l->failed) {                /* handle_info told already */
    snprintf(m, sizeof m, "%s", l->failed);
  } else if (ref == NULL) {
    snprintf(m, sizeof m, "await_remote_up: a parent record from parent_new expected");
  } else if (!(timeout >= 0)) {
    snprintf(m, sizeof m, "await_remote_up: timeout must be milliseconds >= 0");
  } else if (l->wait != W_NONE) {
    snprintf(m, sizeof m, "await_remote_up: already waiting for a runner");
  } else {
    int i = 0;                           /* no longer the state's to forget: the wait's */
    while (i < l->nrefs && strcmp(l->refs[i], ref) != 0) i++;
    if (i == l->nrefs) {
      snprintf(m, sizeof m, "no runner is expected with this ref");
    } else if ((l->ref = strdup(ref)) == NULL) {
      snprintf(m, sizeof m, "not enough memory");
    } else {
      free(l->refs[i]);
      l->refs[i] = l->refs[--l->nrefs];
      l->wait = W_UP;
      l->co = co;
      l->timeout = timeout;
      bval_list_free(args, n);
      if (isfinite(timeout) && timer_start(l, timeout) != 0) {
        wait_fail(l, "await_remote_up: cannot start the boot timer");
        return;
      }
      if (hub_await(bk_hub(b), l->ref, on_up, l) < 0)
        wait_fail(l, "no runner is expected with this ref");
      return;                            /* on_up may have answered already */
    }
  }
  bval_list_free(args, n);
  bk_fail(b, co, "%s", m);
}

static void local_wait(uv_work_t *w) {
  lwait *lw = (lwait *)w;
  lw->rc = executor_ready(lw->ex, lw->why, sizeof lw->why);
}

static void local_waited(uv_work_t *w, int status) {
  lwait *lw = (lwait *)w;
  blink *l = lw->owner;
  hub *h = NULL;
  if (l) {
    l->lw = NULL;
    h = bk_hub(l->b);
  }
  int64_t handle;
  if (l == NULL) {                       /* the state closed meanwhile */
    /* its hub may be gone too: the pool's close closes the executors it has */
  } else if (status != 0 || lw->rc != 0) {
    pool_local_close(hub_pool(h), lw->tid);
    bk_fail(l->b, lw->co, "executor: %s", status != 0 ? "the wait was cancelled" : lw->why);
  } else if (term_add(l, lw->tid, 1, 0, &handle) != 0) {
    pool_local_close(hub_pool(h), lw->tid);
    bk_fail(l->b, lw->co, "not enough memory");
  } else {
    answer_term(l, lw->co, handle);
  }
  free(lw);
}

void bsvc_local_terminator(bk *b, int64_t co, bval *args, int n) {
  hub *h = bk_hub(b);
  blink *l = link_of(b);
  struct blink_cfg *c = cfg_of(h);
  const bval *st = n >= 1 && args[0].type == BV_TABLE ? &args[0] : NULL;
  const bval *sb = st ? bval_get(st, "sandbox") : NULL;
  double workers = num(st ? bval_get(st, "max_concurrency") : NULL, 1);
  double limit = num(sb ? bval_get(sb, "memory_limit") : NULL, 0);
  const char *profile = str_or(sb ? bval_get(sb, "profile") : NULL, "application");
  const bval *paths = c ? bval_get(&c->cfg, "code_paths") : NULL;
  char err[300];
  buf info;
  buf_init(&info);
  sandbox_config cfg = { SANDBOX_APPLICATION, 0, NULL, NULL, 0, NULL, NULL };
  const char *runner = bk_runner(b);
  const char *kv[] = { "ref", runner, "backend", "local", "node_base", runner,
                       "flame_vsn", FLAME_VERSION };
  lwait *lw = NULL;
  if (l == NULL || c == NULL) {
    snprintf(err, sizeof err, "not enough memory");
  } else if (!(workers >= 1 && workers <= 4096) || workers != floor(workers)) {
    snprintf(err, sizeof err, "local_terminator: max_concurrency in [1, 4096] expected");
  } else if (sandbox_profile_parse(profile, &cfg.profile) != 0) {
    snprintf(err, sizeof err, "local_terminator: unknown sandbox profile '%.100s'", profile);
  } else if (codec_encode_strings(&info, kv, 4) != 0 || (lw = calloc(1, sizeof *lw)) == NULL) {
    snprintf(err, sizeof err, "not enough memory");
  } else {
    cfg.memory_limit = limit > 0 ? (size_t)limit : 0;
    cfg.info = (const char *)info.data;
    cfg.info_len = info.len;
    /* the workers find modules where this program does now, as a process runner does */
    cfg.path = paths ? bval_str(bval_get(paths, "path"), NULL) : NULL;
    cfg.cpath = paths ? bval_str(bval_get(paths, "cpath"), NULL) : NULL;
    int64_t tid = pool_local_term(hub_pool(h), (int)workers, &cfg, &lw->ex, err, sizeof err);
    if (tid >= 0) {
      lw->tid = tid;
      lw->co = co;
      lw->owner = l;
      /* the executor's own wait (its lock and condition), off the runtime loop */
      int rc = uv_queue_work(bk_loop(), &lw->w, local_wait, local_waited);
      if (rc == 0) {
        l->lw = lw;
        buf_free(&info);
        bval_list_free(args, n);
        return;
      }
      pool_local_close(hub_pool(h), tid);
      snprintf(err, sizeof err, "executor: cannot wait for its workers: %s", uv_strerror(rc));
    }
  }
  free(lw);
  buf_free(&info);
  bval_list_free(args, n);
  bk_fail(b, co, "%s", err);
}

void bsvc_spawn_monitor(bk *b, int64_t co, bval *args, int n) {
  blink *l = *bk_link(b);
  const bval *h = n >= 1 ? bval_get(&args[0], "__flame_handle") : NULL;
  const bval *id = n >= 2 ? bval_get(&args[1], "id") : NULL;
  bterm *t = h && h->type == BV_INT ? term_find(l, h->u.i) : NULL;
  char err[300];
  if (t == NULL) {
    snprintf(err, sizeof err, "spawn_monitor: not a terminator");
  } else if (id == NULL || id->type != BV_INT) {
    snprintf(err, sizeof err, "spawn_monitor: the work given to remote_spawn_monitor expected");
  } else if (pool_via_sent(hub_pool(bk_hub(b)), (uint64_t)id->u.i, t->tid, err, sizeof err)) {
    bval *v = calloc(1, sizeof *v);
    if (v) bval_set_int(v, id->u.i);
    bval_list_free(args, n);
    bk_answer(b, co, v, v ? 1 : 0);
    return;
  }
  bval_list_free(args, n);
  bk_fail(b, co, "%s", err);
}

void bsvc_config(bk *b, int64_t co, bval *args, int n) {
  bval_list_free(args, n);
  bval *t = calloc(1, sizeof *t);   /* no per-backend configuration yet: {} */
  if (t) {
    t->type = BV_TABLE;
    t->u.t.kv = NULL;
    t->u.t.n = 0;
  }
  bk_answer(b, co, t, t ? 1 : 0);
}

/* Answers a copy of the pool's boot_config field key. */
static void answer_field(bk *b, int64_t co, bval *args, int n, const char *key) {
  bval_list_free(args, n);
  struct blink_cfg *c = cfg_of(bk_hub(b));
  const bval *v = c ? bval_get(&c->cfg, key) : NULL;
  bval *out = calloc(1, sizeof *out);
  if (out == NULL || (v && bval_copy(out, v) != 0)) {
    free(out);
    bk_fail(b, co, "not enough memory");
    return;
  }
  bk_answer(b, co, out, 1);
}

void bsvc_flame_bin(bk *b, int64_t co, bval *args, int n) {
  answer_field(b, co, args, n, "flame_bin");
}

void bsvc_code_paths(bk *b, int64_t co, bval *args, int n) {
  answer_field(b, co, args, n, "code_paths");
}

/* ------------------------------------------------------------------ Lua ---- */

enum { LOP_CONFIG, LOP_CODE };

typedef struct lcmd {
  int op;
  hub *h;
  bval cfg;
  int64_t gen, id, handle;
  buf pack;
  char raw[64];
  size_t rawlen;
  char *text;
} lcmd;

static void lcmd_free(lcmd *m) {
  bval_free(&m->cfg);
  buf_free(&m->pack);
  free(m->text);
  free(m);
}

static void lcmd_run(void *arg) {
  lcmd *m = arg;
  struct blink_cfg *c = cfg_of(m->h);
  if (c && m->op == LOP_CONFIG) {
    bval_free(&c->cfg);
    c->cfg = m->cfg;
    m->cfg.type = BV_NIL;
  } else if (c) {
    buf_free(&c->pack);
    free(c->hash);
    c->pack = m->pack;
    buf_init(&m->pack);
    memcpy(c->raw, m->raw, m->rawlen);
    c->rawlen = m->rawlen;
    c->hash = m->text;
    m->text = NULL;
    c->gen = c->hash ? m->gen : 0;
  }
  lcmd_free(m);
}

const bval *blink_config(hub *h) {
  struct blink_cfg *c = *hub_boot(h);
  return c && c->cfg.type == BV_TABLE ? &c->cfg : NULL;
}

int blink_term(int64_t id, int64_t handle, int64_t *tid, int *local, int64_t *code) {
  bk *b = bk_find(id);
  bterm *t = b ? term_find(*bk_link(b), handle) : NULL;
  if (t == NULL) return 0;
  *tid = t->tid;
  *local = t->local;
  *code = t->code;
  return 1;
}

void blink_fail(hub *h, int64_t id, const char *reason) {
  bk *b = bk_find(id);
  blink *l = b ? link_of(b) : NULL;
  if (l == NULL || l->failed != NULL) return;
  if ((l->failed = strdup(reason)) == NULL) return;   /* out of memory: as it was */
  forget_refs(l);                   /* a runner that comes later is refused */
  if (l->wait == W_UP || l->wait == W_CODE) wait_fail(l, l->failed);
  /* runners it met already are not the pool's: their links close, executors end */
  for (int i = 0; i < l->nterms; i++) {
    if (l->terms[i].local) pool_local_close(hub_pool(h), l->terms[i].tid);
    else hub_term_close(h, l->terms[i].tid, "its boot failed");
  }
}

static lcmd *lcmd_new(lua_State *L, int op) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  if (lh->rt == NULL) luaL_error(L, "hub is closed");
  lcmd *m = calloc(1, sizeof *m);
  if (m == NULL) luaL_error(L, "not enough memory");
  m->op = op;
  m->h = lh->rt;
  m->cfg.type = BV_NIL;
  return m;
}

static int lcmd_post(lua_State *L, lcmd *m) {
  if (runtime_post(lcmd_run, m) != 0) {
    lcmd_free(m);
    return luaL_error(L, "hub: the runtime thread is not running");
  }
  return 0;
}

static int l_boot_config(lua_State *L) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  luaL_checktype(L, 2, LUA_TTABLE);
  bval v;
  char why[200];
  if (bval_read(L, 2, &v, why, sizeof why) != 0)
    return luaL_error(L, "boot_config: %s", why);
  lcmd *m = calloc(1, sizeof *m);
  if (m == NULL || lh->rt == NULL) {
    free(m);
    bval_free(&v);
    return luaL_error(L, lh->rt ? "not enough memory" : "hub is closed");
  }
  m->op = LOP_CONFIG;
  m->h = lh->rt;
  m->cfg = v;
  return lcmd_post(L, m);
}

static int l_boot_code(lua_State *L) {
  lua_Integer gen = luaL_checkinteger(L, 2);
  size_t rlen = 0, hlen = 0;
  const char *raw = luaL_optlstring(L, 4, "", &rlen);
  const char *hash = luaL_optlstring(L, 5, NULL, &hlen);
  luaL_argcheck(L, rlen <= 64, 4, "a hash of at most 64 bytes expected");
  lcmd *m = lcmd_new(L, LOP_CODE);
  m->gen = gen;
  const char *err = NULL;
  if (hash && !lua_isnoneornil(L, 3) && buf_take_arg(L, 3, 0, &m->pack, &err) != 0) {
    lcmd_free(m);
    return luaL_error(L, "boot_code: %s", err);
  }
  memcpy(m->raw, raw, rlen);
  m->rawlen = rlen;
  if (hash && (m->text = strdup(hash)) == NULL) {
    lcmd_free(m);
    return luaL_error(L, "not enough memory");
  }
  return lcmd_post(L, m);
}

void blink_lua_methods(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "boot_config", l_boot_config }, { "boot_code", l_boot_code }, { NULL, NULL }
  };
  luaL_setfuncs(L, methods, 0);
}
