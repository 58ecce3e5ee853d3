/*
 * wire.h - the link protocol's message types and the handshake's pieces, shared by
 * both ends in C: the parent's hub (hub.c) and the runner's terminator
 * (terminator.c). Message layouts: docs/protocol.md; the types are core.wire for
 * Lua (binding.c), which the specs' own copy (spec/support/wire.lua) is checked
 * against.
 */
#ifndef FLAME_WIRE_H
#define FLAME_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>

#include "crypto.h"

#define WIRE_PROTOCOL 1
#define WIRE_NONCE 16                    /* bytes of each side's nonce */

enum {
  WIRE_HELLO = 1, WIRE_CHALLENGE = 2, WIRE_PROOF = 3, WIRE_REMOTE_UP = 4, WIRE_SPAWN = 5,
  WIRE_RESULT = 6, WIRE_KILL = 7, WIRE_SHUTDOWN = 9, WIRE_REMOTE_SHUTDOWN = 10,
  WIRE_PING = 11, WIRE_CONFIG = 13, WIRE_CLOSE = 14, WIRE_CODE = 15
};

/* CODE (code_sync): parent -> runner, the pack's SHA-256 (32 bytes) and the pack
 * (pack.h), once, right after REMOTE_UP; runner -> parent, once it is unpacked (and
 * the workers can start), "o" and the SHA-256 in hex, or "e" and why not. */

/* SPAWN's payload: a header of the deadline (u64 little-endian, ms; 0 is none) and
 * the link flag (u8), then the work's codec bytes. */
#define WIRE_SPAWN_HEADER 9

/* Writes SPAWN's header into out: timeout_ms < 0 is no deadline. */
void wire_spawn_header(unsigned char out[WIRE_SPAWN_HEADER], int64_t timeout_ms, int link);

/* Reads SPAWN's header from a payload of len bytes: 0, or -1 when it is shorter than
 * the header. *timeout_ms 0 is no deadline; *link is 1 only for the byte 1. */
int wire_spawn_parse(const unsigned char *data, size_t len, uint64_t *timeout_ms, int *link);

/* One end's heartbeat count (both ends keep one): messages heard at the last tick,
 * and silent ticks in a row. Ticks, not milliseconds: a late tick of a busy loop
 * runs before the waiting messages are read, and must not blame the peer. */
typedef struct wire_heartbeat {
  uint64_t heard;
  int64_t missed;
} wire_heartbeat;

/* A tick, msgs being the messages received so far: 1 when misses ticks in a row
 * heard nothing, with why ("no heartbeat from the WHO for N intervals of M ms")
 * filled in; else 0. */
int wire_heartbeat_tick(wire_heartbeat *hb, uint64_t msgs, int64_t misses, int64_t interval,
                        const char *who, char *why, size_t whylen);

/* "HELLO", ..., or NULL for a type the protocol does not have. */
const char *wire_type_name(int type);

/* "protocol: unexpected TYPE<what>" into out, naming the type or its number. */
void wire_unexpected(char *out, size_t outlen, int type, const char *what);

/* A side's proof: HMAC-SHA256(secret, role 0 ref 0 nonce) over the other side's
 * nonce, bound to the runner's ref and to the role ("parent", "runner"). 0, or -1. */
int wire_proof(const unsigned char *secret, size_t slen, const char *role, const char *ref,
               const unsigned char *nonce, size_t nlen, unsigned char out[CRYPTO_HMAC_LEN]);

/* A base64 string field of a JSON object decoded into out (room bytes): its length,
 * or -1 when the field is missing, not a string, too long, or not base64. */
long wire_b64_field(const cJSON *doc, const char *name, unsigned char *out, size_t room);

#endif
