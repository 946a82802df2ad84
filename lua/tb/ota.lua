-- tb.ota: the update state machine for one kind of package that ThingsBoard assigns through
-- shared attributes (docs/thingsboard.md §7): it follows the offer (<prefix>title, version,
-- size, checksum, checksum_algorithm, url, tag), asks the policy whether and how to install,
-- keeps the job on disk (job.json, current.json in its state directory), has a transfer fetch
-- the image, verifies it and reports <prefix>state as ThingsBoard's dashboard expects:
-- DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING, UPDATED or FAILED (<prefix>error says why).
-- Each update is one handler coroutine. Every value from the server is data: it is made
-- printable (tb.log.printable) and bounded before it reaches a file name, a log line, the
-- error text or telemetry.
--
-- new(ctx, opts) -> updater, listening on ctx.session. opts:
--   prefix  the attribute prefix ("fw_"): read from the offer, reported as <prefix>state,
--           <prefix>error, current_<prefix>title and current_<prefix>version
--   name    names the updater in logs and its state directory ("firmware")
--   policy  function() -> the script's policy now, or nil (no updates):
--           {current = {title=, version=}, accept = fn(info, current) -> yes [, why],
--            install = fn(image_path, info) -> true | nil, err, progress = fn(info, received, total),
--            chunk_size = n}; accept, install and progress run through sched:call
--   mqtt, http  transfers: http fetches an offer that has a url, mqtt any other
--
-- A transfer fetches one job's image into job.part:
--   transfer:download(job) -> hex, size | nil, err   (in the job's coroutine)
--   transfer:stop(job)      the job is abandoned or failed: frees what its download holds
-- It reads job.info, job.part, job.label and job.chunk_size (the policy's, may be nil), waits
-- on job.key (woken with "online", "offline" and "cancelled"; job.cancelled is set once the
-- job is abandoned) and calls job.start(offset) when bytes begin to land (offset: kept from
-- before) and job.progress(received) as they do.
--
-- An updater's outcome is visible as what it reports (the <prefix>state telemetry) and through
-- updater.job (nil when no update runs), updater:current() and updater.state / updater.error
-- (the last state reported, for tb.status).
local printable = require("tb.log").printable

local M = {}
M.__index = M

-- bounds for server text: names and the server's error text, the error report as a whole
local TEXT_MAX, ERROR_MAX = 256, 1024

local ATTRS = {"title", "version", "size", "checksum", "checksum_algorithm", "url", "tag"}

-- a pushed offer waits this long for the deletions ThingsBoard sends right after it
-- (tb.testing advances its clock by it after an offer)
M.OFFER_SETTLE_MS = 100

function M.new(ctx, opts)
  local self = setmetatable({
    prefix = opts.prefix, label = opts.name, policy = opts.policy, mqtt = opts.mqtt, http = opts.http,
    ctx = ctx, session = ctx.session, sched = ctx.sched, log = ctx.log, core = ctx.core,
    offered = {}, failed = {}, job = nil,
    dir = (ctx.config.state_dir or "./.tbagent") .. "/" .. opts.name,
  }, M)
  local l = self.session.listeners
  l.attributes[#l.attributes + 1] = function(changes, deleted, why) self:on_attributes(changes, deleted, why) end
  l.online[#l.online + 1] = function() self:on_online() end
  l.connect[#l.connect + 1] = function() self:wake_job("online") end
  l.disconnect[#l.disconnect + 1] = function() self:wake_job("offline") end
  return self
end

-- sanitize(s) -> a file name part: letters, digits, '.', '_' and '-' only, no leading dot
-- (so never "." or ".."), at most 80 bytes
local function sanitize(s)
  s = tostring(s):gsub("[^%w%._%-]", "_"):gsub("^%.+", "_"):sub(1, 80)
  return s ~= "" and s or "_"
end
M.sanitize = sanitize

-- file_base(dir, title, version) -> the path of a package's files without .part / .bin
local function file_base(dir, title, version)
  return dir .. "/" .. sanitize(title) .. "-" .. sanitize(version)
end

-- server_text(v [, max]) -> v from the server as printable text (nil stays nil); max nil: unbounded
local function server_text(v, max)
  if v == nil then return nil end
  v = tostring(v)
  return printable(v, max or (4 * #v + 16))
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

-- current() -> {title=, version=}: what is installed (state dir first, then the policy).
function M:current()
  local saved = read_json(self.core, self.dir .. "/current.json")
  if saved and saved.title then return saved end
  local policy = self.policy()
  return policy and policy.current or {}
end

-- report(values [, at_once]): telemetry with its own strictly increasing timestamp while the
-- clock can be trusted (session:clock_trusted): ThingsBoard keeps one value per key and
-- millisecond, so states sent in the same millisecond would overwrite each other. Otherwise
-- without one: a time from an unsynchronised clock may lie days away and would file the
-- states there (ThingsBoard then stamps them on arrival). at_once: published now, ahead of
-- what waits in the outbox (the connect report, which only makes sense on this connection).
function M:report(values, at_once)
  local body = values
  if self.session:clock_trusted() then
    local ts = math.max(self.ctx.clock(), (self.last_ts or 0) + 1)
    self.last_ts = ts
    body = {ts = ts, values = values}
  end
  local payload, err = self.core.json_encode(body)
  if not payload then
    self.log.warn("%s state not reported: %s", self.label, printable(err, TEXT_MAX))
    return
  end
  local topic, ok = self.session.topics.telemetry, nil
  if at_once then ok = self.session:publish_now(topic, payload) end
  if not ok then ok, err = self.session:submit(topic, payload, "telemetry", 1) end
  if not ok then self.log.warn("%s state not reported: %s", self.label, printable(err, TEXT_MAX)) end
end

function M:report_current(title, version, at_once)
  local p = self.prefix
  self:report({["current_" .. p .. "title"] = title, ["current_" .. p .. "version"] = version}, at_once)
end

function M:set_state(state, err)
  local p = self.prefix
  local v = {[p .. "state"] = state}
  if err then
    err = printable(err, ERROR_MAX)
    v[p .. "error"] = err
  end
  self.log.info("%s %s%s", self.label, state, err and (": " .. err) or "")
  self.state, self.error = state, err
  self:report(v)
end

function M:wake_job(why)
  if self.job then self.sched:wake(self.job.key, why) end
end

-- on_online(): on every connection the installed title and version go out first, before the
-- offer is fetched and looked at (ThingsBoard's OTA flow expects the device's current
-- version before any state of an update)
function M:on_online()
  if not self.policy() then return end
  self:settle_interrupted()
  local cur = self:current()
  if cur.title or cur.version then self:report_current(cur.title, cur.version, true) end
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
  -- the keys it has no value for deleted (the url after a URL package). Acting on the first
  -- alone would start the new version from the old URL, so a push settles for a moment.
  if self.settle_timer then self.settle_timer:cancel() end
  self.settle_timer = self.sched:system_timer(M.OFFER_SETTLE_MS, function()
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
  if not self.policy() then return end
  self:settle_interrupted()
  local o = self.offered
  local info = nil
  if o.title ~= nil and o.version ~= nil then
    -- server text, made printable once here: every later use (file names, logs, the error,
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
-- marked installing. The install took when the policy now names that version as current:
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
  local policy = self.policy()
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
  job.transfer:stop(job)
  os.remove(job.part)
  os.remove(self.dir .. "/job.json")
  self.sched:wake(job.key, "cancelled")
end

function M:start_job(info)
  local base = file_base(self.dir, info.title, info.version)
  local job = {info = info, key_text = package_key(info), key = {}, label = self.label,
    part = base .. ".part", image = base .. ".bin", transfer = info.url and self.http or self.mqtt}
  job.start = function(offset) self:transfer_started(job, offset) end
  job.progress = function(received) self:progress(job, received) end
  self.job = job
  self.sched:spawn(self.label .. " update", {fn = function() self:run_job(job) end,
    on_error = function(e)
      if self.job == job then
        self:finish_failed(job, "internal error: " .. tostring(e):match("^[^\n]*"))
      end
    end})
end

-- declined(job, answer, why): the policy said no (answer: what accept returned first).
-- ThingsBoard would show the package INITIATED for ever: it is reported FAILED with the
-- reason, and not offered to the policy again until another package is assigned (kept in
-- job.json, so also not after a restart).
function M:declined(job, answer, why)
  local info = job.info
  why = why ~= nil and printable(why, TEXT_MAX) or ("accept() returned " .. tostring(answer))
  self.failed[job.key_text] = true
  self:discard_saved(read_json(self.core, self.dir .. "/job.json"))
  self:write_json("job.json", {key = job.key_text, title = info.title, version = info.version, failed = true})
  self:set_state("FAILED", "declined: " .. why)
  job.finished = true
  if self.job == job then self.job = nil end
  return false
end

function M:finish_failed(job, err)
  job.transfer:stop(job)
  self.failed[job.key_text] = true
  self:set_state("FAILED", err)
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

-- run_job(job): the whole update, in its own coroutine.
function M:run_job(job)
  local info = job.info
  local policy = self.policy()
  if policy.accept then
    local cur = self:current()
    local ok, yes, why = self.sched:call(self.label .. " accept()", policy.accept, info,
      {title = cur.title, version = cur.version})
    if job.cancelled then return end
    if not ok then return self:finish_failed(job, "accept() raised: " .. yes) end
    if not yes then return self:declined(job, yes, why) end
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
  job.chunk_size = (self.policy() or policy).chunk_size
  local hex, size = job.transfer:download(job)
  if job.cancelled then return end
  if not hex then return self:finish_failed(job, size) end
  self:set_state("DOWNLOADED")
  if info.size and size ~= info.size then
    return self:finish_failed(job, string.format("size mismatch: expected %d bytes, got %d", info.size, size))
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
  policy = self.policy() or policy   -- a hot reload may have brought a new policy
  local called, res, ierr = self.sched:call(self.label .. " install()", policy.install, job.image, info)
  if not called then return self:finish_failed(job, "install failed: " .. res) end
  if not res then return self:finish_failed(job, "install failed: " .. tostring(ierr or "install returned " .. tostring(res))) end
  os.remove(job.image)
  os.remove(self.dir .. "/job.json")
  local wok, werr = self:write_json("current.json", {title = info.title, version = info.version})
  if not wok then self.log.warn("%s %s %s installed but not recorded in the state directory: %s", self.label, info.title, info.version, werr) end
  job.finished = true
  if self.job == job then self.job = nil end
  self:set_state("UPDATED")
  self:report_current(info.title, info.version)
  self:after_job(job)
  return true
end

-- transfer_started(job, offset): the transfer begins at offset (bytes kept from before)
function M:transfer_started(job, offset)
  job.first_offset, job.started = offset, self.sched.now()
  if offset > 0 then self.log.info("%s resuming download at byte %d", self.label, offset) end
end

-- progress(job, received): a log line and the policy's progress(info, received, total) at
-- every 10 %; without a known size (a url package without a size) at every 10 MiB
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
  local policy = self.policy()
  if policy and policy.progress then
    self.sched:call(self.label .. " progress()", policy.progress, job.info, received, total)
  end
end

return M
