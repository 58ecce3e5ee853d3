-- bench/pool.lua - the pool under a burst, and scaling to zero.
-- usage: flame bench/pool.lua [backend]
-- Burst: 1,000 calls of 10 ms each (a sleeping subprocess) arrive at once on
-- max = 10, max_concurrency = 10: time to drain, runners booted, p50/p99 queue wait
-- (a call's time in flame.call less its 10 ms of work: the wait for a slot, and the
-- trip there and back).
-- Scale to zero: idle_shutdown_after = 500, time from the last call's end to zero
-- runners.
local flame = require "flame"
local core = require "flame.core"

local backend = arg[1] or "local"
local function ms() return core.hrtime() / 1e6 end
local function percentile(sorted, p) return sorted[math.max(1, math.ceil(#sorted * p))] end

local booted = 0
local p = flame.pool { name = "burst", backend = backend, max = 10, max_concurrency = 10,
                       idle_shutdown_after = 500, timeout = 120000,
                       on_grow_start = function() booted = booted + 1 end }
local waits = {}
local t0 = ms()
local ts = {}
for i = 1, 1000 do
  ts[i] = flame.spawn(function()
    local a = ms()
    local r = flame.call(p, function() os.execute("sleep 0.01") return i end)
    waits[#waits + 1] = ms() - a - 10
    return r
  end)
end
for i = 1, 1000 do assert(ts[i]:await() == i) end
local drained = ms() - t0
table.sort(waits)
print(("pool burst on the %s backend: 1000 calls of 10 ms, max 10 x max_concurrency 10"):format(backend))
print(("%-28s %10s"):format("measure", "value"))
print(("%-28s %10.0f ms"):format("time to drain", drained))
print(("%-28s %10d"):format("runners booted", booted))
print(("%-28s %10.1f ms"):format("queue wait p50", percentile(waits, 0.5)))
print(("%-28s %10.1f ms"):format("queue wait p99", percentile(waits, 0.99)))
print(("%-28s %10.0f ms"):format("ideal drain (1000/100 x 10)", 1000 / 100 * 10))

local last = ms()
while #p.runners > 0 do flame.sleep(10) end
print(("%-28s %10.0f ms"):format("last call to zero runners", ms() - last))
print(("%-28s %10d ms"):format("idle_shutdown_after", 500))
p:shutdown()
