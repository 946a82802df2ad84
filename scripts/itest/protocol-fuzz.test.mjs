// Protocol fuzz (issue 6, "Bad input and fuzzing"): a server-role client sends thousands of
// mutated payloads (invalid UTF-8, deep nesting, huge numbers, wrong types, empty, 1 MiB
// blobs, random bytes, mutations of valid messages) to every topic the agent subscribes to.
// Afterwards the agent must still be running, answer a plain "ping" RPC, exit 0 on SIGTERM,
// and (with TBAGENT=build-asan/tbagent) AddressSanitizer, LeakSanitizer and UBSan report
// nothing.
//   PROTOCOL_FUZZ_SEED=n     replays one run (the seed is printed)
//   PROTOCOL_FUZZ_COUNT=n    messages to send (default 3000); PROTOCOL_FUZZ_SECONDS=s bounds
//                            the sending time (default 30)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { world, delay, ms, withTimeout } from './lib.mjs';

const COUNT = Number(process.env.PROTOCOL_FUZZ_COUNT || 3000);
const SECONDS = Number(process.env.PROTOCOL_FUZZ_SECONDS || 30);
const SEED = Number(process.env.PROTOCOL_FUZZ_SEED || (Date.now() % 2147483647));
const MiB = 1024 * 1024;
// an error raised inside lua/tb/ (not the script) and caught by the handler wrapper
const LIBRARY_RAISED = /ERROR .* failed: (\[string ")?lua\/tb\//;

const SCRIPT = `
local tb = require "tb"
tb.on_rpc("ping", function() return "pong" end)
tb.on_rpc("echo", function(p) return p end)
tb.on_rpc("ask", function(p)
  local a, err = tb.request_attributes({shared = {"x"}})
  return a or err
end)
local pushes = 0
tb.on_attributes(function(changes, deleted)
  pushes = pushes + 1
  local n = 0
  for k, v in pairs(changes) do n = n + 1 end
  for _, k in ipairs(deleted) do n = n + 1 end
  return n
end)
tb.firmware{
  current = {title = "fw", version = "1.0"},
  chunk_size = 1024,
  install = function(path, info) return true end,
}
`;

// mulberry32: a small seeded PRNG, so a failing run can be replayed from its seed
function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n) => Math.floor(next() * n);
  const pick = (xs) => xs[int(xs.length)];
  const bytes = (n) => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = int(256);
    return b;
  };
  return { next, int, pick, bytes };
}

const ids = (r) => r.pick(['0', '1', '2', '3', String(r.int(50)), String(r.int(100000)), '2147483647',
  '2147483648', '9223372036854775807', '99999999999999999999', '00000000000000000001']);

// Every topic the agent subscribes to (session.lua, ota_mqtt.lua), with fresh ids.
const TOPICS = [
  () => 'v1/devices/me/attributes',
  (r) => `v1/devices/me/attributes/response/${ids(r)}`,
  (r) => `v1/devices/me/rpc/request/${ids(r)}`,
  (r) => `v1/devices/me/rpc/response/${ids(r)}`,
  (r) => `v2/fw/response/${ids(r)}/chunk/${r.pick(['0', '1', String(r.int(64)), '99999999999999999999'])}`,
  (r) => `v2/sw/response/${ids(r)}/chunk/${r.pick(['0', '1', String(r.int(64))])}`,
  () => 'v2/fw/error',
];

const VALID = [
  '{"method":"ping"}', '{"method":"echo","params":{"a":[1,2.5,"x",null,true]}}', '{"method":"ask"}',
  '{"method":"nope","params":1}', '{"x":1,"y":"s"}', '{"deleted":["x","fw_title"]}',
  '{"client":{"a":1},"shared":{"x":2}}', '{"shared":{"fw_title":"fw","fw_version":"2"}}',
  '{"fw_title":"fw","fw_version":"2.0","fw_size":3000,"fw_checksum_algorithm":"SHA256","fw_checksum":"00"}',
  '{"fw_title":"fw","fw_version":"3","fw_size":0}', '{"error":"timeout"}', '"pong"', '42', 'NOT_FOUND',
];

const NUMBERS = ['1e999', '-1e999', '1e-999', '99999999999999999999999999', '-9223372036854775809',
  '9223372036854775808', '-0', '-0.0', '0.1e1', '1E400', '123456789012345678901234567890.5e-3',
  '9'.repeat(400), '-' + '1'.repeat(5000), '0.' + '0'.repeat(3000) + '1'];

const INVALID_UTF8 = [[0xff], [0xfe, 0xff], [0xc0, 0x80], [0xc3, 0x28], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80],
  [0xe2, 0x82], [0xf0, 0x9f, 0x98], [0x80], [0xbf, 0xbf], [0xf8, 0x88, 0x80, 0x80, 0x80]];

// One mutated payload; returns [kind, Buffer|string].
function payload(r) {
  const kind = r.int(12);
  switch (kind) {
    case 0: return ['empty', r.pick(['', ' ', '\n', '\u0000'])];
    case 1: { // invalid UTF-8 alone, inside a JSON string, as a key, as the method
      const bad = Buffer.from(r.pick(INVALID_UTF8));
      const wrap = r.pick([['', ''], ['"', '"'], ['{"method":"', '"}'], ['{"', '":1}'], ['{"x":"', '"}'], ['["a', '"]']]);
      return ['invalid-utf8', Buffer.concat([Buffer.from(wrap[0]), bad, Buffer.from(wrap[1])])];
    }
    case 2: { // deep nesting: far past the codec's 128 levels, or right at it
      const depth = r.pick([127, 128, 129, 1000, 10000, 100000]);
      const open = r.pick(['[', '{"a":', '{"method":"echo","params":[']);
      const close = open === '[' ? ']' : open === '{"a":' ? '}' : ']';
      const closed = r.int(2) === 0;
      return ['deep', open.repeat(depth) + (closed ? '1' + close.repeat(depth) + (open.startsWith('{"method') ? '}' : '') : '')];
    }
    case 3: { // huge numbers where numbers go, and where they do not
      const n = r.pick(NUMBERS);
      return ['number', r.pick([n, `{"x":${n}}`, `{"method":"echo","params":${n}}`, `{"fw_title":"fw","fw_version":"${r.int(9)}","fw_size":${n}}`,
        `[${n},${n}]`, `{"method":${n}}`])];
    }
    case 4: { // wrong types in the right places
      const v = r.pick(['null', 'true', '[]', '{}', '1.5', '"s"', '[1,"a",null]', '{"a":{}}', '-1', '0']);
      return ['wrong-type', r.pick([v, `{"method":${v}}`, `{"method":"echo","params":${v}}`, `{"deleted":${v}}`,
        `{"deleted":[${v}]}`, `{"client":${v},"shared":${v}}`, `{"fw_title":${v},"fw_version":${v},"fw_size":${v},"fw_checksum":${v},"fw_checksum_algorithm":${v}}`,
        `{"fw_title":"fw","fw_version":"9","fw_size":100,"fw_checksum_algorithm":${v}}`, `{"error":${v}}`, `{"${v}":${v}}`])];
    }
    case 5: { // 1 MiB: random bytes, a JSON string, an array of numbers, an object with many keys
      const size = r.int(4) === 0 ? MiB : 64 * 1024;
      const what = r.int(4);
      if (what === 0) return [size === MiB ? '1MiB' : '64KiB', r.bytes(size)];
      const kind = size === MiB ? '1MiB' : '64KiB';
      if (what === 1) return [kind, `{"method":"echo","params":"${'x'.repeat(size)}"}`];
      if (what === 2) return [kind, '[' + '1,'.repeat(size / 2 - 1) + '1]'];
      const parts = [];
      for (let i = 0; parts.length * 12 < size; i++) parts.push(`"k${i}":${i}`);
      return [kind, `{${parts.join(',')}}`];
    }
    case 6: return ['random', r.bytes(r.int(r.int(2) ? 64 : 4096))];
    case 7: case 8: { // a valid message, mutated a few times
      const b = Buffer.from(r.pick(VALID));
      let out = b;
      for (let k = 1 + r.int(4); k > 0; k--) {
        const at = r.int(out.length + 1);
        const op = r.int(4);
        if (op === 0) out = Buffer.concat([out.subarray(0, at), r.bytes(1 + r.int(4)), out.subarray(at)]);
        else if (op === 1) out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + r.int(4))]);
        else if (op === 2 && out.length) { out = Buffer.from(out); out[Math.min(at, out.length - 1)] ^= 1 << r.int(8); }
        else out = Buffer.concat([out.subarray(0, at), Buffer.from(r.pick(['"', '{', '}', '[', ']', ',', ':', '\\', '\\u', 'null', '-', 'e', '.'])), out.subarray(at)]);
      }
      return ['mutated', out];
    }
    case 9: return ['valid', r.pick(VALID)];
    case 10: { // strings with escapes that decode to tricky text
      const s = r.pick(['\\u0000', '\\ud800', '\\udc00', '\\ud83d\\ude00', '\\uD834', '\\u00', '\\x41', '\\', '\\"', '\u0001', '\u001f']);
      return ['escape', r.pick([`{"method":"${s}"}`, `{"method":"echo","params":"${s}"}`, `{"${s}":1}`, `"${s}"`, `{"fw_title":"${s}","fw_version":"${s}","fw_size":1}`])];
    }
    default: { // many small keys, duplicate keys, long keys
      const n = r.pick([17, 33, 500, 5000]);
      const keys = [];
      for (let i = 0; i < n; i++) keys.push(`"${r.int(3) === 0 ? 'a' : 'k' + i}":${r.int(2) ? i : '"v"'}`);
      return ['keys', `{${keys.join(',')}}`];
    }
  }
}

async function pingUntilReady(server, deadline) {
  let lastErr;
  while (Date.now() < deadline) {
    try {
      return await server.rpc('ping', undefined, { timeout: 1000 });
    } catch (e) {
      lastErr = e;
      await delay(100);
    }
  }
  throw new Error(`the agent never answered ping: ${lastErr && lastErr.message}`);
}

test('thousands of mutated server payloads on every subscribed topic: no crash, no leak, ping still answered', { timeout: ms(240000) }, async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const agent = await w.agent(SCRIPT, { broker, args: ['--no-session-limits', '--log-level', 'warn'] });
  const ready = await pingUntilReady(server, Date.now() + ms(15000));
  assert.equal(ready.json, 'pong');

  const r = rng(SEED);
  const started = Date.now();
  const perTopic = {};
  const perKind = {};
  let sent = 0, bytes = 0;
  const inflight = new Set();
  while (sent < COUNT && Date.now() - started < SECONDS * 1000) {
    const topic = r.pick(TOPICS)(r);
    const [kind, body] = payload(r);
    const p = server.client.publishAsync(topic, body, { qos: r.int(2) });
    inflight.add(p);
    p.finally(() => inflight.delete(p)).catch(() => {});
    sent++;
    bytes += typeof body === 'string' ? Buffer.byteLength(body) : body.length;
    const family = topic.replace(/\/\d+/g, '/N');
    perTopic[family] = (perTopic[family] || 0) + 1;
    perKind[kind] = (perKind[kind] || 0) + 1;
    if (inflight.size >= 64) await Promise.race(inflight);
    if (!agent.running()) break;
  }
  await withTimeout(Promise.allSettled([...inflight]), ms(30000), 'the fuzz publishes to be acknowledged');
  const sendSecs = (Date.now() - started) / 1000;
  assert.ok(agent.running(), `the agent died during the fuzz (seed ${SEED}):\n${agent.log.tail(40)}`);

  // the ping goes behind everything sent, on the same connection: answered = all processed
  const from = server.mark();
  await server.publish('v1/devices/me/rpc/request/999999', '{"method":"ping"}');
  const pong = await server.waitFor('v1/devices/me/rpc/response/999999', () => true, 60000, from);
  const drainSecs = (Date.now() - started) / 1000;
  assert.equal(pong.json, 'pong', pong.text);
  assert.ok(agent.running());

  agent.signal('SIGTERM');
  const { code, signal } = await agent.waitExit(20000);
  const log = agent.log.text();
  const bad = agent.log.find(/ERROR: LeakSanitizer|ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|internal error/);
  assert.equal(bad, null, `sanitizer or internal error (seed ${SEED}): ${bad && bad.line}\n${agent.log.tail(40)}`);
  const raised = agent.log.find(LIBRARY_RAISED);
  assert.equal(raised, null, `the library raised on server input (seed ${SEED}): ${raised && raised.line.slice(0, 300)}`);
  assert.equal(signal, null, `killed by ${signal}`);
  assert.equal(code, 0, `exit ${code}:\n${agent.log.tail(30)}`);

  const answered = server.all(/^v1\/devices\/me\/rpc\/response\//).length;
  const formatErrors = (log.match(/log format error/g) || []).length;
  const summary = `protocol-fuzz: seed ${SEED}: ${sent} messages (${(bytes / MiB).toFixed(1)} MiB) sent in ${sendSecs.toFixed(1)} s, ` +
    `all processed after ${drainSecs.toFixed(1)} s; ${answered} RPC responses; ping answered; exit 0 on SIGTERM; ` +
    `${agent.log.lines.length} log lines (${formatErrors} with a log format error); no sanitizer report`;
  t.diagnostic(summary);
  t.diagnostic(`per topic: ${JSON.stringify(perTopic)}`);
  t.diagnostic(`per kind: ${JSON.stringify(perKind)}`);
  console.log(summary);
  assert.ok(sent >= Math.min(COUNT, 1000), `only ${sent} messages sent`);
});

// Fixed cases the random run found, each a regression: server text is data, never format
// or JSON trouble for the agent. Every problem is collected, so one run lists them all.
test('server text on v2/fw/error and RPC ids past 64 bits are reported cleanly', { timeout: ms(60000) }, async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const agent = await w.agent(SCRIPT, { broker, args: ['--no-session-limits', '--log-level', 'warn'] });
  await pingUntilReady(server, Date.now() + ms(15000));
  const T = 'v1/devices/me/telemetry';
  const failedState = (m) => m.json && m.json.values && m.json.values.fw_state === 'FAILED';
  const problems = [];
  const check = (ok, what) => { if (!ok) problems.push(what); };
  const failedAfter = (from) => server.waitFor(T, failedState, 5000, from).catch(() => null);
  const offer = async (version) => {
    const from = server.mark();
    await server.pushAttributes({ fw_title: 'fw', fw_version: version, fw_size: 3000, fw_checksum_algorithm: 'CRC32', fw_checksum: '0' });
    await server.waitFor(/^v2\/fw\/request\/\d+\/chunk\/0$/, () => true, 5000, from);
    return from;
  };

  // (1) a refusal whose text is not UTF-8 (and has a newline and an escape) while a chunked
  // download runs: fw_state FAILED with the server's text, sanitised
  let mark = agent.mark();
  let from = await offer('2');
  await server.publish('v2/fw/error', Buffer.from([0x4e, 0x4f, 0x54, 0xff, 0xfe, 0x0a, 0x1b, 0x5b, 0x33, 0x31, 0x6d]));
  let m = await failedAfter(from);
  let raised = agent.log.find(LIBRARY_RAISED, mark);
  check(!raised, `(1) v2/fw/error with bytes that are not UTF-8 raised in the library: ${raised && raised.line}`);
  check(m && /NOT/.test(m.json.values.fw_error), `(1) fw_error should carry the server's text: ${m ? m.text : 'no FAILED state'}`);

  // (2) a refusal of 100 KiB: FAILED must still reach the server, the log lines stay short
  mark = agent.mark();
  from = await offer('3');
  await server.publish('v2/fw/error', 'E'.repeat(100 * 1024));
  m = await failedAfter(from);
  const notReported = agent.log.find(/state not reported/, mark);
  check(m, `(2) no FAILED state after a 100 KiB v2/fw/error${notReported ? `: ${notReported.line.slice(0, 200)}` : ''}`);
  let longest = Math.max(0, ...agent.log.lines.slice(mark).map((l) => l.length));
  check(longest < 4096, `(2) the agent logged a line of ${longest} bytes of server text`);

  // (3) with no download running, a refusal is logged as data: one line, bounded
  mark = agent.mark();
  await server.publish('v2/fw/error', Buffer.concat([Buffer.from('BAD\nline\u001b[31m'), Buffer.from([0xff]), Buffer.from('X'.repeat(70000))]));
  await server.rpc('ping', undefined, { timeout: 5000 });
  const lines = agent.log.lines.slice(mark);
  check(!lines.some((l) => /^line/.test(l)), `(3) server text split a log line: ${JSON.stringify(lines.map((l) => l.slice(0, 80)))}`);
  longest = Math.max(0, ...lines.map((l) => l.length));
  check(longest < 4096, `(3) the agent logged a line of ${longest} bytes of server text`);

  // (4) an RPC id past 64 bits: answered on the same id, no garbled log line
  mark = agent.mark();
  const r = await server.rpc('nope', undefined, { id: '99999999999999999999', timeout: 5000 }).catch((e) => ({ json: {}, text: e.message }));
  check(/unknown method/.test(r.json.error || ''), `(4) RPC id 99999999999999999999 not answered: ${r.text}`);
  const garbled = agent.log.find(/log format error/, mark);
  check(!garbled, `(4) RPC id 99999999999999999999: ${garbled && garbled.line}`);

  check(agent.running(), 'the agent died');
  agent.signal('SIGTERM');
  const { code } = await agent.waitExit(20000);
  check(code === 0, `exit ${code} on SIGTERM`);
  assert.deepEqual(problems, []);
});
