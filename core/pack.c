/*
 * pack.c - code_sync's packs: layout, a total parser, unpacking and removal
 * (contract in pack.h).
 */
#define _XOPEN_SOURCE 700                /* nftw */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pack.h"

static const unsigned char MAGIC[4] = { 'F', 'L', 'P', 'K' };

static uint64_t get_le(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static void put_le(unsigned char *p, uint64_t v, int n) {
  for (int i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* A path a runner may write under its directory: relative, no empty, "." or ".."
 * part, no NUL or backslash. */
static int path_ok(const char *p, size_t n) {
  if (n == 0 || n > PACK_PATH_MAX || p[0] == '/') return 0;
  size_t start = 0;
  for (size_t i = 0; i <= n; i++) {
    if (i < n && (p[i] == '\0' || p[i] == '\\')) return 0;
    if (i == n || p[i] == '/') {
      size_t len = i - start;
      if (len == 0) return 0;
      if (len == 1 && p[start] == '.') return 0;
      if (len == 2 && p[start] == '.' && p[start + 1] == '.') return 0;
      start = i + 1;
    }
  }
  return 1;
}

/* Byte order of two paths: the packer sorts, so a path that is not after the one
 * before it is out of order or a duplicate. */
static int path_cmp(const char *a, size_t al, const char *b, size_t bl) {
  int c = memcmp(a, b, al < bl ? al : bl);
  if (c != 0) return c;
  return al < bl ? -1 : al > bl;
}

int pack_parse(const unsigned char *data, size_t len,
               int (*fn)(void *ud, const pack_entry *e), void *ud, char *why, size_t whylen) {
  if (len < PACK_HEADER || memcmp(data, MAGIC, 4) != 0) {
    snprintf(why, whylen, "not a code pack (no FLPK header)");
    return -1;
  }
  if (data[4] != PACK_VERSION) {
    snprintf(why, whylen, "code pack version %d, this runner reads %d (parent and runner "
             "must run the same flame)", data[4], PACK_VERSION);
    return -1;
  }
  uint64_t count = get_le(data + 5, 4);
  if (count > PACK_FILES_MAX) {
    snprintf(why, whylen, "code pack of %llu files, more than %d", (unsigned long long)count,
             PACK_FILES_MAX);
    return -1;
  }
  /* two passes: the first checks everything, so nothing is written from a pack that
   * turns out bad half-way */
  for (int pass = fn ? 0 : 1; pass < 2; pass++) {
    size_t at = PACK_HEADER;
    const char *prev = NULL;
    size_t prev_len = 0;
    for (uint64_t i = 0; i < count; i++) {
      pack_entry e;
      if (len - at < 2) goto short_pack;
      e.path_len = (size_t)get_le(data + at, 2);
      at += 2;
      if (len - at < e.path_len + 1 + 8) goto short_pack;
      e.path = (const char *)data + at;
      at += e.path_len;
      if (!path_ok(e.path, e.path_len)) {
        snprintf(why, whylen, "code pack: file %llu has a path a runner may not write "
                 "(absolute, empty, with . or .. parts, NUL or backslash)",
                 (unsigned long long)i + 1);
        return -1;
      }
      if (prev && path_cmp(prev, prev_len, e.path, e.path_len) >= 0) {
        snprintf(why, whylen, "code pack: file %llu (%.*s) is out of order or twice",
                 (unsigned long long)i + 1, (int)(e.path_len > 200 ? 200 : e.path_len), e.path);
        return -1;
      }
      prev = e.path;
      prev_len = e.path_len;
      if (data[at] > 1) {
        snprintf(why, whylen, "code pack: file %.*s has mode %d (0 or 1 expected)",
                 (int)(e.path_len > 200 ? 200 : e.path_len), e.path, data[at]);
        return -1;
      }
      e.exec = data[at];
      at += 1;
      e.size = get_le(data + at, 8);
      at += 8;
      if (e.size > len - at) goto short_pack;
      e.data = data + at;
      at += (size_t)e.size;
      if (pass == 1 && fn) {
        int rc = fn(ud, &e);
        if (rc != 0) return rc;
      }
    }
    if (at != len) {
      snprintf(why, whylen, "code pack: %zu bytes after its last file", len - at);
      return -1;
    }
  }
  return 0;
short_pack:
  snprintf(why, whylen, "code pack: cut short (%zu bytes)", len);
  return -1;
}

int pack_begin(buf *out, uint32_t count) {
  unsigned char h[PACK_HEADER];
  memcpy(h, MAGIC, 4);
  h[4] = PACK_VERSION;
  put_le(h + 5, count, 4);
  return buf_append(out, h, sizeof h);
}

int pack_add(buf *out, const char *path, size_t path_len, int exec, const void *data,
             uint64_t size) {
  unsigned char h[8];
  if (path_len > PACK_PATH_MAX) return -1;
  if (buf_reserve(out, 2 + path_len + 1 + 8 + (size_t)size) != 0) return -1;
  put_le(h, path_len, 2);
  buf_append(out, h, 2);
  buf_append(out, path, path_len);
  buf_byte(out, exec ? 1 : 0);
  put_le(h, size, 8);
  buf_append(out, h, 8);
  return buf_append(out, data, (size_t)size);
}

typedef struct unpacker {
  const char *dir;
  long files;
  char *why;
  size_t whylen;
} unpacker;

static int write_all(int fd, const unsigned char *p, uint64_t n) {
  while (n > 0) {
    size_t chunk = n > (1u << 30) ? (1u << 30) : (size_t)n;
    ssize_t w = write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (uint64_t)w;
  }
  return 0;
}

static int unpack_one(void *ud, const pack_entry *e) {
  unpacker *u = ud;
  char path[PACK_PATH_MAX + 4096 + 2];
  int n = snprintf(path, sizeof path, "%s/%.*s", u->dir, (int)e->path_len, e->path);
  if (n < 0 || (size_t)n >= sizeof path) {
    snprintf(u->why, u->whylen, "code_sync: the path %.*s is too long under %s",
             (int)e->path_len, e->path, u->dir);
    return -1;
  }
  /* its directories first: each part after dir, made if missing */
  size_t base = strlen(u->dir) + 1;
  for (size_t i = base; i < (size_t)n; i++) {
    if (path[i] != '/') continue;
    path[i] = '\0';
    int rc = mkdir(path, 0700);
    int err = errno;
    path[i] = '/';
    if (rc != 0 && err != EEXIST) {
      snprintf(u->why, u->whylen, "code_sync: cannot make the directory of %s: %s", path,
               strerror(err));
      return -1;
    }
  }
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                e->exec ? 0700 : 0600);
  if (fd < 0) {
    snprintf(u->why, u->whylen, "code_sync: cannot write %s: %s", path, strerror(errno));
    return -1;
  }
  int rc = write_all(fd, e->data, e->size);
  int err = errno;
  if (close(fd) != 0 && rc == 0) {
    rc = -1;
    err = errno;
  }
  if (rc != 0) {
    snprintf(u->why, u->whylen, "code_sync: cannot write %s: %s", path, strerror(err));
    return -1;
  }
  u->files++;
  return 0;
}

int pack_unpack(const unsigned char *data, size_t len, const char *dir, long *files,
                char *why, size_t whylen) {
  unpacker u = { dir, 0, why, whylen };
  int rc = pack_parse(data, len, unpack_one, &u, why, whylen);
  *files = u.files;
  return rc == 0 ? 0 : -1;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

int pack_remove_tree(const char *dir) {
  struct stat st;
  if (lstat(dir, &st) != 0) return errno == ENOENT ? 0 : -1;
  return nftw(dir, remove_one, 16, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}
