/* Tests of child processes (proc.c) through core.spawn and core.poll: output is collected
 * and capped, and when there is no memory left to collect it the child is killed and its
 * exit event says why, instead of poll spinning on a pipe nobody reads. */
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <lualib.h>

#include "check.h"
#include "core.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

static lua_State *L;

/* run_child(argv, limit) -> "code signal #output why polls" once its exit event came, or
 * "no exit after N polls" */
static const char lua_helpers[] =
  "local core = ...\n"
  "function run_child(argv, limit)\n"
  "  local id = assert(core.spawn(argv, limit))\n"
  "  for polls = 1, 20000 do\n"
  "    local got\n"
  "    core.poll(1000, function(kind, a, b, c, s1, s2)\n"
  "      if kind == 'exit' and a == id then\n"
  "        got = string.format('%d %d %d %s', b, c, #s1, tostring(s2))\n"
  "      end\n"
  "    end)\n"
  "    if got then return got, polls end\n"
  "  end\n"
  "  return 'no exit after 20000 polls'\n"
  "end\n";

static const char *run(const char *code) {
  static char out[512];
  int base = lua_gettop(L);
  if (luaL_dostring(L, code) != LUA_OK)
    snprintf(out, sizeof out, "LUA ERROR: %s", lua_tostring(L, -1));
  else
    snprintf(out, sizeof out, "%s", lua_tostring(L, base + 1));
  lua_settop(L, base);
  return out;
}

static void test_output(void) {
  CHECK_STR(run("return run_child({'sh', '-c', 'echo out; echo err >&2; exit 3'})"), "3 0 8 nil");
  CHECK_STR(run("return run_child({'head', '-c', '300000', '/dev/zero'}, 100000)"), "0 0 100000 nil");
  CHECK_STR(run("return run_child({'sh', '-c', 'kill -TERM $$'})"), "-1 15 0 nil");
}

/* Address space for about 48 MiB more: collecting 200 MB of output doubles the buffer until
 * a realloc fails. Run in a child process, which keeps the limit to itself. */
static void test_out_of_memory(void) {
#ifdef UNDER_ASAN
  printf("proc: out-of-memory case skipped (AddressSanitizer reserves the address space)\n");
#else
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld", &pages) != 1) _exit(2);
    fclose(f);
    struct rlimit r;
    r.rlim_cur = r.rlim_max = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + 48u * 1024 * 1024;
    if (setrlimit(RLIMIT_AS, &r) != 0) _exit(2);
    CHECK_STR(run("local got, polls = run_child({'head', '-c', '200000000', '/dev/zero'}, 1000000000)\n"
                  "return got .. (polls and polls < 1000 and '' or ' after ' .. tostring(polls))"),
              "-1 9 0 out of memory for the command's output (killed)");
    _exit(check_failed ? 1 : 0);
  }
  int status = 0;
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
#endif
}

int main(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "tb.core", luaopen_tb_core, 0);
  if (luaL_loadstring(L, lua_helpers) != LUA_OK) return 1;
  lua_insert(L, -2);
  lua_call(L, 1, 0);
  test_output();
  test_out_of_memory();
  lua_close(L);
  return check_done("proc");
}
