// The page's charts, message log and controls in real headless Chromium, each checked on the
// wire with an MQTT client acting as the device; a restart on --data-dir (after SIGKILL) seen
// on the page; screenshots at 1280 px and 390 px in build/screenshots/ (kept from every run).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { startEmu, connect, subscribe, publish, end, waitFor, sleep, HERE, openBrowser } from './helpers.mjs'

const SHOTS = path.resolve(HERE, '..', '..', '..', 'build', 'screenshots')
const T = { timeout: 15000 } // generous: 2 cores shared with other test runs
const waitMsg = (c, pred, what) => waitFor(() => c.received.find(m => typeof pred === 'string' ? m.topic === pred : pred(m)), { what, timeoutMs: 15000 })
let browser, opened

before(async () => {
  opened = await openBrowser()
  browser = opened.browser
})
after(async () => {
  if (opened) await opened.close()
})

async function shot (page, name) {
  fs.mkdirSync(SHOTS, { recursive: true })
  await page.screenshot({ path: path.join(SHOTS, name), fullPage: true, timeout: 15000 })
}

// No horizontal scrolling, and no time stamp broken over two lines.
async function assertFits (page, width) {
  const r = await page.evaluate(() => {
    const wrapped = [...document.querySelectorAll('td.ts, .msg-head time, .tl-axis span')]
      .filter(el => el.offsetParent && el.getBoundingClientRect().height > 1.6 * parseFloat(getComputedStyle(el).lineHeight))
      .map(el => el.textContent)
    return { scroll: document.documentElement.scrollWidth, wrapped }
  })
  assert.ok(r.scroll <= width, `${width} px: the page is ${r.scroll} px wide`)
  assert.deepEqual(r.wrapped, [], `${width} px: wrapped time stamps`)
}

test('charts grow with telemetry, keys share a chart, zoom; the log shows an RPC both ways; delete attribute, client-RPC rule and unassign act on the wire; 1280 and 390 px', async () => {
  const emu = await startEmu(['--device', 'pg:PG'])
  const page = await browser.newPage()
  let c
  try {
    page.on('pageerror', e => { throw new Error('page error: ' + e.message) })
    c = await connect(emu, { username: 'PG' })
    for (const t of ['v1/devices/me/attributes', 'v1/devices/me/rpc/request/+', 'v1/devices/me/rpc/response/+', 'v2/fw/response/+/chunk/+']) await subscribe(c, t)
    c.on('message', (topic) => { if (topic.startsWith('v1/devices/me/rpc/request/')) c.publish(topic.replace('request', 'response'), '{"pong":true}') })
    const now = Date.now()
    const history = []
    for (let i = 30; i > 0; i--) history.push({ ts: now - i * 5000, values: { temperature: 20 + (i % 5) / 2, humidity: 40 + (i % 3), mode: i > 15 ? 'heat' : 'idle', heating: i % 10 < 5 } })
    await publish(c, 'v1/devices/me/telemetry', JSON.stringify(history))

    await page.goto(emu.base + '/#pg')
    const card = page.locator('section.device[data-name="pg"]')
    await card.locator('.conn.on').waitFor(T)
    const chart = card.locator('.chart[data-keys="temperature"]')
    await chart.locator('canvas').waitFor(T)
    const points = async () => Number(await chart.getAttribute('data-points'))
    await waitFor(async () => await points() === 30, { what: '30 points of history', timeoutMs: 15000 })
    // own timestamps: messages a millisecond apart would share the arrival time, one point
    const t0 = Date.now() - 1000
    for (let i = 0; i < 3; i++) await publish(c, 'v1/devices/me/telemetry', JSON.stringify({ ts: t0 + i * 100, values: { temperature: 22 + i } }))
    await waitFor(async () => await points() === 33, { what: 'the chart to grow to 33 points', timeoutMs: 15000 })

    // a double 3.0 shows as 3.0; text and boolean keys get timelines
    await publish(c, 'v1/devices/me/telemetry', '{"ratio":3.0}')
    await card.locator('.telemetry tr[data-key="ratio"] .value', { hasText: /^3\.0$/ }).waitFor(T)
    assert.equal(await card.locator('.telemetry tr[data-key="ratio"] .type').textContent(), 'DOUBLE')
    await card.locator('.timeline[data-key="mode"] .seg', { hasText: 'heat' }).waitFor(T)
    await card.locator('.timeline[data-key="heating"] .seg', { hasText: 'true' }).first().waitFor(T)

    // humidity onto the temperature chart, its own chart closed
    await chart.locator('.chip[data-key="humidity"]').click()
    const both = card.locator('.chart[data-keys="humidity,temperature"]')
    await both.waitFor(T)
    assert.match(await both.locator('.u-legend').textContent(), /humidity.*temperature/)
    await card.locator('.chart[data-keys="humidity"] .close').click()
    await card.locator('.chart[data-keys="humidity"]').waitFor({ state: 'detached', ...T })
    // drag to zoom, double-click back to live
    const box = await both.locator('.u-over').boundingBox()
    await page.mouse.move(box.x + box.width * 0.3, box.y + box.height / 2)
    await page.mouse.down()
    await page.mouse.move(box.x + box.width * 0.6, box.y + box.height / 2, { steps: 5 })
    await page.mouse.up()
    await waitFor(async () => await both.getAttribute('data-zoomed') === 'true', { what: 'zoomed', timeoutMs: 5000 })
    await both.locator('.u-over').dblclick()
    await waitFor(async () => await both.getAttribute('data-zoomed') === 'false', { what: 'back to live', timeoutMs: 5000 })

    // server-side RPC from the page: the answer shown, both directions in the message log
    await card.locator('.rpc-form input[name="method"]').fill('ping')
    await card.locator('.rpc-form input[name="params"]').fill('{"n":1.0}')
    await card.locator('.rpc-form button').click()
    await card.locator('.rpc-result', { hasText: 'HTTP 200 {"pong":true}' }).waitFor(T)
    const log = card.locator('.log-card')
    const down = log.locator('.msg[data-kind="rpc"][data-dir="down"]', { hasText: 'method ping' })
    await down.waitFor(T)
    assert.match(await down.locator('.payload').textContent(), /"method": "ping",\s+"params": \{\s+"n": 1\.0\s+\}/)
    await log.locator('.msg[data-kind="rpc"][data-dir="up"]', { hasText: '"pong": true' }).waitFor(T)
    await log.locator('.msg[data-kind="session"]', { hasText: 'CONNECT' }).waitFor(T)
    await log.locator('.kind-chip input[value="telemetry"]').uncheck()
    assert.equal(await log.locator('.msg[data-kind="telemetry"]').count(), 0)
    await log.locator('.kind-chip input[value="telemetry"]').check()
    await log.locator('.msg[data-kind="telemetry"]').first().waitFor(T)

    // a shared attribute set and deleted on the page
    await card.locator('.attr-form input[name="key"]').fill('targetTemp')
    await card.locator('.attr-form input[name="value"]').fill('19.5')
    await card.locator('.attr-form button').click()
    await waitMsg(c, m => m.text === '{"targetTemp":19.5}', 'attribute push')
    await card.locator('.attributes tr[data-key="targetTemp"] button.del').click()
    await waitMsg(c, m => m.text === '{"deleted":["targetTemp"]}', 'attribute deletion')
    await card.locator('.attributes tr[data-key="targetTemp"]').waitFor({ state: 'detached', ...T })

    // a client RPC no rule answers is listed with its method; the getCurrentTime preset answers it
    await publish(c, 'v1/devices/me/rpc/request/7', '{"method":"getCurrentTime","params":{}}')
    await card.locator('.rpc-requests tr[data-id="7"][data-status="waiting"]', { hasText: 'getCurrentTime' }).waitFor(T)
    await card.locator('.preset-time').click()
    await card.locator('.rule-form button', { hasText: 'Add rule' }).click()
    const t = await waitMsg(c, 'v1/devices/me/rpc/response/7', 'the answer to 7')
    assert.ok(Math.abs(Number(t.text) - Date.now()) < 60000, t.text)
    await card.locator('.rpc-requests tr[data-id="7"][data-status="answered"]').waitFor(T)
    await card.locator('.rpc-rules tr[data-method="getCurrentTime"]', { hasText: 'current time (ms)' }).waitFor(T)
    assert.match(emu.stderr, /client RPC getCurrentTime \(id 7\): no rule answers it/)

    // firmware assigned on the page, half downloaded: 50 %; unassigned on the page
    const pkg = (await emu.api('POST', '/emu/packages?title=pgfw&version=2', new Uint8Array(4000))).json
    await card.locator('.assign-form select option', { hasText: 'FIRMWARE pgfw 2' }).waitFor({ state: 'attached', ...T })
    await card.locator('.assign-form select').selectOption(pkg.id)
    await card.locator('.assign-form button').click()
    await waitMsg(c, m => m.text.includes('"fw_title":"pgfw"'), 'fw attributes')
    await publish(c, 'v1/devices/me/telemetry', '{"fw_state":"DOWNLOADING"}')
    for (let i = 0; i < 2; i++) {
      await publish(c, `v2/fw/request/3/chunk/${i}`, '1000')
      await waitMsg(c, `v2/fw/response/3/chunk/${i}`)
    }
    await card.locator('.ota-firmware .bar-text', { hasText: 'download 50% · 2000 of 4000 bytes served in 2 chunks' }).waitFor(T)
    await card.locator('.ota-firmware .steps li.now', { hasText: 'DOWNLOADING' }).waitFor(T)
    await log.locator('.msg[data-kind="firmware"]', { hasText: 'chunks 0–1: 2 requested' }).waitFor(T)
    const n = c.received.length
    await card.locator('.ota-firmware button.unassign').click()
    const del = await waitFor(() => c.received.slice(n).find(m => m.text.startsWith('{"deleted":')), { what: 'fw deletion', timeoutMs: 15000 })
    assert.ok(JSON.parse(del.text).deleted.includes('fw_title'))
    await card.locator('.ota-firmware button.unassign').waitFor({ state: 'detached', ...T })

    await sleep(300) // the live feed's last batch
    await assertFits(page, 1280)
    await shot(page, 'tbemu-1280.png')
    await page.setViewportSize({ width: 390, height: 844 })
    await sleep(500)
    await assertFits(page, 390)
    await shot(page, 'tbemu-390.png')
  } finally {
    try { await shot(page, 'tbemu-last.png') } catch {}
    if (c) await end(c)
    await page.close()
    assert.equal(await emu.stop(), 0)
  }
})

test('after SIGKILL and a restart on the same --data-dir the page shows the same history, attribute and client-RPC rule', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-pagedata-'))
  const page = await browser.newPage()
  try {
    let emu = await startEmu(['--data-dir', dir, '--device', 'kept:KEPT'])
    const c = await connect(emu, { username: 'KEPT' })
    const now = Date.now()
    await publish(c, 'v1/devices/me/telemetry', JSON.stringify([1, 2, 3, 4].map(i => ({ ts: now - i * 10000, values: { level: i * 1.5 } }))))
    await end(c)
    await page.goto(emu.base + '/#kept')
    const card = page.locator('section.device[data-name="kept"]')
    await card.locator('.chart[data-keys="level"][data-points="4"]').waitFor(T)
    await card.locator('.attr-form input[name="key"]').fill('limit')
    await card.locator('.attr-form input[name="value"]').fill('7.50')
    await card.locator('.attr-form button').click()
    await card.locator('.attributes tr[data-key="limit"]').waitFor(T)
    await card.locator('.rule-form input[name="method"]').fill('getTime')
    await card.locator('.rule-form input[name="response"]').fill('{"t":1.0}')
    await card.locator('.rule-form button', { hasText: 'Add rule' }).click()
    await card.locator('.rpc-rules tr[data-method="getTime"]').waitFor(T)

    await new Promise(resolve => { emu.proc.once('exit', resolve); emu.proc.kill('SIGKILL') })
    emu = await startEmu(['--data-dir', dir])
    try {
      await page.goto(emu.base + '/#kept')
      await card.locator('.chart[data-keys="level"][data-points="4"]').waitFor(T)
      assert.equal(await card.locator('.attributes tr[data-key="limit"] .value').textContent(), '7.5')
      await card.locator('.rpc-rules tr[data-method="getTime"]', { hasText: '{"t":1.0}' }).waitFor(T)
      assert.equal(await card.locator('.telemetry tr[data-key="level"] .value').textContent(), '1.5')
    } finally { assert.equal(await emu.stop(), 0) }
  } finally {
    await page.close()
    fs.rmSync(dir, { recursive: true, force: true })
  }
})
