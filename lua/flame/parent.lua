--- FLAME_PARENT: what a runner needs to find and trust its parent, as base64 of a
-- JSON document. Made by backends on the parent (parent_new, parent_encode); read
-- and checked on the runner by core/parent.c, which must agree with this shape.
-- @module flame.parent
local core = require "flame.core"
local cjson = require "cjson.safe"
local wire = require "flame.wire"

local M = {}

local function b64url_id(n)
  local alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
  return (core.random_bytes(n):gsub(".", function(c)
    local i = c:byte() % #alphabet + 1
    return alphabet:sub(i, i)
  end))
end
M.random_id = b64url_id

--- A new parent record for one runner: a fresh ref and secret.
-- fields: node_base, host_env, backend, addrs ({ "host:port", ... }), settings
function M.new(fields)
  return {
    v = wire.PROTOCOL,
    ref = fields.ref or b64url_id(20),
    secret = core.b64encode(core.random_bytes(32)),
    addrs = fields.addrs or {},
    backend = fields.backend or "process",
    node_base = fields.node_base or ("flame-" .. b64url_id(10)),
    host_env = fields.host_env,
    flame_vsn = core.VERSION,
    settings = fields.settings or {},
  }
end

function M.encode(p)
  local json = assert(cjson.encode(p))
  return core.b64encode(json)
end

return M
