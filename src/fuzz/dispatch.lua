-- The Lua half of fuzz_dispatch (fuzz_dispatch.c calls init once, then step per input and
-- ping now and then). One tb.testing session runs the real library; each input becomes one
-- server message on the fake transport, then the virtual clock may move so timeouts fire.
-- step raises (and the C side aborts) when something goes wrong that is the library's fault:
-- an error escaping on_message/pump, or a library handler failing.
local testing = require "tb.testing"

local H = {}
local s
local FW_BYTES = string.rep("0123456789abcdef", 6) .. "tail"   -- 100 bytes, chunks of 16
-- TB_FUZZ_IGNORE="text,text": findings whose message contains one of these plain texts are
-- let through, so a run can go on past a known finding while it is open
local IGNORE = {}
for w in (os.getenv("TB_FUZZ_IGNORE") or ""):gmatch("[^,]+") do IGNORE[#IGNORE + 1] = w end
local function finding(msg)
  for _, w in ipairs(IGNORE) do
    if msg:find(w, 1, true) then return end
  end
  error(msg, 0)
end

-- log lines that mean the library itself failed (the script's "fail" RPC is expected to)
local function check_logs()
  for _, l in ipairs(s.logs) do
    local m = l.message
    if l.level == "ERROR" and (m:find("internal error", 1, true)
        or (m:find(" failed: ", 1, true) and not m:find("^RPC fail failed"))) then
      finding("library failure logged: " .. m)
    end
    if m:find("(log format error:", 1, true) then
      finding("log call with a bad format: " .. m)
    end
  end
  s.logs = {}
  s.published, s.telemetry, s.attributes, s.rpc_responses = {}, {}, {}, {}
end

local function ensure_online()
  for _ = 1, 200 do
    if s:connected() and s.session.ready then return end
    s:advance(1000)
  end
  error("the session does not come back online", 0)
end

function H.init(script, state_dir)
  s = testing.load(script, {budget_ms = 0, state_dir = state_dir, log_level = "debug",
    echo_logs = os.getenv("TB_FUZZ_ECHO") == "1"})
  s.packages.fw = {bytes = FW_BYTES}
  s.packages.sw = {bytes = FW_BYTES:sub(1, 40)}
  -- the fake server serves chunks of the packages titled "fw"/"sw" at once; for any other
  -- title the job waits, and only fuzzed chunks and v2/fw/error messages reach it
  local serve = s.serve_chunk
  s.serve_chunk = function(self, conn_id, kind, req, idx, payload)
    local job = (kind == "fw" and self.ctx.firmware or self.ctx.software).job
    if job and job.info.title ~= kind then return end
    return serve(self, conn_id, kind, req, idx, payload)
  end
  s:connect()
  ensure_online()
  check_logs()
  H.session = s
end

-- id(b): small literal ids, or one of the latest request ids the agent used
local function id(b)
  if b < 128 then return tostring(b) end
  return tostring(math.max(0, s.session.next_req - (b - 128)))
end

local FAMILIES = {
  function(b1) return "v1/devices/me/attributes" end,
  function(b1) return "v1/devices/me/attributes/response/" .. id(b1) end,
  function(b1) return "v1/devices/me/rpc/request/" .. id(b1) end,
  function(b1) return "v1/devices/me/rpc/response/" .. id(b1) end,
  function(b1, b2)
    local run = s.ctx.firmware.mqtt.run   -- the chunk download running (tb.ota_mqtt)
    local req = (b1 >= 128 and run and run.req_id) and tostring(run.req_id) or id(b1)
    return "v2/fw/response/" .. req .. "/chunk/" .. b2 % 16
  end,
  function() return "v2/fw/error" end,
  function(b1, b2)
    local run = s.ctx.software.mqtt.run   -- the chunk download running (tb.ota_mqtt)
    local req = (b1 >= 128 and run and run.req_id) and tostring(run.req_id) or id(b1)
    return "v2/sw/response/" .. req .. "/chunk/" .. b2 % 16
  end,
}

-- one message: a family byte, two id bytes, a clock byte, then the payload; family 7 (and
-- 8+) take the topic from the payload up to its first newline.
local function message(data)
  local f, b1, b2, clk = data:byte(1, 4)
  f, b1, b2, clk = f or 0, b1 or 0, b2 or 0, clk or 0
  local payload = data:sub(5)
  local topic
  local fam = FAMILIES[f % 8 + 1]
  if fam then
    topic = fam(b1, b2)
  else
    local nl = payload:find("\n", 1, true)
    topic = nl and payload:sub(1, nl - 1) or payload
    payload = nl and payload:sub(nl + 1) or ""
  end
  ensure_online()
  s:queue("message", s.session.conn_id, 1, 0, topic, payload)
  s:pump()
  if clk >= 192 then s:advance((clk - 191) * 500) end   -- up to 32 s: timeouts fire
  check_logs()
end

-- step(data): an input is up to 16 messages separated by SEP, so a finding that needs a
-- sequence (an offer, then a chunk) can be one self-contained reproducer.
local SEP = "\n--8<--\n"
function H.step(data)
  local at, n = 1, 0
  while n < 16 do
    local i, j = data:find(SEP, at, true)
    n = n + 1
    if not i or n == 16 then return message(data:sub(at)) end
    message(data:sub(at, i - 1))
    at = j + 1
  end
end

-- ping() -> the agent's answer to a plain RPC, as JSON text
function H.ping()
  ensure_online()
  local res, rid = s:rpc("ping")
  check_logs()
  if res ~= "pong" then
    error(string.format("ping %d answered %s", rid, tostring(res)), 0)
  end
  return res
end

return H
