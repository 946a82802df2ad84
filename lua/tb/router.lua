-- tb.router: the one path every event of the loop takes into the library. The agent's poll
-- loop and tb.testing's fake both call route(), so the fake cannot drift from the agent: the
-- fake supplies only a fake core (transport, clock) and a fake server.
-- An event is (kind, a, b, c, s1, s2) as tb.core's loop delivers it (docs/architecture.md,
-- "Events"). Agent code that fails here is logged and the loop goes on: one bad event never
-- stops the agent.
local reload = require "tb.reload"
local ota_http = require "tb.ota_http"

local M = {}

-- on_signal(ctx, name): HUP reloads the script; the first TERM/INT drains and stops, a
-- second one stops at once
local function on_signal(ctx, name)
  local log, session = ctx.log, ctx.session
  if name == "HUP" then
    -- also under --no-reload: SIGHUP is how a user asks for a reload there
    ctx.reloader = ctx.reloader or reload.new(ctx)
    ctx.reloader:reload("SIGHUP")
    return
  end
  ctx.signals = (ctx.signals or 0) + 1
  if ctx.signals > 1 then
    log.warn("second SIG%s: exiting now", name)
    session.finished = true
    return
  end
  log.info("SIG%s: finishing in-flight messages, then disconnecting", name)
  session:stop(ctx.config.shutdown_timeout or 3000)
end

local function deliver(ctx, kind, a, b, c, s1, s2)
  if kind == "signal" then return on_signal(ctx, s1) end
  if kind == "exit" then return ctx.sched:wake("exec:" .. a, b, c, s1, s2) end
  if kind == "watch" then
    if ctx.reloader then ctx.reloader:on_watch(s1) end
    return
  end
  -- a download's end goes to the job that started it (tb.ota_http knows the ids)
  if kind == "http_done" then return ota_http.on_done(ctx, a, b, c, s1, s2) end
  return ctx.session:on_event(kind, a, b, c, s1, s2)
end

-- route(ctx, kind, a, b, c, s1, s2) -> true | false, err: one event, to the part of the agent
-- it belongs to; an internal error is logged (tb.testing also raises it, to fail the spec)
function M.route(ctx, kind, a, b, c, s1, s2)
  local ok, err = xpcall(deliver, debug.traceback, ctx, kind, a, b, c, s1, s2)
  if not ok then
    ctx.log.error("internal error while handling %s: %s", kind, err)
    return false, err
  end
  return true
end

-- bound(ctx) -> function(kind, ...) bound to ctx, as tb.core.poll calls it
function M.bound(ctx)
  return function(kind, a, b, c, s1, s2) return M.route(ctx, kind, a, b, c, s1, s2) end
end

return M
