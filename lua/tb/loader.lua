-- tb.loader: one loader for `run`, `check`, hot reload and tb.testing. It loads a script
-- into a fresh environment and a new generation; only a version that loads without error is
-- committed, in one assignment. Sends made while loading are held and go out at commit, so
-- a rejected version has sent nothing.
local api = require "tb"
local strict = require "tb.strict"

local M = {}
M.__index = M

-- new(ctx) -> loader. ctx as for tb.bind, plus load_budget_ms and set_current(gen).
function M.new(ctx)
  return setmetatable({ctx = ctx}, M)
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  if not text then return nil, "cannot read " .. path end
  return text
end
M.read_file = read_file

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

-- Runs fn() in the calling thread with the load budget enforced by a count hook.
local function run_budgeted(fn, budget_ms, now)
  local deadline = now() + budget_ms
  local prev = table.pack(debug.gethook())
  if budget_ms > 0 then
    debug.sethook(function()
      if now() > deadline then
        error(string.format("script ran %d ms at load without finishing (budget %d ms): cut off", budget_ms, budget_ms), 2)
      end
    end, "", 20000)
  end
  local res = table.pack(xpcall(fn, function(e)
    if type(e) == "string" then return e end
    return "error object: " .. tostring(e)
  end))
  debug.sethook(prev[1], prev[2], prev[3])
  return table.unpack(res, 1, res.n)
end

-- collecting(tbapi, problems) -> tbapi whose misuse (a handler of the wrong type, a yielding
-- call at top level) is recorded as "file:line: message" in problems and answered nil, err
-- instead of raised, so `tbagent check` goes on and reports every such problem.
function M.collecting(tbapi, problems)
  local out = {}
  for k, f in next, tbapi do
    if type(f) == "function" then
      out[k] = function(...)
        local res = table.pack(pcall(f, ...))
        if res[1] then return table.unpack(res, 2, res.n) end
        local where = debug.getinfo(2, "Sl")
        local msg = tostring(res[2]):gsub("^[^\n]-:%d+: ", "", 1)
        problems[#problems + 1] = string.format("%s:%d: %s", where.short_src, where.currentline, msg)
        return nil, msg
      end
    else
      out[k] = f
    end
  end
  return strict.table("tb", out)
end

-- load(path [, text]) -> gen | nil, err ("file:line: message")
function M:load(path, text)
  local err
  if not text then
    text, err = read_file(path)
    if not text then return nil, "cannot read script: " .. tostring(err) end
  end
  local ctx = self.ctx
  -- generations number the versions that went live: a rejected one does not use up a number
  local gen = api.new_generation((ctx.current and ctx.current.id or 0) + 1)
  gen.loading, gen.held, gen.path, gen.text, gen.persist_held = true, {}, path, text, {}
  local tbapi = api.bind(ctx, gen)
  if ctx.problems then tbapi = M.collecting(tbapi, ctx.problems) end
  gen.api = tbapi
  local dir = dirname(path)
  -- `tb` is also a global of the script (the same table as require "tb"): used that way,
  -- luacheck checks every tb.<name> against the standard `tbagent init` writes
  local env = setmetatable({tb = tbapi}, {__index = _G})
  gen.env = env
  -- os.exit would end the process in the middle of a loop iteration, with messages in
  -- flight; in a script it asks for the clean shutdown of SIGTERM, with its status.
  env.os = setmetatable({exit = function(code)
    local status = code == nil and 0 or code == true and 0 or code == false and 1 or math.tointeger(code)
    if not status or status < 0 or status > 255 then status = 1 end
    local where = debug.getinfo(2, "Sl")
    where = where and (where.short_src .. ":" .. (where.currentline or 0)) or "?"
    if ctx.on_script_exit and not gen.loading then ctx.on_script_exit(status, where) end
    error(string.format("os.exit(%s) called: %s", tostring(code),
      gen.loading and "not allowed while the script loads" or "the agent stops cleanly"), 2)
  end}, {__index = os})
  -- require inside the script: "tb" is this generation's API; modules next to the script
  -- load into this generation too, so they reload with it.
  env.require = function(name)
    if name == "tb" then return tbapi end
    if type(name) == "string" and gen.modules[name] ~= nil then return gen.modules[name] end
    if type(name) == "string" and not name:find("^tb%.") then
      local file = dir .. "/" .. name:gsub("%.", "/") .. ".lua"
      local src = read_file(file)
      if src then
        local chunk, cerr = load(src, "@" .. file, "t", env)
        if not chunk then error(cerr, 0) end
        local mod = chunk(name, file)
        if mod == nil then mod = true end
        gen.modules[name] = mod
        gen.module_files[name] = {path = file, text = src}
        return mod
      end
    end
    return require(name)
  end
  local chunk
  chunk, err = load(text, "@" .. path, "t", env)
  if not chunk then return nil, err end
  local ok
  ok, err = run_budgeted(chunk, ctx.load_budget_ms or 5000, ctx.sched.budget_now)
  if not ok then
    -- a rejected version never runs: the timers its top level made before failing would
    -- otherwise fire later and send from code that was refused
    gen.loading, gen.retired, gen.held, gen.persist_held = false, true, nil, nil
    ctx.sched:cancel_gen(gen)
    return nil, err
  end
  return gen
end

-- watch_retired(old): handlers of a replaced version finish on its code; one that never
-- ends (a loop around tb.sleep) would run the old code forever, so it is named in a warning
local RETIRED_GRACE_MS = 60000
function M:watch_retired(old)
  local sched, log = self.ctx.sched, self.ctx.log
  sched:system_timer(RETIRED_GRACE_MS, function()
    local names, n = {}, 0
    for _, info in pairs(sched.handlers) do
      if info.gen == old then
        n = n + 1
        if #names < 5 then names[#names + 1] = info.name end
      end
    end
    if n > 0 then
      table.sort(names)
      log.warn("generation %d was replaced %d s ago and %d of its handlers still run its code (%s): " ..
        "a loop that never ends keeps the old version alive; prefer tb.every, or end the loop on a tb.state flag",
        old.id, RETIRED_GRACE_MS // 1000, n, table.concat(names, ", "))
    end
  end, "retired generation check")
end

-- commit(gen): makes gen the live generation, retires the previous one and sends what the
-- new version held back while loading.
function M:commit(gen)
  local ctx = self.ctx
  local old = ctx.current
  ctx.current = gen
  if old then
    old.retired = true
    ctx.sched:cancel_gen(old)
    if old.id > 0 then self:watch_retired(old) end
  end
  gen.loading = false
  local held = gen.held
  gen.held = nil
  local persisted = gen.persist_held
  gen.persist_held = nil
  if persisted and next(persisted) and ctx.persist then ctx.persist:apply(persisted) end
  for _, rec in ipairs(held) do
    local ok, err = ctx.session:submit(rec.topic, rec.payload, rec.kind, rec.points)
    if not ok then ctx.log.warn("held %s not sent: %s", rec.kind, err) end
  end
end

return M
