/*
 * tls.h - TLS 1.3 for the link, keyed by the runner's secret: an external
 * pre-shared key (derived from the secret, named by the runner's ref) with an
 * ephemeral (EC)DHE key exchange, so each side proves it holds the secret, nobody
 * can relay the handshake, and a secret learnt later opens no recorded session.
 * No certificates. OpenSSL's libssl, through a BIO of its own over memory: no
 * socket here, so the caller's loop (link.c) moves the bytes and nothing ever
 * blocks.
 *
 * Contract:
 * - tls_client(ref, secret) / tls_server(lookup, ud): a connection's TLS state, or
 *   NULL with why. The server finds a client's secret by its ref with lookup
 *   (1 with the secret copied out, 0 when no runner with that ref is expected).
 * - tls_in gives it bytes from the socket, read where they lie: they must stay
 *   until tls_read has returned 0 or failed (bytes left unread then are dropped
 *   by the next tls_in). tls_read advances the handshake and returns plaintext:
 *   > 0 bytes, 0 when it needs more from the socket, -1 when the connection must
 *   close (why says why, for a person: "tls: ..."), -2 when the peer closed its
 *   TLS side.
 * - tls_write encrypts (after tls_ready only); tls_out hands over what must go to
 *   the socket (records, handshake messages, alerts), malloc'd, for the caller to
 *   write and free: its length, 0 when there is none, -1 when it is too long to
 *   tell (over LONG_MAX).
 * - Everything of one tls_conn on one thread; the shared contexts are made once.
 */
#ifndef FLAME_TLS_H
#define FLAME_TLS_H

#include <stddef.h>

#define TLS_SECRET_MAX 256

typedef struct tls_conn tls_conn;

typedef int (*tls_lookup_fn)(void *ud, const char *ref, unsigned char *secret, size_t *slen);

tls_conn *tls_client(const char *ref, const unsigned char *secret, size_t slen, char *why,
                     size_t whylen);
tls_conn *tls_server(tls_lookup_fn lookup, void *ud, char *why, size_t whylen);
void tls_free(tls_conn *t);

void tls_in(tls_conn *t, const void *p, size_t n);
long tls_read(tls_conn *t, void *out, size_t cap, char *why, size_t whylen);
int tls_ready(const tls_conn *t);
/* The ref the client named (server side, once known), or NULL. */
const char *tls_peer_ref(const tls_conn *t);
int tls_write(tls_conn *t, const void *p, size_t n, char *why, size_t whylen);
long tls_out(tls_conn *t, unsigned char **out);

/* Makes libssl's context of the parent's side (server) or the runner's (client)
 * now, once a process, so that the first handshake does not wait for it: the
 * client's is a thread's body (with libcrypto's first HMAC warmed too). */
void tls_warm_server(void *unused);
void tls_warm_client(void *unused);

/* A TLS alert record (fatal, handshake_failure) for a peer that started TLS where
 * it is not spoken: a client's library then says the handshake failed. */
extern const unsigned char tls_refusal_alert[7];

#endif
