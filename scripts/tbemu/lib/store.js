// store.js — devices, credentials, telemetry history, attributes, message logs and packages.
// In memory; with a data dir (persist.js) what a user set up and the telemetry history are also
// on disk, written as they change.
import { EventEmitter } from 'node:events'
import { randomUUID, randomBytes } from 'node:crypto'
import { DataDir } from './persist.js'

export const SCOPES = ['CLIENT_SCOPE', 'SHARED_SCOPE', 'SERVER_SCOPE']
// change kinds that alter state.json (telemetry has its journal; events and logs are not kept)
const PERSISTED = new Set(['device', 'deviceDeleted', 'credentials', 'attributes', 'package', 'claim', 'profiles', 'config', 'rules'])

export class Store extends EventEmitter {
  // historyLimit: points kept per telemetry key (the oldest go first)
  constructor ({ dataDir = null, logLimit = 20000, historyLimit = 100000 } = {}) {
    super()
    this.setMaxListeners(0)
    this.dataDir = dataDir
    this.logLimit = logLimit
    this.historyLimit = historyLimit
    this.devices = new Map() // id -> device
    this.packages = new Map() // id -> package
    this.provisionProfiles = []
    this.seq = 0 // global message sequence number
    this.savedConfig = null // the config state.json had, for Emu to start from
    this.configToSave = null // () => config, set by Emu
    this.disk = dataDir ? new DataDir(dataDir) : null
    this.journalLines = 0
    this.appendedSinceCheck = 0
    if (this.disk) this._load()
  }

  // ---- devices -----------------------------------------------------------------------------
  createDevice ({ name, token, clientId, userName, password, gateway = false, type = 'default', id } = {}) {
    if (!name || typeof name !== 'string') throw httpError(400, 'device name is required')
    if (this.byName(name)) throw httpError(409, `device ${name} already exists`)
    const dev = this._newDevice({ id: id || randomUUID(), name, type, gateway: !!gateway, createdTime: Date.now(), credentials: this._credentials({ token, clientId, userName, password }) })
    this.devices.set(dev.id, dev)
    this.changed('device', dev)
    return dev
  }

  // Replace a device's credentials (a --device option naming a saved device with a new token).
  setCredentials (dev, { token, clientId, userName, password }) {
    dev.credentials = this._credentials({ token, clientId, userName, password }, dev)
    this.changed('credentials', dev)
  }

  _credentials ({ token, clientId, userName, password }, self = null) {
    const others = [...this.devices.values()].filter(d => d !== self)
    if (clientId || userName || password) {
      const c = { credentialsType: 'MQTT_BASIC', clientId: clientId || null, userName: userName || null, password: password || null }
      for (const d of others) {
        const o = d.credentials
        if (o.credentialsType === 'MQTT_BASIC' && (o.clientId || null) === c.clientId && (o.userName || null) === c.userName) throw httpError(409, 'duplicate MQTT basic credentials')
      }
      return c
    }
    token = token || randomBytes(10).toString('hex')
    if (others.some(d => d.credentials.credentialsType === 'ACCESS_TOKEN' && d.credentials.credentialsId === token)) throw httpError(409, `token ${token} already in use`)
    return { credentialsType: 'ACCESS_TOKEN', credentialsId: token }
  }

  // saved: the fields state.json keeps; the rest is runtime only
  _newDevice (saved) {
    return {
      type: 'default', gateway: false, rpcSeq: 0, claim: null, customerId: null, clientRpc: {},
      ...saved,
      ota: saved.ota || { FIRMWARE: null, SOFTWARE: null },
      telemetry: new Map(), attributes: { CLIENT_SCOPE: new Map(), SHARED_SCOPE: new Map(), SERVER_SCOPE: new Map() },
      log: [], events: [],
      session: null, rpcPending: new Map(), otaCacheGen: 0, otaProgress: { FIRMWARE: null, SOFTWARE: null }, clientRpcRequests: []
    }
  }

  deleteDevice (dev) { this.devices.delete(dev.id); this.changed('deviceDeleted', dev) }
  byId (id) { return this.devices.get(id) || null }
  byName (name) { for (const d of this.devices.values()) if (d.name === name) return d; return null }
  byToken (t) { for (const d of this.devices.values()) if (d.credentials.credentialsType === 'ACCESS_TOKEN' && d.credentials.credentialsId === t) return d; return null }
  // name, or id
  find (ref) { return this.byId(ref) || this.byName(ref) }

  // docs/thingsboard.md §1 basic validation. username: undefined when the flag is absent.
  authenticate (clientId, username, password) {
    const basic = [...this.devices.values()].filter(d => d.credentials.credentialsType === 'MQTT_BASIC')
    const pwOk = (c) => !c.password || c.password === password
    if (!username) {
      const d = basic.find(d => d.credentials.clientId && d.credentials.clientId === clientId && !d.credentials.userName)
      return d && pwOk(d.credentials) ? d : null
    }
    const exact = basic.find(d => d.credentials.clientId && d.credentials.userName && d.credentials.clientId === clientId && d.credentials.userName === username)
    if (exact) return pwOk(exact.credentials) ? exact : null
    const tok = this.byToken(username)
    if (tok) return tok
    const u = basic.find(d => !d.credentials.clientId && d.credentials.userName === username)
    return u && pwOk(u.credentials) ? u : null
  }

  // ---- telemetry and attributes ------------------------------------------------------------
  // entries: [[key, {type, value}]], ts: from the payload or the arrival time, as the server keeps them
  saveTelemetry (dev, ts, entries) {
    if (!entries.length) return
    this._insertTelemetry(dev, ts, entries)
    if (this.disk && this.devices.has(dev.id)) {
      this.disk.appendTelemetry(dev.id, ts, entries)
      this.journalLines++
      if (++this.appendedSinceCheck >= 10000) { this.appendedSinceCheck = 0; if (this._journalTooLong(10000)) this.compactTelemetry() }
    }
    this.changed('telemetry', dev, { ts, entries })
  }

  _insertTelemetry (dev, ts, entries) {
    for (const [key, kv] of entries) {
      let h = dev.telemetry.get(key)
      if (!h) dev.telemetry.set(key, (h = []))
      let i = h.length
      while (i > 0 && h[i - 1].ts > ts) i--
      if (i > 0 && h[i - 1].ts === ts) h[i - 1] = { ts, kv } // same key and ts overwrite
      else h.splice(i, 0, { ts, kv })
      trim(h, this.historyLimit)
    }
  }

  latest (dev, key) { const h = dev.telemetry.get(key); return h && h.length ? h[h.length - 1] : null }

  saveAttributes (dev, scope, entries, ts = Date.now()) {
    const m = dev.attributes[scope]
    for (const [key, kv] of entries) m.set(key, { kv, lastUpdateTs: ts })
    if (entries.length) this.changed('attributes', dev, { scope, keys: entries.map(e => e[0]) })
  }

  deleteAttributes (dev, scope, keys) {
    for (const k of keys) dev.attributes[scope].delete(k)
    this.changed('attributes', dev, { scope, deleted: keys })
  }

  // ---- message log (every PUBLISH as it was on the wire; GET /emu/devices/{name}/messages) ----
  logMessage (dev, dir, topic, qos, payload, opts = {}) {
    const buf = Buffer.isBuffer(payload) ? payload : Buffer.from(payload ?? '')
    const e = { seq: ++this.seq, ts: Date.now(), dir, topic, qos, size: buf.length }
    if (opts.binary) e.payload = null
    else {
      const text = buf.toString('utf8')
      if (Buffer.from(text, 'utf8').equals(buf)) e.payload = text
      else { e.payload = buf.toString('base64'); e.encoding = 'base64' }
    }
    if (opts.note) e.note = opts.note
    if (dev) {
      dev.log.push(e)
      trim(dev.log, this.logLimit)
      this.emit('message', dev, e)
    }
    return e
  }

  event (dev, type, detail = {}) {
    const e = { seq: ++this.seq, ts: Date.now(), type, ...detail }
    dev.events.push(e)
    trim(dev.events, 1000)
    this.changed('event', dev, e)
    return e
  }

  // ---- packages ----------------------------------------------------------------------------
  addPackage (pkg) {
    pkg.id = pkg.id || randomUUID()
    pkg.createdTime = Date.now()
    if (this.disk && pkg.data) this.disk.writePackage(pkg.id, pkg.data) // before state.json names it
    this.packages.set(pkg.id, pkg)
    this.changed('package', null, { id: pkg.id })
    return pkg
  }

  deletePackage (pkg) {
    this.packages.delete(pkg.id)
    this.changed('package', null, { id: pkg.id, deleted: true })
    if (this.disk) { this.flush(); this.disk.deletePackage(pkg.id) } // once state.json no longer names it
  }

  // ---- change notification + persistence ---------------------------------------------------
  // A change of what a user set up is written at once (flush() before an HTTP answer, else on
  // the next turn of the event loop); telemetry goes to the append-only journal as it is saved.
  changed (kind, dev, detail) {
    this.emit('change', kind, dev, detail)
    if (this.disk && PERSISTED.has(kind)) {
      this.dirty = true
      if (!this.flushQueued) { this.flushQueued = true; setImmediate(() => { this.flushQueued = false; this.flush() }) }
    }
  }

  flush () { if (this.dirty) this.save() }

  save () {
    if (!this.disk) return
    this.dirty = false
    const mapObj = (m) => Object.fromEntries(m)
    this.disk.writeState({
      version: 2,
      seq: this.seq,
      config: this.configToSave ? this.configToSave() : undefined,
      provisionProfiles: this.provisionProfiles,
      devices: [...this.devices.values()].map(d => ({
        id: d.id, name: d.name, type: d.type, gateway: d.gateway, createdTime: d.createdTime, credentials: d.credentials,
        rpcSeq: d.rpcSeq, claim: d.claim, customerId: d.customerId || null, ota: d.ota, clientRpc: d.clientRpc || {},
        attributes: Object.fromEntries(SCOPES.map(s => [s, mapObj(d.attributes[s])]))
      })),
      packages: [...this.packages.values()].map(p => ({ ...p, data: undefined, hasData: !!p.data }))
    })
  }

  close () {
    this.flush()
    if (this.disk) { this.disk.closeJournal(); this.disk.unlock() }
  }

  _load () {
    const st = this.disk.readState()
    if (st) {
      this.seq = st.seq || 0
      this.savedConfig = st.config || null
      this.provisionProfiles = st.provisionProfiles || []
      for (const d of st.devices || []) {
        const dev = this._newDevice({ ...d, attributes: undefined, telemetry: undefined, log: undefined, events: undefined })
        for (const s of SCOPES) dev.attributes[s] = new Map(Object.entries((d.attributes || {})[s] || {}))
        for (const [k, h] of Object.entries(d.telemetry || {})) dev.telemetry.set(k, h) // state.json before version 2
        this.devices.set(dev.id, dev)
      }
      for (const p of st.packages || []) this.packages.set(p.id, { ...p, data: p.hasData ? this.disk.readPackage(p.id) : null })
    }
    this.journalLines = this.disk.readTelemetry((id, ts, entries) => {
      const dev = this.devices.get(id)
      if (dev) this._insertTelemetry(dev, ts, entries)
    })
    const imported = st && (st.devices || []).some(d => d.telemetry && Object.keys(d.telemetry).length)
    if (imported || this._journalTooLong(1000)) this.compactTelemetry()
  }

  // ---- telemetry journal -------------------------------------------------------------------
  pointCount () {
    let n = 0
    for (const d of this.devices.values()) for (const h of d.telemetry.values()) n += h.length
    return n
  }

  // A line holds one or more points, so an untrimmed journal has no more lines than points.
  _journalTooLong (slack) { return this.journalLines > this.pointCount() + slack }

  // Rewrite the journal from memory: drops deleted devices, trimmed history and overwritten points.
  compactTelemetry () {
    const self = this
    let lines = 0
    this.disk.rewriteTelemetry((function * () {
      for (const d of self.devices.values()) {
        const byTs = new Map()
        for (const [k, h] of d.telemetry) for (const p of h) { let g = byTs.get(p.ts); if (!g) byTs.set(p.ts, (g = [])); g.push([k, p.kv]) }
        for (const [ts, entries] of byTs) { lines++; yield [d.id, ts, entries] }
      }
    })())
    this.journalLines = lines
    this.appendedSinceCheck = 0
  }
}

// Keep the last `limit` items; trims in batches so a full log costs no copy per message.
function trim (list, limit) {
  if (list.length > limit + Math.ceil(limit / 20)) list.splice(0, list.length - limit)
}

export function httpError (status, message) {
  const e = new Error(message)
  e.status = status
  return e
}
