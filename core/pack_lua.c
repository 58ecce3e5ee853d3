/*
 * pack_lua.c - code_sync's file work for the parent's Lua (lua/flame/code_sync.lua):
 *   core.code_pack(files, max_bytes) -> pack, hash, bytes | nil, message
 *       files: { { rel, abs }, ... }; the pack holds each abs's content as rel,
 *       sorted by rel (pack.h); hash is its SHA-256 in hex, bytes the files' total.
 *       Over max_bytes: the message names the largest files.
 *   core.code_unpack(pack, dir) -> files | nil, message      (pack_unpack)
 *   core.list_files(dir) -> { rel, ... } | nil, message
 *       regular files under dir, recursively, links to files included; links to
 *       directories are not followed (no loops)
 *   core.file_info(path) -> "file"|"directory"|"other", size, mtime_ns | nil, message
 *   core.remove_tree(dir) -> true | nil, message
 *   core.sha256(bytes) -> hex
 *   core.lua_system_dirs() -> { dir, ... }  the absolute directories of Lua's own
 *       default package.path and cpath (where the system's modules are)
 * Reads and writes the file system on the calling thread: made for a boot, not for
 * a call's hot path.
 */
#define _XOPEN_SOURCE 700
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>

#include "flame.h"
#include "buf.h"
#include "crypto.h"
#include "pack.h"

#define LIST_DEPTH_MAX 64

typedef struct pfile {
  const char *rel, *abs;
  size_t rel_len;
  uint64_t size;
  int exec;
} pfile;

static int pfile_cmp(const void *a, const void *b) {
  const pfile *x = a, *y = b;
  int c = memcmp(x->rel, y->rel, x->rel_len < y->rel_len ? x->rel_len : y->rel_len);
  if (c != 0) return c;
  return x->rel_len < y->rel_len ? -1 : x->rel_len > y->rel_len;
}

static int size_cmp(const void *a, const void *b) {
  const pfile *x = *(const pfile *const *)a, *y = *(const pfile *const *)b;
  return x->size < y->size ? 1 : x->size > y->size ? -1 : 0;
}

static void push_size(luaL_Buffer *b, uint64_t n) {
  char s[64];
  if (n < 1024) snprintf(s, sizeof s, "%llu bytes", (unsigned long long)n);
  else if (n < 1024 * 1024) snprintf(s, sizeof s, "%.1f KB", (double)n / 1024.0);
  else snprintf(s, sizeof s, "%.1f MB", (double)n / (1024.0 * 1024.0));
  luaL_addstring(b, s);
}

/* The message of a pack over its limit: its size, the limit, its largest files. */
static int over_limit(lua_State *L, pfile *f, size_t n, uint64_t total, uint64_t max) {
  pfile **order = lua_newuserdatauv(L, n * sizeof *order, 0);
  for (size_t i = 0; i < n; i++) order[i] = &f[i];
  qsort(order, n, sizeof *order, size_cmp);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "code_sync: the code to ship is ");
  push_size(&b, total);
  luaL_addstring(&b, ", over its limit of ");
  push_size(&b, max);
  luaL_addstring(&b, "; largest files: ");
  for (size_t i = 0; i < n && i < 3; i++) {
    if (i) luaL_addstring(&b, ", ");
    luaL_addstring(&b, order[i]->abs);
    luaL_addstring(&b, " (");
    push_size(&b, order[i]->size);
    luaL_addstring(&b, ")");
  }
  luaL_addstring(&b, " (leave them out of code_sync.paths, or raise code_sync.max_bytes)");
  luaL_pushresult(&b);
  lua_pushnil(L);
  lua_insert(L, -2);
  return 2;
}

static int fail(lua_State *L, const char *fmt, const char *what, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, fmt, what, strerror(err));
  return 2;
}

/* Reads a whole file into out: 0, or -1 with errno set. */
static int read_file(const char *path, buf *out) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  for (;;) {
    if (buf_reserve(out, 65536) != 0) {
      close(fd);
      errno = ENOMEM;
      return -1;
    }
    ssize_t r = read(fd, out->data + out->len, out->cap - out->len);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      int e = errno;
      close(fd);
      errno = e;
      return -1;
    }
    if (r == 0) break;
    out->len += (size_t)r;
  }
  close(fd);
  return 0;
}

static void push_hex(lua_State *L, const unsigned char *d, size_t n) {
  char hex[2 * CRYPTO_HMAC_LEN + 1];
  for (size_t i = 0; i < n && i < CRYPTO_HMAC_LEN; i++) snprintf(hex + 2 * i, 3, "%02x", d[i]);
  lua_pushlstring(L, hex, 2 * (n < CRYPTO_HMAC_LEN ? n : CRYPTO_HMAC_LEN));
}

static int l_code_pack(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer max = luaL_checkinteger(L, 2);
  luaL_argcheck(L, max >= 0, 2, "a size in bytes expected");
  size_t n = (size_t)luaL_len(L, 1);
  if (n > PACK_FILES_MAX) {
    lua_pushnil(L);
    lua_pushfstring(L, "code_sync: %d files to ship, more than %d", (int)n, PACK_FILES_MAX);
    return 2;
  }
  pfile *f = lua_newuserdatauv(L, (n ? n : 1) * sizeof *f, 0);   /* freed by the GC */
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) {
    luaL_checkstack(L, 3, "code_pack");
    if (lua_rawgeti(L, 1, (lua_Integer)i + 1) != LUA_TTABLE)
      return luaL_error(L, "code_pack: files[%d] is not a { rel, abs } table", (int)i + 1);
    lua_rawgeti(L, -1, 1);
    lua_rawgeti(L, -2, 2);
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      return luaL_error(L, "code_pack: files[%d] is not a { rel, abs } table", (int)i + 1);
    f[i].rel = lua_tolstring(L, -2, &f[i].rel_len);   /* kept alive by files */
    f[i].abs = lua_tostring(L, -1);
    lua_pop(L, 3);
    if (f[i].rel_len > PACK_PATH_MAX) {
      lua_pushnil(L);
      lua_pushfstring(L, "code_sync: the path %s is longer than %d bytes", f[i].rel,
                      PACK_PATH_MAX);
      return 2;
    }
    struct stat st;
    if (stat(f[i].abs, &st) != 0) return fail(L, "code_sync: cannot read %s: %s", f[i].abs, errno);
    if (!S_ISREG(st.st_mode)) {
      lua_pushnil(L);
      lua_pushfstring(L, "code_sync: %s is not a regular file", f[i].abs);
      return 2;
    }
    f[i].size = (uint64_t)st.st_size;
    f[i].exec = (st.st_mode & S_IXUSR) != 0;
    total += f[i].size;
  }
  if (total > (uint64_t)max) return over_limit(L, f, n, total, (uint64_t)max);
  qsort(f, n, sizeof *f, pfile_cmp);
  for (size_t i = 1; i < n; i++)
    if (pfile_cmp(&f[i - 1], &f[i]) == 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "code_sync: %s and %s would both be %s on the runner", f[i - 1].abs,
                      f[i].abs, f[i].rel);
      return 2;
    }
  buf *pack = buf_box(L);                    /* freed by the GC, also on an error */
  buf content;
  buf_init(&content);
  if (pack_begin(pack, (uint32_t)n) != 0) return luaL_error(L, "code_pack: not enough memory");
  uint64_t read_total = 0;
  for (size_t i = 0; i < n; i++) {
    content.len = 0;
    if (read_file(f[i].abs, &content) != 0) {
      int e = errno;
      buf_free(&content);
      return fail(L, "code_sync: cannot read %s: %s", f[i].abs, e);
    }
    read_total += content.len;
    if (read_total > (uint64_t)max) {        /* it grew since it was measured */
      f[i].size = content.len;
      buf_free(&content);
      return over_limit(L, f, n, read_total, (uint64_t)max);
    }
    if (pack_add(pack, f[i].rel, f[i].rel_len, f[i].exec, content.data, content.len) != 0) {
      buf_free(&content);
      return luaL_error(L, "code_pack: not enough memory");
    }
  }
  buf_free(&content);
  unsigned char digest[CRYPTO_HMAC_LEN];
  if (crypto_sha256(pack->data, pack->len, digest) != 0)
    return luaL_error(L, "code_pack: SHA-256 failed in libcrypto");
  lua_pushlstring(L, (const char *)pack->data, pack->len);
  buf_free(pack);
  push_hex(L, digest, sizeof digest);
  lua_pushinteger(L, (lua_Integer)read_total);
  return 3;
}

static int l_code_unpack(lua_State *L) {
  size_t len;
  const char *data = luaL_checklstring(L, 1, &len);
  const char *dir = luaL_checkstring(L, 2);
  char why[512];
  long files;
  if (pack_unpack((const unsigned char *)data, len, dir, &files, why, sizeof why) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  lua_pushinteger(L, files);
  return 1;
}

/* Appends the regular files under dir/rel to the table at t. */
static int list_dir(lua_State *L, int t, buf *path, size_t root, int depth) {
  if (depth > LIST_DEPTH_MAX) {
    lua_pushfstring(L, "code_sync: %s is nested more than %d directories deep",
                    (const char *)path->data, LIST_DEPTH_MAX);
    return -1;
  }
  DIR *d = opendir((const char *)path->data);
  if (d == NULL) {
    lua_pushfstring(L, "code_sync: cannot read the directory %s: %s", (const char *)path->data,
                    strerror(errno));
    return -1;
  }
  size_t at = path->len;                     /* path's length without its NUL */
  struct dirent *e;
  int rc = 0;
  while (rc == 0 && (errno = 0, e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    path->len = at;
    if (buf_byte(path, '/') != 0 || buf_append(path, e->d_name, strlen(e->d_name) + 1) != 0) {
      lua_pushliteral(L, "code_sync: not enough memory");
      rc = -1;
      break;
    }
    path->len--;                             /* the NUL stays, uncounted */
    struct stat lst, st;
    if (lstat((const char *)path->data, &lst) != 0) continue;   /* gone meanwhile */
    if (S_ISDIR(lst.st_mode)) {
      rc = list_dir(L, t, path, root, depth + 1);
    } else if (stat((const char *)path->data, &st) == 0 && S_ISREG(st.st_mode)) {
      if (lua_rawlen(L, t) >= PACK_FILES_MAX) {
        lua_pushfstring(L, "code_sync: more than %d files under %s", PACK_FILES_MAX,
                        (const char *)path->data);
        rc = -1;
      } else {
        lua_pushlstring(L, (const char *)path->data + root, path->len - root);
        lua_rawseti(L, t, (lua_Integer)lua_rawlen(L, t) + 1);
      }
    }
  }
  if (rc == 0 && errno != 0) {
    path->len = at;
    path->data[at] = '\0';
    lua_pushfstring(L, "code_sync: cannot read the directory %s: %s", (const char *)path->data,
                    strerror(errno));
    rc = -1;
  }
  closedir(d);
  path->len = at;
  path->data[at] = '\0';
  return rc;
}

static int l_list_files(lua_State *L) {
  size_t dlen;
  const char *dir = luaL_checklstring(L, 1, &dlen);
  while (dlen > 1 && dir[dlen - 1] == '/') dlen--;
  lua_newtable(L);
  int t = lua_gettop(L);
  buf *path = buf_box(L);
  if (buf_append(path, dir, dlen) != 0 || buf_byte(path, 0) != 0)
    return luaL_error(L, "list_files: not enough memory");
  path->len--;
  if (list_dir(L, t, path, dlen + 1, 0) != 0) {
    buf_free(path);
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  buf_free(path);
  lua_settop(L, t);
  return 1;
}

static int l_file_info(lua_State *L) {
  const char *p = luaL_checkstring(L, 1);
  struct stat st;
  if (stat(p, &st) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", p, strerror(errno));
    return 2;
  }
  lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "directory" : "other");
  lua_pushinteger(L, (lua_Integer)st.st_size);
  lua_pushinteger(L, (lua_Integer)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec);
  return 3;
}

static int l_sha256(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char d[CRYPTO_HMAC_LEN];
  if (crypto_sha256(s, len, d) != 0) return luaL_error(L, "sha256: libcrypto failed");
  push_hex(L, d, sizeof d);
  return 1;
}

static int l_remove_tree(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  if (pack_remove_tree(dir) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot remove %s: %s", dir, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* The absolute directories of a ";"-separated template list, before its "?". */
static void add_dirs(lua_State *L, int t, const char *list) {
  const char *p = list;
  while (*p) {
    const char *end = strchr(p, ';');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    const char *q = memchr(p, '?', n);
    if (p[0] == '/' && q) {
      lua_pushlstring(L, p, (size_t)(q - p));
      lua_rawseti(L, t, (lua_Integer)lua_rawlen(L, t) + 1);
    }
    p += n;
    if (*p == ';') p++;
  }
}

static int l_lua_system_dirs(lua_State *L) {
  lua_newtable(L);
  add_dirs(L, lua_gettop(L), LUA_PATH_DEFAULT);
  add_dirs(L, lua_gettop(L), LUA_CPATH_DEFAULT);
  return 1;
}

void flame_pack_open(lua_State *L) {
  static const luaL_Reg fns[] = {
    { "code_pack", l_code_pack }, { "code_unpack", l_code_unpack },
    { "list_files", l_list_files }, { "file_info", l_file_info },
    { "remove_tree", l_remove_tree }, { "sha256", l_sha256 }, { "lua_system_dirs", l_lua_system_dirs },
    { NULL, NULL }
  };
  luaL_setfuncs(L, fns, 0);
}
