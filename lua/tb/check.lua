-- tb.check: `tbagent check SCRIPT.lua` loads the script with the same loader as `run`,
-- against an offline session (nothing connects, no timer runs, tb.persist is in memory), and
-- reports what it finds: every misuse of the tb API at load (each as file:line: message), the
-- error that stopped the load, if one did, and every tb.<name> that does not exist anywhere
-- in the script and the modules it requires, handlers included (tb.lint, without running them).
local agent = require "tb.agent"
local lint = require "tb.lint"
local loader = require "tb.loader"

local M = {}

-- run(core, path, log) -> exit status (0 ok, 1 problems found)
function M.run(core, path, log)
  local config = {script = path, host = "offline", port = 0, token = "check", session_limits = false}
  local ctx = agent.build(core, config, log)
  ctx.problems = {}
  local gen, err = ctx.loader:load(path)
  local problems = ctx.problems
  if not gen then problems[#problems + 1] = err end
  local text = gen and gen.text or loader.read_file(path)
  if text then
    local seen = {}
    for _, p in ipairs(problems) do seen[p] = true end
    for _, p in ipairs(lint.check(path, text)) do
      if not seen[p] then
        seen[p] = true
        problems[#problems + 1] = p
      end
    end
  end
  -- in file and line order, the script first, then its modules
  local order = {}
  for i, p in ipairs(problems) do
    local file, line = p:match("^(.-):(%d+):")
    order[p] = {file == path and "" or (file or "~"), tonumber(line) or 0, i}
  end
  table.sort(problems, function(a, b)
    local x, y = order[a], order[b]
    if x[1] ~= y[1] then return x[1] < y[1] end
    if x[2] ~= y[2] then return x[2] < y[2] end
    return x[3] < y[3]
  end)
  if #problems == 1 then
    io.stderr:write("tbagent: ", path, ": ", problems[1], "\n")
    return 1
  elseif #problems > 1 then
    for _, p in ipairs(problems) do io.stderr:write(p, "\n") end
    io.stderr:write(string.format("tbagent: %s: %d problems found (listed above)\n", path, #problems))
    return 1
  end
  local methods = {}
  for name in pairs(gen.rpc) do methods[#methods + 1] = name end
  table.sort(methods)
  local timers = 0
  for _, t in ipairs(ctx.sched.heap) do if t.gen == gen then timers = timers + 1 end end
  io.stdout:write(string.format("%s: ok: %d RPC method%s%s, %d attribute handler%s, %d timer%s%s%s\n",
    path, #methods, #methods == 1 and "" or "s",
    #methods > 0 and " (" .. table.concat(methods, ", ") .. ")" or "",
    #gen.attr_handlers, #gen.attr_handlers == 1 and "" or "s", timers, timers == 1 and "" or "s",
    gen.firmware and ", firmware policy" or "", gen.software and ", software policy" or ""))
  return 0
end

return M
