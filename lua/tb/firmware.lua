-- tb.firmware: the OTA state machine, once for firmware (fw_*) and once for software (sw_*).
-- The script's policy (tb.firmware{...} / tb.software{...}) decides whether and how to
-- install; this module follows the fw_* shared attributes, downloads the image (chunked over
-- MQTT, or from fw_url over HTTP(S) through tb.core), streams it to the state directory with
-- the checksum computed on the way, verifies it and reports fw_state as ThingsBoard's
-- dashboard expects: DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING, UPDATED or FAILED.
-- Each update is one handler coroutine; it waits on chunk, HTTP and connection events.
local M = {}
M.__index = M

local ATTRS = {"title", "version", "size", "checksum", "checksum_algorithm", "url", "tag"}

-- new{kind="fw"|"sw", ctx=} -> updater, registered with ctx.session
function M.new(kind, ctx)
  local self = setmetatable({
    kind = kind, prefix = kind .. "_", policy_name = kind == "fw" and "firmware" or "software",
    ctx = ctx, session = ctx.session, sched = ctx.sched, log = ctx.log, core = ctx.core,
    config = ctx.config, offered = {}, failed = {}, job = nil,
  }, M)
  self.label = self.policy_name
  self.dir = (ctx.config.state_dir or "./.tbagent") .. "/" .. self.policy_name
  local l = self.session.listeners
  l.attributes[#l.attributes + 1] = function(changes, deleted) self:on_attributes(changes, deleted) end
  l.message[#l.message + 1] = function(topic, payload) return self:on_message(topic, payload) end
  l.connect[#l.connect + 1] = function() self:on_connect() end
  l.disconnect[#l.disconnect + 1] = function() self:on_disconnect() end
  l.subscriptions[#l.subscriptions + 1] = "v2/" .. kind .. "/response/+/chunk/+"
  if kind == "fw" then l.subscriptions[#l.subscriptions + 1] = "v2/fw/error" end
  return self
end

local function sanitize(s)
  s = tostring(s):gsub("[^%w%._%-]", "_"):gsub("^%.+", "_")
  return s:sub(1, 80)
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
  local payload = assert(self.core.json_encode({ts = ts, values = values}))
  local ok, err = self.session:submit(self.session.topics.telemetry, payload, "telemetry", 1)
  if not ok then self.log.warn("%s state not reported: %s", self.label, err) end
end

function M:set_state(state, err)
  local p = self.prefix
  local v = {[p .. "state"] = state}
  if err then v[p .. "error"] = err end
  self.log.info("%s %s%s", self.label, state, err and (": " .. err) or "")
  if self.job then self.job.states[#self.job.states + 1] = state end
  self:report(v)
  if self.on_state then self.on_state(state, err) end
end

function M:on_connect()
  if not self:policy() then return end
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

function M:on_attributes(changes, deleted)
  local p, touched = self.prefix, false
  for _, k in ipairs(ATTRS) do
    local v = changes[p .. k]
    if v ~= nil then
      self.offered[k] = v ~= self.core.json_null and v or nil
      touched = true
    end
  end
  for _, key in ipairs(deleted) do
    local k = key:sub(#p + 1)
    if key:sub(1, #p) == p then
      self.offered[k] = nil
      touched = true
    end
  end
  if touched then self:evaluate() end
end

local function package_key(info)
  return table.concat({tostring(info.title), tostring(info.version), tostring(info.checksum),
    tostring(info.url), tostring(info.size)}, "\0")
end

-- evaluate(): starts, keeps or cancels the update job after the offer changed.
function M:evaluate()
  local policy = self:policy()
  if not policy then return end
  local o = self.offered
  local info = nil
  if o.title ~= nil and o.version ~= nil then
    info = {title = tostring(o.title), version = tostring(o.version), size = math.tointeger(o.size),
      checksum = o.checksum and tostring(o.checksum) or nil,
      checksum_algorithm = o.checksum_algorithm and tostring(o.checksum_algorithm) or nil,
      url = o.url and tostring(o.url) or nil, tag = o.tag and tostring(o.tag) or nil}
  end
  local job = self.job
  if job and (not info or package_key(info) ~= job.key_text) then
    self.log.info("%s %s %s withdrawn or replaced; abandoning its download", self.label, job.info.title, job.info.version)
    self:cancel_job()
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

function M:cancel_job()
  local job = self.job
  if not job then return end
  job.cancelled = true
  self.job = nil
  if job.download then job.download:cancel() end
  if job.sink then job.sink:close() end
  os.remove(job.part)
  os.remove(self.dir .. "/job.json")
  self.sched:wake(job.key, "cancelled")
end

function M:start_job(info)
  local name = sanitize(info.title) .. "-" .. sanitize(info.version)
  local job = {info = info, key_text = package_key(info), key = {}, states = {},
    part = self.dir .. "/" .. name .. ".part", image = self.dir .. "/" .. name .. ".bin", chunks = {}}
  self.job = job
  self.sched:spawn(self.label .. " update", {fn = function() self:run_job(job) end,
    on_error = function(e)
      if self.job == job then
        self:finish_failed(job, "internal error: " .. tostring(e):match("^[^\n]*"))
      end
    end})
end

function M:finish_failed(job, err)
  self.failed[job.key_text] = true
  self:set_state("FAILED", err)
  if job.sink then job.sink:close() end
  os.remove(job.part)
  os.remove(job.image)
  os.remove(self.dir .. "/job.json")
  if self.job == job then self.job = nil end
  return false
end

-- run_job(job): the whole update, in its own coroutine.
function M:run_job(job)
  local info = job.info
  local policy = self:policy()
  if policy.accept then
    local ok, yes, why = pcall(policy.accept, info)
    if job.cancelled then return end
    if not ok then return self:finish_failed(job, "accept() raised: " .. tostring(yes)) end
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
  if not (saved and saved.key == job.key_text) then os.remove(job.part) end
  self:write_json("job.json", {key = job.key_text, title = info.title, version = info.version})
  self:set_state("DOWNLOADING")
  local hex
  if info.url then
    hex, err = self:download_http(job)
  else
    hex, err = self:download_mqtt(job)
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
  self:set_state("VERIFIED")
  self:set_state("UPDATING")
  policy = self:policy()   -- a hot reload may have brought a new policy
  local pok, res, ierr = pcall(policy.install, job.image, info)
  if job.cancelled then return end
  if not pok then return self:finish_failed(job, "install failed: " .. tostring(res):match("^[^\n]*")) end
  if not res then return self:finish_failed(job, "install failed: " .. tostring(ierr or "install returned " .. tostring(res))) end
  os.remove(job.image)
  os.remove(self.dir .. "/job.json")
  self:write_json("current.json", {title = info.title, version = info.version})
  self.job = nil
  self:set_state("UPDATED")
  self:report({["current_" .. self.prefix .. "title"] = info.title, ["current_" .. self.prefix .. "version"] = info.version})
  return true
end

function M:progress(job, received)
  local total = job.info.size
  if not total or total == 0 then return end
  local step = math.floor(received * 10 / total)
  if step > (job.step or 0) then
    job.step = step
    local secs = math.max(0.001, (self.sched.now() - job.started) / 1000)
    self.log.info("%s download %d%% (%d of %d bytes) at %.1f KiB/s", self.label, step * 10,
      received, total, (received - job.first_offset) / 1024 / secs)
    local policy = self:policy()
    if policy and policy.progress then pcall(policy.progress, job.info, received, total) end
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
  local existing = core.file_size(job.part) or 0
  local sink, err = core.sink_open(job.part, info.checksum_algorithm or "SHA256", existing - existing % cs)
  if not sink then return nil, err end
  job.sink = sink
  local offset = sink:size()
  job.first_offset, job.started = offset, self.sched.now()
  if offset > 0 then self.log.info("%s resuming download at byte %d", self.label, offset) end
  local restarts, timeouts = 0, 0
  local topic_req = "v2/" .. self.kind .. "/request/"
  while offset < size do
    if not self:wait_online(job) then return nil, "cancelled" end
    if not job.req_id then
      job.req_id = self.session:next_id()
      job.next_idx = offset // cs
      job.chunks, job.in_flight, job.error = {}, 0, nil
    end
    local req = job.req_id
    while job.in_flight < window and job.next_idx * cs < size do
      local ok, perr = self.session:publish_now(topic_req .. req .. "/chunk/" .. job.next_idx, tostring(cs))
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
      if #chunk > expected then
        sink:close()
        return nil, string.format("size mismatch: chunk %d has %d bytes where fw_size %d leaves %d", idx, #chunk, size, expected)
      elseif #chunk < expected then
        restarts = restarts + 1
        self.log.warn("%s chunk %d has %d bytes, expected %d; restarting at byte %d under a new request id",
          self.label, idx, #chunk, expected, offset)
        if restarts > (self.config.fw_restarts or 5) then
          sink:close()
          return nil, string.format("server sent %s chunks at byte %d %d times (cache expired?)",
            #chunk == 0 and "empty" or "short", offset, restarts)
        end
        job.req_id = nil
      else
        local _, werr = sink:write(chunk)
        if werr then sink:close(); return nil, werr end
        offset = offset + #chunk
        timeouts = 0
        self:progress(job, offset)
      end
    else
      local why = self.sched:wait(job.key, self.config.fw_chunk_timeout or 10000)
      if job.cancelled then return nil, "cancelled" end
      if job.error then
        sink:close()
        local e = job.error
        if e == "PAYLOAD_TOO_LARGE" then
          return nil, string.format("server refused chunk size %d: PAYLOAD_TOO_LARGE (use a chunk_size of at most 65536)", cs)
        end
        return nil, "server refused the download: " .. e
      end
      if why == nil and req == job.req_id then
        timeouts = timeouts + 1
        self.log.warn("%s chunk %d timed out (%d); requesting again", self.label, idx, timeouts)
        if timeouts > (self.config.fw_retries or 5) then
          sink:close()
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

function M:on_message(topic, payload)
  local job = self.job
  if topic == "v2/fw/error" then
    if job and not job.info.url then
      job.error = payload ~= "" and payload or "error"
      self.sched:wake(job.key, "error")
    else
      self.log.warn("server firmware error with no download running: %s", payload)
    end
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

-- download_http(job) -> hex | nil, err: fw_url through libcurl, resumed with Range.
function M:download_http(job)
  local info, core = job.info, self.core
  local attempts = 0
  job.first_offset, job.started = core.file_size(job.part) or 0, self.sched.now()
  while true do
    attempts = attempts + 1
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
    local err = string.format("%s%s", result.error, result.status > 0 and (" (HTTP " .. result.status .. ")") or "")
    local permanent = result.status >= 400 and result.status < 500 or result.error:find("larger than")
    if permanent or attempts >= (self.config.fw_retries or 5) then
      return nil, "download failed: " .. err
    end
    local delay = math.min(30000, 1000 * 2 ^ (attempts - 1))
    self.log.warn("%s download interrupted: %s; resuming in %d s", self.label, err, delay // 1000)
    self.sched:wait({}, delay)
    if job.cancelled then return nil, "cancelled" end
  end
end

-- on_http_done(id, status, curl_code, error, hex): the loop's "http_done" event.
function M:on_http_done(id, status, code, err, hex)
  local key = self.http_keys and self.http_keys[id]
  if not key then return false end
  self.sched:wake(key, {id = id, status = status, code = code, error = err, hex = hex})
  return true
end

return M
