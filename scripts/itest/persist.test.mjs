// tb.persist on the real binary: values kept in the state directory's SQLite survive a clean
// restart and a kill -9; a timer's write is on disk with the telemetry it sent in the same
// run (no telemetry the server saw is ahead of what the restarted agent reads back).
import test from 'node:test';
import assert from 'node:assert/strict';
import { world, tmpdir, writeScript } from './lib.mjs';

const SCRIPT = `
tb.on_rpc("inc", function()
  local n = tb.persist.get("n", 0) + 1
  assert(tb.persist.set("n", n))
  return n
end)
tb.on_rpc("get", function() return {n = tb.persist.get("n", 0), ticks = tb.persist.get("ticks", 0)} end)
tb.on_rpc("tick", function(on) tb.state.ticking = on return true end)
tb.every(20, function()
  if not tb.state.ticking then return end
  local t = tb.persist.get("ticks", 0) + 1
  tb.persist.set("ticks", t)
  tb.send_telemetry{tick = t}
end)
`;

test('tb.persist survives a clean restart and a kill -9; a timer\'s write is on disk with what it sent', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const dir = tmpdir('tbitest-persist-');
  const file = writeScript(dir, SCRIPT);
  let agent = await w.agentReady(file, { dir, broker });
  for (let i = 1; i <= 3; i++) assert.equal((await server.rpc('inc')).json, i);
  agent.signal('SIGTERM');
  assert.equal((await agent.waitExit()).code, 0);

  agent = await w.agentReady(file, { dir, broker });
  assert.deepEqual((await server.rpc('get')).json, { n: 3, ticks: 0 }, 'after a clean restart');
  assert.equal((await server.rpc('inc')).json, 4);
  agent.signal('SIGKILL');              // the answer 4 was sent: the value was on disk before it
  await agent.exited;

  agent = await w.agentReady(file, { dir, broker });
  assert.deepEqual((await server.rpc('get')).json, { n: 4, ticks: 0 }, 'after a kill -9');
  const from = server.mark();
  await server.rpc('tick', true);
  await server.waitCount('v1/devices/me/telemetry', 20, 5000, from);
  agent.signal('SIGKILL');
  await agent.exited;
  const seen = Math.max(...server.all('v1/devices/me/telemetry', from).map((m) => (m.json.values || m.json).tick));

  agent = await w.agentReady(file, { dir, broker });
  const kept = (await server.rpc('get')).json.ticks;
  assert.ok(kept >= seen, `the server saw tick ${seen}, but only ${kept} was kept on disk`);
  assert.equal(agent.log.count(/tb\.persist/), 0, agent.log.text());
});

test('tb.persist is on disk under --memory-outbox too', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const server = await w.server(broker);
  const dir = tmpdir('tbitest-persist-mem-');
  const file = writeScript(dir, SCRIPT);
  let agent = await w.agentReady(file, { dir, broker, args: ['--memory-outbox'] });
  assert.equal((await server.rpc('inc')).json, 1);
  assert.equal((await server.rpc('inc')).json, 2);
  agent.signal('SIGKILL');
  await agent.exited;
  agent = await w.agentReady(file, { dir, broker, args: ['--memory-outbox'] });
  assert.equal((await server.rpc('get')).json.n, 2);
});
