// Fault tests (issue 6): nothing a script handed over is lost through broker restarts, agent
// crashes (kill -9), network loss without a clean close, and an unusable or full state dir.
//
// Every test drives the same device script (seqScript): it sends telemetry {seq = N} with a
// strictly increasing integer every 5 ms at QoS 1 and, after each accepted send, saves N to a
// counter file (written to a temp file and renamed, so a kill -9 never leaves it half
// written). A restarted script continues after the saved N, so seqs keep increasing across
// agent restarts, and the counter is exactly "the highest seq the script saw accepted". The
// script stops sending when the test creates a flag file and logs "SEQ stopped at N".
//
// The server side is a server-role MQTT.js subscriber on v1/devices/me/telemetry. On plain
// mosquitto a broker restart would lose what the broker had acknowledged to the agent but not
// yet forwarded to the subscriber, so the broker runs with `persistence true`, is stopped with
// SIGTERM (which saves its database), and the subscriber keeps a persistent session (MQTT 5,
// fixed client id, clean=false, session expiry 1 h, QoS 1 subscription): the broker, not the
// test, makes the counting restart-proof. With SIGKILL the broker itself may lose messages it
// has already acknowledged, which no client can prevent, so SIGKILL is not used on the broker.
//
// Each test checks: every seq 1..N arrived (lost = 0), the first occurrences are increasing
// ("in order"; duplicates are allowed and counted), and prints one FIGURES line with sent,
// received, lost, duplicated for the README.
//
//   TBAGENT=build-asan/tbagent (or TB_ITEST_SLOW=1) scales the waits.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import {
  world, delay, ms, SCALE, tmpdir, withTimeout, TELEMETRY as T, seqSender, seqsOf, stopSeqs, tally, waitDelivered,
} from './lib.mjs';

const SLOW = SCALE > 1;
const BASE_ARGS = ['--no-session-limits', '--backoff-min', '100', '--backoff-max', '500', '--log-level', 'info'];

// ------------------------------------------------------------------------------------------
// the device script and the counting

function seqScript(dir, { every = 5, pad = 0 } = {}) {
  const sender = seqSender(dir, { every, pad, saveAfterCommit: true });
  return { text: `\nlocal tb = require "tb"\n${sender.lua}`, ...sender };
}

async function waitSeqs(server, k, n, what = `${k} telemetry messages`) {
  const deadline = Date.now() + n;
  while (seqsOf(server.messages).length < k) {
    if (Date.now() > deadline) throw new Error(`timed out after ${n} ms waiting for ${what}`);
    await delay(50);
  }
}

// finish(t, name, agent, server, script, extra): stop the script, wait for delivery, shut the
// agent down cleanly (exit 0; a sanitizer build reports leaks here), print and check figures.
async function finish(t, name, agent, server, script, extra = {}, proxy = null) {
  const mark = agent.mark();
  const last = await stopSeqs(agent, script);
  const r = await waitDelivered(server, last, ms(20000));
  agent.signal('SIGTERM');
  const { code } = await agent.waitExit(15000);
  const stats = agent.log.find(/stopped: \d+ sent, \d+ acknowledged, \d+ dropped/, mark);
  const pub = stats ? /stopped: (\d+) sent/.exec(stats.line)[1] : '?';
  const fig = `FIGURES ${name}: sent=${last} received=${r.received} lost=${r.lost} duplicated=${r.duplicated} ` +
    `out_of_order=${r.outOfOrder} publishes_last_run=${pub}` +
    Object.entries(extra).map(([k, v]) => ` ${k}=${v}`).join('');
  t.diagnostic(fig);
  console.log(fig);
  assert.equal(r.lost, 0, `${r.lost} of ${last} seqs never arrived: ${r.missing.slice(0, 20).join(',')}${r.lost > 20 ? ',...' : ''}` +
    (proxy ? `\n  on the wire: ${proxy.blame(r.missing)}` : ''));
  assert.equal(r.outOfOrder, 0, `${r.outOfOrder} seqs arrived for the first time after a later one`);
  assert.equal(r.extra, 0, 'seqs above the last one the script sent');
  assert.equal(code, 0, `tbagent did not shut down cleanly:\n${agent.log.tail(20)}`);
  return { last, ...r };
}

const rand = (a, b) => a + Math.random() * (b - a);

// ------------------------------------------------------------------------------------------

test('broker restarts (4x SIGTERM + restart on the same port) under steady QoS 1 telemetry: every seq arrives, in order', async (t) => {
  const w = world(t);
  const broker = await w.broker({ persistence: true });
  let server = await w.server(broker, { persistent: true });
  // the agent talks to the broker through the tapping proxy (always forwarding): when a seq
  // goes missing, the wire says who lost it
  const proxy = await startProxy(broker.port);
  t.after(() => proxy.close());
  const dir = tmpdir('tbfault-restart-');
  const script = seqScript(dir);
  const agent = await w.agent(script.text, { dir, port: proxy.port, args: BASE_ARGS });
  await waitSeqs(server, 50, ms(8000), 'telemetry to flow');
  const RESTARTS = 4;
  const downs = [];
  for (let k = 0; k < RESTARTS; k++) {
    await delay(ms(rand(600, 1400)));
    const mark = agent.mark();
    const before = script.accepted();
    await broker.stop('SIGTERM');
    const t0 = Date.now();
    await agent.waitForLog(/connection lost/, 5000, mark);
    await delay(ms(rand(300, 1000)));
    await broker.start();
    downs.push(Date.now() - t0);
    server = await w.reconnectServer(server, broker);
    await agent.waitForLog(/connected to/, 8000, mark);
    // the script kept sending while the broker was away (the outbox took it)
    assert.ok(script.accepted() > before, 'the script must keep sending while offline');
  }
  await delay(ms(800));
  const r = await finish(t, 'broker-restarts', agent, server, script,
    { restarts: RESTARTS, down_ms: downs.join('/') }, proxy);
  assert.ok(r.last >= 300, `too few messages to mean anything: ${r.last}`);
});

test('agent crash: kill -9 three times at random moments under load, restart with the same --state-dir: every accepted seq arrives, in order', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const dir = tmpdir('tbfault-crash-');
  const script = seqScript(dir);
  const file = path.join(dir, 'device.lua');
  fs.writeFileSync(file, script.text);
  const opts = { dir, broker, args: BASE_ARGS };
  let agent = await w.agent(file, opts);
  await waitSeqs(server, 50, ms(8000), 'telemetry to flow');
  const accepted = [];
  let announced = 0;
  for (let k = 0; k < 3; k++) {
    await delay(ms(rand(500, 2000)));
    agent.signal('SIGKILL');
    const { signal } = await agent.waitExit(5000);
    assert.equal(signal, 'SIGKILL');
    accepted.push(script.accepted());
    agent = await w.agent(file, { ...opts, name: `tbagent#${k + 2}` });
    const kept = await agent.waitForLog(/outbox: \d+ records kept|SEQ starting after/, 8000);
    const m = /\((\d+) were in flight/.exec(kept);
    if (m) announced += Number(m[1]);
    await agent.waitForLog(/connected to/, 8000);
  }
  await delay(ms(800));
  const r = await finish(t, 'agent-crash', agent, server, script,
    { kills: 3, accepted_at_kills: accepted.join('/'), announced_possible_duplicates: announced });
  // every seq accepted before each kill is within 1..last (the counter only grows)
  for (const a of accepted) assert.ok(a <= r.last);
});

test('agent crash right after the sending handler returned (the script kill -9s its own agent): every accepted record arrives after the restart', async (t) => {
  // The random kills above rarely land in the few microseconds between a handler's sends and
  // the next thing the agent does; here the script itself kills the agent at that moment:
  // one handler sends five records, the next one (tb.after(0)) kills. The outbox commits what
  // a handler sent when it yields or ends, before publishing it. With --max-inflight 1 the
  // first record goes on the wire (its "sent" mark opens the next batch) and four wait.
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const dir = tmpdir('tbfault-selfkill-');
  const counter = path.join(dir, 'accepted');
  const file = path.join(dir, 'device.lua');
  fs.writeFileSync(file, `
local tb = require "tb"
local COUNTER = ${JSON.stringify(counter)}
local f = io.open(COUNTER, "r")
local done = f ~= nil
if f then f:close() end
tb.on_connect(function()
  if done then return end
  tb.after(300, function()
    for i = 1, 5 do assert(tb.send_telemetry{seq = i}) end
    local out = assert(io.open(COUNTER, "w")); out:write("5"); out:close()
    tb.after(0, function()
      local st = assert(io.open("/proc/self/stat", "r")); local pid = st:read("a"):match("^(%d+)"); st:close()
      os.execute("kill -9 " .. pid)
    end)
  end)
end)
`);
  const opts = { dir, broker, args: [...BASE_ARGS, '--max-inflight', '1'] };
  const first = await w.agent(file, opts);
  const { signal } = await first.waitExit(8000);
  assert.equal(signal, 'SIGKILL');
  assert.equal(fs.readFileSync(counter, 'utf8'), '5', 'the script saw five sends accepted');
  const second = await w.agent(file, { ...opts, name: 'tbagent#2' });
  await second.waitForLog(/connected to/, 8000);
  let r = await waitDelivered(server, 5, ms(5000));
  await delay(ms(500));   // let a replay of what was kept arrive too (duplicates are counted)
  r = tally(seqsOf(server.messages), 5);
  const kept = second.log.find(/outbox: \d+ records kept.*/);
  const fig = `FIGURES self-kill: sent=5 received=${r.received} lost=${r.lost} duplicated=${r.duplicated} ` +
    `kept_line=${JSON.stringify(kept ? kept.line.replace(/^\S+ /, '') : 'none')}`;
  t.diagnostic(fig);
  console.log(fig);
  if (process.env.ITEST_VERBOSE) console.log(server.messages.filter((m) => m.topic === T).map((m) => `${m.at} ${m.text}`).join('\n'));
  assert.equal(r.lost, 0, `accepted before the kill, never delivered: seq ${r.missing.join(',')} ` +
    `(send_telemetry returned true and its handler ended, but the record was not committed)`);
  assert.equal(r.outOfOrder, 0);
});

// A loopback TCP proxy between the agent and the broker. pause() stops forwarding in both
// directions without closing anything (a cable pulled, a NAT that forgot the flow); resume()
// forwards again, and the connections that lived through the outage are reset (as after a
// real network loss, their bytes in flight are gone). It also taps the MQTT stream: for every
// seq it records whether the agent published it and whether the broker acknowledged it, so a
// loss can be blamed on the agent (never published / acknowledged and forgotten) or on the
// broker (acknowledged, never delivered).
async function startProxy(targetPort) {
  let paused = false;
  const pairs = new Set();
  const tap = { published: new Set(), acked: new Set() };
  const parser = (onPacket) => {
    let buf = Buffer.alloc(0);
    return (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      for (;;) {
        if (buf.length < 2) return;
        let i = 1, mult = 1, len = 0, b;
        do { if (i >= buf.length) return; b = buf[i++]; len += (b & 127) * mult; mult *= 128; } while (b & 128);
        if (buf.length < i + len) return;
        try { onPacket(buf[0], buf.subarray(i, i + len)); } catch { /* not ours to judge */ }
        buf = buf.subarray(i + len);
      }
    };
  };
  const srv = net.createServer((c) => {
    const pair = { c, up: null, stale: paused };
    pairs.add(pair);
    const pid2seq = new Map();
    const fromAgent = parser((h, body) => {
      if (h >> 4 !== 3) return;
      const qos = (h >> 1) & 3;
      const tl = body.readUInt16BE(0);
      const topic = body.subarray(2, 2 + tl).toString();
      let j = 2 + tl, pid = 0;
      if (qos) { pid = body.readUInt16BE(j); j += 2; }
      if (topic !== T) return;
      const seqs = seqsOf([{ topic, json: JSON.parse(body.subarray(j).toString()) }]);
      for (const s of seqs) tap.published.add(s);
      if (qos) pid2seq.set(pid, seqs);
    });
    const fromBroker = parser((h, body) => {
      if (h >> 4 !== 4) return;
      const seqs = pid2seq.get(body.readUInt16BE(0));
      if (seqs) for (const s of seqs) tap.acked.add(s);
    });
    c.on('error', () => {});
    const drop = () => { pairs.delete(pair); c.destroy(); if (pair.up) pair.up.destroy(); };
    c.on('close', drop);
    const connectUp = () => {
      const up = net.connect({ host: '127.0.0.1', port: targetPort });
      pair.up = up;
      up.on('error', () => {});
      up.on('close', drop);
      c.on('data', (d) => { if (!paused) { fromAgent(d); up.write(d); } });
      up.on('data', (d) => { if (!paused) { fromBroker(d); c.write(d); } });
    };
    if (paused) pair.connectUp = connectUp; else connectUp();
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  return {
    port: srv.address().port,
    tap,
    // blame(missing) -> text: what the wire saw of each missing seq
    blame(missing) {
      const never = missing.filter((s) => !tap.published.has(s));
      const unacked = missing.filter((s) => tap.published.has(s) && !tap.acked.has(s));
      const acked = missing.filter((s) => tap.acked.has(s));
      return `never published by the agent: [${never.slice(0, 20)}]; published, never acknowledged: [${unacked.slice(0, 20)}]; ` +
        `acknowledged by the broker yet never delivered: [${acked.slice(0, 20)}]`;
    },
    pause() {
      paused = true;
      for (const p of pairs) p.stale = true;
    },
    resume() {
      paused = false;
      for (const p of [...pairs]) if (p.stale) { p.c.destroy(); if (p.up) p.up.destroy(); pairs.delete(p); }
    },
    close() {
      for (const p of pairs) { p.c.destroy(); if (p.up) p.up.destroy(); }
      return new Promise((r) => srv.close(() => r()));
    },
  };
}

test('network loss without a clean close (proxy stops forwarding), --keepalive 5: noticed within keepalive x1.5, reconnects, nothing lost', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const proxy = await startProxy(broker.port);
  t.after(() => proxy.close());
  const dir = tmpdir('tbfault-netloss-');
  const script = seqScript(dir);
  const KEEPALIVE = 5;
  const agent = await w.agent(script.text, { dir, port: proxy.port, args: [...BASE_ARGS, '--keepalive', String(KEEPALIVE)] });
  await waitSeqs(server, 50, ms(8000), 'telemetry to flow');
  await delay(ms(500));
  const mark = agent.mark();
  proxy.pause();
  const t0 = Date.now();
  let noticed = null;
  try {
    await agent.waitForLog(/connection lost/, 15000, mark);
    noticed = Date.now() - t0;
  } catch { /* reported below */ }
  // stay down a little longer: reconnect attempts meet the dead network too
  await delay(ms(1000));
  proxy.resume();
  const downMs = Date.now() - t0;
  await agent.waitForLog(/connected to/, 10000, mark);
  await delay(ms(800));
  const r = await finish(t, 'network-loss', agent, server, script,
    { keepalive_s: KEEPALIVE, noticed_ms: noticed ?? 'never', outage_ms: downMs }, proxy);
  void r;
  assert.ok(noticed !== null, 'the agent never noticed the dead connection');
  // the keepalive check ticks once a second or so: allow one tick (detection time is set by
  // timers, not CPU speed, so a sanitizer build gets only half a second more)
  const bound = KEEPALIVE * 1500 + 1000 + (SLOW ? 500 : 0);
  assert.ok(noticed <= bound,
    `the dead connection was noticed after ${noticed} ms, more than keepalive x1.5 (+1 s) = ${bound} ms`);
});

test('unwritable --state-dir (a path under a regular file): a clear error line, the agent keeps running on memory, telemetry delivered through a broker restart', async (t) => {
  const w = world(t);
  const broker = await w.broker({ persistence: true });
  let server = await w.server(broker, { persistent: true });
  const dir = tmpdir('tbfault-unwritable-');
  const blocker = path.join(dir, 'not-a-dir');
  fs.writeFileSync(blocker, 'a regular file\n');
  const stateDir = path.join(blocker, 'state');
  const script = seqScript(dir);
  const agent = await w.agent(script.text, { dir, broker, args: [...BASE_ARGS, '--state-dir', stateDir] });
  const err = await agent.waitForLog(/ERROR .*state dir/i, 5000);
  assert.ok(err.includes(blocker), `the error line must name the path: ${err}`);
  await waitSeqs(server, 50, ms(8000), 'telemetry to flow');
  const mark = agent.mark();
  await broker.stop('SIGTERM');
  await agent.waitForLog(/connection lost/, 5000, mark);
  await delay(ms(700));
  await broker.start();
  server = await w.reconnectServer(server, broker);
  await agent.waitForLog(/connected to/, 8000, mark);
  await delay(ms(500));
  await finish(t, 'unwritable-state-dir', agent, server, script, { error: JSON.stringify(err.replace(/^\S+ /, '')) });
});

function tryMountTmpfs(where, size) {
  try {
    fs.mkdirSync(where, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tbfault', where], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

test('disk full (state dir on a 256 KiB tmpfs; SQLite\'s WAL fills it at once): a clear error line, the agent keeps running on memory through a broker restart, nothing lost', async (t) => {
  const dir = tmpdir('tbfault-diskfull-');
  const mnt = path.join(dir, 'small');
  if (!tryMountTmpfs(mnt, '256k')) {
    t.skip('cannot mount a tmpfs here (needs root); the unwritable-state-dir test covers the memory fallback');
    return;
  }
  const w = world(t);
  t.after(() => { try { execFileSync('umount', ['-l', mnt], { stdio: 'ignore' }); } catch { /* gone */ } });
  const broker = await w.broker({ persistence: true });
  let server = await w.server(broker, { persistent: true });
  const script = seqScript(dir, { pad: 400 });
  const agent = await w.agent(script.text, { dir, broker, args: [...BASE_ARGS, '--state-dir', path.join(mnt, 'state')] });
  // ~90 KiB/s of records into 256 KiB: the disk fills within a few seconds
  const err = await agent.waitForLog(/ERROR .*(outbox|disk|full)/i, 15000);
  await waitSeqs(server, 50, ms(8000), 'telemetry to flow');
  const mark = agent.mark();
  await broker.stop('SIGTERM');
  await agent.waitForLog(/connection lost/, 5000, mark);
  await delay(ms(1000));
  assert.ok(agent.running(), 'the agent must keep running when the disk is full');
  await broker.start();
  server = await w.reconnectServer(server, broker);
  await agent.waitForLog(/connected to/, 8000, mark);
  await delay(ms(500));
  const df = execFileSync('df', ['-k', mnt], { encoding: 'utf8' }).trim().split('\n').pop();
  await finish(t, 'disk-full', agent, server, script, { error: JSON.stringify(err.replace(/^\S+ /, '')), df: JSON.stringify(df) });
});

test('--keepalive below 5 (libmosquitto refuses it): refused at start with a clear message, or it connects', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  await w.server(broker);
  const agent = await w.agent('local tb = require "tb"\n', { broker, args: [...BASE_ARGS, '--keepalive', '2'] });
  const outcome = await Promise.race([
    agent.exited.then(({ code }) => ({ code })),
    // waitForLog gives up as soon as the agent exits: then the exit code is the outcome
    agent.waitForLog(/connected to/, 3000).then(() => ({ connected: true }),
      () => withTimeout(agent.exited, 1000, 'the agent to exit').then(({ code }) => ({ code }))),
  ]).catch(() => ({ neither: true }));
  if (outcome.code !== undefined) {
    assert.equal(outcome.code, 2, `exit ${outcome.code}`);
    assert.match(agent.log.text(), /tbagent: .*keepalive/);
  } else {
    assert.ok(outcome.connected,
      `with --keepalive 2 the agent neither refused the option nor connected; it retries forever:\n${agent.log.tail(6)}`);
  }
});

test('a healthy idle link is not taken for dead: --keepalive 5, 13 s without traffic, no reconnect', async (t) => {
  const { server, agent } = await world(t).device('local tb = require "tb"\ntb.on_rpc("ping", function() return "pong" end)\n',
    { args: ['--keepalive', '5', '--log-level', 'debug'] });
  const mark = agent.mark();
  await delay(13000);
  assert.equal(agent.log.find(/connection lost|link is dead/, mark), null, 'the idle link was dropped');
  assert.equal((await server.rpc('ping')).text, '"pong"');
});
