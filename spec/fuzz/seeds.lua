-- Writes a seed corpus for the decoder fuzzer: real encodings of varied values.
-- usage: lua5.4 spec/fuzz/seeds.lua DIR
local codec = require "flame".codec
local dir = assert(arg[1], "usage: seeds.lua DIR")
local shared = { 1, 2 }
local cyc = {}
cyc.self = cyc
local mt = {}
codec.register("m", mt)
local n = 0
local up = 1
local values = {
  { nil, true, false, 0, -1, math.maxinteger, math.mininteger, 0.5, 0 / 0, -0.0, 1 / 0 },
  "", string.rep("ab\0", 50),
  { a = shared, b = shared, [2.5] = "x", [true] = { {} } },
  cyc, setmetatable({ x = 1 }, mt), string.format, math, _G,
  { function() return up end, function() up = up + 1 end },
}
for i, v in ipairs(values) do
  local f = assert(io.open(("%s/seed-%02d"):format(dir, i), "wb"))
  f:write(assert(codec.encode(v)))
  f:close()
  n = n + 1
end
print(("seeds: %d written to %s"):format(n, dir))
