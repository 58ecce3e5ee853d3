/*
 * tls_fuzz.c - libFuzzer target for the link's TLS (core/tls.c, and link.c's way
 * in: the first byte's choice, the bytes fed to libssl, what it decrypts parsed as
 * frames). Each input drives a real parent-side link_conn, accepted on loopback TCP
 * with link_tls_server, as core/hub.c makes them; the peer is the harness.
 *
 * Input: one control byte, then the bytes.
 *   bit 0: the link does not speak TLS (a pool's link.tls off), else it requires it
 *   bit 1: the peer is a real TLS client (tls_client, the runner's side), keyed with
 *          the secret the parent expects (bit 2 clear) or another (bit 2 set);
 *          the input's bytes are XORed, in order, into what it sends, and after its
 *          handshake it sends one frame (a HELLO of 40 bytes)
 *   else:  the bytes are the peer's stream as they are
 *   bits 4-7: how the stream is split (0: as it comes; k: pieces of 1 to 16k bytes)
 * Checked: the connection always ends; a TLS peer of the right key whose bytes
 * were left alone has its frame delivered, intact; a TLS failure closes with a
 * reason that starts "tls: "; where TLS is off, a peer starting TLS is refused
 * with the reason that says so. Run with scripts/fuzz SECONDS.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "link.h"
#include "loopback.h"
#include "tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static const char REF[] = "fuzz-runner-ref";
static const unsigned char SECRET[32] = "the secret the parent expects!!";
static const unsigned char WRONG[32] = "a secret the parent never gave";

typedef struct run {
  link_conn *c;
  int closed, delivered, intact;
  char reason[LINK_REASON_MAX];
} run;

static uv_loop_t loop;
static link_listener *listener;
static struct sockaddr_storage listen_addr;
static run R;
static int require_tls;
static unsigned char frame[LINK_HEADER + 40];

static int lookup(void *ud, const char *ref, unsigned char *secret, size_t *slen) {
  (void)ud;
  if (strcmp(ref, REF) != 0 || *slen < sizeof SECRET) return 0;
  memcpy(secret, SECRET, sizeof SECRET);
  *slen = sizeof SECRET;
  return 1;
}

static void on_message(link_conn *c, void *ud, int type, uint64_t id, buf *msg) {
  (void)c, (void)ud;
  R.delivered++;
  if (type == 1 && id == 7 && msg->len == 40 && memcmp(msg->data, frame + LINK_HEADER, 40) == 0)
    R.intact++;
}

static void on_close(link_conn *c, void *ud, const char *reason) {
  (void)c, (void)ud;
  R.closed = 1;
  snprintf(R.reason, sizeof R.reason, "%s", reason);
}

static const link_handlers handlers = { on_message, on_close };

static void on_accept(link_listener *l, void *ud, link_conn *c) {
  (void)l, (void)ud;
  CHECK(R.c == NULL);
  R.c = c;
  link_limits(c, 64 * 1024, 1);
  link_tls_server(c, require_tls, lookup, NULL);
  link_start(c, &handlers, NULL, 0);
}

static void setup(void) {
  if (listener) return;
  CHECK(uv_loop_init(&loop) == 0);
  listener = loopback_listen(&loop, on_accept, &listen_addr);
  /* the frame the client sends once its handshake is done: type 1, id 7, last */
  frame[0] = 40;
  frame[4] = 1;
  frame[5] = 1;
  frame[6] = 7;
  for (int i = 0; i < 40; i++) frame[LINK_HEADER + i] = (unsigned char)('a' + i % 26);
}

static int connect_peer(void) {
  int fd = loopback_connect(&listen_addr, 2);    /* from 127.2/16 */
  while (R.c == NULL) uv_run(&loop, UV_RUN_ONCE);
  return fd;
}

/* The peer's bytes still to send. */
typedef struct outq {
  unsigned char *b;
  size_t len, off;
} outq;

static void push(outq *q, const unsigned char *p, size_t n) {
  unsigned char *nb = realloc(q->b, q->len + n);
  CHECK(nb != NULL);
  memcpy(nb + q->len, p, n);
  q->b = nb;
  q->len += n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  setup();
  unsigned ctl = data[0];
  const unsigned char *bytes = data + 1;
  size_t n = size - 1;
  memset(&R, 0, sizeof R);
  require_tls = !(ctl & 1);
  int client = (ctl >> 1) & 1, wrong = (ctl >> 2) & 1;
  unsigned split = ctl >> 4;
  int fd = connect_peer();

  tls_conn *t = NULL;
  outq q = { NULL, 0, 0 };
  size_t xored = 0;                              /* client bytes mutated so far */
  int sent_frame = 0, shut = 0;
  char why[256];
  if (client) {
    t = tls_client(REF, wrong ? WRONG : SECRET, 32, why, sizeof why);
    CHECK(t != NULL);
    CHECK(tls_read(t, NULL, 0, why, sizeof why) == 0);    /* the ClientHello */
  } else {
    push(&q, bytes, n);
  }
  uint32_t rnd = 0x9e3779b9u ^ ctl;
  /* a client whose handshake stalls (its bytes changed, the parent waits for more)
   * ends after this long without progress; the unchanged one has longer */
  uint64_t stall = (n == 0 ? 2000 : 100) * (uint64_t)1000000, last = uv_hrtime();
  while (!R.closed) {
    int progress = 0;
    if (t) {                                     /* the client's output, changed */
      unsigned char *out;
      long m = tls_out(t, &out);
      CHECK(m >= 0);
      if (m > 0) {
        for (long i = 0; i < m && xored < n; i++) out[i] ^= bytes[xored++];
        push(&q, out, (size_t)m);
        free(out);
        progress = 1;
      }
    }
    if (q.off < q.len) {
      size_t piece = q.len - q.off;
      if (split) {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 17;
        rnd ^= rnd << 5;
        size_t want = 1 + rnd % (split * 16u);
        if (want < piece) piece = want;
      }
      ssize_t w = send(fd, q.b + q.off, piece, MSG_NOSIGNAL);
      if (w > 0) q.off += (size_t)w, progress = 1;
      else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) q.off = q.len;
    }
    uv_run(&loop, shut ? UV_RUN_ONCE : UV_RUN_NOWAIT);
    if (t && !R.closed) {                        /* the parent's answers, to the client */
      unsigned char in[16384];
      ssize_t r = recv(fd, in, sizeof in, MSG_DONTWAIT);
      if (r > 0) {
        progress = 1;
        tls_in(t, in, (size_t)r);
        unsigned char plain[1024];
        long got;
        while ((got = tls_read(t, plain, sizeof plain, why, sizeof why)) > 0) {}
        if (got < 0) {                           /* the client gives up */
          tls_free(t);
          t = NULL;
        } else if (tls_ready(t) && !sent_frame) {
          sent_frame = 1;
          CHECK(tls_write(t, frame, sizeof frame, why, sizeof why) == 0);
        }
      }
    }
    uint64_t now = uv_hrtime();
    if (progress) last = now;
    int over = q.off == q.len && (t == NULL || R.delivered || now - last > stall);
    if (over && !shut) {                         /* a FIN: the parent reads the end */
      shutdown(fd, SHUT_WR);
      shut = 1;
    }
  }
  struct linger hard = { 1, 0 };
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
  close(fd);
  /* the first byte the parent got decided its way */
  int b0 = client ? 0x16 ^ (n > 0 ? bytes[0] : 0) : n > 0 ? bytes[0] : -1;
  if (!require_tls && b0 == 0x16)
    CHECK(strncmp(R.reason, "tls: the runner started TLS", 27) == 0);
  if (require_tls && b0 == 0x16) {
    CHECK(R.intact == R.delivered);              /* what TLS lets through is the frame */
    CHECK(strncmp(R.reason, "tls: ", 5) == 0 || strcmp(R.reason, "closed by peer") == 0
          || strcmp(R.reason, "not enough memory") == 0);
    if (client && wrong) CHECK(R.delivered == 0);
    if (client && wrong && n == 0) CHECK(strncmp(R.reason, "tls: ", 5) == 0);
    if (client && !wrong && n == 0) CHECK(R.intact == 1);
  }
  if (t) tls_free(t);
  free(q.b);
  return 0;
}
