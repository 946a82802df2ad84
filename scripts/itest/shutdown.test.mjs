// Item 11: SIGTERM/SIGINT deliver in-flight QoS 1 messages, disconnect cleanly, exit 0.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { world } from './lib.mjs';

const T = 'v1/devices/me/telemetry';

// The script signals itself right after queueing a burst, so the signal is handled while
// the burst is still in flight (nothing has been acknowledged yet).
const BURST = (n, sig) => `
local tb = require "tb"
tb.on_connect(function()
  tb.after(200, function()
    for i = 1, ${n} do assert(tb.send_telemetry({seq = i})) end
    tb.log.info("BURST queued")
    os.execute("kill -${sig} $PPID")
  end)
end)
`;

for (const sig of ['TERM', 'INT']) {
  test(`SIG${sig}: in-flight QoS 1 messages are delivered, clean disconnect, exit 0`, async (t) => {
    const w = world(t);
    const broker = await w.broker();
    const server = await w.server(broker);
    const agent = await w.agent(BURST(300, sig), { broker });
    const { code, signal } = await agent.waitExit(15000);
    assert.equal(signal, null);
    assert.equal(code, 0, agent.log.text());
    assert.ok(agent.log.find(/BURST queued/));
    const msgs = await server.waitCount(T, 300, 5000);
    assert.deepEqual(msgs.map((m) => (m.json.values ?? m.json).seq), Array.from({ length: 300 }, (_, i) => i + 1));
    // mosquitto says "disconnected." for a DISCONNECT packet, "closed its connection" otherwise
    const id = /as (auto-\S+)/.exec(broker.log.find(/New client connected .*u'test-token'/).line)[1];
    await broker.log.waitFor(new RegExp(`Client ${id} (disconnected|closed)`), 3000);
    assert.ok(broker.log.find(new RegExp(`Client ${id} disconnected\\.$`)), `no clean DISCONNECT:\n${broker.log.tail(10)}`);
  });
}

test('SIGTERM while offline exits 0 promptly', async (t) => {
  const w = world(t);
  const broker = await w.broker();
  const agent = await w.agent('local tb = require "tb"\ntb.every(50, function() tb.send_telemetry({x = 1}) end)\n', { broker });
  await agent.waitForLog(/connected to/, 5000);
  await broker.stop();
  await agent.waitForLog(/reconnecting in/, 5000);
  agent.signal('SIGTERM');
  const { code } = await agent.waitExit(5000);
  assert.equal(code, 0, agent.log.text());
});

test('SIGTERM when the server never acknowledges: exit 0 within the shutdown deadline', async (t) => {
  const w = world(t);
  const fake = await w.fake(0);   // CONNACK 0, then silence: no SUBACK, no PUBACK
  const agent = await w.agent('local tb = require "tb"\n', { port: fake.port, args: ['--shutdown-timeout', '1000', '--no-session-limits'] });
  await agent.waitForLog(/connected to/, 5000);
  const t0 = Date.now();
  agent.signal('SIGTERM');
  const { code } = await agent.waitExit(8000);
  assert.equal(code, 0, agent.log.text());
  assert.ok(Date.now() - t0 < 6000, `took ${Date.now() - t0} ms`);
});
