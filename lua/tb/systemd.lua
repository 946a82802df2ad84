-- tb.systemd: what the agent tells a service manager (sd_notify(3), sent by core.notify) when
-- it runs under one (Type=notify): READY=1 once the script is loaded, WATCHDOG=1 from the
-- loop at half the interval systemd asks for ($WATCHDOG_USEC, WatchdogSec=), so a stuck loop
-- is restarted; STATUS= with tb.status's one-line summary whenever the status file is
-- written and the line changed; STOPPING=1 when the agent begins to shut down. Without
-- $NOTIFY_SOCKET it sends nothing.
local status_mod = require "tb.status"

local M = {}
M.__index = M

-- watchdog_ms(getenv, pid) -> the interval to send WATCHDOG=1 at, or nil: half of
-- $WATCHDOG_USEC, when $WATCHDOG_PID is unset or names this process
function M.watchdog_ms(getenv, pid)
  local usec = math.tointeger(tonumber(getenv("WATCHDOG_USEC") or ""))
  if not usec or usec <= 0 then return nil end
  local for_pid = getenv("WATCHDOG_PID")
  if for_pid and for_pid ~= "" and tonumber(for_pid) ~= pid then return nil end
  return math.max(1, usec // 2000)
end

-- start(ctx, status [, getenv]) -> notifier | nil (no service manager). status: tb.status's
-- writer, whose writes carry the STATUS= line.
function M.start(ctx, status, getenv)
  getenv = getenv or os.getenv
  local socket = getenv("NOTIFY_SOCKET")
  if not socket or socket == "" then return nil end
  local self = setmetatable({core = ctx.core, log = ctx.log, socket = socket}, M)
  local first = status:snapshot()
  self.last_status = status_mod.summary(first)
  self:send("READY=1\nSTATUS=" .. self.last_status)
  local every = M.watchdog_ms(getenv, status.pid)
  if every then
    self:send("WATCHDOG=1")
    self.watchdog = ctx.sched:timer(every, function() self:send("WATCHDOG=1") end, every, nil, "watchdog")
    ctx.log.debug("systemd watchdog: WATCHDOG=1 every %d ms", every)
  end
  status.on_write[#status.on_write + 1] = function(snap) self:on_status(snap) end
  return self
end

-- send(text): one notification; a failure is logged once (systemd then times the start out
-- or the watchdog fires, and the log says why)
function M:send(text)
  local ok, err = self.core.notify(text, self.socket)
  if ok == nil and not self.failed then
    self.failed = true
    self.log.warn("cannot notify the service manager: %s", err)
  end
end

function M:on_status(snap)
  if (snap.state == "stopping" or snap.state == "stopped") and not self.stopping then
    self.stopping = true
    self:send("STOPPING=1")   -- the watchdog goes on: a drain that hangs is still caught
  end
  local line = status_mod.summary(snap)
  if line ~= self.last_status then
    self.last_status = line
    self:send("STATUS=" .. line)
  end
end

return M
