-- tb.test_command: `tbagent test [SPEC|DIR ...] [busted options]` runs Busted inside the
-- agent's own Lua 5.4, where the tb library and tb.core are already preloaded: a user's
-- folder needs no install, no LUA_PATH and no .busted (one that is there is honoured, except
-- its `lua` directive: this is the Lua the specs must run on). Busted itself is a Lua library
-- (busted.runner), found on Lua 5.4's usual directories whatever LUA_PATH_5_4 says.
local core = require "tb.core"

local M = {}

-- where Debian (lua-busted) and luarocks put Lua 5.4 modules
local LUA_DIRS = {"/usr/local/share/lua/5.4", "/usr/share/lua/5.4"}
local C_DIRS = {"/usr/local/lib/lua/5.4", "/usr/lib/x86_64-linux-gnu/lua/5.4",
  "/usr/lib/aarch64-linux-gnu/lua/5.4", "/usr/lib/arm-linux-gnueabihf/lua/5.4",
  "/usr/lib/i386-linux-gnu/lua/5.4", "/usr/lib/riscv64-linux-gnu/lua/5.4", "/usr/lib/lua/5.4"}

M.MISSING = "Busted is not installed for Lua 5.4: apt-get install lua-busted (Debian, Ubuntu), " ..
  "or luarocks --lua-version 5.4 install busted"

-- extended(path, templates) -> path with each template not yet in it appended
local function extended(path, templates)
  local out = path
  for _, t in ipairs(templates) do
    if not (";" .. out .. ";"):find(";" .. t .. ";", 1, true) then out = out .. ";" .. t end
  end
  return out
end

function M.search_paths()
  local lua, c = {}, {}
  for _, d in ipairs(LUA_DIRS) do
    lua[#lua + 1] = d .. "/?.lua"
    lua[#lua + 1] = d .. "/?/init.lua"
  end
  for _, d in ipairs(C_DIRS) do c[#c + 1] = d .. "/?.so" end
  package.path = extended(package.path, lua)
  package.cpath = extended(package.cpath, c)
end

local function exists(path) return core.file_size(path) ~= nil end

-- busted_args(args) -> the arguments for Busted. One directory that is a script folder (it has
-- a .busted or a spec/ directory) is run from inside, as `cd DIR && tbagent test` would be, so
-- its specs find their scripts by the same relative paths.
-- Busted's options that take the next argument as their value
local WITH_VALUE = {}
for o in ([[-p --pattern --exclude-pattern -e -o --output -C --directory -f --config-file
  --coverage-config-file -t --tags --exclude-tags --filter --filter-out -m --lpath --cpath -r
  --run --repeat --seed --lang --loaders --helper --lua -Xoutput -Xhelper]]):gmatch("%S+") do
  WITH_VALUE[o] = true
end

function M.busted_args(args)
  local out = {"--ignore-lua"}
  local positional = {}
  local i = 1
  while args[i] do
    local a = args[i]
    if a:sub(1, 1) ~= "-" then positional[#positional + 1] = i
    elseif WITH_VALUE[a] then i = i + 1 end
    i = i + 1
  end
  local only = #positional == 1 and args[positional[1]]
  local folder = only and (exists(only .. "/.busted") or exists(only .. "/spec"))
  for k, a in ipairs(args) do
    if folder and k == positional[1] then
      out[#out + 1] = "--directory=" .. a
    else
      out[#out + 1] = a
    end
  end
  return out
end

-- run(args) -> exit status (Busted's own: it exits by itself when a spec fails)
function M.run(args)
  M.search_paths()
  local ok, runner = pcall(require, "busted.runner")
  if not ok then
    local err = tostring(runner)
    if err:find("module 'busted.runner' not found", 1, true) then
      io.stderr:write("tbagent: ", M.MISSING, "\n")
    else
      io.stderr:write("tbagent: cannot load Busted: ", err:match("^[^\n]*"), "\n")
    end
    return 2
  end
  _G.arg = M.busted_args(args)
  _G.arg[0] = "tbagent"
  -- Busted names itself after the file that calls it: "tbagent: error: ..."
  local start = assert(load("local runner = ... return runner({standalone = false})", "@tbagent"))
  start(runner)
  return 0
end

return M
