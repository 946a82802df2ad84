// Issue 16: tbagent as a service, through the real binary (TBAGENT: build/tbagent, or the one
// of the Debian package that scripts/check-package extracts):
//  1. the notify protocol against a fake NOTIFY_SOCKET (a Python AF_UNIX datagram socket, a
//     path and an abstract "@" name): READY=1 only once the script loaded (none for a script
//     that fails), WATCHDOG=1 at half of WATCHDOG_USEC (none when WATCHDOG_PID names another
//     process), STATUS= lines as the connection comes and goes, STOPPING=1 on SIGTERM;
//  2. log lines for the journal when JOURNAL_STREAM names stderr (no timestamp, "<N>" syslog
//     priority on every line of a record), unchanged when it names another file;
//  3. `tbagent status` against a running agent: connected (0), offline with the reason (1),
//     not running after kill -9 and after a clean stop (3), no status file (3), --json, and
//     no secret in the status file;
//  4. the thermostat example (TB_EXAMPLES, default examples/) against tbemu, with status.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { startEmu } from '../tbemu/test/helpers.mjs';
import { world, runAgent, tmpdir, delay, ms, REPO, TBAGENT } from './lib.mjs';

const EXAMPLES = process.env.TB_EXAMPLES || path.join(REPO, 'examples');
const IDLE = 'local tb = require "tb"\ntb.every(200, function() tb.send_telemetry{x = 1} end)\n';

// waitUntil(fn, n, what): polls fn (may be async) until truthy; bounded (n is scaled)
async function waitUntil(fn, n, what) {
  const deadline = Date.now() + ms(n);
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms(n)} ms waiting for ${what}`);
    await delay(50);
  }
}

// A notify socket: every datagram as {at (ms), text}
const LISTENER = `
import json, socket, sys, time
name = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\\0" + name[1:] if name.startswith("@") else name)
print(json.dumps({"ready": True}), flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps({"at": time.monotonic() * 1000, "text": data.decode()}), flush=True)
`;

async function notifySocket(t, name) {
  const proc = spawn('python3', ['-c', LISTENER, name], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => proc.kill('SIGKILL'));
  const got = [];
  const lines = readline.createInterface({ input: proc.stdout });
  const ready = new Promise((resolve) => lines.on('line', (l) => {
    const m = JSON.parse(l);
    if (m.ready) resolve(); else got.push(m);
  }));
  await ready;
  return { name, got, texts: () => got.map((m) => m.text) };
}

test('notify: READY=1 after the script loaded, STATUS= as the connection changes, WATCHDOG=1 at half WATCHDOG_USEC, STOPPING=1 on SIGTERM', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const dir = tmpdir('tbitest-notify-');
  const sock = await notifySocket(t, path.join(dir, 'notify.sock'));
  const agent = await w.agent(IDLE, { broker, env: { NOTIFY_SOCKET: sock.name, WATCHDOG_USEC: '400000' } });
  await waitUntil(() => sock.texts().some((x) => x.startsWith('READY=1')), 5000, 'READY=1');
  const ready = sock.texts().find((x) => x.startsWith('READY=1'));
  assert.match(ready, /^READY=1\nSTATUS=\S/);
  assert.ok(agent.log.find(/running .*generation 1/), 'READY=1 comes after the script is loaded');
  await waitUntil(() => sock.texts().some((x) => /^STATUS=connected to 127\.0\.0\.1:\d+; backlog \d+, in flight \d+$/.test(x)), 5000, 'STATUS=connected');
  // the watchdog: every 200 ms (half of 400 ms) from the loop
  const before = sock.got.length;
  const from = Date.now();
  await delay(ms(2000));
  const recent = sock.got.slice(before).filter((m) => m.text === 'WATCHDOG=1');
  const expected = (Date.now() - from) / 200;
  assert.ok(recent.length >= expected * 0.6 && recent.length <= expected * 1.4,
    `${recent.length} WATCHDOG=1 in ${Date.now() - from} ms at 200 ms`);
  const gaps = recent.slice(1).map((m, i) => m.at - recent[i].at).sort((a, b) => a - b);
  const median = gaps[Math.floor(gaps.length / 2)];
  assert.ok(median > 150 && median < ms(300), `median gap ${median} ms`);
  await broker.stop();
  await waitUntil(() => sock.texts().some((x) => /^STATUS=(offline|connecting): .+; backlog/.test(x)), 5000, 'STATUS=offline with a reason');
  agent.signal('SIGTERM');
  const { code } = await agent.waitExit(5000);
  assert.equal(code, 0);
  await waitUntil(() => sock.texts().includes('STOPPING=1'), 2000, 'STOPPING=1');
});

test('notify: an abstract @ socket; no WATCHDOG=1 when WATCHDOG_PID names another process', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const sock = await notifySocket(t, `@tbitest-notify-${process.pid}-${Date.now()}`);
  const agent = await w.agent(IDLE, { broker, env: { NOTIFY_SOCKET: sock.name, WATCHDOG_USEC: '200000', WATCHDOG_PID: '1' } });
  await waitUntil(() => sock.texts().some((x) => x.startsWith('READY=1')), 5000, 'READY=1 on the abstract socket');
  await delay(ms(600));
  assert.ok(!sock.texts().includes('WATCHDOG=1'), sock.texts().join(' | '));
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit(5000)).code, 0);
});

test('notify: no READY=1 from a script that fails to load (exit 1)', async (t) => {
  const dir = tmpdir('tbitest-notify-');
  const sock = await notifySocket(t, path.join(dir, 'notify.sock'));
  const file = path.join(dir, 'bad.lua');
  fs.writeFileSync(file, 'local tb = require "tb"\nerror("broken at load")\n');
  const r = await runAgent(['run', file, '--token', 'x', '--port', '1', '--state-dir', path.join(dir, 'state')],
    { env: { NOTIFY_SOCKET: sock.name } });
  assert.equal(r.code, 1, r.stderr);
  await delay(ms(200));
  assert.ok(!sock.texts().some((x) => x.includes('READY=1')), sock.texts().join(' | '));
});

// runWithStderrFile(args, env(dev, ino)) -> the lines the agent wrote to stderr (a file)
async function journalRun(script, journalStream) {
  const dir = tmpdir('tbitest-journal-');
  const file = path.join(dir, 'device.lua');
  fs.writeFileSync(file, script);
  const errPath = path.join(dir, 'stderr');
  const fd = fs.openSync(errPath, 'w');
  const st = fs.fstatSync(fd, { bigint: true });
  const env = { ...process.env, JOURNAL_STREAM: journalStream(st) };
  for (const k of Object.keys(env)) if (k.startsWith('TB_')) delete env[k];
  const proc = spawn(TBAGENT, ['run', file, '--token', 'secret-token-1', '--port', '1', '--no-reload',
    '--state-dir', path.join(dir, 'state')], { stdio: ['ignore', 'ignore', fd], env });
  fs.closeSync(fd);
  const exited = new Promise((resolve) => proc.on('close', (code) => resolve(code)));
  await waitUntil(() => fs.readFileSync(errPath, 'utf8').includes('TIMER FAILED'), 5000, 'the timer error');
  proc.kill('SIGTERM');
  assert.equal(await exited, 0);
  return fs.readFileSync(errPath, 'utf8').split('\n').filter((l) => l !== '');
}

const NOISY = `local tb = require "tb"
tb.log.warn("a warning")
tb.log.error("an error")
tb.after(100, function() tb.log.info("TIMER FAILED next"); error("boom") end)
`;

test('journal: JOURNAL_STREAM naming stderr gives "<N>LEVEL message" lines, no timestamp, the priority on every line', async () => {
  const lines = await journalRun(NOISY, (st) => `${st.dev}:${st.ino}`);
  assert.ok(lines.length > 3, lines.join('\n'));
  for (const l of lines) assert.match(l, /^<[3467]>/, `line without a priority: ${l}`);
  for (const l of lines) assert.doesNotMatch(l, /\d{4}-\d\d-\d\dT\d\d:\d\d/, `own timestamp: ${l}`);
  assert.ok(lines.includes('<4>WARN a warning'), lines.join('\n'));
  assert.ok(lines.includes('<3>ERROR an error'), lines.join('\n'));
  assert.ok(lines.some((l) => /^<6>INFO tbagent \S+ running /.test(l)), lines.join('\n'));
  // the handler error's traceback continues the record at the same priority
  const i = lines.findIndex((l) => /^<3>ERROR .*boom/.test(l));
  assert.ok(i >= 0 && lines[i + 1].startsWith('<3>  '), lines.slice(i, i + 3).join('\n'));
  assert.ok(!lines.some((l) => l.includes('secret-token-1')));
});

test('journal: the last line of a failed start is an error too (journalctl -p err shows it)', async () => {
  const dir = tmpdir('tbitest-journal-');
  const errPath = path.join(dir, 'stderr');
  const fd = fs.openSync(errPath, 'w');
  const st = fs.fstatSync(fd, { bigint: true });
  const proc = spawn(TBAGENT, ['run', path.join(dir, 'missing.lua'), '--token', 'x', '--state-dir', path.join(dir, 'state')],
    { stdio: ['ignore', 'ignore', fd], env: { ...process.env, JOURNAL_STREAM: `${st.dev}:${st.ino}` } });
  fs.closeSync(fd);
  const code = await new Promise((resolve) => proc.on('close', resolve));
  assert.equal(code, 1);
  const lines = fs.readFileSync(errPath, 'utf8').split('\n').filter((l) => l !== '');
  assert.match(lines[lines.length - 1], /^<3>tbagent: cannot load .*missing\.lua/);
});

test('journal: JOURNAL_STREAM naming another file leaves the terminal format', async () => {
  const lines = await journalRun(NOISY, (st) => `${st.dev}:${st.ino + 1n}`);
  assert.ok(lines.some((l) => /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARN a warning$/.test(l)), lines.join('\n'));
  assert.ok(!lines.some((l) => l.startsWith('<')), lines.join('\n'));
});

async function status(stateDir, ...extra) {
  const r = await runAgent(['status', '--state-dir', stateDir, ...extra]);
  return { ...r, json: extra.includes('--json') && r.stdout ? JSON.parse(r.stdout) : undefined };
}

test('tbagent status: connected (0), offline with the reason (1), not running after kill -9 (3), no secret in the file', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const agent = await w.agent(IDLE, { broker, token: 'status-secret-token' });
  const stateDir = path.join(agent.dir, 'state');
  await agent.waitForLog(/connected to/, 5000);
  const on = await waitUntil(async () => { const r = await status(stateDir); return r.code === 0 && r; }, 5000, 'status exit 0');
  assert.match(on.stdout, /^tbagent \S+ on .*: connected since \S+ \(\d+s\)\n/);
  assert.match(on.stdout, new RegExp(`\\n  pid +${agent.pid}, up `));
  assert.match(on.stdout, new RegExp(`\\n  server +127\\.0\\.0\\.1:${broker.port}\\n`));
  assert.match(on.stdout, /\n  credentials +access token\n/);
  assert.match(on.stdout, /\n  script +\S+device\.lua, generation 1 /);
  const j = (await status(stateDir, '--json')).json;
  assert.equal(j.pid, agent.pid);
  assert.equal(j.state, 'connected');
  assert.equal(j.running, true);
  assert.equal(j.connected, true);
  assert.equal(j.credentials, 'access token');
  assert.equal(j.script.generation, 1);
  assert.ok(Number.isInteger(j.messages.sent) && j.uptime_s >= 0);
  // offline: the broker goes away; the file follows within a second or two
  await broker.stop();
  const off = await waitUntil(async () => { const r = await status(stateDir); return r.code === 1 && r; }, 5000, 'status exit 1');
  assert.match(off.stdout, /: (offline|connecting) since \S+ \(\d+s\): .+\n/);
  const jo = (await status(stateDir, '--json')).json;
  assert.equal(jo.connected, false);
  assert.ok(jo.reason, JSON.stringify(jo));
  assert.ok(!fs.readFileSync(path.join(stateDir, 'status.json'), 'utf8').includes('status-secret-token'));
  // kill -9: the file stays, the pid is gone
  agent.signal('SIGKILL');
  await agent.waitExit(5000);
  const dead = await status(stateDir);
  assert.equal(dead.code, 3, dead.stdout + dead.stderr);
  assert.match(dead.stdout, new RegExp(`: not running \\(pid ${agent.pid} is gone; `));
  const jd = (await status(stateDir, '--json')).json;
  assert.equal(jd.running, false);
  assert.equal(jd.state, 'not running');
});

test('tbagent status: a clean stop (3, "stopped"), no status file (3), and bad usage (2)', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const agent = await w.agent(IDLE, { broker });
  const stateDir = path.join(agent.dir, 'state');
  await agent.waitForLog(/connected to/, 5000);
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit(5000)).code, 0);
  const r = await status(stateDir);
  assert.equal(r.code, 3);
  assert.match(r.stdout, /: not running \(stopped \S+, exit status 0\)/);
  const none = await status(path.join(agent.dir, 'nowhere'));
  assert.equal(none.code, 3);
  assert.match(none.stderr, /^tbagent: no .*nowhere\/status\.json: no agent has run with this state directory\n$/);
  const bad = await runAgent(['status', '--token', 'x']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--token is not an option of tbagent status/);
});

test('the thermostat example against tbemu: telemetry arrives, tbagent status says connected', async (t) => {
  const emu = await startEmu(['--device', 'thermostat:thermostat-token', '--quiet'], { timeoutMs: ms(10000) });
  t.after(() => emu.stop());
  const w = world(t);
  const dir = tmpdir('tbitest-thermo-');
  const script = path.join(dir, 'thermostat.lua');
  fs.copyFileSync(path.join(EXAMPLES, 'thermostat.lua'), script);
  const agent = await w.agent(script, { port: emu.mqttPort, token: 'thermostat-token', dir });
  const id = await emu.deviceId('thermostat');
  await waitUntil(async () => {
    const body = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=temperature`);
    return body && body.temperature && body.temperature.length > 0;
  }, 15000, 'the thermostat telemetry in tbemu');
  const r = await status(path.join(dir, 'state'));
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, new RegExp(`\\n  server +127\\.0\\.0\\.1:${emu.mqttPort}\\n`));
  assert.match(r.stdout, /\n  firmware +\S+ \d\S*\n/);   // the example's current version
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit(5000)).code, 0);
});
