// emu-api.js — the emulator-only HTTP API under /emu: devices, logs, faults, client-RPC rules,
// packages and their assignment. Every control of the web page is one of these paths (or a
// ThingsBoard REST path, rest.js); scripts/tbemu/README.md lists them.
import { httpError } from './store.js'
import { stringify, isObj } from './typedjson.js'
import { parseRule } from './clientrpc.js'
import { KINDS } from './msglog.js'

export function defineEmuApi (rest) {
  const emu = rest.emu; const store = rest.store
  const on = (method, pattern, fn) => rest.on(method, pattern, fn)

  on('GET', '/emu/health', () => ({ ok: true, mqtt: emu.mqttPort, http: emu.httpPort }))

  // ---- devices ------------------------------------------------------------------------------
  on('GET', '/emu/devices', () => [...store.devices.values()].map(d => rest.plainSummary(d)))
  on('POST', '/emu/devices', async ({ json }) => {
    const d = store.createDevice(plainObj(await json()))
    return { status: 201, body: stringify(rest.plainSummary(d)) }
  })
  on('GET', '/emu/devices/:ref', ({ params }) => ({ ...rest.plainSummary(emu.device(params.ref)), events: emu.device(params.ref).events }))
  on('DELETE', '/emu/devices/:ref', ({ params }) => { const d = emu.device(params.ref); emu.mqtt.disconnect(d); store.deleteDevice(d); return { deleted: d.id } })
  on('POST', '/emu/devices/:ref/disconnect', ({ params }) => { const d = emu.device(params.ref); const was = emu.mqtt.connected(d); emu.mqtt.disconnect(d); return { disconnected: was } })

  // ---- what the device did ------------------------------------------------------------------
  on('GET', '/emu/devices/:ref/messages', ({ params, q }) => {
    const d = emu.device(params.ref)
    const since = Number(q.since || 0)
    return d.log.filter(e => e.seq > since && (!q.dir || e.dir === q.dir) && (!q.topic || e.topic.startsWith(q.topic)))
  })
  on('DELETE', '/emu/devices/:ref/messages', ({ params }) => { emu.device(params.ref).log.length = 0; return { ok: true } })
  on('GET', '/emu/devices/:ref/log', ({ params, q }) => {
    const kinds = q.kind ? q.kind.split(',').filter(Boolean) : null
    const bad = (kinds || []).filter(k => !KINDS.includes(k))
    if (bad.length) throw httpError(400, `unknown kind ${bad.join(',')}; kinds: ${KINDS.join(', ')}`)
    return emu.messageLog.list(emu.device(params.ref), { since: Number(q.since || 0), kinds, limit: q.limit ? Number(q.limit) : undefined })
  })
  on('DELETE', '/emu/devices/:ref/log', ({ params }) => { emu.messageLog.clear(emu.device(params.ref)); return { ok: true } })
  on('GET', '/emu/devices/:ref/events', ({ params, q }) => emu.device(params.ref).events.filter(e => e.seq > Number(q.since || 0)))

  // ---- faults and protocol corners ---------------------------------------------------------
  on('POST', '/emu/devices/:ref/ota-cache-expire', ({ params }) => { const d = emu.device(params.ref); emu.firmware.expireCache(d); store.event(d, 'ota-cache-expired'); return { ok: true } })
  on('POST', '/emu/devices/:ref/packet-id', async ({ params, json }) => {
    const d = emu.device(params.ref); const b = plainObj(await json())
    if (!d.session) throw httpError(409, 'device not connected')
    d.session.tb.nextMsgId = (Number(b.next) - 1) & 0xffff
    return { ok: true }
  })
  on('POST', '/emu/pause', () => { emu.mqtt.pause(); return { paused: true } })
  on('POST', '/emu/resume', () => { emu.mqtt.resume(); return { paused: false } })
  on('POST', '/emu/faults', async ({ json }) => {
    const b = plainObj(await json())
    if ('urlCut' in b) emu.config.urlCut = b.urlCut // {afterBytes, times}
    return { urlCut: emu.config.urlCut }
  })

  // ---- client-side RPC rules ----------------------------------------------------------------
  on('GET', '/emu/client-rpc', () => emu.config.clientRpc)
  on('POST', '/emu/client-rpc', async ({ json }) => { const r = parseRule(await json()); emu.clientRpc.setRule(null, r.method, r.rule); return { ok: true } })
  on('DELETE', '/emu/client-rpc/:method', ({ params }) => { emu.clientRpc.deleteRule(null, params.method); return { ok: true } })
  on('GET', '/emu/devices/:ref/client-rpc', ({ params }) => {
    const d = emu.device(params.ref)
    return { rules: emu.clientRpc.rules(d), requests: emu.clientRpc.requests(d) }
  })
  on('POST', '/emu/devices/:ref/client-rpc', async ({ params, json }) => {
    const d = emu.device(params.ref); const r = parseRule(await json())
    emu.clientRpc.setRule(d, r.method, r.rule)
    return { ok: true }
  })
  on('DELETE', '/emu/devices/:ref/client-rpc/:method', ({ params }) => { emu.clientRpc.deleteRule(emu.device(params.ref), params.method); return { ok: true } })

  // ---- server settings ----------------------------------------------------------------------
  on('POST', '/emu/session-limits', async ({ json }) => {
    emu.config.sessionLimits = JSON.parse(stringify(await json()))
    store.changed('config', null)
    return emu.config.sessionLimits
  })
  on('GET', '/emu/config', () => emu.config)
  on('POST', '/emu/config', async ({ json }) => {
    Object.assign(emu.config, JSON.parse(stringify(await json())))
    store.changed('config', null)
    return emu.config
  })
  on('POST', '/emu/provision-profiles', async ({ json }) => {
    const b = plainObj(await json())
    if (!b.provisionDeviceKey || !b.provisionDeviceSecret) throw httpError(400, 'provisionDeviceKey and provisionDeviceSecret are required')
    store.provisionProfiles.push({ provisionDeviceKey: b.provisionDeviceKey, provisionDeviceSecret: b.provisionDeviceSecret, strategy: b.strategy || 'ALLOW_CREATE_NEW_DEVICES' })
    store.changed('profiles', null)
    return store.provisionProfiles
  })

  // ---- packages -----------------------------------------------------------------------------
  on('GET', '/emu/packages', () => rest.packages())
  on('POST', '/emu/packages', async ({ q, body, req }) => {
    const data = await body()
    const p = emu.firmware.upload({ ...q, contentType: q.contentType || req.headers['content-type'], data })
    return emu.firmware.publicPackage(p)
  })
  const pkgOf = (id) => { const p = store.packages.get(id); if (!p) throw httpError(404, 'package not found'); return p }
  on('GET', '/emu/packages/:id', ({ params }) => emu.firmware.publicPackage(pkgOf(params.id)))
  on('DELETE', '/emu/packages/:id', ({ params }) => { emu.firmware.remove(pkgOf(params.id)); return { deleted: params.id } })
  on('POST', '/emu/devices/:ref/assign', async ({ params, json }) => {
    const d = emu.device(params.ref); const b = plainObj(await json())
    emu.firmware.assign(d, pkgOf(b.packageId))
    return rest.plainSummary(d)
  })
  on('POST', '/emu/devices/:ref/unassign', async ({ params, json }) => {
    const d = emu.device(params.ref); const b = plainObj(await json())
    emu.firmware.unassign(d, b.type || 'FIRMWARE')
    return rest.plainSummary(d)
  })
  on('GET', '/emu/files/:id/:name', ({ params, req, res }) => rest.serveFile(params.id, req, res))
  on('GET', '/emu/events', ({ req, res }) => rest.live.attach(req, res))
}

export function plainObj (m) {
  if (!isObj(m)) throw httpError(400, 'JSON object expected')
  return JSON.parse(stringify(m))
}
