-- Files for specs: a device script written where tb.testing (or the real agent) can load it,
-- and the files a test wrote or expects.
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

-- read(path) -> the file's bytes; raises when it cannot be read
function M.read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("a")
  f:close()
  return text
end

-- exists(path) -> whether path can be opened for reading
function M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

return M
