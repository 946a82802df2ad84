-- `tbagent init` and `tbagent test` (the binary runs them in scripts/itest/scaffold.test.mjs).
local init_command = require "tb.init_command"
local test_command = require "tb.test_command"
local testing = require "tb.testing"
local lint = require "tb.lint"
local core = require "tb.core"

local function tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  return dir
end

local files = require "spec.support.files"

-- read(path) -> the file's text, or nil when there is none
local function read(path)
  return files.exists(path) and files.read(path) or nil
end

local quiet = require("spec.support.capture").output

describe("tbagent init", function()
  it("writes device.lua, a spec, .busted and .luacheckrc into a new folder", function()
    local dir = tmpdir() .. "/a/b"
    local code, out = quiet(init_command.run, core, dir)
    assert.equal(0, code)
    assert.matches("next: cd " .. dir:gsub("%p", "%%%0") .. " && tbagent test", out)
    assert.equal(init_command.DEVICE, read(dir .. "/device.lua"))
    assert.equal(init_command.SPEC, read(dir .. "/spec/device_spec.lua"))
    assert.equal(init_command.BUSTED, read(dir .. "/.busted"))
    assert.equal(init_command.luacheckrc(), read(dir .. "/.luacheckrc"))
    assert.matches(lint.luacheck_std(), read(dir .. "/.luacheckrc"), 1, true)
    local busted = load(read(dir .. "/.busted"))()
    assert.same({"spec"}, busted.default.ROOT)
  end)

  it("never overwrites: exit 2 naming the file, nothing written", function()
    local dir = tmpdir()
    assert(core.mkdirs(dir, 448))
    files.write(dir .. "/.luacheckrc", "mine")
    local code, out, err = quiet(init_command.run, core, dir)
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal("tbagent: " .. dir .. "/.luacheckrc exists: init never overwrites (choose a new or empty folder)\n", err)
    assert.equal("mine", read(dir .. "/.luacheckrc"))
    assert.is_nil(read(dir .. "/device.lua"))
  end)

  it("writes a device.lua that passes check and whose spec's calls work", function()
    local dir = tmpdir()
    quiet(init_command.run, core, dir)
    assert.same({}, lint.check(dir .. "/device.lua"))
    local s = testing.load(dir .. "/device.lua", {persist = {boots = 1}})
    s:connect()
    assert.sent_attributes(s, {boots = 2, target = 21.0})
    assert.same({target = 18.5}, s:rpc("setTarget", 18.5))
    s:advance(20000)
    assert.equal(2, #s.telemetry)
  end)
end)

describe("the command line of init and test", function()
  local cli = require "tb.cli"

  it("init takes one folder; test and init come first", function()
    local code, out, err = quiet(cli.main, {[0] = "tbagent", "init"})
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal("tbagent: usage: tbagent init DIR (one folder, created if missing)\n", err)
    assert.equal(2, (quiet(cli.main, {[0] = "tbagent", "init", "a", "b"})))
    assert.equal(2, (quiet(cli.main, {[0] = "tbagent", "init", "--force"})))
    local _, perr = cli.parse({"--log-level", "debug", "test"})
    assert.equal("test must come first: tbagent test ...", perr)
  end)

  it("--help lists test and init", function()
    assert.matches("tbagent test [SPEC|DIR ...]", cli.help_text(), 1, true)
    assert.matches("tbagent init DIR", cli.help_text(), 1, true)
  end)
end)

describe("tbagent test", function()
  it("hands Busted its arguments, ignoring a .busted's lua directive", function()
    assert.same({"--ignore-lua"}, test_command.busted_args({}))
    assert.same({"--ignore-lua", "spec/a_spec.lua", "-o", "TAP"}, test_command.busted_args({"spec/a_spec.lua", "-o", "TAP"}))
  end)

  it("runs a script folder given alone from inside it, as cd DIR && tbagent test would", function()
    local dir = tmpdir()
    quiet(init_command.run, core, dir)
    assert.same({"--ignore-lua", "--directory=" .. dir, "-o", "TAP"}, test_command.busted_args({dir, "-o", "TAP"}))
    assert.same({"--ignore-lua", "-o", "TAP", "--directory=" .. dir}, test_command.busted_args({"-o", "TAP", dir}))
    -- two paths, or a folder that is not a script folder, go to Busted as they are
    assert.same({"--ignore-lua", dir, dir}, test_command.busted_args({dir, dir}))
    local plain = tmpdir()
    assert(core.mkdirs(plain, 448))
    assert.same({"--ignore-lua", plain}, test_command.busted_args({plain}))
  end)

  it("finds Lua 5.4's module directories whatever LUA_PATH says", function()
    local path, cpath = package.path, package.cpath
    package.path, package.cpath = "./?.lua", "./?.so"
    test_command.search_paths()
    local p, c = package.path, package.cpath
    package.path, package.cpath = path, cpath
    assert.matches(";/usr/share/lua/5.4/?.lua;", p, 1, true)
    assert.matches(";/usr/local/share/lua/5.4/?/init.lua", p, 1, true)
    assert.matches(";/usr/lib/x86_64-linux-gnu/lua/5.4/?.so", c, 1, true)
  end)

  it("says in one line what to install when Busted is missing", function()
    local searchers, loaded = package.searchers, package.loaded["busted.runner"]
    package.searchers = {searchers[1]}        -- only package.preload: Busted is nowhere
    package.loaded["busted.runner"] = nil
    local ok, code, out, err = pcall(quiet, test_command.run, {})
    package.searchers, package.loaded["busted.runner"] = searchers, loaded
    assert(ok, code)
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal("tbagent: Busted is not installed for Lua 5.4: apt-get install lua-busted (Debian, Ubuntu), " ..
      "or luarocks --lua-version 5.4 install busted\n", err)
  end)
end)
