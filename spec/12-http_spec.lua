-- HTTP on the loop (core/http.c: libcurl multi driven by libuv; core/http_lua.c:
-- its binding), against a real HTTP server on 127.0.0.1 and on a unix socket
-- (spec/support/httpd.py). Some cases run a program of their own: a Lua script
-- whose state closes with requests running, one under a shim that makes libuv
-- fail (compiled here with gcc), and a C program on the C API (http.h).
local core = require "flame.core"
local flame = require "flame"
local task = require "flame.task"
local H = require "spec.helper"
local R = require "spec.support.remote"

local function request(opts)
  local f = task.future()
  opts.on_done = function(...) f:set(...) end
  local r = core.http_request(opts)
  return f, r
end

local function get(opts)
  local f = request(opts)
  return f:wait()
end

describe("http", function()
  after_each(H.cleanup)
  local usock, userver, dir
  setup(function()
    dir = H.tmpdir()
    usock = dir .. "/http.sock"
    local p = io.popen("python3 spec/support/httpd.py " .. H.q(usock) .. " > "
      .. H.q(dir .. "/httpd.log") .. " 2>&1 & echo $!")
    userver = tonumber(p:read("l"))
    p:close()
    -- until the server answers (its socket exists a moment before it listens)
    assert(H.wait_for(function()
      return get { url = "http://localhost/hello", unix_socket = usock } == 200
    end), "the test HTTP server did not start")
  end)

  teardown(function()
    if userver then os.execute("kill " .. userver) end
    H.rmdir(dir)
  end)

  it("speaks over a unix socket, with headers", function()
    local status, headers, body = get { url = "http://localhost/hello", unix_socket = usock }
    assert.are.equal(200, status)
    assert.are.equal("hello", body)
    assert.are.equal("yes", headers["x-test"])
  end)

  it("sends bodies and methods", function()
    local status, headers, body = get { url = "http://localhost/echo", unix_socket = usock,
      method = "PUT", body = "payload\0with zero", headers = { ["Content-Type"] = "x/y" } }
    assert.are.equal(200, status)
    assert.are.equal("payload\0with zero", body)
    assert.are.equal("PUT", headers["x-method"])
  end)

  it("reports statuses as they are", function()
    local status, _, body = get { url = "http://localhost/missing", unix_socket = usock }
    assert.are.equal(404, status)
    assert.are.equal("no such thing", body)
  end)

  it("streams a response in chunks", function()
    local chunks = {}
    local status, _, body = get { url = "http://localhost/stream", unix_socket = usock,
      on_data = function(c) chunks[#chunks + 1] = c end }
    assert.are.equal(200, status)
    assert.are.equal("", body)
    assert.are.equal("part0part1part2", table.concat(chunks))
    assert.is_true(#chunks >= 2, "the chunks came all at once")
  end)

  it("says when the response has begun, once, before its body", function()
    local events = {}
    local status = get { url = "http://localhost/stream", unix_socket = usock,
      on_head = function(st) events[#events + 1] = "head " .. st end,
      on_data = function() if events[#events] ~= "data" then events[#events + 1] = "data" end end }
    assert.are.equal(200, status)
    assert.are.same({ "head 200", "data" }, events)
    -- a 404 has begun too; a request that never reached a server has not
    local heads = {}
    get { url = "http://localhost/missing", unix_socket = usock,
          on_head = function(st) heads[#heads + 1] = st end }
    get { url = "http://localhost/hello", unix_socket = dir .. "/nothing.sock",
          on_head = function(st) heads[#heads + 1] = st end }
    assert.are.same({ 404 }, heads)
  end)

  it("lets a backend read a response as it comes, every chunk in order", function()
    -- a backend whose boot reads /stream with http.stream and fails with what it read
    local backend = {
      init = function(opts) return opts end,
      remote_boot = function(state, env)
        local s = env.http.stream { url = "http://localhost/stream", unix_socket = state.sock }
        local got = {}
        while true do
          local chunk, status = s.read()
          if not chunk then got[#got + 1] = "end " .. tostring(status) break end
          got[#got + 1] = chunk
        end
        return nil, table.concat(got, ",")
      end,
    }
    local p = H.pool { name = "http-stream", backend = backend, backend_opts = { sock = usock } }
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.matches("failed to boot: (.*)$", err.message)
    local read = err.message:match("failed to boot: (.*)$"):gsub(",", "")
    assert.are.equal("part0part1part2end 200", read)
  end)

  it("gives up waiting for a watched response to begin, and cancels it", function()
    local backend = {
      init = function(opts) return opts end,
      remote_boot = function(state, env)
        local status, err = env.http.watch({ url = "http://localhost/slow",
          unix_socket = state.sock, await_response = 200 }, "slow")
        return nil, tostring(status) .. " " .. tostring(err)
      end,
    }
    local p = H.pool { name = "http-await", backend = backend, backend_opts = { sock = usock } }
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.matches("failed to boot: nil no answer within 200 ms", err.message, 1, true)
  end)

  it("times out, and says so", function()
    local status, _, _, err = get { url = "http://localhost/slow", unix_socket = usock,
                                    timeout = 200 }
    assert.is_nil(status)
    assert.matches("CURLE_OPERATION_TIMEDOUT", err, 1, true)
  end)

  it("reports a refused connection", function()
    local status, _, _, err = get { url = "http://127.0.0.1:1/", timeout = 30000 }
    assert.is_nil(status)
    assert.matches("CURLE_COULDNT_CONNECT", err, 1, true)
    local s2, _, _, err2 = get { url = "http://localhost/", unix_socket = "/nonexistent.sock" }
    assert.is_nil(s2)
    assert.is_string(err2)
  end)

  it("ends a wait outside tasks when its request fails at once, whatever else the loop waits for", function()
    -- curl fails a connect to a missing unix socket inside its timer's action; the
    -- main chunk's wait used to stay in libuv's poll until the loop's next event
    local later = false
    local far = task.loop:timer(60000, function() later = true end)
    for _ = 1, 3 do
      local status, _, _, err = get { url = "http://localhost/", unix_socket = dir .. "/none.sock" }
      assert.is_nil(status)
      assert.matches("CURLE_COULDNT_CONNECT", err, 1, true)
    end
    far:stop()
    assert.is_false(later, "the wait ended only when another timer fired")
  end)

  it("cancels a request", function()
    local f, r = request { url = "http://localhost/slow", unix_socket = usock }
    flame.sleep(50)
    r:cancel()
    local status, _, _, err = f:wait()
    assert.is_nil(status)
    assert.are.equal("cancelled", err)
  end)

  it("cancels from inside on_data", function()
    local chunks, r = 0, nil
    local f = task.future()
    r = core.http_request { url = "http://localhost/stream", unix_socket = usock,
      on_data = function() chunks = chunks + 1 r:cancel() end,
      on_done = function(...) f:set(...) end }
    local status, _, _, err = f:wait()
    assert.is_nil(status)
    assert.are.equal("cancelled", err)
    assert.are.equal(1, chunks)
    local s2, _, body = get { url = "http://localhost/hello", unix_socket = usock }
    assert.are.equal(200, s2)                       -- the instance goes on working
    assert.are.equal("hello", body)
    flame.sleep(400)                                -- the stream's other chunks have come
    assert.are.equal(1, chunks, "on_data was called after the cancel")
  end)

  it("cancels another request from inside on_data, at once, and goes on with its own", function()
    local slow_done, order = 0, {}
    local slow = core.http_request { url = "http://localhost/slow", unix_socket = usock,
      on_done = function(_, _, _, err)
        slow_done = slow_done + 1
        order[#order + 1] = "slow " .. tostring(err)
      end }
    local f = task.future()
    local chunks = {}
    core.http_request { url = "http://localhost/stream", unix_socket = usock,
      on_data = function(c)
        chunks[#chunks + 1] = c
        if #chunks == 1 then
          slow:cancel()
          order[#order + 1] = "cancel returned"
        end
      end,
      on_done = function(...) f:set(...) end }
    local status, _, body = f:wait()
    assert.are.equal(200, status)
    assert.are.equal("", body)
    assert.are.equal("part0part1part2", table.concat(chunks))
    assert.are.same({ "slow cancelled", "cancel returned" }, order)
    slow:cancel()                                   -- ended: nothing more
    assert.are.equal(1, slow_done)
  end)

  it("cancels from inside on_head: no data, on_done once", function()
    local f, datas, dones, r = task.future(), 0, 0, nil
    r = core.http_request { url = "http://localhost/stream", unix_socket = usock,
      on_head = function() r:cancel() end,
      on_data = function() datas = datas + 1 end,
      on_done = function(...) dones = dones + 1 f:set(...) end }
    local status, _, _, err = f:wait()
    assert.is_nil(status)
    assert.are.equal("cancelled", err)
    flame.sleep(400)
    assert.are.equal(0, datas)
    assert.are.equal(1, dones)
  end)

  it("starts requests from inside on_done", function()
    local f, seen = task.future(), {}
    local function chain(n)
      core.http_request { url = "http://localhost/echo", unix_socket = usock, method = "POST",
        body = tostring(n), on_done = function(status, _, body)
          seen[#seen + 1] = tostring(status) .. ":" .. tostring(body)
          if n < 3 then chain(n + 1) else f:set(true) end
        end }
    end
    chain(1)
    assert.is_true(f:wait())
    assert.are.same({ "200:1", "200:2", "200:3" }, seen)
  end)

  it("names an option curl refuses", function()
    local long = string.rep("x", 8000001)           -- over curl's limit for strings
    local ok, err = pcall(core.http_request, { url = "http://localhost/", unix_socket = long,
                                               on_done = function() end })
    assert.is_false(ok)
    assert.matches("http: cannot set CURLOPT_UNIX_SOCKET_PATH: ", err, 1, true)
    local status = get { url = "http://localhost/hello", unix_socket = usock }
    assert.are.equal(200, status)
  end)

  it("is there for backends as flame.http.request", function()
    local sock = usock
    local p = H.pool { name = "http-backend", backend = {
      init = function(opts, env)
        local status, headers, body = env.http.request { url = "http://localhost/hello",
                                                          unix_socket = opts.sock }
        if status ~= 200 or body ~= "hello" or headers["x-test"] ~= "yes" then
          error("unexpected answer: " .. tostring(status), 0)
        end
        local s2, err = env.http.request { url = "http://127.0.0.1:1/", timeout = 30000 }
        if s2 ~= nil or not err:find("CURLE_COULDNT_CONNECT", 1, true) then
          error("no error for a refused connection", 0)
        end
        return env.merge({}, opts)
      end,
      remote_boot = function(state, env)
        state.terminator = env.local_terminator(state)
        return state.terminator, state
      end,
    }, backend_opts = { sock = sock } }
    assert.are.equal("booted", flame.call(p, function() return "booted" end))
  end)

  it("runs many requests at once without blocking the loop", function()
    local ts = {}
    for i = 1, 20 do
      ts[i] = flame.spawn(function()
        return get { url = "http://localhost/echo", unix_socket = usock, method = "POST",
                     body = tostring(i) }
      end)
    end
    local ticks = 0
    local ticker = flame.spawn(function() for _ = 1, 5 do flame.sleep(1) ticks = ticks + 1 end end)
    for i = 1, 20 do
      local status, _, body, err = ts[i]:await()
      assert.are.equal(200, status, err)
      assert.are.equal(tostring(i), body)
    end
    ticker:await()
    assert.are.equal(5, ticks)
  end)

  -- ---------------------------------------------- programs of their own ----

  local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
  end

  -- A program's output (stdout and stderr), its exit code and how long it took, in
  -- ms; `timeout` ends one that hangs.
  local function run(env, cmd)
    local t0 = task.now()
    local rc, out = H.run(env .. " timeout 30 " .. cmd)
    return out, rc, task.now() - t0
  end

  -- gcc, without the sanitizer runtime the sanitized run preloads; false and why
  -- when there is no compiler.
  local function cc(args)
    if H.run("command -v gcc") ~= 0 then return false, "no C compiler (gcc) here" end
    local rc, out = H.run("env -u LD_PRELOAD gcc -std=gnu11 -Wall -Wextra -Werror " .. args)
    assert(rc == 0, out)
    return true
  end

  it("ends what is left when the state closes, calling no Lua", function()
    local script = write(dir .. "/close.lua", [[
      local core = require "flame.core"
      local loop, got = core.loop(), false
      for _, path in ipairs { "/slow", "/stream" } do
        core.http_request { url = "http://localhost" .. path, unix_socket = arg[1],
          on_data = path == "/stream" and function() got = true end or nil,
          on_done = function() print("on_done called") end }
      end
      while not got do loop:run("once") end   -- both in flight, their sockets watched
      print("closing")
    ]])
    local out, rc, ms = run("", "lua5.4 " .. H.q(script) .. " " .. H.q(usock))
    assert.are.equal(0, rc, out)
    assert.are.equal("closing\n", out)
    assert.is_true(ms < 2500, "the state's close waited for /slow: " .. ms .. " ms")
  end)

  it("ends every request with what failed when libuv fails under curl, and goes on", function()
    -- libuv refusing uv_poll_start or uv_timer_start while a file exists
    local env, why = R.uv_fail_shim(dir)
    if not env then pending(why) return end
    -- a request running (/slow), then the failure as another starts, then one more
    local script = write(dir .. "/fail.lua", [[
      local core = require "flame.core"
      local sock, dir, what = arg[1], arg[2], arg[3]
      local loop, left = core.loop(), 0
      local function req(path, tag)
        left = left + 1
        local ok, err = pcall(core.http_request, { url = "http://localhost" .. path,
          unix_socket = sock, on_done = function(status, _, _, err)
            left = left - 1
            print(tag, status, err)
          end })
        if not ok then left = left - 1 print(tag, "raised", err) end
      end
      local function run_until(cond) while not cond() do loop:run("once") end end
      req("/slow", "running")
      local ticked = false
      loop:timer(200, function() ticked = true end)
      run_until(function() return ticked end)
      assert(io.open(dir .. "/fail_" .. what, "w")):close()
      req("/hello", "new")
      run_until(function() return left == 0 end)
      os.remove(dir .. "/fail_" .. what)
      req("/hello", "after")
      run_until(function() return left == 0 end)
    ]])
    local cmd = "lua5.4 " .. H.q(script) .. " " .. H.q(usock) .. " " .. H.q(dir)
    local out, rc = run(env, cmd .. " poll")
    assert.are.equal(0, rc, out)
    local poll = "nil\thttp: cannot watch a socket (uv_poll_start): not enough memory\n"
    assert.matches("running\t" .. poll, out, 1, true)
    assert.matches("new\t" .. poll, out, 1, true)
    assert.matches("after\t200\tnil\n$", out)
    out, rc = run(env, cmd .. " timer")
    assert.are.equal(0, rc, out)
    assert.are.equal("running\tnil\thttp: cannot set curl's timer: not enough memory\n"
      .. "new\traised\thttp: cannot start the request: http: cannot set curl's timer: "
      .. "not enough memory\nafter\t200\tnil\n", out)
  end)

  it("serves C on a loop of its own (http.h), closed by http_engine_close or the loop's walk", function()
    local ok, why = cc("-g -fsanitize=address,undefined -fno-sanitize-recover=undefined -Icore -o "
      .. H.q(dir .. "/capi") .. " core/http.c core/buf.c " .. H.q(write(dir .. "/capi.c", [[
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include "http.h"
#include "loop.h"

static http_engine *eng;
static int ticked;

static void done(void *ctx, long st, const http_header *h, size_t nh, const char *body,
                 size_t blen, const char *err) {
  const char *x = "-";
  for (size_t i = 0; i < nh; i++)
    if (strcmp(h[i].name, "x-test") == 0 && strlen(h[i].value) == h[i].value_len) x = h[i].value;
  printf("%s %ld %s %.*s %s\n", (const char *)ctx, st, x, (int)blen, body ? body : "",
         err ? err : "-");
}

static void data_close(void *ctx, const char *p, size_t n) {
  (void)p;
  printf("%s data %zu\n", (const char *)ctx, n);
  http_engine_close(eng);
}

static void tick(uv_timer_t *t) {
  (void)t;
  ticked = 1;
}

static void walk(uv_handle_t *h, void *arg) {      /* as loop.c and runtime.c close */
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, h->data ? ((flame_handle *)h->data)->on_close : NULL);
}

static void start(const char *url, int stream, const char *tag) {
  http_opts o;
  memset(&o, 0, sizeof o);
  o.url = url;
  o.unix_socket = getenv("SOCK");
  o.stream = stream;
  http_cbs cb = { NULL, stream ? data_close : NULL, done };
  char err[256];
  if (http_start(eng, &o, &cb, (void *)tag, err, sizeof err) == NULL) printf("%s: %s\n", tag, err);
}

int main(void) {
  uv_loop_t loop;
  char err[256];
  if (uv_loop_init(&loop) != 0) return 1;
  if ((eng = http_engine_new(&loop, err, sizeof err)) == NULL) return printf("%s\n", err), 1;
  start("http://localhost/hello", 0, "hello");
  uv_run(&loop, UV_RUN_DEFAULT);
  /* closed from inside on_data: both end "cancelled", the engine is freed */
  start("http://localhost/stream", 1, "stream");
  start("http://localhost/slow", 0, "slow");
  uv_run(&loop, UV_RUN_DEFAULT);
  printf("after close %d\n", uv_loop_alive(&loop));
  /* the loop's close walk with a request running */
  if ((eng = http_engine_new(&loop, err, sizeof err)) == NULL) return printf("%s\n", err), 1;
  start("http://localhost/slow", 0, "walked");
  uv_timer_t t;
  if (uv_timer_init(&loop, &t) != 0 || uv_timer_start(&t, tick, 200, 0) != 0) return 1;
  t.data = NULL;
  while (!ticked) uv_run(&loop, UV_RUN_ONCE);
  uv_walk(&loop, walk, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  printf("loop close %d\n", uv_loop_close(&loop));
  return 0;
}
]])) .. " $(pkg-config --cflags --libs libuv libcurl lua5.4)")
    if not ok then pending(why) return end
    -- leaks count: an engine or request either close leaves fails it
    local out, rc, ms = run("SOCK=" .. H.q(usock) .. " ASAN_OPTIONS=detect_leaks=1 "
      .. "UBSAN_OPTIONS=print_stacktrace=1", H.q(dir .. "/capi"))
    assert.are.equal(0, rc, out)
    assert.matches("^hello 200 yes hello %-\nstream data 5\n", out)
    assert.matches("\nslow 0 %-  cancelled\n", out)
    assert.matches("\nstream 0 %-  cancelled\n", out)
    assert.matches("\nafter close 0\nwalked 0 %-  cancelled\nloop close 0\n$", out)
    assert.is_true(ms < 2500, "a close waited for /slow: " .. ms .. " ms")
  end)
end)
