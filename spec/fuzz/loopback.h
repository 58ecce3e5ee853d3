/*
 * loopback.h - what the link's fuzz targets (link_fuzz.c, tls_fuzz.c) share: a
 * link listener on 127.0.0.1, and plain sockets connecting to it, each from another
 * address of 127.NET/16 in turn (thousands of connections a second would use up
 * the ephemeral ports of one address with their TIME_WAITs). A failed system call
 * of the harness traps with what failed: it is not a finding about the link.
 * Header only, static: each target is a program of its own.
 */
#ifndef FLAME_FUZZ_LOOPBACK_H
#define FLAME_FUZZ_LOOPBACK_H

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <uv.h>

#include "link.h"

static void harness_fail(const char *what) {
  fprintf(stderr, "fuzz harness: %s: %s\n", what, strerror(errno));
  __builtin_trap();
}

/* Waits for fd to be ready for events; libFuzzer's alarms interrupt system calls. */
static void wait_fd(int fd, short events) {
  struct pollfd pfd = { fd, events, 0 };
  while (poll(&pfd, 1, -1) < 0)
    if (errno != EINTR) harness_fail("poll");
}

/* A link listener on 127.0.0.1, a port of the system's choice; its address in *addr. */
static link_listener *loopback_listen(uv_loop_t *loop,
                                      void (*on_accept)(link_listener *, void *, link_conn *),
                                      struct sockaddr_storage *addr) {
  struct sockaddr_storage any;
  int err = 0, port;
  char ip[64];
  if (link_addr("127.0.0.1", 0, &any) != 0) harness_fail("link_addr");
  link_listener *l = link_listen(loop, (struct sockaddr *)&any, on_accept, NULL, &err);
  if (l == NULL || link_listener_address(l, ip, sizeof ip, &port) != 0
      || link_addr(ip, port, addr) != 0)
    harness_fail("link_listen");
  return l;
}

/* A non-blocking socket connected to to, from the next address of 127.net/16, with
 * TCP_NODELAY. */
static int loopback_connect(const struct sockaddr_storage *to, unsigned net) {
  static unsigned next;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd < 0) harness_fail("socket");
  struct sockaddr_in from = { .sin_family = AF_INET };
  from.sin_addr.s_addr = htonl(0x7f000000u | (net & 0xff) << 16 | (next++ & 0xffff));
  int late = 1;
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &late, sizeof late);
  if (bind(fd, (struct sockaddr *)&from, sizeof from) != 0) harness_fail("bind");
  if (connect(fd, (const struct sockaddr *)to, sizeof(struct sockaddr_in)) != 0) {
    if (errno != EINPROGRESS && errno != EINTR) harness_fail("connect");
    wait_fd(fd, POLLOUT);
    int soerr = 0;
    socklen_t len = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
    errno = soerr;
    if (soerr != 0) harness_fail("connect");
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

#endif
