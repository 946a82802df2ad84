// --data-dir across restarts of the real process: everything a user set up, and the telemetry
// history, is there again after SIGTERM and after SIGKILL right after the last answer; a second
// tbemu on the same directory is refused.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { spawnSync } from 'node:child_process'
import { startEmu, connect, subscribe, publish, end, waitMsg, TBEMU } from './helpers.mjs'

const killed = (emu) => new Promise(resolve => { emu.proc.once('exit', (code, sig) => resolve(sig)); emu.proc.kill('SIGKILL') })

// What a user sets up, through MQTT and REST; returns what must be there after a restart.
async function setUp (emu) {
  const c = await connect(emu, { username: 'TOKEN1' })
  await publish(c, 'v1/devices/me/telemetry', JSON.stringify([{ ts: 1000, values: { t: 20.5 } }, { ts: 2000, values: { t: 21 } }]))
  await publish(c, 'v1/devices/me/telemetry', '{"t":3.0,"mode":"heat","on":true}')
  await publish(c, 'v1/devices/me/attributes', '{"fw":"v1"}')
  await end(c)
  const basic = await emu.post('/emu/devices', { name: 'basic', clientId: 'cid', userName: 'usr', password: 'pw' })
  const id = await emu.deviceId('d1')
  await emu.post(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, '{"target":20.50,"drop":1}')
  await emu.api('DELETE', `/api/plugins/telemetry/DEVICE/${id}/SHARED_SCOPE?keys=drop`)
  const pkg = (await emu.api('POST', '/emu/packages?title=keep&version=1.0&checksumAlgorithm=MD5', new Uint8Array([5, 6, 7, 8]))).json
  await emu.post('/emu/devices/d1/assign', { packageId: pkg.id })
  await emu.post('/emu/devices/d1/client-rpc', { method: 'getCurrentTime', currentTime: true })
  await emu.post('/emu/client-rpc', '{"method":"cfg","response":{"v":2.0},"delayMs":5}')
  await emu.post('/emu/config', { clientRpcTimeoutMs: 1234 })
  await emu.post('/emu/provision-profiles', { provisionDeviceKey: 'pk', provisionDeviceSecret: 'ps' })
  return { id, basicId: basic.id, pkg }
}

async function snapshot (emu, id) {
  const strip = ({ connected, events, ...s }) => s
  return {
    devices: (await emu.get('/emu/devices')).map(strip).sort((a, b) => a.name < b.name ? -1 : 1),
    history: (await emu.api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=t,mode,on&startTs=0&endTs=${Date.now() + 1000}&orderBy=ASC&useStrictDataTypes=true`)).text,
    packages: await emu.get('/emu/packages'),
    rules: await emu.get('/emu/client-rpc'),
    config: await emu.get('/emu/config')
  }
}

for (const how of ['SIGTERM', 'SIGKILL']) {
  test(`--data-dir: after ${how} and a restart, devices, ids, tokens, attributes, packages, rules, config and the telemetry history are all there`, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-persist-'))
    try {
      let emu = await startEmu(['--data-dir', dir, '--device', 'd1:TOKEN1'])
      const { id, pkg } = await setUp(emu)
      const before = await snapshot(emu, id)
      if (how === 'SIGKILL') assert.equal(await killed(emu), 'SIGKILL')
      else assert.equal(await emu.stop(), 0)

      emu = await startEmu(['--data-dir', dir, '--device', 'd1:TOKEN1'])
      try {
        assert.deepEqual(await snapshot(emu, id), before)
        const d = before.devices.find(x => x.name === 'd1')
        assert.equal(d.latest.t.text, '3.0')
        assert.equal(d.attributes.SHARED_SCOPE.target.text, '20.5')
        assert.equal(d.attributes.SHARED_SCOPE.drop, undefined)
        assert.equal(d.ota.FIRMWARE.packageId, pkg.id)
        assert.match(before.history, /"t":\[\{"ts":1000,"value":20\.5\},\{"ts":2000,"value":21\},\{"ts":\d+,"value":3\.0\}\]/)
        assert.equal(before.config.clientRpcTimeoutMs, 1234)
        // the rules work on the wire, the credentials connect, the package downloads
        const c = await connect(emu, { username: 'TOKEN1' })
        await subscribe(c, 'v1/devices/me/rpc/response/+')
        await subscribe(c, 'v2/fw/response/+/chunk/+')
        await publish(c, 'v1/devices/me/rpc/request/1', '{"method":"cfg"}')
        assert.equal((await waitMsg(c, 'v1/devices/me/rpc/response/1')).text, '{"v":2.0}')
        await publish(c, 'v1/devices/me/rpc/request/2', '{"method":"getCurrentTime"}')
        assert.ok(Number((await waitMsg(c, 'v1/devices/me/rpc/response/2')).text) > 1e12)
        await publish(c, 'v2/fw/request/1/chunk/0', '')
        assert.deepEqual([...(await waitMsg(c, 'v2/fw/response/1/chunk/0')).payload], [5, 6, 7, 8])
        await end(c)
        const b = await connect(emu, { clientId: 'cid', username: 'usr', password: 'pw' })
        assert.equal(b.connack.returnCode, 0)
        await end(b)
      } finally { assert.equal(await emu.stop(), 0) }
    } finally { fs.rmSync(dir, { recursive: true, force: true }) }
  })
}

test('--data-dir: a second tbemu on the same directory exits 2; --device with a new token for a saved device replaces its token, keeps its id', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-lock-'))
  try {
    let emu = await startEmu(['--data-dir', dir, '--device', 'd1:OLD'])
    const id = await emu.deviceId('d1')
    const second = spawnSync(process.execPath, [TBEMU, '--mqtt-port', '0', '--http-port', '0', '--data-dir', dir], { encoding: 'utf8', timeout: 10000 })
    assert.equal(second.status, 2)
    assert.equal(second.stderr, `tbemu: --data-dir ${dir}: in use by another tbemu (pid ${emu.proc.pid})\n`)
    assert.equal(await killed(emu), 'SIGKILL') // its pid file stays behind, and is taken over
    emu = await startEmu(['--data-dir', dir, '--device', 'd1:NEW'])
    try {
      assert.equal(await emu.deviceId('d1'), id)
      assert.equal((await emu.get('/emu/devices/d1')).credentials.credentialsId, 'NEW')
      const c = await connect(emu, { username: 'NEW' })
      await end(c)
    } finally { assert.equal(await emu.stop(), 0) }
    assert.ok(!fs.existsSync(path.join(dir, 'tbemu.pid')), 'a clean stop removes the pid file')
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})
