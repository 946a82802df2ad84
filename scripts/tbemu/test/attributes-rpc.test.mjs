// Attribute requests, shared attribute pushes, server-side and client-side RPC (§4.4-4.7)
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { startEmu, connect, subscribe, publish, end, waitFor, waitMsg, sleep } from './helpers.mjs'

let emu
before(async () => {
  emu = await startEmu(['--device', 'a1:A1', '--device', 'a2:A2', '--device', 'r1:R1', '--device', 'c1:C1',
    '--set', 'rpcMinTimeoutMs=300', '--set', 'clientRpcTimeoutMs=400', '--client-rpc', 'getTime={"time":"2020-06-18T09:16:59Z"}'])
})
after(async () => { assert.equal(await emu.stop(), 0) })

const auth = { 'X-Authorization': 'Bearer whatever' }

test('login and device lookup like ThingsBoard', async () => {
  const l = await emu.api('POST', '/api/auth/login', { username: 'tenant@thingsboard.org', password: 'tenant' })
  assert.equal(l.status, 200)
  assert.ok(l.json.token && l.json.refreshToken)
  const d = await emu.api('GET', '/api/tenant/devices?deviceName=a1', undefined, auth)
  assert.equal(d.json.id.entityType, 'DEVICE')
  assert.match(d.json.id.id, /^[0-9a-f-]{36}$/)
  assert.equal(d.json.name, 'a1')
  assert.equal((await emu.api('GET', '/api/tenant/devices?deviceName=nope')).status, 404)
})

test('attribute requests: comma strings, {} for all, sections only when found, {} when nothing', async () => {
  const id = await emu.deviceId('a1')
  const c = await connect(emu, { username: 'A1' })
  await publish(c, 'v1/devices/me/attributes', '{"attribute1":"value1","attribute2":true,"d":2.0}')
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { shared1: 'value1', shared2: 42 })
  await subscribe(c, 'v1/devices/me/attributes/response/+')
  const ask = async (n, body) => { await publish(c, 'v1/devices/me/attributes/request/' + n, body); return JSON.parse((await waitMsg(c, 'v1/devices/me/attributes/response/' + n)).text) }
  assert.deepEqual(await ask(1, '{"clientKeys":"attribute1,attribute2", "sharedKeys":"shared1,shared2"}'),
    { client: { attribute1: 'value1', attribute2: true }, shared: { shared1: 'value1', shared2: 42 } })
  assert.deepEqual(await ask(2, '{}'), { client: { attribute1: 'value1', attribute2: true, d: 2 }, shared: { shared1: 'value1', shared2: 42 } })
  assert.deepEqual(await ask(3, '{"sharedKeys":"shared2,missing"}'), { shared: { shared2: 42 } })
  assert.deepEqual(await ask(4, '{"clientKeys":"nope"}'), {})
  assert.deepEqual(await ask(5, '{"clientKeys":["attribute1"]}'), { client: { attribute1: 'value1' } })
  assert.deepEqual(await ask(6, '{"clientKeys":" attribute1"}'), {}) // keys are not trimmed
  await publish(c, 'v1/devices/me/attributes/request/7', '{"clientKeys":"d"}')
  assert.equal((await waitMsg(c, 'v1/devices/me/attributes/response/7')).text, '{"client":{"d":2.0}}')
  await end(c)
})

test('shared attribute pushes: updates, then a separate deleted push; only own device', async () => {
  const id = await emu.deviceId('a2')
  const c = await connect(emu, { username: 'A2' })
  const other = await connect(emu, { username: 'A1' })
  await subscribe(c, 'v1/devices/me/attributes')
  await subscribe(other, 'v1/devices/me/attributes')
  const r = await emu.api('POST', `/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, '{"mode":"on","level":3,"ratio":1.0}', auth)
  assert.equal(r.status, 200)
  const m = await waitMsg(c, 'v1/devices/me/attributes')
  assert.equal(m.text, '{"mode":"on","level":3,"ratio":1.0}')
  assert.equal(m.qos, 1)
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/SHARED_SCOPE`, { extra: 'x' }) // legacy path
  await waitFor(() => c.received.length === 2, { what: 'second push' })
  const del = await emu.api('DELETE', `/api/plugins/telemetry/DEVICE/${id}/SHARED_SCOPE?keys=mode,level`)
  assert.equal(del.status, 200)
  await waitFor(() => c.received.length === 3, { what: 'deleted push' })
  assert.equal(c.received[2].text, '{"deleted":["mode","level"]}')
  const shared = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/attributes/SHARED_SCOPE`)
  assert.deepEqual(shared.map(a => a.key).sort(), ['extra', 'ratio'])
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SERVER_SCOPE`, { srv: 1 }) // never pushed
  await sleep(150)
  assert.equal(c.received.length, 3)
  assert.equal(other.received.length, 0)
  await end(c); await end(other)
})

test('server-side RPC: ids from 0, two-way echo, one-way, 408, 406', async () => {
  const id = await emu.deviceId('r1')
  const c = await connect(emu, { username: 'R1' })
  await subscribe(c, 'v1/devices/me/rpc/request/+')
  c.on('message', (topic, payload) => {
    const n = topic.split('/').pop()
    const req = JSON.parse(payload)
    if (req.method === 'echo') c.publish('v1/devices/me/rpc/response/' + n, payload)
    if (req.method === 'bad') c.publish('v1/devices/me/rpc/response/' + n, 'not json')
  })
  const r0 = await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, '{"method":"echo","params":{"a":1.0},"timeout":2000}', auth)
  assert.equal(r0.status, 200)
  assert.equal(r0.text, '{"method":"echo","params":{"a":1.0}}')
  assert.equal(c.received[0].topic, 'v1/devices/me/rpc/request/0')
  const r1 = await emu.api('POST', `/api/plugins/rpc/oneway/${id}`, { method: 'setSpValue', params: 14.5 })
  assert.equal(r1.status, 200)
  assert.equal(c.received[1].topic, 'v1/devices/me/rpc/request/1')
  assert.equal(c.received[1].text, '{"method":"setSpValue","params":14.5}')
  const r2 = await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'silent', params: {}, timeout: 100 })
  assert.equal(r2.status, 408)
  const r3 = await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'bad', params: null })
  assert.equal(r3.status, 406)
  await end(c)
})

test('server-side RPC: 409 when not subscribed; pending request pushed on subscribe', async () => {
  const id = await emu.deviceId('r1')
  assert.equal((await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'x', params: {}, timeout: 300 })).status, 409)
  const pending = emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'late', params: { v: 1 }, timeout: 3000 })
  await sleep(100)
  const c = await connect(emu, { username: 'R1' })
  c.on('message', (topic) => c.publish(topic.replace('request', 'response'), '{"ok":true}'))
  await subscribe(c, 'v1/devices/me/rpc/request/+')
  const r = await pending
  assert.equal(r.status, 200)
  assert.deepEqual(r.json, { ok: true })
  await end(c)
})

test('client-side RPC: configured reply, timeout error, getSessionLimits', async () => {
  const c = await connect(emu, { username: 'C1' })
  await subscribe(c, 'v1/devices/me/rpc/response/+')
  await publish(c, 'v1/devices/me/rpc/request/1', '{"method":"getTime","params":{}}')
  assert.deepEqual(JSON.parse((await waitMsg(c, 'v1/devices/me/rpc/response/1')).text), { time: '2020-06-18T09:16:59Z' })
  const t0 = Date.now()
  await publish(c, 'v1/devices/me/rpc/request/2', '{"method":"unknownMethod"}')
  assert.equal((await waitMsg(c, 'v1/devices/me/rpc/response/2')).text, '{"error":"timeout"}')
  assert.ok(Date.now() - t0 >= 350)
  await publish(c, 'v1/devices/me/rpc/request/3', '{"method":"getSessionLimits","params":{}}')
  assert.deepEqual(JSON.parse((await waitMsg(c, 'v1/devices/me/rpc/response/3')).text),
    { maxPayloadSize: 65536, maxInflightMessages: 100, rateLimits: { messages: null, telemetryMessages: null, telemetryDataPoints: null } })
  await emu.post('/emu/session-limits', { maxPayloadSize: 8192, maxInflightMessages: 10, rateLimits: { messages: '20:1,600:60', telemetryMessages: '10:1', telemetryDataPoints: '100:1' } })
  await emu.post('/emu/devices/c1/client-rpc', { method: 'echo', echo: true })
  await publish(c, 'v1/devices/me/rpc/request/4', '{"method":"getSessionLimits"}')
  assert.equal(JSON.parse((await waitMsg(c, 'v1/devices/me/rpc/response/4')).text).rateLimits.messages, '20:1,600:60')
  await publish(c, 'v1/devices/me/rpc/request/5', '{"method":"echo","params":{"x":[1,2.0]}}')
  assert.equal((await waitMsg(c, 'v1/devices/me/rpc/response/5')).text, '{"x":[1,2.0]}')
  await end(c)
})

test('claiming: stored; a second claim does not replace the first', async () => {
  const c = await connect(emu, { username: 'C1' })
  await publish(c, 'v1/devices/me/claim', '{"secretKey":"value","durationMs":60000}')
  await publish(c, 'v1/devices/me/claim', '{"secretKey":"other","durationMs":1}')
  const d = await emu.get('/emu/devices/c1')
  assert.equal(d.claim.secretKey, 'value')
  assert.equal(d.claim.durationMs, 60000)
  await end(c)
})

test('provisioning: success once, then FAILURE; wrong secret NOT_FOUND', async () => {
  await emu.post('/emu/provision-profiles', { provisionDeviceKey: 'k1', provisionDeviceSecret: 's1' })
  const prov = async (body) => {
    const c = await connect(emu, { username: 'provision' })
    await subscribe(c, '/provision/response')
    await publish(c, '/provision/request', JSON.stringify(body))
    const m = await waitMsg(c, '/provision/response')
    await end(c)
    return JSON.parse(m.text)
  }
  const ok = await prov({ deviceName: 'newdev', provisionDeviceKey: 'k1', provisionDeviceSecret: 's1', token: 'NEWTOKEN' })
  assert.deepEqual(ok, { credentialsValue: 'NEWTOKEN', credentialsType: 'ACCESS_TOKEN', status: 'SUCCESS' })
  assert.deepEqual(await prov({ deviceName: 'newdev', provisionDeviceKey: 'k1', provisionDeviceSecret: 's1' }), { errorMsg: 'Failed to provision device!', status: 'FAILURE' })
  assert.deepEqual(await prov({ deviceName: 'x', provisionDeviceKey: 'k1', provisionDeviceSecret: 'bad' }), { errorMsg: 'Provision data was not found!', status: 'NOT_FOUND' })
  const basic = await prov({ deviceName: 'bdev', provisionDeviceKey: 'k1', provisionDeviceSecret: 's1', credentialsType: 'MQTT_BASIC', clientId: 'pc', username: 'pu', password: 'pp' })
  assert.deepEqual(basic.credentialsValue, { clientId: 'pc', userName: 'pu', password: 'pp' })
  const c = await connect(emu, { username: 'NEWTOKEN' })
  assert.equal(c.connack.returnCode, 0)
  await end(c)
})
