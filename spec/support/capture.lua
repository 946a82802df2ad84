-- Output of the commands' Lua entries (tbagent --help, check, init, test), caught for specs:
-- io.stdout and io.stderr are swapped for buffers and put back even when fn raises.
local M = {}

local function sink(buf)
  return {write = function(self, ...)
    for _, s in ipairs({...}) do buf[#buf + 1] = tostring(s) end
    return self
  end}
end

-- output(fn, ...) -> fn's first result, what it wrote to stdout, to stderr (raises fn's error)
function M.output(fn, ...)
  local out, err = {}, {}
  local real_out, real_err = io.stdout, io.stderr
  io.stdout, io.stderr = sink(out), sink(err)   -- luacheck: ignore 122 (swapped back below)
  local res = table.pack(pcall(fn, ...))
  io.stdout, io.stderr = real_out, real_err     -- luacheck: ignore 122
  assert(res[1], res[2])
  return res[2], table.concat(out), table.concat(err)
end

return M
