-- tb.reload: hot reload of the running script. A change in the script's directory (or
-- SIGHUP) is debounced, skipped when no loaded file changed, then the new version is loaded
-- beside the old one; only a version that loads without error replaces it, all at once.
-- The MQTT session is never touched.
local M = {}
M.__index = M

local DEBOUNCE_MS = 50

-- new(ctx) -> reloader; ctx from tb.agent.build with a committed generation in ctx.current
function M.new(ctx)
  return setmetatable({ctx = ctx, log = ctx.log, sched = ctx.sched, reloads = 0, rejected = 0}, M)
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

-- Every file the live generation was built from, with the text it had.
local function sources(gen)
  local files = {[gen.path] = gen.text}
  for _, f in pairs(gen.module_files or {}) do files[f.path] = f.text end
  return files
end

-- start(): watches the script's directory, and the directories of the modules it requires.
function M:start()
  local path = self.ctx.current.path
  self.watched = {}
  local ok, err = self.ctx.core.watch_dir(dirname(path))
  if not ok then
    self.log.warn("hot reload off: %s", err)
    return nil, err
  end
  self.watched[dirname(path)] = true
  self.log.debug("watching %s for changes", dirname(path))
  self:watch_modules(self.ctx.current)
  return true
end

-- watch_modules(gen): modules in subdirectories (require "lib.util") reload with the script.
function M:watch_modules(gen)
  if not self.watched then return end
  for _, f in pairs(gen.module_files or {}) do
    local dir = dirname(f.path)
    if not self.watched[dir] then
      local ok, err = self.ctx.core.watch_dir(dir)
      if ok then
        self.watched[dir] = true
        self.log.debug("watching %s for changes", dir)
      else
        self.log.warn("changes to %s will not reload the script: %s", f.path, err)
      end
    end
  end
end

-- on_watch(name): a file changed in the directory.
function M:on_watch(name)
  if name and not name:match("%.lua$") then return end
  self.first_change = self.first_change or self.sched.now()
  if self.timer then self.timer:cancel() end
  self.timer = self.sched:system_timer(DEBOUNCE_MS, function()
    self.timer = nil
    self:reload("file change")
  end, "reload")
end

local read = require("tb.loader").read_file

-- reload(reason) -> true | nil, err
function M:reload(reason)
  local ctx = self.ctx
  local live = ctx.current
  local since = self.first_change
  self.first_change = nil
  -- the script is read once: to see whether it changed, then to load it
  local text = read(live.path)
  local changed = text ~= live.text
  if not changed then
    for path, was in pairs(sources(live)) do
      if path ~= live.path and read(path) ~= was then changed = true break end
    end
  end
  if not changed and reason == "file change" then
    if self.rejected_since_live then
      -- the save put back the text that runs: the rejected one is gone, nothing to load
      self.rejected_since_live = false
      self.log.info("%s is back to the text of generation %d, which is running: nothing changed", live.path, live.id)
    else
      self.log.debug("reload skipped: no loaded file changed")
    end
    return true
  end
  local gen, err
  if text and not text:find("%S") then
    -- an empty script would retire every handler: far more likely a save caught midway
    err = live.path .. ": the file is empty"
  else
    gen, err = ctx.loader:load(live.path, text)
  end
  if not gen then
    self.rejected = self.rejected + 1
    self.rejected_since_live = true
    self.log.error("reload rejected: %s (generation %d keeps running)", tostring(err):match("^[^\n]*"), live.id)
    return nil, err
  end
  ctx.loader:commit(gen)
  self:watch_modules(gen)
  local session = ctx.session
  if session.wants_attributes(gen) and not session.wants_attributes(live) and session.ready then
    -- nothing fetched them at connect: the new handlers and policies get them now
    self.sched:spawn("current attributes", function() session:fetch_current() end)
  end
  self.reloads = self.reloads + 1
  self.rejected_since_live = false
  if reason == "file change" then
    local took = since and (self.sched.now() - since) or 0
    self.log.info("reloaded %s: generation %d live (file change, %d ms after the change)", live.path, gen.id, took)
  else
    self.log.info("reloaded %s: generation %d live (%s%s)", live.path, gen.id, reason,
      changed and "" or "; the same text as generation " .. live.id)
  end
  -- a new policy may want a package that is already offered
  if ctx.firmware then ctx.firmware:evaluate() end
  if ctx.software then ctx.software:evaluate() end
  return true
end

return M
