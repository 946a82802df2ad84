// CONNECT, credentials and sessions (docs/thingsboard.md §1, §0.8, §0.9)
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startEmu, connect, raw, subscribe, end, waitFor } from './helpers.mjs'

let emu
before(async () => {
  emu = await startEmu(['--device', 'tok1:TOKEN1', '--device-basic', 'b1:cid1:user1:pw1', '--device-basic', 'b2::user2:pw2', '--device-basic', 'b3:cid3::'])
})
after(async () => { assert.equal(await emu.stop(), 0) })

test('ready line and health', async () => {
  assert.equal(typeof emu.ready.mqtt, 'number')
  assert.deepEqual(Object.keys(emu.ready), ['ready', 'mqtt', 'http'])
  assert.equal((await emu.get('/emu/health')).ok, true)
})

test('access token connects with any client id and password', async () => {
  const c = await connect(emu, { username: 'TOKEN1', password: 'ignored', clientId: 'whatever' })
  assert.equal(c.connack.returnCode, 0)
  await waitFor(async () => (await emu.get('/emu/devices/tok1')).connected, { what: 'connected' })
  await end(c)
  await waitFor(async () => !(await emu.get('/emu/devices/tok1')).connected, { what: 'disconnected' })
})

test('CONNACK codes: wrong token 5, empty username 5, unknown client id 2, nothing 5', async () => {
  assert.equal((await raw(emu, { username: 'WRONG' })).connack.returnCode, 5)
  assert.equal((await raw(emu, { username: '' })).connack.returnCode, 5)
  assert.equal((await raw(emu, { clientId: 'nobody' })).connack.returnCode, 2)
  assert.equal((await raw(emu, { clientId: '' })).connack.returnCode, 5)
  assert.equal((await raw(emu, { username: 'user1', password: Buffer.from('bad'), clientId: 'cid1' })).connack.returnCode, 5)
})

test('MQTT basic credentials: clientId+username+password, username only, clientId only', async () => {
  assert.equal((await raw(emu, { clientId: 'cid1', username: 'user1', password: Buffer.from('pw1') })).connack.returnCode, 0)
  assert.equal((await raw(emu, { clientId: 'any', username: 'user2', password: Buffer.from('pw2') })).connack.returnCode, 0)
  assert.equal((await raw(emu, { clientId: 'cid3' })).connack.returnCode, 0)
})

test('one session per device: the newer connection closes the older', async () => {
  const a = await connect(emu, { username: 'TOKEN1' })
  let aClosed = false
  a.on('close', () => { aClosed = true })
  const b = await connect(emu, { username: 'TOKEN1' })
  await waitFor(() => aClosed, { what: 'old session closed' })
  assert.equal(b.connected, true)
  const ev = await emu.events('tok1')
  assert.ok(ev.some(e => e.type === 'closed' && e.reason === 'SESSION_TAKEN_OVER'))
  await end(a); await end(b)
})

test('cleanSession=0 gets sessionPresent=1 but subscriptions do not survive', async () => {
  const a = await connect(emu, { username: 'TOKEN1', clean: false, clientId: 'keep' })
  await subscribe(a, 'v1/devices/me/attributes')
  await end(a)
  const b = await connect(emu, { username: 'TOKEN1', clean: false, clientId: 'keep' })
  assert.equal(b.connack.sessionPresent, true)
  const id = await emu.deviceId('tok1')
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { x: 1 })
  await new Promise(resolve => setTimeout(resolve, 200))
  assert.equal(b.received.length, 0)
  const c = await connect(emu, { username: 'TOKEN1', clean: true })
  assert.equal(c.connack.sessionPresent, false)
  await end(b); await end(c)
})

test('subscriptions: unknown filter 0x80, QoS 2 granted as 1', async () => {
  const r = await raw(emu, { username: 'TOKEN1' })
  r.send({ cmd: 'subscribe', messageId: 7, subscriptions: [{ topic: 'v1/devices/me/attributes', qos: 2 }, { topic: 'some/other/topic', qos: 1 }, { topic: '#', qos: 0 }, { topic: 'v2/fw/response/+/chunk/+', qos: 0 }] })
  const suback = await r.wait(p => p.cmd === 'suback', 'suback')
  assert.deepEqual(suback.granted, [1, 128, 128, 0])
  r.sock.destroy()
})

test('emu disconnect endpoint drops the connection', async () => {
  const c = await connect(emu, { username: 'TOKEN1' })
  let closed = false
  c.on('close', () => { closed = true })
  const r = await emu.post('/emu/devices/tok1/disconnect', {})
  assert.equal(r.disconnected, true)
  await waitFor(() => closed, { what: 'close' })
})
