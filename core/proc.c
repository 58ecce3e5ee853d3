/*
 * proc.c - child processes on a libuv loop, without Lua (contract in proc.h).
 *
 * A proc owns three handles: the process and its two output pipes. They close once
 * the process has ended and both pipes are done (a child of the child may hold
 * them after the exit), and the proc is freed when the last one has closed.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "buf.h"
#include "loop.h"
#include "proc.h"

extern char **environ;

typedef struct proc_pipe {
  flame_handle base;                /* first: a loop walk finds how to free it */
  uv_pipe_t pipe;
  struct proc *p;
  const char *name;                 /* "stdout" | "stderr" */
  buf line;                         /* the line read so far */
  int open;                         /* reading, its end not seen yet */
  int cut;                          /* a PROC_LINE_MAX piece just went out */
} proc_pipe;

struct proc {
  flame_handle base;
  uv_process_t h;
  proc_pipe out, err;
  proc_cbs cb;
  void *ctx;
  int exited, detached;
  int handles;                      /* handles not closed yet: process + pipes */
  /* Both pipes read into this: a read is consumed before on_read returns, and one
   * loop runs one callback at a time. Its size keeps a line cut in one read within
   * PROC_LINE_MAX. */
  char rbuf[PROC_LINE_MAX];
};

static void proc_release(proc *p) {
  if (--p->handles > 0) return;
  if (!p->detached && p->cb.on_done) p->cb.on_done(p->ctx);
  buf_free(&p->out.line);
  buf_free(&p->err.line);
  free(p);
}

static void handle_closed(uv_handle_t *h) {
  proc_release(h->type == UV_NAMED_PIPE ? ((proc_pipe *)h->data)->p : (proc *)h->data);
}

static void emit_line(proc_pipe *s, const char *line, size_t len) {
  proc *p = s->p;
  if (!p->detached && p->cb.on_output) p->cb.on_output(p->ctx, s->name, line, len);
}

static void maybe_close(proc *p) {
  if (!p->exited || p->out.open || p->err.open) return;
  if (!uv_is_closing((uv_handle_t *)&p->h)) uv_close((uv_handle_t *)&p->h, handle_closed);
}

static void pipe_done(proc_pipe *s) {
  if (!s->open) return;
  s->open = 0;
  if (s->line.len) emit_line(s, (const char *)s->line.data, s->line.len);
  s->line.len = 0;
  if (!uv_is_closing((uv_handle_t *)&s->pipe)) uv_close((uv_handle_t *)&s->pipe, handle_closed);
  maybe_close(s->p);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  (void)suggested;
  proc *p = ((proc_pipe *)h->data)->p;
  *b = uv_buf_init(p->rbuf, sizeof p->rbuf);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  proc_pipe *s = st->data;
  if (n < 0) {
    pipe_done(s);
    return;
  }
  const char *p = b->base, *end = b->base + n;
  while (p < end) {
    if (s->cut) {                   /* its '\n' ends the line cut, not an empty one, */
      s->cut = 0;                   /* whichever read it comes in */
      if (*p == '\n') {
        p++;
        continue;
      }
    }
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t take = nl ? (size_t)(nl - p) : (size_t)(end - p);
    if (nl && s->line.len == 0) {   /* a whole line in this read: no copy */
      emit_line(s, p, take);
      p = nl + 1;
      continue;
    }
    if (s->line.len + take > PROC_LINE_MAX) take = PROC_LINE_MAX - s->line.len;
    if (buf_append(&s->line, p, take) != 0) s->line.len = 0;   /* out of memory: dropped */
    p += take;
    if ((nl && p == nl) || s->line.len == PROC_LINE_MAX) {
      emit_line(s, (const char *)s->line.data, s->line.len);
      s->line.len = 0;
      if (nl && p == nl) p++;
      else s->cut = 1;
    }
  }
}

static void on_exit_cb(uv_process_t *h, int64_t code, int sig) {
  proc *p = h->data;
  p->exited = 1;
  if (!p->detached && p->cb.on_exit) p->cb.on_exit(p->ctx, code, sig);
  maybe_close(p);
}

static void errmsg(char *err, size_t errlen, const char *what, const char *path, int rc) {
  if (err && errlen) snprintf(err, errlen, "%s%s: %s (%s)", what, path, uv_strerror(rc),
                              uv_err_name(rc));
}

int proc_start(uv_loop_t *loop, const proc_opts *o, const proc_cbs *cb, void *ctx,
               proc **out, char *err, size_t errlen) {
  *out = NULL;
  proc *p = calloc(1, sizeof *p);
  if (p == NULL) {
    if (err && errlen) snprintf(err, errlen, "not enough memory");
    return UV_ENOMEM;
  }
  if (cb) p->cb = *cb;
  p->ctx = ctx;
  p->base.on_close = p->out.base.on_close = p->err.base.on_close = handle_closed;
  p->out.p = p->err.p = p;
  p->out.name = "stdout";
  p->err.name = "stderr";
  p->h.data = p;
  p->out.pipe.data = &p->out;
  p->err.pipe.data = &p->err;
  p->detached = 1;                  /* no callback until it has started */
  int rc = uv_pipe_init(loop, &p->out.pipe, 0);
  if (rc != 0) {
    free(p);
    if (err && errlen) snprintf(err, errlen, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return rc;
  }
  rc = uv_pipe_init(loop, &p->err.pipe, 0);
  if (rc != 0) {
    p->handles = 1;
    uv_close((uv_handle_t *)&p->out.pipe, handle_closed);
    if (err && errlen) snprintf(err, errlen, "%s: %s", uv_err_name(rc), uv_strerror(rc));
    return rc;
  }
  uv_stdio_container_t stdio[3];
  stdio[0].flags = UV_IGNORE;
  stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[1].data.stream = (uv_stream_t *)&p->out.pipe;
  stdio[2].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[2].data.stream = (uv_stream_t *)&p->err.pipe;
  uv_process_options_t opt;
  memset(&opt, 0, sizeof opt);
  opt.file = o->path;
  opt.args = (char **)o->argv;
  opt.env = (char **)o->envp;
  opt.cwd = o->cwd;
  opt.exit_cb = on_exit_cb;
  opt.stdio = stdio;
  opt.stdio_count = 3;
  if (o->group) opt.flags |= UV_PROCESS_DETACHED;   /* setsid(): a group of its own */
  p->handles = 3;
  rc = uv_spawn(loop, &p->h, &opt);
  if (rc != 0) {                    /* the process handle still has to be closed */
    uv_close((uv_handle_t *)&p->h, handle_closed);
    uv_close((uv_handle_t *)&p->out.pipe, handle_closed);
    uv_close((uv_handle_t *)&p->err.pipe, handle_closed);
    errmsg(err, errlen, "cannot start ", o->path, rc);
    return rc;
  }
  p->out.open = p->err.open = 1;
  rc = uv_read_start((uv_stream_t *)&p->out.pipe, on_alloc, on_read);
  if (rc == 0) rc = uv_read_start((uv_stream_t *)&p->err.pipe, on_alloc, on_read);
  if (rc != 0) {
    /* Started but deaf: end it rather than hand back a process whose output would
     * fill a pipe nobody reads. It stays watched (detached) until it is reaped. */
    if (o->group) uv_kill(-p->h.pid, SIGKILL);
    else uv_process_kill(&p->h, SIGKILL);
    pipe_done(&p->out);
    pipe_done(&p->err);
    errmsg(err, errlen, "cannot read the output of ", o->path, rc);
    return rc;
  }
  p->detached = 0;
  *out = p;
  return 0;
}

int proc_pid(const proc *p) {
  return p->h.pid;
}

int proc_exited(const proc *p) {
  return p->exited;
}

int proc_signal(proc *p, int sig, int group) {
  if (group) return uv_kill(-p->h.pid, sig);
  if (p->exited) return UV_ESRCH;
  return uv_process_kill(&p->h, sig);
}

void proc_detach(proc *p) {
  if (p) p->detached = 1;         /* freed by the last handle's close (proc_release) */
}

/* NAME of the entry e ("NAME=value") is one of names; an entry without '=' never. */
static int env_overridden(const char *e, const char *const *names, size_t n) {
  const char *eq = strchr(e, '=');
  if (eq == NULL) return 0;
  size_t len = (size_t)(eq - e);
  for (size_t i = 0; i < n; i++)
    if (strncmp(names[i], e, len) == 0 && names[i][len] == '\0') return 1;
  return 0;
}

char **proc_env(const char *const *names, const char *const *values, size_t n) {
  size_t count = n, bytes = 0;
  for (char **e = environ; *e; e++)
    if (!env_overridden(*e, names, n)) {
      count++;
      bytes += strlen(*e) + 1;
    }
  for (size_t i = 0; i < n; i++) bytes += strlen(names[i]) + 1 + strlen(values[i]) + 1;
  char **env = malloc((count + 1) * sizeof(char *) + bytes);
  if (env == NULL) return NULL;
  char *s = (char *)(env + count + 1);   /* the strings, after the pointers */
  size_t k = 0;
  for (char **e = environ; *e; e++) {
    if (env_overridden(*e, names, n)) continue;
    size_t len = strlen(*e) + 1;
    memcpy(s, *e, len);
    env[k++] = s;
    s += len;
  }
  for (size_t i = 0; i < n; i++) {
    size_t nl = strlen(names[i]), vl = strlen(values[i]);
    env[k++] = s;
    memcpy(s, names[i], nl);
    s[nl] = '=';
    memcpy(s + nl + 1, values[i], vl + 1);
    s += nl + 1 + vl + 1;
  }
  env[k] = NULL;
  return env;
}
