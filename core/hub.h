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

#include <stdint.h>

#include <lua.h>

#include "buf.h"

#define HUB_MT "flame.hub"

typedef struct hub hub;
typedef struct pool_rt pool_rt;

/* The events of hub.c's header comment, then the pool's (pool.c's comment). */
enum {
  EV_UP, EV_MESSAGE, EV_LOST, EV_REFUSED, EV_DROPPED, EV_CLOSED,
  EV_DONE, EV_FAIL, EV_GROW, EV_SHRINK, EV_IDLE, EV_VIA, EV_REENCODE, EV_DRAINED,
  EV_RFAIL,
  EV_BREQ, EV_BDONE, EV_BINFO, EV_BLOG, EV_BPROCS   /* backend.c's */
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

/* pool.c */
pool_rt *pool_rt_new(hub *h);
void pool_rt_close(pool_rt *p);
int pool_rt_closed(const pool_rt *p);
void pool_rt_free(pool_rt *p);
void pool_on_result(pool_rt *p, int64_t tid, uint64_t id, buf *msg);
void pool_on_draining(pool_rt *p, int64_t tid);
void pool_on_lost(pool_rt *p, int64_t tid);

/* A backend state holds its hub (and so its mailbox) until it closes: the hub is
 * freed after its last release. Runtime thread. */
void hub_hold(hub *h);
void hub_release(hub *h);

/* backend.c: its methods on the hub object. */
void backend_lua_methods(lua_State *L);

/* Lua: the hub's object as the application's thread holds it. */
typedef struct lhub {
  hub *rt;                          /* NULL once closed; only passed to commands */
  struct mailbox *mb;
  struct app_async *aa;
} lhub;

/* Lua: adds the pool's methods to the table on top of the stack (the hub's). */
void pool_lua_methods(lua_State *L);

#endif
