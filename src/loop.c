/* loop.c: the one single-threaded poll() loop. It owns the list of fd sources (MQTT
 * connections, the signalfd, later curl and inotify) and the queue of events their library
 * callbacks produced. Invariants: poll() sleeps until the nearest deadline the caller or a
 * source names, never busy-waits; events are handed to Lua one at a time, each removed from
 * the queue before Lua sees it, so an error in the handler loses nothing that follows. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"

static tb_source sources[TB_LOOP_MAX_SOURCES];
static int nsources = 0;
static tb_event *queue_head = NULL, *queue_tail = NULL;
static int signal_fd = -1;

int64_t tb_loop_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t tb_loop_wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

tb_event *tb_event_new(const char *kind) {
  tb_event *e = calloc(1, sizeof *e);
  if (e) e->kind = kind;
  return e;
}

static int copy_bytes(char **dst, size_t *dlen, const void *s, size_t len) {
  *dst = malloc(len + 1);
  if (!*dst) return -1;
  if (len) memcpy(*dst, s, len);
  (*dst)[len] = '\0';
  *dlen = len;
  return 0;
}

int tb_event_set_s1(tb_event *e, const void *s, size_t len) {
  return copy_bytes(&e->s1, &e->s1len, s, len);
}

int tb_event_set_s2(tb_event *e, const void *s, size_t len) {
  return copy_bytes(&e->s2, &e->s2len, s, len);
}

static void event_free(tb_event *e) {
  free(e->s1);
  free(e->s2);
  free(e);
}

void tb_loop_push(tb_event *e) {
  if (!e) return;
  e->next = NULL;
  if (queue_tail) queue_tail->next = e;
  else queue_head = e;
  queue_tail = e;
}

static tb_event *queue_pop(void) {
  tb_event *e = queue_head;
  if (e) {
    queue_head = e->next;
    if (!queue_head) queue_tail = NULL;
  }
  return e;
}

int tb_loop_add_source(const tb_source *src) {
  if (nsources >= TB_LOOP_MAX_SOURCES) return -1;
  sources[nsources++] = *src;
  return 0;
}

static int reader_fd(void *ctx) {
  return *(int *)ctx;
}

static short reader_events(void *ctx) {
  (void)ctx;
  return POLLIN;
}

int tb_loop_add_reader(int *fd, void (*ready)(void *ctx, short revents)) {
  tb_source src = {reader_fd, reader_events, ready, NULL, fd};
  return tb_loop_add_source(&src);
}

void tb_loop_remove_source(void *ctx) {
  for (int i = 0; i < nsources; i++) {
    if (sources[i].ctx == ctx) {
      memmove(&sources[i], &sources[i + 1], (size_t)(nsources - i - 1) * sizeof sources[0]);
      nsources--;
      return;
    }
  }
}

/* Pushes the event's fields as handler arguments: kind, a, b, c, s1, s2. */
static int push_event(lua_State *L, tb_event *e) {
  lua_pushstring(L, e->kind);
  lua_pushinteger(L, e->a);
  lua_pushinteger(L, e->b);
  lua_pushinteger(L, e->c);
  if (e->s1) lua_pushlstring(L, e->s1, e->s1len); else lua_pushnil(L);
  if (e->s2) lua_pushlstring(L, e->s2, e->s2len); else lua_pushnil(L);
  return 6;
}

/* core.poll(timeout_ms, handler) -> n: waits at most timeout_ms (or until a source's own
 * deadline) for fd activity, lets every source process it, then calls
 * handler(kind, a, b, c, s1, s2) once per queued event. Returns the number of events. */
static int l_poll(lua_State *L) {
  lua_Integer timeout = luaL_checkinteger(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  /* static: a full table would take 22 KiB of C stack; the handler that may re-enter poll
   * runs only after the last use of these */
  static struct pollfd pfds[TB_LOOP_MAX_SOURCES];
  static int idx[TB_LOOP_MAX_SOURCES];
  static void *ctxs[TB_LOOP_MAX_SOURCES];
  static short revs[TB_LOOP_MAX_SOURCES];
  int n = 0;
  int64_t now = tb_loop_now();
  if (queue_head || timeout < 0) timeout = 0;
  for (int i = 0; i < nsources; i++) {
    int64_t d = sources[i].deadline ? sources[i].deadline(sources[i].ctx) : -1;
    if (d >= 0) {
      int64_t wait = d - now;
      if (wait < 0) wait = 0;
      if (wait < timeout) timeout = wait;
    }
    int fd = sources[i].fd(sources[i].ctx);
    if (fd < 0) continue;
    pfds[n].fd = fd;
    pfds[n].events = sources[i].events(sources[i].ctx);
    pfds[n].revents = 0;
    idx[n++] = i;
  }
  if (timeout > 24 * 3600 * 1000) timeout = 24 * 3600 * 1000;
  int rc = poll(pfds, (nfds_t)n, (int)timeout);
  if (rc < 0 && errno != EINTR) return luaL_error(L, "poll failed: %s", strerror(errno));
  /* Sources may add or remove sources while processing; walk a snapshot of their contexts. */
  int count = nsources;
  for (int i = 0; i < count; i++) {
    ctxs[i] = sources[i].ctx;
    revs[i] = 0;
    for (int j = 0; j < n; j++)
      if (idx[j] == i) revs[i] = rc > 0 ? pfds[j].revents : 0;
  }
  for (int i = 0; i < count; i++) {
    for (int k = 0; k < nsources; k++) {
      if (sources[k].ctx == ctxs[i]) {
        sources[k].ready(sources[k].ctx, revs[i]);
        break;
      }
    }
  }
  int dispatched = 0;
  tb_event *e;
  while ((e = queue_pop()) != NULL) {
    lua_pushvalue(L, 2);
    int nargs = push_event(L, e);
    event_free(e);
    lua_call(L, nargs, 0);
    dispatched++;
  }
  lua_pushinteger(L, dispatched);
  return 1;
}

/* core.now() -> monotonic ms */
static int l_now(lua_State *L) {
  lua_pushinteger(L, tb_loop_now());
  return 1;
}

/* core.wall() -> wall-clock ms since the epoch */
static int l_wall(lua_State *L) {
  lua_pushinteger(L, tb_loop_wall());
  return 1;
}

static void signal_source_ready(void *ctx, short revents) {
  (void)ctx;
  if (!(revents & POLLIN)) return;
  struct signalfd_siginfo si;
  while (read(signal_fd, &si, sizeof si) == (ssize_t)sizeof si) {
    const char *name = si.ssi_signo == SIGINT ? "INT" : si.ssi_signo == SIGTERM ? "TERM"
                     : si.ssi_signo == SIGHUP ? "HUP" : "OTHER";
    tb_event *e = tb_event_new("signal");
    if (!e) return;
    tb_event_set_s1(e, name, strlen(name));
    tb_loop_push(e);
  }
}

/* core.signals_open() -> true | nil, err: SIGINT, SIGTERM and SIGHUP become "signal" events. */
static int l_signals_open(lua_State *L) {
  if (signal_fd >= 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (fd < 0) return tb_core_errno(L, "cannot watch signals");
  signal_fd = fd;
  if (tb_loop_add_reader(&signal_fd, signal_source_ready) != 0) {
    close(fd);
    signal_fd = -1;
    return tb_core_fail(L, TB_LOOP_FULL, "cannot watch signals");
  }
  /* blocked last: a failure above leaves the process's signal mask as it was */
  if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
    tb_loop_remove_source(&signal_fd);
    close(fd);
    signal_fd = -1;
    return tb_core_errno(L, "cannot watch signals");
  }
  signal(SIGPIPE, SIG_IGN);
  lua_pushboolean(L, 1);
  return 1;
}

int tb_loop_open(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"poll", l_poll},     {"now", l_now},         {"wall", l_wall},
    {"signals_open", l_signals_open}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
