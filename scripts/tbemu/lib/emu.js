// emu.js — the emulator object that ties the store, the MQTT side, RPC, firmware and HTTP.
import { randomBytes } from 'node:crypto'
import { Store, httpError } from './store.js'
import { MqttSide } from './mqtt.js'
import { Rpc } from './rpc.js'
import { Firmware } from './firmware.js'
import { RestSide } from './rest.js'
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
  clientRpc: {}, // method -> {response|responseText|echo, delayMs}
  urlCut: null // {afterBytes, times}: cut URL-package downloads part-way
}

export class Emu {
  constructor (opts = {}) {
    this.opts = opts
    this.config = structuredClone(DEFAULT_CONFIG)
    Object.assign(this.config, opts.config || {})
    this.store = new Store({ dataDir: opts.dataDir || null })
    this.mqtt = new MqttSide(this)
    this.rpc = new Rpc(this)
    this.firmware = new Firmware(this)
    this.rest = new RestSide(this)
    this.quiet = !!opts.quiet
  }

  log (msg) { if (!this.quiet) process.stderr.write(`[tbemu ${new Date().toISOString()}] ${msg}\n`) }

  async start ({ host = '127.0.0.1', mqttPort = 0, httpPort = 0 } = {}) {
    this.host = host
    this.mqttPort = await this.mqtt.start(host, mqttPort)
    this.httpPort = await this.rest.start(host, httpPort)
    this.store.on('change', (kind, dev, detail) => {
      if (kind === 'event' && dev) this.log(`device ${dev.name}: ${detail.type}${detail.reason ? ' (' + detail.reason + ')' : ''}${detail.topic ? ' ' + detail.topic : ''}`)
    })
    return { mqtt: this.mqttPort, http: this.httpPort }
  }

  async stop () {
    await this.rest.stop()
    await this.mqtt.stop()
    this.store.save()
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

  clientRpcRule (dev, method) {
    return (dev.clientRpc && dev.clientRpc[method]) || this.config.clientRpc[method] || null
  }

  // protocol.md §5
  provision (req) {
    const NOT_FOUND = { errorMsg: 'Provision data was not found!', status: 'NOT_FOUND' }
    const FAILURE = { errorMsg: 'Failed to provision device!', status: 'FAILURE' }
    const prof = this.store.provisionProfiles.find(p => p.provisionDeviceKey === req.key && p.provisionDeviceSecret === req.secret)
    if (!prof) return NOT_FOUND
    let name = req.deviceName
    if (name !== undefined) { name = name.trim(); if (!name) return FAILURE } else name = randomBytes(10).toString('hex')
    const credType = req.credentialsType
    const creds = credType === 'MQTT_BASIC'
      ? { clientId: req.clientId, userName: req.username, password: req.password }
      : credType === 'X509_CERTIFICATE' ? null : { token: req.token || randomBytes(10).toString('hex') }
    if (creds === null) return FAILURE // X.509 needs TLS, which tbemu does not serve
    let dev
    try {
      if ((prof.strategy || 'ALLOW_CREATE_NEW_DEVICES') === 'CHECK_PRE_PROVISIONED_DEVICES') {
        dev = this.store.byName(name)
        const st = dev && dev.attributes.SERVER_SCOPE.get('provisionState')
        if (!dev || (st && st.kv.value === 'provisioned')) return FAILURE
        dev.credentials = creds.token ? { credentialsType: 'ACCESS_TOKEN', credentialsId: creds.token } : { credentialsType: 'MQTT_BASIC', clientId: creds.clientId || null, userName: creds.userName || null, password: creds.password || null }
      } else {
        if (this.store.byName(name)) return FAILURE
        dev = this.store.createDevice({ name, gateway: req.gateway, ...creds })
      }
    } catch { return FAILURE }
    this.store.saveAttributes(dev, 'SERVER_SCOPE', [['provisionState', toKv('provisioned')]])
    this.store.event(dev, 'provisioned', { credentialsType: dev.credentials.credentialsType })
    const c = dev.credentials
    return c.credentialsType === 'ACCESS_TOKEN'
      ? { credentialsValue: c.credentialsId, credentialsType: 'ACCESS_TOKEN', status: 'SUCCESS' }
      : { credentialsValue: { clientId: c.clientId, userName: c.userName, password: c.password }, credentialsType: 'MQTT_BASIC', status: 'SUCCESS' }
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
        targetTitle: g(`target_${p}_title`), targetVersion: g(`target_${p}_version`)
      }
    }
    return {
      id: dev.id, name: dev.name, type: dev.type, gateway: dev.gateway,
      credentials: dev.credentials, connected: this.mqtt.connected(dev), rpcSeq: dev.rpcSeq,
      claim: dev.claim, latest, attributes: attrs, ota
    }
  }
}
