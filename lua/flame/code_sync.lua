--- code_sync: the application's own code shipped to each runner at boot
-- (docs/code_sync.md). What to ship is found here; packing, hashing and the files
-- themselves are C's (core/pack_lua.c); the runner unpacks (core/codedir.c).
-- @module flame.code_sync
local core = require "flame.core"

local M = {}

M.MAX_BYTES = 64 * 1024 * 1024

local STD = { _G = true, string = true, table = true, math = true, utf8 = true,
              coroutine = true, os = true, io = true, debug = true, package = true }

local function describe(v)
  if type(v) == "string" then return ("string %q"):format(v) end
  return type(v) == "table" and "a table" or (type(v) .. " " .. tostring(v))
end

local function absolute(p)
  if p:sub(1, 1) == "/" then return p end
  local cwd = assert(core.cwd())
  p = p:gsub("^%./", "")
  return cwd .. "/" .. p
end

local function trim(p)
  p = p:gsub("/+$", "")
  return p == "" and "/" or p
end

--- The option checked and made whole: nil (off), or { modules, paths, max_bytes };
-- a second result says what is wrong.
function M.check(v)
  if v == nil or v == false then return nil end
  if v == true then return { modules = true, paths = {}, max_bytes = M.MAX_BYTES } end
  local shape = "true, false or { paths = { dir, ... }, modules = boolean, max_bytes = n }"
  if type(v) ~= "table" then return nil, ("must be %s (got %s)"):format(shape, describe(v)) end
  for k in pairs(v) do
    if k ~= "paths" and k ~= "modules" and k ~= "max_bytes" then
      return nil, ("has an unknown key '%s' (it takes paths, modules, max_bytes)")
        :format(tostring(k))
    end
  end
  local cfg = { paths = {}, max_bytes = M.MAX_BYTES }
  if v.modules ~= nil and type(v.modules) ~= "boolean" then
    return nil, ("modules must be a boolean (got %s)"):format(describe(v.modules))
  end
  cfg.modules = v.modules == nil and v.paths == nil or v.modules == true
  if v.max_bytes ~= nil then
    if math.type(v.max_bytes) ~= "integer" or v.max_bytes < 0 then
      return nil, ("max_bytes must be an integer >= 0 (got %s)"):format(describe(v.max_bytes))
    end
    cfg.max_bytes = v.max_bytes
  end
  if v.paths ~= nil then
    if type(v.paths) ~= "table" then
      return nil, ("paths must be a list of directories (got %s)"):format(describe(v.paths))
    end
    for i, p in ipairs(v.paths) do
      if type(p) ~= "string" or p == "" then
        return nil, ("paths[%d] must be a directory's name (got %s)"):format(i, describe(p))
      end
      local kind = core.file_info(p)
      if kind ~= "directory" then
        return nil, ("paths[%d]: '%s' is not a directory (%s)"):format(i, p,
          kind and ("it is a " .. kind) or "it does not exist")
      end
      cfg.paths[i] = trim(absolute(p))
    end
  end
  return cfg
end

-- Directories whose modules are not the application's: Lua's own default path
-- (the system's modules) and flame's own.
local function foreign_dirs()
  local dirs = {}
  for _, d in ipairs(core.lua_system_dirs()) do dirs[#dirs + 1] = d end
  local own = package.searchpath("flame", package.path)
  if own then dirs[#dirs + 1] = absolute(own):gsub("init%.lua$", "") end
  return dirs
end

local function under(file, dirs)
  for _, d in ipairs(dirs) do
    if file:sub(1, #d) == d then return true end
  end
  return false
end

-- The file a module name is found in, and where it goes in the pack.
local function module_file(name)
  if type(name) ~= "string" or STD[name] or name == "" then return nil end
  local file = package.searchpath(name, package.path)
  if not file then return nil end
  local base = name:gsub("%.", "/")
  local rel = base .. ".lua"
  if file:sub(-#("/" .. base .. "/init.lua")) == "/" .. base .. "/init.lua" then
    rel = base .. "/init.lua"
  end
  return absolute(file), rel
end

--- What to ship now: the pack (reused when no file changed since last), or nil and
-- why (a file that cannot be read, more than max_bytes). last is the pool's last
-- pack. A pack: { pack, hash (hex), raw (the SHA-256's bytes), files, bytes,
-- synced = { module = true } (the loaded modules the pack holds), sig }.
function M.pack(cfg, last)
  local entries, taken = {}, {}
  local function add(rel, abs)
    if taken[rel] then return end
    taken[rel] = abs
    entries[#entries + 1] = { rel, abs }
  end
  for _, dir in ipairs(cfg.paths) do
    local files, err = core.list_files(dir)
    if not files then return nil, err end
    for _, rel in ipairs(files) do add(rel, dir .. "/" .. rel) end
  end
  if cfg.modules then
    local foreign = foreign_dirs()
    local names = {}
    for name in pairs(package.loaded) do names[#names + 1] = name end
    for _, name in ipairs(names) do
      local abs, rel = module_file(name)
      if abs and not under(abs, foreign) then add(rel, abs) end
    end
  end
  -- the loaded modules whose file is the one shipped go by name (codec's synced)
  local synced = {}
  for name in pairs(package.loaded) do
    local abs, rel = module_file(name)
    if abs and taken[rel] == abs then synced[name] = true end
  end
  table.sort(entries, function(a, b) return a[1] < b[1] end)
  local sig = {}
  for i, e in ipairs(entries) do
    local kind, size, mtime = core.file_info(e[2])
    if kind ~= "file" then
      return nil, ("code_sync: cannot read %s: %s"):format(e[2], size or "not a file")
    end
    sig[i] = ("%s\0%s\0%d\0%d"):format(e[1], e[2], size, mtime)
  end
  sig = table.concat(sig, "\n") .. "\n" .. cfg.max_bytes
  if last and last.sig == sig then
    last.synced = synced
    return last
  end
  local pack, hash, bytes = core.code_pack(entries, cfg.max_bytes)
  if not pack then return nil, hash end
  return { pack = pack, hash = hash, bytes = bytes, files = #entries, synced = synced,
           sig = sig,
           raw = hash:gsub("..", function(h) return string.char(tonumber(h, 16)) end) }
end

return M
