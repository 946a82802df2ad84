#!/usr/bin/env node
/*
 * tbemu — a local ThingsBoard emulator: the MQTT device API as the real server behaves
 * (../../../shared/design/protocol.md), a ThingsBoard-compatible REST subset, an /emu control
 * API and a live web page. Install: `npm ci --prefix scripts`.
 *
 * CLI
 *   node scripts/tbemu/tbemu.js [options]
 *     --mqtt-port N          MQTT port (default 1883; 0 = pick a free port)
 *     --http-port N          HTTP port (default 8080; 0 = pick a free port)
 *     --host H               bind address (default 127.0.0.1)
 *     --device NAME:TOKEN    access-token device (repeatable)
 *     --device-basic NAME:CLIENTID:USERNAME:PASSWORD   MQTT-basic device (fields may be empty)
 *     --package FILE,title=T,version=V[,type=fw|sw][,alg=SHA256][,url=self][,assign=DEV+DEV]
 *     --provision KEY:SECRET[:STRATEGY]   provisioning profile (ALLOW_CREATE_NEW_DEVICES default)
 *     --client-rpc METHOD=JSON            reply for a client-side RPC method
 *     --set KEY=VALUE        config value, e.g. --set rpcMinTimeoutMs=100 (see DEFAULT_CONFIG in lib/emu.js)
 *     --config FILE.json     {devices:[{name,token|clientId,userName,password,gateway}],
 *                             packages:[{file,title,version,type,checksumAlgorithm,url,assign:[..]}],
 *                             provisionProfiles:[..], clientRpc:{m:{response,delayMs}}, config:{..}}
 *     --data-dir DIR         persist state there (default: memory only)
 *     --quiet                no human log lines on stderr
 *   When ready, prints exactly one line on stdout: {"ready":true,"mqtt":<port>,"http":<port>}
 *   SIGTERM / SIGINT stop it cleanly (exit 0).
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
 *   POST /emu/devices/{name}/disconnect    drop the device's connection
 *   POST /emu/devices/{name}/ota-cache-expire   further chunks of old reqIds come back empty
 *   POST /emu/devices/{name}/packet-id {"next":65535}   next downlink packet id (test the wrap to 0)
 *   POST /emu/devices/{name}/client-rpc {"method","response"|"responseText"|"echo":true[,"delayMs"]}
 *   POST /emu/client-rpc (same body, all devices)   DELETE /emu/client-rpc/{method}
 *   POST /emu/session-limits {getSessionLimits reply}
 *   GET|POST /emu/config {partial config}
 *   POST /emu/provision-profiles {"provisionDeviceKey","provisionDeviceSecret"[,"strategy"]}
 *   POST /emu/packages?title=T&version=V[&type=FIRMWARE|SOFTWARE|fw|sw][&checksumAlgorithm=SHA256][&checksum=..][&tag=..][&url=self|URL][&fileName=..]
 *        body: the binary → package JSON with "id", "checksum", "url"
 *   GET  /emu/packages[/{id}]              GET /emu/files/{id}/{fileName}  (Range, 206)
 *   POST /emu/devices/{name}/assign {"packageId"}     POST /emu/devices/{name}/unassign {"type":"FIRMWARE"}
 *   POST /emu/faults {"urlCut":{"afterBytes":N,"times":1}}   POST /emu/pause   POST /emu/resume
 *   GET  /emu/events (server-sent events)   GET / (the web page)
 */
import fs from 'node:fs'
import path from 'node:path'
import { Emu } from './lib/emu.js'

function usage (msg) {
  process.stderr.write(`tbemu: ${msg}\nsee the comment block at the top of ${process.argv[1]}\n`)
  process.exit(2)
}

function parseArgs (argv) {
  const o = { host: '127.0.0.1', mqttPort: 1883, httpPort: 8080, devices: [], packages: [], provision: [], clientRpc: {}, set: {}, config: null, dataDir: null, quiet: false }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => { if (i + 1 >= argv.length) usage(`${a} needs a value`); return argv[++i] }
    switch (a) {
      case '--mqtt-port': o.mqttPort = Number(val()); break
      case '--http-port': o.httpPort = Number(val()); break
      case '--host': o.host = val(); break
      case '--device': { const v = val(); const k = v.indexOf(':'); if (k < 1) usage('--device NAME:TOKEN'); o.devices.push({ name: v.slice(0, k), token: v.slice(k + 1) }); break }
      case '--device-basic': { const [name, clientId, userName, password] = val().split(':'); o.devices.push({ name, clientId, userName, password }); break }
      case '--package': {
        const [file, ...kv] = val().split(',')
        const p = { file }
        for (const x of kv) { const [k, v] = x.split('='); p[k] = v }
        if (p.alg) p.checksumAlgorithm = p.alg
        if (p.assign) p.assign = p.assign.split('+')
        o.packages.push(p); break
      }
      case '--provision': { const [k, s, st] = val().split(':'); o.provision.push({ provisionDeviceKey: k, provisionDeviceSecret: s, strategy: st || 'ALLOW_CREATE_NEW_DEVICES' }); break }
      case '--client-rpc': { const v = val(); const k = v.indexOf('='); o.clientRpc[v.slice(0, k)] = { responseText: v.slice(k + 1) }; break }
      case '--set': { const v = val(); const k = v.indexOf('='); const x = v.slice(k + 1); o.set[v.slice(0, k)] = /^-?\d+(\.\d+)?$/.test(x) ? Number(x) : (x.startsWith('{') || x.startsWith('[') ? JSON.parse(x) : x); break }
      case '--config': o.configPath = val(); o.config = JSON.parse(fs.readFileSync(o.configPath, 'utf8')); break
      case '--data-dir': o.dataDir = val(); break
      case '--quiet': o.quiet = true; break
      case '-h': case '--help': usage('help')
      // falls through
      default: usage(`unknown option ${a}`)
    }
  }
  return o
}

async function main () {
  const o = parseArgs(process.argv.slice(2))
  const cfg = o.config || {}
  const emu = new Emu({ dataDir: o.dataDir, quiet: o.quiet, config: { ...(cfg.config || {}), ...o.set } })
  if (cfg.sessionLimits) emu.config.sessionLimits = cfg.sessionLimits
  Object.assign(emu.config.clientRpc, cfg.clientRpc || {}, o.clientRpc)
  for (const p of [...(cfg.provisionProfiles || []), ...o.provision]) emu.store.provisionProfiles.push(p)
  for (const d of [...(cfg.devices || []), ...o.devices]) {
    const existing = emu.store.byName(d.name)
    if (!existing) emu.store.createDevice(d)
  }
  const ports = await emu.start({ host: o.host, mqttPort: o.mqttPort, httpPort: o.httpPort })
  const base = o.configPath ? path.dirname(o.configPath) : process.cwd()
  for (const p of [...(cfg.packages || []), ...o.packages]) {
    const data = p.file ? fs.readFileSync(path.resolve(base, p.file)) : null
    const pkg = emu.firmware.upload({ ...p, data, fileName: p.fileName || (p.file && path.basename(p.file)) })
    for (const name of p.assign || []) emu.firmware.assign(emu.device(name), pkg)
    emu.log(`package ${pkg.type} ${pkg.title} ${pkg.version}: id ${pkg.id}`)
  }
  emu.log(`MQTT on ${o.host}:${ports.mqtt}, web page and API on ${emu.httpBase()}/`)
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
