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
    lua_pushnil(L);
    lua_pushstring(L, s->error);
    return 2;
  }
  lua_pushinteger(L, s->size);
  return 2;
}

/* sink:write(bytes) -> size | nil, err */
static int l_sink_write(lua_State *L) {
  tb_sink *s = check_sink(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (tb_sink_write(s, data, len) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, s->error);
    return 2;
  }
  lua_pushinteger(L, s->size);
  return 1;
}

/* sink:reset() -> true | nil, err */
static int l_sink_reset(lua_State *L) {
  tb_sink *s = check_sink(L);
  if (tb_sink_reset(s) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, s->error);
    return 2;
  }
  lua_pushboolean(L, 1);
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
    lua_pushnil(L);
    lua_pushstring(L, s->error);
    return 2;
  }
  lua_pushstring(L, hex);
  lua_pushinteger(L, size);
  return 2;
}

static int l_sink_gc(lua_State *L) {
  tb_sink_close(luaL_checkudata(L, 1, SINK_MT));
  return 0;
}

/* core.mkdirs(path, mode) -> true | nil, err: like mkdir -p; new directories get mode */
static int l_mkdirs(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  mode_t mode = (mode_t)luaL_optinteger(L, 2, 0700);
  size_t len = strlen(path);
  char *buf = lua_newuserdatauv(L, len + 1, 0);  /* freed by the GC even if we raise */
  memcpy(buf, path, len + 1);
  for (size_t i = 1; i <= len; i++) {
    if (buf[i] == '/' || buf[i] == '\0') {
      char c = buf[i];
      buf[i] = '\0';
      if (mkdir(buf, mode) != 0 && errno != EEXIST) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot create %s: %s", buf, strerror(errno));
        return 2;
      }
      buf[i] = c;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core.write_private(path, data) -> true | nil, err: writes a 0600 file atomically
 * (temporary file, fsync, rename), so state survives a crash whole or not at all */
static int l_write_private(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  lua_pushfstring(L, "%s.tmp", path);
  const char *tmp = lua_tostring(L, -1);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) goto fail;
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, data + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      close(fd);
      goto fail;
    }
    done += (size_t)n;
  }
  if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) goto fail;
  lua_pushboolean(L, 1);
  return 1;
fail:
  lua_pushnil(L);
  lua_pushfstring(L, "cannot write %s: %s", path, strerror(errno));
  return 2;
}

/* core.file_size(path) -> bytes | nil */
static int l_file_size(lua_State *L) {
  struct stat st;
  if (stat(luaL_checkstring(L, 1), &st) != 0) return 0;
  lua_pushinteger(L, (lua_Integer)st.st_size);
  return 1;
}

int tb_sink_open_lua(lua_State *L) {
  static const luaL_Reg methods[] = {{"write", l_sink_write}, {"reset", l_sink_reset},
    {"size", l_sink_size}, {"finish", l_sink_finish}, {"close", l_sink_gc}, {NULL, NULL}};
  if (luaL_newmetatable(L, SINK_MT)) {
    luaL_newlib(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_sink_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_sink_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {{"sink_open", l_sink_open}, {"mkdirs", l_mkdirs},
    {"file_size", l_file_size}, {"write_private", l_write_private}, {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
  return 0;
}
