-- Files the agent creates in its state directory are private to the user (created with
-- these modes, never widened): the directory 0700, downloaded images and state files 0600 (the real tb.core).
local core = require "tb.core"

local function mode(path)
  local p = io.popen("stat -c %a " .. path)
  local m = p:read("l")
  p:close()
  return m
end

describe("private files", function()
  local base
  before_each(function()
    base = os.tmpname()
    os.remove(base)
  end)
  after_each(function() os.execute("rm -rf " .. base) end)

  it("state directories are 0700, images and state files 0600", function()
    local dir = base .. "/state/firmware"
    assert.is_true(core.mkdirs(dir, 448))
    assert.equal("700", mode(base .. "/state"))
    assert.equal("700", mode(dir))
    local sink = assert(core.sink_open(dir .. "/fw-1.0.bin.part", "SHA256"))
    sink:write("image bytes")
    sink:finish()
    assert.equal("600", mode(dir .. "/fw-1.0.bin.part"))
    assert.is_true(core.write_private(base .. "/state/current.json", "{}"))
    assert.equal("600", mode(base .. "/state/current.json"))
  end)
end)
