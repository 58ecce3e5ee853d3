--- Pools of runners, and calls on them.
-- A pool boots runners through its backend, gives each call a slot on the runner
-- with the fewest calls, queues callers in arrival order when every slot is taken
-- and the pool is at max, and turns every failure into an error for the caller.
-- One deadline per call: from entering flame.call to its result (docs/pools.md).
-- @module flame.pool
local core = require "flame.core"
local code_sync = require "flame.code_sync"
local errors = require "flame.errors"
local task = require "flame.task"
local logmod = require "flame.log"
local parentmod = require "flame.parent"
local remote = require "flame.remote"
local backend = require "flame.backend"
local cjson = require "cjson.safe"

local M = {}

local loop = task.loop
local pools = {}                 -- name -> pool, for uniqueness within the process
local LOST_GRACE = 100           -- ms a backend has to explain a lost link
local SPAWN_HEADER = core.SPAWN_HEADER  -- SPAWN's deadline and link flag, before the work
local next_call = 0

local function invalid(msg, level)
  errors.raise("invalid", msg, nil, level and level + 1 or 3)
end

local function describe(v)
  if type(v) == "string" then return ("string %q"):format(v) end
  return type(v) == "table" and "a table" or (type(v) .. " " .. tostring(v))
end

local function is_ms(v)
  return type(v) == "number" and v == v and v >= 0
end

-- option -> { expected, check, default }
local OPTIONS = {
  name = { "a non-empty string", function(v) return type(v) == "string" and v ~= "" end },
  backend = { "a backend name or table",
    function(v) return type(v) == "string" or type(v) == "table" end, "local" },
  backend_opts = { "a table", function(v) return type(v) == "table" end },
  min = { "an integer >= 0", function(v) return math.type(v) == "integer" and v >= 0 end, 0 },
  max = { "an integer >= 1", function(v) return math.type(v) == "integer" and v >= 1 end, 1 },
  max_concurrency = { "an integer >= 1",
    function(v) return math.type(v) == "integer" and v >= 1 end, 100 },
  single_use = { "a boolean", function(v) return type(v) == "boolean" end, false },
  timeout = { "milliseconds (a number > 0, or math.huge)",
    function(v) return is_ms(v) and v > 0 end, 30000 },
  boot_timeout = { "milliseconds (a number > 0, or math.huge)",
    function(v) return is_ms(v) and v > 0 end, 30000 },
  shutdown_timeout = { "milliseconds (a number >= 0, or math.huge)", is_ms, 30000 },
  idle_shutdown_after = { "milliseconds, or { milliseconds, function }", function(v)
    return is_ms(v) or (type(v) == "table" and is_ms(v[1]) and type(v[2]) == "function")
  end, 30000 },
  min_idle_shutdown_after = { "milliseconds (a number >= 0, or math.huge)", is_ms,
    math.huge },
  on_grow_start = { "a function", function(v) return type(v) == "function" end },
  on_grow_end = { "a function", function(v) return type(v) == "function" end },
  on_shrink = { "a function", function(v) return type(v) == "function" end },
  log = { "false or one of \"debug\", \"info\", \"warn\", \"error\"",
    function(v) return v == false or logmod.LEVELS[v] ~= nil end, false },
  sandbox = { "\"application\", \"restricted\" or { profile = ..., memory_limit = ... }",
    function(v)
      if v == "application" or v == "restricted" then return true end
      if type(v) ~= "table" then return false end
      for k, x in pairs(v) do
        if k == "profile" then
          if x ~= "application" and x ~= "restricted" then return false end
        elseif k == "memory_limit" then
          if math.type(x) ~= "integer" or x < 0 then return false end
        else
          return false
        end
      end
      return true
    end, "application" },
}

local LINK_KEYS = { bind = "string", port = "number", advertise = "table",
                    heartbeat_interval = "number", heartbeat_misses = "number" }
OPTIONS.link = { "{ bind, port, advertise, heartbeat_interval, heartbeat_misses }",
  function(v)
    if type(v) ~= "table" then return false end
    for k, x in pairs(v) do
      if LINK_KEYS[k] == nil or type(x) ~= LINK_KEYS[k] then return false end
    end
    return (v.heartbeat_interval == nil or v.heartbeat_interval > 0)
      and (v.heartbeat_misses == nil or v.heartbeat_misses >= 1)
  end, {} }

OPTIONS.code_sync = { "true, false or { paths, modules, max_bytes }",
  function(v) return type(v) == "boolean" or type(v) == "table" end, false }

local CALL_OPTIONS = {
  timeout = { "milliseconds (a number > 0, or math.huge)",
    function(v) return is_ms(v) and v > 0 end },
  link = { "a boolean", function(v) return type(v) == "boolean" end },
}

-- Checks a table of options against spec; returns a copy with defaults filled in.
local function check_options(where, opts, spec, level)
  if type(opts) ~= "table" then invalid(where .. ": options must be a table", level + 1) end
  for k in pairs(opts) do
    if type(k) ~= "string" or not spec[k] then
      invalid(("%s: unknown option '%s'"):format(where, tostring(k)), level + 1)
    end
  end
  local out = {}
  for k, s in pairs(spec) do
    local v = opts[k]
    if v == nil then
      v = s[3]
    elseif not s[2](v) then
      invalid(("%s: option '%s' must be %s (got %s)"):format(where, k, s[1], describe(v)),
        level + 1)
    end
    out[k] = v
  end
  return out
end

local function sandbox_settings(sb)
  if type(sb) == "string" then return { profile = sb, memory_limit = 0 } end
  return { profile = sb.profile or "application", memory_limit = sb.memory_limit or 0 }
end

local function resolve_backend(b)
  local mod, what = b, "the backend table"
  if type(b) == "string" then
    what = ("backend '%s'"):format(b)
    local ok, m = pcall(require, "flame.backends." .. b)
    if not ok then
      local ok2, m2 = pcall(require, b)
      if not ok2 then
        invalid(("flame.pool: no backend '%s' (no module flame.backends.%s or %s)"):format(
          b, b, b), 3)
      end
      m = m2
    end
    mod = m
  end
  if type(mod) ~= "table" then
    invalid(("flame.pool: %s is not a table of callbacks"):format(what), 3)
  end
  for _, cb in ipairs { "init", "remote_boot" } do
    if type(mod[cb]) ~= "function" then
      invalid(("flame.pool: %s has no %s callback"):format(what, cb), 3)
    end
  end
  return mod
end

local Pool = {}
Pool.__index = Pool
Pool.__name = "flame.pool"

local parent_instance = parentmod.random_id(12)  -- this process, as a parent

local function read_line(path)
  local f = io.open(path)
  if not f then return nil end
  local l = f:read("l")
  f:close()
  return l
end


local function flame_bin()
  local bin = os.getenv("FLAME_BIN")
  if bin and bin ~= "" then return bin end
  local so = package.searchpath("flame.core", package.cpath)
  local prefix = so and so:match("^(.*)/lib/lua/5%.4/flame/core%.so$")
  if prefix then
    local f = io.open(prefix .. "/bin/flame")
    if f then f:close() return prefix .. "/bin/flame" end
  end
  for dir in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    local f = io.open(dir .. "/flame")
    if f then f:close() return dir .. "/flame" end
  end
  return "flame"
end

-- /proc/PID/stat: the process's state letter and start time (clock ticks since
-- boot), or nil when there is no such process.
local function proc_stat(pid)
  local f = io.open("/proc/" .. math.floor(tonumber(pid) or 0) .. "/stat")
  if not f then return nil end
  local st = f:read("a")
  f:close()
  local state, rest = st:match("^%d+ %b() (%a) (.*)$")
  if not state then return nil end
  local fields = {}
  for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
  return { state = state, started = fields[19] }   -- field 22 of the whole line
end

-- Who this process is as a parent: { id (random, per process), pid, host, and what
-- tells it from any other process with its pid: started (its start time since
-- boot), boot (the kernel's boot id), pidns (its pid namespace) }. Read once.
local identity
local function parent_identity()
  if not identity then
    local st = proc_stat(core.pid())
    local p = io.popen("readlink /proc/" .. core.pid() .. "/ns/pid 2>/dev/null")
    local pidns = p and p:read("l")
    if p then p:close() end
    identity = {
      id = parent_instance, pid = core.pid(),
      host = read_line("/proc/sys/kernel/hostname") or os.getenv("HOSTNAME") or "localhost",
      started = st and st.started, boot = read_line("/proc/sys/kernel/random/boot_id"),
      pidns = pidns,
    }
  end
  return identity
end

-- The backend environment's requests from a runner's backend state, served here
-- (docs/backends.md has what each does). Objects the backend holds (processes,
-- terminators) stay here; it gets handles.
local function backend_server(pool, runner)
  local handles, next_handle = {}, 0
  runner.handles = handles
  local function keep(obj, kind, extra)
    next_handle = next_handle + 1
    handles[next_handle] = obj
    local h = { __flame_handle = next_handle, kind = kind }
    for k, v in pairs(extra or {}) do h[k] = v end
    return h
  end
  local S = {}
  function S.config(name) return pool.config[name] or {} end
  S.random_id = parentmod.random_id
  S.parent_encode = parentmod.encode
  S.getenv = os.getenv
  function S.environ(prefix)
    if prefix ~= nil and type(prefix) ~= "string" then error("environ: a prefix string expected", 0) end
    return core.environ(prefix)
  end
  S.flame_bin = flame_bin
  -- where this program finds its modules now: a runner on this machine that is
  -- given them finds the same ones (a lib/ put on package.path at run time too)
  function S.code_paths()
    return { path = package.path, cpath = package.cpath, cwd = core.cwd() }
  end
  S.sleep = task.sleep
  S.now = task.now
  function S.exit() error("exit ends a runner (in system_shutdown), not the parent", 0) end
  S.json_encode = cjson.encode
  -- JSON null is cjson.null, a userdata that cannot cross into a backend state: nil
  local function denull(v)
    if v == cjson.null then return nil end
    if type(v) == "table" then
      for k, x in pairs(v) do v[k] = denull(x) end
    end
    return v
  end
  function S.json_decode(text)
    local v, err = cjson.decode(text)
    if v == nil then return nil, err end
    return denull(v)
  end
  function S.log(level, msg) pool.log[level]("%s", msg) end

  function S.parent_new(fields)
    local hub = assert(pool:hub())
    local o = pool.opts
    local function ms(v) return v == math.huge and -1 or v end
    local idle = type(o.idle_shutdown_after) == "table" and o.idle_shutdown_after[1]
      or o.idle_shutdown_after
    if runner.is_min then idle = o.min_idle_shutdown_after end
    local p = parentmod.new {
      node_base = fields and fields.node_base, host_env = fields and fields.host_env,
      backend = type(o.backend) == "string" and o.backend or (fields and fields.backend),
      addrs = hub.addrs,
      settings = {
        max_concurrency = o.max_concurrency, shutdown_timeout = ms(o.shutdown_timeout),
        idle_shutdown_after = ms(idle), failsafe_timeout = ms(o.boot_timeout),
        -- the check comes in CONFIG after REMOTE_UP: the runner must not idle before
        idle_check = type(o.idle_shutdown_after) == "table" or nil,
        heartbeat_interval = hub.opts.heartbeat_interval,
        heartbeat_misses = hub.opts.heartbeat_misses,
        sandbox = sandbox_settings(o.sandbox),
      },
    }
    if o.code_sync and o.backend ~= "local" then
      -- what to ship, now: modules loaded since the last boot are in it
      local code, err = code_sync.pack(o.code_sync, pool.code)
      if not code then error(err, 0) end
      pool:code_ready(code)
      runner.code = code
      p.settings.code_sync = true
    end
    hub:expect(p)
    runner.parents[#runner.parents + 1] = p.ref
    return p
  end

  function S.await_remote_up(p, timeout)
    local hub = assert(pool:hub())
    if type(p) ~= "table" or type(p.ref) ~= "string" then
      error("await_remote_up: a parent record from parent_new expected", 0)
    end
    if runner.failed then return nil, runner.failed end  -- handle_info told already
    runner.awaiting = p.ref
    local term, err = hub:await(p, timeout or pool.opts.boot_timeout)
    runner.awaiting = nil
    if not term then return nil, err end
    if runner.code then                       -- its code first, before any call
      local ok, why = term:sync_code(runner.code, pool.opts.boot_timeout)
      if not ok then
        term:close("code_sync failed")
        return nil, why
      end
    end
    return keep(term, "terminator")
  end

  function S.local_terminator(state)
    local sb = type(state) == "table" and state.sandbox or {}
    local ok, ex = pcall(core.executor, {
      workers = state.max_concurrency,
      profile = sb.profile or "application",
      memory_limit = sb.memory_limit or 0,
      info = assert(core.encode(nil, { ref = runner.id, backend = "local",
        node_base = runner.id, flame_vsn = core.VERSION })),
      -- its first worker and sandbox are made now, beside the boot, as on a runner
      prestart = true,
      -- the workers find modules where this program does now (a lib/ it put on
      -- package.path at run time included), as a process runner does
      path = package.path, cpath = package.cpath,
      on_done = function(id, status, payload) runner:done(id, status, payload) end,
    })
    if not ok then return nil, tostring(ex) end
    local ready, why = ex:ready()              -- a sandbox that cannot be made fails the boot
    if not ready then
      ex:close()
      return nil, "executor: " .. why
    end
    return keep(ex, "terminator")
  end

  function S.spawn_monitor(h, work)
    local term = type(h) == "table" and handles[h.__flame_handle]
    if not term or not term.submit then error("spawn_monitor: not a terminator", 0) end
    local bytes = runner.bytes[work.id]
    runner.bytes[work.id] = nil
    if not bytes then error("spawn_monitor: no such call", 0) end
    local ok, err = pcall(term.submit, term, work.id, bytes, work.timeout, work.link)
    if not ok then
      runner.send_error = tostring(err)
      error(err, 0)
    end
    runner.sent[work.id] = true
    return work.id
  end

  function S.send_after(ms, msg)
    loop:timer(ms, function() pool:info(runner, msg) end)
    return true
  end

  function S.proc_spawn(o)
    local proc, err
    proc, err = core.spawn {
      path = o.path, args = o.args, env = o.env, cwd = o.cwd, group = o.group,
      on_output = function(stream, line)
        pool.log[stream == "stderr" and "warn" or "info"]("[%s] %s", runner.id, line)
      end,
      on_exit = function(code, signal)
        runner.procs[proc] = nil                -- a shutdown waits for these to go
        pool:ended_check(runner)
        pool:info(runner, { event = "exit", code = code, signal = signal })
      end,
    }
    if not proc then return nil, err end
    runner.procs[proc] = true
    return keep(proc, "process", { process_id = proc:pid() })
  end

  --- Runs a command to its end and returns what it said: { code, signal, stdout,
  -- stderr, truncated }, or nil and why (it could not start, or ran past its
  -- timeout and was killed with its process group). For backends that drive a
  -- cluster through its tools (sbatch, squeue, scancel).
  function S.proc_run(o)
    if type(o) ~= "table" or type(o.path) ~= "string" then
      error("proc.run: a table with a path expected", 0)
    end
    if o.args ~= nil and type(o.args) ~= "table" then error("proc.run: args must be a list", 0) end
    if o.env ~= nil and type(o.env) ~= "table" then error("proc.run: env must be a table", 0) end
    local timeout = o.timeout or 60000
    if type(timeout) ~= "number" or timeout <= 0 then
      error("proc.run: timeout must be milliseconds > 0", 0)
    end
    local max = o.max_output or 1024 * 1024
    if math.type(max) ~= "integer" or max < 0 then
      error("proc.run: max_output must be an integer >= 0", 0)
    end
    local out = { stdout = {}, stderr = {} }
    local size, truncated = 0, false
    local f = task.future()
    local proc, err
    proc, err = core.spawn {
      path = o.path, args = o.args, env = o.env, cwd = o.cwd, group = true,
      on_output = function(stream, line)
        if size + #line + 1 > max then truncated = true return end
        size = size + #line + 1
        local t = out[stream]
        t[#t + 1] = line
      end,
      on_exit = function(code, signal)
        runner.procs[proc] = nil
        pool:ended_check(runner)
        f:set(code, signal)
      end,
    }
    if not proc then return nil, "proc.run: " .. tostring(err) end   -- "cannot start PATH: ..."
    runner.procs[proc] = true                 -- a shutdown waits for it, or kills it
    local timer = loop:timer(timeout, function()
      if f:set(nil, ("proc.run: %s did not end within %s ms (killed)"):format(o.path, timeout)) then
        pcall(proc.kill, proc, "SIGKILL", true)
      end
    end)
    local code, signal = f:wait()
    timer:stop()
    if not code then return nil, signal end
    local function text(t) return #t > 0 and table.concat(t, "\n") .. "\n" or "" end
    return { code = code, signal = signal, stdout = text(out.stdout), stderr = text(out.stderr),
             truncated = truncated }
  end

  -- The request options a backend may give (its functions never cross).
  local function http_opts(o, what)
    if type(o) ~= "table" or type(o.url) ~= "string" then
      error(what .. ": a table with a url expected", 0)
    end
    local opts = {}
    for _, k in ipairs { "method", "url", "unix_socket", "headers", "body", "timeout",
                         "ca", "cert", "key", "insecure" } do opts[k] = o[k] end
    if opts.headers ~= nil and type(opts.headers) ~= "table" then
      error(what .. ": headers must be a table of name = value", 0)
    end
    return opts
  end

  -- Requests still running for this runner (watches, streams): cancelled when its
  -- backend state closes, so nothing outlives the runner.
  local live = {}
  runner.http_live = live
  local function start(opts, on_done)
    local req
    opts.on_done = function(...)
      if req then live[req] = nil end
      on_done(...)
    end
    req = core.http_request(opts)
    live[req] = true
    return req
  end

  --- An HTTP request (core/http.c): status, headers, body, or nil and a message.
  function S.http_request(o)
    local f = task.future()
    start(http_opts(o, "http.request"), function(...) f:set(...) end)
    local status, headers, body, err = f:wait()
    if not status then return nil, err end
    return status, headers, body
  end

  --- A request left running: its answer reaches handle_info as
  -- { event = "http", tag = tag, status = n, body = s } or { ..., error = message };
  -- with o.chunks, each piece of the body as it comes ({ ..., data = s }) and the
  -- end with an empty body. With o.await_response it returns once the server has
  -- begun answering (the status), or nil and why it failed first; a number there is
  -- how long to wait (else 30 s), after which the request is cancelled.
  function S.http_watch(o, tag)
    local opts = http_opts(o, "http.watch")
    local f = o.await_response and task.future() or nil
    local function tell(msg)
      if runner.http_live then pool:info(runner, msg) end
    end
    if o.chunks then
      opts.on_data = function(chunk) tell { event = "http", tag = tag, data = chunk } end
    end
    if f then opts.on_head = function(status) f:set(status) end end
    local req = start(opts, function(status, _, body, err)
      if f then f:set(nil, err or ("status " .. tostring(status))) end  -- no-op once set
      tell { event = "http", tag = tag, status = status, body = body, error = err }
    end)
    if not f then return true end
    local ms = type(o.await_response) == "number" and o.await_response or 30000
    local timer = loop:timer(math.max(1, math.min(ms, 2^31 - 1)), function()
      if f:set(nil, ("no answer within %.0f ms"):format(ms)) then req:cancel() end
    end)
    local status, err = f:wait()
    timer:stop()
    return status, err
  end

  --- A response read as it arrives (a pull's progress, an event stream): a handle
  -- the backend reads chunk by chunk with stream_read.
  function S.http_stream(o)
    local st = { chunks = {}, head = 1, tail = 0 }
    local function wake()
      local w = st.waiter
      st.waiter = nil
      if w then w:set(true) end
    end
    local opts = http_opts(o, "http.stream")
    local function push(chunk)            -- read from head, written at tail: a queue
      st.tail = st.tail + 1
      st.chunks[st.tail] = chunk
    end
    opts.on_data = function(chunk)
      push(chunk)
      wake()
    end
    st.req = start(opts, function(status, _, body, err)
      st.done, st.status, st.err = true, status, err
      if body and body ~= "" then push(body) end
      wake()
    end)
    return keep(st, "http_stream")
  end

  -- The next chunk; at the end nil, the status (or nil) and the error (or nil).
  function S.stream_read(id)
    local st = handles[id]
    if type(st) ~= "table" or not st.chunks then error("http stream: not a stream", 0) end
    while st.head > st.tail and not st.done do
      if st.waiter then error("http stream: already being read", 0) end
      st.waiter = task.future()
      st.waiter:wait()
    end
    if st.head <= st.tail then
      local c = st.chunks[st.head]
      st.chunks[st.head] = nil
      st.head = st.head + 1
      return c
    end
    return nil, st.status, st.err
  end

  function S.stream_close(id)
    local st = handles[id]
    if type(st) ~= "table" or not st.chunks then return false end
    handles[id] = nil
    if not st.done then st.req:cancel() end
    return true
  end

  -- Whether process pid runs on this host; with `started` (its start time, as in
  -- parent_info), whether it is still that process and not a later one with its pid.
  function S.proc_alive(pid, started)
    local st = proc_stat(pid)
    if not st or st.state == "Z" then return false end
    return started == nil or tostring(started) == st.started
  end

  --- Who this parent is (parent_identity above).
  S.parent_info = parent_identity

  function S.proc_kill(id, sig, group)
    local proc = handles[id]
    if not proc or not proc.kill then return nil, "no such process" end
    return proc:kill(sig, group)
  end

  function S.proc_exited(id)
    local proc = handles[id]
    return proc == nil or proc:exited()
  end

  return function(name, ...)
    local f = S[name]
    if not f then error("the backend environment has no " .. tostring(name), 0) end
    return f(...)
  end
end

--- The pool's hub for remote runners, made on first use.
function Pool:hub()
  if self.hub_ then return self.hub_ end
  local l = self.opts.link
  local h, err = remote.hub {
    bind = l.bind, port = l.port, advertise = l.advertise,
    heartbeat_interval = l.heartbeat_interval or 1000,
    heartbeat_misses = l.heartbeat_misses or 3, log = self.log,
  }
  if not h then return nil, err end
  self.hub_ = h
  return h
end

local function call_hook(pool, name, ...)
  local fn = pool.opts[name]
  if fn then
    local ok, err = pcall(fn, ...)
    if not ok then pool.log.error("%s callback failed: %s", name, tostring(err)) end
  end
end

--- Makes a pool. Options as in the API (docs/pools.md); bad ones raise `invalid`.
function M.new(opts)
  local o = check_options("flame.pool", opts, OPTIONS, 2)
  if o.name == nil then invalid("flame.pool: option 'name' is required", 2) end
  if o.min > o.max then
    invalid(("flame.pool: min (%d) is larger than max (%d)"):format(o.min, o.max), 2)
  end
  if pools[o.name] then
    invalid(("flame.pool: a pool named '%s' already exists"):format(o.name), 2)
  end
  local mod = resolve_backend(o.backend)
  if type(o.backend) == "table" then            -- it is copied into each backend state
    local ok, err = core.encode({ name = "backend" }, o.backend)
    if not ok then
      invalid("flame.pool: the backend table cannot be copied into a backend state: " .. err, 2)
    end
  end
  local cs, why = code_sync.check(o.code_sync)
  if why then invalid("flame.pool: option 'code_sync' " .. why, 2) end
  o.code_sync = cs
  local code
  if cs and o.backend ~= "local" then        -- a local runner reads this program's files
    code, why = code_sync.pack(cs)           -- what cannot be shipped is said now
    if not code then invalid("flame.pool: " .. why, 2) end
  end
  if require("flame").parent() ~= nil then o.min = 0 end  -- a runner boots no runners
  local pool = setmetatable({
    name = o.name, opts = o, nmin = 0,
    runners = {}, ending = {}, booting = 0, waiting = {}, calls = 0, peak = 0, nrunners = 0,
    log = logmod.new(o.log, o.name), config = {}, closed = false,
    -- a backend that leaves remote_spawn_monitor out gets the default, done here:
    -- the call goes to the runner's terminator without entering the backend state
    direct = type(mod.remote_spawn_monitor) ~= "function",
  }, Pool)
  if code then pool:code_ready(code) end
  pools[o.name] = pool
  for _ = 1, o.min do pool:grow() end
  return pool
end

local function remove_runner(pool, r)
  for i, x in ipairs(pool.runners) do
    if x == r then table.remove(pool.runners, i) return true end
  end
  return false
end

-- Calls one runner takes at once: 1 for single-use runners.
local function slots(pool)
  return pool.opts.single_use and 1 or pool.opts.max_concurrency
end

-- code_sync: the pack runners booted from now get, and how calls are encoded for
-- them (the modules it holds travel by name).
function Pool:code_ready(code)
  code.how = { name = "work", buffer = true, head = SPAWN_HEADER, synced = code.synced }
  if code ~= self.code then
    self.log.info("code_sync: %d files, %d bytes, sha256 %s", code.files, code.bytes,
      code.hash:sub(1, 12))
  end
  self.code = code
end

-- The up runner with the fewest calls that has a free slot, or nil.
function Pool:pick()
  local best
  local mc = slots(self)
  for _, r in ipairs(self.runners) do
    if r.status == "up" and r.inflight < mc and not r.used
       and (best == nil or r.inflight < best.inflight) then
      best = r
    end
  end
  return best
end

-- A slot of r is taken: its idle clock stops; a single-use runner is spent.
function Pool:take(r)
  r.inflight = r.inflight + 1
  if self.opts.single_use then r.used = true end
  if r.idle_timer then
    r.idle_timer:stop()
    r.idle_timer = nil
  end
end

function Pool:untake(r)
  r.inflight = r.inflight - 1
  if self.opts.single_use then r.used = nil end
end

-- Local runners idle down here (remote ones decide on the runner): after
-- idle_shutdown_after without calls, or min_idle_shutdown_after for min runners,
-- and when the idle check agrees.
function Pool:idle_watch(r)
  if r.remote or r.status ~= "up" or r.inflight > 0 or self.closed then return end
  local idle = self.opts.idle_shutdown_after
  local ms = type(idle) == "table" and idle[1] or idle
  if r.is_min then ms = self.opts.min_idle_shutdown_after end
  if ms == math.huge then return end
  if r.idle_timer then r.idle_timer:stop() end
  r.idle_timer = loop:timer(ms, function()
    r.idle_timer = nil
    if r.status ~= "up" or r.inflight > 0 or self.closed then return end
    if type(idle) ~= "table" then return self:shrink(r, "idle") end
    task.spawn(function()                    -- the check may wait: it runs in a task
      local ok, ready = pcall(idle[2])
      if r.status ~= "up" or r.inflight > 0 or self.closed then return end
      if ok and ready then self:shrink(r, "idle") else self:idle_watch(r) end
    end)
  end)
end

-- A runner leaves on purpose (idle, single use): stopped, not replaced.
function Pool:shrink(r, why)
  if r.status == "down" then return end
  remove_runner(self, r)
  if r.is_min then self.nmin = self.nmin - 1 end
  self.log.info("runner %s: shut down (%s)", r.id, why)
  self:stop_runner(r)
  call_hook(self, "on_shrink", { name = self.name, count = #self.runners, reason = why })
  r.shrink_reported = true
  self:grow_for_waiters()
end

-- Gives free slots to the oldest living waiters.
function Pool:serve()
  while #self.waiting > 0 do
    local r = self:pick()
    if not r then return end
    local w = table.remove(self.waiting, 1)
    self:take(r)
    if not w:set(true, r) then self:untake(r) self:idle_watch(r) end
  end
end

-- Boots one runner in a task of its own; callers wait for its slots.
function Pool:grow()
  self.booting = self.booting + 1
  self.nrunners = self.nrunners + 1
  local id = ("%s-%d"):format(self.name, self.nrunners)
  local is_min = self.nmin < self.opts.min    -- it keeps the pool at min: min rules
  if is_min then self.nmin = self.nmin + 1 end
  call_hook(self, "on_grow_start", { name = self.name, count = #self.runners + self.booting })
  self.log.info("runner %s booting", id)
  task.spawn(function()
    local counted = false                    -- booting comes back down whatever happens
    local guard <close> = setmetatable({}, { __close = function()
      if not counted then
        self.booting = self.booting - 1
        if is_min then self.nmin = self.nmin - 1 end
        self.log.error("runner %s: the boot failed in flame itself", id)
      end
    end })
    local runner = { id = id, pool = self, inflight = 0, calls = {}, status = "booting",
                     parents = {}, bytes = {}, sent = {}, is_min = is_min,
                     procs = {} }              -- processes its backend started, running
    function runner.done(r, call_id, status, payload) self:done(r, call_id, status, payload) end
    local settings = {
      max_concurrency = self.opts.max_concurrency, sandbox = sandbox_settings(self.opts.sandbox),
      boot_timeout = self.opts.boot_timeout, shutdown_timeout = self.opts.shutdown_timeout,
      pool = self.name, runner_id = id,
    }
    for k, v in pairs(self.opts.backend_opts or {}) do settings[k] = v end
    local host, err = backend.new(self.opts.backend, backend_server(self, runner))
    local term, made, inited
    local ok = host ~= nil
    if ok then
      runner.host = host
      ok, err = pcall(host.call, host, "init", settings)
      inited = ok
      if ok then
        local ok2, h, why = pcall(host.call, host, "remote_boot")
        ok, err = ok2, ok2 and why or h
        term = ok2 and type(h) == "table" and runner.handles[h.__flame_handle] or nil
        made = term
        if ok2 and h and not (term and term.submit) then
          ok, err, term = false, "remote_boot returned something that is not a terminator", nil
        end
        if term and runner.failed then          -- declared down while it booted
          ok, err, term = false, runner.failed, nil
        end
      end
    end
    counted = true
    self.booting = self.booting - 1
    if not ok or not term then
      local reason = tostring(err or "remote_boot returned nothing")
      self.log.error("runner %s failed to boot: %s", id, reason)
      call_hook(self, "on_grow_end", reason, { name = self.name, count = #self.runners })
      -- the callers this boot was for learn why: all of them when nothing else is up
      -- or booting, else as many as it would have served (the rest may get another)
      local n = #self.waiting
      if #self.runners > 0 or self.booting > 0 then n = math.min(n, slots(self)) end
      for _ = 1, n do
        local w = table.remove(self.waiting, 1)
        w:set(false, errors.new("boot", ("pool '%s': runner %s failed to boot: %s")
          :format(self.name, id, reason), { pool = self.name }))
      end
      runner.status = "down"
      if is_min then
        self.nmin = self.nmin - 1
        self.min_backoff = math.min((self.min_backoff or 500) * 2, 30000)
        loop:timer(self.min_backoff, function()  -- min is kept: try again, later
          if not self.closed and self.nmin < self.opts.min then self:grow() end
        end)
      end
      if self.hub_ then
        for _, ref in ipairs(runner.parents) do self.hub_:forget(ref) end
      end
      if made and made.close then made:close() end  -- connected, but the boot failed
      -- the backend releases what it made (a container, a process group) as after
      -- any runner; its requests still running are cancelled when its state closes
      if host and inited then self:release(runner, "boot failed: " .. reason)
      elseif host then host:close() end
      self:grow_for_waiters()
      return
    end
    runner.term, runner.status = term, "up"
    local idle = self.opts.idle_shutdown_after
    if term.configure and type(idle) == "table" then
      local ok2, err2 = pcall(term.configure, term, idle[2])
      if not ok2 then self.log.error("runner %s: idle check not sent: %s", id, tostring(err2)) end
    end
    if term.attach then                       -- a remote runner: its events
      term:attach(function(kind, a, b, c)
        if kind == "result" then self:done(runner, a, b, c)
        elseif kind == "remote_shutdown" then
          -- it takes no more calls; calls on their way get "shutdown" and are retried
          -- elsewhere; it leaves the pool when its link closes
          runner.status = "draining"
          runner.leaving = "runner shut down: " .. tostring(a)
          call_hook(self, "on_shrink", { name = self.name, count = #self.runners - 1,
                                          reason = runner.leaving })
          runner.shrink_reported = true
        elseif kind == "lost" then
          runner.status = runner.status == "up" and "lost" or runner.status
          -- a process exit usually says more than a closed socket: let the
          -- backend's handle_info speak first, briefly
          if runner.leaving then
            self:runner_down(runner, runner.leaving, true)
          else
            local reason = "lost the link to the runner: " .. tostring(a)
            -- the backend hears of it too: it may know more (an exit, a node gone)
            self:info(runner, { event = "link_lost", reason = reason })
            loop:timer(LOST_GRACE, function() self:runner_down(runner, reason) end)
          end
        end
      end)
    end
    if self.closed then
      self:stop_runner(runner)
      return
    end
    runner.remote = term.attach ~= nil
    if is_min then self.min_backoff = nil end
    self.runners[#self.runners + 1] = runner
    self.log.info("runner %s up", id)
    call_hook(self, "on_grow_end", "ok", { name = self.name, count = #self.runners })
    self:serve()
    self:idle_watch(runner)
  end)
end

local function busy_count(pool)
  local b = 0
  for _, r in ipairs(pool.runners) do b = b + r.inflight end
  return b
end

-- The backend releases what the runner held (remote_shutdown, an optional callback
-- of flame's own: kill the process, remove the container), then its state closes.
function Pool:release(r, reason)
  if r.released then return end
  r.released = true
  self.ending[r] = true                        -- a shutdown waits for it to end
  local host = r.host
  if not host then
    r.release_done = true
    self:ended_check(r)
    return
  end
  task.spawn(function()
    local ok, err = pcall(host.call, host, "remote_shutdown", reason)
    if not ok then self.log.error("runner %s: remote_shutdown failed: %s", r.id, tostring(err)) end
    r.release_done = true
    self:ended_check(r)
    -- the state lives on a while: the backend may still hear of the runner (a
    -- process exit, its own reap timer); then it is closed
    local st = self.opts.shutdown_timeout
    local linger = (st == math.huge and 5000 or st + 1000) + 5000  -- after its reap timer
    loop:timer(linger, function()
      host:close()
      local live = r.http_live
      r.http_live = nil                         -- watches report no more
      for req in pairs(live or {}) do req:cancel() end
    end)
  end)
end

-- A runner has ended when its backend has released it (remote_shutdown returned:
-- the container removed, say) and every process its backend started has exited.
local function ended(r)
  return r.release_done and next(r.procs) == nil
end

-- Once r has ended: out of the pool's ending set, and a shutdown waiting for it
-- (await_ended) is told.
function Pool:ended_check(r)
  if not ended(r) then return end
  self.ending[r] = nil
  if r.ended then r.ended:set(true) end
end

-- Waits, until deadline (task.now() ms), for the runners to end; returns the ids of
-- those still running then.
function Pool:await_ended(runners, deadline)
  local left = {}
  for _, r in ipairs(runners) do
    if not ended(r) then
      r.ended = r.ended or task.future()
      local timer = loop:timer(math.max(0, deadline - task.now()), function() r.ended:set(false) end)
      local ok = r.ended:wait()
      timer:stop()
      if not ok then left[#left + 1] = r.id end
    end
  end
  return left
end

function Pool:stop_runner(r)
  r.status = "down"
  if r.term and r.term.shutdown then r.term:shutdown() end
  if r.term and r.term.close then r.term:close() end
  for id, f in pairs(r.calls) do                -- calls the runner can no longer answer
    r.calls[id] = nil
    f:set("k", nil, "shutdown")
  end
  self:release(r, "shutdown")
end


--- A runner went away: its callers get runner_down, it leaves the pool, and the
-- backend releases it. `quiet`: it said goodbye (idle shutdown), not a failure.
function Pool:runner_down(r, reason, quiet)
  if r.status == "down" then return end
  r.status = "down"
  remove_runner(self, r)
  if quiet then self.log.info("runner %s: %s", r.id, reason)
  else self.log.warn("runner %s down: %s", r.id, reason) end
  if r.term and r.term.close then r.term:close(reason) end
  for id, f in pairs(r.calls) do
    r.calls[id] = nil
    r.inflight = r.inflight - 1
    f:set("k", nil, "down", reason)
  end
  if not r.shrink_reported then
    call_hook(self, "on_shrink", { name = self.name, count = #self.runners, reason = reason })
  end
  self:release(r, reason)
  if self.drained and busy_count(self) == 0 then self.drained:set() end
  if r.is_min then
    self.nmin = self.nmin - 1
    if not quiet and not self.closed then   -- a min runner that died is replaced
      self.log.info("replacing min runner %s", r.id)
      self:grow()
      return
    end
  end
  self:grow_for_waiters()
end

-- A message for the backend (a process exit, a send_after): its handle_info decides,
-- in a task (it may wait).
function Pool:info(r, msg)
  local host = r.host
  if not host then return end
  task.spawn(function()
    local ok, alive, reason = pcall(host.call, host, "handle_info", msg)
    if r.status == "down" then return end    -- already gone: only the backend cared
    if ok and alive then return end
    reason = tostring(ok and (reason or "the backend reported the runner down") or alive)
    if r.status == "booting" then
      r.failed = reason                      -- the boot fails with it
      if r.awaiting and self.hub_ then self.hub_:fail(r.awaiting, reason) end
    else
      self:runner_down(r, reason)
    end
  end)
end

-- Boots for callers still waiting when no runner is up or booting for them.
function Pool:grow_for_waiters()
  if self.closed or #self.waiting == 0 then return end
  if #self.runners + self.booting < self.opts.max
     and self.booting * slots(self) <= #self.waiting then
    self:grow()
  end
end

-- A call ended on runner r: free its slot, wake its caller.
function Pool:done(r, call_id, status, payload)
  local f = r.calls[call_id]
  if f == nil then return end               -- not ours, or answered already
  r.calls[call_id] = nil
  r.inflight = r.inflight - 1
  if f then f:set(status, payload) end
  if self.drained and busy_count(self) == 0 then self.drained:set() end
  if self.opts.single_use and r.inflight == 0 and r.status == "up" then
    self:shrink(r, "single use")
    return
  end
  self:serve()
  self:idle_watch(r)
end

-- Waits for a slot until the deadline; returns the runner.
function Pool:checkout(deadline)
  if self.closed then
    errors.raise("shutdown", ("pool '%s' is shut down"):format(self.name), { pool = self.name })
  end
  local r = self:pick()
  if r then
    self:take(r)
    return r
  end
  if #self.runners + self.booting < self.opts.max
     and self.booting * slots(self) <= #self.waiting then
    self:grow()
  end
  local w = task.future()
  self.waiting[#self.waiting + 1] = w
  local function leave_queue()
    for i, x in ipairs(self.waiting) do
      if x == w then table.remove(self.waiting, i) return end
    end
  end
  local timer
  if deadline < math.huge then
    timer = loop:timer(math.max(0, deadline - task.now()), function()
      local phase = self.booting > 0 and "boot" or "queue"
      if w:set(false, errors.new("timeout", ("call on pool '%s' found no free runner "
          .. "within its timeout"):format(self.name), { phase = phase, pool = self.name })) then
        leave_queue()
      end
    end)
  end
  -- a caller cancelled while waiting leaves the queue, and gives back a slot it
  -- was granted but never used
  local used = false
  local guard <close> = setmetatable({}, { __close = function()
    if timer then timer:stop() end
    if used then return end
    if w:set(false, errors.new("shutdown", "cancelled while waiting")) then
      leave_queue()
    elseif w.values[1] == true then
      local granted = w.values[2]
      self:untake(granted)
      self:serve()
      self:idle_watch(granted)
    end
  end })
  local ok, v = w:wait()
  used = true
  if not ok then error(v, 0) end
  return v
end

local function decode_values(payload)
  return core.decode(payload)
end

-- The results decode gave, passed on as they came (no table for them).
local function results(pool, ok, ...)
  if not ok then
    errors.raise("decode", ("pool '%s': a result could not be decoded: %s")
      :format(pool.name, (...)), { pool = pool.name })
  end
  return ...
end

-- Turns a runner's answer into results, or raises.
local function outcome(pool, status, payload)
  if status == "r" then return results(pool, decode_values(payload)) end
  local ok, msg, tb, value = false, "not enough memory", "", nil
  if payload then ok, msg, tb, value = decode_values(payload) end
  if not ok then msg = "the runner's answer could not be decoded: " .. tostring(msg) end
  if status == "e" then
    errors.raise("remote", msg, { traceback = tb, value = value, pool = pool.name })
  elseif status == "k" then
    if msg == "timeout" then
      errors.raise("timeout", ("call on pool '%s' ran past its timeout"):format(pool.name),
        { phase = "run", pool = pool.name })
    end
    errors.raise("shutdown", ("call on pool '%s' was stopped (%s)"):format(pool.name, msg),
      { pool = pool.name })
  elseif status == "c" then
    errors.raise("encode", msg, { pool = pool.name })
  elseif status == "d" then
    errors.raise("decode", msg, { pool = pool.name })
  end
  errors.raise("remote", "unknown answer from the runner", { pool = pool.name })
end

local NO_OPTIONS = {}                 -- flame.call without options: nothing to check
local ENCODE_WORK = { name = "work", buffer = true, head = SPAWN_HEADER }

local function check_work(work, level)
  if type(work) == "function" then return end
  if type(work) == "table" then
    if type(work[1]) ~= "string" or type(work[2]) ~= "string"
       or (work[3] ~= nil and type(work[3]) ~= "table") then
      invalid("flame.call: work must be a function or { module, function, args } "
        .. "(two strings and an optional table)", level + 1)
    end
    return
  end
  invalid("flame.call: work must be a function or { module, function, args }, got "
    .. type(work), level + 1)
end

-- A caller that goes away (its task cancelled) takes linked work with it; before
-- the work was sent, it just gives the slot back. One metatable for every call's
-- guard: { pool, runner, call id, future, link }.
local ATTEMPT_GUARD = { __close = function(g)
  local self, r, id, f, link = g[1], g[2], g[3], g[4], g[5]
  if f.done then return end
  f:set("k", nil)
  if not r.sent[id] then
    r.calls[id] = nil
    self:untake(r)
    self:serve()
    self:idle_watch(r)
  elseif link and r.status ~= "down" then
    pcall(r.term.kill, r.term, id, "cancelled")
  end
end }

-- One try of a call: a slot, the work sent, its answer (or why there is none).
function Pool:attempt(bytes, deadline, link, work, code)
  local asked = self.queue_waits and core.hrtime()
  local r = self:checkout(deadline)
  if asked then                              -- a benchmark asked for queue waits
    self.queue_waits[#self.queue_waits + 1] = (core.hrtime() - asked) / 1e6
  end
  if self.closed then                        -- stopped while the slot was on its way
    self:untake(r)
    errors.raise("shutdown", ("pool '%s' is shut down"):format(self.name), { pool = self.name })
  end
  if r.status ~= "up" then                   -- lost or leaving before the work was sent:
    self:untake(r)                            -- nothing ran, another runner may take it
    return "unsent", nil, nil, ("runner %s was %s before the call was sent")
      :format(r.id, r.status == "draining" and "shutting down" or "gone"), r
  end
  if r.code ~= code then                     -- code_sync: a runner booted with other code
    local how = r.code and r.code.how or ENCODE_WORK  -- names only modules it has
    local ok, b, err = pcall(core.encode, how, work)
    if not (ok and b) then
      self:untake(r)
      errors.raise("encode", tostring(ok and err or b), { pool = self.name })
    end
    bytes = b
  end
  next_call = next_call + 1
  local id = next_call
  local f = task.future()
  r.calls[id] = f
  self.calls = self.calls + 1
  self.peak = math.max(self.peak, busy_count(self))
  -- a caller that goes away (its task cancelled) takes linked work with it; before
  -- the work was sent, it just gives the slot back
  local guard <close> = setmetatable({ self, r, id, f, link }, ATTEMPT_GUARD)
  local ok, e
  if self.direct then
    ok, e = pcall(r.term.submit, r.term, id, bytes, math.max(1, deadline - task.now()), link)
    if ok then r.sent[id] = true end
  else
    r.bytes[id] = bytes
    ok, e = pcall(r.host.call, r.host, "remote_spawn_monitor",
      { id = id, link = link, timeout = math.max(1, deadline - task.now()) })
    r.bytes[id] = nil
  end
  if ok and not r.sent[id] then
    ok, e = false, r.send_error or "the backend did not send the call"
  end
  if not ok then
    f:set("k", nil)                           -- answered: the guard leaves the slot to us
    r.calls[id] = nil
    self:untake(r)
    local reason = ("runner %s could not take the call: %s"):format(r.id, tostring(e))
    self:runner_down(r, reason)               -- a runner that cannot take calls is gone
    return "unsent", nil, nil, reason, r      -- and the call was not sent: retried
  end
  local timer
  if deadline < math.huge then
    timer = loop:timer(math.max(0, deadline - task.now()), function()
      if f:set("k", nil, "timeout") and r.status ~= "down" then
        pcall(r.term.kill, r.term, id, "timeout")
      end
    end)
  end
  local status, payload, why, detail = f:wait()
  if timer then timer:stop() end
  r.sent[id] = nil
  return status, payload, why, detail, r
end

--- Runs work on a runner of the pool and returns its results (see flame.call).
function Pool:call(work, opts, level)
  level = level or 2
  if getmetatable(self) ~= Pool then invalid("flame.call: a pool expected", level) end
  check_work(work, level)
  local o = opts == nil and NO_OPTIONS or check_options("flame.call", opts, CALL_OPTIONS, level)
  if self.closed then
    errors.raise("shutdown", ("pool '%s' is shut down"):format(self.name), { pool = self.name })
  end
  local timeout = o.timeout or self.opts.timeout
  local deadline = task.now() + timeout
  -- encoded once, into C's memory with room in front for SPAWN's header: the bytes
  -- go to the runner's socket (or a local worker) as they are, copied by no one
  local code = self.code
  local how = code and code.how or ENCODE_WORK
  local bytes, err = core.encode(how, work)
  if not bytes then errors.raise("encode", err, { pool = self.name }) end

  local status, payload, why, detail, r, killed
  for try = 1, 3 do
    -- a try after the first sends a fresh copy: the last one went to a runner
    if try > 1 then
      bytes, err = core.encode(how, work)
      if not bytes then errors.raise("encode", err, { pool = self.name }) end
    end
    status, payload, why, detail, r = self:attempt(bytes, deadline, o.link ~= false, work, code)
    -- a runner found gone before the work was sent, or going away when the call
    -- reached it (it refused the call unstarted): the call goes to another runner,
    -- within the same deadline
    killed = status == "k" and why == nil and payload and select(2, core.decode(payload))
    if status ~= "unsent" and not (killed == "shutdown" and r.leaving) then break end
  end
  if status == "unsent" then
    errors.raise("runner_down", ("pool '%s': %s, three times"):format(self.name, detail),
      { pool = self.name, runner = r.id })
  end
  -- the runner's own deadline may fire a moment before ours: the same error
  if killed == "timeout" then why = "timeout" end
  if why == "down" then
    errors.raise("runner_down", ("pool '%s': runner %s went away during the call: %s")
      :format(self.name, r.id, tostring(detail)), { pool = self.name, runner = r.id })
  end
  if why == "timeout" then
    errors.raise("timeout", ("call on pool '%s' ran past its timeout of %s ms")
      :format(self.name, tostring(timeout)), { phase = "run", pool = self.name })
  elseif why == "shutdown" then
    errors.raise("shutdown", ("pool '%s' shut down before the call ended"):format(self.name),
      { pool = self.name })
  end
  return outcome(self, status, payload)
end

--- Statistics: runners up, pending (booting), busy (calls running), waiting callers.
function Pool:stats()
  local busy, workers, peak_running = 0, 0, 0
  for _, r in ipairs(self.runners) do
    busy = busy + r.inflight
    if r.term and r.term.stats then
      local s = r.term:stats()
      workers = workers + s.workers
      peak_running = math.max(peak_running, s.peak)
    end
  end
  return {
    name = self.name, runners = #self.runners, pending = self.booting, busy = busy,
    waiting = #self.waiting, max = self.opts.max, min = self.opts.min,
    max_concurrency = self.opts.max_concurrency, calls = self.calls, peak_busy = self.peak,
    workers = workers, peak_running = peak_running,
  }
end

--- Stops the pool: queued callers get `shutdown`, running calls get up to
-- shutdown_timeout to finish, then are killed; runners stop.
function Pool:shutdown()
  if self.stopping then return end
  self.stopping = true
  self.closed = true
  pools[self.name] = nil
  for _, w in ipairs(self.waiting) do
    w:set(false, errors.new("shutdown", ("pool '%s' is shutting down"):format(self.name),
      { pool = self.name }))
  end
  self.waiting = {}
  -- whatever happens while draining (the caller cancelled, a wait refused), the
  -- runners are stopped
  local stopped
  local function stop_all()
    stopped = self.runners
    self.runners = {}
    for _, r in ipairs(stopped) do
      for id in pairs(r.calls) do pcall(r.term.kill, r.term, id, "shutdown") end
      self:stop_runner(r)
    end
  end
  local finish <close> = setmetatable({}, { __close = function()
    if not stopped then stop_all() end
    if self.hub_ then self.hub_:close() end
  end })
  if busy_count(self) > 0 and self.opts.shutdown_timeout > 0 then
    -- set when the last call ends (Pool:done) or at the timeout
    self.drained = task.future()
    local timer
    if self.opts.shutdown_timeout < math.huge then
      timer = loop:timer(self.opts.shutdown_timeout, function() self.drained:set() end)
    end
    self.drained:wait()
    if timer then timer:stop() end
  end
  stop_all()
  -- returns once every runner has ended (processes gone, containers removed): a
  -- runner told to stop exits by itself; the backend's reap (shutdown_timeout + 1 s
  -- for processes) bounds a runner that does not
  local st = self.opts.shutdown_timeout
  local bound = (st == math.huge and 5000 or st + 1000) + 5000
  -- the runners just stopped, and those lost or idled down before and still ending
  local all = {}
  for r in pairs(self.ending) do all[#all + 1] = r end
  local left = self:await_ended(all, task.now() + bound)
  if #left > 0 then
    self.log.warn("pool shut down; runners still ending after %d ms: %s", bound,
      table.concat(left, ", "))
  else
    self.log.info("pool shut down")
  end
end

--- Names of pools not yet shut down (the specs check that none is left behind).
function M.live()
  local names = {}
  for name in pairs(pools) do names[#names + 1] = name end
  table.sort(names)
  return names
end

M.Pool = Pool
return M
