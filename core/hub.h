/*
 * hub.h - what the link hub (hub.c) and the pool's runtime side (pool.c) share. One
 * hub a pool: it is the pool's object on the runtime thread. hub.c keeps the links
 * (listen, handshake, heartbeats, frames) and the mailbox to the application's
 * thread; pool.c keeps the slots, the queue and the calls, and sends and hears frames
 * through the functions below.
 *
 * Contract:
 * - Everything here runs on the runtime thread, except what is marked Lua: that runs
 *   on the application's thread and only posts commands or reads what is its own.
 * - hub_post queues an event for the application (the events are hub.c's, listed in
 *   its header comment); it takes the event, and drops it when the application's
 *   side has gone.
 * - hub_term_send sends a frame on runner tid's link, taking data's bytes: 0; -1 when
 *   no runner of this hub has that tid or its link is closing (lost, or never up), the
 *   bytes then left in data; -2 out of memory (the bytes freed).
 * - hub_term_alive: whether runner tid has a link that is not closing.
 * - A hub is freed once it is closing and its links, listener and timer are gone and
 *   the pool's runtime side has closed every handle it had (pool_rt_closed): pool.c
 *   calls hub_maybe_free when its last handle has closed.
 */
#ifndef FLAME_HUB_H
#define FLAME_HUB_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "buf.h"

#define HUB_MT "flame.hub"

typedef struct hub hub;
typedef struct pool_rt pool_rt;

/* The events of hub.c's header comment, then the pool's (pool.c's comment). */
enum {
  EV_UP, EV_MESSAGE, EV_LOST, EV_REFUSED, EV_DROPPED, EV_CLOSED,
  EV_DONE, EV_FAIL, EV_GROW, EV_SHRINK, EV_IDLE, EV_REENCODE, EV_DRAINED,
  EV_BLOG,                                 /* a backend state's log line, or runner.c's */
  EV_GROWN, EV_ENDED                       /* runner.c's */
};

typedef struct hub_event {
  struct hub_event *next;
  int kind;
  int64_t tid, pid;
  int type;
  uint64_t id;
  char *text, *text2;
  char *name;                       /* a runner's name (EV_FAIL) */
  buf payload;
  struct bval *vals;                /* values after the others (backend.c's events) */
  int nvals;
} hub_event;

hub_event *hub_event_new(int kind);
void hub_event_free(hub_event *e);
void hub_post(hub *h, hub_event *e);
int hub_term_send(hub *h, int64_t tid, int type, uint64_t id, buf *data);
int hub_term_alive(hub *h, int64_t tid);
int64_t hub_new_tid(hub *h);
pool_rt *hub_pool(hub *h);
void hub_maybe_free(hub *h);

/* Runners expected and awaited (bsvc_link.c's await_remote_up):
 * - hub_expect: a runner with ref and secret will be accepted: 0, or -1 (no memory,
 *   or the hub is closing).
 * - hub_await: fn(ud, tid, pid, host, NULL) once that runner has proved itself and
 *   reported REMOTE_UP (now, returning 1, when it already has; else 0), or
 *   fn(ud, 0, 0, NULL, why) when the hub closes first; -1 for a ref not expected or
 *   already awaited. The ref is then forgotten: nobody else can come with it.
 * - hub_await_cancel: fn is not called; hub_forget: no runner comes with ref any
 *   more (one up and not awaited yet is closed, "boot abandoned").
 * - hub_code_send: sends a CODE frame (raw then pack, copied) to runner tid and
 *   calls fn(ud, tid, answer, NULL) with the runner's CODE answer, or fn(ud, tid,
 *   NULL, why) when its link ends first: 0, or -1 (no such link, or a code_sync is
 *   already waiting on it). hub_code_cancel: fn is not called.
 * - hub_post_up: tells the application's side of runner tid ("up").
 * - hub_term_close: closes runner tid's link with reason. */
typedef void (*hub_up_fn)(void *ud, int64_t tid, int64_t pid, const char *host,
                          const char *err);
typedef void (*hub_code_fn)(void *ud, int64_t tid, const buf *answer, const char *err);
int hub_expect(hub *h, const char *ref, const unsigned char *secret, size_t slen);
void hub_forget(hub *h, const char *ref);
int hub_await(hub *h, const char *ref, hub_up_fn fn, void *ud);
void hub_await_cancel(hub *h, const char *ref);
int hub_code_send(hub *h, int64_t tid, const void *raw, size_t rawlen, const void *pack,
                  size_t packlen, hub_code_fn fn, void *ud);
void hub_code_cancel(hub *h, int64_t tid);
void hub_post_up(hub *h, const char *ref, int64_t tid, int64_t pid, const char *host);
void hub_term_close(hub *h, int64_t tid, const char *reason);
int hub_closing(const hub *h);
/* The pool's runners speak TLS on the link (link.tls): FLAME_PARENT tells them. */
int hub_tls(const hub *h);

/* bsvc_link.c: what runners of this hub's pool are booted with, kept in the hub
 * (set by hub:boot_config); freed with it. */
struct blink_cfg;
struct blink_cfg **hub_boot(hub *h);
void blink_cfg_free(struct blink_cfg *c);
void blink_lua_methods(lua_State *L);

/* pool.c */
/* Calls of every pool not yet ended (runtime thread only): the runtime loop spins
 * after an event only while few are (loop.h's flame_spin). */
extern int pool_live_calls;

pool_rt *pool_rt_new(hub *h);
void pool_rt_close(pool_rt *p);
int pool_rt_closed(const pool_rt *p);
void pool_rt_free(pool_rt *p);
void pool_on_result(pool_rt *p, int64_t tid, uint64_t id, buf *msg);
void pool_on_draining(pool_rt *p, int64_t tid, const buf *msg);
void pool_on_lost(pool_rt *p, int64_t tid, const char *reason);
/* A backend's spawn_monitor: sends held call id to runner tid: 1, or 0 with why. */
int pool_via_sent(pool_rt *p, uint64_t id, int64_t tid, char *err, size_t errlen);
/* A local runner: an executor on the runtime loop (its workers starting: wait for
 * them with executor_ready, off the loop): its tid, or -1 with why. */
struct executor;
struct sandbox_config;
int64_t pool_local_term(pool_rt *p, int workers, const struct sandbox_config *cfg,
                        struct executor **ex, char *err, size_t errlen);
void pool_local_close(pool_rt *p, int64_t tid);

/* A backend state holds its hub (and so its mailbox) until it closes: the hub is
 * freed after its last release. Runtime thread. */
void hub_hold(hub *h);
void hub_release(hub *h);

/* backend.c: runs callback cb of backend state id with arg (taken) for the runtime
 * side itself; fn(ud, ok, results, n, NULL) or fn(ud, 0, NULL, 0, why) once it has
 * ended (fn takes the results), also when the state closes first. 0, or -1 (no
 * such open state, no memory: fn is not called). */
struct bval;
typedef void (*bk_done_fn)(void *ud, int ok, struct bval *vals, int n, const char *msg);
int backend_call(int64_t id, const char *cb, struct bval *arg, bk_done_fn fn, void *ud);


/* Lua: the hub's object as the application's thread holds it. */
typedef struct lhub {
  hub *rt;                          /* NULL once closed; only passed to commands */
  struct mailbox *mb;
  struct app_async *aa;
} lhub;

/* Lua: adds the pool's methods to the table on top of the stack (the hub's). */
void pool_lua_methods(lua_State *L);

#endif
