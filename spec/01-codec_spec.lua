-- The codec: every value type round trips exactly; what cannot cross is refused
-- with the path to it.
local flame = require "flame"
local codec = flame.codec

-- Encodes values and decodes them back, functions allowed.
local function trip(...)
  local bytes = assert(codec.encode_values(nil, ...))
  local r = table.pack(codec.decode(bytes, { functions = true }))
  assert(r[1], r[2])
  return table.unpack(r, 2, r.n)
end

local function bits(x)
  return string.pack("<d", x)
end

local V = assert(loadfile("spec/support/values.lua"))()

describe("codec round trips of the shared cases", function()
  for _, case in ipairs(V.scalars) do
    it("keeps " .. case[1], function() case[3](trip(case[2])) end)
  end
  for _, case in ipairs(V.structures) do
    it("keeps " .. case[1], function() case[3](trip(case[2]())) end)
  end
  for _, case in ipairs(V.closures) do
    it("carries " .. case[1], function() case[3](trip(case[2]())()) end)
  end
end)

describe("codec round trips", function()
  local scalars = {
    { "nil", nil }, { "false", false }, { "true", true },
    { "zero", 0 }, { "one", 1 }, { "minus one", -1 },
    { "maxinteger", math.maxinteger }, { "mininteger", math.mininteger },
    { "2^53+1", (1 << 53) + 1 }, { "float 0.5", 0.5 }, { "float 1.0", 1.0 },
    { "float -2.0", -2.0 }, { "pi", math.pi }, { "huge", math.huge },
    { "-huge", -math.huge }, { "tiny", 4.9e-324 }, { "max float", 1.7976931348623157e308 },
    { "empty string", "" }, { "text", "hello, flame" },
    { "long string", string.rep("abcdefgh", 100000) },
    { "embedded zeros", "a\0b\0\0c" },
  }
  for _, case in ipairs(scalars) do
    it("keeps " .. case[1], function()
      local v = trip(case[2])
      assert.are.equal(type(case[2]), type(v))
      assert.are.equal(case[2], v)
      if type(v) == "number" then
        assert.are.equal(math.type(case[2]), math.type(v))
      end
    end)
  end

  it("keeps integers and floats apart", function()
    local i, f = trip(3, 3.0)
    assert.are.equal("integer", math.type(i))
    assert.are.equal("float", math.type(f))
  end)

  it("keeps NaN and its bits", function()
    local nan = 0 / 0
    local v = trip(nan)
    assert.is_true(v ~= v)
    assert.are.equal(bits(nan), bits(v))
    local other = string.unpack("<d", "\1\0\0\0\0\0\248\127")   -- NaN with a payload
    assert.are.equal(bits(other), bits(trip(other)))
  end)

  it("keeps -0.0 apart from 0.0", function()
    local v = trip(-0.0)
    assert.are.equal(-math.huge, 1 / v)
    assert.are.equal(math.huge, 1 / trip(0.0))
  end)

  it("keeps all 256 byte values", function()
    local t = {}
    for b = 0, 255 do t[#t + 1] = string.char(b) end
    local s = table.concat(t)
    assert.are.equal(s, trip(s))
    for b = 0, 255 do
      assert.are.equal(string.char(b), trip(string.char(b)))
    end
  end)

  it("keeps several values, nils between them", function()
    local r = table.pack(trip(1, nil, "x", nil))
    assert.are.equal(4, r.n)
    assert.are.same({ 1, nil, "x", nil, n = 4 }, r)
  end)

  it("encodes no values at all", function()
    local bytes = assert(codec.encode_values(nil))
    local r = table.pack(codec.decode(bytes))
    assert.are.same({ true, n = 1 }, r)
  end)

  it("keeps nested tables, arrays with holes and mixed keys", function()
    local t = { 1, 2, nil, 4, x = { y = { z = "deep" } }, [true] = "yes", [2.5] = "f",
                [-7] = "neg", [0] = "zero" }
    assert.are.same(t, trip(t))
  end)

  it("keeps tables as keys", function()
    local k = { "key" }
    local t = { [k] = "v", other = k }
    local u = trip(t)
    assert.are.equal("v", u[u.other])
  end)

  it("keeps a table reached twice as one table", function()
    local shared = { n = 1 }
    local t = { a = shared, b = shared, list = { shared, shared } }
    local u = trip(t)
    assert.are.equal(u.a, u.b)
    assert.are.equal(u.a, u.list[1])
    assert.are.equal(u.list[1], u.list[2])
    u.a.n = 2
    assert.are.equal(2, u.b.n)
  end)

  it("keeps identity across several values", function()
    local shared = {}
    local a, b = trip(shared, { shared })
    assert.are.equal(a, b[1])
  end)

  it("keeps cycles", function()
    local a, b = {}, {}
    a.b, b.a, a.self = b, a, a
    local u = trip(a)
    assert.are.equal(u, u.self)
    assert.are.equal(u, u.b.a)
  end)

  it("keeps a 100k-entry table", function()
    local t = {}
    for i = 1, 100000 do t[i] = i * 2 end
    for i = 1, 1000 do t["k" .. i] = i end
    local u = trip(t)
    assert.are.equal(100000, #u)
    assert.are.equal(200000, u[100000])
    assert.are.equal(1000, u.k1000)
  end)
end)

describe("codec functions", function()
  it("carries a closure with its upvalues", function()
    local base, name = 10, "x"
    local f = trip(function(n) return name .. (base + n) end)
    assert.are.equal("x15", f(5))
  end)

  it("keeps upvalues shared between two closures shared", function()
    local count = 0
    local function inc() count = count + 1; return count end
    local function get() return count end
    local p = trip({ inc = inc, get = get })
    p.inc(); p.inc()
    assert.are.equal(2, p.get())
    assert.are.equal(0, count)          -- the original is untouched
  end)

  it("keeps sharing when the closures travel as separate values", function()
    local v = 0
    local set, get = trip(function(x) v = x end, function() return v end)
    set(42)
    assert.are.equal(42, get())
  end)

  it("carries nested closures", function()
    local k = 3
    local function make(m) return function(x) return x * m * k end end
    local times = trip(make(2))
    assert.are.equal(30, times(5))
    local maker = trip(make)
    assert.are.equal(12, maker(4)(1))
  end)

  it("carries recursive local functions", function()
    local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
    assert.are.equal(6765, trip(fib)(20))
  end)

  it("carries mutually recursive functions", function()
    local is_even, is_odd
    function is_even(n) if n == 0 then return true end return is_odd(n - 1) end
    function is_odd(n) if n == 0 then return false end return is_even(n - 1) end
    local e = trip(is_even)
    assert.is_true(e(10))
    assert.is_false(e(7))
  end)

  it("sends standard library C functions by name", function()
    local fmt, concat, floor = string.format, table.concat, math.floor
    local f = trip(function(x) return fmt("%03d", floor(x)) .. concat({ "a", "b" }) end)
    assert.are.equal("007ab", f(7.9))
    assert.are.equal(string.format, trip(string.format))
    assert.are.equal(print, trip(print))
    assert.are.equal(math, trip(math))
  end)

  it("sends the globals table as the receiver's environment", function()
    local env = { tag = "receiver" }
    local bytes = assert(codec.encode(function() return tag end))
    local ok, f = codec.decode(bytes, { functions = true, env = env })
    assert.is_true(ok)
    assert.are.equal("receiver", f())
    local ok2, g = codec.decode(assert(codec.encode(_G)), { env = env })
    assert.is_true(ok2)
    assert.are.equal(env, g)
  end)

  it("resolves names only among the receiver's standard libraries", function()
    local ok, err = codec.decode("FL\1\1\10\4nope", { functions = true })
    assert.is_false(ok)
    assert.are.equal("decode: 'nope' is not available here at byte 10", err)
    -- a global that is not a library function does not resolve, and no __index runs
    local called = false
    spec_global = function() end
    setmetatable(_G, { __index = function() called = true end })
    local ok2, err2 = codec.decode("FL\1\1\10\11spec_global", { functions = true })
    setmetatable(_G, nil)
    spec_global = nil
    assert.is_false(ok2)
    assert.matches("'spec_global' is not available here", err2, 1, true)
    assert.is_false(called)
  end)

  it("sends a long string once and then as a reference", function()
    local s = ("x"):rep(100000)
    local one = assert(codec.encode({ s }))
    local many = assert(codec.encode({ s, s, s, s, s, s, s, s, s, s }))
    assert.is_true(#many < #one + 100, ("%d bytes for 10 references"):format(#many))
    local _, t = codec.decode(many)
    assert.are.equal(10, #t)
    for i = 1, 10 do assert.are.equal(s, t[i]) end
  end)

  it("does not treat a name given for errors as a format", function()
    local bytes, err = codec.encode(io.stdout, { name = "%d then %s %%" })
    assert.is_nil(bytes)
    assert.are.equal("1 then %s %%: userdata cannot be sent", err)
  end)

  it("keeps registered metatables and refuses others", function()
    local Point = {}
    Point.__index = Point
    function Point.norm1(p) return math.abs(p.x) + math.abs(p.y) end
    codec.register("spec.Point", Point)
    local p = setmetatable({ x = 3, y = -4 }, Point)
    local q = trip(p)
    assert.are.equal(Point, getmetatable(q))
    assert.are.equal(7, q:norm1())
    local Other = {}
    local ok, err = codec.encode({ inner = setmetatable({}, Other) }, { name = "work" })
    assert.is_nil(ok)
    assert.are.equal("work.inner: table with a metatable cannot be sent (register the "
      .. "metatable by name on both sides: flame.codec.register(name, mt))", err)
  end)

  it("refuses a metatable name the receiver does not know", function()
    local M = {}
    codec.register("spec.Unknown", M)
    local t = setmetatable({}, M)
    local sb = flame.sandbox()            -- a state where the name is not registered
    local ok, kind, err = sb:call(function() return t end)
    sb:close()
    assert.is_false(ok)
    assert.are.equal("decode", kind)
    assert.matches("metatable 'spec.Unknown' is not registered here", err, 1, true)
    assert.has_error(function() codec.register("spec.Other", M) end,
      "metatable already registered as 'spec.Unknown'")
  end)
end)

describe("codec refusals", function()
  local conn = io.stdout
  local co = coroutine.create(function() end)
  local cases = {
    { "a userdata upvalue", function() return conn end,
      "upvalue 'conn' of work: userdata cannot be sent" },
    { "a coroutine in a table", { jobs = { co } },
      "work.jobs[1]: coroutine cannot be sent" },
    { "a userdata nested in upvalues", (function()
        local cfg = { db = { handle = conn } }
        local function helper() return cfg end
        return function() return helper() end
      end)(),
      "(upvalue 'cfg' of upvalue 'helper' of work).db.handle: userdata cannot be sent" },
    { "a C function no loaded module holds", { fn = string.gmatch("", "") },
      "work.fn: C function cannot be sent (only functions of the standard library and "
        .. "of loaded modules travel, by name)" },
    { "a bad key", { [conn] = 1 }, "a key in work: userdata cannot be sent" },
    { "a field with an odd name", { ["two words"] = co },
      "work[\"two words\"]: coroutine cannot be sent" },
    { "a field under a number key", { [2.5] = { [true] = co } },
      "work[2.5][true]: coroutine cannot be sent" },
  }
  for _, case in ipairs(cases) do
    it("refuses " .. case[1] .. " with its path", function()
      local bytes, err = codec.encode(case[2], { name = "work" })
      assert.is_nil(bytes)
      assert.are.equal(case[3], err)
    end)
  end

  it("numbers values when the name asks for it", function()
    local bytes, err = codec.encode_values({ name = "result %d" }, 1, co)
    assert.is_nil(bytes)
    assert.are.equal("result 2: coroutine cannot be sent", err)
  end)

  it("refuses functions when told to", function()
    local bytes, err = codec.encode({ f = function() end }, { name = "result", functions = false })
    assert.is_nil(bytes)
    assert.are.equal("result.f: function cannot be sent here", err)
  end)

  it("refuses nesting deeper than the limit", function()
    local t = {}
    local cur = t
    for _ = 1, 300 do cur.next = {}; cur = cur.next end
    local bytes, err = codec.encode(t)
    assert.is_nil(bytes)
    assert.matches("nested deeper than 200 levels$", err)
    assert.is_string(codec.encode(t, { max_depth = 200 }) == nil and "refused" or nil)
    local shallow = { { { {} } } }
    local _, err2 = codec.encode(shallow, { max_depth = 3 })
    assert.are.equal("value[1][1][1]: nested deeper than 3 levels", err2)
  end)

  it("refuses bytecode unless functions are allowed", function()
    local bytes = assert(codec.encode({ 1, 2, function() return 1 end }))
    local ok, err = codec.decode(bytes)
    assert.is_false(ok)
    assert.matches("^decode: functions are refused here at byte %d+$", err)
    local ok2, err2 = codec.decode(assert(codec.encode(print)))
    assert.is_false(ok2)
    assert.matches("functions are refused here", err2, 1, true)
  end)

  it("rejects bad options as misuse", function()
    assert.has_error(function() codec.encode(1, { functions = "yes" }) end,
      "bad option 'functions' (boolean expected, got string)")
    assert.has_error(function() codec.decode("x", { max_depth = 0 }) end,
      "bad option 'max_depth' (integer in [1, 200] expected)")
    assert.has_error(function() codec.decode({}) end)
  end)

  it("limits the input size and the value count", function()
    local bytes = assert(codec.encode(string.rep("x", 1000)))
    local ok, err = codec.decode(bytes, { max_size = 100 })
    assert.is_false(ok)
    assert.matches("over the limit of 100", err, 1, true)
    local many = assert(codec.encode({ 1, 2, 3, 4, 5 }))
    local ok2, err2 = codec.decode(many, { max_items = 3 })
    assert.is_false(ok2)
    assert.matches("too many values", err2, 1, true)
  end)

  local malformed = {
    { "empty input", "", "decode: truncated input at byte 0" },
    { "a foreign header", "XY\1\0", "decode: not flame codec data at byte 3" },
    { "a newer version", "FL\9\0", "decode: unsupported codec version at byte 3" },
    { "a count past the end", "FL\1\5\0", "decode: value count larger than the input at byte 4" },
    { "an unknown tag", "FL\1\1\99", "decode: unknown tag at byte 5" },
    { "trailing bytes", "FL\1\1\0\0", "decode: trailing bytes at byte 5" },
    { "a bad reference", "FL\1\1\8\1", "decode: bad reference at byte 6" },
    { "a nil key", "FL\1\1\6\0\1\0\1", "decode: table key is nil at byte 8" },
    { "a varint overflow", "FL\1\1\3\255\255\255\255\255\255\255\255\255\2",
      "decode: varint overflow at byte 15" },
    { "a string past the end", "FL\1\1\5\9abc", "decode: truncated input at byte 6" },
  }
  for _, case in ipairs(malformed) do
    it("rejects " .. case[1], function()
      local ok, err = codec.decode(case[2], { functions = true })
      assert.is_false(ok)
      assert.are.equal(case[3], err)
    end)
  end
end)

-- The bytes of a call's work stay C's (core.encode's buffer option, docs/codec.md):
-- a consumer takes them whole, without a copy when they have room for its header.
describe("encoded bytes held by C", function()
  local core = require "flame.core"
  local H = require "spec.helper"

  it("run on a worker as a string would, once, and refuse a second use", function()
    local done = {}
    local ex = core.executor { workers = 1,
      on_done = function(id, status, payload) done[id] = { status, payload } end }
    local bytes = assert(core.encode({ name = "work", buffer = true, head = 9 },
      function() return "from bytes", 42 end))
    assert.are.equal("userdata", type(bytes))
    assert.is_true(#bytes > 0)
    ex:submit(1, bytes)
    local ok, err = pcall(ex.submit, ex, 2, bytes)
    assert.is_false(ok)
    assert.matches("these bytes were sent already", err, 1, true)
    assert.has_error(function() return #bytes end, "these bytes were sent already")
    -- bytes with no room, and a plain string, are copied: both still run
    ex:submit(3, assert(core.encode({ buffer = true }, function() return "no room" end)))
    ex:submit(4, assert(core.encode(nil, function() return "a string" end)))
    assert.is_true(H.wait_for(function() return done[1] and done[3] and done[4] end))
    assert.is_nil(done[2])
    for id, want in pairs { [1] = { "from bytes", 42 }, [3] = { "no room" }, [4] = { "a string" } } do
      assert.are.equal("r", done[id][1])
      local r = table.pack(core.decode(done[id][2]))
      assert.is_true(r[1], tostring(r[2]))
      assert.are.same(want, { table.unpack(r, 2, r.n) })
    end
    assert.has_error(function() ex:submit(5, {}) end,
      "executor: a string or encoded bytes expected")
    ex:close()
  end)

  it("fail to encode as a string does, with the path", function()
    local bytes, err = core.encode({ name = "work", buffer = true, head = 9 }, { io.stdout })
    assert.is_nil(bytes)
    assert.matches("work[1]: userdata cannot be sent", err, 1, true)
    assert.has_error(function() core.encode({ buffer = true, head = 65 }, 1) end)
  end)
end)
