// Small helpers shared by the page's modules.
export const $ = (sel, el = document) => el.querySelector(sel)
export const $$ = (sel, el = document) => [...el.querySelectorAll(sel)]
export const esc = (s) => String(s ?? '').replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]))
export const enc = encodeURIComponent

const pad = (n, w = 2) => String(n).padStart(w, '0')
// 24-hour clock; the date only when it is not today
export function time (ts, { ms = false } = {}) {
  const d = new Date(ts)
  const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${ms ? '.' + pad(d.getMilliseconds(), 3) : ''}`
  return d.toDateString() === new Date().toDateString() ? t : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${t}`
}

// fetch → {status, text, json}; JSON bodies unless raw
export async function api (method, path, body, { raw = false } = {}) {
  const r = await fetch(path, {
    method,
    headers: raw || body === undefined ? {} : { 'content-type': 'application/json' },
    body: raw ? body : (body === undefined ? undefined : (typeof body === 'string' ? body : JSON.stringify(body)))
  })
  const text = await r.text()
  let json; try { json = text ? JSON.parse(text) : undefined } catch {}
  return { status: r.status, text, json }
}

// JSON text re-indented without parsing its values, so 2.0 stays 2.0 and big integers keep
// every digit. Text that is not JSON comes back as it is.
export function prettyJson (text) {
  if (typeof text !== 'string' || !/^\s*[[{]/.test(text)) return text
  try { JSON.parse(text) } catch { return text }
  let out = ''
  let depth = 0
  const nl = () => '\n' + '  '.repeat(depth)
  for (let i = 0; i < text.length; i++) {
    const c = text[i]
    if (c === '"') { // a whole string, escapes included
      let j = i + 1
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1
      out += text.slice(i, j + 1)
      i = j
    } else if (c === '{' || c === '[') {
      let k = i + 1
      while (/\s/.test(text[k])) k++
      if (text[k] === (c === '{' ? '}' : ']')) { out += c + text[k]; i = k } else { depth++; out += c + nl() }
    } else if (c === '}' || c === ']') { depth--; out += nl() + c } else if (c === ',') out += ',' + nl()
    else if (c === ':') out += ': '
    else if (!/\s/.test(c)) out += c
  }
  return out
}

// A value as ThingsBoard shows it: the stored text (3.0 stays 3.0), JSON compact.
export function shown (v) {
  if (v.text !== undefined) return v.text
  return typeof v.value === 'object' && v.value !== null ? JSON.stringify(v.value) : String(v.value)
}

export const isNumeric = (type) => type === 'LONG' || type === 'DOUBLE'

// Colours for chart series and timeline values.
export const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf']
export function valueColor (text) {
  if (text === 'true') return '#a6e3a1'
  if (text === 'false') return '#d9d9d9'
  let h = 0
  for (const c of String(text)) h = (h * 31 + c.charCodeAt(0)) >>> 0
  return `hsl(${h % 360} 60% 82%)`
}

// Per-browser settings (chart layout, time window).
export const saved = {
  get (key, fallback) { try { const v = localStorage.getItem('tbemu.' + key); return v === null ? fallback : JSON.parse(v) } catch { return fallback } },
  set (key, v) { try { localStorage.setItem('tbemu.' + key, JSON.stringify(v)) } catch {} }
}
