-- A tour of the two pieces every flame call stands on: the codec, which carries a
-- closure with everything it captured, and the sandbox it runs in.
-- Run: flame examples/sandbox_tour.lua
local flame = require "flame"

-- A closure and what it captured cross into a fresh Lua state.
local words = { "elastic", "fleeting", "modular" }
local sep = ", "
local sb = flame.sandbox()
local ok, joined, count = sb:call(function()
  return table.concat(words, sep):upper(), #words
end)
print("copied and ran:", ok, joined, count)

-- Shared upvalues stay shared on the other side.
local n = 0
local counter = { inc = function() n = n + 1 return n end, get = function() return n end }
local bytes = assert(flame.codec.encode(counter))
local _, copy = flame.codec.decode(bytes, { functions = true })
copy.inc(); copy.inc()
print(("a copy of a counter: %d (the original stays at %d), %d bytes on the wire")
  :format(copy.get(), n, #bytes))

-- What cannot cross is named, not guessed at.
local log = io.stdout
print("refused:", select(2, flame.codec.encode(function() log:write("x") end,
  { name = "work" })))

-- A runaway loop is stopped from another thread, and the sandbox serves again.
local t0 = os.clock()
print("runaway:", sb:call(function() while true do end end, { timeout = 200 }))
print(("  stopped after %.2f s of CPU; next call:"):format(os.clock() - t0),
  sb:call(function() return "still serving" end))

-- A memory cap fails the allocation inside the work, not the process.
local small = flame.sandbox { memory_limit = 16 * 1024 * 1024 }
print("memory storm:", small:call(function()
  local t = {}
  for i = 1, math.huge do t[i] = ("x"):rep(100) .. i end
end))
print(("  the sandbox uses %.1f MB of its 16 MB cap and still works:"):format(
  small:memory() / 1e6), small:call(function() return 1 + 1 end))

-- The restricted profile is pure computation.
local pure = flame.sandbox { profile = "restricted" }
print("restricted sees io?", select(2, pure:call(function() return io ~= nil end)))
sb:close(); small:close(); pure:close()
