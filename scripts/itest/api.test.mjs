// Item 3: the device API through tb, checked on the wire: telemetry (three forms), client
// attributes, attribute requests, shared attribute pushes, server-side RPC, client-side RPC,
// claiming.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { world, canon, tele, evalLua, EVAL_SCRIPT, lua, ms, delay } from './lib.mjs';

const T = 'v1/devices/me/telemetry';

describe('telemetry, attributes, requests, claim (one agent)', () => {
  const w = world({ after });
  let server, agent;
  before(async () => {
    ({ server, agent } = await w.device(EVAL_SCRIPT,
      { serverOpts: { attributes: { client: { a: 1, b: 'x', fw: '1.0' }, shared: { c: 2.5, d: true } } } }));
  });

  // send(code, topic) -> the one message the code publishes on topic
  async function send(code, topic = T) {
    const from = server.mark();
    const r = await evalLua(server, code);
    assert.equal(r.text, 'true', `the call returned ${r.text}`);
    return server.waitFor(topic, () => true, 3000, from);
  }

  test('object form: exact text, 42.0 stays a double, 2^53+1 exact', async () => {
    assert.equal(tele(await send('return tb.send_telemetry({temperature = 42.0})')), '{"temperature":42.0}');
    assert.equal(tele(await send('return tb.send_telemetry({big = 9007199254740993})')), '{"big":9007199254740993}');
    const m = await send('return tb.send_telemetry({i = 7, f = 1.5, s = "x", b = false, n = {1, 2}, o = {k = "v"}})');
    assert.equal(tele(m), canon('{"b":false,"f":1.5,"i":7,"n":[1,2],"o":{"k":"v"},"s":"x"}'));
  });

  test('array form', async () => {
    const m = await send('return tb.send_telemetry({{a = 1}, {b = 2.0}})');
    assert.equal(tele(m), canon('[{"a":1},{"b":2.0}]'));
  });

  test('{ts, values} form, and mixed in an array', async () => {
    let m = await send('return tb.send_telemetry({ts = 1700000000000, values = {a = 1}})');
    assert.equal(canon(m.text), canon('{"ts":1700000000000,"values":{"a":1}}'));
    m = await send('return tb.send_telemetry({{ts = 1700000000001, values = {a = 2}}, {ts = 1700000000002, values = {a = 3}}})');
    assert.equal(canon(m.text), canon('[{"ts":1700000000001,"values":{"a":2}},{"ts":1700000000002,"values":{"a":3}}]'));
  });

  test('send_telemetry(values, ts)', async () => {
    const m = await send('return tb.send_telemetry({a = 1, f = 0.5}, 1700000000003)');
    assert.equal(canon(m.text), canon('{"ts":1700000000003,"values":{"a":1,"f":0.5}}'));
  });

  test('client attributes', async () => {
    const m = await send('return tb.send_attributes({fw = "1.0", n = 3, f = 1.0})', 'v1/devices/me/attributes');
    assert.equal(canon(m.text), canon('{"f":1.0,"fw":"1.0","n":3}'));
  });

  test('request_attributes: comma-joined key strings, the answer, fresh ids', async () => {
    const from = server.mark();
    const r = await evalLua(server, 'return tb.request_attributes{client = {"a", "b"}, shared = {"c"}}');
    const reqs = server.all(/^v1\/devices\/me\/attributes\/request\/\d+$/, from);
    assert.equal(reqs.length, 1);
    assert.equal(canon(reqs[0].text), canon('{"clientKeys":"a,b","sharedKeys":"c"}'));
    assert.deepEqual(r.json, { client: { a: 1, b: 'x' }, shared: { c: 2.5 } });
    const r2 = await evalLua(server, 'return tb.request_attributes{shared = {"d"}}');
    assert.deepEqual(r2.json.shared, { d: true });
    const reqs2 = server.all(/^v1\/devices\/me\/attributes\/request\/\d+$/, from);
    assert.equal(reqs2[1].text, '{"sharedKeys":"d"}');
    const ids = reqs2.map((m) => Number(m.topic.split('/').pop()));
    assert.notEqual(ids[0], ids[1]);
    for (const id of ids) assert.ok(Number.isInteger(id) && id >= 0 && id <= 2147483647, `id ${id} is not a 32-bit int`);
  });

  test('request_attributes{} asks for everything with {}', async () => {
    const from = server.mark();
    const r = await evalLua(server, 'return tb.request_attributes{}');
    const [req] = server.all(/^v1\/devices\/me\/attributes\/request\/\d+$/, from);
    assert.equal(req.text, '{}');
    assert.deepEqual(r.json, { client: { a: 1, b: 'x', fw: '1.0' }, shared: { c: 2.5, d: true } });
  });

  test('request_attributes times out with nil, "timeout"', async () => {
    server.autoAttributes = false;
    try {
      const t0 = Date.now();
      const r = await evalLua(server, 'local r, e = tb.request_attributes{shared = {"c"}, timeout = 300}; return {r = r or false, e = e}');
      assert.deepEqual(r.json, { r: false, e: 'timeout' });
      assert.ok(Date.now() - t0 >= 250, 'returned before the timeout');
    } finally {
      server.autoAttributes = true;
    }
  });

  test('client-side RPC: request on the wire and the result', async () => {
    const from = server.mark();
    const call = evalLua(server, 'return tb.rpc_call("getTime", {tz = "UTC"})');
    const req = await server.waitFor(/^v1\/devices\/me\/rpc\/request\/\d+$/, (m) => m.json?.method === 'getTime', 3000, from);
    assert.equal(canon(req.text), canon('{"method":"getTime","params":{"tz":"UTC"}}'));
    const id = req.topic.split('/').pop();
    await server.publish(`v1/devices/me/rpc/response/${id}`, '{"time":1700000000000,"zone":"UTC"}');
    const r = await call;
    assert.equal(canon(r.text), canon('{"time":1700000000000,"zone":"UTC"}'));
  });

  test('client-side RPC: the server\'s {"error":"timeout"} gives nil, "timeout"', async () => {
    const from = server.mark();
    const call = evalLua(server, 'local r, e = tb.rpc_call("slowOne"); return {r = r or false, e = e}');
    const req = await server.waitFor(/^v1\/devices\/me\/rpc\/request\/\d+$/, (m) => m.json?.method === 'slowOne', 3000, from);
    await server.publish(`v1/devices/me/rpc/response/${req.topic.split('/').pop()}`, '{"error":"timeout"}');
    assert.deepEqual((await call).json, { r: false, e: 'timeout' });
  });

  test('client-side RPC: local timeout', async () => {
    const t0 = Date.now();
    const r = await evalLua(server, 'local r, e = tb.rpc_call("nobodyAnswers", nil, 300); return {r = r or false, e = e}');
    assert.deepEqual(r.json, { r: false, e: 'timeout' });
    assert.ok(Date.now() - t0 >= 250);
  });

  test('claim payload', async () => {
    const m = await send('return tb.claim{secret_key = "s3cr3t", duration_ms = 60000}', 'v1/devices/me/claim');
    assert.equal(canon(m.text), canon('{"durationMs":60000,"secretKey":"s3cr3t"}'));
  });

  test('the agent never published anything ThingsBoard would disconnect for', () => {
    for (const m of server.messages) {
      assert.doesNotThrow(() => canon(m.text), `invalid JSON on ${m.topic}: ${m.text}`);
      if (m.topic === 'v1/devices/me/attributes') assert.ok(m.text.startsWith('{'), m.text);
    }
    assert.ok(agent.running());
  });
});

describe('server-side RPC (one agent)', () => {
  const w = world({ after });
  let server, agent;
  before(async () => {
    ({ server, agent } = await w.device(`
local tb = require "tb"
tb.on_rpc("echo", function(p) return p end)
tb.on_rpc("greet", function(p) return "hello " .. p.name end)
tb.on_rpc("answer", function() return 42.0 end)
tb.on_rpc("count", function() return 7 end)
tb.on_rpc("yes", function() return true end)
tb.on_rpc("fail", function() error("boom") end)
tb.on_rpc("failTable", function() error({code = 1}) end)
tb.on_rpc("nilErr", function() return nil, "no such sensor" end)
tb.on_rpc("oneway", function(p) tb.log.info("oneway ran with %s", tb.json.encode(p)) end)
tb.on_rpc("slow", function(p) tb.sleep(p.ms); return p.tag end)
tb.on_rpc("whoami", function(p, id) return {id = id} end)
`));
  });

  test('the first RPC has id 0 and is answered on rpc/response/0', async () => {
    const r = await server.rpc('echo', { a: [1, 2.5, 'x'], b: { c: null } }, { id: 0 });
    assert.equal(canon(r.text), canon('{"a":[1,2.5,"x"],"b":{"c":null}}'));
  });

  test('the handler gets the request id', async () => {
    const r = await server.rpc('whoami', null, { id: 4242 });
    assert.equal(r.text, '{"id":4242}');
  });

  test('a string result is a quoted JSON string', async () => {
    assert.equal((await server.rpc('greet', { name: 'Ann' })).text, '"hello Ann"');
  });

  test('number and boolean results are valid JSON of their type', async () => {
    assert.equal((await server.rpc('answer')).text, '42.0');
    assert.equal((await server.rpc('count')).text, '7');
    assert.equal((await server.rpc('yes')).text, 'true');
  });

  test('a raised error answers {"error": message}', async () => {
    assert.equal((await server.rpc('fail')).text, '{"error":"boom"}');
    // an error object that is not a string still gives one valid {"error": ...} response
    const r = await server.rpc('failTable');
    assert.ok(r.json && 'error' in r.json, r.text);
    assert.equal(Object.keys(r.json).length, 1);
  });

  test('nil, err answers {"error": err}', async () => {
    assert.equal((await server.rpc('nilErr')).text, '{"error":"no such sensor"}');
  });

  test('an unknown method answers {"error":"unknown method: x"}', async () => {
    assert.equal((await server.rpc('x')).text, '{"error":"unknown method: x"}');
  });

  test('a handler that returns nothing sends no response', async () => {
    const from = server.mark();
    const mark = agent.mark();
    await server.publish('v1/devices/me/rpc/request/777', '{"method":"oneway","params":{"v":1}}');
    await agent.waitForLog(/oneway ran with \{"v":1\}/, 3000, mark);
    await server.expectNone('v1/devices/me/rpc/response/777', () => true, 500, from);
  });

  test('several RPCs in flight answer in completion order', async () => {
    const t0 = Date.now();
    const slow = server.rpc('slow', { ms: 1200, tag: 'A' }, { timeout: 6000 });
    const fast = server.rpc('slow', { ms: 100, tag: 'B' }, { timeout: 6000 });
    const [a, b] = await Promise.all([slow, fast]);
    assert.equal(a.text, '"A"');
    assert.equal(b.text, '"B"');
    assert.ok(b.at < a.at, 'B (100 ms) must answer before A (1200 ms)');
    assert.ok(b.at - t0 < ms(1000), `B took ${b.at - t0} ms: it waited for A`);
  });
});

describe('fallback and shared attribute pushes', () => {
  test('"*" handles methods with no handler of their own', async (t) => {
    const { server } = await world(t).device(`
local tb = require "tb"
tb.on_rpc("known", function() return "k" end)
tb.on_rpc("*", function(p, id, method) return {fallback = method or "?"} end)
`);
    assert.equal((await server.rpc('known')).text, '"k"');
    assert.equal((await server.rpc('other')).text, '{"fallback":"other"}');
  });

  test('shared attribute pushes: updates and {"deleted":[...]}', async (t) => {
    const { server, agent } = await world(t).device(`
local tb = require "tb"
tb.on_attributes(function(changes, deleted)
  local keys = {}
  for k in pairs(changes) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. tb.json.encode(changes[k]) end
  tb.log.info("ATTR changes[%s] deleted[%s]", table.concat(parts, ","), table.concat(deleted, ","))
end)
`);
    let mark = agent.mark();
    await server.pushAttributes({ target: 21.5, mode: 'eco', n: 3 });
    await agent.waitForLog(/ATTR changes\[mode="eco",n=3,target=21\.5\] deleted\[\]$/, 3000, mark);
    mark = agent.mark();
    await server.pushAttributes({ deleted: ['target', 'mode'] });
    await agent.waitForLog(/ATTR changes\[\] deleted\[target,mode\]$/, 3000, mark);
  });

  test('on connect the current shared attributes reach the handlers', async (t) => {
    const w = world(t);
    const broker = await w.broker();
    await w.server(broker, { attributes: { client: { mine: 1 }, shared: { target: 19.5 } } });
    const agent = await w.agent(`
local tb = require "tb"
tb.on_attributes(function(changes, deleted) tb.log.info("ATTR %s", tb.json.encode(changes)) end)
`, { broker });
    await agent.waitForLog(/ATTR \{"target":19\.5\}/, 5000);
  });
});

// keep lua() referenced for ad-hoc debugging of eval snippets
void lua; void delay;

// tb.exec through the real binary (src/proc.c): output, exit status, signals, the timeout and
// the output limit, and the loop keeps serving while a command runs.
describe('tb.exec (one agent)', () => {
  const w = world({ after });
  let server;
  before(async () => {
    const broker = await w.broker();
    server = await w.server(broker);
    await w.agentReady(EVAL_SCRIPT, { broker });
  });
  // run(args) -> {out, err, code, output} of tb.exec(args), false where nil
  const run = async (args) => (await evalLua(server, `local out, err, code, output = tb.exec(${args})
    return {out = out or false, err = err or false, code = code or false, output = output or false}`, { timeout: 10000 })).json;

  test('output of a command (argv table and shell string, stderr included)', async () => {
    assert.equal((await run('{"/bin/echo", "a b", "c"}')).out, 'a b c\n');
    assert.equal((await run('"echo hi; echo err >&2"')).out, 'hi\nerr\n');
  });

  test('a failing command: nil, "exit N: last line", N, output', async () => {
    assert.deepEqual(await run('"echo first; echo last; exit 3"'), { out: false, err: 'exit 3: last', code: 3, output: 'first\nlast\n' });
  });

  test('a command killed by a signal, and one that does not exist', async () => {
    const r = await run('"kill -TERM $$"');
    assert.equal(r.out, false);
    assert.equal(r.err, 'signal 15');
    const missing = await run('{"/nonexistent/tool"}');
    assert.equal(missing.out, false);
    assert.match(String(missing.err), /nonexistent|No such file|exit 127/);
  });

  test('the timeout kills the command; the output limit cuts what is kept', async () => {
    const t0 = Date.now();
    const r = await run('"sleep 5", {timeout = 300}');
    assert.deepEqual([r.out, r.err], [false, 'timeout']);
    assert.ok(Date.now() - t0 < ms(3000), `tb.exec timeout took ${Date.now() - t0} ms`);
    const cut = await run('"head -c 100000 /dev/zero | tr \'\\\\0\' x", {output_limit = 1000}');
    assert.equal(cut.out, 'x'.repeat(1000));
  });

  test('the agent keeps answering while a command runs', async () => {
    const slow = run('"sleep 1; echo done"');
    await delay(ms(100));
    const t0 = Date.now();
    assert.deepEqual((await server.rpc('ping')).json, { pong: true });
    assert.ok(Date.now() - t0 < ms(500), 'an RPC waited for the command');
    assert.equal((await slow).out, 'done\n');
  });
});
