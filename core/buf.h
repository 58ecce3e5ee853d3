/*
 * buf.h - a growable byte buffer owned by C (malloc), used where bytes must outlive
 * a Lua state or cross threads. Growth failures are reported, never fatal: every
 * append returns 0 on success and -1 when memory ran out, leaving the buffer valid.
 */
#ifndef FLAME_BUF_H
#define FLAME_BUF_H

#include <stddef.h>

typedef struct buf {
  unsigned char *data;
  size_t len, cap;
} buf;

void buf_init(buf *b);
void buf_free(buf *b);
int buf_reserve(buf *b, size_t extra);
int buf_append(buf *b, const void *p, size_t n);
int buf_byte(buf *b, unsigned char c);

struct lua_State;
/* [-0, +1, m] A buf owned by a new userdata: freed by its __gc, so an error that
 * unwinds past its owner cannot leak it. */
buf *buf_box(struct lua_State *L);

/* Encoded bytes held by C for Lua ("flame.bytes", core.encode's `buffer` option):
 * `head` bytes of room in front of the data, for a header its consumer writes, so
 * the bytes reach a socket or a worker without a copy. A consumer takes them whole
 * (buf_take_arg); the userdata is then spent. #bytes is the data's length. */
typedef struct buf_bytes {
  buf b;
  size_t head;
  int spent;
} buf_bytes;

/* [-0, +1, m] A new, empty flame.bytes with head bytes of room. */
buf_bytes *buf_bytes_new(struct lua_State *L, size_t head);

/* [-0, +0, -] The payload at idx (a string, or a flame.bytes) into out, with head
 * bytes of room in front (left for the caller to fill): a flame.bytes made with that
 * room is moved (no copy) and spent, anything else is copied. 0; -1 and *err set
 * when idx is neither, already spent, or memory ran out (out is then empty). */
int buf_take_arg(struct lua_State *L, int idx, size_t head, buf *out, const char **err);

#endif
