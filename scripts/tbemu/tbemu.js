#!/usr/bin/env node
/*
 * tbemu — a local ThingsBoard emulator: the MQTT device API as the real server behaves
 * (docs/thingsboard.md), a ThingsBoard-compatible REST subset, an /emu control API and a live
 * web page. Install: `npm ci --prefix scripts`.
 *
 * CLI
 *   node scripts/tbemu/tbemu.js [options]      options: `--help`, or OPTIONS below
 *   When ready, prints exactly one line on stdout: {"ready":true,"mqtt":<port>,"http":<port>}
 *   SIGTERM / SIGINT stop it cleanly (exit 0). A bad command line exits 2 with one line on stderr.
 *   --config FILE.json: {devices:[{name,token|clientId,userName,password,gateway}],
 *     packages:[{file,title,version,type,checksumAlgorithm,checksum,tag,url,fileName,assign:[..]}] (file
 *     relative to FILE.json), provisionProfiles:[..], clientRpc:{m:{response,delayMs}}, sessionLimits:{..},
 *     config:{..}}; command-line options are added to it (--set overrides config).
 *
 * HTTP, ThingsBoard paths (X-Authorization accepted, never required)
 *   POST /api/auth/login                                  → {"token","refreshToken"}
 *   GET  /api/tenant/devices?deviceName=NAME              → {"id":{"entityType":"DEVICE","id"},"name",..}
 *   GET  /api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=a,b[&startTs&endTs&limit&orderBy&useStrictDataTypes=true]
 *   GET  /api/plugins/telemetry/DEVICE/{id}/values/attributes[/{CLIENT_SCOPE|SHARED_SCOPE|SERVER_SCOPE}]?keys=
 *   POST /api/plugins/telemetry/DEVICE/{id}/attributes/SHARED_SCOPE  {"k":v}  (also /{id}/SHARED_SCOPE)
 *   DELETE /api/plugins/telemetry/DEVICE/{id}/SHARED_SCOPE?keys=a,b
 *   POST /api/plugins/rpc/twoway/{id} | /oneway/{id}  {"method","params","timeout"}
 *        → 200 device JSON | 408 timeout (sent) | 409 not connected/subscribed | 406 bad JSON
 * HTTP, emulator only (JSON bodies; {name} may be a device name or id)
 *   GET  /emu/health
 *   GET  /emu/devices                      POST /emu/devices {"name","token"} or {"name","clientId","userName","password"}[,"gateway"]
 *   GET  /emu/devices/{name}               summary + events;  DELETE /emu/devices/{name}
 *   GET  /emu/devices/{name}/messages[?since=SEQ&dir=up|down&topic=PREFIX]
 *        → [{"seq","ts","dir","topic","qos","size","payload"[,"encoding":"base64"]}]  (fw chunks: payload null)
 *   DELETE /emu/devices/{name}/messages    GET /emu/devices/{name}/events[?since=SEQ]
 *   GET  /emu/devices/{name}/log[?kind=K,K&since=SEQ&limit=N]   the page's message log (kinds, fw
 *        downloads summarised, CONNECT/SUBSCRIBE)            DELETE /emu/devices/{name}/log
 *   POST /emu/devices/{name}/disconnect    drop the device's connection
 *   POST /emu/devices/{name}/ota-cache-expire   further chunks of old reqIds come back empty
 *   POST /emu/devices/{name}/packet-id {"next":65535}   next downlink packet id (test the wrap to 0)
 *   POST /emu/devices/{name}/client-rpc {"method","response"|"responseText"|"echo":true|"currentTime":true[,"delayMs"]}
 *   GET  /emu/devices/{name}/client-rpc → {rules, requests}   DELETE /emu/devices/{name}/client-rpc/{method}
 *   POST /emu/client-rpc (same body, all devices)   GET /emu/client-rpc   DELETE /emu/client-rpc/{method}
 *   POST /emu/session-limits {getSessionLimits reply}
 *   GET|POST /emu/config {partial config}
 *   POST /emu/provision-profiles {"provisionDeviceKey","provisionDeviceSecret"[,"strategy"]}
 *   POST /emu/packages?title=T&version=V[&type=FIRMWARE|SOFTWARE|fw|sw][&checksumAlgorithm=SHA256][&checksum=..][&tag=..][&url=self|URL][&fileName=..]
 *        body: the binary → package JSON with "id", "checksum", "url"
 *   GET  /emu/packages[/{id}]   DELETE /emu/packages/{id}   GET /emu/files/{id}/{fileName}  (Range, 206)
 *   POST /emu/devices/{name}/assign {"packageId"}     POST /emu/devices/{name}/unassign {"type":"FIRMWARE"}
 *   POST /emu/faults {"urlCut":{"afterBytes":N,"times":1}}   POST /emu/pause   POST /emu/resume
 *   GET  /emu/events (server-sent events)   GET / (the web page)   GET /vendor/uPlot.* (its charts)
 * --data-dir DIR: state.json (what a user set up), telemetry.jsonl (the history, append-only),
 *   packages/ — see lib/persist.js. A port in use: one line, exit 2.
 */
import fs from 'node:fs'
import path from 'node:path'
import { ALGORITHMS, normType } from './lib/firmware.js'

// One line on stderr, exit 2.
function usage (msg) { failed(`${msg} (see tbemu.js --help)`) }
function failed (msg) {
  process.stderr.write(`tbemu: ${msg}\n`)
  process.exit(2)
}

const port = (flag, v) => {
  if (!/^\d+$/.test(v) || Number(v) > 65535) usage(`${flag} needs a port number 0..65535, got "${v}"`)
  return Number(v)
}
const keyValue = (flag, v, what) => {
  const k = v.indexOf('=')
  if (k < 1) usage(`${flag} ${what}: "${v}" has no ${what.split('=')[0]}=`)
  return [v.slice(0, k), v.slice(k + 1)]
}

// --package FILE,KEY=VALUE,...: the keys it accepts (alg = checksumAlgorithm).
const PACKAGE_KEYS = {
  title: 'package title (required)',
  version: 'package version (required)',
  type: 'fw|sw|FIRMWARE|SOFTWARE (default fw)',
  alg: `checksum algorithm: ${ALGORITHMS.join('|')} (default SHA256); also checksumAlgorithm=`,
  checksumAlgorithm: null,
  checksum: 'checksum stored verbatim instead of the computed one',
  tag: 'fw_tag/sw_tag (default "TITLE VERSION")',
  url: 'self (tbemu serves FILE over HTTP: a URL package) or an external URL (FILE may be empty)',
  fileName: 'file name (default: FILE\'s base name)',
  contentType: 'content type (default application/octet-stream)',
  assign: 'DEV[+DEV...]: assign the package to these devices at start'
}
function parsePackage (flag, v) {
  const [file, ...kv] = v.split(',')
  const p = { file: file ? path.resolve(file) : '' } // relative to the current directory
  for (const x of kv) {
    const [k, val] = keyValue(flag, x, 'KEY=VALUE')
    if (!Object.hasOwn(PACKAGE_KEYS, k)) usage(`${flag}: unknown key "${k}" (keys: ${Object.keys(PACKAGE_KEYS).join(', ')})`)
    p[k] = val
  }
  if (p.alg) p.checksumAlgorithm = p.alg
  delete p.alg
  if (!p.title || !p.version) usage(`${flag} needs title= and version=: ${v}`)
  if (!p.file && !p.url) usage(`${flag} needs a FILE or url=: ${v}`)
  if (!p.file && p.url === 'self') usage(`${flag}: url=self needs a FILE: ${v}`)
  if (p.file && !fs.statSync(p.file, { throwIfNoEntry: false })?.isFile()) usage(`${flag}: no such file ${p.file}`)
  try { normType(p.type) } catch (e) { usage(`${flag}: ${e.message}`) }
  if (p.checksumAlgorithm && !ALGORITHMS.includes(p.checksumAlgorithm.toUpperCase())) usage(`${flag}: alg must be one of ${ALGORITHMS.join(', ')}`)
  p.assign = p.assign ? p.assign.split('+').filter(Boolean) : []
  return p
}

// Every option the command line accepts: flags, value syntax (none = a switch), help line, effect.
// `--help` is generated from this table.
const OPTIONS = [
  { flags: ['--mqtt-port'], arg: 'N', help: 'MQTT port (default 1883; 0 = pick a free port)', set: (o, v, f) => { o.mqttPort = port(f, v) } },
  { flags: ['--http-port'], arg: 'N', help: 'HTTP port: REST, /emu API, web page (default 8080; 0 = pick a free port)', set: (o, v, f) => { o.httpPort = port(f, v) } },
  { flags: ['--host'], arg: 'H', help: 'bind address for both ports (default 127.0.0.1)', set: (o, v) => { o.host = v } },
  {
    flags: ['--device'], arg: 'NAME:TOKEN', help: 'access-token device (repeatable)',
    set: (o, v, f) => { const k = v.indexOf(':'); if (k < 1) usage(`${f} NAME:TOKEN, got "${v}"`); o.devices.push({ name: v.slice(0, k), token: v.slice(k + 1) }) }
  },
  {
    flags: ['--device-basic'], arg: 'NAME:CLIENTID:USERNAME:PASSWORD', help: 'MQTT-basic device, fields after NAME may be empty (repeatable)',
    set: (o, v, f) => { const [name, clientId, userName, password] = v.split(':'); if (!name) usage(`${f} NAME:CLIENTID:USERNAME:PASSWORD, got "${v}"`); o.devices.push({ name, clientId, userName, password }) }
  },
  { flags: ['--package'], arg: 'FILE,title=T,version=V[,KEY=VALUE...]', help: 'upload an OTA package at start (repeatable; keys below)', set: (o, v, f) => { o.packages.push(parsePackage(f, v)) } },
  {
    flags: ['--provision'], arg: 'KEY:SECRET[:STRATEGY]', help: 'provisioning profile (STRATEGY default ALLOW_CREATE_NEW_DEVICES; repeatable)',
    set: (o, v, f) => { const [k, s, st] = v.split(':'); if (!k || !s) usage(`${f} KEY:SECRET[:STRATEGY], got "${v}"`); o.provision.push({ provisionDeviceKey: k, provisionDeviceSecret: s, strategy: st || 'ALLOW_CREATE_NEW_DEVICES' }) }
  },
  { flags: ['--client-rpc'], arg: 'METHOD=REPLY', help: 'reply REPLY (sent as is, e.g. JSON) to client-side RPC METHOD (repeatable)', set: (o, v, f) => { const [m, r] = keyValue(f, v, 'METHOD=REPLY'); o.clientRpc[m] = { responseText: r } } },
  {
    flags: ['--set'], arg: 'KEY=VALUE', help: 'config value, e.g. rpcMinTimeoutMs=100 (numbers and {..}/[..] JSON parsed; repeatable)',
    set: (o, v, f) => {
      const [k, x] = keyValue(f, v, 'KEY=VALUE')
      if (/^-?\d+(\.\d+)?$/.test(x)) o.set[k] = Number(x)
      else if (x.startsWith('{') || x.startsWith('[')) { try { o.set[k] = JSON.parse(x) } catch (e) { usage(`${f} ${k}: bad JSON: ${e.message}`) } } else o.set[k] = x
    }
  },
  {
    flags: ['--config'], arg: 'FILE.json', help: 'devices, packages, provisionProfiles, clientRpc, sessionLimits, config (README)',
    set: (o, v, f) => { o.configPath = v; try { o.config = JSON.parse(fs.readFileSync(v, 'utf8')) } catch (e) { usage(`${f} ${v}: ${e.message}`) } }
  },
  { flags: ['--data-dir'], arg: 'DIR', help: 'persist state in DIR (default: memory only)', set: (o, v) => { o.dataDir = v } },
  { flags: ['--quiet'], help: 'no log lines on stderr', set: (o) => { o.quiet = true } },
  { flags: ['-h', '--help'], help: 'print this help and exit', set: (o) => { o.help = true } }
]

function helpText () {
  const rows = OPTIONS.map(x => [x.flags.join(', ') + (x.arg ? ' ' + x.arg : ''), x.help])
  const w = 28
  const line = ([a, b]) => a.length < w ? `  ${a.padEnd(w)}${b}` : `  ${a}\n  ${''.padEnd(w)}${b}`
  const keys = Object.entries(PACKAGE_KEYS).filter(([, h]) => h).map(([k, h]) => [k + '=', h])
  return [
    'Usage: node scripts/tbemu/tbemu.js [options]',
    'A local ThingsBoard emulator: the MQTT device API, a REST subset, an /emu control API and a web page.',
    '',
    'Options:',
    ...rows.map(line),
    '',
    '--package keys (FILE is relative to the current directory; no commas in values):',
    ...keys.map(line),
    '',
    'When ready, prints one line on stdout: {"ready":true,"mqtt":<port>,"http":<port>}.',
    'SIGTERM / SIGINT stop it (exit 0); a bad command line exits 2.',
    'HTTP API: the comment at the top of tbemu.js, or scripts/tbemu/README.md.',
    ''
  ].join('\n')
}

function parseArgs (argv) {
  const o = { host: '127.0.0.1', mqttPort: 1883, httpPort: 8080, devices: [], packages: [], provision: [], clientRpc: {}, set: {}, config: null, configPath: null, dataDir: null, quiet: false, help: false }
  const byFlag = new Map(OPTIONS.flatMap(x => x.flags.map(f => [f, x])))
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const opt = byFlag.get(a)
    if (!opt) usage(`unknown option ${JSON.stringify(a)}`)
    if (opt.arg && i + 1 >= argv.length) usage(`${a} needs a value: ${a} ${opt.arg}`)
    opt.set(o, opt.arg ? argv[++i] : undefined, a)
    if (o.help) break
  }
  return o
}

// Does a --device / --config entry give credentials other than the saved ones?
function newCredentials (saved, d) {
  if (d.clientId || d.userName || d.password) {
    return saved.credentialsType !== 'MQTT_BASIC' || ['clientId', 'userName', 'password'].some(k => (d[k] || null) !== saved[k])
  }
  return !!d.token && (saved.credentialsType !== 'ACCESS_TOKEN' || saved.credentialsId !== d.token)
}

async function main () {
  const o = parseArgs(process.argv.slice(2))
  if (o.help) { process.stdout.write(helpText()); return }
  const { Emu } = await import('./lib/emu.js') // after the command line: --help and errors stay fast
  const cfg = o.config || {}
  let emu
  try {
    emu = new Emu({ dataDir: o.dataDir, quiet: o.quiet, config: { ...(cfg.config || {}), ...o.set } })
  } catch (e) { failed(`--data-dir ${o.dataDir}: ${e.message}`) }
  if (cfg.sessionLimits) emu.config.sessionLimits = cfg.sessionLimits
  Object.assign(emu.config.clientRpc, cfg.clientRpc || {}, o.clientRpc)
  for (const p of [...(cfg.provisionProfiles || []), ...o.provision]) emu.store.provisionProfiles.push(p)
  // a device the data dir kept is kept, with its id; credentials given here replace its own
  for (const d of [...(cfg.devices || []), ...o.devices]) {
    const existing = emu.store.byName(d.name)
    try {
      if (!existing) emu.store.createDevice(d)
      else if (newCredentials(existing.credentials, d)) emu.store.setCredentials(existing, d)
    } catch (e) { failed(`device ${d.name}: ${e.message}`) }
  }
  let ports
  try {
    ports = await emu.start({ host: o.host, mqttPort: o.mqttPort, httpPort: o.httpPort })
  } catch (e) {
    if (e.code === 'EADDRINUSE') failed(`port ${e.port} is in use (${e.option} to choose another)`)
    if (e.code === 'EACCES') failed(`port ${e.port} needs privileges this user does not have (${e.option} to choose another)`)
    throw e
  }
  // config-file packages: FILE relative to the config file; --package FILE: already absolute (cwd)
  const base = o.configPath ? path.dirname(o.configPath) : process.cwd()
  for (const p of [...(cfg.packages || []), ...o.packages]) {
    const data = p.file ? fs.readFileSync(path.resolve(base, p.file)) : null
    const pkg = emu.firmware.upload({ ...p, data, fileName: p.fileName || (p.file && path.basename(p.file)) })
    for (const name of p.assign || []) {
      const dev = emu.store.byName(name)
      if (!dev) failed(`package ${pkg.title} ${pkg.version}: assign=${name}: no such device`)
      if (dev.ota[pkg.type] !== pkg.id) emu.firmware.assign(dev, pkg) // kept by the data dir: not again
    }
    emu.log(`package ${pkg.type} ${pkg.title} ${pkg.version}: id ${pkg.id}`)
  }
  emu.store.changed('config', null) // the config in effect, command line included, is what a restart starts from
  emu.store.flush()
  emu.log(`MQTT on ${o.host}:${ports.mqtt}, web page and API on ${emu.httpBase()}/${o.dataDir ? `, state in ${o.dataDir}` : ''}`)
  for (const d of emu.store.devices.values()) emu.log(`device ${d.name}: ${d.credentials.credentialsType} ${d.credentials.credentialsId || ''}`)
  process.stdout.write(JSON.stringify({ ready: true, mqtt: ports.mqtt, http: ports.http }) + '\n')
  let stopping = false
  const stop = async (sig) => {
    if (stopping) return
    stopping = true
    emu.log(`${sig}: stopping`)
    const t = setTimeout(() => process.exit(0), 3000); t.unref()
    try { await emu.stop() } catch (e) { emu.log('stop: ' + e.message) }
    process.exit(0)
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}

main().catch((e) => { process.stderr.write(`tbemu: ${e.stack || e}\n`); process.exit(1) })
