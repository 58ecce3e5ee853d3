/*
 * bsvc_http.c - the backend environment's HTTP, served on the runtime thread
 * (bsvc.h) with the C engine (http.h): one engine for the runtime loop, made on
 * first use and closed when the runtime stops.
 * - http_request{ method, url, unix_socket, headers = { name = value }, body,
 *   timeout = ms, ca, cert, key, insecure } -> status, headers (lower-case names),
 *   body | nil, why.
 * - http_watch(o, tag) -> true: the request is left running; its end reaches
 *   handle_info as { event = "http", tag, status, body } or { event, tag, error }.
 *   o.chunks: each piece of the body first, as { event, tag, data } (the end's body
 *   is then ""). o.await_response (true, or ms; else 30000): answers once the
 *   server has begun answering (the status), or nil, why (its failure, "status N"
 *   when it ended without one, or "no answer within N ms", the request then
 *   cancelled: handle_info hears "cancelled").
 * - http_stream(o) -> a handle { __flame_handle, kind = "http_stream" }; the body's
 *   chunks queue up as they come. stream_read(id) -> the next chunk, waiting for
 *   it; at the end nil, status | nil, error | nil, again at every read after.
 *   stream_close(id) -> true (a request not done is cancelled, a waiting read
 *   hears the end, the handle is gone) | false when id is no stream.
 * A misused option answers nil, why ("http.request: a table with a url expected").
 * Every request, watch and stream is a resource of its state: closing the state
 * cancels it, and nothing of it touches the state after (silent: set before the
 * cancel, as http_cancel calls on_done at once).
 */
#include <ctype.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "bsvc.h"
#include "http.h"
#include "loop.h"
#include "runtime.h"

#define WATCH_AWAIT 30000
#define TIMER_MAX 2147483647.0

#define CONTAINER(p, type, field) ((type *)(void *)((char *)(p) - offsetof(type, field)))

/* ------------------------------------------------------------- engine ---- */

static http_engine *engine;         /* the runtime loop's; runtime thread only */
static int engine_stopped;          /* the runtime stops: no request starts after */

/* Runs when the runtime stops, after the states closed (backend.c registers its
 * stop before any service runs): the engine goes before the loop's close walk, so
 * the pointer above never outlives it. */
static void engine_at_stop(void) {
  http_engine *e = engine;
  engine = NULL;
  engine_stopped = 1;
  if (e) http_engine_close(e);
}

static http_engine *engine_get(char *err, size_t errlen) {
  static int registered;
  if (engine) return engine;
  if (engine_stopped) {
    snprintf(err, errlen, "http: closed");
    return NULL;
  }
  engine = http_engine_new(bk_loop(), err, errlen);
  if (engine && !registered) {
    registered = 1;
    runtime_at_stop(engine_at_stop);
  }
  return engine;
}

/* ------------------------------------------------------------ options ---- */

typedef struct hopts {
  http_opts o;
  char *text[6];                    /* options given as numbers, as text */
  int ntext;
  char **lines;                     /* the headers' "Name: value" lines */
  size_t nlines;
} hopts;

static void hopts_free(hopts *h) {
  for (int i = 0; i < h->ntext; i++) free(h->text[i]);
  for (size_t i = 0; i < h->nlines; i++) free(h->lines[i]);
  free(h->lines);
  h->ntext = 0;
  h->nlines = 0;
  h->lines = NULL;
}



/* The string option k of o, as luaL_checkstring takes it (a string, or a number
 * as text): 0 (*out NULL when absent or nil), -1 another type, -2 out of memory. */
static int opt_str(hopts *h, const bval *o, const char *k, const char **out, size_t *len) {
  const bval *v = bval_get(o, k);
  *out = NULL;
  if (v == NULL || v->type == BV_NIL) return 0;
  if (v->type == BV_STR) {
    *out = v->u.s.p;
    if (len) *len = v->u.s.len;
    return 0;
  }
  if (v->type != BV_INT && v->type != BV_NUM) return -1;
  char *t = bval_text(v);
  if (t == NULL) return -2;
  h->text[h->ntext++] = t;
  *out = t;
  if (len) *len = strlen(t);
  return 0;
}

/* A number as luaL_checknumber takes it (a number, or a string that is one, not
 * "inf" nor "nan"): 0, or -1. */
static int opt_num(const bval *v, double *out) {
  if (v->type == BV_INT) *out = (double)v->u.i;
  else if (v->type == BV_NUM) *out = v->u.n;
  else if (v->type == BV_STR) {
    const char *s = v->u.s.p;
    char *end;
    if (strlen(s) != v->u.s.len || strpbrk(s, "nN")) return -1;
    *out = strtod(s, &end);
    if (end == s) return -1;
    while (isspace((unsigned char)*end)) end++;
    if (*end != '\0') return -1;
  } else {
    return -1;
  }
  return 0;
}

/* Reads a request's options (what the Lua service's http_opts and core.http_request
 * took): 0, or -1 with the message in why. h is hopts_free'd by the caller either
 * way; its strings point into o, which must live until http_start returns. */
static int read_opts(const bval *o, const char *what, hopts *h, char *why, size_t n) {
  memset(h, 0, sizeof *h);
  const bval *url = bval_get(o, "url");
  if (url == NULL || url->type != BV_STR) {   /* bval_get is NULL when o is no table */
    snprintf(why, n, "%s: a table with a url expected", what);
    return -1;
  }
  const bval *hd = bval_get(o, "headers");
  if (hd && hd->type != BV_NIL && hd->type != BV_TABLE) {
    snprintf(why, n, "%s: headers must be a table of name = value", what);
    return -1;
  }
  h->o.url = url->u.s.p;
  static const char *const names[] = { "method", "unix_socket", "ca", "cert", "key" };
  const char **slots[] = { &h->o.method, &h->o.unix_socket, &h->o.ca, &h->o.cert, &h->o.key };
  for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
    int rc = opt_str(h, o, names[i], slots[i], NULL);
    if (rc == -1) {
      snprintf(why, n, "%s: %s must be a string", what, names[i]);
      return -1;
    }
    if (rc == -2) goto oom;
  }
  h->o.insecure = bval_truthy(bval_get(o, "insecure"));
  const bval *t = bval_get(o, "timeout");
  if (t && t->type != BV_NIL) {
    double ms;
    if (opt_num(t, &ms) != 0) {
      snprintf(why, n, "%s: timeout must be a number (ms)", what);
      return -1;
    }
    if (ms > 0 && ms < 1e12) h->o.timeout_ms = (long)ms;
  }
  int rc = opt_str(h, o, "body", &h->o.body, &h->o.body_len);
  if (rc == -1) {
    snprintf(why, n, "%s: body must be a string", what);
    return -1;
  }
  if (rc == -2) goto oom;
  if (hd && hd->type == BV_TABLE) {
    /* string names and values only, as "%s: %s" (the C strings: up to a NUL) */
    size_t count = 0;
    for (size_t i = 0; i < hd->u.t.n; i++)
      if (hd->u.t.kv[i].k.type == BV_STR && hd->u.t.kv[i].v.type == BV_STR) count++;
    if (count > 0) {
      if ((h->lines = calloc(count, sizeof *h->lines)) == NULL) goto oom;
      for (size_t i = 0; i < hd->u.t.n; i++) {
        const bval *k = &hd->u.t.kv[i].k, *v = &hd->u.t.kv[i].v;
        if (k->type != BV_STR || v->type != BV_STR) continue;
        size_t len = strlen(k->u.s.p) + 2 + strlen(v->u.s.p) + 1;
        char *line = malloc(len);
        if (line == NULL) goto oom;
        snprintf(line, len, "%s: %s", k->u.s.p, v->u.s.p);
        h->lines[h->nlines++] = line;
      }
    }
    h->o.headers = (const char *const *)h->lines;
    h->o.nheaders = h->nlines;
  }
  return 0;
oom:
  snprintf(why, n, "%s: not enough memory", what);
  return -1;
}

/* -------------------------------------------------------------- values ---- */


/* The response's headers as a table: each name once, the last given winning, as
 * bval_push sets the pairs in order (so does core.http_request's table). 0 or -1. */
static int headers_of(bval *t, const http_header *h, size_t nh) {
  t->type = BV_TABLE;
  t->u.t.kv = NULL;
  t->u.t.n = 0;
  if (nh == 0) return 0;
  if ((t->u.t.kv = calloc(nh, sizeof *t->u.t.kv)) == NULL) {
    t->type = BV_NIL;
    return -1;
  }
  for (size_t i = 0; i < nh; i++) {
    bkv *kv = &t->u.t.kv[i];
    t->u.t.n = i + 1;
    if (bval_set_str(&kv->k, h[i].name, h[i].name_len) != 0
        || bval_set_str(&kv->v, h[i].value, h[i].value_len) != 0) {
      bval_free(t);
      return -1;
    }
  }
  return 0;
}

/* A message for handle_info: { event = "http", tag = *tag, ... } with tag taken
 * (left nil); 0, or -1 out of memory (msg and *tag freed). */
static int http_msg(bval *msg, bval *tag) {
  msg->type = BV_NIL;
  if (bk_table_set_str(msg, "event", "http", 4) != 0) {
    bval_free(tag);
    return -1;
  }
  if (tag->type != BV_NIL && bk_table_set(msg, "tag", tag) != 0) {   /* takes tag */
    bval_free(msg);
    return -1;
  }
  return 0;
}


/* ------------------------------------------------------------ request ---- */

typedef struct hreq {
  bk_res res;
  bk *b;
  int64_t co;
  http_req *r;
  int silent;                       /* the state closes: touch b no more */
} hreq;

static void req_done(void *ctx, long status, const http_header *h, size_t nh,
                     const char *body, size_t blen, const char *err) {
  hreq *x = ctx;
  bk *b = x->b;
  int64_t co = x->co;
  int silent = x->silent;
  bk_res_remove(&x->res);
  free(x);
  if (silent) return;
  if (err) {
    bk_fail(b, co, "%s", err);
    return;
  }
  bval *v = calloc(3, sizeof *v);
  if (v == NULL || headers_of(&v[1], h, nh) != 0 || bval_set_str(&v[2], body, blen) != 0) {
    bval_list_free(v, 3);
    bk_fail(b, co, "http.request: not enough memory for the response");
    return;
  }
  bval_set_int(&v[0], (lua_Integer)status);
  bk_answer(b, co, v, 3);
}

static void req_close(bk_res *res) {
  hreq *x = CONTAINER(res, hreq, res);
  x->silent = 1;
  http_cancel(x->r);                /* req_done, at once, frees x */
}

void bsvc_http_request(bk *b, int64_t co, bval *args, int n) {
  hopts h;
  char why[512];
  hreq *x = NULL;
  int rc = read_opts(n > 0 ? &args[0] : NULL, "http.request", &h, why, sizeof why);
  if (rc == 0 && (x = calloc(1, sizeof *x)) == NULL) {
    snprintf(why, sizeof why, "http.request: not enough memory");
    rc = -1;
  }
  http_engine *e = rc == 0 ? engine_get(why, sizeof why) : NULL;
  if (e) {
    static const http_cbs cbs = { NULL, NULL, req_done };
    x->b = b;
    x->co = co;
    x->res.close = req_close;
    x->r = http_start(e, &h.o, &cbs, x, why, sizeof why);
  }
  hopts_free(&h);                   /* http_start copied the strings */
  bval_list_free(args, n);
  if (x == NULL || x->r == NULL) {
    free(x);
    bk_fail(b, co, "%s", why);
    return;
  }
  bk_res_add(b, &x->res);
}

/* -------------------------------------------------------------- watch ---- */

typedef struct hwatch {
  flame_handle base;                /* the timer's, first: a loop's close walk frees it */
  bk_res res;
  bk *b;
  http_req *r;                      /* NULL until started, and once ended */
  bval tag;
  int64_t co;                       /* await_response: the coroutine waiting */
  int awaiting;                     /* co waits for the head */
  double ms;                        /* await_response's, as given: for the message */
  uv_timer_t timer;                 /* await_response's */
  int timer_open;                   /* from its init to its close callback */
  int silent;                       /* the state closes (or a failed start): touch b no more */
} hwatch;

static void watch_free(hwatch *x) {
  bval_free(&x->tag);
  free(x);
}

static void watch_timer_closed(uv_handle_t *h) {
  hwatch *x = h->data;
  x->timer_open = 0;
  if (x->r == NULL) watch_free(x);
}

static void watch_timer_end(hwatch *x) {
  if (x->timer_open && !uv_is_closing((uv_handle_t *)&x->timer))
    uv_close((uv_handle_t *)&x->timer, watch_timer_closed);
}

static void watch_head(void *ctx, long status) {
  hwatch *x = ctx;
  if (x->silent || !x->awaiting) return;
  x->awaiting = 0;
  watch_timer_end(x);
  bval *v = calloc(1, sizeof *v);
  if (v) bval_set_int(v, (lua_Integer)status);
  bk_answer(x->b, x->co, v, v ? 1 : 0);
}

static void watch_data(void *ctx, const char *p, size_t len) {
  hwatch *x = ctx;
  if (x->silent) return;
  bval msg, tag;
  if (bval_copy(&tag, &x->tag) != 0) return;        /* no memory: the piece is lost */
  if (http_msg(&msg, &tag) != 0) return;
  if (bk_table_set_str(&msg, "data", p, len) != 0) {
    bval_free(&msg);
    return;
  }
  bk_info(x->b, &msg);
}

static void watch_done(void *ctx, long status, const http_header *h, size_t nh,
                       const char *body, size_t blen, const char *err) {
  hwatch *x = ctx;
  bk_res_remove(&x->res);
  x->r = NULL;
  watch_timer_end(x);
  if (!x->silent) {
    bk *b = x->b;
    if (x->awaiting) {                /* it ended before the server answered */
      x->awaiting = 0;
      if (err) bk_fail(b, x->co, "%s", err);
      else bk_fail(b, x->co, "status %ld", status);
    }
    bval msg;
    if (http_msg(&msg, &x->tag) == 0) {
      int bad = err ? bk_table_set_str(&msg, "error", err, strlen(err)) != 0
                    : bk_table_set_int(&msg, "status", (lua_Integer)status) != 0
                      || bk_table_set_str(&msg, "body", body, blen) != 0;
      if (bad) bval_free(&msg);
      else bk_info(b, &msg);
    }
  }
  if (!x->timer_open) watch_free(x);
}

static void watch_timeout(uv_timer_t *t) {
  hwatch *x = t->data;
  watch_timer_end(x);
  if (x->silent || !x->awaiting) return;
  x->awaiting = 0;
  bk_fail(x->b, x->co, "no answer within %.0f ms", x->ms);
  if (x->r) http_cancel(x->r);      /* watch_done tells handle_info; the timer's close frees x */
}

static void watch_close(bk_res *res) {
  hwatch *x = CONTAINER(res, hwatch, res);
  x->silent = 1;
  watch_timer_end(x);
  if (x->r) http_cancel(x->r);      /* watch_done, at once; x is freed once the timer closed */
}

void bsvc_http_watch(bk *b, int64_t co, bval *args, int n) {
  const bval *o = n > 0 ? &args[0] : NULL;
  hopts h;
  char why[512];
  hwatch *x = NULL;
  int rc = read_opts(o, "http.watch", &h, why, sizeof why);
  if (rc == 0 && (x = calloc(1, sizeof *x)) == NULL) {
    snprintf(why, sizeof why, "http.watch: not enough memory");
    rc = -1;
  }
  if (rc != 0) {
    hopts_free(&h);
    bval_list_free(args, n);
    bk_fail(b, co, "%s", why);
    return;
  }
  x->base.on_close = watch_timer_closed;
  x->b = b;
  x->co = co;
  x->res.close = watch_close;
  int chunks = bval_truthy(bval_get(o, "chunks"));
  const bval *aw = bval_get(o, "await_response");
  x->awaiting = bval_truthy(aw);
  x->ms = aw && aw->type == BV_INT ? (double)aw->u.i
        : aw && aw->type == BV_NUM ? (double)aw->u.n : WATCH_AWAIT;
  if (n > 1) {
    x->tag = args[1];
    args[1].type = BV_NIL;
  }
  http_engine *e = engine_get(why, sizeof why);
  if (e && x->awaiting) {
    int urc = uv_timer_init(bk_loop(), &x->timer);
    if (urc != 0) {
      snprintf(why, sizeof why, "http.watch: cannot make a timer: %s", uv_strerror(urc));
      e = NULL;
    } else {
      x->timer.data = x;
      x->timer_open = 1;
    }
  }
  if (e) {
    http_cbs cbs = { x->awaiting ? watch_head : NULL, watch_data, watch_done };
    h.o.stream = chunks;
    x->r = http_start(e, &h.o, &cbs, x, why, sizeof why);
  }
  hopts_free(&h);
  bval_list_free(args, n);
  if (x->r == NULL) {
    if (x->timer_open) watch_timer_end(x);    /* its close frees x */
    else watch_free(x);
    bk_fail(b, co, "%s", why);
    return;
  }
  bk_res_add(b, &x->res);
  if (!x->awaiting) {
    bk_answer_bool(b, co, 1);
    return;
  }
  /* as the Lua did: math.max(1, math.min(ms, 2^31 - 1)), NaN giving 1 */
  double ms = TIMER_MAX < x->ms ? TIMER_MAX : x->ms;
  if (!(1 < ms)) ms = 1;
  int urc = uv_timer_start(&x->timer, watch_timeout, (uint64_t)ms, 0);
  if (urc != 0) {                   /* it could wait for ever: it goes, unheard */
    x->silent = 1;
    x->awaiting = 0;
    bk_res_remove(&x->res);
    http_cancel(x->r);              /* watch_done closes the timer, whose close frees x */
    bk_fail(b, co, "http.watch: cannot start a timer: %s", uv_strerror(urc));
  }
}

/* ------------------------------------------------------------- stream ---- */

/* A chunk: its bval first, so that the node is also the one-value list an answer
 * hands over (bk_answer's bval_list_free frees the node). */
typedef struct hchunk {
  bval data;
  struct hchunk *next;
} hchunk;

typedef struct hstream {
  bk_res res;
  bk *b;
  http_req *r;                      /* NULL until started, and once ended */
  int64_t handle;
  hchunk *head, **tail;             /* the chunks no read took yet */
  int done;                         /* the request ended: status, err */
  int has_status, has_err;
  long status;
  char err[512];
  int reading;                      /* a read waits: coroutine reader */
  int64_t reader;
  int lost;                         /* no memory for a chunk: cancelled for that */
  int silent;                       /* the state closes: touch b no more */
  int dropped;                      /* closed (stream_close or the state): free once ended */
  int cancelling;                   /* inside our http_cancel: the canceller frees */
} hstream;

static void stream_free(hstream *x) {
  while (x->head) {
    hchunk *c = x->head;
    x->head = c->next;
    bval_free(&c->data);
    free(c);
  }
  free(x);
}

/* Answers co with the end: nil, status | nil, error | nil. */
static void stream_answer_end(hstream *x, int64_t co) {
  bval *v = calloc(3, sizeof *v);   /* zeroed: nils */
  if (v == NULL) {
    bk_answer(x->b, co, NULL, 0);   /* nil: still the end */
    return;
  }
  if (x->has_status) bval_set_int(&v[1], (lua_Integer)x->status);
  if (x->has_err && bval_set_str(&v[2], x->err, strlen(x->err)) != 0) {
    bval_list_free(v, 3);
    bk_answer(x->b, co, NULL, 0);
    return;
  }
  bk_answer(x->b, co, v, 3);
}

static void stream_data(void *ctx, const char *p, size_t len) {
  hstream *x = ctx;
  if (x->silent || x->dropped) return;
  hchunk *c = malloc(sizeof *c);
  if (c == NULL || bval_set_str(&c->data, p, len) != 0) {
    free(c);
    x->lost = 1;                    /* a hole in the body: the stream ends, saying so */
    http_cancel(x->r);
    return;
  }
  c->next = NULL;
  if (x->reading) {                 /* the queue is empty while a read waits */
    x->reading = 0;
    bk_answer(x->b, x->reader, &c->data, 1);
    return;
  }
  *x->tail = c;
  x->tail = &c->next;
}

static void stream_done(void *ctx, long status, const http_header *h, size_t nh,
                        const char *body, size_t blen, const char *err) {
  hstream *x = ctx;
  x->r = NULL;
  x->done = 1;
  /* with opts.stream the body is "": on_data had it */
  if (x->lost) err = "http stream: not enough memory for a chunk (the request was cancelled)";
  if (err) {
    x->has_err = 1;
    snprintf(x->err, sizeof x->err, "%s", err);
  } else {
    x->has_status = 1;
    x->status = status;
  }
  if (!x->silent && x->reading) {
    x->reading = 0;
    stream_answer_end(x, x->reader);
  }
  if (x->dropped && !x->cancelling) stream_free(x);
}

/* Lets go of x: a request not done is cancelled (a waiting read hears the end,
 * unless silent), then x is freed. */
static void stream_drop(hstream *x) {
  x->dropped = 1;
  if (x->r) {
    x->cancelling = 1;
    http_cancel(x->r);              /* stream_done, at once */
    x->cancelling = 0;
  }
  if (x->r == NULL) stream_free(x); /* else stream_done frees it when it comes */
}

static void stream_close_by_state(bk_res *res) {
  hstream *x = CONTAINER(res, hstream, res);
  x->silent = 1;
  bk_handle_drop(x->b, x->handle);  /* b lives while it closes */
  stream_drop(x);
}

/* The stream the argument names (an integer id, or a float that is one, as a Lua
 * table key would be), or NULL. */
static hstream *stream_arg(bk *b, const bval *args, int n) {
  lua_Integer id;
  if (n < 1) return NULL;
  if (args[0].type == BV_INT) id = args[0].u.i;
  else if (args[0].type == BV_NUM) {
    lua_Number f = args[0].u.n;
    if (!lua_numbertointeger(f, &id) || (lua_Number)id != f) return NULL;
  } else return NULL;
  return bk_handle_get(b, (int64_t)id, BK_H_STREAM);
}

void bsvc_http_stream(bk *b, int64_t co, bval *args, int n) {
  hopts h;
  char why[512];
  hstream *x = NULL;
  bval *hv = NULL;
  int rc = read_opts(n > 0 ? &args[0] : NULL, "http.stream", &h, why, sizeof why);
  if (rc == 0) {
    x = calloc(1, sizeof *x);
    hv = calloc(1, sizeof *hv);
    if (x) x->handle = bk_handle_new(b, BK_H_STREAM, x);
    if (x == NULL || hv == NULL || x->handle < 0
        || bk_table_set_int(hv, "__flame_handle", x->handle) != 0
        || bk_table_set_str(hv, "kind", "http_stream", 11) != 0) {
      snprintf(why, sizeof why, "http.stream: not enough memory");
      rc = -1;
    }
  }
  http_engine *e = rc == 0 ? engine_get(why, sizeof why) : NULL;
  if (e) {
    static const http_cbs cbs = { NULL, stream_data, stream_done };
    x->b = b;
    x->tail = &x->head;
    x->res.close = stream_close_by_state;
    h.o.stream = 1;
    x->r = http_start(e, &h.o, &cbs, x, why, sizeof why);
  }
  hopts_free(&h);
  bval_list_free(args, n);
  if (x == NULL || x->r == NULL) {
    if (x && x->handle > 0) bk_handle_drop(b, x->handle);
    free(x);
    if (hv) bval_free(hv);
    free(hv);
    bk_fail(b, co, "%s", why);
    return;
  }
  bk_res_add(b, &x->res);
  bk_answer(b, co, hv, 1);
}

void bsvc_stream_read(bk *b, int64_t co, bval *args, int n) {
  hstream *x = stream_arg(b, args, n);
  bval_list_free(args, n);
  if (x == NULL) {
    bk_fail(b, co, "http stream: not a stream");
    return;
  }
  if (x->head) {
    hchunk *c = x->head;
    x->head = c->next;
    if (x->head == NULL) x->tail = &x->head;
    bk_answer(b, co, &c->data, 1);  /* the node goes with the answer */
    return;
  }
  if (x->done) {
    stream_answer_end(x, co);
    return;
  }
  if (x->reading) {
    bk_fail(b, co, "http stream: already being read");
    return;
  }
  x->reading = 1;
  x->reader = co;
}

void bsvc_stream_close(bk *b, int64_t co, bval *args, int n) {
  hstream *x = stream_arg(b, args, n);
  bval_list_free(args, n);
  if (x) {
    bk_handle_drop(b, x->handle);
    bk_res_remove(&x->res);
    stream_drop(x);                 /* a waiting read hears nil, nil, "cancelled" first */
  }
  bk_answer_bool(b, co, x != NULL);
}
