// scripts/demo --once must fail (non-zero exit) when the agent is broken: TBAGENT points at a
// tiny shell script that exits 1, so nothing is built and the demo fails at its second step.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { HERE } from './helpers.mjs'

const ROOT = path.resolve(HERE, '..', '..', '..')
const LIMIT_MS = 90000 // scripts/setup runs first; it is quick when everything is installed

// Runs a command in its own process group; kills the whole group when it outlives limitMs.
function run (cmd, args, env, limitMs) {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    let out = ''
    p.stdout.on('data', d => { out += d })
    p.stderr.on('data', d => { out += d })
    const t = setTimeout(() => {
      try { process.kill(-p.pid, 'SIGKILL') } catch {}
      reject(new Error(`${cmd} ${args.join(' ')} still running after ${limitMs} ms; output so far:\n${out}`))
    }, limitMs)
    p.on('error', e => { clearTimeout(t); reject(e) })
    p.on('close', (code, signal) => { clearTimeout(t); resolve({ code, signal, out }) })
  })
}

const refused = (port) => new Promise(resolve => {
  const s = net.connect(port, '127.0.0.1')
  s.on('connect', () => { s.destroy(); resolve(false) })
  s.on('error', () => resolve(true))
})

test('scripts/demo --once exits non-zero when the agent is broken, and stops the emulator', { timeout: LIMIT_MS + 10000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbagent-broken-'))
  try {
    const agent = path.join(dir, 'tbagent')
    fs.writeFileSync(agent, '#!/bin/sh\necho "broken agent: $*" >&2\nexit 1\n', { mode: 0o755 })
    const t0 = Date.now()
    const r = await run(path.join(ROOT, 'scripts', 'demo'), ['--once'], { TBAGENT: agent, TBEMU_DATA_DIR: path.join(dir, 'tbemu-data') }, LIMIT_MS)
    assert.notEqual(r.code, 0, r.out)
    assert.equal(r.signal, null, r.out)
    assert.match(r.out, /not building/, r.out)
    assert.match(r.out, /\[1\/6\] ThingsBoard emulator up/, r.out)
    assert.doesNotMatch(r.out, /\[2\/6\]|every step passed/, r.out)
    assert.match(r.out, /demo: FAILED: tbagent exited \(code 1\) before the demo was over/, r.out)
    assert.match(r.out, /broken agent: run examples\/thermostat\.lua/, r.out) // the agent's own output is shown
    // the emulator it started is gone: its MQTT port refuses connections
    const port = Number(r.out.match(/MQTT on 127\.0\.0\.1:(\d+)/)[1])
    assert.ok(await refused(port), `tbemu still listening on ${port} after the demo exited`)
    console.log(`demo with a broken agent failed as it should, in ${Date.now() - t0} ms`)
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
})
