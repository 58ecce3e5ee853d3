-- bench/call.lua - flame.call latency and throughput on a backend (default local).
-- usage: flame bench/call.lua [backend] [seconds-per-row] [tls|clear]
-- One row per (work, concurrent callers): p50 and p99 latency of a call, measured
-- around flame.call with a monotonic clock, and calls per second over the row.
-- 1 caller runs on one warm runner; 100 callers on 4 runners (max_concurrency 25).
-- Remote backends also get runner boot times: grow start to REMOTE_UP.
local flame = require "flame"

local backend = arg[1] or "local"
local seconds = tonumber(arg[2]) or 2
-- the link's TLS (link.tls): "tls" on, "clear" off, else the pool's default ("auto")
local link = arg[3] == "tls" and { tls = true } or arg[3] == "clear" and { tls = false } or nil

local B = require "bench.common"
local ms, percentile = B.ms, B.percentile

print(("flame.call on the %s backend, %g s a row, %d cores%s"):format(
  backend, seconds, tonumber(io.popen("nproc"):read("l")) or 0,
  link and (link.tls and ", link over TLS" or ", link in clear") or ""))
if backend ~= "local" then
  -- boots first, in a fresh parent: after the 1 MB rows the parent's heap holds
  -- hundreds of MB glibc has not returned, and fork() of a runner copies their page
  -- tables (about 12 ms at 330 MB here): that is the parent's cost, not the runner's
  local boots = {}
  for i = 1, 20 do
    local started
    local p = flame.pool { name = "boot-" .. i, backend = backend, link = link,
      on_grow_start = function() started = ms() end,
      on_grow_end = function(r) if r == "ok" then boots[#boots + 1] = ms() - started end end }
    flame.call(p, function() end)
    p:shutdown()
  end
  table.sort(boots)
  print(("runner boot (spawn to REMOTE_UP), %d boots: p50 %.1f ms, p90 %.1f ms"):format(
    #boots, percentile(boots, 0.5), percentile(boots, 0.9)))
end

B.call_table(function(name, extra)
  local o = { name = name, backend = backend, timeout = 60000, link = link }
  for k, v in pairs(extra) do o[k] = v end
  return o
end, seconds)

