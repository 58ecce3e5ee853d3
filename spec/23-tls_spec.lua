-- TLS on the link (link.tls): TLS 1.3 keyed by each runner's secret. Real runner
-- processes, real TCP on 127.0.0.1; the man in the middle is a relay of the test's
-- own (spec/support/relay.py), and the eavesdropper is tcpdump on the loopback.
local flame = require "flame"
local core = require "flame.core"
local cjson = require "cjson"
local errors = require "flame.errors"
local wire = require "spec.support.wire"
local H = require "spec.helper"
local R = require "spec.support.remote"

local LINK = { tls = true, heartbeat_interval = 200, heartbeat_misses = H.slow and 25 or 3 }

local function with(t, extra)
  local o = {}
  for k, v in pairs(t) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

-- A process started in the background by the test: its pid (ended with stop).
local function start_bg(cmd, out)
  local pid = tonumber(H.line(("%s > %s 2>&1 < /dev/null & echo $!"):format(cmd, H.q(out))))
  assert(pid, "could not start: " .. cmd)
  return pid
end

local function stop(pid)
  os.execute("kill " .. pid .. " 2>/dev/null")
  assert(H.wait_for(function() return not H.alive(pid) end, 10000), "pid " .. pid .. " stayed")
end

describe("link.tls", function()
  after_each(H.cleanup)

  it("is on unless every address is loopback, and as told otherwise", function()
    local cases = {
      { nil, false },
      { { tls = true }, true },
      { { tls = "auto" }, false },
      { { advertise = { "runner-gw.example:7000" } }, true },
      { { advertise = { "127.0.0.1:7000", "[::1]:7000", "localhost:7000" } }, false },
      { { advertise = { "127.0.0.1:7000", "192.0.2.7:7000" } }, true },
      { { tls = false, advertise = { "runner-gw.example:7000" } }, false },
    }
    for i, case in ipairs(cases) do
      local p = H.pool { name = "tls-auto-" .. i, backend = "process", link = case[1] }
      assert.are.equal(case[2], p:hub().tls, "case " .. i)
      p:shutdown()
    end
    local ok, err = pcall(flame.pool, { name = "tls-bad", link = { tls = "yes" } })
    assert.is_false(ok)
    assert.is_true(errors.is(err, "invalid"), tostring(err))
    assert.matches("option 'link' must be", err.message, 1, true)
  end)

  it("carries calls over TLS to process runners: values, errors, 3 MB each way, 200 at once",
    function()
      local p = H.pool { name = "tls-calls", backend = "process", link = LINK, max = 2,
                         max_concurrency = 100 }
      assert.is_true(p:hub().tls)
      assert.are.same({ "a", 2, { x = true } },
        { flame.call(p, function() return "a", 2, { x = true } end) })
      local err = R.fails("remote", flame.call, p, function() error("no luck") end)
      assert.matches("no luck", err.message, 1, true)
      local big = ("z"):rep(3 << 20)
      local back = flame.call(p, function() return big:upper() end)
      assert.are.equal(3 << 20, #back)
      assert.are.equal(("Z"):rep(3 << 20), back)
      local ts = {}
      for i = 1, 200 do
        ts[i] = flame.spawn(function() return flame.call(p, function() return i * 3 end) end)
      end
      for i = 1, 200 do assert.are.equal(i * 3, ts[i]:await()) end
      assert.are.equal(0, p:hub().refusals)
    end)

  it("carries a large result over TLS whole while small calls keep completing", function()
    local p = H.pool { name = "tls-big", backend = "process", max_concurrency = 4,
                       link = { tls = true } }
    flame.call(p, function() end)
    local reps = (H.slow and 4 or 16) << 16           -- 4 or 16 MB of 16-byte pieces
    local order = {}
    local big = flame.spawn(function()
      local s = flame.call(p, function() return ("0123456789abcdef"):rep(reps) end)
      order[#order + 1] = "big"
      return s
    end)
    local small = flame.spawn(function()
      for i = 1, 30 do
        assert.are.equal(i, flame.call(p, function() return i end))
        order[#order + 1] = "small"
      end
    end)
    local s = big:await()
    small:await()
    assert.are.equal(reps * 16, #s)
    assert.are.equal(("0123456789abcdef"):rep(reps), s)
    assert.are_not.equal("big", order[1], "no small call completed while the big result crossed")
  end)

  it("refuses a runner whose secret is wrong: nothing runs, and the parent says why", function()
    local dir = H.tmpdir()
    local p = H.pool { name = "tls-wrong-secret", link = LINK,
      backend = R.edited_parent { secret = core.b64encode(("s"):rep(32)) } }
    local err = R.fails("boot", flame.call, p, function()
      io.open(dir .. "/ran", "w"):close()
      return 1
    end)
    assert.matches("runner process exited with code 1", err.message, 1, true)
    assert.is_true(H.wait_for(function() return p:hub().refusals >= 1 end))
    assert.matches("tls: the runner's key does not match its ref", p:hub().refused_why, 1, true)
    assert.is_false(H.exists(dir .. "/ran"))
    H.rmdir(dir)
  end)

  it("refuses a runner naming a ref the pool does not expect, saying so on both sides", function()
    local p = H.pool { name = "tls-unknown-ref", link = LINK,
      backend = R.edited_parent { ref = "nobody-expects-this-ref" } }
    local err = R.fails("boot", flame.call, p, function() return 1 end)
    assert.matches("runner process exited with code 1", err.message, 1, true)
    assert.is_true(H.wait_for(function() return p:hub().refusals >= 1 end))
    assert.matches("tls: no runner with ref nobody-expects-this-ref is expected",
      p:hub().refused_why, 1, true)
  end)

  it("refuses a runner that speaks in clear to a pool of TLS (an older runner), telling it why",
    function()
      -- the runner is played by hand, in clear, as a runner that knows nothing of TLS
      local p = H.pool { name = "tls-clear-runner", link = LINK, min = 0,
        backend = "process" }
      local c, closed, got = R.connect(p:hub().addrs[1])
      c:send(wire.HELLO, 0, cjson.encode { v = wire.PROTOCOL, ref = "abcdefghijkl",
        nonce = core.b64encode(core.random_bytes(16)) })
      closed:wait()
      assert.are.equal(wire.CLOSE, got[1][1])
      assert.matches("this pool's link speaks TLS (link.tls) and the runner spoke in clear",
        got[1][3], 1, true)
      assert.are.equal(1, #got)
      assert.is_true(H.wait_for(function() return p:hub().refusals == 1 end))
      -- and a real runner told tls = false by its FLAME_PARENT fails its boot
      local q = H.pool { name = "tls-told-clear", link = LINK,
        backend = R.edited_parent { tls = false } }
      local err = R.fails("boot", flame.call, q, function() return 1 end)
      assert.matches("runner process exited with code 1", err.message, 1, true)
      assert.is_true(H.wait_for(function() return q:hub().refusals == 1 end))
      assert.matches("spoke in clear", q:hub().refused_why, 1, true)
    end)

  it("refuses a runner that starts TLS where the pool does not speak it", function()
    local p = H.pool { name = "tls-told-tls", backend = R.edited_parent { tls = true },
      link = with(LINK, { tls = false }) }
    local err = R.fails("boot", flame.call, p, function() return 1 end)
    assert.matches("runner process exited with code 1", err.message, 1, true)
    assert.is_true(H.wait_for(function() return p:hub().refusals == 1 end))
    assert.matches("tls: the runner started TLS, and this link does not speak it",
      p:hub().refused_why, 1, true)
  end)

  for _, way in ipairs { "up", "down" } do
    it("closes the link when a relay flips a bit " .. (way == "up" and "of a result"
      or "of a call") .. " after the handshake: no wrong value, nothing runs twice", function()
      local dir = H.tmpdir()
      local out, target = dir .. "/relay.out", dir .. "/target"
      local relay = start_bg(("python3 spec/support/relay.py %s %s"):format(target, way), out)
      assert.is_true(H.wait_for(function() return read_file(out):match("^%d+\n") ~= nil end))
      -- the runners are told the relay's address; the relay learns the pool's port;
      -- heartbeats far apart: the bit flipped is the call's, not a PING's
      local p = H.pool { name = "tls-flip-" .. way, backend = "process",
        link = with(LINK, { heartbeat_interval = 60000, heartbeat_misses = 3,
                            advertise = { "127.0.0.1:" .. read_file(out):match("^(%d+)") } }) }
      local f = assert(io.open(target, "w"))
      f:write(p:hub().listening:match(":(%d+)$") or "?")
      f:close()
      local ok, why = pcall(function()
        assert.are.equal(1, flame.call(p, function() return 1 end))   -- through the relay
        os.execute("kill -USR1 " .. relay)
        assert.is_true(H.wait_for(function() return read_file(out):find("armed") ~= nil end))
        local runs = dir .. "/runs"
        local ok2, err = pcall(flame.call, p, function()
          local f = io.open(runs, "a")
          f:write("x")
          f:close()
          return 42
        end)
        assert.is_false(ok2, "the call returned " .. tostring(err))
        assert.is_true(errors.is(err, "runner_down"), tostring(err))
        if way == "up" then
          assert.matches("tls: ", err.message, 1, true)
          assert.are.equal("x", read_file(runs))          -- it ran once, its result lost
        else
          assert.are.equal("", read_file(runs))           -- the changed call never ran
        end
        assert.matches("flipped " .. way, read_file(out), 1, true)
      end)
      stop(relay)
      H.rmdir(dir)
      assert(ok, why)
    end)
  end

  -- The TCP flags of each packet of a pcap file (Ethernet, IPv4 without options
  -- on the loopback): true once two FINs (both ends closed) are in it.
  local function fin_seen(pcap)
    local fins, off = 0, 25
    while off + 16 <= #pcap do
      local incl = string.unpack("<I4", pcap, off + 8)
      local pkt = off + 16
      if incl >= 14 + 20 + 14 and pcap:byte(pkt + 12) == 0x08 and pcap:byte(pkt + 13) == 0 then
        local ihl = (pcap:byte(pkt + 14) & 0x0f) * 4
        local flags = pcap:byte(pkt + 14 + ihl + 13) or 0
        if flags & 0x01 ~= 0 then fins = fins + 1 end
      end
      off = pkt + incl
    end
    return fins >= 2
  end

  it("keeps the closure's bytes out of a capture of the traffic, which shows them in clear "
    .. "without TLS", function()
    if H.line("id -u") ~= "0" or not H.exists("/usr/bin/tcpdump") then
      pending("needs root and tcpdump (scripts/setup installs it)")
      return
    end
    local function capture(tls)
      local dir = H.tmpdir()
      local p = H.pool { name = "tls-capture-" .. tostring(tls), backend = "process",
        link = with(LINK, { tls = tls }) }
      local port = p:hub().addrs[1]:match(":(%d+)$")
      local pcap, log = dir .. "/cap.pcap", dir .. "/tcpdump.log"
      local pid = start_bg(("tcpdump -i lo --immediate-mode -U -s 0 -w %s tcp port %s"):format(pcap, port), log)
      assert.is_true(H.wait_for(function() return read_file(log):find("listening on") ~= nil end),
        "tcpdump did not start: " .. read_file(log))
      local marker = "flame-marker-" .. core.b64encode(core.random_bytes(9))
      local back = flame.call(p, function() return "got " .. marker end)
      assert.are.equal("got " .. marker, back)
      p:shutdown()
      -- the whole conversation is in the file once its last packets are: the FIN
      -- and ACKs of the runner's end (tcpdump's packets are written as they come)
      assert.is_true(H.wait_for(function() return fin_seen(read_file(pcap)) end),
        "the capture never saw the connection end")
      stop(pid)
      local bytes = read_file(pcap)
      H.rmdir(dir)
      return bytes, marker
    end
    local clear, m1 = capture(false)
    assert.is_truthy(clear:find(m1, 1, true), "the capture without TLS lacks the marker")
    local sealed, m2 = capture(true)
    assert.is_true(#sealed > 1000, "the capture with TLS is empty")
    assert.is_falsy(sealed:find(m2, 1, true), "the marker crossed in clear")
  end)
end)
