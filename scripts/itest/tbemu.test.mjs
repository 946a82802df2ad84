// Issue 3, "Tests": the agent's integration tests against tbemu (the ThingsBoard emulator), not
// only against plain mosquitto. The real tbagent binary is driven against a tbemu started here
// on free loopback ports (--mqtt-port 0 --http-port 0, ready line awaited, stopped by its PID),
// and everything is checked through tbemu's ThingsBoard REST paths (/api/plugins/telemetry/...,
// /api/plugins/rpc/twoway|oneway/{deviceId}) and its own /emu endpoints:
//  1. telemetry in all three payload forms stored with ThingsBoard's types (Lua 42 -> LONG,
//     42.0 -> DOUBLE, 1e15/1e20/0.1+0.2 -> DOUBLE, booleans, strings, JSON, 2^53+1 exact,
//     explicit ts kept); client attributes;
//  2. server-side RPC over REST: ids from 0, a string result as quoted JSON, a raised error and
//     nil, err as {"error": ...}, an unknown method, a one-way RPC (no response), several in flight;
//  3. a shared attribute set over REST reaches tb.on_attributes (42.0 stays a float), a REST
//     delete arrives as deleted, request_attributes returns the current values;
//  4. client-side RPC: the built-in getSessionLimits answered and adopted, a configured reply,
//     the server's {"error":"timeout"}, a local timeout;
//  5. CONNACK refusals: wrong token and wrong basic password -> exit 3 with one clear line and no
//     secret printed; MQTT basic credentials (client id / user name / password) connect;
//  6. two agents with the same token: tbemu closes the older session; each agent prints one clear
//     warning about another session using the same credentials (not silent reconnects forever);
//  7. telemetry over the payload limit is refused at the call with nil, err, never reaches the
//     server, and the agent stays connected; a payload exactly at the limit goes through.
//
// Every wait is bounded (scaled for sanitizer builds: TBAGENT=build-asan/tbagent); ITEST_VERBOSE=1
// echoes agent logs, TBEMU_DEBUG=1 tbemu's.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startEmu } from '../tbemu/test/helpers.mjs';
import { world, canon, ms, delay } from './lib.mjs';

// ------------------------------------------------------------------------------------------
// helpers (local to this file)

const emuPids = new Set();
process.on('exit', () => {
  for (const pid of emuPids) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
});

// startTbemu(devices, basic) -> emu with emu.ids[name] and emu.halt() (SIGTERM by PID, then
// SIGKILL); register emu.halt in an after hook of the suite (node:test runs an after() called
// inside a before hook as soon as that hook ends).
//   devices: ['name', ...] with token `${name}-token`; basic: [[name, clientId, user, pass]]
async function startTbemu(devices = [], basic = []) {
  const args = [];
  for (const d of devices) args.push('--device', `${d}:${d}-token`);
  for (const b of basic) args.push('--device-basic', b.join(':'));
  const emu = await startEmu(args, { timeoutMs: ms(10000) });
  emuPids.add(emu.proc.pid);
  emu.halt = async () => {
    await emu.stop();
    emuPids.delete(emu.proc.pid);
  };
  emu.ids = {};
  for (const d of [...devices, ...basic.map((b) => b[0])]) emu.ids[d] = await emu.deviceId(d);
  return emu;
}

// waitUntil(fn, n, what): polls fn (may be async) until truthy; bounded (n is scaled)
async function waitUntil(fn, n, what) {
  const deadline = Date.now() + ms(n);
  let last;
  for (;;) {
    try { last = await fn(); } catch (e) { last = undefined; if (Date.now() > deadline) throw e; }
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms(n)} ms waiting for ${what}`);
    await delay(25);
  }
}

// twoway(emu, dev, method, params, timeout) -> {status, text, json, at} of the REST call
async function twoway(emu, dev, method, params, timeout = 10000) {
  const body = { method, params: params === undefined ? {} : params, timeout: ms(timeout) };
  const r = await emu.api('POST', `/api/plugins/rpc/twoway/${emu.ids[dev]}`, body);
  return { ...r, at: Date.now() };
}

// evalLua(emu, dev, code) -> {status, text, json}: runs Lua in the device's "eval" RPC handler
async function evalLua(emu, dev, code, timeout = 10000) {
  const r = await twoway(emu, dev, 'eval', code, timeout);
  assert.equal(r.status, 200, `eval RPC: HTTP ${r.status} ${r.text}`);
  return r;
}

const summary = (emu, dev) => emu.get(`/emu/devices/${encodeURIComponent(dev)}`);
const events = (emu, dev) => emu.events(dev);
const lastSeq = async (emu, dev) => {
  const ev = await events(emu, dev);
  return ev.length ? ev[ev.length - 1].seq : 0;
};
const messages = (emu, dev, q) => emu.messages(dev, q);

// timeseries(emu, dev, keys, extra) -> ThingsBoard's REST answer (values as strings by default)
function timeseries(emu, dev, keys, extra = '') {
  return emu.get(`/api/plugins/telemetry/DEVICE/${emu.ids[dev]}/values/timeseries?keys=${keys}${extra}`);
}

// A device script: "eval" runs Lua text in a handler (so it may yield); the rest are RPC
// methods for item 2 and a shared-attribute handler for item 3.
const SCRIPT = `
local tb = require "tb"
local env = setmetatable({tb = tb}, {__index = _G})
tb.on_rpc("eval", function(code)
  local fn = assert(load(code, "=eval", "t", env))
  return fn()
end)
tb.on_rpc("greet", function(p) return "hello " .. p.name end)
tb.on_rpc("answer", function() return 42.0 end)
tb.on_rpc("count", function() return 42 end)
tb.on_rpc("fail", function() error("boom") end)
tb.on_rpc("nilErr", function() return nil, "no such sensor" end)
tb.on_rpc("oneway", function(p) tb.log.info("ONEWAY ran with %s", tb.json.encode(p)) end)
tb.on_rpc("slow", function(p) tb.sleep(p.ms); return p.tag end)
tb.on_attributes(function(changes, deleted)
  local keys = {}
  for k in pairs(changes) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = changes[k]
    parts[#parts + 1] = k .. "=" .. tb.json.encode(v) .. ":" .. (math.type(v) or type(v))
  end
  local del = {}
  for i, k in ipairs(deleted or {}) do del[i] = k end
  table.sort(del)
  tb.log.info("ATTR changes[%s] deleted[%s]", table.concat(parts, ","), table.concat(del, ","))
end)
`;

// The session limits tbemu answers getSessionLimits with in the first describe (distinctive
// values, so the test sees they were adopted; the payload limit stays ThingsBoard's default).
const LIMITS = { maxPayloadSize: 65536, maxInflightMessages: 37, rateLimits: { messages: '500:1,6000:60', telemetryMessages: null, telemetryDataPoints: null } };

// ------------------------------------------------------------------------------------------
// items 1-4 and 7: one device, one agent

describe('tbemu: the device API end to end, checked through the REST API', () => {
  const w = world({ after });
  let emu, agent;
  after(() => emu && emu.halt());
  before(async () => {
    emu = await startTbemu(['dev1', 'other']);
    await emu.post('/emu/session-limits', LIMITS);
    agent = await w.agentReady(SCRIPT, { port: emu.mqttPort, token: 'dev1-token', name: 'tbagent-dev1' });
  });

  // --- 1 -----------------------------------------------------------------------------------
  test('1. telemetry, object form: Lua 42 is stored as LONG, 42.0 as DOUBLE; other types', async () => {
    const t0 = Date.now();
    const r = await evalLua(emu, 'dev1', 'return tb.send_telemetry({i = 42, f = 42.0, b = true, s = "x", ' +
      'o = {k = "v", n = {1, 2.5}}, big = 9007199254740993, neg = -7, half = 0.5})');
    assert.equal(r.text, 'true');
    const keys = 'i,f,b,s,o,big,neg,half';
    const ts = await waitUntil(async () => {
      const v = await timeseries(emu, 'dev1', keys);
      return keys.split(',').every((k) => v[k]) ? v : null;
    }, 5000, 'every key of the object form stored');
    // ThingsBoard's REST answer without useStrictDataTypes: values as strings, a DOUBLE in Java's text
    const val = (k) => ts[k][0].value;
    assert.equal(val('i'), '42');
    assert.equal(val('f'), '42.0');
    assert.equal(val('b'), 'true');
    assert.equal(val('s'), 'x');
    assert.equal(canon(val('o')), canon('{"k":"v","n":[1,2.5]}'));
    assert.equal(val('big'), '9007199254740993');
    assert.equal(val('neg'), '-7');
    assert.equal(val('half'), '0.5');
    for (const k of keys.split(',')) {
      assert.ok(ts[k][0].ts >= t0 - 1000 && ts[k][0].ts <= Date.now() + 1000, `${k}: ts ${ts[k][0].ts} is the time of sending`);
    }
    // with useStrictDataTypes the raw JSON text keeps 42 vs 42.0
    const strict = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/values/timeseries?keys=i,f&useStrictDataTypes=true`);
    assert.match(strict.text, /"i":\[\{"ts":\d+,"value":42\}\]/);
    assert.match(strict.text, /"f":\[\{"ts":\d+,"value":42\.0\}\]/);
    // and the emulator's own view of the stored type
    const latest = (await summary(emu, 'dev1')).latest;
    const types = Object.fromEntries(keys.split(',').map((k) => [k, latest[k].type]));
    assert.deepEqual(types, { i: 'LONG', f: 'DOUBLE', b: 'BOOLEAN', s: 'STRING', o: 'JSON', big: 'LONG', neg: 'LONG', half: 'DOUBLE' });
  });

  test('1. floats of any size are stored as DOUBLE (1e15, 1e20, 0.1 + 0.2, 1e-20), never LONG or STRING', async () => {
    const r = await evalLua(emu, 'dev1', 'return tb.send_telemetry({d15 = 1e15, d20 = -1e20, dsum = 0.1 + 0.2, dtiny = 1e-20, d300 = 1e300}) ' +
      'and tb.send_attributes({a20 = 1e20, asum = 0.1 + 0.2})');
    assert.equal(r.text, 'true');
    const keys = ['d15', 'd20', 'dsum', 'dtiny', 'd300'];
    const latest = await waitUntil(async () => {
      const s = await summary(emu, 'dev1');
      return keys.every((k) => s.latest[k]) && s.attributes.CLIENT_SCOPE.a20 && s.attributes.CLIENT_SCOPE.asum ? s : null;
    }, 5000, 'the float keys stored');
    const types = Object.fromEntries(keys.map((k) => [k, latest.latest[k].type]));
    assert.deepEqual(types, { d15: 'DOUBLE', d20: 'DOUBLE', dsum: 'DOUBLE', dtiny: 'DOUBLE', d300: 'DOUBLE' });
    assert.deepEqual([latest.latest.d15.value, latest.latest.d20.value, latest.latest.dsum.value, latest.latest.dtiny.value],
      [1e15, -1e20, 0.3, 0]);
    assert.deepEqual([latest.attributes.CLIENT_SCOPE.a20.type, latest.attributes.CLIENT_SCOPE.asum.type], ['DOUBLE', 'DOUBLE']);
  });

  test('1. telemetry, array form', async () => {
    const r = await evalLua(emu, 'dev1', 'return tb.send_telemetry({{a1 = 1}, {a2 = 2.0}, {a3 = "three"}})');
    assert.equal(r.text, 'true');
    const ts = await waitUntil(async () => {
      const v = await timeseries(emu, 'dev1', 'a1,a2,a3');
      return v.a1 && v.a2 && v.a3 ? v : null;
    }, 5000, 'a1, a2, a3 stored');
    assert.deepEqual([ts.a1[0].value, ts.a2[0].value, ts.a3[0].value], ['1', '2.0', 'three']);
    const latest = (await summary(emu, 'dev1')).latest;
    assert.deepEqual([latest.a1.type, latest.a2.type, latest.a3.type], ['LONG', 'DOUBLE', 'STRING']);
  });

  test('1. telemetry, {ts, values} form (alone and in an array): the given ts is stored', async () => {
    let r = await evalLua(emu, 'dev1', 'return tb.send_telemetry({ts = 1700000000000, values = {tv = 7, tf = 7.0}})');
    assert.equal(r.text, 'true');
    r = await evalLua(emu, 'dev1', 'return tb.send_telemetry({{ts = 1700000000001, values = {tw = 1}}, {ts = 1700000000002, values = {tw = 2.5}}})');
    assert.equal(r.text, 'true');
    const q = '&startTs=1699999999000&endTs=1700000001000&orderBy=ASC&limit=10';
    const ts = await waitUntil(async () => {
      const v = await timeseries(emu, 'dev1', 'tv,tf,tw', q);
      return v.tv && v.tf && v.tw && v.tw.length === 2 ? v : null;
    }, 5000, 'tv, tf and both tw samples stored');
    assert.deepEqual(ts.tv, [{ ts: 1700000000000, value: '7' }]);
    assert.deepEqual(ts.tf, [{ ts: 1700000000000, value: '7.0' }]);
    assert.deepEqual(ts.tw, [{ ts: 1700000000001, value: '1' }, { ts: 1700000000002, value: '2.5' }]);
  });

  test('1. client attributes arrive in CLIENT_SCOPE with their types', async () => {
    // (a numeric-looking string such as "1.0" would be stored as a number: ThingsBoard's type cast)
    const r = await evalLua(emu, 'dev1', 'return tb.send_attributes({fw = "1.0.3", n = 3, f = 1.0, on = false})');
    assert.equal(r.text, 'true');
    const attrs = await waitUntil(async () => {
      const a = await emu.get(`/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/values/attributes/CLIENT_SCOPE?keys=fw,n,f,on`);
      return a.length === 4 ? a : null;
    }, 5000, 'four client attributes');
    assert.deepEqual(Object.fromEntries(attrs.map((a) => [a.key, a.value])), { fw: '1.0.3', n: 3, f: 1, on: false });
    const raw = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/values/attributes/CLIENT_SCOPE?keys=f,n`);
    assert.match(raw.text, /"key":"f","value":1\.0\b/);
    assert.match(raw.text, /"key":"n","value":3\b/);
    const client = (await summary(emu, 'dev1')).attributes.CLIENT_SCOPE;
    assert.deepEqual([client.fw.type, client.n.type, client.f.type, client.on.type], ['STRING', 'LONG', 'DOUBLE', 'BOOLEAN']);
    // nothing of this went to the other device
    assert.deepEqual((await summary(emu, 'other')).latest, {});
  });

  // --- 2 -----------------------------------------------------------------------------------
  test('2. server-side RPC ids start at 0 on the wire; the agent answers on rpc/response/0', async () => {
    const down = await messages(emu, 'dev1', '?dir=down&topic=v1/devices/me/rpc/request/');
    assert.ok(down.length > 0);
    assert.equal(down[0].topic, 'v1/devices/me/rpc/request/0');
    const up = await messages(emu, 'dev1', '?dir=up&topic=v1/devices/me/rpc/response/0');
    assert.equal(up.length, 1, 'one response to request 0');
  });

  test('2. two-way RPC: a string result is a quoted JSON string; numbers keep their type', async () => {
    const r = await twoway(emu, 'dev1', 'greet', { name: 'Ann' });
    assert.equal(r.status, 200);
    assert.equal(r.text, '"hello Ann"');
    assert.equal((await twoway(emu, 'dev1', 'answer')).text, '42.0');
    assert.equal((await twoway(emu, 'dev1', 'count')).text, '42');
  });

  test('2. two-way RPC: a raised error and nil, err answer {"error": ...}', async () => {
    const r = await twoway(emu, 'dev1', 'fail');
    assert.equal(r.status, 200);
    assert.equal(r.text, '{"error":"boom"}');
    assert.equal((await twoway(emu, 'dev1', 'nilErr')).text, '{"error":"no such sensor"}');
  });

  test('2. two-way RPC: an unknown method answers {"error":"unknown method: ..."}', async () => {
    const r = await twoway(emu, 'dev1', 'noSuchMethod', { x: 1 });
    assert.equal(r.status, 200);
    assert.equal(r.text, '{"error":"unknown method: noSuchMethod"}');
    assert.ok(agent.running());
  });

  test('2. one-way RPC: 200 with no body, the handler runs, no response is published', async () => {
    const mark = agent.mark();
    const r = await emu.api('POST', `/api/plugins/rpc/oneway/${emu.ids.dev1}`, { method: 'oneway', params: { v: 1 } });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.text, '');
    await agent.waitForLog(/ONEWAY ran with \{"v":1\}/, 3000, mark);
    const down = await messages(emu, 'dev1', '?dir=down&topic=v1/devices/me/rpc/request/');
    const req = down.filter((m) => /"method":"oneway"/.test(m.payload)).pop();
    assert.ok(req, 'the one-way request went down');
    const id = req.topic.split('/').pop();
    await delay(ms(500));
    const up = await messages(emu, 'dev1', `?dir=up&topic=v1/devices/me/rpc/response/${id}`);
    assert.deepEqual(up, [], 'no response to a handler that returns nothing');
  });

  test('2. several RPCs in flight: each answers when its handler finishes', async () => {
    const t0 = Date.now();
    const [a, b, c] = await Promise.all([
      twoway(emu, 'dev1', 'slow', { ms: 1500, tag: 'A' }),
      twoway(emu, 'dev1', 'slow', { ms: 100, tag: 'B' }),
      twoway(emu, 'dev1', 'greet', { name: 'C' }),
    ]);
    assert.deepEqual([a.status, b.status, c.status], [200, 200, 200]);
    assert.deepEqual([a.text, b.text, c.text], ['"A"', '"B"', '"hello C"']);
    assert.ok(b.at < a.at && c.at < a.at, 'B and C answer before A');
    assert.ok(b.at - t0 < ms(1000), `B took ${b.at - t0} ms: it waited for A`);
    assert.ok(a.at - t0 >= 1400, `A answered after ${a.at - t0} ms, before its 1500 ms sleep`);
  });

  // --- 3 -----------------------------------------------------------------------------------
  test('3. a shared attribute set over REST reaches tb.on_attributes; 20.0 stays a float', async () => {
    const mark = agent.mark();
    const r = await emu.api('POST', `/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/attributes/SHARED_SCOPE`,
      '{"target":21.5,"mode":"eco","n":3,"d":20.0}', { 'content-type': 'application/json' });
    assert.equal(r.status, 200, r.text);
    await agent.waitForLog(/ATTR changes\[d=20\.0:float,mode="eco":string,n=3:integer,target=21\.5:float\] deleted\[\]$/, 3000, mark);
  });

  test('3. a shared attribute deleted over REST arrives as deleted', async () => {
    const mark = agent.mark();
    const r = await emu.api('DELETE', `/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/SHARED_SCOPE?keys=target,mode`);
    assert.equal(r.status, 200, r.text);
    await agent.waitForLog(/ATTR changes\[\] deleted\[mode,target\]$/, 3000, mark);
  });

  test('3. request_attributes returns the current values (the deleted ones are gone)', async () => {
    let r = await evalLua(emu, 'dev1', 'return tb.request_attributes{client = {"fw", "n"}, shared = {"n", "d", "target"}}');
    assert.equal(canon(r.text), canon('{"client":{"fw":"1.0.3","n":3},"shared":{"d":20.0,"n":3}}'));
    r = await evalLua(emu, 'dev1', 'return tb.request_attributes{}');
    const all = canon(r.text);
    assert.match(all, /"shared":\{"d":20\.0,"n":3\}/, all);
    assert.match(all, /"client":\{[^}]*"f":1\.0,"fw":"1\.0\.3"/, all);
    // on the wire: comma-joined key strings, {} for all
    const reqs = await messages(emu, 'dev1', '?dir=up&topic=v1/devices/me/attributes/request/');
    const last2 = reqs.slice(-2).map((m) => canon(m.payload));
    assert.deepEqual(last2, [canon('{"clientKeys":"fw,n","sharedKeys":"n,d,target"}'), '{}']);
  });

  // --- 4 -----------------------------------------------------------------------------------
  test('4. getSessionLimits (built in) is answered by tbemu and adopted by the agent', async () => {
    const line = agent.log.find(/server session limits:/);
    assert.ok(line, `the agent logged no session limits:\n${agent.log.tail(30)}`);
    assert.match(line.line, /payload 65536 bytes, 37 in flight, messages 500:1,6000:60/);
    const up = await messages(emu, 'dev1', '?dir=up&topic=v1/devices/me/rpc/request/');
    const req = up.find((m) => /"method":"getSessionLimits"/.test(m.payload));
    assert.ok(req, 'the agent asked for getSessionLimits');
    const down = await messages(emu, 'dev1', `?dir=down&topic=v1/devices/me/rpc/response/${req.topic.split('/').pop()}`);
    assert.equal(down.length, 1, 'tbemu answered it');
    const r = await evalLua(emu, 'dev1', 'return tb.rpc_call("getSessionLimits")');
    assert.deepEqual(r.json, LIMITS);
  });

  test('4. client-side RPC with a reply configured in tbemu', async () => {
    await emu.post('/emu/client-rpc', { method: 'getTime', response: { time: 1700000000000, zone: 'UTC' } });
    const r = await evalLua(emu, 'dev1', 'return tb.rpc_call("getTime", {tz = "UTC"})');
    assert.equal(canon(r.text), canon('{"time":1700000000000,"zone":"UTC"}'));
    const up = await messages(emu, 'dev1', '?dir=up&topic=v1/devices/me/rpc/request/');
    assert.equal(canon(up.filter((m) => /getTime/.test(m.payload)).pop().payload), canon('{"method":"getTime","params":{"tz":"UTC"}}'));
  });

  test('4. client-side RPC timeout: the server\'s {"error":"timeout"} gives nil, "timeout"', async () => {
    await emu.post('/emu/config', { clientRpcTimeoutMs: 500 });
    try {
      const t0 = Date.now();
      const r = await evalLua(emu, 'dev1', 'local r, e = tb.rpc_call("nobodyAnswers", nil, 8000); return {r = r or false, e = e}');
      const took = Date.now() - t0;
      assert.deepEqual(r.json, { r: false, e: 'timeout' });
      assert.ok(took >= 400 && took < ms(5000), `answered after ${took} ms: not the server's 500 ms timeout`);
    } finally {
      await emu.post('/emu/config', { clientRpcTimeoutMs: 60000 });
    }
  });

  test('4. client-side RPC timeout: the local timeout fires first; the late reply is ignored', async () => {
    await emu.post('/emu/client-rpc', { method: 'sluggish', response: { late: true }, delayMs: 1500 });
    const t0 = Date.now();
    const r = await evalLua(emu, 'dev1', 'local r, e = tb.rpc_call("sluggish", nil, 300); return {r = r or false, e = e}');
    const took = Date.now() - t0;
    assert.deepEqual(r.json, { r: false, e: 'timeout' });
    assert.ok(took >= 250 && took < 1400, `answered after ${took} ms`);
    // the late reply arrives and changes nothing: the agent still answers
    await delay(ms(1500));
    assert.equal((await twoway(emu, 'dev1', 'greet', { name: 'after' })).text, '"hello after"');
  });

  // --- 7 -----------------------------------------------------------------------------------
  test('7. telemetry over the payload limit: nil, err at the call, never sent, still connected', async () => {
    const seq = await lastSeq(emu, 'dev1');
    // {ts, values} form, so the payload is exactly what the script gives: the MQTT remaining
    // length is payload + topic + 4 (topic length, packet id); tbemu closes above 65536
    const topic = 'v1/devices/me/telemetry';
    const fixed = JSON.stringify({ ts: 1700000000100, values: { blob: '' } }).length;
    const fits = 65536 - topic.length - 4 - fixed;
    const code = (n, ts) => `local ok, err = tb.send_telemetry({ts = ${ts}, values = {blob = string.rep("x", ${n})}})
      return {ok = ok or false, err = err or false}`;

    const over = await evalLua(emu, 'dev1', code(fits + 1, 1700000000200));
    assert.equal(over.json.ok, false, `a payload 1 byte over the limit was accepted: ${over.text}`);
    assert.equal(typeof over.json.err, 'string');
    assert.match(over.json.err, /too large|limit/i);
    const far = await evalLua(emu, 'dev1', code(100000, 1700000000300));
    assert.equal(far.json.ok, false, far.text);

    // exactly at the limit: accepted, delivered, no disconnect
    const at = await evalLua(emu, 'dev1', code(fits, 1700000000100));
    assert.deepEqual(at.json, { ok: true, err: false }, 'a payload exactly at the limit is accepted');
    await waitUntil(async () => {
      const v = await timeseries(emu, 'dev1', 'blob', '&startTs=1700000000000&endTs=1700000001000');
      return v.blob && v.blob.some((e) => e.ts === 1700000000100 && e.value.length === fits);
    }, 5000, 'the payload at the limit stored');

    // a small one after them still arrives over the same session
    const after = await evalLua(emu, 'dev1', 'return tb.send_telemetry({afterBig = 1})');
    assert.equal(after.text, 'true');
    await waitUntil(async () => (await timeseries(emu, 'dev1', 'afterBig')).afterBig, 5000, 'afterBig stored');

    const v = await timeseries(emu, 'dev1', 'blob', '&startTs=1700000000000&endTs=1700000001000');
    assert.deepEqual(v.blob.map((e) => e.ts), [1700000000100], 'only the payload at the limit reached the server');
    const up = await messages(emu, 'dev1', `?dir=up&topic=${topic}`);
    assert.ok(up.every((m) => m.size <= 65536 - topic.length - 4), 'nothing over the limit was published');
    const ev = (await events(emu, 'dev1')).filter((e) => e.seq > seq && /closed|disconnected|connected/.test(e.type));
    assert.deepEqual(ev, [], 'the session was never closed');
    assert.equal((await summary(emu, 'dev1')).connected, true);
    assert.ok(agent.running());
    assert.equal(agent.log.find(/connection lost/), null, agent.log.tail(20));
  });
});

// ------------------------------------------------------------------------------------------
// items 5 and 6: credentials and sessions

describe('tbemu: credentials, CONNACK refusals, one session per device', () => {
  const w = world({ after });
  let emu;
  after(() => emu && emu.halt());
  before(async () => {
    emu = await startTbemu(['tok', 'dup'], [['basic', 'cid-basic', 'user-basic', 'pw-basic-s3cr3t']]);
  });

  test('5. wrong token: CONNACK 5, the agent exits 3 with one clear line, the token never printed', async () => {
    const token = 'wrong-t0ken-xyzzy';
    const agent = await w.agent(SCRIPT, { port: emu.mqttPort, token, name: 'tbagent-wrong' });
    const { code } = await agent.waitExit(10000);
    assert.equal(code, 3, agent.log.text());
    const last = agent.log.lines.filter((l) => l.trim()).at(-1);
    assert.match(last, /CONNACK 5/);
    assert.match(last, /not authori[sz]ed/i);
    assert.ok(!agent.log.text().includes(token) && !agent.stdout.includes(token), 'the token reached the output');
  });

  test('5. wrong basic password: exit 3, the password never printed', async () => {
    const pw = 'not-the-pw-QQ9';
    const agent = await w.agent(SCRIPT, {
      port: emu.mqttPort, auth: false, name: 'tbagent-badpw',
      args: ['--client-id', 'cid-basic', '--username', 'user-basic', '--password', pw],
    });
    const { code } = await agent.waitExit(10000);
    assert.equal(code, 3, agent.log.text());
    assert.match(agent.log.lines.filter((l) => l.trim()).at(-1), /not authori[sz]ed/i);
    assert.ok(!agent.log.text().includes(pw) && !agent.stdout.includes(pw), 'the password reached the output');
  });

  test('5. MQTT basic credentials (client id, user name, password) connect as that device', async () => {
    const agent = await w.agentReady(SCRIPT, {
      port: emu.mqttPort, auth: false, name: 'tbagent-basic',
      args: ['--client-id', 'cid-basic', '--username', 'user-basic', '--password', 'pw-basic-s3cr3t'],
    });
    const s = await summary(emu, 'basic');
    assert.equal(s.connected, true);
    const r = await evalLua(emu, 'basic', 'return tb.send_telemetry({viaBasic = 1.5})');
    assert.equal(r.text, 'true');
    const v = await waitUntil(async () => (await timeseries(emu, 'basic', 'viaBasic')).viaBasic, 5000, 'viaBasic stored');
    assert.equal(v[0].value, '1.5');
    assert.equal((await summary(emu, 'tok')).latest.viaBasic, undefined);
    assert.ok(!agent.log.text().includes('pw-basic-s3cr3t'), 'the password reached the log');
  });

  test('6. two agents with one token: tbemu closes the older; each agent warns once about the same credentials', async () => {
    const opts = (name) => ({ port: emu.mqttPort, token: 'dup-token', name, args: ['--backoff-min', '200', '--backoff-max', '1000'] });
    const a = await w.agentReady(SCRIPT, opts('tbagent-A'));
    const first = (await events(emu, 'dup')).filter((e) => e.type === 'connected').pop();
    const seq = await lastSeq(emu, 'dup');
    const markA = a.mark();
    const b = await w.agent(SCRIPT, opts('tbagent-B'));

    // the server closes the older session (A's), and A sees its connection lost
    await waitUntil(async () => (await events(emu, 'dup')).find((e) => e.seq > seq && e.type === 'closed' && e.reason === 'SESSION_TAKEN_OVER'),
      5000, 'tbemu to close a session as SESSION_TAKEN_OVER');
    const closed = (await events(emu, 'dup')).find((e) => e.seq > seq && e.type === 'closed');
    assert.equal(closed.sid, first.sid, 'the session closed is the older one');
    await a.waitForLog(/connection lost/, 5000, markA);

    // flapping: both reconnect and take the session from each other; each says so, once
    const FLAP = /another device or agent is probably using the same credentials/;
    await a.waitForLog(FLAP, 15000, markA);
    await b.waitForLog(FLAP, 15000);
    const t0 = Date.now();
    await delay(ms(5000));
    const warnA = a.log.count(FLAP, markA);
    const warnB = b.log.count(FLAP);
    assert.equal(warnA, 1, `agent A warned ${warnA} times:\n${a.log.tail(30)}`);
    assert.equal(warnB, 1, `agent B warned ${warnB} times:\n${b.log.tail(30)}`);
    assert.match(a.log.find(FLAP, markA).line, /warn/i, 'the flapping line is a warning');
    // both keep trying (with backoff), neither exits
    assert.ok(a.running() && b.running());
    const connects = (await events(emu, 'dup')).filter((e) => e.type === 'connected' && e.ts >= t0).length;
    assert.ok(connects <= 5 * 2 * 2 + 2, `${connects} connects in 5 s: the reconnects are not backed off`);
  });
});
