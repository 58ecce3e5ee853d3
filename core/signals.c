/*
 * signals.c - process-wide signal dispositions flame needs, for the module and the
 * runner alike.
 */
#include <signal.h>

#include "flame.h"

/* Writing to a socket or pipe whose reader is gone raises SIGPIPE, whose default
 * action ends the process: a runner whose parent died would die on its next log
 * line instead of draining, and a parent would die on a lost runner's socket. With
 * SIGPIPE ignored such writes fail with EPIPE, which libuv reports. Once per
 * process; a program that has installed its own SIGPIPE handler keeps it. */
void flame_ignore_sigpipe(void) {
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
  }
}
