/* The Lua library embedded in the binary (generated from lua/tb by src/embed_lua.cmake). */
#ifndef TB_BUNDLE_H
#define TB_BUNDLE_H
#include <stddef.h>

typedef struct {
  const char *module;  /* "tb", "tb.sched", ... */
  const char *chunkname;
  const unsigned char *code;
  size_t len;
} tb_bundle_entry;

extern const tb_bundle_entry tb_bundle[];
#endif
