/*
 * parent.h - FLAME_PARENT on the runner: what a runner needs to find and trust its
 * parent, decoded from base64 of a JSON document (docs/protocol.md; made on the
 * parent by lua/flame/parent.lua) and checked, with cJSON.
 *
 * Contract: parent_decode is total: any string gives a record or a message saying
 * what is wrong ("it has no ref", "protocol version 2, this runner speaks 1 ..."),
 * never a crash. Times are milliseconds, PARENT_FOREVER standing for JSON's -1.
 */
#ifndef FLAME_PARENT_H
#define FLAME_PARENT_H

#include <stddef.h>
#include <stdint.h>

#include "sandbox.h"
#include "wire.h"

#define PARENT_PROTOCOL WIRE_PROTOCOL
#define PARENT_FOREVER INT64_MAX
#define PARENT_ADDRS_MAX 16
#define PARENT_SECRET_MAX 256

typedef struct parent_settings {
  int64_t max_concurrency, shutdown_timeout, idle_shutdown_after, failsafe_timeout;
  int64_t heartbeat_interval, heartbeat_misses, max_message;
  sandbox_profile profile;
  int64_t memory_limit;
  int idle_check;                        /* the pool sends an idle check (CONFIG) */
  int code_sync;                         /* the pool sends a code pack (CODE) first */
} parent_settings;

typedef struct parent {
  int v;
  char *ref, *backend, *node_base, *host_env, *flame_vsn;   /* host_env, flame_vsn: or NULL */
  unsigned char secret[PARENT_SECRET_MAX];
  size_t secret_len;
  char *addrs[PARENT_ADDRS_MAX];
  int naddrs;
  int tls;                               /* the link speaks TLS (tls.h); absent: no */
  parent_settings settings;
} parent;

/* 0, or -1 with why (a message of at most whylen bytes) filled in. */
int parent_decode(const char *value, parent *p, char *why, size_t whylen);
void parent_free(parent *p);

#endif
