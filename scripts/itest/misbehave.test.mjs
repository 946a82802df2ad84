// Scripts that misbehave (issue 6): whatever a device script does wrong, the agent stays up,
// says clearly what happened and never corrupts the durable outbox.
//
// Every test runs one device script (deviceScript below) with a durable outbox (--state-dir in
// a temp dir, which lib.mjs's startAgent sets to <dir>/state) under steady QoS 1 telemetry: a
// timer sends {seq = N} every 10 ms and saves the last accepted N to a counter file, so the
// counter is "the highest seq the script saw accepted" (the same scheme as faults.test.mjs).
// The broker keeps sessions across restarts and the server-role subscriber has a persistent
// session, so a broker restart loses nothing on the broker's side either. The same script also
// carries every misbehaving handler, each triggered by the test through an RPC or an attribute
// push:
//   1. errors raised in every kind of handler: on_rpc (answered {"error": ...}), on_attributes,
//      on_connect and on_disconnect (a broker restart), tb.after and tb.every timers,
//      tb.firmware's accept(); odd error objects (a table, a __tostring that raises, a 1 MiB
//      message). Each is logged with file:line and a traceback; the agent answers a ping.
//   2. unbounded recursion: a function calling itself forever, a deep non-tail recursion (Lua
//      stack overflow), a recursion through C (C stack overflow), in RPCs, a timer and an
//      attribute handler: caught, logged, the agent stays up.
//   3. infinite loops in an RPC handler, an attribute handler, after and every timers, an
//      endless tail call, a loop that catches the cut-off with pcall and spins again, and loops
//      inside coroutines the script made itself: each cut off after --handler-budget; the
//      agent stays responsive.
//   4. huge telemetry: a table of 4 million keys (an array, as the telemetry table, as a value,
//      with a ts, as an attribute; not 10 million: growing a Lua array past 8.4M entries is
//      one rehash of ~0.65 s here, longer than the budget, and the script's own build would be
//      cut off; 10 million string keys would cost the script itself ~1 GiB and ~50 s to build,
//      so the string-keyed object has 200 000), a 100 MiB string, a
//      table 100 000 levels deep and a cycle: refused with nil, err (too large / nesting too
//      deep), no crash, the agent not killed; the memory the agent needs to refuse them (peak
//      RSS over what the script itself holds) is bounded, and RSS is back under 200 MiB (1 GiB
//      under ASan) once the script lets go of its data.
//   5. all of the above in one run, then the broker goes away, the script keeps sending into
//      the outbox, SIGTERM; the agent restarts on the same --state-dir: every seq the script saw
//      accepted arrives at the server, in order (duplicates allowed and counted).
// Tests 1-4 each end the same way: every seq arrives in order and SIGTERM exits 0.
//
//   TBAGENT=build-asan/tbagent scales every wait through lib.mjs's ms().
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  world, delay, ms, SCALE, tmpdir, TELEMETRY as T, seqSender, seqsOf, stopSeqs, waitDelivered,
} from './lib.mjs';

// --handler-budget: short, so the runaway tests are quick; longer where endless recursion
// runs, because reaching Lua's stack limit (1M slots) takes the agent 0.4-0.7 s here, and a
// cut-off would then win the race against the stack overflow the test waits for
const BUDGET = ms(500);
const RECURSION_BUDGET = ms(2000);
const BASE_ARGS = ['--no-session-limits', '--backoff-min', '100', '--backoff-max', '500',
  '--log-level', 'debug'];
const MiB = 1024 * 1024;

// ------------------------------------------------------------------------------------------
// the device script

function deviceScript(dir) {
  const sender = seqSender(dir, { every: 10 });
  const text = `local tb = require "tb"

---------------------------------------------------------------- steady QoS 1 telemetry
${sender.lua}tb.on_rpc("ping", function() return "pong" end)

---------------------------------------------------------------- 1. errors in every handler
local function inner(x)
  return x.field.missing                                    -- @rpc-error
end
tb.on_rpc("crash", function(p) local v = inner(p); return v end)   -- @rpc-caller
tb.on_rpc("errTable", function() error({code = 7}) end)
tb.on_rpc("errToString", function()
  error(setmetatable({}, {__tostring = function() error("tostring boom") end}))
end)
tb.on_rpc("errHuge", function() error(string.rep("x", 1024 * 1024)) end)
tb.on_attributes(function(c)
  if c.boom then error("attribute boom") end                 -- @attr-error
  if c.recurse then
    local function f() f() end                               -- @attr-recurse
    f()
  end
  if c.spin then while true do end end                       -- @attr-spin
  if c.fine then tb.log.info("ATTR fine %s", tostring(c.fine)) end
end)
local connects = 0
tb.on_connect(function()
  connects = connects + 1
  error("connect boom " .. connects)                         -- @connect-error
end)
tb.on_connect(function() tb.log.info("ONCONNECT the second handler ran (%d)", connects) end)
tb.on_disconnect(function(why)
  error("disconnect boom")                                   -- @disconnect-error
end)
tb.on_disconnect(function(why) tb.log.info("ONDISCONNECT the second handler ran") end)
tb.on_rpc("armAfter", function()
  tb.after(0, function() error("after boom") end)            -- @after-error
  return true
end)
tb.on_rpc("armEvery", function()
  local n, t = 0, nil
  t = tb.every(30, function()
    n = n + 1
    if n <= 2 then error("every boom " .. n) end              -- @every-error
    tb.log.info("EVERY ran again after %d errors", n - 1)
    t:cancel()
  end)
  return true
end)
tb.firmware{
  accept = function(info) error("accept boom " .. tostring(info.version)) end,   -- @accept-error
  install = function() return true end,
}

---------------------------------------------------------------- 2. recursion without end
tb.on_rpc("recurse", function()
  local function f() f() end                                 -- @recurse
  f()
end)
tb.on_rpc("deep", function(n)
  local function depth(k) if k == 0 then return 0 end return 1 + depth(k - 1) end   -- @deep
  return depth(n)
end)
tb.on_rpc("cstack", function()
  local function g(s) return (s:gsub(".", g)) end            -- @cstack
  return g("ab")
end)
tb.on_rpc("armRecurseTimer", function()
  tb.after(0, function()
    local function f(k) return 1 + f(k + 1) end               -- @timer-recurse
    return f(1)
  end)
  return true
end)

---------------------------------------------------------------- 3. infinite loops
tb.on_rpc("spin", function() while true do end end)          -- @spin
tb.on_rpc("tailSpin", function()
  local function f(k) return f(k + 1) end                    -- @tail-spin
  return f(1)
end)
tb.on_rpc("spinPcall", function()
  local caught = 0
  while true do
    local ok, err = pcall(function() while true do end end)
    caught = caught + 1
  end
end)
tb.on_rpc("spinInCoroutine", function()
  coroutine.wrap(function() while true do end end)()          -- @co-spin
end)
tb.on_rpc("spinInCoroutineCaught", function()
  local co = coroutine.create(function() while true do end end)
  local ok, err = coroutine.resume(co)
  return {resumed = ok, err = tostring(err)}
end)
tb.on_rpc("armSpinTimers", function()
  tb.after(0, function() while true do end end)              -- @after-spin
  local n, t = 0, nil
  t = tb.every(50, function()
    n = n + 1
    if n == 1 then while true do end end                      -- @every-spin
    tb.log.info("EVERYSPIN ran again (run %d)", n)
    t:cancel()
  end)
  return true
end)

---------------------------------------------------------------- 4. huge telemetry
local hold
local function result(ok, err) return {ok = ok or false, err = err and tostring(err) or false} end
tb.on_rpc("buildArray", function(n)
  local a = {}
  for i = 1, n do
    a[i] = i
    if i % 100000 == 0 then tb.sleep(0) end
  end
  hold = a
  return #a
end)
tb.on_rpc("buildKeys", function(n)
  local t = {}
  for i = 1, n do
    t["k" .. i] = i
    if i % 20000 == 0 then tb.sleep(0) end
  end
  hold = t
  return n
end)
tb.on_rpc("buildString", function(n) hold = string.rep("x", n) return #hold end)
tb.on_rpc("sendHold", function() return result(tb.send_telemetry(hold)) end)
tb.on_rpc("sendHoldAsValue", function() return result(tb.send_telemetry({big = hold})) end)
tb.on_rpc("sendHoldAsAttribute", function() return result(tb.send_attributes({big = hold})) end)
tb.on_rpc("sendHoldWithTs", function() return result(tb.send_telemetry({big = hold}, 1700000000000)) end)
tb.on_rpc("drop", function()
  hold = nil
  collectgarbage()
  collectgarbage()
  return math.floor(collectgarbage("count"))
end)
tb.on_rpc("sendDeep", function(n)
  local t = {}
  local c = t
  for i = 1, n do
    local x = {}
    c.x = x
    c = x
  end
  c.v = 1
  return result(tb.send_telemetry(t))
end)
tb.on_rpc("sendCycle", function()
  local t = {v = 1}
  t.self = t
  return result(tb.send_telemetry(t))
end)
`;
  const lines = text.split('\n');
  return {
    text, ...sender,
    // line(tag) -> the line number of the line marked "-- @tag"
    line(tag) {
      const i = lines.findIndex((l) => l.includes(`-- @${tag}`));
      assert.ok(i >= 0, `no line tagged @${tag}`);
      return i + 1;
    },
  };
}

// ------------------------------------------------------------------------------------------
// one run: broker, server, agent

// rig(t [, budget]) -> ctx: a persistent broker, a persistent server-role subscriber and the agent running
// deviceScript with a durable outbox, telemetry already flowing.
async function rig(t, budget = BUDGET) {
  const w = world(t);
  const broker = await w.broker({ persistence: true });
  const server = await w.server(broker, { persistent: true });
  const dir = tmpdir('tbmisbehave-');
  const script = deviceScript(dir);
  const file = path.join(dir, 'device.lua');
  fs.writeFileSync(file, script.text);
  const ctx = { t, w, broker, server, dir, file, script, stateDir: path.join(dir, 'state') };
  ctx.budget = budget;
  ctx.agent = await w.agentReady(file, { dir, broker, args: [...BASE_ARGS, '--handler-budget', String(budget)] });
  assert.ok(ctx.agent.args.includes('--state-dir') && ctx.agent.args.includes(ctx.stateDir), 'a durable outbox');
  await flowing(ctx, 20);
  return ctx;
}

// flowing(ctx, k): k more seqs arrive at the server (the telemetry timer is alive)
async function flowing(ctx, k = 5) {
  const n = ms(10000);
  const deadline = Date.now() + n;
  const start = seqsOf(ctx.server.messages).length;
  while (seqsOf(ctx.server.messages).length < start + k) {
    if (Date.now() > deadline) throw new Error(`telemetry stopped: fewer than ${k} new seqs within ${n} ms\n${ctx.agent.log.tail(20)}`);
    await delay(20);
  }
}

// alive(ctx): the agent runs, answers a ping and telemetry still flows
async function alive(ctx) {
  assert.ok(ctx.agent.running(), `the agent is gone:\n${ctx.agent.log.tail(30)}`);
  const r = await ctx.server.rpc('ping', null, { timeout: 8000 });
  assert.equal(r.text, '"pong"');
  await flowing(ctx);
}

// logged(ctx, re, mark, {traceback}) -> index of the first log line from mark matching re;
// with traceback (default) the lines after it must hold a Lua traceback.
async function logged(ctx, re, mark, { traceback = true, n = 8000 } = {}) {
  await ctx.agent.waitForLog(re, n, mark);
  const at = ctx.agent.log.find(re, mark).index;
  if (traceback) {
    const rest = ctx.agent.log.lines.slice(at, at + 30).join('\n');
    assert.match(rest, /stack traceback:/, `no traceback after:\n${rest}`);
  }
  return at;
}

// errorAt(ctx, tag, mark, opts): an ERROR line naming device.lua:<line of @tag>, with a traceback
function errorAt(ctx, tag, mark, opts) {
  return logged(ctx, new RegExp(`ERROR .*device\\.lua:${ctx.script.line(tag)}:`), mark, opts);
}

// finish(t, ctx, name): stop the script, wait for every seq, SIGTERM: exit 0, nothing lost
async function finish(t, ctx, name) {
  const last = await stopSeqs(ctx.agent, ctx.script, 8000);
  const r = await waitDelivered(ctx.server, last, ms(20000));
  ctx.agent.signal('SIGTERM');
  const { code, signal } = await ctx.agent.waitExit(15000);
  report(t, name, last, r);
  assert.equal(code, 0, `tbagent did not shut down cleanly (signal ${signal}):\n${ctx.agent.log.tail(20)}`);
  return { last, ...r };
}

function report(t, name, last, r, extra = {}) {
  const fig = `FIGURES ${name}: sent=${last} received=${r.received} lost=${r.lost} duplicated=${r.duplicated} out_of_order=${r.outOfOrder}` +
    Object.entries(extra).map(([k, v]) => ` ${k}=${v}`).join('');
  t.diagnostic(fig);
  console.log(fig);
  assert.equal(r.lost, 0, `${r.lost} of ${last} seqs never arrived: ${r.missing.slice(0, 20).join(',')}${r.lost > 20 ? ',...' : ''}`);
  assert.equal(r.outOfOrder, 0, `${r.outOfOrder} seqs arrived for the first time after a later one`);
  assert.equal(r.extra, 0, 'seqs above the last one the script sent');
}

// timed(promise) -> [value, ms it took]
async function timed(p) {
  const t0 = Date.now();
  const v = await p;
  return [v, Date.now() - t0];
}

function memory(pid) {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(s)[1]) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

// resetPeak(pid) -> true when VmHWM could be reset to the current RSS (Linux clear_refs 5)
function resetPeak(pid) {
  try { fs.writeFileSync(`/proc/${pid}/clear_refs`, '5'); return true; } catch { return false; }
}

const mb = (n) => `${(n / MiB).toFixed(0)} MiB`;

// ------------------------------------------------------------------------------------------
// the phases; each leaves the agent running and responsive

async function errorsEverywhere(t, ctx) {
  const { server, script } = ctx;
  // on_connect raised at the first connect; the second on_connect handler still ran
  await errorAt(ctx, 'connect-error', 0);
  assert.match(ctx.agent.log.text(), /connect boom 1/);
  await ctx.agent.waitForLog(/ONCONNECT the second handler ran \(1\)/, 5000);

  // on_rpc: answered {"error": ...}, logged at the failing line with the caller in the traceback
  let mark = ctx.agent.mark();
  let r = await server.rpc('crash', {});
  assert.ok(r.json && typeof r.json.error === 'string', r.text);
  assert.match(r.json.error, /field/);
  const at = await errorAt(ctx, 'rpc-error', mark);
  assert.match(ctx.agent.log.lines.slice(at, at + 30).join('\n'), new RegExp(`device\\.lua:${script.line('rpc-caller')}`),
    'the traceback shows the caller');

  // odd error objects: a table, one whose __tostring raises, a 1 MiB message
  for (const method of ['errTable', 'errToString']) {
    mark = ctx.agent.mark();
    r = await server.rpc(method, null, { timeout: 8000 });
    assert.ok(r.json && r.json.error !== undefined, `${method}: ${r.text}`);
    await ctx.agent.waitForLog(/ERROR .*RPC err/, 5000, mark);
  }
  await t.test('an RPC handler raising a 1 MiB message is answered (the error cut to fit)', async () => {
    const m = ctx.agent.mark();
    const rr = await server.rpc('errHuge', null, { timeout: 3000 });
    assert.ok(rr.json && typeof rr.json.error === 'string', rr.text.slice(0, 200));
    await ctx.agent.waitForLog(/ERROR .*RPC errHuge failed/, 5000, m);
  });
  assert.ok(ctx.agent.running());

  // on_attributes
  mark = ctx.agent.mark();
  await server.pushAttributes({ boom: true });
  await errorAt(ctx, 'attr-error', mark);
  await server.pushAttributes({ fine: 1 });
  await ctx.agent.waitForLog(/ATTR fine 1/, 5000, mark);

  // tb.after and tb.every: an every timer keeps running after errors in its runs
  mark = ctx.agent.mark();
  assert.equal((await server.rpc('armAfter')).text, 'true');
  await errorAt(ctx, 'after-error', mark);
  assert.equal((await server.rpc('armEvery')).text, 'true');
  await errorAt(ctx, 'every-error', mark);
  await ctx.agent.waitForLog(/EVERY ran again after 2 errors/, 5000, mark);

  // tb.firmware accept(): the update ends FAILED naming the line; the agent goes on
  mark = ctx.agent.mark();
  const from = server.mark();
  await server.pushAttributes({ fw_title: 'misbehave', fw_version: '9.9', fw_size: 4, fw_checksum_algorithm: 'SHA256',
    fw_checksum: '88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589' });
  const re = new RegExp(`accept\\(\\) raised: .*device\\.lua:${script.line('accept-error')}: accept boom 9\\.9`);
  const failed = await server.waitFor(T, (m) => /"fw_state":"FAILED"/.test(m.text), 8000, from);
  assert.match(failed.json.values.fw_error, re);
  await logged(ctx, re, mark, { traceback: false });
  await t.test('an error in firmware accept() is logged as an error with a traceback', async () => {
    // as any error in the script's code: "<what> failed: <file:line: message>", then the traceback
    const at = `device\\.lua:${script.line('accept-error')}: accept boom 9\\.9`;
    await logged(ctx, new RegExp(`ERROR .*firmware accept\\(\\) failed: .*${at}`), mark, { n: 1000 });
  });

  // on_disconnect (and on_connect again): the broker restarts
  mark = ctx.agent.mark();
  await ctx.broker.stop('SIGTERM');
  await ctx.agent.waitForLog(/connection lost/, 8000, mark);
  await errorAt(ctx, 'disconnect-error', mark);
  await ctx.agent.waitForLog(/ONDISCONNECT the second handler ran/, 5000, mark);
  await delay(ms(300));
  await ctx.broker.start();
  ctx.server = await ctx.w.reconnectServer(ctx.server, ctx.broker);
  await ctx.agent.waitForLog(/session ready/, 10000, mark);
  await errorAt(ctx, 'connect-error', mark);
  await ctx.agent.waitForLog(/ONCONNECT the second handler ran \(2\)/, 5000, mark);
  await alive(ctx);
}

async function recursion(t, ctx) {
  const { server } = ctx;
  for (const [method, tag, param, re] of [
    ['recurse', 'recurse', null, /stack overflow/],
    ['deep', 'deep', 10000000, /stack overflow/],
    ['cstack', 'cstack', null, /stack overflow/],
  ]) {
    const mark = ctx.agent.mark();
    const [r, took] = await timed(server.rpc(method, param, { timeout: 15000 }));
    assert.ok(r.json && typeof r.json.error === 'string', `${method}: ${r.text}`);
    assert.match(r.json.error, re, method);
    // Lua names the line of a Lua stack overflow, not of a C one: the traceback does
    const at = await logged(ctx, new RegExp(`ERROR RPC ${method} failed: .*stack overflow`), mark);
    assert.match(ctx.agent.log.lines.slice(at, at + 30).join('\n'), new RegExp(`device\\.lua:${ctx.script.line(tag)}:`), method);
    t.diagnostic(`${method}: answered in ${took} ms: ${r.json.error.slice(0, 80)}`);
    await alive(ctx);
  }
  let mark = ctx.agent.mark();
  assert.equal((await server.rpc('armRecurseTimer')).text, 'true');
  await errorAt(ctx, 'timer-recurse', mark);
  mark = ctx.agent.mark();
  await server.pushAttributes({ recurse: true });
  await errorAt(ctx, 'attr-recurse', mark);
  await alive(ctx);
}

async function infiniteLoops(t, ctx) {
  const { server } = ctx;
  const cut = /ERROR .*ran \d+ ms without yielding \(budget \d+ ms\): cut off/;
  const inBudget = (took, what) => {
    assert.ok(took >= ctx.budget * 0.9, `${what} answered after ${took} ms, before the ${ctx.budget} ms budget`);
    assert.ok(took < ctx.budget + ms(3000), `${what} cut off only after ${took} ms (budget ${ctx.budget} ms)`);
  };
  for (const [method, tag] of [['spin', 'spin'], ['tailSpin', 'tail-spin']]) {
    const mark = ctx.agent.mark();
    // the ping queued behind the runaway is answered as soon as it is cut off
    const spin = timed(server.rpc(method, null, { timeout: 10000 }));
    const ping = await server.rpc('ping', null, { timeout: 10000 });
    assert.equal(ping.text, '"pong"');
    const [r, took] = await spin;
    assert.ok(r.json && typeof r.json.error === 'string', r.text);
    assert.match(r.json.error, /cut off/);
    inBudget(took, method);
    await errorAt(ctx, tag, mark);
    assert.ok(ctx.agent.log.find(cut, mark), 'the log says the handler was cut off');
  }

  // a loop that catches the cut-off with pcall and spins again, and loops inside coroutines the
  // script made itself (one of them catching the cut-off in coroutine.resume) are stopped too
  for (const method of ['spinPcall', 'spinInCoroutine', 'spinInCoroutineCaught']) {
    const mark = ctx.agent.mark();
    const [r, took] = await timed(server.rpc(method, null, { timeout: 10000 }));
    assert.ok(r.json && typeof r.json.error === 'string', `${method}: ${r.text}`);
    assert.match(r.json.error, /cut off/, method);
    inBudget(took, method);
    await ctx.agent.waitForLog(cut, 5000, mark);
    assert.equal((await server.rpc('ping')).text, '"pong"');
  }

  // timers and an attribute handler
  let mark = ctx.agent.mark();
  assert.equal((await server.rpc('armSpinTimers', null, { timeout: 10000 })).text, 'true');
  await errorAt(ctx, 'after-spin', mark, { n: 10000 });
  await errorAt(ctx, 'every-spin', mark, { n: 10000 });
  await ctx.agent.waitForLog(/EVERYSPIN ran again \(run 2\)/, 10000, mark);
  assert.ok(ctx.agent.log.count(cut, mark) >= 2);
  mark = ctx.agent.mark();
  await server.pushAttributes({ spin: true });
  await errorAt(ctx, 'attr-spin', mark, { n: 10000 });
  await alive(ctx);
}

async function hugeTelemetry(t, ctx) {
  const { server, agent } = ctx;
  const from = server.mark();
  const limit = SCALE > 1 ? 1024 * MiB : 200 * MiB;   // ASan's shadow and quarantine cost more
  const overhead = 64 * MiB;
  const peaks = [];
  const refuse = async (build, param, send, re, name) => {
    if (build) {
      const b = await server.rpc(build, param, { timeout: 60000 });
      assert.ok(typeof b.json === 'number', `${build}: ${b.text}`);
    }
    const canReset = resetPeak(agent.pid);
    const before = memory(agent.pid);
    const [r, took] = await timed(server.rpc(send, null, { timeout: 60000 }));
    const after = memory(agent.pid);
    assert.ok(agent.running(), `the agent is gone:\n${agent.log.tail(20)}`);
    assert.ok(r.json && r.json.ok === false, `${name}: ${r.text.slice(0, 300)}`);
    assert.equal(typeof r.json.err, 'string', `${name}: nil, err expected: ${r.text.slice(0, 300)}`);
    assert.match(r.json.err, re, name);
    const extra = canReset ? after.peak - before.rss : NaN;
    peaks.push({ name, extra, peak: after.peak, took });
    t.diagnostic(`${name}: refused in ${took} ms: ${r.json.err}; RSS ${mb(before.rss)} before, peak ${mb(after.peak)} (+${mb(extra)})`);
    await alive(ctx);
  };
  const dropped = async () => {
    await server.rpc('drop', null, { timeout: 30000 });
    const { rss } = memory(agent.pid);
    assert.ok(rss < limit, `RSS ${mb(rss)} after the script let go of its data (limit ${mb(limit)})`);
  };

  // a table of 4 million keys: as the telemetry table itself (an array: refused at once), as
  // one value, as one value with a timestamp and as an attribute
  await refuse('buildArray', 4000000, 'sendHold', /.+/, '4M-key array as the telemetry table');
  await refuse(null, null, 'sendHoldAsValue', /too large/, '4M-key array as a telemetry value');
  await refuse(null, null, 'sendHoldWithTs', /too large/, '4M-key array as a value, with ts');
  await refuse(null, null, 'sendHoldAsAttribute', /too large/, '4M-key array as an attribute');
  await dropped();
  // a 100 MiB string
  await refuse('buildString', 100 * MiB, 'sendHoldAsValue', /too large/, '100 MiB string as telemetry');
  await refuse(null, null, 'sendHoldAsAttribute', /too large/, '100 MiB string as an attribute');
  await dropped();
  // an object of 200 000 keys
  await refuse('buildKeys', 200000, 'sendHold', /too large/, '200k-key object as telemetry');
  await dropped();
  // 100 000 levels deep, and a cycle
  for (const [method, param] of [['sendDeep', 100000], ['sendCycle', null]]) {
    const r = await server.rpc(method, param, { timeout: 30000 });
    assert.equal(r.json.ok, false, r.text);
    assert.match(r.json.err, /nesting too deep/, method);
  }
  await alive(ctx);
  // nothing of it was published
  assert.ok(!server.all(T, from).some((m) => m.payload.length > 65536), 'an oversize message was published');
  assert.ok(!server.all(T, from).some((m) => /"big"|"k1"|"x":/.test(m.text.slice(0, 100))));

  await t.test('refusing huge telemetry costs little memory beyond what the script holds', () => {
    const worst = peaks.filter((p) => Number.isFinite(p.extra)).sort((a, b) => b.extra - a.extra)[0];
    assert.ok(!worst || worst.extra < overhead, `${worst && worst.name}: peak RSS +${mb(worst.extra)} over what the script held (limit ${mb(overhead)})`);
  });
  await t.test('refusing huge telemetry is quick (not cut off by the handler budget)', () => {
    for (const p of peaks) assert.ok(p.took < ctx.budget + ms(5000), `${p.name} took ${p.took} ms`);
  });
}

// ------------------------------------------------------------------------------------------

// tests 1-4: one kind of misbehaviour each, on its own rig, then finish()
for (const [name, misbehave, figures, budget] of [
  ['errors in every kind of handler are logged with file:line and a traceback; the agent keeps running, nothing lost',
    errorsEverywhere, 'misbehave-errors'],
  ['recursion without end (Lua and C stack overflow) is caught and logged; the agent stays up, nothing lost',
    recursion, 'misbehave-recursion', RECURSION_BUDGET],
  ['infinite loops in handlers and timers are cut off after --handler-budget; the agent stays responsive, nothing lost',
    infiniteLoops, 'misbehave-loops'],
  ['huge telemetry (4M keys, 100 MiB, 100 000 levels) is refused with nil, err; memory stays bounded, nothing lost',
    hugeTelemetry, 'misbehave-huge'],
]) {
  test(name, async (t) => {
    const ctx = await rig(t, budget);
    await misbehave(t, ctx);
    await finish(t, ctx, figures);
  });
}

test('all of it in one run, then SIGTERM with a backlog and a restart on the same --state-dir: every accepted seq arrives, in order', async (t) => {
  const ctx = await rig(t, RECURSION_BUDGET);
  await errorsEverywhere(t, ctx);
  await recursion(t, ctx);
  await infiniteLoops(t, ctx);
  await hugeTelemetry(t, ctx);
  await alive(ctx);

  // the broker goes away; the script keeps sending into the outbox; SIGTERM
  let mark = ctx.agent.mark();
  await ctx.broker.stop('SIGTERM');
  await ctx.agent.waitForLog(/connection lost/, 8000, mark);
  const offlineFrom = ctx.script.accepted();
  const deadline = Date.now() + ms(10000);
  while (ctx.script.accepted() < offlineFrom + 50) {
    assert.ok(Date.now() < deadline, 'the script must keep sending while offline');
    await delay(20);
  }
  ctx.agent.signal('SIGTERM');
  const first = await ctx.agent.waitExit(15000);
  assert.equal(first.code, 0, `the first run did not exit cleanly:\n${ctx.agent.log.tail(20)}`);
  const acceptedFirst = ctx.script.accepted();
  const backlog = acceptedFirst - offlineFrom;

  // the broker is back; the agent restarts on the same state dir and sends the backlog first
  await ctx.broker.start();
  ctx.server = await ctx.w.reconnectServer(ctx.server, ctx.broker);
  ctx.agent = await ctx.w.agentReady(ctx.file, { dir: ctx.dir, broker: ctx.broker, args: BASE_ARGS, name: 'tbagent#2' });
  assert.ok(ctx.agent.args.includes(ctx.stateDir));
  await ctx.agent.waitForLog(new RegExp(`SEQ starting after ${acceptedFirst}\\b`), 5000);
  const kept = ctx.agent.log.find(/outbox: (\d+) records kept from before the restart/);
  assert.ok(kept, `the restarted agent found no backlog in its outbox:\n${ctx.agent.log.tail(20)}`);
  assert.ok(!ctx.agent.log.find(/outbox on disk (failed|unusable)|outbox commit failed|corrupt|malformed/i),
    `outbox trouble:\n${ctx.agent.log.tail(20)}`);
  // every seq the first run accepted arrives, then the second run's own
  let r = await waitDelivered(ctx.server, acceptedFirst, ms(20000));
  assert.equal(r.lost, 0, `after the restart ${r.lost} of the first run's ${acceptedFirst} seqs are missing: ${r.missing.slice(0, 20).join(',')}`);
  await flowing(ctx, 20);
  assert.equal((await ctx.server.rpc('ping')).text, '"pong"');
  const last = await stopSeqs(ctx.agent, ctx.script, 8000);
  r = await waitDelivered(ctx.server, last, ms(20000));
  ctx.agent.signal('SIGTERM');
  const second = await ctx.agent.waitExit(15000);
  report(t, 'misbehave-all-then-restart', last, r, { accepted_first_run: acceptedFirst, offline_backlog: backlog,
    kept_at_restart: /(\d+) records kept/.exec(kept.line)[1] });
  assert.equal(second.code, 0, `the second run did not exit cleanly:\n${ctx.agent.log.tail(20)}`);
});
