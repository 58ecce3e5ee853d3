-- A worker waits awake a short while for the next job before it sleeps
-- (core/executor.c, spin_for_job). Each case runs in a lua5.4 of its own, because
-- FLAME_WORKER_SPIN_US is read once per process. No case depends on how fast a job
-- comes: a case that needs a job taken awake submits jobs, one after another, until
-- one is (within a generous count), with a spin window of 10 ms.
local H = require "spec.helper"

local cores = tonumber(H.line("nproc")) or 1

-- Runs a script with FLAME_WORKER_SPIN_US set; returns its output (it must print "ok").
local function run(us, body)
  local dir = H.tmpdir()
  local path = dir .. "/spin.lua"
  local f = assert(io.open(path, "w"))
  f:write([[
    local flame = require "flame"
    local core = require "flame.core"
    local function executor(workers)
      local done = {}
      local ex = core.executor { workers = workers,
        on_done = function(id, status, payload) done[id] = { status, payload } end }
      return ex, done
    end
    -- one job, waited for; returns its first result
    local next_id = 0
    local function one(ex, done, fn)
      next_id = next_id + 1
      local id = next_id
      ex:submit(id, assert(core.encode(nil, fn)))
      while not done[id] do flame.sleep(0) end
      assert(done[id][1] == "r", "job " .. id .. ": " .. tostring(done[id][1]))
      return select(2, core.decode(done[id][2]))
    end
  ]] .. body .. "\nprint('ok')\n")
  f:close()
  local rc, out = H.run(("FLAME_WORKER_SPIN_US=%s lua5.4 %s"):format(us, H.q(path)))
  if os.getenv("SPIN_SPEC_DEBUG") then io.stderr:write(out, "\n") end
  H.rmdir(dir)
  assert.are.equal(0, rc, out)
  assert.matches("ok", out, 1, true)
  return out
end

-- submits jobs one after another until a spinning worker took one (or 2,000 went)
local UNTIL_SPUN = [[
  local n = 0
  repeat
    n = n + 1
    assert(one(ex, done, function() return 7 end) == 7)
  until ex:stats().spun > 0 or n == 2000
  print("spun", ex:stats().spun, "jobs", n, "workers", ex:stats().workers)
]]

describe("a worker waiting awake for its next job", function()
  local multi = cores > 1 and it or pending

  multi("takes calls that come one after another, and they run right", function()
    local out = run(10000, [[
      local ex, done = executor(4)
    ]] .. UNTIL_SPUN .. [[
      for i = 1, 50 do assert(one(ex, done, function() return i * 2 end) == i * 2) end
      ex:close()
    ]])
    local spun = tonumber(out:match("spun%s+(%d+)"))
    assert.is_true(spun > 0, out)
    -- a job taken awake needs no other worker: one worker serves them all
    assert.are.equal("1", out:match("workers%s+(%d+)"), out)
  end)

  it("is off with FLAME_WORKER_SPIN_US=0", function()
    local out = run(0, [[
      local ex, done = executor(2)
      for _ = 1, 200 do assert(one(ex, done, function() return 1 end) == 1) end
      print("spun", ex:stats().spun)
      ex:close()
    ]])
    assert.are.equal("0", out:match("spun%s+(%d+)"), out)
  end)

  multi("still happens after an executor was closed with jobs queued and running", function()
    -- the jobs an executor never delivers must not count as in flight for ever
    local out = run(10000, [[
      local gone = executor(1)
      gone:submit(1, assert(core.encode(nil, function() while true do end end)))
      for id = 2, 5 do gone:submit(id, assert(core.encode(nil, function() return id end))) end
      gone:close()
      local ex, done = executor(2)
    ]] .. UNTIL_SPUN .. [[
      ex:close()
    ]])
    assert.is_true(tonumber(out:match("spun%s+(%d+)")) > 0, out)
  end)

  it("does not happen while other jobs of the process are in flight", function()
    -- a job held running in one executor: another executor's calls, one after
    -- another, are taken by sleeping workers (the process has cores to spare for
    -- nothing)
    local out = run(10000, [[
      local gate = os.tmpname()
      local held, hdone = executor(1)
      held:submit(1, assert(core.encode(nil, function()
        repeat
          local f = io.open(gate)
          if f then f:close() end
        until not f
        return "released"
      end)))
      local ex, done = executor(2)
      for _ = 1, 200 do assert(one(ex, done, function() return 1 end) == 1) end
      print("spun", ex:stats().spun)
      os.remove(gate)
      while not hdone[1] do flame.sleep(1) end
      assert(select(2, core.decode(hdone[1][2])) == "released", "the held job did not hold")
      held:close()
      ex:close()
    ]])
    assert.are.equal("0", out:match("spun%s+(%d+)"), out)
  end)

  it("keeps the default for a value that is not a number of microseconds", function()
    local out = run("'lots'", [[
      local ex, done = executor(1)
      for i = 1, 20 do assert(one(ex, done, function() return i end) == i) end
      ex:close()
    ]])
    assert.matches("ok", out, 1, true)
  end)
end)
