-- Writes the seed corpora of the fuzz targets into DIR/decode, DIR/parent, DIR/pack,
-- DIR/link and DIR/json (made by the caller): real encodings of varied values for the codec
-- decoder (decode_fuzz.c); FLAME_PARENT documents as spec/support/parent.lua makes
-- them, and broken ones (parent_fuzz.c); link streams of whole, chunked and
-- malformed frames (link_fuzz.c); code packs, good and refused (pack_fuzz.c). Each
-- target's header says what its bytes mean.
-- usage: lua5.4 spec/fuzz/seeds.lua DIR
local flame = require "flame"
local codec = flame.codec
local parent = require "spec.support.parent"
local core = require "flame.core"
local cjson = require "cjson"
local dir = assert(arg[1], "usage: seeds.lua DIR")

local total = 0
local function write(target, seeds)
  for i, bytes in ipairs(seeds) do
    local f = assert(io.open(("%s/%s/seed-%02d"):format(dir, target, i), "wb"))
    f:write(bytes)
    f:close()
  end
  total = total + #seeds
end

-- the codec ------------------------------------------------------------------
local shared = { 1, 2 }
local cyc = {}
cyc.self = cyc
local mt = {}
codec.register("m", mt)
local up = 1
local values = {
  { nil, true, false, 0, -1, math.maxinteger, math.mininteger, 0.5, 0 / 0, -0.0, 1 / 0 },
  "", string.rep("ab\0", 50),
  { a = shared, b = shared, [2.5] = "x", [true] = { {} } },
  cyc, setmetatable({ x = 1 }, mt), string.format, math, _G,
  { function() return up end, function() up = up + 1 end },
}
local decode = {}
for i, v in ipairs(values) do decode[i] = assert(codec.encode(v)) end
write("decode", decode)

-- FLAME_PARENT: byte 1 (odd) then the JSON, byte 0 (even) then the value itself -----
local function full(fields)
  return parent.new {
    node_base = "flame-seed", host_env = "HOSTNAME", backend = "process",
    addrs = fields.addrs or { "127.0.0.1:40123", "[::1]:40123" },
    settings = fields.settings or {
      max_concurrency = 8, shutdown_timeout = 30000, idle_shutdown_after = -1,
      failsafe_timeout = 30000, heartbeat_interval = 1000, heartbeat_misses = 3,
      max_message = 1 << 20, sandbox = { profile = "restricted", memory_limit = 1 << 26 },
    },
  }
end
local function json(p) return "\1" .. assert(cjson.encode(p)) end
local function changed(f)
  local p = full {}
  f(p)
  return json(p)
end
local many = {}
for i = 1, 17 do many[i] = "10.0.0." .. i .. ":7000" end
local parents = {
  json(full {}),
  "\0" .. parent.encode(full {}),
  json(full { settings = {} }),                           -- {}: every default
  '\1{"v":1,"ref":"abcdefgh","secret":"c2VjcmV0","addrs":["1.2.3.4:5"],'
    .. '"backend":"process","settings":[]}',              -- [] as lua-cjson may send {}
  changed(function(p) p.v = 2 end),
  changed(function(p) p.v = 1.5 end),
  changed(function(p) p.ref = "short" end),
  changed(function(p) p.secret = "!!!!" end),
  changed(function(p) p.secret = core.b64encode(("s"):rep(300)) end),
  changed(function(p) p.addrs = {} end),
  changed(function(p) p.addrs = many end),
  changed(function(p) p.addrs = { "parent.example:7000", "[fe80::1%lo]:80" } end),
  changed(function(p) p.addrs = { "127.0.0.1", "[name]:80", "host:99999" } end),
  changed(function(p) p.backend = nil end),
  changed(function(p) p.settings = "fast" end),
  changed(function(p) p.settings.max_concurrency = 5000 end),
  changed(function(p) p.settings.heartbeat_interval = 0 end),
  changed(function(p) p.settings.shutdown_timeout = 1e300 end),
  changed(function(p) p.settings.sandbox.memory_limit = -1 end),
  changed(function(p) p.settings.shutdown_timeout = 0.25 end),   -- rounds up
  changed(function(p) p.settings.heartbeat_misses = 1e7 end),
  changed(function(p) p.settings.sandbox = { profile = "backend" } end),
  changed(function(p) p.settings.sandbox = "restricted" end),
  changed(function(p) p.tls = true end),
  changed(function(p) p.tls = "yes" end),
  '\1[1,2]', '\1{"v":1,"v":2}', '\1' .. ("["):rep(2000),
  '\0not base64', '\0QUJD', '\0QUJDRA==', '\0====',
}
write("parent", parents)

-- link streams: two control bytes (see link_fuzz.c), then frames -----------------
local function frame(len, type, flags, id, payload)
  return string.pack("<I4BBI8", len, type, flags, id) .. (payload or ("x"):rep(len))
end
local function chunks(type, id, payload, size)        -- one message, chunk by chunk
  local out = {}
  for i = 1, #payload, size do
    local piece = payload:sub(i, i + size - 1)
    out[#out + 1] = frame(#piece, type, i + size > #payload and 1 or 0, id, piece)
  end
  return table.concat(out)
end
local hello = cjson.encode { v = 1, ref = "abcdefgh", nonce = core.b64encode(("n"):rep(16)) }
local links = {
  "\7\0" .. frame(#hello, 1, 1, 0, hello) .. frame(0, 11, 1, 0),
  "\7\3" .. frame(#hello, 1, 1, 0, hello) .. frame(0, 11, 1, 0),   -- in small pieces
  "\131\1" .. chunks(5, 42, ("w"):rep(300), 64),                  -- connecting side
  "\15\2" .. frame(3, 5, 0, 1) .. frame(3, 5, 0, 2) .. frame(3, 5, 1, 1) .. frame(3, 5, 1, 2),
  "\9\0" .. frame(3, 5, 0, 1) .. frame(3, 5, 0, 2) .. frame(3, 5, 0, 3),   -- 2 partials
  "\2\0" .. frame(5, 6, 1, 7) .. frame(8, 6, 1, 8),              -- over 7 bytes
  "\3\0" .. frame(40, 6, 0, 7) .. frame(40, 6, 1, 7),            -- over 64 at once
  "\6\0" .. string.pack("<I4BBI8", 256 * 1024 + 1, 6, 1, 7),     -- chunk too large
  "\6\0" .. frame(1, 6, 2, 7),                                   -- unknown flags
  "\70\35" .. frame(5, 6, 1, 1) .. frame(5, 6, 1, 2) .. frame(5, 6, 1, 3),   -- echo, close
  "\70\163" .. frame(5, 6, 1, 1) .. frame(5, 6, 1, 2) .. frame(5, 6, 1, 3),  -- echo, finish
  "\7\0" .. frame(10, 6, 1, 1):sub(1, 20),                       -- ends mid-chunk
  "\0\0" .. frame(0, 11, 1, 0) .. frame(0, 11, 1, 0),            -- empty messages
}
write("link", links)

-- code packs (pack.h): good ones, and one of each refusal
local function entry(path, content, mode)
  return string.pack("<s2BI8", path, mode or 0, #content) .. content
end
local function pack(...)
  local e = { ... }
  return "FLPK\1" .. string.pack("<I4", #e) .. table.concat(e)
end
write("pack", {
  pack(),
  pack(entry("app/util.lua", "return {}\n"), entry("app/z/init.lua", "return 1", 1)),
  pack(entry("a", ""), entry("b", "x"), entry("b/c", "y")),
  pack(entry("../x", "")),
  pack(entry("b", ""), entry("a", "")),
  pack(entry("a", "xyz")):sub(1, -2),
  "FLPK\2\0\0\0\0",
})
-- JSON as engines answer, and broken ----------------------------------------
write("json", {
  cjson.encode { Id = "abc", State = { Running = true, Pid = 42 }, Labels = { ["flame.pool"] = "p" },
                 Mounts = { { Source = "/x" } }, Size = 1.5, Nothing = cjson.null },
  '[1,2,[3,[4,[5]]],{"a":null},"\\u00e9\\n",-0.0,1e300,12345678901234567890]',
  '{"a":', '"\\ud800"', ("["):rep(1100) .. ("]"):rep(1100), "{}x", "", '{"k":1,"k":2}',
})
-- the link's TLS (tls_fuzz.c): a control byte, then the bytes or a client's changes
write("tls", {
  "\2",                                        -- a client of the right key, untouched
  "\6",                                        -- a client of another key
  "\3",                                        -- a client where TLS is off
  "\50" .. ("\0"):rep(200) .. "\1",             -- a client's handshake, one bit changed
  "\0\22\3\1\0\5hello",                       -- a stranger's TLS record
  "\1\22\3\1\0\5hello",                       -- the same where TLS is off
  "\0" .. frame(#hello, 1, 1, 0, hello),        -- a HELLO in clear where TLS is required
})
print(("seeds: %d written to %s/{decode,parent,link,pack,json,tls}"):format(total, dir))
