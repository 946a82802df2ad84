// Telemetry, client attributes, value typing and the transport's hard edges (§2, §4.1-4.3, §9)
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startEmu, connect, raw, publish, end, waitFor, sleep } from './helpers.mjs'

let emu, id
before(async () => {
  emu = await startEmu(['--device', 't1:T1', '--device', 't2:T2'])
  id = await emu.deviceId('t1')
})
after(async () => { assert.equal(await emu.stop(), 0) })

const ts = (q) => emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/timeseries?${q}`)

test('three telemetry forms; ts in ms; history query', async () => {
  const c = await connect(emu, { username: 'T1' })
  const t0 = Date.now()
  await publish(c, 'v1/devices/me/telemetry', '{"a":1,"b":"x"}')
  await publish(c, 'v1/devices/me/telemetry', '[{"c":true},{"ts":1451649600512,"values":{"a":2}}]')
  await publish(c, 'v1/devices/me/telemetry', '{"ts":1451649600000,"values":{"a":3}}')
  await publish(c, 'v1/devices/me/telemetry', '{"ts":1451649600000,"temp":5}') // both keys needed for the ts form
  const latest = await ts('keys=a,b,c,ts,temp')
  assert.equal(latest.a[0].value, '1')
  assert.ok(latest.a[0].ts >= t0)
  assert.equal(latest.b[0].value, 'x')
  assert.equal(latest.c[0].value, 'true')
  assert.equal(latest.ts[0].value, '1451649600000')
  assert.equal(latest.temp[0].value, '5')
  const hist = await ts('keys=a&startTs=0&endTs=1451649601000&orderBy=ASC')
  assert.deepEqual(hist.a, [{ ts: 1451649600000, value: '3' }, { ts: 1451649600512, value: '2' }])
  await end(c)
})

test('value typing: long vs double by text, strings, big numbers, JSON, null skipped', async () => {
  const c = await connect(emu, { username: 'T1' })
  await publish(c, 'v1/devices/me/telemetry', '{"l":42,"d":42.0,"e":4.2E1,"f":1.5e0,"neg":-7,"big":12345678901234567890,' +
    '"prec":0.12345678901234567,"s":"0123","sd":"-3.5","se":"1e5","bool":false,"j":{"n":42.0,"a":[1,2]},"nul":null,"txt":"hello"}')
  const strict = await ts('keys=l,d,e,f,neg,big,prec,s,sd,se,bool,j,nul,txt&useStrictDataTypes=true')
  const v = Object.fromEntries(Object.entries(strict).map(([k, x]) => [k, x[0].value]))
  assert.deepEqual(v, { l: 42, d: 42, e: 42, f: 1.5, neg: -7, big: '12345678901234567890', prec: '0.12345678901234567', s: 123, sd: -3.5, se: '1e5', bool: false, j: { n: 42, a: [1, 2] }, txt: 'hello' })
  // the raw text keeps 42.0 as a double
  const r = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=l,d,j&useStrictDataTypes=true`)
  assert.match(r.text, /"l":\[\{"ts":\d+,"value":42\}\]/)
  assert.match(r.text, /"d":\[\{"ts":\d+,"value":42\.0\}\]/)
  assert.match(r.text, /"j":\[\{"ts":\d+,"value":\{"n":42\.0,"a":\[1,2\]\}\}\]/)
  const loose = await ts('keys=d,l,bool')
  assert.deepEqual([loose.d[0].value, loose.l[0].value, loose.bool[0].value], ['42.0', '42', 'false'])
  const types = (await emu.get('/emu/devices/t1')).latest
  assert.deepEqual([types.l.type, types.d.type, types.e.type, types.f.type, types.big.type, types.s.type, types.j.type], ['LONG', 'DOUBLE', 'LONG', 'DOUBLE', 'STRING', 'LONG', 'JSON'])
  assert.equal(types.nul, undefined)
  await end(c)
})

test('client attributes are stored in CLIENT_SCOPE; arrays close the connection', async () => {
  const c = await connect(emu, { username: 'T1' })
  await publish(c, 'v1/devices/me/attributes', '{"fw":"v1.0","n":3.0,"ver":"1.0"}')
  const attrs = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/attributes/CLIENT_SCOPE?keys=fw,n,ver`)
  // a parsable string such as "1.0" becomes a number, as on the server
  assert.deepEqual(attrs.map(a => [a.key, a.value]).sort(), [['fw', 'v1.0'], ['n', 3], ['ver', 1]])
  assert.ok(attrs[0].lastUpdateTs > 0)
  const r = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/attributes/CLIENT_SCOPE?keys=n`)
  assert.match(r.text, /"value":3\.0/)
  await end(c)
  const x = await raw(emu, { username: 'T1' })
  x.send({ cmd: 'publish', topic: 'v1/devices/me/attributes', qos: 1, messageId: 5, payload: '[{"a":1}]' })
  await x.waitClosed()
  assert.equal(x.packets.filter(p => p.cmd === 'puback').length, 0)
})

for (const [name, topic, payload] of [
  ['invalid JSON', 'v1/devices/me/telemetry', '{"a":'],
  ['empty payload', 'v1/devices/me/telemetry', ''],
  ['a number', 'v1/devices/me/telemetry', '42'],
  ['array of non-objects', 'v1/devices/me/telemetry', '[1,2]'],
  ['attribute request with a 2-element array', 'v1/devices/me/attributes/request/1', '{"clientKeys":["a","b"]}'],
  ['client RPC without method', 'v1/devices/me/rpc/request/1', '{"params":{}}'],
  ['client RPC with a non-int id', 'v1/devices/me/rpc/request/abc', '{"method":"x"}']
]) {
  test(`bad payload closes the connection without PUBACK: ${name}`, async () => {
    const x = await raw(emu, { username: 'T1' })
    x.send({ cmd: 'publish', topic, qos: 1, messageId: 9, payload })
    await x.waitClosed()
    assert.equal(x.packets.filter(p => p.cmd === 'puback').length, 0)
  })
}

test('unknown topic: PUBACK, dropped, connection kept', async () => {
  const x = await raw(emu, { username: 'T1' })
  x.send({ cmd: 'publish', topic: 'v1/devices/me/whatever', qos: 1, messageId: 3, payload: 'x' })
  await x.wait(p => p.cmd === 'puback' && p.messageId === 3, 'puback')
  x.send({ cmd: 'pingreq' })
  await x.wait(p => p.cmd === 'pingresp', 'pingresp')
  assert.equal(x.closed, false)
  x.sock.destroy()
})

test('QoS 2 publish is answered with PUBACK, never PUBREC', async () => {
  const x = await raw(emu, { username: 'T1' })
  x.send({ cmd: 'publish', topic: 'v1/devices/me/telemetry', qos: 2, messageId: 11, payload: '{"q2":1}' })
  await x.wait(p => p.cmd === 'puback' && p.messageId === 11, 'puback')
  await sleep(100)
  assert.equal(x.packets.filter(p => p.cmd === 'pubrec').length, 0)
  assert.equal((await ts('keys=q2')).q2[0].value, '1')
  x.sock.destroy()
})

test('gateway topic from a non-gateway device: no PUBACK, connection kept', async () => {
  const x = await raw(emu, { username: 'T1' })
  x.send({ cmd: 'publish', topic: 'v1/gateway/telemetry', qos: 1, messageId: 4, payload: '{}' })
  x.send({ cmd: 'pingreq' })
  await x.wait(p => p.cmd === 'pingresp', 'pingresp')
  await sleep(50)
  assert.equal(x.packets.filter(p => p.cmd === 'puback').length, 0)
  assert.equal(x.closed, false)
  x.sock.destroy()
})

test('packet over 64 KiB closes the connection; 64 KiB itself is fine', async () => {
  const ok = await raw(emu, { username: 'T1' })
  const topic = 'v1/devices/me/whatever' // remaining length = 2 + topic + 2 (id) + payload
  ok.send({ cmd: 'publish', topic, qos: 1, messageId: 1, payload: Buffer.alloc(65536 - 4 - topic.length, 0x20) })
  await ok.wait(p => p.cmd === 'puback', 'puback')
  ok.sock.destroy()
  const big = await raw(emu, { username: 'T1' })
  big.send({ cmd: 'publish', topic, qos: 1, messageId: 1, payload: Buffer.alloc(65537 - 4 - topic.length, 0x20) })
  await big.waitClosed()
  assert.equal(big.packets.filter(p => p.cmd === 'puback').length, 0)
})

test('a device sees only its own messages; message log records order and server time', async () => {
  const a = await connect(emu, { username: 'T1' })
  const b = await connect(emu, { username: 'T2' })
  await new Promise(resolve => b.subscribe('v1/devices/me/attributes', { qos: 1 }, resolve))
  await publish(a, 'v1/devices/me/attributes', '{"mine":1}')
  await publish(a, 'v1/devices/me/telemetry', '{"seq":1}')
  await publish(a, 'v1/devices/me/telemetry', '{"seq":2}')
  await sleep(100)
  assert.equal(b.received.length, 0)
  const log = await emu.messages('t1', '?dir=up&topic=v1/devices/me/telemetry')
  const last = log.slice(-2)
  assert.deepEqual(last.map(m => m.payload), ['{"seq":1}', '{"seq":2}'])
  assert.ok(last[0].seq < last[1].seq && last[0].ts <= last[1].ts)
  assert.equal(last[0].qos, 1)
  assert.equal((await emu.messages('t2', '?dir=up')).length, 0)
  await end(a); await end(b)
})

test('pause holds PUBACKs until resume', async () => {
  const c = await connect(emu, { username: 'T2' })
  await emu.post('/emu/pause', {})
  let acked = false
  c.publish('v1/devices/me/telemetry', '{"p":1}', { qos: 1 }, () => { acked = true })
  await sleep(200)
  assert.equal(acked, false)
  await emu.post('/emu/resume', {})
  await waitFor(() => acked, { what: 'puback after resume' })
  await end(c)
})
