// tbemu's web page: devices (one shown at a time, chosen in the tabs or by #name in the URL),
// packages, all live over server-sent events (/emu/events); controls call the REST API.
import { $, $$, esc, enc, api } from './util.js'
import { createDeviceSection, updateDeviceSection, fillPackages } from './device.js'
import { DeviceCharts } from './charts.js'
import { MessageLogView } from './log.js'

const state = { devices: new Map(), packages: [], kinds: [], selected: null, charts: null, log: null }

function section (id) { return document.getElementById('dev-' + id) }

function showDevice (d) {
  let el = section(d.id)
  if (!el) {
    el = createDeviceSection(d)
    el.hidden = true
    $('#devices').appendChild(el)
  }
  updateDeviceSection(el, d, state.packages)
  if (state.selected === d.id && state.charts) state.charts.update(d)
}

function renderTabs () {
  const tabs = [...state.devices.values()].sort((a, b) => a.name < b.name ? -1 : 1).map(d =>
    `<a class="tab${d.id === state.selected ? ' selected' : ''}" href="#${esc(enc(d.name))}" data-id="${d.id}"><span class="${d.connected ? 'on' : 'off'}">${d.connected ? '●' : '○'}</span> ${esc(d.name)}</a>`)
  const html = tabs.join('') || '<span class="muted">no devices yet</span>'
  const el = $('#tabs')
  if (el.innerHTML !== html) el.innerHTML = html
}

// The device named in the URL's #fragment, else the first one.
function chooseDevice () {
  const want = decodeURIComponent(location.hash.slice(1))
  const all = [...state.devices.values()].sort((a, b) => a.name < b.name ? -1 : 1)
  const d = all.find(x => x.name === want) || all[0]
  select(d ? d.id : null)
}

function select (id) {
  if (state.selected === id) return renderTabs()
  if (state.charts) { state.charts.destroy(); state.charts = null }
  if (state.log) { state.log.destroy(); state.log = null }
  state.selected = id
  for (const el of $$('section.device')) el.hidden = el.dataset.id !== id
  renderTabs()
  const d = state.devices.get(id)
  if (!d) return
  const el = section(id)
  state.charts = new DeviceCharts($('.telemetry-card', el), d)
  state.charts.load()
  state.log = new MessageLogView($('.log-card', el), d, state.kinds)
  state.log.load()
}

function renderPackages () {
  $('#package-table tbody').innerHTML = state.packages.map(p =>
    `<tr data-id="${p.id}"><td>${p.type}</td><td>${esc(p.title)}</td><td>${esc(p.version)}</td><td>${p.size ?? ''}</td>` +
    `<td class="checksum">${esc((p.checksumAlgorithm || '') + ' ' + (p.checksum || ''))}${p.url ? '<br>' + esc(p.url) : ''}</td><td class="id">${p.id}</td>` +
    `<td><button class="del" title="DELETE /emu/packages/${p.id}">×</button></td></tr>`).join('') ||
    '<tr class="empty"><td colspan="7" class="muted">No packages: upload one above.</td></tr>'
  for (const el of $$('section.device')) fillPackages(el, state.packages)
}

$('#package-table').addEventListener('click', async (e) => {
  const b = e.target.closest('button.del')
  if (!b) return
  const r = await api('DELETE', '/emu/packages/' + b.closest('tr').dataset.id)
  if (r.status >= 300) alert((r.json && r.json.message) || r.text)
})

$('#upload-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  const f = e.target
  const q = new URLSearchParams({ title: f.title.value, version: f.version.value, type: f.type.value, checksumAlgorithm: f.checksumAlgorithm.value, fileName: f.file.files[0].name })
  if (f.url.checked) q.set('url', 'self')
  const r = await api('POST', '/emu/packages?' + q, await f.file.files[0].arrayBuffer(), { raw: true })
  f.dataset.status = r.status
})

$('#add-device-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  const f = e.target
  const r = await api('POST', '/emu/devices', { name: f.name.value, ...(f.token.value ? { token: f.token.value } : {}) })
  f.dataset.status = r.status
  if (r.status >= 300) return alert((r.json && r.json.message) || r.text)
  location.hash = enc(f.name.value)
  f.reset()
})

window.addEventListener('hashchange', chooseDevice)

function connect () {
  const es = new EventSource('/emu/events')
  es.addEventListener('snapshot', (e) => {
    const s = JSON.parse(e.data)
    $('#status').textContent = 'live'
    $('#status').className = 'on'
    $('#ports').textContent = `MQTT port ${s.mqtt} · HTTP port ${s.http}`
    state.packages = s.packages
    state.kinds = s.kinds
    const ids = new Set(s.devices.map(d => d.id))
    for (const id of state.devices.keys()) if (!ids.has(id)) { state.devices.delete(id); section(id)?.remove() }
    for (const d of s.devices) { state.devices.set(d.id, d); showDevice(d) }
    renderPackages()
    state.selected = null // chosen afresh: after a reconnect the charts and log load again
    chooseDevice()
  })
  es.addEventListener('device', (e) => {
    const d = JSON.parse(e.data)
    const fresh = !state.devices.has(d.id)
    state.devices.set(d.id, d)
    showDevice(d)
    if (fresh && (!state.selected || decodeURIComponent(location.hash.slice(1)) === d.name)) chooseDevice()
    else renderTabs()
  })
  es.addEventListener('telemetry', (e) => {
    const t = JSON.parse(e.data)
    if (t.id === state.selected && state.charts) state.charts.addPoints(t.points)
  })
  es.addEventListener('log', (e) => {
    const l = JSON.parse(e.data)
    if (l.id === state.selected && state.log) state.log.add(l.entries)
  })
  es.addEventListener('deviceDeleted', (e) => {
    const { id } = JSON.parse(e.data)
    state.devices.delete(id)
    section(id)?.remove()
    if (state.selected === id) { state.selected = null; chooseDevice() } else renderTabs()
  })
  es.addEventListener('packages', (e) => { state.packages = JSON.parse(e.data); renderPackages() })
  es.onerror = () => { $('#status').textContent = 'reconnecting…'; $('#status').className = 'off' }
}
connect()
