-- tb.status: what the running agent is doing, for `tbagent status`. The agent keeps a small
-- JSON file in its state directory (status.json), replaced atomically every PERIOD_MS and
-- within MIN_GAP_MS of each change (connected or offline, the script's generation, an update's
-- state, shutting down, a new error), so a reader needs no socket into the agent. The reader
-- tells a running agent from a dead one by the pid in the file and that process's start time
-- (/proc/PID/stat), so a pid reused by another process does not pass for the agent.
-- The file holds no secret: credentials appear as their kind, every text through core.mask.
local printable = require("tb.log").printable

local M = {}
M.__index = M

M.FILE = "status.json"
M.PERIOD_MS = 15000
M.MIN_GAP_MS = 1000
local TEXT_MAX = 500

-- process(pid) -> the process's start time (clock ticks since boot, field 22 of
-- /proc/PID/stat) as a string, or nil when there is no such process
local function process_start(pid)
  local f = io.open("/proc/" .. tostring(pid) .. "/stat", "r")
  if not f then return nil end
  local line = f:read("l")
  f:close()
  -- field 2 (the command name, in parentheses) may hold spaces: count from the last ')'
  local rest = line and line:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  local field = 2
  for value in rest:gmatch("%S+") do
    field = field + 1
    if field == 22 then return value end
  end
  return nil
end
M.process_start = process_start

-- own_pid() -> the pid of this process (the one that reads /proc/self)
local function own_pid()
  local f = io.open("/proc/self/stat", "r")
  if not f then return nil end
  local pid = math.tointeger(tonumber((f:read("l") or ""):match("^(%d+)")))
  f:close()
  return pid
end
M.own_pid = own_pid

local function credentials_kind(c)
  if c.token then return "access token" end
  if c.username or c.client_id then return "MQTT basic" end
  if c.cert then return "X.509 certificate" end
  return "none"
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local pwd = os.getenv("PWD")
  return pwd and (pwd .. "/" .. path:gsub("^%./", "")) or path
end

-------------------------------------------------------------------------------------------
-- the writer, in the running agent

-- start(ctx) -> status: ctx from tb.agent.build, with the script's first version committed.
-- Writes the file at once; tb.agent calls status:tick() after every turn of its loop and
-- status:stopped(code, message) at exit.
function M.start(ctx)
  local core, session = ctx.core, ctx.session
  local self = setmetatable({
    ctx = ctx, core = core, session = session, now = ctx.sched.now, clock = ctx.clock,
    path = ctx.config.state_dir .. "/" .. M.FILE, script = absolute(ctx.config.script),
    pid = own_pid(), on_write = {}, pending = true, last_write = nil,
  }, M)
  self.proc_start = self.pid and process_start(self.pid)
  self.started = self.clock()
  self.offline_since = self.started
  session.listeners.disconnect[#session.listeners.disconnect + 1] = function(why)
    self.offline_reason = core.mask(printable(why or "disconnected", TEXT_MAX))
    if self.connected then self.offline_since, self.connected = self.clock(), false end
    self.pending = true
  end
  if ctx.log.taps then
    table.insert(ctx.log.taps, function(level, message)
      if level ~= "warn" and level ~= "error" then return end
      self.last_error = {at = self.clock(), level = level, message = core.mask(printable(message, TEXT_MAX))}
      self.pending = true
    end)
  end
  -- the periodic write also needs the loop to wake when nothing else happens
  self.timer = ctx.sched:timer(M.PERIOD_MS, function() end, M.PERIOD_MS, nil, "status file")
  self:tick()
  return self
end

-- observe() -> true when something the file shows has changed since the last look
function M:observe()
  local session, ctx = self.session, self.ctx
  local changed = false
  local connected = session.state == "online"
  if connected ~= self.connected then
    if connected then
      self.connected_since, self.offline_reason = self.clock(), nil
    elseif self.connected then
      self.offline_since = self.clock()
    end
    self.connected = connected
    changed = true
  end
  if session.state ~= self.session_state or session.stopping ~= self.stopping
    or ctx.current ~= self.generation then
    self.session_state, self.stopping, self.generation = session.state, session.stopping, ctx.current
    changed = true
  end
  for _, u in ipairs({ctx.firmware, ctx.software}) do
    if u and (u.state ~= u.status_seen or u.job ~= u.status_job) then
      u.status_seen, u.status_job = u.state, u.job
      changed = true
    end
  end
  return changed
end

local function package_state(u)
  if not u or not u.policy() then return nil end
  local cur = u:current()
  local p = {current = {title = cur.title, version = cur.version}, state = u.state, error = u.error}
  if u.job and u.job.info then p.target = {title = u.job.info.title, version = u.job.info.version} end
  return p
end

-- snapshot() -> the table status.json holds
function M:snapshot()
  local ctx, session, c = self.ctx, self.session, self.ctx.config
  local gen, reloader = ctx.current, ctx.reloader
  local state = self.exit and "stopped" or session.stopping and "stopping"
    or session.state == "online" and "connected" or session.state
  local s = {
    agent = "tbagent", version = self.core.version, pid = self.pid, proc_start = self.proc_start,
    started = self.started, updated = self.clock(), state = state,
    connected = session.state == "online" and not self.exit,
    since = session.state == "online" and self.connected_since or self.offline_since,
    server = {host = c.host, port = c.port, tls = c.tls and true or false},
    credentials = credentials_kind(c),
    outbox = {backlog = session.outbox:count(), in_flight = session.inflight_n,
      durable = session.outbox.durable and true or false},
    messages = {sent = session.stats.sent, acknowledged = session.stats.acked,
      dropped = session.stats.dropped, set_aside = session.stats.set_aside,
      reconnects = session.stats.reconnects},
    script = {path = self.script, generation = gen.id, version = gen.version,
      reloads = reloader and reloader.reloads or 0, rejected = reloader and reloader.rejected or 0},
    firmware = package_state(ctx.firmware), software = package_state(ctx.software),
    last_error = self.last_error, exit = self.exit,
  }
  if not s.connected then s.reason = self.offline_reason end
  return s
end

-- write(): status.json now (a failure is logged once, then again only after a success)
function M:write()
  local snap = self:snapshot()
  self.pending, self.last_write = false, self.now()
  local text, err = self.core.json_encode(snap)
  local ok
  if text then ok, err = self.core.write_private(self.path, text .. "\n") end
  if not ok and not self.write_failed then
    self.write_failed = true
    self.ctx.log.warn("status file %s not written (tbagent status cannot see this agent): %s", self.path, err)
  elseif ok then
    self.write_failed = false
  end
  for _, fn in ipairs(self.on_write) do fn(snap) end
end

-- tick(): after every turn of the loop: the file is rewritten when something changed (at
-- most once per MIN_GAP_MS) and every PERIOD_MS
function M:tick()
  if self:observe() then self.pending = true end
  local now = self.now()
  local since = self.last_write and now - self.last_write
  if not since or since >= M.PERIOD_MS or (self.pending and since >= M.MIN_GAP_MS) then
    return self:write()
  end
  if self.pending and not self.gap_timer then
    self.gap_timer = self.ctx.sched:timer(M.MIN_GAP_MS - since, function() self.gap_timer = nil end,
      nil, nil, "status file")
  end
end

-- stopped(code, message): the last write, as the agent exits
function M:stopped(code, message)
  self.exit = {code = code, message = message and self.core.mask(printable(message, TEXT_MAX)) or nil}
  self.offline_since = self.connected and self.clock() or self.offline_since
  if self.timer then self.timer:cancel() end
  if self.gap_timer then self.gap_timer:cancel() end
  self:write()
end

-------------------------------------------------------------------------------------------
-- the reader: `tbagent status`

-- read(dir, decode) -> snapshot | nil, err, code ("missing" | "unreadable" | "malformed")
function M.read(dir, decode)
  local path = dir .. "/" .. M.FILE
  local f, err, errno = io.open(path, "rb")
  if not f then
    if errno == 2 then return nil, "no " .. path .. ": no agent has run with this state directory", "missing" end
    return nil, "cannot read " .. err, "unreadable"
  end
  local text = f:read("a")
  f:close()
  local snap = decode(text or "")
  if type(snap) ~= "table" or snap.agent ~= "tbagent" then
    return nil, path .. " is not a tbagent status file", "malformed"
  end
  return snap
end

-- running(snap) -> true when the agent that wrote snap is alive
function M.running(snap)
  if snap.state == "stopped" or math.type(snap.pid) ~= "integer" then return false end
  local started = process_start(snap.pid)
  if not started then return false end
  return snap.proc_start == nil or started == snap.proc_start
end

-- exit_code(snap, running) -> 0 connected, 1 running but offline, 3 not running
function M.exit_code(snap, running)
  if not running then return 3 end
  return snap.connected and 0 or 1
end

local function duration(ms)
  local s = math.max(0, (ms or 0) // 1000)
  if s < 60 then return string.format("%ds", s) end
  if s < 3600 then return string.format("%dm%02ds", s // 60, s % 60) end
  if s < 86400 then return string.format("%dh%02dm", s // 3600, s % 3600 // 60) end
  return string.format("%dd%02dh", s // 86400, s % 86400 // 3600)
end

local function when(ms)
  if math.type(ms) ~= "integer" then return "?" end
  return os.date("!%Y-%m-%dT%H:%M:%SZ", ms // 1000)
end

local function package_line(p, name)
  if not p then return "no tb." .. name .. " in the script" end
  local cur = p.current or {}
  local line = (cur.title or cur.version) and string.format("%s %s", cur.title or "?", cur.version or "?")
    or "current version unknown"
  if p.state then
    local target = p.target and string.format(" %s %s", p.target.title or "?", p.target.version or "?") or ""
    line = line .. string.format("; last update %s%s", p.state, target)
    if p.error then line = line .. ": " .. p.error end
  end
  return line
end

-- summary(snap) -> one line: the state, the backlog (systemd's STATUS= shows it too)
function M.summary(snap)
  local head
  if snap.state == "connected" then
    head = string.format("connected to %s:%s", snap.server.host, snap.server.port)
  elseif snap.state == "stopped" then
    head = "stopped" .. (snap.exit and snap.exit.message and (": " .. snap.exit.message) or "")
  else
    head = snap.state .. (snap.reason and (": " .. snap.reason) or "")
  end
  return string.format("%s; backlog %d, in flight %d", head, snap.outbox.backlog, snap.outbox.in_flight)
end

-- format(snap, running, dir, now_ms) -> the text `tbagent status` prints
function M.format(snap, running, dir, now)
  local lines = {}
  local function add(label, fmt, ...) lines[#lines + 1] = string.format("  %-12s " .. fmt, label, ...) end
  local head
  if not running then
    head = snap.state == "stopped"
      and string.format("not running (stopped %s, exit status %s)", when(snap.updated), snap.exit and snap.exit.code or "?")
      or string.format("not running (pid %s is gone; last status written %s)", snap.pid, when(snap.updated))
  elseif snap.connected then
    head = string.format("connected since %s (%s)", when(snap.since), duration(now - snap.since))
  else
    head = string.format("%s since %s (%s)%s", snap.state, when(snap.since), duration(now - snap.since),
      snap.reason and (": " .. snap.reason) or "")
  end
  lines[1] = string.format("tbagent %s on %s: %s", snap.version or "?", dir, head)
  if running then
    add("pid", "%s, up %s (since %s)", snap.pid, duration(now - snap.started), when(snap.started))
  elseif snap.exit and snap.exit.message then
    add("exit", "%s", snap.exit.message)
  end
  local srv = snap.server or {}
  add("server", "%s:%s%s", srv.host, srv.port, srv.tls and " (TLS)" or "")
  add("credentials", "%s", snap.credentials)
  local box = snap.outbox or {}
  add("outbox", "%d queued, %d in flight (%s)", box.backlog or 0, box.in_flight or 0,
    box.durable and "on disk" or "in memory")
  local m = snap.messages or {}
  add("messages", "%d sent, %d acknowledged, %d dropped, %d reconnects", m.sent or 0,
    m.acknowledged or 0, m.dropped or 0, m.reconnects or 0)
  local sc = snap.script or {}
  add("script", "%s, generation %s%s (%d reloads, %d rejected)", sc.path, sc.generation,
    sc.version and (", version " .. sc.version) or "", sc.reloads or 0, sc.rejected or 0)
  add("firmware", "%s", package_line(snap.firmware, "firmware"))
  add("software", "%s", package_line(snap.software, "software"))
  local e = snap.last_error
  add("last error", "%s", e and string.format("%s %s", when(e.at), e.message) or "none")
  add("status file", "written %s ago", duration(now - (snap.updated or now)))
  return table.concat(lines, "\n") .. "\n"
end

-- command(dir, json, core) -> exit status: `tbagent status`
function M.command(dir, json, core)
  local snap, err, code = M.read(dir, core.json_decode)
  if not snap then
    io.stderr:write("tbagent: ", err, "\n")
    -- not running unless the file exists and cannot be read (LSB: 4, status unknown)
    return code == "unreadable" and 4 or 3
  end
  local running = M.running(snap)
  local status = M.exit_code(snap, running)
  local now = core.wall()
  if json then
    snap.running, snap.state = running, running and snap.state or (snap.state == "stopped" and "stopped" or "not running")
    snap.connected = running and snap.connected or false
    snap.uptime_s = running and (now - snap.started) // 1000 or nil
    io.stdout:write(assert(core.json_encode(snap)), "\n")
  else
    io.stdout:write(M.format(snap, running, dir, now))
  end
  return status
end

return M
