-- tb.cli: the tbagent command line: options and environment variables, validation with
-- one clear line per problem, and the exit codes of the contract
-- (0 clean shutdown, 1 script failed to load, 2 bad usage or state directory in use, 3 credentials refused).
local M = {}

-- The tables below are the one source of `tbagent --help` and of the manual page
-- (`tbagent --help-man`, tb.manpage): an option, command, signal or file added here is
-- documented in both.

-- synopsis, what it does
local COMMANDS = {
  {"run SCRIPT.lua [options]", "connect to ThingsBoard and run a device script"},
  {"check SCRIPT.lua", "load the script against an offline session and find every tb.<name> that does not exist"},
  {"test [SPEC|DIR ...]", "run Busted specs on the agent's own Lua 5.4 and tb library (busted options pass through)"},
  {"init DIR", "a new script folder: device.lua, a spec, .busted and .luacheckrc; never overwrites"},
  {"status [NAME] [--state-dir DIR] [--json]", "what the agent running on a state directory is doing"},
  {"--help | --help-man | --version", "this text, the manual page (roff), the version"},
}

-- where `tbagent status NAME` looks: the state of the systemd instance tbagent@NAME
-- (StateDirectory=tbagent/NAME in tbagent@.service)
local SERVICE_STATE_ROOT = "/var/lib/tbagent"

-- name, env, kind, default, help. Every option can also come from its TB_* variable;
-- the command line wins.
local OPTIONS = {
  {"host", "TB_HOST", "string", "127.0.0.1", "MQTT host of ThingsBoard"},
  {"port", "TB_PORT", "port", nil, "MQTT port (default 1883, 8883 with TLS)"},
  {"token", "TB_TOKEN", "string", nil, "device access token (sent as the MQTT user name)"},
  {"client-id", "TB_CLIENT_ID", "string", nil, "MQTT basic credentials: client id"},
  {"username", "TB_USERNAME", "string", nil, "MQTT basic credentials: user name"},
  {"password", "TB_PASSWORD", "string", nil, "MQTT basic credentials: password"},
  {"cafile", "TB_CAFILE", "file", nil, "TLS: verify the server against this CA file"},
  {"cert", "TB_CERT", "file", nil, "TLS: X.509 device certificate (PEM)"},
  {"key", "TB_KEY", "file", nil, "TLS: private key of --cert (PEM)"},
  {"tls", "TB_TLS", "flag", false, "TLS verified against the system's CA store"},
  {"state-dir", "TB_STATE_DIR", "string", "./.tbagent", "where state that survives a restart is kept"},
  {"log-level", "TB_LOG_LEVEL", "level", "info", "debug, info, warn or error"},
  {"no-reload", "TB_NO_RELOAD", "flag", false, "do not watch the script for changes"},
  {"keepalive", "TB_KEEPALIVE", "int", 60, "MQTT keepalive in seconds (0 off, else >= 5)"},
  {"qos", "TB_QOS", "qos", 1, "QoS of telemetry and attributes: 0 or 1 (never 2)"},
  {"outbox-limit", "TB_OUTBOX_LIMIT", "int", 100000, "records kept while offline (oldest dropped)"},
  {"outbox-max-bytes", "TB_OUTBOX_MAX_BYTES", "int", 67108864, "payload bytes kept while offline (oldest dropped)"},
  {"outbox-max-age", "TB_OUTBOX_MAX_AGE", "int", 604800, "seconds a record may wait before it is dropped"},
  {"memory-outbox", "TB_MEMORY_OUTBOX", "flag", false, "keep queued data in memory only (lost on restart)"},
  {"payload-limit", "TB_PAYLOAD_LIMIT", "int", 65536, "largest MQTT message in bytes"},
  {"max-inflight", "TB_MAX_INFLIGHT", "int", 100, "QoS 1 messages awaiting PUBACK at once"},
  {"rate-limits", "TB_RATE_LIMITS", "rates", nil, "pace publishes, e.g. 20:1,600:60"},
  {"no-session-limits", "TB_NO_SESSION_LIMITS", "flag", false, "do not ask the server for getSessionLimits"},
  {"backoff-min", "TB_BACKOFF_MIN", "int", 1000, "first reconnect delay in ms"},
  {"backoff-max", "TB_BACKOFF_MAX", "int", 60000, "longest reconnect delay in ms"},
  {"handler-budget", "TB_HANDLER_BUDGET", "int", 1000, "ms a handler may run without yielding (0: no limit)"},
  {"request-timeout", "TB_REQUEST_TIMEOUT", "int", 10000, "default timeout of request_attributes in ms"},
  {"rpc-timeout", "TB_RPC_TIMEOUT", "int", 60000, "default timeout of rpc_call in ms"},
  {"shutdown-timeout", "TB_SHUTDOWN_TIMEOUT", "int", 3000, "ms to finish in-flight messages on SIGTERM"},
  {"fw-window", "TB_FW_WINDOW", "int", 4, "firmware chunks requested at once over MQTT"},
  {"fw-chunk-timeout", "TB_FW_CHUNK_TIMEOUT", "int", 10000, "ms to wait for a firmware chunk before asking again"},
  {"http-cafile", "TB_HTTP_CAFILE", "file", nil, "CA file for fw_url downloads (default: the system's CA store)"},
  {"timestamps", "TB_TIMESTAMPS", "mode", "auto", "who puts the time on telemetry: auto, device or server"},
  {"connect-timeout", "TB_CONNECT_TIMEOUT", "int", 30000, "ms to wait for the server to answer a connection"},
}

-- `tbagent status` takes --state-dir (above) and these
local STATUS_OPTIONS = {
  {"json", nil, "flag", false, "print the status as one JSON object"},
}

-- what the agent does on a signal
local SIGNALS = {
  {"SIGTERM, SIGINT", "finish the messages in flight (--shutdown-timeout), disconnect, exit 0; a second one exits at once"},
  {"SIGHUP", "reload the script now (also under --no-reload)"},
}

-- exit status of run and check; of status
local EXIT_CODES = {
  {0, "clean shutdown"}, {1, "script failed to load"}, {2, "bad usage, or the state directory is in use by another agent"}, {3, "credentials refused"},
}
local STATUS_EXIT_CODES = {
  {0, "connected"}, {1, "running but offline"}, {3, "not running"}, {4, "status file unreadable"},
}

-- files the agent reads and writes (STATE: the --state-dir)
local FILES = {
  {"STATE/status.json", "what the agent is doing, rewritten every 15 s and at each change; read by tbagent status"},
  {"STATE/outbox.db", "the durable outbox (data accepted while offline) and the values of tb.persist (SQLite)"},
  {"STATE/firmware/, STATE/software/", "update downloads and the installed version (current.json)"},
  {"/etc/tbagent/NAME.lua", "the script of the systemd instance tbagent@NAME"},
  {"/etc/tbagent/NAME.env", "its options as TB_* variables (mode 0600: it holds the token)"},
  {SERVICE_STATE_ROOT .. "/NAME", "its state directory (StateDirectory=tbagent/NAME)"},
}

-- variables the agent reads besides the options' own
local ENVIRONMENT = {
  {"NOTIFY_SOCKET", "the service manager's socket: READY=1 once the script is loaded, STATUS= lines, STOPPING=1"},
  {"WATCHDOG_USEC, WATCHDOG_PID", "send WATCHDOG=1 at half this interval (WatchdogSec=)"},
  {"JOURNAL_STREAM", "when it names stderr: log lines without a timestamp, with a syslog priority prefix (<4>)"},
}

local by_name, status_by_name = {}, {}
for _, o in ipairs(OPTIONS) do by_name[o[1]] = o end
for _, o in ipairs(STATUS_OPTIONS) do status_by_name[o[1]] = o end

-- option_arg(o) -> "HOST", "FILE"... the argument an option takes ("" for a flag)
local function option_arg(o)
  return o[3] == "flag" and "" or (o[3] == "file" and "FILE" or o[3]:upper())
end

local function codes_text(codes)
  local parts = {}
  for _, c in ipairs(codes) do parts[#parts + 1] = c[1] .. " " .. c[2] end
  return table.concat(parts, ", ")
end

local function help_text()
  local lines = {}
  for i, c in ipairs(COMMANDS) do
    local synopsis = (i == 1 and "usage: " or "       ") .. "tbagent " .. c[1]
    if #synopsis > 40 then
      lines[#lines + 1] = synopsis
      synopsis = ""
    end
    lines[#lines + 1] = string.format("%-41s %s", synopsis, c[2])
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "options (each also read from its environment variable):"
  for _, o in ipairs(OPTIONS) do
    local arg = option_arg(o)
    local def = o[4] ~= nil and o[4] ~= false and (" [" .. tostring(o[4]) .. "]") or ""
    lines[#lines + 1] = string.format("  --%-24s %-22s %s%s", o[1] .. (arg ~= "" and " " .. arg or ""), o[2], o[5], def)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "status options (NAME: the state of tbagent@NAME, " .. SERVICE_STATE_ROOT .. "/NAME):"
  lines[#lines + 1] = string.format("  --%-24s %s", "state-dir DIR", "the state directory of the agent to ask about")
  for _, o in ipairs(STATUS_OPTIONS) do
    lines[#lines + 1] = string.format("  --%-24s %s", o[1], o[5])
  end
  lines[#lines + 1] = ""
  for _, sig in ipairs(SIGNALS) do lines[#lines + 1] = string.format("%s: %s", sig[1], sig[2]) end
  lines[#lines + 1] = "exit status: " .. codes_text(EXIT_CODES)
  lines[#lines + 1] = "status exit status: " .. codes_text(STATUS_EXIT_CODES)
  lines[#lines + 1] = "(check: 1 when it finds a problem; test: Busted's status, 1 when a spec fails)"
  return table.concat(lines, "\n") .. "\n"
end

local function convert(o, raw, source)
  local kind = o[3]
  local function bad(what)
    return nil, string.format("%s must be %s (got %q)", source, what, raw)
  end
  if kind == "string" then
    if raw == "" then return bad("a non-empty string") end
    return raw
  elseif kind == "file" then
    local f = io.open(raw, "rb")
    if not f then return bad("a readable file") end
    f:close()
    -- a directory opens too; "dir/." exists only for one (nothing is read: a pipe such as
    -- --key <(decrypt key.pem) keeps its contents for libmosquitto)
    local d = io.open(raw .. "/.", "rb")
    if d then
      d:close()
      return bad("a readable file")
    end
    return raw
  elseif kind == "flag" then
    if raw == true or raw == "1" or raw == "true" or raw == "yes" then return true end
    if raw == "0" or raw == "false" or raw == "no" or raw == "" then return false end
    return bad("1 or 0")
  elseif kind == "int" then
    -- digits only: tonumber would also take "1e3", "0x10" and " 16 "
    local n = type(raw) == "string" and raw:match("^%d+$") and math.tointeger(tonumber(raw))
    if not n or n < 0 then return bad("a non-negative integer") end
    return n
  elseif kind == "port" then
    local n = type(raw) == "string" and raw:match("^%d+$") and math.tointeger(tonumber(raw))
    if not n or n < 1 or n > 65535 then return bad("a port number from 1 to 65535") end
    return n
  elseif kind == "qos" then
    if raw == "0" or raw == "1" then return tonumber(raw) end
    return bad("0 or 1 (ThingsBoard answers QoS 2 like QoS 1, which breaks clients)")
  elseif kind == "rates" then
    local ok, err = require("tb.limits").parse(raw)
    if not ok then return nil, source .. ": " .. err end
    return raw
  elseif kind == "level" then
    if raw == "debug" or raw == "info" or raw == "warn" or raw == "error" then return raw end
    return bad("debug, info, warn or error")
  elseif kind == "mode" then
    if raw == "auto" or raw == "device" or raw == "server" then return raw end
    return bad("auto, device or server")
  end
end

-- parse(argv, getenv) -> {command=, script=, options=} | nil, err
function M.parse(argv, getenv)
  getenv = getenv or os.getenv
  local res = {options = {}}
  local given = {}
  local i = 1
  local positional = {}
  while argv[i] do
    local a = argv[i]
    if a == "--help" or a == "-h" then return {command = "help"} end
    if a == "--help-man" then return {command = "help-man"} end
    if a == "--version" then return {command = "version"} end
    local name, value = a:match("^%-%-([%w%-]+)=(.*)$")
    if not name then name = a:match("^%-%-([%w%-]+)$") end
    if name then
      local o = by_name[name] or status_by_name[name]
      if not o then return nil, "unknown option --" .. name end
      if o[3] == "flag" then
        value = value or true
      elseif value == nil then
        i = i + 1
        value = argv[i]
        -- "--token --host h" is a forgotten value, not the token "--host" (--opt=--x still works)
        if value == nil or by_name[value:match("^%-%-([%w%-]+)") or ""] then
          return nil, "--" .. name .. " needs a value"
        end
      end
      local v, err = convert(o, value, "--" .. name)
      if v == nil then return nil, err end
      given[name] = v
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, "unknown option " .. a
    else
      positional[#positional + 1] = a
    end
    i = i + 1
  end
  res.command, res.script = positional[1], positional[2]
  if not res.command then return nil, "missing command" end
  if res.command == "status" then return M.parse_status(positional, given, getenv) end
  for name in pairs(given) do
    if status_by_name[name] then return nil, "--" .. name .. " is an option of tbagent status" end
  end
  if res.command ~= "run" and res.command ~= "check" then
    -- test and init are handled before options are parsed (M.main); here they are misplaced
    if res.command == "test" or res.command == "init" then
      return nil, res.command .. " must come first: tbagent " .. res.command .. " ..."
    end
    return nil, "unknown command " .. res.command
  end
  if not res.script then return nil, "missing SCRIPT.lua after " .. res.command end
  if positional[3] then return nil, "unexpected argument " .. positional[3] end
  for _, o in ipairs(OPTIONS) do
    local v = given[o[1]]
    if v == nil then
      local raw = getenv(o[2])
      if raw ~= nil and raw ~= "" then
        local err
        v, err = convert(o, raw, o[2])
        if v == nil then return nil, err end
      end
    end
    if v == nil then v = o[4] end
    res.options[o[1]] = v
  end
  return res
end

-- parse_status(positional, given, getenv) -> {command="status", options={state-dir=, json=}}
-- | nil, err: `tbagent status [NAME] [--state-dir DIR] [--json]`
function M.parse_status(positional, given, getenv)
  for name in pairs(given) do
    if name ~= "state-dir" and not status_by_name[name] then
      return nil, "--" .. name .. " is not an option of tbagent status (it takes --state-dir and --json)"
    end
  end
  local instance = positional[2]
  if positional[3] then return nil, "unexpected argument " .. positional[3] end
  local dir = given["state-dir"]
  if instance then
    if dir then return nil, "give either an instance NAME or --state-dir, not both" end
    if not instance:match("^[%w_.@:%-]+$") or instance:match("^%.") then
      return nil, string.format("status NAME must be a systemd instance name (got %q)", instance)
    end
    dir = SERVICE_STATE_ROOT .. "/" .. instance
  end
  if not dir then
    local env = getenv(by_name["state-dir"][2])
    dir = env ~= nil and env ~= "" and env or by_name["state-dir"][4]
  end
  return {command = "status", options = {["state-dir"] = dir, json = given.json or false}}
end

-- config(options, script) -> config table for tb.agent | nil, err
function M.config(o, script)
  local c = {
    script = script, host = o.host, port = o.port, token = o.token, client_id = o["client-id"],
    username = o.username, password = o.password, cafile = o.cafile, cert = o.cert, key = o.key,
    tls = o.tls or o.cafile ~= nil or o.cert ~= nil, state_dir = o["state-dir"],
    log_level = o["log-level"], reload = not o["no-reload"], keepalive = o.keepalive,
    qos = o.qos, outbox_limit = o["outbox-limit"], outbox_max_bytes = o["outbox-max-bytes"],
    outbox_max_age = o["outbox-max-age"], memory_outbox = o["memory-outbox"], payload_limit = o["payload-limit"],
    max_inflight = o["max-inflight"], rate_limits = o["rate-limits"],
    session_limits = not o["no-session-limits"], backoff_min = o["backoff-min"],
    backoff_max = o["backoff-max"], handler_budget = o["handler-budget"],
    request_timeout = o["request-timeout"], rpc_timeout = o["rpc-timeout"],
    shutdown_timeout = o["shutdown-timeout"], fw_window = o["fw-window"],
    fw_chunk_timeout = o["fw-chunk-timeout"], http_cafile = o["http-cafile"],
    timestamps = o.timestamps, connect_timeout = o["connect-timeout"],
  }
  if c.fw_window < 1 or c.fw_window > 64 then return nil, "--fw-window must be 1 to 64" end
  if c.token and (c.username or c.password or c.client_id) then
    return nil, "give either --token or MQTT basic credentials (--client-id/--username/--password), not both"
  end
  -- ThingsBoard ignores user name and password when the device presents a certificate
  if not c.token and not c.username and not c.client_id and not c.cert then
    return nil, "no credentials: give --token TOKEN (or TB_TOKEN), --client-id/--username/--password, or --cert/--key"
  end
  if (c.cert == nil) ~= (c.key == nil) then
    return nil, "--cert and --key go together (the device certificate and its private key)"
  end
  -- libmosquitto refuses 1-4 s (MQTT allows 0: no keepalive; ThingsBoard's own limit is 65535)
  if (c.keepalive > 0 and c.keepalive < 5) or c.keepalive > 65535 then
    return nil, "--keepalive must be 0 (off) or 5 to 65535 seconds"
  end
  if c.outbox_limit < 1 then return nil, "--outbox-limit must be at least 1" end
  for _, k in ipairs({"outbox-max-bytes", "outbox-max-age", "fw-chunk-timeout", "request-timeout", "rpc-timeout", "connect-timeout"}) do
    if o[k] < 1 then return nil, "--" .. k .. " must be at least 1" end
  end
  if c.max_inflight < 1 or c.max_inflight > 65535 then return nil, "--max-inflight must be 1 to 65535" end
  if c.payload_limit < 64 then return nil, "--payload-limit must be at least 64 bytes" end
  if c.backoff_min < 1 or c.backoff_max < c.backoff_min then
    return nil, "--backoff-min must be >= 1 and --backoff-max >= --backoff-min"
  end
  local limits = require "tb.limits"
  local ok, err = limits.parse(c.rate_limits)
  if not ok then return nil, "--rate-limits: " .. err end
  c.port = c.port or (c.tls and 8883 or 1883)
  return c
end

local function fail(core, code, msg)
  -- in the journal the last word is an error too (journalctl -p err shows why it stopped)
  local prefix = core.log_journal and core.log_journal() and "<3>" or ""
  io.stderr:write(prefix, "tbagent: ", msg, "\n")
  return code
end

-- main(argv) -> exit status
function M.main(argv)
  local core = require "tb.core"
  -- test hands everything after it to Busted; init takes one folder
  if argv[1] == "test" then
    return require("tb.test_command").run(table.move(argv, 2, #argv, 1, {}))
  elseif argv[1] == "init" then
    if not argv[2] or argv[3] or argv[2]:sub(1, 1) == "-" then
      return fail(core, 2, "usage: tbagent init DIR (one folder, created if missing)")
    end
    return require("tb.init_command").run(core, argv[2])
  end
  local parsed, err = M.parse(argv)
  if not parsed then return fail(core, 2, err .. "; see tbagent --help") end
  if parsed.command == "help" then
    io.stdout:write(help_text())
    return 0
  elseif parsed.command == "help-man" then
    local manual = M.manual()
    manual.version = core.version
    io.stdout:write(require("tb.manpage").render(manual))
    return 0
  elseif parsed.command == "status" then
    return require("tb.status").command(parsed.options["state-dir"], parsed.options.json, core)
  elseif parsed.command == "version" then
    io.stdout:write("tbagent ", core.version, "\n")
    return 0
  end
  local logmod = require "tb.log"
  local log = logmod.new(core.log_write, parsed.options["log-level"])
  if parsed.command == "check" then
    return require("tb.check").run(core, parsed.script, log)
  end
  local config
  config, err = M.config(parsed.options, parsed.script)
  if not config then return fail(core, 2, err) end
  M.register_secrets(core, config)
  local code, msg = require("tb.agent").run(core, config, log)
  if code ~= 0 then
    return fail(core, code, core.mask(msg or "stopped"))
  end
  return 0
end

-- register_secrets(core, config): the token and the password are masked in every log line,
-- also as they look inside JSON text (a password with '"' or '\' is escaped there). One or
-- two characters are not masked (core.log_secret): that would garble every line.
function M.register_secrets(core, config)
  for _, what in ipairs({"token", "password"}) do
    local secret = config[what]
    if type(secret) == "string" and secret ~= "" then
      core.log_secret(secret)
      local quoted = core.json_encode(secret)
      if quoted and quoted:sub(2, -2) ~= secret then core.log_secret(quoted:sub(2, -2)) end
    end
  end
end

M.help_text = help_text

-- manual() -> what tb.manpage renders: the tables --help is made of
function M.manual()
  local status_options = {{"state-dir", nil, "string", nil, "the state directory of the agent to ask about"}}
  for _, o in ipairs(STATUS_OPTIONS) do status_options[#status_options + 1] = o end
  return {commands = COMMANDS, options = OPTIONS, status_options = status_options, option_arg = option_arg,
    signals = SIGNALS, exit_codes = EXIT_CODES, status_exit_codes = STATUS_EXIT_CODES, files = FILES,
    environment = ENVIRONMENT, service_state_root = SERVICE_STATE_ROOT}
end
return M
