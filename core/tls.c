/*
 * tls.c - TLS 1.3 keyed by the runner's secret (contract in tls.h), over libssl.
 *
 * The key: PSK = HMAC-SHA256(secret, "flame link tls psk 1"), named by the
 * runner's ref; a key of its own, so the handshake's proofs (wire_proof, HMACs of
 * the same secret) and the TLS key never coincide. The session it makes is
 * TLS_AES_128_GCM_SHA256 (the PSK's hash must be the suite's). libssl's default
 * for TLS 1.3 PSKs is psk_dhe_ke: an ephemeral key exchange on top of the key,
 * hence forward secrecy; psk_ke alone would need SSL_OP_ALLOW_NO_DHE_KEX, never
 * set here. No session tickets (a runner connects once), no certificates.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <uv.h>

#include "buf.h"
#include "crypto.h"
#include "tls.h"

#define TLS_REF_MAX 128
#define PSK_LABEL "flame link tls psk 1"

struct tls_conn {
  SSL *ssl;
  BIO *bio;                          /* read and written by ssl, owned by it */
  const unsigned char *in;           /* tls_in's bytes, read in place */
  size_t in_len;
  buf out;                           /* what ssl wrote, handed over whole by tls_out */
  int server, ready;
  tls_lookup_fn lookup;
  void *ud;
  char ref[TLS_REF_MAX];             /* client: its own; server: the one it was named */
  unsigned char psk[CRYPTO_HMAC_LEN];
  int lookup_failed;                 /* server: no runner expected with that ref */
};

const unsigned char tls_refusal_alert[7] = { 0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28 };

static const unsigned char AES128GCM_SHA256[2] = { 0x13, 0x01 };

/* One of each a process, made at its first use (a runner needs only the client's,
 * a parent only the server's) */
static SSL_CTX *client_ctx, *server_ctx;
static char client_err[160], server_err[160];
static uv_once_t client_once = UV_ONCE_INIT, server_once = UV_ONCE_INIT;

static int derive(const unsigned char *secret, size_t slen, unsigned char psk[CRYPTO_HMAC_LEN]) {
  return crypto_hmac_sha256(secret, slen, PSK_LABEL, sizeof PSK_LABEL - 1, psk);
}

/* An external PSK as libssl takes one: a session with the key as its master key. */
static SSL_SESSION *psk_session(SSL *ssl, const unsigned char *psk) {
  const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, AES128GCM_SHA256);
  SSL_SESSION *s = cipher ? SSL_SESSION_new() : NULL;
  if (s == NULL) return NULL;
  if (!SSL_SESSION_set1_master_key(s, psk, CRYPTO_HMAC_LEN) || !SSL_SESSION_set_cipher(s, cipher)
      || !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
    SSL_SESSION_free(s);
    return NULL;
  }
  return s;
}

static int on_use_session(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen,
                          SSL_SESSION **sess) {
  tls_conn *t = SSL_get_app_data(ssl);
  *sess = NULL;
  *id = NULL;
  *idlen = 0;
  /* after a HelloRetryRequest for another hash the key cannot be offered */
  if (md != NULL && EVP_MD_get_type(md) != NID_sha256) return 1;
  SSL_SESSION *s = psk_session(ssl, t->psk);
  if (s == NULL) return 0;
  *sess = s;
  *id = (const unsigned char *)t->ref;
  *idlen = strlen(t->ref);
  return 1;
}

static int on_find_session(SSL *ssl, const unsigned char *id, size_t idlen,
                           SSL_SESSION **sess) {
  tls_conn *t = SSL_get_app_data(ssl);
  *sess = NULL;
  if (idlen == 0 || idlen >= sizeof t->ref || memchr(id, 0, idlen)) {
    t->lookup_failed = 1;
    return 0;
  }
  memcpy(t->ref, id, idlen);
  t->ref[idlen] = '\0';
  unsigned char secret[TLS_SECRET_MAX];
  size_t slen = sizeof secret;
  int found = t->lookup(t->ud, t->ref, secret, &slen);
  if (!found || derive(secret, slen, t->psk) != 0) {
    OPENSSL_cleanse(secret, sizeof secret);
    t->lookup_failed = 1;
    return 0;                                /* the handshake fails: nothing runs */
  }
  OPENSSL_cleanse(secret, sizeof secret);
  *sess = psk_session(ssl, t->psk);
  return *sess ? 1 : 0;
}

/* The connection's BIO: libssl reads the socket's bytes where they lie (tls_in)
 * and writes its records into out, which tls_out hands over without a copy (a
 * memory BIO would copy each way once more). Empty, it asks to be retried. */
static int bio_write(BIO *b, const char *p, int n) {
  tls_conn *t = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (n < 0 || buf_append(&t->out, p, (size_t)n) != 0) return -1;
  return n;
}

static int bio_read(BIO *b, char *p, int n) {
  tls_conn *t = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (t->in_len == 0) {
    BIO_set_retry_read(b);
    return -1;
  }
  size_t k = n < 0 ? 0 : (size_t)n < t->in_len ? (size_t)n : t->in_len;
  memcpy(p, t->in, k);
  t->in += k;
  t->in_len -= k;
  return (int)k;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  (void)num, (void)ptr;
  tls_conn *t = BIO_get_data(b);
  switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;
    case BIO_CTRL_PENDING: return t ? (long)t->in_len : 0;
    case BIO_CTRL_WPENDING: return t ? (long)t->out.len : 0;
    default: return 0;
  }
}

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

static BIO_METHOD *bio_method;
static uv_once_t bio_once = UV_ONCE_INIT;

static void make_bio_method(void) {
  int index = BIO_get_new_index();
  if (index == -1) return;
  BIO_METHOD *m = BIO_meth_new(index | BIO_TYPE_SOURCE_SINK, "flame link");
  if (m && BIO_meth_set_write(m, bio_write) && BIO_meth_set_read(m, bio_read)
      && BIO_meth_set_ctrl(m, bio_ctrl) && BIO_meth_set_create(m, bio_create)) {
    bio_method = m;
    return;
  }
  BIO_meth_free(m);
}

static SSL_CTX *make_ctx(int server) {
  SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (ctx == NULL) return NULL;
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)
      || !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)
      || !SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256")) {
    SSL_CTX_free(ctx);
    return NULL;
  }
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (server) {
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_psk_find_session_callback(ctx, on_find_session);
  } else {
    SSL_CTX_set_psk_use_session_callback(ctx, on_use_session);
  }
  return ctx;
}

static void make_one(SSL_CTX **ctx, int server, char *err, size_t errlen) {
  if (OPENSSL_init_ssl(0, NULL) != 1 || (*ctx = make_ctx(server)) == NULL) {
    unsigned long e = ERR_get_error();
    snprintf(err, errlen, "tls: libssl cannot make its context (%s)",
             e ? ERR_reason_error_string(e) : "no reason given");
    ERR_clear_error();
  }
}

static void make_client(void) { make_one(&client_ctx, 0, client_err, sizeof client_err); }
static void make_server(void) { make_one(&server_ctx, 1, server_err, sizeof server_err); }

void tls_warm_server(void *unused) {
  (void)unused;
  uv_once(&server_once, make_server);
}

void tls_warm_client(void *unused) {
  uv_once(&client_once, make_client);
  crypto_warm(unused);                       /* the handshake's HMACs come next */
}

static tls_conn *conn_new(int server, char *why, size_t whylen) {
  uv_once(server ? &server_once : &client_once, server ? make_server : make_client);
  SSL_CTX *ctx = server ? server_ctx : client_ctx;
  if (ctx == NULL) {
    snprintf(why, whylen, "%s", server ? server_err : client_err);
    return NULL;
  }
  tls_conn *t = calloc(1, sizeof *t);
  if (t == NULL || (t->ssl = SSL_new(ctx)) == NULL) {
    free(t);
    snprintf(why, whylen, "tls: not enough memory");
    ERR_clear_error();
    return NULL;
  }
  uv_once(&bio_once, make_bio_method);
  if (bio_method == NULL || (t->bio = BIO_new(bio_method)) == NULL) {
    SSL_free(t->ssl);
    free(t);
    snprintf(why, whylen, "tls: not enough memory");
    ERR_clear_error();
    return NULL;
  }
  BIO_set_data(t->bio, t);
  buf_init(&t->out);
  SSL_set_bio(t->ssl, t->bio, t->bio);       /* one reference, taken by ssl */
  if (!SSL_set_app_data(t->ssl, t)) {        /* the key callbacks find t by it */
    SSL_free(t->ssl);
    free(t);
    snprintf(why, whylen, "tls: not enough memory");
    ERR_clear_error();
    return NULL;
  }
  t->server = server;
  if (server) SSL_set_accept_state(t->ssl);
  else SSL_set_connect_state(t->ssl);
  return t;
}

tls_conn *tls_client(const char *ref, const unsigned char *secret, size_t slen, char *why,
                     size_t whylen) {
  if (strlen(ref) >= TLS_REF_MAX || slen == 0) {
    snprintf(why, whylen, "tls: the runner's ref or secret is not usable");
    return NULL;
  }
  tls_conn *t = conn_new(0, why, whylen);
  if (t == NULL) return NULL;
  snprintf(t->ref, sizeof t->ref, "%s", ref);
  if (derive(secret, slen, t->psk) != 0) {
    tls_free(t);
    snprintf(why, whylen, "tls: libcrypto cannot derive the key");
    return NULL;
  }
  return t;
}

tls_conn *tls_server(tls_lookup_fn lookup, void *ud, char *why, size_t whylen) {
  tls_conn *t = conn_new(1, why, whylen);
  if (t == NULL) return NULL;
  t->lookup = lookup;
  t->ud = ud;
  return t;
}

void tls_free(tls_conn *t) {
  if (t == NULL) return;
  SSL_free(t->ssl);                          /* and its BIO */
  buf_free(&t->out);
  OPENSSL_cleanse(t->psk, sizeof t->psk);
  free(t);
}

void tls_in(tls_conn *t, const void *p, size_t n) {
  t->in = p;
  t->in_len = n;
}

int tls_ready(const tls_conn *t) {
  return t->ready;
}

const char *tls_peer_ref(const tls_conn *t) {
  return t->ref[0] ? t->ref : NULL;
}

/* The ref a peer named, for the log: as it is when it looks like a ref (letters,
 * digits, '-', '_', '.'), else not shown (it comes from a stranger). */
static const char *shown_ref(const tls_conn *t) {
  if (t->ref[0] == '\0') return "(none, or too long)";
  for (const char *p = t->ref; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')
          || *p == '-' || *p == '_' || *p == '.'))
      return "(not printable)";
  return t->ref;
}

/* Why the connection failed, in words for the log: what the error means here. */
static void failure(tls_conn *t, int rc, char *why, size_t whylen) {
  unsigned long e = ERR_peek_last_error();
  int reason = ERR_GET_REASON(e);
  const char *what = e ? ERR_reason_error_string(e) : NULL;
  if (t->server && t->lookup_failed)
    snprintf(why, whylen, "tls: no runner with ref %s is expected (its boot is over, "
             "another runner took it, or it was never this pool's)", shown_ref(t));
  else if (!t->server && !t->ready && reason == SSL_R_TLSV1_ALERT_INTERNAL_ERROR)
    snprintf(why, whylen, "tls: the parent does not expect this runner's ref (its boot "
             "is over, or another runner took it): %s", what ? what : "internal error");
  else if (reason == SSL_R_BINDER_DOES_NOT_VERIFY)
    snprintf(why, whylen, "tls: the runner's key does not match its ref: it does not hold "
             "the runner's secret");
  else if (!t->ready && (reason == SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE
                         || reason == SSL_R_TLSV1_ALERT_DECRYPT_ERROR))
    snprintf(why, whylen, "tls: the %s refused the handshake (%s): its secret differs, or "
             "it does not speak TLS on this link (link.tls)", t->server ? "runner" : "parent",
             what ? what : "alert");
  else if (!t->ready && reason == SSL_R_WRONG_VERSION_NUMBER)
    snprintf(why, whylen, "tls: the %s does not speak TLS on this link (its link.tls is "
             "off, or it runs an older flame)", t->server ? "runner" : "parent");
  else if (t->ready && (reason == SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC
                        || reason == SSL_R_SSLV3_ALERT_BAD_RECORD_MAC))
    snprintf(why, whylen, "tls: a record failed its integrity check (%s): bytes were "
             "changed on the way", what ? what : "bad record mac");
  else if (what)
    snprintf(why, whylen, "tls: %s%s", what, t->ready ? "" : " (during the handshake)");
  else
    snprintf(why, whylen, "tls: the connection failed (SSL error %d)", rc);
  ERR_clear_error();
}

long tls_read(tls_conn *t, void *out, size_t cap, char *why, size_t whylen) {
  ERR_clear_error();                         /* SSL_get_error reads the whole queue */
  if (!t->ready) {
    int rc = SSL_do_handshake(t->ssl);
    if (rc != 1) {
      int e = SSL_get_error(t->ssl, rc);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
      if (e == SSL_ERROR_ZERO_RETURN) return -2;
      failure(t, e, why, whylen);
      return -1;
    }
    t->ready = 1;
  }
  size_t got = 0;
  int rc = SSL_read_ex(t->ssl, out, cap, &got);
  if (rc == 1) return (long)got;
  int e = SSL_get_error(t->ssl, rc);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
  if (e == SSL_ERROR_ZERO_RETURN) return -2;
  failure(t, e, why, whylen);
  return -1;
}

int tls_write(tls_conn *t, const void *p, size_t n, char *why, size_t whylen) {
  size_t done = 0;
  if (n == 0) return 0;
  ERR_clear_error();
  int rc = SSL_write_ex(t->ssl, p, n, &done);
  if (rc == 1 && done == n) return 0;
  failure(t, SSL_get_error(t->ssl, rc), why, whylen);
  return -1;
}

long tls_out(tls_conn *t, unsigned char **out) {
  size_t n = t->out.len;
  *out = NULL;
  if (n == 0) return 0;
  if (n > LONG_MAX) return -1;
  *out = t->out.data;                        /* handed over: no copy */
  buf_init(&t->out);
  return (long)n;
}
