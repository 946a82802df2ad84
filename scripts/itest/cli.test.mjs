// Item 1: the command line, environment variables and exit codes of the contract.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runAgent, tmpdir, writeScript, world, freePort, tele } from './lib.mjs';

const GOOD = `
local tb = require "tb"
tb.on_rpc("ping", function() return "pong" end)
tb.every(1000, function() end)
tb.on_connect(function() tb.send_telemetry({booted = true}) end)
`;

function oneLine(stderr) {
  const lines = stderr.split('\n').filter((l) => l.trim() !== '');
  assert.equal(lines.length, 1, `expected exactly one line on stderr, got:\n${stderr}`);
  assert.match(lines[0], /^tbagent: /);
  return lines[0];
}

test('--help prints usage with every contract option and exits 0', async () => {
  const r = await runAgent(['--help']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /tbagent run SCRIPT\.lua/);
  assert.match(r.stdout, /tbagent check SCRIPT\.lua/);
  assert.match(r.stdout, /tbagent test \[SPEC\|DIR \.\.\.\]/);
  assert.match(r.stdout, /tbagent init DIR/);
  for (const o of ['--host', '--port', '--token', '--client-id', '--username', '--password', '--cafile',
    '--cert', '--key', '--state-dir', '--log-level', '--no-reload']) {
    assert.ok(r.stdout.includes(o), `--help does not mention ${o}`);
  }
  for (const e of ['TB_HOST', 'TB_PORT', 'TB_TOKEN', 'TB_CLIENT_ID', 'TB_USERNAME', 'TB_PASSWORD', 'TB_CAFILE',
    'TB_CERT', 'TB_KEY', 'TB_STATE_DIR', 'TB_LOG_LEVEL']) {
    assert.ok(r.stdout.includes(e), `--help does not mention ${e}`);
  }
  // reconnect backoff defaults of issue 2 item 7: 1 s doubling to 60 s
  assert.match(r.stdout, /--backoff-min[^\n]*\[1000\]/);
  assert.match(r.stdout, /--backoff-max[^\n]*\[60000\]/);
  assert.equal(r.stderr, '');
});

test('--version prints the version and exits 0', async () => {
  const r = await runAgent(['--version']);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^tbagent \d+\.\d+\.\d+/);
});

test('bad usage exits 2 with one clear line', async (t) => {
  const dir = tmpdir();
  const script = writeScript(dir, GOOD);
  const cases = [
    { args: [], re: /command/ },
    { args: ['run'], re: /SCRIPT/ },
    { args: ['frobnicate', script], re: /frobnicate/ },
    { args: ['run', script, '--token', 't', '--bogus'], re: /--bogus/ },
    { args: ['run', script, '--token', 't', '--port', '0'], re: /--port/ },
    { args: ['run', script, '--token', 't', '--port', 'abc'], re: /--port/ },
    { args: ['run', script, '--token', 't', '--port', '70000'], re: /--port/ },
    { args: ['run', script, '--token', 't', '--port'], re: /--port/ },
    { args: ['run', script, '--token', 't', '--log-level', 'loud'], re: /--log-level/ },
    { args: ['run', script, '--token', 't', '--qos', '2'], re: /--qos/ },
    { args: ['run', script], re: /credentials|token/ },
    { args: ['run', script, '--token', 't', '--username', 'u'], re: /token/ },
    { args: ['run', script, '--token', 't', '--cafile', `${dir}/nonexistent.pem`], re: /--cafile/ },
    { args: ['run', script, '--token', 't'], env: { TB_PORT: 'nope' }, re: /TB_PORT/ },
  ];
  for (const c of cases) {
    await t.test(c.args.join(' ') + (c.env ? ` ${JSON.stringify(c.env)}` : ''), async () => {
      const r = await runAgent(c.args, { env: c.env });
      assert.equal(r.code, 2, `exit ${r.code}; stderr: ${r.stderr}`);
      assert.match(oneLine(r.stderr), c.re);
    });
  }
});

test('a script file that does not exist: exit 1, one line naming it', async () => {
  const dir = tmpdir();
  const r = await runAgent(['run', `${dir}/missing.lua`, '--token', 't', '--port', String(await freePort())]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(oneLine(r.stderr), /missing\.lua/);
});

// scripts that fail on line 3 as they load
for (const [name, text] of [
  ['a script with a syntax error: exit 1 with file:line', 'local tb = require "tb"\n\nlocal x = = 3\n'],
  ['a script that raises at load: exit 1 with file:line', 'local tb = require "tb"\nlocal t = nil\nprint(t.field)\n'],
]) {
  test(name, async () => {
    const script = writeScript(tmpdir(), text);
    const r = await runAgent(['run', script, '--token', 't', '--port', String(await freePort())]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(oneLine(r.stderr), /device\.lua:3:/);
  });
}

test('check: good script exits 0, bad scripts exit 1 with file:line', async () => {
  const dir = tmpdir();
  const good = writeScript(dir, GOOD, 'good.lua');
  let r = await runAgent(['check', good]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /ok/);
  assert.match(r.stdout, /ping/);
  const bad = writeScript(dir, 'local tb = require "tb"\ntb.on_rpc("x", function()\n', 'bad.lua');
  r = await runAgent(['check', bad]);
  assert.equal(r.code, 1);
  assert.match(oneLine(r.stderr), /bad\.lua:\d+:/);
  const raises = writeScript(dir, 'local tb = require "tb"\ntb.every("soon", print)\n', 'raises.lua');
  r = await runAgent(['check', raises]);
  assert.equal(r.code, 1);
  assert.match(oneLine(r.stderr), /raises\.lua:2:/);
  // every problem, not only the first: a handler of the wrong type, a yielding call at top
  // level, a bad timer, then the error that stops the load
  const multi = writeScript(dir, 'local tb = require "tb"\ntb.on_rpc("x", 42)\ntb.sleep(10)\n' +
    'tb.every("soon", print)\ntb.on_attributes(function() end)\nlocal t = nil\nprint(t.x)\n', 'multi.lua');
  r = await runAgent(['check', multi]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /multi\.lua:2: bad argument #2 to 'on_rpc' \(function expected, got number\)$/m);
  assert.match(r.stderr, /multi\.lua:3: tb\.sleep yields and cannot be called at a script's top level/m);
  assert.match(r.stderr, /multi\.lua:4: bad argument #1 to 'every'/m);
  assert.match(r.stderr, /multi\.lua:7: attempt to index a nil value/m);
  assert.match(r.stderr, /4 problems found/);
  r = await runAgent(['check', `${dir}/nope.lua`]);
  assert.equal(r.code, 1);
  assert.match(oneLine(r.stderr), /nope\.lua/);
});

// A broker whose ACL lets only the user "env-token" reach the device topics: telemetry gets
// through only when the agent sent that token as its MQTT user name.
const ACL = 'user server\ntopic readwrite #\n\nuser env-token\ntopic readwrite v1/devices/me/#\n';

// The broker listens on 127.0.0.2 only, so the agent reaches it only through TB_HOST / --host
// (the default, localhost, is 127.0.0.1).
test('environment variables configure the agent (TB_HOST, TB_PORT, TB_TOKEN, TB_LOG_LEVEL)', async (t) => {
  const w = world(t);
  const broker = await w.broker({ acl: ACL, host: '127.0.0.2' });
  const server = await w.server(broker, { username: 'server' });
  const agent = await w.agent(GOOD, {
    auth: false,
    env: { TB_PORT: String(broker.port), TB_TOKEN: 'env-token', TB_LOG_LEVEL: 'debug', TB_HOST: '127.0.0.2' },
  });
  await server.waitFor('v1/devices/me/telemetry', (m) => tele(m) === '{"booted":true}', 8000);
  await agent.waitForLog(/ DEBUG /, 3000);
});

test('the command line wins over environment variables', async (t) => {
  const w = world(t);
  const broker = await w.broker({ acl: ACL, host: '127.0.0.2' });
  const server = await w.server(broker, { username: 'server' });
  const agent = await w.agent(GOOD, {
    broker, token: 'env-token', args: ['--log-level', 'warn', '--host', '127.0.0.2'],
    env: { TB_PORT: String(await freePort()), TB_TOKEN: 'wrong-token', TB_LOG_LEVEL: 'debug', TB_HOST: '127.0.0.1' },
  });
  await server.waitFor('v1/devices/me/telemetry', (m) => tele(m) === '{"booted":true}', 8000);
  assert.equal(agent.log.count(/ (DEBUG|INFO) /), 0, `--log-level warn should win over TB_LOG_LEVEL=debug:\n${agent.log.text()}`);
});

// The script itself logs the password, raw and inside JSON text (where '"' and '\' are
// escaped): every form is masked, with MQTT basic credentials (no token) too.
test('the password is masked in every log line, also as JSON text escapes it', async (t) => {
  const w = world(t);
  const PASS = 'pw"with\\quote';
  const broker = await w.broker({ passwords: { server: 'server-pass', dev1: PASS } });
  const server = await w.server(broker, { username: 'server', password: 'server-pass' });
  const agent = await w.agentReady(`
local tb = require "tb"
tb.on_connect(function()
  tb.log.info("RAW %s", os.getenv("PW"))
  tb.log.info("JSON %s", tb.json.encode({p = os.getenv("PW")}))
  tb.send_telemetry({logged = true})
end)
`, { broker, auth: false, env: { PW: PASS }, args: ['--client-id', 'dev-mask', '--username', 'dev1', '--password', PASS] });
  await server.waitFor('v1/devices/me/telemetry', () => true, 5000);
  await agent.waitForLog(/JSON /, 3000);
  const text = agent.log.text();
  assert.match(agent.log.find(/RAW /).line, /RAW \*\*\*$/);
  assert.match(agent.log.find(/JSON /).line, /JSON \{"p":"\*\*\*"\}$/);
  assert.ok(!text.includes(PASS) && !text.includes('pw\\"with\\\\quote'), `the password leaked:\n${text}`);
});
