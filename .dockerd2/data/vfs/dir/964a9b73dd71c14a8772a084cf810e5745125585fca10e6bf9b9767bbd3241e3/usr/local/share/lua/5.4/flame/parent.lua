--- FLAME_PARENT: what a runner needs to find and trust its parent, as base64 of a
-- JSON document. Made by backends on the parent (parent_new, parent_encode), read
-- by `flame runner` (decode), shown to work on a runner by flame.parent().
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

local function check(cond, what)
  if not cond then error(what, 0) end
end

--- Decodes and checks a FLAME_PARENT value; returns the record, or nil and what is
-- wrong with it.
function M.decode(s)
  local ok, p = pcall(function()
    check(type(s) == "string" and s ~= "", "it is empty")
    local json, err = core.b64decode(s)
    check(json, "it is not base64 (" .. tostring(err) .. ")")
    local doc = cjson.decode(json)
    check(type(doc) == "table", "it is not a JSON object")
    doc.v = math.tointeger(doc.v)        -- lua-cjson decodes every number as a float
    check(doc.v ~= nil, "it has no protocol version")
    check(doc.v == wire.PROTOCOL, ("protocol version %d, this runner speaks %d (parent "
      .. "and runner must run the same flame)"):format(doc.v, wire.PROTOCOL))
    check(type(doc.ref) == "string" and #doc.ref >= 8, "it has no ref")
    check(type(doc.secret) == "string" and core.b64decode(doc.secret), "it has no secret")
    check(type(doc.addrs) == "table" and #doc.addrs > 0, "it has no parent address")
    for _, a in ipairs(doc.addrs) do
      check(type(a) == "string" and a:match("^(.+):(%d+)$"), "bad parent address " .. tostring(a))
    end
    check(type(doc.backend) == "string", "it names no backend")
    check(type(doc.settings) == "table", "it has no runner settings")
    for k, v in pairs(doc.settings) do
      if type(v) == "number" then doc.settings[k] = math.tointeger(v) or v end
    end
    return doc
  end)
  if ok then return p end
  return nil, p
end

--- What flame.parent() shows on a runner.
function M.public(p)
  return { ref = p.ref, backend = p.backend, node_base = p.node_base,
           host_env = p.host_env, flame_vsn = p.flame_vsn }
end

return M
