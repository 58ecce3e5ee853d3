-- The Slurm backend against a real private cluster (scripts/slurm: munged,
-- slurmctld, slurmd and slurmrestd on 127.0.0.1): runners are batch jobs. Run by
-- scripts/test's cluster step, or by hand:
--   eval "$(scripts/slurm start)"; FLAME_SLURM_SPECS=1 lua5.4 /usr/bin/busted spec/15-slurm_spec.lua
-- Without FLAME_SLURM_SPECS=1 this file registers nothing; with it but no cluster,
-- every test is pending with the reason. Every test checks squeue: no job of its
-- pool is left.
local flame = require "flame"
local H = require "spec.helper"
local R = require "spec.support.remote"
local C = assert(loadfile("spec/support/cluster.lua"))()

local cluster, why_not = C.slurm()
if cluster == nil then
  io.stderr:write("spec/15-slurm_spec.lua: not run (FLAME_SLURM_SPECS=1 and a cluster from "
    .. "scripts/slurm run it; scripts/test does)\n")
  return
end

local LINK = { heartbeat_interval = 200, heartbeat_misses = 3 }
local outdir = H.tmpdir()          -- the jobs' output files, followed into the log

local function pool(name, opts)
  local o = { name = name, backend = "slurm", link = LINK,
              backend_opts = { workdir = "/tmp", output_dir = outdir } }
  for k, v in pairs(opts or {}) do
    if k == "backend_opts" then for bk, bv in pairs(v) do o.backend_opts[bk] = bv end
    else o[k] = v end
  end
  return H.pool(o)
end

local fails = R.fails

if cluster then
  -- the calls every backend shares, each in jobs of its own pool
  local shared = assert(loadfile("spec/support/calls.lua", "t", _ENV))()
  shared("slurm", { link = LINK, backend_opts = { workdir = "/tmp", output_dir = outdir } })
end

describe("slurm backend #slurm", function()
  local function need_cluster()
    if not cluster then pending(why_not) return false end
    return true
  end

  after_each(function()
    H.cleanup()
  end)

  teardown(function()
    H.rmdir(outdir)
  end)

  it("runs calls in jobs; the job's output reaches the log with the runner id", function()
    if not need_cluster() then return end
    local p = pool("sl-calls")
    local lines = C.capture(p)
    local job, parent = flame.call(p, function()
      io.stderr:write("hello from the job\n")
      return os.getenv("SLURM_JOB_ID"), require("flame").parent()
    end)
    assert.matches("^%d+$", job)
    assert.are.equal("slurm", parent.backend)
    local jobs = C.jobs("sl-calls")
    assert.are.equal(1, #jobs)
    assert.are.equal(job, jobs[1].id)
    assert.are.equal("RUNNING", jobs[1].state)
    assert.is_true(H.wait_for(function()
      return table.concat(lines, "\n"):find("[sl-calls-1] hello from the job", 1, true) ~= nil
    end), "the job's output did not reach the log: " .. table.concat(lines, "\n"))
    assert.matches("warn: [sl-calls-1] hello from the job", table.concat(lines, "\n"), 1, true)
    p:shutdown()
    assert.is_true(C.wait_no_jobs("sl-calls", H.patience), "the job outlived the pool")
    -- it ended by itself (the runner was told to stop), not by a cancel
    local info = C.job(job)
    if info then assert.are.equal("COMPLETED", info.JobState) end
    -- the followed output files are gone with the runner
    assert.is_true(H.wait_for(function()
      local ls = io.popen("ls " .. H.q(outdir))
      local left = ls:read("a")
      ls:close()
      return left == ""
    end), "the job's output files were left")
  end)

  it("gives the job its name, comment, partition, limits, env and working directory",
    function()
      if not need_cluster() then return end
      local dir = H.tmpdir()
      local p = pool("sl-opts", { backend_opts = {
        partition = "debug", time_limit = "0:10:00", cpus_per_task = 2, mem = "100M",
        env = { GREETING = "hi" }, workdir = dir, extra = { nice = 7 },
      } })
      local greeting, cwd = flame.call(p, function()
        return os.getenv("GREETING"), io.popen("pwd"):read("l")
      end)
      assert.are.equal("hi", greeting)
      assert.are.equal(dir, cwd)
      local id = C.jobs("sl-opts")[1].id
      local j = assert(C.job(id))
      assert.are.equal("flame-sl-opts-1", j.JobName)
      assert.are.equal("debug", j.Partition)
      assert.are.equal("00:10:00", j.TimeLimit)
      assert.are.equal("100M", j.MinMemoryNode)
      assert.are.equal("2", j["CPUs/Task"])
      assert.are.equal("7", j.Nice)
      local _, comment = C.sh("squeue -h -j " .. id .. " -o %k")
      assert.matches("^flame pool=sl%-opts runner=sl%-opts%-1 parent=%w+ pid=%d+ host=", comment)
      p:shutdown()
      assert.is_true(C.wait_no_jobs("sl-opts", H.patience))
      H.rmdir(dir)
    end)

  it("boots up to max; the jobs are gone after idle shutdown and after pool:shutdown",
    function()
      if not need_cluster() then return end
      local booted = {}
      local p = pool("sl-idle", { max = 2, max_concurrency = 1, idle_shutdown_after = 500,
        on_grow_end = function(r) booted[#booted + 1] = r end })
      local ts = {}
      local most = 0
      for i = 1, 4 do
        ts[i] = flame.spawn(function()
          return flame.call(p, function() os.execute("sleep 0.5") return i end)
        end)
      end
      for i = 1, 4 do
        most = math.max(most, #C.jobs("sl-idle"))
        assert.are.equal(i, ts[i]:await())
      end
      assert.is_true(most <= 2, "more jobs than max: " .. most)
      assert.is_true(H.wait_for(function() return #booted == 2 end), "the second boot did not end")
      assert.are.same({ "ok", "ok" }, booted)
      assert.is_true(C.wait_no_jobs("sl-idle", H.patience), "idle runners left jobs")
      assert.is_true(H.wait_for(function() return p:stats().runners == 0 end))
      -- and a pool shut down while its runners are up
      local p2 = pool("sl-stop", { max = 2, min = 2 })
      flame.call(p2, function() end)
      assert.is_true(H.wait_for(function() return #p2.runners == 2 end))
      assert.are.equal(2, #C.jobs("sl-stop"))
      p2:shutdown()
      assert.is_true(C.wait_no_jobs("sl-stop", H.patience), "pool:shutdown left jobs")
    end)

  it("reports runner_down with the job's state when the job is cancelled mid-call",
    function()
      if not need_cluster() then return end
      local p = pool("sl-cancel")
      local lines = C.capture(p)
      local dir = H.tmpdir()
      local t = flame.spawn(function()
        return flame.call(p, function()
          io.open(dir .. "/running", "w"):close()
          os.execute("sleep 60")
        end)
      end)
      assert.is_true(H.wait_for(function() return H.exists(dir .. "/running") end),
        "the call did not start")
      local id = C.jobs("sl-cancel")[1].id
      assert(C.sh("scancel " .. id))
      local err = fails("runner_down", t.await, t)
      -- reported while Slurm ends the job, before the link drops (22.05's API shows
      -- COMPLETING until the job's processes are gone); its final state is logged
      assert.matches("slurm job " .. id .. " of runner sl-cancel-1 was ended by Slurm: "
        .. "COMPLETING", err.message, 1, true)
      assert.is_true(H.wait_for(function()
        return table.concat(lines, "\n"):find("slurm job " .. id
          .. " of runner sl-cancel-1 ended: CANCELLED", 1, true) ~= nil
      end), "the final state was not logged: " .. table.concat(lines, "\n"))
      assert.is_true(C.wait_no_jobs("sl-cancel", H.patience))
      -- the pool boots a new job for the next call
      assert.are.equal("again", flame.call(p, function() return "again" end))
      H.rmdir(dir)
    end)

  it("fails the boot with Slurm's words for an unknown partition", function()
    if not need_cluster() then return end
    local p = pool("sl-nopart", { backend_opts = { partition = "no-such-partition" } })
    local err = fails("boot", flame.call, p, function() end)
    assert.matches("slurm: cannot submit the job of runner sl-nopart-1: Invalid partition "
      .. "name specified", err.message, 1, true)
    assert.are.equal(0, #C.jobs("sl-nopart"))
  end)

  -- the node has 2 CPUs
  local pend = {
    { "more CPUs than the node has", { cpus_per_task = 3 }, "PartitionConfig",
      "asks for more than the partition's nodes have" },
    { "a partition that is down", { partition = "closed" }, "PartitionDown",
      "the partition is down" },
  }
  for _, case in ipairs(pend) do
    it("fails a boot whose job pends past boot_timeout, naming the reason, and cancels it: "
      .. case[1], function()
        if not need_cluster() then return end
        local name = "sl-pend-" .. case[3]:lower()
        local seen
        local p = pool(name, { boot_timeout = 3000, backend_opts = case[2] })
        local t = flame.spawn(function() return pcall(flame.call, p, function() end) end)
        -- the job is there, pending, while the boot waits
        assert.is_true(H.wait_for(function()
          local j = C.jobs(name)[1]
          seen = seen or j
          return j ~= nil
        end), "no job was submitted")
        assert.are.equal("PENDING", seen.state)
        assert.are.equal(case[3], seen.reason)
        local ok, err = t:await()
        assert.is_false(ok)
        assert.are.equal("boot", err.kind, tostring(err))
        assert.matches("slurm job " .. seen.id .. " of runner " .. name
          .. "-1 was still pending after the boot timeout of 3000 ms: Slurm's reason is "
          .. case[3], err.message, 1, true)
        assert.matches(case[4], err.message, 1, true)
        assert.is_true(C.wait_no_jobs(name, H.patience), "the pending job was not cancelled")
      end)
  end

  it("reports a job that fails at once with its state and exit code", function()
    if not need_cluster() then return end
    local p = pool("sl-false", { backend_opts = { flame = "/bin/false" } })
    local err = fails("boot", flame.call, p, function() end)
    assert.matches("slurm job %d+ of runner sl%-false%-1 ended: FAILED, exit code 1", err.message)
    assert.is_true(C.wait_no_jobs("sl-false", H.patience))
  end)

  it("reports an unreachable slurmrestd, and one that serves no API it speaks", function()
    if not need_cluster() then return end
    local p = pool("sl-norestd", { backend_opts = { restd = "unix:///nonexistent/slurmrestd.sock" } })
    local err = fails("boot", flame.call, p, function() end)
    assert.matches("slurm: slurmrestd at unix:///nonexistent/slurmrestd.sock is unreachable",
      err.message, 1, true)
    local p2 = pool("sl-oldapi", { backend_opts = { api_version = "v0.0.1" } })
    local err2 = fails("boot", flame.call, p2, function() end)
    assert.matches("serves none of the job APIs this backend speaks", err2.message, 1, true)
    assert.are.equal(0, #C.jobs("sl-norestd") + #C.jobs("sl-oldapi"))
  end)

  it("speaks the older job API v0.0.37 when pinned", function()
    if not need_cluster() then return end
    local p = pool("sl-v37", { backend_opts = { api_version = "v0.0.37" } })
    assert.are.equal(42, flame.call(p, function() return 42 end))
    p:shutdown()
    assert.is_true(C.wait_no_jobs("sl-v37", H.patience))
  end)

  it("reaches the parent through link.advertise, in the order given", function()
    if not need_cluster() then return end
    local port = C.free_port()
    -- the first address answers nothing: the runner goes on to the next
    local p = pool("sl-advertise", { link = { bind = "127.0.0.1", port = port,
      advertise = { "127.0.0.1:1", "127.0.0.1:" .. port },
      heartbeat_interval = 200, heartbeat_misses = 3 } })
    assert.are.equal("via advertise", flame.call(p, function() return "via advertise" end))
  end)

  it("cancels the jobs when the parent is killed with SIGKILL", function()
    if not need_cluster() then return end
    local dir = H.tmpdir()
    local script = dir .. "/parent.lua"
    local f = assert(io.open(script, "w"))
    f:write(([[
      local p = flame.pool { name = "sl-orphans", backend = "slurm", min = 2, max = 2,
        shutdown_timeout = 500, link = { heartbeat_interval = 200, heartbeat_misses = 3 },
        backend_opts = { workdir = "/tmp", output_dir = %q } }
      flame.call(p, function() end)
      while #p.runners < 2 do flame.sleep(20) end
      io.open(arg[1], "w"):close()
      flame.sleep(60000)
    ]]):format(dir))
    f:close()
    local parent = C.background(script, dir .. "/up")
    assert.is_true(C.wait_file(dir .. "/up"), "the parent did not boot its runners")
    assert.are.equal(2, #C.jobs("sl-orphans"))
    os.execute("kill -9 " .. parent)
    -- each runner sees its link close, ends within shutdown_timeout (500 ms) plus
    -- the heartbeat window (600 ms), and its job ends with it; the budget is generous
    assert.is_true(C.wait_no_jobs("sl-orphans", 20000), "jobs outlived their parent")
    -- the followers of the jobs' output ended with the parent, and took the files
    assert.is_true(H.wait_for(function()
      local ls = io.popen("ls " .. H.q(dir) .. " | grep -c flame-")
      local n = tonumber(ls:read("l"))
      ls:close()
      return n == 0
    end), "the output files of the dead parent's jobs were left")
    H.rmdir(dir)
  end)

  it("sweeps away jobs left by parents of the pool that died, and only those", function()
    if not need_cluster() then return end
    local line = H.line
    local host = line("cat /proc/sys/kernel/hostname")
    local boot = line("cat /proc/sys/kernel/random/boot_id")
    local pidns = line("readlink /proc/self/ns/pid")
    local function left_by(runner, pid, ns)
      local c = ("flame pool=sl-sweep runner=%s parent=gone pid=%d host=%s started=1 boot=%s "
        .. "pidns=%s"):format(runner, pid, host, boot, (ns or pidns):gsub("[^%w%-%._~]",
          function(ch) return ("%%%02X"):format(ch:byte()) end))
      local ok, out = C.sh("sbatch --parsable -J flame-sl-sweep-" .. runner .. " -p closed "
        .. "--comment=" .. H.q(c) .. " --wrap 'sleep 60'")
      assert(ok, out)
      return out:match("%d+")
    end
    local dead = left_by("dead", 999999999)                -- a pid that cannot exist
    local elsewhere = left_by("elsewhere", 999999999, "pid:[1]")  -- another pid namespace
    assert.are.equal(2, #C.jobs("sl-sweep"))
    local p = pool("sl-sweep")
    flame.call(p, function() end)
    local left = {}
    for _, j in ipairs(C.jobs("sl-sweep")) do left[j.id] = true end
    assert.is_nil(left[dead], "the dead parent's job was not cancelled")
    assert.is_true(left[elsewhere], "a job of a parent it cannot judge was cancelled")
    p:shutdown()
    C.sh("scancel " .. elsewhere)
    assert.is_true(C.wait_no_jobs("sl-sweep", H.patience))
  end)

  local bad_options = {
    { { partiton = "debug" }, "unknown option 'partiton' (did you mean 'partition'?)" },
    { { cpus_per_task = "2" }, "option 'cpus_per_task' must be a number (got string)" },
    { { cpus_per_task = 1.5 }, "option 'cpus_per_task' must be a whole number >= 1" },
    { { time_limit = "soon" }, "option 'time_limit' must be minutes or a time like" },
    { { mem = "lots" }, "option 'mem' must be megabytes or a size like \"4G\"" },
    { { env = { "LEVEL=2" } }, "option 'env' must map names to values" },
    { { args = { 1 } }, "option 'args' must be a list of strings" },
    { { restd = "ftp://x" }, 'cannot use restd "ftp://x"' },
    { { api_version = "38" }, "option 'api_version' must be a job API version like" },
    { { poll_interval = 1 }, "option 'poll_interval' must be milliseconds, 50 or more" },
    { { extra = { "x" } }, "option 'extra' must map job description fields to values" },
  }
  for _, case in ipairs(bad_options) do
    it("refuses bad options, naming them: " .. case[2], function()
      -- no cluster needed: init refuses them before anything is asked of slurmrestd
      local o = { restd = "unix:///nonexistent.sock" }
      for k, v in pairs(case[1]) do o[k] = v end
      local p = H.pool { name = "sl-badopt", backend = "slurm", backend_opts = o }
      local err = fails("boot", flame.call, p, function() end)
      assert.matches("slurm backend: " .. case[2], err.message, 1, true)
    end)
  end

  it("refuses a job description field slurmrestd does not know, in its words", function()
    if not need_cluster() then return end
    local p = pool("sl-badextra", { backend_opts = { extra = { no_such_field = 1 } } })
    local err = fails("boot", flame.call, p, function() end)
    assert.matches('Unknown key "no_such_field"', err.message, 1, true)
    assert.are.equal(0, #C.jobs("sl-badextra"))
  end)
end)
