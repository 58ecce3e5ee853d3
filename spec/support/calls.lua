-- The behaviour of flame.call every backend must share. A backend's spec file calls
-- this with its name and pool options: spec/07-call_spec.lua for "local"; the
-- process and Docker backends will run the same cases.
local flame = require "flame"
local errors = require "flame.errors"
local H = require "spec.helper"

return function(backend, base_opts)
  local seq = 0
  local function pool(opts)
    seq = seq + 1
    local o = { name = ("calls-%s-%d"):format(backend, seq), backend = backend }
    for k, v in pairs(base_opts or {}) do o[k] = v end
    for k, v in pairs(opts or {}) do o[k] = v end
    return H.pool(o)
  end

  -- Raises unless flame.call fails with a flame error of `kind`; returns the error.
  local function fails(kind, p, work, opts)
    local ok, err = pcall(function()
      local r = flame.call(p, work, opts)     -- not a tail call: keeps this line as
      return r                                -- the caller misuse errors point at
    end)
    assert(not ok, "expected a " .. kind .. " error, the call succeeded")
    assert(errors.is(err), "not a flame error: " .. tostring(err))
    assert.are.equal(kind, err.kind, tostring(err))
    return err
  end

  describe("flame.call on the " .. backend .. " backend", function()
    after_each(H.cleanup)

    local V = assert(loadfile("spec/support/values.lua"))()
    for _, case in ipairs(V.scalars) do
      it("round trips " .. case[1], function()
        local p = pool()
        local v = case[2]
        case[3](flame.call(p, function() return v end))
      end)
    end
    for _, case in ipairs(V.structures) do
      it("round trips " .. case[1] .. ", captured and returned", function()
        local p = pool()
        local v = case[2]()
        case[3](flame.call(p, function() return v end))
      end)
    end
    for _, case in ipairs(V.closures) do
      it("runs " .. case[1] .. " on the runner", function()
        local p = pool()
        case[3](flame.call(p, case[2]()))
      end)
    end

    it("gives decode errors for what the runner's sandbox cannot take", function()
      local p = pool { sandbox = "restricted" }
      local open = io.open
      local err = fails("decode", p, function() return open end)
      assert.matches("'io.open' is not available here", err.message, 1, true)
      local M = {}
      flame.codec.register("spec.calls.M", M)
      local t = setmetatable({}, M)
      local err2 = fails("decode", p, function() return t end)
      assert.matches("metatable 'spec.calls.M' is not registered here", err2.message, 1, true)
    end)

    it("round trips NaN and -0.0 bit for bit", function()
      local p = pool()
      local nan, nz = 0 / 0, -0.0
      local a, b = flame.call(p, function() return nan, nz end)
      assert.are.equal(string.pack("<d", nan), string.pack("<d", a))
      assert.are.equal(string.pack("<d", nz), string.pack("<d", b))
    end)

    it("returns several values, nils included", function()
      local p = pool()
      local r = table.pack(flame.call(p, function() return 1, nil, "x", nil end))
      assert.are.same({ 1, nil, "x", nil, n = 4 }, r)
      assert.are.equal(0, select("#", flame.call(p, function() end)))
    end)

    it("keeps shared and cyclic tables in arguments and results", function()
      local p = pool()
      local shared = { "s" }
      local t = { a = shared, b = shared }
      t.self = t
      local r = flame.call(p, function()
        assert(t.a == t.b and t.self == t, "identity lost on the way in")
        return t
      end)
      assert.are.equal(r.a, r.b)
      assert.are.equal(r, r.self)
      assert.are_not.equal(t, r)
    end)

    it("carries closures with shared, nested and recursive upvalues", function()
      local p = pool()
      local count = 0
      local function inc() count = count + 1 return count end
      local function get() return count end
      local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
      local k = 3
      local function make(m) return function(x) return x * m * k end end
      local a, b, c = flame.call(p, function()
        inc(); inc()
        return get(), fib(15), make(2)(5)
      end)
      assert.are.same({ 2, 610, 30 }, { a, b, c })
      assert.are.equal(0, count)              -- the caller's upvalue is untouched
    end)

    it("sends standard library functions by name", function()
      local p = pool()
      local fmt, concat = string.format, table.concat
      assert.are.equal("007|a-b", flame.call(p, function()
        return fmt("%03d", 7) .. "|" .. concat({ "a", "b" }, "-")
      end))
    end)

    it("runs { module, function, args }", function()
      local p = pool()
      assert.are.equal("ababab", flame.call(p, { "string", "rep", { "ab", 3 } }))
      assert.are.same({ 3, 1 }, { flame.call(p, { "math", "max", { 1, 3, 2 } }),
                                  flame.call(p, { "math", "abs", { -1 } }) })
      local err = fails("remote", p, { "string", "nope", {} })
      assert.are.equal("module 'string' has no function 'nope'", err.message)
      local err2 = fails("remote", p, { "no.such.module", "f" })
      assert.matches("module 'no.such.module' not found", err2.message, 1, true)
    end)

    it("gives encode errors naming what cannot be sent", function()
      local p = pool()
      local conn = io.stdout
      local err = fails("encode", p, function() return conn end)
      assert.are.equal("upvalue 'conn' of work: userdata cannot be sent", err.message)
      local co = coroutine.create(print)
      local err2 = fails("encode", p, function() return { co } end)
      assert.matches("^upvalue 'co' of work: coroutine cannot be sent", err2.message)
    end)

    it("refuses a function returned by the work", function()
      local p = pool()
      local err = fails("encode", p, function() return function() end end)
      assert.are.equal("result 1: function cannot be sent here", err.message)
      local err2 = fails("encode", p, function() return 1, { f = print } end)
      assert.are.equal("result 2.f: function cannot be sent here", err2.message)
    end)

    it("reports the work's error with its message and traceback", function()
      local p = pool()
      local err = fails("remote", p, function()
        local function deep() error("deep trouble") end
        deep()
      end)
      assert.matches("calls.lua:%d+: deep trouble$", err.message)
      assert.matches("in local 'deep'", err.traceback, 1, true)
      assert.matches("^flame remote error: .*deep trouble", tostring(err))
      local err2 = fails("remote", p, function() error({ code = 7 }) end)
      assert.are.same({ code = 7 }, err2.value)
    end)

    it("kills a runaway call at its timeout, and the runner serves the next", function()
      local p = pool { max_concurrency = 1 }
      -- the runner is up first (a boot has the default timeout), so that the short
      -- deadline is spent running the work, whatever a boot takes here
      assert.are.equal("up", flame.call(p, function() return "up" end))
      local err = fails("timeout", p, function() while true do end end, { timeout = 100 })
      assert.are.equal("run", err.phase)
      assert.matches("ran past its timeout of 100 ms", err.message, 1, true)
      assert.are.equal("next", flame.call(p, function() return "next" end))
      local err2 = fails("timeout", p, function()
        while true do pcall(function() while true do end end) end
      end, { timeout = 50 })
      assert.are.equal("run", err2.phase)
      assert.are.equal("again", flame.call(p, function() return "again" end))
    end)

    it("uses the pool's timeout when the call gives none", function()
      local p = pool { timeout = 80 }
      -- booted by a call with a timeout of its own: the pool's 80 ms go to the run
      assert.are.equal("up", flame.call(p, function() return "up" end, { timeout = 60000 }))
      local err = fails("timeout", p, function() while true do end end)
      assert.are.equal("run", err.phase)
      assert.matches("ran past its timeout of 80 ms", err.message, 1, true)
    end)

    it("fails a call that allocates past the memory cap, and keeps working", function()
      local p = pool { sandbox = { memory_limit = 16 * 1024 * 1024 }, max_concurrency = 1 }
      local err = fails("remote", p, function()
        local t = {}
        for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end
      end)
      assert.are.equal("not enough memory", err.message)
      assert.are.equal(6, flame.call(p, function() return 2 * 3 end))
    end)

    it("never shows one call's globals to the next on the same worker", function()
      local p = pool { max_concurrency = 1 }
      flame.call(p, function() leaked = "secret"; _G.also = 1; _ENV.third = 3 end)
      local a, b, c = flame.call(p, function() return leaked, also, third end)
      assert.is_nil(a)
      assert.is_nil(b)
      assert.is_nil(c)
    end)

    it("runs 100 concurrent calls with max_concurrency 10, no more than 10 at once",
      function()
        local dir = H.tmpdir()
        local p = pool { max_concurrency = 10 }
        local tasks = {}
        for i = 1, 100 do
          tasks[i] = flame.spawn(function()
            return flame.call(p, function()
              local mark = dir .. "/" .. i
              assert(io.open(mark, "w")):close()
              local ls = assert(io.popen("ls " .. dir .. " | wc -l"))
              local seen = tonumber(ls:read("l"))
              ls:close()
              os.execute("sleep 0.02")
              os.remove(mark)
              return i, seen
            end)
          end)
        end
        local most = 0
        for i = 1, 100 do
          local id, seen = tasks[i]:await()
          assert.are.equal(i, id)
          most = math.max(most, seen)
        end
        H.rmdir(dir)
        assert.is_true(most <= 10, "saw " .. most .. " calls at once")
        assert.is_true(most >= 2, "calls did not overlap at all")
        local s = p:stats()
        assert.are.equal(100, s.calls)
        assert.is_true(s.peak_running <= 10)
        assert.are.equal(0, s.busy)
      end)

    it("keeps other calls going while one blocks in a subprocess", function()
      local p = pool { max_concurrency = 4 }
      local dir = H.tmpdir()
      local started, go, gate = dir .. "/started", dir .. "/go", H.gate
      local finished = {}
      -- the slow call blocks in a subprocess until the quick ones are done (the gate
      -- opens after them), however long they take here
      local slow = flame.spawn(function()
        flame.call(p, function()
          assert(io.open(started, "w")):close()
          gate(go)
        end)
        finished[#finished + 1] = "slow"
      end)
      assert.is_true(H.wait_for(function() return H.exists(started) end),
        "the slow call did not start")
      local quick = {}
      for i = 1, 6 do
        quick[i] = flame.spawn(function()
          flame.call(p, function() return i end)
          finished[#finished + 1] = "quick"
        end)
      end
      for i = 1, 6 do quick[i]:await() end
      H.touch(go)
      slow:await()
      H.rmdir(dir)
      assert.are.same({ "quick", "quick", "quick", "quick", "quick", "quick", "slow" },
        finished)
    end)

    it("works from the main chunk and from tasks", function()
      local p = pool()
      assert.are.equal("main", flame.call(p, function() return "main" end))
      local t = flame.spawn(function() return flame.call(p, function() return "task" end) end)
      assert.are.equal("task", t:await())
      assert.are.equal("run", flame.run(function()
        return flame.call(p, function() return "run" end)
      end))
    end)

    it("casts without waiting, and logs a failed cast", function()
      local p = pool()
      local dir = H.tmpdir()
      flame.cast(p, function() assert(io.open(dir .. "/cast", "w")):close() end)
      flame.cast(p, function() error("cast failure") end)
      assert.is_true(H.wait_for(function() return H.exists(dir .. "/cast") end),
        "the cast did not run")
      H.rmdir(dir)
    end)

    it("gives invalid for bad work and bad call options", function()
      local p = pool()
      local cases = {
        { 42, nil, "work must be a function or { module, function, args }, got number" },
        { { "m" }, nil, "work must be a function or { module, function, args }" },
        { function() end, { timeout = -1 }, "option 'timeout' must be milliseconds" },
        { function() end, { timout = 5 }, "unknown option 'timout'" },
        { function() end, { link = "yes" }, "option 'link' must be a boolean" },
      }
      for _, c in ipairs(cases) do
        local err = fails("invalid", p, c[1], c[2])
        assert.matches(c[3], err.message, 1, true)
        assert.matches("^.*calls.lua:%d+: flame.call", err.message)
      end
      local ok, err = pcall(flame.call, {}, function() end)
      assert.is_false(ok)
      assert.are.equal("invalid", err.kind)
    end)

    it("errors are tables with kind and __tostring", function()
      local p = pool()
      local err = fails("remote", p, function() error("x", 0) end)
      assert.are.equal("table", type(err))
      assert.are.equal("x", err.message)
      assert.are.equal("flame remote error: x", tostring(err):match("^[^\n]*"))
    end)
  end)
end
