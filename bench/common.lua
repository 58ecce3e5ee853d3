-- bench/common.lua - what the Lua benchmarks share: a monotonic clock in ms, a
-- percentile of sorted samples, and the table of flame.call latency and throughput
-- (loaded as require "bench.common": the bench scripts run from the checkout).
local flame = require "flame"
local core = require "flame.core"

local M = {}

function M.ms() return core.hrtime() / 1e6 end

--- The first line a shell command prints.
function M.line(cmd)
  local p = assert(io.popen(cmd))
  local l = p:read("l")
  p:close()
  return l
end

function M.percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

-- One row: `callers` tasks call fn on pool for `seconds`; p50, p99 and calls/s.
local function row(pool, name, fn, callers, seconds)
  local lat, ts = {}, {}
  local t0 = M.ms()
  local stop_at = t0 + seconds * 1000
  for c = 1, callers do
    ts[c] = flame.spawn(function()
      while M.ms() < stop_at do
        local a = M.ms()
        flame.call(pool, fn)
        lat[#lat + 1] = M.ms() - a
      end
    end)
  end
  for c = 1, callers do ts[c]:await() end
  local elapsed = (M.ms() - t0) / 1000
  table.sort(lat)
  print(("%-24s %8d %8d %10.3f %10.3f %12.0f"):format(name, callers, #pool.runners,
    M.percentile(lat, 0.5), M.percentile(lat, 0.99), #lat / elapsed))
end

--- The call table: a trivial closure and one capturing 1 MB, each with 1 caller on
-- one warm runner and with 100 callers over 4 runners (max_concurrency 25).
-- pool_opts(name, extra) gives the options of a pool of the backend measured.
function M.call_table(pool_opts, seconds)
  local big = ("x"):rep(1 << 20)
  local works = {
    { "trivial closure", function() return 1 end },
    { "closure capturing 1 MB", function() return #big end },
  }
  local one = flame.pool(pool_opts("bench-1", { max = 1, max_concurrency = 100 }))
  local four = flame.pool(pool_opts("bench-4", { min = 4, max = 4, max_concurrency = 25 }))
  flame.call(one, function() return 0 end)           -- boot the runners first
  while #four.runners < 4 do flame.sleep(10) end
  print(("%-24s %8s %8s %10s %10s %12s"):format("work", "callers", "runners", "p50 ms",
    "p99 ms", "calls/s"))
  for _, w in ipairs(works) do
    row(one, w[1], w[2], 1, seconds)
    row(four, w[1], w[2], 100, seconds)
  end
  one:shutdown()
  four:shutdown()
end

return M
