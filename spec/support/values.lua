-- Values and closures every path that carries work must keep exactly: the codec
-- itself (spec/01) and flame.call on every backend (spec/support/calls.lua).
-- Each case: { name, make } where make() returns the value to send and a check
-- function(got) that raises when the value did not survive.
local V = {}

local function same_number(a)
  return function(b)
    assert(math.type(a) == math.type(b), ("math.type %s became %s"):format(
      math.type(a), math.type(b)))
    assert(string.pack("<n", a) == string.pack("<n", b) or a == b,
      ("number %s became %s"):format(tostring(a), tostring(b)))
  end
end

local function equal(a)
  return function(b) assert(a == b, ("%q became %q"):format(tostring(a), tostring(b))) end
end

local all_bytes = {}
for b = 0, 255 do all_bytes[#all_bytes + 1] = string.char(b) end
all_bytes = table.concat(all_bytes)

V.scalars = {
  { "nil", nil, equal(nil) }, { "false", false, equal(false) }, { "true", true, equal(true) },
  { "zero", 0, same_number(0) }, { "one", 1, same_number(1) }, { "minus one", -1, same_number(-1) },
  { "maxinteger", math.maxinteger, same_number(math.maxinteger) },
  { "mininteger", math.mininteger, same_number(math.mininteger) },
  { "2^53+1", (1 << 53) + 1, same_number((1 << 53) + 1) },
  { "float 0.5", 0.5, same_number(0.5) }, { "float 1.0", 1.0, same_number(1.0) },
  { "float -2.0", -2.0, same_number(-2.0) }, { "pi", math.pi, same_number(math.pi) },
  { "inf", math.huge, same_number(math.huge) }, { "-inf", -math.huge, same_number(-math.huge) },
  { "denormal", 4.9e-324, same_number(4.9e-324) },
  { "largest float", 1.7976931348623157e308, same_number(1.7976931348623157e308) },
  { "NaN", 0 / 0, function(b)
      assert(b ~= b, "NaN became " .. tostring(b))
      assert(string.pack("<d", 0 / 0) == string.pack("<d", b), "NaN bits changed")
    end },
  { "NaN with a payload", string.unpack("<d", "\1\0\0\0\0\0\248\127"), function(b)
      assert(string.pack("<d", b) == "\1\0\0\0\0\0\248\127", "NaN payload changed")
    end },
  { "-0.0", -0.0, function(b) assert(1 / b == -math.huge, "-0.0 lost its sign") end },
  { "empty string", "", equal("") }, { "text", "hello, flame", equal("hello, flame") },
  { "all 256 byte values", all_bytes, equal(all_bytes) },
  { "embedded zeros", "a\0b\0\0c", equal("a\0b\0\0c") },
  { "a 1 MB string", ("0123456789abcdef"):rep(65536), equal(("0123456789abcdef"):rep(65536)) },
}

-- Structured cases: make() returns a value; check(got, original) raises on loss.
V.structures = {
  { "nested tables, holes and mixed keys", function()
      return { 1, 2, nil, 4, x = { y = { z = "deep" } }, [true] = "yes", [2.5] = "f",
               [-7] = "neg", [0] = "zero" }
    end, function(got)
      assert(got[1] == 1 and got[2] == 2 and got[3] == nil and got[4] == 4)
      assert(got.x.y.z == "deep" and got[true] == "yes" and got[2.5] == "f")
      assert(got[-7] == "neg" and got[0] == "zero")
    end },
  { "a table reached twice", function()
      local shared = { n = 1 }
      return { a = shared, b = shared, list = { shared, shared } }
    end, function(got)
      assert(got.a == got.b and got.a == got.list[1] and got.list[1] == got.list[2],
        "a shared table became copies")
    end },
  { "cycles", function()
      local a, b = {}, {}
      a.b, b.a, a.self = b, a, a
      return a
    end, function(got) assert(got.self == got and got.b.a == got, "a cycle was broken") end },
  { "tables as keys", function()
      local k = { "key" }
      return { [k] = "v", other = k }
    end, function(got) assert(got[got.other] == "v", "a table key lost its identity") end },
  { "a 100k-entry table", function()
      local t = {}
      for i = 1, 100000 do t[i] = i * 2 end
      for i = 1, 1000 do t["k" .. i] = i end
      return t
    end, function(got)
      assert(#got == 100000 and got[100000] == 200000 and got.k1000 == 1000)
    end },
}

-- Closures: make() returns a function of no arguments whose results check() checks;
-- each is run where it lands (decoded locally, or on a runner).
V.closures = {
  { "a closure with upvalues", function()
      local base, name = 10, "x"
      return function() return name .. (base + 5) end
    end, function(r) assert(r == "x15") end },
  { "upvalues shared between two closures", function()
      local count = 0
      local function inc() count = count + 1 return count end
      local function get() return count end
      return function() inc(); inc() return get() end
    end, function(r) assert(r == 2, "shared upvalue became two: " .. tostring(r)) end },
  { "nested closures", function()
      local k = 3
      local function make(m) return function(x) return x * m * k end end
      return function() return make(2)(5) + make(1)(1) end
    end, function(r) assert(r == 33) end },
  { "a recursive local function", function()
      local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
      return function() return fib(20) end
    end, function(r) assert(r == 6765) end },
  { "mutually recursive functions", function()
      local is_even, is_odd
      function is_even(n) if n == 0 then return true end return is_odd(n - 1) end
      function is_odd(n) if n == 0 then return false end return is_even(n - 1) end
      return function() return is_even(10) and not is_even(7) end
    end, function(r) assert(r == true) end },
  { "standard library functions by name", function()
      local fmt, concat, floor = string.format, table.concat, math.floor
      return function() return fmt("%03d", floor(7.9)) .. concat({ "a", "b" }) end
    end, function(r) assert(r == "007ab") end },
  { "library tables by name", function()
      local m, s = math, string
      return function() return m.max(1, 3) .. s.upper("x") end
    end, function(r) assert(r == "3X") end },
  { "globals through _ENV", function()
      return function() return type(print), type(string.rep) end
    end, function(a, b) assert(a == "function" and b == "function") end },
}

return V
