/* sink.h: a file that a download streams into, hashed on the way. */
#ifndef TB_SINK_H
#define TB_SINK_H
#include <stdint.h>
#include <stddef.h>
#include "hash.h"

typedef struct tb_sink {
  int fd;
  tb_hash *hash;      /* NULL when no checksum is wanted */
  int64_t size;       /* bytes in the file (and hashed) so far */
  char error[160];
} tb_sink;

/* Opens path (created 0600) keeping its first `keep` bytes (-1: all of them), re-hashing
 * what is kept so a resumed download verifies the whole image. 0 ok, -1 (see s->error). */
int tb_sink_open(tb_sink *s, const char *path, const char *algorithm, int64_t keep);
/* Appends and hashes. 0 ok, -1 on a write error (disk full...). */
int tb_sink_write(tb_sink *s, const void *data, size_t len);
/* Throws away everything written and starts the hash again. */
int tb_sink_reset(tb_sink *s);
/* Flushes to disk and closes; hex receives the digest if a hash was asked for. 0 ok. */
int tb_sink_finish(tb_sink *s, char *hex, size_t hexlen);
void tb_sink_close(tb_sink *s);
#endif
