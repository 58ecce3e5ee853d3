/*
 * benv.h - the part of the backend environment that runs inside a backend state
 * (benv.c): pure functions, plain C calls of that state, no request to the host.
 */
#ifndef FLAME_BENV_H
#define FLAME_BENV_H

#include <lua.h>

/* [-0, +1, m] The table of those functions; the backend profile's package.loaded
 * holds it as "flame.env" (sandbox.c). */
int benv_open(lua_State *L);

/* environ([prefix]) -> { NAME = value }: also the application's core.environ. */
int benv_environ(lua_State *L);

#endif
