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
//     server, and the agent stays connected; a payload exactly at the limit goes through;
//  8. claiming: tb.claim's secret and expiry stored by tbemu, a second claim while one holds
//     ignored, tb.claim{} a valid request; the customer's claim over REST (wrong secret fails,
//     right one succeeds, then CLAIMED) when tbemu serves POST /api/customer/device/{name}/claim
//     (skipped until it does);
//  9. tbemu drops the session (/emu/devices/{name}/disconnect): the agent reconnects by itself,
//     subscribes again, fetches the shared attributes set while it was away, subscribes to RPC
//     last; an RPC asked for while it was away is delivered after that and answered;
// 10. the offline outbox: records held unacknowledged by /emu/pause and records sent while
//     disconnected arrive after the reconnect first, in order, each stored with the time the
//     script sent it;
// 11. SIGTERM while /emu/pause holds the PUBACKs: exit 0 after --shutdown-timeout; a restart on
//     the same --state-dir delivers all of it once.
//
// Every wait is bounded (scaled for sanitizer builds: TBAGENT=build-asan/tbagent); ITEST_VERBOSE=1
// echoes agent logs, TBEMU_DEBUG=1 tbemu's.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startEmu } from '../tbemu/test/helpers.mjs';
import { world, canon, ms, delay, EVAL_HANDLER } from './lib.mjs';

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
const SCRIPT = `${EVAL_HANDLER}tb.on_rpc("greet", function(p) return "hello " .. p.name end)
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

// ------------------------------------------------------------------------------------------
// items 8-11: claiming, a dropped session, the offline outbox and SIGTERM with PUBACKs held,
// each test with its own device and agent on one tbemu

// sentLines(agent, re, from) -> the parsed "key=value" fields of the agent's log lines matching re
function sentLines(agent, re, from = 0) {
  return agent.log.lines.slice(from).filter((l) => re.test(l)).map((l) => {
    const f = {};
    for (const m of l.matchAll(/(\w+)=(\S+)/g)) f[m[1]] = /^-?\d+$/.test(m[2]) ? Number(m[2]) : m[2];
    return f;
  });
}

// eventsSince(emu, dev, seq, type) -> tbemu's events of the device after seq (of that type)
async function eventsSince(emu, dev, seq, type) {
  return (await events(emu, dev)).filter((e) => e.seq > seq && (!type || e.type === type));
}

// series(emu, dev, key) -> every stored sample of key, oldest first
async function series(emu, dev, key) {
  const v = await timeseries(emu, dev, key, `&startTs=0&endTs=${Date.now() + 60000}&orderBy=ASC&limit=100000`);
  return v[key] || [];
}

// The device script of items 8-11: SCRIPT (eval, greet, the ATTR log line) plus connect and
// disconnect log lines, a telemetry producer started and stopped over RPC (item 10) and a
// burst sent from a shared attribute, which tbemu can push while it reads nothing (item 11).
const SESSION_SCRIPT = SCRIPT + `
tb.on_connect(function() tb.log.info("ON_CONNECT connected=%s", tostring(tb.connected())) end)
tb.on_disconnect(function(reason) tb.log.info("ON_DISCONNECT %s", tostring(reason)) end)
tb.on_rpc("produce", function(p)
  if tb.state.producer then tb.state.producer:cancel() end
  tb.state.producer = tb.every(p.every, function()
    local n = (tb.state.n or 0) + 1
    tb.state.n = n
    local a = tb.now()
    local ok, err = tb.send_telemetry({cseq = n})
    local b = tb.now()
    local queued, inflight = tb.backlog()
    tb.log.info("SENT cseq=%d ok=%s err=%s a=%d b=%d online=%s queued=%d inflight=%d",
      n, tostring(ok), tostring(err), a, b, tostring(tb.connected()), queued, inflight)
  end)
  return true
end)
tb.on_rpc("stopProducing", function()
  tb.state.producer:cancel()
  return tb.state.n
end)
tb.on_attributes(function(changes)
  local n = changes.burst
  if math.type(n) ~= "integer" then return end
  local a = tb.now()
  for i = 1, n do
    assert(tb.send_telemetry({tseq = i}))
    tb.sleep(3)   -- distinct timestamps: the server keeps one sample per key and ts
  end
  local queued, inflight = tb.backlog()
  tb.log.info("BURST n=%d a=%d b=%d queued=%d inflight=%d online=%s", n, a, tb.now(), queued, inflight, tostring(tb.connected()))
end)
`;

describe('tbemu: claiming, a dropped session, the offline outbox, SIGTERM with PUBACKs held', () => {
  let emu;
  after(() => emu && emu.halt());
  before(async () => {
    emu = await startTbemu(['claimer', 'rc', 'offline', 'term']);
  });

  // --- 8 -----------------------------------------------------------------------------------
  test('8. tb.claim reaches tbemu: secret and expiry stored; a second claim while one holds is ignored; tb.claim{} is a valid request', async (t) => {
    const w = world(t);
    await w.agentReady(SESSION_SCRIPT, { port: emu.mqttPort, token: 'claimer-token', name: 'tbagent-claimer' });
    const wire = async () => (await messages(emu, 'claimer', '?dir=up&topic=v1/devices/me/claim')).map((m) => m.payload);
    const seq0 = await lastSeq(emu, 'claimer');

    // a short claim: stored with the secret and requestedAt + durationMs as its expiry
    let t0 = Date.now();
    let r = await evalLua(emu, 'claimer', 'return tb.claim{secret_key = "first-key", duration_ms = 700}');
    assert.equal(r.text, 'true');
    const first = await waitUntil(async () => (await summary(emu, 'claimer')).claim, 5000, 'the first claim stored');
    let t1 = Date.now();
    assert.equal(first.secretKey, 'first-key');
    assert.equal(first.durationMs, 700);
    assert.equal(first.expiresAt - first.requestedAt, 700);
    assert.ok(first.requestedAt >= t0 && first.requestedAt <= t1, `requestedAt ${first.requestedAt} not in [${t0}, ${t1}]`);
    assert.deepEqual((await wire()).map(canon), [canon('{"durationMs":700,"secretKey":"first-key"}')]);

    // while it holds, another claim is ignored (putIfAbsent), as ThingsBoard does
    let seq = await lastSeq(emu, 'claimer');
    r = await evalLua(emu, 'claimer', 'return tb.claim{secret_key = "second-key", duration_ms = 60000}');
    assert.equal(r.text, 'true');
    await waitUntil(async () => (await eventsSince(emu, 'claimer', seq, 'claim-ignored')).length === 1, 5000, 'tbemu to ignore the second claim');
    assert.deepEqual((await summary(emu, 'claimer')).claim, first);

    // once it expired, a new claim replaces it
    await delay(Math.max(0, first.expiresAt - Date.now()) + 50);
    t0 = Date.now();
    r = await evalLua(emu, 'claimer', 'return tb.claim{secret_key = "s3cr3t", duration_ms = 60000}');
    assert.equal(r.text, 'true');
    const third = await waitUntil(async () => {
      const c = (await summary(emu, 'claimer')).claim;
      return c && c.secretKey === 's3cr3t' ? c : null;
    }, 5000, 'the claim after expiry stored');
    t1 = Date.now();
    assert.equal(third.durationMs, 60000);
    assert.equal(third.expiresAt - third.requestedAt, 60000);
    assert.ok(third.requestedAt >= t0 && third.requestedAt <= t1);

    // tb.claim{} (both fields optional) is a JSON object on the wire, which the server takes
    seq = await lastSeq(emu, 'claimer');
    r = await evalLua(emu, 'claimer', 'return tb.claim{}');
    assert.equal(r.text, 'true');
    await waitUntil(async () => (await eventsSince(emu, 'claimer', seq, 'claim-ignored')).length === 1, 5000, 'tbemu to take (and ignore) the empty claim');
    assert.equal((await wire()).at(-1), '{}');
    assert.deepEqual((await summary(emu, 'claimer')).claim, third);

    // no claim closed the session; the agent is still answering
    assert.deepEqual((await eventsSince(emu, 'claimer', seq0)).filter((e) => /closed|disconnected|connected/.test(e.type)), []);
    assert.equal((await twoway(emu, 'claimer', 'greet', { name: 'claimer' })).text, '"hello claimer"');
  });

  test('8. the customer\'s claim over REST: a wrong secret fails, the right one succeeds, then the device is claimed', async (t) => {
    // ThingsBoard: POST /api/customer/device/{deviceName}/claim {"secretKey"} -> 200
    // {"device":{..},"response":"SUCCESS"}; 400 "FAILURE" for a wrong secret or an expired or
    // missing claim (a wrong secret also evicts the claim); 400 "CLAIMED" once claimed
    const path = '/api/customer/device/claimer/claim';
    const probe = await emu.api('POST', path, { secretKey: 'wrong-secret' });
    if (probe.status === 404 && /Not found: \/api\/customer\//.test(probe.text)) {
      t.skip('tbemu has no POST /api/customer/device/{deviceName}/claim');
      return;
    }
    const w = world(t);
    await w.agentReady(SESSION_SCRIPT, { port: emu.mqttPort, token: 'claimer-token', name: 'tbagent-claimer2' });
    assert.equal(probe.status, 400, probe.text);
    assert.equal(probe.json, 'FAILURE');
    // the wrong secret evicted the claim: the device claims again, the right secret succeeds
    assert.equal((await evalLua(emu, 'claimer', 'return tb.claim{secret_key = "s3cr3t", duration_ms = 60000}')).text, 'true');
    await waitUntil(async () => (await summary(emu, 'claimer')).claim, 5000, 'the claim stored again');
    const ok = await emu.api('POST', path, { secretKey: 's3cr3t' });
    assert.equal(ok.status, 200, ok.text);
    assert.equal(ok.json.response, 'SUCCESS');
    assert.equal(ok.json.device.name, 'claimer');
    assert.ok(ok.json.device.customerId && ok.json.device.customerId.id !== '13814000-1dd2-11b2-8080-808080808080', 'the device has no customer');
    const again = await emu.api('POST', path, { secretKey: 's3cr3t' });
    assert.equal(again.status, 400, again.text);
    assert.equal(again.json, 'CLAIMED');
  });

  // --- 9 -----------------------------------------------------------------------------------
  test('9. tbemu drops the session: the agent reconnects, subscribes again, gets the shared attributes set meanwhile, RPC last and working', async (t) => {
    const w = world(t);
    let r = await emu.api('POST', `/api/plugins/telemetry/DEVICE/${emu.ids.rc}/attributes/SHARED_SCOPE`, { target: 20 });
    assert.equal(r.status, 200, r.text);
    // a long first backoff (1125-1875 ms with jitter) leaves time to change things meanwhile
    const agent = await w.agentReady(SESSION_SCRIPT, {
      port: emu.mqttPort, token: 'rc-token', name: 'tbagent-rc',
      args: ['--log-level', 'debug', '--backoff-min', '1500', '--backoff-max', '3000'],
    });
    await agent.waitForLog(/ATTR changes\[target=20:integer\] deleted\[\]$/, 3000);
    const seq0 = await lastSeq(emu, 'rc');
    const mark = agent.mark();

    r = await emu.api('POST', '/emu/devices/rc/disconnect');
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, { disconnected: true });
    await waitUntil(async () => (await eventsSince(emu, 'rc', seq0, 'disconnected')).length, 3000, 'tbemu to see the session gone');
    await agent.waitForLog(/connection lost/, 3000, mark);
    await agent.waitForLog(/ON_DISCONNECT /, 3000, mark);

    // while it is away: a shared attribute changes and a two-way RPC is asked for
    r = await emu.api('POST', `/api/plugins/telemetry/DEVICE/${emu.ids.rc}/attributes/SHARED_SCOPE`, { target: 21, mode: 'away' });
    assert.equal(r.status, 200, r.text);
    const pending = twoway(emu, 'rc', 'greet', { name: 'offline' });
    const away = await eventsSince(emu, 'rc', seq0);
    assert.equal(away.filter((e) => e.type === 'connected').length, 0, 'the agent was back before the changes: the test proves nothing');
    assert.equal((await summary(emu, 'rc')).connected, false);

    // it comes back by itself
    await agent.waitForLog(/reconnecting in \d/, 3000, mark);
    const back = await waitUntil(async () => (await eventsSince(emu, 'rc', seq0, 'connected'))[0], 8000, 'the agent to reconnect');
    await agent.waitForLog(/session ready/, 8000, mark);
    await agent.waitForLog(/ON_CONNECT connected=true/, 3000, mark);

    // subscribed again to everything (tbemu keeps no subscriptions), the RPC topic last
    const subs = await eventsSince(emu, 'rc', back.seq, 'subscribed');
    const topics = subs.map((e) => e.topic);
    for (const tp of ['v1/devices/me/attributes', 'v1/devices/me/attributes/response/+', 'v1/devices/me/rpc/response/+', 'v1/devices/me/rpc/request/+']) {
      assert.ok(topics.includes(tp), `not subscribed again to ${tp}: ${topics}`);
    }
    const rpcSub = subs.find((e) => e.topic === 'v1/devices/me/rpc/request/+');
    assert.equal(subs.at(-1), rpcSub, `the RPC subscription is not the last: ${topics}`);

    // the current shared attributes fetched before it, and handed to on_attributes
    const up = (await messages(emu, 'rc', '?dir=up')).filter((m) => m.seq > back.seq);
    const attrReq = up.find((m) => m.topic.startsWith('v1/devices/me/attributes/request/'));
    assert.ok(attrReq, 'no attribute request after the reconnect');
    assert.equal(attrReq.payload, '{}');
    assert.ok(attrReq.seq < rpcSub.seq, 'the attribute request came after the RPC subscription');
    const limitsReq = up.find((m) => m.topic.startsWith('v1/devices/me/rpc/request/') && /getSessionLimits/.test(m.payload));
    assert.ok(limitsReq && limitsReq.seq < rpcSub.seq, 'getSessionLimits was not asked before the RPC subscription');
    await agent.waitForLog(/ATTR changes\[mode="away":string,target=21:integer\] deleted\[\]$/, 3000, mark);
    const pushes = (await messages(emu, 'rc', '?dir=down&topic=v1/devices/me/attributes')).filter((m) => m.seq > seq0 && m.topic === 'v1/devices/me/attributes');
    assert.deepEqual(pushes, [], 'tbemu pushed the change to a session that was gone');

    // the RPC asked for while away is delivered once the RPC subscription is there, and answered
    const res = await pending;
    assert.equal(res.status, 200, res.text);
    assert.equal(res.text, '"hello offline"');
    const delivered = (await eventsSince(emu, 'rc', back.seq, 'rpc-delivered'))[0];
    assert.ok(delivered && delivered.seq > rpcSub.seq, 'the pending RPC went down before the RPC subscription');
    // and a new one works as before
    assert.equal((await twoway(emu, 'rc', 'greet', { name: 'again' })).text, '"hello again"');
    assert.equal(agent.log.count(/connection lost/, mark), 1, agent.log.tail(30));
  });

  // --- 10 ----------------------------------------------------------------------------------
  test('10. offline outbox: telemetry sent while tbemu holds PUBACKs and while disconnected arrives after the reconnect, in order, with the time it was sent', async (t) => {
    const w = world(t);
    const agent = await w.agentReady(SESSION_SCRIPT, {
      port: emu.mqttPort, token: 'offline-token', name: 'tbagent-offline',
      args: ['--log-level', 'debug', '--backoff-min', '1500', '--backoff-max', '3000'],
    });
    const SENT = /SENT cseq=/;
    assert.equal((await twoway(emu, 'offline', 'produce', { every: 100 })).text, 'true');
    await waitUntil(async () => (await series(emu, 'offline', 'cseq')).length >= 3, 5000, 'the first samples stored');

    // 1. tbemu reads nothing: the records go out but stay unacknowledged
    let paused = false;
    t.after(async () => { if (paused) await emu.post('/emu/resume'); });
    await emu.post('/emu/pause');
    paused = true;
    const pmark = agent.mark();
    await delay(150);   // what tbemu was parsing when paused is done with
    const storedAtPause = (await series(emu, 'offline', 'cseq')).length;
    await waitUntil(() => sentLines(agent, SENT, pmark).length >= 6, 5000, 'six records sent while paused');
    const storedAtDrop = await series(emu, 'offline', 'cseq');
    assert.equal(storedAtDrop.length, storedAtPause, 'tbemu stored data while paused');
    const lastAcked = Number(storedAtDrop.at(-1).value);
    const held = sentLines(agent, SENT).filter((l) => l.cseq > lastAcked);
    assert.ok(held.length >= 4 && held.every((l) => l.online === 'true' && l.ok === 'true'), `held: ${JSON.stringify(held)}`);
    assert.ok(held.at(-1).inflight >= 3, `records awaiting PUBACK: ${held.at(-1).inflight}`);

    // 2. the session drops with them in flight (what tbemu never read is gone with it)
    const seq0 = await lastSeq(emu, 'offline');
    const dmark = agent.mark();
    assert.deepEqual(await emu.post('/emu/devices/offline/disconnect'), { disconnected: true });
    await emu.post('/emu/resume');
    paused = false;
    await agent.waitForLog(/connection lost/, 3000, dmark);
    await waitUntil(() => sentLines(agent, SENT, dmark).filter((l) => l.online === 'false').length >= 5, 5000, 'five records sent while offline');

    // 3. back: the held and the queued records go out first, in order
    const back = await waitUntil(async () => (await eventsSince(emu, 'offline', seq0, 'connected'))[0], 8000, 'the agent to reconnect');
    await agent.waitForLog(/session ready/, 8000, dmark);
    const rmark = agent.mark();
    await waitUntil(() => sentLines(agent, SENT, rmark).filter((l) => l.online === 'true').length >= 3, 5000, 'records sent after the reconnect');
    const stop = await twoway(emu, 'offline', 'stopProducing');
    assert.equal(stop.status, 200, stop.text);
    const n = Number(stop.text);
    const stored = await waitUntil(async () => {
      const s = await series(emu, 'offline', 'cseq');
      return s.length >= n ? s : null;
    }, 8000, `all ${n} records stored`);

    // every record once, in order, each with the time the script sent it (not when it arrived)
    assert.deepEqual(stored.map((e) => Number(e.value)), Array.from({ length: n }, (_, i) => i + 1));
    const sent = new Map(sentLines(agent, SENT).map((l) => [l.cseq, l]));
    for (const e of stored) {
      const l = sent.get(Number(e.value));
      assert.ok(l && l.ok === 'true', `cseq ${e.value} not sent by the script`);
      assert.ok(e.ts >= l.a && e.ts <= l.b, `cseq ${e.value}: stored ts ${e.ts} is not the time it was sent (${l.a}..${l.b})`);
    }
    for (let i = 1; i < stored.length; i++) assert.ok(stored[i].ts > stored[i - 1].ts, 'timestamps not increasing');

    // the records held by the pause and sent during the outage are the first to arrive after
    // the reconnect, in order; the first of them waited the whole outage (backoff >= 1125 ms)
    const lastOffline = sentLines(agent, SENT, dmark).filter((l) => l.online === 'false').at(-1).cseq;
    const late = Array.from({ length: lastOffline - lastAcked }, (_, i) => lastAcked + 1 + i);
    const up = (await messages(emu, 'offline', '?dir=up&topic=v1/devices/me/telemetry')).filter((m) => m.seq > back.seq);
    const upSeqs = up.map((m) => JSON.parse(m.payload).values?.cseq);
    assert.deepEqual(upSeqs.slice(0, late.length), late, 'what waited is not what went out first after the reconnect');
    const first = JSON.parse(up[0].payload);
    assert.equal(first.ts, stored[late[0] - 1].ts);
    assert.ok(up[0].ts - first.ts >= 1000, `cseq ${late[0]}: sent at ${first.ts}, received at ${up[0].ts}`);
    assert.ok(up.every((m) => m.ts >= back.ts));
    assert.equal(agent.log.count(/connection lost/), 1);
  });

  // --- 11 ----------------------------------------------------------------------------------
  test('11. SIGTERM while tbemu holds the PUBACKs: exit 0 after --shutdown-timeout; a restart on the same state dir delivers them', async (t) => {
    const w = world(t);
    const a = await w.agentReady(SESSION_SCRIPT, {
      port: emu.mqttPort, token: 'term-token', name: 'tbagent-term',
      args: ['--log-level', 'debug', '--shutdown-timeout', '1500'],
    });
    let paused = false;
    t.after(async () => { if (paused) await emu.post('/emu/resume'); });
    await emu.post('/emu/pause');
    paused = true;
    // tbemu still writes: the shared attribute reaches the agent, whose handler sends 20 records
    const r = await emu.api('POST', `/api/plugins/telemetry/DEVICE/${emu.ids.term}/attributes/SHARED_SCOPE`, { burst: 20 });
    assert.equal(r.status, 200, r.text);
    await a.waitForLog(/BURST n=20 /, 5000);
    const burst = sentLines(a, /BURST n=20 /)[0];
    assert.equal(burst.inflight, 20, `records awaiting PUBACK: ${burst.inflight}`);

    const t0 = Date.now();
    a.signal('SIGTERM');
    const { code, signal } = await a.waitExit(8000);
    const took = Date.now() - t0;
    assert.equal(signal, null);
    assert.equal(code, 0, a.log.tail(20));
    assert.ok(took >= 1400, `exited after ${took} ms, before --shutdown-timeout 1500`);
    assert.ok(took < 1500 + ms(3000), `exited after ${took} ms`);
    assert.ok(a.log.find(/shutting down with 20 records unacknowledged/), a.log.tail(20));
    assert.deepEqual(await series(emu, 'term', 'tseq'), [], 'tbemu stored data while paused');

    // tbemu never read the PUBLISHes (nor the DISCONNECT): drop that session, then read again
    const seq0 = await lastSeq(emu, 'term');
    await emu.post('/emu/devices/term/disconnect');
    await emu.post('/emu/resume');
    paused = false;
    assert.deepEqual(await series(emu, 'term', 'tseq'), []);

    // the same state dir: the outbox on disk goes out first
    const restarted = Date.now();
    const b = await w.agent('local tb = require "tb"\n', { port: emu.mqttPort, token: 'term-token', name: 'tbagent-term2', dir: a.dir });
    await b.waitForLog(/outbox: 20 records kept from before the restart go out first/, 5000);
    const stored = await waitUntil(async () => {
      const s = await series(emu, 'term', 'tseq');
      return s.length >= 20 ? s : null;
    }, 8000, 'the 20 records stored after the restart');
    assert.deepEqual(stored.map((e) => Number(e.value)), Array.from({ length: 20 }, (_, i) => i + 1));
    for (const e of stored) assert.ok(e.ts >= burst.a && e.ts <= burst.b, `tseq ${e.value}: ts ${e.ts} is not when it was sent (${burst.a}..${burst.b})`);
    const up = (await messages(emu, 'term', '?dir=up&topic=v1/devices/me/telemetry')).filter((m) => m.seq > seq0);
    assert.equal(up.length, 20, 'each record arrived once');
    assert.ok(up.every((m) => m.ts >= restarted));
    assert.ok(b.running());
  });
});
