// The live web page in real headless Chromium (Debian's chromium, driven by playwright-core).
// Fails (never skips) when chromium is missing.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { chromium } from 'playwright-core'
import { startEmu, connect, subscribe, publish, end, waitFor, waitMsg, HERE } from './helpers.mjs'

const CHROMIUM = '/usr/bin/chromium'
const ART = path.join(HERE, 'artifacts')
let emu, browser, profile

before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium`)
  emu = await startEmu(['--device', 'web1:WEB1'])
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-chromium-'))
  // a fresh --user-data-dir: playwright takes it as launchPersistentContext's first argument
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync']
  })
})
after(async () => {
  if (browser) await browser.close()
  if (profile) fs.rmSync(profile, { recursive: true, force: true })
  if (emu) assert.equal(await emu.stop(), 0)
})

test('page shows a device connecting and telemetry live; the attribute form reaches the device; RPC and firmware state', async () => {
  const page = await browser.newPage()
  await page.goto(emu.base + '/')
  const card = page.locator('section.device[data-name="web1"]')
  await card.waitFor()
  await page.waitForFunction(() => document.querySelector('#status').textContent === 'live')
  assert.match(await card.locator('.conn').textContent(), /disconnected/)

  const c = await connect(emu, { username: 'WEB1' })
  await card.locator('.conn.on').waitFor({ timeout: 5000 })
  await subscribe(c, 'v1/devices/me/attributes')
  await subscribe(c, 'v1/devices/me/rpc/request/+')
  c.on('message', (topic, payload) => { if (topic.startsWith('v1/devices/me/rpc/request/')) c.publish(topic.replace('request', 'response'), '{"pong":true}') })

  await publish(c, 'v1/devices/me/telemetry', '{"temperature":21.5}')
  await card.locator('.telemetry tr[data-key="temperature"] .value', { hasText: '21.5' }).waitFor({ timeout: 5000 })
  await publish(c, 'v1/devices/me/telemetry', '{"temperature":22.75}')
  await card.locator('.telemetry tr[data-key="temperature"] .value', { hasText: '22.75' }).waitFor({ timeout: 5000 })

  await card.locator('.attr-form input[name="key"]').fill('targetTemp')
  await card.locator('.attr-form input[name="value"]').fill('19.5')
  await card.locator('.attr-form button').click()
  const push = await waitMsg(c, 'v1/devices/me/attributes', 'attribute push')
  assert.equal(push.text, '{"targetTemp":19.5}')
  await card.locator('.attributes tr[data-key="targetTemp"]').waitFor({ timeout: 5000 })

  await card.locator('.rpc-form input[name="method"]').fill('ping')
  await card.locator('.rpc-form button').click()
  await card.locator('.rpc-result', { hasText: 'HTTP 200 {"pong":true}' }).waitFor({ timeout: 5000 })

  const pkg = (await emu.api('POST', '/emu/packages?title=demo-fw&version=2.0', new Uint8Array(Buffer.alloc(1000, 1)))).json
  await page.waitForFunction(() => document.querySelector('#package-table tbody').textContent.includes('demo-fw'))
  await card.locator('.assign-form select').selectOption(pkg.id)
  await card.locator('.assign-form button').click()
  await waitMsg(c, m => m.text.includes('"fw_title":"demo-fw"'), 'fw attributes')
  await card.locator('.fw-state', { hasText: 'INITIATED' }).waitFor({ timeout: 5000 })
  await publish(c, 'v1/devices/me/telemetry', '{"fw_state":"DOWNLOADING","current_fw_title":"demo-fw","current_fw_version":"1.0"}')
  await card.locator('.fw-state', { hasText: 'DOWNLOADING' }).waitFor({ timeout: 5000 })

  fs.mkdirSync(ART, { recursive: true })
  await page.screenshot({ path: path.join(ART, 'page.png'), fullPage: true })
  assert.ok(fs.statSync(path.join(ART, 'page.png')).size > 1000)

  await end(c)
  await card.locator('.conn.off').waitFor({ timeout: 5000 })
  await waitFor(async () => !(await emu.get('/emu/devices/web1')).connected)
})
