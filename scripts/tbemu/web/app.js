// tbemu web page: live view over server-sent events (/emu/events); forms use the REST API.
const state = { devices: new Map(), packages: [] }
const $ = (sel, el = document) => el.querySelector(sel)
const esc = (s) => String(s).replace(/[&<>"]/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]))
const show = (v) => typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)
const time = (ts) => new Date(ts).toLocaleTimeString()

function card (d) {
  let el = document.getElementById('dev-' + d.id)
  if (!el) {
    el = document.createElement('section')
    el.className = 'card device'
    el.id = 'dev-' + d.id
    el.dataset.name = d.name
    el.innerHTML = `
      <h2><span class="name"></span><span class="conn"></span></h2>
      <div class="cred"></div>
      <h3>Latest telemetry</h3><table class="telemetry"><tbody></tbody></table>
      <h3>Attributes</h3><table class="attributes"><tbody></tbody></table>
      <h3>Firmware / software</h3><div class="ota"></div>
      <h3>Set shared attribute</h3>
      <form class="attr-form"><input class="k" name="key" placeholder="key" required><input class="v" name="value" placeholder='value (JSON, e.g. 42 or "on")' required><button>Set</button></form>
      <h3>RPC</h3>
      <form class="rpc-form"><input class="k" name="method" placeholder="method" required><input class="v" name="params" placeholder="params (JSON)" value="{}"><select name="kind"><option>twoway</option><option>oneway</option></select><input name="timeout" value="10000" size="6"><button>Call</button></form>
      <pre class="rpc-result"></pre>
      <h3>Assign package</h3>
      <form class="assign-form"><select name="packageId" class="pkg-select"></select><button>Assign</button></form>`
    $('.attr-form', el).addEventListener('submit', (e) => { e.preventDefault(); setAttr(el.id.slice(4), e.target) })
    $('.rpc-form', el).addEventListener('submit', (e) => { e.preventDefault(); callRpc(el.id.slice(4), e.target, $('.rpc-result', el)) })
    $('.assign-form', el).addEventListener('submit', (e) => { e.preventDefault(); assign(el.dataset.name, e.target) })
    document.getElementById('devices').appendChild(el)
  }
  $('.name', el).textContent = d.name
  const conn = $('.conn', el)
  conn.textContent = d.connected ? '● connected' : '○ disconnected'
  conn.className = 'conn ' + (d.connected ? 'on' : 'off')
  $('.cred', el).textContent = d.credentials.credentialsType === 'ACCESS_TOKEN' ? 'token ' + d.credentials.credentialsId : 'MQTT basic ' + JSON.stringify(d.credentials)
  $('.telemetry tbody', el).innerHTML = Object.entries(d.latest).sort().map(([k, v]) =>
    `<tr data-key="${esc(k)}"><th>${esc(k)}</th><td class="value">${esc(show(v.value))}</td><td>${esc(v.type)}</td><td>${time(v.ts)}</td></tr>`).join('')
  const attrs = []
  for (const [scope, m] of Object.entries(d.attributes)) for (const [k, v] of Object.entries(m)) attrs.push(`<tr data-scope="${scope}" data-key="${esc(k)}"><th>${esc(k)}</th><td class="value">${esc(show(v.value))}</td><td>${scope.replace('_SCOPE', '').toLowerCase()}</td></tr>`)
  $('.attributes tbody', el).innerHTML = attrs.join('')
  $('.ota', el).innerHTML = ['FIRMWARE', 'SOFTWARE'].map(t => {
    const o = d.ota[t]
    if (!o.packageId && !o.state && !o.currentVersion) return ''
    return `<div class="ota-${t.toLowerCase()}">${t.toLowerCase()}: current ${esc(o.currentTitle || '-')} ${esc(o.currentVersion || '')} → target ${esc(o.targetTitle || '-')} ${esc(o.targetVersion || '')}: <span class="fw fw-state">${esc(o.state || '-')}</span>${o.error ? ' <span class="off">' + esc(o.error) + '</span>' : ''}</div>`
  }).join('')
  fillPackages(el)
}

function fillPackages (el) {
  const sel = $('.pkg-select', el)
  const cur = sel.value
  sel.innerHTML = state.packages.map(p => `<option value="${p.id}">${esc(p.type + ' ' + p.title + ' ' + p.version)}</option>`).join('')
  if (cur) sel.value = cur
}

function renderPackages () {
  $('#package-table tbody').innerHTML = state.packages.map(p => `<tr><td>${p.type}</td><td>${esc(p.title)}</td><td>${esc(p.version)}</td><td>${p.size ?? ''}</td><td>${esc((p.checksumAlgorithm || '') + ' ' + (p.checksum || ''))}${p.url ? '<br>' + esc(p.url) : ''}</td><td>${p.id}</td></tr>`).join('')
  document.querySelectorAll('.device').forEach(fillPackages)
}

async function api (method, path, body, raw) {
  const r = await fetch(path, { method, headers: raw ? {} : { 'content-type': 'application/json' }, body: raw ? body : (body === undefined ? undefined : JSON.stringify(body)) })
  const text = await r.text()
  return { status: r.status, text }
}

async function setAttr (id, form) {
  let v = form.value.value
  try { JSON.parse(v) } catch { v = JSON.stringify(v) }
  const r = await fetch(`/api/plugins/telemetry/DEVICE/${id}/attributes/SHARED_SCOPE`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: `{${JSON.stringify(form.key.value)}:${v}}` })
  form.dataset.status = r.status
}

async function callRpc (id, form, out) {
  let params = form.params.value || 'null'
  try { JSON.parse(params) } catch { params = JSON.stringify(params) }
  out.textContent = '…'
  const r = await fetch(`/api/plugins/rpc/${form.kind.value}/${id}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: `{"method":${JSON.stringify(form.method.value)},"params":${params},"timeout":${Number(form.timeout.value) || 10000}}` })
  out.textContent = `HTTP ${r.status} ${await r.text()}`
}

async function assign (name, form) {
  await api('POST', `/emu/devices/${encodeURIComponent(name)}/assign`, { packageId: form.packageId.value })
}

$('#upload-form').addEventListener('submit', async (e) => {
  e.preventDefault()
  const f = e.target
  const q = new URLSearchParams({ title: f.title.value, version: f.version.value, type: f.type.value, checksumAlgorithm: f.checksumAlgorithm.value, fileName: f.file.files[0].name })
  if (f.url.checked) q.set('url', 'self')
  const r = await api('POST', '/emu/packages?' + q, await f.file.files[0].arrayBuffer(), true)
  f.dataset.status = r.status
})

function connect () {
  const es = new EventSource('/emu/events')
  es.addEventListener('snapshot', (e) => {
    const s = JSON.parse(e.data)
    $('#status').textContent = 'live'
    $('#ports').textContent = `MQTT port ${s.mqtt}, HTTP port ${s.http}`
    state.packages = s.packages
    for (const d of s.devices) { state.devices.set(d.id, d); card(d) }
    renderPackages()
  })
  es.addEventListener('device', (e) => { const d = JSON.parse(e.data); state.devices.set(d.id, d); card(d) })
  es.addEventListener('deviceDeleted', (e) => { const { id } = JSON.parse(e.data); document.getElementById('dev-' + id)?.remove() })
  es.addEventListener('packages', (e) => { state.packages = JSON.parse(e.data); renderPackages() })
  es.onerror = () => { $('#status').textContent = 'reconnecting…' }
}
connect()
