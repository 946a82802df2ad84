-- tb.log: levelled log lines. Formatting never raises: a bad format string is logged as is,
-- with the formatting error, so a typo in a log call cannot kill a handler.
local M = {}

local LEVELS = {debug = 10, info = 20, warn = 30, error = 40}
M.LEVELS = LEVELS

-- new(writer, level) -> logger; writer(level_name, message) does the output.
-- logger.taps: functions fn(level, message) that also see every line written (tb.status keeps
-- the last error); level is "debug", "info", "warn" or "error". A table, not a function: a
-- script's tb.log gets the logger's functions only.
function M.new(writer, level)
  local taps = {}
  local self = {threshold = LEVELS[level or "info"] or LEVELS.info, taps = taps}
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
      for i = 1, #taps do taps[i](name, msg) end
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

-- printable(s [, max]) -> s as text safe to log and to send as a JSON string: invalid UTF-8
-- and control characters become \xNN (a newline too), and past `max` bytes (default 512) it is
-- cut with a note of how much was left out. For text from the server, which is data only.
function M.printable(s, max)
  s = tostring(s)
  max = max or 512
  local out, n, i, len = {}, 0, 1, #s
  while i <= len and n < max do
    local ok, nxt = pcall(utf8.offset, s, 2, i)
    local c = s:byte(i)
    local valid = ok and nxt and c >= 0x20 and c ~= 0x7f and (c < 0x80 and nxt == i + 1 or
      c >= 0xc2 and utf8.len(s, i, nxt - 1) == 1)
    if valid then
      out[#out + 1] = s:sub(i, nxt - 1)
      n, i = n + (nxt - i), nxt
    else
      out[#out + 1] = string.format("\\x%02X", c)
      n, i = n + 4, i + 1
    end
  end
  if i <= len then out[#out + 1] = string.format("... (%d more bytes)", len - i + 1) end
  return table.concat(out)
end

return M
