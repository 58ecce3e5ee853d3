--- The parent's side of the link: a hub listens for a pool's runners, makes each
-- prove it holds its runner's secret (and proves the parent does too), and hands
-- the authenticated connection to the boot that awaits it (core/bsvc_link.c's
-- await_remote_up); here it is a *remote terminator*: configure, shutdown, close,
-- and its runner's events. The hub itself is C on the runtime
-- thread (core/hub.c): listening, the handshake, heartbeats and frames go on while
-- this state computes, and what happens reaches this module as events. Anything
-- else that connects (a wrong secret, an old protocol, random bytes, an unknown ref)
-- is closed and logged, and nothing it sent runs.
-- @module flame.remote
local core = require "flame.core"
local wire = require "flame.wire"

local M = {}

local Term = {}
Term.__index = Term

--- Sends the pool's idle check: work the runner runs in a sandbox before it goes.
function Term:configure(idle_check)
  if self.closed then return end
  local bytes, err = core.encode({ name = "idle_shutdown_after[2]" }, idle_check)
  if not bytes then error(err, 0) end
  self.hub.c:send(self.tid, wire.CONFIG, 0, bytes)
end

--- Asks the runner to stop taking work, drain and exit.
function Term:shutdown()
  if not self.closed then self.hub.c:send(self.tid, wire.SHUTDOWN, 0, "") end
end

function Term:close(reason)
  if self.closed then return end
  self.closed = true
  self.hub.c:close_term(self.tid, reason or "closed by the parent")
end

--- Where the runner's messages go: events(kind, ...) with kind "remote_shutdown"
-- (reason) or "lost" (reason), once. Its calls' results go to the pool's runtime
-- side (core/pool.c), not here.
function Term:attach(events)
  self.events = events
  for _, e in ipairs(self.early) do events(table.unpack(e, 1, e.n)) end
  self.early = nil
end

function Term:emit(...)
  if self.events then self.events(...)
  else self.early[#self.early + 1] = table.pack(...) end
end

function Term:lost(reason)
  if self.gone then return end
  self.gone = true
  self.closed = true                      -- the hub has closed its link already
  self.hub.terms[self.tid] = nil
  self:emit("lost", reason)
end

local Hub = {}
Hub.__index = Hub

--- A listening hub. opts: bind (default "127.0.0.1"), port (0: any), advertise
-- (addresses runners are told, default the bound one), heartbeat_interval,
-- heartbeat_misses, max_message, log; listen = false for a pool without remote
-- runners; on_pool(kind, ...) hears the pool's events (core/pool.c).
function M.hub(opts)
  local h = setmetatable({ log = opts.log, opts = opts, terms = {},
                           refusals = 0, drops = 0 }, Hub)
  h.on_pool = opts.on_pool
  local c, err = core.hub { host = opts.bind or "127.0.0.1", port = opts.port or 0,
    heartbeat_interval = opts.heartbeat_interval, heartbeat_misses = opts.heartbeat_misses,
    max_message = opts.max_message, listen = opts.listen,
    on_event = function(kind, ...) h:event(kind, ...) end }
  if not c then return nil, err end
  h.c = c
  local host, port = c:address()
  if host then
    h.addrs = opts.advertise or { (host:find(":") and ("[" .. host .. "]") or host) .. ":" .. port }
  end
  return h
end

-- What the hub on the runtime thread tells: runners up, their messages, links lost,
-- connections refused.
function Hub:event(kind, a, b, c, d, ...)
  if kind == "up" then                         -- handed to its boot's await_remote_up
    self.terms[b] = setmetatable({ hub = self, tid = b, early = {},
      pid = c ~= 0 and c or nil, host = d }, Term)
  elseif kind == "message" then
    local term = self.terms[a]
    if not term then return end
    if b == wire.REMOTE_SHUTDOWN then term:emit("remote_shutdown", d) end
  elseif kind == "lost" then
    local term = self.terms[a]
    if term then term:lost(b) end
  elseif kind == "refused" then
    self.refusals = self.refusals + 1
    self.log.error("%s", a)
  elseif kind == "dropped" then
    self.drops = self.drops + 1
    self.log.error("%s", a)
  elseif kind ~= "closed" and self.on_pool then   -- the pool's (core/pool.c)
    self.on_pool(kind, a, b, c, d, ...)
  end
end

function Hub:close()
  if self.closed then return end
  self.closed = true
  self.c:close()                               -- boots in flight learn it at once
end

return M
