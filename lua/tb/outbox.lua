-- tb.outbox: the bounded in-memory store of records waiting to be published. The session
-- only uses push/peek/pop/unshift/count, so a durable store can replace this one.
-- When full, the oldest records are dropped and counted (the newest data matters most).
local M = {}
M.__index = M

-- new{limit=10000} -> outbox
function M.new(opts)
  return setmetatable({first = 1, last = 0, items = {}, limit = opts and opts.limit or 10000,
    dropped = 0, bytes = 0}, M)
end

function M:count()
  return self.last - self.first + 1
end

-- push(record) -> dropped_now: appends; drops the oldest when over the limit.
function M:push(rec)
  self.last = self.last + 1
  self.items[self.last] = rec
  self.bytes = self.bytes + #rec.payload
  local dropped = 0
  while self:count() > self.limit do
    self:pop()
    dropped = dropped + 1
  end
  self.dropped = self.dropped + dropped
  return dropped
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

-- unshift(records): puts records back at the front, keeping their order (records[1] first).
-- Used when a connection drops with records in flight: they go out again first.
-- Returns how many records it had to drop to stay within the limit.
function M:unshift(records)
  for i = #records, 1, -1 do
    self.first = self.first - 1
    self.items[self.first] = records[i]
    self.bytes = self.bytes + #records[i].payload
  end
  local dropped = 0
  while self:count() > self.limit do
    -- a full outbox still loses the oldest, even when they were just put back
    self:pop()
    dropped = dropped + 1
  end
  self.dropped = self.dropped + dropped
  return dropped
end

return M
