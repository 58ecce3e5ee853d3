-- The Docker backend against a real Docker engine: a private dockerd started by
-- scripts/dockerd (two of them for the multi-host case) and a runner image built by
-- scripts/runner-image. Where no engine can start, every test here is reported as
-- pending with the reason, never passed. Tagged #docker: the sanitized and valgrind
-- runs leave it out (the containers run the normal build anyway).
local flame = require "flame"
local core = require "flame.core"
local errors = require "flame.errors"
local task = require "flame.task"
local H = require "spec.helper"

local IMAGE = "flame-runner:spec"
local LINK = { heartbeat_interval = 200, heartbeat_misses = 3 }

local function sh(cmd)
  local rc, out = H.run(cmd)
  return rc == 0, out
end

local engine, engine2, why_not
local root = assert(io.popen("pwd")):read("l")

local function start_engine(dir)
  local ok, out = sh("cd " .. H.q(root) .. " && scripts/dockerd start " .. H.q(dir))
  if not ok then return nil, out end
  return (out:gsub("%s+$", ""))
end

local function docker(host, args)
  return sh("DOCKER_HOST=" .. H.q(host) .. " docker " .. args)
end

local function containers(host, pool)
  local ok, out = docker(host, "ps -aq --filter label=flame.pool=" .. pool)
  local ids = {}
  for id in (ok and out or ""):gmatch("%x+") do ids[#ids + 1] = id end
  return ids
end

local function wait_no_containers(host, pool, ms)
  local deadline = task.now() + ms
  repeat
    if #containers(host, pool) == 0 then return true end
    flame.sleep(100)
  until task.now() > deadline
  return false
end

local function pool(name, opts)
  local o = { name = name, backend = "docker", link = LINK,
              backend_opts = { image = IMAGE, host = engine } }
  for k, v in pairs(opts or {}) do
    if k == "backend_opts" then for bk, bv in pairs(v) do o.backend_opts[bk] = bv end
    else o[k] = v end
  end
  return H.pool(o)
end

describe("docker backend #docker", function()
  setup(function()
    local err
    engine, err = start_engine(root .. "/.dockerd")
    if not engine then why_not = "no Docker engine could start here: " .. tostring(err) return end
    local ok, out = sh("cd " .. H.q(root) .. " && DOCKER_HOST=" .. H.q(engine)
      .. " scripts/runner-image " .. IMAGE)
    if not ok then why_not = "the runner image could not be built: " .. out end
  end)

  teardown(function()
    sh("cd " .. H.q(root) .. " && scripts/dockerd stop " .. H.q(root .. "/.dockerd"))
    sh("cd " .. H.q(root) .. " && scripts/dockerd stop " .. H.q(root .. "/.dockerd2"))
  end)

  local function need_engine()
    if why_not then pending(why_not) return false end
    return true
  end

  after_each(function()
    H.cleanup()
  end)

  it("runs calls in containers; results and errors round trip", function()
    if not need_engine() then return end
    local p = pool("dk-calls")
    local inside, parent = flame.call(p, function()
      local m = io.open("/proc/self/mountinfo"):read("a")
      return io.open("/.dockerenv") ~= nil or m:find("docker", 1, true) ~= nil,
        require("flame").parent()
    end)
    assert.is_true(inside)
    assert.are.equal("docker", parent.backend)
    local t = { 1, "two", { three = 3.0 } }
    assert.are.same(t, flame.call(p, function() return t end))
    local ok, err = pcall(flame.call, p, function() error("inside", 0) end)
    assert.is_false(ok)
    assert.are.equal("remote", err.kind)
    assert.are.equal("inside", err.message)
    assert.are.equal(1, #containers(engine, "dk-calls"))
    p:shutdown()
    assert.is_true(wait_no_containers(engine, "dk-calls", 5000))
  end)

  it("boots up to max, and the containers are gone after idle shutdown", function()
    if not need_engine() then return end
    local p = pool("dk-idle", { max = 2, max_concurrency = 1, idle_shutdown_after = 300 })
    local ts = {}
    for i = 1, 4 do
      ts[i] = flame.spawn(function()
        return flame.call(p, function() os.execute("sleep 0.2") return i end)
      end)
    end
    for i = 1, 4 do assert.are.equal(i, ts[i]:await()) end
    assert.are.equal(2, #containers(engine, "dk-idle"))
    assert.is_true(wait_no_containers(engine, "dk-idle", 8000))
    assert.are.equal(0, p:stats().runners)
  end)

  it("reports runner_down promptly when the container is killed mid-call", function()
    if not need_engine() then return end
    local p = pool("dk-kill")
    flame.call(p, function() end)
    local id = containers(engine, "dk-kill")[1]
    local t0 = task.now()
    local t = flame.spawn(function()
      return flame.call(p, function() os.execute("sleep 10") end)
    end)
    flame.sleep(300)
    docker(engine, "kill " .. id)
    local ok, err = pcall(t.await, t)
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    assert.is_true(task.now() - t0 < 10000)
    assert.is_true(wait_no_containers(engine, "dk-kill", 8000))
  end)

  local failures = {
    { "a missing image", { image = "flame-missing:0" }, 'image "flame-missing:0" not found' },
    { "an unreachable engine", { host = "unix:///nonexistent/docker.sock" },
      "engine at unix:///nonexistent/docker.sock is unreachable" },
    -- its output comes with the reason when the log stream attached in time
    { "a command that exits at once", { cmd = { "sh", "-c", "echo bad start >&2; exit 3" } },
      "exited with code 3" },
    { "a runner that never connects", { cmd = { "sleep", "30" } },
      "did not connect within the boot timeout" },
  }
  for _, case in ipairs(failures) do
    it("fails the boot with the reason, leaving no container: " .. case[1], function()
      if not need_engine() then return end
      local name = "dk-fail-" .. case[1]:gsub("%W", "")
      local p = pool(name, { boot_timeout = 1500, backend_opts = case[2] })
      local ok, err = pcall(flame.call, p, function() end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind, tostring(err))
      assert.matches(case[3], err.message, 1, true)
      assert.is_true(wait_no_containers(engine, name, 5000))
    end)
  end

  it("spreads runners over two engines", function()
    if not need_engine() then return end
    engine2 = start_engine(root .. "/.dockerd2")
    if not engine2 then pending("a second engine could not start") return end
    local ok = docker(engine2, "image inspect " .. IMAGE .. " >/dev/null 2>&1")
    if not ok then
      assert(sh("cd " .. H.q(root) .. " && DOCKER_HOST=" .. H.q(engine2)
        .. " scripts/runner-image " .. IMAGE))
    end
    local p = pool("dk-hosts", { max = 2, max_concurrency = 1,
                                 backend_opts = { hosts = { engine, engine2 } } })
    local ts = {}
    for i = 1, 2 do
      ts[i] = flame.spawn(function() flame.call(p, function() os.execute("sleep 0.3") end) end)
    end
    for i = 1, 2 do ts[i]:await() end
    assert.are.equal(1, #containers(engine, "dk-hosts"))
    assert.are.equal(1, #containers(engine2, "dk-hosts"))
    p:shutdown()
    assert.is_true(wait_no_containers(engine, "dk-hosts", 5000))
    assert.is_true(wait_no_containers(engine2, "dk-hosts", 5000))
  end)

  it("sweeps away a container left by a parent of the pool that died", function()
    if not need_engine() then return end
    -- a container labelled as a runner of this pool whose parent (a pid that
    -- cannot exist) is gone
    local ok, out = docker(engine, "create --label flame.pool=dk-sweep --label "
      .. "flame.parent=gone --label flame.parent_pid=999999999 --label flame.parent_host="
      .. H.q(io.open("/proc/sys/kernel/hostname"):read("l")) .. " " .. IMAGE .. " sleep 60")
    assert(ok, out)
    assert.are.equal(1, #containers(engine, "dk-sweep"))
    local p = pool("dk-sweep")
    flame.call(p, function() end)
    local left = containers(engine, "dk-sweep")
    assert.are.equal(1, #left)                 -- only the new runner's container
    assert.is_nil(out:find(left[1], 1, true))
  end)

  it("removes the containers when the parent is killed with SIGKILL", function()
    if not need_engine() then return end
    local dir = H.tmpdir()
    local script = dir .. "/parent.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local p = flame.pool { name = "dk-orphans", backend = "docker", min = 2, max = 2,
        shutdown_timeout = 500, link = { heartbeat_interval = 200, heartbeat_misses = 3 },
        backend_opts = { image = %q, host = %q } }
      flame.call(p, function() end)
      while #p.runners < 2 do flame.sleep(20) end
      io.open(arg[1], "w"):close()
      flame.sleep(60000)
    ]]):format(IMAGE, engine))
    f:close()
    local pp = io.popen("flame " .. H.q(script) .. " " .. H.q(dir .. "/up")
      .. " >/dev/null 2>&1 & echo $!")
    local parent = tonumber(pp:read("l"))
    pp:close()
    local deadline = task.now() + 20000
    while not io.open(dir .. "/up") and task.now() < deadline do flame.sleep(50) end
    assert.are.equal(2, #containers(engine, "dk-orphans"))
    os.execute("kill -9 " .. parent)
    assert.is_true(wait_no_containers(engine, "dk-orphans", 8000), "containers outlived their parent")
    H.rmdir(dir)
  end)
end)
