-- HTTP on the loop (core/http.c: libcurl multi driven by libuv), against a real
-- HTTP server on 127.0.0.1 and on a unix socket (spec/support/httpd.py).
local core = require "flame.core"
local flame = require "flame"
local task = require "flame.task"
local H = require "spec.helper"

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
end)
