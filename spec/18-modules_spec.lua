-- Modules by name (docs/codec.md): a loaded module's table travels as its name, a C
-- function or userdata in one as its path, and the receiver uses its own; what comes
-- back may name only modules the parent has loaded. Local and process runners.
local flame = require "flame"
local core = require "flame.core"
local json = require "cjson"
local H = require "spec.helper"

local LINK = { heartbeat_interval = 500, heartbeat_misses = H.slow and 20 or 3 }

describe("the codec, modules by name", function()
  it("sends a loaded module as its name, and a C function in one as its path", function()
    local bytes = assert(core.encode(nil, json, json.encode, json.null))
    assert.matches("cjson", bytes, 1, true)
    assert.is_true(#bytes < 64, "the module's contents were sent")
    local ok, m, enc, null = core.decode(bytes, { functions = true })
    assert.is_true(ok, tostring(m))
    assert.are.equal(json, m)                 -- this state's own: the same table
    assert.are.equal(json.encode, enc)
    assert.are.equal(json.null, null)
  end)

  it("sees a module loaded after its last encode", function()
    assert(core.encode(nil, {}))               -- an index made before the module
    package.loaded["spec_late_module"] = { answer = 42 }
    local bytes = assert(core.encode(nil, package.loaded["spec_late_module"]))
    local ok, m = core.decode(bytes)
    package.loaded["spec_late_module"] = nil
    assert.is_true(ok, tostring(m))
    assert.are.equal(42, m.answer)
    -- once it is gone, a decode refuses the name instead of loading anything
    local ok2, err = core.decode(bytes)
    assert.is_false(ok2)
    assert.matches("module 'spec_late_module' is not loaded here", err, 1, true)
  end)

  it("gives a value reachable in several ways the same path, whatever the hash order", function()
    -- aliases of cjson before and after it in byte order, and a module holding
    -- cjson.encode deeper: the path is cjson's own, in every one of 20 fresh indexes
    for i = 1, 20 do
      local names = { "a_json_" .. i, "zz_json_" .. i, "aaa_holder_" .. i }
      package.loaded[names[1]] = json
      package.loaded[names[2]] = json
      package.loaded[names[3]] = { deep = { enc = json.encode } }
      local b1 = assert(core.encode(nil, json))
      local b2 = assert(core.encode(nil, json.encode))
      for _, n in ipairs(names) do package.loaded[n] = nil end
      assert.is_nil(b1:find("json_", 1, true), "cjson went under an alias")
      assert.matches("cjson", b1, 1, true)
      assert.matches("cjson\0encode", b2, 1, true)
    end
  end)

  it("finds a module's C function after package.loaded got a metatable of the program's", function()
    assert(core.encode(nil, {}))              -- an index made under flame's hook
    local saved = getmetatable(package.loaded)
    setmetatable(package.loaded, { __index = function() return nil end })
    package.loaded["spec_after_mt"] = { f = string.gmatch("", "") }
    local ok, bytes = pcall(core.encode, nil, package.loaded["spec_after_mt"].f)
    package.loaded["spec_after_mt"] = nil
    setmetatable(package.loaded, saved)
    assert.is_true(ok, tostring(bytes))
    assert.is_string(bytes)
    assert.matches("spec_after_mt", bytes, 1, true)
  end)

  it("finds a C function added to a loaded module after its index was made", function()
    package.loaded["spec_grown"] = {}
    assert(core.encode(nil, package.loaded["spec_grown"]))
    package.loaded["spec_grown"].later = string.gmatch("", "")
    local bytes, err = core.encode(nil, package.loaded["spec_grown"].later)
    package.loaded["spec_grown"] = nil
    assert.is_string(bytes, tostring(err))
    assert.matches("spec_grown\0later", bytes, 1, true)
  end)

  it("indexes every module, also after one holding a big table", function()
    package.loaded["aaa_spec_big"] = { data = {} }
    for i = 1, 30000 do package.loaded["aaa_spec_big"].data["k" .. i] = i end
    for i = 1, 10 do package.loaded["spec_small_" .. i] = { f = string.gmatch("", "") } end
    local missing = {}
    for i = 1, 10 do
      if not core.encode(nil, package.loaded["spec_small_" .. i].f) then missing[#missing + 1] = i end
    end
    package.loaded["aaa_spec_big"] = nil
    for i = 1, 10 do package.loaded["spec_small_" .. i] = nil end
    assert.are.same({}, missing)
  end)

  it("refuses module paths an encoder never writes: libraries, the globals, package.loaded", function()
    -- the bytes of a real path, then its path swapped for another (a hostile runner's
    -- result could name any path): T_MODULE is its tag, a length, the path
    package.loaded["spec_sw"] = { fn = string.gmatch("", "") }
    package.loaded["spec_sw2"] = package.loaded      -- a module that is package.loaded
    package.loaded["spec_s3"] = { ggg = _G }          -- the globals in a module's field
    local base = assert(core.encode(nil, package.loaded["spec_sw"].fn))
    local function swapped(to)
      local from = "spec_sw\0fn"
      local i = assert(base:find(from, 1, true))
      assert(base:byte(i - 1) == #from and #to < 128)
      return base:sub(1, i - 2) .. string.char(#to) .. to .. base:sub(i + #from)
    end
    local ok1, v1 = core.decode(swapped("spec_sw\0fn"), { functions = true })
    assert.is_true(ok1, tostring(v1))
    assert.are.equal(package.loaded["spec_sw"].fn, v1)
    local cases = {
      { "_G\0print", "a standard library is not sent as a module" },
      { "io\0write", "a standard library is not sent as a module" },
      { "package\0loaded", "a standard library is not sent as a module" },
      { "spec_sw2\0table\0sort", "it goes through the globals or package.loaded" },
      { "spec_s3\0ggg\0print", "it goes through the globals or package.loaded" },
      { "spec_s3\0ggg", "it names no module, nor a function, table or userdata in one" },
      { "spec_sw2", "it names no module, nor a function, table or userdata in one" },
      { "spec_sw\0a\0b\0c\0d", "deeper than a module's index" },
    }
    for _, c in ipairs(cases) do
      local ok, err = core.decode(swapped(c[1]), { functions = true })
      assert.is_false(ok, c[1])
      assert.matches(c[2], err, 1, true)
    end
    for _, m in ipairs { "spec_sw", "spec_sw2", "spec_s3" } do package.loaded[m] = nil end
  end)

  it("never sends a stale path: a module replaced under its name", function()
    local old_f, new_f = string.gmatch("", ""), string.gmatch("", "")
    package.loaded["spec_rep"] = { f = old_f }
    assert(core.encode(nil, old_f))            -- indexed: spec_rep.f is old_f
    package.loaded["spec_rep"] = { f = new_f } -- replaced: no __newindex for that
    local bytes, err = core.encode(nil, old_f)
    local ok, back = core.decode(bytes or "", { functions = true })
    local nb = core.encode(nil, new_f)
    local ok2, back2 = core.decode(nb, { functions = true })
    package.loaded["spec_rep"] = nil
    assert.is_nil(bytes, "the old function went under the new one's path")
    assert.matches("C function cannot be sent", err, 1, true)
    assert.is_false(ok and back == new_f)
    assert.is_true(ok2)
    assert.are.equal(new_f, back2)
  end)

  it("refuses a module's function where functions are refused (a result)", function()
    local bytes = assert(core.encode(nil, json.encode))
    local ok, err = core.decode(bytes)         -- functions = false: what results get
    assert.is_false(ok)
    assert.matches("functions are refused here", err, 1, true)
    local ok2, t = core.decode(assert(core.encode(nil, json)))   -- a table: fine
    assert.is_true(ok2)
    assert.are.equal(json, t)
  end)

  it("refuses a path to a field the receiver's module lacks", function()
    package.loaded["spec_fields"] = { f = string.gmatch("", "") }
    local bytes = assert(core.encode(nil, package.loaded["spec_fields"].f))
    package.loaded["spec_fields"] = {}
    local ok, err = core.decode(bytes, { functions = true })
    package.loaded["spec_fields"] = nil
    assert.is_false(ok)
    assert.matches("'spec_fields.f' is not available here (module 'spec_fields' has no such field)",
      err, 1, true)
  end)
end)

for _, backend in ipairs { "local", "process" } do
  describe("calls with modules in their closures (" .. backend .. ")", function()
    local dir, saved
    before_each(function()
      dir = H.tmpdir()
      local f = assert(io.open(dir .. "/spec_runner_only.lua", "w"))
      f:write("return { where = 'runner' }\n")
      f:close()
      saved = package.path
      package.path = dir .. "/?.lua;" .. package.path
    end)
    after_each(function()
      package.path = saved
      package.loaded["spec_runner_only"] = nil
      package.loaded["spec_ghost"] = nil
      package.loaded["spec_worker_made"] = nil
      H.cleanup()
      H.rmdir(dir)
    end)

    local function pool(name)
      return H.pool { name = name .. "-" .. backend, backend = backend, link = LINK }
    end

    it("captures cjson, one of its functions and its null", function()
      local p = pool("cjson")
      local encode, null = json.encode, json.null
      assert.are.equal('{"a":1}', flame.call(p, function() return json.encode({ a = 1 }) end))
      assert.are.equal("[1,2]", flame.call(p, function() return encode({ 1, 2 }) end))
      assert.is_true(flame.call(p, function() return json.decode("null") == null end))
    end)

    it("captures flame, which is the runner's flame there", function()
      local p = pool("flame-mod")
      local ref = flame.call(p, function() return flame.parent() and flame.parent().ref end)
      assert.is_string(ref)
      assert.is_nil(flame.parent())              -- here, no parent
    end)

    it("gets back a module the parent has loaded as the parent's own", function()
      local p = pool("back")
      assert.are.equal(json, flame.call(p, function() return require("cjson") end))
    end)

    it("refuses a result naming a module the parent has not loaded, and loads nothing",
      function()
        local p = pool("refused")
        local ok, err = pcall(flame.call, p, function()
          -- a module only the runner has, and no file made (those travel by value)
          package.loaded["spec_worker_made"] = { where = "runner" }
          return package.loaded["spec_worker_made"]
        end)
        assert.is_false(ok)
        assert.are.equal("decode", err.kind, tostring(err))
        assert.matches("module 'spec_worker_made' is not loaded here", err.message, 1, true)
        assert.is_nil(package.loaded["spec_worker_made"])
      end)

    it("sends a module of the program's own Lua files by value, as before modules "
      .. "travelled by name", function()
      -- the runner does not see the file (a container's image has none of the
      -- program's modules until code_sync ships them), yet the work runs
      local m = require("spec_runner_only")
      local runner_path = backend == "process" and "/nonexistent/?.lua" or nil
      local p = H.pool { name = "by-value-" .. backend, backend = backend, link = LINK,
                         backend_opts = runner_path and { env = { LUA_PATH = runner_path } } }
      assert.are.equal("runner", flame.call(p, function() return m.where end))
      if runner_path then
        local ok, err = pcall(flame.call, p, function() return require("spec_runner_only") end)
        assert.is_false(ok)
        assert.matches("module 'spec_runner_only' not found", err.message, 1, true)
      end
    end)

    it("fails a call naming a module the runner cannot load, saying which", function()
      local p = pool("ghost")
      package.loaded["spec_ghost"] = { value = 1 }   -- loaded here, no file anywhere
      local ghost = package.loaded["spec_ghost"]
      local ok, err = pcall(flame.call, p, function() return ghost.value end)
      assert.is_false(ok)
      assert.are.equal("decode", err.kind, tostring(err))
      assert.matches("module 'spec_ghost' cannot be loaded here (install it where the work "
        .. "runs, or ship a Lua module with the pool's code_sync): module 'spec_ghost' not found", err.message, 1, true)
      assert.are.equal(2, flame.call(p, function() return 1 + 1 end))   -- the runner goes on
    end)
  end)
end
