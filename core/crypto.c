/*
 * crypto.c - HMAC-SHA256, constant-time comparison and base64 (contract in
 * crypto.h), and their Lua names in flame.core: hmac_sha256, equal, b64encode,
 * b64decode.
 */
#include <stdint.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "flame.h"
#include "crypto.h"

#define B64_MAX ((size_t)1 << 28)

int crypto_hmac_sha256(const void *key, size_t klen, const void *data, size_t dlen,
                       unsigned char out[CRYPTO_HMAC_LEN]) {
  unsigned int olen = 0;
  if (klen > INT32_MAX) return -1;
  if (HMAC(EVP_sha256(), key, (int)klen, data, dlen, out, &olen) == NULL
      || olen != CRYPTO_HMAC_LEN)
    return -1;
  return 0;
}

int crypto_sha256(const void *data, size_t len, unsigned char out[CRYPTO_HMAC_LEN]) {
  unsigned int olen = 0;
  if (EVP_Digest(data, len, out, &olen, EVP_sha256(), NULL) != 1 || olen != CRYPTO_HMAC_LEN)
    return -1;
  return 0;
}

int crypto_init(void) {
  /* with its configuration, as the first HMAC would load it: loading it on the
   * calling thread keeps that thread's error state off other threads */
  return OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, NULL) == 1 ? 0 : -1;
}

void crypto_thread_end(void) {
  OPENSSL_thread_stop();
}

void crypto_warm(void *unused) {
  (void)unused;
  unsigned char out[CRYPTO_HMAC_LEN];
  crypto_hmac_sha256("k", 1, "d", 1, out);
}

int crypto_equal(const void *a, size_t la, const void *b, size_t lb) {
  const unsigned char *x = a, *y = b;
  unsigned char d = la != lb;
  for (size_t i = 0; i < la && i < lb; i++) d |= x[i] ^ y[i];
  return d == 0;
}

size_t crypto_b64_size(size_t len) {
  return 4 * ((len + 2) / 3) + 1;
}

long crypto_b64encode(const void *in, size_t len, char *out) {
  if (len >= B64_MAX) return -1;
  return EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

long crypto_b64decode(const char *s, size_t len, unsigned char *out) {
  if (len % 4 != 0 || len >= B64_MAX) return -1;
  if (len == 0) return 0;
  int n = EVP_DecodeBlock(out, (const unsigned char *)s, (int)len);
  if (n < 0) return -1;
  /* DecodeBlock counts padding as zero bytes: take them off */
  if (s[len - 1] == '=') n--;
  if (s[len - 2] == '=') n--;
  return n;
}

/* ------------------------------------------------------------------- Lua ---- */

/* hmac_sha256(key, data) -> 32 bytes */
static int l_hmac(lua_State *L) {
  size_t klen, dlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *data = luaL_checklstring(L, 2, &dlen);
  unsigned char out[CRYPTO_HMAC_LEN];
  if (crypto_hmac_sha256(key, klen, data, dlen, out) != 0)
    return luaL_error(L, "hmac_sha256 failed");
  lua_pushlstring(L, (const char *)out, sizeof out);
  return 1;
}

/* equal(a, b): comparison in constant time for equal lengths (proofs) */
static int l_equal(lua_State *L) {
  size_t la, lb;
  const char *a = luaL_checklstring(L, 1, &la);
  const char *b = luaL_checklstring(L, 2, &lb);
  lua_pushboolean(L, crypto_equal(a, la, b, lb));
  return 1;
}

static int l_b64encode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  luaL_argcheck(L, len < B64_MAX, 1, "too long");
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, crypto_b64_size(len));
  long n = crypto_b64encode(s, len, out);
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/* b64decode(s) -> bytes | nil, message */
static int l_b64decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (len % 4 != 0 || len >= B64_MAX) {
    lua_pushnil(L);
    lua_pushliteral(L, "not base64 (length is not a multiple of 4)");
    return 2;
  }
  luaL_Buffer b;
  unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, len / 4 * 3 + 1);
  long n = crypto_b64decode(s, len, out);
  if (n < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "not base64");
    return 2;
  }
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

void flame_crypto_open(lua_State *L) {
  static const luaL_Reg fns[] = {
    { "hmac_sha256", l_hmac }, { "equal", l_equal }, { "b64encode", l_b64encode },
    { "b64decode", l_b64decode }, { NULL, NULL }
  };
  luaL_setfuncs(L, fns, 0);
}
