-- Deep equality for specs that check what a value kept through JSON, the wire or tb.testing.
local M = {}

-- deep(a, b, leaf [, tables]) -> whether a and b are equal at every depth: two tables when
-- tables(a, b) allows it (if given) and they hold the same keys with equal values; anything
-- else when leaf(a, b) says so.
local function deep(a, b, leaf, tables)
  if type(a) ~= "table" or type(b) ~= "table" then return leaf(a, b) end
  if tables and not tables(a, b) then return false end
  for k, v in pairs(a) do
    if not deep(v, b[k], leaf, tables) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end
M.deep = deep

-- Numbers keep their subtype (42 ~= 42.0); NaN equals NaN and 0.0 is not -0.0, since a codec
-- must keep both.
local function typed_leaf(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) == "number" then
    return math.type(a) == math.type(b) and (a == b or a ~= a and b ~= b)
      and (a ~= 0 or 1 / a == 1 / b)
  end
  return a == b
end

-- typed(a, b [, array_mt]) -> deep equality with typed numbers; with array_mt, a table marked
-- as an array (that metatable) equals only another one so marked.
function M.typed(a, b, array_mt)
  local marks = array_mt and function(x, y)
    return (getmetatable(x) == array_mt) == (getmetatable(y) == array_mt)
  end
  return deep(a, b, typed_leaf, marks)
end

return M
