-- flame.call on the process backend: the same cases as the local backend
-- (spec/support/calls.lua), now across a real TCP link to real runner processes.
-- Heartbeats every 500 ms; heartbeat_interval x heartbeat_misses is also the time the
-- parent has for each runner's handshake: under valgrind (the parent slowed down,
-- busy for seconds with a big value) the window is wider.
local H = require "spec.helper"
local shared = assert(loadfile("spec/support/calls.lua", "t", _ENV))()
shared("process", { link = { heartbeat_interval = 500, heartbeat_misses = H.slow and 20 or 3 } })

-- A process runner resolves modules as its parent does when the runner boots: the
-- parent's package.path and package.cpath (a directory it added at run time
-- included) and its working directory (issue 13, deliver 4).
describe("process runners find the parent's modules", function()
  local flame = require "flame"
  local core = require "flame.core"
  local LINK = { heartbeat_interval = 500, heartbeat_misses = H.slow and 20 or 3 }
  local dir, saved
  -- the working directory of the runner's process, as its shell sees it
  local function runner_cwd(p)
    return flame.call(p, function()
      local f = io.popen("pwd")
      local d = f:read("l")
      f:close()
      return d
    end)
  end
  before_each(function()
    dir = H.tmpdir()
    os.execute("mkdir -p " .. H.q(dir .. "/lib/specgeo"))
    local f = assert(io.open(dir .. "/lib/specgeo/shapes.lua", "w"))
    f:write([[
local M = {}
local _, file = ...
function M.area(w, h) return w * h end
function M.where() return file end
return M
]])
    f:close()
    saved = package.path
  end)
  after_each(function()
    package.path = saved
    package.loaded["specgeo.shapes"] = nil
    H.cleanup()
    H.rmdir(dir)
  end)

  it("with a lib/ put on package.path at run time: by name, and required in a closure",
    function()
      package.path = dir .. "/lib/?.lua;" .. package.path   -- the common way
      local shapes = require "specgeo.shapes"
      assert.are.equal(12, shapes.area(3, 4))             -- found here
      local p = H.pool { name = "paths-runtime", backend = "process", link = LINK }
      assert.are.equal(12, flame.call(p, { "specgeo.shapes", "area", { 3, 4 } }))
      local src = flame.call(p, function()
        return require("specgeo.shapes").where()
      end)
      assert.are.equal(dir .. "/lib/specgeo/shapes.lua", src)
      assert.are_not.equal(core.pid(), flame.call(p, function()
        local f = io.open("/proc/self/stat")
        local pid = f:read("n")
        f:close()
        return pid
      end), "the work ran in this process")
    end)

  it("on the local backend too: its workers use the program's package.path", function()
    package.path = dir .. "/lib/?.lua;" .. package.path
    local p = H.pool { name = "paths-local", backend = "local" }
    assert.are.equal(20, flame.call(p, { "specgeo.shapes", "area", { 4, 5 } }))
    assert.are.equal(dir .. "/lib/specgeo/shapes.lua", flame.call(p, function()
      return require("specgeo.shapes").where()
    end))
  end)

  it("and its working directory", function()
    local p = H.pool { name = "paths-cwd", backend = "process", link = LINK }
    local here = assert(core.cwd())
    assert.are.equal(here, runner_cwd(p))
  end)

  it("preloaded with flame runner --require from the run-time path", function()
    package.path = dir .. "/lib/?.lua;" .. package.path
    local p = H.pool { name = "paths-require", backend = "process", link = LINK,
                       backend_opts = { args = { "--require", "specgeo.shapes" } } }
    assert.are.equal(30, flame.call(p, function()
      return package.loaded["specgeo.shapes"].area(5, 6)
    end))
  end)

  it("but not a path added after the runner booted, and the options win", function()
    local p = H.pool { name = "paths-later", backend = "process", link = LINK }
    flame.call(p, function() end)                          -- booted before the change
    package.path = dir .. "/lib/?.lua;" .. package.path
    local ok, err = pcall(flame.call, p, { "specgeo.shapes", "area", { 1, 2 } })
    assert.is_false(ok)
    assert.matches("module 'specgeo.shapes' not found", tostring(err), 1, true)
    -- backend_opts.env's LUA_PATH and cwd are the runner's, whatever the parent has
    local q = H.pool { name = "paths-own", backend = "process", link = LINK,
                       backend_opts = { env = { LUA_PATH = dir .. "/nowhere/?.lua;;" },
                                        cwd = dir } }
    local ok2, err2 = pcall(flame.call, q, { "specgeo.shapes", "area", { 1, 2 } })
    assert.is_false(ok2)
    assert.matches("no file '" .. dir .. "/nowhere/specgeo/shapes.lua'", tostring(err2), 1, true)
    assert.are.equal(dir, runner_cwd(q))
  end)
end)
