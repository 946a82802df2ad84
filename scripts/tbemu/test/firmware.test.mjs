// OTA packages over MQTT and HTTP (docs/thingsboard.md §7)
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import crypto from 'node:crypto'
import { startEmu, connect, subscribe, publish, end, waitFor, waitMsg, raw, sleep } from './helpers.mjs'
import { checksum } from '../lib/firmware.js'

let emu
const FW = crypto.randomBytes(2500)
before(async () => { emu = await startEmu(['--device', 'f1:F1', '--device', 'f2:F2', '--device', 'f3:F3', '--device', 'f4:F4']) })
after(async () => { assert.equal(await emu.stop(), 0) })

const upload = (q, body = FW) => emu.api('POST', '/emu/packages?' + new URLSearchParams(q), new Uint8Array(body))

test('checksums in Guava HashCode.toString encoding, all seven algorithms', () => {
  const s = Buffer.from('123456789')
  const fox = Buffer.from('The quick brown fox jumps over the lazy dog')
  assert.equal(checksum('CRC32', s), '2639f4cb') // 0xCBF43926 little-endian
  assert.equal(checksum('MURMUR3_32', fox), '23f74f2e') // 0x2e4ff723 little-endian
  assert.equal(checksum('MURMUR3_32', Buffer.from('hello')), '47fa8b24')
  assert.equal(checksum('MURMUR3_128', fox), '6c1b07bc7bbc4be347939ac4a93c437a') // h1 LE, h2 LE
  assert.equal(checksum('MURMUR3_128', Buffer.from('hello')), '029bbd41b3a7d8cb191dae486a901e5b')
  assert.equal(checksum('MD5', s), '25f9e794323b453885f5181f1b624d0b')
  assert.equal(checksum('SHA256', s), '15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225')
  assert.equal(checksum('SHA384', s).length, 96)
  assert.equal(checksum('SHA512', s).length, 128)
  // odd tails (1..15 bytes past a 16-byte block) go through every switch branch
  for (let n = 0; n < 40; n++) assert.equal(checksum('MURMUR3_128', Buffer.alloc(n, 7)).length, 32)
})

test('assign sets fw_* shared attributes (one push), then a separate deleted push', async () => {
  const r = await upload({ title: 'TA652FC-W-TB', version: '1.6.8', checksumAlgorithm: 'MD5' })
  assert.equal(r.status, 200)
  const pkg = r.json
  assert.equal(pkg.checksum, crypto.createHash('md5').update(FW).digest('hex'))
  const c = await connect(emu, { username: 'F1' })
  await subscribe(c, 'v1/devices/me/attributes')
  await emu.post('/emu/devices/f1/assign', { packageId: pkg.id })
  await waitFor(() => c.received.length >= 2, { what: 'two pushes' })
  assert.deepEqual(JSON.parse(c.received[0].text), { fw_title: 'TA652FC-W-TB', fw_version: '1.6.8', fw_tag: 'TA652FC-W-TB 1.6.8', fw_size: 2500, fw_checksum_algorithm: 'MD5', fw_checksum: pkg.checksum })
  assert.deepEqual(JSON.parse(c.received[1].text), { deleted: ['fw_url'] })
  const d = await emu.get('/emu/devices/f1')
  assert.equal(d.ota.FIRMWARE.state, 'INITIATED')
  assert.equal(d.latest.target_fw_version.value, '1.6.8')
  await emu.post('/emu/devices/f1/unassign', { type: 'FIRMWARE' })
  await waitFor(() => c.received.length >= 3, { what: 'unassign push' })
  assert.deepEqual(JSON.parse(c.received[2].text).deleted.sort(), ['fw_checksum', 'fw_checksum_algorithm', 'fw_size', 'fw_state', 'fw_tag', 'fw_title', 'fw_ts', 'fw_url', 'fw_version'])
  await emu.post('/emu/devices/f1/assign', { packageId: pkg.id })
  await end(c)
})

test('chunks: size per reqId, short last chunk, empty chunk past the end, size 0 = whole file', async () => {
  const c = await connect(emu, { username: 'F1' })
  await subscribe(c, 'v2/fw/response/+/chunk/+')
  const got = async (topic, n) => (await waitMsg(c, m => m.topic === topic && c.received.indexOf(m) >= n)).payload
  let n = c.received.length
  await publish(c, 'v2/fw/request/1/chunk/0', '1024')
  assert.deepEqual(await got('v2/fw/response/1/chunk/0', n), FW.subarray(0, 1024))
  n = c.received.length
  await publish(c, 'v2/fw/request/1/chunk/2', '') // empty payload: remembered size
  assert.deepEqual(await got('v2/fw/response/1/chunk/2', n), FW.subarray(2048))
  n = c.received.length
  await publish(c, 'v2/fw/request/1/chunk/3', '0')
  assert.equal((await got('v2/fw/response/1/chunk/3', n)).length, 0)
  n = c.received.length
  await publish(c, 'v2/fw/request/2/chunk/0', '')
  assert.deepEqual(await got('v2/fw/response/2/chunk/0', n), FW)
  n = c.received.length
  await publish(c, 'v2/fw/request/3/chunk/0', '65536')
  assert.deepEqual(await got('v2/fw/response/3/chunk/0', n), FW)
  const log = await emu.messages('f1', '?dir=down&topic=v2/fw/response/')
  assert.ok(log.every(e => e.payload === null && e.size >= 0))
  await end(c)
})

test('PAYLOAD_TOO_LARGE then disconnect (PUBACK first)', async () => {
  const x = await raw(emu, { username: 'F1' })
  x.send({ cmd: 'publish', topic: 'v2/fw/request/9/chunk/0', qos: 1, messageId: 2, payload: '65537' })
  await x.waitClosed()
  const i = x.packets.findIndex(p => p.cmd === 'puback')
  const j = x.packets.findIndex(p => p.cmd === 'publish' && p.topic === 'v2/fw/error')
  assert.ok(i >= 0 && j > i)
  assert.equal(x.packets[j].payload.toString(), 'PAYLOAD_TOO_LARGE')
})

test('NOT_FOUND without an assignment; non-numeric size closes without PUBACK', async () => {
  const x = await raw(emu, { username: 'F2' })
  x.send({ cmd: 'publish', topic: 'v2/fw/request/1/chunk/0', qos: 1, messageId: 2, payload: '512' })
  await x.waitClosed()
  assert.equal(x.packets.find(p => p.cmd === 'publish').payload.toString(), 'NOT_FOUND')
  const y = await raw(emu, { username: 'F2' })
  y.send({ cmd: 'publish', topic: 'v2/fw/request/1/chunk/0', qos: 1, messageId: 2, payload: 'abc' })
  await y.waitClosed()
  assert.equal(y.packets.filter(p => p.cmd === 'puback').length, 0)
})

test('reqId is bound to its package; cache expiry gives empty chunks until a new reqId', async () => {
  const v2 = Buffer.alloc(3000, 0x42)
  const p2 = (await upload({ title: 'fw', version: '2.0', checksumAlgorithm: 'CRC32' }, v2)).json
  const p1 = (await upload({ title: 'fw', version: '1.0' })).json
  await emu.post('/emu/devices/f3/assign', { packageId: p1.id })
  const c = await connect(emu, { username: 'F3' })
  const chunk = async (topic, size) => { const n = c.received.length; await publish(c, topic.replace('response', 'request'), size); return (await waitMsg(c, m => m.topic === topic && c.received.indexOf(m) >= n)).payload }
  assert.deepEqual(await chunk('v2/fw/response/5/chunk/0', '100'), FW.subarray(0, 100))
  await emu.post('/emu/devices/f3/assign', { packageId: p2.id })
  assert.deepEqual(await chunk('v2/fw/response/5/chunk/1', '100'), FW.subarray(100, 200)) // old package
  assert.deepEqual(await chunk('v2/fw/response/6/chunk/0', '100'), v2.subarray(0, 100))
  await emu.post('/emu/devices/f3/ota-cache-expire', {})
  assert.equal((await chunk('v2/fw/response/6/chunk/1', '100')).length, 0)
  assert.deepEqual(await chunk('v2/fw/response/7/chunk/1', '100'), v2.subarray(100, 200))
  await end(c)
})

test('software packages on v2/sw; errors still on v2/fw/error', async () => {
  const sw = (await upload({ title: 'app', version: '3', type: 'sw', checksumAlgorithm: 'MURMUR3_128' }, Buffer.from('software!'))).json
  assert.equal(sw.type, 'SOFTWARE')
  await emu.post('/emu/devices/f4/assign', { packageId: sw.id })
  const c = await connect(emu, { username: 'F4' })
  await publish(c, 'v2/sw/request/1/chunk/0', '0')
  assert.equal((await waitMsg(c, 'v2/sw/response/1/chunk/0')).text, 'software!')
  const d = await emu.get('/emu/devices/f4')
  assert.equal(d.attributes.SHARED_SCOPE.sw_checksum.value, checksum('MURMUR3_128', Buffer.from('software!')))
  await end(c)
  const x = await raw(emu, { username: 'F4' })
  x.send({ cmd: 'publish', topic: 'v2/fw/request/1/chunk/0', qos: 1, messageId: 1, payload: '10' })
  await x.waitClosed()
  assert.equal(x.packets.find(p => p.cmd === 'publish').topic, 'v2/fw/error')
})

test('URL package: fw_url set, MQTT chunks give FAILURE, HTTP Range and cut transfers', async () => {
  const p = (await upload({ title: 'urlfw', version: '9', url: 'self', checksumAlgorithm: 'SHA256' })).json
  assert.match(p.url, /^http:\/\/127\.0\.0\.1:\d+\/emu\/files\//)
  const c = await connect(emu, { username: 'F2' })
  await subscribe(c, 'v1/devices/me/attributes')
  await emu.post('/emu/devices/f2/assign', { packageId: p.id })
  await waitFor(() => c.received.length >= 1, { what: 'push' })
  const attrs = JSON.parse(c.received[0].text)
  assert.equal(attrs.fw_url, p.url)
  assert.equal(attrs.fw_size, 2500)
  await publish(c, 'v2/fw/request/1/chunk/0', '100')
  assert.equal((await waitMsg(c, 'v2/fw/error')).text, 'FAILURE')
  const full = await fetch(p.url)
  assert.equal(full.status, 200)
  assert.deepEqual(Buffer.from(await full.arrayBuffer()), FW)
  const part = await fetch(p.url, { headers: { Range: 'bytes=1000-' } })
  assert.equal(part.status, 206)
  assert.equal(part.headers.get('content-range'), 'bytes 1000-2499/2500')
  assert.deepEqual(Buffer.from(await part.arrayBuffer()), FW.subarray(1000))
  assert.equal((await fetch(p.url, { headers: { Range: 'bytes=5000-' } })).status, 416)
  await emu.post('/emu/faults', { urlCut: { afterBytes: 700, times: 1 } })
  await assert.rejects(async () => { const r = await fetch(p.url); await r.arrayBuffer() })
  const again = await fetch(p.url, { headers: { Range: 'bytes=700-' } })
  assert.deepEqual(Buffer.from(await again.arrayBuffer()), FW.subarray(700))
  await end(c)
})

test('device firmware progress shows in the device summary', async () => {
  const c = await connect(emu, { username: 'F1' })
  for (const st of ['DOWNLOADING', 'DOWNLOADED', 'VERIFIED', 'UPDATING', 'UPDATED']) {
    await publish(c, 'v1/devices/me/telemetry', JSON.stringify({ current_fw_title: 'TA652FC-W-TB', current_fw_version: st === 'UPDATED' ? '1.6.8' : '1.6.6', fw_state: st }))
    await sleep(2)
  }
  const d = await emu.get('/emu/devices/f1')
  assert.equal(d.ota.FIRMWARE.state, 'UPDATED')
  assert.equal(d.ota.FIRMWARE.currentVersion, '1.6.8')
  await end(c)
})
