/* Tests of the poll loop's source table (loop.c): it holds TB_LOOP_MAX_SOURCES sources, every
 * one of them is polled, and once it is full every Lua function that needs a source fails
 * with nil, "...: " TB_LOOP_FULL instead of leaving its events silently unpolled. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>
#include <lualib.h>

#include "check.h"
#include "lua_run.h"
#include "core.h"
#include "loop.h"

static lua_State *L;
static int pipe_fds[2];
static int dummies[TB_LOOP_MAX_SOURCES];  /* each the read end of one pipe: many sources, one fd */
static int dummy_calls, dummy_readable;

static void dummy_ready(void *ctx, short revents) {
  (void)ctx;
  dummy_calls++;
  if (revents & POLLIN) dummy_readable++;
}

static const char *run(const char *code) { return check_lua(L, code); }

/* A listening TCP socket on 127.0.0.1, so a connect gets as far as registering its source. */
static int listen_port(int *fd) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  *fd = socket(AF_INET, SOCK_STREAM, 0);
  if (*fd < 0 || bind(*fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(*fd, 4) != 0 ||
      getsockname(*fd, (struct sockaddr *)&a, &len) != 0)
    return -1;
  return ntohs(a.sin_port);
}

static int fill(void) {
  int n = 0;
  for (int i = 0; i < TB_LOOP_MAX_SOURCES; i++) {
    dummies[i] = pipe_fds[0];
    if (tb_loop_add_reader(&dummies[i], dummy_ready) != 0) break;
    n++;
  }
  return n;
}

static void test_full_table(void) {
  int n = fill();
  CHECK(n == TB_LOOP_MAX_SOURCES);
  CHECK(tb_loop_add_reader(&n, dummy_ready) == -1);

  CHECK_STR(run("return core.spawn({'true'})"), "nil | cannot run true: " TB_LOOP_FULL);
  CHECK_STR(run("return core.watch_dir('/tmp')"), "nil | cannot watch /tmp: " TB_LOOP_FULL);
  CHECK_STR(run("return core.signals_open()"), "nil | cannot watch signals: " TB_LOOP_FULL);
  sigset_t mask;
  sigprocmask(SIG_BLOCK, NULL, &mask);
  CHECK(!sigismember(&mask, SIGTERM));  /* a failed signals_open leaves the mask alone */
  int lfd = -1, port = listen_port(&lfd);
  CHECK(port > 0);
  lua_pushinteger(L, port);
  lua_setglobal(L, "port");
  CHECK_STR(run("return core.mqtt_connect{host = '127.0.0.1', port = port}"),
            "nil | connect failed: " TB_LOOP_FULL);

  /* every source is polled and told about its fd, and one freed slot is usable again: the
   * last one in the table carries a real child whose exit comes through */
  dummy_calls = dummy_readable = 0;
  CHECK_STR(run("return core.poll(0, function() end)"), "0");
  CHECK(dummy_calls == TB_LOOP_MAX_SOURCES && dummy_readable == 0);
  char byte = 'x';
  CHECK(write(pipe_fds[1], &byte, 1) == 1);
  dummy_calls = dummy_readable = 0;
  CHECK_STR(run("return core.poll(1000, function() end)"), "0");
  CHECK(dummy_calls == TB_LOOP_MAX_SOURCES && dummy_readable == TB_LOOP_MAX_SOURCES);
  CHECK(read(pipe_fds[0], &byte, 1) == 1);
  tb_loop_remove_source(&dummies[0]);
  lua_pushnil(L);
  lua_setglobal(L, "port");
  CHECK_STR(run("function wait_exit(id)\n"
                "  for _ = 1, 500 do\n"
                "    local got\n"
                "    core.poll(100, function(kind, a, b, c, s1)\n"
                "      if kind == 'exit' and a == id then got = string.format('%d %d %q', b, c, s1) end\n"
                "    end)\n"
                "    if got then return got end\n"
                "  end\n"
                "end\n"
                "function run_child(argv)\n"
                "  local id, err = core.spawn(argv)\n"
                "  if not id then return err end\n"
                "  return wait_exit(id)\n"
                "end\n"
                "local first = assert(core.spawn({'sleep', '5'}))\n"
                "local _, err = core.spawn({'true'})\n"
                "core.spawn_kill(first)\n"
                "return err, wait_exit(first)"),
            "cannot run true: " TB_LOOP_FULL " | -1 9 \"\"");
  CHECK_STR(run("return run_child({'echo', 'hi'})"), "0 0 \"hi\\\n\"");
  for (int i = 1; i < TB_LOOP_MAX_SOURCES; i++) tb_loop_remove_source(&dummies[i]);
  close(lfd);
}

/* With room again, the same calls succeed: the failures above left nothing half made. */
static void test_room_again(void) {
  CHECK_STR(run("return core.watch_dir('/tmp')"), "true");
  CHECK_STR(run("return core.signals_open()"), "true");
  CHECK(fill() == TB_LOOP_MAX_SOURCES - 2);
  for (int i = 0; i < TB_LOOP_MAX_SOURCES; i++) tb_loop_remove_source(&dummies[i]);
}

int main(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "tb.core", luaopen_tb_core, 0);
  lua_setglobal(L, "core");
  if (pipe(pipe_fds) != 0) return 1;
  test_full_table();
  test_room_again();
  lua_close(L);
  return check_done("loop");
}
