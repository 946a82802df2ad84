/* hash.c: streaming checksums for OTA packages, in ThingsBoard's exact text encoding (Guava
 * HashCode.toString()). The C API lets the firmware downloader hash chunks without Lua; the
 * Lua API in tb.core (hash_new, hash_hex, checksum_match) wraps the same objects. */
#ifndef TB_HASH_H
#define TB_HASH_H
#include <stddef.h>

/* Longest hex text tb_hash_final_hex writes, with its NUL: SHA512 is 64 bytes. */
#define TB_HASH_HEX_MAX 129

typedef struct tb_hash tb_hash;  /* opaque */

/* A new hasher for an algorithm name as ThingsBoard sends it (MD5, SHA256, SHA384, SHA512,
 * CRC32, MURMUR3_32, MURMUR3_128; case, '-', '_' and surrounding blanks ignored). NULL if the
 * name is unsupported, memory runs out or libcrypto refuses the digest. */
tb_hash *tb_hash_create(const char *algorithm);

/* Feeds bytes. Ignored once the hasher is finalized. */
void tb_hash_update(tb_hash *h, const void *data, size_t len);

/* Finalizes (first call) and writes the lowercase hex, NUL-terminated. Later calls write the
 * same text again. 0 ok; -1 if outlen is too small (see TB_HASH_HEX_MAX) or libcrypto failed. */
int tb_hash_final_hex(tb_hash *h, char *out, size_t outlen);

/* Frees the hasher; NULL is fine. */
void tb_hash_free(tb_hash *h);

/* The canonical upper-case name of a hasher ("SHA256"). */
const char *tb_hash_algorithm(const tb_hash *h);

/* 1 if the expected text (typed by a person or set by the server) names the computed hex
 * under docs/thingsboard.md §7's rules, else 0 (also for an unsupported algorithm): blanks trimmed,
 * a 0x prefix and case ignored; for CRC32 and MURMUR3_32 either byte order, and missing
 * leading zero digits padded back. */
int tb_hash_match(const char *algorithm, const char *computed_hex, const char *expected);

/* The canonical name for an algorithm name ("sha-256" -> "SHA256"), or NULL if unsupported. */
const char *tb_hash_canonical(const char *algorithm);

#endif
