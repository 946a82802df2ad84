// One device's part of the page: its header, latest telemetry, attributes, server-side RPC,
// client-side RPC rules and requests, firmware/software progress and the places where the
// charts and the message log go. Every control is one REST call; its path is in its tooltip
// and in scripts/tbemu/README.md. A gateway's sub-devices will get their own sections inside
// the gateway's `.sub-devices` (the gateway API is not emulated yet).
import { $, esc, enc, api, time, shown } from './util.js'

const STEPS = ['QUEUED', 'INITIATED', 'DOWNLOADING', 'DOWNLOADED', 'VERIFIED', 'UPDATING', 'UPDATED']
const RPC_STATUS = { 200: 'answered', 408: 'timeout: the device did not answer in time', 409: 'the device is not connected or not subscribed to RPC', 406: 'the device answered with invalid JSON' }

export function createDeviceSection (d) {
  const el = document.createElement('section')
  el.className = 'device'
  el.id = 'dev-' + d.id
  el.dataset.id = d.id
  el.dataset.name = d.name
  const attrPath = `/api/plugins/telemetry/DEVICE/${d.id}`
  const emuPath = `/emu/devices/${enc(d.name)}`
  el.innerHTML = `
  <div class="dev-head card">
    <h2><span class="name"></span> <span class="conn"></span></h2>
    <div class="dev-meta"><span class="cred"></span> <span class="dev-id"></span></div>
    <div class="dev-actions">
      <button class="disconnect" title="POST ${emuPath}/disconnect">Disconnect</button>
      <button class="delete-device" title="DELETE ${emuPath}">Delete device</button>
    </div>
  </div>
  <div class="dev-grid">
    <section class="card wide telemetry-card">
      <h3>Telemetry
        <span class="tools"><select class="window-select" title="time window">
          <option value="300000">last 5 min</option><option value="900000">last 15 min</option><option value="3600000">last hour</option>
          <option value="21600000">last 6 h</option><option value="86400000">last 24 h</option></select>
        <select class="add-chart" title="a new chart for a key"></select></span></h3>
      <p class="no-telemetry muted">No telemetry yet.</p>
      <div class="charts"></div>
      <div class="timelines"></div>
      <table class="telemetry stack"><thead><tr><th>key</th><th>latest value</th><th>type</th><th>time</th></tr></thead><tbody></tbody></table>
    </section>
    <div class="col">
    <section class="card attributes-card">
      <h3>Attributes</h3>
      <p class="no-attributes muted">None yet.</p>
      <table class="attributes stack"><thead><tr><th>key</th><th>value</th><th>scope</th><th>updated</th><th></th></tr></thead><tbody></tbody></table>
      <form class="attr-form" title="POST ${attrPath}/attributes/SHARED_SCOPE">
        <input class="k" name="key" placeholder="shared key" required><input class="v" name="value" placeholder='value (JSON, e.g. 42 or "on")' required><button>Set shared</button>
      </form>
    </section>
    <section class="card rpc-card">
      <h3>Server-side RPC <span class="muted">(server → device)</span></h3>
      <form class="rpc-form" title="POST /api/plugins/rpc/twoway/${d.id} (or /oneway/)">
        <input class="k" name="method" placeholder="method" required><input class="v" name="params" placeholder="params (JSON)" value="{}">
        <select name="kind"><option>twoway</option><option>oneway</option></select>
        <label class="timeout">timeout <input name="timeout" value="10000" size="6"> ms</label><button>Call</button>
      </form>
      <pre class="rpc-result"></pre>
    </section>
    </div>
    <div class="col">
    <section class="card client-rpc-card">
      <h3>Client-side RPC <span class="muted">(device → server)</span></h3>
      <p class="no-rules muted">No rules: a request waits, then gets {"error":"timeout"}.</p>
      <table class="rpc-rules stack"><thead><tr><th>method</th><th>answer</th><th>for</th><th></th></tr></thead><tbody></tbody></table>
      <form class="rule-form" title="POST ${emuPath}/client-rpc">
        <input class="k" name="method" placeholder="method" required>
        <select name="answer"><option value="response">JSON response</option><option value="currentTime">current time (ms)</option><option value="echo">echo params</option></select>
        <input class="v" name="response" placeholder='response (JSON, e.g. {"ok":true})'>
        <label class="delay">delay <input name="delayMs" value="0" size="5"> ms</label>
        <button>Add rule</button><button type="button" class="preset-time" title="getCurrentTime → the current time in ms, as ThingsBoard's rule-chain example">getCurrentTime preset</button>
      </form>
      <h4>Requests from the device</h4>
      <p class="no-requests muted">None yet.</p>
      <table class="rpc-requests stack"><thead><tr><th>time</th><th>id</th><th>method</th><th>answer</th></tr></thead><tbody></tbody></table>
    </section>
    <section class="card ota-card">
      <h3>Firmware / software</h3>
      <div class="ota"></div>
      <form class="assign-form" title="POST ${emuPath}/assign"><select name="packageId" class="pkg-select"></select><button>Assign</button></form>
    </section>
    </div>
    <section class="card wide log-card">
      <h3>Message log <span class="muted log-count"></span>
        <span class="tools"><button class="log-pause" title="hold new entries">pause</button><button class="log-clear" title="DELETE ${emuPath}/log">clear</button></span></h3>
      <div class="log-kinds" title="GET ${emuPath}/log?kind=…"></div>
      <div class="log-list"></div>
    </section>
  </div>
  <div class="sub-devices"></div>`
  wire(el)
  return el
}

function wire (el) {
  const id = () => el.dataset.id
  const name = () => enc(el.dataset.name)
  const status = (form, r) => { form.dataset.status = r.status; if (r.status >= 300) alert(`HTTP ${r.status} ${r.text}`) }
  const submit = (sel, fn) => $(sel, el).addEventListener('submit', (e) => { e.preventDefault(); fn(e.target) })

  $('.disconnect', el).onclick = () => api('POST', `/emu/devices/${name()}/disconnect`)
  $('.delete-device', el).onclick = () => { if (confirm(`Delete device ${el.dataset.name}?`)) api('DELETE', `/emu/devices/${name()}`) }

  submit('.attr-form', async (f) => {
    let v = f.value.value
    try { JSON.parse(v) } catch { v = JSON.stringify(v) }
    status(f, await api('POST', `/api/plugins/telemetry/DEVICE/${id()}/attributes/SHARED_SCOPE`, `{${JSON.stringify(f.key.value)}:${v}}`))
  })
  $('.attributes', el).addEventListener('click', async (e) => {
    const b = e.target.closest('button.del')
    if (!b) return
    const tr = b.closest('tr')
    await api('DELETE', `/api/plugins/telemetry/DEVICE/${id()}/${tr.dataset.scope}?keys=${enc(tr.dataset.key)}`)
  })

  submit('.rpc-form', async (f) => {
    const out = $('.rpc-result', el)
    let params = f.params.value || 'null'
    try { JSON.parse(params) } catch { params = JSON.stringify(params) }
    out.textContent = '…'
    out.className = 'rpc-result'
    const r = await api('POST', `/api/plugins/rpc/${f.kind.value}/${id()}`, `{"method":${JSON.stringify(f.method.value)},"params":${params},"timeout":${Number(f.timeout.value) || 10000}}`)
    out.textContent = `HTTP ${r.status} ${r.text}`
    out.title = RPC_STATUS[r.status] || ''
    out.className = 'rpc-result ' + (r.status === 200 ? 'ok' : 'bad')
  })

  const ruleForm = $('.rule-form', el)
  const answerKind = () => { ruleForm.response.disabled = ruleForm.answer.value !== 'response' }
  ruleForm.answer.onchange = answerKind
  $('.preset-time', el).onclick = () => { ruleForm.method.value = 'getCurrentTime'; ruleForm.answer.value = 'currentTime'; answerKind() }
  submit('.rule-form', async (f) => {
    const body = { method: f.method.value, delayMs: Number(f.delayMs.value) || 0 }
    if (f.answer.value === 'response') {
      const text = f.response.value.trim() || 'null'
      try { JSON.parse(text) } catch { return alert('the response must be JSON, e.g. {"ok":true} or "text"') }
      body.responseText = text // as typed: 2.0 stays 2.0
    } else body[f.answer.value] = true
    status(f, await api('POST', `/emu/devices/${name()}/client-rpc`, body))
  })
  $('.rpc-rules', el).addEventListener('click', async (e) => {
    const b = e.target.closest('button.del')
    if (!b) return
    const tr = b.closest('tr')
    const path = tr.dataset.scope === 'global' ? `/emu/client-rpc/${enc(tr.dataset.method)}` : `/emu/devices/${name()}/client-rpc/${enc(tr.dataset.method)}`
    await api('DELETE', path)
  })
  $('.rpc-requests', el).addEventListener('click', (e) => {
    const b = e.target.closest('button.make-rule')
    if (!b) return
    ruleForm.method.value = b.closest('tr').dataset.method
    ruleForm.response.focus()
  })

  submit('.assign-form', async (f) => status(f, await api('POST', `/emu/devices/${name()}/assign`, { packageId: f.packageId.value })))
  $('.ota', el).addEventListener('click', async (e) => {
    const b = e.target.closest('button.unassign')
    if (b) await api('POST', `/emu/devices/${name()}/unassign`, { type: b.dataset.type })
  })
}

export function updateDeviceSection (el, d, packages) {
  el.dataset.name = d.name
  $('.name', el).textContent = d.name
  const conn = $('.conn', el)
  conn.textContent = d.connected ? '● connected' : '○ disconnected'
  conn.className = 'conn ' + (d.connected ? 'on' : 'off')
  const c = d.credentials
  $('.cred', el).textContent = c.credentialsType === 'ACCESS_TOKEN' ? `token ${c.credentialsId}` : `MQTT basic: clientId ${c.clientId ?? '-'}, username ${c.userName ?? '-'}, password ${c.password ? 'set' : '-'}`
  $('.dev-id', el).textContent = `id ${d.id}`

  $('.telemetry tbody', el).innerHTML = Object.entries(d.latest).sort(([a], [b]) => a < b ? -1 : 1).map(([k, v]) =>
    `<tr data-key="${esc(k)}"><th>${esc(k)}</th><td class="value">${esc(shown(v))}</td><td class="type">${v.type}</td><td class="ts">${time(v.ts)}</td></tr>`).join('')

  const attrs = []
  for (const [scope, m] of Object.entries(d.attributes)) {
    for (const [k, v] of Object.entries(m)) {
      const sc = scope.replace('_SCOPE', '').toLowerCase()
      attrs.push(`<tr data-scope="${scope}" data-key="${esc(k)}"><th>${esc(k)}</th><td class="value">${esc(shown(v))}</td><td class="scope">${sc}</td><td class="ts">${time(v.lastUpdateTs)}</td>` +
        `<td><button class="del" title="DELETE /api/plugins/telemetry/DEVICE/${d.id}/${scope}?keys=${esc(enc(k))}">×</button></td></tr>`)
    }
  }
  $('.attributes tbody', el).innerHTML = attrs.join('')
  $('.attributes', el).hidden = !attrs.length
  $('.no-attributes', el).hidden = attrs.length > 0

  rpcRules(el, d)
  rpcRequests(el, d)
  $('.ota', el).innerHTML = ['FIRMWARE', 'SOFTWARE'].map(t => otaLine(d, t)).join('') || '<p class="muted">Nothing assigned.</p>'
  fillPackages(el, packages)
}

function rpcRules (el, d) {
  $('.no-rules', el).hidden = d.clientRpc.rules.length > 0
  $('.rpc-rules', el).hidden = !d.clientRpc.rules.length
  $('.rpc-rules tbody', el).innerHTML = d.clientRpc.rules.map(r =>
    `<tr data-method="${esc(r.method)}" data-scope="${r.scope}"><th>${esc(r.method)}</th><td class="answer">${esc(r.answer)}</td><td>${r.scope === 'global' ? 'all devices' : 'this device'}</td>` +
    `<td><button class="del" title="DELETE ${r.scope === 'global' ? '/emu/client-rpc/' : `/emu/devices/${esc(enc(d.name))}/client-rpc/`}${esc(enc(r.method))}">×</button></td></tr>`).join('')
}

function rpcRequests (el, d) {
  const reqs = d.clientRpc.requests.slice(-20).reverse()
  $('.no-requests', el).hidden = reqs.length > 0
  $('.rpc-requests', el).hidden = reqs.length === 0
  $('.rpc-requests tbody', el).innerHTML = reqs.map(r => {
    const unanswered = r.status === 'waiting' || r.status === 'timed out'
    const answer = r.status === 'waiting' ? 'waiting: no rule <button class="make-rule">add rule…</button>'
      : r.status === 'timed out' ? `no rule: {"error":"timeout"} <button class="make-rule">add rule…</button>`
        : r.status === 'scheduled' ? 'rule: answer pending' : `${esc(r.by)}: ${esc(r.response)}`
    return `<tr data-id="${r.id}" data-method="${esc(r.method)}" data-status="${r.status}" class="${unanswered ? 'unanswered' : ''}">` +
      `<td class="ts">${time(r.ts)}</td><td>${r.id}</td><th>${esc(r.method)}</th><td class="answer">${answer}</td></tr>`
  }).join('')
}

function otaLine (d, type) {
  const o = d.ota[type]
  if (!o.packageId && !o.state && !o.currentVersion) return ''
  const t = type.toLowerCase()
  const at = STEPS.indexOf(o.state)
  const steps = STEPS.map((s, i) => `<li class="${o.state === 'FAILED' ? '' : i < at ? 'done' : i === at ? 'now' : ''}">${s}</li>`).join('')
  let bar = ''
  const p = o.progress
  if (p && p.size) bar = `<div class="bar"><span style="width:${p.percent}%"></span></div><div class="bar-text">download ${p.percent}% · ${p.bytes} of ${p.size} bytes served in ${p.chunks} chunks</div>`
  else if (o.packageId && at >= 0) bar = `<div class="bar"><span style="width:${at >= 3 ? 100 : 0}%"></span></div><div class="bar-text muted">${at >= 3 ? 'downloaded' : 'no chunks served yet'} (from ${t === 'firmware' ? 'fw' : 'sw'}_state)</div>`
  return `<div class="ota-${t}" data-state="${esc(o.state || '')}">
    <div class="ota-line"><b>${t}</b>: current ${esc(o.currentTitle || '-')} ${esc(o.currentVersion || '')} → target ${esc(o.targetTitle || '-')} ${esc(o.targetVersion || '')}: <span class="fw fw-state">${esc(o.state || '-')}</span>` +
    `${o.error ? ' <span class="off">' + esc(o.error) + '</span>' : ''}` +
    `${o.packageId ? ` <button class="unassign" data-type="${type}" title="POST /emu/devices/${esc(enc(d.name))}/unassign">Unassign</button>` : ''}</div>
    <ol class="steps${o.state === 'FAILED' ? ' failed' : ''}">${steps}</ol>${bar}</div>`
}

export function fillPackages (el, packages) {
  const sel = $('.pkg-select', el)
  const opts = packages.map(p => `<option value="${p.id}">${esc(p.type + ' ' + p.title + ' ' + p.version)}</option>`).join('')
  if (sel.dataset.opts === opts) return
  const cur = sel.value
  sel.innerHTML = opts
  sel.dataset.opts = opts
  if (cur) sel.value = cur
}
