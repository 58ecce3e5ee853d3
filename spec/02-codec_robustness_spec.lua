-- The decoder is total: random, truncated and bit-flipped inputs give a value or an
-- error message, never a crash; and without `functions` it refuses bytecode.
-- The seed is printed so a failure can be replayed: FLAME_SEED=<n>.
local flame = require "flame"
local H = require "spec.helper"
local codec = flame.codec

local seed = tonumber(os.getenv("FLAME_SEED")) or os.time()
local scale = H.slow and 0.1 or 1
print(("codec robustness seed: %d"):format(seed))

local function samples()
  local shared = { "shared" }
  local cyc = { name = "cycle" }
  cyc.self = cyc
  local up = 0
  local function inc() up = up + 1 return up end
  local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
  return {
    { 1, -1, math.maxinteger, 2.5, 0 / 0, -0.0, "text", true, false },
    { a = shared, b = shared, list = { shared, 1, 2, 3 }, [7.5] = "x" },
    cyc,
    { inc = inc, get = function() return up end, fmt = string.format },
    fib,
    { deep = { deeper = { deepest = { string.rep("z", 300) } } } },
    function(x) return table.concat({ x, math.floor(2.5) }) end,
  }
end

-- Decodes and checks the outcome is well formed either way.
local function decode_ok(bytes, opts)
  local r = table.pack(pcall(codec.decode, bytes, opts))
  assert(r[1], "decode raised instead of returning: " .. tostring(r[2]))
  if r[2] == false then
    assert(type(r[3]) == "string" and r[3]:match("^decode: ") or r[3] == "not enough memory",
      "unexpected error: " .. tostring(r[3]))
  else
    assert(r[2] == true, "first result must be a boolean")
  end
  return r[2]
end

describe("codec decoder robustness", function()
  local encoded = {}
  setup(function()
    math.randomseed(seed)
    for _, v in ipairs(samples()) do encoded[#encoded + 1] = assert(codec.encode(v)) end
  end)

  it("survives every truncation of valid inputs", function()
    local n = 0
    for _, bytes in ipairs(encoded) do
      for len = 0, #bytes - 1 do
        local part = bytes:sub(1, len)
        assert.is_false(decode_ok(part, { functions = true }))
        assert.is_false(decode_ok(part))
        n = n + 1
      end
    end
    assert.is_true(n > 1000)
  end)

  it("survives random bytes, with and without a valid header", function()
    local count = math.floor(5000 * scale)
    for i = 1, count do
      local len = math.random(0, 64)
      local t = {}
      for j = 1, len do t[j] = string.char(math.random(0, 255)) end
      local s = table.concat(t)
      if i % 2 == 0 then s = "FL\1" .. s end
      decode_ok(s)
      decode_ok(s, { functions = true })
    end
  end)

  it("survives bit flips and byte changes in valid data", function()
    local count = math.floor(5000 * scale)
    for _ = 1, count do
      local bytes = encoded[math.random(#encoded)]
      local pos = math.random(#bytes)
      local b = bytes:byte(pos)
      local changed = math.random() < 0.5 and (b ~ (1 << math.random(0, 7)))
        or math.random(0, 255)
      local s = bytes:sub(1, pos - 1) .. string.char(changed) .. bytes:sub(pos + 1)
      decode_ok(s)
    end
  end)

  it("survives inserted and deleted bytes", function()
    local count = math.floor(2000 * scale)
    for _ = 1, count do
      local bytes = encoded[math.random(#encoded)]
      local pos = math.random(#bytes)
      local s
      if math.random() < 0.5 then
        s = bytes:sub(1, pos - 1) .. bytes:sub(pos + 1)
      else
        s = bytes:sub(1, pos) .. string.char(math.random(0, 255)) .. bytes:sub(pos + 1)
      end
      decode_ok(s)
    end
  end)

  it("refuses every input that carries a function unless told otherwise", function()
    local refused = 0
    for _, v in ipairs(samples()) do
      local bytes = assert(codec.encode(v))
      local ok, err = codec.decode(bytes)
      local has_function = bytes:find("\27Lua", 1, true) ~= nil
      if has_function then
        assert.is_false(ok)
        assert.matches("functions are refused here", err, 1, true)
        refused = refused + 1
        assert.is_true((codec.decode(bytes, { functions = true })))
      end
    end
    assert.are.equal(3, refused)
  end)

  it("bounds what a small input can make the decoder allocate", function()
    -- a table claiming 2^40 elements in 12 bytes: refused before any allocation
    local ok, err = codec.decode("FL\1\1\6\128\128\128\128\128\32\0")
    assert.is_false(ok)
    assert.matches("array count larger than the input", err, 1, true)
    -- 150 nested tables each claiming the whole remaining input as array slots
    local parts = { "FL\1\1" }
    for _ = 1, 150 do parts[#parts + 1] = "\6\200\1\0" end
    local ok2 = codec.decode(table.concat(parts) .. string.rep("\0", 300))
    assert.is_false(ok2)
  end)
end)
