-- The Docker backend on Podman: what only Podman needs. The Docker backend's own
-- cases (calls, errors, cleanup, kill -9 of the parent) run against Podman too:
-- spec/13 with FLAME_SPEC_PODMAN set. Both are run by scripts/test's cluster step
-- against the service of scripts/podman, or by hand:
--   scripts/podman start; FLAME_SPEC_PODMAN=unix://$PWD/.podman/podman.sock \
--     lua5.4 /usr/bin/busted spec/13-docker_spec.lua spec/16-podman_spec.lua
-- (the runner image flame-runner:spec is built by spec/13's setup). Without
-- FLAME_SPEC_PODMAN this file registers nothing.
local flame = require "flame"
local errors = require "flame.errors"
local H = require "spec.helper"
local C = assert(loadfile("spec/support/cluster.lua"))()

local PODMAN = os.getenv("FLAME_SPEC_PODMAN")
if not PODMAN or PODMAN == "" then
  io.stderr:write("spec/16-podman_spec.lua: not run (FLAME_SPEC_PODMAN names the service of "
    .. "scripts/podman; scripts/test sets it)\n")
  return
end

local IMAGE = "flame-runner:spec"
local ULIMITS = { nofile = { 1024, 1024 }, nproc = { 4096, 4096 } }
local root = assert(io.popen("pwd")):read("l")

local function docker(args)
  return C.sh("DOCKER_HOST=" .. H.q(PODMAN) .. " docker " .. args)
end

local function containers(pool)
  local ok, out = docker("ps -aq --filter label=flame.pool=" .. pool)
  local ids = {}
  for id in (ok and out or ""):gmatch("%x+") do ids[#ids + 1] = id end
  return ids
end

describe("docker backend on Podman #podman", function()
  local why_not
  setup(function()
    local ok, out = C.sh("curl -sf --unix-socket " .. H.q(PODMAN:gsub("^unix://", ""))
      .. " http://localhost/version")
    if not ok then why_not = "the Podman service does not answer at " .. PODMAN .. ": " .. out
      return end
    if not out:find("Podman Engine", 1, true) then
      why_not = PODMAN .. " is not a Podman service: " .. out:sub(1, 200)
      return
    end
    if not docker("image inspect " .. IMAGE .. " >/dev/null 2>&1") then
      local ok2, out2 = C.sh("cd " .. H.q(root) .. " && DOCKER_HOST=" .. H.q(PODMAN)
        .. " scripts/runner-image " .. IMAGE)
      if not ok2 then why_not = "the runner image could not be built: " .. out2 end
    end
  end)

  local function need()
    if why_not then pending(why_not) return false end
    return true
  end

  after_each(function() H.cleanup() end)

  it("gives the runner the rlimits of ulimits, as { soft, hard } or one number", function()
    if not need() then return end
    local p = H.pool { name = "pm-ulimits", backend = "docker",
      backend_opts = { image = IMAGE, host = PODMAN,
                       ulimits = { nofile = { 512, 1024 }, nproc = 4096 } } }
    local limits = flame.call(p, function() return io.open("/proc/self/limits"):read("a") end)
    assert.matches("Max open files%s+512%s+1024", limits)
    assert.matches("Max processes%s+4096%s+4096", limits)
    local id = containers("pm-ulimits")[1]
    local ok, out = docker("inspect --format '{{json .HostConfig.Ulimits}}' " .. id)
    assert(ok, out)
    assert.matches('"Name":"RLIMIT_NOFILE"', out, 1, true)
    p:shutdown()
    assert.is_true(H.wait_for(function() return #containers("pm-ulimits") == 0 end))
  end)

  it("fails the boot with Podman's words when its rlimits exceed the host's, leaving no "
    .. "container", function()
      if not need() then return end
      -- Podman asks for more open files than this machine's hard limit by default
      local hard = tonumber(select(2, C.sh("ulimit -Hn")):match("%d+"))
      local p = H.pool { name = "pm-nolimits", backend = "docker",
        backend_opts = { image = IMAGE, host = PODMAN,
                         ulimits = { nofile = { hard + 1, hard + 1 } } } }
      local ok, err = pcall(flame.call, p, function() end)
      assert.is_false(ok)
      assert.is_true(errors.is(err, "boot"), tostring(err))
      assert.matches("error setting rlimit", err.message, 1, true)
      assert.matches("set backend_opts.ulimits within this host's hard limits", err.message, 1, true)
      assert.is_true(H.wait_for(function() return #containers("pm-nolimits") == 0 end))
    end)

  it("refuses ulimits that are not limits", function()
    local p = H.pool { name = "pm-badulimits", backend = "docker",
      backend_opts = { image = IMAGE, host = "unix:///nonexistent.sock",
                       ulimits = { nofile = { 2048, 1024 } } } }
    local ok, err = pcall(flame.call, p, function() end)
    assert.is_false(ok)
    assert.matches("option 'ulimits' must map limit names to a number or { soft, hard }",
      err.message, 1, true)
  end)

  it("runs calls with ULIMITS as the Podman run of spec/13 gives them", function()
    if not need() then return end
    local p = H.pool { name = "pm-calls", backend = "docker",
      backend_opts = { image = IMAGE, host = PODMAN, ulimits = ULIMITS } }
    local inside = flame.call(p, function() return io.open("/run/.containerenv") ~= nil end)
    assert.is_true(inside)
  end)
end)
