-- FLAME's pool rules: growth, sharing, shrinking, min runners, single use, placed
-- children. Scenarios from FLAME's own tests, rewritten for flame, on the local
-- backend and, where a process matters, the process backend.
local flame = require "flame"
local errors = require "flame.errors"
local task = require "flame.task"
local H = require "spec.helper"
local core = require "flame.core"

-- heartbeat_interval x heartbeat_misses is also the time the parent has for each
-- runner's handshake: under valgrind (the parent slowed down, busy for a while) the
-- window is wider
local LINK = { heartbeat_interval = 200, heartbeat_misses = H.slow and 25 or 3 }
local gate = H.gate        -- sent with work that holds its slot until the test says

local function counter()
  local c = { grows = 0, shrinks = 0, reasons = {} }
  c.on_grow_start = function() c.grows = c.grows + 1 end
  c.on_shrink = function(info)
    c.shrinks = c.shrinks + 1
    c.reasons[#c.reasons + 1] = info.reason
  end
  return c
end

-- A backend of local runners with the test's own remote_spawn_monitor (and any other
-- callbacks in extra); its functions are copied into each runner's backend state.
local function via_backend(spawn_monitor, extra)
  local b = {
    init = function(opts, env) return env.merge({}, opts) end,
    remote_boot = function(state, env)
      state.terminator = env.local_terminator(state)
      return state.terminator, state
    end,
    remote_spawn_monitor = spawn_monitor,
  }
  for k, v in pairs(extra or {}) do b[k] = v end
  return b
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
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local ts = {}
    for i = 1, 3 do
      local mark = dir .. "/" .. i
      ts[i] = flame.spawn(function()
        flame.call(p, function() assert(io.open(mark, "w")):close() gate(go) end)
      end)
    end
    -- three calls at once, one slot per runner: three runners, however long they
    -- take to boot; they go idle together when the gate opens
    assert.is_true(H.wait_for(function()
      return H.exists(dir .. "/1") and H.exists(dir .. "/2") and H.exists(dir .. "/3")
    end), "the three calls did not all start")
    assert.are.equal(3, p:stats().runners)
    H.touch(go)
    for i = 1, 3 do ts[i]:await() end
    H.rmdir(dir)
    assert.is_true(H.wait_for(function() return p:stats().runners == 1 end),
      "the runners above min did not shrink")
    flame.sleep(500)                         -- past idle_shutdown_after: min is kept
    assert.are.equal(1, p:stats().runners)
    assert.are.equal(2, c.shrinks)
    assert.are.same({ "idle", "idle" }, c.reasons)
  end)

  it("shrinks min runners after min_idle_shutdown_after", function()
    -- what happens, when. The hooks are events from the runtime thread, each heard
    -- when this loop gets to it (the boot's end may be heard late, beside the
    -- shrink): the bound is from before the pool was made, which is before the boot
    -- ended, and the idle timer starts there
    local events = {}
    local t0 = task.now()
    local p = H.pool { name = "min-idle", min = 1, max = 1, min_idle_shutdown_after = 200,
      on_grow_end = function(r) events[#events + 1] = { "boot " .. r, task.now() } end,
      on_shrink = function(info) events[#events + 1] = { "shrink " .. info.reason, task.now() } end }
    assert.is_true(H.wait_for(function() return #events >= 2 end),
      "the min runner did not boot and idle down")
    assert.are.same({ "boot ok", "shrink idle" }, { events[1][1], events[2][1] })
    assert.is_true(events[2][2] - t0 >= 200, "it shrank before min_idle_shutdown_after")
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
    assert.is_true(H.wait_for(function() return p:stats().runners == 0 end),
      "the runner did not shrink once its check agreed")
  end)

  it("replaces a min runner that dies", function()
    local p = H.pool { name = "min-replace", backend = "process", min = 1, max = 1,
                       link = LINK }
    local first = call_pid(p)
    os.execute("kill -9 " .. first)
    local second
    H.wait_for(function()
      if #p.runners == 1 and p.runners[1].term.pid ~= first then
        second = p.runners[1].term.pid
      end
      return second ~= nil
    end)
    assert.is_number(second, "the min runner was not replaced")
    assert.are.equal(second, call_pid(p))
  end)

  it("sends a call the first runner could not take to another runner, within its deadline",
    function()
      local boots = 0
      local p = H.pool { name = "unsent-retry", max = 2, max_concurrency = 1,
                         on_grow_start = function() boots = boots + 1 end,
                         backend = via_backend(function(state, work, env)
        if state.runner_id:match("%-1$") then error("runner 1 takes nothing", 0) end
        return env.spawn_monitor(state.terminator, work)
      end) }
      local t0 = task.now()
      assert.are.equal("second", flame.call(p, function() return "second" end,
        { timeout = 30000 }))
      assert.are.equal(2, boots)                  -- the first was replaced
      assert.is_true(task.now() - t0 < 30000, "waited for the deadline")
      assert.are.equal(1, p:stats().runners)
      assert.are.equal(0, p:stats().busy)
    end)

  it("sends a call held for a backend's remote_spawn_monitor to another runner when its "
    .. "runner goes down first", function()
    local boots = 0
    local p = H.pool { name = "held-down", max = 2, max_concurrency = 1,
                       on_grow_start = function() boots = boots + 1 end,
                       backend = via_backend(function(state, work, env)
      if state.runner_id:match("%-1$") then
        env.send_after(10, "die")                 -- down before this send
        env.sleep(500)
      end
      return env.spawn_monitor(state.terminator, work)
    end, { handle_info = function(msg, state)
      if msg == "die" then return nil, "the backend lost it" end
      return state
    end }) }
    assert.are.equal("elsewhere", flame.call(p, function() return "elsewhere" end,
      { timeout = 30000 }))
    assert.are.equal(2, boots)
    assert.are.equal(1, p:stats().runners)
    assert.are.equal(0, p:stats().busy)
  end)

  it("when a runner goes down, its held call goes to another runner and its running "
    .. "call fails with runner_down", function()
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local p = H.pool { name = "held-and-sent", max = 2, max_concurrency = 2,
                       backend = via_backend(function(state, work, env)
        state.seen = (state.seen or 0) + 1
        if state.runner_id:match("%-1$") then
          if state.seen == 1 then                  -- held until the runner is down
            for _ = 1, 6000 do
              if state.died then break end
              env.sleep(10)
            end
          else                                      -- sent at once, then the runner dies
            env.spawn_monitor(state.terminator, work)
            env.send_after(10, "die")
            return
          end
        end
        return env.spawn_monitor(state.terminator, work)
      end, { handle_info = function(msg, state)
        if msg == "die" then
          state.died = true
          return nil, "the backend lost it"
        end
        return state
      end }) }
    local a = flame.spawn(function()
      return flame.call(p, function() return "a elsewhere" end, { timeout = 60000 })
    end)
    assert.is_true(H.wait_for(function() return p:stats().busy == 1 end), "a has no slot")
    local b = flame.spawn(function()
      return pcall(flame.call, p, function() gate(go) return "b" end, { timeout = 60000 })
    end)
    assert.are.equal("a elsewhere", a:await())
    local ok, err = b:await()
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    assert.matches("the backend lost it", err.message, 1, true)
    H.touch(go)
    H.rmdir(dir)
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
    local dir = H.tmpdir()
    local started, go = dir .. "/started", dir .. "/go"
    local child = flame.place_child(p, function()
      assert(io.open(started, "w")):close()
      gate(go)                               -- runs until the test opens the gate
      return "done"
    end)
    assert.is_true(H.wait_for(function() return H.exists(started) end), "the child did not start")
    assert.is_true(child:alive())
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 100 }) end)
    assert.is_false(ok)
    assert.are.equal("queue", err.phase)
    assert.is_true(child:alive())
    H.touch(go)
    assert.are.equal("done", child:await())
    H.rmdir(dir)
    assert.is_false(child:alive())
    assert.are.equal(1, flame.call(p, function() return 1 end))
  end)

  it("cancel kills the work and frees the slot", function()
    local p = H.pool { name = "child-cancel", max = 1, max_concurrency = 1 }
    local dir = H.tmpdir()
    local child = flame.place_child(p, function()
      assert(io.open(dir .. "/started", "w")):close()
      while true do end
    end)
    assert.is_true(H.wait_for(function() return H.exists(dir .. "/started") end),
      "the child did not start")
    H.rmdir(dir)
    child:cancel()
    local ok, err = pcall(child.await, child)
    assert.is_false(ok)
    assert.is_true(errors.is(err, "shutdown"))
    -- the slot comes back once the killed work ends (the work alone never would)
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 30000 }))
  end)

  it("ends with the task that placed it", function()
    local p = H.pool { name = "child-linked", max = 1, max_concurrency = 1 }
    local dir = H.tmpdir()
    local child
    local placer = flame.spawn(function()
      child = flame.place_child(p, function()
        assert(io.open(dir .. "/started", "w")):close()
        while true do end
      end)
      assert(H.wait_for(function() return H.exists(dir .. "/started") end),
        "the child did not start")
    end)
    placer:await()
    H.rmdir(dir)
    flame.sleep(10)
    assert.is_false(child:alive())
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 30000 }))
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
    local dir = H.tmpdir()
    local started, go = dir .. "/started", dir .. "/go"
    local a = flame.spawn(function()
      flame.call(p, function() assert(io.open(started, "w")):close() gate(go) end)
    end)
    assert.is_true(H.wait_for(function() return H.exists(started) end), "a did not start")
    local b = flame.spawn(function() flame.call(p, function() end) end)
    assert.is_true(H.wait_for(function() return p:stats().waiting == 1 end), "b is not queued")
    b:cancel()
    H.touch(go)
    a:await()
    H.rmdir(dir)
    assert.are.equal(0, p:stats().busy)
    assert.are.equal(0, p:stats().waiting)
    -- a slot given away to b would never come back: this call would time out
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 30000 }))
  end)

  it("a child queued when its placing task ends gives no slot away", function()
    local p = H.pool { name = "child-queued", max = 1, max_concurrency = 1 }
    local dir = H.tmpdir()
    local started, go = dir .. "/started", dir .. "/go"
    local a = flame.spawn(function()
      flame.call(p, function() assert(io.open(started, "w")):close() gate(go) end)
    end)
    assert.is_true(H.wait_for(function() return H.exists(started) end), "a did not start")
    flame.spawn(function()
      flame.place_child(p, function() end)
      assert(H.wait_for(function() return p:stats().waiting == 1 end), "the child is not queued")
    end):await()
    H.touch(go)
    a:await()
    H.rmdir(dir)
    flame.sleep(20)
    assert.are.equal(0, p:stats().busy)
    -- a slot given away to the child would never come back: this call would time out
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 30000 }))
  end)

  it("a call the backend cannot send fails with runner_down after three runners, well "
    .. "before its deadline", function()
    local boots = 0
    local p = H.pool { name = "unsent", on_grow_start = function() boots = boots + 1 end,
                       backend = via_backend(function(_, work, env)
      env.spawn_monitor({ __flame_handle = 999 }, work)     -- not a terminator
    end) }
    local t0 = task.now()
    local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 30000 }) end)
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    assert.matches("runner unsent%-3 could not take the call: .*, three times$",
      err.message)
    assert.are.equal(3, boots)                 -- each runner that failed was replaced
    assert.is_true(task.now() - t0 < 30000, "waited for the deadline")
    assert.are.equal(0, p:stats().busy)
  end)

  it("a remote_boot returning no terminator fails the boot, and the pool boots again", function()
    local p = H.pool { name = "bad-term", backend = {
      init = function(opts) return opts end,
      remote_boot = function(state) return 42, state end,
    } }
    for _ = 1, 2 do
      local ok, err = pcall(function() return flame.call(p, function() end, { timeout = 30000 }) end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind, tostring(err))
      assert.matches("not a terminator", err.message, 1, true)
    end
    assert.are.equal(0, p:stats().pending)
  end)

  it("single_use runners boot side by side", function()
    local c = counter()
    -- the most runners up or booting at once, counted as each boot starts (a runner
    -- that is done has shrunk by then)
    local most = 0
    local p = H.pool { name = "single-burst", single_use = true, max = 4,
                       on_grow_start = function()
                         c.on_grow_start()
                         most = math.max(most, c.grows - c.shrinks)
                       end,
                       on_shrink = c.on_shrink }
    local ts = {}
    for i = 1, 4 do
      ts[i] = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.2") end) end)
    end
    for i = 1, 4 do ts[i]:await() end
    assert.are.equal(4, c.grows)
    assert.is_true(most >= 3, "single-use runners booted one at a time")
  end)

  it("stops the runners even when the shutting-down task is cancelled", function()
    local p = flame.pool { name = "interrupted", shutdown_timeout = math.huge }
    local dir = H.tmpdir()
    local started, go = dir .. "/started", dir .. "/go"
    local busy = flame.spawn(function()
      flame.call(p, function() assert(io.open(started, "w")):close() gate(go) end)
    end)
    assert.is_true(H.wait_for(function() return H.exists(started) end), "the call did not start")
    local stopper = flame.spawn(function() p:shutdown() end)
    flame.sleep(20)
    assert.is_true(stopper:alive())          -- waiting for the call to finish
    -- the gate opens now, so that the work can end once it is stopped (the runner's
    -- threads are joined); the shutdown hears of it only after the cancel
    H.touch(go)
    stopper:cancel()
    assert.are.equal(0, #p.runners)
    pcall(busy.await, busy)
    H.rmdir(dir)
  end)
end)
