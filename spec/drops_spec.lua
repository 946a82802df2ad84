-- tb.drops on its own: the reading of dropped connections that each session (and each gateway
-- sub-device) keeps. The session specs drive it through a whole session.
local drops = require "tb.drops"

local function guard(limit)
  local t = {now = 0, logs = {}}
  local log = {error = function(fmt, ...) t.logs[#t.logs + 1] = string.format(fmt, ...) end,
    warn = function(fmt, ...) t.logs[#t.logs + 1] = string.format(fmt, ...) end}
  t.g = drops.new{now = function() return t.now end, log = log, limit = limit or 3,
    keep = function() return "; kept" end}
  return t
end

local function rec(seq, sent_at) return {seq = seq, payload = "{}", kind = "telemetry", sent_at = sent_at} end

describe("tb.drops", function()
  it("probes the suspect alone, then sets it aside at the third short drop", function()
    local t = guard(3)
    assert.is_nil(t.g:on_drop({rec(1, 0), rec(2, 0)}, true, 100))
    assert.equal(100, t.g:window(100))
    assert.is_nil(t.g:on_drop({rec(1, 0), rec(2, 0)}, true, 100))
    assert.equal(1, t.g:window(100))          -- the next session sends it alone
    t.now = 500
    local bad = t.g:on_drop({rec(1, 400)}, true, 100)
    assert.equal(1, bad.seq)
    assert.matches("set aside a telemetry record of 2 bytes.*3 times.*; kept", t.logs[1])
    assert.equal(100, t.g:window(100))
  end)

  it("a drop long after the probe went out, or with others in flight, blames nothing", function()
    local t = guard(3)
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.now = 5000
    assert.is_nil(t.g:on_drop({rec(1, 0)}, true, 100))          -- 5 s after sending it
    assert.is_nil(t.g:on_drop({rec(1, 4900), rec(2, 4900)}, true, 100))
  end)

  it("a stable session, an acknowledgement or a record gone from the head clears suspicion", function()
    local t = guard(3)
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.g:acked(rec(1))
    assert.equal(100, t.g:window(100))
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.g:on_drop({rec(1, 0)}, true, 100)
    t.g:before_flush(rec(2))
    assert.equal(100, t.g:window(100))
    t.g:on_drop({rec(1, 0)}, true, 100)
    assert.is_nil(t.g:on_drop({rec(1, 0)}, true, drops.STABLE_MS))
    assert.is_nil(t.g.suspect)
  end)

  it("warns once when three sessions in two minutes close soon after they were accepted", function()
    local t = guard()
    assert.is_false(t.g:session_ended(100))
    assert.is_false(t.g:session_ended(100))
    assert.equal(0, #t.logs)
    assert.is_false(t.g:session_ended(100))
    assert.matches("another device or agent is probably using the same credentials", t.logs[1])
    t.g:session_ended(100)
    assert.equal(1, #t.logs)
    assert.is_true(t.g:session_ended(drops.STABLE_MS))
  end)
end)
