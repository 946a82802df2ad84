// persist.js — tbemu's --data-dir. Everything a user set up survives a restart, a SIGKILL
// included, because nothing is ever half-written in place:
//   state.json       devices (ids, credentials, attributes, client-RPC rules, claims, OTA
//                    assignments), packages' metadata, provisioning profiles and the config:
//                    small, rewritten whole through a temp file and a rename after each change
//   telemetry.jsonl  the telemetry history, append-only, one line per saved group:
//                    {"d":DEVICE_ID,"ts":MS,"kv":[[KEY,TYPE,VALUE],...]}; a torn last line is
//                    skipped when read; rewritten (temp + rename) when it holds far more lines
//                    than the history it replays
//   packages/ID.bin  package bytes, written (temp + rename) before state.json names them
//   tbemu.pid        the tbemu using the directory: a second one is refused, not interleaved
// No fsync: this is about a killed process, not a power cut.
import fs from 'node:fs'
import path from 'node:path'

export class DataDir {
  constructor (dir) {
    this.dir = dir
    fs.mkdirSync(path.join(dir, 'packages'), { recursive: true })
    this.stateFile = path.join(dir, 'state.json')
    this.journalFile = path.join(dir, 'telemetry.jsonl')
    this.journalFd = null
    this.lock()
  }

  // One tbemu per data dir. A pid file left by a killed tbemu is taken over.
  lock () {
    const f = path.join(this.dir, 'tbemu.pid')
    const pid = Number(fs.existsSync(f) ? fs.readFileSync(f, 'utf8') : 0)
    if (pid && pid !== process.pid && isTbemu(pid)) throw new Error(`in use by another tbemu (pid ${pid})`)
    fs.writeFileSync(f, String(process.pid))
    this.pidFile = f
  }

  unlock () {
    try { if (Number(fs.readFileSync(this.pidFile, 'utf8')) === process.pid) fs.rmSync(this.pidFile) } catch {}
  }

  readState () {
    if (!fs.existsSync(this.stateFile)) return null
    return JSON.parse(fs.readFileSync(this.stateFile, 'utf8'))
  }

  writeState (state) { writeAtomic(this.stateFile, JSON.stringify(state)) }

  // Calls onGroup(deviceId, ts, [[key, {type, value}]]) for each line; returns the number of
  // lines read. A line that does not parse (the torn end of a killed write) is skipped.
  readTelemetry (onGroup) {
    if (!fs.existsSync(this.journalFile)) return 0
    let text = fs.readFileSync(this.journalFile, 'utf8')
    const end = text.lastIndexOf('\n') + 1
    if (end < text.length) { // the torn end of a killed write: cut, so the next line starts clean
      fs.truncateSync(this.journalFile, Buffer.byteLength(text.slice(0, end)))
      text = text.slice(0, end)
    }
    let lines = 0
    let start = 0
    while (start < text.length) {
      let end = text.indexOf('\n', start)
      if (end < 0) end = text.length
      const line = text.slice(start, end)
      start = end + 1
      if (!line) continue
      let g
      try { g = JSON.parse(line) } catch { continue }
      if (!g || typeof g.d !== 'string' || !Array.isArray(g.kv)) continue
      lines++
      onGroup(g.d, g.ts, g.kv.map(([key, type, value]) => [key, { type, value }]))
    }
    return lines
  }

  appendTelemetry (deviceId, ts, entries) {
    if (this.journalFd === null) this.journalFd = fs.openSync(this.journalFile, 'a')
    fs.writeSync(this.journalFd, groupLine(deviceId, ts, entries))
  }

  // groups: iterable of [deviceId, ts, entries]
  rewriteTelemetry (groups) {
    this.closeJournal()
    const tmp = this.journalFile + '.tmp'
    const fd = fs.openSync(tmp, 'w')
    try {
      let buf = ''
      for (const [id, ts, entries] of groups) {
        buf += groupLine(id, ts, entries)
        if (buf.length > 1 << 20) { fs.writeSync(fd, buf); buf = '' }
      }
      if (buf) fs.writeSync(fd, buf)
    } finally { fs.closeSync(fd) }
    fs.renameSync(tmp, this.journalFile)
  }

  closeJournal () {
    if (this.journalFd !== null) { fs.closeSync(this.journalFd); this.journalFd = null }
  }

  packageFile (id) { return path.join(this.dir, 'packages', id + '.bin') }
  writePackage (id, data) { writeAtomic(this.packageFile(id), data) }
  deletePackage (id) { fs.rmSync(this.packageFile(id), { force: true }) }
  readPackage (id) { const f = this.packageFile(id); return fs.existsSync(f) ? fs.readFileSync(f) : null }
}

function isTbemu (pid) {
  try { process.kill(pid, 0) } catch (e) { if (e.code === 'ESRCH') return false }
  try { return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('tbemu') } catch { return true }
}

function groupLine (deviceId, ts, entries) {
  return JSON.stringify({ d: deviceId, ts, kv: entries.map(([k, kv]) => [k, kv.type, kv.value]) }) + '\n'
}

function writeAtomic (file, data) {
  const tmp = file + '.tmp'
  fs.writeFileSync(tmp, data)
  fs.renameSync(tmp, file)
}
