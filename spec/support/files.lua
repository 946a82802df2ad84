-- Files for specs: a device script written where tb.testing (or the real agent) can load it.
local M = {}

-- write(path, text): the file holds exactly text, replaced whole
function M.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- script(text) -> the path of a new temporary .lua file holding text
function M.script(text)
  local path = os.tmpname() .. ".lua"
  M.write(path, text)
  return path
end

return M
