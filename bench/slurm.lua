-- bench/slurm.lua - the Slurm backend on the cluster SLURM_CONF and FLAME_SLURMRESTD
-- name (run by bench/slurm). usage: flame bench/slurm.lua [boots]
-- Boots: pools of one runner, each timed from the pool's grow start to the
-- runner's REMOTE_UP (slurmrestd's ping and job list for the sweep, the submit,
-- Slurm's scheduling and launch, the runner's start and its handshake), alternated
-- with plain `sbatch --wrap true` timed from the submit to squeue showing it
-- RUNNING (polled every 10 ms; the sbatch CLI's own start-up included), on the
-- same cluster. Speed is reported, never asserted.
local flame = require "flame"

local BOOTS = tonumber(arg[1]) or 10
local B = require "bench.common"
local ms, percentile = B.ms, B.percentile

local line = B.line

local cores = tonumber(line("nproc")) or 0
print(("Slurm backend, %s, slurmrestd at %s, %d cores"):format(
  tostring(line("sinfo -V 2>/dev/null")), os.getenv("FLAME_SLURMRESTD") or "?", cores))

-- sbatch --wrap true, from the submit to RUNNING (or past it: a job of `true` may
-- have ended by the next look, which counts as having run)
local function plain_job()
  local t = ms()
  local id = line("sbatch --parsable -o /dev/null --wrap true")
  assert(id and id:match("^%d+"), "sbatch failed")
  while true do
    local s = line("squeue -h -j " .. id .. " -o %T 2>/dev/null") or ""
    if s ~= "PENDING" and s ~= "CONFIGURING" then return ms() - t end
    flame.sleep(10)
  end
end

local boots, plain = {}, {}
for i = 1, BOOTS do
  local started
  local p = flame.pool { name = "bench-slurm-" .. i, backend = "slurm", timeout = 120000,
    boot_timeout = 120000, backend_opts = { workdir = "/tmp", output_dir = false },
    on_grow_start = function() started = ms() end,
    on_grow_end = function(r) if r == "ok" then boots[#boots + 1] = ms() - started end end }
  flame.call(p, function() end)
  p:shutdown()
  plain[#plain + 1] = plain_job()
end
table.sort(boots)
table.sort(plain)
print()
print(("%-52s %4s %9s %9s %9s"):format("boot", "n", "p50 ms", "p90 ms", "max ms"))
local function row(name, t)
  print(("%-52s %4d %9.1f %9.1f %9.1f"):format(name, #t, percentile(t, 0.5),
    percentile(t, 0.9), t[#t]))
end
row("flame runner job: grow start to REMOTE_UP", boots)
row("sbatch --wrap true: submit to RUNNING (same cluster)", plain)
