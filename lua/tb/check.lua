-- tb.check: `tbagent check SCRIPT.lua` loads the script with the same loader as `run`,
-- against an offline session (nothing connects, no timer runs), and reports what it finds:
-- every misuse of the tb API at load (each as file:line: message), then the error that
-- stopped the load, if one did.
local agent = require "tb.agent"

local M = {}

-- run(core, path, log) -> exit status (0 ok, 1 problems found)
function M.run(core, path, log)
  local config = {script = path, host = "offline", port = 0, token = "check", session_limits = false}
  local ctx = agent.build(core, config, log)
  ctx.problems = {}
  local gen, err = ctx.loader:load(path)
  local problems = ctx.problems
  if not gen then problems[#problems + 1] = err end
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
