/*
 * pack_fuzz.c - libFuzzer target for pack_parse (core/pack.c), the runner's reading
 * of a code pack: bytes from the parent, after the handshake. Every input must be
 * refused with a message, or give entries whose paths a runner may write (relative,
 * no empty, "." or ".." part, no NUL or backslash), in strictly increasing order,
 * whose contents lie inside the input; a check alone and a walk must agree.
 * Run with scripts/fuzz SECONDS.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "pack.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

typedef struct walk {
  const uint8_t *data;
  size_t size;
  const char *prev;
  size_t prev_len;
  long n;
} walk;

static int visit(void *ud, const pack_entry *e) {
  walk *w = ud;
  CHECK(e->path_len >= 1 && e->path_len <= PACK_PATH_MAX);
  CHECK((const uint8_t *)e->path >= w->data && (const uint8_t *)e->path + e->path_len <= w->data + w->size);
  CHECK(e->data >= w->data && e->size <= (uint64_t)(w->data + w->size - e->data));
  CHECK(e->exec == 0 || e->exec == 1);
  CHECK(e->path[0] != '/' && e->path[e->path_len - 1] != '/');
  size_t start = 0;
  for (size_t i = 0; i <= e->path_len; i++) {
    if (i < e->path_len) CHECK(e->path[i] != '\0' && e->path[i] != '\\');
    if (i == e->path_len || e->path[i] == '/') {
      size_t len = i - start;
      CHECK(len > 0);
      CHECK(!(len == 1 && e->path[start] == '.'));
      CHECK(!(len == 2 && e->path[start] == '.' && e->path[start + 1] == '.'));
      start = i + 1;
    }
  }
  if (w->prev) {
    size_t m = w->prev_len < e->path_len ? w->prev_len : e->path_len;
    int c = memcmp(w->prev, e->path, m);
    CHECK(c < 0 || (c == 0 && w->prev_len < e->path_len));
  }
  w->prev = e->path;
  w->prev_len = e->path_len;
  w->n++;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char why[256];
  memset(why, 0, sizeof why);
  int checked = pack_parse(data, size, NULL, NULL, why, sizeof why);
  walk w = { data, size, NULL, 0, 0 };
  int walked = pack_parse(data, size, visit, &w, why, sizeof why);
  CHECK(checked == walked);
  CHECK(checked == 0 || checked == -1);
  if (checked != 0) {
    CHECK(w.n == 0);                                 /* nothing seen of a bad pack */
    CHECK(why[0] != '\0' && memchr(why, '\0', sizeof why) != NULL);
  } else {
    CHECK(size >= PACK_HEADER && w.n <= PACK_FILES_MAX);
  }
  return 0;
}
