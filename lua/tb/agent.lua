-- tb.agent: wires the scheduler, session and loader around one core (the real tb.core, or
-- the fake of tb.testing) and runs the poll loop of `tbagent run`.
local sched_mod = require "tb.sched"
local session_mod = require "tb.session"
local loader_mod = require "tb.loader"
local api = require "tb"
local ota = require "tb.ota"
local ota_mqtt = require "tb.ota_mqtt"
local ota_http = require "tb.ota_http"
local reload = require "tb.reload"
local router = require "tb.router"
local sqlite_outbox = require "tb.sqlite_outbox"
local status_file = require "tb.status"
local systemd = require "tb.systemd"
local persist = require "tb.persist"

local M = {}

-- build(core, config, log) -> ctx {core, config, log, sched, session, loader, state, current}
function M.build(core, config, log)
  local ctx = {core = core, config = config, log = log, state = {}}
  ctx.clock = config.clock or core.wall
  ctx.sched = sched_mod.new{now = core.now, log = log, budget_ms = config.handler_budget or 1000,
    budget_now = config.budget_clock}
  ctx.current = api.new_generation(0)
  ctx.session = session_mod.new{core = core, sched = ctx.sched, log = log, config = config,
    outbox = config.outbox, clock = ctx.clock,
    generation = function() return ctx.current end,
    on_fatal = function(code, msg) ctx.fatal = ctx.fatal or {code = code, message = msg} end}
  ctx.persist = persist.attach(ctx)
  ctx.sched:timer(60000, function() ctx.session.outbox:expire() end, 60000, nil, "outbox expiry")
  ctx.request_timeout = config.request_timeout
  ctx.rpc_timeout = config.rpc_timeout
  ctx.load_budget_ms = config.load_budget or 5000
  ctx.loader = loader_mod.new(ctx)
  -- firmware (fw_*) and software (sw_*) packages, installed by the script's tb.firmware{} and
  -- tb.software{}; they share one lock: one MQTT chunk download at a time, so an error on
  -- v2/fw/error (where ThingsBoard reports both) belongs to the one download running
  local mqtt_lock = ota_mqtt.new_lock(ctx)
  local function package_updater(kind, name)
    return ota.new(ctx, {prefix = kind .. "_", name = name, policy = function() return ctx.current[name] end,
      mqtt = ota_mqtt.new(ctx, kind, mqtt_lock), http = ota_http.new(ctx)})
  end
  ctx.firmware = package_updater("fw", "firmware")
  ctx.software = package_updater("sw", "software")
  return ctx
end

-- open_outbox(core, config, log, path) -> the durable outbox, or nil (logged) to stay in memory
function M.open_outbox(core, config, log, path)
  local box, err = sqlite_outbox.open{core = core, path = path, log = log, limit = config.outbox_limit,
    max_bytes = config.outbox_max_bytes, max_age_ms = config.outbox_max_age and config.outbox_max_age * 1000,
    clock = config.clock or core.wall}
  if not box then
    log.error("outbox on disk unusable (%s): queued data stays in memory and is lost on a restart", err)
  end
  return box
end

-- lock_state_dir(core, config, log) -> lock | nil, exit message: one agent per state
-- directory (its outbox, tb.persist, downloads and job files); the kernel releases the lock
-- when the process ends, however it ends. A lock that cannot be taken for another reason (a
-- read-only directory) is logged and the agent goes on, as with an unusable directory.
function M.lock_state_dir(core, config, log)
  local lock, err, pid = core.state_lock(config.state_dir .. "/agent.lock")
  if lock then return lock end
  if err == "in use" then
    return nil, string.format("state directory %s is in use by %s", config.state_dir,
      pid and ("pid " .. pid) or "another tbagent")
  end
  log.warn("state directory %s not locked (%s): another agent could use it at the same time", config.state_dir, err)
  return false
end

-- load_error(core, config) -> "file:line: message" when the script does not load, else nil:
-- loaded as `tbagent check` does (offline, nothing kept, its log silent), so that a bad script
-- on a directory another agent holds says what is wrong with the script
function M.load_error(core, config)
  local quiet = require("tb.log").new(function() end, "error")
  local ctx = M.build(core, {script = config.script, host = "offline", port = 0, token = "check",
    session_limits = false, load_budget = config.load_budget}, quiet)
  local gen, err = ctx.loader:load(config.script)
  if gen then return nil end
  return err
end

-- run(core, config, log) -> exit_code, message
function M.run(core, config, log)
  local ok, err = core.signals_open()
  if not ok then return 2, err end
  local sok, serr = core.mkdirs(config.state_dir, 448)
  if not sok then log.error("state directory unusable (%s): downloads will fail, data stays in memory", serr) end
  local lock, busy
  if sok then
    lock, busy = M.lock_state_dir(core, config, log)
    if lock == nil then
      local bad = M.load_error(core, config)
      if bad then return 1, "cannot load " .. config.script .. ": " .. bad end
      return 2, busy
    end
  end
  if sok and not config.memory_outbox then
    config.outbox = M.open_outbox(core, config, log, config.state_dir .. "/outbox.db")
  end
  if sok then config.persist_db, config.persist_db_owned = persist.open_db(core, config, log) end
  local ctx = M.build(core, config, log)
  ctx.state_lock = lock or nil
  local gen
  gen, err = ctx.loader:load(config.script)
  if not gen then
    return 1, "cannot load " .. config.script .. ": " .. err
  end
  ctx.loader:commit(gen)
  log.info("tbagent %s running %s (generation %d)", core.version, config.script, gen.id)
  if config.reload then
    ctx.reloader = reload.new(ctx)
    ctx.reloader:start()
  end
  local session, sched = ctx.session, ctx.sched
  local exit_code, exit_message = 0, nil
  ctx.on_script_exit = function(status, where)
    if ctx.script_exit then return end
    ctx.script_exit = {code = status, message = string.format("the script called os.exit at %s (status %d)", where, status)}
    log.warn("script called os.exit at %s: finishing in-flight messages, then exiting with status %d", where, status)
    session:stop(config.shutdown_timeout or 3000)
  end

  local dispatch = router.bound(ctx)

  -- what `tbagent status` and a service manager see (status.json, READY=1, WATCHDOG=1)
  local status = status_file.start(ctx)
  systemd.start(ctx, status)
  session:start()
  while not session.finished do
    if ctx.fatal then
      exit_code, exit_message = ctx.fatal.code, ctx.fatal.message
      break
    end
    local due = sched:next_due() or 3600000
    local acks_due = session.outbox:idle_commit_in()
    core.poll(acks_due and acks_due < due and acks_due or due, dispatch)
    sched:run_due()
    session.outbox:commit()
    status:tick()
  end
  ctx.persist:close()
  session.outbox:close()
  if ctx.state_lock then ctx.state_lock:release() end
  if ctx.fatal and exit_code == 0 then exit_code, exit_message = ctx.fatal.code, ctx.fatal.message end
  if ctx.script_exit and exit_code == 0 then exit_code, exit_message = ctx.script_exit.code, ctx.script_exit.message end
  status:stopped(exit_code, exit_message)
  if exit_code == 0 then
    log.info("stopped: %d sent, %d acknowledged, %d dropped", session.stats.sent, session.stats.acked, session.stats.dropped)
  end
  return exit_code, exit_message
end

return M
