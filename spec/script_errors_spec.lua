-- Scripts that are wrong are caught before they ship: a misspelt tb name raises at its line
-- with the closest real name (tb.strict), and under tb.testing a handler error fails the spec
-- that ran it, naming the script's file:line, unless the spec said it expects it.
local testing = require "tb.testing"
local strict = require "tb.strict"

local script = require("spec.support.files").script

-- fails(fn) -> the message of the error fn raises (the spec failure tb.testing raises)
local function fails(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected the call to fail the spec")
  return tostring(err)
end

describe("tb.strict", function()
  it("measures edits, a swap of two neighbours being one", function()
    assert.equal(0, strict.distance("every", "every"))
    assert.equal(1, strict.distance("send_telemetery", "send_telemetry"))
    assert.equal(1, strict.distance("sned", "send"))
    assert.equal(3, strict.distance("abc", ""))
  end)

  it("suggests the closest name, ignoring case, or one that contains the name", function()
    local names = {"send_telemetry", "send_attributes", "every", "after", "on_rpc", "log"}
    assert.equal("send_telemetry", strict.closest("send_telemetery", names))
    assert.equal("on_rpc", strict.closest("onrpc", names))
    assert.equal("log", strict.closest("Log", names))
    assert.equal("send_telemetry", strict.closest("telemetry", names))
    assert.is_nil(strict.closest("frobnicate", names))
    assert.equal("unknown tb.frobnicate: tb has no such field", strict.unknown("tb", "frobnicate", names))
  end)
end)

describe("a misspelt tb name", function()
  it("raises at the line that reads it, under tb.testing, for tb, tb.log, tb.json and timers", function()
    local cases = {
      {"tb.send_telemetery{x = 1}", "unknown tb.send_telemetery; did you mean tb.send_telemetry%?"},
      {"tb.log.infoo('x')", "unknown tb.log.infoo; did you mean tb.log.info%?"},
      {"tb.json.encod({})", "unknown tb.json.encod; did you mean tb.json.encode%?"},
      {"local t = tb.every(10, print)\nt:cancle()", "unknown timer:cancle; did you mean timer:cancel%?"},
      {"print(tb.nothing_like_this)", "unknown tb.nothing_like_this: tb has no such field"},
    }
    for _, c in ipairs(cases) do
      local path = script("local tb = require 'tb'\n" .. c[1] .. "\n")
      local ok, err = pcall(testing.load, path)
      assert.is_false(ok, c[1])
      local line = select(2, c[1]:gsub("\n", "")) + 2
      assert.matches(path:gsub("%p", "%%%0") .. ":" .. line .. ": " .. c[2], err)
    end
  end)

  it("does not get in the way of names the script gives tb itself, or of tb.state", function()
    local s = testing.load(script([[
      tb.helper = function() return 1 end
      tb.state.anything = tb.state.nothing_yet or tb.helper()
    ]]))
    assert.equal(1, s:state().anything)
  end)

  it("is the same table as require 'tb' when used as the global tb", function()
    local s = testing.load(script([[
      local api = require "tb"
      tb.state.same = rawequal(api, tb)
    ]]))
    assert.is_true(s:state().same)
  end)

  it("raises in a handler too: the spec that ran it fails with the script's file:line", function()
    local path = script("local tb = require 'tb'\ntb.every(1000, function()\n  tb.send_telemetery{x = 1}\nend)\n")
    local s = testing.load(path)
    local err = fails(function() s:advance(1000) end)
    assert.matches("tb.every handler failed: " .. path:gsub("%p", "%%%0") .. ":3: unknown tb.send_telemetery; did you mean tb.send_telemetry%?", err)
  end)
end)

describe("a handler error under tb.testing", function()
  local BROKEN = [[
local tb = require "tb"
tb.every(1000, function() local t = nil; return t.x end)                    -- line 2
tb.on_rpc("typo", function() tb.send_atributes{} end)                        -- line 3
tb.on_rpc("answer", function() error("not now") end)                         -- line 4
tb.on_rpc("refuse", function(p) if not p then return nil, "need p" end end)  -- line 5
tb.on_rpc("assert", function(p) assert(p, "p missing") return p end)         -- line 6
tb.on_attributes(function(c) return c.x + 1 end)                             -- line 7
tb.on_connect(function() error("no connect") end)                            -- line 8
tb.on_disconnect(function() error("no disconnect") end)                      -- line 9
]]

  it("fails the spec for every kind of handler, naming the script's line", function()
    local path = script(BROKEN)
    local s = testing.load(path)
    local quoted = path:gsub("%p", "%%%0")
    assert.matches("on_connect handler failed: " .. quoted .. ":8: no connect", fails(function() s:connect() end))
    assert.matches("tb.every handler failed: " .. quoted .. ":2: attempt to index a nil value",
      fails(function() s:advance(1000) end))
    assert.matches("RPC typo failed: " .. quoted .. ":3: unknown tb.send_atributes; did you mean tb.send_attributes%?",
      fails(function() s:rpc("typo") end))
    assert.matches("attribute handler failed: " .. quoted .. ":7: attempt to",
      fails(function() s:push_attributes({x = "text"}) end))
    assert.matches("on_disconnect handler failed: " .. quoted .. ":9: no disconnect", fails(function() s:disconnect() end))
    assert.equal(5, #s.errors)
    assert.is_false(s.errors[1].expected)
  end)

  it("lets RPC handlers answer with an error: error(), assert() and nil, err are answers", function()
    local s = testing.load(script(BROKEN))
    s:expect_error("no connect")
    assert.same({error = "not now"}, s:rpc("answer"))
    assert.same({error = "need p"}, s:rpc("refuse"))
    assert.same({error = "p missing"}, s:rpc("assert"))
    assert.equal(1, #s.errors)   -- the connect handler's, expected
  end)

  it("passes when the spec expects it; s.errors keeps every one", function()
    local s = testing.load(script(BROKEN))
    s:expect_error("no connect"):expect_error("index a nil value")
    s:connect()
    s:advance(3000)
    assert.equal(4, #s.errors)
    for _, e in ipairs(s.errors) do assert.is_true(e.expected) end
    assert.equal("tb.every handler", s.errors[2].handler)
    -- an error not expected still fails
    assert.matches("no disconnect", fails(function() s:disconnect() end))
    s:expect_error()   -- anything
    s:connect()
    s:disconnect()
  end)

  it("fails the spec for a firmware policy that raises", function()
    local s = testing.load(script([[
      tb.firmware{
        current = {title = "dev", version = "1"},
        accept = function(info) tb.log.infoo("offered %s", info.version) return true end,
        install = function() return true end,
      }
    ]]))
    assert.matches("firmware accept%(%) failed: .*:3: unknown tb.log.infoo; did you mean tb.log.info%?",
      fails(function() s:offer_firmware({title = "dev", version = "2"}, "image") end))
  end)

  it("points the failure at the spec's own line", function()
    local s = testing.load(script("tb.every(10, function() error('boom') end)"))
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() s:advance(10) end)
    assert.is_false(ok)
    assert.matches("script_errors_spec.lua:" .. line .. ": tb.testing: tb.every handler failed", err)
    assert.matches("s:expect_error%(pattern%)", err)
  end)
end)

describe("tb.testing assertions say what happened", function()
  local function message(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok)
    return tostring(err)
  end

  it("sent_telemetry and sent_attributes list what was sent", function()
    local s = testing.load(script([[
      tb.every(1000, function() tb.send_telemetry{t = tb.now() // 1000} end)
      tb.on_connect(function() tb.send_attributes{mode = "auto"} end)
    ]]))
    s:connect()
    s:advance(2000)
    local m = message(function() assert.sent_telemetry(s, {t = 99}) end)
    assert.matches("Expected telemetry containing:\n  {t = 99}\nsent %(2%):\n  ts %d+ {t = %d+}\n  ts %d+ {t = %d+}", m)
    m = message(function() assert.no.sent_telemetry(s, {t = 1700000001}) end)
    assert.matches("it was sent: ts %d+ {t = 1700000001}", m)
    m = message(function() assert.sent_attributes(s, {mode = "manual"}) end)
    assert.matches('Expected client attributes containing:\n  {mode = "manual"}\nsent %(1%):\n  {mode = "auto"}', m)
  end)

  it("rpc_error shows what the RPC answered", function()
    local s = testing.load(script([[
      tb.on_rpc("ok", function(p) return {got = p} end)
      tb.on_rpc("quiet", function() end)
    ]]))
    local m = message(function() assert.rpc_error(s, "ok", 5, "bad") end)
    assert.matches('Expected RPC ok%(5%) to answer an error matching "bad"\nit answered {got = 5}', m)
    m = message(function() assert.rpc_error(s, "quiet", nil, "bad") end)
    assert.matches("it sent no answer", m)
    assert.same({got = 1}, s:rpc("ok", 1))   -- s:rpc returns the response alone
    assert.equal(select("#", s:rpc("ok", 1)), 1)
  end)

  it("fw_state shows the states and the error, or why there was no state", function()
    local s = testing.load(script([[
      tb.firmware{
        current = {title = "dev", version = "1"},
        accept = function(info) if info.version == "old" then return false, "too old" end return true end,
        install = function() return nil, "flash busy" end,
      }
    ]]))
    local m = message(function() assert.fw_state("UPDATED", s:offer_firmware({title = "dev", version = "2"}, "img")) end)
    assert.matches("Expected the update to end in UPDATED, got FAILED\n" ..
      "  states: DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING, FAILED\n  error: install failed: flash busy", m)
    m = message(function() assert.fw_state("UPDATED", s:offer_firmware({title = "dev", version = "old"}, "img")) end)
    assert.matches("got no state at all: declined by accept: too old", m)
    m = message(function() assert.fw_state("UPDATED", s:offer_firmware({title = "dev", version = "1"}, "img")) end)
    assert.matches("got no state at all: no offer: dev 1 is the current firmware", m)
    local none = testing.load(script("return"))
    local r = none:offer_firmware({title = "dev", version = "3"}, "img")
    assert.equal("no offer taken: the script has no tb.firmware{} policy", r.reason)
  end)
end)
