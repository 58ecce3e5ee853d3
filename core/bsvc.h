/*
 * bsvc.h - what a service of the backend environment works with (backend.c
 * serves requests by name; bsvc_*.c implement them). A request arrives on the
 * runtime thread as (bk, co, args, n); the service answers it exactly once with
 * bk_answer (now or later, from a callback on the runtime loop), which resumes
 * coroutine co with the values.
 *
 * Contract (runtime thread only):
 * - A service takes args (bval_list_free them, or keep them); it may answer before
 *   it returns. It is never called for a state that is closing.
 * - bk_answer takes the values; bk_answer_bool answers one boolean; bk_fail answers
 *   nil and a message.
 * - What lives on after the answer (a timer, a process, a request) is a bk_res of
 *   the state: its close function runs when the state closes, and must leave no
 *   callback that touches the state. A resource removes itself when it ends.
 * - Handles the backend holds (a process, a stream) are ids in the state's handle
 *   table: bk_handle_new gives one (above 2^32, apart from the pool's Lua's),
 *   bk_handle_get finds it by id and kind.
 * - bk_info(b, msg) gives handle_info a message (a process exit, a timer's message);
 *   bk_log logs a line as the pool's logger; bk_procs counts the processes the
 *   backend started that still run (a shutdown waits for them).
 */
#ifndef FLAME_BSVC_H
#define FLAME_BSVC_H

#include <stdint.h>

#include <uv.h>

#include "bval.h"

typedef struct bk bk;

typedef struct bk_res {
  struct bk_res *next, **pprev;
  void (*close)(struct bk_res *r);  /* the state is closing: end, touch b no more */
} bk_res;

typedef void (*bk_service)(bk *b, int64_t co, bval *args, int n);

uv_loop_t *bk_loop(void);
void bk_answer(bk *b, int64_t co, bval *vals, int n);
void bk_answer_bool(bk *b, int64_t co, int v);
void bk_fail(bk *b, int64_t co, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void bk_info(bk *b, bval *msg);
void bk_log(bk *b, const char *level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void bk_procs(bk *b, int delta);
const char *bk_runner(const bk *b);
/* The state's hub, id and whether its runner keeps the pool's min; bk_link is
 * bsvc_link.c's slot for what it keeps of the state (NULL until it needs one).
 * bk_find: the open state with that id, or NULL. */
struct hub;
struct blink;
struct hub *bk_hub(bk *b);
int64_t bk_id(const bk *b);
int bk_is_min(const bk *b);
struct blink **bk_link(bk *b);
bk *bk_find(int64_t id);

void bk_res_add(bk *b, bk_res *r);
void bk_res_remove(bk_res *r);

int64_t bk_handle_new(bk *b, int kind, void *obj);
void *bk_handle_get(bk *b, int64_t id, int kind);
void bk_handle_drop(bk *b, int64_t id);

enum { BK_H_PROCESS = 1, BK_H_STREAM, BK_H_TERM };

/* A table answer, built field by field: 0, or -1 out of memory (t holds what it
 * had). */
int bk_table_set_str(bval *t, const char *k, const char *v, size_t len);
int bk_table_set_int(bval *t, const char *k, lua_Integer v);
int bk_table_set_bool(bval *t, const char *k, int v);
int bk_table_set(bval *t, const char *k, bval *v);   /* takes v */

/* The services, by file. */
void bsvc_sleep(bk *b, int64_t co, bval *args, int n);
void bsvc_send_after(bk *b, int64_t co, bval *args, int n);
void bsvc_exit(bk *b, int64_t co, bval *args, int n);
void bsvc_log(bk *b, int64_t co, bval *args, int n);
void bsvc_proc_spawn(bk *b, int64_t co, bval *args, int n);
void bsvc_proc_run(bk *b, int64_t co, bval *args, int n);
void bsvc_proc_kill(bk *b, int64_t co, bval *args, int n);
void bsvc_proc_exited(bk *b, int64_t co, bval *args, int n);
void bsvc_http_request(bk *b, int64_t co, bval *args, int n);
void bsvc_http_watch(bk *b, int64_t co, bval *args, int n);
void bsvc_http_stream(bk *b, int64_t co, bval *args, int n);
void bsvc_stream_read(bk *b, int64_t co, bval *args, int n);
void bsvc_stream_close(bk *b, int64_t co, bval *args, int n);
void bsvc_parent_new(bk *b, int64_t co, bval *args, int n);
void bsvc_await_remote_up(bk *b, int64_t co, bval *args, int n);
void bsvc_local_terminator(bk *b, int64_t co, bval *args, int n);
void bsvc_spawn_monitor(bk *b, int64_t co, bval *args, int n);
void bsvc_config(bk *b, int64_t co, bval *args, int n);
void bsvc_flame_bin(bk *b, int64_t co, bval *args, int n);
void bsvc_code_paths(bk *b, int64_t co, bval *args, int n);

#endif
