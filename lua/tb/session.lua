-- tb.session: the ThingsBoard device session over one MQTT connection at a time. It owns the
-- connection lifecycle (connect, CONNACK, subscribe order, reconnect with backoff and jitter),
-- flushing the outbox through its in-flight window and pacing, request ids, and the routing of
-- incoming topics to the current generation's handlers. What a dropped connection says (a
-- poison record, a flapping session) is tb.drops' to judge.
-- Invariants: records leave the outbox only on PUBACK (QoS 1); a connection loss puts every
-- unacknowledged record back at the front, in order; nothing the server could disconnect
-- for (QoS 2, invalid JSON, oversize) is ever queued.
-- Telemetry goes out in the script's form when it is published at once; one that had to wait
-- (offline, behind a backlog, a full window, paced, read back from disk) gets the time of the
-- call it carries (rec.stamp) as it leaves (see "holds" below).
local memory_outbox = require "tb.memory_outbox"
local limits = require "tb.limits"
local logmod = require "tb.log"
local drops = require "tb.drops"

local M = {}
M.__index = M

local T_ATTR = "v1/devices/me/attributes"
local T_ATTR_REQ = "v1/devices/me/attributes/request/"
local T_ATTR_RES = "v1/devices/me/attributes/response/"
local T_RPC_REQ = "v1/devices/me/rpc/request/"
local T_RPC_RES = "v1/devices/me/rpc/response/"
local T_TELEMETRY = "v1/devices/me/telemetry"
local T_CLAIM = "v1/devices/me/claim"
M.topics = {telemetry = T_TELEMETRY, attributes = T_ATTR, claim = T_CLAIM,
  attr_req = T_ATTR_REQ, attr_res = T_ATTR_RES, rpc_req = T_RPC_REQ, rpc_res = T_RPC_RES}


-- new{core=, sched=, log=, config=, generation=fn() -> gen, outbox=, on_fatal=fn(code, msg)}
function M.new(o)
  local c = o.config
  local self = setmetatable({
    core = o.core, sched = o.sched, log = o.log, config = c, generation = o.generation,
    on_fatal = o.on_fatal or function() end,
    outbox = o.outbox or memory_outbox.new{limit = c.outbox_limit or 10000, max_bytes = c.outbox_max_bytes,
      max_age_ms = c.outbox_max_age and c.outbox_max_age * 1000, clock = o.clock, log = o.log},
    json_encode = o.core.json_encode, json_decode = o.core.json_decode,
    state = "offline", conn = nil, conn_id = nil,
    inflight = {}, inflight_n = 0, window = c.max_inflight or 100,
    payload_limit = c.payload_limit or 65536,
    seq = 0, next_req = 0, attempts = 0, ever_connected = false,
    own_requests = {},
    -- holds counts the times the flow of records stopped with some still waiting (a full
    -- window, pacing, a publish that failed, a lost connection); a record submitted while
    -- records flow keeps the count of then, and went out at once if it is the same when
    -- it is published. backlog: records wait that the flow has not caught up with yet.
    holds = 0, backlog = true,
    -- what other parts of the agent follow: attribute pushes, messages no route took,
    -- online (the session is up, before the current shared attributes are fetched: what
    -- must be reported before anything reacts to them), connect (after they were handled),
    -- disconnects (fn(why)), extra subscriptions, and the script's accepted sends
    listeners = {attributes = {}, message = {}, online = {}, connect = {}, disconnect = {},
      subscriptions = {}, accepted = {}},
    stats = {sent = 0, acked = 0, dropped = 0, reconnects = 0, refused = 0, set_aside = 0},
    clock = o.clock,
  }, M)
  local buckets, err = limits.parse(c.rate_limits)
  if not buckets then error(err, 0) end
  self.configured_buckets = buckets
  self.limiter = limits.new(buckets, self.sched.now())
  self.tele_limiter = limits.new({}, self.sched.now())
  self.sched.after_resume = function() self:after_handler() end
  self.drops = drops.new{now = self.sched.now, log = o.log, limit = c.poison_drops,
    keep = function(rec)
      if not c.state_dir or c.memory_outbox then return "; not kept: no state directory in use" end
      return drops.keep_in_file(c.state_dir, rec, self.json_encode, self.core.mkdirs, self.clock)
    end}
  return self
end

local function strip_position(err)
  if type(err) ~= "string" then return err end
  err = err:match("^([^\n]*)") or err
  return err:gsub("^[^:\n]+:%d+: ", "", 1)
end
M.strip_position = strip_position

function M:next_id()
  -- ThingsBoard parses ids with Integer.parseInt: stay within positive 32-bit ints
  self.next_req = self.next_req % 2147483647 + 1
  return self.next_req
end

function M:online()
  return self.state == "online"
end

-------------------------------------------------------------------------------------------
-- connection lifecycle

function M:start()
  self.stopping = false
  self:connect_now()
end

function M:connect_options()
  local c = self.config
  local username, password = c.username, c.password
  if c.token then username, password = c.token, nil end
  return {host = c.host, port = c.port, client_id = c.client_id, username = username,
    password = password, cafile = c.cafile, cert = c.cert, key = c.key, tls = c.tls,
    insecure = c.insecure, keepalive = c.keepalive or 60, max_inflight = self.window}
end

-- failure_words(code, why) -> what went wrong with a connection attempt, in plain words
-- with the host and port and what to check. code: src/mqtt.c's word for the kind of
-- failure ("dns", "refused", "unreachable", "timeout", "tls") or nil; why: its own text.
function M:failure_words(code, why)
  local c = self.config
  why = tostring(why):gsub("^connect failed: ", "")
  if code == "dns" then
    return string.format("host %s not found (no address for that name); check --host and the device's DNS", c.host)
  elseif code == "refused" then
    return string.format("connection refused: nothing accepts connections on port %d of %s; " ..
      "check --host and --port, and that ThingsBoard's MQTT transport runs", c.port, c.host)
  elseif code == "unreachable" then
    return string.format("no route to %s (%s); check --host and the device's network", c.host, why:gsub("%.$", ""):lower())
  elseif code == "timeout" then
    return string.format("no answer from %s:%d within %g s (timed out); check --host, --port and any firewall between", c.host, c.port,
      (c.connect_timeout or 30000) / 1000)
  elseif code == "tls" then
    return string.format("TLS handshake with %s:%d failed (%s); check --cafile, --cert and --key", c.host, c.port,
      (why:gsub("^TLS error: ", "")))
  end
  return why
end

function M:connect_now()
  if self.stopping then return end
  local conn, id, code = self.core.mqtt_connect(self:connect_options())
  if not conn then
    self.log.warn("cannot connect to %s:%d: %s", self.config.host, self.config.port, self:failure_words(code, id))
    return self:schedule_reconnect()
  end
  self.conn, self.conn_id, self.state = conn, id, "connecting"
  self.log.debug("connecting to %s:%d", self.config.host, self.config.port)
  -- a server that accepts TCP but never answers CONNECT must not stall us forever
  local my_id = id
  self.connect_timer = self.sched:timer(self.config.connect_timeout or 30000, function()
    if self.conn_id == my_id and self.state == "connecting" then
      self:drop_connection("connect timeout", "timeout")
    end
  end, nil, nil, "connect timeout")
end

function M:backoff_delay()
  local min, max = self.config.backoff_min or 1000, self.config.backoff_max or 60000
  local d = math.min(max, min * 2 ^ math.min(self.attempts, 30))
  self.attempts = self.attempts + 1
  -- jitter spreads a fleet's reconnects after a server restart
  local jittered = d * (0.75 + 0.5 * math.random())
  return math.floor(math.max(min * 0.5, math.min(max, jittered)))
end

function M:schedule_reconnect()
  -- after a fatal refusal the agent exits: announcing a reconnect would contradict it
  if self.stopping or self.fatal or self.reconnect_timer then return end
  local delay = self:backoff_delay()
  -- two decimals: at a 100 ms minimum the jittered steps (75-125, 150-250 ms) stay apart
  self.log.info("reconnecting in %.2f s", delay / 1000)
  self.reconnect_timer = self.sched:timer(delay, function()
    self.reconnect_timer = nil
    self.stats.reconnects = self.stats.reconnects + 1
    self:connect_now()
  end, nil, nil, "reconnect")
end

local CONNACK_TEXT = {
  [1] = "unacceptable protocol version",
  [2] = "client identifier rejected (unknown client id for MQTT basic credentials)",
  [3] = "server unavailable (ThingsBoard overloaded or rate-limited the connection)",
  [4] = "bad user name or password",
  [5] = "not authorized (wrong access token or credentials)",
}

function M:on_connack(rc)
  if self.connect_timer then self.connect_timer:cancel(); self.connect_timer = nil end
  if rc ~= 0 then
    local text = CONNACK_TEXT[rc] or ("refused with code " .. rc)
    self.stats.refused = self.stats.refused + 1
    if rc == 2 or rc == 4 or rc == 5 then
      -- once connected, a server that restarts can refuse good credentials for a moment, so
      -- only a run of refusals ends the agent
      self.refusals = (self.refusals or 0) + 1
      local limit = self.ever_connected and (self.config.refusals_to_exit or 5) or 1
      if self.refusals >= limit then
        self.fatal = true
        self.on_fatal(3, string.format("ThingsBoard refused the connection: CONNACK %d, %s%s; check --token or --client-id/--username/--password",
          rc, text, limit > 1 and string.format(" (%d times in a row)", self.refusals) or ""))
        return
      end
    end
    self.log.error("ThingsBoard refused the connection: CONNACK %d, %s", rc, text)
    self.refused_conn = self.conn_id   -- said: the disconnect that follows says no more
    return -- the disconnect event that follows schedules the reconnect
  end
  self.state = "online"
  self.ever_connected = true
  self.refusals = 0
  if self.stats.dropped > (self.warned_total or 0) then
    self.log.warn("outbox: %d records were dropped in all while offline", self.stats.dropped)
    self.warned_total = self.stats.dropped
  end
  self.connected_at = self.sched.now()
  self.log.info("connected to %s:%d", self.config.host, self.config.port)
  self.ready = false
  self.sched:spawn("connect sequence", function() self:connect_sequence(self.conn_id) end)
end

-- After every CONNACK: subscribe again (the server keeps nothing), let the online listeners
-- report first (the installed firmware: ThingsBoard's OTA flow expects it before any state of
-- an update), deliver what waited, fetch the current shared attributes (SUBACK comes before
-- the subscription is live, so a push may have been missed) and act on them, run on_connect,
-- and subscribe to RPC last so pending RPCs arrive once handlers are ready.
function M:connect_sequence(conn_id)
  local function alive() return self.conn_id == conn_id and self.state == "online" end
  local subs = {T_ATTR, T_ATTR_RES .. "+", T_RPC_RES .. "+"}
  for _, extra in ipairs(self.listeners.subscriptions or {}) do subs[#subs + 1] = extra end
  for _, topic in ipairs(subs) do
    local mid, err = self.conn:subscribe(topic, 1)
    if not mid then self.log.warn("subscribe %s failed: %s", topic, err) return end
    self.sched:wait("sub:" .. conn_id .. ":" .. mid, 10000)
    if not alive() then return end
  end
  if self.config.session_limits ~= false then
    self:fetch_session_limits()
    if not alive() then return end
  end
  self.ready = true
  for _, fn in ipairs(self.listeners.online) do fn() end
  if not alive() then return end
  local queued = self.outbox:count()
  if queued > 0 then
    self.log.info("delivering %d queued record%s", queued, queued == 1 and "" or "s")
  end
  self:flush()
  local gen = self.generation()
  if M.wants_attributes(gen) then
    self:fetch_current(alive)
    if not alive() then return end
  end
  for _, fn in ipairs(self.listeners.connect) do fn() end
  for _, fn in ipairs(gen.connect_handlers) do
    self.sched:spawn("on_connect handler", {fn = fn, gen = gen})
  end
  if not alive() then return end
  local mid = self.conn:subscribe(T_RPC_REQ .. "+", 1)
  if mid then self.sched:wait("sub:" .. conn_id .. ":" .. mid, 10000) end
  if alive() then self.log.debug("session ready") end
end

-- wants_attributes(gen) -> true when the version reacts to shared attributes
function M.wants_attributes(gen)
  return #gen.attr_handlers > 0 or gen.firmware ~= nil or gen.software ~= nil
end

-- fetch_current([alive]): the current shared attributes, handed to the listeners and the
-- handlers as a whole set: at connect, and after a reload that brought the first
-- on_attributes, tb.firmware or tb.software
function M:fetch_current(alive)
  self.fetching_current = true
  local res, err = self:request_attributes({}, self.config.request_timeout or 10000)
  self.fetching_current = false
  if alive and not alive() then return end
  if res then
    -- the whole current set, even when empty: what is missing from it was deleted while
    -- the agent was away (the firmware updaters drop a withdrawn offer on that)
    self:dispatch_attributes(res.shared or {}, {}, "current")
  else
    self.log.warn("could not fetch current shared attributes: %s", err)
  end
end

-- getSessionLimits (TB >= 3.8): adopt the server's rate limits at 80 % before a backlog drains.
function M:fetch_session_limits()
  local res = self:rpc_call("getSessionLimits", nil, self.config.session_limits_timeout or 2000)
  if type(res) ~= "table" then
    self.log.debug("server did not report session limits; using configured limits")
    return
  end
  if math.type(res.maxPayloadSize) == "integer" and res.maxPayloadSize > 0 then
    self.payload_limit = math.min(self.config.payload_limit or 65536, res.maxPayloadSize)
  end
  if math.type(res.maxInflightMessages) == "integer" and res.maxInflightMessages > 0 then
    self.window = math.min(self.config.max_inflight or 100, res.maxInflightMessages)
  end
  local rl = type(res.rateLimits) == "table" and res.rateLimits or {}
  local function adopt(text)
    if type(text) ~= "string" then return {} end
    local b = limits.parse(text, 0.8)
    return b or {}
  end
  local msg = adopt(rl.messages)
  for _, b in ipairs(self.configured_buckets) do msg[#msg + 1] = b end
  self.limiter = limits.new(msg, self.sched.now())
  local tele = adopt(rl.telemetryMessages)
  self.tele_limiter = limits.new(tele, self.sched.now())
  self.dp_limiter = limits.new(adopt(rl.telemetryDataPoints), self.sched.now())
  self.log.info("server session limits: payload %d bytes, %d in flight, messages %s",
    self.payload_limit, self.window, type(rl.messages) == "string" and rl.messages or "unlimited")
end

-- Closes the connection from our side, as if it had dropped (code: as on_disconnect's).
function M:drop_connection(why, code)
  if not self.conn then return end
  local id = self.conn_id
  self.conn:close()
  self:on_disconnect(id, -1, why, code)
end

-- on_disconnect(conn_id, rc, why [, code]): code is src/mqtt.c's kind of failure (failure_words)
function M:on_disconnect(conn_id, rc, why, code)
  if conn_id ~= self.conn_id then return end
  local was_online = self.state == "online"
  if self.connect_timer then self.connect_timer:cancel(); self.connect_timer = nil end
  if self.conn then self.conn:close() end
  self.conn, self.conn_id, self.state, self.ready = nil, nil, "offline", false
  self:hold()
  -- unacknowledged records go out again first, in their original order
  local back = {}
  for _, rec in pairs(self.inflight) do back[#back + 1] = rec end
  table.sort(back, function(a, b) return a.seq < b.seq end)
  self.inflight, self.inflight_n = {}, 0
  local lasted = self.sched.now() - (self.connected_at or 0)
  local poison = self.drops:on_drop(back, was_online, lasted)
  if poison then
    table.remove(back, 1)
    self.outbox:ack(poison)
    self.stats.set_aside = self.stats.set_aside + 1
  end
  if #back > 0 then
    local dropped = self.outbox:unshift(back)
    if type(dropped) == "number" and dropped > 0 then
      self.stats.dropped = self.stats.dropped + dropped
      self:warn_dropped()
    end
  end
  for _, fn in ipairs(self.listeners.disconnect) do fn(why) end
  self.sched:wake_all("attr:", nil, "disconnected")
  self.sched:wake_all("rpc:", nil, "disconnected")
  self.own_requests = {}
  -- the agent exits with the refusal's own line: nothing more to say, no reconnect
  if self.fatal then return end
  if was_online then
    if self.stopping then
      self.log.info("disconnected")
    else
      self.log.warn("connection lost after %.1f s: %s", lasted / 1000, tostring(why))
    end
    if self.drops:session_ended(lasted) then self.attempts = 0 end
    local gen = self.generation()
    for _, fn in ipairs(gen.disconnect_handlers) do
      self.sched:spawn("on_disconnect handler", {fn = fn, gen = gen}, tostring(why))
    end
  elseif self.refused_conn ~= conn_id then
    self.log.warn("cannot connect to %s:%d: %s", self.config.host, self.config.port, self:failure_words(code, why))
  end
  if self.stopping then
    self.finished = true
    return
  end
  self:schedule_reconnect()
end

-------------------------------------------------------------------------------------------
-- outbound records

-- hold(): the flow of records stopped with some possibly still waiting: whatever was
-- submitted until now and is published later waited
function M:hold()
  self.holds = self.holds + 1
  self.backlog = true
end

-- flowing() -> true when a record submitted now goes out at once, unless the flow stops
-- before it is published (connected, not paced, nothing waiting ahead of it)
function M:flowing()
  return self.ready and not self.backlog and not self.flush_timer and not self.closing
end

-- clock_trusted() -> true when the agent may put its clock's time on what it sends:
-- --timestamps device, or auto while the kernel says the clock is synchronised
function M:clock_trusted()
  local mode = self.config.timestamps or "auto"
  if mode == "auto" then return self.core.clock_synced() end
  return mode == "device"
end

-- stamped(rec) -> the payload of telemetry that waited: each entry without a ts of its own
-- gets the time of the call, rec.stamp. Stamp 0: the clock was not synchronised at the call,
-- and the record goes in the script's form (ThingsBoard stamps it on arrival); said once.
local STAMP_OPEN, STAMP_VALUES = '{"ts":', ',"values":'
function M:stamped(rec)
  local payload, stamp = rec.payload, rec.stamp
  if stamp == 0 then
    if not self.unsynced_said then
      self.unsynced_said = true
      self.log.warn("telemetry that waited in the outbox goes without the time it was sent: the system clock " ..
        "was not synchronised (adjtimex) when the script sent it; ThingsBoard stamps it on arrival")
    end
    return payload
  end
  if payload:byte(1) ~= 91 then   -- "[": else one object, wrapped as it is
    return STAMP_OPEN .. stamp .. STAMP_VALUES .. payload .. "}"
  end
  local list, err = self.json_decode(payload)
  if type(list) == "table" then
    for i, e in ipairs(list) do
      if not (type(e) == "table" and e.ts ~= nil and e.values ~= nil) then list[i] = {ts = stamp, values = e} end
    end
    local text
    text, err = self.json_encode(list)
    if text then return text end
  end
  self.log.warn("telemetry sent without its time: cannot add it (%s)", tostring(err))
  return payload
end

-- check_size(topic, payload [, extra]) -> true | nil, err: ThingsBoard counts topic, ids and
-- payload; extra: bytes a time added later may take
function M:check_size(topic, payload, extra)
  local size = #payload + #topic + 4 + (extra or 0)
  if size > self.payload_limit then
    return nil, string.format("payload too large: %d bytes (limit %d)", size, self.payload_limit)
  end
  return true
end

-- submit(topic, payload, kind, points [, stamp, extra]) -> true | nil, err: queue or send a
-- record. Telemetry without its own time carries stamp, the time of the call to add if it has
-- to wait (0: it would need one, but the clock was not synchronised), and extra, the bytes
-- that adds (the payload limit holds for the form that may go out).
function M:submit(topic, payload, kind, points, stamp, extra)
  local ok, err = self:check_size(topic, payload, extra)
  if not ok then return nil, err end
  self.seq = self.seq + 1
  local qos = self.config.qos or 1
  -- QoS 0 is at most once by the script's choice: online with nothing queued ahead it goes
  -- straight to the socket (the disk is for what has to wait)
  if qos == 0 and self.outbox:count() == 0 and self:send_now(topic, payload, kind, points) then return true end
  local rec = {topic = topic, payload = payload, qos = qos, seq = self.seq,
    kind = kind, points = points or 0, created = self.clock and self.clock() or nil,
    stamp = stamp, hold = self:flowing() and self.holds or nil}
  local dropped = self.outbox:push(rec)
  if dropped > 0 then
    self.stats.dropped = self.stats.dropped + dropped
    self:warn_dropped()
  end
  if self.outbox.durable and self.sched:current() then
    -- on disk before it is sent, one commit for all a handler sends in one run: the
    -- scheduler calls after_handler when the handler yields or ends
    self.commit_due = true
  else
    self:commit_and_flush()
  end
  return true
end

-- One warning at the first drop, then at most one summary per 10 s with the running total,
-- so a burst is reported whole without flooding the log.
function M:warn_dropped()
  if self.drop_summary then return end
  local function say()
    local b = self.outbox.max_bytes and string.format(", %d bytes", self.outbox.max_bytes) or ""
    self.log.warn("outbox full (limit %d records%s): dropped the oldest; %d dropped so far",
      self.outbox.limit, b, self.stats.dropped)
    self.warned_total = self.stats.dropped
  end
  say()
  self.drop_summary = self.sched:timer(10000, function()
    self.drop_summary = nil
    if self.stats.dropped > self.warned_total then say() end
  end, nil, nil, "outbox warning")
end

-- send_now(topic, payload, kind, points) -> true when a QoS 0 record went out at once
-- (online, not paced).
function M:send_now(topic, payload, kind, points)
  if not self.ready or self.flush_timer or self.closing or self.stop_seq then return false end
  -- the same pacing as flush (which then waits for the tokens this may have used up)
  if not self:pace(kind, points) then return false end
  if not self.conn:publish(topic, payload, 0) then return false end
  self.stats.sent = self.stats.sent + 1
  self.stats.acked = self.stats.acked + 1
  return true
end

-- pace(kind, points [, now]) -> true, or false and the ms to wait: one record within the
-- message, telemetry-message and data-point rate limits (each takes its tokens)
function M:pace(kind, points, now)
  local limiter, tele, dp = self.limiter, self.tele_limiter, self.dp_limiter
  if limiter.none and tele.none and not dp then return true end
  now = now or self.sched.now()
  local ok, wait = limiter:take(1, now)
  if ok and kind == "telemetry" then
    ok, wait = tele:take(1, now)
    if ok and dp then ok, wait = dp:take(points or 0, now) end
  end
  return ok, wait
end

-- commit_and_flush(): what the outbox holds goes to disk, then out as the window allows.
function M:commit_and_flush()
  self.commit_due = false
  self.outbox:commit()
  self:flush()
end

-- after_handler(): the scheduler's hook after every handler run (see submit).
function M:after_handler()
  if self.commit_due then self:commit_and_flush() end
end

function M:flush()
  if not self.ready or self.flush_timer or self.closing then return end
  local conn, outbox, now = self.conn, self.outbox, self.sched.now()
  -- a suspected record goes alone (tb.drops)
  local guard = self.drops
  if guard.probe and self.inflight_n == 0 then guard:before_flush(outbox:peek()) end
  local window = guard.probe and guard:window(self.window) or self.window
  local holds = self.holds
  while true do
    local rec = outbox:peek()
    if not rec then
      self.backlog = false
      break
    end
    if self.inflight_n >= window then return self:hold() end
    -- on the way out only what was already queued at the signal leaves
    if self.stop_seq and (rec.mem or not outbox.durable) and rec.seq > self.stop_seq then break end
    if self.stop_seq and outbox.durable and not rec.mem and rec.seq > self.stop_disk_seq then break end
    local ok, wait = self:pace(rec.kind, rec.points, now)
    if not ok then
      self:hold()
      self.flush_timer = self.sched:timer(wait, function()
        self.flush_timer = nil
        self:flush()
      end, nil, nil, "paced flush")
      return
    end
    local payload = rec.payload
    if rec.stamp and rec.hold ~= holds then payload = self:stamped(rec) end
    local mid, err = conn:publish(rec.topic, payload, rec.qos)
    if not mid then
      self.log.warn("publish failed: %s", err)
      return self:hold()
    end
    outbox:pop()
    rec.sent_at = now
    self.stats.sent = self.stats.sent + 1
    if rec.qos > 0 then
      self.inflight[mid] = rec
      self.inflight_n = self.inflight_n + 1
    else
      outbox:ack(rec)   -- QoS 0 gets no PUBACK: handed to the socket is as done as it gets
    end
  end
end

function M:on_puback(mid)
  local rec = self.inflight[mid]
  if rec then
    self.inflight[mid] = nil
    self.inflight_n = self.inflight_n - 1
    self.stats.acked = self.stats.acked + 1
    if self.drops.suspect then self.drops:acked(rec) end
    self.outbox:ack(rec)
    self:flush()
  end
end

-- publish_now(topic, payload [, paid]) -> true | nil, err: requests and responses that make
-- sense only on the current connection (they bypass the outbox). ThingsBoard counts them
-- against the device's message limits too, so each takes a token when one is there (the
-- outbox then waits for it); a caller that paces itself with take_token passes paid.
function M:publish_now(topic, payload, paid)
  if self.state ~= "online" then return nil, "not connected" end
  local ok, err = self:check_size(topic, payload)
  if not ok then return nil, err end
  local mid
  mid, err = self.conn:publish(topic, payload, 1)
  if not mid then return nil, err end
  if not paid then self.limiter:take(1, self.sched.now()) end
  return true
end

-- take_token() -> true | false, wait_ms: one publish within the message rate limits, for a
-- long run of requests (firmware chunks) that must wait rather than trip them
function M:take_token()
  return self.limiter:take(1, self.sched.now())
end

-------------------------------------------------------------------------------------------
-- requests from handlers

-- request_attributes(keys, timeout) -> {client=, shared=} | nil, err. keys: {client=, shared=}
function M:request_attributes(keys, timeout)
  local req = {}
  -- an empty list is left out, as if not given ("clientKeys":"" is not a key set ThingsBoard documents)
  if keys.client and #keys.client > 0 then req.clientKeys = table.concat(keys.client, ",") end
  if keys.shared and #keys.shared > 0 then req.sharedKeys = table.concat(keys.shared, ",") end
  local payload = assert(self.json_encode(req))
  local id = self:next_id()
  local ok, err = self:publish_now(T_ATTR_REQ .. id, payload)
  if not ok then return nil, err end
  local text
  text, err = self.sched:wait("attr:" .. id, timeout)
  if not text then return nil, err end
  local res, derr = self.json_decode(text)
  if type(res) ~= "table" then
    return nil, "malformed attribute response: " .. tostring(derr or text)
  end
  return {client = type(res.client) == "table" and res.client or {},
          shared = type(res.shared) == "table" and res.shared or {}}
end

-- rpc_call(method, params, timeout) -> result | nil, err
function M:rpc_call(method, params, timeout)
  local id = self:next_id()
  local req = {method = method, params = params}
  local payload, err = self.json_encode(req)
  if not payload then return nil, err end
  local topic = T_RPC_REQ .. id
  local ok
  ok, err = self:publish_now(topic, payload)
  if not ok then return nil, err end
  -- on a plain broker our own request comes back on the RPC subscription: recognise it
  self.own_requests[topic] = payload
  local text
  text, err = self.sched:wait("rpc:" .. id, timeout)
  self.own_requests[topic] = nil
  if not text then return nil, err end
  local res, derr = self.json_decode(text)
  if derr then return nil, "malformed RPC response: " .. derr end
  if type(res) == "table" and res.error ~= nil and next(res, next(res)) == nil and next(res) == "error" then
    return nil, tostring(res.error)
  end
  return res
end

-------------------------------------------------------------------------------------------
-- incoming messages

function M:dispatch_attributes(changes, deleted, why)
  for _, fn in ipairs(self.listeners.attributes) do fn(changes, deleted, why) end
  if next(changes) == nil and #deleted == 0 then return end
  local gen = self.generation()
  for _, fn in ipairs(gen.attr_handlers) do
    self.sched:spawn("attribute handler", {fn = fn, gen = gen}, changes, deleted)
  end
end

local function is_deleted_push(obj)
  local d = obj.deleted
  return type(d) == "table" and next(obj, next(obj)) == nil
end

function M:on_attribute_push(payload)
  local obj, err = self.json_decode(payload)
  if type(obj) ~= "table" or getmetatable(obj) == self.core.json_array_mt then
    self.log.warn("ignored malformed shared attribute push: %s", err or "not a JSON object")
    return
  end
  if is_deleted_push(obj) then
    local keys = {}
    for _, k in ipairs(obj.deleted) do
      if type(k) == "string" then keys[#keys + 1] = k end
    end
    self:dispatch_attributes({}, keys, "push")
  else
    self:dispatch_attributes(obj, {}, "push")
  end
end

function M:respond(id, value, is_error)
  local body
  if is_error then
    body = {error = value}
  else
    body = value
  end
  local topic = T_RPC_RES .. id
  local room = self.payload_limit - #topic - 4
  local payload, err, code = self.json_encode(body, room)
  if code == "too_large" then
    -- an answer the server would disconnect for: still answer, with what fits
    if is_error then
      self.log.warn("RPC %s: error text cut to fit the payload limit", id)
      payload = self.json_encode({error = logmod.printable(value, 1024)}, room)
    else
      err = string.format("result too large: over %d bytes (limit %d)", room, self.payload_limit)
    end
  end
  if not payload then
    self.log.error("RPC %s: cannot encode the result: %s", id, err)
    payload = assert(self.json_encode({error = "cannot encode result: " .. logmod.printable(err, 1024)}))
  end
  local ok
  ok, err = self:publish_now(topic, payload)
  if not ok then self.log.warn("RPC %s: response not sent: %s", id, err) end
end

function M:on_rpc_request(id, payload)
  local req, err = self.json_decode(payload)
  if type(req) ~= "table" or type(req.method) ~= "string" then
    self.log.warn("RPC %s: malformed request: %s", id, err or "no method")
    return self:respond(id, "malformed request: " .. (err or "no \"method\" string"), true)
  end
  local method, params = req.method, req.params
  if params == self.core.json_null then params = nil end
  local gen = self.generation()
  local fn = gen.rpc[method] or gen.rpc["*"]
  if not fn then
    self.log.warn("RPC %s: unknown method %q", id, method)
    return self:respond(id, "unknown method: " .. method, true)
  end
  self.log.debug("RPC %s: %s", id, method)
  self.sched:spawn("RPC " .. method, {
    fn = fn, gen = gen, answers_errors = true,
    on_done = function(...)
      local n = select("#", ...)
      local result, rerr = ...
      if n == 0 or (result == nil and rerr == nil) then return end   -- one-way: no response
      if result == nil then return self:respond(id, rerr, true) end  -- nil, err convention
      self:respond(id, result)
    end,
    on_error = function(e) self:respond(id, strip_position(e), true) end,
  }, params, id, method)
end

local RESPONSES = {
  {pattern = "^v1/devices/me/attributes/response/(%d+)$", key = "attr:", what = "attribute"},
  {pattern = "^v1/devices/me/rpc/response/(%d+)$", key = "rpc:", what = "RPC"},
}

function M:on_message(topic, payload)
  local b = topic:byte(1)
  if b == 118 then -- "v"
    if topic == T_ATTR then return self:on_attribute_push(payload) end
    local id = topic:match("^v1/devices/me/rpc/request/(%d+)$")
    if id then
      if self.own_requests[topic] == payload then return end
      return self:on_rpc_request(math.tointeger(tonumber(id)) or id, payload)
    end
    -- answers to our own requests wake the handler waiting under that id
    for _, r in ipairs(RESPONSES) do
      id = topic:match(r.pattern)
      if id then
        if not self.sched:wake(r.key .. id, payload) then self.log.debug("late %s response %s ignored", r.what, id) end
        return
      end
    end
  end
  for _, fn in ipairs(self.listeners.message) do
    if fn(topic, payload) then return end
  end
  self.log.debug("ignored message on unknown topic %s (%d bytes)", topic, #payload)
end

-- on_event(kind, conn_id, b, c, s1, s2): the loop's events for this session.
function M:on_event(kind, conn_id, b, c, s1, s2)
  if conn_id ~= self.conn_id then return end   -- a closed connection's leftovers
  if kind == "message" then
    self:on_message(s1, s2)
  elseif kind == "publish" then
    self:on_puback(b)
  elseif kind == "subscribe" then
    if c == 128 then self.log.warn("the server refused a subscription") end
    self.sched:wake("sub:" .. conn_id .. ":" .. b, c)
  elseif kind == "connect" then
    self:on_connack(b)
  elseif kind == "disconnect" then
    self:on_disconnect(conn_id, b, s1, s2)
  end
end

-------------------------------------------------------------------------------------------
-- shutdown

-- stop(deadline_ms): deliver what is in flight (and queued) until the deadline, then
-- disconnect cleanly. self.finished becomes true when done.
function M:stop(deadline_ms)
  if self.stopping then return end
  self.stopping = true
  if self.reconnect_timer then self.reconnect_timer:cancel(); self.reconnect_timer = nil end
  if not self.conn then
    self.finished = true
    return
  end
  local started = self.sched.now()
  self.stop_seq = self.seq
  self.stop_disk_seq = self.outbox.durable and (self.outbox.last_seq or 0) or 0
  local function check()
    if self.finished then return end
    local head = self.outbox:peek()
    local queued_before_stop = head and ((head.mem or not self.outbox.durable) and head.seq <= self.stop_seq
      or (self.outbox.durable and not head.mem and head.seq <= self.stop_disk_seq))
    local drained = self.inflight_n == 0 and (not queued_before_stop or not self.ready)
    if (drained and not (self.conn and self.conn:want_write())) or self.sched.now() - started >= deadline_ms then
      if not drained then
        self.log.warn("shutting down with %d records unacknowledged and %d queued",
          self.inflight_n, self.outbox:count())
      end
      self.closing = true
      if self.conn and self.state == "online" then
        self.conn:disconnect()
        -- the disconnect event ends it; if it never comes, give up shortly
        self.sched:timer(1000, function() self:drop_connection("shutdown") end, nil, nil, "shutdown")
      else
        self:drop_connection("shutdown")
      end
      return
    end
    self.sched:timer(20, check, nil, nil, "shutdown wait")
  end
  check()
end

return M
