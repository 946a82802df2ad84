// Test helpers: start tbemu as a child process (port 0, bounded wait for the ready line),
// talk to it with independent clients (MQTT.js, raw mqtt-packet, mosquitto_pub/sub, fetch).
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import net from 'node:net'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import mqtt from 'mqtt'
import mqttPacket from 'mqtt-packet'

export const HERE = path.dirname(fileURLToPath(import.meta.url))
export const TBEMU = path.join(HERE, '..', 'tbemu.js')

export async function startEmu (args = [], { timeoutMs = 10000, cwd } = {}) {
  const proc = spawn(process.execPath, [TBEMU, '--mqtt-port', '0', '--http-port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd })
  let stderr = ''
  proc.stderr.on('data', d => { stderr += d; if (process.env.TBEMU_DEBUG) process.stderr.write(d) })
  const ready = await new Promise((resolve, reject) => {
    let out = ''
    const t = setTimeout(() => { proc.kill('SIGKILL'); reject(new Error('tbemu not ready in time; stderr: ' + stderr)) }, timeoutMs)
    proc.stdout.on('data', d => {
      out += d
      const nl = out.indexOf('\n')
      if (nl >= 0) { clearTimeout(t); try { resolve(JSON.parse(out.slice(0, nl))) } catch (e) { reject(e) } }
    })
    proc.on('exit', (code) => { clearTimeout(t); reject(new Error('tbemu exited ' + code + ': ' + stderr)) })
  })
  const base = `http://127.0.0.1:${ready.http}`
  const emu = {
    proc, ready, mqttPort: ready.mqtt, httpPort: ready.http, base,
    get stderr () { return stderr },
    async api (method, p, body, headers = {}) {
      const r = await fetch(base + p, {
        method,
        headers: body !== undefined && !(body instanceof Uint8Array) ? { 'content-type': 'application/json', ...headers } : headers,
        body: body === undefined ? undefined : (typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body))
      })
      const text = await r.text()
      let json; try { json = text ? JSON.parse(text) : undefined } catch {}
      return { status: r.status, text, json, headers: r.headers }
    },
    async get (p) { const r = await emu.api('GET', p); if (r.status !== 200) throw new Error(`GET ${p}: ${r.status} ${r.text}`); return r.json },
    async post (p, body) { const r = await emu.api('POST', p, body); if (r.status >= 300) throw new Error(`POST ${p}: ${r.status} ${r.text}`); return r.json },
    async device (name, token) { return emu.post('/emu/devices', { name, token }) },
    async deviceId (name) { return (await emu.get('/api/tenant/devices?deviceName=' + encodeURIComponent(name))).id.id },
    async messages (name, q = '') { return emu.get(`/emu/devices/${encodeURIComponent(name)}/messages${q}`) },
    async events (name) { return emu.get(`/emu/devices/${encodeURIComponent(name)}/events`) },
    stop () {
      return new Promise((resolve) => {
        if (proc.exitCode !== null) return resolve(proc.exitCode)
        const t = setTimeout(() => proc.kill('SIGKILL'), 5000)
        proc.once('exit', (code) => { clearTimeout(t); resolve(code) })
        process.kill(proc.pid, 'SIGTERM')
      })
    }
  }
  return emu
}

// MQTT.js client; resolves on CONNACK, rejects on error. Collects messages in c.received.
export function connect (emu, opts = {}) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${emu.mqttPort}`, { reconnectPeriod: 0, connectTimeout: 5000, ...opts })
    c.received = []
    c.on('message', (topic, payload, packet) => c.received.push({ topic, payload, text: payload.toString(), qos: packet.qos, messageId: packet.messageId }))
    c.once('connect', (connack) => { c.connack = connack; resolve(c) })
    c.once('error', (e) => { c.end(true); reject(e) })
  })
}

export function subscribe (c, topic, opts = { qos: 1 }) {
  return new Promise((resolve, reject) => c.subscribe(topic, opts, (e, granted) => e ? reject(e) : resolve(granted)))
}
export function publish (c, topic, payload, opts = { qos: 1 }) {
  return new Promise((resolve, reject) => c.publish(topic, payload, opts, (e) => e ? reject(e) : resolve()))
}
export function end (c) { return new Promise(resolve => c.end(true, {}, resolve)) }

export async function waitFor (fn, { timeoutMs = 5000, intervalMs = 20, what = 'condition' } = {}) {
  const t0 = Date.now()
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() - t0 > timeoutMs) throw new Error('timed out waiting for ' + what)
    await sleep(intervalMs)
  }
}
export const sleep = (ms) => new Promise(resolve => setTimeout(resolve, ms))
export const waitMsg = (c, pred, what = 'message') => waitFor(() => c.received.find(m => typeof pred === 'string' ? m.topic === pred : pred(m)), { what })

// Raw MQTT client over mqtt-packet: sees exactly what the server writes (PUBACK vs PUBREC,
// CONNACK codes, close without PUBACK).
export function raw (emu, connect = {}) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(emu.mqttPort, '127.0.0.1')
    const parser = mqttPacket.parser()
    const r = { sock, packets: [], closed: false }
    parser.on('packet', p => r.packets.push(p))
    sock.on('data', d => parser.parse(d))
    sock.on('close', () => { r.closed = true })
    sock.on('error', () => {})
    r.send = (p) => sock.write(mqttPacket.generate(p))
    r.wait = (pred, what) => waitFor(() => r.packets.find(pred), { what })
    r.waitClosed = () => waitFor(() => r.closed, { what: 'close' })
    sock.on('connect', async () => {
      r.send({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clean: true, clientId: '', keepalive: 60, ...connect })
      try { r.connack = await r.wait(p => p.cmd === 'connack', 'connack'); resolve(r) } catch (e) { reject(e) }
    })
    sock.on('error', reject)
  })
}

export const CHROMIUM = '/usr/bin/chromium'

// openBrowser() -> {browser, close()}: headless Chromium with a fresh profile (playwright takes
// the --user-data-dir as launchPersistentContext's first argument), for the page tests
export async function openBrowser () {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium`)
  const { chromium } = await import('playwright-core')
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tbemu-chromium-'))
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync']
  })
  return {
    browser,
    async close () {
      await browser.close()
      fs.rmSync(profile, { recursive: true, force: true })
    }
  }
}
