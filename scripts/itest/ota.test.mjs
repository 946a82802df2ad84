// Issue 4, "Tests": firmware and software updates of the real tbagent binary, against tbemu and
// against a server-role client on plain mosquitto (ota-server.mjs). Every algorithm (and
// checksums with leading zero bytes), sizes that are and are not a multiple of the chunk size,
// an empty image, a corrupted image, a wrong size, NOT_FOUND and PAYLOAD_TOO_LARGE on
// v2/fw/error, empty chunks mid-download (cache expiry), a broker restart, an agent kill -9,
// an interrupted HTTP download resumed with Range, software beside firmware.
//
// TBAGENT=build-asan/tbagent (or TB_ITEST_SLOW=1) scales every wait; ITEST_VERBOSE=1 echoes logs.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import { execFileSync } from 'node:child_process'
import http from 'node:http'
import https from 'node:https'
import path from 'node:path'
import { startEmu } from '../tbemu/test/helpers.mjs'
import {
  ALGORITHMS, OtaServer, TBAGENT, checksumHex, ms, randomImage, selfCheck, sleep, startAgent,
  startMosquitto, tmpdir, waitUntil, zeroChecksumImage
} from './ota-server.mjs'

const FULL = ['DOWNLOADING', 'DOWNLOADED', 'VERIFIED', 'UPDATING', 'UPDATED']
const SERVER_STATES = new Set(['QUEUED', 'INITIATED'])

test('preconditions: the agent binary exists and the Node checksums match published vectors', () => {
  assert.ok(fs.existsSync(TBAGENT), `${TBAGENT} missing: run scripts/build`)
  assert.deepEqual(selfCheck(), [])
})

// stopChecked(agent): SIGTERM, then no sanitizer report may appear in its output
async function stopChecked (agent) {
  await agent.stop()
  const report = agent.sanitizerReport()
  assert.equal(report, null, `sanitizer report from tbagent ${agent.pid}:\n${agent.log.tail(40)}`)
}

// ------------------------------------------------------------------------------------------
// tbemu side

async function emuWorld (t, devices = ['dev1']) {
  const args = ['--quiet']
  for (const d of devices) args.push('--device', `${d}:${d}-token`)
  const emu = await startEmu(args, { timeoutMs: ms(10000) })
  t.after(() => emu.stop())
  emu.ids = {}
  for (const d of devices) emu.ids[d] = await emu.deviceId(d)
  return emu
}

function emuAgent (t, emu, dev, opts = {}) {
  const a = startAgent({ ...opts, port: emu.mqttPort, args: ['--token', `${dev}-token`, ...(opts.args || [])] })
  t.after(() => stopChecked(a))
  return a
}

// emuDevice(t, opts) -> {emu, agent}: tbemu with dev1, and an agent (opts) for it whose session is up
async function emuDevice (t, opts) {
  const emu = await emuWorld(t)
  const agent = emuAgent(t, emu, 'dev1', opts)
  await agent.waitFor(/session ready/, 8000)
  return { emu, agent }
}

async function upload (emu, image, q) {
  const qs = new URLSearchParams({ type: 'fw', ...q }).toString()
  return emu.post('/emu/packages?' + qs, image)
}

async function series (emu, id, keys, since) {
  return emu.get(`/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=${keys}&startTs=${since}&endTs=${Date.now() + 1000}&limit=100&orderBy=ASC`)
}

// deviceStates(emu, id, kind, since) -> {states (device-reported, in order), error (last)}
async function deviceStates (emu, id, kind, since) {
  const r = await series(emu, id, `${kind}_state,${kind}_error`, since)
  const states = (r[`${kind}_state`] || []).map((x) => x.value).filter((v) => !SERVER_STATES.has(v))
  const errs = r[`${kind}_error`] || []
  return { states, error: errs.length ? errs[errs.length - 1].value : undefined }
}

async function waitFinal (emu, id, kind, since, n = 15000) {
  let last
  try {
    return await waitUntil(async () => {
      last = await deviceStates(emu, id, kind, since)
      const s = last.states
      return s.length && (s[s.length - 1] === 'UPDATED' || s[s.length - 1] === 'FAILED') ? last : null
    }, n, `${kind}_state UPDATED or FAILED`)
  } catch (e) {
    throw new Error(`${e.message}; states so far: ${JSON.stringify(last)}`)
  }
}

async function latest (emu, id, key) {
  const r = await series(emu, id, key, 0)
  const v = r[key] || []
  return v.length ? v[v.length - 1].value : undefined
}

// assign(emu, dev, image, q) -> {pkg, since}: the package uploaded, then assigned to dev
async function assign (emu, dev, image, q) {
  const pkg = await upload(emu, image, q)
  const since = Date.now()
  await emu.post(`/emu/devices/${dev}/assign`, { packageId: pkg.id })
  return { pkg, since }
}

// update(emu, dev, image, q) -> {states, error, pkg, since}: assign, wait for the end
async function update (emu, dev, image, q) {
  const { pkg, since } = await assign(emu, dev, image, q)
  const res = await waitFinal(emu, emu.ids[dev], q.type === 'sw' ? 'sw' : 'fw', since)
  return { ...res, pkg, since }
}

async function expectUpdated (emu, agent, dev, image, q, what) {
  const r = await update(emu, dev, image, q)
  const kind = q.type === 'sw' ? 'sw' : 'fw'
  assert.deepEqual(r.states, FULL, `${what}: ${kind}_error ${r.error}\n${agent.log.tail(30)}`)
  assert.equal(await latest(emu, emu.ids[dev], `current_${kind}_version`), q.version, what)
  assert.equal(await latest(emu, emu.ids[dev], `current_${kind}_title`), q.title, what)
  const got = agent.installed(kind, q.version)
  assert.ok(got, `${what}: install() did not run`)
  assert.ok(got.equals(image), `${what}: installed image differs (${got.length} bytes, expected ${image.length})`)
  return r
}

test('tbemu: every checksum algorithm, DOWNLOADING..UPDATED and current_fw_version reported', async (t) => {
  const { emu, agent } = await emuDevice(t)
  for (const [i, alg] of ALGORITHMS.entries()) {
    await t.test(alg, async () => {
      const image = randomImage(64 * 1024 + 1000 + i, 100 + i)
      await expectUpdated(emu, agent, 'dev1', image, { title: 'dev', version: `2.${i}-${alg}`, checksumAlgorithm: alg }, alg)
    })
  }
})

test('tbemu: checksums with leading zero bytes (and 32-bit ones typed as 0x, upper case, big-endian, zeros dropped)', async (t) => {
  const { emu, agent } = await emuDevice(t)
  const zero = {}
  for (const [i, alg] of ALGORITHMS.entries()) {
    await t.test(alg, async () => {
      const z = zero[alg] = zeroChecksumImage(alg, 5000 + i, alg.endsWith('_32') || alg === 'CRC32')
      assert.match(z.checksum, /^00/)
      const r = await expectUpdated(emu, agent, 'dev1', z.image, { title: 'dev', version: `3.${i}-${alg}`, checksumAlgorithm: alg }, alg)
      assert.equal(r.pkg.checksum, z.checksum, 'tbemu computed the same checksum text')
    })
  }
  for (const alg of ['CRC32', 'MURMUR3_32']) {
    await t.test(`${alg} typed by a person`, async () => {
      const z = zero[alg] || zeroChecksumImage(alg, 5000, true)
      // the int's big-endian hex, leading zero byte dropped, 0x prefix, upper case
      const be = Buffer.from(z.checksum, 'hex').reverse().toString('hex').replace(/^0+/, '')
      const typed = '0X' + be.toUpperCase()
      await expectUpdated(emu, agent, 'dev1', z.image, { title: 'dev', version: `4-${alg}`, checksumAlgorithm: alg, checksum: typed }, `${alg} ${typed}`)
    })
  }
})

test('tbemu: image sizes that are and are not a multiple of the chunk size', async (t) => {
  const { emu, agent } = await emuDevice(t, { chunk: 4096 })
  for (const size of [65536, 65537, 4096, 4095, 1, 3 * 4096 + 7]) {
    await t.test(`${size} bytes, chunk 4096`, async () => {
      const image = randomImage(size, size)
      const since = Date.now()
      await expectUpdated(emu, agent, 'dev1', image, { title: 'dev', version: `5-${size}`, checksumAlgorithm: 'SHA256' }, `${size} bytes`)
      const reqs = (await emu.messages('dev1', '?dir=up&topic=v2/fw/request/')).filter((m) => m.ts >= since - 5)
      assert.ok(reqs.length >= Math.ceil(size / 4096), `${reqs.length} chunk requests`)
      for (const m of reqs) assert.equal(m.payload, '4096', `chunk request ${m.topic} asks for the chunk size`)
    })
  }
})

test('tbemu: a corrupted image (wrong checksum) ends FAILED naming both checksums; install never runs', async (t) => {
  const { emu, agent } = await emuDevice(t)
  const image = randomImage(70000, 7)
  const good = checksumHex('SHA256', image)
  const wrong = checksumHex('SHA256', Buffer.concat([image, Buffer.from('x')]))
  const r = await update(emu, 'dev1', image, { title: 'dev', version: '6.0', checksumAlgorithm: 'SHA256', checksum: wrong })
  assert.deepEqual(r.states, ['DOWNLOADING', 'DOWNLOADED', 'FAILED'], `fw_error ${r.error}`)
  assert.ok(r.error && r.error.includes(wrong) && r.error.includes(good), `fw_error names both checksums: ${r.error}`)
  assert.equal(agent.installed('fw', '6.0'), null, 'install() must not run')
  assert.equal(agent.log.find(/INSTALLED/), null)
  assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '1.0')
  // nothing is retried, nothing is left in the state directory
  await sleep(ms(1000))
  assert.deepEqual((await deviceStates(emu, emu.ids.dev1, 'fw', r.since)).states, ['DOWNLOADING', 'DOWNLOADED', 'FAILED'])
  const left = fs.readdirSync(path.join(agent.stateDir, 'firmware')).filter((f) => /\.(part|bin)$/.test(f))
  assert.deepEqual(left, [], 'no partial or unverified image kept')
})

test('tbemu: fw_size that does not match the image ends FAILED with a size error', async (t) => {
  const emu = await emuWorld(t, ['big', 'small'])
  const image = randomImage(64 * 1024 + 100, 8)
  const pkg = await upload(emu, image, { title: 'dev', version: '7.0', checksumAlgorithm: 'SHA256' })
  // assigned while the devices are offline, then fw_size overridden: the agents see the wrong
  // size in their first attribute answer
  const since = Date.now()
  for (const [dev, size] of [['big', image.length + 5000], ['small', image.length - 1000]]) {
    await emu.post(`/emu/devices/${dev}/assign`, { packageId: pkg.id })
    await emu.post(`/api/plugins/telemetry/DEVICE/${emu.ids[dev]}/attributes/SHARED_SCOPE`, { fw_size: size })
  }
  const agents = { big: emuAgent(t, emu, 'big'), small: emuAgent(t, emu, 'small') }
  for (const dev of ['small', 'big']) {
    await t.test(dev === 'big' ? 'fw_size larger than the image' : 'fw_size smaller than the image', async () => {
      const r = await waitFinal(emu, emu.ids[dev], 'fw', since, 20000)
      assert.equal(r.states[r.states.length - 1], 'FAILED', `states ${r.states}`)
      assert.match(r.error || '', /size/i, `fw_error says the size is wrong: ${r.error}`)
      assert.equal(agents[dev].installed('fw', '7.0'), null, 'install() must not run')
    })
  }
})

test('tbemu: NOT_FOUND on v2/fw/error (fw_* offered but no package assigned) ends FAILED', async (t) => {
  const emu = await emuWorld(t)
  const image = randomImage(10000, 9)
  await emu.post(`/api/plugins/telemetry/DEVICE/${emu.ids.dev1}/attributes/SHARED_SCOPE`, {
    fw_title: 'dev', fw_version: '8.0', fw_size: image.length, fw_checksum_algorithm: 'SHA256', fw_checksum: checksumHex('SHA256', image)
  })
  const since = Date.now()
  const agent = emuAgent(t, emu, 'dev1')
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since)
  assert.deepEqual(r.states, ['DOWNLOADING', 'FAILED'])
  assert.match(r.error, /NOT_FOUND/)
  // the server closed the connection; the agent reconnects and does not retry the failed package
  await agent.waitFor(/session ready/, 8000, agent.log.find(/FAILED/) ? agent.log.lines.indexOf(agent.log.find(/FAILED/)) : 0)
  await sleep(ms(500))
  assert.deepEqual((await deviceStates(emu, emu.ids.dev1, 'fw', since)).states, ['DOWNLOADING', 'FAILED'])
})

// pauseAt(emu, agent, pct): pauses tbemu's device sockets as soon as the agent logs pct % progress
async function pauseAt (emu, agent, pct, from = 0) {
  await agent.waitFor(new RegExp(`firmware download ${pct}%`), 15000, from)
  await emu.post('/emu/pause')
}

test('tbemu: cache expiry mid-download (empty chunks) restarts under a new request id and still ends UPDATED', async (t) => {
  const { emu, agent } = await emuDevice(t, { chunk: 2048, args: ['--fw-window', '1'] })
  const image = randomImage(128 * 1024, 10)
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '9.0', checksumAlgorithm: 'SHA256' })
  await pauseAt(emu, agent, 10)
  await emu.post('/emu/devices/dev1/ota-cache-expire')
  await emu.post('/emu/resume')
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since, 30000)
  assert.deepEqual(r.states, FULL, `fw_error ${r.error}`)
  const restart = agent.log.find(/chunk \d+ has 0 bytes, expected 2048; restarting at byte \d+ under a new request id/)
  assert.ok(restart, 'the log shows the restart:\n' + agent.log.tail(30))
  const at = Number(/restarting at byte (\d+)/.exec(restart)[1])
  assert.ok(at > 0 && at < image.length, `restart at byte ${at}`)
  const reqs = (await emu.messages('dev1', '?dir=up&topic=v2/fw/request/')).map((m) => /request\/(\d+)\/chunk\/(\d+)/.exec(m.topic))
  const ids = [...new Set(reqs.map((m) => m[1]))]
  assert.ok(ids.length >= 2, `request ids used: ${ids}`)
  const first = reqs.find((m) => m[1] === ids[ids.length - 1])
  assert.equal(Number(first[2]) * 2048, at, 'the new request id starts where the old one stopped')
  assert.ok(agent.installed('fw', '9.0').equals(image))
})

test('tbemu: agent kill -9 mid-download, restarted with the same --state-dir, resumes and ends UPDATED', async (t) => {
  const emu = await emuWorld(t)
  const dir = tmpdir('tbota-kill-')
  const a1 = emuAgent(t, emu, 'dev1', { dir, chunk: 2048, args: ['--fw-window', '1'] })
  await a1.waitFor(/session ready/, 8000)
  const image = randomImage(128 * 1024, 11)
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '10.0', checksumAlgorithm: 'MURMUR3_128' })
  await pauseAt(emu, a1, 30)
  const { signal } = await a1.kill('SIGKILL')
  assert.equal(signal, 'SIGKILL')
  await emu.post('/emu/resume')
  const a2 = emuAgent(t, emu, 'dev1', { dir, chunk: 2048, args: ['--fw-window', '1'] })
  const line = await a2.waitFor(/firmware resuming download at byte \d+/, 10000)
  const at = Number(/byte (\d+)/.exec(line)[1])
  assert.ok(at >= image.length * 0.3 - 2048 && at < image.length, `resumed at byte ${at}`)
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since, 30000)
  assert.equal(r.states[r.states.length - 1], 'UPDATED', `states ${r.states}, fw_error ${r.error}`)
  assert.ok(a2.installed('fw', '10.0').equals(image), 'the resumed image is the whole image')
  assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '10.0')
  // fewer chunk requests after the restart than a download from byte 0 would need
  const reqs = (await emu.messages('dev1', '?dir=up&topic=v2/fw/request/')).map((m) => Number(/chunk\/(\d+)/.exec(m.topic)[1]))
  assert.ok(reqs.length < image.length / 2048 + 20, `${reqs.length} chunk requests in all`)
})

test('tbemu: HTTP URL package cut part-way resumes (Range) and ends UPDATED', async (t) => {
  const { emu, agent } = await emuDevice(t)

  await t.test('url=self with the urlCut fault', async () => {
    const image = randomImage(256 * 1024, 12)
    await emu.post('/emu/faults', { urlCut: { afterBytes: 100000, times: 1 } })
    const mark = agent.log.mark()
    const r = await update(emu, 'dev1', image, { title: 'dev', version: '11.0', checksumAlgorithm: 'SHA512', url: 'self' })
    assert.deepEqual(r.states, FULL, `fw_error ${r.error}\n${agent.log.tail(20)}`)
    assert.ok(agent.log.find(/firmware download interrupted: .*; resuming/, mark), 'the log shows the interruption and the resume:\n' + agent.log.tail(20))
    assert.ok(agent.installed('fw', '11.0').equals(image))
    assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '11.0')
  })

  await t.test('a URL on our own HTTP server: the second request asks for the rest with Range', async () => {
    const image = randomImage(200 * 1024, 13)
    const seen = []
    const srv = http.createServer((req, res) => {
      seen.push(req.headers.range || null)
      if (seen.length === 1) {
        res.writeHead(200, { 'content-length': image.length, 'accept-ranges': 'bytes' })
        res.write(image.subarray(0, 70000), () => setTimeout(() => res.socket.destroy(), 50))
        return
      }
      serveRange(req, res, image)
    })
    await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve))
    t.after(() => new Promise((resolve) => { srv.closeAllConnections(); srv.close(resolve) }))
    const url = `http://127.0.0.1:${srv.address().port}/fw.bin`
    const r = await update(emu, 'dev1', image, { title: 'dev', version: '12.0', checksumAlgorithm: 'CRC32', url })
    assert.deepEqual(r.states, FULL, `fw_error ${r.error}\n${agent.log.tail(20)}`)
    assert.equal(seen[0], null, 'the first request is a plain GET')
    assert.ok(seen.length >= 2, `requests: ${JSON.stringify(seen)}`)
    const from = rangeStart(seen[1])
    assert.ok(from > 0 && from <= 70000, `the second request resumes: ${seen[1]}`)
    assert.ok(agent.installed('fw', '12.0').equals(image))
  })
})

test('tbemu: software beside firmware: sw_* updates sw_state and current_sw_*, firmware untouched', async (t) => {
  const { emu, agent } = await emuDevice(t)
  await waitUntil(async () => (await latest(emu, emu.ids.dev1, 'current_fw_version')) === '1.0', 5000, 'current_fw_version 1.0')
  assert.equal(await latest(emu, emu.ids.dev1, 'current_sw_version'), '1')

  await t.test('software alone', async () => {
    const image = randomImage(100000, 14)
    const since = Date.now()
    await expectUpdated(emu, agent, 'dev1', image, { type: 'sw', title: 'app', version: '2', checksumAlgorithm: 'SHA384' }, 'software')
    assert.ok(agent.log.find(/SW INSTALLED 2 100000 bytes/))
    assert.deepEqual((await deviceStates(emu, emu.ids.dev1, 'fw', since)).states, [], 'no fw_state reported for a software update')
    assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '1.0')
    assert.equal(agent.installed('fw', '2'), null)
  })

  await t.test('firmware and software assigned together', async () => {
    const fw = randomImage(150000, 15)
    const sw = randomImage(90000, 16)
    const pf = await upload(emu, fw, { title: 'dev', version: '13.0', checksumAlgorithm: 'MD5' })
    const ps = await upload(emu, sw, { type: 'sw', title: 'app', version: '3', checksumAlgorithm: 'MURMUR3_32' })
    const since = Date.now()
    await emu.post('/emu/devices/dev1/assign', { packageId: pf.id })
    await emu.post('/emu/devices/dev1/assign', { packageId: ps.id })
    const rf = await waitFinal(emu, emu.ids.dev1, 'fw', since, 20000)
    const rs = await waitFinal(emu, emu.ids.dev1, 'sw', since, 20000)
    assert.deepEqual(rf.states, FULL, `fw_error ${rf.error}`)
    assert.deepEqual(rs.states, FULL, `sw_error ${rs.error}`)
    assert.ok(agent.installed('fw', '13.0').equals(fw))
    assert.ok(agent.installed('sw', '3').equals(sw))
    assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '13.0')
    assert.equal(await latest(emu, emu.ids.dev1, 'current_sw_version'), '3')
  })
})

// ------------------------------------------------------------------------------------------
// mosquitto + server-role client

async function mqWorld (t, opts = {}) {
  const broker = await startMosquitto()
  t.after(() => broker.stop('SIGKILL'))
  const clientId = `tbota-dev-${process.pid}-${Math.random().toString(16).slice(2, 8)}`
  const server = await new OtaServer({ port: broker.port, agentClientId: clientId }).connect()
  t.after(() => server.close())
  const start = (more = {}) => {
    const a = startAgent({ port: broker.port, chunk: opts.chunk, script: opts.script, env: opts.env, ...more, args: ['--client-id', clientId, '--no-session-limits', ...(opts.args || [])] })
    t.after(() => stopChecked(a))
    return a
  }
  const agent = start()
  await agent.waitFor(/session ready/, 8000)
  if (!opts.script) await waitUntil(() => server.latest('current_fw_version'), 5000, 'current_fw_version reported on connect')
  return { broker, server, agent, clientId, start }
}

// finalOn(server, kind, since) -> the states once the last is UPDATED or FAILED
async function finalOn (server, kind, n = 15000, since = 0) {
  await server.waitState(kind, ['UPDATED', 'FAILED'], n, since)
  return server.states(kind, since)
}

test('mosquitto: an empty image (fw_size 0) is installed as 0 bytes, with every algorithm of an empty input', async (t) => {
  const { server, agent } = await mqWorld(t)
  for (const alg of ['SHA256', 'CRC32', 'MURMUR3_32', 'MD5']) {
    await t.test(alg, async () => {
      const since = Date.now()
      const version = `e-${alg}`
      await server.assign('fw', { title: 'dev', version, image: Buffer.alloc(0), algorithm: alg })
      const states = await finalOn(server, 'fw', 10000, since)
      assert.deepEqual(states, FULL, `fw_error ${server.latest('fw_error')}\n${agent.log.tail(20)}`)
      const got = agent.installed('fw', version)
      assert.ok(got && got.length === 0, 'install() got an empty file')
      await waitUntil(() => server.latest('current_fw_version') === version, 3000, 'current_fw_version')
    })
  }
})

test('mosquitto: PAYLOAD_TOO_LARGE on v2/fw/error ends FAILED with a clear fw_error, no retry loop', async (t) => {
  const { server, agent } = await mqWorld(t, { chunk: 4096 })
  server.faults.maxPayload = 1024 // the policy cannot exceed 65536, so the server's limit comes down
  const image = randomImage(20000, 20)
  await server.assign('fw', { title: 'dev', version: 'p1', image })
  const states = await finalOn(server, 'fw')
  assert.deepEqual(states, ['DOWNLOADING', 'FAILED'])
  assert.match(server.latest('fw_error'), /PAYLOAD_TOO_LARGE/)
  assert.match(server.latest('fw_error'), /4096/, 'fw_error names the refused chunk size')
  const n = server.requests.length
  await agent.waitFor(/session ready/, 8000, agent.log.lines.findIndex((l) => /FAILED/.test(l)))
  await sleep(ms(1000))
  assert.equal(server.requests.length, n, 'no more chunk requests after FAILED')
  assert.equal(agent.installed('fw', 'p1'), null)
})

test('mosquitto: NOT_FOUND on v2/fw/error during a firmware download ends FAILED', async (t) => {
  const { server, agent } = await mqWorld(t)
  server.faults.error = 'NOT_FOUND'
  await server.assign('fw', { title: 'dev', version: 'nf1', image: randomImage(20000, 21) })
  const states = await finalOn(server, 'fw')
  assert.deepEqual(states, ['DOWNLOADING', 'FAILED'])
  assert.match(server.latest('fw_error'), /NOT_FOUND/)
  assert.equal(agent.installed('fw', 'nf1'), null)
})

test('mosquitto: NOT_FOUND on v2/fw/error during a software download ends sw_state FAILED', async (t) => {
  // ThingsBoard reports errors of software downloads on v2/fw/error too (docs/thingsboard.md §7)
  const { server, agent } = await mqWorld(t)
  server.faults.error = 'NOT_FOUND'
  await server.assign('sw', { title: 'app', version: 'nf2', image: randomImage(20000, 22) })
  let states
  try {
    states = await finalOn(server, 'sw', 6000)
  } catch (e) {
    throw new Error(`software download never ends on NOT_FOUND: sw_state ${JSON.stringify(server.states('sw'))}, ` +
      `${server.errorsSent.length} errors sent, agent log:\n${agent.log.all(/firmware|software|v2\/fw/).slice(-12).join('\n')}`)
  }
  assert.deepEqual(states, ['DOWNLOADING', 'FAILED'])
  assert.match(server.latest('sw_error'), /NOT_FOUND/)
})

test('mosquitto: firmware and software run one at a time; an error of the software download does not fail the firmware', async (t) => {
  // README: "Firmware and software downloads over MQTT run one at a time (the server reports
  // errors of both on v2/fw/error)". An error on v2/fw/error belongs to the one download running.
  const { server, agent } = await mqWorld(t, { args: ['--fw-window', '1'] })
  server.faults.delayMs = 2
  server.faults.error = 'NOT_FOUND'
  server.faults.errorKind = 'sw'
  await server.assign('fw', { title: 'dev', version: 'c1', image: randomImage(64 * 1024, 23) })
  await server.assign('sw', { title: 'app', version: 'c2', image: randomImage(32 * 1024, 24) })
  await finalOn(server, 'fw', 20000)
  const kinds = server.requests.map((r) => r.kind)
  const pattern = kinds.join('').replace(/(fw)+/g, 'F').replace(/(sw)+/g, 'S')
  assert.deepEqual(server.states('fw'), FULL, `firmware: fw_error ${server.latest('fw_error')}; chunk requests in order (F fw, S sw): ${pattern}`)
  assert.ok(agent.installed('fw', 'c1'))
  assert.ok(pattern.length <= 2, `fw and sw chunk requests interleaved: ${pattern}`)
})

test('mosquitto: an empty chunk once mid-download restarts under a new request id at that offset, UPDATED', async (t) => {
  const { server, agent } = await mqWorld(t, { chunk: 2048 })
  const image = randomImage(100 * 1024 + 5, 25)
  server.faults.emptyAt = { idx: 7, times: 1 }
  await server.assign('fw', { title: 'dev', version: 'ec1', image, algorithm: 'CRC32' })
  const states = await finalOn(server, 'fw')
  assert.deepEqual(states, FULL, `fw_error ${server.latest('fw_error')}`)
  assert.ok(agent.log.find(/chunk 7 has 0 bytes, expected 2048; restarting at byte 14336 under a new request id/), agent.log.tail(20))
  const ids = [...new Set(server.requests.map((r) => r.req))]
  assert.equal(ids.length, 2, `request ids: ${ids}`)
  assert.equal(server.requests.find((r) => r.req === ids[1]).idx, 7, 'the new request id starts at chunk 7')
  for (const r of server.requests) assert.equal(r.payload, '2048')
  assert.ok(agent.installed('fw', 'ec1').equals(image))
})

test('mosquitto: the server stops answering for a while: chunk timeouts, asked again, UPDATED', async (t) => {
  const { server, agent } = await mqWorld(t, { chunk: 2048, args: ['--fw-window', '2'] })
  const image = randomImage(96 * 1024, 26)
  server.faults.delayMs = 5
  await server.assign('fw', { title: 'dev', version: 's1', image })
  await agent.waitFor(/firmware download 20%/, 10000)
  server.faults.silent = true
  const mark = agent.log.mark()
  await agent.waitFor(/firmware chunk \d+ timed out/, 8000, mark)
  server.faults.silent = false
  const states = await finalOn(server, 'fw', 20000)
  assert.deepEqual(states, FULL, `fw_error ${server.latest('fw_error')}`)
  assert.ok(agent.installed('fw', 's1').equals(image))
})

test('mosquitto: broker restart mid-download: the agent reconnects, resumes where it stopped, image verified', async (t) => {
  // the agent's first reconnect comes after the server-role client's (100 ms), so its attribute
  // request after the restart is answered
  const { broker, server, agent } = await mqWorld(t, { chunk: 2048, args: ['--fw-window', '1', '--backoff-min', '600', '--backoff-max', '1000'] })
  const image = randomImage(128 * 1024, 27)
  server.faults.delayMs = 10
  await server.assign('fw', { title: 'dev', version: 'b1', image, algorithm: 'SHA384' })
  await agent.waitFor(/firmware download 30%/, 15000)
  const mark = agent.log.mark()
  const before = server.requests.length
  const maxBefore = Math.max(...server.requests.map((r) => r.idx))
  await broker.restart()
  await agent.waitFor(/connection lost/, 5000, mark)
  const states = await finalOn(server, 'fw', 30000)
  assert.deepEqual(states, FULL, `fw_error ${server.latest('fw_error')}\n${agent.log.tail(30)}`)
  const after = server.requests.slice(before)
  assert.ok(after.length > 0)
  assert.ok(after[0].idx > 0 && after[0].idx >= maxBefore - 2, `resumed at chunk ${after[0].idx} (had reached ${maxBefore}), not from 0`)
  assert.ok(after.length <= image.length / 2048 - maxBefore + 4, `${after.length} chunk requests after the restart`)
  assert.ok(agent.installed('fw', 'b1').equals(image), 'the image survives the broker restart intact')
})

test('mosquitto: chunk round trips are not held back by Nagle / delayed ACK (TCP_NODELAY)', async (t) => {
  // one chunk in flight at a time: every round trip pays the latency of the agent's socket.
  // The broker here runs with set_tcp_nodelay; a loopback round trip takes well under 1 ms.
  const { server } = await mqWorld(t, { chunk: 512, args: ['--fw-window', '1'] })
  const image = randomImage(64 * 512, 28)
  await server.assign('fw', { title: 'dev', version: 'n1', image })
  const states = await finalOn(server, 'fw', 30000)
  assert.deepEqual(states, FULL)
  const at = server.requests.map((r) => r.at)
  const perChunk = (at[at.length - 1] - at[0]) / (at.length - 1)
  assert.ok(perChunk < ms(10), `${perChunk.toFixed(1)} ms per chunk round trip with one chunk in flight ` +
    '(about 40 ms is the delayed-ACK stall of a socket without TCP_NODELAY)')
})

// ------------------------------------------------------------------------------------------
// a changing offer, restarts and hostile names (mosquitto)

// firmwareFiles(agent) -> the .part / .bin / job.json files left in the firmware state dir
function firmwareFiles (agent) {
  const dir = path.join(agent.stateDir, 'firmware')
  return fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => /\.(part|bin)$|^job\.json$/.test(f)) : []
}

// waitStates(server, kind, n, since) -> the states once n of them were reported and the last is final
async function waitStates (server, kind, n, ms_ = 20000, since = 0) {
  return waitUntil(() => {
    const s = server.states(kind, since)
    return s.length >= n && ['UPDATED', 'FAILED'].includes(s[s.length - 1]) ? s : null
  }, ms_, `${n} ${kind}_state values ending UPDATED or FAILED (seen: ${server.states(kind, since).join(', ')})`)
}

test('mosquitto: a package reassigned during a slow install(): the install result is kept, then the new package installs', async (t) => {
  const { server, agent } = await mqWorld(t, { env: { INSTALL_MS: String(ms(1500)) } })
  const a = randomImage(30000, 40)
  const b = randomImage(20000, 41)
  await server.assign('fw', { title: 'dev', version: 'i1', image: a })
  await server.waitState('fw', 'UPDATING', 10000)
  await agent.waitFor(/INSTALL START i1/, 5000)
  await server.assign('fw', { title: 'dev', version: 'i2', image: b })
  const states = await waitStates(server, 'fw', 10, 20000)
  assert.deepEqual(states, [...FULL, ...FULL], `fw_error ${server.latest('fw_error')}\n${agent.log.tail(30)}`)
  assert.ok(agent.installed('fw', 'i1').equals(a), 'the first install completed')
  assert.ok(agent.installed('fw', 'i2').equals(b), 'the reassigned package installed after it')
  const lines = agent.log.lines
  assert.ok(lines.findIndex((l) => /INSTALLED i1/.test(l)) < lines.findIndex((l) => /INSTALL START i2/.test(l)), 'one install after the other')
  await waitUntil(() => server.latest('current_fw_version') === 'i2', 5000, 'current_fw_version i2')
  assert.deepEqual(firmwareFiles(agent), [])
})

test('mosquitto: a package unassigned during a slow install(): the install still ends UPDATED and is recorded', async (t) => {
  const { server, agent } = await mqWorld(t, { env: { INSTALL_MS: String(ms(1500)) } })
  const a = randomImage(30000, 42)
  await server.assign('fw', { title: 'dev', version: 'u1', image: a })
  await agent.waitFor(/INSTALL START u1/, 10000)
  await server.unassign('fw')
  const states = await finalOn(server, 'fw', 10000)
  assert.deepEqual(states, FULL, `fw_error ${server.latest('fw_error')}\n${agent.log.tail(30)}`)
  assert.ok(agent.installed('fw', 'u1').equals(a))
  await waitUntil(() => server.latest('current_fw_version') === 'u1', 5000, 'current_fw_version u1')
  const current = JSON.parse(fs.readFileSync(path.join(agent.stateDir, 'firmware', 'current.json'), 'utf8'))
  assert.equal(current.version, 'u1', 'the installed version is recorded in the state directory')
  await sleep(ms(500))
  assert.deepEqual(server.states('fw'), FULL, 'nothing started after the unassignment')
})

test('mosquitto: the agent killed during install() (an installer that reboots): UPDATED at the next start when the script runs that version, else FAILED once; never installed twice', async (t) => {
  const slow = { INSTALL_MS: String(ms(60000)) }
  const { server, agent, start } = await mqWorld(t, { env: slow })
  await server.assign('fw', { title: 'dev', version: 'r1', image: randomImage(20000, 47) })
  await agent.waitFor(/INSTALL START r1/, 10000)
  await agent.kill('SIGKILL')
  server.forgetSession()
  // the device comes back up running r1: the script names it as current
  let since = Date.now()
  let nreq = server.requests.length
  const a2 = start({ dir: agent.dir, env: { ...slow, FW_CURRENT: 'r1' } })
  await server.waitState('fw', ['UPDATED', 'FAILED'], 10000, since)
  assert.deepEqual(server.states('fw', since), ['UPDATED'], `fw_error ${server.latest('fw_error')}\n${a2.log.tail(20)}`)
  await waitUntil(() => server.latest('current_fw_version') === 'r1', 5000, 'current_fw_version r1')
  assert.equal(server.requests.length, nreq, 'nothing downloaded again')
  assert.equal(a2.log.all(/INSTALL START/).length, 0)
  // r2 is killed during install() too, and the device comes back still on r1
  await server.assign('fw', { title: 'dev', version: 'r2', image: randomImage(20000, 48) })
  await a2.waitFor(/INSTALL START r2/, 10000)
  await a2.kill('SIGKILL')
  server.forgetSession()
  since = Date.now()
  nreq = server.requests.length
  const a3 = start({ dir: agent.dir, env: { ...slow, FW_CURRENT: 'r1' } })
  await server.waitState('fw', ['UPDATED', 'FAILED'], 10000, since)
  assert.deepEqual(server.states('fw', since), ['FAILED'])
  assert.match(server.latest('fw_error'), /install interrupted: .*dev r2 is not current \(the script says dev r1\)/)
  await stopChecked(a3)
  // and a further start leaves the package alone: no download, no install, no state
  since = Date.now()
  const a4 = start({ dir: agent.dir, env: { ...slow, FW_CURRENT: 'r1' } })
  await a4.waitFor(/session ready/, 8000)
  await waitUntil(() => server.telemetry.some((r) => r.at >= since && r.values.current_fw_version === 'r1'), 5000, 'current_fw_version reported')
  await sleep(ms(1000))
  assert.equal(server.requests.length, nreq, 'nothing downloaded again')
  assert.deepEqual(server.states('fw', since), [])
  assert.equal(a3.log.all(/INSTALL START/).length + a4.log.all(/INSTALL START/).length, 0)
})

test('mosquitto: a package replaced mid-download: the old attempt stops and its partial file goes, the new one ends UPDATED', async (t) => {
  const { server, agent } = await mqWorld(t, { chunk: 2048, args: ['--fw-window', '1'] })
  server.faults.delayMs = 5
  const a = randomImage(128 * 1024, 43)
  const b = randomImage(40 * 1024 + 3, 44)
  await server.assign('fw', { title: 'dev', version: 'ra', image: a })
  await agent.waitFor(/firmware download 30%/, 15000)
  assert.ok(fs.existsSync(path.join(agent.stateDir, 'firmware', 'dev-ra.part')), 'A is being downloaded to dev-ra.part')
  await server.assign('fw', { title: 'dev', version: 'rb', image: b })
  const states = await waitStates(server, 'fw', 6, 20000)
  assert.deepEqual(states, ['DOWNLOADING', ...FULL], `fw_error ${server.latest('fw_error')}\n${agent.log.tail(30)}`)
  assert.ok(agent.log.find(/firmware dev ra withdrawn or replaced; abandoning its download/))
  assert.ok(agent.installed('fw', 'rb').equals(b))
  assert.equal(agent.installed('fw', 'ra'), null)
  const lastA = server.requests.map((r) => r.version).lastIndexOf('ra')
  const firstB = server.requests.findIndex((r) => r.version === 'rb')
  assert.ok(lastA >= 0 && firstB > lastA, `chunk requests of A (last #${lastA}) stop before those of B (first #${firstB})`)
  assert.ok(server.requests.filter((r) => r.version === 'ra').length < a.length / 2048, 'A was not downloaded to the end')
  assert.deepEqual(firmwareFiles(agent), [], 'no partial file of A (or B) left')
})

test('mosquitto: a package unassigned mid-download: chunk requests stop, the partial file goes', async (t) => {
  const { server, agent } = await mqWorld(t, { chunk: 2048, args: ['--fw-window', '2'] })
  server.faults.delayMs = 5
  await server.assign('fw', { title: 'dev', version: 'ua', image: randomImage(128 * 1024, 45) })
  await agent.waitFor(/firmware download 30%/, 15000)
  const mark = agent.log.mark()
  await server.unassign('fw')
  await agent.waitFor(/firmware dev ua withdrawn or replaced; abandoning its download/, 5000, mark)
  await sleep(ms(200))
  const n = server.requests.length
  await sleep(ms(1500))
  assert.equal(server.requests.length, n, 'no chunk request after the unassignment')
  assert.deepEqual(firmwareFiles(agent), [], 'the partial file is removed')
  assert.deepEqual(server.states('fw'), ['DOWNLOADING'], 'no state after the withdrawal')
  assert.equal(agent.log.find(/internal error|failed:/, mark), null, agent.log.tail(20))
  assert.ok(agent.running())
})

test('mosquitto: after UPDATED, an agent restarted with the same --state-dir reports the new version and downloads nothing', async (t) => {
  const { server, agent, start } = await mqWorld(t)
  const image = randomImage(50000, 46)
  await server.assign('fw', { title: 'dev', version: 'p2', image })
  assert.deepEqual(await finalOn(server, 'fw'), FULL)
  await stopChecked(agent)
  const since = Date.now()
  const nreq = server.requests.length
  const a2 = start({ dir: agent.dir })
  await a2.waitFor(/session ready/, 8000)
  // the package is still assigned: the attribute answer offers it again
  await waitUntil(() => server.attrRequests.length >= 2, 5000, 'the restarted agent asks for its attributes')
  await waitUntil(() => server.telemetry.some((r) => r.at >= since && r.values.current_fw_version === 'p2'), 5000,
    'current_fw_version p2 reported after the restart')
  await sleep(ms(1500))
  assert.equal(server.requests.length, nreq, 'no chunk requested after the restart')
  assert.deepEqual(server.telemetry.filter((r) => r.at >= since && r.values.fw_state).map((r) => r.values.fw_state), [], 'no fw_state after the restart')
  assert.equal(server.telemetry.filter((r) => r.at >= since && 'current_fw_version' in r.values).at(-1).values.current_fw_title, 'dev')
  assert.equal(a2.installed('fw', 'p2').length, image.length)
})

// a policy that keeps what it installs under a fixed name and logs the path it was given
const HOSTILE_POLICY = `
local tb = require "tb"
local function keep(kind, path, info)
  tb.log.info("INSTALL PATH %s %s", kind, path)
  local f = assert(io.open(path, "rb")); local d = f:read("a"); f:close()
  local g = assert(io.open(os.getenv("OUT") .. "/" .. kind .. "-installed.bin", "wb")); g:write(d); g:close()
  return true
end
tb.firmware{current = {title = "dev", version = "1.0"}, chunk_size = 4096, install = function(p, i) return keep("fw", p, i) end}
tb.software{current = {title = "app", version = "1"}, chunk_size = 4096, install = function(p, i) return keep("sw", p, i) end}
`

// walk(dir) -> every file below dir (absolute paths)
function walk (dir) {
  const out = []
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name)
    if (e.isDirectory()) out.push(...walk(p)); else out.push(p)
  }
  return out
}

test('mosquitto: hostile fw_title / fw_version ("../../etc/x") never escape the state directory', async (t) => {
  const { server, agent } = await mqWorld(t, { script: HOSTILE_POLICY })
  const fw = randomImage(9000, 47)
  const sw = randomImage(7000, 48)
  const passwd = fs.statSync('/etc/passwd').mtimeMs
  await server.assign('fw', { title: '../../etc/x', version: '../../../x/../y', image: fw })
  assert.deepEqual(await finalOn(server, 'fw'), FULL, `fw_error ${server.latest('fw_error')}\n${agent.log.tail(20)}`)
  await server.assign('sw', { title: '/etc/passwd', version: '..', image: sw })
  assert.deepEqual(await finalOn(server, 'sw'), FULL, `sw_error ${server.latest('sw_error')}\n${agent.log.tail(20)}`)
  const stateDir = fs.realpathSync(agent.stateDir)
  for (const line of agent.log.all(/INSTALL PATH/)) {
    const p = /INSTALL PATH \w+ (.*)$/.exec(line)[1]
    const real = path.resolve(agent.dir, p)
    assert.ok(real.startsWith(stateDir + path.sep), `install() got ${p}, outside ${stateDir}`)
    assert.equal(path.normalize(p), p, `the path has no .. or // in it: ${p}`)
  }
  assert.ok(fs.readFileSync(path.join(agent.out, 'fw-installed.bin')).equals(fw))
  assert.ok(fs.readFileSync(path.join(agent.out, 'sw-installed.bin')).equals(sw))
  // every file in the agent's directory is the script, an installed copy or in the state dir
  for (const f of walk(agent.dir)) {
    assert.ok(f === path.join(agent.dir, 'device.lua') || f.startsWith(agent.stateDir + path.sep) || f.startsWith(agent.out + path.sep),
      `file outside the state dir: ${f}`)
  }
  // where the names would lead if they were used as paths
  for (const [sub, title, version] of [['firmware', '../../etc/x', '../../../x/../y'], ['software', '/etc/passwd', '..']]) {
    for (const p of [path.resolve(agent.stateDir, sub, title), path.resolve(agent.stateDir, sub, version), path.resolve(agent.stateDir, sub, title + '-' + version + '.part')]) {
      if (p === '/etc/passwd') continue
      assert.ok(!fs.existsSync(p) || p.startsWith(agent.stateDir) || p === agent.stateDir, `${p} was created`)
    }
  }
  assert.equal(fs.existsSync(path.join(path.dirname(agent.dir), 'etc')), false)
  assert.equal(fs.existsSync(path.join(path.dirname(agent.dir), 'y')), false)
  assert.equal(fs.statSync('/etc/passwd').mtimeMs, passwd, '/etc/passwd untouched')
  assert.deepEqual(fs.readdirSync(agent.stateDir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name).sort(), ['firmware', 'software'])
  assert.equal(server.latest('current_fw_title'), '../../etc/x', 'the title is reported as the server sent it')
})

// ------------------------------------------------------------------------------------------
// HTTP(S) URL packages (tbemu)

// throwawayCa(dir) -> {ca, key, cert} file paths: a CA made for this test and a server
// certificate it signed for 127.0.0.1 / localhost
function throwawayCa (dir) {
  const f = (n) => path.join(dir, n)
  const ossl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: ms(20000) })
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
  ossl('req', '-x509', ...ec, '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', '/CN=tbagent itest throwaway CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
  ossl('req', ...ec, '-keyout', f('srv.key'), '-out', f('srv.csr'), '-subj', '/CN=127.0.0.1')
  fs.writeFileSync(f('srv.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' +
    'keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n')
  ossl('x509', '-req', '-in', f('srv.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
    '-out', f('srv.pem'), '-days', '2', '-extfile', f('srv.ext'))
  return { ca: f('ca.pem'), key: f('srv.key'), cert: f('srv.pem') }
}

// rangeStart(header) -> N of a "bytes=N-" Range header, or null
function rangeStart (header) {
  const m = /^bytes=(\d+)-$/.exec(header || '')
  return m ? Number(m[1]) : null
}

// serveRange(req, res, image): the image as a server that honours Range sends it: 206 with the
// rest from byte N for "bytes=N-", 416 from past its end, 200 with all of it without a Range
function serveRange (req, res, image) {
  const from = rangeStart(req.headers.range) ?? 0
  if (from >= image.length) { res.writeHead(416, { 'content-range': `bytes */${image.length}` }); res.end(); return }
  res.writeHead(from ? 206 : 200, { 'content-length': image.length - from, ...(from ? { 'content-range': `bytes ${from}-${image.length - 1}/${image.length}` } : {}) })
  res.end(image.subarray(from))
}

// cutAfter(res, image, n): a 200 for the whole image whose connection is destroyed after n bytes
function cutAfter (res, image, n) {
  res.writeHead(200, { 'content-length': image.length })
  res.write(image.subarray(0, n), () => setTimeout(() => res.socket.destroy(), 50))
}

// serve(t, handler, tls) -> base URL of a server on 127.0.0.1 (closed after the test)
async function serve (t, handler, tls) {
  const srv = tls ? https.createServer({ key: fs.readFileSync(tls.key), cert: fs.readFileSync(tls.cert) }, handler) : http.createServer(handler)
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve))
  t.after(() => new Promise((resolve) => { srv.closeAllConnections(); srv.close(resolve) }))
  return `${tls ? 'https' : 'http'}://127.0.0.1:${srv.address().port}`
}

test('tbemu: an https URL package: FAILED with a TLS verification fw_error without the CA, UPDATED with --http-cafile', async (t) => {
  const emu = await emuWorld(t, ['noca', 'withca'])
  const tls = throwawayCa(tmpdir('tbota-ca-'))
  const image = randomImage(150000, 50)
  const seen = []
  const base = await serve(t, (req, res) => {
    seen.push(req.url)
    res.writeHead(200, { 'content-length': image.length })
    res.end(image)
  }, tls)
  const a1 = emuAgent(t, emu, 'noca')
  const a2 = emuAgent(t, emu, 'withca', { args: ['--http-cafile', tls.ca] })
  await a1.waitFor(/session ready/, 8000)
  await a2.waitFor(/session ready/, 8000)

  await t.test('without the CA: refused, not retried', async () => {
    const r = await update(emu, 'noca', image, { title: 'dev', version: '20.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` })
    assert.deepEqual(r.states, ['DOWNLOADING', 'FAILED'], `fw_error ${r.error}`)
    assert.match(r.error, /TLS verification failed/, r.error)
    assert.match(r.error, /certificate/i, r.error)
    assert.equal(a1.installed('fw', '20.0'), null)
    assert.equal(a1.log.find(/download interrupted/), null, 'a verification failure is not retried')
  })

  await t.test('with --http-cafile', async () => {
    await expectUpdated(emu, a2, 'withca', image, { title: 'dev', version: '21.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` }, 'https')
  })
})

test('tbemu: an HTTP body longer than fw_size ends FAILED ("larger than the announced size")', async (t) => {
  const { emu, agent } = await emuDevice(t)
  const image = randomImage(100000, 51)
  const longer = Buffer.concat([image, randomImage(5000, 52)])
  const base = await serve(t, (req, res) => {
    res.writeHead(200, { 'content-length': longer.length })
    res.end(longer)
  })
  const r = await update(emu, 'dev1', image, { title: 'dev', version: '22.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` })
  assert.deepEqual(r.states, ['DOWNLOADING', 'FAILED'], `fw_error ${r.error}`)
  assert.match(r.error, /larger than the announced size/)
  assert.equal(agent.installed('fw', '22.0'), null)
  await sleep(ms(300))
  assert.deepEqual(firmwareFiles(agent), [], 'nothing kept')
})

test('tbemu: a .part already complete at a restart is verified without a Range request past its end', async (t) => {
  const emu = await emuWorld(t)
  const dir = tmpdir('tbota-complete-')
  const image = randomImage(120000, 53)
  const seen = []
  const base = await serve(t, (req, res) => {
    seen.push(req.headers.range || null)
    if (seen.length === 1) {
      // the whole image, chunked, but the response never ends: the agent is killed with
      // every byte on disk and nothing verified yet
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      res.write(image)
      return
    }
    serveRange(req, res, image)
  })
  const a1 = emuAgent(t, emu, 'dev1', { dir })
  await a1.waitFor(/session ready/, 8000)
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '23.0', checksumAlgorithm: 'SHA384', url: `${base}/fw.bin` })
  const part = path.join(a1.stateDir, 'firmware', 'dev-23.0.part')
  await waitUntil(() => fs.existsSync(part) && fs.statSync(part).size === image.length, 10000, 'the whole image in the .part file')
  await a1.kill('SIGKILL')
  const a2 = emuAgent(t, emu, 'dev1', { dir })
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since, 15000)
  assert.equal(r.states[r.states.length - 1], 'UPDATED', `states ${r.states}, fw_error ${r.error}; Range headers ${JSON.stringify(seen)}\n${a2.log.tail(20)}`)
  assert.ok(a2.installed('fw', '23.0').equals(image))
  assert.deepEqual(seen, [null], `requests (Range headers): ${JSON.stringify(seen)}`)
  assert.ok(a2.log.find(/firmware download already complete on disk \(120000 bytes\); verifying it/), a2.log.tail(20))
})

// partSize(agent, version) -> bytes in the agent's dev-<version>.part (-1: no such file)
function partSize (agent, version) {
  try { return fs.statSync(path.join(agent.stateDir, 'firmware', `dev-${version}.part`)).size } catch { return -1 }
}

test('tbemu: an HTTP server that ignores Range (200 with the whole image to a resume) still ends UPDATED with the exact image', async (t) => {
  const { emu, agent } = await emuDevice(t)
  const image = randomImage(200 * 1024, 54)
  const CUT = 70000
  const HEAD = 20000 // what the second response sends before pausing: less than what is on disk
  const seen = [] // Range header of every request
  let shrunkTo = null // the .part size seen while the second response was paused
  const base = await serve(t, async (req, res) => {
    seen.push(req.headers.range || null)
    if (seen.length === 1) return cutAfter(res, image, CUT) // the first response is cut part-way
    // any later request: Range ignored, 200 with the whole image from byte 0, paused after
    // HEAD bytes until the agent's .part file shows it started over (bounded; given up when
    // the agent drops the connection)
    let closed = false
    res.on('close', () => { closed = true })
    res.writeHead(200, { 'content-length': image.length })
    res.write(image.subarray(0, HEAD))
    const deadline = Date.now() + ms(3000)
    while (!closed && Date.now() < deadline && partSize(agent, '24.0') !== HEAD) await sleep(10)
    if (shrunkTo === null) shrunkTo = partSize(agent, '24.0')
    if (!closed) res.end(image.subarray(HEAD))
  })
  const mark = agent.log.mark()
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '24.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` })
  // the final state, or (fast) the sign that libcurl refused the 200 instead of the agent taking it
  const REFUSED = /doesn't seem to support byte ranges|Cannot resume/
  let r
  await waitUntil(async () => {
    if (agent.log.find(REFUSED, mark)) return true
    r = await deviceStates(emu, emu.ids.dev1, 'fw', since)
    return ['UPDATED', 'FAILED'].includes(r.states[r.states.length - 1])
  }, 15000, 'fw_state UPDATED or FAILED')
  assert.equal(agent.log.find(REFUSED, mark), null, 'the 200 answer to the Range request must restart the download from byte 0 ' +
    '(src/http.c on_write), not fail the attempt; Range headers ' + JSON.stringify(seen) + '\n' + agent.log.tail(10))
  assert.deepEqual(r.states, FULL, `fw_error ${r.error}; Range headers ${JSON.stringify(seen)}\n${agent.log.tail(20)}`)
  assert.equal(seen.length, 2, `requests (Range headers): ${JSON.stringify(seen)}`)
  assert.equal(seen[0], null, 'the first request is a plain GET')
  const resumedAt = rangeStart(seen[1])
  assert.ok(resumedAt > 0 && resumedAt <= CUT, `the second request asks for the rest with Range: ${seen[1]}`)
  // the sink was reset on the 200: the .part went from the resumed offset back to the bytes of
  // the new response (appending would have left it at offset + HEAD)
  assert.equal(shrunkTo, HEAD, `.part size while the 200 to the Range request was paused (resumed at ${resumedAt})`)
  assert.ok(agent.log.find(/firmware download interrupted: .*; resuming/, mark), agent.log.tail(20))
  assert.equal(agent.log.find(/refused the resume|larger than/, mark), null, agent.log.tail(20))
  assert.ok(agent.installed('fw', '24.0').equals(image), 'the installed image is the exact image')
  assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '24.0')
})

test('tbemu: agent kill -9 mid HTTP download, restarted with the same --state-dir, resumes with Range and ends UPDATED', async (t) => {
  const emu = await emuWorld(t)
  const dir = tmpdir('tbota-httpkill-')
  const image = randomImage(200 * 1024, 55)
  const SENT = 90000
  const seen = [] // Range header of every request
  const base = await serve(t, (req, res) => {
    seen.push(req.headers.range || null)
    if (seen.length === 1) {
      // part of the image, then the response stalls (never ends) until the agent is killed
      res.writeHead(200, { 'content-length': image.length })
      res.write(image.subarray(0, SENT))
      return
    }
    serveRange(req, res, image)
  })
  const a1 = emuAgent(t, emu, 'dev1', { dir })
  await a1.waitFor(/session ready/, 8000)
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '25.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` })
  await waitUntil(() => partSize(a1, '25.0') === SENT, 10000, `${SENT} bytes in the .part file`)
  const { signal } = await a1.kill('SIGKILL')
  assert.equal(signal, 'SIGKILL')
  const onDisk = partSize(a1, '25.0')
  assert.equal(onDisk, SENT, 'the partial download survives the kill')
  const a2 = emuAgent(t, emu, 'dev1', { dir })
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since, 15000)
  assert.equal(r.states[r.states.length - 1], 'UPDATED', `states ${r.states}, fw_error ${r.error}; Range headers ${JSON.stringify(seen)}\n${a2.log.tail(20)}`)
  assert.equal(seen.length, 2, `requests (Range headers): ${JSON.stringify(seen)}`)
  assert.equal(seen[0], null, 'the first agent starts with a plain GET')
  const from = rangeStart(seen[1])
  assert.ok(from !== null, `the restarted agent resumes with Range: ${seen[1]}`)
  assert.ok(from > 0 && from <= onDisk && from >= onDisk - 64 * 1024, `Range starts at byte ${from}, ${onDisk} bytes were on disk`)
  assert.ok(a2.installed('fw', '25.0').equals(image), 'the resumed image is the exact image')
  assert.equal(await latest(emu, emu.ids.dev1, 'current_fw_version'), '25.0')
  assert.deepEqual(firmwareFiles(a2), [], 'nothing left in the firmware state dir')
})

test('tbemu: a resume answered with a 206 that starts at another byte is refused, and the download starts over from byte 0 once', async (t) => {
  const { emu, agent } = await emuDevice(t)
  const image = randomImage(200 * 1024, 56)
  const CUT = 70000
  const seen = [] // Range header of every request
  const base = await serve(t, (req, res) => {
    seen.push(req.headers.range || null)
    if (seen.length === 1) return cutAfter(res, image, CUT)
    const asked = rangeStart(req.headers.range)
    if (asked !== null) {
      // a server (a CDN) that aligns ranges: it answers from the 64 KiB boundary below
      const from = asked - (asked % 65536)
      res.writeHead(206, { 'content-length': image.length - from, 'content-range': `bytes ${from}-${image.length - 1}/${image.length}` })
      res.end(image.subarray(from))
      return
    }
    res.writeHead(200, { 'content-length': image.length })
    res.end(image)
  })
  const mark = agent.log.mark()
  const { since } = await assign(emu, 'dev1', image, { title: 'dev', version: '25.0', checksumAlgorithm: 'SHA256', url: `${base}/fw.bin` })
  const r = await waitFinal(emu, emu.ids.dev1, 'fw', since, 20000)
  assert.deepEqual(r.states, FULL, `fw_error ${r.error}; Range headers ${JSON.stringify(seen)}\n${agent.log.tail(20)}`)
  assert.equal(seen.length, 3, `requests (Range headers): ${JSON.stringify(seen)}`)
  assert.deepEqual([seen[0], seen[2]], [null, null], 'the first request and the fresh one after the refusal are plain GETs')
  assert.match(seen[1] || '', /^bytes=\d+-$/)
  assert.ok(agent.log.find(/refused the resume \(the server sent a range starting at byte \d+, not \d+\); downloading again from byte 0/, mark), agent.log.tail(20))
  assert.ok(agent.installed('fw', '25.0').equals(image), 'the installed image is the exact image')
})
