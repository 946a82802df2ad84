// firmware.js — OTA packages (docs/thingsboard.md §7): checksums in ThingsBoard's text encoding,
// assignment (fw_*/sw_* shared attributes), the v2/fw|sw chunk protocol, URL packages.
import crypto from 'node:crypto'
import { httpError } from './store.js'

export const ALGORITHMS = ['MD5', 'SHA256', 'SHA384', 'SHA512', 'CRC32', 'MURMUR3_32', 'MURMUR3_128']
const PREFIX = { FIRMWARE: 'fw', SOFTWARE: 'sw' }
// OtaPackageKey order; all of them are deleted when an assignment is removed.
// fields that make two uploads the same package (with the bytes)
const SAME = ['type', 'title', 'version', 'tag', 'fileName', 'contentType', 'url', 'selfUrl', 'checksumAlgorithm', 'checksum']
const ALL_KEYS = ['title', 'version', 'ts', 'state', 'size', 'checksum', 'checksum_algorithm', 'url', 'tag']

// ---- checksums (Guava HashCode.toString) ----------------------------------------------------
let crcTable
function crc32 (buf) {
  if (!crcTable) {
    crcTable = new Uint32Array(256)
    for (let n = 0; n < 256; n++) { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1; crcTable[n] = c >>> 0 }
  }
  let c = 0xFFFFFFFF
  for (let i = 0; i < buf.length; i++) c = crcTable[(c ^ buf[i]) & 0xFF] ^ (c >>> 8)
  return (c ^ 0xFFFFFFFF) >>> 0
}
function murmur3_32 (buf, seed = 0) {
  const c1 = 0xcc9e2d51; const c2 = 0x1b873593
  let h = seed >>> 0
  const n = buf.length & ~3
  for (let i = 0; i < n; i += 4) {
    let k = buf.readUInt32LE(i)
    k = Math.imul(k, c1); k = (k << 15) | (k >>> 17); k = Math.imul(k, c2)
    h ^= k; h = (h << 13) | (h >>> 19); h = (Math.imul(h, 5) + 0xe6546b64) | 0
  }
  let k = 0
  switch (buf.length & 3) {
    case 3: k ^= buf[n + 2] << 16 // falls through
    case 2: k ^= buf[n + 1] << 8 // falls through
    case 1: k ^= buf[n]; k = Math.imul(k, c1); k = (k << 15) | (k >>> 17); k = Math.imul(k, c2); h ^= k
  }
  h ^= buf.length
  h ^= h >>> 16; h = Math.imul(h, 0x85ebca6b); h ^= h >>> 13; h = Math.imul(h, 0xc2b2ae35); h ^= h >>> 16
  return h >>> 0
}
const M64 = (1n << 64n) - 1n
const rotl64 = (x, r) => ((x << BigInt(r)) | (x >> BigInt(64 - r))) & M64
function fmix64 (k) {
  k ^= k >> 33n; k = (k * 0xff51afd7ed558ccdn) & M64
  k ^= k >> 33n; k = (k * 0xc4ceb9fe1a85ec53n) & M64
  k ^= k >> 33n; return k
}
function murmur3_128 (buf, seed = 0n) {
  const c1 = 0x87c37b91114253d5n; const c2 = 0x4cf5ad432745937fn
  let h1 = BigInt(seed); let h2 = BigInt(seed)
  const n = buf.length - (buf.length % 16)
  for (let i = 0; i < n; i += 16) {
    let k1 = buf.readBigUInt64LE(i); let k2 = buf.readBigUInt64LE(i + 8)
    k1 = (k1 * c1) & M64; k1 = rotl64(k1, 31); k1 = (k1 * c2) & M64; h1 ^= k1
    h1 = rotl64(h1, 27); h1 = (h1 + h2) & M64; h1 = (h1 * 5n + 0x52dce729n) & M64
    k2 = (k2 * c2) & M64; k2 = rotl64(k2, 33); k2 = (k2 * c1) & M64; h2 ^= k2
    h2 = rotl64(h2, 31); h2 = (h2 + h1) & M64; h2 = (h2 * 5n + 0x38495ab5n) & M64
  }
  const rem = buf.length - n
  if (rem > 0) {
    let k1 = 0n; let k2 = 0n
    for (let j = rem - 1; j >= 8; j--) k2 = (k2 << 8n) | BigInt(buf[n + j])
    for (let j = Math.min(rem, 8) - 1; j >= 0; j--) k1 = (k1 << 8n) | BigInt(buf[n + j])
    if (rem > 8) { k2 = (k2 * c2) & M64; k2 = rotl64(k2, 33); k2 = (k2 * c1) & M64; h2 ^= k2 }
    k1 = (k1 * c1) & M64; k1 = rotl64(k1, 31); k1 = (k1 * c2) & M64; h1 ^= k1
  }
  const len = BigInt(buf.length)
  h1 ^= len; h2 ^= len
  h1 = (h1 + h2) & M64; h2 = (h2 + h1) & M64
  h1 = fmix64(h1); h2 = fmix64(h2)
  h1 = (h1 + h2) & M64; h2 = (h2 + h1) & M64
  const out = Buffer.alloc(16); out.writeBigUInt64LE(h1, 0); out.writeBigUInt64LE(h2, 8)
  return out
}
const le32 = (v) => { const b = Buffer.alloc(4); b.writeUInt32LE(v >>> 0); return b.toString('hex') }

export function checksum (algorithm, data) {
  switch (String(algorithm).toUpperCase()) {
    case 'MD5': return crypto.createHash('md5').update(data).digest('hex')
    case 'SHA256': return crypto.createHash('sha256').update(data).digest('hex')
    case 'SHA384': return crypto.createHash('sha384').update(data).digest('hex')
    case 'SHA512': return crypto.createHash('sha512').update(data).digest('hex')
    case 'CRC32': return le32(crc32(data))
    case 'MURMUR3_32': return le32(murmur3_32(data))
    case 'MURMUR3_128': return murmur3_128(data).toString('hex')
  }
  throw httpError(400, 'unknown checksum algorithm ' + algorithm)
}

export function normType (t) {
  const u = String(t || 'FIRMWARE').toUpperCase()
  if (u === 'FW' || u === 'FIRMWARE') return 'FIRMWARE'
  if (u === 'SW' || u === 'SOFTWARE') return 'SOFTWARE'
  throw httpError(400, 'type must be FIRMWARE|SOFTWARE (fw|sw)')
}

export class Firmware {
  constructor (emu) { this.emu = emu; this.store = emu.store }

  // Create a package. data: Buffer or null; opts.url: external URL, or 'self' to serve data
  // from tbemu's own HTTP as a URL package.
  upload ({ title, version, type, tag, checksumAlgorithm, checksum: given, url, fileName, contentType, data }) {
    if (!title || !version) throw httpError(400, 'title and version are required')
    type = normType(type)
    const alg = checksumAlgorithm ? String(checksumAlgorithm).toUpperCase() : (data && data.length ? 'SHA256' : null)
    if (alg && !ALGORITHMS.includes(alg)) throw httpError(400, 'checksumAlgorithm must be one of ' + ALGORITHMS.join(','))
    const pkg = {
      type, title, version, tag: tag === undefined ? `${title} ${version}` : (tag || null),
      fileName: fileName || `${title}-${version}.bin`, contentType: contentType || 'application/octet-stream',
      data: data && data.length ? data : null, url: null, selfUrl: false, size: null, checksumAlgorithm: null, checksum: null
    }
    if (pkg.data) {
      pkg.size = pkg.data.length
      pkg.checksumAlgorithm = alg
      pkg.checksum = given || checksum(alg, pkg.data) // a user-supplied checksum is stored verbatim
    } else if (given && alg) { pkg.checksumAlgorithm = alg; pkg.checksum = given }
    if (url) {
      if (url === 'self') { if (!pkg.data) throw httpError(400, 'url=self needs a body'); pkg.selfUrl = true } else pkg.url = url
    } else if (!pkg.data) throw httpError(400, 'a binary body or a url is required')
    // the same upload again (tbemu restarted on its --data-dir with the same --package, the
    // demo run twice) is the package already there, not a copy
    const same = [...this.store.packages.values()].find(q => SAME.every(k => q[k] === pkg[k]) && (q.data && pkg.data ? q.data.equals(pkg.data) : q.data === pkg.data))
    if (same) return same
    this.store.addPackage(pkg)
    return pkg
  }

  // As the server: a package that a device has assigned cannot be deleted.
  remove (pkg) {
    const users = [...this.store.devices.values()].filter(d => d.ota[pkg.type] === pkg.id)
    if (users.length) throw httpError(400, `package ${pkg.title} ${pkg.version} is assigned to ${users.map(d => d.name).join(', ')}: unassign it first`)
    this.store.deletePackage(pkg)
  }

  hasUrl (pkg) { return !!(pkg.url || pkg.selfUrl) }
  urlOf (pkg) { return pkg.selfUrl ? `${this.emu.httpBase()}/emu/files/${pkg.id}/${encodeURIComponent(pkg.fileName)}` : pkg.url }

  publicPackage (pkg) {
    const { data, ...rest } = pkg
    return { ...rest, url: this.hasUrl(pkg) ? this.urlOf(pkg) : null, hasData: !!data }
  }

  // OTA updateAttributes: one push with the set keys, then a separate deleted push.
  assign (dev, pkg) {
    const p = PREFIX[pkg.type]
    const now = Date.now()
    dev.ota[pkg.type] = pkg.id
    dev.otaProgress[pkg.type] = null
    const set = [[`${p}_title`, str(pkg.title)], [`${p}_version`, str(pkg.version)]]
    const del = []
    if (pkg.tag) set.push([`${p}_tag`, str(pkg.tag)]); else del.push(`${p}_tag`)
    const known = pkg.size != null && pkg.checksumAlgorithm && pkg.checksum
    if (!this.hasUrl(pkg)) {
      set.push([`${p}_size`, long(pkg.size)], [`${p}_checksum_algorithm`, str(pkg.checksumAlgorithm)], [`${p}_checksum`, str(pkg.checksum)])
      del.push(`${p}_url`)
    } else {
      set.push([`${p}_url`, str(this.urlOf(pkg))])
      if (known) set.push([`${p}_size`, long(pkg.size)], [`${p}_checksum_algorithm`, str(pkg.checksumAlgorithm)], [`${p}_checksum`, str(pkg.checksum)])
      else del.push(`${p}_size`, `${p}_checksum_algorithm`, `${p}_checksum`)
    }
    this.emu.setSharedAttributes(dev, set, now)
    if (del.length) this.emu.deleteSharedAttributes(dev, del)
    // server-written telemetry (OtaPackageUtil / state service)
    const tel = [[`target_${p}_title`, str(pkg.title)], [`target_${p}_version`, str(pkg.version)], [`target_${p}_ts`, long(now)]]
    if (pkg.tag) tel.push([`target_${p}_tag`, str(pkg.tag)])
    tel.push([`${p}_state`, str('QUEUED')])
    this.store.saveTelemetry(dev, now, tel)
    this.store.saveTelemetry(dev, now + 1, [[`${p}_state`, str('INITIATED')]])
    this.store.event(dev, 'ota-assigned', { otaType: pkg.type, packageId: pkg.id })
  }

  unassign (dev, type) {
    type = normType(type)
    const p = PREFIX[type]
    dev.ota[type] = null
    dev.otaProgress[type] = null
    this.emu.deleteSharedAttributes(dev, ALL_KEYS.map(k => `${p}_${k}`))
    this.store.event(dev, 'ota-unassigned', { otaType: type })
  }

  // v2/{fw|sw}/request/{reqId}/chunk/{idx}. Returns the effect to run after the PUBACK.
  // Throws (→ connection closed, no PUBACK) on a non-numeric chunk size.
  chunkRequest (client, dev, kind, reqId, idx, payload) {
    const tb = client.tb
    const text = payload.toString('utf8')
    let size = 0
    if (text !== '') {
      if (!/^[+-]?\d+$/.test(text) || Math.abs(Number(text)) > 2147483647) throw new Error('NumberFormatException: ' + text)
      size = Number(text)
    }
    const key = kind + '/' + reqId
    const sess = tb.ota.get(key) || {}
    if (size > 0) sess.size = size; else size = sess.size || 0
    tb.ota.set(key, sess)
    const type = kind === 'fw' ? 'FIRMWARE' : 'SOFTWARE'
    const maxPayload = this.emu.config.maxPayloadSize
    return () => {
      if (size > maxPayload) return this.emu.mqtt.otaError(client, dev, 'PAYLOAD_TOO_LARGE')
      if (!sess.pkgId) { // bound on first request
        const pkg = dev.ota[type] && this.store.packages.get(dev.ota[type])
        if (!pkg) return this.emu.mqtt.otaError(client, dev, 'NOT_FOUND')
        sess.pkgId = pkg.id
        sess.gen = dev.otaCacheGen // the bytes are (re)loaded into the cache for a new reqId
        dev.otaCacheLoaded = dev.otaCacheGen
      }
      const pkg = this.store.packages.get(sess.pkgId)
      if (!pkg) return this.emu.mqtt.otaError(client, dev, 'NOT_FOUND')
      if (this.hasUrl(pkg)) return this.emu.mqtt.otaError(client, dev, 'FAILURE')
      let chunk
      if (dev.otaCacheLoaded !== dev.otaCacheGen) chunk = Buffer.alloc(0) // cache entry expired
      else if (size === 0) chunk = pkg.data
      else {
        const off = idx * size
        chunk = off >= pkg.data.length ? Buffer.alloc(0) : pkg.data.subarray(off, Math.min(off + size, pkg.data.length))
      }
      this.emu.mqtt.sendDown(client, `v2/${kind}/response/${reqId}/chunk/${idx}`, chunk, { binary: true })
      if (chunk.length) this.noteServed(dev, type, pkg, size === 0 ? chunk.length : idx * size + chunk.length)
    }
  }

  // How far the MQTT download of the assigned package got: the furthest byte served, for the
  // page's progress line (a retried or resumed chunk counts once).
  noteServed (dev, type, pkg, end) {
    let p = dev.otaProgress[type]
    if (!p || p.packageId !== pkg.id) p = dev.otaProgress[type] = { packageId: pkg.id, size: pkg.size, bytes: 0, chunks: 0 }
    p.chunks++
    p.bytes = Math.max(p.bytes, end)
    this.store.changed('otaProgress', dev, { type })
  }

  // Fault: the cached bytes "expire" for this device; old reqIds get empty chunks,
  // a new reqId reloads them.
  expireCache (dev) { dev.otaCacheGen = (dev.otaCacheGen || 0) + 1 }
}

const str = (v) => ({ type: 'STRING', value: String(v) })
const long = (v) => ({ type: 'LONG', value: String(v) })
