// A new user's folder on a fresh machine layout: `tbagent init`, then `tbagent test`, `tbagent
// check` and `luacheck` there, with HOME and the working directory in a temp dir, a bare
// environment (no LUA_PATH, nothing of this repository installed or copied), and the binary
// alone. Then typos in each kind of handler and in a required module fail all three, and the
// deliberately broken example under fixtures/ fails `tbagent test`, naming its file:line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { TBAGENT, REPO, tmpdir, ms } from './lib.mjs';

const FIXTURE = path.join(REPO, 'scripts/itest/fixtures/broken');

// run(cmd, args, cwd, home) -> {status, stdout, stderr, out}, in an environment with only
// PATH and HOME (a fresh login: no LUA_PATH, no LUA_CPATH, no TB_*)
function run(cmd, args, cwd, home) {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: ms(60000),
    env: { PATH: process.env.PATH, HOME: home } });
  return { ...r, out: `${r.stdout}\n${r.stderr}` };
}

function user() {
  const home = tmpdir('tbitest-home-');
  const work = tmpdir('tbitest-work-');
  return { home, work, tb: (args, cwd = work) => run(TBAGENT, args, cwd, home) };
}

test('tbagent init writes a folder where tbagent test, tbagent check and luacheck pass', () => {
  const { home, work, tb } = user();
  let r = tb(['init', 'pump']);
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /next: cd pump && tbagent test/);
  const dir = path.join(work, 'pump');
  for (const f of ['device.lua', 'spec/device_spec.lua', '.busted', '.luacheckrc']) {
    assert.ok(fs.existsSync(path.join(dir, f)), `init did not write ${f}`);
  }
  // never overwrites
  const before = fs.readFileSync(path.join(dir, 'device.lua'), 'utf8');
  r = tb(['init', 'pump']);
  assert.equal(r.status, 2, r.out);
  assert.equal(r.stderr, 'tbagent: pump/device.lua exists: init never overwrites (choose a new or empty folder)\n');
  assert.equal(fs.readFileSync(path.join(dir, 'device.lua'), 'utf8'), before);

  r = tb(['test'], dir);
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /5 successes \/ 0 failures \/ 0 errors/);
  r = tb(['test', 'pump', '-o', 'TAP']);                 // the folder from outside it
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^1\.\.5$/m);
  r = tb(['check', 'device.lua'], dir);
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^device\.lua: ok: 1 RPC method \(setTarget\), 1 attribute handler, 1 timer$/m);
  r = run('luacheck', ['--no-color', '.'], dir, home);
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /0 warnings \/ 0 errors in 2 files/);
  // nothing was written outside the folder
  assert.deepEqual(fs.readdirSync(home), []);
  assert.deepEqual(fs.readdirSync(work), ['pump']);
});

test('a typo in an RPC handler, a timer, an attribute handler or a required module fails check, luacheck and test', () => {
  const { home, tb } = user();
  const dir = path.join(tmpdir('tbitest-typo-'), 'dev');
  assert.equal(tb(['init', dir]).status, 0);
  fs.mkdirSync(path.join(dir, 'lib'));
  fs.writeFileSync(path.join(dir, 'lib/report.lua'), [
    'return {',
    '  up = function() tb.send_atributes{up = true} end,',   // line 2
    '}',
    '',
  ].join('\n'));
  let text = fs.readFileSync(path.join(dir, 'device.lua'), 'utf8');
  const lines = text.split('\n');
  const lineOf = (needle) => lines.findIndex((l) => l.includes(needle)) + 1;
  const typo = (needle, from, to) => { lines[lineOf(needle) - 1] = lines[lineOf(needle) - 1].replace(from, to); };
  typo('tb.send_telemetry{temperature', 'tb.send_telemetry', 'tb.send_telemetery');        // the timer
  typo('return {target = tb.persist.get', 'tb.persist.get', 'tb.persist.gett');              // the RPC handler
  lines.splice(lineOf('tb.on_attributes(function(changes)'), 0, '  tb.log.wran("attributes changed")');  // the attribute handler
  const timer = lineOf('tb.send_telemetery'), rpc = lineOf('tb.persist.gett'), attr = lineOf('tb.log.wran');
  lines.push('local report = require "lib.report"', 'tb.on_disconnect(function() report.up() end)', '');
  fs.writeFileSync(path.join(dir, 'device.lua'), lines.join('\n'));

  let r = tb(['check', 'device.lua'], dir);
  assert.equal(r.status, 1, r.out);
  assert.equal(r.stdout, '');
  assert.equal(r.stderr, [
    `device.lua:${timer}: unknown tb.send_telemetery; did you mean tb.send_telemetry?`,
    `device.lua:${rpc}: unknown tb.persist.gett; did you mean tb.persist.get?`,
    `device.lua:${attr}: unknown tb.log.wran; did you mean tb.log.warn?`,
    './lib/report.lua:2: unknown tb.send_atributes; did you mean tb.send_attributes?',
    'tbagent: device.lua: 4 problems found (listed above)',
    '',
  ].join('\n'));

  r = run('luacheck', ['--formatter', 'plain', '.'], dir, home);
  assert.notEqual(r.status, 0, r.out);
  for (const [file, line, name] of [['device.lua', timer, 'send_telemetery'], ['device.lua', rpc, 'persist.gett'],
    ['device.lua', attr, 'log.wran'], ['lib/report.lua', 2, 'send_atributes']]) {
    assert.match(r.stdout, new RegExp(`^${file.replace('.', '\\.')}:${line}:\\d+: accessing undefined field '${name.replace('.', '\\.')}' of global 'tb'$`, 'm'));
  }

  r = tb(['test', '-o', 'TAP'], dir);
  assert.equal(r.status, 1, r.out);
  assert.match(r.stdout, new RegExp(`tb\\.every handler failed: device\\.lua:${timer}: unknown tb\\.send_telemetery; did you mean tb\\.send_telemetry\\?`));
  assert.match(r.stdout, new RegExp(`RPC setTarget failed: device\\.lua:${rpc}: unknown tb\\.persist\\.gett`));
  assert.match(r.stdout, new RegExp(`attribute handler failed: device\\.lua:${attr}: unknown tb\\.log\\.wran`));
  text = fs.readFileSync(path.join(dir, 'device.lua'), 'utf8');
  assert.ok(text.includes('tb.persist.gett'));
});

test('tbagent test fails on the deliberately broken example, naming its file:line, and honours its .busted', () => {
  const { tb } = user();
  let r = tb(['test', FIXTURE]);
  assert.equal(r.status, 1, r.out);
  assert.match(r.stdout, /1 success \/ 0 failures \/ 1 error/);   // the specs under tests/ ran: .busted says where
  assert.match(r.stdout, /tb\.every handler failed: device\.lua:9: unknown tb\.send_telemetery; did you mean tb\.send_telemetry\?/);
  r = tb(['test'], FIXTURE);
  assert.equal(r.status, 1, r.out);
  assert.match(r.stdout, /device\.lua:9: unknown tb\.send_telemetery/);
  r = tb(['check', 'device.lua'], FIXTURE);
  assert.equal(r.status, 1, r.out);
  assert.equal(r.stderr, 'tbagent: device.lua: device.lua:9: unknown tb.send_telemetery; did you mean tb.send_telemetry?\n');
});

test('tbagent test with no specs, and with a spec that fails an assertion, exits with Busted\'s status', () => {
  const { work, tb } = user();
  let r = tb(['test']);
  assert.equal(r.status, 1, r.out);
  assert.match(r.out, /No test files found/);
  fs.mkdirSync(path.join(work, 'spec'));
  fs.writeFileSync(path.join(work, 'spec/a_spec.lua'), 'describe("a", function() it("fails", function() assert.equal(1, 2) end) end)\n');
  r = tb(['test']);
  assert.equal(r.status, 1, r.out);
  assert.match(r.stdout, /0 successes \/ 1 failure/);
  fs.writeFileSync(path.join(work, 'spec/a_spec.lua'), 'describe("a", function() it("passes", function() assert.equal(2, 2) end) end)\n');
  r = tb(['test']);
  assert.equal(r.status, 0, r.out);
});
