-- The link's writes (core/link.c) over real TCP on 127.0.0.1: messages queued in
-- one burst leave in few writes (LINK_BATCH chunks a write), and must still arrive
-- whole, once each, in order, with the short ones ahead of a long one.
local core = require "flame.core"
local task = require "flame.task"
local H = require "spec.helper"

-- A connected pair: the listener, the connecting side's connection, the accepting
-- side's, what the accepting side receives, and futures set with each side's end.
local function pair()
  local got, closed = {}, task.future()
  local server_conn = task.future()
  local l = assert(core.listen { host = "127.0.0.1", port = 0, on_connect = function(c)
    c:start(function(t, id, payload) got[#got + 1] = { t, id, payload } end,
      function(reason) closed:set(reason) end)
    server_conn:set(c)
  end })
  local host, port = l:address()
  local f = task.future()
  core.connect { host = host, port = port, on_connect = function(c, e) f:set(c, e) end }
  local c, err = f:wait()
  assert(c, err)
  local cclosed = task.future()
  c:start(function() end, function(reason) cclosed:set(reason) end)
  local s = server_conn:wait()
  return l, c, s, got, closed, cclosed
end

describe("the link", function()
  it("delivers a burst of short messages and a long one whole, in order, short ones first", function()
    local l, c, s, got = pair()
    local big = {}
    for i = 1, 700 * 1024 // 16 do big[i] = ("%015d\n"):format(i) end
    big = table.concat(big)                    -- three chunks of LINK_CHUNK or less
    for i = 1, 100 do assert(c:send(10, i, "short " .. i)) end
    assert(c:send(11, 1000, big))
    assert(c:send(12, 1001, ""))               -- an empty one: a header and nothing
    for i = 101, 300 do assert(c:send(10, i, ("s"):rep(i % 7) .. i)) end
    assert.is_true(H.wait_for(function() return #got == 302 end), "got " .. #got)
    local shorts, big_at = {}, nil
    for at, m in ipairs(got) do
      if m[1] == 10 then shorts[#shorts + 1] = m
      elseif m[1] == 11 then big_at = at end
    end
    assert.are.equal(300, #shorts)
    for i, m in ipairs(shorts) do
      assert.are.equal(i, m[2])
      assert.are.equal(i <= 100 and "short " .. i or ("s"):rep(i % 7) .. i, m[3])
    end
    -- every short message, those queued after it included, passed the long one
    assert.are.equal(302, big_at)
    assert.are.equal(#big, #got[big_at][3])
    assert.is_true(got[big_at][3] == big, "the long message changed on its way")
    local empty
    for _, m in ipairs(got) do if m[1] == 12 then empty = m end end
    assert.are.same({ 12, 1001, "" }, empty)
    c:close()
    s:close()
    l:close()
  end)

  it("writes everything queued before a finish, then its end reaches the peer", function()
    local l, c, _, got, closed, cclosed = pair()
    for i = 1, 500 do assert(c:send(10, i, tostring(i))) end
    c:finish("done")
    assert.is_nil(c:send(10, 501, "too late"))   -- finishing: no more
    -- the peer sees the end (the FIN after the last write) with nothing lost, and
    -- closes; then the finishing side ends too
    assert.are.equal("closed by peer", closed:wait())
    assert.are.equal(500, #got)
    for i, m in ipairs(got) do assert.are.equal(tostring(i), m[3]) end
    assert.is_truthy(cclosed:wait())
    l:close()
  end)
end)
