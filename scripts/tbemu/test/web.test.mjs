// The live web page in real headless Chromium (Debian's chromium, driven by playwright-core).
// Fails (never skips) when chromium is missing.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import crypto from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { startEmu, connect, subscribe, publish, end, waitFor, HERE, openBrowser } from './helpers.mjs'

const ART = path.join(HERE, 'artifacts')
const ROOT = path.resolve(HERE, '..', '..', '..')
const SHOTS = [path.join(ART, 'page.png'), path.join(ROOT, 'build', 'test-logs', 'tbemu-page.png')]
const T = { timeout: 15000 } // the page's waits; generous: 2 cores shared with other test runs
const waitMsg = (c, pred, what) => waitFor(() => c.received.find(m => typeof pred === 'string' ? m.topic === pred : pred(m)), { what, timeoutMs: 15000 })
let emu, browser, opened

before(async () => {
  emu = await startEmu(['--device', 'web1:WEB1'])
  opened = await openBrowser()
  browser = opened.browser
})
after(async () => {
  if (opened) await opened.close()
  if (emu) assert.equal(await emu.stop(), 0)
})

// The screenshot is taken in a `finally`, so it is kept from every run, passing or failing.
async function screenshot (page, failed) {
  try {
    const png = await page.screenshot({ fullPage: true, timeout: 15000 })
    for (const f of SHOTS) { fs.mkdirSync(path.dirname(f), { recursive: true }); fs.writeFileSync(f, png) }
    assert.ok(png.length > 1000, 'screenshot is too small')
  } catch (e) {
    if (!failed) throw e
    console.error('web.test: screenshot after the failure did not work either: ' + e.message)
  }
}

// Chunks of the assigned firmware over v2/fw, as a device fetches them: reqId 1, `chunkSize`
// bytes each, until the short (or empty) last chunk or `size` bytes.
async function download (c, size, chunkSize) {
  const parts = []
  let got = 0
  for (let idx = 0; ; idx++) {
    const n = c.received.length
    const topic = `v2/fw/response/1/chunk/${idx}`
    await publish(c, `v2/fw/request/1/chunk/${idx}`, String(chunkSize))
    const m = await waitFor(() => c.received.slice(n).find(x => x.topic === topic), { what: topic, timeoutMs: 15000 })
    parts.push(m.payload)
    got += m.payload.length
    if (m.payload.length < chunkSize || got >= size) break
  }
  return Buffer.concat(parts)
}

test('page shows a device connecting and telemetry live; the attribute and RPC forms reach the device; a firmware uploaded and assigned on the page goes to UPDATED', async () => {
  const page = await browser.newPage()
  let failed = true
  let c
  try {
    await page.goto(emu.base + '/')
    const card = page.locator('section.device[data-name="web1"]')
    await card.waitFor(T)
    await page.waitForFunction(() => document.querySelector('#status').textContent === 'live', null, T)
    assert.match(await card.locator('.conn').textContent(), /disconnected/)

    c = await connect(emu, { username: 'WEB1' })
    await card.locator('.conn.on').waitFor(T)
    await subscribe(c, 'v1/devices/me/attributes')
    await subscribe(c, 'v1/devices/me/rpc/request/+')
    await subscribe(c, 'v2/fw/response/+/chunk/+')
    c.on('message', (topic) => { if (topic.startsWith('v1/devices/me/rpc/request/')) c.publish(topic.replace('request', 'response'), '{"pong":true}') })

    await publish(c, 'v1/devices/me/telemetry', '{"temperature":21.5}')
    await card.locator('.telemetry tr[data-key="temperature"] .value', { hasText: '21.5' }).waitFor(T)
    await publish(c, 'v1/devices/me/telemetry', '{"temperature":22.75}')
    await card.locator('.telemetry tr[data-key="temperature"] .value', { hasText: '22.75' }).waitFor(T)

    await card.locator('.attr-form input[name="key"]').fill('targetTemp')
    await card.locator('.attr-form input[name="value"]').fill('19.5')
    await card.locator('.attr-form button').click()
    const push = await waitMsg(c, 'v1/devices/me/attributes', 'attribute push')
    assert.equal(push.text, '{"targetTemp":19.5}')
    await card.locator('.attributes tr[data-key="targetTemp"]').waitFor(T)

    await card.locator('.rpc-form input[name="method"]').fill('ping')
    await card.locator('.rpc-form button').click()
    await card.locator('.rpc-result', { hasText: 'HTTP 200 {"pong":true}' }).waitFor(T)

    // Firmware through the page's upload form: a file, a title and a version, SHA256 (the default).
    await publish(c, 'v1/devices/me/telemetry', '{"current_fw_title":"demo-fw","current_fw_version":"1.0.0"}')
    const image = Buffer.alloc(5000)
    for (let i = 0; i < image.length; i++) image[i] = (i * 7 + (i >> 8)) & 0xff
    const upload = page.locator('#upload-form')
    await upload.locator('input[type="file"]').setInputFiles({ name: 'demo-fw-2.0.0.bin', mimeType: 'application/octet-stream', buffer: image })
    await upload.locator('input[name="title"]').fill('demo-fw')
    await upload.locator('input[name="version"]').fill('2.0.0')
    await upload.locator('button').click()
    await page.waitForFunction(() => document.querySelector('#upload-form').dataset.status === '200', null, T)
    const row = page.locator('#package-table tbody tr', { hasText: 'demo-fw' })
    await row.waitFor(T)
    const sha = crypto.createHash('sha256').update(image).digest('hex')
    assert.match(await row.textContent(), new RegExp(`FIRMWARE\\s*demo-fw\\s*2\\.0\\.0\\s*5000\\s*SHA256 ${sha}`))
    const pkgs = await emu.get('/emu/packages')
    assert.equal(pkgs.length, 1)
    assert.deepEqual([pkgs[0].title, pkgs[0].version, pkgs[0].size, pkgs[0].checksum], ['demo-fw', '2.0.0', 5000, sha])

    // ...assigned through the card's form
    await card.locator('.assign-form select option', { hasText: 'FIRMWARE demo-fw 2.0.0' }).waitFor({ state: 'attached', ...T })
    await card.locator('.assign-form select').selectOption({ label: 'FIRMWARE demo-fw 2.0.0' })
    await card.locator('.assign-form button').click()
    const fw = JSON.parse((await waitMsg(c, m => m.text.includes('"fw_title":"demo-fw"'), 'fw attributes')).text)
    assert.deepEqual(fw, { fw_title: 'demo-fw', fw_version: '2.0.0', fw_tag: 'demo-fw 2.0.0', fw_size: 5000, fw_checksum_algorithm: 'SHA256', fw_checksum: sha })
    const fwState = (st) => card.locator('.ota-firmware .fw-state', { hasText: new RegExp(`^${st}$`) }).waitFor(T)
    await fwState('INITIATED')

    // ...and installed by the device, the page following each state the device reports
    const report = async (st, extra = {}) => {
      await publish(c, 'v1/devices/me/telemetry', JSON.stringify({ fw_state: st, ...extra }))
      await fwState(st)
    }
    await report('DOWNLOADING')
    const got = await download(c, fw.fw_size, 1024)
    assert.equal(got.length, 5000)
    await report('DOWNLOADED')
    assert.equal(crypto.createHash('sha256').update(got).digest('hex'), fw.fw_checksum)
    await report('VERIFIED')
    await report('UPDATING')
    await report('UPDATED', { current_fw_title: 'demo-fw', current_fw_version: '2.0.0' })
    await card.locator('.ota-firmware', { hasText: /current demo-fw 2\.0\.0 → target demo-fw 2\.0\.0/ }).waitFor(T)
    const d = await emu.get('/emu/devices/web1')
    assert.equal(d.ota.FIRMWARE.state, 'UPDATED')
    assert.equal(d.ota.FIRMWARE.currentVersion, '2.0.0')

    await end(c)
    c = null
    await card.locator('.conn.off').waitFor(T)
    await waitFor(async () => !(await emu.get('/emu/devices/web1')).connected, { what: 'disconnected', timeoutMs: 15000 })
    failed = false
  } finally {
    await screenshot(page, failed)
    if (c) await end(c)
  }
})
