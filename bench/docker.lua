-- bench/docker.lua - the Docker backend on DOCKER_HOST's engine (run by bench/docker).
-- usage: flame bench/docker.lua IMAGE [seconds-per-row]
-- Boots: 20 pools of one runner, each timed from the pool's grow start to the
-- runner's REMOTE_UP (the API version check, the sweep, create, wait and attach,
-- start, the runner's process start and its handshake), alternated with 20 timed
-- `docker run --rm IMAGE true` on the same engine (the docker CLI's own start-up
-- included). Calls: p50/p99 and calls/s on warm container runners.
local flame = require "flame"

local image = assert(arg[1], "usage: flame bench/docker.lua IMAGE [seconds]")
local seconds = tonumber(arg[2]) or 2
local BOOTS = 20

local B = require "bench.common"
local ms, percentile = B.ms, B.percentile
local function opts(name, extra)
  local o = { name = name, backend = "docker", timeout = 60000,
              backend_opts = { image = image } }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local cores = tonumber(io.popen("nproc"):read("l")) or 0
local version = io.popen("docker version --format '{{.Server.Version}}' 2>/dev/null"):read("l")
print(("Docker backend, engine %s at %s, %d cores"):format(tostring(version),
  os.getenv("DOCKER_HOST") or "?", cores))

-- boots, alternated with plain docker runs
local flame_boots, docker_runs = {}, {}
for i = 1, BOOTS do
  local started
  local p = flame.pool(opts("bench-boot-" .. i, {
    on_grow_start = function() started = ms() end,
    on_grow_end = function(r) if r == "ok" then flame_boots[#flame_boots + 1] = ms() - started end end,
  }))
  flame.call(p, function() end)
  p:shutdown()
  local t = ms()
  assert(os.execute("docker run --rm --network host " .. image .. " true"))
  docker_runs[#docker_runs + 1] = ms() - t
end
table.sort(flame_boots)
table.sort(docker_runs)
print()
print(("%-46s %6s %9s %9s %9s"):format("boot", "n", "p50 ms", "p90 ms", "max ms"))
local function boot_row(name, t)
  print(("%-46s %6d %9.1f %9.1f %9.1f"):format(name, #t, percentile(t, 0.5),
    percentile(t, 0.9), t[#t]))
end
boot_row("flame runner: grow start to REMOTE_UP", flame_boots)
boot_row("docker run --rm IMAGE true (CLI, same engine)", docker_runs)

-- calls on warm runners
print()
print(("calls on warm container runners, %g s a row"):format(seconds))
B.call_table(opts, seconds)
