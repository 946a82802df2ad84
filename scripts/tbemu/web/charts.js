// Telemetry of one device over time: a uPlot chart for each numeric key (more keys on one chart
// by choice: click a key's chip on a chart), a timeline for boolean and text keys. The last N
// minutes, live. Drag across a chart to zoom in; double-click it (or ⟲) to go back to live.
// History comes from ThingsBoard's own timeseries REST path; new points from the live feed.
/* global uPlot */
import { $, esc, enc, api, time, isNumeric, COLORS, valueColor, saved } from './util.js'

const HISTORY_LIMIT = 20000 // points per key fetched for a window, the most recent first
const KEEP = 50000 // points per key kept in the page
const HEIGHT = 170
// ThingsBoard's own timestamps (target_fw_ts...) are numbers no one wants a chart of
const hiddenByDefault = (key) => /_ts$/.test(key)

export class DeviceCharts {
  // root: the device's telemetry card; device: its summary
  constructor (root, device) {
    this.root = root
    this.device = device
    this.series = new Map() // key -> {type, ts: [], val: []}
    this.charts = [] // {keys, el, plot, zoomed}
    this.windowMs = saved.get('window', 5 * 60000)
    this.layout = saved.get('charts.' + device.id, { charts: null, hidden: [] })
    this.timer = null
    this.slide = setInterval(() => { if (this.charts.some(c => !c.zoomed) || this.timelineKeys().length) this.render() }, 5000)
    this.resize = new ResizeObserver(() => this.fit())
    this.resize.observe($('.charts', root))
    this.tools()
  }

  destroy () {
    clearInterval(this.slide)
    clearTimeout(this.timer)
    this.resize.disconnect()
    for (const c of this.charts) c.plot && c.plot.destroy()
    $('.charts', this.root).innerHTML = ''
    $('.timelines', this.root).innerHTML = ''
  }

  tools () {
    const sel = $('.window-select', this.root)
    sel.value = String(this.windowMs)
    sel.onchange = () => { this.windowMs = Number(sel.value); saved.set('window', this.windowMs); this.load() }
    const add = $('.add-chart', this.root)
    add.onchange = () => { if (add.value) this.addChart([add.value]); add.value = '' }
  }

  async load () {
    const keys = Object.keys(this.device.latest)
    if (keys.length) {
      const now = Date.now()
      const r = await api('GET', `/api/plugins/telemetry/DEVICE/${this.device.id}/values/timeseries?keys=${keys.map(enc).join(',')}` +
        `&startTs=${now - this.windowMs}&endTs=${now + 60000}&limit=${HISTORY_LIMIT}&useStrictDataTypes=true`)
      for (const k of keys) {
        const s = this.seriesOf(k)
        const points = ((r.json || {})[k] || []).reverse() // newest first from the server
        const merged = new Map(points.map(p => [p.ts, value(s.type, p.value)]))
        for (let i = 0; i < s.ts.length; i++) merged.set(s.ts[i], s.val[i]) // live points already here win
        const ts = [...merged.keys()].sort((a, b) => a - b)
        s.ts = ts
        s.val = ts.map(t => merged.get(t))
      }
    }
    this.render()
  }

  seriesOf (key) {
    let s = this.series.get(key)
    const type = (this.device.latest[key] || {}).type || 'STRING'
    if (!s) this.series.set(key, (s = { type, ts: [], val: [] }))
    s.type = type
    return s
  }

  update (device) { this.device = device }

  // points: [{ts, key, type, value, text}] from the live feed
  addPoints (points) {
    for (const p of points) {
      const s = this.seriesOf(p.key)
      s.type = p.type
      const v = value(p.type, p.value)
      let i = s.ts.length
      while (i > 0 && s.ts[i - 1] > p.ts) i--
      if (i > 0 && s.ts[i - 1] === p.ts) s.val[i - 1] = v
      else { s.ts.splice(i, 0, p.ts); s.val.splice(i, 0, v) }
      if (s.ts.length > KEEP + 1000) { s.ts.splice(0, s.ts.length - KEEP); s.val.splice(0, s.val.length - KEEP) }
    }
    this.schedule()
  }

  schedule () { if (!this.timer) this.timer = setTimeout(() => { this.timer = null; this.render() }, 250) }

  numericKeys () { return [...this.series.keys()].filter(k => isNumeric(this.series.get(k).type)).sort() }
  timelineKeys () { return [...this.series.keys()].filter(k => !isNumeric(this.series.get(k).type)).sort() }

  render () {
    this.arrange()
    for (const c of this.charts) this.draw(c)
    this.drawTimelines()
    const add = $('.add-chart', this.root)
    const keys = this.numericKeys()
    const opts = '<option value="">+ chart…</option>' + keys.map(k => `<option>${esc(k)}</option>`).join('')
    if (add.dataset.opts !== opts) { add.innerHTML = opts; add.dataset.opts = opts }
    $('.no-telemetry', this.root).hidden = this.series.size > 0
  }

  // One chart per numeric key unless the user arranged them: the saved layout first, then a
  // chart for each new key that is neither on a chart nor closed.
  arrange () {
    const numeric = this.numericKeys()
    if (!this.charts.length && this.layout.charts) {
      for (const keys of this.layout.charts) { const k = keys.filter(x => numeric.includes(x)); if (k.length) this.makeChart(k) }
    }
    const shown = new Set(this.charts.flatMap(c => c.keys))
    const hidden = new Set(this.layout.hidden)
    for (const k of numeric) if (!shown.has(k) && !hidden.has(k) && !hiddenByDefault(k)) this.makeChart([k])
    for (const c of [...this.charts]) { // a key that stopped being numeric leaves its charts
      const keys = c.keys.filter(k => numeric.includes(k))
      if (keys.length !== c.keys.length) this.setKeys(c, keys)
    }
  }

  addChart (keys) {
    this.layout.hidden = this.layout.hidden.filter(k => !keys.includes(k))
    this.makeChart(keys)
    this.save()
    this.render()
  }

  makeChart (keys) {
    const el = document.createElement('div')
    el.className = 'chart'
    el.innerHTML = '<div class="chart-head"><span class="chips"></span><button class="reset" title="back to the live window (or double-click the chart)">⟲</button><button class="close" title="close this chart">×</button></div><div class="plot"></div>'
    $('.charts', this.root).appendChild(el)
    const c = { keys, el, plot: null, zoomed: false }
    this.charts.push(c)
    $('.close', el).onclick = () => { this.setKeys(c, []); this.render() }
    $('.reset', el).onclick = () => { zoom(c, false); this.draw(c) }
    $('.chips', el).onclick = (e) => {
      const k = e.target.dataset.key
      if (!k) return
      this.setKeys(c, c.keys.includes(k) ? c.keys.filter(x => x !== k) : [...c.keys, k].sort())
      this.render()
    }
    this.newPlot(c)
    return c
  }

  setKeys (c, keys) {
    const removed = c.keys.filter(k => !keys.includes(k))
    c.keys = keys
    if (!keys.length) {
      c.plot && c.plot.destroy()
      c.el.remove()
      this.charts = this.charts.filter(x => x !== c)
    } else this.newPlot(c)
    const shown = new Set(this.charts.flatMap(x => x.keys))
    for (const k of removed) if (!shown.has(k) && !this.layout.hidden.includes(k)) this.layout.hidden.push(k)
    this.layout.hidden = this.layout.hidden.filter(k => !shown.has(k))
    this.save()
  }

  save () {
    this.layout.charts = this.charts.map(c => c.keys)
    saved.set('charts.' + this.device.id, this.layout)
  }

  newPlot (c) {
    if (c.plot) c.plot.destroy()
    c.el.dataset.keys = c.keys.join(',')
    const plotEl = $('.plot', c.el)
    if (typeof uPlot === 'undefined') { plotEl.textContent = 'No charts: tbemu cannot find the uplot package (npm ci --prefix scripts).'; return this.chips(c) }
    const opts = {
      width: Math.max(200, plotEl.clientWidth || 300),
      height: HEIGHT,
      ms: 1, // timestamps in ms, as ThingsBoard keeps them
      scales: { x: { time: true } },
      series: [{ value: (u, v) => v == null ? '-' : time(v, { ms: true }) },
        ...c.keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { size: 4 } }))],
      axes: [{ space: tickSpace, grid: { stroke: '#eee' }, ticks: { stroke: '#ddd' }, values: (u, splits, ax, space, incr) => splits.map(v => tick(v, incr)) }, { grid: { stroke: '#eee' }, ticks: { stroke: '#ddd' }, size: 56 }],
      cursor: { drag: { x: true, y: false } },
      hooks: { setSelect: [u => { if (u.select.width > 0) zoom(c, true) }] }
    }
    c.plot = new uPlot(opts, this.data(c), plotEl)
    c.plot.over.addEventListener('dblclick', () => { zoom(c, false); this.draw(c) })
    zoom(c, false)
    this.chips(c)
  }

  chips (c) {
    $('.chips', c.el).innerHTML = this.numericKeys().map(k => {
      const i = c.keys.indexOf(k)
      const style = i >= 0 ? ` style="border-color:${COLORS[i % COLORS.length]};color:${COLORS[i % COLORS.length]}"` : ''
      return `<button class="chip${i >= 0 ? ' on' : ''}" data-key="${esc(k)}"${style} title="${i >= 0 ? 'take off' : 'add to'} this chart">${esc(k)}</button>`
    }).join('')
  }

  // [xs, ys...] for the window; keys without points in it give nulls
  data (c) {
    const [lo, hi] = this.range()
    const tables = c.keys.map(k => {
      const s = this.series.get(k) || { ts: [], val: [] }
      const a = lowerBound(s.ts, lo)
      const b = lowerBound(s.ts, hi + 1)
      return [s.ts.slice(a, b), s.val.slice(a, b)]
    })
    if (tables.length === 1) return tables[0]
    return uPlot.join(tables)
  }

  range () { const now = Date.now(); return [now - this.windowMs, now] }

  draw (c) {
    if (!c.plot) return
    this.chips(c)
    const data = this.data(c)
    c.el.dataset.points = data[0].length
    if (c.zoomed) { c.plot.setData(data, false); return }
    c.plot.setData(data, true)
    const [lo, hi] = this.range()
    c.plot.setScale('x', { min: lo, max: hi })
  }

  fit () {
    for (const c of this.charts) {
      const w = $('.plot', c.el).clientWidth
      if (c.plot && w && Math.abs(w - c.plot.width) > 2) c.plot.setSize({ width: w, height: HEIGHT })
    }
  }

  // A band per key, a segment per run of one value; the value before the window fills its left.
  drawTimelines () {
    const [lo, hi] = this.range()
    const span = hi - lo
    const rows = this.timelineKeys().map(k => {
      const s = this.series.get(k)
      let a = lowerBound(s.ts, lo)
      if (a > 0) a--
      const segs = []
      for (let i = a; i < s.ts.length && s.ts[i] <= hi; i++) {
        const text = s.val[i]
        if (segs.length && segs[segs.length - 1].text === text) continue
        segs.push({ from: Math.max(s.ts[i], lo), text, at: s.ts[i] })
      }
      const html = segs.map((g, j) => {
        const to = j + 1 < segs.length ? segs[j + 1].from : hi
        const left = 100 * (g.from - lo) / span
        const width = Math.max(0.3, 100 * (to - g.from) / span)
        return `<span class="seg" style="left:${left.toFixed(3)}%;width:${width.toFixed(3)}%;background:${valueColor(g.text)}" title="${esc(g.text)} since ${time(g.at)}">${esc(g.text)}</span>`
      }).join('')
      const last = s.val.length ? s.val[s.val.length - 1] : ''
      return `<div class="timeline" data-key="${esc(k)}"><div class="tl-key" title="${esc(k)}">${esc(k)}</div><div class="tl-track" data-last="${esc(last)}">${html}</div></div>`
    })
    const el = $('.timelines', this.root)
    el.innerHTML = rows.length ? rows.join('') + `<div class="tl-axis"><span>${time(lo)}</span><span>${time(hi)}</span></div>` : ''
  }
}

function zoom (c, on) { c.zoomed = on; c.el.dataset.zoomed = on }

// chart values are numbers (a LONG beyond 2^53 comes as a string); timeline values are text
function value (type, v) {
  if (isNumeric(type)) return Number(v)
  return typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)
}

// Room between time ticks: seconds labels (HH:MM:SS) only where 30 s ticks get 72 px,
// else minute ticks or coarser, at least 50 px apart.
function tickSpace (u, axis, min, max, px) {
  const pxPerMin = px / ((max - min) / 60000)
  return pxPerMin >= 144 ? 72 : Math.max(50, Math.min(pxPerMin, 60))
}

// 24-hour ticks: seconds when the ticks are less than a minute apart, the date at midnight
function tick (ts, incr) {
  const d = new Date(ts)
  const p = (n) => String(n).padStart(2, '0')
  if (incr >= 86400000 || (d.getHours() === 0 && d.getMinutes() === 0 && d.getSeconds() === 0)) return `${d.getMonth() + 1}/${d.getDate()}`
  return incr < 60000 ? `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}` : `${p(d.getHours())}:${p(d.getMinutes())}`
}

function lowerBound (arr, x) {
  let a = 0; let b = arr.length
  while (a < b) { const m = (a + b) >> 1; if (arr[m] < x) a = m + 1; else b = m }
  return a
}
