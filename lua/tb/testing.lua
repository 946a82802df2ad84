-- tb.testing: an offline session for Busted specs. It replaces only the transport and the
-- clock of tb.core with an in-memory fake (a fake ThingsBoard answers requests the way the
-- server does) and runs the real tb library on top, so a script that passes here behaves
-- the same in the agent. The clock is virtual: advance() never really sleeps.
local agent = require "tb.agent"
local reload = require "tb.reload"
local router = require "tb.router"
local new_log = require("tb.log").new
local OFFER_SETTLE_MS = require("tb.ota").OFFER_SETTLE_MS

local M = {}

local Session = {}
Session.__index = Session

local WALL_START = 1700000000000

local function real_ms()
  return math.floor(os.clock() * 1000)
end

-- The fake core: the real codec and checksums, a fake clock and a fake MQTT transport.
local function fake_core(s)
  local real = require "tb.core"
  local core = setmetatable({}, {__index = real})
  core.now = function() return s.clock end
  core.wall = function() return s.wall_start + s.clock end
  core.log_write = function(level, message)
    s.logs[#s.logs + 1] = {level = level, message = message}
    if s.echo_logs then io.stderr:write(level, " ", message, "\n") end
  end
  core.log_secret = function() end
  core.mask = function(x) return x end
  core.signals_open = function() return true end
  -- tb.exec runs the command for real (synchronously) and reports it as the agent would: the
  -- output cut at output_limit, and a command still running after timeout_ms (real time) is
  -- killed and reported as nothing, so tb.exec gives "timeout" once the clock is advanced
  core.spawn = function(argv, output_limit, timeout_ms)
    s.next_child = (s.next_child or 0) + 1
    local quoted = {}
    for i, a in ipairs(argv) do quoted[i] = "'" .. a:gsub("'", "'\\''") .. "'" end
    local cmd = table.concat(quoted, " ")
    if timeout_ms then cmd = string.format("timeout -s KILL %.3f %s", timeout_ms / 1000, cmd) end
    local p = io.popen(cmd .. " 2>&1 </dev/null", "r")
    local out = p:read("a")
    local _, how, code = p:close()
    s.commands[#s.commands + 1] = argv
    out = out:sub(1, output_limit or 65536)
    if timeout_ms and how == "exit" and code == 137 then return s.next_child end
    if how == "signal" then s:queue("exit", s.next_child, -1, code, out)
    else s:queue("exit", s.next_child, code, 0, out) end
    return s.next_child
  end
  core.spawn_kill = function() return false end
  -- fw_url downloads: the bytes of s:offer_firmware{url=...} land at once through a real sink
  core.http_download = function(o)
    s.next_http = (s.next_http or 0) + 1
    local id = s.next_http
    local bytes = s.http_files[o.url]
    local dl = {progress = function() return bytes and #bytes or 0, 0 end, cancel = function() end,
      release = function() end}
    local sink, err = real.sink_open(o.path, o.algorithm, 0)
    if not sink then return nil, err end
    if not bytes then
      sink:close()
      s:queue("http_done", id, 404, 0, "HTTP error status", "http")   -- as src/http.c reports it
    else
      sink:write(bytes)
      local hex = sink:finish()
      s:queue("http_done", id, 200, 0, nil, hex)
    end
    return dl, id
  end
  core.mqtt_connect = function(opts)
    s.next_conn = s.next_conn + 1
    local id = s.next_conn
    local conn = {id = id, opts = opts, mid = 0}
    function conn.publish(_, topic, payload, qos)
      conn.mid = conn.mid + 1
      s:server_receive(id, topic, payload, qos, conn.mid)
      return conn.mid
    end
    function conn.subscribe(_, topic, qos)
      conn.mid = conn.mid + 1
      s.subscriptions[#s.subscriptions + 1] = topic
      s:queue("subscribe", id, conn.mid, qos)
      return conn.mid
    end
    function conn.disconnect() s:queue("disconnect", id, 0, 0, "client disconnected") end
    function conn.want_write() return false end
    function conn.close() end
    s.conn = conn
    if s.refuse_with then
      s:queue("connect", id, s.refuse_with, 0)
      s:queue("disconnect", id, 14, 0, "connection refused")
    else
      s:queue("connect", id, 0, 0)
    end
    return conn, id
  end
  return core
end

-- Where a spec called tb.testing from: the first frame outside the tb library, so a failure
-- points at the spec's line
local OWN_SRC = (debug.getinfo(1, "S").source or ""):match("^(@.*/)[^/]*$")

local function spec_level()
  local level = 3
  while true do
    local info = debug.getinfo(level, "S")
    if not info then return 1 end
    if info.what ~= "C" and not (OWN_SRC and info.source:sub(1, #OWN_SRC) == OWN_SRC) then
      return level - 1
    end
    level = level + 1
  end
end

-- script_frames(traceback) -> the traceback's lines that are the script's own (not the tb
-- library's, not C), indented
local function script_frames(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    if line:find("^%s") and not line:find("[C]", 1, true) and not line:find("lua/tb/", 1, true)
      and not line:find("(...tail calls...)", 1, true) then
      out[#out + 1] = "  " .. line:gsub("^%s+", "")
    end
  end
  return out
end

-- load(path [, opts]) -> session. opts: {config = {...} overrides, echo_logs = bool (every log
-- line also goes to stderr as it is written), persist = {key = value} (what tb.persist holds at
-- start), wall = start wall clock ms, budget_ms = handler budget, log_level = "debug"}
function M.load(path, opts)
  opts = opts or {}
  local s = setmetatable({
    clock = 0, wall_start = opts.wall or WALL_START, events = {}, logs = {},
    telemetry = {}, attributes = {}, published = {}, subscriptions = {}, claims = {},
    packages = {}, http_files = {}, req_sizes = {}, commands = {},
    rpc_responses = {}, attribute_answers = {}, rpc_answers = {}, next_conn = 0,
    next_rpc_id = 0, server = {client = {}, shared = {}}, echo_logs = opts.echo_logs,
    errors = {}, expected_errors = {}, unexpected = {},
  }, Session)
  local core = fake_core(s)
  local config = {script = path, host = "tb.testing", port = 1883, token = "testing",
    session_limits = false, state_dir = opts.state_dir or (os.tmpname() .. ".tbagent"),
    fw_chunk_timeout = 10000, handler_budget = opts.budget_ms or 1000, budget_clock = real_ms,
    backoff_min = 1000, backoff_max = 60000, request_timeout = 10000, rpc_timeout = 60000}
  config.persist = opts.persist
  for k, v in pairs(opts.config or {}) do config[k] = v end
  s.config = config
  s.core = core
  s.log = new_log(core.log_write, opts.log_level or "debug")
  -- the agent's outbox is on disk; here it is the same store in SQLite's memory
  if not config.outbox and not opts.memory_outbox then
    config.clock = config.clock or core.wall
    config.outbox = agent.open_outbox(core, config, s.log, ":memory:")
  end
  local ctx = agent.build(core, config, s.log)
  -- s.telemetry and s.attributes: what the script's sends were accepted with (the wire also
  -- carries the agent's own OTA reports, and queued records only once online)
  local accepted = ctx.session.listeners.accepted
  accepted[#accepted + 1] = function(kind, data)
    if kind == "telemetry" then
      for _, e in ipairs(data) do s.telemetry[#s.telemetry + 1] = e end
    else
      s.attributes[#s.attributes + 1] = data
    end
  end
  s.ctx, s.sched, s.session = ctx, ctx.sched, ctx.session
  ctx.sched.on_failure = function(info, message, by_script) s:on_failure(info, message, by_script) end
  -- s.persist: tb.persist as the script sees it once live (writes go straight to the store)
  s.persist = ctx.persist:api({loading = false})
  local gen, err = ctx.loader:load(path)
  if not gen then error(err, 2) end
  ctx.loader:commit(gen)
  s:pump()
  return s
end

-- on_failure(info, message, by_script): a handler failed. An RPC handler's own error() is its
-- answer; any other failure fails the spec (at the end of the call that ran the handler)
-- unless s:expect_error declared it.
function Session:on_failure(info, message, by_script)
  if info.answers_errors and by_script then return end
  local first = message:match("^[^\n]*")
  local entry = {handler = info.name, message = first, traceback = message, expected = false}
  for _, pattern in ipairs(self.expected_errors) do
    if first:find(pattern) then entry.expected = true break end
  end
  self.errors[#self.errors + 1] = entry
  if not entry.expected then self.unexpected[#self.unexpected + 1] = entry end
end

-- expect_error([pattern]) -> self: handler errors whose message matches the Lua pattern (any
-- error without one) are expected from now on: they no longer fail the spec. Every handler
-- error, expected or not, is in s.errors as {handler=, message=, traceback=, expected=}.
function Session:expect_error(pattern)
  assert(pattern == nil or type(pattern) == "string", "expect_error([pattern]) takes a Lua pattern")
  self.expected_errors[#self.expected_errors + 1] = pattern or ""
  return self
end

-- raise_failures(): the handler errors no spec expected, as one error at the spec's line
function Session:raise_failures()
  local list = self.unexpected
  if #list == 0 then return end
  self.unexpected = {}
  local lines = {}
  for _, e in ipairs(list) do
    lines[#lines + 1] = string.format("%s failed: %s", e.handler, e.message)
    for _, frame in ipairs(script_frames(e.traceback)) do lines[#lines + 1] = frame end
  end
  lines[#lines + 1] = "(a handler error fails the spec; s:expect_error(pattern) declares one the spec expects)"
  error("tb.testing: " .. table.concat(lines, "\n"), spec_level())
end

function Session:queue(kind, a, b, c, s1, s2)
  self.events[#self.events + 1] = {kind, a, b, c, s1, s2}
end

-- pump(): delivers queued transport events and due timers until nothing is left to do.
function Session:pump()
  for _ = 1, 100000 do
    if #self.events > 0 then
      local e = table.remove(self.events, 1)
      local ok, err = router.route(self.ctx, e[1], e[2], e[3], e[4], e[5], e[6])
      if not ok then error("tb.testing: internal error of the agent: " .. tostring(err), 2) end
    else
      local due = self.sched:next_due()
      if due ~= 0 then return self:raise_failures() end
      self.sched:run_due()
    end
  end
  error("tb.testing: the session did not settle (a handler loops through timers of 0 ms?)", 2)
end

local function decode(s, text)
  local v, err = s.core.json_decode(text)
  if err then error("tb.testing: agent sent invalid JSON: " .. err, 3) end
  return v
end

local function keys_of(csv)
  if type(csv) ~= "string" then return nil end
  local t = {}
  for k in csv:gmatch("[^,]+") do t[#t + 1] = k end
  return t
end

local function pick(store, keys)
  local out = {}
  if keys then
    for _, k in ipairs(keys) do if store[k] ~= nil then out[k] = store[k] end end
  else
    for k, v in pairs(store) do out[k] = v end
  end
  return next(out) and out or nil
end

-- The fake server: what ThingsBoard does with each publish of the agent.
function Session:server_receive(conn_id, topic, payload, qos, mid)
  self.published[#self.published + 1] = {topic = topic, payload = payload, qos = qos, at = self.clock}
  local id = topic:match("^v1/devices/me/attributes/request/(%d+)$")
  if id then
    local req = decode(self, payload)
    local answer
    if not self.session.fetching_current and #self.attribute_answers > 0 then
      answer = table.remove(self.attribute_answers, 1)
    else
      answer = {client = pick(self.server.client, keys_of(req.clientKeys)),
                shared = pick(self.server.shared, keys_of(req.sharedKeys))}
      if req.clientKeys and not req.sharedKeys then answer.shared = nil end
      if req.sharedKeys and not req.clientKeys then answer.client = nil end
    end
    self:queue("message", conn_id, 1, 0, "v1/devices/me/attributes/response/" .. id,
      assert(self.core.json_encode(answer)))
  end
  id = topic:match("^v1/devices/me/rpc/request/(%d+)$")
  if id then
    local req = decode(self, payload)
    local answers = self.rpc_answers[req.method]
    if answers and #answers > 0 then
      local answer = #answers > 1 and table.remove(answers, 1) or answers[1]
      self:queue("message", conn_id, 1, 0, "v1/devices/me/rpc/response/" .. id,
        assert(self.core.json_encode(answer)))
    end
  end
  id = topic:match("^v1/devices/me/rpc/response/(%d+)$")
  if id then
    self.rpc_responses[tonumber(id)] = decode(self, payload)
  end
  local kind, req, idx = topic:match("^v2/(%a%a)/request/(%d+)/chunk/(%d+)$")
  if kind then self:serve_chunk(conn_id, kind, req, tonumber(idx), payload) end
  if topic == "v1/devices/me/attributes" then
    for k, v in pairs(decode(self, payload)) do self.server.client[k] = v end
  elseif topic == "v1/devices/me/claim" then
    self.claims[#self.claims + 1] = decode(self, payload)
  end
  -- s.hold_acks = true: a server that takes publishes but never acknowledges them
  if qos and qos > 0 and not self.hold_acks then self:queue("publish", conn_id, mid, 0) end
end

local function ensure_online(s)
  if not s.session:online() then s:connect() end
end

-- Chunks as ThingsBoard serves them: the size is remembered per request id, the last
-- chunk is short, an index past the end is empty; errors go to v2/fw/error, then the
-- connection closes.
function Session:serve_chunk(conn_id, kind, req, idx, payload)
  local pkg = self.packages[kind]
  local function refuse(code)
    self:queue("message", conn_id, 1, 0, "v2/fw/error", code)
    self:queue("disconnect", conn_id, 7, 0, "closed by server after " .. code)
  end
  if not pkg or pkg.url then return refuse(pkg and "FAILURE" or "NOT_FOUND") end
  local size = math.tointeger(tonumber(payload))
  if not size or size <= 0 then size = self.req_sizes[kind .. req] or 0 end
  self.req_sizes[kind .. req] = size
  if size > 65536 then return refuse("PAYLOAD_TOO_LARGE") end
  local bytes = pkg.bytes
  if pkg.expire_at and idx >= pkg.expire_at and not pkg.expired_once then
    bytes = ""                       -- the server's cache expired under this request id
    pkg.expired_once = true
  end
  local chunk = size == 0 and bytes or bytes:sub(idx * size + 1, (idx + 1) * size)
  self:queue("message", conn_id, 1, 0, "v2/" .. kind .. "/response/" .. req .. "/chunk/" .. idx, chunk)
end

-- queue_push / queue_delete: the server's attribute push and deletion, queued for the agent
-- (the caller pumps; offer_firmware queues both before the agent runs)
local function queue_push(s, changes)
  for k, v in pairs(changes) do s.server.shared[k] = v end
  s:queue("message", s.session.conn_id, 1, 0, "v1/devices/me/attributes", assert(s.core.json_encode(changes)))
end

local function queue_delete(s, keys)
  for _, k in ipairs(keys) do s.server.shared[k] = nil end
  s:queue("message", s.session.conn_id, 1, 0, "v1/devices/me/attributes",
    assert(s.core.json_encode({deleted = setmetatable(keys, s.core.json_array_mt)})))
end

-- ota_states(s, kind, from) -> the <kind>_state values the agent published after message
-- number `from`, and the last <kind>_error among them
local function ota_states(s, kind, from)
  local states, last_error = {}, nil
  for i = from + 1, #s.published do
    local m = s.published[i]
    if m.topic == "v1/devices/me/telemetry" then
      local v = decode(s, m.payload).values or {}
      if v[kind .. "_state"] then states[#states + 1] = v[kind .. "_state"] end
      if v[kind .. "_error"] then last_error = v[kind .. "_error"] end
    end
  end
  return states, last_error
end

local ALGORITHMS = {MD5 = true, SHA256 = true, SHA384 = true, SHA512 = true, CRC32 = true,
  MURMUR3_32 = true, MURMUR3_128 = true}

-- why_nothing(...) -> why an offer led to no state at all (result.reason of offer_firmware)
local function why_nothing(s, updater, kind, info, log_from)
  for i = log_from + 1, #s.logs do
    local why = s.logs[i].message:match("declined by the script(.*)$")
    if why then return "declined by accept" .. why end
  end
  local policy = kind == "fw" and "firmware" or "software"
  if not updater.policy() then
    return string.format("no offer taken: the script has no tb.%s{} policy", policy)
  end
  local cur = updater:current() or {}
  if cur.title == info.title and cur.version == info.version then
    return string.format("no offer: %s %s is the current %s", info.title, info.version, policy)
  end
  return "no offer taken (a package that failed before is not tried again until another is assigned)"
end

-- offer_firmware(info, bytes) -> result: assigns a package the way ThingsBoard does (the
-- fw_* shared attributes) and runs the script's policy against it to the end. info:
-- {title=, version=, checksum_algorithm="SHA256", checksum=(computed if absent), url=,
-- kind="fw"|"sw", expire_at_chunk=} -> {state=, states={...}, error=, installed=bool, reason=}:
-- the <kind>_state and <kind>_error telemetry the server received for it; reason says why
-- there was none (declined by accept, no offer)
function Session:offer_firmware(info, bytes)
  assert(type(info) == "table" and info.title and info.version, "offer_firmware needs {title=, version=}")
  bytes = bytes or ""
  ensure_online(self)
  local kind = info.kind or "fw"
  local p = kind .. "_"
  local alg = (info.checksum_algorithm or "SHA256"):upper()   -- ThingsBoard keeps it upper case
  assert(ALGORITHMS[alg], "unknown checksum algorithm " .. alg)
  local checksum = info.checksum or assert(self.core.hash_hex(alg, bytes))
  self.packages[kind] = {bytes = bytes, url = info.url, expire_at = info.expire_at_chunk}
  local attrs = {[p .. "title"] = info.title, [p .. "version"] = info.version}
  if info.url then
    self.http_files[info.url] = bytes
    attrs[p .. "url"] = info.url
  end
  attrs[p .. "size"] = info.size or #bytes
  attrs[p .. "checksum_algorithm"] = alg
  attrs[p .. "checksum"] = checksum
  if info.tag then attrs[p .. "tag"] = info.tag end
  local updater = kind == "fw" and self.ctx.firmware or self.ctx.software
  local from = #self.published
  -- as ThingsBoard's OTA update: one push with the package's keys, then at once a second
  -- with the keys it has no value for deleted (both queued before the agent runs)
  local gone = {}
  for _, k in ipairs({"title", "version", "tag", "size", "checksum", "checksum_algorithm", "url"}) do
    if attrs[p .. k] == nil and self.server.shared[p .. k] ~= nil then gone[#gone + 1] = p .. k end
  end
  local log_from = #self.logs
  queue_push(self, attrs)
  if #gone > 0 then queue_delete(self, gone) end
  self:pump()
  self:advance(OFFER_SETTLE_MS)   -- the agent waits that long for deletions after a push
  -- the states are what the server received: the update runs to UPDATED or FAILED, or ends
  -- without either (declined, nothing to do, withdrawn) once what it reported has gone out
  local states, last_error
  for _ = 1, 10000 do
    states, last_error = ota_states(self, kind, from)
    local st = states[#states]
    if st == "UPDATED" or st == "FAILED" then break end
    if not updater.job and self.session.outbox:count() == 0 then break end
    self:advance(100)
  end
  return {state = states[#states], states = states, error = last_error,
    installed = states[#states] == "UPDATED",
    reason = #states == 0 and why_nothing(self, updater, kind, info, log_from) or nil}
end

-- connect(): the server accepts the connection; on_connect handlers run.
function Session:connect()
  if self.session:online() then return self end
  self.session:start()
  self:pump()
  return self
end

-- disconnect([reason]): the connection drops; on_disconnect handlers run. The agent
-- reconnects by itself after its backoff (advance the clock to see it).
function Session:disconnect(reason)
  if self.session.conn_id then
    self:queue("disconnect", self.session.conn_id, 7, 0, reason or "connection lost")
    self:pump()
  end
  return self
end

-- refuse(code): the next connection attempts get this CONNACK code (nil to accept again).
function Session:refuse(code)
  self.refuse_with = code
  return self
end

-- signal(name): the agent gets SIGname ("HUP" reloads the script, "TERM"/"INT" stop it)
function Session:signal(name)
  self:queue("signal", 0, 0, 0, name)
  self:pump()
  return self
end

function Session:connected()
  return self.session:online()
end

-- advance(ms): moves the virtual clock; timers due on the way run in order.
function Session:advance(ms)
  assert(type(ms) == "number" and ms >= 0, "advance(ms) needs a number of ms")
  local target = self.clock + math.floor(ms)
  self:pump()
  while true do
    local due = self.sched:next_due()
    if due == nil or self.clock + due > target then break end
    self.clock = self.clock + due
    self.sched:run_due()
    self:pump()
  end
  self.clock = target
  self:pump()
  return self
end

-- rpc(method, params) -> response: a server-side RPC; the response is the decoded JSON the
-- agent sent back (nil when the handler sent none, or has not answered yet: advance the clock
-- and read s.rpc_responses[s.last_rpc_id]).
function Session:rpc(method, params)
  assert(type(method) == "string", "rpc(method, params) needs a method name")
  ensure_online(self)
  local id = self.next_rpc_id
  self.next_rpc_id = id + 1
  self.last_rpc_id = id
  local payload = assert(self.core.json_encode({method = method, params = params}))
  self:queue("message", self.session.conn_id, 1, 0, "v1/devices/me/rpc/request/" .. id, payload)
  self:pump()
  return self.rpc_responses[id]
end

-- push_attributes(changes) / delete_attributes(keys): shared attribute updates.
function Session:push_attributes(changes)
  ensure_online(self)
  queue_push(self, changes)
  self:pump()
  return self
end

function Session:delete_attributes(keys)
  ensure_online(self)
  queue_delete(self, keys)
  self:pump()
  return self
end

-- answer_attributes{client=, shared=}: what the next request_attributes gets.
function Session:answer_attributes(answer)
  self.attribute_answers[#self.attribute_answers + 1] = answer
  return self
end

-- set_attributes{client=, shared=}: the server's stored attributes (answers by key).
function Session:set_attributes(attrs)
  for k, v in pairs(attrs.client or {}) do self.server.client[k] = v end
  for k, v in pairs(attrs.shared or {}) do self.server.shared[k] = v end
  return self
end

-- answer_rpc_call(method, result, ...): what rpc_call(method) gets; several results are
-- used in turn, the last one repeats. {error="timeout"} is what ThingsBoard sends on timeout.
function Session:answer_rpc_call(method, ...)
  self.rpc_answers[method] = table.pack(...)
  self.rpc_answers[method].n = nil
  return self
end

-- sent(topic) -> list of decoded payloads the agent published on topic
function Session:sent(topic)
  local out = {}
  for _, m in ipairs(self.published) do
    if m.topic == topic then out[#out + 1] = decode(self, m.payload) end
  end
  return out
end

-- logged(pattern [, level]) -> the first log message matching the Lua pattern
function Session:logged(pattern, level)
  for _, l in ipairs(self.logs) do
    if (not level or l.level == level:upper()) and l.message:find(pattern) then return l.message end
  end
  return nil
end

-- reload([text]) -> true | nil, err: hot reload as the agent does it (writes text to the
-- script first when given). A version that fails to load is rejected; the old one stays.
function Session:reload(text)
  local path = self.ctx.current.path
  if text then
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
  end
  local ctx = self.ctx
  ctx.reloader = ctx.reloader or reload.new(ctx)
  -- new text is a file change (skipped when it is the same, as the agent does); none is SIGHUP
  local ok, err = ctx.reloader:reload(text and "file change" or "tb.testing")
  self:pump()
  return ok, err
end

-- generation() -> the number of the live version of the script (1 after load)
function Session:generation()
  return self.ctx.current.id
end

-- state: the script's tb.state table
function Session:state()
  return self.ctx.state
end

-- persisted() -> {key = value}: what tb.persist holds now; testing.load(path, {persist =
-- s:persisted()}) starts the script again as after a restart
function Session:persisted()
  return self.ctx.persist:snapshot()
end

-- render(v) -> v as short readable Lua text, keys sorted ({humidity = 40.5, temperature = 21.5})
local function render(v, depth)
  depth = depth or 0
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) ~= "table" then return tostring(v) end
  if depth > 3 then return "{...}" end
  local keys, n = {}, #v
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i = 1, n do parts[#parts + 1] = render(v[i], depth + 1) end
  for _, k in ipairs(keys) do
    local name = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. render(k) .. "]"
    parts[#parts + 1] = name .. " = " .. render(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.render = render

-- listing(entries, show, max) -> the last `max` entries, one per line
local function listing(entries, show, max)
  if #entries == 0 then return "  (nothing)" end
  local lines = {}
  local first = math.max(1, #entries - max + 1)
  if first > 1 then lines[1] = string.format("  ... %d earlier", first - 1) end
  for i = first, #entries do lines[#lines + 1] = "  " .. show(entries[i]) end
  return table.concat(lines, "\n")
end

-- Assertions for specs, registered with luassert when it is there (under Busted). Each says
-- what was expected and what happened:
--   assert.sent_telemetry(s, {temperature = 21.5})  -- some entry has these values
--   assert.sent_attributes(s, {setpoint = 21.5})    -- some send_attributes had these values
--   assert.rpc_error(s, "method", params, "pattern")  -- the RPC answered {"error": ...}
--   assert.fw_state("UPDATED", result)               -- offer_firmware's final state
local function register_assertions()
  local ok, luassert = pcall(require, "luassert")
  local ok2, say = pcall(require, "say")
  if not (ok and ok2) then return end
  local function subset(want, got)
    if type(want) ~= "table" then return want == got end
    if type(got) ~= "table" then return false end
    for k, v in pairs(want) do if not subset(v, got[k]) then return false end end
    return true
  end
  -- plain(args, ...) : the assertion's message arguments, as they are (no luassert formatting)
  local function plain(args, ...)
    local n = select("#", ...)
    for i = 1, math.max(n, args.n or #args) do args[i] = i <= n and select(i, ...) or nil end
    args.n, args.nofmt = n, {}
    for i = 1, n do args.nofmt[i] = true end
  end

  local function sent_assertion(name, what, field, show)
    say:set("assertion." .. name .. ".positive", "Expected " .. what .. " containing:\n  %s\n%s")
    say:set("assertion." .. name .. ".negative", "Expected no " .. what .. " containing:\n  %s\n%s")
    luassert:register("assertion", name, function(state, args)
      local s, want = args[1], args[2]
      assert(type(s) == "table" and s[field], "assert." .. name .. "(s, values): s is the session of testing.load")
      local found
      for _, e in ipairs(s[field]) do
        if subset(want, field == "telemetry" and e.values or e) then found = e break end
      end
      local detail = found and ("it was sent: " .. show(found))
        or string.format("sent (%d):\n%s", #s[field], listing(s[field], show, 20))
      plain(args, render(want), detail)
      return found ~= nil
    end, "assertion." .. name .. ".positive", "assertion." .. name .. ".negative")
  end
  sent_assertion("sent_telemetry", "telemetry", "telemetry",
    function(e) return string.format("ts %s %s", tostring(e.ts), render(e.values)) end)
  sent_assertion("sent_attributes", "client attributes", "attributes", render)

  say:set("assertion.rpc_error.positive", "Expected RPC %s to answer an error matching %s\n%s")
  say:set("assertion.rpc_error.negative", "Expected RPC %s not to answer an error matching %s\n%s")
  luassert:register("assertion", "rpc_error", function(_, args)
    local s, method, params, pattern = args[1], args[2], args[3], args[4]
    local res = s:rpc(method, params)
    local answered = res == nil and "it sent no answer (a one-way handler, or one still waiting)"
      or ("it answered " .. render(res))
    plain(args, string.format("%s(%s)", tostring(method), render(params)), string.format("%q", pattern or ".*"), answered)
    return type(res) == "table" and type(res.error) == "string" and res.error:find(pattern or "") ~= nil
  end, "assertion.rpc_error.positive", "assertion.rpc_error.negative")

  say:set("assertion.fw_state.positive", "Expected the update to end in %s, got %s")
  say:set("assertion.fw_state.negative", "Expected the update not to end in %s, got %s")
  luassert:register("assertion", "fw_state", function(_, args)
    local want, r = args[1], args[2]
    local got = type(r) == "table" and r.state or nil
    local text
    if type(r) ~= "table" then
      text = "no result (assert.fw_state(state, s:offer_firmware(...)))"
    elseif got == nil then
      text = "no state at all: " .. tostring(r.reason or "nothing happened")
    else
      text = tostring(got) .. "\n  states: " .. table.concat(r.states or {}, ", ")
        .. (r.error and ("\n  error: " .. tostring(r.error)) or "")
    end
    plain(args, tostring(want), text)
    return got == want
  end, "assertion.fw_state.positive", "assertion.fw_state.negative")
end
register_assertions()

return M
