-- tb.log: levelled log lines. Formatting never raises: a bad format string is logged as is,
-- with the formatting error, so a typo in a log call cannot kill a handler.
local M = {}

local LEVELS = {debug = 10, info = 20, warn = 30, error = 40}
M.LEVELS = LEVELS

-- new(writer, level) -> logger; writer(level_name, message) does the output.
function M.new(writer, level)
  local self = {threshold = LEVELS[level or "info"] or LEVELS.info}
  local function emit(name, upper)
    return function(fmt, ...)
      if LEVELS[name] < self.threshold then return end
      local msg
      if select("#", ...) == 0 then
        msg = tostring(fmt)
      else
        local ok, res = pcall(string.format, tostring(fmt), ...)
        if ok then
          msg = res
        else
          local parts = {tostring(fmt)}
          for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
          msg = table.concat(parts, " ") .. " (log format error: " .. tostring(res) .. ")"
        end
      end
      writer(upper, msg)
    end
  end
  self.debug = emit("debug", "DEBUG")
  self.info = emit("info", "INFO")
  self.warn = emit("warn", "WARN")
  self.error = emit("error", "ERROR")
  function self.set_level(name)
    assert(LEVELS[name], "unknown log level: " .. tostring(name))
    self.threshold = LEVELS[name]
  end
  function self.enabled(name) return LEVELS[name] >= self.threshold end
  return self
end

return M
