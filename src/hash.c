/* hash.c owns the OTA checksums of tb.core: streaming hashers for the seven algorithms
 * ThingsBoard offers (MD5, SHA256, SHA384, SHA512, CRC32, MURMUR3_32, MURMUR3_128) and the rule
 * for comparing a computed value with the one the server or a person supplied.
 *
 * Invariants:
 * - The text of a result is exactly the server's: Guava HashCode.toString(), two lowercase hex
 *   digits per byte of asBytes(). Guava keeps CRC32 and MURMUR3_32 as an int whose bytes it
 *   writes little-endian, and MURMUR3_128 as h1 then h2, each little-endian (docs/thingsboard.md §7).
 * - A hasher is open until its first final_hex; after that it only repeats the same text.
 * - MD5 and SHA-* come from libcrypto's EVP API; CRC32 and MurmurHash3 are written here, so
 *   nothing depends on zlib or on a murmur library's idea of byte order. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "core.h"
#include "hash.h"

enum { ALG_MD5, ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_CRC32, ALG_MURMUR3_32, ALG_MURMUR3_128 };

/* name is canonical; key is the name upper-cased without '-' and '_', which is how lookups
 * compare, so "sha-256", "Sha_256" and "murmur3-128" all find their algorithm. */
static const struct {
  const char *name, *key;
  size_t bytes;  /* length of asBytes() */
} algs[] = {
  {"MD5", "MD5", 16},
  {"SHA256", "SHA256", 32},
  {"SHA384", "SHA384", 48},
  {"SHA512", "SHA512", 64},
  {"CRC32", "CRC32", 4},
  {"MURMUR3_32", "MURMUR332", 4},
  {"MURMUR3_128", "MURMUR3128", 16},
};
#define ALG_COUNT ((int)(sizeof algs / sizeof algs[0]))

enum { STATE_OPEN, STATE_DONE, STATE_FAILED };

struct tb_hash {
  int alg, state;
  EVP_MD_CTX *md;        /* MD5 and SHA-* only; freed as soon as the digest is final */
  uint32_t crc;          /* running CRC32, kept inverted as zlib does */
  uint32_t m32;          /* MURMUR3_32 h1 */
  uint64_t m128[2];      /* MURMUR3_128 h1, h2 */
  uint32_t length;       /* Guava counts murmur input in a Java int: only 32 bits matter */
  unsigned char tail[16];  /* murmur bytes waiting for a whole block */
  size_t tail_len;
  char hex[TB_HASH_HEX_MAX];  /* the final text, kept so final_hex can repeat it */
};

static int is_space(int c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* ASCII only on purpose: a locale must not change what an algorithm name or a hex digit is. */
static int ascii_upper(int c) {
  return (c >= 'a' && c <= 'z') ? c - 'a' + 'A' : c;
}

static int ascii_lower(int c) {
  return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c;
}

static int is_hex(int c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int alg_lookup(const char *name) {
  char key[24];
  size_t n = 0, len;
  if (name == NULL)
    return -1;
  while (is_space((unsigned char)*name))
    name++;
  len = strlen(name);
  while (len > 0 && is_space((unsigned char)name[len - 1]))
    len--;
  for (size_t i = 0; i < len; i++) {
    int c = (unsigned char)name[i];
    if (c == '-' || c == '_')
      continue;
    if (n + 1 >= sizeof key)
      return -1;
    key[n++] = (char)ascii_upper(c);
  }
  key[n] = '\0';
  for (int i = 0; i < ALG_COUNT; i++)
    if (strcmp(key, algs[i].key) == 0)
      return i;
  return -1;
}

/* ---- CRC32 (IEEE 802.3, reflected polynomial 0xEDB88320, as zlib and java.util.zip) ---- */

/* A 16-entry table, one lookup per nibble: a constant, so no lazy init to race on, and still
 * fast enough for firmware images. crc_nibble[i] is i shifted through four bit steps. */
static const uint32_t crc_nibble[16] = {
  0x00000000, 0x1db71064, 0x3b6e20c8, 0x26d930ac, 0x76dc4190, 0x6b6b51f4, 0x4db26158, 0x5005713c,
  0xedb88320, 0xf00f9344, 0xd6d6a3e8, 0xcb61b38c, 0x9b64c2b0, 0x86d3d2d4, 0xa00ae278, 0xbdbdf21c,
};

static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t len) {
  for (size_t i = 0; i < len; i++) {
    crc ^= p[i];
    crc = (crc >> 4) ^ crc_nibble[crc & 15];
    crc = (crc >> 4) ^ crc_nibble[crc & 15];
  }
  return crc;
}

/* ---- MurmurHash3 (Austin Appleby's reference, seed 0, as Guava's murmur3_32/_128) ---- */

static uint32_t rotl32(uint32_t x, int r) {
  return (x << r) | (x >> (32 - r));
}

static uint64_t rotl64(uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

/* Loads are byte by byte: input is little-endian by definition and may be unaligned. */
static uint32_t load32le(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t load64le(const unsigned char *p) {
  return (uint64_t)load32le(p) | (uint64_t)load32le(p + 4) << 32;
}

static uint32_t mm32_mix_k(uint32_t k) {
  k *= 0xcc9e2d51u;
  k = rotl32(k, 15);
  return k * 0x1b873593u;
}

static void mm32_block(tb_hash *h, const unsigned char *p) {
  uint32_t h1 = h->m32 ^ mm32_mix_k(load32le(p));
  h1 = rotl32(h1, 13);
  h->m32 = h1 * 5 + 0xe6546b64u;
}

static uint32_t mm32_final(tb_hash *h) {
  uint32_t h1 = h->m32, k1 = 0;
  for (size_t i = h->tail_len; i-- > 0;)
    k1 |= (uint32_t)h->tail[i] << (8 * i);
  if (h->tail_len > 0)
    h1 ^= mm32_mix_k(k1);
  h1 ^= h->length;
  h1 ^= h1 >> 16;
  h1 *= 0x85ebca6bu;
  h1 ^= h1 >> 13;
  h1 *= 0xc2b2ae35u;
  h1 ^= h1 >> 16;
  return h1;
}

#define MM128_C1 UINT64_C(0x87c37b91114253d5)
#define MM128_C2 UINT64_C(0x4cf5ad432745937f)

static uint64_t mm128_mix_k1(uint64_t k) {
  k *= MM128_C1;
  k = rotl64(k, 31);
  return k * MM128_C2;
}

static uint64_t mm128_mix_k2(uint64_t k) {
  k *= MM128_C2;
  k = rotl64(k, 33);
  return k * MM128_C1;
}

static uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= UINT64_C(0xff51afd7ed558ccd);
  k ^= k >> 33;
  k *= UINT64_C(0xc4ceb9fe1a85ec53);
  k ^= k >> 33;
  return k;
}

static void mm128_block(tb_hash *h, const unsigned char *p) {
  uint64_t h1 = h->m128[0], h2 = h->m128[1];
  h1 ^= mm128_mix_k1(load64le(p));
  h1 = rotl64(h1, 27);
  h1 += h2;
  h1 = h1 * 5 + 0x52dce729;
  h2 ^= mm128_mix_k2(load64le(p + 8));
  h2 = rotl64(h2, 31);
  h2 += h1;
  h2 = h2 * 5 + 0x38495ab5;
  h->m128[0] = h1;
  h->m128[1] = h2;
}

static void mm128_final(tb_hash *h, uint64_t out[2]) {
  uint64_t h1 = h->m128[0], h2 = h->m128[1], k1 = 0, k2 = 0, len;
  size_t n = h->tail_len;
  for (size_t i = n; i-- > 8;)
    k2 |= (uint64_t)h->tail[i] << (8 * (i - 8));
  for (size_t i = n < 8 ? n : 8; i-- > 0;)
    k1 |= (uint64_t)h->tail[i] << (8 * i);
  if (n > 8)
    h2 ^= mm128_mix_k2(k2);
  if (n > 0)
    h1 ^= mm128_mix_k1(k1);
  /* Java's long ^= int sign-extends the length (as does the reference's int len), so a
   * count of 2^31 or more must carry ones into the high half to match the server. */
  len = h->length;
  if (len & UINT64_C(0x80000000))
    len |= UINT64_C(0xffffffff00000000);
  h1 ^= len;
  h2 ^= len;
  h1 += h2;
  h2 += h1;
  h1 = fmix64(h1);
  h2 = fmix64(h2);
  h1 += h2;
  h2 += h1;
  out[0] = h1;
  out[1] = h2;
}

/* Feeds murmur bytes through whole blocks of block_size (4 or 16), keeping the rest in
 * h->tail so chunk boundaries never change the result. */
static void murmur_update(tb_hash *h, const unsigned char *p, size_t len, size_t block_size,
                          void (*block)(tb_hash *, const unsigned char *)) {
  h->length += (uint32_t)len;  /* wraps mod 2^32 like Java's int */
  if (h->tail_len > 0) {
    size_t take = block_size - h->tail_len;
    if (take > len)
      take = len;
    memcpy(h->tail + h->tail_len, p, take);
    h->tail_len += take;
    p += take;
    len -= take;
    if (h->tail_len < block_size)
      return;
    block(h, h->tail);
    h->tail_len = 0;
  }
  for (; len >= block_size; p += block_size, len -= block_size)
    block(h, p);
  memcpy(h->tail, p, len);
  h->tail_len = len;
}

/* ---- the C API ---- */

static const EVP_MD *evp_for(int alg) {
  switch (alg) {
    case ALG_MD5: return EVP_md5();
    case ALG_SHA256: return EVP_sha256();
    case ALG_SHA384: return EVP_sha384();
    case ALG_SHA512: return EVP_sha512();
    default: return NULL;
  }
}

const char *tb_hash_canonical(const char *algorithm) {
  int alg = alg_lookup(algorithm);
  return alg < 0 ? NULL : algs[alg].name;
}

const char *tb_hash_algorithm(const tb_hash *h) {
  return algs[h->alg].name;
}

tb_hash *tb_hash_create(const char *algorithm) {
  int alg = alg_lookup(algorithm);
  const EVP_MD *md;
  tb_hash *h;
  if (alg < 0)
    return NULL;
  h = calloc(1, sizeof *h);
  if (h == NULL)
    return NULL;
  h->alg = alg;
  h->state = STATE_OPEN;
  h->crc = 0xffffffffu;
  md = evp_for(alg);
  if (md != NULL) {
    /* Init can fail where policy forbids a digest (MD5 under FIPS): say so by NULL now
     * rather than by a wrong checksum later. */
    h->md = EVP_MD_CTX_new();
    if (h->md == NULL || EVP_DigestInit_ex(h->md, md, NULL) != 1)
      goto fail;
  }
  return h;
fail:
  tb_hash_free(h);
  return NULL;
}

void tb_hash_update(tb_hash *h, const void *data, size_t len) {
  const unsigned char *p = data;
  if (h->state != STATE_OPEN || len == 0)
    return;
  switch (h->alg) {
    case ALG_CRC32:
      h->crc = crc32_update(h->crc, p, len);
      break;
    case ALG_MURMUR3_32:
      murmur_update(h, p, len, 4, mm32_block);
      break;
    case ALG_MURMUR3_128:
      murmur_update(h, p, len, 16, mm128_block);
      break;
    default:
      if (EVP_DigestUpdate(h->md, p, len) != 1)
        h->state = STATE_FAILED;
      break;
  }
}

static void put32le(unsigned char *out, uint32_t v) {
  for (int i = 0; i < 4; i++)
    out[i] = (unsigned char)(v >> (8 * i));
}

static void put64le(unsigned char *out, uint64_t v) {
  for (int i = 0; i < 8; i++)
    out[i] = (unsigned char)(v >> (8 * i));
}

/* Computes asBytes() as Guava would and stores its hex in h->hex. 0 ok, -1 on libcrypto
 * failure. */
static int finalize(tb_hash *h) {
  static const char digits[] = "0123456789abcdef";
  unsigned char bytes[EVP_MAX_MD_SIZE];
  uint64_t m[2];
  unsigned int n = 0;
  switch (h->alg) {
    case ALG_CRC32:
      put32le(bytes, h->crc ^ 0xffffffffu);
      break;
    case ALG_MURMUR3_32:
      put32le(bytes, mm32_final(h));
      break;
    case ALG_MURMUR3_128:
      mm128_final(h, m);
      put64le(bytes, m[0]);
      put64le(bytes + 8, m[1]);
      break;
    default:
      if (EVP_DigestFinal_ex(h->md, bytes, &n) != 1 || n != algs[h->alg].bytes)
        return -1;
      break;
  }
  for (size_t i = 0; i < algs[h->alg].bytes; i++) {
    h->hex[2 * i] = digits[bytes[i] >> 4];
    h->hex[2 * i + 1] = digits[bytes[i] & 15];
  }
  h->hex[2 * algs[h->alg].bytes] = '\0';
  return 0;
}

int tb_hash_final_hex(tb_hash *h, char *out, size_t outlen) {
  size_t need = 2 * algs[h->alg].bytes + 1;
  if (out == NULL || outlen < need)
    return -1;  /* before finalizing, so the caller can retry with a bigger buffer */
  if (h->state == STATE_OPEN) {
    h->state = finalize(h) == 0 ? STATE_DONE : STATE_FAILED;
    EVP_MD_CTX_free(h->md);
    h->md = NULL;
  }
  if (h->state != STATE_DONE) {
    out[0] = '\0';
    return -1;
  }
  memcpy(out, h->hex, need);
  return 0;
}

void tb_hash_free(tb_hash *h) {
  if (h == NULL)
    return;
  EVP_MD_CTX_free(h->md);
  free(h);
}

/* Reduces a checksum text to bare lowercase hex digits: blanks trimmed, one 0x/0X prefix
 * dropped. Returns the digit count, or 0 if anything else is left or it does not fit. */
static size_t hex_normalize(const char *s, char *out, size_t cap) {
  size_t len, n = 0;
  while (is_space((unsigned char)*s))
    s++;
  len = strlen(s);
  while (len > 0 && is_space((unsigned char)s[len - 1]))
    len--;
  if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    s += 2;
    len -= 2;
  }
  if (len == 0 || len >= cap)
    return 0;
  for (size_t i = 0; i < len; i++) {
    if (!is_hex((unsigned char)s[i]))
      return 0;
    out[n++] = (char)ascii_lower((unsigned char)s[i]);
  }
  out[n] = '\0';
  return n;
}

int tb_hash_match(const char *algorithm, const char *computed_hex, const char *expected) {
  char got[TB_HASH_HEX_MAX], want[TB_HASH_HEX_MAX], swapped[TB_HASH_HEX_MAX];
  int alg = alg_lookup(algorithm);
  size_t width, n;
  int small;
  if (alg < 0 || computed_hex == NULL || expected == NULL)
    return 0;
  width = 2 * algs[alg].bytes;
  small = alg == ALG_CRC32 || alg == ALG_MURMUR3_32;
  if (hex_normalize(computed_hex, got, sizeof got) != width)
    return 0;
  n = hex_normalize(expected, want, sizeof want);
  if (n == 0)
    return 0;
  if (small && n < width) {
    /* A person who writes the int as a number drops its leading zeros ("0x12d20a" for
     * 0x0012d20a); put them back so both byte orders can be compared. */
    memmove(want + (width - n), want, n + 1);
    memset(want, '0', width - n);
    n = width;
  }
  if (n != width)
    return 0;
  if (memcmp(got, want, width) == 0)
    return 1;
  if (!small)
    return 0;  /* a digest is a byte string: reversing it is a different value */
  /* The int read the other way round: a person or tool may give 0xCBF43926 big-endian
   * where the server writes 2639f4cb. */
  for (size_t i = 0; i < width; i += 2) {
    swapped[i] = got[width - 2 - i];
    swapped[i + 1] = got[width - 1 - i];
  }
  return memcmp(swapped, want, width) == 0;
}

/* ---- the Lua API ---- */

#define HASHER_MT "tb.hash"

static tb_hash **to_hasher(lua_State *L) {
  return luaL_checkudata(L, 1, HASHER_MT);
}

static tb_hash *check_hasher(lua_State *L) {
  tb_hash **p = to_hasher(L);
  if (*p == NULL)
    luaL_error(L, "attempt to use a closed hasher");
  return *p;
}

static int push_unsupported(lua_State *L, int first, const char *algorithm) {
  if (first)
    lua_pushnil(L);
  else
    lua_pushboolean(L, 0);
  lua_pushfstring(L, "unsupported checksum algorithm: %s", algorithm);
  return 2;
}

/* The result of tb_hash_final_hex (rc, hex) as Lua's hex | nil, err. */
static int push_hex(lua_State *L, int rc, const char *hex, const char *algorithm) {
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "checksum %s failed", algorithm);
    return 2;
  }
  lua_pushstring(L, hex);
  return 1;
}

/* core.hash_new(algorithm) -> hasher | nil, err */
static int l_hash_new(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  tb_hash **p;
  if (tb_hash_canonical(name) == NULL)
    return push_unsupported(L, 1, name);
  /* The userdata exists before the C object, so __gc frees it whatever raises later. */
  p = lua_newuserdatauv(L, sizeof *p, 0);
  *p = NULL;
  luaL_setmetatable(L, HASHER_MT);
  *p = tb_hash_create(name);
  if (*p == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start checksum %s", tb_hash_canonical(name));
    return 2;
  }
  return 1;
}

/* hasher:update(bytes) -> hasher */
static int l_hasher_update(lua_State *L) {
  tb_hash *h = check_hasher(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (h->state != STATE_OPEN)
    return luaL_error(L, "%s hasher already finalized by hex(); use a new one",
                      tb_hash_algorithm(h));
  tb_hash_update(h, data, len);
  lua_settop(L, 1);
  return 1;
}

/* hasher:hex() -> hex | nil, err */
static int l_hasher_hex(lua_State *L) {
  tb_hash *h = check_hasher(L);
  char buf[TB_HASH_HEX_MAX];
  return push_hex(L, tb_hash_final_hex(h, buf, sizeof buf), buf, tb_hash_algorithm(h));
}

/* hasher:algorithm() -> "SHA256" */
static int l_hasher_algorithm(lua_State *L) {
  lua_pushstring(L, tb_hash_algorithm(check_hasher(L)));
  return 1;
}

/* hasher:__gc() and hasher:__close(): frees the C object; safe to run twice */
static int l_hasher_gc(lua_State *L) {
  tb_hash **p = to_hasher(L);
  tb_hash_free(*p);
  *p = NULL;
  return 0;
}

/* tostring(hasher) -> "tb.hash (SHA256)" */
static int l_hasher_tostring(lua_State *L) {
  tb_hash **p = to_hasher(L);
  if (*p == NULL)
    lua_pushliteral(L, "tb.hash (closed)");
  else
    lua_pushfstring(L, "tb.hash (%s)", tb_hash_algorithm(*p));
  return 1;
}

/* core.hash_hex(algorithm, bytes) -> hex | nil, err */
static int l_hash_hex(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  char buf[TB_HASH_HEX_MAX];
  tb_hash *h;
  int rc;
  if (tb_hash_canonical(name) == NULL)
    return push_unsupported(L, 1, name);
  /* No Lua call between create and free, so a raw malloc is safe here. */
  h = tb_hash_create(name);
  if (h == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start checksum %s", tb_hash_canonical(name));
    return 2;
  }
  tb_hash_update(h, data, len);
  rc = tb_hash_final_hex(h, buf, sizeof buf);
  tb_hash_free(h);
  return push_hex(L, rc, buf, tb_hash_canonical(name));
}

/* core.checksum_match(algorithm, computed_hex, expected_text) -> boolean [, err] */
static int l_checksum_match(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *computed = luaL_checkstring(L, 2);
  const char *expected = luaL_checkstring(L, 3);
  if (tb_hash_canonical(name) == NULL)
    return push_unsupported(L, 0, name);
  lua_pushboolean(L, tb_hash_match(name, computed, expected));
  return 1;
}

static const luaL_Reg hasher_methods[] = {
  {"update", l_hasher_update},
  {"hex", l_hasher_hex},
  {"algorithm", l_hasher_algorithm},
  {"__gc", l_hasher_gc},
  {"__close", l_hasher_gc},
  {"__tostring", l_hasher_tostring},
  {NULL, NULL},
};

static const luaL_Reg hash_funcs[] = {
  {"hash_new", l_hash_new},
  {"hash_hex", l_hash_hex},
  {"checksum_match", l_checksum_match},
  {NULL, NULL},
};

int tb_hash_open(lua_State *L) {
  tb_core_register(L, HASHER_MT, hasher_methods, hash_funcs);
  return 0;
}
