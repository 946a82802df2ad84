// Items 4 and 5: every handler in its own coroutine, yielding calls that block nothing else,
// timers, on_connect/on_disconnect, tb.log, tb.state; and an idle agent that uses no CPU.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { world, cpuTicks, delay, ms, tele } from './lib.mjs';

const T = 'v1/devices/me/telemetry';

test('a sleeping handler blocks neither RPCs nor timers', async (t) => {
  const { server } = await world(t).device(`
local tb = require "tb"
tb.on_rpc("nap", function(p) tb.sleep(p); return "rested" end)
tb.on_rpc("ping", function() return "pong" end)
tb.on_rpc("startTicks", function() tb.state.tick = 0; tb.state.ticker = tb.every(100, function()
  tb.state.tick = tb.state.tick + 1 end); return true end)
tb.on_rpc("ticks", function() return tb.state.tick end)
`);
  await server.rpc('startTicks');
  const nap = server.rpc('nap', 1500, { timeout: 6000 });
  const t0 = Date.now();
  const ping = await server.rpc('ping');
  assert.equal(ping.text, '"pong"');
  assert.ok(Date.now() - t0 < ms(800), 'ping waited for the sleeping handler');
  await delay(500);
  const ticks = Number((await server.rpc('ticks')).text);
  assert.ok(ticks >= 3, `only ${ticks} ticks while a handler slept`);
  assert.equal((await nap).text, '"rested"');
});

test('handlers waiting on request_attributes and rpc_call block nothing else', async (t) => {
  const { server } = await world(t).device(`
local tb = require "tb"
tb.on_rpc("waitAttrs", function() local r, e = tb.request_attributes{shared = {"x"}, timeout = 1500}; return e or "answered" end)
tb.on_rpc("waitRpc", function() local r, e = tb.rpc_call("never", nil, 1500); return e or "answered" end)
tb.on_rpc("ping", function() return "pong" end)
`, { readyTimeout: 15000, serverOpts: { autoAttributes: false } });
  const a = server.rpc('waitAttrs', null, { timeout: 6000 });
  const b = server.rpc('waitRpc', null, { timeout: 6000 });
  const t0 = Date.now();
  assert.equal((await server.rpc('ping')).text, '"pong"');
  assert.ok(Date.now() - t0 < ms(800));
  assert.equal((await a).text, '"timeout"');
  assert.equal((await b).text, '"timeout"');
});

test('tb.sleep, tb.rpc_call and tb.request_attributes at top level raise a clear error', async (t) => {
  const { code, agent } = await world(t).exited('local tb = require "tb"\ntb.sleep(10)\n', 5000);
  assert.equal(code, 1);
  assert.match(agent.log.text(), /device\.lua:2:.*(yield|handler)/);
});

test('timers: every runs periodically until cancelled, after runs once, a cancelled after never', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  await w.agent(`
local tb = require "tb"
tb.on_connect(function()
  local n = 0
  local ev
  ev = tb.every(150, function()
    n = n + 1
    tb.send_telemetry({tick = n, at = tb.now()})
    if n == 5 then ev:cancel() end
  end)
  tb.after(400, function() tb.send_telemetry({after = "fired"}) end)
  local never = tb.after(300, function() tb.send_telemetry({after = "cancelled one fired"}) end)
  never:cancel()
end)
`, { broker });
  const ticks = await server.waitCount(T, 6, 5000);
  await delay(ms(600));
  const all = server.all(T).map((m) => m.json.values ?? m.json);
  const tickVals = all.filter((j) => j.tick !== undefined).map((j) => j.tick);
  assert.deepEqual(tickVals, [1, 2, 3, 4, 5], JSON.stringify(all));
  assert.deepEqual(all.filter((j) => j.after !== undefined), [{ after: 'fired' }]);
  // due times are 150 ms apart; a late run may shorten one gap, not the whole span
  const at = all.filter((j) => j.tick !== undefined).map((j) => j.at);
  assert.ok(at[4] - at[0] >= 450, `5 ticks of 150 ms took ${at[4] - at[0]} ms`);
  void ticks;
});

test('on_connect and on_disconnect run, tb.state is shared by every handler', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  let server = await w.server(broker);
  const agent = await w.agent(`
local tb = require "tb"
tb.state.connects = tb.state.connects or 0
tb.on_connect(function()
  tb.state.connects = tb.state.connects + 1
  tb.send_telemetry({connects = tb.state.connects})
end)
tb.on_disconnect(function(why) tb.log.warn("ON_DISCONNECT %s", tostring(why)) end)
tb.on_rpc("state", function() return tb.state.connects end)
`, { broker });
  await server.waitFor(T, (m) => tele(m) === '{"connects":1}', 5000);
  const mark = agent.mark();
  await broker.stop();
  await agent.waitForLog(/ON_DISCONNECT/, 5000, mark);
  await broker.start();
  server = await w.server(broker);
  await agent.waitForLog(/connected to/, 8000, mark);
  // the RPC subscription comes last; ask until it answers
  let r;
  for (let i = 0; i < 20 && !r; i++) {
    r = await server.rpc('state', null, { timeout: 500 }).catch(() => undefined);
  }
  assert.equal(r?.text, '2');
});

test('tb.log writes levelled lines; debug hidden at info', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const agent = await w.agent(`
local tb = require "tb"
tb.log.debug("dbg %d", 1)
tb.log.info("hello %s %d", "world", 5)
tb.log.warn("careful")
tb.log.error("bad %q", "x")
tb.log.info("%d broken format", "not a number")
`, { broker });
  await agent.waitForLog(/ INFO hello world 5$/, 3000);
  await agent.waitForLog(/ WARN careful$/, 3000);
  await agent.waitForLog(/ ERROR bad "x"$/, 3000);
  await agent.waitForLog(/broken format/, 3000);
  assert.equal(agent.log.count(/dbg 1/), 0);
  assert.ok(agent.running(), 'a bad format string must not stop the agent');
});

test('an idle agent uses no CPU (3 s, no timers)', async (t) => {
  const { server, agent } = await world(t).device(`
local tb = require "tb"
tb.on_rpc("ping", function() return "pong" end)
`, { args: ['--log-level', 'debug', '--keepalive', '60'] });
  assert.equal((await server.rpc('ping')).text, '"pong"');
  await delay(300);
  const before = cpuTicks(agent.pid);
  await delay(3000);
  const used = cpuTicks(agent.pid) - before;
  assert.ok(used <= 2, `idle agent used ${used} clock ticks in 3 s`);
  assert.equal((await server.rpc('ping')).text, '"pong"');
  // one poll loop and no threads (libmosquitto's and libcurl's included)
  const threads = /^Threads:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${agent.pid}/status`, 'utf8'));
  assert.equal(Number(threads[1]), 1, 'the agent runs one thread');
});

test('an agent waiting to reconnect uses no CPU', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const agent = await w.agent('local tb = require "tb"\n', { broker, args: ['--backoff-min', '2000', '--backoff-max', '4000'] });
  await agent.waitForLog(/connected to/, 5000);
  await broker.stop();
  await agent.waitForLog(/reconnecting in/, 5000);
  const before = cpuTicks(agent.pid);
  await delay(2000);
  const used = cpuTicks(agent.pid) - before;
  assert.ok(used <= 2, `a waiting agent used ${used} clock ticks in 2 s`);
});
