--- flame: run a Lua closure, with what it captured, on fresh compute.
-- The public API (docs/api.md) over the C core, `flame.core`: the pool's rules,
-- its runners, their links and backend states live on the runtime thread
-- (core/runtime.c); this is the application's side of a pool: its options, the
-- calls' futures and errors, the hooks, and the waits of a shutdown.
-- @module flame
local core = require "flame.core"
local code_sync = require "flame.code_sync"
local errors = require "flame.errors"
local task = require "flame.task"
local logmod = require "flame.log"

local M = {}

M.VERSION = core.VERSION
M.errors = errors

local loop = task.loop
local pools = {}                 -- name -> pool, for uniqueness within the process
local SPAWN_HEADER = core.SPAWN_HEADER  -- SPAWN's deadline and link flag, before the work
local ENCODE_WORK = { name = "work", buffer = true, head = SPAWN_HEADER }
local next_call = 0
local parent_info                -- on a runner: what its parent told it (M.parent)

local Pool = {}
Pool.__index = Pool
Pool.__name = "flame.pool"

local function invalid(msg, level)
  errors.raise("invalid", msg, nil, level and level + 1 or 3)
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

-- What the runtime side boots this pool's runners with: core/runner.c makes each
-- runner's backend state from backend or spec and calls its init with init (and
-- runner_id); core/bsvc_link.c serves the backend environment's parent_new,
-- await_remote_up, local_terminator, spawn_monitor, flame_bin and code_paths from
-- it. Told again when where this program finds its modules changes (a lib/ put on
-- package.path at run time: a runner on this machine finds the same ones).
local function boot_config(pool)
  local o, hub = pool.opts, pool.link
  local init = {
    max_concurrency = o.max_concurrency, sandbox = sandbox_settings(o.sandbox),
    boot_timeout = o.boot_timeout, shutdown_timeout = o.shutdown_timeout, pool = pool.name,
  }
  for k, v in pairs(o.backend_opts or {}) do init[k] = v end
  local function ms(v) return v == math.huge and -1 or v end
  local idle = type(o.idle_shutdown_after) == "table" and o.idle_shutdown_after[1]
    or o.idle_shutdown_after
  return {
    backend = type(o.backend) == "string" and o.backend or nil,
    spec = pool.spec, init = init, idle_work = pool.idle_work,
    addrs = hub.addrs or {},
    settings = {
      max_concurrency = o.max_concurrency, shutdown_timeout = ms(o.shutdown_timeout),
      failsafe_timeout = ms(o.boot_timeout),
      -- the check comes in CONFIG after REMOTE_UP: the runner must not idle before
      idle_check = type(o.idle_shutdown_after) == "table" or nil,
      heartbeat_interval = hub.heartbeat_interval,
      heartbeat_misses = hub.heartbeat_misses,
      sandbox = sandbox_settings(o.sandbox),
    },
    idle = ms(idle), min_idle = ms(o.min_idle_shutdown_after),
    boot_timeout = o.boot_timeout,
    code_sync = (o.code_sync and o.backend ~= "local") or nil,
    flame_bin = flame_bin(),
    code_paths = { path = package.path, cpath = package.cpath, cwd = core.cwd() },
  }
end

-- Tells the runtime side what boots get; raises what cannot cross (backend_opts
-- holding a function, say).
local function configure_boots(pool)
  pool.path, pool.cpath = package.path, package.cpath
  pool.engine:boot_config(boot_config(pool))
end

-- The pool's link hub: core.hub (core/hub.c, on the runtime thread) listens for
-- the pool's runners, makes each prove it holds its runner's secret (and proves the
-- parent does too), keeps the heartbeats and carries the frames; core/runner.c and
-- core/pool.c live the runners' lives and the pool's rules there. What reaches this
-- state are events (EVENTS below): a runner up (its pid, kept in terms for the
-- pool's runner list until its link is lost), connections refused (counted and
-- logged; nothing they sent runs), and the pool's own.
local EVENTS = {}

--- What the application knows of the pool's link: listening (the address it listens
-- on, "host:port"), addrs (what its runners are told to connect to: link.advertise,
-- or that address), tls (whether they speak TLS), refusals and drops (connections it
-- turned away; refused_why the last refusal's words), terms (runners up, by tid).
function Pool:hub()
  return self.link
end

-- link.tls = "auto": TLS unless the runners connect over loopback only (the
-- address listened on and every one advertised).
local function loopback(host)
  host = host:match("^%[(.*)%]$") or host
  return host == "localhost" or host == "::1" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

local function wants_tls(l)
  if l.tls ~= nil and l.tls ~= "auto" then return l.tls end
  if not loopback(l.bind or "127.0.0.1") then return true end
  for _, a in ipairs(l.advertise or {}) do
    if type(a) ~= "string" or not loopback(a:match("^(.*):%d+$") or a) then return true end
  end
  return false
end

local function open_hub(pool)
  local l = pool.opts.link
  local h = { terms = {}, refusals = 0, drops = 0, tls = wants_tls(l),
              heartbeat_interval = l.heartbeat_interval or 1000,
              heartbeat_misses = l.heartbeat_misses or 3 }
  pool.link = h
  local c, err = core.hub { host = l.bind or "127.0.0.1", port = l.port or 0, tls = h.tls,
    heartbeat_interval = h.heartbeat_interval, heartbeat_misses = h.heartbeat_misses,
    -- a pool of local runners has no link to listen for
    listen = pool.opts.backend ~= "local",
    on_event = function(kind, ...)
      local fn = EVENTS[kind]
      if fn then fn(pool, ...) end
    end }
  if not c then return err end
  pool.engine = c
  local host, port = c:address()
  if host then
    h.listening = (host:find(":") and ("[" .. host .. "]") or host) .. ":" .. port
    h.addrs = l.advertise or { h.listening }
  end
end

local function close_hub(pool)
  if pool.hub_closed or not pool.engine then return end
  pool.hub_closed = true
  pool.engine:close()                          -- boots in flight learn it at once
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

-- Makes a pool. Options as in the API (docs/pools.md), checked by core/popts.c
-- (with their defaults filled in); bad ones raise `invalid`.
local function new_pool(opts)
  local o, bad = core.pool_options(opts)
  if not o then invalid(bad, 2) end
  if pools[o.name] then
    invalid(("flame.pool: a pool named '%s' already exists"):format(o.name), 2)
  end
  local mod = resolve_backend(o.backend)
  local spec, idle_work
  if type(o.backend) == "table" then            -- it is copied into each backend state
    local err
    spec, err = core.encode({ name = "backend" }, o.backend)
    if not spec then
      invalid("flame.pool: the backend table cannot be copied into a backend state: " .. err, 2)
    end
  end
  if type(o.idle_shutdown_after) == "table" and o.backend ~= "local" then
    -- a remote runner runs the check itself: it goes in CONFIG after REMOTE_UP
    local err
    idle_work, err = core.encode({ name = "idle_shutdown_after[2]" }, o.idle_shutdown_after[2])
    if not idle_work then invalid("flame.pool: option 'idle_shutdown_after' " .. err, 2) end
  end
  local cs, why = code_sync.check(o.code_sync)
  if why then invalid("flame.pool: option 'code_sync' " .. why, 2) end
  o.code_sync = cs
  local code
  if cs and o.backend ~= "local" then        -- a local runner reads this program's files
    code, why = code_sync.pack(cs)           -- what cannot be shipped is said now
    if not code then invalid("flame.pool: " .. why, 2) end
  end
  if parent_info ~= nil then o.min = 0 end  -- a runner boots no runners
  local pool = setmetatable({
    name = o.name, opts = o, spec = spec, idle_work = idle_work,
    runners = {}, pending = {}, hows = {}, code_gen = 0,
    log = logmod.new(o.log, o.name), closed = false,
  }, Pool)
  local err = open_hub(pool)
  if err then invalid("flame.pool: " .. err, 2) end
  if code then pool:code_ready(code) end
  local ok, why2 = pcall(configure_boots, pool)
  if not ok then
    close_hub(pool)
    -- the runtime's words, told as the option the user wrote
    local what = tostring(why2):gsub("^[^:]*:%d+: ", ""):gsub("^boot_config: ", "")
      :gsub("%(at %.init%.", "(at backend_opts.")
    invalid("flame.pool: option 'backend_opts' cannot reach the backend: " .. what
      .. "; give it plain values (strings, numbers, booleans, tables of them)", 2)
  end
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

-- pool.runners: what the application knows of the runners up ({ id, tid, term },
-- term.pid for a process runner), kept from the runtime side's events.
local function remove_runner(pool, tid)
  for i, x in ipairs(pool.runners) do
    if x.tid == tid then table.remove(pool.runners, i) return true end
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

-- What the runtime side tells: its link hub's events (core/hub.c) and the pool's
-- own (core/pool.c, core/runner.c).

-- A runner up: handed to its boot's await_remote_up; its pid for the runner list.
function EVENTS.up(self, _, tid, pid, host)
  self.link.terms[tid] = { tid = tid, pid = pid ~= 0 and pid or nil, host = host }
end

function EVENTS.lost(self, tid)
  self.link.terms[tid] = nil
end

function EVENTS.refused(self, why)
  self.link.refusals = self.link.refusals + 1
  self.link.refused_why = why
  self.log.error("%s", why)
end

function EVENTS.dropped(self, why)
  self.link.drops = self.link.drops + 1
  self.log.error("%s", why)
end

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

-- A boot starts on the runtime side (core/runner.c); a code_sync pool's waits for
-- its pack, made here: modules loaded since the last boot are in it.
function EVENTS.grow(self, boot, is_min, count)
  call_hook(self, "on_grow_start", { name = self.name, count = count })
  local synced = self.opts.code_sync and self.opts.backend ~= "local"
  local ok, err = pcall(function()
    if self.closed then return ("pool '%s' is shutting down"):format(self.name) end
    if synced then
      local code, why = code_sync.pack(self.opts.code_sync, self.code)
      if not code then return why end
      self:code_ready(code)
    end
    local done, why = pcall(configure_boots, self)
    if not done then return "boot_config: " .. tostring(why) end
  end)
  -- a code_sync boot waits for this: it goes on, or fails with why (code that
  -- cannot be shipped); whatever raised here, it hears
  if synced and not self.hub_closed then
    self.engine:boot_go(boot, (not ok or err) and tostring(err) or nil)
  end
end

function EVENTS.grown(self, result, count, tid, name)
  if result == "ok" then
    self.runners[#self.runners + 1] = { id = name, tid = tid,
                                        term = self.link.terms[tid] or { tid = tid } }
  end
  call_hook(self, "on_grow_end", result, { name = self.name, count = count })
end

function EVENTS.shrink(self, tid, why, count, hook)
  remove_runner(self, tid)
  if hook then call_hook(self, "on_shrink", { name = self.name, count = count, reason = why }) end
end

function EVENTS.ended(self, left)
  if self.ended then self.ended:set(left) end
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

-- A log line of a runner's backend state, or of the runtime side (state 0).
function EVENTS.blog(self, _, level, line)
  local log = self.log[level] or self.log.info
  log("%s", line)
end

function EVENTS.drained(self)
  if self.drained then self.drained:set() end
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
  local o = NO_OPTIONS
  if opts ~= nil then
    local bad
    o, bad = core.call_options(opts)
    if not o then invalid(bad, level) end
  end
  if self.closed then
    errors.raise("shutdown", ("pool '%s' is shut down"):format(self.name), { pool = self.name })
  end
  local timeout = o.timeout or self.opts.timeout
  local deadline = task.now() + timeout
  if self.path ~= package.path or self.cpath ~= package.cpath then
    configure_boots(self)                     -- the runners booted from now find them
  end
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
  local function stop_all()                     -- the runtime side stops them all
    stopped = true
    self.runners = {}
    self.engine:stop_all()
  end
  local finish <close> = setmetatable({}, { __close = function()
    if not stopped then stop_all() end
    close_hub(self)
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
  -- the runners stop, boots in flight fail (await_remote_up returns at once); this
  -- returns once every runner has ended (processes gone, containers removed), those
  -- lost or idled down before included: a runner told to stop exits by itself; the
  -- backend's reap (shutdown_timeout + 1 s for processes) bounds one that does not
  self.ended = task.future()
  stop_all()
  local st = self.opts.shutdown_timeout
  local bound = (st == math.huge and 5000 or st + 1000) + 5000
  self.engine:await_ended(bound)
  -- the runtime answers within bound; this timer only guards against an answer
  -- lost (no memory for the event): a shutdown never hangs
  local guard = loop:timer(bound + 5000, function() self.ended:set("?") end)
  local left = self.ended:wait()
  guard:stop()
  if left ~= "" then
    self.log.warn("pool shut down; runners still ending after %d ms: %s", bound, left)
  else
    self.log.info("pool shut down")
  end
end

local function live_pools()
  local names = {}
  for name in pairs(pools) do names[#names + 1] = name end
  table.sort(names)
  return names
end

--- Makes a pool (docs/pools.md). Bad options raise an `invalid` error.
M.pool = new_pool

--- Names of pools not yet shut down (the specs check that none is left behind).
M._live_pools = live_pools

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
