-- Every example script users copy has a spec here; they pass against tb.testing.
local testing = require "tb.testing"

describe("examples/rpc_echo.lua", function()
  it("answers any method with the request itself", function()
    local s = testing.load("examples/rpc_echo.lua")
    assert.same({method = "whatever", params = {a = 1, b = {true, "x"}}}, s:rpc("whatever", {a = 1, b = {true, "x"}}))
    local res = s:rpc("setSpValue", 14.5)
    assert.same({method = "setSpValue", params = 14.5}, res)
    assert.equal("float", math.type(res.params))
    assert.same({method = "getTime"}, s:rpc("getTime"))
  end)
end)

describe("examples/firmware_command.lua", function()
  local function installer(body)
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write("#!/bin/sh\n" .. body .. "\n")
    f:close()
    os.execute("chmod +x " .. path)
    return path
  end

  local function with_env(vars, fn)
    local real = os.getenv
    os.getenv = function(k) if vars[k] ~= nil then return vars[k] end return real(k) end   -- luacheck: ignore 122
    local ok, err = pcall(fn)
    os.getenv = real   -- luacheck: ignore 122
    assert(ok, err)
  end

  it("installs when the installer exits 0, passing the image path and version", function()
    local marker = os.tmpname()
    with_env({FIRMWARE_INSTALLER = installer('cmp "$1" /dev/null >/dev/null 2>&1; wc -c < "$1" > ' .. marker .. '; echo "$2" >> ' .. marker)}, function()
      local s = testing.load("examples/firmware_command.lua")
      local r = s:offer_firmware({title = "gateway", version = "1.2.0"}, string.rep("x", 70000))
      assert.equal("UPDATED", r.state)
    end)
    local f = io.open(marker)
    assert.equal("70000\n1.2.0\n", f:read("a"))
    f:close()
  end)

  it("fails with the installer's last line when it exits non-zero", function()
    with_env({FIRMWARE_INSTALLER = installer('echo "checking image"; echo "partition B is busy" >&2; exit 3')}, function()
      local s = testing.load("examples/firmware_command.lua")
      local r = s:offer_firmware({title = "gateway", version = "1.2.0"}, "image")
      assert.equal("FAILED", r.state)
      assert.equal("install failed: exit 3: partition B is busy", r.error)
    end)
  end)

  it("refuses firmware of another line, and says so to ThingsBoard", function()
    local s = testing.load("examples/firmware_command.lua")
    local r = s:offer_firmware({title = "other", version = "9"}, "image")
    assert.equal("FAILED", r.state)
    assert.equal("declined: this device runs the gateway line, not other", r.error)
  end)
end)

describe("examples/gateway_proc.lua", function()
  it("reports load, memory and uptime from /proc every 10 s", function()
    local s = testing.load("examples/gateway_proc.lua")
    s:connect()
    s:advance(20000)
    assert.equal(2, #s.telemetry)
    local v = s.telemetry[1].values
    assert.is_number(v.load1)
    assert.equal("integer", math.type(v.mem_total_kb))
    assert.is_true(v.mem_used_pct > 0 and v.mem_used_pct < 100)
    assert.equal("integer", math.type(v.uptime_s))
    assert.is_string(s.attributes[1].hostname)
    assert.is_number(s:rpc("sample").load5)
  end)
end)
