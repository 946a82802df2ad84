-- tb.memory_outbox: the bounded in-memory outbox of records waiting to be published. The session
-- only uses push/peek/pop/unshift/count, so tb.sqlite_outbox can replace this one.
-- When full (records or payload bytes), the oldest records are dropped and counted (the
-- newest data matters most); expire() drops those older than max_age_ms.
local M = {}
M.__index = M

-- new{limit=10000, max_bytes=nil, max_age_ms=nil, clock=fn, log=} -> outbox
function M.new(opts)
  opts = opts or {}
  return setmetatable({first = 1, last = 0, items = {}, limit = opts.limit or 10000,
    max_bytes = opts.max_bytes, max_age_ms = opts.max_age_ms, clock = opts.clock, log = opts.log,
    dropped = 0, expired = 0, bytes = 0}, M)
end

-- Drops the oldest while over the record or byte bound; returns how many.
function M:enforce_bounds()
  local dropped = 0
  while self:count() > self.limit or (self.max_bytes and self.bytes > self.max_bytes and self:count() > 0) do
    self:pop()
    dropped = dropped + 1
  end
  self.dropped = self.dropped + dropped
  return dropped
end

-- expire() -> n: drops the records that waited longer than max_age_ms.
function M:expire()
  if not (self.max_age_ms and self.clock) then return 0 end
  local before, n = self.clock() - self.max_age_ms, 0
  while self.first <= self.last and (self.items[self.first].created or before) < before do
    self:pop()
    n = n + 1
  end
  if n > 0 then
    self.expired = self.expired + n
    if self.log then self.log.warn("outbox: dropped %d records older than %d s", n, self.max_age_ms // 1000) end
  end
  return n
end

function M:count()
  return self.last - self.first + 1
end

-- push(record) -> dropped_now: appends; drops the oldest when over the limit.
function M:push(rec)
  self.last = self.last + 1
  self.items[self.last] = rec
  self.bytes = self.bytes + #rec.payload
  return self:enforce_bounds()
end

function M:peek()
  return self.items[self.first]
end

function M:pop()
  if self.first > self.last then return nil end
  local rec = self.items[self.first]
  self.items[self.first] = nil
  self.first = self.first + 1
  self.bytes = self.bytes - #rec.payload
  if self.first > self.last then self.first, self.last = 1, 0 end
  return rec
end

-- ack(rec) / commit() / close(): nothing to do in memory (a popped record is already gone).
function M:ack() end
function M:commit() end
function M:close() end
function M.idle_commit_in() return nil end

-- unshift(records): puts records back at the front, keeping their order (records[1] first).
-- Used when a connection drops with records in flight: they go out again first.
-- Returns how many records it had to drop to stay within the limit.
function M:unshift(records)
  for i = #records, 1, -1 do
    self.first = self.first - 1
    self.items[self.first] = records[i]
    self.bytes = self.bytes + #records[i].payload
  end
  -- a full outbox still loses the oldest, even when they were just put back
  return self:enforce_bounds()
end

return M
