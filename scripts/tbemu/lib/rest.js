// rest.js — the control side over HTTP: ThingsBoard REST paths (so a test also runs against a
// real ThingsBoard), the emulator-only /emu API (emu-api.js), URL-package files, the web page
// with the chart library it uses, and its live feed (live.js).
import http from 'node:http'
import fs from 'node:fs'
import path from 'node:path'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { parse, stringify, toKv, kvRaw, kvString, plainKv, isObj, JNum, Raw } from './typedjson.js'
import { httpError, SCOPES } from './store.js'
import { defineEmuApi } from './emu-api.js'
import { LiveFeed } from './live.js'

const WEB = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'web')
// uPlot from scripts/node_modules, served by tbemu itself: the page works offline. Looked up
// when asked for, so a node_modules from before it only costs the page its charts.
const VENDOR = ['uPlot.iife.min.js', 'uPlot.min.css']
function vendorFile (file) {
  if (!VENDOR.includes(file)) return null
  try { return path.join(path.dirname(createRequire(import.meta.url).resolve('uplot')), file) } catch {
    throw httpError(404, 'uplot is not installed: npm ci --prefix scripts')
  }
}

export class RestSide {
  constructor (emu) {
    this.emu = emu
    this.store = emu.store
    this.live = new LiveFeed(this)
    this.routes = []
    this.define()
  }

  async start (host, port) {
    this.server = http.createServer((req, res) => this.handle(req, res))
    this.server.keepAliveTimeout = 1000
    await new Promise((resolve, reject) => { this.server.once('error', reject); this.server.listen(port, host, resolve) })
    return this.server.address().port
  }

  async stop () {
    this.live.stop()
    this.server.closeAllConnections()
    await new Promise(resolve => this.server.close(() => resolve()))
  }

  on (method, pattern, fn) {
    const names = []
    const re = new RegExp('^' + pattern.replace(/:(\w+)/g, (_, n) => { names.push(n); return '([^/]+)' }) + '$')
    this.routes.push({ method, re, names, fn })
  }

  async handle (req, res) {
    const url = new URL(req.url, 'http://x')
    try {
      for (const r of this.routes) {
        if (r.method !== req.method && !(r.method === 'GET' && req.method === 'HEAD')) continue
        const m = r.re.exec(url.pathname)
        if (!m) continue
        const params = Object.fromEntries(r.names.map((n, i) => [n, decodeURIComponent(m[i + 1])]))
        const q = Object.fromEntries(url.searchParams)
        const ctx = { req, res, params, q, url, body: () => readBody(req), json: async () => { const b = await readBody(req); return b.length ? parse(b) : new Map() } }
        const out = await r.fn(ctx)
        if (out === undefined) return // handled
        this.store.flush() // what this request changed is on disk before the answer
        return send(res, 200, out)
      }
      send(res, 404, { status: 404, message: 'Not found: ' + url.pathname, errorCode: 32, timestamp: Date.now() })
    } catch (e) {
      this.store.flush()
      const status = e.status || (e instanceof SyntaxError ? 400 : 500)
      if (status === 500) this.emu.log('HTTP error: ' + e.stack)
      if (!res.headersSent) send(res, status, { status, message: e.message, errorCode: status === 404 ? 32 : status === 401 ? 10 : 31, timestamp: Date.now() })
      else res.destroy()
    }
  }

  tbDevice (dev) {
    return {
      id: { entityType: 'DEVICE', id: dev.id }, createdTime: dev.createdTime,
      tenantId: { entityType: 'TENANT', id: '13814000-1dd2-11b2-8080-808080808080' },
      customerId: { entityType: 'CUSTOMER', id: dev.customerId || '13814000-1dd2-11b2-8080-808080808080' },
      name: dev.name, type: dev.type, label: null, deviceProfileId: { entityType: 'DEVICE_PROFILE', id: '5d8c5d90-0000-11ee-8080-808080808080' },
      additionalInfo: { gateway: dev.gateway }
    }
  }

  plainSummary (dev) {
    const s = this.emu.summary(dev)
    s.latest = Object.fromEntries(Object.entries(s.latest).map(([k, v]) => [k, { ts: v.ts, ...plainKv(v.kv) }]))
    for (const sc of SCOPES) s.attributes[sc] = Object.fromEntries(Object.entries(s.attributes[sc]).map(([k, v]) => [k, { lastUpdateTs: v.lastUpdateTs, ...plainKv(v.kv) }]))
    return s
  }

  packages () { return [...this.store.packages.values()].map(p => this.emu.firmware.publicPackage(p)) }

  define () {
    const emu = this.emu; const store = this.store
    const dev = (id) => { const d = store.byId(id); if (!d) throw httpError(404, 'Requested item wasn\'t found!'); return d }
    const keysOf = (q) => q.keys !== undefined ? q.keys.split(',').filter(k => k !== '') : null
    const kvsOf = (body) => {
      if (!isObj(body)) throw httpError(400, 'JSON object expected')
      const out = []
      for (const [k, v] of body) { const kv = toKv(v); if (kv) out.push([k, kv]) }
      return out
    }

    // ---- ThingsBoard REST --------------------------------------------------------------
    this.on('POST', '/api/auth/login', () => ({ token: 'tbemu.jwt.token', refreshToken: 'tbemu.refresh.token' }))
    this.on('GET', '/api/auth/user', () => ({ id: { entityType: 'USER', id: '00000000-0000-0000-0000-000000000001' }, authority: 'TENANT_ADMIN', email: 'tenant@thingsboard.org' }))
    this.on('GET', '/api/tenant/devices', ({ q }) => {
      if (q.deviceName !== undefined) {
        const d = store.byName(q.deviceName)
        if (!d) throw httpError(404, 'Requested item wasn\'t found!')
        return this.tbDevice(d)
      }
      const all = [...store.devices.values()].filter(d => !q.textSearch || d.name.toLowerCase().includes(q.textSearch.toLowerCase()))
      const size = Number(q.pageSize || 100); const page = Number(q.page || 0)
      return { data: all.slice(page * size, page * size + size).map(d => this.tbDevice(d)), totalPages: Math.ceil(all.length / size), totalElements: all.length, hasNext: (page + 1) * size < all.length }
    })
    this.on('GET', '/api/device/:id', ({ params }) => this.tbDevice(dev(params.id)))
    // Claiming by a customer (docs/thingsboard.md §4.8; DeviceController.claimDevice and
    // ClaimDevicesServiceImpl.claimDevice): 200 {"device","response":"SUCCESS"}; 400 "FAILURE"
    // for no claim, an expired one or a wrong secret (which also drops the claim, as the
    // server evicts it); 400 "CLAIMED" once the device belongs to a customer.
    this.on('POST', '/api/customer/device/:name/claim', async ({ params, json }) => {
      const d = store.byName(params.name)
      if (!d) throw httpError(404, 'Requested item wasn\'t found!')
      const b = await json()
      const v = isObj(b) && b.has('secretKey') ? b.get('secretKey') : null
      const secret = v === null || v === undefined ? '' : (v instanceof JNum ? v.text : String(v))
      const fail = (r) => ({ status: 400, body: JSON.stringify(r) })
      const c = d.claim
      if (!c) return fail(d.customerId ? 'CLAIMED' : 'FAILURE')
      d.claim = null
      if (Date.now() > c.expiresAt || secret !== c.secretKey) {
        store.event(d, 'claim-failed', {}); store.changed('claim', d, null)
        return fail('FAILURE')
      }
      if (d.customerId) { store.changed('claim', d, null); return fail('CLAIMED') }
      d.customerId = '23a4bc10-0000-11ee-8080-808080808080'
      store.event(d, 'claimed', { customerId: d.customerId }); store.changed('claim', d, null)
      return { status: 200, body: stringify({ device: this.tbDevice(d), response: 'SUCCESS' }) }
    })
    this.on('DELETE', '/api/customer/device/:name/claim', ({ params }) => {
      const d = store.byName(params.name)
      if (!d) throw httpError(404, 'Requested item wasn\'t found!')
      d.customerId = null; d.claim = null
      store.event(d, 'reclaimed', {}); store.changed('claim', d, null)
      return ''
    })
    this.on('GET', '/api/device/:id/credentials', ({ params }) => {
      const c = dev(params.id).credentials
      return c.credentialsType === 'ACCESS_TOKEN'
        ? { deviceId: { entityType: 'DEVICE', id: params.id }, credentialsType: 'ACCESS_TOKEN', credentialsId: c.credentialsId, credentialsValue: null }
        : { deviceId: { entityType: 'DEVICE', id: params.id }, credentialsType: 'MQTT_BASIC', credentialsId: null, credentialsValue: JSON.stringify({ clientId: c.clientId, userName: c.userName, password: c.password }) }
    })
    this.on('GET', '/api/plugins/telemetry/DEVICE/:id/keys/timeseries', ({ params }) => [...dev(params.id).telemetry.keys()])
    this.on('GET', '/api/plugins/telemetry/DEVICE/:id/keys/attributes(?:/(\\w+))?', ({ params, url }) => {
      const d = dev(params.id); const sc = url.pathname.split('/')[8]
      return [...new Set((sc ? [sc] : SCOPES).flatMap(s => [...(d.attributes[s] || new Map()).keys()]))]
    })
    this.on('GET', '/api/plugins/telemetry/DEVICE/:id/values/timeseries', ({ params, q }) => {
      const d = dev(params.id)
      const strict = q.useStrictDataTypes === 'true'
      const val = (kv) => strict ? kvRaw(kv) : kvString(kv)
      const keys = keysOf(q) || [...d.telemetry.keys()]
      const out = {}
      if (q.startTs === undefined && q.endTs === undefined) {
        for (const k of keys) { const l = store.latest(d, k); if (l) out[k] = [{ ts: l.ts, value: val(l.kv) }] }
        return out
      }
      const start = Number(q.startTs || 0); const end = Number(q.endTs || Date.now())
      const limit = Number(q.limit || 100); const asc = (q.orderBy || 'DESC').toUpperCase() === 'ASC'
      for (const k of keys) {
        let h = (d.telemetry.get(k) || []).filter(e => e.ts >= start && e.ts < end)
        if (!asc) h = h.slice().reverse()
        h = h.slice(0, limit)
        if (h.length) out[k] = h.map(e => ({ ts: e.ts, value: val(e.kv) }))
      }
      return out
    })
    const attrValues = ({ params, q }) => {
      const d = dev(params.id)
      const sc = params.scope
      if (sc && !SCOPES.includes(sc)) throw httpError(400, 'Invalid scope ' + sc)
      const keys = keysOf(q)
      const out = []
      for (const s of sc ? [sc] : SCOPES) {
        for (const [k, v] of d.attributes[s]) if (!keys || keys.includes(k)) out.push({ lastUpdateTs: v.lastUpdateTs, key: k, value: kvRaw(v.kv) })
      }
      return out
    }
    this.on('GET', '/api/plugins/telemetry/DEVICE/:id/values/attributes', attrValues)
    this.on('GET', '/api/plugins/telemetry/DEVICE/:id/values/attributes/:scope', attrValues)
    const saveAttrs = async ({ params, json }) => {
      const d = dev(params.id)
      const scope = params.scope
      if (scope !== 'SHARED_SCOPE' && scope !== 'SERVER_SCOPE') throw httpError(400, 'Invalid scope: ' + scope)
      const kvs = kvsOf(await json())
      if (scope === 'SHARED_SCOPE') emu.setSharedAttributes(d, kvs)
      else store.saveAttributes(d, scope, kvs)
      return ''
    }
    this.on('POST', '/api/plugins/telemetry/DEVICE/:id/attributes/:scope', saveAttrs)
    this.on('POST', '/api/plugins/telemetry/DEVICE/:id/:scope', saveAttrs)
    this.on('DELETE', '/api/plugins/telemetry/DEVICE/:id/:scope', ({ params, q }) => {
      const d = dev(params.id)
      const keys = keysOf(q) || []
      if (!SCOPES.includes(params.scope)) throw httpError(400, 'Invalid scope')
      if (params.scope === 'SHARED_SCOPE') emu.deleteSharedAttributes(d, keys)
      else store.deleteAttributes(d, params.scope, keys)
      return ''
    })
    this.on('POST', '/api/plugins/telemetry/DEVICE/:id/timeseries/:scope', async ({ params, json }) => {
      const d = dev(params.id); const body = await json()
      const groups = Array.isArray(body) ? body : [body]
      for (const g of groups) {
        if (isObj(g) && g.has('ts') && g.has('values')) store.saveTelemetry(d, Number(g.get('ts').text ?? g.get('ts')), kvsOf(g.get('values')))
        else store.saveTelemetry(d, Date.now(), kvsOf(g))
      }
      return ''
    })
    const rpc = (oneway) => async ({ params, json }) => {
      const d = dev(params.id)
      const body = await json()
      if (!isObj(body) || !body.has('method')) throw httpError(400, 'method is required')
      const t = body.get('timeout')
      const r = await emu.rpc.call(d, { method: body.get('method'), params: body.get('params'), timeout: t instanceof JNum ? t.toNumber() : t, oneway })
      if (r.status !== 200 || r.body === '') return r
      return new Raw(r.body)
    }
    this.on('POST', '/api/plugins/rpc/twoway/:id', rpc(false))
    this.on('POST', '/api/plugins/rpc/oneway/:id', rpc(true))

    defineEmuApi(this)
    // ---- web page -----------------------------------------------------------------------
    this.on('GET', '/', ({ res }) => this.serveStatic('index.html', res))
    this.on('GET', '/web/:file', ({ params, res }) => this.serveStatic(params.file, res))
    this.on('GET', '/vendor/:file', ({ params, res }) => this.serveStatic(params.file, res, vendorFile(params.file)))
  }

  serveStatic (file, res, f = path.join(WEB, file)) {
    if (!/^[\w.-]+$/.test(file)) throw httpError(404, 'no such file')
    if (!f || !fs.existsSync(f)) throw httpError(404, 'no such file')
    const type = file.endsWith('.html') ? 'text/html; charset=utf-8' : file.endsWith('.js') ? 'text/javascript' : file.endsWith('.css') ? 'text/css' : 'application/octet-stream'
    res.writeHead(200, { 'content-type': type, 'cache-control': 'no-cache' })
    res.end(fs.readFileSync(f))
  }

  // URL packages: Range support (206 + Content-Range); optional cut part-way (config.urlCut).
  serveFile (id, req, res) {
    const p = this.store.packages.get(id)
    if (!p || !p.data) throw httpError(404, 'no such file')
    const data = p.data; const total = data.length
    let start = 0; let end = total - 1; let status = 200
    const range = req.headers.range
    const headers = { 'content-type': p.contentType, 'accept-ranges': 'bytes', 'content-disposition': `attachment; filename="${p.fileName}"` }
    if (range) {
      const m = /^bytes=(\d*)-(\d*)$/.exec(range.trim())
      if (m && (m[1] !== '' || m[2] !== '')) {
        if (m[1] === '') { start = Math.max(0, total - Number(m[2])) } else { start = Number(m[1]); if (m[2] !== '') end = Math.min(Number(m[2]), total - 1) }
        if (start >= total || start > end) {
          res.writeHead(416, { 'content-range': `bytes */${total}` }); res.end(); return
        }
        status = 206; headers['content-range'] = `bytes ${start}-${end}/${total}`
      }
    }
    headers['content-length'] = String(end - start + 1)
    res.writeHead(status, headers)
    if (req.method === 'HEAD') { res.end(); return }
    const body = data.subarray(start, end + 1)
    const cut = this.emu.config.urlCut
    if (cut && cut.times > 0 && cut.afterBytes < body.length) {
      cut.times--
      this.emu.log(`cutting download of ${p.fileName} after ${cut.afterBytes} bytes`)
      res.write(body.subarray(0, cut.afterBytes), () => setTimeout(() => res.socket && res.socket.destroy(), 50))
      return
    }
    res.end(body)
  }
}

function readBody (req) {
  return new Promise((resolve, reject) => {
    const chunks = []
    req.on('data', c => chunks.push(c))
    req.on('end', () => resolve(Buffer.concat(chunks)))
    req.on('error', reject)
  })
}

function send (res, status, out) {
  if (out && typeof out === 'object' && 'status' in out && 'body' in out && Object.keys(out).length === 2 && !(out instanceof Raw)) {
    res.writeHead(out.status, out.body ? { 'content-type': 'application/json' } : {})
    return res.end(out.body)
  }
  if (out === '') { res.writeHead(status); return res.end() }
  const text = typeof out === 'string' ? out : stringify(out)
  res.writeHead(status, { 'content-type': 'application/json' })
  res.end(text)
}
