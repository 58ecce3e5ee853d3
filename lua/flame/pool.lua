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
local remote = require "flame.remote"
local backend = require "flame.backend"

local M = {}

local loop = task.loop
local pools = {}                 -- name -> pool, for uniqueness within the process
local LOST_GRACE = 100           -- ms a backend has to explain a lost link
local SPAWN_HEADER = core.SPAWN_HEADER  -- SPAWN's deadline and link flag, before the work
local ENCODE_WORK = { name = "work", buffer = true, head = SPAWN_HEADER }
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

-- A local runner's terminator: an executor the runtime side owns (core/pool.c).
local LocalTerm = {}
LocalTerm.__index = LocalTerm

function LocalTerm:stats()
  return not self.closed and self.engine:local_stats(self.tid) or { workers = 0, peak = 0 }
end

function LocalTerm:close()
  if self.closed then return end
  self.closed = true
  self.engine:local_close(self.tid)
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

-- What the runtime side boots this pool's runners with (core/bsvc_link.c serves
-- the backend environment's parent_new, await_remote_up, local_terminator,
-- spawn_monitor, flame_bin and code_paths from it): told before each boot, as
-- where this program finds its modules may have changed (a lib/ put on
-- package.path at run time: a runner on this machine finds the same ones).
local function boot_config(pool)
  local o, hub = pool.opts, pool.hub_
  local function ms(v) return v == math.huge and -1 or v end
  local idle = type(o.idle_shutdown_after) == "table" and o.idle_shutdown_after[1]
    or o.idle_shutdown_after
  return {
    backend = type(o.backend) == "string" and o.backend or nil,
    addrs = hub.addrs or {},
    settings = {
      max_concurrency = o.max_concurrency, shutdown_timeout = ms(o.shutdown_timeout),
      failsafe_timeout = ms(o.boot_timeout),
      -- the check comes in CONFIG after REMOTE_UP: the runner must not idle before
      idle_check = type(o.idle_shutdown_after) == "table" or nil,
      heartbeat_interval = hub.opts.heartbeat_interval,
      heartbeat_misses = hub.opts.heartbeat_misses,
      sandbox = sandbox_settings(o.sandbox),
    },
    idle = ms(idle), min_idle = ms(o.min_idle_shutdown_after),
    boot_timeout = o.boot_timeout,
    code_sync = (o.code_sync and o.backend ~= "local") or nil,
    flame_bin = flame_bin(),
    code_paths = { path = package.path, cpath = package.cpath, cwd = core.cwd() },
  }
end

--- The pool's hub: the pool's object on the runtime thread (core/hub.c and
-- core/pool.c: its links, slots, queue and calls), made with the pool.
function Pool:hub()
  if self.hub_ then return self.hub_ end
  local l = self.opts.link
  local h, err = remote.hub {
    bind = l.bind, port = l.port, advertise = l.advertise,
    heartbeat_interval = l.heartbeat_interval or 1000,
    heartbeat_misses = l.heartbeat_misses or 3, log = self.log,
    -- a pool of local runners has no link to listen for
    listen = self.opts.backend ~= "local",
    on_pool = function(kind, ...) self:event(kind, ...) end,
  }
  if not h then return nil, err end
  self.hub_ = h
  self.engine = h.c
  return h
end

local function call_hook(pool, name, ...)
  local fn = pool.opts[name]
  if fn then
    local ok, err = pcall(fn, ...)
    if not ok then pool.log.error("%s callback failed: %s", name, tostring(err)) end
  end
end

-- Calls one runner takes at once: 1 for single-use runners.
local function slots(pool)
  return pool.opts.single_use and 1 or pool.opts.max_concurrency
end

local function ms_or_never(v)
  return v == math.huge and -1 or v
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
    name = o.name, opts = o,
    runners = {}, by_tid = {}, pending = {}, hows = {}, code_gen = 0,
    ending = {}, log = logmod.new(o.log, o.name), config = {}, closed = false, hosts = {},
    booting = {},
    nrunners = 0,
  }, Pool)
  local _, err = pool:hub()
  if err then invalid("flame.pool: " .. err, 2) end
  if code then pool:code_ready(code) end
  pools[o.name] = pool
  local idle = o.idle_shutdown_after
  -- the rules run on the runtime thread (core/pool.c); it asks for boots by events
  pool.engine:configure {
    name = o.name, max = o.max, min = o.min, slots = slots(pool), single_use = o.single_use,
    -- a backend that leaves remote_spawn_monitor out gets the default, done there:
    -- the call goes to the runner without entering the backend state
    direct = type(mod.remote_spawn_monitor) ~= "function",
    idle_ms = ms_or_never(type(idle) == "table" and idle[1] or idle),
    min_idle_ms = ms_or_never(o.min_idle_shutdown_after),
    idle_check = type(idle) == "table",
  }
  return pool
end

local function remove_runner(pool, r)
  for i, x in ipairs(pool.runners) do
    if x == r then table.remove(pool.runners, i) return true end
  end
  return false
end

-- code_sync: the pack runners booted from now get, and how calls are encoded for
-- them (the modules it holds travel by name).
function Pool:code_ready(code)
  if code ~= self.code then
    self.code_gen = self.code_gen + 1
    code.gen = self.code_gen
    code.how = { name = "work", buffer = true, head = SPAWN_HEADER, synced = code.synced }
    self.hows[code.gen] = code.how
    self.engine:boot_code(code.gen, code.pack, code.raw, code.hash)  -- runners from now get it
    self.log.info("code_sync: %d files, %d bytes, sha256 %s", code.files, code.bytes,
      code.hash:sub(1, 12))
  end
  self.code = code
end

-- What the runtime side tells (core/pool.c's events).
local EVENTS = {}

function EVENTS.done(self, id, status, payload, leaving)
  local f = self.pending[id]
  if f then
    self.pending[id] = nil
    f:set("done", status, payload, leaving)
  end
end

function EVENTS.fail(self, id, why, detail, phase, name)
  local f = self.pending[id]
  if f then
    self.pending[id] = nil
    f:set("fail", why, detail, phase, name)
  end
end

function EVENTS.grow(self, boot, is_min, count)
  if self.closed then                        -- asked for just before the shutdown
    self.engine:boot_failed(boot, ("pool '%s' is shutting down"):format(self.name))
    return
  end
  self:boot(boot, is_min, count)
end

function EVENTS.shrink(self, tid, why, count)
  local r = self.by_tid[tid]
  if r then self:shrunk(r, why, count) end
end

function EVENTS.runner_failed(self, tid, why)
  local r = self.by_tid[tid]
  if r then self:runner_down(r, why) end
end

function EVENTS.idle(self, tid)
  local check = self.opts.idle_shutdown_after[2]
  task.spawn(function()                      -- the check may wait: it runs in a task
    local ok, ready = pcall(check)
    self.engine:idle_answer(tid, ok and ready and true or false)
  end)
end

-- code_sync: a runner booted with other code; encoded again for it.
function EVENTS.reencode(self, id, gen, tid)
  local f = self.pending[id]
  if not f or not f.work then
    self.engine:cancel(id)
    return
  end
  local how = self.hows[gen] or ENCODE_WORK
  local ok, b, err = pcall(core.encode, how, f.work)
  if ok and b then
    self.engine:reencoded(id, tid, b)
    return
  end
  self.pending[id] = nil
  self.engine:cancel(id)
  f:set("fail", "encode", tostring(ok and err or b))
end

-- A backend callback's end, and what its services tell (core/backend.c).
function EVENTS.bdone(self, id, co, status, ...)
  local host = self.hosts[id]
  if host then host:done(co, status, ...) end
end

function EVENTS.binfo(self, id, msg)
  local host = self.hosts[id]
  if host then host:info(msg) end
end

function EVENTS.blog(self, id, level, line)
  local host = self.hosts[id]
  if host then host:log(level, line)
  else
    local log = self.log[level] or self.log.info
    log("%s", line)
  end
end

function EVENTS.bprocs(self, id, n)
  local host = self.hosts[id]
  if host then host:procs(n) end
end

function EVENTS.drained(self)
  if self.drained then self.drained:set() end
end

function Pool:event(kind, ...)
  local fn = EVENTS[kind]
  if fn then fn(self, ...) end
end

-- The terminator a backend's remote_boot returned (a handle of its state): a local
-- runner's executor, or a remote runner's link (the hub heard of it first), or nil.
function Pool:terminator(host, h, runner)
  if math.type(h.__flame_handle) ~= "integer" then return nil end
  local tid, is_local, code = self.engine:bk_term(host.id, h.__flame_handle)
  if not tid then return nil end
  runner.code = code ~= 0 and code or nil
  if is_local then return setmetatable({ engine = self.engine, tid = tid }, LocalTerm) end
  return self.hub_.terms[tid]
end

-- Boots one runner in a task of its own, for the runtime side's grow; tells it the
-- end (boot_up or boot_failed).
function Pool:boot(boot_no, is_min, count)
  self.nrunners = self.nrunners + 1
  local id = ("%s-%d"):format(self.name, self.nrunners)
  call_hook(self, "on_grow_start", { name = self.name, count = count })
  self.log.info("runner %s booting", id)
  local engine = self.engine
  task.spawn(function()
    local runner = { id = id, pool = self, status = "booting", is_min = is_min,
                     nprocs = 0 }             -- processes its backend started, running
    self.booting[runner] = true              -- a shutdown fails it and waits for its end
    local told = false                       -- the runtime side hears the end, whatever happens
    local guard <close> = setmetatable({}, { __close = function()
      self.booting[runner] = nil
      if runner.boot_end then runner.boot_end:set() end
      if not told then
        engine:boot_failed(boot_no, ("pool '%s': runner %s failed to boot: the boot failed "
          .. "in flame itself"):format(self.name, id))
        self.log.error("runner %s: the boot failed in flame itself", id)
      end
    end })
    local settings = {
      max_concurrency = self.opts.max_concurrency, sandbox = sandbox_settings(self.opts.sandbox),
      boot_timeout = self.opts.boot_timeout, shutdown_timeout = self.opts.shutdown_timeout,
      pool = self.name, runner_id = id,
    }
    for k, v in pairs(self.opts.backend_opts or {}) do settings[k] = v end
    local host, err
    if self.opts.code_sync and self.opts.backend ~= "local" then
      -- what to ship, now: modules loaded since the last boot are in it
      local code, why = code_sync.pack(self.opts.code_sync, self.code)
      if code then self:code_ready(code) else err = why end
    end
    if not err then
      self.engine:boot_config(boot_config(self))
      host, err = backend.new(self.engine, self.opts.backend, self.hosts, {
        runner = id, is_min = is_min,
        info = function(msg) self:info(runner, msg) end,
        log = function(level, line)
          local log = self.log[level] or self.log.info
          log("%s", line)
        end,
        procs = function(n)               -- a shutdown waits for them to go
          runner.nprocs = n
          self:ended_check(runner)
        end,
      })
    end
    local term, made, inited
    local ok = host ~= nil
    if ok then
      runner.host = host
      ok, err = pcall(host.call, host, "init", settings)
      inited = ok
      if ok then
        local ok2, h, why = pcall(host.call, host, "remote_boot")
        ok, err = ok2, ok2 and why or h
        term = ok2 and type(h) == "table" and self:terminator(host, h, runner) or nil
        made = term
        if ok2 and h and not term then
          ok, err, term = false, "remote_boot returned something that is not a terminator", nil
        end
        if term and runner.failed then          -- declared down while it booted
          ok, err, term = false, runner.failed, nil
        end
      end
    end
    if not ok or not term then
      local reason = tostring(err or "remote_boot returned nothing")
      self.log.error("runner %s failed to boot: %s", id, reason)
      told = true
      engine:boot_failed(boot_no, ("pool '%s': runner %s failed to boot: %s")
        :format(self.name, id, reason))
      call_hook(self, "on_grow_end", reason, { name = self.name, count = #self.runners })
      runner.status = "down"
      -- a runner of this boot that connects later is refused
      if host then pcall(self.engine.bk_fail, self.engine, host.id, reason) end
      if made and made.close then made:close() end  -- connected, but the boot failed
      -- the backend releases what it made (a container, a process group) as after
      -- any runner; its requests still running are cancelled when its state closes
      if host and inited then self:release(runner, "boot failed: " .. reason)
      elseif host then host:close() end
      return
    end
    runner.term, runner.tid = term, term.tid
    local idle = self.opts.idle_shutdown_after
    if term.configure and type(idle) == "table" then
      local ok2, err2 = pcall(term.configure, term, idle[2])
      if not ok2 then self.log.error("runner %s: idle check not sent: %s", id, tostring(err2)) end
    end
    self.by_tid[runner.tid] = runner
    runner.status = "up"
    told = true
    local n = engine:boot_up(boot_no, runner.tid, runner.code or 0, id, host.id)
    if not n then                              -- the pool closed meanwhile
      self.by_tid[runner.tid] = nil
      self:stop_runner(runner)
      return
    end
    self.runners[#self.runners + 1] = runner
    -- its link's events after boot_up: a loss that came meanwhile (kept by the
    -- terminator until attached) then takes it out of the runtime side's pool too
    if term.attach then                       -- a remote runner: its events
      term:attach(function(kind, a)
        if kind == "remote_shutdown" then
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
    self.log.info("runner %s up", id)
    call_hook(self, "on_grow_end", "ok", { name = self.name, count = n })
  end)
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
    -- (closing it ends its requests, timers and watches: nothing outlives it)
    loop:timer(linger, function() host:close() end)
  end)
end

-- A runner has ended when its backend has released it (remote_shutdown returned:
-- the container removed, say) and every process its backend started has exited.
local function ended(r)
  return r.release_done and (r.nprocs or 0) == 0
end

-- Once r has ended: out of the pool's ending set, and a shutdown waiting for it
-- (await_ended) is told.
function Pool:ended_check(r)
  if not ended(r) then return end
  self.ending[r] = nil
  if r.tid and self.by_tid[r.tid] == r then self.by_tid[r.tid] = nil end
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

-- Stops a runner the runtime side has let go of: its terminator told, its backend
-- releases it.
function Pool:stop_runner(r)
  r.status = "down"
  if r.term and r.term.shutdown then r.term:shutdown() end
  if r.term and r.term.close then r.term:close() end
  self:release(r, "shutdown")
end

-- The runtime side took r out (idle, single use): stopped, not replaced.
function Pool:shrunk(r, why, count)
  if r.status == "down" then return end
  remove_runner(self, r)
  self.log.info("runner %s: shut down (%s)", r.id, why)
  self:stop_runner(r)
  call_hook(self, "on_shrink", { name = self.name, count = count, reason = why })
  r.shrink_reported = true
end

--- A runner went away: its callers get runner_down (on the runtime side, all at
-- once), it leaves the pool, and the backend releases it. `quiet`: it said goodbye
-- (idle shutdown), not a failure.
function Pool:runner_down(r, reason, quiet)
  if r.status == "down" then return end
  r.status = "down"
  remove_runner(self, r)
  if quiet then self.log.info("runner %s: %s", r.id, reason)
  else self.log.warn("runner %s down: %s", r.id, reason) end
  if r.term and r.term.close then r.term:close(reason) end
  local count = #self.runners
  if r.tid then count = self.engine:runner_down(r.tid, reason, quiet) end
  if not r.shrink_reported then
    call_hook(self, "on_shrink", { name = self.name, count = count, reason = reason })
  end
  self:release(r, reason)
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
      pcall(self.engine.bk_fail, self.engine, host.id, reason)
    else
      self:runner_down(r, reason)
    end
  end)
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
  if status == "r" then return results(pool, core.decode(payload)) end
  local ok, msg, tb, value = false, "not enough memory", "", nil
  if payload then ok, msg, tb, value = core.decode(payload) end
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

-- A call that ended without an answer, as the caller's error.
local function failed(pool, why, detail, phase, runner, timeout)
  local name = pool.name
  if why == "timeout" then
    if phase then
      errors.raise("timeout", ("call on pool '%s' found no free runner within its timeout")
        :format(name), { phase = phase, pool = name })
    end
    errors.raise("timeout", ("call on pool '%s' ran past its timeout of %s ms")
      :format(name, tostring(timeout)), { phase = "run", pool = name })
  elseif why == "down" then
    errors.raise("runner_down", ("pool '%s': runner %s went away during the call: %s")
      :format(name, runner, tostring(detail)), { pool = name, runner = runner })
  elseif why == "boot" then
    errors.raise("boot", detail, { pool = name })
  elseif why == "unsent" then
    errors.raise("runner_down", ("pool '%s': %s, three times"):format(name, tostring(detail)),
      { pool = name, runner = runner })
  elseif why == "encode" then
    errors.raise("encode", detail, { pool = name })
  elseif detail == "closing" then
    errors.raise("shutdown", ("pool '%s' is shutting down"):format(name), { pool = name })
  elseif detail == "stopped" then
    errors.raise("shutdown", ("pool '%s' shut down before the call ended"):format(name),
      { pool = name })
  end
  errors.raise("shutdown", ("pool '%s' is shut down"):format(name), { pool = name })
end

local NO_OPTIONS = {}                 -- flame.call without options: nothing to check

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

-- A caller that goes away (its task cancelled) takes linked work with it; queued,
-- it just leaves the queue. One metatable for every call's guard: { pool, id, future }.
local CALL_GUARD = { __close = function(g)
  local self, id, f = g[1], g[2], g[3]
  if f.done then return end
  f:set("cancelled")
  self.pending[id] = nil
  self.engine:cancel(id)
end }

-- One try: the work to the runtime side, its answer back.
local function attempt(self, id, bytes, deadline, link, code, work)
  local f = task.future()
  if code then f.work = work end              -- code_sync: a runner may need it again
  self.pending[id] = f
  self.engine:call(id, bytes, deadline - task.now(), link, code and code.gen or 0)
  local guard <close> = setmetatable({ self, id, f }, CALL_GUARD)
  return f:wait()
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
  local kind, status, payload, leaving, detail, killed
  for _ = 1, 3 do
    local bytes, err = core.encode(how, work)
    if not bytes then errors.raise("encode", err, { pool = self.name }) end
    next_call = next_call + 1
    kind, status, payload, leaving, detail = attempt(self, next_call, bytes, deadline,
      o.link ~= false, code, work)
    if kind ~= "done" then
      return failed(self, status, payload, leaving, detail, timeout)
    end
    -- a runner going away when the call reached it refused it unstarted: the call
    -- goes to another runner, within the same deadline
    killed = status == "k" and payload and select(2, core.decode(payload))
    if not (killed == "shutdown" and leaving) then break end
  end
  -- the runner's own deadline may fire a moment before ours: the same error
  if killed == "timeout" then
    errors.raise("timeout", ("call on pool '%s' ran past its timeout of %s ms")
      :format(self.name, tostring(timeout)), { phase = "run", pool = self.name })
  end
  return outcome(self, status, payload)
end

--- Statistics: runners up, pending (booting), busy (calls running), waiting callers.
function Pool:stats()
  local s = self.closed and not self.engine and {} or self.engine:pool_stats()
  return {
    name = self.name, runners = s.runners or 0, pending = s.pending or 0, busy = s.busy or 0,
    waiting = s.waiting or 0, max = self.opts.max, min = self.opts.min,
    max_concurrency = self.opts.max_concurrency, calls = s.calls or 0,
    peak_busy = s.peak_busy or 0, workers = s.workers or 0, peak_running = s.peak_running or 0,
  }
end

--- Stops the pool: queued callers get `shutdown`, running calls get up to
-- shutdown_timeout to finish, then are killed; runners stop.
function Pool:shutdown()
  if self.stopping then return end
  self.stopping = true
  self.closed = true
  pools[self.name] = nil
  local busy = self.engine:close_pool()         -- queued callers are told now
  -- whatever happens while draining (the caller cancelled, a wait refused), the
  -- runners are stopped
  local stopped
  local function stop_all()
    stopped = true
    for _, tid in ipairs(self.engine:stop_all()) do
      local r = self.by_tid[tid]
      if r and r.status ~= "down" then
        remove_runner(self, r)
        self:stop_runner(r)
      end
    end
  end
  local finish <close> = setmetatable({}, { __close = function()
    if not stopped then stop_all() end
    if self.hub_ then self.hub_:close() end
  end })
  if busy > 0 and self.opts.shutdown_timeout > 0 then
    -- set when the last call ends (the runtime side's "drained") or at the timeout
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
  -- boots in flight fail now (await_remote_up returns at once) and end, with what
  -- their backend started released, before the hub and the backend states close
  local deadline = task.now() + bound
  local booting = {}
  for r in pairs(self.booting) do booting[#booting + 1] = r end
  for _, r in ipairs(booting) do
    r.failed = r.failed or ("pool '%s' is shutting down"):format(self.name)
    if r.host then pcall(self.engine.bk_fail, self.engine, r.host.id, r.failed) end
  end
  for _, r in ipairs(booting) do
    if self.booting[r] then
      r.boot_end = r.boot_end or task.future()
      local timer = loop:timer(math.max(0, deadline - task.now()), function() r.boot_end:set() end)
      r.boot_end:wait()
      timer:stop()
    end
  end
  -- the runners just stopped, and those lost or idled down before and still ending
  local all = {}
  for r in pairs(self.ending) do all[#all + 1] = r end
  local left = self:await_ended(all, deadline)
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
