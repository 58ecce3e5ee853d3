--- Tasks: coroutines of the application's state that the event loop resumes.
-- A task waits (for a call, a timer, another task) by yielding to the scheduler;
-- code that is not in a task waits by driving the loop itself, so a plain script
-- works. Waiting from inside a loop callback is refused (the loop is not reentrant).
-- @module flame.task
local core = require "flame.core"
local errors = require "flame.errors"

local M = {}

local loop = core.loop()
local SUSPEND = setmetatable({}, { __name = "flame.suspend" })
local ready, rhead, rtail = {}, 1, 0
local by_co = setmetatable({}, { __mode = "k" })
local live = 0

M.loop = loop

local Task = {}
Task.__index = Task
Task.__name = "flame.task"

-- A task that failed and was never awaited reports its error when collected.
function Task.__gc(t)
  if t.failed and not t.observed then
    io.stderr:write("flame: a task failed and nobody awaited it: ", tostring(t.error), "\n")
  end
end

local NOARGS = table.pack()          -- a resume with nothing to pass: the usual case

local function schedule(t, ...)
  rtail = rtail + 1
  ready[rtail] = { t, select("#", ...) == 0 and NOARGS or table.pack(...) }
  loop:wake()
end

local function finish(t, ok, ...)
  t.done = true
  live = live - 1
  by_co[t.co] = nil
  if ok then
    t.results = table.pack(...)
  else
    t.failed, t.error = true, (...)
  end
  local waiters = t.waiters
  t.waiters = nil
  if waiters then for i = 1, #waiters do waiters[i]() end end
  local linked = t.linked                   -- children placed by it end with it
  t.linked = nil
  if linked then
    for i = 1, #linked do
      if linked[i]:alive() then linked[i]:cancel("the task that placed it ended") end
    end
  end
end

-- What a resume gave, as it came (no table for it): the task's end, or a wait.
local function resumed(t, ok, ...)
  if coroutine.status(t.co) == "dead" then
    if not ok then t.traceback = debug.traceback(t.co) end
    finish(t, ok, ...)
  elseif (...) ~= SUSPEND then
    coroutine.close(t.co)
    finish(t, false, errors.new("invalid", "a task yielded to something other than "
      .. "flame (coroutine.yield directly in a task); wait with flame functions, or "
      .. "yield inside a coroutine of your own"))
  end
end

local function step(t, args)
  if t.done then return end
  if args == NOARGS then return resumed(t, coroutine.resume(t.co)) end
  return resumed(t, coroutine.resume(t.co, table.unpack(args, 1, args.n)))
end

local function dispatch()
  while rhead <= rtail do
    local item = ready[rhead]
    ready[rhead] = nil
    rhead = rhead + 1
    step(item[1], item[2])
  end
  rhead, rtail = 1, 0
end
loop:on_idle(dispatch)

--- The task running now, or nil outside tasks.
function M.current()
  return by_co[coroutine.running()]
end

--- Runs the loop until cond() holds. Outside tasks only.
function M.drive(cond)
  if loop:running() then
    errors.raise("invalid", "cannot wait here: this code runs in a flame callback, "
      .. "not in a task (start it with flame.spawn)", nil, 3)
  end
  while not cond() do
    local alive = loop:run("once")
    if not cond() and not alive and rhead > rtail then
      errors.raise("invalid", "deadlock: waiting for something that can never happen "
        .. "(no task, timer or call is pending)", nil, 3)
    end
  end
end

local Future = {}
Future.__index = Future

--- A value that will be set once; wait() suspends until it is.
function M.future()
  return setmetatable({ done = false }, Future)
end

--- Sets the value; returns false when it was already set.
function Future:set(...)
  if self.done then return false end
  self.done, self.values = true, table.pack(...)
  local ws = self.waiters
  self.waiters = nil
  if ws == nil then
    -- no task waits: code outside tasks may be driving the loop for this value, and
    -- a loop that ran this set from a timer would next block in its poll (libuv
    -- runs timers before polling); the idle dispatcher makes that poll return at once
    loop:wake()
    return true
  end
  if getmetatable(ws) == Task then          -- the one waiter, as wait() keeps it
    schedule(ws)
  else
    for i = 1, #ws do schedule(ws[i]) end
  end
  return true
end

--- Waits until set and returns its values.
function Future:wait()
  if not self.done then
    local t = by_co[coroutine.running()]
    if t then
      local ws = self.waiters               -- one waiter (the usual case) needs no list
      if ws == nil then self.waiters = t
      elseif getmetatable(ws) == Task then self.waiters = { ws, t }
      else ws[#ws + 1] = t end
      repeat coroutine.yield(SUSPEND) until self.done
    else
      M.drive(function() return self.done end)
    end
  end
  return table.unpack(self.values, 1, self.values.n)
end

--- Starts fn(...) as a task; it runs when the loop next runs.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then
    errors.raise("invalid", "flame.spawn: a function expected, got " .. type(fn), nil, 2)
  end
  local t = setmetatable({ co = coroutine.create(fn), done = false }, Task)
  by_co[t.co] = t
  live = live + 1
  schedule(t, ...)
  return t
end

--- Waits for the task and returns its results, or raises its error.
function Task:await()
  if not self.done then
    local f = M.future()
    self.waiters = self.waiters or {}
    self.waiters[#self.waiters + 1] = function() f:set() end
    f:wait()
  end
  self.observed = true
  if self.failed then error(self.error, 0) end
  return table.unpack(self.results, 1, self.results.n)
end

function Task:alive()
  return not self.done
end

--- Cancels `child` when this task ends (flame.place_child).
function Task:link(child)
  self.linked = self.linked or {}
  self.linked[#self.linked + 1] = child
end

--- Stops a task that is waiting: its pending calls are cancelled (their to-be-closed
-- guards run) and await() raises a `shutdown`-kind error naming the reason.
function Task:cancel(reason)
  if self.done then return false end
  if coroutine.running() == self.co then
    errors.raise("invalid", "a task cannot cancel itself", nil, 2)
  end
  local ok, err = coroutine.close(self.co)
  self.observed = true                       -- whoever cancels it knows it ended
  finish(self, false, ok and errors.new("shutdown", "task cancelled"
    .. (reason and (": " .. tostring(reason)) or "")) or err)
  return true
end

--- Waits ms milliseconds (other tasks run meanwhile).
function M.sleep(ms)
  if type(ms) ~= "number" or ms < 0 or ms ~= ms then
    errors.raise("invalid", "flame.sleep: milliseconds >= 0 expected", nil, 2)
  end
  local f = M.future()
  loop:timer(ms, function() f:set() end)
  f:wait()
end

--- Runs fn as a task and drives the loop until every task has ended; returns fn's
-- results or raises its error. Inside a task it just runs fn as a task and awaits it.
function M.run(fn, ...)
  local t = M.spawn(fn, ...)
  if M.current() or loop:running() then return t:await() end
  M.drive(function() return live == 0 end)
  return t:await()
end

--- The flame executable's entry: runs a script's chunk as a task (so flame.call in
-- it yields instead of driving the loop) and every task it starts; a failure is
-- raised as text with the task's own traceback.
function M.main(chunk, ...)
  local t = M.spawn(chunk, ...)
  local ok, err = pcall(M.drive, function() return live == 0 end)
  if t.failed then
    t.observed = true
    local msg = type(t.error) == "string" and t.error or tostring(t.error)
    error(msg .. "\n" .. (t.traceback or ""), 0)
  end
  if not ok then error(err, 0) end
  return t:await()
end

--- Milliseconds on the loop's clock.
function M.now()
  return loop:now()
end

--- Tasks not yet ended.
function M.live()
  return live
end

return M
