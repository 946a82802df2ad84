/* fs.c: the files of the state directory, which hold the agent's memory across restarts
 * (firmware job state, the outbox, downloads). Everything it creates is private to the user:
 * directories get the mode asked for (0700 from Lua), files 0600. write_private replaces a
 * file atomically and never leaves its temporary file behind, whatever fails.
 * One agent at a time may use a state directory: it holds an flock on its lock file. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "core.h"

#define LOCK_MT "tb.lock"

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

/* The pid in a lock file, or 0. The holder writes it right after taking the lock, so a
 * reader that comes in between finds the file empty for a moment: it looks again briefly. */
static long read_pid(int fd) {
  for (int attempt = 0; attempt < 20; attempt++) {
    char buf[32];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n > 0) {
      buf[n] = '\0';
      long pid = strtol(buf, NULL, 10);
      if (pid > 0) return pid;
    }
    struct timespec pause = {0, 5 * 1000 * 1000};
    nanosleep(&pause, NULL);
  }
  return 0;
}

/* core.state_lock(path) -> lock | nil, err [, pid]: an exclusive flock on the file at path
 * (created 0600), which then holds this process's pid. Held until lock:release(), the lock's
 * collection or the end of the process, however it ends: the kernel drops an flock with the
 * last descriptor of its file (close-on-exec, so commands the agent runs do not keep it).
 * Held by another process: nil, "in use", and that process's pid when the file names one. */
static int l_state_lock(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int *ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = -1;
  luaL_setmetatable(L, LOCK_MT);
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return tb_core_errno(L, "cannot open %s", path);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    long pid = err == EWOULDBLOCK ? read_pid(fd) : 0;
    close(fd);
    if (err != EWOULDBLOCK) {
      errno = err;
      return tb_core_errno(L, "cannot lock %s", path);
    }
    lua_pushnil(L);
    lua_pushliteral(L, "in use");
    if (pid > 0) lua_pushinteger(L, (lua_Integer)pid); else lua_pushnil(L);
    return 3;
  }
  char text[32];
  int len = snprintf(text, sizeof text, "%ld\n", (long)getpid());
  if (ftruncate(fd, 0) != 0 || write_all(fd, text, (size_t)len) != 0) {
    int err = errno;
    close(fd);
    errno = err;
    return tb_core_errno(L, "cannot write %s", path);
  }
  *ud = fd;
  return 1;
}

/* lock:release(): gives the lock up (also done by the collector and at exit) */
static int l_lock_release(lua_State *L) {
  int *ud = luaL_checkudata(L, 1, LOCK_MT);
  if (*ud >= 0) {
    close(*ud);
    *ud = -1;
  }
  return 0;
}

int tb_fs_open(lua_State *L) {
  static const luaL_Reg methods[] = {{"release", l_lock_release}, {"__gc", l_lock_release},
    {"__close", l_lock_release}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"mkdirs", l_mkdirs}, {"write_private", l_write_private},
    {"file_size", l_file_size}, {"state_lock", l_state_lock}, {NULL, NULL}};
  tb_core_register(L, LOCK_MT, methods, fns);
  return 0;
}
