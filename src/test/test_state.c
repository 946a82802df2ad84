/* Tests of what the agent keeps about itself: whether the clock may stamp data (clock.c,
 * TB_CLOCK_SYNCED over the kernel's adjtimex status), the one-agent-per-state-directory lock
 * (fs.c: held by a process, refused to another with its pid, released when that process
 * dies, even by SIGKILL), and the outbox's stamp column, also in a database made by a
 * version that did not have it (store.c). */
#include <signal.h>
#include <stdlib.h>
#include <sys/timex.h>
#include <sys/wait.h>
#include <unistd.h>
#include <lualib.h>
#include <sqlite3.h>

#include "check.h"
#include "lua_run.h"
#include "core.h"

static lua_State *L;

static const char *run(const char *code) { return check_lua(L, code); }

static void test_clock(void) {
  setenv("TB_CLOCK_SYNCED", "1", 1);
  CHECK_STR(run("local core = ... return core.clock_synced()"), "true");
  setenv("TB_CLOCK_SYNCED", "0", 1);
  CHECK_STR(run("local core = ... return core.clock_synced()"), "false");
  setenv("TB_CLOCK_SYNCED", "no", 1);
  CHECK(tb_clock_synced() == 0);
  setenv("TB_CLOCK_SYNCED", "yes", 1);
  CHECK(tb_clock_synced() == 1);
  /* unset or unknown: the kernel's word */
  struct timex tx;
  memset(&tx, 0, sizeof tx);
  int state = adjtimex(&tx);
  int kernel = state != -1 && state != TIME_ERROR && !(tx.status & STA_UNSYNC);
  unsetenv("TB_CLOCK_SYNCED");
  CHECK(tb_clock_synced() == kernel);
  setenv("TB_CLOCK_SYNCED", "maybe", 1);
  CHECK(tb_clock_synced() == kernel);
  unsetenv("TB_CLOCK_SYNCED");
}

/* A child takes the lock and waits; the parent is refused with the child's pid; after the
 * child is killed with SIGKILL the parent gets the lock. */
static void test_lock(const char *dir) {
  char path[256];
  snprintf(path, sizeof path, "%s/agent.lock", dir);
  int ready[2];
  CHECK(pipe(ready) == 0);
  pid_t child = fork();
  if (child == 0) {
    lua_State *C = luaL_newstate();
    luaL_openlibs(C);
    luaL_requiref(C, "tb.core", luaopen_tb_core, 0);
    lua_getfield(C, -1, "state_lock");
    lua_pushstring(C, path);
    lua_call(C, 1, 1);
    char ok = lua_isuserdata(C, -1) ? 'y' : 'n';
    if (write(ready[1], &ok, 1) != 1) _exit(2);
    pause();
    _exit(0);
  }
  char ok = 0;
  CHECK(read(ready[0], &ok, 1) == 1 && ok == 'y');
  lua_pushstring(L, path);
  lua_setglobal(L, "path");
  char want[64];
  snprintf(want, sizeof want, "nil | in use | %d", (int)child);
  CHECK_STR(run("local core = ... return core.state_lock(path)"), want);
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);
  CHECK_STR(run("local core = ... lock = core.state_lock(path) return type(lock)"), "userdata");
  /* the file names the holder */
  char text[32] = {0}, mine[32];
  FILE *f = fopen(path, "r");
  CHECK(f && fgets(text, sizeof text, f));
  if (f) fclose(f);
  snprintf(mine, sizeof mine, "%d\n", (int)getpid());
  CHECK_STR(text, mine);
  /* another open file of the same process is refused too, until the lock is released */
  CHECK_STR(run("local core = ... local l, err = core.state_lock(path) return l, err"), "nil | in use");
  CHECK_STR(run("local core = ... lock:release() lock = core.state_lock(path) return type(lock)"), "userdata");
  CHECK_STR(run("local core = ... lock:release() return core.state_lock('/nonexistent/dir/agent.lock')"),
            "nil | cannot open /nonexistent/dir/agent.lock: No such file or directory");
  close(ready[0]);
  close(ready[1]);
}

/* A database from before the stamp column: its records read back without one, new records
 * keep theirs, and the column stays after a reopen. */
static void test_store_stamp(const char *dir) {
  char path[256];
  snprintf(path, sizeof path, "%s/old.db", dir);
  sqlite3 *db;
  CHECK(sqlite3_open(path, &db) == SQLITE_OK);
  CHECK(sqlite3_exec(db,
    "CREATE TABLE outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, created INTEGER NOT NULL,"
    " topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, kind TEXT, points INTEGER,"
    " sent INTEGER DEFAULT 0);"
    "CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
    "INSERT INTO outbox(created, topic, payload, qos, kind, points)"
    " VALUES(5, 't', '{\"ts\":5,\"values\":{\"a\":1}}', 1, 'telemetry', 1);", NULL, NULL, NULL) == SQLITE_OK);
  sqlite3_close(db);
  lua_pushstring(L, path);
  lua_setglobal(L, "path");
  const char *code =
    "local core = ...\n"
    "local s = assert(core.store_open(path))\n"
    "assert(s:push(6, 't', '{\"b\":2}', 1, 'telemetry', 1, 1700000000000))\n"
    "assert(s:push(7, 't', '{\"c\":3}', 1, 'telemetry', 1, 0))\n"
    "assert(s:push(8, 'a', '{\"d\":4}', 1, 'attributes', 1))\n"
    "assert(s:commit())\n"
    "s:close()\n"
    "s = assert(core.store_open(path))\n"
    "local out = {}\n"
    "for _, r in ipairs(s:next(0, 10)) do out[#out + 1] = r.payload .. '=' .. tostring(r.stamp) end\n"
    "s:close()\n"
    "return table.concat(out, ' ')";
  CHECK_STR(run(code), "{\"ts\":5,\"values\":{\"a\":1}}=nil {\"b\":2}=1700000000000 {\"c\":3}=0 {\"d\":4}=nil");
}

int main(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "tb.core", luaopen_tb_core, 0);
  lua_setglobal(L, "core");
  char dir[] = "/tmp/tb_test_state_XXXXXX";
  if (!mkdtemp(dir)) return 1;
  test_clock();
  test_lock(dir);
  test_store_stamp(dir);
  lua_close(L);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) return 1;
  return check_done("test_state");
}
