// typedjson.js — JSON that keeps each number's text, and ThingsBoard's value typing.
//
// JSON.parse turns `42` and `42.0` into the same JS number; ThingsBoard stores the first as
// LONG and the second as DOUBLE (docs/thingsboard.md §4.2). parse() below keeps numbers as JNum
// objects holding their source text, objects as Map (insertion order, last duplicate wins),
// arrays as arrays, strings/booleans/null as JS values.
//
// Note: Gson on the server parses leniently (unquoted names, single quotes); this parser is
// strict RFC 8259, so it rejects a few payloads the real server would accept.

export class JNum {
  constructor (text) { this.text = text }
  toNumber () { return Number(this.text) }
}

// A pre-serialised JSON fragment for stringify().
export class Raw {
  constructor (text) { this.text = text }
}

export function parse (input) {
  const s = typeof input === 'string' ? input : Buffer.from(input).toString('utf8')
  let i = 0
  const ws = () => { while (i < s.length && (s[i] === ' ' || s[i] === '\t' || s[i] === '\n' || s[i] === '\r')) i++ }
  const fail = (m) => { throw new SyntaxError(`${m} at ${i}`) }
  function value () {
    ws()
    const c = s[i]
    if (c === '{') {
      i++; const m = new Map(); ws()
      if (s[i] === '}') { i++; return m }
      for (;;) {
        ws(); if (s[i] !== '"') fail('expected key')
        const k = str(); ws()
        if (s[i] !== ':') fail('expected :')
        i++; m.set(k, value()); ws()
        if (s[i] === ',') { i++; continue }
        if (s[i] === '}') { i++; return m }
        fail('expected , or }')
      }
    }
    if (c === '[') {
      i++; const a = []; ws()
      if (s[i] === ']') { i++; return a }
      for (;;) {
        a.push(value()); ws()
        if (s[i] === ',') { i++; continue }
        if (s[i] === ']') { i++; return a }
        fail('expected , or ]')
      }
    }
    if (c === '"') return str()
    if (s.startsWith('true', i)) { i += 4; return true }
    if (s.startsWith('false', i)) { i += 5; return false }
    if (s.startsWith('null', i)) { i += 4; return null }
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(s.slice(i, i + 400))
    if (!m || m[0] === '' || m[0] === '-') fail('unexpected token')
    i += m[0].length
    return new JNum(m[0])
  }
  function str () {
    i++; let out = ''
    for (;;) {
      if (i >= s.length) fail('unterminated string')
      const c = s[i++]
      if (c === '"') return out
      if (c === '\\') {
        const e = s[i++]
        if (e === 'u') {
          const h = s.slice(i, i + 4)
          if (!/^[0-9a-fA-F]{4}$/.test(h)) fail('bad escape')
          out += String.fromCharCode(parseInt(h, 16)); i += 4
        } else {
          const map = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' }
          if (!(e in map)) fail('bad escape')
          out += map[e]
        }
      } else if (c < ' ') fail('control character in string')
      else out += c
    }
  }
  ws()
  if (i >= s.length) fail('empty document')
  const v = value(); ws()
  if (i < s.length) fail('trailing characters')
  return v
}

// Compact serialisation of a parsed tree (or plain JS values, Map, JNum, Raw).
export function stringify (v) {
  if (v === null || v === undefined) return 'null'
  if (v instanceof JNum) return v.text
  if (v instanceof Raw) return v.text
  if (typeof v === 'boolean') return v ? 'true' : 'false'
  if (typeof v === 'number') return Number.isFinite(v) ? String(v) : 'null'
  if (typeof v === 'bigint') return v.toString()
  if (typeof v === 'string') return JSON.stringify(v)
  if (Array.isArray(v)) return '[' + v.map(stringify).join(',') + ']'
  if (v instanceof Map) return '{' + [...v].map(([k, x]) => JSON.stringify(k) + ':' + stringify(x)).join(',') + '}'
  if (Buffer.isBuffer(v)) return JSON.stringify(v.toString('base64'))
  return '{' + Object.entries(v).filter(([, x]) => x !== undefined).map(([k, x]) => JSON.stringify(k) + ':' + stringify(x)).join(',') + '}'
}

export const isObj = (v) => v instanceof Map

// ---- BigDecimal-like analysis of a number's text -----------------------------------------
function decimal (text) {
  const m = /^([+-])?(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(text)
  if (!m || (m[2] === '' && (m[3] === undefined || m[3] === ''))) return null
  const frac = m[3] || ''
  const unscaled = BigInt((m[1] === '-' ? '-' : '') + ((m[2] + frac) || '0'))
  const scale = frac.length - (m[4] ? parseInt(m[4], 10) : 0)
  return { unscaled, scale }
}
function plain ({ unscaled, scale }) {
  const neg = unscaled < 0n
  let d = (neg ? -unscaled : unscaled).toString()
  if (scale <= 0) d = d + '0'.repeat(-scale)
  else {
    if (d.length <= scale) d = '0'.repeat(scale - d.length + 1) + d
    d = d.slice(0, d.length - scale) + '.' + d.slice(d.length - scale)
  }
  return (neg ? '-' : '') + d
}
const LMIN = -(2n ** 63n); const LMAX = 2n ** 63n - 1n

// JsonConverter.buildNumericKeyValueProto (type cast enabled)
export function numericKv (text) {
  const bd = decimal(text)
  if (!bd) throw new Error('not a number: ' + text)
  let u = bd.unscaled; let sc = bd.scale
  if (u === 0n) sc = 0
  else while (u % 10n === 0n) { u /= 10n; sc-- }
  const simpleDouble = text.includes('.') && !/[eE]/.test(text)
  if (sc <= 0 && !simpleDouble) {
    const v = u * 10n ** BigInt(-sc)
    if (v >= LMIN && v <= LMAX) return { type: 'LONG', value: v.toString() }
    return { type: 'STRING', value: plain(bd) }
  }
  if (bd.scale <= 16) return { type: 'DOUBLE', value: Number(text) }
  return { type: 'STRING', value: plain(bd) }
}

// commons-lang3 NumberUtils.isParsable
export function isParsable (s) {
  if (!s || s.endsWith('.')) return false
  let b = 0
  if (s[0] === '-') { if (s.length === 1) return false; b = 1 }
  let dots = 0
  for (let k = b; k < s.length; k++) {
    if (s[k] === '.') { if (++dots > 1) return false } else if (s[k] < '0' || s[k] > '9') return false
  }
  return true
}

// One JSON value → {type, value} as ThingsBoard stores it, or null when skipped.
// LONG values are kept as decimal strings (int64 may exceed 2^53).
export function toKv (node, opts = {}) {
  if (node === null || node === undefined) return null
  if (typeof node === 'boolean') return { type: 'BOOLEAN', value: node }
  if (node instanceof JNum) return numericKv(node.text)
  if (typeof node === 'string') {
    if (isParsable(node)) { try { return numericKv(node) } catch { return { type: 'STRING', value: node } } }
    if (opts.maxStringLength > 0 && node.length > opts.maxStringLength) throw new Error('string value too long')
    return { type: 'STRING', value: node }
  }
  return { type: 'JSON', value: stringify(node) }
}

// Java Double.toString (what Gson writes for a JsonPrimitive(double)).
export function javaDouble (d) {
  if (Number.isNaN(d)) return 'NaN'
  if (!Number.isFinite(d)) return d > 0 ? 'Infinity' : '-Infinity'
  if (d === 0) return Object.is(d, -0) ? '-0.0' : '0.0'
  const a = Math.abs(d)
  if (a >= 1e-3 && a < 1e7) {
    const s = String(d)
    return s.includes('.') ? s : s + '.0'
  }
  let [mant, exp] = d.toExponential().split('e')
  if (!mant.includes('.')) mant += '.0'
  return mant + 'E' + (exp[0] === '+' ? exp.slice(1) : exp)
}

// A stored kv → JSON text as the server writes it downlink / in strict REST answers.
export function kvJson (kv) {
  switch (kv.type) {
    case 'LONG': return kv.value
    case 'DOUBLE': return javaDouble(kv.value)
    case 'BOOLEAN': return kv.value ? 'true' : 'false'
    case 'STRING': return JSON.stringify(kv.value)
    case 'JSON': return kv.value
  }
  return 'null'
}
export const kvRaw = (kv) => new Raw(kvJson(kv))

// KvEntry.getValueAsString()
export function kvString (kv) {
  switch (kv.type) {
    case 'DOUBLE': return javaDouble(kv.value)
    case 'BOOLEAN': return String(kv.value)
    default: return String(kv.value)
  }
}

// Plain JS value of a kv (for the web page and JS callers). LONGs beyond 2^53 stay strings.
export function kvPlain (kv) {
  if (kv.type === 'LONG') { const n = Number(kv.value); return Number.isSafeInteger(n) ? n : kv.value }
  if (kv.type === 'JSON') { try { return JSON.parse(kv.value) } catch { return kv.value } }
  return kv.value
}

// A stored value for the page and /emu summaries: its type, the plain JS value and the text
// ThingsBoard shows for it (a DOUBLE 3.0 stays "3.0").
export const plainKv = (kv) => ({ type: kv.type, value: kvPlain(kv), text: kvString(kv) })
