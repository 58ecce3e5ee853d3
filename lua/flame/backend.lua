--- Backend states (core/backend.c): each runner's backend runs in a sandboxed Lua
-- state of its own (profile "backend": pure Lua, require of Lua text modules, no
-- I/O), owned by the runtime thread and stepped on libuv's thread pool, so a
-- backend that computes holds up neither the program nor the heartbeats; a
-- callback that computes for 2 s without waiting is stopped. What a callback asks
-- of its environment is served on the runtime thread (core/bsvc_*.c) or is plain
-- C of its state (core/benv.c); the backend gets handles for what it holds.
-- @module flame.backend
local core = require "flame.core"
local task = require "flame.task"

local M = {}

local Host = {}
Host.__index = Host

--- A backend state for one runner on the pool's hub (`engine`). spec is the pool's
-- backend: a module name, or a table (copied in with the codec). `hosts` maps the
-- hub's state ids to their hosts, for the events. `on` has the runner's name (for
-- logs), is_min (it keeps the pool's min: its idle time is min_idle_shutdown_after)
-- and what the services on the runtime thread tell: info(msg) for handle_info,
-- log(level, line), procs(count) (its processes still running).
function M.new(engine, spec, hosts, on)
  local name, bytes = nil, nil
  if type(spec) == "string" then
    name = spec
  else
    local b, err = core.encode({ name = "backend" }, spec)
    if not b then return nil, "cannot send the backend table to its state: " .. tostring(err) end
    bytes = b
  end
  local ok, id = pcall(engine.bk_new, engine, name, bytes, package.path, on.runner,
                       on.is_min or false)
  if not ok then return nil, "cannot make a backend state: " .. tostring(id) end
  local host = setmetatable({ engine = engine, id = id, hosts = hosts,
                              calls = {}, next_co = 0, on = on }, Host)
  hosts[id] = host
  return host
end

--- Runs a callback by name in the state and returns what it returned; raises its
-- error. In a task: it waits.
function Host:call(cb, arg)
  if self.closed then error("the runner's backend state is closed", 0) end
  self.next_co = self.next_co + 1
  local co = self.next_co
  local f = task.future()
  self.calls[co] = f
  local ok, err = pcall(self.engine.bk_call, self.engine, self.id, co, cb, arg)
  if not ok then
    self.calls[co] = nil
    error(tostring(err), 0)
  end
  local r = table.pack(f:wait())
  self.calls[co] = nil
  if r[1] == "done" then return table.unpack(r, 2, r.n) end
  error(tostring(r[2]), 0)
end

--- A callback's end: "done", results... or "error", message.
function Host:done(co, status, ...)
  local f = self.calls[co]
  if f then f:set(status, ...) end
end

--- What the state's services tell (core/bsvc.h): a message for handle_info, a log
-- line, the count of its processes still running.
function Host:info(msg)
  if not self.closed then self.on.info(msg) end
end

function Host:log(level, line)
  self.on.log(level, line)
end

function Host:procs(n)
  self.on.procs(n)
end

function Host:close()
  if self.closed then return end
  self.closed = true
  self.hosts[self.id] = nil
  pcall(self.engine.bk_close, self.engine, self.id)
  for _, f in pairs(self.calls) do f:set("error", "the runner's backend state is closed") end
end

return M
