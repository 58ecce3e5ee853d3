-- Pools on the local backend: options checked, min and max held, callers queued in
-- arrival order with their deadlines, boot failures reported, shutdown graceful.
-- (The full elasticity rules, idle shrinking and single_use, come with the process
-- backend.)
local flame = require "flame"
local errors = require "flame.errors"
local H = require "spec.helper"
local gate = H.gate        -- sent with work that holds its slot until the test says

local function invalid_message(opts)
  local ok, err = pcall(function()
    local p = flame.pool(opts)
    p:shutdown()
  end)
  assert.is_false(ok, "expected an invalid error")
  assert.is_true(errors.is(err, "invalid"), tostring(err))
  return err.message
end

describe("pool options", function()
  after_each(H.cleanup)

  local bad = {
    { { max = 1 }, "option 'name' is required" },
    { { name = "" }, "option 'name' must be a non-empty string (got string \"\")" },
    { { name = "p", maxx = 3 }, "unknown option 'maxx'" },
    { { name = "p", max = 0 }, "option 'max' must be an integer >= 1 (got number 0)" },
    { { name = "p", max = 2.5 }, "option 'max' must be an integer >= 1 (got number 2.5)" },
    { { name = "p", max = "3" }, "option 'max' must be an integer >= 1 (got string \"3\")" },
    { { name = "p", min = -1 }, "option 'min' must be an integer >= 0" },
    { { name = "p", min = 3, max = 2 }, "min (3) is larger than max (2)" },
    { { name = "p", max_concurrency = 0 }, "option 'max_concurrency' must be an integer >= 1" },
    { { name = "p", single_use = 1 }, "option 'single_use' must be a boolean" },
    { { name = "p", timeout = 0 }, "option 'timeout' must be milliseconds" },
    { { name = "p", boot_timeout = "soon" }, "option 'boot_timeout' must be milliseconds" },
    { { name = "p", shutdown_timeout = -5 }, "option 'shutdown_timeout' must be milliseconds" },
    { { name = "p", idle_shutdown_after = { 10 } },
      "option 'idle_shutdown_after' must be milliseconds, or { milliseconds, function }" },
    { { name = "p", min_idle_shutdown_after = 0 / 0 }, "option 'min_idle_shutdown_after'" },
    { { name = "p", on_grow_start = true }, "option 'on_grow_start' must be a function" },
    { { name = "p", log = "loud" }, "option 'log' must be false or one of" },
    { { name = "p", sandbox = "open" }, "option 'sandbox' must be \"application\"" },
    { { name = "p", sandbox = { profile = "x" } }, "option 'sandbox' must be" },
    { { name = "p", sandbox = { memory_limit = -1 } }, "option 'sandbox' must be" },
    { { name = "p", sandbox = { colour = "red" } }, "option 'sandbox' must be" },
    { { name = "p", backend = 7 }, "option 'backend' must be a backend name or table" },
    { { name = "p", backend = "nonesuch" }, "no backend 'nonesuch'" },
    { { name = "p", backend = {} }, "the backend table has no init callback" },
    { { name = "p", backend = { init = print } }, "the backend table has no remote_boot" },
    { { name = "p", backend_opts = "x" }, "option 'backend_opts' must be a table" },
    { { name = "p", maxx = 3 }, "unknown option 'maxx' (did you mean 'max'?)" },
    { { name = "p", idle_shutdown_afer = 5 },
      "unknown option 'idle_shutdown_afer' (did you mean 'idle_shutdown_after'?)" },
    { { name = "p", [1] = 2 }, "unknown option '1'" },
    { { name = "p", log = true }, "option 'log' must be false or one of" },
    { { name = "p", link = { port = "80" } }, "option 'link' must be { bind, port" },
    { { name = "p", link = { heartbeat_misses = 0 } }, "option 'link' must be" },
    { { name = "p", link = { colour = 1 } }, "option 'link' must be" },
    { { name = "p", code_sync = "yes" }, "option 'code_sync' must be true, false or" },
    { { name = "p", sandbox = "a\"b\n" }, [[(got string "a\"b\10")]] },
  }
  for _, case in ipairs(bad) do
    it("refuses " .. next(case[1]) .. " done wrong: " .. case[2], function()
      local msg = invalid_message(case[1])
      assert.matches(case[2], msg, 1, true)
      assert.matches("08%-pool_spec.lua:%d+: flame.pool: ", msg)
    end)
  end

  it("refuses options that are not a table", function()
    local ok, err = pcall(flame.pool, "p")
    assert.is_false(ok)
    assert.is_true(errors.is(err, "invalid"), tostring(err))
    assert.matches("flame.pool: options must be a table", err.message, 1, true)
  end)

  it("names the same bad option whatever order the table was built in", function()
    local keys = { "timeout", "max", "min", "log", "single_use" }
    local bads = { timeout = -1, max = 0, min = -1, log = 7, single_use = "no" }
    local seen = {}
    for shift = 0, #keys - 1 do
      local o = { name = "p" }
      for i = 1, #keys do
        local k = keys[(i + shift - 1) % #keys + 1]
        o[k] = bads[k]
      end
      seen[#seen + 1] = invalid_message(o):match("option '([%w_]+)'")
    end
    for i = 2, #seen do assert.are.equal(seen[1], seen[i]) end
  end)

  it("checks a call's options and work, naming the caller's line", function()
    local p = H.pool { name = "call-options" }
    local cases = {
      { { timout = 5 }, "flame.call: unknown option 'timout' (did you mean 'timeout'?)" },
      { { timeout = 0 }, "flame.call: option 'timeout' must be milliseconds" },
      { { timeout = 0 / 0 }, "flame.call: option 'timeout' must be milliseconds" },
      { { link = "yes" }, [[flame.call: option 'link' must be a boolean (got string "yes")]] },
      { 5, "flame.call: options must be a table" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(function()
        local r = flame.call(p, function() return 1 end, case[1])
        return r                          -- not a tail call: the line is this function's
      end)
      assert.is_false(ok)
      assert.is_true(errors.is(err, "invalid"), tostring(err))
      assert.matches(case[2], err.message, 1, true)
      assert.matches("08%-pool_spec.lua:%d+: flame.call: ", err.message)
    end
    for _, work in ipairs { 42, { "m" }, { "m", "f", 3 } } do
      local ok, err = pcall(flame.call, p, work)
      assert.is_false(ok)
      assert.is_true(errors.is(err, "invalid"), tostring(err))
      assert.matches("flame.call: work must be a function or { module, function, args }",
        err.message, 1, true)
    end
    -- nothing of it reached the pool: the next call runs
    assert.are.equal(7, flame.call(p, function() return 7 end, { timeout = 10000, link = false }))
    p:shutdown()
  end)

  it("refuses a second pool of the same name, and allows it after shutdown", function()
    local p = flame.pool { name = "twice" }
    assert.matches("a pool named 'twice' already exists", invalid_message { name = "twice" },
      1, true)
    p:shutdown()
    flame.pool({ name = "twice" }):shutdown()
  end)

  it("accepts the documented values", function()
    local p = H.pool { name = "all-options", backend = "local", backend_opts = {},
      min = 0, max = 2, max_concurrency = 3, single_use = false, timeout = math.huge,
      boot_timeout = 1000, shutdown_timeout = 0, idle_shutdown_after = { 100, function()
        return true end }, min_idle_shutdown_after = math.huge,
      on_grow_start = function() end, on_grow_end = function() end,
      on_shrink = function() end, log = "error",
      sandbox = { profile = "restricted", memory_limit = 1 << 24 } }
    assert.are.equal(2, p:stats().max)
  end)
end)

describe("pool runners", function()
  after_each(H.cleanup)

  it("boots min runners at start", function()
    local p = H.pool { name = "min3", min = 3, max = 5 }
    assert.is_true(H.wait_for(function() return p:stats().pending == 0 end),
      "the min runners did not finish booting")
    local s = p:stats()
    assert.are.equal(3, s.runners)
    assert.are.equal(0, s.pending)
  end)

  it("grows up to max and no further", function()
    local grows = 0
    local p = H.pool { name = "max2", max = 2, max_concurrency = 1,
                       on_grow_start = function() grows = grows + 1 end }
    local ts = {}
    for i = 1, 6 do
      ts[i] = flame.spawn(function()
        return flame.call(p, function() os.execute("sleep 0.05") return i end)
      end)
    end
    for i = 1, 6 do assert.are.equal(i, ts[i]:await()) end
    local s = p:stats()
    assert.are.equal(2, s.runners)
    assert.are.equal(2, grows)
    assert.are.equal(2, s.peak_busy)
  end)

  it("serves queued callers in arrival order", function()
    local p = H.pool { name = "fifo", max = 1, max_concurrency = 1 }
    local order = {}
    local ts = {}
    for i = 1, 8 do
      ts[i] = flame.spawn(function()
        flame.call(p, function() return i end)
        order[#order + 1] = i
      end)
    end
    for i = 1, 8 do ts[i]:await() end
    assert.are.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, order)
  end)

  it("gives a queued caller whose deadline passes a queue timeout", function()
    local p = H.pool { name = "queue-timeout", max = 1, max_concurrency = 1 }
    local dir = H.tmpdir()
    local held, go = dir .. "/held", dir .. "/go"
    local blocker = flame.spawn(function()
      flame.call(p, function() assert(io.open(held, "w")):close() gate(go) end)
    end)
    -- the blocker holds the only slot (on a runner that is up) until the gate opens
    assert.is_true(H.wait_for(function() return H.exists(held) end), "the blocker did not start")
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 50 }) end)
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind)
    assert.are.equal("queue", err.phase)
    assert.are.equal(0, p:stats().waiting)  -- it left the queue
    H.touch(go)
    blocker:await()
    H.rmdir(dir)
    assert.are.equal("free", flame.call(p, function() return "free" end))
  end)

  it("reports a boot failure to the callers and stays usable", function()
    -- the backend is copied into each runner's backend state: it decides by runner id
    local flaky = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        if state.runner_id:match("%-1$") then return nil, "no capacity today" end
        local term, err = env.local_terminator(state)
        if not term then return nil, err end
        state.terminator = term
        return term, state
      end,
    }
    local results = {}
    local p = H.pool { name = "flaky", backend = flaky,
                       on_grow_end = function(r) results[#results + 1] = r end }
    local ok, err = pcall(function() return flame.call(p, function() return 1 end) end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches("failed to boot: no capacity today", err.message, 1, true)
    assert.are.equal(2, flame.call(p, function() return 2 end))
    assert.are.same({ "no capacity today", "ok" }, results)
  end)

  it("runs the backend in a state of its own, cut off from the application", function()
    local app_secret = "only here"
    local spy = {
      init = function(opts, env)
        -- globals of this state are not the application's, and there is no io
        if rawget(_G, "app_global") ~= nil or io ~= nil or os.execute ~= nil then
          error("the backend sees the application's state", 0)
        end
        return env.merge({}, opts)
      end,
      remote_boot = function(state, env)
        local term = env.local_terminator(state)
        state.terminator = term
        return term, state
      end,
    }
    app_global = app_secret
    local p = H.pool { name = "spy", backend = spy }
    local ok, v = pcall(function() return flame.call(p, function() return "ok" end) end)
    app_global = nil
    assert.is_true(ok, tostring(v))
    assert.are.equal("ok", v)
  end)

  it("stops a backend callback that computes without end", function()
    local p = H.pool { name = "spinning", boot_timeout = 60000, backend = {
      init = function(opts) return opts end,
      remote_boot = function() while true do end end,
    } }
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 30000 }) end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches("computed for more than 2000 ms without waiting", err.message, 1, true)
  end)

  it("refuses a backend table that cannot be copied", function()
    local f = io.stdout
    local msg = invalid_message { name = "uncopyable", backend = {
      init = function(o) return f end, remote_boot = function() end } }
    assert.matches("the backend table cannot be copied into a backend state", msg, 1, true)
  end)

  it("refuses backend_opts that cannot reach the backend, and the name stays free", function()
    local msg = invalid_message { name = "opts-fn", backend = "process",
      backend_opts = { env = { hook = function() end } } }
    assert.matches("option 'backend_opts' cannot reach the backend: a function cannot cross"
      .. " to the other side (at backend_opts.env.hook); give it plain values", msg, 1, true)
    local p = H.pool { name = "opts-fn", backend = "local" }
    assert.are.equal(3, flame.call(p, function() return 3 end))
  end)

  it("reports a backend that raises in remote_boot as a boot error", function()
    local p = H.pool { name = "raising", backend = {
      init = function(opts) return opts end,
      remote_boot = function() error("exploded", 0) end,
    } }
    local ok, err = pcall(function() return flame.call(p, function() end) end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches("exploded", err.message, 1, true)
  end)

  it("runs restricted work in a restricted sandbox", function()
    local p = H.pool { name = "restricted", sandbox = "restricted" }
    assert.is_false(flame.call(p, function() return io ~= nil end))
    local ok, err = pcall(function() return flame.call(p, { "string", "rep", { "a", 2 } }) end)
    assert.is_false(ok)
    assert.matches("cannot load modules", err.message, 1, true)
  end)
end)

describe("pool shutdown", function()
  after_each(H.cleanup)

  it("lets running calls finish, fails queued callers, then refuses calls", function()
    local p = flame.pool { name = "graceful", max = 1, max_concurrency = 1,
                           shutdown_timeout = 60000 }
    local dir = H.tmpdir()
    local started, go = dir .. "/started", dir .. "/go"
    local running = flame.spawn(function()
      return flame.call(p, function()
        assert(io.open(started, "w")):close()
        gate(go)
        return "finished"
      end)
    end)
    local queued = flame.spawn(function() return flame.call(p, function() return 1 end) end)
    -- the first call runs (and holds the only slot) until the gate opens, which
    -- happens only once the shutdown has begun
    assert.is_true(H.wait_for(function() return H.exists(started) end), "the call did not start")
    flame.spawn(function() H.touch(go) end)
    p:shutdown()
    H.rmdir(dir)
    assert.are.equal("finished", running:await())
    local ok, err = pcall(queued.await, queued)
    assert.is_false(ok)
    assert.are.equal("shutdown", err.kind)
    local ok2, err2 = pcall(function() return flame.call(p, function() end) end)
    assert.is_false(ok2)
    assert.are.equal("shutdown", err2.kind)
    assert.are.same({}, require("flame")._live_pools())
  end)

  it("kills calls still running after shutdown_timeout", function()
    local p = flame.pool { name = "impatient", shutdown_timeout = 50 }
    local dir = H.tmpdir()
    local stuck = flame.spawn(function()
      return flame.call(p, function()
        assert(io.open(dir .. "/started", "w")):close()
        while true do end
      end, { timeout = math.huge })
    end)
    assert.is_true(H.wait_for(function() return H.exists(dir .. "/started") end),
      "the call did not start")
    H.rmdir(dir)
    p:shutdown()
    local ok, err = pcall(stuck.await, stuck)
    assert.is_false(ok)
    assert.are.equal("shutdown", err.kind)
  end)

  it("kills linked work when the calling task is cancelled", function()
    local dir = H.tmpdir()
    local p = H.pool { name = "linked", max_concurrency = 1 }
    local t = flame.spawn(function()
      flame.call(p, function()
        assert(io.open(dir .. "/started", "w")):close()
        local n = 0
        while true do n = n + 1 end
      end, { timeout = math.huge })
    end)
    assert.is_true(H.wait_for(function() return H.exists(dir .. "/started") end),
      "the call did not start")
    t:cancel("caller gone")
    -- the slot comes back once the killed work ends (the work alone never would)
    assert.are.equal("free again", flame.call(p, function() return "free again" end,
      { timeout = 30000 }))
    H.rmdir(dir)
  end)
end)
