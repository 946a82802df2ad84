/* Tests of the wire JSON codec (json.c) through the Lua functions it registers and through
 * its C entries: every rule of the README's "tb.json.encode" and the codec's brief, plus
 * round trips of random doubles and integers and clean failures on hostile input. */
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "core.h"
#include "json.h"
#include <lualib.h>

static lua_State *L;

/* Globals for the snippets: core, null, mt; show(v) prints a decoded value with its types
 * (integers bare, floats as f<%.17g>, arrays only when they carry the array metatable);
 * E(v) and D(text) give the JSON text / shown value, or "ERR <message>". */
static const char helpers[] =
  "core = ...\n"
  "null, mt = core.json_null, core.json_array_mt\n"
  "function show(v)\n"
  "  local t = type(v)\n"
  "  if t == 'number' then\n"
  "    if math.type(v) == 'integer' then return string.format('%d', v) end\n"
  "    return 'f' .. string.format('%.17g', v)\n"
  "  elseif t == 'string' then\n"
  "    return '\"' .. v:gsub('[^\\32-\\126]', function(c)\n"
  "      return string.format('\\\\%d', c:byte()) end) .. '\"'\n"
  "  elseif v == null then return 'null'\n"
  "  elseif t == 'table' then\n"
  "    local parts = {}\n"
  "    if getmetatable(v) == mt then\n"
  "      for i = 1, #v do parts[i] = show(v[i]) end\n"
  "      return '[' .. table.concat(parts, ',') .. ']'\n"
  "    end\n"
  "    local keys = {}\n"
  "    for k in pairs(v) do keys[#keys + 1] = k end\n"
  "    table.sort(keys)\n"
  "    for i, k in ipairs(keys) do parts[i] = k .. '=' .. show(v[k]) end\n"
  "    return '{' .. table.concat(parts, ',') .. '}'\n"
  "  end\n"
  "  return tostring(v)\n"
  "end\n"
  "function E(v)\n"
  "  local s, err = core.json_encode(v)\n"
  "  if s == nil then return 'ERR ' .. err end\n"
  "  return s\n"
  "end\n"
  "function D(text)\n"
  "  local v, err = core.json_decode(text)\n"
  "  if v == nil then return 'ERR ' .. err end\n"
  "  return show(v)\n"
  "end\n";

static char out[1 << 16];

static const char *result(int status) {
  size_t n;
  const char *s;
  if (status != LUA_OK) {
    snprintf(out, sizeof out, "LUA ERROR: %s", lua_tostring(L, -1));
  } else {
    s = luaL_tolstring(L, -1, &n);
    snprintf(out, sizeof out, "%s", s);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return out;
}

/* Runs a Lua chunk and returns its first result as text. */
static const char *run(const char *code) {
  int status = luaL_loadstring(L, code);
  if (status == LUA_OK) status = lua_pcall(L, 0, 1, 0);
  return result(status);
}

/* E(<Lua expression>) */
static const char *enc(const char *expr) {
  char code[4096];
  snprintf(code, sizeof code, "return E(%s)", expr);
  return run(code);
}

/* D(text) on the exact bytes given. */
static const char *decn(const char *text, size_t n) {
  lua_getglobal(L, "D");
  lua_pushlstring(L, text, n);
  return result(lua_pcall(L, 1, 1, 0));
}

static const char *dec(const char *text) {
  return decn(text, strlen(text));
}

#define Z10 "0000000000"
#define Z100 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10

/* tb_values: at most 16 digits after the point, which ThingsBoard stores as DOUBLE */
static const char *enc_tb(const char *expr) {
  char code[4096];
  snprintf(code, sizeof code, "local s, err = core.json_encode(%s, nil, true) return s or 'ERR ' .. err", expr);
  return run(code);
}

static void test_encode_tb_values(void) {
  static const struct check_case encode_tb_values[] = {
    {"0.1 + 0.2", "0.3"},
    {"21.700000000000003", "21.700000000000003"},
    {"1/3", "0.3333333333333333"},
    {"2/3", "0.6666666666666666"},
    {"-2/3", "-0.6666666666666666"},
    {"1e-17", "0.0"},
    {"-1e-17", "-0.0"},
    {"1.5e-7", "0.00000015"},
    {"1e15", "1000000000000000.0"},
    {"1e20", "100000000000000000000.0"},
    {"42.0", "42.0"},
    {"42", "42"},
    {"{t = {0.1 + 0.2, 1e-20}}", "{\"t\":[0.3,0.0]}"},
  };
  CHECK_CASES(enc_tb, encode_tb_values);
}

/* Floats go in positional notation with a '.', never an exponent (json.c enc_float). */
static void test_encode_numbers(void) {
  static const struct check_case encode_numbers[] = {
    {"0", "0"},
    {"-1", "-1"},
    {"math.maxinteger", "9223372036854775807"},
    {"math.mininteger", "-9223372036854775808"},
    {"9007199254740993", "9007199254740993"},
    {"42.0", "42.0"},
    {"0.1", "0.1"},
    {"1e300", "1" Z100 Z100 Z100 ".0"},
    {"-0.0", "-0.0"},
    {"0.0", "0.0"},
    {"1.5", "1.5"},
    {"-2.5e-10", "-0.00000000025"},
    {"1/3", "0.3333333333333333"},
    {"2^53", "9007199254740992.0"},
    {"1e21", "1000000000000000000000.0"},
    {"1e15", "1000000000000000.0"},
    {"-1e20", "-100000000000000000000.0"},
    {"1.5e-7", "0.00000015"},
    {"123456789.125", "123456789.125"},
    {"math.pi", "3.141592653589793"},
    {"0.1 + 0.2", "0.30000000000000004"},
    {"2^-1074", "0." Z100 Z100 Z100 Z10 Z10 "000" "494065645841247"},
    {"1.7976931348623157e308", "17976931348623157" Z100 Z100 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 "00.0"},
    {"0/0", "ERR cannot encode NaN"},
    {"-(0/0)", "ERR cannot encode NaN"},
    {"math.huge", "ERR cannot encode inf"},
    {"-math.huge", "ERR cannot encode inf"},
    {"{a = {b = 0/0}}", "ERR cannot encode NaN at .a.b"},
    {"{1, 2, {x = math.huge}}", "ERR cannot encode inf at [3].x"},
    {"{v = {ok = 1, bad = print}}", "ERR cannot encode function at .v.bad"},
    {"{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{0/0}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}}",
     "ERR cannot encode NaN at ...[1][1][1][1][1][1][1][1][1][1][1][1][1][1][1][1][1][1][1][1]"
     "[1][1][1][1][1][1][1][1][1][1][1]"},
  };
  CHECK_CASES(enc, encode_numbers);
}

static void test_encode_strings(void) {
  static const struct check_case encode_strings[] = {
    {"''", "\"\""},
    {"'plain/text'", "\"plain/text\""},
    {"'q\"b\\\\'", "\"q\\\"b\\\\\""},
    {"'\\n\\r\\t\\b\\f'", "\"\\n\\r\\t\\b\\f\""},
    {"'\\0\\1\\31\\127'", "\"\\u0000\\u0001\\u001f\x7f\""},
    {"'h\\u{e9}llo \\u{20ac} \\u{1d11e}'", "\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9d\x84\x9e\""},
    {"'\\u{7f}\\u{80}\\u{7ff}\\u{800}\\u{ffff}\\u{10000}\\u{10ffff}'",
     "\"\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf\""},
    {"'\\xff'", "ERR invalid UTF-8 in string"},
    {"'\\x80'", "ERR invalid UTF-8 in string"},
    {"'\\xc0\\x80'", "ERR invalid UTF-8 in string"}, /* overlong NUL */
    {"'\\xc1\\xbf'", "ERR invalid UTF-8 in string"}, /* overlong */
    {"'\\xe0\\x9f\\xbf'", "ERR invalid UTF-8 in string"}, /* overlong */
    {"'\\xf0\\x8f\\xbf\\xbf'", "ERR invalid UTF-8 in string"},
    {"'\\xed\\xa0\\x80'", "ERR invalid UTF-8 in string"}, /* surrogate */
    {"'\\xf4\\x90\\x80\\x80'", "ERR invalid UTF-8 in string"}, /* > U+10FFFF */
    {"'\\xf5\\x80\\x80\\x80'", "ERR invalid UTF-8 in string"},
    {"'ok\\xe2\\x82'", "ERR invalid UTF-8 in string"}, /* truncated */
    {"'\\xe2\\x28\\xa1'", "ERR invalid UTF-8 in string"},
    {"{k = 'a\\xff'}", "ERR invalid UTF-8 in string at .k"},
    {"{['\\xff'] = 1}", "ERR invalid UTF-8 in string"},
  };
  CHECK_CASES(enc, encode_strings);
  /* long strings and many escapes grow the buffer past its first kilobyte */
  CHECK_STR(run("local s = string.rep('ab\\n\\0', 5000)\n"
                "return E(s) == '\"' .. string.rep('ab\\\\n\\\\u0000', 5000) .. '\"'"),
            "true");
  CHECK_STR(run("local s = string.rep('\\u{1d11e}', 30000) return E(s) == '\"' .. s .. '\"'"), "true");
}

#define MIXED "ERR cannot encode table with mixed or non-string keys"

static void test_encode_tables(void) {
  static const struct check_case encode_tables[] = {
    {"nil", "null"},
    {"null", "null"},
    {"true", "true"},
    {"false", "false"},
    {"{}", "{}"},
    {"setmetatable({}, mt)", "[]"},
    {"{1, 2, 3}", "[1,2,3]"},
    {"setmetatable({1, 'a'}, mt)", "[1,\"a\"]"},
    {"{a = 1}", "{\"a\":1}"},
    {"{[''] = {}}", "{\"\":{}}"},
    {"{x = {1.0, null, {}}}", "{\"x\":[1.0,null,{}]}"},
    {"{null, null}", "[null,null]"},
    {"{[3] = 'c', [1] = 'a', [2] = 'b'}", "[\"a\",\"b\",\"c\"]"},
    {"{[1.0] = 'a'}", "[\"a\"]"}, /* Lua normalises the key to an integer */
    {"{1, a = 2}", MIXED},
    {"{a = 2, 1}", MIXED},
    {"{1, nil, 3}", MIXED},
    {"{[2] = 1}", MIXED},
    {"{[0] = 1}", MIXED},
    {"{[-1] = 1}", MIXED},
    {"{[1.5] = 1}", MIXED},
    {"{[true] = 1}", MIXED},
    {"{[{}] = 1}", MIXED},
    {"{[1] = 1, [3] = 3}", MIXED},
    {"setmetatable({a = 1}, mt)", MIXED},
    {"{a = {[2] = 0}}", MIXED " at .a"},
    {"print", "ERR cannot encode function"},
    {"coroutine.create(print)", "ERR cannot encode thread"},
    {"io.stdout", "ERR cannot encode userdata"},
    {"{f = io.stdout}", "ERR cannot encode userdata at .f"},
    /* metamethods are not consulted: tables are read raw */
    {"setmetatable({}, {__index = function() return 1 end, __len = function() return 3 end})", "{}"},
    {"setmetatable({a = 1}, {__pairs = function() error('no') end})", "{\"a\":1}"},
  };
  CHECK_CASES(enc, encode_tables);
  CHECK_STR(run("local t = {a = 1, b = 'x', c = {true}} local s = E(t)\n"
                "return #s == #'{\"a\":1,\"b\":\"x\",\"c\":[true]}' and show(core.json_decode(s))"),
            "{a=1,b=\"x\",c=[true]}");
  CHECK_STR(run("local t = {} for i = 1, 1000 do t[i] = i * 1000 end\n"
                "return E(t) == '[' .. table.concat(t, ',') .. ']'"),
            "true");
  CHECK_STR(run("local t = {} for i = 1, 300 do t['k' .. i] = i end\n"
                "local back = core.json_decode(E(t)) for k, v in pairs(t) do\n"
                "  if back[k] ~= v then return k end end\n"
                "for k in pairs(back) do if t[k] == nil then return k end end return 'same'"),
            "same");
  /* failures return exactly nil, a message and a code; misuse raises like Lua */
  CHECK_STR(run("return select('#', core.json_encode(0/0)) == 3 and"
                " select(1, core.json_encode(0/0)) == nil and"
                " select(3, core.json_encode(0/0)) == 'not_finite'"),
            "true");
  CHECK_STR(run("local ok, e = pcall(function() local r = core.json_encode() return r end)\n"
                "return e:match('bad argument.*')"),
            "bad argument #1 to 'json_encode' (value expected)");
}

static void test_encode_depth(void) {
  CHECK_STR(run("local t = 1 for i = 1, 128 do t = {t} end\n"
                "return E(t) == string.rep('[', 128) .. '1' .. string.rep(']', 128)"),
            "true");
  CHECK_STR(run("local t = 1 for i = 1, 129 do t = {t} end return E(t)"), "ERR nesting too deep");
  CHECK_STR(run("local t = {} for i = 1, 127 do t = {a = t} end\n"
                "return E(t) == string.rep('{\"a\":', 127) .. '{}' .. string.rep('}', 127)"),
            "true");
  CHECK_STR(run("local t = {} for i = 1, 128 do t = {a = t} end return E(t)"),
            "ERR nesting too deep");
  CHECK_STR(run("local t = {} t.self = t return E(t)"), "ERR nesting too deep");
  CHECK_STR(run("local t = {} t[1] = t return E(t)"), "ERR nesting too deep");
}

static void test_decode_numbers(void) {
  static const struct check_case decode_numbers[] = {
    {"42", "42"},
    {"-7", "-7"},
    {"0", "0"},
    {"-0", "0"},
    {"999999999999999999", "999999999999999999"},
    {"1000000000000000000", "1000000000000000000"},
    {"9223372036854775807", "9223372036854775807"},
    {"-9223372036854775808", "-9223372036854775808"},
    {"9007199254740993", "9007199254740993"},
    {"9223372036854775808", "f9.2233720368547758e+18"},
    {"-9223372036854775809", "f-9.2233720368547758e+18"},
    {"12345678901234567890", "f1.2345678901234567e+19"},
    {"42.0", "f42"},
    {"-0.0", "f-0"},
    {"1e3", "f1000"},
    {"4.2E1", "f42"},
    {"1E+2", "f100"},
    {"1e-2", "f0.01"},
    {"0.1", "f0.10000000000000001"},
    {"1e400", "finf"},
    {"-1e400", "f-inf"},
    {"1e-400", "f0"},
    {"0.12345678901234567", "f0.12345678901234566"},
    {"01", "ERR invalid JSON at byte 2: trailing garbage"},
    {"-", "ERR invalid JSON at byte 2: unexpected end"},
    {"-a", "ERR invalid JSON at byte 2: bad number"},
    {"1.", "ERR invalid JSON at byte 3: unexpected end"},
    {"1.e5", "ERR invalid JSON at byte 3: bad number"},
    {"1e", "ERR invalid JSON at byte 3: unexpected end"},
    {"1e+", "ERR invalid JSON at byte 4: unexpected end"},
    {"[1ex]", "ERR invalid JSON at byte 4: bad number"},
    {".5", "ERR invalid JSON at byte 1: unexpected character"},
    {"+1", "ERR invalid JSON at byte 1: unexpected character"},
    {"0x10", "ERR invalid JSON at byte 2: trailing garbage"},
    {"NaN", "ERR invalid JSON at byte 1: unexpected character"},
    {"-Infinity", "ERR invalid JSON at byte 2: bad number"},
    {"[1,2 3]", "ERR invalid JSON at byte 6: expected ',' or ']'"},
  };
  CHECK_CASES(dec, decode_numbers);
  CHECK_STR(run("local s = '0.' .. string.rep('0', 300) .. '1e301' return D(s)"), "f1");
  CHECK_STR(run("local s = string.rep('9', 400) return D(s)"), "finf");
}

static void test_decode_strings(void) {
  static const struct check_case decode_strings[] = {
    {"\"\"", "\"\""},
    {"\"abc\"", "\"abc\""},
    {"\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\"\\/\\8\\12\\10\\13\\9\""},
    {"\"\\u0041\\u00e9\\u20AC\"", "\"A\\195\\169\\226\\130\\172\""},
    {"\"\\ud834\\udd1e\"", "\"\\240\\157\\132\\158\""},
    {"\"\\uDBFF\\uDFFF\"", "\"\\244\\143\\191\\191\""},
    {"\"a\\u0000b\"", "\"a\\0b\""},
    {"\"h\xc3\xa9 \xf0\x9d\x84\x9e\"", "\"h\\195\\169 \\240\\157\\132\\158\""},
    {"\"\xef\xbb\xbf\"", "\"\\239\\187\\191\""},
    {"\"\\ud800\"", "ERR invalid JSON at byte 2: lone surrogate"},
    {"\"\\udc00\"", "ERR invalid JSON at byte 2: lone surrogate"},
    {"\"ab\\ud800\\u0041\"", "ERR invalid JSON at byte 4: lone surrogate"},
    {"\"\\ud800\\ud800\"", "ERR invalid JSON at byte 2: lone surrogate"},
    {"\"\\ud800x\"", "ERR invalid JSON at byte 2: lone surrogate"},
    {"{\"abc\": \"x\\qy\"}", "ERR invalid JSON at byte 11: bad escape"},
    {"\"\\u12G4\"", "ERR invalid JSON at byte 2: bad escape"},
    {"\"\\u12\"", "ERR invalid JSON at byte 2: bad escape"},
    {"\"\\x41\"", "ERR invalid JSON at byte 2: bad escape"},
    {"\"\\U0041\"", "ERR invalid JSON at byte 2: bad escape"},
    {"\"a\tb\"", "ERR invalid JSON at byte 3: control character in string"},
    {"\"\\n\nb\"", "ERR invalid JSON at byte 4: control character in string"},
    {"\"a\xff\"", "ERR invalid JSON at byte 3: invalid UTF-8"},
    {"\"\\t\xc0\x80\"", "ERR invalid JSON at byte 4: invalid UTF-8"},
    {"\"\xed\xa0\x80\"", "ERR invalid JSON at byte 2: invalid UTF-8"},
    {"\"\xf4\x90\x80\x80\"", "ERR invalid JSON at byte 2: invalid UTF-8"},
    {"\"\xe2\x82\"", "ERR invalid JSON at byte 2: invalid UTF-8"},
    {"\"abc", "ERR invalid JSON at byte 5: unexpected end"},
    {"\"ab\\", "ERR invalid JSON at byte 5: unexpected end"},
    {"\"ab\\\"", "ERR invalid JSON at byte 6: unexpected end"},
    {"\xff", "ERR invalid JSON at byte 1: unexpected character"},
    {"'a'", "ERR invalid JSON at byte 1: unexpected character"},
  };
  CHECK_CASES(dec, decode_strings);
  CHECK_STR(decn("\"a\0b\"", 5), "ERR invalid JSON at byte 3: control character in string");
  /* long strings, escaped and not, and every escape round trip */
  CHECK_STR(run("local s = string.rep('x\\\\n', 10000) local v = core.json_decode('\"' .. s .. '\"')\n"
                "return v == string.rep('x\\n', 10000)"),
            "true");
  CHECK_STR(run("local parts = {} for c = 0, 255 do parts[#parts + 1] = string.char(c) end\n"
                "local s = table.concat(parts):gsub('[\\128-\\255]', '') .. '\\u{7ff}\\u{ffff}\\u{10ffff}'\n"
                "return core.json_decode(E(s)) == s"),
            "true");
}

static void test_decode_structure(void) {
  static const struct check_case decode_structure[] = {
    {"true", "true"},
    {"false", "false"},
    {"null", "null"},
    {"\"top\"", "\"top\""},
    {" \t\n\r 1 \r\n\t ", "1"},
    {"[]", "[]"},
    {"[ ]", "[]"},
    {"{}", "{}"},
    {" { } ", "{}"},
    {"[1, \"a\", null, true, [], {}, 2.5]", "[1,\"a\",null,true,[],{},f2.5]"},
    {"{\"a\": null, \"b\": [null]}", "{a=null,b=[null]}"},
    {"{\"a\":1,\"a\":2}", "{a=2}"},
    {"{\"\":0}", "{=0}"},
    {"", "ERR empty JSON text"},
    {" \n\t\r ", "ERR empty JSON text"},
    {"\f1", "ERR invalid JSON at byte 1: unexpected character"},
    {"1 2", "ERR invalid JSON at byte 3: trailing garbage"},
    {"{}x", "ERR invalid JSON at byte 3: trailing garbage"},
    {"[1]]", "ERR invalid JSON at byte 4: trailing garbage"},
    {"nul", "ERR invalid JSON at byte 4: unexpected end"},
    {"nulx", "ERR invalid JSON at byte 4: unexpected character"},
    {"True", "ERR invalid JSON at byte 1: unexpected character"},
    {"truefalse", "ERR invalid JSON at byte 5: trailing garbage"},
    {"[", "ERR invalid JSON at byte 2: unexpected end"},
    {"[1,]", "ERR invalid JSON at byte 4: unexpected character"},
    {"[,1]", "ERR invalid JSON at byte 2: unexpected character"},
    {"{\"a\" 1}", "ERR invalid JSON at byte 6: expected ':'"},
    {"{\"a\":1,}", "ERR invalid JSON at byte 8: expected string key"},
    {"{a:1}", "ERR invalid JSON at byte 2: expected string key"},
    {"{\"a\":1 \"b\":2}", "ERR invalid JSON at byte 8: expected ',' or '}'"},
    {"{\"a\":", "ERR invalid JSON at byte 6: unexpected end"},
    {"{\"a\"", "ERR invalid JSON at byte 5: unexpected end"},
    {"{\"a\":1", "ERR invalid JSON at byte 7: unexpected end"},
  };
  CHECK_CASES(dec, decode_structure);
  CHECK_STR(run("return core.json_decode('null') == core.json_null"), "true");
  CHECK_STR(run("local v = core.json_decode('{\"a\":null}')\n"
                "return v.a == core.json_null and next(v) == 'a'"),
            "true");
  CHECK_STR(run("return getmetatable(core.json_decode('[1]')) == mt and"
                " getmetatable(core.json_decode('{}')) == nil"),
            "true");
  CHECK_STR(run("return E(core.json_decode('[]')) .. E(core.json_decode('{}'))"
                " .. E(core.json_decode('{\"a\":[],\"b\":{},\"c\":null}').a)"),
            "[]{}[]");
  /* past the batch sizes: arrays of 32 and objects of 16 go straight into the table */
  CHECK_STR(run("for n = 1, 100 do local t = {} for i = 1, n do t[i] = i end\n"
                "  local v = core.json_decode(E(t))\n"
                "  if #v ~= n or getmetatable(v) ~= mt then return n end\n"
                "  for i = 1, n do if v[i] ~= i then return n end end\n"
                "end return 'ok'"),
            "ok");
  CHECK_STR(run("for n = 1, 60 do local parts = {}\n"
                "  for i = 1, n do parts[i] = string.format('\"k%d\":%d', i, i) end\n"
                "  parts[n + 1] = '\"k1\":0'\n"
                "  local v = core.json_decode('{' .. table.concat(parts, ',') .. '}')\n"
                "  local c = 0 for k in pairs(v) do c = c + 1 end\n"
                "  if c ~= n or v.k1 ~= 0 or v['k' .. n] ~= (n == 1 and 0 or n) then return n end\n"
                "end return 'ok'"),
            "ok");
  CHECK_STR(run("return select('#', core.json_decode('x')) == 2 and"
                " select(1, core.json_decode('x')) == nil"),
            "true");
  CHECK_STR(run("local ok, e = pcall(function() local r = core.json_decode() return r end)\n"
                "return e:match('bad argument.*')"),
            "bad argument #1 to 'json_decode' (string expected, got no value)");
  CHECK_STR(run("return core.json_decode(42)"), "42");
}

static void test_decode_depth(void) {
  CHECK_STR(run("return D(string.rep('[', 128) .. string.rep(']', 128)) =="
                " string.rep('[', 128) .. string.rep(']', 128)"),
            "true");
  CHECK_STR(run("return D(string.rep('[', 129) .. string.rep(']', 129))"), "ERR nesting too deep");
  CHECK_STR(run("return D(string.rep('{\"a\":', 127) .. '{}' .. string.rep('}', 127)):sub(1, 6)"),
            "{a={a=");
  CHECK_STR(run("return D(string.rep('{\"a\":', 128) .. '{}' .. string.rep('}', 128))"),
            "ERR nesting too deep");
  CHECK_STR(run("return D(string.rep('[', 100000))"), "ERR nesting too deep");
  CHECK_STR(run("return D(string.rep('{\"a\":[', 100000))"), "ERR nesting too deep");
  /* deep values under full batches use the most Lua stack per level */
  CHECK_STR(run("local s = string.rep('[' .. string.rep('1,', 31), 127) .. '1'\n"
                "s = s .. string.rep(']', 127) local v = core.json_decode(s)\n"
                "local d = 0 while type(v) == 'table' do d = d + 1 v = v[32] end return d"),
            "127");
}

/* xorshift64*, so failures reproduce */
static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static uint64_t rng(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1Du;
}

/* bits with the exponent of a random power of two, 2^min .. 2^(min + span - 1) */
static uint64_t with_exponent(uint64_t bits, int min, int span) {
  return (bits & 0x800FFFFFFFFFFFFFu) | ((uint64_t)(1023 + min + (int)(rng() % span)) << 52);
}

/* Replaces the value on top of the stack with the text core.json_encode gives for it (the
 * module table at index core), with tb_values as asked. */
static void encode_top(int core, int tb_values) {
  lua_getfield(L, core, "json_encode");
  lua_insert(L, -2);
  if (tb_values) {
    lua_pushnil(L);
    lua_pushboolean(L, 1);
  }
  lua_call(L, tb_values ? 3 : 1, 1);
}

/* Replaces the text on top of the stack with the value core.json_decode reads from it. */
static void decode_top(int core) {
  lua_getfield(L, core, "json_decode");
  lua_insert(L, -2);
  lua_call(L, 1, 1);
}

/* check_round_trips(n, one): one(i, core, bad) for i = 0 .. n-1, with the module table at
 * index core and the stack reset after each; it returns how many ways case i failed (and says
 * so on stderr while bad, the failures so far, is under 5). One check: no case failed. */
static void check_round_trips(int n, int (*one)(int i, int core, int bad)) {
  int bad = 0, base = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, "test.core");
  for (int i = 0; i < n; i++) {
    bad += one(i, base + 1, bad);
    lua_settop(L, base + 1);
  }
  lua_settop(L, base);
  CHECK(bad == 0);
}

/* decode(encode(x)) == x bit for bit, through the Lua functions, for random finite doubles */
static int double_round_trip(int i, int core, int bad) {
  uint64_t bits = rng(), back_bits;
  double x, back;
  const char *text;
  if (i % 4 == 1) bits &= ~(uint64_t)0x7FF0000000000000u;  /* subnormals and zeros */
  if (i % 4 == 2) bits = with_exponent(bits, -60, 120);
  memcpy(&x, &bits, sizeof x);
  if (!isfinite(x)) return 0;
  lua_pushnumber(L, x);
  encode_top(core, 0);
  text = lua_tostring(L, -1);
  if (!text || !strchr(text, '.') || strpbrk(text, "eE")) {
    if (bad < 5) fprintf(stderr, "double %a encoded as %s\n", x, text ? text : "nothing");
    return 1;
  }
  decode_top(core);
  back = lua_tonumber(L, -1);
  memcpy(&back_bits, &back, sizeof back);
  if (lua_isinteger(L, -1) || back_bits != bits) {
    if (bad < 5) fprintf(stderr, "double %a did not round-trip\n", x);
    return 1;
  }
  return 0;
}

/* The fast path of tb_json_float_text (common decimals without printf) writes exactly the
 * text of the slow path: on decimals it is meant for (random digits with random decimals,
 * both signs), on their neighbours one ulp away, and on random bit patterns. */
static void test_fast_float_text(int n) {
  static const double pow10[] = {1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                                 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18};
  char fast[TB_JSON_FLOAT_MAX + 1], slow[TB_JSON_FLOAT_MAX + 1];
  int bad = 0, taken = 0;
  for (int i = 0; i < n; i++) {
    double x;
    uint64_t r = rng();
    if (i % 3 == 2) {
      uint64_t bits = r;
      memcpy(&x, &bits, sizeof x);
      if (!isfinite(x)) continue;
    } else {
      int digits = 1 + (int)(r % 17), decimals = (int)((r >> 8) % 19);
      uint64_t m = rng() % (uint64_t)pow10[digits];
      x = (double)m / pow10[decimals];
      if (r & (1u << 20)) x = -x;
      if (i % 3 == 1) x = nextafter(x, (r >> 21) & 1 ? INFINITY : -INFINITY);
    }
    for (int tb = 0; tb <= 1; tb++) {
      size_t nf = tb_json_float_text(x, tb, 1, fast), ns = tb_json_float_text(x, tb, 0, slow);
      fast[nf] = slow[ns] = 0;
      if (nf != ns || memcmp(fast, slow, nf) != 0) {
        if (bad++ < 5) fprintf(stderr, "%a: fast %s, slow %s\n", x, fast, slow);
      }
    }
    if (tb_json_short_decimal(x, fast) > 0) taken++;
  }
  CHECK(bad == 0);
  CHECK(taken > n / 4);   /* the comparison reached the fast path, not only the fallback */
}

/* With tb_values every float has 1..16 digits after its '.' (ThingsBoard keeps more than 16
 * as a STRING), reads back within 5e-17 plus the half ulp of reading the decimal back, and
 * for |x| >= 0.5 reads back bit for bit. */
static int tb_value_round_trip(int i, int core, int bad) {
  uint64_t bits = rng();
  double x, back;
  const char *text, *point;
  char copy[64];
  if (i % 3 == 1) bits = with_exponent(bits, -60, 80);
  if (i % 3 == 2) bits = with_exponent(bits, -2, 12);
  memcpy(&x, &bits, sizeof x);
  if (!isfinite(x)) return 0;
  lua_pushnumber(L, x);
  encode_top(core, 1);
  text = lua_tostring(L, -1);
  point = text ? strchr(text, '.') : NULL;
  if (!point || strpbrk(text, "eE") || strlen(point + 1) < 1 || strlen(point + 1) > 16) {
    if (bad < 5) fprintf(stderr, "tb value %a encoded as %s\n", x, text ? text : "nothing");
    return 1;
  }
  snprintf(copy, sizeof copy, "%s", text);
  decode_top(core);
  back = lua_tonumber(L, -1);
  if (fabs(x) >= 0.5 ? back != x : fabs(back - x) > 5.0000001e-17 + fabs(x) * 0x1p-53) {
    if (bad < 5) fprintf(stderr, "tb value %a came back as %a (%s)\n", x, back, copy);
    return 1;
  }
  return 0;
}

/* random 64-bit integers: the exact decimal text, read back as the same integer */
static int integer_round_trip(int i, int core, int bad) {
  lua_Integer v = (lua_Integer)(rng() >> (rng() % 64));
  char want[32];
  int failed = 0;
  (void)bad;
  if (i & 1) v = -v;
  snprintf(want, sizeof want, "%lld", (long long)v);
  lua_pushinteger(L, v);
  encode_top(core, 0);
  if (strcmp(lua_tostring(L, -1), want) != 0) failed++;
  decode_top(core);
  if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) != v) failed++;
  return failed;
}

/* Every prefix and many mutations of a document must fail or succeed cleanly (the sanitizers
 * catch any read past the end), with the stack balanced. */
static void test_hostile_input(void) {
  static const char doc[] =
    "{\"a\":[1,-2.5e+3,\"x\\u00e9\\ud834\\udd1e\\n\",true,false,null,{\"b\":{}}],"
    "\"c\":\"\xe2\x82\xac\",\"d\":[[[]]],\"e\":12345678901234567890}";
  size_t n = sizeof doc - 1, i;
  int base = lua_gettop(L), unbalanced = 0, prefixes_ok = 0, j;
  char err[128], buf[sizeof doc];
  for (i = 0; i <= n; i++) {
    char *copy = malloc(i ? i : 1);  /* exact size, so ASan sees any overread */
    memcpy(copy, doc, i);
    if (tb_json_decode_push(L, copy, i, err, sizeof err) == 0) {
      prefixes_ok++;
      lua_pop(L, 1);
    }
    if (lua_gettop(L) != base) unbalanced++;
    free(copy);
  }
  CHECK(prefixes_ok == 1);  /* only the whole document */
  CHECK(unbalanced == 0);
  for (j = 0; j < 20000; j++) {
    size_t at = rng() % n;
    memcpy(buf, doc, n);
    buf[at] = (char)rng();
    if (j & 1) buf[rng() % n] = "[]{}\",:\\u0e-"[rng() % 13];
    if (tb_json_decode_push(L, buf, n, err, sizeof err) == 0) lua_pop(L, 1);
    if (lua_gettop(L) != base) unbalanced++;
  }
  CHECK(unbalanced == 0);
}

static void test_c_entries(void) {
  luaL_Buffer b;
  char err[128];
  int base = lua_gettop(L);
  /* encode appends to a buffer in use, and leaves it untouched on failure */
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "v=");
  lua_pushinteger(L, 7);  /* under the buffer: the value is found by index */
  lua_insert(L, -2);
  CHECK(tb_json_encode_at(L, -2, &b, err, sizeof err) == 0);
  luaL_addchar(&b, ';');
  lua_createtable(L, 0, 0);
  lua_pushnumber(L, 0.0 / 0.0);
  lua_setfield(L, -2, "x");
  lua_insert(L, -2);
  CHECK(tb_json_encode_at(L, -2, &b, err, sizeof err) == -1);
  CHECK_STR(err, "cannot encode NaN at .x");
  luaL_pushresult(&b);
  CHECK_STR(lua_tostring(L, -1), "v=7;");
  CHECK(lua_gettop(L) == base + 3);
  lua_settop(L, base);
  /* a large value through a buffer that must grow its box */
  CHECK_STR(run("local t = {} for i = 1, 5000 do t[i] = 'item' .. i end\n"
                "test_big = t return #E(t)"),
            "53894");
  luaL_buffinit(L, &b);
  lua_getglobal(L, "test_big");
  lua_insert(L, -2);
  CHECK(tb_json_encode_at(L, -2, &b, err, sizeof err) == 0);
  luaL_pushresult(&b);
  CHECK(lua_rawlen(L, -1) == 53894);
  lua_settop(L, base);
  /* decode pushes exactly one value, or nothing */
  CHECK(tb_json_decode_push(L, "[1,2]xyz", 5, err, sizeof err) == 0);
  CHECK(lua_gettop(L) == base + 1 && lua_rawlen(L, -1) == 2);
  lua_settop(L, base);
  CHECK(tb_json_decode_push(L, "[1,2", 4, err, sizeof err) == -1);
  CHECK_STR(err, "invalid JSON at byte 5: unexpected end");
  CHECK(lua_gettop(L) == base);
  CHECK(tb_json_decode_push(L, "[1]", 3, NULL, 0) == 0);  /* no error buffer needed */
  CHECK(tb_json_decode_push(L, "]", 1, NULL, 0) == -1);
  CHECK(lua_gettop(L) == base + 1);
  lua_settop(L, base);
  /* light userdata other than NULL */
  lua_getfield(L, LUA_REGISTRYINDEX, "test.core");
  lua_getfield(L, -1, "json_encode");
  lua_pushlightuserdata(L, &b);
  lua_call(L, 1, LUA_MULTRET);
  CHECK(lua_gettop(L) == base + 4 && lua_isnil(L, -3));
  CHECK_STR(lua_tostring(L, -2), "cannot encode userdata");
  CHECK_STR(lua_tostring(L, -1), "bad_type");
  lua_settop(L, base);
  /* the module table and the registry share the array metatable */
  lua_getfield(L, LUA_REGISTRYINDEX, "test.core");
  lua_getfield(L, -1, "json_array_mt");
  lua_getfield(L, LUA_REGISTRYINDEX, TB_JSON_ARRAY_MT);
  CHECK(lua_istable(L, -1) && lua_rawequal(L, -1, -2));
  lua_getfield(L, -3, "json_null");
  CHECK(lua_islightuserdata(L, -1) && lua_touserdata(L, -1) == NULL);
  lua_settop(L, base);
}

/* Output must not follow the C locale's decimal point. Runs only where such a locale exists. */
static void test_locale(void) {
  static const char *names[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8",
                                "ps_AF.UTF-8", "ps_AF.utf8", NULL};
  const char **name;
  for (name = names; *name; name++) {
    if (!setlocale(LC_NUMERIC, *name)) continue;
    if (strcmp(localeconv()->decimal_point, ".") == 0) continue;
    /* no float literals here: Lua's own lexer fails in a locale with a multibyte point */
    CHECK_STR(enc("1/2"), "0.5");
    CHECK_STR(enc("84/2"), "42.0");
    CHECK_STR(enc("{-11/4, 2^-14}"), "[-2.75,6.103515625e-05]");
    CHECK_STR(enc("{1/3}"), "[0.3333333333333333]");
    CHECK_STR(run("for i = 1, 1000 do local x = (i * 7919 % 1000003) / 997 * 2^(i % 200 - 100)\n"
                  "  if core.json_decode(core.json_encode(x)) ~= x then return x end\n"
                  "end return 'ok'"),
              "ok");
    CHECK_STR(run("local v = core.json_decode('[0.5, -2.75, 3, 1e2, 6.103515625e-05]')\n"
                  "return v[1] == 1/2 and v[2] == -11/4 and math.type(v[3]) == 'integer'\n"
                  "  and v[4] == 100 and v[5] == 2^-14"),
              "true");
    printf("json: locale %s checked\n", *name);
  }
  setlocale(LC_NUMERIC, "C");
}

int main(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  lua_newtable(L);
  lua_pushinteger(L, 1);  /* tb_json_open must leave the stack as it found it */
  lua_insert(L, -2);
  tb_json_open(L);
  CHECK(lua_gettop(L) == 2 && lua_istable(L, -1));
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "test.core");
  if (luaL_loadstring(L, helpers) != LUA_OK) {
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    return 1;
  }
  lua_insert(L, -2);
  lua_call(L, 1, 0);
  lua_settop(L, 0);

  test_encode_numbers();
  test_encode_tb_values();
  test_encode_strings();
  test_encode_tables();
  test_encode_depth();
  test_decode_numbers();
  test_decode_strings();
  test_decode_structure();
  test_decode_depth();
  check_round_trips(100000, double_round_trip);
  check_round_trips(100000, tb_value_round_trip);
  test_fast_float_text(300000);
  check_round_trips(100000, integer_round_trip);
  test_hostile_input();
  test_c_entries();
  test_locale();
  CHECK(lua_gettop(L) == 0);

  lua_close(L);
  return check_done("json");
}
