--- Backend states: each runner's backend callbacks run in a sandboxed Lua state of
-- their own (profile "backend": pure Lua, require of Lua text modules, no I/O). The
-- backend environment there is made of stubs that yield requests to this state,
-- where the pool serves them (waiting in a task when it must): the backend never
-- touches the application's state, and what it holds of the outside (processes,
-- terminators, timers) it holds as handles. A callback that computes for longer than
-- 2 s without waiting is killed, so a broken backend cannot stall the loop.
-- @module flame.backend
local core = require "flame.core"

local M = {}

local BACKEND_MEMORY = 64 * 1024 * 1024
-- ms a callback may run between two waits: well within the default heartbeat window
-- (3 s), so a computing backend is stopped before a runner could miss its parent
local STEP_LIMIT = 2000

-- Runs in the backend state (sent there once per runner by the codec): loads the
-- backend, builds its environment of stubs, and defines the dispatcher the host
-- calls each callback through. `spec` is a module name or a copy of a backend table.
local function bootstrap(spec)
  local B = spec
  if type(spec) == "string" then
    local ok, mod = pcall(require, "flame.backends." .. spec)
    if not ok then mod = require(spec) end
    B = mod
  end
  local yield = coroutine.yield

  local function request(name, ...) return yield(name, ...) end

  -- Values sent to the host: handles as their ids, no functions.
  local function plain(x, seen)
    if type(x) ~= "table" then
      if type(x) == "function" or type(x) == "thread" or type(x) == "userdata" then return nil end
      return x
    end
    if x.__flame_handle then return { __flame_handle = x.__flame_handle } end
    seen = seen or {}
    if seen[x] then return seen[x] end
    local out = {}
    seen[x] = out
    for k, v in pairs(x) do out[plain(k, seen)] = plain(v, seen) end
    return out
  end

  -- A handle from the host, with its methods as stubs.
  local function handle(h, ...)
    if type(h) ~= "table" or not h.__flame_handle then return h, ... end
    local id = h.__flame_handle
    if h.kind == "http_stream" then
      function h.read() return request("stream_read", id) end
      function h.close() return request("stream_close", id) end
    elseif h.kind == "process" then
      function h.pid() return h.process_id end
      function h.kill(_, sig, group) return request("proc_kill", id, sig, group) end
      function h.exited() return request("proc_exited", id) end
    end
    return h
  end

  local env = {}
  function env.merge(a, b)
    local out = {}
    for k, v in pairs(a or {}) do out[k] = v end
    for k, v in pairs(b or {}) do out[k] = v end
    return out
  end
  for _, name in ipairs { "config", "random_id", "parent_new", "parent_encode", "getenv", "environ",
                          "flame_bin", "sleep", "exit", "now", "code_paths" } do
    env[name] = function(a) return request(name, plain(a)) end
  end
  function env.await_remote_up(p, timeout)
    return handle(request("await_remote_up", plain(p), timeout))
  end
  function env.local_terminator(state)
    return handle(request("local_terminator", plain(state)))
  end
  function env.spawn_monitor(term, work) return request("spawn_monitor", plain(term), work) end
  function env.send_after(ms, msg) return request("send_after", ms, plain(msg)) end
  env.proc = { spawn = function(o) return handle(request("proc_spawn", plain(o))) end,
               run = function(o) return request("proc_run", plain(o)) end }
  env.http = {
    request = function(o) return request("http_request", plain(o)) end,
    watch = function(o, tag) return request("http_watch", plain(o), tag) end,
    stream = function(o) return handle(request("http_stream", plain(o))) end,
  }
  function env.parent_info() return request("parent_info") end
  function env.proc_alive(pid, started) return request("proc_alive", pid, started) end
  env.json = {
    encode = function(v) return request("json_encode", plain(v)) end,
    decode = function(s) return request("json_decode", s) end,
  }
  env.log = {}
  for _, level in ipairs { "debug", "info", "warn", "error" } do
    env.log[level] = function(fmt, ...)
      local ok, msg = pcall(string.format, fmt, ...)
      return request("log", level, ok and msg or tostring(fmt))
    end
  end

  local STATE
  function __flame_dispatch(cb, arg)
    if cb == "init" then
      STATE = B.init(arg, env)
      if STATE == nil then error("the backend's init returned no state", 0) end
      return true
    elseif cb == "remote_boot" then
      local term, st = B.remote_boot(STATE, env)
      if not term then return nil, tostring(st or "remote_boot returned nothing") end
      if type(st) == "table" then STATE = st end
      return plain(term)
    elseif cb == "remote_spawn_monitor" then
      if B.remote_spawn_monitor then B.remote_spawn_monitor(STATE, arg, env)
      else env.spawn_monitor(STATE.terminator, arg) end
      return true
    elseif cb == "handle_info" then
      if not B.handle_info then return true end
      local st, reason = B.handle_info(arg, STATE, env)
      if st == nil then return nil, tostring(reason or "the backend reported the runner down") end
      STATE = st
      return true
    elseif cb == "remote_shutdown" then
      if B.remote_shutdown then B.remote_shutdown(STATE, arg, env) end
      return true
    end
    error("unknown callback " .. tostring(cb), 0)
  end
  return true
end

local function dispatch(cb, arg)
  return __flame_dispatch(cb, arg)
end

local Host = {}
Host.__index = Host

--- A backend state for one runner. serve(name, ...) answers its requests (it may
-- wait); spec is the pool's backend: a module name or a table (copied in).
function M.new(spec, serve)
  local ok, sb = pcall(core.sandbox, { profile = "backend", path = package.path,
                                       memory_limit = BACKEND_MEMORY })
  if not ok then return nil, "cannot make a backend state: " .. tostring(sb) end
  local host = setmetatable({ sb = sb, serve = serve }, Host)
  local ok2, err = pcall(host.run, host, bootstrap, spec)
  if not ok2 then
    sb:close()
    return nil, err
  end
  return host
end

--- Runs fn(...) as a coroutine in the backend state, serving what it asks for, and
-- returns what it returned; raises its error.
function Host:run(fn, ...)
  local sb = self.sb
  if not sb then error("the runner's backend state is closed", 0) end
  local bytes, err = core.encode({ name = "backend" }, fn, ...)
  if not bytes then error("cannot send to the backend state: " .. err, 0) end
  local id, status, out = sb:start(bytes, STEP_LIMIT)
  while status == "yield" do
    local req = table.pack(core.decode(out))
    local reply
    if not req[1] then
      reply = table.pack(nil, "bad request: " .. tostring(req[2]))
    else
      reply = table.pack(pcall(self.serve, table.unpack(req, 2, req.n)))
      if reply[1] then
        reply = table.pack(table.unpack(reply, 2, reply.n))
      else
        reply = table.pack(nil, tostring(reply[2]))
      end
    end
    local rb, rerr = core.encode(nil, table.unpack(reply, 1, reply.n))
    if not rb then rb = assert(core.encode(nil, nil, "reply cannot be sent: " .. rerr)) end
    if sb ~= self.sb then error("the runner's backend state was closed meanwhile", 0) end
    id, status, out = sb:resume(id, rb, STEP_LIMIT)
  end
  if status == "done" then
    local r = table.pack(core.decode(out))
    if not r[1] then error("the backend's answer cannot be read: " .. tostring(r[2]), 0) end
    return table.unpack(r, 2, r.n)
  end
  if status == "killed" then
    error(("a backend callback computed for more than %d ms without waiting, and was "
      .. "stopped (a backend waits for what it needs: flame.sleep, http, proc, "
      .. "await_remote_up)"):format(STEP_LIMIT), 0)
  end
  -- an error the backend raised on purpose (error(msg, 0): no position) is its
  -- message; anything else is a bug in it, and its traceback helps
  local _, msg, tb = core.decode(out)
  msg = msg or out
  if tb and msg:match("^[^\n]-:%d+: ") then msg = msg .. "\n" .. tb end
  error(msg, 0)
end

--- Calls a callback by name through the dispatcher.
function Host:call(cb, arg)
  return self:run(dispatch, cb, arg)
end

function Host:close()
  if self.sb then pcall(self.sb.close, self.sb) end  -- busy: the GC closes it later
  self.sb = nil
end

return M
