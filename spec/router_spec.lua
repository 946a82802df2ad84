-- tb.router: the agent's loop and tb.testing deliver events through the same route().
local testing = require "tb.testing"
local router = require "tb.router"

local script = require("spec.support.files").script

describe("tb.router", function()
  it("SIGHUP reloads a changed script through the one route", function()
    local path = script('local tb = require "tb"\ntb.on_rpc("v", function() return 1 end)\n')
    local s = testing.load(path)
    s:connect()
    local f = assert(io.open(path, "w"))
    f:write('local tb = require "tb"\ntb.on_rpc("v", function() return 2 end)\n')
    f:close()
    s:signal("HUP")
    assert.equal(2, s:generation())
    assert.equal(2, s:rpc("v"))
  end)

  it("the first SIGTERM drains and disconnects, as in the agent", function()
    local s = testing.load(script('local tb = require "tb"\ntb.every(10, function() tb.send_telemetry{x = 1} end)\n'))
    s:connect()
    s:advance(25)
    s:signal("TERM")
    s:advance(2000)
    assert.is_true(s.session.finished)
    assert.truthy(s:logged("SIGTERM: finishing in%-flight messages"))
  end)

  it("an internal error of an event is logged and reported, never raised into the loop", function()
    local logged = {}
    local ctx = {log = {error = function(fmt, ...) logged[#logged + 1] = string.format(fmt, ...) end},
      session = {on_event = function() error("boom") end}}
    local ok, err = router.route(ctx, "message", 1, 0, 0, "t", "p")
    assert.is_false(ok)
    assert.matches("boom", err)
    assert.matches("internal error while handling message: .*boom", logged[1])
  end)
end)
