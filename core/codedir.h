/*
 * codedir.h - a runner's code_sync directory (docs/code_sync.md): the pack the
 * parent sent, checked against its SHA-256 and unpacked into a directory of this
 * runner's own, beside the loop (libuv's thread pool), so heartbeats go on meanwhile.
 *
 * Contract:
 * - codedir_start takes CODE's payload (the pack's SHA-256, 32 bytes, then the pack)
 *   and, off the loop, checks the hash, makes $TMPDIR/flame-code-PID-XXXXXX (0700;
 *   /tmp without TMPDIR) and unpacks into it (pack.h). done runs on the loop once,
 *   with the directory or why not; a directory that failed half-way is removed first.
 * - codedir_sweep removes the directories of runners that died without removing
 *   theirs (kill -9): flame-code-PID-* of this user whose PID is gone.
 * - codedir_lua_path is the workers' package.path: the directory's ?.lua and
 *   ?/init.lua first, then what a Lua state would have (LUA_PATH_5_4, LUA_PATH, or
 *   Lua's default; ";;" stands for the default, as in Lua).
 * Loop thread only, but for the work the thread pool runs.
 */
#ifndef FLAME_CODEDIR_H
#define FLAME_CODEDIR_H

#include <uv.h>

#include "buf.h"
#include "crypto.h"

#define CODEDIR_PATH_MAX 4096

/* ok: 1 with dir (and the number of files), or 0 with why. */
typedef void (*codedir_done_fn)(void *ud, int ok, const char *dir, long files,
                                const unsigned char hash[CRYPTO_HMAC_LEN], const char *why);

/* 0 (done will run), or -1 (it will not; *why says why). Takes payload's bytes. */
int codedir_start(uv_loop_t *loop, buf *payload, codedir_done_fn done, void *ud,
                  const char **why);

void codedir_sweep(void);

/* A malloc'ed string, or NULL when memory ran out. */
char *codedir_lua_path(const char *dir);

#endif
