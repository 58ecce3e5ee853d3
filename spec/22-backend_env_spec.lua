-- The backend environment's plain functions (core/benv.c): C functions of the
-- backend state itself (package.loaded["flame.env"] there), checked against
-- lua-cjson and the system on the application side.
local flame = require "flame"
local core = require "flame.core"
local cjson = require "cjson"

local sb
before_each(function() sb = flame.sandbox { profile = "backend" } end)
after_each(function() sb:close() end)

-- Runs fn(...) in the backend state with E = flame.env; returns what it returned.
local function env_call(fn, ...)
  local args = table.pack(...)
  local r = table.pack(sb:call(function()     -- fn and args are copied in with it
    local E = require "flame.env"
    return fn(E, table.unpack(args, 1, args.n))
  end))
  assert(r[1], r[2])
  return table.unpack(r, 2, r.n)
end

describe("flame.env in a backend state", function()
  it("is there in the backend profile, not in the others", function()
    assert.is_true(env_call(function(E) return type(E.json_encode) == "function" end))
    local app = flame.sandbox { profile = "application" }
    local ok, found = app:call(function() return (pcall(require, "flame.env")) end)
    app:close()
    assert.is_true(ok)
    assert.is_false(found)
  end)

  describe("json_encode", function()
    local cases = {
      { "an object", { a = 1, b = "x", c = true } },
      { "an array", { 1, 2.5, "three", false } },
      { "nesting", { list = { { id = 1 }, { id = 2, tags = { "a", "b" } } }, deep = { x = { y = { z = 0 } } } } },
      { "strings that need escapes", { s = "quote \" backslash \\ newline \n tab \t \1 é" } },
      { "number keys", { [10] = "ten", name = "mixed" } },
    }
    for _, case in ipairs(cases) do
      it("makes what lua-cjson reads back the same: " .. case[1], function()
        local text = env_call(function(E, v) return E.json_encode(v) end, case[2])
        local want = cjson.decode(cjson.encode(case[2]))
        assert.are.same(want, cjson.decode(text))
      end)
    end

    it("writes integers exactly and floats to 15 digits", function()
      assert.are.equal("[9223372036854775807,-7,0]",
        env_call(function(E) return E.json_encode({ math.maxinteger, -7, 0 }) end))
      local xs = { 0.1, 1e300, -0.5, 2^53 + 0.0, 1 / 3 }
      local back = cjson.decode(env_call(function(E, v) return E.json_encode(v) end, xs))
      for i, x in ipairs(xs) do
        assert.is_true(math.abs(back[i] - x) <= math.abs(x) * 1e-14, tostring(x))
      end
    end)

    it("makes {} an object and keeps holes of an array as null", function()
      assert.are.equal("{}", env_call(function(E) return E.json_encode({}) end))
      assert.are.equal('{"e":{}}', env_call(function(E) return E.json_encode({ e = {} }) end))
      assert.are.equal("[1,null,3]", env_call(function(E) return E.json_encode({ 1, nil, 3 }) end))
      assert.are.equal('"x"', env_call(function(E) return E.json_encode("x") end))
      assert.are.equal("42", env_call(function(E) return E.json_encode(42) end))
    end)

    local bad = {
      { "a function", function() return { f = function() end } end, "Cannot serialise function" },
      { "NaN", function() return { 0 / 0 } end, "NaN or Infinity" },
      { "infinity", function() return { x = math.huge } end, "NaN or Infinity" },
      { "a NUL in a string", function() return { "a\0b" } end, "NUL" },
      { "a table key", function() return { [{}] = 1 } end, "key must be a number or string" },
      { "a boolean key", function() return { [true] = 1 } end, "key must be a number or string" },
      { "a NUL in a key", function() return { ["a\0b"] = 1 } end, "a key holds a NUL byte" },
      { "an excessively sparse array", function() return { [1] = 1, [100] = 2 } end, "sparse" },
      { "a table holding itself", function() local t = {} t.t = t return t end, "excessive nesting" },
    }
    for _, case in ipairs(bad) do
      it("returns nil and why for " .. case[1], function()
        local v, err = env_call(function(E, make) return E.json_encode(make()) end, case[2])
        assert.is_nil(v)
        assert.matches(case[3], err, 1, true)
      end)
    end
  end)

  describe("json_decode", function()
    it("reads objects, arrays, numbers, strings, with null as nil", function()
      local v = env_call(function(E)
        return E.json_decode('{"a":1,"b":[1,2,{"c":"d"}],"n":null,"f":1.5,"neg":-3,'
          .. '"s":"\\u00e9\\n\\"","t":true,"big":12345678901,"e":1e3,"list":[1,null,3]}')
      end)
      assert.are.same({ a = 1, b = { 1, 2, { c = "d" } }, f = 1.5, neg = -3, s = "é\n\"",
                        t = true, big = 12345678901, e = 1000, list = { 1, nil, 3 } }, v)
      assert.are.equal("integer", math.type(v.a))
      assert.are.equal("integer", math.type(v.big))
      assert.are.equal("float", math.type(v.f))
      assert.is_nil(v.n)
      local z = env_call(function(E) return E.json_decode("[-0.0, 0]") end)
      assert.are.equal("float", math.type(z[1]))
      assert.are.equal("integer", math.type(z[2]))
    end)

    it("reads what lua-cjson writes", function()
      local doc = { Id = "abc", Labels = { ["flame.pool"] = "p" }, State = { Running = true,
                    Pid = 4242, ExitCode = 0 }, Mounts = { { Source = "/x" } } }
      assert.are.same(doc, env_call(function(E, t) return E.json_decode(t) end, cjson.encode(doc)))
    end)

    local bad = {
      { "not JSON", "not json", "character 1" },
      { "garbage after the value", '{"a":1} x', "character" },
      { "a cut document", '{"a":[1,2', "character" },
      { "the empty text", "", "empty" },
      { "nesting past 1000 levels", ("["):rep(2000) .. ("]"):rep(2000), "character" },
    }
    for _, case in ipairs(bad) do
      it("returns nil and why for " .. case[1], function()
        local v, err = env_call(function(E, t) return E.json_decode(t) end, case[2])
        assert.is_nil(v)
        assert.matches(case[3], err, 1, true)
      end)
    end

    it("raises the state's memory error, not a crash, past the backend state's limit", function()
      local small = flame.sandbox { profile = "backend", memory_limit = 4 * 1024 * 1024 }
      local ok, _, err = small:call(function()
        local E = require "flame.env"
        local text = "[" .. ('"xxxxxxxxxxxxxxxx",'):rep(200000) .. "1]"
        return E.json_decode(text)
      end)
      small:close()
      assert.is_false(ok)
      assert.matches("memory", tostring(err))
    end)

    it("raises for a bad argument", function()
      local ok, _, err = sb:call(function() return require("flame.env").json_decode({}) end)
      assert.is_false(ok)
      assert.matches("string expected", err)
    end)
  end)

  it("random_id: n characters of [a-z0-9], different each time", function()
    local a, b = env_call(function(E) return E.random_id(32), E.random_id(32) end)
    assert.matches("^[a-z0-9]+$", a)
    assert.are.equal(32, #a)
    assert.are_not.equal(a, b)
    assert.are.equal(6, #env_call(function(E) return E.random_id(6) end))
    local ok, _, err = sb:call(function() return require("flame.env").random_id(0) end)
    assert.is_false(ok)
    assert.matches("1 to 256", err)
  end)

  it("now: integer milliseconds that go forward", function()
    local t0, t1 = env_call(function(E)
      local a = E.now()
      local x = 0
      for i = 1, 3e6 do x = x + i end
      return a, E.now()
    end)
    assert.are.equal("integer", math.type(t0))
    assert.is_true(t1 >= t0)
    assert.is_true(math.abs(t0 - core.hrtime() // 1000000) < 1000)
  end)

  it("getenv and environ: this process's environment", function()
    local home, none, env = env_call(function(E)
      return E.getenv("PATH"), E.getenv("FLAME_NO_SUCH_VARIABLE_HERE"), E.environ("PAT")
    end)
    assert.are.equal(os.getenv("PATH"), home)
    assert.is_nil(none)
    assert.are.equal(os.getenv("PATH"), env.PATH)
    for k in pairs(env) do assert.are.equal("PAT", k:sub(1, 3)) end
    local ok, _, err = sb:call(function() return require("flame.env").environ(5) end)
    assert.is_false(ok)
    assert.matches("a prefix string expected", err)
  end)

  it("proc_alive: this process is, with its start time; an ended one is not", function()
    local f = io.open("/proc/self/stat")
    local stat = f:read("a")
    f:close()
    local fields = {}
    for v in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = v end
    local started = fields[20]                -- field 22 of the line
    local out = io.popen("sh -c 'echo $$'")
    local gone = tonumber(out:read("l"))
    out:close()
    local mine, same, other, dead, zero = env_call(function(E, pid, st, g)
      return E.proc_alive(pid), E.proc_alive(pid, st), E.proc_alive(pid, st .. "1"),
             E.proc_alive(g), E.proc_alive(0)
    end, core.pid(), started, gone)
    assert.is_true(mine)
    assert.is_true(same)
    assert.is_false(other)
    assert.is_false(dead)
    assert.is_false(zero)
    assert.is_false(env_call(function(E) return E.proc_alive(1e300) end))
    assert.is_false(env_call(function(E) return E.proc_alive(-5) end))
  end)

  it("parent_info: this process, the same in every backend state", function()
    local function line(path)
      local f = assert(io.open(path))
      local l = f:read("l")
      f:close()
      return l
    end
    local stat = line("/proc/self/stat")
    local fields = {}
    for v in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = v end
    local ns = io.popen("readlink /proc/self/ns/pid")
    local pidns = ns:read("l")
    ns:close()
    local me = env_call(function(E) return E.parent_info() end)
    assert.are.equal(core.pid(), me.pid)
    assert.are.equal(line("/proc/sys/kernel/hostname"), me.host)
    assert.are.equal(line("/proc/sys/kernel/random/boot_id"), me.boot)
    assert.are.equal(fields[20], me.started)
    assert.are.equal(pidns, me.pidns)
    assert.matches("^[a-z0-9]+$", me.id)
    assert.are.equal(12, #me.id)
    local other = flame.sandbox { profile = "backend" }
    local ok, again = other:call(function() return require("flame.env").parent_info() end)
    other:close()
    assert.is_true(ok)
    assert.are.same(me, again)
  end)

  it("parent_encode: base64 of the record's JSON", function()
    local rec = { v = 1, ref = "r1", addrs = { "127.0.0.1:4000" }, settings = { max_concurrency = 4 } }
    local text = env_call(function(E, r) return E.parent_encode(r) end, rec)
    assert.are.same(rec, cjson.decode(core.b64decode(text)))
    local ok, _, err = sb:call(function() return require("flame.env").parent_encode({ f = function() end }) end)
    assert.is_false(ok)
    assert.matches("cannot be made JSON", err)
  end)
end)
