/*
 * hub.c - the parent's side of the link, on the runtime thread (runtime.h): one hub a
 * pool listens for its runners, makes each prove it holds its runner's secret (and
 * proves the parent does too), keeps the heartbeats and carries the frames. Its Lua
 * object, core.hub, lives on the application's thread; what happens reaches it as
 * events through a mailbox and a flame_waker on the application loop (loop.h: the
 * receiver never spins on the sender as libuv's uv_async does), so heartbeats go on
 * while the application's Lua code computes.
 *
 * Contract (Lua):
 *   core.hub{ host, port, heartbeat_interval, heartbeat_misses, max_message, tls,
 *             on_event = fn(kind, ...) } -> hub | nil, message
 *   (tls: runners speak TLS keyed by their secret, tls.h; a runner that does
 *   not, or that does where tls is false, is refused with why)
 *   hub:address() -> ip, port
 *   (runners expected and awaited: hub.h, for bsvc_link.c's parent_new and
 *   await_remote_up)
 *   hub:send(tid, type, id, payload [, prefix]), hub:close_term(tid, reason)
 *   hub:close()               closes the listener and every connection
 * Events, in the order they happened:
 *   "up", ref, tid, pid, host      a runner proved itself and reported REMOTE_UP
 *   "message", tid, type, id, payload [, status]
 *                                        RESULT (its status byte apart) or
 *                                        REMOTE_SHUTDOWN or CODE from a runner
 *   "lost", tid, reason            its link ended (closed, protocol, heartbeats)
 *   "refused", text / "dropped", text    an unauthenticated connection turned away
 *   "closed"                       the hub has let go of everything after close
 * The handshake and its refusals are docs/protocol.md's. Until a peer has
 * authenticated it may send 64 KiB at a time, and at most 64 connections may be
 * authenticating at once.
 * Threads: hub and hconn structs belong to the runtime thread; the application's
 * thread touches only its lhub and the mailbox. Lock: the mailbox's mutex, a leaf.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>
#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "crypto.h"
#include "hub.h"
#include "bval.h"
#include "link.h"
#include "runner.h"
#include "loop.h"
#include "runtime.h"
#include "wire.h"

#define HANDSHAKE_MESSAGE (64 * 1024)
#define HANDSHAKES_MAX 64
#define SECRET_MAX 256


enum { H_HELLO, H_PROOF, H_AUTH, H_UP, H_REFUSED };

/* ---------------------------------------------------------------- mailbox ---- */

typedef hub_event event;

typedef struct app_async {
  flame_handle base;                /* first: the application loop's walk frees it */
  flame_waker waker;               /* the application loop's wake-up */
  struct mailbox *mb;
  flame_loop *lp;
  int event_ref;                    /* on_event in the registry */
  struct lhub *owner;               /* the Lua object, or NULL once collected */
} app_async;

typedef struct mailbox {
  uv_mutex_t lock;                  /* guards everything below; a leaf */
  event *head, *tail;
  app_async *aa;                    /* NULL once the application side has gone */
  int refs;                         /* the application side and the runtime side */
} mailbox;

void hub_event_free(event *e) {
  free(e->text);
  free(e->text2);
  free(e->name);
  buf_free(&e->payload);
  bval_list_free(e->vals, e->nvals);
  free(e);
}

static void mailbox_release(mailbox *mb) {
  uv_mutex_lock(&mb->lock);
  int last = --mb->refs == 0;
  uv_mutex_unlock(&mb->lock);
  if (!last) return;
  for (event *e = mb->head; e;) {
    event *next = e->next;
    hub_event_free(e);
    e = next;
  }
  uv_mutex_destroy(&mb->lock);
  free(mb);
}

/* Runtime thread: queues an event for the application; dropped when it has gone. */
static void post(mailbox *mb, event *e) {
  uv_mutex_lock(&mb->lock);
  if (mb->aa == NULL) {
    uv_mutex_unlock(&mb->lock);
    hub_event_free(e);
    return;
  }
  e->next = NULL;
  int wake = mb->head == NULL;   /* the application takes the whole list at once: */
  if (mb->tail) mb->tail->next = e;         /* only the first event wakes it */
  else mb->head = e;
  mb->tail = e;
  if (wake) flame_waker_send(&mb->aa->waker);
  uv_mutex_unlock(&mb->lock);
}

hub_event *hub_event_new(int kind) {
  event *e = calloc(1, sizeof *e);
  if (e) e->kind = kind;
  return e;
}

static char *dup_str(const char *s) {
  return s ? strdup(s) : NULL;
}

static void post_text(mailbox *mb, int kind, int64_t tid, const char *text) {
  event *e = calloc(1, sizeof *e);
  if (e == NULL) return;                    /* out of memory: the event is lost */
  e->kind = kind;
  e->tid = tid;
  e->text = dup_str(text);
  post(mb, e);
}

/* ------------------------------------------------------- the runtime side ---- */

typedef struct expect {
  struct expect *next;
  char *ref;
  unsigned char secret[SECRET_MAX];
  size_t slen;
  int claimed, users;               /* users: connections in the handshake with it */
  hub_up_fn fn;                     /* who awaits it (hub_await), or NULL */
  void *ud;
  int64_t up_tid, up_pid;           /* up before anyone awaited it: kept until then */
  char *up_host;
} expect;

typedef struct tick {
  flame_handle base;
  uv_timer_t timer;
  struct hub *hub;
} tick;

typedef struct hconn {
  struct hconn *next;
  struct hub *hub;
  link_conn *c;
  int stage;
  int counted;                      /* in hub->handshaking */
  unsigned char nonce[WIRE_NONCE];
  expect *entry;
  int64_t tid;
  uint64_t msgs, deadline;
  wire_heartbeat hb;
  hub_code_fn code_fn;              /* a code_sync waiting for its answer (CODE) */
  void *code_ud;
  char peer[80];
} hconn;

struct hub {
  mailbox *mb;
  pool_rt *pool;                    /* the pool's runtime side (pool.c) */
  int listen;                       /* 0: a pool without remote runners (no listener) */
  link_listener *l;
  tick *tick;
  hconn *conns;
  expect *expects;
  int handshaking, closing, listening;
  int holds;                        /* backend states still open (hub_hold) */
  int64_t interval, misses, next_tid;
  size_t max_message;
  int tls;                          /* runners must speak TLS (link.tls), told them */
  struct blink_cfg *boot;           /* what runners are booted with (bsvc_link.c) */
  /* hub_open's arguments and answer */
  struct sockaddr_storage addr;
  int err;
  char ip[64];
  int port;
};


static expect *expect_find(hub *h, const char *ref) {
  for (expect *e = h->expects; e; e = e->next)      /* "" is a forgotten one */
    if (e->ref[0] != '\0' && strcmp(e->ref, ref) == 0) return e;
  return NULL;
}

static void expect_drop(hub *h, expect *x) {
  for (expect **p = &h->expects; *p; p = &(*p)->next) {
    if (*p == x) {
      *p = x->next;
      break;
    }
  }
  free(x->ref);
  free(x->up_host);
  free(x);
}

/* Out of the hub's list once no handshake uses it; until then a forgotten one. */
static void expect_retire(hub *h, expect *x) {
  x->fn = NULL;
  if (x->users == 0) expect_drop(h, x);
  else x->ref[0] = '\0';
}

static void done_handshaking(hconn *hc) {
  if (!hc->counted) return;
  hc->counted = 0;
  hc->hub->handshaking--;
  if (hc->entry) {
    hc->entry->users--;
    if (hc->entry->users == 0 && hc->entry->ref[0] == '\0') expect_drop(hc->hub, hc->entry);
    hc->entry = NULL;
  }
}

static void refuse(hconn *hc, const char *why) {
  if (hc->stage == H_REFUSED) return;
  hc->stage = H_REFUSED;
  /* the refusal goes out, then a FIN; a peer that does not close within a window
   * is closed by the tick */
  hc->deadline = uv_now(runtime_loop()) + (uint64_t)(hc->hub->interval * hc->hub->misses);
  char text[256];
  snprintf(text, sizeof text, "refused a connection from %s: %s", hc->peer, why);
  post_text(hc->hub->mb, EV_REFUSED, 0, text);
  link_send(hc->c, WIRE_CLOSE, 0, NULL, 0, why, strlen(why));   /* the runner learns why */
  link_finish(hc->c, why);
  done_handshaking(hc);
}

static void on_hello(hconn *hc, const buf *msg) {
  hub *h = hc->hub;
  if (h->tls && !link_tls_active(hc->c)) {
    refuse(hc, "this pool's link speaks TLS (link.tls) and the runner spoke in clear: "
           "a runner of an older flame, or one told to (its FLAME_PARENT)");
    return;
  }
  cJSON *doc = cJSON_ParseWithLength(msg->data ? (const char *)msg->data : "", msg->len);
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, "v");
  const cJSON *ref = cJSON_GetObjectItemCaseSensitive(doc, "ref");
  unsigned char nonce[64];
  long nlen = -1;
  char why[96];
  if (!cJSON_IsObject(doc) || !cJSON_IsNumber(v) || !(v->valuedouble > -1e9)
      || !(v->valuedouble < 1e9) || v->valuedouble != (double)(int64_t)v->valuedouble) {
    refuse(hc, "malformed HELLO");
  } else if ((int64_t)v->valuedouble != WIRE_PROTOCOL) {
    snprintf(why, sizeof why, "protocol version %lld is not %d", (long long)v->valuedouble, WIRE_PROTOCOL);
    refuse(hc, why);
  } else if (!cJSON_IsString(ref) || (hc->entry = expect_find(h, ref->valuestring)) == NULL
             || hc->entry->claimed) {
    hc->entry = NULL;
    refuse(hc, "unknown runner ref");
  } else if (h->tls && strcmp(link_tls_ref(hc->c) ? link_tls_ref(hc->c) : "", ref->valuestring)) {
    hc->entry = NULL;
    refuse(hc, "the HELLO names another ref than the runner's TLS key");
  } else if ((nlen = wire_b64_field(doc, "nonce", nonce, sizeof nonce)) < WIRE_NONCE) {
    hc->entry = NULL;
    refuse(hc, "malformed HELLO nonce");
  } else {
    hc->entry->users++;
    unsigned char p[CRYPTO_HMAC_LEN];
    char nb[64], pb[64];
    if (uv_random(NULL, NULL, hc->nonce, sizeof hc->nonce, 0, NULL) != 0
        || wire_proof(hc->entry->secret, hc->entry->slen, "parent", hc->entry->ref, nonce, (size_t)nlen, p) != 0) {
      refuse(hc, "the parent cannot make its proof");
    } else {
      crypto_b64encode(hc->nonce, sizeof hc->nonce, nb);
      crypto_b64encode(p, sizeof p, pb);
      char out[200];
      int n = snprintf(out, sizeof out, "{\"nonce\":\"%s\",\"proof\":\"%s\"}", nb, pb);
      hc->stage = H_PROOF;
      link_send(hc->c, WIRE_CHALLENGE, 0, NULL, 0, out, (size_t)n);
    }
  }
  cJSON_Delete(doc);
}

static void on_proof(hconn *hc, const buf *msg) {
  cJSON *doc = cJSON_ParseWithLength(msg->data ? (const char *)msg->data : "", msg->len);
  unsigned char got[64], want[CRYPTO_HMAC_LEN];
  long n = cJSON_IsObject(doc) ? wire_b64_field(doc, "proof", got, sizeof got) : -1;
  cJSON_Delete(doc);
  if (n < 0 || wire_proof(hc->entry->secret, hc->entry->slen, "runner", hc->entry->ref, hc->nonce,
                             sizeof hc->nonce, want) != 0
      || !crypto_equal(got, (size_t)n, want, sizeof want)) {
    refuse(hc, "wrong proof: the runner does not hold the secret");
    return;
  }
  hc->stage = H_AUTH;
}

static void hand_off(hub *h, expect *x) {
  hub_up_fn fn = x->fn;
  void *ud = x->ud;
  int64_t tid = x->up_tid, pid = x->up_pid;
  char *host = x->up_host;
  x->up_host = NULL;
  expect_retire(h, x);
  fn(ud, tid, pid, host, NULL);
  free(host);
}

static void on_up(hconn *hc, const buf *msg) {
  hub *h = hc->hub;
  expect *x = hc->entry;
  if (x->claimed || x->ref[0] == '\0') {     /* forgotten meanwhile: its boot is over */
    refuse(hc, "the runner came too late");
    return;
  }
  x->claimed = 1;
  cJSON *doc = cJSON_ParseWithLength(msg->data ? (const char *)msg->data : "", msg->len);
  const cJSON *pid = cJSON_GetObjectItemCaseSensitive(doc, "pid");
  const cJSON *host = cJSON_GetObjectItemCaseSensitive(doc, "host");
  hc->tid = ++h->next_tid;
  hc->stage = H_UP;
  hc->hb.heard = hc->msgs;
  link_limits(hc->c, h->max_message, LINK_PARTIALS_MAX);
  x->up_tid = hc->tid;
  x->up_pid = cJSON_IsNumber(pid) && pid->valuedouble > 0 && pid->valuedouble < 4194305
                ? (int64_t)pid->valuedouble : 0;
  x->up_host = cJSON_IsString(host) ? dup_str(host->valuestring) : NULL;
  cJSON_Delete(doc);
  done_handshaking(hc);                      /* x stays: it is claimed, not forgotten */
  if (x->fn) hand_off(h, x);                 /* else kept until hub_await */
}

static void on_message(link_conn *c, void *ud, int type, uint64_t id, buf *msg) {
  (void)c;
  hconn *hc = ud;
  if (hc->stage == H_REFUSED) return;
  hc->msgs++;
  if (hc->stage == H_UP) {
    if (type == WIRE_RESULT) {               /* the pool's: the call's slot and caller */
      pool_on_result(hc->hub->pool, hc->tid, id, msg);
    } else if (type == WIRE_CODE) {           /* the answer to a code_sync */
      hub_code_fn fn = hc->code_fn;
      hc->code_fn = NULL;
      if (fn) fn(hc->code_ud, hc->tid, msg, NULL);
    } else if (type == WIRE_REMOTE_SHUTDOWN) {
      pool_on_draining(hc->hub->pool, hc->tid, msg);
      event *e = calloc(1, sizeof *e);
      if (e == NULL) {
        link_close(hc->c, "not enough memory for a runner's message");
        return;
      }
      e->kind = EV_MESSAGE;
      e->tid = hc->tid;
      e->type = type;
      e->id = id;
      e->payload = *msg;                     /* the bytes are the event's now */
      buf_init(msg);
      post(hc->hub->mb, e);
    } else if (type != WIRE_PING) {
      char why[96];
      wire_unexpected(why, sizeof why, type, "");
      link_close(hc->c, why);
    }
    return;
  }
  if (type == WIRE_PING) return;
  if (hc->stage == H_HELLO && type == WIRE_HELLO) on_hello(hc, msg);
  else if (hc->stage == H_PROOF && type == WIRE_PROOF) on_proof(hc, msg);
  else if (hc->stage == H_AUTH && type == WIRE_REMOTE_UP) on_up(hc, msg);
  else {
    char why[96];
    wire_unexpected(why, sizeof why, type, " during the handshake");
    refuse(hc, why);
  }
}

static void on_close(link_conn *c, void *ud, const char *reason) {
  (void)c;
  hconn *hc = ud;
  hub *h = hc->hub;
  for (hconn **p = &h->conns; *p; p = &(*p)->next) {
    if (*p == hc) {
      *p = hc->next;
      break;
    }
  }
  done_handshaking(hc);
  if (hc->stage == H_UP) {
    if (hc->code_fn) hc->code_fn(hc->code_ud, hc->tid, NULL, reason);
    pool_on_lost(h->pool, hc->tid, reason);  /* no call goes to it any more */
    post_text(h->mb, EV_LOST, hc->tid, reason);
  } else if (hc->stage != H_REFUSED && strncmp(reason, "protocol", 8) == 0) {
    char text[256];
    snprintf(text, sizeof text, "closed an unauthenticated connection: %s", reason);
    post_text(h->mb, EV_DROPPED, 0, text);
  } else if (hc->stage != H_REFUSED && strncmp(reason, "tls: ", 5) == 0) {
    char text[320];                          /* a wrong key or the wrong speech: nothing ran */
    snprintf(text, sizeof text, "refused a connection from %s: %s", hc->peer, reason);
    post_text(h->mb, EV_REFUSED, 0, text);
  }
  free(hc);
  hub_maybe_free(h);
}

static const link_handlers handlers = { on_message, on_close };

/* TLS: a runner's secret by its ref, while it is expected and not yet claimed. */
static int tls_lookup(void *ud, const char *ref, unsigned char *secret, size_t *slen) {
  hub *h = ud;
  expect *x = expect_find(h, ref);
  if (x == NULL || x->claimed || x->slen > *slen) return 0;
  memcpy(secret, x->secret, x->slen);
  *slen = x->slen;
  return 1;
}

int hub_tls(const hub *h) {
  return h->tls;
}

static void on_accept(link_listener *l, void *ud, link_conn *c) {
  (void)l;
  hub *h = ud;
  hconn *hc = calloc(1, sizeof *hc);
  if (hc == NULL || h->closing) {
    free(hc);
    link_close(c, h->closing ? "the pool is shutting down" : "not enough memory");
    return;
  }
  hc->hub = h;
  hc->c = c;
  hc->counted = 1;
  h->handshaking++;
  hc->deadline = uv_now(runtime_loop()) + (uint64_t)(h->interval * h->misses);
  int port = 0;
  char ip[64];
  link_peer(c, ip, sizeof ip, &port);
  snprintf(hc->peer, sizeof hc->peer, "%s:%d", ip, port);
  hc->next = h->conns;
  h->conns = hc;
  link_limits(c, HANDSHAKE_MESSAGE, 1);
  link_tls_server(c, h->tls, tls_lookup, h);
  link_start(c, &handlers, hc, 0);
  if (h->handshaking > HANDSHAKES_MAX) refuse(hc, "too many connections are authenticating");
}

/* Every heartbeat interval: a PING to each runner, a miss counted for each that was
 * silent since the last tick (wire_heartbeat_tick), and handshakes past their window
 * closed. */
static void on_tick(uv_timer_t *t) {
  hub *h = ((tick *)t->data)->hub;
  uint64_t now = uv_now(runtime_loop());
  for (hconn *hc = h->conns, *next; hc; hc = next) {
    next = hc->next;
    if (hc->stage == H_UP) {
      if (link_closing(hc->c)) continue;
      link_send(hc->c, WIRE_PING, 0, NULL, 0, NULL, 0);
      char why[128];
      if (wire_heartbeat_tick(&hc->hb, hc->msgs, h->misses, h->interval, "runner", why,
                              sizeof why))
        link_close(hc->c, why);
    } else if (hc->stage != H_REFUSED && now >= hc->deadline) {
      refuse(hc, "handshake timed out");
    } else if (hc->stage == H_REFUSED && now >= hc->deadline) {
      link_close(hc->c, NULL);
    }
  }
}

static void tick_free(uv_handle_t *hd) {
  tick *t = hd->data;
  hub *h = t->hub;
  free(t);
  if (h) {
    h->tick = NULL;
    hub_maybe_free(h);
  }
}

static void listener_closed(void *ud) {
  hub *h = ud;
  h->l = NULL;
  hub_maybe_free(h);
}

/* A closing hub goes once its listener, timer, connections and the pool's handles
 * are gone. */
void hub_maybe_free(hub *h) {
  if (!h->closing || h->l || h->tick || h->conns || h->listening || h->holds) return;
  if (h->pool && !pool_rt_closed(h->pool)) return;
  pool_rt_free(h->pool);
  h->pool = NULL;
  blink_cfg_free(h->boot);
  while (h->expects) expect_drop(h, h->expects);
  event *e = calloc(1, sizeof *e);
  if (e) {
    e->kind = EV_CLOSED;
    post(h->mb, e);
  }
  mailbox_release(h->mb);
  free(h);
}

void hub_hold(hub *h) {
  h->holds++;
}

void hub_release(hub *h) {
  h->holds--;
  hub_maybe_free(h);
}

/* ---- commands, run on the runtime thread ---- */

static void cmd_open(void *arg) {
  hub *h = arg;
  if ((h->pool = pool_rt_new(h)) == NULL) {
    h->err = UV_ENOMEM;
    return;
  }
  if (!h->listen) return;
  if (h->tls) tls_warm_server(NULL);         /* once: not in the first runner's handshake */
  h->l = link_listen(runtime_loop(), (struct sockaddr *)&h->addr, on_accept, h, &h->err);
  if (h->l == NULL) return;
  h->err = link_listener_address(h->l, h->ip, sizeof h->ip, &h->port);
  tick *t = calloc(1, sizeof *t);
  int rc = t ? uv_timer_init(runtime_loop(), &t->timer) : UV_ENOMEM;
  if (rc == 0) {
    t->base.on_close = tick_free;
    t->timer.data = t;
    t->hub = h;
    h->tick = t;
    rc = uv_timer_start(&t->timer, on_tick, (uint64_t)h->interval, (uint64_t)h->interval);
  } else {
    free(t);
  }
  if (rc != 0 && h->err == 0) h->err = rc;
}

typedef struct hcmd {
  hub *h;
  int64_t tid;
  int type;
  uint64_t id;
  char *ref, *reason;
  buf data;
} hcmd;

static void hcmd_free(hcmd *c) {
  free(c->ref);
  free(c->reason);
  buf_free(&c->data);
  free(c);
}

static hconn *find_term(hub *h, int64_t tid) {
  for (hconn *hc = h->conns; hc; hc = hc->next)
    if (hc->stage == H_UP && hc->tid == tid) return hc;
  return NULL;
}

int hub_term_send(hub *h, int64_t tid, int type, uint64_t id, buf *data) {
  hconn *hc = find_term(h, tid);
  if (hc == NULL || link_closing(hc->c)) return -1;   /* the bytes stay the caller's */
  return link_send_buf(hc->c, type, id, data);
}

int64_t hub_new_tid(hub *h) {
  return ++h->next_tid;
}

int hub_term_alive(hub *h, int64_t tid) {
  hconn *hc = find_term(h, tid);
  return hc != NULL && !link_closing(hc->c);
}

pool_rt *hub_pool(hub *h) {
  return h->pool;
}

void hub_post(hub *h, hub_event *e) {
  post(h->mb, e);
}

int hub_expect(hub *h, const char *ref, const unsigned char *secret, size_t slen) {
  expect *x = slen >= 1 && slen <= SECRET_MAX && !h->closing ? calloc(1, sizeof *x) : NULL;
  if (x == NULL || (x->ref = strdup(ref)) == NULL) {
    free(x);
    return -1;
  }
  memcpy(x->secret, secret, slen);
  x->slen = slen;
  x->next = h->expects;
  h->expects = x;
  return 0;
}

void hub_forget(hub *h, const char *ref) {
  expect *x = expect_find(h, ref);
  if (x == NULL) return;
  if (x->up_tid) {                           /* up, but no boot took it */
    hconn *hc = find_term(h, x->up_tid);
    if (hc) link_close(hc->c, "boot abandoned");
  }
  expect_retire(h, x);                       /* a handshake in progress ends refused */
}

int hub_await(hub *h, const char *ref, hub_up_fn fn, void *ud) {
  expect *x = expect_find(h, ref);
  if (x == NULL || x->fn) return -1;
  x->fn = fn;
  x->ud = ud;
  if (x->up_tid == 0) return 0;
  hand_off(h, x);
  return 1;
}

void hub_await_cancel(hub *h, const char *ref) {
  expect *x = expect_find(h, ref);
  if (x) x->fn = NULL;
}

int hub_code_send(hub *h, int64_t tid, const void *raw, size_t rawlen, const void *pack,
                  size_t packlen, hub_code_fn fn, void *ud) {
  hconn *hc = find_term(h, tid);
  if (hc == NULL || link_closing(hc->c) || hc->code_fn) return -1;
  int rc = link_send(hc->c, WIRE_CODE, 0, raw, rawlen, pack, packlen);
  if (rc != 0) return rc;
  hc->code_fn = fn;
  hc->code_ud = ud;
  return 0;
}

void hub_code_cancel(hub *h, int64_t tid) {
  hconn *hc = find_term(h, tid);
  if (hc) hc->code_fn = NULL;
}

void hub_term_close(hub *h, int64_t tid, const char *reason) {
  hconn *hc = find_term(h, tid);
  if (hc) link_close(hc->c, reason);
}

void hub_post_up(hub *h, const char *ref, int64_t tid, int64_t pid, const char *host) {
  event *e = calloc(1, sizeof *e);
  if (e == NULL) return;
  e->kind = EV_UP;
  e->tid = tid;
  e->pid = pid;
  e->text = dup_str(ref);
  e->text2 = host ? dup_str(host) : NULL;
  post(h->mb, e);
}

struct blink_cfg **hub_boot(hub *h) {
  return &h->boot;
}

int hub_closing(const hub *h) {
  return h->closing;
}

static void cmd_send(void *arg) {
  hcmd *c = arg;
  hconn *hc = find_term(c->h, c->tid);
  if (hc && link_send_buf(hc->c, c->type, c->id, &c->data) == -2)
    link_close(hc->c, "not enough memory to send a message");
  hcmd_free(c);
}

static void cmd_close_term(void *arg) {
  hcmd *c = arg;
  hconn *hc = find_term(c->h, c->tid);
  if (hc) link_close(hc->c, c->reason ? c->reason : "closed by the parent");
  hcmd_free(c);
}

static void cmd_close(void *arg) {
  hcmd *c = arg;
  hub *h = c->h;
  hcmd_free(c);
  h->closing = 1;
  if (h->pool) pool_rt_close(h->pool);
  if (h->l) link_listener_close(h->l, listener_closed);
  if (h->tick) {
    uv_timer_stop(&h->tick->timer);
    uv_close((uv_handle_t *)&h->tick->timer, tick_free);
  }
  for (hconn *hc = h->conns; hc; hc = hc->next) link_close(hc->c, "the pool is shutting down");
  /* boots waiting for their runner learn it now */
  for (;;) {                                 /* a callback may retire others: from the top */
    expect *x = h->expects;
    while (x && x->fn == NULL) x = x->next;
    if (x == NULL) break;
    hub_up_fn fn = x->fn;
    void *ud = x->ud;
    expect_retire(h, x);
    if (fn) fn(ud, 0, 0, NULL, "the pool is shutting down");
  }
  hub_maybe_free(h);
}

/* --------------------------------------------------- the application side ---- */


static void aa_detach(app_async *aa);
static void aa_free(uv_handle_t *hd);

/* In a protected call (a string too large for memory must not unwind through the
 * loop): the event callback with what event 2 says. */
static int event_call(lua_State *L) {
  app_async *aa = lua_touserdata(L, 1);
  const event *e = lua_touserdata(L, 2);
  static const char *const kinds[] = { "up", "message", "lost", "refused", "dropped",
                                       "closed", "done", "fail", "grow", "shrink", "idle",
                                       "reencode", "drained", "blog", "grown", "ended" };
  lua_settop(L, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, aa->event_ref);
  lua_pushstring(L, kinds[e->kind]);
  switch (e->kind) {
    case EV_UP:
      lua_pushstring(L, e->text ? e->text : "");
      lua_pushinteger(L, e->tid);
      lua_pushinteger(L, e->pid);
      if (e->text2) lua_pushstring(L, e->text2);
      else lua_pushnil(L);
      break;
    case EV_MESSAGE: {
      const char *p = e->payload.data ? (const char *)e->payload.data : "";
      size_t n = e->payload.len;
      lua_pushinteger(L, e->tid);
      lua_pushinteger(L, e->type);
      lua_pushinteger(L, (lua_Integer)e->id);
      if (e->type == WIRE_RESULT && n > 0) {  /* the status byte apart: no copy later */
        lua_pushlstring(L, p + 1, n - 1);
        lua_pushlstring(L, p, 1);
      } else {
        lua_pushlstring(L, p, n);
      }
      break;
    }
    case EV_LOST:
      lua_pushinteger(L, e->tid);
      lua_pushstring(L, e->text ? e->text : "lost");
      break;
    case EV_REFUSED: case EV_DROPPED:
      lua_pushstring(L, e->text ? e->text : "");
      break;
    case EV_DONE: {                           /* id, status, payload, leaving */
      const char *p = e->payload.data ? (const char *)e->payload.data : "e";
      size_t n = e->payload.len;
      lua_pushinteger(L, (lua_Integer)e->id);
      lua_pushlstring(L, p, 1);
      if (n > 1) lua_pushlstring(L, p + 1, n - 1);
      else lua_pushnil(L);
      lua_pushboolean(L, e->type);
      break;
    }
    case EV_FAIL:                             /* id, why, detail, phase, runner */
      lua_pushinteger(L, (lua_Integer)e->id);
      lua_pushstring(L, e->text ? e->text : "");
      if (e->text2) lua_pushstring(L, e->text2);
      else lua_pushnil(L);
      if (e->type == 1) lua_pushliteral(L, "boot");
      else if (e->type == 2) lua_pushliteral(L, "queue");
      else lua_pushnil(L);
      if (e->name) lua_pushstring(L, e->name);
      else lua_pushnil(L);
      break;
    case EV_GROW:                             /* boot, is_min, count, name */
      lua_pushinteger(L, (lua_Integer)e->id);
      lua_pushboolean(L, e->type);
      lua_pushinteger(L, e->pid);
      lua_pushstring(L, e->text ? e->text : "?");
      break;
    case EV_SHRINK:                           /* tid, why, count, hook */
      lua_pushinteger(L, e->tid);
      lua_pushstring(L, e->text ? e->text : "");
      lua_pushinteger(L, e->pid);
      lua_pushboolean(L, e->type);
      break;
    case EV_GROWN:                            /* result, count, tid, name */
      lua_pushstring(L, e->text ? e->text : "?");
      lua_pushinteger(L, e->pid);
      lua_pushinteger(L, e->tid);
      lua_pushstring(L, e->text2 ? e->text2 : "?");
      break;
    case EV_ENDED:                            /* the runners still ending, or "" */
      lua_pushstring(L, e->text ? e->text : "");
      break;
    case EV_IDLE:
      lua_pushinteger(L, e->tid);
      break;
    case EV_REENCODE:                         /* id, the runner's code, the runner */
      lua_pushinteger(L, (lua_Integer)e->id);
      lua_pushinteger(L, e->pid);
      lua_pushinteger(L, e->tid);
      break;
    case EV_BLOG:                             /* state, level, line */
      lua_pushinteger(L, e->tid);
      lua_pushstring(L, e->text ? e->text : "info");
      lua_pushstring(L, e->text2 ? e->text2 : "");
      break;
    default:
      break;
  }
  luaL_checkstack(L, e->nvals + 2, "too many values in an event");
  for (int i = 0; i < e->nvals; i++) bval_push(L, &e->vals[i]);
  lua_call(L, lua_gettop(L) - 1, 0);
  return 0;
}

static void deliver(flame_waker *w) {
  app_async *aa = w->poll.data;
  uv_mutex_lock(&aa->mb->lock);
  event *e = aa->mb->head;
  aa->mb->head = aa->mb->tail = NULL;
  uv_mutex_unlock(&aa->mb->lock);
  lua_State *L = aa->lp->L;
  while (e) {
    event *next = e->next;
    if (L && aa->event_ref != LUA_NOREF && lua_checkstack(L, 3)) {
      lua_pushcfunction(L, event_call);
      lua_pushlightuserdata(L, aa);
      lua_pushlightuserdata(L, e);
      flame_pcall_report(L, 2, "a hub's event callback");
    }
    int closed = e->kind == EV_CLOSED;
    hub_event_free(e);
    e = next;
    if (closed && !uv_is_closing((uv_handle_t *)&aa->waker.poll)) {
      aa_detach(aa);                         /* the hub is gone: nothing more comes */
      flame_waker_close(&aa->waker, aa_free);
    }
  }
}

/* No more events reach the application side: before its handle is closed (the
 * runtime must not wake a handle on its way out). */
static void aa_detach(app_async *aa) {
  uv_mutex_lock(&aa->mb->lock);
  aa->mb->aa = NULL;
  uv_mutex_unlock(&aa->mb->lock);
  if (aa->owner) aa->owner->aa = NULL;
  aa->owner = NULL;
}

/* A handle that never carried events (its waker failed to start). */
static void aa_free_unused(uv_handle_t *hd) {
  free(hd->data);
}

static void aa_free(uv_handle_t *hd) {
  app_async *aa = hd->data;
  flame_waker_end(&aa->waker);              /* a loop's close walk closed only the poll */
  aa_detach(aa);                            /* done already, unless the loop's walk came first */
  if (aa->lp->L) luaL_unref(aa->lp->L, LUA_REGISTRYINDEX, aa->event_ref);
  mailbox_release(aa->mb);
  free(aa);
}

static lhub *hub_check(lua_State *L) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  if (lh->rt == NULL) luaL_error(L, "hub is closed");
  return lh;
}

static void posted(lua_State *L, runtime_fn fn, hcmd *c) {
  if (runtime_post(fn, c) != 0) {
    hcmd_free(c);
    luaL_error(L, "hub: the runtime thread is not running");
  }
}

static hcmd *hcmd_new(lua_State *L, lhub *lh) {
  hcmd *c = calloc(1, sizeof *c);
  if (c == NULL) luaL_error(L, "not enough memory");
  c->h = lh->rt;
  return c;
}

/* hub:send(tid, type, id, payload [, prefix]): payload a string or a flame.bytes;
 * one made with room for the prefix goes to the socket without a copy. */
static int hub_send(lua_State *L) {
  lhub *lh = hub_check(L);
  lua_Integer tid = luaL_checkinteger(L, 2), type = luaL_checkinteger(L, 3);
  lua_Integer id = luaL_checkinteger(L, 4);
  size_t xlen;
  if (lua_isnoneornil(L, 5)) {
    lua_settop(L, 6);
    lua_pushliteral(L, "");
    lua_replace(L, 5);
  }
  const char *prefix = luaL_optlstring(L, 6, "", &xlen);
  luaL_argcheck(L, type >= 0 && type <= 255, 3, "a type in [0, 255] expected");
  hcmd *c = hcmd_new(L, lh);
  c->tid = tid;
  c->type = (int)type;
  c->id = (uint64_t)id;
  const char *err;
  if (buf_take_arg(L, 5, xlen, &c->data, &err) != 0) {
    hcmd_free(c);
    return luaL_error(L, "hub:send: %s", err);
  }
  if (xlen) memcpy(c->data.data, prefix, xlen);
  posted(L, cmd_send, c);
  return 0;
}

static int hub_close_term(lua_State *L) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  lua_Integer tid = luaL_checkinteger(L, 2);
  const char *reason = luaL_optstring(L, 3, "closed by the parent");
  if (lh->rt == NULL) return 0;
  hcmd *c = hcmd_new(L, lh);
  c->tid = tid;
  if ((c->reason = strdup(reason)) == NULL) {
    hcmd_free(c);
    return luaL_error(L, "not enough memory");
  }
  posted(L, cmd_close_term, c);
  return 0;
}

static int hub_address(lua_State *L) {
  lhub *lh = hub_check(L);
  if (!lh->rt->listen) return 0;            /* a pool of local runners: no listener */
  lua_pushstring(L, lh->rt->ip);            /* written by cmd_open, read-only since */
  lua_pushinteger(L, lh->rt->port);
  return 2;
}

static void hub_shut(lhub *lh) {
  if (lh->rt == NULL) return;
  hcmd *c = calloc(1, sizeof *c);
  if (c) {
    c->h = lh->rt;
    if (runtime_post(cmd_close, c) != 0) free(c);
  }
  lh->rt = NULL;
}

static int hub_close(lua_State *L) {
  hub_shut(luaL_checkudata(L, 1, HUB_MT));
  return 0;
}

static int hub_gc(lua_State *L) {
  lhub *lh = luaL_checkudata(L, 1, HUB_MT);
  hub_shut(lh);
  app_async *aa = lh->aa;
  if (aa && !uv_is_closing((uv_handle_t *)&aa->waker.poll)) {
    aa_detach(aa);
    flame_waker_close(&aa->waker, aa_free);
  }
  lh->aa = NULL;
  return 0;
}

static lua_Integer opt_field(lua_State *L, const char *name, lua_Integer def, lua_Integer min) {
  lua_getfield(L, 1, name);
  lua_Integer v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    lua_Number n = lua_tonumberx(L, -1, &ok);
    if (!ok) luaL_error(L, "hub: %s must be a number", name);
    v = (lua_Integer)n;
    if ((lua_Number)v < n) v++;                /* a fraction of a millisecond rounds up */
  }
  lua_pop(L, 1);
  if (v < min) luaL_error(L, "hub: %s must be at least %d", name, (int)min);
  return v;
}

/* core.hub{ host, port, heartbeat_interval, heartbeat_misses, max_message, on_event } */
static int l_hub(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  flame_loop *lp = flame_loop_get(L);
  lua_getfield(L, 1, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  lua_Integer port = luaL_optinteger(L, -1, 0);
  lua_pop(L, 2);
  lua_Integer interval = opt_field(L, "heartbeat_interval", 1000, 1);
  lua_Integer misses = opt_field(L, "heartbeat_misses", 3, 1);
  lua_Integer max_message = opt_field(L, "max_message", (lua_Integer)1 << 30, 1);
  lua_getfield(L, 1, "listen");
  int listen = lua_isnil(L, -1) || lua_toboolean(L, -1);
  lua_getfield(L, 1, "tls");
  int tls = lua_toboolean(L, -1);
  lua_pop(L, 2);
  lua_getfield(L, 1, "on_event");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  int fn = lua_gettop(L);
  lhub *lh = lua_newuserdatauv(L, sizeof *lh, 0);
  memset(lh, 0, sizeof *lh);
  luaL_setmetatable(L, HUB_MT);
  hub *h = calloc(1, sizeof *h);
  mailbox *mb = calloc(1, sizeof *mb);
  app_async *aa = calloc(1, sizeof *aa);
  if (h == NULL || mb == NULL || aa == NULL || uv_mutex_init(&mb->lock) != 0) {
    free(h);
    free(mb);
    free(aa);
    return luaL_error(L, "not enough memory");
  }
  if (port < 0 || port > 65535 || link_addr(host, (int)port, &h->addr) != 0) {
    uv_mutex_destroy(&mb->lock);
    free(h);
    free(mb);
    free(aa);
    return luaL_error(L, "bad address '%s' (an IPv4 or IPv6 address expected)", host);
  }
  aa->waker.poll.data = aa;                  /* uv_poll_init leaves data as it is */
  int rc = flame_waker_init(&lp->uv, &aa->waker, deliver);
  if (rc != 0) {
    uv_mutex_destroy(&mb->lock);
    free(h);
    free(mb);
    if (aa->waker.made) flame_waker_close(&aa->waker, aa_free_unused);  /* libuv holds it */
    else free(aa);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot make the pool's wake-up handle: %s (is the process out of "
                    "memory or file descriptors?)", uv_strerror(rc));
    return 2;
  }
  aa->base.on_close = aa_free;
  aa->mb = mb;
  aa->lp = lp;
  lua_pushvalue(L, fn);
  aa->event_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  /* referenced, as the listener on the application loop was: a task waiting for a
   * runner is waiting for something that can come */
  mb->aa = aa;
  aa->owner = lh;
  mb->refs = 2;
  h->mb = mb;
  h->interval = interval;
  h->misses = misses;
  h->max_message = (size_t)max_message;
  h->listen = listen;
  h->tls = tls;
  lh->mb = mb;
  lh->aa = aa;
  h->listening = 1;
  if (runtime_call(cmd_open, h) != 0) {
    h->err = UV_EAGAIN;
    h->listening = 0;
    mailbox_release(mb);                     /* the runtime never had it */
    free(h);
    lua_pushnil(L);
    lua_pushliteral(L, "cannot listen: the runtime thread cannot start");
    return 2;
  }
  h->listening = 0;
  if (h->err != 0) {
    int err = h->err;
    lh->rt = h;
    hub_shut(lh);                            /* the runtime frees what it made */
    lua_pushnil(L);
    lua_pushfstring(L, "cannot listen: %s", uv_strerror(err));
    return 2;
  }
  lh->rt = h;
  return 1;
}

void flame_hub_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "send", hub_send },
    { "close_term", hub_close_term }, { "address", hub_address }, { "close", hub_close },
    { NULL, NULL }
  };
  if (luaL_newmetatable(L, HUB_MT)) {
    luaL_newlib(L, methods);
    pool_lua_methods(L);
    runner_lua_methods(L);
    blink_lua_methods(L);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, hub_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_hub);
  lua_setfield(L, -2, "hub");
  lua_pushinteger(L, WIRE_SPAWN_HEADER);     /* the room flame.call leaves in its bytes */
  lua_setfield(L, -2, "SPAWN_HEADER");
}
