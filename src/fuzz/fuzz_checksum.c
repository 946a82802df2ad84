/* fuzz_checksum: checksum parsing and the streaming hashers of hash.c.
 *
 * Input: "ALGORITHM\nCOMPUTED\nEXPECTED" (the rest after the second newline is EXPECTED,
 * newlines included; missing parts are empty). Checks:
 * - tb_hash_match(alg, computed, expected) never crashes, and agrees with the rules of
 *   docs/thingsboard.md §7 where they are easy to restate: a computed hex of the right width always
 *   matches itself, upper-cased, 0x-prefixed and blank-padded; never for an unknown algorithm.
 * - tb_hash_canonical(alg) != NULL exactly when tb_hash_create(alg) works.
 * - the whole input, streamed in pieces of pseudo-random size (seeded by the input) through
 *   each of the seven algorithms, gives the one-shot text, and that text equals an
 *   independent reference (EVP_Digest for MD5/SHA-*, a bitwise CRC32 and Appleby's
 *   MurmurHash3 written out here, in Guava's byte order).
 * - final_hex repeats itself, refuses a short buffer, and update after final is ignored. */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "hash.h"

#define FUZZ_NAME "fuzz_checksum"
#include "fuzz.h"

static const char *const ALGS[] = {"MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128"};
static const size_t WIDTH[] = {32, 64, 96, 128, 8, 8, 32};

/* ---- references, written independently of hash.c ---- */

static uint32_t ref_crc32(const uint8_t *p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static uint32_t rl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }
static uint64_t rl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint32_t ref_mm3_32(const uint8_t *data, size_t len) {
  const uint32_t c1 = 0xcc9e2d51, c2 = 0x1b873593;
  uint32_t h1 = 0, k1;
  size_t nblocks = len / 4, i;
  for (i = 0; i < nblocks; i++) {
    const uint8_t *b = data + 4 * i;
    k1 = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    k1 *= c1; k1 = rl32(k1, 15); k1 *= c2;
    h1 ^= k1; h1 = rl32(h1, 13); h1 = h1 * 5 + 0xe6546b64;
  }
  const uint8_t *tail = data + 4 * nblocks;
  k1 = 0;
  switch (len & 3) {
  case 3: k1 ^= (uint32_t)tail[2] << 16; /* fall through */
  case 2: k1 ^= (uint32_t)tail[1] << 8; /* fall through */
  case 1: k1 ^= tail[0]; k1 *= c1; k1 = rl32(k1, 15); k1 *= c2; h1 ^= k1;
  }
  h1 ^= (uint32_t)len;
  h1 ^= h1 >> 16; h1 *= 0x85ebca6b; h1 ^= h1 >> 13; h1 *= 0xc2b2ae35; h1 ^= h1 >> 16;
  return h1;
}

static uint64_t fm64(uint64_t k) {
  k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL; k ^= k >> 33;
  return k;
}

/* the n (at most 8) bytes at b as a little-endian integer */
static uint64_t ld_le(const uint8_t *b, size_t n) {
  uint64_t v = 0;
  while (n-- > 0) v = v << 8 | b[n];
  return v;
}

static void ref_mm3_128(const uint8_t *data, size_t len, uint64_t out[2]) {
  const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
  uint64_t h1 = 0, h2 = 0, k1, k2;
  size_t nblocks = len / 16, i;
  for (i = 0; i < nblocks; i++) {
    k1 = ld_le(data + 16 * i, 8);
    k2 = ld_le(data + 16 * i + 8, 8);
    k1 *= c1; k1 = rl64(k1, 31); k1 *= c2; h1 ^= k1;
    h1 = rl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
    k2 *= c2; k2 = rl64(k2, 33); k2 *= c1; h2 ^= k2;
    h2 = rl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
  }
  /* the tail: bytes 8..14 into k2, bytes 0..7 into k1, little-endian */
  const uint8_t *t = data + 16 * nblocks;
  size_t rest = len & 15;
  if (rest > 8) {
    k2 = ld_le(t + 8, rest - 8);
    k2 *= c2; k2 = rl64(k2, 33); k2 *= c1; h2 ^= k2;
  }
  if (rest > 0) {
    k1 = ld_le(t, rest < 8 ? rest : 8);
    k1 *= c1; k1 = rl64(k1, 31); k1 *= c2; h1 ^= k1;
  }
  h1 ^= (uint64_t)len; h2 ^= (uint64_t)len;  /* len < 2^31 here */
  h1 += h2; h2 += h1;
  h1 = fm64(h1); h2 = fm64(h2);
  h1 += h2; h2 += h1;
  out[0] = h1;
  out[1] = h2;
}

static void hex_le(char *out, uint64_t v, int bytes) {
  static const char d[] = "0123456789abcdef";
  for (int i = 0; i < bytes; i++, v >>= 8) {
    out[2 * i] = d[(v >> 4) & 15];
    out[2 * i + 1] = d[v & 15];
  }
  out[2 * bytes] = '\0';
}

static void reference(int alg, const uint8_t *p, size_t n, char *out) {
  static const char d[] = "0123456789abcdef";
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  uint64_t m[2];
  const EVP_MD *type = NULL;
  switch (alg) {
  case 0: type = EVP_md5(); break;
  case 1: type = EVP_sha256(); break;
  case 2: type = EVP_sha384(); break;
  case 3: type = EVP_sha512(); break;
  case 4: hex_le(out, ref_crc32(p, n), 4); return;
  case 5: hex_le(out, ref_mm3_32(p, n), 4); return;
  case 6:
    ref_mm3_128(p, n, m);
    hex_le(out, m[0], 8);
    hex_le(out + 16, m[1], 8);
    return;
  }
  if (EVP_Digest(p, n, md, &mdlen, type, NULL) != 1) FAIL("EVP_Digest failed");
  for (unsigned i = 0; i < mdlen; i++) {
    out[2 * i] = d[md[i] >> 4];
    out[2 * i + 1] = d[md[i] & 15];
  }
  out[2 * mdlen] = '\0';
}

/* ---- the checks ---- */

static uint64_t rng_state;
static uint32_t rnd(void) {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (uint32_t)(rng_state >> 33);
}

static void check_streaming(const uint8_t *data, size_t size) {
  for (int a = 0; a < 7; a++) {
    char one[TB_HASH_HEX_MAX], streamed[TB_HASH_HEX_MAX], again[TB_HASH_HEX_MAX], ref[TB_HASH_HEX_MAX];
    tb_hash *h1 = tb_hash_create(ALGS[a]), *h2 = tb_hash_create(ALGS[a]);
    if (!h1 || !h2) FAIL("cannot create %s", ALGS[a]);
    tb_hash_update(h1, data, size);
    size_t off = 0;
    while (off < size) {
      uint32_t r = rnd();
      size_t piece = (r & 3) == 0 ? 0 : (r & 3) == 1 ? (r >> 8) % 3 : (r & 3) == 2 ? (r >> 8) % 20 : (r >> 8) % 300;
      if (piece > size - off) piece = size - off;
      tb_hash_update(h2, data + off, piece);
      off += piece;
    }
    if (tb_hash_final_hex(h2, streamed, WIDTH[a]) != -1) FAIL("%s: final_hex took a short buffer", ALGS[a]);
    if (tb_hash_final_hex(h1, one, sizeof one) != 0) FAIL("%s: one-shot final failed", ALGS[a]);
    if (tb_hash_final_hex(h2, streamed, WIDTH[a] + 1) != 0) FAIL("%s: streamed final failed", ALGS[a]);
    if (strcmp(one, streamed) != 0) FAIL("%s: one-shot %s, streamed %s (%zu bytes)", ALGS[a], one, streamed, size);
    if (strlen(one) != WIDTH[a]) FAIL("%s: width %zu", ALGS[a], strlen(one));
    reference(a, data, size, ref);
    if (strcmp(one, ref) != 0) FAIL("%s: got %s, reference %s (%zu bytes)", ALGS[a], one, ref, size);
    tb_hash_update(h1, "x", 1);  /* ignored after final */
    if (tb_hash_final_hex(h1, again, sizeof again) != 0 || strcmp(again, one) != 0)
      FAIL("%s: final_hex does not repeat", ALGS[a]);
    if (!tb_hash_match(ALGS[a], one, one)) FAIL("%s: %s does not match itself", ALGS[a], one);
    if (strcmp(tb_hash_algorithm(h1), ALGS[a]) != 0) FAIL("algorithm name %s", tb_hash_algorithm(h1));
    tb_hash_free(h1);
    tb_hash_free(h2);
  }
}

static int is_blank(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static void check_match(const char *alg, const char *computed, const char *expected) {
  const char *canon = tb_hash_canonical(alg);
  tb_hash *h = tb_hash_create(alg);
  int r = tb_hash_match(alg, computed, expected);
  if ((canon != NULL) != (h != NULL)) FAIL("canonical(%s)=%s but create %s", alg, canon ? canon : "NULL", h ? "works" : "fails");
  if (h && strcmp(tb_hash_algorithm(h), canon) != 0) FAIL("algorithm %s vs canonical %s", tb_hash_algorithm(h), canon);
  tb_hash_free(h);
  if (!canon) {
    if (r) FAIL("match for unsupported algorithm %s", alg);
    return;
  }
  if (r != 0 && r != 1) FAIL("match returned %d", r);
  /* the reverse question must not crash either */
  (void)tb_hash_match(alg, expected, computed);
  /* a well-formed computed value matches its own variants */
  size_t width = 0, n = strlen(computed), i;
  for (i = 0; i < 7; i++)
    if (strcmp(canon, ALGS[i]) == 0) width = WIDTH[i];
  if (n != width) return;
  for (i = 0; i < n; i++)
    if (!isxdigit((unsigned char)computed[i])) return;
  char v[3 * TB_HASH_HEX_MAX];
  if (!tb_hash_match(alg, computed, computed)) FAIL("%s: %s does not match itself", alg, computed);
  snprintf(v, sizeof v, " \t0X%s\r\n", computed);
  for (i = 0; v[i]; i++) v[i] = (char)toupper((unsigned char)v[i]);
  if (!tb_hash_match(alg, computed, v)) FAIL("%s: %s does not match %s", alg, computed, v);
  /* the expected text relates to the computed one only as the rules say */
  if (r) {
    const char *e = expected;
    size_t m;
    while (is_blank((unsigned char)*e)) e++;
    m = strlen(e);
    while (m && is_blank((unsigned char)e[m - 1])) m--;
    if (m >= 2 && e[0] == '0' && (e[1] == 'x' || e[1] == 'X')) { e += 2; m -= 2; }
    if (m == 0 || m > width) FAIL("%s: %s matched an expected text of %zu digits", alg, computed, m);
    for (i = 0; i < m; i++)
      if (!isxdigit((unsigned char)e[i])) FAIL("%s: matched non-hex expected text", alg);
    if (width != 8 && (m != width || strncasecmp(e, computed, width) != 0))
      FAIL("%s: digest %s matched a different text %.*s", alg, computed, (int)m, e);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *copy = malloc(size + 1), *alg, *computed, *expected, *nl;
  uint64_t seed = 1469598103934665603ULL;
  if (!copy) abort();
  memcpy(copy, data, size);
  copy[size] = '\0';
  alg = copy;
  computed = expected = copy + size;  /* "" */
  if ((nl = memchr(alg, '\n', size)) != NULL) {
    *nl = '\0';
    computed = nl + 1;
    if ((nl = strchr(computed, '\n')) != NULL) {
      *nl = '\0';
      expected = nl + 1;
    } else
      expected = copy + size;
  }
  /* C strings stop at a NUL byte, as they would coming from Lua's checksum_match */
  check_match(alg, computed, expected);
  for (size_t i = 0; i < size; i++) seed = (seed ^ data[i]) * 1099511628211ULL;
  rng_state = seed;
  check_streaming(data, size);
  free(copy);
  return 0;
}
