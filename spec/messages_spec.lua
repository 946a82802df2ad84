-- Messages that say what happened: a refused token announces no reconnect before the agent
-- exits; each kind of connection failure gets plain words with the host and port; a handler
-- failing the same way every period is logged in full once, then counted; a reconnect says
-- how many queued records it delivers. Through tb.testing (the fake transport stands in for
-- src/mqtt.c's failure codes).
local testing = require "tb.testing"

local script = require("spec.support.files").script

local EMPTY = script("local tb = require 'tb'\n")

local function count_logged(s, pattern)
  local n = 0
  for _, l in ipairs(s.logs) do
    if l.message:find(pattern) then n = n + 1 end
  end
  return n
end

describe("a refused token", function()
  it("ends the agent with exit 3 and announces no reconnect", function()
    local s = testing.load(EMPTY)
    s:refuse(5)
    s.session:start()
    s:pump()
    s:advance(5000)
    assert.same({code = 3, message = "ThingsBoard refused the connection: CONNACK 5, not authorized " ..
      "(wrong access token or credentials); check --token or --client-id/--username/--password"}, s.ctx.fatal)
    assert.is_nil(s:logged("reconnecting"))
    assert.is_nil(s:logged("cannot connect"))
    assert.equal(1, s.next_conn)   -- one attempt
  end)

  it("after a connection worked, a refusal is logged and retried until the run of refusals ends it", function()
    local s = testing.load(EMPTY)
    s:connect()
    s:refuse(5)
    s:disconnect()
    s:advance(2000)
    assert.truthy(s:logged("ThingsBoard refused the connection: CONNACK 5", "error"))
    assert.truthy(s:logged("reconnecting in"))
    -- said once by the CONNACK line, not again as a failed connection
    assert.is_nil(s:logged("cannot connect"))
  end)
end)

describe("connection failures in plain words", function()
  -- fail_with(s, mode, text, code): the next attempts fail as src/mqtt.c reports them: at once
  -- from mqtt_connect ("sync"), or as a disconnect before any CONNACK ("async")
  local function fail_with(s, mode, text, code)
    local real = s.core.mqtt_connect
    s.core.mqtt_connect = function(opts)
      if mode == "sync" then return nil, text, code end
      local conn, id = real(opts)
      s.events[#s.events] = nil   -- no CONNACK
      s:queue("disconnect", id, 14, 0, text, code)
      return conn, id
    end
  end

  local CASES = {
    {"dns", "connect failed: Lookup error.",
      "cannot connect to tb.testing:1883: host tb.testing not found (no address for that name); check --host and the device's DNS"},
    {"refused", "connect failed: Connection refused",
      "cannot connect to tb.testing:1883: connection refused: nothing accepts connections on port 1883 of tb.testing; " ..
      "check --host and --port, and that ThingsBoard's MQTT transport runs"},
    {"unreachable", "connect failed: Network is unreachable",
      "cannot connect to tb.testing:1883: no route to tb.testing (network is unreachable); check --host and the device's network"},
    {"timeout", "Connection timed out",
      "cannot connect to tb.testing:1883: no answer from tb.testing:1883 within 30 s (timed out); " ..
      "check --host, --port and any firewall between"},
    {"tls", "TLS error: certificate verify failed",
      "cannot connect to tb.testing:1883: TLS handshake with tb.testing:1883 failed (certificate verify failed); " ..
      "check --cafile, --cert and --key"},
  }
  for _, mode in ipairs({"sync", "async"}) do
    for _, case in ipairs(CASES) do
      it(case[1] .. " (" .. mode .. ")", function()
        local s = testing.load(EMPTY)
        fail_with(s, mode, case[2], case[1])
        s.session:start()
        s:pump()
        local line = s:logged("^cannot connect", "warn")
        assert.equal(case[3], line)
        assert.truthy(s:logged("^reconnecting in"))
      end)
    end
  end

  it("a failure without a known kind keeps its own words", function()
    local s = testing.load(EMPTY)
    fail_with(s, "async", "The client is not currently connected.")
    s.session:start()
    s:pump()
    assert.equal("cannot connect to tb.testing:1883: The client is not currently connected.", s:logged("^cannot connect"))
  end)

  it("a server that accepts but never answers: no answer within --connect-timeout", function()
    local s = testing.load(EMPTY, {config = {connect_timeout = 1500}})
    local real = s.core.mqtt_connect
    s.core.mqtt_connect = function(opts)
      local conn, id = real(opts)
      s.events[#s.events] = nil   -- the CONNACK never comes
      return conn, id
    end
    s.session:start()
    s:advance(1600)
    assert.equal("cannot connect to tb.testing:1883: no answer from tb.testing:1883 within 1.5 s (timed out); " ..
      "check --host, --port and any firewall between", s:logged("^cannot connect"))
  end)
end)

describe("a handler that fails the same way every period", function()
  local PUMP = script([[
local tb = require "tb"
local n = 0
tb.every(2000, function()
  n = n + 1
  if tb.state.fixed then return end
  if tb.state.other then error("other failure") end
  error("sensor gone")
end)
]])

  it("is logged in full once, then counted once a minute", function()
    local s = testing.load(PUMP)
    s:expect_error()
    s:advance(2000)
    assert.equal(1, count_logged(s, "^timer at .*:3 failed: .*:7: sensor gone"))
    -- the first repeat (at 4 s) opens a minute: its 30 runs are one line at its end
    s:advance(61999)
    assert.is_nil(s:logged("more times"))
    s:advance(1)
    assert.equal(1, count_logged(s, "failed: .*sensor gone"))
    assert.equal(1, count_logged(s, "more times"))
    assert.matches("^timer at .*:3 failed 30 more times in 60 s: same error$", s:logged("more times"))
    s:advance(60000)
    assert.equal(2, count_logged(s, "^timer at .*:3 failed 30 more times in 60 s: same error$"))
    assert.equal(1, count_logged(s, "failed: .*sensor gone"))
  end)

  it("logs a different error in full, after the count of the one before", function()
    local s = testing.load(PUMP)
    s:expect_error()
    s:advance(10000)   -- the first in full, 4 repeats
    s:state().other = true
    s:advance(2000)
    local lines = {}
    for _, l in ipairs(s.logs) do if l.message:find("^timer at") then lines[#lines + 1] = l.message:match("^[^\n]*") end end
    assert.equal(3, #lines)
    assert.matches("failed: .*sensor gone$", lines[1])
    assert.matches("failed 4 more times in 8 s: same error$", lines[2])
    assert.matches("failed: .*other failure$", lines[3])
  end)

  it("logs the same error in full again after ten quiet minutes", function()
    local s = testing.load(PUMP)
    s:expect_error()
    s:advance(4000)
    s:state().fixed = true
    s:advance(700000)
    s:state().fixed = nil
    s:advance(2000)
    assert.equal(2, count_logged(s, "failed: .*sensor gone"))
  end)
end)

describe("a reconnect", function()
  it("says how many queued records it delivers", function()
    local s = testing.load(EMPTY)
    s:connect()
    s:disconnect()
    for i = 1, 3 do s.ctx.current.api.send_telemetry{n = i} end
    s:advance(5000)
    assert.is_true(s:connected())
    assert.truthy(s:logged("^delivering 3 queued records$", "info"))
  end)
end)
