// Issue 12: exact on the wire, plain in the log, through the real binary against mosquitto and
// a server-role client that reads the bytes:
//   1. telemetry in the script's form; the time of the call only on what waited, only from a
//      synchronised clock (TB_CLOCK_SYNCED stands in for the kernel's adjtimex status), in each
//      --timestamps mode, live, after a broker outage and after a restart;
//   2. the installed firmware/software versions before the attribute request and any state,
//      with the update assigned before connecting and while connected;
//   3. accept(info, current) and a declined offer reported FAILED, "declined: <why>";
//   4. one agent per state directory;
//   5. the wording of each connection failure, repeated handler errors, the queued count;
//   6. argument errors at the script's line under `run`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import {
  world, delay, ms, tmpdir, freePort, makeCerts, runAgent, writeScript, evalLua, EVAL_SCRIPT, canon,
} from './lib.mjs';

const T = 'v1/devices/me/telemetry';
const REQUEST = /^v1\/devices\/me\/attributes\/request\/\d+$/;

// ------------------------------------------------------------------------------------------
// 1. timestamps

// The script sends at once on RPC "now" (and answers the clock before and after); when the
// connection drops it sends an object and an array (one entry with its own ts) and logs the
// clock before and after those calls.
const STAMPS = `
local tb = require "tb"
tb.on_rpc("now", function()
  local before = tb.now()
  assert(tb.send_telemetry({live = 1}))
  return {before = before, after = tb.now()}
end)
tb.on_disconnect(function()
  if tb.state.sent then return end
  tb.state.sent = true
  local before = tb.now()
  assert(tb.send_telemetry({q = 1}))
  assert(tb.send_telemetry({{a = 1}, {ts = 5, values = {b = 2}}}))
  tb.log.info("QUEUED between %d and %d", before, tb.now())
end)
`;

// shape(text, lo, hi) -> the payload in canonical form with the time of the call written T,
// after checking that every time the agent added lies in [lo, hi] (the script's ts 5 stays)
function shape(text, lo, hi) {
  return canon(text).replace(/"ts":(\d+)/g, (all, ts) => {
    if (ts === '5') return all;
    assert.ok(Number(ts) >= lo && Number(ts) <= hi, `ts ${ts} is not the time of the call (${lo}..${hi}): ${text}`);
    return '"ts":"T"';
  });
}

// what waited: with the time of the call T added, or as the script gave it
function waited(stamp) {
  return (stamp
    ? ['{"ts":"T","values":{"q":1}}', '[{"ts":"T","values":{"a":1}},{"ts":5,"values":{"b":2}}]']
    : ['{"q":1}', '[{"a":1},{"ts":5,"values":{"b":2}}]']).map((x) => canon(x));
}

for (const mode of ['auto', 'device', 'server']) {
  for (const synced of [true, false]) {
    const clock = synced ? 'a synchronised clock' : 'a clock that is not synchronised';
    test(`--timestamps ${mode}, ${clock}: live and after a broker outage, exactly on the wire`, async (t) => {
      const w = world(t);
      const broker = await w.broker({ persistence: true });
      let server = await w.server(broker, { persistent: true });
      const args = ['--log-level', 'debug', '--backoff-min', '200', '--backoff-max', '400'];
      if (mode !== 'auto') args.push('--timestamps', mode);
      const agent = await w.agentReady(STAMPS, { broker, args, env: { TB_CLOCK_SYNCED: synced ? '1' : '0' } });
      // live: published at once (key order is the Lua table's: compared in canonical form)
      let from = server.mark();
      const { before, after } = (await server.rpc('now')).json;
      const live = await server.waitFor(T, () => true, 3000, from);
      assert.equal(shape(live.text, before, after), canon(mode === 'device' ? '{"ts":"T","values":{"live":1}}' : '{"live":1}'));
      if (mode !== 'device') assert.equal(live.text, '{"live":1}');
      // the broker goes away: what the script sends waits in the outbox
      from = server.mark();
      const mark = agent.mark();
      await broker.stop();
      const queued = await agent.waitForLog(/QUEUED between \d+ and \d+/, 5000, mark);
      const [, lo, hi] = /between (\d+) and (\d+)/.exec(queued).map(Number);
      await broker.start();
      server = await w.reconnectServer(server, broker);
      await agent.waitForLog(/delivering \d+ queued records?/, 8000, mark);
      // (the live record may come again: it was in flight when the broker went, QoS 1)
      const queuedOnly = (m) => !m.text.includes('"live"');
      await server.waitFor(T, (m) => m.text.includes('"b":2'), 8000, from);
      const got = server.all(T, from).filter(queuedOnly);
      // device: stamped at the call, whatever it waited for
      const stamp = mode === 'device' || (mode === 'auto' && synced);
      assert.deepEqual(got.map((m) => shape(m.text, lo, hi)), waited(stamp));
      const said = agent.log.count(/not synchronised/, mark);
      assert.equal(said, mode === 'auto' && !synced ? 1 : 0, agent.log.text());
    });
  }
}

// A record read back from the outbox on disk after a restart keeps what it needs: the time of
// the call when the clock was synchronised then, none when it was not.
for (const synced of [true, false]) {
  test(`--timestamps auto: read back after a restart, ${synced ? 'stamped with the time of the call' : 'in the script\'s form (clock not synchronised at the call)'}`, async (t) => {
    const w = world(t);
    const dir = tmpdir('tbitest-wire-');
    const port = await freePort();
    // nothing listens yet: the record waits on disk; the agent stops with it queued
    const first = await w.agent(`
local tb = require "tb"
tb.after(0, function()
  local before = tb.now()
  local ok = tb.send_telemetry({r = 1})
  tb.log.info("QUEUED between %d and %d ok=%s", before, tb.now(), tostring(ok))
end)
`, { dir, port, env: { TB_CLOCK_SYNCED: synced ? '1' : '0' }, args: ['--backoff-min', '5000', '--backoff-max', '5000'] });
    const line = await first.waitForLog(/QUEUED between \d+ and \d+ ok=true/, 5000);
    const [, lo, hi] = /between (\d+) and (\d+)/.exec(line).map(Number);
    first.signal('SIGTERM');
    assert.equal((await first.waitExit(8000)).code, 0, first.log.text());
    // started again, with the clock synchronised now and a broker to talk to
    const broker = await w.broker({ port });
    const server = await w.server(broker);
    const second = await w.agent('local tb = require "tb"\n', { dir, port, env: { TB_CLOCK_SYNCED: '1' } });
    const m = await server.waitFor(T, () => true, 8000);
    assert.equal(shape(m.text, lo, hi), synced ? '{"ts":"T","values":{"r":1}}' : '{"r":1}');
    assert.ok(second.log.find(/outbox: 1 records kept from before the restart/), second.log.text());
    assert.equal(second.log.count(/not synchronised/), synced ? 0 : 1, second.log.text());
  });
}

// ------------------------------------------------------------------------------------------
// 2. and 3. firmware and software: the order of the reports, accept(info, current), declines

const POLICIES = `
local tb = require "tb"
local function policy(kind, title, version)
  return {
    current = {title = title, version = version},
    accept = function(info, current)
      tb.log.info("ACCEPT %s offered=%s current=%s/%s", kind, info.version, current.title, current.version)
      if info.version < current.version then return false, "older than " .. current.version end
      return true
    end,
    install = function() return true end,
  }
end
tb.firmware(policy("fw", "dev", "1.5"))
tb.software(policy("sw", "app", "7"))
`;

const offer = (p, title, version) => ({
  [`${p}_title`]: title, [`${p}_version`]: version, [`${p}_size`]: 4, [`${p}_checksum_algorithm`]: 'SHA256',
  [`${p}_checksum`]: '88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589',
});

// what(m) -> a short name for a message of the OTA flow, or null
function what(m) {
  if (REQUEST.test(m.topic)) return 'request';
  if (m.topic !== T || !m.json) return null;
  const v = m.json.values ?? m.json;
  for (const p of ['fw', 'sw']) {
    if (v[`current_${p}_version`] !== undefined) return `current ${p} ${v[`current_${p}_title`]} ${v[`current_${p}_version`]}`;
    if (v[`${p}_state`] !== undefined) return `${p} ${v[`${p}_state`]}`;
  }
  return null;
}
const flow = (server, from = 0) => server.messages.slice(from).map(what).filter(Boolean);

test('firmware assigned before the agent connects: current versions first, then the request, then DOWNLOADING', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker, { attributes: { client: {}, shared: offer('fw', 'dev', '2.0') } });
  const agent = await w.agent(POLICIES, { broker, args: ['--fw-chunk-timeout', '60000'] });
  await server.waitFor(T, (m) => what(m) === 'fw DOWNLOADING', 8000);
  assert.deepEqual(flow(server).slice(0, 4), ['current fw dev 1.5', 'current sw app 7', 'request', 'fw DOWNLOADING']);
  await agent.waitForLog(/ACCEPT fw offered=2\.0 current=dev\/1\.5/, 2000);
});

test('firmware assigned while connected, and a reconnect: the current versions go out first on every connection', async (t) => {
  const w = world(t);
  const broker = await w.broker({ persistence: true });
  let server = await w.server(broker, { persistent: true });
  const agent = await w.agentReady(POLICIES, { broker, args: ['--fw-chunk-timeout', '60000'] });
  assert.deepEqual(flow(server), ['current fw dev 1.5', 'current sw app 7', 'request']);
  let from = server.mark();
  Object.assign(server.attributes.shared, offer('sw', 'app', '8'));
  await server.pushAttributes(offer('sw', 'app', '8'));
  await server.waitFor(T, (m) => what(m) === 'sw DOWNLOADING', 5000, from);
  assert.deepEqual(flow(server, from), ['sw DOWNLOADING']);
  // a new connection with the update still assigned (the download waits on it)
  from = server.mark();
  const mark = agent.mark();
  await broker.restart();
  server = await w.reconnectServer(server, broker);
  await agent.waitForLog(/session ready/, 8000, mark);
  await delay(ms(300));
  // (a copy of a state sent before the restart may come again, QoS 1: from the broker's session
  // of the server or the agent's in-flight record; what matters is the new connection's order)
  const before = new Set(server.messages.slice(0, from).map((m) => `${m.topic} ${m.text}`));
  const copy = (m) => / (DOWNLOADING|DOWNLOADED|VERIFIED|UPDATING|UPDATED|FAILED)$/.test(what(m) || '') && before.has(`${m.topic} ${m.text}`);
  const again = server.messages.slice(from).filter((m) => !copy(m)).map(what).filter(Boolean);
  assert.deepEqual(again.slice(0, 3), ['current fw dev 1.5', 'current sw app 7', 'request'], again.join(', '));
});

test('a declined offer is FAILED with "declined: <why>" (firmware and software), once per package', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const agent = await w.agentReady(POLICIES, { broker });
  for (const [p, title, version, why] of [['fw', 'dev', '1.0', 'older than 1.5'], ['sw', 'app', '6', 'older than 7']]) {
    const from = server.mark();
    await server.pushAttributes(offer(p, title, version));
    const failed = await server.waitFor(T, (m) => what(m) === `${p} FAILED`, 5000, from);
    const v = failed.json.values ?? failed.json;
    assert.equal(v[`${p}_error`], `declined: ${why}`);
    await agent.waitForLog(new RegExp(`ACCEPT ${p} offered=${version} current=${title}/`), 2000);
    // the same package again: not asked, not reported again
    const again = server.mark();
    const mark = agent.mark();
    await server.pushAttributes(offer(p, title, version));
    await server.expectNone(T, (m) => what(m) !== null, 600, again);
    assert.equal(agent.log.count(/ACCEPT/, mark), 0);
  }
  // another package is asked about
  const from = server.mark();
  await server.pushAttributes(offer('fw', 'dev', '1.1'));
  const failed = await server.waitFor(T, (m) => what(m) === 'fw FAILED', 5000, from);
  assert.equal((failed.json.values ?? failed.json).fw_error, 'declined: older than 1.5');
});

// ------------------------------------------------------------------------------------------
// 4. one agent per state directory

test('a second agent on a state directory in use exits 2 with one line naming the pid; a bad script says what is wrong', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  await w.server(broker);
  const dir = tmpdir('tbitest-wire-');
  // both with the default --state-dir ./.tbagent, from the same working directory
  const first = await w.agentReady('local tb = require "tb"\n', { broker, dir, args: ['--state-dir', './.tbagent'] });
  const script = writeScript(dir, 'local tb = require "tb"\n', 'second.lua');
  const common = ['--token', 'x', '--port', String(broker.port), '--no-reload'];
  const second = await runAgent(['run', script, ...common], { cwd: dir });
  assert.equal(second.code, 2);
  assert.equal(second.stderr, `tbagent: state directory ./.tbagent is in use by pid ${first.pid}\n`);
  assert.equal(second.stdout, '');
  // a script that does not load: its own error, not the lock
  const bad = writeScript(dir, 'local tb = require "tb"\ntb.on_rpc(42, print)\n', 'bad.lua');
  const third = await runAgent(['run', bad, ...common], { cwd: dir });
  assert.equal(third.code, 1);
  assert.equal(third.stderr, `tbagent: cannot load ${bad}: ${bad}:2: bad argument #1 to 'on_rpc' (string expected, got number)\n`);
  // the first one goes, even by SIGKILL: the directory is free
  first.signal('SIGKILL');
  await first.exited;
  const next = await w.agentReady('local tb = require "tb"\n', { broker, dir, args: ['--state-dir', './.tbagent'] });
  assert.ok(next.running());
  assert.equal(fs.readFileSync(path.join(dir, '.tbagent', 'agent.lock'), 'utf8'), `${next.pid}\n`);
});

// ------------------------------------------------------------------------------------------
// 5. messages

test('a refused token: exit 3, and no line before it announces a reconnect', async (t) => {
  const w = world(t);
  const fake = await w.fake(5);
  const agent = await w.agent('local tb = require "tb"\n', { port: fake.port, args: ['--log-level', 'debug'] });
  const { code } = await agent.waitExit(10000);
  assert.equal(code, 3, agent.log.text());
  const lines = agent.log.lines.filter((l) => l.trim());
  assert.match(lines.at(-1), /^tbagent: ThingsBoard refused the connection: CONNACK 5, not authorized/);
  assert.equal(agent.log.count(/reconnect/), 0, agent.log.text());
  assert.equal(agent.log.count(/was refused|cannot connect/), 0, agent.log.text());
  assert.equal(fake.connects.length, 1);
});

// failure(t, opts, re): the agent's first WARN line about connecting matches re
async function failure(t, opts, re) {
  const w = world(t);
  const agent = await w.agent('local tb = require "tb"\n', { ...opts, args: [...(opts.args || []), '--backoff-min', '500', '--backoff-max', '500'] });
  const line = await agent.waitForLog(/ WARN cannot connect to /, 15000);
  assert.match(line, re);
  assert.ok(agent.running(), 'a failed connection is retried');
}

test('host not found: plain words with the host and port', async (t) => {
  await failure(t, { port: 1883, args: ['--host', 'no-such-host.invalid'] },
    / WARN cannot connect to no-such-host\.invalid:1883: host no-such-host\.invalid not found \(no address for that name\); check --host/);
});

test('no route to the host: plain words with the host and port', async (t) => {
  // TCP to a multicast address: the kernel answers "network is unreachable" at once, anywhere
  await failure(t, { port: 1883, args: ['--host', '224.0.0.1'] },
    / WARN cannot connect to 224\.0\.0\.1:1883: no route to 224\.0\.0\.1 \(network is unreachable\); check --host/);
});

test('connection refused: plain words with the host and port', async (t) => {
  const port = await freePort();
  await failure(t, { port },
    new RegExp(` WARN cannot connect to 127\\.0\\.0\\.1:${port}: connection refused: nothing accepts connections on port ${port} of 127\\.0\\.0\\.1; check --host and --port`));
});

test('TLS failure: plain words with the host and port', async (t) => {
  const w = world(t);
  const certs = makeCerts(tmpdir('tbitest-certs-'));
  const broker = await w.broker({ tls: certs });
  await failure(t, { port: broker.tlsPort, args: ['--cafile', certs.otherCa] },
    new RegExp(` WARN cannot connect to 127\\.0\\.0\\.1:${broker.tlsPort}: TLS handshake with 127\\.0\\.0\\.1:${broker.tlsPort} failed \\(.*certificate verify failed.*\\); check --cafile`));
});

test('timeout: a server that accepts and never answers, --connect-timeout', async (t) => {
  const sockets = new Set();
  const silent = net.createServer((s) => { sockets.add(s); s.on('error', () => {}); });
  await new Promise((r) => silent.listen(0, '127.0.0.1', r));
  t.after(() => { for (const s of sockets) s.destroy(); silent.close(); });
  const port = silent.address().port;
  await failure(t, { port, args: ['--connect-timeout', '1000'] },
    new RegExp(` WARN cannot connect to 127\\.0\\.0\\.1:${port}: no answer from 127\\.0\\.0\\.1:${port} within 1 s \\(timed out\\)`));
});

test('a timer failing the same way every period is logged in full once (then counted)', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  await w.server(broker);
  const agent = await w.agentReady('local tb = require "tb"\n\ntb.every(50, function() error("sensor gone") end)\n', { broker });
  await delay(ms(1500));
  const full = agent.log.count(/ ERROR timer at .*device\.lua:3 failed: .*device\.lua:3: sensor gone/);
  assert.equal(full, 1, agent.log.text());
  assert.equal(agent.log.count(/sensor gone/), 1, 'repeats are counted, not logged (the count comes a minute after the first repeat)');
});

// ------------------------------------------------------------------------------------------
// 6. argument errors under run

test('argument errors under run name the script\'s line, at load and in a handler', async (t) => {
  const w = world(t);
  const dir = tmpdir('tbitest-wire-');
  const file = writeScript(dir, 'local tb = require "tb"\n\ntb.on_rpc(42, function() end)\n');
  const r = await runAgent(['run', file, '--token', 'x', '--state-dir', path.join(dir, 'state')]);
  assert.equal(r.code, 1);
  assert.equal(r.stderr, `tbagent: cannot load ${file}: ${file}:3: bad argument #1 to 'on_rpc' (string expected, got number)\n`);
  const broker = await w.broker();
  const server = await w.server(broker);
  const agent = await w.agentReady(EVAL_SCRIPT, { broker });
  const res = await evalLua(server, 'tb.every("1s", print)');
  assert.deepEqual(res.json, { error: "bad argument #1 to 'every' (number expected, got string)" });
  await agent.waitForLog(/ ERROR RPC eval failed: eval:1: bad argument #1 to 'every' \(number expected, got string\)/, 2000);
});
