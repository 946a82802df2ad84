-- The contract, twice: every case runs against tb.testing (the fake) and against the real
-- binary over MQTT to the emulator (scripts/tbemu), through one driver interface
-- (spec/support/drivers.lua). A case that passes on one side and fails on the other is drift
-- between the fake and the agent. The real half needs build/tbagent, node, curl and
-- scripts/node_modules: when one is missing its cases fail, they are never skipped.
local drivers = require "spec.support.drivers"

-- deep equality that keeps Lua number subtypes apart (42 ~= 42.0 here)
local same = require("spec.support.equal").typed

local function show(v)
  if type(v) == "number" then return math.type(v) .. " " .. tostring(v) end
  if type(v) ~= "table" then return type(v) .. " " .. tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = tostring(k) .. "=" .. show(v[k]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function assert_same(expected, actual, what)
  if not same(expected, actual) then
    error(string.format("%s:\n  expected %s\n  got      %s", what or "value", show(expected), show(actual)), 2)
  end
end

for _, kind in ipairs{"fake", "real"} do
  describe("contract (" .. kind .. ")", function()
    local server, d

    lazy_setup(function() server = drivers.new(kind) end)
    lazy_teardown(function()
      if server then server:close() end
      drivers.kill_all()
    end)
    after_each(function()
      if d then d:stop() d = nil end
    end)

    local function start(script, opts)
      d = server:start(script, opts)
      return d
    end

    -- rpc(method, params) -> the decoded response, failing the case when none came
    local function rpc(method, params, opts)
      local r, raw, status = d:rpc(method, params, opts)
      assert(status == 200, string.format("%s: no response (status %s)", method, tostring(status)))
      return r, raw
    end

    describe("server-side RPC", function()
      local script = [[
        local tb = require "tb"
        tb.on_rpc("table", function() return {a = 1, b = "x", c = {1, 2.5, true}} end)
        tb.on_rpc("string", function() return "pong" end)
        tb.on_rpc("integer", function() return 42 end)
        tb.on_rpc("float", function() return 42.0 end)
        tb.on_rpc("true", function() return true end)
        tb.on_rpc("false", function() return false end)
        tb.on_rpc("big", function() return math.maxinteger end)
        tb.on_rpc("echo", function(params) return {params = params, ptype = type(params)} end)
        tb.on_rpc("args", function(params, id, method)
          return {id_type = math.type(id), method = method}
        end)
        tb.on_rpc("reason", function() return nil, "not now" end)
        tb.on_rpc("raise", function() error("broken handler") end)
        tb.on_rpc("raise_table", function() error({code = 7}) end)
        tb.on_rpc("slow", function() tb.sleep(300) return "late" end)
        tb.on_rpc("oneway", function()
          tb.state.oneway = (tb.state.oneway or 0) + 1
          tb.send_attributes{oneway_ran = tb.state.oneway}
        end)
        tb.on_rpc("explicit_nil", function() tb.send_attributes{explicit_nil_ran = true} return nil end)
        tb.on_rpc("inc", function() tb.state.n = (tb.state.n or 0) + 1 return tb.state.n end)
      ]]

      it("encodes a table result as a JSON object", function()
        start(script)
        assert_same({a = 1, b = "x", c = {1, 2.5, true}}, (rpc("table")), "table result")
      end)

      it("sends a string result as a quoted JSON string", function()
        start(script)
        local r, raw = rpc("string")
        assert_same("pong", r, "string result")
        assert.equal('"pong"', raw)
      end)

      it("keeps integers, 64-bit integers, floats and booleans typed", function()
        start(script)
        local r, raw = rpc("integer")
        assert_same(42, r, "integer result")
        assert.equal("42", raw)
        r, raw = rpc("float")
        assert_same(42.0, r, "float result (must stay a double)")
        assert.equal("42.0", raw)
        assert_same(true, (rpc("true")), "true result")
        assert_same(false, (rpc("false")), "false result")
        assert_same(math.maxinteger, (rpc("big")), "64-bit integer result")
      end)

      it("passes params with their types, and nil when there are none", function()
        start(script)
        local p = {i = 7, f = 7.0, s = "x", b = false, list = {1, 2}, obj = {k = "v"},
          big = math.maxinteger, neg = -1.5e-300, text = "h\195\169 \"q\" \\ \n\t/"}
        assert_same({params = p, ptype = "table"}, (rpc("echo", p)), "echoed params")
        assert_same({params = "text", ptype = "string"}, (rpc("echo", "text")), "string params")
        assert_same({params = 3.0, ptype = "number"}, (rpc("echo", 3.0)), "float params")
        assert_same({ptype = "nil"}, (rpc("echo")), "no params")
      end)

      it("gives the handler an integer request id and the method name", function()
        start(script)
        assert_same({id_type = "integer", method = "args"}, (rpc("args")), "handler arguments")
      end)

      it("turns return nil, reason into {error = reason}", function()
        start(script)
        assert_same({error = "not now"}, (rpc("reason")), "nil, reason")
      end)

      it("turns a raised error into {error = message} without the position", function()
        start(script)
        assert_same({error = "broken handler"}, (rpc("raise")), "error()")
      end)

      -- the contract names only messages; both sides send a raised table as the error value
      it("answers a raised table with {error = that table}", function()
        start(script)
        assert_same({error = {code = 7}}, (rpc("raise_table")), "error({code = 7})")
      end)

      it("answers an unknown method with {error = unknown method: m}", function()
        start(script)
        assert_same({error = "unknown method: nosuch"}, (rpc("nosuch")), "unknown method")
      end)

      it("answers unknown methods even when the script registers no handler at all", function()
        start([[local tb = require "tb" tb.send_attributes{loaded = true}]])
        assert_same({error = "unknown method: m"}, (rpc("m")), "no handlers")
      end)

      it("sends the response of a handler that yields once it returns", function()
        start(script)
        assert_same("late", (rpc("slow")), "slow handler")
      end)

      it("keeps state between calls in tb.state", function()
        start(script)
        assert_same(1, (rpc("inc")), "first call")
        assert_same(2, (rpc("inc")), "second call")
        assert_same(3, (rpc("inc")), "third call")
      end)

      it("sends no response when the handler returns nothing (one-way)", function()
        start(script)
        local r, raw, status = d:rpc("oneway", nil, {timeout = 500})
        assert.is_nil(r)
        assert.is_nil(raw)
        assert.equal(408, status)
        assert_same(1, d:wait_for(function() return d:client_attribute("oneway_ran") end, 3000), "handler ran")
      end)

      it("sends no response when the handler returns an explicit nil", function()
        start(script)
        local r, _, status = d:rpc("explicit_nil", nil, {timeout = 500})
        assert.is_nil(r)
        assert.equal(408, status)
        assert_same(true, d:wait_for(function() return d:client_attribute("explicit_nil_ran") end, 3000),
          "handler ran")
      end)

      it("routes methods without a handler to the * fallback with the method name", function()
        start([[
          local tb = require "tb"
          tb.on_rpc("known", function() return "known" end)
          tb.on_rpc("*", function(params, id, method) return {fallback = method, params = params} end)
        ]])
        assert_same("known", (rpc("known")), "registered method")
        assert_same({fallback = "other", params = {x = 1.5}}, (rpc("other", {x = 1.5})), "fallback")
      end)
    end)

    describe("shared attributes", function()
      local script = [[
        local tb = require "tb"
        tb.state.calls = 0
        tb.on_attributes(function(changes, deleted)
          tb.state.calls = tb.state.calls + 1
          local out = {calls = tb.state.calls, n_changes = 0, n_deleted = #deleted,
            deleted_type = type(deleted), changes_type = type(changes)}
          for k, v in pairs(changes) do
            out["got_" .. k] = v
            out.n_changes = out.n_changes + 1
          end
          for _, k in ipairs(deleted) do out["del_" .. k] = true end
          tb.send_attributes(out)
        end)
        tb.on_connect(function()
          tb.send_attributes{connected_after_current = tb.state.calls}
        end)
      ]]

      it("delivers a push to on_attributes with its types", function()
        start(script)
        d:push_attributes{target = 21, ratio = 21.0, mode = "auto", on = true, obj = {a = {1, 2}}}
        assert.truthy(d:wait_for(function() return d:client_attribute("got_obj") end, 3000), "push not seen")
        assert_same(21, d:client_attribute("got_target"), "integer attribute")
        assert_same(21.0, d:client_attribute("got_ratio"), "float attribute")
        assert_same("auto", d:client_attribute("got_mode"), "string attribute")
        assert_same(true, d:client_attribute("got_on"), "boolean attribute")
        assert_same({a = {1, 2}}, d:client_attribute("got_obj"), "JSON attribute")
        assert_same(5, d:client_attribute("n_changes"), "changes in one call")
        assert_same(0, d:client_attribute("n_deleted"), "nothing deleted")
        assert_same("table", d:client_attribute("deleted_type"), "deleted is a table")
      end)

      it("passes deletions as the second argument with empty changes", function()
        start(script)
        d:push_attributes{keep = 1, gone = 2, also = 3}
        assert.truthy(d:wait_for(function() return d:client_attribute("got_also") end, 3000), "push not seen")
        d:delete_attributes{"gone", "also"}
        assert.truthy(d:wait_for(function() return d:client_attribute("del_also") end, 3000), "deletion not seen")
        assert_same(true, d:client_attribute("del_gone"), "first deleted key")
        assert_same(2, d:client_attribute("n_deleted"), "deleted keys")
        assert_same(0, d:client_attribute("n_changes"), "changes in a deletion")
        assert_same("table", d:client_attribute("changes_type"), "changes is a table")
        assert_same(2, d:client_attribute("calls"), "on_attributes calls")
      end)

      it("delivers the current shared attributes on connect, before on_connect", function()
        start(script, {shared = {target = 19, label = "kitchen", gain = 0.5}})
        assert.truthy(d:wait_for(function() return d:client_attribute("connected_after_current") end, 3000),
          "on_connect did not run")
        assert_same(19, d:client_attribute("got_target"), "current integer")
        assert_same("kitchen", d:client_attribute("got_label"), "current string")
        assert_same(0.5, d:client_attribute("got_gain"), "current float")
        assert_same(3, d:client_attribute("n_changes"), "current attributes in one call")
        assert_same(1, d:client_attribute("connected_after_current"), "on_attributes ran before on_connect")
      end)

      it("does not call on_attributes on connect when there are no shared attributes", function()
        start(script)
        assert_same(0, d:wait_for(function() return d:client_attribute("connected_after_current") end, 3000),
          "on_attributes calls before on_connect")
      end)
    end)

    describe("request_attributes", function()
      local script = [[
        local tb = require "tb"
        tb.on_rpc("store", function()
          tb.send_attributes{cv = 5, cs = "client", cf = 2.0}
          return true
        end)
        tb.on_rpc("ask", function(p)
          local r, err = tb.request_attributes{client = p.client, shared = p.shared, timeout = 3000}
          if not r then return {err = err} end
          return {client = r.client, shared = r.shared,
            client_type = type(r.client), shared_type = type(r.shared)}
        end)
        tb.on_rpc("ask_all", function()
          local r, err = tb.request_attributes{timeout = 3000}
          if not r then return {err = err} end
          return {client = r.client, shared = r.shared}
        end)
      ]]
      local shared = {sv = 7, sf = 7.5, ss = "shared", sb = false}

      it("answers client and shared keys with their types; unknown keys are absent", function()
        start(script, {shared = shared})
        assert_same(true, (rpc("store")), "store")
        assert.truthy(d:wait_for(function() return d:client_attribute("cf") end, 3000), "client attributes not stored")
        local r = rpc("ask", {client = {"cv", "cs", "cf", "missing"}, shared = {"sv", "sf", "ss", "sb", "nosuch"}})
        assert_same({client = {cv = 5, cs = "client", cf = 2.0}, shared = shared,
          client_type = "table", shared_type = "table"}, r, "request_attributes")
      end)

      it("answers shared keys only, with an empty client table", function()
        start(script, {shared = shared})
        local r = rpc("ask", {shared = {"sv"}})
        assert_same({client = {}, shared = {sv = 7}, client_type = "table", shared_type = "table"}, r,
          "shared only")
      end)

      it("answers client keys only, with an empty shared table", function()
        start(script, {shared = shared})
        rpc("store")
        assert.truthy(d:wait_for(function() return d:client_attribute("cv") end, 3000), "client attributes not stored")
        local r = rpc("ask", {client = {"cv"}})
        assert_same({client = {cv = 5}, shared = {}, client_type = "table", shared_type = "table"}, r,
          "client only")
      end)

      it("answers every client and shared attribute when no keys are given", function()
        start(script, {shared = shared})
        rpc("store")
        assert.truthy(d:wait_for(function() return d:client_attribute("cs") end, 3000), "client attributes not stored")
        assert_same({client = {cv = 5, cs = "client", cf = 2.0}, shared = shared}, (rpc("ask_all")), "all keys")
      end)
    end)

    describe("client-side RPC", function()
      local script = [[
        local tb = require "tb"
        tb.on_rpc("call", function(p)
          local r, err = tb.rpc_call(p.method, p.params, p.timeout)
          return {result = r, err = err, rtype = math.type(r) or type(r)}
        end)
      ]]

      it("returns the server's answer with its types", function()
        start(script)
        d:answer_rpc_call("getTime", {now = 1600000000123, f = 1.0, s = "x", list = {1, 2}})
        assert_same({result = {now = 1600000000123, f = 1.0, s = "x", list = {1, 2}}, rtype = "table"},
          (rpc("call", {method = "getTime", params = {}, timeout = 3000})), "rpc_call result")
      end)

      it("returns scalar answers as they are", function()
        start(script)
        d:answer_rpc_call("getFloat", 2.0)
        assert_same({result = 2.0, rtype = "float"}, (rpc("call", {method = "getFloat", timeout = 3000})), "float")
        d:answer_rpc_call("getName", "dev")
        assert_same({result = "dev", rtype = "string"}, (rpc("call", {method = "getName", timeout = 3000})), "string")
      end)

      it("turns an {error = ...} answer into nil, error", function()
        start(script)
        d:answer_rpc_call("refused", {error = "no such thing"})
        assert_same({err = "no such thing", rtype = "nil"}, (rpc("call", {method = "refused", timeout = 3000})),
          "error answer")
      end)

      it("times out with nil, timeout when nobody answers", function()
        start(script)
        assert_same({err = "timeout", rtype = "nil"},
          (rpc("call", {method = "unanswered", timeout = 500}, {timeout = 3000})), "timeout")
      end)
    end)

    describe("telemetry", function()
      local script = [[
        local tb = require "tb"
        tb.on_rpc("send", function()
          assert(tb.send_telemetry{i = 42, f = 42.0, s = "str", b = true, nb = false,
            big = math.mininteger, j = {a = 1, b = {2, 3.5}, c = "x"}, arr = {1, 2, 3}})
          assert(tb.send_telemetry({i1 = 43, f1 = 0.25}, 1600000001000))
          assert(tb.send_telemetry{{ts = 1600000002000, values = {i2 = 44, f2 = 4.0}},
            {ts = 1600000003000, values = {i2 = 45}}})
          assert(tb.send_telemetry{ts = 1600000004000, values = {i3 = 46, s3 = "four"}})
          assert(tb.send_telemetry{{ts = 1600000005000, values = {m = 1}}, {m = 2}})
          return true
        end)
      ]]

      local function one(key)
        assert.truthy(d:wait_for(function() return #d:telemetry(key) > 0 end, 3000), key .. " never arrived")
        local l = d:telemetry(key)
        assert.equal(1, #l, key .. " points")
        return l[1].value, l[1].ts
      end

      -- points(key, n) -> the n points of key, once all have arrived
      local function points(key, n)
        assert.truthy(d:wait_for(function() return #d:telemetry(key) == n end, 3000), key .. " points")
        return d:telemetry(key)
      end

      it("keeps every value type of a plain table", function()
        start(script)
        assert_same(true, (rpc("send")), "send")
        assert_same(42, one("i"), "integer stays long")
        assert_same(42.0, one("f"), "42.0 stays double")
        assert_same("str", one("s"), "string")
        assert_same(true, one("b"), "true")
        assert_same(false, one("nb"), "false")
        assert_same(math.mininteger, one("big"), "64-bit integer")
        assert_same({a = 1, b = {2, 3.5}, c = "x"}, one("j"), "nested table as JSON")
        assert_same({1, 2, 3}, one("arr"), "array as JSON")
        local _, ts = one("i")
        assert.equal("integer", math.type(ts))
      end)

      -- one value stamped by the script, and the other key sent with it
      for _, case in ipairs({
        {"uses the given timestamp with send_telemetry(values, ts)", "i1", 43, 1600000001000, "f1", 0.25, "float value"},
        {"takes a single {ts, values} table", "i3", 46, 1600000004000, "s3", "four", "string value"},
      }) do
        local name, key, value, at, other, other_value, what = table.unpack(case)
        it(name, function()
          start(script)
          rpc("send")
          local v, ts = one(key)
          assert_same(value, v, "value")
          assert_same(at, ts, "ts")
          assert_same(other_value, (one(other)), what)
        end)
      end

      it("keeps each timestamp of an array of {ts, values}", function()
        start(script)
        rpc("send")
        assert_same({{ts = 1600000002000, value = 44}, {ts = 1600000003000, value = 45}}, points("i2", 2), "i2")
        assert_same({{ts = 1600000002000, value = 4.0}}, d:telemetry("f2"), "f2")
      end)

      it("mixes {ts, values} and plain tables in one array", function()
        start(script)
        rpc("send")
        local l = points("m", 2)
        assert_same({ts = 1600000005000, value = 1}, l[1], "timestamped entry")
        assert_same(2, l[2].value, "plain entry")
        assert.is_true(l[2].ts > 1600000005000, "plain entry stamped with the current time")
      end)

      it("refuses values JSON cannot carry, with a clear error", function()
        start([[
          local tb = require "tb"
          tb.on_rpc("bad", function()
            local ok1, e1 = tb.send_telemetry{x = 0/0}
            local ok2, e2 = tb.send_telemetry{x = math.huge}
            local ok3, e3 = tb.send_telemetry{}
            return {ok = (ok1 or ok2 or ok3) and true or false, e1 = e1, e2 = e2, e3 = e3}
          end)
        ]])
        local r = rpc("bad")
        assert.is_false(r.ok)
        assert.truthy(r.e1:find("^cannot encode NaN"), r.e1)
        assert.truthy(r.e2:find("^cannot encode inf"), r.e2)
        assert_same("no values to send", r.e3, "empty table")
      end)

      -- The error names the place in the table the script passed, not in the agent's wrapper.
      it("names the bad value by its path in the script's own table", function()
        start([[
          local tb = require "tb"
          tb.on_rpc("bad", function()
            local _, e1 = tb.send_telemetry{x = 0/0}
            local _, e2 = tb.send_telemetry{nested = {y = math.huge}}
            return {e1 = e1, e2 = e2}
          end)
        ]])
        assert_same({e1 = "cannot encode NaN at .x", e2 = "cannot encode inf at .nested.y"}, (rpc("bad")),
          "error paths")
      end)

      -- What goes on the wire: the agent keeps the time each value was measured.
      it("sends a plain table stamped with the time of the call", function()
        start([[
          local tb = require "tb"
          tb.on_rpc("send", function() return tb.send_telemetry{w = 1} end)
        ]])
        assert_same(true, (rpc("send")), "send")
        local topic = "v1/devices/me/telemetry"
        assert.truthy(d:wait_for(function() return #d:sent(topic) > 0 end, 3000), "nothing sent")
        local p = d:sent(topic)[1]
        assert.equal("integer", math.type(p.ts), "payload has an integer ts")
        assert_same({w = 1}, p.values, "payload values")
        assert_same(p.ts, d:telemetry("w")[1].ts, "stored ts is the payload ts")
      end)
    end)

    describe("connection", function()
      it("reconnects after a drop: on_disconnect, current attributes again, on_connect again", function()
        start([[
          local tb = require "tb"
          tb.state.connects, tb.state.drops, tb.state.current = 0, 0, 0
          tb.on_attributes(function(changes)
            if changes.mode then tb.state.current = tb.state.current + 1 end
          end)
          tb.on_disconnect(function(reason)
            tb.state.drops = tb.state.drops + 1
            tb.state.reason_type = type(reason)
          end)
          tb.on_connect(function()
            tb.state.connects = tb.state.connects + 1
            tb.send_attributes{connects = tb.state.connects, drops = tb.state.drops,
              current = tb.state.current, reason_type = tb.state.reason_type or "none",
              online = tb.connected()}
          end)
        ]], {shared = {mode = "eco"}})
        assert_same(1, d:wait_for(function() return d:client_attribute("connects") end, 3000), "first connect")
        assert_same(1, d:client_attribute("current"), "current attributes before the first on_connect")
        d:disconnect()
        assert_same(2, d:wait_for(function()
          local n = d:client_attribute("connects")
          return n ~= 1 and n
        end, 8000), "second connect")
        assert_same(1, d:client_attribute("drops"), "on_disconnect ran once")
        assert_same("string", d:client_attribute("reason_type"), "on_disconnect gets a reason")
        assert_same(2, d:client_attribute("current"), "current attributes delivered again")
        assert_same(true, d:client_attribute("online"), "tb.connected() in on_connect")
      end)
    end)

    describe("firmware", function()
      -- install() keeps what it got (the image as hex, and info) for the "installed" RPC
      local script = [[
        local tb = require "tb"
        local function hex(b) return (b:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
        tb.firmware{
          current = {title = "pump", version = "1.0"},
          chunk_size = 1024,
          accept = function(info) return info.title == "pump" end,
          install = function(path, info)
            local f = assert(io.open(path, "rb"))
            local b = f:read("a")
            f:close()
            tb.state.installed = {hex = hex(b), n = #b, title = info.title, version = info.version,
              size = info.size, checksum = info.checksum, checksum_algorithm = info.checksum_algorithm,
              url_type = type(info.url)}
            return true
          end,
        }
        tb.on_rpc("installed", function() return tb.state.installed or {none = true} end)
      ]]

      -- 2500 bytes, every byte value: three 1024-byte chunks, the last one short
      local t = {}
      for i = 0, 2499 do t[#t + 1] = string.char((i * 7 + 3) % 256) end
      local image = table.concat(t)
      local function hex(b) return (b:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
      local sha256 = require("tb.core").hash_hex("SHA256", image)
      local UPDATED = {state = "UPDATED", states = {"DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"}}

      local function fw_states_sent()
        local out = {}
        for _, p in ipairs(d:sent("v1/devices/me/telemetry")) do
          local values = p.values or p
          if values.fw_state ~= nil then out[#out + 1] = values.fw_state end
        end
        return out
      end

      it("updates over MQTT through every state; install() gets the exact bytes and the info", function()
        start(script)
        local r = d:offer_firmware({title = "pump", version = "2.0", checksum_algorithm = "SHA256"}, image)
        assert_same(UPDATED, r, "offer_firmware result")
        assert_same({hex = hex(image), n = 2500, title = "pump", version = "2.0", size = 2500, checksum = sha256,
          checksum_algorithm = "SHA256", url_type = "nil"}, (rpc("installed")), "what install() got")
        assert_same(UPDATED.states, d:wait_for(function() local l = fw_states_sent() return #l >= 5 and l end, 3000),
          "fw_state on the wire")
      end)

      it("fails with checksum mismatch when the image does not match fw_checksum", function()
        start(script)
        local r = d:offer_firmware({title = "pump", version = "2.1", checksum = string.rep("ab", 32)}, image)
        assert_same("FAILED", r.state, "final state")
        assert_same({"DOWNLOADING", "DOWNLOADED", "FAILED"}, r.states, "states")
        assert.is_string(r.error)
        assert.truthy(r.error:find("checksum mismatch", 1, true), r.error)
        assert_same({none = true}, (rpc("installed")), "install() did not run")
      end)

      it("leaves no state when accept() returns false", function()
        start(script)
        local r = d:offer_firmware({title = "other", version = "2.0"}, image)
        assert_same({states = {}}, r, "declined offer")
        assert_same({none = true}, (rpc("installed")), "install() did not run")
        assert_same({}, fw_states_sent(), "no fw_state on the wire")
      end)

      it("updates from fw_url over HTTP with the exact bytes", function()
        start(script)
        local r = d:offer_firmware({title = "pump", version = "3.0", url = "http://files.test/pump-3.0.bin"}, image)
        assert_same(UPDATED, r, "offer_firmware result")
        assert_same({hex = hex(image), n = 2500, title = "pump", version = "3.0", size = 2500, checksum = sha256,
          checksum_algorithm = "SHA256", url_type = "string"}, (rpc("installed")), "what install() got")
      end)
      -- the fake checks with tb.core's hashes, the real side with tbemu's (node's crypto and
      -- its own CRC32/MurmurHash3) in ThingsBoard's text encoding
      it("verifies every checksum algorithm of ThingsBoard", function()
        start(script)
        for i, alg in ipairs{"MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128"} do
          local r = d:offer_firmware({title = "pump", version = "4." .. i, checksum_algorithm = alg}, image)
          assert_same(UPDATED, r, alg .. " update")
          local got = rpc("installed")
          assert_same(alg, got.checksum_algorithm, alg .. ": info.checksum_algorithm")
          assert_same(hex(image), got.hex, alg .. ": the bytes")
        end
      end)
    end)

    describe("hot reload", function()
      local v1 = [[
        local tb = require "tb"
        tb.state.loads = (tb.state.loads or 0) + 1
        tb.on_rpc("version", function() return {v = 1, loads = tb.state.loads} end)
        tb.on_rpc("inc", function() tb.state.n = (tb.state.n or 0) + 1 return tb.state.n end)
      ]]

      it("swaps an RPC handler and keeps tb.state", function()
        start(v1)
        assert_same({v = 1, loads = 1}, (rpc("version")), "first version")
        assert_same(1, (rpc("inc")), "state before the reload")
        assert_same({true}, {d:reload(v1:gsub("v = 1", "v = 2"))}, "reload")
        assert_same({v = 2, loads = 2}, (rpc("version")), "new handler, tb.state kept")
        assert_same(2, (rpc("inc")), "tb.state.n kept")
      end)

      it("rejects a version that raises; the old handler keeps answering", function()
        start(v1)
        assert_same(1, (rpc("inc")), "state before the reload")
        local ok, err = d:reload([[
          local tb = require "tb"
          tb.on_rpc("version", function() return {v = 3} end)
          error("broken version")
        ]])
        assert.is_nil(ok)
        assert.is_string(err)
        assert.truthy(err:find("broken version", 1, true), err)
        assert_same({v = 1, loads = 1}, (rpc("version")), "old handler")
        assert_same(2, (rpc("inc")), "tb.state kept")
      end)
    end)

    describe("timers and tb.state", function()
      it("runs an every timer until it cancels itself, and after once", function()
        start([[
          local tb = require "tb"
          tb.state.ticks = 0
          tb.every(200, function(t)
            tb.state.ticks = tb.state.ticks + 1
            tb.send_telemetry{tick = tb.state.ticks}
            if tb.state.ticks == 3 then t:cancel() end
          end)
          tb.after(100, function() tb.send_attributes{after_ran = (tb.state.after or 0) + 1} end)
        ]])
        assert.truthy(d:wait_for(function() return #d:telemetry("tick") >= 3 end, 5000), "three ticks")
        d:sleep(700)
        local ticks = {}
        for i, e in ipairs(d:telemetry("tick")) do ticks[i] = e.value end
        assert_same({1, 2, 3}, ticks, "ticks")
        assert_same(1, d:client_attribute("after_ran"), "after ran once")
      end)

      it("runs timers set from a handler, and tb.sleep yields without blocking RPCs", function()
        start([[
          local tb = require "tb"
          tb.on_rpc("arm", function(p)
            tb.after(p.ms, function() tb.send_attributes{armed = p.tag} end)
            return "armed"
          end)
          tb.on_rpc("nap", function() tb.sleep(400) tb.send_attributes{napped = true} end)
          tb.on_rpc("ping", function() return "pong" end)
        ]])
        assert.is_nil((d:rpc("nap", nil, {timeout = 200})))
        assert_same("pong", (rpc("ping")), "RPC while another handler sleeps")
        assert_same("armed", (rpc("arm", {ms = 150, tag = "t1"})), "arm")
        assert_same("t1", d:wait_for(function() return d:client_attribute("armed") end, 3000), "after fired")
        assert_same(true, d:wait_for(function() return d:client_attribute("napped") end, 3000), "sleep ended")
      end)
    end)
  end)
end
