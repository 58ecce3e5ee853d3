/*
 * parent_fuzz.c - libFuzzer target for parent_decode (core/parent.c), the runner's
 * reading of FLAME_PARENT: outside bytes, from whatever started the runner. Every
 * input must give a record whose fields hold what parent.h promises, or a message.
 * The first byte picks the mode: odd, the rest is base64-encoded first (so it is
 * the JSON document and reaches cJSON and the checks); even, the rest is the value
 * itself (the base64 layer). Its bits 1-2 pick the room given for the message.
 * Run with scripts/fuzz SECONDS.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "link.h"
#include "parent.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static int timeish(int64_t v) {                      /* ms, or forever */
  return v == PARENT_FOREVER || (v >= 0 && v <= (int64_t)9e15);
}

static int count(int64_t v, int64_t min) {
  return v >= min && v <= (int64_t)9e15;
}

static void check_record(const parent *p) {
  CHECK(p->v == PARENT_PROTOCOL);
  CHECK(p->ref != NULL && strlen(p->ref) >= 8);
  CHECK(p->secret_len >= 1 && p->secret_len <= PARENT_SECRET_MAX);
  CHECK(p->naddrs >= 1 && p->naddrs <= PARENT_ADDRS_MAX);
  for (int i = 0; i < PARENT_ADDRS_MAX; i++) {
    if (i >= p->naddrs) {
      CHECK(p->addrs[i] == NULL);
      continue;
    }
    char host[256];
    int port = -1;
    CHECK(p->addrs[i] != NULL);
    CHECK(link_split_hostport(p->addrs[i], host, sizeof host, &port) == 0);
    CHECK(host[0] != '\0' && port >= 0 && port <= 65535);
  }
  CHECK(p->backend != NULL && strlen(p->backend) < 64 * 1024);
  /* the optional strings: NULL or a string no longer than the value */
  CHECK(p->node_base == NULL || strlen(p->node_base) < 64 * 1024);
  CHECK(p->host_env == NULL || strlen(p->host_env) < 64 * 1024);
  CHECK(p->flame_vsn == NULL || strlen(p->flame_vsn) < 64 * 1024);
  const parent_settings *s = &p->settings;
  CHECK(s->max_concurrency >= 1 && s->max_concurrency <= 4096);
  CHECK(timeish(s->shutdown_timeout));
  CHECK(timeish(s->idle_shutdown_after));
  CHECK(timeish(s->failsafe_timeout));
  CHECK(count(s->heartbeat_interval, 1));
  CHECK(count(s->heartbeat_misses, 1));
  /* the handshake's window, interval x misses, is far from overflow */
  CHECK(s->heartbeat_interval <= (int64_t)9e15 / s->heartbeat_misses);
  CHECK(count(s->max_message, 1));
  CHECK(s->profile == SANDBOX_APPLICATION || s->profile == SANDBOX_RESTRICTED);
  CHECK(count(s->memory_limit, 0));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t rooms[] = { 256, 2, 17, 1024 };
  if (size == 0) return 0;
  unsigned mode = data[0];
  data++;
  size--;
  char *value;
  if (mode & 1) {
    value = malloc(crypto_b64_size(size));
    if (value == NULL) return 0;
    long n = crypto_b64encode(data, size, value);
    CHECK(n >= 0);
    value[n] = '\0';
  } else {
    value = malloc(size + 1);
    if (value == NULL) return 0;
    memcpy(value, data, size);
    value[size] = '\0';
  }
  size_t whylen = rooms[(mode >> 1) & 3];
  char why[1024];
  memset(why, 0xa5, sizeof why);
  parent p;
  if (parent_decode(value, &p, why, whylen) == 0) {
    check_record(&p);
  } else {
    CHECK(memchr(why, '\0', whylen) != NULL);        /* a string, within its room */
    CHECK(why[0] != '\0');                           /* that says something */
    for (size_t i = whylen; i < sizeof why; i++) CHECK((unsigned char)why[i] == 0xa5);
  }
  parent_free(&p);                                   /* after a failure too, as callers do */
  free(value);
  return 0;
}
