// The store and its data dir in-process: telemetry kept with ThingsBoard's timestamps and types,
// the append-only journal (a torn last line, compaction), what state.json keeps, the message
// log's kinds and firmware summaries, client-RPC rule bodies.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { Store } from '../lib/store.js'
import { MessageLog, kindOf } from '../lib/msglog.js'
import { parseRule } from '../lib/clientrpc.js'
import { parse, toKv, kvString, kvJson } from '../lib/typedjson.js'

const kvs = (json) => [...parse(json)].map(([k, v]) => [k, toKv(v)])
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-store-'))
const history = (dev, key) => dev.telemetry.get(key).map(p => [p.ts, p.kv.type, kvString(p.kv)])

test('telemetry history keeps each point\'s ts and type across a reopen: 3.0 stays a DOUBLE "3.0", big longs keep their digits', () => {
  const dir = tmp()
  try {
    let s = new Store({ dataDir: dir })
    const d = s.createDevice({ name: 'a', token: 'A' })
    s.saveTelemetry(d, 1000, kvs('{"t":3.0,"n":9007199254740993,"b":true,"s":"on","j":{"x":[1,2.0]}}'))
    s.saveTelemetry(d, 3000, kvs('{"t":4}'))
    s.saveTelemetry(d, 2000, kvs('{"t":3.5}')) // out of order: kept in ts order
    s.saveTelemetry(d, 3000, kvs('{"t":5}')) // same key and ts: overwritten
    s.close()
    s = new Store({ dataDir: dir })
    const r = s.byName('a')
    assert.equal(r.id, d.id)
    assert.deepEqual(history(r, 't'), [[1000, 'DOUBLE', '3.0'], [2000, 'DOUBLE', '3.5'], [3000, 'LONG', '5']])
    assert.deepEqual(history(r, 'n'), [[1000, 'LONG', '9007199254740993']])
    assert.deepEqual(history(r, 'b'), [[1000, 'BOOLEAN', 'true']])
    assert.deepEqual(history(r, 's'), [[1000, 'STRING', 'on']])
    assert.equal(kvJson(r.telemetry.get('j')[0].kv), '{"x":[1,2.0]}')
    s.close()
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('the journal is append-only; a torn last line (a killed write) is skipped, the lines before it kept', () => {
  const dir = tmp()
  try {
    let s = new Store({ dataDir: dir })
    const d = s.createDevice({ name: 'a', token: 'A' })
    for (let i = 0; i < 5; i++) s.saveTelemetry(d, 1000 + i, kvs(`{"v":${i}}`))
    const journal = path.join(dir, 'telemetry.jsonl')
    assert.equal(fs.readFileSync(journal, 'utf8').trim().split('\n').length, 5)
    s.close()
    fs.appendFileSync(journal, `{"d":"${d.id}","ts":9999,"kv":[["v","LO`)
    s = new Store({ dataDir: dir })
    assert.deepEqual(s.byName('a').telemetry.get('v').map(p => p.kv.value), ['0', '1', '2', '3', '4'])
    s.saveTelemetry(s.byName('a'), 2000, kvs('{"v":5}')) // appended after the torn line: still read
    s.close()
    s = new Store({ dataDir: dir })
    assert.deepEqual(s.byName('a').telemetry.get('v').map(p => p.kv.value), ['0', '1', '2', '3', '4', '5'])
    s.close()
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('historyLimit drops the oldest points; a journal far longer than the history it replays is compacted, a deleted device\'s lines go', () => {
  const dir = tmp()
  try {
    let s = new Store({ dataDir: dir, historyLimit: 100 })
    const keep = s.createDevice({ name: 'keep', token: 'K' })
    const gone = s.createDevice({ name: 'gone', token: 'G' })
    for (let i = 0; i < 22000; i++) s.saveTelemetry(keep, i, kvs(`{"v":${i}}`))
    s.saveTelemetry(gone, 1, kvs('{"v":1}'))
    assert.equal(keep.telemetry.get('v').length <= 105, true)
    assert.equal(keep.telemetry.get('v').at(-1).kv.value, '21999')
    s.deleteDevice(gone)
    s.close()
    const lines = () => fs.readFileSync(path.join(dir, 'telemetry.jsonl'), 'utf8').trim().split('\n')
    assert.ok(lines().length < 2500, `compacted while running: ${lines().length} lines`)
    s = new Store({ dataDir: dir, historyLimit: 100 })
    assert.equal(s.byName('gone'), null)
    const h = s.byName('keep').telemetry.get('v')
    assert.equal(h.at(-1).kv.value, '21999')
    assert.ok(h.length <= 105)
    assert.ok(lines().length <= 105, `compacted on open: ${lines().length} lines`)
    assert.ok(lines().every(l => JSON.parse(l).d === keep.id))
    s.close()
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('state.json keeps devices, credentials, attributes, client-RPC rules, claims, OTA assignment, packages, profiles and the config; written whole through a rename', () => {
  const dir = tmp()
  try {
    let s = new Store({ dataDir: dir })
    s.configToSave = () => ({ clientRpc: { getTime: { responseText: '1', delayMs: 0 } }, clientRpcTimeoutMs: 500 })
    const d = s.createDevice({ name: 'b', clientId: 'cid', userName: 'u', password: 'p', gateway: true })
    s.saveAttributes(d, 'SHARED_SCOPE', kvs('{"target":20.5}'), 1234)
    s.saveAttributes(d, 'CLIENT_SCOPE', kvs('{"fw":"v1.0"}'), 1235)
    d.clientRpc.ping = { responseText: '"pong"', delayMs: 10 }
    d.claim = { secretKey: 'k', durationMs: 1, requestedAt: 1, expiresAt: 2 }
    const pkg = s.addPackage({ type: 'FIRMWARE', title: 'fw', version: '2', data: Buffer.from('bytes'), size: 5 })
    d.ota.FIRMWARE = pkg.id
    s.provisionProfiles.push({ provisionDeviceKey: 'k', provisionDeviceSecret: 's' })
    s.changed('rules', d)
    s.flush()
    assert.deepEqual(fs.readdirSync(dir).filter(f => f.endsWith('.tmp')), [])
    s.close()
    s = new Store({ dataDir: dir })
    const r = s.byName('b')
    assert.deepEqual(r.credentials, { credentialsType: 'MQTT_BASIC', clientId: 'cid', userName: 'u', password: 'p' })
    assert.equal(r.gateway, true)
    assert.equal(kvJson(r.attributes.SHARED_SCOPE.get('target').kv), '20.5')
    assert.equal(r.attributes.SHARED_SCOPE.get('target').lastUpdateTs, 1234)
    assert.equal(r.attributes.CLIENT_SCOPE.get('fw').kv.value, 'v1.0')
    assert.deepEqual(r.clientRpc, { ping: { responseText: '"pong"', delayMs: 10 } })
    assert.equal(r.claim.secretKey, 'k')
    assert.equal(r.ota.FIRMWARE, pkg.id)
    assert.equal(s.packages.get(pkg.id).data.toString(), 'bytes')
    assert.deepEqual(s.provisionProfiles, [{ provisionDeviceKey: 'k', provisionDeviceSecret: 's' }])
    assert.deepEqual(s.savedConfig, { clientRpc: { getTime: { responseText: '1', delayMs: 0 } }, clientRpcTimeoutMs: 500 })
    s.close()
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('a state.json from before the journal (telemetry inside it) is read and its telemetry moved to the journal', () => {
  const dir = tmp()
  try {
    fs.writeFileSync(path.join(dir, 'state.json'), JSON.stringify({
      seq: 7,
      devices: [{ id: 'id-1', name: 'old', credentials: { credentialsType: 'ACCESS_TOKEN', credentialsId: 'O' }, telemetry: { t: [{ ts: 5, kv: { type: 'DOUBLE', value: 2 } }] }, attributes: {}, log: [{ seq: 1 }], events: [] }]
    }))
    let s = new Store({ dataDir: dir })
    assert.equal(kvString(s.byName('old').telemetry.get('t')[0].kv), '2.0')
    s.close()
    assert.match(fs.readFileSync(path.join(dir, 'telemetry.jsonl'), 'utf8'), /"d":"id-1","ts":5/)
    s = new Store({ dataDir: dir })
    assert.equal(s.byName('old').telemetry.get('t').length, 1)
    s.close()
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('message log: kinds by topic and direction; a firmware download is one entry; session packets; at most `limit` entries', () => {
  assert.equal(kindOf('v1/devices/me/telemetry', 'up'), 'telemetry')
  assert.equal(kindOf('v2/t/j', 'up'), 'telemetry')
  assert.equal(kindOf('v1/devices/me/attributes', 'down'), 'attributes')
  assert.equal(kindOf('v1/devices/me/attributes/request/3', 'up'), 'attribute-request')
  assert.equal(kindOf('v2/a/res/3', 'down'), 'attribute-request')
  assert.equal(kindOf('v1/devices/me/rpc/request/3', 'down'), 'rpc')
  assert.equal(kindOf('v1/devices/me/rpc/response/3', 'up'), 'rpc')
  assert.equal(kindOf('v1/devices/me/rpc/request/3', 'up'), 'client-rpc')
  assert.equal(kindOf('v2/r/res/3', 'down'), 'client-rpc')
  assert.equal(kindOf('v1/devices/me/claim', 'up'), 'claim')
  assert.equal(kindOf('/provision/request', 'up'), 'provision')
  assert.equal(kindOf('v2/fw/error', 'down'), 'firmware')
  assert.equal(kindOf('v1/gateway/connect', 'up'), 'other')

  const s = new Store()
  const log = new MessageLog(s, { limit: 10 })
  const d = s.createDevice({ name: 'm', token: 'M' })
  s.event(d, 'connected', { clientId: 'c1', username: 'M', cleanSession: true, keepalive: 60, protocolVersion: 4 })
  s.event(d, 'subscribed', { topic: 'v2/fw/response/+/chunk/+', qos: 1 })
  s.logMessage(d, 'down', 'v1/devices/me/rpc/request/0', 1, '{"method":"ping","params":{}}')
  for (let i = 0; i < 4; i++) {
    s.logMessage(d, 'up', `v2/fw/request/7/chunk/${i}`, 1, '1024')
    s.logMessage(d, 'down', `v2/fw/response/7/chunk/${i}`, 1, Buffer.alloc(i < 3 ? 1024 : 10), { binary: true })
  }
  const all = log.list(d)
  assert.deepEqual(all.map(e => [e.kind, e.dir, e.topic]), [
    ['session', 'up', 'CONNECT'], ['session', 'up', 'SUBSCRIBE v2/fw/response/+/chunk/+'],
    ['rpc', 'down', 'v1/devices/me/rpc/request/0'], ['firmware', 'both', 'v2/fw/request/7/chunk/*']])
  assert.equal(JSON.parse(all[0].payload).clientId, 'c1')
  assert.equal(all[2].note, 'method ping')
  const fw = all[3]
  assert.deepEqual(fw.chunks, { requested: 4, served: 4, first: 0, last: 3, chunkSize: 1024 })
  assert.equal(fw.size, 3 * 1024 + 10)
  assert.equal(fw.note, 'chunks 0–3: 4 requested (1024 B each), 4 served, 3082 bytes')
  assert.ok(fw.seq > fw.id, 'an updated entry gets a new seq, so ?since= finds it')
  assert.deepEqual(log.list(d, { since: all[2].seq }).map(e => e.id), [fw.id])
  assert.deepEqual(log.list(d, { kinds: ['rpc'] }).map(e => e.topic), ['v1/devices/me/rpc/request/0'])
  for (let i = 0; i < 100; i++) s.logMessage(d, 'up', 'v1/devices/me/telemetry', 1, `{"i":${i}}`)
  assert.ok(d.msgLog.length <= 60)
  assert.equal(log.list(d).length, 10)
  assert.equal(log.list(d).at(-1).payload, '{"i":99}')
  assert.equal(d.log.length, 109, 'the raw record of every PUBLISH keeps each chunk')
})

test('client-RPC rule bodies: response text kept as written, echo, currentTime, delay; bad bodies are 400', () => {
  const rule = (json) => parseRule(parse(json))
  assert.deepEqual(rule('{"method":"m","response":{"v":2.0}}'), { method: 'm', rule: { delayMs: 0, responseText: '{"v":2.0}' } })
  assert.deepEqual(rule('{"method":"m","responseText":"[1]","delayMs":250}'), { method: 'm', rule: { delayMs: 250, responseText: '[1]' } })
  assert.deepEqual(rule('{"method":"m","echo":true}'), { method: 'm', rule: { delayMs: 0, echo: true } })
  assert.deepEqual(rule('{"method":"getCurrentTime","currentTime":true}'), { method: 'getCurrentTime', rule: { delayMs: 0, currentTime: true } })
  for (const bad of ['{"response":1}', '{"method":"m"}', '{"method":"m","response":1,"delayMs":-1}', '[1]']) {
    assert.throws(() => rule(bad), (e) => e.status === 400, bad)
  }
})
