// Items 9 and 10: never send what ThingsBoard disconnects for (oversize, QoS 2), and bad
// input, failing handlers and runaway handlers never stop the agent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { world, runAgent, tmpdir, writeScript, delay, ms, tele } from './lib.mjs';

const T = 'v1/devices/me/telemetry';
const SEND = `
local tb = require "tb"
tb.on_rpc("send", function(n) local ok, err = tb.send_telemetry({s = string.rep("x", n)}); return {ok = ok or false, err = err or false} end)
tb.on_rpc("attrs", function(n) local ok, err = tb.send_attributes({s = string.rep("x", n)}); return {ok = ok or false, err = err or false} end)
tb.on_rpc("ping", function() return "pong" end)
`;

test('payloads over the default 64 KiB limit are refused at the call and never published', async (t) => {
  const { server, agent } = await world(t).device(SEND);
  const from = server.mark();
  let r = await server.rpc('send', 70000);
  assert.equal(r.json.ok, false, r.text);
  assert.match(r.json.err, /too large/);
  r = await server.rpc('attrs', 70000);
  assert.equal(r.json.ok, false, r.text);
  r = await server.rpc('send', 60000);
  assert.equal(r.json.ok, true, r.text);
  const m = await server.waitFor(T, () => true, 3000, from);
  assert.equal(tele(m).length, 60000 + 8);
  await delay(ms(300));
  assert.equal(server.all(/^v1\/devices\/me\/(telemetry|attributes)$/, from).length, 1);
  assert.ok(agent.running());
});

test('--payload-limit lowers the limit', async (t) => {
  const { server } = await world(t).device(SEND, { args: ['--log-level', 'debug', '--payload-limit', '1024'] });
  const from = server.mark();
  const r = await server.rpc('send', 2000);
  assert.equal(r.json.ok, false, r.text);
  assert.match(r.json.err, /too large/);
  assert.equal((await server.rpc('send', 500)).json.ok, true);
  await delay(ms(300));
  assert.equal(server.all(T, from).length, 1);
});

test('QoS 2 is impossible: --qos 2 and TB_QOS=2 exit 2', async () => {
  const dir = tmpdir();
  const script = writeScript(dir, SEND);
  let r = await runAgent(['run', script, '--token', 't', '--qos', '2']);
  assert.equal(r.code, 2);
  r = await runAgent(['run', script, '--token', 't'], { env: { TB_QOS: '2' } });
  assert.equal(r.code, 2);
});

test('malformed, wrongly shaped, huge and unknown-topic input from the server never stops the agent', async (t) => {
  const { server, agent } = await world(t).device(`${SEND}
tb.on_attributes(function(c, d) tb.log.info("ATTR %s", tb.json.encode(c)) end)
`);
  const huge = 'x'.repeat(1024 * 1024);
  const deep = '['.repeat(100000) + ']'.repeat(100000);
  const bad = [
    ['v1/devices/me/rpc/request/1001', '{not json'],
    ['v1/devices/me/rpc/request/1002', '[1,2,3]'],
    ['v1/devices/me/rpc/request/1003', '"just a string"'],
    ['v1/devices/me/rpc/request/1004', '{"method":5}'],
    ['v1/devices/me/rpc/request/1005', '{"params":{}}'],
    ['v1/devices/me/rpc/request/1006', ''],
    ['v1/devices/me/rpc/request/1007', `{"method":"ping","params":"${huge}"}`],
    ['v1/devices/me/rpc/request/1008', huge],
    ['v1/devices/me/rpc/request/1009', deep],
    ['v1/devices/me/rpc/request/1010', Buffer.from([0xff, 0xfe, 0x00, 0x7b])],
    ['v1/devices/me/rpc/request/99999999999999999999', '{"method":"ping"}'],
    ['v1/devices/me/rpc/request/abc', '{"method":"ping"}'],
    ['v1/devices/me/rpc/request/', '{"method":"ping"}'],
    ['v1/devices/me/attributes', '{bad'],
    ['v1/devices/me/attributes', '[1,2]'],
    ['v1/devices/me/attributes', 'null'],
    ['v1/devices/me/attributes', '42'],
    ['v1/devices/me/attributes', ''],
    ['v1/devices/me/attributes', '{"deleted":5}'],
    ['v1/devices/me/attributes', '{"deleted":[1,{"a":2},null]}'],
    ['v1/devices/me/attributes', `{"big":"${huge}"}`],
    ['v1/devices/me/attributes', deep],
    ['v1/devices/me/attributes/response/424242', '{"shared":{}}'],
    ['v1/devices/me/attributes/response/1', 'garbage'],
    ['v1/devices/me/rpc/response/424242', '{"x":1}'],
    ['v1/devices/me/rpc/response/1', 'garbage'],
    ['v1/devices/me/unknown/topic', '{"x":1}'],
    ['v2/fw/response/1/chunk/0', huge],
    ['v2/whatever', 'x'],
  ];
  for (const [topic, payload] of bad) await server.publish(topic, payload);
  // a normal RPC still answers afterwards, and so do attribute pushes
  const r = await server.rpc('ping', null, { timeout: 10000 });
  assert.equal(r.text, '"pong"');
  const mark = agent.mark();
  await server.pushAttributes({ fine: 1 });
  await agent.waitForLog(/ATTR \{"fine":1\}/, 5000, mark);
  assert.ok(agent.running());
  // the agent itself still sends only valid JSON
  for (const m of server.all(/^v1\/devices\/me\/rpc\/response\//)) JSON.parse(m.text);
});

test('a failing handler is logged with file:line and a traceback; its RPC answers an error', async (t) => {
  const { server, agent } = await world(t).device(`local tb = require "tb"
local function inner(x)
  return x.field.missing   -- line 3
end
tb.on_rpc("crash", function(p) local v = inner(p); return v end)
tb.on_rpc("ping", function() return "pong" end)
local n = 0
tb.every(100, function()
  n = n + 1
  if n == 1 then error("timer broke") end   -- line 10
  if n == 3 then tb.send_telemetry({timer_alive = n}) end
end)
`);
  const mark = agent.mark();
  const r = await server.rpc('crash', {});
  assert.ok(r.json && typeof r.json.error === 'string', r.text);
  assert.match(r.json.error, /field/);
  await agent.waitForLog(/ERROR .*device\.lua:3:/, 3000, mark);
  const at = agent.log.find(/ERROR .*device\.lua:3:/, mark).index;
  const rest = agent.log.lines.slice(at, at + 15).join('\n');
  assert.match(rest, /stack traceback:/);
  assert.match(rest, /device\.lua:5/, 'the traceback should show the caller');
  // timers keep running after an error in one of their runs
  await agent.waitForLog(/ERROR .*device\.lua:10: timer broke/, 3000);
  await server.waitFor(T, (m) => tele(m) === '{"timer_alive":3}', 3000);
  assert.equal((await server.rpc('ping')).text, '"pong"');
});

test('a runaway handler is cut off after --handler-budget; the agent stays responsive', async (t) => {
  const { server, agent } = await world(t).device(`local tb = require "tb"
tb.on_rpc("spin", function() while true do end end)
tb.on_rpc("spinStrings", function() local s = "" while true do s = s .. "x" if #s > 1000 then s = "" end end end)
tb.on_rpc("ping", function() return "pong" end)
`, { args: ['--log-level', 'debug', '--handler-budget', '300'] });
  for (const method of ['spin', 'spinStrings']) {
    const mark = agent.mark();
    const t0 = Date.now();
    const spin = server.rpc(method, null, { timeout: 8000 });
    const ping = await server.rpc('ping', null, { timeout: 8000 });
    assert.equal(ping.text, '"pong"');
    const r = await spin;
    assert.ok(r.json && typeof r.json.error === 'string', r.text);
    assert.ok(Date.now() - t0 < ms(3000), `cut off after ${Date.now() - t0} ms`);
    await agent.waitForLog(/ERROR .*(cut off|budget)/, 3000, mark);
  }
  assert.equal((await server.rpc('ping')).text, '"pong"');
});

test('the default handler budget is 1 s', async (t) => {
  const { server } = await world(t).device(
    'local tb = require "tb"\ntb.on_rpc("spin", function() while true do end end)\ntb.on_rpc("ping", function() return "pong" end)\n');
  const t0 = Date.now();
  const r = await server.rpc('spin', null, { timeout: 8000 });
  const took = Date.now() - t0;
  assert.ok(r.json && r.json.error, r.text);
  assert.ok(took >= 900 && took < ms(3000), `cut off after ${took} ms`);
  assert.equal((await server.rpc('ping')).text, '"pong"');
});

test('a runaway script top level is cut off at load: exit 1', async (t) => {
  const { code, agent } = await world(t).exited('local tb = require "tb"\nwhile true do end\n', 20000);
  assert.equal(code, 1);
  assert.match(agent.log.text(), /device\.lua:2:/);
});

test('os.exit in a handler: what was sent is delivered, then a clean exit with its status and a clear line; at load or reload it is an error', async (t) => {
  const { server, agent } = await world(t).device(`
local tb = require "tb"
tb.on_rpc("ping", function() return "pong" end)
tb.on_rpc("quit", function(n)
  for i = 1, n do tb.send_telemetry({last = i}) end
  os.exit(4)
  tb.send_telemetry({after_exit = true})
end)
`);
  const from = server.mark();
  const r = await server.rpc('quit', 20, { timeout: 5000 }).catch((e) => ({ json: {}, text: e.message }));
  assert.match(r.json.error || '', /os\.exit\(4\)/, r.text);
  const { code } = await agent.waitExit(10000);
  assert.equal(code, 4);
  assert.match(agent.log.text(), /tbagent: the script called os\.exit at .*:6 \(status 4\)/);
  const got = server.all(T, from).map((m) => JSON.parse(tele(m)).last);
  assert.deepEqual(got, Array.from({ length: 20 }, (_, i) => i + 1));
  assert.ok(!server.all(T, from).some((m) => /after_exit/.test(m.text)));

  const dir = tmpdir();
  const res = await runAgent(['run', writeScript(dir, 'local tb = require "tb"\nos.exit(0)\n'), '--token', 't', '--port', '1']);
  assert.equal(res.code, 1);
  assert.match(res.stderr, /tbagent: cannot load .*:2: os\.exit\(0\) called: not allowed while the script loads/);
});
