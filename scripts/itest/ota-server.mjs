// OTA integration-test helpers:
//  - ThingsBoard's checksum text encoding (tbemu's, scripts/tbemu/lib/firmware.js, computed
//    in Node independently of the agent's C), and a brute-force search for images whose
//    checksum text starts with zero bytes;
//  - the real tbagent binary and a plain mosquitto broker as child processes (bounded waits,
//    killed by PID);
//  - OtaServer: an MQTT.js client that plays ThingsBoard's OTA side on plain mosquitto
//    (docs/thingsboard.md §7): fw_* / sw_* shared attributes (push and attribute-request answers), the
//    v2/{fw|sw}/request/{reqId}/chunk/{idx} chunk protocol served from a Buffer (size
//    remembered per reqId, short last chunk, empty past the end), with injectable faults.
// The paths, the wait scale (ms), tmpdir and freePort are lib.mjs's.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import mqtt from 'mqtt'
import { ALGORITHMS, checksum as checksumHex } from '../tbemu/lib/firmware.js'
import { MOSQUITTO, SCALE, TBAGENT, delay as sleep, freePort, ms, tmpdir } from './lib.mjs'

export { ALGORITHMS, SCALE, TBAGENT, checksumHex, freePort, ms, sleep, tmpdir }

// waitUntil(fn, n, what): polls fn (may be async) until truthy; bounded (n is scaled).
export async function waitUntil (fn, n, what) {
  const deadline = Date.now() + ms(n)
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > deadline) throw new Error(`timed out after ${ms(n)} ms waiting for ${what}`)
    await sleep(25)
  }
}

// Self-check against published vectors: crc32("123456789") = 0xCBF43926 (docs/thingsboard.md §7),
// MurmurHash3_x86_32("hello", 0) = 0x248bfa47, MurmurHash3_x64_128("hello", 0) =
// cbd8a7b341bd9b02 5b1e906a48ae1d19 (each in ThingsBoard's little-endian text).
export function selfCheck () {
  const problems = []
  if (checksumHex('CRC32', Buffer.from('123456789')) !== '2639f4cb') problems.push('CRC32')
  if (checksumHex('MURMUR3_32', Buffer.from('hello')) !== '47fa8b24') problems.push('MURMUR3_32')
  if (checksumHex('MURMUR3_32', Buffer.alloc(0)) !== '00000000') problems.push('MURMUR3_32 empty')
  if (checksumHex('MURMUR3_128', Buffer.from('hello')) !== '029bbd41b3a7d8cb191dae486a901e5b') problems.push('MURMUR3_128')
  return problems
}

// randomImage(n, seed) -> deterministic pseudo-random bytes
export function randomImage (n, seed = 1) {
  const out = Buffer.alloc(n)
  let x = (seed * 2654435761) >>> 0 || 1
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0
    out[i] = x & 0xff
  }
  return out
}

// zeroChecksumImage(alg, size, bothEnds) -> {image, checksum}: an image of `size` bytes whose
// checksum text starts with "00" (and, with bothEnds, also ends with "00": for the 32-bit
// algorithms that is a zero most significant byte of the int, i.e. leading zeros in the other
// byte order). Brute force over a 4-byte counter at the end of the image.
export function zeroChecksumImage (alg, size = 1000, bothEnds = false) {
  const img = randomImage(size, alg.length * 7919 + size)
  for (let i = 0; i < 1 << 24; i++) {
    img.writeUInt32LE(i, size - 4)
    const hex = checksumHex(alg, img)
    if (hex.startsWith('00') && (!bothEnds || hex.endsWith('00'))) return { image: Buffer.from(img), checksum: hex }
  }
  throw new Error('no zero-prefixed checksum found for ' + alg)
}

// ------------------------------------------------------------------------------------------
// child processes, each killed by its PID

const children = new Set()
function track (child) {
  children.add(child)
  child.on('exit', () => children.delete(child))
  return child
}
process.on('exit', () => {
  for (const c of children) { try { process.kill(c.pid, 'SIGKILL') } catch { /* gone */ } }
})

// Line collector over a child's output, with bounded waits.
export class Lines {
  constructor (name) { this.name = name; this.lines = []; this.partial = ''; this.waiters = new Set(); this.ended = false }
  feed (chunk) {
    this.partial += chunk.toString('utf8')
    let i
    while ((i = this.partial.indexOf('\n')) >= 0) {
      const line = this.partial.slice(0, i)
      this.partial = this.partial.slice(i + 1)
      this.lines.push(line)
      if (process.env.ITEST_VERBOSE) process.stderr.write(`[${this.name}] ${line}\n`)
    }
    for (const w of [...this.waiters]) w()
  }
  end () {
    if (this.partial) { this.lines.push(this.partial); this.partial = '' }
    this.ended = true
    for (const w of [...this.waiters]) w()
  }
  mark () { return this.lines.length }
  text () { return this.lines.join('\n') }
  find (re, from = 0) {
    for (let i = from; i < this.lines.length; i++) if (re.test(this.lines[i])) return this.lines[i]
    return null
  }
  all (re, from = 0) { return this.lines.slice(from).filter((l) => re.test(l)) }
  tail (k = 60) { return this.lines.slice(-k).join('\n') }
  // waitFor(re, n, from) -> first line at index >= from matching re (n is scaled)
  waitFor (re, n = 5000, from = 0) {
    n = ms(n)
    return new Promise((resolve, reject) => {
      const done = () => { clearTimeout(timer); this.waiters.delete(check) }
      const check = () => {
        const hit = this.find(re, from)
        if (hit !== null) { done(); resolve(hit); return true }
        if (this.ended) { done(); reject(new Error(`${this.name} ended before a line matching ${re}; log:\n${this.tail()}`)); return true }
        return false
      }
      const timer = setTimeout(() => { done(); reject(new Error(`no line matching ${re} from ${this.name} within ${n} ms; log:\n${this.tail()}`)) }, n)
      if (!check()) this.waiters.add(check)
    })
  }
}

function cleanEnv (extra = {}) {
  const env = {}
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('TB_')) env[k] = v
  return { ...env, ...extra }
}

// The example install policy: logs what it installed and copies the image to $OUT/<kind>-<version>.bin
// so the test can compare it byte for byte. CHUNK sets the chunk size; INSTALL_MS makes
// install() take that long (tb.sleep), logging "INSTALL START <version>" first; FW_CURRENT
// is the firmware version the script names as current (1.0).
export const POLICY = `
local tb = require "tb"
local function keep(kind, path, info)
  local slow = tonumber(os.getenv("INSTALL_MS") or "0")
  if slow > 0 then
    tb.log.info("INSTALL START %s", info.version)
    tb.sleep(slow)
  end
  local out = os.getenv("OUT")
  local f = assert(io.open(path, "rb")); local d = f:read("a"); f:close()
  if out then local g = assert(io.open(out .. "/" .. kind .. "-" .. info.version .. ".bin", "wb")); g:write(d); g:close() end
  return d
end
tb.firmware{current = {title = "dev", version = os.getenv("FW_CURRENT") or "1.0"}, chunk_size = tonumber(os.getenv("CHUNK") or "4096"),
  install = function(path, info)
    local d = keep("fw", path, info)
    tb.log.info("INSTALLED %s %d bytes", info.version, #d)
    return true
  end}
tb.software{current = {title = "app", version = "1"}, chunk_size = tonumber(os.getenv("CHUNK") or "4096"),
  install = function(path, info)
    local d = keep("sw", path, info)
    tb.log.info("SW INSTALLED %s %d bytes", info.version, #d)
    return true
  end}
`

// startAgent({port, args, dir, stateDir, env, chunk, script}) -> agent
//   Runs `tbagent run <dir>/device.lua` with --no-reload, debug log, small backoff and a 2 s
//   chunk timeout; the policy copies installed images to agent.out.
export function startAgent (opts = {}) {
  const dir = opts.dir || tmpdir('tbota-agent-')
  const file = path.join(dir, 'device.lua')
  if (!fs.existsSync(file)) fs.writeFileSync(file, opts.script || POLICY)
  const out = path.join(dir, 'out')
  fs.mkdirSync(out, { recursive: true })
  const stateDir = opts.stateDir || path.join(dir, 'state')
  const args = ['run', file, '--no-reload', '--state-dir', stateDir, '--port', String(opts.port),
    '--log-level', 'debug', '--backoff-min', '200', '--backoff-max', '1000',
    '--fw-chunk-timeout', String(ms(2000)), ...(opts.args || [])]
  const env = cleanEnv({ OUT: out, CHUNK: String(opts.chunk || 4096), ...(opts.env || {}) })
  const proc = track(spawn(TBAGENT, args, { stdio: ['ignore', 'pipe', 'pipe'], env, cwd: dir }))
  const agent = { proc, pid: proc.pid, dir, out, stateDir, args, log: new Lines(opts.name || `tbagent ${proc.pid}`) }
  proc.stderr.on('data', (d) => agent.log.feed(d))
  proc.stdout.on('data', (d) => agent.log.feed(d))
  agent.exited = new Promise((resolve) => proc.on('close', (code, signal) => { agent.log.end(); resolve({ code, signal }) }))
  agent.running = () => proc.exitCode === null && proc.signalCode === null
  agent.waitFor = (re, n, from) => agent.log.waitFor(re, n, from)
  agent.installed = (kind, version) => {
    const f = path.join(out, `${kind}-${version}.bin`)
    return fs.existsSync(f) ? fs.readFileSync(f) : null
  }
  // stop(): SIGTERM (a sanitizer build then reports leaks), SIGKILL after a bounded wait
  agent.stop = async () => {
    if (!agent.running()) return agent.exited
    try { process.kill(proc.pid, 'SIGTERM') } catch { /* gone */ }
    const t = setTimeout(() => { try { process.kill(proc.pid, 'SIGKILL') } catch { /* gone */ } }, ms(5000))
    const r = await agent.exited
    clearTimeout(t)
    return r
  }
  // sanitizerReport() -> the first line of an ASan/UBSan/LSan report in the agent's output
  agent.sanitizerReport = () => agent.log.find(/ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: \w+Sanitizer/)
  agent.kill = async (sig = 'SIGKILL') => {
    if (agent.running()) { try { process.kill(proc.pid, sig) } catch { /* gone */ } }
    return agent.exited
  }
  return agent
}

// startMosquitto({port}) -> broker {port, start(), stop(sig), restart(), log}
export async function startMosquitto (opts = {}) {
  const dir = tmpdir('tbota-mq-')
  const port = opts.port || await freePort()
  const conf = [
    'per_listener_settings false',
    ...(process.getuid && process.getuid() === 0 ? ['user root'] : []),
    'allow_anonymous true', 'log_dest stderr', 'log_type error', 'log_type warning', 'log_type notice',
    'log_type information', 'connection_messages true', 'max_inflight_messages 0',
    'max_queued_messages 100000', 'persistence false',
    // the broker's side of each hop without Nagle, so round trips measure the agent
    'set_tcp_nodelay true', `listener ${port} 127.0.0.1`
  ]
  const confPath = path.join(dir, 'mosquitto.conf')
  fs.writeFileSync(confPath, conf.join('\n') + '\n')
  const broker = { port, dir, log: new Lines('mosquitto'), proc: null }
  broker.start = async () => {
    const proc = track(spawn(MOSQUITTO, ['-c', confPath], { stdio: ['ignore', 'pipe', 'pipe'] }))
    broker.proc = proc
    proc.stdout.on('data', (d) => broker.log.feed(d))
    proc.stderr.on('data', (d) => broker.log.feed(d))
    broker.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })))
    const deadline = Date.now() + ms(5000)
    for (;;) {
      if (proc.exitCode !== null) throw new Error('mosquitto exited: ' + broker.log.tail())
      const ok = await new Promise((resolve) => {
        const s = net.connect({ host: '127.0.0.1', port })
        s.once('connect', () => { s.destroy(); resolve(true) })
        s.once('error', () => { s.destroy(); resolve(false) })
      })
      if (ok) return
      if (Date.now() > deadline) throw new Error(`mosquitto not listening on ${port}: ${broker.log.tail()}`)
      await sleep(20)
    }
  }
  broker.stop = async (sig = 'SIGKILL') => {
    const proc = broker.proc
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return
    try { process.kill(proc.pid, sig) } catch { return }
    await broker.exited
  }
  broker.restart = async () => { await broker.stop('SIGKILL'); await broker.start() }
  await broker.start()
  return broker
}

// ------------------------------------------------------------------------------------------
// OtaServer: ThingsBoard's OTA side on plain mosquitto

// attributesFor(kind, pkg) -> the shared attributes ThingsBoard sets for a binary package
export function attributesFor (kind, pkg) {
  const p = kind + '_'
  const a = { [p + 'title']: pkg.title, [p + 'version']: pkg.version, [p + 'size']: pkg.size ?? pkg.image.length }
  const alg = pkg.algorithm || 'SHA256'
  a[p + 'checksum_algorithm'] = alg
  a[p + 'checksum'] = pkg.checksum ?? checksumHex(alg, pkg.image)
  return a
}

export class OtaServer {
  // opts.port: the broker's port. Faults (all changeable at run time through this.faults):
  //   emptyAt: {idx, times}   answer chunk idx with an empty payload `times` times
  //   error: 'NOT_FOUND'      answer every chunk request with this text on v2/fw/error (then kick)
  //   errorKind: 'sw'         ... only the chunk requests of that kind
  //   silent: true            stop answering chunk requests
  //   delayMs: N              wait before each chunk answer
  //   maxPayload: 65536       larger chunk sizes get PAYLOAD_TOO_LARGE (then kick), as ThingsBoard
  constructor (opts = {}) {
    this.port = opts.port
    this.agentClientId = opts.agentClientId
    this.packages = { fw: null, sw: null } // {title, version, image, algorithm, checksum, size}
    this.faults = { emptyAt: null, error: null, errorKind: null, silent: false, delayMs: 0, maxPayload: 65536 }
    this.sizes = new Map() // 'fw/reqId' -> chunk size remembered for that reqId
    this.bound = new Map() // 'fw/reqId' -> the package that reqId was bound to on its first request
    this.requests = [] // {kind, req, idx, payload, at, version}
    this.telemetry = [] // {ts, values, at}
    this.attrRequests = [] // {id, json}
    this.errorsSent = []
    this.waiters = new Set()
  }

  async connect () {
    this.client = await mqtt.connectAsync({
      host: '127.0.0.1', port: this.port, protocolVersion: 5, reconnectPeriod: 100, connectTimeout: ms(5000),
      clientId: `tbota-server-${process.pid}-${Math.random().toString(16).slice(2, 8)}`, clean: true
    })
    // no Nagle on our side either: a delayed chunk answer must not wait for the ACK of our PUBACK
    const noDelay = () => { try { this.client.stream.setNoDelay(true) } catch { /* not a TCP stream */ } }
    noDelay()
    this.client.on('connect', noDelay)
    this.client.on('message', (topic, payload) => this.onMessage(topic, payload))
    this.client.on('error', () => {})
    await this.client.subscribeAsync({ 'v1/devices/me/#': { qos: 1, nl: true }, 'v2/+/request/#': { qos: 1, nl: true } })
    return this
  }

  // connected(): true when the client is up (it reconnects and resubscribes after a broker restart)
  connected () { return !!(this.client && this.client.connected) }

  notify () { for (const w of [...this.waiters]) w() }

  onMessage (topic, payload) {
    let m = /^v2\/(fw|sw)\/request\/(\d+)\/chunk\/(\d+)$/.exec(topic)
    if (m) { this.onChunkRequest(m[1], m[2], Number(m[3]), payload.toString('utf8')); this.notify(); return }
    m = /^v1\/devices\/me\/attributes\/request\/(\d+)$/.exec(topic)
    if (m) {
      let json = {}
      try { json = JSON.parse(payload.toString('utf8')) } catch { /* answered with everything */ }
      this.attrRequests.push({ id: m[1], json })
      this.publish(`v1/devices/me/attributes/response/${m[1]}`, JSON.stringify({ shared: this.sharedFor(json.sharedKeys) }))
      this.notify()
      return
    }
    if (topic === 'v1/devices/me/telemetry') {
      let json
      try { json = JSON.parse(payload.toString('utf8')) } catch { return }
      const now = Date.now()
      for (const r of Array.isArray(json) ? json : [json]) {
        if (r && typeof r === 'object' && r.values) this.telemetry.push({ ts: r.ts ?? now, values: r.values, at: now })
        else if (r && typeof r === 'object') this.telemetry.push({ ts: now, values: r, at: now })
      }
      this.notify()
    }
  }

  shared () {
    const out = {}
    for (const kind of ['fw', 'sw']) if (this.packages[kind]) Object.assign(out, attributesFor(kind, this.packages[kind]))
    return out
  }

  sharedFor (keys) {
    const all = this.shared()
    if (keys === undefined) return all
    const out = {}
    for (const k of String(keys).split(',')) if (k in all) out[k] = all[k]
    return out
  }

  publish (topic, payload) {
    return this.client.publishAsync(topic, payload, { qos: 1 }).catch(() => {})
  }

  // assign(kind, pkg): as ThingsBoard's OTA updateAttributes: push the new fw_* keys
  assign (kind, pkg) {
    this.packages[kind] = pkg
    return this.publish('v1/devices/me/attributes', JSON.stringify(attributesFor(kind, pkg)))
  }

  // unassign(kind): as ThingsBoard's OTA remove: every fw_* key deleted in one push
  unassign (kind) {
    this.packages[kind] = null
    const keys = ['title', 'version', 'ts', 'state', 'size', 'checksum', 'checksum_algorithm', 'url', 'tag'].map((k) => `${kind}_${k}`)
    return this.publish('v1/devices/me/attributes', JSON.stringify({ deleted: keys }))
  }

  // kick(): drop the agent's connection (a second client with its client id takes over), as
  // ThingsBoard disconnects after an OTA error.
  async kick () {
    if (!this.agentClientId) return
    try {
      const c = await mqtt.connectAsync({ host: '127.0.0.1', port: this.port, clientId: this.agentClientId, reconnectPeriod: 0, connectTimeout: 2000 })
      await c.endAsync(true)
    } catch { /* best effort */ }
  }

  // forgetSession(): ThingsBoard binds request ids per connection (MqttTransportHandler), so
  // an agent started again may reuse them for another package; call it after killing one
  forgetSession () { this.bound.clear(); this.sizes.clear() }

  onChunkRequest (kind, req, idx, text) {
    const key = kind + '/' + req
    // as ThingsBoard: a reqId is bound to the package assigned at its first request
    if (!this.bound.has(key) && this.packages[kind]) this.bound.set(key, this.packages[kind])
    const pkg = this.bound.get(key)
    this.requests.push({ kind, req, idx, payload: text, at: Date.now(), version: pkg && pkg.version })
    let size = /^\d+$/.test(text) ? Number(text) : 0
    if (size > 0) this.sizes.set(key, size); else size = this.sizes.get(key) || 0
    const f = this.faults
    if (f.silent) return
    const errorOut = (code) => {
      this.errorsSent.push(code)
      this.publish('v2/fw/error', code).then(() => this.kick())
    }
    if (size > f.maxPayload) return errorOut('PAYLOAD_TOO_LARGE')
    if (f.error && (!f.errorKind || f.errorKind === kind)) return errorOut(f.error)
    if (!pkg) return errorOut('NOT_FOUND')
    let chunk
    if (f.emptyAt && f.emptyAt.idx === idx && f.emptyAt.times > 0) {
      f.emptyAt.times--
      chunk = Buffer.alloc(0)
    } else if (size === 0) {
      chunk = pkg.image
    } else {
      const off = idx * size
      chunk = off >= pkg.image.length ? Buffer.alloc(0) : pkg.image.subarray(off, Math.min(off + size, pkg.image.length))
    }
    const send = () => this.publish(`v2/${kind}/response/${req}/chunk/${idx}`, chunk)
    if (f.delayMs > 0) setTimeout(send, f.delayMs); else send()
  }

  // states(kind) -> the distinct `${kind}_state` values reported, in timestamp order
  states (kind = 'fw', since = 0) {
    const seen = new Map()
    for (const r of this.telemetry) {
      const v = r.values[kind + '_state']
      if (v !== undefined && r.ts >= since) seen.set(r.ts + ':' + v, { ts: r.ts, v })
    }
    return [...seen.values()].sort((a, b) => a.ts - b.ts).map((x) => x.v)
  }

  latest (key) {
    let best
    for (const r of this.telemetry) if (key in r.values && (!best || r.ts >= best.ts)) best = { ts: r.ts, v: r.values[key] }
    return best && best.v
  }

  waitState (kind, states, n = 10000, since = 0) {
    const want = Array.isArray(states) ? states : [states]
    return waitUntil(() => this.states(kind, since).find((s) => want.includes(s)), n,
      `${kind}_state ${want.join('|')} (seen: ${this.states(kind, since).join(', ')})`)
  }

  async close () {
    if (!this.client) return
    try { await Promise.race([this.client.endAsync(true), sleep(2000)]) } catch { /* ignore */ }
  }
}
