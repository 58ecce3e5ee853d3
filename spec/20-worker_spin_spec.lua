-- A worker waits awake a short while for the next job before it sleeps
-- (core/executor.c, spin_for_job). Each case runs in a lua5.4 of its own, because
-- FLAME_WORKER_SPIN_US is read once per process. No case depends on how fast a job
-- comes: a case that needs a job taken awake submits jobs one after another, with
-- a spin window of 1 s, until one is (within a generous count).
local H = require "spec.helper"

-- Whether this machine lets workers spin at all (libuv sees more than one core).
local function spins_here()
  local _, out = H.run([[FLAME_WORKER_SPIN_US=1000 lua5.4 -e 'local core = require "flame.core"
    local ex = core.executor { on_done = function() end }
    print("spin_us", ex:stats().spin_us) ex:close()']])
  return tonumber(out:match("spin_us%s+(%d+)")) or 0
end

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
    -- waits (driving the loop) until cond() holds; fails after 60 s, so that a job
    -- that never comes fails the case instead of hanging it
    local cleanups = {}                      -- run before a wait fails: what would hold exit
    local function wait(cond, what)
      local give_up = core.hrtime() + 60e9
      while not cond() do
        if core.hrtime() > give_up then
          for _, fn in ipairs(cleanups) do pcall(fn) end
          error("waited 60 s for " .. what, 0)
        end
        flame.sleep(1)
      end
    end
    -- one job, waited for; returns its first result
    local next_id = 0
    local function one(ex, done, fn)
      next_id = next_id + 1
      local id = next_id
      ex:submit(id, assert(core.encode(nil, fn)))
      wait(function() return done[id] end, "job " .. id)
      assert(done[id][1] == "r", "job " .. id .. ": " .. tostring(done[id][1]))
      return select(2, core.decode(done[id][2]))
    end
    -- work that runs until the file gate is gone, then returns "released"
    local function until_gone(gate)
      return function()
        repeat local g = io.open(gate) if g then g:close() end until not g
        return "released"
      end
    end
    -- n calls one after another on a fresh executor while a job of another one is
    -- held running; prints how many a spinning worker took
    local function calls_beside_held(n)
      local gate = os.tmpname()
      local held, hdone = executor(1)
      held:submit(1, assert(core.encode(nil, until_gone(gate))))
      local ex, done = executor(2)
      for _ = 1, n do assert(one(ex, done, function() return 1 end) == 1) end
      print("spun", ex:stats().spun)
      assert(hdone[1] == nil, "the held job did not hold")
      os.remove(gate)
      wait(function() return hdone[1] end, "the held job")
      assert(select(2, core.decode(hdone[1][2])) == "released")
      held:close()
      ex:close()
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
  local multi = spins_here() > 0 and it or pending

  multi("takes calls that come one after another, and they run right", function()
    local out = run(1000000, [[
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
    local out = run(1000000, [[
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
    local out = run(1000000, [[
      calls_beside_held(200)
    ]])
    assert.are.equal("0", out:match("spun%s+(%d+)"), out)
  end)

  it("counts right after an executor closed by its own done callback", function()
    -- a single-use pool's shrink closes the executor from a result's callback, with
    -- other results of the same batch still to come: they must not be counted twice
    local out = run(1000000, [[
      local closing, n = nil, 0
      closing = core.executor { workers = 3, on_done = function()
        n = n + 1
        if n == 1 then closing:close() end
      end }
      local gate = os.tmpname()
      for id = 1, 3 do closing:submit(id, assert(core.encode(nil, until_gone(gate)))) end
      wait(function() return closing:stats().running == 3 end, "three jobs running")
      os.remove(gate)
      -- the loop does not run until all three have finished, so that their results
      -- are delivered together, in one batch (stats read the executor, not the loop)
      local give_up = core.hrtime() + 60e9
      repeat assert(core.hrtime() < give_up, "the three jobs did not end")
      until closing:stats().running == 0
      wait(function() return n > 0 end, "the batch")
      -- with one job held elsewhere, another executor's calls must not spin (they
      -- would, had the closed batch been taken off the count twice)
      calls_beside_held(100)
    ]])
    assert.are.equal("0", out:match("spun%s+(%d+)"), out)
  end)

  it("wakes an idle worker while another is still making its sandbox", function()
    -- a worker started for a burst loads the executor's requires, which here blocks
    -- while a gate file exists; a job that comes meanwhile must go to the idle one
    -- (spinning off, so that the idle worker sleeps and must be signalled)
    local out = run(0, [[
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local gate = dir .. "/gate"
      local f = assert(io.open(dir .. "/slowmod.lua", "w"))
      f:write("repeat local g = io.open(" .. string.format("%q", gate)
        .. ") if g then g:close() end until not g\nreturn {}\n")
      f:close()
      local done = {}
      local ex = core.executor { workers = 2, requires = "slowmod", path = dir .. "/?.lua",
        on_done = function(id, status, payload) done[id] = { status, payload } end }
      local function submit(id, fn)
        ex:submit(id, assert(core.encode(nil, fn or function() return id end)))
      end
      submit(1)                              -- the first worker, made with no gate
      wait(function() return done[1] end, "job 1")
      assert(io.open(gate, "w")):close()     -- from now on a new worker blocks
      local hold = dir .. "/hold"
      assert(io.open(hold, "w")):close()
      -- a worker blocked in its requires cannot be killed: a failing case opens the
      -- gates, or its exit would wait for that worker for ever
      cleanups[#cleanups + 1] = function() os.remove(gate) os.remove(hold) end
      submit(2, until_gone(hold))            -- holds the first worker
      wait(function() return ex:stats().running == 1 end, "job 2 running")
      submit(3)                              -- no idle worker: a second one starts
      wait(function() return ex:stats().workers == 2 end, "a second worker")
      os.remove(hold)                        -- the first ends job 2, then takes job 3
      wait(function() return done[2] and done[3] end, "jobs 2 and 3")
      wait(function() return ex:stats().idle == 1 end, "the first worker idle")
      submit(4)                              -- the idle worker must be woken for it
      wait(function() return done[4] end, "job 4, with a worker idle")
      assert(done[4][1] == "r")
      print("workers", ex:stats().workers)
      os.remove(gate)
      ex:close()
      os.remove(dir .. "/slowmod.lua")
      os.remove(dir)
    ]])
    assert.matches("workers%s+%d", out)
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
