// emu.js — the emulator object that ties the store, the MQTT side, RPC, firmware and HTTP.
import { randomBytes } from 'node:crypto'
import { Store, httpError } from './store.js'
import { MqttSide } from './mqtt.js'
import { Rpc } from './rpc.js'
import { Firmware } from './firmware.js'
import { RestSide } from './rest.js'
import { ClientRpc } from './clientrpc.js'
import { MessageLog } from './msglog.js'
import { kvJson, toKv } from './typedjson.js'

export const DEFAULT_CONFIG = {
  maxPayloadSize: 65536, // transport.mqtt.netty.max_payload_size
  inactivityTimeoutMs: 600000, // transport.sessions.inactivity_timeout
  clientRpcTimeoutMs: 60000, // transport.client_side_rpc.timeout
  rpcDefaultTimeoutMs: 10000, // REST `timeout` default
  rpcMinTimeoutMs: 5000, // server.rest.server_side_rpc.min_timeout
  claimDurationMs: 86400000, // security.claim.duration
  provisionCloseMs: 60000,
  maxStringValueLength: 0,
  sessionLimits: { maxPayloadSize: 65536, maxInflightMessages: 100, rateLimits: { messages: null, telemetryMessages: null, telemetryDataPoints: null } },
  gatewayRateLimits: { messages: null, telemetryMessages: null, telemetryDataPoints: null },
  clientRpc: {}, // method -> {responseText|echo|currentTime, delayMs}: rules for every device
  urlCut: null // {afterBytes, times}: cut URL-package downloads part-way
}
const NOT_SAVED = ['urlCut'] // a fault to inject, not set-up: gone after a restart

export class Emu {
  constructor (opts = {}) {
    this.opts = opts
    this.store = new Store({ dataDir: opts.dataDir || null })
    // defaults, then what the data dir kept, then what this command line says
    this.config = structuredClone(DEFAULT_CONFIG)
    Object.assign(this.config, this.store.savedConfig || {}, opts.config || {})
    this.store.configToSave = () => Object.fromEntries(Object.entries(this.config).filter(([k]) => !NOT_SAVED.includes(k)))
    this.mqtt = new MqttSide(this)
    this.rpc = new Rpc(this)
    this.clientRpc = new ClientRpc(this)
    this.messageLog = new MessageLog(this.store)
    this.firmware = new Firmware(this)
    this.rest = new RestSide(this)
    this.quiet = !!opts.quiet
  }

  log (msg) { if (!this.quiet) process.stderr.write(`[tbemu ${new Date().toISOString()}] ${msg}\n`) }

  // A port already taken rejects with an Error whose `port` names the option (--mqtt-port or
  // --http-port) and whose code is EADDRINUSE.
  async start ({ host = '127.0.0.1', mqttPort = 0, httpPort = 0 } = {}) {
    this.host = host
    this.mqttPort = await listening(this.mqtt.start(host, mqttPort), '--mqtt-port', mqttPort)
    try {
      this.httpPort = await listening(this.rest.start(host, httpPort), '--http-port', httpPort)
    } catch (e) { await this.mqtt.stop(); throw e }
    this.store.on('change', (kind, dev, detail) => {
      if (kind === 'event' && dev && detail.type !== 'client-rpc') this.log(`device ${dev.name}: ${detail.type}${detail.reason ? ' (' + detail.reason + ')' : ''}${detail.topic ? ' ' + detail.topic : ''}`)
    })
    return { mqtt: this.mqttPort, http: this.httpPort }
  }

  async stop () {
    await this.rest.stop()
    await this.mqtt.stop()
    this.store.close()
  }

  httpBase () { return `http://${this.host.includes(':') ? '[' + this.host + ']' : this.host}:${this.httpPort}` }

  device (ref) {
    const d = this.store.find(ref)
    if (!d) throw httpError(404, `device ${ref} not found`)
    return d
  }

  // Shared attributes: store, then push `{k:v}` to a session subscribed to attribute updates.
  setSharedAttributes (dev, entries, ts = Date.now()) {
    this.store.saveAttributes(dev, 'SHARED_SCOPE', entries, ts)
    this.pushAttributes(dev, '{' + entries.map(([k, kv]) => JSON.stringify(k) + ':' + kvJson(kv)).join(',') + '}')
  }

  deleteSharedAttributes (dev, keys) {
    this.store.deleteAttributes(dev, 'SHARED_SCOPE', keys)
    this.pushAttributes(dev, '{"deleted":' + JSON.stringify(keys) + '}')
  }

  pushAttributes (dev, payload) {
    if (!this.mqtt.attrSubscribed(dev)) return
    const c = dev.session
    const topic = c.tb.subs.has('v1/devices/me/attributes') ? 'v1/devices/me/attributes' : c.tb.subs.has('v2/a/j') ? 'v2/a/j' : 'v2/a'
    this.mqtt.sendDown(c, topic, payload)
  }

  sessionLimits (dev) {
    const l = structuredClone(this.config.sessionLimits)
    if (dev.gateway) l.gatewayRateLimits = structuredClone(this.config.gatewayRateLimits)
    return l
  }

  // docs/thingsboard.md §5. → {response, device}: the device made or matched on SUCCESS, else null.
  provision (req) {
    const fail = (status) => ({ response: status === 'NOT_FOUND' ? { errorMsg: 'Provision data was not found!', status } : { errorMsg: 'Failed to provision device!', status }, device: null })
    const prof = this.store.provisionProfiles.find(p => p.provisionDeviceKey === req.key && p.provisionDeviceSecret === req.secret)
    if (!prof) return fail('NOT_FOUND')
    let name = req.deviceName
    if (name !== undefined) { name = name.trim(); if (!name) return fail('FAILURE') } else name = randomBytes(10).toString('hex')
    const credType = req.credentialsType
    const creds = credType === 'MQTT_BASIC'
      ? { clientId: req.clientId, userName: req.username, password: req.password }
      : credType === 'X509_CERTIFICATE' ? null : { token: req.token || randomBytes(10).toString('hex') }
    if (creds === null) return fail('FAILURE') // X.509 needs TLS, which tbemu does not serve
    let dev
    try {
      if ((prof.strategy || 'ALLOW_CREATE_NEW_DEVICES') === 'CHECK_PRE_PROVISIONED_DEVICES') {
        dev = this.store.byName(name)
        const st = dev && dev.attributes.SERVER_SCOPE.get('provisionState')
        if (!dev || (st && st.kv.value === 'provisioned')) return fail('FAILURE')
        this.store.setCredentials(dev, creds)
      } else {
        if (this.store.byName(name)) return fail('FAILURE')
        dev = this.store.createDevice({ name, gateway: req.gateway, ...creds })
      }
    } catch { return fail('FAILURE') }
    this.store.saveAttributes(dev, 'SERVER_SCOPE', [['provisionState', toKv('provisioned')]])
    this.store.event(dev, 'provisioned', { credentialsType: dev.credentials.credentialsType })
    const c = dev.credentials
    const response = c.credentialsType === 'ACCESS_TOKEN'
      ? { credentialsValue: c.credentialsId, credentialsType: 'ACCESS_TOKEN', status: 'SUCCESS' }
      : { credentialsValue: { clientId: c.clientId, userName: c.userName, password: c.password }, credentialsType: 'MQTT_BASIC', status: 'SUCCESS' }
    return { response, device: dev }
  }

  // Summary used by /emu/devices and the web page.
  summary (dev) {
    const latest = {}
    for (const [k, h] of dev.telemetry) if (h.length) latest[k] = { ts: h[h.length - 1].ts, kv: h[h.length - 1].kv }
    const attrs = {}
    for (const s of ['CLIENT_SCOPE', 'SHARED_SCOPE', 'SERVER_SCOPE']) attrs[s] = Object.fromEntries([...dev.attributes[s]].map(([k, v]) => [k, v]))
    const ota = {}
    for (const [type, p] of [['FIRMWARE', 'fw'], ['SOFTWARE', 'sw']]) {
      const g = (k) => { const l = this.store.latest(dev, k); return l ? l.kv.value : null }
      ota[type] = {
        packageId: dev.ota[type], state: g(`${p}_state`), error: g(`${p}_error`),
        currentTitle: g(`current_${p}_title`), currentVersion: g(`current_${p}_version`),
        targetTitle: g(`target_${p}_title`), targetVersion: g(`target_${p}_version`),
        progress: progressOf(dev.otaProgress[type])
      }
    }
    return {
      id: dev.id, name: dev.name, type: dev.type, gateway: dev.gateway,
      credentials: dev.credentials, connected: this.mqtt.connected(dev), rpcSeq: dev.rpcSeq,
      claim: dev.claim, latest, attributes: attrs, ota,
      clientRpc: { rules: this.clientRpc.rules(dev), requests: this.clientRpc.requests(dev) }
    }
  }
}

// MQTT download of the assigned package: bytes served of its size
function progressOf (p) {
  if (!p) return null
  return { ...p, percent: p.size ? Math.min(100, Math.floor(100 * p.bytes / p.size)) : null }
}

async function listening (starting, option, port) {
  try { return await starting } catch (e) {
    if (e.code === 'EADDRINUSE' || e.code === 'EACCES') { e.option = option; e.port = port }
    throw e
  }
}
