/*
 * codec_bench.c - encode and decode throughput of the codec beside memcpy of the same
 * bytes, in one run on one machine. Run through bench/codec; prints a table.
 * Each figure is the best of several rounds (the least disturbed by other load).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "buf.h"
#include "codec.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct workload {
  const char *name;
  const char *make;       /* Lua chunk returning the value to encode */
  int reps;               /* encodes/decodes per round */
} workload;

static const workload workloads[] = {
  { "closure capturing a 1 MB string",
    "local s = string.rep('x', 1 << 20) return function() return #s end", 200 },
  { "table of 100k entries",
    "local t = {} for i = 1, 100000 do t['key' .. i] = i * 0.5 end return t", 10 },
  { "10k small closures",
    "local fs = {} for i = 1, 10000 do fs[i] = function() return i end end return fs", 10 },
  /* each encode of a table looks it up among the modules (by name): a program's
   * package.loaded holds tens of them */
  { "small table, 40 modules loaded",
    "for i = 1, 40 do local m = {} for j = 1, 20 do m['f' .. j] = function() end end "
    "package.loaded['bench_mod' .. i] = m end "
    "return { name = 'frame', w = 1920, h = 1080, tags = { 'a', 'b' }, q = 0.9 }", 200000 },
  /* a closure holding 20 modules in locals, as Lua code does; modules no file made
   * travel by name (before modules by name: by value, 20 functions each) */
  { "closure capturing 20 modules",
    "local ms = {} for i = 1, 20 do local m = {} for j = 1, 20 do m['f' .. j] = function() end "
    "end package.loaded['bench_cap' .. i] = m ms[i] = m end "
    "return function() return ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], ms[7], ms[8], ms[9], "
    "ms[10], ms[11], ms[12], ms[13], ms[14], ms[15], ms[16], ms[17], ms[18], ms[19], ms[20] end",
    20000 },
};

#define ROUNDS 5

static void fail(lua_State *L, const char *what) {
  fprintf(stderr, "bench: %s: %s\n", what, lua_tostring(L, -1));
  exit(1);
}

int main(void) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return 1;
  luaL_openlibs(L);
  codec_opts o;
  codec_opts_init(&o);
  printf("%-34s %10s %12s %12s %12s %10s %10s\n", "workload", "bytes", "encode MB/s",
         "decode MB/s", "memcpy MB/s", "encode us", "decode us");
  for (size_t w = 0; w < sizeof workloads / sizeof *workloads; w++) {
    const workload *wl = &workloads[w];
    if (luaL_dostring(L, wl->make) != LUA_OK) fail(L, "workload");
    int v = lua_gettop(L);
    buf b;
    buf_init(&b);
    double enc = 1e30, dec = 1e30, cpy = 1e30;
    for (int r = 0; r < ROUNDS; r++) {
      double t0 = now();
      for (int i = 0; i < wl->reps; i++) {
        b.len = 0;
        lua_pushvalue(L, v);
        if (codec_encode(L, 1, &o, &b) != 0) fail(L, "encode");
      }
      double t1 = now();
      for (int i = 0; i < wl->reps; i++) {
        if (codec_decode(L, (const char *)b.data, b.len, &o) != 1) fail(L, "decode");
        lua_pop(L, 1);
      }
      double t2 = now();
      lua_gc(L, LUA_GCCOLLECT);
      char *dst = malloc(b.len);
      if (dst == NULL) return 1;
      double t3 = now();
      for (int i = 0; i < wl->reps; i++) {
        memcpy(dst, b.data, b.len);
        __asm__ volatile("" : : "r"(dst) : "memory");   /* keep the copy */
      }
      double t4 = now();
      free(dst);
      if (t1 - t0 < enc) enc = t1 - t0;
      if (t2 - t1 < dec) dec = t2 - t1;
      if (t4 - t3 < cpy) cpy = t4 - t3;
    }
    double mb = (double)b.len * wl->reps / 1e6;
    /* MB/s hides a workload that got smaller: the time of one encode says it */
    printf("%-34s %10zu %12.0f %12.0f %12.0f %10.2f %10.2f\n", wl->name, b.len, mb / enc,
           mb / dec, mb / cpy, enc / wl->reps * 1e6, dec / wl->reps * 1e6);
    buf_free(&b);
    lua_settop(L, 0);
  }
  lua_close(L);
  return 0;
}
