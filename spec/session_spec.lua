-- The device session through tb.testing: the real session, scheduler and loader over the
-- fake transport. These are the contract's behaviours as a script sees them.
local testing = require "tb.testing"

local script = require("spec.support.files").script

-- connects_sending_nothing(s): s connects, and nothing it was asked to send goes out
local function connects_sending_nothing(s)
  s:connect()
  assert.equal(0, #s:sent("v1/devices/me/telemetry"))
  assert.equal(0, #s:sent("v1/devices/me/attributes"))
end

describe("session", function()
  it("subscribes, fetches shared attributes, runs on_connect, and subscribes to RPC last", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_attributes(function(c) tb.state.seen = c.mode end)
      tb.on_connect(function() tb.state.connected = true end)
    ]]))
    s:set_attributes({shared = {mode = "eco"}})
    s:connect()
    assert.equal("eco", s:state().seen)
    assert.is_true(s:state().connected)
    assert.equal("v1/devices/me/rpc/request/+", s.subscriptions[#s.subscriptions])
    assert.same({}, s:sent("v1/devices/me/attributes/request/1")[1])
  end)

  it("queues telemetry while offline, stamps it, and delivers it in order after connect", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 3 do assert(tb.send_telemetry{seq = i}) end
    ]]))
    assert.equal(0, #s:sent("v1/devices/me/telemetry"))
    s:advance(1000)
    s:connect()
    local sent = s:sent("v1/devices/me/telemetry")
    assert.equal(3, #sent)
    for i, m in ipairs(sent) do
      assert.equal(i, m.values.seq)
      assert.equal(1700000000000, m.ts)    -- the time it was measured, not when it was sent
    end
  end)

  it("drops the oldest records when the outbox is full and says so", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 8 do tb.send_telemetry{seq = i} end
    ]]), {config = {outbox_limit = 5}})
    assert.truthy(s:logged("outbox full", "warn"))
    s:connect()
    local sent = s:sent("v1/devices/me/telemetry")
    assert.equal(5, #sent)
    assert.equal(4, sent[1].values.seq)
  end)

  it("in memory too: drops the oldest, counting those dropped when in-flight records come back", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("burst", function(n) for i = 1, n do tb.send_telemetry{seq = i} end end)
    ]]), {memory_outbox = true, config = {outbox_limit = 5, max_inflight = 3}})
    s:connect()
    s.hold_acks = true
    s:rpc("burst", 8)           -- 1-3 in flight, 4-8 queued: the outbox is full
    assert.is_nil(s:logged("outbox full"))
    s:disconnect()              -- 1-3 come back to the front: 8 > 5, so they are dropped
    assert.truthy(s:logged("outbox full %(limit 5 records%): dropped the oldest; 3 dropped so far", "warn"))
    s.hold_acks = false
    s:advance(60000)
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do seqs[#seqs + 1] = (m.values or m).seq end
    assert.same({1, 2, 3, 4, 5, 6, 7, 8}, seqs)
  end)

  it("in memory too: --outbox-max-bytes drops the oldest", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 20 do tb.send_telemetry{seq = i, pad = string.rep("x", 50)} end
    ]]), {memory_outbox = true, config = {outbox_max_bytes = 400}})
    assert.is_true(s.session.outbox.bytes <= 400)
    assert.truthy(s:logged("outbox full %(limit %d+ records, 400 bytes%)", "warn"))
    s:connect()
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do seqs[#seqs + 1] = (m.values or m).seq end
    assert.is_true(#seqs >= 2 and #seqs < 20, #seqs .. " records kept")
    assert.equal(20, seqs[#seqs])
    for i = 2, #seqs do assert.equal(seqs[i - 1] + 1, seqs[i]) end
  end)

  it("in memory too: --outbox-max-age drops records that waited too long", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 3 do tb.send_telemetry{seq = i} end
      tb.after(100000, function() tb.send_telemetry{seq = 4} end)
    ]]), {memory_outbox = true, config = {outbox_max_age = 120}})
    s:advance(180000)
    assert.truthy(s:logged("outbox: dropped 3 records older than 120 s", "warn"))
    s:connect()
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do seqs[#seqs + 1] = (m.values or m).seq end
    assert.same({4}, seqs)
  end)

  it("refuses payloads over the limit at the call and never queues them", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.ok, tb.state.err = tb.send_telemetry{blob = string.rep("x", 70000)}
      tb.state.with_ts = {tb.send_telemetry({blob = string.rep("x", 70000)}, 1)}
      tb.state.attrs = {tb.send_attributes{blob = string.rep("x", 70000)}}
    ]]))
    assert.is_nil(s:state().ok)
    local too_large = "payload too large: over 65536 bytes (limit 65536)"
    assert.equal(too_large, s:state().err)
    assert.same({nil, too_large}, s:state().with_ts)
    assert.same({nil, too_large}, s:state().attrs)
    connects_sending_nothing(s)
  end)

  it("answers an RPC whose result or error text is over the limit with what fits", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("big", function() return string.rep("x", 70000) end)
      tb.on_rpc("loud", function() return nil, string.rep("y", 70000) end)
    ]]))
    s:connect()
    local big = s:rpc("big")
    assert.matches("^cannot encode result: result too large: over %d+ bytes %(limit 65536%)$", big.error)
    assert.truthy(s:logged("RPC 0: cannot encode the result: result too large", "error"))
    local loud = s:rpc("loud")
    assert.equal(string.rep("y", 1024), loud.error:sub(1, 1024))
    assert.truthy(#loud.error < 2048)
    assert.truthy(s:logged("RPC 1: error text cut to fit the payload limit", "warn"))
  end)

  it("refuses NaN and infinities with a clear error", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.r1 = {tb.send_telemetry{t = 0/0}}
      tb.state.r2 = {tb.send_attributes{t = math.huge}}
    ]]))
    assert.is_nil(s:state().r1[1])
    assert.matches("NaN", s:state().r1[2])
    assert.matches("inf", s:state().r2[2])
  end)

  it("refuses lists where key = value belongs, at the call (ThingsBoard would drop the link)", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.r = {
        {tb.send_telemetry{1, 2, 3}},
        {tb.send_telemetry{{1, 2}}},
        {tb.send_telemetry{ts = 5, values = {1, 2}}},
        {tb.send_telemetry({{a = 1}, {a = 2}}, 1234)},
        {tb.send_attributes{1, 2}},
      }
    ]]))
    local r = s:state().r
    for i = 1, 5 do assert.is_nil(r[i][1]) end
    assert.equal("telemetry entries must be tables", r[1][2])
    assert.equal("telemetry entries must be tables of key = value, not lists", r[2][2])
    assert.equal("values must be a table of key = value", r[3][2])
    assert.equal("with a ts, send one table of key = value (each entry of a list carries its own ts)", r[4][2])
    assert.equal("attributes must be a table of key = value", r[5][2])
    connects_sending_nothing(s)
  end)

  it("sends floats as ThingsBoard stores DOUBLEs: positional, at most 16 decimals", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_connect(function()
        tb.send_telemetry{a = 0.1 + 0.2, b = 1e15, c = 21.5}
        tb.send_attributes{d = 1e20}
      end)
    ]]))
    s:connect()
    local raw = {}
    for _, m in ipairs(s.published) do raw[#raw + 1] = m.payload end
    local all = table.concat(raw, "\n")
    assert.matches('"a":0.3[,}]', all)
    assert.matches('"b":1000000000000000.0[,}]', all)
    assert.matches('"c":21.5[,}]', all)
    assert.matches('"d":100000000000000000000.0}', all)
    assert.not_matches("[eE][+-]", all)
  end)

  it("sends the three telemetry forms", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_connect(function()
        tb.send_telemetry{a = 1}
        tb.send_telemetry{{a = 2}, {ts = 5, values = {a = 3}}}
        tb.send_telemetry({a = 4}, 1234)
      end)
    ]]))
    s:connect()
    local raw = {}
    for _, m in ipairs(s.published) do
      if m.topic == "v1/devices/me/telemetry" then raw[#raw + 1] = m.payload end
    end
    -- the outbox is durable: every plain table goes out stamped with the time of the call
    assert.same({ts = 1700000000000, values = {a = 1}}, s:sent("v1/devices/me/telemetry")[1])
    assert.same({{ts = 1700000000000, values = {a = 2}}, {ts = 5, values = {a = 3}}}, s:sent("v1/devices/me/telemetry")[2])
    assert.matches('"ts":1234', raw[3])
    assert.same({1700000000000, 1700000000000, 5, 1234}, {s.telemetry[1].ts, s.telemetry[2].ts, s.telemetry[3].ts, s.telemetry[4].ts})
  end)

  it("sends plain tables as they are with an in-memory outbox while nothing is queued", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_connect(function() tb.send_telemetry{a = 1} end)
    ]]), {memory_outbox = true})
    s:connect()
    for _, m in ipairs(s.published) do
      if m.topic == "v1/devices/me/telemetry" then assert.equal('{"a":1}', m.payload) end
    end
  end)

  it("runs RPC handlers with the contract's response rules", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("str", function() return "text" end)
      tb.on_rpc("fail", function() error("broken") end)
      tb.on_rpc("soft", function() return nil, "not now" end)
      tb.on_rpc("oneway", function() end)
      tb.on_rpc("slow", function(p) tb.sleep(100) return p end)
    ]]))
    s:connect()
    assert.equal("text", s:rpc("str"))
    local raw = s.published[#s.published].payload
    assert.equal('"text"', raw)
    assert.same({error = "broken"}, s:rpc("fail"))
    assert.truthy(s:logged("RPC fail failed: .*broken", "error"))
    assert.same({error = "not now"}, s:rpc("soft"))
    assert.is_nil(s:rpc("oneway"))
    assert.same({error = "unknown method: nope"}, s:rpc("nope"))
    local r1, id1 = s:rpc("slow", 1), s.last_rpc_id
    local r2, id2 = s:rpc("slow", 2), s.last_rpc_id
    assert.is_nil(r1); assert.is_nil(r2)
    s:advance(100)
    assert.equal(1, s.rpc_responses[id1])
    assert.equal(2, s.rpc_responses[id2])
  end)

  it("routes '*' to a fallback handler with the method name", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("*", function(params, id, method) return {method = method, id = id} end)
    ]]))
    assert.same({method = "anything", id = 0}, s:rpc("anything"))
  end)

  it("makes client-side RPC calls with results, server errors and timeouts", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("go", function()
        tb.state.time = tb.rpc_call("getTime", {})
        tb.state.err = select(2, tb.rpc_call("busy"))
        tb.state.lost = select(2, tb.rpc_call("silent", nil, 500))
        return true
      end)
    ]]))
    s:answer_rpc_call("getTime", {time = 42})
    s:answer_rpc_call("busy", {error = "timeout"})
    s:connect()
    s:rpc("go")
    local id = s.last_rpc_id
    s:advance(500)
    assert.same({time = 42}, s:state().time)
    assert.equal("timeout", s:state().err)
    assert.equal("timeout", s:state().lost)
    assert.is_true(s.rpc_responses[id])
  end)

  it("wraps request ids from 2^31-1 back to 1 (ThingsBoard parses them as a Java int)", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("go", function()
        tb.state.a = tb.rpc_call("getTime", {})
        tb.state.b = tb.rpc_call("getTime", {})
        return true
      end)
    ]]))
    s:answer_rpc_call("getTime", {time = 42})
    s:connect()
    s.session.next_req = 2147483646
    s:rpc("go")
    local ids = {}
    for _, m in ipairs(s.published) do
      local id = m.topic:match("^v1/devices/me/rpc/request/(%d+)$")
      if id then ids[#ids + 1] = id end
    end
    assert.same({"2147483647", "1"}, {ids[#ids - 1], ids[#ids]})
    assert.same({time = 42}, s:state().a)
    assert.same({time = 42}, s:state().b)
  end)

  it("runs tb.exec as the agent does: output, exit status, output limit and timeout", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("go", function()
        tb.state.ok = tb.exec({"/bin/echo", "hi"})
        tb.state.fail = {tb.exec("echo first; echo last; exit 3")}
        tb.state.cut = tb.exec("head -c 5000 /dev/zero | tr '\\0' x", {output_limit = 100})
        tb.state.slow = {tb.exec("sleep 3", {timeout = 200})}
        return true
      end)
    ]]))
    s:connect()
    s:rpc("go")
    s:advance(300)
    assert.equal("hi\n", s:state().ok)
    assert.same({nil, "exit 3: last", 3, "first\nlast\n"}, s:state().fail)
    assert.equal(string.rep("x", 100), s:state().cut)
    assert.same({nil, "timeout"}, s:state().slow)
  end)

  it("gives tb.exec the reason when the agent killed the command itself", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("go", function()
        tb.state.res = {tb.exec({"anything"})}
        return true
      end)
    ]]))
    -- what proc.c reports when it has no memory left for the output
    s.core.spawn = function()
      s:queue("exit", 77, -1, 9, "", "out of memory for the command's output (killed)")
      return 77
    end
    s:connect()
    s:rpc("go")
    assert.same({nil, "out of memory for the command's output (killed)", -1, ""}, s:state().res)
  end)

  it("requests attributes with comma-joined keys and returns both sections", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("go", function()
        tb.state.res = tb.request_attributes{client = {"a", "b"}, shared = {"c"}}
        return true
      end)
    ]]))
    s:answer_attributes({shared = {c = 3}})
    s:rpc("go")
    local req = s.published
    local found
    for _, m in ipairs(req) do
      if m.topic:match("attributes/request/%d+$") then found = m.payload end
    end
    assert.matches('"clientKeys":"a,b"', found)
    assert.matches('"sharedKeys":"c"', found)
    assert.same({client = {}, shared = {c = 3}}, s:state().res)
  end)

  it("passes shared attribute deletions as the second argument", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_attributes(function(changes, deleted) tb.state.deleted = deleted; tb.state.changes = changes end)
    ]]))
    s:connect()
    s:delete_attributes({"a", "b"})
    assert.same({"a", "b"}, s:state().deleted)
    assert.same({}, s:state().changes)
  end)

  it("raises when a yielding call is made at the top level", function()
    assert.has_error(function()
      testing.load(script([[ local tb = require "tb"; tb.sleep(10) ]]))
    end)
    local ok, err = pcall(testing.load, script([[ local tb = require "tb"; tb.sleep(10) ]]))
    assert.is_false(ok)
    assert.matches("tb.sleep yields and cannot be called at a script's top level", err)
  end)

  it("cuts off a runaway handler and keeps serving", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("spin", function() while true do end end)
      tb.on_rpc("ping", function() return "pong" end)
    ]]), {budget_ms = 100})
    s:expect_error("without yielding")
    local res = s:rpc("spin")
    assert.matches("without yielding", res.error)
    assert.equal("pong", s:rpc("ping"))
    assert.equal(1, #s.errors)
    assert.is_true(s.errors[1].expected)
  end)

  it("keeps timers independent and cancellable", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.ticks, tb.state.once = 0, 0
      local t = tb.every(100, function() tb.state.ticks = tb.state.ticks + 1 end)
      tb.after(250, function() t:cancel() end)
      tb.after(50, function() tb.state.once = tb.state.once + 1 end)
    ]]))
    s:advance(1000)
    assert.equal(2, s:state().ticks)
    assert.equal(1, s:state().once)
  end)

  it("reconnects with backoff after a drop and re-subscribes", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.connects, tb.state.drops = 0, 0
      tb.on_connect(function() tb.state.connects = tb.state.connects + 1 end)
      tb.on_disconnect(function() tb.state.drops = tb.state.drops + 1 end)
    ]]))
    s:connect()
    s:disconnect()
    assert.is_false(s:connected())
    assert.equal(1, s:state().drops)
    s:advance(2000)
    assert.is_true(s:connected())
    assert.equal(2, s:state().connects)
  end)

  it("exits 3 at the first credentials refusal, or after 5 in a row once it was connected", function()
    local s = testing.load(script('local tb = require "tb"'), {config = {backoff_min = 100, backoff_max = 200}})
    s:refuse(5)
    s:connect()
    assert.equal(3, s.ctx.fatal and s.ctx.fatal.code)
    assert.matches("CONNACK 5, not authorized", s.ctx.fatal.message)

    s = testing.load(script('local tb = require "tb"'), {config = {backoff_min = 100, backoff_max = 200}})
    s:connect()
    s:refuse(4)
    s:disconnect("server restart")
    s:advance(700)             -- a few refusals while the server comes back
    assert.is_nil(s.ctx.fatal)
    assert.truthy(s:logged("CONNACK 4, bad user name or password", "error"))
    s:refuse(nil)
    s:advance(1000)
    assert.is_true(s.session:online())
    s:refuse(5)                -- the run starts again from zero
    s:disconnect("token revoked")
    for _ = 1, 20 do s:advance(300) end
    assert.equal(3, s.ctx.fatal and s.ctx.fatal.code)
    assert.matches("%(5 times in a row%)", s.ctx.fatal.message)
  end)

  it("warns once when the server keeps closing fresh sessions", function()
    local s = testing.load(script([[ local tb = require "tb" ]]))
    s:connect()
    for _ = 1, 3 do
      s:advance(500)
      s:disconnect("session taken over")
      s:advance(6000)
    end
    assert.truthy(s:logged("same credentials", "warn"))
  end)

  it("hands unacknowledged records back to the outbox on a drop", function()
    local s = testing.load(script([[ local tb = require "tb" ]]))
    s:connect()
    -- stop acknowledging: the fake server swallows PUBACKs from now on
    local receive = s.server_receive
    s.server_receive = function(self, id, topic, payload, qos, mid) return receive(self, id, topic, payload, 0, mid) end
    s.ctx.current.api.send_telemetry{seq = 1}
    s.ctx.current.api.send_telemetry{seq = 2}
    s.server_receive = receive
    s:disconnect()
    s:advance(2000)
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do seqs[#seqs + 1] = m.values and m.values.seq or m.seq end
    assert.same({1, 2, 1, 2}, seqs)
  end)

  it("sets aside a record the server keeps disconnecting for, and delivers the rest", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.send_telemetry{seq = 1}
      tb.send_telemetry{poison = true}
      tb.send_telemetry{seq = 2}
    ]]))
    -- the fake server closes the connection, without PUBACK, whenever the poison arrives
    local receive = s.server_receive
    s.server_receive = function(self, id, topic, payload, qos, mid)
      if payload:find("poison") then
        self.published[#self.published + 1] = {topic = topic, payload = payload, qos = qos}
        self:queue("disconnect", id, 7, 0, "closed by server")
        return
      end
      return receive(self, id, topic, payload, qos, mid)
    end
    s:connect()
    for _ = 1, 4 do s:advance(70000) end
    assert.truthy(s:logged("set aside a telemetry record", "error"))
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do
      if m.values.seq then seqs[m.values.seq] = true end
    end
    assert.is_true(seqs[1] and seqs[2])
    assert.equal(1, s.session.stats.set_aside)
    -- kept for the operator, not lost
    local f = assert(io.open(s.config.state_dir .. "/set-aside.jsonl"))
    local kept = require("tb.core").json_decode(f:read("l"))
    f:close()
    assert.equal("v1/devices/me/telemetry", kept.topic)
    assert.matches('"poison":true', kept.payload)
    assert.truthy(s:logged("set aside a telemetry record .*kept in .*set%-aside%.jsonl", "error"))
  end)

  it("stops suspecting a record that left the outbox otherwise (full outbox): the window reopens", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 5 do tb.send_telemetry{seq = i} end
    ]]), {memory_outbox = true, config = {backoff_min = 1000, backoff_max = 2000, outbox_limit = 5}})
    s.hold_acks = true
    s:connect()
    s:advance(300)
    s:disconnect("link lost")       -- seq 1 heads the in-flight window: suspected once
    s:advance(3000)
    s:advance(300)
    s:disconnect("link lost")       -- twice: it would go alone next time...
    for i = 1, 5 do s.ctx.current.api.send_telemetry{extra = i} end   -- ...but the full outbox drops it
    s.hold_acks = false
    s:advance(60000)
    assert.equal(0, s.session.outbox:count())
    s.hold_acks = true
    for i = 1, 50 do s.ctx.current.api.send_telemetry{more = i} end
    s:advance(10)
    assert.is_nil(s.session.drops.probe)
    assert.equal(math.min(50, s.session.window), s.session.inflight_n)
  end)

  it("sets nothing aside when the link drops on its own, PUBACKs lost, sessions short", function()
    local s = testing.load(script([[
      local tb = require "tb"
      for i = 1, 5 do tb.send_telemetry{seq = i} end
    ]]), {config = {backoff_min = 100, backoff_max = 200}})
    s.hold_acks = true
    s:connect()
    for _ = 1, 6 do
      assert.is_true(s.session.inflight_n > 0)
      s:advance(3000)          -- records in flight, no PUBACK, then the link goes
      s:disconnect("link lost")
      s:advance(500)           -- back within the backoff
      assert.is_true(s.session:online())
    end
    s.hold_acks = false
    s:advance(3000)
    s:disconnect("link lost")
    s:advance(60000)
    assert.equal(0, s.session.stats.set_aside)
    assert.is_nil(s:logged("set aside"))
    local seqs = {}
    for _, m in ipairs(s:sent("v1/devices/me/telemetry")) do seqs[(m.values or m).seq] = true end
    for i = 1, 5 do assert.is_true(seqs[i], "seq " .. i) end
  end)
end)

describe("reconnect backoff", function()
  local session = require "tb.session"
  local function delays(attempt, n)
    local out = {}
    for i = 1, n do
      local fake = {config = {backoff_min = 1000, backoff_max = 60000}, attempts = attempt}
      out[i] = session.backoff_delay(fake)
    end
    return out
  end

  it("doubles from the minimum to the maximum, spread by +-25 % jitter", function()
    for attempt, base in pairs({[0] = 1000, [1] = 2000, [3] = 8000, [5] = 32000, [6] = 60000, [20] = 60000}) do
      local d = delays(attempt, 200)
      local lo, hi, distinct = math.huge, 0, {}
      for _, v in ipairs(d) do
        lo, hi = math.min(lo, v), math.max(hi, v)
        distinct[v] = true
      end
      assert.is_true(lo >= math.floor(base * 0.75) and hi <= math.min(60000, base * 1.25),
        string.format("attempt %d: %d..%d outside %d +-25 %%", attempt, lo, hi, base))
      -- the spread is real: 200 draws cover most of the band, not one value
      assert.is_true(hi - lo > base * (base < 60000 and 0.4 or 0.2),
        string.format("attempt %d: %d..%d is no jitter", attempt, lo, hi))
      local n = 0
      for _ in pairs(distinct) do n = n + 1 end
      assert.is_true(n > 50)
    end
  end)
end)
