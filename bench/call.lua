-- bench/call.lua - flame.call latency and throughput on a backend (default local).
-- usage: flame bench/call.lua [backend] [seconds-per-row]
-- One row per (work, concurrent callers): p50 and p99 latency of a call, measured
-- around flame.call with a monotonic clock, and calls per second over the row.
-- 1 caller runs on one warm runner; 100 callers on 4 runners (max_concurrency 25).
-- Remote backends also get runner boot times: grow start to REMOTE_UP.
local flame = require "flame"
local core = require "flame.core"

local backend = arg[1] or "local"
local seconds = tonumber(arg[2]) or 2

local function ms() return core.hrtime() / 1e6 end

local big = ("x"):rep(1 << 20)
local works = {
  { "trivial closure", function() return 1 end },
  { "closure capturing 1 MB", function() return #big end },
}

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function row(pool, name, fn, callers)
  local lat = {}
  local t0 = ms()
  local stop_at = t0 + seconds * 1000
  local ts = {}
  for c = 1, callers do
    ts[c] = flame.spawn(function()
      while ms() < stop_at do
        local a = ms()
        flame.call(pool, fn)
        lat[#lat + 1] = ms() - a
      end
    end)
  end
  for c = 1, callers do ts[c]:await() end
  local elapsed = (ms() - t0) / 1000
  table.sort(lat)
  print(("%-24s %8d %8d %10.3f %10.3f %12.0f"):format(name, callers, #pool.runners,
    percentile(lat, 0.5), percentile(lat, 0.99), #lat / elapsed))
end

local one = flame.pool { name = "bench-1", backend = backend, max = 1,
                         max_concurrency = 100, timeout = 60000 }
local four = flame.pool { name = "bench-4", backend = backend, min = 4, max = 4,
                          max_concurrency = 25, timeout = 60000 }
flame.call(one, function() return 0 end)           -- boot the runners first
while #four.runners < 4 do flame.sleep(10) end
print(("flame.call on the %s backend, %g s a row, %d cores"):format(
  backend, seconds, tonumber(io.popen("nproc"):read("l")) or 0))
print(("%-24s %8s %8s %10s %10s %12s"):format("work", "callers", "runners", "p50 ms",
  "p99 ms", "calls/s"))
for _, w in ipairs(works) do
  row(one, w[1], w[2], 1)
  row(four, w[1], w[2], 100)
end
one:shutdown()
four:shutdown()

if backend ~= "local" then
  local boots = {}
  for i = 1, 20 do
    local started
    local p = flame.pool { name = "boot-" .. i, backend = backend,
      on_grow_start = function() started = ms() end,
      on_grow_end = function(r) if r == "ok" then boots[#boots + 1] = ms() - started end end }
    flame.call(p, function() end)
    p:shutdown()
  end
  table.sort(boots)
  print(("runner boot (spawn to REMOTE_UP), %d boots: p50 %.1f ms, p90 %.1f ms"):format(
    #boots, percentile(boots, 0.5), percentile(boots, 0.9)))
end
