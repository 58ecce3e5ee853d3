/*
 * http.h - HTTP requests on a libuv loop, from C: libcurl's multi interface driven
 * by libuv (a uv_poll for each socket curl watches, one uv_timer for curl's
 * timeouts; no thread per request, no busy polling). No Lua here: http_lua.c is the
 * binding core.http_request on it, and any loop (the application's, the runtime
 * thread's) can have an engine of its own.
 *
 * Contract:
 * - An engine serves one loop and is used on that loop's thread only, as are its
 *   requests and callbacks. Every callback runs on the loop (or inside the call of
 *   ours that ended the request: http_cancel, http_engine_close, an http_start
 *   whose failure ended others).
 * - http_engine_new(loop, err, errlen) -> the engine, or NULL with err saying why
 *   ("http: libcurl could not be initialised", "http: cannot make a curl multi
 *   handle", ...). libcurl's global init runs once per process.
 * - http_start(e, opts, cbs, ctx, err, errlen) -> the request, started, or NULL with
 *   err ("http: cannot set CURLOPT_UNIX_SOCKET_PATH: <curl's message>", "http:
 *   cannot start the request: ...", "http: closed"); no callback of that request is
 *   called then. The strings of opts are copied: they need to live only during the
 *   call. cbs is copied too.
 * - on_done(ctx, status, headers, nheaders, body, body_len, err) is called exactly
 *   once per started request. On success err is NULL: the status, the response's
 *   headers in the order they came (names lower-case; name and value NUL-terminated
 *   and also given with their lengths) and the body (with opts.stream, "" and 0:
 *   on_data had it). On failure status is 0, headers and body NULL, and err says
 *   why: curl's message and code ("Couldn't connect to server
 *   (CURLE_COULDNT_CONNECT)"), "cancelled", or what failed under the request (a
 *   socket that could not be watched, curl's timer that could not be set: "http:
 *   cannot watch a socket (uv_poll_start): ..."): a request never hangs because the
 *   loop or curl failed. Everything passed to on_done lives until it returns; the
 *   request is gone once it returns (the pointer must not be used after).
 * - on_head(ctx, status), if given, is called once, when the headers of the final
 *   response (status >= 200) have come: the server took the request. Not called
 *   when the request fails before.
 * - on_data(ctx, p, n), with opts.stream, gets the body as it comes (nothing is
 *   kept). Any callback may call http_cancel (of its request or another) and
 *   http_engine_close. http_start works from on_done, but not while curl is in a
 *   callback of its own (inside on_data, on_head, or an on_done they caused): it
 *   fails then ("http: cannot start the request: API function called from within
 *   callback").
 * - http_cancel(r) ends a request that on_done has not ended yet: on_done(...,
 *   "cancelled") at once, also from inside on_data or on_head; no callback of it
 *   after. On a request whose on_done is running, it does nothing.
 * - http_engine_close(e) ends the requests left (on_done(..., "cancelled") each),
 *   refuses new ones, and frees the engine once libuv has closed its handles
 *   (called from inside one of its callbacks, when that returns). Call it once; e is
 *   not to be used after it.
 * - Every uv handle's data is a struct starting with flame_handle (loop.h): when the
 *   loop's close walk (loop.c, runtime.c) reaches an engine not yet closed, the
 *   engine closes as by http_engine_close (its requests end "cancelled") and frees
 *   itself; its owner must not call http_engine_close after that walk.
 */
#ifndef FLAME_HTTP_H
#define FLAME_HTTP_H

#include <stddef.h>
#include <uv.h>

typedef struct http_engine http_engine;
typedef struct http_req http_req;

typedef struct http_header {
  const char *name, *value;
  size_t name_len, value_len;
} http_header;

typedef struct http_opts {
  const char *method;                 /* NULL: curl's choice (GET, or POST with a body) */
  const char *url;                    /* required */
  const char *unix_socket, *ca, *cert, *key;   /* NULL when not wanted */
  const char *const *headers;         /* "Name: value" lines */
  size_t nheaders;
  const char *body;                   /* NULL: none; else body_len bytes, copied */
  size_t body_len;
  long timeout_ms;                    /* > 0: the whole request's limit */
  int insecure;                       /* nonzero: no TLS peer or host verification */
  int stream;                         /* nonzero: the body goes to on_data, not kept */
} http_opts;

typedef struct http_cbs {
  void (*on_head)(void *ctx, long status);
  void (*on_data)(void *ctx, const char *p, size_t n);
  void (*on_done)(void *ctx, long status, const http_header *headers, size_t nheaders,
                  const char *body, size_t body_len, const char *err);   /* required */
} http_cbs;

http_engine *http_engine_new(uv_loop_t *loop, char *err, size_t errlen);
void http_engine_close(http_engine *e);
http_req *http_start(http_engine *e, const http_opts *o, const http_cbs *cb, void *ctx,
                     char *err, size_t errlen);
void http_cancel(http_req *r);

#endif
