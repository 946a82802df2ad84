// store.js — devices, credentials, telemetry history, attributes, message logs and packages.
// In memory; with a data dir, a JSON snapshot (state.json) plus packages/<id>.bin.
import { EventEmitter } from 'node:events'
import { randomUUID, randomBytes } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

export const SCOPES = ['CLIENT_SCOPE', 'SHARED_SCOPE', 'SERVER_SCOPE']

export class Store extends EventEmitter {
  constructor ({ dataDir = null, logLimit = 20000 } = {}) {
    super()
    this.setMaxListeners(0)
    this.dataDir = dataDir
    this.logLimit = logLimit
    this.devices = new Map() // id -> device
    this.packages = new Map() // id -> package
    this.provisionProfiles = []
    this.seq = 0 // global message sequence number
    if (dataDir) this._load()
  }

  // ---- devices -----------------------------------------------------------------------------
  createDevice ({ name, token, clientId, userName, password, gateway = false, type = 'default', id } = {}) {
    if (!name || typeof name !== 'string') throw httpError(400, 'device name is required')
    if (this.byName(name)) throw httpError(409, `device ${name} already exists`)
    let credentials
    if (clientId || userName || password) {
      credentials = { credentialsType: 'MQTT_BASIC', clientId: clientId || null, userName: userName || null, password: password || null }
      for (const d of this.devices.values()) {
        const c = d.credentials
        if (c.credentialsType === 'MQTT_BASIC' && (c.clientId || null) === credentials.clientId && (c.userName || null) === credentials.userName) throw httpError(409, 'duplicate MQTT basic credentials')
      }
    } else {
      token = token || randomBytes(10).toString('hex')
      if (this.byToken(token)) throw httpError(409, `token ${token} already in use`)
      credentials = { credentialsType: 'ACCESS_TOKEN', credentialsId: token }
    }
    const dev = {
      id: id || randomUUID(), name, type, gateway: !!gateway, createdTime: Date.now(), credentials,
      telemetry: new Map(), attributes: { CLIENT_SCOPE: new Map(), SHARED_SCOPE: new Map(), SERVER_SCOPE: new Map() },
      log: [], events: [], rpcSeq: 0, claim: null, customerId: null, ota: { FIRMWARE: null, SOFTWARE: null },
      // runtime only
      session: null, rpcPending: new Map(), otaCacheGen: 0
    }
    this.devices.set(dev.id, dev)
    this.changed('device', dev)
    return dev
  }

  deleteDevice (dev) { this.devices.delete(dev.id); this.changed('deviceDeleted', dev) }
  byId (id) { return this.devices.get(id) || null }
  byName (name) { for (const d of this.devices.values()) if (d.name === name) return d; return null }
  byToken (t) { for (const d of this.devices.values()) if (d.credentials.credentialsType === 'ACCESS_TOKEN' && d.credentials.credentialsId === t) return d; return null }
  // name, or id
  find (ref) { return this.byId(ref) || this.byName(ref) }

  // protocol.md §1 basic validation. username: undefined when the flag is absent.
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
  saveTelemetry (dev, ts, entries) { // entries: [[key, kv]]
    for (const [key, kv] of entries) {
      let h = dev.telemetry.get(key)
      if (!h) dev.telemetry.set(key, (h = []))
      let i = h.length
      while (i > 0 && h[i - 1].ts > ts) i--
      if (i > 0 && h[i - 1].ts === ts) h[i - 1] = { ts, kv } // same key and ts overwrite
      else h.splice(i, 0, { ts, kv })
    }
    if (entries.length) this.changed('telemetry', dev, { ts, keys: entries.map(e => e[0]) })
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

  // ---- message log -------------------------------------------------------------------------
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
      if (dev.log.length > this.logLimit) dev.log.splice(0, dev.log.length - this.logLimit)
      this.emit('message', dev, e)
    }
    return e
  }

  event (dev, type, detail = {}) {
    const e = { seq: ++this.seq, ts: Date.now(), type, ...detail }
    dev.events.push(e)
    if (dev.events.length > 1000) dev.events.shift()
    this.changed('event', dev, e)
    return e
  }

  // ---- packages ----------------------------------------------------------------------------
  addPackage (pkg) {
    pkg.id = pkg.id || randomUUID()
    pkg.createdTime = Date.now()
    this.packages.set(pkg.id, pkg)
    if (this.dataDir && pkg.data) {
      fs.mkdirSync(path.join(this.dataDir, 'packages'), { recursive: true })
      fs.writeFileSync(path.join(this.dataDir, 'packages', pkg.id + '.bin'), pkg.data)
    }
    this.changed('package', null, { id: pkg.id })
    return pkg
  }

  // ---- change notification + persistence ---------------------------------------------------
  changed (kind, dev, detail) {
    this.emit('change', kind, dev, detail)
    if (this.dataDir && !this._saveTimer) {
      this._saveTimer = setTimeout(() => { this._saveTimer = null; this.save() }, 200)
      this._saveTimer.unref()
    }
  }

  save () {
    if (!this.dataDir) return
    const mapObj = (m) => Object.fromEntries(m)
    const state = {
      seq: this.seq,
      provisionProfiles: this.provisionProfiles,
      devices: [...this.devices.values()].map(d => ({
        id: d.id, name: d.name, type: d.type, gateway: d.gateway, createdTime: d.createdTime, credentials: d.credentials,
        telemetry: mapObj(d.telemetry), rpcSeq: d.rpcSeq, claim: d.claim, customerId: d.customerId || null, ota: d.ota, log: d.log, events: d.events,
        attributes: Object.fromEntries(SCOPES.map(s => [s, mapObj(d.attributes[s])]))
      })),
      packages: [...this.packages.values()].map(p => ({ ...p, data: undefined, hasData: !!p.data }))
    }
    fs.mkdirSync(this.dataDir, { recursive: true })
    const f = path.join(this.dataDir, 'state.json')
    fs.writeFileSync(f + '.tmp', JSON.stringify(state))
    fs.renameSync(f + '.tmp', f)
  }

  _load () {
    const f = path.join(this.dataDir, 'state.json')
    if (!fs.existsSync(f)) return
    const st = JSON.parse(fs.readFileSync(f, 'utf8'))
    this.seq = st.seq || 0
    this.provisionProfiles = st.provisionProfiles || []
    for (const d of st.devices || []) {
      this.devices.set(d.id, {
        ...d, telemetry: new Map(Object.entries(d.telemetry || {})),
        attributes: Object.fromEntries(SCOPES.map(s => [s, new Map(Object.entries((d.attributes || {})[s] || {}))])),
        log: d.log || [], events: d.events || [], ota: d.ota || { FIRMWARE: null, SOFTWARE: null },
        session: null, rpcPending: new Map(), otaCacheGen: 0
      })
    }
    for (const p of st.packages || []) {
      const bin = path.join(this.dataDir, 'packages', p.id + '.bin')
      this.packages.set(p.id, { ...p, data: p.hasData && fs.existsSync(bin) ? fs.readFileSync(bin) : null })
    }
  }
}

export function httpError (status, message) {
  const e = new Error(message)
  e.status = status
  return e
}
