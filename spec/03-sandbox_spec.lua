-- Sandboxed states: what each profile has and lacks, the memory cap, the kill switch
-- pulled from another thread, and copy semantics of sb:call.
local flame = require "flame"

local opened = {}
local function sandbox(opts)
  local sb = flame.sandbox(opts)
  opened[#opened + 1] = sb
  return sb
end

after_each(function()
  for _, sb in ipairs(opened) do sb:close() end
  opened = {}
end)

-- Names of globals and library fields visible in a sandbox.
local function probe(sb, names)
  local ok, present = sb:call(function()
    local found = {}
    for _, name in ipairs(names) do
      local v = _ENV
      for part in name:gmatch("[^.]+") do
        v = type(v) == "table" and v[part] or nil
      end
      found[name] = v ~= nil
    end
    return found
  end)
  assert(ok, present)
  return present
end

describe("sandbox profiles", function()
  local app_has = { "print", "require", "io.open", "io.popen", "os.execute", "os.getenv",
                    "string.format", "table.concat", "math.floor", "utf8.char",
                    "coroutine.wrap", "load", "debug.traceback", "package.path",
                    "collectgarbage" }
  local app_lacks = { "os.exit", "package.loadlib", "debug.getinfo", "debug.sethook",
                      "debug.setupvalue", "debug.getregistry", "debug.setmetatable" }
  local restricted_has = { "string.format", "table.concat", "math.floor", "utf8.char",
                           "coroutine.wrap", "pcall", "setmetatable", "os.clock",
                           "os.time", "os.date", "os.difftime" }
  local restricted_lacks = { "io", "require", "package", "debug", "load", "loadfile",
                             "dofile", "print", "collectgarbage", "os.exit",
                             "os.execute", "os.getenv", "os.remove", "os.rename",
                             "os.tmpname" }

  it("application has the standard libraries, require and subprocesses", function()
    local p = probe(sandbox(), app_has)
    for _, name in ipairs(app_has) do assert.is_true(p[name], name) end
  end)

  it("application lacks os.exit, loadlib and most of debug", function()
    local p = probe(sandbox(), app_lacks)
    for _, name in ipairs(app_lacks) do assert.is_false(p[name], name) end
  end)

  it("restricted has pure computation", function()
    local p = probe(sandbox { profile = "restricted" }, restricted_has)
    for _, name in ipairs(restricted_has) do assert.is_true(p[name], name) end
  end)

  it("restricted lacks I/O, modules, loading and debug", function()
    local p = probe(sandbox { profile = "restricted" }, restricted_lacks)
    for _, name in ipairs(restricted_lacks) do assert.is_false(p[name], name) end
  end)

  it("application refuses binary chunks in load", function()
    local sb = sandbox()
    local ok, f, err = sb:call(function()
      return load(string.dump(function() return 1 end))
    end)
    assert.is_true(ok)
    assert.is_nil(f)
    assert.matches("attempt to load a binary chunk", err, 1, true)
    local ok2, v = sb:call(function() return load("return 6 * 7")() end)
    assert.is_true(ok2)
    assert.are.equal(42, v)
    local ok3, _, err3 = sb:call(function()
      return load(string.dump(function() end), "x", "b")
    end)
    assert.is_true(ok3)
    assert.matches("attempt to load a binary chunk", err3, 1, true)
  end)

  it("application runs subprocesses", function()
    local ok, out = sandbox():call(function()
      local p = io.popen("echo from-a-subprocess")
      local s = p:read("l")
      p:close()
      return s
    end)
    assert.is_true(ok)
    assert.are.equal("from-a-subprocess", out)
  end)

  it("rejects bad options", function()
    assert.has_error(function() flame.sandbox { profile = "open" } end,
      "sandbox: bad option 'profile' (\"application\", \"restricted\" or \"backend\" expected)")
    assert.has_error(function() flame.sandbox { memory_limit = -1 } end,
      "sandbox: bad option 'memory_limit' (bytes >= 0 expected)")
    assert.has_error(function() flame.sandbox { memroy_limit = 1 } end,
      "sandbox: unknown option 'memroy_limit'")
    assert.has_error(function() flame.sandbox { memory_limit = 100 } end,
      "sandbox: memory limit too small for a Lua state")
  end)
end)

describe("sandbox calls", function()
  it("copies captures in and results out", function()
    local t = { n = 1 }
    local sb = sandbox()
    local ok, r = sb:call(function() t.n = t.n + 1; return t end)
    assert.is_true(ok)
    assert.are.equal(2, r.n)
    assert.are.equal(1, t.n)              -- the caller's table is untouched
    assert.are_not.equal(t, r)
  end)

  it("returns several values, nils included", function()
    local r = table.pack(sandbox():call(function() return 1, nil, "three", nil end))
    assert.are.same({ true, 1, nil, "three", nil, n = 5 }, r)
  end)

  it("reports errors with the message and a traceback", function()
    local ok, kind, msg, tb = sandbox():call(function()
      local function inner() error("boom") end
      inner()
    end)
    assert.is_false(ok)
    assert.are.equal("remote", kind)
    assert.matches("03%-sandbox_spec.lua:%d+: boom$", msg)
    assert.matches("stack traceback:", tb, 1, true)
    assert.matches("in local 'inner'", tb, 1, true)
  end)

  it("carries error values that can cross, and their text", function()
    local ok, kind, msg, _, value = sandbox():call(function()
      error(setmetatable({ code = 7 }, { __tostring = function() return "E7" end }))
    end)
    assert.is_false(ok)
    assert.are.equal("remote", kind)
    assert.are.equal("E7", msg)
    assert.is_nil(value)                  -- its metatable is not registered
    local _, _, msg2, _, value2 = sandbox():call(function() error({ code = 8 }) end)
    assert.are.equal("(error object is a table value)", msg2)
    assert.are.same({ code = 8 }, value2)
  end)

  it("refuses a function in the results", function()
    local ok, kind, msg = sandbox():call(function() return 1, { f = print } end)
    assert.is_false(ok)
    assert.are.equal("encode", kind)
    assert.are.equal("result 2.f: function cannot be sent here", msg)
  end)

  it("refuses to send what cannot cross", function()
    local f = io.stdout
    local ok, kind, msg = sandbox():call(function() return f end)
    assert.is_false(ok)
    assert.are.equal("encode", kind)
    assert.are.equal("upvalue 'f' of work: userdata cannot be sent", msg)
  end)

  it("names library functions the sandbox does not have", function()
    local open = io.open
    local ok, kind, msg = sandbox { profile = "restricted" }:call(function() return open end)
    assert.is_false(ok)
    assert.are.equal("decode", kind)
    assert.matches("'io.open' is not available here", msg, 1, true)
  end)

  it("gives each call a fresh environment; modules stay loaded", function()
    local sb = sandbox()
    assert.is_true((sb:call(function()
      leaked = "yes"; _G.also = 1; package.loaded.kept = 7
      load("via_load = 1")()
    end)))
    local ok, a, b, c, d, e = sb:call(function()
      return leaked, also, package.loaded.kept, getmetatable(_ENV), via_load
    end)
    assert.is_true(ok)
    assert.is_nil(a)
    assert.is_nil(b)
    assert.are.equal(7, c)
    assert.is_false(d)                     -- the shared globals stay out of reach
    assert.is_nil(e)                       -- load's default environment is the call's
  end)

  it("returns the environment as the receiver's environment", function()
    local ok, g = sandbox():call(function() return _G end)
    assert.is_true(ok)
    assert.are.equal(_G, g)
  end)

  it("gives the work the sandbox's environment", function()
    local ok, g, has_io = sandbox { profile = "restricted" }:call(function()
      return _G == _ENV, io ~= nil
    end)
    assert.is_true(ok)
    assert.is_true(g)                      -- _G is the run's own environment
    assert.is_false(has_io)
  end)
end)

describe("sandbox memory cap", function()
  it("fails an allocation past the cap and keeps the state working", function()
    local sb = sandbox { memory_limit = 8 * 1024 * 1024 }
    assert.are.equal(8 * 1024 * 1024, sb:memory_limit())
    local ok, kind, msg = sb:call(function()
      local t = {}
      for i = 1, 1e9 do t[i] = ("x"):rep(64) .. i end
    end)
    assert.is_false(ok)
    assert.are.equal("remote", kind)
    assert.are.equal("not enough memory", msg)
    assert.is_true(sb:memory() <= 8 * 1024 * 1024)
    local ok2, v = sb:call(function() return ("y"):rep(1000):len() end)
    assert.is_true(ok2)
    assert.are.equal(1000, v)
  end)

  it("refuses a capture bigger than the cap", function()
    local big = ("z"):rep(4 * 1024 * 1024)
    local sb = sandbox { memory_limit = 2 * 1024 * 1024 }
    local ok, kind, msg = sb:call(function() return #big end)
    assert.is_false(ok)
    assert.are.equal("decode", kind)
    assert.are.equal("not enough memory", msg)
    local ok2, v = sb:call(function() return 1 + 1 end)
    assert.is_true(ok2)
    assert.are.equal(2, v)
  end)

  it("counts memory in use", function()
    local sb = sandbox()
    local before = sb:memory()
    assert.is_true(before > 0)
    sb:call(function() package.loaded.keep = ("k"):rep(1024 * 1024) end)
    assert.is_true(sb:memory() > before)
    assert.is_true(sb:memory() >= 1024 * 1024)  -- the kept string is counted
  end)
end)

describe("sandbox kill switch", function()
  local loops = {
    { "a plain loop", function() while true do end end },
    { "a loop that catches errors", function()
        while true do pcall(function() while true do end end) end
      end },
    { "a loop inside coroutine.wrap", function()
        local co = coroutine.wrap(function() while true do end end)
        co()
      end },
    { "a coroutine loop whose resumer catches the error", function()
        local co = coroutine.create(function() while true do end end)
        while true do coroutine.resume(co) end
      end },
    { "nested coroutines", function()
        local outer = coroutine.wrap(function()
          local inner = coroutine.wrap(function() while true do end end)
          while true do pcall(inner) end
        end)
        while true do pcall(outer) end
      end },
    { "a loop in an error handler", function()
        xpcall(error, function() while true do end end)
      end },
    { "a loop whose error handler loops too", function()
        xpcall(function() while true do end end, function() while true do end end)
      end },
    { "a loop in a __close handler", function()
        local guard <close> = setmetatable({}, { __close = function()
          while true do end
        end })
        while true do end
      end },
  }
  for _, case in ipairs(loops) do
    it("stops " .. case[1] .. " from another thread", function()
      local sb = sandbox()
      local ok, kind, reason = sb:call(case[2], { timeout = 50 })
      assert.is_false(ok)
      assert.are.equal("killed", kind)
      assert.are.equal("timeout", reason)
      local ok2, v = sb:call(function() return "still serving" end)
      assert.is_true(ok2)
      assert.are.equal("still serving", v)
    end)
  end

  it("stops restricted work too, with the reason given", function()
    local sb = sandbox { profile = "restricted" }
    local ok, kind, reason = sb:call(function() local x = 0 while true do x = x + 1 end end,
      { timeout = 20, reason = "shutdown" })
    assert.is_false(ok)
    assert.are.equal("killed", kind)
    assert.are.equal("shutdown", reason)
  end)

  it("keeps xpcall's handler and its results when nothing is killed", function()
    local ok, a, b, c = sandbox():call(function()
      local r1 = table.pack(xpcall(function(x, y) return x + y, "ok" end, print, 2, 3))
      local r2 = table.pack(xpcall(error, function(m) return "handled: " .. m end, "bad", 0))
      return r1, r2, select("#", xpcall(function() end, print))
    end)
    assert.is_true(ok)
    assert.are.same({ true, 5, "ok", n = 3 }, a)
    assert.are.same({ false, "handled: bad", n = 2 }, b)
    assert.are.equal(1, c)
  end)

  it("keeps xpcall working across coroutine yields", function()
    local ok, v = sandbox():call(function()
      local co = coroutine.wrap(function()
        local _, r = xpcall(function() return coroutine.yield(1) + 1 end, print)
        return r
      end)
      co()
      return co(41)
    end)
    assert.is_true(ok)
    assert.are.equal(42, v)
  end)

  it("does not touch work that ends before the deadline, nor the next call", function()
    local sb = sandbox()
    -- a deadline the work beats by far, even under valgrind
    local ok, v = sb:call(function() return 41 + 1 end, { timeout = 500 })
    assert.is_true(ok)
    assert.are.equal(42, v)
    local ok2, v2 = sb:call(function()
      os.execute("sleep 0.6")             -- outlives the first call's deadline, then
      local n = 0                         -- computes: a kill left armed would hit here
      for i = 1, 1e5 do n = n + i end
      return n > 0
    end)
    assert.is_true(ok2)
    assert.is_true(v2)
  end)

  it("kills with a deadline of 0 even while a big capture is decoded", function()
    local big = {}
    for i = 1, 200000 do big[i] = i end
    local sb = sandbox()
    local ok, kind = sb:call(function() local _ = big while true do end end, { timeout = 0 })
    assert.is_false(ok)
    assert.are.equal("killed", kind)
  end)

  it("rejects a bad reason or deadline", function()
    assert.has_error(function() sandbox():call(print, { timeout = 10, reason = "because" }) end)
    assert.has_error(function() sandbox():call(print, { timeout = -1 }) end)
  end)

  local escapes = {
    { "a finalizer", function()
        return setmetatable({}, { __gc = function() while true do end end })
      end, "__gc metamethods are not allowed in a sandbox" },
    { "a __close handler run by coroutine.close", function()
        local co = coroutine.create(function()
          local x <close> = setmetatable({}, { __close = function() while true do end end })
          coroutine.yield()
        end)
        coroutine.resume(co)
        coroutine.close(co)
      end },
    { "a __close handler run when a wrapped coroutine fails", function()
        coroutine.wrap(function()
          local x <close> = setmetatable({}, { __close = function() while true do end end })
          error("x")
        end)()
      end },
  }
  for _, case in ipairs(escapes) do
    it("cannot be escaped through " .. case[1], function()
      local sb = sandbox()
      -- work that fails at once gets a deadline it surely beats; a loop is killed
      local ok, kind, msg = sb:call(case[2], { timeout = case[3] and 30000 or 50 })
      assert.is_false(ok)
      if case[3] then
        assert.are.equal("remote", kind)
        assert.matches(case[3], msg, 1, true)
      else
        assert.are.equal("killed", kind)
      end
    end)
  end

  it("cannot load the full debug library through package.cpath", function()
    local ok, kind, msg = sandbox():call(function()
      package.loaded.debug = nil
      package.cpath = "/usr/lib/x86_64-linux-gnu/liblua5.4.so.0;/usr/lib/liblua5.4.so.0"
      local d = require "debug"
      return d.sethook ~= nil
    end)
    assert.is_false(ok)
    assert.are.equal("remote", kind)
    assert.matches("module 'debug' not found", msg, 1, true)
  end)

  it("cannot require bytecode", function()
    local dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p " .. dir)
    local ok, kind, msg = sandbox():call(function()
      local f = assert(io.open(dir .. "/sneaky.lua", "wb"))
      f:write(string.dump(function() return "ran bytecode" end))
      f:close()
      package.path = dir .. "/?.lua"
      return require "sneaky"
    end)
    os.execute("rm -rf " .. dir)
    assert.is_false(ok)
    assert.are.equal("remote", kind)
    assert.matches("attempt to load a binary chunk", msg, 1, true)
  end)

  it("survives a finalizer of the caller that closes the sandbox during a call", function()
    local call = flame.sandbox().call
    local big = {}
    for i = 1, 100 do big[i] = { i } end
    local work = function() return #big end
    collectgarbage("incremental", 1, 1000)
    for round = 1, 300 do
      local sb = flame.sandbox { profile = "restricted" }
      local incall = false
      local mt = {}
      mt.__gc = function() if incall then pcall(sb.close, sb) else setmetatable({}, mt) end end
      setmetatable({}, mt)
      for j = 1, round % 13 do local _ = { j } end
      incall = true
      pcall(call, sb, work)
      incall = false
      sb:close()
    end
    collectgarbage("incremental", 200, 100)
  end)

  it("refuses use after close", function()
    local sb = flame.sandbox()
    sb:close()
    assert.has_error(function() sb:call(function() end) end, "sandbox is closed")
    sb:close()                             -- closing twice is harmless
  end)
end)
