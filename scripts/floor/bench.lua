-- bench.lua: the device script scripts/bench runs in tbagent; the Lua side of what
-- scripts/floor/floor.c does in C.
--   RPC bench_ping          -> "pong" (the bench's readiness check)
--   RPC bench_start {n=N}   -> true, then N telemetry messages {temperature=21.5, humidity=40.25}
--                              from a tb.every(1) loop, as fast as the pipe takes them
--   RPC echo                -> its params
--
-- Pacing: the outbox drops its oldest records when full and stamps records that wait in it,
-- so flooding it would both lose data and change the payloads. Each tick therefore sends only
-- what the pipe takes now, as the floor does: at QoS 1, up to the free in-flight window; at
-- QoS 0, while libmosquitto has nothing queued for the socket. The script reads those two
-- facts from the session object (bench-only introspection through the upvalue of
-- tb.connected); should that ever fail, it falls back to a fixed batch per tick.
local tb = require "tb"

local FALLBACK_BATCH = 100
local QOS0_BATCH = 2000   -- most messages one tick sends at QoS 0 (the loop must breathe)

local session
for i = 1, 50 do
  local name, value = debug.getupvalue(tb.connected, i)
  if name == nil then break end
  if name == "session" and type(value) == "table" then session = value break end
end
if not (session and session.outbox and session.config and session.window) then
  tb.log.warn("bench: session internals not found; pacing with %d messages per ms", FALLBACK_BATCH)
  session = nil
end

local function room()
  if not session then return FALLBACK_BATCH end
  if session.outbox:count() > 0 then return 0 end
  if (session.config.qos or 1) > 0 then return session.window - session.inflight_n end
  return QOS0_BATCH
end

local function pipe_full()
  -- QoS 0: libmosquitto queues what the socket did not take; stop there like the floor
  local conn = session and session.conn
  return conn ~= nil and conn:want_write()
end

local qos0 = session ~= nil and (session.config.qos or 1) == 0
local timer

tb.on_rpc("bench_start", function(params)
  local n = math.tointeger(type(params) == "table" and params.n) or 0
  local sent = 0
  if timer then timer:cancel() end
  timer = tb.every(1, function(t)
    if not tb.connected() then return end
    local k = math.min(room(), n - sent)
    for _ = 1, k do
      if qos0 and pipe_full() then break end
      tb.send_telemetry({temperature = 21.5, humidity = 40.25})
      sent = sent + 1
    end
    if sent >= n then t:cancel() end
  end)
  return true
end)

tb.on_rpc("bench_ping", function() return "pong" end)

tb.on_rpc("echo", function(params) return params end)
