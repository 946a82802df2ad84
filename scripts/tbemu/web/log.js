// The message log of one device: every MQTT exchange both ways, newest first, filterable by
// kind, payloads pretty-printed. GET /emu/devices/{name}/log once, then the live feed's `log`
// events (a firmware download is one entry, updated as its chunks go).
import { $, esc, enc, api, time, prettyJson } from './util.js'

const SHOWN = 200 // entries in the page at once (the server keeps 1000 per device)
const ARROW = { up: '↑', down: '↓', both: '↕' }
const DIR_TITLE = { up: 'device → tbemu', down: 'tbemu → device', both: 'both ways' }

export class MessageLogView {
  constructor (root, device, kinds) {
    this.root = root // the device's log card
    this.device = device
    this.kinds = kinds
    this.entries = new Map() // id -> entry, in arrival order
    this.els = new Map() // id -> element shown
    this.paused = false
    this.held = []
    this.off = new Set()
    this.timer = null
    this.toolbar()
  }

  toolbar () {
    const chips = $('.log-kinds', this.root)
    chips.innerHTML = this.kinds.map(k => `<label class="kind-chip"><input type="checkbox" value="${k}" checked> ${k}</label>`).join('')
    chips.onchange = (e) => { if (e.target.checked) this.off.delete(e.target.value); else this.off.add(e.target.value); this.rebuild() }
    const pause = $('.log-pause', this.root)
    pause.onclick = () => {
      this.paused = !this.paused
      pause.textContent = this.paused ? 'resume' : 'pause'
      if (!this.paused) { const h = this.held; this.held = []; this.add(h) }
    }
    $('.log-clear', this.root).onclick = async () => {
      await api('DELETE', `/emu/devices/${enc(this.device.name)}/log`)
      this.entries.clear()
      this.rebuild()
    }
  }

  async load () {
    const r = await api('GET', `/emu/devices/${enc(this.device.name)}/log`)
    this.add(r.json || [])
  }

  destroy () { clearTimeout(this.timer) }

  add (entries) {
    if (this.paused) { this.held.push(...entries); return }
    for (const e of entries) {
      this.entries.delete(e.id) // an updated entry moves to the top
      this.entries.set(e.id, e)
    }
    if (this.entries.size > 1200) for (const id of [...this.entries.keys()].slice(0, this.entries.size - 1000)) this.entries.delete(id)
    if (!this.timer) this.timer = setTimeout(() => { this.timer = null; this.render() }, 150)
  }

  visible () {
    const out = []
    for (const e of this.entries.values()) if (!this.off.has(e.kind)) out.push(e)
    return out.slice(-SHOWN).reverse()
  }

  rebuild () {
    $('.log-list', this.root).innerHTML = ''
    this.els.clear()
    this.render()
  }

  // Newest first; entries already shown are kept (an open selection survives), updated ones
  // are redrawn in place and moved up.
  render () {
    const list = $('.log-list', this.root)
    const want = this.visible()
    const keep = new Set(want.map(e => e.id))
    for (const [id, el] of this.els) if (!keep.has(id)) { el.remove(); this.els.delete(id) }
    let prev = null
    for (const e of want) {
      let el = this.els.get(e.id)
      if (!el || el.dataset.seq !== String(e.seq)) {
        const fresh = entryElement(e)
        if (el) el.replaceWith(fresh)
        el = fresh
        this.els.set(e.id, el)
      }
      const at = prev ? prev.nextSibling : list.firstChild
      if (at !== el) list.insertBefore(el, at)
      prev = el
    }
    const total = [...this.entries.values()].filter(e => !this.off.has(e.kind)).length
    $('.log-count', this.root).textContent = total > want.length ? `newest ${want.length} of ${total}` : `${total} messages`
  }
}

function entryElement (e) {
  const el = document.createElement('div')
  el.className = `msg dir-${e.dir} kind-${e.kind}`
  el.dataset.id = e.id
  el.dataset.seq = e.seq
  el.dataset.kind = e.kind
  el.dataset.dir = e.dir
  const size = e.size == null ? '' : `<span class="size">${e.size} B</span>`
  let body = ''
  if (e.payload === null || e.payload === undefined) body = ''
  else if (e.encoding === 'base64') body = `<pre class="payload binary">(binary, ${e.size} bytes) ${esc(e.payload.slice(0, 64))}${e.payload.length > 64 ? '…' : ''}</pre>`
  else if (e.payload !== '') body = `<pre class="payload">${esc(prettyJson(e.payload))}</pre>`
  el.innerHTML = `<div class="msg-head"><time>${time(e.ts, { ms: true })}</time><span class="dir" title="${DIR_TITLE[e.dir] || ''}">${ARROW[e.dir] || '·'}</span>` +
    `<span class="kind">${esc(e.kind)}</span><code class="topic">${esc(e.topic)}</code>${size}</div>` +
    (e.note ? `<div class="msg-note">${esc(e.note)}</div>` : '') + body
  return el
}
