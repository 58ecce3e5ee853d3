/*
 * terminator.h - `flame runner`: the runner's terminator, in C on the runner's main
 * libuv loop (terminator.c). No Lua runs on that thread: work runs in the executor's
 * sandboxes, and a backend's own system_shutdown in a sandboxed backend state.
 */
#ifndef FLAME_TERMINATOR_H
#define FLAME_TERMINATOR_H

/* argv[0] is "runner"; the rest its arguments ([--require MODULE]...). Returns the
 * process's exit status: 0 after a clean stop, 1 when the runner failed (parent
 * never reached, refused, or lost before it was up), 2 on bad usage or a malformed
 * FLAME_PARENT. */
int terminator_main(int argc, char **argv);

#endif
