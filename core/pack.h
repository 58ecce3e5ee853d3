/*
 * pack.h - code_sync's packs: the files a parent ships to a runner (its own Lua
 * modules, directories it names), as one byte string, and their unpacking into a
 * runner-private directory (docs/code_sync.md).
 *
 * Layout (little-endian): "FLPK", version u8 (1), file count u32, then per file its
 * relative path (u16 length, bytes), a mode u8 (0 plain, 1 executable) and its
 * content (u64 length, bytes); nothing after the last file. Files come sorted by
 * path, so the same files always make the same bytes (and hash).
 *
 * Contract:
 * - pack_parse is total: any bytes give the entries or a message saying what is
 *   wrong, never a crash; a path is relative, without empty, "." or ".." parts, NUL
 *   or backslash, at most PACK_PATH_MAX bytes, and no path comes twice.
 * - pack_unpack writes a parsed pack under dir (which exists, is empty and is this
 *   process's own), making directories 0700 and files 0600 (0700 executable) that
 *   did not exist (O_EXCL, O_NOFOLLOW): a pack cannot write outside dir.
 * - pack_remove_tree removes dir and everything under it without following links.
 * Pure functions of their arguments and the file system: any thread.
 */
#ifndef FLAME_PACK_H
#define FLAME_PACK_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

#define PACK_VERSION 1
#define PACK_PATH_MAX 1024
#define PACK_FILES_MAX 100000
#define PACK_HEADER 9                    /* magic, version, count */

typedef struct pack_entry {
  const char *path;                      /* not NUL-terminated: path_len bytes */
  size_t path_len;
  int exec;
  const unsigned char *data;
  uint64_t size;
} pack_entry;

/* Calls fn for each entry of a valid pack, after the whole pack was checked; fn
 * returning non-zero stops the walk and is returned. 0 when every entry was
 * visited; -1 with why filled in when the bytes are not a valid pack. fn may be
 * NULL (a check only). */
int pack_parse(const unsigned char *data, size_t len,
               int (*fn)(void *ud, const pack_entry *e), void *ud, char *why, size_t whylen);

/* Appends the header (count files) / one file to out: 0, or -1 out of memory. */
int pack_begin(buf *out, uint32_t count);
int pack_add(buf *out, const char *path, size_t path_len, int exec, const void *data,
             uint64_t size);

/* 0 with *files set, or -1 with why filled in (the file it could not write). */
int pack_unpack(const unsigned char *data, size_t len, const char *dir, long *files,
                char *why, size_t whylen);

/* 0, or -1 when something under dir could not be removed (what is left stays). */
int pack_remove_tree(const char *dir);

#endif
