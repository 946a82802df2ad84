-- tb.sqlite_outbox: the durable outbox, with the same interface as tb.memory_outbox (push,
-- peek, pop, ack, unshift, count, commit) over tb.core's SQLite store in the state directory.
-- A record stays on disk until the broker acknowledged it; after a restart what is left goes
-- out first, in order. Records after `cursor` are waiting; those up to it are in flight.
-- SQLite is for durability only: the records in hand are published from memory (`buffer`, a
-- window of at most BATCH waiting records, always the oldest ones), and read back from disk
-- only after a restart or when more than that waits (a backlog stays on disk, not in memory).
-- When the disk fails the records go to a memory outbox instead and the agent keeps going.
local memory = require "tb.memory_outbox"

local M = {}
M.__index = M

local BATCH = 256
-- Acknowledgements are not worth a disk write each: one lost in a crash only sends that record
-- again (QoS 1 is at least once anyway). They are committed with the next records, or when
-- ACK_COMMIT_N have gathered, or ACK_COMMIT_MS after the first of them (M:idle_commit_in).
local ACK_COMMIT_N, ACK_COMMIT_MS = 1024, 1000

-- open{core=, path=, limit=, max_bytes=, max_age_ms=, clock=fn, log=} -> store | nil, err
function M.open(o)
  local db, err = o.core.store_open(o.path)
  if not db then return nil, err end
  local limit, max_bytes = o.limit or 100000, o.max_bytes or 64 * 1024 * 1024
  local max_age_ms = o.max_age_ms or 7 * 86400000
  local self = setmetatable({db = db, log = o.log, clock = o.clock, limit = limit,
    max_bytes = max_bytes, max_age_ms = max_age_ms,
    cursor = 0, buffer = {}, head = 1, dropped = 0, expired = 0, durable = true, uncommitted = {},
    -- where records go when the disk fails, under the same bounds
    fallback = memory.new{limit = limit, max_bytes = max_bytes, max_age_ms = max_age_ms, clock = o.clock, log = o.log}}, M)
  local n, bytes, _, _, in_flight, newest = db:stats()
  self.n, self.bytes, self.pending, self.last_seq = n, bytes, n, newest
  self.sent_upto, self.sent_committed = 0, 0
  self.acked, self.first_ack_at = {}, nil
  self.possible_duplicates = in_flight
  if n > 0 then
    self.log.info("outbox: %d records kept from before the restart go out first%s", n,
      in_flight > 0 and string.format(" (%d were in flight: the server may receive those twice)", in_flight) or "")
  end
  self:expire()
  return self
end

function M:count()
  return self.pending + self.fallback:count()
end

-- push(rec) -> dropped_now
function M:push(rec)
  if not self.broken then
    local seq, err = self.db:push(rec.created or self.clock(), rec.topic, rec.payload, rec.qos, rec.kind, rec.points)
    if seq then
      rec.seq = seq
      self.last_seq = seq
      self.uncommitted[#self.uncommitted + 1] = rec
      -- kept in hand when every waiting record is (the window is the oldest ones, in order)
      local buffered = #self.buffer - self.head + 1
      if buffered == self.pending and buffered < BATCH then self.buffer[#self.buffer + 1] = rec end
      self.n, self.bytes, self.pending = self.n + 1, self.bytes + #rec.payload, self.pending + 1
      return self:enforce_bounds()
    end
    self.broken = true
    self.log.error("outbox on disk failed (%s): keeping new records in memory until restart", err)
  end
  rec.mem = true
  local dropped = self.fallback:push(rec)
  self.dropped = self.dropped + dropped
  return dropped
end

-- Drops the oldest waiting records while over the record or byte bound.
function M:enforce_bounds()
  local over = self.n - self.limit
  local dropped = 0
  if over > 0 then
    dropped = self:drop(over)
  end
  while self.bytes > self.max_bytes and self.pending > 0 do
    local avg = math.max(1, self.bytes // math.max(1, self.n))
    local n = self:drop(math.max(1, (self.bytes - self.max_bytes) // avg + 1))
    if n == 0 then break end
    dropped = dropped + n
  end
  return dropped
end

function M:drop(n)
  local dropped = self.db:drop_oldest(self.cursor, n) or 0
  if dropped > 0 then
    self:recount()
    self.dropped = self.dropped + dropped
  end
  return dropped
end

function M:recount()
  self:delete_acked()   -- so the counts read from disk are the records still waiting or in flight
  self.buffer, self.head = {}, 1
  local n, bytes = self.db:stats()
  local in_flight = self.n - self.pending
  self.n, self.bytes = n, bytes
  self.pending = math.max(0, n - in_flight)
end

-- expire(): drops records older than max_age (called at open and from time to time).
function M:expire()
  self.fallback:expire()
  local n = self.db:drop_before(self.clock() - self.max_age_ms) or 0
  if n > 0 then
    self.expired = self.expired + n
    self:recount()
    self.log.warn("outbox: dropped %d records older than %d s", n, self.max_age_ms // 1000)
  end
  return n
end

function M:peek()
  local rec = self.buffer[self.head]
  if rec then return rec end
  if self.pending > 0 then
    self.buffer, self.head = self.db:next(self.cursor, BATCH) or {}, 1
    rec = self.buffer[1]
    if rec then return rec end
  end
  return self.fallback:peek()
end

function M:pop()
  local rec = self.buffer[self.head] or self:peek()
  if rec and not rec.mem then
    self.buffer[self.head] = nil
    self.head = self.head + 1
    self.cursor = rec.seq
    if rec.seq > self.sent_upto then self.sent_upto = rec.seq end
    self.pending = self.pending - 1
    if self.head > #self.buffer then self.buffer, self.head = {}, 1 end
    return rec
  end
  return self.fallback:pop()
end

-- ack(rec): the broker has it; it leaves the disk.
function M:ack(rec)
  if rec.mem then return end
  local acked = self.acked
  acked[#acked + 1] = rec.seq
  self.n, self.bytes = self.n - 1, self.bytes - #rec.payload
  self.first_ack_at = self.first_ack_at or self.clock()
end

-- delete_acked(): the gathered acknowledgements leave the disk (in the open batch), one
-- statement per run of consecutive seqs
function M:delete_acked()
  local acked = self.acked
  if #acked == 0 then return end
  self.acked, self.first_ack_at = {}, nil
  table.sort(acked)
  local first, last = acked[1], acked[1]
  for i = 2, #acked + 1 do
    local seq = acked[i]
    if seq ~= last + 1 then
      local ok, err = self.db:ack(first, last)
      if not ok then self.log.warn("outbox: %s (those records may be sent again)", err) end
      first = seq
    end
    last = seq
  end
end

-- idle_commit_in() -> ms until gathered acknowledgements are due on disk, or nil (the loop
-- waits no longer than that, then calls commit)
function M:idle_commit_in()
  if #self.acked == 0 or self.broken then return nil end
  return math.max(0, self.first_ack_at + ACK_COMMIT_MS - self.clock())
end

-- unshift(records): in-flight records go back in front (the connection dropped).
function M:unshift(records)
  local mem, lowest = {}, nil
  for _, rec in ipairs(records) do
    if rec.mem then mem[#mem + 1] = rec
    elseif not lowest or rec.seq < lowest then lowest = rec.seq end
  end
  local dropped = 0
  if #mem > 0 then dropped = self.fallback:unshift(mem) end
  if lowest and lowest <= self.cursor then
    -- the records in hand go back in front of the window, which stays the oldest waiting ones
    -- (what was acknowledged in between has left the disk too)
    local back = {}
    for _, rec in ipairs(records) do if not rec.mem then back[#back + 1] = rec end end
    for i = self.head, #self.buffer do back[#back + 1] = self.buffer[i] end
    self.buffer, self.head = back, 1
    self.cursor = lowest - 1
    self.pending = self.pending + (#records - #mem)
  end
  return dropped
end

-- commit([all]) -> true | nil, err: puts the records pushed since the last commit on disk,
-- with the acks and the sent mark (tb.session commits when a handler yields or ends, the loop
-- once per iteration). Acks alone wait (ACK_COMMIT_N, ACK_COMMIT_MS) unless all is true.
-- When the disk fails, those records stay in memory and so does all that follows, until a
-- restart.
function M:commit(all)
  if self.broken then return true end
  local acks = #self.acked
  if #self.uncommitted == 0 and not all then
    if acks == 0 then return true end
    if acks < ACK_COMMIT_N and self.clock() - self.first_ack_at < ACK_COMMIT_MS then return true end
  end
  self:delete_acked()
  -- how far records were handed to the connection: after a crash, those still on disk up to
  -- there may reach the server twice (one number per commit, not a mark per record)
  local sent = self.sent_upto > self.sent_committed and self.sent_upto or nil
  local ok, err = self.db:commit(sent)
  if ok and sent then self.sent_committed = sent end
  local batch = self.uncommitted
  self.uncommitted = {}
  if ok then return true end
  self.broken = true
  self.log.error("outbox on disk failed (%s): keeping new records in memory until restart", err)
  self:recount()
  for _, rec in ipairs(batch) do
    if rec.seq > self.cursor then   -- not yet handed to the connection
      rec.mem = true
      self.dropped = self.dropped + self.fallback:push(rec)
    end
  end
  return nil, err
end

function M:close()
  self:commit(true)
  self.db:close()
end

return M
