/*
 * runtime.h - the runtime thread: a libuv loop of its own, beside the application's
 * thread, so that what must keep time (heartbeats, handshakes, links) runs while the
 * application's Lua code computes.
 *
 * Contract:
 * - runtime_post(fn, arg) runs fn(arg) on the runtime thread, after what was posted
 *   before it (one queue, FIFO). The thread and its loop start with the first post.
 *   Returns 0, or -1 when the thread cannot be started (fn is then not called).
 * - runtime_call(fn, arg) posts and waits until fn has returned: for the few
 *   commands whose answer the caller needs at once (listen: the port).
 * - runtime_loop() is the runtime's loop: use it on the runtime thread only.
 * - At process exit (atexit) the thread runs the runtime_at_stop functions, closes
 *   what is left on its loop and is joined, so nothing runs while the process tears
 *   down.
 * Threads share nothing but the queue. Lock: the queue's mutex, a leaf.
 */
#ifndef FLAME_RUNTIME_H
#define FLAME_RUNTIME_H

#include <uv.h>

typedef void (*runtime_fn)(void *arg);

int runtime_post(runtime_fn fn, void *arg);
int runtime_call(runtime_fn fn, void *arg);
uv_loop_t *runtime_loop(void);
/* fn runs on the runtime thread when it stops (process exit), before what is left
 * on its loop is closed: for what must end first (executors' workers). At most 4. */
void runtime_at_stop(void (*fn)(void));
/* Nonzero on the runtime thread. */
int runtime_here(void);

#endif
