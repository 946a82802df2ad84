/* notify.c: the service manager's notification protocol (sd_notify(3)), written out here
 * rather than linked from libsystemd: it is one datagram on the AF_UNIX socket named by
 * $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'), and the agent
 * then depends on no part of systemd, also where it runs under another supervisor or none.
 * Policy (what to say and when: READY=1, WATCHDOG=1, STATUS=...) is tb.systemd's. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "core.h"

/* notify_address(name, addr) -> the address length, or 0 when name is no AF_UNIX socket name */
static socklen_t notify_address(const char *name, struct sockaddr_un *addr) {
  size_t len = strlen(name);
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if ((name[0] != '/' && name[0] != '@') || len < 2 || len > sizeof addr->sun_path) return 0;
  if (name[0] == '/' && len == sizeof addr->sun_path) return 0;  /* no room for its NUL */
  memcpy(addr->sun_path, name, len);
  if (name[0] == '@') addr->sun_path[0] = '\0';  /* abstract: no NUL terminator counted */
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (name[0] == '/'));
}

/* core.notify(text [, socket]) -> true | false (no $NOTIFY_SOCKET) | nil, err: sends text
 * ("READY=1\nSTATUS=...") as one datagram to socket, by default $NOTIFY_SOCKET */
static int l_notify(lua_State *L) {
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  const char *name = luaL_optstring(L, 2, getenv("NOTIFY_SOCKET"));
  if (!name || !*name) {
    lua_pushboolean(L, 0);
    return 1;
  }
  struct sockaddr_un addr;
  socklen_t alen = notify_address(name, &addr);
  if (!alen) return tb_core_fail(L, "not an AF_UNIX socket name", "NOTIFY_SOCKET %s", name);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return tb_core_errno(L, "cannot notify %s", name);
  ssize_t n;
  do {
    n = sendto(fd, text, len, MSG_NOSIGNAL, (struct sockaddr *)&addr, alen);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  if (n < 0) {
    errno = err;
    return tb_core_errno(L, "cannot notify %s", name);
  }
  lua_pushboolean(L, 1);
  return 1;
}

int tb_notify_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"notify", l_notify}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
