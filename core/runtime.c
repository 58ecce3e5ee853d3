/*
 * runtime.c - the runtime thread (contract in runtime.h). Commands cross by a
 * mutex-guarded list and a flame_waker (loop.h: a uv_async without the receiver's
 * spin) that wakes the runtime's loop; the loop runs until exit, kept alive by it.
 */
#include <stdio.h>
#include <stdlib.h>

#include "flame.h"
#include "crypto.h"
#include "hub.h"
#include "loop.h"
#include "runtime.h"

typedef struct cmd {
  struct cmd *next;
  runtime_fn fn;
  void *arg;
  int sync;                   /* runtime_call: done is set and signalled */
  int done;
} cmd;

static uv_once_t start_once = UV_ONCE_INIT;
static int started;           /* 1 when the thread runs; written once, in start */
static uv_thread_t thread;
static uv_loop_t loop;
static flame_waker wake;      /* its descriptor stays open until the process ends: a
                                 poster preempted between its unlock and its send may
                                 write after the loop has closed, and must not reach
                                 a descriptor reused since */
static uv_mutex_t lock;       /* guards the queue, stopping, and every cmd->done */
static uv_cond_t done_cond;
static cmd *head, *tail;
static int draining;          /* drain runs commands and will look at the queue again */
static int stopping;
static void (*at_stop[4])(void);   /* runtime thread only */
static int nat_stop;

/* Takes the whole queue at once and runs it: one lock a batch, not one a command,
 * so a poster rarely finds the lock taken (a futex wait and wake each time it does).
 * Until it finds the queue empty, posts do not wake it (draining). */
static void drain(flame_waker *w) {
  (void)w;
  for (;;) {
    uv_mutex_lock(&lock);
    cmd *c = head;
    head = tail = NULL;
    draining = c != NULL;                     /* posts meanwhile need not wake it */
    int stop = stopping && c == NULL;
    uv_mutex_unlock(&lock);
    if (stop) {
      uv_stop(&loop);
      return;
    }
    if (c == NULL) return;
    while (c) {
      cmd *next = c->next;                    /* a sync c is gone once done is set */
      c->fn(c->arg);
      if (c->sync) {
        uv_mutex_lock(&lock);
        c->done = 1;
        uv_cond_broadcast(&done_cond);
        uv_mutex_unlock(&lock);
      } else {
        free(c);
      }
      c = next;
    }
  }
}

static void close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (uv_is_closing(h)) return;
  flame_handle *fh = h->data;
  uv_close(h, h == (uv_handle_t *)&wake.poll || fh == NULL ? NULL : fh->on_close);
}

static void runtime_main(void *arg) {
  (void)arg;
  static flame_spin spin;                     /* the loop polls a while after each event */
  (void)flame_spin_start(&loop, &spin, &pool_live_calls);       /* else it sleeps: only slower */
  uv_run(&loop, UV_RUN_DEFAULT);
  flame_spin_close(&spin);          /* its handles are not flame handles */
  for (int i = 0; i < nat_stop; i++) at_stop[i]();
  uv_walk(&loop, close_walk, NULL);           /* what the process leaves at exit */
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) fprintf(stderr, "flame: the runtime loop still had handles\n");
  crypto_thread_end();                        /* the handshakes' HMACs left some */
}

static void stop_at_exit(void) {
  uv_mutex_lock(&lock);
  stopping = 1;
  uv_mutex_unlock(&lock);
  flame_waker_send(&wake);
  uv_thread_join(&thread);
}

static void start(void) {
  /* libcrypto first: its exit cleanup then runs after ours, which joins the thread */
  if (crypto_init() != 0) return;
  if (uv_mutex_init(&lock) != 0) return;
  if (uv_cond_init(&done_cond) != 0) return;
  if (uv_loop_init(&loop) != 0) return;
  int rc = flame_waker_init(&loop, &wake, drain);
  if (rc != 0) {
    if (wake.made) {
      flame_waker_close(&wake, NULL);
      uv_run(&loop, UV_RUN_DEFAULT);
    }
    uv_loop_close(&loop);
    return;
  }
  wake.poll.data = NULL;                      /* static: nothing to free */
  if (uv_thread_create(&thread, runtime_main, NULL) != 0) {
    flame_waker_close(&wake, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return;
  }
  if (atexit(stop_at_exit) != 0)
    fprintf(stderr, "flame: cannot register the runtime's stop at exit\n");
  started = 1;
}

static int post(cmd *c) {
  uv_once(&start_once, start);
  if (!started) return -1;
  uv_mutex_lock(&lock);
  if (stopping) {
    uv_mutex_unlock(&lock);
    return -1;
  }
  c->next = NULL;
  /* drain runs until the queue is empty: a command queued behind others, or while
   * it runs a batch, is found without waking the thread again (no system call
   * while it is behind) */
  int first = head == NULL && !draining;
  if (tail) tail->next = c;
  else head = c;
  tail = c;
  uv_mutex_unlock(&lock);
  if (first) flame_waker_send(&wake);
  return 0;
}

int runtime_post(runtime_fn fn, void *arg) {
  cmd *c = calloc(1, sizeof *c);
  if (c == NULL) return -1;
  c->fn = fn;
  c->arg = arg;
  if (post(c) != 0) {
    free(c);
    return -1;
  }
  return 0;
}

int runtime_call(runtime_fn fn, void *arg) {
  if (started && runtime_here()) {            /* already there: just call it */
    fn(arg);
    return 0;
  }
  cmd c = { NULL, fn, arg, 1, 0 };
  if (post(&c) != 0) return -1;
  uv_mutex_lock(&lock);
  while (!c.done) uv_cond_wait(&done_cond, &lock);
  uv_mutex_unlock(&lock);
  return 0;
}

void runtime_at_stop(void (*fn)(void)) {
  if (nat_stop < (int)(sizeof at_stop / sizeof *at_stop)) at_stop[nat_stop++] = fn;
}

uv_loop_t *runtime_loop(void) {
  return &loop;
}

int runtime_here(void) {
  uv_thread_t self = uv_thread_self();      /* thread is set before any command runs */
  return started && uv_thread_equal(&self, &thread);
}
