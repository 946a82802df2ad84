/* proc.c: child processes for scripts (tb.exec), run without blocking the loop. A child's
 * stdout and stderr (merged) are read through a pipe registered with the poll loop, capped
 * at a limit; when the pipe closes the child is reaped and one "exit" event reports its
 * status and output. Children get no stdin and do not inherit the agent's signal mask. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <lauxlib.h>
#include "core.h"
#include "loop.h"

extern char **environ;

typedef struct tb_child {
  pid_t pid;
  int fd;
  lua_Integer id;
  char *out;
  size_t len, cap, limit;
  int truncated;
  int eof;               /* output closed or abandoned; waiting for the process itself to end */
  const char *gave_up;   /* why the agent killed the child itself, or NULL */
  int64_t next_check;
  struct tb_child *next;
} tb_child;

static lua_Integer next_child_id = 1;
static tb_child *children = NULL;

static int child_fd(void *ctx) {
  tb_child *c = ctx;
  return c->eof ? -1 : c->fd;
}

static int64_t child_deadline(void *ctx) {
  tb_child *c = ctx;
  return c->eof ? c->next_check : -1;
}

static short child_events(void *ctx) {
  (void)ctx;
  return POLLIN;
}

/* Reaps the child if it has ended (never blocks: a child may close its output and go on). */
static void child_try_finish(tb_child *c) {
  int status = 0;
  pid_t r;
  while ((r = waitpid(c->pid, &status, WNOHANG)) < 0 && errno == EINTR) {}
  if (r == 0) {
    c->next_check = tb_loop_now() + 20;
    return;
  }
  tb_event *e = tb_event_new("exit");
  if (e) {
    e->a = c->id;
    if (WIFEXITED(status)) {
      e->b = WEXITSTATUS(status);
    } else {
      e->b = -1;
      e->c = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    }
    tb_event_set_s1(e, c->out ? c->out : "", c->len);
    if (c->gave_up) tb_event_set_s2(e, c->gave_up, strlen(c->gave_up));
    tb_loop_push(e);
  }
  tb_loop_remove_source(c);
  for (tb_child **pp = &children; *pp; pp = &(*pp)->next)
    if (*pp == c) {
      *pp = c->next;
      break;
    }
  close(c->fd);
  free(c->out);
  free(c);
}

/* No memory to keep the output: the pipe would stay readable and poll would spin on it, so
 * stop reading, kill the child and report why (its exit event carries the reason). */
static void child_give_up(tb_child *c, const char *why) {
  kill(c->pid, SIGKILL);
  free(c->out);
  c->out = NULL;
  c->len = c->cap = 0;
  c->gave_up = why;
  c->eof = 1;
  child_try_finish(c);
}

static void child_ready(void *ctx, short revents) {
  tb_child *c = ctx;
  if (c->eof) {
    if (tb_loop_now() >= c->next_check) child_try_finish(c);
    return;
  }
  if (!revents) return;
  char buf[4096];
  for (;;) {
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n > 0) {
      size_t take = (size_t)n;
      if (c->len + take > c->limit) {
        take = c->limit - c->len;
        c->truncated = 1;
      }
      if (take > 0) {
        if (c->len + take > c->cap) {
          size_t cap = c->cap ? c->cap * 2 : 4096;
          while (cap < c->len + take) cap *= 2;
          char *p = realloc(c->out, cap);
          if (!p) {
            child_give_up(c, "out of memory for the command's output (killed)");
            return;
          }
          c->out = p;
          c->cap = cap;
        }
        memcpy(c->out + c->len, buf, take);
        c->len += take;
      }
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    c->eof = 1;  /* EOF or a read error: the child is done with its output */
    child_try_finish(c);
    return;
  }
}

/* core.spawn(argv_table, output_limit) -> id | nil, err: starts argv[1] with arguments
 * (no shell); "exit"(id, exit_code (-1 if killed), signal, output, why|nil) follows, why
 * saying why the agent killed it itself. */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer limit = luaL_optinteger(L, 2, 65536);
  int n = (int)luaL_len(L, 1);
  luaL_argcheck(L, n >= 1, 1, "command expected");
  char **argv = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 0);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    argv[i - 1] = (char *)luaL_checkstring(L, -1);
    lua_pop(L, 1);  /* the string stays alive in the argument table */
  }
  argv[n] = NULL;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) goto fail;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  posix_spawnattr_init(&attr);
  sigset_t none, dfl;
  sigemptyset(&none);
  sigemptyset(&dfl);
  sigaddset(&dfl, SIGPIPE);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &dfl);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid;
  int rc = posix_spawnp(&pid, argv[0], &fa, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    errno = rc;
    goto fail;
  }
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  tb_child *c = calloc(1, sizeof *c);
  if (!c) {
    close(fds[0]);
    goto fail;
  }
  c->pid = pid;
  c->fd = fds[0];
  c->id = next_child_id++;
  c->limit = limit > 0 ? (size_t)limit : 0;
  tb_source src = {child_fd, child_events, child_ready, child_deadline, c};
  if (tb_loop_add_source(&src) != 0) {
    close(c->fd);
    free(c);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return tb_core_fail(L, TB_LOOP_FULL, "cannot run %s", argv[0]);
  }
  c->next = children;
  children = c;
  lua_pushinteger(L, c->id);
  return 1;
fail:
  return tb_core_errno(L, "cannot run %s", argv[0]);
}

/* core.spawn_kill(id [, signal=9]) -> true if that child was still running */
static int l_spawn_kill(lua_State *L) {
  lua_Integer id = luaL_checkinteger(L, 1);
  int sig = (int)luaL_optinteger(L, 2, SIGKILL);
  for (tb_child *c = children; c; c = c->next) {
    if (c->id == id) {
      kill(c->pid, sig);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  lua_pushboolean(L, 0);
  return 1;
}

int tb_proc_open(lua_State *L) {
  static const luaL_Reg fns[] = {{"spawn", l_spawn}, {"spawn_kill", l_spawn_kill}, {NULL, NULL}};
  tb_core_register(L, NULL, NULL, fns);
  return 0;
}
