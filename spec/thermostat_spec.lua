local testing = require "tb.testing"

describe("examples/thermostat.lua", function()
  local s
  before_each(function()
    s = testing.load("examples/thermostat.lua")
  end)

  it("reports temperature and humidity every 5 s", function()
    s:connect()
    s:advance(15000)
    assert.equal(3, #s.telemetry)
    for _, t in ipairs(s.telemetry) do
      assert.is_number(t.values.temperature)
      assert.is_number(t.values.humidity)
    end
    assert.equal(s.telemetry[1].ts + 5000, s.telemetry[2].ts)
  end)

  it("takes a setpoint over RPC and reports it as a float attribute", function()
    s:connect()
    local res = s:rpc("setSpValue", 25)
    assert.same({setpoint = 25.0}, res)
    assert.equal("float", math.type(res.setpoint))
    assert.equal(25.0, s.attributes[#s.attributes].setpoint)
    assert.equal(25.0, s:rpc("getSpValue"))
  end)

  it("answers a bad setpoint with an error", function()
    local res = s:rpc("setSpValue", "hot")
    assert.same({error = "setpoint must be a number from 5 to 35"}, res)
  end)

  it("follows the shared attribute target", function()
    s:connect()
    s:push_attributes({target = 19})
    assert.equal(19.0, s:rpc("getSpValue"))
  end)

  it("applies the current target when it connects", function()
    s:set_attributes({shared = {target = 30}})
    s:connect()
    assert.equal(30.0, s:rpc("getSpValue"))
  end)
end)

describe("tb.testing assertions", function()
  it("reads well in specs", function()
    local s = testing.load("examples/thermostat.lua")
    s:connect()
    s:advance(5000)
    assert.sent_telemetry(s, {humidity = 43.0})
    assert.no.sent_telemetry(s, {humidity = 99})
    assert.rpc_error(s, "setSpValue", "hot", "must be a number")
    assert.fw_state("UPDATED", s:offer_firmware({title = "thermostat", version = "2.0"}, "image"))
    assert.has_error(function() assert.fw_state("FAILED", {state = "UPDATED"}) end)
  end)
end)
