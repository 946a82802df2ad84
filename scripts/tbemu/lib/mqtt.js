// mqtt.js — the device side: aedes for MQTT framing/sessions, ThingsBoard semantics on top.
//
// aedes is a broker; ThingsBoard is not. So: every publish is handled in authorizePublish
// (validation; throwing closes the connection with no PUBACK) and its effects run in the
// `published` hook, i.e. after the PUBACK was written; broker routing between clients is
// switched off (authorizeForward → null); downlink is written straight to the device's own
// socket with mqtt-packet, with ThingsBoard's packet-id counter (starts at 1, wraps through 0).
import net from 'node:net'
import { Aedes } from 'aedes'
import mqttPacket from 'mqtt-packet'
import { parse, stringify, toKv, kvJson, isObj, JNum } from './typedjson.js'

// CONNACK sessionPresent = !cleanSession on success, as ThingsBoard does, although no
// subscription survives (docs/thingsboard.md §0.9). aedes runs every session clean here.
if (!mqttPacket.writeToStream.__tbemu) {
  const orig = mqttPacket.writeToStream
  const patched = function (packet, stream, opts) {
    const tb = stream && stream.client && stream.client.tb
    if (packet && packet.cmd === 'connack' && tb && tb.sessionPresent && packet.returnCode === 0) packet = { ...packet, sessionPresent: true }
    return orig.call(this, packet, stream, opts)
  }
  patched.__tbemu = true
  mqttPacket.writeToStream = patched
}

const KNOWN_FILTERS = new Set([
  'v1/devices/me/attributes', 'v2/a', 'v2/a/j',
  'v1/devices/me/attributes/response/+', 'v2/a/res/+', 'v2/a/res/j/+',
  'v1/devices/me/rpc/request/+', 'v2/r/req/+', 'v2/r/req/j/+',
  'v1/devices/me/rpc/response/+', 'v2/r/res/+', 'v2/r/res/j/+',
  'v2/fw/response/+/chunk/+', 'v2/fw/error', 'v2/sw/response/+/chunk/+', 'v2/sw/error',
  'v1/gateway/attributes', 'v1/gateway/rpc', 'v1/gateway/attributes/response'
])
const ATTR_SUBS = ['v1/devices/me/attributes', 'v2/a', 'v2/a/j']
const RPC_SUBS = ['v1/devices/me/rpc/request/+', 'v2/r/req/+', 'v2/r/req/j/+']

class Close extends Error {}
const NOACK = Symbol('noack')

// Integer.parseInt
function reqInt (s) {
  if (!/^[+-]?\d+$/.test(s)) throw new Close('bad request id ' + s)
  const n = Number(s)
  if (n > 2147483647 || n < -2147483648) throw new Close('bad request id ' + s)
  return n
}
function topicMatch (filter, topic) {
  const f = filter.split('/'); const t = topic.split('/')
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true
    if (i >= t.length) return false
    if (f[i] !== '+' && f[i] !== t[i]) return false
  }
  return f.length === t.length
}
function jsonOrClose (payload) {
  try { return parse(payload) } catch (e) { throw new Close('invalid JSON: ' + e.message) }
}
function getAsLong (node) {
  if (node instanceof JNum) return /^-?\d+$/.test(node.text) ? Number(BigInt(node.text)) : Math.trunc(node.toNumber())
  if (typeof node === 'string' && /^[+-]?\d+$/.test(node)) return Number(node)
  throw new Close('ts is not a number')
}

export class MqttSide {
  constructor (emu) {
    this.emu = emu
    this.store = emu.store
    this.sessions = new Set()
    this.sid = 0
    this.paused = false
  }

  async start (host, port) {
    const self = this
    this.aedes = new Aedes({
      queueLimit: 100,
      heartbeatInterval: 3600000,
      connectTimeout: 30000,
      maxClientsIdLength: 65535,
      preConnect: (c, p, cb) => self.preConnect(c, p, cb),
      authenticate: (c, u, pw, cb) => self.authenticate(c, u, pw, cb),
      authorizePublish: (c, p, cb) => self.authorizePublish(c, p, cb),
      authorizeSubscribe: (c, s, cb) => self.authorizeSubscribe(c, s, cb),
      authorizeForward: () => null,
      published: (p, c, cb) => { try { if (c && typeof p.__tb === 'function') p.__tb() } catch (e) { self.emu.log('effect error: ' + e.stack) } cb() }
    })
    await this.aedes.listen()
    this.aedes.on('clientReady', (c) => this.onReady(c))
    this.aedes.on('subscribe', (subs, c) => this.onSubscribed(c, subs))
    this.aedes.on('unsubscribe', (unsubs, c) => {
      if (!c.tb) return
      for (const u of unsubs) { c.tb.subs.delete(u); if (c.tb.device) this.store.event(c.tb.device, 'unsubscribed', { topic: u }) }
    })
    this.aedes.on('clientError', (c, err) => { if (c.tb && c.tb.device) this.emu.log(`device ${c.tb.device.name}: connection error: ${err.message}`) })
    this.server = net.createServer((conn) => this.onConnection(conn))
    await new Promise((resolve, reject) => { this.server.once('error', reject); this.server.listen(port, host, resolve) })
    return this.server.address().port
  }

  async stop () {
    for (const c of this.sessions) c.conn.destroy()
    await new Promise(resolve => this.server.close(() => resolve()))
    await new Promise(resolve => this.aedes.close(() => resolve()))
  }

  onConnection (conn) {
    const client = this.aedes.handle(conn)
    const self = this
    client.tb = { sid: ++this.sid, subs: new Map(), ota: new Map(), nextMsgId: 0, pubackWaiters: new Map(), device: null }
    this.sessions.add(client)
    // packet size limit: remaining length over maxPayloadSize closes (Netty MqttDecoder)
    const parser = client._parser
    const origLen = parser._parseLength
    parser._parseLength = function () {
      const ok = origLen.call(this)
      if (ok && this.packet.length > self.emu.config.maxPayloadSize) {
        const dev = client.tb.device
        if (dev) self.store.event(dev, 'closed', { reason: `packet too large (${this.packet.length} bytes)` })
        conn.destroy()
        return false
      }
      return ok
    }
    parser.prependListener('packet', (p) => { // before aedes sees it: QoS 2 subscriptions are granted QoS 1
      if (p.cmd === 'subscribe') for (const sub of p.subscriptions) sub.qos = Math.min(sub.qos, 1)
    })
    parser.on('packet', (p) => {
      this.touch(client)
      if (p.cmd === 'puback' && client.tb.pubackWaiters.has(p.messageId)) {
        const w = client.tb.pubackWaiters.get(p.messageId)
        client.tb.pubackWaiters.delete(p.messageId)
        w()
      }
    })
    if (this.paused) client.pause()
    conn.on('close', () => this.onClose(client))
  }

  touch (client) {
    const tb = client.tb
    if (tb.idleTimer) tb.idleTimer.refresh()
    else {
      tb.idleTimer = setTimeout(() => client.conn.destroy(), this.emu.config.inactivityTimeoutMs)
      tb.idleTimer.unref()
    }
  }

  preConnect (client, packet, cb) {
    const tb = client.tb
    tb.clientId = packet.clientId || ''
    tb.sessionPresent = !packet.clean
    tb.protocolVersion = packet.protocolVersion
    tb.keepalive = packet.keepalive
    packet.clientId = 'tbemu-' + tb.sid // device sessions never collide on client ids
    packet.clean = true
    packet.keepalive = 0 // the transport enforces no keepalive, only inactivity (10 min)
    packet.will = null
    cb(null, true)
  }

  authenticate (client, username, password, cb) {
    const tb = client.tb
    const cid = tb.clientId
    const pw = password == null ? undefined : Buffer.from(password).toString('utf8')
    tb.username = username
    if (username === 'provision' || cid === 'provision') { tb.provision = true; return cb(null, true) }
    const dev = this.store.authenticate(cid, username, pw)
    if (dev) {
      tb.device = dev
      const old = dev.session
      dev.session = client
      if (old && old !== client) {
        this.store.event(dev, 'closed', { reason: 'SESSION_TAKEN_OVER', sid: old.tb.sid })
        old.tb.takenOver = true
        old.conn.destroy()
      }
      this.store.event(dev, 'connected', { sid: tb.sid, clientId: cid, username: username ?? null, cleanSession: !tb.sessionPresent, keepalive: tb.keepalive, protocolVersion: tb.protocolVersion })
      return cb(null, true)
    }
    const u = username != null; const p = password != null
    let v5
    if (u && p && cid) v5 = 0x86
    else if (u !== p) v5 = 0x86
    else if (!u && !p && cid.trim() !== '') v5 = 0x85
    else v5 = 0x87
    const err = new Error('not authorized')
    err.returnCode = v5 === 0x85 ? 2 : 5
    this.emu.log(`CONNECT refused (CONNACK ${err.returnCode}): clientId=${JSON.stringify(cid)} username=${JSON.stringify(username)}`)
    cb(err, false)
  }

  onReady (client) {
    const tb = client.tb
    if (!tb) return
    this.touch(client)
    if (tb.device) {
      if (tb.device.session !== client) client.conn.destroy()
      else this.store.changed('connection', tb.device)
    }
  }

  onClose (client) {
    const tb = client.tb
    this.sessions.delete(client)
    if (tb.idleTimer) clearTimeout(tb.idleTimer)
    if (tb.provisionTimer) clearTimeout(tb.provisionTimer)
    const dev = tb.device
    if (dev && dev.session === client) {
      dev.session = null
      this.store.event(dev, 'disconnected', { sid: tb.sid })
    }
    for (const w of tb.pubackWaiters.values()) w(new Error('closed'))
    tb.pubackWaiters.clear()
  }

  connected (dev) { return !!(dev.session && !dev.session.closed && !dev.session.conn.destroyed) }

  disconnect (dev) {
    if (dev.session) { this.store.event(dev, 'closed', { reason: 'emu: dropped by control API' }); dev.session.conn.destroy() }
  }

  pause () { this.paused = true; for (const c of this.sessions) c.pause() }
  resume () { this.paused = false; for (const c of this.sessions) c.resume() }

  // ---- subscriptions -----------------------------------------------------------------------
  authorizeSubscribe (client, sub, cb) {
    const tb = client.tb
    const ok = tb.provision ? sub.topic === '/provision/response' : KNOWN_FILTERS.has(sub.topic)
    if (!ok) {
      if (tb.device) this.store.event(tb.device, 'subscribe-rejected', { topic: sub.topic })
      return cb(null, null) // SUBACK 0x80
    }
    sub.qos = Math.min(sub.qos, 1)
    tb.subs.set(sub.topic, sub.qos)
    cb(null, sub)
  }

  onSubscribed (client, subs) {
    const dev = client.tb.device
    if (!dev) return
    for (const s of subs) if (s.qos !== 128) this.store.event(dev, 'subscribed', { topic: s.topic, qos: s.qos })
    if (subs.some(s => RPC_SUBS.includes(s.topic) && s.qos !== 128)) this.emu.rpc.sendPending(dev)
  }

  hasSub (client, filters) { return filters.some(f => client.tb.subs.has(f)) }
  attrSubscribed (dev) { return this.connected(dev) && this.hasSub(dev.session, ATTR_SUBS) }
  rpcSubscribed (dev) { return this.connected(dev) && this.hasSub(dev.session, RPC_SUBS) }

  qosFor (client, topic) {
    for (const [f, q] of client.tb.subs) if (topicMatch(f, topic)) return q
    return 1 // no subscription: still sent, at QoS 1
  }

  // Write a PUBLISH straight to this client's socket. Resolves when written (QoS 0) or
  // acknowledged (QoS 1). Returns null when the client is gone.
  sendDown (client, topic, payload, opts = {}) {
    if (!client || client.closed || client.conn.destroyed) return null
    const tb = client.tb
    const buf = Buffer.isBuffer(payload) ? payload : Buffer.from(payload)
    const qos = opts.qos ?? this.qosFor(client, topic)
    const pkt = { cmd: 'publish', topic, payload: buf, qos, retain: false, dup: false }
    let acked = Promise.resolve()
    if (qos > 0) {
      tb.nextMsgId = (tb.nextMsgId + 1) & 0xffff // an unbounded int written as a 16-bit short: wraps through 0
      pkt.messageId = tb.nextMsgId
      acked = new Promise((resolve, reject) => tb.pubackWaiters.set(pkt.messageId, (e) => e ? reject(e) : resolve()))
      acked.catch(() => {})
    }
    mqttPacket.writeToStream(pkt, client.conn)
    if (tb.device) this.store.logMessage(tb.device, 'down', topic, qos, buf, { binary: opts.binary, note: opts.note })
    return acked
  }

  otaError (client, dev, code) {
    this.sendDown(client, 'v2/fw/error', code)
    this.store.event(dev, 'closed', { reason: 'OTA error ' + code })
    setImmediate(() => client.conn.end())
    setTimeout(() => client.conn.destroy(), 200).unref()
  }

  // ---- publishes ---------------------------------------------------------------------------
  authorizePublish (client, packet, cb) {
    const tb = client.tb
    if (packet.qos === 2) packet.qos = 1 // answered with PUBACK, as ThingsBoard does
    const dev = tb.device
    if (dev) this.store.logMessage(dev, 'up', packet.topic, packet.qos, packet.payload)
    let effect
    try {
      effect = tb.provision ? this.routeProvision(client, packet) : this.route(client, dev, packet)
    } catch (e) {
      if (dev) this.store.event(dev, 'closed', { reason: 'bad publish on ' + packet.topic + ': ' + e.message })
      this.emu.log(`closing ${dev ? dev.name : 'provision session'}: ${packet.topic}: ${e.message}`)
      return cb(e)
    }
    if (effect === NOACK) { packet.qos = 0; effect = null }
    if (effect) packet.__tb = effect
    cb(null)
  }

  route (client, dev, packet) {
    const t = packet.topic
    const payload = packet.payload
    let m
    if (t === 'v1/devices/me/telemetry' || t === 'v2/t' || t === 'v2/t/j') return this.telemetry(dev, payload)
    if (t === 'v1/devices/me/attributes' || t === 'v2/a' || t === 'v2/a/j') return this.clientAttributes(dev, payload)
    if ((m = /^v1\/devices\/me\/attributes\/request\/(.*)$/.exec(t))) return this.attrRequest(client, dev, payload, 'v1/devices/me/attributes/response/', m[1])
    if ((m = /^v2\/a\/req\/(j\/)?([^/]*)$/.exec(t))) return this.attrRequest(client, dev, payload, m[1] ? 'v2/a/res/j/' : 'v2/a/res/', m[2])
    if ((m = /^v1\/devices\/me\/rpc\/response\/(.*)$/.exec(t))) return this.rpcResponse(dev, m[1], payload)
    if ((m = /^v2\/r\/res\/(?:j\/)?([^/]*)$/.exec(t))) return this.rpcResponse(dev, m[1], payload)
    if ((m = /^v1\/devices\/me\/rpc\/request\/(.*)$/.exec(t))) return this.clientRpc(client, dev, payload, 'v1/devices/me/rpc/response/', m[1], true)
    if ((m = /^v2\/r\/req\/(j\/)?([^/]*)$/.exec(t))) return this.clientRpc(client, dev, payload, m[1] ? 'v2/r/res/j/' : 'v2/r/res/', m[2], false)
    if (t === 'v1/devices/me/claim') return this.claim(dev, payload)
    if ((m = /^v2\/(fw|sw)\/request\/(.*)$/.exec(t))) {
      const mm = /^(\d+)\/chunk\/(\d+)$/.exec(m[2])
      if (!mm) throw new Close('bad OTA request topic')
      return this.emu.firmware.chunkRequest(client, dev, m[1], mm[1], Number(mm[2]), payload)
    }
    if (t.startsWith('v1/gateway/')) {
      if (!dev.gateway) { this.store.event(dev, 'gateway-publish-ignored', { topic: t }); return NOACK }
      this.store.event(dev, 'gateway-api-not-emulated', { topic: t })
      return null
    }
    this.store.event(dev, 'unknown-topic', { topic: t }) // PUBACK, dropped
    return null
  }

  telemetry (dev, payload) {
    const root = jsonOrClose(payload)
    const now = Date.now()
    const groups = []
    const one = (o) => {
      if (!isObj(o)) throw new Close('telemetry element is not an object')
      if (o.has('ts') && o.has('values')) {
        const ts = getAsLong(o.get('ts'))
        const v = o.get('values')
        if (!isObj(v)) throw new Close('values is not an object')
        groups.push([ts, this.kvs(v)])
      } else groups.push([now, this.kvs(o)])
    }
    if (Array.isArray(root)) root.forEach(one)
    else if (isObj(root)) one(root)
    else throw new Close('telemetry must be an object or an array')
    return () => { for (const [ts, kvs] of groups) this.store.saveTelemetry(dev, ts, kvs) }
  }

  kvs (obj) {
    const out = []
    for (const [k, v] of obj) {
      let kv
      try { kv = toKv(v, { maxStringLength: this.emu.config.maxStringValueLength }) } catch (e) { throw new Close(e.message) }
      if (kv) out.push([k, kv])
    }
    return out
  }

  clientAttributes (dev, payload) {
    const root = jsonOrClose(payload)
    if (!isObj(root)) throw new Close('attributes must be a JSON object')
    const kvs = this.kvs(root)
    return () => this.store.saveAttributes(dev, 'CLIENT_SCOPE', kvs)
  }

  attrRequest (client, dev, payload, respPrefix, idText) {
    const id = reqInt(idText)
    const root = jsonOrClose(payload)
    if (!isObj(root)) throw new Close('attribute request must be an object')
    const keySet = (name) => {
      if (!root.has(name)) return null
      let el = root.get(name)
      if (Array.isArray(el)) { if (el.length !== 1) throw new Close(name + ': array with ' + el.length + ' elements'); el = el[0] }
      let s
      if (typeof el === 'string') s = el
      else if (el instanceof JNum) s = el.text
      else if (typeof el === 'boolean') s = String(el)
      else throw new Close(name + ' is not a string')
      const parts = s.split(',')
      while (parts.length > 1 && parts[parts.length - 1] === '') parts.pop() // Java String.split drops trailing empties
      return [...new Set(parts)]
    }
    const clientKeys = keySet('clientKeys')
    const sharedKeys = keySet('sharedKeys')
    return () => {
      const all = !clientKeys && !sharedKeys
      const section = (scope, keys) => {
        const m = dev.attributes[scope]
        const list = all ? [...m.keys()] : (keys || []).filter(k => m.has(k))
        if (!list.length) return null
        return '{' + list.map(k => JSON.stringify(k) + ':' + kvJson(m.get(k).kv)).join(',') + '}'
      }
      const parts = []
      const c = section('CLIENT_SCOPE', clientKeys); if (c) parts.push('"client":' + c)
      const s = section('SHARED_SCOPE', sharedKeys); if (s) parts.push('"shared":' + s)
      this.sendDown(client, respPrefix + id, '{' + parts.join(',') + '}')
    }
  }

  rpcResponse (dev, idText, payload) {
    const id = reqInt(idText)
    return () => this.emu.rpc.onDeviceResponse(dev, id, payload.toString('utf8'))
  }

  clientRpc (client, dev, payload, respPrefix, idText, v1) {
    const id = reqInt(idText)
    const root = jsonOrClose(payload)
    if (!isObj(root) || !root.has('method') || root.get('method') === null || isObj(root.get('method')) || Array.isArray(root.get('method'))) throw new Close('client RPC without method')
    const mv = root.get('method')
    const method = mv instanceof JNum ? mv.text : String(mv)
    const params = root.has('params') ? root.get('params') : null
    return () => {
      const topic = respPrefix + id
      const send = (text, note) => { if (!client.closed) this.sendDown(client, topic, text, { note }) }
      const builtin = v1 && method === 'getSessionLimits' ? stringify(this.emu.sessionLimits(dev)) : undefined
      this.emu.clientRpc.request(dev, { id, method, params, builtin, send })
    }
  }

  claim (dev, payload) {
    let secretKey = ''; let durationMs = 0
    if (payload.length) {
      const root = jsonOrClose(payload)
      if (!isObj(root)) throw new Close('claim payload must be an object')
      if (root.has('secretKey')) { const v = root.get('secretKey'); secretKey = v instanceof JNum ? v.text : String(v) }
      if (root.has('durationMs')) durationMs = getAsLong(root.get('durationMs'))
    }
    return () => {
      if (durationMs <= 0) durationMs = this.emu.config.claimDurationMs
      const now = Date.now()
      if (dev.customerId) { this.store.event(dev, 'claim-refused', {}); return } // claimed: the server does not cache it
      if (dev.claim && dev.claim.expiresAt > now) { this.store.event(dev, 'claim-ignored', {}); return } // putIfAbsent
      dev.claim = { secretKey, durationMs, requestedAt: now, expiresAt: now + durationMs }
      this.store.changed('claim', dev, dev.claim)
    }
  }

  // ---- provisioning (docs/thingsboard.md §5) -----------------------------------------------
  routeProvision (client, packet) {
    if (packet.topic !== '/provision/request') return () => { client.conn.destroy() }
    const root = jsonOrClose(packet.payload)
    if (!isObj(root)) throw new Close('provision request must be an object')
    const s = (k) => { if (!root.has(k) || root.get(k) === null) return undefined; const v = root.get(k); return v instanceof JNum ? v.text : (typeof v === 'string' || typeof v === 'boolean' ? String(v) : stringify(v)) }
    const key = s('provisionDeviceKey'); const secret = s('provisionDeviceSecret')
    if (key === undefined || secret === undefined) throw new Close('provisionDeviceKey/provisionDeviceSecret missing')
    const req = { key, secret, deviceName: s('deviceName'), credentialsType: s('credentialsType') || 'ACCESS_TOKEN', token: s('token'), clientId: s('clientId'), username: s('username'), password: s('password'), hash: s('hash'), gateway: root.get('gateway') === true }
    return () => {
      const { response: resp, device } = this.emu.provision(req)
      this.sendDown(client, '/provision/response', stringify(resp))
      if (device) { // the session has no device: log the exchange on the device it made
        this.store.logMessage(device, 'up', packet.topic, packet.qos, packet.payload)
        this.store.logMessage(device, 'down', '/provision/response', this.qosFor(client, '/provision/response'), stringify(resp), { note: resp.status })
      }
      client.tb.provisionTimer = setTimeout(() => client.conn.destroy(), this.emu.config.provisionCloseMs)
      client.tb.provisionTimer.unref()
    }
  }
}
