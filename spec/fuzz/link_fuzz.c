/*
 * link_fuzz.c - libFuzzer target for the link's frame parser (core/link.c), which
 * reads bytes from a TCP peer that has not authenticated yet. Each input drives a
 * real link_conn on one libuv loop over loopback TCP: a plain socket writes the
 * bytes (in pieces, the loop running between them, so frames and headers arrive
 * split) and then ends its side; the loop runs until the connection has closed.
 * What the connection delivers, and why it closes, is checked against a model of
 * the wire (docs/protocol.md) run over the whole input at once, so a parser that
 * depends on how the bytes were split is caught, not only a crash.
 *
 * Input: two control bytes, then the bytes of the stream.
 *   byte 0: bits 0-2 max_message (0, 1, 7, 64, 256, 1024, 4096, 1 GiB), bits 3-5
 *           max_partials (1, 2, 3, 4, 8, 64, and 0 and 100, which link_limits
 *           ignores), bit 6 echo each message back, bit 7 the conn connects (the
 *           runner's side) instead of being accepted (the parent's).
 *   byte 1: bits 0-3 how the stream is split (0: one write; k: pieces of 1 to 16k
 *           bytes), bits 4-6 close from on_message after that many messages (0:
 *           never), bit 7 with link_finish rather than link_close.
 * Run with scripts/fuzz SECONDS.
 */
#define _GNU_SOURCE                             /* accept4 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "link.h"
#include "loopback.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)
#define ENOUGH "fuzz: enough"

typedef struct msg_seen {
  int type;
  uint64_t id;
  size_t len;
  uint64_t hash;
} msg_seen;

typedef struct run {
  link_conn *c;
  int connected, closed;
  size_t max_message;
  int close_after, finish, echo;
  msg_seen *got;
  size_t ngot, room;
  char reason[LINK_REASON_MAX];
} run;

static uv_loop_t loop;
static link_listener *listener;
static struct sockaddr_storage listen_addr;    /* the link's listener */
static int raw_listen_fd = -1;                 /* a plain listener, for link_connect */
static struct sockaddr_storage raw_addr;
static run R;

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
#define FNV0 0xcbf29ce484222325ull

/* ------------------------------------------------------------------ model ---- */

typedef struct mpartial {
  int type;
  uint64_t id;
  size_t len;
  uint64_t hash;
} mpartial;

static uint64_t le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* What the connection must deliver (into out, room for n / LINK_HEADER + 1) and
 * the reason it must close with. */
static const char *model(const unsigned char *p, size_t n, size_t max_message,
                         int max_partials, int close_after, msg_seen *out, size_t *nout) {
  static mpartial parts[LINK_PARTIALS_MAX];
  int nparts = 0;
  size_t pos = 0;
  *nout = 0;
  for (;;) {
    if (n - pos < LINK_HEADER) return "closed by peer";
    size_t len = (size_t)le(p + pos, 4);
    int type = p[pos + 4], flags = p[pos + 5];
    uint64_t id = le(p + pos + 6, 8);
    pos += LINK_HEADER;
    if (len > LINK_CHUNK) return "protocol: frame too large";
    if (flags & ~1) return "protocol: bad frame flags";
    int k;
    for (k = 0; k < nparts; k++)
      if (parts[k].type == type && parts[k].id == id) break;
    if (k == nparts) {
      if (nparts >= max_partials) return "protocol: too many messages at once";
      parts[nparts++] = (mpartial){ type, id, 0, FNV0 };
    }
    if (parts[k].len + len > max_message) return "protocol: message too large";
    if (n - pos < len) return "closed by peer";
    parts[k].len += len;
    parts[k].hash = fnv(parts[k].hash, p + pos, len);
    pos += len;
    if (flags & 1) {
      out[(*nout)++] = (msg_seen){ type, id, parts[k].len, parts[k].hash };
      parts[k] = parts[--nparts];
      if (close_after && (int)*nout == close_after) return ENOUGH;
    }
  }
}

/* ------------------------------------------------------------ connection ---- */

static void on_message(link_conn *c, void *ud, int type, uint64_t id, buf *msg) {
  run *r = ud;
  CHECK(c == r->c && !r->closed);
  CHECK(msg->len <= r->max_message && msg->len <= msg->cap);
  CHECK(msg->len == 0 || msg->data != NULL);
  CHECK(r->ngot < r->room);
  r->got[r->ngot++] = (msg_seen){ type, id, msg->len, fnv(FNV0, msg->data, msg->len) };
  if (r->echo) CHECK(link_send(c, type, id, "e", 1, msg->data, msg->len) == 0);
  if (r->ngot & 1) {                           /* take the bytes, as the contract allows */
    free(msg->data);
    msg->data = NULL;
    msg->len = msg->cap = 0;
  }
  if (r->close_after && (int)r->ngot == r->close_after) {
    if (r->finish) link_finish(c, ENOUGH);
    else link_close(c, ENOUGH);
    CHECK(link_closing(c));
  }
}

static void on_close(link_conn *c, void *ud, const char *reason) {
  run *r = ud;
  CHECK(c == r->c && !r->closed);
  CHECK(reason != NULL && reason[0] != '\0' && strlen(reason) < LINK_REASON_MAX);
  snprintf(r->reason, sizeof r->reason, "%s", reason);
  r->closed = 1;
}

static const link_handlers handlers = { on_message, on_close };

static void start(link_conn *c, size_t max_message, int max_partials) {
  link_limits(c, max_message, max_partials);
  CHECK(link_start(c, &handlers, &R, 0) == 0);
}

static size_t limit_message;
static int limit_partials;

static void on_accept(link_listener *l, void *ud, link_conn *c) {
  CHECK(R.c == NULL);
  R.c = c;
  R.connected = 1;
  start(c, limit_message, limit_partials);
}

static void on_connected(link_conn *c, void *ud, int status) {
  CHECK(status == 0 && c == R.c);
  R.connected = 1;
  start(c, limit_message, limit_partials);
}

static void addr_of(int fd, struct sockaddr_storage *sa) {
  socklen_t len = sizeof *sa;
  CHECK(getsockname(fd, (struct sockaddr *)sa, &len) == 0);
}

static void setup(void) {
  if (listener) return;
  CHECK(uv_loop_init(&loop) == 0);
  listener = loopback_listen(&loop, on_accept, &listen_addr);
  struct sockaddr_storage any;
  CHECK(link_addr("127.0.0.1", 0, &any) == 0);
  raw_listen_fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(raw_listen_fd >= 0);
  CHECK(bind(raw_listen_fd, (struct sockaddr *)&any, sizeof(struct sockaddr_in)) == 0);
  CHECK(listen(raw_listen_fd, 16) == 0);
  addr_of(raw_listen_fd, &raw_addr);
}

/* The plain end of a new pair (non-blocking); the link_conn is R.c. */
static int pair(int connect_side) {
  int fd;
  if (connect_side) {
    int err = 0;
    R.c = link_connect(&loop, (struct sockaddr *)&raw_addr, on_connected, NULL, &err);
    CHECK(R.c != NULL);
    while (!R.connected) uv_run(&loop, UV_RUN_ONCE);
    while ((fd = accept4(raw_listen_fd, NULL, NULL, SOCK_NONBLOCK)) < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) wait_fd(raw_listen_fd, POLLIN);
      else if (errno != EINTR) harness_fail("accept");
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  } else {
    /* from 127.1/16: the connections that end in TIME_WAIT (see below) */
    fd = loopback_connect(&listen_addr, 1);
    while (!R.connected) uv_run(&loop, UV_RUN_ONCE);
  }
  return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const size_t messages[] = { 0, 1, 7, 64, 256, 1024, 4096, (size_t)1 << 30 };
  static const int partials[] = { 1, 2, 3, 4, 8, 64, 0, 100 };
  if (size < 2) return 0;
  setup();
  unsigned b0 = data[0], b1 = data[1];
  const unsigned char *bytes = data + 2;
  size_t n = size - 2;

  memset(&R, 0, sizeof R);
  limit_message = messages[b0 & 7];
  limit_partials = partials[(b0 >> 3) & 7];
  R.max_message = limit_message;
  R.echo = (b0 >> 6) & 1;
  R.close_after = (b1 >> 4) & 7;
  R.finish = b1 >> 7;
  R.room = n / LINK_HEADER + 1;
  R.got = malloc(R.room * sizeof *R.got);
  msg_seen *want = malloc(R.room * sizeof *want);
  CHECK(R.got && want);
  int eff_partials = limit_partials >= 1 && limit_partials <= LINK_PARTIALS_MAX
                     ? limit_partials : LINK_PARTIALS_MAX;
  size_t nwant;
  const char *why = model(bytes, n, limit_message, eff_partials, R.close_after, want, &nwant);

  int fd = pair(b0 >> 7);
  unsigned split = b1 & 15;
  uint32_t rnd = 0x9e3779b9u ^ (b0 << 8 | b1);
  size_t off = 0;
  int shut = 0;
  while (!R.closed) {
    if (off < n) {
      size_t piece = n - off;
      if (split) {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 17;
        rnd ^= rnd << 5;
        size_t want_piece = 1 + rnd % (split * 16u);      /* 1 .. up to 240 bytes */
        if (want_piece < piece) piece = want_piece;
      }
      ssize_t w = send(fd, bytes + off, piece, MSG_NOSIGNAL);
      if (w > 0) off += (size_t)w;
      else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) off = n;
    }
    if (off == n && !shut) {
      /* The end: a FIN, which the conn reads as the end after the bytes. Then, unless
       * the conn may still write to this socket, a reset at once, which leaves no
       * TIME_WAIT behind (thousands a second would use up the ports); echoes would
       * fail on the reset socket, so those inputs end gracefully. */
      shutdown(fd, SHUT_WR);
      shut = 1;
      if (!R.echo && !R.closed) {
        struct linger hard = { 1, 0 };
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
        close(fd);
        fd = -1;
      }
    }
    uv_run(&loop, shut ? UV_RUN_ONCE : UV_RUN_NOWAIT);
  }
  if (fd >= 0) {
    struct linger hard = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
    close(fd);
  }

  if (strcmp(R.reason, why) != 0) {
    fprintf(stderr, "link_fuzz: closed with \"%s\", the model says \"%s\"\n", R.reason, why);
    __builtin_trap();
  }
  if (R.ngot != nwant) {
    fprintf(stderr, "link_fuzz: %zu messages delivered, the model says %zu\n", R.ngot, nwant);
    __builtin_trap();
  }
  for (size_t i = 0; i < nwant; i++) {
    CHECK(R.got[i].type == want[i].type && R.got[i].id == want[i].id);
    CHECK(R.got[i].len == want[i].len && R.got[i].hash == want[i].hash);
  }
  free(R.got);
  free(want);
  return 0;
}
