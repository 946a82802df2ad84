// Integration-test helpers: a real mosquitto broker on a free loopback port, the real tbagent
// binary, and a server-role MQTT client that plays ThingsBoard on plain mosquitto.
//
// Every wait is bounded (and scaled up for sanitizer builds); every process is started by us
// and killed by its PID in teardown. Nothing sleeps blindly.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '..', '..');
const require = createRequire(path.join(REPO, 'scripts', 'package.json'));
const mqtt = require('mqtt');

export const TBAGENT = path.resolve(REPO, process.env.TBAGENT || 'build/tbagent');
export const MOSQUITTO = process.env.MOSQUITTO || '/usr/sbin/mosquitto';

// Sanitizer builds (and TB_ITEST_SLOW=1) run several times slower: scale every timeout.
function detectScale() {
  if (process.env.ITEST_SCALE) return Number(process.env.ITEST_SCALE);
  if (process.env.TB_ITEST_SLOW && process.env.TB_ITEST_SLOW !== '0') return 3;
  try {
    const buf = fs.readFileSync(TBAGENT);
    if (buf.includes('__asan_init') || buf.includes('__ubsan_handle')) return 3;
  } catch { /* missing binary: the tests say so */ }
  return 1;
}
export const SCALE = detectScale();
export const ms = (n) => Math.round(n * SCALE);

export const TELEMETRY = 'v1/devices/me/telemetry';

const children = new Set();
function track(child) {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}
process.on('exit', () => {
  for (const c of children) { try { process.kill(c.pid, 'SIGKILL'); } catch { /* gone */ } }
});

export function delay(n) {
  return new Promise((r) => setTimeout(r, n));
}

// withTimeout(promise, ms, what) -> rejects with a clear message when the time is up.
export function withTimeout(p, n, what) {
  let timer;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`timed out after ${n} ms waiting for ${what}`)), n); }),
  ]);
}

export function tmpdir(prefix = 'tbitest-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function tcpReady(port, deadline, host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = net.connect({ host, port });
      s.once('connect', () => { s.destroy(); resolve(); });
      s.once('error', () => {
        s.destroy();
        if (Date.now() > deadline) reject(new Error(`nothing listens on ${host}:${port}`));
        else setTimeout(attempt, 20);
      });
    };
    attempt();
  });
}

// Line collector over a child's stream, with waitFor(regex, ms, from).
class Lines {
  constructor(name) {
    this.name = name;
    this.lines = [];
    this.waiters = new Set();
    this.partial = '';
  }
  feed(chunk) {
    this.partial += chunk.toString('utf8');
    let i;
    while ((i = this.partial.indexOf('\n')) >= 0) {
      const line = this.partial.slice(0, i);
      this.partial = this.partial.slice(i + 1);
      this.lines.push(line);
      if (process.env.ITEST_VERBOSE) process.stderr.write(`[${this.name}] ${line}\n`);
      for (const w of [...this.waiters]) w();
    }
  }
  end() {
    if (this.partial) { this.lines.push(this.partial); this.partial = ''; }
    this.ended = true;
    for (const w of [...this.waiters]) w();
  }
  mark() { return this.lines.length; }
  text() { return this.lines.join('\n'); }
  find(re, from = 0) {
    for (let i = from; i < this.lines.length; i++) if (re.test(this.lines[i])) return { line: this.lines[i], index: i };
    return null;
  }
  count(re, from = 0) {
    return this.lines.slice(from).filter((l) => re.test(l)).length;
  }
  // waitFor(re, ms, from) -> the first line at index >= from matching re
  waitFor(re, n = 5000, from = 0) {
    n = ms(n);
    return new Promise((resolve, reject) => {
      const check = () => {
        const hit = this.find(re, from);
        if (hit) { done(); resolve(hit.line); return true; }
        if (this.ended) { done(); reject(new Error(`${this.name} ended before a line matching ${re}; log:\n${this.tail()}`)); return true; }
        return false;
      };
      const timer = setTimeout(() => { done(); reject(new Error(`no line matching ${re} from ${this.name} within ${n} ms; log:\n${this.tail()}`)); }, n);
      const done = () => { clearTimeout(timer); this.waiters.delete(check); };
      if (!check()) this.waiters.add(check);
    });
  }
  tail(k = 40) { return this.lines.slice(-k).join('\n'); }
}

// ------------------------------------------------------------------------------------------
// certificates

// makeCerts(dir, opts) -> paths of a CA, a server certificate for 127.0.0.1/localhost, a client
// certificate, and an unrelated second CA (for "wrong CA" tests). Generated at test time.
//   opts.serverName = 'other.example' | ['other.example', '10.1.2.3']
//                            the names the server certificate carries instead: CN = the first,
//                            subjectAltName = all of them (IP: for an address, else DNS:)
//   opts.ca = certs          sign with the CA of an earlier makeCerts result (same ca/otherCa
//                            files) instead of making new ones, for "right CA, wrong name" tests
export function makeCerts(dir, opts = {}) {
  const p = (f) => path.join(dir, f);
  const ossl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ca = (name) => {
    ossl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${name}`,
      '-keyout', p(`${name}.key`), '-out', p(`${name}.crt`));
  };
  let caCrt = p('ca.crt'), caKey = p('ca.key'), otherCa = p('otherca.crt');
  if (opts.ca) {
    ({ ca: caCrt, caKey, otherCa } = opts.ca);
  } else {
    ca('ca');
    ca('otherca');
  }
  let serverCn = 'localhost', serverSan = 'IP:127.0.0.1,DNS:localhost';
  if (opts.serverName) {
    const names = [].concat(opts.serverName);
    serverCn = names[0];
    serverSan = names.map((n) => (net.isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  }
  fs.writeFileSync(p('server.ext'), `subjectAltName=${serverSan}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n`);
  fs.writeFileSync(p('client.ext'), 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n');
  for (const [name, cn] of [['server', serverCn], ['client', 'tb-device-1']]) {
    ossl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${cn}`, '-keyout', p(`${name}.key`), '-out', p(`${name}.csr`));
    // the serial file stays in dir (a new one starts at a random serial), even with opts.ca
    ossl('x509', '-req', '-in', p(`${name}.csr`), '-CA', caCrt, '-CAkey', caKey, '-CAserial', p('ca.srl'),
      '-CAcreateserial', '-days', '2', '-extfile', p(`${name}.ext`), '-out', p(`${name}.crt`));
  }
  return {
    ca: caCrt, caKey, otherCa, serverCert: p('server.crt'), serverKey: p('server.key'),
    serverCn, serverSan, clientCert: p('client.crt'), clientKey: p('client.key'), clientCn: 'tb-device-1',
  };
}

// ------------------------------------------------------------------------------------------
// the broker

// startBroker(opts) -> broker {port, tlsPort, stop(), restart(), log}
//   opts.passwords = {user: pass}     password_file, allow_anonymous false
//   opts.acl = "text of an acl_file"
//   opts.tls = certs from makeCerts   adds a TLS listener (tlsPort); opts.requireCert adds
//                                     require_certificate + use_identity_as_username
//   opts.persistence = true           keeps sessions across restart() (SIGTERM saves them)
//   opts.verbose = true               log_type all (SUBSCRIBE/PUBLISH lines in broker.log)
//   opts.host = '127.0.0.2'           the loopback address it listens on (default 127.0.0.1)
export async function startBroker(opts = {}) {
  const dir = opts.dir || tmpdir('tbitest-mq-');
  const port = opts.port || await freePort();
  const tlsPort = opts.tls ? (opts.tlsPort || await freePort()) : undefined;
  const conf = [
    'per_listener_settings false',
    // started as root, mosquitto would switch to the "mosquitto" user and lose our 0700 temp dir
    ...(process.getuid && process.getuid() === 0 ? ['user root'] : []),
    `allow_anonymous ${opts.passwords ? 'false' : 'true'}`,
    'log_dest stderr',
    ...(opts.verbose ? ['log_type all'] : ['log_type error', 'log_type warning', 'log_type notice', 'log_type information']),
    'connection_messages true',
    'max_inflight_messages 0',
    'max_queued_messages 100000',
    `persistence ${opts.persistence ? 'true' : 'false'}`,
    ...(opts.persistence ? [`persistence_location ${dir}/`] : []),
  ];
  if (opts.passwords) {
    const pw = path.join(dir, 'passwd');
    fs.writeFileSync(pw, '');
    for (const [u, p] of Object.entries(opts.passwords)) {
      execFileSync('mosquitto_passwd', ['-b', pw, u, p], { stdio: 'ignore' });
    }
    conf.push(`password_file ${pw}`);
  }
  if (opts.acl) {
    const acl = path.join(dir, 'acl');
    fs.writeFileSync(acl, opts.acl);
    conf.push(`acl_file ${acl}`);
  }
  const host = opts.host || '127.0.0.1';
  conf.push(`listener ${port} ${host}`);
  if (opts.tls) {
    conf.push(`listener ${tlsPort} 127.0.0.1`, `cafile ${opts.tls.ca}`, `certfile ${opts.tls.serverCert}`,
      `keyfile ${opts.tls.serverKey}`);
    if (opts.requireCert) conf.push('require_certificate true', 'use_identity_as_username true');
  }
  const confPath = path.join(dir, 'mosquitto.conf');
  fs.writeFileSync(confPath, conf.join('\n') + '\n');
  const broker = { host, port, tlsPort, dir, confPath, log: new Lines('mosquitto'), proc: null };
  broker.start = async () => {
    const proc = track(spawn(MOSQUITTO, ['-c', confPath], { stdio: ['ignore', 'pipe', 'pipe'] }));
    broker.proc = proc;
    proc.stdout.on('data', (d) => broker.log.feed(d));
    proc.stderr.on('data', (d) => broker.log.feed(d));
    broker.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + ms(5000);
    await Promise.race([
      (async () => {
        await tcpReady(port, deadline, host);
        if (tlsPort) await tcpReady(tlsPort, deadline);
      })(),
      broker.exited.then(({ code }) => { throw new Error(`mosquitto exited with ${code}:\n${broker.log.tail()}`); }),
    ]);
  };
  // stop(signal): stops the broker and waits for it to go (SIGTERM saves a persistent DB).
  broker.stop = async (signal = 'SIGTERM') => {
    const proc = broker.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    try { process.kill(proc.pid, signal); } catch { return; }
    try {
      await withTimeout(broker.exited, ms(5000), 'mosquitto to stop');
    } catch {
      try { process.kill(proc.pid, 'SIGKILL'); } catch { /* gone */ }
      await broker.exited;
    }
  };
  broker.restart = async () => {
    await broker.stop();
    await broker.start();
  };
  await broker.start();
  return broker;
}

// ------------------------------------------------------------------------------------------
// the agent

export function writeScript(dir, text, name = 'device.lua') {
  const file = path.join(dir, name);
  fs.writeFileSync(file, text);
  return file;
}

// runAgent(args, {env, timeout}) -> {code, signal, stdout, stderr} for short-lived commands.
export function runAgent(args, opts = {}) {
  return new Promise((resolve, reject) => {
    const proc = track(spawn(TBAGENT, args, { stdio: ['ignore', 'pipe', 'pipe'], env: cleanEnv(opts.env), cwd: opts.cwd }));
    let stdout = '', stderr = '';
    proc.stdout.on('data', (d) => { stdout += d; });
    proc.stderr.on('data', (d) => { stderr += d; });
    const n = ms(opts.timeout || 10000);
    const timer = setTimeout(() => {
      try { process.kill(proc.pid, 'SIGKILL'); } catch { /* gone */ }
      reject(new Error(`tbagent ${args.join(' ')} did not exit within ${n} ms; stderr:\n${stderr}`));
    }, n);
    proc.on('error', reject);
    proc.on('close', (code, signal) => { clearTimeout(timer); resolve({ code, signal, stdout, stderr }); });
  });
}

// The agent sees no TB_* variable from the environment the tests run in.
function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('TB_')) env[k] = v;
  return { ...env, ...extra };
}

// startAgent(script, {broker|port, args, env, token, auth:false, dir}) -> agent
//   script: Lua source text (written to a temp dir) or an existing path.
//   By default: --port broker.port --token test-token --no-reload, small backoff.
export async function startAgent(script, opts = {}) {
  const dir = opts.dir || tmpdir('tbitest-agent-');
  const file = script.includes('\n') || !fs.existsSync(script) ? writeScript(dir, script) : script;
  const args = ['run', file, '--no-reload', '--state-dir', path.join(dir, 'state')];
  if (opts.port || opts.broker) args.push('--port', String(opts.port || opts.broker.port));
  if (opts.auth !== false) args.push('--token', opts.token || 'test-token');
  if (!opts.args || !opts.args.some((a) => a.startsWith('--backoff'))) args.push('--backoff-min', '200', '--backoff-max', '1000');
  if (opts.args) args.push(...opts.args);
  const proc = track(spawn(TBAGENT, args, { stdio: ['ignore', 'pipe', 'pipe'], env: cleanEnv(opts.env), cwd: dir }));
  const agent = {
    proc, pid: proc.pid, args, dir, file,
    log: new Lines(opts.name || 'tbagent'),
    stdout: '',
  };
  proc.stderr.on('data', (d) => agent.log.feed(d));
  proc.stdout.on('data', (d) => { agent.stdout += d; });
  agent.exited = new Promise((resolve) => proc.on('close', (code, signal) => { agent.log.end(); resolve({ code, signal }); }));
  agent.waitForLog = (re, n, from) => agent.log.waitFor(re, n, from);
  agent.mark = () => agent.log.mark();
  agent.running = () => proc.exitCode === null && proc.signalCode === null;
  agent.signal = (sig) => { try { process.kill(proc.pid, sig); } catch { /* gone */ } };
  agent.waitExit = (n = 10000) => withTimeout(agent.exited, ms(n), `tbagent (pid ${proc.pid}) to exit; log:\n${agent.log.tail()}`);
  agent.stop = async () => {
    if (!agent.running()) return agent.exited;
    agent.signal('SIGKILL');
    return agent.exited;
  };
  return agent;
}

// ------------------------------------------------------------------------------------------
// the server-role client ("ThingsBoard" on plain mosquitto)

export const GENEROUS_LIMITS = { maxPayloadSize: 65536, maxInflightMessages: 100, rateLimits: { messages: null, telemetryMessages: null, telemetryDataPoints: null } };

// Lossless JSON: numbers keep their text. canon(text) re-serialises with sorted keys and the
// original number tokens, so two payloads compare exactly (42.0 != 42, 2^53+1 stays exact).
export function canon(text) {
  let i = 0;
  const s = text;
  const ws = () => { while (i < s.length && ' \t\n\r'.includes(s[i])) i++; };
  const val = () => {
    ws();
    const c = s[i];
    if (c === '{') {
      i++; ws();
      const entries = [];
      if (s[i] === '}') { i++; return '{}'; }
      for (;;) {
        ws();
        const k = str();
        ws(); if (s[i++] !== ':') throw new Error(`bad JSON at ${i}: ${s}`);
        entries.push([k, val()]);
        ws();
        if (s[i] === ',') { i++; continue; }
        if (s[i] === '}') { i++; break; }
        throw new Error(`bad JSON at ${i}: ${s}`);
      }
      entries.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
      return '{' + entries.map(([k, v]) => JSON.stringify(k) + ':' + v).join(',') + '}';
    }
    if (c === '[') {
      i++; ws();
      const items = [];
      if (s[i] === ']') { i++; return '[]'; }
      for (;;) {
        items.push(val()); ws();
        if (s[i] === ',') { i++; continue; }
        if (s[i] === ']') { i++; break; }
        throw new Error(`bad JSON at ${i}: ${s}`);
      }
      return '[' + items.join(',') + ']';
    }
    if (c === '"') return JSON.stringify(str());
    const m = /^(-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null)/.exec(s.slice(i));
    if (!m) throw new Error(`bad JSON at ${i}: ${s}`);
    i += m[0].length;
    return m[0];
  };
  const str = () => {
    const m = /^"(?:[^"\\\u0000-\u001f]|\\.)*"/.exec(s.slice(i));
    if (!m) throw new Error(`bad JSON string at ${i}: ${s}`);
    i += m[0].length;
    return JSON.parse(m[0]);
  };
  const out = val();
  ws();
  if (i !== s.length) throw new Error(`trailing text in JSON: ${s}`);
  return out;
}

class Server {
  constructor(client, opts) {
    this.client = client;
    this.messages = [];          // {topic, text, payload, at}
    this.waiters = new Set();
    this.sessionLimits = opts.sessionLimits === undefined ? GENEROUS_LIMITS : opts.sessionLimits;
    this.attributes = opts.attributes || { client: {}, shared: {} };
    this.autoAttributes = opts.autoAttributes !== false;
    this.nextRpcId = 0;
    client.on('message', (topic, payload) => this.onMessage(topic, payload));
  }
  onMessage(topic, payload) {
    const m = { topic, payload, text: payload.toString('utf8'), at: Date.now() };
    let json;
    try { json = JSON.parse(m.text); } catch { json = undefined; }
    m.json = json;
    this.messages.push(m);
    let r = /^v1\/devices\/me\/rpc\/request\/(\d+)$/.exec(topic);
    if (r && json && json.method === 'getSessionLimits' && this.sessionLimits) {
      this.publish(`v1/devices/me/rpc/response/${r[1]}`, JSON.stringify(this.sessionLimits));
    }
    r = /^v1\/devices\/me\/attributes\/request\/(\d+)$/.exec(topic);
    if (r && this.autoAttributes && json) {
      const pick = (scope, keys) => {
        const src = this.attributes[scope] || {};
        if (keys === undefined) return { ...src };
        const out = {};
        for (const k of String(keys).split(',')) if (k in src) out[k] = src[k];
        return out;
      };
      const all = json.clientKeys === undefined && json.sharedKeys === undefined;
      const res = {};
      const client = all || json.clientKeys !== undefined ? pick('client', all ? undefined : json.clientKeys) : {};
      const shared = all || json.sharedKeys !== undefined ? pick('shared', all ? undefined : json.sharedKeys) : {};
      if (Object.keys(client).length) res.client = client;
      if (Object.keys(shared).length) res.shared = shared;
      this.publish(`v1/devices/me/attributes/response/${r[1]}`, JSON.stringify(res));
    }
    for (const w of [...this.waiters]) w();
  }
  mark() { return this.messages.length; }
  // all(topic, from) -> the messages whose topic matches (a string or a regex)
  all(topic, from = 0) {
    const match = typeof topic === 'string' ? (t) => t === topic : (t) => topic.test(t);
    return this.messages.slice(from).filter((m) => match(m.topic));
  }
  // waitFor(topic, pred, ms, from) -> the first message at index >= from on topic with pred(m)
  waitFor(topic, pred = () => true, n = 5000, from = 0) {
    n = ms(n);
    const match = typeof topic === 'string' ? (t) => t === topic : (t) => topic.test(t);
    return new Promise((resolve, reject) => {
      const check = () => {
        for (let i = from; i < this.messages.length; i++) {
          const m = this.messages[i];
          if (match(m.topic) && pred(m)) { done(); resolve(m); return true; }
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no message on ${topic} within ${n} ms; seen:\n${this.messages.slice(-20).map((m) => `${m.topic} ${m.text.slice(0, 200)}`).join('\n')}`));
      }, n);
      const done = () => { clearTimeout(timer); this.waiters.delete(check); };
      if (!check()) this.waiters.add(check);
    });
  }
  // waitCount(topic, k, ms, from) -> the first k messages on topic
  waitCount(topic, k, n = 5000, from = 0) {
    n = ms(n);
    return new Promise((resolve, reject) => {
      const check = () => {
        const got = this.all(topic, from);
        if (got.length >= k) { done(); resolve(got.slice(0, k)); return true; }
        return false;
      };
      const timer = setTimeout(() => { done(); reject(new Error(`only ${this.all(topic, from).length} of ${k} messages on ${topic} within ${n} ms`)); }, n);
      const done = () => { clearTimeout(timer); this.waiters.delete(check); };
      if (!check()) this.waiters.add(check);
    });
  }
  // expectNone(topic, pred, ms, from): resolves when nothing matching arrives for ms.
  async expectNone(topic, pred = () => true, n = 500, from = 0) {
    await delay(ms(n));
    const bad = this.all(topic, from).filter(pred);
    if (bad.length) throw new Error(`unexpected message on ${bad[0].topic}: ${bad[0].text.slice(0, 200)}`);
  }
  publish(topic, payload, qos = 1) {
    const body = typeof payload === 'string' || Buffer.isBuffer(payload) ? payload : JSON.stringify(payload);
    return this.client.publishAsync(topic, body, { qos });
  }
  // rpc(method, params, {id, timeout, raw}) -> {id, text, json} of the device's response
  async rpc(method, params, opts = {}) {
    // ids start at 0 like ThingsBoard's; after 0 they jump far above the agent's own
    // client-side request ids (1, 2, ...), which share rpc/response/{id} on plain mosquitto
    const id = opts.id !== undefined ? opts.id : this.nextRpcId++;
    if (this.nextRpcId === 1) this.nextRpcId = 1000000;
    const from = this.mark();
    const body = opts.raw !== undefined ? opts.raw : JSON.stringify(params === undefined ? { method } : { method, params });
    await this.publish(`v1/devices/me/rpc/request/${id}`, body);
    const m = await this.waitFor(`v1/devices/me/rpc/response/${id}`, () => true, opts.timeout || 5000, from);
    return { id, text: m.text, json: m.json, at: m.at };
  }
  // pushAttributes(obj): a shared attribute update from "the server"
  pushAttributes(obj) {
    return this.publish('v1/devices/me/attributes', JSON.stringify(obj));
  }
  async close() {
    try { await withTimeout(this.client.endAsync(true), 2000, 'server client to close'); } catch { /* ignore */ }
  }
}

// connectServer(broker, opts) -> Server. MQTT 5 with no-local subscriptions, so the server
// never sees its own publishes on the shared v1/devices/me/... topics.
//   opts.persistent: a fixed client id with a kept session (survives a broker restart when
//   the broker has persistence).
export async function connectServer(broker, opts = {}) {
  const client = await withTimeout(mqtt.connectAsync({
    host: broker.host || '127.0.0.1', port: broker.port, protocolVersion: 5, reconnectPeriod: 0,
    clientId: opts.clientId || `tbserver-${process.pid}-${Math.random().toString(16).slice(2, 8)}`,
    clean: !opts.persistent,
    properties: opts.persistent ? { sessionExpiryInterval: 3600 } : undefined,
    username: opts.username, password: opts.password,
    connectTimeout: ms(5000),
  }), ms(6000), 'the server client to connect');
  const server = new Server(client, opts);
  await client.subscribeAsync({ 'v1/devices/me/#': { qos: 1, nl: true }, 'v2/#': { qos: 1, nl: true } });
  return server;
}

// reconnectServer(old, broker) -> a new Server on the same persistent session, keeping the
// messages seen so far.
export async function reconnectServer(old, broker, opts = {}) {
  await old.close();
  // the listener is in place before CONNACK: the broker sends what it queued for the
  // session right after it, before connectAsync's promise would resolve
  const client = mqtt.connect({
    host: broker.host || '127.0.0.1', port: broker.port, protocolVersion: 5, reconnectPeriod: 0,
    clientId: old.client.options.clientId, clean: false, properties: { sessionExpiryInterval: 3600 },
    connectTimeout: ms(5000),
  });
  const server = new Server(client, { sessionLimits: old.sessionLimits, attributes: old.attributes, autoAttributes: old.autoAttributes, ...opts });
  server.messages = old.messages;
  server.nextRpcId = old.nextRpcId;
  await withTimeout(new Promise((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
  }), ms(6000), 'the server client to reconnect');
  await client.subscribeAsync({ 'v1/devices/me/#': { qos: 1, nl: true }, 'v2/#': { qos: 1, nl: true } });
  return server;
}

// ------------------------------------------------------------------------------------------
// one test's world: teardown of everything it started, in t.after

export function world(t) {
  const things = [];
  const agents = [];
  t.after(async () => {
    for (const x of things.reverse()) {
      try { await x(); } catch { /* best effort */ }
    }
    // a sanitizer report or a crash in any agent fails the test that ran it
    for (const a of agents) {
      const bad = a.log.find(/AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:|internal error/);
      if (bad) throw new Error(`tbagent (pid ${a.pid}) reported: ${bad.line}\n${a.log.tail(30)}`);
    }
  });
  return {
    async broker(opts) {
      const b = await startBroker(opts);
      things.push(() => b.stop('SIGKILL'));
      return b;
    },
    async server(broker, opts) {
      const s = await connectServer(broker, opts);
      things.push(() => s.close());
      return s;
    },
    async reconnectServer(old, broker, opts) {
      const s = await reconnectServer(old, broker, opts);
      things.push(() => s.close());
      return s;
    },
    async fake(connackRc) {
      const f = await fakeServer(connackRc);
      things.push(() => f.close());
      return f;
    },
    async agent(script, opts) {
      const a = await startAgent(script, opts);
      agents.push(a);
      things.push(() => a.stop());
      return a;
    },
    // agentReady(script, opts) -> agent whose session is up (RPC subscribed; "session ready"
    // is a debug line, so the agent runs at debug level unless opts.args set a level).
    async agentReady(script, opts = {}) {
      const args = [...(opts.args || [])];
      if (!args.includes('--log-level')) args.push('--log-level', 'debug');
      const a = await this.agent(script, { ...opts, args });
      await a.waitForLog(/session ready/, opts.readyTimeout || 8000);
      return a;
    },
    // exited(script, n) -> {code, signal, agent}: an agent on a fresh broker, once it has
    // exited (within n ms)
    async exited(script, n) {
      const broker = await this.broker();
      const agent = await this.agent(script, { broker });
      return { ...(await agent.waitExit(n)), agent };
    },
    // device(script, {brokerOpts, serverOpts, ...opts}) -> {broker, server, agent}: a broker, a
    // server-role client on it, then an agent running script whose session is up (agentReady
    // with opts)
    async device(script, { brokerOpts, serverOpts, ...opts } = {}) {
      const broker = await this.broker(brokerOpts);
      const server = await this.server(broker, serverOpts);
      const agent = await this.agentReady(script, { ...opts, broker });
      return { broker, server, agent };
    },
  };
}

// cpuTicks(pid) -> utime + stime of a process, in clock ticks
export function cpuTicks(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

// The head of a device script whose RPC "eval" runs Lua text in a handler (so it may yield)
// and answers with what it returns; tests drive the tb API through it.
export const EVAL_HANDLER = `
local tb = require "tb"
local env = setmetatable({tb = tb}, {__index = _G})
tb.on_rpc("eval", function(code)
  local fn = assert(load(code, "=eval", "t", env))
  return fn()
end)
`;

// EVAL_HANDLER and a few RPCs that answer what they got.
export const EVAL_SCRIPT = `${EVAL_HANDLER}tb.on_rpc("ping", function(p) return {pong = p == nil and true or p} end)
tb.on_rpc("echo", function(p) return p end)
tb.on_rpc("types", function(p)
  local out = {}
  for k, v in pairs(p) do out[k] = math.type(v) or type(v) end
  return out
end)
`;

// evalLua(server, code, opts) -> the decoded response {json, text}
export function evalLua(server, code, opts = {}) {
  return server.rpc('eval', code, { timeout: 5000, ...opts });
}

// lua(s): a Lua string literal for s
export function lua(s) {
  return JSON.stringify(s);
}

// ------------------------------------------------------------------------------------------
// a fake MQTT server for the CONNECT packet and CONNACK codes mosquitto cannot produce

function parseConnect(buf) {
  let i = 1, mult = 1, len = 0, b;
  do { b = buf[i++]; len += (b & 127) * mult; mult *= 128; } while (b & 128);
  const str = () => { const n = buf.readUInt16BE(i); i += 2; const s = buf.subarray(i, i + n); i += n; return s; };
  const proto = str().toString();
  const level = buf[i++];
  const flags = buf[i++];
  const keepalive = buf.readUInt16BE(i); i += 2;
  const clientId = str().toString();
  if (flags & 0x04) { str(); str(); }
  const username = flags & 0x80 ? str().toString() : undefined;
  const password = flags & 0x40 ? str().toString() : undefined;
  return { proto, level, flags, keepalive, clientId, username, password, clean: !!(flags & 0x02) };
}

// fakeServer(connackRc) -> {port, connects: [CONNECT fields], waitConnects(k, ms), close()}:
// answers every CONNECT with CONNACK connackRc and closes the socket after a refusal.
export async function fakeServer(connackRc) {
  const connects = [];
  const waiters = new Set();
  const sockets = new Set();
  const srv = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    let buf = Buffer.alloc(0);
    sock.on('error', () => {});
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length < 2 || (buf[0] & 0xf0) !== 0x10) return;
      let i = 1, mult = 1, len = 0, b;
      do { if (i >= buf.length) return; b = buf[i++]; len += (b & 127) * mult; mult *= 128; } while (b & 128);
      if (buf.length < i + len) return;
      connects.push(parseConnect(buf));
      buf = buf.subarray(i + len);
      sock.write(Buffer.from([0x20, 0x02, 0x00, connackRc]));
      if (connackRc !== 0) sock.end();
      for (const w of [...waiters]) w();
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  return {
    port: srv.address().port,
    connects,
    waitConnects(k, n = 5000) {
      n = ms(n);
      return new Promise((resolve, reject) => {
        const check = () => { if (connects.length >= k) { done(); resolve(connects); return true; } return false; };
        const timer = setTimeout(() => { done(); reject(new Error(`only ${connects.length} of ${k} CONNECTs within ${n} ms`)); }, n);
        const done = () => { clearTimeout(timer); waiters.delete(check); };
        if (!check()) waiters.add(check);
      });
    },
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => srv.close(() => r()));
    },
  };
}

// tele(m | text) -> canonical text of the telemetry values, whether the agent sent the object
// form or wrapped it as {"ts":..., "values": ...} (it does so for data that waited in its
// outbox); arrays are unwrapped element by element. Number tokens are kept exactly.
export function tele(m) {
  const text = typeof m === 'string' ? m : m.text;
  const c = canon(text);
  const unwrapOne = (s) => {
    const r = /^\{"ts":-?\d+,"values":(.*)\}$/.exec(s);
    return r ? r[1] : s;
  };
  if (c.startsWith('[')) {
    const parsed = JSON.parse(c);   // only to split the elements; re-canonicalise each from text
    void parsed;
    return '[' + splitTop(c.slice(1, -1)).map(unwrapOne).join(',') + ']';
  }
  return unwrapOne(c);
}

// splits "a,b,c" at top-level commas of canonical JSON
function splitTop(s) {
  const out = [];
  let depth = 0, inStr = false, start = 0;
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    if (inStr) { if (ch === '\\') i++; else if (ch === '"') inStr = false; continue; }
    if (ch === '"') inStr = true;
    else if (ch === '{' || ch === '[') depth++;
    else if (ch === '}' || ch === ']') depth--;
    else if (ch === ',' && depth === 0) { out.push(s.slice(start, i)); start = i + 1; }
  }
  if (s.length) out.push(s.slice(start));
  return out;
}

// ------------------------------------------------------------------------------------------
// counting seqs: a device script sends telemetry {seq = N} with N = 1, 2, ... and saves the
// highest N it saw accepted to a counter file; the test stops it with a flag file, then checks
// that every N arrived at the server, in order

// seqSender(dir, {every, pad, saveAfterCommit}) -> {lua, counter, flag, accepted(), stop()}:
// lua is Lua text that, after `local tb = require "tb"`, sends telemetry {seq = N} (and a pad
// of `pad` x's) every `every` ms (5) at QoS 1, continuing after the N in the counter file (so
// seqs keep increasing across agent restarts) and saving each accepted N to it: written to a
// temp file and renamed, so a kill -9 never leaves it half written. With saveAfterCommit the
// save happens in the next handler, once the outbox has committed what this one sent. It logs
// "SEQ starting after N", "SEQ accepted N" every 500, and, once stop() has created the flag
// file, stops sending and logs "SEQ stopped at N". The local `seq` is the last N sent.
export function seqSender(dir, { every = 5, pad = 0, saveAfterCommit = false } = {}) {
  const counter = path.join(dir, 'seq.counter');
  const flag = path.join(dir, 'seq.stop');
  const lua = `local COUNTER, FLAG, PAD = ${JSON.stringify(counter)}, ${JSON.stringify(flag)}, ${pad}
local function read_counter()
  local f = io.open(COUNTER, "r")
  if not f then return 0 end
  local n = tonumber(f:read("a")) or 0
  f:close()
  return n
end
local function save(n)
  local f = assert(io.open(COUNTER .. ".tmp", "w"))
  f:write(tostring(n))
  f:close()
  assert(os.rename(COUNTER .. ".tmp", COUNTER))
end
local seq = read_counter()
local stopped = false
local pad = PAD > 0 and string.rep("x", PAD) or nil
tb.log.info("SEQ starting after %d", seq)
tb.every(${every}, function()
  if stopped then return end
  local ok, err = tb.send_telemetry(pad and {seq = seq + 1, pad = pad} or {seq = seq + 1})
  if not ok then
    tb.log.error("SEQ refused %d: %s", seq + 1, tostring(err))
    return
  end
  seq = seq + 1
${saveAfterCommit ? `  local n = seq
  tb.after(0, function() save(n) end)` : '  save(seq)'}
  if seq % 500 == 0 then tb.log.info("SEQ accepted %d", seq) end
end)
tb.every(50, function()
  if stopped then return end
  local f = io.open(FLAG, "r")
  if f then
    f:close()
    stopped = true
    save(seq)
    tb.log.info("SEQ stopped at %d", seq)
  end
end)
`;
  return {
    lua, counter, flag,
    accepted: () => { try { return Number(fs.readFileSync(counter, 'utf8')) || 0; } catch { return 0; } },
    stop: () => fs.writeFileSync(flag, 'stop\n'),
  };
}

// stopSeqs(agent, sender, n) -> the last seq: creates the flag file and waits up to n ms for the
// script's "SEQ stopped at N"
export async function stopSeqs(agent, sender, n = 5000) {
  const mark = agent.mark();
  sender.stop();
  const line = await agent.waitForLog(/SEQ stopped at \d+/, n, mark);
  return Number(/SEQ stopped at (\d+)/.exec(line)[1]);
}

// seqsOf(messages) -> the seq values in arrival order ({"seq":N}, {"ts":..,"values":{..}}, arrays)
export function seqsOf(messages) {
  const out = [];
  const take = (v) => {
    if (Array.isArray(v)) { for (const x of v) take(x); return; }
    if (v && typeof v === 'object') {
      const vals = v.values && typeof v.values === 'object' ? v.values : v;
      if (Number.isInteger(vals.seq)) out.push(vals.seq);
    }
  };
  for (const m of messages) if (m.topic === TELEMETRY) take(m.json);
  return out;
}

// tally(seqs, last) -> {received, distinct, lost, missing[], duplicated, outOfOrder, extra}
export function tally(seqs, last) {
  const seen = new Set();
  let duplicated = 0, outOfOrder = 0, extra = 0, maxFirst = 0;
  for (const s of seqs) {
    if (seen.has(s)) { duplicated++; continue; }
    seen.add(s);
    if (s > last) extra++;
    if (s < maxFirst) outOfOrder++;
    else maxFirst = s;
  }
  const missing = [];
  for (let s = 1; s <= last; s++) if (!seen.has(s)) missing.push(s);
  return { received: seqs.length, distinct: seen.size, lost: missing.length, missing, duplicated, outOfOrder, extra };
}

// waitDelivered(server, last, n, every) -> the tally once every seq 1..last has arrived, or
// when n ms have passed (looking every `every` ms)
export async function waitDelivered(server, last, n, every = 100) {
  const deadline = Date.now() + n;
  for (;;) {
    const r = tally(seqsOf(server.messages), last);
    if (r.lost === 0 || Date.now() > deadline) return r;
    await delay(every);
  }
}
