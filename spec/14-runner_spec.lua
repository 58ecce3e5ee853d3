-- The runner (`flame runner`, core/terminator.c) against a parent played by the spec:
-- a listener of our own on 127.0.0.1 speaks the link protocol by hand, so each
-- step of the handshake, a KILL before its SPAWN, and the runner's end can be forced
-- exactly. Real runner processes (under valgrind when FLAME_BIN says so); the pool
-- specs (09, 10) check the same runner against the real parent.
local flame = require "flame"
local core = require "flame.core"
local cjson = require "cjson"
local wire = require "spec.support.wire"
local H = require "spec.helper"

local FLAME = os.getenv("FLAME_BIN") or "flame"

local function b64json(doc) return core.b64encode(cjson.encode(doc)) end

-- A FLAME_PARENT document that parses; cases change one thing in it.
local function valid_doc()
  return { v = 1, ref = "specrunner01", secret = core.b64encode(("s"):rep(32)),
           addrs = { "127.0.0.1:9" }, backend = "process",
           settings = { failsafe_timeout = 200 } }
end

-- Runners started by fake_parent: a test that fails before its P.stop() must not
-- leave its runner behind (one that waits for a parent forever would never end).
local started = {}

describe("flame runner", function()
  after_each(function()
    for _, P in ipairs(started) do
      if not P.exit then P.proc:kill("SIGKILL") end
      H.wait_for(function() return P.exit ~= nil end)
      if P.listener then P.listener:close() end
    end
    started = {}
    H.cleanup()
  end)
  describe("refuses a FLAME_PARENT it cannot use, with status 2 and the reason", function()
    local cases = {
      { "a newer protocol", function(d) d.v = 2 end, "protocol version 2, this runner speaks 1" },
      { "a version that is not a whole number", function(d) d.v = 1.5 end,
        "it has no protocol version" },
      { "no secret", function(d) d.secret = nil end, "it has no secret" },
      { "a secret that is not base64", function(d) d.secret = "!!!!" end, "it has no secret" },
      { "no address", function(d) d.addrs = {} end, "it has no parent address" },
      { "an address without a port", function(d) d.addrs = { "127.0.0.1" } end,
        "bad parent address 127.0.0.1" },
      { "an address that is not a host", function(d) d.addrs = { "parent/x:80" } end,
        "bad parent address parent/x:80 (a host name or IP address, and a port, expected)" },
      { "no backend", function(d) d.backend = nil end, "it names no backend" },
      { "settings that are not an object", function(d) d.settings = "fast" end,
        "it has no runner settings" },
      { "a heartbeat interval of 0", function(d) d.settings.heartbeat_interval = 0 end,
        "setting heartbeat_interval is 0, below 1" },
      { "a count that is not a number", function(d) d.settings.max_concurrency = "many" end,
        "setting max_concurrency is not a number" },
      { "a profile runners do not have", function(d) d.settings.sandbox = { profile = "backend" } end,
        'setting sandbox.profile is not "application" or "restricted"' },
      { "a sandbox that is not a table", function(d) d.settings.sandbox = 5 end,
        "setting sandbox is not an object" },
      { "heartbeat misses past their bound", function(d) d.settings.heartbeat_misses = 2000000 end,
        "setting heartbeat_misses is 2000000, above 1000000" },
      { "an idle_check that is not a boolean", function(d) d.settings.idle_check = "yes" end,
        "setting idle_check is not a boolean" },
      { "a tls that is not a boolean", function(d) d.tls = "yes" end,
        "its tls is not a boolean" },
      { "more addresses than a runner tries", function(d)
          d.addrs = {}
          for i = 1, 17 do d.addrs[i] = "127.0.0.1:" .. (1000 + i) end
        end, "more than 16 parent addresses" },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        local doc = valid_doc()
        case[2](doc)
        local rc, out = H.run("FLAME_PARENT=" .. b64json(doc) .. " " .. FLAME .. " runner")
        assert.are.equal(2, rc, out)
        assert.matches("flame runner: FLAME_PARENT is malformed: " .. case[3], out, 1, true)
      end)
    end

    it("a JSON array", function()
      local rc, out = H.run("FLAME_PARENT=" .. core.b64encode("[1,2]") .. " " .. FLAME .. " runner")
      assert.are.equal(2, rc)
      assert.matches("it is not a JSON object", out, 1, true)
    end)
  end)

  -- The parent, played by hand: listens, starts one runner with a FLAME_PARENT
  -- naming it, and records what the runner sends. opts.challenge(hello) returns the
  -- CHALLENGE to answer with (default: an honest one); opts.on(msg) sees each message.
  -- opts.port: the runner is sent to that port of 127.0.0.1, where nobody listens
  -- until P.listen(port) (a parent that is gone, or late).
  local function fake_parent(opts)
    opts = opts or {}
    local P = { got = {}, secret = core.random_bytes(32), ref = "specfake" .. math.random(1e6),
                output = {} }
    P.nonce = core.random_bytes(16)
    local function accept(c)
      P.conn = c
      c:start(function(t, id, payload)
        P.got[#P.got + 1] = { type = t, id = id, payload = payload }
        if t == wire.HELLO and opts.hello then
          opts.hello(P, cjson.decode(payload))
        elseif t == wire.HELLO then
          local hello = cjson.decode(payload)
          local rn = core.b64decode(hello.nonce)
          local proof = opts.wrong_proof and ("x"):rep(32)
            or wire.proof(core.hmac_sha256, P.secret, "parent", rn, P.ref)
          c:send(wire.CHALLENGE, 0, cjson.encode { nonce = core.b64encode(P.nonce),
                                                   proof = core.b64encode(proof) })
          if opts.after_challenge then opts.after_challenge(P) end
        elseif t == wire.PROOF then
          local want = wire.proof(core.hmac_sha256, P.secret, "runner", P.nonce, P.ref)
          P.proved = core.equal(core.b64decode(cjson.decode(payload).proof), want)
        elseif t == wire.REMOTE_UP then
          P.up = cjson.decode(payload)
        end
        if opts.on then opts.on(P, t, id, payload) end
      end, function(reason) P.closed = reason end)
    end
    function P.listen(port)
      P.listener = assert(core.listen { host = "127.0.0.1", port = port or 0, on_connect = accept })
      return P.listener:address()
    end
    local host, port = "127.0.0.1", opts.port
    if not port then host, port = P.listen() end
    local settings = { failsafe_timeout = H.patience, heartbeat_interval = 1000,
                       heartbeat_misses = 60, idle_shutdown_after = -1, shutdown_timeout = 5000 }
    for k, v in pairs(opts.settings or {}) do settings[k] = v end
    local doc = { v = 1, ref = P.ref, secret = core.b64encode(P.secret),
                  addrs = opts.addrs and opts.addrs(host, port) or { host .. ":" .. port },
                  backend = opts.backend or "process",
                  settings = settings }
    local env = { FLAME_PARENT = b64json(doc) }
    for k, v in pairs(opts.env or {}) do env[k] = v end
    local exe = FLAME
    if not exe:find("/") then                  -- core.spawn takes a path
      local p = io.popen("command -v " .. exe)
      exe = p:read("l")
      p:close()
    end
    local args = { "runner" }
    for _, a in ipairs(opts.args or {}) do args[#args + 1] = a end
    P.proc = assert(core.spawn { path = exe, args = args, env = env,
      on_output = function(_, line)         -- kept, and shown: sanitizer reports too
        P.output[#P.output + 1] = line
        io.stderr:write("runner: ", line, "\n")
      end,
      on_exit = function(code, signal) P.exit = { code = code, signal = signal } end })
    function P.text() return table.concat(P.output, "\n") end
    function P.wait(cond, what)
      assert(H.wait_for(cond), "timed out waiting for " .. what .. "; the runner said:\n" .. P.text())
    end
    function P.message(type, id)
      for _, m in ipairs(P.got) do
        if m.type == type and (id == nil or m.id == id) then return m end
      end
    end
    function P.stop()
      if not P.exit then P.proc:kill("SIGKILL") end
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      if P.listener then P.listener:close() end
      P.listener = nil
    end
    started[#started + 1] = P
    return P
  end

  local function spawn_bytes(fn, timeout)
    return wire.spawn_payload(timeout, true, assert(core.encode(nil, fn)))
  end

  local function result(m)
    local ok, v = core.decode(m.payload:sub(2))
    assert(ok, v)
    return m.payload:sub(1, 1), v
  end

  it("runs nothing for a parent that cannot prove it holds the secret", function()
    local dir = H.tmpdir()
    local marker = dir .. "/ran"
    local P = fake_parent { wrong_proof = true, after_challenge = function(P)
      P.conn:send(wire.SPAWN, 1, spawn_bytes(function() io.open(marker, "w"):close() end))
    end }
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(1, P.exit.code, P.text())
    assert.matches("the parent failed to prove it holds the runner's secret: refusing it",
      P.text(), 1, true)
    local close = P.message(wire.CLOSE)
    assert.is_table(close, "the runner said why before it closed")
    assert.are.equal("the parent failed to prove the secret", close.payload)
    assert.is_nil(P.message(wire.PROOF))
    assert.is_false(H.exists(marker))
    P.stop()
    H.rmdir(dir)
  end)

  it("runs nothing sent before the handshake has ended", function()
    local dir = H.tmpdir()
    local marker = dir .. "/ran"
    local P = fake_parent { hello = function(P)
      P.conn:send(wire.SPAWN, 1, spawn_bytes(function() io.open(marker, "w"):close() end))
    end }
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(1, P.exit.code)
    assert.matches("protocol: unexpected SPAWN during the handshake", P.text(), 1, true)
    assert.is_false(H.exists(marker))
    P.stop()
    H.rmdir(dir)
  end)

  it("proves itself, reports up with its pid, and runs calls", function()
    local P = fake_parent()
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    assert.is_true(P.proved)
    assert.are.equal(P.proc:pid(), math.tointeger(P.up.pid))
    P.conn:send(wire.SPAWN, 7, spawn_bytes(function() return require("flame").parent().backend end))
    P.wait(function() return P.message(wire.RESULT, 7) end, "the result")
    local status, backend = result(P.message(wire.RESULT, 7))
    assert.are.equal("r", status)
    assert.are.equal("process", backend)
    P.conn:send(wire.SHUTDOWN, 0, "")
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(0, P.exit.code)
    assert.matches("stopping (shutdown)", P.text(), 1, true)
    P.stop()
  end)

  describe("code_sync's CODE", function()
    local function hex_raw(h) return (h:gsub("..", function(x) return string.char(tonumber(x, 16)) end)) end
    local function entry(path, content) return string.pack("<s2BI8", path, 0, #content) .. content end
    local function pack(...)
      local e = { ... }
      return "FLPK\1" .. string.pack("<I4", #e) .. table.concat(e)
    end
    local function code(p) return hex_raw(core.sha256(p)) .. p end
    -- what the runner left in its TMPDIR (valgrind's own files aside)
    local function ours(tmp)
      local out = {}
      for _, f in ipairs(core.list_files(tmp)) do
        if not f:find("^vgdb") then out[#out + 1] = f end
      end
      return out
    end
    local function answers(P)
      local out = {}
      for _, m in ipairs(P.got) do if m.type == wire.CODE then out[#out + 1] = m.payload end end
      return out
    end

    it("checks the pack's hash, unpacks it once, runs work with it, and removes it at the end", function()
      local tmp = H.tmpdir()
      local P = fake_parent { settings = { code_sync = true }, env = { TMPDIR = tmp } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      -- no workers before the code: a call is refused, unstarted
      P.conn:send(wire.SPAWN, 1, spawn_bytes(function() return 1 end))
      P.wait(function() return P.message(wire.RESULT, 1) end, "the refusal")
      local status, why = result(P.message(wire.RESULT, 1))
      assert.are.equal("e", status)
      assert.matches("its code (code_sync) has not arrived yet", why, 1, true)
      -- damaged on the way: refused, nothing unpacked
      local good = pack(entry("specpk/mod.lua", "return { n = 7 }\n"))
      local bad = code(good):sub(1, -2) .. "X"
      P.conn:send(wire.CODE, 0, bad)
      P.wait(function() return #answers(P) == 1 end, "the answer to a damaged pack")
      assert.matches("^ecode_sync: the pack's SHA%-256 is not the one it was sent with", answers(P)[1])
      assert.are.same({}, ours(tmp))
      P.conn:send(wire.CODE, 0, code(good))
      P.wait(function() return #answers(P) == 2 end, "the answer to the pack")
      assert.are.equal("o" .. core.sha256(good), answers(P)[2])
      P.conn:send(wire.SPAWN, 2, spawn_bytes(function()
        return require("specpk.mod").n, require("flame").parent().code_dir
      end))
      P.wait(function() return P.message(wire.RESULT, 2) end, "the result")
      local m = P.message(wire.RESULT, 2)
      local ok, n, dir = core.decode(m.payload:sub(2))
      assert.is_true(ok, tostring(n))
      assert.are.equal(7, n)
      assert.are.equal(tmp, dir:match("^(.*)/flame%-code%-"))
      -- the same pack again is answered, not unpacked; another is refused
      P.conn:send(wire.CODE, 0, code(good))
      P.conn:send(wire.CODE, 0, code(pack(entry("other.lua", "return 1"))))
      P.wait(function() return #answers(P) == 4 end, "the answers to two more packs")
      assert.are.equal("o" .. core.sha256(good), answers(P)[3])
      assert.matches("has its code already", answers(P)[4], 1, true)
      local unpacked = 0
      for _, l in ipairs(P.output) do if l:find("code_sync: 1 files in", 1, true) then unpacked = unpacked + 1 end end
      assert.are.equal(1, unpacked, P.text())
      P.conn:send(wire.SHUTDOWN, 0, "")
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      assert.are.equal(0, P.exit.code, P.text())
      assert.is_nil(core.file_info(dir), "its directory is left behind")
      P.stop()
      H.rmdir(tmp)
    end)

    it("refuses a pack whose paths would leave its directory, and writes nothing", function()
      local tmp = H.tmpdir()
      local P = fake_parent { settings = { code_sync = true }, env = { TMPDIR = tmp } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.CODE, 0, code(pack(entry("a.lua", "x"), entry("b/../../../escaped", "y"))))
      P.wait(function() return #answers(P) == 1 end, "the answer")
      assert.matches("a path a runner may not write", answers(P)[1], 1, true)
      assert.are.same({}, ours(tmp))
      assert.is_nil(core.file_info(tmp .. "/../escaped"))
      P.stop()
      H.rmdir(tmp)
    end)

    it("is refused by a runner started without code_sync", function()
      local P = fake_parent()
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.CODE, 0, code(pack()))
      P.wait(function() return #answers(P) == 1 end, "the answer")
      assert.are.equal("ethis runner was not started with code_sync", answers(P)[1])
      P.stop()
    end)

    it("fails its boot after the code when a --require module is in neither", function()
      local P = fake_parent { settings = { code_sync = true }, args = { "--require", "specpk.none" } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.CODE, 0, code(pack(entry("specpk/mod.lua", "return {}"))))
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      assert.are.equal(1, P.exit.code)
      assert.matches("^ethe runner cannot start: module 'specpk.none' not found", answers(P)[1])
      P.stop()
    end)
  end)

  it("runs calls that arrive together side by side, up to max_concurrency", function()
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local gate = H.gate
    local P = fake_parent { settings = { max_concurrency = 4 } }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    -- one burst: a call held at a gate, then three quick ones
    P.conn:send(wire.SPAWN, 1, spawn_bytes(function() gate(go) return "slow" end))
    for id = 2, 4 do P.conn:send(wire.SPAWN, id, spawn_bytes(function() return "quick" end)) end
    P.wait(function()
      return P.message(wire.RESULT, 2) and P.message(wire.RESULT, 3) and P.message(wire.RESULT, 4)
    end, "the quick results while the slow call waits")
    assert.is_nil(P.message(wire.RESULT, 1))
    H.touch(go)
    P.wait(function() return P.message(wire.RESULT, 1) end, "the slow result")
    P.stop()
    H.rmdir(dir)
  end)

  it("runs the quick jobs of a burst beside the job that holds its started worker", function()
    -- what a runner's executor does when SPAWNs arrive in one read: the worker made
    -- at start takes the first job, which holds it; the others must not wait for it
    local dir = H.tmpdir()
    local go = dir .. "/go"
    local gate = H.gate
    local done = {}
    local ex = core.executor { workers = 4, prestart = true,
      on_done = function(id, status) done[id] = status end }
    assert.is_true(ex:ready())
    ex:submit(1, assert(core.encode(nil, function() gate(go) end)))
    for id = 2, 4 do ex:submit(id, assert(core.encode(nil, function() return id end))) end
    assert.is_true(H.wait_for(function() return done[2] and done[3] and done[4] end),
      "the quick jobs waited behind the held one")
    -- a worker beside the held one at least; how many more depends on how soon the
    -- quick jobs end (a worker on its way starts another only while jobs are left)
    local workers = ex:stats().workers
    assert.is_true(workers >= 2 and workers <= 4, "workers: " .. workers)
    assert.is_nil(done[1])
    H.touch(go)
    assert.is_true(H.wait_for(function() return done[1] ~= nil end))
    ex:close()
    H.rmdir(dir)
  end)

  it("gives up a parent that goes silent, killing its linked work", function()
    local dir = H.tmpdir()
    local started = dir .. "/started"
    -- the parent answers the handshake, then never sends another byte
    local P = fake_parent { settings = { heartbeat_interval = 100, heartbeat_misses = 3,
                                         shutdown_timeout = 60000 } }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    P.conn:send(wire.SPAWN, 1, spawn_bytes(function()
      io.open(started, "w"):close()
      while true do end
    end))
    P.wait(function() return H.exists(started) end, "the work to start")
    P.wait(function() return P.exit ~= nil end, "the runner to give its parent up")
    assert.are.equal(0, P.exit.code)
    assert.matches("lost the parent: no heartbeat from the parent for 3 intervals of 100 ms",
      P.text(), 1, true)
    P.stop()
    H.rmdir(dir)
  end)

  describe("gives up a parent that breaks the protocol after the handshake", function()
    local cases = {
      { "a SPAWN with id 0", function(P) P.conn:send(wire.SPAWN, 0, spawn_bytes(function() end)) end,
        "protocol: SPAWN with id 0" },
      { "a SPAWN too short for its header", function(P) P.conn:send(wire.SPAWN, 3, "abc") end,
        "protocol: malformed SPAWN" },
      { "a SPAWN of a call already running", function(P)
          local work = spawn_bytes(function() while true do end end)
          P.conn:send(wire.SPAWN, 5, work)
          P.conn:send(wire.SPAWN, 5, work)
        end, "protocol: SPAWN of call 5, which is running" },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        local P = fake_parent { settings = { shutdown_timeout = 0 } }
        P.wait(function() return P.up ~= nil end, "REMOTE_UP")
        case[2](P)
        P.wait(function() return P.exit ~= nil end, "the runner to exit")
        assert.matches("lost the parent: " .. case[3], P.text(), 1, true)
        P.stop()
      end)
    end
  end)

  it("stays up when the pool's idle check fails", function()
    local P = fake_parent { settings = { idle_shutdown_after = 100, idle_check = true } }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    P.conn:send(wire.CONFIG, 0, assert(core.encode(nil, function() error("no answer") end)))
    P.wait(function() return P.text():find("the idle check failed (e): staying up", 1, true) end,
      "the failed check")
    assert.is_nil(P.message(wire.REMOTE_SHUTDOWN))
    P.conn:send(wire.SPAWN, 1, spawn_bytes(function() return "still here" end))
    P.wait(function() return P.message(wire.RESULT, 1) end, "the result")
    local status, v = result(P.message(wire.RESULT, 1))
    assert.are.equal("r", status)
    assert.are.equal("still here", v)
    P.stop()
  end)

  it("waits for the pool's idle check before it idles down, when told one will come", function()
    local function pings(P)
      local n = 0
      for _, m in ipairs(P.got) do if m.type == wire.PING then n = n + 1 end end
      return n
    end
    local P = fake_parent { settings = { idle_shutdown_after = 100, heartbeat_interval = 100,
                                         idle_check = true } }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    local seen = pings(P)                    -- five of its heartbeats: five idle windows
    P.wait(function() return pings(P) >= seen + 5 end, "the runner's heartbeats")
    assert.is_nil(P.message(wire.REMOTE_SHUTDOWN), "it idled down before its check came")
    P.conn:send(wire.CONFIG, 0, assert(core.encode(nil, function() return true end)))
    P.wait(function() return P.message(wire.REMOTE_SHUTDOWN) end, "REMOTE_SHUTDOWN")
    assert.are.equal("idle", P.message(wire.REMOTE_SHUTDOWN).payload)
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    P.stop()
    -- and told nothing, it idles down without a check
    local Q = fake_parent { settings = { idle_shutdown_after = 100 } }
    Q.wait(function() return Q.message(wire.REMOTE_SHUTDOWN) end, "REMOTE_SHUTDOWN")
    Q.wait(function() return Q.exit ~= nil end, "the runner to exit")
    Q.stop()
  end)

  describe("a KILL that overtakes its SPAWN", function()
    -- FLAME_TEST_HOLD_SPAWN=1 (docs/protocol.md): the runner handles each SPAWN after
    -- the message that follows it, as when a small KILL passes the chunks of a big
    -- SPAWN on the wire
    local function runner_with_marker()
      local dir = H.tmpdir()
      local marker = dir .. "/started"
      local P = fake_parent { env = { FLAME_TEST_HOLD_SPAWN = "1" } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      local work = spawn_bytes(function()
        io.open(marker, "w"):close()
        while true do end
      end)
      return P, work, marker, dir
    end

    local function serves_on(P)
      P.conn:send(wire.SPAWN, 2, spawn_bytes(function() return 42 end))
      P.conn:send(wire.PING, 0, "")
      P.wait(function() return P.message(wire.RESULT, 2) end, "the next result")
      local s2, v2 = result(P.message(wire.RESULT, 2))
      assert.are.equal("r", s2)
      assert.are.equal(42, v2)
    end

    it("is remembered: the work never starts, and the runner goes on", function()
      local P, work, marker, dir = runner_with_marker()
      P.conn:send(wire.SPAWN, 1, work)
      P.conn:send(wire.KILL, 1, "cancelled")
      P.wait(function() return P.message(wire.RESULT, 1) end, "the killed call's result")
      local status, why = result(P.message(wire.RESULT, 1))
      assert.are.equal("k", status)
      assert.are.equal("cancelled", why)
      assert.is_false(H.exists(marker))
      serves_on(P)
      P.stop()
      H.rmdir(dir)
    end)

    it("while a held SPAWN followed by another message runs, and its KILL kills it", function()
      local P, work, marker, dir = runner_with_marker()
      P.conn:send(wire.SPAWN, 1, work)
      P.conn:send(wire.PING, 0, "")
      P.wait(function() return H.exists(marker) end, "the work to start")
      P.conn:send(wire.KILL, 1, "cancelled")
      P.wait(function() return P.message(wire.RESULT, 1) end, "the killed call's result")
      local status, why = result(P.message(wire.RESULT, 1))
      assert.are.equal("k", status)
      assert.are.equal("cancelled", why)
      serves_on(P)
      P.stop()
      H.rmdir(dir)
    end)
  end)

  it("answers heartbeats while every worker computes for three heartbeat windows", function()
    local link = { heartbeat_interval = 200, heartbeat_misses = 3 }
    local p = H.pool { name = "busy", backend = "process", max = 1, max_concurrency = 2,
                       link = link }
    local function pid()
      local f = io.open("/proc/self/stat")
      local s = f:read("a")
      f:close()
      return tonumber(s:match("^(%d+)"))
    end
    local before = flame.call(p, pid)
    local window = link.heartbeat_interval * link.heartbeat_misses / 1000
    local function spin()
      local t0 = os.clock()                   -- CPU time: the worker really computes
      while os.clock() - t0 < 3 * window do end
      return pid()
    end
    local a = flame.spawn(function() return flame.call(p, spin) end)
    local b = flame.spawn(function() return flame.call(p, spin) end)
    assert.are.equal(before, a:await())
    assert.are.equal(before, b:await())
    assert.are.equal(before, flame.call(p, pid))
    assert.are.equal(1, p:stats().runners)
  end)

  describe("system_shutdown", function()
    local function with_backend(source, f)
      local dir = H.tmpdir()
      local file = assert(io.open(dir .. "/flame_spec_backend.lua", "w"))
      file:write(source)
      file:close()
      local P = fake_parent { backend = "flame_spec_backend",
                              env = { LUA_PATH_5_4 = dir .. "/?.lua;;" } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.SHUTDOWN, 0, "")
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      f(P)
      P.stop()
      H.rmdir(dir)
    end

    it("of a backend of the runner's own runs in a sandboxed backend state", function()
      with_backend([[
        local B = {}
        function B.system_shutdown(flame)
          flame.log.info("custom system_shutdown: io is %s, os.execute is %s", type(io),
            type(os.execute))
          flame.exit(7)
        end
        return B
      ]], function(P)
        assert.are.equal(7, P.exit.code, P.text())
        assert.matches("custom system_shutdown: io is nil, os.execute is nil", P.text(), 1, true)
      end)
    end)

    it("that computes forever is stopped, and the runner ends", function()
      with_backend([[
        return { system_shutdown = function() while true do end end }
      ]], function(P)
        assert.are.equal(0, P.exit.code)
        assert.matches("system_shutdown failed: .*killed %(timeout%)", P.text())
      end)
    end)

    it("of a built-in backend ends the process without loading Lua", function()
      local P = fake_parent { env = { LUA_PATH_5_4 = "/nonexistent/?.lua" } }
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.SHUTDOWN, 0, "")
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      assert.are.equal(0, P.exit.code)
      assert.not_matches("system_shutdown", P.text())
      P.stop()
    end)
  end)

  it("fails its boot when its sandbox cannot be made (a --require module is missing)", function()
    local p = H.pool { name = "no-module", backend = "process",
                       backend_opts = { args = { "--require", "flame_spec_no_such_module" } } }
    local ok, err = pcall(flame.call, p, function() return 1 end)
    assert.is_false(ok)
    assert.are.equal("boot", err.kind, tostring(err))
    assert.matches("runner process exited with code 1", err.message, 1, true)
  end)

  it("says why it cannot start to a parent it reached, and runs nothing", function()
    local Q = fake_parent { args = { "--require", "flame_spec_no_such_module" } }
    Q.wait(function() return Q.exit ~= nil end, "the runner to exit")
    assert.are.equal(1, Q.exit.code)
    assert.matches("cannot start: .*flame_spec_no_such_module", Q.text())
    local close = Q.message(wire.CLOSE)
    assert.is_table(close)
    assert.matches("the runner cannot start", close.payload, 1, true)
    assert.is_nil(Q.message(wire.REMOTE_UP))
    Q.stop()
  end)

  it("does not wait for work stuck in a C call once the parent has let it go", function()
    local P = fake_parent { settings = { shutdown_timeout = 300 } }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP")
    local dir = H.tmpdir()
    P.conn:send(wire.SPAWN, 1, wire.spawn_payload(nil, false, assert(core.encode(nil, function()
      io.open(dir .. "/started", "w"):close()
      os.execute("sleep 30")
    end))))
    P.wait(function() return H.exists(dir .. "/started") end, "the work to start")
    local t0 = core.hrtime()
    P.conn:send(wire.SHUTDOWN, 0, "")
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.is_true((core.hrtime() - t0) / 1e9 < 20, "the runner waited for the subprocess")
    P.stop()
    H.rmdir(dir)
  end)

  it("lets a parent that has not proved the secret send only a little", function()
    local P = fake_parent { hello = function(P)
      P.conn:send(wire.CHALLENGE, 0, ("x"):rep(200 * 1024))
    end }
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(1, P.exit.code)
    assert.matches("protocol: message too large", P.text(), 1, true)
    P.stop()
  end)

  -- only "localhost", which /etc/hosts answers: a spec must not ask a DNS server
  it("reaches a parent advertised by name, after an address that refuses", function()
    local P = fake_parent { addrs = function(_, port)
      return { "127.0.0.1:1", "localhost:" .. port }
    end }
    P.wait(function() return P.up ~= nil end, "REMOTE_UP through the second address")
    P.conn:send(wire.SHUTDOWN, 0, "")
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(0, P.exit.code)
    P.stop()
  end)

  it("gives up when the parent never answers its HELLO, within the heartbeat window", function()
    local P = fake_parent { hello = function() end,
                            settings = { heartbeat_interval = 100, heartbeat_misses = 3 } }
    P.wait(function() return P.exit ~= nil end, "the runner to exit")
    assert.are.equal(1, P.exit.code)
    assert.matches("timed out waiting for CHALLENGE", P.text(), 1, true)
    P.stop()
  end)

  describe("with a failsafe timeout of forever (boot_timeout = math.huge)", function()
    -- a port of 127.0.0.1 nobody listens on: the OS picked it free, and it is free again
    local function free_port()
      local l = assert(core.listen { host = "127.0.0.1", port = 0,
                                     on_connect = function(c) c:close("not here") end })
      local _, port = l:address()
      l:close()
      return port
    end
    -- the runner's threads (its main one, and its first worker once it has started)
    local function threads(pid)
      local f = io.open("/proc/" .. pid .. "/status")
      local text = f and f:read("a")
      if f then f:close() end
      return tonumber(text and text:match("\nThreads:%s*(%d+)")) or 0
    end

    it("gives up a parent whose every address refuses the connection, and says why", function()
      local port = free_port()
      local P = fake_parent { port = port,
                              addrs = function() return { "127.0.0.1:" .. port, "localhost:" .. port } end,
                              settings = { failsafe_timeout = -1, heartbeat_interval = 1000,
                                           heartbeat_misses = 3 } }
      P.wait(function() return P.exit ~= nil end, "the runner to give up its parent")
      assert.are.equal(1, P.exit.code, P.text())
      assert.matches("flame runner: the parent is gone: every address in FLAME_PARENT refused "
        .. "the connection for %d+ ms", P.text())
      assert.matches("(last: localhost:" .. port .. ": connection refused (ECONNREFUSED))",
        P.text(), 1, true)
      assert.matches("check the pool's link.advertise", P.text(), 1, true)
      P.stop()
    end)

    it("waits for a parent that listens a little later, and reaches it", function()
      local port = free_port()
      -- a grace of 10 s (the heartbeat window): far more than the second it waits here
      local P = fake_parent { port = port,
                              settings = { failsafe_timeout = -1, heartbeat_interval = 1000,
                                           heartbeat_misses = 10 } }
      P.wait(function() return P.exit ~= nil or threads(P.proc:pid()) >= 2 end,
        "the runner to start")
      flame.sleep(1000)                        -- its connects are refused meanwhile
      assert.is_nil(P.exit, "the runner gave up its parent too early:\n" .. P.text())
      P.listen(port)
      P.wait(function() return P.message(wire.HELLO) ~= nil or P.exit ~= nil end, "its HELLO")
      assert.is_table(P.message(wire.HELLO), P.text())
      P.wait(function() return P.up ~= nil end, "REMOTE_UP")
      P.conn:send(wire.SHUTDOWN, 0, "")
      P.wait(function() return P.exit ~= nil end, "the runner to exit")
      assert.are.equal(0, P.exit.code, P.text())
      P.stop()
    end)
  end)
end)
