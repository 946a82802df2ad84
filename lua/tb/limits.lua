-- tb.limits: token buckets in ThingsBoard's rate-limit notation ("cap:sec,cap:sec"). The
-- session paces its publishes through them so a backlog cannot trip the server's limits.
local M = {}
M.__index = M

-- parse("20:1,600:60", scale) -> {{cap=, per_ms=}, ...} | nil, err. scale (0..1] keeps a margin.
function M.parse(text, scale)
  if text == nil or text == "" or text == "none" then return {} end
  if type(text) ~= "string" then return nil, "rate limits must be a string like \"20:1,600:60\"" end
  local buckets = {}
  for part in text:gmatch("[^,]+") do
    local cap, sec = part:match("^%s*(%d+)%s*:%s*(%d+)%s*$")
    cap, sec = tonumber(cap), tonumber(sec)
    if not cap or not sec or cap < 1 or sec < 1 then
      return nil, "bad rate limit \"" .. part .. "\" (expected capacity:seconds, e.g. 20:1)"
    end
    cap = math.max(1, math.floor(cap * (scale or 1)))
    buckets[#buckets + 1] = {cap = cap, per_ms = sec * 1000}
  end
  return buckets
end

-- new(buckets, now_ms) -> limiter
function M.new(buckets, now)
  local self = setmetatable({buckets = {}}, M)
  for i, b in ipairs(buckets or {}) do
    self.buckets[i] = {cap = b.cap, per_ms = b.per_ms, tokens = b.cap, at = now}
  end
  self.none = #self.buckets == 0   -- nothing to pace: callers skip take() on the hot path
  return self
end

local function refill(b, now)
  if now > b.at then
    b.tokens = math.min(b.cap, b.tokens + (now - b.at) * b.cap / b.per_ms)
    b.at = now
  end
end

-- take(n, now) -> true, or false and the ms to wait before n tokens are there.
function M:take(n, now)
  local wait = 0
  for _, b in ipairs(self.buckets) do
    refill(b, now)
    local need = math.min(n, b.cap)
    if b.tokens < need then
      wait = math.max(wait, math.ceil((need - b.tokens) * b.per_ms / b.cap))
    end
  end
  if wait > 0 then return false, wait end
  for _, b in ipairs(self.buckets) do b.tokens = b.tokens - math.min(n, b.cap) end
  return true
end

function M:empty()
  return #self.buckets == 0
end

return M
