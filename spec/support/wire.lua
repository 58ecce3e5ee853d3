--- The link protocol as the specs speak it when they play one end (a puppet runner
-- or parent): message types, the handshake's proofs and SPAWN's header, written
-- again from docs/protocol.md so that the C of both ends (core/wire.h, core/hub.c,
-- core/terminator.c) is checked against the document, not against itself
-- (spec/10 checks these types against core.wire). Frames are core/link.c's.
-- @module spec.support.wire
local M = {}

M.PROTOCOL = 1

M.HELLO = 1             -- runner -> parent: { v, ref, nonce }            (JSON)
M.CHALLENGE = 2         -- parent -> runner: { nonce, proof }             (JSON)
M.PROOF = 3             -- runner -> parent: { proof }                    (JSON)
M.REMOTE_UP = 4         -- runner -> parent: { pid, host }                (JSON)
M.SPAWN = 5             -- parent -> runner: timeout u64, link u8, work   (id = call)
M.RESULT = 6            -- runner -> parent: status byte, codec bytes     (id = call)
M.KILL = 7              -- parent -> runner: reason                       (id = call)
M.SHUTDOWN = 9          -- parent -> runner: stop taking work, drain, exit
M.REMOTE_SHUTDOWN = 10  -- runner -> parent: reason ("idle", "parent_lost", ...)
M.PING = 11             -- either way, every heartbeat interval
M.CONFIG = 13           -- parent -> runner: codec { idle_check = fn }    (after PROOF)
M.CLOSE = 14            -- either way, last message: why the link is closed
M.CODE = 15             -- parent -> runner: SHA-256 (32 bytes), code pack  (code_sync)
                        -- runner -> parent: "o" .. hex SHA-256, or "e" .. why

M.NAMES = {}
for k, v in pairs(M) do if type(v) == "number" and k ~= "PROTOCOL" then M.NAMES[v] = k end end

--- The proofs of the handshake: each side proves it holds the runner's secret by a
-- HMAC over the other side's nonce, bound to the runner's ref and to its role.
function M.proof(hmac, secret, role, nonce, ref)
  return hmac(secret, role .. "\0" .. ref .. "\0" .. nonce)
end

--- SPAWN's 9-byte header: the deadline in ms (0: none) and the link flag.
function M.spawn_header(timeout, link)
  local t = (timeout == nil or timeout == math.huge) and 0 or math.max(1, math.floor(timeout))
  return string.pack("<I8B", t, link and 1 or 0)
end

function M.spawn_payload(timeout, link, bytes)
  return M.spawn_header(timeout, link) .. bytes
end

function M.spawn_parse(payload)
  if #payload < 9 then return nil end
  local t, link = string.unpack("<I8B", payload)
  return (t == 0 and math.huge or t), link == 1, payload:sub(10)
end

return M
