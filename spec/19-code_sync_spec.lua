-- code_sync (docs/code_sync.md): the program's own Lua modules, and directories it
-- names, shipped to each runner at boot, unpacked in a directory of the runner's own
-- that comes first on its workers' package.path, and removed when the runner stops.
-- Real runner processes; their environment hides the program's lib/ from them, so
-- what they find came through the pack.
local flame = require "flame"
local core = require "flame.core"
local H = require "spec.helper"

local LINK = { heartbeat_interval = 500, heartbeat_misses = H.slow and 20 or 3 }

local function write(path, text)
  os.execute("mkdir -p " .. H.q(path:match("^(.*)/")))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- The runner's own pid, from inside the work.
local function runner_pid()
  local f = io.open("/proc/self/stat")
  local pid = f:read("n")
  f:close()
  return pid
end

describe("code_sync's packs", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rmdir(dir) end)

  it("packs files sorted, unpacks them as they were, and hashes the same files the same", function()
    write(dir .. "/src/b.lua", "return 2\n")
    write(dir .. "/src/a/x.lua", "return 1\n")
    local files = assert(core.list_files(dir .. "/src"))
    table.sort(files)
    assert.are.same({ "a/x.lua", "b.lua" }, files)
    local list = {}
    for _, rel in ipairs(files) do list[#list + 1] = { rel, dir .. "/src/" .. rel } end
    local pack, hash, bytes = core.code_pack(list, 1000)
    assert.are.equal(18, bytes)
    assert.matches("^%x+$", hash)
    local pack2, hash2 = core.code_pack({ list[2], list[1] }, 1000)
    assert.are.equal(pack, pack2)
    assert.are.equal(hash, hash2)
    os.execute("mkdir " .. H.q(dir .. "/out"))
    assert.are.equal(2, core.code_unpack(pack, dir .. "/out"))
    assert.are.equal("return 1\n", io.open(dir .. "/out/a/x.lua"):read("a"))
    assert.are.equal("return 2\n", io.open(dir .. "/out/b.lua"):read("a"))
  end)

  it("refuses a pack over its limit, naming the largest files", function()
    write(dir .. "/big.bin", string.rep("x", 3000))
    write(dir .. "/small.lua", "return 1\n")
    local pack, err = core.code_pack({ { "small.lua", dir .. "/small.lua" },
                                       { "big.bin", dir .. "/big.bin" } }, 2048)
    assert.is_nil(pack)
    assert.matches("code_sync: the code to ship is 2.9 KB, over its limit of 2.0 KB", err, 1, true)
    assert.matches("largest files: " .. dir .. "/big.bin (2.9 KB), " .. dir .. "/small.lua", err, 1, true)
    assert.matches("raise code_sync.max_bytes", err, 1, true)
  end)

  it("refuses bytes that are not a pack, and paths that would leave the directory", function()
    os.execute("mkdir " .. H.q(dir .. "/out"))
    local function entry(path, content)
      return string.pack("<s2BI8", path, 0, #content) .. content
    end
    local function pack(...)
      local e = { ... }
      return "FLPK\1" .. string.pack("<I4", #e) .. table.concat(e)
    end
    local cases = {
      { "", "no FLPK header" },
      { "FLPK\2\0\0\0\0", "code pack version 2" },
      { pack(entry("../evil.lua", "x")), "a path a runner may not write" },
      { pack(entry("/abs.lua", "x")), "a path a runner may not write" },
      { pack(entry("a//b.lua", "x")), "a path a runner may not write" },
      { pack(entry("a/./b.lua", "x")), "a path a runner may not write" },
      { pack(entry("a\\b.lua", "x")), "a path a runner may not write" },
      { pack(entry("b.lua", "x"), entry("a.lua", "y")), "out of order or twice" },
      { pack(entry("a.lua", "x"), entry("a.lua", "y")), "out of order or twice" },
      { pack(entry("a.lua", "x")):sub(1, -2), "cut short" },
      { pack(entry("a.lua", "x")) .. "z", "1 bytes after its last file" },
      { "FLPK\1" .. string.pack("<I4", 1) .. string.pack("<s2BI8", "a.lua", 7, 0), "mode 7" },
    }
    for _, c in ipairs(cases) do
      local n, err = core.code_unpack(c[1], dir .. "/out")
      assert.is_nil(n, c[2])
      assert.matches(c[2], err, 1, true)
    end
    -- nothing was written, in the directory or beside it
    assert.are.same({}, core.list_files(dir))
    -- a bad file after good ones: the good ones are not written either
    assert.is_nil(core.code_unpack(pack(entry("a.lua", "x"), entry("b/../../c", "y")), dir .. "/out"))
    assert.are.same({}, core.list_files(dir))
  end)
end)

describe("code_sync on process runners", function()
  local dir, saved_path
  -- the runners see Lua's default path only: the program's lib/ reaches them in the
  -- pack or not at all
  local HIDDEN = { LUA_PATH_5_4 = ";;", LUA_PATH = ";;" }

  before_each(function()
    dir = H.tmpdir()
    write(dir .. "/lib/app/util.lua", [[
local _, file = ...
local M = { sub = { scale = 3 } }
function M.resize(x) return x * M.sub.scale end
function M.where() return file end
return M
]])
    write(dir .. "/lib/app/geometry/init.lua", "return { area = function(w, h) return w * h end }\n")
    write(dir .. "/lib/app/later.lua", "return { answer = function() return 42 end }\n")
    saved_path = package.path
    -- as a program does at its start: its own directory first
    package.path = dir .. "/lib/?.lua;" .. dir .. "/lib/?/init.lua;" .. package.path
  end)

  after_each(function()
    H.cleanup()
    package.path = saved_path
    for _, m in ipairs { "app.util", "app.geometry", "app.later", "app.data" } do
      package.loaded[m] = nil
    end
    H.rmdir(dir)
  end)

  local function pool(name, opts)
    local o = { name = name, backend = "process", code_sync = true, link = LINK,
                backend_opts = { env = HIDDEN } }
    for k, v in pairs(opts or {}) do o[k] = v end
    return H.pool(o)
  end

  it("runs closures holding the program's module, a function and a nested table of it", function()
    local util = require "app.util"
    local geometry = require "app.geometry"
    local resize, sub = util.resize, util.sub
    local p = pool("cs-closures")
    local r = { flame.call(p, function()
      return util.resize(2), resize(3), sub.scale, geometry.area(4, 5),
        util == require("app.util"), resize == require("app.util").resize,
        sub == require("app.util").sub, geometry == require("app.geometry"),
        util.where(), flame.parent().code_dir
    end) }
    assert.are.same({ 6, 9, 3, 20, true, true, true, true }, { table.unpack(r, 1, 8) })
    local code_dir = r[10]
    assert.is_string(code_dir)
    assert.matches("/flame%-code%-%d+%-", code_dir)
    assert.are.equal(code_dir .. "/app/util.lua", r[9])
  end)

  it("sends the program's modules by name, not by value", function()
    local util = require "app.util"
    local p = pool("cs-size")
    flame.call(p, function() return true end)   -- booted: its pack is the pool's
    local work = function() return util end
    local synced = assert(core.encode({ synced = { ["app.util"] = true } }, work))
    local plain = assert(core.encode(nil, work))
    assert.is_true(#synced < #plain, "the module went by value")
    assert.matches("app.util", synced, 1, true)
    -- results travel by value: a table of the runner's module comes back a copy
    local back = flame.call(p, function() return util.sub end)
    assert.are_not.equal(util.sub, back)
    assert.are.same({ scale = 3 }, back)
  end)

  it("runs { module, fn, args } and require in the work with synced modules", function()
    require "app.util"
    require "app.geometry"
    local p = pool("cs-mfa", { boot_timeout = math.huge })   -- no bound on the wait too
    assert.are.equal(12, flame.call(p, { "app.geometry", "area", { 3, 4 } }))
    assert.are.equal(15, flame.call(p, function() return require("app.util").resize(5) end))
  end)

  it("loads --require modules from the pack", function()
    require "app.util"
    local p = pool("cs-require", { backend_opts = { env = HIDDEN, args = { "--require", "app.util" } } })
    assert.is_true(flame.call(p, function()
      return package.loaded["app.util"] ~= nil
    end))
  end)

  it("fails the boot with the runner's words when a --require module is not in the pack", function()
    local p = pool("cs-require-missing", { backend_opts = { env = HIDDEN,
      args = { "--require", "app.nowhere" } } })
    local ok, err = pcall(flame.call, p, function() return 1 end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind)
    assert.matches("module 'app.nowhere' not found", err.message, 1, true)
  end)

  it("ships directories named in paths, data files too", function()
    write(dir .. "/assets/tpl/page.txt", "hello from the pack\n")
    local p = pool("cs-paths", { code_sync = { paths = { dir .. "/assets" } } })
    assert.are.equal("hello from the pack\n", flame.call(p, function()
      local f = assert(io.open(flame.parent().code_dir .. "/tpl/page.txt"))
      local s = f:read("a")
      f:close()
      return s
    end))
    -- modules = false with paths: the program's modules are not shipped
    require "app.util"
    local ok, err = pcall(flame.call, p, function() return require("app.util") end)
    assert.is_false(ok)
    assert.matches("module 'app.util' not found", tostring(err), 1, true)
  end)

  it("removes the runner's directory when the runner stops, and after a kill -9 at the next boot", function()
    require "app.util"
    local p = pool("cs-cleanup")
    local code_dir, pid = flame.call(p, function()
      local f = io.open("/proc/self/stat")
      local n = f:read("n")
      f:close()
      return flame.parent().code_dir, n
    end)
    assert.is_truthy(core.file_info(code_dir))
    p:shutdown()
    assert.is_false(H.alive(pid))
    assert.is_nil(core.file_info(code_dir), "the runner's directory is left behind")

    -- killed: nothing runs to remove it; the next runner on this machine does
    local p2 = pool("cs-killed")
    local dir2, pid2 = flame.call(p2, function()
      local f = io.open("/proc/self/stat")
      local n = f:read("n")
      f:close()
      return flame.parent().code_dir, n
    end)
    os.execute("kill -9 " .. pid2)
    assert.is_true(H.wait_for(function() return not H.alive(pid2) end))
    assert.is_truthy(core.file_info(dir2))
    p2:shutdown()
    local p3 = pool("cs-after-kill")
    flame.call(p3, function() return true end)
    assert.is_nil(core.file_info(dir2), "a dead runner's directory was not swept")
  end)

  it("gives each runner its pack once, and runners booted later the modules loaded since", function()
    require "app.util"
    local lines = {}
    local p = pool("cs-later", { single_use = true, max = 2 })
    p.log.warn = function(fmt, ...) lines[#lines + 1] = fmt:format(...) end
    local n1 = flame.call(p, function() return package.loaded["app.later"] == nil end)
    assert.is_true(n1)
    local later = require "app.later"
    -- a runner booted now has app.later in its pack: it goes by name and resolves there
    assert.are.same({ 42, true }, { flame.call(p, function()
      return later.answer(), later == require("app.later")
    end) })
    local unpacked = 0
    for _, l in ipairs(lines) do
      if l:find("code_sync: %d+ files in") then unpacked = unpacked + 1 end
    end
    assert.are.equal(2, unpacked, table.concat(lines, "\n"))   -- one a runner
  end)

  it("sends a module loaded after a runner booted to that runner by value", function()
    require "app.util"
    local p = pool("cs-old-runner", { max = 1 })
    flame.call(p, function() return true end)
    local later = require "app.later"
    -- this runner's pack lacks app.later: the module goes by value, and works
    assert.are.same({ 42, false }, { flame.call(p, function()
      return later.answer(), (pcall(require, "app.later"))
    end) })
  end)

  it("fails a boot whose code grew over its limit since the pool was made, naming the file", function()
    require "app.util"
    local p = pool("cs-grown", { code_sync = { modules = true, max_bytes = 6000 } })
    write(dir .. "/lib/app/big.lua", "return { s = '" .. string.rep("x", 8000) .. "' }\n")
    require "app.big"
    local ok, err = pcall(flame.call, p, function() return 1 end)
    package.loaded["app.big"] = nil
    assert.is_false(ok)
    assert.are.equal("boot", err.kind, tostring(err))
    assert.matches("over its limit of 5.9 KB; largest files: " .. dir .. "/lib/app/big.lua",
      err.message, 1, true)
  end)

  it("reports a module whose loading on the runner runs past the call's timeout as a timeout", function()
    write(dir .. "/lib/app/slow.lua",
      "if require('flame').parent() then while true do end end\nreturn { ok = true }\n")
    local slow = require "app.slow"           -- on the parent it loads at once; in the
    local p = pool("cs-slow-require")         -- pack of the runner booted now
    flame.call(p, function() return true end)   -- warm: the timeout below is the work's
    local ok, err = pcall(flame.call, p, function() return slow.ok end, { timeout = 1500 })
    package.loaded["app.slow"] = nil
    assert.is_false(ok)
    assert.are.equal("timeout", err.kind, tostring(err))
    assert.are.equal("run", err.phase)
  end)

  it("refuses bad options, naming them", function()
    local cases = {
      { 5, "option 'code_sync' must be true, false or {" },
      { { pathz = {} }, "unknown key 'pathz'" },
      { { paths = "lib" }, "paths must be a list of directories" },
      { { paths = { dir .. "/none" } }, "is not a directory (it does not exist)" },
      { { paths = { dir .. "/lib/app/util.lua" } }, "is not a directory (it is a file)" },
      { { max_bytes = -1 }, "max_bytes must be an integer >= 0" },
      { { modules = "yes" }, "modules must be a boolean" },
      { { max_bytes = 10 }, "over its limit of 10 bytes" },
    }
    require "app.util"
    for i, c in ipairs(cases) do
      local ok, err = pcall(flame.pool, { name = "cs-bad-" .. i, backend = "process",
                                          code_sync = c[1] })
      assert.is_false(ok, c[2])
      assert.are.equal("invalid", err.kind)
      assert.matches(c[2], err.message, 1, true)
    end
  end)

  it("is not needed on the local backend: its workers read the program's files", function()
    local util = require "app.util"
    local p = H.pool { name = "cs-local", backend = "local", code_sync = true }
    assert.are.equal(6, flame.call(p, function() return util.resize(2) end))
  end)
end)
