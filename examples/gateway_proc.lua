-- A gateway reporting on itself from /proc: load, memory and uptime every 10 s, plus an RPC
-- that returns the current numbers on demand. Linux only; no extra packages.
local tb = require "tb"

local function read(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function sample()
  local v = {}
  local load1, load5, load15 = (read("/proc/loadavg") or ""):match("^(%S+) (%S+) (%S+)")
  v.load1, v.load5, v.load15 = tonumber(load1), tonumber(load5), tonumber(load15)
  local mem = read("/proc/meminfo") or ""
  local total = tonumber(mem:match("MemTotal:%s+(%d+)"))
  local avail = tonumber(mem:match("MemAvailable:%s+(%d+)"))
  if total and avail then
    v.mem_total_kb = math.tointeger(total)
    v.mem_used_pct = math.floor((total - avail) * 1000 / total + 0.5) / 10
  end
  v.uptime_s = math.tointeger(math.floor(tonumber((read("/proc/uptime") or ""):match("^(%S+)")) or 0))
  return v
end

tb.every(10000, function()
  local ok, err = tb.send_telemetry(sample())
  if not ok then tb.log.warn("telemetry refused: %s", err) end
end)

tb.on_rpc("sample", function() return sample() end)

tb.on_connect(function()
  local host = (read("/proc/sys/kernel/hostname") or "unknown"):gsub("%s+$", "")
  tb.send_attributes{hostname = host, agent = "tbagent " .. tb.version}
end)
