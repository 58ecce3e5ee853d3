--- The parent's side of the link: a hub listens for a pool's runners, makes each
-- prove it holds its runner's secret (and proves the parent does too), and hands
-- the authenticated connection to whoever awaits that runner's ref as a *remote
-- terminator*: submit, kill, shutdown, close. Anything else that connects (a wrong
-- secret, an old protocol, random bytes, an unknown ref) is closed and logged, and
-- nothing it sent runs. Heartbeats go both ways; a silent runner is lost.
-- @module flame.remote
local core = require "flame.core"
local cjson = require "cjson.safe"
local task = require "flame.task"
local wire = require "flame.wire"

local M = {}
local loop = task.loop

local Term = {}
Term.__index = Term

--- Sends a call: its bytes, deadline (ms from now) and link flag.
function Term:submit(id, bytes, timeout, link)
  if self.closed then error("runner link is closed", 0) end
  self.conn:send(wire.SPAWN, id, wire.spawn_payload(timeout, link ~= false, bytes))
  self.ids[id] = true
  self.inflight = self.inflight + 1
  if self.inflight > self.peak then self.peak = self.inflight end
end

function Term:kill(id, reason)
  if not self.closed then self.conn:send(wire.KILL, id, reason or "cancelled") end
end

--- Sends the pool's idle check: work the runner runs in a sandbox before it goes.
function Term:configure(idle_check)
  if self.closed then return end
  local bytes, err = core.encode({ name = "idle_shutdown_after[2]" }, idle_check)
  if not bytes then error(err, 0) end
  self.conn:send(wire.CONFIG, 0, bytes)
end

--- Asks the runner to stop taking work, drain and exit.
function Term:shutdown()
  if not self.closed then self.conn:send(wire.SHUTDOWN, 0, "") end
end

function Term:close(reason)
  if self.closed then return end
  self.closed = true
  if self.hb then self.hb.stop() end
  self.conn:close(reason or "closed by the parent")
end

function Term:stats()
  return { workers = self.inflight, peak = self.peak, remote = true }
end

--- Where the runner's messages go: events(kind, ...) with kind "result" (id,
-- status, payload), "remote_shutdown" (reason) or "lost" (reason), once.
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
  self:close(reason)
  self:emit("lost", reason)
end

local Hub = {}
Hub.__index = Hub

--- A listening hub. opts: bind (default "127.0.0.1"), port (0: any), advertise
-- (addresses runners are told, default the bound one), heartbeat_interval,
-- heartbeat_misses, max_message, log.
function M.hub(opts)
  local h = setmetatable({ pending = {}, log = opts.log, opts = opts, conns = {} }, Hub)
  local l, err = core.listen { host = opts.bind or "127.0.0.1", port = opts.port or 0,
    on_connect = function(conn) h:accept(conn) end }
  if not l then return nil, err end
  h.listener = l
  local host, port = l:address()
  h.addrs = opts.advertise or { (host:find(":") and ("[" .. host .. "]") or host) .. ":" .. port }
  return h
end

--- Registers a runner the hub will accept: its parent record (ref, secret).
function Hub:expect(p)
  self.pending[p.ref] = { parent = p, future = task.future() }
end

function Hub:forget(ref)
  self.pending[ref] = nil
end

--- Ends the wait for a runner that will not come (its process exited, say).
function Hub:fail(ref, reason)
  local entry = self.pending[ref]
  if entry then entry.future:set(nil, reason) end
end

--- Waits until the runner with this ref has connected and authenticated; returns
-- its terminator, or nil and why not.
function Hub:await(p, timeout)
  local entry = self.pending[p.ref]
  if not entry then return nil, "no runner is expected with this ref" end
  local timer
  if timeout and timeout < math.huge then
    timer = loop:timer(timeout, function()
      entry.future:set(nil, ("the runner did not connect within the boot timeout of %d ms")
        :format(timeout))
    end)
  end
  local term, err = entry.future:wait()
  if timer then timer:stop() end
  self.pending[p.ref] = nil
  if not term and entry.term then entry.term:close("boot abandoned") end
  return term, err
end

function Hub:refuse(conn, why)
  self.refusals = (self.refusals or 0) + 1
  local ok, ip, port = pcall(conn.peer, conn)
  self.log.error("refused a connection from %s:%s: %s", tostring(ok and ip),
    tostring(ok and port), why)
  conn:send(wire.CLOSE, 0, why)            -- the runner learns why, then the link ends
  conn:finish(why)
end

-- The handshake, driven by messages: HELLO -> CHALLENGE -> PROOF -> REMOTE_UP.
local HANDSHAKE_MESSAGE = 64 * 1024    -- what an unauthenticated peer may send at once
local HANDSHAKES_MAX = 64              -- connections not yet authenticated, at most

function Hub:accept(conn)
  local o = self.opts
  local window = o.heartbeat_interval * o.heartbeat_misses
  local st = { stage = "hello" }
  self.handshaking = (self.handshaking or 0) + 1
  local function done_handshaking()
    if st.counted then return end
    st.counted = true
    self.handshaking = self.handshaking - 1
  end
  self.conns[conn] = true
  local function refuse(why)
    st.refused = true
    self:refuse(conn, why)
  end
  -- a connection that does not finish the handshake in time is closed
  local deadline = loop:timer(window, function()
    if st.stage ~= "up" and not st.refused then
      refuse("handshake timed out")
    end
  end)
  conn:start(function(t, id, payload)
    if st.refused then return end
    if st.term then
      st.term.msgs = st.term.msgs + 1
      if t == wire.RESULT then
        if not st.term.ids[id] then return end   -- not a call we sent (or a duplicate)
        st.term.ids[id] = nil
        st.term.inflight = st.term.inflight - 1
        st.term:emit("result", id, payload:sub(1, 1), payload:sub(2))
      elseif t == wire.REMOTE_SHUTDOWN then
        st.term:emit("remote_shutdown", payload)
      elseif t ~= wire.PING then
        st.term:lost("protocol: unexpected " .. (wire.NAMES[t] or tostring(t)))
      end
      return
    end
    if t == wire.PING then return end
    if st.stage == "hello" and t == wire.HELLO then
      local hello = cjson.decode(payload)
      local v = type(hello) == "table" and math.tointeger(hello.v)
      if not v then return refuse("malformed HELLO") end
      hello.v = v
      if hello.v ~= wire.PROTOCOL then
        return refuse(("protocol version %d is not %d"):format(hello.v, wire.PROTOCOL))
      end
      local entry = type(hello.ref) == "string" and self.pending[hello.ref]
      if not entry or entry.claimed then return refuse("unknown runner ref") end
      local nonce = type(hello.nonce) == "string" and core.b64decode(hello.nonce)
      if not nonce or #nonce < 16 then return refuse("malformed HELLO nonce") end
      st.entry, st.secret = entry, core.b64decode(entry.parent.secret)
      st.nonce = core.random_bytes(16)
      st.stage = "proof"
      conn:send(wire.CHALLENGE, 0, cjson.encode {
        nonce = core.b64encode(st.nonce),
        proof = core.b64encode(wire.proof(core.hmac_sha256, st.secret, "parent", nonce,
          entry.parent.ref)) })
    elseif st.stage == "proof" and t == wire.PROOF then
      local msg = cjson.decode(payload)
      local proof = type(msg) == "table" and type(msg.proof) == "string"
        and core.b64decode(msg.proof)
      local want = wire.proof(core.hmac_sha256, st.secret, "runner", st.nonce,
        st.entry.parent.ref)
      if not proof or not core.equal(proof, want) then
        return refuse("wrong proof: the runner does not hold the secret")
      end
      st.stage = "auth"
    elseif st.stage == "auth" and t == wire.REMOTE_UP then
      local up = cjson.decode(payload) or {}
      local entry = st.entry
      if entry.claimed or entry.future.done then
        return refuse("the runner came too late")
      end
      entry.claimed = true
      st.stage = "up"
      deadline:stop()
      done_handshaking()
      conn:limits(o.max_message or (1 << 30), 64)
      local term = setmetatable({ conn = conn, inflight = 0, peak = 0, early = {}, ids = {},
        pid = math.tointeger(up.pid), host = up.host, msgs = 0 }, Term)
      st.term = term
      self:heartbeat(term)
      entry.term = term
      entry.future:set(term)
    else
      refuse(("protocol: unexpected %s during the handshake"):format(
        wire.NAMES[t] or tostring(t)))
    end
  end, function(reason)
    self.conns[conn] = nil
    deadline:stop()
    done_handshaking()
    if st.term then
      st.term:lost(reason)
    elseif not st.refused and reason:match("^protocol") then
      self.drops = (self.drops or 0) + 1
      self.log.error("closed an unauthenticated connection: %s", reason)
    end
  end, HANDSHAKE_MESSAGE)
  conn:limits(HANDSHAKE_MESSAGE, 1)
  if self.handshaking > HANDSHAKES_MAX then
    refuse("too many connections are authenticating")
  end
end

function Hub:heartbeat(term)
  term.hb = wire.heartbeat(loop, term, self.opts.heartbeat_interval,
    self.opts.heartbeat_misses, "runner",
    function() term.conn:send(wire.PING, 0, "") end,
    function(why) term:lost(why) end)
end

function Hub:close()
  if self.listener then self.listener:close() end
  self.listener = nil
  for _, entry in pairs(self.pending) do       -- boots in flight learn it at once
    entry.future:set(nil, "the pool is shutting down")
  end
  for conn in pairs(self.conns) do conn:close("the pool is shutting down") end
end

return M
