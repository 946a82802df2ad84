// The demo walk-through (run by scripts/demo): tbemu + tbagent + examples/thermostat.lua,
// driven through ThingsBoard's own REST paths, each step printed as it happens and checked.
// TBAGENT overrides the agent binary (default build/tbagent). Any failed step, or the agent
// or the emulator exiting before the end, stops both and exits 1. tbemu keeps its state (the
// device, its telemetry history, packages) in .tbemu-data/ (TBEMU_DATA_DIR to choose another),
// so the page shows earlier runs too.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const once = process.argv.includes('--once')
const token = 'DEMO_THERMOSTAT_TOKEN'
const AGENT = process.env.TBAGENT ? path.resolve(process.env.TBAGENT) : path.join(root, 'build/tbagent')
const FW_VERSION = '1.1.0'
const children = []
let stopping = false
let fatal = null // set when a child exits (or fails to start) before the demo is over
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'tbagent-demo-'))
const dataDir = process.env.TBEMU_DATA_DIR ? path.resolve(process.env.TBEMU_DATA_DIR) : path.join(root, '.tbemu-data')

function say (line) { process.stdout.write(line + '\n') }
const running = (c) => c.exitCode === null && c.signalCode === null && c.pid !== undefined
function stopAll () { stopping = true; for (const c of children) if (running(c)) c.kill('SIGTERM') }
// The agent first, then the emulator (so the agent does not see its server go away):
// SIGTERM and a bounded wait for each to exit (SIGKILL after 5 s).
async function stopAndWait () {
  stopping = true
  for (const c of [...children].reverse()) {
    if (!running(c)) continue
    await new Promise(resolve => {
      const t = setTimeout(() => { c.kill('SIGKILL') }, 5000)
      c.once('exit', () => { clearTimeout(t); resolve() })
      c.kill('SIGTERM')
    })
  }
}
process.on('SIGINT', () => { stopAll(); process.exit(130) })
process.on('SIGTERM', () => { stopAll(); process.exit(143) })

const tails = {} // the last lines each child wrote, shown when the demo fails
function logTail (name) { return (tails[name] || []).map(l => '      | ' + l).join('\n') }

function start (cmd, args, name, onLine) {
  const p = spawn(cmd, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
  children.push(p)
  p.on('error', e => { if (!fatal) fatal = new Error(`${name} did not start: ${e.message}`) })
  p.on('exit', (code, signal) => {
    if (!stopping && !fatal) fatal = new Error(`${name} exited (${signal || 'code ' + code}) before the demo was over; see ${work}/${name}.log`)
  })
  const log = fs.createWriteStream(path.join(work, name + '.log'))
  const tail = tails[name] = []
  for (const stream of [p.stdout, p.stderr]) {
    let buf = ''
    stream.on('data', d => {
      log.write(d)
      buf += d
      let nl
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        tail.push(line)
        if (tail.length > 15) tail.shift()
        if (onLine) onLine(line, stream === p.stdout)
      }
    })
    stream.on('end', () => { if (buf) tail.push(buf) })
  }
  return p
}

async function waitFor (what, fn, timeoutMs = 20000) {
  const t0 = Date.now()
  for (;;) {
    if (fatal) throw fatal
    const v = await fn()
    if (v) return v
    if (fatal) throw fatal
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise(r => setTimeout(r, 100))
  }
}

async function main () {
  let ready
  const emuReady = new Promise((resolve, reject) => {
    const emu = start(process.execPath, ['scripts/tbemu/tbemu.js', '--mqtt-port', '0', '--http-port', '0', '--device', `thermostat:${token}`, '--data-dir', dataDir], 'tbemu',
      (line, isStdout) => { if (isStdout && line.startsWith('{')) resolve(JSON.parse(line)) })
    emu.on('exit', code => reject(new Error(`tbemu exited with ${code}; see ${work}/tbemu.log`)))
    setTimeout(() => reject(new Error('tbemu did not start within 15 s')), 15000).unref()
  })
  ready = await emuReady
  const base = `http://127.0.0.1:${ready.http}`
  const api = async (method, p, body, raw) => {
    const r = await fetch(base + p, { method, headers: raw ? {} : { 'content-type': 'application/json' }, body: raw ?? (body === undefined ? undefined : JSON.stringify(body)) })
    const text = await r.text()
    let json; try { json = JSON.parse(text) } catch {}
    return { status: r.status, json, text }
  }
  say(`[1/6] ThingsBoard emulator up: MQTT on 127.0.0.1:${ready.mqtt}, page at ${base}/, state in ${path.relative(root, dataDir) || dataDir}/`)
  // a firmware assigned in an earlier run would start updating the fresh agent at once
  await api('POST', '/emu/devices/thermostat/unassign', { type: 'FIRMWARE' })
  const started = Date.now() // the data dir has earlier runs' values: only newer ones count

  const agent = start(AGENT, ['run', 'examples/thermostat.lua', '--port', String(ready.mqtt), '--token', token,
    '--state-dir', path.join(work, 'state'), '--no-reload'], 'tbagent',
  (line) => { if (/ (WARN|ERROR) |installing|reloaded/.test(line)) say('      agent: ' + line.replace(/^\S+ /, '')) })
  const id = (await waitFor('the device', async () => (await api('GET', '/api/tenant/devices?deviceName=thermostat')).json)).id.id
  await waitFor('tbagent to connect as "thermostat"', async () => (await api('GET', '/emu/devices/thermostat')).json?.connected)
  say(`[2/6] tbagent (${path.relative(root, AGENT) || AGENT}) running examples/thermostat.lua, connected as device "thermostat" (${id})`)

  const tele = await waitFor('telemetry', async () => {
    const r = await api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=temperature,humidity&useStrictDataTypes=true`)
    return r.json && r.json.temperature && r.json.temperature[0].ts >= started && r.json
  })
  say(`[3/6] telemetry arrived: temperature=${tele.temperature[0].value}, humidity=${tele.humidity[0].value}`)

  const rpc = await api('POST', `/api/plugins/rpc/twoway/${id}`, { method: 'setSpValue', params: 23.5, timeout: 10000 })
  if (fatal) throw fatal
  if (rpc.status !== 200) throw new Error(`RPC failed: HTTP ${rpc.status} ${rpc.text}`)
  if (!rpc.json || rpc.json.setpoint !== 23.5 || Object.keys(rpc.json).length !== 1) throw new Error(`RPC setSpValue(23.5): expected {"setpoint":23.5}, got ${rpc.text}`)
  say(`[4/6] RPC setSpValue(23.5) answered: ${rpc.text}`)

  const setAt = Date.now()
  const attr = await api('POST', `/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { target: 20.5 })
  if (attr.status !== 200) throw new Error(`setting the shared attribute failed: HTTP ${attr.status} ${attr.text}`)
  await waitFor('the script to apply the shared attribute', async () => {
    const r = await api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/attributes/CLIENT_SCOPE?keys=setpoint`)
    return r.json && r.json[0] && r.json[0].value === 20.5 && r.json[0].lastUpdateTs >= setAt
  })
  say('[5/6] shared attribute target=20.5 reached the script: it reported setpoint=20.5 back')

  const image = Buffer.alloc(300 * 1024)
  for (let i = 0; i < image.length; i++) image[i] = (i * 31 + (i >> 8)) & 0xff
  const pkg = await api('POST', `/emu/packages?title=thermostat&version=${FW_VERSION}&checksumAlgorithm=SHA256`, undefined, image)
  if (pkg.status >= 300) throw new Error(`package upload failed: ${pkg.text}`)
  const assigned = await api('POST', '/emu/devices/thermostat/assign', { packageId: pkg.json.id })
  if (assigned.status >= 300) throw new Error(`assigning the package failed: HTTP ${assigned.status} ${assigned.text}`)
  say(`      firmware thermostat ${FW_VERSION} (${image.length} bytes, SHA256 ${pkg.json.checksum.slice(0, 16)}...) assigned`)
  const since = Date.now() - 1000
  let shown = 0
  let last
  await waitFor('fw_state UPDATED', async () => {
    const r = await api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=fw_state,fw_error&startTs=${since}&endTs=${Date.now() + 1000}&limit=100&orderBy=ASC`)
    const states = (r.json && r.json.fw_state) || []
    for (; shown < states.length; shown++) say(`      fw_state ${states[shown].value}`)
    const st = states.length ? states[states.length - 1].value : null
    if (st === 'FAILED') throw new Error('firmware update FAILED: ' + (r.json.fw_error && r.json.fw_error[0].value))
    return st === 'UPDATED'
  }, 60000)
  const cur = await waitFor(`current_fw_version ${FW_VERSION}`, async () => {
    const r = await api('GET', `/api/plugins/telemetry/DEVICE/${id}/values/timeseries?keys=current_fw_title,current_fw_version`)
    last = [r.json?.current_fw_title?.[0]?.value, r.json?.current_fw_version?.[0]?.value]
    return last[0] === 'thermostat' && last[1] === FW_VERSION && r.json
  }, 10000).catch(e => { throw e === fatal ? e : new Error(`after UPDATED the device reports current_fw_title=${JSON.stringify(last?.[0])} current_fw_version=${JSON.stringify(last?.[1])}, not thermostat ${FW_VERSION} (${e.message})`) })
  say(`[6/6] firmware update done: current_fw_title=${cur.current_fw_title?.[0]?.value}, current_fw_version=${cur.current_fw_version[0].value}`)
  say('')
  say(`demo: every step passed. Web page: ${base}/  (logs in ${work})`)
  if (once) { await stopAndWait(); return 0 }
  say('demo: tbemu and tbagent keep running; press Ctrl-C to stop them')
  // from here on, either of them exiting ends the demo with an error
  await new Promise((resolve, reject) => { for (const c of children) c.once('exit', () => setImmediate(() => reject(fatal || new Error('a child exited')))) })
}

main().then(code => process.exit(code ?? 0), async err => {
  say(`demo: FAILED: ${err.message}`)
  await stopAndWait()
  for (const name of ['tbagent', 'tbemu']) {
    const tail = logTail(name)
    if (tail) say(`      last lines of ${name}.log:\n${tail}`)
  }
  process.exit(1)
})
