/* watch.c: inotify on the script's directory, inside the poll loop. Editors save by rename
 * or by truncate-and-write, so the directory (not the file) is watched and every name that
 * was written and closed, moved in or removed becomes a "watch" event; Lua debounces and compares
 * contents before it reloads anything. */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"

static int watch_fd = -1;

static void watch_ready(void *ctx, short revents) {
  (void)ctx;
  if (!(revents & POLLIN)) return;
  char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
  for (;;) {
    ssize_t n = read(watch_fd, buf, sizeof buf);
    if (n <= 0) return;
    for (char *p = buf; p < buf + n;) {
      struct inotify_event *ev = (struct inotify_event *)p;
      if (ev->len > 0 && !(ev->mask & IN_ISDIR)) {
        tb_event *e = tb_event_new("watch");
        if (e) {
          e->a = ev->mask;
          tb_event_set_s1(e, ev->name, strlen(ev->name));
          tb_loop_push(e);
        }
      }
      if (ev->mask & IN_Q_OVERFLOW) {
        tb_event *e = tb_event_new("watch");
        if (e) {
          e->a = ev->mask;
          tb_loop_push(e);
        }
      }
      p += sizeof *ev + ev->len;
    }
  }
}

/* core.watch_dir(path) -> true | nil, err: changes in path become "watch" events
 * (a = inotify mask, s1 = file name) */
static int l_watch_dir(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  if (watch_fd < 0) {
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) return tb_core_errno(L, "cannot watch %s", dir);
    watch_fd = fd;
    if (tb_loop_add_reader(&watch_fd, watch_ready) != 0) {
      close(fd);
      watch_fd = -1;
      return tb_core_fail(L, TB_LOOP_FULL, "cannot watch %s", dir);
    }
  }
  /* no IN_MODIFY or IN_CREATE: they fire while a truncate-and-write save is half done, and
   * a pause in the writer longer than the debounce would load half a file */
  if (inotify_add_watch(watch_fd, dir, IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM |
                        IN_DELETE_SELF | IN_MOVE_SELF) < 0)
    return tb_core_errno(L, "cannot watch %s", dir);
  lua_pushboolean(L, 1);
  return 1;
}

int tb_watch_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"watch_dir", l_watch_dir}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
