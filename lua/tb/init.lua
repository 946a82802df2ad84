-- tb: the module a device script requires. Each loaded version of a script (a generation)
-- gets its own tb table, so registrations land in that generation and a hot reload can swap
-- all of them at once. Misuse raises with Lua's wording; the world failing returns nil, err.
-- Reading a name the API does not have raises too, with the closest real one (tb.strict).
local strict = require "tb.strict"

local M = {}

-- "@lua/tb/" embedded in the binary, "@/usr/.../tb/" installed: the library's own frames
local LIB_SRC = (debug.getinfo(1, "S").source or ""):match("^(@.*/)[^/]*$")

-- script_level(level) -> the level (as debug.getinfo counts from its caller) of the first
-- frame above `level` that is the script's: neither the library's nor C; nil when there is
-- none (a tail call left none). Counting levels is not enough: helpers add frames, a tail
-- call removes one, and pcall or `tbagent check`'s collecting wrapper sit in between.
local function script_level(level)
  level = level + 1   -- this function's own frame
  while true do
    local info = debug.getinfo(level, "S")
    if not info then return nil end
    if info.what ~= "C" and not (LIB_SRC and info.source:sub(1, #LIB_SRC) == LIB_SRC) then
      return level - 1
    end
    level = level + 1
  end
end

-- raise(msg): a misuse error at the script's line
local function raise(msg)
  local level = script_level(2)
  error(msg, level or 0)
end
M.raise = raise

-- script_where() -> "file:line" of the script's call that got here, or "?"
local function script_where()
  local level = script_level(2)
  local info = level and debug.getinfo(level, "Sl")
  return info and string.format("%s:%d", info.short_src, info.currentline) or "?"
end

local function argcheck(cond, n, fname, msg)
  if not cond then raise(string.format("bad argument #%d to '%s' (%s)", n, fname, msg)) end
end

local function typecheck(v, n, fname, want)
  if type(v) ~= want then
    argcheck(false, n, fname, want .. " expected, got " .. (v == nil and "no value" or type(v)))
  end
end

-- what a time added by the session puts around an entry, besides the digits of the time
local STAMP_FRAME = '{"ts":,"values":}'

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

  -- deliver(kind, topic, payload, points [, stamp, extra]): see session:submit
  -- yieldable(fname): raises at the script's line unless called from a handler
  local function yieldable(fname)
    if not sched:current() then
      raise(string.format("%s yields and cannot be called at a script's top level; call it from a handler (e.g. tb.after(0, fn))", fname))
    end
  end

  local function deliver(kind, topic, payload, points, stamp, extra)
    if gen.loading then
      local ok, err = session:check_size(topic, payload, extra)
      if not ok then return nil, err end
      gen.held[#gen.held + 1] = {kind = kind, topic = topic, payload = payload, points = points,
        stamp = stamp, extra = extra}
      return true
    end
    return session:submit(topic, payload, kind, points, stamp, extra)
  end

  -- Who puts the time on telemetry without a ts of its own (--timestamps, the contract's
  -- "What goes on the wire for telemetry"): "device" stamps every record with the time of
  -- the call; "server" never (ThingsBoard stamps on arrival); "auto" sends the script's form
  -- and the session adds the time of the call only to a record that had to wait, and only
  -- when the clock was synchronised at the call.
  local timestamps = ctx.config and ctx.config.timestamps or "auto"

  -- telemetry_entry(v, stamp, now, entries, with_ts) -> body | nil, err, points, untimed: one
  -- {k = v} or {ts=, values=} entry, checked; stamp: wrap an entry without ts in {ts = now};
  -- untimed: 1 when the entry has no ts of its own; entries (when someone listens) collects
  -- {ts=, values=}. ThingsBoard closes the connection for anything but objects here
  -- (docs/thingsboard.md §4.1), so a list where key = value belongs is refused at the call,
  -- never queued
  local function telemetry_entry(v, stamp, now, entries, with_ts)
    if type(v) ~= "table" then return nil, "telemetry entries must be tables" end
    if v.ts ~= nil and v.values ~= nil then
      if math.type(v.ts) ~= "integer" then return nil, "ts must be integer milliseconds" end
      if type(v.values) ~= "table" or is_array(v.values, array_mt) then
        return nil, with_ts and "with a ts, send one table of key = value (each entry of a list carries its own ts)"
          or "values must be a table of key = value"
      end
      if entries then entries[#entries + 1] = {ts = v.ts, values = v.values} end
      return v, nil, count_keys(v.values), 0
    end
    if next(v) == nil then return nil, "no values to send" end
    if is_array(v, array_mt) then return nil, "telemetry entries must be tables of key = value, not lists" end
    if entries then entries[#entries + 1] = {ts = now, values = v} end
    if stamp then return {ts = now, values = v}, nil, count_keys(v), 0 end
    return v, nil, count_keys(v), 1
  end

  -- send_telemetry(values [, ts_ms]) -> true | nil, err
  function tb.send_telemetry(values, ts)
    typecheck(values, 1, "send_telemetry", "table")
    if ts ~= nil then
      argcheck(math.type(ts) == "integer", 2, "send_telemetry", "integer milliseconds expected")
      values = {ts = ts, values = values}
    end
    local stamp = timestamps == "device"
    -- the time of the call, when a record may carry it or a listener gets it
    local listeners = session.listeners.accepted
    local entries = #listeners > 0 and {}
    local now = (timestamps ~= "server" or entries) and ctx.clock() or nil
    local body, err, points, untimed
    if is_array(values, array_mt) then
      body, points, untimed = {}, 0, 0
      for i, v in ipairs(values) do
        local e, eerr, n, u = telemetry_entry(v, stamp, now, entries, false)
        if not e then return nil, eerr end
        body[i], points, untimed = e, points + n, untimed + u
      end
      if #body == 0 then return nil, "no values to send" end
    else
      body, err, points, untimed = telemetry_entry(values, stamp, now, entries, ts ~= nil)
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
    -- auto: the time to add if the record has to wait, 0 when the clock cannot give it, and
    -- the bytes it adds ({"ts":<now>,"values":...} around each entry without a ts)
    local at, extra
    if timestamps == "auto" and untimed > 0 then
      if session.core.clock_synced() then
        at, extra = now, untimed * (#STAMP_FRAME + #tostring(now))
      else
        at = 0
      end
    end
    local ok
    ok, err = deliver("telemetry", session.topics.telemetry, payload, points, at, extra)
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
    yieldable("tb.request_attributes")
    return session:request_attributes({client = opts.client, shared = opts.shared},
      math.floor(opts.timeout or ctx.request_timeout or 10000))
  end

  -- rpc_call(method, params [, timeout_ms]) -> result | nil, err
  function tb.rpc_call(method, params, timeout)
    typecheck(method, 1, "rpc_call", "string")
    argcheck(timeout == nil or (type(timeout) == "number" and timeout > 0), 3, "rpc_call",
      "timeout must be a positive number of ms")
    yieldable("tb.rpc_call")
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
    -- named by where the script made it: its errors are reported (and counted) under that
    local t = sched.strict_timer(sched:timer(ms, fn, periodic and ms or nil, gen, "timer at " .. script_where()))
    if gen.retired then t:cancel() end
    return t
  end

  -- every(ms, fn) / after(ms, fn) -> timer with :cancel()
  function tb.every(ms, fn) return new_timer("every", ms, fn, true) end
  function tb.after(ms, fn) return new_timer("after", ms, fn, false) end

  -- sleep(ms): yields the running handler
  function tb.sleep(ms)
    argcheck(type(ms) == "number" and ms >= 0, 1, "sleep", "number of ms expected")
    yieldable("tb.sleep")
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
    yieldable("tb.exec")
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
    array = function(t)
      argcheck(t == nil or type(t) == "table", 1, "array", "table expected, got " .. type(t))
      argcheck(t == nil or getmetatable(t) == nil or getmetatable(t) == array_mt, 1, "array",
        "the table has a metatable of its own")
      return setmetatable(t or {}, array_mt)
    end,
  })
  if ctx.persist then tb.persist = strict.table("tb.persist", ctx.persist:api(gen)) end
  tb.version = core.version
  return strict.table("tb", tb)
end

return M
