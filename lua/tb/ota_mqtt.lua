-- tb.ota_mqtt: an OTA package's image fetched over MQTT in chunks (docs/thingsboard.md §7):
-- requests on v2/{fw|sw}/request/{reqId}/chunk/{idx} with the chunk size as payload, answers on
-- v2/{fw|sw}/response/{reqId}/chunk/{idx}, several in flight, each checked against
-- min(chunk_size, size - offset). The bytes stream into the job's .part file through a sink
-- that computes the checksum on the way; a partial file is resumed at a chunk boundary.
-- ThingsBoard reports the errors of firmware and software downloads alike on v2/fw/error, so
-- the downloads of all updaters run one at a time under one lock, and an error belongs to the
-- download holding it.
--
-- new_lock(ctx) -> lock: made once per agent; it listens on v2/fw/error.
-- new(ctx, kind, lock) -> transfer for "fw" or "sw" packages, listening on its chunk topic:
--   transfer:download(job) -> hex, size | nil, err   (the transfer interface of tb.ota)
--   transfer:stop(job)      the job's download ends: file closed, lock released (idempotent)
local printable = require("tb.log").printable

local M = {}
local Transfer = {}
Transfer.__index = Transfer

local TEXT_MAX = 256   -- the server's error text, as kept and logged

-- a download (one per transfer at a time): {job=, sink=, req_id=, next_idx=, chunks=,
-- in_flight=, short=, error=, done=}. It holds the lock, or waits in the lock's queue.
local function gone(run)
  return run.done or run.job.cancelled or run.job.finished
end

function M.new_lock(ctx)
  local lock = {owner = nil, queue = {}}
  local l = ctx.session.listeners
  l.subscriptions[#l.subscriptions + 1] = "v2/fw/error"
  l.message[#l.message + 1] = function(topic, payload)
    if topic ~= "v2/fw/error" then return false end
    if lock.owner and gone(lock.owner) then lock.owner = nil end
    local run = lock.owner
    if run then
      run.error = payload ~= "" and printable(payload, TEXT_MAX) or "error"
      ctx.sched:wake(run.job.key, "error")
    else
      ctx.log.warn("server OTA error with no MQTT download running: %s", printable(payload, TEXT_MAX))
    end
    return true
  end
  return lock
end

function M.new(ctx, kind, lock)
  local self = setmetatable({kind = kind, lock = lock, session = ctx.session, sched = ctx.sched,
    log = ctx.log, core = ctx.core, config = ctx.config, run = nil}, Transfer)
  local l = ctx.session.listeners
  l.subscriptions[#l.subscriptions + 1] = "v2/" .. kind .. "/response/+/chunk/+"
  l.message[#l.message + 1] = function(topic, payload) return self:on_chunk(topic, payload) end
  return self
end

-- on_chunk(topic, payload) -> true if the topic is this kind's chunk answer
function Transfer:on_chunk(topic, payload)
  local kind, req, idx = topic:match("^v2/(%a%a)/response/(%d+)/chunk/(%d+)$")
  if kind ~= self.kind then return false end
  local run = self.run
  if run and run.req_id == tonumber(req) then
    run.chunks[tonumber(idx)] = payload
    self.sched:wake(run.job.key, "chunk")
  end
  return true
end

-- acquire(run) -> true once run holds the lock; false if its job was cancelled meanwhile
function Transfer:acquire(run)
  local lock, job = self.lock, run.job
  if lock.owner and gone(lock.owner) then lock.owner = nil end
  if not lock.owner and #lock.queue == 0 then
    lock.owner = run
    return true
  end
  lock.queue[#lock.queue + 1] = run
  self.log.info("%s download waits for the %s download to end (one MQTT download at a time)",
    job.label, lock.owner and lock.owner.job.label or "other")
  while true do
    self.sched:wait(job.key, 5000)
    if job.cancelled then return false end
    if lock.owner and gone(lock.owner) then lock.owner = nil end
    while lock.queue[1] and gone(lock.queue[1]) do table.remove(lock.queue, 1) end
    if not lock.owner and lock.queue[1] == run then
      table.remove(lock.queue, 1)
      lock.owner = run
      self.log.info("%s download starts", job.label)
      return true
    end
  end
end

-- release(run): run no longer downloads; the next waiter is woken (from the loop)
function Transfer:release(run)
  local lock = self.lock
  for i = #lock.queue, 1, -1 do
    if lock.queue[i] == run then table.remove(lock.queue, i) end
  end
  if lock.owner ~= run then return end
  lock.owner = nil
  local nxt = lock.queue[1]
  if nxt then
    self.sched:system_timer(0, function() self.sched:wake(nxt.job.key, "lock") end, "OTA download lock")
  end
end

function Transfer:stop(job)
  local run = self.run
  if not (run and run.job == job) then return end
  self.run = nil
  run.done = true
  if run.sink then run.sink:close(); run.sink = nil end
  self:release(run)
end

function Transfer:download(job)
  local run = {job = job}
  self.run = run
  local hex, size = self:fetch(run)
  self:stop(job)
  return hex, size
end

-- waits for the session to be up; false if the job was cancelled meanwhile
function Transfer:wait_online(job)
  while not self.session.ready do
    self.sched:wait(job.key, 5000)
    if job.cancelled then return false end
  end
  return true
end

-- fetch(run) -> hex, size | nil, err: the chunk loop; stop() closes what it leaves open
function Transfer:fetch(run)
  local job, core, config = run.job, self.core, self.config
  local info, label = job.info, job.label
  local cs = job.chunk_size or config.fw_chunk_size or 65536
  local window = config.fw_window or 4
  local size = info.size
  if not self:acquire(run) then return nil, "cancelled" end
  local existing = core.file_size(job.part) or 0
  local sink, err = core.sink_open(job.part, info.checksum_algorithm or "SHA256", existing - existing % cs)
  if not sink then return nil, err end
  run.sink = sink
  local offset = sink:size()
  job.start(offset)
  local restarts, timeouts = 0, 0
  local empties = 0   -- empty chunks in a row at the same offset, each under a new request id
  local topic_req = "v2/" .. self.kind .. "/request/"
  while offset < size do
    if run.error then
      if run.error == "PAYLOAD_TOO_LARGE" then
        return nil, string.format("server refused chunk size %d: PAYLOAD_TOO_LARGE (use a chunk_size of at most 65536)", cs)
      end
      return nil, "server refused the download: " .. run.error
    end
    if not self:wait_online(job) then return nil, "cancelled" end
    if not run.req_id then
      run.req_id = self.session:next_id()
      run.next_idx = offset // cs
      run.chunks, run.in_flight = {}, 0
    end
    local req = run.req_id
    local paced = nil   -- ms until the server's rate limits allow the next chunk request
    while run.in_flight < window and run.next_idx * cs < size do
      local can, wait = self.session:take_token()
      if not can then
        paced = wait
        break
      end
      local ok, perr = self.session:publish_now(topic_req .. req .. "/chunk/" .. run.next_idx, tostring(cs), true)
      if not ok then
        self.log.debug("%s chunk request not sent: %s", label, perr)
        break
      end
      run.next_idx = run.next_idx + 1
      run.in_flight = run.in_flight + 1
    end
    local idx = offset // cs
    local chunk = run.chunks[idx]
    if chunk then
      run.chunks[idx] = nil
      run.in_flight = run.in_flight - 1
      local expected = math.min(cs, size - offset)
      local short = run.short
      if #chunk > expected then
        return nil, string.format("size mismatch: chunk %d has %d bytes where fw_size %d leaves %d", idx, #chunk, size, expected)
      elseif #chunk > 0 and #chunk < expected and short and short.offset == offset and short.len == #chunk
          and short.req ~= req then
        -- a fresh request id (the server loads the image anew) gives the same short chunk at
        -- the same offset: that is where the image ends, not a cache expiry
        return nil, string.format("size mismatch: the image ends at byte %d but fw_size is %d", offset + #chunk, size)
      elseif #chunk < expected then
        restarts = restarts + 1
        empties = (#chunk == 0 and short and short.offset == offset and short.len == 0) and empties + 1 or 1
        run.short = {offset = offset, len = #chunk, req = req}
        self.log.warn("%s chunk %d has %d bytes, expected %d; restarting at byte %d under a new request id",
          label, idx, #chunk, expected, offset)
        if restarts > (config.fw_restarts or 5) then
          if #chunk == 0 and empties >= restarts then
            return nil, string.format("size mismatch? the server sent no bytes at byte %d under %d request ids: " ..
              "the image may end there (fw_size is %d), or the server's cache keeps expiring", offset, empties, size)
          end
          return nil, string.format("server sent %s chunks at byte %d %d times (cache expired?)",
            #chunk == 0 and "empty" or "short", offset, restarts)
        end
        run.req_id = nil
      else
        local _, werr = sink:write(chunk)
        if werr then return nil, werr end
        offset = offset + #chunk
        timeouts, restarts = 0, 0   -- the limits count failures in a row, not per image
        job.progress(offset)
      end
    elseif paced and run.in_flight == 0 then
      self.sched:wait(job.key, paced)
      if job.cancelled then return nil, "cancelled" end
    else
      local why = self.sched:wait(job.key, config.fw_chunk_timeout or 10000)
      if job.cancelled then return nil, "cancelled" end
      -- an error from the server (run.error) ends the loop at its top
      if why == nil and not run.error and req == run.req_id then
        timeouts = timeouts + 1
        self.log.warn("%s chunk %d timed out (%d); requesting again", label, idx, timeouts)
        if timeouts > (config.fw_retries or 5) then
          return nil, string.format("no answer for chunk %d after %d tries", idx, timeouts)
        end
        run.req_id = nil
      elseif why == "offline" then
        run.req_id = nil   -- request ids are bound to the server connection
      end
    end
  end
  run.sink = nil
  return sink:finish()
end

return M
