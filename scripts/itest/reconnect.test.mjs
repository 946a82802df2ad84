// Items 7 and 8: reconnect with backoff, re-subscribe, re-request attributes, on_connect again,
// RPC last; flapping detection; the offline outbox (order, limit, oversize), and pacing by the
// server's session limits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { world, delay, ms, tele } from './lib.mjs';

const T = 'v1/devices/me/telemetry';

test('broker restart: reconnect with growing backoff, re-subscribe, re-request attributes, on_connect again, RPC last and working', async (t) => {
  const w = world(t);
  const broker = await w.broker({ verbose: true, persistence: true });
  let server = await w.server(broker, { persistent: true, attributes: { client: {}, shared: { target: 20 } } });
  const agent = await w.agentReady(`
local tb = require "tb"
tb.state.n = 0
tb.on_connect(function() tb.state.n = tb.state.n + 1; tb.send_telemetry({connects = tb.state.n}) end)
tb.on_attributes(function(c) tb.log.info("ATTR %s", tb.json.encode(c)) end)
tb.on_rpc("ping", function() return "pong" end)
`, { broker, args: ['--log-level', 'debug', '--backoff-min', '100', '--backoff-max', '1600'] });
  await server.waitFor(T, (m) => tele(m) === '{"connects":1}', 5000);
  await agent.waitForLog(/ATTR \{"target":20\}/, 3000);
  const from = server.mark();
  const amark = agent.mark();
  await broker.stop();
  await agent.waitForLog(/connection lost/, 5000, amark);
  // let a few attempts fail so the backoff can grow
  for (let k = 0; k < 5; k++) {
    const seen = agent.log.count(/reconnecting in/, amark);
    if (seen >= 4) break;
    await agent.waitForLog(/reconnecting in/, 4000, agent.log.find(/reconnecting in/, amark) ? agent.mark() : amark);
  }
  const bmark = broker.log.mark();
  server.attributes.shared.target = 22;
  await broker.start();
  server = await w.reconnectServer(server, broker);
  await agent.waitForLog(/session ready/, 10000, amark);

  const delays = agent.log.lines.slice(amark).map((l) => /reconnecting in ([\d.]+) s/.exec(l)).filter(Boolean).map((m) => Number(m[1]));
  assert.ok(delays.length >= 3, `delays: ${delays}`);
  assert.ok(delays[1] > delays[0] && delays[2] > delays[1], `backoff does not grow: ${delays}`);
  assert.ok(delays.every((d) => d <= 1.6), `backoff over --backoff-max: ${delays}`);

  // re-subscribed (the broker remembers nothing for the agent)
  const agentSubs = broker.log.lines.slice(bmark).filter((l) => /^\d+: auto-\S+ 1 v1\//.test(l)).map((l) => l.split(' ').pop());
  for (const topic of ['v1/devices/me/attributes', 'v1/devices/me/attributes/response/+', 'v1/devices/me/rpc/response/+', 'v1/devices/me/rpc/request/+']) {
    assert.ok(agentSubs.includes(topic), `not re-subscribed to ${topic}: ${agentSubs}`);
  }
  // RPC last: after the attribute request of this connection
  const logAfter = broker.log.lines.slice(bmark);
  const attrReq = logAfter.findIndex((l) => /Received PUBLISH from auto-.*attributes\/request\//.test(l));
  const rpcSub = logAfter.findIndex((l) => /^\d+: auto-\S+ 1 v1\/devices\/me\/rpc\/request\/\+$/.test(l));
  assert.ok(attrReq >= 0 && rpcSub > attrReq, 'the RPC subscription must come after the attribute request');
  // current attributes fetched again and handed to the handlers
  const reqs = server.all(/^v1\/devices\/me\/attributes\/request\/\d+$/, from);
  assert.ok(reqs.some((m) => m.text === '{}'), `no attribute request after reconnect: ${reqs.map((m) => m.text)}`);
  await agent.waitForLog(/ATTR \{"target":22\}/, 3000, amark);
  // on_connect again, RPC works
  await server.waitFor(T, (m) => tele(m) === '{"connects":2}', 5000, from);
  assert.equal((await server.rpc('ping')).text, '"pong"');
});

test('two agents with the same credentials: one clear warning about flapping', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  await w.server(broker);
  const opts = (name) => ({
    broker, auth: false, name,
    args: ['--client-id', 'same-device', '--username', 'same-user', '--backoff-min', '100', '--backoff-max', '400', '--no-session-limits'],
  });
  const script = 'local tb = require "tb"\n';
  const a = await w.agent(script, opts('agent-a'));
  const b = await w.agent(script, opts('agent-b'));
  const re = /WARN .*(same credentials|another (device|agent|client))/i;
  await Promise.any([a.waitForLog(re, 10000), b.waitForLog(re, 10000)]).catch(() => {
    throw new Error(`no flapping warning within 10 s:\n--- a:\n${a.log.tail(15)}\n--- b:\n${b.log.tail(15)}`);
  });
  await delay(ms(2000));
  assert.ok(a.log.count(re) <= 1 && b.log.count(re) <= 1, 'the warning must be said once, not at every reconnect');
  assert.ok(a.running() && b.running());
});

const OFFLINE = (n) => `
local tb = require "tb"
tb.on_connect(function() tb.send_telemetry({online = true}) end)
tb.on_disconnect(function()
  if tb.state.done then return end
  tb.state.done = true
  tb.state.t0 = tb.now()
  local oks = {}
  for i = 1, ${n} do oks[#oks + 1] = tostring(tb.send_telemetry({seq = i})) end
  oks[#oks + 1] = tostring(tb.send_attributes({offline = true}))
  local big, err = tb.send_telemetry({blob = string.rep("x", 70000)})
  tb.log.info("QUEUED %s big=%s err=%s t0=%d", table.concat(oks, ","), tostring(big), tostring(err), tb.state.t0)
end)
`;

// the clock counts as synchronised (TB_CLOCK_SYNCED=1: this machine's may not be), so what
// waits offline carries the time of the call (wire.test.mjs covers the clock that is not)
async function offlineRun(t, n, extraArgs = []) {
  const w = world(t);
  const broker = await w.broker({ persistence: true });
  let server = await w.server(broker, { persistent: true });
  const agent = await w.agent(OFFLINE(n), { broker, args: ['--backoff-min', '300', '--backoff-max', '600', ...extraArgs],
    env: { TB_CLOCK_SYNCED: '1' } });
  await server.waitFor(T, (m) => tele(m) === '{"online":true}', 5000);
  const from = server.mark();
  await broker.stop();
  const queued = await agent.waitForLog(/QUEUED /, 5000);
  await broker.start();
  server = await w.reconnectServer(server, broker);
  return { w, broker, server, agent, from, queued };
}

test('offline: send_telemetry/send_attributes succeed, everything arrives in order after reconnect, with the time it was measured', async (t) => {
  const { server, agent, from, queued } = await offlineRun(t, 10);
  assert.match(queued, /QUEUED (true,){10}true big=nil err=.*too large/);
  const t0 = Number(/t0=(\d+)/.exec(queued)[1]);
  // {"online":true} may come again first: it was in flight when the broker stopped (QoS 1)
  await server.waitFor(T, (m) => (m.json.values ?? m.json).seq === 10, 10000, from);
  const msgs = server.all(T, from).filter((m) => (m.json.values ?? m.json).seq !== undefined);
  const seqs = msgs.map((m) => (m.json.values ?? m.json).seq);
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  for (const m of msgs) {
    assert.ok(m.json.ts !== undefined, `queued telemetry must carry its measurement time: ${m.text}`);
    assert.ok(Math.abs(m.json.ts - t0) < 2000, `ts ${m.json.ts} is not the time it was sent (${t0})`);
  }
  await server.waitFor('v1/devices/me/attributes', (m) => m.text === '{"offline":true}', 5000, from);
  await delay(ms(300));
  assert.equal(server.all(T, from).filter((m) => m.text.includes('blob')).length, 0, 'the oversize message must never be sent');
  assert.ok(agent.running());
});

// the bound counts the bytes queued: each record in the script's form ({"seq":N}, 9-10 bytes),
// the time it carries is added on the way out
test('offline with --memory-outbox --outbox-max-bytes 80: the oldest are dropped by bytes too', async (t) => {
  const { server, agent, from } = await offlineRun(t, 12, ['--memory-outbox', '--outbox-max-bytes', '80']);
  await server.waitFor('v1/devices/me/attributes', (m) => m.text === '{"offline":true}', 10000, from);
  await delay(ms(500));
  const got = server.all(T, from).filter((m) => tele(m) !== '{"online":true}');
  const bytes = got.reduce((n, m) => n + m.text.length, 0);
  const seqs = got.map((m) => (m.json.values ?? m.json).seq);
  assert.ok(seqs.length > 0 && seqs.length < 12, `kept ${seqs}`);
  assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => 13 - seqs.length + i), 'the newest are kept, in order');
  const queued = got.reduce((n, m) => n + tele(m).length, 0);
  assert.ok(queued <= 80, `${queued} bytes of telemetry kept (${bytes} on the wire, with their times)`);
  assert.ok(agent.log.find(/WARN outbox full \(limit \d+ records, 80 bytes\)/), agent.log.text());
});

test('offline with --outbox-limit 5: the oldest are dropped and a warning counts them', async (t) => {
  const { server, agent, from } = await offlineRun(t, 12, ['--outbox-limit', '5']);
  // 12 telemetry + 1 attributes through a 5-record outbox: the 8 oldest are dropped
  const msgs = await server.waitCount(/^v1\/devices\/me\/(telemetry|attributes)$/, 5, 10000, from);
  await delay(ms(500));
  const got = server.all(/^v1\/devices\/me\/(telemetry|attributes)$/, from).filter((m) => m.topic !== T || tele(m) !== '{"online":true}');
  assert.deepEqual(got.map((m) => (m.json.values ?? m.json).seq ?? 'attr'), [9, 10, 11, 12, 'attr']);
  void msgs;
  // a warning must say how many were dropped in all (8), not only that dropping began
  assert.ok(agent.log.find(/WARN .*\b8\b.*dropped|WARN .*dropped.*\b8\b/),
    `no warning counting the 8 dropped records:\n${agent.log.lines.filter((l) => /WARN/.test(l)).join('\n')}`);
});

test('a backlog is paced to the server\'s getSessionLimits rate ("messages":"5:1")', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker, {
    sessionLimits: { maxPayloadSize: 65536, maxInflightMessages: 100, rateLimits: { messages: '5:1', telemetryMessages: null, telemetryDataPoints: null } },
  });
  const agent = await w.agent(`
local tb = require "tb"
tb.on_connect(function() for i = 1, 20 do tb.send_telemetry({seq = i}) end end)
`, { broker });
  const msgs = await server.waitCount(T, 20, 20000);
  const span = msgs.at(-1).at - msgs[0].at;
  // the backlog waits in the outbox, so most entries carry their measurement time
  assert.deepEqual(msgs.map((m) => (m.json.values ?? m.json).seq), Array.from({ length: 20 }, (_, i) => i + 1));
  assert.ok(span >= 3000, `20 messages at 5/s drained in ${span} ms`);
  const line = agent.log.find(/session limits/);
  assert.ok(line, 'the adopted limits should be logged');
  assert.match(line.line, /5:1/);
});

// The configured rate (--rate-limits or TB_RATE_LIMITS) paces publishes on its own: the server
// here leaves its limits unset (first case) or is not asked at all (second case).
for (const how of ['--rate-limits', 'TB_RATE_LIMITS']) {
  test(`${how} 5:1 paces a burst of 15 telemetry messages to about 5 a second`, async (t) => {
    const w = world(t);
    const broker = await w.broker();
    const server = await w.server(broker);
    const opts = how === '--rate-limits'
      ? { broker, args: ['--rate-limits', '5:1'] }
      : { broker, args: ['--no-session-limits'], env: { TB_RATE_LIMITS: '5:1' } };
    await w.agent(`
local tb = require "tb"
tb.on_connect(function() for i = 1, 15 do tb.send_telemetry({seq = i}) end end)
`, opts);
    const msgs = await server.waitCount(T, 15, 15000);
    const span = msgs.at(-1).at - msgs[0].at;
    assert.deepEqual(msgs.map((m) => (m.json.values ?? m.json).seq), Array.from({ length: 15 }, (_, i) => i + 1));
    assert.ok(span >= 1500, `15 messages at 5/s went out in ${span} ms`);
  });
}

test('the server\'s maxPayloadSize lowers the payload limit', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker, {
    sessionLimits: { maxPayloadSize: 2000, maxInflightMessages: 100, rateLimits: {} },
  });
  await w.agentReady(`
local tb = require "tb"
tb.on_rpc("send", function(n) local ok, err = tb.send_telemetry({s = string.rep("x", n)}); return {ok = ok or false, err = err or false} end)
`, { broker });
  let r = await server.rpc('send', 3000);
  assert.equal(r.json.ok, false, r.text);
  assert.match(r.json.err, /too large|limit/);
  r = await server.rpc('send', 1000);
  assert.equal(r.json.ok, true, r.text);
});

test('limits the server leaves unset (null) are reported as unlimited', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  await w.server(broker);   // answers getSessionLimits with "messages": null, as ThingsBoard does when unset
  const agent = await w.agentReady('local tb = require "tb"\n', { broker });
  const line = agent.log.find(/session limits/);
  assert.ok(line, agent.log.text());
  assert.doesNotMatch(line.line, /userdata|nil/, 'a JSON null leaked into the log line');
});
