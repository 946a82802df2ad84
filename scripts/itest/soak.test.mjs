// Soak (issue 6): steady QoS 1 telemetry (a strictly increasing seq every 5 ms), a server-side
// RPC every second, and a few broker restarts, for SOAK_SECONDS (75 s by default; `scripts/soak
// 30` runs 30 minutes). The agent's VmRSS and open file descriptors are sampled from /proc
// every few seconds. Asserts: nothing lost, first arrivals in order, every RPC sent while the
// session was up answered, RSS growth after warm-up < 1 MiB, fd count back where it started.
// Prints one SOAK summary line (sent/received/lost/duplicated, RSS and fds start/end).
//
// The broker runs with persistence, is restarted with SIGTERM, and the subscriber keeps a
// persistent session (see faults.test.mjs for why). Under a sanitizer build RSS is reported
// but not bounded (ASan's quarantine holds freed memory on purpose); LeakSanitizer checks the
// clean shutdown at the end instead.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { world, delay, ms, SCALE, tmpdir, seqSender, stopSeqs, waitDelivered } from './lib.mjs';

const SLOW = SCALE > 1;
const SECONDS = Number(process.env.SOAK_SECONDS || 75);
const LONG = SECONDS > 300;
const SAMPLE_MS = LONG ? 10000 : 2000;
const WARMUP_MS = Math.min(20000, SECONDS * 1000 / 4);
const RESTART_EVERY_MS = process.env.SOAK_RESTART_EVERY ? Number(process.env.SOAK_RESTART_EVERY) * 1000
  : Math.max(20000, Math.min(300000, SECONDS * 1000 / 4));

function soakScript(dir) {
  const sender = seqSender(dir);
  const text = `
local tb = require "tb"
${sender.lua}tb.on_rpc("ping", function(p) return {pong = p, seq = seq} end)
`;
  return { text, ...sender };
}

function sample(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const rss = Number(/VmRSS:\s+(\d+) kB/.exec(status)[1]);
  const fds = fs.readdirSync(`/proc/${pid}/fd`).length;
  return { rss, fds };
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

test(`soak: ${SECONDS} s of telemetry every 5 ms, an RPC a second and a broker restart every ${Math.round(RESTART_EVERY_MS / 1000)} s: nothing lost, memory and fds flat`,
  { timeout: SECONDS * 1000 + ms(120000) }, async (t) => {
    const w = world(t);
    const broker = await w.broker({ persistence: true });
    let server = await w.server(broker, { persistent: true });
    const dir = tmpdir('tbsoak-');
    const script = soakScript(dir);
    const agent = await w.agent(script.text, {
      dir, broker, args: ['--no-session-limits', '--backoff-min', '100', '--backoff-max', '500', '--log-level', 'info'],
    });
    await agent.waitForLog(/connected to/, 8000);
    // the RPC subscription comes last, after CONNACK: the session is up once a ping is answered
    const untilAnswered = async (what) => {
      const deadline = Date.now() + ms(15000);
      for (;;) {
        const r = await server.rpc('ping', 0, { timeout: 1000 }).catch(() => null);
        if (r && r.json && r.json.pong === 0) return;
        if (Date.now() > deadline) throw new Error(`no RPC answered within 15 s ${what}`);
      }
    };
    await untilAnswered('after the first connect');
    const t0 = Date.now();
    const end = t0 + SECONDS * 1000;
    let up = true;             // the session is up and stable (no restart under way)
    let rpcBusy = Promise.resolve();
    const rpc = { sent: 0, ok: 0, failed: [] };
    const samples = [];
    let restarts = 0;

    const rpcLoop = (async () => {
      while (Date.now() < end) {
        if (up) {
          const n = ++rpc.sent;
          const p = server.rpc('ping', n, { timeout: 5000 }).then((r) => {
            if (r.json && r.json.pong === n) rpc.ok++; else rpc.failed.push(`#${n}: ${r.text}`);
          }, (e) => { rpc.failed.push(`#${n}: ${e.message.split('\n')[0]}`); });
          rpcBusy = p;
          await p;
        }
        await delay(1000);
      }
    })();
    const sampleLoop = (async () => {
      while (Date.now() < end) {
        const s = sample(agent.pid);
        samples.push({ at: Date.now() - t0, up, ...s });
        await delay(SAMPLE_MS);
      }
    })();
    let nextRestart = t0 + RESTART_EVERY_MS;
    while (Date.now() < end - 10000) {
      if (Date.now() < nextRestart) { await delay(Math.min(500, nextRestart - Date.now())); continue; }
      nextRestart += RESTART_EVERY_MS;
      up = false;
      await rpcBusy;
      const mark = agent.mark();
      await broker.stop('SIGTERM');
      await agent.waitForLog(/connection lost/, 5000, mark);
      await delay(ms(500 + Math.random() * 1000));
      await broker.start();
      server = await w.reconnectServer(server, broker);
      await agent.waitForLog(/connected to/, 8000, mark);
      await untilAnswered('after a broker restart');
      restarts++;
      up = true;
    }
    await Promise.all([rpcLoop, sampleLoop]);

    const last = await stopSeqs(agent, script);
    const r = await waitDelivered(server, last, ms(20000), 200);
    await delay(ms(500));
    const final = sample(agent.pid);
    agent.signal('SIGTERM');
    const { code } = await agent.waitExit(15000);

    const steady = samples.filter((s) => s.at >= WARMUP_MS && s.up);
    const first = steady.slice(0, 3);
    const lastS = [...steady.slice(-2), { ...final, up: true }];
    const rssStart = median(first.map((s) => s.rss));
    const rssEnd = median(lastS.map((s) => s.rss));
    const rssMax = Math.max(...samples.map((s) => s.rss), final.rss);
    // the script opens a file now and then (its counter, the stop flag): take the lowest of a few
    const fdStart = Math.min(...(first.length ? first : samples.slice(0, 3)).map((s) => s.fds));
    const fdEnd = Math.min(...lastS.map((s) => s.fds));
    const fdMax = Math.max(...samples.map((s) => s.fds), final.fds);
    const summary = `SOAK ${SECONDS} s: sent=${last} received=${r.received} lost=${r.lost} duplicated=${r.duplicated} ` +
      `out_of_order=${r.outOfOrder} rpcs=${rpc.ok}/${rpc.sent} broker_restarts=${restarts} ` +
      `rss_kib start=${rssStart} end=${rssEnd} growth=${rssEnd - rssStart} max=${rssMax} ` +
      `fds start=${fdStart} end=${fdEnd} max=${fdMax} samples=${samples.length}${SLOW ? ' (sanitizer build: RSS not bounded)' : ''}`;
    t.diagnostic(summary);
    console.log(summary);
    if (process.env.SOAK_SAMPLES) {
      fs.writeFileSync(process.env.SOAK_SAMPLES, samples.map((s) => `${s.at}\t${s.rss}\t${s.fds}\t${s.up ? 1 : 0}`).join('\n') + '\n');
    }

    assert.equal(r.lost, 0, `${r.lost} of ${last} seqs never arrived: ${r.missing.slice(0, 20).join(',')}`);
    assert.equal(r.outOfOrder, 0, `${r.outOfOrder} seqs arrived for the first time after a later one`);
    assert.ok(last >= SECONDS * 50, `the script sent only ${last} messages in ${SECONDS} s`);
    assert.equal(rpc.failed.length, 0, `every RPC sent while the session was up must be answered: ${rpc.failed.join('; ')}`);
    assert.ok(restarts >= 2, `only ${restarts} broker restarts`);
    assert.ok(steady.length >= 3, 'too few samples after warm-up');
    if (!SLOW) assert.ok(rssEnd - rssStart < 1024, `RSS grew by ${rssEnd - rssStart} KiB after warm-up (${rssStart} -> ${rssEnd} KiB)`);
    assert.equal(fdEnd, fdStart, `open file descriptors went from ${fdStart} to ${fdEnd}`);
    assert.equal(code, 0, `tbagent did not shut down cleanly:\n${agent.log.tail(20)}`);
  });
