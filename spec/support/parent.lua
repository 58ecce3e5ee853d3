--- FLAME_PARENT as the specs and the fuzz seeds make it when they play the parent:
-- what a runner needs to find and trust its parent, as base64 of a JSON document
-- (docs/protocol.md). The parent's own are made in C (core/bsvc_link.c's
-- parent_new); core/parent.c reads and checks them on the runner.
-- @module spec.support.parent
local core = require "flame.core"
local cjson = require "cjson.safe"
local wire = require "spec.support.wire"

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
