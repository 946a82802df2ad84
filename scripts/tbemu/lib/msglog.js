// msglog.js — the message log of each device, as the page shows it: every MQTT exchange of its
// sessions in both directions (CONNECT, SUBSCRIBE, every PUBLISH, the connection's end), each
// with its kind, at most `limit` entries per device (runtime only). A firmware download is one
// entry per request id, updated as its chunks go, not one line per chunk.
// The raw record of every PUBLISH stays in the store (GET /emu/devices/{name}/messages).
export const KINDS = ['session', 'telemetry', 'attributes', 'attribute-request', 'rpc', 'client-rpc', 'claim', 'provision', 'firmware', 'other']

const FW_IDLE_MS = 60000 // a request id unused this long starts a new firmware entry

// Kind of a PUBLISH by its topic and direction (up = device → server).
export function kindOf (topic, dir) {
  if (/^(v1\/devices\/me\/telemetry|v2\/t(\/j)?)$/.test(topic)) return 'telemetry'
  if (/^(v1\/devices\/me\/attributes|v2\/a(\/j)?)$/.test(topic)) return 'attributes'
  if (/^(v1\/devices\/me\/attributes\/(request|response)\/|v2\/a\/(req|res)\/)/.test(topic)) return 'attribute-request'
  if (/^(v1\/devices\/me\/rpc\/request\/|v2\/r\/req\/)/.test(topic)) return dir === 'up' ? 'client-rpc' : 'rpc'
  if (/^(v1\/devices\/me\/rpc\/response\/|v2\/r\/res\/)/.test(topic)) return dir === 'up' ? 'rpc' : 'client-rpc'
  if (topic === 'v1/devices/me/claim') return 'claim'
  if (topic.startsWith('/provision/')) return 'provision'
  if (/^v2\/(fw|sw)\//.test(topic)) return 'firmware'
  return 'other'
}

export class MessageLog {
  constructor (store, { limit = 1000 } = {}) {
    this.store = store
    this.limit = limit
    this.seq = 0
    store.on('message', (dev, m) => this.onPublish(dev, m))
    store.on('change', (kind, dev, e) => { if (kind === 'event' && dev) this.onEvent(dev, e) })
  }

  entries (dev) {
    if (!dev.msgLog) dev.msgLog = []
    return dev.msgLog
  }

  // since: the last seq the caller has (an updated entry gets a new seq); kinds: array or null
  list (dev, { since = 0, kinds = null, limit = this.limit } = {}) {
    const out = this.entries(dev).filter(e => e.seq > since && (!kinds || kinds.includes(e.kind)))
    return out.slice(-limit)
  }

  clear (dev) { dev.msgLog = []; dev.fwEntries = new Map() }

  add (dev, e) {
    e.id = e.seq = ++this.seq
    const list = this.entries(dev)
    list.push(e)
    if (list.length > this.limit + 50) list.splice(0, list.length - this.limit)
    this.store.emit('log', dev, e)
    return e
  }

  touch (dev, e) {
    e.seq = ++this.seq
    this.store.emit('log', dev, e)
  }

  onPublish (dev, m) {
    const fw = /^v2\/(fw|sw)\/(request|response)\/([^/]+)\/chunk\/(\d+)$/.exec(m.topic)
    if (fw) return this.onChunk(dev, m, fw[1], fw[2], fw[3], Number(fw[4]))
    const e = { ts: m.ts, dir: m.dir, kind: kindOf(m.topic, m.dir), topic: m.topic, qos: m.qos, size: m.size, payload: m.payload }
    if (m.encoding) e.encoding = m.encoding
    const notes = [rpcMethod(e), m.note].filter(Boolean)
    if (notes.length) e.note = notes.join('; ')
    this.add(dev, e)
  }

  // One entry per download (fw|sw and request id): chunks asked for, chunks served, bytes.
  onChunk (dev, m, kind, what, reqId, idx) {
    if (!dev.fwEntries) dev.fwEntries = new Map()
    const key = kind + '/' + reqId
    let e = dev.fwEntries.get(key)
    if (!e || m.ts - e.ts > FW_IDLE_MS || !this.entries(dev).includes(e)) {
      e = { ts: m.ts, dir: 'both', kind: 'firmware', topic: `v2/${kind}/request/${reqId}/chunk/*`, qos: m.qos, size: 0, payload: null, chunks: { requested: 0, served: 0, first: idx, last: idx, chunkSize: null } }
      dev.fwEntries.set(key, e)
      this.add(dev, e)
    } else this.touch(dev, e)
    const c = e.chunks
    e.ts = m.ts
    c.first = Math.min(c.first, idx)
    c.last = Math.max(c.last, idx)
    if (what === 'request') { c.requested++; if (m.payload) c.chunkSize = Number(m.payload) } else { c.served++; e.size += m.size }
    e.note = `chunks ${c.first}–${c.last}: ${c.requested} requested${c.chunkSize ? ` (${c.chunkSize} B each)` : ''}, ${c.served} served, ${e.size} bytes`
  }

  onEvent (dev, ev) {
    const session = (topic, dir, note, payload = null) => this.add(dev, { ts: ev.ts, dir, kind: 'session', topic, qos: null, size: null, payload, note })
    switch (ev.type) {
      case 'connected': {
        const connect = { clientId: ev.clientId, username: ev.username, cleanSession: ev.cleanSession, keepAlive: ev.keepalive, protocolLevel: ev.protocolVersion }
        return session('CONNECT', 'up', ev.sessionPresent ? 'accepted, sessionPresent' : 'accepted', JSON.stringify(connect))
      }
      case 'subscribed': return session('SUBSCRIBE ' + ev.topic, 'up', `granted QoS ${ev.qos}`)
      case 'subscribe-rejected': return session('SUBSCRIBE ' + ev.topic, 'up', 'refused (SUBACK 0x80)')
      case 'unsubscribed': return session('UNSUBSCRIBE ' + ev.topic, 'up', null)
      case 'closed': return session('closed by the server', 'down', ev.reason || null)
      case 'disconnected': return session('connection closed', 'up', null)
    }
  }
}

// "method NAME" for an RPC request, from its payload
function rpcMethod (e) {
  if ((e.kind !== 'rpc' && e.kind !== 'client-rpc') || !/\/(request|req)\//.test(e.topic) || !e.payload) return null
  try { const m = JSON.parse(e.payload).method; return m === undefined ? null : 'method ' + m } catch { return null }
}
