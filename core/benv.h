/*
 * benv.h - the part of the backend environment that runs inside a backend state
 * (benv.c): pure functions, plain C calls of that state, no request to the host.
 */
#ifndef FLAME_BENV_H
#define FLAME_BENV_H

#include <stddef.h>

#include <lua.h>

/* [-0, +1, m] The table of those functions; the backend profile's package.loaded
 * holds it as "flame.env" (sandbox.c). */
int benv_open(lua_State *L);

/* environ([prefix]) -> { NAME = value }: also the application's core.environ. */
int benv_environ(lua_State *L);

/* n characters of [a-z0-9] from the system's randomness, into out (not
 * terminated): 0, or a libuv error. n at most 256. Any thread. */
int benv_random_chars(char *out, size_t n);

#endif
