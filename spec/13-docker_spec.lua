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
-- FLAME_SPEC_PODMAN=unix:///.../podman.sock (scripts/podman start): the same cases
-- against a Podman service instead of a private dockerd; its containers get rlimits
-- within this machine's hard limits, and the Docker-only cases (a second engine,
-- TLS, pulls from the registry) are pending. scripts/test's cluster step runs it.
local PODMAN = os.getenv("FLAME_SPEC_PODMAN")
if PODMAN == "" then PODMAN = nil end
local ULIMITS = PODMAN and { nofile = { 1024, 1024 }, nproc = { 4096, 4096 } } or nil
local LINK = { heartbeat_interval = 200, heartbeat_misses = 3 }

local function sh(cmd)
  local rc, out = H.run(cmd)
  return rc == 0, out
end

local engine, engine2, why_not
local second_engine
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

-- A table and an error cross both ways on p's runner.
local function round_trips(p)
  local t = { 1, "two", { three = 3.0 } }
  assert.are.same(t, flame.call(p, function() return t end))
  local ok, err = pcall(flame.call, p, function() error("inside", 0) end)
  assert.is_false(ok)
  assert.are.equal("remote", err.kind)
  assert.are.equal("inside", err.message)
end

local function pool(name, opts)
  local o = { name = name, backend = "docker", link = LINK,
              backend_opts = { image = IMAGE, host = engine, ulimits = ULIMITS } }
  for k, v in pairs(opts or {}) do
    if k == "backend_opts" then for bk, bv in pairs(v) do o.backend_opts[bk] = bv end
    else o[k] = v end
  end
  return H.pool(o)
end

describe("docker backend #docker", function()
  setup(function()
    local err
    if PODMAN then engine = PODMAN
    else engine, err = start_engine(root .. "/.dockerd") end
    if not engine then why_not = "no Docker engine could start here: " .. tostring(err) return end
    local ok, out = sh("cd " .. H.q(root) .. " && DOCKER_HOST=" .. H.q(engine)
      .. " scripts/runner-image " .. IMAGE)
    if not ok then why_not = "the runner image could not be built: " .. out end
  end)

  teardown(function()
    sh("cd " .. H.q(root) .. " && scripts/dockerd stop " .. H.q(root .. "/.dockerd"))
    sh("cd " .. H.q(root) .. " && scripts/dockerd stop " .. H.q(root .. "/.dockerd2"))
    sh("cd " .. H.q(root) .. " && scripts/registry stop " .. H.q(root .. "/.registry"))
  end)

  local function need_engine()
    if why_not then pending(why_not) return false end
    return true
  end

  -- The second engine also serves its API with TLS on 127.0.0.1 (clients verified),
  -- its certificates in .dockerd2/tls.
  local tls_port, tls_dir
  function second_engine()
    if not need_engine() then return false end
    if PODMAN then pending("Docker only: the Podman run has one engine, without TLS") return false end
    if not engine2 then
      local ok, port = sh([[python3 -c 'import socket; s = socket.socket(); ]]
        .. [[s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])']])
      assert(ok, port)
      tls_port = port:gsub("%s+$", "")
      local out
      ok, out = sh("cd " .. H.q(root) .. " && scripts/dockerd start "
        .. H.q(root .. "/.dockerd2") .. " --tls " .. tls_port)
      assert(ok, "the second engine could not start: " .. out)
      engine2 = out:gsub("%s+$", "")
      tls_dir = root .. "/.dockerd2/tls"
      if not docker(engine2, "image inspect " .. IMAGE .. " >/dev/null 2>&1") then
        assert(sh("cd " .. H.q(root) .. " && DOCKER_HOST=" .. H.q(engine2)
          .. " scripts/runner-image " .. IMAGE))
      end
    end
    return true
  end

  local registry
  local function need_registry()
    if not need_engine() then return false end
    if PODMAN then pending("Docker only: the Podman run pulls from no registry") return false end
    if not registry then
      local ok, out = sh("cd " .. H.q(root) .. " && scripts/registry start "
        .. H.q(root .. "/.registry"))
      assert(ok, "the registry could not start: " .. out)
      registry = out:gsub("%s+$", "")
    end
    return true
  end

  -- Log lines of a pool, kept for the test to read.
  local function capture(p)
    local lines = {}
    for _, level in ipairs { "debug", "info", "warn", "error" } do
      p.log[level] = function(fmt, ...)
        local ok, msg = pcall(string.format, fmt, ...)
        lines[#lines + 1] = level .. ": " .. (ok and msg or fmt)
      end
    end
    return lines
  end

  after_each(function()
    H.cleanup()
  end)

  it("runs calls in containers; results and errors round trip", function()
    if not need_engine() then return end
    local p = pool("dk-calls")
    local inside, parent = flame.call(p, function()
      local m = io.open("/proc/self/mountinfo"):read("a")
      return io.open("/.dockerenv") ~= nil or m:find("docker", 1, true) ~= nil
        or io.open("/run/.containerenv") ~= nil,              -- Podman's mark
        require("flame").parent()
    end)
    assert.is_true(inside)
    assert.are.equal("docker", parent.backend)
    round_trips(p)
    assert.are.equal(1, #containers(engine, "dk-calls"))
    -- what the runner prints reaches the pool's log, with the runner's id
    local lines = capture(p)
    flame.call(p, function() io.stderr:write("hello from the work\n") end)
    H.wait_for(function()
      return table.concat(lines, "\n"):find("[dk-calls-1] hello from the work", 1, true) ~= nil
    end)
    assert.matches("warn: [dk-calls-1] hello from the work", table.concat(lines, "\n"), 1, true)
    p:shutdown()
    assert.is_true(wait_no_containers(engine, "dk-calls", H.patience))
  end)

  it("carries calls over TLS to a container (link.tls = true): values, errors, 2 MB back",
    function()
      if not need_engine() then return end
      local link = {}
      for k, v in pairs(LINK) do link[k] = v end
      link.tls = true
      local p = pool("dk-tls", { link = link })
      assert.is_true(p:hub().tls)
      round_trips(p)
      local n = 2 << 20
      assert.are.equal(("q"):rep(n), flame.call(p, function() return ("q"):rep(n) end))
      assert.are.equal(0, p:hub().refusals)
      p:shutdown()
      assert.is_true(wait_no_containers(engine, "dk-tls", H.patience))
    end)

  it("sends modules by name: flame is the runner's own, a module the image lacks is a "
    .. "decode error naming it, and the program's own Lua module travels by value", function()
    if not need_engine() then return end
    local p = pool("dk-modules")
    local fl = require("flame")
    assert.are.equal("docker", flame.call(p, function() return fl.parent().backend end))
    local json = require("cjson")                 -- the runner image has no lua-cjson
    local ok, err = pcall(flame.call, p, function() return json.encode({}) end)
    assert.is_false(ok)
    assert.are.equal("decode", err.kind, tostring(err))
    assert.matches("module 'cjson' cannot be loaded here (install it where the work runs, or "
      .. "ship a Lua module with the pool's code_sync)",
      err.message, 1, true)
    local dir = H.tmpdir()
    local f = assert(io.open(dir .. "/spec_dk_own.lua", "w"))
    f:write("local M = {}\nfunction M.twice(x) return 2 * x end\nreturn M\n")
    f:close()
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    local own = require("spec_dk_own")           -- loaded here, and not in the image
    local ok2, got = pcall(flame.call, p, function() return own.twice(21) end)
    package.path = saved
    package.loaded["spec_dk_own"] = nil
    H.rmdir(dir)
    assert.is_true(ok2, tostring(got))
    assert.are.equal(42, got)
  end)

  it("ships the program's modules with code_sync: a closure holding one, { module, fn, "
    .. "args } and require in the work run in containers whose image lacks them", function()
    if not need_engine() then return end
    local dir = H.tmpdir()
    os.execute("mkdir -p " .. H.q(dir .. "/lib/spec_dk") .. " " .. H.q(dir .. "/tmp"))
    os.execute("chmod 1777 " .. H.q(dir .. "/tmp"))
    local f = assert(io.open(dir .. "/lib/spec_dk/thumbs.lua", "w"))
    f:write("local M = { size = { w = 4 } }\n"
      .. "function M.resize(x) return x * M.size.w end\nreturn M\n")
    f:close()
    local saved = package.path
    package.path = dir .. "/lib/?.lua;" .. package.path
    local ok, err = pcall(function()
      local thumbs = require "spec_dk.thumbs"
      local resize = thumbs.resize
      -- the container's /tmp is a directory of ours: its sync directory can be seen
      local p = pool("dk-code-sync", { code_sync = true, max = 1,
        backend_opts = { volumes = { dir .. "/tmp:/tmp" } } })
      local size = thumbs.size                -- a nested field of the module
      local r = { flame.call(p, function()
        return thumbs.resize(2), resize(3), thumbs == require("spec_dk.thumbs"),
          resize == require("spec_dk.thumbs").resize, size == require("spec_dk.thumbs").size,
          size.w, require("flame").parent().code_dir
      end) }
      assert.are.same({ 8, 12, true, true, true, 4 }, { table.unpack(r, 1, 6) })
      assert.matches("^/tmp/flame%-code%-%d+%-", r[7])
      assert.are.equal(20, flame.call(p, { "spec_dk.thumbs", "resize", { 5 } }))
      assert.are.equal(24, flame.call(p, function() return require("spec_dk.thumbs").resize(6) end))
      local host_dir = dir .. r[7]
      assert.is_truthy(core.file_info(host_dir .. "/spec_dk/thumbs.lua"))
      p:shutdown()
      assert.are.same({}, containers(engine, "dk-code-sync"))
      assert.is_nil(core.file_info(host_dir), "the runner's sync directory is left behind")
    end)
    package.path = saved
    package.loaded["spec_dk.thumbs"] = nil
    H.rmdir(dir)
    assert.is_true(ok, tostring(err))
  end)

  it("keeps its runner while the parent computes for 10 s; shutdown returns with the "
    .. "container removed", function()
    if not need_engine() then return end
    local p = pool("dk-busy-parent", { max = 1, max_concurrency = 2, idle_shutdown_after = 120000 })
    local function which() return require("flame").parent().ref end
    local first = flame.call(p, which)
    local t = flame.spawn(function()
      return flame.call(p, function() os.execute("sleep 1") return "finished meanwhile" end)
    end)
    assert.is_true(H.wait_for(function() return p:stats().busy == 1 end), "the call was not sent")
    local t0 = core.hrtime()                 -- 10 s on this thread, never yielding
    while core.hrtime() - t0 < 10e9 do end
    assert.are.equal("finished meanwhile", t:await())   -- a lost runner kills linked work
    assert.are.equal(first, flame.call(p, which))
    assert.are.equal(1, #containers(engine, "dk-busy-parent"))
    p:shutdown()
    assert.are.same({}, containers(engine, "dk-busy-parent"))
  end)

  it("boots up to max, and the containers are gone after idle shutdown", function()
    if not need_engine() then return end
    -- boots counted as they end: with boots of different lengths one runner may idle
    -- down before the other is up, so the containers are not counted at one moment
    local booted = {}
    local p = pool("dk-idle", { max = 2, max_concurrency = 1, idle_shutdown_after = 300,
      on_grow_end = function(r) booted[#booted + 1] = r end })
    local ts = {}
    for i = 1, 4 do
      ts[i] = flame.spawn(function()
        return flame.call(p, function() os.execute("sleep 0.2") return i end)
      end)
    end
    for i = 1, 4 do assert.are.equal(i, ts[i]:await()) end
    assert.is_true(#containers(engine, "dk-idle") <= 2)
    assert.is_true(H.wait_for(function() return #booted == 2 end), "the second boot did not end")
    assert.are.same({ "ok", "ok" }, booted)
    assert.is_true(wait_no_containers(engine, "dk-idle", H.patience))
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
    assert.is_true(H.wait_for(function()     -- the call was sent to the runner
      return p:stats().busy > 0
    end), "the call was not sent")
    docker(engine, "kill " .. id)
    local ok, err = pcall(t.await, t)
    assert.is_false(ok)
    assert.are.equal("runner_down", err.kind)
    -- the engine's wait told (with the exit code), not missed heartbeats
    assert.matches("exited with code 137", err.message, 1, true)
    assert.is_true(task.now() - t0 < 10000)
    assert.is_true(wait_no_containers(engine, "dk-kill", H.patience))
  end)

  it("gives the container its env, labels, limits, user, workdir and volumes", function()
    if not need_engine() then return end
    local dir = H.tmpdir()
    local f = assert(io.open(dir .. "/file", "w"))
    f:write("from the host")
    f:close()
    local p = pool("dk-opts", { backend_opts = {
      env = { GREETING = "hi" }, labels = { team = "render" }, memory = 256 * 1024 * 1024,
      cpus = 0.5, user = "0:0", workdir = "/tmp", volumes = { dir .. ":/data:ro" },
      mounts = { { source = dir, target = "/data2", read_only = true } },
      extra_hosts = { "flame-test-name:127.0.0.9" },
    } })
    local greeting, file, file2, hosts, cwd = flame.call(p, function()
      local function read(path)
        local h = io.open(path)
        if not h then return nil end
        local s = h:read("a")
        h:close()
        return s
      end
      return os.getenv("GREETING"), read("/data/file"), read("/data2/file"), read("/etc/hosts"),
        io.popen("pwd"):read("l")
    end)
    assert.are.equal("hi", greeting)
    assert.are.equal("from the host", file)
    assert.are.equal("from the host", file2)
    assert.matches("127.0.0.9%s+flame%-test%-name", hosts)
    assert.are.equal("/tmp", cwd)
    local id = containers(engine, "dk-opts")[1]
    local ok, out = docker(engine, "inspect --format '{{.HostConfig.Memory}} "
      .. "{{.HostConfig.NanoCpus}} {{.Config.User}} {{index .Config.Labels \"team\"}} "
      .. "{{index .Config.Labels \"flame.runner\"}}' " .. id)
    assert(ok, out)
    assert.are.equal("268435456 500000000 0:0 render dk-opts-1", (out:gsub("%s+$", "")))
    p:shutdown()
    H.rmdir(dir)
  end)

  local failures = {
    { "a missing image", { image = "flame-missing:0" }, 'image "flame-missing:0" not found' },
    { "an unreachable engine", { host = "unix:///nonexistent/docker.sock" },
      "engine at unix:///nonexistent/docker.sock is unreachable" },
    -- the log stream is attached before the start: its output comes with the reason
    { "a command that exits at once", { cmd = { "sh", "-c", "echo bad start >&2; exit 3" } },
      "exited with code 3; the container said: bad start" },
    { "a runner that never connects", { cmd = { "sleep", "30" } },
      "did not connect within the boot timeout of 5000 ms", 5000 },
    { "a network the engine does not have", { network = "flame-no-such-net" },
      PODMAN and "unable to find network with name or ID flame-no-such-net: network not found"
        or "network flame-no-such-net not found" },
  }
  for _, case in ipairs(failures) do
    it("fails the boot with the reason, leaving no container: " .. case[1], function()
      if not need_engine() then return end
      local name = "dk-fail-" .. case[1]:gsub("%W", "")
      -- a boot that fails on its own gets all the time it may need to say why; the one
      -- that waits for the timeout, time to create and start its container first
      local p = pool(name, { boot_timeout = case[4] or 60000, backend_opts = case[2] })
      local ok, err = pcall(flame.call, p, function() end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind, tostring(err))
      assert.matches(case[3], err.message, 1, true)
      assert.is_true(wait_no_containers(engine, name, H.patience))
    end)
  end

  it("spreads runners over two engines", function()
    if not second_engine() then return end
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
    assert.is_true(wait_no_containers(engine, "dk-hosts", H.patience))
    assert.is_true(wait_no_containers(engine2, "dk-hosts", H.patience))
  end)

  it("sweeps away containers left by parents of the pool that died, and only those", function()
    if not need_engine() then return end
    local line = H.line
    local host = line("cat /proc/sys/kernel/hostname")
    local boot = line("cat /proc/sys/kernel/random/boot_id")
    local pidns = line("readlink /proc/self/ns/pid")
    local function left_by(pid, started, ns)
      local ok, out = docker(engine, "create --label flame.pool=dk-sweep --label "
        .. "flame.parent=gone --label flame.parent_pid=" .. pid .. " --label flame.parent_host="
        .. H.q(host) .. " --label flame.parent_boot=" .. H.q(boot) .. " --label flame.parent_pidns="
        .. H.q(ns or pidns) .. " --label flame.parent_started=" .. H.q(started) .. " "
        .. IMAGE .. " sleep 60")
      assert(ok, out)
      return out:match("%x+")
    end
    local dead = left_by(999999999, "1")                 -- a pid that cannot exist
    local reused = left_by(core.pid(), "1")              -- a live pid, started at another time
    local stat = io.open("/proc/" .. core.pid() .. "/stat"):read("a")
    local started = stat:match("^%d+ %b() %a (.*)$"):match(("%S+%s+"):rep(18) .. "(%S+)")
    local alive = left_by(core.pid(), started)           -- this very process: alive
    local elsewhere = left_by(999999999, "1", "pid:[1]") -- a parent in another pid namespace
    assert.are.equal(4, #containers(engine, "dk-sweep"))
    local p = pool("dk-sweep")
    flame.call(p, function() end)
    local left = table.concat(containers(engine, "dk-sweep"), " ")
    assert.is_nil(left:find(dead:sub(1, 12), 1, true))
    assert.is_nil(left:find(reused:sub(1, 12), 1, true))
    assert.matches(alive:sub(1, 12), left, 1, true)
    assert.matches(elsewhere:sub(1, 12), left, 1, true)
    assert.are.equal(3, #containers(engine, "dk-sweep"))  -- with the new runner's
    p:shutdown()
    docker(engine, "rm -f " .. alive .. " " .. elsewhere)
  end)

  it("removes the containers when the parent is killed with SIGKILL", function()
    if not need_engine() then return end
    local dir = H.tmpdir()
    local script = dir .. "/parent.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local p = flame.pool { name = "dk-orphans", backend = "docker", min = 2, max = 2,
        shutdown_timeout = 500, link = { heartbeat_interval = 200, heartbeat_misses = 3 },
        backend_opts = { image = %q, host = %q, ulimits = %s } }
      flame.call(p, function() end)
      while #p.runners < 2 do flame.sleep(20) end
      io.open(arg[1], "w"):close()
      flame.sleep(60000)
    ]]):format(IMAGE, engine, PODMAN and "{ nofile = { 1024, 1024 }, nproc = { 4096, 4096 } }"
      or "nil"))
    f:close()
    local pp = io.popen("flame " .. H.q(script) .. " " .. H.q(dir .. "/up")
      .. " >/dev/null 2>&1 & echo $!")
    local parent = tonumber(pp:read("l"))
    pp:close()
    local deadline = task.now() + H.patience
    while not io.open(dir .. "/up") and task.now() < deadline do flame.sleep(50) end
    assert.are.equal(2, #containers(engine, "dk-orphans"))
    os.execute("kill -9 " .. parent)
    assert.is_true(wait_no_containers(engine, "dk-orphans", H.patience),
      "containers outlived their parent")
    H.rmdir(dir)
  end)

  it("pulls a missing image with pull = \"missing\", its progress in the log", function()
    if not need_registry() then return end
    local ref = registry .. "/flame-runner:pull"
    assert(docker(engine, "tag " .. IMAGE .. " " .. ref))
    local ok, out = docker(engine, "push " .. ref)
    assert(ok, out)
    assert(docker(engine, "rmi " .. ref))
    assert.is_false((docker(engine, "image inspect " .. ref)))
    local p = pool("dk-pull", { backend_opts = { image = ref, pull = "missing" } })
    local lines = capture(p)
    assert.are.equal(6, flame.call(p, function() return 2 * 3 end))
    local log = table.concat(lines, "\n")
    assert.matches("pulling " .. ref, log, 1, true)
    assert.matches("pull " .. ref .. ": Status: Downloaded newer image for " .. ref, log, 1, true)
    assert.matches("pulled " .. ref:gsub("%p", "%%%0") .. " on %S+ in %d+ ms", log)
    assert.is_true((docker(engine, "image inspect " .. ref)))
  end)

  it("pull = \"always\" pulls an image already there; \"missing\" does not", function()
    if not need_registry() then return end
    local ref = registry .. "/flame-runner:always"
    assert(docker(engine, "tag " .. IMAGE .. " " .. ref))
    assert(docker(engine, "push " .. ref))
    local p = pool("dk-always", { backend_opts = { image = ref, pull = "always" } })
    local lines = capture(p)
    flame.call(p, function() end)
    assert.matches("pulling " .. ref, table.concat(lines, "\n"), 1, true)
    local p2 = pool("dk-missing", { backend_opts = { image = ref, pull = "missing" } })
    local lines2 = capture(p2)
    flame.call(p2, function() end)
    assert.is_nil(table.concat(lines2, "\n"):find("pulling", 1, true))
  end)

  it("fails the boot with the registry's reason when a pull fails", function()
    if not need_registry() then return end
    local ref = registry .. "/flame-nothing:1"
    local p = pool("dk-pullfail", { backend_opts = { image = ref, pull = "missing" } })
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches('cannot pull image "' .. ref .. '"', err.message, 1, true)
    assert.matches("manifest unknown", err.message, 1, true)
    assert.is_true(wait_no_containers(engine, "dk-pullfail", H.patience))
  end)

  it("speaks TLS to an engine with client certificates", function()
    if not second_engine() then return end
    local p = pool("dk-tls", { backend_opts = {
      host = "tcp://127.0.0.1:" .. tls_port,
      tls = { ca = tls_dir .. "/ca.pem", cert = tls_dir .. "/cert.pem", key = tls_dir .. "/key.pem" },
    } })
    assert.are.equal("docker", flame.call(p, function() return require("flame").parent().backend end))
    assert.are.equal(1, #containers(engine2, "dk-tls"))
    assert.are.equal(0, #containers(engine, "dk-tls"))
    p:shutdown()
    assert.is_true(wait_no_containers(engine2, "dk-tls", H.patience))
  end)

  it("takes DOCKER_HOST, DOCKER_CERT_PATH and DOCKER_TLS_VERIFY from the environment", function()
    if not second_engine() then return end
    local dir = H.tmpdir()
    local script = dir .. "/env.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local p = flame.pool { name = "dk-env", backend = "docker",
                             backend_opts = { image = %q } }
      print(flame.call(p, function() return "inside " .. require("flame").parent().backend end))
      p:shutdown()
    ]]):format(IMAGE))
    f:close()
    local rc, out = H.run("DOCKER_HOST=tcp://127.0.0.1:" .. tls_port .. " DOCKER_CERT_PATH="
      .. H.q(tls_dir) .. " DOCKER_TLS_VERIFY=1 flame " .. H.q(script))
    assert.are.equal(0, rc, out)
    assert.matches("inside docker", out, 1, true)
    -- without the certificates the engine refuses the connection
    rc, out = H.run("DOCKER_HOST=tcp://127.0.0.1:" .. tls_port .. " DOCKER_CERT_PATH="
      .. H.q(dir) .. " DOCKER_TLS_VERIFY=1 flame " .. H.q(script))
    assert.are_not.equal(0, rc)
    assert.matches("TLS with the engine at tcp://127.0.0.1:" .. tls_port .. " failed", out, 1, true)
    H.rmdir(dir)
  end)

  local tls_failures = {
    { "no client certificate", function() return { ca = tls_dir .. "/ca.pem" } end },
    { "a server certificate the CA did not sign",
      function() return { ca = tls_dir .. "/cert.pem", cert = tls_dir .. "/cert.pem",
                          key = tls_dir .. "/key.pem" } end },
  }
  for _, case in ipairs(tls_failures) do
    it("fails the boot with the TLS reason: " .. case[1], function()
      if not second_engine() then return end
      local name = "dk-tlsfail-" .. case[1]:gsub("%W", ""):sub(1, 20)
      local p = pool(name, { backend_opts = { host = "tcp://127.0.0.1:" .. tls_port,
                                              tls = case[2]() } })
      local ok, err = pcall(flame.call, p, function() end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind)
      assert.matches("TLS with the engine at tcp://127.0.0.1:" .. tls_port .. " failed",
        err.message, 1, true)
      assert.are.equal(0, #containers(engine2, name))
    end)
  end

  -- A fake engine: versions other than Debian's engine's cannot run here.
  local versions = {
    { "an older engine: down to its version", "1.35", "1.12", "/v1.35/containers/create" },
    { "a newer engine that refuses 1.41: up to its minimum", "1.47", "1.44",
      "/v1.44/containers/create" },
    { "an engine too old for flame: a clear error", "1.24", "1.12",
      "speaks API 1.24; flame needs 1.30 or newer" },
  }
  for _, case in ipairs(versions) do
    it("negotiates the API version with " .. case[1], function()
      local dir = H.tmpdir()
      local sock = dir .. "/fake.sock"
      local pp = io.popen("python3 spec/support/fake_engine.py " .. H.q(sock) .. " "
        .. case[2] .. " " .. case[3] .. " > " .. H.q(dir .. "/requests") .. " 2>&1 & echo $!")
      local pid = pp:read("l")
      pp:close()
      local deadline = task.now() + H.patience
      while task.now() < deadline do
        local f = io.open(dir .. "/requests")
        local ready = f and f:read("a"):find("ready")
        if f then f:close() end
        if ready then break end
        flame.sleep(50)
      end
      local p = H.pool { name = "dk-version", backend = "docker",
                         backend_opts = { image = IMAGE, host = "unix://" .. sock } }
      local ok, err = pcall(flame.call, p, function() end)
      os.execute("kill " .. pid)
      local seen = io.open(dir .. "/requests"):read("a")
      H.rmdir(dir)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind)
      if case[4]:find("^/v") then
        assert.matches("POST " .. case[4], seen, 1, true)
        assert.matches("fake engine: no containers here", err.message, 1, true)
      else
        assert.matches(case[4], err.message, 1, true)
        assert.is_nil(seen:find("POST", 1, true))
      end
    end)
  end

  local bad_options = {
    { { imgae = IMAGE }, "unknown option 'imgae'" },
    { { pull = "sometimes" }, "option 'pull' must be \"never\", \"missing\" or \"always\"" },
    { { memory = "1g" }, "option 'memory' must be a number (got string)" },
    { { host = "ftp://x" }, 'cannot use host "ftp://x"' },
    { { hosts = {} }, "option 'hosts' must be a list" },
    { { tls = "yes" }, "option 'tls' must be a table or boolean" },
    { { api_version = "1.24" }, "option 'api_version' must be a version like \"1.41\", 1.30 or newer" },
    { { env = { "LEVEL=2" } }, "option 'env' must map names to values" },
    { { hosts = { { host = "unix:///x.sock", tls = "yes" } } },
      "the tls of a 'hosts' entry must be a table or a boolean" },
  }
  for _, case in ipairs(bad_options) do
    it("refuses bad options with what is wrong: " .. case[2], function()
      local o = { image = IMAGE, host = "unix:///nonexistent.sock" }
      for k, v in pairs(case[1]) do o[k] = v end
      if o.imgae then o.image = nil end
      local p = H.pool { name = "dk-badopt", backend = "docker", backend_opts = o }
      local ok, err = pcall(flame.call, p, function() end)
      assert.is_false(ok)
      assert.are.equal("boot", err.kind)
      assert.matches(case[2], err.message, 1, true)
    end)
  end
end)
