/*
 * runner.h - the parent's side of a runner's life, on the runtime thread (runner.c):
 * its boot through its backend state (init, remote_boot), its verdicts (handle_info,
 * a lost link with a short grace, its own REMOTE_SHUTDOWN), its stop (SHUTDOWN, the
 * link or executor closed), its release (the backend's remote_shutdown, then the
 * state closed after a linger) and its end (released and every process its backend
 * started gone), which a pool's shutdown waits for. pool.c keeps the slots and
 * calls; it tells this file when to boot, when a runner left the pool, and asks it
 * to stop runners; this file tells pool.c a boot's end and a runner's loss.
 *
 * Contract (runtime thread only):
 * - runner_boot(p, boot, is_min, count): a boot for pool.c's boot number; 0: it
 *   ends with exactly one pool_boot_up or pool_boot_failed, never before runner_boot
 *   has returned (it starts on a later turn of the loop); -1: memory or libuv
 *   refused, nothing started and nothing will be told.
 * - runner_shrunk(p, tid, why, count): pool.c took the runner out (idle, single
 *   use): it is stopped and released; on_shrink is told.
 * - runner_lost_slot(p, tid, why): a runner could not take a call: down with why,
 *   later on the loop (the caller is in the middle of pool.c's lists).
 * - runner_stop_all(p, why): every runner of the pool stopped, every boot in flight
 *   failed with why (pool.c has taken them out already).
 * - runner_on_lost(p, tid, reason), runner_on_remote_shutdown(p, tid, text): what
 *   the link told.
 * - runner_on_info(bk, msg), runner_on_procs(bk, n): what a backend state's
 *   services told (backend.c); msg is taken.
 * - runner_await_ended(p, bound_ms): "ended" goes to the application with the
 *   names of the runners still ending, once none is (names "") or after bound_ms.
 * Lua (hub methods): hub:boot_go(boot [, why]) lets a boot of a code_sync pool
 * start once the application has packed its code (or fail with why); hub:await_ended(bound_ms) as above.
 */
#ifndef FLAME_RUNNER_H
#define FLAME_RUNNER_H

#include <stdint.h>

#include <lua.h>

#include "buf.h"

typedef struct pool_rt pool_rt;
struct bval;

int runner_boot(pool_rt *p, uint64_t boot, int is_min, int count);
void runner_shrunk(pool_rt *p, int64_t tid, const char *why, int count);
void runner_lost_slot(pool_rt *p, int64_t tid, const char *why);
void runner_stop_all(pool_rt *p, const char *why);
void runner_on_lost(pool_rt *p, int64_t tid, const char *reason);
void runner_on_remote_shutdown(pool_rt *p, int64_t tid, const buf *text);
void runner_on_info(int64_t bkid, struct bval *msg);
void runner_on_procs(int64_t bkid, int n);
void runner_await_ended(pool_rt *p, double bound_ms);
/* the hub closes: a shutdown's wait for the runners' end is given up */
void runner_pool_closing(pool_rt *p);
/* the process exits (pool.c's at-stop, before the backend states close): no timer
 * of a runner fires again, no wait is answered, and a record goes once the last
 * backend call it made has ended (closed) */
void runner_at_stop(void);
void runner_lua_methods(lua_State *L);

/* pool.c, for runner.c */
struct hub;
struct hub *pool_hub(pool_rt *p);
const char *pool_name(const pool_rt *p);
int pool_is_closed(const pool_rt *p);
int pool_count(const pool_rt *p);
int pool_next_no(pool_rt *p);         /* 1, 2, ...: the pool's runners by boot */
/* the runner is in the pool: its count then; -1: the pool closed meanwhile */
int pool_boot_up(pool_rt *p, uint64_t boot, int64_t tid, int code, const char *name,
                 int64_t bkid);
void pool_boot_failed(pool_rt *p, uint64_t boot, const char *message);
/* its callers get "down" with reason; the count of runners left */
int pool_runner_down(pool_rt *p, int64_t tid, const char *reason, int quiet);

/* backend.c, for runner.c: a backend state made on the runtime thread (its id, or -1
 * with why), and closed (its calls waiting end with "closed"). */
struct hub;
int64_t backend_new(struct hub *h, const char *name, const void *spec, size_t slen,
                    const char *path, const char *runner, int is_min, char *err,
                    size_t errlen);
void backend_close(int64_t id);

/* bsvc_link.c, for runner.c: the pool's boot_config table (NULL until set); a
 * terminator handle of state bk (1 found, 0 not); a state's boot failed (its wait
 * ends, later runners refused, the runners it met let go). */
const struct bval *blink_config(struct hub *h);
int blink_term(int64_t bkid, int64_t handle, int64_t *tid, int *local, int64_t *code);
void blink_fail(struct hub *h, int64_t bkid, const char *reason);

#endif
