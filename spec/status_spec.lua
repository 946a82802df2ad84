-- tb.status (the status file and tbagent status) and tb.systemd (the notify protocol), driven
-- through tb.testing's fake core and clock with a real state directory.
local testing = require "tb.testing"
local status = require "tb.status"
local systemd = require "tb.systemd"
local core = require "tb.core"

local SCRIPT = "examples/thermostat.lua"

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(core.mkdirs(d, 448))
  return d
end

local function read(dir)
  return assert(status.read(dir, core.json_decode))
end

-- started(opts) -> s, st: the thermostat under tb.testing with its status writer
local function started(opts)
  local dir = tmpdir()
  local s = testing.load(SCRIPT, {state_dir = dir, config = opts})
  return s, status.start(s.ctx), dir
end

-- pid_of_a_finished_process() -> a pid that no longer runs
local function gone_pid()
  local p = io.popen("sh -c 'echo $$'")
  local pid = math.tointeger(tonumber(p:read("l")))
  p:close()
  return pid
end

describe("tb.status writer", function()
  it("writes status.json at start: this process, offline, the server, the credentials' kind only", function()
    local s, _, dir = started({token = "s3cret-token-value", host = "tb.example", port = 1884})
    local snap = read(dir)
    assert.equal(status.own_pid(), snap.pid)
    assert.equal(status.process_start(snap.pid), snap.proc_start)
    assert.is_false(snap.connected)
    assert.same({host = "tb.example", port = 1884, tls = false}, snap.server)
    assert.equal("access token", snap.credentials)
    assert.equal(1, snap.script.generation)
    assert.matches("/examples/thermostat.lua$", snap.script.path)
    local f = assert(io.open(dir .. "/status.json"))
    local text = f:read("a")
    f:close()
    assert.is_nil(text:find("s3cret", 1, true))
    assert.is_true(status.running(snap))
    assert.equal(1, status.exit_code(snap, true))
    assert.is_false(s:connected())
  end)

  it("a change is written within MIN_GAP_MS, never more often; the rest every PERIOD_MS", function()
    local s, st, dir = started()
    local first = read(dir).updated
    s:connect()
    st:tick()   -- connected at once, but the last write was just now
    assert.is_false(read(dir).connected)
    s:advance(status.MIN_GAP_MS)
    st:tick()
    local on = read(dir)
    assert.is_true(on.connected)
    assert.equal("connected", on.state)
    assert.equal(0, status.exit_code(on, status.running(on)))
    assert.is_true(on.updated > first)
    -- no change: the file waits for the period
    local at = on.updated
    s:advance(status.PERIOD_MS - 10)
    st:tick()
    assert.equal(at, read(dir).updated)
    s:advance(10)
    st:tick()
    assert.is_true(read(dir).updated > at)
  end)

  it("offline: since when and why, and the last warning or error", function()
    local s, st = started()
    s:connect()
    s:advance(status.MIN_GAP_MS)
    st:tick()
    s:disconnect("server went away")   -- (the agent reconnects after its backoff: look now)
    local snap = st:snapshot()
    assert.is_false(snap.connected)
    assert.equal("server went away", snap.reason)
    assert.equal(s.ctx.clock(), snap.since)
    assert.equal("warn", snap.last_error.level)
    assert.matches("connection lost after", snap.last_error.message)
    assert.equal(1, status.exit_code(snap, true))
    assert.matches(": server went away; backlog %d+, in flight 0$", status.summary(snap))
  end)

  it("the backlog, the messages, a reload's generation and the firmware's state", function()
    local s, st = started()
    s:advance(5000)  -- one telemetry record while offline
    local snap = st:snapshot()
    assert.equal(1, snap.outbox.backlog)
    assert.same({title = "thermostat", version = "1.0.0"}, snap.firmware.current)
    assert.is_nil(snap.software)
    s:connect()
    local r = s:offer_firmware({title = "thermostat", version = "1.0.1"}, string.rep("x", 1000))
    assert.equal("UPDATED", r.state)
    snap = st:snapshot()
    assert.equal("UPDATED", snap.firmware.state)
    assert.same({title = "thermostat", version = "1.0.1"}, snap.firmware.current)
    assert.equal(0, snap.outbox.backlog)
    assert.is_true(snap.messages.sent >= 2 and snap.messages.acknowledged == snap.messages.sent)
    st:observe()
    assert.is_false(st:observe())
    s:reload()
    assert.is_true(st:observe())
    assert.equal(2, st:snapshot().script.generation)
  end)

  it("stopped(code, message): the last write says so, and the reader calls it not running", function()
    local _, st, dir = started()
    st:stopped(3, "ThingsBoard refused the connection: CONNACK 5")
    local snap = read(dir)
    assert.equal("stopped", snap.state)
    assert.same({code = 3, message = "ThingsBoard refused the connection: CONNACK 5"}, snap.exit)
    assert.is_false(status.running(snap))
    assert.equal(3, status.exit_code(snap, false))
    assert.matches("not running %(stopped %S+, exit status 3%)", status.format(snap, false, dir, snap.updated))
  end)
end)

describe("tb.status reader", function()
  it("a pid that is gone, or reused by another process, is not running", function()
    local _, _, dir = started()
    local snap = read(dir)
    snap.pid = gone_pid()
    assert.is_false(status.running(snap))
    snap.pid = status.own_pid()
    snap.proc_start = "1"   -- this pid, but a process that started at another time
    assert.is_false(status.running(snap))
  end)

  it("no file: missing; not a status file: malformed; an unreadable one (exit 4)", function()
    local dir = tmpdir()
    local snap, err, code = status.read(dir, core.json_decode)
    assert.is_nil(snap)
    assert.equal("missing", code)
    assert.matches("no agent has run with this state directory", err)
    local f = assert(io.open(dir .. "/status.json", "w"))
    f:write('{"something": "else"}')
    f:close()
    assert.equal("malformed", select(3, status.read(dir, core.json_decode)))
    assert.equal("unreadable", select(3, status.read(dir .. "/status.json", core.json_decode)))
  end)

  it("format: what an operator reads", function()
    local s, st, dir = started({token = false, username = "u", password = "p", client_id = "c"})
    s:connect()
    s:advance(status.MIN_GAP_MS)
    st:tick()
    local snap = read(dir)
    local text = status.format(snap, true, dir, snap.updated + 65000)
    assert.matches("^tbagent %S+ on " .. dir:gsub("%p", "%%%0") .. ": connected since %S+ %(1m05s%)\n", text)
    assert.matches("\n  pid +%d+, up 1m06s", text)
    assert.matches("\n  credentials +MQTT basic\n", text)
    assert.matches("\n  outbox +0 queued, 0 in flight %(on disk%)\n", text)
    assert.matches("\n  script +%S+thermostat%.lua, generation 1 %(0 reloads, 0 rejected%)\n", text)
    assert.matches("\n  firmware +thermostat 1%.0%.0\n", text)
    assert.matches("\n  software +no tb%.software in the script\n", text)
    assert.matches("\n  last error +none\n", text)
  end)
end)

describe("tb.systemd", function()
  local function env(vars) return function(k) return vars[k] end end

  it("watchdog_ms: half of WATCHDOG_USEC, only for this pid", function()
    assert.equal(15000, systemd.watchdog_ms(env({WATCHDOG_USEC = "30000000"}), 42))
    assert.equal(15000, systemd.watchdog_ms(env({WATCHDOG_USEC = "30000000", WATCHDOG_PID = "42"}), 42))
    assert.is_nil(systemd.watchdog_ms(env({WATCHDOG_USEC = "30000000", WATCHDOG_PID = "43"}), 42))
    assert.is_nil(systemd.watchdog_ms(env({}), 42))
    assert.is_nil(systemd.watchdog_ms(env({WATCHDOG_USEC = "soon"}), 42))
  end)

  it("without NOTIFY_SOCKET: nothing", function()
    local s, st = started()
    assert.is_nil(systemd.start(s.ctx, st, env({WATCHDOG_USEC = "1000000"})))
  end)

  -- notifying(vars) -> s, st, sent: the messages core.notify was given
  local function notifying(vars)
    local s, st = started()
    local sent = {}
    s.ctx.core.notify = function(text, socket)
      assert.equal("/run/test/notify", socket)
      sent[#sent + 1] = text
      return true
    end
    vars.NOTIFY_SOCKET = "/run/test/notify"
    assert.truthy(systemd.start(s.ctx, st, env(vars)))
    return s, st, sent
  end

  it("READY=1 with the first STATUS=, WATCHDOG=1 at half the interval, STATUS= on change, STOPPING=1", function()
    local s, st, sent = notifying({WATCHDOG_USEC = "2000000"})
    assert.matches("^READY=1\nSTATUS=offline; backlog 0, in flight 0$", sent[1])
    assert.equal("WATCHDOG=1", sent[2])
    local function count(text)
      local n = 0
      for _, m in ipairs(sent) do if m == text then n = n + 1 end end
      return n
    end
    s:advance(10000)
    assert.equal(11, count("WATCHDOG=1"))   -- at 0, then every 1000 ms
    s:connect()
    s:advance(status.MIN_GAP_MS)
    st:tick()
    assert.matches("^STATUS=connected to tb%.testing:1883; backlog %d+, in flight %d+$", sent[#sent])
    local before = #sent
    st:tick()
    assert.equal(before, #sent)   -- the same line is not sent again
    s:signal("TERM")
    st:tick()
    s:advance(status.MIN_GAP_MS)
    st:tick()
    assert.equal(1, count("STOPPING=1"))
  end)

  it("a failing socket is logged once", function()
    local s, st = started()
    s.ctx.core.notify = function() return nil, "cannot notify /x: Connection refused" end
    systemd.start(s.ctx, st, env({NOTIFY_SOCKET = "/x", WATCHDOG_USEC = "2000000"}))
    s:advance(5000)
    local n = 0
    for _, l in ipairs(s.logs) do if l.message:find("cannot notify the service manager", 1, true) then n = n + 1 end end
    assert.equal(1, n)
  end)
end)

describe("core.notify", function()
  it("false without a socket; nil, err for a name that is no AF_UNIX socket or nobody's", function()
    assert.is_false(core.notify("READY=1", ""))
    local ok, err = core.notify("READY=1", "relative/path")
    assert.is_nil(ok)
    assert.matches("not an AF_UNIX socket name", err)
    ok, err = core.notify("READY=1", "/nonexistent/notify.sock")
    assert.is_nil(ok)
    assert.matches("cannot notify /nonexistent/notify.sock: No such file or directory", err, 1, true)
  end)
end)
