-- tb.lint and `tbagent check`: every tb.<name> that does not exist, found in the source of the
-- script and of the modules it requires, handlers included, without running them.
local lint = require "tb.lint"
local check = require "tb.check"
local core = require "tb.core"
local logmod = require "tb.log"

local function folder()
  local dir = os.tmpname()
  os.remove(dir)
  assert(core.mkdirs(dir .. "/lib", 448))
  return dir
end

local files = require "spec.support.files"

local function write(path, text)
  files.write(path, text)
  return path
end

-- run_check(path) -> status, stdout, stderr of tb.check.run
local function run_check(path)
  return require("spec.support.capture").output(check.run, core, path, logmod.new(function() end, "error"))
end

describe("tb.lint", function()
  it("reads Lua tokens, skipping strings, long strings and comments as wholes", function()
    local toks = lint.tokens("local a = 'tb.x' .. \"q\\\"\" -- tb.y\n--[==[ tb.z\n]==] b = [[\ntb.w]] c.d = 1.5e3 ~= 0x1F")
    local kinds = {}
    for _, t in ipairs(toks) do kinds[#kinds + 1] = t.kind .. ":" .. t.value .. "@" .. t.line end
    assert.same({"keyword:local@1", "name:a@1", "op:=@1", "string:tb.x@1", "op:..@1", 'string:q"@1',
      "name:b@3", "op:=@3", "string:tb.w@3", "name:c@4", "op:.@4", "name:d@4", "op:=@4", "number:1.5e3@4",
      "op:~=@4", "number:0x1F@4"}, kinds)
  end)

  it("knows the API from a real tb table", function()
    local shape = lint.shape()
    assert.is_true(shape.send_telemetry)
    assert.is_true(shape.state)
    assert.same({"debug", "enabled", "error", "info", "set_level", "warn"}, shape.log)
    assert.same({"delete", "get", "keys", "pairs", "set"}, shape.persist)
  end)

  it("finds misspelt names in every kind of handler, by the global tb and by require's locals", function()
    local problems, requires = lint.scan("dev.lua", [[
local tb = require "tb"
local api <const> = require("tb")
local log = tb.log
tb.every(1000, function() tb.send_telemetery{x = 1} end)
tb.on_rpc("set", function(v) api.persist.sett("v", v) end)
tb.on_attributes(function(c) log.infoo("%s", c) end)
tb.after(10, function() tb.json.decoed("1") end)
local s = "tb.not_a_use" -- tb.neither
function tb.helper() end
tb.mine = 1
print(tb.helper, tb.mine, tb.state.anything, tb.log.warn)
local x = require "lib.util"
local tb_other = {}; tb_other.whatever = 1
]])
    assert.same({
      "dev.lua:4: unknown tb.send_telemetery; did you mean tb.send_telemetry?",
      "dev.lua:5: unknown tb.persist.sett; did you mean tb.persist.set?",
      "dev.lua:6: unknown tb.log.infoo; did you mean tb.log.info?",
      "dev.lua:7: unknown tb.json.decoed; did you mean tb.json.decode?",
    }, problems)
    assert.same({"lib.util"}, requires)
  end)

  it("follows a name shadowed by another local no further", function()
    assert.same({}, (lint.scan("x.lua", "local tb = {}\ntb.anything = 1\nprint(tb.other)\n")))
  end)

  it("writes a luacheck standard with every field of the API", function()
    local env = {stds = {}}
    assert(load(lint.luacheck_std(), "std", "t", env))()
    local fields = env.stds.tb.read_globals.tb.fields
    assert.same({}, fields.send_telemetry)
    assert.same({other_fields = true, read_only = false}, fields.state)
    assert.same({}, fields.log.fields.info)
    assert.same({}, fields.persist.fields.get)
    for name in pairs(lint.shape()) do assert.is_table(fields[name], name) end
  end)
end)

describe("tbagent check", function()
  it("fails on a typo in a handler that never ran, in the script and in a module it requires", function()
    local dir = folder()
    local path = write(dir .. "/device.lua", [[
local tb = require "tb"
local util = require "lib.util"
tb.on_rpc("set", function(v) tb.send_atributes{v = v} end)
tb.every(60000, function() util.report() end)
tb.on_attributes(function(c) tb.log.warnn("%s", c) end)
]])
    write(dir .. "/lib/util.lua", [[
local tb = require "tb"
return {report = function() tb.send_telemetery{up = true} end}
]])
    local code, out, err = run_check(path)
    assert.equal(1, code)
    assert.equal("", out)
    assert.equal(table.concat({
      path .. ":3: unknown tb.send_atributes; did you mean tb.send_attributes?",
      path .. ":5: unknown tb.log.warnn; did you mean tb.log.warn?",
      dir .. "/lib/util.lua:2: unknown tb.send_telemetery; did you mean tb.send_telemetry?",
      "tbagent: " .. path .. ": 3 problems found (listed above)",
    }, "\n") .. "\n", err)
  end)

  it("reports a typo at the top level once (it also stops the load)", function()
    local dir = folder()
    local path = write(dir .. "/top.lua", "tb.send_telemetery{x = 1}\n")
    local code, _, err = run_check(path)
    assert.equal(1, code)
    assert.equal("tbagent: " .. path .. ": " .. path .. ":1: unknown tb.send_telemetery; did you mean tb.send_telemetry?\n", err)
  end)

  it("passes a correct script and keeps tb.persist in memory", function()
    local dir = folder()
    local path = write(dir .. "/ok.lua", [[
tb.persist.set("boots", tb.persist.get("boots", 0) + 1)
tb.every(1000, function() tb.send_telemetry{boots = tb.persist.get("boots")} end)
]])
    local code, out = run_check(path)
    assert.equal(0, code)
    assert.equal(path .. ": ok: 0 RPC methods, 0 attribute handlers, 1 timer\n", out)
    assert.is_false(files.exists(dir .. "/.tbagent/outbox.db"))
  end)
end)
