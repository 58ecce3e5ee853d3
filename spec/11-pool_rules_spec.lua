-- FLAME's pool rules: growth, sharing, shrinking, min runners, single use, placed
-- children. Scenarios from FLAME's own tests, rewritten for flame, on the local
-- backend and, where a process matters, the process backend.
local flame = require "flame"
local errors = require "flame.errors"
local task = require "flame.task"
local H = require "spec.helper"

local LINK = { heartbeat_interval = 200, heartbeat_misses = 3 }

local function counter()
  local c = { grows = 0, shrinks = 0, reasons = {} }
  c.on_grow_start = function() c.grows = c.grows + 1 end
  c.on_shrink = function(info)
    c.shrinks = c.shrinks + 1
    c.reasons[#c.reasons + 1] = info.reason
  end
  return c
end

local function call_pid(p)
  return flame.call(p, function()
    local f = io.open("/proc/self/stat")
    local pid = f:read("n")
    f:close()
    return pid
  end)
end

describe("pool rules", function()
  after_each(H.cleanup)

  it("max=1 with 2 concurrent calls boots one runner and serves both in turn", function()
    local c = counter()
    local p = H.pool { name = "one-runner", max = 1, max_concurrency = 1,
                       on_grow_start = c.on_grow_start }
    local order = {}
    local ts = {}
    for i = 1, 2 do
      ts[i] = flame.spawn(function()
        flame.call(p, function() os.execute("sleep 0.05") end)
        order[#order + 1] = i
      end)
    end
    for i = 1, 2 do ts[i]:await() end
    assert.are.equal(1, c.grows)
    assert.are.same({ 1, 2 }, order)
  end)

  it("max_concurrency=2 with 3 calls and max=2 boots a second runner", function()
    local c = counter()
    local p = H.pool { name = "second", max = 2, max_concurrency = 2,
                       on_grow_start = c.on_grow_start }
    local ts = {}
    for i = 1, 3 do
      ts[i] = flame.spawn(function()
        return flame.call(p, function() os.execute("sleep 0.1") return i end)
      end)
    end
    for i = 1, 3 do assert.are.equal(i, ts[i]:await()) end
    assert.are.equal(2, c.grows)
    assert.are.equal(2, p:stats().runners)
  end)

  it("50 callers arriving at once with max_concurrency 100 start one boot", function()
    local c = counter()
    local p = H.pool { name = "burst", max = 10, max_concurrency = 100,
                       on_grow_start = c.on_grow_start }
    local ts = {}
    for i = 1, 50 do ts[i] = flame.spawn(function() return flame.call(p, function() return i end) end) end
    for i = 1, 50 do assert.are.equal(i, ts[i]:await()) end
    assert.are.equal(1, c.grows)
  end)

  it("a crashing call does not take its runner down", function()
    local c = counter()
    local p = H.pool { name = "crash", on_grow_start = c.on_grow_start }
    assert.is_false(pcall(flame.call, p, function() error("crash") end))
    assert.are.equal("fine", flame.call(p, function() return "fine" end))
    assert.are.equal(1, c.grows)
  end)

  it("shrinks idle runners above min, and keeps min", function()
    local c = counter()
    local p = H.pool { name = "shrink", min = 1, max = 3, max_concurrency = 1,
                       idle_shutdown_after = 200, on_shrink = c.on_shrink }
    local ts = {}
    for i = 1, 3 do
      ts[i] = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.1") end) end)
    end
    for i = 1, 3 do ts[i]:await() end
    assert.are.equal(3, p:stats().runners)
    flame.sleep(700)
    assert.are.equal(1, p:stats().runners)
    assert.are.equal(2, c.shrinks)
    assert.are.same({ "idle", "idle" }, c.reasons)
  end)

  it("shrinks min runners after min_idle_shutdown_after", function()
    local p = H.pool { name = "min-idle", min = 1, max = 1, min_idle_shutdown_after = 200 }
    flame.sleep(50)
    assert.are.equal(1, p:stats().runners)
    flame.sleep(500)
    assert.are.equal(0, p:stats().runners)
    assert.are.equal(2, flame.call(p, function() return 2 end))   -- and boots again
  end)

  it("asks the idle check before shrinking a local runner", function()
    local ready = false
    local p = H.pool { name = "local-check", max = 1,
                       idle_shutdown_after = { 100, function() return ready end } }
    flame.call(p, function() end)
    flame.sleep(400)
    assert.are.equal(1, p:stats().runners)
    ready = true
    flame.sleep(400)
    assert.are.equal(0, p:stats().runners)
  end)

  it("replaces a min runner that dies", function()
    local p = H.pool { name = "min-replace", backend = "process", min = 1, max = 1,
                       link = LINK }
    local first = call_pid(p)
    os.execute("kill -9 " .. first)
    local deadline = task.now() + 5000
    local second
    while task.now() < deadline do
      flame.sleep(100)
      if #p.runners == 1 and p.runners[1].term.pid ~= first then
        second = p.runners[1].term.pid
        break
      end
    end
    assert.is_number(second, "the min runner was not replaced")
    assert.are.equal(second, call_pid(p))
  end)

  it("forces min to 0 on a runner", function()
    flame._set_parent({ ref = "spec", backend = "process" })
    local ok, p = pcall(flame.pool, { name = "on-a-runner", min = 2, max = 2 })
    flame._set_parent(nil)
    assert.is_true(ok, tostring(p))
    flame.sleep(50)
    assert.are.equal(0, p:stats().runners)
    assert.are.equal(0, p.opts.min)
    p:shutdown()
  end)

  for _, backend in ipairs { "local", "process" } do
    it("single_use: a runner serves one call, then stops (" .. backend .. ")", function()
      local c = counter()
      local p = H.pool { name = "single-" .. backend, backend = backend, single_use = true,
                         max = 2, max_concurrency = 5, link = LINK,
                         on_grow_start = c.on_grow_start, on_shrink = c.on_shrink }
      for i = 1, 3 do assert.are.equal(i, flame.call(p, function() return i end)) end
      flame.sleep(100)
      assert.are.equal(3, c.grows)
      assert.are.equal(3, c.shrinks)
      assert.are.equal(0, p:stats().runners)
    end)
  end
end)

describe("place_child", function()
  after_each(H.cleanup)

  it("holds its slot until it returns", function()
    local p = H.pool { name = "child-slot", max = 1, max_concurrency = 1 }
    local child = flame.place_child(p, function() os.execute("sleep 0.3") return "done" end)
    flame.sleep(50)
    assert.is_true(child:alive())
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 100 }) end)
    assert.is_false(ok)
    assert.are.equal("queue", err.phase)
    assert.are.equal("done", child:await())
    assert.is_false(child:alive())
    assert.are.equal(1, flame.call(p, function() return 1 end))
  end)

  it("cancel kills the work and frees the slot", function()
    local p = H.pool { name = "child-cancel", max = 1, max_concurrency = 1 }
    local child = flame.place_child(p, function() while true do end end)
    flame.sleep(50)
    child:cancel()
    local ok, err = pcall(child.await, child)
    assert.is_false(ok)
    assert.is_true(errors.is(err, "shutdown"))
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 2000 }))
  end)

  it("ends with the task that placed it", function()
    local p = H.pool { name = "child-linked", max = 1, max_concurrency = 1 }
    local child
    local placer = flame.spawn(function()
      child = flame.place_child(p, function() while true do end end)
      flame.sleep(50)
    end)
    placer:await()
    flame.sleep(10)
    assert.is_false(child:alive())
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 2000 }))
  end)

  it("refuses what is not a pool", function()
    local ok, err = pcall(function() return flame.place_child({}, function() end) end)
    assert.is_false(ok)
    assert.are.equal("invalid", err.kind)
  end)
end)

describe("pool slots under cancellation and failure", function()
  after_each(H.cleanup)

  it("a caller cancelled while queued gives no slot away", function()
    local p = H.pool { name = "queued-cancel", max = 1, max_concurrency = 1 }
    local a = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.2") end) end)
    flame.sleep(30)
    local b = flame.spawn(function() flame.call(p, function() end) end)
    flame.sleep(30)
    b:cancel()
    a:await()
    assert.are.equal(0, p:stats().busy)
    assert.are.equal(0, p:stats().waiting)
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 1000 }))
  end)

  it("a child queued when its placing task ends gives no slot away", function()
    local p = H.pool { name = "child-queued", max = 1, max_concurrency = 1 }
    local a = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.2") end) end)
    flame.sleep(30)
    flame.spawn(function() flame.place_child(p, function() end) flame.sleep(10) end):await()
    a:await()
    flame.sleep(20)
    assert.are.equal(0, p:stats().busy)
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 1000 }))
  end)

  it("a call the backend cannot send fails at once with runner_down", function()
    local p = H.pool { name = "unsent", backend = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        state.terminator = env.local_terminator(state)
        return state.terminator, state
      end,
      remote_spawn_monitor = function(state, work, env)
        env.spawn_monitor({ __flame_handle = 999 }, work)   -- not a terminator
      end,
    } }
    local t0 = task.now()
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 5000 }) end)
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    assert.is_true(task.now() - t0 < 5000, "waited for the deadline")
    assert.are.equal(0, p:stats().busy)
  end)

  it("a remote_boot returning no terminator fails the boot, and the pool boots again", function()
    local p = H.pool { name = "bad-term", backend = {
      init = function(opts) return opts end,
      remote_boot = function(state) return 42, state end,
    } }
    for _ = 1, 2 do
      local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 2000 }) end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind)
      assert.matches("not a terminator", err.message, 1, true)
    end
    assert.are.equal(0, p:stats().pending)
  end)

  it("single_use runners boot side by side", function()
    local c = counter()
    local p = H.pool { name = "single-burst", single_use = true, max = 4,
                       on_grow_start = c.on_grow_start }
    local most = 0
    local ts = {}
    for i = 1, 4 do
      ts[i] = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.2") end) end)
    end
    flame.sleep(100)
    most = p:stats().runners + p:stats().pending
    for i = 1, 4 do ts[i]:await() end
    assert.are.equal(4, c.grows)
    assert.is_true(most >= 3, "single-use runners booted one at a time")
  end)

  it("stops the runners even when the shutting-down task is cancelled", function()
    local p = flame.pool { name = "interrupted", shutdown_timeout = math.huge }
    local busy = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.3") end) end)
    flame.sleep(50)
    local stopper = flame.spawn(function() p:shutdown() end)
    flame.sleep(20)
    stopper:cancel()
    assert.are.equal(0, #p.runners)
    pcall(busy.await, busy)
  end)
end)
