-- tb.firmware: the OTA state machine, once for firmware (fw_*) and once for software (sw_*).
-- The script's policy (tb.firmware{...} / tb.software{...}) decides whether and how to
-- install; this module follows the fw_* shared attributes, downloads the image (chunked over
-- MQTT, or from fw_url over HTTP(S) through tb.core), streams it to the state directory with
-- the checksum computed on the way, verifies it and reports fw_state as ThingsBoard's
-- dashboard expects: DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING, UPDATED or FAILED.
-- Each update is one handler coroutine; it waits on chunk, HTTP and connection events.
-- Firmware and software downloads over MQTT run one at a time (ctx.ota_lock): ThingsBoard
-- reports the errors of both on v2/fw/error, so an error belongs to the one download running.
-- Every fw_* value from the server is data: it is made printable (tb.log.printable) and
-- bounded before it reaches a file name, a log line, fw_error or telemetry.
local printable = require("tb.log").printable

local M = {}
M.__index = M

-- bounds for server text: names and the server's error text, fw_error as a whole
local TEXT_MAX, ERROR_MAX = 256, 1024

-- new_lock() -> the lock shared by the updaters of one agent (ctx.ota_lock)
function M.new_lock()
  return {owner = nil, queue = {}}
end

local ATTRS = {"title", "version", "size", "checksum", "checksum_algorithm", "url", "tag"}

-- new{kind="fw"|"sw", ctx=} -> updater, registered with ctx.session
function M.new(kind, ctx)
  local self = setmetatable({
    kind = kind, prefix = kind .. "_", policy_name = kind == "fw" and "firmware" or "software",
    ctx = ctx, session = ctx.session, sched = ctx.sched, log = ctx.log, core = ctx.core,
    config = ctx.config, offered = {}, failed = {}, job = nil,
  }, M)
  ctx.ota_lock = ctx.ota_lock or M.new_lock()
  self.lock = ctx.ota_lock
  self.label = self.policy_name
  self.dir = (ctx.config.state_dir or "./.tbagent") .. "/" .. self.policy_name
  local l = self.session.listeners
  l.attributes[#l.attributes + 1] = function(changes, deleted, why) self:on_attributes(changes, deleted, why) end
  l.message[#l.message + 1] = function(topic, payload) return self:on_message(topic, payload) end
  l.connect[#l.connect + 1] = function() self:on_connect() end
  l.disconnect[#l.disconnect + 1] = function() self:on_disconnect() end
  l.subscriptions[#l.subscriptions + 1] = "v2/" .. kind .. "/response/+/chunk/+"
  if kind == "fw" then l.subscriptions[#l.subscriptions + 1] = "v2/fw/error" end
  return self
end

-- a pushed offer waits this long for the deletions ThingsBoard sends right after it
-- (tb.testing advances its clock by it after an offer)
local OFFER_SETTLE_MS = 100
M.OFFER_SETTLE_MS = OFFER_SETTLE_MS

-- sanitize(s) -> a file name part: letters, digits, '.', '_' and '-' only, no leading dot
-- (so never "." or ".."), at most 80 bytes
local function sanitize(s)
  s = tostring(s):gsub("[^%w%._%-]", "_"):gsub("^%.+", "_"):sub(1, 80)
  return s ~= "" and s or "_"
end

-- file_base(dir, title, version) -> the path of a package's files without .part / .bin
local function file_base(dir, title, version)
  return dir .. "/" .. sanitize(title) .. "-" .. sanitize(version)
end
M.sanitize = sanitize

-- server_text(v [, max]) -> v from the server as printable text (nil stays nil); max nil: unbounded
local function server_text(v, max)
  if v == nil then return nil end
  v = tostring(v)
  return printable(v, max or (4 * #v + 16))
end

function M:policy()
  return self.ctx.current[self.policy_name]
end

local function read_json(core, path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  local v = core.json_decode(text or "")
  return type(v) == "table" and v or nil
end

-- Writes atomically (temp file + rename), private to the user.
function M:write_json(name, value)
  local ok, err = self.core.mkdirs(self.dir, 448)
  if not ok then return nil, err end
  return self.core.write_private(self.dir .. "/" .. name, assert(self.core.json_encode(value)))
end

-- current() -> {title=, version=}: what is installed (state dir first, then the script).
function M:current()
  local saved = read_json(self.core, self.dir .. "/current.json")
  if saved and saved.title then return saved end
  local policy = self:policy()
  return policy and policy.current or {}
end

-- Reports telemetry with its own strictly increasing timestamp: ThingsBoard keeps one value
-- per key and millisecond, so states sent in the same millisecond would overwrite each other.
function M:report(values)
  local ts = math.max(self.ctx.clock(), (self.last_ts or 0) + 1)
  self.last_ts = ts
  local payload, err = self.core.json_encode({ts = ts, values = values})
  if not payload then
    self.log.warn("%s state not reported: %s", self.label, printable(err, TEXT_MAX))
    return
  end
  local ok
  ok, err = self.session:submit(self.session.topics.telemetry, payload, "telemetry", 1)
  if not ok then self.log.warn("%s state not reported: %s", self.label, printable(err, TEXT_MAX)) end
end

function M:set_state(state, err)
  local p = self.prefix
  local v = {[p .. "state"] = state}
  if err then
    err = printable(err, ERROR_MAX)
    v[p .. "error"] = err
  end
  self.log.info("%s %s%s", self.label, state, err and (": " .. err) or "")
  if self.job then self.job.states[#self.job.states + 1] = state end
  self:report(v)
  if self.on_state then self.on_state(state, err) end
end

function M:on_connect()
  if not self:policy() then return end
  self:settle_interrupted()
  local cur = self:current()
  if cur.title or cur.version then
    self:report({["current_" .. self.prefix .. "title"] = cur.title,
                 ["current_" .. self.prefix .. "version"] = cur.version})
  end
  if self.job then self.sched:wake(self.job.key, "online") end
end

function M:on_disconnect()
  if self.job then self.sched:wake(self.job.key, "offline") end
end

-- on_attributes(changes, deleted, why): why "current" is the whole set fetched after a
-- (re)connect, so an offer key missing from it was deleted while the agent was away
function M:on_attributes(changes, deleted, why)
  local p, touched = self.prefix, false
  for _, k in ipairs(ATTRS) do
    local v = changes[p .. k]
    if v ~= nil then
      self.offered[k] = v ~= self.core.json_null and v or nil
      touched = true
    elseif why == "current" and self.offered[k] ~= nil then
      self.offered[k] = nil
      touched = true
    end
  end
  if why == "current" then touched, self.current_seen = true, true end
  for _, key in ipairs(deleted) do
    local k = key:sub(#p + 1)
    if key:sub(1, #p) == p then
      self.offered[k] = nil
      touched = true
    end
  end
  if not touched then return end
  if why == "current" then return self:evaluate() end
  -- ThingsBoard sends an assignment as two messages back to back: the package's keys, then
  -- the keys it has no value for deleted (fw_url after a URL package). Acting on the first
  -- alone would start the new version from the old URL, so a push settles for a moment.
  if self.settle_timer then self.settle_timer:cancel() end
  self.settle_timer = self.sched:system_timer(OFFER_SETTLE_MS, function()
    self.settle_timer = nil
    self:evaluate()
  end, self.label .. " offer")
end

local function package_key(info)
  return table.concat({tostring(info.title), tostring(info.version), tostring(info.checksum),
    tostring(info.url), tostring(info.size)}, "\0")
end

-- evaluate(): starts, keeps or cancels the update job after the offer changed.
function M:evaluate()
  local policy = self:policy()
  if not policy then return end
  self:settle_interrupted()
  local o = self.offered
  local info = nil
  if o.title ~= nil and o.version ~= nil then
    -- server text, made printable once here: every later use (file names, logs, fw_error,
    -- current.json, telemetry) sees the same text, so comparisons stay stable
    local size = (type(o.size) == "number" or type(o.size) == "string") and tonumber(o.size) or nil
    info = {title = server_text(o.title, TEXT_MAX), version = server_text(o.version, TEXT_MAX),
      size = size and math.tointeger(size) or nil,
      checksum = server_text(o.checksum, TEXT_MAX), checksum_algorithm = server_text(o.checksum_algorithm, 64),
      url = server_text(o.url), tag = server_text(o.tag, TEXT_MAX)}
  end
  local job = self.job
  -- the tag is not part of the package's identity; ThingsBoard may send it separately
  if job and info and package_key(info) == job.key_text then job.info.tag = info.tag end
  if job and (not info or package_key(info) ~= job.key_text) then
    if job.installing then
      -- the image is verified and install() runs: its result is kept and reported; the new
      -- offer is looked at once install() has returned
      if not job.reevaluate then
        self.log.info("%s offer changed while %s %s is being installed; looked at again afterwards",
          self.label, job.info.title, job.info.version)
      end
      job.reevaluate = true
      return
    end
    self.log.info("%s %s %s withdrawn or replaced; abandoning its download", self.label, job.info.title, job.info.version)
    self:cancel_job()
  end
  -- only a whole current set (after a connect) says nothing is offered any more; before the
  -- first one arrives, an empty offer is just not known yet
  if not info and not self.job and o.title == nil and o.version == nil and self.current_seen then
    self:discard_saved(read_json(self.core, self.dir .. "/job.json"))
  end
  if not info or self.job then return end
  local cur = self:current()
  if info.title == cur.title and info.version == cur.version then return end
  if self.failed[package_key(info)] then return end
  if not info.url and not info.size then
    self.log.debug("%s offer without size or url yet; waiting for the rest", self.label)
    return
  end
  self:start_job(info)
end

-- settle_interrupted(): once, before the first offer is looked at. An agent stopped while install() ran
-- (the installer rebooted the device or restarted the agent, or it was killed) finds job.json
-- marked installing. The install took when the script now names that version as current:
-- UPDATED. Otherwise FAILED, kept in job.json so that package is not downloaded and
-- installed again on its own at every start (an installer that reboots would loop).
function M:settle_interrupted()
  if self.settled then return end
  self.settled = true
  local saved = read_json(self.core, self.dir .. "/job.json")
  if not (saved and type(saved.key) == "string") then return end
  if saved.failed then
    self.failed[saved.key] = true
    return
  end
  if not saved.installing then return end
  local title, version = tostring(saved.title), tostring(saved.version)
  os.remove(file_base(self.dir, title, version) .. ".bin")
  local policy = self:policy()
  local cur = policy and policy.current or {}
  if cur.title == saved.title and cur.version == saved.version then
    os.remove(self.dir .. "/job.json")
    local ok, err = self:write_json("current.json", {title = title, version = version})
    if not ok then self.log.warn("%s %s %s installed but not recorded in the state directory: %s", self.label, title, version, err) end
    self.log.info("%s %s %s: the agent stopped during install() and the script now runs it as current", self.label, title, version)
    self:set_state("UPDATED")
    return
  end
  self.failed[saved.key] = true
  self:write_json("job.json", {key = saved.key, title = title, version = version, failed = true})
  self:set_state("FAILED", string.format("install interrupted: the agent stopped while install() ran and %s %s is not current (the script says %s %s)",
    title, version, tostring(cur.title), tostring(cur.version)))
end

-- discard_saved(saved): the files a stopped agent left for a package that is no longer
-- offered (saved: its job.json, as read) are removed with that job.json
function M:discard_saved(saved)
  if not saved then return end
  if saved.title ~= nil and saved.version ~= nil then
    local base = file_base(self.dir, tostring(saved.title), tostring(saved.version))
    os.remove(base .. ".bin")
    if os.remove(base .. ".part") then
      self.log.info("%s removed the partial download of %s %s: no longer offered", self.label,
        printable(tostring(saved.title), TEXT_MAX), printable(tostring(saved.version), TEXT_MAX))
    end
  end
  os.remove(self.dir .. "/job.json")
end

function M:cancel_job()
  local job = self.job
  if not job then return end
  job.cancelled = true
  self.job = nil
  self:release(job)
  if job.download then job.download:cancel() end
  if job.sink then job.sink:close(); job.sink = nil end
  os.remove(job.part)
  os.remove(self.dir .. "/job.json")
  self.sched:wake(job.key, "cancelled")
end

function M:start_job(info)
  local base = file_base(self.dir, info.title, info.version)
  local job = {info = info, key_text = package_key(info), key = {}, states = {}, label = self.label,
    part = base .. ".part", image = base .. ".bin", chunks = {}}
  self.job = job
  self.sched:spawn(self.label .. " update", {fn = function() self:run_job(job) end,
    on_error = function(e)
      if self.job == job then
        self:finish_failed(job, "internal error: " .. tostring(e):match("^[^\n]*"))
      end
    end})
end

function M:finish_failed(job, err)
  self:release(job)
  self.failed[job.key_text] = true
  self:set_state("FAILED", err)
  if job.sink then job.sink:close(); job.sink = nil end
  os.remove(job.part)
  os.remove(job.image)
  os.remove(self.dir .. "/job.json")
  job.finished = true
  if self.job == job then self.job = nil end
  self:after_job(job)
  return false
end

-- after_job(job): an offer that changed while install() ran is looked at now
function M:after_job(job)
  if job.reevaluate and not self.job then
    job.reevaluate = nil
    self.sched:system_timer(0, function() self:evaluate() end, self.label .. " offer")
  end
end

-------------------------------------------------------------------------------------------
-- one MQTT chunk download at a time, across firmware and software

local function stale(lock)
  local o = lock.owner
  return o and (o.cancelled or o.finished or o.updater.job ~= o)
end

-- acquire(job) -> true once job holds the lock; false if the job was cancelled meanwhile
function M:acquire(job)
  local lock = self.lock
  job.updater = self
  if stale(lock) then lock.owner = nil end
  if lock.owner == job then return true end
  if not lock.owner and #lock.queue == 0 then
    lock.owner = job
    return true
  end
  lock.queue[#lock.queue + 1] = job
  self.log.info("%s download waits for the %s download to end (one MQTT download at a time)",
    self.label, lock.owner and lock.owner.label or "other")
  while true do
    self.sched:wait(job.key, 5000)
    if job.cancelled then return false end
    if stale(lock) then lock.owner = nil end
    -- drop waiters that went away
    while lock.queue[1] and (lock.queue[1].cancelled or lock.queue[1].updater.job ~= lock.queue[1]) do
      table.remove(lock.queue, 1)
    end
    if not lock.owner and lock.queue[1] == job then
      table.remove(lock.queue, 1)
      lock.owner = job
      self.log.info("%s download starts", self.label)
      return true
    end
  end
end

-- release(job): job no longer downloads over MQTT; the next waiter is woken (from the loop)
function M:release(job)
  local lock = self.lock
  for i = #lock.queue, 1, -1 do
    if lock.queue[i] == job then table.remove(lock.queue, i) end
  end
  if lock.owner ~= job then return end
  lock.owner = nil
  local nxt = lock.queue[1]
  if nxt then
    self.sched:system_timer(0, function() nxt.updater.sched:wake(nxt.key, "lock") end, "OTA download lock")
  end
end

-- run_job(job): the whole update, in its own coroutine.
function M:run_job(job)
  local info = job.info
  local policy = self:policy()
  if policy.accept then
    local trace
    local ok, yes, why = xpcall(policy.accept, function(e)
      trace = debug.traceback(tostring(e), 2)
      return e
    end, info)
    if job.cancelled then return end
    if not ok then
      self.log.error("%s accept() raised: %s", self.label, trace)
      return self:finish_failed(job, "accept() raised: " .. tostring(yes))
    end
    if not yes then
      self.failed[job.key_text] = true
      self.log.info("%s %s %s declined by the script%s", self.label, info.title, info.version, why and (": " .. tostring(why)) or "")
      self.job = nil
      return
    end
  end
  local ok, err = self.core.mkdirs(self.dir, 448)
  if not ok then return self:finish_failed(job, err) end
  -- a partial download of this same package survives a restart; anything else is stale
  local saved = read_json(self.core, self.dir .. "/job.json")
  if not (saved and saved.key == job.key_text) then
    self:discard_saved(saved)
    os.remove(job.part)
  end
  self:write_json("job.json", {key = job.key_text, title = info.title, version = info.version})
  self:set_state("DOWNLOADING")
  local hex
  if info.url then
    hex, err = self:download_http(job)
  else
    hex, err = self:download_mqtt(job)
    self:release(job)
  end
  if job.cancelled then return end
  if not hex then return self:finish_failed(job, err) end
  self:set_state("DOWNLOADED")
  if info.size and job.size ~= info.size then
    return self:finish_failed(job, string.format("size mismatch: expected %d bytes, got %d", info.size, job.size))
  end
  if info.checksum and info.checksum ~= "" then
    local alg = info.checksum_algorithm or "SHA256"
    if not self.core.checksum_match(alg, hex, info.checksum) then
      return self:finish_failed(job, string.format("checksum mismatch (%s): expected %s, got %s", alg, info.checksum, hex))
    end
  else
    self.log.warn("%s %s has no checksum; only its size was checked", self.label, info.title)
  end
  ok, err = os.rename(job.part, job.image)
  if not ok then return self:finish_failed(job, "cannot keep the image: " .. tostring(err)) end
  -- from here on the job is not cancelled: a change of the offer during install() is looked
  -- at once install() has returned (after_job)
  job.installing = true
  -- kept on disk, so a start after an install() that never returned can tell what happened
  self:write_json("job.json", {key = job.key_text, title = info.title, version = info.version, installing = true})
  self:set_state("VERIFIED")
  self:set_state("UPDATING")
  policy = self:policy() or policy   -- a hot reload may have brought a new policy
  local pok, res, ierr = pcall(policy.install, job.image, info)
  if not pok then return self:finish_failed(job, "install failed: " .. tostring(res):match("^[^\n]*")) end
  if not res then return self:finish_failed(job, "install failed: " .. tostring(ierr or "install returned " .. tostring(res))) end
  os.remove(job.image)
  os.remove(self.dir .. "/job.json")
  local wok, werr = self:write_json("current.json", {title = info.title, version = info.version})
  if not wok then self.log.warn("%s %s %s installed but not recorded in the state directory: %s", self.label, info.title, info.version, werr) end
  job.finished = true
  if self.job == job then self.job = nil end
  self:set_state("UPDATED")
  self:report({["current_" .. self.prefix .. "title"] = info.title, ["current_" .. self.prefix .. "version"] = info.version})
  self:after_job(job)
  return true
end

-- progress(job, received): a log line and the policy's progress(info, received, total) at
-- every 10 %; without a known size (a fw_url package without fw_size) at every 10 MiB
local UNSIZED_STEP = 10 * 1024 * 1024
function M:progress(job, received)
  local total = job.info.size
  if total == 0 then return end
  local step = total and math.floor(received * 10 / total) or received // UNSIZED_STEP
  if step <= (job.step or 0) then return end
  job.step = step
  local secs = math.max(0.001, (self.sched.now() - job.started) / 1000)
  local rate = (received - job.first_offset) / 1024 / secs
  if total then
    self.log.info("%s download %d%% (%d of %d bytes) at %.1f KiB/s", self.label, step * 10, received, total, rate)
  else
    self.log.info("%s download: %d bytes (size not given) at %.1f KiB/s", self.label, received, rate)
  end
  local policy = self:policy()
  if policy and policy.progress then
    local ok, err = xpcall(policy.progress, debug.traceback, job.info, received, total)
    if not ok then self.log.error("%s progress() raised: %s", self.label, tostring(err)) end
  end
end

-- waits for the session to be up; false if the job was cancelled meanwhile
function M:wait_online(job)
  while not self.session.ready do
    self.sched:wait(job.key, 5000)
    if job.cancelled then return false end
  end
  return true
end

-- download_mqtt(job) -> hex | nil, err: chunks on v2/{fw|sw}/request/{reqId}/chunk/{idx},
-- several in flight, each checked against min(chunk_size, size - offset).
function M:download_mqtt(job)
  local info, core = job.info, self.core
  local policy = self:policy()
  local cs = policy.chunk_size or self.config.fw_chunk_size or 65536
  local window = self.config.fw_window or 4
  local size = info.size
  if not self:acquire(job) then return nil, "cancelled" end
  local existing = core.file_size(job.part) or 0
  local sink, err = core.sink_open(job.part, info.checksum_algorithm or "SHA256", existing - existing % cs)
  if not sink then return nil, err end
  job.sink = sink
  local offset = sink:size()
  job.first_offset, job.started = offset, self.sched.now()
  if offset > 0 then self.log.info("%s resuming download at byte %d", self.label, offset) end
  local restarts, timeouts = 0, 0
  local empties = 0   -- empty chunks in a row at the same offset, each under a new request id
  local topic_req = "v2/" .. self.kind .. "/request/"
  job.error = nil
  while offset < size do
    if job.error then
      sink:close()
      job.sink = nil
      local e = job.error
      if e == "PAYLOAD_TOO_LARGE" then
        return nil, string.format("server refused chunk size %d: PAYLOAD_TOO_LARGE (use a chunk_size of at most 65536)", cs)
      end
      return nil, "server refused the download: " .. e
    end
    if not self:wait_online(job) then return nil, "cancelled" end
    if not job.req_id then
      job.req_id = self.session:next_id()
      job.next_idx = offset // cs
      job.chunks, job.in_flight = {}, 0
    end
    local req = job.req_id
    local paced = nil   -- ms until the server's rate limits allow the next chunk request
    while job.in_flight < window and job.next_idx * cs < size do
      local can, wait = self.session:take_token()
      if not can then
        paced = wait
        break
      end
      local ok, perr = self.session:publish_now(topic_req .. req .. "/chunk/" .. job.next_idx, tostring(cs), true)
      if not ok then
        self.log.debug("%s chunk request not sent: %s", self.label, perr)
        break
      end
      job.next_idx = job.next_idx + 1
      job.in_flight = job.in_flight + 1
    end
    local idx = offset // cs
    local chunk = job.chunks[idx]
    if chunk then
      job.chunks[idx] = nil
      job.in_flight = job.in_flight - 1
      local expected = math.min(cs, size - offset)
      local short = job.short
      if #chunk > expected then
        sink:close()
        job.sink = nil
        return nil, string.format("size mismatch: chunk %d has %d bytes where fw_size %d leaves %d", idx, #chunk, size, expected)
      elseif #chunk > 0 and #chunk < expected and short and short.offset == offset and short.len == #chunk
          and short.req ~= req then
        -- a fresh request id (the server loads the image anew) gives the same short chunk at
        -- the same offset: that is where the image ends, not a cache expiry
        sink:close()
        job.sink = nil
        return nil, string.format("size mismatch: the image ends at byte %d but fw_size is %d", offset + #chunk, size)
      elseif #chunk < expected then
        restarts = restarts + 1
        empties = (#chunk == 0 and short and short.offset == offset and short.len == 0) and empties + 1 or 1
        job.short = {offset = offset, len = #chunk, req = req}
        self.log.warn("%s chunk %d has %d bytes, expected %d; restarting at byte %d under a new request id",
          self.label, idx, #chunk, expected, offset)
        if restarts > (self.config.fw_restarts or 5) then
          sink:close()
          job.sink = nil
          if #chunk == 0 and empties >= restarts then
            return nil, string.format("size mismatch? the server sent no bytes at byte %d under %d request ids: " ..
              "the image may end there (fw_size is %d), or the server's cache keeps expiring", offset, empties, size)
          end
          return nil, string.format("server sent %s chunks at byte %d %d times (cache expired?)",
            #chunk == 0 and "empty" or "short", offset, restarts)
        end
        job.req_id = nil
      else
        local _, werr = sink:write(chunk)
        if werr then sink:close(); job.sink = nil; return nil, werr end
        offset = offset + #chunk
        timeouts, restarts = 0, 0   -- the limits count failures in a row, not per image
        self:progress(job, offset)
      end
    elseif paced and job.in_flight == 0 then
      self.sched:wait(job.key, paced)
      if job.cancelled then return nil, "cancelled" end
    else
      local why = self.sched:wait(job.key, self.config.fw_chunk_timeout or 10000)
      if job.cancelled then return nil, "cancelled" end
      -- an error from the server (job.error) ends the loop at its top
      if why == nil and not job.error and req == job.req_id then
        timeouts = timeouts + 1
        self.log.warn("%s chunk %d timed out (%d); requesting again", self.label, idx, timeouts)
        if timeouts > (self.config.fw_retries or 5) then
          sink:close()
          job.sink = nil
          return nil, string.format("no answer for chunk %d after %d tries", idx, timeouts)
        end
        job.req_id = nil
      elseif why == "offline" then
        job.req_id = nil   -- request ids are bound to the server connection
      end
    end
  end
  local hex, n = sink:finish()
  job.sink = nil
  if not hex then return nil, n end
  job.size = n
  return hex
end

-- on_message(topic, payload) -> true if the message was this updater's. v2/fw/error goes to
-- the updater whose MQTT download holds the lock (software errors come there too); with no
-- download running the firmware updater logs it.
function M:on_message(topic, payload)
  local job = self.job
  if topic == "v2/fw/error" then
    local lock = self.lock
    if stale(lock) then lock.owner = nil end
    local owner = lock.owner
    if owner and owner.updater == self and owner == job then
      job.error = payload ~= "" and printable(payload, TEXT_MAX) or "error"
      self.sched:wake(job.key, "error")
      return true
    end
    if owner or self.kind ~= "fw" then return false end
    self.log.warn("server OTA error with no MQTT download running: %s", printable(payload, TEXT_MAX))
    return true
  end
  local kind, req, idx = topic:match("^v2/(%a%a)/response/(%d+)/chunk/(%d+)$")
  if kind ~= self.kind then return false end
  if job and job.req_id == tonumber(req) then
    job.chunks[tonumber(idx)] = payload
    self.sched:wake(job.key, "chunk")
  end
  return true
end

-- curl codes after which another attempt cannot help: unsupported protocol, bad URL, TLS
-- peer verification, a bad client certificate, an unreadable CA file, issuer/pinning checks
local CURL_PERMANENT = {[1] = true, [3] = true, [58] = true, [60] = true, [77] = true, [83] = true, [90] = true}
local CURL_TLS_VERIFY = {[60] = true, [83] = true, [90] = true}

-- download_http(job) -> hex | nil, err: fw_url through libcurl, resumed with Range.
function M:download_http(job)
  local info, core = job.info, self.core
  local attempts = 0
  local have = core.file_size(job.part) or 0
  job.first_offset, job.started = have, self.sched.now()
  if info.size and have > 0 and have == info.size then
    -- the whole image is on disk already (the agent stopped before verifying it): a Range
    -- request past the end would only be refused
    self.log.info("%s download already complete on disk (%d bytes); verifying it", self.label, have)
    local sink, err = core.sink_open(job.part, info.checksum_algorithm or "SHA256", have)
    if not sink then return nil, err end
    local hex, n = sink:finish()
    if not hex then return nil, n end
    job.size = n
    return hex
  end
  if have > 0 then self.log.info("%s resuming download at byte %d", self.label, have) end
  local range_reset = false
  while true do
    attempts = attempts + 1
    local before = core.file_size(job.part) or 0
    local dl, id = core.http_download{url = info.url, path = job.part, resume = true,
      algorithm = info.checksum_algorithm or "SHA256", max_size = info.size,
      cafile = self.config.http_cafile, insecure = self.config.http_insecure}
    if not dl then return nil, id end
    job.download = dl
    self.http_keys = self.http_keys or {}
    self.http_keys[id] = job.key
    local result
    while true do
      result = self.sched:wait(job.key, 1000)
      if job.cancelled then return nil, "cancelled" end
      if type(result) == "table" and result.id == id then break end
      self:progress(job, (dl:progress()))
    end
    self.http_keys[id] = nil
    job.download = nil
    dl:release()
    if not result.error then
      job.size = core.file_size(job.part)
      self:progress(job, job.size)
      return result.hex
    end
    local status, code = math.tointeger(result.status) or 0, math.tointeger(result.code) or 0
    local reason, etext = result.reason, tostring(result.error)
    if reason == "curl" and CURL_TLS_VERIFY[code] then etext = "TLS verification failed: " .. etext end
    local err = string.format("%s%s", etext, status > 0 and (" (HTTP " .. status .. ")") or "")
    local misranged = reason == "range"
    if (status == 416 or misranged) and not range_reset then
      -- the server will not serve the rest of what is on disk (or serves another range of
      -- it): start again from byte 0, once
      range_reset = true
      self.log.warn("%s server refused the resume (%s); downloading again from byte 0", self.label,
        misranged and printable(etext, TEXT_MAX) or "HTTP 416")
      os.remove(job.part)
      attempts = attempts - 1
    else
      -- fw_retries counts interruptions in a row: an attempt that got bytes resets it
      if (core.file_size(job.part) or 0) > before then attempts = 1 end
      local permanent = status >= 400 and status < 500 or reason == "too_large"
        or (reason == "curl" and CURL_PERMANENT[code])
      if permanent or attempts >= (self.config.fw_retries or 5) then
        return nil, "download failed: " .. err
      end
      local delay = math.min(30000, 1000 * 2 ^ (attempts - 1))
      self.log.warn("%s download interrupted: %s; resuming in %d s", self.label, printable(err, TEXT_MAX), delay // 1000)
      self.sched:wait({}, delay)
      if job.cancelled then return nil, "cancelled" end
    end
  end
end

-- on_http_done(id, status, curl_code, message, hex_or_reason): the loop's "http_done" event
-- (src/http.c: a hex digest on success, a reason code with the message on failure).
function M:on_http_done(id, status, code, message, s2)
  local key = self.http_keys and self.http_keys[id]
  if not key then return false end
  self.sched:wake(key, {id = id, status = status, code = code, error = message,
    hex = not message and s2 or nil, reason = message and s2 or nil})
  return true
end

return M
