-- The state directory's file helpers of tb.core (src/fs.c): mkdirs, write_private, file_size.
local core = require "tb.core"

local files = require "spec.support.files"
local read, exists = files.read, files.exists

describe("tb.core file helpers", function()
  local base
  before_each(function()
    base = os.tmpname()
    os.remove(base)
    assert.is_true(core.mkdirs(base, 448))
  end)
  after_each(function() os.execute("rm -rf " .. base) end)

  it("mkdirs makes every missing level, and is content when they exist", function()
    assert.is_true(core.mkdirs(base .. "/a/b/c", 448))
    assert.is_true(core.mkdirs(base .. "/a/b/c", 448))
    assert.is_true(core.mkdirs(base .. "/a/b/c/", 448))
    local f = assert(io.open(base .. "/file", "w"))
    f:close()
    local ok, err = core.mkdirs(base .. "/file/sub", 448)
    assert.is_nil(ok)
    assert.equal("cannot create " .. base .. "/file/sub: Not a directory", err)
  end)

  it("write_private replaces a file whole and leaves no temporary file", function()
    local path = base .. "/state.json"
    assert.is_true(core.write_private(path, "first"))
    assert.is_true(core.write_private(path, "second, longer"))
    assert.equal("second, longer", read(path))
    assert.is_true(core.write_private(path, ""))
    assert.equal("", read(path))
    assert.is_false(exists(path .. ".tmp"))
  end)

  it("write_private removes its temporary file when the rename fails", function()
    local path = base .. "/taken"
    assert.is_true(core.mkdirs(path .. "/inside", 448))  -- a non-empty directory: rename fails
    local ok, err = core.write_private(path, "data")
    assert.is_nil(ok)
    assert.matches("^cannot write " .. base:gsub("%p", "%%%0") .. "/taken: ", err)
    assert.is_false(exists(path .. ".tmp"))
    assert.is_true(exists(path .. "/inside"))
  end)

  it("write_private says why when the directory is missing, and creates nothing", function()
    local path = base .. "/missing/state.json"
    assert.same({nil, "cannot write " .. path .. ": No such file or directory"},
      {core.write_private(path, "data")})
    assert.is_false(exists(base .. "/missing"))
  end)

  it("file_size gives the size, or nil when there is no file", function()
    assert.is_true(core.write_private(base .. "/f", "12345"))
    assert.equal(5, core.file_size(base .. "/f"))
    assert.is_nil(core.file_size(base .. "/nope"))
  end)
end)
