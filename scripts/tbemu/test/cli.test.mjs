// Command line: --device, --config, --package, --data-dir persistence, --help, bad options, clean SIGTERM
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { startEmu, connect, subscribe, publish, end, waitMsg, TBEMU } from './helpers.mjs'

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

test('--package: command-line packages exist with title, version, size, checksum, and can be assigned', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-pkg-'))
  const cfgDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-pkgcfg-'))
  try {
    const fw = crypto.randomBytes(1500)
    const sw = crypto.randomBytes(700)
    fs.writeFileSync(path.join(dir, 'fw.bin'), fw)
    fs.writeFileSync(path.join(dir, 'sw.bin'), sw)
    fs.writeFileSync(path.join(cfgDir, 'cfg.json'), JSON.stringify({ devices: [{ name: 'cfgdev', token: 'CFG' }] }))
    const md5 = (b) => crypto.createHash('md5').update(b).digest('hex')
    const sha256 = (b) => crypto.createHash('sha256').update(b).digest('hex')
    const extUrl = 'http://example.invalid/fw.bin?sig=a=b'
    // relative FILEs are taken from tbemu's current directory, not from the --config file's
    const emu = await startEmu([
      '--config', path.join(cfgDir, 'cfg.json'), '--device', 'd1:T1', '--device', 'd2:T2',
      '--package', 'fw.bin,title=cli-fw,version=2.0.1,alg=MD5,assign=d1+d2',
      '--package', 'sw.bin,title=cli-sw,version=0.3,type=sw',
      '--package', 'fw.bin,title=cli-url,version=1.0,url=self,tag=url-tag,fileName=img.bin',
      '--package', `,title=cli-ext,version=9,url=${extUrl}`
    ], { cwd: dir })
    try {
      const pkgs = await emu.get('/emu/packages')
      assert.deepEqual(pkgs.map(p => p.title).sort(), ['cli-ext', 'cli-fw', 'cli-sw', 'cli-url'])
      const by = Object.fromEntries(pkgs.map(p => [p.title, p]))
      const pfw = await emu.get('/emu/packages/' + by['cli-fw'].id)
      assert.equal(pfw.type, 'FIRMWARE')
      assert.equal(pfw.version, '2.0.1')
      assert.equal(pfw.size, 1500)
      assert.equal(pfw.checksumAlgorithm, 'MD5')
      assert.equal(pfw.checksum, md5(fw))
      assert.equal(pfw.fileName, 'fw.bin')
      assert.equal(pfw.tag, 'cli-fw 2.0.1')
      assert.equal(pfw.url, null)
      const psw = by['cli-sw']
      assert.equal(psw.type, 'SOFTWARE')
      assert.equal(psw.version, '0.3')
      assert.equal(psw.size, 700)
      assert.equal(psw.checksumAlgorithm, 'SHA256') // the default
      assert.equal(psw.checksum, sha256(sw))
      const purl = by['cli-url']
      assert.equal(purl.size, 1500)
      assert.equal(purl.checksum, sha256(fw))
      assert.equal(purl.tag, 'url-tag')
      assert.equal(purl.url, `${emu.base}/emu/files/${purl.id}/img.bin`)
      const dl = await fetch(purl.url)
      assert.equal(dl.status, 200)
      assert.deepEqual(Buffer.from(await dl.arrayBuffer()), fw)
      const pext = by['cli-ext']
      assert.equal(pext.url, extUrl) // a value may contain '='
      assert.equal(pext.size, null)
      assert.equal(pext.hasData, false)

      // assign=d1+d2 at start: fw_* shared attributes, seen through ThingsBoard's REST path
      for (const name of ['d1', 'd2']) {
        const id = await emu.deviceId(name)
        const attrs = await emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/attributes/SHARED_SCOPE`)
        const a = Object.fromEntries(attrs.map(x => [x.key, x.value]))
        assert.equal(a.fw_title, 'cli-fw')
        assert.equal(a.fw_version, '2.0.1')
        assert.equal(Number(a.fw_size), 1500)
        assert.equal(a.fw_checksum_algorithm, 'MD5')
        assert.equal(a.fw_checksum, md5(fw))
        assert.equal((await emu.get('/emu/devices/' + name)).ota.FIRMWARE.packageId, pfw.id)
      }
      assert.equal((await emu.get('/emu/devices/cfgdev')).attributes.SHARED_SCOPE.fw_title, undefined)

      // assign through the /emu API: sw_* attributes, then the device downloads the bytes over MQTT
      const s = await emu.post('/emu/devices/d1/assign', { packageId: psw.id })
      assert.equal(s.attributes.SHARED_SCOPE.sw_title.value, 'cli-sw')
      assert.equal(s.attributes.SHARED_SCOPE.sw_version.value, '0.3')
      assert.equal(Number(s.attributes.SHARED_SCOPE.sw_size.value), 700)
      assert.equal(s.attributes.SHARED_SCOPE.sw_checksum_algorithm.value, 'SHA256')
      assert.equal(s.attributes.SHARED_SCOPE.sw_checksum.value, sha256(sw))
      const c = await connect(emu, { username: 'T1' })
      await subscribe(c, 'v2/sw/response/+/chunk/+')
      await subscribe(c, 'v2/fw/response/+/chunk/+')
      await publish(c, 'v2/sw/request/1/chunk/0', '') // size 0: the whole file
      assert.deepEqual((await waitMsg(c, 'v2/sw/response/1/chunk/0')).payload, sw)
      await publish(c, 'v2/fw/request/2/chunk/0', '')
      assert.deepEqual((await waitMsg(c, 'v2/fw/response/2/chunk/0')).payload, fw)
      await end(c)

      const u = await emu.post('/emu/devices/d2/assign', { packageId: purl.id })
      assert.equal(u.attributes.SHARED_SCOPE.fw_title.value, 'cli-url')
      assert.equal(u.attributes.SHARED_SCOPE.fw_url.value, purl.url)
    } finally { assert.equal(await emu.stop(), 0) }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
    fs.rmSync(cfgDir, { recursive: true, force: true })
  }
})

// Run tbemu to completion (ports 0 so a parse that wrongly succeeds cannot take 1883/8080).
const run = (args) => spawnSync(process.execPath, [TBEMU, '--mqtt-port', '0', '--http-port', '0', ...args], { encoding: 'utf8', timeout: 10000 })

const OPTIONS = ['--mqtt-port', '--http-port', '--host', '--device', '--device-basic', '--package', '--provision',
  '--client-rpc', '--set', '--config', '--data-dir', '--quiet', '-h', '--help']

test('--help and -h print every option with a description on stdout and exit 0', () => {
  for (const args of [['--help'], ['-h'], ['--device', 'x:y', '--help']]) {
    const r = run(args)
    assert.equal(r.status, 0, args.join(' ') + ': ' + r.stderr)
    assert.equal(r.stderr, '')
    assert.match(r.stdout, /^Usage: /)
    const lines = r.stdout.split('\n')
    const start = lines.indexOf('Options:')
    assert.ok(start >= 0, r.stdout)
    const listed = []
    for (let i = start + 1; lines[i]; i++) {
      const m = /^ {2}(-[\w-]+(?:, -[\w-]+)*)(?: \S+)?(?: {2,}(\S.*))?$/.exec(lines[i])
      if (!m) { assert.match(lines[i], /^ {4,}\S/, 'continuation line'); continue }
      const desc = m[2] || (lines[i + 1] || '').trim()
      assert.ok(desc && !desc.startsWith('-'), 'no description for ' + m[1])
      listed.push(...m[1].split(', '))
    }
    assert.deepEqual(listed.sort(), [...OPTIONS].sort())
    for (const k of ['title', 'version', 'type', 'alg', 'checksum', 'tag', 'url', 'fileName', 'contentType', 'assign']) {
      assert.match(r.stdout, new RegExp(`^ {2}${k}= +\\S`, 'm'), '--package key ' + k)
    }
  }
  const readme = fs.readFileSync(path.join(path.dirname(TBEMU), 'README.md'), 'utf8')
  for (const o of OPTIONS) assert.ok(readme.includes('`' + o), 'README documents ' + o)
})

test('unknown or malformed options exit 2 with one line on stderr and nothing on stdout', () => {
  const cases = [
    [['--bogus'], /unknown option "--bogus"/],
    [['--device', 'a:A', 'extra'], /unknown option "extra"/],
    [['--mqtt-port'], /--mqtt-port needs a value/],
    [['--http-port', 'eighty'], /--http-port needs a port number/],
    [['--package', `${TBEMU},title=t`], /--package needs title= and version=/],
    [['--package', `${TBEMU},title=t,version=1,titel=x`], /--package: unknown key "titel"/],
    [['--package', `${TBEMU},title=t,version=1,type=hw`], /--package: type must be/],
    [['--package', `${TBEMU},title=t,version=1,alg=CRC16`], /--package: alg must be one of/],
    [['--package', 'no-such-file.bin,title=t,version=1'], /--package: no such file/],
    [['--set', 'rpcMinTimeoutMs'], /--set KEY=VALUE/],
    [['--config', '/nonexistent/tbemu.json'], /--config \/nonexistent\/tbemu.json/]
  ]
  for (const [args, re] of cases) {
    const r = run(args)
    assert.equal(r.status, 2, args.join(' ') + ': ' + r.stderr)
    assert.equal(r.stdout, '')
    assert.match(r.stderr, /^tbemu: [^\n]+\n$/, args.join(' ') + ': one line: ' + JSON.stringify(r.stderr))
    assert.match(r.stderr, re)
  }
})

test('a port in use: one line naming the port and the option to choose another, exit 2, no stack trace', async () => {
  const busy = net.createServer()
  await new Promise(resolve => busy.listen(0, '127.0.0.1', resolve))
  const port = busy.address().port
  try {
    for (const [flag, other] of [['--mqtt-port', '--http-port'], ['--http-port', '--mqtt-port']]) {
      const r = spawnSync(process.execPath, [TBEMU, other, '0', flag, String(port)], { encoding: 'utf8', timeout: 10000 })
      assert.equal(r.status, 2, r.stderr)
      assert.equal(r.stdout, '')
      assert.equal(r.stderr, `tbemu: port ${port} is in use (${flag} to choose another)\n`)
    }
  } finally { busy.close() }
})
