/*
 * spec/support/uv_fail.c - a shim the specs preload (H.uv_fail_shim) to make libuv
 * refuse a handle: while the file $SHIM_DIR/fail_poll exists, uv_poll_start fails
 * with UV_ENOMEM; fail_timer does the same to uv_timer_start, fail_check to
 * uv_check_start. Otherwise each calls libuv's own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <uv.h>

/* libuv comes with flame/core.so, loaded RTLD_LOCAL: RTLD_NEXT does not see it */
static void *real_fn(const char *name) {
  void *uv = dlopen("libuv.so.1", RTLD_LAZY | RTLD_NOLOAD);
  return uv ? dlsym(uv, name) : NULL;
}

static int failing(const char *name) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", getenv("SHIM_DIR"), name);
  return access(path, F_OK) == 0;
}

int uv_poll_start(uv_poll_t *h, int events, uv_poll_cb cb) {
  int (*real)(uv_poll_t *, int, uv_poll_cb);
  if (failing("fail_poll")) return UV_ENOMEM;
  *(void **)&real = real_fn("uv_poll_start");
  return real(h, events, cb);
}

int uv_timer_start(uv_timer_t *h, uv_timer_cb cb, uint64_t timeout, uint64_t repeat) {
  int (*real)(uv_timer_t *, uv_timer_cb, uint64_t, uint64_t);
  if (failing("fail_timer")) return UV_ENOMEM;
  *(void **)&real = real_fn("uv_timer_start");
  return real(h, cb, timeout, repeat);
}

int uv_check_start(uv_check_t *h, uv_check_cb cb) {
  int (*real)(uv_check_t *, uv_check_cb);
  if (failing("fail_check")) return UV_ENOMEM;
  *(void **)&real = real_fn("uv_check_start");
  return real(h, cb);
}
