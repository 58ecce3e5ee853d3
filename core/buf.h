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

#endif
