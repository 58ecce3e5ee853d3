/*
 * crypto.h - the few primitives of the link's handshake, over OpenSSL's libcrypto:
 * HMAC-SHA256, a constant-time comparison, base64; and SHA-256, a code pack's
 * identity. Pure functions: any thread.
 */
#ifndef FLAME_CRYPTO_H
#define FLAME_CRYPTO_H

#include <stddef.h>

#define CRYPTO_HMAC_LEN 32

/* Makes libcrypto load what its first HMAC needs (about 1 ms): a thread's body. */
void crypto_warm(void *unused);
/* libcrypto initialised now: an atexit handler registered after this runs before
 * libcrypto's own cleanup. 0, or -1. */
int crypto_init(void);
/* Frees the calling thread's libcrypto state (a thread that used it, before it ends
 * at exit: libcrypto's cleanup may otherwise have run first and lost it). */
void crypto_thread_end(void);

/* 0, or -1 when libcrypto failed. */
int crypto_hmac_sha256(const void *key, size_t klen, const void *data, size_t dlen,
                       unsigned char out[CRYPTO_HMAC_LEN]);
/* SHA-256 of len bytes (a code pack's identity): 0, or -1 when libcrypto failed. */
int crypto_sha256(const void *data, size_t len, unsigned char out[CRYPTO_HMAC_LEN]);
/* 1 when a and b hold the same bytes; time depends on the lengths only. */
int crypto_equal(const void *a, size_t la, const void *b, size_t lb);
/* Base64 of len bytes into out (room for crypto_b64_size(len) bytes, NUL included):
 * the length written, or -1 when len is too long. */
size_t crypto_b64_size(size_t len);
long crypto_b64encode(const void *in, size_t len, char *out);
/* Decodes base64 into out (room for len / 4 * 3 bytes): the length, or -1 when s is
 * not base64 (its length is not a multiple of 4, or a character is not of it). */
long crypto_b64decode(const char *s, size_t len, unsigned char *out);

#endif
