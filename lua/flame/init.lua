--- flame: run a Lua closure, with what it captured, on fresh compute.
-- This is the Lua half of the module; the C core is `flame.core`.
-- @module flame
local core = require "flame.core"

local M = {}

M.VERSION = core.VERSION

--- The codec that carries values and closures between Lua states (docs/codec.md).
M.codec = {}

--- Encodes one value.
-- @param value any sendable value
-- @tparam[opt] table opts `name` (the value's name in error paths, default "value"),
--   `functions` (default true), `env` (a table that travels as "the environment"),
--   `max_depth`
-- @treturn string the bytes
-- @return nil, message naming the path to what cannot be sent
function M.codec.encode(value, opts)
  return core.encode(opts, value)
end

--- Encodes any number of values (nil included) into one byte string; a "%d" in
-- opts.name is replaced by each value's position.
-- @treturn string|nil bytes, or nil and a message
function M.codec.encode_values(opts, ...)
  return core.encode(opts, ...)
end

--- Decodes bytes made by encode or encode_values.
-- @tparam string bytes
-- @tparam[opt] table opts `functions` (default false: bytecode is refused unless the
--   bytes come from a trusted sender), `env`, `max_depth`, `max_size`, `max_items`
-- @return true and the values, or false and a message
function M.codec.decode(bytes, opts)
  return core.decode(bytes, opts)
end

--- Lets tables with metatable `mt` cross as `name`; the receiver must register the
-- same name. A table with an unregistered metatable cannot be sent.
function M.codec.register(name, mt)
  core.register(name, mt)
end

--- A sandboxed Lua state (docs/sandbox.md): `{ profile = "application" |
-- "restricted", memory_limit = bytes }`. `sb:call(fn)` runs fn there.
M.sandbox = core.sandbox

return M
