--- The link protocol's message types and payload layouts (docs/protocol.md).
-- Frames themselves (length, type, flags, id; chunking) are core/link.c's.
-- @module flame.wire
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

M.NAMES = {}
for k, v in pairs(M) do if type(v) == "number" and k ~= "PROTOCOL" then M.NAMES[v] = k end end

--- The proofs of the handshake: each side proves it holds the runner's secret by a
-- HMAC over the other side's nonce, bound to the runner's ref and to its role.
function M.proof(hmac, secret, role, nonce, ref)
  return hmac(secret, role .. "\0" .. ref .. "\0" .. nonce)
end

--- Heartbeats of one end of a link; both ends use them. Every interval, ping()
-- sends a PING (or returns false: nothing to watch now); when link.msgs, the count
-- of messages received, has not moved for `misses` ticks in a row, lost(message)
-- is called, once. Ticks, not milliseconds: a late tick of a busy loop runs before
-- the waiting messages are read, and must not blame the peer for the stall.
-- Returns the heartbeat; hb.stop() ends it.
function M.heartbeat(loop, link, interval, misses, who, ping, lost)
  local hb = { heard = link.msgs, missed = 0 }
  local function tick()
    hb.timer = loop:timer(interval, function()
      hb.timer = nil
      if hb.stopped then return end
      if ping() ~= false then
        if link.msgs == hb.heard then
          hb.missed = hb.missed + 1
          if hb.missed >= misses then
            return lost(("no heartbeat from the %s for %d intervals of %d ms")
              :format(who, hb.missed, interval))
          end
        else
          hb.heard, hb.missed = link.msgs, 0
        end
      end
      tick()
    end)
  end
  function hb.stop()
    hb.stopped = true
    if hb.timer then hb.timer:stop() end
  end
  tick()
  return hb
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
