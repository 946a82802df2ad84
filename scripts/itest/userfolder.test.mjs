// A user's own script folder (issue 5): after `cmake --install`, an example and its spec
// copied into an empty folder with the committed .busted and .luacheckrc pass `busted` and
// `luacheck .` with no flags. The install goes to a temporary prefix; LUA_PATH/LUA_CPATH
// name it the way /usr/local is named on Lua's default paths.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { tmpdir } from './lib.mjs';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');
// the release build even in the ASan run: plain lua5.4 cannot load an instrumented module
const build = path.join(root, 'build');

test('an installed tbagent: busted and luacheck run with no flags in a folder of user scripts', { timeout: 120000 }, () => {
  const dir = tmpdir('tbitest-user-');
  const prefix = path.join(dir, 'prefix');
  execFileSync('cmake', ['--install', build, '--prefix', prefix], { stdio: 'pipe' });
  const user = path.join(dir, 'pump');
  fs.mkdirSync(path.join(user, 'spec'), { recursive: true });
  fs.copyFileSync(path.join(root, '.busted'), path.join(user, '.busted'));
  fs.copyFileSync(path.join(root, '.luacheckrc'), path.join(user, '.luacheckrc'));
  fs.copyFileSync(path.join(root, 'examples/thermostat.lua'), path.join(user, 'thermostat.lua'));
  const spec = fs.readFileSync(path.join(root, 'spec/thermostat_spec.lua'), 'utf8').replaceAll('examples/thermostat.lua', 'thermostat.lua');
  fs.writeFileSync(path.join(user, 'spec/thermostat_spec.lua'), spec);
  const env = {
    ...process.env,
    LUA_PATH_5_4: `${prefix}/share/lua/5.4/?.lua;${prefix}/share/lua/5.4/?/init.lua;;`,
    LUA_CPATH_5_4: `${prefix}/lib/lua/5.4/?.so;;`,
  };
  const busted = spawnSync('busted', [], { cwd: user, env, encoding: 'utf8', timeout: 60000 });
  assert.equal(busted.status, 0, `busted failed:\n${busted.stdout}\n${busted.stderr}`);
  const ok = /(\d+) success/.exec(busted.stdout);
  assert.ok(ok && Number(ok[1]) >= 5, `busted ran too few specs:\n${busted.stdout}`);
  assert.match(busted.stdout, /0 failures \/ 0 errors/);
  // the spec really runs on the installed library: without it, require fails
  const bare = spawnSync('busted', [], { cwd: user, env: { ...process.env, LUA_PATH_5_4: ';;', LUA_CPATH_5_4: ';;' }, encoding: 'utf8', timeout: 60000 });
  if (!fs.existsSync('/usr/local/share/lua/5.4/tb') && !fs.existsSync('/usr/share/lua/5.4/tb')) {
    assert.notEqual(bare.status, 0, 'busted passed without the installed tb library');
  }
  const lc = spawnSync('luacheck', ['.'], { cwd: user, encoding: 'utf8', timeout: 60000 });
  assert.equal(lc.status, 0, `luacheck failed:\n${lc.stdout}\n${lc.stderr}`);
  // and the installed binary checks the script
  const chk = spawnSync(path.join(prefix, 'bin/tbagent'), ['check', 'thermostat.lua'], { cwd: user, encoding: 'utf8', timeout: 30000 });
  assert.equal(chk.status, 0, chk.stderr);
});
