-- The wire JSON codec of tb.core (src/json.c), checked from Lua against the rules of the README's
-- "tb.json.encode", and against lua-cjson as an independent parser where it is installed.
local core = require "tb.core"
local equal = require "spec.support.equal"
local has_cjson, cjson = pcall(require, "cjson")

local null, array_mt = core.json_null, core.json_array_mt
local encode, decode = core.json_encode, core.json_decode

local function pack(...)
  return table.pack(...)
end

-- nil and the message, exactly two results (json_decode)
local function refused(err, ...)
  assert.same(pack(nil, err), pack(...))
end

-- nil, the message and the code, exactly three results (json_encode)
local function refused_as(code, err, ...)
  assert.same(pack(nil, err, code), pack(...))
end

local function array(t)
  return setmetatable(t, array_mt)
end

-- Deep equality that also compares number subtypes and array marks.
local function same_typed(a, b)
  return equal.typed(a, b, array_mt)
end

describe("tb.core json_encode", function()
  it("writes integers with all 64 bits", function()
    assert.equal("0", encode(0))
    assert.equal("-1", encode(-1))
    assert.equal("9223372036854775807", encode(math.maxinteger))
    assert.equal("-9223372036854775808", encode(math.mininteger))
    assert.equal("9007199254740993", encode(9007199254740993))
  end)

  it("writes floats in positional notation so they read back as doubles", function()
    assert.equal("42.0", encode(42.0))
    assert.equal("0.1", encode(0.1))
    assert.equal("1" .. string.rep("0", 300) .. ".0", encode(1e300))
    assert.equal("1000000000000000.0", encode(1e15))
    assert.equal("-0.00000000025", encode(-2.5e-10))
    assert.equal("-0.0", encode(-0.0))
    assert.equal("0.0", encode(0.0))
    assert.equal("0.3333333333333333", encode(1 / 3))
    assert.equal("0.30000000000000004", encode(0.1 + 0.2))
    assert.equal("9007199254740992.0", encode(2.0 ^ 53))
    assert.equal("1000000000000000000000.0", encode(1e21))
  end)

  it("gives telemetry floats at most 16 decimals, as ThingsBoard keeps them as DOUBLE", function()
    local function tb_value(v) return encode(v, nil, true) end
    assert.equal("0.3", tb_value(0.1 + 0.2))
    assert.equal("21.700000000000003", tb_value(21.700000000000003))
    assert.equal("0.6666666666666666", tb_value(2 / 3))
    assert.equal("0.0", tb_value(1e-20))
    assert.equal("100000000000000000000.0", tb_value(1e20))
    assert.equal("7", tb_value(7))
  end)

  it("refuses NaN and infinities, saying which and where", function()
    refused_as("not_finite", "cannot encode NaN", encode(0 / 0))
    refused_as("not_finite", "cannot encode inf", encode(math.huge))
    refused_as("not_finite", "cannot encode inf", encode(-math.huge))
    refused_as("not_finite", "cannot encode NaN at .a.b", encode({ a = { b = 0 / 0 } }))
    refused_as("not_finite", "cannot encode inf at [2]", encode({ 1, math.huge }, nil, true))
  end)

  it("escapes quotes, backslashes and control characters only", function()
    assert.equal([["a\"b\\c/d"]], encode('a"b\\c/d'))
    assert.equal([["\n\r\t\b\f"]], encode("\n\r\t\b\f"))
    assert.equal([["\u0000\u0001\u001f]] .. "\127" .. [["]], encode("\0\1\31\127"))
    assert.equal('"h\u{e9}llo \u{20ac} \u{1d11e}"', encode("h\u{e9}llo \u{20ac} \u{1d11e}"))
  end)

  it("refuses invalid UTF-8", function()
    for _, s in ipairs({ "\xff", "\x80", "\xc0\x80", "\xe0\x9f\xbf", "\xed\xa0\x80",
                         "\xf4\x90\x80\x80", "ok\xe2\x82" }) do
      refused_as("bad_utf8", "invalid UTF-8 in string", encode(s))
    end
    refused_as("bad_utf8", "invalid UTF-8 in string at .k", encode({ k = "\xff" }))
    refused_as("bad_utf8", "invalid UTF-8 in string", encode({ ["\xff"] = 1 }))
  end)

  it("writes arrays, objects, null and booleans", function()
    assert.equal("null", encode(nil))
    assert.equal("null", encode(null))
    assert.equal("true", encode(true))
    assert.equal("false", encode(false))
    assert.equal("{}", encode({}))
    assert.equal("[]", encode(array({})))
    assert.equal("[1,2,3]", encode({ 1, 2, 3 }))
    assert.equal('{"a":1}', encode({ a = 1 }))
    assert.equal('{"x":[1.0,null,{}]}', encode({ x = { 1.0, null, {} } }))
    assert.equal('["a","b"]', encode({ [2] = "b", [1] = "a" }))
  end)

  it("refuses tables that are neither arrays nor objects", function()
    local err = "cannot encode table with mixed or non-string keys"
    for _, t in ipairs({ { 1, a = 2 }, { 1, nil, 3 }, { [2] = 1 }, { [0] = 1 }, { [1.5] = 1 },
                         { [true] = 1 }, { [{}] = 1 }, array({ a = 1 }) }) do
      refused_as("bad_key", err, encode(t))
    end
    refused_as("bad_key", err .. " at .a", encode({ a = { [2] = 0 } }))
  end)

  it("refuses functions, threads and userdata", function()
    refused_as("bad_type", "cannot encode function", encode(print))
    refused_as("bad_type", "cannot encode thread", encode(coroutine.create(print)))
    refused_as("bad_type", "cannot encode userdata", encode(io.stdout))
    refused_as("bad_type", "cannot encode function at .f", encode({ f = print }))
  end)

  it("raises on a missing argument, like Lua", function()
    assert.has_error(function() local s = core.json_encode() return s end,
      "bad argument #1 to 'json_encode' (value expected)")
  end)

  it("bounds nesting at 128 levels, which also stops cycles", function()
    local t = 1
    for _ = 1, 128 do t = { t } end
    assert.equal(("["):rep(128) .. "1" .. ("]"):rep(128), encode(t))
    refused_as("too_deep", "nesting too deep", encode({ t }))
    local c = {}
    c.self = c
    refused_as("too_deep", "nesting too deep", encode(c))
  end)

  it("refuses a text longer than max_bytes as too_large, whatever else is wrong later", function()
    assert.equal('{"a":"xyz"}', encode({ a = "xyz" }, 11))
    refused_as("too_large", "too large: over 10 bytes", encode({ a = "xyz" }, 10))
    refused_as("too_large", "too large: over 5 bytes", encode(string.rep("x", 100), 5))
    refused_as("too_large", "too large: over 8 bytes", encode({ 1234567890, 0 / 0 }, 8))
    refused_as("too_large", "too large: over 3 bytes", encode(12345, 3, true))
    refused_as("not_finite", "cannot encode NaN at [2]", encode({ 1, 0 / 0 }, 100))
  end)
end)

describe("tb.core json_decode", function()
  it("gives integers for integer tokens that fit in 64 bits", function()
    for text, want in pairs({ ["42"] = 42, ["-7"] = -7, ["-0"] = 0,
                              ["9223372036854775807"] = math.maxinteger,
                              ["-9223372036854775808"] = math.mininteger,
                              ["9007199254740993"] = 9007199254740993 }) do
      local v = decode(text)
      assert.equal("integer", math.type(v), text)
      assert.equal(want, v, text)
    end
  end)

  it("gives floats for everything else", function()
    for text, want in pairs({ ["42.0"] = 42.0, ["1e3"] = 1000.0, ["4.2E1"] = 42.0,
                              ["0.1"] = 0.1, ["-2.5e-3"] = -0.0025,
                              ["12345678901234567890"] = 12345678901234567890.0,
                              ["9223372036854775808"] = 2.0 ^ 63, ["1e400"] = math.huge }) do
      local v = decode(text)
      assert.equal("float", math.type(v), text)
      assert.equal(want, v, text)
    end
    assert.equal(-math.huge, decode("-1e400"))
    assert.equal(-1 / 0, 1 / decode("-0.0"))
  end)

  it("decodes every escape, surrogate pairs and raw UTF-8", function()
    assert.equal('"\\/\b\f\n\r\t', decode([["\"\\\/\b\f\n\r\t"]]))
    assert.equal("A\u{e9}\u{20ac}\u{1d11e}\0", decode([["\u0041\u00e9\u20AC\ud834\udd1e\u0000"]]))
    assert.equal("h\u{e9} \u{1d11e}", decode('"h\u{e9} \u{1d11e}"'))
  end)

  it("reports bad strings with the byte where they go wrong", function()
    refused("invalid JSON at byte 11: bad escape", decode([[{"abc": "x\qy"}]]))
    refused("invalid JSON at byte 2: lone surrogate", decode([["\ud800"]]))
    refused("invalid JSON at byte 2: lone surrogate", decode([["\udc00"]]))
    refused("invalid JSON at byte 2: lone surrogate", decode([["\ud800\u0041"]]))
    refused("invalid JSON at byte 2: bad escape", decode([["\u12G4"]]))
    refused("invalid JSON at byte 3: control character in string", decode('"a\tb"'))
    refused("invalid JSON at byte 3: control character in string", decode('"a\0b"'))
    refused("invalid JSON at byte 3: invalid UTF-8", decode('"a\xff"'))
    refused("invalid JSON at byte 2: invalid UTF-8", decode('"\xed\xa0\x80"'))
    refused("invalid JSON at byte 5: unexpected end", decode('"abc'))
  end)

  it("gives json_null for null, also inside objects and at the top", function()
    local v = decode('{"a": null, "b": [null, 1]}')
    assert.equal(null, v.a)
    assert.equal(null, v.b[1])
    assert.equal(2, #v.b)
    assert.equal(null, decode("null"))
  end)

  it("marks arrays, so [] and {} keep their kind", function()
    assert.equal(array_mt, getmetatable(decode("[1]")))
    assert.is_nil(getmetatable(decode('{"a":1}')))
    assert.equal("[]", encode(decode("[]")))
    assert.equal("{}", encode(decode("{}")))
    assert.equal('{"e":[]}', encode(decode('{"e":[]}')))
  end)

  it("accepts scalars at the top and RFC 8259 whitespace", function()
    assert.equal("x", decode('"x"'))
    assert.equal(true, decode(" \t\r\ntrue\n"))
    assert.equal(false, decode("false"))
    refused("invalid JSON at byte 1: unexpected character", decode("\f1"))
  end)

  it("refuses empty text, trailing garbage and broken structure", function()
    refused("empty JSON text", decode(""))
    refused("empty JSON text", decode("  \n "))
    refused("invalid JSON at byte 3: trailing garbage", decode("1 2"))
    refused("invalid JSON at byte 2: trailing garbage", decode("01"))
    refused("invalid JSON at byte 4: unexpected character", decode("[1,]"))
    refused("invalid JSON at byte 8: expected string key", decode('{"a":1,}'))
    refused("invalid JSON at byte 6: expected ':'", decode('{"a" 1}'))
    refused("invalid JSON at byte 1: unexpected character", decode("NaN"))
    refused("invalid JSON at byte 3: bad number", decode("1.e5"))
    refused("invalid JSON at byte 2: unexpected end", decode("["))
  end)

  it("raises on a missing argument, like Lua", function()
    assert.has_error(function() local v = core.json_decode() return v end,
      "bad argument #1 to 'json_decode' (string expected, got no value)")
  end)

  it("bounds nesting at 128 levels without exhausting any stack", function()
    assert.equal(("["):rep(128) .. ("]"):rep(128), encode(decode(("["):rep(128) .. ("]"):rep(128))))
    refused("nesting too deep", decode(("["):rep(129) .. ("]"):rep(129)))
    refused("nesting too deep", decode(("["):rep(100000)))
    refused("nesting too deep", decode(('{"a":'):rep(100000)))
  end)
end)

describe("tb.core json round trips", function()
  it("keep values and their types", function()
    local values = {
      0, -1, math.maxinteger, math.mininteger, 42.0, -0.0, 0.1, 1e300, 5e-324, 2.0 ^ 63,
      "", "text", "\0\1\n\"\\", "\u{7ff}\u{ffff}\u{10ffff}", true, false, null,
      array({}), {}, array({ 1, 2.5, "x", null, array({}), {} }),
      { a = { b = { c = array({ 1, 2, 3 }) } }, e = "", n = null, f = 1.5 },
    }
    for _, v in ipairs(values) do
      local back = decode(encode(v))
      assert.is_true(same_typed(v, back), encode(v))
    end
  end)

  it("keep random doubles bit for bit", function()
    local rnd = 12345
    for _ = 1, 20000 do
      rnd = (rnd * 6364136223846793005 + 1442695040888963407)
      local x = string.unpack("d", string.pack("j", rnd))
      if x == x and x ~= math.huge and x ~= -math.huge then
        local back = decode(encode(x))
        assert.equal(string.pack("d", x), string.pack("d", back))
      end
    end
  end)
end)

-- lua-cjson as an independent parser: what we write it must read, and agree with us on.
local cjson_describe = has_cjson and describe or pending
cjson_describe("tb.core json against lua-cjson", function()
  -- cjson reads every number as a float and arrays as plain tables
  local function agree(ours, theirs)
    return equal.deep(ours, theirs, function(a, b)
      if type(a) == "number" then return type(b) == "number" and a == b end
      return a == b
    end)
  end

  local rnd = 1
  local function random(n)
    rnd = (rnd * 1103515245 + 12345) % 2147483648
    return rnd % n
  end
  local pieces = { "a", "\u{e9}", "\u{1d11e}", "\n", '"', "\\", "/", "\0", "\31", " ", "\127" }
  local function random_value(depth)
    local kind = random(depth > 4 and 6 or 9)
    if kind == 0 then return random(2000000) - 1000000 end
    if kind == 1 then return (random(2000000) - 1000000) / (random(1000) + 1) * 10.0 ^ (random(40) - 20) end
    if kind == 2 then
      local parts = {}
      for i = 1, random(8) do parts[i] = pieces[random(#pieces) + 1] end
      return table.concat(parts)
    end
    if kind == 3 then return random(2) == 0 end
    if kind == 4 then return null end
    if kind == 5 then return random(2) == 0 and 2.0 ^ 52 or 1e-300 end
    local t = {}
    if kind == 6 or kind == 7 then
      for i = 1, random(6) do t[i] = random_value(depth + 1) end
      return array(t)
    end
    for _ = 1, random(6) do t["k" .. random(10) .. pieces[random(#pieces) + 1]] = random_value(depth + 1) end
    return t
  end

  it("reads what we write and agrees on it", function()
    for _ = 1, 3000 do
      local v = random_value(0)
      local text = assert(encode(v))
      local ok, theirs = pcall(cjson.decode, text)
      assert.is_true(ok, text)
      assert.is_true(agree(v, theirs), text)
      assert.is_true(same_typed(v, decode(text)), text)
    end
  end)

  it("accepts our integers beyond 2^53 as numbers", function()
    for _, i in ipairs({ math.maxinteger, math.mininteger, 9007199254740993 }) do
      assert.equal("number", type(cjson.decode(encode({ i }))[1]))
    end
  end)

  it("is read by us the way cjson wrote it", function()
    for _ = 1, 1000 do
      local v = random_value(0)
      local text = cjson.encode(v)
      local ours, err = decode(text)
      assert.is_not_nil(ours, text .. ": " .. tostring(err))
      assert.is_true(agree(ours, cjson.decode(text)), text)
    end
  end)

  it("shares cjson's null", function()
    assert.equal(cjson.null, null)
  end)
end)
