/* sink.c: streams downloads to a file in the state directory while hashing them, so memory
 * use does not grow with the image. Files are private to the user (0600). A resumed
 * download re-reads the kept prefix through the hash once, so the checksum always covers
 * the whole image. Lua sees it as userdata "tb.sink". */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <lauxlib.h>
#include "core.h"
#include "sink.h"

#define SINK_MT "tb.sink"

static int sink_fail(tb_sink *s, const char *what) {
  snprintf(s->error, sizeof s->error, "%s: %s", what, strerror(errno));
  return -1;
}

int tb_sink_open(tb_sink *s, const char *path, const char *algorithm, int64_t keep) {
  memset(s, 0, sizeof *s);
  s->fd = -1;
  if (algorithm && *algorithm) {
    s->hash = tb_hash_create(algorithm);
    if (!s->hash) {
      snprintf(s->error, sizeof s->error, "unsupported checksum algorithm: %s", algorithm);
      return -1;
    }
  }
  s->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (s->fd < 0) return sink_fail(s, "cannot open download file");
  struct stat st;
  if (fstat(s->fd, &st) != 0) return sink_fail(s, "cannot stat download file");
  int64_t have = st.st_size;
  if (keep < 0 || keep > have) keep = have;
  if (ftruncate(s->fd, keep) != 0) return sink_fail(s, "cannot truncate download file");
  char buf[65536];
  int64_t done = 0;
  while (done < keep) {
    size_t want = (size_t)(keep - done < (int64_t)sizeof buf ? keep - done : (int64_t)sizeof buf);
    ssize_t n = pread(s->fd, buf, want, done);
    if (n <= 0) return sink_fail(s, "cannot re-read partial download");
    if (s->hash) tb_hash_update(s->hash, buf, (size_t)n);
    done += n;
  }
  if (lseek(s->fd, keep, SEEK_SET) < 0) return sink_fail(s, "cannot seek download file");
  s->size = keep;
  return 0;
}

int tb_sink_write(tb_sink *s, const void *data, size_t len) {
  const char *p = data;
  size_t left = len;
  while (left > 0) {
    ssize_t n = write(s->fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sink_fail(s, "cannot write download file");
    }
    p += n;
    left -= (size_t)n;
  }
  if (s->hash) tb_hash_update(s->hash, data, len);
  s->size += (int64_t)len;
  return 0;
}

int tb_sink_reset(tb_sink *s) {
  if (ftruncate(s->fd, 0) != 0 || lseek(s->fd, 0, SEEK_SET) < 0)
    return sink_fail(s, "cannot truncate download file");
  if (s->hash) {
    const char *alg = tb_hash_algorithm(s->hash);
    tb_hash *fresh = tb_hash_create(alg);
    if (!fresh) {
      snprintf(s->error, sizeof s->error, "cannot restart checksum");
      return -1;
    }
    tb_hash_free(s->hash);
    s->hash = fresh;
  }
  s->size = 0;
  return 0;
}

int tb_sink_finish(tb_sink *s, char *hex, size_t hexlen) {
  if (hex && hexlen) hex[0] = '\0';
  if (s->fd >= 0 && fsync(s->fd) != 0 && errno != EINVAL) return sink_fail(s, "cannot sync download file");
  if (s->hash && hex && tb_hash_final_hex(s->hash, hex, hexlen) != 0) {
    snprintf(s->error, sizeof s->error, "cannot compute checksum");
    return -1;
  }
  tb_sink_close(s);
  return 0;
}

void tb_sink_close(tb_sink *s) {
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
  tb_hash_free(s->hash);
  s->hash = NULL;
}

/* Lua side ------------------------------------------------------------------------------ */

static tb_sink *check_sink(lua_State *L) {
  tb_sink *s = luaL_checkudata(L, 1, SINK_MT);
  if (s->fd < 0) luaL_error(L, "attempt to use a closed sink");
  return s;
}

/* nil, the sink's error */
static int push_error(lua_State *L, tb_sink *s) {
  lua_pushnil(L);
  lua_pushstring(L, s->error);
  return 2;
}

/* core.sink_open(path, algorithm|nil, keep_bytes|nil) -> sink, size | nil, err */
static int l_sink_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  const char *alg = luaL_optstring(L, 2, NULL);
  lua_Integer keep = luaL_optinteger(L, 3, -1);
  tb_sink *s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  s->fd = -1;
  luaL_setmetatable(L, SINK_MT);
  if (tb_sink_open(s, path, alg, keep) != 0) {
    tb_sink_close(s);
    return push_error(L, s);
  }
  lua_pushinteger(L, s->size);
  return 2;
}

/* sink:write(bytes) -> size | nil, err */
static int l_sink_write(lua_State *L) {
  tb_sink *s = check_sink(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (tb_sink_write(s, data, len) != 0) return push_error(L, s);
  lua_pushinteger(L, s->size);
  return 1;
}

/* sink:size() -> bytes written (and kept) so far */
static int l_sink_size(lua_State *L) {
  tb_sink *s = luaL_checkudata(L, 1, SINK_MT);
  lua_pushinteger(L, s->size);
  return 1;
}

/* sink:finish() -> hex|"" , size | nil, err: syncs and closes */
static int l_sink_finish(lua_State *L) {
  tb_sink *s = check_sink(L);
  char hex[TB_HASH_HEX_MAX];
  int64_t size = s->size;
  if (tb_sink_finish(s, hex, sizeof hex) != 0) {
    tb_sink_close(s);
    return push_error(L, s);
  }
  lua_pushstring(L, hex);
  lua_pushinteger(L, size);
  return 2;
}

static int l_sink_gc(lua_State *L) {
  tb_sink_close(luaL_checkudata(L, 1, SINK_MT));
  return 0;
}

int tb_sink_open_lua(lua_State *L) {
  static const luaL_Reg methods[] = {{"write", l_sink_write}, {"size", l_sink_size},
    {"finish", l_sink_finish}, {"close", l_sink_gc}, {"__gc", l_sink_gc}, {"__close", l_sink_gc},
    {NULL, NULL}};
  static const luaL_Reg fns[] = {{"sink_open", l_sink_open}, {NULL, NULL}};
  tb_core_register(L, SINK_MT, methods, fns);
  return 0;
}
