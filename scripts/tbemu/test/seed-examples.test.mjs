// The ThingsBoard MQTT Device API document's examples, run unchanged against tbemu
// (fixtures/README.md says how they were extracted).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, execFile } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import { startEmu, waitFor, HERE } from './helpers.mjs'

const run = promisify(execFile)
const FIX = path.join(HERE, 'fixtures')
let emu, bin

before(async () => {
  emu = await startEmu(['--device', 'seed-tel:TOKEN_TEL', '--device', 'seed-attr:TOKEN_ATTR', '--device', 'seed-rpc:TOKEN_RPC', '--device', 'seed-crpc:TOKEN_CRPC', '--device', 'seed-sub:TOKEN_SUB',
    '--client-rpc', 'getTime={"utcDateime":"2020-06-18T09:16:59Z"}'])
  // mosquitto_pub on PATH that adds tbemu's port to the document's unchanged command lines
  bin = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-bin-'))
  fs.writeFileSync(path.join(bin, 'mosquitto_pub'), `#!/bin/sh\nexec /usr/bin/mosquitto_pub "$@" -p ${emu.mqttPort}\n`, { mode: 0o755 })
})
after(async () => { fs.rmSync(bin, { recursive: true, force: true }); assert.equal(await emu.stop(), 0) })

const env = (extra) => ({ ...process.env, PATH: `${bin}:${process.env.PATH}`, TBEMU_MQTT_PORT: String(emu.mqttPort), ...extra })

test('mosquitto_pub with -p PORT: object, array and {ts, values} telemetry files', async () => {
  for (const f of ['telemetry-data-as-object.json', 'telemetry-data-as-array.json', 'telemetry-data-with-ts.json']) {
    const { stdout } = await run('mosquitto_pub', ['-d', '-h', '127.0.0.1', '-p', String(emu.mqttPort), '-t', 'v1/devices/me/telemetry', '-u', 'TOKEN_TEL', '-f', path.join(FIX, f)])
    assert.match(stdout, /received CONNACK \(0\)/)
  }
  const id = await emu.deviceId('seed-tel')
  const v = await waitFor(async () => {
    const r = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=stringKey,booleanKey,doubleKey,longKey,jsonKey,key1,key2&startTs=0&endTs=${Date.now() + 1000}&useStrictDataTypes=true`)
    return r.key2 && r.longKey && r.longKey.length === 2 ? r : null
  }, { what: 'telemetry stored' })
  assert.deepEqual(v.key1.map(x => x.value), ['value1'])
  assert.deepEqual(v.key2.map(x => x.value), [true])
  assert.equal(v.longKey[1].ts, 1451649600512) // oldest last (DESC)
  assert.deepEqual(v.jsonKey[0].value, { someNumber: 42, someArray: [1, 2, 3], someNestedObject: { key: 'value' } })
  const types = (await emu.get('/emu/devices/seed-tel')).latest
  assert.deepEqual([types.doubleKey.type, types.longKey.type, types.stringKey.type, types.booleanKey.type, types.jsonKey.type], ['DOUBLE', 'LONG', 'STRING', 'BOOLEAN', 'JSON'])
  const log = await emu.messages('seed-tel', '?dir=up')
  assert.equal(log.length, 3)
})

test('mosquitto-telemetry.sh and mosquitto-attributes-publish.sh, unchanged', async () => {
  await run('sh', [path.join(FIX, 'mosquitto-telemetry.sh')], { cwd: FIX, env: env({ ACCESS_TOKEN: 'TOKEN_ATTR' }) })
  await run('sh', [path.join(FIX, 'mosquitto-attributes-publish.sh')], { cwd: FIX, env: env({ ACCESS_TOKEN: 'TOKEN_ATTR' }) })
  await waitFor(async () => (await emu.messages('seed-attr', '?dir=up')).length === 4, { what: '4 messages' })
  const id = await emu.deviceId('seed-attr')
  const attrs = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/attributes/CLIENT_SCOPE`)
  assert.deepEqual(attrs.map(a => a.key).sort(), ['booleanKey', 'doubleKey', 'jsonKey', 'longKey', 'stringKey'])
  const r = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/attributes/CLIENT_SCOPE?keys=doubleKey`)
  assert.match(r.text, /"value":42\.0/)
})

test('mqtt-js-attributes-request.js (MQTT.js, unchanged) gets client and shared attributes', async () => {
  const id = await emu.deviceId('seed-attr')
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { shared1: 'value1' })
  await run('mosquitto_pub', ['-h', '127.0.0.1', '-t', 'v1/devices/me/attributes', '-u', 'TOKEN_ATTR', '-m', '{"attribute1":"value1","attribute2":"value2"}'], { env: env() })
  const { stdout } = await run(process.execPath, ['-r', './port-shim.cjs', 'mqtt-js-attributes-request.js'], { cwd: FIX, env: env({ TOKEN: 'TOKEN_ATTR' }), timeout: 10000 })
  assert.match(stdout, /^connected$/m)
  assert.match(stdout, /^response\.topic: v1\/devices\/me\/attributes\/response\/1$/m)
  const body = JSON.parse(/^response\.body: (.*)$/m.exec(stdout)[1])
  assert.deepEqual(body, { client: { attribute1: 'value1', attribute2: 'value2' }, shared: { shared1: 'value1' } })
})

function spawnScript (script, token) {
  const p = spawn(process.execPath, ['-r', './port-shim.cjs', script], { cwd: FIX, env: env({ TOKEN: token }) })
  p.out = ''
  p.stdout.on('data', d => { p.out += d })
  p.stderr.on('data', d => { p.out += d })
  return p
}

test('mqtt-js-rpc-from-server.js (echo service) answers a REST two-way RPC', async () => {
  const p = spawnScript('mqtt-js-rpc-from-server.js', 'TOKEN_RPC')
  try {
    await waitFor(() => /connected/.test(p.out), { what: 'script connected' })
    await waitFor(async () => (await emu.events('seed-rpc')).some(e => e.type === 'subscribed'), { what: 'rpc subscription' })
    const id = await emu.deviceId('seed-rpc')
    const r = await emu.api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'remoteOTA', params: 'http://192.168.xx.xxx/abc.bin', timeout: 5000 })
    assert.equal(r.status, 200)
    assert.deepEqual(r.json, { method: 'remoteOTA', params: 'http://192.168.xx.xxx/abc.bin' })
    assert.match(p.out, /request\.topic: v1\/devices\/me\/rpc\/request\/0/)
  } finally { process.kill(p.pid, 'SIGTERM') }
})

test('mqtt-js-rpc-from-client.js gets the configured getTime reply', async () => {
  const p = spawnScript('mqtt-js-rpc-from-client.js', 'TOKEN_CRPC')
  try {
    await waitFor(() => /response\.body/.test(p.out), { what: 'client RPC response' })
    assert.match(p.out, /response\.topic: v1\/devices\/me\/rpc\/response\/1/)
    assert.match(p.out, /response\.body: \{"utcDateime":"2020-06-18T09:16:59Z"\}/)
  } finally { process.kill(p.pid, 'SIGTERM') }
})

test('mosquitto_sub attribute subscription example receives a shared attribute update', async () => {
  const p = spawn('stdbuf', ['-oL', 'mosquitto_sub', '-d', '-h', '127.0.0.1', '-p', String(emu.mqttPort), '-t', 'v1/devices/me/attributes', '-u', 'TOKEN_SUB'])
  p.out = ''
  p.stdout.on('data', d => { p.out += d })
  try {
    await waitFor(async () => (await emu.events('seed-sub')).some(e => e.type === 'subscribed'), { what: 'subscription' })
    const id = await emu.deviceId('seed-sub')
    await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { key1: 'value1' })
    await waitFor(() => p.out.includes('{"key1":"value1"}'), { what: 'update printed' })
  } finally { process.kill(p.pid, 'SIGTERM') }
})
