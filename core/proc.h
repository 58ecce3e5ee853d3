/*
 * proc.h - child processes for backends, in C, on any libuv loop (the application's,
 * or the runtime thread's): spawn with arguments and environment, stdout and stderr
 * delivered line by line, exit reported once. The Lua binding is proc_lua.c.
 *
 * Contract:
 * - proc_start starts o->path with o->argv (argv[0] is path, NULL-terminated) and
 *   o->envp (NULL: this process's environment), in o->cwd (NULL: ours); o->group
 *   makes the child the leader of a new session and process group (setsid), so
 *   what it leaves behind can be signalled with it. stdin is /dev/null. 0 and *out;
 *   or a libuv error code (< 0), nothing started and no callback ever, with a
 *   message in err ("cannot start PATH: no such file or directory (ENOENT)").
 * - Output: each line of stdout and stderr, without its '\n', to on_output; a line
 *   longer than PROC_LINE_MAX comes in PROC_LINE_MAX pieces (its '\n' ends the last
 *   piece: a line of exactly k pieces is k lines), and an unterminated last line
 *   when its pipe ends. line is only valid during the call.
 * - on_exit(code, signal) exactly once, when the process has ended. Output still
 *   held by its own children may follow.
 * - on_done, last and once: the process has ended and both pipes are done (or the
 *   loop is being closed: then on_exit may never have come). p is freed when
 *   on_done returns, so the owner lets go of it there.
 * - proc_detach: the owner lets go early; no callback after it returns (it may be
 *   called from a callback). The process stays watched until it exits and its pipes
 *   close, then everything is freed. An owner whose ctx is freed by something else
 *   (its own handle closing in a loop walk) detaches first.
 * - Any callback may be NULL. Everything, callbacks included, runs on the loop's
 *   thread, inside uv_run.
 * - Handles: every uv handle here has a struct starting with flame_handle (loop.h)
 *   in its data, so closing the loop by walking its handles frees them.
 */
#ifndef FLAME_PROC_H
#define FLAME_PROC_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define PROC_LINE_MAX (64 * 1024)

typedef struct proc proc;

typedef struct proc_cbs {
  void (*on_output)(void *ctx, const char *stream /* "stdout" | "stderr" */,
                    const char *line, size_t len);
  void (*on_exit)(void *ctx, int64_t code, int signal);
  void (*on_done)(void *ctx);
} proc_cbs;

typedef struct proc_opts {
  const char *path;
  char *const *argv;
  char *const *envp;
  const char *cwd;
  int group;
} proc_opts;

int proc_start(uv_loop_t *loop, const proc_opts *o, const proc_cbs *cb, void *ctx,
               proc **out, char *err, size_t errlen);

int proc_pid(const proc *p);
/* 1 once on_exit's moment has come (set just before it is called). */
int proc_exited(const proc *p);

/* Sends sig to the process, or to its process group when group is set (which also
 * works after the exit, while members of the group live). 0 or a libuv error;
 * UV_ESRCH after the exit without group (the pid may be someone else's by then). */
int proc_signal(proc *p, int sig, int group);

void proc_detach(proc *p);

/* An environment for proc_opts.envp: this process's environ with NAME=value for
 * each of the n names (distinct; they replace an inherited NAME), everything copied
 * into one malloc'd block: free() it, any time after proc_start. NULL when out of
 * memory. Reads environ as getenv does: not safe against a concurrent setenv. */
char **proc_env(const char *const *names, const char *const *values, size_t n);

#endif
