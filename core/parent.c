/*
 * parent.c - FLAME_PARENT decoded and checked (contract in parent.h). Every field a
 * runner relies on is checked for its type before it is used; settings left out
 * take the defaults the parent would have sent.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "crypto.h"
#include "link.h"
#include "parent.h"

#define PARENT_VALUE_MAX (64 * 1024)

typedef struct check {
  char *why;
  size_t whylen;
} check;

static int fail(check *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->why, c->whylen, fmt, ap);
  va_end(ap);
  return -1;
}

static char *dup_string(const cJSON *item) {
  return cJSON_IsString(item) && item->valuestring ? strdup(item->valuestring) : NULL;
}

/* An integral number: 0 with *out set, or -1. */
static int integer_of(const cJSON *item, int64_t *out) {
  if (!cJSON_IsNumber(item)) return -1;
  double d = item->valuedouble;
  if (!isfinite(d) || d != floor(d) || d < -9.0e15 || d > 9.0e15) return -1;
  *out = (int64_t)d;
  return 0;
}

/* A time in ms (-1: forever) or count; left out: the default. */
static int setting(check *c, const cJSON *settings, const char *name, int64_t def,
                   int64_t min, int forever_ok, int64_t *out) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(settings, name);
  *out = def;
  if (item == NULL || cJSON_IsNull(item)) return 0;
  /* the parent's options are Lua numbers: a fraction of a millisecond rounds up */
  if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble)
      || item->valuedouble < -9.0e15 || item->valuedouble > 9.0e15)
    return fail(c, "setting %s is not a number", name);
  if (item->valuedouble < -1 || (item->valuedouble < 0 && !(item->valuedouble == -1 && forever_ok)))
    return fail(c, "setting %s is %g, below %lld", name, item->valuedouble, (long long)min);
  int64_t v = (int64_t)ceil(item->valuedouble);
  if (v == -1 && forever_ok) {
    *out = PARENT_FOREVER;
    return 0;
  }
  if (v < min)
    return fail(c, "setting %s is %lld, below %lld", name, (long long)v, (long long)min);
  *out = v;
  return 0;
}

static int decode_settings(check *c, const cJSON *s, parent_settings *ps) {
  if (setting(c, s, "max_concurrency", 100, 1, 0, &ps->max_concurrency)
      || setting(c, s, "shutdown_timeout", 30000, 0, 1, &ps->shutdown_timeout)
      || setting(c, s, "idle_shutdown_after", 30000, 0, 1, &ps->idle_shutdown_after)
      || setting(c, s, "failsafe_timeout", 30000, 0, 1, &ps->failsafe_timeout)
      || setting(c, s, "heartbeat_interval", 1000, 1, 0, &ps->heartbeat_interval)
      || setting(c, s, "heartbeat_misses", 3, 1, 0, &ps->heartbeat_misses)
      || setting(c, s, "max_message", (int64_t)1 << 30, 1, 0, &ps->max_message))
    return -1;
  /* upper bounds keep heartbeat_interval x heartbeat_misses, the handshake's window,
   * far from overflow */
  static const struct { const char *name; int64_t max; } caps[] = {
    { "max_concurrency", 4096 }, { "heartbeat_interval", 86400000 },
    { "heartbeat_misses", 1000000 }
  };
  const int64_t *vals[] = { &ps->max_concurrency, &ps->heartbeat_interval,
                            &ps->heartbeat_misses };
  for (int i = 0; i < 3; i++)
    if (*vals[i] > caps[i].max)
      return fail(c, "setting %s is %lld, above %lld", caps[i].name, (long long)*vals[i],
                  (long long)caps[i].max);
  const cJSON *ic = cJSON_GetObjectItemCaseSensitive(s, "idle_check");
  if (ic && !cJSON_IsNull(ic) && !cJSON_IsBool(ic))
    return fail(c, "setting idle_check is not a boolean");
  ps->idle_check = cJSON_IsTrue(ic);
  const cJSON *cs = cJSON_GetObjectItemCaseSensitive(s, "code_sync");
  if (cs && !cJSON_IsNull(cs) && !cJSON_IsBool(cs))
    return fail(c, "setting code_sync is not a boolean");
  ps->code_sync = cJSON_IsTrue(cs);
  ps->profile = SANDBOX_APPLICATION;
  ps->memory_limit = 0;
  const cJSON *sb = cJSON_GetObjectItemCaseSensitive(s, "sandbox");
  if (sb == NULL || cJSON_IsNull(sb)) return 0;
  if (cJSON_IsArray(sb) && cJSON_GetArraySize(sb) == 0) return 0;   /* {} from lua-cjson */
  if (!cJSON_IsObject(sb)) return fail(c, "setting sandbox is not an object");
  const cJSON *profile = cJSON_GetObjectItemCaseSensitive(sb, "profile");
  if (profile && !cJSON_IsNull(profile)
      && (!cJSON_IsString(profile) || sandbox_profile_parse(profile->valuestring, &ps->profile)
          || ps->profile == SANDBOX_BACKEND))
    return fail(c, "setting sandbox.profile is not \"application\" or \"restricted\"");
  return setting(c, sb, "memory_limit", 0, 0, 0, &ps->memory_limit);
}

static int decode_doc(check *c, const cJSON *doc, parent *p) {
  if (!cJSON_IsObject(doc)) return fail(c, "it is not a JSON object");
  int64_t v;
  if (integer_of(cJSON_GetObjectItemCaseSensitive(doc, "v"), &v) != 0)
    return fail(c, "it has no protocol version");
  if (v != PARENT_PROTOCOL)
    return fail(c, "protocol version %lld, this runner speaks %d (parent and runner must "
                "run the same flame)", (long long)v, PARENT_PROTOCOL);
  p->v = (int)v;
  p->ref = dup_string(cJSON_GetObjectItemCaseSensitive(doc, "ref"));
  if (p->ref == NULL || strlen(p->ref) < 8) return fail(c, "it has no ref");
  const cJSON *secret = cJSON_GetObjectItemCaseSensitive(doc, "secret");
  if (!cJSON_IsString(secret)) return fail(c, "it has no secret");
  size_t slen = strlen(secret->valuestring);
  unsigned char tmp[PARENT_SECRET_MAX / 3 * 4 + 4];
  long n = slen / 4 * 3 <= sizeof tmp ? crypto_b64decode(secret->valuestring, slen, tmp) : -1;
  if (n <= 0 || (size_t)n > sizeof p->secret) return fail(c, "it has no secret");
  memcpy(p->secret, tmp, (size_t)n);
  p->secret_len = (size_t)n;
  const cJSON *addrs = cJSON_GetObjectItemCaseSensitive(doc, "addrs");
  if (!cJSON_IsArray(addrs) || cJSON_GetArraySize(addrs) == 0)
    return fail(c, "it has no parent address");
  const cJSON *a;
  cJSON_ArrayForEach(a, addrs) {
    char host[256];
    int port;
    if (!cJSON_IsString(a))
      return fail(c, "bad parent address (a \"host:port\" string expected)");
    if (link_split_hostport(a->valuestring, host, sizeof host, &port) != 0)
      return fail(c, "bad parent address %.100s (a host name or IP address, and a port, "
                  "expected)", a->valuestring);
    if (p->naddrs == PARENT_ADDRS_MAX)
      return fail(c, "more than %d parent addresses", PARENT_ADDRS_MAX);
    if ((p->addrs[p->naddrs] = strdup(a->valuestring)) == NULL) return fail(c, "out of memory");
    p->naddrs++;
  }
  p->backend = dup_string(cJSON_GetObjectItemCaseSensitive(doc, "backend"));
  if (p->backend == NULL) return fail(c, "it names no backend");
  p->node_base = dup_string(cJSON_GetObjectItemCaseSensitive(doc, "node_base"));
  p->host_env = dup_string(cJSON_GetObjectItemCaseSensitive(doc, "host_env"));
  p->flame_vsn = dup_string(cJSON_GetObjectItemCaseSensitive(doc, "flame_vsn"));
  const cJSON *tls = cJSON_GetObjectItemCaseSensitive(doc, "tls");
  if (tls && !cJSON_IsNull(tls) && !cJSON_IsBool(tls))
    return fail(c, "its tls is not a boolean");
  p->tls = cJSON_IsTrue(tls);
  const cJSON *s = cJSON_GetObjectItemCaseSensitive(doc, "settings");
  if (cJSON_IsArray(s) && cJSON_GetArraySize(s) == 0) s = NULL;   /* {} from lua-cjson */
  else if (!cJSON_IsObject(s)) return fail(c, "it has no runner settings");
  static const cJSON empty = { 0 };
  return decode_settings(c, s ? s : &empty, &p->settings);
}

int parent_decode(const char *value, parent *p, char *why, size_t whylen) {
  check c = { why, whylen };
  memset(p, 0, sizeof *p);
  if (value == NULL || value[0] == '\0') return fail(&c, "it is empty");
  size_t len = strlen(value);
  if (len > PARENT_VALUE_MAX) return fail(&c, "it is longer than %d bytes", PARENT_VALUE_MAX);
  unsigned char *json = malloc(len / 4 * 3 + 1);
  if (json == NULL) return fail(&c, "out of memory");
  long n = crypto_b64decode(value, len, json);
  if (n < 0) {
    free(json);
    return fail(&c, "it is not base64 (%s)", len % 4 ? "its length is not a multiple of 4"
                                                    : "a character is not of base64");
  }
  cJSON *doc = cJSON_ParseWithLength((const char *)json, (size_t)n);
  free(json);
  int rc = decode_doc(&c, doc, p);
  cJSON_Delete(doc);
  if (rc != 0) parent_free(p);
  return rc;
}

void parent_free(parent *p) {
  free(p->ref);
  free(p->backend);
  free(p->node_base);
  free(p->host_env);
  free(p->flame_vsn);
  for (int i = 0; i < p->naddrs; i++) free(p->addrs[i]);
  memset(p, 0, sizeof *p);
}
