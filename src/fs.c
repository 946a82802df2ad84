/* fs.c: the files of the state directory, which hold the agent's memory across restarts
 * (firmware job state, the outbox, downloads). Everything it creates is private to the user:
 * directories get the mode asked for (0700 from Lua), files 0600. write_private replaces a
 * file atomically and never leaves its temporary file behind, whatever fails. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"

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
      if (mkdir(buf, mode) != 0 && errno != EEXIST) return tb_core_errno(L, "cannot create %s", buf);
      buf[i] = c;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int write_all(int fd, const char *data, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = write(fd, data + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    done += (size_t)n;
  }
  return 0;
}

/* core.write_private(path, data) -> true | nil, err: writes a 0600 file atomically
 * (temporary file, fsync, rename), so state survives a crash whole or not at all */
static int l_write_private(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  const char *tmp = lua_pushfstring(L, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return tb_core_errno(L, "cannot write %s", path);
  int failed = write_all(fd, data, len) != 0 || fsync(fd) != 0;
  int err = errno;
  if (close(fd) != 0 && !failed) {
    failed = 1;
    err = errno;
  }
  if (!failed && rename(tmp, path) != 0) {
    failed = 1;
    err = errno;
  }
  if (failed) {
    unlink(tmp);
    errno = err;
    return tb_core_errno(L, "cannot write %s", path);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core.file_size(path) -> bytes | nil */
static int l_file_size(lua_State *L) {
  struct stat st;
  if (stat(luaL_checkstring(L, 1), &st) != 0) return 0;
  lua_pushinteger(L, (lua_Integer)st.st_size);
  return 1;
}

int tb_fs_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"mkdirs", l_mkdirs}, {"write_private", l_write_private},
    {"file_size", l_file_size}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
