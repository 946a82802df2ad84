-- A thermostat: reports temperature and humidity every 5 s, takes a new setpoint over RPC
-- or from the shared attribute "target", and reports the setpoint back as a client
-- attribute. Copy it and adapt read_sensor() to your hardware.
local tb = require "tb"

tb.state.setpoint = tb.state.setpoint or 21.0
local interval = 5000

-- A simulated room that drifts toward the setpoint; replace with your sensor.
local function read_sensor()
  local s = tb.state
  s.temperature = s.temperature or 18.0
  s.temperature = s.temperature + (s.setpoint - s.temperature) * 0.1
  return {temperature = s.temperature, humidity = 40.0 + (s.temperature % 1) * 10}
end

local function set_setpoint(value, source)
  if type(value) ~= "number" or value ~= value or value < 5 or value > 35 then
    return nil, "setpoint must be a number from 5 to 35"
  end
  tb.state.setpoint = value + 0.0
  tb.log.info("setpoint %.1f (from %s)", tb.state.setpoint, source)
  tb.send_attributes{setpoint = tb.state.setpoint}
  return true
end

tb.every(interval, function()
  tb.send_telemetry(read_sensor())
end)

tb.on_rpc("setSpValue", function(params)
  local ok, err = set_setpoint(params, "RPC")
  if not ok then error(err, 0) end
  return {setpoint = tb.state.setpoint}
end)

tb.on_rpc("getSpValue", function()
  return tb.state.setpoint
end)

tb.on_attributes(function(changes)
  if changes.target ~= nil then set_setpoint(changes.target, "shared attribute") end
end)

tb.on_connect(function()
  tb.send_attributes{setpoint = tb.state.setpoint, firmware = "thermostat-1.0"}
end)
