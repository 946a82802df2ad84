-- Hot reload through tb.testing: the same loader and generation swap as the agent.
local testing = require "tb.testing"

local script = require("spec.support.files").script

-- the first version of a script whose RPC "ver" answers 1
local VER1 = [[
      local tb = require "tb"
      tb.on_rpc("ver", function() return 1 end)
    ]]

describe("hot reload", function()
  it("swaps handlers, keeps tb.state, retires old timers", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.state.loads = (tb.state.loads or 0) + 1
      tb.on_rpc("ver", function() return 1 end)
      tb.every(100, function() tb.state.old_ticks = (tb.state.old_ticks or 0) + 1 end)
    ]]))
    s:connect()
    s:advance(250)
    assert.equal(2, s:state().old_ticks)
    assert.is_true(s:reload([[
      local tb = require "tb"
      tb.state.loads = tb.state.loads + 1
      tb.on_rpc("ver", function() return 2 end)
      tb.every(100, function() tb.state.new_ticks = (tb.state.new_ticks or 0) + 1 end)
    ]]))
    assert.equal(2, s:generation())
    s:advance(300)
    assert.equal(2, s:state().old_ticks)
    assert.equal(3, s:state().new_ticks)
    assert.equal(2, s:state().loads)
    assert.equal(2, s:rpc("ver"))
  end)

  it("swaps attribute handlers and the firmware policy", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_attributes(function(c) tb.state.seen_by = "v1"; tb.state.v1 = (tb.state.v1 or 0) + 1 end)
      tb.firmware{current = {title = "dev", version = "1.0"},
        accept = function() return false end,
        install = function() tb.state.installed_by = "v1" return true end}
    ]]))
    s:connect()
    local r = s:offer_firmware({title = "dev", version = "2.0"}, "image one")
    assert.is_nil(s:state().installed_by)   -- v1's accept refuses every package
    assert.same({}, r.states)
    assert.is_true(s:reload([[
      local tb = require "tb"
      tb.on_attributes(function(c) tb.state.seen_by = "v2" end)
      tb.firmware{current = {title = "dev", version = "1.0"},
        install = function(path)
          local f = assert(io.open(path, "rb")); tb.state.image = f:read("a"); f:close()
          tb.state.installed_by = "v2"
          return true
        end}
    ]]))
    local v1_calls = s:state().v1
    s:push_attributes{target = 21}
    assert.equal("v2", s:state().seen_by)
    assert.equal(v1_calls, s:state().v1)
    r = s:offer_firmware({title = "dev", version = "3.0"}, "image three")
    assert.equal("v2", s:state().installed_by)
    assert.equal("image three", s:state().image)
    assert.equal("UPDATED", r.states[#r.states])
  end)

  it("hands the current shared attributes to a reload that brings the first on_attributes or tb.firmware", function()
    local s = testing.load(script(VER1))
    local img = string.rep("z", 1500)
    s.packages.fw = {bytes = img}
    s:set_attributes{shared = {target = 21, fw_title = "dev", fw_version = "2.0", fw_size = #img,
      fw_checksum_algorithm = "SHA256", fw_checksum = require("tb.core").hash_hex("SHA256", img)}}
    s:connect()
    assert.is_true(s:reload([[
      local tb = require "tb"
      tb.on_attributes(function(c) tb.state.target = c.target end)
      tb.firmware{current = {title = "dev", version = "1.0"}, install = function() tb.state.installed = true return true end}
    ]]))
    s:advance(1000)
    assert.equal(21, s:state().target)
    assert.is_true(s:state().installed)
  end)

  it("rejects a version that fails to load and keeps the old one, sending nothing of it", function()
    local s = testing.load(script(VER1))
    s:connect()
    local before = #s.published
    local ok, err = s:reload([[
      local tb = require "tb"
      tb.send_telemetry{from_rejected = true}
      tb.on_rpc("ver", function() return 2 end)
      error("half-written")
    ]])
    assert.is_nil(ok)
    assert.matches("half%-written", err)
    assert.truthy(s:logged("reload rejected: .*:4: half%-written", "error"))
    assert.equal(before, #s.published)
    assert.equal(1, s:rpc("ver"))
  end)

  it("never runs the timers a rejected version made before it failed", function()
    local s = testing.load(script(VER1))
    s:connect()
    local before = #s:sent("v1/devices/me/telemetry")
    assert.is_nil(s:reload([[
      local tb = require "tb"
      tb.every(100, function() tb.send_telemetry{from_rejected = "every"} end)
      tb.after(50, function() tb.send_telemetry{from_rejected = "after"} end)
      error("half-written")
    ]]))
    s:advance(1000)
    assert.equal(before, #s:sent("v1/devices/me/telemetry"))
    assert.equal(1, s:rpc("ver"))
  end)

  it("loads a changed file from the loop, not a handler: a yielding call at top level is rejected", function()
    local path = script(VER1)
    local s = testing.load(path)
    s:connect()
    local reload = require "tb.reload"
    local r = reload.new(s.ctx)
    local f = assert(io.open(path, "w"))
    f:write([[
      local tb = require "tb"
      tb.sleep(10)
      tb.on_rpc("ver", function() return 2 end)
    ]])
    f:close()
    r:on_watch("x.lua")
    r:on_watch("x.lua")   -- a burst of events is one reload
    s:advance(100)
    assert.equal(1, s:generation())
    assert.truthy(s:logged("reload rejected: .*:2: .*tb.sleep", "error"))
    assert.equal(1, r.rejected)
    assert.equal(1, s:rpc("ver"))
    f = assert(io.open(path, "w"))
    f:write([[
      local tb = require "tb"
      tb.on_rpc("ver", function() return 3 end)
    ]])
    f:close()
    r:on_watch("x.lua")
    s:advance(100)
    assert.equal(2, s:generation())   -- the rejected version used up no number
    assert.equal(3, s:rpc("ver"))
  end)

  it("numbers only versions that went live, and says so when a save restores the running text", function()
    local v1 = 'local tb = require "tb"\ntb.on_rpc("ver", function() return 1 end)\n'
    local path = script(v1)
    local s = testing.load(path)
    assert.is_nil(s:reload('local tb = require "tb"\nerror("half-written")\n'))
    assert.is_nil(s:reload('local tb = require "tb"\ntb.on_rpc("ver", function()\n'))
    assert.equal(1, s:generation())
    assert.is_true(s:reload(v1))   -- the text that runs, saved again
    assert.truthy(s:logged("is back to the text of generation 1, which is running: nothing changed", "info"))
    assert.equal(1, s:generation())
    assert.is_true(s:reload(v1))   -- an unchanged save is skipped quietly
    assert.truthy(s:logged("reload skipped: no loaded file changed", "debug"))
    assert.is_true(s:reload('local tb = require "tb"\ntb.on_rpc("ver", function() return 2 end)\n'))
    assert.equal(2, s:generation())
    assert.truthy(s:logged("reloaded .*: generation 2 live %(file change, %d+ ms after the change%)", "info"))
  end)

  it("says SIGHUP on a reload by signal, not a file change", function()
    local path = script('local tb = require "tb"\n')
    local s = testing.load(path)
    s:signal("HUP")
    assert.truthy(s:logged("reloaded .*: generation 2 live %(SIGHUP; the same text as generation 1%)", "info"))
    local f = assert(io.open(path, "w"))
    f:write('local tb = require "tb"\ntb.on_rpc("v", function() return 3 end)\n')
    f:close()
    s:signal("HUP")
    assert.truthy(s:logged("reloaded .*: generation 3 live %(SIGHUP%)$", "info"))
    assert.is_nil(s:logged("after the change"))
  end)

  it("lets a running handler finish on the old code", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.on_rpc("slow", function() tb.sleep(1000) return "old" end)
    ]]))
    s:rpc("slow")
    local id = s.last_rpc_id
    s:reload([[
      local tb = require "tb"
      tb.on_rpc("slow", function() return "new" end)
    ]])
    assert.equal("new", s:rpc("slow"))
    s:advance(1000)
    assert.equal("old", s.rpc_responses[id])
  end)

  it("warns when a replaced version still runs a handler a minute later", function()
    local s = testing.load(script([[
      local tb = require "tb"
      tb.after(0, function() while true do tb.sleep(1000) end end)
      tb.on_rpc("slow", function() tb.sleep(5000) return "old" end)
    ]]))
    s:rpc("slow")
    assert.is_true(s:reload([[
      local tb = require "tb"
    ]]))
    s:advance(59000)
    assert.is_nil(s:logged("still run its code"))
    s:advance(2000)
    -- the RPC has finished; the endless loop has not
    assert.truthy(s:logged("generation 1 was replaced 60 s ago and 1 of its handlers still run its code %(tb%.after handler%)", "warn"))
  end)

  it("reloads modules the script requires from its own directory", function()
    local dir = os.tmpname() .. ".d"
    os.execute("mkdir -p " .. dir)
    local function write(name, text)
      local f = assert(io.open(dir .. "/" .. name, "w"))
      f:write(text)
      f:close()
    end
    write("helper.lua", "return {answer = function() return 1 end}")
    write("main.lua", [[
      local tb = require "tb"
      local helper = require "helper"
      tb.on_rpc("answer", function() return helper.answer() end)
    ]])
    local s = testing.load(dir .. "/main.lua")
    assert.equal(1, s:rpc("answer"))
    write("helper.lua", "return {answer = function() return 2 end}")
    assert.is_true(s:reload())
    assert.equal(2, s:rpc("answer"))
  end)
end)
