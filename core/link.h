/*
 * link.h - framed messages over TCP between a parent and its runners, in C: the
 * runner's terminator uses it directly, the Lua binding (link_lua.c) wraps it.
 *
 * Contract:
 * - A connection delivers whole messages to on_message and its end, once, to
 *   on_close (when libuv has let go of the socket; the connection is freed right
 *   after on_close returns, so the pointer is dead from then on).
 * - on_message gets the message in a buf it may keep: take msg->data (and set it to
 *   NULL) to own the bytes without a copy; otherwise they are freed after the call.
 * - link_send queues a copy of prefix and payload; link_send_buf takes the buffer's
 *   bytes without copying. Messages longer than one chunk (LINK_CHUNK) go out chunk
 *   by chunk, and a short message is sent before the next chunk of a long one.
 * - Wire: a frame is a 14-byte header (u32 chunk length, u8 type, u8 flags with
 *   bit 0 = last chunk, u64 id; little endian) and the chunk. A chunk over LINK_CHUNK,
 *   a message over max_message, or more messages in reassembly than max_partials is
 *   a protocol error: that connection closes (reason "protocol: ..."), nothing else.
 * - Errors of libuv calls close the connection with the libuv error name.
 * - Everything runs on the thread of the loop the connection was made on.
 * Handles: every uv handle here has a flame_handle first in its data, so a Lua
 * state's loop can close what is left at exit.
 */
#ifndef FLAME_LINK_H
#define FLAME_LINK_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "tls.h"

#define LINK_HEADER 14
#define LINK_CHUNK (256 * 1024)
#define LINK_PARTIALS_MAX 64
#define LINK_REASON_MAX 160

typedef struct link_conn link_conn;
typedef struct link_listener link_listener;

typedef struct link_handlers {
  void (*on_message)(link_conn *c, void *ud, int type, uint64_t id, buf *msg);
  void (*on_close)(link_conn *c, void *ud, const char *reason);
} link_handlers;

/* Connects; on_connect(c, ud, status) is called once (status 0 or a libuv error;
 * on error the connection then closes by itself, with on_close if handlers were
 * set). NULL with *err set when the attempt cannot even start. */
link_conn *link_connect(uv_loop_t *loop, const struct sockaddr *addr,
                        void (*on_connect)(link_conn *c, void *ud, int status), void *ud,
                        int *err);

/* Starts reading: messages and the end go to h with ud. */
int link_start(link_conn *c, const link_handlers *h, void *ud, size_t max_message);
void link_set_handlers(link_conn *c, const link_handlers *h, void *ud);

/* 0; -1 when the connection is closing or finishing; -2 out of memory. */
int link_send(link_conn *c, int type, uint64_t id, const void *prefix, size_t plen,
              const void *payload, size_t len);
int link_send_buf(link_conn *c, int type, uint64_t id, buf *b);

/* TLS (tls.h) on a connection, before anything is sent on it:
 * - link_tls_client: as a runner, keyed by its ref and secret; the handshake starts
 *   now, and frames sent meanwhile wait for it. 0, or -1 (the connection closes
 *   with why).
 * - link_tls_server: as the parent, on an accepted connection before link_start:
 *   the peer's first byte tells whether it starts TLS. require: TLS is expected
 *   (lookup finds a runner's secret by its ref), and a peer in clear goes on in
 *   clear (link_tls_active says so; its HELLO is to be refused, in clear, so that it
 *   learns why); else a peer that starts TLS is refused with a TLS alert and the
 *   reason "tls: ...".
 * - link_tls_active: the handshake is done and every byte from now is protected.
 * - link_tls_ref: the ref a TLS peer's key was named by (parent side), or NULL.
 * A TLS failure (a wrong key, bytes changed on the way) closes the connection
 * with a reason starting "tls: ". */
int link_tls_client(link_conn *c, const char *ref, const unsigned char *secret, size_t slen);
void link_tls_server(link_conn *c, int require, tls_lookup_fn lookup, void *ud);
int link_tls_active(const link_conn *c);
const char *link_tls_ref(const link_conn *c);

/* What a peer may make this side hold (a parent keeps it small until the peer has
 * authenticated). */
void link_limits(link_conn *c, size_t max_message, int max_partials);
void link_close(link_conn *c, const char *reason);
/* A last word: what is queued is written, the write side shut down (FIN), and the
 * connection closes when the peer closes its side. Bound the wait with a timer of
 * your own (link_close) when the peer may not. */
void link_finish(link_conn *c, const char *reason);
/* Closing or finishing: nothing more can be sent. */
int link_closing(const link_conn *c);
/* Closing: the socket is on its way out. */
int link_closed(const link_conn *c);
/* Sets (or replaces) the connect callback of a connection still connecting. */
void link_on_connect(link_conn *c, void (*on_connect)(link_conn *c, void *ud, int status),
                     void *ud);
size_t link_queued(const link_conn *c);
/* The peer's ip and port ("?" and 0 when unknown). */
void link_peer(link_conn *c, char *ip, size_t iplen, int *port);

/* Listens; on_accept(l, ud, c) gets each new connection, which it must start or
 * close. NULL with *err set on failure. */
link_listener *link_listen(uv_loop_t *loop, const struct sockaddr *addr,
                           void (*on_accept)(link_listener *l, void *ud, link_conn *c),
                           void *ud, int *err);
int link_listener_address(link_listener *l, char *ip, size_t iplen, int *port);
/* Stops listening; on_closed(ud) is called once the handle is gone. */
void link_listener_close(link_listener *l, void (*on_closed)(void *ud));

/* "host:port" or "[v6]:port" split: 0 with host (NUL-terminated) and port, or -1
 * when malformed. A host is an IP address or a name of letters, digits, '-', '.'. */
int link_split_hostport(const char *s, char *host, size_t hostlen, int *port);
/* "ip:port" or "[v6]:port" into a socket address: 0, or -1 when malformed or when
 * the host is a name (resolve those with uv_getaddrinfo). */
int link_parse_hostport(const char *s, struct sockaddr_storage *sa);
/* An ip and port into a socket address: 0, or -1 when the ip is not an address. */
int link_addr(const char *ip, int port, struct sockaddr_storage *sa);

#endif
