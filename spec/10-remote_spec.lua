-- Remote runners on the process backend, where things go wrong: wrong secrets, old
-- protocols, garbage on the port, runners killed mid-call, a parent killed, big
-- results, idle shutdown, boots that never connect. Real processes, real TCP on
-- 127.0.0.1; every test checks that no runner process is left.
local flame = require "flame"
local core = require "flame.core"
local cjson = require "cjson"
local wire = require "spec.support.wire"
local task = require "flame.task"
local H = require "spec.helper"
local R = require "spec.support.remote"

-- heartbeat_interval x heartbeat_misses is also the time the parent has for each
-- runner's handshake: under valgrind (the parent slowed down, busy for a while) the
-- window is wider
local LINK = { heartbeat_interval = 200, heartbeat_misses = H.slow and 25 or 3 }
-- boot timeout of the puppet backend: the time a test has to play its part of the
-- handshake (generous), and the time it waits for the boot to fail after that
local PLAY = H.slow and 15000 or 2000
-- idle_shutdown_after of the idle specs: a remote runner's idle clock starts when it
-- is up, before its idle check and its first call have reached it; under valgrind
-- those take a while, so the window is wider there
local IDLE = H.slow and 3000 or 200

local alive = H.alive      -- gone: no /proc entry, or only a zombie's

local seen = {}          -- runner pids started by a test, checked after it
local function track(pid) seen[#seen + 1] = pid return pid end

local function wait_gone(pids, ms)
  local deadline = task.now() + ms
  while task.now() < deadline do
    local any = false
    for _, pid in ipairs(pids) do if alive(pid) then any = true end end
    if not any then return true end
    flame.sleep(50)
  end
  return false
end

local function runner_pids(p)
  local pids = {}
  for _, r in ipairs(p.runners) do pids[#pids + 1] = track(r.term.pid) end
  return pids
end

local fails = R.fails

-- A backend that boots nothing and waits for its runner: the test plays the runner
-- (or an impostor) by hand, with the parent record the pool is expecting.
local puppet_backend = {
  init = function(opts, env) return env.merge({}, opts) end,
  remote_boot = function(state, env)
    state.parent = env.parent_new { node_base = "puppet" }
    -- the record goes to the test the way a backend hands it to a runner: in the
    -- environment of a process it starts (which writes it to a file for the test)
    assert(env.proc.run { path = "/bin/sh", args = { "-c", 'printf %s "$FLAME_PARENT" > "$0"',
      state.record }, env = { FLAME_PARENT = env.parent_encode(state.parent) } })
    local term, err = env.await_remote_up(state.parent, state.boot_timeout)
    if not term then return nil, err end
    state.terminator = term
    return term, state
  end,
}

-- A pool of the puppet backend; its record is written to a file of its own.
local function puppet_pool(opts)
  opts.backend = puppet_backend
  opts.backend_opts = { record = os.tmpname() }
  return H.pool(opts)
end

-- The parent record of the one runner the pool is waiting for.
local function expected_parent(p)
  local file = p.opts.backend_opts.record
  local deadline = task.now() + H.patience
  while task.now() < deadline do
    local f = io.open(file)
    local text = f and f:read("a")
    if f then f:close() end
    if text and text ~= "" then
      os.remove(file)
      return assert(cjson.decode(core.b64decode(text)))
    end
    flame.sleep(10)
  end
  error("the pool expects no runner")
end

local connect = R.connect

describe("the specs' copy of the protocol (spec/support/wire.lua)", function()
  it("has the types, version and SPAWN header of core/wire.h (core.wire)", function()
    local names = 0
    for name, v in pairs(core.wire) do
      if name ~= "SPAWN_HEADER" and name ~= "NONCE" then
        assert.are.equal(v, wire[name], "wire." .. name)
        names = names + 1
      end
    end
    assert.are.equal(14, names)                 -- PROTOCOL and 13 message types
    for name, v in pairs(wire) do
      if type(v) == "number" then assert.are.equal(v, core.wire[name], "core.wire." .. name) end
    end
    assert.are.equal(core.wire.SPAWN_HEADER, #wire.spawn_header(1000, true))
    assert.are.equal(core.SPAWN_HEADER, core.wire.SPAWN_HEADER)
  end)
end)

describe("remote runners", function()
  after_each(function()
    H.cleanup()
    local ok = wait_gone(seen, 5000)
    seen = {}
    assert.is_true(ok, "a runner process was left running")
  end)

  it("runs work in another process that knows its parent", function()
    local p = H.pool { name = "where", backend = "process", link = LINK }
    local pid, parent = flame.call(p, function()
      local f = io.open("/proc/self/stat")
      local pid = f:read("n")
      f:close()
      return pid, require("flame").parent()
    end)
    track(pid)
    assert.are_not.equal(core.pid(), pid)
    assert.are.equal("process", parent.backend)
    assert.are.equal(p.runners[1].term.pid, pid)
    assert.is_nil(flame.parent())            -- this process is the parent
  end)

  it("refuses a runner that does not hold the secret, and runs nothing", function()
    local p = puppet_pool { name = "impostor", boot_timeout = PLAY,
                       link = LINK }
    local caller = flame.spawn(function() return flame.call(p, function() return 1 end) end)
    local parent = expected_parent(p)
    local c, closed, got = connect(p:hub().addrs[1])
    c:send(wire.HELLO, 0, cjson.encode { v = wire.PROTOCOL, ref = parent.ref,
      nonce = core.b64encode(core.random_bytes(16)) })
    assert.is_true(H.wait_for(function() return #got >= 1 end), "no answer to HELLO")
    assert.are.equal(wire.CHALLENGE, got[1][1])
    c:send(wire.PROOF, 0, cjson.encode { proof = core.b64encode(("x"):rep(32)) })
    c:send(wire.REMOTE_UP, 0, "{}")
    closed:wait()
    assert.are.same({ wire.CLOSE, 0, "wrong proof: the runner does not hold the secret" },
      got[2])
    local err = fails("boot", caller.await, caller)
    assert.matches("did not connect within the boot timeout", err.message, 1, true)
    assert.are.equal(2, #got)                -- the challenge and the refusal, no work
  end)

  it("a runner refuses a parent that cannot prove the secret", function()
    -- the process backend, with FLAME_PARENT re-encoded around a secret the parent
    -- does not hold
    local tampered = R.edited_parent { secret = "c3RyYW5nZXJzZWNyZXRzdHJhbmdlcnNlY3JldCE=" }
    local p = H.pool { name = "tampered", backend = tampered, link = LINK }
    local err = fails("boot", flame.call, p, function() return 1 end)
    assert.matches("runner process exited with code 1", err.message, 1, true)
  end)

  it("refuses an unknown ref, a short nonce and a handshake that never ends", function()
    local p = puppet_pool { name = "refusals", boot_timeout = PLAY,
                       link = LINK }
    local caller = flame.spawn(function() return pcall(flame.call, p, function() return 1 end) end)
    local parent = expected_parent(p)
    local addr = p:hub().addrs[1]
    local c, closed, got = connect(addr)
    c:send(wire.HELLO, 0, cjson.encode { v = 1, ref = "nobody-expects-me", nonce = ("A"):rep(24) })
    closed:wait()
    assert.are.same({ wire.CLOSE, 0, "unknown runner ref" }, got[1])
    local c2, closed2, got2 = connect(addr)
    c2:send(wire.HELLO, 0, cjson.encode { v = 1, ref = parent.ref,
                                          nonce = core.b64encode("short") })
    closed2:wait()
    assert.are.same({ wire.CLOSE, 0, "malformed HELLO nonce" }, got2[1])
    local _, closed3, got3 = connect(addr)    -- says nothing: closed after the window
    closed3:wait()
    assert.are.same({ wire.CLOSE, 0, "handshake timed out" }, got3[1])
    assert.is_true(H.wait_for(function() return p:hub().refusals == 3 end))
    caller:await()
  end)

  it("refuses an old protocol version on both sides", function()
    local p = puppet_pool { name = "old", boot_timeout = PLAY,
                       link = LINK }
    local caller = flame.spawn(function() return flame.call(p, function() return 1 end) end)
    local parent = expected_parent(p)
    local c, closed, got = connect(p:hub().addrs[1])
    c:send(wire.HELLO, 0, cjson.encode { v = 0, ref = parent.ref, nonce = "AAAA" })
    closed:wait()
    assert.are.same({ wire.CLOSE, 0, "protocol version 0 is not 1" }, got[1])
    fails("boot", caller.await, caller)

    local doc = { v = 0, ref = "abcdefghij", secret = core.b64encode("s"),
                  addrs = { "127.0.0.1:1" }, backend = "process", settings = {} }
    local rc, msg = H.run("FLAME_PARENT=" .. core.b64encode(cjson.encode(doc)) .. " flame runner")
    assert.are.equal(2, rc)
    assert.matches("protocol version 0, this runner speaks 1", msg, 1, true)
  end)

  it("closes a connection that sends garbage, and only that one", function()
    local p = H.pool { name = "garbage", backend = "process", link = LINK }
    assert.are.equal(1, flame.call(p, function() return 1 end))
    runner_pids(p)
    local c, closed = connect(p:hub().addrs[1])
    local junk = {}
    for i = 1, 4096 do junk[i] = string.char(math.random(0, 255)) end
    c:send(200, 7, table.concat(junk))      -- a valid frame of nonsense
    assert.is_string(closed:wait())
    local c2, closed2, got2 = connect(p:hub().addrs[1])
    c2:send(wire.HELLO, 0, "not json at all")
    closed2:wait()
    assert.are.same({ wire.CLOSE, 0, "malformed HELLO" }, got2[1])
    assert.are.equal(2, flame.call(p, function() return 2 end))
    assert.are.equal(1, p:stats().runners)
  end)

  it("reports runner_down at once when a runner is killed mid-call, and replaces it",
    function()
      local p = H.pool { name = "killed", backend = "process", link = LINK }
      local dir = H.tmpdir()
      local running = dir .. "/running"
      local t0 = task.now()
      local t = flame.spawn(function()
        return flame.call(p, function()
          io.open(running, "w"):close()
          os.execute("sleep 20")
          return "finished"
        end)
      end)
      assert.is_true(H.wait_for(function() return H.exists(running) end), "the call did not start")
      H.rmdir(dir)
      local pid = runner_pids(p)[1]
      os.execute("kill -9 " .. pid)
      local err = fails("runner_down", t.await, t)
      assert.is_true(task.now() - t0 < 20000, "waited for the work instead of the death")
      assert.matches("killed by signal 9", err.message, 1, true)
      assert.are.equal("again", flame.call(p, function() return "again" end))
      runner_pids(p)
    end)

  it("kills a call past its timeout on the runner, and the runner keeps serving", function()
    local p = H.pool { name = "remote-timeout", backend = "process", max_concurrency = 1,
                       link = LINK }
    flame.call(p, function() end)          -- booted first: the 200 ms go to the run
    local err = fails("timeout", flame.call, p, function() while true do end end,
      { timeout = 200 })
    assert.are.equal("run", err.phase)
    local before = runner_pids(p)[1]
    assert.are.equal("served", flame.call(p, function() return "served" end))
    assert.are.equal(before, runner_pids(p)[1])   -- the same runner process
  end)

  it("carries a 64 MB result whole while small calls keep completing", function()
    -- default heartbeats: copying 64 MB takes a while under the sanitizers
    local p = H.pool { name = "big", backend = "process", max_concurrency = 4 }
    flame.call(p, function() end)
    local order = {}
    local big = flame.spawn(function()
      local s = flame.call(p, function() return ("0123456789abcdef"):rep(4 << 20) end)
      order[#order + 1] = "big"
      return s
    end)
    local small = flame.spawn(function()
      for i = 1, 30 do
        flame.call(p, function() return i end)
        order[#order + 1] = "small"
      end
    end)
    local s = big:await()
    small:await()
    assert.are.equal(64 << 20, #s)
    assert.are.equal("0123456789abcdef", s:sub(1, 16))
    assert.are.equal("0123456789abcdef", s:sub(-16))
    local before_big = 0
    for _, what in ipairs(order) do
      if what == "big" then break end
      before_big = before_big + 1
    end
    assert.is_true(before_big > 0, "no small call completed while the big result crossed")
    runner_pids(p)
  end)

  it("shuts idle runners down; the parent hears REMOTE_SHUTDOWN", function()
    local shrunk = {}
    local p = H.pool { name = "idle", backend = "process", idle_shutdown_after = IDLE + 100,
                       on_shrink = function(info) shrunk[#shrunk + 1] = info.reason end,
                       link = LINK }
    flame.call(p, function() end)
    local pids = runner_pids(p)
    assert.is_true(H.wait_for(function() return p:stats().runners == 0 end),
      "the idle runner did not shut down")
    assert.are.same({ "runner shut down: idle" }, shrunk)
    assert.is_true(wait_gone(pids, 3000))
  end)

  it("asks the pool's idle check before an idle shutdown", function()
    local dir = H.tmpdir()
    local busy = H.pool { name = "idle-check-no", backend = "process", link = LINK,
      idle_shutdown_after = { IDLE, function() return false end } }
    local ready = H.pool { name = "idle-check-yes", backend = "process", link = LINK,
      idle_shutdown_after = { IDLE, function()
        local f = io.open(dir .. "/checked", "w")   -- runs on the runner
        f:close()
        return true
      end } }
    flame.call(busy, function() end)
    flame.call(ready, function() end)
    runner_pids(busy)
    runner_pids(ready)
    flame.sleep(5 * IDLE)                    -- both checks are asked meanwhile
    assert.is_true(H.wait_for(function() return ready:stats().runners == 0 end),
      "the runner whose check agreed did not shut down")
    assert.are.equal(1, busy:stats().runners)
    assert.is_truthy(io.open(dir .. "/checked"))
    H.rmdir(dir)
  end)

  it("fails a boot that never connects with `boot`, leaving nothing running", function()
    local marker = ("%d.%03d"):format(math.random(100, 999), math.random(0, 999))
    local silent = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        state.parent = env.parent_new { node_base = "silent" }
        local proc = assert(env.proc.spawn { path = "/bin/sleep", args = { state.marker } })
        local term, err = env.await_remote_up(state.parent, state.boot_timeout)
        if not term then
          proc:kill("SIGKILL")
          return nil, err
        end
        return term, state
      end,
    }
    -- children of this process whose command line has the marker (read from /proc:
    -- no tool is spawned, as those may not run under the sanitizers' preload)
    local function sleepers()
      local pids = {}
      for _, pid in ipairs(core.children()) do  -- whichever thread started them
        local c = io.open("/proc/" .. pid .. "/cmdline")
        if c then
          -- read gives nil when the process ended since the open
          if (c:read("a") or ""):find(marker, 1, true) then pids[#pids + 1] = pid end
          c:close()
        end
      end
      return pids
    end
    local p = H.pool { name = "silent", backend = silent, boot_timeout = PLAY, link = LINK,
                       backend_opts = { marker = marker } }
    local t = flame.spawn(function() return flame.call(p, function() end) end)
    local started
    H.wait_for(function() started = sleepers() return #started > 0 end, PLAY)
    assert.are.equal(1, #started, "the backend's process did not start")
    local err = fails("boot", t.await, t)
    assert.matches(("did not connect within the boot timeout of %d ms"):format(PLAY),
      err.message, 1, true)
    assert.is_true(wait_gone(started, 10000))
  end)

  it("fails every caller waiting for a boot that fails", function()
    local p = H.pool { name = "exits", backend = "process", max = 1, max_concurrency = 1,
                       backend_opts = { command = { "/bin/sh", "-c", "exit 3" } },
                       timeout = math.huge, link = LINK }
    local ts = {}
    for i = 1, 3 do ts[i] = flame.spawn(function() return flame.call(p, function() end) end) end
    for i = 1, 3 do
      local err = fails("boot", ts[i].await, ts[i])
      assert.matches("runner process exited with code 3", err.message, 1, true)
    end
  end)

  it("ends a boot in flight when the pool shuts down, leaving nothing running", function()
    -- runner processes this process started that are still alive
    local function runners_left()
      local left = {}
      for _, pid in ipairs(core.children()) do   -- whichever thread started them
        local c = io.open("/proc/" .. pid .. "/cmdline")
        if c and (c:read("a") or ""):find("runner", 1, true) and alive(tonumber(pid)) then
          left[#left + 1] = pid
        end
        if c then c:close() end
      end
      return left
    end
    local p = flame.pool { name = "early-shutdown", backend = "process", min = 1,
                           boot_timeout = math.huge, link = LINK }
    -- the runner process is starting
    assert.is_true(H.wait_for(function() return #runners_left() > 0 or #p.runners > 0 end, 10000))
    local t0 = task.now()
    p:shutdown()
    assert.is_true(task.now() - t0 < 5000)
    assert.are.same({}, runners_left())      -- gone when shutdown returns, not later
  end)

  it("lets an unauthenticated peer send only a little", function()
    local p = puppet_pool { name = "flood", boot_timeout = PLAY,
                       link = LINK }
    local t = flame.spawn(function() return pcall(flame.call, p, function() end) end)
    expected_parent(p)
    local c, closed = connect(p:hub().addrs[1])
    c:send(wire.HELLO, 0, ("x"):rep(200 * 1024))  -- bigger than a handshake may be
    closed:wait()                            -- by the parent (a reset, with data unread)
    -- the hub counts it on its own thread: the count may come a moment after the close
    H.wait_for(function() return p:hub().drops > 0 end)
    assert.are.equal(1, p:hub().drops)
    t:await()
  end)

  it("stops listening to a connection once it is refused", function()
    local p = puppet_pool { name = "chatty", boot_timeout = PLAY,
                       link = LINK }
    local t = flame.spawn(function() return pcall(flame.call, p, function() end) end)
    expected_parent(p)
    local c, closed, got = connect(p:hub().addrs[1])
    for _ = 1, 5 do c:send(wire.HELLO, 0, "not json") end
    c:send(wire.SHUTDOWN, 0, "")
    closed:wait()
    H.wait_for(function() return p:hub().refusals > 0 end)  -- counted a moment later
    assert.are.equal(1, p:hub().refusals)    -- one refusal, nothing after it is read
    assert.is_true(#got <= 1)
    t:await()
  end)

  it("keeps a runner whose idle check never returns, and it still serves", function()
    local p = H.pool { name = "stuck-check", backend = "process", link = LINK,
                       idle_shutdown_after = { IDLE, function() while true do end end } }
    flame.call(p, function() end)
    runner_pids(p)
    flame.sleep(IDLE + 5800)                 -- the check is killed after 5 s
    assert.are.equal(1, p:stats().runners)
    assert.are.equal("alive", flame.call(p, function() return "alive" end))
  end)

  it("kills remote work when its calling task is cancelled, and frees the slot", function()
    local dir = H.tmpdir()
    local p = H.pool { name = "cancel-remote", backend = "process", max_concurrency = 1,
                       link = LINK }
    local t = flame.spawn(function()
      flame.call(p, function()
        io.open(dir .. "/started", "w"):close()
        local n = 0
        for i = 1, 1e10 do n = n + i end        -- pure Lua: the kill reaches it
        io.open(dir .. "/finished", "w"):close()
      end, { timeout = math.huge })
    end)
    assert.is_true(H.wait_for(function() return H.exists(dir .. "/started") end),
      "the call did not start")
    runner_pids(p)
    t:cancel("caller gone")
    assert.are.equal("free", flame.call(p, function() return "free" end, { timeout = 30000 }))
    assert.is_nil(io.open(dir .. "/finished"))
    H.rmdir(dir)
  end)

  it("lets unlinked work finish after the parent dies, and kills linked work", function()
    local dir = H.tmpdir()
    local script = dir .. "/parent.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local dir = arg[1]
      local p = flame.pool { name = "links", backend = "process", max_concurrency = 2,
                             shutdown_timeout = 10000,
                             link = { heartbeat_interval = 200, heartbeat_misses = 3 } }
      flame.call(p, function() end)
      local out = io.open(dir .. "/pid", "w")
      out:write(p.runners[1].term.pid, "\n")
      out:close()
      for _, linked in ipairs { false, true } do   -- unlinked first: see below
        flame.spawn(function()
          flame.call(p, function()
            io.open(dir .. "/running-" .. tostring(linked), "w"):close()
            local t0 = os.time()
            local n = 0
            while os.time() - t0 < 4 do n = n + 1 end     -- 3 to 4 s of pure Lua
            io.open(dir .. "/" .. tostring(linked), "w"):close()
          end, { link = linked, timeout = math.huge })
        end)
      end
      flame.sleep(60000)
    ]])
    f:close()
    local pp = io.popen("flame " .. H.q(script) .. " " .. H.q(dir) .. " >/dev/null 2>&1 & echo $!")
    local parent = tonumber(pp:read("l"))
    pp:close()
    local pid
    local deadline = task.now() + H.patience
    while not pid and task.now() < deadline do
      flame.sleep(50)
      local pf = io.open(dir .. "/pid")
      if pf then pid = tonumber(pf:read("l")) pf:close() end
    end
    assert.is_number(pid, "the parent did not start its runner")
    track(pid)
    -- both calls are running now (should the runner start the linked one only once
    -- the unlinked one is done, the linked one is still killed with its parent)
    assert.is_true(H.wait_for(function()
      return H.exists(dir .. "/running-true") and H.exists(dir .. "/running-false")
    end), "the calls did not start")
    os.execute("kill -9 " .. parent)
    assert.is_true(wait_gone({ pid }, 20000), "the runner outlived its parent")
    assert.is_truthy(io.open(dir .. "/false"), "unlinked work did not finish")
    assert.is_nil(io.open(dir .. "/true"), "linked work was not killed")
    H.rmdir(dir)
  end)

  it("stops every runner when the parent is killed with SIGKILL", function()
    local dir = H.tmpdir()
    local script = dir .. "/parent.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local p = flame.pool { name = "orphans", backend = "process", min = 2, max = 2,
                             shutdown_timeout = 500,
                             link = { heartbeat_interval = 200, heartbeat_misses = 3 } }
      flame.call(p, function() end)
      while #p.runners < 2 do flame.sleep(20) end
      local out = io.open(arg[1], "w")
      for _, r in ipairs(p.runners) do out:write(r.term.pid, "\n") end
      out:close()
      flame.sleep(60000)
    ]])
    f:close()
    local pidfile = dir .. "/pids"
    local pp = io.popen("flame " .. H.q(script) .. " " .. H.q(pidfile) .. " >/dev/null 2>&1 & echo $!")
    local parent = tonumber(pp:read("l"))
    pp:close()
    local pids = {}
    local deadline = task.now() + H.patience
    while #pids < 2 and task.now() < deadline do
      flame.sleep(50)
      local pf = io.open(pidfile)
      if pf then
        pids = {}
        for line in pf:lines() do pids[#pids + 1] = track(tonumber(line)) end
        pf:close()
      end
    end
    assert.are.equal(2, #pids, "the parent did not start its runners")
    os.execute("kill -9 " .. parent)
    -- shutdown_timeout (500) plus the heartbeat window (600), with room for a slow box
    assert.is_true(wait_gone(pids, 5000), "runners outlived their parent")
    H.rmdir(dir)
  end)
end)

describe("the backend environment", function()
  after_each(H.cleanup)

  -- A backend whose boot runs one command with proc.run and fails with what it got,
  -- so the test reads the result in the boot error.
  local function run_backend(o)
    return {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        local r, err = env.proc.run(state.run)
        if not r then return nil, "ERR[" .. tostring(err) .. "]" end
        return nil, ("code=%s signal=%s stdout=[%s] stderr=[%s] truncated=%s"):format(
          r.code, r.signal, r.stdout, r.stderr, tostring(r.truncated))
      end,
    }, o
  end

  local function boot_error(name, run)
    local b = run_backend()
    local p = H.pool { name = name, backend = b, backend_opts = { run = run } }
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind, tostring(err))
    return err.message
  end

  it("runs a command to its end with proc.run: exit code, stdout and stderr", function()
    local msg = boot_error("proc-run", { path = "/bin/sh",
      args = { "-c", "echo one; echo two; echo oops >&2; exit 3" } })
    assert.matches("code=3 signal=0 stdout=[one\ntwo\n] stderr=[oops\n] truncated=false", msg, 1, true)
  end)

  it("kills a command past its timeout with proc.run, its children too", function()
    local marker = ("%d.%03d"):format(math.random(100, 999), math.random(0, 999))
    local msg = boot_error("proc-run-timeout", { path = "/bin/sh",
      args = { "-c", "sleep " .. marker .. " & sleep " .. marker .. "; echo never" }, timeout = 300 })
    assert.matches("ERR[proc.run: /bin/sh did not end within 300 ms (killed)]", msg, 1, true)
    -- no sleep with the marker is left
    local function left()
      local n = 0
      for pid in io.popen("ls /proc"):lines() do
        if pid:match("^%d+$") then
          local f = io.open("/proc/" .. pid .. "/cmdline")
          local c = f and f:read("a") or ""
          if f then f:close() end
          if c:find(marker, 1, true) and H.alive(pid) then n = n + 1 end
        end
      end
      return n
    end
    assert.is_true(H.wait_for(function() return left() == 0 end), "the command's children outlived it")
  end)

  it("says why proc.run cannot start a command, bounds its output, and checks its options", function()
    assert.matches("ERR[proc.run: cannot start /nonexistent/cmd:",
      boot_error("proc-run-missing", { path = "/nonexistent/cmd" }), 1, true)
    assert.matches("stdout=[aaaa\n] stderr=[] truncated=true",
      boot_error("proc-run-max", { path = "/bin/sh", args = { "-c", "echo aaaa; echo bbbbbbbbbb" },
                                   max_output = 8 }), 1, true)
    assert.matches("proc.run: timeout must be milliseconds > 0",
      boot_error("proc-run-bad", { path = "/bin/true", timeout = -1 }), 1, true)
  end)

  it("lists the parent's environment, whole or by prefix", function()
    local b = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        local some, all = env.environ("PA"), env.environ()
        local bad = {}
        for k in pairs(some) do
          if k:sub(1, 2) ~= "PA" then bad[#bad + 1] = k end
        end
        local _, err = pcall(env.environ, 5)   -- misuse raises (docs/backends.md)
        return nil, ("bad=[%s] prefixed=%s whole=%s home=%s refused=%s"):format(
          table.concat(bad, ","), tostring(some.PATH == state.path),
          tostring(all.PATH == state.path), tostring(all.HOME == state.home), tostring(err))
      end,
    }
    local p = H.pool { name = "environ", backend = b,
                       backend_opts = { path = os.getenv("PATH"), home = os.getenv("HOME") } }
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.matches("bad=[] prefixed=true whole=true home=true "
      .. "refused=environ: a prefix string expected", err.message, 1, true)
  end)

  it("tells handle_info when the link to a runner is lost, and its reason reaches the callers", function()
    local b = {
      init = function(opts, env) return env.merge({}, opts) end,
      remote_boot = function(state, env)
        state.parent = env.parent_new { node_base = "linklost" }
        local proc, err = env.proc.spawn { path = env.flame_bin(), args = { "runner" },
          env = { FLAME_PARENT = env.parent_encode(state.parent) }, group = true }
        if not proc then return nil, err end
        state.proc = proc
        local term, why = env.await_remote_up(state.parent, state.boot_timeout)
        if not term then proc:kill("SIGKILL", true) return nil, why end
        return term, state
      end,
      handle_info = function(msg, state, env)
        if msg.event == "link_lost" then
          return nil, "the backend heard: " .. msg.reason
        end
        return state                           -- the exit says nothing here
      end,
    }
    local p = H.pool { name = "link-lost", backend = b, link = LINK }
    local pid = flame.call(p, function()
      local f = io.open("/proc/self/stat")
      local n = f:read("n")
      f:close()
      return n
    end)
    local t = flame.spawn(function()
      return pcall(flame.call, p, function() os.execute("sleep 30") end)
    end)
    assert.is_true(H.wait_for(function() return p:stats().busy == 1 end))
    os.execute("kill -9 " .. pid)
    local ok, err = t:await()
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    assert.matches("the backend heard: lost the link to the runner", err.message, 1, true)
  end)
end)
