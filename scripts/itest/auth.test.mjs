// Item 2: access token, MQTT basic credentials, TLS against --cafile, X.509 client
// certificates, CONNACK refusals told apart, and secrets kept out of every log line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { world, makeCerts, tmpdir, delay, ms, tele } from './lib.mjs';

const SCRIPT = `
local tb = require "tb"
tb.on_rpc("ping", function() return "pong" end)
tb.on_connect(function() tb.send_telemetry({hello = 1}) end)
tb.on_attributes(function(c) tb.log.info("attributes %s", tb.json.encode(c)) end)
`;
const TOKEN = 'tok-A1b2C3d4E5f6';
const ACL = `user server\ntopic readwrite #\n\nuser ${TOKEN}\ntopic readwrite v1/devices/me/#\n`;

let certs;
function getCerts() {
  if (!certs) certs = makeCerts(tmpdir('tbitest-certs-'));
  return certs;
}

test('the access token is the MQTT user name: CONNECT carries it, no password', async (t) => {
  const w = world(t);
  const fake = await w.fake(0);
  await w.agent(SCRIPT, { port: fake.port, token: TOKEN });
  const [c] = await fake.waitConnects(1);
  assert.equal(c.username, TOKEN);
  assert.equal(c.password, undefined);
  assert.equal(c.level, 4, 'MQTT 3.1.1');
});

test('access token: a broker that admits only that user name gets the telemetry', async (t) => {
  const w = world(t);
  const broker = await w.broker({ acl: ACL });
  const server = await w.server(broker, { username: 'server' });
  // control: a wrong token gets nothing through this ACL
  const wrong = await w.agent(SCRIPT, { broker, token: 'not-the-token', name: 'wrong' });
  await wrong.waitForLog(/connected to/, 5000);
  await w.agent(SCRIPT, { broker, token: TOKEN });
  const m = await server.waitFor('v1/devices/me/telemetry', () => true, 8000);
  assert.equal(tele(m), '{"hello":1}');
  await delay(ms(300));
  assert.equal(server.all('v1/devices/me/telemetry').length, 1, 'the wrong token must not publish');
});

test('CONNACK 5: exit 3 with "not authorized", and the token is never printed', async (t) => {
  const w = world(t);
  const broker = await w.broker({ passwords: { server: 'server-pass' } });
  const agent = await w.agent(SCRIPT, { broker, token: TOKEN, args: ['--log-level', 'debug'] });
  const { code } = await agent.waitExit(10000);
  assert.equal(code, 3, agent.log.text());
  const last = agent.log.lines.filter((l) => l.trim()).at(-1);
  assert.match(last, /^tbagent: .*not authori[sz]ed/i);
  assert.ok(!agent.log.text().includes(TOKEN), `the token leaked:\n${agent.log.text()}`);
});

for (const [rc, re, fatal] of [[2, /identifier rejected/i, true], [4, /bad user name or password/i, true], [3, /server unavailable/i, false]]) {
  test(`CONNACK ${rc} is told apart: ${re}${fatal ? ', exit 3' : ', retried'}`, async (t) => {
    const w = world(t);
    const fake = await w.fake(rc);
    const agent = await w.agent(SCRIPT, { port: fake.port, token: TOKEN, args: ['--backoff-min', '100', '--backoff-max', '200'] });
    if (fatal) {
      const { code } = await agent.waitExit(10000);
      assert.equal(code, 3, agent.log.text());
      assert.match(agent.log.lines.filter((l) => l.trim()).at(-1), re);
    } else {
      await agent.waitForLog(re, 5000);
      await fake.waitConnects(2, 5000);   // it retries
      assert.ok(agent.running());
    }
    assert.ok(!agent.log.text().includes(TOKEN));
  });
}

test('MQTT basic credentials (client id, user name, password) are accepted', async (t) => {
  const w = world(t);
  const PASS = 'pw-Zq9!Secret';
  const broker = await w.broker({ passwords: { server: 'server-pass', dev1: PASS } });
  const server = await w.server(broker, { username: 'server', password: 'server-pass' });
  const agent = await w.agentReady(SCRIPT, {
    broker, auth: false, args: ['--client-id', 'dev-client-7', '--username', 'dev1', '--password', PASS],
  });
  const m = await server.waitFor('v1/devices/me/telemetry', () => true, 5000);
  assert.equal(tele(m), '{"hello":1}');
  assert.ok(broker.log.find(/as dev-client-7 .*u'dev1'/), `client id not used:\n${broker.log.text()}`);
  assert.equal((await server.rpc('ping')).text, '"pong"');
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit(8000)).code, 0);
  assert.ok(!agent.log.text().includes(PASS), `the password leaked at debug level:\n${agent.log.text()}`);
});

test('wrong password: exit 3, password not printed', async (t) => {
  const w = world(t);
  const PASS = 'wrong-Pass-123';
  const broker = await w.broker({ passwords: { dev1: 'right' } });
  const agent = await w.agent(SCRIPT, {
    broker, auth: false, args: ['--username', 'dev1', '--password', PASS, '--log-level', 'debug'],
  });
  const { code } = await agent.waitExit(10000);
  assert.equal(code, 3, agent.log.text());
  assert.ok(!agent.log.text().includes(PASS), agent.log.text());
});

test('credentials refused after a working session: 5 refusals in a row, then exit 3', async (t) => {
  const w = world(t);
  const broker = await w.broker({ passwords: { dev1: 'right' } });
  const agent = await w.agent(SCRIPT, {
    broker, auth: false, args: ['--username', 'dev1', '--password', 'right', '--no-session-limits'],
  });
  await agent.waitForLog(/connected to/, 8000);
  // the password changes on the server (a restart with a new password file)
  execFileSync('mosquitto_passwd', ['-b', path.join(broker.dir, 'passwd'), 'dev1', 'changed'], { stdio: 'ignore' });
  await broker.stop();
  await broker.start();
  const { code } = await agent.waitExit(20000);
  assert.equal(code, 3, agent.log.text());
  assert.equal(agent.log.count(/ERROR ThingsBoard refused the connection: CONNACK [45]/), 4, agent.log.text());
  assert.match(agent.log.lines.filter((l) => l.trim()).at(-1), /CONNACK [45], .*\(5 times in a row\)/);
});

test('the token never reaches a log line at debug level during a whole session', async (t) => {
  const { server, agent } = await world(t).device(`${SCRIPT}
tb.on_rpc("leak", function() tb.log.debug("debug line"); return tb.request_attributes{shared = {"x"}} end)
`, { token: TOKEN, brokerOpts: { acl: ACL }, serverOpts: { username: 'server' } });
  await server.rpc('leak');
  await server.pushAttributes({ x: 1 });
  await agent.waitForLog(/attributes \{"x":1\}/, 3000);
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit(8000)).code, 0);
  assert.ok(agent.log.count(/DEBUG/) > 3);
  assert.ok(!agent.log.text().includes(TOKEN), `the token leaked:\n${agent.log.text()}`);
});

// tlsWorld(t, opts) -> {w, c, broker, server}: a broker with a TLS listener for the shared
// certificates c (opts: more broker options) and a server-role client on it
async function tlsWorld(t, opts = {}) {
  const w = world(t);
  const c = getCerts();
  const broker = await w.broker({ tls: c, ...opts });
  const server = await w.server(broker);
  return { w, c, broker, server };
}

test('TLS: verified against --cafile, with a token', async (t) => {
  const { w, c, broker, server } = await tlsWorld(t);
  await w.agentReady(SCRIPT, { port: broker.tlsPort, token: TOKEN, args: ['--cafile', c.ca] });
  const m = await server.waitFor('v1/devices/me/telemetry', () => true, 5000);
  assert.equal(tele(m), '{"hello":1}');
  assert.equal((await server.rpc('ping')).text, '"pong"');
});

test('TLS: a server certificate from another CA is refused with a clear log line', async (t) => {
  const { w, c, broker, server } = await tlsWorld(t);
  const agent = await w.agent(SCRIPT, { port: broker.tlsPort, token: TOKEN, args: ['--cafile', c.otherCa, '--backoff-min', '200', '--backoff-max', '400'] });
  // every attempt fails at once with a clear line and is retried with backoff: three of
  // them within a few seconds (not one silent attempt that waits for the 30 s CONNACK timeout)
  const re = / (WARN|ERROR) .*(certificate|TLS|SSL|verif)/i;
  let from = 0;
  for (let k = 1; k <= 3; k++) {
    await agent.waitForLog(re, 6000, from).catch((e) => { throw new Error(`TLS failure #${k} not reported: ${e.message}`); });
    from = agent.log.find(re, from).index + 1;
  }
  await delay(ms(500));
  assert.equal(server.all('v1/devices/me/telemetry').length, 0);
  assert.equal(agent.log.count(/connected to/), 0, agent.log.text());
  assert.ok(!broker.log.find(/New client connected .*tok-/), 'no MQTT session must start');
});

// Right CA, wrong name: the broker's certificate is signed by the very CA the agent trusts
// (--cafile) but names "other.example", not the host the agent dials. Chain verification alone
// would accept it; the host name check (libmosquitto does it unless tls_insecure is set) must
// refuse it. The control is the same broker setup with a certificate from that CA naming the host.
for (const host of ['127.0.0.1', 'localhost']) {
  test(`TLS: a certificate from the trusted CA naming another host is refused (--host ${host})`, async (t) => {
    const w = world(t);
    const c = getCerts();
    const other = makeCerts(tmpdir('tbitest-certs-'), { ca: c, serverName: 'other.example' });
    // the fixture is what the test claims: a valid server certificate from the trusted CA,
    // for other.example and not for the host dialled
    const verify = (...a) => execFileSync('openssl', ['verify', '-CAfile', c.ca, '-purpose', 'sslserver', ...a, other.serverCert],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    verify('-verify_hostname', 'other.example');
    assert.throws(() => verify(...(host === 'localhost' ? ['-verify_hostname', host] : ['-verify_ip', host])), 'the name must not match');
    const broker = await w.broker({ tls: other });
    const server = await w.server(broker);
    const agent = await w.agent(SCRIPT, {
      port: broker.tlsPort, token: TOKEN,
      args: ['--host', host, '--cafile', c.ca, '--backoff-min', '200', '--backoff-max', '400'],
    });
    // each attempt fails at once with a WARN naming TLS and is retried: three within seconds
    const re = / (WARN|ERROR) .*(connection to|cannot connect to) .*TLS error: host name verification failed/;
    let from = 0;
    for (let k = 1; k <= 3; k++) {
      await agent.waitForLog(re, 6000, from).catch((e) => { throw new Error(`TLS failure #${k} not reported: ${e.message}\n${agent.log.text()}`); });
      from = agent.log.find(re, from).index + 1;
    }
    await delay(ms(500));
    assert.ok(agent.running(), 'a refused certificate is retried, not fatal');
    assert.equal(server.all('v1/devices/me/telemetry').length, 0, 'no telemetry may reach the broker');
    assert.equal(agent.log.count(/connected to/), 0, agent.log.text());
    // the agent aborts the handshake itself (an alert), so no MQTT CONNECT (with the token) is sent
    assert.ok(broker.log.find(/OpenSSL Error.*alert/), `the agent did not abort the handshake:\n${broker.log.text()}`);
    assert.ok(!broker.log.text().includes(TOKEN), `an MQTT session with the token started:\n${broker.log.text()}`);
  });

  test(`TLS: control — a certificate from the same CA naming ${host} connects (--host ${host})`, async (t) => {
    const w = world(t);
    const c = getCerts();
    const named = makeCerts(tmpdir('tbitest-certs-'), { ca: c, serverName: host });
    const broker = await w.broker({ tls: named });
    const server = await w.server(broker);
    const agent = await w.agentReady(SCRIPT, { port: broker.tlsPort, token: TOKEN, args: ['--host', host, '--cafile', c.ca] });
    const m = await server.waitFor('v1/devices/me/telemetry', () => true, 5000);
    assert.equal(tele(m), '{"hello":1}');
    assert.equal((await server.rpc('ping')).text, '"pong"');
    assert.equal(agent.log.count(/ (WARN|ERROR) /), 0, agent.log.text());
  });
}

test('X.509 client certificate with a token alongside', async (t) => {
  const { w, c, broker, server } = await tlsWorld(t, { requireCert: true });
  await w.agentReady(SCRIPT, { port: broker.tlsPort, token: TOKEN, args: ['--cafile', c.ca, '--cert', c.clientCert, '--key', c.clientKey] });
  await server.waitFor('v1/devices/me/telemetry', () => true, 5000);
  assert.ok(broker.log.find(new RegExp(`u'${c.clientCn}'`)), broker.log.text());
});

// ThingsBoard ignores user name and password when the device presents a certificate, so a
// certificate alone must be enough credentials.
test('X.509 client certificate alone (no token) authenticates the device', async (t) => {
  const { w, c, broker, server } = await tlsWorld(t, { requireCert: true });
  const agent = await w.agent(SCRIPT, { port: broker.tlsPort, auth: false, args: ['--cafile', c.ca, '--cert', c.clientCert, '--key', c.clientKey] });
  await Promise.race([
    server.waitFor('v1/devices/me/telemetry', () => true, 8000),
    agent.exited.then(({ code }) => { throw new Error(`tbagent exited ${code}: ${agent.log.text()}`); }),
  ]);
  assert.ok(broker.log.find(new RegExp(`u'${c.clientCn}'`)), broker.log.text());
});

test('X.509: a broker requiring a certificate refuses a device without one', async (t) => {
  const { w, c, broker, server } = await tlsWorld(t, { requireCert: true });
  const agent = await w.agent(SCRIPT, { port: broker.tlsPort, token: TOKEN, args: ['--cafile', c.ca] });
  await agent.waitForLog(/ (WARN|ERROR) .*(connection .*failed|cannot connect|TLS|lost)/i, 5000);
  assert.equal(server.all('v1/devices/me/telemetry').length, 0);
});
