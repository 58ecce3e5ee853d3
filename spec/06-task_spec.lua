-- Tasks on the event loop: spawn, await, sleep, run; waiting from the main chunk
-- drives the loop; waiting where it cannot work is refused, never a hang.
local flame = require "flame"
local errors = require "flame.errors"
local task = require "flame.task"

describe("tasks", function()
  after_each(function()
    assert.are.equal(0, task.live(), "a test left tasks running")
  end)

  it("runs a task and returns its results", function()
    local t = flame.spawn(function(a, b) return a + b, "sum" end, 2, 3)
    assert.are.same({ 5, "sum" }, { t:await() })
    assert.is_false(t:alive())
  end)

  it("runs tasks concurrently: sleeps overlap and wake in deadline order", function()
    local order = {}
    local ts = {}
    for _, ms in ipairs { 60, 20, 40 } do
      ts[#ts + 1] = flame.spawn(function()
        flame.sleep(ms)
        order[#order + 1] = ms
      end)
    end
    local t0 = task.now()
    for _, t in ipairs(ts) do t:await() end
    assert.are.same({ 20, 40, 60 }, order)
    assert.is_true(task.now() - t0 >= 60)
  end)

  it("re-raises a task's error in await", function()
    local t = flame.spawn(function() error("task broke", 0) end)
    local ok, err = pcall(t.await, t)
    assert.is_false(ok)
    assert.are.equal("task broke", err)
    local ok2, err2 = pcall(t.await, t)       -- again, the same error
    assert.is_false(ok2)
    assert.are.equal("task broke", err2)
  end)

  it("awaits a task from another task", function()
    local inner = flame.spawn(function() flame.sleep(10) return "inner" end)
    local outer = flame.spawn(function() return "outer+" .. inner:await() end)
    assert.are.equal("outer+inner", outer:await())
  end)

  it("runs fn and every task it spawned with flame.run", function()
    local done = {}
    local r = flame.run(function()
      flame.spawn(function() flame.sleep(30) done[#done + 1] = "late" end)
      done[#done + 1] = "main"
      return "result"
    end)
    assert.are.equal("result", r)
    assert.are.same({ "main", "late" }, done)
  end)

  it("raises the error of flame.run's function", function()
    local ok, err = pcall(flame.run, function() error({ code = 3 }) end)
    assert.is_false(ok)
    assert.are.same({ code = 3 }, err)
  end)

  it("sleeps from the main chunk by driving the loop", function()
    local ticked = false
    flame.spawn(function() ticked = true end)
    flame.sleep(5)
    assert.is_true(ticked)
  end)

  it("cancels a waiting task", function()
    local t = flame.spawn(function() flame.sleep(10000) end)
    flame.sleep(1)
    assert.is_true(t:cancel("test"))
    local ok, err = pcall(t.await, t)
    assert.is_false(ok)
    assert.is_true(errors.is(err, "shutdown"))
    assert.matches("task cancelled: test", err.message, 1, true)
    assert.is_false(t:cancel())
  end)

  it("refuses a task that yields to something other than flame", function()
    local t = flame.spawn(function() coroutine.yield("surprise") end)
    local ok, err = pcall(t.await, t)
    assert.is_false(ok)
    assert.is_true(errors.is(err, "invalid"))
    assert.matches("yielded to something other than flame", err.message, 1, true)
  end)

  it("reports a wait that can never end instead of hanging", function()
    local never = task.future()
    local ok, err = pcall(never.wait, never)
    assert.is_false(ok)
    assert.is_true(errors.is(err, "invalid"))
    assert.matches("deadlock", err.message, 1, true)
  end)

  it("refuses to wait inside a loop callback", function()
    local caught
    task.loop:timer(1, function()
      caught = select(2, pcall(flame.sleep, 1))
    end)
    flame.sleep(20)
    assert.is_true(errors.is(caught, "invalid"))
    assert.matches("not in a task", caught.message, 1, true)
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() flame.spawn(42) end)
    local ok, err = pcall(function() flame.sleep(-1) end)
    assert.is_false(ok)
    assert.are.equal("invalid", err.kind)
    assert.matches("06%-task_spec.lua:%d+: flame.sleep: milliseconds >= 0 expected", err.message)
  end)
end)
