// live.js — the web page's live feed: GET /emu/events, server-sent events.
//   snapshot       {devices:[summary], packages, mqtt, http, kinds}   on connecting
//   device         summary of a device that changed
//   telemetry      {id, points:[{ts, key, type, value, text}]}        points as saved
//   log            {id, entries:[message-log entry]}                  new or updated entries
//   deviceDeleted  {id}
//   packages       [package]
// A device's changes are gathered and sent at most every FLUSH_MS, so a busy device costs one
// summary per interval, not one per message.
import { plainKv } from './typedjson.js'
import { KINDS } from './msglog.js'

const FLUSH_MS = 100

export class LiveFeed {
  constructor (rest) {
    this.rest = rest
    this.store = rest.store
    this.clients = new Set()
    this.pending = new Map() // device id -> {dev, summary, points, log: Map id -> entry}
    this.timer = null
    this.store.on('change', (kind, dev, detail) => this.onChange(kind, dev, detail))
    this.store.on('log', (dev, e) => { if (this.clients.size) this.queue(dev).log.set(e.id, e) })
  }

  attach (req, res) {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
    const emu = this.rest.emu
    write(res, 'snapshot', { devices: [...this.store.devices.values()].map(d => this.rest.plainSummary(d)), packages: this.rest.packages(), mqtt: emu.mqttPort, http: emu.httpPort, kinds: KINDS })
    this.clients.add(res)
    req.on('close', () => this.clients.delete(res))
  }

  stop () {
    clearTimeout(this.timer)
    for (const r of this.clients) r.end()
    this.clients.clear()
  }

  onChange (kind, dev, detail) {
    if (!this.clients.size) return
    if (kind === 'deviceDeleted') {
      this.pending.delete(dev.id)
      return this.send('deviceDeleted', { id: dev.id })
    }
    if (kind === 'package') return this.send('packages', this.rest.packages())
    if (!dev) return
    const p = this.queue(dev)
    p.summary = true
    if (kind === 'telemetry') for (const [key, kv] of detail.entries) p.points.push({ ts: detail.ts, key, ...plainKv(kv) })
  }

  queue (dev) {
    let p = this.pending.get(dev.id)
    if (!p) this.pending.set(dev.id, (p = { dev, summary: false, points: [], log: new Map() }))
    if (!this.timer) this.timer = setTimeout(() => this.flush(), FLUSH_MS)
    return p
  }

  flush () {
    this.timer = null
    const pending = [...this.pending.values()]
    this.pending.clear()
    for (const { dev, summary, points, log } of pending) {
      if (!this.store.devices.has(dev.id)) continue
      if (points.length) this.send('telemetry', { id: dev.id, points })
      if (log.size) this.send('log', { id: dev.id, entries: [...log.values()] })
      if (summary) this.send('device', this.rest.plainSummary(dev))
    }
  }

  send (type, data) {
    if (!this.clients.size) return
    for (const r of this.clients) write(r, type, data)
  }
}

function write (res, type, data) { res.write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`) }
