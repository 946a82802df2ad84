// Item 6: JSON end to end, both directions, exactly as the contract says.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { world, canon, tele, evalLua, EVAL_SCRIPT } from './lib.mjs';

const T = 'v1/devices/me/telemetry';

describe('JSON on the wire', () => {
  const w = world({ after });
  let server, agent;
  before(async () => {
    ({ server, agent } = await w.device(EVAL_SCRIPT));
  });

  async function wire(luaValue) {
    const from = server.mark();
    const r = await evalLua(server, `return tb.send_telemetry({v = ${luaValue}})`);
    assert.equal(r.text, 'true', r.text);
    const m = await server.waitFor(T, () => true, 3000, from);
    return tele(m);
  }

  test('integers keep all 64 bits, floats stay doubles', async () => {
    const cases = [
      ['42.0', '{"v":42.0}'],
      ['42', '{"v":42}'],
      ['-0.0', null],
      ['math.maxinteger', '{"v":9223372036854775807}'],
      ['math.mininteger', '{"v":-9223372036854775808}'],
      ['9007199254740993', '{"v":9007199254740993}'],
      ['0.1', '{"v":0.1}'],
      ['1e300', null],
      ['2^53', null],
      ['1/3', null],
    ];
    for (const [luaValue, expected] of cases) {
      const text = await wire(luaValue);
      if (expected) {
        assert.equal(text, expected, `${luaValue} -> ${text}`);
      } else {
        // a float must be stored as a double: ThingsBoard takes 1e+15 for a LONG and 1e+20
        // for a STRING, so floats go positional, with a '.' and no exponent
        const num = /^\{"v":(.*)\}$/.exec(text)[1];
        assert.match(num, /^-?\d+\.\d+$/, `${luaValue} -> ${text} would not be stored as DOUBLE`);
      }
    }
    // and round-trip precisely
    const r = await evalLua(server, 'return {third = tostring(tb.json.decode(tb.json.encode(1/3)) == 1/3), big = tostring(tb.json.decode(tb.json.encode(1e300)) == 1e300)}');
    assert.deepEqual(r.json, { third: 'true', big: 'true' });
  });

  test('strings: escapes and unicode survive', async () => {
    const text = await wire('"quote\\" backslash\\\\ tab\\t nl\\n ctrl\\1 é ✓ 😀"');
    assert.equal(JSON.parse(text).v, 'quote" backslash\\ tab\t nl\n ctrl\u0001 é ✓ 😀');
  });

  test('nested tables, empty arrays via tb.json.array, null via tb.json.null', async () => {
    const text = await wire('{list = {1, 2.5, "x", true}, empty = tb.json.array(), obj = {k = tb.json.null}}');
    assert.equal(canon(text), canon('{"v":{"empty":[],"list":[1,2.5,"x",true],"obj":{"k":null}}}'));
  });

  test('decoding from the server: integers are integers, other numbers floats', async () => {
    let r = await server.rpc('types', undefined, {
      raw: '{"method":"types","params":{"i":9007199254740993,"neg":-9223372036854775808,"f":42.0,"e":1e3,"big":12345678901234567890,"s":"7","n":null}}',
    });
    assert.deepEqual(r.json, { i: 'integer', neg: 'integer', f: 'float', e: 'float', big: 'float', s: 'string', n: 'userdata' });
    r = await server.rpc('echo', undefined, { raw: '{"method":"echo","params":{"i":9007199254740993,"f":42.0,"l":[1,2.0,[]],"o":{}}}' });
    assert.equal(canon(r.text), canon('{"f":42.0,"i":9007199254740993,"l":[1,2.0,[]],"o":{}}'));
  });

  test('NaN and infinities are refused with nil, err and nothing is published', async () => {
    const from = server.mark();
    for (const bad of ['0/0', 'math.huge', '-math.huge', '{nested = {0/0}}']) {
      const r = await evalLua(server, `local ok, err = tb.send_telemetry({x = ${bad}}); return {ok = ok or false, err = err or false}`);
      assert.equal(r.json.ok, false, `${bad}: ${r.text}`);
      assert.match(String(r.json.err), /nan|inf|finite|number/i, `${bad}: ${r.text}`);
      const a = await evalLua(server, `local ok, err = tb.send_attributes({x = ${bad}}); return {ok = ok or false, err = err or false}`);
      assert.equal(a.json.ok, false, `${bad}: ${a.text}`);
    }
    const e = await evalLua(server, 'local s, err = tb.json.encode(0/0); return {s = s or false, err = err or false}');
    assert.equal(e.json.s, false);
    assert.ok(e.json.err);
    await server.expectNone(/^v1\/devices\/me\/(telemetry|attributes)$/, () => true, 300, from);
    assert.ok(agent.running());
  });

  test('invalid UTF-8 and unencodable values are refused, not sent', async () => {
    const from = server.mark();
    for (const bad of ['"\\xff\\xfe"', 'print', '{[{}] = 1}']) {
      const r = await evalLua(server, `local ok, err = tb.send_telemetry({x = ${bad}}); return {ok = ok or false, err = err or false}`);
      assert.equal(r.json.ok, false, `${bad}: ${r.text}`);
      assert.ok(r.json.err, r.text);
    }
    const cyc = await evalLua(server, 'local t = {}; t.self = t; local ok, err = tb.send_telemetry({x = t}); return {ok = ok or false, err = err or false}');
    assert.equal(cyc.json.ok, false, cyc.text);
    await server.expectNone(T, () => true, 300, from);
  });

  test('an RPC result that cannot be encoded still answers valid JSON', async () => {
    const r = await evalLua(server, 'return {x = 0/0}');
    assert.ok(r.json && typeof r.json.error === 'string', r.text);
  });
});
