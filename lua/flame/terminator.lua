--- The terminator: what `flame runner` runs. It connects back to the parent named
-- in FLAME_PARENT, proves it holds the runner's secret (and makes the parent prove
-- it too, so nothing unauthenticated runs), then runs the calls the parent sends on
-- the executor's worker threads, each with its deadline. It shuts the runner down
-- when it idles past idle_shutdown_after, when the parent asks, or when the parent
-- goes away (link closed, heartbeats missed): then linked work is killed, unlinked
-- work gets shutdown_timeout to finish, and the backend's system_shutdown ends the
-- host. It also gives up if the parent cannot be reached within the failsafe time.
-- @module flame.terminator
local core = require "flame.core"
local cjson = require "cjson.safe"
local task = require "flame.task"
local wire = require "flame.wire"
local parentmod = require "flame.parent"

local M = {}

local loop = task.loop

local function log(fmt, ...)
  io.stderr:write(("flame runner: " .. fmt .. "\n"):format(...))
end

local function setting(s, k, default)
  local v = s[k]
  if v == nil then return default end
  if v == -1 then return math.huge end     -- JSON has no infinity: -1 stands for it
  return v
end

local T = {}
T.__index = T

-- Every message from the parent proves it is alive.
function T:on_message(mtype, id, payload)
  self.msgs = self.msgs + 1
  if mtype == wire.CLOSE then
    self:lost("the parent closed the link: " .. payload)
    return
  end
  if self.stage ~= "up" and self.stage ~= "draining" then
    if self.expect and self.expect.type == mtype then
      local f = self.expect.future
      self.expect = nil
      f:set(payload)
    elseif mtype ~= wire.PING then
      self:lost("protocol: unexpected " .. (wire.NAMES[mtype] or tostring(mtype))
        .. " during the handshake")
    end
    return
  end
  if mtype == wire.SPAWN then
    self:spawn(id, payload)
  elseif mtype == wire.KILL then
    local reason = payload ~= "" and payload or "cancelled"
    if self.calls[id] then
      self.exec:kill(id, reason)
    elseif self.nearly < 1024 then          -- a KILL can overtake a long SPAWN
      self.early_kills[id] = reason
      self.nearly = self.nearly + 1
    end
  elseif mtype == wire.SHUTDOWN then
    self:drain("shutdown")
  elseif mtype == wire.CONFIG then
    self.idle_check = payload               -- work, run in a sandbox when idle
  elseif mtype ~= wire.PING then
    log("ignoring a message of unknown type %d", mtype)
  end
end

local function answer(self, id, status, text)
  if self.conn then self.conn:send(wire.RESULT, id, status .. assert(core.encode(nil, text))) end
end

function T:spawn(id, payload)
  if id <= 0 then return self:lost("protocol: SPAWN with id " .. id) end
  if self.stage ~= "up" then return answer(self, id, "k", "shutdown") end
  local early = self.early_kills[id]
  if early then                              -- killed before it arrived
    self.early_kills[id] = nil
    self.nearly = self.nearly - 1
    return answer(self, id, "k", early)
  end
  local timeout, link, bytes = wire.spawn_parse(payload)
  if not timeout then return self:lost("protocol: malformed SPAWN") end
  local ok, err = pcall(self.exec.submit, self.exec, id, bytes)
  if not ok then return answer(self, id, "e", "the runner could not start the call: " .. tostring(err)) end
  local call = { link = link }
  self.calls[id] = call
  self.ncalls = self.ncalls + 1
  self:idle_stop()
  if timeout < math.huge then
    call.timer = loop:timer(timeout, function() self.exec:kill(id, "timeout") end)
  end
end

local IDLE_CHECK_ID = -1                     -- the executor job of the idle check
local IDLE_CHECK_LIMIT = 5000

function T:done(id, status, payload)
  if id == IDLE_CHECK_ID then return self:idle_checked(status, payload) end
  local call = self.calls[id]
  if not call then return end
  self.calls[id] = nil
  self.ncalls = self.ncalls - 1
  if call.timer then call.timer:stop() end
  if self.conn then self.conn:send(wire.RESULT, id, payload or "", status) end
  if self.ncalls == 0 then
    if self.stage == "draining" then
      self.stopped:set(self.stop_reason)
    else
      self:idle_start()
    end
  end
end

function T:idle_stop()
  if self.idle_timer then self.idle_timer:stop() end
  self.idle_timer = nil
end

function T:idle_start()
  self:idle_stop()
  local after = self.idle_after
  if after == math.huge then return end
  self.idle_timer = loop:timer(after, function()
    self.idle_timer = nil
    if self.ncalls > 0 or self.stage ~= "up" then return end
    if not self.idle_check then return self:go_idle() end
    -- the pool's check runs like work: in a sandbox, killed if it takes too long
    self.checking = loop:timer(IDLE_CHECK_LIMIT, function()
      self.exec:kill(IDLE_CHECK_ID, "timeout")
    end)
    self.exec:submit(IDLE_CHECK_ID, self.idle_check)
  end)
end

function T:idle_checked(status, payload)
  if self.checking then self.checking:stop() end
  self.checking = nil
  local ready = false
  if status == "r" then
    local ok, v = core.decode(payload or "")
    ready = ok and v and true or false
  else
    log("the idle check failed (%s): staying up", status)
  end
  if ready and self.ncalls == 0 and self.stage == "up" then return self:go_idle() end
  if self.stage == "up" and self.ncalls == 0 then self:idle_start() end
end

function T:go_idle()
  self.conn:send(wire.REMOTE_SHUTDOWN, 0, "idle")
  self:drain("idle")
end

--- Stops taking work; once the calls in flight end (or shutdown_timeout passes),
-- the runner stops.
function T:drain(reason)
  if self.stage == "draining" or self.stage == "done" then return end
  self.stage = "draining"
  self.stop_reason = reason
  self:idle_stop()
  if self.ncalls == 0 then
    self.stopped:set(reason)
    return
  end
  if self.settings.shutdown_timeout < math.huge then
    loop:timer(self.settings.shutdown_timeout, function() self.stopped:set(reason) end)
  end
end

--- The parent is gone: linked work dies with it, unlinked work may finish.
function T:lost(reason)
  if self.stage == "done" then return end
  log("lost the parent: %s", reason)
  if self.conn then self.conn:close(reason) end
  self.conn = nil
  if self.expect then
    local f = self.expect.future
    self.expect = nil
    f:set(nil, reason)
  end
  for id, call in pairs(self.calls) do
    if call.link then self.exec:kill(id, "cancelled") end
  end
  if self.stage == "up" then
    self:drain("parent_lost")
  elseif self.stage ~= "draining" then      -- refused or lost before it was up
    self.stage = "draining"
    self.never_up = reason
    self.stopped:set("parent_lost")
  end
end

function T:heartbeat()
  self.hb = wire.heartbeat(loop, self, self.settings.heartbeat_interval,
    self.settings.heartbeat_misses, "parent",
    function()
      if not self.conn then return false end
      self.conn:send(wire.PING, 0, "")
    end,
    function(why) self:lost(why) end)
end

-- Waits for the next message of `type` during the handshake, up to ms.
function T:expect_message(type, ms)
  local f = task.future()
  self.expect = { type = type, future = f }
  local timer = loop:timer(ms, function()
    if self.expect and self.expect.future == f then
      self.expect = nil
      f:set(nil, "timed out waiting for " .. wire.NAMES[type])
    end
  end)
  local payload, err = f:wait()
  timer:stop()
  return payload, err
end

-- One connection attempt to one address, for at most ms: connection or nil, error.
local function connect(addr, ms)
  local host, port = addr:match("^(.+):(%d+)$")
  host = host:gsub("^%[(.*)%]$", "%1")
  local f = task.future()
  local ok, pending = pcall(core.connect, { host = host, port = tonumber(port),
    on_connect = function(c, e)
      if not f:set(c, e) and c then c:close("too late") end
    end })
  if not ok then return nil, pending end
  if not pending then return nil, "cannot connect" end
  local timer = loop:timer(math.max(1, ms), function()
    if f:set(nil, "connect timed out") then pending:close("connect timed out") end
  end)
  local c, err = f:wait()
  timer:stop()
  return c, err
end

--- Connects (with retries until the failsafe deadline) and authenticates.
function T:connect()
  local p, s = self.p, self.settings
  local deadline = task.now() + s.failsafe_timeout
  local delay, last_err = 50, "no address"
  while task.now() < deadline do
    for _, addr in ipairs(p.addrs) do
      local conn, err = connect(addr, deadline - task.now())
      if conn then
        self.conn = conn
        conn:start(function(t, id, payload) self:on_message(t, id, payload) end,
          function(reason)
            if self.closing then self.closing:set() end
            if self.conn == conn and self.stage ~= "done" then self:lost(reason) end
          end, s.max_message)
        local ok, why = self:handshake()
        if ok then return true end
        return nil, why                         -- a refused handshake is final
      end
      last_err = ("%s: %s"):format(addr, tostring(err))
    end
    task.sleep(math.min(delay, math.max(0, deadline - task.now())))
    delay = math.min(delay * 2, 1000)
  end
  return nil, ("could not reach the parent within the failsafe timeout of %d ms (%s)")
    :format(s.failsafe_timeout, last_err)
end

function T:handshake()
  local p, s = self.p, self.settings
  local secret = core.b64decode(p.secret)
  local nonce = core.random_bytes(16)
  local window = s.heartbeat_interval * s.heartbeat_misses
  self.conn:send(wire.HELLO, 0, cjson.encode { v = wire.PROTOCOL, ref = p.ref,
    nonce = core.b64encode(nonce) })
  local payload, err = self:expect_message(wire.CHALLENGE, window)
  if not payload then return nil, "no challenge from the parent: " .. tostring(err) end
  local ch = cjson.decode(payload)
  local parent_nonce = type(ch) == "table" and type(ch.nonce) == "string"
    and core.b64decode(ch.nonce)
  local proof = type(ch) == "table" and type(ch.proof) == "string" and core.b64decode(ch.proof)
  if not parent_nonce or not proof
     or not core.equal(proof, wire.proof(core.hmac_sha256, secret, "parent", nonce, p.ref)) then
    self.conn:send(wire.CLOSE, 0, "the parent failed to prove the secret")
    self.conn:finish("the parent failed to prove the secret")
    return nil, "the parent failed to prove it holds the runner's secret: refusing it"
  end
  self.conn:send(wire.PROOF, 0, cjson.encode { proof = core.b64encode(
    wire.proof(core.hmac_sha256, secret, "runner", parent_nonce, p.ref)) })
  self.conn:send(wire.REMOTE_UP, 0, cjson.encode { pid = core.pid(),
    host = p.host_env and os.getenv(p.host_env) or nil })
  self.stage = "up"
  return true
end

function T:run()
  self:heartbeat()
  local ok, err = self:connect()
  if not ok then
    self.stage = "done"
    if self.hb then self.hb.stop() end
    log("%s", err)
    return 1
  end
  self:idle_start()
  local reason = self.stopped:wait()
  self.stage = "done"
  self:idle_stop()
  if self.hb then self.hb.stop() end
  for id in pairs(self.calls) do self.exec:kill(id, "shutdown") end
  if self.conn then                          -- last results and messages go out first
    local closed = task.future()
    self.closing = closed
    self.conn:finish("runner stopping: " .. tostring(reason))
    local timer = loop:timer(2000, function() closed:set() end)
    closed:wait()
    timer:stop()
    self.conn = nil
  end
  return 0, reason
end

-- The backend's system_shutdown, run on the runner (docs/backends.md).
local function system_shutdown(backend, code)
  -- a runner that failed keeps its failing status, whatever the backend exits with
  local env = { exit = function(c) core.exit(code ~= 0 and code or (c or 0)) end,
    log = { info = log, warn = log,
    error = log, debug = function() end } }
  local ok, b = pcall(require, "flame.backends." .. backend)
  if not ok then ok, b = pcall(require, backend) end
  if ok and type(b) == "table" and type(b.system_shutdown) == "function" then
    local ok2, err = pcall(b.system_shutdown, env)
    if not ok2 then log("system_shutdown failed: %s", tostring(err)) end
  end
end

--- `flame runner [--require MODULE]...`: returns the process's exit status.
function M.main(...)
  local requires = {}
  local args = { ... }
  local i = 1
  while i <= #args do
    if args[i] == "--require" and args[i + 1] then
      requires[#requires + 1] = args[i + 1]
      i = i + 2
    else
      log("unknown argument '%s'", tostring(args[i]))
      return 2
    end
  end
  local raw = os.getenv("FLAME_PARENT")
  if raw == nil or raw == "" then
    log("FLAME_PARENT is not set (a backend starts runners with it; see docs/backends.md)")
    return 2
  end
  local p, err = parentmod.decode(raw)
  if not p then
    log("FLAME_PARENT is malformed: %s", err)
    return 2
  end
  require("flame")._set_parent(parentmod.public(p))
  local s = p.settings
  local settings = {
    max_concurrency = setting(s, "max_concurrency", 100),
    shutdown_timeout = setting(s, "shutdown_timeout", 30000),
    idle_shutdown_after = setting(s, "idle_shutdown_after", 30000),
    failsafe_timeout = setting(s, "failsafe_timeout", 30000),
    heartbeat_interval = setting(s, "heartbeat_interval", 1000),
    heartbeat_misses = setting(s, "heartbeat_misses", 3),
    max_message = setting(s, "max_message", 1 << 30),
  }
  local sandbox = type(s.sandbox) == "table" and s.sandbox or {}
  local term = setmetatable({ p = p, settings = settings, calls = {}, ncalls = 0, msgs = 0,
    early_kills = {}, nearly = 0,
    stage = "connecting", stopped = task.future(),
    idle_after = settings.idle_shutdown_after }, T)
  local ok, exec = pcall(core.executor, {
    workers = settings.max_concurrency,
    profile = sandbox.profile or "application",
    memory_limit = sandbox.memory_limit or 0,
    requires = #requires > 0 and table.concat(requires, ",") or nil,
    info = assert(core.encode(nil, parentmod.public(p))),
    on_done = function(id, status, payload) term:done(id, status, payload) end,
  })
  if not ok then
    log("cannot start: %s", tostring(exec))
    return 1
  end
  term.exec = exec
  local code, reason = task.run(function() return term:run() end)
  if code == 0 and term.never_up then
    log("%s", term.never_up)
    code = 1
  end
  if code == 0 then log("stopping (%s)", tostring(reason)) end
  system_shutdown(p.backend, code)
  exec:close()
  return code
end

return M
