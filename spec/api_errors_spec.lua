-- API misuse names the script's line: every public tb function that checks its arguments
-- raises "<script>:<line>: bad argument ...", whatever lies between the script and the check
-- (helpers, a tail call inside the library, pcall, `tbagent check`'s collecting wrapper).
-- Loaded through the loader of `run` (tb.testing uses it unchanged), at the top level and in
-- a handler.
local testing = require "tb.testing"
local agent = require "tb.agent"
local logmod = require "tb.log"
local core = require "tb.core"

local script = require("spec.support.files").script

local F = "function() end"
local TOP = "yields and cannot be called at a script's top level; call it from a handler (e.g. tb.after(0, fn))"
-- {call, message}: each call misuses one argument of one public function
local CASES = {
  {"tb.send_telemetry(42)", "bad argument #1 to 'send_telemetry' (table expected, got number)"},
  {"tb.send_telemetry({a = 1}, 1.5)", "bad argument #2 to 'send_telemetry' (integer milliseconds expected)"},
  {"tb.send_attributes('x')", "bad argument #1 to 'send_attributes' (table expected, got string)"},
  {"tb.request_attributes(7)", "bad argument #1 to 'request_attributes' (table expected, got number)"},
  {"tb.request_attributes{client = 'a'}", "bad argument #1 to 'request_attributes' (client must be a list of key names)"},
  {"tb.request_attributes{shared = {'a,b'}}",
    "bad argument #1 to 'request_attributes' (shared[1] must be a non-empty key name without commas)"},
  {"tb.request_attributes{timeout = -1}", "bad argument #1 to 'request_attributes' (timeout must be a positive number of ms)"},
  {"tb.request_attributes{}", "tb.request_attributes " .. TOP, top_only = true},
  {"tb.rpc_call(42)", "bad argument #1 to 'rpc_call' (string expected, got number)"},
  {"tb.rpc_call('m', nil, 0)", "bad argument #3 to 'rpc_call' (timeout must be a positive number of ms)"},
  {"tb.claim(1)", "bad argument #1 to 'claim' (table expected, got number)"},
  {"tb.claim{secret_key = 5}", "bad argument #1 to 'claim' (secret_key must be a string)"},
  {"tb.claim{duration_ms = 1.5}", "bad argument #1 to 'claim' (duration_ms must be an integer)"},
  {"tb.on_attributes('f')", "bad argument #1 to 'on_attributes' (function expected, got string)"},
  {"tb.on_rpc(42, " .. F .. ")", "bad argument #1 to 'on_rpc' (string expected, got number)"},
  {"tb.on_rpc('m')", "bad argument #2 to 'on_rpc' (function expected, got no value)"},
  {"tb.on_connect()", "bad argument #1 to 'on_connect' (function expected, got no value)"},
  {"tb.on_disconnect(true)", "bad argument #1 to 'on_disconnect' (function expected, got boolean)"},
  {"tb.every('1s', " .. F .. ")", "bad argument #1 to 'every' (number expected, got string)"},
  {"tb.every(0, " .. F .. ")", "bad argument #1 to 'every' (interval must be at least 1 ms)"},
  {"tb.every(10)", "bad argument #2 to 'every' (function expected, got no value)"},
  {"tb.after(-1, " .. F .. ")", "bad argument #1 to 'after' (delay must be >= 0)"},
  {"tb.after(nil, " .. F .. ")", "bad argument #1 to 'after' (number expected, got no value)"},
  {"tb.sleep('x')", "bad argument #1 to 'sleep' (number of ms expected)"},
  {"tb.sleep(10)", "tb.sleep " .. TOP, top_only = true},
  {"tb.exec(42)", "bad argument #1 to 'exec' (string or table expected, got number)"},
  {"tb.exec({})", "bad argument #1 to 'exec' (command table is empty)"},
  {"tb.exec({'ls', {}})", "bad argument #1 to 'exec' (argument 2 must be a string)"},
  {"tb.exec('true', 5)", "bad argument #2 to 'exec' (table expected, got number)"},
  {"tb.firmware(1)", "bad argument #1 to 'firmware' (table expected, got number)"},
  {"tb.firmware{install = 1}", "bad argument #1 to 'firmware' (install must be a function)"},
  {"tb.firmware{install = " .. F .. ", accept = 1}", "bad argument #1 to 'firmware' (accept must be a function)"},
  {"tb.firmware{install = " .. F .. ", current = 'x'}", "bad argument #1 to 'firmware' (current must be {title=, version=})"},
  {"tb.firmware{install = " .. F .. ", chunk_size = 0}", "bad argument #1 to 'firmware' (chunk_size must be an integer from 1 to 65536)"},
  {"tb.software{install = " .. F .. ", progress = 1}", "bad argument #1 to 'software' (progress must be a function)"},
  {"tb.json.array('x')", "bad argument #1 to 'array' (table expected, got string)"},
  {"tb.json.array(setmetatable({}, {}))", "bad argument #1 to 'array' (the table has a metatable of its own)"},
  {"tb.json.decode({})", "bad argument #1 to 'decode' (string expected, got table)"},
  {"tb.persist.get(42)", "bad argument #1 to 'get' (key must be a non-empty string of at most 256 bytes, got number)"},
  {"tb.persist.set('', 1)", "bad argument #1 to 'set' (key must be a non-empty string of at most 256 bytes, got \"\")"},
  {"tb.persist.delete(false)", "bad argument #1 to 'delete' (key must be a non-empty string of at most 256 bytes, got boolean)"},
  {"tb.persist.keys(5)", "bad argument #1 to 'keys' (string expected, got number)"},
}

describe("argument errors name the script's file and line", function()
  for _, case in ipairs(CASES) do
    local call, msg = case[1], case[2]

    it("at the top level: " .. call, function()
      local path = script("local tb = require 'tb'\n\n" .. call .. "\n")
      local ok, err = pcall(testing.load, path)
      assert.is_false(ok)
      assert.equal(path .. ":3: " .. msg, err)
    end)

    if not case.top_only then
      it("in a handler: " .. call, function()
        local path = script("local tb = require 'tb'\ntb.on_rpc('go', function()\n\n  " .. call .. "\nend)\n")
        local s = testing.load(path)
        -- a misuse fails the spec that ran the handler, at the script's line
        local ok, err = pcall(s.rpc, s, "go")
        assert.is_false(ok)
        assert.truthy(err:find("RPC go failed: " .. path .. ":4: " .. msg, 1, true), err)
        -- declared, it is the RPC's error answer (without the position), and logged with it
        s:expect_error(msg:gsub("%p", "%%%0"))
        assert.same({error = msg}, s:rpc("go"))
        assert.truthy(s:logged("RPC go failed: " .. path:gsub("%p", "%%%0") .. ":4: " .. msg:gsub("%p", "%%%0"), "error"))
      end)
    end
  end

  it("through a helper of the script, a pcall and a tail call in the script: the line of the call", function()
    local path = script(table.concat({
      "local tb = require 'tb'",
      "local function register(name, fn) tb.on_rpc(name, fn) end",   -- line 2
      "local ok, err = pcall(tb.on_rpc, 42, print)",                  -- line 3
      "tb.state.pcall_err = err",
      "tb.on_rpc('reg', function() register(7, print) end)",
      "tb.on_rpc('tail', function() return tb.every(0, print) end)",
    }, "\n"))
    local s = testing.load(path)
    s:expect_error("bad argument")
    assert.equal(path .. ":3: bad argument #1 to 'on_rpc' (string expected, got number)", s:state().pcall_err)
    s:rpc("reg")
    assert.truthy(s:logged(path:gsub("%p", "%%%0") .. ":2: bad argument #1 to 'on_rpc'"))
    -- a tail call leaves no frame of the script: no position rather than the library's
    s:rpc("tail")
    assert.truthy(s:logged("RPC tail failed: bad argument #1 to 'every' %(interval must be at least 1 ms%)"))
    assert.is_nil(s:logged("lua/tb/init%.lua:%d+: bad argument"))
  end)

  it("under tbagent check, each misuse is listed with its line", function()
    local path = script("local tb = require 'tb'\ntb.on_rpc(42, print)\ntb.every('x', print)\n")
    local ctx = agent.build(core, {script = path, host = "offline", port = 0, token = "check", session_limits = false},
      logmod.new(function() end, "error"))
    ctx.problems = {}
    assert.truthy(ctx.loader:load(path))
    assert.same({path .. ":2: bad argument #1 to 'on_rpc' (string expected, got number)",
      path .. ":3: bad argument #1 to 'every' (number expected, got string)"}, ctx.problems)
  end)

  it("names a timer by where the script made it", function()
    local path = script("local tb = require 'tb'\n\ntb.after(10, function() error('boom') end)\n")
    local s = testing.load(path)
    s:expect_error("boom")
    s:advance(20)
    assert.truthy(s:logged("^timer at " .. path:gsub("%p", "%%%0") .. ":3 failed: " .. path:gsub("%p", "%%%0") .. ":3: boom"))
  end)
end)
