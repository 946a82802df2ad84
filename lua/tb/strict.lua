-- tb.strict: the tables a script reads the tb API from (tb, tb.log, tb.json, tb.persist, a
-- timer) raise on a name they do not have, at the line that reads it and with the closest
-- real name: "unknown tb.send_telemetery; did you mean tb.send_telemetry?". Without this a
-- misspelt name is nil, and the script fails later as "attempt to call a nil value", or
-- never, in a handler that runs at 3 a.m. tb.lint reports the same names without running.
local M = {}

-- distance(a, b) -> edits (insert, delete, replace, swap two neighbours) from a to b
function M.distance(a, b)
  local la, lb = #a, #b
  if la == 0 then return lb end
  if lb == 0 then return la end
  local prev2, prev = {}, {}
  for j = 0, lb do prev[j] = j end
  for i = 1, la do
    local cur = {[0] = i}
    local ca = a:byte(i)
    for j = 1, lb do
      local cb = b:byte(j)
      local cost = ca == cb and 0 or 1
      local d = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
      if i > 1 and j > 1 and ca == b:byte(j - 1) and a:byte(i - 1) == cb then
        d = math.min(d, prev2[j - 2] + 1)
      end
      cur[j] = d
    end
    prev2, prev = prev, cur
  end
  return prev[lb]
end

-- closest(name, candidates) -> the candidate a misspelling of name most likely meant, or nil.
-- Close means a few edits (one per three letters, at least one), ignoring case; failing that,
-- a candidate that contains the name ("telemetry" -> "send_telemetry").
function M.closest(name, candidates)
  if type(name) ~= "string" then return nil end
  local lower = name:lower()
  local best, best_d = nil, math.max(1, #name // 3) + 1
  local sorted = {}
  for _, c in ipairs(candidates) do sorted[#sorted + 1] = c end
  table.sort(sorted)
  for _, c in ipairs(sorted) do
    local d = M.distance(lower, c:lower())
    if d < best_d then best, best_d = c, d end
  end
  if best or #name < 4 then return best end
  for _, c in ipairs(sorted) do
    if c:lower():find(lower, 1, true) then return c end
  end
  return nil
end

-- names(t) -> the sorted string keys of t (its own, not through a metatable)
function M.names(t)
  local out = {}
  for k in next, t do
    if type(k) == "string" then out[#out + 1] = k end
  end
  table.sort(out)
  return out
end

-- unknown(label, name, candidates [, sep]) -> "unknown tb.x; did you mean tb.y?"
function M.unknown(label, name, candidates, sep)
  sep = sep or "."
  local shown = type(name) == "string" and name or ("[" .. tostring(name) .. "]")
  local guess = M.closest(name, candidates)
  if guess then
    return string.format("unknown %s%s%s; did you mean %s%s%s?", label, sep, shown, label, sep, guess)
  end
  return string.format("unknown %s%s%s: %s has no such field", label, sep, shown, label)
end

-- table(label, t [, base]) -> t, which now raises (at the caller's line) when a missing name
-- is read. base: a table of further names read through (a class of methods).
function M.table(label, t, base)
  return setmetatable(t, {
    __index = function(self, k)
      if base then
        local v = base[k]
        if v ~= nil then return v end
      end
      local candidates = M.names(self)
      if base then for _, n in ipairs(M.names(base)) do candidates[#candidates + 1] = n end end
      error(M.unknown(label, k, candidates), 2)
    end,
    __name = label,
  })
end

return M
