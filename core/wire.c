/*
 * wire.c - message names and the handshake's proof, for both ends (wire.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

const char *wire_type_name(int type) {
  static const char *const names[] = {
    NULL, "HELLO", "CHALLENGE", "PROOF", "REMOTE_UP", "SPAWN", "RESULT", "KILL", NULL,
    "SHUTDOWN", "REMOTE_SHUTDOWN", "PING", NULL, "CONFIG", "CLOSE", "CODE"
  };
  return type >= 0 && type < (int)(sizeof names / sizeof names[0]) ? names[type] : NULL;
}

int wire_heartbeat_tick(wire_heartbeat *hb, uint64_t msgs, int64_t misses, int64_t interval,
                        const char *who, char *why, size_t whylen) {
  if (msgs != hb->heard) {
    hb->heard = msgs;
    hb->missed = 0;
    return 0;
  }
  if (++hb->missed < misses) return 0;
  snprintf(why, whylen, "no heartbeat from the %s for %lld intervals of %lld ms", who,
           (long long)hb->missed, (long long)interval);
  return 1;
}

void wire_unexpected(char *out, size_t outlen, int type, const char *what) {
  const char *name = wire_type_name(type);
  if (name) snprintf(out, outlen, "protocol: unexpected %s%s", name, what);
  else snprintf(out, outlen, "protocol: unexpected %d%s", type, what);
}

int wire_proof(const unsigned char *secret, size_t slen, const char *role, const char *ref,
               const unsigned char *nonce, size_t nlen, unsigned char out[CRYPTO_HMAC_LEN]) {
  size_t rl = strlen(role), fl = strlen(ref), n = rl + 1 + fl + 1 + nlen;
  unsigned char *d = malloc(n);
  if (d == NULL) return -1;
  memcpy(d, role, rl + 1);                   /* the NULs are the separators */
  memcpy(d + rl + 1, ref, fl + 1);
  memcpy(d + rl + fl + 2, nonce, nlen);
  int rc = crypto_hmac_sha256(secret, slen, d, n, out);
  free(d);
  return rc;
}

long wire_b64_field(const cJSON *doc, const char *name, unsigned char *out, size_t room) {
  const cJSON *f = cJSON_GetObjectItemCaseSensitive(doc, name);
  if (!cJSON_IsString(f)) return -1;
  size_t len = strlen(f->valuestring);
  if (len / 4 * 3 > room) return -1;
  return crypto_b64decode(f->valuestring, len, out);
}

void wire_spawn_header(unsigned char out[WIRE_SPAWN_HEADER], int64_t timeout_ms, int link) {
  uint64_t t = timeout_ms < 0 ? 0 : (uint64_t)(timeout_ms < 1 ? 1 : timeout_ms);
  for (int i = 0; i < 8; i++) out[i] = (unsigned char)(t >> (8 * i));
  out[8] = link ? 1 : 0;
}

int wire_spawn_parse(const unsigned char *data, size_t len, uint64_t *timeout_ms, int *link) {
  if (len < WIRE_SPAWN_HEADER) return -1;
  uint64_t t = 0;
  for (int i = 0; i < 8; i++) t |= (uint64_t)data[i] << (8 * i);
  *timeout_ms = t;
  *link = data[8] == 1;
  return 0;
}
