-- The Lua face of hash.c: hash_new / hasher methods, hash_hex and checksum_match.
-- Expected values were computed with Guava 31.1 (the library ThingsBoard hashes OTA packages
-- with, HashCode.toString()) and reproduced in Node 20 (crypto, zlib.crc32,
-- murmurhash3js-revisited); src/test/test_hash.c holds the full vector set.
local core = require "tb.core"

local ALGS = { "MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128" }

local VECTORS = {
  [""] = {
    MD5 = "d41d8cd98f00b204e9800998ecf8427e",
    SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    CRC32 = "00000000",
    MURMUR3_32 = "00000000",
    MURMUR3_128 = "00000000000000000000000000000000",
  },
  ["123456789"] = {
    MD5 = "25f9e794323b453885f5181f1b624d0b",
    SHA256 = "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
    SHA384 = "eb455d56d2c1a69de64e832011f3393d45f3fa31d6842f21af92d2fe469c499d"
      .. "a5e3179847334a18479c8d1dedea1be3",
    SHA512 = "d9e6762dd1c8eaf6d61b3c6192fc408d4d6d5f1176d0c29169bc24e71c3f274a"
      .. "d27fcd5811b313d681f7e55ec02d73d499c95455b6b5bb503acf574fba8ffe85",
    CRC32 = "2639f4cb",
    MURMUR3_32 = "82f3feb4",
    MURMUR3_128 = "a4cc66db5e64843c05a11e3ac7faf899",
  },
  hello = {
    MURMUR3_32 = "47fa8b24",
    MURMUR3_128 = "029bbd41b3a7d8cb191dae486a901e5b",
  },
  -- embedded NUL and high bytes: the whole Lua string is hashed, not up to the first NUL
  ["a\0b\255\0"] = {
    SHA256 = "c5d4cc6dc0fd2c7f503ce74bd7531a6d56a38c9ed10f5d25ed92e95ef8fa9f6b",
    CRC32 = "dc4b07ba",
    MURMUR3_32 = "b4f66405",
    MURMUR3_128 = "c5c5c616573279dc1bde61ebfd82da41",
  },
}

-- The C test's big input: 100003 bytes, byte j = (j * 2654435761 mod 2^32) >> 24.
local function big_input()
  local t = {}
  for j = 0, 100002 do
    t[#t + 1] = string.char(((j * 2654435761) & 0xffffffff) >> 24)
  end
  return table.concat(t)
end

local BIG = {
  MD5 = "f25ef0ce1d166d44c8e7e3ff91e05d58",
  SHA256 = "56901783eea6d6fb5468fc1f5c4a4bbbb6268b138cf98166a077ea612e36f8ad",
  SHA384 = "3ba197161d3fdefa48da9898f3eb7e6069550de5d09cfa5457f395d6c1d351e8"
    .. "384c5ce69f3d4e2520fa3c31fffbef77",
  SHA512 = "2e27caf1377b015280e30c44e4a89a90bc23775e14b0a9f17d80d05b8e9a334b"
    .. "6999fc5072cb871f2f652a89920af12d6994c4086a6bcadeeab47d1f3bf216ec",
  CRC32 = "613c2ad7",
  MURMUR3_32 = "063bce8b",
  MURMUR3_128 = "3cf2b42ab1d94ccfaa4773bc0f6ea199",
}

describe("tb.core hashing", function()
  it("exports hash_new, hash_hex and checksum_match", function()
    assert.is_function(core.hash_new)
    assert.is_function(core.hash_hex)
    assert.is_function(core.checksum_match)
  end)

  describe("hash_new", function()
    it("makes a hasher for every ThingsBoard algorithm", function()
      for _, alg in ipairs(ALGS) do
        local h = assert(core.hash_new(alg))
        assert.equal(alg, h:algorithm())
        assert.equal("tb.hash (" .. alg .. ")", tostring(h))
        assert.equal("tb.hash", getmetatable(h).__name)
      end
    end)

    it("takes names in any case, with dashes or underscores", function()
      assert.equal("SHA256", core.hash_new("sha256"):algorithm())
      assert.equal("SHA256", core.hash_new("SHA-256"):algorithm())
      assert.equal("SHA512", core.hash_new("sha-512"):algorithm())
      assert.equal("CRC32", core.hash_new("crc32"):algorithm())
      assert.equal("MURMUR3_32", core.hash_new("murmur3_32"):algorithm())
      assert.equal("MURMUR3_128", core.hash_new("Murmur3-128"):algorithm())
    end)

    it("returns nil and an error for an unsupported algorithm", function()
      local h, err = core.hash_new("SHA1")
      assert.is_nil(h)
      assert.equal("unsupported checksum algorithm: SHA1", err)
      assert.same({ nil, "unsupported checksum algorithm: " }, { core.hash_new("") })
    end)

    it("raises on a missing algorithm", function()
      assert.has_error(function() core.hash_new() end)
      assert.has_error(function() core.hash_new({}) end)
    end)
  end)

  describe("hasher", function()
    it("gives ThingsBoard's hex for known inputs", function()
      for input, want in pairs(VECTORS) do
        for alg, hex in pairs(want) do
          assert.equal(hex, core.hash_new(alg):update(input):hex(),
            alg .. " of " .. ("%q"):format(input))
        end
      end
    end)

    it("returns itself from update, for chaining", function()
      local h = core.hash_new("CRC32")
      assert.equal(h, h:update("1234"))
      assert.equal("2639f4cb", h:update("5678"):update(""):update("9"):hex())
    end)

    it("gives the same hex in 1, 7, 4096-byte and one-shot updates", function()
      local data = big_input()
      for _, alg in ipairs(ALGS) do
        for _, size in ipairs({ 1, 7, 4096, #data }) do
          local h = core.hash_new(alg)
          for i = 1, #data, size do
            h:update(data:sub(i, i + size - 1))
          end
          assert.equal(BIG[alg], h:hex(), alg .. " in pieces of " .. size)
        end
      end
    end)

    it("keeps leading zero bytes in the hex", function()
      assert.equal("0ad21200", core.hash_hex("CRC32", "62"))
      assert.equal("000000ff", core.hash_hex("CRC32", "\255"))
      assert.equal("00d3f2f5", core.hash_hex("MURMUR3_32", "\1\64"))
      assert.equal("701ebd00", core.hash_hex("MURMUR3_32", "\20"))
      assert.equal("007ef08696a277c7b6432b13c7ed679e", core.hash_hex("MURMUR3_128", "\1\119"))
    end)

    it("repeats the hex and refuses updates after it", function()
      local h = core.hash_new("SHA256"):update("abc")
      local hex = h:hex()
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", hex)
      assert.equal(hex, h:hex())
      assert.has_error(function() h:update("more") end,
        "SHA256 hasher already finalized by hex(); use a new one")
      assert.equal(hex, h:hex())
    end)

    it("raises on a non-string update", function()
      local h = core.hash_new("MD5")
      assert.has_error(function() h:update() end)
      assert.has_error(function() h:update({}) end)
      assert.has_error(function() h.update(io.stdout, "x") end)
    end)

    it("closes with <close> and refuses use afterwards", function()
      local kept
      do
        local h <close> = core.hash_new("SHA512")
        kept = h
        h:update("abc")
      end
      assert.equal("tb.hash (closed)", tostring(kept))
      assert.has_error(function() kept:update("x") end, "attempt to use a closed hasher")
      assert.has_error(function() kept:hex() end, "attempt to use a closed hasher")
    end)

    it("is freed by the garbage collector", function()
      -- weak values: a hasher the module kept a reference to would stay in the table
      local made = setmetatable({}, {__mode = "v"})
      for i = 1, 2000 do
        made[i] = core.hash_new(ALGS[i % #ALGS + 1]):update("x")
      end
      assert.is_function(getmetatable(core.hash_new("SHA256")).__gc, "collection would not free the C object")
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(made), "a hasher outlived two full collections")
    end)
  end)

  describe("hash_hex", function()
    it("hashes in one call", function()
      assert.equal("2639f4cb", core.hash_hex("CRC32", "123456789"))
      assert.equal("47fa8b24", core.hash_hex("murmur3_32", "hello"))
      assert.equal("900150983cd24fb0d6963f7d28e17f72", core.hash_hex("md5", "abc"))
    end)

    it("returns nil and an error for an unsupported algorithm", function()
      assert.same({ nil, "unsupported checksum algorithm: CRC32C" },
        { core.hash_hex("CRC32C", "x") })
    end)

    it("raises on missing arguments", function()
      assert.has_error(function() core.hash_hex("CRC32") end)
      assert.has_error(function() core.hash_hex(nil, "x") end)
    end)
  end)

  describe("checksum_match", function()
    local match = core.checksum_match

    it("accepts the exact text, any case, 0x and surrounding blanks", function()
      assert.is_true(match("CRC32", "2639f4cb", "2639f4cb"))
      assert.is_true(match("CRC32", "2639f4cb", "2639F4CB"))
      assert.is_true(match("CRC32", "2639f4cb", " 0x2639f4cb\n"))
      local sha = VECTORS["123456789"].SHA256
      assert.is_true(match("SHA256", sha, "0X" .. sha:upper()))
    end)

    it("accepts the other byte order for CRC32 and MURMUR3_32", function()
      assert.is_true(match("CRC32", "2639f4cb", "0xCBF43926"))
      assert.is_true(match("CRC32", "2639f4cb", "cbf43926"))
      assert.is_true(match("MURMUR3_32", "47fa8b24", "0x248bfa47"))
    end)

    it("pads missing leading zeros for CRC32 and MURMUR3_32", function()
      local crc = core.hash_hex("CRC32", "62")  -- 0x0012d20a
      assert.is_true(match("CRC32", crc, "0x12d20a"))
      assert.is_true(match("CRC32", crc, "12d20a"))
      assert.is_true(match("CRC32", crc, "0x0012D20A"))
      assert.is_false(match("CRC32", crc, "0ad212"))  -- what a zero-dropping client computes
      assert.is_true(match("MURMUR3_32", "701ebd00", "bd1e70"))
    end)

    it("never reverses or pads a digest", function()
      local sha = VECTORS["123456789"].SHA256
      local reversed = {}
      for byte in sha:gmatch("..") do table.insert(reversed, 1, byte) end
      assert.is_false(match("SHA256", sha, table.concat(reversed)))
      assert.is_false(match("SHA256", sha, sha:sub(3)))
      local m128 = "007ef08696a277c7b6432b13c7ed679e"
      assert.is_false(match("MURMUR3_128", m128, m128:sub(3)))
      assert.is_false(match("MURMUR3_128", m128, "9e67edc7132b43b6c777a29686f07e00"))
    end)

    it("returns false on a mismatch or a malformed expected value", function()
      assert.is_false(match("CRC32", "2639f4cb", "2639f4cc"))
      assert.is_false(match("CRC32", "2639f4cb", ""))
      assert.is_false(match("CRC32", "2639f4cb", "0x"))
      assert.is_false(match("CRC32", "2639f4cb", "not hex"))
      assert.is_false(match("CRC32", "2639f4cb", "002639f4cb"))
      assert.is_false(match("MD5", VECTORS["123456789"].MD5, VECTORS[""].MD5))
    end)

    it("returns false and an error for an unsupported algorithm", function()
      assert.same({ false, "unsupported checksum algorithm: SHA1" }, { match("SHA1", "ab", "ab") })
    end)

    it("raises on missing arguments", function()
      assert.has_error(function() match("CRC32", "2639f4cb") end)
    end)

    it("agrees with hash_hex for every algorithm", function()
      for _, alg in ipairs(ALGS) do
        local hex = core.hash_hex(alg, "firmware")
        assert.is_true(match(alg, hex, hex:upper()))
        assert.is_false(match(alg, hex, (hex:sub(1, 1) == "0" and "1" or "0") .. hex:sub(2)))
      end
    end)
  end)
end)
