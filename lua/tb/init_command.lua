-- tb.init_command: `tbagent init DIR` writes a working starting point for a device script:
-- DIR/device.lua, a passing DIR/spec/device_spec.lua, DIR/.busted (for `tbagent test`) and
-- DIR/.luacheckrc (with the luacheck standard of the tb API, from tb.lint). It never
-- overwrites: when any of them exists, nothing is written and the exit status is 2.
local lint = require "tb.lint"

local M = {}

M.DEVICE = [=[
-- device.lua: what this device does, as a tbagent script.
--   tbagent test                   runs spec/ offline (a fake ThingsBoard, a virtual clock)
--   tbagent check device.lua       loads it offline and finds misspelt tb names in every handler
--   tbagent run device.lua --host HOST --token TOKEN
-- `tb` is the agent's API (the same table as require "tb"); used as this global, luacheck
-- checks every tb.<name> against the standard in .luacheckrc.

-- tb.state survives hot reloads, tb.persist restarts too: count the starts of the agent
if not tb.state.started then
  tb.state.started = true
  tb.persist.set("boots", tb.persist.get("boots", 0) + 1)
end

-- replace with your sensor
local function read_temperature()
  return 20.0 + (tb.now() // 1000 % 60) / 10
end

tb.every(10000, function()
  tb.send_telemetry{temperature = read_temperature()}
end)

-- a setting from ThingsBoard, kept across restarts: the RPC setTarget or the shared
-- attribute "target"
local function set_target(value)
  if type(value) ~= "number" or value ~= value then return nil, "target must be a number" end
  tb.persist.set("target", value + 0.0)
  tb.send_attributes{target = value + 0.0}
  return true
end

tb.on_rpc("setTarget", function(value)
  local ok, err = set_target(value)
  if not ok then return nil, err end   -- the answer is {"error": err}
  return {target = tb.persist.get("target")}
end)

tb.on_attributes(function(changes)
  if changes.target ~= nil then
    local ok, err = set_target(changes.target)
    if not ok then tb.log.warn("shared attribute target ignored: %s", err) end
  end
end)

tb.on_connect(function()
  tb.send_attributes{boots = tb.persist.get("boots"), target = tb.persist.get("target", 21.0)}
end)
]=]

M.SPEC = [=[
-- spec/device_spec.lua: `tbagent test` in this folder runs it (Busted, on the agent's Lua 5.4
-- with the tb library). A handler error fails the spec, with the script's file:line.
local testing = require "tb.testing"

describe("device.lua", function()
  it("reports the temperature every 10 s", function()
    local s = testing.load("device.lua")
    s:connect()
    s:advance(30000)                    -- virtual time: returns at once
    assert.equal(3, #s.telemetry)       -- {ts=, values={temperature=...}} in order
    assert.is_number(s.telemetry[1].values.temperature)
  end)

  it("counts its starts in tb.persist", function()
    local s = testing.load("device.lua", {persist = {boots = 41}})
    assert.equal(42, s.persist.get("boots"))
    s:connect()
    assert.sent_attributes(s, {boots = 42, target = 21.0})
  end)

  it("takes a target over RPC and keeps it across a restart", function()
    local s = testing.load("device.lua")
    assert.same({target = 22.5}, s:rpc("setTarget", 22.5))
    assert.sent_attributes(s, {target = 22.5})
    local again = testing.load("device.lua", {persist = s:persisted()})   -- as after a restart
    again:connect()
    assert.sent_attributes(again, {target = 22.5})
  end)

  it("answers a target that is not a number with an error", function()
    local s = testing.load("device.lua")
    assert.rpc_error(s, "setTarget", "warm", "must be a number")
  end)

  it("follows the shared attribute target", function()
    local s = testing.load("device.lua")
    s:push_attributes({target = 19})
    assert.equal(19.0, s.persist.get("target"))
  end)
end)
]=]

M.BUSTED = [=[
-- Busted settings for this folder: `tbagent test` runs the specs under spec/ on the agent's
-- own Lua 5.4 with the tb library (no install, no LUA_PATH).
return {
  default = {
    ROOT = {"spec"},
    pattern = "_spec",
    recursive = true,
  },
}
]=]

-- luacheckrc() -> the text of .luacheckrc
function M.luacheckrc()
  return table.concat({
    "-- luacheck for a tbagent script folder (`luacheck .`). The standard \"tb\" lists the tb",
    "-- API, so luacheck flags a misspelt tb.<name> wherever the script uses the global tb (it",
    "-- cannot follow a local from require \"tb\"; `tbagent check` follows both).",
    lint.luacheck_std(),
    "std = \"lua54+tb\"",
    "max_line_length = 120",
    "files[\"spec/**/*_spec.lua\"] = {std = \"+busted\"}",
    "",
  }, "\n")
end


-- run(core, dir) -> exit status
function M.run(core, dir)
  dir = dir:gsub("/+$", "")
  if dir == "" then dir = "/" end
  local files = {
    {"device.lua", M.DEVICE},
    {"spec/device_spec.lua", M.SPEC},
    {".busted", M.BUSTED},
    {".luacheckrc", M.luacheckrc()},
  }
  for _, f in ipairs(files) do
    local path = dir .. "/" .. f[1]
    if core.file_size(path) then
      io.stderr:write("tbagent: ", path, " exists: init never overwrites (choose a new or empty folder)\n")
      return 2
    end
  end
  local ok, err = core.mkdirs(dir .. "/spec", 493)
  if not ok then
    io.stderr:write("tbagent: cannot create ", dir, "/spec: ", tostring(err), "\n")
    return 2
  end
  for _, f in ipairs(files) do
    local path = dir .. "/" .. f[1]
    local out, oerr = io.open(path, "wb")
    if not out then
      io.stderr:write("tbagent: cannot write ", path, ": ", tostring(oerr), "\n")
      return 2
    end
    out:write(f[2])
    out:close()
  end
  io.stdout:write(string.format("created %s/device.lua, %s/spec/device_spec.lua, %s/.busted, %s/.luacheckrc\n" ..
    "next: cd %s && tbagent test && tbagent check device.lua\n", dir, dir, dir, dir, dir))
  return 0
end

return M
