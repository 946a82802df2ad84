// clientrpc.js — client-side RPC (docs/thingsboard.md §4.7): the device asks, tbemu answers by
// rule, as a rule chain would. A rule (for one device, or for all) answers a method with a
// JSON response, with the request's params (echo) or with the current time in ms (ThingsBoard's
// own getCurrentTime example), after an optional delay. A request no rule answers waits: the
// device gets the server's {"error":"timeout"} after clientRpcTimeoutMs, unless a rule for its
// method is added meanwhile, which then answers it. The last requests of each device are kept
// (runtime only) so the page can show what went unanswered.
import { httpError } from './store.js'
import { stringify, isObj } from './typedjson.js'

const RECENT = 50 // requests kept per device

// A REST body → {method, rule}. Rule: {responseText | echo | currentTime, delayMs}.
export function parseRule (body) {
  if (!isObj(body)) throw httpError(400, 'JSON object expected')
  const get = (k) => body.has(k) ? JSON.parse(stringify(body.get(k))) : undefined
  const method = get('method')
  if (typeof method !== 'string' || !method) throw httpError(400, 'method is required')
  const delayMs = Number(get('delayMs') || 0)
  if (!Number.isFinite(delayMs) || delayMs < 0) throw httpError(400, 'delayMs must be a number of ms >= 0')
  const rule = { delayMs }
  if (get('echo')) rule.echo = true
  else if (get('currentTime')) rule.currentTime = true
  else if (typeof get('responseText') === 'string') rule.responseText = get('responseText')
  else if (body.has('response')) rule.responseText = stringify(body.get('response')) // number text kept: 2.0 stays 2.0
  else throw httpError(400, 'response, responseText, echo or currentTime is required')
  return { method, rule }
}

export function describeRule (rule) {
  const what = rule.echo ? 'echo params' : rule.currentTime ? 'current time (ms)' : rule.responseText
  return rule.delayMs ? `${what} after ${rule.delayMs} ms` : what
}

export class ClientRpc {
  constructor (emu) { this.emu = emu; this.store = emu.store }

  // The rule answering `method` for `dev`: the device's own first, else the global one.
  ruleFor (dev, method) {
    if (dev.clientRpc && dev.clientRpc[method]) return { rule: dev.clientRpc[method], scope: 'device' }
    if (this.emu.config.clientRpc[method]) return { rule: this.emu.config.clientRpc[method], scope: 'global' }
    return null
  }

  // dev null: a rule for every device. Requests of that method still waiting are answered now.
  setRule (dev, method, rule) {
    if (dev) dev.clientRpc[method] = rule
    else this.emu.config.clientRpc[method] = rule
    this.store.changed('rules', dev)
    for (const d of dev ? [dev] : this.store.devices.values()) {
      for (const r of recent(d)) if (r.status === 'waiting' && r.method === method) this.answer(d, r, this.ruleFor(d, method))
    }
  }

  deleteRule (dev, method) {
    const rules = dev ? dev.clientRpc : this.emu.config.clientRpc
    if (!Object.hasOwn(rules, method)) throw httpError(404, `no client RPC rule for ${method}`)
    delete rules[method]
    this.store.changed('rules', dev)
  }

  // For the page and GET /emu/devices/{name}/client-rpc.
  rules (dev) {
    const out = Object.entries(dev.clientRpc).map(([method, rule]) => ({ method, scope: 'device', ...rule, answer: describeRule(rule) }))
    for (const [method, rule] of Object.entries(this.emu.config.clientRpc)) {
      if (!dev.clientRpc[method]) out.push({ method, scope: 'global', ...rule, answer: describeRule(rule) })
    }
    return out
  }

  requests (dev) {
    return recent(dev).map(({ timer, send, ...r }) => r)
  }

  // A request from the device. send(text, note) publishes the answer; it is a no-op once the
  // session is gone.
  request (dev, { id, method, params, builtin, send }) {
    const r = { id, method, params: stringify(params), ts: Date.now(), status: 'waiting', answeredTs: null, by: null, send }
    const list = recent(dev)
    list.push(r)
    if (list.length > RECENT) list.splice(0, list.length - RECENT)
    this.store.event(dev, 'client-rpc', { id, method })
    if (builtin !== undefined) {
      this.emu.log(`device ${dev.name}: client RPC ${method} (id ${id}): answered by tbemu (built in)`)
      this.finish(dev, r, builtin, 'built in')
      return
    }
    const found = this.ruleFor(dev, method)
    if (found) {
      this.emu.log(`device ${dev.name}: client RPC ${method} (id ${id}): answered by ${found.scope} rule: ${describeRule(found.rule)}`)
      this.answer(dev, r, found)
      return
    }
    const t = this.emu.config.clientRpcTimeoutMs
    this.emu.log(`device ${dev.name}: client RPC ${method} (id ${id}): no rule answers it; the device gets {"error":"timeout"} after ${t} ms unless a rule for ${method} is added`)
    r.timer = setTimeout(() => {
      this.emu.log(`device ${dev.name}: client RPC ${method} (id ${id}): unanswered, {"error":"timeout"} sent`)
      this.finish(dev, r, '{"error":"timeout"}', 'timeout', 'timed out')
    }, t)
    r.timer.unref()
    this.store.changed('clientRpc', dev)
  }

  answer (dev, r, { rule, scope }) {
    clearTimeout(r.timer)
    r.status = 'scheduled'
    const text = rule.echo ? r.params : rule.currentTime ? null : rule.responseText
    r.timer = setTimeout(() => this.finish(dev, r, text ?? String(Date.now()), `${scope} rule`), rule.delayMs || 0)
    r.timer.unref()
    this.store.changed('clientRpc', dev)
  }

  finish (dev, r, text, by, status = 'answered') {
    r.status = status
    r.by = by
    r.answeredTs = Date.now()
    r.response = text
    r.send(text, by)
    this.store.changed('clientRpc', dev)
  }
}

function recent (dev) {
  if (!dev.clientRpcRequests) dev.clientRpcRequests = []
  return dev.clientRpcRequests
}
