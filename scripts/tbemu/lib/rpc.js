// rpc.js — server-side RPC (docs/thingsboard.md §4.6): per-device ids from 0, pending requests pushed
// when the device subscribes, REST status codes 200 / 408 / 409 / 406.
import { parse, stringify } from './typedjson.js'

export class Rpc {
  constructor (emu) { this.emu = emu; this.store = emu.store }

  // body: parsed REST body (Map) → Promise<{status, body}>
  call (dev, { method, params, timeout, oneway }) {
    const cfg = this.emu.config
    let t = Number(timeout)
    if (!Number.isFinite(t) || t <= 0) t = cfg.rpcDefaultTimeoutMs
    t = Math.max(t, cfg.rpcMinTimeoutMs)
    const id = dev.rpcSeq++
    const payload = '{"method":' + JSON.stringify(String(method)) + ',"params":' + stringify(params === undefined ? null : params) + '}'
    return new Promise((resolve) => {
      const req = { id, method, payload, oneway, sent: false, delivered: false, resolve, createdTs: Date.now() }
      req.timer = setTimeout(() => this.finish(dev, req, { status: req.sent ? 408 : 409, body: '' }), t)
      req.timer.unref()
      dev.rpcPending.set(id, req)
      this.store.event(dev, 'rpc-request', { id, method, oneway: !!oneway })
      this.trySend(dev, req)
    })
  }

  trySend (dev, req) {
    const mqtt = this.emu.mqtt
    if (!mqtt.rpcSubscribed(dev)) return
    const client = dev.session
    const topic = client.tb.subs.has('v1/devices/me/rpc/request/+') || !(client.tb.subs.has('v2/r/req/+') || client.tb.subs.has('v2/r/req/j/+'))
      ? 'v1/devices/me/rpc/request/' + req.id
      : (client.tb.subs.has('v2/r/req/j/+') ? 'v2/r/req/j/' : 'v2/r/req/') + req.id
    req.sent = true
    const acked = mqtt.sendDown(client, topic, req.payload)
    if (!acked) return
    acked.then(() => {
      req.delivered = true
      this.store.event(dev, 'rpc-delivered', { id: req.id })
      if (req.oneway) this.finish(dev, req, { status: 200, body: '' })
    }, () => {})
  }

  // the device subscribed to the RPC topic: push what is not yet delivered
  sendPending (dev) {
    for (const req of dev.rpcPending.values()) if (!req.delivered) this.trySend(dev, req)
  }

  onDeviceResponse (dev, id, text) {
    const req = dev.rpcPending.get(id)
    if (!req || req.oneway) { this.store.event(dev, 'rpc-response-stale', { id }); return }
    let res
    if (text === '') res = { status: 200, body: '' }
    else {
      try { res = { status: 200, body: stringify(parse(text)) } } catch { res = { status: 406, body: '' } }
    }
    this.store.event(dev, 'rpc-response', { id, status: res.status })
    this.finish(dev, req, res)
  }

  finish (dev, req, res) {
    if (!dev.rpcPending.has(req.id)) return
    dev.rpcPending.delete(req.id)
    clearTimeout(req.timer)
    if (res.status !== 200) this.store.event(dev, 'rpc-failed', { id: req.id, status: res.status })
    req.resolve(res)
  }
}
