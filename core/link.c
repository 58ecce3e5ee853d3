/*
 * link.c - framed messages over TCP (contract in link.h, wire in docs/protocol.md).
 * Writes: short messages (one chunk) wait in one queue, long ones in another; at most
 * LINK_WRITES_MAX writes are in flight, and the short queue is served first, so a
 * heartbeat or a small call never waits behind a 64 MB result. Each chunk is written
 * as two buffers, its header and its slice of the message: no copy on the way out;
 * the chunks queued while writes were in flight leave together, in one write.
 * Reads land in the connection's own buffer (made at the first read) and are
 * parsed before on_read returns; the rest of a long chunk is read straight into
 * its message's buffer. Finishing writes what is queued, then shuts the
 * write side down (FIN) and reads, discarding, until the peer closes: closing a
 * socket with unread data makes the kernel send a reset, and a reset can destroy
 * the last results still on their way.
 * TLS (tls.c), when a connection has it: bytes read are fed to it and what it
 * decrypts is parsed as above (no reads in place); writes are sealed into records
 * (short frames of one write share records) and the ciphertext is what is written.
 * A listening side that may get TLS tells it by the peer's first byte (a TLS
 * handshake record starts with 22; a HELLO frame cannot).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flame.h"
#include "link.h"
#include "loop.h"
#include "tls.h"

#define LINK_WRITES_MAX 2           /* writes in flight: small messages jump ahead */
#define LINK_BATCH 32               /* chunks in one write: short messages queued while
                                       writes were in flight leave in one system call */
#define LINK_READ (64 * 1024)
#define LINK_DIRECT (16 * 1024)     /* a chunk's rest this long is read in place */
#define LINK_RECORD (16 * 1024)     /* TLS: short frames are sealed together up to this */
#define TLS_HANDSHAKE_BYTE 0x16     /* a TLS record of the handshake starts with it */

enum { SNIFF_NONE, SNIFF_REQUIRE, SNIFF_REFUSE };

typedef struct outmsg {
  struct outmsg *next;
  unsigned char type;
  uint64_t id;
  unsigned char *data;
  size_t len, off;                  /* off: bytes queued to the socket so far */
  int pending;                      /* chunk writes not yet completed */
} outmsg;

/* One write: up to LINK_BATCH chunks, each its header and its slice. */
typedef struct wreq {
  uv_write_t req;
  unsigned char *cipher;            /* TLS: the write's bytes, freed with it */
  int n;
  outmsg *msg[LINK_BATCH];
  unsigned char header[LINK_BATCH][LINK_HEADER];
} wreq;

typedef struct partial {
  struct partial *next;
  unsigned char type;
  uint64_t id;
  buf data;
} partial;

struct link_conn {
  flame_handle base;                /* first: a Lua loop's close walk frees through it */
  uv_tcp_t tcp;
  const link_handlers *h;
  void *ud;
  void (*on_connect)(link_conn *c, void *ud, int status);
  outmsg *small, *small_tail, *big, *big_tail;
  int writes;                       /* write requests in flight */
  size_t queued;                    /* bytes queued and not yet written */
  unsigned char head[LINK_HEADER];
  size_t head_have;
  size_t chunk_len, chunk_have;
  unsigned char type, flags;
  uint64_t id;
  partial *cur;                     /* the message the current chunk belongs to */
  partial *partials;
  int npartials, max_partials;
  size_t max_message;
  int closing, finishing;           /* finishing: close once the queue is written */
  int reading, shutting;            /* reading started; write side being shut down */
  uv_shutdown_t sreq;
  char *rbuf;                       /* LINK_READ bytes, made at the first read */
  char reason[LINK_REASON_MAX];
  tls_conn *tls;                    /* TLS on this connection, or NULL */
  int sniff;                        /* a listening side's choice by the first byte */
  tls_lookup_fn tls_lookup;
  void *tls_ud;
  unsigned char *pbuf;              /* TLS: what it decrypted, LINK_READ bytes */
};

struct link_listener {
  flame_handle base;
  uv_tcp_t tcp;
  void (*on_accept)(link_listener *l, void *ud, link_conn *c);
  void (*on_closed)(void *ud);
  void *ud;
};

typedef struct creq {
  uv_connect_t req;
  link_conn *c;
} creq;

static void put_u32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* ------------------------------------------------------------ connections ---- */

static void msgs_free(outmsg *m) {
  while (m) {
    outmsg *next = m->next;
    free(m->data);
    free(m);
    m = next;
  }
}

static void conn_free(uv_handle_t *h) {
  link_conn *c = h->data;
  if (c->h && c->h->on_close) c->h->on_close(c, c->ud, c->reason[0] ? c->reason : "closed");
  msgs_free(c->small);
  msgs_free(c->big);
  free(c->rbuf);
  free(c->pbuf);
  tls_free(c->tls);
  for (partial *p = c->partials; p;) {
    partial *next = p->next;
    buf_free(&p->data);
    free(p);
    p = next;
  }
  free(c);
}

void link_close(link_conn *c, const char *reason) {
  if (c->closing) return;
  c->closing = 1;
  if (reason && !c->reason[0]) snprintf(c->reason, sizeof c->reason, "%s", reason);
  uv_read_stop((uv_stream_t *)&c->tcp);
  uv_close((uv_handle_t *)&c->tcp, conn_free);
}

static void conn_fail(link_conn *c, const char *what, int err) {
  char r[LINK_REASON_MAX];
  snprintf(r, sizeof r, "%s: %s", what, uv_err_name(err));
  link_close(c, r);
}

static void pump(link_conn *c);
static void finish_writes(link_conn *c);

static void on_shutdown(uv_shutdown_t *req, int status) {
  link_conn *c = req->handle->data;
  if (status < 0 && status != UV_ECANCELED) conn_fail(c, "shutdown", status);
}

/* Everything queued is written: FIN, then the peer's close ends it (read on). A
 * connection that never read cannot hear that close: it closes now. */
static void finish_writes(link_conn *c) {
  if (c->shutting || c->closing) return;
  c->shutting = 1;
  if (!c->reading || uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
    link_close(c, NULL);
}

/* A chunk of m written (or cancelled): m is freed after its last. */
static void chunk_done(outmsg *m) {
  if (--m->pending == 0 && m->off == m->len) {
    free(m->data);
    free(m);
  }
}

static void on_write(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  link_conn *c = req->handle->data;
  for (int i = 0; i < w->n; i++) chunk_done(w->msg[i]);
  free(w->cipher);
  free(w);
  c->writes--;
  if (status < 0) {
    if (status != UV_ECANCELED) conn_fail(c, "write", status);
    return;
  }
  pump(c);
}

/* The next chunk to write, or NULL: whole short messages first, then the next chunk
 * of the oldest long one. Takes it off the queues when it is the message's last and
 * fills in its header. */
static outmsg *next_chunk(link_conn *c, unsigned char *header, uv_buf_t *data) {
  int from_small = c->small != NULL;
  outmsg *m = from_small ? c->small : c->big;
  if (m == NULL) return NULL;
  size_t n = m->len - m->off;
  if (n > LINK_CHUNK) n = LINK_CHUNK;
  int last = m->off + n == m->len;
  put_u32(header, (uint32_t)n);
  header[4] = m->type;
  header[5] = last ? 1 : 0;
  put_u64(header + 6, m->id);
  *data = uv_buf_init((char *)m->data + m->off, (unsigned)n);
  m->off += n;
  m->pending++;
  c->queued -= n;
  if (last) {                       /* the message leaves its queue; freed on write */
    if (from_small) {
      c->small = m->next;
      if (!c->small) c->small_tail = NULL;
    } else {
      c->big = m->next;
      if (!c->big) c->big_tail = NULL;
    }
  }
  return m;
}

/* TLS: encrypts a write's buffers (frames shorter than a record share one) and
 * makes the write its ciphertext, one buffer; the messages' bytes are copied, so
 * their chunks are done now. 0, or -1 with the connection closing (w freed). */
static int seal(link_conn *c, wreq *w, uv_buf_t *bufs, unsigned *nb) {
  unsigned char stage[LINK_RECORD];
  size_t have = 0;
  char why[LINK_REASON_MAX];
  int rc = 0;
  for (unsigned i = 0; i < *nb && rc == 0; i++) {
    const unsigned char *p = (const unsigned char *)bufs[i].base;
    size_t n = bufs[i].len;
    if (have + n > sizeof stage && have > 0) {
      rc = tls_write(c->tls, stage, have, why, sizeof why);
      have = 0;
    }
    if (rc != 0) break;
    if (n <= sizeof stage) {
      memcpy(stage + have, p, n);
      have += n;
    } else {
      rc = tls_write(c->tls, p, n, why, sizeof why);
    }
  }
  if (rc == 0 && have > 0) rc = tls_write(c->tls, stage, have, why, sizeof why);
  for (int i = 0; i < w->n; i++) chunk_done(w->msg[i]);
  w->n = 0;
  long len = rc == 0 ? tls_out(c->tls, &w->cipher) : 0;
  if (rc != 0 || len <= 0) {
    free(w->cipher);
    free(w);
    link_close(c, rc != 0 ? why : "not enough memory");
    return -1;
  }
  bufs[0] = uv_buf_init((char *)w->cipher, (unsigned)len);
  *nb = 1;
  return 0;
}

/* Writes bytes as they are (TLS's handshake messages and alerts; taken). 0, or -1
 * with the connection closing. */
static int write_raw(link_conn *c, unsigned char *bytes, size_t n) {
  wreq *w = malloc(sizeof *w);
  if (w == NULL) {
    free(bytes);
    link_close(c, "not enough memory");
    return -1;
  }
  w->cipher = bytes;
  w->n = 0;
  uv_buf_t b = uv_buf_init((char *)bytes, (unsigned)n);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc != 0) {
    free(bytes);
    free(w);
    conn_fail(c, "write", rc);
    return -1;
  }
  c->writes++;
  return 0;
}

/* What TLS has for the socket, written. 0, or -1 with the connection closing. */
static int tls_flush(link_conn *c) {
  unsigned char *out;
  long n = tls_out(c->tls, &out);
  if (n < 0) {
    link_close(c, "not enough memory");
    return -1;
  }
  return n == 0 ? 0 : write_raw(c, out, (size_t)n);
}

/* Starts writes while fewer than LINK_WRITES_MAX are in flight. A write takes what
 * the queues hold, up to LINK_BATCH chunks and at most one chunk of a long message,
 * so a burst of results (or calls) queued behind the writes in flight goes out in
 * one system call, and a long message still interleaves with short ones. */
static void pump(link_conn *c) {
  /* frames wait for the handshake, and where TLS is required, for the peer's first
   * byte (a frame in clear to a TLS peer would only garble its handshake) */
  if ((c->tls && !tls_ready(c->tls)) || c->sniff == SNIFF_REQUIRE) {
    if (c->finishing && !c->closing) link_close(c, NULL);   /* nothing can go out safely */
    return;
  }
  while (!c->closing && c->writes < LINK_WRITES_MAX) {
    if (c->small == NULL && c->big == NULL) {
      if (c->finishing && c->writes == 0) finish_writes(c);
      return;
    }
    wreq *w = malloc(sizeof *w);
    if (w == NULL) {
      link_close(c, "not enough memory");
      return;
    }
    w->cipher = NULL;
    uv_buf_t bufs[2 * LINK_BATCH];
    unsigned nb = 0;
    w->n = 0;
    while (w->n < LINK_BATCH) {
      int long_one = c->small == NULL;
      uv_buf_t data;
      unsigned char *header = w->header[w->n];
      outmsg *m = next_chunk(c, header, &data);
      if (m == NULL) break;
      w->msg[w->n++] = m;
      bufs[nb++] = uv_buf_init((char *)header, LINK_HEADER);
      if (data.len) bufs[nb++] = data;
      if (long_one) break;          /* one chunk of a long message a write */
    }
    if (c->tls && seal(c, w, bufs, &nb) != 0) return;
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs, nb, on_write);
    if (rc != 0) {
      for (int i = 0; i < w->n; i++) chunk_done(w->msg[i]);
      free(w->cipher);
      free(w);
      conn_fail(c, "write", rc);
      return;
    }
    c->writes++;
  }
}

/* Queues a message whose bytes are already the connection's to free. */
static int enqueue(link_conn *c, int type, uint64_t id, unsigned char *data, size_t len) {
  outmsg *m = calloc(1, sizeof *m);
  if (m == NULL) {
    free(data);
    return -2;
  }
  m->type = (unsigned char)type;
  m->id = id;
  m->data = data;
  m->len = len;
  outmsg **head = len <= LINK_CHUNK ? &c->small : &c->big;
  outmsg **tail = len <= LINK_CHUNK ? &c->small_tail : &c->big_tail;
  if (*tail) (*tail)->next = m;
  else *head = m;
  *tail = m;
  c->queued += len;                 /* an empty message is one empty last chunk */
  pump(c);
  return 0;
}

int link_send(link_conn *c, int type, uint64_t id, const void *prefix, size_t plen,
              const void *payload, size_t len) {
  if (c->closing || c->finishing) return -1;
  if (len > SIZE_MAX - plen) return -2;
  size_t total = plen + len;
  unsigned char *data = NULL;
  if (total) {
    if ((data = malloc(total)) == NULL) return -2;
    if (plen) memcpy(data, prefix, plen);
    if (len) memcpy(data + plen, payload, len);
  }
  return enqueue(c, type, id, data, total);
}

int link_send_buf(link_conn *c, int type, uint64_t id, buf *b) {
  unsigned char *data = b->data;
  size_t len = b->len;
  b->data = NULL;
  b->len = b->cap = 0;
  if (c->closing || c->finishing) {
    free(data);
    return -1;
  }
  return enqueue(c, type, id, data, len);
}

static partial *partial_find(link_conn *c, unsigned char type, uint64_t id) {
  for (partial *p = c->partials; p; p = p->next)
    if (p->type == type && p->id == id) return p;
  return NULL;
}

static void partial_drop(link_conn *c, partial *p) {
  for (partial **q = &c->partials; *q; q = &(*q)->next) {
    if (*q == p) {
      *q = p->next;
      break;
    }
  }
  c->npartials--;
  buf_free(&p->data);
  free(p);
}

/* A whole message, to its handler. Returns 0 when the connection may go on. */
static int deliver(link_conn *c, partial *p) {
  if (c->h && c->h->on_message) c->h->on_message(c, c->ud, p->type, p->id, &p->data);
  partial_drop(c, p);
  return c->closing || c->finishing ? -1 : 0;
}

static int chunk_got(link_conn *c, size_t take);

/* Parses bytes as they arrive; any violation closes this connection only. */
static void parse(link_conn *c, const unsigned char *p, size_t n) {
  while (n > 0 && !c->closing && !c->finishing) {
    if (c->head_have < LINK_HEADER) {
      size_t take = LINK_HEADER - c->head_have;
      if (take > n) take = n;
      memcpy(c->head + c->head_have, p, take);
      c->head_have += take;
      p += take;
      n -= take;
      if (c->head_have < LINK_HEADER) return;
      c->chunk_len = (size_t)c->head[0] | (size_t)c->head[1] << 8 | (size_t)c->head[2] << 16
                     | (size_t)c->head[3] << 24;
      c->type = c->head[4];
      c->flags = c->head[5];
      c->id = get_u64(c->head + 6);
      c->chunk_have = 0;
      if (c->chunk_len > LINK_CHUNK) {
        link_close(c, "protocol: frame too large");
        return;
      }
      if (c->flags & ~1u) {
        link_close(c, "protocol: bad frame flags");
        return;
      }
      c->cur = partial_find(c, c->type, c->id);
      if (c->cur == NULL) {
        if (c->npartials >= c->max_partials) {
          link_close(c, "protocol: too many messages at once");
          return;
        }
        c->cur = calloc(1, sizeof *c->cur);
        if (c->cur == NULL) {
          link_close(c, "not enough memory");
          return;
        }
        c->cur->type = c->type;
        c->cur->id = c->id;
        c->cur->next = c->partials;
        c->partials = c->cur;
        c->npartials++;
      }
      if (c->cur->data.len + c->chunk_len > c->max_message) {
        link_close(c, "protocol: message too large");
        return;
      }
      if (buf_reserve(&c->cur->data, c->chunk_len) != 0) {
        link_close(c, "not enough memory");
        return;
      }
    }
    size_t take = c->chunk_len - c->chunk_have;
    if (take > n) take = n;
    if (take) buf_append(&c->cur->data, p, take);   /* reserved above: cannot fail */
    p += take;
    n -= take;
    if (chunk_got(c, take) != 0) return;
  }
}

/* take more bytes of the current chunk are in its message's buffer; a whole chunk
 * ends (and a last one delivers its message). Returns 0 when reading may go on. */
static int chunk_got(link_conn *c, size_t take) {
  c->chunk_have += take;
  if (c->chunk_have < c->chunk_len) return 0;
  c->head_have = 0;
  partial *done = c->cur;
  c->cur = NULL;
  if ((c->flags & 1u) && deliver(c, done) != 0) return -1;
  return 0;
}

/* A listening side's first byte from the peer: TLS or not, as it must be. 0 when
 * the connection goes on (with TLS made, or in clear), -1 when it is refused. */
static int sniff(link_conn *c, const unsigned char *first) {
  /* the first byte alone, so the choice never depends on how the bytes were split:
   * a HELLO frame's is its length's low byte, and a HELLO (a version, a ref of 20
   * characters, a nonce) is about 100 bytes: never 22 */
  int mode = c->sniff, tls = first[0] == TLS_HANDSHAKE_BYTE;
  c->sniff = SNIFF_NONE;
  if (mode == SNIFF_REQUIRE && !tls) return 0;   /* its HELLO is refused, in clear, with why */
  if (mode == SNIFF_REFUSE && tls) {
    /* its TLS library hears a handshake failure; the log here says why */
    unsigned char *alert = malloc(sizeof tls_refusal_alert);
    if (alert) {
      memcpy(alert, tls_refusal_alert, sizeof tls_refusal_alert);
      write_raw(c, alert, sizeof tls_refusal_alert);
    }
    link_finish(c, "tls: the runner started TLS, and this link does not speak it "
                "(the pool's link.tls is off): the runner was told otherwise");
    return -1;
  }
  if (!tls) return 0;
  char why[LINK_REASON_MAX];
  if ((c->tls = tls_server(c->tls_lookup, c->tls_ud, why, sizeof why)) == NULL) {
    link_close(c, why);
    return -1;
  }
  return 0;
}

/* TLS: ciphertext in; what it decrypts is parsed; its answers go out; frames
 * queued before the handshake ended go once it has. */
static void tls_feed(link_conn *c, const unsigned char *p, size_t n) {
  if (c->pbuf == NULL && (c->pbuf = malloc(LINK_READ)) == NULL) {
    link_close(c, "not enough memory");
    return;
  }
  tls_in(c->tls, p, n);
  int was_ready = tls_ready(c->tls);
  char why[LINK_REASON_MAX];
  for (;;) {
    long got = tls_read(c->tls, c->pbuf, LINK_READ, why, sizeof why);
    if (got < 0) {                    /* its reason first, then its alert, if any */
      if (!c->reason[0])
        snprintf(c->reason, sizeof c->reason, "%s", got == -2 ? "closed by peer" : why);
      tls_flush(c);
      link_close(c, NULL);
      break;
    }
    /* what TLS answered (a Finished) goes before any frame a handler sends, and
     * before a finish can shut the write side down */
    if (tls_flush(c) != 0 || got == 0) break;
    parse(c, c->pbuf, (size_t)got);
    if (c->closing || c->finishing) break;
  }
  tls_in(c->tls, NULL, 0);            /* the bytes were read where they lay: no more */
  if (!c->closing && !was_ready && tls_ready(c->tls)) pump(c);
}

/* Reads land in rbuf, except the rest of a long chunk: that is read straight into
 * its message's buffer (reserved when its header came), so a large frame is not
 * copied once more on its way in. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  (void)suggested;
  link_conn *c = h->data;
  size_t rest = c->cur && c->head_have == LINK_HEADER ? c->chunk_len - c->chunk_have : 0;
  if (rest >= LINK_DIRECT && !c->closing && !c->finishing && c->tls == NULL
      && c->sniff == SNIFF_NONE) {
    buf *d = &c->cur->data;
    *b = uv_buf_init((char *)d->data + d->len, (unsigned)rest);
    return;
  }
  if (c->rbuf == NULL) c->rbuf = malloc(LINK_READ);
  *b = uv_buf_init(c->rbuf, c->rbuf ? LINK_READ : 0);   /* 0: libuv reports ENOBUFS */
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  link_conn *c = s->data;
  flame_spin_touch();                 /* more is likely soon: the loop need not sleep */
  if (nread == UV_EOF) {
    link_close(c, "closed by peer");
    return;
  }
  if (nread < 0) {
    conn_fail(c, "read", (int)nread);
    return;
  }
  if (c->finishing) return;           /* read to let the peer's bytes go, not used */
  if (nread == 0) return;
  if (c->sniff != SNIFF_NONE && sniff(c, (const unsigned char *)b->base) != 0) return;
  if (c->tls) {
    tls_feed(c, (const unsigned char *)b->base, (size_t)nread);
    return;
  }
  if (b->base != c->rbuf) {           /* into the current chunk's place (on_alloc) */
    c->cur->data.len += (size_t)nread;
    chunk_got(c, (size_t)nread);
    return;
  }
  parse(c, (const unsigned char *)b->base, (size_t)nread);
}

static link_conn *conn_alloc(uv_loop_t *loop, int *err) {
  link_conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    *err = UV_ENOMEM;
    return NULL;
  }
  c->base.on_close = conn_free;
  c->max_message = (size_t)1 << 30;
  c->max_partials = LINK_PARTIALS_MAX;
  int rc = uv_tcp_init(loop, &c->tcp);
  if (rc != 0) {
    free(c);
    *err = rc;
    return NULL;
  }
  c->tcp.data = c;
  return c;
}

void link_set_handlers(link_conn *c, const link_handlers *h, void *ud) {
  c->h = h;
  c->ud = ud;
}

int link_start(link_conn *c, const link_handlers *h, void *ud, size_t max_message) {
  link_set_handlers(c, h, ud);
  if (max_message) c->max_message = max_message;
  if (c->closing) return -1;
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc != 0 && rc != UV_EALREADY) {
    conn_fail(c, "read", rc);
    return -1;
  }
  c->reading = 1;
  return 0;
}

void link_limits(link_conn *c, size_t max_message, int max_partials) {
  c->max_message = max_message;
  if (max_partials >= 1 && max_partials <= LINK_PARTIALS_MAX) c->max_partials = max_partials;
}

int link_tls_client(link_conn *c, const char *ref, const unsigned char *secret, size_t slen) {
  char why[LINK_REASON_MAX];
  if (c->closing) return -1;
  if ((c->tls = tls_client(ref, secret, slen, why, sizeof why)) == NULL) {
    link_close(c, why);
    return -1;
  }
  long got = tls_read(c->tls, NULL, 0, why, sizeof why);    /* the ClientHello */
  if (got < 0) {
    link_close(c, why);
    return -1;
  }
  return tls_flush(c);
}

void link_tls_server(link_conn *c, int require, tls_lookup_fn lookup, void *ud) {
  c->sniff = require ? SNIFF_REQUIRE : SNIFF_REFUSE;
  c->tls_lookup = lookup;
  c->tls_ud = ud;
}

int link_tls_active(const link_conn *c) {
  return c->tls != NULL && tls_ready(c->tls);
}

const char *link_tls_ref(const link_conn *c) {
  return c->tls ? tls_peer_ref(c->tls) : NULL;
}

void link_finish(link_conn *c, const char *reason) {
  if (c->closing || c->finishing) return;
  if (!c->reason[0]) snprintf(c->reason, sizeof c->reason, "%s", reason ? reason : "closed");
  c->finishing = 1;                 /* reading goes on: see finish_writes */
  pump(c);
}

int link_closing(const link_conn *c) {
  return c->closing || c->finishing;
}

int link_closed(const link_conn *c) {
  return c->closing;
}

void link_on_connect(link_conn *c, void (*cb)(link_conn *c, void *ud, int status), void *ud) {
  c->on_connect = cb;
  c->ud = ud;
}

size_t link_queued(const link_conn *c) {
  return c->queued;
}

static void addr_name(const struct sockaddr_storage *sa, char *ip, size_t iplen, int *port) {
  snprintf(ip, iplen, "?");
  *port = 0;
  if (sa->ss_family == AF_INET) {
    uv_ip4_name((const struct sockaddr_in *)sa, ip, iplen);
    *port = ntohs(((const struct sockaddr_in *)sa)->sin_port);
  } else if (sa->ss_family == AF_INET6) {
    uv_ip6_name((const struct sockaddr_in6 *)sa, ip, iplen);
    *port = ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
  }
}

void link_peer(link_conn *c, char *ip, size_t iplen, int *port) {
  struct sockaddr_storage sa;
  int len = sizeof sa;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &len) != 0) sa.ss_family = AF_UNSPEC;
  addr_name(&sa, ip, iplen, port);
}

/* --------------------------------------------------------------- connect ---- */

static void on_connect(uv_connect_t *req, int status) {
  creq *r = (creq *)req;
  link_conn *c = r->c;
  free(r);
  if (status == 0) uv_tcp_nodelay(&c->tcp, 1);   /* best effort: latency, not safety */
  void (*cb)(link_conn *, void *, int) = c->on_connect;
  c->on_connect = NULL;
  if (status != 0) conn_fail(c, "connect", status);
  if (cb) cb(c, c->ud, status);
}

link_conn *link_connect(uv_loop_t *loop, const struct sockaddr *addr,
                        void (*cb)(link_conn *c, void *ud, int status), void *ud,
                        int *err) {
  creq *r = calloc(1, sizeof *r);
  if (r == NULL) {
    *err = UV_ENOMEM;
    return NULL;
  }
  link_conn *c = conn_alloc(loop, err);
  if (c == NULL) {
    free(r);
    return NULL;
  }
  r->c = c;
  c->on_connect = cb;
  c->ud = ud;
  int rc = uv_tcp_connect(&r->req, &c->tcp, addr, on_connect);
  if (rc != 0) {
    free(r);
    c->on_connect = NULL;
    c->ud = NULL;
    link_close(c, "connect failed");  /* no handlers: freed quietly */
    *err = rc;
    return NULL;
  }
  return c;
}

/* ------------------------------------------------------------- listeners ---- */

static void listener_free(uv_handle_t *h) {
  link_listener *l = h->data;
  if (l->on_closed) l->on_closed(l->ud);
  free(l);
}

static void closed_free(uv_handle_t *h) {
  free(h);
}

/* A connection nobody can take now: accepted and closed, so the backlog moves. */
static void refuse_pending(uv_stream_t *s) {
  uv_tcp_t *t = malloc(sizeof *t);
  if (t == NULL) return;
  if (uv_tcp_init(s->loop, t) != 0) {
    free(t);
    return;
  }
  t->data = NULL;
  if (uv_accept(s, (uv_stream_t *)t) != 0) { /* nothing to take: just close it */ }
  uv_close((uv_handle_t *)t, closed_free);
}

static void on_connection(uv_stream_t *s, int status) {
  link_listener *l = s->data;
  if (status < 0) return;
  int err = 0;
  link_conn *c = conn_alloc(s->loop, &err);
  if (c == NULL) {
    refuse_pending(s);
    return;
  }
  int rc = uv_accept(s, (uv_stream_t *)&c->tcp);
  if (rc != 0) {
    link_close(c, "accept failed");
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  l->on_accept(l, l->ud, c);
}

link_listener *link_listen(uv_loop_t *loop, const struct sockaddr *addr,
                           void (*on_accept)(link_listener *l, void *ud, link_conn *c),
                           void *ud, int *err) {
  link_listener *l = calloc(1, sizeof *l);
  if (l == NULL) {
    *err = UV_ENOMEM;
    return NULL;
  }
  l->base.on_close = listener_free;
  l->on_accept = on_accept;
  l->ud = ud;
  int rc = uv_tcp_init(loop, &l->tcp);
  if (rc != 0) {
    free(l);
    *err = rc;
    return NULL;
  }
  l->tcp.data = l;
  if ((rc = uv_tcp_bind(&l->tcp, addr, 0)) != 0
      || (rc = uv_listen((uv_stream_t *)&l->tcp, 128, on_connection)) != 0) {
    uv_close((uv_handle_t *)&l->tcp, listener_free);
    *err = rc;
    return NULL;
  }
  return l;
}

int link_listener_address(link_listener *l, char *ip, size_t iplen, int *port) {
  struct sockaddr_storage sa;
  int len = sizeof sa;
  int rc = uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&sa, &len);
  if (rc != 0) return rc;
  addr_name(&sa, ip, iplen, port);
  return 0;
}

void link_listener_close(link_listener *l, void (*on_closed)(void *ud)) {
  l->on_closed = on_closed;
  if (!uv_is_closing((uv_handle_t *)&l->tcp)) uv_close((uv_handle_t *)&l->tcp, listener_free);
}

/* ------------------------------------------------------------- addresses ---- */

int link_addr(const char *ip, int port, struct sockaddr_storage *sa) {
  memset(sa, 0, sizeof *sa);
  if (port < 0 || port > 65535) return -1;
  if (uv_ip4_addr(ip, port, (struct sockaddr_in *)sa) == 0) return 0;
  if (uv_ip6_addr(ip, port, (struct sockaddr_in6 *)sa) == 0) return 0;
  return -1;
}

int link_split_hostport(const char *s, char *host, size_t hostlen, int *port) {
  const char *colon = strrchr(s, ':');
  if (colon == NULL || colon == s || colon[1] == '\0') return -1;
  const char *h = s;
  size_t hlen = (size_t)(colon - s);
  int bracketed = h[0] == '[';
  if (bracketed) {                           /* [v6]:port */
    if (hlen < 2 || h[hlen - 1] != ']') return -1;
    h++;
    hlen -= 2;
  }
  if (hlen == 0 || hlen >= hostlen) return -1;
  memcpy(host, h, hlen);
  host[hlen] = '\0';
  long p = 0;
  for (const char *c = colon + 1; *c; c++) {
    if (*c < '0' || *c > '9' || p > 65535) return -1;
    p = p * 10 + (*c - '0');
  }
  if (p > 65535) return -1;
  *port = (int)p;
  struct sockaddr_storage sa;
  if (link_addr(host, 0, &sa) == 0) return 0;   /* an IP address */
  if (bracketed) return -1;
  for (const char *c = host; *c; c++)            /* or a host name */
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9')
          || *c == '-' || *c == '.'))
      return -1;
  return 0;
}

int link_parse_hostport(const char *s, struct sockaddr_storage *sa) {
  char host[256];
  int port;
  if (link_split_hostport(s, host, sizeof host, &port) != 0) return -1;
  return link_addr(host, port, sa);
}
