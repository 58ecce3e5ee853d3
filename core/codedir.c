/*
 * codedir.c - a runner's code_sync directory (contract in codedir.h).
 */
#define _XOPEN_SOURCE 700                /* mkdtemp */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lua.h>

#include "codedir.h"
#include "pack.h"

typedef struct job {
  uv_work_t req;
  buf payload;
  codedir_done_fn done;
  void *ud;
  int ok;
  long files;
  unsigned char hash[CRYPTO_HMAC_LEN];
  char dir[CODEDIR_PATH_MAX];
  char why[768];
} job;

static const char *tmp_base(void) {
  const char *t = getenv("TMPDIR");
  return t && t[0] == '/' && strlen(t) < CODEDIR_PATH_MAX - 64 ? t : "/tmp";
}

static void work(uv_work_t *req) {
  job *j = req->data;
  const unsigned char *p = j->payload.data;
  size_t n = j->payload.len;
  if (n < CRYPTO_HMAC_LEN) {
    snprintf(j->why, sizeof j->why, "code_sync: the pack is cut short (%zu bytes)", n);
    return;
  }
  memcpy(j->hash, p, CRYPTO_HMAC_LEN);
  unsigned char got[CRYPTO_HMAC_LEN];
  if (crypto_sha256(p + CRYPTO_HMAC_LEN, n - CRYPTO_HMAC_LEN, got) != 0) {
    snprintf(j->why, sizeof j->why, "code_sync: SHA-256 failed in libcrypto");
    return;
  }
  if (memcmp(got, j->hash, CRYPTO_HMAC_LEN) != 0) {
    snprintf(j->why, sizeof j->why, "code_sync: the pack's SHA-256 is not the one it was "
             "sent with (damaged on the way)");
    return;
  }
  snprintf(j->dir, sizeof j->dir, "%s/flame-code-%ld-XXXXXX", tmp_base(), (long)getpid());
  if (mkdtemp(j->dir) == NULL) {
    snprintf(j->why, sizeof j->why, "code_sync: cannot make a directory like %.500s: %s", j->dir,
             strerror(errno));
    return;
  }
  if (pack_unpack(p + CRYPTO_HMAC_LEN, n - CRYPTO_HMAC_LEN, j->dir, &j->files, j->why,
                  sizeof j->why) != 0) {
    pack_remove_tree(j->dir);
    return;
  }
  j->ok = 1;
}

static void after(uv_work_t *req, int status) {
  job *j = req->data;
  buf_free(&j->payload);
  if (status != 0 && !j->ok)
    snprintf(j->why, sizeof j->why, "code_sync: the unpacking did not run: %s",
             uv_strerror(status));
  j->done(j->ud, j->ok, j->ok ? j->dir : NULL, j->files, j->hash, j->why);
  free(j);
}

int codedir_start(uv_loop_t *loop, buf *payload, codedir_done_fn done, void *ud,
                  const char **why) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL) {
    buf_free(payload);
    *why = "code_sync: not enough memory";
    return -1;
  }
  j->payload = *payload;
  buf_init(payload);
  j->done = done;
  j->ud = ud;
  j->req.data = j;
  int rc = uv_queue_work(loop, &j->req, work, after);
  if (rc != 0) {
    buf_free(&j->payload);
    free(j);
    *why = "code_sync: cannot queue the unpacking on libuv's thread pool";
    return -1;
  }
  return 0;
}

void codedir_sweep(void) {
  const char *base = tmp_base();
  DIR *d = opendir(base);
  if (d == NULL) return;
  struct dirent *e;
  uid_t me = getuid();
  while ((e = readdir(d)) != NULL) {
    long pid;
    char rest[16];
    if (sscanf(e->d_name, "flame-code-%ld-%15s", &pid, rest) != 2 || pid <= 0
        || strlen(rest) != 6)
      continue;
    if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;   /* alive, or not ours */
    char path[CODEDIR_PATH_MAX + 256];
    snprintf(path, sizeof path, "%s/%s", base, e->d_name);
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != me) continue;
    pack_remove_tree(path);
  }
  closedir(d);
}

/* s with its first ";;" replaced by Lua's default path, as Lua's setpath does: a
 * prefix and a suffix keep a ";" between them and the default, nothing else. */
static int add_expanded(buf *out, const char *s) {
  const char *dd = strstr(s, ";;");
  if (dd == NULL) return buf_append(out, s, strlen(s));
  if (dd > s && (buf_append(out, s, (size_t)(dd - s)) != 0 || buf_byte(out, ';') != 0))
    return -1;
  if (buf_append(out, LUA_PATH_DEFAULT, strlen(LUA_PATH_DEFAULT)) != 0) return -1;
  if (dd[2] != '\0' && (buf_byte(out, ';') != 0 || buf_append(out, dd + 2, strlen(dd + 2)) != 0))
    return -1;
  return 0;
}

char *codedir_lua_path(const char *dir) {
  const char *env = getenv("LUA_PATH_5_4");
  if (env == NULL) env = getenv("LUA_PATH");
  buf b;
  buf_init(&b);
  int rc = buf_append(&b, dir, strlen(dir)) || buf_append(&b, "/?.lua;", 7)
           || buf_append(&b, dir, strlen(dir)) || buf_append(&b, "/?/init.lua;", 12)
           || (env ? add_expanded(&b, env) : buf_append(&b, LUA_PATH_DEFAULT,
                                                         strlen(LUA_PATH_DEFAULT)))
           || buf_byte(&b, 0);
  if (rc != 0) {
    buf_free(&b);
    return NULL;
  }
  return (char *)b.data;
}
