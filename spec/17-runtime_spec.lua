-- The runtime thread (core/runtime.c) and the hub on it (core/hub.c): a parent whose
-- main thread computes keeps its runners, because heartbeats, handshakes and frames
-- are handled beside it; and a program that exits with pools live ends cleanly.
local flame = require "flame"
local core = require "flame.core"
local H = require "spec.helper"
local R = require "spec.support.remote"

-- A short heartbeat window, so that 10 s of computing spans many of them; under
-- valgrind (one thread runs at a time) the window is wider.
local LINK = { heartbeat_interval = 200, heartbeat_misses = H.slow and 25 or 3 }

-- Computes on this thread for ms milliseconds of wall time, never yielding.
local function compute(ms)
  local t0 = core.hrtime()
  local n = 0
  while core.hrtime() - t0 < ms * 1e6 do n = n + 1 end
  return n
end

local gate = H.gate        -- sent with work that holds its slot until the test says

local function which_runner()
  return require("flame").parent().ref
end

describe("a parent that computes on its main thread", function()
  after_each(H.cleanup)
  for _, backend in ipairs { "local", "process" } do
    it("keeps its runners for 10 s, and a call running meanwhile completes (" .. backend .. ")",
      function()
        local dir = H.tmpdir()
        local p = H.pool { name = "busy-parent-" .. backend, backend = backend, max = 1,
                           max_concurrency = 2, link = LINK, idle_shutdown_after = 120000 }
        local first = flame.call(p, which_runner)
        local started, marker = dir .. "/started", dir .. "/done"
        local t = flame.spawn(function()
          return flame.call(p, function()
            io.open(started, "w"):close()
            os.execute("sleep 1")
            io.open(marker, "w"):close()
            return "finished meanwhile"
          end)
        end)
        assert.is_true(H.wait_for(function() return H.exists(started) end), "the call did not start")
        compute(10000)                             -- heartbeat windows pass meanwhile
        assert.is_true(H.exists(marker), "the call ran while the parent computed")
        assert.are.equal("finished meanwhile", t:await())
        assert.are.equal(first, flame.call(p, which_runner))
        assert.are.equal(1, p:stats().runners)
        H.rmdir(dir)
      end)

    it("hands a freed slot to the next caller and times out a queued one while it computes ("
      .. backend .. ")", function()
      local dir = H.tmpdir()
      local p = H.pool { name = "queue-busy-" .. backend, backend = backend, max = 1,
                         max_concurrency = 1, link = LINK, idle_shutdown_after = 120000 }
      local first = flame.call(p, which_runner)    -- booted first: no boot in the way
      local go_a, go_b, b_ran = dir .. "/go-a", dir .. "/go-b", dir .. "/b-ran"
      local a = flame.spawn(function()
        return flame.call(p, function() gate(go_a) return "a" end)
      end)
      local b = flame.spawn(function()
        return flame.call(p, function()
          io.open(b_ran, "w"):close()
          gate(go_b)
          return "b", which_runner()
        end)
      end)
      local c = flame.spawn(function()
        return pcall(flame.call, p, function() return "c" end, { timeout = 3000 })
      end)
      assert.is_true(H.wait_for(function() return p:stats().waiting >= 1 end), "nothing queued")
      -- from here this thread computes: only the runtime thread can give a's slot to
      -- b, and see c's deadline pass
      H.touch(go_a)
      local t0 = core.hrtime()
      while not H.exists(b_ran) and core.hrtime() - t0 < 60e9 do end
      assert.is_true(H.exists(b_ran), "b did not start while the parent computed")
      while p:stats().waiting > 0 and core.hrtime() - t0 < 60e9 do end
      assert.are.equal(0, p:stats().waiting, "c is still queued")
      H.touch(go_b)
      assert.are.equal("a", a:await())
      local b_said, b_runner = b:await()
      assert.are.equal("b", b_said)
      assert.are.equal(first, b_runner)            -- on the runner the slot was freed on
      local ok, err = c:await()
      assert.is_false(ok)
      assert.are.equal("timeout", err.kind)
      assert.are.equal("queue", err.phase)
      H.rmdir(dir)
    end)
  end
end)

local alive = H.alive

describe("the hub", function()
  after_each(H.cleanup)
  it("declares a silent runner lost, and its caller gets runner_down", function()
    local p = H.pool { name = "frozen", backend = "process", max = 1, shutdown_timeout = 200,
                       link = { heartbeat_interval = 200, heartbeat_misses = 3 } }
    flame.call(p, function() return 1 end)
    local pid = p.runners[1].term.pid
    local t = flame.spawn(function()
      return pcall(flame.call, p, function() os.execute("sleep 30") end)
    end)
    assert.is_true(H.wait_for(function() return p:stats().busy == 1 end), "the call was not sent")
    os.execute("kill -STOP " .. pid)           -- alive, but answers nothing
    local ok, err = t:await()
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind, tostring(err))
    assert.matches("no heartbeat from the runner for 3 intervals of 200 ms", err.message, 1, true)
    p:shutdown()                               -- and its backend reaps it
    assert.is_false(alive(pid), "the frozen runner still exists")
  end)
end)

describe("pool:shutdown()", function()
  after_each(H.cleanup)
  it("returns once the runner processes are gone", function()
    local p = flame.pool { name = "gone-at-return", backend = "process", min = 2, max = 2,
                           link = LINK }
    assert.is_true(H.wait_for(function() return #p.runners == 2 end), "the runners did not boot")
    local pids = {}
    for _, r in ipairs(p.runners) do pids[#pids + 1] = r.term.pid end
    flame.call(p, function() return 1 end)
    p:shutdown()
    for _, pid in ipairs(pids) do assert.is_false(alive(pid), "runner " .. pid .. " still runs") end
  end)

  it("returns once a runner that ignores its shutdown has been reaped", function()
    -- the runner is stopped with SIGSTOP: it cannot exit by itself, the backend's reap
    -- (shutdown_timeout + 1 s) ends it, and shutdown waits for that
    local p = flame.pool { name = "reaped-at-return", backend = "process", max = 1,
                           shutdown_timeout = 200, link = LINK }
    flame.call(p, function() return 1 end)
    local pid = p.runners[1].term.pid
    os.execute("kill -STOP " .. pid)
    p:shutdown()
    assert.is_false(alive(pid), "the stopped runner still exists")
  end)
end)

describe("closing a local runner whose work is stuck in C", function()
  after_each(H.cleanup)
  it("does not hold the runtime thread: another pool's runner keeps its heartbeats",
    function()
      local remote = H.pool { name = "keeps-beating", backend = "process", max = 1,
                              link = LINK, idle_shutdown_after = 120000 }
      flame.call(remote, function() return 1 end)
      local first = remote.runners[1].term.pid
      local stuck = H.pool { name = "stuck-in-c", max = 1, shutdown_timeout = 0 }
      local dir = H.tmpdir()
      local started = dir .. "/started"
      local t = flame.spawn(function()
        return pcall(flame.call, stuck, function()
          io.open(started, "w"):close()
          os.execute("sleep 3")                    -- the kill waits for it to return
        end)
      end)
      assert.is_true(H.wait_for(function() return H.exists(started) end), "it did not start")
      stuck:shutdown()                             -- its worker is joined somewhere
      local ok, err = t:await()
      assert.is_false(ok)
      assert.are.equal("shutdown", err.kind)
      flame.sleep(3500)                            -- heartbeat windows pass meanwhile
      assert.is_true(H.alive(first), "the other pool's runner lost its parent")
      assert.are.equal(1, remote:stats().runners)
      assert.are.equal(first, remote.runners[1].term.pid)
      H.rmdir(dir)
    end)
end)

describe("a backend step that computes without end", function()
  after_each(H.cleanup)
  it("fails its boot within the bound while other runners keep their heartbeats", function()
    local busy = H.pool { name = "steady", backend = "process", max = 1, link = LINK }
    local first = flame.call(busy, which_runner)
    local p = H.pool { name = "spinning-step", boot_timeout = 60000, backend = {
      init = function(opts) return opts end,
      remote_boot = function() while true do end end,
    } }
    local t0 = core.hrtime()
    local ok, err = pcall(flame.call, p, function() end, { timeout = 60000 })
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches("computed for more than 2000 ms without waiting, and was stopped", err.message,
      1, true)
    assert.is_true((core.hrtime() - t0) / 1e6 < 30000, "the step ran far past its bound")
    assert.are.equal(first, flame.call(busy, which_runner))
  end)

  it("runs beside the program: its tasks go on while the step computes", function()
    local p = H.pool { name = "spinning-beside", boot_timeout = 60000, backend = {
      init = function(opts) return opts end,
      remote_boot = function() while true do end end,
    } }
    local failed_at
    local t = flame.spawn(function()
      local ok, err = pcall(flame.call, p, function() end, { timeout = 60000 })
      failed_at = core.hrtime()
      return ok, err
    end)
    -- the step runs off the program's thread: a short sleep here ends while the
    -- boot still computes, long before it is stopped at 2000 ms (on the program's
    -- thread, the sleep would end only after the step, moments before the failure)
    flame.sleep(50)
    local slept_at = core.hrtime()
    local ok, err = t:await()
    assert.is_false(ok)
    assert.matches("computed for more than 2000 ms", err.message, 1, true)
    assert.is_true((failed_at - slept_at) / 1e6 > 500, "the program's task waited for the step")
  end)
end)

describe("a runner's life on the runtime thread (core/runner.c)", function()
  after_each(H.cleanup)
  it("boots a runner for a queued call, and the call runs, while the program computes",
    function()
      local dir = H.tmpdir()
      local ran, booting, go = dir .. "/ran", dir .. "/booting", dir .. "/go"
      -- the process backend, whose init says it started and waits for the test's go
      local p = H.pool { name = "boots-beside", max = 1, link = LINK, boot_timeout = 120000,
        backend = R.process_backend {
          init = function(opts, env)
            assert(env.proc.run { path = "/bin/sh", timeout = 120000, args = { "-c",
              "touch '" .. booting .. "'; while [ ! -e '" .. go .. "' ]; do sleep 0.05; done" } })
            return require("flame.backends.process").init(opts, env)
          end,
        } }
      local t = flame.spawn(function()
        return flame.call(p, function() io.open(ran, "w"):close() return which_runner() end)
      end)
      assert.is_true(H.wait_for(function() return H.exists(booting) end, 60000),
        "init did not start")
      -- from here this thread computes: init's end, remote_boot, the runner's
      -- handshake and the call all happen beside it
      H.touch(go)
      local t0 = core.hrtime()
      while not H.exists(ran) and core.hrtime() - t0 < 60e9 do compute(5) end
      assert.is_true(H.exists(ran), "the runner did not boot and run the call while the program computed")
      assert.are.equal(1, p:stats().runners)
      assert.is_string(t:await())
      H.rmdir(dir)
    end)

  it("replaces a min runner killed while the program computes", function()
    local p = H.pool { name = "min-beside", backend = "process", min = 1, max = 1, link = LINK,
                       boot_timeout = 120000 }
    assert.is_true(H.wait_for(function() return p:stats().runners == 1 end), "no min runner")
    local first = flame.call(p, which_runner)
    local pid = p.runners[1].term.pid
    os.execute("kill -KILL " .. pid)
    -- the loss, the release and the new boot are the runtime thread's alone
    local t0, lost, back = core.hrtime(), false, false
    while core.hrtime() - t0 < 60e9 do
      local n = p:stats().runners
      if n == 0 then lost = true elseif lost and n == 1 then back = true break end
      compute(5)
    end
    assert.is_true(lost, "the runner's loss was not seen while the program computed")
    assert.is_true(back, "no runner replaced it while the program computed")
    assert.is_false(H.alive(pid), "the killed runner still exists")
    local second = flame.call(p, which_runner)
    assert.is_string(second)
    assert.are_not.equal(first, second)
    assert.are.equal(1, p:stats().runners)
  end)
end)

describe("a backend state's requests", function()
  after_each(H.cleanup)

  -- the boot's error message: what remote_boot reported
  local function boot_says(name, remote_boot, opts)
    local o = { name = name, boot_timeout = 60000, backend = {
      init = function(x) return x end, remote_boot = remote_boot } }
    for k, v in pairs(opts or {}) do o[k] = v end
    local p = H.pool(o)
    local ok, err = pcall(flame.call, p, function() end, { timeout = 60000 })
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    return err.message, p
  end

  it("answers what is no request, and a request that cannot cross, with nil and why", function()
    local msg = boot_says("bad-requests", function(_, env)
      local a, why_a = coroutine.yield(42)          -- not a request
      local t = {}
      t.t = t                                       -- cannot cross: it holds itself
      local b, why_b = env.sleep(t)
      return nil, ("[%s %s] [%s %s]"):format(tostring(a), why_a, tostring(b), why_b)
    end)
    assert.matches("[nil bad request: not a request]", msg, 1, true)
    assert.matches("[nil bad request: tables nested more than 100 deep", msg, 1, true)
  end)

  it("answers a misused service with nil and what is wrong", function()
    local msg = boot_says("misused-services", function(_, env)
      local out = {}
      local function try(name, ...)
        local ok, a, b = pcall(...)
        out[#out + 1] = ("%s=[%s|%s|%s]"):format(name, tostring(ok), tostring(a), tostring(b))
      end
      try("no-url", env.http.request, { method = "GET" })
      try("headers", env.http.request, { url = "http://127.0.0.1:1/", headers = "x" })
      try("sleep", env.sleep, -1)
      try("send-after", env.send_after, "soon", { event = "x" })
      local proc = env.proc.spawn { path = "/bin/true" }
      try("signal", proc.kill, proc, "SIGNOPE")
      try("spawn-args", env.proc.spawn, { path = "/bin/true", args = { {} } })
      try("spawn-env", env.proc.spawn, { path = "/bin/true", env = "x" })
      local t = { s = ("x"):rep(100000) }
      for _ = 1, 10 do t = { a = t, b = t } end   -- 1,024 copies of 100 kB once copied
      try("too-much", env.sleep, t)
      return nil, table.concat(out, " ")
    end)
    for _, want in ipairs {
      "no-url=[true|nil|http.request: a table with a url expected]",
      "headers=[true|nil|http.request: headers must be a table of name = value]",
      "sleep=[true|nil|sleep: milliseconds >= 0 expected]",
      "send-after=[true|nil|send_after: milliseconds >= 0 expected]",
      "signal=[true|nil|kill: a signal name (SIGTERM, SIGKILL, SIGINT, SIGHUP) or number expected]",
      "spawn-args=[true|nil|proc.spawn: args must be strings (argument 1 is not)]",
      "spawn-env=[true|nil|proc.spawn: env must be a table]",
      "too-much=[true|nil|bad request: more than 64 MB of values",
    } do
      assert.matches(want, msg, 1, true)
    end
  end)

  it("answers a misused runner service, and one the environment has not, with nil and why",
    function()
    local msg = boot_says("misused-link", function(_, env)
      local out = {}
      local function try(name, f, ...)
        local ok, a, b = pcall(f, ...)
        out[#out + 1] = ("%s=[%s|%s|%s]"):format(name, tostring(ok), tostring(a), tostring(b))
      end
      try("unknown", coroutine.yield, "no_such_service")
      try("no-record", env.await_remote_up, "ref")
      try("unknown-ref", env.await_remote_up, { ref = "nobody" })
      local rec = env.parent_new { node_base = "misused" }
      try("bad-timeout", env.await_remote_up, rec, -5)
      try("workers", env.local_terminator, { max_concurrency = 0 })
      try("profile", env.local_terminator, { max_concurrency = 1, sandbox = { profile = "x" } })
      try("monitor", env.spawn_monitor, { __flame_handle = 1 }, { id = 1 })
      -- the record: what the pool was told, fresh ref and secret
      out[#out + 1] = ("record=[%s|%s|%s|%d|%s|%s]"):format(rec.node_base, rec.backend,
        tostring(rec.settings.max_concurrency), #rec.ref, tostring(#rec.secret > 40),
        tostring(rec.addrs[1]):match("^127%.0%.0%.1:%d+$") and "addr" or tostring(rec.addrs[1]))
      return nil, table.concat(out, " ")
    end, { max_concurrency = 7, link = { bind = "127.0.0.1" } })
    for _, want in ipairs {
      "unknown=[true|nil|the backend environment has no no_such_service]",
      "no-record=[true|nil|await_remote_up: a parent record from parent_new expected]",
      "unknown-ref=[true|nil|no runner is expected with this ref]",
      "bad-timeout=[true|nil|await_remote_up: timeout must be milliseconds >= 0]",
      "workers=[true|nil|local_terminator: max_concurrency in [1, 4096] expected]",
      "profile=[true|nil|local_terminator: unknown sandbox profile 'x']",
      "monitor=[true|nil|spawn_monitor: not a terminator]",
      "record=[misused|process|7|20|true|addr]",
    } do
      assert.matches(want, msg, 1, true)
    end
  end)

  it("meets its runner in await_remote_up while the program computes", function()
    local dir = H.tmpdir()
    local booting, up = dir .. "/booting", dir .. "/up"
    local function touch(env, file) assert(env.proc.run { path = "/bin/touch", args = { file } }) end
    -- the process backend, with a file made when remote_boot starts and when it has
    -- its runner
    local p = H.pool { name = "boot-beside", boot_timeout = 120000, link = LINK, backend = {
      init = function(opts, env) return require("flame.backends.process").init(opts, env) end,
      remote_boot = function(state, env)
        touch(env, booting)
        local term, st = require("flame.backends.process").remote_boot(state, env)
        if term then touch(env, up) end
        return term, st
      end,
      handle_info = function(msg, state, env)
        return require("flame.backends.process").handle_info(msg, state, env)
      end,
      remote_shutdown = function(state, reason, env)
        return require("flame.backends.process").remote_shutdown(state, reason, env)
      end,
    } }
    local t = flame.spawn(function() return flame.call(p, which_runner) end)
    assert.is_true(H.wait_for(function() return H.exists(booting) end, 60000),
      "remote_boot did not start")
    -- from here on this thread never returns to flame until the runner is met:
    -- its process starts, connects, proves itself and reaches the backend's state
    local t0, seen = core.hrtime(), false
    while core.hrtime() - t0 < 60e9 do
      if H.exists(up) then seen = true break end
      compute(5)
    end
    assert.is_true(seen, "await_remote_up did not return while the program computed")
    assert.is_string(t:await())
    assert.are.equal(1, p:stats().runners)
    H.rmdir(dir)
  end)

  it("sends a call through the backend's own remote_spawn_monitor while the program computes",
    function()
    local dir = H.tmpdir()
    local ran = dir .. "/ran"
    local p = H.pool { name = "via-beside", max_concurrency = 4, backend = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        state.terminator = env.local_terminator(state)
        return state.terminator, state
      end,
      remote_spawn_monitor = function(state, work, env)
        env.sleep(500)                        -- a request first: it waits, then sends
        assert(env.spawn_monitor(state.terminator, work))
      end,
    } }
    assert.is_true(flame.call(p, function() return true end))   -- booted: no boot in the way
    local t = flame.spawn(function()
      return flame.call(p, function() io.open(ran, "w"):close() return "sent" end)
    end)
    assert.is_true(H.wait_for(function() return p:stats().busy == 1 end), "no call held")
    assert.is_false(H.exists(ran))           -- held in the backend's sleep
    -- the call is with the runtime thread now; from here this thread never returns
    -- to flame until the work has run: the backend's step, its sleep and its send
    -- happen beside it
    local t0, seen = core.hrtime(), false
    while core.hrtime() - t0 < 60e9 do
      if H.exists(ran) then seen = true break end
      compute(5)
    end
    assert.is_true(seen, "the call was not sent while the program computed")
    assert.are.equal("sent", t:await())
    H.rmdir(dir)
  end)

  it("gives the pool's log a backend's long line whole", function()
    local lines = {}
    local p = H.pool { name = "long-line", boot_timeout = 60000, backend = {
      init = function(x) return x end,
      remote_boot = function(_, env)
        env.log.warn("%s", ("x"):rep(10000) .. "end")
        return nil, "logged"
      end } }
    p.log.warn = function(fmt, ...) lines[#lines + 1] = fmt:format(...) end
    assert.is_false(pcall(flame.call, p, function() end, { timeout = 60000 }))
    local whole = false
    for _, l in ipairs(lines) do
      if #l == 10003 and l:sub(-3) == "end" then whole = true end
    end
    assert.is_true(whole, "the line was cut")
  end)

  it("closes with a proc.run whose output is still held by a child, and nothing breaks", function()
    local marker = ("%d%03d"):format(math.random(100, 999), math.random(0, 999))
    local p = H.pool { name = "held-output", boot_timeout = 60000, backend = {
      -- init fails: the state closes at once, while the grandchild still holds the
      -- pipes of the command that proc.run saw end
      init = function(x, env)
        local r = env.proc.run { path = "/bin/sh",
          args = { "-c", "(sleep 1." .. x.marker .. "; echo late) & echo first" } }
        error("refused after " .. (r and r.stdout or "nothing"), 0)
      end,
      remote_boot = function() return nil end },
      backend_opts = { marker = marker } }
    local ok, err = pcall(flame.call, p, function() end, { timeout = 60000 })
    assert.is_false(ok)
    assert.matches("refused after first", err.message, 1, true)
    -- the late output comes after the close (the grandchild, no child of ours, sleeps
    -- about 1 s): wait well past it
    flame.sleep(3000)
    local q = H.pool { name = "after-held", backend = "local" }
    assert.are.equal(42, flame.call(q, function() return 42 end))
  end)
end)

describe("a plain lua5.4 program", function()
  it("exits with pools and runners live, 100 times without a crash", function()
    local dir = H.tmpdir()
    local path = dir .. "/live.lua"
    local f = assert(io.open(path, "w"))
    f:write([[
      local flame = require "flame"
      local p = flame.pool { name = "live", backend = "process", max = 1 }
      local l = flame.pool { name = "live-local" }
      assert(flame.call(p, function() return 1 end) == 1)
      assert(flame.call(l, function() return 2 end) == 2)
      print("ended")
    ]])
    f:close()
    local crashed, last = 0, nil
    for _ = 1, H.slow and 5 or 100 do
      local rc, out = H.run("lua5.4 " .. H.q(path))
      if rc ~= 0 or not out:find("ended", 1, true) then
        crashed = crashed + 1
        last = out
      end
    end
    assert.are.equal(0, crashed, last)
    H.rmdir(dir)
  end)
end)

-- The runtime's loop and a runner's main loop poll a while after each event before
-- they sleep (loop.h's flame_spin; FLAME_LOOP_SPIN_US is read once per process, so
-- each case is a program of its own). Whatever the window (off, a whole second, a
-- value that is not a number of microseconds and so leaves the default), calls
-- from several tasks come back right and the program and its runners end, shut
-- down or not.
describe("the loops' spin window", function()
  local dir, path
  setup(function()
    dir = H.tmpdir()
    path = dir .. "/spin.lua"
    local f = assert(io.open(path, "w"))
    f:write([[
      local flame = require "flame"
      local p = flame.pool { name = "spin", backend = "process", max = 2, boot_timeout = 120000 }
      local l = flame.pool { name = "spin-local", max = 2 }
      local ts = {}
      for i = 1, 4 do
        ts[i] = flame.spawn(function()
          for j = 1, 25 do
            assert(flame.call(p, function() return i * 100 + j end) == i * 100 + j)
            assert(flame.call(l, function() return -(i * 100 + j) end) == -(i * 100 + j))
          end
        end)
      end
      for i = 1, 4 do ts[i]:await() end
      local pid = p.runners[1].term.pid
      if arg[1] == "shutdown" then
        p:shutdown()
        l:shutdown()
        -- shut down means the runner process is gone
        assert(os.execute("kill -0 " .. pid .. " 2>/dev/null") == nil, "runner still there")
      end
      print("ended " .. pid)
    ]])
    f:close()
  end)
  teardown(function() H.rmdir(dir) end)

  for _, case in ipairs { { "0", "off" }, { "1000000", "one second" },
                          { "many", "not a number" } } do
    for _, how in ipairs { "shutdown", "exit" } do
      it(("at %s (%s): calls return, the program ends (%s)"):format(case[1], case[2], how),
        function()
          local rc, out = H.run(("FLAME_LOOP_SPIN_US=%s timeout 300 lua5.4 %s %s"):format(
            case[1], H.q(path), how))
          assert.are.equal(0, rc, out)
          local pid = out:match("ended (%d+)")
          assert.is_truthy(pid, out)
          -- a program that exits with a pool live: its runner ends by itself (its
          -- parent gone), whatever its own loop's window
          assert.is_true(H.wait_for(function()
            return os.execute("kill -0 " .. pid .. " 2>/dev/null") == nil
          end, 60000), "runner " .. pid .. " still there")
        end)
    end
  end
end)

-- What is left when libuv refuses a handle (a shim, preloaded, makes uv_poll_start
-- or uv_check_start fail while a file exists): a pool whose wake-up handle cannot
-- start is refused with why, and the next one is made; loops whose spin cannot
-- start (the runtime's, a runner's) sleep between events and serve calls all the
-- same.
describe("when libuv refuses a handle", function()
  it("refuses the pool that cannot have its wake-up, and serves calls without spins",
    function()
      local dir = H.tmpdir()
      local env, why = R.uv_fail_shim(dir)
      if not env then H.rmdir(dir) pending(why) return end
      local script = io.open(dir .. "/refused.lua", "w")
      script:write([[
        local flame = require "flame"
        local dir = arg[1]
        local function touch(name) assert(io.open(dir .. "/" .. name, "w")):close() end
        touch("fail_check")                  -- before the runtime thread starts
        touch("fail_poll")
        local ok, err = pcall(flame.pool, { name = "a" })
        print("first", ok, err.kind, err.message)
        os.remove(dir .. "/fail_poll")
        local l = flame.pool { name = "b" }
        print("local", flame.call(l, function() return 7 end))
        local p = flame.pool { name = "c", backend = "process", log = "warn" }
        print("process", flame.call(p, function() return 8 end))
        p:shutdown()
        l:shutdown()
        print("ended")
      ]])
      script:close()
      local rc, out = H.run(("%s timeout 120 lua5.4 %s %s"):format(env,
        H.q(dir .. "/refused.lua"), H.q(dir)))
      H.rmdir(dir)
      assert.are.equal(0, rc, out)
      assert.matches("first\tfalse\tinvalid\tflame.pool: cannot make the pool's wake-up "
        .. "handle: not enough memory (is the process out of memory", out, 1, true)
      assert.matches("local\t7\n", out)
      assert.matches("process\t8\n", out)
      -- the runner says its loop sleeps, as the runtime's does without a word
      assert.matches("the loop will sleep between events: not enough memory", out, 1, true)
      assert.matches("ended\n", out)
    end)
end)
