-- The device script fuzz_dispatch loads through tb.testing: every kind of handler the server
-- can reach, so fuzzed server messages travel through the real library into real handlers.
local tb = require "tb"

tb.on_rpc("ping", function() return "pong" end)
tb.on_rpc("echo", function(p) return p end)
tb.on_rpc("types", function(p)
  local out = {}
  if type(p) == "table" then
    for k, v in pairs(p) do if type(k) == "string" then out[k] = math.type(v) or type(v) end end
  end
  return out
end)
tb.on_rpc("fail", function(p) error("fail asked: " .. tostring(p)) end)
tb.on_rpc("nothing", function() end)
tb.on_rpc("nilerr", function() return nil, "refused" end)
-- waits on the server: an attribute request and a client-side RPC whose responses the fuzzer
-- may forge on attributes/response/N and rpc/response/N
tb.on_rpc("ask", function(p)
  local a, aerr = tb.request_attributes({shared = {"x", "fw_title"}, client = {"y"}})
  local r, rerr = tb.rpc_call("server", p, 5000)
  return {attributes = a or aerr, rpc = r or rerr}
end)
tb.on_rpc("send", function(p)
  local ok, err = tb.send_telemetry(type(p) == "table" and p or {v = p})
  local ok2, err2 = tb.send_attributes(type(p) == "table" and p or {v = p})
  return {telemetry = ok or err, attributes = ok2 or err2}
end)

local seen = 0
tb.on_attributes(function(changes, deleted)
  seen = seen + 1
  for k, v in pairs(changes) do
    assert(type(k) == "string", "attribute key is not a string")
    local _ = tb.json.encode({[k] = v})
  end
  for _, k in ipairs(deleted) do assert(type(k) == "string", "deleted key is not a string") end
end)

local function policy(kind)
  return {
    current = {title = kind, version = "1.0"},
    chunk_size = 16,
    accept = function(info) return info.title ~= "refused" end,
    install = function(path, info)
      local f = assert(io.open(path, "rb"))
      f:close()
      if info.version == "bad" then return nil, "cannot install" end
      return true
    end,
  }
end
tb.firmware(policy("fw"))
tb.software(policy("sw"))
