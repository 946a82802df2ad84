-- tb.drops: what a dropped connection says, for one MQTT session (the device's; the gateway's
-- sub-devices will each have their own). Two readings:
-- - a poison record: ThingsBoard closes the connection on a payload it cannot take (a rate
--   limit aside), so such a record would be sent again after every reconnect and block all
--   behind it. When the same record heads the in-flight window at drops in a row of sessions
--   shorter than STABLE_MS, the next session sends it alone (the probe) before anything else;
--   only when the connection drops again with it alone in flight, within PROBE_MS of sending it,
--   is it set aside: written to <state-dir>/set-aside.jsonl with an error log line. A link that
--   merely flaps (or another client kicking this one) cannot make a healthy record disappear.
-- - a flapping session: a server that keeps closing a freshly accepted session usually means a
--   second client uses the same credentials (ThingsBoard keeps one session per device and
--   closes the older: docs/thingsboard.md §0.9); one warning says so.
local M = {}
M.__index = M

M.STABLE_MS = 10000        -- a session that lasts this long is healthy (and resets the backoff)
local PROBE_MS = 2000      -- a drop this soon after the suspect went alone blames it
local FLAP_WINDOW_MS = 120000
local FLAP_COUNT = 3

-- new{now=fn, log=, limit=drops that set a record aside (3), keep=fn(rec) -> text for the log}
function M.new(o)
  return setmetatable({now = o.now, log = o.log, limit = o.limit or 3, keep = o.keep,
    suspect = nil, hits = 0, probe = nil, short_sessions = {}, flap_warned = false}, M)
end

-- clear(): no record is suspected any more; the window is whole again
function M:clear()
  self.suspect, self.hits, self.probe = nil, 0, nil
end

-- window(n) -> how many records may be in flight: 1 while a suspect goes alone, else n
function M:window(n)
  return self.probe and 1 or n
end

-- before_flush(head): with nothing in flight, a probe whose record left the outbox otherwise
-- (dropped by its bounds, expired) no longer suspects anything
function M:before_flush(head)
  if self.probe and (not head or head.seq ~= self.probe) then self:clear() end
end

-- acked(rec): the server took rec, so it is not poison
function M:acked(rec)
  if self.suspect == rec.seq then self:clear() end
end

-- on_drop(back, was_online, lasted_ms) -> the record to set aside, or nil. back: the
-- unacknowledged records in their order (back[1] heads the window).
function M:on_drop(back, was_online, lasted)
  local head = back[1]
  if not (was_online and head and lasted < M.STABLE_MS) then
    self:clear()
    return nil
  end
  -- while probing, a drop counts only when the suspect was alone in flight and the server
  -- closed soon after it arrived (ThingsBoard closes as it parses the payload)
  if self.probe and not (#back == 1 and head.seq == self.probe and self.now() - (head.sent_at or 0) <= PROBE_MS) then
    return nil
  end
  if self.suspect == head.seq then   -- by seq: a durable outbox reads records back as new tables
    self.hits = self.hits + 1
  else
    self.suspect, self.hits = head.seq, 1
  end
  if self.hits < self.limit then
    if self.hits == self.limit - 1 then self.probe = head.seq end
    return nil
  end
  self.log.error("set aside a %s record of %d bytes: the server closed the connection %d times while it was in flight, " ..
    "the last time alone (%s)%s", head.kind or "queued", #head.payload, self.hits, head.payload:sub(1, 120),
    self.keep and self.keep(head) or "")
  self:clear()
  return head
end

-- session_ended(lasted_ms) -> true when the session was stable
function M:session_ended(lasted)
  local now = self.now()
  if lasted >= M.STABLE_MS then
    self.short_sessions, self.flap_warned = {}, false
    return true
  end
  local kept = {}
  for _, t in ipairs(self.short_sessions) do
    if now - t <= FLAP_WINDOW_MS then kept[#kept + 1] = t end
  end
  kept[#kept + 1] = now
  self.short_sessions = kept
  if #kept >= FLAP_COUNT and not self.flap_warned then
    self.flap_warned = true
    self.log.warn("the server closed %d sessions within %d s of accepting them: another device or agent is " ..
      "probably using the same credentials (ThingsBoard keeps one session per device and closes the older); " ..
      "backing off", #kept, FLAP_WINDOW_MS // 1000)
  end
  return false
end

-- keep_in_file(path, rec, encode, mkdirs, clock) -> text for the log line: where the record was
-- kept (one JSON line appended), or why not
function M.keep_in_file(dir, rec, encode, mkdirs, clock)
  local path = dir .. "/set-aside.jsonl"
  local line, err = encode({at = clock and clock() or nil, topic = rec.topic, kind = rec.kind, payload = rec.payload})
  if not line then return "; not kept: " .. tostring(err) end
  local f
  f, err = mkdirs(dir, 448)
  if f then f, err = io.open(path, "a") end
  if f then
    local ok, werr = f:write(line, "\n")
    f:close()
    if ok then return "; kept in " .. path end
    err = werr
  end
  return "; could not keep it in " .. path .. ": " .. tostring(err)
end

return M
