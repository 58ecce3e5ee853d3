-- bench/code_sync.lua - what code_sync adds to a runner's boot (docs/code_sync.md):
-- boot time (grow start to the end of the boot: REMOTE_UP, and with code_sync the
-- pack sent, checked, unpacked and the workers started) on the process backend,
-- without code_sync and with packs of several sizes; and the pack's making (once per
-- content, so a boot after the first reuses it).
-- usage: flame bench/code_sync.lua [boots]
local flame = require "flame"
local core = require "flame.core"
local B = require "bench.common"

local boots = tonumber(arg[1]) or 20
local dir = B.line("mktemp -d")

-- a lib/ of n modules of about size bytes each
local function make_lib(name, n, size)
  local lib = dir .. "/" .. name
  os.execute("mkdir -p " .. lib .. "/benchapp")
  local body = "return { s = [[" .. string.rep("x", size) .. "]] }\n"
  for i = 1, n do
    local f = assert(io.open(("%s/benchapp/m%d.lua"):format(lib, i), "w"))
    f:write(body)
    f:close()
  end
  return lib
end

local function measure(label, code_sync)
  local times = {}
  for i = 1, boots do
    local started
    local p = flame.pool { name = ("cs-bench-%s-%d"):format(label, i), backend = "process",
      code_sync = code_sync,
      on_grow_start = function() started = B.ms() end,
      on_grow_end = function(r) if r == "ok" then times[#times + 1] = B.ms() - started end end }
    flame.call(p, function() end)
    p:shutdown()
  end
  table.sort(times)
  return times
end

print(("code_sync on the process backend, %d boots a row, %s cores"):format(boots,
  B.line("nproc")))
print(("%-34s %10s %10s %10s %12s"):format("pack", "files", "bytes", "boot p50", "boot p90"))
local rows = {
  { "none (code_sync off)", false },
  { "program modules (true)", true },
}
local cases = { { "paths: 20 files, 1 MB", 20, 50 * 1024 }, { "paths: 100 files, 10 MB", 100, 100 * 1024 },
                { "paths: 200 files, 50 MB", 200, 250 * 1024 } }
for i, c in ipairs(cases) do
  rows[#rows + 1] = { c[1], { paths = { make_lib("lib" .. i, c[2], c[3]) } } }
end
for n, r in ipairs(rows) do
  local files, bytes = 0, 0
  if r[2] then
    local cs = require("flame.code_sync")
    local pk = assert(cs.pack(assert(cs.check(r[2]))))
    files, bytes = pk.files, pk.bytes
  end
  local t = measure(tostring(n), r[2])
  print(("%-34s %10d %10d %8.1f ms %9.1f ms"):format(r[1], files, bytes,
    B.percentile(t, 0.5), B.percentile(t, 0.9)))
end

-- making a pack: the first time (files read, hashed) and again (unchanged: reused)
local cs = require("flame.code_sync")
local cfg = assert(cs.check({ paths = { dir .. "/lib3" } }))
local t0 = B.ms()
local pk = assert(cs.pack(cfg))
local first = B.ms() - t0
t0 = B.ms()
assert(cs.pack(cfg, pk) == pk)
local again = B.ms() - t0
print(("making the 50 MB pack: %.1f ms; again, unchanged: %.2f ms"):format(first, again))
os.execute("rm -rf " .. dir)
