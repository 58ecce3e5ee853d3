/*
 * terminator.c - the runner's terminator (`flame runner`), on the runner's main
 * libuv loop; no Lua runs on this thread.
 *
 * Contract (what docs/protocol.md and docs/backends.md promise of a runner):
 * - FLAME_PARENT is decoded and checked first (parent.c); a malformed, foreign or
 *   too new value exits 2 with a message saying what is wrong.
 * - It connects to the parent's addresses in turn (IP addresses, or names looked up
 *   with getaddrinfo), with backoff (50 ms doubling to 1 s), until the failsafe
 *   timeout; then proves it holds the runner's secret and
 *   makes the parent prove it too (HELLO, CHALLENGE, PROOF), and reports REMOTE_UP.
 *   A parent that cannot prove the secret is refused: nothing runs, exit 1.
 * - A parent that is gone, with a failsafe that is forever (boot_timeout =
 *   math.huge): once every address has refused the connection (ECONNREFUSED), on
 *   every attempt, for a grace period (the heartbeat window, heartbeat_interval x
 *   heartbeat_misses, at least 3 s) and a whole round of them, the runner gives
 *   up (exit 1, saying so). Why this rule: a parent listens before it boots any
 *   runner and keeps its listener until its pool ends, and no other process can
 *   answer for it (the ref and secret are one runner's), so a host that actively
 *   refuses on every address means the hub is gone; the grace lets a port forward,
 *   a NAT or a container network that comes up a little late do so. A timeout, an
 *   unreachable network or a name that does not resolve says nothing about the
 *   parent (a partition may heal), so those keep retrying forever, as the failsafe
 *   asks. Watching the parent's pid was the other choice: it works on one host
 *   only (not in a container's pid namespace, nor for Docker or Slurm runners
 *   elsewhere), and FLAME_PARENT does not carry it; a refusal is seen on any host.
 *   A finite failsafe keeps its own bound and is not shortened.
 * - SPAWN runs work on the executor with its deadline (killed there, "timeout");
 *   KILL kills it wherever it is, also when it overtakes its SPAWN (the last 1024
 *   such KILLs are remembered); RESULT goes back with the executor's bytes, uncopied. CONFIG carries
 *   the pool's idle check, run on the executor like work and killed after 5 s.
 * - Idle for idle_shutdown_after (and the idle check agrees): REMOTE_SHUTDOWN
 *   "idle", then stop. SHUTDOWN: drain, then stop. Parent lost (link closed, CLOSE,
 *   heartbeats missed): linked work is killed, unlinked work has shutdown_timeout to
 *   finish. Results and last words are flushed (up to 2 s) before the runner ends.
 * - The loop never waits on work: workers are threads, results arrive through the
 *   executor's async handle, so heartbeats go out while every worker computes.
 * - Then the backend's system_shutdown: the built-in backends' ends the process
 *   (the default); another backend's, if the runner can load it, runs in a
 *   sandboxed backend state for at most 5 s.
 * Test switch: FLAME_TEST_HOLD_SPAWN=1 makes the runner handle each SPAWN only after
 * the next message from the parent, so a spec can make a KILL overtake its SPAWN
 * (on loopback the race cannot be forced otherwise). Named in docs/protocol.md.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cJSON.h>
#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "flame.h"
#include "buf.h"
#include "codec.h"
#include "codedir.h"
#include "crypto.h"
#include "executor.h"
#include "link.h"
#include "loop.h"
#include "pack.h"
#include "parent.h"
#include "sandbox.h"
#include "terminator.h"
#include "wire.h"

#define CALL_BUCKETS 64
#define EARLY_KILLS_MAX 1024
#define IDLE_CHECK_ID (-1)               /* the executor job of the idle check */
#define IDLE_CHECK_LIMIT 5000            /* ms the idle check may run */
#define FLUSH_LIMIT 2000                 /* ms the last results may take to go out */
#define KILL_WAIT 250                    /* ms killed work may take to come back */
#define SHUTDOWN_LIMIT 5000              /* ms a backend's system_shutdown may run */
#define HANDSHAKE_MESSAGE (64 * 1024)    /* what an unproved parent may send at once */
#define ATTEMPT_MIN 1000                 /* ms an attempt gets at least, time allowing */
#define REFUSED_GRACE_MIN 3000           /* ms of refusals at least before a parent is gone */

typedef enum { S_CONNECTING, S_HANDSHAKE, S_UP, S_DRAINING, S_DONE } stage_t;
/* code_sync: no pack expected, waiting for it, unpacking, unpacked */
typedef enum { C_NONE, C_WAITING, C_UNPACKING, C_READY } code_stage_t;

typedef struct call {
  flame_handle base;                     /* first: its timer's data, freed on close */
  struct call *next;                     /* in its bucket */
  struct term *t;
  int64_t id;
  int linked;
  int timed;                             /* timer initialised */
  uv_timer_t timer;
} call;

typedef struct early_kill {
  int64_t id;
  int reason;
} early_kill;

/* A name lookup: its own allocation, freed by its callback, so one that timed out
 * can finish in the thread pool while the next attempt goes on. */
typedef struct lookup {
  uv_getaddrinfo_t req;
  struct term *t;
} lookup;

typedef struct term {
  uv_loop_t loop;
  flame_spin spin;                  /* the loop polls a while after each event */
  parent p;
  parent_settings *s;
  executor *ex;
  link_conn *conn;
  stage_t stage;
  int code;                              /* exit status */
  char failed[512];     /* why the runner never got up, if so */
  const char *stop_reason;
  int stopping;
  /* connecting */
  uint64_t deadline;
  int64_t delay;
  int addr;                              /* next address to try in this round */
  char last_err[LINK_REASON_MAX + 64];
  /* a parent that is gone (header): with a forever failsafe, refused_grace > 0 */
  uint64_t refused_grace;
  uint64_t refused_since;                /* when the current run of refusals began */
  int refusing;                          /* every attempt since refused_since refused */
  int round_refused;                     /* every attempt of this round refused */
  uv_timer_t connect_timer, retry_timer;
  struct lookup *lookup;                 /* a host name being resolved, or NULL */
  int lookups;                           /* lookups not yet answered (thread pool) */
  struct addrinfo *ai_list, *ai_cur;     /* a name's addresses, tried in turn */
  /* handshake */
  unsigned char nonce[WIRE_NONCE];
  uv_timer_t handshake_timer;
  /* heartbeats: messages received, counted at each tick */
  uint64_t msgs;
  wire_heartbeat hb;
  uv_timer_t hb_timer;
  /* calls */
  call *calls[CALL_BUCKETS];
  int ncalls;
  early_kill early[EARLY_KILLS_MAX];     /* id 0: a free slot */
  unsigned early_next;                   /* the slot a full memory overwrites next */
  buf held;                              /* FLAME_TEST_HOLD_SPAWN: the held SPAWN */
  int64_t held_id;
  int hold_spawn, holding;
  /* idle */
  buf idle_check;                        /* codec bytes of the pool's check, or empty */
  int checking;
  uv_timer_t idle_timer, check_timer, drain_timer, flush_timer;
  /* code_sync: with it, the executor starts once the code is unpacked */
  code_stage_t cstage;
  char code_dir[CODEDIR_PATH_MAX];       /* "" until unpacked */
  unsigned char code_hash[CRYPTO_HMAC_LEN];
  buf requires;                          /* --require's list (NUL-terminated), kept */
} term;

static void say(const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(stderr, "flame runner: %s\n", line);
}

static uint64_t now(term *t) {
  return uv_now(&t->loop);
}

static void lost(term *t, const char *reason);
static void maybe_end(term *t);
static void drain(term *t, const char *reason);
static void stop(term *t, const char *reason);
static void idle_start(term *t);

/* ------------------------------------------------------------------ calls ---- */

static call **bucket(term *t, int64_t id) {
  return &t->calls[(uint64_t)id % CALL_BUCKETS];
}

static call *call_find(term *t, int64_t id) {
  for (call *c = *bucket(t, id); c; c = c->next)
    if (c->id == id) return c;
  return NULL;
}

static void call_closed(uv_handle_t *h) {
  free(h->data);
}

/* Takes the call out of the table and frees it (after its timer has closed). */
static void call_remove(term *t, call *c) {
  for (call **p = bucket(t, c->id); *p; p = &(*p)->next) {
    if (*p == c) {
      *p = c->next;
      break;
    }
  }
  t->ncalls--;
  if (c->timed) uv_close((uv_handle_t *)&c->timer, call_closed);
  else free(c);
}

static int kill_reason(const unsigned char *s, size_t n) {
  static const struct { const char *name; int reason; } names[] = {
    { "timeout", SANDBOX_KILL_TIMEOUT }, { "cancelled", SANDBOX_KILL_CANCEL },
    { "shutdown", SANDBOX_KILL_SHUTDOWN }, { "killed", SANDBOX_KILL_REQUEST }
  };
  if (n == 0) return SANDBOX_KILL_CANCEL;
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (strlen(names[i].name) == n && memcmp(names[i].name, s, n) == 0) return names[i].reason;
  return SANDBOX_KILL_REQUEST;
}

/* ------------------------------------------------------------------ link ---- */

/* 0, or -1 when it could not be queued (then the link is being given up). */
static int send_msg(term *t, int type, int64_t id, const void *data, size_t len) {
  if (t->conn == NULL) return -1;
  int rc = link_send(t->conn, type, (uint64_t)id, NULL, 0, data, len);
  if (rc == -2) lost(t, "not enough memory to send a message");
  return rc == 0 ? 0 : -1;
}

/* A RESULT made here (killed before it ran, refused): status and one string. */
static void answer(term *t, int64_t id, int status, const char *text) {
  buf b;
  buf_init(&b);
  if (buf_byte(&b, (unsigned char)status) != 0 || codec_encode_cstring(&b, text) != 0) {
    buf_free(&b);
    lost(t, "not enough memory to answer a call");
    return;
  }
  if (t->conn) link_send_buf(t->conn, WIRE_RESULT, (uint64_t)id, &b);
  buf_free(&b);
}

/* Sends doc as JSON and deletes it; built_ok says every field could be added. */
static int send_json(term *t, int type, cJSON *doc, int built_ok) {
  char *text = doc && built_ok ? cJSON_PrintUnformatted(doc) : NULL;
  cJSON_Delete(doc);
  if (text == NULL) return -1;
  int rc = send_msg(t, type, 0, text, strlen(text));
  cJSON_free(text);
  return rc;
}

/* This runner's proof, or the one it expects of the parent (wire.h). */
static int proof(term *t, const char *role, const unsigned char *nonce, size_t nlen,
                 unsigned char out[CRYPTO_HMAC_LEN]) {
  return wire_proof(t->p.secret, t->p.secret_len, role, t->p.ref, nonce, nlen, out);
}

static int add_b64(cJSON *doc, const char *name, const unsigned char *bytes, size_t n) {
  char text[128];
  if (crypto_b64_size(n) > sizeof text) return -1;
  crypto_b64encode(bytes, n, text);
  return cJSON_AddStringToObject(doc, name, text) ? 0 : -1;
}

static void send_hello(term *t) {
  if (uv_random(NULL, NULL, t->nonce, sizeof t->nonce, 0, NULL) != 0) {
    lost(t, "cannot draw a nonce from the system's random source");
    return;
  }
  cJSON *doc = cJSON_CreateObject();
  int ok = doc && cJSON_AddNumberToObject(doc, "v", WIRE_PROTOCOL)
           && cJSON_AddStringToObject(doc, "ref", t->p.ref)
           && add_b64(doc, "nonce", t->nonce, sizeof t->nonce) == 0;
  if (send_json(t, WIRE_HELLO, doc, ok) != 0) lost(t, "not enough memory for the handshake");
}

static void refuse_parent(term *t) {
  static const char why[] = "the parent failed to prove the secret";
  send_msg(t, WIRE_CLOSE, 0, why, sizeof why - 1);
  snprintf(t->failed, sizeof t->failed,
           "the parent failed to prove it holds the runner's secret: refusing it");
  t->code = 1;
  stop(t, "refused");                        /* the refusal goes out, then the link ends */
}

static void on_challenge(term *t, const buf *msg) {
  cJSON *doc = cJSON_ParseWithLength(msg->data ? (const char *)msg->data : "", msg->len);
  unsigned char nonce[64], got[64], want[CRYPTO_HMAC_LEN];
  long nlen = cJSON_IsObject(doc) ? wire_b64_field(doc, "nonce", nonce, sizeof nonce) : -1;
  long plen = cJSON_IsObject(doc) ? wire_b64_field(doc, "proof", got, sizeof got) : -1;
  cJSON_Delete(doc);
  uv_timer_stop(&t->handshake_timer);
  if (nlen < WIRE_NONCE || plen < 0 || proof(t, "parent", t->nonce, sizeof t->nonce, want) != 0
      || !crypto_equal(got, (size_t)plen, want, sizeof want)) {
    refuse_parent(t);
    return;
  }
  char why[300];
  if (t->ex && executor_ready(t->ex, why, sizeof why) != 0) {
    char text[sizeof why + 32];               /* the parent learns why, and nothing runs */
    snprintf(text, sizeof text, "the runner cannot start: %s", why);
    send_msg(t, WIRE_CLOSE, 0, text, strlen(text));
    snprintf(t->failed, sizeof t->failed, "cannot start: %s", why);
    t->code = 1;
    stop(t, "cannot start");
    return;
  }
  unsigned char mine[CRYPTO_HMAC_LEN];
  if (proof(t, "runner", nonce, (size_t)nlen, mine) != 0) {
    lost(t, "cannot compute the proof (libcrypto failed)");
    return;
  }
  cJSON *pr = cJSON_CreateObject();
  if (send_json(t, WIRE_PROOF, pr, pr && add_b64(pr, "proof", mine, sizeof mine) == 0) != 0) {
    lost(t, "not enough memory for the handshake");
    return;
  }
  cJSON *up = cJSON_CreateObject();
  const char *host = t->p.host_env ? getenv(t->p.host_env) : NULL;
  int ok = up && cJSON_AddNumberToObject(up, "pid", (double)uv_os_getpid())
           && (host == NULL || cJSON_AddStringToObject(up, "host", host));
  if (send_json(t, WIRE_REMOTE_UP, up, ok) != 0) {
    lost(t, "not enough memory for the handshake");
    return;
  }
  if (t->stage != S_HANDSHAKE || t->conn == NULL) return;
  link_limits(t->conn, (size_t)t->s->max_message, LINK_PARTIALS_MAX);   /* proved: trusted */
  t->stage = S_UP;
  if (t->cstage == C_NONE) idle_start(t);      /* else once the code is there */
}

/* ------------------------------------------------------------------ work ---- */

static void on_deadline(uv_timer_t *h) {
  call *c = h->data;
  executor_kill(c->t->ex, c->id, SANDBOX_KILL_TIMEOUT);
}

static int early_take(term *t, int64_t id) {
  for (int i = 0; i < EARLY_KILLS_MAX; i++) {
    if (t->early[i].id == id) {
      t->early[i].id = 0;
      return t->early[i].reason;
    }
  }
  return 0;
}

/* A KILL for a call not seen (yet): remembered until its SPAWN comes. KILLs that
 * crossed their call's RESULT are never claimed; when the memory is full the
 * oldest-written slot goes, so it cannot fill up for good. */
static void early_put(term *t, int64_t id, int reason) {
  int slot = -1;
  for (int i = 0; i < EARLY_KILLS_MAX && slot < 0; i++)
    if (t->early[i].id == 0) slot = i;
  if (slot < 0) slot = t->early_next++ % EARLY_KILLS_MAX;
  t->early[slot].id = id;
  t->early[slot].reason = reason;
}

static void idle_stop(term *t) {
  uv_timer_stop(&t->idle_timer);
}

static void spawn(term *t, int64_t id, buf *msg) {
  char why[96];
  if (id <= 0) {
    snprintf(why, sizeof why, "protocol: SPAWN with id %lld", (long long)id);
    lost(t, why);
    return;
  }
  if (t->stage != S_UP) {
    answer(t, id, SANDBOX_KILLED, "shutdown");
    return;
  }
  int early = early_take(t, id);
  if (early) {                               /* killed before it arrived */
    answer(t, id, SANDBOX_KILLED, sandbox_kill_name(early));
    return;
  }
  uint64_t timeout;
  int linked;
  if (wire_spawn_parse(msg->data, msg->len, &timeout, &linked) != 0) {
    lost(t, "protocol: malformed SPAWN");
    return;
  }
  if (call_find(t, id)) {
    snprintf(why, sizeof why, "protocol: SPAWN of call %lld, which is running", (long long)id);
    lost(t, why);
    return;
  }
  call *c = calloc(1, sizeof *c);
  if (c == NULL) {
    answer(t, id, SANDBOX_ERROR, "the runner could not start the call: not enough memory");
    return;
  }
  c->base.on_close = call_closed;
  c->t = t;
  c->id = id;
  c->linked = linked;
  const char *err = "its code (code_sync) has not arrived yet";
  if (t->ex == NULL
      || executor_submit(t->ex, id, msg, WIRE_SPAWN_HEADER, EXECUTOR_WORK, &err) != 0) {
    free(c);
    char text[128];
    snprintf(text, sizeof text, "the runner could not start the call: %s", err);
    answer(t, id, SANDBOX_ERROR, text);
    return;
  }
  c->next = *bucket(t, id);
  *bucket(t, id) = c;
  t->ncalls++;
  idle_stop(t);
  if (timeout > 0) {
    if (uv_timer_init(&t->loop, &c->timer) == 0) {
      c->timed = 1;
      c->timer.data = c;
      if (uv_timer_start(&c->timer, on_deadline, timeout, 0) != 0)
        executor_kill(t->ex, id, SANDBOX_KILL_TIMEOUT);   /* no deadline: not unbounded */
    } else {
      executor_kill(t->ex, id, SANDBOX_KILL_TIMEOUT);
    }
  }
}

static void kill_call(term *t, int64_t id, const buf *msg) {
  int reason = kill_reason(msg->data, msg->len);
  if (call_find(t, id) && t->ex) {
    executor_kill(t->ex, id, reason);
  } else if (id > 0) {                      /* a KILL can overtake a long SPAWN */
    early_put(t, id, reason);
  }
}

static void go_idle(term *t) {
  send_msg(t, WIRE_REMOTE_SHUTDOWN, 0, "idle", 4);
  drain(t, "idle");
}

static void on_check_limit(uv_timer_t *h) {
  term *t = h->data;
  executor_kill(t->ex, IDLE_CHECK_ID, SANDBOX_KILL_TIMEOUT);
}

static void on_idle(uv_timer_t *h) {
  term *t = h->data;
  if (t->ncalls > 0 || t->stage != S_UP || t->checking || t->ex == NULL) return;
  if (t->idle_check.len == 0) {
    if (t->s->idle_check) idle_start(t);     /* its check has not come yet: wait for it */
    else go_idle(t);
    return;
  }
  /* the pool's check runs like work: in a sandbox, killed if it takes too long */
  buf copy;
  buf_init(&copy);
  const char *err = "not enough memory";
  if (buf_append(&copy, t->idle_check.data, t->idle_check.len) != 0
      || executor_submit(t->ex, IDLE_CHECK_ID, &copy, 0, EXECUTOR_CHECK, &err) != 0) {
    say("the idle check cannot run (%s): staying up", err);
    idle_start(t);
    return;
  }
  t->checking = 1;
  uv_timer_start(&t->check_timer, on_check_limit, IDLE_CHECK_LIMIT, 0);
}

static void idle_start(term *t) {
  idle_stop(t);
  if (t->s->idle_shutdown_after == PARENT_FOREVER) return;
  if (uv_timer_start(&t->idle_timer, on_idle, (uint64_t)t->s->idle_shutdown_after, 0) != 0)
    say("cannot start the idle timer: this runner will not idle down");
}

static void idle_checked(term *t, const buf *out, int truthy) {
  uv_timer_stop(&t->check_timer);
  t->checking = 0;
  if (t->stage == S_DONE) {
    maybe_end(t);
    return;
  }
  int status = out->len ? out->data[0] : SANDBOX_ERROR;
  if (status != SANDBOX_RESULT) {
    say("the idle check failed (%c): staying up", status);
    truthy = 0;
  }
  if (t->stage != S_UP || t->ncalls > 0) return;
  if (truthy) go_idle(t);
  else idle_start(t);
}

static void on_done(void *ud, int64_t id, buf *out, int truthy) {
  term *t = ud;
  if (id == IDLE_CHECK_ID) {
    idle_checked(t, out, truthy);
    return;
  }
  call *c = call_find(t, id);
  if (c == NULL) return;
  call_remove(t, c);
  if (t->conn) {
    if (out->len == 0) answer(t, id, SANDBOX_ERROR, "the runner ran out of memory");
    else if (link_send_buf(t->conn, WIRE_RESULT, (uint64_t)id, out) == -2)
      lost(t, "not enough memory to send a result");
  }
  if (t->ncalls == 0) {
    if (t->stage == S_DRAINING) stop(t, t->stop_reason);
    else if (t->stage == S_UP) idle_start(t);
    else maybe_end(t);
  }
}

/* -------------------------------------------------------------- executor ---- */

/* The workers and their first sandbox: path (NULL: the environment's) is their
 * package.path, code_dir (or NULL) what flame.parent().code_dir says. 0, or -1 with
 * why filled in. */
static int start_executor(term *t, const char *path, const char *code_dir, char *why,
                          size_t whylen) {
  const char *kv[] = { "ref", t->p.ref, "backend", t->p.backend, "node_base", t->p.node_base,
                       "host_env", t->p.host_env, "flame_vsn", t->p.flame_vsn,
                       "code_dir", code_dir };
  buf info;
  buf_init(&info);
  if (codec_encode_strings(&info, kv, 6) != 0) {
    snprintf(why, whylen, "out of memory");
    return -1;
  }
  sandbox_config cfg = { t->s->profile, (size_t)t->s->memory_limit,
                         t->requires.len > 1 ? (const char *)t->requires.data : NULL,
                         (const char *)info.data, info.len, path, NULL };
  const char *err;
  t->ex = executor_new(&t->loop, (int)t->s->max_concurrency, &cfg, EXECUTOR_PRESTART, on_done,
                       t, &err);
  buf_free(&info);
  if (t->ex == NULL) {
    snprintf(why, whylen, "%s", err);
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------- code_sync ---- */

static void code_answer(term *t, const char *text) {
  send_msg(t, WIRE_CODE, 0, text, strlen(text));
}

static void code_unpacked(void *ud, int ok, const char *dir, long files,
                          const unsigned char hash[CRYPTO_HMAC_LEN], const char *why) {
  term *t = ud;
  t->cstage = ok ? C_READY : C_WAITING;
  char text[1024];
  if (ok) {
    snprintf(t->code_dir, sizeof t->code_dir, "%s", dir);
    memcpy(t->code_hash, hash, CRYPTO_HMAC_LEN);
  }
  if (t->stage != S_UP) {                    /* stopping meanwhile: nothing to start */
    maybe_end(t);
    return;
  }
  if (!ok) {
    snprintf(text, sizeof text, "e%s", why);
    code_answer(t, text);
    say("%s", why);
    return;
  }
  char *path = codedir_lua_path(dir);
  char err[300];
  if (path == NULL || start_executor(t, path, dir, err, sizeof err) != 0
      || executor_ready(t->ex, err, sizeof err) != 0) {
    if (path == NULL) snprintf(err, sizeof err, "out of memory");
    free(path);
    snprintf(text, sizeof text, "ethe runner cannot start: %s", err);
    code_answer(t, text);
    snprintf(t->failed, sizeof t->failed, "cannot start: %s", err);
    t->cstage = C_READY;
    t->code = 1;
    stop(t, "cannot start");                 /* the answer goes out first */
    return;
  }
  free(path);
  text[0] = 'o';
  for (int i = 0; i < CRYPTO_HMAC_LEN; i++) snprintf(text + 1 + 2 * i, 3, "%02x", hash[i]);
  code_answer(t, text);
  say("code_sync: %ld files in %s", files, dir);
  idle_start(t);
}

/* CODE from the parent: unpacked off the loop; the answer goes back when done. */
static void code_arrived(term *t, buf *msg) {
  if (t->cstage == C_NONE) {
    code_answer(t, "ethis runner was not started with code_sync");
    return;
  }
  if (t->cstage == C_READY) {                  /* code reaches a runner once */
    unsigned char got[CRYPTO_HMAC_LEN];
    int same = msg->len >= CRYPTO_HMAC_LEN && memcmp(msg->data, t->code_hash, sizeof got) == 0;
    char text[2 * CRYPTO_HMAC_LEN + 2] = "o";
    for (int i = 0; same && i < CRYPTO_HMAC_LEN; i++)
      snprintf(text + 1 + 2 * i, 3, "%02x", t->code_hash[i]);
    code_answer(t, same ? text : "ethis runner has its code already (it comes once, at boot)");
    return;
  }
  if (t->cstage == C_UNPACKING) {
    code_answer(t, "ea code pack is being unpacked already");
    return;
  }
  const char *why;
  if (codedir_start(&t->loop, msg, code_unpacked, t, &why) != 0) {
    char text[256];
    snprintf(text, sizeof text, "e%s", why);
    code_answer(t, text);
    return;
  }
  t->cstage = C_UNPACKING;
}

/* -------------------------------------------------------------- messages ---- */

static void handle(term *t, int type, int64_t id, buf *msg) {
  if (type == WIRE_SPAWN) spawn(t, id, msg);
  else if (type == WIRE_KILL) kill_call(t, id, msg);
  else if (type == WIRE_SHUTDOWN) drain(t, "shutdown");
  else if (type == WIRE_CONFIG) {
    buf_free(&t->idle_check);              /* work, run in a sandbox when idle */
    t->idle_check = *msg;
    buf_init(msg);
  } else if (type == WIRE_CODE) {
    code_arrived(t, msg);
  } else if (type != WIRE_PING) say("ignoring a message of unknown type %d", type);
}

/* FLAME_TEST_HOLD_SPAWN: the held SPAWN, handled now that another message came. */
static void release_held(term *t) {
  if (!t->holding) return;
  t->holding = 0;
  buf held = t->held;
  buf_init(&t->held);
  spawn(t, t->held_id, &held);
  buf_free(&held);
}

static void on_message(link_conn *c, void *ud, int type, uint64_t uid, buf *msg) {
  term *t = ud;
  int64_t id = (int64_t)uid;
  if (c != t->conn) return;
  t->msgs++;
  if (type == WIRE_CLOSE) {
    char why[LINK_REASON_MAX];
    snprintf(why, sizeof why, "the parent closed the link: %.*s", (int)msg->len,
             msg->data ? (const char *)msg->data : "");
    lost(t, why);
    return;
  }
  if (t->stage == S_HANDSHAKE) {
    if (type == WIRE_CHALLENGE) on_challenge(t, msg);
    else if (type != WIRE_PING) {
      char why[96];
      wire_unexpected(why, sizeof why, type, " during the handshake");
      lost(t, why);
    }
    return;
  }
  if (t->stage != S_UP && t->stage != S_DRAINING) return;
  if (t->hold_spawn) {                       /* test switch: SPAWN after the next one */
    if (type == WIRE_SPAWN) {
      release_held(t);
      t->held = *msg;
      buf_init(msg);
      t->held_id = id;
      t->holding = 1;
      return;
    }
    handle(t, type, id, msg);
    if (t->conn == c) release_held(t);
    return;
  }
  handle(t, type, id, msg);
}

static void on_flush_limit(uv_timer_t *h);

static void on_close(link_conn *c, void *ud, const char *reason) {
  term *t = ud;
  if (c != t->conn) return;                  /* a connection we had let go of */
  t->conn = NULL;
  if (t->stage == S_DONE) {                  /* the last words are out */
    if (t->ncalls > 0 || t->checking)        /* killed work gets KILL_WAIT from here */
      uv_timer_start(&t->flush_timer, on_flush_limit, KILL_WAIT, 0);
    maybe_end(t);
    return;
  }
  lost(t, reason);
}

static const link_handlers handlers = { on_message, on_close };

/* ------------------------------------------------------- heartbeats, loss ---- */

static void on_heartbeat(uv_timer_t *h) {
  term *t = h->data;
  if (t->stage != S_HANDSHAKE && t->stage != S_UP && t->stage != S_DRAINING) return;
  if (t->conn == NULL || link_closing(t->conn)) return;   /* nothing to watch now */
  send_msg(t, WIRE_PING, 0, NULL, 0);
  if (t->stage == S_HANDSHAKE) return;      /* bounded by its own timer */
  char why[128];
  if (wire_heartbeat_tick(&t->hb, t->msgs, t->s->heartbeat_misses, t->s->heartbeat_interval,
                          "parent", why, sizeof why))
    lost(t, why);
}

/* The parent is gone: linked work dies with it, unlinked work may finish. */
static void lost(term *t, const char *reason) {
  if (t->stage == S_DONE) return;
  say("lost the parent: %s", reason);
  link_conn *c = t->conn;
  t->conn = NULL;
  if (c) link_close(c, reason);
  uv_timer_stop(&t->handshake_timer);
  for (int b = 0; b < CALL_BUCKETS; b++)
    for (call *k = t->calls[b]; k; k = k->next)
      if (k->linked && t->ex) executor_kill(t->ex, k->id, SANDBOX_KILL_CANCEL);
  if (t->stage == S_UP) {
    drain(t, "parent_lost");
  } else if (t->stage != S_DRAINING) {       /* refused or lost before it was up */
    snprintf(t->failed, sizeof t->failed, "%s", reason);
    t->code = 1;
    stop(t, "parent_lost");
  }
}

static void on_drained(uv_timer_t *h) {
  term *t = h->data;
  stop(t, t->stop_reason);
}

/* Stops taking work; once the calls in flight end (or shutdown_timeout passes),
 * the runner stops. */
static void drain(term *t, const char *reason) {
  if (t->stage == S_DRAINING || t->stage == S_DONE) return;
  t->stage = S_DRAINING;
  t->stop_reason = reason;
  idle_stop(t);
  if (t->ncalls == 0) {
    stop(t, reason);
    return;
  }
  if (t->s->shutdown_timeout != PARENT_FOREVER)
    uv_timer_start(&t->drain_timer, on_drained, (uint64_t)t->s->shutdown_timeout, 0);
}

static void on_flush_limit(uv_timer_t *h) {
  uv_stop(h->loop);
}

/* The loop ends once the link has closed and the killed work has come back. */
static void maybe_end(term *t) {
  if (t->stopping && t->conn == NULL && t->ncalls == 0 && !t->checking
      && t->cstage != C_UNPACKING)
    uv_stop(&t->loop);
}

/* The end: calls still running are killed, the last messages go out (up to
 * FLUSH_LIMIT), then the loop stops. */
static void stop(term *t, const char *reason) {
  if (t->stopping) return;
  t->stopping = 1;
  t->stage = S_DONE;
  t->stop_reason = reason;
  uv_timer_stop(&t->idle_timer);
  uv_timer_stop(&t->hb_timer);
  uv_timer_stop(&t->drain_timer);
  uv_timer_stop(&t->connect_timer);
  uv_timer_stop(&t->retry_timer);
  uv_timer_stop(&t->handshake_timer);
  if (t->lookup) {                           /* answered into the void, then freed */
    uv_cancel((uv_req_t *)&t->lookup->req);
    t->lookup = NULL;
  }
  for (int b = 0; b < CALL_BUCKETS; b++)
    for (call *k = t->calls[b]; k; k = k->next) executor_kill(t->ex, k->id, SANDBOX_KILL_SHUTDOWN);
  if (t->checking) executor_kill(t->ex, IDLE_CHECK_ID, SANDBOX_KILL_SHUTDOWN);
  if (t->conn) {                             /* last results and messages go out first */
    char why[LINK_REASON_MAX];
    snprintf(why, sizeof why, "runner stopping: %s", reason);
    link_finish(t->conn, why);
  }
  /* work blocked in a C call (a subprocess) does not come back at once: the wait is
   * bounded, and then the process ends without joining its worker */
  uv_timer_start(&t->flush_timer, on_flush_limit, t->conn ? FLUSH_LIMIT : KILL_WAIT, 0);
  maybe_end(t);
}

/* ------------------------------------------------------------- connecting ---- */

static void try_next(term *t);
static void on_connect_limit(uv_timer_t *h);

/* Each failed attempt's outcome, for the rule of a parent that is gone (header):
 * only a refusal continues a run of refusals; anything else (a timeout, a name that
 * does not resolve, another error) ends it, as it says nothing about the parent. */
static void attempt_failed(term *t, int status) {
  if (status == UV_ECONNREFUSED) {
    if (!t->refusing) t->refused_since = now(t);
    t->refusing = 1;
  } else {
    t->refusing = 0;
    t->round_refused = 0;
  }
}

static void on_handshake_limit(uv_timer_t *h) {
  term *t = h->data;
  if (t->stage == S_HANDSHAKE) lost(t, "no challenge from the parent: timed out waiting for CHALLENGE");
}

static void on_connected(link_conn *c, void *ud, int status) {
  term *t = ud;
  if (t->stage != S_CONNECTING || c != t->conn) {   /* an attempt given up on */
    if (status == 0) link_close(c, "too late");
    return;
  }
  uv_timer_stop(&t->connect_timer);
  if (status != 0) {
    t->conn = NULL;                          /* it closes by itself */
    snprintf(t->last_err, sizeof t->last_err, "%s: %s (%s)", t->p.addrs[t->addr - 1],
             uv_strerror(status), uv_err_name(status));
    attempt_failed(t, status);
    try_next(t);
    return;
  }
  t->stage = S_HANDSHAKE;
  /* until the parent has proved the secret, it may make this side hold little */
  if (link_start(c, &handlers, t, HANDSHAKE_MESSAGE) != 0) return;  /* on_close follows */
  link_limits(c, HANDSHAKE_MESSAGE, 1);
  /* TLS keyed by the secret, when the parent said so: the HELLO waits for it */
  if (t->p.tls && link_tls_client(c, t->p.ref, t->p.secret, t->p.secret_len) != 0) return;
  uint64_t window = (uint64_t)t->s->heartbeat_interval * (uint64_t)t->s->heartbeat_misses;
  uv_timer_start(&t->handshake_timer, on_handshake_limit, window, 0);
  send_hello(t);
}

static void on_connect_limit(uv_timer_t *h) {
  term *t = h->data;
  if (t->stage != S_CONNECTING) return;
  if (t->lookup) {                           /* its answer will be ignored */
    uv_cancel((uv_req_t *)&t->lookup->req);
    t->lookup = NULL;
    snprintf(t->last_err, sizeof t->last_err, "%s: name lookup timed out",
             t->p.addrs[t->addr - 1]);
    attempt_failed(t, UV_ETIMEDOUT);
    try_next(t);
    return;
  }
  if (t->conn == NULL) return;
  link_conn *c = t->conn;
  t->conn = NULL;
  snprintf(t->last_err, sizeof t->last_err, "%s: connect timed out", t->p.addrs[t->addr - 1]);
  link_close(c, "connect timed out");
  attempt_failed(t, UV_ETIMEDOUT);
  try_next(t);
}

/* Connects to one resolved address of the current attempt. */
static void connect_to(term *t, const char *addr, const struct sockaddr *sa) {
  int err = 0;
  link_conn *c = link_connect(&t->loop, sa, on_connected, t, &err);
  if (c == NULL) {
    uv_timer_stop(&t->connect_timer);
    snprintf(t->last_err, sizeof t->last_err, "%s: %s (%s)", addr, uv_strerror(err),
             uv_err_name(err));
    attempt_failed(t, err);
    try_next(t);
    return;
  }
  link_set_handlers(c, &handlers, t);
  t->conn = c;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  lookup *l = req->data;
  term *t = l->t;
  t->lookups--;
  int current = t->lookup == l;
  if (current) t->lookup = NULL;
  free(l);
  if (!current || status == UV_ECANCELED || t->stage != S_CONNECTING) {
    uv_freeaddrinfo(res);
    return;
  }
  const char *addr = t->p.addrs[t->addr - 1];
  if (status != 0 || res == NULL) {
    uv_timer_stop(&t->connect_timer);
    snprintf(t->last_err, sizeof t->last_err, "%s: cannot resolve the name (%s)", addr,
             uv_strerror(status ? status : UV_EAI_NONAME));
    uv_freeaddrinfo(res);
    attempt_failed(t, status ? status : UV_EAI_NONAME);
    try_next(t);
    return;
  }
  t->ai_list = t->ai_cur = res;              /* each address in turn (::1, then 127.0.0.1) */
  connect_to(t, addr, res->ai_addr);
}

static void arm_attempt(term *t, uint64_t n) {
  /* a lookup and a connect together; a blackholed address leaves time for the
   * others: its share of what is left, at least ATTEMPT_MIN */
  uint64_t left = t->deadline - n, limit = left / (uint64_t)t->p.naddrs;
  if (limit < ATTEMPT_MIN) limit = ATTEMPT_MIN;
  if (limit > left) limit = left;
  uv_timer_start(&t->connect_timer, on_connect_limit, limit ? limit : 1, 0);
}

static void on_retry(uv_timer_t *h) {
  term *t = h->data;
  t->addr = 0;
  t->round_refused = 1;                      /* until an attempt says otherwise */
  try_next(t);
}

static void give_up(term *t) {
  snprintf(t->failed, sizeof t->failed,
           "could not reach the parent within the failsafe timeout of %lld ms (%.300s)",
           (long long)t->s->failsafe_timeout, t->last_err[0] ? t->last_err : "no address");
  t->code = 1;
  stop(t, "failsafe");
}

/* The rule of a parent that is gone (header), checked at the end of each round. */
static int parent_gone(term *t, uint64_t n) {
  if (t->refused_grace == 0 || !t->round_refused || !t->refusing
      || n - t->refused_since < t->refused_grace)
    return 0;
  snprintf(t->failed, sizeof t->failed,
           "the parent is gone: every address in FLAME_PARENT refused the connection for "
           "%llu ms, and this runner never reached it (last: %.200s); its failsafe timeout "
           "is forever, so it stops rather than retry for good. If the parent still runs, "
           "it does not listen there: check the pool's link.advertise",
           (unsigned long long)(n - t->refused_since), t->last_err);
  t->code = 1;
  stop(t, "parent_gone");
  return 1;
}

/* One attempt at the next address; after the last of a round, a pause that doubles
 * (up to 1 s); past the failsafe deadline, the runner gives up. */
static void try_next(term *t) {
  if (t->stage != S_CONNECTING) return;
  uint64_t n = now(t);
  if (n >= t->deadline) {
    give_up(t);
    return;
  }
  if (t->ai_cur && t->ai_cur->ai_next) {     /* the next address of the same name */
    t->ai_cur = t->ai_cur->ai_next;
    arm_attempt(t, n);
    connect_to(t, t->p.addrs[t->addr - 1], t->ai_cur->ai_addr);
    return;
  }
  if (t->ai_list) {
    uv_freeaddrinfo(t->ai_list);
    t->ai_list = t->ai_cur = NULL;
  }
  if (t->addr >= t->p.naddrs) {
    if (parent_gone(t, n)) return;
    uint64_t pause = (uint64_t)t->delay;
    if (pause > t->deadline - n) pause = t->deadline - n;
    t->delay = t->delay * 2 > 1000 ? 1000 : t->delay * 2;
    if (uv_timer_start(&t->retry_timer, on_retry, pause, 0) != 0) give_up(t);
    return;
  }
  const char *addr = t->p.addrs[t->addr++];
  arm_attempt(t, n);
  struct sockaddr_storage sa;
  if (link_parse_hostport(addr, &sa) == 0) {
    connect_to(t, addr, (struct sockaddr *)&sa);
    return;
  }
  char host[256], port[8];                   /* a name: checked when FLAME_PARENT was read */
  int pn = 0;
  link_split_hostport(addr, host, sizeof host, &pn);
  snprintf(port, sizeof port, "%d", pn);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  lookup *l = malloc(sizeof *l);
  int rc = l ? 0 : UV_ENOMEM;
  if (l) {
    l->t = t;
    l->req.data = l;
    rc = uv_getaddrinfo(&t->loop, &l->req, on_resolved, host, port, &hints);
    if (rc != 0) free(l);
    else t->lookups++;
  }
  if (rc != 0) {
    uv_timer_stop(&t->connect_timer);
    snprintf(t->last_err, sizeof t->last_err, "%s: cannot resolve the name (%s)", addr,
             uv_strerror(rc));
    attempt_failed(t, rc);
    try_next(t);
    return;
  }
  t->lookup = l;
}

/* ---------------------------------------------------------- system_shutdown ---- */

/* Runs in the backend state: finds the backend, calls its system_shutdown. */
static const char SHUTDOWN_CHUNK[] =
  "local name, exit, write = ...\n"
  "local B, why\n"
  "for _, m in ipairs { 'flame.backends.' .. name, name } do\n"
  "  local ok, mod = pcall(require, m)\n"
  "  if ok then B = mod break end\n"
  "  if not tostring(mod):find(\"module '\" .. m .. \"' not found\", 1, true) then why = mod end\n"
  "end\n"
  "if why then write('system_shutdown: cannot load backend ' .. name .. ': ' .. tostring(why)) end\n"
  "if type(B) ~= 'table' or type(B.system_shutdown) ~= 'function' then return end\n"
  "local function say(fmt, ...) write(string.format(fmt, ...)) end\n"
  "B.system_shutdown { exit = exit, log = { info = say, warn = say, error = say,\n"
  "                                          debug = function() end } }\n";

static int sys_exit(lua_State *L) {
  int code = (int)lua_tointeger(L, lua_upvalueindex(1));
  int asked = (int)luaL_optinteger(L, 1, 0);
  fflush(NULL);
  _exit(code != 0 ? code : asked);           /* a failed runner keeps its status */
  return 0;
}

static int sys_write(lua_State *L) {
  say("%s", luaL_checkstring(L, 1));
  return 0;
}

/* package.path as lua5.4 makes it (LUA_PATH_5_4, LUA_PATH, ";;" for the default),
 * then the installation's own directory. */
static char *lua_path(void) {
  const char *env = getenv("LUA_PATH_5_4");
  if (env == NULL) env = getenv("LUA_PATH");
  buf b;
  buf_init(&b);
  int bad = 0;
  if (env == NULL) {
    bad |= buf_append(&b, LUA_PATH_DEFAULT, strlen(LUA_PATH_DEFAULT));
  } else {
    const char *dd = strstr(env, ";;");
    if (dd == NULL) {
      bad |= buf_append(&b, env, strlen(env));
    } else {
      bad |= buf_append(&b, env, (size_t)(dd - env));
      bad |= buf_append(&b, ";" LUA_PATH_DEFAULT ";", strlen(LUA_PATH_DEFAULT) + 2);
      bad |= buf_append(&b, dd + 2, strlen(dd + 2));
    }
  }
  char exe[4096];
  size_t size = sizeof exe;
  if (uv_exepath(exe, &size) == 0) {
    char *slash = strrchr(exe, '/');
    if (slash) {
      static const char *const tails[] = { "/../share/lua/5.4/?.lua",
                                           "/../share/lua/5.4/?/init.lua" };
      *slash = '\0';
      for (int i = 0; i < 2; i++) {
        bad |= buf_byte(&b, ';');
        bad |= buf_append(&b, exe, strlen(exe));
        bad |= buf_append(&b, tails[i], strlen(tails[i]));
      }
    }
  }
  bad |= buf_byte(&b, 0);
  if (bad) {
    buf_free(&b);
    return NULL;
  }
  return (char *)b.data;
}

static void system_shutdown(term *t) {
  static const char *const builtin[] = { "process", "docker", "local", NULL };
  for (const char *const *b = builtin; *b; b++)
    if (strcmp(t->p.backend, *b) == 0) return;   /* theirs ends the process: ours does */
  char *path = lua_path();
  if (path == NULL) {
    say("system_shutdown: out of memory");
    return;
  }
  sandbox_config cfg = { SANDBOX_BACKEND, 64 * 1024 * 1024, NULL, NULL, 0, path, NULL };
  const char *err;
  sandbox *sb = sandbox_new(&cfg, &err);
  free(path);
  if (sb == NULL) {
    say("system_shutdown: cannot make a backend state: %s", err);
    return;
  }
  lua_State *L = sandbox_state(sb);
  if (luaL_loadbufferx(L, SHUTDOWN_CHUNK, sizeof SHUTDOWN_CHUNK - 1, "=(system_shutdown)", "t")
      != LUA_OK) {
    say("system_shutdown: %s", lua_tostring(L, -1));
  } else {
    lua_pushstring(L, t->p.backend);
    lua_pushinteger(L, t->code);
    lua_pushcclosure(L, sys_exit, 1);
    lua_pushcfunction(L, sys_write);
    if (sandbox_pcall_bounded(sb, 3, 0, SHUTDOWN_LIMIT) != LUA_OK)
      say("system_shutdown failed: %s", lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                                                       : "(not a string)");
  }
  sandbox_close(sb);
}

/* ------------------------------------------------------------------- main ---- */

static int timer(term *t, uv_timer_t *h) {
  if (uv_timer_init(&t->loop, h) != 0) return -1;
  h->data = t;
  return 0;
}

/* At exit: the terminator's own timers (data: the term) close without a callback;
 * anything else carries a flame_handle that frees it. */
static void close_walk(uv_handle_t *h, void *arg) {
  if (uv_is_closing(h)) return;
  flame_handle *fh = h->data;
  uv_close(h, h->data == arg || fh == NULL ? NULL : fh->on_close);
}

static int usage(const char *arg) {
  say("unknown argument '%s'", arg);
  return 2;
}

int terminator_main(int argc, char **argv) {
  buf requires;
  buf_init(&requires);
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--require") == 0 && i + 1 < argc) {
      if ((requires.len && buf_byte(&requires, ',') != 0)
          || buf_append(&requires, argv[i + 1], strlen(argv[i + 1])) != 0) {
        buf_free(&requires);
        say("out of memory");
        return 1;
      }
      i++;
    } else {
      buf_free(&requires);
      return usage(argv[i]);
    }
  }
  const char *raw = getenv("FLAME_PARENT");
  if (raw == NULL || raw[0] == '\0') {
    buf_free(&requires);
    say("FLAME_PARENT is not set (a backend starts runners with it; see docs/backends.md)");
    return 2;
  }
  static term T;                             /* one per process; static: no big stack */
  term *t = &T;
  char why[256];
  if (parent_decode(raw, &t->p, why, sizeof why) != 0) {
    buf_free(&requires);
    say("FLAME_PARENT is malformed: %s", why);
    return 2;
  }
  t->s = &t->p.settings;
  const char *hold = getenv("FLAME_TEST_HOLD_SPAWN");
  t->hold_spawn = hold && strcmp(hold, "1") == 0;

  if (buf_byte(&requires, 0) != 0) {
    say("out of memory");
    buf_free(&requires);
    parent_free(&t->p);
    return 1;
  }
  t->requires = requires;
  int rc = uv_loop_init(&t->loop);
  if (rc != 0) {
    say("cannot start: cannot make the event loop: %s", uv_strerror(rc));
    buf_free(&t->requires);
    parent_free(&t->p);
    return 1;
  }
  if ((rc = flame_spin_start(&t->loop, &t->spin, &t->ncalls)) != 0)
    say("the loop will sleep between events: %s", uv_strerror(rc));   /* only slower */
  uv_thread_t warm;                          /* OpenSSL's first use costs a millisecond:
                                               paid beside the connect, not after it */
  int warming = uv_thread_create(&warm, t->p.tls ? tls_warm_client : crypto_warm, NULL) == 0;
  char err[300];
  if (t->s->code_sync) {
    /* the workers start once the code is there, with it first on their path (and
     * --require finds it); what earlier runners left behind goes first */
    t->cstage = C_WAITING;
    codedir_sweep();
  } else if (start_executor(t, NULL, NULL, err, sizeof err) != 0) {
    say("cannot start: %s", err);
    if (warming) uv_thread_join(&warm);
    uv_loop_close(&t->loop);
    buf_free(&t->requires);
    parent_free(&t->p);
    return 1;
  }
  if (timer(t, &t->connect_timer) || timer(t, &t->retry_timer) || timer(t, &t->handshake_timer)
      || timer(t, &t->hb_timer) || timer(t, &t->idle_timer) || timer(t, &t->check_timer)
      || timer(t, &t->drain_timer) || timer(t, &t->flush_timer)) {
    say("cannot start: cannot make the runner's timers");
    t->code = 1;
  } else {
    uint64_t every = (uint64_t)t->s->heartbeat_interval;
    t->delay = 50;
    t->deadline = t->s->failsafe_timeout == PARENT_FOREVER
                    ? UINT64_MAX : now(t) + (uint64_t)t->s->failsafe_timeout;
    t->stage = S_CONNECTING;
    t->round_refused = 1;
    if (t->s->failsafe_timeout == PARENT_FOREVER) {
      /* at most a day times a million: no overflow (parent.c caps both) */
      t->refused_grace = (uint64_t)t->s->heartbeat_interval * (uint64_t)t->s->heartbeat_misses;
      if (t->refused_grace < REFUSED_GRACE_MIN) t->refused_grace = REFUSED_GRACE_MIN;
    }
    if (uv_timer_start(&t->hb_timer, on_heartbeat, every, every) != 0) {
      say("cannot start: cannot start the heartbeat timer");
      t->code = 1;
    } else {
      try_next(t);
      uv_run(&t->loop, UV_RUN_DEFAULT);
      while (t->cstage == C_UNPACKING) uv_run(&t->loop, UV_RUN_ONCE);   /* its files end */
    }
  }
  if (t->code_dir[0] && pack_remove_tree(t->code_dir) != 0)
    say("code_sync: cannot remove %s: %s", t->code_dir, strerror(errno));
  if (warming) uv_thread_join(&warm);
  if (t->failed[0]) say("%s", t->failed);
  else if (t->code == 0) say("stopping (%s)", t->stop_reason ? t->stop_reason : "stopped");
  /* a name lookup still in the thread pool cannot be cancelled: it would hold the
   * loop's close below, perhaps for a resolver's whole timeout */
  int clean = t->ncalls == 0 && !t->checking && t->lookups == 0;
  if (t->ai_list) uv_freeaddrinfo(t->ai_list);
  t->ai_list = t->ai_cur = NULL;
  system_shutdown(t);
  if (!clean) {
    /* work still in C calls (a subprocess, say) would hold the workers' join: the
     * process ends now, as the default system_shutdown does */
    fflush(NULL);
    _exit(t->code);
  }
  if (t->ex) executor_close(t->ex, 1);
  if (t->conn) link_close(t->conn, "runner stopped");
  t->conn = NULL;
  flame_spin_close(&t->spin);               /* its handles are not flame handles */
  uv_walk(&t->loop, close_walk, t);
  uv_run(&t->loop, UV_RUN_DEFAULT);          /* close callbacks free their memory */
  if (uv_loop_close(&t->loop) != 0) say("the loop still had handles at exit");
  buf_free(&t->idle_check);
  buf_free(&t->held);
  buf_free(&t->requires);
  parent_free(&t->p);
  return t->code;
}
