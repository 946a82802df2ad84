// The REST paths behind the page's controls, each checked on the wire with an MQTT client:
// deleting a shared attribute, unassigning a package, client-RPC rules (device, global,
// getCurrentTime, delay, a rule added while a request waits), the message log, the download's
// progress, packages (the same upload twice, delete), and tbemu's log line for a client RPC.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startEmu, connect, subscribe, publish, end, waitFor, waitMsg, sleep } from './helpers.mjs'

let emu
before(async () => { emu = await startEmu(['--device', 'k1:K1', '--device', 'k2:K2', '--set', 'clientRpcTimeoutMs=3000']) })
after(async () => { assert.equal(await emu.stop(), 0) })

async function device (token, ...topics) {
  const c = await connect(emu, { username: token })
  for (const t of topics) await subscribe(c, t)
  return c
}

test('DELETE .../SHARED_SCOPE?keys= reaches the device as {"deleted":[..]}; POST /emu/devices/{name}/unassign deletes every fw_* key', async () => {
  const id = await emu.deviceId('k1')
  const c = await device('K1', 'v1/devices/me/attributes')
  try {
    await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { a: 1, b: 'two' })
    await waitMsg(c, m => m.text === '{"a":1,"b":"two"}', 'attribute push')
    const r = await emu.api('DELETE', `/api/plugins/telemetry/DEVICE/${id}/SHARED_SCOPE?keys=a`)
    assert.equal(r.status, 200)
    await waitMsg(c, m => m.text === '{"deleted":["a"]}', 'deletion push')
    assert.deepEqual(Object.keys((await emu.get('/emu/devices/k1')).attributes.SHARED_SCOPE), ['b'])

    const pkg = (await emu.api('POST', '/emu/packages?title=ctl&version=1', new Uint8Array(100))).json
    await emu.post('/emu/devices/k1/assign', { packageId: pkg.id })
    await waitMsg(c, m => m.text.includes('"fw_title":"ctl"'), 'fw attributes')
    const busy = await emu.api('DELETE', '/emu/packages/' + pkg.id)
    assert.equal(busy.status, 400, 'an assigned package cannot be deleted')
    assert.match(busy.json.message, /assigned to k1/)
    const n = c.received.length
    const s = await emu.post('/emu/devices/k1/unassign', { type: 'FIRMWARE' })
    assert.equal(s.ota.FIRMWARE.packageId, null)
    const del = await waitFor(() => c.received.slice(n).find(m => m.text.startsWith('{"deleted":')), { what: 'fw deletion' })
    assert.deepEqual(JSON.parse(del.text).deleted.sort(), ['fw_checksum', 'fw_checksum_algorithm', 'fw_size', 'fw_state', 'fw_tag', 'fw_title', 'fw_ts', 'fw_url', 'fw_version'])
    assert.equal((await emu.api('DELETE', '/emu/packages/' + pkg.id)).status, 200)
    assert.equal((await emu.api('GET', '/emu/packages/' + pkg.id)).status, 404)
  } finally { await end(c) }
})

test('client-side RPC rules: per device and global, getCurrentTime, delay; a rule added while a request waits answers it; deleting a rule brings the timeout back', async () => {
  const c = await device('K2', 'v1/devices/me/rpc/response/+')
  const ask = async (id, method) => {
    await publish(c, `v1/devices/me/rpc/request/${id}`, JSON.stringify({ method, params: { n: id } }))
    return (await waitMsg(c, `v1/devices/me/rpc/response/${id}`, `answer to ${id}`)).text
  }
  try {
    await emu.post('/emu/devices/k2/client-rpc', { method: 'getCurrentTime', currentTime: true })
    const t0 = Date.now()
    const now = Number(await ask(1, 'getCurrentTime'))
    assert.ok(now >= t0 - 5 && now <= Date.now(), `current time ${now}`)

    await emu.post('/emu/client-rpc', '{"method":"cfg","response":{"v":2.0}}')
    assert.equal(await ask(2, 'cfg'), '{"v":2.0}')
    await emu.post('/emu/devices/k2/client-rpc', { method: 'cfg', responseText: '"mine"', delayMs: 300 })
    const t1 = Date.now()
    assert.equal(await ask(3, 'cfg'), '"mine"', 'the device\'s own rule comes first')
    assert.ok(Date.now() - t1 >= 280, 'after the delay')

    // no rule: the request waits; the page lists it; a rule added now answers it
    await publish(c, 'v1/devices/me/rpc/request/4', '{"method":"later","params":{}}')
    await waitFor(async () => (await emu.get('/emu/devices/k2/client-rpc')).requests.some(r => r.id === 4 && r.status === 'waiting'), { what: 'waiting request' })
    await sleep(200)
    assert.equal(c.received.find(m => m.topic === 'v1/devices/me/rpc/response/4'), undefined)
    await emu.post('/emu/devices/k2/client-rpc', { method: 'later', response: 'now' })
    assert.equal((await waitMsg(c, 'v1/devices/me/rpc/response/4')).text, '"now"')
    const st = await emu.get('/emu/devices/k2/client-rpc')
    const r4 = st.requests.find(r => r.id === 4)
    assert.deepEqual([r4.method, r4.status, r4.by, r4.response], ['later', 'answered', 'device rule', '"now"'])
    assert.deepEqual(st.rules.map(r => [r.method, r.scope]).sort(), [['cfg', 'device'], ['getCurrentTime', 'device'], ['later', 'device']],
      'the global cfg rule is hidden by the device\'s own')

    assert.equal((await emu.api('DELETE', '/emu/devices/k2/client-rpc/later')).status, 200)
    assert.equal((await emu.api('DELETE', '/emu/devices/k2/client-rpc/later')).status, 404)
    assert.equal((await emu.api('DELETE', '/emu/client-rpc/cfg')).status, 200)
    const t2 = Date.now()
    assert.equal(await ask(5, 'later'), '{"error":"timeout"}')
    assert.ok(Date.now() - t2 >= 2800, 'after clientRpcTimeoutMs')
    assert.equal((await emu.get('/emu/devices/k2/client-rpc')).requests.find(r => r.id === 5).status, 'timed out')
    // tbemu's log names the method and whether a rule answered it
    assert.match(emu.stderr, /device k2: client RPC getCurrentTime \(id 1\): answered by device rule: current time \(ms\)/)
    assert.match(emu.stderr, /device k2: client RPC cfg \(id 2\): answered by global rule: \{"v":2\.0\}/)
    assert.match(emu.stderr, /device k2: client RPC later \(id 5\): no rule answers it/)
    assert.match(emu.stderr, /device k2: client RPC later \(id 5\): unanswered, \{"error":"timeout"\} sent/)
  } finally { await end(c) }
})

test('GET /emu/devices/{name}/log: CONNECT and SUBSCRIBE, an RPC both ways with its method, a firmware download as one entry; ?kind= filters; progress in the summary', async () => {
  await emu.api('DELETE', '/emu/devices/k1/log')
  const c = await device('K1', 'v1/devices/me/attributes', 'v1/devices/me/rpc/request/+', 'v2/fw/response/+/chunk/+')
  c.on('message', (topic) => { if (topic.startsWith('v1/devices/me/rpc/request/')) c.publish(topic.replace('request', 'response'), '{"pong":1.50}') })
  try {
    const id = await emu.deviceId('k1')
    const r = await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'ping', params: { a: 1 } })
    assert.equal(r.text, '{"pong":1.50}')
    const pkg = (await emu.api('POST', '/emu/packages?title=prog&version=1', new Uint8Array(5000))).json
    await emu.post('/emu/devices/k1/assign', { packageId: pkg.id })
    for (let i = 0; i < 3; i++) {
      await publish(c, `v2/fw/request/9/chunk/${i}`, '1000')
      await waitMsg(c, `v2/fw/response/9/chunk/${i}`)
    }
    const prog = await waitFor(async () => { const p = (await emu.get('/emu/devices/k1')).ota.FIRMWARE.progress; return p && p.chunks === 3 && p }, { what: 'progress' })
    assert.deepEqual([prog.bytes, prog.size, prog.percent], [3000, 5000, 60])

    const log = await emu.get('/emu/devices/k1/log')
    const find = (kind, dir, topic) => log.find(e => e.kind === kind && e.dir === dir && (topic instanceof RegExp ? topic.test(e.topic) : e.topic === topic))
    assert.ok(find('session', 'up', 'CONNECT'))
    assert.equal(find('session', 'up', 'SUBSCRIBE v1/devices/me/rpc/request/+').note, 'granted QoS 1')
    const req = find('rpc', 'down', /^v1\/devices\/me\/rpc\/request\/\d+$/)
    assert.equal(req.note, 'method ping')
    assert.equal(req.payload, '{"method":"ping","params":{"a":1}}')
    const res = find('rpc', 'up', /^v1\/devices\/me\/rpc\/response\/\d+$/)
    assert.equal(res.payload, '{"pong":1.50}')
    assert.equal(res.size, 13)
    const fw = log.filter(e => e.kind === 'firmware' && e.topic === 'v2/fw/request/9/chunk/*')
    assert.equal(fw.length, 1, 'one entry for the whole download')
    assert.equal(fw[0].size, 3000)
    assert.ok(log.some(e => e.kind === 'attributes' && e.dir === 'down' && e.payload.includes('"fw_title":"prog"')))
    assert.deepEqual([...new Set((await emu.get('/emu/devices/k1/log?kind=rpc')).map(e => e.kind))], ['rpc'])
    assert.equal((await emu.api('GET', '/emu/devices/k1/log?kind=nope')).status, 400)
    const after = await emu.get(`/emu/devices/k1/log?since=${Math.max(...log.map(e => e.seq))}`)
    assert.deepEqual(after, [])
    await emu.post('/emu/devices/k1/unassign', { type: 'FIRMWARE' })
  } finally { await end(c) }
})

test('the same package uploaded twice is one package; POST /emu/devices adds a device with 201', async () => {
  const a = (await emu.api('POST', '/emu/packages?title=twice&version=1', new Uint8Array([1, 2, 3]))).json
  const b = (await emu.api('POST', '/emu/packages?title=twice&version=1', new Uint8Array([1, 2, 3]))).json
  const other = (await emu.api('POST', '/emu/packages?title=twice&version=1', new Uint8Array([1, 2, 4]))).json
  assert.equal(a.id, b.id)
  assert.notEqual(a.id, other.id)
  const r = await emu.api('POST', '/emu/devices', { name: 'fresh', token: 'FRESH' })
  assert.equal(r.status, 201)
  assert.equal(r.json.credentials.credentialsId, 'FRESH')
  assert.equal((await emu.api('POST', '/emu/devices', { name: 'fresh', token: 'X' })).status, 409)
})

test('the message log of a provisioned device starts with its provisioning request and answer; a claim is kind claim', async () => {
  await emu.post('/emu/provision-profiles', { provisionDeviceKey: 'pk', provisionDeviceSecret: 'ps' })
  const p = await connect(emu, { username: 'provision' })
  await subscribe(p, '/provision/response')
  await publish(p, '/provision/request', '{"deviceName":"made","provisionDeviceKey":"pk","provisionDeviceSecret":"ps","token":"MADE"}')
  await waitMsg(p, '/provision/response')
  await end(p)
  const c = await device('MADE')
  await publish(c, 'v1/devices/me/claim', '{"secretKey":"s","durationMs":60000}')
  await end(c)
  const log = await waitFor(async () => { const l = await emu.get('/emu/devices/made/log'); return l.some(e => e.kind === 'claim') && l }, { what: 'claim entry' })
  assert.deepEqual(log.filter(e => e.kind === 'provision').map(e => [e.dir, e.topic, e.note]), [['up', '/provision/request', undefined], ['down', '/provision/response', 'SUCCESS']])
  assert.equal(JSON.parse(log.find(e => e.dir === 'down' && e.kind === 'provision').payload).credentialsValue, 'MADE')
  assert.equal(log.find(e => e.kind === 'claim').payload, '{"secretKey":"s","durationMs":60000}')
})
