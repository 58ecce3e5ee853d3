-- Parallel checksums: the expensive part of a program (here, CRC-32 of generated
-- files, in pure Lua) runs as flame calls on a pool, concurrently, while the rest of
-- the program stays as it was. Each call reports which worker ran it.
-- Run: flame examples/checksums.lua [files] [KiB each] [backend]
-- (backend: local (default), process, or docker with the image FLAME_IMAGE or
-- flame-runner:latest on DOCKER_HOST's engine: docs/docker.md)
local flame = require "flame"
local core = require "flame.core"

local nfiles = tonumber(arg and arg[1]) or 12
local kib = tonumber(arg and arg[2]) or 256

-- CRC-32 (IEEE), table driven: plain Lua, captured by the closure and sent with it.
local crc_table = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do c = (c & 1) == 1 and (0xEDB88320 ~ (c >> 1)) or (c >> 1) end
  crc_table[i] = c
end
local function crc32(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do c = crc_table[(c ~ s:byte(i)) & 0xFF] ~ (c >> 8) end
  return c ~ 0xFFFFFFFF
end

-- Some "files": deterministic pseudo-random bytes.
local files = {}
for f = 1, nfiles do
  local parts, x = {}, f * 7919
  for i = 1, kib * 1024 // 8 do
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    parts[i] = string.pack("<I8", x * 2654435761)
  end
  files[f] = { name = ("file-%02d.bin"):format(f), data = table.concat(parts) }
end

local backend = arg and arg[3] or "local"
local pool = flame.pool {
  name = "checksums", max = backend == "local" and 1 or 2, max_concurrency = 4,
  timeout = 60000, backend = backend,
  backend_opts = backend == "docker"
    and { image = os.getenv("FLAME_IMAGE") or "flame-runner:latest" } or nil,
}
local function now_ms() return core.hrtime() / 1e6 end

print(("checksumming %d files of %d KiB on pool %q (%s backend, max_concurrency 4)")
  :format(nfiles, kib, pool.name, backend))
local t0 = now_ms()
local tasks = {}
for i, file in ipairs(files) do
  tasks[i] = flame.spawn(function()
    local data = file.data
    local started = now_ms()
    local sum, worker = flame.call(pool, function()
      -- package.loaded survives between calls on one worker: a name for the worker
      package.loaded.worker_name = package.loaded.worker_name
        or ("worker-%04x"):format(math.random(0, 0xffff))
      return crc32(data), package.loaded.worker_name
    end)
    return sum, worker, now_ms() - started
  end)
end

print(("%-14s %10s %12s %9s"):format("file", "crc32", "ran on", "call ms"))
local workers = {}
for i, file in ipairs(files) do
  local sum, worker, call_ms = tasks[i]:await()
  workers[worker] = (workers[worker] or 0) + 1
  assert(sum == crc32(file.data), "the runner's checksum differs from a local one")
  print(("%-14s   %08x %12s %9.1f"):format(file.name, sum, worker, call_ms))
end
local wall = now_ms() - t0

local names = {}
for w, n in pairs(workers) do names[#names + 1] = ("%s: %d"):format(w, n) end
table.sort(names)
print(("%d files in %.0f ms on %d workers (%s); every checksum verified locally")
  :format(nfiles, wall, #names, table.concat(names, ", ")))
local s = pool:stats()
print(("pool stats: runners %d, calls %d, peak concurrent calls %d"):format(
  s.runners, s.calls, s.peak_busy))
pool:shutdown()
