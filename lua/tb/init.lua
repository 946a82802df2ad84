-- tb: the module a device script requires. Each loaded version of a script (a generation)
-- gets its own tb table, so registrations land in that generation and a hot reload can swap
-- all of them at once. Misuse raises with Lua's wording; the world failing returns nil, err.
-- Reading a name the API does not have raises too, with the closest real one (tb.strict).
local strict = require "tb.strict"

local M = {}

local function argcheck(cond, n, fname, msg)
  if not cond then error(string.format("bad argument #%d to '%s' (%s)", n, fname, msg), 3) end
end

local function typecheck(v, n, fname, want)
  if type(v) ~= want then
    argcheck(false, n, fname, want .. " expected, got " .. (v == nil and "no value" or type(v)))
  end
end

-- The encoder stops once the text passes the payload limit (a huge table costs no more
-- memory than the limit to refuse): the same words as session:check_size.
local function too_large(session)
  return string.format("payload too large: over %d bytes (limit %d)", session.payload_limit, session.payload_limit)
end

local function is_array(t, array_mt)
  if getmetatable(t) == array_mt then return true end
  return t[1] ~= nil
end

local function count_keys(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

local function check_keys(list, n, fname, field)
  if list == nil then return end
  argcheck(type(list) == "table", n, fname, field .. " must be a list of key names")
  for i, k in ipairs(list) do
    argcheck(type(k) == "string" and k ~= "" and not k:find(",", 1, true), n, fname,
      string.format("%s[%d] must be a non-empty key name without commas", field, i))
  end
end

-- new_generation(id) -> gen: the registrations of one loaded version of the script.
function M.new_generation(id)
  return {id = id or 0, rpc = {}, attr_handlers = {}, connect_handlers = {},
    disconnect_handlers = {}, firmware = nil, software = nil, loading = false, held = nil,
    retired = false, modules = {}, module_files = {}}
end

-- bind(ctx, gen) -> tb: the API table for one generation. ctx = {session=, sched=, log=,
-- state=, core=, clock=fn() -> wall ms}. What a script sends and the agent accepts goes to
-- the session's "accepted" listeners as (kind, data): telemetry as a list of {ts=, values=}
-- (the time of the call when the record has none), attributes as the table sent.
function M.bind(ctx, gen)
  local tb = {}
  local session, sched, core = ctx.session, ctx.sched, ctx.core
  local encode, decode = core.json_encode, core.json_decode
  local array_mt = core.json_array_mt

  local function deliver(kind, topic, payload, points)
    if gen.loading then
      local ok, err = session:check_size(topic, payload)
      if not ok then return nil, err end
      gen.held[#gen.held + 1] = {kind = kind, topic = topic, payload = payload, points = points}
      return true
    end
    return session:submit(topic, payload, kind, points)
  end

  -- telemetry_entry(v, stamp, now, entries) -> body | nil, err, points: one {k = v} or
  -- {ts=, values=} entry, checked; entries (when someone listens) collects {ts=, values=}.
  -- ThingsBoard closes the connection for anything but objects here (docs/thingsboard.md
  -- §4.1), so a list where key = value belongs is refused at the call, never queued
  local function telemetry_entry(v, stamp, now, entries, with_ts)
    if type(v) ~= "table" then return nil, "telemetry entries must be tables" end
    if v.ts ~= nil and v.values ~= nil then
      if math.type(v.ts) ~= "integer" then return nil, "ts must be integer milliseconds" end
      if type(v.values) ~= "table" or is_array(v.values, array_mt) then
        return nil, with_ts and "with a ts, send one table of key = value (each entry of a list carries its own ts)"
          or "values must be a table of key = value"
      end
      if entries then entries[#entries + 1] = {ts = v.ts, values = v.values} end
      return v, nil, count_keys(v.values)
    end
    if next(v) == nil then return nil, "no values to send" end
    if is_array(v, array_mt) then return nil, "telemetry entries must be tables of key = value, not lists" end
    if entries then entries[#entries + 1] = {ts = now, values = v} end
    -- data sent later keeps the time it was measured
    if stamp then return {ts = now, values = v}, nil, count_keys(v) end
    return v, nil, count_keys(v)
  end

  -- send_telemetry(values [, ts_ms]) -> true | nil, err
  function tb.send_telemetry(values, ts)
    typecheck(values, 1, "send_telemetry", "table")
    if ts ~= nil then
      argcheck(math.type(ts) == "integer", 2, "send_telemetry", "integer milliseconds expected")
      values = {ts = ts, values = values}
    end
    local stamp = session:would_queue() or gen.loading
    -- the time of the call, when a record will carry it or a listener gets it
    local listeners = session.listeners.accepted
    local entries = #listeners > 0 and {}
    local now = (stamp or entries) and ctx.clock() or nil
    local body, err, points
    if is_array(values, array_mt) then
      body, points = {}, 0
      for i, v in ipairs(values) do
        local e, eerr, n = telemetry_entry(v, stamp, now, entries, false)
        if not e then return nil, eerr end
        body[i], points = e, points + n
      end
      if #body == 0 then return nil, "no values to send" end
    else
      body, err, points = telemetry_entry(values, stamp, now, entries, ts ~= nil)
      if not body then return nil, err end
    end
    local payload, code
    payload, err, code = encode(body, session.payload_limit, true)
    if not payload then
      if code == "too_large" then return nil, too_large(session) end
      -- name the place in the caller's table, not in the {ts=, values=} we wrapped it in
      if stamp or ts then err = err:gsub("%.values([%.%[])", "%1"):gsub(" at %.values$", "") end
      return nil, err
    end
    local ok
    ok, err = deliver("telemetry", session.topics.telemetry, payload, points)
    if ok and entries then
      for _, fn in ipairs(listeners) do fn("telemetry", entries) end
    end
    return ok, err
  end

  -- send_attributes(values) -> true | nil, err (client-side attributes)
  function tb.send_attributes(values)
    typecheck(values, 1, "send_attributes", "table")
    if is_array(values, array_mt) then return nil, "attributes must be a table of key = value" end
    if next(values) == nil then return nil, "no values to send" end
    local payload, err, code = encode(values, session.payload_limit, true)
    if not payload then return nil, code == "too_large" and too_large(session) or err end
    local ok
    ok, err = deliver("attributes", session.topics.attributes, payload, count_keys(values))
    if ok then
      for _, fn in ipairs(session.listeners.accepted) do fn("attributes", values) end
    end
    return ok, err
  end

  -- request_attributes{client={...}, shared={...}, timeout=ms} -> {client=, shared=} | nil, err
  function tb.request_attributes(opts)
    opts = opts or {}
    typecheck(opts, 1, "request_attributes", "table")
    check_keys(opts.client, 1, "request_attributes", "client")
    check_keys(opts.shared, 1, "request_attributes", "shared")
    argcheck(opts.timeout == nil or (type(opts.timeout) == "number" and opts.timeout > 0), 1,
      "request_attributes", "timeout must be a positive number of ms")
    sched:check_yieldable("tb.request_attributes")
    return session:request_attributes({client = opts.client, shared = opts.shared},
      math.floor(opts.timeout or ctx.request_timeout or 10000))
  end

  -- rpc_call(method, params [, timeout_ms]) -> result | nil, err
  function tb.rpc_call(method, params, timeout)
    typecheck(method, 1, "rpc_call", "string")
    argcheck(timeout == nil or (type(timeout) == "number" and timeout > 0), 3, "rpc_call",
      "timeout must be a positive number of ms")
    sched:check_yieldable("tb.rpc_call")
    return session:rpc_call(method, params, math.floor(timeout or ctx.rpc_timeout or 60000))
  end

  -- claim{secret_key=, duration_ms=} -> true | nil, err
  function tb.claim(opts)
    opts = opts or {}
    typecheck(opts, 1, "claim", "table")
    argcheck(opts.secret_key == nil or type(opts.secret_key) == "string", 1, "claim", "secret_key must be a string")
    argcheck(opts.duration_ms == nil or math.type(opts.duration_ms) == "integer", 1, "claim", "duration_ms must be an integer")
    local payload, err = encode({secretKey = opts.secret_key, durationMs = opts.duration_ms})
    if not payload then return nil, err end
    return deliver("claim", session.topics.claim, payload, 0)
  end

  function tb.on_attributes(fn)
    typecheck(fn, 1, "on_attributes", "function")
    gen.attr_handlers[#gen.attr_handlers + 1] = fn
  end

  function tb.on_rpc(method, fn)
    typecheck(method, 1, "on_rpc", "string")
    typecheck(fn, 2, "on_rpc", "function")
    gen.rpc[method] = fn
  end

  function tb.on_connect(fn)
    typecheck(fn, 1, "on_connect", "function")
    gen.connect_handlers[#gen.connect_handlers + 1] = fn
  end

  function tb.on_disconnect(fn)
    typecheck(fn, 1, "on_disconnect", "function")
    gen.disconnect_handlers[#gen.disconnect_handlers + 1] = fn
  end

  local function new_timer(fname, ms, fn, periodic)
    argcheck(type(ms) == "number", 1, fname, "number expected, got " .. (ms == nil and "no value" or type(ms)))
    argcheck(ms == ms and ms >= (periodic and 1 or 0) and ms < math.huge, 1, fname,
      periodic and "interval must be at least 1 ms" or "delay must be >= 0")
    typecheck(fn, 2, fname, "function")
    ms = math.floor(ms)
    local t = sched.strict_timer(sched:timer(ms, fn, periodic and ms or nil, gen, "tb." .. fname .. " handler"))
    if gen.retired then t:cancel() end
    return t
  end

  -- every(ms, fn) / after(ms, fn) -> timer with :cancel()
  function tb.every(ms, fn) return new_timer("every", ms, fn, true) end
  function tb.after(ms, fn) return new_timer("after", ms, fn, false) end

  -- sleep(ms): yields the running handler
  function tb.sleep(ms)
    argcheck(type(ms) == "number" and ms >= 0, 1, "sleep", "number of ms expected")
    sched:check_yieldable("tb.sleep")
    sched:sleep(math.floor(ms))
  end

  -- exec(command [, {timeout=ms, output_limit=bytes}]) -> output | nil, err, code, output
  -- Runs a command without blocking the agent: a string goes to /bin/sh -c, a table is an
  -- argv (no shell). Yields until it ends. err: "exit N: <last output line>", "signal N",
  -- "timeout" (the command is killed), why it could not start, or why the agent killed it.
  function tb.exec(command, opts)
    opts = opts or {}
    local argv
    if type(command) == "string" then
      argv = {"/bin/sh", "-c", command}
    else
      argcheck(type(command) == "table", 1, "exec", "string or table expected, got " .. (command == nil and "no value" or type(command)))
      argcheck(#command >= 1, 1, "exec", "command table is empty")
      argv = {}
      for i, a in ipairs(command) do
        argcheck(type(a) == "string" or type(a) == "number", 1, "exec", "argument " .. i .. " must be a string")
        argv[i] = tostring(a)
      end
    end
    typecheck(opts, 2, "exec", "table")
    sched:check_yieldable("tb.exec")
    -- the timeout goes along for tb.testing's core, which runs the command at once
    local id, err = core.spawn(argv, opts.output_limit or 65536, opts.timeout or 600000)
    if not id then return nil, err end
    local code, sig, output, killed_why = sched:wait("exec:" .. id, opts.timeout or 600000)
    if code == nil then
      core.spawn_kill(id)
      return nil, "timeout"
    end
    if killed_why then return nil, killed_why, code, output end
    if code == 0 then return output end
    if code < 0 then return nil, "signal " .. tostring(sig), code, output end
    local last = output:match("([^\n]+)\n*$")
    return nil, "exit " .. code .. (last and (": " .. last) or ""), code, output
  end

  -- firmware{current=, accept=, install=, progress=, chunk_size=} / software{...}
  local function ota_policy(fname)
    return function(spec)
      typecheck(spec, 1, fname, "table")
      argcheck(spec.current == nil or type(spec.current) == "table", 1, fname, "current must be {title=, version=}")
      argcheck(spec.accept == nil or type(spec.accept) == "function", 1, fname, "accept must be a function")
      argcheck(type(spec.install) == "function", 1, fname, "install must be a function")
      argcheck(spec.progress == nil or type(spec.progress) == "function", 1, fname, "progress must be a function")
      argcheck(spec.chunk_size == nil or (math.type(spec.chunk_size) == "integer" and spec.chunk_size > 0 and spec.chunk_size <= 65536),
        1, fname, "chunk_size must be an integer from 1 to 65536")
      gen[fname] = spec
    end
  end
  tb.firmware = ota_policy("firmware")
  tb.software = ota_policy("software")

  -- backlog() -> queued, in_flight: records waiting in the outbox and awaiting PUBACK, so a
  -- producer can slow down instead of letting the outbox drop the oldest
  function tb.backlog() return session.outbox:count(), session.inflight_n end

  -- connected() -> true while a session with the server is up
  function tb.connected() return session:online() end
  -- now() -> wall-clock milliseconds (the fake clock under tb.testing)
  function tb.now() return ctx.clock() end

  tb.state = ctx.state
  local log = ctx.script_log or ctx.log
  tb.log = {}
  for k, v in pairs(log) do
    if type(v) == "function" then tb.log[k] = v end
  end
  strict.table("tb.log", tb.log)
  tb.json = strict.table("tb.json", {
    encode = encode, decode = decode, null = core.json_null,
    array = function(t) return setmetatable(t or {}, array_mt) end,
  })
  if ctx.persist then tb.persist = strict.table("tb.persist", ctx.persist:api(gen)) end
  tb.version = core.version
  return strict.table("tb", tb)
end

return M
