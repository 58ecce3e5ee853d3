--- flame: run a Lua closure, with what it captured, on fresh compute.
-- The public API (docs/api.md). The C core is `flame.core`.
-- @module flame
local core = require "flame.core"
local errors = require "flame.errors"
local task = require "flame.task"
local pool = require "flame.pool"

local M = {}

M.VERSION = core.VERSION
M.errors = errors

--- Makes a pool (docs/pools.md). Bad options raise an `invalid` error.
M.pool = pool.new

local Pool = pool.Pool

--- Runs work on a runner of the pool and returns what it returned.
-- work: a function (sent with everything it captured) or { module, function, args }.
-- opts: { timeout = ms, link = true }. Raises a flame error (docs/errors.md).
function M.call(p, work, opts)
  return Pool.call(p, work, opts, 2)
end

--- Like call, without waiting: a task runs the call, and its errors are logged.
function M.cast(p, work, opts)
  if getmetatable(p) ~= Pool then
    errors.raise("invalid", "flame.cast: a pool expected", nil, 2)
  end
  task.spawn(function()
    local ok, err = pcall(Pool.call, p, work, opts, 2)
    if not ok then p.log.error("cast failed: %s", tostring(err)) end
  end)
end

local Child = {}
Child.__index = Child

--- Waits for the child's work to end: its results, or its error raised.
function Child:await() return self.task:await() end
--- Stops the child: its remote work is killed, its slot freed.
function Child:cancel(reason) return self.task:cancel(reason or "cancelled") end
--- True while the child's work runs.
function Child:alive() return self.task:alive() end

--- Places long-running work on a runner: it holds its slot until it returns, is
-- cancelled when the task that placed it ends, and has no timeout unless
-- opts.timeout gives one. Returns a handle: await, cancel, alive.
function M.place_child(p, work, opts)
  if getmetatable(p) ~= Pool then
    errors.raise("invalid", "flame.place_child: a pool expected", nil, 2)
  end
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  if o.timeout == nil then o.timeout = math.huge end
  local parent = task.current()
  local t = task.spawn(function()
    local r = table.pack(Pool.call(p, work, o, 2))
    return table.unpack(r, 1, r.n)
  end)
  if parent then parent:link(t) end
  return setmetatable({ task = t }, Child)
end

--- Runs fn(...) as a concurrent task; t:await() returns its results.
M.spawn = task.spawn

--- Runs fn as a task and drives the loop until every task has ended.
M.run = task.run

--- Waits ms milliseconds; other tasks and calls go on meanwhile.
M.sleep = task.sleep

local parent_info

--- On a runner: what its parent told it ({ ref, backend, node_base, host_env,
-- flame_vsn }); on the parent: nil.
function M.parent()
  return parent_info
end

-- Set once by the terminator when this process is a runner.
function M._set_parent(info)
  parent_info = info
end

M.codec = {}

--- Encodes one value (docs/codec.md): bytes, or nil and a message naming the path.
function M.codec.encode(value, opts)
  return core.encode(opts, value)
end

--- Encodes any number of values; a "%d" in opts.name becomes each one's position.
function M.codec.encode_values(opts, ...)
  return core.encode(opts, ...)
end

--- Decodes bytes: true and the values, or false and a message. Bytecode is refused
-- unless opts.functions is true (only for bytes from a trusted sender).
function M.codec.decode(bytes, opts)
  return core.decode(bytes, opts)
end

--- Lets tables with metatable mt cross as name; the receiver registers it too.
function M.codec.register(name, mt)
  core.register(name, mt)
end

--- A sandboxed Lua state (docs/sandbox.md).
M.sandbox = core.sandbox

return M
