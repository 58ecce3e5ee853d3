--- The Slurm backend: each runner is a batch job of a Slurm cluster running
-- `flame runner` with FLAME_PARENT in its environment. Jobs are submitted, watched
-- and cancelled through slurmrestd's job API (unix socket with munge, as the client
-- tools authenticate, or http with a JWT): the backend environment hands a backend
-- a process's exit but not its output, so sbatch's job id, squeue's pending reason
-- and Slurm's own error words are only readable as slurmrestd's JSON (docs/slurm.md
-- says more). The job's output files are followed with `tail` on the parent and
-- reach the pool's log with the runner's id.
-- Options (backend_opts; docs/slurm.md has the table): restd (FLAME_SLURMRESTD),
-- token (SLURM_JWT), user, api_version, partition, account, qos, time_limit,
-- cpus_per_task, mem, gres, constraint, extra (more job description fields), env,
-- export, flame, args, workdir, output_dir, boot_timeout, poll_interval.
-- @module flame.backends.slurm
local B = {}

local VERSIONS = { "v0.0.38", "v0.0.37" }   -- job APIs spoken, best first (22.05 serves both)

local OPTIONS = {
  restd = "string", token = "string", user = "string", api_version = "string",
  partition = "string", account = "string", qos = "string", time_limit = "number|string",
  cpus_per_task = "number", mem = "number|string", gres = "string", constraint = "string",
  extra = "table", env = "table", export = "table", flame = "string", args = "table",
  workdir = "string", output_dir = "string|boolean", boot_timeout = "number",
  poll_interval = "number",
  -- given by the pool
  pool = "string", runner_id = "string", max_concurrency = "number", sandbox = "table",
  shutdown_timeout = "number",
}

-- What the job gets from the parent's environment (sbatch copies all of it; the job
-- API takes only what it is given): what `flame runner` and Lua work commonly need.
local EXPORT = { "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
                 "LD_LIBRARY_PATH", "LUA_PATH", "LUA_CPATH", "LUA_PATH_5_4", "LUA_CPATH_5_4" }

-- Job states after which nothing runs any more (squeue's long names).
local ENDED = { COMPLETED = true, FAILED = true, CANCELLED = true, TIMEOUT = true,
                NODE_FAIL = true, PREEMPTED = true, BOOT_FAIL = true, DEADLINE = true,
                OUT_OF_MEMORY = true, REVOKED = true, SPECIAL_EXIT = true }

-- What a pending reason means, for the boot error (Slurm's word comes first).
local PENDING_HINTS = {
  PartitionConfig = "the job asks for more than the partition's nodes have: lower "
    .. "cpus_per_task, mem, gres or time_limit, or choose another partition",
  Resources = "the nodes it may run on are busy: raise boot_timeout, or ask for less",
  Priority = "jobs of higher priority come first: raise boot_timeout",
  PartitionDown = "the partition is down: choose another (sinfo lists them)",
  PartitionInactive = "the partition is inactive: choose another",
  ReqNodeNotAvail = "the nodes it needs are down or drained",
  BeginTime = "the job was told to start later",
  Dependency = "the job waits for another job",
  JobHeldUser = "the job is held",
  JobHeldAdmin = "an administrator holds the job",
}

local function quote(s)     -- for the job script's shell
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Levenshtein distance, for "did you mean" on a mistyped option.
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1,
        prev[j - 1] + (a:byte(i) == b:byte(j) and 0 or 1))
    end
    prev = cur
  end
  return prev[#b]
end

local function suggestion(name)
  local best, bd
  for k in pairs(OPTIONS) do
    local d = distance(name, k)
    if not bd or d < bd or (d == bd and k < best) then best, bd = k, d end
  end
  return bd and bd <= math.max(2, #name // 3) and (" (did you mean '%s'?)"):format(best) or ""
end

-- Memory in megabytes, as Slurm's --mem reads it: a number (MB) or "512M", "4G", "1T".
local function megabytes(v)
  if type(v) == "number" then return v >= 1 and math.floor(v) or nil end
  local n, unit = tostring(v):upper():match("^%s*(%d+%.?%d*)%s*([KMGT]?)B?%s*$")
  n = tonumber(n)
  if not n then return nil end
  local mb = ({ K = 1 / 1024, M = 1, [""] = 1, G = 1024, T = 1024 * 1024 })[unit] * n
  return mb >= 1 and math.floor(mb) or nil
end

-- A time limit in minutes, as sbatch's --time reads it: a number of minutes, or
-- "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS".
local function minutes(v)
  if type(v) == "number" then return v >= 1 and math.floor(v) or nil end
  local s = tostring(v)
  local d, rest = s:match("^(%d+)%-(.+)$")
  local parts = {}
  for p in (rest or s):gmatch("[^:]+") do
    if not p:match("^%d+$") then return nil end
    parts[#parts + 1] = tonumber(p)
  end
  if #parts == 0 or #parts > 3 then return nil end
  local secs
  if d then
    local h, m, sec = parts[1], parts[2] or 0, parts[3] or 0
    secs = ((tonumber(d) * 24 + h) * 60 + m) * 60 + sec
  elseif #parts == 1 then secs = parts[1] * 60
  elseif #parts == 2 then secs = parts[1] * 60 + parts[2]
  else secs = (parts[1] * 60 + parts[2]) * 60 + parts[3] end
  local m = math.ceil(secs / 60)
  return m >= 1 and m or nil
end

local function check_options(state)
  for k, v in pairs(state) do
    local want = OPTIONS[k]
    if not want then
      error(("slurm backend: unknown option '%s'%s (docs/slurm.md lists them)")
        :format(tostring(k), suggestion(tostring(k))), 0)
    end
    if not want:find(type(v), 1, true) then
      error(("slurm backend: option '%s' must be a %s (got %s)"):format(k,
        want:gsub("|", " or "), type(v)), 0)
    end
  end
  if state.time_limit ~= nil and not minutes(state.time_limit) then
    error(("slurm backend: option 'time_limit' must be minutes or a time like \"1:30:00\" "
      .. "or \"2-00:00:00\", as sbatch --time takes (got %q)"):format(tostring(state.time_limit)), 0)
  end
  if state.mem ~= nil and not megabytes(state.mem) then
    error(("slurm backend: option 'mem' must be megabytes or a size like \"4G\", as sbatch "
      .. "--mem takes (got %q)"):format(tostring(state.mem)), 0)
  end
  local c = state.cpus_per_task
  if c ~= nil and (math.type(c) ~= "integer" or c < 1) then
    error(("slurm backend: option 'cpus_per_task' must be a whole number >= 1 (got %s)")
      :format(tostring(c)), 0)
  end
  local p = state.poll_interval
  if p ~= nil and not (p >= 50) then
    error("slurm backend: option 'poll_interval' must be milliseconds, 50 or more", 0)
  end
  for k, v in pairs(state.env or {}) do
    if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
      error(("slurm backend: option 'env' must map names to values, like { LEVEL = \"2\" } "
        .. "(got %s = %s)"):format(tostring(k), tostring(v)), 0)
    end
  end
  for _, list in ipairs { "export", "args" } do
    for k, v in pairs(state[list] or {}) do
      if math.type(k) ~= "integer" or type(v) ~= "string" then
        error(("slurm backend: option '%s' must be a list of strings"):format(list), 0)
      end
    end
  end
  for k in pairs(state.extra or {}) do
    if type(k) ~= "string" then
      error("slurm backend: option 'extra' must map job description fields to values, "
        .. "like { nice = 10 }", 0)
    end
  end
  if state.api_version ~= nil and not state.api_version:match("^v%d+%.%d+%.%d+$") then
    error(("slurm backend: option 'api_version' must be a job API version like \"v0.0.38\" "
      .. "(got %q)"):format(state.api_version), 0)
  end
end

-- Where slurmrestd is: a base URL and the unix socket, if any.
local function endpoint(restd)
  if restd:match("^unix://") then
    return { base = "http://localhost", unix_socket = restd:sub(8) }
  end
  if restd:match("^https?://[^/]") then return { base = (restd:gsub("/+$", "")) } end
  error(("slurm backend: cannot use restd %q (unix:///path/to/slurmrestd.sock or "
    .. "http://host:port expected)"):format(restd), 0)
end

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

local function urldecode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- One request to slurmrestd: status and decoded JSON (or nil); or nil and why.
local function api(flame, state, method, path, body, timeout)
  local e = state.endpoint
  local headers = { Accept = "application/json" }
  if body then headers["Content-Type"] = "application/json" end
  if state.token then
    headers["X-SLURM-USER-NAME"] = state.user
    headers["X-SLURM-USER-TOKEN"] = state.token
  end
  local status, _, raw = flame.http.request {
    method = method, url = e.base .. path, unix_socket = e.unix_socket, headers = headers,
    body = body and flame.json.encode(body) or (method == "POST" and "" or nil),
    timeout = timeout or 30000,
  }
  if not status then
    return nil, ("slurm: slurmrestd at %s is unreachable: %s (start it, or set "
      .. "backend_opts.restd or FLAME_SLURMRESTD; docs/slurm.md)"):format(state.restd, tostring(_))
  end
  local data
  if raw and raw:match("^%s*[{%[]") then
    local ok, d = pcall(flame.json.decode, raw)
    if ok then data = d end
  end
  return status, data, raw
end

-- Slurm's own words from an answer's errors list ("Invalid partition name specified").
local function slurm_errors(data, raw, status)
  local words = {}
  if type(data) == "table" and type(data.errors) == "table" then
    for _, e in ipairs(data.errors) do
      if type(e) == "table" then
        local w = e.error or e.description
        if e.description and e.error and e.description ~= e.error then
          w = e.error .. ": " .. e.description
        end
        if w and w ~= "" then words[#words + 1] = w end
      end
    end
  end
  if #words == 0 then
    words[1] = ("status %s %s"):format(tostring(status), tostring(raw or ""):sub(1, 200))
  end
  return table.concat(words, "; ")
end

-- The job API version to speak: the pinned one, or the best this slurmrestd serves.
local function negotiate(flame, state)
  local tried = {}
  for _, v in ipairs(state.api_version and { state.api_version } or VERSIONS) do
    local status, data, raw = api(flame, state, "GET", "/slurm/" .. v .. "/ping", nil,
      math.min(10000, state.left()))
    if not status then return nil, data end
    if status == 200 and type(data) == "table" then
      if type(data.errors) == "table" and #data.errors > 0 then
        return nil, ("slurm: slurmrestd at %s cannot reach slurmctld: %s"):format(state.restd,
          slurm_errors(data, raw, status))
      end
      state.api = v
      return true
    end
    if status == 401 or status == 403 then
      return nil, ("slurm: slurmrestd at %s refused us (%d: %s): over http it wants a JWT "
        .. "(backend_opts.token or SLURM_JWT, from `scontrol token`); over its unix socket, "
        .. "the uid it runs as"):format(state.restd, status, slurm_errors(data, raw, status))
    end
    tried[#tried + 1] = v .. ": " .. tostring(status)
  end
  return nil, ("slurm: slurmrestd at %s serves none of the job APIs this backend speaks "
    .. "(%s; tried %s): load one with slurmrestd -s openapi/%s, or pin another with "
    .. "api_version"):format(state.restd, table.concat(VERSIONS, ", "),
    table.concat(tried, ", "), VERSIONS[1])
end

-- The comment every job of flame carries: who owns it, for the sweep and for people
-- reading squeue (`squeue -o "%.10i %.30j %k"`).
local function comment(state, me)
  local f = { "flame", "pool=" .. urlencode(state.pool), "runner=" .. urlencode(state.runner_id),
              "parent=" .. urlencode(me.id), "pid=" .. tostring(me.pid),
              "host=" .. urlencode(me.host or ""), "started=" .. urlencode(me.started or ""),
              "boot=" .. urlencode(me.boot or ""), "pidns=" .. urlencode(me.pidns or "") }
  return table.concat(f, " ")
end

local function parse_comment(c)
  if type(c) ~= "string" or not c:match("^flame ") then return nil end
  local t = {}
  for k, v in c:gmatch("(%w+)=(%S*)") do t[k] = urldecode(v) end
  return t
end

local function get_job(flame, state, id, timeout)
  local status, data, raw = api(flame, state, "GET", ("/slurm/%s/job/%s"):format(state.api, id),
    nil, timeout or 10000)
  if not status then return nil, data end
  local job = type(data) == "table" and type(data.jobs) == "table" and data.jobs[1]
  if status == 200 and type(job) == "table" then return job end
  local words = slurm_errors(data, raw, status)
  if words:find("Invalid job id", 1, true) then return false, words end  -- gone
  return nil, ("slurm: cannot read job %s: %s"):format(id, words)
end

local function cancel(flame, state, id, why)
  local status, data, raw = api(flame, state, "DELETE",
    ("/slurm/%s/job/%s?signal=KILL"):format(state.api, id), nil, 10000)
  if status == 200 and not (type(data) == "table" and type(data.errors) == "table"
                            and #data.errors > 0) then
    flame.log.info("slurm: cancelled job %s of runner %s (%s)", id, state.runner_id, why)
    return true
  end
  local words = status and slurm_errors(data, raw, status) or data
  if not tostring(words):find("already completing or completed", 1, true)
     and not tostring(words):find("Invalid job id", 1, true) then
    flame.log.warn("slurm: cannot cancel job %s of runner %s: %s (scancel %s)", id,
      state.runner_id, tostring(words), id)
  end
  return false
end

-- "exit code 3" / "killed by signal 9", from the wait status Slurm keeps.
local function exit_text(code)
  code = tonumber(code)
  if not code then return "exit code ?" end
  local status, signal = code >> 8, code & 0x7f
  if signal ~= 0 then return ("exit code %d:%d (signal %d)"):format(status, signal, signal) end
  return ("exit code %d"):format(status)
end

local function base_state(job)
  local s = job.job_state
  if type(s) == "table" then s = s[1] end    -- later APIs give a list of flags
  return tostring(s or "?")
end

-- Why a job ended, in Slurm's words: its state, exit code and reason.
local function ended_text(state, job)
  local s = ("slurm job %s of runner %s ended: %s, %s"):format(state.job, state.runner_id,
    base_state(job), exit_text(job.exit_code))
  local r = job.state_reason
  if r and r ~= "None" and r ~= "" then s = s .. " (" .. r .. ")" end
  if job.nodes and job.nodes ~= "" then s = s .. " on " .. job.nodes end
  if state.output then s = s .. "; its output is in the pool's log as [" .. state.runner_id .. "]" end
  return s
end

local function pending_text(state, job)
  local r = tostring(job.state_reason or "?")
  local hint = PENDING_HINTS[r] or PENDING_HINTS[r:match("^(%a+)") or ""]
  return ("slurm job %s of runner %s was still pending after the boot timeout of %s ms: "
    .. "Slurm's reason is %s%s%s"):format(state.job, state.runner_id,
    tostring(state.boot_timeout), r,
    job.state_description and job.state_description ~= "" and (" (" .. job.state_description .. ")") or "",
    hint and ("; " .. hint) or "")
end

-- Jobs of this pool whose parent died (on this host, this boot, this pid namespace):
-- cancelled before more are submitted. Jobs of parents this process cannot judge
-- (another machine, another pid namespace) are left alone.
local function sweep(flame, state, me)
  local status, data = api(flame, state, "GET", ("/slurm/%s/jobs"):format(state.api), nil,
    math.min(10000, state.left()))
  if status ~= 200 or type(data) ~= "table" or type(data.jobs) ~= "table" then
    flame.log.warn("slurm: cannot list the jobs of the cluster for the sweep (%s)",
      tostring(status or data))
    return
  end
  for _, job in ipairs(data.jobs) do
    local c = parse_comment(job.comment)
    if c and c.pool == state.pool and c.parent ~= me.id and not ENDED[base_state(job)]
       and c.host == (me.host or "") and c.boot == (me.boot or "")
       and c.pidns == (me.pidns or "") and tonumber(c.pid)
       and not flame.proc_alive(tonumber(c.pid), c.started ~= "" and c.started or nil) then
      flame.log.info("slurm: cancelling job %s left by a parent that died (runner %s)",
        tostring(job.job_id), tostring(c.runner))
      cancel(flame, { api = state.api, restd = state.restd, endpoint = state.endpoint,
                      token = state.token, user = state.user, runner_id = c.runner },
        job.job_id, "its parent died")
    end
  end
end

-- The jobs of this runner, however far their submission got (a submit that timed
-- out here may still have reached slurmctld): cancelled.
local function cancel_mine(flame, state)
  local status, data = api(flame, state, "GET", ("/slurm/%s/jobs"):format(state.api), nil, 10000)
  if status ~= 200 or type(data) ~= "table" or type(data.jobs) ~= "table" then return end
  for _, job in ipairs(data.jobs) do
    local c = parse_comment(job.comment)
    if c and c.runner == state.runner_id and c.parent == state.me.id
       and not ENDED[base_state(job)] then
      cancel(flame, state, job.job_id, "its submission broke off")
    end
  end
end

--- A new runner: options checked, FLAME_PARENT made, the job described.
function B.init(opts, flame)
  local state = flame.merge(flame.config("slurm"), opts)
  check_options(state)
  state.restd = state.restd or flame.getenv("FLAME_SLURMRESTD")
  if not state.restd or state.restd == "" then
    error("slurm backend: no slurmrestd to submit to: set backend_opts.restd (like "
      .. "\"unix:///run/slurmrestd.sock\" or \"http://login1:6820\") or FLAME_SLURMRESTD; "
      .. "docs/slurm.md shows how to run one", 0)
  end
  state.endpoint = endpoint(state.restd)
  state.token = state.token or flame.getenv("SLURM_JWT")
  if state.token == "" then state.token = nil end
  state.user = state.user or flame.getenv("USER") or flame.getenv("LOGNAME")
  if state.token and not state.user then
    error("slurm backend: a token needs a user name: set backend_opts.user", 0)
  end
  state.flame = state.flame or flame.flame_bin()
  state.workdir = state.workdir or flame.getenv("PWD") or "/tmp"
  if state.output_dir == true or state.output_dir == nil then state.output_dir = state.workdir end
  state.poll_interval = state.poll_interval or 1000
  local me = flame.parent_info()
  state.me = me
  -- nil and why when the parent cannot make one (code_sync's pack over its limit)
  local parent, why = flame.parent_new { node_base = state.runner_id, host_env = "SLURMD_NODENAME" }
  if not parent then error(why, 0) end
  state.parent = parent
  local env = {}
  for _, name in ipairs(state.export or EXPORT) do
    local v = flame.getenv(name)
    if v and v ~= "" then env[name] = v end
  end
  state.env = flame.merge(env, flame.merge(state.env,
    { FLAME_PARENT = flame.parent_encode(state.parent) }))
  return state
end

-- The job description for slurmrestd.
local function job_description(state, flame)
  local env = {}
  for k, v in pairs(state.env) do env[k] = tostring(v) end
  local job = {
    name = "flame-" .. state.runner_id, comment = comment(state, state.me),
    environment = env, current_working_directory = state.workdir,
    partition = state.partition, account = state.account, qos = state.qos,
    time_limit = state.time_limit and minutes(state.time_limit),
    cpus_per_task = state.cpus_per_task,
    memory_per_node = state.mem and megabytes(state.mem),
    gres = state.gres, constraints = state.constraint,
    -- a runner that ran once cannot run again (its parent record is spent); 22.05's
    -- job API ignores this, and a requeued runner is refused by the parent and fails
    requeue = false,
  }
  if state.output then
    job.standard_output, job.standard_error = state.output.out, state.output.err
    job.open_mode = "append"
  else
    job.standard_output = "/dev/null"
    job.standard_error = "/dev/null"
  end
  for k, v in pairs(state.extra or {}) do job[k] = v end
  local argv = { quote(state.flame), "runner" }
  for _, a in ipairs(state.args or {}) do argv[#argv + 1] = quote(a) end
  -- SIGTERM (scancel, the time limit, preemption) is ignored so that the job's end
  -- is seen by its state here before the link drops; Slurm's SIGKILL follows after
  -- KillWait, and the runner leaves sooner when the pool closes its link
  local script = table.concat({
    "#!/bin/sh",
    ("# flame runner %s of pool %s; its parent is %s (pid %s) on %s"):format(state.runner_id,
      state.pool, state.me.id, tostring(state.me.pid), tostring(state.me.host)),
    "trap '' TERM",
    "exec " .. table.concat(argv, " "),
    "",
  }, "\n")
  return { job = job, script = script }
end

-- The job's output and error files, followed on the parent (a shared directory
-- when the job runs elsewhere): each line reaches the pool's log as "[runner] line",
-- the error file's as warn. tail ends with the parent (--pid) or when the runner is
-- released; the files are removed then.
local FOLLOW = [[
o=$1 e=$2 parent=$3
trap 'rm -f "$o" "$e"' EXIT
trap 'exit 0' TERM INT
exec 3>&2
tail -F -q -n +1 --pid="$parent" "$o" 2>/dev/null &
tail -F -q -n +1 --pid="$parent" "$e" 2>/dev/null >&3 &
wait
]]

local function follow(flame, state)
  if not state.output then return end
  local proc, err = flame.proc.spawn { path = "/bin/sh",
    args = { "-c", FOLLOW, "flame-slurm-follow", state.output.out, state.output.err,
             tostring(state.me.pid) }, group = true }
  if not proc then
    flame.log.warn("slurm: cannot follow the output of runner %s: %s", state.runner_id, err)
    return
  end
  state.follower = proc
end

local function unfollow(flame, state)
  local f = state.follower
  state.follower = nil
  if f and not f:exited() then f:kill("SIGTERM", true) end
end

local function poll_later(flame, state)
  if not state.done then flame.send_after(state.poll_interval, { event = "poll" }) end
end

--- Submits the job and waits for its runner to connect.
function B.remote_boot(state, flame)
  local deadline = flame.now() + (state.boot_timeout or 30000)
  function state.left() return math.max(1, deadline - flame.now()) end
  local ok, why = negotiate(flame, state)
  if not ok then return nil, why end
  sweep(flame, state, state.me)
  if state.output_dir then
    local name = ("flame-%s-%s"):format(state.runner_id:gsub("[^%w%-_.]", "_"), flame.random_id(6))
    state.output = { out = state.output_dir .. "/" .. name .. ".out",
                     err = state.output_dir .. "/" .. name .. ".err" }
  end
  local desc = job_description(state, flame)
  local status, data, raw = api(flame, state, "POST", ("/slurm/%s/job/submit"):format(state.api),
    desc, state.left())
  if not status then
    cancel_mine(flame, state)                -- the submit may have happened all the same
    return nil, data
  end
  local id = type(data) == "table" and math.tointeger(data.job_id)
  if status ~= 200 or not id or id <= 0 then
    return nil, ("slurm: cannot submit the job of runner %s: %s"):format(state.runner_id,
      slurm_errors(data, raw, status))
  end
  state.job = id
  flame.log.info("slurm: runner %s is job %d", state.runner_id, state.job)
  if type(data.errors) == "table" and #data.errors > 0 then
    -- the job exists all the same (sbatch says nothing here): "Requested partition
    -- configuration not available now" leaves it pending with reason PartitionConfig
    flame.log.warn("slurm: job %d of runner %s: %s", state.job, state.runner_id,
      slurm_errors(data, raw, status))
  end
  if type(data.job_submit_user_msg) == "string" and data.job_submit_user_msg ~= "" then
    flame.log.info("slurm: job %d: %s", state.job, data.job_submit_user_msg)
  end
  follow(flame, state)
  poll_later(flame, state)
  local term
  term, why = flame.await_remote_up(state.parent, state.left())
  if term then
    state.terminator = term
    return term, state
  end
  -- the boot failed: say why in Slurm's terms, and leave no job behind
  state.done = true
  if not state.ended then
    local job = get_job(flame, state, state.job)
    if job and base_state(job) == "PENDING" then
      why = pending_text(state, job)
    elseif job and ENDED[base_state(job)] then
      why = ended_text(state, job)
    elseif job then
      why = ("the runner of slurm job %s did not connect within the boot timeout of %s ms "
        .. "(the job is %s on %s; check that the node reaches the pool's link.advertise "
        .. "addresses and has %s)"):format(state.job, tostring(state.boot_timeout),
        base_state(job), tostring(job.nodes), state.flame)
    end
    cancel(flame, state, state.job, "its boot failed")
  end
  why = tostring(why)
  return nil, why:match("^slurm") and why or ("slurm: " .. why)
end

-- No remote_spawn_monitor: calls go from the pool to the runner's terminator over
-- the link without entering the backend state, as for the built-in backends.

--- The job's state, polled: its end reports the runner down with Slurm's words.
function B.handle_info(msg, state, flame)
  if msg.event == "poll" and not state.done and state.job then
    local job, err = get_job(flame, state, state.job)
    if job == false then                     -- the cluster forgot it: it ended long ago
      state.ended = true
      return nil, ("slurm job %s of runner %s is gone from the cluster (it ended)")
        :format(state.job, state.runner_id)
    end
    if not job then
      if not state.poll_warned then
        flame.log.warn("slurm: runner %s: %s (retrying)", state.runner_id, tostring(err))
        state.poll_warned = true
      end
    else
      state.poll_warned = nil
      local s = base_state(job)
      if ENDED[s] then
        state.ended = true
        return nil, ended_text(state, job)
      end
      if s == "COMPLETING" then
        -- Slurm is ending the job (scancel, its time limit, preemption, a failed
        -- node) while the runner still runs: it ignores SIGTERM for this moment, so
        -- the end is reported here, with Slurm's word for it, rather than as a lost
        -- link. The final state is known only once its processes are gone: it is
        -- logged then (remote_shutdown)
        state.ending = true
        return nil, ("slurm job %s of runner %s was ended by Slurm: COMPLETING (cancelled, "
          .. "past its time limit, preempted, or its node failed; the final state is in the "
          .. "pool's log)"):format(state.job, state.runner_id)
      end
      if s == "PENDING" and job.state_reason ~= state.reason then
        state.reason = job.state_reason
        flame.log.info("slurm: job %s of runner %s pending: %s", state.job, state.runner_id,
          tostring(job.state_reason))
      end
    end
    poll_later(flame, state)
    return state
  end
  return state                               -- the follower's exit, and the rest
end

--- The pool is done with the runner: its job ends (cancelled if it still runs), and
-- its output is followed to the end.
function B.remote_shutdown(state, reason, flame)
  state.done = true
  if state.job and not state.ended then
    -- a runner told to stop (idle, pool shutdown) ends its job by itself: give it a
    -- moment, so that the job ends COMPLETED rather than CANCELLED
    local job
    for _ = 1, 10 do
      job = get_job(flame, state, state.job)
      if job == false or (job and ENDED[base_state(job)]) then break end
      if job and base_state(job) == "COMPLETING" and not state.ending then break end
      flame.sleep(100)
    end
    if job ~= false and not (job and (ENDED[base_state(job)] or base_state(job) == "COMPLETING")) then
      cancel(flame, state, state.job, reason)
    end
    if state.ending then
      -- ended by Slurm: its final state, once it is known (KillWait, then the reap)
      for _ = 1, 120 do
        job = get_job(flame, state, state.job)
        if job == false then break end
        if job and ENDED[base_state(job)] then
          flame.log.warn("%s", ended_text(state, job))
          break
        end
        flame.sleep(500)
      end
    end
  end
  if state.follower then
    flame.sleep(1000)                        -- the last lines reach the log (tail polls)
    unfollow(flame, state)
  end
end

--- On the runner: end the process; the job ends with it.
function B.system_shutdown(flame)
  flame.exit(0)
end

return B
