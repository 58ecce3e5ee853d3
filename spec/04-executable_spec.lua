-- The flame executable: runs scripts with flame loaded, passes arguments, reports
-- errors with a traceback and a non-zero status; `flame runner` needs FLAME_PARENT.
local H = require "spec.helper"
local run, q = H.run, H.q

local tmp = os.tmpname()
local function script(src)
  local f = assert(io.open(tmp, "w"))
  f:write(src)
  f:close()
  return tmp
end

teardown(function() os.remove(tmp) end)

describe("flame executable", function()
  it("is on PATH and tells its version", function()
    local rc, out = run("flame --version")
    assert.are.equal(0, rc)
    assert.matches("^flame %d+%.%d+%.%d+ %(Lua 5%.4", out)
  end)

  it("runs a script with the flame module loaded and its arguments", function()
    local path = script([[
      assert(flame == require "flame", "flame is the module")
      print(flame.VERSION, arg[0] ~= nil, select("#", ...), arg[1], arg[2], ...)
    ]])
    local rc, out = run("flame " .. q(path) .. " one 'two words'")
    assert.are.equal(0, rc, out)
    assert.matches("^%d+%.%d+%.%d+\ttrue\t2\tone\ttwo words\tone\ttwo words\n$", out)
  end)

  it("runs the script as a task: flame.call yields, spawned tasks finish", function()
    local path = script([[
      local task = require "flame.task"
      assert(task.current() ~= nil, "the script is not running as a task")
      local p = flame.pool { name = "exe" }
      local called = task.future()
      flame.spawn(function() called:wait() flame.sleep(50) print("late task done") end)
      print("call:", flame.call(p, function() return 6 * 7 end))
      called:set()
      p:shutdown()
    ]])
    local rc, out = run("flame " .. q(path))
    assert.are.equal(0, rc, out)
    assert.are.equal("call:\t42\nlate task done\n", out)
  end)

  it("runs code given with -e", function()
    local rc, out = run([[flame -e 'print(flame.codec ~= nil, ...)' x]])
    assert.are.equal(0, rc, out)
    assert.are.equal("true\tx\n", out)
  end)

  it("reports a script error with a traceback and status 1", function()
    local path = script("local function f() error('broken on purpose') end\nf()\n")
    local rc, out = run("flame " .. q(path))
    assert.are.equal(1, rc)
    assert.matches("flame: .*:1: broken on purpose", out)
    assert.matches("stack traceback:", out, 1, true)
  end)

  it("reports a missing script", function()
    local rc, out = run("flame /nonexistent/app.lua")
    assert.are.equal(1, rc)
    assert.matches("cannot open /nonexistent/app.lua", out, 1, true)
  end)

  it("shows usage with status 2 when run without arguments", function()
    local rc, out = run("flame")
    assert.are.equal(2, rc)
    assert.matches("usage: flame SCRIPT", out, 1, true)
    local rc2 = run("flame -e")
    assert.are.equal(2, rc2)
  end)

  it("refuses to be a runner without FLAME_PARENT", function()
    local rc, out = run("env -u FLAME_PARENT flame runner")
    assert.are.equal(2, rc)
    assert.matches("FLAME_PARENT is not set", out, 1, true)
  end)

  local malformed = {
    { "garbage", "it is not base64" },
    { "bm90IGpzb24=", "it is not a JSON object" },                      -- "not json"
    { "e30=", "it has no protocol version" },                          -- "{}"
    { "eyJ2IjoxfQ==", "it has no ref" },                               -- {"v":1}
  }
  for _, case in ipairs(malformed) do
    it("refuses a malformed FLAME_PARENT: " .. case[2], function()
      local rc, out = run("FLAME_PARENT=" .. q(case[1]) .. " flame runner")
      assert.are.equal(2, rc)
      assert.matches("flame runner: FLAME_PARENT is malformed: " .. case[2], out, 1, true)
    end)
  end

  it("gives up when the parent cannot be reached within the failsafe timeout", function()
    local cjson = require "cjson"
    local core = require "flame.core"
    local doc = { v = 1, ref = "abcdefghijkl", secret = core.b64encode("s"),
                  addrs = { "127.0.0.1:1" }, backend = "process",
                  settings = { failsafe_timeout = 300 } }
    local rc, out = run("FLAME_PARENT=" .. core.b64encode(cjson.encode(doc)) .. " flame runner")
    assert.are.equal(1, rc)
    assert.matches("could not reach the parent within the failsafe timeout of 300 ms", out,
      1, true)
  end)

  it("lets a plain lua5.4 program end while flame's threads still run", function()
    -- lua_close unloads C modules: flame.core must stay mapped for its watchdog and
    -- worker threads (before, about 1 exit in 5 crashed here)
    local path = script([[
      local flame = require "flame"
      flame.run(function()
        local p = flame.pool { name = "x", backend = {
          init = function(o) return o end, remote_boot = function() return nil, "no" end } }
        pcall(flame.call, p, function() end)
        p:shutdown()
      end)
      print("ended")
    ]])
    local rc, out = run("lua5.4 " .. q(path))
    assert.are.equal(0, rc, out)
    assert.matches("ended", out, 1, true)
    local crashed = 0
    for _ = 1, H.slow and 3 or 30 do
      local ok = os.execute("lua5.4 " .. q(path) .. " >/dev/null 2>&1")
      if not ok then crashed = crashed + 1 end
    end
    assert.are.equal(0, crashed)
  end)

  it("refuses unknown runner arguments", function()
    local rc, out = run("flame runner --bogus")
    assert.are.equal(2, rc)
    assert.matches("unknown argument '--bogus'", out, 1, true)
  end)
end)
