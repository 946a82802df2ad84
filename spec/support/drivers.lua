-- Contract drivers: one interface over two ThingsBoards, so that the same contract cases run
-- against tb.testing (the fake) and against the real binary talking MQTT to the emulator.
--
--   local drivers = require "spec.support.drivers"
--   local server = drivers.new("fake" | "real")   -- real: starts one tbemu (node) for the block
--   local d = server:start(script_text, {shared = {...}})
--                                         -- a fresh device; the script runs and is connected
--                                         -- (real: the agent logged "session ready"; it runs
--                                         -- with hot reload on, for d:reload)
--   d:rpc(method, params [, {timeout = ms}]) -> decoded | nil, raw text | nil, status
--                                         -- nil when no response came (one-way): the fake
--                                         -- waits (virtual time) up to the timeout, the real
--                                         -- side gets HTTP 408 from the twoway call
--   d:push_attributes(t) / d:delete_attributes(keys)   shared attribute updates
--   d:answer_rpc_call(method, value)      what the script's tb.rpc_call(method) gets
--   d:telemetry(key) -> {{ts = ms, value = v}, ...} oldest first, types preserved
--   d:client_attribute(key) -> value | nil
--   d:disconnect()                        the server drops the connection (the agent reconnects)
--   d:sent(topic) -> the decoded payloads the agent published on topic (the wire)
--   d:wait_for(fn, ms) -> fn()'s first truthy value | nil when ms ran out (fake: virtual ms)
--   d:sleep(ms)                           let time pass (fake: advance; real: bounded sleep)
--   d:offer_firmware(info, bytes) -> {state = last fw_state | nil, states = {...}, error = fw_error | nil}
--                                         -- info: {title=, version=, checksum_algorithm= (SHA256),
--                                         -- checksum= (computed when absent), tag=, url=, kind="fw"|"sw"};
--                                         -- assigns the package and waits until the agent reports
--                                         -- UPDATED or FAILED, or declines it (no state; real:
--                                         -- also no state within 5-6 s, e.g. the version is
--                                         -- already current: the fake knows at once). fake:
--                                         -- Session:offer_firmware (url is served by the fake);
--                                         -- real: uploaded to tbemu (any url -> url=self, served by
--                                         -- tbemu's HTTP, so install() sees tbemu's URL), assigned,
--                                         -- states read from what the agent published
--   d:reload(text) -> true | nil, err     -- hot reload with the script rewritten. fake:
--                                         -- Session:reload; real: the file is replaced (rename)
--                                         -- and the agent's log says "reloaded ...: generation N
--                                         -- live" (true) or "reload rejected: err (...)" (nil, err)
--   d:stop()
--   server:close()                        stops every process this module started
--
-- The real side uses build/tbagent, node and curl; a missing one is an error (the case
-- fails), never a skip. Every wait is bounded. Processes are killed by their PID only.
local core = require "tb.core"

local M = {}

local decode, encode = core.json_decode, core.json_encode

-- The ASan run preloads libasan into lua5.4 (which is not instrumented); children must not
-- inherit it (curl deadlocks at start with it), so every command runs without LD_PRELOAD.
local CHILD_ENV = os.getenv("LD_PRELOAD") and "unset LD_PRELOAD; " or ""
local function execute(cmd) return os.execute(CHILD_ENV .. cmd) end
local function popen(cmd, mode) return io.popen(CHILD_ENV .. cmd, mode) end

local function shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- read_file(path) -> text | nil, err: the agent's own reader
local read_file = require("tb.loader").read_file
local write_file = require("spec.support.files").write

local function sh(cmd)
  local ok = execute(cmd)
  return ok == true or ok == 0
end

local function sleep_ms(ms)
  execute(string.format("sleep %.3f", ms / 1000))
end

local function monotonic_ms()
  -- os.clock() is CPU time; wall clock with ms resolution through date(1) costs a process,
  -- so use os.time() for the deadline and count sleeps in between.
  return os.time() * 1000
end

local function mktemp_dir(prefix)
  local p = popen("mktemp -d /tmp/" .. prefix .. "XXXXXX")
  local dir = p:read("l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return dir
end

local function repo_root()
  local p = popen("pwd")
  local d = p:read("l")
  p:close()
  return d
end

-- Deadline helper: counts real elapsed time by summing the sleeps and the os.time() clock,
-- whichever says more, so a wait never runs far over its bound.
local function deadline(ms)
  local start = monotonic_ms()
  local slept = 0
  return {
    left = function() return math.max(0, ms - math.max(slept, monotonic_ms() - start - 1000)) end,
    sleep = function(step) sleep_ms(step) slept = slept + step end,
  }
end

-------------------------------------------------------------------------------------------
-- process registry: only the PIDs this module started

local pids = {}

-- alive: exists and is not a zombie (our children are reparented to a PID 1 that may reap
-- them late, so kill -0 alone would wait for the reaper)
local function pid_alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then return not stat:match("^%d+ %b() Z") end
  return sh("kill -0 " .. pid .. " 2>/dev/null")
end

local function kill_pid(pid, grace_ms)
  if not pids[pid] then return end
  pids[pid] = nil
  if not pid_alive(pid) then return end
  sh("kill -TERM " .. pid .. " 2>/dev/null")
  local dl = deadline(grace_ms or 2000)
  while pid_alive(pid) and dl.left() > 0 do dl.sleep(20) end
  if pid_alive(pid) then sh("kill -KILL " .. pid .. " 2>/dev/null") end
end

-- spawn(cmd, log_path) -> pid: runs cmd (already quoted) in the background, its stdout and
-- stderr to files; returns the PID of the command itself (exec, so no intermediate shell).
local function spawn(cmd, out_path, err_path, dir)
  local pidfile = dir .. "/spawn.pid." .. tostring(math.random(1, 1 << 30))
  local line = string.format("(exec %s >%s 2>%s </dev/null) & echo $! >%s", cmd, shq(out_path),
    shq(err_path or out_path), shq(pidfile))
  if err_path == nil or err_path == out_path then
    line = string.format("(exec %s >%s 2>&1 </dev/null) & echo $! >%s", cmd, shq(out_path), shq(pidfile))
  end
  assert(sh(line), "could not start: " .. cmd)
  local pid = tonumber((read_file(pidfile) or ""):match("%d+"))
  os.remove(pidfile)
  assert(pid, "no PID for: " .. cmd)
  pids[pid] = true
  return pid
end

function M.kill_all()
  local list = {}
  for pid in pairs(pids) do list[#list + 1] = pid end
  for _, pid in ipairs(list) do kill_pid(pid, 1000) end
end

-------------------------------------------------------------------------------------------
-- the fake driver: tb.testing

local Fake = {}
Fake.__index = Fake

local FakeServer = {}
FakeServer.__index = FakeServer

function FakeServer:start(script, opts)
  opts = opts or {}
  local testing = require "tb.testing"
  local dir = mktemp_dir("tbcontract-fake-")
  local path = dir .. "/script.lua"
  write_file(path, script)
  local s = testing.load(path, {state_dir = dir .. "/state"})
  if opts.shared then s:set_attributes{shared = opts.shared} end
  s:connect()
  local d = setmetatable({s = s, dir = dir, kind = "fake"}, Fake)
  self.devices[#self.devices + 1] = d
  return d
end

function FakeServer:close()
  for _, d in ipairs(self.devices) do d:stop() end
  self.devices = {}
end

function Fake:raw_response(id)
  local topic = "v1/devices/me/rpc/response/" .. id
  for i = #self.s.published, 1, -1 do
    local m = self.s.published[i]
    if m.topic == topic then return m.payload end
  end
  return nil
end

function Fake:rpc(method, params, opts)
  local timeout = opts and opts.timeout or 5000
  self.s:rpc(method, params)
  local id = self.s.last_rpc_id
  local waited = 0
  while self.s.rpc_responses[id] == nil and waited < timeout do
    self.s:advance(10)
    waited = waited + 10
  end
  local r = self.s.rpc_responses[id]
  if r == nil then return nil, nil, 408 end
  return r, self:raw_response(id), 200
end

function Fake:push_attributes(t) self.s:push_attributes(t) end
function Fake:delete_attributes(keys) self.s:delete_attributes(keys) end
function Fake:answer_rpc_call(method, value) self.s:answer_rpc_call(method, value) end

function Fake:telemetry(key)
  local out = {}
  for _, e in ipairs(self.s.telemetry) do
    if e.values[key] ~= nil then out[#out + 1] = {ts = e.ts, value = e.values[key]} end
  end
  table.sort(out, function(a, b) return a.ts < b.ts end)
  return out
end

function Fake:client_attribute(key)
  local v
  for _, a in ipairs(self.s.attributes) do
    if a[key] ~= nil then v = a[key] end
  end
  return v
end

function Fake:disconnect() self.s:disconnect("dropped by the test") end

function Fake:sent(topic) return self.s:sent(topic) end

function Fake:wait_for(fn, ms)
  local waited = 0
  while true do
    local v = fn()
    if v then return v end
    if waited >= ms then return nil end
    self.s:advance(10)
    waited = waited + 10
  end
end

function Fake:sleep(ms) self.s:advance(ms) end

function Fake:offer_firmware(info, bytes)
  local r = self.s:offer_firmware(info, bytes)
  return {state = r.state, states = r.states, error = r.error}
end

function Fake:reload(text)
  return self.s:reload(text)
end

function Fake:stop()
  if self.dir then execute("rm -rf " .. shq(self.dir)) self.dir = nil end
end

-------------------------------------------------------------------------------------------
-- the real driver: tbemu + build/tbagent

local Real = {}
Real.__index = Real

local RealServer = {}
RealServer.__index = RealServer

local TBAGENT = os.getenv("TBAGENT") or "build/tbagent"   -- e.g. TBAGENT=build-asan/tbagent
local TBEMU = "scripts/tbemu/tbemu.js"

local function agent_path(root)
  return TBAGENT:sub(1, 1) == "/" and TBAGENT or root .. "/" .. TBAGENT
end

local function need(ok, what)
  if not ok then error("contract (real): " .. what, 3) end
end

-- http(server, method, path, body_table_or_nil, timeout_ms [, content_type]) -> status, body
-- text; a string body goes as it is (binary-safe), with content_type (JSON when not given)
function RealServer:http(method, path, body, timeout_ms, content_type)
  local n = self.seq + 1
  self.seq = n
  local out = self.dir .. "/http." .. n .. ".out"
  local args = {"curl -s -o", shq(out), "-w '%{http_code}'", "-X", method,
    "--max-time", string.format("%.1f", (timeout_ms or 10000) / 1000 + 2)}
  if body ~= nil then
    local inp = self.dir .. "/http." .. n .. ".in"
    write_file(inp, type(body) == "string" and body or assert(encode(body)))
    args[#args + 1] = "-H " .. shq("Content-Type: " .. (content_type or "application/json")) ..
      " --data-binary @" .. shq(inp)
  end
  args[#args + 1] = shq(self.base .. path)
  local p = popen(table.concat(args, " ") .. " 2>/dev/null")
  local code = p:read("a")
  p:close()
  local text = read_file(out) or ""
  os.remove(out)
  os.remove(self.dir .. "/http." .. n .. ".in")
  return tonumber(code) or 0, text
end

function RealServer:json(method, path, body, timeout_ms)
  local status, text = self:http(method, path, body, timeout_ms)
  if status < 200 or status >= 300 then
    error(string.format("tbemu %s %s -> HTTP %d %s", method, path, status, text), 2)
  end
  if text == "" then return nil end
  return assert(decode(text))
end

function RealServer:start(script, opts)
  opts = opts or {}
  need(self.base, "cannot run against the real agent: " .. tostring(self.failure))
  self.devices_made = self.devices_made + 1
  local name = "contract-" .. self.devices_made
  local token = "TOKEN-" .. self.devices_made .. "-" .. math.random(1, 1 << 30)
  self:json("POST", "/emu/devices", {name = name, token = token})
  local dev = self:json("GET", "/api/tenant/devices?deviceName=" .. name)
  local d = setmetatable({server = self, name = name, id = dev.id.id, kind = "real"}, Real)
  self.devices[#self.devices + 1] = d
  if opts.shared then
    self:json("POST", "/api/plugins/telemetry/DEVICE/" .. d.id .. "/attributes/SHARED_SCOPE", opts.shared)
  end
  d.dir = mktemp_dir("tbcontract-real-")
  local path = d.dir .. "/script.lua"
  write_file(path, script)
  d.path = path
  d.log = d.dir .. "/agent.log"
  -- reload on (no --no-reload), as d:reload needs: the agent watches d.dir for *.lua changes
  d.pid = spawn(table.concat({shq(agent_path(self.root)), "run", shq(path), "--host 127.0.0.1",
    "--port", self.mqtt, "--token", shq(token), "--log-level debug",
    "--state-dir", shq(d.dir .. "/state")}, " "), d.log, nil, d.dir)
  -- ready: the agent finished its connect sequence (subscribed to RPC last)
  local dl = deadline(10000)
  while true do
    local log = read_file(d.log) or ""
    if log:find("session ready", 1, true) then break end
    if not pid_alive(d.pid) then
      error("tbagent exited before the session was ready; log:\n" .. log, 2)
    end
    if dl.left() <= 0 then error("tbagent not ready within 10 s; log:\n" .. log, 2) end
    dl.sleep(20)
  end
  return d
end

function RealServer:close()
  for _, d in ipairs(self.devices) do d:stop() end
  self.devices = {}
  if self.pid then kill_pid(self.pid) self.pid = nil end
  if self.dir then execute("rm -rf " .. shq(self.dir)) self.dir = nil end
end

function Real:api(method, path, body, timeout_ms)
  return self.server:http(method, path, body, timeout_ms)
end

function Real:rpc(method, params, opts)
  local timeout = opts and opts.timeout or 5000
  local body = {method = method, params = params, timeout = timeout}
  local status, text = self:api("POST", "/api/plugins/rpc/twoway/" .. self.id, body, timeout)
  if status == 408 then return nil, nil, 408 end
  if status ~= 200 then
    error(string.format("twoway RPC %s -> HTTP %d %s; agent log:\n%s", method, status, text, self:log_tail()), 2)
  end
  if text == "" then return nil, text, status end
  local v, err = decode(text)
  if err then error("RPC " .. method .. ": the response is not JSON (" .. err .. "): " .. text, 2) end
  return v, text, status
end

function Real:push_attributes(t)
  self.server:json("POST", "/api/plugins/telemetry/DEVICE/" .. self.id .. "/attributes/SHARED_SCOPE", t)
end

function Real:delete_attributes(keys)
  self.server:json("DELETE", "/api/plugins/telemetry/DEVICE/" .. self.id .. "/SHARED_SCOPE?keys=" ..
    table.concat(keys, ","))
end

function Real:answer_rpc_call(method, value)
  self.server:json("POST", "/emu/devices/" .. self.name .. "/client-rpc", {method = method, response = value})
end

function Real:telemetry(key)
  local res = self.server:json("GET", "/api/plugins/telemetry/DEVICE/" .. self.id ..
    "/values/timeseries?keys=" .. key ..
    "&startTs=0&endTs=4102444800000&limit=10000&orderBy=ASC&useStrictDataTypes=true")
  local out = {}
  for _, e in ipairs(res and res[key] or {}) do out[#out + 1] = {ts = e.ts, value = e.value} end
  return out
end

function Real:client_attribute(key)
  local res = self.server:json("GET", "/api/plugins/telemetry/DEVICE/" .. self.id ..
    "/values/attributes/CLIENT_SCOPE?keys=" .. key)
  for _, e in ipairs(res or {}) do
    if e.key == key then return e.value end
  end
  return nil
end

function Real:wait_for(fn, ms)
  local dl = deadline(ms)
  while true do
    local v = fn()
    if v then return v end
    if dl.left() <= 0 then return nil end
    dl.sleep(25)
  end
end

function Real:sleep(ms) sleep_ms(ms) end

function Real:log_tail()
  local log = self.log and read_file(self.log) or ""
  return log:sub(-3000)
end

function Real:disconnect()
  self.server:json("POST", "/emu/devices/" .. self.name .. "/disconnect")
end

-- sent(topic) -> the decoded payloads the agent published on topic, in order
function Real:sent(topic)
  local out = {}
  for _, m in ipairs(self.server:json("GET", "/emu/devices/" .. self.name .. "/messages?dir=up&topic=" .. topic) or {}) do
    if m.topic == topic then out[#out + 1] = assert(decode(m.payload)) end
  end
  return out
end

local function urlencode(v)
  return (tostring(v):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- last_seq() -> the sequence number of the newest message in tbemu's log of this device
function Real:last_seq()
  local seq = 0
  for _, m in ipairs(self.server:json("GET", "/emu/devices/" .. self.name .. "/messages") or {}) do
    if m.seq > seq then seq = m.seq end
  end
  return seq
end

-- offer_firmware(info, bytes): upload to tbemu, assign, then follow the fw_state (sw_state)
-- telemetry the agent publishes until UPDATED or FAILED, or until the agent logs that the
-- script declined the package (no state then), or 5-6 s pass with no state (nothing taken up).
-- Bounded by 20 s.
function Real:offer_firmware(info, bytes)
  assert(type(info) == "table" and info.title and info.version, "offer_firmware needs {title=, version=}")
  need(info.size == nil and info.expire_at_chunk == nil,
    "offer_firmware: size= and expire_at_chunk= are fake-only (tbemu computes the size)")
  bytes = bytes or ""
  local kind = info.kind or "fw"
  local q = {"title=" .. urlencode(info.title), "version=" .. urlencode(info.version), "type=" .. kind,
    "checksumAlgorithm=" .. urlencode(info.checksum_algorithm or "SHA256"),
    -- an empty tag is none (tbemu's default tag is "title version"; the fake sends none)
    "tag=" .. urlencode(info.tag or "")}
  if info.checksum then q[#q + 1] = "checksum=" .. urlencode(info.checksum) end
  if info.url then q[#q + 1] = "url=self" end
  local status, text = self.server:http("POST", "/emu/packages?" .. table.concat(q, "&"), bytes, 10000,
    "application/octet-stream")
  if status ~= 200 then error(string.format("tbemu package upload -> HTTP %d %s", status, text), 2) end
  local pkg = assert(decode(text))
  local since = self:last_seq()
  local log_from = #(read_file(self.log) or "")
  self.server:json("POST", "/emu/devices/" .. self.name .. "/assign", {packageId = pkg.id})
  local p = kind .. "_"
  local states, last_error = {}, nil
  local seen = since
  local dl, idle = deadline(20000), deadline(5000)
  while true do
    local declined = (read_file(self.log) or ""):find("declined by the script", log_from + 1, true)
    local msgs = self.server:json("GET", "/emu/devices/" .. self.name .. "/messages?dir=up&since=" .. seen ..
      "&topic=v1/devices/me/telemetry") or {}
    for _, m in ipairs(msgs) do
      if m.seq > seen then seen = m.seq end
      local payload = m.topic == "v1/devices/me/telemetry" and decode(m.payload)
      local entries = type(payload) == "table" and (payload[1] and payload or {payload}) or {}
      for _, e in ipairs(entries) do
        local values = e.values or e
        if values[p .. "state"] ~= nil then
          states[#states + 1] = values[p .. "state"]
          if values[p .. "error"] ~= nil then last_error = values[p .. "error"] end
        end
      end
    end
    local st = states[#states]
    if st == "UPDATED" or st == "FAILED" or (declined and #states == 0) then break end
    -- no state at all after 5-6 s (idle counts wall seconds only): the agent took nothing up (the offered version is current,
    -- or it failed before); the fake answers that at once
    if #states == 0 and idle.left() <= 0 then break end
    if dl.left() <= 0 then
      error(string.format("offer_firmware: no UPDATED/FAILED within 20 s (states so far: %s); agent log:\n%s",
        table.concat(states, ", "), self:log_tail()), 2)
    end
    dl.sleep(25)
  end
  return {state = states[#states], states = states, error = last_error}
end

-- reload(text) -> true | nil, err: the script file is replaced by a rename (the agent sees
-- IN_MOVED_TO), then the agent's log decides: "reloaded ...: generation N live" -> true,
-- "reload rejected: err (generation N keeps running)" -> nil, err; "reload skipped: no
-- loaded file changed" (the same text again) -> true. Bounded by 10 s.
function Real:reload(text)
  local log_from = #(read_file(self.log) or "")
  local tmp = self.dir .. "/script.lua.new"
  write_file(tmp, text)
  assert(os.rename(tmp, self.path))
  local dl = deadline(10000)
  while true do
    local log = (read_file(self.log) or ""):sub(log_from + 1)
    if log:find("reloaded [^\n]*: generation %d+ live") or log:find("reload skipped: no loaded file changed", 1, true) then
      return true
    end
    local err = log:match("reload rejected: ([^\n]-) %(generation %d+ keeps running%)")
    if err then return nil, err end
    if not pid_alive(self.pid) then error("tbagent exited during a reload; log:\n" .. self:log_tail(), 2) end
    if dl.left() <= 0 then error("reload: no verdict in the agent's log within 10 s; log:\n" .. self:log_tail(), 2) end
    dl.sleep(20)
  end
end

function Real:stop()
  if self.pid then kill_pid(self.pid) self.pid = nil end
  if self.dir then execute("rm -rf " .. shq(self.dir)) self.dir = nil end
end

-------------------------------------------------------------------------------------------

local function start_real()
  local root = repo_root()
  local server = setmetatable({root = root, devices = {}, devices_made = 0, seq = 0}, RealServer)
  local ok, err = pcall(function()
    need(read_file(agent_path(root)), agent_path(root) ..
      " is missing: run scripts/build first")
    need(sh("node --version >/dev/null 2>&1"), "node is not installed")
    need(sh("curl --version >/dev/null 2>&1"), "curl is not installed")
    need(read_file(root .. "/scripts/node_modules/aedes/package.json"),
      "scripts/node_modules is missing: run npm ci --prefix scripts")
    server.dir = mktemp_dir("tbcontract-emu-")
    local out = server.dir .. "/tbemu.out"
    server.pid = spawn(table.concat({"node", shq(root .. "/" .. TBEMU), "--quiet", "--mqtt-port 0",
      "--http-port 0", "--set rpcMinTimeoutMs=100", "--set clientRpcTimeoutMs=3000"}, " "),
      out, server.dir .. "/tbemu.err", server.dir)
    local dl = deadline(15000)
    while true do
      local line = (read_file(out) or ""):match("[^\n]*\"ready\"[^\n]*")
      if line then
        local ready = assert(decode(line))
        server.mqtt, server.base = ready.mqtt, "http://127.0.0.1:" .. ready.http
        break
      end
      if not pid_alive(server.pid) then
        error("tbemu exited: " .. (read_file(server.dir .. "/tbemu.err") or ""))
      end
      if dl.left() <= 0 then error("tbemu not ready within 15 s") end
      dl.sleep(25)
    end
  end)
  if not ok then
    server.failure = err
    server:close()
  end
  return server
end

-- new(kind) -> server with :start(script, opts) and :close()
function M.new(kind)
  if kind == "fake" then return setmetatable({devices = {}}, FakeServer) end
  if kind == "real" then return start_real() end
  error("unknown driver kind " .. tostring(kind))
end

M.read_file = read_file

return M
