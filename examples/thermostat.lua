-- A thermostat: reports temperature and humidity every 5 s, takes a new setpoint over RPC
-- or from the shared attribute "target", keeps it across restarts (tb.persist), and reports
-- it back as a client attribute. Copy it and adapt read_sensor() to your hardware.
local tb = require "tb"

local interval = 5000

-- the setpoint survives restarts; 21.0 until one is set
local function setpoint()
  return tb.persist.get("setpoint", 21.0)
end

-- A simulated room that drifts toward the setpoint; replace with your sensor.
local function read_sensor()
  local s = tb.state
  s.temperature = s.temperature or 18.0
  s.temperature = s.temperature + (setpoint() - s.temperature) * 0.1
  local function round1(x) return math.floor(x * 10 + 0.5) / 10 end
  return {temperature = round1(s.temperature), humidity = round1(40.0 + (s.temperature % 1) * 10)}
end

local function set_setpoint(value, source)
  if type(value) ~= "number" or value ~= value or value < 5 or value > 35 then
    return nil, "setpoint must be a number from 5 to 35"
  end
  local ok, err = tb.persist.set("setpoint", value + 0.0)
  if not ok then return nil, err end
  tb.log.info("setpoint %.1f (from %s)", setpoint(), source)
  tb.send_attributes{setpoint = setpoint()}
  return true
end

tb.every(interval, function()
  tb.send_telemetry(read_sensor())
end)

tb.on_rpc("setSpValue", function(params)
  local ok, err = set_setpoint(params, "RPC")
  if not ok then error(err, 0) end
  return {setpoint = setpoint()}
end)

tb.on_rpc("getSpValue", function()
  return setpoint()
end)

tb.on_attributes(function(changes)
  if changes.target ~= nil then
    local ok, err = set_setpoint(changes.target, "shared attribute")
    if not ok then tb.log.warn("shared attribute target ignored: %s", err) end
  end
end)

tb.on_connect(function()
  tb.send_attributes{setpoint = setpoint(), firmware = "thermostat-1.0"}
end)

-- Firmware updates: tbagent downloads and verifies the image; this decides what to do with
-- it. A real thermostat would flash it; this one checks it and keeps a copy.
tb.firmware{
  current = {title = "thermostat", version = "1.0.0"},
  accept = function(info)
    return info.title == "thermostat"
  end,
  install = function(path, info)
    local f, err = io.open(path, "rb")
    if not f then return nil, err end
    local size = f:seek("end")
    f:close()
    tb.log.info("installing %s %s (%d bytes)", info.title, info.version, size)
    return true
  end,
}
