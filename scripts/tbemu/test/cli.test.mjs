// Command line: --device, --config, --package, --data-dir persistence, clean SIGTERM
import { test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { startEmu, connect, publish, end } from './helpers.mjs'

test('--config with devices, a package assigned at start, client RPC replies', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-cli-'))
  try {
    fs.writeFileSync(path.join(dir, 'fw.bin'), Buffer.alloc(300, 9))
    fs.writeFileSync(path.join(dir, 'cfg.json'), JSON.stringify({
      devices: [{ name: 'cfgdev', token: 'CFGTOKEN' }, { name: 'gw', token: 'GW', gateway: true }],
      packages: [{ file: 'fw.bin', title: 'cfg-fw', version: '1.2', checksumAlgorithm: 'CRC32', assign: ['cfgdev'] }],
      config: { clientRpcTimeoutMs: 1000 }
    }))
    const emu = await startEmu(['--config', path.join(dir, 'cfg.json'), '--device', 'extra:EXTRA'])
    const devs = await emu.get('/emu/devices')
    assert.deepEqual(devs.map(d => d.name).sort(), ['cfgdev', 'extra', 'gw'])
    const d = await emu.get('/emu/devices/cfgdev')
    assert.equal(d.attributes.SHARED_SCOPE.fw_title.value, 'cfg-fw')
    assert.equal(d.attributes.SHARED_SCOPE.fw_checksum_algorithm.value, 'CRC32')
    assert.equal((await emu.get('/emu/config')).clientRpcTimeoutMs, 1000)
    assert.equal(await emu.stop(), 0)
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('--data-dir keeps devices, telemetry and packages across restarts', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-data-'))
  try {
    let emu = await startEmu(['--data-dir', dir, '--device', 'keep:KEEP'])
    const c = await connect(emu, { username: 'KEEP' })
    await publish(c, 'v1/devices/me/telemetry', '{"x":1.0}')
    await end(c)
    await emu.post('/emu/devices', { name: 'added', token: 'ADDED' })
    const pkg = (await emu.api('POST', '/emu/packages?title=p&version=1', new Uint8Array([1, 2, 3]))).json
    const id1 = await emu.deviceId('keep')
    assert.equal(await emu.stop(), 0)
    emu = await startEmu(['--data-dir', dir, '--device', 'keep:KEEP'])
    assert.equal(await emu.deviceId('keep'), id1)
    const t = await emu.api('GET', `/api/plugins/telemetry/DEVICE/${id1}/values/timeseries?keys=x&useStrictDataTypes=true`)
    assert.match(t.text, /"value":1\.0/)
    assert.equal((await emu.get('/emu/packages/' + pkg.id)).size, 3)
    const c2 = await connect(emu, { username: 'ADDED' })
    await end(c2)
    assert.equal(await emu.stop(), 0)
  } finally { fs.rmSync(dir, { recursive: true, force: true }) }
})

test('bad option exits 2 with a message', async () => {
  await assert.rejects(startEmu(['--bogus']), /exited 2/)
})
