--- The parent's side of the link, as the application sees it: a pool's hub, which
-- listens for the pool's runners, makes each prove it holds its runner's secret
-- (and proves the parent does too), and hands the authenticated connection to the
-- boot that awaits it (core/bsvc_link.c's await_remote_up). The hub is C on the
-- runtime thread (core/hub.c), and so are the runners' lives (core/runner.c):
-- listening, the handshake, heartbeats, frames, losses and stops go on while this
-- state computes. What reaches this module are events: a runner up (its pid, kept
-- in terms for the pool's runner list until its link is lost), connections
-- refused, and the pool's own events (core/pool.c, core/runner.c). Anything else
-- that connects (a wrong secret, an old protocol, random bytes, an unknown ref) is
-- closed and logged, and nothing it sent runs.
-- @module flame.remote
local core = require "flame.core"

local M = {}

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
    self.terms[b] = { tid = b, pid = c ~= 0 and c or nil, host = d }
  elseif kind == "message" then                -- the runtime side acted on it already
    return
  elseif kind == "lost" then
    self.terms[a] = nil
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
