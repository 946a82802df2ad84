-- What goes on the wire for telemetry (README, --timestamps): the script's form when a record
-- is published at once; the time of the call added only to a record that had to wait, and
-- only when the clock was synchronised at the call (auto); always (device); never (server).
-- Through tb.testing, whose fake clock starts at 1700000000000 and counts as synchronised
-- until s:clock_synced(false).
local testing = require "tb.testing"
local sqlite_outbox = require "tb.sqlite_outbox"
local logmod = require "tb.log"
local core = require "tb.core"

local T = "v1/devices/me/telemetry"
local START = 1700000000000

local script = require("spec.support.files").script

-- a script whose RPC "send" sends, from its handler, what it is given: one send_telemetry
-- per entry ({values =, with_ts =} for the two-argument form)
local SENDER = script([[
  local tb = require "tb"
  tb.on_rpc("send", function(list)
    local out = {}
    for i, e in ipairs(list) do
      local ok, err
      if e.with_ts then ok, err = tb.send_telemetry(e.values, e.with_ts) else ok, err = tb.send_telemetry(e) end
      out[i] = ok and true or err
    end
    return out
  end)
]])

local function load(opts)
  opts = opts or {}
  return testing.load(opts.path or SENDER, opts)
end

-- send(s, ...) -> what the script's send_telemetry(...) returned, called from outside any
-- handler (while offline, too: s:rpc would connect first)
local function send(s, ...)
  return s.ctx.current.api.send_telemetry(...)
end

-- wire(s [, from]) -> the telemetry the agent published after message number `from`, decoded
-- (the text's key order is the table's; types and shapes are what the specs compare)
local function wire(s, from)
  local out = {}
  for i = (from or 0) + 1, #s.published do
    local m = s.published[i]
    if m.topic == T then out[#out + 1] = assert(core.json_decode(m.payload)) end
  end
  return out
end

local function count_logged(s, text)
  local n = 0
  for _, l in ipairs(s.logs) do
    if l.message:find(text, 1, true) then n = n + 1 end
  end
  return n
end

describe("--timestamps auto (the default)", function()
  it("publishes what goes out at once in the script's form: an object, an array, {ts=, values=}", function()
    local s = load()
    s:connect()
    local from = #s.published
    assert.same({true, true, true, true}, s:rpc("send", {{a = 1}, {{b = 2}, {ts = 5, values = {b = 3}}},
      {ts = 7, values = {c = 4}}, {values = {d = 5}, with_ts = 1234}}))
    assert.same({{a = 1}, {{b = 2}, {ts = 5, values = {b = 3}}}, {ts = 7, values = {c = 4}},
      {ts = 1234, values = {d = 5}}}, wire(s, from))
    -- exactly the text of ThingsBoard's documentation
    for i = from + 1, #s.published do
      if s.published[i].topic == T then
        assert.equal('{"a":1}', s.published[i].payload)
        break
      end
    end
  end)

  it("adds the time of the call to what waited offline, entry by entry, keeping a ts given", function()
    local s = load()
    s:connect()
    s:disconnect()
    s:advance(10)
    local at = START + s.clock
    assert.is_true(send(s, {a = 1}))
    assert.is_true(send(s, {{b = 2}, {ts = 5, values = {b = 3}}}))
    assert.is_true(send(s, {ts = 7, values = {c = 4}}))
    local from = #s.published
    s:advance(5000)    -- reconnects after the backoff
    assert.is_true(s:connected())
    assert.same({{ts = at, values = {a = 1}}, {{ts = at, values = {b = 2}}, {ts = 5, values = {b = 3}}},
      {ts = 7, values = {c = 4}}}, wire(s, from))
    assert.truthy(s:logged("delivering 3 queued records"))
  end)

  it("wraps an object that waited as the text the script's form was: {\"ts\":T,\"values\":<payload>}", function()
    local s = load()
    s:disconnect()
    send(s, {x = 42.0, big = 9007199254740993})
    local plain = s.session.outbox:peek().payload
    s:connect()
    local got = wire(s)[1]
    assert.equal(string.format('{"ts":%d,"values":%s}', START, plain), s.published[#s.published].payload)
    assert.equal("float", math.type(got.values.x))
    assert.equal(9007199254740993, got.values.big)
  end)

  it("sends what waited while the clock was not synchronised without a time, and says so once", function()
    local s = load()
    s:connect()
    s:disconnect()
    s:clock_synced(false)
    send(s, {a = 1})
    send(s, {{b = 2}})
    s:clock_synced(true)   -- synchronised by the time it goes out: the time of the call was not
    local from = #s.published
    s:advance(5000)
    assert.same({{a = 1}, {{b = 2}}}, wire(s, from))
    assert.equal(1, count_logged(s, "the system clock was not synchronised"))
    -- sent while synchronised, a record that waits is stamped again
    s:disconnect()
    local at = START + s.clock
    send(s, {c = 3})
    from = #s.published
    s:advance(5000)
    assert.same({{ts = at, values = {c = 3}}}, wire(s, from))
    assert.equal(1, count_logged(s, "the system clock was not synchronised"))
  end)

  it("sends what goes out at once in the script's form also while the clock is not synchronised", function()
    local s = load()
    s:clock_synced(false)
    s:connect()
    local from = #s.published
    s:rpc("send", {{a = 1}})
    assert.same({{a = 1}}, wire(s, from))
    assert.is_nil(s:logged("not synchronised"))
  end)

  it("stamps what waits behind a full in-flight window, not what went out first", function()
    local s = load({config = {max_inflight = 1}})
    s:connect()
    local from = #s.published
    local at = START + s.clock
    s:rpc("send", {{n = 1}, {n = 2}, {n = 3}})
    s:advance(10)
    assert.same({{n = 1}, {ts = at, values = {n = 2}}, {ts = at, values = {n = 3}}}, wire(s, from))
    -- the flow caught up: the next record goes out at once again
    from = #s.published
    s:rpc("send", {{n = 4}})
    assert.same({{n = 4}}, wire(s, from))
  end)

  it("stamps what waits for the rate limits", function()
    -- 2 messages a second: the RPC's answer takes one, the first record the other
    local s = load({config = {rate_limits = "2:1"}})
    s:connect()
    s:advance(1000)
    local from = #s.published
    local at = START + s.clock
    s:rpc("send", {{n = 1}, {n = 2}})
    s:advance(2000)
    assert.same({{n = 1}, {ts = at, values = {n = 2}}}, wire(s, from))
  end)

  it("stamps what the script sent at load, before the first connection", function()
    local s = load({path = script([[
      local tb = require "tb"
      tb.send_telemetry{boot = true}
    ]])})
    s:advance(50)
    s:connect()
    assert.same({{ts = START, values = {boot = true}}}, wire(s))
  end)

  it("keeps the time of the call across a restart (the outbox on disk), and its absence", function()
    local path = os.tmpname() .. ".db"
    local log = logmod.new(function() end, "error")
    local function outbox(now)
      return assert(sqlite_outbox.open{core = core, path = path, log = log, clock = function() return now end})
    end
    local s = load({config = {outbox = outbox(START)}})
    send(s, {a = 1})       -- never connected: waits on disk
    s:clock_synced(false)
    send(s, {b = 2})
    s.session.outbox:close()
    -- the agent starts again, an hour later
    local s2 = load({config = {outbox = outbox(START + 3600000)}, wall = START + 3600000})
    s2:connect()
    assert.same({{ts = START, values = {a = 1}}, {b = 2}}, wire(s2))
    assert.truthy(s2:logged("the system clock was not synchronised"))
  end)

  it("refuses at the call what would be too large once the time is added", function()
    local s = load({config = {payload_limit = 100}})
    local n = 100 - (#T + 4) - #'{"a":""}'    -- '{"a":"xx...x"}' exactly at the limit
    local ok, err = send(s, {a = string.rep("x", n)})
    assert.is_nil(ok)
    assert.matches("payload too large", err)
    s:clock_synced(false)   -- no time can be added: it fits
    assert.is_true(send(s, {a = string.rep("x", n)}))
    s:clock_synced(true)
    assert.is_true(send(s, {a = string.rep("x", n - #'{"ts":1700000000000,"values":}')}))
  end)

  it("keeps s.telemetry's shape: {ts = time of the call, values = ...} per entry", function()
    local s = load()
    s:connect()
    s:rpc("send", {{a = 1}, {{b = 2}, {ts = 5, values = {b = 3}}}})
    assert.same({{ts = START, values = {a = 1}}, {ts = START, values = {b = 2}}, {ts = 5, values = {b = 3}}},
      s.telemetry)
  end)
end)

describe("--timestamps device", function()
  it("stamps every record with the time of the call, also when it goes out at once", function()
    local s = load({config = {timestamps = "device"}})
    s:clock_synced(false)   -- device: the clock is trusted whatever the kernel says
    s:connect()
    local from = #s.published
    s:rpc("send", {{a = 1}, {{b = 2}, {ts = 5, values = {b = 3}}}})
    assert.same({{ts = START, values = {a = 1}}, {{ts = START, values = {b = 2}}, {ts = 5, values = {b = 3}}}},
      wire(s, from))
  end)
end)

describe("--timestamps server", function()
  it("never adds a time, also to what waited; a ts the script gave stays", function()
    local s = load({config = {timestamps = "server"}})
    s:connect()
    s:disconnect()
    send(s, {a = 1})
    send(s, {ts = 7, values = {c = 4}})
    local from = #s.published
    s:advance(5000)
    assert.same({{a = 1}, {ts = 7, values = {c = 4}}}, wire(s, from))
    assert.is_nil(s:logged("not synchronised"))
  end)
end)
