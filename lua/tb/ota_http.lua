-- tb.ota_http: an OTA package's image fetched from its url (fw_url / sw_url, docs/thingsboard.md
-- §7) through tb.core's libcurl transfer (src/http.c), which streams into the job's .part file
-- and computes the checksum on the way. A partial file is resumed with a Range request; an
-- interrupted transfer is tried again, with a growing pause, as long as attempts bring bytes.
-- src/http.c ends each attempt with an "http_done" event that names why it failed with a code
-- ("range", "too_large", "http", "curl", "write"); its message is for people only.
--
-- new(ctx) -> transfer:
--   transfer:download(job) -> hex, size | nil, err   (the transfer interface of tb.ota)
--   transfer:stop(job)      cancels the job's running request; the partial file stays
-- on_done(ctx, id, status, curl_code, message, hex_or_reason) -> true if download id is one of
--   ctx's: the loop's "http_done" event, handed to the job waiting for it
local printable = require("tb.log").printable

local M = {}
local Transfer = {}
Transfer.__index = Transfer

local TEXT_MAX = 256

-- curl codes after which another attempt cannot help: unsupported protocol, bad URL, TLS
-- peer verification, a bad client certificate, an unreadable CA file, issuer/pinning checks
local CURL_PERMANENT = {[1] = true, [3] = true, [58] = true, [60] = true, [77] = true, [83] = true, [90] = true}
local CURL_TLS_VERIFY = {[60] = true, [83] = true, [90] = true}

function M.new(ctx)
  -- download id -> the key its job waits on, shared by the transfers of one agent (on_done)
  ctx.http_routes = ctx.http_routes or {}
  return setmetatable({routes = ctx.http_routes, sched = ctx.sched, log = ctx.log, core = ctx.core,
    config = ctx.config, running = nil}, Transfer)
end

function M.on_done(ctx, id, status, code, message, s2)
  local key = ctx.http_routes and ctx.http_routes[id]
  if not key then return false end
  ctx.sched:wake(key, {id = id, status = status, code = code, message = message,
    hex = not message and s2 or nil, reason = message and s2 or nil})
  return true
end

-- forget(how): the running request is over ("release") or abandoned ("cancel")
function Transfer:forget(how)
  local r = self.running
  self.running = nil
  self.routes[r.id] = nil
  r.dl[how](r.dl)
end

function Transfer:stop(job)
  if self.running and self.running.job == job then self:forget("cancel") end
end

-- attempt(job) -> the "http_done" result of one request | nil, err
function Transfer:attempt(job)
  local info = job.info
  local dl, id = self.core.http_download{url = info.url, path = job.part, resume = true,
    algorithm = info.checksum_algorithm or "SHA256", max_size = info.size,
    cafile = self.config.http_cafile, insecure = self.config.http_insecure}
  if not dl then return nil, id end
  self.running = {job = job, dl = dl, id = id}
  self.routes[id] = job.key
  while true do
    local result = self.sched:wait(job.key, 1000)
    if job.cancelled then return nil, "cancelled" end
    if type(result) == "table" and result.id == id then
      self:forget("release")
      return result
    end
    job.progress((dl:progress()))
  end
end

-- verify_on_disk(job, have) -> hex, size | nil, err: the whole image is on disk already (the
-- agent stopped before verifying it); a Range request past its end would only be refused
function Transfer:verify_on_disk(job, have)
  self.log.info("%s download already complete on disk (%d bytes); verifying it", job.label, have)
  local sink, err = self.core.sink_open(job.part, job.info.checksum_algorithm or "SHA256", have)
  if not sink then return nil, err end
  return sink:finish()
end

function Transfer:download(job)
  local core, info = self.core, job.info
  local have = core.file_size(job.part) or 0
  if info.size and have > 0 and have == info.size then return self:verify_on_disk(job, have) end
  job.start(have)
  local attempts, range_reset = 0, false
  while true do
    attempts = attempts + 1
    local before = core.file_size(job.part) or 0
    local result, aerr = self:attempt(job)
    if not result then return nil, aerr end
    if not result.message then
      local size = core.file_size(job.part)
      job.progress(size)
      return result.hex, size
    end
    local status, code = math.tointeger(result.status) or 0, math.tointeger(result.code) or 0
    local reason, message = result.reason, tostring(result.message)
    if reason == "curl" and CURL_TLS_VERIFY[code] then message = "TLS verification failed: " .. message end
    local err = string.format("%s%s", message, status > 0 and (" (HTTP " .. status .. ")") or "")
    if (status == 416 or reason == "range") and not range_reset then
      -- the server will not serve the rest of what is on disk (or serves another range of
      -- it): start again from byte 0, once
      range_reset = true
      self.log.warn("%s server refused the resume (%s); downloading again from byte 0", job.label,
        reason == "range" and printable(message, TEXT_MAX) or "HTTP 416")
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
      self.log.warn("%s download interrupted: %s; resuming in %d s", job.label, printable(err, TEXT_MAX), delay // 1000)
      self.sched:wait({}, delay)
      if job.cancelled then return nil, "cancelled" end
    end
  end
end

return M
