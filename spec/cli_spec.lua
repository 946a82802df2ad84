-- tb.cli: the command line and the TB_* environment, called directly (parse/config/main)
-- with fake getenv functions, so the real environment of the test run never matters.
local cli = require "tb.cli"

-- getenv over a plain table; the default one has nothing set.
local function env(vars)
  vars = vars or {}
  return function(name) return vars[name] end
end

-- a getenv that must not be called (--help and --version answer before reading it)
local function no_env(name)
  error("getenv(" .. tostring(name) .. ") called", 2)
end

local function parse(argv, vars)
  return cli.parse(argv, env(vars))
end

-- parse must refuse argv: returns the error
local function parse_err(argv, vars)
  local res, err = parse(argv, vars)
  assert.is_nil(res)
  return err
end

-- `run x.lua` followed by args; returns the options table or raises with parse's error
local function opts(args, vars)
  local argv = {"run", "x.lua"}
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local res, err = parse(argv, vars)
  assert(res, err)
  return res.options
end

-- parse, then config; returns config | nil, err (parse must succeed)
local function config(args, vars)
  local o = opts(args, vars)
  return cli.config(o, "x.lua")
end

local function readable_file()
  local path = os.tmpname()   -- created empty by mkstemp: readable
  local f = assert(io.open(path, "w"))
  f:write("-----BEGIN CERTIFICATE-----\n")
  f:close()
  return path
end

local FILE_A, FILE_B = readable_file(), readable_file()
local MISSING = FILE_A .. ".missing"

-- Every option with README's env var and default (at parse level: nil when README says
-- "none"/"system store", or when the default is derived, like the port). a and b are two
-- valid raw values and pa/pb what they parse to; field is the config key it fills.
local OPTIONS = {
  {"host", "TB_HOST", "127.0.0.1", "tb.example.com", "tb.example.com", "10.0.0.2", "10.0.0.2", "host"},
  {"port", "TB_PORT", nil, "8080", 8080, "9090", 9090, "port"},
  {"token", "TB_TOKEN", nil, "tok-a", "tok-a", "tok-b", "tok-b", "token"},
  {"client-id", "TB_CLIENT_ID", nil, "dev1", "dev1", "dev2", "dev2", "client_id"},
  {"username", "TB_USERNAME", nil, "user1", "user1", "user2", "user2", "username"},
  {"password", "TB_PASSWORD", nil, "pw1", "pw1", "pw2", "pw2", "password"},
  {"cafile", "TB_CAFILE", nil, FILE_A, FILE_A, FILE_B, FILE_B, "cafile"},
  {"cert", "TB_CERT", nil, FILE_A, FILE_A, FILE_B, FILE_B, "cert"},
  {"key", "TB_KEY", nil, FILE_A, FILE_A, FILE_B, FILE_B, "key"},
  {"tls", "TB_TLS", false, "1", true, "0", false, "tls", flag = true},
  {"state-dir", "TB_STATE_DIR", "./.tbagent", "/var/lib/a", "/var/lib/a", "/var/lib/b", "/var/lib/b", "state_dir"},
  {"log-level", "TB_LOG_LEVEL", "info", "debug", "debug", "warn", "warn", "log_level"},
  {"no-reload", "TB_NO_RELOAD", false, "1", true, "0", false, "reload", flag = true, inverted = true},
  {"keepalive", "TB_KEEPALIVE", 60, "30", 30, "45", 45, "keepalive"},
  {"qos", "TB_QOS", 1, "0", 0, "1", 1, "qos"},
  {"outbox-limit", "TB_OUTBOX_LIMIT", 100000, "500", 500, "700", 700, "outbox_limit"},
  {"outbox-max-bytes", "TB_OUTBOX_MAX_BYTES", 67108864, "1048576", 1048576, "2048", 2048, "outbox_max_bytes"},
  {"outbox-max-age", "TB_OUTBOX_MAX_AGE", 604800, "3600", 3600, "60", 60, "outbox_max_age"},
  {"memory-outbox", "TB_MEMORY_OUTBOX", false, "1", true, "0", false, "memory_outbox", flag = true},
  {"payload-limit", "TB_PAYLOAD_LIMIT", 65536, "1024", 1024, "4096", 4096, "payload_limit"},
  {"max-inflight", "TB_MAX_INFLIGHT", 100, "10", 10, "20", 20, "max_inflight"},
  {"rate-limits", "TB_RATE_LIMITS", nil, "20:1,600:60", "20:1,600:60", "5:1", "5:1", "rate_limits"},
  {"no-session-limits", "TB_NO_SESSION_LIMITS", false, "1", true, "0", false, "session_limits",
    flag = true, inverted = true},
  {"backoff-min", "TB_BACKOFF_MIN", 1000, "500", 500, "700", 700, "backoff_min"},
  {"backoff-max", "TB_BACKOFF_MAX", 60000, "5000", 5000, "7000", 7000, "backoff_max"},
  {"handler-budget", "TB_HANDLER_BUDGET", 1000, "250", 250, "0", 0, "handler_budget"},
  {"request-timeout", "TB_REQUEST_TIMEOUT", 10000, "5000", 5000, "2000", 2000, "request_timeout"},
  {"rpc-timeout", "TB_RPC_TIMEOUT", 60000, "30000", 30000, "1000", 1000, "rpc_timeout"},
  {"shutdown-timeout", "TB_SHUTDOWN_TIMEOUT", 3000, "500", 500, "0", 0, "shutdown_timeout"},
  {"fw-window", "TB_FW_WINDOW", 4, "8", 8, "16", 16, "fw_window"},
  {"fw-chunk-timeout", "TB_FW_CHUNK_TIMEOUT", 10000, "2000", 2000, "3000", 3000, "fw_chunk_timeout"},
  {"http-cafile", "TB_HTTP_CAFILE", nil, FILE_A, FILE_A, FILE_B, FILE_B, "http_cafile"},
  {"timestamps", "TB_TIMESTAMPS", "auto", "device", "device", "server", "server", "timestamps"},
  {"connect-timeout", "TB_CONNECT_TIMEOUT", 30000, "1500", 1500, "60000", 60000, "connect_timeout"},
}

local INT_OPTIONS = {"keepalive", "outbox-limit", "outbox-max-bytes", "outbox-max-age", "payload-limit",
  "max-inflight", "backoff-min", "backoff-max", "handler-budget", "request-timeout", "rpc-timeout",
  "shutdown-timeout", "fw-window", "fw-chunk-timeout", "connect-timeout"}

-- credentials config() needs besides the option under test (token and basic ones exclude each other)
local function with_credentials(name, args)
  local extra
  if name == "client-id" or name == "username" or name == "password" then
    extra = {"--client-id", "base"}
  else
    extra = {"--token", "base"}
  end
  if name == "cert" then extra[#extra + 1] = "--key"; extra[#extra + 1] = FILE_B end
  if name == "key" then extra[#extra + 1] = "--cert"; extra[#extra + 1] = FILE_B end
  for _, a in ipairs(args) do extra[#extra + 1] = a end
  return extra
end

describe("tb.cli", function()
  lazy_teardown(function()
    os.remove(FILE_A)
    os.remove(FILE_B)
  end)

  describe("options", function()
    it("the spec covers every option cli.lua offers, with README's env vars", function()
      -- --help lists each option once with its variable: an option added without a row here fails
      local listed = {}
      for name, var in cli.help_text():gmatch("\n  %-%-([%w%-]+)[^\n]-%s(TB_[%u_]+)%s") do listed[name] = var end
      local covered = {}
      for _, o in ipairs(OPTIONS) do covered[o[1]] = o[2] end
      assert.same(covered, listed)
    end)

    for _, o in ipairs(OPTIONS) do
      local name, var, default, a, pa, b, pb = o[1], o[2], o[3], o[4], o[5], o[6], o[7]
      it("--" .. name .. " / " .. var .. ": flag, environment, command line first, default", function()
        -- the default when neither is given (README's table)
        assert.equal(default, opts({})[name])
        if o.flag then
          assert.is_true(opts({"--" .. name})[name])
          assert.is_false(opts({"--" .. name .. "=0"})[name])
        else
          assert.equal(pa, opts({"--" .. name, a})[name])
          assert.equal(pb, opts({"--" .. name .. "=" .. b})[name])
        end
        -- the environment alone
        assert.equal(pa, opts({}, {[var] = a})[name])
        assert.equal(pb, opts({}, {[var] = b})[name])
        -- an empty variable counts as unset
        assert.equal(default, opts({}, {[var] = ""})[name])
        -- the command line wins over the environment, both ways round
        if o.flag then
          assert.is_true(opts({"--" .. name}, {[var] = "0"})[name])
          assert.is_false(opts({"--" .. name .. "=0"}, {[var] = "1"})[name])   -- false still wins
        else
          assert.equal(pa, opts({"--" .. name, a}, {[var] = b})[name])
          assert.equal(pb, opts({"--" .. name, b}, {[var] = a})[name])
        end
      end)
    end

    it("config() puts every option in its config field", function()
      for _, o in ipairs(OPTIONS) do
        local name, pa, field = o[1], o[5], o[8]
        local args = o.flag and {"--" .. name} or {"--" .. name, o[4]}
        local c, err = config(with_credentials(name, args))
        assert(c, name .. ": " .. tostring(err))
        local want = pa
        if o.inverted then want = not pa end   -- --no-reload -> reload = false
        assert.equal(want, c[field], name)
        assert.equal("x.lua", c.script)
      end
    end)

    it("config() defaults: README's values, TLS off, reload and getSessionLimits on", function()
      local c = assert(config({"--token", "t"}))
      assert.equal("127.0.0.1", c.host)
      assert.equal(1883, c.port)
      assert.is_false(c.tls)
      assert.equal("./.tbagent", c.state_dir)
      assert.equal("info", c.log_level)
      assert.is_true(c.reload)
      assert.equal(60, c.keepalive)
      assert.equal(1, c.qos)
      assert.equal(100000, c.outbox_limit)
      assert.equal(67108864, c.outbox_max_bytes)
      assert.equal(604800, c.outbox_max_age)
      assert.is_false(c.memory_outbox)
      assert.equal(65536, c.payload_limit)
      assert.equal(100, c.max_inflight)
      assert.is_nil(c.rate_limits)
      assert.is_true(c.session_limits)
      assert.equal(1000, c.backoff_min)
      assert.equal(60000, c.backoff_max)
      assert.equal(1000, c.handler_budget)
      assert.equal(10000, c.request_timeout)
      assert.equal(60000, c.rpc_timeout)
      assert.equal(3000, c.shutdown_timeout)
      assert.equal(4, c.fw_window)
      assert.equal(10000, c.fw_chunk_timeout)
      assert.is_nil(c.http_cafile)   -- the system's CA store
      assert.is_nil(c.cafile)
    end)

    it("the port defaults to 8883 with TLS (--tls, TB_TLS, --cafile or --cert); an explicit port wins", function()
      assert.equal(8883, assert(config({"--token", "t", "--tls"})).port)
      assert.equal(8883, assert(config({"--token", "t"}, {TB_TLS = "1"})).port)
      local c = assert(config({"--token", "t", "--cafile", FILE_A}))
      assert.is_true(c.tls)   -- a CA file means TLS even without --tls
      assert.equal(8883, c.port)
      c = assert(config({"--cert", FILE_A, "--key", FILE_B}))
      assert.is_true(c.tls)
      assert.equal(8883, c.port)
      assert.equal(1884, assert(config({"--token", "t", "--tls", "--port", "1884"})).port)
      assert.equal(1884, assert(config({"--token", "t", "--tls"}, {TB_PORT = "1884"})).port)
      -- --tls=0 does not switch TLS off when a CA file asks for it
      assert.is_true(assert(config({"--token", "t", "--tls=0", "--cafile", FILE_A})).tls)
    end)
  end)

  describe("values", function()
    it("int options refuse non-integers, negatives and overflow, naming the option or variable", function()
      for _, name in ipairs(INT_OPTIONS) do
        local var = "TB_" .. name:upper():gsub("%-", "_")
        for _, bad in ipairs({"abc", "1.5", "-1", "", "10ms", "99999999999999999999"}) do
          assert.equal(string.format("--%s must be a non-negative integer (got %q)", name, bad),
            parse_err({"run", "x.lua", "--" .. name, bad}))
          if bad ~= "" then   -- an empty variable is unset, not an error
            assert.equal(string.format("%s must be a non-negative integer (got %q)", var, bad),
              parse_err({"run", "x.lua"}, {[var] = bad}))
          end
        end
        assert.equal(0, opts({"--" .. name, "0"})[name])   -- 0 parses; config() judges the range
      end
    end)

    it("--port must be 1 to 65535", function()
      for _, bad in ipairs({"0", "65536", "-1", "http", "1.5"}) do
        assert.equal(string.format("--port must be a port number from 1 to 65535 (got %q)", bad),
          parse_err({"run", "x.lua", "--port", bad}))
      end
      assert.equal(1, opts({"--port", "1"}).port)
      assert.equal(65535, opts({"--port", "65535"}).port)
      assert.matches("^TB_PORT must be a port number", parse_err({"run", "x.lua"}, {TB_PORT = "70000"}))
    end)

    it("--qos takes 0 or 1 and refuses 2 saying why", function()
      for _, bad in ipairs({"2", "01", "one", "-1"}) do
        assert.matches("^%-%-qos must be 0 or 1 %(ThingsBoard answers QoS 2",
          parse_err({"run", "x.lua", "--qos", bad}))
      end
      assert.matches("^TB_QOS must be 0 or 1", parse_err({"run", "x.lua"}, {TB_QOS = "2"}))
      assert.equal(0, opts({"--qos", "0"}).qos)
    end)

    it("--timestamps takes auto, device or server (lower case); auto by default", function()
      for _, mode in ipairs({"auto", "device", "server"}) do
        assert.equal(mode, opts({"--timestamps", mode}).timestamps)
        assert.equal(mode, assert(config({"--token", "t", "--timestamps", mode})).timestamps)
      end
      assert.equal("auto", assert(config({"--token", "t"})).timestamps)
      for _, bad in ipairs({"none", "AUTO", "client", ""}) do
        local res, err = parse({"run", "x.lua", "--timestamps=" .. bad})
        assert.is_nil(res)
        assert.equal(string.format("--timestamps must be auto, device or server (got %q)", bad), err)
      end
      local res, err = parse({"run", "x.lua"}, {TB_TIMESTAMPS = "local"})
      assert.is_nil(res)
      assert.equal('TB_TIMESTAMPS must be auto, device or server (got "local")', err)
    end)

    it("--log-level takes debug, info, warn or error (lower case)", function()
      for _, level in ipairs({"debug", "info", "warn", "error"}) do
        assert.equal(level, opts({"--log-level", level})["log-level"])
      end
      for _, bad in ipairs({"verbose", "INFO", "warning"}) do
        assert.equal(string.format("--log-level must be debug, info, warn or error (got %q)", bad),
          parse_err({"run", "x.lua", "--log-level", bad}))
      end
      assert.equal('TB_LOG_LEVEL must be debug, info, warn or error (got "trace")',
        parse_err({"run", "x.lua"}, {TB_LOG_LEVEL = "trace"}))
    end)

    it("flags accept 1/true/yes and 0/false/no, from the command line and the environment", function()
      for _, yes in ipairs({"1", "true", "yes"}) do
        assert.is_true(opts({"--tls=" .. yes}).tls)
        assert.is_true(opts({}, {TB_MEMORY_OUTBOX = yes})["memory-outbox"])
      end
      for _, no in ipairs({"0", "false", "no"}) do
        assert.is_false(opts({"--tls=" .. no}).tls)
        assert.is_false(opts({}, {TB_NO_RELOAD = no})["no-reload"])
      end
      assert.equal('--tls must be 1 or 0 (got "maybe")', parse_err({"run", "x.lua", "--tls=maybe"}))
      assert.equal('TB_NO_SESSION_LIMITS must be 1 or 0 (got "on")',
        parse_err({"run", "x.lua"}, {TB_NO_SESSION_LIMITS = "on"}))
    end)

    it("a flag takes no separate value: the next word is an argument", function()
      assert.equal("unexpected argument 1", parse_err({"run", "x.lua", "--tls", "1"}))
    end)

    it("string options refuse an empty value on the command line", function()
      for _, args in ipairs({{"--host", ""}, {"--host="}, {"--token", ""}, {"--state-dir="}}) do
        assert.matches("must be a non%-empty string %(got \"\"%)$",
          parse_err({"run", "x.lua", args[1], args[2]}))
      end
    end)

    it("--opt=value keeps everything after the first '=' (the way to pass a value starting with --)", function()
      assert.equal("a=b", opts({"--host=a=b"}).host)
      assert.equal("--secret", opts({"--password=--secret"}).password)
    end)

    it("file options must name a readable file", function()
      for _, name in ipairs({"cafile", "cert", "key", "http-cafile"}) do
        local var = "TB_" .. name:upper():gsub("%-", "_")
        assert.equal(string.format("--%s must be a readable file (got %q)", name, MISSING),
          parse_err({"run", "x.lua", "--" .. name, MISSING}))
        assert.equal(string.format("%s must be a readable file (got %q)", var, MISSING),
          parse_err({"run", "x.lua"}, {[var] = MISSING}))
      end
    end)

    it("the last of a repeated option wins", function()
      assert.equal("b", opts({"--host", "a", "--host", "b"}).host)
      assert.equal(30, opts({"--keepalive=10", "--keepalive", "30"}).keepalive)
    end)
  end)

  describe("arguments", function()
    it("run and check take one script; options may come before, between or after", function()
      local res = assert(parse({"run", "dev.lua"}))
      assert.equal("run", res.command)
      assert.equal("dev.lua", res.script)
      res = assert(parse({"check", "dev.lua"}))
      assert.equal("check", res.command)
      assert.equal("dev.lua", res.script)
      assert.equal("127.0.0.1", res.options.host)   -- check gets the options too
      res = assert(parse({"--host", "h", "run", "--qos", "0", "dev.lua", "--tls"}))
      assert.equal("run", res.command)
      assert.equal("dev.lua", res.script)
      assert.equal("h", res.options.host)
      assert.equal(0, res.options.qos)
      assert.is_true(res.options.tls)
    end)

    it("a lone '-' is an argument, not an option", function()
      assert.equal("-", assert(parse({"run", "-"})).script)
    end)

    -- each case {argv, err}: parse refuses argv with err
    local function refuses_each(cases)
      for _, case in ipairs(cases) do
        assert.equal(case[2], parse_err(case[1]))
      end
    end

    it("refuses a missing or unknown command, a missing script and extra arguments", function()
      refuses_each({
        {{}, "missing command"},
        {{"--host", "h"}, "missing command"},
        {{"start", "x.lua"}, "unknown command start"},
        {{"x.lua"}, "unknown command x.lua"},
        {{"run"}, "missing SCRIPT.lua after run"},
        {{"check"}, "missing SCRIPT.lua after check"},
        {{"run", "a.lua", "b.lua"}, "unexpected argument b.lua"},
      })
    end)

    it("refuses unknown options, long or short, with or without a value", function()
      refuses_each({
        {{"run", "x.lua", "--bogus"}, "unknown option --bogus"},
        {{"run", "x.lua", "--bogus=1"}, "unknown option --bogus"},
        {{"run", "x.lua", "--Host", "h"}, "unknown option --Host"},   -- names are case-sensitive
        {{"run", "x.lua", "-v"}, "unknown option -v"},
        {{"run", "x.lua", "-host"}, "unknown option -host"},
      })
    end)

    it("an option that needs a value says so when it is last", function()
      for _, name in ipairs({"host", "port", "keepalive", "cafile", "rate-limits"}) do
        assert.equal("--" .. name .. " needs a value", parse_err({"run", "x.lua", "--" .. name}))
      end
    end)

    it("--help / -h and --version answer at once, before the environment is read", function()
      assert.same({command = "help"}, cli.parse({"--help"}, no_env))
      assert.same({command = "help"}, cli.parse({"-h"}, no_env))
      assert.same({command = "help"}, cli.parse({"run", "x.lua", "--help"}, no_env))
      assert.same({command = "version"}, cli.parse({"--version"}, no_env))
      assert.same({command = "version"}, cli.parse({"check", "--version"}, no_env))
    end)

    it("an error in the environment is reported by its variable's name", function()
      assert.equal('TB_KEEPALIVE must be a non-negative integer (got "sixty")',
        parse_err({"run", "x.lua"}, {TB_KEEPALIVE = "sixty"}))
      -- not when the command line overrides it: the variable is never looked at
      assert.equal(30, opts({"--keepalive", "30"}, {TB_KEEPALIVE = "sixty"}).keepalive)
    end)
  end)

  describe("config()", function()
    local function refused(args, vars)
      local c, err = config(args, vars)
      assert.is_nil(c)
      return err
    end

    -- an integer option's bounds: each good value kept as config[field], each bad one refused
    -- with msg
    local function bounded(flag, field, msg, good, bad)
      for _, v in ipairs(good) do
        assert.equal(tonumber(v), assert(config({"--token", "t", flag, v}))[field])
      end
      for _, v in ipairs(bad) do
        assert.equal(msg, refused({"--token", "t", flag, v}))
      end
    end

    it("needs credentials: a token, MQTT basic credentials or a certificate", function()
      assert.equal("no credentials: give --token TOKEN (or TB_TOKEN), --client-id/--username/--password, or --cert/--key",
        refused({}))
      assert.matches("^no credentials", refused({"--password", "p"}))   -- a password alone identifies nothing
      assert.equal("t", assert(config({}, {TB_TOKEN = "t"})).token)
      assert.truthy(config({"--client-id", "c"}))
      assert.truthy(config({"--username", "u", "--password", "p"}))
      assert.truthy(config({"--cert", FILE_A, "--key", FILE_B}))
    end)

    it("refuses a token together with basic credentials", function()
      for _, extra in ipairs({{"--client-id", "c"}, {"--username", "u"}, {"--password", "p"}}) do
        assert.equal("give either --token or MQTT basic credentials (--client-id/--username/--password), not both",
          refused({"--token", "t", extra[1], extra[2]}))
      end
      -- from the environment too
      assert.matches("^give either %-%-token", refused({}, {TB_TOKEN = "t", TB_USERNAME = "u"}))
    end)

    it("--cert and --key go together", function()
      local msg = "--cert and --key go together (the device certificate and its private key)"
      assert.equal(msg, refused({"--cert", FILE_A}))
      assert.equal(msg, refused({"--token", "t", "--key", FILE_A}))
    end)

    it("--keepalive is 0 (off) or 5 to 65535", function()
      bounded("--keepalive", "keepalive", "--keepalive must be 0 (off) or 5 to 65535 seconds",
        {"0", "5", "65535"}, {"1", "4", "65536"})
    end)

    it("--outbox-limit must be at least 1, from the command line or TB_OUTBOX_LIMIT", function()
      assert.equal("--outbox-limit must be at least 1", refused({"--token", "t", "--outbox-limit", "0"}))
      assert.equal("--outbox-limit must be at least 1", refused({"--token", "t"}, {TB_OUTBOX_LIMIT = "0"}))
      assert.equal(1, assert(config({"--token", "t", "--outbox-limit", "1"})).outbox_limit)
    end)

    it("--max-inflight is 1 to 65535 (MQTT packet ids)", function()
      bounded("--max-inflight", "max_inflight", "--max-inflight must be 1 to 65535",
        {"1", "65535"}, {"0", "65536"})
    end)

    it("--payload-limit is at least 64 bytes", function()
      bounded("--payload-limit", "payload_limit", "--payload-limit must be at least 64 bytes", {"64"}, {"63"})
    end)

    it("--backoff-min is at least 1 and --backoff-max not below it", function()
      local msg = "--backoff-min must be >= 1 and --backoff-max >= --backoff-min"
      assert.equal(msg, refused({"--token", "t", "--backoff-min", "0"}))
      assert.equal(msg, refused({"--token", "t", "--backoff-min", "5000", "--backoff-max", "4999"}))
      assert.equal(msg, refused({"--token", "t", "--backoff-max", "999"}))   -- below the default minimum
      local c = assert(config({"--token", "t", "--backoff-min", "5000", "--backoff-max", "5000"}))
      assert.equal(5000, c.backoff_min)
      assert.equal(5000, c.backoff_max)
    end)

    it("--fw-window is 1 to 64", function()
      bounded("--fw-window", "fw_window", "--fw-window must be 1 to 64", {"1", "64"}, {"0", "65"})
    end)

    it("times and outbox bounds must be at least 1 (0 would drop or time out at once)", function()
      for _, k in ipairs({"outbox-max-bytes", "outbox-max-age", "fw-chunk-timeout", "request-timeout", "rpc-timeout",
        "connect-timeout"}) do
        assert.equal("--" .. k .. " must be at least 1", refused({"--token", "t", "--" .. k, "0"}))
      end
    end)

    it("--rate-limits / TB_RATE_LIMITS must be capacity:seconds pairs", function()
      for _, good in ipairs({"20:1", "20:1,600:60", " 20 : 1 , 600 : 60 ", "none"}) do
        assert.equal(good, assert(config({"--token", "t", "--rate-limits", good})).rate_limits)
      end
      -- refused while parsing (so `check` sees it too), naming where the value came from
      for _, bad in ipairs({"20", "20:0", "0:1", "a:b", "20/1", "20:1.5", "-20:1", "20:1,600"}) do
        local err = parse_err({"run", "x.lua", "--token", "t", "--rate-limits", bad})
        assert.matches("^%-%-rate%-limits: bad rate limit \"", err)
        assert.matches("(expected capacity:seconds, e.g. 20:1)", err, 1, true)
      end
      assert.equal('TB_RATE_LIMITS: bad rate limit "20/1" (expected capacity:seconds, e.g. 20:1)',
        parse_err({"run", "x.lua", "--token", "t"}, {TB_RATE_LIMITS = "20/1"}))
      assert.equal("600:60", assert(config({"--token", "t"}, {TB_RATE_LIMITS = "600:60"})).rate_limits)
    end)
  end)

  describe("main()", function()
    -- main() writes to io.stdout/io.stderr: capture them, and put them back even on failure
    local function run_main(argv)
      return require("spec.support.capture").output(cli.main, argv)
    end

    it("--help prints the usage and every option, and exits 0", function()
      local code, out, err = run_main({[0] = "tbagent", "--help"})
      assert.equal(0, code)
      assert.equal("", err)
      assert.equal(cli.help_text(), out)
      assert.matches("usage: tbagent run SCRIPT.lua [options]", out, 1, true)
      assert.matches("exit status: 0 clean shutdown, 1 script failed to load, " ..
        "2 bad usage, or the state directory is in use by another agent, 3 credentials refused", out, 1, true)
      for _, o in ipairs(OPTIONS) do
        assert.matches("--" .. o[1], out, 1, true)
        assert.matches(o[2], out, 1, true)
      end
      assert.matches("[60]", out, 1, true)   -- defaults are shown
    end)

    it("--version prints one line and exits 0", function()
      local code, out = run_main({[0] = "tbagent", "--version"})
      assert.equal(0, code)
      assert.matches("^tbagent %S+\n$", out)
    end)

    it("bad usage exits 2 with one line on stderr pointing at --help", function()
      local code, out, err = run_main({[0] = "tbagent", "run", "x.lua", "--bogus"})
      assert.equal(2, code)
      assert.equal("", out)
      assert.equal("tbagent: unknown option --bogus; see tbagent --help\n", err)
      local code2, _, err2 = run_main({[0] = "tbagent"})
      assert.equal(2, code2)
      assert.equal("tbagent: missing command; see tbagent --help\n", err2)
    end)
  end)
end)

describe("tb.cli parse: review fixes", function()
  it("refuses a directory where a file is wanted", function()
    assert.equal('--cafile must be a readable file (got "/tmp")',
      parse_err({"run", "x.lua", "--cafile", "/tmp"}))
  end)

  it("takes an option name after an option for a forgotten value", function()
    assert.equal("--token needs a value", parse_err({"run", "x.lua", "--token", "--host", "h"}))
    local res = assert(cli.parse({"run", "x.lua", "--token=--host"}, function() return nil end))
    assert.equal("--host", res.options.token)
  end)

  it("takes digits only for numbers", function()
    for _, bad in ipairs({"1e3", "0x10", " 16 ", "16 "}) do
      assert.matches("^%-%-keepalive must be a non%-negative integer",
        parse_err({"run", "x.lua", "--keepalive", bad}))
      assert.matches("^%-%-port must be a port number", parse_err({"run", "x.lua", "--port", bad}))
    end
  end)
end)

describe("tb.cli register_secrets", function()
  it("masks the token or the password, raw and as JSON escapes it", function()
    local masked = {}
    local core = {log_secret = function(s) masked[#masked + 1] = s end, json_encode = require("tb.core").json_encode}
    cli.register_secrets(core, {password = 'p"w'})
    assert.same({'p"w', 'p\\"w'}, masked)
    masked = {}
    cli.register_secrets(core, {token = "abc", password = "xyz"})
    assert.same({"abc", "xyz"}, masked)
  end)
end)

describe("tb.cli: tbagent status and the manual page", function()
  local manpage = require "tb.manpage"

  it("status: ./.tbagent, TB_STATE_DIR, --state-dir, or NAME for tbagent@NAME; --json", function()
    local function dir(argv, vars)
      local res = assert(cli.parse(argv, env(vars or {})))
      assert.equal("status", res.command)
      return res.options["state-dir"], res.options.json
    end
    assert.equal("./.tbagent", dir({"status"}))
    assert.equal("/srv/st", dir({"status"}, {TB_STATE_DIR = "/srv/st"}))
    assert.equal("/x", dir({"status", "--state-dir", "/x"}, {TB_STATE_DIR = "/srv/st"}))
    assert.equal("/var/lib/tbagent/pump", dir({"status", "pump"}))
    local _, json = dir({"status", "pump", "--json"})
    assert.is_true(json)
  end)

  it("status refuses what it does not take, and run refuses --json", function()
    local function err(argv)
      local res, e = cli.parse(argv, env({}))
      assert.is_nil(res)
      return e
    end
    assert.equal("--token is not an option of tbagent status (it takes --state-dir and --json)",
      err({"status", "--token", "t"}))
    assert.equal("give either an instance NAME or --state-dir, not both", err({"status", "pump", "--state-dir", "/x"}))
    assert.equal('status NAME must be a systemd instance name (got "../etc")', err({"status", "../etc"}))
    assert.equal("unexpected argument b", err({"status", "a", "b"}))
    assert.equal("--json is an option of tbagent status", err({"run", "x.lua", "--json"}))
  end)

  it("the manual page names every option, variable, signal and exit status --help names", function()
    local manual = cli.manual()
    manual.version = "9.9"
    local page = manpage.render(manual)
    local help = cli.help_text()
    assert.matches('^%.TH TBAGENT 1 "" "tbagent 9%.9"', page)
    local seen = 0
    for opt in help:gmatch("%-%-([%w][%w%-]+)") do
      seen = seen + 1
      assert.truthy(page:find("\\-\\-" .. opt:gsub("%-", "\\-"), 1, true), "man page lacks --" .. opt)
    end
    assert.is_true(seen > 30)
    for var in help:gmatch("TB_[%u_]+") do assert.truthy(page:find(var, 1, true), var) end
    for _, sig in ipairs({"SIGTERM, SIGINT", "SIGHUP"}) do assert.truthy(page:find(sig, 1, true), sig) end
    for _, sec in ipairs({"SYNOPSIS", "OPTIONS", "SIGNALS", "EXIT STATUS", "ENVIRONMENT", "FILES"}) do
      assert.truthy(page:find("\n.SH " .. sec .. "\n", 1, true), sec)
    end
    assert.truthy(page:find("NOTIFY_SOCKET", 1, true))
    assert.truthy(page:find("/etc/tbagent/NAME.env", 1, true))
  end)

  it("manpage.text escapes what roff would take as markup", function()
    assert.equal("a \\- b \\e c", manpage.text("a - b \\ c"))
    assert.equal("\\&.TH x\n\\&'y", manpage.text(".TH x\n'y"))
  end)
end)
